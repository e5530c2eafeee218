//! The operator console's pages over HTTP (DESIGN §11): each page behind the login, figures
//! from requests made through the client API against the mock upstreams, the ledger explorer
//! (fallback chains, the bucket that paid, filters, paging, export, live tail), and bad input
//! (malformed filters, unknown ids, missing CSRF tokens, markup in names).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A console session: a client that does not follow redirects, with the session cookie.
struct Console {
    client: reqwest::Client,
    base: String,
    cookie: String,
    csrf: String,
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// `name=value` of the `Set-Cookie` for `name`.
fn set_cookie(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(str::to_string)
}

/// The value of the hidden `_csrf` field in a page.
fn csrf_in(html: &str) -> String {
    let at = html.find("name=\"_csrf\" value=\"").expect("a _csrf field") + 20;
    html[at..].split('"').next().unwrap().to_string()
}

impl Console {
    /// Logs in through the form, as a browser would.
    async fn login(g: &Gateway) -> Console {
        let client = no_redirects();
        let r = client
            .get(format!("{}/console/login", g.admin_url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let login_cookie = set_cookie(&r, "tollgate_console_login").unwrap();
        let csrf = csrf_in(&r.text().await.unwrap());
        let r = client
            .post(format!("{}/console/login", g.admin_url))
            .header("cookie", login_cookie)
            .form(&[("_csrf", csrf.as_str()), ("token", ADMIN_TOKEN)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303, "login refused");
        let cookie = set_cookie(&r, "tollgate_console").unwrap();
        let mut c = Console {
            client,
            base: g.admin_url.clone(),
            cookie,
            csrf: String::new(),
        };
        let (s, page) = c.get("/console/ledger").await;
        assert_eq!(s, 200, "{page}");
        c.csrf = csrf_in(&page);
        c
    }

    async fn get_raw(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.get_raw(path).await;
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// POSTs a form with the session's CSRF token.
    async fn post(&self, path: &str, fields: &[(&str, &str)]) -> (u16, String) {
        let mut all = vec![("_csrf", self.csrf.as_str())];
        all.extend_from_slice(fields);
        self.post_as_is(path, &all).await
    }

    /// POSTs a form exactly as given (no CSRF token added).
    async fn post_as_is(&self, path: &str, fields: &[(&str, &str)]) -> (u16, String) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .form(fields)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

/// Two routes for `m`: `p1` (credit, USD) first, `p2` (routed, CNY) as backup, which the demo
/// key may fall back to.
fn start() -> Gateway {
    Gateway::start(Setup {
        mocks: vec![("p1", NO_BREAKER), ("p2", NO_BREAKER)],
        body: standard_body("allow_cross_bucket_fallback = true", "10", "10"),
        data_dir: None,
    })
}

/// A chat request with `secret`; returns its request id.
async fn chat_as(g: &Gateway, secret: &str) -> String {
    let r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(secret)
        .timeout(Duration::from_secs(20))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "12345678"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["x-tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_string()
}

async fn chat(g: &Gateway) -> String {
    chat_as(g, DEMO_KEY).await
}

/// The ledger record of a request (the admin API), for the figures a page must show.
async fn record(g: &Gateway, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = g.admin_get(&format!("/admin/ledger/{id}")).await;
        if s == 200 {
            return v;
        }
        assert!(Instant::now() < deadline, "no record for {id}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A request that fell back from `p1` (failing with 500) to `p2`; returns its id.
async fn fallen_back(g: &Gateway) -> String {
    g.mock_options("p1", json!({"fault": "500"})).await;
    let id = chat(g).await;
    g.mock_options("p1", json!({"fault": null})).await;
    id
}

const FALLBACK_CHAIN: &str = "m/p1 ✗ http_500 → m/p1 ✗ http_500 → m/p2 ✓";

#[tokio::test]
async fn ledger_shows_a_fallback_chain_and_the_bucket_that_paid() {
    let g = start();
    let plain = chat(&g).await;
    let fell = fallen_back(&g).await;
    let rec = record(&g, &fell).await;
    assert_eq!(rec["bucket"], "routed", "{rec}");
    let c = Console::login(&g).await;

    let (s, page) = c.get("/console/ledger").await;
    assert_eq!(s, 200);
    assert!(page.contains(&plain) && page.contains(&fell), "{page}");
    assert!(page.contains(FALLBACK_CHAIN), "{page}");
    assert!(page.contains("<td>routed</td>"), "{page}");
    let cost = format!("{} CNY", rec["cost"].as_str().unwrap());
    assert!(page.contains(&cost), "{cost} in {page}");
    assert!(page.contains("m/p1 ✓"), "the plain request's chain: {page}");

    let (s, one) = c.get(&format!("/console/ledger/{fell}")).await;
    assert_eq!(s, 200);
    assert!(one.contains(FALLBACK_CHAIN), "{one}");
    assert!(
        one.contains("bucket that paid: <strong>routed</strong>"),
        "{one}"
    );
    assert!(one.contains("up-m2") && one.contains("http_500"), "{one}");
    // Every ledger field is listed.
    for f in [
        "request_id",
        "fallbacks",
        "usage_source",
        "output_tokens_delivered",
        "duration_ms",
    ] {
        assert!(one.contains(&format!("<th>{f}</th>")), "{f} missing");
    }

    // Filters narrow the list: only the fallen-back request paid from `routed`... and
    // only the plain one shows with project/model filters that match both but limit 1.
    let (s, page) = c
        .get("/console/ledger?status=completed&model=m&key_id=&project=proj")
        .await;
    assert_eq!(s, 200);
    assert!(page.contains(&plain) && page.contains(&fell));
    let (_, page) = c.get("/console/ledger?model=emb").await;
    assert!(!page.contains(&plain) && page.contains("No records match."));
}

#[tokio::test]
async fn ledger_pages_follow_the_cursor() {
    let g = start();
    let first = chat(&g).await;
    let second = chat(&g).await;
    record(&g, &second).await;
    let c = Console::login(&g).await;
    let (s, page) = c.get("/console/ledger?limit=1").await;
    assert_eq!(s, 200);
    assert!(page.contains(&second) && !page.contains(&first), "{page}");
    let at = page.find("Next page").expect("a next page link");
    let href = page[..at].rsplit("href=\"").next().unwrap();
    let href = href.split('"').next().unwrap().replace("&amp;", "&");
    assert!(
        href.contains("cursor=") && href.contains("limit=1"),
        "{href}"
    );
    let (s, next) = c.get(&href).await;
    assert_eq!(s, 200);
    assert!(next.contains(&first) && !next.contains(&second), "{next}");
    assert!(!next.contains("Next page"));
}

#[tokio::test]
async fn malformed_filters_show_the_error_next_to_the_field() {
    let g = start();
    let c = Console::login(&g).await;
    for (query, field, words) in [
        ("since=yesterday", "since", "must be an RFC 3339 time"),
        ("until=2025-13-01", "until", "must be an RFC 3339 time"),
        ("status=finished", "status", "unknown status"),
        ("limit=0", "limit", "from 1 to 1000"),
    ] {
        let (s, page) = c.get(&format!("/console/ledger?{query}")).await;
        assert_eq!(s, 200, "{query}: {page}");
        let at = page
            .find(&format!("data-field=\"{field}\""))
            .unwrap_or_else(|| panic!("{query}: no error at {field}: {page}"));
        assert!(page[at..].contains(words), "{query}: {page}");
    }
    // The same for an export link followed with a bad filter.
    let (s, page) = c.get("/console/ledger/export?format=csv&since=soon").await;
    assert_eq!(s, 200);
    assert!(page.contains("data-field=\"since\""), "{page}");
    let (s, page) = c.get("/console/ledger/export?format=xml").await;
    assert_eq!(s, 200);
    assert!(page.contains("unknown format"), "{page}");
}

#[tokio::test]
async fn unknown_request_id_is_a_404_page() {
    let g = start();
    let c = Console::login(&g).await;
    let r = c.get_raw("/console/ledger/req_nope%3Cb%3E").await;
    assert_eq!(r.status(), 404);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let body = r.text().await.unwrap();
    assert!(
        body.contains("Not found") && body.contains("req_nope&lt;b&gt;"),
        "{body}"
    );
}

#[tokio::test]
async fn exports_work_with_the_session() {
    let g = start();
    let id = chat(&g).await;
    record(&g, &id).await;
    let c = Console::login(&g).await;
    let (_, page) = c.get("/console/ledger?project=proj").await;
    assert!(
        page.contains("href=\"/console/ledger/export?project=proj&amp;format=csv\""),
        "{page}"
    );
    let r = c
        .get_raw("/console/ledger/export?project=proj&format=csv")
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let csv = r.text().await.unwrap();
    assert!(csv.starts_with("request_id,started_at,"), "{csv}");
    assert!(csv.contains(&id));
    let r = c.get_raw("/console/ledger/export?format=jsonl").await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["request_id"], id.as_str());
    // Without the session: to the login page, like every console page.
    let r = no_redirects()
        .get(format!("{}/console/ledger/export?format=csv", g.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
}

#[tokio::test]
async fn the_live_tail_returns_newer_records() {
    let g = start();
    let old = chat(&g).await;
    let rec = record(&g, &old).await;
    let c = Console::login(&g).await;
    let (_, page) = c.get("/console/ledger").await;
    assert!(
        page.contains("data-tail=\"/console/ledger/tail?\""),
        "{page}"
    );
    assert!(page.contains("<script src=\"/console/assets/console.js\">"));
    let newest = rec["started_at"].as_str().unwrap();
    let new = chat(&g).await;
    let r = c
        .get_raw(&format!(
            "/console/ledger/tail?after={}",
            newest.replace('+', "%2B")
        ))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let ids: Vec<&str> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&new.as_str()), "{v}");
    assert_eq!(v["rows"][0]["chain"], "m/p1 ✓");
    assert!(v["rows"][0]["cost"].as_str().unwrap().ends_with(" USD"));
    // The script is ours, served from the binary.
    let r = c.get_raw("/console/assets/console.js").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    // A bad `after` is a clear error, not a 500.
    let r = c.get_raw("/console/ledger/tail?after=nope").await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "after");
}

#[tokio::test]
async fn pages_without_a_session_go_to_the_login() {
    let g = start();
    let client = no_redirects();
    for path in [
        "/console",
        "/console/ledger",
        "/console/ledger/req_x",
        "/console/ledger/tail",
        "/console/ledger/export?format=csv",
        "/console/keys",
        "/console/routes",
        "/console/explain",
        "/console/wallets",
        "/console/wallets/key_x",
    ] {
        let r = client
            .get(format!("{}{path}", g.admin_url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303, "{path}");
        assert_eq!(r.headers()["location"], "/console/login", "{path}");
        // A forged or stale cookie is no session either.
        let r = client
            .get(format!("{}{path}", g.admin_url))
            .header("cookie", "tollgate_console=0123")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303, "{path}");
    }
}

#[tokio::test]
async fn the_console_is_not_on_the_client_listener() {
    let g = start();
    let client = no_redirects();
    for path in [
        "/console",
        "/console/ledger",
        "/console/login",
        "/console/assets/console.js",
    ] {
        let r = client
            .get(format!("{}{path}", g.client_url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}

/// A money figure as a page shows it: rounded to the bucket's display scale, with its currency.
fn shown(amount: &Value, currency: &str) -> String {
    format!("{} {currency}", dec(amount).round_dp(6).normalize())
}

/// The text of the element with `id` (no nested markup).
fn text_of(html: &str, id: &str) -> String {
    let at = html
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id}"));
    let rest = &html[at..];
    let start = rest.find('>').unwrap() + 1;
    rest[start..].split('<').next().unwrap().to_string()
}

#[tokio::test]
async fn keys_are_created_escaped_limited_and_revoked_through_forms() {
    let g = start();
    let demo = g.demo_key_id().await;
    let c = Console::login(&g).await;
    let (s, page) = c.get("/console/keys").await;
    assert_eq!(s, 200);
    assert!(
        page.contains("<td>demo</td>") && page.contains(&demo),
        "{page}"
    );

    // Create: the secret shows once, on the result page.
    let (s, made) = c
        .post(
            "/console/keys",
            &[
                ("name", "<script>alert(1)</script>"),
                ("project", "<b>proj</b>"),
                ("buckets", "credit"),
                ("rpm", "50"),
            ],
        )
        .await;
    assert_eq!(s, 200, "{made}");
    let secret = text_of(&made, "secret");
    assert!(secret.starts_with("tg-"), "{made}");
    assert!(!made.contains("<script>alert"), "{made}");
    let (_, v) = g.admin_get("/admin/keys").await;
    let new = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "<script>alert(1)</script>")
        .unwrap()
        .clone();
    assert_eq!(new["project"], "<b>proj</b>");
    assert_eq!(new["buckets"], json!(["credit"]));
    assert_eq!(new["rpm"], 50);
    let new_id = new["id"].as_str().unwrap();
    let (_, page) = c.get("/console/keys").await;
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(page.contains("&lt;b&gt;proj&lt;/b&gt;"), "{page}");
    assert!(
        !page.contains("<script>alert") && !page.contains("<b>proj"),
        "{page}"
    );
    assert!(!page.contains(&secret), "the secret shows only once");

    // Its requests show its names escaped in the ledger too.
    let (s, _) = c
        .post(
            &format!("/console/keys/{new_id}/topup"),
            &[("bucket", "credit"), ("amount", "1")],
        )
        .await;
    assert_eq!(s, 200);
    let id = chat_as(&g, &secret).await;
    record(&g, &id).await;
    let (_, ledger) = c.get("/console/ledger").await;
    assert!(ledger.contains(&id) && ledger.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(
        !ledger.contains("<script>alert") && !ledger.contains("<b>proj"),
        "{ledger}"
    );

    // A bad field: the page again, the error next to it; nothing created.
    let (s, page) = c
        .post("/console/keys", &[("name", "x"), ("tpm", "lots")])
        .await;
    assert_eq!(s, 400);
    assert!(page.contains("data-field=\"tpm\""), "{page}");
    let (s, page) = c
        .post("/console/keys", &[("name", "x"), ("models", "nope")])
        .await;
    assert_eq!(s, 400);
    assert!(
        page.contains("data-field=\"models\"") && page.contains("unknown model"),
        "{page}"
    );
    let (_, v) = g.admin_get("/admin/keys").await;
    assert_eq!(v["keys"].as_array().unwrap().len(), 2);

    // Limits: rpm 1 on the demo key holds from its next request.
    let (s, page) = c
        .post(
            &format!("/console/keys/{demo}/limits"),
            &[("rpm", "1"), ("tpm", ""), ("max_concurrent_streams", "")],
        )
        .await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains("rpm 1"), "{page}");
    let (_, k) = g.admin_get(&format!("/admin/keys/{demo}")).await;
    assert_eq!(k["rpm"], 1);
    chat(&g).await;
    let r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let (s, page) = c
        .post(&format!("/console/keys/{demo}/limits"), &[("rpm", "-3")])
        .await;
    assert_eq!(s, 400);
    assert!(page.contains("data-field=\"rpm\""), "{page}");

    // Revoke.
    let (s, page) = c.post(&format!("/console/keys/{new_id}/revoke"), &[]).await;
    assert_eq!(s, 200);
    assert!(page.contains("is revoked"), "{page}");
    let (_, k) = g.admin_get(&format!("/admin/keys/{new_id}")).await;
    assert!(k["revoked_at"].is_string(), "{k}");
    let (s, _) = c.post("/console/keys/key_nope/revoke", &[]).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn a_topup_through_the_form_applies_a_reference_once() {
    let g = start();
    let demo = g.demo_key_id().await;
    let c = Console::login(&g).await;
    let path = format!("/console/keys/{demo}/topup");
    let form = [
        ("bucket", "credit"),
        ("amount", "5.25"),
        ("reference", "inv-<7>"),
    ];
    let (s, page) = c.post(&path, &form).await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains("Topped up 5.25 USD"), "{page}");
    assert_eq!(text_of(&page, "balance-credit"), "15.25 USD");
    let (s, page) = c.post(&path, &form).await;
    assert_eq!(s, 200);
    assert!(
        page.contains("was applied before: this top-up changed nothing"),
        "{page}"
    );
    assert_eq!(text_of(&page, "balance-credit"), "15.25 USD");
    let w = g.admin_get(&format!("/admin/keys/{demo}/wallet")).await.1;
    assert_eq!(w["buckets"]["credit"]["balance"], "15.25");
    // The wallet page lists it with its reference, escaped.
    let (_, page) = c.get(&format!("/console/wallets/{demo}")).await;
    assert!(page.contains("inv-&lt;7&gt;"), "{page}");
    // A bad amount: the keys page with the error at the field.
    let (s, page) = c
        .post(&path, &[("bucket", "credit"), ("amount", "-1")])
        .await;
    assert_eq!(s, 400);
    assert!(page.contains("data-field=\"amount\""), "{page}");
    // The same reference for another amount is a conflict, shown, not applied.
    let (s, page) = c
        .post(
            &path,
            &[
                ("bucket", "credit"),
                ("amount", "9"),
                ("reference", "inv-<7>"),
            ],
        )
        .await;
    assert_eq!(s, 400, "{page}");
    assert!(page.contains("already used"), "{page}");
}

#[tokio::test]
async fn posts_without_the_csrf_token_are_refused() {
    let g = start();
    let demo = g.demo_key_id().await;
    let c = Console::login(&g).await;
    for path in [
        "/console/keys".to_string(),
        format!("/console/keys/{demo}/revoke"),
        format!("/console/keys/{demo}/limits"),
        format!("/console/keys/{demo}/topup"),
    ] {
        let fields = [
            ("name", "x"),
            ("bucket", "credit"),
            ("amount", "1"),
            ("rpm", "1"),
        ];
        let (s, _) = c.post_as_is(&path, &fields).await;
        assert_eq!(s, 403, "{path}");
        let mut wrong = vec![("_csrf", "0000")];
        wrong.extend_from_slice(&fields);
        let (s, _) = c.post_as_is(&path, &wrong).await;
        assert_eq!(s, 403, "{path}");
    }
    let (_, k) = g.admin_get(&format!("/admin/keys/{demo}")).await;
    assert!(k["revoked_at"].is_null() && k["rpm"].is_null(), "{k}");
    let w = g.admin_get(&format!("/admin/keys/{demo}/wallet")).await.1;
    assert_eq!(w["buckets"]["credit"]["balance"], "10");
    let (_, v) = g.admin_get("/admin/keys").await;
    assert_eq!(v["keys"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn wallets_show_each_bucket_in_its_currency_with_spend() {
    let g = start();
    let demo = g.demo_key_id().await;
    chat(&g).await;
    let fell = fallen_back(&g).await;
    let rec = record(&g, &fell).await;
    let w = g.admin_get(&format!("/admin/keys/{demo}/wallet")).await.1;
    let c = Console::login(&g).await;
    let (s, page) = c.get("/console/wallets").await;
    assert_eq!(s, 200);
    for (bucket, cur) in [("credit", "USD"), ("routed", "CNY")] {
        let b = &w["buckets"][bucket];
        assert!(
            page.contains(&shown(&b["balance"], cur)),
            "{bucket}: {page}"
        );
        assert!(
            page.contains(&shown(&b["available"], cur)),
            "{bucket}: {page}"
        );
    }
    let (s, page) = c.get(&format!("/console/wallets/{demo}")).await;
    assert_eq!(s, 200);
    assert_eq!(
        text_of(&page, "balance-routed"),
        shown(&w["buckets"]["routed"]["balance"], "CNY")
    );
    // The routed bucket spent exactly the fallen-back request today, and burns at that rate.
    assert!(
        page.contains(&format!("{} / day", shown(&rec["cost"], "CNY"))),
        "{page}"
    );
    let today = chrono_today();
    let at = page
        .find(&format!("<td>{today}</td>"))
        .expect("today's row");
    assert!(page[at..]
        .split("</tr>")
        .next()
        .unwrap()
        .contains(&shown(&rec["cost"], "CNY")));
    let (s, _) = c.get("/console/wallets/key_nope").await;
    assert_eq!(s, 404);
}

/// Today's date (UTC), as the pages write it.
fn chrono_today() -> String {
    chrono::Utc::now().date_naive().to_string()
}

#[tokio::test]
async fn admin_patch_changes_a_keys_limits() {
    let g = start();
    let demo = g.demo_key_id().await;
    let patch = |body: Value, token: &'static str, id: String| {
        let url = format!("{}/admin/keys/{id}", g.admin_url);
        let client = g.client();
        async move {
            let r = client
                .patch(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (s, v) = patch(json!({"rpm": 2, "tpm": 1000}), ADMIN_TOKEN, demo.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["rpm"].clone(), v["tpm"].clone()),
        (json!(2), json!(1000))
    );
    assert!(v.get("secret").is_none() && v.get("secret_sha256").is_none());
    // Absent fields keep their value; null removes a limit.
    let (s, v) = patch(
        json!({"tpm": null, "max_concurrent_streams": 3}),
        ADMIN_TOKEN,
        demo.clone(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["rpm"], 2);
    assert!(v["tpm"].is_null());
    assert_eq!(v["max_concurrent_streams"], 3);
    let (_, k) = g.admin_get(&format!("/admin/keys/{demo}")).await;
    assert_eq!(k, v);
    for (body, param) in [
        (json!({"rpm": 0}), "rpm"),
        (json!({"rpm": "5"}), "rpm"),
        (json!({"tpm": -1}), "tpm"),
        (
            json!({"max_concurrent_streams": 5_000_000_000u64}),
            "max_concurrent_streams",
        ),
        (json!({"name": "x"}), "name"),
    ] {
        let (s, v) = patch(body.clone(), ADMIN_TOKEN, demo.clone()).await;
        assert_eq!(s, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    let (s, v) = patch(json!([1]), ADMIN_TOKEN, demo.clone()).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = patch(json!({"rpm": 1}), ADMIN_TOKEN, "key_nope".into()).await;
    assert_eq!(s, 404, "{v}");
    let (s, _) = patch(json!({"rpm": 1}), "wrong", demo.clone()).await;
    assert_eq!(s, 401);
    let (_, k) = g.admin_get(&format!("/admin/keys/{demo}")).await;
    assert_eq!(k["rpm"], 2);
}

/// The text of each cell of the table row marked `data-<attr>="<value>"`, tags removed.
fn row_cells(html: &str, marker: &str) -> Vec<String> {
    let at = html
        .find(marker)
        .unwrap_or_else(|| panic!("no row {marker}"));
    let row = html[at..].split("</tr>").next().unwrap();
    row.split("<td")
        .skip(1)
        .map(|cell| {
            let cell = &cell[cell.find('>').unwrap() + 1..];
            let cell = cell.split("</td>").next().unwrap();
            let mut text = String::new();
            let mut in_tag = false;
            for ch in cell.chars() {
                match ch {
                    '<' => in_tag = true,
                    '>' => in_tag = false,
                    c if !in_tag => text.push(c),
                    _ => {}
                }
            }
            text
        })
        .collect()
}

#[tokio::test]
async fn routes_show_state_prices_and_the_last_hours_attempts() {
    let g = start();
    chat(&g).await;
    let fell = fallen_back(&g).await;
    record(&g, &fell).await;
    let (_, admin) = g.admin_get("/admin/routes").await;
    let c = Console::login(&g).await;
    let (s, page) = c.get("/console/routes").await;
    assert_eq!(s, 200);
    let p1 = row_cells(&page, "data-route=\"m/p1\"");
    let a1 = admin["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "m/p1")
        .unwrap();
    assert_eq!(p1[3], "1 USD / 1M2 USD / 1M", "{p1:?}");
    assert_eq!(p1[4], a1["state"].as_str().unwrap());
    assert_eq!(p1[5], a1["consecutive_failures"].to_string());
    assert_eq!(p1[6], a1["requests"].to_string());
    assert_eq!(p1[7], a1["failures"].to_string());
    assert!(
        p1[11].contains(a1["last_failure"]["reason"].as_str().unwrap()),
        "{p1:?}"
    );
    // Last hour: one plain request (1 ok attempt) and one with two failed attempts, a retry
    // and a fallback to p2.
    assert_eq!(p1[12..], ["3", "2", "1", "1"], "{p1:?}");
    let p2 = row_cells(&page, "data-route=\"m/p2\"");
    assert_eq!(p2[3], "3 CNY / 1M4 CNY / 1M", "{p2:?}");
    assert_eq!(p2[12..], ["1", "0", "0", "0"], "{p2:?}");
}

#[tokio::test]
async fn the_overview_counts_the_last_hour_and_day() {
    let g = start();
    chat(&g).await;
    fallen_back(&g).await;
    // Both routes failing: an upstream error, which is a cut-off.
    g.mock_options("p1", json!({"fault": "500"})).await;
    g.mock_options("p2", json!({"fault": "500"})).await;
    let r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let records = g.all_records("").await;
    assert_eq!(records.len(), 3);
    let mut spend: std::collections::BTreeMap<String, rust_decimal::Decimal> = Default::default();
    for r in &records {
        if let Some(cur) = r["currency"].as_str() {
            if r["bucket"].is_string() {
                *spend.entry(cur.to_string()).or_default() += dec(&r["cost"]);
            }
        }
    }
    let fell = records
        .iter()
        .filter(|r| r["fallbacks"].as_u64().unwrap() > 0)
        .count();
    let retried = records
        .iter()
        .filter(|r| r["retries"].as_u64().unwrap() > 0)
        .count();
    let c = Console::login(&g).await;
    let (s, page) = c.get("/console").await;
    assert_eq!(s, 200);
    for w in ["hour", "day"] {
        assert_eq!(text_of(&page, &format!("{w}-requests")), "3");
        for (cur, cost) in &spend {
            assert_eq!(
                text_of(&page, &format!("{w}-spend-{cur}")),
                format!("{} {cur}", cost.round_dp(6).normalize())
            );
        }
        let pct = |n: usize| format!("{:.1}%", n as f64 * 100.0 / 3.0);
        assert_eq!(text_of(&page, &format!("{w}-fallback-rate")), pct(fell));
        assert_eq!(text_of(&page, &format!("{w}-retry-rate")), pct(retried));
        assert_eq!(text_of(&page, &format!("{w}-cutoff-upstream_error")), "1");
        assert_eq!(
            text_of(&page, &format!("{w}-cutoff-balance_exhausted")),
            "0"
        );
    }
    assert!(
        spend.contains_key("USD") && spend.contains_key("CNY"),
        "{spend:?}"
    );
    // The charts: 12 five-minute bars and 24 hourly bars, the newest holding the requests.
    for (id, bars) in [("hour-chart", 12), ("day-chart", 24)] {
        let at = page.find(&format!("<svg id=\"{id}\"")).unwrap();
        let svg = page[at..].split("</svg>").next().unwrap();
        let counts: Vec<u64> = svg
            .split("data-count=\"")
            .skip(1)
            .map(|c| c.split('"').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(counts.len(), bars, "{svg}");
        assert_eq!(counts.iter().sum::<u64>(), 3);
        assert_eq!(*counts.last().unwrap(), 3, "{counts:?}");
    }
    let (_, admin) = g.admin_get("/admin/routes").await;
    let closed = admin["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "closed")
        .count();
    assert_eq!(text_of(&page, "breakers-closed"), closed.to_string());
}

#[tokio::test]
async fn the_explainer_shows_the_admin_decomposition_and_links_to_the_ledger() {
    let g = start();
    let plain = chat(&g).await;
    let fell = fallen_back(&g).await;
    record(&g, &fell).await;
    let now = chrono::Utc::now();
    let t = |d: chrono::Duration| (now + d).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let h = chrono::Duration::hours;
    let (bs, bu, cs, cu) = (t(h(-3)), t(h(-2)), t(h(-1)), t(h(1)));
    let query = format!(
        "base_since={}&base_until={}&since={}&until={}&project=proj",
        bs.replace('+', "%2B"),
        bu.replace('+', "%2B"),
        cs.replace('+', "%2B"),
        cu.replace('+', "%2B")
    );
    let (st, admin) = g.admin_get(&format!("/admin/usage/explain?{query}")).await;
    assert_eq!(st, 200, "{admin}");
    let c = Console::login(&g).await;
    let (st, page) = c.get(&format!("/console/explain?{query}")).await;
    assert_eq!(st, 200);
    let currencies = admin["currencies"].as_array().unwrap();
    assert_eq!(currencies.len(), 2, "{admin}");
    for cur in currencies {
        let name = cur["currency"].as_str().unwrap();
        assert_eq!(
            text_of(&page, &format!("change-{name}")),
            format!("{} {name}", dec(&cur["change"]).round_dp(6).normalize())
        );
        let at = page.find(&format!("<svg id=\"chart-{name}\"")).unwrap();
        let svg = page[at..].split("</svg>").next().unwrap();
        for d in cur["drivers"].as_array().unwrap() {
            let mark = format!(
                "data-driver=\"{}\" data-contribution=\"{}\"",
                d["driver"].as_str().unwrap(),
                d["contribution"].as_str().unwrap()
            );
            assert!(svg.contains(&mark), "{mark} in {svg}");
        }
        let table_at = page
            .find(&format!("<table data-currency=\"{name}\""))
            .unwrap();
        let table = page[table_at..].split("</table>").next().unwrap();
        assert_eq!(table.matches("<tr data-driver=").count(), 7);
    }
    // Each driver links to the ledger filtered to the current period, which lists the requests.
    let mark = "id=\"current-ledger\" href=\"";
    let at = page.find(mark).unwrap() + mark.len();
    let href = page[at..].split('"').next().unwrap().replace("&amp;", "&");
    assert!(
        href.starts_with("/console/ledger?since=") && href.contains("project=proj"),
        "{href}"
    );
    assert!(page.contains(&format!(
        "<a href=\"{}\">requests</a>",
        href.replace('&', "&amp;")
    )));
    let (st, ledger) = c.get(&href).await;
    assert_eq!(st, 200);
    assert!(
        ledger.contains(&plain) && ledger.contains(&fell),
        "{ledger}"
    );

    // Without periods: the last 7 days against the 7 before.
    let (st, page) = c.get("/console/explain").await;
    assert_eq!(st, 200);
    assert!(
        page.contains("<h2>USD</h2>") && page.contains("<h2>CNY</h2>"),
        "{page}"
    );

    // Malformed dates: the form with the error next to the field.
    for (q, field) in [
        ("base_since=2026-01-01T00:00:00Z&base_until=2026-01-02T00:00:00Z&since=yesterday&until=2026-01-03T00:00:00Z", "since"),
        ("base_since=2026-01-02T00:00:00Z&base_until=2026-01-01T00:00:00Z&since=2026-01-02T00:00:00Z&until=2026-01-03T00:00:00Z", "base_since"),
        ("since=2026-01-02T00:00:00Z", "base_since"),
    ] {
        let (st, page) = c.get(&format!("/console/explain?{q}")).await;
        assert_eq!(st, 200, "{q}");
        assert!(page.contains(&format!("data-field=\"{field}\"")), "{q}: {page}");
        assert!(!page.contains("<h2>USD</h2>"), "{q}");
    }
}
