//! Cached input priced as providers price it (docs/ledger.md, "Cached input"), end to end
//! against the real binary and the built-in mocks: input tokens the upstream reports as read
//! from (or written to) its prompt cache are billed at the route's `cache_read_per_mtok`
//! (`cache_write_per_mtok`), the rest at `input_per_mtok`, exactly, on streams and whole answers
//! of `/v1/chat/completions`, `/v1/responses` and `/v1/messages`; the record carries the cache
//! counts (JSON, CSV, JSONL); a route without cache prices bills them at the input price; the
//! catalog shows the prices; usage and the spend explainer still add up; `check-config` checks
//! the keys.
//!
//! The mock reports `x-mock-cache-read-tokens` / `x-mock-cache-write-tokens` on top of the
//! prompt's own tokens: a 400-byte prompt (100 tokens) with 64 cache reads is 164 input tokens,
//! 100 of them uncached.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// Price of `tokens` at `per_mtok`, computed apart from the gateway.
fn price(tokens: u64, per_mtok: &str) -> Decimal {
    Decimal::from(tokens) * d(per_mtok) / Decimal::from(1_000_000)
}

/// Route prices of model `cached` (Anthropic-like figures: reads at a tenth of the input
/// price, writes at 1.25 times it).
const IN: &str = "3";
const READ: &str = "0.3";
const WRITE: &str = "3.75";
const OUT: &str = "15";
/// Prices of model `plain`, which sets no cache prices.
const PLAIN_IN: &str = "0.37";
const PLAIN_OUT: &str = "1.4142135";

fn body() -> String {
    format!(
        r#"
[buckets.credit]
currency = "USD"
kind = "official"

[[models]]
name = "cached"
tokenizer = "chunks"
retry = {{ max_retries = 0, backoff_base_ms = 5, backoff_max_ms = 50 }}
routes = [
  {{ provider = "p1", upstream_model = "up-cached", bucket = "credit", input_per_mtok = "{IN}", output_per_mtok = "{OUT}", cache_read_per_mtok = "{READ}", cache_write_per_mtok = "{WRITE}" }},
]

[[models]]
name = "plain"
tokenizer = "chunks"
retry = {{ max_retries = 0, backoff_base_ms = 5, backoff_max_ms = 50 }}
routes = [
  {{ provider = "p1", upstream_model = "up-plain", bucket = "credit", input_per_mtok = "{PLAIN_IN}", output_per_mtok = "{PLAIN_OUT}" }},
]

[[models]]
name = "resp"
endpoints = ["responses"]
tokenizer = "chunks"
retry = {{ max_retries = 0, backoff_base_ms = 5, backoff_max_ms = 50 }}
routes = [
  {{ provider = "p1", upstream_model = "up-resp", bucket = "credit", input_per_mtok = "{IN}", output_per_mtok = "{OUT}", cache_read_per_mtok = "{READ}", cache_write_per_mtok = "{WRITE}" }},
]

[[models]]
name = "claude"
endpoints = ["messages"]
tokenizer = "chunks"
retry = {{ max_retries = 0, backoff_base_ms = 5, backoff_max_ms = 50 }}
routes = [
  {{ provider = "a1", upstream_model = "up-claude", bucket = "credit", input_per_mtok = "{IN}", output_per_mtok = "{OUT}", cache_read_per_mtok = "{READ}", cache_write_per_mtok = "{WRITE}" }},
]

[[keys]]
name = "demo"
secret = "{DEMO_KEY}"
workspace = "ws"
project = "proj"
topup = {{ credit = "10" }}
"#
    )
}

fn start() -> Gateway {
    Gateway::start(Setup {
        mocks: vec![("p1", ""), ("a1", "api = \"anthropic\"")],
        body: body(),
        data_dir: None,
    })
}

/// 400 bytes of prompt: `ceil(400 / 4)` = 100 input tokens for the mock and the gateway.
fn prompt() -> String {
    "abcd".repeat(100)
}

fn chat(model: &str, stream: bool, include_usage: bool) -> Value {
    let mut b = json!({"model": model, "stream": stream,
        "messages": [{"role": "user", "content": prompt()}]});
    if stream {
        b["stream_options"] = json!({ "include_usage": include_usage });
    }
    b
}

async fn post(
    g: &Gateway,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> ::reqwest::Response {
    let mut r = g
        .client()
        .post(format!("{}{path}", g.client_url))
        .bearer_auth(DEMO_KEY)
        .json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r
}

fn request_id(r: &::reqwest::Response) -> String {
    r.headers()["x-tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_string()
}

/// A record by request id, waiting for the writer to commit it.
async fn record(g: &Gateway, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, v) = g.admin_get(&format!("/admin/ledger/{id}")).await;
        if s == 200 {
            return v;
        }
        assert!(Instant::now() < deadline, "no record for {id}: {s} {v}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

async fn balance(g: &Gateway, key_id: &str) -> Decimal {
    let (s, v) = g.admin_get(&format!("/admin/keys/{key_id}/wallet")).await;
    assert_eq!(s, 200, "{v}");
    dec(&v["buckets"]["credit"]["balance"])
}

/// The record's token counts, cost and usage source.
fn billed(rec: &Value) -> (u64, u64, u64, u64, Decimal, &str) {
    (
        rec["input_tokens"].as_u64().unwrap(),
        rec["cache_read_tokens"].as_u64().unwrap(),
        rec["cache_write_tokens"].as_u64().unwrap(),
        rec["output_tokens"].as_u64().unwrap(),
        dec(&rec["cost"]),
        rec["usage_source"].as_str().unwrap(),
    )
}

/// The `tollgate` object's token counts and cost.
fn tollgate_billed(t: &Value) -> (u64, u64, u64, u64, Decimal) {
    (
        t["input_tokens"].as_u64().unwrap(),
        t["cache_read_tokens"].as_u64().unwrap(),
        t["cache_write_tokens"].as_u64().unwrap(),
        t["output_tokens"].as_u64().unwrap(),
        dec(&t["cost"]),
    )
}

/// 100 uncached input tokens, 64 cache reads and 9 output tokens at the `cached` route's prices.
fn cached_cost() -> Decimal {
    price(100, IN) + price(64, READ) + price(9, OUT)
}

const CACHE_READS: [(&str, &str); 2] = [("x-mock-tokens", "9"), ("x-mock-cache-read-tokens", "64")];

/// One stream with its usage chunk, one without, one whole answer: each reports 64 cache reads
/// on top of its 100 prompt tokens and is billed 100 tokens at the input price, 64 at the
/// cache-read price and its output at the output price, to the last decimal, in the record, the
/// `tollgate` object, the usage chunk and the wallet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_cache_reads_are_billed_at_the_cache_read_price_exactly() {
    let g = start();
    let key = g.demo_key_id().await;
    let mut expected_balance = d("10");
    assert_eq!(balance(&g, &key).await, expected_balance);
    let expected = cached_cost();
    assert_eq!(expected, d("0.0004542"));

    // A stream with its usage chunk.
    let r = post(
        &g,
        "/v1/chat/completions",
        &chat("cached", true, true),
        &CACHE_READS,
    )
    .await;
    let id = request_id(&r);
    let events = sse_events(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], 164, "{usage}");
    assert_eq!(usage["usage"]["completion_tokens"], 9);
    assert_eq!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"], 64,
        "{usage}"
    );
    assert_eq!(
        tollgate_billed(&usage["tollgate"]),
        (164, 64, 0, 9, expected)
    );
    let rec = record(&g, &id).await;
    assert_eq!(billed(&rec), (164, 64, 0, 9, expected, "upstream"));
    assert_eq!(
        rec["upstream_usage"],
        json!({"prompt_tokens": 164, "completion_tokens": 9})
    );
    assert_eq!(dec(&rec["shortfall"]), Decimal::ZERO);
    expected_balance -= expected;
    assert_eq!(balance(&g, &key).await, expected_balance);

    // A stream whose client did not ask for usage: the gateway still reads it upstream.
    let r = post(
        &g,
        "/v1/chat/completions",
        &chat("cached", true, false),
        &CACHE_READS,
    )
    .await;
    let id = request_id(&r);
    let events = sse_events(r).await;
    assert!(
        events.iter().all(|e| !e.contains("\"usage\":{")),
        "{events:?}"
    );
    let rec = record(&g, &id).await;
    assert_eq!(billed(&rec), (164, 64, 0, 9, expected, "upstream"));
    expected_balance -= expected;
    assert_eq!(balance(&g, &key).await, expected_balance);

    // A whole answer.
    let r = post(
        &g,
        "/v1/chat/completions",
        &chat("cached", false, false),
        &CACHE_READS,
    )
    .await;
    let id = request_id(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 64);
    assert_eq!(tollgate_billed(&v["tollgate"]), (164, 64, 0, 9, expected));
    let rec = record(&g, &id).await;
    assert_eq!(billed(&rec), (164, 64, 0, 9, expected, "upstream"));
    expected_balance -= expected;
    assert_eq!(balance(&g, &key).await, expected_balance);

    // Without a cache report the whole input is at the input price.
    let r = post(
        &g,
        "/v1/chat/completions",
        &chat("cached", false, false),
        &[("x-mock-tokens", "9")],
    )
    .await;
    let rec = record(&g, &request_id(&r)).await;
    let uncached = price(100, IN) + price(9, OUT);
    assert_eq!(billed(&rec), (100, 0, 0, 9, uncached, "upstream"));
    expected_balance -= uncached;
    assert_eq!(balance(&g, &key).await, expected_balance);
    g.assert_no_panic();
}

/// `/v1/responses`: `input_tokens_details.cached_tokens` are cache reads, billed exactly at the
/// cache-read price, stream and whole answer, in the record, the `tollgate` object of the
/// `response.completed` event (or of the body) and the wallet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_cache_reads_are_billed_at_the_cache_read_price_exactly() {
    let g = start();
    let key = g.demo_key_id().await;
    let expected = cached_cost();
    for stream in [true, false] {
        let before = balance(&g, &key).await;
        let body = json!({"model": "resp", "input": prompt(), "stream": stream});
        let r = post(&g, "/v1/responses", &body, &CACHE_READS).await;
        let id = request_id(&r);
        let response = if stream {
            let events = sse_events(r).await;
            let completed = events
                .iter()
                .map(|e| serde_json::from_str::<Value>(e).unwrap())
                .find(|e| e["type"] == "response.completed")
                .unwrap_or_else(|| panic!("no response.completed: {events:?}"));
            completed["response"].clone()
        } else {
            r.json::<Value>().await.unwrap()
        };
        assert_eq!(
            response["usage"]["input_tokens_details"]["cached_tokens"], 64,
            "{response}"
        );
        assert_eq!(
            tollgate_billed(&response["tollgate"]),
            (164, 64, 0, 9, expected),
            "stream {stream}"
        );
        let rec = record(&g, &id).await;
        assert_eq!(rec["endpoint"], "responses");
        assert_eq!(
            billed(&rec),
            (164, 64, 0, 9, expected, "upstream"),
            "stream {stream}"
        );
        assert_eq!(before - balance(&g, &key).await, expected);
    }
    g.assert_no_panic();
}

/// `/v1/messages`: `cache_read_input_tokens` and `cache_creation_input_tokens` come on top of
/// `input_tokens`; the record's input is their sum, reads billed at the cache-read price,
/// writes at the cache-write price, exactly, stream and whole answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cache_reads_and_writes_are_billed_at_their_prices_exactly() {
    let g = start();
    let key = g.demo_key_id().await;
    let expected = price(100, IN) + price(64, READ) + price(32, WRITE) + price(9, OUT);
    assert_eq!(expected, d("0.0005742"));
    let headers = [
        ("x-mock-tokens", "9"),
        ("x-mock-cache-read-tokens", "64"),
        ("x-mock-cache-write-tokens", "32"),
        ("anthropic-version", "2023-06-01"),
    ];
    for stream in [true, false] {
        let before = balance(&g, &key).await;
        let body = json!({"model": "claude", "max_tokens": 256, "stream": stream,
            "messages": [{"role": "user", "content": prompt()}]});
        let r = post(&g, "/v1/messages", &body, &headers).await;
        let id = request_id(&r);
        let tollgate = if stream {
            let events = sse_events(r).await;
            let events: Vec<Value> = events
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            let start = events
                .iter()
                .find(|e| e["type"] == "message_start")
                .unwrap();
            let usage = &start["message"]["usage"];
            assert_eq!(
                (
                    &usage["input_tokens"],
                    &usage["cache_read_input_tokens"],
                    &usage["cache_creation_input_tokens"]
                ),
                (&json!(100), &json!(64), &json!(32)),
                "{start}"
            );
            let last_delta = events
                .iter()
                .rev()
                .find(|e| e["type"] == "message_delta")
                .unwrap();
            last_delta["tollgate"].clone()
        } else {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["usage"]["cache_creation_input_tokens"], 32, "{v}");
            v["tollgate"].clone()
        };
        assert_eq!(
            tollgate_billed(&tollgate),
            (196, 64, 32, 9, expected),
            "stream {stream}: {tollgate}"
        );
        let rec = record(&g, &id).await;
        assert_eq!(rec["endpoint"], "messages");
        assert_eq!(
            billed(&rec),
            (196, 64, 32, 9, expected, "upstream"),
            "stream {stream}"
        );
        assert_eq!(before - balance(&g, &key).await, expected);
    }
    g.assert_no_panic();
}

/// A route without cache prices bills cached tokens at its input price: the cost is the one of
/// as many uncached tokens, while the record still counts the cached ones. The catalog shows
/// each route's cache prices, defaults included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_prices_default_to_the_input_price() {
    let g = start();
    let expected = price(180, PLAIN_IN) + price(13, PLAIN_OUT);
    assert_eq!(expected, d("0.0000849847755"));
    for stream in [true, false] {
        let r = post(
            &g,
            "/v1/chat/completions",
            &chat("plain", stream, true),
            &[("x-mock-tokens", "13"), ("x-mock-cache-read-tokens", "80")],
        )
        .await;
        let id = request_id(&r);
        if stream {
            sse_events(r).await;
        } else {
            r.bytes().await.unwrap();
        }
        let rec = record(&g, &id).await;
        assert_eq!(
            billed(&rec),
            (180, 80, 0, 13, expected, "upstream"),
            "stream {stream}"
        );
    }
    let (s, v) = g.admin_get("/admin/catalog").await;
    assert_eq!(s, 200);
    let route = |model: &str| -> Value {
        v["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == model)
            .unwrap()["routes"][0]
            .clone()
    };
    let plain = route("plain");
    assert_eq!(
        (
            &plain["input_per_mtok"],
            &plain["cache_read_per_mtok"],
            &plain["cache_write_per_mtok"]
        ),
        (&json!(PLAIN_IN), &json!(PLAIN_IN), &json!(PLAIN_IN))
    );
    let cached = route("cached");
    assert_eq!(
        (
            &cached["input_per_mtok"],
            &cached["cache_read_per_mtok"],
            &cached["cache_write_per_mtok"],
            &cached["output_per_mtok"]
        ),
        (&json!(IN), &json!(READ), &json!(WRITE), &json!(OUT))
    );
    g.assert_no_panic();
}

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A time strictly after every record started so far, and before any started later.
async fn boundary() -> DateTime<Utc> {
    tokio::time::sleep(Duration::from_millis(30)).await;
    let t = now();
    tokio::time::sleep(Duration::from_millis(30)).await;
    t
}

/// The same requests without, then with 64 cache reads on top of their 100 prompt tokens:
/// usage sums the records; the explainer's contributions add up to the change exactly, the
/// extra input at the base prices under `input_tokens` and the cheaper price of the cached part
/// under `route_mix` (which carries the effective prices). The exports carry the cache counts
/// in the documented columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_explain_and_exports_add_up_with_cached_input() {
    let g = start();
    let b0 = now();
    for _ in 0..3 {
        let r = post(
            &g,
            "/v1/chat/completions",
            &chat("cached", false, false),
            &[("x-mock-tokens", "9")],
        )
        .await;
        record(&g, &request_id(&r)).await;
    }
    let b1 = boundary().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = post(
            &g,
            "/v1/chat/completions",
            &chat("cached", false, false),
            &CACHE_READS,
        )
        .await;
        let id = request_id(&r);
        record(&g, &id).await;
        ids.push(id);
    }
    let c1 = boundary().await;
    let three = Decimal::from(3);
    let base = (price(100, IN) + price(9, OUT)) * three;
    let current = cached_cost() * three;

    let (s, v) = g
        .admin_get(&format!(
            "/admin/usage?since={}&until={}",
            rfc3339(b1),
            rfc3339(c1)
        ))
        .await;
    assert_eq!(s, 200, "{v}");
    let group = &v["groups"][0];
    assert_eq!(dec(&group["cost"]), current, "{v}");
    assert_eq!(group["input_tokens"], 3 * 164);
    assert_eq!(group["requests"], 3);

    let q = format!(
        "/admin/usage/explain?base_since={}&base_until={}&since={}&until={}",
        rfc3339(b0),
        rfc3339(b1),
        rfc3339(b1),
        rfc3339(c1)
    );
    let (s, v) = g.admin_get(&q).await;
    assert_eq!(s, 200, "{v}");
    let usd = &v["currencies"][0];
    assert_eq!(dec(&usd["base_cost"]), base, "{v}");
    assert_eq!(dec(&usd["current_cost"]), current);
    assert_eq!(dec(&usd["change"]), current - base);
    let drivers = usd["drivers"].as_array().unwrap();
    let sum: Decimal = drivers.iter().map(|d| dec(&d["contribution"])).sum();
    assert_eq!(sum, current - base, "{v}");
    // 64 more input tokens per request at the base input price...
    let more_input = price(64, IN) * three;
    // ...of which the cached 64 cost the cache-read price instead.
    let cheaper = (price(64, READ) - price(64, IN)) * three;
    assert_eq!(more_input + cheaper, current - base);
    for d in drivers {
        let expected = match d["driver"].as_str().unwrap() {
            "input_tokens" => more_input,
            "route_mix" => cheaper,
            _ => Decimal::ZERO,
        };
        assert_eq!(dec(&d["contribution"]), expected, "{d}");
    }

    // Exports: the columns sit after `input_tokens`, in the documented order.
    let range = format!("since={}&until={}", rfc3339(b1), rfc3339(c1));
    let export = |format: &'static str| {
        let url = format!(
            "{}/admin/ledger/export?format={format}&{range}",
            g.admin_url
        );
        let client = g.client();
        async move {
            client
                .get(url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let csv = export("csv").await;
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let at = |name: &str| header.iter().position(|h| *h == name).unwrap();
    assert_eq!(at("cache_read_tokens"), at("input_tokens") + 1);
    assert_eq!(at("cache_write_tokens"), at("input_tokens") + 2);
    assert_eq!(at("output_tokens"), at("input_tokens") + 3);
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 3, "{csv}");
    for row in &rows {
        assert!(
            row.contains(",164,64,0,9,"),
            "input, cache read, cache write and output in the CSV row: {row}"
        );
    }
    let jsonl = export("jsonl").await;
    assert_eq!(jsonl.lines().count(), 3);
    for line in jsonl.lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        assert!(ids.contains(&r["request_id"].as_str().unwrap().to_string()));
        assert_eq!(
            (&r["cache_read_tokens"], &r["cache_write_tokens"]),
            (&json!(64), &json!(0))
        );
        // In the record's field order.
        let pos = |k: &str| line.find(&format!("\"{k}\":")).unwrap();
        assert!(pos("input_tokens") < pos("cache_read_tokens"), "{line}");
        assert!(
            pos("cache_read_tokens") < pos("cache_write_tokens"),
            "{line}"
        );
        assert!(pos("cache_write_tokens") < pos("output_tokens"), "{line}");
    }
}

/// Runs `tollgate check-config` on `config`: (exit code, stdout + stderr).
fn check_config(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check-config", path.to_str().unwrap()])
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// `check-config` checks the cache prices like the other prices.
#[test]
fn check_config_checks_the_cache_prices() {
    let providers = format!(
        "[server]\nadmin_token = \"{ADMIN_TOKEN}\"\n\n[[providers]]\nid = \"p1\"\nkind = \"mock\"\n\n[[providers]]\nid = \"a1\"\nkind = \"mock\"\napi = \"anthropic\"\n"
    );
    let (code, text) = check_config(&format!("{providers}{}", body()));
    assert_eq!(code, Some(0), "{text}");

    // A negative price is a problem naming its key, one line each.
    let negative = body()
        .replacen(
            &format!("cache_read_per_mtok = \"{READ}\""),
            "cache_read_per_mtok = \"-0.1\"",
            1,
        )
        .replacen(
            &format!("cache_write_per_mtok = \"{WRITE}\""),
            "cache_write_per_mtok = -2",
            1,
        );
    let (code, text) = check_config(&format!("{providers}{negative}"));
    assert_eq!(code, Some(1), "{text}");
    for key in ["cache_read_per_mtok", "cache_write_per_mtok"] {
        assert!(
            text.lines()
                .any(|l| l.contains(&format!("models[0].routes[0].{key}"))
                    && l.contains("must not be negative")),
            "{key}: {text}"
        );
    }

    // As for every price, an unreadable amount is a parse error of its model's table.
    let unreadable = body().replacen(
        &format!("cache_write_per_mtok = \"{WRITE}\""),
        "cache_write_per_mtok = \"lots\"",
        1,
    );
    let (code, text) = check_config(&format!("{providers}{unreadable}"));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("models[0]") && text.contains("expected a decimal amount"),
        "{text}"
    );
}
