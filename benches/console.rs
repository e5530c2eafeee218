//! Console page timings over a large ledger: how long each operator console page and the
//! marketplace take to answer with `TOLLGATE_BENCH_RECORDS` records in the store (default
//! 1,000,000, spread over the last 90 days — the default retention — across 10 keys, 2 models,
//! 200 workflow runs). The store is written once through the ledger writer, then the gateway's
//! state is built on it (`app::build`) and each page is requested in-process through actix's test
//! service, logged in like a browser: median and slowest of `ROUNDS` requests per page.
//!
//! Every page of the operator console (the ledger with each kind of filter, the live tail, both
//! wallets pages, the explainer with and without a key or project, the in-flight rows, a task,
//! and the admin usage answer the task page shares) and the marketplace with a key's session. Not timed: the ledger's CSV/JSONL export, a
//! download that streams the whole selection.
//!
//! Run: `cargo bench --bench console` (about a minute to write a million records).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use actix_web::{test, web, App};
use chrono::Utc;
use rust_decimal::Decimal;
use tollgate::ledger::{Attempt, LedgerRecord, Status, StoreOp, UpstreamUsage, UsageSource};

const KEYS: u64 = 10;
const TASKS: u64 = 200;
const ROUNDS: usize = 15;

fn records_wanted() -> u64 {
    std::env::var("TOLLGATE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn record(i: u64, n: u64, key_ids: &[String]) -> LedgerRecord {
    let span = chrono::Duration::days(90).num_milliseconds() as u64;
    let back = span - span / n.max(1) * i;
    let t = Utc::now() - chrono::Duration::milliseconds(back as i64);
    let key = &key_ids[(i % KEYS) as usize % key_ids.len()];
    let fell_back = i % 20 == 0;
    let route = if fell_back { "m/p2" } else { "m/p1" };
    let mut attempts = Vec::new();
    if fell_back {
        attempts.push(Attempt {
            route: "m/p1".into(),
            upstream_model: "up-m1".into(),
            bucket: "credit".into(),
            retry: 0,
            outcome: "http_500".into(),
            http_status: Some(500),
            error: Some("upstream answered 500".into()),
            started_at: t,
            latency_ms: 12,
        });
    }
    attempts.push(Attempt {
        route: route.into(),
        upstream_model: "up-m1".into(),
        bucket: "credit".into(),
        retry: 0,
        outcome: "ok".into(),
        http_status: Some(200),
        error: None,
        started_at: t,
        latency_ms: 50,
    });
    LedgerRecord {
        request_id: tollgate::ledger::new_request_id(t),
        started_at: t,
        finished_at: t + chrono::Duration::milliseconds(400),
        workspace: "ws".into(),
        key_id: key.clone(),
        key_name: "bench".into(),
        project: format!("project-{}", i % 7),
        end_user: None,
        task: Some(format!("run-{}", i % TASKS)),
        endpoint: "chat.completions".into(),
        requested_model: "m".into(),
        stream: i % 2 == 0,
        route: Some(route.into()),
        provider: Some(if fell_back { "p2" } else { "p1" }.into()),
        upstream_model: Some("up-m1".into()),
        route_kind: Some("official".into()),
        bucket: Some("credit".into()),
        currency: Some("USD".into()),
        attempts,
        fallbacks: u32::from(fell_back),
        retries: 0,
        status: if i % 50 == 0 {
            Status::BalanceExhausted
        } else {
            Status::Completed
        },
        http_status: 200,
        input_tokens: 120,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        output_tokens: 64,
        output_tokens_delivered: 64,
        usage_source: UsageSource::Upstream,
        upstream_usage: Some(UpstreamUsage {
            prompt_tokens: 120,
            completion_tokens: 64,
        }),
        input_per_mtok: Some(Decimal::ONE),
        output_per_mtok: Some(Decimal::TWO),
        cost: Decimal::new(248, 6),
        shortfall: Decimal::ZERO,
        ttft_ms: Some(50),
        duration_ms: 400,
        instance_id: None,
    }
}

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
admin_token = "bench-admin"
data_dir = "@DIR@"

[buckets.credit]
currency = "USD"

[[providers]]
id = "p1"
kind = "mock"
listen = "127.0.0.1:0"

[[providers]]
id = "p2"
kind = "mock"
listen = "127.0.0.1:0"

[[models]]
name = "m"
tokenizer = "chunks"
routes = [
  { provider = "p1", upstream_model = "up-m1", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
  { provider = "p2", upstream_model = "up-m1", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
]
"#;

fn main() {
    let n = records_wanted();
    let dir = tempfile::tempdir().expect("temp dir");
    let text = CONFIG.replace("@DIR@", &dir.path().display().to_string());
    let mut keys_toml = String::new();
    for k in 0..KEYS {
        keys_toml.push_str(&format!(
            "\n[[keys]]\nname = \"bench-{k}\"\nsecret = \"tg-bench-secret-{k:04}\"\ntopup = {{ credit = \"1000\" }}\n"
        ));
    }
    let config = tollgate::config::parse_str(&(text + &keys_toml)).expect("bench config");
    let sys = actix_web::rt::System::new();
    sys.block_on(async move {
        let running = tollgate::app::build(config).await.expect("gateway state");
        let state = running.state.clone();
        let mut key_ids: Vec<String> = state
            .store
            .keys()
            .expect("keys")
            .into_iter()
            .map(|k| k.id)
            .collect();
        key_ids.sort();
        let t0 = Instant::now();
        for i in 0..n {
            state
                .writer
                .send(StoreOp::Record(Box::new(record(i, n, &key_ids))))
                .expect("queued");
        }
        state.writer.flush().await.expect("flushed");
        println!("wrote {n} records in {:.1} s", t0.elapsed().as_secs_f64());
        // A stored request id (ids carry a random part: take one from the ledger).
        let one_id = state
            .store
            .scan_records(None, None, None, None)
            .nth(usize::try_from(n / 2).unwrap_or(0))
            .and_then(Result::ok)
            .map(|(_, r)| r.request_id)
            .unwrap_or_default();
        let app = test::init_service(
            App::new()
                .app_data(web::Data::from(state.clone()))
                .configure(tollgate::console::admin_routes)
                .configure(tollgate::api::admin::routes)
                .configure(tollgate::console::client_routes),
        )
        .await;
        // Log in as a browser would.
        let form = test::call_service(
            &app,
            test::TestRequest::get().uri("/console/login").to_request(),
        )
        .await;
        let login_cookie = form
            .response()
            .cookies()
            .find(|c| c.name() == "tollgate_console_login")
            .expect("login cookie")
            .into_owned();
        let page = String::from_utf8_lossy(&test::read_body(form).await).into_owned();
        let at = page.find("name=\"_csrf\" value=\"").expect("csrf") + 20;
        let csrf = page[at..].split('"').next().unwrap_or_default().to_string();
        let resp = test::call_service(
            &app,
            test::TestRequest::post()
                .uri("/console/login")
                .cookie(login_cookie)
                .set_form([("_csrf", csrf.as_str()), ("token", "bench-admin")])
                .to_request(),
        )
        .await;
        let session = resp
            .response()
            .cookies()
            .find(|c| c.name() == "tollgate_console")
            .expect("session cookie")
            .into_owned();
        // The marketplace (on the client listener in the gateway), with a key's session as a key
        // holder opens it.
        let resp = test::call_service(
            &app,
            test::TestRequest::post()
                .uri("/key")
                .set_form([("key", "tg-bench-secret-0000")])
                .to_request(),
        )
        .await;
        let key_session = resp
            .response()
            .cookies()
            .next()
            .expect("key session cookie")
            .into_owned();
        let key = &key_ids[0];
        let now = Utc::now();
        let day = |d: i64| {
            (now - chrono::Duration::days(d)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        };
        let explain = format!(
            "/console/explain?base_since={}&base_until={}&since={}&until={}",
            day(14),
            day(7),
            day(7),
            day(0)
        );
        let pages = [
            "/console".to_string(),
            "/console/ledger".to_string(),
            format!("/console/ledger?key_id={key}&status=completed"),
            "/console/ledger?project=project-3&model=m".to_string(),
            "/console/ledger?task=run-7".to_string(),
            format!("/console/ledger/tail?after={}", day(0)),
            format!("/console/ledger/{one_id}"),
            "/console/wallets".to_string(),
            format!("/console/wallets/{key}"),
            "/console/explain".to_string(),
            explain.clone(),
            format!("{explain}&key_id={key}"),
            format!("{explain}&project=project-3"),
            "/console/routes".to_string(),
            "/console/keys".to_string(),
            "/console/inflight".to_string(),
            "/console/inflight.json".to_string(),
            "/console/tasks/run-7".to_string(),
            "/admin/usage?task=run-7&group_by=model,route,bucket".to_string(),
        ];
        let pages = pages
            .iter()
            .map(|p| (p.as_str(), &session))
            .chain(["/", "/market/state"].map(|p| (p, &key_session)));
        println!("{n} records; {ROUNDS} requests per page: median / slowest");
        for (p, cookie) in pages {
            let mut times = Vec::new();
            let mut status = 0;
            for _ in 0..ROUNDS {
                let t = Instant::now();
                let mut req = test::TestRequest::get().uri(p).cookie(cookie.clone());
                if p.starts_with("/admin/") {
                    req = req.insert_header(("authorization", "Bearer bench-admin"));
                }
                let resp = test::call_service(&app, req.to_request()).await;
                status = resp.status().as_u16();
                let _ = test::read_body(resp).await;
                times.push(t.elapsed());
            }
            times.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            println!(
                "{:>7.1} ms  {:>7.1} ms  {status}  {p}",
                ms(times[times.len() / 2]),
                ms(times[times.len() - 1])
            );
        }
        state.wallets.stop_all();
    });
}
