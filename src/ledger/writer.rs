//! The ledger writer: one thread that owns every write to sled. Operations arrive on a bounded
//! channel in the order their senders issued them; the writer applies what has queued up as one
//! sled batch (group commit) and fsyncs at least every half flush interval while dirty, so a
//! request that finished more than `flush_interval_ms` before a crash has its record on disk.
//! Wallet loads go through the same queue, so a wallet actor started after an idle stop sees
//! every write its predecessor queued.

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tokio::sync::oneshot;

use super::record::LedgerRecord;
use super::rollup::RollupDelta;
use super::store::*;

/// How a top-up went.
#[derive(Debug, Clone, PartialEq)]
pub enum TopupOutcome {
    Applied,
    /// The reference was applied before with the same bucket and amount: nothing changed.
    Duplicate,
    /// The reference was applied before with another bucket or amount.
    Conflict(TopupRef),
}

/// A lease on part of a bucket's balance, granted to this instance by a shared store
/// (`lease_epoch` names the instance's registration it belongs to, see [`LedgerWriter::epoch`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseGrant {
    pub amount: Decimal,
    pub epoch: u64,
    /// What other instances lease of the bucket right now (zero without leases).
    pub elsewhere: Decimal,
}

/// What a settlement took from the balance: the store that keeps balances itself (PostgreSQL)
/// applies the debit; sled writes the wallet's `balances` instead.
#[derive(Debug, Clone, PartialEq)]
pub struct Debit {
    pub bucket: String,
    pub amount: Decimal,
    /// The charge asked for (the record's cost plus its shortfall).
    pub charge: Decimal,
    /// The lease epoch the hold was granted under.
    pub epoch: u64,
}

pub enum StoreOp {
    /// A request's settlement: the wallet's balances after the debit, the hold it closes and the
    /// record that explains it, in one atomic batch.
    Settle {
        key_id: String,
        balances: Balances,
        debit: Debit,
        hold_id: Option<u64>,
        /// The hold's consumption was persisted apart (a `c/` entry) at least once.
        drew: bool,
        record: Option<Box<LedgerRecord>>,
    },
    /// Leases more of `bucket` to this instance: `need` if the balance no lease covers has it,
    /// up to `want` as long as that leaves half of it to the other instances; never more than
    /// that balance. Stores without leases answer zero: the wallet actor holds the whole
    /// balance already.
    Lease {
        key_id: String,
        bucket: String,
        need: Decimal,
        want: Decimal,
        reply: oneshot::Sender<Result<LeaseGrant, StoreError>>,
    },
    /// Returns `amount` of this instance's lease on `bucket` to the balance (unused lease of an
    /// idle key). A no-op without leases.
    ReleaseLease {
        key_id: String,
        bucket: String,
        amount: Decimal,
        epoch: u64,
    },
    /// The balances and the amounts held by other instances, as the shared store has them
    /// (`None` from a store that one process owns: its wallet actor knows it all).
    SharedWallet {
        key_id: String,
        reply: oneshot::Sender<Result<Option<SharedWallet>, StoreError>>,
    },
    /// A record without a wallet change (rejected requests).
    Record(Box<LedgerRecord>),
    /// A fallback record, written only if the request has no record yet: a settlement's
    /// record for the same request always wins, whichever arrives first.
    RecordIfAbsent(Box<LedgerRecord>),
    /// Open holds for crash recovery (R9): new ones whole, known ones by their consumption.
    Holds {
        new: Vec<NewHold>,
        drawn: Vec<HoldDrawn>,
    },
    TopUp {
        key_id: String,
        bucket: String,
        amount: Decimal,
        reference: Option<String>,
        balances_after: Balances,
        reply: oneshot::Sender<Result<TopupOutcome, StoreError>>,
    },
    PutKey {
        record: Box<ApiKeyRecord>,
        bootstrap_name: Option<String>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    LoadWallet {
        key_id: String,
        reply: oneshot::Sender<Result<WalletState, StoreError>>,
    },
    /// Durability barrier: answers once everything sent before it is on disk.
    Flush(oneshot::Sender<Result<(), StoreError>>),
    /// Visibility barrier: answers once everything sent before it is committed (readable),
    /// without waiting for the disk.
    Barrier(oneshot::Sender<Result<(), StoreError>>),
    /// Deletes ledger records that started before the cutoff (retention).
    Prune {
        before_micros: u64,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
}

/// A wallet as a shared store sees it: every instance's debits, and the holds other instances
/// keep open (as they last persisted them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SharedWallet {
    pub balances: Balances,
    pub held_elsewhere: Balances,
}

/// Sends operations to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct LedgerWriter {
    tx: SyncSender<Msg>,
    /// Set while the store refuses writes: from a failed commit or fsync until an fsync
    /// succeeds again.
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Set when wallet actors spend leases from a shared store instead of whole balances.
    leases: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

pub(crate) enum Msg {
    Op(StoreOp),
    Stop,
}

pub struct WriterThread {
    handle: Option<JoinHandle<()>>,
    tx: SyncSender<Msg>,
}

/// The channel between the wallets and a writer thread of another backend: the senders' side,
/// and the receiver that backend's thread reads. `leases` is the backend's lease epoch, for a
/// store whose wallets spend leases (see [`LedgerWriter::epoch`]).
pub(crate) fn channel(
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    leases: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
) -> (LedgerWriter, SyncSender<Msg>, Receiver<Msg>) {
    let (tx, rx) = sync_channel(QUEUE);
    (
        LedgerWriter {
            tx: tx.clone(),
            failing,
            leases,
        },
        tx,
        rx,
    )
}

impl WriterThread {
    /// Wraps another backend's writer thread, stopped through the same channel.
    pub(crate) fn new(handle: JoinHandle<()>, tx: SyncSender<Msg>) -> WriterThread {
        WriterThread {
            handle: Some(handle),
            tx,
        }
    }
}

impl WriterThread {
    /// Flushes everything queued and stops the thread.
    pub fn stop(mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.tx.send(Msg::Stop);
            let _ = h.join();
        }
    }
}

/// Operations the writer may be behind before senders wait. The channel is a ring of this many
/// slots of one `Msg` (about 150 bytes) each, allocated at start and all resident once the ring
/// has gone round: 16,384 slots are 2.3 MiB (65,536 were 9 MiB of the idle gateway's memory),
/// and still four full group-commit batches of slack.
const QUEUE: usize = 16_384;
const MAX_BATCH: usize = 4096;

pub fn start(
    store: Store,
    flush_interval: Duration,
) -> Result<(LedgerWriter, WriterThread), StoreError> {
    spawn(store, flush_interval, Faults::default())
}

/// Test seams for a disk that refuses writes (running as root, the tests cannot make a real one
/// fail): `sync`, while set, makes the next fsync fail after its batch was applied (the store's
/// contents then are as after the batch; only durability is unknown); `commits` is the number
/// of coming batch commits that fail before anything of them is applied.
#[derive(Clone, Default)]
pub(crate) struct Faults {
    pub sync: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    pub commits: Option<std::sync::Arc<std::sync::atomic::AtomicU32>>,
}

impl Faults {
    fn refuse_sync(&self) -> bool {
        self.sync
            .as_ref()
            .is_some_and(|f| f.swap(false, std::sync::atomic::Ordering::SeqCst))
    }
    fn refuse_commit(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.commits
            .as_ref()
            .is_some_and(|n| n.fetch_update(SeqCst, SeqCst, |v| v.checked_sub(1)).is_ok())
    }
}

/// A writer with both fault seams armed off; the caller sets them.
#[cfg(test)]
pub(crate) fn start_with_faults(
    store: Store,
    flush_interval: Duration,
) -> Result<(LedgerWriter, WriterThread, Faults), StoreError> {
    let faults = Faults {
        sync: Some(Default::default()),
        commits: Some(Default::default()),
    };
    let (w, t) = spawn(store, flush_interval, faults.clone())?;
    Ok((w, t, faults))
}

#[cfg(test)]
pub(crate) fn start_with_sync_fault(
    store: Store,
    flush_interval: Duration,
) -> Result<
    (
        LedgerWriter,
        WriterThread,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    ),
    StoreError,
> {
    let (w, t, faults) = start_with_faults(store, flush_interval)?;
    Ok((w, t, faults.sync.unwrap_or_default()))
}

fn spawn(
    store: Store,
    flush_interval: Duration,
    fault: Faults,
) -> Result<(LedgerWriter, WriterThread), StoreError> {
    let (tx, rx) = sync_channel(QUEUE);
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health = failing.clone();
    // Taken before any operation can be sent: every id issued from now on is this run's.
    let replaceable = Replaceable::new();
    let handle = std::thread::Builder::new()
        .name("tollgate-ledger-writer".into())
        .spawn(move || run(store, rx, flush_interval, fault, replaceable, &health))
        .map_err(|e| StoreError::DataDir {
            path: "writer thread".into(),
            err: e.to_string(),
        })?;
    Ok((
        LedgerWriter {
            tx: tx.clone(),
            failing,
            leases: None,
        },
        WriterThread {
            handle: Some(handle),
            tx,
        },
    ))
}

impl LedgerWriter {
    /// Whether the store is refusing writes (a commit or fsync failed, and no fsync has
    /// succeeded since). New billable work is refused meanwhile, so that nothing is charged or
    /// served that the ledger cannot keep.
    pub fn failing(&self) -> bool {
        self.failing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether wallet actors spend leases on a shared store (a fleet) rather than the whole
    /// balance (one process and its sled store).
    pub fn leases(&self) -> bool {
        self.leases.is_some()
    }

    /// The current lease epoch: it changes when the shared store has reaped this instance's
    /// leases (it was silent too long), so that leases granted before no longer count.
    pub fn epoch(&self) -> u64 {
        self.leases
            .as_ref()
            .map_or(0, |e| e.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Queues an operation. Blocks only when the writer is `QUEUE` operations behind
    /// (backpressure from storage), which never happens in normal operation.
    pub fn send(&self, op: StoreOp) -> Result<(), StoreError> {
        match self.tx.try_send(Msg::Op(op)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(m)) => {
                metrics::counter!(crate::metrics::LEDGER_QUEUE_FULL).increment(1);
                self.tx.send(m).map_err(|_| StoreError::WriterGone)
            }
            Err(TrySendError::Disconnected(_)) => Err(StoreError::WriterGone),
        }
    }

    /// Queues an operation without ever blocking the caller: when the writer is `QUEUE`
    /// operations behind, the operation is dropped, counted, and `false` returned. Only for
    /// records that carry no money (refused requests), so that a flood of refusals cannot
    /// stall the worker threads behind a slow disk.
    pub fn try_send(&self, op: StoreOp) -> bool {
        match self.tx.try_send(Msg::Op(op)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                metrics::counter!(crate::metrics::LEDGER_QUEUE_FULL).increment(1);
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// Queues an operation that answers, and waits for the answer.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> StoreOp,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        self.ask(StoreOp::Flush).await
    }

    /// Waits until everything queued before is readable from the store.
    pub async fn barrier(&self) -> Result<(), StoreError> {
        self.ask(StoreOp::Barrier).await
    }
}

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// What the writer has taken from the queue and not yet committed. A batch whose commit fails
/// stays here, later operations merge into it (a later write of a key wins, as in the queue's
/// order), and the whole of it is committed again until it succeeds: nothing a wallet debited
/// is dropped.
struct Pending {
    batch: sled::Batch,
    faults: Faults,
    /// The records in `batch`, by request id.
    records: std::collections::HashMap<String, Box<LedgerRecord>>,
    /// The rollup changes of the records in `batch`, written into it at commit.
    rollups: RollupDelta,
    ops: usize,
    dirty: bool,
    sync_now: bool,
    after_sync: Vec<Reply>,
    /// Which stored records a new record may replace; kept across batches.
    replaceable: Replaceable,
    /// Holds persisted for the first time, put into `batch` at commit: one settled before
    /// then is never written (nor its removal).
    new_holds: std::collections::HashMap<u64, NewHold>,
    /// Each wallet's latest balances, put into `batch` at commit: once per batch, not once
    /// per settlement.
    wallets: std::collections::HashMap<String, Balances>,
}

/// Most fallback records remembered as replaceable; past that every record is looked up.
const REPLACEABLE_MAX: usize = 100_000;

/// Which records already in the store a record being written may replace, so that the writer
/// reads the store (a tree lookup, about a tenth of its work per record) only for those. A
/// request's record replaces a stored one only when a fallback (`RecordIfAbsent`) was written
/// for it first; ids this process issues carry their start time, so an id issued before the
/// writer started (or one without a time) may name a record of an earlier run and is looked up.
struct Replaceable {
    /// The writer's start, in the micros of [`micros`].
    since: u64,
    /// Request ids whose fallback record this writer committed and no record replaced yet.
    fallbacks: std::collections::HashSet<String>,
    /// More fallbacks were written than [`REPLACEABLE_MAX`]: look every record up.
    overflowed: bool,
}

impl Replaceable {
    fn new() -> Self {
        Replaceable {
            since: micros(chrono::Utc::now()),
            fallbacks: Default::default(),
            overflowed: false,
        }
    }

    /// Whether the store may hold a record with this id.
    fn may_be_stored(&self, request_id: &str) -> bool {
        self.overflowed
            || id_micros(request_id).is_none_or(|t| t < self.since)
            || self.fallbacks.contains(request_id)
    }

    fn fallback_written(&mut self, request_id: &str) {
        if self.overflowed {
            return;
        }
        if self.fallbacks.len() >= REPLACEABLE_MAX {
            self.overflowed = true;
            self.fallbacks = Default::default();
            return;
        }
        self.fallbacks.insert(request_id.to_string());
    }
}

impl Pending {
    fn new(faults: Faults, replaceable: Replaceable) -> Self {
        Pending {
            batch: sled::Batch::default(),
            faults,
            records: Default::default(),
            rollups: RollupDelta::default(),
            ops: 0,
            dirty: false,
            sync_now: false,
            after_sync: Vec::new(),
            replaceable,
            new_holds: Default::default(),
            wallets: Default::default(),
        }
    }
}

/// How long the writer lets operations gather before it commits them: a tenth of the flush
/// interval, at most 10 ms. A record is thus committed within the window and on disk within
/// window + half the flush interval (0.6 × `flush_interval_ms`).
fn group_window(flush_interval: Duration) -> Duration {
    (flush_interval / 10).min(Duration::from_millis(10))
}

impl Msg {
    /// Whether a sender waits for this operation's answer (no grouping delay then).
    fn waits(&self) -> bool {
        match self {
            Msg::Stop => true,
            Msg::Op(op) => !matches!(
                op,
                StoreOp::Settle { .. }
                    | StoreOp::Record(_)
                    | StoreOp::RecordIfAbsent(_)
                    | StoreOp::Holds { .. }
            ),
        }
    }
}

fn run(
    store: Store,
    rx: Receiver<Msg>,
    flush_interval: Duration,
    fault: Faults,
    replaceable: Replaceable,
    failing: &std::sync::atomic::AtomicBool,
) {
    let db = store.db().clone();
    let half = (flush_interval / 2).max(Duration::from_millis(1));
    let window = group_window(flush_interval);
    let mut p = Pending::new(fault.clone(), replaceable);
    let mut last_sync = Instant::now();
    let mut unsynced = false;
    let mut stopping = false;
    // One batch's messages; kept between batches so that gathering one does not grow a vector.
    let mut msgs: Vec<Msg> = Vec::new();
    while !stopping {
        let first = match rx.recv_timeout(half) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Msg::Stop),
        };
        // Group commit: unless someone waits for an answer, let settlements gather for a short
        // window, so that sled writes one log buffer per window instead of one per request.
        if first.as_ref().is_some_and(|m| !m.waits()) {
            std::thread::sleep(window);
        }
        msgs.extend(first);
        while msgs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
        for m in msgs.drain(..) {
            match m {
                Msg::Stop => {
                    stopping = true;
                    p.sync_now = true;
                }
                Msg::Op(op) => apply_op(&store, &db, &mut p, op),
            }
        }
        let started = Instant::now();
        let had_ops = p.ops > 0;
        let mut res = commit(&db, &mut p);
        if stopping && res.is_err() {
            // The last chance for what is pending: keep trying for a few seconds.
            let until = Instant::now() + STOP_RETRY;
            while res.is_err() && Instant::now() < until {
                std::thread::sleep(half.min(Duration::from_millis(100)));
                res = commit(&db, &mut p);
            }
            if res.is_err() {
                tracing::error!(
                    operations = p.ops,
                    "ledger writes still failing at stop: the pending batch is lost; open holds are recovered at the next start"
                );
            }
        }
        if had_ops {
            collect_garbage();
        }
        if p.dirty || res.is_err() {
            unsynced = true;
        }
        p.dirty = false;
        let due = unsynced && last_sync.elapsed() >= half;
        let res = match res {
            Ok(()) if p.sync_now || due => {
                let r = match fault.refuse_sync() {
                    true => Err(StoreError::Corrupt {
                        key: "fsync".into(),
                        err: "refused (injected fault)".into(),
                    }),
                    false => db.flush().map(|_| ()).map_err(StoreError::from),
                };
                last_sync = Instant::now();
                // A failed fsync is tried again after half an interval, new writes or not.
                unsynced = r.is_err();
                failing.store(r.is_err(), std::sync::atomic::Ordering::Release);
                r
            }
            Err(e) => {
                failing.store(true, std::sync::atomic::Ordering::Release);
                Err(e)
            }
            other => other,
        };
        if had_ops {
            metrics::histogram!(crate::metrics::LEDGER_FLUSH_SECONDS)
                .record(started.elapsed().as_secs_f64());
        }
        if let Err(e) = &res {
            tracing::error!(error = %e, "ledger write failed");
        }
        let replies = std::mem::take(&mut p.after_sync);
        for r in replies {
            r(match &res {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::Corrupt {
                    key: "batch".into(),
                    err: e.to_string(),
                }),
            });
        }
        p.sync_now = false;
    }
}

/// Frees the tree nodes the last commit replaced, on this thread (called only after a commit
/// that wrote something: an idle turn of the loop has nothing to free).
///
/// sled hands each node it replaces to crossbeam's global epoch collector, to be freed once no
/// thread can still be reading it. Any thread that enters that collector may end up freeing
/// them, and the HTTP workers enter it on every histogram observation (the metrics exporter's
/// buckets use the same collector). Left alone, the workers freed the writer's garbage: 3.9% of
/// the gateway's CPU at c=64, and jemalloc's slower path for memory freed on a thread other
/// than the one that allocated it. Each round hands this thread's deferred frees to the global
/// queue, tries to advance the epoch and frees what has expired; a freed node must be two
/// epochs old, hence three rounds.
fn collect_garbage() {
    for _ in 0..3 {
        crossbeam_epoch::pin().flush();
    }
}

/// How long a stopping writer keeps retrying a batch whose commit fails.
const STOP_RETRY: Duration = Duration::from_secs(3);

/// Commits what is pending. On failure everything stays pending, to be committed again.
fn commit(db: &sled::Db, p: &mut Pending) -> Result<(), StoreError> {
    if p.ops == 0 {
        return Ok(());
    }
    if p.faults.refuse_commit() {
        return Err(StoreError::Corrupt {
            key: "batch".into(),
            err: "commit refused (injected fault)".into(),
        });
    }
    for (id, h) in std::mem::take(&mut p.new_holds) {
        match h.encode() {
            Ok(v) => p.batch.insert(key_h(id), v),
            // Cannot happen (the wallet actor encoded the draft); the hold then is not
            // recoverable after a crash, but settles normally.
            Err(e) => tracing::error!(error = %e, hold_id = id, "cannot persist a hold"),
        }
    }
    for (key_id, balances) in std::mem::take(&mut p.wallets) {
        p.batch.insert(
            key_w(&key_id),
            to_json(&WalletState::from_balances(&balances)),
        );
    }
    // A copy goes to sled, so that a failed commit leaves the batch here (the values are
    // reference-counted: the copy is a tree of pointers).
    let mut batch = p.batch.clone();
    p.rollups.write_into(db, &mut batch)?;
    db.apply_batch(batch)?;
    p.batch = sled::Batch::default();
    p.records.clear();
    p.rollups.clear();
    p.ops = 0;
    p.dirty = true;
    Ok(())
}

/// Applies what is pending, so that reads below see every earlier operation. Fails while the
/// pending batch cannot be committed: reads would then miss writes already acknowledged.
fn barrier(db: &sled::Db, p: &mut Pending) -> Result<(), StoreError> {
    commit(db, p)
}

fn apply_op(store: &Store, db: &sled::Db, p: &mut Pending, op: StoreOp) {
    match op {
        StoreOp::Settle {
            key_id,
            balances,
            debit: _,
            hold_id,
            drew,
            record,
        } => {
            p.wallets.insert(key_id, balances);
            if let Some(h) = hold_id {
                // A hold persisted and settled within one batch is never written.
                if p.new_holds.remove(&h).is_none() {
                    p.batch.remove(key_h(h));
                }
                // Removing a key that is not there still costs sled a tree walk.
                if drew {
                    p.batch.remove(key_c(h));
                }
            }
            if let Some(rec) = record {
                write_record(store, p, rec);
            }
            p.ops += 1;
        }
        // The wallet actor owns the whole balance: there is nothing more to lease or return.
        StoreOp::Lease { reply, .. } => {
            let _ = reply.send(Ok(LeaseGrant {
                amount: Decimal::ZERO,
                epoch: 0,
                elsewhere: Decimal::ZERO,
            }));
        }
        StoreOp::ReleaseLease { .. } => {}
        StoreOp::SharedWallet { reply, .. } => {
            let _ = reply.send(Ok(None));
        }
        StoreOp::Record(rec) => {
            write_record(store, p, rec);
            p.ops += 1;
        }
        StoreOp::RecordIfAbsent(rec) => {
            let present = p.records.contains_key(&rec.request_id)
                || store.has_record(&rec.request_id).unwrap_or(false);
            if !present {
                p.replaceable.fallback_written(&rec.request_id);
                put_record(&mut p.batch, &mut p.rollups, &rec);
                p.records.insert(rec.request_id.clone(), rec);
                p.ops += 1;
            }
        }
        StoreOp::Holds { new, drawn } => {
            for h in new {
                p.new_holds.insert(h.hold_id, h);
            }
            for d in drawn {
                p.batch.insert(key_c(d.hold_id), encode_compact(&d));
            }
            p.ops += 1;
        }
        StoreOp::TopUp {
            key_id,
            bucket,
            amount,
            reference,
            balances_after,
            reply,
        } => {
            let outcome = (|| -> Result<TopupOutcome, StoreError> {
                barrier(db, p)?;
                if let Some(r) = &reference {
                    if let Some(prev) = store.topup_ref(&key_id, r)? {
                        return Ok(if prev.bucket == bucket && prev.amount == amount {
                            TopupOutcome::Duplicate
                        } else {
                            TopupOutcome::Conflict(prev)
                        });
                    }
                }
                let now = chrono::Utc::now();
                let mut b = sled::Batch::default();
                b.insert(
                    key_w(&key_id),
                    to_json(&WalletState::from_balances(&balances_after)),
                );
                if let Some(r) = &reference {
                    b.insert(
                        key_t(&key_id, r),
                        to_json(&TopupRef {
                            bucket: bucket.clone(),
                            amount,
                        }),
                    );
                }
                let seq = db.generate_id()?;
                let log = format!("u/{:016x}{:08x}", micros(now), seq).into_bytes();
                b.insert(key_v(&key_id, &log), &[][..]);
                b.insert(
                    log,
                    to_json(&TopupRecord {
                        key_id: key_id.clone(),
                        bucket: bucket.clone(),
                        amount,
                        reference: reference.clone(),
                        at: now,
                    }),
                );
                db.apply_batch(b)?;
                p.dirty = true;
                Ok(TopupOutcome::Applied)
            })();
            match outcome {
                Ok(TopupOutcome::Applied) => {
                    p.sync_now = true;
                    p.after_sync.push(Box::new(move |r| {
                        // Applied above: only its durability can have failed.
                        let r = r
                            .map(|()| TopupOutcome::Applied)
                            .map_err(|e| StoreError::NotDurable(e.to_string()));
                        let _ = reply.send(r);
                    }));
                }
                other => {
                    let _ = reply.send(other);
                }
            }
        }
        StoreOp::PutKey {
            record,
            bootstrap_name,
            reply,
        } => {
            p.batch.insert(key_k(&record.id), to_json(&*record));
            if let Some(name) = bootstrap_name {
                p.batch.insert(
                    format!("m/bootstrap/{name}").into_bytes(),
                    record.id.as_bytes(),
                );
            }
            p.ops += 1;
            p.sync_now = true;
            p.after_sync.push(Box::new(move |r| {
                let _ = reply.send(r);
            }));
        }
        StoreOp::LoadWallet { key_id, reply } => {
            let r = barrier(db, p).and_then(|()| store.wallet(&key_id));
            let _ = reply.send(r);
        }
        StoreOp::Flush(reply) => {
            p.sync_now = true;
            p.after_sync.push(Box::new(move |r| {
                let _ = reply.send(r);
            }));
        }
        StoreOp::Barrier(reply) => {
            // Answered after this round's commit (and its fsync, if one is due anyway).
            p.after_sync.push(Box::new(move |r| {
                let _ = reply.send(r);
            }));
        }
        StoreOp::Prune {
            before_micros,
            reply,
        } => {
            let r = barrier(db, p).and_then(|()| prune(store, db, before_micros));
            let _ = reply.send(r);
        }
    }
}

/// Adds a record to the pending batch, replacing any earlier record of the same request (in
/// the batch or the store): the rollups then lose the earlier record's counts.
fn write_record(store: &Store, p: &mut Pending, rec: Box<LedgerRecord>) {
    let may_be_stored = p.replaceable.may_be_stored(&rec.request_id);
    if !p.replaceable.fallbacks.is_empty() {
        p.replaceable.fallbacks.remove(&rec.request_id);
    }
    let earlier = match p.records.remove(&rec.request_id) {
        Some(old) => Some(old),
        None if may_be_stored => match store.record(&rec.request_id) {
            Ok(old) => old.map(Box::new),
            Err(e) => {
                tracing::error!(error = %e, request_id = %rec.request_id, "cannot read the record this one replaces: the rollups may count it twice");
                None
            }
        },
        None => None,
    };
    if let Some(old) = earlier {
        p.rollups.remove(&old);
    }
    put_record(&mut p.batch, &mut p.rollups, &rec);
    p.records.insert(rec.request_id.clone(), rec);
}

/// Records deleted by one `Prune` at most, so that a large backlog does not hold up the writer
/// (and the settlements queued behind it); the caller repeats while it gets this many.
pub const PRUNE_MAX: usize = 10_000;

fn prune(store: &Store, db: &sled::Db, before_micros: u64) -> Result<usize, StoreError> {
    let hi = format!("l/{before_micros:016x}").into_bytes();
    let mut n = 0;
    let mut batch = sled::Batch::default();
    let mut rollups = RollupDelta::default();
    for kv in db.range(b"l/".to_vec()..hi).take(PRUNE_MAX) {
        let (k, v) = kv?;
        let rec: LedgerRecord = decode_compact(&k, &v)?;
        batch.remove(k);
        batch.remove(key_x(&rec));
        if let Some(a) = key_a(&rec) {
            batch.remove(a);
        }
        batch.remove(key_i(&rec.request_id));
        rollups.remove(&rec);
        n += 1;
        if n % 1000 == 0 {
            rollups.write_into(db, &mut batch)?;
            rollups.clear();
            db.apply_batch(std::mem::take(&mut batch))?;
        }
    }
    rollups.write_into(db, &mut batch)?;
    db.apply_batch(batch)?;
    let _ = store;
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::ledger::usage::tests::rec;

    fn run_ops(ops: Vec<StoreOp>) -> Store {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (w, thread) = start(store.clone(), Duration::from_millis(10)).unwrap();
        for op in ops {
            w.send(op).unwrap();
        }
        thread.stop();
        // Keep the folder alive as long as the store handle.
        std::mem::forget(dir);
        store
    }

    fn cost_of(store: &Store, id: &str) -> String {
        store.record(id).unwrap().unwrap().cost.to_string()
    }

    /// Records without money never block their sender: on a full queue they are dropped.
    #[test]
    fn try_send_returns_at_once_on_a_full_queue() {
        let (tx, rx) = sync_channel(1);
        let w = LedgerWriter {
            tx,
            failing: Default::default(),
            leases: None,
        };
        let record = || StoreOp::Record(Box::new(rec("k1", None, 1, 1, "0")));
        assert!(w.try_send(record()));
        assert!(!w.try_send(record()), "the queue is full");
        drop(rx);
        assert!(!w.try_send(record()), "the writer is gone");
    }

    #[test]
    fn a_fallback_record_never_replaces_a_settlement_record() {
        let mut settled = rec("k1", Some(("m/p1", "credit", "USD")), 2, 8, "0.000018");
        settled.request_id = "req-a".into();
        let mut fallback = settled.clone();
        fallback.cost = Decimal::ZERO;
        fallback.status = crate::ledger::Status::ClientDisconnected;
        // Settlement first, fallback second (same batch): the settlement stays.
        let s = run_ops(vec![
            StoreOp::Record(Box::new(settled.clone())),
            StoreOp::RecordIfAbsent(Box::new(fallback.clone())),
        ]);
        assert_eq!(cost_of(&s, "req-a"), "0.000018");
        // Fallback first, settlement second: the settlement overwrites it.
        let s = run_ops(vec![
            StoreOp::RecordIfAbsent(Box::new(fallback.clone())),
            StoreOp::Record(Box::new(settled.clone())),
        ]);
        assert_eq!(cost_of(&s, "req-a"), "0.000018");
        // Alone, the fallback is written.
        let s = run_ops(vec![StoreOp::RecordIfAbsent(Box::new(fallback))]);
        assert_eq!(cost_of(&s, "req-a"), "0");
    }

    /// Which ids the writer looks up: fallbacks it wrote, ids from before it started or without
    /// a time; past [`REPLACEABLE_MAX`] fallbacks, every id.
    #[test]
    fn replaceable_ids_are_looked_up_and_the_set_is_bounded() {
        let mut r = Replaceable::new();
        let now = chrono::Utc::now();
        let fresh = crate::ledger::new_request_id(now);
        let old = crate::ledger::new_request_id(now - chrono::Duration::seconds(5));
        assert!(!r.may_be_stored(&fresh));
        assert!(r.may_be_stored(&old));
        assert!(r.may_be_stored("req-untimed"));
        r.fallback_written(&fresh);
        assert!(r.may_be_stored(&fresh));
        let other = crate::ledger::new_request_id(now);
        assert!(!r.may_be_stored(&other));
        for i in 0..REPLACEABLE_MAX {
            r.fallback_written(&format!("req-f{i}"));
        }
        assert!(r.overflowed);
        assert!(r.fallbacks.is_empty(), "the set is dropped, not grown");
        assert!(r.may_be_stored(&other));
    }

    /// The writer looks a record's id up in the store only when a fallback was written for it:
    /// a settlement that follows its committed fallback still replaces it, counted once.
    #[tokio::test]
    async fn a_settlement_after_a_committed_fallback_replaces_it_in_the_rollups() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (w, thread) = start(store.clone(), Duration::from_millis(10)).unwrap();
        let started = chrono::Utc::now();
        let mut ids = Vec::new();
        for n in 0..3 {
            let id = crate::ledger::new_request_id(started);
            let mut settled = rec("k1", Some(("m/p1", "credit", "USD")), 2, 8, "0.000018");
            settled.request_id = id.clone();
            settled.started_at = started;
            let mut fallback = settled.clone();
            fallback.cost = Decimal::ZERO;
            fallback.status = crate::ledger::Status::ClientDisconnected;
            if n > 0 {
                // Fallback and settlement in separate batches (and a second fallback after).
                w.send(StoreOp::RecordIfAbsent(Box::new(fallback.clone())))
                    .unwrap();
                w.flush().await.unwrap();
            }
            w.send(StoreOp::Record(Box::new(settled))).unwrap();
            w.flush().await.unwrap();
            w.send(StoreOp::RecordIfAbsent(Box::new(fallback))).unwrap();
            w.flush().await.unwrap();
            ids.push(id);
        }
        for id in &ids {
            assert_eq!(cost_of(&store, id), "0.000018", "{id}");
        }
        let hour = crate::ledger::rollup::hour_of(&store.record(&ids[0]).unwrap().unwrap());
        let mut counted = 0;
        store
            .rollup_hours(crate::ledger::rollup::Scope::All, hour, hour + 1, |_, s| {
                if let crate::ledger::rollup::Sums::Tally(_, n) = s {
                    counted += n;
                }
            })
            .unwrap();
        assert_eq!(counted, 3, "each request counted once");
        thread.stop();
    }

    #[tokio::test]
    async fn timed_ids_need_no_id_index_and_are_found_across_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (w, thread) = start(store.clone(), Duration::from_millis(10)).unwrap();
        let started = chrono::Utc::now();
        let timed = crate::ledger::new_request_id(started);
        for id in [timed.clone(), "req-untimed".to_string()] {
            let mut settled = rec("k1", Some(("m/p1", "credit", "USD")), 2, 8, "0.000018");
            settled.request_id = id.clone();
            settled.started_at = started;
            let mut fallback = settled.clone();
            fallback.cost = Decimal::ZERO;
            // The settlement lands in one batch, the guard's fallback in a later one.
            w.send(StoreOp::Record(Box::new(settled))).unwrap();
            w.flush().await.unwrap();
            w.send(StoreOp::RecordIfAbsent(Box::new(fallback))).unwrap();
            w.flush().await.unwrap();
            assert_eq!(cost_of(&store, &id), "0.000018", "{id}");
            let indexed = store.db().contains_key(key_i(&id)).unwrap();
            assert_eq!(indexed, id != timed, "{id}: i/ entry only for untimed ids");
        }
        assert_eq!(
            store
                .record("req_00000000000000000000000000000000")
                .unwrap(),
            None
        );
        thread.stop();
    }

    /// A task's records come from its own index entries, oldest first, and never from a task
    /// whose name starts the same; pruning takes the entries away with the records.
    #[test]
    fn task_records_come_from_the_task_index() {
        let t0 = chrono::Utc::now() - chrono::Duration::days(2);
        let mut ops = Vec::new();
        for (i, task) in ["run", "run/2", "run", "other", "run"].iter().enumerate() {
            let mut r = rec("k1", None, 1, 1, "0.1");
            r.started_at = t0 + chrono::Duration::seconds(i as i64);
            r.request_id = crate::ledger::new_request_id(r.started_at);
            r.task = Some(task.to_string());
            ops.push(StoreOp::Record(Box::new(r)));
        }
        let s = run_ops(ops);
        let got = s.task_records("run", None, None, None).unwrap();
        assert_eq!(got.len(), 3);
        assert!(got.windows(2).all(|w| w[0].started_at < w[1].started_at));
        assert!(got.iter().all(|r| r.task.as_deref() == Some("run")));
        assert_eq!(s.task_records("run/2", None, None, None).unwrap().len(), 1);
        // Pages newest first through the task index, resumed from a cursor.
        let page: Vec<(Vec<u8>, LedgerRecord)> = s
            .scan_index(Index::Task("run"), None, None, None)
            .map(Result::unwrap)
            .collect();
        assert_eq!(page.len(), 3);
        assert!(page
            .windows(2)
            .all(|w| w[0].1.started_at > w[1].1.started_at));
        let rest: Vec<String> = s
            .scan_index(Index::Task("run"), None, None, Some(&page[0].0))
            .map(|r| r.unwrap().1.request_id)
            .collect();
        assert_eq!(
            rest,
            [page[1].1.request_id.clone(), page[2].1.request_id.clone()]
        );
        assert_eq!(
            s.task_records("run", Some("k2"), None, None).unwrap().len(),
            0
        );
        let since = t0 + chrono::Duration::seconds(1);
        assert_eq!(
            s.task_records("run", None, Some(since), None)
                .unwrap()
                .len(),
            2
        );
        prune(&s, s.db(), micros(chrono::Utc::now())).unwrap();
        assert_eq!(s.db().scan_prefix(b"a/").count(), 0);
    }

    /// A key's top-ups come from its own index entries, in the order applied; a store from
    /// before the index gets it at open.
    #[tokio::test]
    async fn a_keys_topups_come_from_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (w, thread) = start(store.clone(), Duration::from_millis(10)).unwrap();
        for (key, amount, reference) in [("k1", 5, "a"), ("k1/2", 7, "b"), ("k1", 9, "c")] {
            let outcome = w
                .ask(|reply| StoreOp::TopUp {
                    key_id: key.into(),
                    bucket: "credit".into(),
                    amount: Decimal::from(amount),
                    reference: Some(reference.into()),
                    balances_after: Default::default(),
                    reply,
                })
                .await
                .unwrap();
            assert_eq!(outcome, TopupOutcome::Applied);
        }
        thread.stop();
        let refs = |s: &Store, k: &str| -> Vec<String> {
            s.key_topups(k)
                .unwrap()
                .into_iter()
                .map(|t| t.reference.unwrap_or_default())
                .collect()
        };
        assert_eq!(refs(&store, "k1"), ["a", "c"]);
        assert_eq!(refs(&store, "k1/2"), ["b"]);
        assert!(refs(&store, "k2").is_empty());
        let mut wipe = sled::Batch::default();
        for k in store.db().scan_prefix(b"v/").keys() {
            wipe.remove(k.unwrap());
        }
        wipe.remove(&b"m/topup_index"[..]);
        store.db().apply_batch(wipe).unwrap();
        assert!(refs(&store, "k1").is_empty());
        store.ensure_topup_index().unwrap();
        assert_eq!(refs(&store, "k1"), ["a", "c"]);
        assert_eq!(refs(&store, "k1/2"), ["b"]);
    }

    #[test]
    fn request_ids_carry_their_start_and_sort_by_it() {
        let t1 = chrono::Utc::now();
        let t2 = t1 + chrono::Duration::microseconds(1);
        let (a, b) = (
            crate::ledger::new_request_id(t1),
            crate::ledger::new_request_id(t2),
        );
        assert_eq!(a.len(), 36);
        assert!(a < b);
        assert_ne!(a, crate::ledger::new_request_id(t1));
        let mut r = rec("k1", None, 0, 0, "0");
        r.request_id = a.clone();
        r.started_at = t1;
        assert_eq!(key_l_from_id(&a), Some(key_l(&r)));
        let t = crate::ledger::store::micros(t1);
        assert!(a.starts_with(&format!("req_{t:014x}")), "{a}");
        assert_eq!(key_l(&r), format!("l/{t:016x}{a}").into_bytes());
        assert_eq!(key_x(&r), format!("x/k1/{t:016x}{a}").into_bytes());
        assert_eq!(key_l_from_id("req-a"), None);
        assert_eq!(key_l_from_id("req_0123456789abcdefghijklmnopqrstuv"), None);
    }

    #[test]
    fn key_index_reads_empty_and_older_pointer_values() {
        let mut new = rec("k1", None, 1, 1, "0.1");
        new.request_id = crate::ledger::new_request_id(new.started_at);
        let s = run_ops(vec![StoreOp::Record(Box::new(new.clone()))]);
        assert!(s.db().get(key_x(&new)).unwrap().unwrap().is_empty());
        // An entry written by an earlier version points at its record.
        let mut old = rec("k1", None, 1, 1, "0.2");
        old.request_id = "req-old".into();
        old.started_at = new.started_at - chrono::Duration::seconds(1);
        // Stored as JSON, as earlier versions did.
        s.db().insert(key_l(&old), to_json(&old)).unwrap();
        s.db().insert(key_x(&old), key_l(&old)).unwrap();
        let ids: Vec<String> = s
            .scan_records(Some("k1"), None, None, None)
            .map(|r| r.unwrap().1.request_id)
            .collect();
        assert_eq!(ids, vec![new.request_id.clone(), "req-old".to_string()]);
    }

    #[test]
    fn stored_records_round_trip_in_both_encodings() {
        let mut full = rec("k1", Some(("m/p1", "credit", "USD")), 3, 7, "0.0000123");
        full.end_user = Some("u-1".into());
        full.ttft_ms = Some(12);
        full.shortfall = Decimal::new(5, 7);
        let bare = rec("k2", None, 0, 0, "0");
        for r in [full, bare] {
            let compact = encode_compact(&r);
            assert_eq!(decode_compact::<LedgerRecord>(b"l/x", &compact).unwrap(), r);
            assert_eq!(
                decode_compact::<LedgerRecord>(b"l/x", &to_json(&r)).unwrap(),
                r
            );
            assert!(compact.len() < to_json(&r).len());
        }
        assert!(decode_compact::<LedgerRecord>(b"l/x", &[1, 0xff]).is_err());
    }

    #[tokio::test]
    async fn a_barrier_answers_once_grouped_writes_are_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // A 1 s flush interval: writes gather for a 10 ms window before they are committed.
        let (w, thread) = start(store.clone(), Duration::from_secs(1)).unwrap();
        assert_eq!(
            group_window(Duration::from_secs(1)),
            Duration::from_millis(10)
        );
        assert_eq!(
            group_window(Duration::from_millis(50)),
            Duration::from_millis(5)
        );
        for i in 0..20 {
            let mut r = rec("k1", None, 1, 1, "0.1");
            r.request_id = format!("req-b{i}");
            w.send(StoreOp::Record(Box::new(r))).unwrap();
            w.barrier().await.unwrap();
            assert!(store.record(&format!("req-b{i}")).unwrap().is_some());
        }
        thread.stop();
    }

    /// Holds and wallet states wait for the commit: a hold settled in the batch that persists
    /// it leaves nothing, one settled in a later batch is removed, one still open stays, and the
    /// wallet keeps its latest balances.
    #[test]
    fn a_batch_writes_each_wallet_once_and_skips_holds_it_settles() {
        let hold = |id: u64| -> NewHold {
            let mut draft = rec("k1", Some(("m/p1", "credit", "USD")), 5, 0, "0");
            draft.request_id = format!("req-h{id}");
            PersistedHold {
                hold_id: id,
                key_id: "k1".into(),
                bucket: "credit".into(),
                granted: Decimal::ONE,
                consumed: Decimal::ZERO,
                consumed_tokens: 0,
                updated_at: draft.started_at,
                draft: Box::new(draft),
            }
            .into()
        };
        let settle = |id: u64, balance: i64| StoreOp::Settle {
            key_id: "k1".into(),
            balances: [("credit".to_string(), Decimal::from(balance))].into(),
            debit: Debit {
                bucket: "credit".into(),
                amount: Decimal::ONE,
                charge: Decimal::ONE,
                epoch: 0,
            },
            hold_id: Some(id),
            drew: false,
            record: None,
        };
        let holds = |new: Vec<NewHold>| StoreOp::Holds { new, drawn: vec![] };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let db = store.db().clone();
        let mut p = Pending::new(Faults::default(), Replaceable::new());
        apply_op(&store, &db, &mut p, holds(vec![hold(1), hold(2), hold(3)]));
        apply_op(&store, &db, &mut p, settle(1, 9));
        apply_op(&store, &db, &mut p, settle(9, 8));
        commit(&db, &mut p).unwrap();
        let ids =
            |s: &Store| -> Vec<u64> { s.holds().unwrap().iter().map(|h| h.hold_id).collect() };
        let mut open = ids(&store);
        open.sort();
        assert_eq!(open, vec![2, 3], "hold 1 never written");
        assert_eq!(
            store.wallet("k1").unwrap().balances()["credit"],
            Decimal::from(8)
        );
        apply_op(&store, &db, &mut p, settle(2, 7));
        commit(&db, &mut p).unwrap();
        assert_eq!(ids(&store), vec![3]);
        assert_eq!(
            store.wallet("k1").unwrap().balances()["credit"],
            Decimal::from(7)
        );
    }

    #[test]
    fn holds_left_by_a_crash_are_recovered_in_both_encodings() {
        let hold = |id: u64, consumed: &str| {
            let mut draft = rec("k1", Some(("m/p1", "credit", "USD")), 5, 0, "0");
            draft.request_id = format!("req-h{id}");
            PersistedHold {
                hold_id: id,
                key_id: "k1".into(),
                bucket: "credit".into(),
                granted: Decimal::new(1, 0),
                consumed: consumed.parse().unwrap(),
                consumed_tokens: 7,
                updated_at: draft.started_at,
                draft: Box::new(draft),
            }
        };
        // Hold 1 is written whole once, then its consumption moves on (R9).
        let s = run_ops(vec![
            StoreOp::Holds {
                new: vec![hold(1, "0.25").into()],
                drawn: vec![],
            },
            StoreOp::Holds {
                new: vec![],
                drawn: vec![HoldDrawn {
                    hold_id: 1,
                    consumed: "0.3".parse().unwrap(),
                    consumed_tokens: 9,
                    updated_at: chrono::Utc::now(),
                }],
            },
        ]);
        // A hold persisted as JSON by an earlier version.
        s.db().insert(key_h(2), to_json(&hold(2, "0.5"))).unwrap();
        let balances: Balances = [("credit".to_string(), Decimal::new(10, 0))].into();
        s.db()
            .insert(key_w("k1"), to_json(&WalletState::from_balances(&balances)))
            .unwrap();
        assert_eq!(s.holds().unwrap().len(), 2);
        assert_eq!(s.recover_holds().unwrap(), 2);
        assert!(s.holds().unwrap().is_empty());
        for (id, cost, tokens) in [("req-h1", "0.3", 9), ("req-h2", "0.5", 7)] {
            let r = s.record(id).unwrap().unwrap();
            assert_eq!(r.status, crate::ledger::Status::Interrupted);
            assert_eq!(r.cost.to_string(), cost);
            assert_eq!(r.output_tokens, tokens);
        }
        assert_eq!(
            s.wallet("k1").unwrap().balances()["credit"],
            Decimal::new(92, 1)
        );
        assert_eq!(s.db().scan_prefix(b"c/").count(), 0);
    }
}
