//! `/metrics` end to end (R38): series exist at zero from start-up; a success, a cut
//! at zero, a retry with a fallback and an open breaker move each counter by exactly what
//! happened; no label carries a key, request or user; and every metric the shipped dashboard and
//! rules reference is in a real scrape.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const USER: &str = "enduser-7f3a9c-alice";

/// One sample of the text exposition: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    /// Sum of the samples of `name` whose labels include every pair of `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                want.iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// The value of the one series `name{want}` (exact label set), panicking when absent.
    fn get(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
            .unwrap_or_else(|| panic!("no series {name}{want:?} in:\n{}", self.text))
    }

    fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }
}

fn parse(text: &str) -> Scrape {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                (name.to_string(), parse_labels(body))
            }
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    Scrape {
        text: text.to_string(),
        samples,
    }
}

/// `k="v",k2="v2"` with `\"`, `\\` and `\n` escapes in values.
fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        assert_eq!(
            chars.next(),
            Some('"'),
            "label value must be quoted: {body}"
        );
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(e) => value.push(e),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key.trim().to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

async fn scrape(g: &Gateway) -> Scrape {
    let r = g
        .client()
        .get(format!("{}/metrics", g.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    parse(&r.text().await.unwrap())
}

/// Scrapes until `ok` holds (gauges and breaker state move asynchronously).
async fn scrape_until(g: &Gateway, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(g).await;
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} never held:\n{}", s.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn chat(
    g: &Gateway,
    secret: &str,
    stream: bool,
    text: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut body = json!({"model": "m", "stream": stream,
        "messages": [{"role": "user", "content": text}]});
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let mut r = g
        .client()
        .post(g.chat_url())
        .bearer_auth(secret)
        .header("x-tollgate-user", USER)
        .json(&body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()[name].to_str().unwrap().to_string()
}

/// Waits until the ledger holds `n` records and returns them.
async fn records(g: &Gateway, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let recs = g.all_records("").await;
        if recs.len() >= n {
            return recs;
        }
        assert!(Instant::now() < deadline, "{} of {n} records", recs.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Metric names referenced by a shipped file (recording rules `tollgate:...` do not match).
fn referenced_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find("tollgate_") {
        let start = i + pos;
        let before_ok = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric());
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        if before_ok {
            out.insert(text[start..end].trim_end_matches('_').to_string());
        }
        i = end;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_leak_nothing() {
    let g = Gateway::start(Setup {
        mocks: vec![
            (
                "p1",
                "circuit = { failure_threshold = 2, min_requests = 1000, open_ms = 30000, max_open_ms = 60000 }",
            ),
            ("p2", ""),
        ],
        body: standard_body("allow_cross_bucket_fallback = true", "5", "5"),
        data_dir: None,
    });

    // Start-up: per-route series exist at zero (R38), money metrics typed as counters.
    let before = scrape(&g).await;
    for (route, bucket) in [("m/p1", "credit"), ("m/p2", "routed")] {
        for status in ["completed", "balance_exhausted", "upstream_error"] {
            let labels = [
                ("model", "m"),
                ("route", route),
                ("bucket", bucket),
                ("status", status),
            ];
            assert_eq!(before.get("tollgate_requests_total", &labels), 0.0);
        }
        for outcome in ["ok", "http_500", "circuit_open"] {
            let labels = [("route", route), ("outcome", outcome)];
            assert_eq!(before.get("tollgate_upstream_attempts_total", &labels), 0.0);
        }
        let labels = [("model", "m"), ("route", route), ("reason", "http_500")];
        assert_eq!(before.get("tollgate_retries_total", &labels), 0.0);
        assert_eq!(
            before.get("tollgate_circuit_state", &[("route", route)]),
            0.0
        );
        for direction in ["input", "output"] {
            let labels = [
                ("model", "m"),
                ("route", route),
                ("bucket", bucket),
                ("direction", direction),
            ];
            assert_eq!(before.get("tollgate_tokens_total", &labels), 0.0);
        }
    }
    let spend_p1 = [
        ("bucket", "credit"),
        ("currency", "USD"),
        ("model", "m"),
        ("route", "m/p1"),
    ];
    assert_eq!(before.get("tollgate_spend_total", &spend_p1), 0.0);
    let fb = [
        ("model", "m"),
        ("from_route", "m/p1"),
        ("to_route", "m/p2"),
        ("reason", "http_500"),
    ];
    assert_eq!(before.get("tollgate_fallbacks_total", &fb), 0.0);
    let shortfall_credit = [("bucket", "credit"), ("currency", "USD")];
    assert_eq!(
        before.get("tollgate_settlement_shortfall_total", &shortfall_credit),
        0.0
    );
    assert_eq!(
        before.get("tollgate_retry_budget_exhausted_total", &[]),
        0.0
    );
    assert!(before
        .text
        .contains("# TYPE tollgate_spend_total counter\n"));
    assert!(before
        .text
        .contains("# TYPE tollgate_settlement_shortfall_total counter\n"));
    assert!(before.text.contains("# HELP tollgate_spend_total "));
    // Explicit buckets, not the exporter's summary default.
    assert!(before
        .text
        .contains("# TYPE tollgate_ledger_flush_seconds histogram\n"));
    assert!(before
        .text
        .contains("# TYPE tollgate_gateway_overhead_seconds histogram\n"));

    let mut request_ids = Vec::new();

    // 1. A streamed success on p1.
    let r = chat(&g, DEMO_KEY, true, "12345678", &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tollgate-route"), "m/p1");
    request_ids.push(header(&r, "x-tollgate-request-id"));
    assert_eq!(sse_events(r).await.last().unwrap(), "[DONE]");

    // 2. A stream cut at zero: a key funded for the input and five output tokens of 200.
    let (s, v) = g
        .admin_post(
            "/admin/keys",
            json!({"name": "poor", "buckets": ["credit"]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let poor_id = v["id"].as_str().unwrap().to_string();
    let poor_secret = v["secret"].as_str().unwrap().to_string();
    let (s, v) = g
        .admin_post(
            &format!("/admin/keys/{poor_id}/topup"),
            json!({"bucket": "credit", "amount": "0.000011"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let r = chat(&g, &poor_secret, true, "hi", &[("x-mock-tokens", "200")]).await;
    assert_eq!(r.status(), 200);
    request_ids.push(header(&r, "x-tollgate-request-id"));
    let events = sse_events(r).await;
    assert!(
        events.iter().any(|e| e.contains("balance_exhausted")),
        "{events:?}"
    );

    // 3. p1 fails: one retry on p1, then the breaker (threshold 2) opens and p2 serves.
    g.mock_options("p1", json!({"fault": "500"})).await;
    let r = chat(&g, DEMO_KEY, false, "12345678", &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tollgate-route"), "m/p2");
    assert_eq!(header(&r, "x-tollgate-retries"), "1");
    assert_eq!(header(&r, "x-tollgate-fallbacks"), "1");
    request_ids.push(header(&r, "x-tollgate-request-id"));
    let _: Value = r.json().await.unwrap();
    scrape_until(&g, "breaker of m/p1 open", |s| {
        s.get("tollgate_circuit_state", &[("route", "m/p1")]) == 2.0
    })
    .await;

    // 4. With the breaker open p1 is skipped (no fallback, no retry).
    let r = chat(&g, DEMO_KEY, true, "12345678", &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tollgate-route"), "m/p2");
    assert_eq!(header(&r, "x-tollgate-fallbacks"), "0");
    request_ids.push(header(&r, "x-tollgate-request-id"));
    assert_eq!(sse_events(r).await.last().unwrap(), "[DONE]");

    let recs = records(&g, 4).await;
    assert_eq!(recs.len(), 4, "{recs:?}");
    let after = scrape_until(&g, "streams and holds settled", |s| {
        s.get("tollgate_streams_active", &[]) == 0.0
            && s.get("tollgate_wallet_holds_active", &[]) == 0.0
    })
    .await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);

    // Requests by route, bucket and ledger status.
    assert_eq!(delta("tollgate_requests_total", &[]), 4.0);
    let req = |route, bucket, status| {
        delta(
            "tollgate_requests_total",
            &[
                ("model", "m"),
                ("route", route),
                ("bucket", bucket),
                ("status", status),
            ],
        )
    };
    assert_eq!(req("m/p1", "credit", "completed"), 1.0);
    assert_eq!(req("m/p1", "credit", "balance_exhausted"), 1.0);
    assert_eq!(req("m/p2", "routed", "completed"), 2.0);

    // Attempts: two successes and two 500s on p1, one skip; two successes on p2.
    let att = |route, outcome| {
        delta(
            "tollgate_upstream_attempts_total",
            &[("route", route), ("outcome", outcome)],
        )
    };
    assert_eq!(att("m/p1", "ok"), 2.0);
    assert_eq!(att("m/p1", "http_500"), 2.0);
    assert_eq!(att("m/p1", "circuit_open"), 1.0);
    assert_eq!(att("m/p2", "ok"), 2.0);
    assert_eq!(delta("tollgate_upstream_attempts_total", &[]), 7.0);

    // One retry and one fallback, labelled with the failed outcome.
    assert_eq!(delta("tollgate_retries_total", &[]), 1.0);
    assert_eq!(
        delta(
            "tollgate_retries_total",
            &[("model", "m"), ("route", "m/p1"), ("reason", "http_500")]
        ),
        1.0
    );
    assert_eq!(delta("tollgate_fallbacks_total", &[]), 1.0);
    assert_eq!(delta("tollgate_fallbacks_total", &fb), 1.0);
    assert_eq!(delta("tollgate_retry_budget_exhausted_total", &[]), 0.0);

    // The cut at zero, and nothing else cut.
    assert_eq!(
        delta(
            "tollgate_stream_cutoffs_total",
            &[("reason", "balance_exhausted")]
        ),
        1.0
    );
    assert_eq!(delta("tollgate_stream_cutoffs_total", &[]), 1.0);

    // The breaker: one transition to open, state open; p2 untouched.
    assert_eq!(
        delta(
            "tollgate_circuit_transitions_total",
            &[("route", "m/p1"), ("to", "open")]
        ),
        1.0
    );
    assert_eq!(delta("tollgate_circuit_transitions_total", &[]), 1.0);
    assert_eq!(
        after.get("tollgate_circuit_state", &[("route", "m/p1")]),
        2.0
    );
    assert_eq!(
        after.get("tollgate_circuit_state", &[("route", "m/p2")]),
        0.0
    );

    // Tokens and spend match the ledger, per route and bucket.
    for (route, bucket, currency) in [("m/p1", "credit", "USD"), ("m/p2", "routed", "CNY")] {
        let mine: Vec<&Value> = recs.iter().filter(|r| r["route"] == route).collect();
        let input: u64 = mine
            .iter()
            .map(|r| r["input_tokens"].as_u64().unwrap())
            .sum();
        let output: u64 = mine
            .iter()
            .map(|r| r["output_tokens"].as_u64().unwrap())
            .sum();
        let cost: rust_decimal::Decimal = mine.iter().map(|r| dec(&r["cost"])).sum();
        let t = |direction| {
            delta(
                "tollgate_tokens_total",
                &[
                    ("route", route),
                    ("bucket", bucket),
                    ("direction", direction),
                ],
            )
        };
        assert_eq!(t("input"), input as f64, "{route}");
        assert_eq!(t("output"), output as f64, "{route}");
        let spend = delta(
            "tollgate_spend_total",
            &[
                ("bucket", bucket),
                ("currency", currency),
                ("model", "m"),
                ("route", route),
            ],
        );
        let cost: f64 = cost.to_string().parse().unwrap();
        assert!(cost > 0.0, "{route}");
        assert!(
            (spend - cost).abs() < 1e-12,
            "{route}: spend {spend} vs ledger {cost}"
        );
    }
    // The cut stream billed its five paid tokens and nothing unpaid.
    let cut = recs
        .iter()
        .find(|r| r["status"] == "balance_exhausted")
        .unwrap();
    assert_eq!(cut["output_tokens"], 5, "{cut}");
    assert_eq!(delta("tollgate_settlement_shortfall_total", &[]), 0.0);

    // Histograms: TTFT per request with a first token (ledger `ttft_ms`), durations per request.
    let ttft = |route| {
        delta(
            "tollgate_ttft_seconds_count",
            &[("model", "m"), ("route", route)],
        )
    };
    for route in ["m/p1", "m/p2"] {
        let with_ttft = recs
            .iter()
            .filter(|r| r["route"] == route && r["ttft_ms"].is_u64())
            .count();
        assert_eq!(ttft(route), with_ttft as f64, "{route}");
    }
    assert_eq!(ttft("m/p1"), 2.0);
    assert_eq!(delta("tollgate_request_duration_seconds_count", &[]), 4.0);
    // One pre-send sample per sent attempt (6) plus one per forwarded chunk.
    assert!(delta("tollgate_gateway_overhead_seconds_count", &[]) > 6.0);
    assert!(delta("tollgate_ledger_flush_seconds_count", &[]) >= 1.0);
    assert!(after.get("tollgate_wallet_actors", &[]) >= 1.0);
    assert!(after
        .text
        .contains("tollgate_ledger_flush_seconds_bucket{le=\"0.25\"}"));

    // No label anywhere carries a key, a request or a user.
    let (_, keys) = g.admin_get("/admin/keys").await;
    let mut secrets: Vec<String> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    assert!(secrets.contains(&poor_id));
    secrets.extend(request_ids.iter().cloned());
    secrets.extend([USER.to_string(), DEMO_KEY.to_string(), poor_secret.clone()]);
    for s in &after.samples {
        for (k, v) in &s.labels {
            assert!(
                !v.starts_with("key_") && !v.starts_with("req_") && !v.contains(USER),
                "label {k}={v:?} on {}",
                s.name
            );
        }
    }
    for s in &secrets {
        assert!(!after.text.contains(s.as_str()), "{s} in /metrics");
    }

    // Every metric the shipped dashboard and rules use exists in this scrape.
    // Integration tests run from the package directory.
    let root = ".";
    let dashboard =
        std::fs::read_to_string(format!("{root}/config/grafana/tollgate.json")).unwrap();
    let _: Value = serde_json::from_str(&dashboard).unwrap();
    let rules = std::fs::read_to_string(format!("{root}/config/prometheus/rules.yml")).unwrap();
    let scraped = after.names();
    let mut referenced = referenced_names(&dashboard);
    referenced.extend(referenced_names(&rules));
    assert!(referenced.len() >= 15, "{referenced:?}");
    for name in &referenced {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                scraped
                    .contains(&format!("{base}_count"))
                    .then(|| base.to_string())
            })
            .unwrap_or_else(|| name.clone());
        let present = scraped.contains(&base) || scraped.contains(&format!("{base}_count"));
        assert!(
            present,
            "{name} is referenced but not exported:\n{}",
            after.text
        );
    }
}

/// R41: a model name a client sends never becomes a label: unknown models count under
/// `model="unknown"`, however many and however long they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_count_under_one_label() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "5", "5"),
        data_dir: None,
    });
    let long = "x".repeat(3000);
    let names = ["nope-1", "nope-2", long.as_str()];
    for name in names {
        let r = g
            .client()
            .post(g.chat_url())
            .bearer_auth(DEMO_KEY)
            .json(&json!({"model": name, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    let unknown = [
        ("model", "unknown"),
        ("route", "none"),
        ("bucket", "none"),
        ("status", "rejected"),
    ];
    let s = scrape_until(&g, "three unknown-model requests counted", |s| {
        s.sum("tollgate_requests_total", &unknown) == 3.0
    })
    .await;
    let models: BTreeSet<String> = s
        .samples
        .iter()
        .filter_map(|x| x.labels.get("model").cloned())
        .collect();
    let want: BTreeSet<String> = ["m", "emb", "unknown"].map(String::from).into();
    assert_eq!(models, want, "{}", s.text);
    assert!(!s.text.contains("nope-"), "{}", s.text);
    assert!(s.text.len() < 100_000, "{} bytes", s.text.len());
}
