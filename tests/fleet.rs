//! Fleet mode end to end (docs/fleet.md): three tollgate processes, each with its own config,
//! data dir and built-in mock, all on `[store] kind = "postgres"` over one throwaway PostgreSQL
//! cluster (tests/common/pg.rs). Everything is observed through the contract only: the config
//! file, the client and admin APIs, the binary, and the database server's own tools.
//!
//! - drain: 3 × 100 concurrent streams on one key funded for 300 tokens (F1, F2);
//! - `kill -9` of one instance with 50 streams open: the others reap its leases (F3);
//! - SIGTERM of one instance with streams open: drained, its leases back before it exits;
//! - a database restart under load: 503 `wallet_unavailable`, `/readyz` 503, recovery (F6);
//! - cross-instance keys, top-ups and one top-up reference sent to every instance at once (F7);
//! - the admin API of any instance answers for the whole fleet, `/admin/routes` names it (F5);
//! - rpm, tpm and concurrent streams on one key across the fleet (F4).
//!
//! The tests share two cores with everything else, so they run one at a time (`SERIAL`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::pg::{PgCluster, StopMode};
use common::*;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};

/// One fleet test at a time: each starts a cluster and three gateways.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const INSTANCES: [&str; 3] = ["gw-a", "gw-b", "gw-c"];
const URL_ENV: &str = "TOLLGATE_DATABASE_URL";

fn http() -> ::reqwest::Client {
    bounded_client(Duration::from_secs(60))
}

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// What differs between the fleets of the tests.
struct FleetConfig<'a> {
    /// Lines of `[settlement]`.
    settlement: &'a str,
    /// Prices of model `m` per million tokens (input, output), in USD.
    prices: (&'a str, &'a str),
    lease_ttl_ms: u64,
    /// Declare the bootstrap key `demo` (secret `DEMO_KEY`, 7 USD) in every instance's config.
    bootstrap: bool,
}

/// Three gateways on one database; dropping it kills the gateways, then stops the cluster.
struct Fleet {
    gws: Vec<Gateway>,
    pg: PgCluster,
}

impl Fleet {
    /// Starts the cluster, then the three instances at the same moment (their migrations race,
    /// and must not fail for it).
    fn start(cfg: FleetConfig<'_>) -> Fleet {
        let pg = PgCluster::start();
        let url = pg.url();
        let bodies: Vec<String> = INSTANCES.iter().map(|id| fleet_body(id, &cfg)).collect();
        let gws = std::thread::scope(|s| {
            let handles: Vec<_> = bodies
                .iter()
                .map(|body| {
                    let url = url.clone();
                    s.spawn(move || {
                        Gateway::start_extra(
                            Setup {
                                mocks: vec![("p1", NO_BREAKER)],
                                body: body.clone(),
                                data_dir: None,
                            },
                            Extra {
                                env: vec![(URL_ENV.to_string(), url)],
                                ..Extra::default()
                            },
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        Fleet { gws, pg }
    }

    fn a(&self) -> &Gateway {
        &self.gws[0]
    }

    /// Every instance still running.
    fn live(&self) -> impl Iterator<Item = (usize, &Gateway)> {
        self.gws
            .iter()
            .enumerate()
            .filter(|(_, g)| g.pid().is_some())
    }

    fn assert_no_panic(&self) {
        for g in &self.gws {
            g.assert_no_panic();
        }
    }
}

fn fleet_body(instance: &str, cfg: &FleetConfig<'_>) -> String {
    let (pin, pout) = cfg.prices;
    format!(
        r#"
[store]
kind = "postgres"
url_env = "{URL_ENV}"
pool_size = 8
instance_id = "{instance}"
lease_ttl_ms = {ttl}

[settlement]
{settlement}

[buckets.credit]
currency = "USD"
kind = "official"

[[models]]
name = "m"
tokenizer = "chunks"
retry = {{ max_retries = 0, backoff_base_ms = 5, backoff_max_ms = 50 }}
routes = [
  {{ provider = "p1", upstream_model = "up-m1", bucket = "credit", input_per_mtok = "{pin}", output_per_mtok = "{pout}" }},
]
{keys}"#,
        ttl = cfg.lease_ttl_ms,
        settlement = cfg.settlement,
        keys = if cfg.bootstrap {
            format!(
                "\n[[keys]]\nname = \"demo\"\nsecret = \"{DEMO_KEY}\"\ntopup = {{ credit = \"7\" }}\n"
            )
        } else {
            String::new()
        },
    )
}

/// Creates a key through `g`; returns (id, secret).
async fn create_key(g: &Gateway, name: &str, extra: Value) -> (String, String) {
    let mut body = json!({"name": name, "workspace": "fleet", "project": "fleet"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (s, v) = g.admin_post("/admin/keys", body).await;
    assert_eq!(s, 201, "{v}");
    (
        v["id"].as_str().unwrap().to_string(),
        v["secret"].as_str().unwrap().to_string(),
    )
}

async fn topup(g: &Gateway, key: &str, amount: &str, reference: Option<&str>) -> (u16, Value) {
    let mut body = json!({"bucket": "credit", "amount": amount});
    if let Some(r) = reference {
        body["reference"] = r.into();
    }
    g.admin_post(&format!("/admin/keys/{key}/topup"), body)
        .await
}

/// (balance, held, available) of the key's `credit` bucket as `g` sees it.
async fn wallet(g: &Gateway, key: &str) -> (Decimal, Decimal, Decimal) {
    let (s, v) = g.admin_get(&format!("/admin/keys/{key}/wallet")).await;
    assert_eq!(s, 200, "{v}");
    let b = &v["buckets"]["credit"];
    (dec(&b["balance"]), dec(&b["held"]), dec(&b["available"]))
}

/// A chat request to `client_url`; the mock answers `tokens` content tokens, one every
/// `interval_ms`.
async fn chat(
    client: &::reqwest::Client,
    client_url: &str,
    secret: &str,
    stream: bool,
    tokens: u32,
    interval_ms: u32,
) -> Result<::reqwest::Response, ::reqwest::Error> {
    let mut body = json!({"model": "m", "stream": stream,
        "messages": [{"role": "user", "content": "fleet"}]});
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    } else {
        body["max_tokens"] = tokens.into();
    }
    client
        .post(format!("{client_url}/v1/chat/completions"))
        .bearer_auth(secret)
        .header("x-mock-tokens", tokens.to_string())
        .header("x-mock-interval-ms", interval_ms.to_string())
        .json(&body)
        .send()
        .await
}

/// The `data:` payloads of a stream, read as they come so that a stream broken by a crash still
/// reports what arrived; `Err` carries them when the body broke.
async fn read_events(resp: ::reqwest::Response) -> Result<Vec<String>, Vec<String>> {
    let strip = |v: Vec<(Instant, String)>| v.into_iter().map(|(_, e)| e).collect();
    read_events_timed(resp).await.map(strip).map_err(strip)
}

/// [`read_events`], each payload with the moment it arrived.
async fn read_events_timed(
    mut resp: ::reqwest::Response,
) -> Result<Vec<(Instant, String)>, Vec<(Instant, String)>> {
    let mut buf = String::new();
    let mut out = Vec::new();
    let broke = loop {
        let at = match tokio::time::timeout(Duration::from_secs(30), resp.chunk()).await {
            Ok(Ok(Some(c))) => {
                buf.push_str(&String::from_utf8_lossy(&c));
                Instant::now()
            }
            Ok(Ok(None)) => break false,
            Ok(Err(_)) | Err(_) => break true,
        };
        while let Some(i) = buf.find("\n\n") {
            let ev: String = buf.drain(..i + 2).collect();
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("data:")
                        .map(|d| d.strip_prefix(' ').unwrap_or(d))
                })
                .collect();
            if !data.is_empty() {
                out.push((at, data.join("\n")));
            }
        }
    };
    if broke {
        Err(out)
    } else {
        Ok(out)
    }
}

/// Content deltas (one token each for the `chunks` tokenizer).
fn content_deltas(events: &[String]) -> u64 {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .map(|v| {
            v["choices"].as_array().map_or(0, |cs| {
                cs.iter()
                    .filter(|c| {
                        c["delta"]["content"]
                            .as_str()
                            .is_some_and(|s| !s.is_empty())
                    })
                    .count() as u64
            })
        })
        .sum()
}

/// The error event before `[DONE]`, if the stream ended with one.
fn stream_error_code(events: &[String]) -> Option<String> {
    let n = events.len();
    if n < 2 {
        return None;
    }
    let v: Value = serde_json::from_str(&events[n - 2]).ok()?;
    v["error"]["code"].as_str().map(str::to_string)
}

fn request_id(r: &::reqwest::Response) -> Option<String> {
    r.headers()
        .get("x-tollgate-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// What a client saw of one request.
#[derive(Debug, Default, Clone)]
struct Seen {
    instance: usize,
    status: u16,
    id: Option<String>,
    /// Content tokens received (stream deltas, or the non-stream completion's usage).
    delivered: u64,
    /// Stream: ended with `[DONE]` (not broken).
    done: bool,
    /// The error code before `[DONE]`, or of the error body.
    error: Option<String>,
    /// The connection failed before any response.
    unsent: bool,
    /// From sending to the response head.
    head: Duration,
}

/// Sends one request and reads all of it.
async fn request(
    client: &::reqwest::Client,
    instance: usize,
    client_url: &str,
    secret: &str,
    stream: bool,
    tokens: u32,
    interval_ms: u32,
) -> Seen {
    let mut seen = Seen {
        instance,
        ..Seen::default()
    };
    let sent = Instant::now();
    let r = match chat(client, client_url, secret, stream, tokens, interval_ms).await {
        Ok(r) => r,
        Err(_) => {
            seen.unsent = true;
            return seen;
        }
    };
    seen.head = sent.elapsed();
    seen.status = r.status().as_u16();
    seen.id = request_id(&r);
    if seen.status != 200 {
        let v: Value = r.json().await.unwrap_or(Value::Null);
        seen.error = v["error"]["code"].as_str().map(str::to_string);
        return seen;
    }
    if stream {
        let (events, broke) = match read_events(r).await {
            Ok(ev) => (ev, false),
            Err(ev) => (ev, true),
        };
        seen.delivered = content_deltas(&events);
        seen.done = !broke && events.last().map(String::as_str) == Some("[DONE]");
        seen.error = stream_error_code(&events);
    } else {
        let v: Value = r.json().await.unwrap_or(Value::Null);
        seen.delivered = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        seen.done = v["choices"].is_array();
    }
    seen
}

/// Waits until no instance shows anything held on the key and the ledger (read through the
/// first live instance) stops growing; returns the key's records.
async fn quiesce(f: &Fleet, key: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut held = Vec::new();
        for (_, g) in f.live() {
            held.push(wallet(g, key).await.1);
        }
        if held.iter().all(Decimal::is_zero) {
            break;
        }
        assert!(Instant::now() < deadline, "holds never released: {held:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, g) = f.live().next().unwrap();
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let recs = g.all_records(&format!("&key_id={key}")).await;
        if recs.len() == last {
            return recs;
        }
        last = recs.len();
        assert!(Instant::now() < deadline, "the ledger never settled");
    }
}

/// Invariant 1 exactly, as every live instance sees it: Σ top-ups − Σ ledger cost == balance,
/// nothing held, balance ≥ 0; and no request id twice in the ledger.
async fn assert_conservation(f: &Fleet, key: &str, topups: Decimal, recs: &[Value]) {
    let cost: Decimal = recs.iter().map(|r| dec(&r["cost"])).sum();
    let mut ids = HashSet::new();
    for r in recs {
        let id = r["request_id"].as_str().unwrap();
        assert!(ids.insert(id), "request {id} recorded twice: {r}");
        assert!(
            r["bucket"].as_str() == Some("credit") || dec(&r["cost"]).is_zero(),
            "a cost outside credit: {r}"
        );
    }
    for (i, g) in f.live() {
        let (bal, held, avail) = wallet(g, key).await;
        assert!(bal >= Decimal::ZERO, "{}: balance {bal}", INSTANCES[i]);
        assert!(held.is_zero(), "{}: held {held}", INSTANCES[i]);
        assert_eq!(avail, bal, "{}: available ≠ balance at rest", INSTANCES[i]);
        assert_eq!(
            topups - cost,
            bal,
            "{}: top-ups {topups} − ledger cost {cost} ≠ balance {bal}",
            INSTANCES[i]
        );
    }
}

fn by_id(recs: &[Value]) -> HashMap<String, Value> {
    recs.iter()
        .map(|r| (r["request_id"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

/// Polls the wallet through every live instance in turn until `stop`: balance, held and
/// available are never negative and held never exceeds the balance (invariant 2). Returns the
/// number of polls and the slowest answer.
fn watch_wallet(
    urls: Vec<String>,
    key: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Duration)> {
    tokio::spawn(async move {
        let client = http();
        let mut polls = 0u64;
        let mut slowest = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) && polls < 5000 {
            let url = &urls[polls as usize % urls.len()];
            let asked = Instant::now();
            let r = client
                .get(format!("{url}/admin/keys/{key}/wallet"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            let b = &v["buckets"]["credit"];
            let (bal, held, avail) = (dec(&b["balance"]), dec(&b["held"]), dec(&b["available"]));
            assert!(bal >= Decimal::ZERO, "{url}: balance {bal} < 0");
            assert!(avail >= Decimal::ZERO, "{url}: available {avail} < 0");
            assert!(held >= Decimal::ZERO, "{url}: held {held} < 0");
            assert!(held <= bal, "{url}: held {held} > balance {bal}");
            slowest = slowest.max(asked.elapsed());
            polls += 1;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        (polls, slowest)
    })
}

async fn ready_status(g: &Gateway) -> u16 {
    match http().get(format!("{}/readyz", g.admin_url)).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Drain: 3 instances × 100 concurrent streams on one key funded for 300 tokens

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_300_streams_over_three_instances_bills_exactly_what_was_delivered() {
    let _serial = SERIAL.lock().await;
    // Input free, one output token = 1 USD: the key pays for 300 tokens; 300 streams ask 20 each
    // (one every 25 ms, so that the wallet is watched while they run).
    let f = Fleet::start(FleetConfig {
        settlement:
            "flush_interval_ms = 50\ninitial_output_hold_tokens = 4\nmax_output_hold_tokens = 16",
        prices: ("0", "1000000"),
        lease_ttl_ms: 10_000,
        bootstrap: false,
    });
    let (key, secret) = create_key(f.a(), "drain", json!({})).await;
    let (s, v) = topup(f.a(), &key, "300", Some("drain-fund")).await;
    assert_eq!(s, 200, "{v}");
    let funded = d("300");

    let stop = Arc::new(AtomicBool::new(false));
    let admin_urls: Vec<String> = f.gws.iter().map(|g| g.admin_url.clone()).collect();
    let watcher = watch_wallet(admin_urls, key.clone(), stop.clone());

    let client = http();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..300usize {
        let (client, secret) = (client.clone(), secret.clone());
        let url = f.gws[i % 3].client_url.clone();
        set.spawn(async move { request(&client, i % 3, &url, &secret, true, 20, 25).await });
    }
    let started = Instant::now();
    let mut seen = Vec::new();
    while let Some(r) = set.join_next().await {
        seen.push(r.unwrap());
    }
    let ended = Instant::now();
    let took = ended - started;
    stop.store(true, Ordering::Relaxed);
    let (polls, slowest_poll) = watcher.await.unwrap();
    assert!(
        polls >= 3,
        "the wallet was observed only {polls} times in {} ms (the slowest answer took {} ms)",
        took.as_millis(),
        slowest_poll.as_millis()
    );

    let recs = quiesce(&f, &key).await;
    let records = by_id(&recs);
    let (mut completed, mut cut, mut refused, mut delivered_total) = (0, 0, 0, 0u64);
    for s in &seen {
        let id =
            s.id.as_ref()
                .unwrap_or_else(|| panic!("no request id: {s:?}"));
        let rec = records
            .get(id)
            .unwrap_or_else(|| panic!("{id} ({}) has no ledger record", INSTANCES[s.instance]));
        match s.status {
            402 => {
                refused += 1;
                assert_eq!(s.error.as_deref(), Some("insufficient_balance"), "{s:?}");
                assert_eq!(rec["status"], "rejected", "{rec}");
                assert!(dec(&rec["cost"]).is_zero(), "{rec}");
            }
            200 => {
                assert!(s.done, "{id}: the stream did not end with [DONE]: {s:?}");
                let billed = rec["output_tokens"].as_u64().unwrap();
                assert_eq!(
                    s.delivered, billed,
                    "{id} on {}: delivered {} tokens, billed {billed}",
                    INSTANCES[s.instance], s.delivered
                );
                assert_eq!(dec(&rec["cost"]), Decimal::from(billed), "{rec}");
                assert!(dec(&rec["shortfall"]).is_zero(), "{rec}");
                delivered_total += s.delivered;
                if s.error.as_deref() == Some("balance_exhausted") {
                    cut += 1;
                    assert_eq!(rec["status"], "balance_exhausted", "{rec}");
                } else {
                    completed += 1;
                    assert_eq!(s.error, None, "{s:?}");
                    assert_eq!(s.delivered, 20, "{s:?}");
                    assert_eq!(rec["status"], "completed", "{rec}");
                }
            }
            other => panic!(
                "{id} on {}: unexpected status {other}: {s:?}",
                INSTANCES[s.instance]
            ),
        }
    }
    assert_eq!(recs.len(), 300, "one record per request");
    let served: HashSet<usize> = seen
        .iter()
        .filter(|s| s.status == 200)
        .map(|s| s.instance)
        .collect();
    let slowest = |status: u16| {
        seen.iter()
            .filter(|s| s.status == status)
            .map(|s| s.head.as_millis())
            .max()
            .unwrap_or(0)
    };
    eprintln!(
        "drain: {completed} completed, {cut} cut, {refused} refused, {delivered_total} tokens \
         delivered, served by {} instances in {} ms; slowest response head: 200 after {} ms, \
         402 after {} ms; {polls} wallet polls, the slowest {} ms",
        served.len(),
        took.as_millis(),
        slowest(200),
        slowest(402),
        slowest_poll.as_millis()
    );
    assert!(
        completed + cut > 0 && refused > 0,
        "the key was not drained"
    );
    assert!(delivered_total <= 300);
    assert_conservation(&f, &key, funded, &recs).await;

    // F2: once the leases of the idle key have returned (≤ 2 s), what is left can be spent from
    // any one instance, to the last token.
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(ended.elapsed())).await;
    let left = wallet(f.a(), &key).await.0;
    eprintln!("drain: {left} USD left after the drain");
    let last = request(&client, 2, &f.gws[2].client_url, &secret, true, 1000, 1).await;
    if left >= Decimal::ONE {
        assert_eq!(last.status, 200, "{left} left, yet gw-c refused: {last:?}");
        assert_eq!(Decimal::from(last.delivered), left, "{last:?}");
        assert_eq!(last.error.as_deref(), Some("balance_exhausted"), "{last:?}");
    } else {
        assert_eq!(last.status, 402, "{last:?}");
    }
    for (i, g) in f.gws.iter().enumerate().take(2) {
        let s = request(&client, i, &g.client_url, &secret, true, 20, 1).await;
        assert_eq!(s.status, 402, "{}: {s:?}", INSTANCES[i]);
        assert_eq!(s.error.as_deref(), Some("insufficient_balance"));
    }
    let recs = quiesce(&f, &key).await;
    assert_conservation(&f, &key, funded, &recs).await;
    assert_eq!(wallet(f.a(), &key).await.0, Decimal::ZERO, "not drained");
    f.assert_no_panic();
}

// ---------------------------------------------------------------------------------------------
// 2. kill -9 of one instance with 50 streams open

/// Also the regression test of issue 16: a stream that paid for a burst of tokens and then
/// waited for an extension with them still in its buffer was billed them (64 or 128 tokens
/// against 33 received), and a wallet waiting for leases stopped persisting its other streams'
/// consumption (billed 64 against 105 received).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_nine_of_one_instance_its_leases_are_reaped_by_the_others() {
    let _serial = SERIAL.lock().await;
    const TTL_MS: u64 = 2000;
    const FLUSH_MS: u64 = 50;
    let (pin, pout) = ("1000", "2000");
    let mut f = Fleet::start(FleetConfig {
        settlement: &format!("flush_interval_ms = {FLUSH_MS}"),
        prices: (pin, pout),
        lease_ttl_ms: TTL_MS,
        bootstrap: false,
    });
    let (key, secret) = create_key(f.a(), "kill", json!({})).await;
    assert_eq!(topup(f.a(), &key, "100", None).await.0, 200);
    let funded = d("100");

    // A request through each instance that finishes well before the kill.
    let client = http();
    let mut before = Vec::new();
    for i in 0..3 {
        let s = request(&client, i, &f.gws[i].client_url, &secret, true, 5, 1).await;
        assert_eq!(s.status, 200, "{s:?}");
        before.push(s.id.unwrap());
    }

    // 50 streams on gw-a, 400 tokens at 10 ms: 4 s each, open when it dies.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (client, secret, tx) = (client.clone(), secret.clone(), tx.clone());
        let url = f.a().client_url.clone();
        set.spawn(async move {
            let r = chat(&client, &url, &secret, true, 400, 10).await.unwrap();
            assert_eq!(r.status(), 200);
            let id = request_id(&r).unwrap();
            tx.send(id.clone()).await.unwrap();
            let events = read_events_timed(r).await.unwrap_or_else(|ev| ev);
            assert_ne!(
                events.last().map(|(_, e)| e.as_str()),
                Some("[DONE]"),
                "{id} ended"
            );
            // When each content token arrived.
            let arrivals: Vec<Instant> = events
                .iter()
                .flat_map(|(at, e)| {
                    std::iter::repeat_n(*at, content_deltas(std::slice::from_ref(e)) as usize)
                })
                .collect();
            (id, arrivals)
        });
    }
    drop(tx);
    let mut open = Vec::new();
    for _ in 0..50 {
        let id = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("50 streams did not start on gw-a")
            .unwrap();
        open.push(id);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    f.gws[0].kill9();
    let killed = Instant::now();
    let mut arrived = HashMap::new();
    while let Some(r) = set.join_next().await {
        let (id, arrivals) = r.unwrap();
        assert!(
            !arrivals.is_empty(),
            "{id} received nothing before the kill"
        );
        arrived.insert(id, arrivals);
    }

    // gw-b and gw-c reap gw-a's leases: its open holds are billed as `interrupted` and nothing
    // stays held, within lease_ttl_ms + one flush (plus what a busy machine adds to the polls).
    let allowance = Duration::from_millis(750);
    let bound = Duration::from_millis(TTL_MS + FLUSH_MS) + allowance;
    let reaped_after = loop {
        let held_b = wallet(&f.gws[1], &key).await.1;
        let held_c = wallet(&f.gws[2], &key).await.1;
        let recs = f.gws[1].all_records(&format!("&key_id={key}")).await;
        let interrupted = recs.iter().filter(|r| r["status"] == "interrupted").count();
        if held_b.is_zero() && held_c.is_zero() && interrupted >= 50 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "gw-a's leases were never reaped: held {held_b} / {held_c}, {interrupted} interrupted"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    eprintln!(
        "kill -9: gw-a's 50 streams reaped {} ms after the kill (lease_ttl_ms {TTL_MS})",
        reaped_after.as_millis()
    );
    assert!(
        reaped_after <= bound,
        "reaped {} ms after the kill; lease_ttl_ms + one flush is {} ms",
        reaped_after.as_millis(),
        TTL_MS + FLUSH_MS
    );

    let recs = quiesce(&f, &key).await;
    assert_conservation(&f, &key, funded, &recs).await;
    let records = by_id(&recs);
    for id in &before {
        assert_eq!(records[id]["status"], "completed", "{}", records[id]);
    }
    let interrupted: Vec<&Value> = recs
        .iter()
        .filter(|r| r["status"] == "interrupted")
        .collect();
    assert_eq!(
        interrupted.len(),
        50,
        "one interrupted record per open stream"
    );
    let per_token = d(pout) / Decimal::from(1_000_000);
    let per_input = d(pin) / Decimal::from(1_000_000);
    let (mut billed_sum, mut received_sum, mut widest) = (0u64, 0u64, 0u64);
    for id in &open {
        let r = records
            .get(id)
            .unwrap_or_else(|| panic!("open stream {id} has no record"));
        assert_eq!(r["status"], "interrupted", "{r}");
        assert_eq!(r["usage_source"], "counted", "{r}");
        let billed = r["output_tokens"].as_u64().unwrap();
        let received = arrived[id].len() as u64;
        billed_sum += billed;
        received_sum += received;
        widest = widest.max(received.saturating_sub(billed));
        // Billed is the consumption persisted at the last flush: never more than the client
        // received (F1), and short of it by at most one flush interval of streaming (F3): the
        // tokens that arrived in the last flush interval before the kill, plus what a busy
        // machine adds to a flush and its commit (250 ms). Counted in time, not tokens: a
        // stream that waited for an extension sends what queued up meanwhile in one burst.
        assert!(
            billed <= received,
            "{id}: billed {billed} > received {received}: {r}"
        );
        assert!(billed > 0, "{id}: its consumption was never persisted");
        let window = Duration::from_millis(FLUSH_MS + 250);
        let last_interval = arrived[id]
            .iter()
            .filter(|at| **at + window >= killed)
            .count() as u64;
        assert!(
            billed + last_interval >= received,
            "{id}: billed {billed}, received {received}, of which {last_interval} in the last \
             {} ms before the kill: more than a flush interval unbilled",
            window.as_millis()
        );
        let charge = Decimal::from(r["input_tokens"].as_u64().unwrap()) * per_input
            + Decimal::from(billed) * per_token;
        assert_eq!(dec(&r["cost"]) + dec(&r["shortfall"]), charge, "{r}");
    }
    eprintln!(
        "kill -9: 50 streams billed {billed_sum} tokens, received {received_sum}; widest gap \
         {widest} tokens (a flush interval of pacing is 5)"
    );

    // The survivors serve the key, and the money still adds up.
    for (i, g) in f.gws.iter().enumerate().skip(1) {
        let s = request(&client, i, &g.client_url, &secret, true, 5, 1).await;
        assert_eq!(s.status, 200, "{}: {s:?}", INSTANCES[i]);
        assert!(s.done);
    }
    let recs = quiesce(&f, &key).await;
    assert_conservation(&f, &key, funded, &recs).await;
    f.assert_no_panic();
}

// ---------------------------------------------------------------------------------------------
// 2b. SIGTERM of one instance with streams open

/// A stopped instance drains its streams, then gives back what it still leases before it exits:
/// the moment it is gone another instance can spend the whole remaining balance, without
/// waiting for a reap (the TTL here is 10 s), and nothing is lost or billed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_of_one_instance_returns_its_leases_before_it_exits() {
    let _serial = SERIAL.lock().await;
    // One USD per output token, input free: token counts and amounts are the same numbers.
    let mut f = Fleet::start(FleetConfig {
        settlement: "flush_interval_ms = 50",
        prices: ("0", "1000000"),
        lease_ttl_ms: 10_000,
        bootstrap: false,
    });
    let (key, secret) = create_key(f.a(), "term", json!({})).await;
    assert_eq!(topup(f.a(), &key, "1000", None).await.0, 200);
    let funded = d("1000");
    let client = http();

    // 10 streams of 60 tokens on gw-a (1.5 s each), open when it is told to stop.
    const STREAMS: usize = 10;
    const TOKENS: u64 = 60;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let (client, secret) = (client.clone(), secret.clone());
        let url = f.a().client_url.clone();
        set.spawn(async move { request(&client, 0, &url, &secret, true, TOKENS as u32, 25).await });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leased_by_a =
        f.pg.query("SELECT count(*) FROM tg_leases WHERE instance_id = 'gw-a' AND amount > 0");
    assert_eq!(
        leased_by_a, "1",
        "gw-a leases nothing while its streams run"
    );
    let asked = Instant::now();
    let code = tokio::task::block_in_place(|| f.gws[0].terminate());
    let stopped_in = asked.elapsed();
    assert_eq!(code, Some(0), "gw-a did not exit cleanly");

    // At once: nothing of gw-a's is left in the database, nothing is leased.
    for table in ["tg_leases", "tg_holds", "tg_instances"] {
        let left = f.pg.query(&format!(
            "SELECT count(*) FROM {table} WHERE instance_id = 'gw-a'"
        ));
        assert_eq!(left, "0", "gw-a left rows in {table} after it exited");
    }
    let leased = d(&f.pg.query(&format!(
        "SELECT leased FROM tg_wallets WHERE key_id = '{key}' AND bucket = 'credit'"
    )));
    assert!(leased.is_zero(), "{leased} still leased after gw-a exited");
    eprintln!(
        "SIGTERM: gw-a drained {STREAMS} streams and exited {} ms after the signal, its leases returned",
        stopped_in.as_millis()
    );

    // The streams were drained to their end and billed what they delivered.
    let mut ids = Vec::new();
    while let Some(r) = set.join_next().await {
        let s = r.unwrap();
        assert_eq!(s.status, 200, "{s:?}");
        assert!(s.done, "a stream was cut by the stop: {s:?}");
        assert_eq!(s.delivered, TOKENS, "{s:?}");
        ids.push(s.id.unwrap());
    }
    let recs = quiesce(&f, &key).await;
    let records = by_id(&recs);
    for id in &ids {
        let r = &records[id];
        assert_eq!(r["status"], "completed", "{r}");
        assert_eq!(r["output_tokens"].as_u64(), Some(TOKENS), "{r}");
    }
    assert_conservation(&f, &key, funded, &recs).await;

    // gw-b spends all that is left in one request: no part of it is still leased to gw-a.
    let left = wallet(&f.gws[1], &key).await.0;
    assert_eq!(left, funded - Decimal::from(STREAMS as u64 * TOKENS));
    let all = u32::try_from(left.trunc().mantissa()).unwrap();
    let s = request(&client, 1, &f.gws[1].client_url, &secret, false, all, 1).await;
    assert_eq!(s.status, 200, "{s:?}");
    assert_eq!(
        s.delivered,
        u64::from(all),
        "gw-b could not hold the whole balance: {s:?}"
    );
    let recs = quiesce(&f, &key).await;
    assert_conservation(&f, &key, funded, &recs).await;
    assert!(wallet(&f.gws[1], &key).await.0.is_zero());
    f.assert_no_panic();
}

// ---------------------------------------------------------------------------------------------
// 3. Database restart under load

/// Sends requests to one instance in a loop (streams and non-streams, 5 tokens) while `run`
/// holds and `paused` does not; returns what it saw.
fn load_loop(
    instance: usize,
    url: String,
    secret: String,
    run: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    in_flight: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Vec<Seen>> {
    tokio::spawn(async move {
        let client = http();
        let mut seen = Vec::new();
        let mut n = 0u32;
        while run.load(Ordering::SeqCst) && seen.len() < 5000 {
            // Counted in flight before the pause is read, so that whoever pauses and then sees
            // nothing in flight knows no request is about to start.
            in_flight.fetch_add(1, Ordering::SeqCst);
            if paused.load(Ordering::SeqCst) {
                in_flight.fetch_sub(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            n += 1;
            let s = request(&client, instance, &url, &secret, n % 2 == 0, 5, 2).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            if s.status == 503 {
                // Outage: do not spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen.push(s);
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_restart_under_load_loses_nothing_and_recovers_by_itself() {
    let _serial = SERIAL.lock().await;
    let mut f = Fleet::start(FleetConfig {
        settlement: "flush_interval_ms = 50\ninitial_output_hold_tokens = 32",
        prices: ("0", "1000"),
        lease_ttl_ms: 10_000,
        bootstrap: false,
    });
    let (key, secret) = create_key(f.a(), "restart", json!({})).await;
    assert_eq!(topup(f.a(), &key, "10", None).await.0, 200);
    let funded = d("10");
    let client = http();

    // Background load on every instance, two loops each.
    let run = Arc::new(AtomicBool::new(true));
    let paused = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicU64::new(0));
    let mut loops = Vec::new();
    for i in 0..3 {
        for _ in 0..2 {
            loops.push(load_loop(
                i,
                f.gws[i].client_url.clone(),
                secret.clone(),
                run.clone(),
                paused.clone(),
                in_flight.clone(),
            ));
        }
    }
    // Four slow streams per instance, open across the outage: 30 tokens at 100 ms, all paid by
    // their first hold (32 tokens), so they need nothing from the database to finish.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
    let mut slow = tokio::task::JoinSet::new();
    for i in 0..12usize {
        let (client, secret, tx) = (client.clone(), secret.clone(), tx.clone());
        let url = f.gws[i % 3].client_url.clone();
        slow.spawn(async move {
            let r = chat(&client, &url, &secret, true, 30, 100).await.unwrap();
            assert_eq!(r.status(), 200, "slow stream on {}", INSTANCES[i % 3]);
            let id = request_id(&r).unwrap();
            tx.send(()).await.unwrap();
            let events = read_events(r).await;
            (i % 3, id, events)
        });
    }
    drop(tx);
    for _ in 0..12 {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("slow streams did not start")
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    f.pg.stop(StopMode::Fast);
    let down = Instant::now();

    // F6: every instance reports not ready...
    for (i, g) in f.gws.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while ready_status(g).await != 503 {
            assert!(
                Instant::now() < deadline,
                "{}: /readyz never answered 503 with the database down",
                INSTANCES[i]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!(
        "restart: every /readyz 503 {} ms after the stop",
        down.elapsed().as_millis()
    );
    // ...and refuses new reservations with 503 `wallet_unavailable` before any upstream call.
    paused.store(true, Ordering::SeqCst);
    while in_flight.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut upstream_before = Vec::new();
    for g in &f.gws {
        upstream_before.push(g.mock_stats("p1").await["chat_requests"].as_u64().unwrap());
    }
    for (i, g) in f.gws.iter().enumerate() {
        for stream in [false, true] {
            let r = chat(&client, &g.client_url, &secret, stream, 5, 1)
                .await
                .unwrap();
            assert_eq!(r.status(), 503, "{}: stream {stream}", INSTANCES[i]);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "wallet_unavailable", "{v}");
            assert!(v["error"]["message"].is_string(), "{v}");
            assert!(v["error"]["type"].is_string(), "{v}");
        }
        let after = g.mock_stats("p1").await["chat_requests"].as_u64().unwrap();
        assert_eq!(
            after, upstream_before[i],
            "{}: a refused request reached the upstream",
            INSTANCES[i]
        );
    }
    paused.store(false, Ordering::SeqCst);

    // The streams open at the stop finish on their holds while the database is still down.
    let mut slow_seen = Vec::new();
    while let Some(r) = slow.join_next().await {
        let (i, id, events) = r.unwrap();
        let events = events.unwrap_or_else(|ev| panic!("{id} on {} broke: {ev:?}", INSTANCES[i]));
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{id}");
        assert_eq!(content_deltas(&events), 30, "{id}: {events:?}");
        slow_seen.push((id, 30u64));
    }
    let outage = down.elapsed();

    f.pg.restart();
    let up = Instant::now();
    // Service resumes by itself: ready again, and new requests served on every instance.
    for (i, g) in f.gws.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = request(&client, i, &g.client_url, &secret, false, 5, 1).await;
            if s.status == 200 && ready_status(g).await == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no recovery 30 s after the database returned: {s:?}",
                INSTANCES[i]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "restart: database down {} ms; every instance serving again {} ms after it returned",
        outage.as_millis(),
        up.elapsed().as_millis()
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    run.store(false, Ordering::SeqCst);
    let mut seen = Vec::new();
    for l in loops {
        seen.extend(l.await.unwrap());
    }

    let recs = quiesce(&f, &key).await;
    assert_conservation(&f, &key, funded, &recs).await;
    let records = by_id(&recs);
    let mut by_status: BTreeMap<u16, u64> = BTreeMap::new();
    for s in &seen {
        *by_status.entry(s.status).or_default() += 1;
        assert!(!s.unsent, "a connection failed: {s:?}");
        match s.status {
            200 => {
                // Acknowledged: exactly one record, billing what the client received.
                let id = s.id.as_ref().unwrap();
                let rec = records
                    .get(id)
                    .unwrap_or_else(|| panic!("served request {id} lost its record: {s:?}"));
                assert!(s.done, "{s:?}");
                assert_eq!(rec["status"], "completed", "{rec}");
                assert_eq!(rec["output_tokens"].as_u64().unwrap(), s.delivered, "{rec}");
                assert_eq!(s.delivered, 5, "{s:?}");
            }
            503 => {
                assert_eq!(s.error.as_deref(), Some("wallet_unavailable"), "{s:?}");
                if let Some(rec) = s.id.as_ref().and_then(|id| records.get(id)) {
                    assert!(dec(&rec["cost"]).is_zero(), "a refused request cost: {rec}");
                }
            }
            other => panic!("unexpected status {other}: {s:?}"),
        }
    }
    for (id, n) in &slow_seen {
        let rec = records
            .get(id)
            .unwrap_or_else(|| panic!("a stream settled during the outage lost its record: {id}"));
        assert_eq!(rec["status"], "completed", "{rec}");
        assert_eq!(rec["output_tokens"].as_u64().unwrap(), *n, "{rec}");
    }
    eprintln!("restart: load outcomes by status {by_status:?}");
    assert!(by_status.get(&200).copied().unwrap_or(0) > 0);
    f.assert_no_panic();
}

// ---------------------------------------------------------------------------------------------
// 4. Cross-instance: keys, top-ups, one top-up reference everywhere at once

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_and_topups_made_on_one_instance_work_on_the_others_at_once() {
    let _serial = SERIAL.lock().await;
    let f = Fleet::start(FleetConfig {
        settlement: "flush_interval_ms = 50",
        prices: ("0", "1000000"),
        lease_ttl_ms: 10_000,
        bootstrap: true,
    });
    let client = http();
    let (a, b, c) = (&f.gws[0], &f.gws[1], &f.gws[2]);

    // The bootstrap key in all three configs is one key of the fleet, funded once (R11).
    let (_, v) = a.admin_get("/admin/keys").await;
    let demos: Vec<&Value> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["name"] == "demo")
        .collect();
    assert_eq!(
        demos.len(),
        1,
        "the bootstrap key is listed {} times: {v}",
        demos.len()
    );
    let demo = demos[0]["id"].as_str().unwrap().to_string();
    for (i, g) in f.gws.iter().enumerate() {
        assert_eq!(
            wallet(g, &demo).await.0,
            d("7"),
            "{}: the bootstrap top-up of 7 was not applied exactly once",
            INSTANCES[i]
        );
    }
    for (i, g) in f.gws.iter().enumerate() {
        let s = request(&client, i, &g.client_url, DEMO_KEY, false, 1, 1).await;
        assert_eq!(s.status, 200, "{}: the bootstrap key: {s:?}", INSTANCES[i]);
    }

    // A key created on A is known on B at once (unfunded: 402, not 401).
    let (key, secret) = create_key(a, "cross", json!({})).await;
    let s = request(&client, 1, &b.client_url, &secret, false, 2, 1).await;
    assert_eq!(s.status, 402, "{s:?}");
    assert_eq!(s.error.as_deref(), Some("insufficient_balance"));
    // gw-c has now seen the key at zero too.
    let s = request(&client, 2, &c.client_url, &secret, false, 2, 1).await;
    assert_eq!(s.status, 402, "{s:?}");

    // A top-up through A is spendable through B and C at once.
    assert_eq!(topup(a, &key, "5", Some("first")).await.0, 200);
    let s = request(&client, 1, &b.client_url, &secret, true, 2, 1).await;
    assert_eq!(s.status, 200, "top-up on gw-a not spendable on gw-b: {s:?}");
    let s = request(&client, 2, &c.client_url, &secret, false, 2, 1).await;
    assert_eq!(s.status, 200, "top-up on gw-a not spendable on gw-c: {s:?}");

    // Drain it to zero through C, then a top-up through B is spendable through A at once.
    let s = request(&client, 2, &c.client_url, &secret, true, 1000, 1).await;
    assert_eq!(s.status, 200, "{s:?}");
    assert_eq!(s.error.as_deref(), Some("balance_exhausted"), "{s:?}");
    let s = request(&client, 0, &a.client_url, &secret, false, 2, 1).await;
    assert_eq!(s.status, 402, "{s:?}");
    assert_eq!(topup(b, &key, "3", Some("second")).await.0, 200);
    let s = request(&client, 0, &a.client_url, &secret, true, 2, 1).await;
    assert_eq!(s.status, 200, "top-up on gw-b not spendable on gw-a: {s:?}");

    // F7: the same reference sent to all three at the same moment applies once; ten times over.
    // The last request's debit commits with its record: read the balance once both are in.
    quiesce(&f, &key).await;
    let before = wallet(a, &key).await.0;
    for n in 0..10 {
        let reference = format!("race-{n}");
        let calls = f
            .gws
            .iter()
            .map(|g| topup(g, &key, "0.25", Some(&reference)));
        for (i, (status, v)) in futures_util::future::join_all(calls)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(status, 200, "{} {reference}: {v}", INSTANCES[i]);
        }
    }
    let (s, v) = topup(c, &key, "0.5", Some("race-3")).await;
    assert_eq!(s, 409, "a reused reference with another amount: {v}");
    assert_eq!(v["error"]["code"], "reference_conflict", "{v}");
    let recs = quiesce(&f, &key).await;
    let after = wallet(a, &key).await.0;
    assert_eq!(
        after - before,
        d("2.5"),
        "ten references of 0.25, each once"
    );
    assert_conservation(&f, &key, d("5") + d("3") + d("2.5"), &recs).await;

    // Revoked on C: refused everywhere.
    let r = client
        .delete(format!("{}/admin/keys/{key}", c.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let revoked = Instant::now();
    for (i, g) in f.gws.iter().enumerate() {
        loop {
            let s = request(&client, i, &g.client_url, &secret, false, 2, 1).await;
            if s.status == 401 {
                break;
            }
            assert!(
                revoked.elapsed() < Duration::from_secs(5),
                "{}: a key revoked on gw-c still served 5 s later: {s:?}",
                INSTANCES[i]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!(
        "cross: revocation effective on every instance after {} ms",
        revoked.elapsed().as_millis()
    );
    f.assert_no_panic();
}

// ---------------------------------------------------------------------------------------------
// 5. Fleet-wide admin

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_instance_admin_api_answers_for_the_whole_fleet() {
    let _serial = SERIAL.lock().await;
    let f = Fleet::start(FleetConfig {
        settlement: "flush_interval_ms = 50",
        prices: ("1000", "2000"),
        lease_ttl_ms: 10_000,
        bootstrap: false,
    });
    let client = http();
    let (key, secret) = create_key(&f.gws[2], "admin", json!({"project": "fleet-admin"})).await;
    assert_eq!(topup(&f.gws[1], &key, "50", None).await.0, 200);

    // Three requests through A, two through B, one through C, all of one workflow run.
    let mut served: Vec<(usize, String)> = Vec::new();
    for (i, n) in [(0usize, 3), (1, 2), (2, 1)] {
        for k in 0..n {
            let r = client
                .post(format!("{}/v1/chat/completions", f.gws[i].client_url))
                .bearer_auth(&secret)
                .header("x-tollgate-task", "fleet-run-1")
                .header("x-mock-tokens", "3")
                .json(&json!({"model": "m", "stream": k % 2 == 0, "max_tokens": 3,
                    "messages": [{"role": "user", "content": "admin"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let id = request_id(&r).unwrap();
            let _ = r.bytes().await.unwrap();
            served.push((i, id));
        }
    }
    let recs = quiesce(&f, &key).await;
    assert_eq!(recs.len(), 6);
    let ids: HashSet<&str> = served.iter().map(|(_, id)| id.as_str()).collect();
    let explain_q = "/admin/usage/explain?base_since=2000-01-01T00:00:00Z&base_until=2001-01-01T00:00:00Z&since=2001-01-01T00:00:00Z&until=2100-01-01T00:00:00Z";
    let mut explains = Vec::new();
    let mut wallets = Vec::new();
    for (i, g) in f.gws.iter().enumerate() {
        let name = INSTANCES[i];
        // Ledger list and single records: every instance's requests.
        let list = g.all_records(&format!("&key_id={key}")).await;
        let got: HashSet<&str> = list
            .iter()
            .map(|r| r["request_id"].as_str().unwrap())
            .collect();
        assert_eq!(got, ids, "{name}: the ledger list is not the fleet's");
        let task = g.all_records("&task=fleet-run-1").await;
        assert_eq!(task.len(), 6, "{name}: the task filter");
        for (j, id) in &served {
            let (s, v) = g.admin_get(&format!("/admin/ledger/{id}")).await;
            assert_eq!(s, 200, "{name}: record {id} served by {}", INSTANCES[*j]);
            assert_eq!(
                v["instance_id"], INSTANCES[*j],
                "{name}: record {id} does not name the instance that served it: {v}"
            );
        }
        // Export.
        let r = client
            .get(format!(
                "{}/admin/ledger/export?format=jsonl&key_id={key}",
                g.admin_url
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert_eq!(text.lines().count(), 6, "{name}: export");
        // Usage.
        let (s, v) = g.admin_get("/admin/usage?group_by=key_id").await;
        assert_eq!(s, 200, "{v}");
        let group = v["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|gr| gr["group"]["key_id"] == key.as_str())
            .unwrap_or_else(|| panic!("{name}: no usage group for the key: {v}"));
        assert_eq!(group["requests"], 6, "{name}: {group}");
        assert_eq!(group["output_tokens"], 18, "{name}: {group}");
        // Keys, wallets, explain, catalog.
        let (_, v) = g.admin_get("/admin/keys").await;
        assert!(
            v["keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["id"] == key.as_str()),
            "{name}: the key created on gw-c is not listed"
        );
        wallets.push(g.admin_get(&format!("/admin/keys/{key}/wallet")).await.1);
        let (s, v) = g.admin_get(explain_q).await;
        assert_eq!(s, 200, "{v}");
        explains.push(v);
        let (s, v) = g.admin_get(&format!("/admin/catalog?key_id={key}")).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["models"][0]["available"], true, "{name}: {v}");
        // Routes: this instance's own view, named.
        let (s, v) = g.admin_get("/admin/routes").await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["instance_id"], name, "{name}: /admin/routes: {v}");
        assert_eq!(v["routes"][0]["route"], "m/p1", "{v}");
    }
    assert!(wallets.windows(2).all(|w| w[0] == w[1]), "{wallets:?}");
    assert!(explains.windows(2).all(|w| w[0] == w[1]), "{explains:?}");
    let cost: Decimal = recs.iter().map(|r| dec(&r["cost"])).sum();
    assert_eq!(
        dec(&wallets[0]["buckets"]["credit"]["balance"]),
        d("50") - cost
    );
    f.assert_no_panic();
}

// ---------------------------------------------------------------------------------------------
// 6. Fleet-wide limits

/// A fleet for the limit tests, once every instance has counted the others: each learns the
/// fleet's size at its registration renewals, at most a second apart (docs/fleet.md).
async fn fleet_for_limits() -> (Fleet, ::reqwest::Client) {
    let f = Fleet::start(FleetConfig {
        settlement: "flush_interval_ms = 50",
        prices: ("0", "1"),
        lease_ttl_ms: 10_000,
        bootstrap: false,
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    (f, http())
}

/// `count` non-stream requests of `tokens` output tokens each, round robin over the three
/// instances: how many each admitted, and how many were refused with 429 `rate_limited`.
async fn round_robin(
    client: &::reqwest::Client,
    f: &Fleet,
    secret: &str,
    count: usize,
    tokens: u32,
) -> ([u64; 3], u64) {
    let mut admitted = [0u64; 3];
    let mut refused = 0;
    for n in 0..count {
        let i = n % 3;
        let s = request(client, i, &f.gws[i].client_url, secret, false, tokens, 1).await;
        match s.status {
            200 => admitted[i] += 1,
            429 => {
                assert_eq!(s.error.as_deref(), Some("rate_limited"), "{s:?}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {s:?}"),
        }
    }
    (admitted, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpm_and_concurrent_streams_hold_across_the_fleet() {
    let _serial = SERIAL.lock().await;
    let (f, client) = fleet_for_limits().await;

    // rpm = 30 over three instances: 90 requests round robin within a few seconds.
    const RPM: u64 = 30;
    let (key, secret) = create_key(f.a(), "rpm", json!({"rpm": RPM})).await;
    assert_eq!(topup(f.a(), &key, "100", None).await.0, 200);
    let (admitted, refused) = round_robin(&client, &f, &secret, 90, 1).await;
    let total: u64 = admitted.iter().sum();
    eprintln!("limits: rpm {RPM} over 3 instances: {admitted:?} admitted, {refused} refused");
    assert!(
        total <= RPM + FLEET_RPM_SLACK,
        "{total} requests admitted in a minute with rpm {RPM} (documented bound: +{FLEET_RPM_SLACK})"
    );
    assert!(total >= RPM, "only {total} of rpm {RPM} admitted");

    // max_concurrent_streams = 6 over three instances: 18 slow streams round robin.
    const STREAMS: u64 = 6;
    let (key2, secret2) =
        create_key(f.a(), "streams", json!({"max_concurrent_streams": STREAMS})).await;
    assert_eq!(topup(f.a(), &key2, "100", None).await.0, 200);
    let mut set = tokio::task::JoinSet::new();
    for n in 0..18usize {
        let (client, secret) = (client.clone(), secret2.clone());
        let url = f.gws[n % 3].client_url.clone();
        set.spawn(async move {
            // Staggered so that earlier streams are open when later ones ask.
            tokio::time::sleep(Duration::from_millis(20 * n as u64)).await;
            request(&client, n % 3, &url, &secret, true, 20, 100).await
        });
    }
    let mut open = 0;
    while let Some(r) = set.join_next().await {
        let s = r.unwrap();
        match s.status {
            200 => open += 1,
            429 => assert_eq!(s.error.as_deref(), Some("rate_limited"), "{s:?}"),
            other => panic!("unexpected {other}: {s:?}"),
        }
    }
    eprintln!("limits: max_concurrent_streams {STREAMS} over 3 instances: {open} of 18 admitted");
    assert!(
        open <= STREAMS + FLEET_STREAMS_SLACK,
        "{open} streams at once with max_concurrent_streams {STREAMS}"
    );
    assert!(open >= STREAMS, "only {open} streams admitted");
    f.assert_no_panic();
}

/// tpm = 300 over three instances: each admits requests until its share (100) of billed tokens
/// is reached, the last one overshooting it; the fleet never bills more than the documented
/// bound (docs/fleet.md, "Bounds": the limit plus one request's tokens per instance).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpm_holds_across_the_fleet_within_the_documented_bound() {
    let _serial = SERIAL.lock().await;
    let (f, client) = fleet_for_limits().await;
    const TPM: u64 = 300;
    let (key, secret) = create_key(f.a(), "tpm", json!({"tpm": TPM})).await;
    assert_eq!(topup(f.a(), &key, "100", None).await.0, 200);
    let (admitted, refused) = round_robin(&client, &f, &secret, 90, 10).await;
    let recs = quiesce(&f, &key).await;
    let billed: Vec<u64> = recs
        .iter()
        .filter(|r| r["status"] == "completed")
        .map(|r| r["input_tokens"].as_u64().unwrap() + r["output_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(billed.len() as u64, admitted.iter().sum::<u64>());
    let total: u64 = billed.iter().sum();
    let largest = billed.iter().copied().max().unwrap_or(0);
    let bound = TPM + FLEET_TPM_OVERSHOOT_REQUESTS * largest;
    eprintln!(
        "limits: tpm {TPM} over 3 instances: {admitted:?} admitted ({total} tokens billed, \
         bound {bound}), {refused} refused"
    );
    assert!(
        total <= bound,
        "{total} tokens billed in a minute with tpm {TPM} (documented bound: {bound})"
    );
    // Each instance admits its whole share before it refuses.
    assert!(total >= TPM, "only {total} of tpm {TPM} admitted");
    assert!(refused > 0, "nothing refused: the limit was never reached");
    f.assert_no_panic();
}

/// Requests by which a fleet may overshoot a key's `tpm`: one per instance (docs/fleet.md).
const FLEET_TPM_OVERSHOOT_REQUESTS: u64 = 3;

/// How far a fleet may exceed a key's `rpm` once every instance has counted the others
/// (docs/fleet.md, "Bounds": each instance admits an even share, so none when the limit is at
/// least the number of instances).
const FLEET_RPM_SLACK: u64 = 0;
/// The same for `max_concurrent_streams`.
const FLEET_STREAMS_SLACK: u64 = 0;

// ---------------------------------------------------------------------------------------------
// 0. The harness itself

/// Busy instances spend no transaction of their own on their heartbeats: while all three
/// settle streams, every transaction that writes is a batch (or a lease that found no batch
/// gathering). With the renewals in their own transactions, the 1.5 s window below would hold
/// about 20 more (one per instance every quarter of the 800 ms TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_instances_renew_their_registrations_inside_their_batches() {
    let _serial = SERIAL.lock().await;
    let f = Fleet::start(FleetConfig {
        settlement: "flush_interval_ms = 50",
        prices: ("0", "1"),
        lease_ttl_ms: 800,
        bootstrap: false,
    });
    let (key, secret) = create_key(f.a(), "busy", json!({})).await;
    assert_eq!(topup(f.a(), &key, "1000", None).await.0, 200);
    let run = Arc::new(AtomicBool::new(true));
    let mut loops = Vec::new();
    for (i, g) in f.gws.iter().enumerate() {
        for _ in 0..6 {
            let (url, secret, run) = (g.client_url.clone(), secret.clone(), run.clone());
            loops.push(tokio::spawn(async move {
                let client = http();
                let mut seen = Vec::new();
                while run.load(Ordering::SeqCst) && seen.len() < 1000 {
                    seen.push(request(&client, i, &url, &secret, true, 30, 10).await);
                }
                seen
            }));
        }
    }
    // Past the first seconds' early renewals, with every instance's lease taken.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let sample = || -> (i64, i64) {
        let out = f.pg.query(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
                    (SELECT count(*) FROM tg_batches)",
        );
        let mut it = out.split('|').map(|v| v.trim().parse::<i64>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    let (xid0, batches0) = sample();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (xid1, batches1) = sample();
    run.store(false, Ordering::SeqCst);
    let mut seen = Vec::new();
    for l in loops {
        seen.extend(l.await.unwrap());
    }
    assert!(
        seen.iter().all(|s| s.status == 200 && s.done),
        "a request failed: {:?}",
        seen.iter().find(|s| s.status != 200 || !s.done)
    );
    let (writes, batches) = (xid1 - xid0, batches1 - batches0);
    eprintln!("busy: {writes} writing transactions, {batches} of them batches, in 1.5 s");
    assert!(
        batches >= 30,
        "the instances were not busy: {batches} batches"
    );
    assert!(
        writes - batches <= 6,
        "{writes} writing transactions for {batches} batches: the heartbeats ran on their own"
    );
    f.assert_no_panic();
}

#[test]
fn the_throwaway_cluster_serves_restarts_and_is_removed_on_drop() {
    let mut pg = PgCluster::start();
    pg.query("CREATE TABLE t (x numeric)");
    pg.query("INSERT INTO t VALUES (1.000000000000000001)");
    pg.stop(StopMode::Fast);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", pg.port)).is_err(),
        "the server still listens after a stop"
    );
    pg.restart();
    assert_eq!(pg.query("SELECT sum(x) FROM t"), "1.000000000000000001");
    let (port, dir) = (pg.port, pg.dir());
    assert!(dir.exists());
    drop(pg);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the server outlived its cluster"
    );
}
