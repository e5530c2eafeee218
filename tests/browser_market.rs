//! The marketplace page (`GET /` on the client listener) in a real headless Chromium, driven
//! through WebDriver (`tests/webdriver/`). Each test saves a screenshot of its page to
//! `docs/screenshots/`. Without `chromium` and `chromedriver` installed these tests fail, saying
//! what to install.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod webdriver;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use webdriver::{Driver, Session};

/// One browser at a time: two cores are shared with the gateway, the mocks and other builds.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Browser {
    _driver: Driver,
    session: Session,
    _profile: tempfile::TempDir,
}

async fn browser() -> Browser {
    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let session = driver.session(profile.path()).await;
    Browser {
        _driver: driver,
        session,
        _profile: profile,
    }
}

/// Waits until our script has refreshed the page from `/market/state` at least once after now.
async fn wait_live(s: &Session) {
    let since = s
        .execute("return Date.now();", vec![])
        .await
        .as_f64()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = s
            .execute(
                "var r = document.querySelector('[data-market]'); return r && r.getAttribute('data-updated');",
                vec![],
            )
            .await;
        if let Some(t) = v.as_str().and_then(|t| t.parse::<f64>().ok()) {
            if t >= since {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the page's script never refreshed it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn script_count(s: &Session) -> u64 {
    s.execute("return document.querySelectorAll('script').length;", vec![])
        .await
        .as_u64()
        .unwrap()
}

/// Posts `secret` through the page's key form and waits for the key's view.
async fn use_key(s: &Session, g: &Gateway, secret: &str) {
    s.goto(&format!("{}/", g.client_url)).await;
    s.find("#key").await.send_keys(secret).await;
    s.find("#key-form button[type=submit]").await.click().await;
    s.wait_text("main", Duration::from_secs(5), |t| {
        t.contains("Viewing as key") || t.contains("not valid")
    })
    .await;
}

async fn chat(g: &Gateway, secret: &str, model: &str) -> String {
    chat_in(g, secret, model, None).await
}

/// A chat request, as part of workflow run `task` if given.
async fn chat_in(g: &Gateway, secret: &str, model: &str, task: Option<&str>) -> String {
    let mut r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(secret)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}));
    if let Some(t) = task {
        r = r.header("x-tollgate-task", t);
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    r.headers()["x-tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_string()
}

/// Every model and every route the catalog lists is on the page with its kind, bucket and
/// currency, both prices per 1M, upstream model, order and state, and each model says whether
/// it is callable.
#[tokio::test]
async fn marketplace_lists_every_model_and_route_with_price_and_state() {
    let _one = BROWSER.lock().await;
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "10", "10"),
        data_dir: None,
    });
    let b = browser().await;
    let s = &b.session;
    s.goto(&format!("{}/", g.client_url)).await;
    wait_live(s).await;
    let (st, catalog) = g.admin_get("/admin/catalog").await;
    assert_eq!(st, 200, "{catalog}");
    let models = catalog["models"].as_array().unwrap();
    assert_eq!(models.len(), 2, "{catalog}");
    let expected = [
        // (route index in model m, kind, bucket (currency), in, out, upstream)
        (
            "m",
            0,
            "primary",
            "official",
            "credit (USD)",
            "1 USD / 1M",
            "2 USD / 1M",
            "up-m1",
        ),
        (
            "m",
            1,
            "backup 1",
            "routed",
            "routed (CNY)",
            "3 CNY / 1M",
            "4 CNY / 1M",
            "up-m2",
        ),
        (
            "emb",
            0,
            "primary",
            "official",
            "credit (USD)",
            "0.5 USD / 1M",
            "0 USD / 1M",
            "up-emb",
        ),
    ];
    for (model, i, order, kind, bucket, p_in, p_out, upstream) in expected {
        let m = models.iter().find(|m| m["id"] == model).unwrap();
        let route = m["routes"][i]["route"].as_str().unwrap();
        let row = s
            .find(&format!(
                "section[data-model=\"{model}\"] tr[data-route-row=\"{route}\"]"
            ))
            .await;
        let cells: Vec<String> = {
            let v = s
                .execute(
                    "return Array.from(arguments[0].cells).map(function (c) { return c.textContent; });",
                    vec![row.reference()],
                )
                .await;
            v.as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            cells[..8],
            [order, route, kind, bucket, p_in, p_out, upstream, "closed"],
            "{model} route {i}: {cells:?}"
        );
        assert_eq!(cells[8], "no probe yet");
        assert_eq!(cells[9], "none");
        let verdict = s.text_of(&format!("[data-verdict=\"{model}\"]")).await;
        assert_eq!(verdict, "callable");
    }
    // Exactly the catalog's routes, no more.
    assert_eq!(s.find_all("tr[data-route-row]").await.len(), 3);
    // A served request shows in the route's recent success rate and median latency.
    chat(&g, DEMO_KEY, "m").await;
    let primary = models[0]["routes"][0]["route"]
        .as_str()
        .unwrap()
        .to_string();
    s.wait_text(
        &format!("[data-route=\"{primary}\"][data-field=\"success\"]"),
        Duration::from_secs(3),
        |t| t == "100%",
    )
    .await;
    let p50 = s
        .text_of(&format!("[data-route=\"{primary}\"][data-field=\"p50\"]"))
        .await;
    assert!(p50.ends_with(" ms"), "{p50}");
    s.save_screenshot("market-public").await;
    b.session.close().await;
}

/// One model `solo` on provider `p1`, probed every 200 ms with a one-token chat, whose breaker
/// opens at the first failure and tries again after 300 ms.
fn solo_body() -> String {
    r#"
[buckets.credit]
currency = "USD"
kind = "official"

[[models]]
name = "solo"
tokenizer = "chunks"
routes = [
  { provider = "p1", upstream_model = "up-solo", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
]
"#
    .to_string()
}

/// When the route's upstream starts failing, the open page shows the breaker open and the
/// failed probe within 2 s without a reload, and shows it closed again once the upstream
/// recovers.
#[tokio::test]
async fn a_route_going_down_and_coming_back_shows_live_without_reload() {
    let _one = BROWSER.lock().await;
    let g = Gateway::start(Setup {
        mocks: vec![(
            "p1",
            "probe = { interval_ms = 200, kind = \"chat\" }\ncircuit = { failure_threshold = 1, open_ms = 300, max_open_ms = 300 }",
        )],
        body: solo_body(),
        data_dir: None,
    });
    let b = browser().await;
    let s = &b.session;
    s.goto(&format!("{}/", g.client_url)).await;
    let state = "[data-route=\"solo/p1\"][data-field=\"state\"]";
    let probe = "[data-route=\"solo/p1\"][data-field=\"probe\"]";
    let route_ok = s.find_all(state).await;
    assert_eq!(route_ok.len(), 1, "the route's state cell");
    s.wait_text(probe, Duration::from_secs(3), |t| t.starts_with("ok"))
        .await;
    s.wait_text(state, Duration::from_secs(3), |t| t == "closed")
        .await;
    // A mark on the window: a reload would lose it.
    s.execute("window.__noReload = 42;", vec![]).await;
    g.mock_options("p1", json!({"fault": "500"})).await;
    let t0 = Instant::now();
    s.wait_text(state, Duration::from_secs(2), |t| t == "open")
        .await;
    let took = t0.elapsed();
    assert!(took <= Duration::from_secs(2), "shown after {took:?}");
    s.wait_text(probe, Duration::from_secs(1), |t| t.starts_with("failed"))
        .await;
    let failure = s
        .text_of("[data-route=\"solo/p1\"][data-field=\"failure\"]")
        .await;
    assert!(failure.contains("upstream answered 500"), "{failure}");
    s.save_screenshot("market-route-down").await;
    g.mock_options("p1", json!({"fault": null})).await;
    s.wait_text(state, Duration::from_secs(5), |t| t == "closed")
        .await;
    s.wait_text(probe, Duration::from_secs(2), |t| t.starts_with("ok"))
        .await;
    assert_eq!(s.text_of("[data-verdict=\"solo\"]").await, "callable");
    let mark = s.execute("return window.__noReload;", vec![]).await;
    assert_eq!(mark, json!(42), "the page was reloaded");
    b.session.close().await;
}

/// Two keys: `alice` has money only in `credit`, so `r` (served only from `routed`) is not
/// callable and the page says why; each key sees its own requests and never the other's. The
/// key travels in a form post, the session in an HttpOnly cookie: neither in the URL nor
/// readable by scripts. A wrong key gets the form again with an error and 401.
#[tokio::test]
async fn a_key_sees_why_a_model_is_not_callable_and_only_its_own_requests() {
    let _one = BROWSER.lock().await;
    let alice = "tg-alice-secret-0001";
    let bob = "tg-bob-secret-00002";
    let body = format!(
        r#"
[buckets.credit]
currency = "USD"
kind = "official"

[buckets.routed]
currency = "CNY"
kind = "routed"

[[models]]
name = "m"
tokenizer = "chunks"
routes = [
  {{ provider = "p1", upstream_model = "up-m", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }},
]

[[models]]
name = "r"
tokenizer = "chunks"
routes = [
  {{ provider = "p1", upstream_model = "up-r", bucket = "routed", input_per_mtok = "3", output_per_mtok = "4" }},
]

[[keys]]
name = "alice"
secret = "{alice}"
project = "alpha"
topup = {{ credit = "10" }}

[[keys]]
name = "bob"
secret = "{bob}"
project = "beta"
topup = {{ credit = "10", routed = "5" }}
"#
    );
    let g = Gateway::start(Setup {
        mocks: vec![("p1", "")],
        body,
        data_dir: None,
    });
    let a1 = chat(&g, alice, "m").await;
    let b1 = chat(&g, bob, "m").await;
    let a2 = chat_in(&g, alice, "m", Some("alice-run-1")).await;
    let b2 = chat(&g, bob, "r").await;

    // A wrong key: the form again, an error without detail, 401.
    let r = g
        .client()
        .post(format!("{}/key", g.client_url))
        .form(&[("key", "tg-not-a-key-at-all")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    // Another site's form cannot sign a visitor in, even with a right key.
    let r = g
        .client()
        .post(format!("{}/key", g.client_url))
        .header("sec-fetch-site", "cross-site")
        .form(&[("key", alice)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());

    let b = browser().await;
    let s = &b.session;
    use_key(s, &g, "tg-wrong-key-000").await;
    assert_eq!(s.text_of("#key-error").await, "That key is not valid.");
    assert!(s.find_all("#key-view").await.is_empty());

    use_key(s, &g, alice).await;
    assert_eq!(s.text_of("#key-name").await, "alice");
    assert_eq!(s.current_url().await, format!("{}/", g.client_url));
    let cookies = s.execute("return document.cookie;", vec![]).await;
    assert_eq!(cookies, json!(""), "the session cookie is HttpOnly");
    assert_eq!(
        s.text_of("[data-verdict=\"r\"]").await,
        "not callable: no balance in routed"
    );
    assert_eq!(
        s.text_of("[data-verdict=\"m\"]").await,
        "callable from this key"
    );
    let balances = s.text_of("#balances").await;
    assert!(balances.contains("credit"), "{balances}");
    assert!(balances.contains("0 CNY"), "{balances}");
    assert!(!balances.contains("USD\nCNY"), "{balances}");
    let mine: Vec<String> = {
        let mut v = Vec::new();
        for e in s.find_all("#requests tr[data-request]").await {
            v.push(e.attr("data-request").await.unwrap());
        }
        v
    };
    assert_eq!(
        mine,
        [a2.clone(), a1.clone()],
        "alice's requests, newest first"
    );
    let table = s.text_of("#requests").await;
    assert!(!table.contains(&b1) && !table.contains(&b2), "{table}");
    assert!(table.contains("USD"), "cost with its currency: {table}");
    // The key holder sees which of their requests belong to a workflow run.
    let task_of = |id: &str| format!("#requests tr[data-request='{id}'] td.task");
    assert_eq!(s.text_of(&task_of(&a2)).await, "alice-run-1");
    assert_eq!(s.text_of(&task_of(&a1)).await, "—");
    s.execute(
        "document.querySelector('#balances').scrollIntoView();",
        vec![],
    )
    .await;
    s.save_screenshot("market-key-view").await;

    // Forget the key: the public page again; then bob sees his own two and none of alice's.
    s.find("#forget").await.click().await;
    s.wait_text("main", Duration::from_secs(5), |t| {
        !t.contains("Viewing as key")
    })
    .await;
    assert_eq!(s.find_all("#key-form").await.len(), 1);
    use_key(s, &g, bob).await;
    assert_eq!(s.text_of("#key-name").await, "bob");
    let table = s.text_of("#requests").await;
    assert!(table.contains(&b1) && table.contains(&b2), "{table}");
    assert!(!table.contains(&a1) && !table.contains(&a2), "{table}");
    assert_eq!(
        s.text_of("[data-verdict=\"r\"]").await,
        "callable from this key"
    );
    b.session.close().await;
}

/// A key and a project whose names are markup show as text: no element is injected and no
/// script runs.
#[tokio::test]
async fn names_with_markup_show_as_text() {
    let _one = BROWSER.lock().await;
    let secret = "tg-markup-key-0001";
    let name = "<script>window.__pwned=1</script>eve";
    let project = "<img src=x onerror=\"window.__pwned=2\">proj";
    let g = Gateway::start(Setup {
        mocks: vec![("p1", "")],
        body: format!(
            r#"
[buckets.credit]
currency = "USD"
kind = "official"

[[models]]
name = "m"
tokenizer = "chunks"
routes = [
  {{ provider = "p1", upstream_model = "up-m", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }},
]

[[keys]]
name = '{name}'
secret = "{secret}"
project = '{project}'
topup = {{ credit = "10" }}
"#
        ),
        data_dir: None,
    });
    chat(&g, secret, "m").await;
    let b = browser().await;
    let s = &b.session;
    s.goto(&format!("{}/", g.client_url)).await;
    let public_scripts = script_count(s).await;
    use_key(s, &g, secret).await;
    assert_eq!(s.text_of("#key-name").await, name);
    assert_eq!(s.text_of("#key-project").await, project);
    assert_eq!(script_count(s).await, public_scripts, "an injected script");
    assert_eq!(
        s.execute(
            "return document.querySelectorAll('main img').length;",
            vec![]
        )
        .await,
        json!(0)
    );
    wait_live(s).await;
    assert_eq!(
        s.execute("return typeof window.__pwned;", vec![]).await,
        json!("undefined")
    );
    s.save_screenshot("market-escaped").await;
    b.session.close().await;
}

/// The operator console lives on the admin listener only: `/console` on the client listener is
/// a 404 (the API's envelope), in the browser as for any client.
#[tokio::test]
async fn operator_console_is_not_served_on_the_client_listener() {
    let _one = BROWSER.lock().await;
    let g = Gateway::start(Setup {
        mocks: vec![("p1", "")],
        body: solo_body(),
        data_dir: None,
    });
    for path in ["/console", "/console/login", "/console/ledger"] {
        let r = g
            .client()
            .get(format!("{}{path}", g.client_url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "not_found", "{path}: {v}");
    }
    let b = browser().await;
    let s = &b.session;
    s.goto(&format!("{}/console", g.client_url)).await;
    let text = s.text_of("body").await;
    assert!(text.contains("not_found"), "{text}");
    assert!(s.find_all("form").await.is_empty(), "{text}");
    s.save_screenshot("market-no-console").await;
    b.session.close().await;
}
