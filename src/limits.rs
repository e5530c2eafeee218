//! Per-key rate limits (docs/api.md, R39, R41): requests per minute, tokens per minute and
//! concurrent streams, checked in the client API in three steps, each as soon as it can be:
//!
//! 1. [`Limits::admit_request`], before the body is read: `rpm`. Every authenticated request
//!    counts, refused ones included (R41), so a refused flood keeps its key refused.
//! 2. [`Gate::stream_permit`], once the body says whether it is a stream: `max_concurrent_streams`
//!    (only a stream needs a slot; whether a request is one is known only from its body).
//! 3. [`Gate::admit_tokens`], once the input is tokenised: `tpm`. The input estimate stands in
//!    until settlement replaces it with the billed input + output (R39).
//!
//! Each limited key has one [`KeyWindows`] (an `Arc` in a sharded map, so two keys never contend
//! on one lock). Its minute is a ring of sixty one-second bins, for requests and for tokens: the
//! window slides by the second, memory stays constant whatever the limit, and `Retry-After` is
//! the number of seconds until enough bins fall out of the window. A stream holds a
//! [`StreamPermit`] until its body is dropped, whatever the ending. Keys without limits never
//! touch the map.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
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
                "rate limit reached: this key allows {} requests per minute (refused requests count too); retry after {} s",
                self.value, self.retry_after_s
            ),
            Limit::Tokens => format!(
                "rate limit reached: this key allows {} tokens per minute (billed input and output); retry after {} s",
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

    /// Takes back up to `n` counted in second `at`, if that second is still in the window
    /// (`now` is the current second).
    fn take_back(&mut self, now: u64, at: u64, n: u64) {
        self.advance(now);
        if at <= self.newest && self.newest - at < WINDOW_S {
            let bin = &mut self.bins[(at % WINDOW_S) as usize];
            *bin = bin.saturating_sub(n);
        }
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

/// The rate state of one key: its request and token windows and its open streams.
#[derive(Debug)]
pub struct KeyWindows {
    origin: Instant,
    windows: Mutex<Windows>,
    streams: AtomicU32,
}

impl KeyWindows {
    fn new() -> KeyWindows {
        KeyWindows {
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

    /// Streams holding a permit now.
    #[cfg(test)]
    pub fn open_streams(&self) -> u32 {
        self.streams.load(Ordering::Acquire)
    }

    /// Counts one request and refuses it if the window already held `rpm` (R41: the refused
    /// request counts too).
    fn count_request(&self, now: u64, rpm: Option<u64>) -> Result<(), Refusal> {
        let mut w = self.windows.lock();
        w.requests.advance(now);
        let before = w.requests.total();
        w.requests.add(now, 1);
        match rpm {
            Some(rpm) if before >= rpm => Err(Refusal {
                limit: Limit::Requests,
                value: rpm,
                retry_after_s: w.requests.seconds_until_below(now, rpm),
            }),
            _ => Ok(()),
        }
    }

    fn take_stream(self: &Arc<Self>, max: u32) -> Result<StreamPermit, Refusal> {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| StreamPermit {
                windows: self.clone(),
            })
            .map_err(|_| Refusal {
                limit: Limit::Streams,
                value: u64::from(max),
                retry_after_s: 1,
            })
    }

    /// Counts `estimate` tokens, or refuses once the window holds `tpm`.
    fn count_tokens(&self, now: u64, tpm: u64, estimate: u64) -> Result<(), Refusal> {
        let mut w = self.windows.lock();
        w.tokens.advance(now);
        if w.tokens.total() >= tpm {
            return Err(Refusal {
                limit: Limit::Tokens,
                value: tpm,
                retry_after_s: w.tokens.seconds_until_below(now, tpm),
            });
        }
        w.tokens.add(now, estimate);
        Ok(())
    }

    /// Replaces `estimate` counted in second `at` by `billed` counted now.
    fn replace_tokens(&self, now: u64, at: u64, estimate: u64, billed: u64) {
        let mut w = self.windows.lock();
        w.tokens.take_back(now, at, estimate);
        if billed > 0 {
            w.tokens.add(now, billed);
        }
    }
}

/// An admitted request's share of its key's tokens-per-minute window: the input estimate it
/// counted at admission, replaced by the billed tokens at settlement ([`KeyLimiter::settle`]).
/// Dropped unsettled (nothing billed: every attempt failed, or the client left before an
/// answer), it takes the estimate back.
#[derive(Debug)]
pub struct KeyLimiter {
    windows: Arc<KeyWindows>,
    /// The second the estimate was counted in.
    at: u64,
    estimate: u64,
    settled: AtomicBool,
}

impl KeyLimiter {
    /// Counts the billed tokens (input + output as settled, R39) in place of the estimate. Only
    /// the first call counts.
    pub fn settle(&self, billed: u64) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            let now = self.windows.now_s();
            self.windows
                .replace_tokens(now, self.at, self.estimate, billed);
        }
    }
}

impl Drop for KeyLimiter {
    fn drop(&mut self) {
        self.settle(0);
    }
}

/// A concurrent-stream slot, released when dropped (the stream's body is dropped on every
/// ending: done, cut, upstream break, client gone, shutdown).
#[derive(Debug)]
pub struct StreamPermit {
    windows: Arc<KeyWindows>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.windows.streams.fetch_sub(1, Ordering::AcqRel);
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

    /// This instance's share of the key's limits in a fleet of `instances`: each limit divided
    /// evenly (rounded down, but at least 1 where the limit is), so that the instances together
    /// never admit more than the limit, or than one each where the limit is below their number.
    pub fn share(self, instances: u32) -> KeyLimits {
        if instances <= 1 {
            return self;
        }
        let n = u64::from(instances);
        let part = |v: u64| (v / n).max(v.min(1));
        KeyLimits {
            rpm: self.rpm.map(part),
            tpm: self.tpm.map(part),
            max_streams: self
                .max_streams
                .map(|v| u32::try_from(part(u64::from(v))).unwrap_or(v)),
        }
    }
}

/// A request that passed `rpm`: the later steps' limits and the key's windows (none when the
/// key has no limits).
#[derive(Debug)]
pub struct Gate {
    limits: KeyLimits,
    windows: Option<Arc<KeyWindows>>,
}

impl Gate {
    /// A stream's concurrent-stream slot; `None` for a non-stream or an unlimited key.
    pub fn stream_permit(&self, stream: bool) -> Result<Option<StreamPermit>, Refusal> {
        match (stream, self.limits.max_streams, &self.windows) {
            (true, Some(max), Some(w)) => w.take_stream(max).map(Some),
            _ => Ok(None),
        }
    }

    /// Counts the input estimate against `tpm`; the returned share is settled with the billed
    /// tokens. `None` when the key has no `tpm`.
    pub fn admit_tokens(&self, estimate: u64) -> Result<Option<Arc<KeyLimiter>>, Refusal> {
        let (Some(tpm), Some(w)) = (self.limits.tpm, &self.windows) else {
            return Ok(None);
        };
        let now = w.now_s();
        w.count_tokens(now, tpm, estimate)?;
        Ok(Some(Arc::new(KeyLimiter {
            windows: w.clone(),
            at: now,
            estimate,
            settled: AtomicBool::new(false),
        })))
    }
}

/// Every key's windows, in shards by key id.
pub struct Limits {
    shards: Vec<Mutex<HashMap<String, Arc<KeyWindows>>>>,
    hasher: std::collections::hash_map::RandomState,
    /// The instances sharing every key's limits (1 for one process; a fleet's live instances).
    instances: Arc<AtomicU32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new()
    }
}

impl Limits {
    pub fn new() -> Limits {
        Limits::shared(Arc::new(AtomicU32::new(1)))
    }

    /// Limits that this instance shares evenly with `instances` (kept current by the store).
    pub fn shared(instances: Arc<AtomicU32>) -> Limits {
        Limits {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            instances,
        }
    }

    fn shard(&self, key_id: &str) -> &Mutex<HashMap<String, Arc<KeyWindows>>> {
        let h = self.hasher.hash_one(key_id);
        &self.shards[(h as usize) % self.shards.len()]
    }

    fn windows(&self, key_id: &str) -> Arc<KeyWindows> {
        let mut shard = self.shard(key_id).lock();
        if let Some(l) = shard.get(key_id) {
            return l.clone();
        }
        let l = Arc::new(KeyWindows::new());
        shard.insert(key_id.to_string(), l.clone());
        l
    }

    /// The first step, before the body is read: counts the request against the key's `rpm`
    /// (refused or not) and says whether it may go on.
    pub fn admit_request(&self, key: &ApiKey) -> Result<Gate, Refusal> {
        let limits = KeyLimits::of(key).share(self.instances.load(Ordering::Relaxed));
        if limits.unlimited() {
            return Ok(Gate {
                limits,
                windows: None,
            });
        }
        let windows = self.windows(key.id());
        windows.count_request(windows.now_s(), limits.rpm)?;
        Ok(Gate {
            limits,
            windows: Some(windows),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn gate(w: &Arc<KeyWindows>, rpm: Option<u64>, tpm: Option<u64>, streams: Option<u32>) -> Gate {
        Gate {
            limits: KeyLimits {
                rpm,
                tpm,
                max_streams: streams,
            },
            windows: Some(w.clone()),
        }
    }

    /// In a fleet each instance takes an even share, so the fleet never admits more than the
    /// limit (or one per instance where the limit is smaller than the fleet).
    #[test]
    fn a_fleet_shares_each_limit_evenly() {
        let l = KeyLimits {
            rpm: Some(30),
            tpm: Some(1000),
            max_streams: Some(2),
        };
        let one = l.share(1);
        assert_eq!(
            (one.rpm, one.tpm, one.max_streams),
            (Some(30), Some(1000), Some(2))
        );
        let three = l.share(3);
        assert_eq!(
            (three.rpm, three.tpm, three.max_streams),
            (Some(10), Some(333), Some(1))
        );
        let zero = KeyLimits {
            rpm: Some(0),
            tpm: None,
            max_streams: None,
        }
        .share(4);
        assert_eq!(
            (zero.rpm, zero.tpm),
            (Some(0), None),
            "0 still refuses everything"
        );
    }

    #[test]
    fn requests_per_minute_slide_by_the_second_and_refusals_count() {
        let w = KeyWindows::new();
        assert!(w.count_request(0, Some(3)).is_ok());
        assert!(w.count_request(10, Some(3)).is_ok());
        assert!(w.count_request(20, Some(3)).is_ok());
        let r = w.count_request(30, Some(3)).unwrap_err();
        assert_eq!(r.limit, Limit::Requests);
        // Four counted (the refusal too): below 3 once seconds 0 and 10 have left, at 70.
        assert_eq!(r.retry_after_s, 40);
        assert!(w.count_request(59, Some(3)).is_err());
        // At 60 the window holds 10, 20, 30, 59: still refused, and counted.
        assert!(w.count_request(60, Some(3)).is_err());
        // Long idle clears everything.
        for i in 0..3 {
            assert!(w.count_request(1000 + i, Some(3)).is_ok());
        }
        assert!(w.count_request(1003, Some(3)).is_err());
    }

    #[test]
    fn tokens_count_the_estimate_until_settlement_replaces_it() {
        let w = Arc::new(KeyWindows::new());
        let g = gate(&w, None, Some(100), None);
        let a = g.admit_tokens(40).unwrap().unwrap();
        let b = g.admit_tokens(50).unwrap().unwrap();
        assert_eq!(w.windows.lock().tokens.total(), 90);
        // Billed below the estimate: the window goes down; above: up.
        a.settle(10);
        assert_eq!(w.windows.lock().tokens.total(), 60);
        b.settle(80);
        assert_eq!(w.windows.lock().tokens.total(), 90);
        // Settling again changes nothing; dropping a settled share neither.
        b.settle(1000);
        drop(b);
        assert_eq!(w.windows.lock().tokens.total(), 90);
        // Dropped unsettled (nothing billed): the estimate is taken back.
        let c = g.admit_tokens(9).unwrap().unwrap();
        assert_eq!(w.windows.lock().tokens.total(), 99);
        drop(c);
        assert_eq!(w.windows.lock().tokens.total(), 90);
        // Reaching tpm refuses; one admitted request may overshoot it.
        let d = g.admit_tokens(20).unwrap().unwrap();
        let r = g.admit_tokens(1).unwrap_err();
        assert_eq!(r.limit, Limit::Tokens);
        d.settle(20);
    }

    #[test]
    fn an_estimate_that_left_the_window_is_not_taken_back_twice() {
        let mut win = Window::new();
        win.add(5, 30);
        win.add(70, 7);
        // Second 5 left the window at 65: nothing to take back from it.
        win.take_back(70, 5, 30);
        assert_eq!(win.total(), 7);
        win.take_back(70, 70, 3);
        assert_eq!(win.total(), 4);
    }

    #[test]
    fn stream_permits_are_released_on_drop() {
        let w = Arc::new(KeyWindows::new());
        let g = gate(&w, Some(10), None, Some(2));
        let a = g.stream_permit(true).unwrap();
        let b = g.stream_permit(true).unwrap();
        assert!(a.is_some() && b.is_some());
        let r = g.stream_permit(true).unwrap_err();
        assert_eq!(r.limit, Limit::Streams);
        // Non-stream requests need no permit, even at the limit.
        assert!(g.stream_permit(false).unwrap().is_none());
        drop(a);
        assert_eq!(w.open_streams(), 1);
        assert!(g.stream_permit(true).unwrap().is_some());
        assert_eq!(w.open_streams(), 1);
        drop(b);
        assert_eq!(w.open_streams(), 0);
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
