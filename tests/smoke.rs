//! A first end-to-end check of the harness: one streamed completion through the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

#[tokio::test]
async fn streamed_completion_is_billed_exactly() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1", "1"),
        data_dir: None,
    });
    let r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .json(&serde_json::json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "12345678"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-route"], "m/p1");
    let events = sse_events(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    // 8 bytes → 2 input tokens at 1/M, 8 output tokens at 2/M.
    assert_eq!(usage["usage"]["prompt_tokens"], 2);
    assert_eq!(usage["usage"]["completion_tokens"], 8);
    assert_eq!(dec(&usage["tollgate"]["cost"]), "0.000018".parse().unwrap());
}
