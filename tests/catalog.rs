//! The live model catalog: `/v1/models` per key and `/admin/catalog` (docs/api.md, R21, R33).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn models(g: &Gateway, key: &str, all: bool) -> Vec<Value> {
    let q = if all { "?include_unavailable=true" } else { "" };
    let r = g
        .client()
        .get(format!("{}/v1/models{q}", g.client_url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-tollgate-request-id"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list");
    v["data"].as_array().unwrap().clone()
}

fn ids(list: &[Value]) -> Vec<String> {
    list.iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// One model `solo` with a single route whose breaker opens after one failure.
fn solo_body() -> String {
    format!(
        r#"
[buckets.credit]
currency = "USD"

[[models]]
name = "solo"
tokenizer = "chunks"
retry = {{ max_retries = 0 }}
routes = [ {{ provider = "p1", upstream_model = "up-solo", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }} ]

[[models]]
name = "other"
tokenizer = "chunks"
routes = [ {{ provider = "p2", upstream_model = "up-other", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }} ]

[[keys]]
name = "demo"
secret = "{DEMO_KEY}"
topup = {{ credit = "1" }}
"#
    )
}

#[tokio::test]
async fn a_model_whose_only_route_is_open_is_hidden_and_explained() {
    let g = Gateway::start(Setup {
        mocks: vec![
            (
                "p1",
                "circuit = { failure_threshold = 1, min_requests = 1000, open_ms = 60000 }",
            ),
            ("p2", ""),
        ],
        body: solo_body(),
        data_dir: None,
    });
    let before = models(&g, DEMO_KEY, false).await;
    assert_eq!(ids(&before), vec!["solo", "other"]);
    let route = &before[0]["tollgate"]["routes"][0];
    assert_eq!(route["route"], "solo/p1");
    assert_eq!(route["role"], "primary");
    assert_eq!(route["state"], "closed");
    assert_eq!(route["input_per_mtok"], "1");
    assert_eq!(route["currency"], "USD");
    assert_eq!(before[0]["owned_by"], "tollgate");

    // One failure opens the breaker of the only route.
    g.mock_options("p1", json!({"fault": "500"})).await;
    let r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .json(&json!({"model": "solo", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    // The breaker state is published by the route actor: wait for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = models(&g, DEMO_KEY, false).await;
        if ids(&now) == vec!["other"] {
            break;
        }
        assert!(Instant::now() < deadline, "solo still listed: {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all = models(&g, DEMO_KEY, true).await;
    let solo = all.iter().find(|m| m["id"] == "solo").unwrap();
    assert_eq!(solo["tollgate"]["available"], false);
    assert_eq!(solo["tollgate"]["reason"], "no_route_available");
    assert_eq!(solo["tollgate"]["routes"][0]["state"], "open");
    assert!(solo["tollgate"]["routes"][0]["last_failure"]["reason"].is_string());
    let other = all.iter().find(|m| m["id"] == "other").unwrap();
    assert_eq!(other["tollgate"]["available"], true);

    // The admin catalog shows the same for that key, and every model with its routes.
    let key_id = g.demo_key_id().await;
    let (s, cat) = g
        .admin_get(&format!("/admin/catalog?key_id={key_id}"))
        .await;
    assert_eq!(s, 200);
    let solo = cat["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "solo")
        .unwrap();
    assert_eq!(solo["available"], false);
    assert_eq!(solo["reason"], "no_route_available");
    let (s, cat) = g.admin_get("/admin/catalog").await;
    assert_eq!(s, 200);
    assert_eq!(cat["models"].as_array().unwrap().len(), 2);
    assert!(cat["models"][0]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k == &json!(key_id)));
}

#[tokio::test]
async fn a_restricted_key_sees_only_its_models_and_an_empty_wallet_is_explained() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1", "1"),
        data_dir: None,
    });
    // A key limited to the embeddings model.
    let (s, k) = g
        .admin_post(
            "/admin/keys",
            json!({"name": "emb-only", "models": ["emb"]}),
        )
        .await;
    assert_eq!(s, 201, "{k}");
    let secret = k["secret"].as_str().unwrap().to_string();
    let key_id = k["id"].as_str().unwrap().to_string();
    // Unfunded: the model is permitted but not callable.
    assert!(models(&g, &secret, false).await.is_empty());
    let all = models(&g, &secret, true).await;
    assert_eq!(ids(&all), vec!["emb"]);
    assert_eq!(all[0]["tollgate"]["reason"], "insufficient_balance");
    // Funded: callable.
    let (s, _) = g
        .admin_post(
            &format!("/admin/keys/{key_id}/topup"),
            json!({"bucket": "credit", "amount": "1"}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(ids(&models(&g, &secret, false).await), vec!["emb"]);
    // The admin view for that key shows the rest as not allowed.
    let (_, cat) = g
        .admin_get(&format!("/admin/catalog?key_id={key_id}"))
        .await;
    let m = cat["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "m")
        .unwrap();
    assert_eq!(m["available"], false);
    assert_eq!(m["reason"], "model_not_allowed");

    // A key that may spend only the routed bucket sees `m` through its backup route.
    let (_, k2) = g
        .admin_post(
            "/admin/keys",
            json!({"name": "routed-only", "buckets": ["routed"]}),
        )
        .await;
    let id2 = k2["id"].as_str().unwrap();
    g.admin_post(
        &format!("/admin/keys/{id2}/topup"),
        json!({"bucket": "routed", "amount": "1"}),
    )
    .await;
    let list = models(&g, k2["secret"].as_str().unwrap(), true).await;
    let m = list.iter().find(|m| m["id"] == "m").unwrap();
    assert_eq!(m["tollgate"]["available"], true);
    let emb = list.iter().find(|m| m["id"] == "emb").unwrap();
    assert_eq!(emb["tollgate"]["reason"], "bucket_not_allowed");
}

/// R19: a probe that does not find the route's upstream model reports exactly `upstream model
/// <id> not listed`, in `/admin/routes` and the catalogs alike; `source` says a probe found it.
/// A failed request's reason says `request`.
#[tokio::test]
async fn probe_failure_reason_is_the_contract_text() {
    let g = Gateway::start(Setup {
        mocks: vec![
            (
                "p1",
                "probe = { interval_ms = 100, kind = \"models\" }\ncircuit = { failure_threshold = 1000, min_requests = 1000 }",
            ),
            ("p2", ""),
        ],
        body: solo_body(),
        data_dir: None,
    });
    g.mock_options("p1", json!({"models": ["something-else"]}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let view = loop {
        let (s, v) = g.admin_get("/admin/routes").await;
        assert_eq!(s, 200);
        let r = v["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["route"] == "solo/p1")
            .unwrap()
            .clone();
        if r["last_probe"]["ok"] == false && r["last_failure"].is_object() {
            break r;
        }
        assert!(Instant::now() < deadline, "no failed probe: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let want = json!("upstream model up-solo not listed");
    assert_eq!(view["last_failure"]["reason"], want, "{view}");
    assert_eq!(view["last_failure"]["source"], "probe", "{view}");
    assert_eq!(view["last_probe"]["reason"], want, "{view}");

    let all = models(&g, DEMO_KEY, true).await;
    let solo = all.iter().find(|m| m["id"] == "solo").unwrap();
    let failure = &solo["tollgate"]["routes"][0]["last_failure"];
    assert_eq!(failure["reason"], want, "{solo}");
    assert_eq!(failure["source"], "probe", "{solo}");
    let (_, cat) = g.admin_get("/admin/catalog").await;
    let solo = cat["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "solo")
        .unwrap();
    assert_eq!(solo["routes"][0]["last_failure"]["reason"], want, "{solo}");

    // A request that fails on p2 records a failure whose source is the request.
    g.mock_options("p2", json!({"fault": "500"})).await;
    let r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .json(&json!({"model": "other", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = g.admin_get("/admin/routes").await;
        let r = v["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["route"] == "other/p2")
            .unwrap()
            .clone();
        if r["last_failure"].is_object() {
            assert_eq!(r["last_failure"]["source"], "request", "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "no failure recorded: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
