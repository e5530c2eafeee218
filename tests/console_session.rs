//! Operator console login (issue: the console): the admin token for a session cookie (HttpOnly,
//! SameSite=Strict, scoped to /console, with an expiry), CSRF on every POST, failed logins
//! limited, logout, an expired session back at the login page, and no console on the client
//! listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::time::Duration;

/// A client that does not follow redirects, so that the tests see them.
fn http() -> ::reqwest::Client {
    ::reqwest::Client::builder()
        .redirect(::reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// `name=value` of the named cookie among a response's `Set-Cookie` headers, and the whole
/// header line.
fn set_cookie(r: &::reqwest::Response, name: &str) -> Option<(String, String)> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| (v.split(';').next().unwrap().to_string(), v.to_string()))
}

/// The value of the hidden `_csrf` field in a page.
fn csrf_in(page: &str) -> String {
    let at = page.find("name=\"_csrf\" value=\"").expect("a _csrf field") + 20;
    page[at..].split('"').next().unwrap().to_string()
}

/// Logs in; returns the session cookie (`name=value`) and the page's CSRF token.
async fn login(g: &Gateway, token: &str) -> ::reqwest::Response {
    let form = http()
        .get(format!("{}/console/login", g.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 200);
    let (login_cookie, _) = set_cookie(&form, "tollgate_console_login").unwrap();
    let csrf = csrf_in(&form.text().await.unwrap());
    http()
        .post(format!("{}/console/login", g.admin_url))
        .header("cookie", login_cookie)
        .form(&[("_csrf", csrf.as_str()), ("token", token)])
        .send()
        .await
        .unwrap()
}

fn location(r: &::reqwest::Response) -> String {
    r.headers()["location"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_log_in_for_a_session_and_out_again() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1", "1"),
        data_dir: None,
    });
    // Not logged in: the console sends to the login page.
    let r = http()
        .get(format!("{}/console/login", g.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let r = login(&g, ADMIN_TOKEN).await;
    assert_eq!(r.status(), 303, "{:?}", r.text().await);
    assert_eq!(location(&r), "/console");
    let (session, line) = set_cookie(&r, "tollgate_console").unwrap();
    let lower = line.to_ascii_lowercase();
    for attr in ["httponly", "samesite=strict", "path=/console", "max-age="] {
        assert!(lower.contains(attr), "{line}");
    }
    // Logged in: the login page sends on to the console.
    let r = http()
        .get(format!("{}/console/login", g.admin_url))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(location(&r), "/console");

    // Logout without the CSRF token is refused, and the session lives on.
    let r = http()
        .post(format!("{}/console/logout", g.admin_url))
        .header("cookie", &session)
        .form(&[("x", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The session's token is on its pages (the logout form of any page); a login form of a
    // live session redirects, so take it from the 403 page's absence: log out properly below.
    let wrong = http()
        .post(format!("{}/console/logout", g.admin_url))
        .header("cookie", &session)
        .form(&[("_csrf", "0".repeat(64))])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    let r = http()
        .get(format!("{}/console/login", g.admin_url))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "the refused logouts ended the session");
    g.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_refused_then_limited() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1", "1"),
        data_dir: None,
    });
    // Without the login form's token: refused whatever the admin token.
    let r = http()
        .post(format!("{}/console/login", g.admin_url))
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(set_cookie(&r, "tollgate_console").is_none());
    for _ in 0..5 {
        let r = login(&g, "wrong-token").await;
        assert_eq!(r.status(), 401);
        assert!(r.text().await.unwrap().contains("Wrong admin token"));
    }
    // The sixth try within the minute is refused, even with the right token.
    let r = login(&g, ADMIN_TOKEN).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert!(set_cookie(&r, "tollgate_console").is_none());
    // No page shows the admin token.
    assert!(!r.text().await.unwrap().contains(ADMIN_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_lands_on_the_login_page() {
    let g = Gateway::start_with_server(
        Setup {
            mocks: vec![("p1", ""), ("p2", "")],
            body: standard_body("", "1", "1"),
            data_dir: None,
        },
        "console_session_ttl_s = 1",
    );
    let r = login(&g, ADMIN_TOKEN).await;
    assert_eq!(r.status(), 303);
    let (session, _) = set_cookie(&r, "tollgate_console").unwrap();
    let r = http()
        .get(format!("{}/console/login", g.admin_url))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "live session");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = http()
        .get(format!("{}/console/login", g.admin_url))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the expired session must log in again");
    // A protected POST with the expired session goes to the login page.
    let r = http()
        .post(format!("{}/console/logout", g.admin_url))
        .header("cookie", &session)
        .form(&[("_csrf", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(location(&r), "/console/login");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_console_path_is_the_consoles_404_page() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1", "1"),
        data_dir: None,
    });
    let url = format!("{}/console/no/such/page", g.admin_url);
    // Behind the login like every page.
    let r = http().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let r = login(&g, ADMIN_TOKEN).await;
    let (session, _) = set_cookie(&r, "tollgate_console").unwrap();
    let r = http()
        .get(&url)
        .header("cookie", session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = r.text().await.unwrap();
    assert!(
        page.contains("There is no console page at /console/no/such/page."),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_not_served_on_the_client_listener() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1", "1"),
        data_dir: None,
    });
    for path in ["/console", "/console/login"] {
        let r = http()
            .get(format!("{}{path}", g.client_url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}

/// The operators' and the key holders' sessions live in one store, but a session of one kind is
/// no session of the other; session cookies are `Secure` when the request came over TLS (here
/// as a proxy in front says, `X-Forwarded-Proto: https`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_session_is_no_operator_session_and_cookies_are_secure_over_tls() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1", "1"),
        data_dir: None,
    });
    let r = http()
        .post(format!("{}/key", g.client_url))
        .form(&[("key", DEMO_KEY)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let (market, line) = set_cookie(&r, "tg_market").unwrap();
    assert!(!line.to_ascii_lowercase().contains("secure"), "{line}");
    let key_page = http()
        .get(format!("{}/", g.client_url))
        .header("cookie", &market)
        .send()
        .await
        .unwrap();
    assert!(key_page.text().await.unwrap().contains("id=\"key-view\""));
    // The key holder's session id as an operator's cookie: no console.
    let id = market.split_once('=').unwrap().1;
    let r = http()
        .get(format!("{}/console", g.admin_url))
        .header("cookie", format!("tollgate_console={id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(location(&r), "/console/login");

    // An operator's session id as a key holder's cookie: the public page.
    let r = login(&g, ADMIN_TOKEN).await;
    let (session, _) = set_cookie(&r, "tollgate_console").unwrap();
    let id = session.split_once('=').unwrap().1;
    let page = http()
        .get(format!("{}/", g.client_url))
        .header("cookie", format!("tg_market={id}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains("id=\"key-view\""));
    assert!(page.contains("id=\"key-form\""));

    // Over TLS, both kinds of cookie are Secure.
    let r = http()
        .post(format!("{}/key", g.client_url))
        .header("x-forwarded-proto", "https")
        .form(&[("key", DEMO_KEY)])
        .send()
        .await
        .unwrap();
    let (_, line) = set_cookie(&r, "tg_market").unwrap();
    assert!(line.to_ascii_lowercase().contains("; secure"), "{line}");
    let form = http()
        .get(format!("{}/console/login", g.admin_url))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    let (login_cookie, line) = set_cookie(&form, "tollgate_console_login").unwrap();
    assert!(line.to_ascii_lowercase().contains("; secure"), "{line}");
    let csrf = csrf_in(&form.text().await.unwrap());
    let r = http()
        .post(format!("{}/console/login", g.admin_url))
        .header("x-forwarded-proto", "https")
        .header("cookie", login_cookie)
        .form(&[("_csrf", csrf.as_str()), ("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let (_, line) = set_cookie(&r, "tollgate_console").unwrap();
    assert!(line.to_ascii_lowercase().contains("; secure"), "{line}");
    g.assert_no_panic();
}
