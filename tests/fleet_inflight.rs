//! The fleet-wide in-flight view (docs/fleet.md): two tollgate processes on
//! `[store] kind = "postgres"` over one throwaway PostgreSQL cluster (tests/common/pg.rs), streams
//! open through each, and every instance's `GET /admin/inflight` and console page listing every
//! instance's open requests, each naming the instance that serves it, with the consumption the
//! other instance persisted (at most one flush interval old).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::pg::PgCluster;
use common::*;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const INSTANCES: [&str; 2] = ["gw-a", "gw-b"];
const URL_ENV: &str = "TOLLGATE_DATABASE_URL";

/// Two gateways on one database; dropping it kills the gateways, then stops the cluster.
struct Fleet {
    gws: Vec<Gateway>,
    _pg: PgCluster,
}

fn fleet_body(instance: &str) -> String {
    format!(
        r#"
[store]
kind = "postgres"
url_env = "{URL_ENV}"
pool_size = 4
instance_id = "{instance}"
lease_ttl_ms = 10000

[settlement]
flush_interval_ms = 50

[buckets.credit]
currency = "USD"
kind = "official"

[[models]]
name = "m"
tokenizer = "chunks"
retry = {{ max_retries = 0, backoff_base_ms = 5, backoff_max_ms = 50 }}
routes = [
  {{ provider = "p1", upstream_model = "up-m1", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }},
]
"#
    )
}

impl Fleet {
    fn start() -> Fleet {
        let pg = PgCluster::start();
        let gws = INSTANCES
            .iter()
            .map(|id| {
                Gateway::start_extra(
                    Setup {
                        mocks: vec![("p1", NO_BREAKER)],
                        body: fleet_body(id),
                        data_dir: None,
                    },
                    Extra {
                        env: vec![(URL_ENV.to_string(), pg.url())],
                        ..Extra::default()
                    },
                )
            })
            .collect();
        Fleet { gws, _pg: pg }
    }
}

/// Creates a funded key through `g`; returns (id, secret).
async fn funded_key(g: &Gateway, name: &str, project: &str) -> (String, String) {
    let (s, v) = g
        .admin_post(
            "/admin/keys",
            json!({"name": name, "workspace": "fleet", "project": project}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let secret = v["secret"].as_str().unwrap().to_string();
    let (s, v) = g
        .admin_post(
            &format!("/admin/keys/{id}/topup"),
            json!({"bucket": "credit", "amount": "10"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    (id, secret)
}

/// Opens a slow stream through `g` (a token every 100 ms for 8 s) tagged with `task`; returns
/// its request id and the response, which the caller keeps open.
async fn open_stream(g: &Gateway, secret: &str, task: &str) -> (String, ::reqwest::Response) {
    let r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(secret)
        .header("x-tollgate-task", task)
        .header("x-mock-tokens", "80")
        .header("x-mock-interval-ms", "100")
        .json(&json!({"model": "m", "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "in flight"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    (id, r)
}

/// Polls `path` on `g` until `done` holds for the listed requests, by request id; fails after
/// 10 s with the last answer.
async fn inflight_until(
    g: &Gateway,
    path: &str,
    done: impl Fn(&BTreeMap<String, Value>) -> bool,
) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = g.admin_get(path).await;
        assert_eq!(s, 200, "{v}");
        let open: BTreeMap<String, Value> = v["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["request_id"].as_str().unwrap().to_string(), r.clone()))
            .collect();
        if done(&open) {
            return open;
        }
        assert!(
            Instant::now() < deadline,
            "{path} on {} did not list what was expected: {v}",
            g.admin_url
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_instance_lists_every_instance_open_requests() {
    let f = Fleet::start();
    let (a, b) = (&f.gws[0], &f.gws[1]);
    let (key1, secret1) = funded_key(a, "one", "alpha").await;
    let (key2, secret2) = funded_key(b, "two", "beta").await;

    // Two streams through A (key one), one through B (key one), one through B (key two).
    let mut streams = Vec::new();
    for (g, secret, task) in [
        (a, &secret1, "run-a1"),
        (a, &secret1, "run-a2"),
        (b, &secret1, "run-b1"),
        (b, &secret2, "run-b2"),
    ] {
        let (id, resp) = open_stream(g, secret, task).await;
        streams.push((id, g, task, resp));
    }
    let serving: BTreeMap<String, (&str, &str)> = streams
        .iter()
        .map(|(id, g, task, _)| {
            let instance = if std::ptr::eq(*g, a) { "gw-a" } else { "gw-b" };
            (id.clone(), (instance, *task))
        })
        .collect();

    for g in [a, b] {
        // Every open request with output drawn (the other instance's as it persisted it).
        let open = inflight_until(g, "/admin/inflight", |open| {
            serving.keys().all(|id| {
                open.get(id)
                    .is_some_and(|r| r["output_tokens"].as_u64().unwrap_or(0) > 0)
            })
        })
        .await;
        assert_eq!(open.len(), serving.len(), "only these are open: {open:?}");
        for (id, (instance, task)) in &serving {
            let r = &open[id];
            assert_eq!(r["instance_id"], *instance, "{r}");
            assert_eq!(r["task"], *task, "{r}");
            assert_eq!(r["requested_model"], "m", "{r}");
            assert_eq!(r["route"], "m/p1", "{r}");
            assert_eq!(r["bucket"], "credit", "{r}");
            assert_eq!(r["currency"], "USD", "{r}");
            let key = if *task == "run-b2" { &key2 } else { &key1 };
            assert_eq!(r["key_id"], key.as_str(), "{r}");
            let project = if *task == "run-b2" { "beta" } else { "alpha" };
            assert_eq!(r["project"], project, "{r}");
            // What the request has cost so far never exceeds what it holds.
            let (cost, held) = (dec(&r["cost"]), dec(&r["held"]));
            assert!(cost > rust_decimal::Decimal::ZERO, "{r}");
            assert!(cost <= held, "{r}");
        }
        // Newest first.
        let (_, v) = g.admin_get("/admin/inflight").await;
        let started: Vec<chrono::DateTime<chrono::Utc>> = v["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["started_at"].as_str().unwrap().parse().unwrap())
            .collect();
        let mut sorted = started.clone();
        sorted.sort_by(|x, y| y.cmp(x));
        assert_eq!(started, sorted);

        // One key's requests, wherever they run.
        let only_two = inflight_until(g, &format!("/admin/inflight?key_id={key2}"), |open| {
            !open.is_empty()
        })
        .await;
        assert_eq!(only_two.len(), 1, "{only_two:?}");
        assert_eq!(only_two.values().next().unwrap()["task"], "run-b2");
    }

    // The console's page lists them too, with the instance serving each.
    let console = no_redirect_client();
    let session = console_login(&console, a).await;
    let r = console
        .get(format!("{}/console/inflight.json", a.admin_url))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let rows: BTreeMap<String, String> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["instance"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (id, (instance, _)) in &serving {
        assert_eq!(rows.get(id).map(String::as_str), Some(*instance), "{v}");
    }
    let r = console
        .get(format!("{}/console/inflight", a.admin_url))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    let page = r.text().await.unwrap();
    assert!(page.contains("<th>Instance</th>"), "{page}");
    for id in serving.keys() {
        assert!(page.contains(id.as_str()), "{id} missing from the page");
    }

    // Once the streams end, no instance lists them any more.
    drop(streams);
    for g in [a, b] {
        inflight_until(g, "/admin/inflight", |open| open.is_empty()).await;
    }
    for g in &f.gws {
        g.assert_no_panic();
    }
}

fn no_redirect_client() -> ::reqwest::Client {
    ::reqwest::Client::builder()
        .redirect(::reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Logs in to `g`'s operator console through its form; returns the session cookie.
async fn console_login(client: &::reqwest::Client, g: &Gateway) -> String {
    let cookie = |r: &::reqwest::Response, name: &str| {
        r.headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .find(|c| c.starts_with(&format!("{name}=")))
            .map(str::to_string)
            .unwrap()
    };
    let r = client
        .get(format!("{}/console/login", g.admin_url))
        .send()
        .await
        .unwrap();
    let login_cookie = cookie(&r, "tollgate_console_login");
    let html = r.text().await.unwrap();
    let at = html.find("name=\"_csrf\" value=\"").unwrap() + 20;
    let csrf = html[at..].split('"').next().unwrap().to_string();
    let r = client
        .post(format!("{}/console/login", g.admin_url))
        .header("cookie", login_cookie)
        .form(&[("_csrf", csrf.as_str()), ("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "login refused");
    cookie(&r, "tollgate_console")
}
