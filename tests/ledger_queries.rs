//! Ledger queries end to end: filters and stable paging over a few thousand records, both export
//! formats against the paged API, usage totals against the records, and the spend-change
//! explainer on two constructed traffic bursts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// One request as the load generator sends it.
#[derive(Clone)]
struct Req {
    secret: String,
    model: &'static str,
    project: Option<&'static str>,
    task: Option<&'static str>,
    stream: bool,
}

impl Req {
    fn new(secret: &str, model: &'static str) -> Req {
        Req {
            secret: secret.to_string(),
            model,
            project: None,
            task: None,
            stream: false,
        }
    }
}

/// Sends every request with 32 in flight; returns the status codes.
async fn send_all(g: &Gateway, reqs: Vec<Req>) -> Vec<u16> {
    let client = g.client();
    let url = g.chat_url();
    futures_util::stream::iter(reqs)
        .map(|r| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let mut b = client.post(url).bearer_auth(&r.secret).json(&json!({
                    "model": r.model, "stream": r.stream,
                    "messages": [{"role": "user", "content": "12345678"}]}));
                if let Some(p) = r.project {
                    b = b.header("X-Tollgate-Project", p);
                }
                if let Some(t) = r.task {
                    b = b.header("X-Tollgate-Task", t);
                }
                let resp = b.send().await.unwrap();
                let s = resp.status().as_u16();
                let _ = resp.bytes().await;
                s
            }
        })
        .buffer_unordered(32)
        .collect()
        .await
}

/// Now, at the ledger's resolution (microseconds), so it survives RFC 3339 round trips.
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A boundary between two bursts: strictly after every record of the first.
async fn boundary() -> DateTime<Utc> {
    tokio::time::sleep(Duration::from_millis(30)).await;
    let t = now();
    tokio::time::sleep(Duration::from_millis(30)).await;
    t
}

/// Waits until the ledger holds `n` records (the writer commits asynchronously).
async fn wait_for_records(g: &Gateway, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let all = g.all_records("").await;
        if all.len() >= n {
            assert_eq!(all.len(), n, "more records than requests");
            return all;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the ledger never reached {n} records");
}

fn started(r: &Value) -> DateTime<Utc> {
    r["started_at"].as_str().unwrap().parse().unwrap()
}

fn ids(records: &[Value]) -> Vec<&str> {
    records
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect()
}

async fn admin_text(g: &Gateway, path: &str) -> (u16, String, String) {
    let r = g
        .client()
        .get(format!("{}{}", g.admin_url, path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ctype, r.text().await.unwrap())
}

/// RFC 4180 rows (quoted fields may hold commas, quotes and line breaks).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(
        field.is_empty() && row.is_empty(),
        "CSV must end with a line break"
    );
    rows
}

/// The CSV cell a record's field should become.
fn csv_cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn assert_csv_matches(text: &str, records: &[Value]) {
    let rows = parse_csv(text);
    let header: Vec<&str> = rows[0].iter().map(String::as_str).collect();
    assert_eq!(header, tollgate::ledger::record::FIELDS);
    assert_eq!(rows.len() - 1, records.len());
    for (row, rec) in rows[1..].iter().zip(records) {
        assert_eq!(row.len(), header.len());
        for (name, cell) in header.iter().zip(row) {
            let want = &rec[*name];
            if matches!(*name, "attempts" | "upstream_usage") && !cell.is_empty() {
                let got: Value = serde_json::from_str(cell).unwrap();
                assert_eq!(&got, want, "{name} of {}", rec["request_id"]);
            } else {
                assert_eq!(cell, &csv_cell(want), "{name} of {}", rec["request_id"]);
            }
        }
    }
}

/// Usage groups computed from the records themselves, keyed by (group, currency).
fn expected_usage(records: &[Value], dims: &[&str]) -> BTreeMap<String, Value> {
    let mut acc: BTreeMap<String, (Value, Value, [u64; 6], Decimal)> = BTreeMap::new();
    for r in records {
        let mut group = serde_json::Map::new();
        for d in dims {
            let field = if *d == "model" { "requested_model" } else { d };
            group.insert(d.to_string(), r[field].clone());
        }
        let currency = if r["bucket"].is_null() {
            Value::Null
        } else {
            r["currency"].clone()
        };
        let key = format!("{}|{}", Value::Object(group.clone()), currency);
        let e = acc
            .entry(key)
            .or_insert((Value::Object(group), currency, [0; 6], Decimal::ZERO));
        e.2[0] += 1;
        e.2[1] += r["input_tokens"].as_u64().unwrap();
        e.2[2] += r["output_tokens"].as_u64().unwrap();
        e.2[3] += r["fallbacks"].as_u64().unwrap();
        e.2[4] += r["retries"].as_u64().unwrap();
        e.2[5] += u64::from(r["status"] == "balance_exhausted");
        e.3 += dec(&r["cost"]);
    }
    acc.into_iter()
        .map(|(k, (group, currency, n, cost))| {
            (
                k,
                json!({"group": group, "currency": currency, "requests": n[0],
                    "input_tokens": n[1], "output_tokens": n[2], "cost": cost.normalize().to_string(),
                    "fallbacks": n[3], "retries": n[4], "balance_exhausted": n[5]}),
            )
        })
        .collect()
}

fn usage_by_key(v: &Value) -> BTreeMap<String, Value> {
    v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (format!("{}|{}", g["group"], g["currency"]), g.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filters_paging_export_and_usage_over_thousands_of_records() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "100", "100"),
        data_dir: None,
    });
    let (s, second) = g
        .admin_post(
            "/admin/keys",
            json!({"name": "second", "project": "p-second"}),
        )
        .await;
    assert_eq!(s, 201, "{second}");
    let (s, _) = g
        .admin_post(
            &format!("/admin/keys/{}/topup", second["id"].as_str().unwrap()),
            json!({"bucket": "credit", "amount": "100"}),
        )
        .await;
    assert_eq!(s, 200);
    let (second_id, second_secret) = (
        second["id"].as_str().unwrap().to_string(),
        second["secret"].as_str().unwrap().to_string(),
    );
    let demo_id = g.demo_key_id().await;

    // Phase 1: the demo key. Unknown models are the cheapest records (404, `rejected`).
    let mut phase1 = Vec::new();
    for i in 0..2000 {
        let mut r = Req::new(DEMO_KEY, if i % 2 == 0 { "nope-a" } else { "nope-b" });
        if i % 4 == 0 {
            r.project = Some("proj-x");
        }
        phase1.push(r);
    }
    for i in 0..300 {
        let mut r = Req::new(DEMO_KEY, "m");
        r.stream = i % 5 == 0;
        if i % 3 == 0 {
            r.project = Some("proj-x");
        }
        phase1.push(r);
    }
    let codes = send_all(&g, phase1).await;
    assert_eq!(codes.iter().filter(|c| **c == 404).count(), 2000);
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 300);
    let mid = boundary().await;

    // Phase 2: the second key.
    let mut phase2: Vec<Req> = (0..500)
        .map(|_| Req::new(&second_secret, "nope-b"))
        .collect();
    phase2.extend((0..100).map(|_| Req::new(&second_secret, "m")));
    let codes = send_all(&g, phase2).await;
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 100);

    let all = wait_for_records(&g, 2900).await;

    // Newest first (at the ledger's microsecond resolution), no duplicates.
    let micros = |r: &Value| started(r).timestamp_micros();
    assert!(all.windows(2).all(|w| micros(&w[0]) >= micros(&w[1])));
    assert_eq!(
        ids(&all).into_iter().collect::<HashSet<_>>().len(),
        all.len()
    );

    // Stable paging with an odd page size: the pages concatenate to the whole ledger.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut q = "/admin/ledger?limit=97".to_string();
        if let Some(c) = &cursor {
            q.push_str(&format!("&cursor={c}"));
        }
        let (s, v) = g.admin_get(&q).await;
        assert_eq!(s, 200, "{v}");
        let page = v["records"].as_array().unwrap();
        assert!(page.len() <= 97);
        paged.extend(page.iter().cloned());
        pages += 1;
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 2900usize.div_ceil(97));
    assert_eq!(ids(&paged), ids(&all));

    // Filters, each against the same selection made over every record.
    let select = |keep: &dyn Fn(&Value) -> bool| -> Vec<Value> {
        all.iter().filter(|r| keep(r)).cloned().collect()
    };
    let mid_s = rfc3339(mid);
    let cases: Vec<(String, Vec<Value>)> = vec![
        (
            format!("&key_id={second_id}"),
            select(&|r| r["key_id"] == second_id.as_str()),
        ),
        (
            "&project=proj-x".into(),
            select(&|r| r["project"] == "proj-x"),
        ),
        ("&model=m".into(), select(&|r| r["requested_model"] == "m")),
        (
            "&status=rejected".into(),
            select(&|r| r["status"] == "rejected"),
        ),
        (format!("&since={mid_s}"), select(&|r| started(r) >= mid)),
        (
            format!("&until={mid_s}&model=nope-b&key_id={demo_id}"),
            select(&|r| started(r) < mid && r["requested_model"] == "nope-b"),
        ),
    ];
    let counts: Vec<usize> = cases.iter().map(|(_, w)| w.len()).collect();
    assert_eq!(counts, vec![600, 500 + 100, 400, 2500, 600, 1000]);
    for (q, want) in &cases {
        let got = g.all_records(q).await;
        assert_eq!(ids(&got), ids(want), "filter {q}");
    }
    let (s, v) = g.admin_get("/admin/ledger?status=sideways").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_value"))
    );

    // Export: JSON Lines and CSV give the paged API's records, filters included.
    let (s, ctype, text) = admin_text(&g, "/admin/ledger/export?format=jsonl").await;
    assert_eq!(s, 200);
    assert!(ctype.starts_with("application/x-ndjson"), "{ctype}");
    let exported: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported, all);
    let (s, ctype, text) = admin_text(&g, "/admin/ledger/export?format=csv").await;
    assert_eq!(s, 200);
    assert!(ctype.starts_with("text/csv"), "{ctype}");
    assert_csv_matches(&text, &all);
    for (q, want) in &cases {
        let (s, _, text) = admin_text(&g, &format!("/admin/ledger/export?format=csv{q}")).await;
        assert_eq!(s, 200);
        assert_csv_matches(&text, want);
        let (_, _, text) = admin_text(&g, &format!("/admin/ledger/export?format=jsonl{q}")).await;
        let got: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(&got, want, "export {q}");
    }
    let (s, _, text) = admin_text(&g, "/admin/ledger/export?format=xml").await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_value"))
    );

    // Usage: totals equal the records' sums, per currency, exactly.
    for (q, dims) in [
        ("", vec![]),
        ("?group_by=key_id,model", vec!["key_id", "model"]),
        (
            "?group_by=route,bucket,project",
            vec!["bucket", "project", "route"],
        ),
    ] {
        let (s, v) = g.admin_get(&format!("/admin/usage{q}")).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(usage_by_key(&v), expected_usage(&all, &dims), "usage{q}");
    }
    let (s, v) = g.admin_get("/admin/usage").await;
    assert_eq!(s, 200);
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{v}");
    let rejected = groups.iter().find(|g| g["currency"].is_null()).unwrap();
    assert_eq!(
        (rejected["requests"].as_u64(), rejected["cost"].as_str()),
        (Some(2500), Some("0"))
    );
    let usd = groups.iter().find(|g| g["currency"] == "USD").unwrap();
    assert_eq!(usd["requests"], 400);
    // 400 completions × (2 input × 1 + 8 output × 2) / 10⁶.
    assert_eq!(dec(&usd["cost"]), "0.0072".parse::<Decimal>().unwrap());
    let (s, v) = g.admin_get(&format!("/admin/usage?since={mid_s}")).await;
    assert_eq!(s, 200);
    let since_mid: Vec<Value> = all.iter().filter(|r| started(r) >= mid).cloned().collect();
    assert_eq!(usage_by_key(&v), expected_usage(&since_mid, &[]));
    let (s, v) = g.admin_get("/admin/usage?group_by=key_id,colour").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_value"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_attributes_doubled_traffic_to_volume() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "100", "100"),
        data_dir: None,
    });
    let burst = |completions: usize, rejected: usize| {
        let mut v: Vec<Req> = (0..completions).map(|_| Req::new(DEMO_KEY, "m")).collect();
        v.extend((0..rejected).map(|_| Req::new(DEMO_KEY, "nope")));
        v
    };
    let b0 = now();
    send_all(&g, burst(100, 50)).await;
    let b1 = boundary().await;
    send_all(&g, burst(200, 100)).await;
    let c1 = boundary().await;
    let all = wait_for_records(&g, 450).await;

    let q = format!(
        "/admin/usage/explain?base_since={}&base_until={}&since={}&until={}",
        rfc3339(b0),
        rfc3339(b1),
        rfc3339(b1),
        rfc3339(c1)
    );
    let (s, v) = g.admin_get(&q).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["base"]["since"]
            .as_str()
            .map(|t| t.parse::<DateTime<Utc>>().unwrap()),
        Some(b0)
    );
    let currencies = v["currencies"].as_array().unwrap();
    assert_eq!(currencies.len(), 1, "{v}");
    let usd = &currencies[0];
    assert_eq!(usd["currency"], "USD");
    let cost_in = |from: DateTime<Utc>, to: DateTime<Utc>| -> Decimal {
        all.iter()
            .filter(|r| started(r) >= from && started(r) < to)
            .map(|r| dec(&r["cost"]))
            .sum()
    };
    assert_eq!(dec(&usd["base_cost"]), cost_in(b0, b1));
    assert_eq!(dec(&usd["current_cost"]), cost_in(b1, c1));
    // 100 → 200 completions at 0.000018 each.
    assert_eq!(dec(&usd["change"]), "0.0018".parse::<Decimal>().unwrap());
    let drivers = usd["drivers"].as_array().unwrap();
    let names: Vec<&str> = drivers
        .iter()
        .map(|d| d["driver"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "volume",
            "input_tokens",
            "output_tokens",
            "model_mix",
            "route_mix",
            "fallback_share",
            "retry_share"
        ]
    );
    let sum: Decimal = drivers.iter().map(|d| dec(&d["contribution"])).sum();
    assert_eq!(sum, dec(&usd["change"]));
    let volume = &drivers[0];
    assert_eq!(dec(&volume["contribution"]), dec(&usd["change"]));
    assert_eq!(
        (volume["base"].as_str(), volume["current"].as_str()),
        (Some("100"), Some("200"))
    );
    assert_eq!(
        volume["summary"],
        "requests rose from 100 to 200 (+100%), adding 0.0018 USD"
    );
    for d in &drivers[1..] {
        assert_eq!(dec(&d["contribution"]), Decimal::ZERO, "{d}");
    }

    // Both periods are required and must be ordered.
    let (s, v) = g
        .admin_get(&format!(
            "/admin/usage/explain?since={}&until={}",
            rfc3339(b1),
            rfc3339(c1)
        ))
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_value"))
    );
    let (s, _) = g
        .admin_get(&format!(
            "/admin/usage/explain?base_since={}&base_until={}&since={}&until={}",
            rfc3339(b1),
            rfc3339(b0),
            rfc3339(b1),
            rfc3339(c1)
        ))
        .await;
    assert_eq!(s, 400);
}

/// Workflow runs: `task=` selects one run in the ledger, its export (where `task` follows
/// `end_user`, formula-neutralised in CSV) and usage; usage groups by task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_export_and_usage_by_task() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "100", "100"),
        data_dir: None,
    });
    let with = |model: &'static str, task: Option<&'static str>| Req {
        task,
        ..Req::new(DEMO_KEY, model)
    };
    let mut reqs = vec![with("m", Some("run-a")); 3];
    reqs.push(with("nope", Some("run-a")));
    reqs.extend(vec![with("m", Some("run-b")); 2]);
    reqs.push(with("m", Some("=1+2")));
    reqs.push(with("m", None));
    let statuses = send_all(&g, reqs).await;
    assert_eq!(statuses.iter().filter(|s| **s == 404).count(), 1);
    let all = wait_for_records(&g, 8).await;

    let run_a = g.all_records("&task=run-a").await;
    assert_eq!(run_a.len(), 4, "the task filter");
    assert!(run_a.iter().all(|r| r["task"] == "run-a"));
    assert_eq!(
        run_a.iter().filter(|r| r["status"] == "rejected").count(),
        1
    );
    assert_eq!(g.all_records("&task=run-b").await.len(), 2);
    assert!(
        g.all_records("&task=run").await.is_empty(),
        "exact match only"
    );

    // Export: the same records; CSV has `task` after `end_user`, neutralised as a formula.
    let (s, _, text) = admin_text(&g, "/admin/ledger/export?format=csv&task=run-a").await;
    assert_eq!(s, 200);
    assert_csv_matches(&text, &run_a);
    let header = parse_csv(&text)[0].clone();
    let at = |n: &str| header.iter().position(|h| h == n).unwrap();
    assert_eq!(at("task"), at("end_user") + 1);
    let (_, _, text) = admin_text(&g, "/admin/ledger/export?format=csv&task=%3D1%2B2").await;
    let rows = parse_csv(&text);
    assert_eq!(rows.len(), 2, "{text}");
    assert_eq!(rows[1][at("task")], "'=1+2");
    let (_, _, text) = admin_text(&g, "/admin/ledger/export?format=jsonl&task=run-b").await;
    assert_eq!(text.lines().count(), 2);

    // Usage: filtered to one run, and grouped by run.
    let (s, v) = g.admin_get("/admin/usage?task=run-a").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(usage_by_key(&v), expected_usage(&run_a, &[]));
    // A run's usage comes from its rollup, with every grouping and the filters the rollup keeps
    // (key, project, model, status); with a time bound, from its records: the same answer.
    let (s, v) = g
        .admin_get("/admin/usage?task=run-a&group_by=key_id,project,model,route,bucket")
        .await;
    assert_eq!(s, 200, "{v}");
    let dims = ["key_id", "project", "model", "route", "bucket"];
    assert_eq!(usage_by_key(&v), expected_usage(&run_a, &dims));
    let rejected: Vec<Value> = run_a
        .iter()
        .filter(|r| r["status"] == "rejected")
        .cloned()
        .collect();
    let (_, v) = g
        .admin_get("/admin/usage?task=run-a&status=rejected&group_by=model")
        .await;
    assert_eq!(usage_by_key(&v), expected_usage(&rejected, &["model"]));
    let served: Vec<Value> = run_a
        .iter()
        .filter(|r| r["requested_model"] == "m")
        .cloned()
        .collect();
    assert_eq!(served.len(), 3);
    let (_, v) = g
        .admin_get("/admin/usage?task=run-a&model=m&group_by=route")
        .await;
    assert_eq!(usage_by_key(&v), expected_usage(&served, &["route"]));
    let (_, v) = g.admin_get("/admin/usage?task=run-a&key_id=nobody").await;
    assert_eq!(v["groups"], json!([]));
    let (_, v) = g
        .admin_get("/admin/usage?task=run-a&since=2000-01-01T00:00:00Z&group_by=model")
        .await;
    assert_eq!(usage_by_key(&v), expected_usage(&run_a, &["model"]));
    let (s, v) = g.admin_get("/admin/usage?group_by=task,key_id").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(usage_by_key(&v), expected_usage(&all, &["key_id", "task"]));
    let tasks: std::collections::BTreeSet<String> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["group"]["task"].to_string())
        .collect();
    assert_eq!(
        tasks.into_iter().collect::<Vec<_>>(),
        ["\"=1+2\"", "\"run-a\"", "\"run-b\"", "null"]
    );
    let (s, v) = g.admin_get("/admin/usage?group_by=tasks").await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("task"),
        "{v}"
    );
    g.assert_no_panic();
}
