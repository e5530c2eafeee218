//! Wallet actor round trips: one hold's life as a stream sees it — grant (reserve), one
//! extension, settle — through the `Wallets` facade, the sharded actor and the ledger writer
//! (the settlement is queued to sled as in production). Throughput is in hold lifecycles, three
//! actor messages each.
//!
//! `hold_lifecycle/sequential`: one task, one hold at a time (message latency bound).
//! `hold_lifecycle/concurrent_64`: 64 tasks on one key (one actor's mailbox under load).
// A bench aborts on a broken setup: there is nothing to report then.
#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rust_decimal::Decimal;
use tollgate::ledger::{writer, LedgerRecord, Status, Store};
use tollgate::wallet::Wallets;

const KEY: &str = "bench-key";
const BUCKET: &str = "credit";

fn draft() -> LedgerRecord {
    let now = chrono::Utc::now();
    LedgerRecord {
        workspace: "ws".into(),
        key_id: KEY.into(),
        key_name: "bench".into(),
        project: "p".into(),
        endpoint: "chat.completions".into(),
        requested_model: "m".into(),
        stream: true,
        route: Some("m/p1".into()),
        provider: Some("p1".into()),
        upstream_model: Some("up".into()),
        route_kind: Some("official".into()),
        bucket: Some(BUCKET.into()),
        currency: Some("USD".into()),
        status: Status::Completed,
        http_status: 200,
        input_tokens: 10,
        ..LedgerRecord::empty("bench".into(), now)
    }
}

/// Grant 32 tokens' worth, draw it, extend by 64, draw one more, settle.
async fn lifecycle(w: &Wallets, rec: &LedgerRecord) {
    let token = Decimal::new(6, 7); // 0.60 per Mtok
    let mut hold = w
        .reserve(KEY, BUCKET, token, token * Decimal::from(32), rec)
        .await
        .expect("funded");
    for _ in 0..32 {
        hold.try_draw(token, 1);
    }
    hold.extend(token * Decimal::from(64)).await;
    hold.try_draw(token, 1);
    let charge = hold.consumed();
    hold.settle(charge, None).await;
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sys = actix_rt::System::new();
    let (wallets, writer, thread) = sys.block_on(async {
        let store = Store::open(dir.path()).expect("store");
        let (writer, thread) = writer::start(store, Duration::from_millis(50)).expect("writer");
        let wallets = Wallets::new(
            2,
            writer.clone(),
            Duration::from_millis(50),
            Duration::from_secs(600),
        );
        wallets
            .topup(KEY, BUCKET, Decimal::from(1_000_000_000u64), None)
            .await
            .expect("topup");
        (wallets, writer, thread)
    });
    let rec = draft();

    let mut g = c.benchmark_group("hold_lifecycle");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sequential", |b| {
        b.iter_custom(|iters| {
            sys.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    lifecycle(&wallets, &rec).await;
                }
                t.elapsed()
            })
        })
    });
    const TASKS: u64 = 64;
    g.throughput(Throughput::Elements(TASKS));
    g.bench_function("concurrent_64", |b| {
        b.iter_custom(|iters| {
            sys.block_on(async {
                let t = Instant::now();
                let handles: Vec<_> = (0..TASKS)
                    .map(|_| {
                        let (w, rec) = (wallets.clone(), rec.clone());
                        actix_rt::spawn(async move {
                            for _ in 0..iters {
                                lifecycle(&w, &rec).await;
                            }
                        })
                    })
                    .collect();
                for h in handles {
                    h.await.expect("task");
                }
                t.elapsed()
            })
        })
    });
    g.finish();

    wallets.stop_all();
    drop(wallets);
    drop(writer);
    thread.stop();
}

criterion_group!(benches, bench);
criterion_main!(benches);
