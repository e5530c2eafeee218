//! End-to-end tests of the mock over real loopback sockets with a real HTTP client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::{serve, MockOptions, MockServer, MockStatsSnapshot};

fn fast() -> MockOptions {
    MockOptions {
        ttft_ms: 1,
        tokens: 5,
        interval_ms: 1,
        ..MockOptions::default()
    }
}

fn start(opts: MockOptions) -> MockServer {
    MockServer::start("127.0.0.1:0".parse().unwrap(), opts).unwrap()
}

fn url(server: &MockServer, path: &str) -> String {
    format!("http://{}{path}", server.addr())
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn chat_body(stream: bool) -> Value {
    json!({
        "model": "gpt-test",
        "stream": stream,
        "messages": [{"role": "user", "content": "hello world!"}],
    })
}

/// The JSON payloads of an SSE body and whether it ended with `[DONE]`.
fn parse_sse(text: &str) -> (Vec<Value>, bool) {
    let mut chunks = Vec::new();
    let mut done = false;
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event
            .strip_prefix("data: ")
            .expect("every event is one data line");
        assert!(!done, "nothing may follow [DONE]");
        if data == "[DONE]" {
            done = true;
        } else {
            chunks.push(serde_json::from_str(data).expect("chunk is JSON"));
        }
    }
    (chunks, done)
}

fn contents(chunks: &[Value], index: u64) -> Vec<String> {
    chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["index"] == index)
        .filter_map(|c| c["delta"]["content"].as_str().map(str::to_owned))
        .collect()
}

async fn eventually(what: &str, limit: Duration, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn stream_sends_tokens_and_usage_only_when_asked() {
    let server = start(fast());
    let http = client();

    let text = http
        .post(url(&server, "/v1/chat/completions"))
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(text.status(), 200);
    assert_eq!(text.headers()["content-type"], "text/event-stream");
    let (chunks, done) = parse_sse(&text.text().await.unwrap());
    assert!(done);
    assert_eq!(
        contents(&chunks, 0),
        ["the ", "quick ", "brown ", "fox ", "jumps "]
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["model"], "gpt-test");
    assert!(chunks[0]["id"]
        .as_str()
        .unwrap()
        .starts_with("chatcmpl-mock-"));
    assert!(chunks[1]["choices"][0]["delta"].get("role").is_none());
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));

    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = http
        .post(url(&server, "/chat/completions"))
        .header("x-mock-tokens", "7")
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (chunks, done) = parse_sse(&text);
    assert!(done);
    assert_eq!(contents(&chunks, 0).len(), 7);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10})
    );

    let stats = server.stats();
    assert_eq!(stats.chat_requests, 2);
    assert_eq!(stats.stream_requests, 2);
    assert_eq!(stats.completion_tokens, 12);
    assert_eq!(stats.streams_completed, 2);
    assert_eq!(stats.streams_cancelled, 0);
}

#[tokio::test]
async fn non_stream_has_openai_shape_and_usage() {
    let server = start(fast());
    let body = json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "abcd"},
            {"role": "user", "content": [{"type": "text", "text": "efghi"}, {"type": "image_url", "image_url": {"url": "x"}}]},
        ],
    });
    let resp = client()
        .post(url(&server, "/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-test");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "the quick brown fox jumps "
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // 4 + 5 bytes → ceil(9 / 4) = 3.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
    );
    assert_eq!(server.stats().completion_tokens, 5);
}

#[tokio::test]
async fn max_tokens_caps_and_max_completion_tokens_wins() {
    let server = start(fast());
    let http = client();
    let mut body = chat_body(false);
    body["max_tokens"] = json!(3);
    let v: Value = http
        .post(url(&server, "/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "the quick brown ");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 3);

    let mut body = chat_body(true);
    body["max_tokens"] = json!(4);
    body["max_completion_tokens"] = json!(2);
    let text = http
        .post(url(&server, "/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (chunks, _) = parse_sse(&text);
    assert_eq!(contents(&chunks, 0), ["the ", "quick "]);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );

    // A cap above the configured count changes nothing.
    body["max_completion_tokens"] = json!(50);
    let text = http
        .post(url(&server, "/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (chunks, _) = parse_sse(&text);
    assert_eq!(contents(&chunks, 0).len(), 5);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn n_two_streams_and_answers_every_choice() {
    let server = start(fast());
    let http = client();
    let mut body = chat_body(true);
    body["n"] = json!(2);
    body["stream_options"] = json!({"include_usage": true});
    let text = http
        .post(url(&server, "/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (chunks, done) = parse_sse(&text);
    assert!(done);
    assert_eq!(contents(&chunks, 0), contents(&chunks, 1));
    assert_eq!(contents(&chunks, 1).len(), 5);
    let finishes: Vec<&Value> = chunks
        .iter()
        .filter(|c| c["choices"][0]["finish_reason"] == "stop")
        .collect();
    assert_eq!(finishes.len(), 2);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 10);

    let mut body = chat_body(false);
    body["n"] = json!(2);
    let v: Value = http
        .post(url(&server, "/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["usage"]["completion_tokens"], 10);
    assert_eq!(server.stats().completion_tokens, 20);
}

#[tokio::test]
async fn bad_json_and_bad_values_are_400() {
    let server = start(fast());
    let http = client();
    let resp = http
        .post(url(&server, "/v1/chat/completions"))
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "invalid_json");
    assert_eq!(v["error"]["param"], Value::Null);

    let mut body = chat_body(false);
    body["n"] = json!(0);
    let resp = http
        .post(url(&server, "/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let resp = http
        .post(url(&server, "/v1/chat/completions"))
        .header("x-mock-tokens", "lots")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let resp = http.get(url(&server, "/v1/nothing")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn status_faults_answer_with_envelopes() {
    let server = start(fast());
    let http = client();
    for (fault, status, kind) in [
        ("500", 500, "server_error"),
        ("503", 503, "server_error"),
        ("401", 401, "invalid_request_error"),
        ("422", 422, "invalid_request_error"),
    ] {
        let resp = http
            .post(url(&server, "/v1/chat/completions"))
            .header("x-mock-fault", fault)
            .json(&chat_body(true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], kind);
        assert_eq!(v["error"]["code"], "mock_fault");
        assert_eq!(v["error"]["message"], format!("mock fault {status}"));
    }

    let resp = http
        .post(url(&server, "/v1/chat/completions"))
        .header("x-mock-fault", "429")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");

    let resp = http
        .post(url(&server, "/v1/embeddings"))
        .header("x-mock-fault", "429:7")
        .json(&json!({"model": "e", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");

    let resp = http
        .post(url(&server, "/v1/chat/completions"))
        .header("x-mock-fault", "explode")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("reset-after:<n>"));
}

/// Reads a stream until its body fails; returns the content tokens seen before.
async fn tokens_before_error(resp: reqwest::Response) -> (Vec<String>, bool) {
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let mut failed = false;
    while let Some(item) = body.next().await {
        match item {
            Ok(bytes) => text.push_str(std::str::from_utf8(&bytes).unwrap()),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    let (chunks, done) = parse_sse(&text);
    assert!(!done);
    (contents(&chunks, 0), failed)
}

#[tokio::test]
async fn reset_after_aborts_streams_and_non_streams() {
    let server = start(fast());
    for http in [client(), h2_client()] {
        let resp = http
            .post(url(&server, "/v1/chat/completions"))
            .header("x-mock-fault", "reset-after:3")
            .json(&chat_body(true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (tokens, failed) = tokens_before_error(resp).await;
        assert_eq!(tokens, ["the ", "quick ", "brown "]);
        assert!(failed, "the body must end in an error, not a clean end");

        let resp = http
            .post(url(&server, "/v1/chat/completions"))
            .header("x-mock-fault", "reset-after:0")
            .json(&chat_body(true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (tokens, failed) = tokens_before_error(resp).await;
        assert!(tokens.is_empty());
        assert!(failed);

        let result = http
            .post(url(&server, "/v1/chat/completions"))
            .header("x-mock-fault", "reset-after:2")
            .json(&chat_body(false))
            .send()
            .await;
        assert!(result.is_err(), "a non-stream reset gets no response");
    }
    let stats = server.stats();
    assert_eq!(stats.completion_tokens, 6);
    assert_eq!(
        stats.streams_cancelled, 0,
        "an abort on purpose is no cancel"
    );
    assert_eq!(stats.streams_completed, 0);
}

#[tokio::test]
async fn hang_holds_until_the_client_gives_up() {
    let server = start(fast());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let started = Instant::now();
    let result = http
        .post(url(&server, "/v1/chat/completions"))
        .header("x-mock-fault", "hang")
        .json(&chat_body(true))
        .send()
        .await;
    assert!(result.unwrap_err().is_timeout());
    assert!(started.elapsed() >= Duration::from_millis(200));
    eventually(
        "the hung stream to count as cancelled",
        Duration::from_secs(2),
        || {
            let stats = server.stats();
            stats.streams_cancelled == 1 && stats.open_connections == 0
        },
    )
    .await;
    assert_eq!(server.stats().chat_requests, 1);
}

#[tokio::test]
async fn malformed_sends_non_json() {
    let server = start(fast());
    let http = client();
    let resp = http
        .post(url(&server, "/v1/chat/completions"))
        .header("x-mock-fault", "malformed")
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(
        resp.text().await.unwrap(),
        "data: {this is not json\n\ndata: [DONE]\n\n"
    );
    let resp = http
        .post(url(&server, "/v1/chat/completions"))
        .header("x-mock-fault", "malformed")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "{not json");
}

#[tokio::test]
async fn fail_rate_fails_the_given_share() {
    let server = start(MockOptions {
        ttft_ms: 0,
        interval_ms: 0,
        tokens: 1,
        ..MockOptions::default()
    });
    let http = client();
    let mut failures = [0u32; 3];
    for (slot, fault) in ["fail-rate:0", "fail-rate:1", "fail-rate:0.5"]
        .iter()
        .enumerate()
    {
        for _ in 0..200 {
            let resp = http
                .post(url(&server, "/v1/chat/completions"))
                .header("x-mock-fault", *fault)
                .json(&chat_body(false))
                .send()
                .await
                .unwrap();
            if resp.status() == 500 {
                failures[slot] += 1;
            } else {
                assert_eq!(resp.status(), 200);
            }
        }
    }
    assert_eq!(failures[0], 0);
    assert_eq!(failures[1], 200);
    assert!((70..=130).contains(&failures[2]), "{failures:?}");
}

#[tokio::test]
async fn h2c_works_on_the_same_port() {
    let server = start(fast());
    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = h2_client()
        .post(url(&server, "/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let (chunks, done) = parse_sse(&resp.text().await.unwrap());
    assert!(done);
    assert_eq!(contents(&chunks, 0).len(), 5);

    let resp = client()
        .get(url(&server, "/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn dropping_a_stream_counts_as_cancelled() {
    let server = start(MockOptions {
        ttft_ms: 1,
        tokens: 1000,
        interval_ms: 5,
        ..MockOptions::default()
    });
    for (round, http) in [client(), h2_client()].into_iter().enumerate() {
        let resp = http
            .post(url(&server, "/v1/chat/completions"))
            .json(&chat_body(true))
            .send()
            .await
            .unwrap();
        let mut body = resp.bytes_stream();
        let first = body.next().await.unwrap().unwrap();
        assert!(first.starts_with(b"data: {"));
        drop(body);
        let dropped = Instant::now();
        let want = round as u64 + 1;
        eventually(
            "the dropped stream to count",
            Duration::from_millis(200),
            || server.stats().streams_cancelled == want,
        )
        .await;
        assert!(dropped.elapsed() < Duration::from_millis(200));
    }
    assert_eq!(server.stats().streams_completed, 0);
}

#[tokio::test]
async fn last_request_shows_path_and_body_but_no_header() {
    let server = start(fast());
    let http = client();
    let v: Value = http
        .get(url(&server, "/_mock/last"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v, Value::Null);
    http.post(url(&server, "/v1/chat/completions"))
        .bearer_auth("sk-upstream-1")
        .header("X-Custom", "secret-A")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    let text = http
        .get(url(&server, "/_mock/last"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["path"], "/v1/chat/completions");
    assert_eq!(v["body"]["model"], "gpt-test");
    assert_eq!(v["http_version"], "HTTP/1.1");
    assert_eq!(v["content_type"], "application/json");
    // R44: no header (name or value) is revealed, credentials least of all.
    assert!(v.get("headers").is_none(), "{text}");
    for leak in ["sk-upstream-1", "secret-A", "x-custom", "authorization"] {
        assert!(
            !text
                .to_ascii_lowercase()
                .contains(&leak.to_ascii_lowercase()),
            "{leak} in {text}"
        );
    }
}

#[tokio::test]
async fn requests_cannot_ask_for_more_than_the_caps() {
    let server = start(fast());
    let http = client();
    // x-mock-tokens above 100,000 is refused, u32::MAX and beyond included.
    for tokens in ["100001", "4294967295", "18446744073709551615"] {
        for stream in [false, true] {
            let resp = http
                .post(url(&server, "/v1/chat/completions"))
                .header("x-mock-tokens", tokens)
                .json(&chat_body(stream))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 400, "{tokens} stream={stream}");
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["code"], "invalid_value", "{v}");
            assert_eq!(v["error"]["param"], "x-mock-tokens", "{v}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains("100000"),
                "{v}"
            );
        }
    }
    // At the cap a stream is served (read only its start: it is long).
    let mut resp = http
        .post(url(&server, "/v1/chat/completions"))
        .header("x-mock-tokens", "100000")
        .header("x-mock-interval-ms", "0")
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.chunk().await.unwrap().is_some());
    drop(resp);
    // A whole (non-stream) answer carries at most 100,000 tokens over all its choices.
    let mut body = chat_body(false);
    body["n"] = json!(2);
    let resp = http
        .post(url(&server, "/v1/chat/completions"))
        .header("x-mock-tokens", "60000")
        .header("x-mock-interval-ms", "0")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // The run-time option and the start options have the same cap.
    let resp = http
        .post(url(&server, "/_mock/options"))
        .json(&json!({"tokens": 100_001}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err = MockServer::start(
        "127.0.0.1:0".parse().unwrap(),
        MockOptions {
            tokens: 100_001,
            ..fast()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("100000"), "{err}");

    // A request body above 16 MiB gets 413 in the envelope, before it is read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{",
        16 * 1024 * 1024 + 1
    );
    raw.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut answer))
        .await
        .expect("413 without waiting for the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("request_too_large"), "{answer}");
    // One just below the cap is read.
    let mut body = chat_body(false);
    body["messages"][0]["content"] = json!("x".repeat(15 * 1024 * 1024));
    let resp = http
        .post(url(&server, "/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn the_mock_listens_on_loopback_only() {
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let err = MockServer::start(addr.parse().unwrap(), fast()).unwrap_err();
        assert!(err.to_string().contains("loopback"), "{addr}: {err}");
    }
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = serve(listener, fast(), async {}).await.unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
}

#[tokio::test]
async fn options_change_behaviour_at_run_time() {
    let server = start(fast());
    let http = client();
    let set = |body: Value| {
        let http = http.clone();
        let target = url(&server, "/_mock/options");
        async move { http.post(target).json(&body).send().await.unwrap() }
    };

    let resp = set(json!({"fault": "503", "tokens": 2})).await;
    assert_eq!(resp.status(), 200);
    let opts: MockOptions = resp.json().await.unwrap();
    assert_eq!(opts.fault.as_deref(), Some("503"));
    assert_eq!(opts.tokens, 2);
    let resp = http
        .post(url(&server, "/v1/chat/completions"))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    // A header wins over the global fault.
    let resp = http
        .post(url(&server, "/v1/chat/completions"))
        .header("x-mock-fault", "none")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    assert_eq!(set(json!({"fault": null})).await.status(), 200);
    let v: Value = http
        .post(url(&server, "/v1/chat/completions"))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 2);

    assert_eq!(set(json!({"fault": "bogus"})).await.status(), 400);
    assert_eq!(set(json!({"colour": 1})).await.status(), 400);

    server.set_options(MockOptions {
        fault: Some("502".into()),
        ..fast()
    });
    let resp = http
        .post(url(&server, "/v1/chat/completions"))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
}

#[tokio::test]
async fn embeddings_and_models() {
    let server = start(MockOptions {
        models: vec!["a".into(), "b".into()],
        ..fast()
    });
    let http = client();
    let v: Value = http
        .post(url(&server, "/v1/embeddings"))
        .json(&json!({"model": "emb", "input": ["hello", "world, again", [1, 2, 3]]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "emb");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data[2]["index"], 2);
    assert_eq!(data[0]["object"], "embedding");
    assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 8);
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    // 2 + 3 + 3 tokens.
    assert_eq!(v["usage"], json!({"prompt_tokens": 8, "total_tokens": 8}));

    let again: Value = http
        .post(url(&server, "/embeddings"))
        .json(&json!({"model": "emb", "input": "hello"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        again["data"][0]["embedding"], data[0]["embedding"],
        "deterministic"
    );

    let v: Value = http
        .get(url(&server, "/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v,
        json!({"object": "list", "data": [
            {"id": "a", "object": "model", "created": 0, "owned_by": "mock"},
            {"id": "b", "object": "model", "created": 0, "owned_by": "mock"},
        ]})
    );
    let stats = server.stats();
    assert_eq!(stats.embeddings_requests, 2);
    assert_eq!(stats.models_requests, 1);
}

#[tokio::test]
async fn stats_endpoint_and_reset() {
    let server = start(fast());
    let http = client();
    http.get(url(&server, "/v1/models")).send().await.unwrap();
    let stats: MockStatsSnapshot = http
        .get(url(&server, "/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats.requests, 2);
    assert_eq!(stats.models_requests, 1);
    assert_eq!(stats.connections_opened, 1);
    assert_eq!(stats.open_connections, 1);
    let stats: MockStatsSnapshot = http
        .post(url(&server, "/stats/reset"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stats,
        MockStatsSnapshot {
            open_connections: 1,
            ..MockStatsSnapshot::default()
        }
    );
    drop(http);
    eventually("the connection to close", Duration::from_secs(2), || {
        server.stats().open_connections == 0
    })
    .await;
    assert_eq!(server.stats().connections_closed, 1);
}

#[tokio::test]
async fn serve_runs_in_the_callers_runtime_until_shutdown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, fast(), async {
        let _ = stopped.await;
    }));
    let v: Value = client()
        .get(format!("http://{addr}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], "mock-model");
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let bad = MockOptions {
        fault: Some("nonsense".into()),
        ..fast()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    assert!(serve(listener, bad.clone(), async {}).await.is_err());
    assert!(MockServer::start("127.0.0.1:0".parse().unwrap(), bad).is_err());
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let server = start(fast());
    let addr = server.addr();
    server.shutdown();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[test]
fn options_parse_as_cli_flags_and_toml_table() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        mock: MockOptions,
    }
    let cli = Cli::try_parse_from(["x"]).unwrap();
    assert_eq!(cli.mock, MockOptions::default());
    let cli =
        Cli::try_parse_from(["x", "--ttft-ms", "5", "--fault", "hang", "--models", "a,b"]).unwrap();
    assert_eq!(cli.mock.ttft_ms, 5);
    assert_eq!(cli.mock.fault.as_deref(), Some("hang"));
    assert_eq!(cli.mock.models, ["a", "b"]);

    let opts: MockOptions = serde_json::from_value(json!({"tokens": 3})).unwrap();
    assert_eq!(opts.tokens, 3);
    assert_eq!(opts.ttft_ms, 50);
}

/// `x-mock-cache-read-tokens` reports that many more prompt tokens, as cached, in the stream's
/// usage chunk and in a whole answer's usage, and only when asked; a value that is not a count
/// is a 400 naming the header.
#[tokio::test]
async fn chat_reports_cache_reads_when_asked() {
    let server = start(fast());
    let http = client();
    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = http
        .post(url(&server, "/v1/chat/completions"))
        .header("x-mock-cache-read-tokens", "2")
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (chunks, done) = parse_sse(&text);
    assert!(done);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"], 5, "{usage}");
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"], 2,
        "{usage}"
    );

    let whole: Value = http
        .post(url(&server, "/v1/chat/completions"))
        .header("x-mock-cache-read-tokens", "3")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(whole["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
    assert_eq!(whole["usage"]["prompt_tokens"], 6);

    let plain: Value = http
        .post(url(&server, "/v1/chat/completions"))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(plain["usage"].get("prompt_tokens_details").is_none());

    let bad = http
        .post(url(&server, "/v1/chat/completions"))
        .header("x-mock-cache-read-tokens", "some")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let v: Value = bad.json().await.unwrap();
    assert_eq!(v["error"]["param"], "x-mock-cache-read-tokens");
}
