//! The upstream HTTP client: one pooled hyper client per provider, HTTP/1.1 and HTTP/2 (ALPN
//! over rustls with the ring provider; h2c prior knowledge for `http2 = "always"` on plain
//! http), TCP_NODELAY on every socket, connect / first-byte timeouts. The provider key is added
//! here and nowhere else, in the provider's format (`Authorization: Bearer`, or `x-api-key` with
//! an `anthropic-version` for `api = "anthropic"`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::{Api, Config, Endpoint, Http2Mode, Provider, ProviderKind};

/// The header that names the Messages API version an Anthropic upstream is asked to speak.
pub const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
/// The version sent to an Anthropic provider when the client named none.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Why an attempt failed before a response could be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("connect error: {0}")]
    Connect(String),
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("upstream request failed: {0}")]
    Request(String),
}

pub struct UpstreamProvider {
    pub provider: Arc<Provider>,
    client: HttpClient,
    /// `{base_url}{path}` for each endpoint's path, parsed once: a request clones one (a few
    /// reference counts) instead of formatting and parsing its URL.
    uris: Vec<(&'static str, Uri)>,
    /// The provider key as its format sends it: `Authorization: Bearer` (openai) or `x-api-key`
    /// (anthropic).
    auth: Option<(HeaderName, HeaderValue)>,
    /// Forward `x-mock-*` request headers (built-in mock providers only).
    pub forwards_mock_headers: bool,
}

/// Clients for every provider. Built once per server worker so that pooled connections are
/// driven by the worker that uses them.
pub struct Upstreams {
    by_id: HashMap<String, UpstreamProvider>,
}

/// Reads the provider keys from the environment: an unset variable is a start-up error that
/// names it (R35). Returns provider id → key.
pub fn provider_keys(config: &Config) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for p in &config.providers {
        if let Some(var) = &p.api_key_env {
            match std::env::var(var) {
                Ok(v) if !v.is_empty() => {
                    out.insert(p.id.clone(), v);
                }
                _ => {
                    return Err(format!(
                        "providers.{}.api_key_env: environment variable {var} is not set",
                        p.id
                    ))
                }
            }
        }
    }
    Ok(out)
}

fn build_client(p: &Provider) -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_millis(p.connect_timeout_ms)));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(provider)
        .map_err(|e| format!("TLS setup for provider {}: {e}", p.id))?
        .https_or_http();
    let connector = match p.http2 {
        Http2Mode::Never => tls.enable_http1().wrap_connector(http),
        Http2Mode::Always => tls.enable_http2().wrap_connector(http),
        Http2Mode::Auto => tls.enable_all_versions().wrap_connector(http),
    };
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .http2_adaptive_window(true);
    if p.http2 == Http2Mode::Always {
        b.http2_only(true);
    }
    Ok(b.build(connector))
}

impl Upstreams {
    pub fn new(config: &Config, keys: &HashMap<String, String>) -> Result<Upstreams, String> {
        let mut by_id = HashMap::new();
        for p in &config.providers {
            let auth = match keys.get(&p.id) {
                Some(k) => {
                    let (name, value) = match p.api {
                        Api::OpenAi => (header::AUTHORIZATION, format!("Bearer {k}")),
                        Api::Anthropic => (HeaderName::from_static("x-api-key"), k.clone()),
                    };
                    let mut v = HeaderValue::from_str(&value).map_err(|_| {
                        format!(
                            "providers.{}: the API key is not a valid header value",
                            p.id
                        )
                    })?;
                    v.set_sensitive(true);
                    Some((name, v))
                }
                None => None,
            };
            let endpoints = [
                Endpoint::Chat,
                Endpoint::Embeddings,
                Endpoint::Responses,
                Endpoint::Messages,
            ];
            let uris = endpoints
                .iter()
                .map(|e| e.upstream_path())
                .filter_map(|path| {
                    let uri = format!("{}{path}", p.base_url).parse::<Uri>().ok()?;
                    Some((path, uri))
                })
                .collect();
            by_id.insert(
                p.id.clone(),
                UpstreamProvider {
                    provider: p.clone(),
                    client: build_client(p)?,
                    uris,
                    auth,
                    forwards_mock_headers: matches!(p.kind, ProviderKind::Mock { .. }),
                },
            );
        }
        Ok(Upstreams { by_id })
    }

    /// No providers: every route's attempt is skipped (used only when building clients failed).
    pub fn empty() -> Upstreams {
        Upstreams {
            by_id: HashMap::new(),
        }
    }

    pub fn get(&self, provider: &str) -> Option<&UpstreamProvider> {
        self.by_id.get(provider)
    }
}

impl UpstreamProvider {
    /// Sends `body` to `{base_url}{path}` and waits for the response head, at most
    /// `first_token_timeout_ms` (the rest of the first-token wait is the caller's).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        extra: &HeaderMap,
        deadline: tokio::time::Instant,
    ) -> Result<Response<Incoming>, SendError> {
        let uri = match self.uris.iter().find(|(p, _)| *p == path) {
            Some((_, uri)) => uri.clone(),
            // Any other path (a probe's `/models`), or a base URL that does not parse (the
            // builder then says why).
            None => match format!("{}{}", self.provider.base_url, path).parse::<Uri>() {
                Ok(uri) => uri,
                Err(e) => return Err(SendError::Request(e.to_string())),
            },
        };
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| SendError::Request(e.to_string()))?;
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        if let Some((name, value)) = &self.auth {
            h.insert(name.clone(), value.clone());
        }
        for (k, v) in extra {
            let mock = k.as_str().starts_with("x-mock-");
            if !mock || self.forwards_mock_headers {
                h.insert(k.clone(), v.clone());
            }
        }
        if self.provider.api == Api::Anthropic && !h.contains_key(ANTHROPIC_VERSION) {
            h.insert(
                ANTHROPIC_VERSION,
                HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION),
            );
        }
        let fut = self.client.request(req);
        match tokio::time::timeout_at(deadline, fut).await {
            Err(_) => Err(SendError::Timeout(self.provider.first_token_timeout_ms)),
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                if e.is_connect() {
                    Err(SendError::Connect(describe(&e)))
                } else {
                    Err(SendError::Request(describe(&e)))
                }
            }
        }
    }
}

/// The error chain in one line, without URLs' userinfo (none is ever configured with keys).
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Reads a whole (non-stream) body, at most `limit` bytes, each frame within `idle`.
pub async fn read_body(
    mut body: Incoming,
    limit: usize,
    idle: Duration,
) -> Result<Bytes, SendError> {
    let mut whole = Whole::default();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(SendError::Timeout(idle.as_millis() as u64)),
            Ok(None) => return Ok(whole.into_bytes()),
            Ok(Some(Err(e))) => return Err(SendError::Request(describe(&e))),
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    if whole.len() + d.len() > limit {
                        return Err(SendError::Request(format!(
                            "upstream body larger than {limit} bytes"
                        )));
                    }
                    whole.push(d);
                }
            }
        }
    }
}

/// A body gathered from its chunks. A body that came in one chunk (a short answer usually
/// does) is kept as that chunk, without a copy; only a second chunk starts a buffer.
#[derive(Default)]
pub struct Whole {
    first: Option<Bytes>,
    rest: bytes::BytesMut,
}

impl Whole {
    pub fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.rest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn push(&mut self, chunk: Bytes) {
        match self.first.take() {
            None if self.rest.is_empty() => self.first = Some(chunk),
            first => {
                if let Some(f) = first {
                    self.rest.extend_from_slice(&f);
                }
                self.rest.extend_from_slice(&chunk);
            }
        }
    }

    pub fn into_bytes(self) -> Bytes {
        match self.first {
            Some(f) => f,
            None => self.rest.freeze(),
        }
    }
}

/// `Retry-After` as a duration (seconds or an HTTP date), R16.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let t = httpdate::parse_http_date(v).ok()?;
    Some(
        t.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

pub fn is_retriable_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_body_in_one_chunk_is_that_chunk_and_more_chunks_are_joined_in_order() {
        let one = Bytes::from_static(b"{\"id\":\"x\"}");
        let mut w = Whole::default();
        assert!(w.is_empty());
        w.push(one.clone());
        assert_eq!(w.len(), one.len());
        let got = w.into_bytes();
        assert_eq!(got, one);
        // The same bytes, not a copy of them.
        assert_eq!(got.as_ptr(), one.as_ptr());

        let mut w = Whole::default();
        for part in ["{\"a\":", "1,", "\"b\":2}"] {
            w.push(Bytes::from(part));
        }
        assert_eq!(w.len(), 13);
        assert_eq!(&w.into_bytes()[..], b"{\"a\":1,\"b\":2}");

        assert!(Whole::default().into_bytes().is_empty());
    }

    #[test]
    fn each_endpoint_path_has_its_url_parsed_once_under_the_base_url() {
        let config = crate::config::parse_str(
            r#"
            [server]
            admin_token = "admin-0123456789"
            [buckets.b]
            currency = "USD"
            kind = "official"
            [[providers]]
            id = "p"
            base_url = "http://127.0.0.1:9/v1"
            [[models]]
            name = "m"
            routes = [ { provider = "p", upstream_model = "u", bucket = "b", input_per_mtok = "1", output_per_mtok = "1" } ]
            "#,
        )
        .unwrap();
        let ups = Upstreams::new(&config, &HashMap::new()).unwrap();
        let p = ups.get("p").unwrap();
        let uri = |path: &str| {
            p.uris
                .iter()
                .find(|(x, _)| *x == path)
                .map(|(_, u)| u.to_string())
        };
        assert_eq!(
            uri("/chat/completions").as_deref(),
            Some("http://127.0.0.1:9/v1/chat/completions")
        );
        assert_eq!(
            uri("/messages").as_deref(),
            Some("http://127.0.0.1:9/v1/messages")
        );
        assert_eq!(uri("/models"), None);
    }
}
