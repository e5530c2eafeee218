//! End-to-end tests of the client API (docs/api.md, R22–R28): response metadata, what the upstream
//! receives, stream endings, the error table, upstream failures and timeouts, client disconnects,
//! HTTP/2 to the upstream, embeddings, the model list, and hostile request bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};

/// Every client request in this file is bounded by this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

fn http() -> ::reqwest::Client {
    bounded_client(REQUEST_TIMEOUT)
}

/// Bounds a harness call that has no timeout of its own.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(REQUEST_TIMEOUT, f)
        .await
        .expect("timed out after 20 s")
}

fn standard(key_extra: &str) -> Gateway {
    Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body(key_extra, "1", "1"),
        data_dir: None,
    })
}

fn chat(g: &Gateway, body: &Value) -> ::reqwest::RequestBuilder {
    http().post(g.chat_url()).bearer_auth(DEMO_KEY).json(body)
}

fn hello() -> Value {
    json!([{"role": "user", "content": "12345678"}])
}

fn header<'a>(r: &'a ::reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

/// Number of content deltas over every chunk (R5 `chunks`: one token per non-empty content).
fn content_deltas(events: &[String]) -> usize {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"]
                .as_array()
                .map(|cs| {
                    cs.iter()
                        .filter(|c| {
                            c["delta"]["content"]
                                .as_str()
                                .is_some_and(|s| !s.is_empty())
                        })
                        .count()
                })
                .unwrap_or(0)
        })
        .sum()
}

fn json_events(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// Asserts the OpenAI envelope and returns it. `with_request_id`: the response must carry
/// `x-tollgate-request-id` (every response after authentication, R28).
async fn assert_error(
    r: ::reqwest::Response,
    status: u16,
    kind: &str,
    code: &str,
    with_request_id: bool,
    what: &str,
) -> Value {
    let got = r.status().as_u16();
    let has_id = r.headers().contains_key("x-tollgate-request-id");
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "{what}: {text}");
    if with_request_id {
        assert!(has_id, "{what}: no x-tollgate-request-id");
    }
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
    let err = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: {text}"));
    let mut keys: Vec<&str> = err.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{what}: {text}");
    assert_eq!(err["type"], kind, "{what}: {text}");
    assert_eq!(err["code"], code, "{what}: {text}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {text}"
    );
    assert!(
        err["param"].is_null() || err["param"].is_string(),
        "{what}: {text}"
    );
    v
}

async fn mock_last(g: &Gateway, id: &str) -> Value {
    http()
        .get(format!("{}/_mock/last", g.mock_url(id)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn ledger_record(g: &Gateway, request_id: &str) -> Option<Value> {
    let r = http()
        .get(format!("{}/admin/ledger/{request_id}", g.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    if r.status() == 200 {
        Some(r.json().await.unwrap())
    } else {
        None
    }
}

/// The ledger record of a request, waiting for the asynchronous writer (at most 5 s).
async fn wait_record(g: &Gateway, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = ledger_record(g, request_id).await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no ledger record for {request_id}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stat(v: &Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("stat {name}: {v}"))
}

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

#[tokio::test]
async fn stream_and_non_stream_carry_route_metadata() {
    let g = standard("");

    // Stream, no include_usage.
    let r = chat(
        &g,
        &json!({"model": "m", "stream": true, "messages": hello()}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "x-tollgate-request-id").starts_with("req_"));
    assert_eq!(header(&r, "x-tollgate-route"), "m/p1");
    assert_eq!(header(&r, "x-tollgate-upstream-model"), "up-m1");
    assert_eq!(header(&r, "x-tollgate-bucket"), "credit");
    assert_eq!(header(&r, "x-tollgate-fallbacks"), "0");
    assert_eq!(header(&r, "x-tollgate-retries"), "0");
    assert!(header(&r, "content-type").starts_with("text/event-stream"));
    let events = sse_events(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(content_deltas(&events), 8, "{events:?}");
    let chunks = json_events(&events);
    assert!(!chunks.is_empty());
    for c in &chunks {
        assert_eq!(c["model"], "up-m1", "the upstream's model is kept: {c}");
        assert_eq!(c["object"], "chat.completion.chunk");
    }

    // Non-stream.
    let r = chat(&g, &json!({"model": "m", "messages": hello()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rid = header(&r, "x-tollgate-request-id").to_string();
    assert!(rid.starts_with("req_"));
    assert_eq!(header(&r, "x-tollgate-route"), "m/p1");
    assert_eq!(header(&r, "x-tollgate-upstream-model"), "up-m1");
    assert_eq!(header(&r, "x-tollgate-bucket"), "credit");
    assert_eq!(header(&r, "x-tollgate-fallbacks"), "0");
    assert_eq!(header(&r, "x-tollgate-retries"), "0");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "up-m1");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    let t = &v["tollgate"];
    assert_eq!(t["request_id"], rid.as_str());
    assert_eq!(t["route"], "m/p1");
    assert_eq!(t["provider"], "p1");
    assert_eq!(t["upstream_model"], "up-m1");
    assert_eq!(t["bucket"], "credit");
    assert_eq!(t["currency"], "USD");
    assert_eq!(t["status"], "completed");
    assert_eq!(t["input_tokens"], 2);
    assert_eq!(t["output_tokens"], 8);
    assert_eq!(t["fallbacks"], 0);
    assert_eq!(t["retries"], 0);
    // 2 input tokens at 1/M + 8 output tokens at 2/M, as a decimal string.
    assert!(t["cost"].is_string(), "cost must be a decimal string: {t}");
    assert_eq!(dec(&t["cost"]), d("0.000018"));

    // The ledger agrees with the response.
    let rec = wait_record(&g, &rid).await;
    assert_eq!(rec["status"], "completed");
    assert_eq!(dec(&rec["cost"]), d("0.000018"));
    assert_eq!(rec["route"], "m/p1");
}

#[tokio::test]
async fn upstream_gets_rewritten_model_and_untouched_fields() {
    let g = standard("");
    let extra = json!({"top_p": 0.5, "user": "end-user-1", "metadata": {"a": [1, {"b": null}]},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]});

    // Stream without stream_options: include_usage is forced on upstream only.
    let mut sent = json!({"model": "m", "stream": true, "temperature": 0.25, "messages": hello()});
    for (k, v) in extra.as_object().unwrap() {
        sent[k] = v.clone();
    }
    let r = chat(&g, &sent).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let events = sse_events(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let last = mock_last(&g, "p1").await;
    assert!(
        last["path"]
            .as_str()
            .unwrap()
            .ends_with("/chat/completions"),
        "{last}"
    );
    let body = &last["body"];
    assert_eq!(body["model"], "up-m1");
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["temperature"], 0.25);
    let mut expected = sent.clone();
    expected["model"] = json!("up-m1");
    expected["stream_options"] = json!({"include_usage": true});
    assert_eq!(body, &expected, "only model and stream_options change");
    assert_eq!(last["content_type"], "application/json");

    // A client that already asked keeps its other stream_options.
    let mut sent2 = sent.clone();
    sent2["stream_options"] = json!({"include_usage": false, "x_extra": 1});
    let r = chat(&g, &sent2).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let events = sse_events(r).await;
    assert!(json_events(&events)
        .iter()
        .all(|e| e.get("usage").is_none_or(Value::is_null)));
    let last = mock_last(&g, "p1").await;
    assert_eq!(last["body"]["stream_options"]["include_usage"], true);
    assert_eq!(last["body"]["stream_options"]["x_extra"], 1);

    // Non-stream: only the model changes.
    let mut sent3 =
        json!({"model": "m", "temperature": 1.5, "max_tokens": 100, "messages": hello()});
    for (k, v) in extra.as_object().unwrap() {
        sent3[k] = v.clone();
    }
    let r = chat(&g, &sent3).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let _: Value = r.json().await.unwrap();
    let last = mock_last(&g, "p1").await;
    let mut expected = sent3.clone();
    expected["model"] = json!("up-m1");
    assert_eq!(last["body"], expected);
}

#[tokio::test]
async fn usage_chunk_only_when_asked() {
    let g = standard("");
    let r = chat(
        &g,
        &json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
            "messages": hello()}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let rid = header(&r, "x-tollgate-request-id").to_string();
    let events = sse_events(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let n = events.len();
    let usage: Value = serde_json::from_str(&events[n - 2]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], 2);
    assert_eq!(usage["usage"]["completion_tokens"], 8);
    assert_eq!(usage["usage"]["total_tokens"], 10);
    let t = &usage["tollgate"];
    assert_eq!(t["status"], "completed");
    assert_eq!(t["request_id"], rid.as_str());
    assert_eq!(t["route"], "m/p1");
    assert_eq!(t["bucket"], "credit");
    assert_eq!(t["currency"], "USD");
    assert_eq!(t["input_tokens"], 2);
    assert_eq!(t["output_tokens"], 8);
    assert_eq!(dec(&t["cost"]), d("0.000018"));
    // Exactly one usage chunk, and it is the last before [DONE].
    let with_usage = json_events(&events)
        .iter()
        .filter(|e| e.get("usage").is_some_and(|u| !u.is_null()))
        .count();
    assert_eq!(with_usage, 1, "{events:?}");
    assert_eq!(content_deltas(&events), 8);

    // Not asked (absent, or false): no usage anywhere, still [DONE].
    for opts in [json!(null), json!({"include_usage": false})] {
        let mut body = json!({"model": "m", "stream": true, "messages": hello()});
        if !opts.is_null() {
            body["stream_options"] = opts.clone();
        }
        let r = chat(&g, &body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let events = sse_events(r).await;
        assert_eq!(events.last().unwrap(), "[DONE]", "{opts}");
        assert_eq!(content_deltas(&events), 8, "{opts}");
        for e in json_events(&events) {
            assert!(
                e.get("usage").is_none_or(Value::is_null),
                "unasked usage chunk ({opts}): {e}"
            );
            assert!(e.get("tollgate").is_none(), "unasked tollgate object: {e}");
        }
    }
}

/// (what, url, body bytes, status, code, param)
type ErrorCase<'a> = (&'a str, &'a str, Vec<u8>, u16, &'a str, Option<&'a str>);

#[tokio::test]
async fn malformed_requests_get_the_openai_envelope() {
    let g = standard("");
    let chat_url = g.chat_url();
    let emb_url = format!("{}/v1/embeddings", g.client_url);
    let m = hello();
    let cases: Vec<ErrorCase> = vec![
        (
            "truncated JSON",
            &chat_url,
            b"{\"model\": \"m\", ".to_vec(),
            400,
            "invalid_json",
            None,
        ),
        (
            "empty body",
            &chat_url,
            Vec::new(),
            400,
            "invalid_json",
            None,
        ),
        (
            "JSON array",
            &chat_url,
            b"[{\"model\": \"m\"}]".to_vec(),
            400,
            "invalid_json",
            None,
        ),
        (
            "JSON string",
            &chat_url,
            b"\"m\"".to_vec(),
            400,
            "invalid_json",
            None,
        ),
        (
            "invalid UTF-8",
            &chat_url,
            b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}"
                .to_vec(),
            400,
            "invalid_json",
            None,
        ),
        (
            "no model",
            &chat_url,
            json!({"messages": m}).to_string().into_bytes(),
            400,
            "missing_field",
            Some("model"),
        ),
        (
            "null model",
            &chat_url,
            json!({"model": null, "messages": m})
                .to_string()
                .into_bytes(),
            400,
            "missing_field",
            Some("model"),
        ),
        (
            "no messages",
            &chat_url,
            json!({"model": "m"}).to_string().into_bytes(),
            400,
            "missing_field",
            Some("messages"),
        ),
        (
            "embeddings without input",
            &emb_url,
            json!({"model": "emb"}).to_string().into_bytes(),
            400,
            "missing_field",
            Some("input"),
        ),
        (
            "model not a string",
            &chat_url,
            json!({"model": 5, "messages": m}).to_string().into_bytes(),
            400,
            "invalid_value",
            Some("model"),
        ),
        (
            "messages not an array",
            &chat_url,
            json!({"model": "m", "messages": "hi"})
                .to_string()
                .into_bytes(),
            400,
            "invalid_value",
            Some("messages"),
        ),
        (
            "stream not a bool",
            &chat_url,
            json!({"model": "m", "messages": m, "stream": "yes"})
                .to_string()
                .into_bytes(),
            400,
            "invalid_value",
            Some("stream"),
        ),
        (
            "max_tokens 0",
            &chat_url,
            json!({"model": "m", "messages": m, "max_tokens": 0})
                .to_string()
                .into_bytes(),
            400,
            "invalid_value",
            Some("max_tokens"),
        ),
        (
            "max_tokens \"5\"",
            &chat_url,
            json!({"model": "m", "messages": m, "max_tokens": "5"})
                .to_string()
                .into_bytes(),
            400,
            "invalid_value",
            Some("max_tokens"),
        ),
        (
            "max_completion_tokens 1.5",
            &chat_url,
            json!({"model": "m", "messages": m, "max_completion_tokens": 1.5})
                .to_string()
                .into_bytes(),
            400,
            "invalid_value",
            Some("max_completion_tokens"),
        ),
        (
            "n -1",
            &chat_url,
            json!({"model": "m", "messages": m, "n": -1})
                .to_string()
                .into_bytes(),
            400,
            "invalid_value",
            Some("n"),
        ),
        (
            "stream_options not an object",
            &chat_url,
            json!({"model": "m", "messages": m, "stream": true, "stream_options": true})
                .to_string()
                .into_bytes(),
            400,
            "invalid_value",
            Some("stream_options"),
        ),
        (
            "streamed embeddings",
            &emb_url,
            json!({"model": "emb", "input": "x", "stream": true})
                .to_string()
                .into_bytes(),
            400,
            "invalid_value",
            Some("stream"),
        ),
        (
            "unknown model",
            &chat_url,
            json!({"model": "nope", "messages": m})
                .to_string()
                .into_bytes(),
            404,
            "model_not_found",
            None,
        ),
        (
            "chat on an embeddings model",
            &chat_url,
            json!({"model": "emb", "messages": m})
                .to_string()
                .into_bytes(),
            404,
            "model_not_found",
            None,
        ),
        (
            "embeddings on a chat model",
            &emb_url,
            json!({"model": "m", "input": "x"}).to_string().into_bytes(),
            404,
            "model_not_found",
            None,
        ),
    ];
    for (what, url, body, status, code, param) in cases {
        let r = http()
            .post(url)
            .bearer_auth(DEMO_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let v = assert_error(r, status, "invalid_request_error", code, true, what).await;
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{what}: {v}");
        }
    }

    // A body without Content-Type is read as JSON too (R25).
    let r = http()
        .post(&chat_url)
        .bearer_auth(DEMO_KEY)
        .body(json!({"model": "m", "messages": m}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Authentication.
    let body = json!({"model": "m", "messages": m});
    let cases = [
        ("no key", http().post(&chat_url).json(&body)),
        (
            "wrong key",
            http()
                .post(&chat_url)
                .bearer_auth("tg-wrong-key-000")
                .json(&body),
        ),
        (
            "not bearer",
            http()
                .post(&chat_url)
                .header("authorization", format!("Basic {DEMO_KEY}"))
                .json(&body),
        ),
        (
            "models, no key",
            http().get(format!("{}/v1/models", g.client_url)),
        ),
    ];
    for (what, req) in cases {
        let r = req.send().await.unwrap();
        assert_error(
            r,
            401,
            "invalid_request_error",
            "invalid_api_key",
            false,
            what,
        )
        .await;
    }

    // Body over the default max_body_bytes (4 MiB), with a length...
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "a".repeat(4 * 1024 * 1024)}]})
        .to_string();
    let r = http()
        .post(&chat_url)
        .bearer_auth(DEMO_KEY)
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let v = assert_error(
        r,
        413,
        "invalid_request_error",
        "request_too_large",
        true,
        "413",
    )
    .await;
    assert!(
        v["error"]["message"].as_str().unwrap().contains("4194304"),
        "{v}"
    );
    // ...and chunked, without one.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .as_bytes()
        .chunks(64 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let r = http()
        .post(&chat_url)
        .bearer_auth(DEMO_KEY)
        .body(::reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        413,
        "invalid_request_error",
        "request_too_large",
        true,
        "413 chunked",
    )
    .await;
    // Authentication comes before the size check (R28).
    let r = http()
        .post(&chat_url)
        .bearer_auth("tg-wrong-key-000")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        401,
        "invalid_request_error",
        "invalid_api_key",
        false,
        "401 before 413",
    )
    .await;

    // Unknown paths and wrong methods.
    let cases = [
        (
            "unknown path",
            http()
                .get(format!("{}/v1/nothing", g.client_url))
                .bearer_auth(DEMO_KEY),
            404,
            "not_found",
        ),
        (
            "unknown path (POST)",
            http()
                .post(format!("{}/v2/chat/completions", g.client_url))
                .bearer_auth(DEMO_KEY)
                .json(&body),
            404,
            "not_found",
        ),
        (
            "admin on client",
            http()
                .get(format!("{}/admin/keys", g.client_url))
                .bearer_auth(ADMIN_TOKEN),
            404,
            "not_found",
        ),
        (
            "GET chat",
            http().get(&chat_url).bearer_auth(DEMO_KEY),
            405,
            "method_not_allowed",
        ),
        (
            "DELETE emb",
            http().delete(&emb_url).bearer_auth(DEMO_KEY),
            405,
            "method_not_allowed",
        ),
    ];
    for (what, req, status, code) in cases {
        let r = req.send().await.unwrap();
        assert_error(r, status, "invalid_request_error", code, false, what).await;
    }

    // Rejected authenticated requests (404) leave a `rejected` record; 400s leave none (R15).
    let r = chat(&g, &json!({"model": "nope", "messages": m}))
        .send()
        .await
        .unwrap();
    let rid = header(&r, "x-tollgate-request-id").to_string();
    assert_eq!(r.status(), 404);
    let rec = wait_record(&g, &rid).await;
    assert_eq!(rec["status"], "rejected");
    assert_eq!(rec["http_status"], 404);
    assert_eq!(dec(&rec["cost"]), Decimal::ZERO);
    let r = chat(&g, &json!({"model": 5, "messages": m}))
        .send()
        .await
        .unwrap();
    let rid = header(&r, "x-tollgate-request-id").to_string();
    assert_eq!(r.status(), 400);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        ledger_record(&g, &rid).await.is_none(),
        "a 400 left a record"
    );
}

#[tokio::test]
async fn upstream_500_everywhere_is_502() {
    // Cross-bucket fallback allowed: both routes are tried, each with one retry.
    let g = standard("allow_cross_bucket_fallback = true");
    within(g.mock_options("p1", json!({"fault": "500"}))).await;
    within(g.mock_options("p2", json!({"fault": "500"}))).await;
    let before1 = stat(&within(g.mock_stats("p1")).await, "chat_requests");
    let before2 = stat(&within(g.mock_stats("p2")).await, "chat_requests");
    for stream in [false, true] {
        let r = chat(
            &g,
            &json!({"model": "m", "stream": stream, "messages": hello()}),
        )
        .send()
        .await
        .unwrap();
        let rid = header(&r, "x-tollgate-request-id").to_string();
        let v = assert_error(r, 502, "upstream_error", "upstream_error", true, "502").await;
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("m/p1") && msg.contains("m/p2"), "{msg}");
        assert!(msg.contains("http_500"), "{msg}");
        let rec = wait_record(&g, &rid).await;
        assert_eq!(rec["status"], "upstream_error");
        assert_eq!(rec["http_status"], 502);
        let outcomes: Vec<(&str, &str)> = rec["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["route"].as_str().unwrap(), a["outcome"].as_str().unwrap()))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("m/p1", "http_500"),
                ("m/p1", "http_500"),
                ("m/p2", "http_500"),
                ("m/p2", "http_500")
            ],
            "{rec}"
        );
    }
    assert_eq!(
        stat(&within(g.mock_stats("p1")).await, "chat_requests") - before1,
        4
    );
    assert_eq!(
        stat(&within(g.mock_stats("p2")).await, "chat_requests") - before2,
        4
    );

    // Without cross-bucket fallback only m/p1 is sent; the per-request fault header does it.
    let g = standard("");
    let r = chat(&g, &json!({"model": "m", "messages": hello()}))
        .header("x-mock-fault", "500")
        .send()
        .await
        .unwrap();
    let v = assert_error(r, 502, "upstream_error", "upstream_error", true, "502 home").await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("m/p1") && msg.contains("http_500"), "{msg}");
    assert_eq!(stat(&within(g.mock_stats("p2")).await, "chat_requests"), 0);
    // The fault was per request: the next one is served.
    let r = chat(&g, &json!({"model": "m", "messages": hello()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn upstream_hang_is_504_after_first_token_timeout() {
    let g = Gateway::start(Setup {
        mocks: vec![
            ("p1", "first_token_timeout_ms = 300\nidle_timeout_ms = 400"),
            ("p2", "first_token_timeout_ms = 300\nidle_timeout_ms = 400"),
        ],
        body: standard_body("", "1", "1"),
        data_dir: None,
    });
    // A stream waits first_token_timeout_ms for its first token; a non-stream request waits
    // for the whole answer, bounded by the larger of that and idle_timeout_ms.
    for (stream, per_attempt_ms) in [(false, 400), (true, 300)] {
        let started = Instant::now();
        let r = chat(
            &g,
            &json!({"model": "m", "stream": stream, "messages": hello()}),
        )
        .header("x-mock-fault", "hang")
        .send()
        .await
        .unwrap();
        let elapsed = started.elapsed();
        let rid = header(&r, "x-tollgate-request-id").to_string();
        let v = assert_error(r, 504, "upstream_error", "upstream_timeout", true, "504").await;
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("m/p1"), "{msg}");
        // Two attempts (one retry), each cut at its timeout, not the 30 s default.
        assert!(
            elapsed >= Duration::from_millis(2 * per_attempt_ms),
            "{elapsed:?}"
        );
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
        let rec = wait_record(&g, &rid).await;
        assert_eq!(rec["status"], "upstream_error");
        assert_eq!(rec["http_status"], 504);
        let sent: Vec<&Value> = rec["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["route"] == "m/p1")
            .collect();
        assert_eq!(sent.len(), 2, "{rec}");
        assert!(sent.iter().all(|a| a["outcome"] == "timeout"), "{rec}");
    }
    // The gateway let go of the hung upstream requests.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let s = within(g.mock_stats("p1")).await;
        // The only open connection left is this stats request's own.
        if stat(&s, "streams_cancelled") == 2 && stat(&s, "open_connections") <= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hung upstream requests kept open: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = chat(&g, &json!({"model": "m", "messages": hello()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn client_disconnect_cancels_upstream_and_bills_what_was_sent() {
    let g = standard("");
    let before = stat(&within(g.mock_stats("p1")).await, "streams_cancelled");
    let mut r = chat(
        &g,
        &json!({"model": "m", "stream": true, "messages": hello()}),
    )
    .header("x-mock-tokens", "200")
    .header("x-mock-interval-ms", "20")
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let rid = header(&r, "x-tollgate-request-id").to_string();
    let mut seen = String::new();
    while seen.matches("\"content\"").count() < 3 {
        let chunk = r.chunk().await.unwrap().expect("stream ended early");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(r);
    let dropped = Instant::now();
    loop {
        let s = within(g.mock_stats("p1")).await;
        if stat(&s, "streams_cancelled") > before {
            break;
        }
        assert!(
            dropped.elapsed() < Duration::from_secs(1),
            "upstream stream not cancelled within 1 s: {s}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rec = wait_record(&g, &rid).await;
    assert_eq!(rec["status"], "client_disconnected", "{rec}");
    let out = rec["output_tokens"].as_u64().unwrap();
    assert!(out > 0 && out < 200, "{rec}");
    assert_eq!(rec["usage_source"], "counted", "{rec}");
    // Billed for what was metered: 2 input tokens at 1/M, `out` output tokens at 2/M.
    let expected =
        (Decimal::from(2) + Decimal::from(out) * Decimal::from(2)) / Decimal::from(1_000_000);
    assert_eq!(dec(&rec["cost"]), expected, "{rec}");
    let s = within(g.mock_stats("p1")).await;
    assert_eq!(stat(&s, "streams_completed"), 0, "{s}");
}

#[tokio::test]
async fn http2_and_http1_to_the_upstream() {
    let body = format!(
        "{}\n[[models]]\nname = \"m-h1\"\ntokenizer = \"chunks\"\nroutes = [{{ provider = \"p2\", upstream_model = \"up-h1\", bucket = \"routed\", input_per_mtok = \"3\", output_per_mtok = \"4\" }}]\n",
        standard_body("", "1", "1")
    );
    let g = Gateway::start(Setup {
        mocks: vec![("p1", "http2 = \"always\""), ("p2", "http2 = \"never\"")],
        body,
        data_dir: None,
    });
    for (model, provider, upstream) in [("m", "p1", "up-m1"), ("m-h1", "p2", "up-h1")] {
        for _ in 0..3 {
            let r = chat(
                &g,
                &json!({"model": model, "stream": true, "messages": hello()}),
            )
            .send()
            .await
            .unwrap();
            assert_eq!(r.status(), 200, "{model}");
            assert_eq!(header(&r, "x-tollgate-upstream-model"), upstream);
            let events = sse_events(r).await;
            assert_eq!(events.last().unwrap(), "[DONE]", "{model}");
            assert_eq!(content_deltas(&events), 8, "{model}");
            let r = chat(&g, &json!({"model": model, "messages": hello()}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{model}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["tollgate"]["status"], "completed");
        }
        let s = within(g.mock_stats(provider)).await;
        assert_eq!(stat(&s, "stream_requests"), 3, "{s}");
        assert_eq!(stat(&s, "streams_completed"), 3, "{s}");
        let last = mock_last(&g, provider).await;
        assert_eq!(last["body"]["model"], upstream);
        let want = if provider == "p2" {
            "HTTP/1.1"
        } else {
            "HTTP/2.0"
        };
        assert_eq!(last["http_version"], want, "{provider}: {last}");
    }
}

#[tokio::test]
async fn embeddings_are_billed_by_input_tokens() {
    let g = standard("");
    let url = format!("{}/v1/embeddings", g.client_url);
    // (input, tokens): ceil(bytes / 4) per string.
    for (input, tokens) in [
        (json!("12345678abcd"), 3u64),
        (json!(["abcd", "efghi"]), 3),
        (json!("x"), 1),
    ] {
        let r = http()
            .post(&url)
            .bearer_auth(DEMO_KEY)
            .json(&json!({"model": "emb", "input": input}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{input}");
        assert_eq!(header(&r, "x-tollgate-route"), "emb/p1");
        assert_eq!(header(&r, "x-tollgate-upstream-model"), "up-emb");
        assert_eq!(header(&r, "x-tollgate-bucket"), "credit");
        let rid = header(&r, "x-tollgate-request-id").to_string();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(
            v["data"].as_array().unwrap().len(),
            input.as_array().map_or(1, Vec::len)
        );
        let t = &v["tollgate"];
        assert_eq!(t["request_id"], rid.as_str());
        assert_eq!(t["route"], "emb/p1");
        assert_eq!(t["status"], "completed");
        assert_eq!(t["input_tokens"], tokens, "{input}: {t}");
        assert_eq!(t["output_tokens"], 0);
        assert!(t["cost"].is_string());
        assert_eq!(
            dec(&t["cost"]),
            Decimal::from(tokens) * d("0.5") / Decimal::from(1_000_000),
            "{input}: {t}"
        );
        let rec = wait_record(&g, &rid).await;
        assert_eq!(rec["endpoint"], "embeddings");
        assert_eq!(dec(&rec["cost"]), dec(&t["cost"]));
    }
    let last = mock_last(&g, "p1").await;
    assert_eq!(last["body"], json!({"model": "up-emb", "input": "x"}));
}

#[tokio::test]
async fn model_list_shows_callable_models_with_routes() {
    let g = standard("");
    let r = http()
        .get(format!("{}/v1/models", g.client_url))
        .bearer_auth(DEMO_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "x-tollgate-request-id").starts_with("req_"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    let mut ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["emb", "m"]);
    let model = |id: &str| data.iter().find(|m| m["id"] == id).unwrap().clone();

    let m = model("m");
    assert_eq!(m["object"], "model");
    assert_eq!(m["owned_by"], "tollgate");
    assert!(m["created"].as_i64().unwrap() > 1_600_000_000);
    assert_eq!(m["tollgate"]["available"], true);
    let routes = m["tollgate"]["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 2, "{m}");
    let expect = [
        (
            "m/p1", "p1", "up-m1", "primary", "credit", "USD", "official", "1", "2",
        ),
        (
            "m/p2", "p2", "up-m2", "backup", "routed", "CNY", "routed", "3", "4",
        ),
    ];
    for (r, (id, provider, up, role, bucket, cur, kind, inp, out)) in routes.iter().zip(expect) {
        assert_eq!(r["route"], id, "{r}");
        assert_eq!(r["provider"], provider, "{r}");
        assert_eq!(r["upstream_model"], up, "{r}");
        assert_eq!(r["role"], role, "{r}");
        assert_eq!(r["bucket"], bucket, "{r}");
        assert_eq!(r["currency"], cur, "{r}");
        assert_eq!(r["kind"], kind, "{r}");
        assert!(r["input_per_mtok"].is_string(), "prices are strings: {r}");
        assert_eq!(dec(&r["input_per_mtok"]), d(inp), "{r}");
        assert_eq!(dec(&r["output_per_mtok"]), d(out), "{r}");
        assert_eq!(r["state"], "closed", "{r}");
        assert!(r["last_probe"].is_null(), "{r}");
        assert!(r["last_failure"].is_null(), "{r}");
    }
    let e = model("emb");
    assert_eq!(e["tollgate"]["available"], true);
    let routes = e["tollgate"]["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0]["route"], "emb/p1");
    assert_eq!(routes[0]["role"], "primary");
    assert_eq!(dec(&routes[0]["input_per_mtok"]), d("0.5"));
    assert_eq!(dec(&routes[0]["output_per_mtok"]), Decimal::ZERO);
}

#[tokio::test]
async fn hostile_bodies_never_cause_5xx() {
    let g = standard("");
    let chat_url = g.chat_url();
    let emb_url = format!("{}/v1/embeddings", g.client_url);
    let deep_open = "[".repeat(10_000);
    let deep_both = format!(
        "{{\"model\":\"m\",\"messages\":{}{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let deep_objects = format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":{}1{}}}]}}",
        "{\"a\":".repeat(5_000),
        "}".repeat(5_000)
    );
    let m = hello();
    let j = |v: Value| v.to_string();
    // (what, url, body, expected status)
    let cases: Vec<(&str, &str, String, u16)> = vec![
        ("10k [", &chat_url, deep_open, 400),
        ("10k nested arrays", &chat_url, deep_both, 400),
        ("5k nested objects", &chat_url, deep_objects, 400),
        (
            "number 1e400",
            &chat_url,
            r#"{"model":"m","messages":[],"max_tokens":1e400}"#.into(),
            400,
        ),
        (
            "number beyond u64",
            &chat_url,
            r#"{"model":"m","messages":[],"max_tokens":99999999999999999999999}"#.into(),
            400,
        ),
        (
            "negative zero n",
            &chat_url,
            r#"{"model":"m","messages":[],"n":-0}"#.into(),
            400,
        ),
        (
            "n u64::MAX",
            &chat_url,
            j(json!({"model": "m", "messages": m, "n": u64::MAX})),
            402,
        ),
        (
            "n 1000",
            &chat_url,
            j(json!({"model": "m", "messages": m, "n": 1000})),
            400,
        ),
        (
            "max_tokens u64::MAX",
            &chat_url,
            j(json!({"model": "m", "messages": m, "max_tokens": u64::MAX})),
            200,
        ),
        (
            "max_completion_tokens u64::MAX, n 2",
            &chat_url,
            j(json!({"model": "m", "messages": m, "max_completion_tokens": u64::MAX, "n": 2})),
            200,
        ),
        (
            "null bytes in content",
            &chat_url,
            j(json!({"model": "m", "messages": [{"role": "user", "content": "a\u{0}b\u{0}"}]})),
            200,
        ),
        (
            "null byte in model",
            &chat_url,
            j(json!({"model": "m\u{0}", "messages": m})),
            404,
        ),
        (
            "lone surrogate",
            &chat_url,
            r#"{"model":"m","messages":[{"role":"user","content":"\ud800"}]}"#.into(),
            400,
        ),
        (
            "BOM",
            &chat_url,
            format!("\u{feff}{}", j(json!({"model": "m", "messages": m}))),
            400,
        ),
        (
            "model object",
            &chat_url,
            j(json!({"model": {}, "messages": m})),
            400,
        ),
        (
            "model array",
            &chat_url,
            j(json!({"model": ["m"], "messages": m})),
            400,
        ),
        (
            "model empty",
            &chat_url,
            j(json!({"model": "", "messages": m})),
            400,
        ),
        (
            "model huge",
            &chat_url,
            j(json!({"model": "m".repeat(100_000), "messages": m})),
            404,
        ),
        (
            "messages object",
            &chat_url,
            j(json!({"model": "m", "messages": {"role": "user"}})),
            400,
        ),
        (
            "messages of numbers",
            &chat_url,
            j(json!({"model": "m", "messages": [1, 2.5, null, true]})),
            200,
        ),
        (
            "content of wrong types",
            &chat_url,
            j(
                json!({"model": "m", "messages": [{"role": 7, "content": [1, {"type": "text", "text": 5}, null]}]}),
            ),
            200,
        ),
        (
            "stream number",
            &chat_url,
            j(json!({"model": "m", "messages": m, "stream": 1})),
            400,
        ),
        (
            "include_usage string",
            &chat_url,
            j(
                json!({"model": "m", "messages": m, "stream": true, "stream_options": {"include_usage": "yes"}}),
            ),
            400,
        ),
        (
            "n 0",
            &chat_url,
            j(json!({"model": "m", "messages": m, "n": 0})),
            400,
        ),
        (
            "n true",
            &chat_url,
            j(json!({"model": "m", "messages": m, "n": true})),
            400,
        ),
        (
            "n float",
            &chat_url,
            j(json!({"model": "m", "messages": m, "n": 1.0})),
            400,
        ),
        (
            "max_completion_tokens -5",
            &chat_url,
            j(json!({"model": "m", "messages": m, "max_completion_tokens": -5})),
            400,
        ),
        ("body null", &chat_url, "null".into(), 400),
        ("body number", &chat_url, "123".into(), 400),
        ("body {}", &chat_url, "{}".into(), 400),
        (
            "embeddings input number",
            &emb_url,
            j(json!({"model": "emb", "input": 5})),
            400,
        ),
        (
            "embeddings input empty array",
            &emb_url,
            j(json!({"model": "emb", "input": []})),
            400,
        ),
        (
            "embeddings input [null]",
            &emb_url,
            j(json!({"model": "emb", "input": [null, {}]})),
            400,
        ),
        (
            "embeddings model number",
            &emb_url,
            j(json!({"model": 1, "input": "x"})),
            400,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, url, body, expected) in &cases {
        let r = http()
            .post(*url)
            .bearer_auth(DEMO_KEY)
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert!(status < 500, "{what}: {status} {text}");
        if status != *expected {
            wrong.push(format!("{what}: expected {expected}, got {status} {text}"));
        }
        if status >= 400 {
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
            assert!(v["error"]["code"].is_string(), "{what}: {text}");
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Still serving normally.
    let r = chat(
        &g,
        &json!({"model": "m", "stream": true, "messages": hello()}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let events = sse_events(r).await;
    assert_eq!(content_deltas(&events), 8);
    assert_eq!(events.last().unwrap(), "[DONE]");
}
