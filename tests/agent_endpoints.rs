//! The agent endpoints (`POST /v1/responses`, `POST /v1/messages`) end to end against the real
//! binary and built-in mocks that speak the OpenAI Responses and Anthropic Messages formats:
//! streams and complete answers with their `tollgate` object and ledger records, Anthropic's
//! error envelope for every error on `/v1/messages`, fallback before the first token, a break
//! after it, draining a wallet with concurrent streams, metrics, and `check-config` refusing a
//! route whose provider cannot speak its model's endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};

/// Responses model `r` on `p1` then `p2`, Messages model `c` on the Anthropic mocks `a1` then
/// `a2`, all in `credit`; the demo key funded with `credit` USD.
fn setup(credit: &str, settlement: &str) -> Setup<'static> {
    let models = format!(
        r#"
{settlement}

[[models]]
name = "r"
endpoints = ["responses"]
tokenizer = "chunks"
retry = {{ max_retries = 0, backoff_base_ms = 5, backoff_max_ms = 50 }}
routes = [
  {{ provider = "p1", upstream_model = "up-r1", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }},
  {{ provider = "p2", upstream_model = "up-r2", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }},
]

[[models]]
name = "c"
endpoints = ["messages"]
tokenizer = "chunks"
retry = {{ max_retries = 0, backoff_base_ms = 5, backoff_max_ms = 50 }}
routes = [
  {{ provider = "a1", upstream_model = "up-c1", bucket = "credit", input_per_mtok = "3", output_per_mtok = "15" }},
  {{ provider = "a2", upstream_model = "up-c2", bucket = "credit", input_per_mtok = "3", output_per_mtok = "15" }},
]
"#
    );
    Setup {
        mocks: vec![
            ("p1", NO_BREAKER),
            ("p2", NO_BREAKER),
            ("a1", ANTHROPIC_MOCK),
            ("a2", ANTHROPIC_MOCK),
        ],
        body: two_bucket_body(&models, "", credit, "1"),
        data_dir: None,
    }
}

const ANTHROPIC_MOCK: &str = "api = \"anthropic\"\ncircuit = { failure_threshold = 1000000, failure_rate = 1.0, min_requests = 1000000 }";

fn http() -> ::reqwest::Client {
    bounded_client(Duration::from_secs(30))
}

/// How a request authenticates.
#[derive(Clone, Copy)]
enum Auth<'a> {
    Bearer(&'a str),
    ApiKey(&'a str),
}

async fn post(
    g: &Gateway,
    path: &str,
    auth: Auth<'_>,
    body: &Value,
    headers: &[(&str, &str)],
) -> ::reqwest::Response {
    let mut r = http().post(format!("{}{path}", g.client_url)).json(body);
    r = match auth {
        Auth::Bearer(k) => r.bearer_auth(k),
        Auth::ApiKey(k) => r.header("x-api-key", k),
    };
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

fn responses_body(stream: bool) -> Value {
    json!({"model": "r", "input": "tell me a story", "stream": stream})
}

fn messages_body(stream: bool, max_tokens: u64) -> Value {
    json!({"model": "c", "max_tokens": max_tokens, "stream": stream,
        "messages": [{"role": "user", "content": "tell me a story"}]})
}

/// One SSE event: its `event` field and its data parsed as JSON.
#[derive(Debug, Clone)]
struct Event {
    name: Option<String>,
    data: Value,
}

/// Reads a whole SSE body into events; `Err` with what was read if the body broke.
async fn events(mut resp: ::reqwest::Response) -> Vec<Event> {
    let mut buf = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), resp.chunk()).await {
            Ok(Ok(Some(c))) => buf.push_str(&String::from_utf8_lossy(&c)),
            Ok(Ok(None)) => break,
            other => panic!("the stream broke: {other:?} after {buf}"),
        }
    }
    buf.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = None;
            let mut data = Vec::new();
            for line in e.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            let data = serde_json::from_str(&data.join("\n"))
                .unwrap_or_else(|err| panic!("event data is not JSON ({err}): {e}"));
            Event { name, data }
        })
        .collect()
}

/// Output deltas the client received: Responses `*.delta` events, Messages
/// `content_block_delta` events of text, thinking or tool input.
fn deltas(evs: &[Event]) -> u64 {
    evs.iter()
        .filter(|e| {
            let t = e.data["type"].as_str().unwrap_or_default();
            (t.starts_with("response.") && t.ends_with(".delta"))
                || (t == "content_block_delta"
                    && matches!(
                        e.data["delta"]["type"].as_str(),
                        Some("text_delta" | "thinking_delta" | "input_json_delta")
                    ))
        })
        .count() as u64
}

fn request_id(r: &::reqwest::Response) -> String {
    r.headers()["x-tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_string()
}

async fn record(g: &Gateway, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = g.admin_get(&format!("/admin/ledger/{id}")).await;
        if s == 200 {
            return v;
        }
        assert!(Instant::now() < deadline, "no record for {id}: {s} {v}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

async fn mock_last(g: &Gateway, mock: &str) -> Value {
    http()
        .get(format!("{}/_mock/last", g.mock_url(mock)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `tokens` at `per_mtok`, computed apart from the gateway.
fn price(tokens: u64, per_mtok: u64) -> Decimal {
    Decimal::from(tokens * per_mtok) / Decimal::from(1_000_000)
}

#[tokio::test]
async fn responses_stream_pays_each_delta_and_ends_with_the_tollgate_object() {
    let g = Gateway::start(setup("5", ""));
    let r = post(
        &g,
        "/v1/responses",
        Auth::Bearer(DEMO_KEY),
        &responses_body(true),
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-route"], "r/p1");
    assert_eq!(r.headers()["x-tollgate-upstream-model"], "up-r1");
    let id = request_id(&r);
    let evs = events(r).await;
    assert_eq!(evs[0].data["type"], "response.created", "{evs:?}");
    assert_eq!(deltas(&evs), 8);
    let last = evs.last().unwrap();
    assert_eq!(last.name.as_deref(), Some("response.completed"));
    assert_eq!(last.data["type"], "response.completed");
    let tg = &last.data["response"]["tollgate"];
    assert_eq!(tg["request_id"], id.as_str());
    assert_eq!(tg["route"], "r/p1");
    assert_eq!(tg["status"], "completed");
    assert_eq!(tg["output_tokens"], 8);
    // The upstream's own usage is kept beside it.
    let input = last.data["response"]["usage"]["input_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(tg["input_tokens"], input);
    let want = price(input, 1) + price(8, 2);
    assert_eq!(dec(&tg["cost"]), want);
    assert!(
        evs.iter().all(|e| e.data["type"] != "error"),
        "no error event: {evs:?}"
    );

    let rec = record(&g, &id).await;
    assert_eq!(rec["endpoint"], "responses");
    assert_eq!(rec["stream"], true);
    assert_eq!(rec["status"], "completed");
    assert_eq!(rec["usage_source"], "upstream");
    assert_eq!(rec["output_tokens"], 8);
    assert_eq!(rec["output_tokens_delivered"], 8);
    assert_eq!(dec(&rec["cost"]), want);
    // The upstream was asked on its Responses path with only the model replaced.
    let last = mock_last(&g, "p1").await;
    assert_eq!(last["path"], "/v1/responses");
    assert_eq!(last["body"]["model"], "up-r1");
    assert!(last["body"].get("stream_options").is_none(), "{last}");

    // Metrics carry the agent requests under their model and route.
    let text = http()
        .get(format!("{}/metrics", g.admin_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("tollgate_requests_total{")
                && l.contains("model=\"r\"")
                && l.contains("route=\"r/p1\"")
                && l.contains("status=\"completed\"")
        })
        .unwrap_or_else(|| panic!("no request series for r/p1:\n{text}"));
    assert!(line.ends_with(" 1"), "{line}");
    g.assert_no_panic();
}

#[tokio::test]
async fn responses_non_stream_sends_the_held_bound_and_returns_the_tollgate_object() {
    let g = Gateway::start(setup("5", "[settlement]\ndefault_max_tokens = 50\n"));
    let r = post(
        &g,
        "/v1/responses",
        Auth::Bearer(DEMO_KEY),
        &responses_body(false),
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(v["tollgate"]["request_id"], id.as_str());
    assert_eq!(v["tollgate"]["status"], "completed");
    assert_eq!(v["tollgate"]["output_tokens"], 8);
    // R8: the client set no bound, so the upstream got the held one in `max_output_tokens`.
    let last = mock_last(&g, "p1").await;
    assert_eq!(last["body"]["max_output_tokens"], 50, "{last}");
    assert!(last["body"].get("max_tokens").is_none(), "{last}");
    let rec = record(&g, &id).await;
    assert_eq!(rec["endpoint"], "responses");
    assert_eq!(rec["stream"], false);
    assert_eq!(rec["output_tokens"], 8);
    assert_eq!(
        dec(&rec["cost"]),
        dec(&v["tollgate"]["cost"]),
        "the body's cost is the ledger's"
    );
    // A client bound below the default is kept as it is.
    let mut b = responses_body(false);
    b["max_output_tokens"] = json!(3);
    let r = post(&g, "/v1/responses", Auth::Bearer(DEMO_KEY), &b, &[]).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["tollgate"]["output_tokens"], 3, "{v}");
    assert_eq!(mock_last(&g, "p1").await["body"]["max_output_tokens"], 3);
}

#[tokio::test]
async fn messages_stream_with_x_api_key_pays_each_delta_and_tags_the_last_message_delta() {
    let g = Gateway::start(setup("5", ""));
    let r = post(
        &g,
        "/v1/messages",
        Auth::ApiKey(DEMO_KEY),
        &messages_body(true, 100),
        &[("anthropic-version", "2023-06-01")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-route"], "c/a1");
    let id = request_id(&r);
    let evs = events(r).await;
    let names: Vec<&str> = evs
        .iter()
        .map(|e| e.name.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(names[0], "message_start", "{names:?}");
    assert_eq!(deltas(&evs), 8);
    assert_eq!(*names.last().unwrap(), "message_stop", "{names:?}");
    let md = &evs[evs.len() - 2];
    assert_eq!(md.data["type"], "message_delta");
    assert_eq!(md.data["usage"]["output_tokens"], 8);
    let tg = &md.data["tollgate"];
    assert_eq!(tg["request_id"], id.as_str());
    assert_eq!(tg["route"], "c/a1");
    assert_eq!(tg["status"], "completed");
    assert_eq!(tg["output_tokens"], 8);
    let input = evs[0].data["message"]["usage"]["input_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(tg["input_tokens"], input);
    assert_eq!(dec(&tg["cost"]), price(input, 3) + price(8, 15));

    let rec = record(&g, &id).await;
    assert_eq!(rec["endpoint"], "messages");
    assert_eq!(rec["stream"], true);
    assert_eq!(rec["status"], "completed");
    assert_eq!(rec["usage_source"], "upstream");
    assert_eq!(rec["output_tokens"], 8);
    assert_eq!(rec["output_tokens_delivered"], 8);
    let last = mock_last(&g, "a1").await;
    assert_eq!(last["path"], "/v1/messages");
    assert_eq!(last["body"]["model"], "up-c1");
    assert_eq!(last["body"]["max_tokens"], 100);
    g.assert_no_panic();
}

#[tokio::test]
async fn messages_non_stream_with_bearer_auth_returns_the_message_with_its_tollgate_object() {
    let g = Gateway::start(setup("5", ""));
    let r = post(
        &g,
        "/v1/messages",
        Auth::Bearer(DEMO_KEY),
        &messages_body(false, 5),
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 5);
    assert_eq!(v["tollgate"]["request_id"], id.as_str());
    assert_eq!(v["tollgate"]["output_tokens"], 5);
    let rec = record(&g, &id).await;
    assert_eq!(rec["endpoint"], "messages");
    assert_eq!(rec["stream"], false);
    assert_eq!(rec["output_tokens"], 5);
    assert_eq!(dec(&rec["cost"]), dec(&v["tollgate"]["cost"]));
}

/// Anthropic's error envelope, with the gateway's code as `error.type`.
fn assert_anthropic(v: &Value, code: &str) {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(
        v.get("code").is_none() && v["error"].get("code").is_none(),
        "{v}"
    );
}

#[tokio::test]
async fn every_error_on_messages_uses_the_anthropic_envelope() {
    let g = Gateway::start(setup("5", ""));
    let url = format!("{}/v1/messages", g.client_url);
    let good = messages_body(false, 5);
    let cases: Vec<(u16, &str, ::reqwest::RequestBuilder)> = vec![
        (401, "invalid_api_key", http().post(&url).json(&good)),
        (
            401,
            "invalid_api_key",
            http()
                .post(&url)
                .header("x-api-key", "tg-wrong-key")
                .json(&good),
        ),
        (
            400,
            "invalid_json",
            http()
                .post(&url)
                .header("x-api-key", DEMO_KEY)
                .body("{nope"),
        ),
        (
            400,
            "missing_field",
            http()
                .post(&url)
                .header("x-api-key", DEMO_KEY)
                .json(&json!({"model": "c", "messages": []})),
        ),
        (
            400,
            "missing_field",
            http()
                .post(&url)
                .header("x-api-key", DEMO_KEY)
                .json(&json!({"model": "c", "max_tokens": 5})),
        ),
        (
            400,
            "invalid_value",
            http()
                .post(&url)
                .header("x-api-key", DEMO_KEY)
                .json(&json!({"model": "c", "max_tokens": 0, "messages": []})),
        ),
        (
            400,
            "invalid_value",
            http()
                .post(&url)
                .header("x-api-key", DEMO_KEY)
                .json(&json!({"model": "c", "max_tokens": 5, "messages": [], "stream": "yes"})),
        ),
        (
            404,
            "model_not_found",
            http()
                .post(&url)
                .header("x-api-key", DEMO_KEY)
                .json(&json!({"model": "nope", "max_tokens": 5, "messages": []})),
        ),
        // `r` exists but does not serve messages.
        (
            404,
            "model_not_found",
            http()
                .post(&url)
                .header("x-api-key", DEMO_KEY)
                .json(&json!({"model": "r", "max_tokens": 5, "messages": []})),
        ),
        (
            405,
            "method_not_allowed",
            http().get(&url).header("x-api-key", DEMO_KEY),
        ),
    ];
    for (status, code, req) in cases {
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{code}");
        let v: Value = r.json().await.unwrap();
        assert_anthropic(&v, code);
    }
    // An upstream 4xx passed through keeps Anthropic's shape and the upstream's error type.
    let r = post(
        &g,
        "/v1/messages",
        Auth::ApiKey(DEMO_KEY),
        &good,
        &[("x-mock-fault", "422")],
    )
    .await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_anthropic(&v, "invalid_request_error");
    // Every route failing: 502 `upstream_error`, in the same envelope.
    let r = post(
        &g,
        "/v1/messages",
        Auth::ApiKey(DEMO_KEY),
        &good,
        &[("x-mock-fault", "500")],
    )
    .await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_anthropic(&v, "upstream_error");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("c/a2"),
        "{v}"
    );
    g.assert_no_panic();
}

#[tokio::test]
async fn messages_on_an_empty_wallet_and_a_forbidden_model_use_the_anthropic_envelope() {
    let mut s = setup("5", "");
    // The key may spend only `routed`, where `c` has no route: 403.
    s.body = s.body.replace(
        "project = \"proj\"\n",
        "project = \"proj\"\nbuckets = [\"routed\"]\n",
    );
    let g = Gateway::start(s);
    let r = post(
        &g,
        "/v1/messages",
        Auth::ApiKey(DEMO_KEY),
        &messages_body(false, 5),
        &[],
    )
    .await;
    assert_eq!(r.status(), 403);
    assert_anthropic(&r.json().await.unwrap(), "model_not_allowed");
    drop(g);

    // A wallet that cannot pay the input: 402 `insufficient_balance`.
    let g = Gateway::start(setup("0.000001", ""));
    let r = post(
        &g,
        "/v1/messages",
        Auth::ApiKey(DEMO_KEY),
        &messages_body(true, 5),
        &[],
    )
    .await;
    assert_eq!(r.status(), 402);
    let id = request_id(&r);
    assert_anthropic(&r.json().await.unwrap(), "insufficient_balance");
    let rec = record(&g, &id).await;
    assert_eq!(rec["endpoint"], "messages");
    assert_eq!(rec["status"], "rejected");
}

#[tokio::test]
async fn bad_responses_bodies_are_400_in_the_openai_envelope() {
    let g = Gateway::start(setup("5", ""));
    for (body, code, param) in [
        (json!({"model": "r"}), "missing_field", "input"),
        (json!({"model": "r", "input": 3}), "invalid_value", "input"),
        (
            json!({"model": "r", "input": "x", "stream": 1}),
            "invalid_value",
            "stream",
        ),
        (
            json!({"model": "r", "input": "x", "max_output_tokens": -1}),
            "invalid_value",
            "max_output_tokens",
        ),
        (json!({"input": "x"}), "missing_field", "model"),
    ] {
        let r = post(&g, "/v1/responses", Auth::Bearer(DEMO_KEY), &body, &[]).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // Responses is not served with an Anthropic key header alone.
    let r = post(
        &g,
        "/v1/responses",
        Auth::ApiKey(DEMO_KEY),
        &responses_body(false),
        &[],
    )
    .await;
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
}

/// Fallback before the first token: the primary answers 500, the backup serves, and the
/// ledger shows both attempts.
async fn falls_back_before_the_first_token(
    path: &str,
    body: Value,
    auth: Auth<'_>,
    mocks: [&str; 2],
    model: &str,
) {
    let g = Gateway::start(setup("5", ""));
    g.mock_options(mocks[0], json!({"fault": "500"})).await;
    let r = post(&g, path, auth, &body, &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-tollgate-route"],
        format!("{model}/{}", mocks[1]).as_str()
    );
    assert_eq!(r.headers()["x-tollgate-fallbacks"], "1");
    let id = request_id(&r);
    let evs = events(r).await;
    assert_eq!(deltas(&evs), 8);
    let rec = record(&g, &id).await;
    assert_eq!(rec["status"], "completed");
    assert_eq!(rec["fallbacks"], 1);
    let attempts = rec["attempts"].as_array().unwrap();
    let chain: Vec<(&str, &str)> = attempts
        .iter()
        .map(|a| (a["route"].as_str().unwrap(), a["outcome"].as_str().unwrap()))
        .collect();
    let (first, second) = (
        format!("{model}/{}", mocks[0]),
        format!("{model}/{}", mocks[1]),
    );
    assert_eq!(
        chain,
        [(first.as_str(), "http_500"), (second.as_str(), "ok")]
    );
}

#[tokio::test]
async fn responses_falls_back_before_the_first_token() {
    falls_back_before_the_first_token(
        "/v1/responses",
        responses_body(true),
        Auth::Bearer(DEMO_KEY),
        ["p1", "p2"],
        "r",
    )
    .await;
}

#[tokio::test]
async fn messages_falls_back_before_the_first_token() {
    falls_back_before_the_first_token(
        "/v1/messages",
        messages_body(true, 100),
        Auth::ApiKey(DEMO_KEY),
        ["a1", "a2"],
        "c",
    )
    .await;
}

/// A break after three tokens: no fallback, the three are billed, the stream ends with the
/// format's error event, and the serving attempt is recorded as a stream error.
async fn a_break_after_the_first_token_ends_with_the_error_event(
    path: &str,
    body: Value,
    auth: Auth<'_>,
    route: &str,
) {
    let g = Gateway::start(setup("5", ""));
    let r = post(&g, path, auth, &body, &[("x-mock-fault", "reset-after:3")]).await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let evs = events(r).await;
    assert_eq!(deltas(&evs), 3);
    let last = evs.last().unwrap();
    assert_eq!(last.name.as_deref(), Some("error"));
    assert_eq!(last.data["type"], "error");
    let code = if path == "/v1/messages" {
        &last.data["error"]["type"]
    } else {
        &last.data["code"]
    };
    assert_eq!(code, "upstream_stream_error", "{last:?}");
    let rec = record(&g, &id).await;
    assert_eq!(rec["status"], "upstream_error");
    assert_eq!(rec["output_tokens"], 3);
    assert_eq!(rec["usage_source"], "counted");
    assert_eq!(rec["fallbacks"], 0);
    let attempts = rec["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0]["route"], route);
    assert_eq!(attempts[0]["outcome"], "stream_error");
    assert_eq!(last.data["tollgate"]["status"], "upstream_error");
}

#[tokio::test]
async fn responses_break_after_the_first_token_ends_with_the_error_event() {
    a_break_after_the_first_token_ends_with_the_error_event(
        "/v1/responses",
        responses_body(true),
        Auth::Bearer(DEMO_KEY),
        "r/p1",
    )
    .await;
}

#[tokio::test]
async fn messages_break_after_the_first_token_ends_with_the_error_event() {
    a_break_after_the_first_token_ends_with_the_error_event(
        "/v1/messages",
        messages_body(true, 100),
        Auth::ApiKey(DEMO_KEY),
        "c/a1",
    )
    .await;
}

/// Many streams on a wallet that pays for fewer tokens than they ask: the balance never goes
/// below zero, every stream's delivered tokens are what it was billed, every cut stream ends
/// with the format's `balance_exhausted` error event, and invariant 1 holds.
async fn drain(path: &'static str, body: Value, per_token: u64) {
    let settlement = "[settlement]\ninitial_output_hold_tokens = 4\nmax_output_hold_tokens = 16\n";
    // Enough for about 150 output tokens over 12 streams of 40.
    let topup = price(150, per_token).to_string();
    let g = Arc::new(Gateway::start(setup(&topup, settlement)));
    let key = g.demo_key_id().await;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (g, key, stop) = (g.clone(), key.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let w = g.wallet_view(&key).await;
                let (bal, held) = w["credit"];
                assert!(bal >= Decimal::ZERO, "balance {bal} < 0");
                assert!(held <= bal, "held {held} > balance {bal}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let (g, body) = (g.clone(), body.clone());
        set.spawn(async move {
            let h = [("x-mock-tokens", "40"), ("x-mock-interval-ms", "3")];
            let auth = if path == "/v1/messages" {
                Auth::ApiKey(DEMO_KEY)
            } else {
                Auth::Bearer(DEMO_KEY)
            };
            let r = post(&g, path, auth, &body, &h).await;
            let status = r.status().as_u16();
            let id = request_id(&r);
            if status == 402 {
                return (id, status, Vec::new());
            }
            assert_eq!(status, 200);
            (id, status, events(r).await)
        });
    }
    let mut results = Vec::new();
    while let Some(r) = set.join_next().await {
        results.push(r.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let recs = g
        .assert_invariant1(&key, &[("credit", &topup), ("routed", "1")])
        .await;
    let by_id: HashMap<&str, &Value> = recs
        .iter()
        .map(|r| (r["request_id"].as_str().unwrap(), r))
        .collect();
    let mut cut = 0;
    for (id, status, evs) in &results {
        let rec = by_id[id.as_str()];
        assert_eq!(rec["endpoint"], path.trim_start_matches("/v1/"));
        if *status == 402 {
            assert_eq!(rec["status"], "rejected");
            continue;
        }
        let delivered = deltas(evs);
        assert_eq!(rec["output_tokens"].as_u64().unwrap(), delivered, "{rec}");
        let last = evs.last().unwrap();
        if rec["status"] == "balance_exhausted" {
            cut += 1;
            assert_eq!(last.name.as_deref(), Some("error"), "{evs:?}");
            let code = if path == "/v1/messages" {
                &last.data["error"]["type"]
            } else {
                &last.data["code"]
            };
            assert_eq!(code, "balance_exhausted", "{last:?}");
        } else {
            assert_eq!(rec["status"], "completed", "{rec}");
            assert_eq!(delivered, 40);
            assert!(last.data["type"] != "error");
        }
    }
    assert!(cut > 0, "no stream was cut: {results:?}");
    let spent: Decimal = recs.iter().map(|r| dec(&r["cost"])).sum();
    let left = topup.parse::<Decimal>().unwrap() - spent;
    // Invariant 3: what is left pays for less than one token per stream.
    assert!(left < price(12, per_token), "{left} left");
    g.assert_no_panic();
}

#[tokio::test]
async fn draining_a_wallet_on_responses() {
    drain("/v1/responses", responses_body(true), 2).await;
}

#[tokio::test]
async fn draining_a_wallet_on_messages() {
    drain("/v1/messages", messages_body(true, 1000), 15).await;
}

#[test]
fn check_config_names_a_route_that_cannot_serve_its_models_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[server]
admin_token = "an-admin-token"

[buckets.credit]
currency = "USD"

[[providers]]
id = "oa"
base_url = "https://api.example.com/v1"

[[providers]]
id = "claude"
base_url = "https://api.example.com/v1"
api = "anthropic"

[[providers]]
id = "odd"
base_url = "https://api.example.com/v1"
api = "gemini"

[[models]]
name = "agent"
endpoints = ["messages", "responses"]
routes = [
  { provider = "oa", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
  { provider = "claude", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
]
"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check-config", path.to_str().unwrap()])
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("models[0].routes[0].provider:")
                && l.contains("\"oa\"")
                && l.contains("\"messages\"")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("models[0].routes[1].provider:")
                && l.contains("\"claude\"")
                && l.contains("\"responses\"")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("providers[2].api:") && l.contains("gemini")),
        "{text}"
    );
}
