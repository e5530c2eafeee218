//! Request routing and the endpoint handlers: chat completions, responses, messages,
//! embeddings, models, stats and the `/_mock/*` control endpoints, with per-request overrides
//! and fault injection (the same for every answering endpoint).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::body::{answer_text, ChatStream, Dialect, MockAbort, MockBody, StreamPlan};
use super::fault::{parse_fault, Fault};
use super::state::{bump, Effective, LastRequest, Shared};

/// Request bodies above this are refused with 413 (R44): the built-in mock runs inside the
/// gateway's process.
pub(super) const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// The most content tokens a request may ask for: per choice (`x-mock-tokens`, the `tokens`
/// option), and over all the choices of a whole (non-stream) answer, which is built in memory
/// (R44). A stream is paced from a small state machine, so its choices may add up to more.
pub(super) const MAX_TOKENS: u64 = 100_000;
/// The longest `x-mock-ttft-ms` / `x-mock-interval-ms` a request may ask for (24 h).
const MAX_DELAY_MS: u64 = 86_400_000;
/// The most cached input tokens a request may ask the usage to report.
const MAX_CACHE_TOKENS: u64 = 100_000_000;
/// The most choices one request may ask for.
const MAX_N: u64 = 128;
const DEFAULT_MODEL: &str = "mock-model";

type Reply = Result<Response<MockBody>, MockAbort>;
/// An early answer from a validation step (boxed: a response is large).
type Rejection = Box<Response<MockBody>>;

/// The service behind every connection.
pub(super) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Reply {
    bump(&shared.stats.requests);
    let path = req.uri().path();
    let route = match path.strip_prefix("/v1") {
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    };
    match (req.method(), route) {
        (&Method::POST, "/chat/completions") => chat(shared, req).await,
        (&Method::POST, "/responses") => agent(shared, req, Dialect::Responses).await,
        (&Method::POST, "/messages") => agent(shared, req, Dialect::Messages)
            .await
            .map(anthropic_envelope),
        (&Method::POST, "/embeddings") => embeddings(shared, req).await,
        (&Method::GET, "/models") => Ok(models(&shared)),
        (&Method::GET, "/stats") => Ok(json_response(StatusCode::OK, &shared.stats.snapshot())),
        (&Method::POST, "/stats/reset") => {
            shared.stats.reset();
            Ok(json_response(StatusCode::OK, &shared.stats.snapshot()))
        }
        (&Method::GET, "/_mock/last") => Ok(last_request(&shared)),
        (&Method::POST, "/_mock/options") => update_options(&shared, req).await,
        (
            _,
            "/chat/completions" | "/responses" | "/messages" | "/embeddings" | "/models" | "/stats"
            | "/stats/reset" | "/_mock/last" | "/_mock/options",
        ) => Ok(error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            None,
            format!("method {} is not allowed on {path}", req.method()),
        )),
        _ => Ok(error_response(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            None,
            format!("the mock upstream has no endpoint {path}"),
        )),
    }
}

/// Behaviour of one request: the options with the `x-mock-*` headers applied.
#[derive(Debug)]
struct Knobs {
    ttft: Duration,
    tokens: u32,
    interval: Duration,
    fault: Option<Fault>,
    /// `x-mock-ttft-ms` was sent: embeddings only wait when asked to.
    ttft_from_header: bool,
    /// `x-mock-cache-read-tokens` / `x-mock-cache-write-tokens`: input the usage reports as read
    /// from or written to the prompt cache (writes only in the Messages format).
    cache_read: u64,
    cache_write: u64,
}

fn knobs(headers: &HeaderMap, effective: &Effective) -> Result<Knobs, Rejection> {
    let opts = &effective.opts;
    let ttft_header = header_number(headers, "x-mock-ttft-ms", MAX_DELAY_MS)?;
    let tokens = header_number(headers, "x-mock-tokens", MAX_TOKENS)?;
    let interval = header_number(headers, "x-mock-interval-ms", MAX_DELAY_MS)?;
    let cache_read = header_number(headers, "x-mock-cache-read-tokens", MAX_CACHE_TOKENS)?;
    let cache_write = header_number(headers, "x-mock-cache-write-tokens", MAX_CACHE_TOKENS)?;
    let fault = match headers.get("x-mock-fault") {
        Some(value) => parse_fault(&String::from_utf8_lossy(value.as_bytes())),
        None => effective.fault.clone(),
    };
    let fault = fault.map_err(|invalid| {
        reject(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            Some("x-mock-fault"),
            invalid.to_string(),
        )
    })?;
    Ok(Knobs {
        ttft: Duration::from_millis(ttft_header.unwrap_or(opts.ttft_ms)),
        // Bounded by MAX_TOKENS above, which fits a u32.
        tokens: match tokens {
            Some(t) => u32::try_from(t).unwrap_or(u32::MAX),
            None => opts.tokens,
        },
        interval: Duration::from_millis(interval.unwrap_or(opts.interval_ms)),
        fault,
        ttft_from_header: ttft_header.is_some(),
        cache_read: cache_read.unwrap_or(0),
        cache_write: cache_write.unwrap_or(0),
    })
}

/// A header holding an integer in `0..=max`; anything else is a 400 naming the header.
fn header_number(headers: &HeaderMap, name: &str, max: u64) -> Result<Option<u64>, Rejection> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    match text.parse::<u64>() {
        Ok(n) if n <= max => Ok(Some(n)),
        // Digits beyond u64 are a number over the cap too.
        _ if digits => Err(reject(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            Some(name),
            format!("header {name} must be at most {max}"),
        )),
        _ => Err(reject(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            Some(name),
            format!("header {name} must be a non-negative integer"),
        )),
    }
}

/// What the fault asks of a request that got past parsing.
enum FaultOutcome {
    Respond(Response<MockBody>),
    /// Behave normally; a stream aborts before content step `abort_after`.
    Proceed {
        abort_after: Option<u32>,
    },
}

/// Applies the request's fault; `Err` drops the exchange without an answer.
async fn apply_fault(
    shared: &Arc<Shared>,
    knobs: &Knobs,
    stream: bool,
) -> Result<FaultOutcome, MockAbort> {
    let proceed = FaultOutcome::Proceed { abort_after: None };
    let Some(fault) = knobs.fault else {
        return Ok(proceed);
    };
    Ok(match fault {
        Fault::Status(code) => FaultOutcome::Respond(status_fault(code)),
        Fault::RateLimited { retry_after_secs } => {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "mock_fault",
                None,
                "mock fault 429".to_owned(),
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
            FaultOutcome::Respond(response)
        }
        Fault::ResetAfter(n) if stream => FaultOutcome::Proceed {
            abort_after: Some(n),
        },
        Fault::ResetAfter(n) => {
            tokio::time::sleep(knobs.ttft + knobs.interval.saturating_mul(n)).await;
            return Err(MockAbort);
        }
        Fault::Hang => {
            // Dropped only when the client goes away; a hung stream counts as cancelled.
            let _guard = HangGuard { shared, stream };
            std::future::pending::<()>().await;
            return Err(MockAbort);
        }
        Fault::Malformed => {
            let mut response = if stream {
                let mut r = Response::new(MockBody::full(Bytes::from_static(
                    b"data: {this is not json\n\ndata: [DONE]\n\n",
                )));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                r
            } else {
                let mut r = Response::new(MockBody::full(Bytes::from_static(b"{not json")));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            };
            *response.status_mut() = StatusCode::OK;
            FaultOutcome::Respond(response)
        }
        Fault::FailRate(p) if shared.draw() < p => FaultOutcome::Respond(status_fault(500)),
        Fault::FailRate(_) => proceed,
    })
}

struct HangGuard<'a> {
    shared: &'a Shared,
    stream: bool,
}

impl Drop for HangGuard<'_> {
    fn drop(&mut self) {
        if self.stream {
            bump(&self.shared.stats.streams_cancelled);
        }
    }
}

fn status_fault(code: u16) -> Response<MockBody> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    error_response(
        status,
        kind,
        "mock_fault",
        None,
        format!("mock fault {}", status.as_u16()),
    )
}

/// What both POST endpoints start with: the body read and recorded for `/_mock/last`, the knobs
/// from the headers and options, and the body as a JSON object; or the answer refusing them.
async fn begin(
    shared: &Shared,
    req: Request<Incoming>,
) -> Result<Result<(Knobs, Value), Response<MockBody>>, MockAbort> {
    let effective = shared.options();
    let (parts, body) = req.into_parts();
    let body = match read_body(&parts.headers, body).await? {
        Ok(body) => body,
        Err(too_large) => return Ok(Err(too_large)),
    };
    record_last(shared, &parts, &body);
    let knobs = match knobs(&parts.headers, &effective) {
        Ok(knobs) => knobs,
        Err(response) => return Ok(Err(*response)),
    };
    Ok(match serde_json::from_slice::<Value>(&body) {
        Ok(v @ Value::Object(_)) => Ok((knobs, v)),
        _ => Err(invalid_json()),
    })
}

/// A streamed answer (any dialect) with its event-stream headers.
fn event_stream(plan: StreamPlan, shared: &Arc<Shared>) -> Response<MockBody> {
    let mut response = Response::new(MockBody::Chat(Box::new(ChatStream::new(
        plan,
        shared.clone(),
    ))));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Paces a whole (non-stream) answer like a stream would: first token at ttft, then one per
/// interval.
async fn pace_whole_answer(knobs: &Knobs, tokens: u32) {
    let delay = knobs.ttft + knobs.interval.saturating_mul(tokens.saturating_sub(1));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

async fn chat(shared: Arc<Shared>, req: Request<Incoming>) -> Reply {
    bump(&shared.stats.chat_requests);
    let (knobs, request) = match begin(&shared, req).await? {
        Ok(begun) => begun,
        Err(response) => return Ok(response),
    };
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    if stream {
        bump(&shared.stats.stream_requests);
    }
    let abort_after = match apply_fault(&shared, &knobs, stream).await? {
        FaultOutcome::Respond(response) => return Ok(response),
        FaultOutcome::Proceed { abort_after } => abort_after,
    };

    let (n, tokens, finish_reason) = match choice_params(&request, knobs.tokens) {
        Ok(params) => params,
        Err(response) => return Ok(*response),
    };
    if !stream && u64::from(n) * u64::from(tokens) > MAX_TOKENS {
        return Ok(invalid_value(
            "n",
            format!(
                "a whole answer carries at most {MAX_TOKENS} tokens: n = {n} choices of {tokens} tokens is more"
            ),
        ));
    }
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_MODEL);
    let prompt_tokens = prompt_tokens(request.get("messages"));
    let id = shared.next_id();
    let created = unix_now();

    if stream {
        let include_usage = request
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        let model_json =
            serde_json::to_string(model).unwrap_or_else(|_| format!("\"{DEFAULT_MODEL}\""));
        let prefix = format!(
            "data: {{\"id\":\"chatcmpl-mock-{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{model_json},\"choices\":["
        );
        let plan = StreamPlan {
            dialect: Dialect::Chat,
            prefix: Bytes::from(prefix),
            model_json: String::new(),
            cache_read_tokens: knobs.cache_read,
            cache_write_tokens: 0,
            n,
            tokens,
            finish_reason,
            include_usage,
            prompt_tokens,
            ttft: knobs.ttft,
            interval: knobs.interval,
            abort_after,
        };
        return Ok(event_stream(plan, &shared));
    }

    // Pace a whole answer like a stream would: first token at ttft, then one per interval.
    pace_whole_answer(&knobs, tokens).await;
    let content = answer_text(tokens);
    let choices: Vec<Value> = (0..n)
        .map(|index| {
            json!({
                "index": index,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            })
        })
        .collect();
    let completion_tokens = u64::from(tokens) * u64::from(n);
    shared
        .stats
        .completion_tokens
        .fetch_add(completion_tokens, std::sync::atomic::Ordering::Relaxed);
    let prompt_tokens = prompt_tokens + knobs.cache_read;
    let mut usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    if knobs.cache_read > 0 {
        usage["prompt_tokens_details"] = json!({"cached_tokens": knobs.cache_read});
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": format!("chatcmpl-mock-{id}"),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage,
        }),
    ))
}

/// `POST /v1/responses` and `POST /v1/messages`: the same deterministic answer as chat (one
/// choice), in the OpenAI Responses or the Anthropic Messages format, with the same knobs and
/// faults. Max tokens: `max_output_tokens` (Responses) or `max_tokens` (Messages).
async fn agent(shared: Arc<Shared>, req: Request<Incoming>, dialect: Dialect) -> Reply {
    bump(match dialect {
        Dialect::Messages => &shared.stats.messages_requests,
        _ => &shared.stats.responses_requests,
    });
    let (knobs, request) = match begin(&shared, req).await? {
        Ok(begun) => begun,
        Err(response) => return Ok(response),
    };
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    if stream {
        bump(&shared.stats.stream_requests);
    }
    let abort_after = match apply_fault(&shared, &knobs, stream).await? {
        FaultOutcome::Respond(response) => return Ok(response),
        FaultOutcome::Proceed { abort_after } => abort_after,
    };
    let max_field = match dialect {
        Dialect::Messages => "max_tokens",
        _ => "max_output_tokens",
    };
    let (tokens, finish_reason) = match optional_number(&request, max_field) {
        Err(response) => return Ok(*response),
        Ok(Some(max)) if max < u64::from(knobs.tokens) => (max as u32, "length"),
        Ok(_) => (knobs.tokens, "stop"),
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_MODEL);
    let model_json =
        serde_json::to_string(model).unwrap_or_else(|_| format!("\"{DEFAULT_MODEL}\""));
    let prompt_tokens = agent_prompt_tokens(&request);
    let id = format!("mock-{}", shared.next_id());
    if stream {
        let plan = StreamPlan {
            dialect,
            prefix: Bytes::from(id),
            model_json,
            n: 1,
            tokens,
            finish_reason,
            include_usage: true,
            prompt_tokens,
            cache_read_tokens: knobs.cache_read,
            cache_write_tokens: if dialect == Dialect::Messages {
                knobs.cache_write
            } else {
                0
            },
            ttft: knobs.ttft,
            interval: knobs.interval,
            abort_after,
        };
        return Ok(event_stream(plan, &shared));
    }
    pace_whole_answer(&knobs, tokens).await;
    let content = answer_text(tokens);
    let output = u64::from(tokens);
    shared
        .stats
        .completion_tokens
        .fetch_add(output, std::sync::atomic::Ordering::Relaxed);
    let body = match dialect {
        Dialect::Messages => json!({
            "id": format!("msg_{id}"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": content}],
            "stop_reason": if finish_reason == "length" { "max_tokens" } else { "end_turn" },
            "stop_sequence": null,
            "usage": {
                "input_tokens": prompt_tokens,
                "cache_creation_input_tokens": knobs.cache_write,
                "cache_read_input_tokens": knobs.cache_read,
                "output_tokens": output,
            },
        }),
        _ => {
            let input = prompt_tokens + knobs.cache_read;
            let complete = finish_reason != "length";
            json!({
                "id": format!("resp_{id}"),
                "object": "response",
                "created_at": unix_now(),
                "status": if complete { "completed" } else { "incomplete" },
                "incomplete_details": if complete { Value::Null } else { json!({"reason": "max_output_tokens"}) },
                "model": model,
                "output": [{
                    "id": format!("msg_{id}"),
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": content, "annotations": []}],
                }],
                "usage": {
                    "input_tokens": input,
                    "input_tokens_details": {"cached_tokens": knobs.cache_read},
                    "output_tokens": output,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": input + output,
                },
            })
        }
    };
    Ok(json_response(StatusCode::OK, &body))
}

/// `ceil(bytes / 4)`, at least 1, over the strings of a Responses or Messages request's prompt
/// and conversation (`instructions`, `input`, `system`, `messages`), at any depth.
fn agent_prompt_tokens(request: &Value) -> u64 {
    fn bytes(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(bytes).sum(),
            Value::Object(fields) => fields
                .iter()
                .filter(|(k, _)| matches!(k.as_str(), "content" | "text" | "input" | "output"))
                .map(|(_, v)| bytes(v))
                .sum(),
            _ => 0,
        }
    }
    let total: usize = ["instructions", "input", "system", "messages"]
        .iter()
        .filter_map(|k| request.get(*k))
        .map(bytes)
        .sum();
    text_tokens(total)
}

/// An error answer of `/v1/messages` in Anthropic's envelope, `{"type":"error","error":{"type",
/// "message"}}`, with the error type Anthropic uses for the status; other answers pass.
fn anthropic_envelope(response: Response<MockBody>) -> Response<MockBody> {
    let status = response.status();
    if status.is_success() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let message = match &body {
        MockBody::Full(Some(bytes)) => serde_json::from_slice::<Value>(bytes).ok().and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_owned)
        }),
        _ => None,
    }
    .unwrap_or_else(|| format!("mock error {}", status.as_u16()));
    let kind = match status.as_u16() {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        529 | 503 => "overloaded_error",
        _ => "api_error",
    };
    let bytes =
        serde_json::to_vec(&json!({"type": "error", "error": {"type": kind, "message": message}}))
            .unwrap_or_default();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, MockBody::full(bytes))
}

/// `(n, tokens per choice, finish_reason)`: `max_completion_tokens` wins over `max_tokens`.
fn choice_params(
    request: &Value,
    configured_tokens: u32,
) -> Result<(u32, u32, &'static str), Rejection> {
    let n = match optional_number(request, "n")? {
        None => 1,
        Some(n) if (1..=MAX_N).contains(&n) => n as u32,
        Some(_) => {
            return Err(Box::new(invalid_value(
                "n",
                format!("n must be between 1 and {MAX_N}"),
            )))
        }
    };
    let max_tokens = match optional_number(request, "max_completion_tokens")? {
        Some(max) => Some(max),
        None => optional_number(request, "max_tokens")?,
    };
    Ok(match max_tokens {
        Some(max) if max < u64::from(configured_tokens) => (n, max as u32, "length"),
        _ => (n, configured_tokens, "stop"),
    })
}

/// A non-negative integer field, absent or `null` as `None`; any other value is a 400.
fn optional_number(request: &Value, field: &str) -> Result<Option<u64>, Rejection> {
    match request.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            Box::new(invalid_value(
                field,
                format!("`{field}` must be a non-negative integer"),
            ))
        }),
    }
}

/// `ceil(bytes / 4)`, at least 1, over every string `content` and text part of `messages`.
fn prompt_tokens(messages: Option<&Value>) -> u64 {
    let mut bytes = 0usize;
    if let Some(Value::Array(messages)) = messages {
        for message in messages {
            match message.get("content") {
                Some(Value::String(text)) => bytes += text.len(),
                Some(Value::Array(parts)) => {
                    for part in parts {
                        if let Some(text) = part.get("text").and_then(Value::as_str) {
                            bytes += text.len();
                        }
                    }
                }
                _ => {}
            }
        }
    }
    text_tokens(bytes)
}

fn text_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4).max(1)
}

async fn embeddings(shared: Arc<Shared>, req: Request<Incoming>) -> Reply {
    bump(&shared.stats.embeddings_requests);
    let (knobs, request) = match begin(&shared, req).await? {
        Ok(begun) => begun,
        Err(response) => return Ok(response),
    };
    if let FaultOutcome::Respond(response) = apply_fault(&shared, &knobs, false).await? {
        return Ok(response);
    }
    // Each input as (tokens, seed of its vector).
    let inputs: Vec<(u64, u64)> = match request.get("input") {
        Some(Value::String(text)) => vec![(text_tokens(text.len()), fnv1a(text.as_bytes()))],
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => {
            vec![(
                items.len() as u64,
                fnv1a(Value::Array(items.clone()).to_string().as_bytes()),
            )]
        }
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut inputs = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(text) => {
                        inputs.push((text_tokens(text.len()), fnv1a(text.as_bytes())));
                    }
                    Value::Array(tokens) if tokens.iter().all(Value::is_number) => {
                        inputs.push((
                            (tokens.len() as u64).max(1),
                            fnv1a(item.to_string().as_bytes()),
                        ));
                    }
                    _ => {
                        return Ok(invalid_value(
                            "input",
                            "each input must be a string or an array of token ids".to_owned(),
                        ))
                    }
                }
            }
            inputs
        }
        None | Some(Value::Null) => {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "missing_field",
                Some("input"),
                "missing field `input`".to_owned(),
            ))
        }
        Some(_) => {
            return Ok(invalid_value(
                "input",
                "input must be a string, an array of strings or token arrays".to_owned(),
            ))
        }
    };
    if knobs.ttft_from_header && !knobs.ttft.is_zero() {
        tokio::time::sleep(knobs.ttft).await;
    }
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_MODEL);
    let prompt_tokens: u64 = inputs.iter().map(|(tokens, _)| tokens).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, (_, seed))| {
            json!({"object": "embedding", "index": index, "embedding": embedding(*seed)})
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }),
    ))
}

/// Eight floats in `[-1, 1)` derived from the input alone.
fn embedding(seed: u64) -> Vec<f64> {
    (1..=8u64)
        .map(|k| {
            let mut z = seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
            ((unit * 2.0 - 1.0) * 1e6).round() / 1e6
        })
        .collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn models(shared: &Shared) -> Response<MockBody> {
    bump(&shared.stats.models_requests);
    let effective = shared.options();
    let ids: Vec<&str> = if effective.opts.models.is_empty() {
        vec![DEFAULT_MODEL]
    } else {
        effective.opts.models.iter().map(String::as_str).collect()
    };
    let data: Vec<Value> = ids
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "mock"}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

fn record_last(shared: &Shared, parts: &http::request::Parts, body: &Bytes) {
    let last = LastRequest {
        path: parts.uri.path().to_owned(),
        http_version: format!("{:?}", parts.version),
        content_type: parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: body.clone(),
    };
    *shared.last.lock() = Some(last);
}

/// `GET /_mock/last`: the path, HTTP version, content type and body of the last chat or
/// embeddings request. Never its headers (R44): they carry the gateway's provider key.
fn last_request(shared: &Shared) -> Response<MockBody> {
    let guard = shared.last.lock();
    let Some(last) = guard.as_ref() else {
        return json_response(StatusCode::OK, &Value::Null);
    };
    let body = serde_json::from_slice::<Value>(&last.body).unwrap_or(Value::Null);
    let rendered = json!({
        "path": last.path,
        "http_version": last.http_version,
        "content_type": last.content_type,
        "body": body,
    });
    drop(guard);
    json_response(StatusCode::OK, &rendered)
}

async fn update_options(shared: &Shared, req: Request<Incoming>) -> Reply {
    let (parts, body) = req.into_parts();
    let body = match read_body(&parts.headers, body).await? {
        Ok(body) => body,
        Err(too_large) => return Ok(too_large),
    };
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&body) else {
        return Ok(invalid_json());
    };
    let mut opts = shared.options().opts.clone();
    if let Err(response) = apply_option_fields(&mut opts, &fields) {
        return Ok(*response);
    }
    shared.set_options(opts.clone());
    Ok(json_response(StatusCode::OK, &opts))
}

fn apply_option_fields(
    opts: &mut super::MockOptions,
    fields: &Map<String, Value>,
) -> Result<(), Rejection> {
    for (key, value) in fields {
        let bad = || Box::new(invalid_value(key, format!("invalid value for `{key}`")));
        match key.as_str() {
            "ttft_ms" => opts.ttft_ms = value.as_u64().ok_or_else(bad)?,
            "interval_ms" => opts.interval_ms = value.as_u64().ok_or_else(bad)?,
            "tokens" => {
                opts.tokens = value
                    .as_u64()
                    .filter(|t| *t <= MAX_TOKENS)
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| {
                        Box::new(invalid_value(
                            key,
                            format!("`tokens` must be an integer from 0 to {MAX_TOKENS}"),
                        ))
                    })?;
            }
            "fault" => match value {
                Value::Null => opts.fault = None,
                Value::String(raw) => match parse_fault(raw) {
                    Ok(_) => opts.fault = Some(raw.clone()),
                    Err(invalid) => return Err(Box::new(invalid_value(key, invalid.to_string()))),
                },
                _ => return Err(bad()),
            },
            "models" => {
                let ids: Option<Vec<String>> = value.as_array().and_then(|items| {
                    items
                        .iter()
                        .map(|item| item.as_str().map(str::to_owned))
                        .collect()
                });
                opts.models = ids.ok_or_else(bad)?;
            }
            _ => {
                return Err(Box::new(invalid_value(
                    key,
                    format!(
                        "unknown option `{key}`; known: ttft_ms, tokens, interval_ms, fault, models"
                    ),
                )))
            }
        }
    }
    Ok(())
}

/// Reads a request body of at most [`MAX_BODY_BYTES`]; a larger one is answered 413 (at once
/// when its `Content-Length` says so). `Err` drops the exchange (the client went away).
async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
) -> Result<Result<Bytes, Response<MockBody>>, MockAbort> {
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            None,
            format!("the mock reads request bodies of at most {MAX_BODY_BYTES} bytes"),
        )
    };
    let announced = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Ok(Err(too_large()));
    }
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(Ok(collected.to_bytes())),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Ok(Err(too_large())),
        Err(err) => {
            tracing::debug!(error = %err, "mock upstream: could not read a request body");
            Err(MockAbort)
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<MockBody> {
    let (status, body) = match serde_json::to_vec(value) {
        Ok(body) => (status, Bytes::from(body)),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Bytes::from_static(b"{\"error\":{\"message\":\"mock could not serialise its answer\",\"type\":\"server_error\",\"param\":null,\"code\":null}}"),
        ),
    };
    let mut response = Response::new(MockBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn reject(
    status: StatusCode,
    kind: &str,
    code: &str,
    param: Option<&str>,
    message: String,
) -> Rejection {
    Box::new(error_response(status, kind, code, param, message))
}

fn error_response(
    status: StatusCode,
    kind: &str,
    code: &str,
    param: Option<&str>,
    message: String,
) -> Response<MockBody> {
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
    )
}

fn invalid_json() -> Response<MockBody> {
    error_response(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_json",
        None,
        "the request body is not a JSON object".to_owned(),
    )
}

fn invalid_value(param: &str, message: String) -> Response<MockBody> {
    error_response(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_value",
        Some(param),
        message,
    )
}
