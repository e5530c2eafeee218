//! Wallets: balances per settlement bucket, owned by one actor per API key (`actor.rs`), started
//! lazily on sharded arbiters (`registry.rs`). [`Wallets`] is the facade handlers use: it hides
//! the messages and retries a send that raced an idle stop. A [`Hold`] lives with the request:
//! streams draw each token's cost from it locally and only talk to the actor to extend or
//! settle it.

pub mod actor;
pub mod registry;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix::prelude::*;
use rust_decimal::Decimal;

use actor::{Extend, Inflight, Reserve, Settle, Snapshot, TopUp, WalletActor};
pub use actor::{OpenRequest, Settled, WalletSnapshot};
use registry::{Registry, Wallet};

use crate::ledger::store::Balances;
use crate::ledger::{LedgerRecord, LedgerWriter, StoreOp, TopupOutcome};

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum WalletError {
    #[error("bucket {bucket} has {available} available, {needed} needed")]
    InsufficientBalance {
        bucket: String,
        available: Decimal,
        needed: Decimal,
    },
    #[error("wallet unavailable: {0}")]
    Unavailable(String),
    /// The request itself cannot be applied (e.g. a top-up beyond what a balance can hold).
    #[error("{0}")]
    Invalid(String),
}

/// Process-unique hold ids, increasing across restarts (seeded from the clock).
fn next_hold_id() -> u64 {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    NEXT.get_or_init(|| {
        let now = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(1);
        AtomicU64::new(now << 4)
    })
    .fetch_add(1, Ordering::Relaxed)
}

#[derive(Clone)]
pub struct Wallets {
    registry: Arc<Registry>,
}

const SEND_TRIES: usize = 4;

/// How long [`Wallets::inflight`] waits for the wallet actors' answers.
const INFLIGHT_WAIT: Duration = Duration::from_secs(5);

impl Wallets {
    pub fn new(
        shards: usize,
        writer: LedgerWriter,
        flush_interval: Duration,
        idle_timeout: Duration,
    ) -> Self {
        Wallets {
            registry: Arc::new(Registry::new(shards, writer, flush_interval, idle_timeout)),
        }
    }

    async fn send<M>(&self, key_id: &str, make: impl Fn() -> M) -> Result<M::Result, WalletError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        WalletActor: Handler<M>,
    {
        self.send_to(key_id, make).await.map(|(r, _)| r)
    }

    /// Sends to the key's actor; also returns the wallet that answered.
    async fn send_to<M>(
        &self,
        key_id: &str,
        make: impl Fn() -> M,
    ) -> Result<(M::Result, Wallet), WalletError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        WalletActor: Handler<M>,
    {
        let mut last = String::new();
        for _ in 0..SEND_TRIES {
            let wallet = self.registry.wallet(key_id);
            match wallet.addr.send(make()).await {
                Ok(r) => return Ok((r, wallet)),
                // The actor stopped (idle) between lookup and send: a new one is started.
                Err(e) => last = e.to_string(),
            }
        }
        Err(WalletError::Unavailable(last))
    }

    /// Reserves between `min` and `want` in `bucket` (R4).
    pub async fn reserve(
        &self,
        key_id: &str,
        bucket: &str,
        min: Decimal,
        want: Decimal,
        draft: &LedgerRecord,
    ) -> Result<Hold, WalletError> {
        if self.registry.store_failing() {
            // Nothing may be charged or served that the ledger cannot keep.
            return Err(WalletError::Unavailable(
                "the ledger store is refusing writes; requests are refused until it writes again"
                    .into(),
            ));
        }
        let hold_id = next_hold_id();
        let drawn = Arc::new(Drawn::default());
        let reserve = || Reserve {
            hold_id,
            bucket: bucket.to_string(),
            min,
            want,
            draft: actor::encode_draft(draft),
            drawn: drawn.clone(),
            sent: std::time::Instant::now(),
        };
        // On this thread, without a message, when the wallet can serve it now.
        let wallet = self.registry.wallet(key_id);
        let m = reserve();
        let now = wallet.core.lock().try_reserve(m);
        if let Ok(granted) = now {
            return Ok(self.hold(hold_id, wallet, granted?, drawn));
        }
        // Otherwise through the actor's mailbox. If this request is dropped while the actor
        // answers (the client left), the hold the actor opens has no owner: release it then.
        let mut orphan = ReleaseOnDrop {
            wallets: self,
            key_id,
            hold_id,
            armed: true,
        };
        let (granted, wallet) = self.send_to(key_id, reserve).await?;
        orphan.armed = false;
        Ok(self.hold(hold_id, wallet, granted?, drawn))
    }

    fn hold(&self, id: u64, wallet: Wallet, granted: Decimal, drawn: Arc<Drawn>) -> Hold {
        Hold {
            id,
            wallet: Some(wallet),
            granted,
            consumed: Decimal::ZERO,
            tokens: 0,
            drawn,
            _live: LiveHold::new(&self.registry.live),
        }
    }

    pub async fn topup(
        &self,
        key_id: &str,
        bucket: &str,
        amount: Decimal,
        reference: Option<String>,
    ) -> Result<TopupOutcome, WalletError> {
        self.send(key_id, || TopUp {
            bucket: bucket.to_string(),
            amount,
            reference: reference.clone(),
        })
        .await?
    }

    /// The key's balances and holds. In a fleet, the balances are the shared store's and the
    /// holds those of every instance (this one's as they are, the others' as last persisted).
    pub async fn snapshot(&self, key_id: &str) -> Result<WalletSnapshot, WalletError> {
        let writer = self.registry.writer();
        if !writer.leases() {
            return self.send(key_id, || Snapshot).await;
        }
        // The shared figures first, then this instance's holds: holds granted since come from
        // leases that the balance read covered already, so held never exceeds that balance.
        // The holds are read as the actor published them, not through its mailbox, where the
        // view would wait behind reservations that wait for the store.
        let key = key_id.to_string();
        let shared = writer
            .ask(|reply| StoreOp::SharedWallet { key_id: key, reply })
            .await
            .map_err(|e| WalletError::Unavailable(e.to_string()))?;
        let mut snap = match self.registry.published(key_id) {
            Some((held, open_holds)) => WalletSnapshot {
                balances: Balances::new(),
                held,
                open_holds,
            },
            // No actor runs for the key here: this instance holds nothing of it.
            None => WalletSnapshot::default(),
        };
        if let Some(shared) = shared {
            for (bucket, elsewhere) in shared.held_elsewhere {
                *snap.held.entry(bucket).or_default() += elsewhere;
            }
            snap.balances = shared.balances;
        }
        Ok(snap)
    }

    /// The requests open right now (one entry per open hold), newest first; with `key_id`, only
    /// that key's. Asks each running wallet actor once (a key without one has nothing open);
    /// the figures are what the requests have drawn by the time the actor answers.
    pub async fn inflight(&self, key_id: Option<&str>) -> Result<Vec<OpenRequest>, WalletError> {
        let addrs = match key_id {
            Some(k) => self.registry.live_addr(k).into_iter().collect(),
            None => self.registry.live_addrs(),
        };
        let asks = futures_util::future::join_all(addrs.iter().map(|a| a.send(Inflight)));
        let answers = tokio::time::timeout(INFLIGHT_WAIT, asks)
            .await
            .map_err(|_| WalletError::Unavailable("the wallets did not answer in time".into()))?;
        // An actor that stopped meanwhile (idle: it had no open holds) has nothing to list.
        let mut open: Vec<OpenRequest> = answers.into_iter().flatten().flatten().collect();
        open.sort_by_key(|r| std::cmp::Reverse((r.draft.started_at, r.hold_id)));
        Ok(open)
    }

    pub fn actor_count(&self) -> usize {
        self.registry.actor_count()
    }

    pub fn stop_all(&self) {
        self.registry.stop_all();
    }

    /// Waits until every hold handed out has sent its settlement (or release) to its wallet, or
    /// `limit` passes; answers whether they all did. At shutdown, connections (and the streams
    /// in them) may be dropped after the listeners report stopped: their settlements must reach
    /// the wallets before the wallets flush and the writer stops.
    pub async fn wait_settled(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.registry.live.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Holds handed out whose settlement has not been sent yet.
    pub fn live_holds(&self) -> usize {
        self.registry.live.load(Ordering::Acquire)
    }

    /// See [`registry::Registry::flush_all`].
    pub async fn flush_all(&self, limit: Duration) -> bool {
        self.registry.flush_all(limit).await
    }
}

/// Releases a hold whose reservation was abandoned before its answer arrived.
struct ReleaseOnDrop<'a> {
    wallets: &'a Wallets,
    key_id: &'a str,
    hold_id: u64,
    armed: bool,
}

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            // An unknown hold (never opened, e.g. the reservation was refused) makes this a no-op.
            self.wallets.registry.addr(self.key_id).do_send(Settle {
                hold_id: self.hold_id,
                charge: Decimal::ZERO,
                record: None,
                reply: None,
            });
        }
    }
}

/// What a hold has spent so far, as a crash would bill it: written by the request once what it
/// drew has left for the upstream (the input) or the client (paid output), read by the wallet
/// actor at every flush to persist the consumption of open holds (R9) without a message per
/// token.
#[derive(Debug, Default)]
pub struct Drawn(parking_lot::Mutex<(Decimal, u64)>);

impl Drawn {
    /// (amount, output tokens) drawn so far.
    pub fn get(&self) -> (Decimal, u64) {
        *self.0.lock()
    }
    fn set(&self, amount: Decimal, tokens: u64) {
        *self.0.lock() = (amount, tokens);
    }
}

/// A reservation held by one request attempt. Draws are local; `extend` and `settle` are the
/// only calls to the wallet (on the request's thread, or as messages when its actor waits for
/// the store). Dropping an unsettled hold releases it without a charge.
pub struct Hold {
    id: u64,
    wallet: Option<Wallet>,
    granted: Decimal,
    consumed: Decimal,
    tokens: u64,
    drawn: Arc<Drawn>,
    /// Counts this hold as live until it is dropped, which is after its final message was sent
    /// (fields drop after `Drop::drop`).
    _live: LiveHold,
}

/// One live hold in the registry's count (see [`Wallets::wait_settled`]).
struct LiveHold(Arc<AtomicUsize>);

impl LiveHold {
    fn new(count: &Arc<AtomicUsize>) -> LiveHold {
        count.fetch_add(1, Ordering::AcqRel);
        LiveHold(count.clone())
    }
}

impl Drop for LiveHold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Hold {
    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn granted(&self) -> Decimal {
        self.granted
    }
    pub fn consumed(&self) -> Decimal {
        self.consumed
    }
    pub fn remaining(&self) -> Decimal {
        self.granted - self.consumed
    }

    /// Takes `amount` from the hold if it covers it.
    #[inline]
    pub fn try_draw(&mut self, amount: Decimal, tokens: u64) -> bool {
        let (Some(consumed), Some(total)) = (
            self.consumed.checked_add(amount),
            self.tokens.checked_add(tokens),
        ) else {
            return false;
        };
        if amount.is_sign_negative() || consumed > self.granted {
            return false;
        }
        self.consumed = consumed;
        self.tokens = total;
        true
    }

    /// Publishes everything drawn so far as the hold's consumption, which the wallet persists at
    /// its next flush and a crash recovery bills (R9). A draw pays for output *before* it is
    /// forwarded, and a stream may hold paid output back (coalescing, or waiting for an
    /// extension): publish only once that output has been handed to the client, so that an
    /// `interrupted` record never bills tokens the client did not receive (F1).
    pub fn publish_drawn(&self) {
        self.drawn.set(self.consumed, self.tokens);
    }

    /// Asks the wallet for up to `want` more. Returns the grant.
    pub async fn extend(&mut self, want: Decimal) -> Decimal {
        let Some(wallet) = &self.wallet else {
            return Decimal::ZERO;
        };
        let m = Extend {
            hold_id: self.id,
            want,
        };
        let now = wallet.core.lock().try_extend(m);
        let grant = match now {
            Ok(grant) => grant,
            Err(m) => wallet.addr.send(m).await.unwrap_or(Decimal::ZERO),
        };
        match self.granted.checked_add(grant) {
            Some(g) => {
                self.granted = g;
                grant
            }
            // Cannot happen (the wallet grants from a balance that fits); keep what we had.
            None => Decimal::ZERO,
        }
    }

    /// Settles the hold: debits `charge` and commits `record` (if any) in the same batch.
    pub async fn settle(mut self, charge: Decimal, record: Option<LedgerRecord>) -> Settled {
        let Some(wallet) = self.wallet.take() else {
            return Settled {
                debited: Decimal::ZERO,
                shortfall: charge,
            };
        };
        let m = Settle {
            hold_id: self.id,
            charge,
            record: record.map(Box::new),
            reply: None,
        };
        let now = wallet.core.lock().try_settle(m);
        let mut m = match now {
            Ok(settled) => return settled,
            Err(m) => m,
        };
        if self.covers(charge) {
            // The hold covers the charge, so the wallet will debit exactly `charge` (its balance
            // covers every grant): no need to wait for the actor's answer on the request path.
            // The actor still applies it, and commits the record, in mailbox order.
            wallet.addr.do_send(m);
            return Settled {
                debited: charge,
                shortfall: Decimal::ZERO,
            };
        }
        // Queued unconditionally (a full mailbox does not refuse it) before we wait: once this
        // line has run, the settlement no longer depends on this request staying alive.
        let (tx, rx) = tokio::sync::oneshot::channel();
        m.reply = Some(tx);
        wallet.addr.do_send(m);
        match rx.await {
            Ok(s) => s,
            Err(_) => Settled {
                debited: Decimal::ZERO,
                shortfall: charge,
            },
        }
    }

    /// Does the hold pay all of `charge`? Then the wallet debits exactly `charge`.
    fn covers(&self, charge: Decimal) -> bool {
        charge >= Decimal::ZERO && charge <= self.granted
    }

    /// [`Hold::settle`] for a caller that still needs the settled record: `seal` sees it with its
    /// final cost and shortfall before it is written. When the hold covers the charge (the usual
    /// case) that cost is known here, so `seal` runs first and the record then moves to the wallet
    /// without a copy; otherwise `seal` runs on a copy, after the wallet's answer.
    pub async fn settle_sealed<T>(
        self,
        charge: Decimal,
        mut record: LedgerRecord,
        seal: impl FnOnce(&LedgerRecord) -> T,
    ) -> T {
        if self.covers(charge) {
            record.cost = charge.normalize();
            record.shortfall = Decimal::ZERO;
            let sealed = seal(&record);
            self.settle_detached(charge, Some(record));
            return sealed;
        }
        let settled = self.settle(charge, Some(record.clone())).await;
        record.cost = settled.debited.normalize();
        record.shortfall = settled.shortfall.normalize();
        seal(&record)
    }

    /// Settles without waiting for the answer (used from `Drop` paths). The message, when one
    /// is needed, is queued even when the mailbox is full.
    pub fn settle_detached(mut self, charge: Decimal, record: Option<LedgerRecord>) {
        if let Some(wallet) = self.wallet.take() {
            settle_now_or_send(&wallet, self.id, charge, record);
        }
    }
}

/// Settles on this thread when the wallet can, else queues the settlement in its mailbox.
fn settle_now_or_send(
    wallet: &Wallet,
    hold_id: u64,
    charge: Decimal,
    record: Option<LedgerRecord>,
) {
    let m = Settle {
        hold_id,
        charge,
        record: record.map(Box::new),
        reply: None,
    };
    let now = wallet.core.lock().try_settle(m);
    if let Err(m) = now {
        wallet.addr.do_send(m);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(wallet) = self.wallet.take() {
            settle_now_or_send(&wallet, self.id, Decimal::ZERO, None);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::ledger::{writer, Store};
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    /// Runs `test` in a fresh actix System on a store whose writer (flush interval `flush`, also
    /// the wallets' hold flush) fails its next fsync when the flag is set; stops it all after.
    fn with_sync_fault<F: std::future::Future<Output = ()>>(
        flush: Duration,
        test: impl FnOnce(Store, LedgerWriter, Arc<AtomicBool>, Wallets) -> F,
    ) {
        let dir = tempfile::tempdir().unwrap();
        actix_rt::System::new().block_on(async move {
            let store = Store::open(dir.path()).unwrap();
            let (w, thread, fail) = writer::start_with_sync_fault(store.clone(), flush).unwrap();
            let wallets = Wallets::new(1, w.clone(), flush, Duration::from_secs(60));
            test(store, w, fail, wallets.clone()).await;
            wallets.stop_all();
            drop(wallets);
            thread.stop();
        });
    }

    /// A top-up whose fsync fails after its batch was applied answers an error, yet it is in
    /// the store: the wallet must take it over, or its next settlement writes it away while
    /// the reference stays recorded (a retry then finds it "already applied").
    #[test]
    fn a_top_up_whose_fsync_failed_is_not_written_away() {
        let flush = Duration::from_millis(10);
        with_sync_fault(flush, |store, w, fail, wallets| async move {
            let d = Decimal::from;
            wallets
                .topup("k", "credit", d(10), Some("a".into()))
                .await
                .unwrap();
            fail.store(true, SeqCst);
            assert!(wallets
                .topup("k", "credit", d(5), Some("b".into()))
                .await
                .is_err());
            assert!(!fail.load(SeqCst), "the injected fault was used");
            assert_eq!(
                wallets.snapshot("k").await.unwrap().balances["credit"],
                d(15)
            );
            // Reservations wait for the retried fsync (see the next test).
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while w.failing() {
                assert!(std::time::Instant::now() < deadline, "fsync not retried");
                actix_rt::time::sleep(Duration::from_millis(5)).await;
            }
            let draft = LedgerRecord::empty("req-1".into(), chrono::Utc::now());
            let hold = wallets
                .reserve("k", "credit", d(1), d(1), &draft)
                .await
                .unwrap();
            assert_eq!(hold.settle(d(1), Some(draft)).await.debited, d(1));
            // Answered after the settlement (mailbox order), which the actor has then queued
            // with the writer; the flush comes after it.
            assert_eq!(
                wallets.snapshot("k").await.unwrap().balances["credit"],
                d(14)
            );
            w.flush().await.unwrap();
            assert_eq!(store.wallet("k").unwrap().balances()["credit"], d(14));
            // The client's retry with the same reference finds it applied.
            let again = wallets
                .topup("k", "credit", d(5), Some("b".into()))
                .await
                .unwrap();
            assert_eq!(again, TopupOutcome::Duplicate);
        });
    }

    /// While the store refuses writes nothing new is reserved (so nothing is served that the
    /// ledger cannot keep); the writer tries the fsync again and requests pass once it works.
    #[test]
    fn reservations_wait_for_a_store_that_writes() {
        // A 2 s interval: the failed fsync is tried again 1 s later.
        let flush = Duration::from_secs(2);
        with_sync_fault(flush, |_, w, fail, wallets| async move {
            let d = Decimal::from;
            wallets.topup("k", "credit", d(10), None).await.unwrap();
            assert!(!w.failing());
            fail.store(true, SeqCst);
            assert!(wallets.topup("k", "credit", d(1), None).await.is_err());
            assert!(w.failing());
            let draft = LedgerRecord::empty("req-1".into(), chrono::Utc::now());
            match wallets.reserve("k", "credit", d(1), d(1), &draft).await {
                Err(WalletError::Unavailable(m)) => assert!(m.contains("refusing writes"), "{m}"),
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("reserved while the store refuses writes"),
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while w.failing() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the fsync was not retried"
                );
                actix_rt::time::sleep(Duration::from_millis(20)).await;
            }
            let hold = wallets
                .reserve("k", "credit", d(1), d(1), &draft)
                .await
                .unwrap();
            assert_eq!(hold.settle(d(1), Some(draft)).await.debited, d(1));
        });
    }

    /// Runs `test` with wallets on a fresh store (10 ms flush); stops it all after.
    fn with_wallets<F: std::future::Future<Output = ()>>(
        test: impl FnOnce(Store, LedgerWriter, Wallets) -> F,
    ) {
        let dir = tempfile::tempdir().unwrap();
        actix_rt::System::new().block_on(async move {
            let store = Store::open(dir.path()).unwrap();
            let flush = Duration::from_millis(10);
            let (w, thread) = writer::start(store.clone(), flush).unwrap();
            let wallets = Wallets::new(1, w.clone(), flush, Duration::from_secs(60));
            test(store, w, wallets.clone()).await;
            wallets.stop_all();
            drop(wallets);
            thread.stop();
        });
    }

    fn draft(id: &str) -> LedgerRecord {
        let mut r = LedgerRecord::empty(id.into(), chrono::Utc::now());
        r.bucket = Some("credit".into());
        r
    }

    /// R40: a top-up beyond what a balance can hold is refused as invalid; the actor (and the
    /// hold a stream keeps on it) lives on, and the hold settles exactly. (It overflowed
    /// `Decimal` in the actor, which panicked: the hold's settlement went to the dead actor
    /// and its successor could reserve the held money again.)
    #[test]
    fn an_overflowing_top_up_is_refused_and_the_open_hold_still_settles() {
        with_wallets(|store, w, wallets| async move {
            let d = Decimal::from;
            wallets.topup("k", "credit", d(10), None).await.unwrap();
            let mut hold = wallets
                .reserve("k", "credit", d(1), d(4), &draft("req-1"))
                .await
                .unwrap();
            assert!(hold.try_draw(d(2), 2));
            match wallets.topup("k", "credit", Decimal::MAX, None).await {
                Err(WalletError::Invalid(m)) => assert!(m.contains("beyond"), "{m}"),
                other => panic!("{other:?}"),
            }
            let snap = wallets.snapshot("k").await.unwrap();
            assert_eq!(snap.balances["credit"], d(10));
            assert_eq!(snap.held["credit"], d(4), "the open hold is still held");
            assert_eq!(hold.settle(d(3), Some(draft("req-1"))).await.debited, d(3));
            let snap = wallets.snapshot("k").await.unwrap();
            assert_eq!(snap.balances["credit"], d(7));
            assert_eq!(snap.open_holds, 0);
            w.flush().await.unwrap();
            assert_eq!(store.wallet("k").unwrap().balances()["credit"], d(7));
            assert_eq!(store.record("req-1").unwrap().unwrap().cost, d(3));
        });
    }

    /// R40: a handler that fails (a bug) does not take the actor down with its holds: they are
    /// kept, persisted at once with what they drew, and settle as usual afterwards.
    #[test]
    fn a_failing_handler_keeps_and_persists_the_open_holds() {
        with_wallets(|store, w, wallets| async move {
            let d = Decimal::from;
            wallets.topup("k", "credit", d(10), None).await.unwrap();
            let mut hold = wallets
                .reserve("k", "credit", d(1), d(5), &draft("req-2"))
                .await
                .unwrap();
            assert!(hold.try_draw(d(3), 3));
            hold.publish_drawn();
            let addr = wallets.registry.addr("k");
            assert!(!addr.send(actor::seams::Explode).await.unwrap());
            w.barrier().await.unwrap();
            let persisted = store.holds().unwrap();
            assert_eq!(persisted.len(), 1);
            assert_eq!(persisted[0].consumed, d(3));
            assert_eq!(persisted[0].consumed_tokens, 3);
            // The same actor answers, with the hold still open.
            assert_eq!(wallets.snapshot("k").await.unwrap().held["credit"], d(5));
            assert!(wallets.registry.addr("k") == addr);
            assert_eq!(hold.settle(d(3), Some(draft("req-2"))).await.debited, d(3));
            // Answered after the settlement (mailbox order); the flush comes after it.
            assert_eq!(wallets.snapshot("k").await.unwrap().open_holds, 0);
            w.flush().await.unwrap();
            assert_eq!(store.wallet("k").unwrap().balances()["credit"], d(7));
            assert!(store.holds().unwrap().is_empty());
        });
    }

    /// R9: an open hold's consumption reaches the store at every flush, without a message:
    /// the draws a request makes locally and publishes are what a crash recovery bills.
    #[test]
    fn open_holds_persist_what_they_drew_at_every_flush() {
        with_wallets(|store, w, wallets| async move {
            let d = Decimal::from;
            wallets.topup("k", "credit", d(100), None).await.unwrap();
            let mut hold = wallets
                .reserve("k", "credit", d(1), d(50), &draft("req-3"))
                .await
                .unwrap();
            let persisted = |amount: Decimal, tokens: u64| {
                let store = store.clone();
                async move {
                    let deadline = std::time::Instant::now() + Duration::from_secs(5);
                    loop {
                        let h = store.holds().unwrap();
                        if h.len() == 1 && (h[0].consumed, h[0].consumed_tokens) == (amount, tokens)
                        {
                            return;
                        }
                        assert!(
                            std::time::Instant::now() < deadline,
                            "not persisted: {h:?}, want {amount} / {tokens}"
                        );
                        actix_rt::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            };
            assert!(hold.try_draw(d(2), 0)); // the input
            hold.publish_drawn();
            persisted(d(2), 0).await;
            for _ in 0..7 {
                assert!(hold.try_draw(d(1), 1));
            }
            hold.publish_drawn();
            persisted(d(9), 7).await;
            assert!(hold.try_draw(d(1), 1));
            hold.publish_drawn();
            persisted(d(10), 8).await;
            // A hold that never drew is persisted whole once, and has no consumption entry.
            let idle = wallets
                .reserve("k", "credit", d(1), d(5), &draft("req-3b"))
                .await
                .unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while store.holds().unwrap().len() < 2 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the idle hold not persisted"
                );
                actix_rt::time::sleep(Duration::from_millis(5)).await;
            }
            // Settling both leaves nothing of either on disk.
            hold.settle(d(10), Some(draft("req-3"))).await;
            idle.settle(d(1), Some(draft("req-3b"))).await;
            wallets.snapshot("k").await.unwrap();
            w.flush().await.unwrap();
            assert_eq!(store.holds().unwrap(), vec![]);
            assert_eq!(store.db().scan_prefix(b"h/").count(), 0);
            assert_eq!(store.db().scan_prefix(b"c/").count(), 0);
            assert_eq!(store.record("req-3").unwrap().unwrap().cost, d(10));
        });
    }

    /// F1 after a crash: output paid from the hold but not yet handed to the client (a stream
    /// coalescing a burst, or waiting for an extension with paid tokens in its buffer) is not
    /// persisted, so a recovery never bills it; it is once the stream publishes it.
    #[test]
    fn paid_output_not_yet_forwarded_is_not_persisted() {
        with_wallets(|store, w, wallets| async move {
            let d = Decimal::from;
            wallets.topup("k", "credit", d(100), None).await.unwrap();
            let mut hold = wallets
                .reserve("k", "credit", d(1), d(50), &draft("req-5"))
                .await
                .unwrap();
            let persisted = || async {
                // Every wallet flushes its open holds, then the writer commits them.
                assert!(wallets.flush_all(Duration::from_secs(5)).await);
                w.flush().await.unwrap();
                let h = store.holds().unwrap();
                assert_eq!(h.len(), 1, "{h:?}");
                (h[0].consumed, h[0].consumed_tokens)
            };
            assert!(hold.try_draw(d(2), 0));
            hold.publish_drawn();
            assert_eq!(persisted().await, (d(2), 0));
            // 31 tokens paid, still in the stream's buffer.
            for _ in 0..31 {
                assert!(hold.try_draw(d(1), 1));
            }
            assert_eq!(
                persisted().await,
                (d(2), 0),
                "billed before it was forwarded"
            );
            hold.publish_drawn();
            assert_eq!(persisted().await, (d(33), 31));
            drop(hold);
        });
    }

    /// A settlement sent while the wallet's mailbox is full, whose sender then leaves (the
    /// client disconnected), is still applied: it is queued before the sender waits.
    #[test]
    fn a_settlement_whose_sender_leaves_while_the_mailbox_is_full_is_applied() {
        with_wallets(|store, w, wallets| async move {
            let d = Decimal::from;
            wallets.topup("k", "credit", d(10), None).await.unwrap();
            let mut hold = wallets
                .reserve("k", "credit", d(1), d(1), &draft("req-4"))
                .await
                .unwrap();
            let wallet = wallets.registry.wallet("k");
            let addr = wallet.addr.clone();
            addr.do_send(actor::seams::Block(Duration::from_millis(300)));
            // Until the actor is busy, the hold's calls do not go through its mailbox.
            while !wallet.core.lock().waits() {
                std::thread::yield_now();
            }
            for _ in 0..5000 {
                addr.do_send(Snapshot);
            }
            // An extension queued while the mailbox is over capacity leaves the hold's address
            // parked; its answer is not awaited (the wait is cancelled).
            let _ = actix_rt::time::timeout(Duration::from_millis(1), hold.extend(d(1))).await;
            // The charge is above the hold, so the settlement waits for the wallet's answer;
            // that wait is cancelled too.
            let settle = hold.settle(d(3), Some(draft("req-4")));
            assert!(actix_rt::time::timeout(Duration::from_millis(20), settle)
                .await
                .is_err());
            let snap = wallets.snapshot("k").await.unwrap();
            assert_eq!(snap.balances["credit"], d(7), "the settlement was lost");
            assert_eq!(snap.open_holds, 0);
            w.flush().await.unwrap();
            assert_eq!(store.record("req-4").unwrap().unwrap().cost, d(3));
        });
    }

    /// A reservation abandoned while the actor answers it (the client left mid-reserve, while
    /// the wallet waited for the store so the reservation went through its mailbox) must not
    /// leave an open hold behind: it would lock the money and keep the actor from going idle.
    #[test]
    fn an_abandoned_reservation_releases_its_hold() {
        with_wallets(|_, _, wallets| async move {
            let d = Decimal::from;
            wallets.topup("k", "credit", d(1000), None).await.unwrap();
            let wallet = wallets.registry.wallet("k");
            wallet
                .addr
                .do_send(actor::seams::Block(Duration::from_millis(200)));
            while !wallet.core.lock().waits() {
                std::thread::yield_now();
            }
            for i in 0..20 {
                let draft = draft(&format!("req-a{i}"));
                let mut r = Box::pin(wallets.reserve("k", "credit", d(1), d(5), &draft));
                // Polled once: the reservation is queued behind the busy actor, then dropped.
                assert!(futures_util::FutureExt::now_or_never(&mut r).is_none());
                drop(r);
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let snap = wallets.snapshot("k").await.unwrap();
                if snap.open_holds == 0 {
                    assert_eq!(snap.held.get("credit"), None);
                    assert_eq!(snap.balances["credit"], d(1000));
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{} holds left open",
                    snap.open_holds
                );
                actix_rt::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    /// Requests reserve and settle on their own thread while the actor is free: no message, so
    /// a reservation answers at its first poll and its settlement is applied when it returns,
    /// even with the actor's thread blocked right after.
    #[test]
    fn a_free_wallet_serves_reservations_and_settlements_on_the_callers_thread() {
        with_wallets(|store, w, wallets| async move {
            let d = Decimal::from;
            wallets.topup("k", "credit", d(10), None).await.unwrap();
            let draft = draft("req-direct");
            let mut r = Box::pin(wallets.reserve("k", "credit", d(1), d(4), &draft));
            let mut hold = futures_util::FutureExt::now_or_never(&mut r)
                .expect("the reservation waited for the actor")
                .unwrap();
            drop(r);
            assert!(hold.try_draw(d(3), 3));
            let wallet = wallets.registry.wallet("k");
            // Blocks the actor's thread (not its state) for a while.
            wallet
                .addr
                .do_send(actor::seams::Sleep(Duration::from_millis(300)));
            let extended = futures_util::FutureExt::now_or_never(hold.extend(d(2)))
                .expect("the extension waited for the actor");
            assert_eq!(extended, d(2));
            let settled = futures_util::FutureExt::now_or_never(hold.settle(d(5), Some(draft)))
                .expect("the settlement waited for the actor");
            assert_eq!(settled.debited, d(5));
            let (balance, held) = {
                let c = wallet.core.lock();
                (c.balance("credit"), c.held("credit"))
            };
            assert_eq!(balance, d(5));
            assert_eq!(held, Decimal::ZERO);
            w.flush().await.unwrap();
            assert_eq!(store.record("req-direct").unwrap().unwrap().cost, d(5));
            assert_eq!(store.wallet("k").unwrap().balances()["credit"], d(5));
        });
    }

    /// Shutdown waits for this: a hold counts as live until its settlement was sent.
    #[test]
    fn holds_count_as_live_until_their_settlement_is_sent() {
        with_wallets(|_, _, wallets| async move {
            let d = Decimal::from;
            wallets.topup("k", "credit", d(10), None).await.unwrap();
            let a = wallets
                .reserve("k", "credit", d(1), d(1), &draft("req-5"))
                .await
                .unwrap();
            let b = wallets
                .reserve("k", "credit", d(1), d(1), &draft("req-6"))
                .await
                .unwrap();
            assert_eq!(wallets.live_holds(), 2);
            assert!(!wallets.wait_settled(Duration::from_millis(20)).await);
            a.settle_detached(d(1), Some(draft("req-5")));
            assert_eq!(wallets.live_holds(), 1);
            drop(b);
            assert!(wallets.wait_settled(Duration::from_millis(20)).await);
        });
    }

    /// A batch whose commit fails is kept and committed once the store writes again, while
    /// new reservations are refused; a top-up tried meanwhile is not applied and does not take
    /// the store's stale balances over the debit it has not written yet.
    #[test]
    fn a_batch_that_fails_to_commit_is_kept_until_it_is_written() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        actix_rt::System::new().block_on(async move {
            let d = Decimal::from;
            let store = Store::open(dir.path()).unwrap();
            let flush = Duration::from_millis(10);
            let (w, thread, faults) = writer::start_with_faults(store.clone(), flush).unwrap();
            let wallets = Wallets::new(1, w.clone(), flush, Duration::from_secs(60));
            wallets.topup("k", "credit", d(10), None).await.unwrap();
            let commits = faults.commits.clone().unwrap();
            commits.store(u32::MAX, SeqCst);
            let hold = wallets
                .reserve("k", "credit", d(1), d(2), &draft("req-7"))
                .await
                .unwrap();
            assert_eq!(hold.settle(d(2), Some(draft("req-7"))).await.debited, d(2));
            assert_eq!(
                wallets.snapshot("k").await.unwrap().balances["credit"],
                d(8)
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !w.failing() {
                assert!(std::time::Instant::now() < deadline, "commit never failed");
                actix_rt::time::sleep(Duration::from_millis(5)).await;
            }
            match wallets
                .reserve("k", "credit", d(1), d(1), &draft("req-8"))
                .await
            {
                Err(WalletError::Unavailable(_)) => {}
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("reserved while the store refuses writes"),
            }
            assert!(wallets.topup("k", "credit", d(5), None).await.is_err());
            assert_eq!(
                wallets.snapshot("k").await.unwrap().balances["credit"],
                d(8),
                "the wallet took the store's balances over its unwritten debit"
            );
            assert_eq!(store.record("req-7").unwrap(), None);
            commits.store(0, SeqCst);
            while w.failing() {
                assert!(std::time::Instant::now() < deadline, "never recovered");
                actix_rt::time::sleep(Duration::from_millis(5)).await;
            }
            w.flush().await.unwrap();
            assert_eq!(store.wallet("k").unwrap().balances()["credit"], d(8));
            assert_eq!(store.record("req-7").unwrap().unwrap().cost, d(2));
            wallets.topup("k", "credit", d(5), None).await.unwrap();
            assert_eq!(store.wallet("k").unwrap().balances()["credit"], d(13));
            wallets.stop_all();
            drop(wallets);
            thread.stop();
        });
    }
}
