//! The WalletActor: one per API key, the only owner of that key's balances and holds. A stream
//! talks to it once per hold grant, extension and settlement — never per token.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rust_decimal::Decimal;

use super::registry::Shard;
use super::{Drawn, WalletError};
use crate::ledger::store::{
    decode_compact, encode_compact, Balances, HoldDrawn, NewHold, StoreError,
};
use crate::ledger::writer::{Debit, LeaseGrant, StoreOp, TopupOutcome};
use crate::ledger::{LedgerRecord, LedgerWriter};

struct OpenHold {
    bucket: String,
    granted: Decimal,
    /// What the request has drawn so far; it writes, the flush reads (R9).
    drawn: Arc<Drawn>,
    /// The consumption last handed to the writer.
    saved: (Decimal, u64),
    /// The request's draft record, encoded compactly (see [`encode_draft`]).
    draft: Box<[u8]>,
    /// An `h/` entry was queued for this hold: the settlement must remove it.
    persisted: bool,
    /// A `c/` entry (its consumption) was queued for this hold: the settlement removes it too.
    drew: bool,
    /// The lease epoch the hold was granted under (0 without leases).
    epoch: u64,
}

/// How a wallet actor gets money to grant holds from. With sled, one process owns the store
/// and the actor holds the whole balance. In a fleet the actor holds a lease: a part of the
/// balance the shared store set aside for this instance; it asks for more when the lease runs
/// short, and gives back what it does not use.
struct Lease {
    /// The epoch the actor's balances were leased under (see [`LedgerWriter::epoch`]).
    epoch: u64,
    /// Spending per bucket, to size the next lease.
    spend: BTreeMap<String, SpendRate>,
    /// Per bucket, when the store last answered that it had nothing more to lease (it granted
    /// less than was needed, after asking again while other instances leased the rest). A
    /// reservation sent before that answer was covered by it: the database was asked after the
    /// reservation was made, so it is refused at once instead of asking again. A burst on a
    /// drained key then costs one round of asks per batch of waiting reservations, not one each.
    dry: BTreeMap<String, Instant>,
}

/// A bucket's recent spending, to size leases: about [`LEASE_HORIZON`] of it, so that a busy
/// key takes one lease per horizon instead of one per request, and an idle one holds little.
#[derive(Default)]
struct SpendRate {
    since: Option<Instant>,
    spent: Decimal,
    settles: u32,
    /// Spent per [`LEASE_HORIZON`], from the last full window.
    per_horizon: Decimal,
    /// Settlements in the last full window.
    settles_per_horizon: u32,
}

/// Settlements per [`LEASE_HORIZON`] from which a key counts as busy: its lease then keeps a
/// horizon of spending between requests instead of going back after each one.
const BUSY_SETTLES: u32 = 3;

/// The spending a lease is sized to cover.
const LEASE_HORIZON: Duration = Duration::from_secs(1);
/// A leased wallet idle this long gives its unused lease back (well within the 2 s that F2
/// allows, with the check's own period).
const LEASE_IDLE: Duration = Duration::from_millis(1000);
/// How often a leased wallet checks whether to give lease back.
const LEASE_CHECK: Duration = Duration::from_millis(250);
/// A lease that falls short while other instances lease the bucket is asked for again this
/// many times, this far apart (F2: the balance leased elsewhere may be on its way back).
const LEASE_RETRIES: u32 = 4;
const LEASE_RETRY_WAIT: Duration = Duration::from_millis(25);
/// How long an extension takes the store's "nothing more to lease" as still true: about one
/// round of asks.
const DRY_MEMORY: Duration = Duration::from_millis(100);

impl SpendRate {
    fn add(&mut self, amount: Decimal) {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= LEASE_HORIZON {
            self.per_horizon = self.spent;
            self.settles_per_horizon = self.settles;
            self.spent = Decimal::ZERO;
            self.settles = 0;
            self.since = Some(now);
        }
        self.spent += amount;
        self.settles = self.settles.saturating_add(1);
    }

    fn busy(&self) -> bool {
        self.settles.max(self.settles_per_horizon) >= BUSY_SETTLES
    }

    fn recent(&self) -> Decimal {
        self.per_horizon.max(self.spent)
    }

    /// What to lease when `short` more is needed now: that, plus a horizon of recent spending.
    fn chunk(&self, short: Decimal) -> Decimal {
        self.recent() + short
    }
}

/// Persists open holds' consumption every flush interval while the actor itself cannot (it
/// waits for the store and handles nothing else meanwhile).
struct ConsumptionFlusher {
    writer: LedgerWriter,
    interval: Duration,
    /// When the next flush is due.
    next: Instant,
    /// (hold, its consumption slot, the consumption last handed to the writer).
    holds: Vec<(u64, Arc<Drawn>, (Decimal, u64))>,
    /// When it last handed consumption to the writer, if it did.
    flushed: Option<Instant>,
}

impl ConsumptionFlusher {
    /// Runs `wait` to its end, persisting the holds' consumption each time a flush is due
    /// meanwhile. Returns what `wait` gave, and itself for [`WalletActor::saved_meanwhile`].
    async fn persist_while<T>(mut self, wait: impl std::future::Future<Output = T>) -> (T, Self) {
        if self.holds.is_empty() {
            return (wait.await, self);
        }
        let mut wait = std::pin::pin!(wait);
        loop {
            let due = tokio::time::Instant::from_std(self.next);
            tokio::select! {
                r = &mut wait => return (r, self),
                _ = tokio::time::sleep_until(due) => self.flush(),
            }
        }
    }

    fn flush(&mut self) {
        let now = Instant::now();
        self.next = now + self.interval;
        self.flushed = Some(now);
        let at = chrono::Utc::now();
        let mut drawn = Vec::new();
        for (id, slot, saved) in &mut self.holds {
            let current = slot.get();
            if *saved != current {
                *saved = current;
                drawn.push(HoldDrawn {
                    hold_id: *id,
                    consumed: current.0,
                    consumed_tokens: current.1,
                    updated_at: at,
                });
            }
        }
        if drawn.is_empty() {
            return;
        }
        if let Err(e) = self.writer.send(StoreOp::Holds {
            new: Vec::new(),
            drawn,
        }) {
            tracing::error!(error = %e, "cannot persist holds");
        }
    }
}

/// What a wallet actor in a fleet publishes as it changes, for the wallet view to read without
/// waiting in the actor's mailbox (behind reservations that wait for the store to lease more).
#[derive(Debug, Default)]
pub struct Published {
    pub held: Balances,
    pub open_holds: usize,
}

/// A key's wallet state: balances, holds, lease. Shared between the key's [`WalletActor`] (its
/// timers, top-ups, leases, and whatever must wait for the store) and the requests, which
/// reserve, extend and settle on their own thread under its lock when nothing waits (see
/// [`WalletCore::serves_now`]). The lock, like the actor's mailbox, lets one operation at a
/// time touch the state; it is never held across a wait.
pub struct WalletCore {
    key_id: Arc<str>,
    balances: Balances,
    held: BTreeMap<String, Decimal>,
    holds: HashMap<u64, OpenHold>,
    writer: LedgerWriter,
    shard: Arc<Shard>,
    flush_interval: Duration,
    /// When the open holds were last handed to the writer (see [`WalletActor::flush_holds`]).
    last_flush: Instant,
    idle_timeout: Duration,
    last_activity: Instant,
    loaded: bool,
    /// `Some` when balances are leased from a shared store (a fleet).
    lease: Option<Lease>,
    /// In a fleet: `held` and the count of open holds, kept current (see [`Published`]).
    published: Option<Arc<parking_lot::Mutex<Published>>>,
    /// The actor waits for the store (a lease, a top-up) and handles nothing else meanwhile:
    /// operations go through its mailbox, in order, until it is done.
    waiting: bool,
    /// The actor stopped (idle, or shutdown): a new reservation goes to a fresh actor.
    stopped: bool,
}

/// The actor of one key's wallet: owns the [`WalletCore`]'s timers and every operation that
/// waits for the store, and takes the requests' operations whenever the core cannot serve them
/// on the caller's thread.
pub struct WalletActor {
    pub(super) core: Arc<parking_lot::Mutex<WalletCore>>,
}

/// A handler's answer: at once, or after a round trip to the store during which the actor
/// handles no other message (so that, e.g., a release for a reservation still waiting for its
/// lease cannot overtake it).
pub enum Answer<T: 'static> {
    Now(T),
    Later(AtomicResponse<WalletActor, T>),
}

impl<M, T> actix::dev::MessageResponse<WalletActor, M> for Answer<T>
where
    M: Message<Result = T>,
    T: 'static,
{
    fn handle(self, ctx: &mut Context<WalletActor>, tx: Option<actix::dev::OneshotSender<T>>) {
        match self {
            Answer::Now(v) => {
                if let Some(tx) = tx {
                    let _ = tx.send(v);
                }
            }
            Answer::Later(r) => <AtomicResponse<WalletActor, T> as actix::dev::MessageResponse<
                WalletActor,
                M,
            >>::handle(r, ctx, tx),
        }
    }
}

impl WalletCore {
    pub(super) fn new(
        key_id: Arc<str>,
        writer: LedgerWriter,
        shard: Arc<Shard>,
        flush_interval: Duration,
        idle_timeout: Duration,
        published: Option<Arc<parking_lot::Mutex<Published>>>,
    ) -> Self {
        let lease = writer.leases().then(|| Lease {
            epoch: writer.epoch(),
            spend: BTreeMap::new(),
            dry: BTreeMap::new(),
        });
        WalletCore {
            key_id,
            balances: Balances::new(),
            held: BTreeMap::new(),
            holds: HashMap::new(),
            lease,
            published,
            writer,
            shard,
            flush_interval,
            last_flush: Instant::now(),
            idle_timeout,
            last_activity: Instant::now(),
            loaded: false,
            waiting: false,
            stopped: false,
        }
    }

    pub(super) fn balance(&self, bucket: &str) -> Decimal {
        self.balances.get(bucket).copied().unwrap_or_default()
    }

    pub(super) fn held(&self, bucket: &str) -> Decimal {
        self.held.get(bucket).copied().unwrap_or_default()
    }

    /// Balance not covered by any hold; never negative.
    fn available(&self, bucket: &str) -> Decimal {
        (self.balance(bucket) - self.held(bucket)).max(Decimal::ZERO)
    }

    /// Changes the amount held in `bucket` by `delta`. Holds are granted from the balance, so
    /// the sum stays within it; an impossible overflow leaves the sum as it was.
    fn add_held(&mut self, bucket: &str, delta: Decimal) {
        let h = self.held.entry(bucket.to_string()).or_default();
        match h.checked_add(delta) {
            Some(v) => *h = v,
            None => tracing::error!(key_id = %self.key_id, bucket, "held amount overflow"),
        }
        if h.is_zero() {
            self.held.remove(bucket);
        }
        self.publish(bucket);
    }

    /// Publishes `bucket`'s held amount and the count of open holds (in a fleet).
    fn publish(&self, bucket: &str) {
        let Some(p) = &self.published else {
            return;
        };
        let mut p = p.lock();
        match (self.held.get(bucket), p.held.get_mut(bucket)) {
            (Some(v), Some(slot)) => *slot = *v,
            (Some(v), None) => {
                p.held.insert(bucket.to_string(), *v);
            }
            (None, _) => {
                p.held.remove(bucket);
            }
        }
        p.open_holds = self.holds.len();
    }

    /// Persists what the store does not have yet: each new hold once (with its draft record),
    /// and the consumption of every hold that drew since the last flush (R9). Runs every flush
    /// interval; a crash thus loses at most one interval of consumption per open hold.
    fn flush_holds(&mut self) {
        self.last_flush = Instant::now();
        let now = chrono::Utc::now();
        let key_id = &self.key_id;
        let mut new = Vec::new();
        let mut drawn = Vec::new();
        for (id, h) in self.holds.iter_mut() {
            let (consumed, tokens) = h.drawn.get();
            if !h.persisted {
                h.persisted = true;
                h.saved = (consumed, tokens);
                // The draft stays encoded: the writer copies its bytes into the hold's entry.
                new.push(NewHold {
                    hold_id: *id,
                    key_id: key_id.to_string(),
                    bucket: h.bucket.clone(),
                    granted: h.granted,
                    consumed,
                    consumed_tokens: tokens,
                    updated_at: now,
                    draft: h.draft.clone(),
                });
            } else if h.saved != (consumed, tokens) {
                h.saved = (consumed, tokens);
                h.drew = true;
                drawn.push(HoldDrawn {
                    hold_id: *id,
                    consumed,
                    consumed_tokens: tokens,
                    updated_at: now,
                });
            }
        }
        if !new.is_empty() || !drawn.is_empty() {
            if let Err(e) = self.writer.send(StoreOp::Holds { new, drawn }) {
                tracing::error!(error = %e, key_id = %self.key_id, "cannot persist holds");
            }
        }
    }

    /// The open holds' consumption slots, to persist while the actor waits for the store
    /// (see [`WalletActor::with_more_lease`]). Only holds already persisted: a wait starts with
    /// a flush when one is due, which persists the new ones.
    fn consumption_flusher(&self) -> ConsumptionFlusher {
        ConsumptionFlusher {
            writer: self.writer.clone(),
            interval: self.flush_interval,
            next: self.last_flush + self.flush_interval,
            holds: self
                .holds
                .iter()
                .filter(|(_, h)| h.persisted)
                .map(|(id, h)| (*id, h.drawn.clone(), h.saved))
                .collect(),
            flushed: None,
        }
    }

    /// Takes note of what a [`ConsumptionFlusher`] persisted during a wait.
    fn saved_meanwhile(&mut self, f: ConsumptionFlusher) {
        let Some(at) = f.flushed else {
            return;
        };
        self.last_flush = at;
        for (id, _, saved) in f.holds {
            if let Some(h) = self.holds.get_mut(&id) {
                h.saved = saved;
            }
        }
    }

    /// Runs a handler's body; a panic in it (a bug: arithmetic is checked) is caught, so that the
    /// actor and every hold it keeps live on (R40). Bodies change the state only once nothing
    /// can fail any more, so a caught panic leaves it as it was. The open holds are persisted
    /// at once, so that even a later crash settles them.
    fn guarded<R>(
        &mut self,
        what: &'static str,
        failed: R,
        body: impl FnOnce(&mut Self) -> R,
    ) -> R {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(self))) {
            Ok(r) => r,
            Err(_) => {
                tracing::error!(key_id = %self.key_id, what, "wallet handler failed; state and holds kept");
                self.flush_holds();
                failed
            }
        }
    }

    /// Whether requests may reserve, extend and settle here and now, on their own thread: the
    /// wallet is loaded, its actor runs and waits for nothing.
    fn serves_now(&self) -> bool {
        self.loaded && !self.stopped && !self.waiting
    }

    /// Whether the actor waits for the store (see [`WalletCore::serves_now`]).
    #[cfg(test)]
    pub(crate) fn waits(&self) -> bool {
        self.waiting
    }
}

impl WalletActor {
    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        let mut c = self.core.lock();
        if c.holds.is_empty() && c.last_activity.elapsed() >= c.idle_timeout {
            c.return_lease(true);
            // No request may use this core any more; the ones that looked it up before this
            // line go to the actor's mailbox, find it stopped, and start a new one.
            c.stopped = true;
            // Leave the registry first, so new requests start a fresh actor, which loads the
            // state through the writer queue after everything this one sent.
            c.shard.forget(&c.key_id, &ctx.address());
            ctx.stop();
        }
    }
}

impl Actor for WalletActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        metrics::gauge!(crate::metrics::WALLET_ACTORS).increment(1.0);
        ctx.set_mailbox_capacity(4096);
        let c = self.core.lock();
        let writer = c.writer.clone();
        let key_id = c.key_id.to_string();
        let (flush_interval, idle_timeout, leased) =
            (c.flush_interval, c.idle_timeout, c.lease.is_some());
        drop(c);
        // Block every message until the state is loaded (the requests' own calls wait for
        // `loaded` and come through here meanwhile).
        ctx.wait(
            async move {
                writer
                    .ask(|reply| StoreOp::LoadWallet { key_id, reply })
                    .await
            }
            .into_actor(self)
            .map(|res, act, ctx| {
                let mut c = act.core.lock();
                match res {
                    Ok(state) => {
                        c.balances = state.balances();
                        c.loaded = true;
                        let epoch = c.writer.epoch();
                        if let Some(l) = &mut c.lease {
                            l.epoch = epoch;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, key_id = %c.key_id, "cannot load wallet");
                        c.stopped = true;
                        c.shard.forget(&c.key_id, &ctx.address());
                        ctx.stop();
                    }
                }
            }),
        );
        ctx.run_interval(flush_interval, |act, _| act.core.lock().flush_holds());
        let idle_check =
            (idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        ctx.run_interval(idle_check, |act, ctx| act.check_idle(ctx));
        if leased {
            ctx.run_interval(LEASE_CHECK, |act, _| {
                let mut c = act.core.lock();
                let idle = c.last_activity.elapsed() >= LEASE_IDLE;
                c.return_lease(idle);
            });
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        metrics::gauge!(crate::metrics::WALLET_ACTORS).decrement(1.0);
        let mut c = self.core.lock();
        c.stopped = true;
        // Only reachable with holds open at process shutdown: persist the consumption so
        // recovery settles it.
        c.flush_holds();
    }
}

/// Reserve between `min` and `want` in `bucket` (R4): a partial grant is fine as long as it
/// covers `min` (input cost plus one output token).
pub struct Reserve {
    pub hold_id: u64,
    pub bucket: String,
    pub min: Decimal,
    pub want: Decimal,
    /// The request's draft record from [`encode_draft`]: persisted with the hold for crash
    /// recovery. Kept encoded, it is one allocation of a few hundred bytes per open hold
    /// instead of a record with a score of strings (about 1.5 KiB).
    pub draft: Box<[u8]>,
    /// Shared with the request's [`super::Hold`], which records its draws in it.
    pub drawn: Arc<Drawn>,
    /// When the reservation was made (see [`Lease::dry`]).
    pub sent: Instant,
}

/// Encodes a draft record for [`Reserve`].
pub fn encode_draft(draft: &LedgerRecord) -> Box<[u8]> {
    encode_compact(draft).into_boxed_slice()
}

impl Message for Reserve {
    type Result = Result<Decimal, WalletError>;
}

impl Handler<Reserve> for WalletActor {
    type Result = Answer<Result<Decimal, WalletError>>;
    fn handle(&mut self, m: Reserve, _: &mut Context<Self>) -> Self::Result {
        let failed = || {
            Err(WalletError::Unavailable(
                "the wallet failed to reserve".into(),
            ))
        };
        let core = self.core.clone();
        let mut c = core.lock();
        if c.loaded && !c.dry_since(&m.bucket, m.sent) {
            if let Some(more) = c.lease_shortfall(&m.bucket, m.want.max(m.min)) {
                let bucket = m.bucket.clone();
                return self.with_more_lease(&mut c, bucket, more, move |c| {
                    c.guarded("reserve", failed(), |c| c.reserve(m))
                });
            }
        }
        Answer::Now(c.guarded("reserve", failed(), |c| c.reserve(m)))
    }
}

impl WalletCore {
    /// Reserves on the caller's thread when nothing needs the actor: the wallet serves now (see
    /// [`WalletCore::serves_now`]) and, in a fleet, the lease covers the grant. Gives the
    /// message back otherwise, for the actor's mailbox.
    pub(super) fn try_reserve(
        &mut self,
        m: Reserve,
    ) -> Result<Result<Decimal, WalletError>, Reserve> {
        if !self.serves_now() || self.lease_shortfall(&m.bucket, m.want.max(m.min)).is_some() {
            return Err(m);
        }
        let failed = Err(WalletError::Unavailable(
            "the wallet failed to reserve".into(),
        ));
        Ok(self.guarded("reserve", failed, |c| c.reserve(m)))
    }

    /// [`WalletCore::try_reserve`] for an extension.
    pub(super) fn try_extend(&mut self, m: Extend) -> Result<Decimal, Extend> {
        let short = self.lease.is_some()
            && self
                .holds
                .get(&m.hold_id)
                .is_some_and(|h| self.lease_shortfall(&h.bucket, m.want).is_some());
        if !self.serves_now() || short {
            return Err(m);
        }
        Ok(self.guarded("extend", Decimal::ZERO, |c| c.extend(m)))
    }

    /// Settles on the caller's thread unless the actor waits for the store (then the
    /// settlement queues behind what waits, as every message does). A stopped actor's core
    /// still settles: its holds are settled here rather than lost with its mailbox.
    pub(super) fn try_settle(&mut self, m: Settle) -> Result<Settled, Settle> {
        if !self.loaded || self.waiting {
            return Err(m);
        }
        let failed = Settled {
            debited: Decimal::ZERO,
            shortfall: m.charge.max(Decimal::ZERO),
        };
        Ok(self.guarded("settle", failed, |c| c.settle(m)))
    }
}

impl WalletActor {
    /// Asks the store to lease `amount` more of `bucket`, then runs `then`; the actor handles
    /// no other message meanwhile. When the store cannot answer, `then` grants from what is
    /// leased already (open streams go on while the database is away, F6).
    ///
    /// While it waits, the actor's own flush interval does not run (nothing does), yet its
    /// other streams go on delivering: their consumption is persisted from here instead, at
    /// the same pace (R9, F3: a crash during a slow lease, or a chain of them, still costs at
    /// most one flush interval per open stream).
    ///
    /// Requests' own calls see the core waiting and queue in the mailbox behind this.
    fn with_more_lease<T: 'static>(
        &mut self,
        c: &mut WalletCore,
        bucket: String,
        (need, want): (Decimal, Decimal),
        then: impl FnOnce(&mut WalletCore) -> T + 'static,
    ) -> Answer<T> {
        if c.last_flush.elapsed() >= c.flush_interval {
            c.flush_holds();
        }
        c.waiting = true;
        let consumption = c.consumption_flusher();
        let writer = c.writer.clone();
        let key_id = c.key_id.to_string();
        let asked = bucket.clone();
        let leased = async move {
            // What other instances lease may come back in a moment (their streams end and
            // return what they did not use): ask again a few times before giving up.
            let mut got: Option<LeaseGrant> = None;
            for attempt in 0..=LEASE_RETRIES {
                if attempt > 0 {
                    tokio::time::sleep(LEASE_RETRY_WAIT).await;
                }
                let (key_id, bucket) = (key_id.clone(), asked.clone());
                let left = need - got.map_or(Decimal::ZERO, |g| g.amount);
                let grant = writer
                    .ask(|reply| StoreOp::Lease {
                        key_id,
                        bucket,
                        need: left,
                        want: want.max(left),
                        reply,
                    })
                    .await?;
                let total = match got {
                    Some(g) if g.epoch == grant.epoch => g.amount + grant.amount,
                    _ => grant.amount,
                };
                got = Some(LeaseGrant {
                    amount: total,
                    ..grant
                });
                if total >= need || grant.elsewhere.is_zero() {
                    break;
                }
            }
            got.ok_or(StoreError::WriterGone)
        };
        Answer::Later(AtomicResponse::new(Box::pin(
            consumption.persist_while(leased).into_actor(self).map(
                move |(res, flushed), act: &mut WalletActor, _| {
                    let mut c = act.core.lock();
                    c.waiting = false;
                    c.saved_meanwhile(flushed);
                    match res {
                        Ok(grant) => {
                            if let Some(l) = &mut c.lease {
                                if grant.amount < need {
                                    l.dry.insert(bucket.clone(), Instant::now());
                                } else {
                                    l.dry.remove(&bucket);
                                }
                            }
                            c.add_lease(&bucket, grant)
                        }
                        Err(e) => tracing::warn!(
                            error = %e,
                            key_id = %c.key_id,
                            bucket,
                            "cannot lease more of the balance; granting from this instance's lease"
                        ),
                    }
                    then(&mut c)
                },
            ),
        )))
    }
}

impl WalletCore {
    /// Whether the store answered after `sent` that `bucket` had nothing more to lease.
    fn dry_since(&self, bucket: &str, sent: Instant) -> bool {
        self.lease
            .as_ref()
            .and_then(|l| l.dry.get(bucket))
            .is_some_and(|answered| *answered >= sent)
    }

    /// With a lease that cannot grant `want` in `bucket`: what it lacks, and how much to ask
    /// the store for (that, plus the bucket's recent spending, see [`SpendRate`]).
    fn lease_shortfall(&self, bucket: &str, want: Decimal) -> Option<(Decimal, Decimal)> {
        let lease = self.lease.as_ref()?;
        let short = want.checked_sub(self.available(bucket))?;
        if short <= Decimal::ZERO {
            return None;
        }
        let chunk = match lease.spend.get(bucket) {
            Some(s) => s.chunk(short),
            None => short,
        };
        Some((short, chunk))
    }

    /// Adds a lease granted by the store. A grant of a new epoch means the store reaped the
    /// earlier lease (this instance was silent too long): of it, only what open holds were
    /// granted stays, for them to settle.
    fn add_lease(&mut self, bucket: &str, grant: LeaseGrant) {
        let Some(lease) = &mut self.lease else {
            return;
        };
        if grant.epoch != lease.epoch {
            lease.epoch = grant.epoch;
            self.balances = self.held.clone();
        }
        if grant.amount > Decimal::ZERO {
            let b = self.balances.entry(bucket.to_string()).or_default();
            match b.checked_add(grant.amount) {
                Some(v) => *b = v,
                None => tracing::error!(key_id = %self.key_id, bucket, "lease overflow"),
            }
        }
    }

    /// After a settlement: a key that is not busy gives its unused lease back as soon as no
    /// hold is open on the bucket (so that another instance can spend it at once); a busy one
    /// keeps about two horizons of its spending.
    fn trim_lease(&mut self, bucket: &str) {
        let Some(lease) = &self.lease else {
            return;
        };
        let Some(rate) = lease.spend.get(bucket) else {
            return;
        };
        let unused = self.balance(bucket) - self.held(bucket);
        let keep = match (rate.busy(), self.held.contains_key(bucket)) {
            (true, _) => rate.recent() * Decimal::from(2),
            (false, false) => Decimal::ZERO,
            // Holds still open: the periodic check gives it back once the key is idle.
            (false, true) => return,
        };
        if unused > keep {
            self.give_back(bucket.to_string(), unused - keep);
        }
    }

    /// Returns `amount` of the lease on `bucket` to the store.
    fn give_back(&mut self, bucket: String, amount: Decimal) {
        let Some(lease) = &self.lease else {
            return;
        };
        let epoch = lease.epoch;
        if let Some(b) = self.balances.get_mut(&bucket) {
            *b -= amount;
        }
        let op = StoreOp::ReleaseLease {
            key_id: self.key_id.to_string(),
            bucket,
            amount,
            epoch,
        };
        if let Err(e) = self.writer.send(op) {
            tracing::error!(error = %e, key_id = %self.key_id, "cannot return lease");
        }
    }

    /// Gives unused lease back to the store: all of it when `idle`, else what exceeds a few
    /// horizons of the bucket's recent spending.
    fn return_lease(&mut self, idle: bool) {
        let Some(lease) = &self.lease else {
            return;
        };
        let mut give = Vec::new();
        for (bucket, balance) in &self.balances {
            let unused = *balance - self.held(bucket);
            let recent = lease
                .spend
                .get(bucket)
                .map_or(Decimal::ZERO, SpendRate::recent);
            let amount = if idle {
                unused
            } else if unused > recent * Decimal::from(3) {
                unused - recent
            } else {
                Decimal::ZERO
            };
            if amount > Decimal::ZERO {
                give.push((bucket.clone(), amount));
            }
        }
        for (bucket, amount) in give {
            self.give_back(bucket, amount);
        }
        self.balances
            .retain(|b, v| !v.is_zero() || self.held.contains_key(b));
    }
}

impl WalletCore {
    fn reserve(&mut self, m: Reserve) -> Result<Decimal, WalletError> {
        self.last_activity = Instant::now();
        if !self.loaded {
            return Err(WalletError::Unavailable("wallet not loaded".into()));
        }
        let available = self.available(&m.bucket);
        if available < m.min || m.min.is_sign_negative() {
            return Err(WalletError::InsufficientBalance {
                bucket: m.bucket,
                available,
                needed: m.min,
            });
        }
        let grant = m.want.max(m.min).min(available);
        self.add_held(&m.bucket, grant);
        self.holds.insert(
            m.hold_id,
            OpenHold {
                bucket: m.bucket,
                granted: grant,
                drawn: m.drawn,
                saved: (Decimal::ZERO, 0),
                draft: m.draft,
                persisted: false,
                drew: false,
                epoch: self.lease.as_ref().map_or(0, |l| l.epoch),
            },
        );
        if let Some(p) = &self.published {
            p.lock().open_holds = self.holds.len();
        }
        crate::metrics::hot(|m| m.holds_active.increment(1.0));
        Ok(grant)
    }
}

/// Grow a hold by up to `want`. Answers what was granted, possibly zero.
pub struct Extend {
    pub hold_id: u64,
    pub want: Decimal,
}

impl Message for Extend {
    type Result = Decimal;
}

impl Handler<Extend> for WalletActor {
    type Result = Answer<Decimal>;
    fn handle(&mut self, m: Extend, _: &mut Context<Self>) -> Self::Result {
        let core = self.core.clone();
        let mut c = core.lock();
        let bucket = match c.lease {
            Some(_) => c.holds.get(&m.hold_id).map(|h| h.bucket.clone()),
            None => None,
        };
        // An extension asked for just after the store said the bucket had nothing more to
        // lease takes what is here: asked again, the store would keep the actor (and every
        // reservation and wallet view queued behind) waiting to answer the same.
        let recent = Instant::now().checked_sub(DRY_MEMORY);
        if let Some(bucket) = bucket.filter(|b| !recent.is_some_and(|t| c.dry_since(b, t))) {
            if let Some(more) = c.lease_shortfall(&bucket, m.want) {
                return self.with_more_lease(&mut c, bucket, more, move |c| {
                    c.guarded("extend", Decimal::ZERO, |c| c.extend(m))
                });
            }
        }
        Answer::Now(c.guarded("extend", Decimal::ZERO, |c| c.extend(m)))
    }
}

impl WalletCore {
    fn extend(&mut self, m: Extend) -> Decimal {
        self.last_activity = Instant::now();
        let Some(h) = self.holds.get(&m.hold_id) else {
            return Decimal::ZERO;
        };
        let grant = m.want.max(Decimal::ZERO).min(self.available(&h.bucket));
        let Some(granted) = h.granted.checked_add(grant) else {
            return Decimal::ZERO;
        };
        let bucket = h.bucket.clone();
        self.add_held(&bucket, grant);
        if let Some(h) = self.holds.get_mut(&m.hold_id) {
            h.granted = granted;
        }
        grant
    }
}

/// Close a hold: debit `charge` (beyond the hold, up to the free balance; the rest is
/// shortfall), release the rest, and commit the record with the debit in one batch.
pub struct Settle {
    pub hold_id: u64,
    pub charge: Decimal,
    pub record: Option<Box<LedgerRecord>>,
    /// Where to send the answer, for a sender that waits for it. Settlements are queued with
    /// `do_send` (never refused by a full mailbox) and answered here, so that a settlement does
    /// not depend on its sender staying alive.
    pub reply: Option<tokio::sync::oneshot::Sender<Settled>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub debited: Decimal,
    pub shortfall: Decimal,
}

impl Message for Settle {
    type Result = Settled;
}

impl Handler<Settle> for WalletActor {
    type Result = MessageResult<Settle>;
    fn handle(&mut self, mut m: Settle, _: &mut Context<Self>) -> Self::Result {
        let reply = m.reply.take();
        let failed = Settled {
            debited: Decimal::ZERO,
            shortfall: m.charge.max(Decimal::ZERO),
        };
        let settled = self.core.lock().guarded("settle", failed, |c| c.settle(m));
        if let Some(r) = reply {
            let _ = r.send(settled);
        }
        MessageResult(settled)
    }
}

impl WalletCore {
    fn settle(&mut self, m: Settle) -> Settled {
        self.last_activity = Instant::now();
        let mut charge = m.charge.max(Decimal::ZERO);
        let mut persisted = false;
        let mut drew = false;
        let mut epoch = self.lease.as_ref().map_or(0, |l| l.epoch);
        let (bucket, granted) = match self.holds.remove(&m.hold_id) {
            Some(h) => {
                crate::metrics::hot(|m| m.holds_active.decrement(1.0));
                persisted = h.persisted;
                drew = h.drew;
                epoch = h.epoch;
                (h.bucket, h.granted)
            }
            None => match &m.record {
                // Unknown hold (already settled): nothing to debit; the record shows the
                // charge as shortfall.
                Some(r) => {
                    charge = Decimal::ZERO;
                    (r.bucket.clone().unwrap_or_default(), Decimal::ZERO)
                }
                None => {
                    return Settled {
                        debited: Decimal::ZERO,
                        shortfall: Decimal::ZERO,
                    }
                }
            },
        };
        self.add_held(&bucket, -granted);
        let balance = self.balance(&bucket);
        let debited = if charge <= granted {
            charge
        } else {
            // Free balance: what no other hold covers.
            let free = (balance - granted - self.held(&bucket)).max(Decimal::ZERO);
            granted + (charge - granted).min(free)
        }
        .min(balance);
        let shortfall = m.charge.max(Decimal::ZERO) - debited;
        if !debited.is_zero() {
            self.balances.insert(bucket.clone(), balance - debited);
        }
        if let Some(l) = &mut self.lease {
            l.spend.entry(bucket.clone()).or_default().add(debited);
            self.trim_lease(&bucket);
        }
        let record = m.record.map(|mut r| {
            r.cost = debited.normalize();
            r.shortfall = shortfall.normalize();
            r
        });
        if debited.is_zero() && record.is_none() && !persisted {
            // A release (a dropped hold): nothing changed on disk.
            return Settled { debited, shortfall };
        }
        let op = StoreOp::Settle {
            key_id: self.key_id.to_string(),
            balances: self.balances.clone(),
            debit: Debit {
                bucket,
                amount: debited,
                charge: m.charge.max(Decimal::ZERO),
                epoch,
            },
            // A hold settled before its first flush left nothing on disk to remove.
            hold_id: persisted.then_some(m.hold_id),
            drew,
            record,
        };
        if let Err(e) = self.writer.send(op) {
            tracing::error!(error = %e, key_id = %self.key_id, "cannot queue settlement");
        }
        Settled { debited, shortfall }
    }
}

/// Add `amount` to `bucket`, durably, once per `reference` (R10).
pub struct TopUp {
    pub bucket: String,
    pub amount: Decimal,
    pub reference: Option<String>,
}

impl Message for TopUp {
    type Result = Result<TopupOutcome, WalletError>;
}

impl Handler<TopUp> for WalletActor {
    type Result = AtomicResponse<Self, Result<TopupOutcome, WalletError>>;
    fn handle(&mut self, m: TopUp, _: &mut Context<Self>) -> Self::Result {
        let mut c = self.core.lock();
        c.last_activity = Instant::now();
        let mut after = c.balances.clone();
        let balance = after.entry(m.bucket.clone()).or_default();
        match balance.checked_add(m.amount) {
            Some(sum) if !m.amount.is_sign_negative() => *balance = sum,
            _ => {
                let err = WalletError::Invalid(format!(
                    "a top-up of {} would take the {} balance beyond what it can hold",
                    m.amount, m.bucket
                ));
                return AtomicResponse::new(Box::pin(fut::ready(Err(err))));
            }
        }
        let writer = c.writer.clone();
        let key_id = c.key_id.to_string();
        let bucket = m.bucket.clone();
        let amount = m.amount;
        // Until the store answers, no request may change the balances `after` was taken from:
        // their calls queue in the mailbox behind this.
        c.waiting = true;
        drop(c);
        AtomicResponse::new(Box::pin(
            async move {
                let asked = writer
                    .ask(|reply| StoreOp::TopUp {
                        key_id,
                        bucket,
                        amount,
                        reference: m.reference,
                        balances_after: after.clone(),
                        reply,
                    })
                    .await;
                (asked, after)
            }
            .into_actor(self)
            .map(|(asked, after), act, _| {
                let mut c = act.core.lock();
                c.waiting = false;
                c.topped_up(asked, after)
            }),
        ))
    }
}

impl WalletCore {
    /// Takes a top-up's answer from the store: the balances `after` it, when it was applied.
    fn topped_up(
        &mut self,
        asked: Result<TopupOutcome, StoreError>,
        after: Balances,
    ) -> Result<TopupOutcome, WalletError> {
        match asked {
            // With a lease, the top-up went to the shared balance: the lease grows only
            // when this instance asks for more.
            Ok(TopupOutcome::Applied) => {
                if self.lease.is_none() {
                    self.balances = after;
                }
                Ok(TopupOutcome::Applied)
            }
            Ok(other) => Ok(other),
            // Applied, but its fsync failed: the store has the new balances (and the
            // reference), so the wallet takes them, or its next settlement would write the
            // top-up away. Only this actor writes this key's balances, and it handles
            // nothing else meanwhile. (Reloading from the store instead would undo debits
            // the writer still holds unwritten.)
            Err(StoreError::NotDurable(e)) => {
                if self.lease.is_none() {
                    self.balances = after;
                }
                Err(WalletError::Unavailable(format!(
                        "the top-up was applied but could not be made durable ({e}); retry with the same reference to confirm it"
                    )))
            }
            // Not applied: the balances stay as they are.
            Err(e) => Err(WalletError::Unavailable(e.to_string())),
        }
    }
}

/// Balances and holds per bucket.
pub struct Snapshot;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WalletSnapshot {
    pub balances: Balances,
    pub held: Balances,
    pub open_holds: usize,
}

impl Message for Snapshot {
    type Result = WalletSnapshot;
}

impl Handler<Snapshot> for WalletActor {
    type Result = MessageResult<Snapshot>;
    fn handle(&mut self, _: Snapshot, _: &mut Context<Self>) -> Self::Result {
        let c = self.core.lock();
        MessageResult(WalletSnapshot {
            balances: c.balances.clone(),
            held: c.held.clone(),
            open_holds: c.holds.len(),
        })
    }
}

/// At shutdown, after the listeners stopped: answered once every message sent before it has been
/// handled (the mailbox keeps order), with the open holds' consumption handed to the writer.
pub struct FlushHolds;

impl Message for FlushHolds {
    type Result = ();
}

impl Handler<FlushHolds> for WalletActor {
    type Result = ();
    fn handle(&mut self, _: FlushHolds, _: &mut Context<Self>) {
        self.core.lock().flush_holds();
    }
}

/// The holds open right now, with what each has drawn so far (read from the slots the requests
/// write as they draw, as the flush does): `GET /admin/inflight`. One message per actor, never
/// one per token.
pub struct Inflight;

/// One open hold as [`Inflight`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenRequest {
    pub hold_id: u64,
    /// The request's draft record: attribution, route, bucket, currency, start time.
    pub draft: LedgerRecord,
    /// Drawn so far: the input and every output token drawn.
    pub drawn: Decimal,
    /// Output tokens drawn so far.
    pub output_tokens: u64,
    /// The hold's grant, extensions included.
    pub held: Decimal,
}

impl Message for Inflight {
    type Result = Vec<OpenRequest>;
}

impl Handler<Inflight> for WalletActor {
    type Result = MessageResult<Inflight>;
    fn handle(&mut self, _: Inflight, _: &mut Context<Self>) -> Self::Result {
        let c = self.core.lock();
        let key_id = &c.key_id;
        let open = c
            .holds
            .iter()
            .filter_map(|(id, h)| {
                let draft = match decode_compact::<LedgerRecord>(b"hold draft", &h.draft) {
                    Ok(d) => d,
                    Err(e) => {
                        // Cannot happen (the actor encoded it): the hold is left out.
                        tracing::error!(error = %e, %key_id, "cannot read a hold's draft");
                        return None;
                    }
                };
                let (drawn, output_tokens) = h.drawn.get();
                Some(OpenRequest {
                    hold_id: *id,
                    draft,
                    drawn,
                    output_tokens,
                    held: h.granted,
                })
            })
            .collect();
        MessageResult(open)
    }
}

/// Test seams: a handler that panics (as a bug would), and one that keeps the actor busy so
/// that its mailbox fills up.
#[cfg(test)]
pub(crate) mod seams {
    use super::*;

    pub struct Explode;

    impl Message for Explode {
        type Result = bool;
    }

    impl Handler<Explode> for WalletActor {
        type Result = bool;
        #[allow(clippy::panic)]
        fn handle(&mut self, _: Explode, _: &mut Context<Self>) -> bool {
            self.core.lock().guarded("explode", false, |_| {
                panic!("injected wallet handler failure")
            })
        }
    }

    pub struct Block(pub Duration);

    /// Keeps the actor's thread busy without touching the wallet's state.
    pub struct Sleep(pub Duration);

    impl Message for Sleep {
        type Result = ();
    }

    impl Handler<Sleep> for WalletActor {
        type Result = ();
        fn handle(&mut self, m: Sleep, _: &mut Context<Self>) {
            std::thread::sleep(m.0);
        }
    }

    impl Message for Block {
        type Result = ();
    }

    impl Handler<Block> for WalletActor {
        type Result = ();
        /// The actor is busy as if it waited for the store: requests' calls queue in its
        /// mailbox meanwhile.
        fn handle(&mut self, m: Block, _: &mut Context<Self>) {
            self.core.lock().waiting = true;
            std::thread::sleep(m.0);
            self.core.lock().waiting = false;
        }
    }
}
