//! The gateway-wide retry budget (R18): over a sliding 10 s window, extra attempts (retries and
//! fallbacks) may number at most `ratio × first attempts + min_per_s × 10`.

use std::time::Instant;

use parking_lot::Mutex;

const SLOTS: usize = 10;

pub struct RetryBudget {
    ratio: f64,
    min_per_s: f64,
    epoch: Instant,
    slots: Mutex<[(u64, u64, u64); SLOTS]>, // (second, first attempts, extra attempts)
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_s: f64) -> Self {
        RetryBudget {
            ratio,
            min_per_s,
            epoch: Instant::now(),
            slots: Mutex::new([(u64::MAX, 0, 0); SLOTS]),
        }
    }

    fn now_s(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    fn with_slot<R>(
        &self,
        now: u64,
        f: impl FnOnce(&mut [(u64, u64, u64); SLOTS], usize) -> R,
    ) -> R {
        let mut slots = self.slots.lock();
        let i = (now % SLOTS as u64) as usize;
        if slots[i].0 != now {
            slots[i] = (now, 0, 0);
        }
        f(&mut slots, i)
    }

    pub fn first_attempt(&self) {
        self.first_attempt_at(self.now_s());
    }

    /// Spends one extra attempt if the budget allows it.
    pub fn try_extra(&self) -> bool {
        self.try_extra_at(self.now_s())
    }

    pub fn first_attempt_at(&self, now: u64) {
        self.with_slot(now, |s, i| s[i].1 += 1);
    }

    pub fn try_extra_at(&self, now: u64) -> bool {
        let (ratio, min) = (self.ratio, self.min_per_s);
        self.with_slot(now, |s, i| {
            let lo = now.saturating_sub(SLOTS as u64 - 1);
            let (firsts, extras) = s
                .iter()
                .filter(|(sec, _, _)| *sec != u64::MAX && *sec >= lo && *sec <= now)
                .fold((0u64, 0u64), |(f, e), (_, a, b)| (f + a, e + b));
            let allowed = ratio * firsts as f64 + min * SLOTS as f64;
            if (extras as f64) < allowed {
                s[i].2 += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_ratio_plus_floor_over_the_window() {
        let b = RetryBudget::new(0.2, 1.0);
        for _ in 0..100 {
            b.first_attempt_at(5);
        }
        // 0.2 × 100 + 1 × 10 = 30 extra attempts in the window.
        let granted = (0..100).filter(|_| b.try_extra_at(5)).count();
        assert_eq!(granted, 30);
        // Fifteen seconds later the window has moved on: only the floor remains.
        let later = (0..100).filter(|_| b.try_extra_at(20)).count();
        assert_eq!(later, 10);
    }
}
