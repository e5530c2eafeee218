//! The operator console in a real headless Chromium (WebDriver, `tests/webdriver/`): logging in
//! and out through the forms, the in-flight page following a slow stream live, a workflow run's
//! page, the overview, wallets, explainer and routes pages, and no secret on any page, URL or
//! log line. Each test saves a screenshot of its page to `docs/screenshots/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod webdriver;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
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

/// The text of the first element matching `css`, read in one script run: the in-flight table
/// is rebuilt every second, so an element found in one command may be gone by the next.
async fn text_now(s: &Session, css: &str) -> Option<String> {
    let v = s
        .execute(
            "var e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            vec![json!(css)],
        )
        .await;
    v.as_str().map(str::to_string)
}

/// Polls [`text_now`] until `pred` holds.
async fn wait_now(s: &Session, css: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = text_now(s, css).await;
        if let Some(t) = t.as_deref().filter(|t| pred(t)) {
            return t.to_string();
        }
        assert!(Instant::now() < deadline, "{css}: still {t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn gateway() -> Gateway {
    Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("allow_cross_bucket_fallback = true", "10", "10"),
        data_dir: None,
    })
}

/// Logs in through the login form.
async fn log_in(s: &Session, g: &Gateway) {
    s.goto(&format!("{}/console/login", g.admin_url)).await;
    s.find("input[name=token]")
        .await
        .send_keys(ADMIN_TOKEN)
        .await;
    s.find("button[type=submit]").await.click().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.current_url().await.ends_with("/console/login") {
        assert!(Instant::now() < deadline, "the login did not go through");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_in_and_out_through_the_forms() {
    let _one = BROWSER.lock().await;
    let g = gateway();
    let b = browser().await;
    let s = &b.session;
    // Without a session every console page leads to the login form.
    s.goto(&format!("{}/console/inflight", g.admin_url)).await;
    assert!(s.current_url().await.ends_with("/console/login"));
    s.save_screenshot("console-login").await;
    s.find("input[name=token]")
        .await
        .send_keys("not the token")
        .await;
    s.find("button[type=submit]").await.click().await;
    // The answer is a new page: poll for it (a lookup right after the click can run before it).
    wait_now(s, ".error", |t| t.contains("Wrong admin token")).await;
    log_in(s, &g).await;
    s.goto(&format!("{}/console/inflight", g.admin_url)).await;
    assert!(s.current_url().await.ends_with("/console/inflight"));
    // The session cookie is HttpOnly: the page's script cannot read it.
    let cookies = s.execute("return document.cookie;", vec![]).await;
    assert_eq!(cookies.as_str(), Some(""), "{cookies}");
    s.find("form[action='/console/logout'] button")
        .await
        .click()
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.current_url().await.ends_with("/console/login") {
        assert!(
            Instant::now() < deadline,
            "logout did not lead to the login page"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.goto(&format!("{}/console/inflight", g.admin_url)).await;
    assert!(
        s.current_url().await.ends_with("/console/login"),
        "the session outlived its logout"
    );
    b.session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_page_follows_a_slow_stream_and_forgets_it_when_it_ends() {
    let _one = BROWSER.lock().await;
    let g = gateway();
    let b = browser().await;
    let s = &b.session;
    log_in(s, &g).await;
    s.goto(&format!("{}/console/inflight", g.admin_url)).await;
    // A stream of 60 tokens, one every 100 ms, under a task name with markup in it.
    let client = g.client();
    let url = g.chat_url();
    let stream = tokio::spawn(async move {
        let r = client
            .post(url)
            .bearer_auth(DEMO_KEY)
            .header("x-mock-tokens", "60")
            .header("x-mock-interval-ms", "100")
            .header("x-tollgate-task", "<b>run-1</b>")
            .json(&json!({"model": "m", "stream": true,
                "messages": [{"role": "user", "content": "slow"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    });
    let first = wait_now(s, "#inflight tbody td.tokens", |t| {
        t.parse::<u64>().is_ok_and(|n| n > 0)
    })
    .await
    .parse::<u64>()
    .unwrap();
    let task = text_now(s, "#inflight tbody td:nth-child(4)").await;
    assert_eq!(
        task.as_deref(),
        Some("<b>run-1</b>"),
        "the task shows as text"
    );
    let bold = s
        .execute(
            "return document.querySelectorAll('#inflight b').length;",
            vec![],
        )
        .await;
    assert_eq!(bold, json!(0), "markup from the task was not interpreted");
    s.save_screenshot("console-inflight").await;
    // Growing while it runs, without a reload.
    wait_now(s, "#inflight tbody td.tokens", |t| {
        t.parse::<u64>().is_ok_and(|n| n >= first + 5)
    })
    .await;
    let _ = stream.await.unwrap();
    // Gone once it ended.
    let deadline = Instant::now() + Duration::from_secs(5);
    while text_now(s, "#inflight tbody tr").await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the ended stream is still listed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_page_lists_exactly_its_requests_and_its_cost_per_currency() {
    let _one = BROWSER.lock().await;
    let g = gateway();
    let client = g.client();
    // Two requests of run-a, one served by the backup (CNY) after the primary failed; one
    // request of run-b; one without a task.
    let send = |task: Option<&'static str>, headers: Vec<(&'static str, &'static str)>| {
        let mut r = client
            .post(g.chat_url())
            .bearer_auth(DEMO_KEY)
            .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        if let Some(t) = task {
            r = r.header("x-tollgate-task", t);
        }
        for (k, v) in headers {
            r = r.header(k, v);
        }
        async move {
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 200);
            let id = r.headers()["x-tollgate-request-id"]
                .to_str()
                .unwrap()
                .to_string();
            let body: serde_json::Value = r.json().await.unwrap();
            (id, body)
        }
    };
    let (a1, body1) = send(Some("run-a"), vec![]).await;
    let fault = format!("{}/_mock/options", g.mock_url("p1"));
    let r = client
        .post(&fault)
        .json(&json!({"fault": "500"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let (a2, body2) = send(Some("run-a"), vec![]).await;
    let r = client
        .post(&fault)
        .json(&json!({"fault": null}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let (b1, _) = send(Some("run-b"), vec![]).await;
    let (none, _) = send(None, vec![]).await;
    assert_eq!(body2["tollgate"]["bucket"], "routed", "{body2}");

    let b = browser().await;
    let s = &b.session;
    log_in(s, &g).await;
    s.goto(&format!("{}/console/tasks/run-a", g.admin_url))
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let ids = loop {
        let rows = s.find_all("#task-requests-table tbody tr").await;
        let mut ids = Vec::new();
        for r in &rows {
            ids.push(r.attr("data-request").await.unwrap());
        }
        if ids.len() >= 2 || Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.goto(&format!("{}/console/tasks/run-a", g.admin_url))
            .await;
    };
    assert_eq!(
        ids,
        vec![a1.clone(), a2.clone()],
        "run-a's requests in time order"
    );
    assert!(!ids.contains(&b1) && !ids.contains(&none));
    // Cost per currency, each in its own currency, never added together.
    let usd = s.text_of(".card.cost[data-currency=USD] .v").await;
    let cny = s.text_of(".card.cost[data-currency=CNY] .v").await;
    assert_eq!(
        usd,
        format!("{} USD", body1["tollgate"]["cost"].as_str().unwrap())
    );
    assert_eq!(
        cny,
        format!("{} CNY", body2["tollgate"]["cost"].as_str().unwrap())
    );
    let chain = s
        .text_of(&format!(
            "#task-requests-table tr[data-request='{a2}'] td:nth-child(5)"
        ))
        .await;
    assert!(
        chain.contains("✗ http_500") && chain.ends_with('✓'),
        "{chain}"
    );
    s.save_screenshot("console-task").await;
    // A task with no request: a 404 page, not an error.
    s.goto(&format!("{}/console/tasks/no-such-run", g.admin_url))
        .await;
    assert!(s.text_of("main").await.contains("No request of this task"));
    b.session.close().await;
}

/// Submits the form whose `action` is `action` (the first one) and waits for the next page.
async fn submit(s: &Session, action: &str) {
    let before = s.execute("return performance.timeOrigin;", vec![]).await;
    s.find(&format!("form[action='{action}'] button[type=submit]"))
        .await
        .click()
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = s.execute("return performance.timeOrigin;", vec![]).await;
        let ready = s.execute("return document.readyState;", vec![]).await;
        if now != before && ready == json!("complete") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no page after submitting {action}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_shows_its_chain_and_the_bucket_that_paid_in_the_list_and_on_its_page() {
    let _one = BROWSER.lock().await;
    let g = gateway();
    let client = g.client();
    let fault = format!("{}/_mock/options", g.mock_url("p1"));
    let r = client
        .post(&fault)
        .json(&json!({"fault": "500"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let r = client
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let b = browser().await;
    let s = &b.session;
    log_in(s, &g).await;
    s.goto(&format!("{}/console/ledger", g.admin_url)).await;
    let row = format!("#ledger-rows tr[data-id='{id}']");
    let deadline = Instant::now() + Duration::from_secs(5);
    while text_now(s, &row).await.is_none() {
        assert!(Instant::now() < deadline, "the request is not listed");
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.goto(&format!("{}/console/ledger", g.admin_url)).await;
    }
    let chain = text_now(s, &format!("{row} td:nth-child(6)"))
        .await
        .unwrap();
    assert_eq!(chain, "m/p1 ✗ http_500 → m/p1 ✗ http_500 → m/p2 ✓");
    let bucket = text_now(s, &format!("{row} td:nth-child(9)"))
        .await
        .unwrap();
    assert_eq!(bucket, "routed");
    let cost = text_now(s, &format!("{row} td:nth-child(11)"))
        .await
        .unwrap();
    assert!(cost.ends_with(" CNY"), "{cost}");
    s.save_screenshot("console-ledger").await;
    s.find(&format!("{row} a")).await.click().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.current_url().await.ends_with(&id) {
        assert!(Instant::now() < deadline, "the request's page did not open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let summary = wait_now(s, "main p", |t| t.contains("bucket that paid")).await;
    assert!(
        summary.contains("m/p1 ✗ http_500 → m/p1 ✗ http_500 → m/p2 ✓")
            && summary.contains("bucket that paid: routed"),
        "{summary}"
    );
    let attempts = s.find_all("main table:first-of-type tbody tr").await;
    assert_eq!(attempts.len(), 3, "every attempt is listed");
    s.save_screenshot("console-request").await;
    b.session.close().await;
}

/// The credit balance as the key's wallet page shows it.
async fn balance(s: &Session, g: &Gateway, key: &str) -> String {
    s.goto(&format!("{}/console/wallets/{key}", g.admin_url))
        .await;
    s.text_of("#balance-credit").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_through_the_form_shows_and_a_repeated_reference_applies_once() {
    let _one = BROWSER.lock().await;
    let g = gateway();
    let key = g.demo_key_id().await;
    let b = browser().await;
    let s = &b.session;
    log_in(s, &g).await;
    assert_eq!(balance(s, &g, &key).await, "10 USD");
    let topup = format!("/console/keys/{key}/topup");
    for round in 0..2 {
        s.goto(&format!("{}/console/keys", g.admin_url)).await;
        let form = format!("form[action='{topup}']");
        s.find(&format!("{form} input[name=amount]"))
            .await
            .send_keys("2.5")
            .await;
        s.find(&format!("{form} input[name=reference]"))
            .await
            .send_keys("inv-7")
            .await;
        submit(s, &topup).await;
        let note = s.text_of("main").await;
        if round == 1 {
            assert!(note.contains("was applied before"), "{note}");
            s.save_screenshot("console-topup-repeated").await;
        }
    }
    assert_eq!(
        balance(s, &g, &key).await,
        "12.5 USD",
        "the same reference applied twice"
    );
    s.save_screenshot("console-wallet").await;
    // Without the CSRF token, the same form is refused.
    s.goto(&format!("{}/console/keys", g.admin_url)).await;
    s.execute(
        "document.querySelectorAll('input[name=_csrf]').forEach(function (e) { e.remove(); });",
        vec![],
    )
    .await;
    let form = format!("form[action='{topup}']");
    s.find(&format!("{form} input[name=amount]"))
        .await
        .send_keys("1")
        .await;
    submit(s, &topup).await;
    assert!(s.text_of("main").await.contains("CSRF"));
    assert_eq!(balance(s, &g, &key).await, "12.5 USD");
    b.session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_lands_on_the_login_page() {
    let _one = BROWSER.lock().await;
    let g = Gateway::start_with_server(
        Setup {
            mocks: vec![("p1", ""), ("p2", "")],
            body: standard_body("", "10", "10"),
            data_dir: None,
        },
        "console_session_ttl_s = 1",
    );
    let b = browser().await;
    let s = &b.session;
    log_in(s, &g).await;
    s.goto(&format!("{}/console/keys", g.admin_url)).await;
    assert!(s.current_url().await.ends_with("/console/keys"));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    s.goto(&format!("{}/console/keys", g.admin_url)).await;
    assert!(
        s.current_url().await.ends_with("/console/login"),
        "an expired session still reached the page"
    );
    b.session.close().await;
}

/// Sends a chat request as the demo key; returns its request id.
async fn chat(g: &Gateway) -> String {
    let r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["x-tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_string()
}

/// The overview, the wallets, the spend explainer and the routes page, in the browser: each
/// shows the requests just sent, the charts are drawn by the server (SVG in the page, whatever
/// the script does), and each page is pictured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_wallets_explainer_and_routes_show_the_traffic() {
    let _one = BROWSER.lock().await;
    let g = gateway();
    // One request served by p1; one that fell back to p2 (CNY) while p1 answered 500.
    chat(&g).await;
    let fault = format!("{}/_mock/options", g.mock_url("p1"));
    let set_fault = |f: serde_json::Value| {
        let r = g.client().post(&fault).json(&json!({ "fault": f })).send();
        async move { assert!(r.await.unwrap().status().is_success()) }
    };
    set_fault(json!("500")).await;
    chat(&g).await;
    set_fault(serde_json::Value::Null).await;

    let b = browser().await;
    let s = &b.session;
    log_in(s, &g).await;
    let count_in = |css: &str| {
        format!(
            "return Array.from(document.querySelectorAll(\"{css}\")).reduce(function (n, e) {{ return n + Number(e.getAttribute('data-count')); }}, 0);"
        )
    };

    s.goto(&format!("{}/console", g.admin_url)).await;
    assert_eq!(s.text_of("#hour-requests").await, "2");
    assert_eq!(s.text_of("#hour-fallback-rate").await, "50.0%");
    assert!(s.text_of("#hour-spend-CNY").await.ends_with(" CNY"));
    assert_eq!(
        s.execute(&count_in("#hour-chart rect[data-count]"), vec![])
            .await,
        json!(2),
        "the last hour's bars add up to its requests"
    );
    assert_eq!(
        s.execute(&count_in("#day-chart rect[data-count]"), vec![])
            .await,
        json!(2)
    );
    s.save_screenshot("console-overview").await;

    s.goto(&format!("{}/console/wallets", g.admin_url)).await;
    let wallets = s.text_of("main").await;
    assert!(
        wallets.contains("demo") && wallets.contains("USD") && wallets.contains("CNY"),
        "{wallets}"
    );
    s.save_screenshot("console-wallets").await;

    // The default explanation: the last 7 days against the 7 before, per currency.
    s.goto(&format!("{}/console/explain", g.admin_url)).await;
    assert!(s.text_of("#change-USD").await.ends_with(" USD"));
    assert!(s.text_of("#change-CNY").await.ends_with(" CNY"));
    let bars = s
        .execute(
            "return document.querySelectorAll('main svg rect[data-driver]').length;",
            vec![],
        )
        .await;
    assert!(bars.as_u64().unwrap() > 0, "{bars}");
    s.save_screenshot("console-explain").await;

    s.goto(&format!("{}/console/routes", g.admin_url)).await;
    let p1 = s.text_of("tr[data-route='m/p1']").await;
    assert!(p1.contains("1 USD / 1M"), "{p1}");
    let fallbacks = s.text_of("tr[data-route='m/p1'] td:last-child").await;
    assert_eq!(fallbacks, "1", "one fallback from m/p1 in the last hour");
    s.save_screenshot("console-routes").await;
    b.session.close().await;
}

/// No page, on either listener, shows a provider key, the admin token or a key's secret (after
/// its creation); the key a visitor types into the marketplace's form is in no URL and no log
/// line, nor is the admin token typed into the login form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_page_shows_a_secret_and_the_forms_leave_none_behind() {
    let _one = BROWSER.lock().await;
    let provider_key = format!("sk-canary-{}", uuid::Uuid::new_v4().simple());
    let g = Gateway::start_extra(
        Setup {
            mocks: vec![
                ("p1", "api_key_env = \"TG_TEST_MOCK_PROVIDER_KEY\""),
                ("p2", ""),
            ],
            body: standard_body("allow_cross_bucket_fallback = true", "10", "10"),
            data_dir: None,
        },
        Extra {
            env: vec![
                ("TG_TEST_MOCK_PROVIDER_KEY".into(), provider_key.clone()),
                ("RUST_LOG".into(), "debug".into()),
            ],
            ..Extra::default()
        },
    );
    // Traffic through the keyed provider, a failure (its reason is shown) and a run.
    let id = chat(&g).await;
    let fault = format!("{}/_mock/options", g.mock_url("p1"));
    let r = g
        .client()
        .post(&fault)
        .json(&json!({"fault": "500"}))
        .send();
    assert!(r.await.unwrap().status().is_success());
    let r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .header("x-tollgate-task", "run-s")
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, created) = g.admin_post("/admin/keys", json!({"name": "bob"})).await;
    assert_eq!(status, 201, "{created}");
    let bob_secret = created["secret"].as_str().unwrap().to_string();
    let key_id = g.demo_key_id().await;
    let secrets = [
        provider_key.as_str(),
        ADMIN_TOKEN,
        DEMO_KEY,
        bob_secret.as_str(),
    ];

    let b = browser().await;
    let s = &b.session;
    let check = |url: String, source: serde_json::Value| {
        let source = source.as_str().unwrap_or_default().to_string();
        assert!(source.len() > 100, "{url}: {source}");
        for secret in secrets {
            assert!(!url.contains(secret), "a secret in the URL {url}");
            assert!(!source.contains(secret), "a secret on {url}");
        }
    };
    let source = "return document.documentElement.outerHTML;";
    // The marketplace, as the demo key sees it after typing it into the form.
    s.goto(&format!("{}/", g.client_url)).await;
    s.find("#key").await.send_keys(DEMO_KEY).await;
    s.find("#key-form button[type=submit]").await.click().await;
    s.wait_text("main", Duration::from_secs(5), |t| {
        t.contains("Viewing as key")
    })
    .await;
    for path in ["/", "/market/state"] {
        s.goto(&format!("{}{path}", g.client_url)).await;
        check(s.current_url().await, s.execute(source, vec![]).await);
    }
    log_in(s, &g).await;
    for path in [
        "/console".to_string(),
        "/console/ledger".to_string(),
        format!("/console/ledger/{id}"),
        "/console/ledger/tail".to_string(),
        "/console/wallets".to_string(),
        format!("/console/wallets/{key_id}"),
        "/console/explain".to_string(),
        "/console/routes".to_string(),
        "/console/keys".to_string(),
        "/console/inflight".to_string(),
        "/console/inflight.json".to_string(),
        "/console/tasks/run-s".to_string(),
    ] {
        s.goto(&format!("{}{path}", g.admin_url)).await;
        check(s.current_url().await, s.execute(source, vec![]).await);
    }
    b.session.close().await;
    let log = g.log();
    assert!(log.contains("key 'demo'"), "the gateway's log: {log}");
    for secret in secrets {
        assert!(!log.contains(secret), "{secret} logged:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_markup_show_as_text_in_the_console() {
    let _one = BROWSER.lock().await;
    let g = gateway();
    let (status, v) = g
        .admin_post(
            "/admin/keys",
            json!({"name": "<script>document.title='owned'</script>", "project": "<img src=x onerror=alert(1)>"}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let b = browser().await;
    let s = &b.session;
    log_in(s, &g).await;
    s.goto(&format!("{}/console/keys", g.admin_url)).await;
    let text = s.text_of("main").await;
    assert!(
        text.contains("<script>document.title='owned'</script>"),
        "{text}"
    );
    assert!(text.contains("<img src=x onerror=alert(1)>"), "{text}");
    let injected = s
        .execute(
            "return document.querySelectorAll('main script, main img').length + (document.title === 'owned' ? 100 : 0);",
            vec![],
        )
        .await;
    assert_eq!(injected, json!(0));
    s.save_screenshot("console-keys").await;
    b.session.close().await;
}
