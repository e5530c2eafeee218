//! Workflow runs and open requests end to end: the `X-Tollgate-Task` header is checked and
//! carried into every record of the request; `GET /admin/inflight` shows open streams with what
//! they have drawn so far, and forgets them once they settle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn gateway() -> Gateway {
    Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1000", "1000"),
        data_dir: None,
    })
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream,
        "messages": [{"role": "user", "content": "hello there"}]})
}

/// Sends a chat request with the given headers; returns (status, request id, body text).
async fn send(
    g: &Gateway,
    secret: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, String) {
    let mut b = g
        .client()
        .post(g.chat_url())
        .bearer_auth(secret)
        .json(&body);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let r = b.send().await.unwrap();
    let status = r.status().as_u16();
    let id = r
        .headers()
        .get("x-tollgate-request-id")
        .map(|v| v.to_str().unwrap().to_string());
    (status, id, r.text().await.unwrap())
}

/// A record by request id, waiting for the writer to commit it.
async fn record(g: &Gateway, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = g.admin_get(&format!("/admin/ledger/{id}")).await;
        if s == 200 {
            return v;
        }
        assert!(Instant::now() < deadline, "no record for {id}: {s} {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_header_is_checked_and_recorded_on_every_kind_of_record() {
    let g = gateway();
    // Too long, or with a control character (a tab; HTTP itself refuses the others): 400
    // naming the header.
    let long = "t".repeat(129);
    for bad in [long.as_str(), "run\t1"] {
        let (s, _, text) = send(&g, DEMO_KEY, chat("m", false), &[("X-Tollgate-Task", bad)]).await;
        assert_eq!(s, 400, "{bad:?}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert_eq!(v["error"]["code"], "invalid_value", "{v}");
        assert_eq!(v["error"]["param"], "x-tollgate-task", "{v}");
    }
    // A header value that is not even visible ASCII (bytes above 0x7E).
    let r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .header(
            "X-Tollgate-Task",
            reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        )
        .json(&chat("m", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // 128 printable characters, spaces and punctuation included, are kept as sent.
    let task: String = (0..128)
        .map(|i| char::from(b' ' + (i % 95) as u8))
        .collect::<String>()
        .replacen(' ', "r", 1);
    assert_eq!(task.len(), 128);
    let (s, id, text) = send(
        &g,
        DEMO_KEY,
        chat("m", false),
        &[("X-Tollgate-Task", &task)],
    )
    .await;
    assert_eq!(s, 200, "{text}");
    let completed = record(&g, &id.unwrap()).await;
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["task"], task.as_str());

    // Streamed, rejected (unknown model) and without the header.
    let (s, id, _) = send(
        &g,
        DEMO_KEY,
        chat("m", true),
        &[("X-Tollgate-Task", "run-7")],
    )
    .await;
    assert_eq!(s, 200);
    let streamed = record(&g, &id.unwrap()).await;
    assert_eq!(streamed["stream"], true);
    assert_eq!(streamed["task"], "run-7");
    let (s, id, _) = send(
        &g,
        DEMO_KEY,
        chat("no-such-model", false),
        &[("X-Tollgate-Task", "run-7")],
    )
    .await;
    assert_eq!(s, 404);
    let rejected = record(&g, &id.unwrap()).await;
    assert_eq!(rejected["status"], "rejected");
    assert_eq!(rejected["task"], "run-7");
    let (s, id, _) = send(&g, DEMO_KEY, chat("m", false), &[]).await;
    assert_eq!(s, 200);
    let plain = record(&g, &id.unwrap()).await;
    assert!(plain["task"].is_null(), "{plain}");
    // `task` sits between `end_user` and `endpoint` in the record, as documented.
    let text = g
        .client()
        .get(format!(
            "{}/admin/ledger/{}",
            g.admin_url,
            plain["request_id"].as_str().unwrap()
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = |n: &str| text.find(&format!("\"{n}\":")).unwrap();
    assert!(
        at("end_user") < at("task") && at("task") < at("endpoint"),
        "{text}"
    );

    // Embeddings carry it too.
    let r = g
        .client()
        .post(format!("{}/v1/embeddings", g.client_url))
        .bearer_auth(DEMO_KEY)
        .header("X-Tollgate-Task", "run-8")
        .json(&json!({"model": "emb", "input": "some words"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let id = r.headers()["x-tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(record(&g, &id).await["task"], "run-8");
    g.assert_no_panic();
}

/// The open request of `id` in `/admin/inflight{query}`, if listed.
async fn inflight(g: &Gateway, query: &str) -> Vec<Value> {
    let (s, v) = g.admin_get(&format!("/admin/inflight{query}")).await;
    assert_eq!(s, 200, "{v}");
    v["requests"].as_array().unwrap().clone()
}

/// Polls `/admin/inflight` until `pred` holds for the entry of `id` (None: not listed).
async fn wait_inflight(
    g: &Gateway,
    id: &str,
    pred: impl Fn(Option<&Value>) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = inflight(g, "").await;
        let e = list.iter().find(|r| r["request_id"] == id);
        if pred(e) {
            return e.cloned();
        }
        assert!(
            Instant::now() < deadline,
            "inflight never matched for {id}: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflight_shows_open_streams_as_they_draw_and_forgets_them_after() {
    let g = gateway();
    let demo = g.demo_key_id().await;
    // A second key, funded, with nothing open.
    let (s, other) = g.admin_post("/admin/keys", json!({"name": "other"})).await;
    assert_eq!(s, 201, "{other}");
    let other_id = other["id"].as_str().unwrap().to_string();
    let (s, v) = g
        .admin_post(
            &format!("/admin/keys/{other_id}/topup"),
            json!({"bucket": "credit", "amount": "10"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");

    assert!(inflight(&g, "").await.is_empty());
    let r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .header("X-Tollgate-Task", "report-42")
        .header("X-Tollgate-Project", "research")
        .header("x-mock-tokens", "200")
        .header("x-mock-interval-ms", "20")
        .json(&chat("m", true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let id = r.headers()["x-tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let reader = tokio::spawn(async move { r.bytes().await.map(|b| b.len()) });

    let first = wait_inflight(&g, &id, |e| {
        e.is_some_and(|e| e["output_tokens"].as_u64().unwrap() > 0)
    })
    .await
    .unwrap();
    assert_eq!(first["key_id"], demo.as_str());
    assert_eq!(first["project"], "research");
    assert_eq!(first["task"], "report-42");
    assert_eq!(first["requested_model"], "m");
    assert_eq!(first["route"], "m/p1");
    assert_eq!(first["bucket"], "credit");
    assert_eq!(first["currency"], "USD");
    assert!(first["started_at"]
        .as_str()
        .unwrap()
        .parse::<chrono::DateTime<chrono::Utc>>()
        .is_ok());
    let (cost, held) = (dec(&first["cost"]), dec(&first["held"]));
    assert!(cost > rust_decimal::Decimal::ZERO, "{first}");
    assert!(cost <= held, "{first}");
    let tokens = first["output_tokens"].as_u64().unwrap();
    // It keeps drawing while it streams.
    let later = wait_inflight(&g, &id, |e| {
        e.is_some_and(|e| e["output_tokens"].as_u64().unwrap() > tokens)
    })
    .await
    .unwrap();
    assert!(dec(&later["cost"]) > cost, "{later}");

    // The key filter: the demo key lists it, the other key has nothing open.
    let mine = inflight(&g, &format!("?key_id={demo}")).await;
    assert!(
        mine.iter().any(|e| e["request_id"] == id.as_str()),
        "{mine:?}"
    );
    assert!(inflight(&g, &format!("?key_id={other_id}"))
        .await
        .is_empty());
    let (s, v) = g.admin_get("/admin/inflight?key_id=key_nope").await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"]["code"], "not_found", "{v}");

    // Done: gone from the list, and its record has the task.
    let len = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(len > 0);
    wait_inflight(&g, &id, |e| e.is_none()).await;
    let rec = record(&g, &id).await;
    assert_eq!(rec["task"], "report-42");
    assert_eq!(rec["output_tokens"], 200);

    // Without the token, 401.
    let r = g
        .client()
        .get(format!("{}/admin/inflight", g.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    g.assert_no_panic();
}
