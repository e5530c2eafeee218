//! Every metric tollgate exports, named and described in one place (docs/metrics.md). Labels are
//! bounded: model, route, bucket, currency, status, outcome and reason values come from the
//! configuration or from fixed enums, never from a key, user or request (a model the
//! configuration does not name counts as `unknown`, R41).

use std::collections::BTreeSet;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "tollgate_requests_total";
pub const UPSTREAM_ATTEMPTS: &str = "tollgate_upstream_attempts_total";
pub const RETRIES: &str = "tollgate_retries_total";
pub const FALLBACKS: &str = "tollgate_fallbacks_total";
pub const TOKENS: &str = "tollgate_tokens_total";
pub const SPEND: &str = "tollgate_spend_total";
pub const STREAM_CUTOFFS: &str = "tollgate_stream_cutoffs_total";
pub const SHORTFALL: &str = "tollgate_settlement_shortfall_total";
pub const RETRY_BUDGET_EXHAUSTED: &str = "tollgate_retry_budget_exhausted_total";
pub const CIRCUIT_TRANSITIONS: &str = "tollgate_circuit_transitions_total";
pub const PROBES: &str = "tollgate_probes_total";
pub const STREAMS_ACTIVE: &str = "tollgate_streams_active";
pub const CIRCUIT_STATE: &str = "tollgate_circuit_state";
pub const WALLET_HOLDS_ACTIVE: &str = "tollgate_wallet_holds_active";
pub const WALLET_ACTORS: &str = "tollgate_wallet_actors";
pub const REQUEST_DURATION: &str = "tollgate_request_duration_seconds";
pub const TTFT: &str = "tollgate_ttft_seconds";
pub const GATEWAY_OVERHEAD: &str = "tollgate_gateway_overhead_seconds";
pub const LEDGER_FLUSH_SECONDS: &str = "tollgate_ledger_flush_seconds";
pub const METERING_DRIFT: &str = "tollgate_metering_drift_tokens";
pub const LEDGER_QUEUE_FULL: &str = "tollgate_ledger_queue_full_total";

/// Ledger statuses (R38 `status`), for the zero series of `tollgate_requests_total`, in the order
/// of [`crate::ledger::Status`].
const STATUSES: [&str; 6] = [
    "completed",
    "balance_exhausted",
    "client_disconnected",
    "upstream_error",
    "rejected",
    "interrupted",
];
/// Failed-attempt outcomes that lead to a retry or a fallback, for zero series.
const RETRIABLE_OUTCOMES: [&str; 9] = [
    "connect_error",
    "timeout",
    "stream_error",
    "http_408",
    "http_429",
    "http_500",
    "http_502",
    "http_503",
    "http_504",
];
/// Attempt outcomes that are not upstream failures: success and the skips.
const OTHER_OUTCOMES: [&str; 6] = [
    "ok",
    "circuit_open",
    "insufficient_balance",
    "bucket_not_allowed",
    "cross_bucket_denied",
    "retry_budget_exhausted",
];
/// Metrics whose value is an amount of money. They are recorded as gauges (the `metrics` crate's
/// counters are integers) but only ever grow, so `/metrics` declares them as counters.
const MONEY_COUNTERS: [&str; 2] = [SPEND, SHORTFALL];

/// How often the histograms' pending samples are folded into their buckets when nobody scrapes
/// `/metrics` (a scrape does the same). Until then every sample is kept, 8+ bytes each.
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The label value under which requests for a model the configuration does not name are
/// counted (R41): a client's model string never becomes a label.
pub const UNKNOWN_MODEL: &str = "unknown";

/// The configured model names, the only `model` label values besides [`UNKNOWN_MODEL`].
static KNOWN_MODELS: parking_lot::RwLock<BTreeSet<String>> =
    parking_lot::RwLock::new(BTreeSet::new());

/// Installs the global recorder with explicit histogram buckets, describes every metric and
/// starts the recorder's upkeep. Returns the handle that renders `/metrics`. Safe to call more
/// than once per process (tests): later calls build a recorder that is not installed, whose
/// renders are empty.
pub fn install() -> PrometheusHandle {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(GATEWAY_OVERHEAD.into()),
            &[
                0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01,
                0.025, 0.05, 0.1,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(REQUEST_DURATION.into()),
                &[
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                    600.0,
                ],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(TTFT.into()),
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(LEDGER_FLUSH_SECONDS.into()),
                &[
                    0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(METERING_DRIFT.into()),
                &[-64.0, -16.0, -4.0, -1.0, 0.0, 1.0, 4.0, 16.0, 64.0],
            )
        });
    let builder = match builder {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "metric buckets rejected; using defaults");
            PrometheusBuilder::new()
        }
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_ok() {
        describe();
        start_upkeep(handle.clone());
    }
    handle
}

/// Runs the recorder's upkeep every [`UPKEEP_INTERVAL`] for the rest of the process, on a thread
/// of its own. `build_recorder` (unlike the exporter's own install) starts none, and without it
/// a histogram keeps every sample until `/metrics` is read. The recorder lives as long as the
/// process and holds nothing to flush, so the thread is not stopped.
fn start_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the metrics upkeep thread; histograms grow until scraped");
    }
}

/// The `model` label for a requested model name: the name when the configuration has it,
/// else [`UNKNOWN_MODEL`] (R41).
fn model_label(requested: &str) -> String {
    if KNOWN_MODELS.read().contains(requested) {
        requested.to_string()
    } else {
        UNKNOWN_MODEL.to_string()
    }
}

/// Renders `/metrics`: the recorder's text with the money metrics typed as counters (R38: the
/// value stays in currency units, which an integer counter could not carry).
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    for name in MONEY_COUNTERS {
        text = text.replace(
            &format!("# TYPE {name} gauge\n"),
            &format!("# TYPE {name} counter\n"),
        );
    }
    text
}

/// Creates, at zero, every series whose labels the configuration already knows (R38), so that
/// rates and alerts see 0 rather than nothing before the first request. Route actors do the same
/// for the circuit and probe series. Call once, after [`install`].
pub fn init_route_series(config: &crate::config::Config) {
    KNOWN_MODELS
        .write()
        .extend(config.models.iter().map(|m| m.name.clone()));
    for (model, route) in config.routes() {
        let m = model.name.clone();
        let r = route.id.clone();
        if let Some(bucket) = config.buckets.get(&route.bucket) {
            // The series a settled request moves; histograms render (empty) once registered.
            let s = RouteSeries::new(&m, &r, &route.bucket, &bucket.currency);
            for c in s.requests.iter().chain([&s.input_tokens, &s.output_tokens]) {
                c.increment(0);
            }
            s.spend.increment(0.0);
        }
        for outcome in OTHER_OUTCOMES.iter().chain(RETRIABLE_OUTCOMES.iter()) {
            metrics::counter!(UPSTREAM_ATTEMPTS, "route" => r.clone(), "outcome" => *outcome)
                .increment(0);
        }
        for reason in RETRIABLE_OUTCOMES {
            metrics::counter!(RETRIES, "model" => m.clone(), "route" => r.clone(), "reason" => reason).increment(0);
        }
        for to in model.routes.iter().filter(|t| t.id != route.id) {
            for reason in RETRIABLE_OUTCOMES {
                metrics::counter!(FALLBACKS, "model" => m.clone(), "from_route" => r.clone(), "to_route" => to.id.clone(), "reason" => reason).increment(0);
            }
        }
    }
    for model in &config.models {
        for status in ["rejected", "upstream_error"] {
            metrics::counter!(REQUESTS, "model" => model.name.clone(), "route" => "none", "bucket" => "none", "status" => status).increment(0);
        }
    }
    metrics::counter!(REQUESTS, "model" => UNKNOWN_MODEL, "route" => "none", "bucket" => "none", "status" => "rejected").increment(0);
    for (name, bucket) in &config.buckets {
        metrics::gauge!(SHORTFALL, "bucket" => name.clone(), "currency" => bucket.currency.clone())
            .increment(0.0);
    }
    for reason in [
        "balance_exhausted",
        "client_disconnected",
        "upstream_error",
        "shutdown",
    ] {
        metrics::counter!(STREAM_CUTOFFS, "reason" => reason).increment(0);
    }
    metrics::counter!(RETRY_BUDGET_EXHAUSTED).increment(0);
    metrics::counter!(LEDGER_QUEUE_FULL).increment(0);
    for gauge in [STREAMS_ACTIVE, WALLET_HOLDS_ACTIVE, WALLET_ACTORS] {
        metrics::gauge!(gauge).increment(0.0);
    }
    for histogram in [GATEWAY_OVERHEAD, LEDGER_FLUSH_SECONDS, METERING_DRIFT] {
        let _ = metrics::histogram!(histogram);
    }
}

fn describe() {
    describe_counter!(
        REQUESTS,
        "Requests by model, serving route, bucket and ledger status."
    );
    describe_counter!(
        UPSTREAM_ATTEMPTS,
        "Upstream attempts (sent or skipped) by route and outcome."
    );
    describe_counter!(
        RETRIES,
        "Retries on the same route, by the failed attempt's outcome."
    );
    describe_counter!(
        FALLBACKS,
        "Fallbacks from one route to the next, by the last outcome on from_route."
    );
    describe_counter!(
        TOKENS,
        "Billed tokens by model, route, bucket and direction."
    );
    describe_counter!(SPEND, "Amount debited, in the bucket's currency.");
    describe_counter!(
        STREAM_CUTOFFS,
        "Streams ended before the upstream finished, by reason."
    );
    describe_counter!(
        SHORTFALL,
        "Charges that could not be debited (operator loss), in the bucket's currency."
    );
    describe_counter!(
        RETRY_BUDGET_EXHAUSTED,
        "Retries or fallbacks refused by the gateway-wide retry budget."
    );
    describe_counter!(
        CIRCUIT_TRANSITIONS,
        "Circuit breaker transitions by route and target state."
    );
    describe_counter!(PROBES, "Active probes by route and result.");
    describe_gauge!(STREAMS_ACTIVE, "Client streams being forwarded now.");
    describe_gauge!(
        CIRCUIT_STATE,
        "Breaker state per route: 0 closed, 1 half-open, 2 open."
    );
    describe_gauge!(WALLET_HOLDS_ACTIVE, "Open wallet holds.");
    describe_gauge!(WALLET_ACTORS, "Wallet actors running.");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Request duration, from arrival to the last byte."
    );
    describe_histogram!(
        TTFT,
        Unit::Seconds,
        "Time to the first content token forwarded."
    );
    describe_histogram!(
        GATEWAY_OVERHEAD,
        Unit::Seconds,
        "Time the gateway itself adds: before the upstream request, and per forwarded chunk."
    );
    describe_histogram!(
        LEDGER_FLUSH_SECONDS,
        Unit::Seconds,
        "Time to commit one ledger batch (and fsync when due)."
    );
    describe_histogram!(
        METERING_DRIFT,
        "Gateway token count minus upstream usage, per completed stream."
    );
    describe_counter!(
        LEDGER_QUEUE_FULL,
        "Times the ledger writer queue was full (storage behind)."
    );
}

/// Counts a finished request: its status, billed tokens, spend, shortfall, latency and metering
/// drift. `delivered` is the gateway's own count of streamed output tokens, if any.
pub fn observe_request(rec: &crate::ledger::LedgerRecord, delivered: Option<u64>) {
    use rust_decimal::prelude::ToPrimitive;
    let model = rec.requested_model.as_str();
    let bucket = rec.bucket.as_deref().unwrap_or("none");
    let Some(route) = rec.route.as_deref() else {
        // No route served it: the model may be anything a client sent (R41).
        metrics::counter!(REQUESTS, "model" => model_label(model), "route" => "none", "bucket" => bucket.to_string(), "status" => rec.status.as_str()).increment(1);
        return;
    };
    let currency = rec.currency.as_deref().unwrap_or_default();
    let series = RouteSeries::get(model, route, bucket, currency);
    series.requests[rec.status as usize].increment(1);
    series.input_tokens.increment(rec.input_tokens);
    series.output_tokens.increment(rec.output_tokens);
    if !rec.cost.is_zero() {
        series.spend.increment(rec.cost.to_f64().unwrap_or(0.0));
    }
    if !rec.shortfall.is_zero() {
        metrics::gauge!(SHORTFALL, "bucket" => bucket.to_string(), "currency" => currency.to_string())
            .increment(rec.shortfall.to_f64().unwrap_or(0.0));
    }
    series.duration.record(
        // Sub-millisecond precision: the record's `duration_ms` rounds most fast requests to 0.
        (rec.finished_at - rec.started_at)
            .to_std()
            .map_or(rec.duration_ms as f64 / 1000.0, |d| d.as_secs_f64()),
    );
    if let Some(t) = rec.ttft_ms {
        series.ttft.record(t as f64 / 1000.0);
    }
    if let (Some(d), Some(u)) = (delivered, rec.upstream_usage) {
        metrics::histogram!(METERING_DRIFT).record(d as f64 - u.completion_tokens as f64);
    }
}

/// Handles of the unlabelled series moved on every request, made once per thread (a lookup in
/// the registry hashes the name and takes a lock).
pub struct Hot {
    pub holds_active: metrics::Gauge,
    pub streams_active: metrics::Gauge,
    pub overhead: metrics::Histogram,
}

impl Hot {
    fn new() -> Hot {
        Hot {
            holds_active: metrics::gauge!(WALLET_HOLDS_ACTIVE),
            streams_active: metrics::gauge!(STREAMS_ACTIVE),
            overhead: metrics::histogram!(GATEWAY_OVERHEAD),
        }
    }
}

thread_local! {
    static HOT: Hot = Hot::new();
}

/// Runs `f` with this thread's [`Hot`] handles (fresh ones for a value dropped while the
/// thread's locals are torn down).
pub fn hot<T>(f: impl Fn(&Hot) -> T) -> T {
    HOT.try_with(&f).unwrap_or_else(|_| f(&Hot::new()))
}

/// The handles of the labelled series a settled request on one route moves. Finding a labelled
/// series in the registry builds its label set and takes a lock, so each thread keeps the
/// handles of the routes it has settled, keyed by route id.
struct RouteSeries {
    labels: [String; 3],
    requests: [metrics::Counter; 6],
    input_tokens: metrics::Counter,
    output_tokens: metrics::Counter,
    spend: metrics::Gauge,
    duration: metrics::Histogram,
    ttft: metrics::Histogram,
}

thread_local! {
    static ROUTE_SERIES: std::cell::RefCell<std::collections::HashMap<String, std::rc::Rc<RouteSeries>>> =
        std::cell::RefCell::default();
}

impl RouteSeries {
    fn get(model: &str, route: &str, bucket: &str, currency: &str) -> std::rc::Rc<RouteSeries> {
        let fresh = || std::rc::Rc::new(RouteSeries::new(model, route, bucket, currency));
        let cached = ROUTE_SERIES.try_with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some(s) = cache.get(route) {
                if s.labels
                    .iter()
                    .map(String::as_str)
                    .eq([model, bucket, currency])
                {
                    return s.clone();
                }
            }
            let s = fresh();
            cache.insert(route.to_string(), s.clone());
            s
        });
        // A record settled while the thread's locals are torn down still counts.
        cached.unwrap_or_else(|_| fresh())
    }

    fn new(model: &str, route: &str, bucket: &str, currency: &str) -> RouteSeries {
        let (m, r, b, c) = (
            model.to_string(),
            route.to_string(),
            bucket.to_string(),
            currency.to_string(),
        );
        let tokens = |direction: &'static str| metrics::counter!(TOKENS, "model" => m.clone(), "route" => r.clone(), "bucket" => b.clone(), "direction" => direction);
        RouteSeries {
            requests: STATUSES.map(|status| {
                metrics::counter!(REQUESTS, "model" => m.clone(), "route" => r.clone(), "bucket" => b.clone(), "status" => status)
            }),
            input_tokens: tokens("input"),
            output_tokens: tokens("output"),
            spend: metrics::gauge!(SPEND, "bucket" => b.clone(), "currency" => c.clone(), "model" => m.clone(), "route" => r.clone()),
            duration: metrics::histogram!(REQUEST_DURATION, "model" => m.clone(), "route" => r.clone()),
            ttft: metrics::histogram!(TTFT, "model" => m.clone(), "route" => r),
            labels: [m, b, c],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Status;

    #[test]
    fn cached_request_series_are_indexed_by_status() {
        for status in [
            Status::Completed,
            Status::BalanceExhausted,
            Status::ClientDisconnected,
            Status::UpstreamError,
            Status::Rejected,
            Status::Interrupted,
        ] {
            assert_eq!(STATUSES[status as usize], status.as_str());
        }
    }
}
