//! The WalletActor: one per API key, the only owner of that key's balances and holds. A stream
//! talks to it once per hold grant, extension and settlement — never per token.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rust_decimal::Decimal;

use super::registry::Shard;
use super::WalletError;
use crate::ledger::store::{decode_compact, encode_compact, Balances, PersistedHold};
use crate::ledger::writer::{StoreOp, TopupOutcome};
use crate::ledger::{LedgerRecord, LedgerWriter};

struct OpenHold {
    bucket: String,
    granted: Decimal,
    consumed: Decimal,
    tokens: u64,
    /// The request's draft record, encoded compactly (see [`encode_draft`]).
    draft: Box<[u8]>,
    dirty: bool,
    /// An `h/` entry was queued for this hold: the settlement must remove it.
    persisted: bool,
}

pub struct WalletActor {
    key_id: Arc<str>,
    balances: Balances,
    held: BTreeMap<String, Decimal>,
    holds: HashMap<u64, OpenHold>,
    writer: LedgerWriter,
    shard: Arc<Shard>,
    flush_interval: Duration,
    idle_timeout: Duration,
    last_activity: Instant,
    loaded: bool,
}

impl WalletActor {
    pub(super) fn new(
        key_id: Arc<str>,
        writer: LedgerWriter,
        shard: Arc<Shard>,
        flush_interval: Duration,
        idle_timeout: Duration,
    ) -> Self {
        WalletActor {
            key_id,
            balances: Balances::new(),
            held: BTreeMap::new(),
            holds: HashMap::new(),
            writer,
            shard,
            flush_interval,
            idle_timeout,
            last_activity: Instant::now(),
            loaded: false,
        }
    }

    fn balance(&self, bucket: &str) -> Decimal {
        self.balances.get(bucket).copied().unwrap_or_default()
    }

    fn held(&self, bucket: &str) -> Decimal {
        self.held.get(bucket).copied().unwrap_or_default()
    }

    /// Balance not covered by any hold; never negative.
    fn available(&self, bucket: &str) -> Decimal {
        (self.balance(bucket) - self.held(bucket)).max(Decimal::ZERO)
    }

    fn add_held(&mut self, bucket: &str, delta: Decimal) {
        let h = self.held.entry(bucket.to_string()).or_default();
        *h += delta;
        if h.is_zero() {
            self.held.remove(bucket);
        }
    }

    fn flush_holds(&mut self) {
        let now = chrono::Utc::now();
        let key_id = &self.key_id;
        let dirty: Vec<PersistedHold> = self
            .holds
            .iter_mut()
            .filter(|(_, h)| h.dirty)
            .filter_map(|(id, h)| {
                let draft = match decode_compact::<LedgerRecord>(b"hold draft", &h.draft) {
                    Ok(d) => d,
                    Err(e) => {
                        // Cannot happen (the actor encoded it); the hold stays dirty.
                        tracing::error!(error = %e, %key_id, "cannot persist a hold");
                        return None;
                    }
                };
                h.dirty = false;
                h.persisted = true;
                Some(PersistedHold {
                    hold_id: *id,
                    key_id: key_id.to_string(),
                    bucket: h.bucket.clone(),
                    granted: h.granted,
                    consumed: h.consumed,
                    consumed_tokens: h.tokens,
                    updated_at: now,
                    draft: Box::new(draft),
                })
            })
            .collect();
        if !dirty.is_empty() {
            if let Err(e) = self.writer.send(StoreOp::Holds(dirty)) {
                tracing::error!(error = %e, key_id = %self.key_id, "cannot persist holds");
            }
        }
    }

    /// Hands every open hold the store does not have as it is to the writer, so that recovery
    /// settles what it consumed.
    fn persist_open_holds(&mut self) {
        for h in self.holds.values_mut() {
            h.dirty |= !h.persisted;
        }
        self.flush_holds();
    }

    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        if self.holds.is_empty() && self.last_activity.elapsed() >= self.idle_timeout {
            // Leave the registry first, so new requests start a fresh actor, which loads the
            // state through the writer queue after everything this one sent.
            self.shard.forget(&self.key_id, &ctx.address());
            ctx.stop();
        }
    }
}

impl Actor for WalletActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        metrics::gauge!(crate::metrics::WALLET_ACTORS).increment(1.0);
        ctx.set_mailbox_capacity(4096);
        let writer = self.writer.clone();
        let key_id = self.key_id.to_string();
        // Block every message until the state is loaded.
        ctx.wait(
            async move {
                writer
                    .ask(|reply| StoreOp::LoadWallet { key_id, reply })
                    .await
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok(state) => {
                    act.balances = state.balances();
                    act.loaded = true;
                }
                Err(e) => {
                    tracing::error!(error = %e, key_id = %act.key_id, "cannot load wallet");
                    act.shard.forget(&act.key_id, &ctx.address());
                    ctx.stop();
                }
            }),
        );
        ctx.run_interval(self.flush_interval, |act, _| act.flush_holds());
        let idle_check =
            (self.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        ctx.run_interval(idle_check, |act, ctx| act.check_idle(ctx));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        metrics::gauge!(crate::metrics::WALLET_ACTORS).decrement(1.0);
        // Only reachable at process shutdown: persist the consumption so recovery settles it.
        self.persist_open_holds();
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
}

/// Encodes a draft record for [`Reserve`].
pub fn encode_draft(draft: &LedgerRecord) -> Box<[u8]> {
    encode_compact(draft).into_boxed_slice()
}

impl Message for Reserve {
    type Result = Result<Decimal, WalletError>;
}

impl Handler<Reserve> for WalletActor {
    type Result = Result<Decimal, WalletError>;
    fn handle(&mut self, m: Reserve, _: &mut Context<Self>) -> Self::Result {
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
                consumed: Decimal::ZERO,
                tokens: 0,
                draft: m.draft,
                dirty: true,
                persisted: false,
            },
        );
        crate::metrics::hot(|m| m.holds_active.increment(1.0));
        Ok(grant)
    }
}

/// Grow a hold by up to `want`; reports the consumption so far (persisted for recovery).
/// Answers what was granted, possibly zero.
pub struct Extend {
    pub hold_id: u64,
    pub consumed: Decimal,
    pub consumed_tokens: u64,
    pub want: Decimal,
}

impl Message for Extend {
    type Result = Decimal;
}

impl Handler<Extend> for WalletActor {
    type Result = MessageResult<Extend>;
    fn handle(&mut self, m: Extend, _: &mut Context<Self>) -> Self::Result {
        self.last_activity = Instant::now();
        let Some(bucket) = self.holds.get(&m.hold_id).map(|h| h.bucket.clone()) else {
            return MessageResult(Decimal::ZERO);
        };
        let grant = m.want.max(Decimal::ZERO).min(self.available(&bucket));
        self.add_held(&bucket, grant);
        if let Some(h) = self.holds.get_mut(&m.hold_id) {
            h.granted += grant;
            h.consumed = m.consumed;
            h.tokens = m.consumed_tokens;
            h.dirty = true;
        }
        MessageResult(grant)
    }
}

/// Close a hold: debit `charge` (beyond the hold, up to the free balance; the rest is
/// shortfall), release the rest, and commit the record with the debit in one batch.
pub struct Settle {
    pub hold_id: u64,
    pub charge: Decimal,
    pub record: Option<Box<LedgerRecord>>,
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
    fn handle(&mut self, m: Settle, _: &mut Context<Self>) -> Self::Result {
        self.last_activity = Instant::now();
        let mut charge = m.charge.max(Decimal::ZERO);
        let mut persisted = false;
        let (bucket, granted) = match self.holds.remove(&m.hold_id) {
            Some(h) => {
                crate::metrics::hot(|m| m.holds_active.decrement(1.0));
                persisted = h.persisted;
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
                    return MessageResult(Settled {
                        debited: Decimal::ZERO,
                        shortfall: Decimal::ZERO,
                    })
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
        let record = m.record.map(|mut r| {
            r.cost = debited.normalize();
            r.shortfall = shortfall.normalize();
            r
        });
        if debited.is_zero() && record.is_none() && !persisted {
            // A release (a dropped hold): nothing changed on disk.
            return MessageResult(Settled { debited, shortfall });
        }
        let op = StoreOp::Settle {
            key_id: self.key_id.to_string(),
            balances: self.balances.clone(),
            // A hold settled before its first flush left nothing on disk to remove.
            hold_id: persisted.then_some(m.hold_id),
            record,
        };
        if let Err(e) = self.writer.send(op) {
            tracing::error!(error = %e, key_id = %self.key_id, "cannot queue settlement");
        }
        MessageResult(Settled { debited, shortfall })
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
        self.last_activity = Instant::now();
        let mut after = self.balances.clone();
        *after.entry(m.bucket.clone()).or_default() += m.amount;
        let writer = self.writer.clone();
        let key_id = self.key_id.to_string();
        let bucket = m.bucket.clone();
        let amount = m.amount;
        AtomicResponse::new(Box::pin(
            async move {
                let asked = writer
                    .ask(|reply| StoreOp::TopUp {
                        key_id: key_id.clone(),
                        bucket,
                        amount,
                        reference: m.reference,
                        balances_after: after.clone(),
                        reply,
                    })
                    .await;
                match asked {
                    Ok(o) => Ok((o, after)),
                    // The top-up may be in the store although the answer is an error (its fsync
                    // failed after the batch was applied). Only this actor writes this key's
                    // balances, and it handles nothing else meanwhile, so the store says which
                    // balances hold now; keeping the old ones would write the top-up away at
                    // the next settlement while its reference stays recorded.
                    Err(e) => Err((
                        e,
                        writer
                            .ask(|reply| StoreOp::LoadWallet { key_id, reply })
                            .await
                            .ok()
                            .map(|s| s.balances()),
                    )),
                }
            }
            .into_actor(self)
            .map(|res, act, _| match res {
                Ok((TopupOutcome::Applied, after)) => {
                    act.balances = after;
                    Ok(TopupOutcome::Applied)
                }
                Ok((other, _)) => Ok(other),
                Err((e, stored)) => {
                    if let Some(balances) = stored {
                        act.balances = balances;
                    }
                    Err(WalletError::Unavailable(e.to_string()))
                }
            }),
        ))
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
        MessageResult(WalletSnapshot {
            balances: self.balances.clone(),
            held: self.held.clone(),
            open_holds: self.holds.len(),
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
        self.persist_open_holds();
    }
}
