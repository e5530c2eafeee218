//! The HTTP side: one pooled HTTP/1.1 keep-alive client (TCP_NODELAY), one request at a time per
//! task, and a minimal SSE scan that times every content event without parsing JSON, in the
//! chat, Responses or Messages format.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use memchr::memmem;

use crate::scenario::Endpoint;
use crate::stats::{micros, Outcome};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client whose pool keeps up to `max_idle` connections per host (one per concurrent request).
pub fn build_client(max_idle: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_idle)
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// Where requests go: the endpoint's URL (several for a fleet: taken in turn) and the bearer
/// token.
#[derive(Clone, Debug)]
pub struct Target {
    /// `direct` or `gateway` in reports.
    pub label: &'static str,
    pub chat_urls: Arc<[Uri]>,
    /// The next URL to take, shared by every clone: requests go round robin over the fleet.
    next: Arc<AtomicUsize>,
    pub auth: Option<HeaderValue>,
    pub endpoint: Endpoint,
}

impl Target {
    /// `base` is an OpenAI base URL such as `http://127.0.0.1:8080/v1`.
    pub fn new(
        label: &'static str,
        base: &str,
        key: Option<&str>,
        endpoint: Endpoint,
    ) -> Result<Target, String> {
        Target::fleet(label, &[base.to_string()], key, endpoint)
    }

    /// Several base URLs (the instances of a fleet), taken round robin.
    pub fn fleet(
        label: &'static str,
        bases: &[String],
        key: Option<&str>,
        endpoint: Endpoint,
    ) -> Result<Target, String> {
        if bases.is_empty() {
            return Err("no base URL".into());
        }
        let mut urls = Vec::new();
        for base in bases {
            let url = format!("{}{}", base.trim_end_matches('/'), endpoint.path());
            let chat_url: Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
            if chat_url.scheme_str() != Some("http") {
                return Err(format!(
                    "{url}: only plain http is supported (put a TLS terminator in front if needed)"
                ));
            }
            urls.push(chat_url);
        }
        let auth = match key {
            Some(k) => Some(
                HeaderValue::from_str(&format!("Bearer {k}"))
                    .map_err(|_| "the key is not a valid header value".to_string())?,
            ),
            None => None,
        };
        Ok(Target {
            label,
            chat_urls: urls.into(),
            next: Arc::new(AtomicUsize::new(0)),
            auth,
            endpoint,
        })
    }

    /// The URL for the next request (round robin).
    pub fn next_url(&self) -> Uri {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.chat_urls.len();
        self.chat_urls[i].clone()
    }
}

/// Sends one chat completion and measures it. `start` is when it should have started (open loop:
/// the schedule), `run_start` the origin of the timeline.
pub async fn send(
    client: &HttpClient,
    target: &Target,
    body: Bytes,
    start: Instant,
    run_start: Instant,
    timeout: Duration,
) -> Outcome {
    let mut outcome = Outcome {
        started_s: start.saturating_duration_since(run_start).as_secs_f64(),
        ..Outcome::default()
    };
    let deadline = start + timeout;
    let result = tokio::time::timeout_at(
        deadline.into(),
        exchange(client, target, body, start, &mut outcome),
    )
    .await;
    outcome.e2e = start.elapsed();
    match result {
        Err(_) => outcome.error = Some("timeout".into()),
        Ok(Err(kind)) => outcome.error = Some(kind),
        Ok(Ok(())) => {}
    }
    outcome
}

async fn exchange(
    client: &HttpClient,
    target: &Target,
    body: Bytes,
    start: Instant,
    outcome: &mut Outcome,
) -> Result<(), String> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(target.next_url())
        .header(CONTENT_TYPE, "application/json");
    if let Some(auth) = &target.auth {
        req = req.header(AUTHORIZATION, auth.clone());
    }
    let req = req
        .body(Full::new(body))
        .map_err(|_| "bad_request".to_string())?;
    let response = client.request(req).await.map_err(|e| {
        if e.is_connect() {
            "connect".to_string()
        } else {
            "request_error".to_string()
        }
    })?;
    let status = response.status();
    outcome.request_id = response
        .headers()
        .get("x-tollgate-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let is_sse = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut body = response.into_body();
    if !status.is_success() {
        // Drain so the connection goes back to the pool.
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
        return Err(format!("http_{}", status.as_u16()));
    }
    if !is_sse {
        let whole = body
            .collect()
            .await
            .map_err(|_| "body_error".to_string())?
            .to_bytes();
        outcome.ttft = Some(start.elapsed());
        outcome.usage_tokens = match target.endpoint {
            Endpoint::Chat => completion_tokens(&whole),
            Endpoint::Responses | Endpoint::Messages => output_tokens(&whole),
        };
        outcome.tokens = outcome.usage_tokens.unwrap_or(0);
        return Ok(());
    }
    let mut scan = SseScan::for_endpoint(target.endpoint);
    let mut last: Option<Instant> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| "body_error".to_string())?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        let events = scan.feed(data);
        for _ in 0..events {
            match last {
                None => outcome.ttft = Some(now.saturating_duration_since(start)),
                Some(prev) => outcome
                    .gaps_us
                    .push(micros(now.saturating_duration_since(prev))),
            }
            last = Some(now);
        }
    }
    outcome.tokens = scan.content_events;
    outcome.usage_tokens = scan.usage_tokens;
    if let Some(code) = scan.error_code {
        return Err(code);
    }
    if !scan.done {
        return Err("no_done".into());
    }
    Ok(())
}

/// `"completion_tokens":N` anywhere in `text`.
pub fn completion_tokens(text: &[u8]) -> Option<u64> {
    number_after(text, b"\"completion_tokens\":")
}

/// `"output_tokens":N` anywhere in `text` (the Responses and Messages usage).
pub fn output_tokens(text: &[u8]) -> Option<u64> {
    number_after(text, b"\"output_tokens\":")
}

/// The integer after the first `key` in `text`.
fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = memmem::find(text, key)? + key.len();
    let digits = text[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n.saturating_mul(10).saturating_add(u64::from(d - b'0'));
        any = true;
    }
    any.then_some(n)
}

/// Line-oriented scan of an SSE body: counts `data:` events with non-empty `"content"`, notes
/// `[DONE]`, the usage chunk's `completion_tokens` and an in-stream error's `code`.
#[derive(Debug, Default)]
pub struct SseScan {
    endpoint: Endpoint,
    /// The unfinished line of the previous chunk.
    carry: Vec<u8>,
    pub content_events: u64,
    pub done: bool,
    pub usage_tokens: Option<u64>,
    pub error_code: Option<String>,
}

impl SseScan {
    pub fn for_endpoint(endpoint: Endpoint) -> SseScan {
        SseScan {
            endpoint,
            ..SseScan::default()
        }
    }

    /// Feeds one network chunk; returns how many content events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> u64 {
        let mut n = 0;
        let mut rest = chunk;
        if !self.carry.is_empty() {
            match memchr::memchr(b'\n', rest) {
                None => {
                    self.carry.extend_from_slice(rest);
                    return 0;
                }
                Some(i) => {
                    let mut line = std::mem::take(&mut self.carry);
                    line.extend_from_slice(&rest[..i]);
                    n += u64::from(self.line(&line));
                    rest = &rest[i + 1..];
                }
            }
        }
        while let Some(i) = memchr::memchr(b'\n', rest) {
            n += u64::from(self.line(&rest[..i]));
            rest = &rest[i + 1..];
        }
        self.carry.extend_from_slice(rest);
        n
    }

    /// Handles one line; true when it was a content event.
    fn line(&mut self, line: &[u8]) -> bool {
        let Some(payload) = line.strip_prefix(b"data:") else {
            return false;
        };
        let payload = payload.strip_prefix(b" ").unwrap_or(payload);
        let payload = payload.strip_suffix(b"\r").unwrap_or(payload);
        if self.endpoint != Endpoint::Chat {
            return self.agent_line(payload);
        }
        if payload == b"[DONE]" {
            self.done = true;
            return false;
        }
        if payload.starts_with(b"{\"error\"") {
            self.error_code = Some(error_code(payload));
            return false;
        }
        if memmem::find(payload, b"\"usage\":{").is_some() {
            if let Some(t) = completion_tokens(payload) {
                self.usage_tokens = Some(t);
            }
        }
        const CONTENT: &[u8] = b"\"content\":\"";
        let content = match memmem::find(payload, CONTENT) {
            Some(at) => payload.get(at + CONTENT.len()) != Some(&b'"'),
            None => false,
        };
        self.content_events += u64::from(content);
        content
    }
}

impl SseScan {
    /// A Responses or Messages `data:` payload: text deltas are content; `response.completed`
    /// and `message_stop` end the stream; an `error` event carries its code (Responses `code`,
    /// Messages `error.type`).
    fn agent_line(&mut self, payload: &[u8]) -> bool {
        let has = |needle: &[u8]| memmem::find(payload, needle).is_some();
        if has(b"\"type\":\"error\"") {
            let code = match self.endpoint {
                Endpoint::Messages => field_after(payload, b"\"error\":{\"type\":\""),
                _ => field_after(payload, b"\"code\":\""),
            };
            self.error_code = Some(code.unwrap_or_else(|| "stream_error_event".into()));
            return false;
        }
        let (delta, text, end) = match self.endpoint {
            Endpoint::Responses => (
                &b"\"type\":\"response.output_text.delta\""[..],
                &b"\"delta\":\""[..],
                &b"\"type\":\"response.completed\""[..],
            ),
            _ => (
                &b"\"type\":\"content_block_delta\""[..],
                &b"\"text\":\""[..],
                &b"\"type\":\"message_stop\""[..],
            ),
        };
        if has(end) {
            self.done = true;
        }
        if has(b"\"usage\":{") {
            if let Some(t) = output_tokens(payload) {
                self.usage_tokens = Some(t);
            }
        }
        let content = has(delta)
            && memmem::find(payload, text)
                .is_some_and(|at| payload.get(at + text.len()) != Some(&b'"'));
        self.content_events += u64::from(content);
        content
    }
}

/// The string after the first `key` (which ends with its opening quote) in `payload`.
fn field_after(payload: &[u8], key: &[u8]) -> Option<String> {
    let at = memmem::find(payload, key)? + key.len();
    let rest = &payload[at..];
    let end = memchr::memchr(b'"', rest)?;
    std::str::from_utf8(&rest[..end])
        .ok()
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
}

fn error_code(payload: &[u8]) -> String {
    const KEY: &[u8] = b"\"code\":\"";
    memmem::find(payload, KEY)
        .and_then(|at| {
            let rest = &payload[at + KEY.len()..];
            let end = memchr::memchr(b'"', rest)?;
            std::str::from_utf8(&rest[..end]).ok().map(str::to_owned)
        })
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "stream_error_event".into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\r\n\r\n",
        ": keep-alive\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn scan_counts_any_split() {
        let bytes = STREAM.as_bytes();
        for size in 1..bytes.len() {
            let mut scan = SseScan::default();
            let n: u64 = bytes.chunks(size).map(|c| scan.feed(c)).sum();
            assert_eq!(n, 2, "split {size}");
            assert_eq!(scan.content_events, 2);
            assert!(scan.done);
            assert_eq!(scan.usage_tokens, Some(2));
            assert_eq!(scan.error_code, None);
        }
    }

    #[test]
    fn scan_counts_agent_formats() {
        let mut r = SseScan::for_endpoint(Endpoint::Responses);
        let n = r.feed(b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{}}\n\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":2,\"output_tokens\":1}}}\n\n");
        assert_eq!(
            (n, r.content_events, r.done, r.usage_tokens),
            (1, 1, true, Some(1))
        );
        let mut m = SseScan::for_endpoint(Endpoint::Messages);
        m.feed(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"a\"}}\n\n");
        m.feed(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"balance_exhausted\",\"message\":\"m\"}}\n\n");
        assert_eq!(m.content_events, 1);
        assert!(!m.done);
        assert_eq!(m.error_code.as_deref(), Some("balance_exhausted"));
    }

    #[test]
    fn scan_sees_error_events() {
        let mut scan = SseScan::default();
        scan.feed(b"data: {\"error\":{\"message\":\"m\",\"type\":\"insufficient_quota\",\"code\":\"balance_exhausted\",\"param\":null}}\n\ndata: [DONE]\n\n");
        assert_eq!(scan.error_code.as_deref(), Some("balance_exhausted"));
        assert_eq!(completion_tokens(b"{\"completion_tokens\": 17}"), Some(17));
        assert_eq!(
            completion_tokens(b"{\"usage\":{\"completion_tokens\": 17}}"),
            Some(17)
        );
    }

    #[test]
    fn a_fleet_target_takes_its_urls_in_turn_across_clones() {
        let bases = [
            "http://127.0.0.1:1/v1".to_string(),
            "http://127.0.0.1:2/v1/".to_string(),
        ];
        let t = Target::fleet("gateway", &bases, Some("k"), Endpoint::Chat).unwrap();
        let clone = t.clone();
        let ports: Vec<u16> = [&t, &clone, &t, &clone]
            .iter()
            .map(|t| t.next_url().port_u16().unwrap())
            .collect();
        assert_eq!(ports, [1, 2, 1, 2]);
        assert_eq!(t.chat_urls[1].path(), "/v1/chat/completions");
        assert!(Target::fleet("gateway", &[], None, Endpoint::Chat).is_err());
        assert!(Target::new("gateway", "https://x/v1", None, Endpoint::Chat).is_err());
    }
}
