//! The HTTP side: one pooled HTTP/1.1 keep-alive client (TCP_NODELAY), one request at a time per
//! task, and a minimal SSE scan that times every content event without parsing JSON.

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

/// Where requests go: the chat completions URL (several for a fleet: taken in turn) and the
/// bearer token.
#[derive(Clone, Debug)]
pub struct Target {
    /// `direct` or `gateway` in reports.
    pub label: &'static str,
    pub chat_urls: Arc<[Uri]>,
    /// The next URL to take, shared by every clone: requests go round robin over the fleet.
    next: Arc<AtomicUsize>,
    pub auth: Option<HeaderValue>,
}

impl Target {
    /// `base` is an OpenAI base URL such as `http://127.0.0.1:8080/v1`.
    pub fn new(label: &'static str, base: &str, key: Option<&str>) -> Result<Target, String> {
        Target::fleet(label, &[base.to_string()], key)
    }

    /// Several base URLs (the instances of a fleet), taken round robin.
    pub fn fleet(
        label: &'static str,
        bases: &[String],
        key: Option<&str>,
    ) -> Result<Target, String> {
        if bases.is_empty() {
            return Err("no base URL".into());
        }
        let mut urls = Vec::new();
        for base in bases {
            let url = format!("{}/chat/completions", base.trim_end_matches('/'));
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
        outcome.usage_tokens = completion_tokens(&whole);
        outcome.tokens = outcome.usage_tokens.unwrap_or(0);
        return Ok(());
    }
    let mut scan = SseScan::default();
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
    const KEY: &[u8] = b"\"completion_tokens\":";
    let at = memmem::find(text, KEY)? + KEY.len();
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
    /// The unfinished line of the previous chunk.
    carry: Vec<u8>,
    pub content_events: u64,
    pub done: bool,
    pub usage_tokens: Option<u64>,
    pub error_code: Option<String>,
}

impl SseScan {
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
        let t = Target::fleet("gateway", &bases, Some("k")).unwrap();
        let clone = t.clone();
        let ports: Vec<u16> = [&t, &clone, &t, &clone]
            .iter()
            .map(|t| t.next_url().port_u16().unwrap())
            .collect();
        assert_eq!(ports, [1, 2, 1, 2]);
        assert_eq!(t.chat_urls[1].path(), "/v1/chat/completions");
        assert!(Target::fleet("gateway", &[], None).is_err());
        assert!(Target::new("gateway", "https://x/v1", None).is_err());
    }
}
