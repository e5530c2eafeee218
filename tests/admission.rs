//! Admission and forwarding bounds end to end: the order of the cheap checks (R41), rejected
//! requests counted against `rpm` with bounded record fields, `tpm` on billed tokens (R39), the
//! held bound forwarded as a non-stream's max tokens (R8), provider 401/403 as route failures
//! (R17), the whole-body deadline, and a non-stream request whose client leaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};

fn start(key_extra: &str, credit: &str) -> Gateway {
    Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body(key_extra, credit, "1"),
        data_dir: None,
    })
}

fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "12345678"}]})
}

async fn post(g: &Gateway, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut rb = g
        .client()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().await.unwrap()
}

fn request_id(r: &reqwest::Response) -> String {
    r.headers()["x-tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_string()
}

/// The ledger record of a request, waiting for the writer (bounded).
async fn record(g: &Gateway, rid: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = g.admin_get(&format!("/admin/ledger/{rid}")).await;
        if s == 200 {
            return v;
        }
        assert!(Instant::now() < deadline, "no ledger record for {rid}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The body the mock `id` received last.
async fn last_body(g: &Gateway, id: &str) -> Value {
    let v: Value = g
        .client()
        .get(format!("{}/_mock/last", g.mock_url(id)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["body"].clone()
}

async fn topup(g: &Gateway, key_id: &str, amount: &str) {
    let (s, v) = g
        .admin_post(
            &format!("/admin/keys/{key_id}/topup"),
            json!({"bucket": "credit", "amount": amount}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
}

/// Writes `head` then `body_part` on a raw connection and reads the answer until the server
/// closes or `limit` passes; returns the answer and when it started arriving.
fn raw_answer(addr: &str, head: &str, body_part: &[u8], limit: Duration) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).unwrap();
    let t0 = Instant::now();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body_part).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut out = Vec::new();
    let mut first = None;
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                first.get_or_insert(t0.elapsed());
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
                    break;
                }
            }
            Err(_) => {}
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        first.unwrap_or(limit),
    )
}

// R8: a non-stream request forwards the tokens its hold pays for as its max tokens when the
// grant is partial or the client set none, in the field the client used.
#[tokio::test]
async fn non_stream_requests_forward_the_held_bound_as_max_tokens() {
    // Input 2 tokens at 1/M, output 2/M per token: 12e-6 pays the input and 5 output tokens.
    let g = start("", "0.000012");
    let key = g.demo_key_id().await;

    // No max tokens, partial grant: max_tokens 5 forwarded; the mock would have sent 8.
    let r = post(&g, &hello("m"), &[]).await;
    assert_eq!(r.status(), 200);
    let rid = request_id(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    let sent = last_body(&g, "p1").await;
    assert_eq!(sent["max_tokens"], 5, "{sent}");
    assert!(sent.get("max_completion_tokens").is_none(), "{sent}");
    let rec = record(&g, &rid).await;
    assert_eq!(rec["output_tokens"], 5, "{rec}");
    assert_eq!(dec(&rec["cost"]), Decimal::new(12, 6), "{rec}");
    assert_eq!(dec(&rec["shortfall"]), Decimal::ZERO, "{rec}");

    // The client's max_completion_tokens (500) on a partial grant: lowered to what is held, in
    // that field.
    topup(&g, &key, "0.000012").await;
    let mut b = hello("m");
    b["max_completion_tokens"] = json!(500);
    let r = post(&g, &b, &[]).await;
    assert_eq!(r.status(), 200);
    let sent = last_body(&g, "p1").await;
    assert_eq!(sent["max_completion_tokens"], 5, "{sent}");
    assert!(sent.get("max_tokens").is_none(), "{sent}");

    // n = 2: per choice, floor(10e-6 / (2 × 2e-6)) = 2.
    topup(&g, &key, "0.000012").await;
    let mut b = hello("m");
    b["n"] = json!(2);
    let r = post(&g, &b, &[]).await;
    assert_eq!(r.status(), 200);
    let rid = request_id(&r);
    assert_eq!(last_body(&g, "p1").await["max_tokens"], 2);
    let rec = record(&g, &rid).await;
    assert_eq!(rec["output_tokens"], 4, "{rec}");
    assert_eq!(dec(&rec["shortfall"]), Decimal::ZERO, "{rec}");

    // Funded: the client's own bound is forwarded as sent...
    topup(&g, &key, "1").await;
    let mut b = hello("m");
    b["max_tokens"] = json!(3);
    assert_eq!(post(&g, &b, &[]).await.status(), 200);
    let sent = last_body(&g, "p1").await;
    assert_eq!(sent["max_tokens"], 3, "{sent}");
    // ...and without one, the default bound the hold was sized from.
    assert_eq!(post(&g, &hello("m"), &[]).await.status(), 200);
    assert_eq!(last_body(&g, "p1").await["max_tokens"], 4096);
    // Streams are cut token by token: forwarded as sent.
    let mut b = hello("m");
    b["stream"] = json!(true);
    let r = post(&g, &b, &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(sse_events(r).await.last().unwrap(), "[DONE]");
    assert!(last_body(&g, "p1").await.get("max_tokens").is_none());
}

// R39: tpm counts billed input + output; the admission estimate is replaced at settlement.
#[tokio::test]
async fn tokens_per_minute_counts_billed_tokens_not_the_estimate() {
    // o200k_base estimates "12345678" as 3 tokens + 3 per message + 3 = 9 input tokens; the
    // upstream bills 2 (its own count) + 5 output = 7. tpm = 60 admits 9 requests (63 ≥ 60
    // after the ninth); counting the estimate (14 a request) would refuse the sixth.
    let body = two_bucket_body(
        r#"
[[models]]
name = "m"
tokenizer = "o200k_base"
routes = [
  { provider = "p1", upstream_model = "up-m1", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
]
"#,
        "tpm = 60",
        "1",
        "1",
    );
    let g = Gateway::start(Setup {
        mocks: vec![("p1", "")],
        body,
        data_dir: None,
    });
    let mut billed = Vec::new();
    let refused = loop {
        let mut b = hello("m");
        b["stream"] = json!(billed.len() % 2 == 1);
        let r = post(&g, &b, &[("x-mock-tokens", "5")]).await;
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
        let rid = request_id(&r);
        let _ = r.bytes().await.unwrap();
        let rec = record(&g, &rid).await;
        assert_eq!(rec["usage_source"], "upstream", "{rec}");
        billed.push(rec["input_tokens"].as_u64().unwrap() + rec["output_tokens"].as_u64().unwrap());
        assert!(billed.len() <= 20, "never refused: {billed:?}");
    };
    assert!(billed.iter().all(|&b| b == 7), "{billed:?}");
    assert_eq!(billed.len(), 9, "{billed:?}");
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("60 tokens per minute"),
        "{v}"
    );
}

// R41: refused requests (404, 403, 429) count against rpm, and their records hold bounded
// values from the client.
#[tokio::test]
async fn rejected_requests_count_against_rpm_and_store_bounded_values() {
    let g = start("rpm = 4\nmodels = [\"m\"]", "1");
    let long = "x".repeat(10_000);
    let r = post(&g, &hello(&long), &[]).await;
    assert_eq!(r.status(), 404);
    let rid = request_id(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.len() < 1000,
        "the message echoes the whole model: {}",
        msg.len()
    );
    let rec = record(&g, &rid).await;
    assert_eq!(rec["status"], "rejected", "{rec}");
    assert_eq!(rec["requested_model"], "x".repeat(256));

    let mut b = hello("emb");
    b["input"] = json!("hi");
    let r = g
        .client()
        .post(format!("{}/v1/embeddings", g.client_url))
        .bearer_auth(DEMO_KEY)
        .json(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    for _ in 0..2 {
        assert_eq!(post(&g, &hello("m"), &[]).await.status(), 200);
    }
    // 404 + 403 + 2 served = 4: the fifth is refused.
    let r = post(&g, &hello("m"), &[]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(g.mock_stats("p1").await["chat_requests"], 2);
}

// R41: authentication, rpm and concurrency come before the body is read or parsed.
#[tokio::test]
async fn rate_limits_are_checked_before_the_body_is_read() {
    let g = Gateway::start_with_server(
        Setup {
            mocks: vec![("p1", ""), ("p2", "")],
            body: standard_body("rpm = 1\nmax_concurrent_streams = 1", "1", "1"),
            data_dir: None,
        },
        "client_request_timeout_ms = 3000",
    );
    assert_eq!(post(&g, &hello("m"), &[]).await.status(), 200);
    // Over rpm, an unparsable body is refused for the rate, not read as JSON.
    let r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
    // A body that never arrives: 429 at once, not 408 after the body deadline.
    let addr = g.client_url.trim_start_matches("http://").to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {DEMO_KEY}\r\nContent-Length: 1000\r\n\r\n"
    );
    let (text, after) = tokio::task::spawn_blocking(move || {
        raw_answer(&addr, &head, b"{\"model\":", Duration::from_secs(5))
    })
    .await
    .unwrap();
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(text.contains("rate_limited"), "{text}");
    assert!(after < Duration::from_millis(1500), "{after:?}");
    // Unauthenticated requests are 401 whatever the limits.
    let r = g
        .client()
        .post(g.chat_url())
        .bearer_auth("tg-wrong")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

// R41: with the key's streams at their limit, a stream is refused and a non-stream served.
#[tokio::test]
async fn concurrency_refuses_streams_only() {
    let g = start("max_concurrent_streams = 1", "1");
    let mut b = hello("m");
    b["stream"] = json!(true);
    let open = post(
        &g,
        &b,
        &[("x-mock-tokens", "200"), ("x-mock-interval-ms", "20")],
    )
    .await;
    assert_eq!(open.status(), 200);
    let r = post(&g, &b, &[]).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 concurrent streams"),
        "{v}"
    );
    assert_eq!(post(&g, &hello("m"), &[]).await.status(), 200);
    drop(open);
}

// R17: a provider 401/403 is a route failure: no retry on the route, fallback, a breaker
// failure, never passed through; when every route refuses, 502 naming the routes.
#[tokio::test]
async fn provider_auth_errors_fall_back_and_count_against_the_breaker() {
    let g = start("allow_cross_bucket_fallback = true", "1");
    g.mock_options("p1", json!({"fault": "401"})).await;
    let r = post(&g, &hello("m"), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-route"], "m/p2");
    assert_eq!(r.headers()["x-tollgate-fallbacks"], "1");
    let rid = request_id(&r);
    let rec = record(&g, &rid).await;
    let outcomes: Vec<(String, String)> = rec["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["route"].as_str().unwrap().to_string(),
                a["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("m/p1".to_string(), "http_401".to_string()),
            ("m/p2".to_string(), "ok".to_string())
        ],
        "{rec}"
    );
    // One attempt on p1 (no retry), counted by its breaker.
    assert_eq!(g.mock_stats("p1").await["chat_requests"], 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, v) = g.admin_get("/admin/routes").await;
        let p1 = v["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["route"] == "m/p1")
            .unwrap()
            .clone();
        if p1["consecutive_failures"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no breaker failure: {p1}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Every route refuses the gateway's credentials: 502 naming both routes.
    g.mock_options("p2", json!({"fault": "403"})).await;
    let r = post(&g, &hello("m"), &[]).await;
    assert_eq!(r.status(), 502);
    let rid = request_id(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "upstream_error", "{v}");
    assert_eq!(v["error"]["code"], "upstream_error", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("m/p1") && msg.contains("m/p2"), "{msg}");
    assert!(msg.contains("credentials"), "{msg}");
    let rec = record(&g, &rid).await;
    assert_eq!(rec["status"], "upstream_error", "{rec}");
    assert_eq!(rec["http_status"], 502, "{rec}");
}

// A body dripped one byte at a time is cut by the whole-body deadline with 408.
#[tokio::test]
async fn a_dripped_body_is_cut_at_the_request_deadline() {
    let g = Gateway::start_with_server(
        Setup {
            mocks: vec![("p1", ""), ("p2", "")],
            body: standard_body("", "1", "1"),
            data_dir: None,
        },
        "client_request_timeout_ms = 1000",
    );
    let addr = g.client_url.trim_start_matches("http://").to_string();
    let (text, elapsed) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        let t0 = Instant::now();
        s.write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {DEMO_KEY}\r\nContent-Length: 1000\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // One byte every 200 ms (each well within the deadline), for at most 5 s.
        while t0.elapsed() < Duration::from_secs(5) {
            if s.write_all(b" ").is_err() {
                break;
            }
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.ends_with(b"}") {
                        break;
                    }
                }
                Err(_) => {}
            }
        }
        (String::from_utf8_lossy(&out).into_owned(), t0.elapsed())
    })
    .await
    .unwrap();
    assert!(text.starts_with("HTTP/1.1 408"), "{elapsed:?}: {text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(elapsed < Duration::from_millis(2000), "{elapsed:?}");
}

// A non-stream request whose client leaves while the upstream works: the upstream call is
// dropped and the hold released at once, and the record says `client_disconnected`.
#[tokio::test]
async fn a_non_stream_client_that_leaves_releases_its_hold() {
    let g = start("", "1");
    let key = g.demo_key_id().await;
    let client = bounded_client(Duration::from_millis(500));
    let t0 = Instant::now();
    let r = client
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .header("x-mock-ttft-ms", "8000")
        .json(&hello("m"))
        .send()
        .await;
    assert!(r.is_err(), "the client should have timed out");
    let deadline = t0 + Duration::from_secs(3);
    loop {
        let w = g.wallet_view(&key).await;
        if w["credit"].1.is_zero() {
            break;
        }
        assert!(Instant::now() < deadline, "hold kept: {w:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let rec = loop {
        let recs = g.all_records("").await;
        if let Some(r) = recs
            .into_iter()
            .find(|r| r["status"] == "client_disconnected")
        {
            break r;
        }
        assert!(Instant::now() < deadline, "no client_disconnected record");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert_eq!(dec(&rec["cost"]), Decimal::ZERO, "{rec}");
    assert!(rec["duration_ms"].as_u64().unwrap() < 3000, "{rec}");
    // The upstream request was dropped: the mock's only open connection is the one asking for
    // its stats, long before it would have answered.
    loop {
        let s = g.mock_stats("p1").await;
        if s["open_connections"] == 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "upstream still open: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing is left for a shutdown to wait for (its drain is 30 s; the mock answers at 8 s).
    g.assert_no_panic();
    let mut g = g;
    let t1 = Instant::now();
    let code = tokio::task::spawn_blocking(move || g.terminate())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    assert!(t1.elapsed() < Duration::from_secs(3), "{:?}", t1.elapsed());
}

// A client that half-closes its connection before the first token (shuts its sending side and
// waits) is treated as gone: the client listener keeps no half-closed connection, so the stream
// is dropped, its hold released and its record written as `client_disconnected`.
#[tokio::test]
async fn a_client_that_half_closes_before_the_first_token_is_gone() {
    let g = start("", "1");
    let key = g.demo_key_id().await;
    let addr = g.client_url.trim_start_matches("http://").to_string();
    let body = json!({"model": "m", "stream": true,
        "messages": [{"role": "user", "content": "12345678"}]})
    .to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {DEMO_KEY}\r\nx-mock-ttft-ms: 8000\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let t0 = Instant::now();
    let (text, closed) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        // Let the request reach the upstream, then close the sending side.
        std::thread::sleep(Duration::from_millis(300));
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        (String::from_utf8_lossy(&out).into_owned(), Instant::now())
    })
    .await
    .unwrap();
    assert!(text.is_empty(), "{text}");
    assert!(closed - t0 < Duration::from_secs(2), "{:?}", closed - t0);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let w = g.wallet_view(&key).await;
        if w["credit"].1.is_zero() {
            break;
        }
        assert!(Instant::now() < deadline, "hold kept: {w:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let recs = g.all_records("").await;
        if let Some(r) = recs.iter().find(|r| r["status"] == "client_disconnected") {
            assert_eq!(r["stream"], true, "{r}");
            assert_eq!(dec(&r["cost"]), Decimal::ZERO, "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "no client_disconnected record");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}
