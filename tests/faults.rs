//! Fault suite (issue 8): upstream faults from the built-in mock and from a raw-TCP fake
//! upstream (resets before headers, after headers, mid-stream and inside the usage chunk,
//! garbage, a 10 MB line, hangs, connection refused), client faults (garbage requests, bad
//! bodies, disconnects, a client that never reads) and 10,000 idle client connections. In every
//! case: no panic in the gateway log, no 5xx for client-caused faults, upstream faults end as
//! 502/504 or a stream error event, invariant 1 holds afterwards and the gateway keeps serving.
//!
//! Not covered here: a failed flush to storage. Making the data dir read-only after start does
//! not simulate it: sled writes through file descriptors it opened at start, which a later chmod
//! does not affect, and the tests run as root, which ignores permissions anyway. Failed fsyncs
//! and failed batch commits are injected inside the writer instead, in the wallet's unit tests
//! (a top-up whose fsync failed; a batch that fails to commit is kept until it is written).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOPUP: &str = "10";

/// A client with a bound on every request, so no test can hang on a stuck stream.
fn http() -> ::reqwest::Client {
    bounded_client(Duration::from_secs(40))
}

/// The raw fake upstream's behaviours (see `fake_upstream`), each served as model `f-<name>`.
const RAW_CASES: &[&str] = &[
    "ok",
    "reset-before",
    "reset-headers",
    "reset-mid",
    "reset-usage",
    "garbage",
    "garbage-sse",
    "huge-line",
    "huge-delta",
    "hang",
    "hang-mid",
    "empty-no-done",
    "usage-mid",
    "unterminated",
    "audio",
];

/// Raw cases served as `f-<name>` but left out of the concurrent sweep: `huge-usage` drains the
/// wallet (its usage is billed as reported).
const RAW_ALONE: &[&str] = &["huge-usage"];

fn model(name: &str, provider: &str, upstream_model: &str) -> String {
    format!(
        r#"
[[models]]
name = "{name}"
tokenizer = "chunks"
retry = {{ max_retries = 1, backoff_base_ms = 5, backoff_max_ms = 200 }}
routes = [
  {{ provider = "{provider}", upstream_model = "{upstream_model}", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }},
]
"#
    )
}

/// One bucket; model `m` on mock `p1`; `f-<case>` on the raw fake upstream; `refused` on a
/// closed port; the demo key funded with `TOPUP`.
fn body(fake_base_url: &str, closed_port: u16) -> String {
    let mut b = format!(
        r#"
[routing]
retry_budget_ratio = 1.0
retry_budget_min_per_s = 1000

[buckets.credit]
currency = "USD"
kind = "official"

[[providers]]
id = "raw"
base_url = "{fake_base_url}"
connect_timeout_ms = 500
first_token_timeout_ms = 1500
idle_timeout_ms = 1500
{NO_BREAKER}

[[providers]]
id = "refused"
base_url = "http://127.0.0.1:{closed_port}/v1"
connect_timeout_ms = 500
{NO_BREAKER}
"#
    );
    b.push_str(&model("m", "p1", "up-m1"));
    for case in RAW_CASES.iter().chain(RAW_ALONE) {
        b.push_str(&model(&format!("f-{case}"), "raw", case));
    }
    b.push_str(&model("refused", "refused", "up-x"));
    b.push_str(&format!(
        r#"
[[keys]]
name = "demo"
secret = "{DEMO_KEY}"
workspace = "ws"
project = "proj"
topup = {{ credit = "{TOPUP}" }}
"#
    ));
    b
}

const MOCK_EXTRA: &str = "first_token_timeout_ms = 1500\nidle_timeout_ms = 1500\ncircuit = { failure_threshold = 1000000, failure_rate = 1.0, min_requests = 1000000 }";

async fn start(server: &str) -> (Gateway, fake_upstream::FakeUpstream) {
    let fake = fake_upstream::start().await;
    let setup = Setup {
        mocks: vec![("p1", MOCK_EXTRA)],
        body: body(&fake.base_url(), fake_upstream::closed_port()),
        data_dir: None,
    };
    let extra = Extra {
        server: server.to_string(),
        ..Extra::default()
    };
    // Starting blocks (it waits for readiness): keep the runtime's workers free for the fake.
    let g = tokio::task::spawn_blocking(move || Gateway::start_extra(setup, extra))
        .await
        .unwrap();
    (g, fake)
}

fn chat(model: &str, stream: bool) -> Value {
    let mut b = json!({"model": model, "stream": stream,
        "messages": [{"role": "user", "content": "hello there"}]});
    if stream {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

/// How one request ended, as the client saw it.
#[derive(Debug)]
enum Seen {
    /// A non-stream 200, or a stream that ended with `[DONE]` and no error event.
    Ok,
    /// A stream that ended with an error event (its `code`) and `[DONE]`.
    StreamError(String),
    /// A non-200 answer: status and error code.
    Status(u16, String),
}

async fn call(g: &Gateway, body: &Value, headers: &[(&str, &str)]) -> Seen {
    let mut r = http().post(g.chat_url()).bearer_auth(DEMO_KEY).json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let stream = body["stream"].as_bool().unwrap_or(false);
    if status != 200 {
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        let code = v["error"]["code"].as_str().unwrap_or("?").to_string();
        return Seen::Status(status, code);
    }
    if !stream {
        let v: Value = resp.json().await.unwrap();
        assert!(v["tollgate"].is_object(), "{v}");
        return Seen::Ok;
    }
    // A stream must end cleanly ([DONE]) whatever the upstream did.
    let events = sse_events(resp).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "stream without [DONE]: {:?}",
        events.iter().rev().take(3).collect::<Vec<_>>()
    );
    for e in &events {
        if let Ok(v) = serde_json::from_str::<Value>(e) {
            if let Some(code) = v["error"]["code"].as_str() {
                return Seen::StreamError(code.to_string());
            }
        }
    }
    Seen::Ok
}

async fn assert_serves(g: &Gateway) {
    for stream in [true, false] {
        match call(g, &chat("m", stream), &[]).await {
            Seen::Ok => {}
            other => panic!("a normal request failed after the faults: {other:?}"),
        }
    }
}

/// The expected ending of each raw case, as (stream, non-stream).
fn expected(case: &str) -> (&'static [&'static str], &'static [&'static str]) {
    const OK: &[&str] = &["ok"];
    const E502: &[&str] = &["502"];
    const E504: &[&str] = &["504"];
    const BROKE: &[&str] = &["stream_error"];
    match case {
        // Without [DONE] but with usage, a stream is complete, even before any content.
        "ok" | "huge-delta" | "empty-no-done" | "usage-mid" | "audio" => (OK, OK),
        // Broken after two tokens, the last of them without its blank line.
        "unterminated" => (BROKE, OK),
        "reset-before" | "reset-headers" | "garbage" => (E502, E502),
        "reset-mid" | "reset-usage" | "garbage-sse" => (BROKE, E502),
        // The line never ends: no event, no token; the body ends without one.
        "huge-line" => (&["502", "stream_error"], E502),
        "hang" => (E504, E504),
        // Non-stream: the head and part of the body came, the rest never does.
        "hang-mid" => (BROKE, &["502", "504"]),
        _ => unreachable!(),
    }
}

fn label(seen: &Seen) -> String {
    match seen {
        Seen::Ok => "ok".into(),
        Seen::StreamError(code) => {
            assert_eq!(code, "upstream_stream_error", "{seen:?}");
            "stream_error".into()
        }
        Seen::Status(s, code) => {
            match s {
                502 => assert_eq!(code, "upstream_error", "{seen:?}"),
                504 => assert_eq!(code, "upstream_timeout", "{seen:?}"),
                _ => {}
            }
            s.to_string()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_upstream_faults_end_cleanly_and_conserve_money() {
    let (g, _fake) = start("").await;
    let key_id = g.demo_key_id().await;
    let mut cases = Vec::new();
    for case in RAW_CASES {
        for stream in [true, false] {
            cases.push((case.to_string(), stream));
        }
    }
    cases.push(("refused".into(), true));
    cases.push(("refused".into(), false));
    let results = futures_util::future::join_all(cases.iter().map(|(case, stream)| {
        let g = &g;
        async move {
            let model = if case == "refused" {
                "refused".to_string()
            } else {
                format!("f-{case}")
            };
            let t0 = Instant::now();
            let seen = call(g, &chat(&model, *stream), &[]).await;
            (case.clone(), *stream, seen, t0.elapsed())
        }
    }))
    .await;
    let mut failures = Vec::new();
    for (case, stream, seen, took) in &results {
        let got = label(seen);
        let want = if case == "refused" {
            &["502"][..]
        } else if *stream {
            expected(case).0
        } else {
            expected(case).1
        };
        eprintln!("{case} stream={stream}: {got} in {took:?}");
        if !want.contains(&got.as_str()) {
            failures.push(format!(
                "{case} (stream={stream}): got {seen:?}, want one of {want:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\n{}", g.log());

    assert_serves(&g).await;
    let recs = g.assert_invariant1(&key_id, &[("credit", TOPUP)]).await;
    // Every failed request is in the ledger as an upstream error; nothing is rejected.
    let upstream_errors = recs
        .iter()
        .filter(|r| r["status"] == "upstream_error")
        .count();
    let failed = results
        .iter()
        .filter(|(_, _, seen, _)| !matches!(seen, Seen::Ok))
        .count();
    assert_eq!(upstream_errors, failed, "ledger statuses vs. client view");
    // A mid-stream break bills only what was delivered (counted), never the upstream's usage.
    for r in recs
        .iter()
        .filter(|r| r["status"] == "upstream_error" && r["stream"] == true)
    {
        assert_eq!(r["output_tokens"], r["output_tokens_delivered"], "{r}");
    }
    g.assert_no_panic();
}

/// Streams the meter could misread: a usage chunk followed by more content (billed at least
/// what was delivered), a last event without its blank line (kept apart from the gateway's own
/// events, so the client can read the tokens it paid for), output that is not text (audio
/// deltas count, so they are paid before they are forwarded).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_bill_and_forward_what_was_delivered() {
    let (gateway, _fake) = start("").await;
    let g = &gateway;
    let key_id = g.demo_key_id().await;
    let stream = |model: &str| {
        let r = http()
            .post(g.chat_url())
            .bearer_auth(DEMO_KEY)
            .json(&chat(model, true))
            .send();
        async move {
            let r = r.await.unwrap();
            assert_eq!(r.status(), 200);
            let id = r.headers()["x-tollgate-request-id"]
                .to_str()
                .unwrap()
                .to_string();
            (id, sse_events(r).await)
        }
    };
    let record = move |id: String| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, v) = g.admin_get(&format!("/admin/ledger/{id}")).await;
            if s == 200 {
                return v;
            }
            assert!(Instant::now() < deadline, "no record for {id}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let parsed = |events: &[String]| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e.as_str() != "[DONE]")
            .map(|e| {
                serde_json::from_str(e)
                    .unwrap_or_else(|err| panic!("the client cannot read {e:?}: {err}"))
            })
            .collect()
    };
    let contents = |evs: &[Value]| {
        evs.iter()
            .filter(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            })
            .count() as u64
    };

    let (id, events) = stream("f-usage-mid").await;
    let evs = parsed(&events);
    assert_eq!(contents(&evs), 3, "{events:?}");
    let r = record(id).await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["output_tokens_delivered"], 3, "{r}");
    assert_eq!(
        r["output_tokens"], 3,
        "the mid-stream usage (1) was billed: {r}"
    );

    let (id, events) = stream("f-unterminated").await;
    let evs = parsed(&events);
    assert_eq!(contents(&evs), 2, "{events:?}");
    assert!(
        evs.iter()
            .any(|v| v["error"]["code"] == "upstream_stream_error"),
        "{events:?}"
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let r = record(id).await;
    assert_eq!(r["status"], "upstream_error", "{r}");
    assert_eq!(r["output_tokens_delivered"], 2, "{r}");

    let (id, events) = stream("f-audio").await;
    let evs = parsed(&events);
    let audio = evs
        .iter()
        .filter(|v| v["choices"][0]["delta"]["audio"].is_object())
        .count();
    assert_eq!(audio, 5, "{events:?}");
    let r = record(id).await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(
        r["output_tokens_delivered"], 5,
        "audio deltas were not metered: {r}"
    );
    assert!(r["ttft_ms"].is_u64(), "{r}");

    // Usage beyond what any sum or price holds: no overflow. The upstream's usage is billed as
    // reported (R6): the charge saturates, the wallet pays what it has, the rest is shortfall.
    let (id, events) = stream("f-huge-usage").await;
    let evs = parsed(&events);
    let usage = evs.iter().find(|v| v["usage"].is_object()).unwrap();
    assert_eq!(usage["usage"]["total_tokens"], u64::MAX, "{usage}");
    let r = record(id).await;
    assert_eq!(r["status"], "completed", "{r}");
    assert!(dec(&r["shortfall"]) > rust_decimal::Decimal::ZERO, "{r}");

    g.assert_invariant1(&key_id, &[("credit", TOPUP)]).await;
    g.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_faults_end_cleanly_and_conserve_money() {
    let (g, _fake) = start("").await;
    let key_id = g.demo_key_id().await;
    // (fault, allowed endings for stream, for non-stream)
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("500", &["502"], &["502"]),
        ("503", &["502"], &["502"]),
        ("429:1", &["502"], &["502"]),
        ("400", &["400"], &["400"]),
        ("reset-after:3", &["stream_error"], &["502"]),
        ("reset-after:0", &["502", "stream_error"], &["502"]),
        ("hang", &["504"], &["504"]),
        ("malformed", &["502", "stream_error"], &["502"]),
        ("fail-rate:0.5", &["ok", "502"], &["ok", "502"]),
    ];
    let mut jobs = Vec::new();
    for (fault, s, ns) in cases {
        jobs.push((*fault, true, *s));
        jobs.push((*fault, false, *ns));
    }
    let results = futures_util::future::join_all(jobs.iter().map(|(fault, stream, _)| {
        let g = &g;
        async move {
            call(
                g,
                &chat("m", *stream),
                &[("x-mock-fault", fault), ("x-mock-tokens", "20")],
            )
            .await
        }
    }))
    .await;
    let mut failures = Vec::new();
    for ((fault, stream, want), seen) in jobs.iter().zip(&results) {
        let got = label(seen);
        if !want.contains(&got.as_str()) {
            failures.push(format!(
                "{fault} (stream={stream}): got {seen:?}, want one of {want:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\n{}", g.log());
    // The same faults set at run time on the mock, then cleared.
    g.mock_options("p1", json!({"fault": "reset-after:2"}))
        .await;
    assert_eq!(
        label(&call(&g, &chat("m", true), &[]).await),
        "stream_error"
    );
    g.mock_options("p1", json!({"fault": "none"})).await;
    assert_serves(&g).await;
    g.assert_invariant1(&key_id, &[("credit", TOPUP)]).await;
    g.assert_no_panic();
}

/// Sends raw bytes to the client listener and returns the status line's code (0 when the
/// gateway closed without answering).
async fn raw_exchange(addr: &str, bytes: &[u8]) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The gateway may answer and close before it has read everything: ignore write errors.
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut tmp = [0u8; 4096];
        loop {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&tmp[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_faults_get_4xx_and_leave_the_gateway_serving() {
    let (g, _fake) = start("client_request_timeout_ms = 2000").await;
    let key_id = g.demo_key_id().await;
    let addr = g.client_url.trim_start_matches("http://").to_string();

    // Garbage instead of HTTP, a TLS hello on the plaintext port, a 10 MB header line, a
    // truncated request: each gets a 4xx or a closed connection, never a 5xx.
    let auth = format!("Authorization: Bearer {DEMO_KEY}\r\n");
    let mut huge_header = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge_header.extend(std::iter::repeat_n(b'a', fake_upstream::TEN_MB));
    huge_header.extend_from_slice(b"\r\n\r\n");
    let truncated = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1000\r\n\r\n{{\"model\":"
    );
    let raw: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            (0..2000u32).map(|i| (i * 7 % 256) as u8).collect(),
        ),
        (
            "tls hello",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage".to_vec(),
        ),
        ("10 MB header", huge_header),
        ("truncated body", truncated.into_bytes()),
        ("bad request line", b"GET\x00/ HTTP/9.9\r\n\r\n".to_vec()),
    ];
    for (what, bytes) in &raw {
        let code = raw_exchange(&addr, bytes).await;
        eprintln!("{what}: {code}");
        assert!(code == 0 || (400..500).contains(&code), "{what}: {code}");
    }

    // Bad bodies and headers through a real client.
    let big = "x".repeat(5 * 1024 * 1024);
    let bodies: Vec<(&str, Vec<u8>, u16)> = vec![
        ("not json", b"{not json".to_vec(), 400),
        ("not an object", b"[1,2]".to_vec(), 400),
        ("invalid utf-8", b"{\"model\":\"m\xff\xfe\"}".to_vec(), 400),
        ("missing messages", br#"{"model":"m"}"#.to_vec(), 400),
        (
            "bad n",
            br#"{"model":"m","messages":[],"n":-1}"#.to_vec(),
            400,
        ),
        (
            "deep nesting",
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
            400,
        ),
        (
            "too large",
            format!(r#"{{"model":"m","messages":[],"x":"{big}"}}"#).into_bytes(),
            413,
        ),
        (
            "unknown model",
            br#"{"model":"nope","messages":[]}"#.to_vec(),
            404,
        ),
    ];
    for (what, body, want) in bodies {
        let r = http()
            .post(g.chat_url())
            .bearer_auth(DEMO_KEY)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            want,
            "{what}: {}",
            r.text().await.unwrap()
        );
    }
    let r = http()
        .post(g.chat_url())
        .bearer_auth("tg-wrong")
        .json(&chat("m", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Disconnects: before the first token (the client resets the connection), and mid-stream.
    // (A client that only half-closes, e.g. a client-side timeout that sends FIN, is still
    // answered: actix keeps serving a half-closed connection, so that request ends when the
    // upstream does, as a 504 written to nobody.)
    let body = chat("m", true).to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nx-mock-ttft-ms: 3000\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut early = TcpStream::connect(&addr).await.unwrap();
    early.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    socket2::SockRef::from(&early)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(early);
    let mut resp = http()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .header("x-mock-tokens", "5000")
        .header("x-mock-interval-ms", "2")
        .json(&chat("m", true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.chunk().await.unwrap();
    drop(resp);

    // A client that asks for a long fast stream and never reads: the gateway keeps serving
    // others meanwhile, and settles the stream once the client goes away.
    // A million tokens: ten choices of the mock's most (100,000 each, R44).
    let mut long = chat("m", true);
    long["n"] = json!(10);
    let long = long.to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nx-mock-tokens: 100000\r\nx-mock-interval-ms: 0\r\nContent-Length: {}\r\n\r\n{long}",
        long.len()
    );
    let mut stuck = TcpStream::connect(&addr).await.unwrap();
    let _ = socket2::SockRef::from(&stuck).set_recv_buffer_size(4096);
    stuck.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..5 {
        let t0 = Instant::now();
        assert_serves(&g).await;
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "slow: {:?}",
            t0.elapsed()
        );
    }
    drop(stuck);

    assert_serves(&g).await;
    let recs = g.assert_invariant1(&key_id, &[("credit", TOPUP)]).await;
    let disconnected = recs
        .iter()
        .filter(|r| r["status"] == "client_disconnected")
        .count();
    for r in &recs {
        eprintln!(
            "{} {} {} out={} cost={}",
            r["status"], r["http_status"], r["stream"], r["output_tokens"], r["cost"]
        );
    }
    assert!(
        disconnected >= 3,
        "want the three disconnects in the ledger, got {disconnected}"
    );
    g.assert_no_panic();
}

/// The soft limit on open files of this process (the gateway inherits it).
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(1024)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_idle_connections_are_served_around_and_released() {
    // 10,000 sockets here and 10,000 in the gateway: each process needs that many descriptors
    // plus headroom. Scale down when the limit (`ulimit -n`, inherited by the gateway) is lower.
    let limit = open_files_limit();
    let n = 10_000usize.min(limit.saturating_sub(1_000));
    if n < 10_000 {
        eprintln!("open-files limit {limit}: scaling the idle connections down to {n}");
    }
    let (g, _fake) = start("client_request_timeout_ms = 3000").await;
    let key_id = g.demo_key_id().await;
    let pid = g.pid().unwrap();
    let before = open_fds(pid);
    let addr = g.client_url.trim_start_matches("http://").to_string();

    let mut idle = Vec::with_capacity(n);
    let t0 = Instant::now();
    while idle.len() < n {
        let batch = (n - idle.len()).min(500);
        let conns =
            futures_util::future::join_all((0..batch).map(|_| TcpStream::connect(addr.as_str())))
                .await;
        for c in conns {
            idle.push(c.unwrap());
        }
    }
    eprintln!("{n} idle connections in {:?}", t0.elapsed());
    // Served meanwhile, promptly.
    let t1 = Instant::now();
    assert_serves(&g).await;
    assert!(
        t1.elapsed() < Duration::from_secs(5),
        "slow: {:?}",
        t1.elapsed()
    );
    let during = open_fds(pid);
    eprintln!("gateway fds: {before} before, {during} with the idle connections");

    // Released: the gateway closes every connection that sent no request head in time.
    let closed = futures_util::future::join_all(idle.into_iter().map(|mut s| async move {
        let mut b = [0u8; 256];
        matches!(
            tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await,
            Ok(())
        )
    }))
    .await;
    let released = closed.iter().filter(|c| **c).count();
    assert_eq!(
        released,
        n,
        "the gateway kept {} idle connections",
        n - released
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) > before + 50 {
        assert!(
            Instant::now() < deadline,
            "gateway fds stay at {} (were {before})",
            open_fds(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_serves(&g).await;
    g.assert_invariant1(&key_id, &[("credit", TOPUP)]).await;
    g.assert_no_panic();
}
