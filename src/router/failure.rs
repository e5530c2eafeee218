//! How an attempt failed, in the terms routing decides on: the ledger outcome, whether the same
//! route may be retried, whether the breaker counts it (R17), whether it was a timeout (504 when
//! every attempt timed out), and an upstream 4xx to hand back to the client. Also the words of
//! the errors a request ends with when nothing served it.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use hyper::body::Incoming;
use serde_json::Value;

use super::upstream::{is_retriable_status, read_body, retry_after, SendError};
use crate::api::error::ApiError;
use crate::app::AppState;
use crate::config::Endpoint;
use crate::ledger::Attempt;
use crate::metering::stream::EarlyFailure;

/// How one sent attempt failed.
pub(super) struct Failure {
    pub outcome: String,
    pub http_status: Option<u16>,
    pub error: String,
    pub retriable: bool,
    /// Counts against the breaker (R17).
    pub breaker: bool,
    pub timeout: bool,
    pub retry_after: Option<Duration>,
    /// A non-retriable upstream 4xx to pass through (status, body).
    pub passthrough: Option<(StatusCode, Bytes)>,
}

pub(super) fn fail(
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

pub(super) fn send_failure(e: SendError) -> Failure {
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

/// A non-retriable upstream 4xx as the client's error (R26). An Anthropic upstream's envelope
/// names its error in `type` alone: on `/v1/messages` that name becomes the code, which is the
/// `error.type` the client reads.
pub(super) fn passthrough_error(
    state: &AppState,
    status: StatusCode,
    body: &Bytes,
    endpoint: Endpoint,
) -> ApiError {
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
                let word = !t.is_empty()
                    && t.len() <= 64
                    && t.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                if endpoint == Endpoint::Messages && word {
                    err.code = t.to_string();
                }
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

pub(super) fn describe_failures(attempts: &[Attempt]) -> String {
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

/// An upstream head that is not a success, read as a failure (its body is read, up to 1 MiB, for
/// a 4xx to pass through). 401 and 403 are the provider refusing our credentials (R17): a route
/// failure for the breaker, not retried on that route (the key will not change), fallen back
/// from, and never passed through (the client's own key was fine; the body may quote ours).
pub(super) async fn refused(
    status: StatusCode,
    resp: http::Response<Incoming>,
    idle: Duration,
) -> Failure {
    let ra = retry_after(resp.headers());
    let body = read_body(resp.into_body(), 1 << 20, idle)
        .await
        .unwrap_or_default();
    let code = status.as_u16();
    if code == 401 || code == 403 {
        let mut f = fail(
            &format!("http_{code}"),
            Some(code),
            format!("the provider refused the gateway's credentials (HTTP {code})"),
            false,
            false,
        );
        f.breaker = true;
        return f;
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
    f
}

/// A stream that failed before its first content token (nothing was sent to the client).
pub(super) fn early(e: EarlyFailure, first_token_timeout_ms: u64) -> Failure {
    match e {
        EarlyFailure::Timeout => fail(
            "timeout",
            None,
            format!("no first token within {first_token_timeout_ms} ms"),
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
    }
}
