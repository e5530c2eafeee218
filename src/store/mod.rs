//! The seams between tollgate and where its state lives. Writes travel as [`StoreOp`]s through
//! one writer thread per process (sled: `ledger::writer`; PostgreSQL: `postgres::writer`);
//! reads go through the [`WalletStore`] and [`LedgerStore`] traits. The backend is chosen once,
//! at start ([`open`]): the router, the wallet actors and the admin API never ask which it is.
//!
//! [`StoreOp`]: crate::ledger::StoreOp

pub mod postgres;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::{Config, StoreConfig};
use crate::ledger::rollup::{add_to_task, Scope, Sums, TaskCells};
use crate::ledger::store::{ApiKeyRecord, Index, PersistedHold, TopupRecord, WalletState};
use crate::ledger::writer::{self, WriterThread};
use crate::ledger::{LedgerRecord, LedgerWriter, StoreError};

/// Keys, balances, top-ups and open holds as the store has them.
pub trait WalletStore: Send + Sync {
    /// Every key, oldest first.
    fn keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Every key, unless the store can tell that none changed since the version in `seen`
    /// (which it then keeps): `None`. For a fleet's periodic key sync; a store that cannot tell
    /// reads them every time.
    fn keys_if_changed(
        &self,
        seen: &mut Option<u64>,
    ) -> Result<Option<Vec<ApiKeyRecord>>, StoreError> {
        let _ = seen;
        self.keys().map(Some)
    }
    /// One key by id, revoked or not.
    fn key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// The key whose secret hashes to `secret_sha256` (hex), revoked or not. A store that one
    /// process owns answers `None`: its keys are all in memory already.
    fn key_by_secret_hash(&self, secret_sha256: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// The id of the key created for bootstrap key `name`, if one was.
    fn bootstrap_key_id(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// A key's balances per bucket.
    fn wallet(&self, key_id: &str) -> Result<WalletState, StoreError>;
    /// Every top-up applied, oldest first.
    fn topups(&self) -> Result<Vec<TopupRecord>, StoreError>;
    /// One key's top-ups. This default picks them out of every top-up.
    fn key_topups(&self, key_id: &str) -> Result<Vec<TopupRecord>, StoreError> {
        let mut all = self.topups()?;
        all.retain(|t| t.key_id == key_id);
        Ok(all)
    }
    /// Every open hold persisted (R9), with its latest persisted consumption.
    fn holds(&self) -> Result<Vec<PersistedHold>, StoreError>;
    /// The open holds that the instances sharing this store persisted, each with the instance
    /// holding it, oldest first; with `key_id`, only that key's. A store one process owns
    /// answers none: its open holds are all in its own wallet actors.
    fn fleet_holds(
        &self,
        key_id: Option<&str>,
    ) -> Result<Vec<(String, PersistedHold)>, StoreError> {
        let _ = key_id;
        Ok(Vec::new())
    }
}

/// A page of ledger records in scan order, each with its cursor key.
pub type RecordScan<'a> =
    Box<dyn Iterator<Item = Result<(Vec<u8>, LedgerRecord), StoreError>> + 'a>;

/// The ledger's reads (docs/api.md): one record, scans in time order with the §5 filters'
/// key and time bounds, and one workflow run's records.
pub trait LedgerStore: Send + Sync {
    fn record(&self, request_id: &str) -> Result<Option<LedgerRecord>, StoreError>;
    /// Records newest first, after `cursor` (the key of the last record of a previous page),
    /// of `key_id` if given, started in `[since, until)`.
    fn scan_records<'a>(
        &'a self,
        key_id: Option<&str>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        cursor: Option<&[u8]>,
    ) -> RecordScan<'a>;
    /// The records of one workflow run, oldest first.
    fn task_records(
        &self,
        task: &str,
        key_id: Option<&str>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> Result<Vec<LedgerRecord>, StoreError>;
    /// What the records of workflow run `task` add up to, per cell. A store that keeps a rollup
    /// per run reads it; this default folds the run's records (`task_records`).
    fn task_cells(&self, task: &str) -> Result<TaskCells, StoreError> {
        let mut cells = TaskCells::new();
        for rec in self.task_records(task, None, None, None)? {
            add_to_task(&mut cells, &rec);
        }
        Ok(cells)
    }
    /// The first `limit` records of workflow run `task`, oldest first, and its newest record
    /// (`None`: the run has none). This default reads every record of the run.
    fn task_ends(
        &self,
        task: &str,
        limit: usize,
    ) -> Result<(Vec<LedgerRecord>, Option<LedgerRecord>), StoreError> {
        let mut recs = self.task_records(task, None, None, None)?;
        let last = recs.last().cloned();
        recs.truncate(limit);
        Ok((recs, last))
    }
    /// Records newest first through `index` (every record, a key's, or a workflow run's),
    /// started in `[since, until)`, after `cursor`. This default walks the time-ordered scan and
    /// picks a run's records out of it.
    fn scan_index<'a>(
        &'a self,
        index: Index<'_>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        cursor: Option<&[u8]>,
    ) -> RecordScan<'a> {
        match index {
            Index::All => self.scan_records(None, since, until, cursor),
            Index::Key(k) => self.scan_records(Some(k), since, until, cursor),
            Index::Task(t) => {
                let task = t.to_string();
                Box::new(self.scan_records(None, since, until, cursor).filter(
                    move |item| match item {
                        Ok((_, rec)) => rec.task.as_deref() == Some(task.as_str()),
                        Err(_) => true,
                    },
                ))
            }
        }
    }
    /// Folds the records of `scope` started in `[since, until)` into `visit`. A store that keeps
    /// hourly rollups hands whole hours over as rollup cells; this default walks every record.
    fn fold_span(
        &self,
        scope: Scope<'_>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        visit: &mut dyn SpanVisitor,
    ) -> Result<(), StoreError> {
        let (key_id, project) = match scope {
            Scope::All => (None, None),
            Scope::Key(k, p) => (Some(k), p),
            Scope::Project(p) => (None, Some(p)),
        };
        for item in self.scan_records(key_id, since, until, None) {
            let (_, rec) = item?;
            if project.is_none_or(|p| rec.project == p) {
                visit.record(&rec);
            }
        }
        Ok(())
    }
}

/// What [`LedgerStore::fold_span`] hands over: single records, or what a rollup holds for one
/// whole hour (hours since the epoch).
pub trait SpanVisitor {
    fn record(&mut self, rec: &LedgerRecord);
    fn hour(&mut self, hour: u64, sums: Sums<'_>);
}

/// Both halves of a store, as the app holds it.
pub trait StateStore: WalletStore + LedgerStore {}
impl<T: WalletStore + LedgerStore> StateStore for T {}

/// An open store: its reads, the writer's sending side, and the writer's thread.
pub struct Opened {
    pub store: Arc<dyn StateStore>,
    pub writer: LedgerWriter,
    pub thread: WriterThread,
    /// What this instance is called in shared state (`None` for a store one process owns).
    pub instance_id: Option<String>,
    /// How many instances share the store (1 for one process), kept current while it runs:
    /// each instance enforces its share of a key's rate limits.
    pub instances: Arc<std::sync::atomic::AtomicU32>,
}

/// Opens the configured store: sled in `server.data_dir` (settling the holds a crash left), or
/// the PostgreSQL database named by `store.url_env` (migrated, with this instance registered
/// and its previous incarnation's leases reaped).
pub fn open(config: &Config) -> Result<Opened, String> {
    let flush = Duration::from_millis(config.settlement.flush_interval_ms);
    match &config.store {
        StoreConfig::Sled { cache_bytes } => {
            let store =
                crate::ledger::Store::open_with_cache(&config.server.data_dir, *cache_bytes)
                    .map_err(|e| e.to_string())?;
            let recovered = store.recover_holds().map_err(|e| e.to_string())?;
            if recovered > 0 {
                tracing::warn!(
                    holds = recovered,
                    "settled holds left by a crash as interrupted records"
                );
            }
            let (writer, thread) =
                writer::start(store.clone(), flush).map_err(|e| e.to_string())?;
            Ok(Opened {
                store: Arc::new(store),
                writer,
                thread,
                instance_id: None,
                instances: Arc::new(std::sync::atomic::AtomicU32::new(1)),
            })
        }
        StoreConfig::Postgres(pg) => {
            let url = std::env::var(&pg.url_env).map_err(|_| {
                format!(
                    "store.url_env: environment variable {} is not set (set it to the PostgreSQL connection URL, e.g. postgres://user:password@host:5432/tollgate)",
                    pg.url_env
                )
            })?;
            let instances = Arc::new(std::sync::atomic::AtomicU32::new(1));
            let (store, writer, thread) = postgres::open(&url, pg, flush, instances.clone())?;
            Ok(Opened {
                store: Arc::new(store),
                writer,
                thread,
                instance_id: Some(pg.instance_id.clone()),
                instances,
            })
        }
    }
}
