//! Property test of the wallets through the library API (STYLE "Tests"): any interleaving
//! of reserve / draw / extend / settle (charges above the hold included) / release by drop /
//! top-up, from several concurrent tasks on one key spread over two threads (as over two HTTP
//! workers), keeps `balance ≥ 0` and `available = balance − held ≥ 0` at every observation and
//! conserves money exactly: initial + Σ top-ups − Σ debited == balance, in memory and in sled.
//! Requests reserve, extend and settle on their own thread under the wallet's lock, and through
//! the wallet actor's mailbox while it waits for the store (a top-up): the top-ups drawn here
//! put calls on both paths, from both threads at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use proptest::prelude::*;
use rust_decimal::Decimal;
use tollgate::ledger::{writer, LedgerRecord, LedgerWriter, Status, Store};
use tollgate::wallet::{WalletError, Wallets};

const KEY: &str = "key-props";
const BUCKET: &str = "credit";

/// Amounts are in cents: exact, and small enough that sums never lose precision.
fn cents(c: u32) -> Decimal {
    Decimal::new(i64::from(c), 2)
}

#[derive(Debug, Clone)]
enum Step {
    Draw(u32),
    Extend(u32),
}

#[derive(Debug, Clone)]
enum End {
    /// Settle for what was drawn plus `extra` (beyond the hold when large).
    Settle { extra: u32, record: bool },
    /// Settle for an arbitrary charge, unrelated to the hold.
    SettleAny(u32),
    /// Release by drop: nothing charged.
    Drop,
}

#[derive(Debug, Clone)]
enum Op {
    Hold {
        min: u32,
        want: u32,
        steps: Vec<Step>,
        end: End,
    },
    TopUp(u32),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1u32..400).prop_map(Step::Draw),
        1 => (0u32..800).prop_map(Step::Extend),
    ]
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![
        3 => (0u32..1500, any::<bool>()).prop_map(|(extra, record)| End::Settle { extra, record }),
        1 => (0u32..3000).prop_map(End::SettleAny),
        1 => Just(End::Drop),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u32..300, 0u32..1500, prop::collection::vec(step(), 0..6), end())
            .prop_map(|(min, want, steps, end)| Op::Hold { min, want, steps, end }),
        1 => (1u32..2000).prop_map(Op::TopUp),
    ]
}

fn draft(n: usize) -> LedgerRecord {
    let now = chrono::Utc::now();
    LedgerRecord {
        workspace: "ws".into(),
        key_id: KEY.into(),
        key_name: "props".into(),
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
        input_tokens: 1,
        ..LedgerRecord::empty(format!("req-{n}"), now)
    }
}

/// Invariant 2 at one observation.
async fn check_now(w: &Wallets) -> Result<(), String> {
    let s = w.snapshot(KEY).await.map_err(|e| e.to_string())?;
    let bal = s.balances.get(BUCKET).copied().unwrap_or_default();
    let held = s.held.get(BUCKET).copied().unwrap_or_default();
    if bal < Decimal::ZERO {
        return Err(format!("balance {bal} < 0"));
    }
    if held < Decimal::ZERO {
        return Err(format!("held {held} < 0"));
    }
    if held > bal {
        return Err(format!("available < 0: held {held} > balance {bal}"));
    }
    Ok(())
}

/// Runs one task's operations; returns (Σ applied top-ups, Σ debited).
async fn run_task(w: Wallets, task: usize, ops: Vec<Op>) -> Result<(Decimal, Decimal), String> {
    let (mut topped, mut debited) = (Decimal::ZERO, Decimal::ZERO);
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::TopUp(c) => {
                w.topup(KEY, BUCKET, cents(c), None)
                    .await
                    .map_err(|e| e.to_string())?;
                topped += cents(c);
            }
            Op::Hold {
                min,
                want,
                steps,
                end,
            } => {
                let (min, want) = (cents(min), cents(want));
                let rec = draft(task * 1000 + i);
                let mut hold = match w.reserve(KEY, BUCKET, min, want, &rec).await {
                    Ok(h) => h,
                    Err(WalletError::InsufficientBalance { available, .. }) => {
                        if available >= min {
                            return Err(format!("refused {min} with {available} available"));
                        }
                        check_now(&w).await?;
                        continue;
                    }
                    Err(e) => return Err(e.to_string()),
                };
                if hold.granted() < min || hold.granted() > want.max(min) {
                    return Err(format!("grant {} outside [{min}, {want}]", hold.granted()));
                }
                check_now(&w).await?;
                for s in steps {
                    match s {
                        Step::Draw(c) => {
                            let before = hold.consumed();
                            let fits = before + cents(c) <= hold.granted();
                            if hold.try_draw(cents(c), 1) != fits {
                                return Err("try_draw disagrees with the hold".into());
                            }
                        }
                        Step::Extend(c) => {
                            let g = hold.extend(cents(c)).await;
                            if g < Decimal::ZERO || g > cents(c) {
                                return Err(format!("extension {g} for {}", cents(c)));
                            }
                        }
                    }
                    if hold.consumed() > hold.granted() {
                        return Err("consumed beyond the hold".into());
                    }
                    check_now(&w).await?;
                }
                let granted = hold.granted();
                let charge = match end {
                    End::Drop => {
                        drop(hold);
                        check_now(&w).await?;
                        continue;
                    }
                    End::Settle { extra, .. } => hold.consumed() + cents(extra),
                    End::SettleAny(c) => cents(c),
                };
                let record = match end {
                    End::Settle { record: true, .. } => Some(rec),
                    _ => None,
                };
                let s = hold.settle(charge, record).await;
                if s.debited + s.shortfall != charge || s.debited < Decimal::ZERO {
                    return Err(format!("settled {s:?} for a charge of {charge}"));
                }
                if charge <= granted && !s.shortfall.is_zero() {
                    return Err(format!("shortfall {s:?} within the hold {granted}"));
                }
                debited += s.debited;
                check_now(&w).await?;
            }
        }
    }
    Ok((topped, debited))
}

fn run_case(initial: u32, tasks: Vec<Vec<Op>>) -> Result<(), String> {
    let (flush, idle) = (Duration::from_millis(10), Duration::from_secs(60));
    with_wallets(2, flush, idle, |store, writer, wallets| async move {
        let initial = cents(initial);
        wallets
            .topup(KEY, BUCKET, initial, Some("initial".into()))
            .await
            .map_err(|e| e.to_string())?;
        // Two threads, like two HTTP workers: the wallet's state is touched from both at once.
        let threads = [actix_rt::Arbiter::new(), actix_rt::Arbiter::new()];
        let handles: Vec<_> = tasks
            .into_iter()
            .enumerate()
            .map(|(t, ops)| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let run = run_task(wallets.clone(), t, ops);
                threads[t % threads.len()].spawn(async move {
                    let _ = tx.send(run.await);
                });
                rx
            })
            .collect();
        let (mut topped, mut debited) = (Decimal::ZERO, Decimal::ZERO);
        let mut failure = None;
        for h in handles {
            match h.await {
                Ok(Ok((t, d))) => {
                    topped += t;
                    debited += d;
                }
                Ok(Err(e)) => failure = Some(e),
                Err(_) => failure = Some("task panicked".to_string()),
            }
        }
        for t in &threads {
            t.stop();
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let s = wallets.snapshot(KEY).await.map_err(|e| e.to_string())?;
        let bal = s.balances.get(BUCKET).copied().unwrap_or_default();
        if s.open_holds != 0 || s.held.get(BUCKET).is_some_and(|h| !h.is_zero()) {
            return Err(format!("holds left open: {s:?}"));
        }
        if initial + topped - debited != bal {
            return Err(format!(
                "conservation: {initial} + {topped} − {debited} ≠ {bal}"
            ));
        }
        // What sled holds agrees with the actor, and no hold is left for recovery to settle.
        writer.flush().await.map_err(|e| e.to_string())?;
        let stored = store.wallet(KEY).map_err(|e| e.to_string())?.balances();
        if stored.get(BUCKET).copied().unwrap_or_default() != bal {
            return Err(format!("sled has {stored:?}, the actor {bal}"));
        }
        let left = store.holds().map_err(|e| e.to_string())?;
        if !left.is_empty() {
            return Err(format!(
                "{} persisted holds left after settlement",
                left.len()
            ));
        }
        Ok(())
    })
}

/// Runs `test` in a fresh actix System with a store in a temp dir, its writer (10 ms group
/// commit) and wallets on `shards` arbiters flushing holds every `flush` and stopping after
/// `idle`; stops them all afterwards.
fn with_wallets<T, F: std::future::Future<Output = T>>(
    shards: usize,
    flush: Duration,
    idle: Duration,
    test: impl FnOnce(Store, LedgerWriter, Wallets) -> F,
) -> T {
    let dir = tempfile::tempdir().unwrap();
    let sys = actix_rt::System::new();
    sys.block_on(async move {
        let store = Store::open(dir.path()).unwrap();
        let (writer, thread) = writer::start(store.clone(), Duration::from_millis(10)).unwrap();
        let wallets = Wallets::new(shards, writer.clone(), flush, idle);
        let out = test(store, writer, wallets.clone()).await;
        wallets.stop_all();
        drop(wallets);
        thread.stop();
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn wallet_keeps_money_exact_under_any_interleaving(
        initial in 0u32..5000,
        tasks in prop::collection::vec(prop::collection::vec(op(), 1..10), 1..5),
    ) {
        let r = run_case(initial, tasks);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// A wallet actor stops when idle; the next request starts a new one that sees every write its
/// predecessor queued (the load goes through the writer queue), so no money is lost or doubled.
#[test]
fn idle_wallet_actors_stop_and_restart_with_their_state() {
    let (flush, idle) = (Duration::from_millis(10), Duration::from_millis(200));
    with_wallets(2, flush, idle, |store, w, wallets| async move {
        wallets.topup(KEY, BUCKET, cents(1000), None).await.unwrap();
        for round in 0..3u32 {
            // Spend one cent, settled with a record, then let the actor go idle and stop.
            let hold = wallets
                .reserve(KEY, BUCKET, cents(1), cents(5), &draft(round as usize))
                .await
                .unwrap();
            let s = hold.settle(cents(1), Some(draft(round as usize))).await;
            assert_eq!(s.debited, cents(1));
            assert_eq!(wallets.actor_count(), 1);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while wallets.actor_count() > 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "actor did not stop when idle"
                );
                actix_rt::time::sleep(Duration::from_millis(20)).await;
            }
            // A fresh actor loads the state through the writer queue.
            let snap = wallets.snapshot(KEY).await.unwrap();
            assert_eq!(
                snap.balances[BUCKET],
                cents(1000 - round - 1),
                "round {round}"
            );
        }
        w.flush().await.unwrap();
        assert_eq!(store.wallet(KEY).unwrap().balances()[BUCKET], cents(997));
    });
}

/// Shutdown: once `flush_all` answers, every settlement sent before it is applied and every hold
/// still open is in the store for recovery, without waiting for a flush interval.
#[test]
fn flush_all_answers_after_queued_settlements_with_open_holds_stored() {
    // Holds are flushed only every hour: anything stored below came from `flush_all`.
    let hour = Duration::from_secs(3600);
    with_wallets(1, hour, hour, |store, w, wallets| async move {
        wallets.topup(KEY, BUCKET, cents(1000), None).await.unwrap();
        let mut open = Vec::new();
        for i in 0..10 {
            let mut hold = wallets
                .reserve(KEY, BUCKET, cents(1), cents(5), &draft(i))
                .await
                .unwrap();
            assert!(hold.try_draw(cents(2), 2));
            if i % 2 == 0 {
                // Queued, not awaited: the way a dropped stream settles.
                hold.settle_detached(cents(2), Some(draft(i)));
            } else {
                open.push(hold);
            }
        }
        assert!(wallets.flush_all(Duration::from_secs(5)).await);
        w.flush().await.unwrap();
        assert_eq!(store.wallet(KEY).unwrap().balances()[BUCKET], cents(990));
        assert_eq!(store.holds().unwrap().len(), open.len());
        drop(open);
    });
}
