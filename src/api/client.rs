//! Client endpoints (docs/api.md): chat completions, embeddings, and the agent formats (OpenAI
//! Responses, Anthropic Messages), all on the same path: authenticate → the key's request rate →
//! read the body within the size limit and deadline → check the fields the gateway reads (R25) →
//! a stream's slot → resolve the model and the key's permission → tokenise → the key's token
//! rate → hand over to the router. Checks that need no body come before it is read (R28, R41);
//! every refusal after authentication leaves a `rejected` record (R15).

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::http::header::HeaderName;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use futures_util::StreamExt;
use http::HeaderMap;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use crate::app::AppState;
use crate::config::Endpoint;
use crate::keys::ApiKey;
use crate::router::upstream::{Upstreams, Whole};
use crate::router::{self, Call};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/chat/completions")
            .route(web::post().to(chat))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/v1/embeddings")
            .route(web::post().to(embeddings))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/v1/responses")
            .route(web::post().to(responses))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/v1/messages")
            .route(web::post().to(messages))
            .default_service(web::to(|req: HttpRequest| async move {
                method_not_allowed(req).await.map_err(ApiError::anthropic)
            })),
    )
    .service(
        web::resource("/v1/models")
            .route(web::get().to(models))
            .default_service(web::to(method_not_allowed)),
    )
    .service(web::resource("/healthz").route(web::get().to(super::healthz)))
    .service(web::resource("/readyz").route(web::get().to(super::readyz)))
    .default_service(web::to(not_found));
}

pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

pub async fn method_not_allowed(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        405,
        "invalid_request_error",
        "method_not_allowed",
        format!("method {} is not allowed on {}", req.method(), req.path()),
    ))
}

/// The key behind `Authorization: Bearer <secret>`.
pub fn authenticate(state: &AppState, req: &HttpRequest) -> Result<Arc<ApiKey>, ApiError> {
    authenticate_for(state, req, Endpoint::Chat)
}

/// The key behind `Authorization: Bearer <secret>`, or on `/v1/messages` also behind Anthropic's
/// `x-api-key: <secret>` (which wins when both are sent).
fn authenticate_for(
    state: &AppState,
    req: &HttpRequest,
    endpoint: Endpoint,
) -> Result<Arc<ApiKey>, ApiError> {
    if endpoint == Endpoint::Messages {
        if let Some(v) = req.headers().get("x-api-key") {
            let secret = v.to_str().map(str::trim).unwrap_or_default();
            if secret.is_empty() {
                return Err(ApiError::unauthorized("empty x-api-key header"));
            }
            return state
                .keys
                .authenticate(secret)
                .ok_or_else(|| ApiError::unauthorized("invalid API key: unknown or revoked"));
        }
    }
    let missing = if endpoint == Endpoint::Messages {
        "missing x-api-key or Authorization header (expected 'x-api-key: <key>' or 'Bearer <key>')"
    } else {
        "missing Authorization header (expected 'Bearer <key>')"
    };
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized(missing))?;
    let secret = header
        .to_str()
        .ok()
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized("malformed Authorization header (expected 'Bearer <key>')")
        })?;
    state
        .keys
        .authenticate(secret)
        .ok_or_else(|| ApiError::unauthorized("invalid API key: unknown or revoked"))
}

/// Reads the body, at most `limit` bytes, all of it within `deadline` (a client dripping its
/// body a byte at a time is cut like one that stops): 408 `request_timeout` after it.
async fn read_limited(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    deadline: std::time::Duration,
) -> Result<web::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            413,
            "invalid_request_error",
            "request_too_large",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(too_large());
        }
    }
    let until = tokio::time::Instant::now() + deadline;
    let mut buf = Whole::default();
    loop {
        let next = match tokio::time::timeout_at(until, payload.next()).await {
            Ok(next) => next,
            Err(_) => {
                return Err(ApiError::new(
                    408,
                    "invalid_request_error",
                    "request_timeout",
                    format!(
                        "the request body was not received within {} ms",
                        deadline.as_millis()
                    ),
                ))
            }
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| {
            ApiError::invalid("invalid_json", format!("cannot read the request body: {e}"))
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.push(chunk);
    }
    Ok(buf.into_bytes())
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid(
            "invalid_json",
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::invalid(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

fn positive_int(body: &Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v > 0 => Ok(Some(v)),
            _ => Err(ApiError::invalid_value(
                field,
                format!("'{field}' must be a positive integer"),
            )),
        },
        Some(_) => Err(ApiError::invalid_value(
            field,
            format!("'{field}' must be a positive integer"),
        )),
    }
}

/// Fields the gateway reads, checked per R25. Returns (model, stream, include_usage, n, max).
fn check_fields(
    body: &Map<String, Value>,
    endpoint: Endpoint,
) -> Result<(String, bool, bool, u64, Option<u64>), ApiError> {
    let model = match body.get("model") {
        None | Some(Value::Null) => return Err(ApiError::missing_field("model")),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => {
            return Err(ApiError::invalid_value(
                "model",
                "'model' must be a non-empty string",
            ))
        }
    };
    match endpoint {
        Endpoint::Chat => match body.get("messages") {
            None | Some(Value::Null) => return Err(ApiError::missing_field("messages")),
            Some(Value::Array(_)) => {}
            Some(_) => {
                return Err(ApiError::invalid_value(
                    "messages",
                    "'messages' must be an array",
                ))
            }
        },
        Endpoint::Embeddings | Endpoint::Responses => match body.get("input") {
            None | Some(Value::Null) => return Err(ApiError::missing_field("input")),
            Some(Value::String(_)) | Some(Value::Array(_)) => {}
            Some(_) => {
                return Err(ApiError::invalid_value(
                    "input",
                    "'input' must be a string or an array",
                ))
            }
        },
        Endpoint::Messages => {
            match body.get("messages") {
                None | Some(Value::Null) => return Err(ApiError::missing_field("messages")),
                Some(Value::Array(_)) => {}
                Some(_) => {
                    return Err(ApiError::invalid_value(
                        "messages",
                        "'messages' must be an array",
                    ))
                }
            }
            // The Messages format requires the bound (and so holds never guess it).
            if matches!(body.get("max_tokens"), None | Some(Value::Null)) {
                return Err(ApiError::missing_field("max_tokens"));
            }
        }
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid_value(
                "stream",
                "'stream' must be a boolean",
            ))
        }
    };
    let include_usage = match body.get("stream_options") {
        // Only chat has `include_usage`; the agent formats always report their usage.
        _ if endpoint != Endpoint::Chat => false,
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::invalid_value(
                    "stream_options.include_usage",
                    "'stream_options.include_usage' must be a boolean",
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::invalid_value(
                "stream_options",
                "'stream_options' must be an object",
            ))
        }
    };
    let (n, max) = match endpoint {
        Endpoint::Chat | Endpoint::Embeddings => {
            let max_tokens = positive_int(body, "max_tokens")?;
            let max_completion = positive_int(body, "max_completion_tokens")?;
            let n = positive_int(body, "n")?.unwrap_or(1);
            (n, max_completion.or(max_tokens))
        }
        Endpoint::Responses => (1, positive_int(body, "max_output_tokens")?),
        Endpoint::Messages => (1, positive_int(body, "max_tokens")?),
    };
    if endpoint == Endpoint::Embeddings && stream {
        return Err(ApiError::invalid_value(
            "stream",
            "embeddings cannot be streamed",
        ));
    }
    Ok((model, stream, include_usage && stream, n, max))
}

async fn chat(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    ups: web::Data<Upstreams>,
) -> Result<HttpResponse, ApiError> {
    handle(req, payload, state, ups, Endpoint::Chat).await
}

async fn embeddings(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    ups: web::Data<Upstreams>,
) -> Result<HttpResponse, ApiError> {
    handle(req, payload, state, ups, Endpoint::Embeddings).await
}

async fn responses(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    ups: web::Data<Upstreams>,
) -> Result<HttpResponse, ApiError> {
    handle(req, payload, state, ups, Endpoint::Responses).await
}

/// `/v1/messages`: every error in Anthropic's envelope.
async fn messages(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    ups: web::Data<Upstreams>,
) -> Result<HttpResponse, ApiError> {
    handle(req, payload, state, ups, Endpoint::Messages)
        .await
        .map_err(ApiError::anthropic)
}

/// Request headers the client API reads, named at compile time: a lookup by `&str` parses a name
/// that is not a standard one into a fresh copy, and `from_static` called at run time checks the
/// name byte by byte, on every request.
const X_TOLLGATE_PROJECT: HeaderName = HeaderName::from_static("x-tollgate-project");
const X_TOLLGATE_USER: HeaderName = HeaderName::from_static("x-tollgate-user");
const X_TOLLGATE_TASK: HeaderName = HeaderName::from_static("x-tollgate-task");

fn header_str(req: &HttpRequest, name: &HeaderName) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| bounded(s.trim()))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The longest `X-Tollgate-Task` value, in characters.
const MAX_TASK_CHARS: usize = 128;

/// `X-Tollgate-Task`: the caller's id for one workflow run, kept as sent. At most
/// [`MAX_TASK_CHARS`] printable ASCII characters (0x20–0x7E); an empty header is no task.
fn task_header(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    const NAME: &str = "x-tollgate-task";
    let Some(v) = req.headers().get(&X_TOLLGATE_TASK) else {
        return Ok(None);
    };
    let bytes = v.as_bytes();
    if bytes.len() > MAX_TASK_CHARS || !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(ApiError::invalid_value(
            NAME,
            format!(
                "'X-Tollgate-Task' must be at most {MAX_TASK_CHARS} printable ASCII characters"
            ),
        ));
    }
    // Printable ASCII throughout, so valid UTF-8.
    let task = String::from_utf8_lossy(bytes).into_owned();
    Ok((!task.is_empty()).then_some(task))
}

async fn handle(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    ups: web::Data<Upstreams>,
    endpoint: Endpoint,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    if state.draining.load(std::sync::atomic::Ordering::Acquire) {
        return Ok(shutting_down(endpoint));
    }
    // Checks that need no body first (R41): authentication, then the key's rate.
    let key = authenticate_for(&state, &req, endpoint)?;
    let project =
        header_str(&req, &X_TOLLGATE_PROJECT).unwrap_or_else(|| key.record.project.clone());
    let task = task_header(&req)?;
    let pending = Pending {
        request_id: crate::ledger::new_request_id(started_at),
        key,
        project,
        end_user: header_str(&req, &X_TOLLGATE_USER),
        task,
        endpoint,
        started_at,
        started,
    };
    let rid = |e: ApiError| e.with_request_id(&pending.request_id);
    let gate = match state.limits.admit_request(&pending.key) {
        Ok(g) => g,
        // The model is not known yet: the record's `requested_model` is empty.
        Err(refusal) => return Err(pending.refuse(&state, "", false, rate_limited(&refusal))),
    };
    let bytes = read_limited(
        &req,
        payload,
        state.config.server.max_body_bytes,
        std::time::Duration::from_millis(state.config.server.client_request_timeout_ms.max(1)),
    )
    .await
    .map_err(rid)?;
    let body = parse_object(&bytes).map_err(rid)?;
    // The bytes may be a slice of the connection's read buffer: let it go before any wait, so
    // that the connection reuses its buffer instead of allocating another.
    drop(bytes);
    let (model_name, stream, include_usage, n, max_tokens) =
        check_fields(&body, endpoint).map_err(rid)?;
    check_message_count(&body, endpoint, state.config.server.max_messages).map_err(rid)?;
    // Only a stream needs a slot, and only the body says whether a request is one: the slot is
    // taken here, before the model, the permission and the tokeniser.
    let permit = match gate.stream_permit(stream) {
        Ok(p) => p,
        Err(refusal) => {
            return Err(pending.refuse(&state, &model_name, stream, rate_limited(&refusal)))
        }
    };
    let Some(model) = state
        .config
        .model(&model_name)
        .filter(|m| m.serves(endpoint))
        .cloned()
    else {
        // Unknown model (or not served on this endpoint): rejected, with a record (R15).
        let what = match endpoint {
            Endpoint::Chat => "chat completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
        };
        let shown = bounded(&model_name);
        let err = ApiError::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!(
                "the model '{shown}{}' does not exist or is not served for {what}",
                if shown.len() < model_name.len() {
                    "…"
                } else {
                    ""
                }
            ),
        );
        return Err(pending.refuse(&state, shown, stream, err));
    };
    if !pending.key.may_use_model(&model.name) {
        let err = ApiError::new(
            403,
            "permission_error",
            "model_not_allowed",
            format!("this key may not use the model '{}'", model.name),
        );
        return Err(pending.refuse(&state, &model.name, stream, err));
    }
    let input = {
        let t = state.tokenizer(&model.name);
        match endpoint {
            Endpoint::Chat => t.chat_input_tokens(body.get("messages").unwrap_or(&Value::Null)),
            Endpoint::Embeddings => {
                t.embeddings_input_tokens(body.get("input").unwrap_or(&Value::Null))
            }
            Endpoint::Responses => {
                t.agent_input_tokens(body.get("instructions"), body.get("input"))
            }
            Endpoint::Messages => t.agent_input_tokens(body.get("system"), body.get("messages")),
        }
    };
    let limiter = match gate.admit_tokens(input) {
        Ok(l) => l,
        Err(refusal) => {
            return Err(pending.refuse(&state, &model.name, stream, rate_limited(&refusal)))
        }
    };
    // For the upstream: `x-mock-*` (the client sender decides whether a provider gets them),
    // and the Messages format's version and beta headers.
    let mut forward_headers = HeaderMap::new();
    for (k, v) in req.headers() {
        let name = k.as_str();
        let anthropic = endpoint == Endpoint::Messages
            && (name == "anthropic-version" || name == "anthropic-beta");
        if name.starts_with("x-mock-") || anthropic {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_bytes(v.as_bytes()),
            ) {
                forward_headers.append(name, value);
            }
        }
    }
    let call = Call {
        limiter,
        request_id: pending.request_id,
        key: pending.key,
        project: pending.project,
        end_user: pending.end_user,
        task: pending.task,
        endpoint,
        model,
        stream,
        include_usage,
        n,
        max_tokens,
        input_tokens: input,
        body,
        forward_headers,
        started_at,
        started,
    };
    // If the client goes away before the response starts, actix drops this future (the client
    // listener does not keep half-closed connections, see `app::serve`): the guard records the
    // request as `client_disconnected`, and the dropped attempt closes its upstream request and
    // releases its hold.
    let mut guard = Abandoned {
        writer: &state.writer,
        call: Some(&call),
        started,
    };
    let r = router::serve(&state, &ups, &call).await;
    guard.call = None;
    match (r, permit) {
        // The stream's body holds the concurrent-stream permit until it is dropped.
        (Ok(resp), Some(permit)) => {
            Ok(resp.map_body(|_, body| PermittedBody { body, permit }.boxed()))
        }
        (r, _) => r,
    }
}

/// The longest client string a record or message keeps (as `header_str` does for headers).
const MAX_CLIENT_CHARS: usize = 256;

/// `s` cut to [`MAX_CLIENT_CHARS`] characters.
fn bounded(s: &str) -> &str {
    match s.char_indices().nth(MAX_CLIENT_CHARS) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn rate_limited(refusal: &crate::limits::Refusal) -> ApiError {
    let mut err = ApiError::new(429, "rate_limit_error", "rate_limited", refusal.message());
    err.retry_after_s = Some(refusal.retry_after_s);
    err
}

/// An authenticated request before routing: what its record needs if it is refused.
struct Pending {
    request_id: String,
    key: Arc<ApiKey>,
    project: String,
    end_user: Option<String>,
    task: Option<String>,
    endpoint: Endpoint,
    started_at: chrono::DateTime<chrono::Utc>,
    started: Instant,
}

impl Pending {
    /// Records the refusal (`rejected`, R15) of a request that asked for `model` (as far as it
    /// was read) and returns the error with the request id.
    fn refuse(&self, state: &AppState, model: &str, stream: bool, err: ApiError) -> ApiError {
        let model = Arc::new(crate::config::Model {
            name: bounded(model).to_string(),
            endpoints: vec![self.endpoint],
            tokenizer: crate::metering::tokenizer::TokenizerKind::Chunks,
            retry: crate::config::Retry {
                max_retries: 0,
                backoff_base_ms: 0,
                backoff_max_ms: 0,
            },
            routes: Vec::new(),
        });
        let call = Call {
            limiter: None,
            request_id: self.request_id.clone(),
            key: self.key.clone(),
            project: self.project.clone(),
            end_user: self.end_user.clone(),
            task: self.task.clone(),
            endpoint: self.endpoint,
            model,
            stream,
            include_usage: false,
            n: 1,
            max_tokens: None,
            input_tokens: 0,
            body: Map::new(),
            forward_headers: HeaderMap::new(),
            started_at: self.started_at,
            started: self.started,
        };
        router::reject(state, &call, call.draft(), err)
    }
}

/// 503 `shutting_down` for a request that arrives while the gateway drains; the connection is
/// closed so that the client reconnects elsewhere.
fn shutting_down(endpoint: Endpoint) -> HttpResponse {
    let mut err = ApiError::new(
        503,
        "service_unavailable",
        "shutting_down",
        "the gateway is shutting down and accepts no new requests; retry on another instance",
    );
    err.anthropic = endpoint == Endpoint::Messages;
    let mut r = err.error_response();
    r.head_mut()
        .set_connection_type(actix_web::http::ConnectionType::Close);
    r
}

/// `server.max_messages` bounds the entries of `messages` (chat, messages) and of an `input`
/// array (embeddings, responses).
fn check_message_count(
    body: &Map<String, Value>,
    endpoint: Endpoint,
    max: usize,
) -> Result<(), ApiError> {
    let field = match endpoint {
        Endpoint::Chat | Endpoint::Messages => "messages",
        Endpoint::Embeddings | Endpoint::Responses => "input",
    };
    match body.get(field) {
        Some(Value::Array(a)) if a.len() > max => Err(ApiError::invalid_value(
            field,
            format!(
                "'{field}' has {} entries; this gateway accepts at most {max}",
                a.len()
            ),
        )),
        _ => Ok(()),
    }
}

/// A response body that holds a concurrent-stream permit until actix drops it (on every ending).
struct PermittedBody {
    body: actix_web::body::BoxBody,
    #[allow(dead_code)] // held for its Drop
    permit: crate::limits::StreamPermit,
}

impl actix_web::body::MessageBody for PermittedBody {
    type Error = <actix_web::body::BoxBody as actix_web::body::MessageBody>::Error;

    fn size(&self) -> actix_web::body::BodySize {
        self.body.size()
    }

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<web::Bytes, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_next(cx)
    }
}

struct Abandoned<'a> {
    writer: &'a crate::ledger::LedgerWriter,
    /// The request, while nothing else will write its record.
    call: Option<&'a router::Call>,
    started: Instant,
}
impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(mut rec) = self.call.take().map(router::Call::draft) {
            rec.status = crate::ledger::Status::ClientDisconnected;
            rec.http_status = 499;
            rec.finished_at = chrono::Utc::now();
            rec.duration_ms = self.started.elapsed().as_millis() as u64;
            crate::metrics::observe_request(&rec, None);
            // Weak: if a settlement already wrote (or will write) this request's record, it wins.
            // It carries no money, so a writer far behind drops it rather than block this worker.
            self.writer
                .try_send(crate::ledger::StoreOp::RecordIfAbsent(Box::new(rec)));
        }
    }
}

async fn models(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let key = authenticate(&state, &req)?;
    let request_id = crate::ledger::new_request_id(chrono::Utc::now());
    let include_unavailable = req
        .query_string()
        .split('&')
        .any(|kv| kv == "include_unavailable=true");
    let data: Vec<Value> = crate::catalog::for_key(&state, &key, false)
        .await
        .into_iter()
        .filter(|m| include_unavailable || m.available)
        .map(|m| {
            json!({
                "id": m.id,
                "object": "model",
                "created": state.config.loaded_at,
                "owned_by": "tollgate",
                "tollgate": m.tollgate_json(),
            })
        })
        .collect();
    Ok(HttpResponse::Ok()
        .insert_header(("x-tollgate-request-id", request_id))
        .json(json!({"object": "list", "data": data})))
}

/// A checked request body: what `handle` reads from it.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedBody {
    pub body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub n: u64,
    pub max_tokens: Option<u64>,
}

/// The body checks of `handle` without a server, for the `request_body` fuzz target and tests:
/// parse as a JSON object, then check the fields the gateway reads (R25). Errors are the
/// client's 400s.
pub fn check_request_body(bytes: &[u8], endpoint: Endpoint) -> Result<CheckedBody, ApiError> {
    let body = parse_object(bytes)?;
    let (model, stream, include_usage, n, max_tokens) = check_fields(&body, endpoint)?;
    Ok(CheckedBody {
        body,
        model,
        stream,
        include_usage,
        n,
        max_tokens,
    })
}
