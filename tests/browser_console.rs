//! The operator console in a real headless Chromium (WebDriver, `tests/webdriver/`): logging in
//! and out through the forms, the in-flight page following a slow stream live, and a workflow
//! run's page. Each test saves a screenshot of its page to `docs/screenshots/`.
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
    s.wait_text(".error", Duration::from_secs(5), |t| {
        t.contains("Wrong admin token")
    })
    .await;
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
