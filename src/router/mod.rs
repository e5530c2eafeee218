//! The request pipeline after authentication and input checks: plan the routes, and for each
//! one reserve → attempt → retry or fall back, until a route serves the request (DESIGN §3).
//! Every way out — served, passed-through 4xx, all failed, all skipped — writes exactly one
//! ledger record: through the hold's settlement when a hold served, directly otherwise.

pub mod budget;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderName;
use actix_web::HttpResponse;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{HeaderMap, Method, StatusCode};
use rand::Rng;
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use crate::api::error::ApiError;
use crate::app::AppState;
use crate::config::{Endpoint, Model, Route};
use crate::keys::ApiKey;
use crate::ledger::{Attempt, LedgerRecord, Status, StoreOp};
use crate::metering::chunk::UpstreamBody;
use crate::metering::meter::{add_cost, cost, Meter};
use crate::metering::stream::{
    account, fill_record, tollgate_object, EarlyFailure, MeteredStream, StreamParts,
};
use crate::route::Admission;
use crate::wallet::WalletError;
use upstream::{is_retriable_status, read_body, retry_after, SendError, Upstreams};

/// One client request, validated and authenticated.
pub struct Call {
    pub request_id: String,
    pub key: Arc<ApiKey>,
    pub project: String,
    pub end_user: Option<String>,
    pub endpoint: Endpoint,
    pub model: Arc<Model>,
    pub stream: bool,
    pub include_usage: bool,
    pub n: u64,
    pub max_tokens: Option<u64>,
    pub input_tokens: u64,
    pub body: Map<String, Value>,
    pub mock_headers: HeaderMap,
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
            endpoint: match self.endpoint {
                Endpoint::Chat => "chat.completions".into(),
                Endpoint::Embeddings => "embeddings".into(),
            },
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

/// How one sent attempt failed.
struct Failure {
    outcome: String,
    http_status: Option<u16>,
    error: String,
    retriable: bool,
    /// Counts against the breaker (R17).
    breaker: bool,
    timeout: bool,
    retry_after: Option<Duration>,
    /// A non-retriable upstream 4xx to pass through (status, body).
    passthrough: Option<(StatusCode, Bytes)>,
}

enum Served {
    Response(HttpResponse),
    Failed(Failure),
}

pub async fn serve(
    state: &AppState,
    ups: &Upstreams,
    call: &Call,
) -> Result<HttpResponse, ApiError> {
    let key = call.key.clone();
    let model = call.model.clone();
    let routes = plan(&model.routes);
    let Some(home) = routes
        .iter()
        .find(|r| key.may_spend(&r.bucket))
        .map(|r| r.bucket.clone())
    else {
        let err = ApiError::new(
            403,
            "permission_error",
            "model_not_allowed",
            format!(
                "this key may not spend any bucket that model '{}' is served from",
                model.name
            ),
        );
        return Err(reject(state, call, call.draft(), err));
    };
    let mut rec = call.draft();
    let mut skipped: Vec<String> = Vec::new();
    let mut insufficient: Vec<String> = Vec::new();
    let mut sent_attempts = 0u32;
    let mut all_timeouts = true;
    let mut prev_failed_route: Option<(String, String)> = None;
    let mut budget_denied = false;
    state.budget.first_attempt();

    'routes: for route in &routes {
        let Some(bucket) = state.config.buckets.get(&route.bucket) else {
            continue;
        };
        let skip = |rec: &mut LedgerRecord,
                    skipped: &mut Vec<String>,
                    outcome: &str,
                    why: String| {
            metrics::counter!(crate::metrics::UPSTREAM_ATTEMPTS, "route" => route.id.clone(), "outcome" => outcome.to_string()).increment(1);
            rec.attempts.push(Attempt {
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
            skipped.push(format!("{} ({outcome}: {why})", route.id));
        };
        if !key.may_spend(&route.bucket) {
            skip(
                &mut rec,
                &mut skipped,
                "bucket_not_allowed",
                format!("key may not spend bucket {}", route.bucket),
            );
            continue;
        }
        if route.bucket != home && !key.record.allow_cross_bucket_fallback {
            skip(
                &mut rec,
                &mut skipped,
                "cross_bucket_denied",
                format!("bucket {} differs from home bucket {home} and the key does not allow cross-bucket fallback", route.bucket),
            );
            continue;
        }
        let in_cost = cost(call.input_tokens, route.input_per_mtok);
        let one_token = cost(call.n, route.output_per_mtok);
        let bound = if call.stream {
            call.max_tokens
                .unwrap_or(u64::MAX)
                .min(state.config.settlement.initial_output_hold_tokens)
        } else {
            call.max_tokens
                .unwrap_or(state.config.settlement.default_max_tokens)
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
        let upstream = ups.get(&route.provider);
        let Some(upstream) = upstream else {
            continue;
        };
        let mut retry = 0u32;
        loop {
            let trial = match state.routes.admit(&route.id) {
                Admission::Open => {
                    skip(
                        &mut rec,
                        &mut skipped,
                        "circuit_open",
                        "circuit breaker open".into(),
                    );
                    continue 'routes;
                }
                Admission::Go { trial } => trial,
            };
            if sent_attempts > 0 && !state.budget.try_extra() {
                state.routes.release_trial(&route.id, trial);
                metrics::counter!(crate::metrics::RETRY_BUDGET_EXHAUSTED).increment(1);
                skip(
                    &mut rec,
                    &mut skipped,
                    "retry_budget_exhausted",
                    "gateway retry budget exhausted".into(),
                );
                budget_denied = true;
                break 'routes;
            }
            let mut draft = rec.clone();
            set_route(&mut draft, route, &bucket.currency, bucket.kind.as_str());
            let hold = match state
                .wallets
                .reserve(&key.record.id, &route.bucket, min, want, &draft)
                .await
            {
                Ok(h) => h,
                Err(WalletError::InsufficientBalance { available, .. }) => {
                    state.routes.release_trial(&route.id, trial);
                    let why = format!(
                        "bucket {} has {} {} available, {} needed",
                        route.bucket,
                        available.normalize(),
                        bucket.currency,
                        min.normalize()
                    );
                    insufficient.push(why.clone());
                    skip(&mut rec, &mut skipped, "insufficient_balance", why);
                    continue 'routes;
                }
                Err(WalletError::Unavailable(e) | WalletError::Invalid(e)) => {
                    state.routes.release_trial(&route.id, trial);
                    let err = ApiError::new(
                        503,
                        "service_unavailable",
                        "wallet_unavailable",
                        format!("the wallet is unavailable: {e}"),
                    );
                    return Err(reject(state, call, rec, err));
                }
            };
            if let Some((from, reason)) = prev_failed_route.take() {
                if from != route.id {
                    metrics::counter!(crate::metrics::FALLBACKS, "model" => model.name.clone(), "from_route" => from, "to_route" => route.id.clone(), "reason" => reason).increment(1);
                }
            }
            if retry > 0 {
                rec.retries += 1;
            }
            sent_attempts += 1;
            let started_at = Utc::now();
            let t0 = Instant::now();
            let mut reporter = state.routes.reporter(&route.id, trial, t0);
            let served = attempt(
                state,
                call,
                route,
                upstream,
                hold,
                in_cost,
                draft,
                &rec,
                retry,
                &mut reporter,
            )
            .await;
            let latency = t0.elapsed();
            match served {
                Served::Response(resp) => {
                    // A stream took the reporter: it reports when it ends.
                    if let Some(r) = reporter.take() {
                        r.finish(None);
                    }
                    return Ok(resp);
                }
                Served::Failed(f) => {
                    state.routes.report(
                        &route.id,
                        false,
                        f.breaker,
                        latency,
                        Some(f.error.clone()),
                        trial,
                    );
                    metrics::counter!(crate::metrics::UPSTREAM_ATTEMPTS, "route" => route.id.clone(), "outcome" => f.outcome.clone()).increment(1);
                    rec.attempts.push(Attempt {
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
                        all_timeouts = false;
                    }
                    if let Some((status, body)) = f.passthrough.clone() {
                        set_route(&mut rec, route, &bucket.currency, bucket.kind.as_str());
                        rec.fallbacks = fallbacks(&rec.attempts, Some(&route.id));
                        let err = passthrough_error(state, status, &body);
                        return Err(record_error(state, call, rec, err, Status::UpstreamError));
                    }
                    let outcome = f.outcome.clone();
                    let retry_after = f.retry_after;
                    let retriable = f.retriable;
                    if retriable && retry < model.retry.max_retries {
                        let max = Duration::from_millis(model.retry.backoff_max_ms);
                        let delay = match retry_after {
                            Some(d) if d > max => {
                                // Told to wait longer than we may: fall back instead (R16).
                                prev_failed_route = Some((route.id.clone(), outcome));
                                continue 'routes;
                            }
                            Some(d) => d,
                            None => backoff(
                                model.retry.backoff_base_ms,
                                model.retry.backoff_max_ms,
                                retry,
                            ),
                        };
                        metrics::counter!(crate::metrics::RETRIES, "model" => model.name.clone(), "route" => route.id.clone(), "reason" => outcome).increment(1);
                        tokio::time::sleep(delay).await;
                        retry += 1;
                        continue;
                    }
                    prev_failed_route = Some((route.id.clone(), outcome));
                    continue 'routes;
                }
            }
        }
    }

    // Nothing served.
    // No serving route: every route that was tried but the last one was fallen back from.
    rec.fallbacks = fallbacks(&rec.attempts, None).saturating_sub(1);
    let err = if sent_attempts == 0 {
        if !insufficient.is_empty() {
            ApiError::new(
                402,
                "insufficient_quota",
                "insufficient_balance",
                format!(
                    "no route of model '{}' can be paid for: {}",
                    model.name,
                    insufficient.join("; ")
                ),
            )
        } else {
            ApiError::new(
                503,
                "service_unavailable",
                "no_available_route",
                format!(
                    "no route of model '{}' is available: {}",
                    model.name,
                    skipped.join("; ")
                ),
            )
        }
    } else {
        let detail = describe_failures(&rec.attempts);
        let budget = if budget_denied {
            "; the gateway retry budget is exhausted"
        } else {
            ""
        };
        if all_timeouts {
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
    Err(reject(state, call, rec, err))
}

fn describe_failures(attempts: &[Attempt]) -> String {
    attempts
        .iter()
        .map(|a| {
            format!(
                "{} retry {}: {}{}",
                a.route,
                a.retry,
                a.outcome,
                a.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
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

fn passthrough_error(state: &AppState, status: StatusCode, body: &Bytes) -> ApiError {
    let text = state.redact(&String::from_utf8_lossy(body));
    let parsed: Option<Value> = serde_json::from_str(&text).ok();
    let mut err = ApiError::new(
        status.as_u16(),
        "invalid_request_error",
        "upstream_error",
        String::new(),
    );
    match parsed.as_ref().and_then(|v| v.get("error")) {
        Some(Value::Object(e)) => {
            err.message = e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("upstream error")
                .to_string();
            if let Some(t) = e.get("type").and_then(Value::as_str) {
                err.kind = leak_kind(t);
            }
            if let Some(c) = e.get("code").and_then(Value::as_str) {
                err.code = c.to_string();
            }
            err.param = e.get("param").and_then(Value::as_str).map(str::to_string);
        }
        _ => {
            err.message = format!(
                "upstream answered {}: {}",
                status.as_u16(),
                text.chars().take(500).collect::<String>()
            );
        }
    }
    err
}

/// Error types are a small fixed set; keep known ones, map the rest.
fn leak_kind(t: &str) -> &'static str {
    match t {
        "invalid_request_error" => "invalid_request_error",
        "authentication_error" => "authentication_error",
        "permission_error" => "permission_error",
        "not_found_error" => "not_found_error",
        "rate_limit_error" => "rate_limit_error",
        _ => "upstream_error",
    }
}

fn fail(
    outcome: &str,
    status: Option<u16>,
    error: String,
    retriable: bool,
    timeout: bool,
) -> Failure {
    Failure {
        outcome: outcome.to_string(),
        http_status: status,
        error,
        retriable,
        breaker: retriable,
        timeout,
        retry_after: None,
        passthrough: None,
    }
}

fn send_failure(e: SendError) -> Failure {
    match e {
        SendError::Connect(m) => fail("connect_error", None, m, true, false),
        SendError::Timeout(ms) => fail(
            "timeout",
            None,
            format!("no response within {ms} ms"),
            true,
            true,
        ),
        SendError::Request(m) => fail("stream_error", None, m, true, false),
    }
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    state: &AppState,
    call: &Call,
    route: &Route,
    upstream: &upstream::UpstreamProvider,
    mut hold: crate::wallet::Hold,
    in_cost: Decimal,
    mut draft: LedgerRecord,
    rec: &LedgerRecord,
    retry: u32,
    reporter: &mut Option<crate::route::AttemptReporter>,
) -> Served {
    let provider = &upstream.provider;
    // The input is paid for up front.
    hold.try_draw(in_cost, 0);
    // R8: a non-stream answer cannot be cut part-way, so the upstream is told to stop at what
    // the hold pays for when that is less than the client's own bound (or it set none).
    let max_tokens = if call.stream || call.endpoint != Endpoint::Chat {
        None
    } else {
        let bound = call
            .max_tokens
            .unwrap_or(state.config.settlement.default_max_tokens);
        let paid = paid_output_tokens(
            hold.granted(),
            in_cost,
            call.n,
            route.output_per_mtok,
            bound,
        );
        (call.max_tokens.is_none() || paid < bound).then_some(paid)
    };
    let bytes = upstream_body(&call.body, &route.upstream_model, call.stream, max_tokens);
    let path = match call.endpoint {
        Endpoint::Chat => "/chat/completions",
        Endpoint::Embeddings => "/embeddings",
    };
    let first_deadline = tokio::time::Instant::now()
        + Duration::from_millis(if call.stream {
            provider.first_token_timeout_ms
        } else {
            provider
                .first_token_timeout_ms
                .max(provider.idle_timeout_ms)
        });
    // First sent attempt only: a later one's elapsed time includes upstream waits and backoff.
    if !rec.attempts.iter().any(|a| is_sent(&a.outcome)) {
        let overhead = call.started.elapsed().as_secs_f64();
        crate::metrics::hot(|m| m.overhead.record(overhead));
    }
    let resp = match upstream
        .send(
            Method::POST,
            path,
            bytes,
            &call.mock_headers,
            first_deadline,
        )
        .await
    {
        Ok(r) => r,
        Err(e) => return Served::Failed(send_failure(e)),
    };
    let status = resp.status();
    let idle = Duration::from_millis(provider.idle_timeout_ms);
    if !status.is_success() {
        let ra = retry_after(resp.headers());
        let body = read_body(resp.into_body(), 1 << 20, idle)
            .await
            .unwrap_or_default();
        let code = status.as_u16();
        if code == 401 || code == 403 {
            // The provider refusing our credentials (R17): a route failure for the breaker, not
            // retried here (the key will not change), fallen back from, and never passed
            // through (the client's own key was fine; the body may quote ours).
            let mut f = fail(
                &format!("http_{code}"),
                Some(code),
                format!("the provider refused the gateway's credentials (HTTP {code})"),
                false,
                false,
            );
            f.breaker = true;
            return Served::Failed(f);
        }
        let mut f = fail(
            &format!("http_{code}"),
            Some(code),
            format!("upstream answered {code}"),
            is_retriable_status(status),
            false,
        );
        f.retry_after = ra;
        f.breaker = code >= 500 || code == 408 || code == 429;
        if status.is_client_error() && !is_retriable_status(status) {
            f.passthrough = Some((status, body));
        }
        return Served::Failed(f);
    }
    draft.attempts = rec.attempts.clone();
    draft.retries = rec.retries;
    draft.fallbacks = fallbacks(&rec.attempts, Some(&route.id));
    let mut ok_attempt = Attempt {
        route: route.id.clone(),
        upstream_model: route.upstream_model.clone(),
        bucket: route.bucket.clone(),
        retry,
        outcome: "ok".into(),
        http_status: Some(status.as_u16()),
        error: None,
        started_at: Utc::now(),
        latency_ms: 0,
    };
    let tokenizer = state.tokenizer(&call.model.name);
    let settlement = &state.config.settlement;
    if call.stream {
        let limit = call
            .n
            .saturating_mul(call.max_tokens.unwrap_or(u64::MAX / 4));
        let meter = Meter::new(
            hold,
            route.output_per_mtok,
            settlement.initial_output_hold_tokens,
            settlement.max_output_hold_tokens,
            limit,
        );
        ok_attempt.latency_ms = call.started.elapsed().as_millis() as u64;
        draft.attempts.push(ok_attempt);
        let headers = success_headers(&draft);
        let mut ms = MeteredStream::new(StreamParts {
            body: resp.into_body(),
            meter,
            tokenizer,
            idle,
            include_usage: call.include_usage,
            record: draft,
            started: call.started,
            max_event_bytes: 16 << 20,
            reporter: reporter.take(),
            limiter: call.limiter.clone(),
            shutdown: Some(state.shutdown.subscribe()),
        });
        match ms.first_token(first_deadline).await {
            Ok(first) => {
                ms.start_delivery();
                let mut r = HttpResponse::Ok();
                r.content_type("text/event-stream")
                    .insert_header(("cache-control", "no-cache"));
                for (k, v) in headers {
                    r.insert_header((k, v));
                }
                // R26: chunks hold whole events, so a key echoed upstream is caught whole.
                let redact = state.redactor();
                let first = redact.bytes(first);
                // Boxed: `unfold` keeps both its state and the in-flight future inline, and the
                // future owns the state while it runs, so an unboxed stream would be held twice.
                let rest = futures_util::stream::unfold(
                    (Box::new(ms), redact),
                    |(mut ms, r)| async move {
                        let b = ms.next_chunk().await?;
                        Some((Ok::<Bytes, std::convert::Infallible>(r.bytes(b)), (ms, r)))
                    },
                );
                let first = futures_util::stream::once(async move {
                    Ok::<Bytes, std::convert::Infallible>(first)
                });
                use futures_util::StreamExt;
                Served::Response(r.streaming(first.chain(rest)))
            }
            Err(e) => {
                ms.abandon();
                Served::Failed(match e {
                    EarlyFailure::Timeout => fail(
                        "timeout",
                        None,
                        format!(
                            "no first token within {} ms",
                            provider.first_token_timeout_ms
                        ),
                        true,
                        true,
                    ),
                    EarlyFailure::Broken(m) => fail("stream_error", None, m, true, false),
                    EarlyFailure::Malformed(m) => fail("stream_error", None, m, true, false),
                    EarlyFailure::Unpaid => fail(
                        "insufficient_balance",
                        None,
                        "the hold cannot pay the first token".into(),
                        false,
                        false,
                    ),
                })
            }
        }
    } else {
        let body = match read_body(resp.into_body(), 64 << 20, idle).await {
            Ok(b) => state.redactor().bytes(b),
            Err(e) => return Served::Failed(send_failure(e)),
        };
        let Some(parsed) = UpstreamBody::parse(&body) else {
            return Served::Failed(fail(
                "stream_error",
                None,
                "upstream body is not a JSON object".into(),
                true,
                false,
            ));
        };
        let (usage, counted_out) = match call.endpoint {
            Endpoint::Chat => {
                let (texts, usage) = parsed.completion_output();
                (usage, tokenizer.completion_output_tokens(&texts))
            }
            Endpoint::Embeddings => (parsed.embeddings_usage(), 0),
        };
        let replace_tollgate = parsed.has_tollgate();
        ok_attempt.latency_ms = call.started.elapsed().as_millis() as u64;
        draft.attempts.push(ok_attempt);
        let charge = fill_record(
            &mut draft,
            counted_out,
            Status::Completed,
            usage,
            Some(Instant::now()),
            call.started,
        );
        let headers = success_headers(&draft);
        let out = hold
            .settle_sealed(charge, draft, |rec| {
                account(rec, None, call.limiter.as_deref());
                with_tollgate(&body, replace_tollgate, tollgate_object(rec))
            })
            .await;
        let mut r = HttpResponse::Ok();
        for (k, v) in headers {
            r.insert_header((k, v));
        }
        Served::Response(r.content_type("application/json").body(out))
    }
}

/// The upstream's JSON object `body` with the `tollgate` object added as its last member. The
/// upstream's bytes are kept as they came and the member is appended, instead of writing the
/// whole document again; a body with a `tollgate` member of its own (`replace`) gets it replaced.
fn with_tollgate(body: &[u8], replace: bool, tollgate: impl serde::Serialize) -> Bytes {
    if replace {
        // Rare: written again. (A body the one-pass reader took but `Value` refuses, e.g. a
        // number beyond f64, keeps both members below rather than losing its content.)
        if let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(body) {
            m.insert(
                "tollgate".into(),
                serde_json::to_value(&tollgate).unwrap_or_default(),
            );
            return Bytes::from(serde_json::to_vec(&m).unwrap_or_default());
        }
    }
    let Some(end) = body
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .filter(|&end| body[end] == b'}')
    else {
        // Not an object (the caller parsed one, so this does not happen): left as it came.
        return Bytes::copy_from_slice(body);
    };
    // The object is empty when the byte before its closing brace is its opening one.
    let empty = body[..end].iter().rev().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let mut out = Vec::with_capacity(end + 512);
    out.extend_from_slice(&body[..end]);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(b"\"tollgate\":");
    // Writing a `Serialize` of strings and integers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &tollgate);
    out.push(b'}');
    Bytes::from(out)
}

/// The output tokens per choice that a hold of `granted` pays for once the input (`in_cost`) is
/// paid, with `n` choices at `per_mtok` (R8): at least 1 (a grant always covers the input and
/// one token), at most `bound`; `bound` itself when output is free.
fn paid_output_tokens(
    granted: Decimal,
    in_cost: Decimal,
    n: u64,
    per_mtok: Decimal,
    bound: u64,
) -> u64 {
    use rust_decimal::prelude::ToPrimitive;
    let million = Decimal::from(1_000_000u32);
    let price = |tokens: u64| {
        Decimal::from(tokens)
            .checked_mul(per_mtok)
            .and_then(|c| c.checked_div(million))
    };
    let Some(step) = price(n).filter(|p| *p > Decimal::ZERO) else {
        return bound;
    };
    let budget = granted - in_cost;
    let mut tokens = budget
        .checked_div(step)
        .and_then(|q| q.floor().to_u64())
        .unwrap_or(bound)
        .clamp(1, bound.max(1));
    // The quotient is rounded to 28 digits: never name a token the hold cannot pay for.
    while tokens > 1 && price(tokens.saturating_mul(n)).is_none_or(|c| c > budget) {
        tokens -= 1;
    }
    tokens
}

/// The upstream request body: the client's object with `model` set to the route's upstream
/// model, for a stream `stream_options.include_usage` on (billing prefers the upstream's usage,
/// R6), and, when `max_tokens` is given, that bound in the max-tokens fields the client sent
/// (kept if lower) or else in `max_tokens` (R8). Written straight from the parsed request,
/// without copying the messages.
fn upstream_body(
    fields: &Map<String, Value>,
    upstream_model: &str,
    stream: bool,
    max_tokens: Option<u64>,
) -> Bytes {
    use serde::ser::{Serialize, SerializeMap, Serializer};

    struct Body<'a> {
        fields: &'a Map<String, Value>,
        model: &'a str,
        stream: bool,
        max_tokens: Option<u64>,
    }
    /// `stream_options` with `include_usage: true`; a value that is not an object stays as sent
    /// (the input checks reject one before it gets here).
    struct WithUsage<'a>(Option<&'a Value>);

    impl Serialize for Body<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let add_model = !self.fields.contains_key("model");
            let add_options = self.stream && !self.fields.contains_key("stream_options");
            let add_max = self.max_tokens.is_some()
                && !self.fields.contains_key("max_tokens")
                && !self.fields.contains_key("max_completion_tokens");
            let len = self.fields.len()
                + usize::from(add_model)
                + usize::from(add_options)
                + usize::from(add_max);
            let mut m = s.serialize_map(Some(len))?;
            for (k, v) in self.fields {
                match (k.as_str(), self.max_tokens) {
                    ("model", _) => m.serialize_entry(k, self.model)?,
                    ("stream_options", _) if self.stream => {
                        m.serialize_entry(k, &WithUsage(Some(v)))?
                    }
                    ("max_tokens" | "max_completion_tokens", Some(max)) => {
                        m.serialize_entry(k, &v.as_u64().map_or(max, |own| own.min(max)))?
                    }
                    _ => m.serialize_entry(k, v)?,
                }
            }
            if add_model {
                m.serialize_entry("model", self.model)?;
            }
            if add_options {
                m.serialize_entry("stream_options", &WithUsage(None))?;
            }
            if let (true, Some(max)) = (add_max, self.max_tokens) {
                m.serialize_entry("max_tokens", &max)?;
            }
            m.end()
        }
    }

    impl Serialize for WithUsage<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let fields = match self.0 {
                Some(Value::Object(m)) => Some(m),
                Some(other) => return other.serialize(s),
                None => None,
            };
            let has = fields.is_some_and(|m| m.contains_key("include_usage"));
            let len = fields.map_or(0, Map::len) + usize::from(!has);
            let mut m = s.serialize_map(Some(len))?;
            for (k, v) in fields.into_iter().flatten() {
                if k == "include_usage" {
                    m.serialize_entry(k, &true)?;
                } else {
                    m.serialize_entry(k, v)?;
                }
            }
            if !has {
                m.serialize_entry("include_usage", &true)?;
            }
            m.end()
        }
    }

    let body = Body {
        fields,
        model: upstream_model,
        stream,
        max_tokens,
    };
    // Serialising a map of JSON values with string keys cannot fail.
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
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

fn success_headers(rec: &LedgerRecord) -> [(HeaderName, String); 6] {
    // Names made from static strings: parsing a name that is not a standard one copies it.
    let name = HeaderName::from_static;
    [
        (name("x-tollgate-request-id"), rec.request_id.clone()),
        (
            name("x-tollgate-route"),
            rec.route.clone().unwrap_or_default(),
        ),
        (
            name("x-tollgate-upstream-model"),
            rec.upstream_model.clone().unwrap_or_default(),
        ),
        (
            name("x-tollgate-bucket"),
            rec.bucket.clone().unwrap_or_default(),
        ),
        (name("x-tollgate-fallbacks"), rec.fallbacks.to_string()),
        (name("x-tollgate-retries"), rec.retries.to_string()),
    ]
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_tollgate_object_is_appended_to_the_upstream_document() {
        let tg = serde_json::json!({"cost": "0.25", "route": "m/up"});
        for body in [
            &b"{\"id\":\"x\",\"choices\":[{\"index\":0}],\"usage\":null}\n"[..],
            b"  {}  ",
            b"{\"id\":\"x\",\"tollgate\":{\"from\":\"upstream\"}}",
        ] {
            let parsed = UpstreamBody::parse(body).expect("test body parses");
            let mut want: Value = serde_json::from_slice(body).expect("test body parses");
            want["tollgate"] = tg.clone();
            let out = with_tollgate(body, parsed.has_tollgate(), tg.clone());
            let got: Value = serde_json::from_slice(&out).expect("output is JSON");
            assert_eq!(got, want, "{}", String::from_utf8_lossy(body));
        }
        // The upstream's member order and spelling are kept.
        let out = with_tollgate(b"{\"z\": 1, \"a\": 2}", false, Value::Null);
        assert_eq!(&out[..], &b"{\"z\": 1, \"a\": 2,\"tollgate\":null}"[..]);
        // A body the one-pass reader takes but `Value` refuses keeps its bytes.
        let odd = br#"{"n":1e400,"tollgate":1}"#;
        let parsed = UpstreamBody::parse(odd).expect("read in one pass");
        assert!(parsed.has_tollgate());
        let out = with_tollgate(odd, true, Value::Null);
        assert_eq!(
            &out[..],
            &br#"{"n":1e400,"tollgate":1,"tollgate":null}"#[..]
        );
    }

    #[test]
    fn upstream_body_sets_the_model_and_asks_for_usage_on_streams() {
        let parse = |b: Bytes| serde_json::from_slice::<Value>(&b).expect("valid JSON");
        let client = serde_json::json!({
            "model": "public-name",
            "messages": [{"role": "user", "content": "h\u{e9}llo \"q\""}],
            "temperature": 0.5,
            "stream": true,
            "stream_options": {"include_usage": false, "other": 1},
        });
        let Value::Object(fields) = client.clone() else {
            unreachable!()
        };
        let mut want = client.clone();
        want["model"] = "up-model".into();
        want["stream_options"]["include_usage"] = true.into();
        assert_eq!(parse(upstream_body(&fields, "up-model", true, None)), want);

        // Without stream_options, a stream gets one; a non-stream is left as sent.
        let mut plain = fields.clone();
        plain.remove("stream_options");
        let mut want = Value::Object(plain.clone());
        want["model"] = "up-model".into();
        assert_eq!(parse(upstream_body(&plain, "up-model", false, None)), want);
        want["stream_options"] = serde_json::json!({"include_usage": true});
        assert_eq!(parse(upstream_body(&plain, "up-model", true, None)), want);
        assert_eq!(
            parse(upstream_body(&fields, "up-model", false, None))["stream_options"],
            serde_json::json!({"include_usage": false, "other": 1})
        );
    }

    #[test]
    fn upstream_body_carries_the_held_bound_in_the_clients_field() {
        let parse = |b: Bytes| serde_json::from_slice::<Value>(&b).expect("valid JSON");
        let fields = |v: Value| match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let plain = fields(serde_json::json!({"model": "m", "messages": []}));
        assert_eq!(
            parse(upstream_body(&plain, "u", false, Some(7)))["max_tokens"],
            7
        );
        let own = fields(serde_json::json!({"model": "m", "max_completion_tokens": 500}));
        let out = parse(upstream_body(&own, "u", false, Some(7)));
        assert_eq!(out["max_completion_tokens"], 7);
        assert!(out.get("max_tokens").is_none(), "{out}");
        // Both sent: each is lowered to the bound, never raised.
        let both = fields(serde_json::json!({"max_completion_tokens": 500, "max_tokens": 3}));
        let out = parse(upstream_body(&both, "u", false, Some(7)));
        assert_eq!(
            (&out["max_completion_tokens"], &out["max_tokens"]),
            (&7.into(), &3.into())
        );
    }

    #[test]
    fn paid_output_tokens_floor_what_the_hold_pays_per_choice() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        // 10e-6 left after the input at 2/M: 5 tokens for one choice, 2 each for two.
        assert_eq!(
            paid_output_tokens(d("0.000012"), d("0.000002"), 1, d("2"), 4096),
            5
        );
        assert_eq!(
            paid_output_tokens(d("0.000012"), d("0.000002"), 2, d("2"), 4096),
            2
        );
        // At least one, at most the bound; free output: the bound.
        assert_eq!(
            paid_output_tokens(d("0.000003"), d("0.000002"), 1, d("2"), 4096),
            1
        );
        assert_eq!(paid_output_tokens(d("1"), d("0"), 1, d("2"), 300), 300);
        assert_eq!(
            paid_output_tokens(d("0.000002"), d("0.000002"), 1, d("0"), 300),
            300
        );
        // A price whose quotient does not terminate: the named tokens stay within the hold.
        let t = paid_output_tokens(d("1"), d("0"), 3, d("0.7"), u64::MAX);
        assert!(cost(t * 3, d("0.7")) <= d("1"), "{t}");
        assert!(cost((t + 1) * 3, d("0.7")) > d("1"), "{t}");
    }

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
