//! The PostgreSQL store, shared by the instances of a fleet (`[store] kind = "postgres"`).
//! It runs on its own small tokio runtime, never on the actix workers': the writer thread
//! (`writer.rs`) commits the wallets' operations in group-committed transactions, renews this
//! instance's registration and reaps the leases of instances that stopped renewing theirs;
//! reads ([`PgStore`]) run as tasks on the same runtime while the caller (a blocking-pool
//! thread, as for sled) waits for the answer.
//!
//! Schema: numbered SQL files under `migrations/`, embedded in the binary and applied at start
//! under an advisory lock (so instances starting together do not race), with the versions
//! applied kept in `tg_schema_version`.

mod writer;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rust_decimal::Decimal;
use tokio_postgres::NoTls;

use super::{LedgerStore, RecordScan, WalletStore};
use crate::config::PostgresStore;
use crate::ledger::store::{
    decode_compact, key_l, ApiKeyRecord, PersistedHold, TopupRecord, WalletState,
};
use crate::ledger::writer::{LedgerWriter, WriterThread};
use crate::ledger::{LedgerRecord, StoreError};

/// The schema's migrations, in order: (version, SQL).
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("migrations/0001_init.sql"))];

/// The advisory lock that serialises migrations and registrations of instances starting
/// together (an arbitrary constant, "tollgate" in ASCII digits of a sort).
const MIGRATION_LOCK: i64 = 0x7467_6174_6500;

/// How long a read waits for the database before it fails.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Records fetched per round trip of a scan.
const SCAN_PAGE: i64 = 500;

pub(crate) fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
}

/// The runtime the store's tasks run on; shut down without blocking when the last handle goes
/// (the app may drop it on an actix thread).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Reads from the shared database. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    handle: tokio::runtime::Handle,
    _runtime: Arc<Runtime>,
    /// A fingerprint of the key table as the writer's last heartbeat saw it (0: none yet).
    keys_version: Arc<AtomicU64>,
}

/// Connects, migrates, registers this instance (reaping what an earlier run under the same
/// `instance_id` left), and starts the writer thread.
pub fn open(
    url: &str,
    cfg: &PostgresStore,
    flush_interval: Duration,
    instances: Arc<std::sync::atomic::AtomicU32>,
) -> Result<(PgStore, LedgerWriter, WriterThread), String> {
    let mut pg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("store.url_env: the connection URL is not valid: {e}"))?;
    pg.connect_timeout(Duration::from_secs(3));
    pg.application_name("tollgate");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tollgate-pg")
        .enable_all()
        .build()
        .map_err(|e| format!("store: cannot start the database runtime: {e}"))?;
    let handle = runtime.handle().clone();
    let runtime = Arc::new(Runtime(Some(runtime)));
    let manager = Manager::from_config(
        pg.clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = {
        // The pool's timeouts need the runtime's context to build.
        let _enter = handle.enter();
        Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(3)))
            .create_timeout(Some(Duration::from_secs(3)))
            .recycle_timeout(Some(Duration::from_secs(3)))
            .build()
            .map_err(|e| format!("store: cannot build the connection pool: {e}"))?
    };
    let keys_version = Arc::new(AtomicU64::new(0));
    let store = PgStore {
        pool: pool.clone(),
        handle: handle.clone(),
        _runtime: runtime.clone(),
        keys_version: keys_version.clone(),
    };
    let ttl = Duration::from_millis(cfg.lease_ttl_ms);
    let instance = cfg.instance_id.clone();
    let start_pool = pool.clone();
    let epoch = store
        .wait(async move { migrate_and_register(&start_pool, &instance, ttl).await })
        .map_err(|e| format!("store: {e}"))?;
    tracing::info!(instance_id = %cfg.instance_id, epoch, "registered with the shared database");
    let failing = Arc::new(AtomicBool::new(false));
    let epoch = Arc::new(AtomicU64::new(epoch));
    let (writer, thread) = writer::start(
        writer::Shared {
            pool,
            handle,
            runtime,
            instance_id: cfg.instance_id.clone(),
            ttl,
            epoch,
            instances,
            keys_version,
        },
        flush_interval,
        failing,
    )
    .map_err(|e| format!("store: {e}"))?;
    Ok((store, writer, thread))
}

/// Applies the migrations this database lacks, then registers `instance` with a new epoch.
/// An earlier registration under the same name is reaped once it has expired (a restart after
/// a crash); one that is still renewed is another live instance, which is an error.
async fn migrate_and_register(
    pool: &Pool,
    instance: &str,
    ttl: Duration,
) -> Result<u64, StoreError> {
    let mut client = pool.get().await.map_err(db_err)?;
    let r = migrate_and_register_on(&mut client, instance, ttl).await;
    // The connection holds the session's advisory lock: closing it (rather than handing it
    // back to the pool) releases the lock whatever happened.
    drop(deadpool_postgres::Object::take(client));
    r
}

async fn migrate_and_register_on(
    client: &mut deadpool_postgres::Object,
    instance: &str,
    ttl: Duration,
) -> Result<u64, StoreError> {
    // A session lock, held until the connection closes.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_err)?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS tg_schema_version (
                 version    integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(db_err)?;
    let current: i32 = client
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM tg_schema_version",
            &[],
        )
        .await
        .map_err(db_err)?
        .get(0);
    if let Some((newest, _)) = MIGRATIONS.last() {
        if current > *newest {
            return Err(StoreError::Database(format!(
                "the database schema is at version {current}, newer than this build knows ({newest}): upgrade tollgate"
            )));
        }
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let tx = client.transaction().await.map_err(db_err)?;
        tx.batch_execute(sql).await.map_err(db_err)?;
        tx.execute(
            "INSERT INTO tg_schema_version (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        tracing::info!(version, "database schema migrated");
    }
    let deadline = tokio::time::Instant::now() + ttl * 2 + Duration::from_secs(1);
    let epoch = loop {
        let tx = client.transaction().await.map_err(db_err)?;
        let live: Option<bool> = tx
            .query_opt(
                "SELECT expires_at > now() FROM tg_instances WHERE instance_id = $1 FOR UPDATE",
                &[&instance],
            )
            .await
            .map_err(db_err)?
            .map(|r| r.get(0));
        if live == Some(true) {
            drop(tx);
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Database(format!(
                    "store.instance_id \"{instance}\" is registered by an instance that is still running: give every instance its own instance_id"
                )));
            }
            // Perhaps our own previous run, killed a moment ago: wait for its registration to
            // expire, then take its place.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        if live == Some(false) {
            let n = writer::reap(&tx, instance).await?;
            tracing::warn!(
                instance_id = instance,
                holds = n,
                "settled the open holds of this instance's previous run as interrupted records"
            );
        }
        let epoch = new_epoch();
        tx.execute(
            "INSERT INTO tg_instances (instance_id, epoch, started_at, expires_at)
             VALUES ($1, $2, now(), now() + $3::float8 * interval '1 millisecond')",
            &[&instance, &(epoch as i64), &(ttl.as_millis() as f64)],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        break epoch;
    };
    Ok(epoch)
}

/// A fresh registration epoch: positive, so that it round-trips through `bigint`.
pub(crate) fn new_epoch() -> u64 {
    rand::random::<u64>() >> 2
}

/// The earliest and latest times a scan may be bounded by.
fn time_floor() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH
}
fn time_ceiling() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(9999, 12, 31, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The (started_at, request_id) a cursor key (`l/{micros:016x}{request_id}`) names.
fn parse_cursor(cursor: &[u8]) -> Option<(DateTime<Utc>, String)> {
    let text = std::str::from_utf8(cursor.strip_prefix(b"l/")?).ok()?;
    let micros = i64::from_str_radix(text.get(..16)?, 16).ok()?;
    let at = DateTime::<Utc>::from_timestamp_micros(micros)?;
    Some((at, text.get(16..)?.to_string()))
}

impl PgStore {
    /// Runs `f` on the store's runtime and waits for it: callable from any thread, async or not
    /// (the caller's thread waits, as it would for a sled read).
    fn wait<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let r = tokio::time::timeout(READ_TIMEOUT, f)
                .await
                .unwrap_or_else(|_| Err(db_err("timed out")));
            let _ = tx.send(r);
        });
        rx.recv()
            .map_err(|_| db_err("the database runtime stopped"))?
    }

    fn query(
        &self,
        sql: &'static str,
        params: Vec<Box<dyn tokio_postgres::types::ToSql + Send + Sync>>,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let pool = self.pool.clone();
        self.wait(async move {
            let client = pool.get().await.map_err(db_err)?;
            let stmt = client.prepare_cached(sql).await.map_err(db_err)?;
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| &**p as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            client.query(&stmt, &refs).await.map_err(db_err)
        })
    }

    /// The first key `sql` (one text parameter, `value`) selects, if any.
    fn first_key(
        &self,
        sql: &'static str,
        value: &str,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let rows = self.query(sql, vec![Box::new(value.to_string())])?;
        rows.first().map(key_from_row).transpose()
    }

    fn page(
        &self,
        key_id: Option<&str>,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        before: &(DateTime<Utc>, String),
    ) -> Result<Vec<(Vec<u8>, LedgerRecord)>, StoreError> {
        let rows = match key_id {
            Some(k) => self.query(
                "SELECT record, instance_id FROM tg_ledger
                 WHERE key_id = $1 AND started_at >= $2 AND started_at < $3
                   AND (started_at, request_id) < ($4, $5)
                 ORDER BY started_at DESC, request_id DESC LIMIT $6",
                vec![
                    Box::new(k.to_string()),
                    Box::new(since),
                    Box::new(until),
                    Box::new(before.0),
                    Box::new(before.1.clone()),
                    Box::new(SCAN_PAGE),
                ],
            )?,
            None => self.query(
                "SELECT record, instance_id FROM tg_ledger
                 WHERE started_at >= $1 AND started_at < $2
                   AND (started_at, request_id) < ($3, $4)
                 ORDER BY started_at DESC, request_id DESC LIMIT $5",
                vec![
                    Box::new(since),
                    Box::new(until),
                    Box::new(before.0),
                    Box::new(before.1.clone()),
                    Box::new(SCAN_PAGE),
                ],
            )?,
        };
        rows.iter()
            .map(|r| {
                let rec = record_from_row(r)?;
                Ok((key_l(&rec), rec))
            })
            .collect()
    }
}

/// A ledger row (`record, instance_id`) as the record the admin API shows.
fn record_from_row(row: &tokio_postgres::Row) -> Result<LedgerRecord, StoreError> {
    let mut rec: LedgerRecord = decode_compact(b"tg_ledger", row.get::<_, &[u8]>(0))?;
    rec.instance_id = row.get(1);
    Ok(rec)
}

fn key_from_row(row: &tokio_postgres::Row) -> Result<ApiKeyRecord, StoreError> {
    let v: serde_json::Value = row.get(0);
    serde_json::from_value(v).map_err(|e| StoreError::Corrupt {
        key: "tg_keys".into(),
        err: e.to_string(),
    })
}

impl WalletStore for PgStore {
    fn keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let rows = self.query("SELECT record FROM tg_keys ORDER BY created_at, id", vec![])?;
        rows.iter().map(key_from_row).collect()
    }

    /// The writer's heartbeat (at most half a second apart, and free while it commits batches)
    /// fingerprints the key table, so that a fleet's key sync reads the keys only when they
    /// changed.
    fn keys_if_changed(
        &self,
        seen: &mut Option<u64>,
    ) -> Result<Option<Vec<ApiKeyRecord>>, StoreError> {
        // Taken before the keys are read: a change meanwhile shows in the next fingerprint.
        let version = self.keys_version.load(Ordering::Acquire);
        if version != 0 && *seen == Some(version) {
            return Ok(None);
        }
        let keys = self.keys()?;
        *seen = Some(version);
        Ok(Some(keys))
    }

    fn key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.first_key("SELECT record FROM tg_keys WHERE id = $1", id)
    }

    fn key_by_secret_hash(&self, secret_sha256: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.first_key(
            "SELECT record FROM tg_keys WHERE secret_sha256 = $1 ORDER BY created_at LIMIT 1",
            secret_sha256,
        )
    }

    fn bootstrap_key_id(&self, name: &str) -> Result<Option<String>, StoreError> {
        let rows = self.query(
            "SELECT id FROM tg_keys WHERE bootstrap_name = $1",
            vec![Box::new(name.to_string())],
        )?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    fn wallet(&self, key_id: &str) -> Result<WalletState, StoreError> {
        let rows = self.query(
            "SELECT bucket, balance FROM tg_wallets WHERE key_id = $1",
            vec![Box::new(key_id.to_string())],
        )?;
        let balances = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, Decimal>(1)))
            .collect();
        Ok(WalletState::from_balances(&balances))
    }

    fn topups(&self) -> Result<Vec<TopupRecord>, StoreError> {
        let rows = self.query(
            "SELECT key_id, bucket, amount, reference, at FROM tg_topups ORDER BY seq",
            vec![],
        )?;
        Ok(rows
            .iter()
            .map(|r| TopupRecord {
                key_id: r.get(0),
                bucket: r.get(1),
                amount: r.get(2),
                reference: r.get(3),
                at: r.get(4),
            })
            .collect())
    }

    fn holds(&self) -> Result<Vec<PersistedHold>, StoreError> {
        let rows = self.query(
            "SELECT hold_id, key_id, bucket, granted, consumed, consumed_tokens, updated_at, draft
             FROM tg_holds ORDER BY instance_id, hold_id",
            vec![],
        )?;
        rows.iter().map(writer::hold_from_row).collect()
    }

    fn fleet_holds(
        &self,
        key_id: Option<&str>,
    ) -> Result<Vec<(String, PersistedHold)>, StoreError> {
        let rows = match key_id {
            Some(k) => self.query(
                "SELECT hold_id, key_id, bucket, granted, consumed, consumed_tokens, updated_at,
                        draft, instance_id
                 FROM tg_holds WHERE key_id = $1 ORDER BY instance_id, hold_id",
                vec![Box::new(k.to_string())],
            )?,
            None => self.query(
                "SELECT hold_id, key_id, bucket, granted, consumed, consumed_tokens, updated_at,
                        draft, instance_id
                 FROM tg_holds ORDER BY instance_id, hold_id",
                vec![],
            )?,
        };
        rows.iter()
            .map(|r| Ok((r.get::<_, String>(8), writer::hold_from_row(r)?)))
            .collect()
    }
}

impl LedgerStore for PgStore {
    fn record(&self, request_id: &str) -> Result<Option<LedgerRecord>, StoreError> {
        let rows = self.query(
            "SELECT record, instance_id FROM tg_ledger WHERE request_id = $1",
            vec![Box::new(request_id.to_string())],
        )?;
        match rows.first() {
            Some(r) => Ok(Some(record_from_row(r)?)),
            None => Ok(None),
        }
    }

    fn scan_records<'a>(
        &'a self,
        key_id: Option<&str>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        cursor: Option<&[u8]>,
    ) -> RecordScan<'a> {
        let until = until.unwrap_or_else(time_ceiling);
        let before = match cursor {
            None => Some((until, String::new())),
            Some(c) => parse_cursor(c),
        };
        Box::new(Scan {
            store: self,
            key_id: key_id.map(str::to_string),
            since: since.unwrap_or_else(time_floor),
            until,
            // A cursor that is not one of ours scans nothing, as in the sled store.
            before,
            buf: VecDeque::new(),
        })
    }

    fn task_records(
        &self,
        task: &str,
        key_id: Option<&str>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> Result<Vec<LedgerRecord>, StoreError> {
        let rows = self.query(
            "SELECT record, instance_id FROM tg_ledger
             WHERE task = $1 AND started_at >= $2 AND started_at < $3
             ORDER BY started_at, request_id",
            vec![
                Box::new(task.to_string()),
                Box::new(since.unwrap_or_else(time_floor)),
                Box::new(until.unwrap_or_else(time_ceiling)),
            ],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let rec = record_from_row(r)?;
            if key_id.is_none_or(|k| rec.key_id == k) {
                out.push(rec);
            }
        }
        Ok(out)
    }
}

/// A scan newest first, fetched a page at a time.
struct Scan<'a> {
    store: &'a PgStore,
    key_id: Option<String>,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    /// The records still to come sort before this (started_at, request_id); `None`: done.
    before: Option<(DateTime<Utc>, String)>,
    buf: VecDeque<(Vec<u8>, LedgerRecord)>,
}

impl Iterator for Scan<'_> {
    type Item = Result<(Vec<u8>, LedgerRecord), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            let before = self.before.take()?;
            match self
                .store
                .page(self.key_id.as_deref(), self.since, self.until, &before)
            {
                Ok(page) => {
                    if page.len() as i64 == SCAN_PAGE {
                        self.before = page
                            .last()
                            .map(|(_, r)| (r.started_at, r.request_id.clone()));
                    }
                    self.buf = page.into();
                }
                Err(e) => return Some(Err(e)),
            }
        }
        self.buf.pop_front().map(Ok)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn cursors_name_the_record_they_follow() {
        let mut r = LedgerRecord::empty("req_x".into(), Utc::now());
        r.started_at = DateTime::<Utc>::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let (at, id) = parse_cursor(&key_l(&r)).unwrap();
        assert_eq!((at, id.as_str()), (r.started_at, "req_x"));
        assert_eq!(parse_cursor(b"x/00"), None);
        assert_eq!(parse_cursor(b"l/zz"), None);
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
        let expected: Vec<i32> = (1..=versions.len() as i32).collect();
        assert_eq!(versions, expected);
    }
}
