//! Wallet actors sharded over a few arbiters by key hash. Each shard has its own small map, so
//! no single lock or actor sits on every request; a lookup that races an idle stop retries.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use parking_lot::Mutex;

use super::actor::{FlushHolds, Published, WalletActor, WalletCore};
use crate::ledger::LedgerWriter;

/// A running wallet: its actor's address and the state it shares with the requests.
#[derive(Clone)]
pub struct Wallet {
    pub addr: Addr<WalletActor>,
    pub core: Arc<Mutex<WalletCore>>,
}

pub struct Shard {
    arbiter: ArbiterHandle,
    actors: Mutex<HashMap<Arc<str>, Wallet>>,
    /// In a fleet, what each running actor holds, published as it changes (see [`Published`]).
    published: Mutex<HashMap<Arc<str>, Arc<Mutex<Published>>>>,
}

impl Shard {
    /// Removes `key_id` from the map if it still points at `addr`.
    pub(super) fn forget(&self, key_id: &str, addr: &Addr<WalletActor>) {
        let mut m = self.actors.lock();
        if m.get(key_id).is_some_and(|w| w.addr == *addr) {
            m.remove(key_id);
            self.published.lock().remove(key_id);
        }
    }
}

pub struct Registry {
    shards: Vec<Arc<Shard>>,
    /// Kept so the arbiters live as long as the registry; stopped on drop.
    arbiters: Vec<Arbiter>,
    hasher: std::collections::hash_map::RandomState,
    writer: LedgerWriter,
    flush_interval: Duration,
    idle_timeout: Duration,
    /// Holds handed out and not yet settled or released (see `Wallets::wait_settled`).
    pub(super) live: Arc<std::sync::atomic::AtomicUsize>,
}

impl Registry {
    /// Must be called inside a running actix `System`.
    pub fn new(
        shards: usize,
        writer: LedgerWriter,
        flush_interval: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let arbiters: Vec<Arbiter> = (0..shards.max(1)).map(|_| Arbiter::new()).collect();
        let shards = arbiters
            .iter()
            .map(|a| {
                Arc::new(Shard {
                    arbiter: a.handle(),
                    actors: Mutex::new(HashMap::new()),
                    published: Mutex::new(HashMap::new()),
                })
            })
            .collect();
        Registry {
            shards,
            arbiters,
            hasher: Default::default(),
            writer,
            flush_interval,
            idle_timeout,
            live: Default::default(),
        }
    }

    fn shard(&self, key_id: &str) -> &Arc<Shard> {
        let i = (self.hasher.hash_one(key_id) as usize) % self.shards.len();
        &self.shards[i]
    }

    /// The key's actor, started if needed.
    pub fn addr(&self, key_id: &str) -> Addr<WalletActor> {
        self.wallet(key_id).addr
    }

    /// The key's wallet, its actor started if needed.
    pub fn wallet(&self, key_id: &str) -> Wallet {
        let shard = self.shard(key_id);
        let mut m = shard.actors.lock();
        if let Some(w) = m.get(key_id) {
            if w.addr.connected() {
                return w.clone();
            }
        }
        let key: Arc<str> = Arc::from(key_id);
        let writer = self.writer.clone();
        let s = shard.clone();
        let (fi, it) = (self.flush_interval, self.idle_timeout);
        let k = key.clone();
        let published = self.writer.leases().then(|| {
            let p = Arc::new(Mutex::new(Published::default()));
            shard.published.lock().insert(key.clone(), p.clone());
            p
        });
        let core = Arc::new(Mutex::new(WalletCore::new(k, writer, s, fi, it, published)));
        let shared = core.clone();
        let addr =
            WalletActor::start_in_arbiter(&shard.arbiter, move |_| WalletActor { core: shared });
        let wallet = Wallet { addr, core };
        m.insert(key, wallet.clone());
        wallet
    }

    /// What the key's running actor holds per bucket and its count of open holds, as it last
    /// published them (in a fleet; `None` otherwise, or when no actor runs for the key).
    pub fn published(&self, key_id: &str) -> Option<(crate::ledger::store::Balances, usize)> {
        let shard = self.shard(key_id);
        let p = shard.published.lock().get(key_id).cloned()?;
        let p = p.lock();
        Some((p.held.clone(), p.open_holds))
    }

    /// The key's actor if one is running (none is started).
    pub fn live_addr(&self, key_id: &str) -> Option<Addr<WalletActor>> {
        let shard = self.shard(key_id);
        let m = shard.actors.lock();
        m.get(key_id)
            .filter(|w| w.addr.connected())
            .map(|w| w.addr.clone())
    }

    /// Every running wallet actor.
    pub fn live_addrs(&self) -> Vec<Addr<WalletActor>> {
        self.shards
            .iter()
            .flat_map(|s| {
                let m = s.actors.lock();
                m.values().map(|w| w.addr.clone()).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Waits until every live wallet actor has handled what was sent to it so far and handed its
    /// open holds to the writer, or `limit` passes.
    pub async fn flush_all(&self, limit: Duration) -> bool {
        let addrs = self.live_addrs();
        let all = futures_util::future::join_all(addrs.iter().map(|a| a.send(FlushHolds)));
        tokio::time::timeout(limit, all).await.is_ok()
    }

    /// The writer the wallets send their operations to.
    pub fn writer(&self) -> &LedgerWriter {
        &self.writer
    }

    /// Whether the store behind the wallets refuses writes (see [`LedgerWriter::failing`]).
    pub fn store_failing(&self) -> bool {
        self.writer.failing()
    }

    /// Stops every wallet actor (they persist open holds as they stop).
    pub fn stop_all(&self) {
        for a in &self.arbiters {
            a.stop();
        }
    }

    pub fn actor_count(&self) -> usize {
        self.shards.iter().map(|s| s.actors.lock().len()).sum()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop_all();
    }
}
