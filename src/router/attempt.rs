//! One attempt on one route, in phases: pay the input from the hold and write the upstream
//! request ([`prepare`]) → send it and read its head ([`send`]) → respond: a stream is metered
//! to the client from its first paid token ([`respond_stream`]), a complete answer is read,
//! settled and returned with its `tollgate` object ([`respond_complete`]). A failure before
//! anything reached the client comes back as a [`Failure`] for the route loop to retry or fall
//! back from; the hold is then dropped, which releases it.

use std::time::{Duration, Instant};

use actix_web::http::header::HeaderName;
use actix_web::HttpResponse;
use bytes::Bytes;
use chrono::Utc;
use http::Method;
use hyper::body::Incoming;
use rust_decimal::Decimal;

use super::body::{paid_output_tokens, upstream_body, with_tollgate};
use super::failure::{self, fail, send_failure, Failure};
use super::upstream::{read_body, UpstreamProvider};
use super::{fallbacks, is_sent, Call};
use crate::app::AppState;
use crate::config::{Endpoint, Route};
use crate::ledger::{Attempt, LedgerRecord, Status};
use crate::metering::chunk::UpstreamBody;
use crate::metering::meter::{Meter, Prices};
use crate::metering::stream::{account, fill_record, tollgate_object, MeteredStream, StreamParts};
use crate::metering::wire::{complete_output, Wire};
use crate::route::AttemptReporter;
use crate::wallet::Hold;

/// How an attempt ended.
pub(super) enum Served {
    /// The response for the client (a stream from its first paid token, or a settled answer).
    Response(HttpResponse),
    /// Nothing reached the client: the route loop decides what next.
    Failed(Failure),
}

/// The request and the route an attempt is made on.
pub(super) struct Attempting<'a> {
    pub state: &'a AppState,
    pub call: &'a Call,
    pub route: &'a Route,
    pub upstream: &'a UpstreamProvider,
    /// The input's cost on this route, paid from the hold first.
    pub in_cost: Decimal,
    /// 0-based retry index on this route.
    pub retry: u32,
}

/// The upstream request, ready to send.
struct Prepared {
    body: Bytes,
    path: &'static str,
    /// When the first token (a stream) or the head (a complete answer) must have come (R8).
    first_deadline: tokio::time::Instant,
}

/// Makes one attempt with `hold` (input + initial output already granted). `draft` is the
/// record as this route would write it; `rec` the request's working record (earlier attempts),
/// none before the request's first attempt.
/// A stream takes `reporter` and reports its outcome to the route when it ends.
pub(super) async fn attempt(
    on: Attempting<'_>,
    mut hold: Hold,
    draft: LedgerRecord,
    rec: Option<&LedgerRecord>,
    reporter: &mut Option<AttemptReporter>,
) -> Served {
    let prepared = prepare(&on, &mut hold);
    let first_deadline = prepared.first_deadline;
    let resp = match send(&on, prepared, rec).await {
        Ok(r) => r,
        Err(f) => return Served::Failed(f),
    };
    let (draft, ok) = serving_record(&on, draft, rec, resp.status().as_u16());
    if on.call.stream {
        respond_stream(&on, hold, draft, ok, resp, first_deadline, reporter).await
    } else {
        respond_complete(&on, hold, draft, ok, resp).await
    }
}

/// Phase 1: pays the input from the hold (up front, whatever comes back) and writes the
/// upstream request. A complete answer cannot be cut part-way, so the upstream is told to stop
/// at what the hold pays for when that is less than the client's own bound, or it set none (R8).
fn prepare(on: &Attempting<'_>, hold: &mut Hold) -> Prepared {
    let (call, provider) = (on.call, &on.upstream.provider);
    hold.try_draw(on.in_cost, 0);
    // The input is spent once it goes upstream: a crash from here on bills it (R9).
    hold.publish_drawn();
    let max_tokens = if call.stream || call.endpoint == Endpoint::Embeddings {
        None
    } else {
        let bound = call
            .max_tokens
            .unwrap_or(on.state.config.settlement.default_max_tokens);
        let paid = paid_output_tokens(
            hold.granted(),
            on.in_cost,
            call.n,
            on.route.output_per_mtok,
            bound,
        );
        (call.max_tokens.is_none() || paid < bound).then_some(paid)
    };
    let body = upstream_body(
        &call.body,
        &on.route.upstream_model,
        call.stream,
        max_tokens,
        call.endpoint,
    );
    let path = call.endpoint.upstream_path();
    let first_deadline = tokio::time::Instant::now()
        + Duration::from_millis(if call.stream {
            provider.first_token_timeout_ms
        } else {
            provider
                .first_token_timeout_ms
                .max(provider.idle_timeout_ms)
        });
    Prepared {
        body,
        path,
        first_deadline,
    }
}

/// Phase 2: sends the request and reads the upstream's head; a head that is not a success is
/// read as a failure ([`failure::refused`]).
async fn send(
    on: &Attempting<'_>,
    prepared: Prepared,
    rec: Option<&LedgerRecord>,
) -> Result<http::Response<Incoming>, Failure> {
    let call = on.call;
    // First sent attempt only: a later one's elapsed time includes upstream waits and backoff.
    if !rec.is_some_and(|rec| rec.attempts.iter().any(|a| is_sent(&a.outcome))) {
        let overhead = call.started.elapsed().as_secs_f64();
        crate::metrics::hot(|m| m.overhead.record(overhead));
    }
    let resp = on
        .upstream
        .send(
            Method::POST,
            prepared.path,
            prepared.body,
            &call.forward_headers,
            prepared.first_deadline,
        )
        .await
        .map_err(send_failure)?;
    let status = resp.status();
    if !status.is_success() {
        return Err(failure::refused(status, resp, idle(on)).await);
    }
    Ok(resp)
}

fn idle(on: &Attempting<'_>) -> Duration {
    Duration::from_millis(on.upstream.provider.idle_timeout_ms)
}

/// The record as the serving route writes it (earlier attempts, retries and fallbacks so far),
/// and this attempt's own entry (its latency is set when the response is ready).
fn serving_record(
    on: &Attempting<'_>,
    mut draft: LedgerRecord,
    rec: Option<&LedgerRecord>,
    http_status: u16,
) -> (LedgerRecord, Attempt) {
    let route = on.route;
    // Without a working record this is the request's first attempt: the draft, made from the
    // call, has no earlier attempts, retries or fallbacks.
    if let Some(rec) = rec {
        draft.attempts = rec.attempts.clone();
        draft.retries = rec.retries;
        draft.fallbacks = fallbacks(&rec.attempts, Some(&route.id));
    }
    let ok = Attempt {
        route: route.id.clone(),
        upstream_model: route.upstream_model.clone(),
        bucket: route.bucket.clone(),
        retry: on.retry,
        outcome: "ok".into(),
        http_status: Some(http_status),
        error: None,
        started_at: Utc::now(),
        latency_ms: 0,
    };
    (draft, ok)
}

/// Phase 3, a stream: the hold becomes the meter, and nothing goes to the client until the
/// first content token is paid (R24): a stream that fails before it is a [`Failure`] like any
/// other. From then on the metered stream owns the request: it pays each token before it is
/// forwarded and settles once, on every ending.
async fn respond_stream(
    on: &Attempting<'_>,
    hold: Hold,
    mut draft: LedgerRecord,
    mut ok: Attempt,
    resp: http::Response<Incoming>,
    first_deadline: tokio::time::Instant,
    reporter: &mut Option<AttemptReporter>,
) -> Served {
    let (state, call) = (on.state, on.call);
    let settlement = &state.config.settlement;
    let limit = call
        .n
        .saturating_mul(call.max_tokens.unwrap_or(u64::MAX / 4));
    let meter = Meter::new(
        hold,
        Prices::of(on.route),
        settlement.initial_output_hold_tokens,
        settlement.max_output_hold_tokens,
        limit,
    );
    ok.latency_ms = call.started.elapsed().as_millis() as u64;
    draft.attempts.push(ok);
    let headers = success_headers(&draft);
    // Boxed from the start: the stream is kept boxed in the response body below, and inline
    // here it would make every attempt's future (a complete answer's too) its size larger.
    let mut ms = Box::new(MeteredStream::new(StreamParts {
        body: resp.into_body(),
        meter,
        tokenizer: state.tokenizer(&call.model.name),
        wire: Wire::of(call.endpoint),
        idle: idle(on),
        include_usage: call.include_usage,
        record: draft,
        started: call.started,
        max_event_bytes: 16 << 20,
        reporter: reporter.take(),
        limiter: call.limiter.clone(),
        shutdown: Some(state.shutdown.subscribe()),
    }));
    let first = match ms.first_token(first_deadline).await {
        Ok(first) => first,
        Err(e) => {
            ms.abandon();
            return Served::Failed(failure::early(
                e,
                on.upstream.provider.first_token_timeout_ms,
            ));
        }
    };
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
    // Boxed: `unfold` keeps both its state and the in-flight future inline, and the future owns
    // the state while it runs, so an unboxed stream would be held twice.
    let rest = futures_util::stream::unfold((ms, redact), |(mut ms, r)| async move {
        let b = ms.next_chunk().await?;
        Some((Ok::<Bytes, std::convert::Infallible>(r.bytes(b)), (ms, r)))
    });
    let first =
        futures_util::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(first) });
    use futures_util::StreamExt;
    Served::Response(r.streaming(first.chain(rest)))
}

/// Phase 3, a complete answer: read it whole, count its output (the upstream's usage when it
/// reports one, R6), settle the hold with the record, and return the upstream's document with
/// the `tollgate` object appended.
async fn respond_complete(
    on: &Attempting<'_>,
    hold: Hold,
    mut draft: LedgerRecord,
    mut ok: Attempt,
    resp: http::Response<Incoming>,
) -> Served {
    let (state, call) = (on.state, on.call);
    let body = match read_body(resp.into_body(), 64 << 20, idle(on)).await {
        Ok(b) => state.redactor().bytes(b),
        Err(e) => return Served::Failed(send_failure(e)),
    };
    let not_json = || {
        Served::Failed(fail(
            "stream_error",
            None,
            "upstream body is not a JSON object".into(),
            true,
            false,
        ))
    };
    let tokenizer = state.tokenizer(&call.model.name);
    let (usage, counted_out, replace_tollgate) = match call.endpoint {
        Endpoint::Chat | Endpoint::Embeddings => {
            let Some(parsed) = UpstreamBody::parse(&body) else {
                return not_json();
            };
            let (usage, counted) = if call.endpoint == Endpoint::Chat {
                let (texts, usage) = parsed.completion_output();
                (usage, tokenizer.completion_output_tokens(&texts))
            } else {
                (parsed.embeddings_usage(), 0)
            };
            (usage, counted, parsed.has_tollgate())
        }
        Endpoint::Responses | Endpoint::Messages => {
            let Ok(parsed @ serde_json::Value::Object(_)) =
                serde_json::from_slice::<serde_json::Value>(&body)
            else {
                return not_json();
            };
            let (texts, usage) = complete_output(Wire::of(call.endpoint), &parsed);
            let texts: Vec<&str> = texts.iter().map(|t| t.as_ref()).collect();
            let counted = tokenizer.completion_output_tokens(&texts);
            (usage, counted, parsed.get("tollgate").is_some())
        }
    };
    ok.latency_ms = call.started.elapsed().as_millis() as u64;
    draft.attempts.push(ok);
    let charge = fill_record(
        &mut draft,
        &Prices::of(on.route),
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

/// The names of the `x-tollgate-*` response headers, made at compile time: parsing a name that
/// is not a standard one copies it, and `from_static` called at run time checks it byte by byte.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-tollgate-request-id");
const ROUTE: HeaderName = HeaderName::from_static("x-tollgate-route");
const UPSTREAM_MODEL: HeaderName = HeaderName::from_static("x-tollgate-upstream-model");
const BUCKET: HeaderName = HeaderName::from_static("x-tollgate-bucket");
const FALLBACKS: HeaderName = HeaderName::from_static("x-tollgate-fallbacks");
const RETRIES: HeaderName = HeaderName::from_static("x-tollgate-retries");

/// The `x-tollgate-*` headers of a served response (the request id, the serving route, its
/// upstream model and bucket, fallbacks and retries).
fn success_headers(rec: &LedgerRecord) -> [(HeaderName, String); 6] {
    [
        (REQUEST_ID, rec.request_id.clone()),
        (ROUTE, rec.route.clone().unwrap_or_default()),
        (
            UPSTREAM_MODEL,
            rec.upstream_model.clone().unwrap_or_default(),
        ),
        (BUCKET, rec.bucket.clone().unwrap_or_default()),
        (FALLBACKS, rec.fallbacks.to_string()),
        (RETRIES, rec.retries.to_string()),
    ]
}
