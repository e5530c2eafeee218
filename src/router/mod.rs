//! The request path after the client API's checks, in named phases; read it top-down:
//!
//! 1. **plan** — order the model's routes by priority and weight, find the home bucket
//!    ([`Run::plan`]);
//! 2. **for each route** ([`Run::try_route`]):
//!    - **check** — may the key spend the route's bucket, or cross into it ([`Run::check`]);
//!    - **admit** — the breaker lets an attempt through; an attempt after the first spends from
//!      the retry budget ([`Run::admit`]);
//!    - **reserve** — the wallet holds input + initial output in the route's bucket
//!      ([`Run::reserve`]);
//!    - **attempt** — prepare, send, respond (`attempt.rs`): a stream is metered to the client
//!      from its first paid token, a complete answer is settled and returned;
//!    - **retry or fall back** — after a failure, the same route again after a backoff, or the
//!      next route ([`Run::after_failure`]);
//! 3. **nothing served** — the error that says why, with the request's one record
//!    ([`Run::nothing_served`]).
//!
//! Settlement happens in one place per ending: a served request's hold settles in the metered
//! stream (`metering/stream.rs`) or in [`attempt`]'s complete answer, together with its ledger
//! record; every other way out writes its record here ([`reject`], [`record_error`]). See
//! docs/rules.md for the R-numbered rules cited below.

pub mod budget;
pub mod upstream;

mod attempt;
mod body;
mod failure;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::HttpResponse;
use chrono::{DateTime, Utc};
use http::HeaderMap;
use rand::Rng;
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use crate::api::error::ApiError;
use crate::app::AppState;
use crate::config::{Bucket, Endpoint, Model, Route};
use crate::keys::ApiKey;
use crate::ledger::{Attempt, LedgerRecord, Status, StoreOp};
use crate::metering::meter::{add_cost, cost};
use crate::route::Admission;
use crate::wallet::{Hold, WalletError};
use attempt::{Attempting, Served};
use failure::{describe_failures, passthrough_error, Failure};
use upstream::Upstreams;

/// One client request, validated and authenticated.
pub struct Call {
    pub request_id: String,
    pub key: Arc<ApiKey>,
    pub project: String,
    pub end_user: Option<String>,
    /// The caller's workflow run (`X-Tollgate-Task`), checked.
    pub task: Option<String>,
    pub endpoint: Endpoint,
    pub model: Arc<Model>,
    pub stream: bool,
    pub include_usage: bool,
    pub n: u64,
    pub max_tokens: Option<u64>,
    pub input_tokens: u64,
    pub body: Map<String, Value>,
    /// Client headers for the upstream: `x-mock-*` (sent to built-in mocks only) and, on
    /// `/v1/messages`, `anthropic-version` and `anthropic-beta`.
    pub forward_headers: HeaderMap,
    pub started_at: DateTime<Utc>,
    pub started: Instant,
    /// The request's share of its key's tokens-per-minute window when the key has a `tpm`: the
    /// input estimate, replaced by the billed tokens at settlement (R39).
    pub limiter: Option<Arc<crate::limits::KeyLimiter>>,
}

impl Call {
    /// A record with the attribution fields set and nothing billed.
    pub fn draft(&self) -> LedgerRecord {
        LedgerRecord {
            workspace: self.key.record.workspace.clone(),
            key_id: self.key.record.id.clone(),
            key_name: self.key.record.name.clone(),
            project: self.project.clone(),
            end_user: self.end_user.clone(),
            task: self.task.clone(),
            endpoint: self.endpoint.ledger_name().into(),
            requested_model: self.model.name.clone(),
            stream: self.stream,
            input_tokens: self.input_tokens,
            ..LedgerRecord::empty(self.request_id.clone(), self.started_at)
        }
    }
}

/// Writes the record of a request refused or failed without a serving hold, and returns the
/// error with the request id.
pub fn reject(state: &AppState, call: &Call, rec: LedgerRecord, err: ApiError) -> ApiError {
    let status = match err.status.as_u16() {
        502 | 504 => Status::UpstreamError,
        _ => Status::Rejected,
    };
    record_error(state, call, rec, err, status)
}

/// Writes the record of a request that ended in `err` with ledger `status` (R15).
pub fn record_error(
    state: &AppState,
    call: &Call,
    mut rec: LedgerRecord,
    err: ApiError,
    status: Status,
) -> ApiError {
    rec.finished_at = Utc::now();
    rec.duration_ms = call.started.elapsed().as_millis() as u64;
    rec.http_status = err.status.as_u16();
    rec.status = status;
    crate::metrics::observe_request(&rec, None);
    // No hold served this request, so its record carries no money (cost 0): when the writer is
    // far behind it is dropped (and counted) rather than blocking this worker, so a flood of
    // refusals or upstream failures cannot stall the gateway.
    state.writer.try_send(StoreOp::Record(Box::new(rec)));
    err.with_request_id(&call.request_id)
}

/// Orders routes by priority; among equal priorities a weighted random pick goes first and the
/// rest follow by weight (R12).
pub fn plan(routes: &[Arc<Route>]) -> Vec<Arc<Route>> {
    // One route (the usual model) has one order: no draw to make.
    if let [only] = routes {
        return vec![only.clone()];
    }
    let mut out = Vec::with_capacity(routes.len());
    let mut i = 0;
    let mut rng = rand::thread_rng();
    while i < routes.len() {
        let p = routes[i].priority;
        let mut group: Vec<Arc<Route>> = routes[i..]
            .iter()
            .take_while(|r| r.priority == p)
            .cloned()
            .collect();
        i += group.len();
        while !group.is_empty() {
            let total: u64 = group.iter().map(|r| u64::from(r.weight)).sum();
            let mut pick = rng.gen_range(0..total.max(1));
            let mut idx = 0;
            for (j, r) in group.iter().enumerate() {
                if pick < u64::from(r.weight) {
                    idx = j;
                    break;
                }
                pick -= u64::from(r.weight);
            }
            out.push(group.remove(idx));
        }
    }
    out
}

/// Serves one request: the phases above, until a route serves it or none can.
pub async fn serve(
    state: &AppState,
    ups: &Upstreams,
    call: &Call,
) -> Result<HttpResponse, ApiError> {
    let (mut run, routes) = Run::plan(state, ups, call)?;
    for route in &routes {
        match run.try_route(route).await {
            Step::Served(resp) => return Ok(resp),
            Step::Stop(err) => return Err(err),
            Step::Next => {}
            Step::BudgetSpent => break,
        }
    }
    Err(run.nothing_served())
}

/// How a route ended for the request.
enum Step {
    /// It served: the response goes to the client.
    Served(HttpResponse),
    /// The request ends here with this error, its record written (a passed-through upstream
    /// 4xx, or a wallet that cannot answer).
    Stop(ApiError),
    /// On to the next route.
    Next,
    /// The retry budget refused another attempt: no more routes.
    BudgetSpent,
}

/// A hold's bounds on one route (R4, R8): the least that pays for the input and one output
/// token per choice, and what the request would like held.
struct HoldBounds {
    in_cost: Decimal,
    min: Decimal,
    want: Decimal,
}

/// One request on its way through its routes: the working ledger record (every attempt and skip
/// so far) and what the final error needs to say if no route serves.
struct Run<'a> {
    state: &'a AppState,
    ups: &'a Upstreams,
    call: &'a Call,
    /// The working record, made when first needed ([`Run::rec`]): a request its first attempt
    /// serves never needs one, its draft is made straight from the call.
    rec: Option<LedgerRecord>,
    /// The bucket of the first route the key may spend (R13).
    home: String,
    /// "route (outcome: why)" of each skipped route.
    skipped: Vec<String>,
    /// Why each bucket that was asked could not pay (a 402 says it).
    insufficient: Vec<String>,
    sent_attempts: u32,
    all_timeouts: bool,
    /// The last route that failed and its outcome, for the fallback metric.
    prev_failed: Option<(String, String)>,
    budget_denied: bool,
}

impl<'a> Run<'a> {
    /// Plan: the routes in the order they are tried, and the home bucket. A key that may spend
    /// none of the model's buckets is refused here (403, R14).
    fn plan(
        state: &'a AppState,
        ups: &'a Upstreams,
        call: &'a Call,
    ) -> Result<(Run<'a>, Vec<Arc<Route>>), ApiError> {
        let routes = plan(&call.model.routes);
        let Some(home) = routes
            .iter()
            .find(|r| call.key.may_spend(&r.bucket))
            .map(|r| r.bucket.clone())
        else {
            let err = ApiError::new(
                403,
                "permission_error",
                "model_not_allowed",
                format!(
                    "this key may not spend any bucket that model '{}' is served from",
                    call.model.name
                ),
            );
            return Err(reject(state, call, call.draft(), err));
        };
        state.budget.first_attempt();
        let run = Run {
            state,
            ups,
            call,
            rec: None,
            home,
            skipped: Vec::new(),
            insufficient: Vec::new(),
            sent_attempts: 0,
            all_timeouts: true,
            prev_failed: None,
            budget_denied: false,
        };
        Ok((run, routes))
    }

    /// One route: check, then attempts (admit → reserve → attempt) until it serves, the request
    /// must end, or routing moves on.
    async fn try_route(&mut self, route: &Route) -> Step {
        let Some(bucket) = self.state.config.buckets.get(&route.bucket) else {
            return Step::Next;
        };
        if let Err((outcome, why)) = self.check(route) {
            self.skip(route, outcome, why);
            return Step::Next;
        }
        let bounds = self.hold_bounds(route);
        let Some(upstream) = self.ups.get(&route.provider) else {
            return Step::Next;
        };
        let mut retry = 0u32;
        loop {
            let trial = match self.admit(route) {
                Ok(trial) => trial,
                Err(step) => return step,
            };
            let mut draft = match &self.rec {
                Some(rec) => rec.clone(),
                None => self.call.draft(),
            };
            set_route(&mut draft, route, &bucket.currency, bucket.kind.as_str());
            let hold = match self.reserve(route, bucket, &bounds, &draft, trial).await {
                Ok(hold) => hold,
                Err(step) => return step,
            };
            self.count_sent(route, retry);
            let started_at = Utc::now();
            let t0 = Instant::now();
            let mut reporter = self.state.routes.reporter(&route.id, trial, t0);
            let on = Attempting {
                state: self.state,
                call: self.call,
                route,
                upstream,
                in_cost: bounds.in_cost,
                retry,
            };
            let served = attempt::attempt(on, hold, draft, self.rec.as_ref(), &mut reporter).await;
            let latency = t0.elapsed();
            let f = match served {
                Served::Response(resp) => {
                    // A stream took the reporter: it reports when it ends.
                    if let Some(r) = reporter.take() {
                        r.finish(None);
                    }
                    return Step::Served(resp);
                }
                Served::Failed(f) => f,
            };
            self.record_failure(route, trial, retry, &f, started_at, latency);
            if let Some((status, body)) = &f.passthrough {
                // A non-retriable upstream 4xx goes back to the client (R14, R26).
                let mut rec = self.rec().clone();
                set_route(&mut rec, route, &bucket.currency, bucket.kind.as_str());
                rec.fallbacks = fallbacks(&rec.attempts, Some(&route.id));
                let err = passthrough_error(self.state, *status, body, self.call.endpoint);
                return Step::Stop(record_error(
                    self.state,
                    self.call,
                    rec,
                    err,
                    Status::UpstreamError,
                ));
            }
            match self.after_failure(route, &f, retry) {
                Some(delay) => {
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
                None => return Step::Next,
            }
        }
    }

    /// The working record: the call's draft with every attempt and skip so far.
    fn rec(&mut self) -> &mut LedgerRecord {
        let call = self.call;
        self.rec.get_or_insert_with(|| call.draft())
    }

    /// Check: may this key use this route at all (its bucket, and crossing from the home
    /// bucket, R13)? Otherwise the skip's outcome and reason.
    fn check(&self, route: &Route) -> Result<(), (&'static str, String)> {
        let key = &self.call.key;
        if !key.may_spend(&route.bucket) {
            return Err((
                "bucket_not_allowed",
                format!("key may not spend bucket {}", route.bucket),
            ));
        }
        if route.bucket != self.home && !key.record.allow_cross_bucket_fallback {
            return Err((
                "cross_bucket_denied",
                format!(
                    "bucket {} differs from home bucket {} and the key does not allow cross-bucket fallback",
                    route.bucket, self.home
                ),
            ));
        }
        Ok(())
    }

    /// The hold's bounds on this route: a stream holds its first output tokens (it extends as
    /// it goes, R4), a complete answer its whole bound (R8); embeddings have no output.
    fn hold_bounds(&self, route: &Route) -> HoldBounds {
        let (call, settlement) = (self.call, &self.state.config.settlement);
        let in_cost = cost(call.input_tokens, route.input_per_mtok);
        let one_token = cost(call.n, route.output_per_mtok);
        let bound = if call.stream {
            call.max_tokens
                .unwrap_or(u64::MAX)
                .min(settlement.initial_output_hold_tokens)
        } else {
            call.max_tokens.unwrap_or(settlement.default_max_tokens)
        };
        let want = add_cost(
            in_cost,
            cost(call.n.saturating_mul(bound), route.output_per_mtok),
        );
        let min = if call.endpoint == Endpoint::Embeddings {
            in_cost
        } else {
            add_cost(in_cost, one_token)
        };
        HoldBounds { in_cost, min, want }
    }

    /// Admit: the route's breaker lets an attempt through (a half-open breaker one trial), and
    /// any attempt after the request's first spends from the retry budget (R18).
    fn admit(&mut self, route: &Route) -> Result<bool, Step> {
        let trial = match self.state.routes.admit(&route.id) {
            Admission::Open => {
                self.skip(route, "circuit_open", "circuit breaker open".into());
                return Err(Step::Next);
            }
            Admission::Go { trial } => trial,
        };
        if self.sent_attempts > 0 && !self.state.budget.try_extra() {
            self.state.routes.release_trial(&route.id, trial);
            metrics::counter!(crate::metrics::RETRY_BUDGET_EXHAUSTED).increment(1);
            self.skip(
                route,
                "retry_budget_exhausted",
                "gateway retry budget exhausted".into(),
            );
            self.budget_denied = true;
            return Err(Step::BudgetSpent);
        }
        Ok(trial)
    }

    /// Reserve: a hold in the route's bucket between the bounds (R4). A bucket that cannot pay
    /// skips the route; a wallet that cannot answer ends the request (503).
    async fn reserve(
        &mut self,
        route: &Route,
        bucket: &Bucket,
        bounds: &HoldBounds,
        draft: &LedgerRecord,
        trial: bool,
    ) -> Result<Hold, Step> {
        let key_id = &self.call.key.record.id;
        let reserved = self
            .state
            .wallets
            .reserve(key_id, &route.bucket, bounds.min, bounds.want, draft)
            .await;
        match reserved {
            Ok(h) => Ok(h),
            Err(WalletError::InsufficientBalance { available, .. }) => {
                self.state.routes.release_trial(&route.id, trial);
                let why = format!(
                    "bucket {} has {} {} available, {} needed",
                    route.bucket,
                    available.normalize(),
                    bucket.currency,
                    bounds.min.normalize()
                );
                self.insufficient.push(why.clone());
                self.skip(route, "insufficient_balance", why);
                Err(Step::Next)
            }
            Err(WalletError::Unavailable(e) | WalletError::Invalid(e)) => {
                self.state.routes.release_trial(&route.id, trial);
                let err = ApiError::new(
                    503,
                    "service_unavailable",
                    "wallet_unavailable",
                    format!("the wallet is unavailable: {e}"),
                );
                Err(Step::Stop(reject(
                    self.state,
                    self.call,
                    self.rec().clone(),
                    err,
                )))
            }
        }
    }

    /// An attempt is about to be sent: count the fallback that led here and the retry.
    fn count_sent(&mut self, route: &Route, retry: u32) {
        if let Some((from, reason)) = self.prev_failed.take() {
            if from != route.id {
                metrics::counter!(crate::metrics::FALLBACKS, "model" => self.call.model.name.clone(), "from_route" => from, "to_route" => route.id.clone(), "reason" => reason).increment(1);
            }
        }
        if retry > 0 {
            self.rec().retries += 1;
        }
        self.sent_attempts += 1;
    }

    /// A sent attempt failed: the route's health learns of it (R17), and the record gets it.
    fn record_failure(
        &mut self,
        route: &Route,
        trial: bool,
        retry: u32,
        f: &Failure,
        started_at: DateTime<Utc>,
        latency: Duration,
    ) {
        self.state.routes.report(
            &route.id,
            false,
            f.breaker,
            latency,
            Some(f.error.clone()),
            trial,
        );
        metrics::counter!(crate::metrics::UPSTREAM_ATTEMPTS, "route" => route.id.clone(), "outcome" => f.outcome.clone()).increment(1);
        self.rec().attempts.push(Attempt {
            route: route.id.clone(),
            upstream_model: route.upstream_model.clone(),
            bucket: route.bucket.clone(),
            retry,
            outcome: f.outcome.clone(),
            http_status: f.http_status,
            error: Some(f.error.clone()),
            started_at,
            latency_ms: latency.as_millis() as u64,
        });
        if !f.timeout {
            self.all_timeouts = false;
        }
    }

    /// Retry or fall back: how long to wait before retrying the same route, or `None` to move
    /// on. Retriable failures retry up to `max_retries` with exponential backoff and full
    /// jitter; a `Retry-After` is honoured up to `backoff_max_ms`, and a longer one moves on at
    /// once (R16).
    fn after_failure(&mut self, route: &Route, f: &Failure, retry: u32) -> Option<Duration> {
        let policy = &self.call.model.retry;
        if f.retriable && retry < policy.max_retries {
            let max = Duration::from_millis(policy.backoff_max_ms);
            let delay = match f.retry_after {
                Some(d) if d > max => None,
                Some(d) => Some(d),
                None => Some(backoff(
                    policy.backoff_base_ms,
                    policy.backoff_max_ms,
                    retry,
                )),
            };
            if let Some(delay) = delay {
                metrics::counter!(crate::metrics::RETRIES, "model" => self.call.model.name.clone(), "route" => route.id.clone(), "reason" => f.outcome.clone()).increment(1);
                return Some(delay);
            }
        }
        self.prev_failed = Some((route.id.clone(), f.outcome.clone()));
        None
    }

    /// Skips a route without sending: counted, and recorded as an attempt with its reason.
    fn skip(&mut self, route: &Route, outcome: &str, why: String) {
        metrics::counter!(crate::metrics::UPSTREAM_ATTEMPTS, "route" => route.id.clone(), "outcome" => outcome.to_string()).increment(1);
        self.rec().attempts.push(Attempt {
            route: route.id.clone(),
            upstream_model: route.upstream_model.clone(),
            bucket: route.bucket.clone(),
            retry: 0,
            outcome: outcome.to_string(),
            http_status: None,
            error: Some(why.clone()),
            started_at: Utc::now(),
            latency_ms: 0,
        });
        self.skipped
            .push(format!("{} ({outcome}: {why})", route.id));
    }

    /// Nothing served: 402 when a bucket could not pay and nothing was sent, 503 when every
    /// route was skipped, else 504 when every sent attempt timed out, else 502 (R14); with the
    /// request's record.
    fn nothing_served(mut self) -> ApiError {
        let model = &self.call.model.name;
        let mut rec = self.rec.take().unwrap_or_else(|| self.call.draft());
        // Every route that was tried but the last one was fallen back from.
        rec.fallbacks = fallbacks(&rec.attempts, None).saturating_sub(1);
        let err = if self.sent_attempts == 0 {
            if !self.insufficient.is_empty() {
                ApiError::new(
                    402,
                    "insufficient_quota",
                    "insufficient_balance",
                    format!(
                        "no route of model '{model}' can be paid for: {}",
                        self.insufficient.join("; ")
                    ),
                )
            } else {
                ApiError::new(
                    503,
                    "service_unavailable",
                    "no_available_route",
                    format!(
                        "no route of model '{model}' is available: {}",
                        self.skipped.join("; ")
                    ),
                )
            }
        } else {
            let detail = describe_failures(&rec.attempts);
            let budget = if self.budget_denied {
                "; the gateway retry budget is exhausted"
            } else {
                ""
            };
            if self.all_timeouts {
                ApiError::new(
                    504,
                    "upstream_error",
                    "upstream_timeout",
                    format!("every attempt timed out: {detail}{budget}"),
                )
            } else {
                ApiError::new(
                    502,
                    "upstream_error",
                    "upstream_error",
                    format!("every attempt failed: {detail}{budget}"),
                )
            }
        };
        reject(self.state, self.call, rec, err)
    }
}

fn set_route(rec: &mut LedgerRecord, route: &Route, currency: &str, kind: &str) {
    rec.route = Some(route.id.clone());
    rec.provider = Some(route.provider.clone());
    rec.upstream_model = Some(route.upstream_model.clone());
    rec.route_kind = Some(kind.to_string());
    rec.bucket = Some(route.bucket.clone());
    rec.currency = Some(currency.to_string());
    rec.input_per_mtok = Some(route.input_per_mtok);
    rec.output_per_mtok = Some(route.output_per_mtok);
}

/// Exponential backoff with full jitter.
fn backoff(base_ms: u64, max_ms: u64, retry: u32) -> Duration {
    let cap = base_ms.saturating_mul(1u64 << retry.min(20)).min(max_ms);
    Duration::from_millis(rand::thread_rng().gen_range(0..=cap))
}

/// R20: routes with a sent attempt other than `serving` (skipped routes do not count).
fn fallbacks(attempts: &[Attempt], serving: Option<&str>) -> u32 {
    attempts
        .iter()
        .filter(|a| Some(a.route.as_str()) != serving && is_sent(&a.outcome))
        .map(|a| a.route.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u32
}

fn is_sent(outcome: &str) -> bool {
    !matches!(
        outcome,
        "circuit_open"
            | "bucket_not_allowed"
            | "insufficient_balance"
            | "cross_bucket_denied"
            | "retry_budget_exhausted"
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_has_full_jitter_within_the_exponential_cap() {
        for retry in 0..8u32 {
            let cap = (50u64 << retry).min(2000);
            let samples: Vec<u64> = (0..200)
                .map(|_| backoff(50, 2000, retry).as_millis() as u64)
                .collect();
            assert!(
                samples.iter().all(|&d| d <= cap),
                "retry {retry}: {samples:?}"
            );
            // Full jitter: spread over the whole range, not pinned to the cap.
            assert!(samples.iter().any(|&d| d < cap / 2), "retry {retry}");
        }
    }

    #[test]
    fn plan_orders_by_priority_and_keeps_every_route() {
        let r = |id: &str, priority: i64, weight: u32, position: usize| {
            Arc::new(Route {
                id: id.into(),
                model: "m".into(),
                provider: "p".into(),
                upstream_model: "u".into(),
                bucket: "b".into(),
                input_per_mtok: Decimal::ONE,
                output_per_mtok: Decimal::ONE,
                cache_read_per_mtok: Decimal::ONE,
                cache_write_per_mtok: Decimal::ONE,
                priority,
                weight,
                position,
            })
        };
        let routes = vec![r("a", 0, 1, 0), r("b", 0, 3, 1), r("c", 1, 1, 2)];
        let mut first_b = 0;
        for _ in 0..400 {
            let p = plan(&routes);
            let ids: Vec<&str> = p.iter().map(|x| x.id.as_str()).collect();
            assert_eq!(ids.len(), 3);
            assert_eq!(ids[2], "c");
            if ids[0] == "b" {
                first_b += 1;
            }
        }
        // Weight 3 of 4: b goes first about 300 times in 400.
        assert!((240..=360).contains(&first_b), "{first_b}");
    }
}
