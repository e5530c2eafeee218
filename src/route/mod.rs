//! Route health: each route's breaker and recent attempts sit behind one short lock, and every
//! change publishes a [`RouteSnapshot`] that the router reads without a lock or a mailbox round
//! trip. A sent attempt's outcome is applied on the thread that reports it, under that lock, so
//! the next request already sees it; one [`RouteActor`] per route keeps what needs timers (the
//! open → half-open move, probes) and takes the same lock. The half-open trial slot is claimed
//! with an atomic so exactly one request (or probe) tests a recovering route.

pub mod breaker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use arc_swap::ArcSwap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{HeaderMap, Method};
use parking_lot::Mutex;
use serde::Serialize;

use crate::config::{Config, ProbeKind, Route};
use crate::router::upstream::{read_body, UpstreamProvider, Upstreams};
use breaker::{Breaker, State};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProbeResult {
    pub at: DateTime<Utc>,
    pub ok: bool,
    pub latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FailureInfo {
    pub at: DateTime<Utc>,
    /// What failed, in the contract's words (R19: `upstream model <id> not listed`).
    pub reason: String,
    /// What found the failure: a probe or a client's request.
    pub source: FailureSource,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureSource {
    Probe,
    Request,
}

/// What the router and the admin API read.
#[derive(Debug, Clone)]
pub struct RouteSnapshot {
    pub state: State,
    pub open_until: Option<Instant>,
    pub open_until_at: Option<DateTime<Utc>>,
    pub consecutive_failures: u32,
    pub requests: u64,
    pub failures: u64,
    pub latency_ewma_ms: f64,
    /// Share of the last [`RECENT`] reported attempts that succeeded; `None` before the first.
    pub recent_success_rate: Option<f64>,
    /// Median latency of the last [`RECENT`] reported attempts, in milliseconds.
    pub recent_latency_p50_ms: Option<u64>,
    pub last_probe: Option<ProbeResult>,
    pub last_failure: Option<FailureInfo>,
}

impl RouteSnapshot {
    /// The state as callers see it now: an open breaker past its time is half-open.
    pub fn effective_state(&self, now: Instant) -> State {
        match (self.state, self.open_until) {
            (State::Open, Some(t)) if now >= t => State::HalfOpen,
            (s, _) => s,
        }
    }
}

/// How many recent attempts the success rate and the latency median cover.
pub const RECENT: usize = 64;

/// The last [`RECENT`] attempt outcomes of one route, updated under the route's lock as each
/// outcome is reported and summarised into each published snapshot, once per outcome: both
/// summaries are kept up to date as entries come and go, so neither counts nor sorts (and, once
/// the window is full, nothing allocates).
#[derive(Default)]
struct Recent {
    /// (succeeded, latency in ms), oldest overwritten first.
    ring: Vec<(bool, u64)>,
    next: usize,
    /// How many entries of `ring` succeeded (kept as entries come and go).
    ok: usize,
    /// The latencies of `ring` in ascending order (kept as entries come and go).
    sorted: Vec<u64>,
}

impl Recent {
    fn push(&mut self, ok: bool, latency_ms: u64) {
        if self.ring.len() < RECENT {
            self.ring.push((ok, latency_ms));
        } else if let Some(slot) = self.ring.get_mut(self.next) {
            if slot.0 {
                self.ok -= 1;
            }
            // The oldest latency leaves the sorted list (it is there: every latency in `ring`
            // is, once).
            if let Ok(at) = self.sorted.binary_search(&slot.1) {
                self.sorted.remove(at);
            }
            *slot = (ok, latency_ms);
        }
        if ok {
            self.ok += 1;
        }
        let at = self.sorted.partition_point(|&ms| ms < latency_ms);
        self.sorted.insert(at, latency_ms);
        self.next = (self.next + 1) % RECENT;
    }

    fn success_rate(&self) -> Option<f64> {
        let n = self.ring.len();
        (n > 0).then(|| self.ok as f64 / n as f64)
    }

    /// The lower median (of an even count, the smaller middle value).
    fn latency_p50_ms(&self) -> Option<u64> {
        let mid = self.sorted.len().checked_sub(1)? / 2;
        self.sorted.get(mid).copied()
    }
}

pub enum Admission {
    Go { trial: bool },
    Open,
}

/// What an outcome changes, behind [`RouteShared::health`].
struct Health {
    breaker: Breaker,
    recent: Recent,
}

struct RouteShared {
    route: Arc<Route>,
    /// Taken briefly by whoever applies an outcome (the reporting thread) or a timer's or
    /// probe's result (the actor), never across an await. Snapshots are published while it is
    /// held, so they appear in the order the changes were made.
    health: Mutex<Health>,
    snapshot: ArcSwap<RouteSnapshot>,
    /// Milliseconds since `epoch` when the half-open trial was claimed; 0 when free.
    trial_since: AtomicU64,
    trial_ttl: Duration,
    /// `tollgate_upstream_attempts_total` for this route with outcome `ok` / `stream_error`, the
    /// outcomes a stream reports when it ends.
    attempts_ended: [metrics::Counter; 2],
}

pub struct RouteTable {
    routes: HashMap<String, Arc<RouteShared>>,
    /// Held so each route's timers run as long as the table lives; nothing is sent to them.
    _actors: HashMap<String, Addr<RouteActor>>,
    epoch: Instant,
    _arbiter: Option<Arbiter>,
}

impl RouteTable {
    /// Starts one actor per route on a dedicated arbiter. Must run inside an actix `System`.
    pub fn start(
        config: &Config,
        probe_keys: &HashMap<String, String>,
    ) -> Result<RouteTable, String> {
        let arbiter = Arbiter::new();
        let epoch = Instant::now();
        let mut routes = HashMap::new();
        let mut actors = HashMap::new();
        let probe_clients = Arc::new(Upstreams::new(config, probe_keys)?);
        for (_, route) in config.routes() {
            let provider = config
                .provider(&route.provider)
                .ok_or_else(|| format!("route {}: unknown provider", route.id))?
                .clone();
            let shared = Arc::new(RouteShared {
                route: route.clone(),
                health: Mutex::new(Health {
                    breaker: Breaker::new(provider.circuit.clone(), Instant::now()),
                    recent: Recent::default(),
                }),
                snapshot: ArcSwap::from_pointee(RouteSnapshot {
                    state: State::Closed,
                    open_until: None,
                    open_until_at: None,
                    consecutive_failures: 0,
                    requests: 0,
                    failures: 0,
                    latency_ewma_ms: 0.0,
                    recent_success_rate: None,
                    recent_latency_p50_ms: None,
                    last_probe: None,
                    last_failure: None,
                }),
                trial_since: AtomicU64::new(0),
                trial_ttl: Duration::from_millis(
                    provider
                        .first_token_timeout_ms
                        .max(provider.idle_timeout_ms)
                        + 5000,
                ),
                attempts_ended: ["ok", "stream_error"].map(|outcome| {
                    metrics::counter!(crate::metrics::UPSTREAM_ATTEMPTS, "route" => route.id.clone(), "outcome" => outcome)
                }),
            });
            metrics::gauge!(crate::metrics::CIRCUIT_STATE, "route" => route.id.clone()).set(0.0);
            for to in ["closed", "half_open", "open"] {
                metrics::counter!(crate::metrics::CIRCUIT_TRANSITIONS, "route" => route.id.clone(), "to" => to).absolute(0);
            }
            for result in ["ok", "fail"] {
                metrics::counter!(crate::metrics::PROBES, "route" => route.id.clone(), "result" => result).absolute(0);
            }
            let s = shared.clone();
            let probe = provider.probe.clone();
            let clients = probe_clients.clone();
            let addr = RouteActor::start_in_arbiter(&arbiter.handle(), move |_| RouteActor {
                shared: s,
                probe,
                clients,
                epoch,
            });
            routes.insert(route.id.clone(), shared);
            actors.insert(route.id.clone(), addr);
        }
        Ok(RouteTable {
            routes,
            _actors: actors,
            epoch,
            _arbiter: Some(arbiter),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    pub fn snapshot(&self, route_id: &str) -> Option<Arc<RouteSnapshot>> {
        self.routes.get(route_id).map(|r| r.snapshot.load_full())
    }

    /// May an attempt go to this route now? Claims the half-open trial when that is the case.
    pub fn admit(&self, route_id: &str) -> Admission {
        let Some(r) = self.routes.get(route_id) else {
            return Admission::Go { trial: false };
        };
        let snap = r.snapshot.load();
        match snap.effective_state(Instant::now()) {
            State::Closed => Admission::Go { trial: false },
            State::Open => Admission::Open,
            State::HalfOpen => {
                if claim_trial(r, self.now_ms()) {
                    Admission::Go { trial: true }
                } else {
                    Admission::Open
                }
            }
        }
    }

    /// Frees a claimed trial slot that was not used.
    pub fn release_trial(&self, route_id: &str, trial: bool) {
        if trial {
            if let Some(r) = self.routes.get(route_id) {
                r.trial_since.store(0, Ordering::Release);
            }
        }
    }

    /// Reports a sent attempt's outcome; it is applied (and published) before this returns.
    pub fn report(
        &self,
        route_id: &str,
        ok: bool,
        breaker_failure: bool,
        latency: Duration,
        reason: Option<String>,
        trial: bool,
    ) {
        if let Some(r) = self.routes.get(route_id) {
            r.apply(Outcome {
                ok,
                breaker_failure,
                latency,
                reason,
                trial,
            });
        }
    }

    /// A one-shot reporter for an attempt whose outcome is known only later (a stream that
    /// may still break after its first token, R17).
    pub fn reporter(
        &self,
        route_id: &str,
        trial: bool,
        started: Instant,
    ) -> Option<AttemptReporter> {
        let shared = self.routes.get(route_id)?.clone();
        Some(AttemptReporter {
            shared,
            trial,
            started,
        })
    }

    pub fn route_ids(&self) -> impl Iterator<Item = &String> {
        self.routes.keys()
    }
}

/// Reports one sent attempt's outcome when it is finally known; dropping it reports nothing.
pub struct AttemptReporter {
    shared: Arc<RouteShared>,
    trial: bool,
    started: Instant,
}

impl AttemptReporter {
    /// `broke`: the stream broke after it started (a breaker failure), with the reason.
    pub fn finish(self, broke: Option<String>) {
        self.shared.attempts_ended[usize::from(broke.is_some())].increment(1);
        self.shared.apply(Outcome {
            ok: broke.is_none(),
            breaker_failure: broke.is_some(),
            latency: self.started.elapsed(),
            reason: broke,
            trial: self.trial,
        });
    }
}

fn claim_trial(r: &RouteShared, now_ms: u64) -> bool {
    let cur = r.trial_since.load(Ordering::Acquire);
    let expired = cur != 0 && now_ms.saturating_sub(cur) > r.trial_ttl.as_millis() as u64;
    if cur != 0 && !expired {
        return false;
    }
    r.trial_since
        .compare_exchange(cur, now_ms, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// The timers of one route: the open → half-open move and the probes. Outcomes of requests do
/// not pass through it.
struct RouteActor {
    shared: Arc<RouteShared>,
    probe: Option<crate::config::Probe>,
    clients: Arc<Upstreams>,
    epoch: Instant,
}

/// One sent attempt's outcome.
struct Outcome {
    ok: bool,
    breaker_failure: bool,
    latency: Duration,
    reason: Option<String>,
    trial: bool,
}

impl RouteShared {
    /// Applies a request's outcome: the breaker, the recent window and the published snapshot,
    /// under the lock.
    fn apply(&self, m: Outcome) {
        // Built before the lock: the only allocation an outcome needs besides the snapshot.
        let failure = (!m.ok).then(|| FailureInfo {
            at: Utc::now(),
            reason: m.reason.unwrap_or_else(|| "failed".into()),
            source: FailureSource::Request,
        });
        let lat = m.latency.as_secs_f64() * 1000.0;
        let latency_ms = m.latency.as_millis() as u64;
        self.guarded("outcome", |h| {
            let now = Instant::now();
            self.record(h, now, m.breaker_failure, m.trial);
            h.recent.push(m.ok, latency_ms);
            let (rate, p50) = (h.recent.success_rate(), h.recent.latency_p50_ms());
            self.publish(h, now, |s| {
                s.recent_success_rate = rate;
                s.recent_latency_p50_ms = p50;
                s.requests += 1;
                if failure.is_some() {
                    s.failures += 1;
                    s.last_failure = failure;
                }
                s.latency_ewma_ms = if s.requests == 1 {
                    lat
                } else {
                    0.8 * s.latency_ewma_ms + 0.2 * lat
                };
            });
        });
    }

    /// Moves an expired open breaker to half-open (the actor's timer).
    fn tick(&self) {
        self.guarded("tick", |h| {
            let now = Instant::now();
            let changed = h.breaker.tick(now);
            if changed.is_some() {
                self.transition(changed);
                self.publish(h, now, |_| {});
            }
        });
    }

    /// Applies a probe's result (the actor, once the probe has answered).
    fn probe_done(&self, res: ProbeResult, state: State, trial: bool) {
        let failure = (!res.ok).then(|| FailureInfo {
            at: res.at,
            reason: res.reason.clone().unwrap_or_else(|| "probe failed".into()),
            source: FailureSource::Probe,
        });
        self.guarded("probe", |h| {
            let now = Instant::now();
            if res.ok || state != State::Open {
                self.record(h, now, !res.ok, trial);
            }
            self.publish(h, now, |s| {
                s.last_probe = Some(res);
                if failure.is_some() {
                    s.last_failure = failure;
                }
            });
        });
    }

    /// Runs `body` under the lock. A panic in it (a bug: nothing in it is expected to fail) is
    /// caught and logged, so that neither the reporting request nor the actor dies of it; the
    /// lock is released either way (parking_lot does not poison). The breaker changes its
    /// state only once nothing can fail any more, and the snapshot the router reads is
    /// replaced whole or not at all, so a caught panic leaves the route as it last published.
    fn guarded(&self, what: &'static str, body: impl FnOnce(&mut Health)) {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            body(&mut self.health.lock())
        }));
        if caught.is_err() {
            tracing::error!(route = %self.route.id, what, "route health update failed; kept as last published");
        }
    }

    fn publish(&self, h: &Health, now: Instant, f: impl FnOnce(&mut RouteSnapshot)) {
        let mut s = (**self.snapshot.load()).clone();
        s.state = h.breaker.state();
        s.open_until = h.breaker.open_until().filter(|_| s.state == State::Open);
        s.open_until_at = s.open_until.map(|t| {
            Utc::now()
                + chrono::Duration::from_std(t.saturating_duration_since(now)).unwrap_or_default()
        });
        s.consecutive_failures = h.breaker.consecutive_failures();
        f(&mut s);
        self.snapshot.store(Arc::new(s));
    }

    fn transition(&self, to: Option<State>) {
        if let Some(to) = to {
            let id = self.route.id.clone();
            tracing::info!(route = %id, to = to.as_str(), "circuit breaker transition");
            metrics::counter!(crate::metrics::CIRCUIT_TRANSITIONS, "route" => id.clone(), "to" => to.as_str()).increment(1);
            metrics::gauge!(crate::metrics::CIRCUIT_STATE, "route" => id).set(to.gauge());
        }
    }

    fn record(&self, h: &mut Health, now: Instant, failure: bool, trial: bool) {
        let changed = h.breaker.record(now, failure);
        self.transition(changed);
        if trial || changed.is_some() {
            self.trial_since.store(0, Ordering::Release);
        }
    }
}

impl Actor for RouteActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(Duration::from_millis(100), |act, _| act.shared.tick());
        if let Some(p) = self.probe.clone() {
            ctx.run_interval(Duration::from_millis(p.interval_ms), move |act, ctx| {
                let shared = act.shared.clone();
                // While open (not yet expired) the probe still runs, to record health; only a
                // probe that claims the trial slot may close a half-open breaker.
                let now_ms = act.epoch.elapsed().as_millis() as u64 + 1;
                let snap = shared.snapshot.load_full();
                let state = snap.effective_state(Instant::now());
                let trial = state == State::HalfOpen && claim_trial(&shared, now_ms);
                if state == State::HalfOpen && !trial {
                    return;
                }
                let clients = act.clients.clone();
                let route = shared.route.clone();
                let kind = p.kind;
                ctx.spawn(
                    async move { run_probe(&clients, &route, kind).await }
                        .into_actor(act)
                        .map(move |res, act, _| {
                            let id = act.shared.route.id.clone();
                            metrics::counter!(crate::metrics::PROBES, "route" => id, "result" => if res.ok { "ok" } else { "fail" }).increment(1);
                            act.shared.probe_done(res, state, trial);
                        }),
                );
            });
        }
    }
}

async fn run_probe(clients: &Upstreams, route: &Route, kind: ProbeKind) -> ProbeResult {
    let at = Utc::now();
    let t0 = Instant::now();
    let Some(up) = clients.get(&route.provider) else {
        return probe_result(at, t0, false, None, Some("unknown provider".into()));
    };
    let (method, path, body) = match kind {
        ProbeKind::Models => (Method::GET, "/models", Bytes::new()),
        // A one-token answer in the provider's own format (Anthropic's is `/messages`).
        ProbeKind::Chat => (
            Method::POST,
            match up.provider.api {
                crate::config::Api::OpenAi => "/chat/completions",
                crate::config::Api::Anthropic => "/messages",
            },
            Bytes::from(
                serde_json::json!({"model": route.upstream_model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1})
                    .to_string(),
            ),
        ),
    };
    probe_send(up, route, method, path, body, at, t0).await
}

async fn probe_send(
    up: &UpstreamProvider,
    route: &Route,
    method: Method,
    path: &str,
    body: Bytes,
    at: DateTime<Utc>,
    t0: Instant,
) -> ProbeResult {
    let timeout = Duration::from_millis(up.provider.first_token_timeout_ms.min(10_000));
    let deadline = tokio::time::Instant::now() + timeout;
    let is_models = method == Method::GET;
    let resp = match up
        .send(method, path, body, &HeaderMap::new(), deadline)
        .await
    {
        Ok(r) => r,
        Err(e) => return probe_result(at, t0, false, None, Some(e.to_string())),
    };
    let status = resp.status().as_u16();
    let body = read_body(resp.into_body(), 4 << 20, timeout).await;
    if !(200..300).contains(&status) {
        return probe_result(
            at,
            t0,
            false,
            Some(status),
            Some(format!("upstream answered {status}")),
        );
    }
    if is_models {
        let listed = body
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("data").and_then(|d| d.as_array()).cloned())
            .is_some_and(|d| {
                d.iter().any(|m| {
                    m.get("id").and_then(|i| i.as_str()) == Some(route.upstream_model.as_str())
                })
            });
        if !listed {
            return probe_result(
                at,
                t0,
                false,
                Some(status),
                Some(format!(
                    "upstream model {} not listed",
                    route.upstream_model
                )),
            );
        }
    }
    probe_result(at, t0, true, Some(status), None)
}

fn probe_result(
    at: DateTime<Utc>,
    t0: Instant,
    ok: bool,
    status: Option<u16>,
    reason: Option<String>,
) -> ProbeResult {
    ProbeResult {
        at,
        ok,
        latency_ms: t0.elapsed().as_millis() as u64,
        status,
        reason,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod recent_tests {
    use super::*;

    #[test]
    fn rate_and_median_cover_the_last_attempts_only() {
        let mut r = Recent::default();
        assert_eq!(r.success_rate(), None);
        assert_eq!(r.latency_p50_ms(), None);
        r.push(true, 10);
        r.push(false, 30);
        r.push(true, 20);
        assert_eq!(r.latency_p50_ms(), Some(20));
        assert!((r.success_rate().unwrap_or_default() - 2.0 / 3.0).abs() < 1e-9);
        for _ in 0..RECENT {
            r.push(true, 5);
        }
        assert_eq!(r.ring.len(), RECENT);
        assert_eq!(r.success_rate(), Some(1.0));
        assert_eq!(r.latency_p50_ms(), Some(5));
    }

    /// The kept median is the lower median of exactly the last [`RECENT`] latencies, with
    /// repeated values and the window sliding many times over.
    #[test]
    fn median_follows_the_window() {
        let mut r = Recent::default();
        let mut all = Vec::new();
        let mut x: u64 = 7;
        for i in 0..(RECENT * 5) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let ms = (x >> 33) % 40;
            r.push(i % 3 != 0, ms);
            all.push(ms);
            let mut last: Vec<u64> = all.iter().rev().take(RECENT).copied().collect();
            last.sort_unstable();
            assert_eq!(
                r.latency_p50_ms(),
                Some(last[(last.len() - 1) / 2]),
                "after {i}"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod outcome_tests {
    use super::*;
    use std::sync::mpsc;

    const CONFIG: &str = r#"
[server]
admin_token = "admin-0123456789"

[buckets.credit]
currency = "USD"

[[providers]]
id = "demo"
kind = "mock"
circuit = { failure_threshold = 3, min_requests = 1000, open_ms = 60000, max_open_ms = 120000 }

[[models]]
name = "m"
routes = [{ provider = "demo", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }]
"#;

    /// An outcome counts the moment it is reported, from any thread, even while the route's
    /// actor is busy: the attempt that reaches the failure threshold opens the breaker before
    /// `report` (or a stream's `finish`) returns, so the very next request falls back.
    #[test]
    fn the_failing_attempt_opens_the_breaker_before_report_returns() {
        let config = crate::config::parse_str(CONFIG).unwrap();
        actix_rt::System::new().block_on(async move {
            let table = RouteTable::start(&config, &HashMap::new()).unwrap();
            let id = "m/demo";
            // Keep the routes' arbiter (the actor's thread) busy until the test ends; dropping
            // `release`, also on a failed assertion, frees it.
            let (release, held) = mpsc::channel::<()>();
            let (busy, is_busy) = mpsc::channel();
            table._arbiter.as_ref().unwrap().spawn(async move {
                let _ = busy.send(());
                let _ = held.recv_timeout(Duration::from_secs(60));
            });
            is_busy.recv_timeout(Duration::from_secs(10)).unwrap();

            // Reported from a plain thread, outside any actix System.
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        for n in 1..=2u32 {
                            assert!(matches!(table.admit(id), Admission::Go { trial: false }));
                            table.report(
                                id,
                                false,
                                true,
                                Duration::from_millis(4),
                                Some("upstream answered 500".into()),
                                false,
                            );
                            let s = table.snapshot(id).unwrap();
                            assert_eq!(s.consecutive_failures, n);
                            assert_eq!((s.requests, s.failures), (u64::from(n), u64::from(n)));
                            assert_eq!(s.state, State::Closed);
                        }
                        // The third failure is a stream that broke after it started.
                        assert!(matches!(table.admit(id), Admission::Go { trial: false }));
                        let reporter = table.reporter(id, false, Instant::now()).unwrap();
                        reporter.finish(Some("stream broke".into()));
                    })
                    .join()
                    .unwrap();
            });
            let s = table.snapshot(id).unwrap();
            assert_eq!(s.state, State::Open);
            assert!(s.open_until_at.is_some());
            assert_eq!((s.requests, s.failures, s.consecutive_failures), (3, 3, 3));
            assert_eq!(
                s.last_failure
                    .as_ref()
                    .map(|f| (f.reason.as_str(), f.source)),
                Some(("stream broke", FailureSource::Request))
            );
            assert_eq!(s.recent_success_rate, Some(0.0));
            assert!(matches!(table.admit(id), Admission::Open));
            drop(release);
        });
    }

    /// A panic while the route's state is being updated is caught: the request that reported
    /// lives on, the lock is free, and the route keeps counting.
    #[test]
    fn a_panic_inside_the_update_leaves_the_route_usable() {
        let config = crate::config::parse_str(CONFIG).unwrap();
        actix_rt::System::new().block_on(async move {
            let table = RouteTable::start(&config, &HashMap::new()).unwrap();
            let id = "m/demo";
            let route = table.routes.get(id).unwrap();
            route.guarded("test", |h| {
                h.recent.push(true, 1);
                panic!("a bug inside the lock");
            });
            table.report(id, true, false, Duration::from_millis(2), None, false);
            let s = table.snapshot(id).unwrap();
            assert_eq!((s.state, s.requests, s.failures), (State::Closed, 1, 0));
            assert!(matches!(table.admit(id), Admission::Go { trial: false }));
        });
    }
}
