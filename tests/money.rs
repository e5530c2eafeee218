//! The money invariants (docs/rules.md), end to end against the real binary and the built-in mocks:
//! exact cost (1), conservation over mixed traffic (invariant 1), draining a wallet with
//! concurrent streams (invariants 2 and 3), `kill -9` and recovery (invariant 4), admin top-up
//! validation and idempotency (R10, R29), and rejected requests (402/403) in the ledger.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};

const MILLION: i64 = 1_000_000;

/// A client with a bound on every request, so no test can hang on a stuck stream.
fn http() -> ::reqwest::Client {
    bounded_client(Duration::from_secs(30))
}

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// Price of `tokens` at `per_mtok`, computed independently of the gateway.
fn price(tokens: u64, per_mtok: &str) -> Decimal {
    Decimal::from(tokens) * d(per_mtok) / Decimal::from(MILLION)
}

/// One bucket (`credit`, USD), model `m` on `p1` and `emb` on `p1`, both at the given prices,
/// and the demo key restricted to `credit` with one bootstrap top-up.
fn one_bucket_body(settlement: &str, in_price: &str, out_price: &str, topup: &str) -> String {
    format!(
        r#"
{settlement}

[buckets.credit]
currency = "USD"
kind = "official"

[[models]]
name = "m"
tokenizer = "chunks"
retry = {{ max_retries = 0, backoff_base_ms = 5, backoff_max_ms = 50 }}
routes = [
  {{ provider = "p1", upstream_model = "up-m1", bucket = "credit", input_per_mtok = "{in_price}", output_per_mtok = "{out_price}" }},
]

[[models]]
name = "emb"
endpoints = ["embeddings"]
tokenizer = "chunks"
routes = [
  {{ provider = "p1", upstream_model = "up-emb", bucket = "credit", input_per_mtok = "{in_price}", output_per_mtok = "0" }},
]

[[keys]]
name = "demo"
secret = "{DEMO_KEY}"
workspace = "ws"
project = "proj"
buckets = ["credit"]
topup = {{ credit = "{topup}" }}
"#
    )
}

fn chat_body(text: &str, stream: bool, usage: bool) -> Value {
    let mut b = json!({"model": "m", "stream": stream,
        "messages": [{"role": "user", "content": text}]});
    if stream {
        b["stream_options"] = json!({ "include_usage": usage });
    }
    b
}

async fn post_chat(
    g: &Gateway,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> ::reqwest::Response {
    let mut r = http().post(g.chat_url()).bearer_auth(key).json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

/// Wallet view of a key: bucket → (balance, held, available).
async fn wallet(g: &Gateway, key_id: &str) -> BTreeMap<String, (Decimal, Decimal, Decimal)> {
    let (s, v) = g.admin_get(&format!("/admin/keys/{key_id}/wallet")).await;
    assert_eq!(s, 200, "{v}");
    v["buckets"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, b)| {
            (
                k.clone(),
                (dec(&b["balance"]), dec(&b["held"]), dec(&b["available"])),
            )
        })
        .collect()
}

fn balance(w: &BTreeMap<String, (Decimal, Decimal, Decimal)>, bucket: &str) -> Decimal {
    w.get(bucket).map(|b| b.0).unwrap_or_default()
}

/// Polls until no bucket of the key has anything held, then until the ledger stops growing
/// (settlements reach sled through the writer queue just after the actor applies them).
async fn quiesce(g: &Gateway, key_id: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let w = wallet(g, key_id).await;
        if w.values().all(|b| b.1.is_zero()) {
            break;
        }
        assert!(Instant::now() < deadline, "holds never released: {w:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let recs = g.all_records(&format!("&key_id={key_id}")).await;
        if recs.len() == last {
            return recs;
        }
        last = recs.len();
        assert!(Instant::now() < deadline, "ledger never settled");
    }
}

/// Σ ledger `cost` per bucket (records without a bucket cost nothing).
fn cost_by_bucket(recs: &[Value]) -> BTreeMap<String, Decimal> {
    let mut out = BTreeMap::new();
    for r in recs {
        let c = dec(&r["cost"]);
        match r["bucket"].as_str() {
            Some(b) => *out.entry(b.to_string()).or_default() += c,
            None => assert!(c.is_zero(), "record without bucket has a cost: {r}"),
        }
    }
    out
}

/// Invariant 1 for every bucket of the key, exactly, plus `balance ≥ 0`.
fn assert_conservation(
    topups: &BTreeMap<String, Decimal>,
    recs: &[Value],
    w: &BTreeMap<String, (Decimal, Decimal, Decimal)>,
) {
    let costs = cost_by_bucket(recs);
    for (bucket, (bal, held, _)) in w {
        let t = topups.get(bucket).copied().unwrap_or_default();
        let c = costs.get(bucket).copied().unwrap_or_default();
        assert!(*bal >= Decimal::ZERO, "{bucket}: negative balance {bal}");
        assert!(held.is_zero(), "{bucket}: not quiescent, held {held}");
        assert_eq!(
            t - c,
            *bal,
            "{bucket}: top-ups {t} − ledger cost {c} ≠ balance {bal}"
        );
    }
    for b in costs.keys() {
        assert!(w.contains_key(b), "cost in a bucket the wallet lacks: {b}");
    }
}

/// The `data:` payloads of a stream read so far, read incrementally so that a stream cut by a
/// crash still reports what arrived. `Err` carries the payloads when the body broke.
async fn read_events(mut resp: ::reqwest::Response) -> Result<Vec<String>, Vec<String>> {
    let mut buf = String::new();
    let mut out = Vec::new();
    let broke = loop {
        match tokio::time::timeout(Duration::from_secs(20), resp.chunk()).await {
            Ok(Ok(Some(c))) => buf.push_str(&String::from_utf8_lossy(&c)),
            Ok(Ok(None)) => break false,
            Ok(Err(_)) | Err(_) => break true,
        }
        while let Some(i) = buf.find("\n\n") {
            let ev: String = buf.drain(..i + 2).collect();
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("data:")
                        .map(|d| d.strip_prefix(' ').unwrap_or(d))
                })
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
    };
    if broke {
        Err(out)
    } else {
        Ok(out)
    }
}

/// Content deltas (one token each for `chunks`) in a list of SSE payloads.
fn content_deltas(events: &[String]) -> u64 {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .map(|v| {
            v["choices"].as_array().map_or(0, |cs| {
                cs.iter()
                    .filter(|c| {
                        c["delta"]["content"]
                            .as_str()
                            .is_some_and(|s| !s.is_empty())
                    })
                    .count() as u64
            })
        })
        .sum()
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

fn assert_envelope(v: &Value, code: &str) {
    let e = &v["error"];
    assert!(e["message"].is_string(), "no message: {v}");
    assert!(e["type"].is_string(), "no type: {v}");
    assert!(
        e.as_object().unwrap().contains_key("param"),
        "no param: {v}"
    );
    assert_eq!(e["code"], code, "{v}");
}

// ---------------------------------------------------------------------------------------------
// 1. Exact cost

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_is_exact_to_the_last_decimal() {
    let (pin, pout) = ("0.37", "1.4142135");
    let g = Gateway::start(Setup {
        mocks: vec![("p1", "")],
        body: one_bucket_body("", pin, pout, "10"),
        data_dir: None,
    });
    let key = g.demo_key_id().await;
    let before = balance(&wallet(&g, &key).await, "credit");
    assert_eq!(before, d("10"));

    // 37 bytes → ceil(37 / 4) = 10 input tokens; 13 output tokens.
    let text = "abcdefghijklmnopqrstuvwxyz0123456789!";
    assert_eq!(text.len(), 37);
    let expected = price(10, pin) + price(13, pout);
    assert_eq!(expected, d("0.0000220847755"));
    let r = post_chat(
        &g,
        DEMO_KEY,
        &chat_body(text, true, true),
        &[("x-mock-tokens", "13")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let events = sse_events(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(content_deltas(&events), 13);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], 10);
    assert_eq!(usage["usage"]["completion_tokens"], 13);
    assert_eq!(usage["tollgate"]["request_id"], id.as_str());
    assert_eq!(dec(&usage["tollgate"]["cost"]), expected);
    let rec = record(&g, &id).await;
    assert_eq!(dec(&rec["cost"]), expected);
    assert_eq!(dec(&rec["shortfall"]), Decimal::ZERO);
    assert_eq!(rec["status"], "completed");
    let after = balance(&wallet(&g, &key).await, "credit");
    assert_eq!(before - after, expected);

    // Non-stream, n = 2, max_tokens = 5: 10 output tokens in all.
    let mut b = chat_body(text, false, false);
    b["n"] = json!(2);
    b["max_tokens"] = json!(5);
    let expected2 = price(10, pin) + price(10, pout);
    assert_eq!(expected2, d("0.000017842135"));
    let r = post_chat(&g, DEMO_KEY, &b, &[]).await;
    assert_eq!(r.status(), 200);
    let id2 = request_id(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 10);
    assert_eq!(dec(&v["tollgate"]["cost"]), expected2);
    assert_eq!(dec(&record(&g, &id2).await["cost"]), expected2);
    let after2 = balance(&wallet(&g, &key).await, "credit");
    assert_eq!(after - after2, expected2);
    assert_eq!(after2, d("10") - expected - expected2);
}

// ---------------------------------------------------------------------------------------------
// 2. Conservation over mixed traffic

#[derive(Debug)]
enum Kind {
    Stream { usage: bool },
    NonStream,
    StreamN2,
    NonStreamN2,
    StreamMaxTokens,
    NonStreamMaxTokens,
    Disconnect,
    Reset,
    Embeddings,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conservation_over_mixed_traffic() {
    let g = Arc::new(Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("allow_cross_bucket_fallback = true", "1", "2"),
        data_dir: None,
    }));
    let key = g.demo_key_id().await;
    let mut topups: BTreeMap<String, Decimal> =
        [("credit".into(), d("1")), ("routed".into(), d("2"))].into();

    let kinds = |i: usize| match i % 12 {
        0 => Kind::Stream { usage: true },
        1 => Kind::Stream { usage: false },
        2 => Kind::NonStream,
        3 => Kind::StreamN2,
        4 => Kind::NonStreamN2,
        5 => Kind::StreamMaxTokens,
        6 => Kind::NonStreamMaxTokens,
        7 => Kind::Embeddings,
        8 if i < 36 => Kind::Disconnect,
        9 if i < 36 => Kind::Reset,
        _ => Kind::Stream { usage: true },
    };
    let mut set = tokio::task::JoinSet::new();
    for i in 0..60usize {
        let gw = g.clone();
        let kind = kinds(i);
        set.spawn(async move {
            let g = gw;
            let text = "x".repeat(1 + i * 7);
            let tokens = (3 + i % 11).to_string();
            let h = [
                ("x-mock-tokens", tokens.as_str()),
                ("x-mock-interval-ms", "2"),
            ];
            match kind {
                Kind::Stream { usage } => {
                    let r = post_chat(&g, DEMO_KEY, &chat_body(&text, true, usage), &h).await;
                    assert_eq!(r.status(), 200);
                    let ev = sse_events(r).await;
                    assert_eq!(ev.last().unwrap(), "[DONE]");
                }
                Kind::NonStream => {
                    let r = post_chat(&g, DEMO_KEY, &chat_body(&text, false, false), &h).await;
                    assert_eq!(r.status(), 200);
                }
                Kind::StreamN2 | Kind::NonStreamN2 => {
                    let stream = matches!(kind, Kind::StreamN2);
                    let mut b = chat_body(&text, stream, true);
                    b["n"] = json!(2);
                    let r = post_chat(&g, DEMO_KEY, &b, &h).await;
                    assert_eq!(r.status(), 200);
                    let _ = r.text().await.unwrap();
                }
                Kind::StreamMaxTokens | Kind::NonStreamMaxTokens => {
                    let stream = matches!(kind, Kind::StreamMaxTokens);
                    let mut b = chat_body(&text, stream, i % 2 == 0);
                    b["max_tokens"] = json!(2);
                    let r = post_chat(&g, DEMO_KEY, &b, &h).await;
                    assert_eq!(r.status(), 200);
                    let _ = r.text().await.unwrap();
                }
                Kind::Disconnect => {
                    let h = [("x-mock-tokens", "500"), ("x-mock-interval-ms", "5")];
                    let mut r = post_chat(&g, DEMO_KEY, &chat_body(&text, true, true), &h).await;
                    assert_eq!(r.status(), 200);
                    for _ in 0..3 {
                        let _ = r.chunk().await;
                    }
                    drop(r);
                }
                Kind::Reset => {
                    let h = [("x-mock-fault", "reset-after:3"), ("x-mock-tokens", "20")];
                    let r = post_chat(&g, DEMO_KEY, &chat_body(&text, true, true), &h).await;
                    assert_eq!(r.status(), 200);
                    let ev = sse_events(r).await;
                    assert_eq!(ev.last().unwrap(), "[DONE]");
                    let err: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
                    assert_eq!(err["error"]["code"], "upstream_stream_error", "{ev:?}");
                }
                Kind::Embeddings => {
                    let r = http()
                        .post(format!("{}/v1/embeddings", g.client_url))
                        .bearer_auth(DEMO_KEY)
                        .json(&json!({"model": "emb", "input": [text.clone(), "abc"]}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    let v: Value = r.json().await.unwrap();
                    assert!(dec(&v["tollgate"]["cost"]) > Decimal::ZERO);
                }
            }
        });
        // Top-ups interleaved with the traffic.
        if i % 20 == 10 {
            let (s, v) = g
                .admin_post(
                    &format!("/admin/keys/{key}/topup"),
                    json!({"bucket": "credit", "amount": "0.125", "reference": format!("mix-{i}")}),
                )
                .await;
            assert_eq!(s, 200, "{v}");
            *topups.get_mut("credit").unwrap() += d("0.125");
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }

    // Spend from the routed bucket too: the primary fails, requests fall back to p2.
    g.mock_options("p1", json!({"fault": "503"})).await;
    for usage in [true, false] {
        let r = post_chat(&g, DEMO_KEY, &chat_body("fallback", true, usage), &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-tollgate-route"], "m/p2");
        let _ = sse_events(r).await;
    }
    let r = post_chat(&g, DEMO_KEY, &chat_body("fallback", false, false), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-bucket"], "routed");
    g.mock_options("p1", json!({"fault": "none"})).await;

    let recs = quiesce(&g, &key).await;
    let w = wallet(&g, &key).await;
    assert_conservation(&topups, &recs, &w);

    // Every billed record's cost + shortfall is its tokens at its prices; ample funds mean no
    // shortfall. All the kinds of ending are there.
    let mut statuses: HashMap<String, usize> = HashMap::new();
    for r in &recs {
        let status = r["status"].as_str().unwrap().to_string();
        *statuses.entry(status.clone()).or_default() += 1;
        assert_eq!(dec(&r["shortfall"]), Decimal::ZERO, "{r}");
        let billed = matches!(
            status.as_str(),
            "completed" | "client_disconnected" | "balance_exhausted"
        ) || (status == "upstream_error" && r["http_status"] == 200);
        if billed {
            let charge = price(
                r["input_tokens"].as_u64().unwrap(),
                r["input_per_mtok"].as_str().unwrap(),
            ) + price(
                r["output_tokens"].as_u64().unwrap(),
                r["output_per_mtok"].as_str().unwrap(),
            );
            assert_eq!(dec(&r["cost"]), charge, "{r}");
        }
    }
    assert!(recs.len() >= 63, "{} records", recs.len());
    for s in ["completed", "client_disconnected", "upstream_error"] {
        assert!(statuses.get(s).copied().unwrap_or(0) > 0, "{statuses:?}");
    }
    assert!(balance(&w, "routed") < d("2"), "routed never spent: {w:?}");
}

// ---------------------------------------------------------------------------------------------
// 3. Drain: 40 streams on a wallet for ~300 tokens

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_streams_drain_the_wallet_exactly() {
    let settlement = "[settlement]\ninitial_output_hold_tokens = 4\nmax_output_hold_tokens = 16\n";
    // Input free, one output token = 1 USD.
    let g = Arc::new(Gateway::start(Setup {
        mocks: vec![("p1", "")],
        body: one_bucket_body(settlement, "0", "1000000", "300"),
        data_dir: None,
    }));
    let key = g.demo_key_id().await;
    let topup = d("300");
    let one_token = d("1");
    let cancelled_before = g.mock_stats("p1").await["streams_cancelled"]
        .as_u64()
        .unwrap();

    // Watch the wallet while the streams run: invariant 2 at every observation.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (g, key, stop) = (g.clone(), key.clone(), stop.clone());
        tokio::spawn(async move {
            let mut polls = 0u32;
            while !stop.load(Ordering::Relaxed) && polls < 2000 {
                let w = wallet(&g, &key).await;
                let (bal, held, avail) = w["credit"];
                assert!(bal >= Decimal::ZERO, "balance {bal} < 0");
                assert!(avail >= Decimal::ZERO, "available {avail} < 0");
                assert!(held <= bal, "held {held} > balance {bal}");
                polls += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            polls
        })
    };

    let mut set = tokio::task::JoinSet::new();
    for i in 0..40 {
        let g = g.clone();
        set.spawn(async move {
            let body = chat_body(&format!("stream {i}"), true, true);
            let h = [("x-mock-tokens", "100"), ("x-mock-interval-ms", "5")];
            let r = post_chat(&g, DEMO_KEY, &body, &h).await;
            let status = r.status().as_u16();
            let id = request_id(&r);
            if status == 402 {
                let v: Value = r.json().await.unwrap();
                assert_envelope(&v, "insufficient_balance");
                return (id, status, Vec::new());
            }
            assert_eq!(status, 200);
            let ev = read_events(r).await.expect("stream broke");
            (id, status, ev)
        });
    }
    let mut results = Vec::new();
    while let Some(r) = set.join_next().await {
        results.push(r.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let polls = watcher.await.unwrap();
    assert!(polls >= 2, "the wallet was observed only {polls} times");

    let recs = quiesce(&g, &key).await;
    let by_id: HashMap<&str, &Value> = recs
        .iter()
        .map(|r| (r["request_id"].as_str().unwrap(), r))
        .collect();
    let mut cut = 0u64;
    let (mut completed, mut refused) = (0, 0);
    for (id, status, ev) in &results {
        let rec = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("no record {id}"));
        if *status == 402 {
            refused += 1;
            assert_eq!(rec["status"], "rejected");
            assert_eq!(dec(&rec["cost"]), Decimal::ZERO);
            continue;
        }
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
        let delivered = content_deltas(ev);
        let billed = rec["output_tokens"].as_u64().unwrap();
        assert!(
            delivered <= billed,
            "{id}: received {delivered} tokens, billed {billed}"
        );
        let usage: Value = ev
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .find(|v| v.get("tollgate").is_some())
            .expect("usage chunk");
        assert_eq!(usage["tollgate"]["request_id"], id.as_str());
        assert_eq!(dec(&usage["tollgate"]["cost"]), dec(&rec["cost"]));
        let last: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap_or(Value::Null);
        if last["error"]["code"] == "balance_exhausted" {
            cut += 1;
            assert_eq!(last["error"]["type"], "insufficient_quota");
            assert_eq!(rec["status"], "balance_exhausted");
            assert_eq!(usage["tollgate"]["status"], "balance_exhausted");
            assert_eq!(
                delivered, billed,
                "{id}: a cut stream bills what it delivered"
            );
        } else {
            completed += 1;
            assert_eq!(delivered, 100, "{id}: {ev:?}");
            assert_eq!(rec["status"], "completed");
        }
        assert_eq!(dec(&rec["cost"]), one_token * Decimal::from(billed));
        assert_eq!(dec(&rec["shortfall"]), Decimal::ZERO);
    }
    eprintln!("drain: {completed} completed, {cut} cut, {refused} refused, {polls} polls");
    assert_eq!(completed + refused + cut as usize, 40);
    assert!(cut > 0, "no stream was cut");

    let w = wallet(&g, &key).await;
    let final_balance = w["credit"].0;
    let charged: Decimal = recs.iter().map(|r| dec(&r["cost"])).sum();
    assert_eq!(topup - final_balance, charged);
    assert!(final_balance >= Decimal::ZERO);
    assert!(
        final_balance < one_token * Decimal::from(40),
        "left {final_balance} unspent"
    );
    assert_conservation(&[("credit".into(), topup)].into(), &recs, &w);

    // Every cut stream closed its upstream request: the mock saw it cancelled.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = g.mock_stats("p1").await["streams_cancelled"]
            .as_u64()
            .unwrap();
        if now - cancelled_before == cut {
            break;
        }
        assert!(
            Instant::now() < deadline && now - cancelled_before < cut,
            "mock cancelled {} streams, {cut} were cut",
            now - cancelled_before
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 4. kill -9 mid-stream

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_nine_then_recovery_conserves_money() {
    let data = tempfile::tempdir().unwrap();
    let (pin, pout) = ("500000", "1000000");
    let mut g = Gateway::start(Setup {
        mocks: vec![("p1", "")],
        body: one_bucket_body(
            "[settlement]\nflush_interval_ms = 50\n",
            pin,
            pout,
            "100000",
        ),
        data_dir: Some(data.path()),
    });
    let key = g.demo_key_id().await;
    let (s, v) = g
        .admin_post(
            &format!("/admin/keys/{key}/topup"),
            json!({"bucket": "credit", "amount": "0.5", "reference": "before-crash"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let topups: BTreeMap<String, Decimal> = [("credit".into(), d("100000.5"))].into();

    // A few requests that finish well before the kill.
    let mut finished = Vec::new();
    for i in 0..4 {
        let stream = i % 2 == 0;
        let r = post_chat(
            &g,
            DEMO_KEY,
            &chat_body("before the crash", stream, true),
            &[],
        )
        .await;
        assert_eq!(r.status(), 200);
        finished.push(request_id(&r));
        let _ = r.text().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(32);
    let mut set = tokio::task::JoinSet::new();
    let client_url = g.chat_url();
    // Fifteen long fast streams, and five short slow ones (fewer tokens than the initial hold:
    // no extension ever reports their consumption; only the flushes do, R9).
    let pace = |i: usize| if i < 15 { ("400", "10") } else { ("30", "60") };
    for i in 0..20 {
        let (url, tx) = (client_url.clone(), tx.clone());
        let (tokens, interval) = pace(i);
        set.spawn(async move {
            let r = http()
                .post(url)
                .bearer_auth(DEMO_KEY)
                .header("x-mock-tokens", tokens)
                .header("x-mock-interval-ms", interval)
                .json(&chat_body(&format!("long stream {i}"), true, true))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let id = request_id(&r);
            tx.send(id.clone()).await.unwrap();
            let slack: u64 = if i < 15 { 25 } else { 4 };
            // The kill ends the body, as an error or an early end: never with `[DONE]`.
            let ev = read_events(r).await.unwrap_or_else(|ev| ev);
            assert_ne!(ev.last().map(String::as_str), Some("[DONE]"), "{id} ended");
            (id, (content_deltas(&ev), slack))
        });
    }
    drop(tx);
    let mut open = Vec::new();
    for _ in 0..20 {
        let id = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        open.push(id);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    g.kill9();
    let mut delivered = HashMap::new();
    while let Some(r) = set.join_next().await {
        let (id, (n, slack)) = r.unwrap();
        assert!(n > 0, "{id} received nothing before the kill");
        delivered.insert(id, (n, slack));
    }

    g.spawn();
    let recs = quiesce(&g, &key).await;
    let w = wallet(&g, &key).await;
    assert_conservation(&topups, &recs, &w);

    let by_id: HashMap<&str, &Value> = recs
        .iter()
        .map(|r| (r["request_id"].as_str().unwrap(), r))
        .collect();
    for id in &finished {
        let r = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("finished request {id} lost its record"));
        assert_eq!(r["status"], "completed");
        assert!(dec(&r["cost"]) > Decimal::ZERO);
    }
    let interrupted = recs.iter().filter(|r| r["status"] == "interrupted").count();
    assert_eq!(interrupted, 20, "interrupted records");
    for id in &open {
        let r = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("open stream {id} has no record"));
        assert_eq!(r["status"], "interrupted", "{r}");
        assert_eq!(r["usage_source"], "counted");
        let billed = r["output_tokens"].as_u64().unwrap();
        let (received, slack) = delivered[id];
        // The consumption persisted at the last flush is what is billed: never more than the
        // client received, and short of it by at most about one flush interval of streaming
        // (R9; the slack is 250 ms of the stream's pace, for a busy machine).
        assert!(billed <= received, "{id}: billed {billed} > {received}");
        assert!(billed > 0, "{id}: consumption was never persisted");
        assert!(
            billed + slack >= received,
            "{id}: billed {billed}, received {received}: more than a flush interval unbilled"
        );
        let charge = price(r["input_tokens"].as_u64().unwrap(), pin) + price(billed, pout);
        assert_eq!(dec(&r["cost"]) + dec(&r["shortfall"]), charge, "{r}");
    }

    // The restarted gateway serves and bills as before.
    let r = post_chat(&g, DEMO_KEY, &chat_body("after", true, true), &[]).await;
    assert_eq!(r.status(), 200);
    let _ = sse_events(r).await;
    let recs = quiesce(&g, &key).await;
    assert_conservation(&topups, &recs, &wallet(&g, &key).await);
}

// ---------------------------------------------------------------------------------------------
// 5. Admin top-up validation and idempotency

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_topup_rejects_bad_input_and_is_idempotent() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1", "1"),
        data_dir: None,
    });
    let key = g.demo_key_id().await;
    let path = format!("/admin/keys/{key}/topup");
    let before = wallet(&g, &key).await;

    let bad: Vec<(Value, u16, &str)> = vec![
        (
            json!({"bucket": "credit", "amount": "-1"}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "credit", "amount": "-0.000001"}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "credit", "amount": "0"}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "credit", "amount": "0.000"}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "credit", "amount": "abc"}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "credit", "amount": ""}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "credit", "amount": {"value": "1"}}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "credit", "amount": ["1"]}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "credit", "amount": null}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "credit", "amount": true}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "gold", "amount": "1"}),
            400,
            "invalid_value",
        ),
        (json!({"amount": "1"}), 400, "invalid_value"),
        (json!({"bucket": "credit"}), 400, "invalid_value"),
        // R40: at most 18 integer digits (Decimal's largest value overflowed the wallet and
        // took its actor down with a 503) and the bucket's scale (6 here).
        (
            json!({"bucket": "credit", "amount": "79228162514264337593543950335"}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "credit", "amount": "1000000000000000000"}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "credit", "amount": "0.0000001"}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "credit", "amount": 1e30}),
            400,
            "invalid_value",
        ),
        (
            json!({"bucket": "credit", "amount": "1", "reference": ""}),
            400,
            "invalid_value",
        ),
    ];
    for (body, status, code) in &bad {
        let (s, v) = g.admin_post(&path, body.clone()).await;
        assert_eq!(s, *status, "{body} → {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body} → {v}");
        assert!(v["error"]["message"].is_string(), "{body} → {v}");
        // Missing fields may be reported as missing_field; values as invalid_value.
        let got = v["error"]["code"].as_str().unwrap();
        assert!(got == *code || got == "missing_field", "{body} → {v}");
    }

    let (s, v) = g
        .admin_post(
            "/admin/keys/no-such-key/topup",
            json!({"bucket": "credit", "amount": "1"}),
        )
        .await;
    assert_eq!(s, 404, "{v}");
    assert_envelope(&v, "not_found");

    let raw = |body: &'static str, token: Option<&'static str>| {
        let url = format!("{}{}", g.admin_url, path);
        async move {
            let mut r = http()
                .post(url)
                .header("content-type", "application/json")
                .body(body);
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            let r = r.send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, v) = raw(r#"{"bucket": "credit", "amount": "1""#, Some(ADMIN_TOKEN)).await;
    assert_eq!(s, 400, "{v}");
    assert_envelope(&v, "invalid_json");
    let (s, v) = raw("not json at all", Some(ADMIN_TOKEN)).await;
    assert_eq!(s, 400, "{v}");
    assert_envelope(&v, "invalid_json");
    let (s, v) = raw(r#"{"bucket": "credit", "amount": "1"}"#, None).await;
    assert_eq!(s, 401, "{v}");
    assert!(v["error"]["code"].is_string(), "{v}");
    let (s, v) = raw(
        r#"{"bucket": "credit", "amount": "1"}"#,
        Some("wrong-token"),
    )
    .await;
    assert_eq!(s, 401, "{v}");

    assert_eq!(
        wallet(&g, &key).await,
        before,
        "a refused top-up changed the wallet"
    );

    // Idempotent reference: applied once.
    let body = json!({"bucket": "credit", "amount": "2.5", "reference": "inv-42"});
    let (s, v) = g.admin_post(&path, body.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        dec(&v["buckets"]["credit"]["balance"]),
        before["credit"].0 + d("2.5")
    );
    let (s, v) = g.admin_post(&path, body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        dec(&v["buckets"]["credit"]["balance"]),
        before["credit"].0 + d("2.5")
    );
    // "2.50" is the same amount.
    let (s, _) = g
        .admin_post(
            &path,
            json!({"bucket": "credit", "amount": "2.50", "reference": "inv-42"}),
        )
        .await;
    assert_eq!(s, 200);
    for conflict in [
        json!({"bucket": "credit", "amount": "3", "reference": "inv-42"}),
        json!({"bucket": "routed", "amount": "2.5", "reference": "inv-42"}),
    ] {
        let (s, v) = g.admin_post(&path, conflict.clone()).await;
        assert_eq!(s, 409, "{conflict} → {v}");
        assert_envelope(&v, "reference_conflict");
    }
    let after = wallet(&g, &key).await;
    assert_eq!(after["credit"].0, before["credit"].0 + d("2.5"));
    assert_eq!(after["routed"], before["routed"]);

    // Concurrent repeats of a fresh reference still apply once.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (url, path) = (g.admin_url.clone(), path.clone());
        set.spawn(async move {
            http()
                .post(format!("{url}{path}"))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({"bucket": "routed", "amount": "0.1", "reference": "race"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        });
    }
    while let Some(s) = set.join_next().await {
        assert_eq!(s.unwrap(), 200);
    }
    let last = wallet(&g, &key).await;
    assert_eq!(last["routed"].0, before["routed"].0 + d("0.1"));
    assert_eq!(last["credit"].0, after["credit"].0);

    // The largest amount R40 allows is applied, and the wallet goes on serving.
    let (s, v) = g
        .admin_post(
            &path,
            json!({"bucket": "credit", "amount": "999999999999999999.999999"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        dec(&v["buckets"]["credit"]["balance"]),
        after["credit"].0 + d("999999999999999999.999999")
    );
    let r = post_chat(&g, DEMO_KEY, &chat_body("after", true, true), &[]).await;
    assert_eq!(r.status(), 200);
    let _ = sse_events(r).await;
    g.assert_no_panic();
}

// ---------------------------------------------------------------------------------------------
// 6. 402 and 403 leave rejected records at cost 0

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_recorded_at_zero_cost() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1", "1"),
        data_dir: None,
    });
    let create = |body: Value| {
        let g = &g;
        async move {
            let (s, v) = g.admin_post("/admin/keys", body).await;
            assert_eq!(s, 201, "{v}");
            (
                v["id"].as_str().unwrap().to_string(),
                v["secret"].as_str().unwrap().to_string(),
            )
        }
    };

    // 1 input token at 1/M + 1 output token at 2/M = 0.000003 needed; 0.000001 available.
    let (poor, poor_secret) = create(json!({"name": "poor", "buckets": ["credit"]})).await;
    let (s, v) = g
        .admin_post(
            &format!("/admin/keys/{poor}/topup"),
            json!({"bucket": "credit", "amount": "0.000001"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let before = wallet(&g, &poor).await;
    for stream in [true, false] {
        let r = post_chat(&g, &poor_secret, &chat_body("hi", stream, true), &[]).await;
        assert_eq!(r.status(), 402);
        let id = request_id(&r);
        let v: Value = r.json().await.unwrap();
        assert_envelope(&v, "insufficient_balance");
        assert_eq!(v["error"]["type"], "insufficient_quota");
        let rec = record(&g, &id).await;
        assert_eq!(rec["status"], "rejected", "{rec}");
        assert_eq!(rec["http_status"], 402);
        assert_eq!(rec["cost"], "0", "{rec}");
        assert_eq!(dec(&rec["shortfall"]), Decimal::ZERO);
    }
    // Exactly enough for input + one output token passes the gate.
    let (s, _) = g
        .admin_post(
            &format!("/admin/keys/{poor}/topup"),
            json!({"bucket": "credit", "amount": "0.000002"}),
        )
        .await;
    assert_eq!(s, 200);
    let r = post_chat(&g, &poor_secret, &chat_body("hi", true, true), &[]).await;
    assert_eq!(r.status(), 200);
    let ev = sse_events(r).await;
    assert_eq!(ev.last().unwrap(), "[DONE]");
    assert_eq!(content_deltas(&ev), 1, "one paid token, then the cut");
    let recs = quiesce(&g, &poor).await;
    let w = wallet(&g, &poor).await;
    assert_eq!(w["credit"].0, Decimal::ZERO);
    assert_conservation(&[("credit".into(), d("0.000003"))].into(), &recs, &w);
    assert_eq!(before["credit"].0, d("0.000001"));

    let (emb_only, emb_secret) = create(json!({"name": "emb-only", "models": ["emb"]})).await;
    let before = wallet(&g, &emb_only).await;
    let r = post_chat(&g, &emb_secret, &chat_body("hello", true, true), &[]).await;
    assert_eq!(r.status(), 403);
    let id = request_id(&r);
    let v: Value = r.json().await.unwrap();
    assert_envelope(&v, "model_not_allowed");
    assert_eq!(v["error"]["type"], "permission_error");
    let rec = record(&g, &id).await;
    assert_eq!(rec["status"], "rejected", "{rec}");
    assert_eq!(rec["http_status"], 403);
    assert_eq!(rec["cost"], "0", "{rec}");
    assert_eq!(wallet(&g, &emb_only).await, before);
}

// ---------------------------------------------------------------------------------------------
// 7. Shutdown settles every open stream itself, also on a second signal

/// SIGTERM, then a second SIGTERM at once (cut now). Streams whose clients read end with the
/// shutdown event; streams whose clients stopped reading are dropped when the connections are
/// closed. Every one of them is settled before the process exits: the next start finds no open
/// hold to recover, every request has its record from its own settlement (HTTP status 200), and
/// money is conserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_signal_still_settles_every_open_stream_before_exit() {
    let data = tempfile::tempdir().unwrap();
    let mut g = Gateway::start_extra(
        Setup {
            mocks: vec![("p1", "")],
            body: one_bucket_body("[settlement]\nflush_interval_ms = 50\n", "1", "2", "1000"),
            data_dir: Some(data.path()),
        },
        Extra {
            server: "shutdown_drain_s = 30".into(),
            ..Extra::default()
        },
    );
    let key = g.demo_key_id().await;
    let topups: BTreeMap<String, Decimal> = [("credit".into(), d("1000"))].into();
    let mut readers = tokio::task::JoinSet::new();
    for i in 0..10 {
        let r = post_chat(
            &g,
            DEMO_KEY,
            &chat_body(&format!("reader {i}"), true, true),
            &[("x-mock-tokens", "5000"), ("x-mock-interval-ms", "5")],
        )
        .await;
        assert_eq!(r.status(), 200);
        readers.spawn(async move { read_events(r).await.unwrap_or_else(|e| e) });
    }
    // Clients that send a request and never read: their streams stall on a full socket.
    let addr = g.client_url.trim_start_matches("http://").to_string();
    let mut stalled = Vec::new();
    for i in 0..10 {
        let body = chat_body(&format!("stalled {i}"), true, true).to_string();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {DEMO_KEY}\r\ncontent-type: application/json\r\nx-mock-tokens: 100000\r\nx-mock-interval-ms: 0\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
            .await
            .unwrap();
        stalled.push(s);
    }
    // Every stream has started (20 open holds) before the signals.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = http()
            .get(format!("{}/metrics", g.admin_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let holds = text
            .lines()
            .find_map(|l| l.strip_prefix("tollgate_wallet_holds_active "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if holds >= 20.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "streams did not start: {holds} holds"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let child = g.child.take().unwrap();
    let pid = child.id().to_string();
    let t0 = Instant::now();
    for _ in 0..2 {
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    drop(stalled);
    while readers.join_next().await.is_some() {}
    let first_run = g.log();

    g.spawn();
    let log = g.log();
    let restart = &log[first_run.len().min(log.len())..];
    assert!(
        !restart.contains("settled holds left by a crash"),
        "open holds were left for recovery:\n{restart}"
    );
    let recs = quiesce(&g, &key).await;
    assert_eq!(recs.len(), 20, "every stream has its record");
    for r in &recs {
        if r["http_status"] == 499 {
            // Still waiting for its first token at the cut: nothing delivered, nothing charged.
            assert_eq!(r["status"], "client_disconnected", "{r}");
            assert_eq!(dec(&r["cost"]), Decimal::ZERO, "{r}");
            continue;
        }
        assert_eq!(r["http_status"], 200, "not settled by its stream: {r}");
        assert!(
            ["interrupted", "client_disconnected"].contains(&r["status"].as_str().unwrap()),
            "{r}"
        );
        assert!(r["output_tokens"].as_u64().unwrap() > 0, "{r}");
    }
    assert_conservation(&topups, &recs, &wallet(&g, &key).await);
    g.assert_no_panic();
}
