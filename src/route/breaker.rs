//! Circuit breaker state machine (R17), pure: time is passed in, so tests drive it
//! without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::Circuit;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    HalfOpen,
    Open,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }
    pub fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::HalfOpen => 1.0,
            State::Open => 2.0,
        }
    }
}

pub struct Breaker {
    cfg: Circuit,
    state: State,
    consecutive_failures: u32,
    /// Outcomes per second over the last `window_s` seconds: (second, total, failures).
    window: VecDeque<(u64, u32, u32)>,
    epoch: Instant,
    open_until: Option<Instant>,
    open_ms: u64,
    closed_since: Instant,
}

impl Breaker {
    pub fn new(cfg: Circuit, now: Instant) -> Self {
        let open_ms = cfg.open_ms;
        Breaker {
            cfg,
            state: State::Closed,
            consecutive_failures: 0,
            window: VecDeque::new(),
            epoch: now,
            open_until: None,
            open_ms,
            closed_since: now,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }
    pub fn open_until(&self) -> Option<Instant> {
        self.open_until
    }
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Moves an expired open breaker to half-open. Returns the new state if it changed.
    pub fn tick(&mut self, now: Instant) -> Option<State> {
        if self.state == State::Open && self.open_until.is_some_and(|t| now >= t) {
            self.state = State::HalfOpen;
            return Some(State::HalfOpen);
        }
        None
    }

    /// Records an outcome that counts for the breaker (`failure` per R17). Returns the new
    /// state if it changed.
    pub fn record(&mut self, now: Instant, failure: bool) -> Option<State> {
        let sec = now.saturating_duration_since(self.epoch).as_secs();
        match self.window.back_mut() {
            Some((s, total, failures)) if *s == sec => {
                *total += 1;
                *failures += u32::from(failure);
            }
            _ => self.window.push_back((sec, 1, u32::from(failure))),
        }
        let oldest = sec.saturating_sub(self.cfg.window_s.saturating_sub(1));
        while self.window.front().is_some_and(|(s, _, _)| *s < oldest) {
            self.window.pop_front();
        }
        if failure {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        } else {
            self.consecutive_failures = 0;
        }
        self.tick(now);
        match self.state {
            State::HalfOpen => {
                if failure {
                    // Re-open for twice as long, up to the maximum.
                    self.open_ms = (self.open_ms.saturating_mul(2)).min(self.cfg.max_open_ms);
                    Some(self.open(now))
                } else {
                    self.state = State::Closed;
                    self.closed_since = now;
                    self.window.clear();
                    Some(State::Closed)
                }
            }
            State::Closed => {
                if self.closed_since + Duration::from_millis(self.cfg.max_open_ms) <= now {
                    self.open_ms = self.cfg.open_ms;
                }
                let (total, failures) = self
                    .window
                    .iter()
                    .fold((0u32, 0u32), |(t, f), (_, bt, bf)| (t + bt, f + bf));
                let rate_trip = total >= self.cfg.min_requests.max(1)
                    && f64::from(failures) / f64::from(total) > self.cfg.failure_rate;
                if failure && (self.consecutive_failures >= self.cfg.failure_threshold || rate_trip)
                {
                    Some(self.open(now))
                } else {
                    None
                }
            }
            State::Open => None,
        }
    }

    fn open(&mut self, now: Instant) -> State {
        // The time first, then the state: an open breaker always has its own end.
        self.open_until = Some(now + Duration::from_millis(self.open_ms));
        self.state = State::Open;
        State::Open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Circuit {
        Circuit {
            failure_threshold: 3,
            failure_rate: 0.5,
            window_s: 10,
            min_requests: 10,
            open_ms: 1000,
            max_open_ms: 4000,
        }
    }

    #[test]
    fn opens_after_threshold_and_half_opens_after_open_ms() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        assert_eq!(b.record(t0, true), None);
        assert_eq!(b.record(t0, true), None);
        assert_eq!(b.record(t0, true), Some(State::Open));
        assert_eq!(b.tick(t0 + Duration::from_millis(999)), None);
        assert_eq!(
            b.tick(t0 + Duration::from_millis(1000)),
            Some(State::HalfOpen)
        );
        // The trial succeeds: closed.
        assert_eq!(
            b.record(t0 + Duration::from_millis(1001), false),
            Some(State::Closed)
        );
    }

    #[test]
    fn reopen_doubles_up_to_max() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        for _ in 0..3 {
            b.record(t0, true);
        }
        let mut t = t0;
        for expect in [2000u64, 4000, 4000] {
            t = b.open_until().unwrap_or(t);
            b.tick(t);
            assert_eq!(b.record(t, true), Some(State::Open));
            assert_eq!(b.open_until(), Some(t + Duration::from_millis(expect)));
        }
    }

    #[test]
    fn failure_rate_trips_with_min_requests() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        // Alternate so consecutive failures never reach 3; 6 of 11 fail (> 50%).
        let mut opened = None;
        for i in 0..11 {
            let r = b.record(t0 + Duration::from_millis(i), i % 2 == 0);
            if r.is_some() {
                opened = Some(i);
            }
        }
        assert_eq!(opened, Some(10));
        assert_eq!(b.state(), State::Open);
    }
}
