//! The ledger store under volume: append throughput through the writer thread, the latency of a
//! filtered page, and export speed.
//!
//! - `ledger_append` sends `StoreOp::Record`s in batches of 5,000 and waits for a flush
//!   (group commit + fsync): records/s.
//! - `ledger_query_page` reads one page of 100 records, newest first, over a store holding
//!   `TOLLGATE_BENCH_RECORDS` records (default 100,000): by key index + status filter, by the
//!   same after a cursor halfway down, and by project (no index: a scan of the whole ledger).
//! - `ledger_export` walks the whole store as the export endpoint does (batches of 500 resumed
//!   from a cursor) into JSON Lines and CSV: records/s.
//!
//! Scale to a million records with `TOLLGATE_BENCH_RECORDS=1000000 cargo bench --bench ledger`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rust_decimal::Decimal;
use tollgate::api::admin::Filter;
use tollgate::ledger::export::Format;
use tollgate::ledger::writer::{self, WriterThread};
use tollgate::ledger::{
    Attempt, LedgerRecord, LedgerWriter, Status, Store, StoreOp, UpstreamUsage, UsageSource,
};

const KEYS: usize = 10;
const APPEND_BATCH: u64 = 5_000;

fn records_wanted() -> u64 {
    std::env::var("TOLLGATE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// A realistic record: one attempt, upstream usage, prices; 1 in 10 rejected.
fn record(i: u64) -> LedgerRecord {
    let base = Utc
        .with_ymd_and_hms(2025, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default();
    let t = base + chrono::Duration::milliseconds(i64::try_from(i).unwrap_or(0) * 7);
    let rejected = i % 10 == 0;
    let key = format!("key_{:02}", i as usize % KEYS);
    LedgerRecord {
        request_id: tollgate::ledger::new_request_id(t),
        started_at: t,
        finished_at: t + chrono::Duration::milliseconds(420),
        workspace: "ws".into(),
        key_id: key.clone(),
        key_name: key,
        project: format!("project-{}", i % 7),
        end_user: Some(format!("user-{}", i % 1000)),
        task: None,
        endpoint: "chat.completions".into(),
        requested_model: if i % 3 == 0 { "gpt-4o" } else { "gpt-4o-mini" }.into(),
        stream: true,
        route: (!rejected).then(|| "gpt-4o-mini/demo".to_string()),
        provider: (!rejected).then(|| "demo".to_string()),
        upstream_model: (!rejected).then(|| "gpt-4o-mini-2024-07-18".to_string()),
        route_kind: (!rejected).then(|| "official".to_string()),
        bucket: (!rejected).then(|| "credit".to_string()),
        currency: (!rejected).then(|| "USD".to_string()),
        attempts: if rejected {
            Vec::new()
        } else {
            vec![Attempt {
                route: "gpt-4o-mini/demo".into(),
                upstream_model: "gpt-4o-mini-2024-07-18".into(),
                bucket: "credit".into(),
                retry: 0,
                outcome: "ok".into(),
                http_status: Some(200),
                error: None,
                started_at: t,
                latency_ms: 52,
            }]
        },
        fallbacks: 0,
        retries: 0,
        status: if rejected {
            Status::Rejected
        } else {
            Status::Completed
        },
        http_status: if rejected { 404 } else { 200 },
        input_tokens: 120,
        output_tokens: 64,
        output_tokens_delivered: 64,
        usage_source: UsageSource::Upstream,
        upstream_usage: Some(UpstreamUsage {
            prompt_tokens: 120,
            completion_tokens: 64,
        }),
        input_per_mtok: Some(Decimal::new(15, 2)),
        output_per_mtok: Some(Decimal::new(60, 2)),
        cost: Decimal::new(5640, 8),
        shortfall: Decimal::ZERO,
        ttft_ms: Some(50),
        duration_ms: 420,
        instance_id: None,
    }
}

struct Ledger {
    _dir: tempfile::TempDir,
    store: Store,
    writer: LedgerWriter,
    thread: Option<WriterThread>,
    rt: tokio::runtime::Runtime,
    next: u64,
}

impl Ledger {
    fn new() -> Ledger {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let store = Store::open(dir.path()).unwrap_or_else(|e| panic!("store: {e}"));
        let (writer, thread) = writer::start(store.clone(), Duration::from_millis(50))
            .unwrap_or_else(|e| panic!("writer: {e}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        Ledger {
            _dir: dir,
            store,
            writer,
            thread: Some(thread),
            rt,
            next: 0,
        }
    }

    /// Appends `n` records and waits until they are on disk.
    fn append(&mut self, n: u64) {
        for _ in 0..n {
            let op = StoreOp::Record(Box::new(record(self.next)));
            self.next += 1;
            if let Err(e) = self.writer.send(op) {
                panic!("append: {e}");
            }
        }
        if let Err(e) = self.rt.block_on(self.writer.flush()) {
            panic!("flush: {e}");
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            t.stop();
        }
    }
}

fn filter(key_id: Option<&str>, project: Option<&str>, status: Option<Status>) -> Filter {
    Filter {
        key_id: key_id.map(str::to_string),
        project: project.map(str::to_string),
        task: None,
        model: None,
        status,
        since: None,
        until: None,
    }
}

/// One page as `GET /admin/ledger` reads it: up to `limit` matches and the cursor after them.
fn page(
    store: &Store,
    f: &Filter,
    cursor: Option<&[u8]>,
    limit: usize,
) -> (usize, Option<Vec<u8>>) {
    let mut n = 0;
    let mut last = None;
    for item in store.scan_records(f.key_id.as_deref(), f.since, f.until, cursor) {
        let Ok((k, rec)) = item else { break };
        if f.matches(&rec) {
            black_box(&rec);
            n += 1;
            last = Some(k);
            if n == limit {
                break;
            }
        }
    }
    (n, last)
}

/// The whole ledger as the export endpoint streams it; returns (records, bytes).
fn export(store: &Store, format: Format) -> (u64, u64) {
    let f = filter(None, None, None);
    let (mut records, mut bytes) = (0u64, 0u64);
    let mut after: Option<Vec<u8>> = None;
    let mut out = format.header().into_bytes();
    loop {
        let mut in_batch = 0;
        let mut last = None;
        for item in store.scan_records(None, None, None, after.as_deref()) {
            let Ok((k, rec)) = item else { break };
            if f.matches(&rec) {
                format.write(&mut out, &rec);
            }
            last = Some(k);
            in_batch += 1;
            if in_batch == 500 {
                break;
            }
        }
        records += in_batch;
        bytes += out.len() as u64;
        out.clear();
        if in_batch < 500 {
            return (records, bytes);
        }
        after = last;
    }
}

fn append(c: &mut Criterion) {
    let mut ledger = Ledger::new();
    let mut g = c.benchmark_group("ledger_append");
    g.throughput(Throughput::Elements(APPEND_BATCH));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("record_batch_5000_and_flush", |b| {
        b.iter(|| ledger.append(APPEND_BATCH))
    });
    g.finish();
}

fn queries_and_export(c: &mut Criterion) {
    let n = records_wanted();
    let mut ledger = Ledger::new();
    let started = Instant::now();
    ledger.append(n);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "ledger fill: {n} records in {secs:.2} s ({:.0} records/s through the writer)",
        n as f64 / secs
    );
    let store = ledger.store.clone();

    let mut g = c.benchmark_group("ledger_query_page");
    g.sample_size(20);
    let by_key = filter(Some("key_03"), None, Some(Status::Completed));
    g.bench_function("key_and_status_newest_100", |b| {
        b.iter(|| page(&store, &by_key, None, 100))
    });
    let halfway = {
        let per_key = n / KEYS as u64;
        let mut cursor = None;
        for _ in 0..(per_key / 2 / 100) {
            cursor = page(&store, &by_key, cursor.as_deref(), 100).1;
        }
        cursor
    };
    g.bench_function("key_and_status_100_after_halfway_cursor", |b| {
        b.iter(|| page(&store, &by_key, halfway.as_deref(), 100))
    });
    let by_project = filter(None, Some("project-3"), None);
    g.bench_function("project_newest_100_unindexed", |b| {
        b.iter(|| page(&store, &by_project, None, 100))
    });
    g.finish();

    let mut g = c.benchmark_group("ledger_export");
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    for (name, format) in [("jsonl", Format::Jsonl), ("csv", Format::Csv)] {
        let t = Instant::now();
        let (records, bytes) = export(&store, format);
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "export {name}: {records} records, {bytes} bytes in {secs:.2} s ({:.0} records/s)",
            records as f64 / secs
        );
        g.bench_function(name, |b| b.iter(|| export(&store, format)));
    }
    g.finish();
}

criterion_group!(benches, append, queries_and_export);
criterion_main!(benches);
