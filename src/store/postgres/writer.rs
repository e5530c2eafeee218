//! The PostgreSQL writer: one thread that takes the wallets' [`StoreOp`]s from the same bounded
//! channel as the sled writer and commits what has queued up in one transaction (group
//! commit): debits with the records that explain them, open holds and their consumption,
//! returned leases. Operations that answer (leases, top-ups, keys, loads) run after everything
//! queued before them is committed. A batch whose commit fails is kept, later operations join
//! it, and it is tried again until it commits; `tg_batches` makes sure a batch whose COMMIT was
//! cut off is never applied twice.
//!
//! The thread also beats this instance's heart (every eighth of `lease_ttl_ms`, between 10 ms
//! and half a second): one statement renews its registration, counts the live instances, looks
//! for expired ones and fingerprints the key table (for the key sync). A busy writer runs it
//! inside the batch it commits anyway, so a busy instance spends no transaction of its own on
//! it; a lease asked for while a batch is pending joins that batch's transaction too. Once
//! connected for a whole TTL, the writer reaps the instances whose registration expired: their open holds are billed at the
//! consumption they last persisted, as `interrupted` records, and the rest of their leases
//! returns to the balances.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Transaction};
use rust_decimal::Decimal;

use super::{db_err, new_epoch, Runtime};
use crate::ledger::store::{
    decode_compact, encode_compact, interrupted_record, ApiKeyRecord, HoldDrawn, PersistedHold,
    TopupRef,
};
use crate::ledger::writer::{
    channel, Debit, LeaseGrant, LedgerWriter, Msg, SharedWallet, StoreOp, TopupOutcome,
    WriterThread,
};
use crate::ledger::{LedgerRecord, StoreError};

/// What the writer thread shares with the rest of the store.
pub(super) struct Shared {
    pub pool: Pool,
    pub handle: tokio::runtime::Handle,
    /// Kept alive as long as the thread runs.
    pub runtime: Arc<Runtime>,
    pub instance_id: String,
    pub ttl: Duration,
    /// This instance's registration epoch (see [`LedgerWriter::epoch`]).
    pub epoch: Arc<AtomicU64>,
    /// The live instances, counted at every renewal (rate limits are shared among them).
    pub instances: Arc<std::sync::atomic::AtomicU32>,
    /// The key table's fingerprint at the last heartbeat (see `PgStore::keys_if_changed`).
    pub keys_version: Arc<AtomicU64>,
}

const MAX_BATCH: usize = 4096;
/// For how long after start, and how often, the registration is renewed early (see `run`).
const EARLY_RENEWALS: Duration = Duration::from_secs(3);
const EARLY_TICK: Duration = Duration::from_millis(100);
/// How long a stopping writer keeps trying to commit what is pending.
const STOP_RETRY: Duration = Duration::from_secs(5);
/// How long one database round (a commit, a query) may take before it counts as failed.
const ROUND_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn start(
    shared: Shared,
    flush_interval: Duration,
    failing: Arc<AtomicBool>,
) -> Result<(LedgerWriter, WriterThread), StoreError> {
    let (writer, tx, rx) = channel(failing.clone(), Some(shared.epoch.clone()));
    let handle = std::thread::Builder::new()
        .name("tollgate-pg-writer".into())
        .spawn(move || run(shared, rx, flush_interval, &failing))
        .map_err(|e| db_err(format!("cannot start the writer thread: {e}")))?;
    Ok((writer, WriterThread::new(handle, tx)))
}

/// One settlement whose debit came out of this instance's lease.
struct LeasedSettle {
    amount: Decimal,
    charge: Decimal,
    record: Option<Box<LedgerRecord>>,
}

/// What is taken from the queue and not committed yet.
#[derive(Default)]
struct Pending {
    /// Debits per (key, bucket) from the current epoch's leases, with their settlements.
    debits: BTreeMap<(String, String), (Decimal, Vec<LeasedSettle>)>,
    /// Settlements whose lease is gone (reaped, or an earlier epoch's): settled from the free
    /// balance, on top of what the reaper billed.
    lost: Vec<(String, Debit, Option<Box<LedgerRecord>>)>,
    /// Unused lease returned per (key, bucket).
    releases: BTreeMap<(String, String), Decimal>,
    /// Records to write (a later one for the same request wins).
    records: Vec<LedgerRecord>,
    /// Records written only when the request has none.
    if_absent: Vec<LedgerRecord>,
    holds_new: HashMap<u64, PersistedHold>,
    holds_drawn: HashMap<u64, HoldDrawn>,
    holds_done: HashSet<u64>,
    ops: usize,
    /// The batch's (epoch, number) once a commit of it was tried (see `tg_batches`).
    seq: Option<(i64, i64)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.ops == 0
    }

    fn add(&mut self, op: StoreOp, epoch: u64) {
        self.ops += 1;
        match op {
            StoreOp::Settle {
                key_id,
                debit,
                hold_id,
                record,
                ..
            } => {
                if let Some(h) = hold_id {
                    // A hold written and settled within this batch needs no row at all.
                    if self.holds_new.remove(&h).is_none() {
                        self.holds_done.insert(h);
                    }
                    self.holds_drawn.remove(&h);
                }
                if debit.epoch != epoch {
                    self.lost.push((key_id, debit, record));
                } else if debit.amount.is_zero() {
                    self.records.extend(record.map(|r| *r));
                } else {
                    let group = self
                        .debits
                        .entry((key_id, debit.bucket.clone()))
                        .or_default();
                    group.0 += debit.amount;
                    group.1.push(LeasedSettle {
                        amount: debit.amount,
                        charge: debit.charge,
                        record,
                    });
                }
            }
            StoreOp::Record(rec) => self.records.push(*rec),
            StoreOp::RecordIfAbsent(rec) => self.if_absent.push(*rec),
            StoreOp::Holds { new, drawn } => {
                for h in new {
                    match h.decode() {
                        Ok(h) => {
                            self.holds_new.insert(h.hold_id, h);
                        }
                        // Cannot happen (the wallet actor encoded the draft); the hold then is
                        // not recoverable after a crash, but settles normally.
                        Err(e) => tracing::error!(error = %e, "cannot persist a hold"),
                    }
                }
                for d in drawn {
                    match self.holds_new.get_mut(&d.hold_id) {
                        Some(h) => {
                            h.consumed = d.consumed;
                            h.consumed_tokens = d.consumed_tokens;
                            h.updated_at = d.updated_at;
                        }
                        None => {
                            self.holds_drawn.insert(d.hold_id, d);
                        }
                    }
                }
            }
            StoreOp::ReleaseLease {
                key_id,
                bucket,
                amount,
                epoch: e,
            } => {
                // A lease of an earlier epoch was reaped with its instance: nothing to return.
                if e == epoch && amount > Decimal::ZERO {
                    *self.releases.entry((key_id, bucket)).or_default() += amount;
                }
            }
            // Operations that answer never reach here (see `run`).
            _ => self.ops -= 1,
        }
    }
}

/// Whether an operation waits for an answer (it runs after the pending batch commits).
fn answers(op: &StoreOp) -> bool {
    !matches!(
        op,
        StoreOp::Settle { .. }
            | StoreOp::Record(_)
            | StoreOp::RecordIfAbsent(_)
            | StoreOp::Holds { .. }
            | StoreOp::ReleaseLease { .. }
    )
}

/// The writer's view of its connection, for the registration and the reaper.
struct Health {
    /// When the database last answered a renewal, if it did since the last failure.
    connected_since: Option<Instant>,
    /// When the next heartbeat (see [`HEARTBEAT`]) is due.
    next_beat: Instant,
}

fn run(shared: Shared, rx: Receiver<Msg>, flush_interval: Duration, failing: &AtomicBool) {
    // Settlements gather for most of a flush interval before they commit (see `Window`): a
    // record is in the database within one flush interval, and a busy instance commits about
    // one transaction per window rather than one per request.
    let mut window = Window::new(flush_interval);
    let retry = (flush_interval / 2).clamp(Duration::from_millis(50), Duration::from_millis(500));
    // One heartbeat renews the registration and looks for expired ones: often enough that a
    // dead instance is reaped soon after its TTL (it expires between 7/8 and 1 TTL after its
    // death), and at least every half second, so that the count of live instances (the rate
    // limits' shares) follows too, and keys changed elsewhere take effect within a second.
    let tick = (shared.ttl / 8).clamp(Duration::from_millis(10), Duration::from_millis(500));
    let born = Instant::now();
    let mut p = Pending::default();
    let mut seq: i64 = 0;
    let mut health = Health {
        connected_since: Some(Instant::now()),
        next_beat: Instant::now(),
    };
    // Instances of a fleet often start together: beat every 100 ms for the first seconds, so
    // that the rate limits' shares settle soon.
    let next_tick = |now: Instant| {
        let early = now.duration_since(born) < EARLY_RENEWALS;
        now + if early { tick.min(EARLY_TICK) } else { tick }
    };
    let mut stopping = false;
    while !stopping {
        let now = Instant::now();
        let mut wait = health.next_beat.saturating_duration_since(now);
        if !p.is_empty() {
            wait = wait.min(retry);
        }
        let first = match rx.recv_timeout(wait) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Msg::Stop),
        };
        let gather = matches!(&first, Some(Msg::Op(op)) if !answers(op));
        let mut msgs: Vec<Msg> = first.into_iter().collect();
        if gather {
            // Group commit: let settlements gather for the window, unless an operation that
            // someone waits for (a lease, a load) or the stop comes first.
            let until = Instant::now() + window.length();
            while msgs.len() < MAX_BATCH {
                match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(m) => {
                        let urgent = match &m {
                            Msg::Op(op) => answers(op),
                            Msg::Stop => true,
                        };
                        msgs.push(m);
                        if urgent {
                            break;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        msgs.push(Msg::Stop);
                        break;
                    }
                }
            }
        }
        while msgs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
        for m in msgs {
            match m {
                Msg::Stop => stopping = true,
                Msg::Op(StoreOp::Lease {
                    key_id,
                    bucket,
                    need,
                    want,
                    reply,
                }) if !p.is_empty() => {
                    // Everything sent before it commits first: the lease joins that batch's
                    // transaction rather than taking one of its own.
                    let ask = LeaseAsk {
                        key_id,
                        bucket,
                        need,
                        want,
                    };
                    let r = window.timed(|| {
                        commit_with(&shared, &mut p, &mut seq, failing, false, Some(&ask))
                    });
                    let granted = match r {
                        Ok(Committed {
                            lease: Some(granted),
                            ..
                        }) => granted,
                        Ok(_) => block(
                            &shared,
                            lease(&shared, ask.key_id, ask.bucket, ask.need, ask.want),
                        ),
                        Err(e) => Err(db_err(format!("earlier writes are not committed: {e}"))),
                    };
                    let _ = reply.send(granted);
                }
                Msg::Op(op) if answers(&op) => {
                    // Everything sent before it is committed first, as the sled writer does.
                    let committed = window
                        .timed(|| commit(&shared, &mut p, &mut seq, failing, false))
                        .map(|_| ());
                    answer(&shared, op, committed);
                }
                Msg::Op(op) => p.add(op, shared.epoch.load(Ordering::Acquire)),
            }
        }
        // The heartbeat rides along when it falls due before the next window would end.
        let beat_now = !stopping && Instant::now() + window.length() >= health.next_beat;
        if let Ok(Some(beat)) =
            window.timed(|| commit(&shared, &mut p, &mut seq, failing, beat_now))
        {
            health.next_beat = next_tick(Instant::now());
            heartbeat(&shared, &mut health, failing, false, Some(beat));
        }
        if stopping {
            let until = Instant::now() + STOP_RETRY;
            while !p.is_empty() && Instant::now() < until {
                std::thread::sleep(retry);
                let _ = commit(&shared, &mut p, &mut seq, failing, false);
            }
            if !p.is_empty() {
                tracing::error!(
                    operations = p.ops,
                    "database writes still failing at stop: this instance's leases and open holds are reaped by another instance, billing what they persisted"
                );
            }
            break;
        }
        let now = Instant::now();
        if now >= health.next_beat {
            health.next_beat = next_tick(now);
            heartbeat(&shared, &mut health, failing, p.is_empty(), None);
        }
    }
    if p.is_empty() {
        // A clean stop: what this instance still leases goes back to the balances (open holds
        // left by a stream cut at the very end are billed as interrupted).
        let r = block(&shared, {
            let pool = shared.pool.clone();
            let instance = shared.instance_id.clone();
            async move {
                let mut client = pool.get().await.map_err(db_err)?;
                let tx = client.transaction().await.map_err(db_err)?;
                let n = reap(&tx, &instance).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(n)
            }
        });
        match r {
            Ok(0) => tracing::info!("returned this instance's leases to the shared balances"),
            Ok(n) => tracing::warn!(
                holds = n,
                "returned this instance's leases; open holds billed as interrupted"
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot return this instance's leases at stop; another instance reaps them")
            }
        }
    }
    drop(shared.runtime);
}

/// How long settlements gather before they commit: the flush interval less twice what a
/// commit has been taking lately (so that a settlement is committed within one flush interval
/// of being sent, as R9 and the records' durability ask), at least half the flush interval and
/// at most [`MAX_WINDOW`]. Fewer, larger batches are what keeps a busy fleet's database at a
/// fraction of a transaction per request.
struct Window {
    flush_interval: Duration,
    /// A moving average of how long a commit of a non-empty batch takes.
    commit: Duration,
}

/// Past this, a longer window saves little and delays what the other instances see.
const MAX_WINDOW: Duration = Duration::from_millis(100);

impl Window {
    fn new(flush_interval: Duration) -> Window {
        Window {
            flush_interval,
            commit: Duration::from_millis(5),
        }
    }

    fn length(&self) -> Duration {
        let half = self.flush_interval / 2;
        self.flush_interval
            .saturating_sub(self.commit * 2)
            .clamp(half.min(MAX_WINDOW), MAX_WINDOW)
    }

    /// Runs a commit, folding how long it took into the average when it wrote something.
    fn timed<T>(
        &mut self,
        commit: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let r = commit();
        let took = started.elapsed();
        // An empty commit returns at once, and a failed one says nothing of a working
        // database: neither moves the average.
        if r.is_ok() && took > Duration::from_micros(200) {
            self.commit = (self.commit * 7 + took) / 8;
        }
        r
    }
}

/// Runs `f` on the store's runtime from the writer thread, bounded by [`ROUND_TIMEOUT`].
fn block<T>(
    shared: &Shared,
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    shared.handle.block_on(async {
        tokio::time::timeout(ROUND_TIMEOUT, f)
            .await
            .unwrap_or_else(|_| Err(db_err("timed out")))
    })
}

/// Commits what is pending in one transaction, with the heartbeat in it when `beat` (its
/// answer is returned; none when nothing was pending). On failure everything stays pending.
fn commit(
    shared: &Shared,
    p: &mut Pending,
    seq: &mut i64,
    failing: &AtomicBool,
    beat: bool,
) -> Result<Option<Beat>, StoreError> {
    commit_with(shared, p, seq, failing, beat, None).map(|c| c.beat)
}

/// A lease asked for while a batch is pending (see [`StoreOp::Lease`]).
struct LeaseAsk {
    key_id: String,
    bucket: String,
    need: Decimal,
    want: Decimal,
}

/// What a batch's transaction answered besides committing.
#[derive(Default)]
struct Committed {
    beat: Option<Beat>,
    /// The lease asked for with the batch, when its transaction ran it (not when nothing was
    /// pending, nor when a retried batch turned out committed already).
    lease: Option<Result<LeaseGrant, StoreError>>,
}

/// [`commit`], with `lease` granted in the same transaction after the batch's writes.
fn commit_with(
    shared: &Shared,
    p: &mut Pending,
    seq: &mut i64,
    failing: &AtomicBool,
    beat: bool,
    lease: Option<&LeaseAsk>,
) -> Result<Committed, StoreError> {
    if p.is_empty() {
        return Ok(Committed::default());
    }
    let started = Instant::now();
    let retried = p.seq.is_some();
    let (epoch, batch) = *p.seq.get_or_insert_with(|| {
        *seq += 1;
        (shared.epoch.load(Ordering::Acquire) as i64, *seq)
    });
    let r = block(shared, apply(shared, p, epoch, batch, retried, beat, lease));
    match r {
        Ok(committed) => {
            *p = Pending::default();
            failing.store(false, Ordering::Release);
            metrics::histogram!(crate::metrics::LEDGER_FLUSH_SECONDS)
                .record(started.elapsed().as_secs_f64());
            Ok(committed)
        }
        Err(e) => {
            if !failing.swap(true, Ordering::AcqRel) {
                tracing::error!(error = %e, operations = p.ops, "database write failed; kept and retried");
            }
            Err(e)
        }
    }
}

/// The statements of a batch, prepared once per connection.
const HOLDS_UPSERT: &str =
    "INSERT INTO tg_holds (instance_id, hold_id, key_id, bucket, granted, consumed,
                               consumed_tokens, updated_at, draft)
         SELECT $1, * FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::numeric[],
                                  $6::numeric[], $7::bigint[], $8::timestamptz[], $9::bytea[])
         ON CONFLICT (instance_id, hold_id) DO UPDATE
         SET consumed = EXCLUDED.consumed, consumed_tokens = EXCLUDED.consumed_tokens,
             updated_at = EXCLUDED.updated_at";
const HOLDS_DRAWN: &str =
    "UPDATE tg_holds h SET consumed = d.c, consumed_tokens = d.t, updated_at = d.u
         FROM UNNEST($2::bigint[], $3::numeric[], $4::bigint[], $5::timestamptz[])
              AS d(id, c, t, u)
         WHERE h.instance_id = $1 AND h.hold_id = d.id";
/// Each debit comes out of this instance's lease and the balance together; a lease that no
/// longer covers it (reaped) leaves the wallet as it is: its settlements are settled as lost.
const DEBITS: &str = "WITH d AS (SELECT * FROM UNNEST($2::text[], $3::text[], $4::numeric[])
                    AS d(key_id, bucket, amount)),
              l AS (UPDATE tg_leases SET amount = tg_leases.amount - d.amount FROM d
                    WHERE tg_leases.instance_id = $1 AND tg_leases.key_id = d.key_id
                      AND tg_leases.bucket = d.bucket AND tg_leases.amount >= d.amount
                    RETURNING tg_leases.key_id, tg_leases.bucket, d.amount)
         UPDATE tg_wallets w SET balance = w.balance - l.amount, leased = w.leased - l.amount
         FROM l WHERE w.key_id = l.key_id AND w.bucket = l.bucket
         RETURNING w.key_id, w.bucket";
const RELEASES: &str = "WITH d AS (SELECT * FROM UNNEST($2::text[], $3::text[], $4::numeric[])
                    AS d(key_id, bucket, amount)),
              l AS (UPDATE tg_leases SET amount = tg_leases.amount - d.amount FROM d
                    WHERE tg_leases.instance_id = $1 AND tg_leases.key_id = d.key_id
                      AND tg_leases.bucket = d.bucket AND tg_leases.amount >= d.amount
                    RETURNING tg_leases.key_id, tg_leases.bucket, d.amount)
         UPDATE tg_wallets w SET leased = w.leased - l.amount
         FROM l WHERE w.key_id = l.key_id AND w.bucket = l.bucket";
const HOLDS_DONE: &str = "DELETE FROM tg_holds WHERE instance_id = $1 AND hold_id = ANY($2)";
const BATCH_MARK: &str = "INSERT INTO tg_batches (instance_id, epoch, seq) VALUES ($1, $2, $3)";

/// A statement of the batch, or nothing when its part of the batch is empty.
async fn maybe<F: std::future::Future<Output = Result<T, tokio_postgres::Error>>, T>(
    run: bool,
    f: impl FnOnce() -> F,
) -> Result<Option<T>, StoreError> {
    if run {
        f().await.map(Some).map_err(db_err)
    } else {
        Ok(None)
    }
}

/// Commits a batch in one transaction, in two pipelined rounds (the statements of a round go
/// out together on the connection and their answers come back together): first the batch
/// mark, the open holds, the debits and the returned leases; then the records, which depend on
/// which debits found their lease, and the heartbeat when `beat`; then the `lease` asked for.
async fn apply(
    shared: &Shared,
    p: &Pending,
    epoch: i64,
    batch: i64,
    retried: bool,
    beat: bool,
    lease: Option<&LeaseAsk>,
) -> Result<Committed, StoreError> {
    let me = &shared.instance_id;
    let mut client = shared.pool.get().await.map_err(db_err)?;
    let tx = client.transaction().await.map_err(db_err)?;
    if retried {
        let done = tx
            .query_opt(
                "SELECT 1 FROM tg_batches WHERE instance_id = $1 AND epoch = $2 AND seq = $3",
                &[me, &epoch, &batch],
            )
            .await
            .map_err(db_err)?;
        if done.is_some() {
            // The earlier try committed; only its acknowledgement was lost.
            return Ok(Committed::default());
        }
    }
    let (mark, upsert, drawn_stmt, debits_stmt, releases_stmt, done_stmt) =
        futures_util::future::try_join_all([
            tx.prepare_cached(BATCH_MARK),
            tx.prepare_cached(HOLDS_UPSERT),
            tx.prepare_cached(HOLDS_DRAWN),
            tx.prepare_cached(DEBITS),
            tx.prepare_cached(RELEASES),
            tx.prepare_cached(HOLDS_DONE),
        ])
        .await
        .map_err(db_err)
        .and_then(|v| {
            let mut it = v.into_iter();
            match (
                it.next(),
                it.next(),
                it.next(),
                it.next(),
                it.next(),
                it.next(),
            ) {
                (Some(a), Some(b), Some(c), Some(d), Some(e), Some(f)) => Ok((a, b, c, d, e, f)),
                _ => Err(db_err("statement preparation")),
            }
        })?;

    let holds: Vec<&PersistedHold> = p.holds_new.values().collect();
    let h_ids: Vec<i64> = holds.iter().map(|h| h.hold_id as i64).collect();
    let h_keys: Vec<&str> = holds.iter().map(|h| h.key_id.as_str()).collect();
    let h_buckets: Vec<&str> = holds.iter().map(|h| h.bucket.as_str()).collect();
    let h_granted: Vec<Decimal> = holds.iter().map(|h| h.granted).collect();
    let h_consumed: Vec<Decimal> = holds.iter().map(|h| h.consumed).collect();
    let h_tokens: Vec<i64> = holds.iter().map(|h| h.consumed_tokens as i64).collect();
    let h_at: Vec<DateTime<Utc>> = holds.iter().map(|h| h.updated_at).collect();
    let h_drafts: Vec<Vec<u8>> = holds.iter().map(|h| encode_compact(&*h.draft)).collect();
    let drawn: Vec<&HoldDrawn> = p.holds_drawn.values().collect();
    let d_ids: Vec<i64> = drawn.iter().map(|d| d.hold_id as i64).collect();
    let d_consumed: Vec<Decimal> = drawn.iter().map(|d| d.consumed).collect();
    let d_tokens: Vec<i64> = drawn.iter().map(|d| d.consumed_tokens as i64).collect();
    let d_at: Vec<DateTime<Utc>> = drawn.iter().map(|d| d.updated_at).collect();
    let g_keys: Vec<&str> = p.debits.keys().map(|(k, _)| k.as_str()).collect();
    let g_buckets: Vec<&str> = p.debits.keys().map(|(_, b)| b.as_str()).collect();
    let g_amounts: Vec<Decimal> = p.debits.values().map(|(a, _)| *a).collect();
    let r_keys: Vec<&str> = p.releases.keys().map(|(k, _)| k.as_str()).collect();
    let r_buckets: Vec<&str> = p.releases.keys().map(|(_, b)| b.as_str()).collect();
    let r_amounts: Vec<Decimal> = p.releases.values().copied().collect();
    let done_ids: Vec<i64> = p.holds_done.iter().map(|h| *h as i64).collect();

    type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
    let mark_p: [Param; 3] = [me, &epoch, &batch];
    let upsert_p: [Param; 9] = [
        me,
        &h_ids,
        &h_keys,
        &h_buckets,
        &h_granted,
        &h_consumed,
        &h_tokens,
        &h_at,
        &h_drafts,
    ];
    let drawn_p: [Param; 5] = [me, &d_ids, &d_consumed, &d_tokens, &d_at];
    let debits_p: [Param; 4] = [me, &g_keys, &g_buckets, &g_amounts];
    let releases_p: [Param; 4] = [me, &r_keys, &r_buckets, &r_amounts];
    let done_p: [Param; 2] = [me, &done_ids];
    let (_, _, _, debited, _, _) = tokio::try_join!(
        maybe(true, || tx.execute(&mark, &mark_p)),
        maybe(!holds.is_empty(), || tx.execute(&upsert, &upsert_p)),
        maybe(!drawn.is_empty(), || tx.execute(&drawn_stmt, &drawn_p)),
        maybe(!p.debits.is_empty(), || tx.query(&debits_stmt, &debits_p)),
        maybe(!p.releases.is_empty(), || tx
            .execute(&releases_stmt, &releases_p)),
        maybe(!done_ids.is_empty(), || tx.execute(&done_stmt, &done_p)),
    )?;

    let mut records: Vec<LedgerRecord> = p.records.clone();
    let mut lost: Vec<(String, Debit, Option<LedgerRecord>)> = p
        .lost
        .iter()
        .map(|(k, d, r)| (k.clone(), d.clone(), r.as_deref().cloned()))
        .collect();
    let applied: HashSet<(String, String)> = debited
        .unwrap_or_default()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for ((key, bucket), (_, settles)) in &p.debits {
        if applied.contains(&(key.clone(), bucket.clone())) {
            records.extend(settles.iter().filter_map(|s| s.record.as_deref().cloned()));
        } else {
            for s in settles {
                let debit = Debit {
                    bucket: bucket.clone(),
                    amount: s.amount,
                    charge: s.charge,
                    epoch: 0,
                };
                lost.push((key.clone(), debit, s.record.as_deref().cloned()));
            }
        }
    }
    for (key, debit, record) in &lost {
        if let Some(rec) = settle_lost(&tx, key, debit, record.as_ref()).await? {
            records.push(rec);
        }
    }
    // The last record of a request in this batch wins, as in the sled writer.
    let mut seen = HashSet::new();
    let mut latest: Vec<&LedgerRecord> = records
        .iter()
        .rev()
        .filter(|r| seen.insert(r.request_id.clone()))
        .collect();
    latest.reverse();
    let absent: Vec<&LedgerRecord> = p
        .if_absent
        .iter()
        .filter(|r| seen.insert(r.request_id.clone()))
        .collect();
    let registration = shared.epoch.load(Ordering::Acquire) as i64;
    let ttl_ms = shared.ttl.as_millis() as f64;
    let beat_p: [Param; 3] = [me, &registration, &ttl_ms];
    let (_, _, beat) = tokio::try_join!(
        write_records(&tx, &latest, false, me),
        write_records(&tx, &absent, true, me),
        maybe(beat, || tx.query_one(HEARTBEAT, &beat_p)),
    )?;
    let beat = beat.map(|row| Beat::from_row(&row));
    let lease = match lease {
        Some(ask) => Some(lease_in(shared, &tx, ask).await?),
        None => None,
    };
    tx.commit().await.map_err(db_err)?;
    Ok(Committed { beat, lease })
}

/// Writes ledger records; `if_absent`: only those whose request has none yet.
async fn write_records(
    tx: &Transaction<'_>,
    recs: &[&LedgerRecord],
    if_absent: bool,
    instance: &str,
) -> Result<(), StoreError> {
    if recs.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = recs.iter().map(|r| r.request_id.as_str()).collect();
    let started: Vec<DateTime<Utc>> = recs.iter().map(|r| r.started_at).collect();
    let keys: Vec<&str> = recs.iter().map(|r| r.key_id.as_str()).collect();
    let tasks: Vec<Option<&str>> = recs.iter().map(|r| r.task.as_deref()).collect();
    let bytes: Vec<Vec<u8>> = recs.iter().map(|r| encode_compact(*r)).collect();
    let sql = if if_absent {
        "INSERT INTO tg_ledger (request_id, started_at, key_id, task, record, instance_id)
         SELECT *, $6 FROM UNNEST($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::bytea[])
         ON CONFLICT (request_id) DO NOTHING"
    } else {
        "INSERT INTO tg_ledger (request_id, started_at, key_id, task, record, instance_id)
         SELECT *, $6 FROM UNNEST($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::bytea[])
         ON CONFLICT (request_id) DO UPDATE
         SET started_at = EXCLUDED.started_at, key_id = EXCLUDED.key_id, task = EXCLUDED.task,
             record = EXCLUDED.record, instance_id = EXCLUDED.instance_id"
    };
    let stmt = tx.prepare_cached(sql).await.map_err(db_err)?;
    tx.execute(&stmt, &[&ids, &started, &keys, &tasks, &bytes, &instance])
        .await
        .map_err(db_err)?;
    Ok(())
}

/// A settlement whose lease is gone: its instance was reaped meanwhile (silent for longer than
/// the TTL), which billed the hold's persisted consumption in an `interrupted` record. The rest
/// of the debit comes from the balance no lease covers, as far as it goes; the record replaces
/// the interrupted one with the whole amount debited for the request, and the unpaid rest as
/// shortfall. Returns the record to write.
async fn settle_lost(
    tx: &Transaction<'_>,
    key_id: &str,
    debit: &Debit,
    record: Option<&LedgerRecord>,
) -> Result<Option<LedgerRecord>, StoreError> {
    let prev = match record {
        Some(r) => tx
            .query_opt(
                "SELECT record, instance_id FROM tg_ledger WHERE request_id = $1",
                &[&r.request_id],
            )
            .await
            .map_err(db_err)?
            .map(|row| decode_compact::<LedgerRecord>(b"tg_ledger", row.get::<_, &[u8]>(0)))
            .transpose()?
            .map_or(Decimal::ZERO, |r| r.cost),
        None => Decimal::ZERO,
    };
    let want = (debit.amount - prev).max(Decimal::ZERO);
    let mut took = Decimal::ZERO;
    if want > Decimal::ZERO {
        let row = tx
            .query_opt(
                "WITH w AS (SELECT LEAST($3::numeric, GREATEST(balance - leased, 0)) AS g
                            FROM tg_wallets WHERE key_id = $1 AND bucket = $2 FOR UPDATE)
                 UPDATE tg_wallets SET balance = tg_wallets.balance - w.g FROM w
                 WHERE tg_wallets.key_id = $1 AND tg_wallets.bucket = $2
                 RETURNING w.g",
                &[&key_id, &debit.bucket, &want],
            )
            .await
            .map_err(db_err)?;
        took = row.map_or(Decimal::ZERO, |r| r.get(0));
    }
    tracing::warn!(
        key_id,
        bucket = %debit.bucket,
        debit = %debit.amount,
        already_billed = %prev,
        taken = %took,
        "settled a request whose lease had been reaped"
    );
    Ok(record.map(|r| {
        let mut r = r.clone();
        r.cost = (prev + took).normalize();
        r.shortfall = (debit.charge - prev - took).max(Decimal::ZERO).normalize();
        r
    }))
}

/// Answers an operation that waits for its answer, once what came before it is committed.
fn answer(shared: &Shared, op: StoreOp, committed: Result<(), StoreError>) {
    let pending_failed = |e: &StoreError| db_err(format!("earlier writes are not committed: {e}"));
    match op {
        StoreOp::Flush(reply) | StoreOp::Barrier(reply) => {
            let _ = reply.send(committed);
        }
        StoreOp::Lease {
            key_id,
            bucket,
            need,
            want,
            reply,
        } => {
            let r = match &committed {
                Err(e) => Err(pending_failed(e)),
                Ok(()) => block(shared, lease(shared, key_id, bucket, need, want)),
            };
            let _ = reply.send(r);
        }
        StoreOp::LoadWallet { key_id, reply } => {
            let r = match &committed {
                Err(e) => Err(pending_failed(e)),
                Ok(()) => block(shared, load_lease(shared, key_id)),
            };
            let _ = reply.send(r);
        }
        StoreOp::SharedWallet { key_id, reply } => {
            let r = match &committed {
                Err(e) => Err(pending_failed(e)),
                Ok(()) => block(shared, shared_wallet(shared, key_id)).map(Some),
            };
            let _ = reply.send(r);
        }
        StoreOp::TopUp {
            key_id,
            bucket,
            amount,
            reference,
            reply,
            ..
        } => {
            let r = match &committed {
                Err(e) => Err(pending_failed(e)),
                Ok(()) => block(shared, topup(shared, key_id, bucket, amount, reference)),
            };
            let _ = reply.send(r);
        }
        StoreOp::PutKey {
            record,
            bootstrap_name,
            reply,
        } => {
            let r = match &committed {
                Err(e) => Err(pending_failed(e)),
                Ok(()) => block(shared, put_key(shared, *record, bootstrap_name)),
            };
            let _ = reply.send(r);
        }
        StoreOp::Prune {
            before_micros,
            reply,
        } => {
            let r = match &committed {
                Err(e) => Err(pending_failed(e)),
                Ok(()) => block(shared, prune(shared, before_micros)),
            };
            let _ = reply.send(r);
        }
        // Writes are added to the pending batch, never answered here.
        StoreOp::Settle { .. }
        | StoreOp::Record(_)
        | StoreOp::RecordIfAbsent(_)
        | StoreOp::Holds { .. }
        | StoreOp::ReleaseLease { .. } => {}
    }
}

/// Leases to this instance what [`StoreOp::Lease`] says of the bucket's balance that no lease
/// covers yet.
async fn lease(
    shared: &Shared,
    key_id: String,
    bucket: String,
    need: Decimal,
    want: Decimal,
) -> Result<LeaseGrant, StoreError> {
    let mut client = shared.pool.get().await.map_err(db_err)?;
    let tx = client.transaction().await.map_err(db_err)?;
    let ask = LeaseAsk {
        key_id,
        bucket,
        need,
        want,
    };
    let grant = lease_in(shared, &tx, &ask).await?;
    tx.commit().await.map_err(db_err)?;
    grant
}

/// Grants a lease inside `tx`. The outer error is the database's (the transaction is lost);
/// the inner one a refusal that leaves the transaction usable.
async fn lease_in(
    shared: &Shared,
    tx: &Transaction<'_>,
    ask: &LeaseAsk,
) -> Result<Result<LeaseGrant, StoreError>, StoreError> {
    let LeaseAsk {
        key_id,
        bucket,
        need,
        want,
    } = ask;
    let (need, want) = (*need, *want);
    let epoch = shared.epoch.load(Ordering::Acquire);
    let me = &shared.instance_id;
    // A lease belongs to this instance's registration: without it (reaped, not registered
    // again yet) nobody would ever reap the lease.
    let registered = tx
        .query_opt(
            "SELECT 1 FROM tg_instances WHERE instance_id = $1 AND epoch = $2 FOR SHARE",
            &[me, &(epoch as i64)],
        )
        .await
        .map_err(db_err)?;
    if registered.is_none() {
        return Ok(Err(db_err(
            "this instance's registration lapsed; it registers again at its next renewal",
        )));
    }
    let wallet = tx
        .query_opt(
            "SELECT balance, leased FROM tg_wallets WHERE key_id = $1 AND bucket = $2 FOR UPDATE",
            &[key_id, bucket],
        )
        .await
        .map_err(db_err)?;
    let Some(wallet) = wallet else {
        return Ok(Ok(LeaseGrant {
            amount: Decimal::ZERO,
            epoch,
            elsewhere: Decimal::ZERO,
        }));
    };
    let (balance, leased): (Decimal, Decimal) = (wallet.get(0), wallet.get(1));
    let own: Decimal = tx
        .query_opt(
            "SELECT amount FROM tg_leases WHERE instance_id = $1 AND key_id = $2 AND bucket = $3",
            &[me, key_id, bucket],
        )
        .await
        .map_err(db_err)?
        .map_or(Decimal::ZERO, |r| r.get(0));
    let free = (balance - leased).max(Decimal::ZERO);
    // What is needed if it is there; more, up to `want`, only while half the free balance
    // stays for the other instances.
    let granted = free.min(need.max(want.min(free / Decimal::TWO)).max(Decimal::ZERO));
    if granted > Decimal::ZERO {
        tx.execute(
            "UPDATE tg_wallets SET leased = leased + $3 WHERE key_id = $1 AND bucket = $2",
            &[key_id, bucket, &granted],
        )
        .await
        .map_err(db_err)?;
        let stmt = tx
            .prepare_cached(
                "INSERT INTO tg_leases (instance_id, key_id, bucket, amount) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (instance_id, key_id, bucket)
                 DO UPDATE SET amount = tg_leases.amount + EXCLUDED.amount",
            )
            .await
            .map_err(db_err)?;
        tx.execute(&stmt, &[me, key_id, bucket, &granted])
            .await
            .map_err(db_err)?;
    }
    Ok(Ok(LeaseGrant {
        amount: granted,
        epoch,
        elsewhere: (leased - own).max(Decimal::ZERO),
    }))
}

/// What this instance leases of a key's buckets (a wallet actor starting again after an idle
/// stop finds what its predecessor had not returned yet).
async fn load_lease(
    shared: &Shared,
    key_id: String,
) -> Result<crate::ledger::store::WalletState, StoreError> {
    let client = shared.pool.get().await.map_err(db_err)?;
    let rows = client
        .query(
            "SELECT bucket, amount FROM tg_leases WHERE instance_id = $1 AND key_id = $2",
            &[&shared.instance_id, &key_id],
        )
        .await
        .map_err(db_err)?;
    let balances = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, Decimal>(1)))
        .collect();
    Ok(crate::ledger::store::WalletState::from_balances(&balances))
}

async fn shared_wallet(shared: &Shared, key_id: String) -> Result<SharedWallet, StoreError> {
    let client = shared.pool.get().await.map_err(db_err)?;
    let balances = client
        .query(
            "SELECT bucket, balance FROM tg_wallets WHERE key_id = $1",
            &[&key_id],
        )
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, Decimal>(1)))
        .collect();
    let held_elsewhere = client
        .query(
            "SELECT bucket, sum(granted) FROM tg_holds
             WHERE key_id = $1 AND instance_id <> $2 GROUP BY bucket",
            &[&key_id, &shared.instance_id],
        )
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, Decimal>(1)))
        .collect();
    Ok(SharedWallet {
        balances,
        held_elsewhere,
    })
}

/// A top-up: applied once per reference (the reference's primary key settles a race between
/// instances, F7), durably when this answers.
async fn topup(
    shared: &Shared,
    key_id: String,
    bucket: String,
    amount: Decimal,
    reference: Option<String>,
) -> Result<TopupOutcome, StoreError> {
    let mut client = shared.pool.get().await.map_err(db_err)?;
    let tx = client.transaction().await.map_err(db_err)?;
    if let Some(r) = &reference {
        let inserted = tx
            .execute(
                "INSERT INTO tg_topup_refs (key_id, reference, bucket, amount)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (key_id, reference) DO NOTHING",
                &[&key_id, r, &bucket, &amount],
            )
            .await
            .map_err(db_err)?;
        if inserted == 0 {
            let row = tx
                .query_one(
                    "SELECT bucket, amount FROM tg_topup_refs WHERE key_id = $1 AND reference = $2",
                    &[&key_id, r],
                )
                .await
                .map_err(db_err)?;
            let prev = TopupRef {
                bucket: row.get(0),
                amount: row.get(1),
            };
            return Ok(if prev.bucket == bucket && prev.amount == amount {
                TopupOutcome::Duplicate
            } else {
                TopupOutcome::Conflict(prev)
            });
        }
    }
    tx.execute(
        "INSERT INTO tg_wallets (key_id, bucket, balance, leased) VALUES ($1, $2, $3, 0)
         ON CONFLICT (key_id, bucket) DO UPDATE SET balance = tg_wallets.balance + EXCLUDED.balance",
        &[&key_id, &bucket, &amount],
    )
    .await
    .map_err(db_err)?;
    tx.execute(
        "INSERT INTO tg_topups (key_id, bucket, amount, reference, at) VALUES ($1, $2, $3, $4, now())",
        &[&key_id, &bucket, &amount, &reference],
    )
    .await
    .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    Ok(TopupOutcome::Applied)
}

async fn put_key(
    shared: &Shared,
    record: ApiKeyRecord,
    bootstrap_name: Option<String>,
) -> Result<(), StoreError> {
    let client = shared.pool.get().await.map_err(db_err)?;
    let json = serde_json::to_value(&record).map_err(db_err)?;
    client
        .execute(
            "INSERT INTO tg_keys (id, secret_sha256, bootstrap_name, created_at, record)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE
             SET secret_sha256 = EXCLUDED.secret_sha256, record = EXCLUDED.record,
                 bootstrap_name = COALESCE(EXCLUDED.bootstrap_name, tg_keys.bootstrap_name)",
            &[
                &record.id,
                &record.secret_sha256,
                &bootstrap_name,
                &record.created_at,
                &json,
            ],
        )
        .await
        .map_err(db_err)?;
    Ok(())
}

async fn prune(shared: &Shared, before_micros: u64) -> Result<usize, StoreError> {
    let before = DateTime::<Utc>::from_timestamp_micros(before_micros as i64)
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    let client = shared.pool.get().await.map_err(db_err)?;
    let n = client
        .execute(
            "DELETE FROM tg_ledger WHERE request_id IN
               (SELECT request_id FROM tg_ledger WHERE started_at < $1 LIMIT $2)",
            &[&before, &(crate::ledger::writer::PRUNE_MAX as i64)],
        )
        .await
        .map_err(db_err)?;
    Ok(n as usize)
}

/// One statement: renews this instance's registration (of its current epoch), drops its lease
/// rows spent to zero, counts the live instances and the expired others, and fingerprints the
/// key table (every row version of a key has its own `xmin`; a deletion changes the count).
const HEARTBEAT: &str = "WITH r AS (UPDATE tg_instances
                SET expires_at = now() + $3::float8 * interval '1 millisecond'
                WHERE instance_id = $1 AND epoch = $2 RETURNING 1),
          z AS (DELETE FROM tg_leases WHERE instance_id = $1 AND amount = 0)
     SELECT (SELECT count(*) FROM r),
            (SELECT count(*) FROM tg_instances WHERE expires_at > now()),
            (SELECT count(*) FROM tg_instances WHERE expires_at < now() AND instance_id <> $1),
            (SELECT (count(*) << 32) + coalesce(sum(hashtext(id || ':' || xmin::text)), 0)
             FROM tg_keys)";

/// What a [`HEARTBEAT`] answered.
#[derive(Clone, Copy, Debug)]
struct Beat {
    renewed: bool,
    live: i64,
    expired: i64,
    keys: i64,
}

impl Beat {
    fn from_row(row: &tokio_postgres::Row) -> Beat {
        Beat {
            renewed: row.get::<_, i64>(0) == 1,
            live: row.get(1),
            expired: row.get(2),
            keys: row.get(3),
        }
    }
}

/// Beats this instance's heart: `folded` is the answer of a heartbeat that ran inside a batch;
/// without one, it runs on its own. Registers again (with a new epoch, so that leases granted
/// before no longer count) if another instance reaped it meanwhile, and reaps the expired
/// instances once connected for a whole TTL.
fn heartbeat(
    shared: &Shared,
    health: &mut Health,
    failing: &AtomicBool,
    idle: bool,
    folded: Option<Beat>,
) {
    let me = shared.instance_id.clone();
    let ttl_ms = shared.ttl.as_millis() as f64;
    let epoch = shared.epoch.load(Ordering::Acquire) as i64;
    let pool = shared.pool.clone();
    let r = match folded {
        Some(beat) if beat.renewed => Ok((None, beat)),
        _ => block(shared, async move {
            let client = pool.get().await.map_err(db_err)?;
            let beat = match folded {
                Some(beat) => beat,
                None => Beat::from_row(
                    &client
                        .query_one(HEARTBEAT, &[&me, &epoch, &ttl_ms])
                        .await
                        .map_err(db_err)?,
                ),
            };
            if beat.renewed {
                return Ok((None, beat));
            }
            let fresh = new_epoch();
            client
                .execute(
                    "INSERT INTO tg_instances (instance_id, epoch, started_at, expires_at)
                     VALUES ($1, $2, now(), now() + $3::float8 * interval '1 millisecond')
                     ON CONFLICT (instance_id) DO UPDATE
                     SET epoch = EXCLUDED.epoch, started_at = EXCLUDED.started_at,
                         expires_at = EXCLUDED.expires_at",
                    &[&me, &(fresh as i64), &ttl_ms],
                )
                .await
                .map_err(db_err)?;
            Ok((
                Some(fresh),
                Beat {
                    live: beat.live + 1,
                    ..beat
                },
            ))
        }),
    };
    match r {
        Ok((fresh, beat)) => {
            let live = u32::try_from(beat.live).unwrap_or(u32::MAX).max(1);
            shared.instances.store(live, Ordering::Relaxed);
            shared
                .keys_version
                .store(beat.keys as u64, Ordering::Release);
            if let Some(e) = fresh {
                tracing::error!(
                    instance_id = %shared.instance_id,
                    "this instance's registration had lapsed and its leases were reaped; registered again"
                );
                shared.epoch.store(e, Ordering::Release);
            }
            if health.connected_since.is_none() {
                tracing::info!("the database answers again");
                health.connected_since = Some(Instant::now());
            }
            if idle {
                failing.store(false, Ordering::Release);
            }
            // Now and then also without an expired instance: the reaper clears the marks of
            // batches long committed.
            let cleanup = rand::random::<u16>() < 256;
            if (beat.expired > 0 || cleanup)
                && health
                    .connected_since
                    .is_some_and(|t| t.elapsed() >= shared.ttl)
            {
                reap_expired(shared);
            }
        }
        Err(e) => {
            if health.connected_since.take().is_some() {
                tracing::error!(error = %e, "cannot renew this instance's registration: the database is unreachable");
            }
            failing.store(true, Ordering::Release);
        }
    }
}

/// Reaps the instances whose registration expired (a few per round).
fn reap_expired(shared: &Shared) {
    let me = shared.instance_id.clone();
    let pool = shared.pool.clone();
    let r = block(shared, async move {
        let mut client = pool.get().await.map_err(db_err)?;
        let tx = client.transaction().await.map_err(db_err)?;
        let dead: Vec<String> = tx
            .query(
                "SELECT instance_id FROM tg_instances
                 WHERE expires_at < now() AND instance_id <> $1
                 ORDER BY expires_at LIMIT 8 FOR UPDATE SKIP LOCKED",
                &[&me],
            )
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut out = Vec::new();
        for d in dead {
            let n = reap(&tx, &d).await?;
            out.push((d, n));
        }
        // The marks of batches long committed (the heartbeat also calls this now and then
        // when no instance expired, for this).
        tx.execute(
            "DELETE FROM tg_batches WHERE at < now() - interval '1 hour'",
            &[],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(out)
    });
    match r {
        Ok(reaped) => {
            for (instance, holds) in reaped {
                tracing::warn!(
                    reaped_instance = %instance,
                    holds,
                    "reaped an instance whose registration expired: open holds billed as interrupted, leases returned"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "reaping expired instances failed; tried again"),
    }
}

pub(super) fn hold_from_row(r: &tokio_postgres::Row) -> Result<PersistedHold, StoreError> {
    let draft: LedgerRecord = decode_compact(b"tg_holds", r.get::<_, &[u8]>(7))?;
    Ok(PersistedHold {
        hold_id: r.get::<_, i64>(0) as u64,
        key_id: r.get(1),
        bucket: r.get(2),
        granted: r.get(3),
        consumed: r.get(4),
        consumed_tokens: r.get::<_, i64>(5).max(0) as u64,
        updated_at: r.get(6),
        draft: Box::new(draft),
    })
}

/// Settles everything `instance` left: each open hold at its persisted consumption (as far as
/// its lease covers it) with an `interrupted` record, then the rest of its leases back to the
/// balances; removes its registration. Returns the number of holds billed. Runs inside the
/// caller's transaction.
pub(super) async fn reap(tx: &Transaction<'_>, instance: &str) -> Result<usize, StoreError> {
    let mut leases: BTreeMap<(String, String), Decimal> = tx
        .query(
            "SELECT key_id, bucket, amount FROM tg_leases WHERE instance_id = $1 FOR UPDATE",
            &[&instance],
        )
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let holds: Vec<PersistedHold> = tx
        .query(
            "SELECT hold_id, key_id, bucket, granted, consumed, consumed_tokens, updated_at, draft
             FROM tg_holds WHERE instance_id = $1 ORDER BY hold_id FOR UPDATE",
            &[&instance],
        )
        .await
        .map_err(db_err)?
        .iter()
        .map(hold_from_row)
        .collect::<Result<_, _>>()?;
    let mut records = Vec::with_capacity(holds.len());
    for h in &holds {
        let lease = leases
            .entry((h.key_id.clone(), h.bucket.clone()))
            .or_default();
        let debit = h.consumed.min(*lease).max(Decimal::ZERO);
        *lease -= debit;
        if debit > Decimal::ZERO {
            tx.execute(
                "UPDATE tg_wallets SET balance = balance - $3, leased = GREATEST(leased - $3, 0)
                 WHERE key_id = $1 AND bucket = $2",
                &[&h.key_id, &h.bucket, &debit],
            )
            .await
            .map_err(db_err)?;
        }
        records.push(interrupted_record(h, debit));
    }
    for ((key, bucket), amount) in &leases {
        if *amount > Decimal::ZERO {
            tx.execute(
                "UPDATE tg_wallets SET leased = GREATEST(leased - $3, 0)
                 WHERE key_id = $1 AND bucket = $2",
                &[key, bucket, amount],
            )
            .await
            .map_err(db_err)?;
        }
    }
    let refs: Vec<&LedgerRecord> = records.iter().collect();
    write_records(tx, &refs, true, instance).await?;
    for table in [
        "DELETE FROM tg_holds WHERE instance_id = $1",
        "DELETE FROM tg_leases WHERE instance_id = $1",
        "DELETE FROM tg_instances WHERE instance_id = $1",
    ] {
        tx.execute(table, &[&instance]).await.map_err(db_err)?;
    }
    Ok(holds.len())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn d(n: i64) -> Decimal {
        Decimal::from(n)
    }

    fn hold(id: u64) -> PersistedHold {
        PersistedHold {
            hold_id: id,
            key_id: "k".into(),
            bucket: "credit".into(),
            granted: d(4),
            consumed: d(1),
            consumed_tokens: 1,
            updated_at: Utc::now(),
            draft: Box::new(LedgerRecord::empty(format!("req-{id}"), Utc::now())),
        }
    }

    fn settle(hold_id: u64, amount: i64, epoch: u64) -> StoreOp {
        let mut rec = LedgerRecord::empty(format!("req-{hold_id}"), Utc::now());
        rec.cost = d(amount);
        StoreOp::Settle {
            key_id: "k".into(),
            balances: Default::default(),
            debit: Debit {
                bucket: "credit".into(),
                amount: d(amount),
                charge: d(amount),
                epoch,
            },
            hold_id: Some(hold_id),
            drew: true,
            record: Some(Box::new(rec)),
        }
    }

    /// What a batch commits: debits grouped per wallet with their records, holds written and
    /// settled within the batch never written, settlements and returns of an earlier lease
    /// epoch kept apart (their lease was reaped).
    #[test]
    fn a_batch_groups_debits_and_keeps_reaped_leases_apart() {
        let mut p = Pending::default();
        p.add(
            StoreOp::Holds {
                new: vec![hold(1).into(), hold(2).into()],
                drawn: vec![],
            },
            7,
        );
        p.add(
            StoreOp::Holds {
                new: vec![],
                drawn: vec![HoldDrawn {
                    hold_id: 2,
                    consumed: d(3),
                    consumed_tokens: 3,
                    updated_at: Utc::now(),
                }],
            },
            7,
        );
        // Hold 1 settles in the same batch: no row for it at all; hold 9 was written before.
        p.add(settle(1, 2, 7), 7);
        p.add(settle(9, 3, 7), 7);
        // A settlement of an earlier epoch, and a return of one: the lease is gone.
        p.add(settle(5, 1, 6), 7);
        for epoch in [7, 6] {
            p.add(
                StoreOp::ReleaseLease {
                    key_id: "k".into(),
                    bucket: "credit".into(),
                    amount: d(2),
                    epoch,
                },
                7,
            );
        }
        assert_eq!(p.ops, 7);
        assert_eq!(p.holds_new.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(
            p.holds_new[&2].consumed,
            d(3),
            "drawn merged into the new hold"
        );
        assert!(p.holds_drawn.is_empty());
        assert_eq!(
            p.holds_done.iter().copied().collect::<HashSet<_>>(),
            [9, 5].into()
        );
        let key = ("k".to_string(), "credit".to_string());
        let (total, settles) = &p.debits[&key];
        assert_eq!(*total, d(5));
        assert_eq!(settles.len(), 2);
        assert_eq!(p.lost.len(), 1);
        assert_eq!(p.lost[0].1.amount, d(1));
        assert_eq!(
            p.releases[&key],
            d(2),
            "only the current epoch's return counts"
        );
    }
}
