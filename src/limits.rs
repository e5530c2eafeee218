//! Per-key rate limits (DESIGN §4.4, §5): requests per minute, tokens per minute and concurrent
//! streams, checked in the client API after the model and permission checks, before routing.
//!
//! Each limited key has one [`KeyLimiter`] (an `Arc` in a sharded map, so two keys never contend
//! on one lock). Its minute is a ring of sixty one-second bins, for requests and for tokens: the
//! window slides by the second, memory stays constant whatever the limit, and `Retry-After` is
//! the number of seconds until enough bins fall out of the window. Tokens count the input
//! estimate at admission and the billed output tokens at settlement. A stream holds a
//! [`StreamPermit`] until its body is dropped, whatever the ending. Keys without limits never
//! touch the map.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::keys::ApiKey;

const WINDOW_S: u64 = 60;
const SHARDS: usize = 32;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
    Streams,
}

/// A refusal: which limit, its value, and when to retry (whole seconds, at least 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub limit: Limit,
    pub value: u64,
    pub retry_after_s: u64,
}

impl Refusal {
    /// What the client reads in the 429 envelope.
    pub fn message(&self) -> String {
        match self.limit {
            Limit::Requests => format!(
                "rate limit reached: this key allows {} requests per minute; retry after {} s",
                self.value, self.retry_after_s
            ),
            Limit::Tokens => format!(
                "rate limit reached: this key allows {} tokens per minute (input estimate and billed output); retry after {} s",
                self.value, self.retry_after_s
            ),
            Limit::Streams => format!(
                "rate limit reached: this key allows {} concurrent streams; retry after one of them ends",
                self.value
            ),
        }
    }
}

/// One minute of counts in one-second bins.
#[derive(Debug, Clone)]
struct Window {
    bins: [u64; WINDOW_S as usize],
    /// The second of the newest bin; older seconds are cleared when time moves past them.
    newest: u64,
}

impl Window {
    fn new() -> Window {
        Window {
            bins: [0; WINDOW_S as usize],
            newest: 0,
        }
    }

    fn advance(&mut self, now: u64) {
        if now <= self.newest {
            return;
        }
        let gap = (now - self.newest).min(WINDOW_S);
        for s in (now + 1 - gap)..=now {
            self.bins[(s % WINDOW_S) as usize] = 0;
        }
        self.newest = now;
    }

    fn total(&self) -> u64 {
        self.bins.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    fn add(&mut self, now: u64, n: u64) {
        self.advance(now);
        let bin = &mut self.bins[(now % WINDOW_S) as usize];
        *bin = bin.saturating_add(n);
    }

    /// Seconds from `now` until the window's total is below `ceiling` (the window must have
    /// been advanced to `now`).
    fn seconds_until_below(&self, now: u64, ceiling: u64) -> u64 {
        let mut left = self.total();
        for k in 0..WINDOW_S {
            // The bin of second `now - 59 + k` leaves the window at `now + k + 1`.
            let s = (now + WINDOW_S - (WINDOW_S - 1) + k) % WINDOW_S;
            left = left.saturating_sub(self.bins[s as usize]);
            if left < ceiling {
                return k + 1;
            }
        }
        WINDOW_S
    }
}

#[derive(Debug)]
struct Windows {
    requests: Window,
    tokens: Window,
}

/// The rate state of one key. Limits are read from the key at each check, so a changed key
/// applies at once; only the counts live here.
#[derive(Debug)]
pub struct KeyLimiter {
    origin: Instant,
    windows: Mutex<Windows>,
    streams: AtomicU32,
}

impl KeyLimiter {
    fn new() -> KeyLimiter {
        KeyLimiter {
            origin: Instant::now(),
            windows: Mutex::new(Windows {
                requests: Window::new(),
                tokens: Window::new(),
            }),
            streams: AtomicU32::new(0),
        }
    }

    fn now_s(&self) -> u64 {
        self.origin.elapsed().as_secs()
    }

    /// Counts billed output tokens (at settlement) in the tokens-per-minute window.
    pub fn add_tokens(&self, tokens: u64) {
        if tokens > 0 {
            let now = self.now_s();
            self.windows.lock().tokens.add(now, tokens);
        }
    }

    /// Streams holding a permit now.
    pub fn open_streams(&self) -> u32 {
        self.streams.load(Ordering::Acquire)
    }

    fn admit_at(
        self: &Arc<Self>,
        now: u64,
        limits: KeyLimits,
        input_tokens: u64,
        stream: bool,
    ) -> Result<Option<StreamPermit>, Refusal> {
        let mut w = self.windows.lock();
        w.requests.advance(now);
        w.tokens.advance(now);
        if let Some(rpm) = limits.rpm {
            if w.requests.total() >= rpm {
                return Err(Refusal {
                    limit: Limit::Requests,
                    value: rpm,
                    retry_after_s: w.requests.seconds_until_below(now, rpm),
                });
            }
        }
        if let Some(tpm) = limits.tpm {
            if w.tokens.total() >= tpm {
                return Err(Refusal {
                    limit: Limit::Tokens,
                    value: tpm,
                    retry_after_s: w.tokens.seconds_until_below(now, tpm),
                });
            }
        }
        let permit = match (stream, limits.max_streams) {
            (true, Some(max)) => {
                let taken = self
                    .streams
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some(n + 1)
                    });
                if taken.is_err() {
                    return Err(Refusal {
                        limit: Limit::Streams,
                        value: u64::from(max),
                        retry_after_s: 1,
                    });
                }
                Some(StreamPermit {
                    limiter: self.clone(),
                })
            }
            _ => None,
        };
        w.requests.add(now, 1);
        w.tokens.add(now, input_tokens);
        Ok(permit)
    }
}

/// A concurrent-stream slot, released when dropped (the stream's body is dropped on every
/// ending: done, cut, upstream break, client gone, shutdown).
#[derive(Debug)]
pub struct StreamPermit {
    limiter: Arc<KeyLimiter>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.limiter.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A key's configured limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyLimits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_streams: Option<u32>,
}

impl KeyLimits {
    pub fn of(key: &ApiKey) -> KeyLimits {
        KeyLimits {
            rpm: key.record.rpm.map(u64::from),
            tpm: key.record.tpm,
            max_streams: key.record.max_concurrent_streams,
        }
    }
    fn unlimited(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.max_streams.is_none()
    }
}

/// What an admitted request carries: the key's limiter (to count output tokens at settlement)
/// and, for a stream, its permit.
#[derive(Debug, Default)]
pub struct Admission {
    pub limiter: Option<Arc<KeyLimiter>>,
    pub permit: Option<StreamPermit>,
}

/// Every key's limiter, in shards by key id.
pub struct Limits {
    shards: Vec<Mutex<HashMap<String, Arc<KeyLimiter>>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new()
    }
}

impl Limits {
    pub fn new() -> Limits {
        Limits {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn shard(&self, key_id: &str) -> &Mutex<HashMap<String, Arc<KeyLimiter>>> {
        let h = self.hasher.hash_one(key_id);
        &self.shards[(h as usize) % self.shards.len()]
    }

    fn limiter(&self, key_id: &str) -> Arc<KeyLimiter> {
        let mut shard = self.shard(key_id).lock();
        if let Some(l) = shard.get(key_id) {
            return l.clone();
        }
        let l = Arc::new(KeyLimiter::new());
        shard.insert(key_id.to_string(), l.clone());
        l
    }

    /// Admits one request of `key` (counting the request and its input estimate) or says which
    /// limit refuses it. A refused request counts nowhere.
    pub fn admit(
        &self,
        key: &ApiKey,
        input_tokens: u64,
        stream: bool,
    ) -> Result<Admission, Refusal> {
        let limits = KeyLimits::of(key);
        if limits.unlimited() {
            return Ok(Admission::default());
        }
        let limiter = self.limiter(key.id());
        let now = limiter.now_s();
        let permit = limiter.admit_at(now, limits, input_tokens, stream)?;
        Ok(Admission {
            limiter: limits.tpm.is_some().then_some(limiter),
            permit,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lim(rpm: Option<u64>, tpm: Option<u64>, streams: Option<u32>) -> KeyLimits {
        KeyLimits {
            rpm,
            tpm,
            max_streams: streams,
        }
    }

    #[test]
    fn requests_per_minute_slide_by_the_second() {
        let l = Arc::new(KeyLimiter::new());
        let k = lim(Some(3), None, None);
        assert!(l.admit_at(0, k, 0, false).is_ok());
        assert!(l.admit_at(10, k, 0, false).is_ok());
        assert!(l.admit_at(20, k, 0, false).is_ok());
        let r = l.admit_at(30, k, 0, false).unwrap_err();
        assert_eq!(r.limit, Limit::Requests);
        // The request of second 0 leaves the window at second 60.
        assert_eq!(r.retry_after_s, 30);
        assert!(l.admit_at(59, k, 0, false).is_err());
        assert!(l.admit_at(60, k, 0, false).is_ok());
        assert!(l.admit_at(61, k, 0, false).is_err());
        // Long idle clears everything.
        for i in 0..3 {
            assert!(l.admit_at(1000 + i, k, 0, false).is_ok());
        }
    }

    #[test]
    fn tokens_count_input_at_admission_and_output_at_settlement() {
        let l = Arc::new(KeyLimiter::new());
        let k = lim(None, Some(100), None);
        assert!(l.admit_at(0, k, 40, false).is_ok());
        l.windows.lock().tokens.add(1, 50);
        assert!(l.admit_at(2, k, 5, false).is_ok());
        // 95 < 100: admitted, and now at 105.
        assert!(l.admit_at(3, k, 10, false).is_ok());
        let r = l.admit_at(4, k, 1, false).unwrap_err();
        assert_eq!(r.limit, Limit::Tokens);
        // Dropping second 0 (40) leaves 65 < 100: at second 60.
        assert_eq!(r.retry_after_s, 56);
    }

    #[test]
    fn stream_permits_are_released_on_drop_and_refusals_count_nowhere() {
        let l = Arc::new(KeyLimiter::new());
        let k = lim(Some(10), None, Some(2));
        let a = l.admit_at(0, k, 0, true).unwrap();
        let b = l.admit_at(0, k, 0, true).unwrap();
        assert!(a.is_some() && b.is_some());
        let r = l.admit_at(0, k, 0, true).unwrap_err();
        assert_eq!(r.limit, Limit::Streams);
        // Non-stream requests need no permit.
        assert!(l.admit_at(0, k, 0, false).unwrap().is_none());
        drop(a);
        assert_eq!(l.open_streams(), 1);
        assert!(l.admit_at(0, k, 0, true).unwrap().is_some());
        // 2 + 1 + 1 admitted; the refusal was not counted.
        assert_eq!(l.windows.lock().requests.total(), 4);
    }

    #[test]
    fn window_total_survives_wraparound() {
        let mut w = Window::new();
        for s in 0..200 {
            w.add(s, 1);
        }
        assert_eq!(w.total(), 60);
        w.advance(229);
        assert_eq!(w.total(), 30);
        assert_eq!(w.seconds_until_below(229, 1), 30);
    }
}
