//! Test harness: runs the real `tollgate` binary on ephemeral loopback ports with a generated
//! config whose providers are built-in mocks (also on known loopback ports), and kills it on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod pg;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const DEMO_KEY: &str = "tg-test-key-0001";

/// Breakers that never open, so that every request reaches its upstream.
pub const NO_BREAKER: &str =
    "circuit = { failure_threshold = 1000000, failure_rate = 1.0, min_requests = 1000000 }";

/// A client whose every request is bounded in time, so no test can hang on a stuck stream.
pub fn bounded_client(timeout: Duration) -> ::reqwest::Client {
    ::reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(timeout)
        .build()
        .unwrap()
}

/// A free loopback port (bound then released; the gateway binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Gateway {
    pub child: Option<Child>,
    pub client_url: String,
    pub admin_url: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// Mock ports by provider id, in the order of `mocks` given to `start`.
    pub mock_urls: Vec<(String, String)>,
    pub log_path: PathBuf,
}

/// Options for the generated config. `body` is appended verbatim after `[server]` and the
/// mock providers: buckets, models, keys, settlement... (use `{mock:ID}` nowhere: mocks are
/// declared from `mocks`).
pub struct Setup<'a> {
    /// (provider id, extra inline fields for the provider table e.g. `circuit = {...}`)
    pub mocks: Vec<(&'a str, &'a str)>,
    pub body: String,
    pub data_dir: Option<&'a Path>,
}

/// Buckets, a two-route chat model (`m` primary on provider `p1` credit/USD, backup on `p2`
/// routed/CNY), an embeddings model on `p1`, and the demo key funded in both buckets.
pub fn standard_body(key_extra: &str, topup_credit: &str, topup_routed: &str) -> String {
    two_bucket_body(
        r#"
[[models]]
name = "m"
tokenizer = "chunks"
retry = { max_retries = 1, backoff_base_ms = 5, backoff_max_ms = 200 }
routes = [
  { provider = "p1", upstream_model = "up-m1", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
  { provider = "p2", upstream_model = "up-m2", bucket = "routed", input_per_mtok = "3", output_per_mtok = "4" },
]

[[models]]
name = "emb"
endpoints = ["embeddings"]
tokenizer = "chunks"
routes = [
  { provider = "p1", upstream_model = "up-emb", bucket = "credit", input_per_mtok = "0.5", output_per_mtok = "0" },
]
"#,
        key_extra,
        topup_credit,
        topup_routed,
    )
}

/// Buckets `credit` (USD, official) and `routed` (CNY, routed), then `models` verbatim (any
/// `[[models]]` or other tables), then the demo key with `key_extra` lines, funded in both
/// buckets.
pub fn two_bucket_body(
    models: &str,
    key_extra: &str,
    topup_credit: &str,
    topup_routed: &str,
) -> String {
    format!(
        r#"
[buckets.credit]
currency = "USD"
kind = "official"

[buckets.routed]
currency = "CNY"
kind = "routed"

{models}

[[keys]]
name = "demo"
secret = "{DEMO_KEY}"
workspace = "ws"
project = "proj"
{key_extra}
topup = {{ credit = "{topup_credit}", routed = "{topup_routed}" }}
"#
    )
}

impl Gateway {
    pub fn start(setup: Setup<'_>) -> Gateway {
        Self::start_extra(setup, Extra::default())
    }

    /// Starts (or restarts) the process on the same config and data dir; waits until ready.
    pub fn spawn(&mut self) {
        self.spawn_env(&[]);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let out = c.wait_with_output().ok()?;
        out.status.code()
    }

    pub fn mock_url(&self, id: &str) -> String {
        self.mock_urls
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, u)| u.clone())
            .unwrap()
    }

    pub fn client(&self) -> reqwest::Client {
        bounded_client(Duration::from_secs(60))
    }

    pub fn chat_url(&self) -> String {
        format!("{}/v1/chat/completions", self.client_url)
    }

    /// GET an admin path with the token; returns (status, JSON body).
    pub async fn admin_get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .client()
            .get(format!("{}{}", self.admin_url, path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn admin_post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let r = self
            .client()
            .post(format!("{}{}", self.admin_url, path))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// The demo key's id.
    pub async fn demo_key_id(&self) -> String {
        let (_, v) = self.admin_get("/admin/keys").await;
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == "demo")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Sets a mock's run-time options (e.g. `{"fault": "500"}`).
    pub async fn mock_options(&self, id: &str, body: serde_json::Value) {
        let r = self
            .client()
            .post(format!("{}/_mock/options", self.mock_url(id)))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "mock options: {}",
            r.text().await.unwrap()
        );
    }

    pub async fn mock_stats(&self, id: &str) -> serde_json::Value {
        self.client()
            .get(format!("{}/stats", self.mock_url(id)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Every ledger record (newest first), following cursors.
    pub async fn all_records(&self, query: &str) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q = format!("/admin/ledger?limit=1000{query}");
            if let Some(c) = &cursor {
                q.push_str(&format!("&cursor={c}"));
            }
            let (s, v) = self.admin_get(&q).await;
            assert_eq!(s, 200, "{v}");
            out.extend(v["records"].as_array().unwrap().iter().cloned());
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Tiny blocking GET used while waiting for readiness (no runtime needed).
pub mod reqwest {
    pub use ::reqwest::*;
    pub fn blocking_get(url: &str) -> std::io::Result<u16> {
        use std::io::{Read, Write};
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut s = std::net::TcpStream::connect(host)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        write!(
            s,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        let code = buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok(code)
    }
}

/// Reads an SSE response body into its `data:` payloads.
pub async fn sse_events(resp: ::reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("data:")
                        .map(|d| d.strip_prefix(' ').unwrap_or(d))
                })
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// Decimal from a JSON decimal string.
pub fn dec(v: &serde_json::Value) -> rust_decimal::Decimal {
    v.as_str().unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Hardening helpers (tests/faults.rs, tests/security.rs): extra start options, money checks at
// quiescence, and a raw-TCP fake upstream for faults the built-in mock cannot produce.

/// Start options beyond `Setup`.
#[derive(Default)]
pub struct Extra {
    /// Environment variables for the gateway process (e.g. a provider key for `api_key_env`).
    pub env: Vec<(String, String)>,
    /// Lines appended inside `[server]`, e.g. `client_request_timeout_ms = 2000` or
    /// `tls = { cert = "...", key = "..." }`.
    pub server: String,
    /// The client API speaks TLS: `client_url` is `https://`.
    pub tls: bool,
}

impl Gateway {
    /// Like `start`, with `extra`. A later `spawn()` (restart) does not carry `extra.env`: use
    /// `spawn_env` for that.
    pub fn start_extra(setup: Setup<'_>, extra: Extra) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = setup
            .data_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("data"));
        let config_path = dir.path().join("tollgate.toml");
        let log_path = dir.path().join("gateway.log");
        let scheme = if extra.tls { "https" } else { "http" };
        let mut g = Gateway {
            child: None,
            client_url: String::new(),
            admin_url: String::new(),
            dir,
            config_path,
            mock_urls: Vec::new(),
            log_path,
        };
        // A port found free can be taken (e.g. by another test's client sockets) before the
        // gateway binds it: then pick new ports and start again.
        for attempt in 0.. {
            let client_port = free_port();
            let admin_port = free_port();
            let mut cfg = format!(
                "[server]\nlisten = \"127.0.0.1:{client_port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nadmin_token = \"{ADMIN_TOKEN}\"\ndata_dir = \"{}\"\n{}\n\n",
                data_dir.display(),
                extra.server
            );
            g.mock_urls.clear();
            for (id, more) in &setup.mocks {
                let port = free_port();
                cfg.push_str(&format!(
                    "[[providers]]\nid = \"{id}\"\nkind = \"mock\"\nlisten = \"127.0.0.1:{port}\"\nmock = {{ ttft_ms = 1, tokens = 8, interval_ms = 1 }}\n{more}\n\n"
                ));
                g.mock_urls
                    .push((id.to_string(), format!("http://127.0.0.1:{port}")));
            }
            cfg.push_str(&setup.body);
            std::fs::write(&g.config_path, &cfg).unwrap();
            g.client_url = format!("{scheme}://127.0.0.1:{client_port}");
            g.admin_url = format!("http://127.0.0.1:{admin_port}");
            match g.try_spawn_env(&extra.env) {
                Ok(()) => break,
                Err(e) if attempt < 5 && e.contains("Address already in use") => continue,
                Err(e) => panic!("{e}"),
            }
        }
        g
    }

    /// `spawn` with extra environment variables for the child.
    pub fn spawn_env(&mut self, env: &[(String, String)]) {
        if let Err(e) = self.try_spawn_env(env) {
            panic!("{e}");
        }
    }

    fn try_spawn_env(&mut self, env: &[(String, String)]) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(200) = reqwest::blocking_get(&format!("{}/readyz", self.admin_url)) {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(format!("gateway exited early ({status}):\n{}", self.log()));
                }
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The gateway's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Panics if the gateway log shows a panic.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(!log.contains("panicked"), "the gateway panicked:\n{log}");
    }

    /// Balance and held amount per bucket of a key.
    pub async fn wallet_view(
        &self,
        key_id: &str,
    ) -> std::collections::BTreeMap<String, (rust_decimal::Decimal, rust_decimal::Decimal)> {
        let (s, v) = self
            .admin_get(&format!("/admin/keys/{key_id}/wallet"))
            .await;
        assert_eq!(s, 200, "{v}");
        v["buckets"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, b)| (k.clone(), (dec(&b["balance"]), dec(&b["held"]))))
            .collect()
    }

    /// Waits for quiescence (nothing held, the ledger stops growing), then checks invariant 1
    /// exactly for every bucket of the key: Σ top-ups − Σ ledger cost == balance, and
    /// balance ≥ 0. `topups` are the key's top-ups per bucket. Returns the key's records.
    pub async fn assert_invariant1(
        &self,
        key_id: &str,
        topups: &[(&str, &str)],
    ) -> Vec<serde_json::Value> {
        use rust_decimal::Decimal;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let w = self.wallet_view(key_id).await;
            if w.values().all(|b| b.1.is_zero()) {
                break;
            }
            assert!(Instant::now() < deadline, "holds never released: {w:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut last = usize::MAX;
        let recs = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let recs = self.all_records(&format!("&key_id={key_id}")).await;
            if recs.len() == last {
                break recs;
            }
            last = recs.len();
            assert!(Instant::now() < deadline, "the ledger never settled");
        };
        let mut cost: std::collections::BTreeMap<String, Decimal> = Default::default();
        for r in &recs {
            let c = dec(&r["cost"]);
            match r["bucket"].as_str() {
                Some(b) => *cost.entry(b.to_string()).or_default() += c,
                None => assert!(c.is_zero(), "a record without bucket has a cost: {r}"),
            }
        }
        let w = self.wallet_view(key_id).await;
        for (bucket, (bal, held)) in &w {
            let t: Decimal = topups
                .iter()
                .filter(|(b, _)| b == bucket)
                .map(|(_, a)| a.parse::<Decimal>().unwrap())
                .sum();
            let c = cost.get(bucket).copied().unwrap_or_default();
            assert!(*bal >= Decimal::ZERO, "{bucket}: negative balance {bal}");
            assert!(held.is_zero(), "{bucket}: not quiescent, held {held}");
            assert_eq!(
                t - c,
                *bal,
                "{bucket}: top-ups {t} − ledger cost {c} ≠ balance {bal}"
            );
        }
        for b in cost.keys() {
            assert!(w.contains_key(b), "cost in a bucket the wallet lacks: {b}");
        }
        recs
    }
}

/// A raw-TCP fake OpenAI upstream for faults the built-in mock cannot produce. It reads one
/// request per connection and acts on the request's `model` (the route's `upstream_model`):
///
/// - `ok`: a normal answer (stream: 5 content chunks, usage, `[DONE]`; non-stream: JSON).
/// - `reset-before`: reads the request, then resets the connection (RST) without an answer.
/// - `reset-headers`: sends 200 SSE headers, then resets.
/// - `reset-mid`: 200, two content chunks, then resets.
/// - `reset-usage`: 200, content, finish chunk, half of the usage chunk, then resets.
/// - `garbage`: answers with bytes that are not HTTP, then closes.
/// - `garbage-sse`: 200, one content chunk, then binary garbage as an event, then closes.
/// - `huge-line`: 200, then a 10 MB line without a newline, then closes.
/// - `huge-delta`: 200, one content chunk of 10 MB, then a normal ending (non-stream: a
///   completion whose content is 10 MB).
/// - `hang`: reads the request and never answers (the connection stays open).
/// - `hang-mid`: 200, one content chunk, then never sends more.
/// - `echo-400` / `echo-400-text` / `echo-401`: the `Authorization` header it received in a
///   JSON error envelope (or a plain-text body) with that status.
/// - `echo-500`: the same in a 500.
/// - `echo-stream-error`: 200, one content chunk, then an error event quoting it.
/// - `echo-content`: a normal answer whose content quotes it (also in the non-stream body).
/// - `echo-header`: a normal answer with the header echoed in a response header.
///
/// Any GET (a probe's `GET /models`) gets the `echo-401` answer.
pub mod fake_upstream {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    pub const TEN_MB: usize = 10 * 1024 * 1024;

    pub struct FakeUpstream {
        pub port: u16,
        task: tokio::task::JoinHandle<()>,
    }

    impl FakeUpstream {
        /// `http://127.0.0.1:PORT/v1`, for a provider's `base_url`.
        pub fn base_url(&self) -> String {
            format!("http://127.0.0.1:{}/v1", self.port)
        }
    }

    impl Drop for FakeUpstream {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Binds 127.0.0.1:0 and serves until dropped (needs a multi-thread runtime or a runtime
    /// that keeps running while the test awaits).
    pub async fn start() -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s));
            }
        });
        FakeUpstream { port, task }
    }

    /// A loopback port with nothing listening (connection refused).
    pub fn closed_port() -> u16 {
        super::free_port()
    }

    struct Request {
        get: bool,
        model: String,
        stream: bool,
        auth: String,
    }

    async fn read_request(s: &mut TcpStream) -> Option<Request> {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut tmp).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let header = |name: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        };
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let n = s.read(&mut tmp).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        let body: serde_json::Value =
            serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or_default();
        Some(Request {
            get: head.starts_with("GET "),
            model: body["model"].as_str().unwrap_or("ok").to_string(),
            stream: body["stream"].as_bool().unwrap_or(false),
            auth: header("authorization").unwrap_or_default(),
        })
    }

    /// Resets the connection: SO_LINGER 0, then close, after giving the peer time to read
    /// what was sent.
    async fn reset(s: TcpStream) {
        let _ = s.set_nodelay(true);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
    }

    fn chunk(content: &str) -> String {
        let c = serde_json::json!({"id": "fake-1", "object": "chat.completion.chunk",
            "created": 1, "model": "fake",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
        format!("data: {c}\n\n")
    }

    const SSE_HEAD: &str =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";

    fn role() -> String {
        "data: {\"id\":\"fake-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"fake\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n".to_string()
    }

    fn ending(tokens: u64) -> String {
        format!(
            "data: {{\"id\":\"fake-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"fake\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n\
             data: {{\"id\":\"fake-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"fake\",\"choices\":[],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":{tokens},\"total_tokens\":{}}}}}\n\n\
             data: [DONE]\n\n",
            tokens + 3
        )
    }

    fn json_response(status: &str, extra_headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra_headers}\r\n{body}",
            body.len()
        )
    }

    fn completion(content: &str) -> String {
        serde_json::json!({"id": "fake-1", "object": "chat.completion", "created": 1,
            "model": "fake",
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
        .to_string()
    }

    async fn normal(s: &mut TcpStream, stream: bool, content: &str, extra_headers: &str) {
        if stream {
            let mut out = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n{extra_headers}\r\n"
            );
            out.push_str(&role());
            for _ in 0..5 {
                out.push_str(&chunk(content));
            }
            out.push_str(&ending(5));
            let _ = s.write_all(out.as_bytes()).await;
        } else {
            let _ = s
                .write_all(json_response("200 OK", extra_headers, &completion(content)).as_bytes())
                .await;
        }
        let _ = s.shutdown().await;
    }

    async fn hold_open(s: TcpStream) {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(s);
    }

    async fn serve(mut s: TcpStream) {
        let _ = s.set_nodelay(true);
        let Some(req) = read_request(&mut s).await else {
            return;
        };
        let echo = serde_json::json!({"error": {"message": format!("invalid key: {}", req.auth),
            "type": "invalid_request_error", "code": "invalid_api_key", "param": null}})
        .to_string();
        if req.get {
            // Probes (`GET /models`): refused, quoting the key.
            let _ = s
                .write_all(json_response("401 Unauthorized", "", &echo).as_bytes())
                .await;
            let _ = s.shutdown().await;
            return;
        }
        match req.model.as_str() {
            // A usage chunk mid-stream, then more content: the usage is not the final count.
            "usage-mid" if req.stream => {
                let usage = "data: {\"id\":\"fake-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"fake\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n";
                let finish = ending(0).replace(
                    ",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":0,\"total_tokens\":3}",
                    "",
                );
                let out = format!(
                    "{SSE_HEAD}{}{}{usage}{}{}{finish}",
                    role(),
                    chunk("a"),
                    chunk("b"),
                    chunk("c")
                );
                let _ = s.write_all(out.as_bytes()).await;
                let _ = s.shutdown().await;
            }
            // The last event lacks its blank line, and the stream ends (broken, no usage).
            "unterminated" if req.stream => {
                let out = format!("{SSE_HEAD}{}{}{}", role(), chunk("a"), chunk("b"));
                let _ = s.write_all(out.trim_end().as_bytes()).await;
                let _ = s.shutdown().await;
            }
            // Output that is not text (audio deltas): metered like any content.
            "audio" if req.stream => {
                let audio = "data: {\"id\":\"fake-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"fake\",\"choices\":[{\"index\":0,\"delta\":{\"audio\":{\"data\":\"UklGRg==\"}},\"finish_reason\":null}]}\n\n";
                let out = format!("{SSE_HEAD}{}{}{}", role(), audio.repeat(5), ending(5));
                let _ = s.write_all(out.as_bytes()).await;
                let _ = s.shutdown().await;
            }
            // Usage counts no u64 sum or price can hold.
            "huge-usage" if req.stream => {
                let max = u64::MAX;
                let out = format!(
                    "{SSE_HEAD}{}{}data: {{\"id\":\"fake-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"fake\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{max},\"completion_tokens\":{max}}}}}\n\ndata: [DONE]\n\n",
                    role(),
                    chunk("a"),
                );
                let _ = s.write_all(out.as_bytes()).await;
                let _ = s.shutdown().await;
            }
            "reset-before" => reset(s).await,
            "reset-headers" => {
                let _ = s.write_all(SSE_HEAD.as_bytes()).await;
                reset(s).await
            }
            "reset-mid" => {
                let out = format!("{SSE_HEAD}{}{}{}", role(), chunk("a"), chunk("b"));
                let _ = s.write_all(out.as_bytes()).await;
                reset(s).await
            }
            "reset-usage" => {
                let out = format!(
                    "{SSE_HEAD}{}{}{}data: {{\"id\":\"fake-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"fake\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\ndata: {{\"id\":\"fake-1\",\"choices\":[],\"usage\":{{\"prompt_tok",
                    role(),
                    chunk("a"),
                    chunk("b")
                );
                let _ = s.write_all(out.as_bytes()).await;
                reset(s).await
            }
            "garbage" => {
                let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
                let _ = s.write_all(&junk).await;
                let _ = s.shutdown().await;
            }
            "garbage-sse" => {
                let mut out = format!("{SSE_HEAD}{}{}", role(), chunk("a")).into_bytes();
                out.extend_from_slice(b"data: \x00\xff\xfe{{{\x01\x02 not json\n\n");
                out.extend((0..2048u32).map(|i| (i * 31 % 256) as u8));
                let _ = s.write_all(&out).await;
                let _ = s.shutdown().await;
            }
            "huge-line" => {
                let _ = s.write_all(SSE_HEAD.as_bytes()).await;
                let _ = s.write_all(b"data: ").await;
                let _ = s.write_all(&vec![b'x'; TEN_MB]).await;
                let _ = s.shutdown().await;
            }
            "huge-delta" if !req.stream => {
                let body = completion(&"y".repeat(TEN_MB));
                let _ = s
                    .write_all(json_response("200 OK", "", &body).as_bytes())
                    .await;
                let _ = s.shutdown().await;
            }
            "huge-delta" => {
                let mut out = format!("{SSE_HEAD}{}", role());
                out.push_str(&chunk(&"y".repeat(TEN_MB)));
                out.push_str(&ending(1));
                let _ = s.write_all(out.as_bytes()).await;
                let _ = s.shutdown().await;
            }
            // An answer without content that reports its usage, then ends without [DONE].
            "empty-no-done" if req.stream => {
                let mut out = format!("{SSE_HEAD}{}", role());
                out.push_str(ending(0).trim_end_matches("data: [DONE]\n\n"));
                let _ = s.write_all(out.as_bytes()).await;
                let _ = s.shutdown().await;
            }
            "empty-no-done" => normal(&mut s, false, "", "").await,
            "hang" => hold_open(s).await,
            "hang-mid" => {
                let out = format!("{SSE_HEAD}{}{}", role(), chunk("a"));
                let _ = s.write_all(out.as_bytes()).await;
                hold_open(s).await
            }
            "echo-400" => {
                let _ = s
                    .write_all(json_response("400 Bad Request", "", &echo).as_bytes())
                    .await;
                let _ = s.shutdown().await;
            }
            "echo-401" => {
                let _ = s
                    .write_all(json_response("401 Unauthorized", "", &echo).as_bytes())
                    .await;
                let _ = s.shutdown().await;
            }
            "echo-400-text" => {
                let text = format!("bad request, you sent {}", req.auth);
                let _ = s
                    .write_all(json_response("400 Bad Request", "", &text).as_bytes())
                    .await;
                let _ = s.shutdown().await;
            }
            "echo-500" => {
                let _ = s
                    .write_all(json_response("500 Internal Server Error", "", &echo).as_bytes())
                    .await;
                let _ = s.shutdown().await;
            }
            "echo-stream-error" => {
                let out = format!("{SSE_HEAD}{}{}data: {echo}\n\n", role(), chunk("a"));
                let _ = s.write_all(out.as_bytes()).await;
                let _ = s.shutdown().await;
            }
            "echo-content" => {
                let content = format!("your key is {}", req.auth);
                normal(&mut s, req.stream, &content, "").await
            }
            "echo-header" => {
                let h = format!("x-echo-auth: {}\r\n", req.auth);
                normal(&mut s, req.stream, "hi", &h).await
            }
            _ => normal(&mut s, req.stream, "tok", "").await,
        }
    }
}

// Limits helpers (tests/limits.rs).
impl Gateway {
    /// Like [`Gateway::start`], with `server_extra` lines inside `[server]`.
    pub fn start_with_server(setup: Setup<'_>, server_extra: &str) -> Gateway {
        Gateway::start_extra(
            setup,
            Extra {
                server: server_extra.to_string(),
                ..Extra::default()
            },
        )
    }

    /// The gateway process's resident set size in KiB (Linux `/proc`).
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}
