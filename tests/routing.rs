//! End-to-end routing tests (R13–R20, R24): retries with backoff and
//! `Retry-After`, fallback, the cross-bucket policy, passthrough of upstream 4xx, the circuit
//! breaker and probes, the retry budget, and streams that break before or after their first token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};

/// Every client request is bounded.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

fn start(mocks: Vec<(&'static str, &'static str)>, body: String) -> Gateway {
    Gateway::start(Setup {
        mocks,
        body,
        data_dir: None,
    })
}

/// Two mocks, the standard body, both buckets funded.
fn standard(key_extra: &str, p1_extra: &'static str, p2_extra: &'static str) -> Gateway {
    start(
        vec![("p1", p1_extra), ("p2", p2_extra)],
        standard_body(key_extra, "10", "10"),
    )
}

/// A custom body: buckets, the given `[[models]]` text, the demo key (cross-bucket allowed).
fn body_with(extra: &str) -> String {
    two_bucket_body(extra, "allow_cross_bucket_fallback = true", "10", "10")
}

async fn chat(g: &Gateway, model: &str, stream: bool) -> reqwest::Response {
    g.client()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .timeout(REQUEST_TIMEOUT)
        .json(&json!({"model": model, "stream": stream,
            "messages": [{"role": "user", "content": "12345678"}]}))
        .send()
        .await
        .unwrap()
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
        .to_string()
}

/// The ledger record of a request, waiting for the writer's flush.
async fn record(g: &Gateway, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = g.admin_get(&format!("/admin/ledger/{request_id}")).await;
        if s == 200 {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no ledger record for {request_id}: {s} {v}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `(route, retry, outcome)` of every attempt of a record.
fn attempts(rec: &Value) -> Vec<(String, u64, String)> {
    rec["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["route"].as_str().unwrap().to_string(),
                a["retry"].as_u64().unwrap(),
                a["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn att(route: &str, retry: u64, outcome: &str) -> (String, u64, String) {
    (route.to_string(), retry, outcome.to_string())
}

/// Chat completion requests a mock has received.
async fn chat_requests(g: &Gateway, mock: &str) -> u64 {
    g.mock_stats(mock).await["chat_requests"].as_u64().unwrap()
}

/// One route of `/admin/routes`.
async fn route_view(g: &Gateway, id: &str) -> Value {
    let (s, v) = g.admin_get("/admin/routes").await;
    assert_eq!(s, 200, "{v}");
    v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == id)
        .unwrap_or_else(|| panic!("route {id} not in {v}"))
        .clone()
}

/// Polls a route until `pred` holds (bounded).
async fn wait_route(g: &Gateway, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = route_view(g, id).await;
        if pred(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "route {id} never {what}: {r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn per_mtok(tokens: u64, price: &str) -> Decimal {
    Decimal::from(tokens) * price.parse::<Decimal>().unwrap() / Decimal::from(1_000_000)
}

// 1. Primary 500 → retried once → cross-bucket fallback to m/p2, billed in p2's bucket.
#[tokio::test]
async fn primary_500_falls_back_across_buckets_and_bills_the_backup() {
    let g = standard("allow_cross_bucket_fallback = true", "", "");
    g.mock_options("p1", json!({"fault": "500"})).await;
    for stream in [false, true] {
        let r = chat(&g, "m", stream).await;
        assert_eq!(r.status(), 200, "stream={stream}");
        assert_eq!(header(&r, "x-tollgate-route"), "m/p2");
        assert_eq!(header(&r, "x-tollgate-fallbacks"), "1");
        assert_eq!(header(&r, "x-tollgate-retries"), "1");
        assert_eq!(header(&r, "x-tollgate-bucket"), "routed");
        let id = header(&r, "x-tollgate-request-id");
        if stream {
            let events = sse_events(r).await;
            assert_eq!(events.last().unwrap(), "[DONE]");
        } else {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["tollgate"]["route"], "m/p2");
        }
        let rec = record(&g, &id).await;
        assert_eq!(
            attempts(&rec),
            vec![
                att("m/p1", 0, "http_500"),
                att("m/p1", 1, "http_500"),
                att("m/p2", 0, "ok")
            ],
            "stream={stream}: {rec}"
        );
        assert_eq!(rec["attempts"][0]["http_status"], 500);
        assert_eq!(rec["status"], "completed");
        assert_eq!(rec["route"], "m/p2");
        assert_eq!(rec["bucket"], "routed");
        assert_eq!(rec["currency"], "CNY");
        assert_eq!(rec["fallbacks"], 1);
        assert_eq!(rec["retries"], 1);
        // 8 bytes → 2 input tokens; the mock streams 8 tokens; m/p2 prices: 3 in / 4 out.
        assert_eq!(rec["input_tokens"], 2, "{rec}");
        assert_eq!(rec["output_tokens"], 8, "{rec}");
        assert_eq!(
            dec(&rec["cost"]),
            per_mtok(2, "3") + per_mtok(8, "4"),
            "{rec}"
        );
    }
    // Nothing was charged to the primary's bucket.
    let (_, w) = g
        .admin_get(&format!("/admin/keys/{}/wallet", g.demo_key_id().await))
        .await;
    assert_eq!(dec(&w["buckets"]["credit"]["balance"]), Decimal::from(10));
    assert_eq!(
        dec(&w["buckets"]["routed"]["balance"]),
        Decimal::from(10) - (per_mtok(2, "3") + per_mtok(8, "4")) * Decimal::from(2)
    );
}

// 2. Retry-After within backoff_max_ms is waited for; beyond it the route is left at once.
#[tokio::test]
async fn retry_after_is_honoured_up_to_backoff_max() {
    let g = start(
        vec![("p1", ""), ("p2", "")],
        body_with(
            r#"
[[models]]
name = "solo"
tokenizer = "chunks"
retry = { max_retries = 1, backoff_base_ms = 5, backoff_max_ms = 2000 }
routes = [
  { provider = "p1", upstream_model = "up-m1", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
]

[[models]]
name = "m"
tokenizer = "chunks"
retry = { max_retries = 1, backoff_base_ms = 5, backoff_max_ms = 2000 }
routes = [
  { provider = "p1", upstream_model = "up-m1", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
  { provider = "p2", upstream_model = "up-m2", bucket = "credit", input_per_mtok = "3", output_per_mtok = "4" },
]
"#,
        ),
    );

    // Retry-After: 1 (≤ 2000 ms): the gateway waits ~1 s and retries the same route, which has
    // recovered by then.
    g.mock_options("p1", json!({"fault": "429:1"})).await;
    let t0 = Instant::now();
    let clear = {
        let url = format!("{}/_mock/options", g.mock_url("p1"));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            reqwest::Client::new()
                .post(url)
                .timeout(REQUEST_TIMEOUT)
                .json(&json!({"fault": null}))
                .send()
                .await
                .unwrap();
        })
    };
    let r = chat(&g, "solo", false).await;
    let elapsed = t0.elapsed();
    clear.await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        elapsed >= Duration::from_millis(950),
        "retried after {elapsed:?}, before Retry-After"
    );
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    assert_eq!(header(&r, "x-tollgate-route"), "solo/p1");
    assert_eq!(header(&r, "x-tollgate-retries"), "1");
    assert_eq!(header(&r, "x-tollgate-fallbacks"), "0");
    let rec = record(&g, &header(&r, "x-tollgate-request-id")).await;
    assert_eq!(
        attempts(&rec),
        vec![att("solo/p1", 0, "http_429"), att("solo/p1", 1, "ok")]
    );

    // Retry-After: 5 (> 2000 ms): no wait, no retry on p1, straight to the backup.
    g.mock_options("p1", json!({"fault": "429:5"})).await;
    let t0 = Instant::now();
    let r = chat(&g, "m", false).await;
    let elapsed = t0.elapsed();
    assert_eq!(r.status(), 200);
    assert!(
        elapsed < Duration::from_millis(1500),
        "fallback took {elapsed:?}"
    );
    assert_eq!(header(&r, "x-tollgate-route"), "m/p2");
    assert_eq!(header(&r, "x-tollgate-fallbacks"), "1");
    assert_eq!(header(&r, "x-tollgate-retries"), "0");
    let rec = record(&g, &header(&r, "x-tollgate-request-id")).await;
    assert_eq!(
        attempts(&rec),
        vec![att("m/p1", 0, "http_429"), att("m/p2", 0, "ok")]
    );

    // Same on a single-route model: it fails fast instead of sleeping 5 s.
    let t0 = Instant::now();
    let r = chat(&g, "solo", false).await;
    assert_eq!(r.status(), 502);
    assert!(t0.elapsed() < Duration::from_millis(1500));
}

// 3. A non-retriable upstream 4xx passes through, without retry or fallback.
#[tokio::test]
async fn upstream_400_is_passed_through_without_fallback() {
    let g = standard("allow_cross_bucket_fallback = true", "", "");
    g.mock_options("p1", json!({"fault": "400"})).await;
    for stream in [false, true] {
        let p1_before = chat_requests(&g, "p1").await;
        let r = chat(&g, "m", stream).await;
        assert_eq!(r.status(), 400, "stream={stream}");
        let id = header(&r, "x-tollgate-request-id");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["message"], "mock fault 400", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(
            chat_requests(&g, "p1").await,
            p1_before + 1,
            "retried a 400"
        );
        let rec = record(&g, &id).await;
        assert_eq!(rec["status"], "upstream_error", "{rec}");
        assert_eq!(rec["http_status"], 400);
        assert_eq!(rec["fallbacks"], 0);
        assert_eq!(rec["retries"], 0);
        assert_eq!(attempts(&rec), vec![att("m/p1", 0, "http_400")]);
        assert_eq!(rec["cost"], "0");
    }
    assert_eq!(chat_requests(&g, "p2").await, 0, "fell back after a 400");
}

// 4. Without allow_cross_bucket_fallback the backup in another bucket is not tried (R13).
#[tokio::test]
async fn cross_bucket_fallback_is_denied_by_default() {
    let g = standard("", "", "");
    g.mock_options("p1", json!({"fault": "500"})).await;
    let r = chat(&g, "m", false).await;
    assert_eq!(r.status(), 502);
    let id = header(&r, "x-tollgate-request-id");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "upstream_error", "{body}");
    assert_eq!(body["error"]["code"], "upstream_error", "{body}");
    let rec = record(&g, &id).await;
    assert_eq!(rec["status"], "upstream_error");
    assert_eq!(
        attempts(&rec),
        vec![
            att("m/p1", 0, "http_500"),
            att("m/p1", 1, "http_500"),
            att("m/p2", 0, "cross_bucket_denied")
        ],
        "{rec}"
    );
    assert_eq!(rec["cost"], "0");
    assert_eq!(chat_requests(&g, "p2").await, 0);
}

// 5. The breaker opens after failure_threshold failures, skips the route while open, and a
// half-open trial closes it again. Probes report their result.
#[tokio::test]
async fn breaker_opens_skips_and_recovers_through_a_trial() {
    let g = standard(
        "allow_cross_bucket_fallback = true",
        "circuit = { failure_threshold = 3, failure_rate = 0.5, window_s = 10, min_requests = 100, open_ms = 1000, max_open_ms = 4000 }",
        "",
    );
    g.mock_options("p1", json!({"fault": "500"})).await;
    // Two requests make four failing attempts on p1 (two each); the third failure opens it.
    for _ in 0..2 {
        let r = chat(&g, "m", false).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-tollgate-route"), "m/p2");
    }
    let view = wait_route(&g, "m/p1", "opened", |r| r["state"] == "open").await;
    assert!(view["open_until"].is_string(), "{view}");
    assert!(view["last_failure"]["reason"].is_string(), "{view}");
    let p1_before = chat_requests(&g, "p1").await;
    assert!(p1_before >= 3, "{p1_before}");
    // While open, requests skip p1 (open for 1 s; these take a few ms each).
    for _ in 0..3 {
        let r = chat(&g, "m", false).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-tollgate-route"), "m/p2");
        // A skipped route is no fallback (R20).
        assert_eq!(header(&r, "x-tollgate-fallbacks"), "0");
        assert_eq!(header(&r, "x-tollgate-retries"), "0");
        let rec = record(&g, &header(&r, "x-tollgate-request-id")).await;
        assert_eq!(
            attempts(&rec),
            vec![att("m/p1", 0, "circuit_open"), att("m/p2", 0, "ok")],
            "{rec}"
        );
    }
    assert_eq!(
        chat_requests(&g, "p1").await,
        p1_before,
        "open breaker let a request through"
    );
    assert_eq!(route_view(&g, "m/p1").await["state"], "open");

    // Recovery: the fault is gone; after open_ms one trial request reaches p1 and closes it.
    g.mock_options("p1", json!({"fault": null})).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = chat(&g, "m", false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tollgate-route"), "m/p1");
    assert_eq!(chat_requests(&g, "p1").await, p1_before + 1);
    wait_route(&g, "m/p1", "closed", |r| r["state"] == "closed").await;
    let r = chat(&g, "m", true).await;
    assert_eq!(header(&r, "x-tollgate-route"), "m/p1");
    assert_eq!(sse_events(r).await.last().unwrap(), "[DONE]");
    assert_eq!(chat_requests(&g, "p1").await, p1_before + 2);
    assert_eq!(route_view(&g, "m/p1").await["consecutive_failures"], 0);
}

#[tokio::test]
async fn probes_report_their_result_and_can_close_a_breaker() {
    let g = standard(
        "allow_cross_bucket_fallback = true",
        r#"probe = { interval_ms = 200, kind = "models" }
circuit = { failure_threshold = 2, min_requests = 1000, open_ms = 400, max_open_ms = 800 }"#,
        "",
    );
    // The built-in mock lists its routes' upstream models: the probe succeeds.
    let view = wait_route(&g, "m/p1", "probed ok", |r| r["last_probe"]["ok"] == true).await;
    assert!(view["last_probe"]["at"].is_string(), "{view}");
    assert!(view["last_probe"]["latency_ms"].is_u64(), "{view}");
    assert_eq!(view["state"], "closed");
    // p2 has no probe.
    assert!(route_view(&g, "m/p2").await["last_probe"].is_null());

    // The upstream stops listing up-m1: probes fail with a reason, and feed the breaker (R19).
    g.mock_options("p1", json!({"models": ["something-else"]}))
        .await;
    let view = wait_route(&g, "m/p1", "probed failing", |r| {
        r["last_probe"]["ok"] == false
    })
    .await;
    assert!(
        view["last_failure"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("up-m1 not listed"),
        "{view}"
    );
    wait_route(&g, "m/p1", "opened by probes", |r| r["state"] == "open").await;

    // The model is listed again: a probe takes the half-open trial and closes the breaker,
    // with no client request at all.
    g.mock_options("p1", json!({"models": ["up-m1", "up-emb"]}))
        .await;
    let view = wait_route(&g, "m/p1", "closed by a probe", |r| r["state"] == "closed").await;
    assert_eq!(view["last_probe"]["ok"], true, "{view}");
    assert_eq!(chat_requests(&g, "p1").await, 0);
    // Probes spend nothing and leave no ledger record.
    assert!(g.all_records("").await.is_empty());
    let (_, w) = g
        .admin_get(&format!("/admin/keys/{}/wallet", g.demo_key_id().await))
        .await;
    assert_eq!(dec(&w["buckets"]["credit"]["balance"]), Decimal::from(10));
}

// 6. The retry budget bounds extra attempts gateway-wide (R18).
#[tokio::test]
async fn retry_budget_bounds_extra_attempts() {
    const REQUESTS: u64 = 50;
    const NO_TRIP: &str = "circuit = { failure_threshold = 100000, min_requests = 100000 }";
    let g = start(
        vec![("p1", NO_TRIP), ("p2", NO_TRIP)],
        body_with(
            r#"
[routing]
retry_budget_ratio = 0.1
retry_budget_min_per_s = 1

[[models]]
name = "b"
tokenizer = "chunks"
retry = { max_retries = 3, backoff_base_ms = 2, backoff_max_ms = 10 }
routes = [
  { provider = "p1", upstream_model = "up-m1", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
  { provider = "p2", upstream_model = "up-m2", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
]
"#,
        ),
    );
    g.mock_options("p1", json!({"fault": "500"})).await;
    g.mock_options("p2", json!({"fault": "500"})).await;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let client = g.client();
        let url = g.chat_url();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..REQUESTS / 5 {
                let r = client
                    .post(&url)
                    .bearer_auth(DEMO_KEY)
                    .timeout(REQUEST_TIMEOUT)
                    .json(&json!({"model": "b", "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 502);
                ids.push(header(&r, "x-tollgate-request-id"));
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    // The budget's window is 10 s; the run must fit in it for the bound below to be exact.
    assert!(t0.elapsed() < Duration::from_secs(9), "{:?}", t0.elapsed());
    let sent = chat_requests(&g, "p1").await + chat_requests(&g, "p2").await;
    // Without the budget: 8 attempts per request (4 per route). With it: 50 first attempts and
    // at most 0.1 × 50 + 1 × 10 extra ones.
    let bound = REQUESTS + REQUESTS / 10 + 10;
    assert!(sent <= bound, "{sent} upstream attempts > {bound}");
    assert!(sent > REQUESTS, "no retries at all: {sent}");
    let mut exhausted = 0;
    let mut recorded_sent = 0;
    for id in &ids {
        let rec = record(&g, id).await;
        assert_eq!(rec["status"], "upstream_error");
        let a = attempts(&rec);
        recorded_sent += a.iter().filter(|(_, _, o)| o.starts_with("http_")).count() as u64;
        if a.iter().any(|(_, _, o)| o == "retry_budget_exhausted") {
            exhausted += 1;
            assert_eq!(a.last().unwrap().2, "retry_budget_exhausted", "{rec}");
        }
    }
    assert!(exhausted > 0, "no record shows retry_budget_exhausted");
    assert_eq!(
        recorded_sent, sent,
        "ledger attempts and upstream requests differ"
    );
}

// 7. A break after the first token ends the stream with an error event; no fallback (docs/api.md).
#[tokio::test]
async fn mid_stream_reset_ends_with_an_error_event_and_bills_delivered_tokens() {
    let g = standard("allow_cross_bucket_fallback = true", "", "");
    g.mock_options("p1", json!({"fault": "reset-after:3"}))
        .await;
    let r = chat(&g, "m", true).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tollgate-route"), "m/p1");
    assert_eq!(header(&r, "x-tollgate-fallbacks"), "0");
    let id = header(&r, "x-tollgate-request-id");
    let events = sse_events(r).await;
    let n = events.len();
    assert!(n >= 5, "{events:?}");
    assert_eq!(events[n - 1], "[DONE]");
    let err: Value = serde_json::from_str(&events[n - 2]).unwrap();
    assert_eq!(err["error"]["type"], "upstream_error", "{err}");
    assert_eq!(err["error"]["code"], "upstream_stream_error", "{err}");
    let content: Vec<String> = events[..n - 2]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(content.len(), 3, "{events:?}");
    assert_eq!(
        chat_requests(&g, "p1").await,
        1,
        "retried after the first token"
    );
    assert_eq!(
        chat_requests(&g, "p2").await,
        0,
        "fell back after the first token"
    );
    let rec = record(&g, &id).await;
    assert_eq!(rec["status"], "upstream_error", "{rec}");
    assert_eq!(rec["output_tokens"], 3, "{rec}");
    assert_eq!(rec["output_tokens_delivered"], 3, "{rec}");
    assert_eq!(rec["input_tokens"], 2, "{rec}");
    assert_eq!(rec["usage_source"], "counted", "{rec}");
    assert_eq!(rec["bucket"], "credit");
    assert_eq!(
        dec(&rec["cost"]),
        per_mtok(2, "1") + per_mtok(3, "2"),
        "{rec}"
    );
    // The serving attempt broke after its first token: the ledger says so (R17).
    assert_eq!(
        attempts(&rec),
        vec![att("m/p1", 0, "stream_error")],
        "{rec}"
    );
}

// 8. A break before the first token is an ordinary retriable failure (R24).
#[tokio::test]
async fn reset_before_first_token_falls_back_cleanly() {
    let g = standard("allow_cross_bucket_fallback = true", "", "");
    g.mock_options("p1", json!({"fault": "reset-after:0"}))
        .await;
    let r = chat(&g, "m", true).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tollgate-route"), "m/p2");
    assert_eq!(header(&r, "x-tollgate-fallbacks"), "1");
    assert_eq!(header(&r, "x-tollgate-retries"), "1");
    let id = header(&r, "x-tollgate-request-id");
    let events = sse_events(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(
        events.iter().all(|e| !e.contains("\"error\"")),
        "{events:?}"
    );
    let rec = record(&g, &id).await;
    assert_eq!(rec["status"], "completed", "{rec}");
    assert_eq!(
        attempts(&rec),
        vec![
            att("m/p1", 0, "stream_error"),
            att("m/p1", 1, "stream_error"),
            att("m/p2", 0, "ok")
        ],
        "{rec}"
    );
    assert_eq!(rec["output_tokens"], 8);
    assert_eq!(
        dec(&rec["cost"]),
        per_mtok(2, "3") + per_mtok(8, "4"),
        "{rec}"
    );
}

// 9. Every route skipped because its breaker is open → 503 no_available_route (R14).
#[tokio::test]
async fn all_breakers_open_gives_503_no_available_route() {
    const TRIP: &str = "circuit = { failure_threshold = 2, open_ms = 30000, max_open_ms = 60000 }";
    let g = standard("allow_cross_bucket_fallback = true", TRIP, TRIP);
    g.mock_options("p1", json!({"fault": "500"})).await;
    g.mock_options("p2", json!({"fault": "503"})).await;
    let r = chat(&g, "m", false).await;
    assert_eq!(r.status(), 502);
    wait_route(&g, "m/p1", "opened", |r| r["state"] == "open").await;
    wait_route(&g, "m/p2", "opened", |r| r["state"] == "open").await;
    let sent = chat_requests(&g, "p1").await + chat_requests(&g, "p2").await;
    for stream in [false, true] {
        let r = chat(&g, "m", stream).await;
        assert_eq!(r.status(), 503);
        let id = header(&r, "x-tollgate-request-id");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["type"], "service_unavailable", "{body}");
        assert_eq!(body["error"]["code"], "no_available_route", "{body}");
        let rec = record(&g, &id).await;
        assert_eq!(rec["status"], "rejected", "{rec}");
        assert_eq!(rec["http_status"], 503);
        assert_eq!(rec["fallbacks"], 0);
        assert_eq!(
            attempts(&rec),
            vec![
                att("m/p1", 0, "circuit_open"),
                att("m/p2", 0, "circuit_open")
            ],
            "{rec}"
        );
    }
    assert_eq!(
        chat_requests(&g, "p1").await + chat_requests(&g, "p2").await,
        sent
    );
}

// Half-open admits exactly one trial; a failed trial re-opens for twice as long (R17).
#[tokio::test]
async fn half_open_admits_one_trial_and_a_failed_trial_doubles_open_time() {
    let g = standard(
        "allow_cross_bucket_fallback = true",
        "circuit = { failure_threshold = 1, min_requests = 1000, open_ms = 600, max_open_ms = 10000 }",
        "",
    );
    g.mock_options("p1", json!({"fault": "500"})).await;
    assert_eq!(chat(&g, "m", false).await.status(), 200);
    wait_route(&g, "m/p1", "opened", |r| r["state"] == "open").await;

    // p1 recovers but answers slowly, so the trial is still running when the others arrive.
    g.mock_options("p1", json!({"fault": null, "ttft_ms": 500}))
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = chat_requests(&g, "p1").await;
    let mut tasks = Vec::new();
    for i in 0..5u64 {
        let client = g.client();
        let url = g.chat_url();
        tasks.push(tokio::spawn(async move {
            // The first one goes ahead; the others follow while it waits for its first token.
            tokio::time::sleep(Duration::from_millis(if i == 0 { 0 } else { 100 })).await;
            let r = client
                .post(&url)
                .bearer_auth(DEMO_KEY)
                .timeout(REQUEST_TIMEOUT)
                .json(&json!({"model": "m", "stream": true,
                    "messages": [{"role": "user", "content": "12345678"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let route = header(&r, "x-tollgate-route");
            assert_eq!(sse_events(r).await.last().unwrap(), "[DONE]");
            route
        }));
    }
    let mut routes = Vec::new();
    for t in tasks {
        routes.push(t.await.unwrap());
    }
    assert_eq!(
        routes.iter().filter(|r| *r == "m/p1").count(),
        1,
        "half-open breaker admitted {routes:?}"
    );
    assert_eq!(chat_requests(&g, "p1").await, before + 1);
    wait_route(&g, "m/p1", "closed", |r| r["state"] == "closed").await;

    // Trip it again (600 ms), then fail the trial: open again for 1200 ms.
    g.mock_options("p1", json!({"fault": "500", "ttft_ms": 1}))
        .await;
    assert_eq!(chat(&g, "m", false).await.status(), 200);
    wait_route(&g, "m/p1", "opened", |r| r["state"] == "open").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = chat_requests(&g, "p1").await;
    let r = chat(&g, "m", false).await;
    assert_eq!(header(&r, "x-tollgate-route"), "m/p2");
    assert_eq!(chat_requests(&g, "p1").await, before + 1, "no trial");
    let reopened = Instant::now();
    wait_route(&g, "m/p1", "re-opened", |r| r["state"] == "open").await;
    tokio::time::sleep(Duration::from_millis(800).saturating_sub(reopened.elapsed())).await;
    // 800 ms after the failed trial: past the first open time, within the doubled one.
    let r = chat(&g, "m", false).await;
    assert_eq!(header(&r, "x-tollgate-route"), "m/p2");
    let rec = record(&g, &header(&r, "x-tollgate-request-id")).await;
    assert_eq!(attempts(&rec)[0], att("m/p1", 0, "circuit_open"), "{rec}");
    assert_eq!(chat_requests(&g, "p1").await, before + 1);
}

// Timeouts before the first token are retried; when every sent attempt timed out → 504.
#[tokio::test]
async fn first_token_timeouts_give_504_upstream_timeout() {
    let g = standard("", "first_token_timeout_ms = 300", "");
    // The upstream never answers (a non-stream request waits for its whole body, so the
    // first-token timeout applies to streams).
    g.mock_options("p1", json!({"fault": "hang"})).await;
    let t0 = Instant::now();
    let r = chat(&g, "m", true).await;
    let elapsed = t0.elapsed();
    assert_eq!(r.status(), 504);
    assert!(elapsed >= Duration::from_millis(550), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let id = header(&r, "x-tollgate-request-id");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "upstream_error", "{body}");
    assert_eq!(body["error"]["code"], "upstream_timeout", "{body}");
    let rec = record(&g, &id).await;
    assert_eq!(rec["status"], "upstream_error");
    assert_eq!(
        attempts(&rec),
        vec![
            att("m/p1", 0, "timeout"),
            att("m/p1", 1, "timeout"),
            att("m/p2", 0, "cross_bucket_denied")
        ],
        "{rec}"
    );

    // Headers arrive at once but the first token would take 5 s.
    g.mock_options("p1", json!({"fault": null, "ttft_ms": 5000}))
        .await;
    let t0 = Instant::now();
    let r = chat(&g, "m", true).await;
    assert_eq!(r.status(), 504);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let rec = record(&g, &header(&r, "x-tollgate-request-id")).await;
    assert_eq!(
        attempts(&rec)[..2],
        [att("m/p1", 0, "timeout"), att("m/p1", 1, "timeout")]
    );
    // The abandoned upstream requests were closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.mock_stats("p1").await["streams_cancelled"]
        .as_u64()
        .unwrap()
        < 2
    {
        assert!(Instant::now() < deadline, "{}", g.mock_stats("p1").await);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// R17 counts broken streams as breaker failures, a break after the first token included.
#[tokio::test]
async fn mid_stream_breaks_count_against_the_breaker() {
    let g = standard(
        "allow_cross_bucket_fallback = true",
        "circuit = { failure_threshold = 2, min_requests = 1000, open_ms = 30000 }",
        "",
    );
    g.mock_options("p1", json!({"fault": "reset-after:3"}))
        .await;
    for _ in 0..2 {
        let r = chat(&g, "m", true).await;
        assert_eq!(header(&r, "x-tollgate-route"), "m/p1");
        sse_events(r).await;
    }
    let view = wait_route(&g, "m/p1", "opened", |r| r["state"] == "open").await;
    assert_eq!(view["failures"], 2, "{view}");
}
