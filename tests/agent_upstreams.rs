//! The agent endpoints against a scripted upstream that sends what the built-in mock does not:
//! tool-call argument and reasoning deltas (counted as output), a Responses stream that never
//! sends `response.completed`, a Messages stream without `message_stop`, upstream error events,
//! malformed events, and the headers an Anthropic provider receives (its key in `x-api-key`, the
//! client's `anthropic-version` and `anthropic-beta`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PROVIDER_KEY: &str = "sk-ant-provider-secret-0123456789";

/// A raw-TCP upstream that answers each request with the script named by its `model`.
struct Scripted {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn scripted() -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    Scripted { port, task }
}

/// Reads one request: (lower-cased head, JSON body).
async fn read_request(s: &mut TcpStream) -> Option<(String, Value)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or_default();
    Some((head, body))
}

fn header(head: &str, name: &str) -> String {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default()
}

fn ev(name: &str, data: Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

fn r_delta(kind: &str, text: &str) -> String {
    let t = format!("response.{kind}.delta");
    ev(
        &t,
        json!({"type": t, "delta": text, "item_id": "i", "output_index": 0}),
    )
}

fn r_created() -> String {
    ev(
        "response.created",
        json!({"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1", "output": []}}),
    )
}

fn m_start() -> String {
    ev(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
        "usage": {"input_tokens": 10, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000, "output_tokens": 1}}}),
    )
}

fn m_delta(kind: &str, field: &str, text: &str) -> String {
    ev(
        "content_block_delta",
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": kind, field: text}}),
    )
}

fn m_end(output: u64, stop: bool) -> String {
    let mut out = ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": output}}),
    );
    if stop {
        out.push_str(&ev("message_stop", json!({"type": "message_stop"})));
    }
    out
}

async fn serve(mut s: TcpStream) {
    let Some((head, body)) = read_request(&mut s).await else {
        return;
    };
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let sse = |events: String| {
        format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{events}")
    };
    let json_answer = |status: &str, v: &str| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{v}",
            v.len()
        )
    };
    let out = match (model.as_str(), stream) {
        ("r-tools", true) => sse(format!(
            "{}{}{}{}{}{}{}{}{}{}",
            r_created(),
            r_delta("function_call_arguments", "{\"ci"),
            r_delta("function_call_arguments", "ty\":"),
            r_delta("function_call_arguments", "\"Paris\"}"),
            r_delta("reasoning_summary_text", "Looking"),
            r_delta("reasoning_summary_text", " up"),
            r_delta("reasoning_text", "weather"),
            r_delta("output_text", "Sunny"),
            r_delta("refusal", "no"),
            ev("response.completed", json!({"type": "response.completed", "sequence_number": 9,
                "response": {"id": "resp_1", "status": "completed", "output": [], "usage": {"input_tokens": 5, "output_tokens": 100}}})),
        )),
        // Without usage the gateway bills what it counts in the output items.
        ("r-tools", false) => json_answer("200 OK", &json!({"id": "resp_1", "object": "response", "status": "completed", "output": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "abcd"}]},
            {"type": "function_call", "name": "f", "arguments": "{\"city\":\"Paris\"}"},
        ]}).to_string()),
        ("r-no-completed", true) => sse(format!("{}{}{}", r_created(), r_delta("output_text", "a"), r_delta("output_text", "b"))),
        ("r-failed", true) => sse(format!(
            "{}{}{}",
            r_created(),
            r_delta("output_text", "a"),
            ev("response.failed", json!({"type": "response.failed", "response": {"id": "resp_1", "status": "failed"}}))
        )),
        ("r-malformed-first", true) => sse(format!("{}data: {{oops\n\n", r_created())),
        ("r-malformed-mid", true) => sse(format!("{}{}data: {{oops\n\n", r_created(), r_delta("output_text", "a"))),
        ("r-garbage", false) => json_answer("200 OK", "{not json"),
        ("m-tools", true) => sse(format!(
            "{}{}{}{}{}{}{}{}{}",
            m_start(),
            m_delta("thinking_delta", "thinking", "Let me"),
            m_delta("thinking_delta", "thinking", " think"),
            m_delta("signature_delta", "signature", "c2ln"),
            m_delta("text_delta", "text", "Calling"),
            m_delta("input_json_delta", "partial_json", "{\"ci"),
            m_delta("input_json_delta", "partial_json", "ty\": \"Pa"),
            m_delta("input_json_delta", "partial_json", "ris\"}"),
            m_end(50, true),
        )),
        ("m-no-stop", true) => sse(format!("{}{}{}{}", m_start(), m_delta("text_delta", "text", "a"), m_delta("text_delta", "text", "b"), m_end(2, false))),
        ("m-error-event", true) => sse(format!(
            "{}{}{}",
            m_start(),
            m_delta("text_delta", "text", "a"),
            ev("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
        )),
        ("m-echo", false) => {
            let text = format!(
                "x-api-key={} authorization={} anthropic-version={} anthropic-beta={}",
                header(&head, "x-api-key"),
                header(&head, "authorization"),
                header(&head, "anthropic-version"),
                header(&head, "anthropic-beta"),
            );
            json_answer("200 OK", &json!({"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": text}],
                "usage": {"input_tokens": 3, "output_tokens": 4}}).to_string())
        }
        ("m-400", _) => json_answer("400 Bad Request", &json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: 99999 > 8192"}}).to_string()),
        _ => json_answer("404 Not Found", "{\"error\":{\"message\":\"no script\"}}"),
    };
    let _ = s.write_all(out.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// A gateway with model `r` (Responses) on provider `oa` and `c` (Messages) on the Anthropic
/// provider `an`, both at the scripted upstream; the route's upstream model is the script, set
/// per request through the model name `r:<script>` / `c:<script>`.
fn gateway(up: &Scripted, scripts: &[&str]) -> Gateway {
    let mut models = String::new();
    for s in scripts {
        let (endpoint, provider) = if s.starts_with("m-") {
            ("messages", "an")
        } else {
            ("responses", "oa")
        };
        models.push_str(&format!(
            r#"
[[models]]
name = "{s}"
endpoints = ["{endpoint}"]
tokenizer = "chunks"
retry = {{ max_retries = 0, backoff_base_ms = 5, backoff_max_ms = 50 }}
routes = [
  {{ provider = "{provider}", upstream_model = "{s}", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }},
]
"#
        ));
    }
    let base = format!("http://127.0.0.1:{}/v1", up.port);
    let providers = format!(
        r#"
[[providers]]
id = "oa"
base_url = "{base}"

[[providers]]
id = "an"
base_url = "{base}"
api = "anthropic"
api_key_env = "TG_TEST_ANTHROPIC_KEY"
"#
    );
    Gateway::start_extra(
        Setup {
            mocks: vec![],
            body: two_bucket_body(&format!("{providers}{models}"), "", "5", "1"),
            data_dir: None,
        },
        Extra {
            env: vec![("TG_TEST_ANTHROPIC_KEY".into(), PROVIDER_KEY.into())],
            ..Extra::default()
        },
    )
}

fn http() -> ::reqwest::Client {
    bounded_client(Duration::from_secs(30))
}

async fn post(
    g: &Gateway,
    model: &str,
    stream: bool,
    headers: &[(&str, &str)],
) -> ::reqwest::Response {
    let (path, body) = if model.starts_with("m-") {
        (
            "/v1/messages",
            json!({"model": model, "max_tokens": 500, "stream": stream, "messages": [{"role": "user", "content": "weather in Paris?"}]}),
        )
    } else {
        (
            "/v1/responses",
            json!({"model": model, "input": "weather in Paris?", "stream": stream}),
        )
    };
    let mut r = http()
        .post(format!("{}{path}", g.client_url))
        .bearer_auth(DEMO_KEY)
        .json(&body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

/// The SSE events of a body as (event name, data JSON).
async fn events(r: ::reqwest::Response) -> Vec<(String, Value)> {
    let text = tokio::time::timeout(Duration::from_secs(20), r.text())
        .await
        .unwrap()
        .unwrap();
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or_default()
                .to_string();
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("null");
            (name, serde_json::from_str(data).unwrap_or(Value::Null))
        })
        .collect()
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
        assert!(Instant::now() < deadline, "no record for {id}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test]
async fn tool_call_and_reasoning_deltas_are_paid_and_counted() {
    let up = scripted().await;
    let g = gateway(&up, &["r-tools", "m-tools"]);

    // Responses: 3 argument deltas, 3 reasoning deltas, 1 text, 1 refusal = 8 counted; the
    // upstream's usage (100) is what is billed, and the difference is in the record.
    let r = post(&g, "r-tools", true, &[]).await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let evs = events(r).await;
    let (name, last) = evs.last().unwrap();
    assert_eq!(name, "response.completed");
    assert_eq!(last["response"]["tollgate"]["output_tokens"], 100);
    let rec = record(&g, &id).await;
    assert_eq!(rec["endpoint"], "responses");
    assert_eq!(rec["output_tokens_delivered"], 8, "{rec}");
    assert_eq!(rec["output_tokens"], 100);
    assert_eq!(rec["input_tokens"], 5);

    // Non-stream without usage: the output items' texts are counted (chunks: bytes / 4).
    let r = post(&g, "r-tools", false, &[]).await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let v: Value = r.json().await.unwrap();
    let counted = ("abcd".len() + "{\"city\":\"Paris\"}".len()).div_ceil(4) as u64;
    assert_eq!(v["tollgate"]["output_tokens"], counted, "{v}");
    let rec = record(&g, &id).await;
    assert_eq!(rec["usage_source"], "counted");
    assert_eq!(rec["output_tokens"], counted);

    // Messages: 2 thinking, 1 text, 3 tool-input deltas = 6 counted (the signature is not
    // output); the input is the uncached input plus the cache writes and reads.
    let r = post(&g, "m-tools", true, &[]).await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let evs = events(r).await;
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
    assert_eq!(evs[evs.len() - 2].1["tollgate"]["output_tokens"], 50);
    assert_eq!(evs[evs.len() - 2].1["tollgate"]["input_tokens"], 1110);
    let rec = record(&g, &id).await;
    assert_eq!(rec["endpoint"], "messages");
    assert_eq!(rec["output_tokens_delivered"], 6, "{rec}");
    assert_eq!(rec["output_tokens"], 50);
    assert_eq!(rec["input_tokens"], 1110);
    g.assert_no_panic();
}

/// The last event is the format's error event with `upstream_stream_error`; the record bills
/// only the delivered tokens.
async fn assert_broken_after(g: &Gateway, model: &str, delivered: u64) {
    let r = post(g, model, true, &[]).await;
    assert_eq!(r.status(), 200, "{model}");
    let id = request_id(&r);
    let evs = events(r).await;
    let (name, last) = evs.last().unwrap();
    assert_eq!(name, "error", "{model}: {evs:?}");
    let code = if model.starts_with("m-") {
        &last["error"]["type"]
    } else {
        &last["code"]
    };
    assert_eq!(code, "upstream_stream_error", "{model}: {last}");
    let rec = record(g, &id).await;
    assert_eq!(rec["status"], "upstream_error", "{model}");
    assert_eq!(rec["output_tokens"], delivered, "{model}");
    assert_eq!(rec["usage_source"], "counted", "{model}");
    assert_eq!(rec["attempts"][0]["outcome"], "stream_error", "{model}");
}

#[tokio::test]
async fn streams_that_never_finish_or_report_an_error_end_with_the_error_event() {
    let up = scripted().await;
    let scripts = [
        "r-no-completed",
        "r-failed",
        "r-malformed-mid",
        "m-no-stop",
        "m-error-event",
    ];
    let g = gateway(&up, &scripts);
    assert_broken_after(&g, "r-no-completed", 2).await;
    assert_broken_after(&g, "r-failed", 1).await;
    assert_broken_after(&g, "r-malformed-mid", 1).await;
    assert_broken_after(&g, "m-no-stop", 2).await;
    assert_broken_after(&g, "m-error-event", 1).await;
    g.assert_no_panic();
}

#[tokio::test]
async fn malformed_answers_before_any_output_are_upstream_errors_never_client_errors() {
    let up = scripted().await;
    let g = gateway(&up, &["r-malformed-first", "r-garbage", "m-400"]);
    for (model, stream) in [("r-malformed-first", true), ("r-garbage", false)] {
        let r = post(&g, model, stream, &[]).await;
        assert_eq!(r.status(), 502, "{model}");
        let id = request_id(&r);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "upstream_error", "{v}");
        let rec = record(&g, &id).await;
        assert_eq!(rec["status"], "upstream_error");
        assert_eq!(rec["attempts"][0]["outcome"], "stream_error", "{rec}");
    }
    // An Anthropic 400 reaches the client as Anthropic wrote it.
    let r = post(&g, "m-400", false, &[]).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["message"], "max_tokens: 99999 > 8192");
}

#[tokio::test]
async fn an_anthropic_provider_gets_its_key_in_x_api_key_and_the_clients_version_headers() {
    let up = scripted().await;
    let g = gateway(&up, &["m-echo"]);
    let text = |v: Value| v["content"][0]["text"].as_str().unwrap().to_string();
    // No version from the client: the default one.
    let r = post(&g, "m-echo", false, &[]).await;
    assert_eq!(r.status(), 200);
    let t = text(r.json().await.unwrap());
    // The upstream echoed the key it got in x-api-key; the gateway redacts it on the way back.
    assert!(t.contains("x-api-key=[redacted] "), "{t}");
    assert!(!t.contains(PROVIDER_KEY), "{t}");
    assert!(
        t.contains("authorization= "),
        "no Bearer to an Anthropic provider: {t}"
    );
    assert!(t.contains("anthropic-version=2023-06-01 "), "{t}");
    // The client's version and beta go through as sent.
    let r = post(
        &g,
        "m-echo",
        false,
        &[
            ("anthropic-version", "2099-01-01"),
            ("anthropic-beta", "tools-2099"),
        ],
    )
    .await;
    let t = text(r.json().await.unwrap());
    assert!(t.contains("anthropic-version=2099-01-01 "), "{t}");
    assert!(t.ends_with("anthropic-beta=tools-2099"), "{t}");
}
