//! Drives a scenario: phase by phase, round by round, alternating the direct target (the mock),
//! the reference proxy in front of it when one is given (e.g. nginx) and the gateway (direct,
//! proxy, gateway, gateway, proxy, direct, ... so slow drift cancels), in closed loop (fixed
//! concurrency) or open loop (fixed start rate, latency from the scheduled start). Around each
//! gateway round it reads the gateway's CPU and RSS from `/proc` (summed over a fleet's
//! processes), the mocks' token counters and, for a fleet, the database's transactions; around
//! each proxy round, the proxy's CPU and RSS.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::admin;
use crate::client::{send, HttpClient, Target};
use crate::dbstat::{self, DbCost, DbSample};
use crate::procstat::{self, ProcSample};
use crate::scenario::{Mode, Phase, Scenario};
use crate::stats::{Outcome, Recorder};

/// How often RSS and open streams are sampled during a gateway round.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(100);

pub struct Runner {
    pub scenario: Scenario,
    pub client: HttpClient,
    pub gateway: Target,
    pub direct: Option<Target>,
    /// A plain reverse proxy in front of the mock (the yardstick), sent the direct body.
    pub proxy: Option<Target>,
    /// `--mock NAME=URL`: mock control URLs.
    pub mocks: Vec<(String, String)>,
    /// The gateway's processes (one, or each instance of a fleet); empty: no process cost.
    pub gateway_pids: Vec<u32>,
    /// The proxy's processes (e.g. nginx's master and worker); empty: no process cost.
    pub proxy_pids: Vec<u32>,
    /// The fleet's PostgreSQL, for its transactions per request.
    pub pg_url: Option<String>,
    pub progress: bool,
}

/// A process's cost (the gateway's or the proxy's) over a phase's rounds of that target.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cost {
    pub cpu_s: f64,
    pub requests: u64,
    pub tokens: u64,
    pub cpu_s_per_1k_requests: f64,
    pub cpu_s_per_1k_tokens: f64,
    pub cpu_us_per_request: f64,
    pub cpu_us_per_token: f64,
    /// RSS right before the first round of the phase.
    pub idle_rss_kib: u64,
    /// Highest sampled RSS during the phase's rounds.
    pub peak_rss_kib: u64,
    /// `VmHWM` at the end of the phase (peak since the process started).
    pub hwm_kib: u64,
    /// Most requests in flight at a sample.
    pub peak_open: u64,
    /// (peak RSS − idle RSS) / peak open requests.
    pub rss_kib_per_open: f64,
}

pub struct PhaseRun {
    pub phase: Phase,
    pub direct: Option<Recorder>,
    pub gateway: Recorder,
    pub cost: Option<Cost>,
    pub proxy: Option<Recorder>,
    pub proxy_cost: Option<Cost>,
    /// Tokens the mocks emitted during the gateway rounds (all `--mock`s summed).
    pub mock_tokens: Option<u64>,
    /// The database's transactions over the gateway rounds' steady state (`--pg-url`).
    pub db: Option<DbCost>,
}

fn lock(r: &Mutex<Recorder>) -> MutexGuard<'_, Recorder> {
    // A panicking request task cannot leave a Recorder half-updated in a way that matters here.
    r.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Shared per-round state of the request tasks.
struct Load {
    client: HttpClient,
    target: Target,
    bodies: Arc<Vec<Bytes>>,
    timeout: Duration,
    run_start: Instant,
    recorder: Arc<Mutex<Recorder>>,
    in_flight: Arc<AtomicU64>,
    progress: ProgressBar,
    /// Starts before this are warm-up...
    warm_until: Instant,
    /// ...unless the request index is at least this (a fast target finishes its warm-up by
    /// count: a tenth of the round's requests).
    warm_count: u64,
    /// Start of the first measured (non-warm-up) request: rates count from here.
    measured_from: Mutex<Option<Instant>>,
    /// Requests finished so far in this round.
    finished: AtomicU64,
}

impl Load {
    async fn one(&self, i: u64, start: Instant) {
        let body = self.bodies[(i % self.bodies.len() as u64) as usize].clone();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let outcome = send(
            &self.client,
            &self.target,
            body,
            start,
            self.run_start,
            self.timeout,
        )
        .await;
        let outcome = Outcome {
            warmup: start < self.warm_until && i < self.warm_count,
            ..outcome
        };
        if !outcome.warmup {
            let mut from = self
                .measured_from
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if from.is_none_or(|f| start < f) {
                *from = Some(start);
            }
        }
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.finished.fetch_add(1, Ordering::Relaxed);
        lock(&self.recorder).record(&outcome);
        self.progress.inc(1);
    }
}

impl Runner {
    /// Requests per round of one target for `phase`.
    fn per_round(&self, phase: &Phase) -> (u64, Duration) {
        let rounds = u64::from(self.scenario.rounds);
        let count = phase.requests.div_ceil(rounds);
        let time = Duration::from_secs_f64(phase.duration_s / f64::from(self.scenario.rounds));
        (count, time)
    }

    /// The targets of every round, in the order of even rounds (odd rounds reverse it).
    fn order(&self) -> Vec<Which> {
        let mut order = Vec::new();
        if self.scenario.compare {
            if self.direct.is_some() {
                order.push(Which::Direct);
            }
            if self.proxy.is_some() {
                order.push(Which::Proxy);
            }
        }
        order.push(Which::Gateway);
        order
    }

    pub async fn run(&self, run_start: Instant) -> Result<Vec<PhaseRun>, String> {
        let total: u64 = self
            .scenario
            .phases
            .iter()
            .map(|p| {
                self.per_round(p).0 * u64::from(self.scenario.rounds) * self.order().len() as u64
            })
            .sum();
        let progress = if self.progress {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40.cyan/blue}] {pos}/{len} {per_sec} {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        } else {
            ProgressBar::hidden()
        };
        let mut out = Vec::new();
        for phase in &self.scenario.phases {
            out.push(self.run_phase(phase, run_start, &progress).await?);
        }
        progress.finish_and_clear();
        Ok(out)
    }

    async fn run_phase(
        &self,
        phase: &Phase,
        run_start: Instant,
        progress: &ProgressBar,
    ) -> Result<PhaseRun, String> {
        let gateway_bodies: Arc<Vec<Bytes>> = Arc::new(self.gateway_bodies());
        let direct_bodies = Arc::new(vec![self
            .scenario
            .body(&self.scenario.request.direct_model)]);
        let mut gateway = Side::new(self.gateway_pids.clone());
        let mut direct = Side::new(Vec::new());
        let mut proxy = Side::new(self.proxy_pids.clone());
        let mut mock_tokens: Option<u64> = None;
        let mut db: Option<DbCost> = None;
        let order = self.order();
        for round in 0..self.scenario.rounds {
            // ABBA: direct first on even rounds, gateway first on odd ones.
            let mut order = order.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for which in order {
                let (target, bodies, side) = match which {
                    Which::Direct => (self.direct.clone(), direct_bodies.clone(), &mut direct),
                    Which::Proxy => (self.proxy.clone(), direct_bodies.clone(), &mut proxy),
                    Which::Gateway => (
                        Some(self.gateway.clone()),
                        gateway_bodies.clone(),
                        &mut gateway,
                    ),
                };
                let Some(target) = target else { continue };
                let is_gateway = which == Which::Gateway;
                progress.set_message(format!(
                    "{} round {}/{} {}",
                    phase.name,
                    round + 1,
                    self.scenario.rounds,
                    target.label
                ));
                if !self.progress {
                    eprintln!(
                        "[{:7.1}s] {} round {}/{}: {}",
                        run_start.elapsed().as_secs_f64(),
                        phase.name,
                        round + 1,
                        self.scenario.rounds,
                        target.label
                    );
                }
                let base = self.scenario.mock.merged(&phase.mock);
                for (_, url) in &self.mocks {
                    admin::set_mock_options(&self.client, url, &base).await?;
                }
                let mut events = self.schedule_events(phase);
                let before_tokens = if is_gateway {
                    self.mock_token_total().await
                } else {
                    None
                };
                let pids = side.pids.clone();
                let proc_before = if pids.is_empty() {
                    None
                } else {
                    Some(procstat::sample_all(&pids)?)
                };
                let in_flight = Arc::new(AtomicU64::new(0));
                let sampler = proc_before.map(|_| {
                    let (stop, stopped) = oneshot::channel();
                    let task = tokio::spawn(sample_rss(pids.clone(), in_flight.clone(), stopped));
                    (stop, task)
                });
                let began = Instant::now();
                let warmup = Duration::from_secs_f64(phase.warmup_s.max(0.0));
                let recorder = side.recorder.clone();
                let load = Arc::new(Load {
                    client: self.client.clone(),
                    target,
                    bodies,
                    timeout: Duration::from_secs_f64(self.scenario.request_timeout_s),
                    run_start,
                    recorder: recorder.clone(),
                    in_flight,
                    progress: progress.clone(),
                    warm_until: began + warmup,
                    warm_count: self.per_round(phase).0 / 10,
                    measured_from: Mutex::new(None),
                    finished: AtomicU64::new(0),
                });
                // The database's steady state: from the end of the warm-up to the end of the load.
                let db_start = match (&self.pg_url, is_gateway) {
                    (Some(url), true) => Some(tokio::spawn(db_sample_at(
                        url.clone(),
                        began + warmup,
                        load.clone(),
                    ))),
                    _ => None,
                };
                let (count, time) = self.per_round(phase);
                match phase.mode {
                    Mode::Closed => {
                        let ramp = Duration::from_secs_f64(phase.ramp_up_s.max(0.0));
                        closed_loop(load.clone(), phase.concurrency, ramp, count, time).await
                    }
                    Mode::Open => {
                        open_loop(load.clone(), phase.rate, phase.max_in_flight, count, time).await
                    }
                }
                let measured_from = *load
                    .measured_from
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if let Some(from) = measured_from {
                    lock(&recorder).active += from.elapsed();
                }
                events.abort_all();
                if let (Some(task), Some(url)) = (db_start, &self.pg_url) {
                    let (before, done_before) =
                        task.await.map_err(|e| format!("database sampler: {e}"))??;
                    let (after, done_after) = db_sample(url.clone(), &load).await?;
                    db.get_or_insert_with(DbCost::default).add(
                        before,
                        after,
                        done_after.saturating_sub(done_before),
                    );
                }
                if let Some(before) = proc_before {
                    let after = procstat::sample_all(&pids)?;
                    let (peak_rss, peak_open) = match sampler {
                        Some((stop, task)) => {
                            let _ = stop.send(());
                            task.await.unwrap_or((after.rss_kib, 0))
                        }
                        None => (after.rss_kib, 0),
                    };
                    side.ticks += after.cpu_ticks.saturating_sub(before.cpu_ticks);
                    let c = side.cost.get_or_insert_with(|| Cost {
                        idle_rss_kib: before.rss_kib,
                        ..Cost::default()
                    });
                    c.peak_rss_kib = c.peak_rss_kib.max(peak_rss).max(after.rss_kib);
                    c.peak_open = c.peak_open.max(peak_open);
                    c.hwm_kib = after.hwm_kib;
                }
                if let (Some(b), Some(a)) = (before_tokens, self.mock_token_total().await) {
                    *mock_tokens.get_or_insert(0) += a.saturating_sub(b);
                }
            }
        }
        let (gateway, cost) = gateway.finish();
        let (direct_rec, _) = direct.finish();
        let (proxy_rec, proxy_cost) = proxy.finish();
        let compare = self.scenario.compare;
        Ok(PhaseRun {
            phase: phase.clone(),
            direct: (compare && self.direct.is_some()).then_some(direct_rec),
            gateway,
            cost,
            proxy: (compare && self.proxy.is_some()).then_some(proxy_rec),
            proxy_cost,
            mock_tokens,
            db,
        })
    }

    fn gateway_bodies(&self) -> Vec<Bytes> {
        let total: u64 = self
            .scenario
            .request
            .models
            .iter()
            .map(|m| u64::from(m.weight))
            .sum();
        let mut cache: HashMap<&str, Bytes> = HashMap::new();
        (0..total.max(1))
            .map(|i| {
                let model = self.scenario.model_for(i);
                cache
                    .entry(model)
                    .or_insert_with(|| self.scenario.body(model))
                    .clone()
            })
            .collect()
    }

    /// Starts the phase's mock events; the caller aborts what has not fired at round end.
    fn schedule_events(&self, phase: &Phase) -> JoinSet<()> {
        let mut set = JoinSet::new();
        for event in &phase.events {
            let urls: Vec<String> = self
                .mocks
                .iter()
                .filter(|(name, _)| event.mock.is_empty() || *name == event.mock)
                .map(|(_, url)| url.clone())
                .collect();
            if urls.is_empty() {
                eprintln!(
                    "warning: event at {}s names mock {:?}, which no --mock gives",
                    event.at_s, event.mock
                );
            }
            let client = self.client.clone();
            let options = event.options.clone();
            let at = Duration::from_secs_f64(event.at_s.max(0.0));
            set.spawn(async move {
                tokio::time::sleep(at).await;
                for url in urls {
                    if let Err(e) = admin::set_mock_options(&client, &url, &options).await {
                        eprintln!("warning: mock event failed: {e}");
                    }
                }
            });
        }
        set
    }

    async fn mock_token_total(&self) -> Option<u64> {
        if self.mocks.is_empty() {
            return None;
        }
        let mut sum = 0;
        for (_, url) in &self.mocks {
            sum += admin::mock_tokens(&self.client, url).await.ok()?;
        }
        Some(sum)
    }
}

fn take(r: &Mutex<Recorder>) -> Recorder {
    std::mem::take(&mut *lock(r))
}

/// The three targets of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Direct,
    Proxy,
    Gateway,
}

/// One target's measurements over a phase: its recorder and, with processes to read, its cost.
struct Side {
    recorder: Arc<Mutex<Recorder>>,
    pids: Vec<u32>,
    ticks: u64,
    cost: Option<Cost>,
}

impl Side {
    fn new(pids: Vec<u32>) -> Side {
        Side {
            recorder: Arc::new(Mutex::new(Recorder::default())),
            pids,
            ticks: 0,
            cost: None,
        }
    }

    fn finish(self) -> (Recorder, Option<Cost>) {
        let recorder = take(&self.recorder);
        let mut cost = self.cost;
        if let Some(c) = cost.as_mut() {
            finish_cost(c, self.ticks, &recorder);
        }
        (recorder, cost)
    }
}

fn finish_cost(c: &mut Cost, ticks: u64, gateway: &Recorder) {
    c.cpu_s = ProcSample {
        cpu_ticks: ticks,
        ..ProcSample::default()
    }
    .cpu()
    .as_secs_f64();
    c.requests = gateway.totals.requests;
    c.tokens = gateway.totals.tokens;
    if c.requests > 0 {
        c.cpu_s_per_1k_requests = c.cpu_s * 1000.0 / c.requests as f64;
        c.cpu_us_per_request = c.cpu_s * 1e6 / c.requests as f64;
    }
    if c.tokens > 0 {
        c.cpu_s_per_1k_tokens = c.cpu_s * 1000.0 / c.tokens as f64;
        c.cpu_us_per_token = c.cpu_s * 1e6 / c.tokens as f64;
    }
    if c.peak_open > 0 {
        c.rss_kib_per_open =
            c.peak_rss_kib.saturating_sub(c.idle_rss_kib) as f64 / c.peak_open as f64;
    }
}

/// The database's counters and the requests finished so far, read together.
async fn db_sample(url: String, load: &Load) -> Result<(DbSample, u64), String> {
    let done = load.finished.load(Ordering::Relaxed);
    let sample = tokio::task::spawn_blocking(move || dbstat::sample(&url))
        .await
        .map_err(|e| format!("database sampler: {e}"))??;
    Ok((sample, done))
}

/// [`db_sample`] at `at` (the end of the warm-up).
async fn db_sample_at(
    url: String,
    at: Instant,
    load: Arc<Load>,
) -> Result<(DbSample, u64), String> {
    tokio::time::sleep_until(at.into()).await;
    db_sample(url, &load).await
}

/// Samples RSS (summed over `pids`) and requests in flight until `stop` fires (or its sender is
/// dropped); returns (peak RSS KiB, most requests in flight).
async fn sample_rss(
    pids: Vec<u32>,
    in_flight: Arc<AtomicU64>,
    mut stop: oneshot::Receiver<()>,
) -> (u64, u64) {
    let mut peak_rss = 0;
    let mut peak_open = 0;
    let mut tick = tokio::time::interval(RSS_SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = &mut stop => return (peak_rss, peak_open),
            _ = tick.tick() => {
                peak_open = peak_open.max(in_flight.load(Ordering::Relaxed));
                if let Ok(s) = procstat::sample_all(&pids) {
                    peak_rss = peak_rss.max(s.rss_kib);
                }
            }
        }
    }
}

/// `concurrency` workers (started evenly over `ramp`), each sending one request after another,
/// until `count` requests have started or `time` has passed.
async fn closed_loop(
    load: Arc<Load>,
    concurrency: u32,
    ramp: Duration,
    count: u64,
    time: Duration,
) {
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let deadline = t0 + time;
    let mut workers = JoinSet::new();
    let n = concurrency.min(u32::try_from(count).unwrap_or(u32::MAX));
    for w in 0..n {
        let load = load.clone();
        let next = next.clone();
        let first = t0 + ramp.mul_f64(f64::from(w) / f64::from(n));
        workers.spawn(async move {
            tokio::time::sleep_until(first.into()).await;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || Instant::now() >= deadline {
                    break;
                }
                load.one(i, Instant::now()).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

/// Starts request `i` at `t0 + i / rate`, whatever the earlier ones do; latency counts from that
/// scheduled time, so a stalled target cannot hide its stall (no coordinated omission). Beyond
/// `max_in_flight`, starts are dropped and recorded as `overload`.
async fn open_loop(load: Arc<Load>, rate: f64, max_in_flight: u32, count: u64, time: Duration) {
    let t0 = Instant::now();
    let deadline = t0 + time;
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let at = t0 + Duration::from_secs_f64(i as f64 / rate);
        if at >= deadline {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        while tasks.try_join_next().is_some() {}
        if load.in_flight.load(Ordering::Relaxed) >= u64::from(max_in_flight) {
            let outcome = Outcome {
                started_s: at.saturating_duration_since(load.run_start).as_secs_f64(),
                error: Some("overload".into()),
                warmup: at < load.warm_until && i < load.warm_count,
                ..Outcome::default()
            };
            lock(&load.recorder).record(&outcome);
            load.progress.inc(1);
            continue;
        }
        let load = load.clone();
        tasks.spawn(async move { load.one(i, at).await });
    }
    while tasks.join_next().await.is_some() {}
}
