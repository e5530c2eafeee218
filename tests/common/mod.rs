//! Test harness: runs the real `tollgate` binary on ephemeral loopback ports with a generated
//! config whose providers are built-in mocks (also on known loopback ports), and kills it on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const DEMO_KEY: &str = "tg-test-key-0001";

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
    format!(
        r#"
[buckets.credit]
currency = "USD"
kind = "official"

[buckets.routed]
currency = "CNY"
kind = "routed"

[[models]]
name = "m"
tokenizer = "chunks"
retry = {{ max_retries = 1, backoff_base_ms = 5, backoff_max_ms = 200 }}
routes = [
  {{ provider = "p1", upstream_model = "up-m1", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }},
  {{ provider = "p2", upstream_model = "up-m2", bucket = "routed", input_per_mtok = "3", output_per_mtok = "4" }},
]

[[models]]
name = "emb"
endpoints = ["embeddings"]
tokenizer = "chunks"
routes = [
  {{ provider = "p1", upstream_model = "up-emb", bucket = "credit", input_per_mtok = "0.5", output_per_mtok = "0" }},
]

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
        let dir = tempfile::tempdir().unwrap();
        let data_dir = setup
            .data_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("data"));
        Self::start_in(dir, &data_dir, setup)
    }

    fn start_in(dir: tempfile::TempDir, data_dir: &Path, setup: Setup<'_>) -> Gateway {
        let client_port = free_port();
        let admin_port = free_port();
        let mut cfg = format!(
            "[server]\nlisten = \"127.0.0.1:{client_port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nadmin_token = \"{ADMIN_TOKEN}\"\ndata_dir = \"{}\"\n\n",
            data_dir.display()
        );
        let mut mock_urls = Vec::new();
        for (id, extra) in &setup.mocks {
            let port = free_port();
            cfg.push_str(&format!(
                "[[providers]]\nid = \"{id}\"\nkind = \"mock\"\nlisten = \"127.0.0.1:{port}\"\nmock = {{ ttft_ms = 1, tokens = 8, interval_ms = 1 }}\n{extra}\n\n"
            ));
            mock_urls.push((id.to_string(), format!("http://127.0.0.1:{port}")));
        }
        cfg.push_str(&setup.body);
        let config_path = dir.path().join("tollgate.toml");
        std::fs::write(&config_path, &cfg).unwrap();
        let log_path = dir.path().join("gateway.log");
        let mut g = Gateway {
            child: None,
            client_url: format!("http://127.0.0.1:{client_port}"),
            admin_url: format!("http://127.0.0.1:{admin_port}"),
            dir,
            config_path,
            mock_urls,
            log_path,
        };
        g.spawn();
        g
    }

    /// Starts (or restarts) the process on the same config and data dir; waits until ready.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::blocking_get(&format!("{}/readyz", self.admin_url)) {
                if r == 200 {
                    break;
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("gateway exited early ({status}):\n{}", self.log());
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
        reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .unwrap()
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
