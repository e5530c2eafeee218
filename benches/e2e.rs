//! End-to-end request overhead, in process: a non-stream chat completion sent to the mock
//! upstream directly, and the same request through the real `tollgate` binary (a `kind = "http"`
//! provider pointing at that mock; metering, wallet holds, ledger and metrics on). The difference
//! of the two per-request times is what the gateway adds at concurrency 1 on loopback.
//!
//! `e2e_nonstream/direct` and `e2e_nonstream/gateway`: one request at a time, keep-alive,
//! TCP_NODELAY, timed with `iter_custom` around the whole exchange (send, head, full body).
//! `e2e_stream64/*`: the same for a 64-token stream with no upstream delay (read to `[DONE]`).
// A bench aborts on a broken setup: there is nothing to report then.
#![allow(clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate::mock::{MockOptions, MockServer};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const KEY: &str = "tg-bench-0123456789";

/// The gateway process; killed on drop.
struct Gateway {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

fn start_gateway(mock: SocketAddr) -> (Gateway, u16, u16) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
admin_token = "bench-admin"
data_dir = "{data}"
workers = 1

[buckets.credit]
currency = "USD"

[[providers]]
id = "mock"
base_url = "http://{mock}/v1"

[[models]]
name = "bench"
tokenizer = "chunks"
routes = [{{ provider = "mock", upstream_model = "bench-up", bucket = "credit", input_per_mtok = "0.5", output_per_mtok = "2" }}]

[[keys]]
name = "bench"
secret = "{KEY}"
topup = {{ credit = "1000000" }}
"#,
        data = dir.path().join("data").display()
    );
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, config).expect("write config");
    let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the gateway binary");
    (Gateway { child, _dir: dir }, port, admin)
}

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4)
        .build(connector)
}

/// One exchange; returns the body length (read to the end).
async fn exchange(client: &HttpClient, url: &str, auth: bool, body: &Bytes) -> usize {
    let mut req = http::Request::post(url).header("content-type", "application/json");
    if auth {
        req = req.header("authorization", format!("Bearer {KEY}"));
    }
    let req = req.body(Full::new(body.clone())).expect("request");
    let response = client.request(req).await.expect("response");
    assert!(response.status().is_success(), "{}", response.status());
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    bytes.len()
}

async fn wait_ready(client: &HttpClient, admin: u16) {
    let url = format!("http://127.0.0.1:{admin}/readyz");
    for _ in 0..200 {
        let req = http::Request::get(&url)
            .body(Full::new(Bytes::new()))
            .expect("request");
        if let Ok(r) = client.request(req).await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway did not become ready");
}

fn bench(c: &mut Criterion) {
    let mock = MockServer::start(
        "127.0.0.1:0".parse().expect("addr"),
        MockOptions {
            ttft_ms: 0,
            tokens: 16,
            interval_ms: 0,
            ..MockOptions::default()
        },
    )
    .expect("start the mock");
    let (_gateway, port, admin) = start_gateway(mock.addr());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = client();
    rt.block_on(wait_ready(&client, admin));

    let direct_url = format!("http://{}/v1/chat/completions", mock.addr());
    let gateway_url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let targets = [
        ("direct", &direct_url, false),
        ("gateway", &gateway_url, true),
    ];

    for (group_name, stream, tokens) in
        [("e2e_nonstream", false, 16u32), ("e2e_stream64", true, 64)]
    {
        mock.set_options(MockOptions {
            ttft_ms: 0,
            tokens,
            interval_ms: 0,
            ..MockOptions::default()
        });
        let body = Bytes::from(
            serde_json::json!({
                "model": "bench",
                "stream": stream,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "Say something about overhead."}],
            })
            .to_string(),
        );
        let mut group = c.benchmark_group(group_name);
        group.throughput(Throughput::Elements(1));
        group.sample_size(30);
        group.measurement_time(Duration::from_secs(5));
        for (name, url, auth) in targets {
            // Warm the pools (and the wallet actor) before timing.
            rt.block_on(async {
                for _ in 0..50 {
                    exchange(&client, url, auth, &body).await;
                }
            });
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            std::hint::black_box(exchange(&client, url, auth, &body).await);
                        }
                        start.elapsed()
                    })
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
