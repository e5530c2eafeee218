//! The sled store: keys, wallets, open holds, top-ups and ledger records live in one tree under
//! key prefixes, so that a wallet debit and the ledger record that explains it are committed in
//! one atomic batch. Only the writer thread (`writer.rs`) writes; readers use snapshots of sled.
//!
//! Layout (values JSON, but ledger records and open holds: postcard behind a version byte, see
//! [`encode_compact`]; those written as JSON by earlier versions still read):
//! - `k/{key_id}` API key record; `m/bootstrap/{name}` → key id of a config key
//! - `w/{key_id}` wallet balances per bucket
//! - `h/{hold_id:016x}` an open hold with its consumption and its draft ledger record, written
//!   once; `c/{hold_id:016x}` its latest consumption, rewritten every flush while it draws (R9)
//! - `t/{key_id}/{reference}` applied top-up reference; `u/{micros:016x}{seq:08x}` top-up log;
//!   `v/{key_id}/{micros:016x}{seq:08x}` its index by key (empty value: the `u/` key is `u/` +
//!   its tail; built at open for stores from before it, marked by `m/topup_index`)
//! - `l/{micros:016x}{request_id}` ledger record; `x/{key_id}/{micros:016x}{request_id}` key
//!   index (empty value: the `l/` key is its tail); `i/{request_id}` → the record's `l/` key, only for ids that do not carry their start
//!   time (see [`new_request_id`]); `a/{task}\0{micros:016x}{request_id}` task index (empty
//!   value), for records of a workflow run
//! - `r/…` hourly rollups of the billed records and one rollup per workflow run, kept in the
//!   batch of the records they count, and `m/rollups` the marker that they cover every record
//!   (see [`super::rollup`])

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::record::{LedgerRecord, LedgerRecordV1, LedgerRecordV2, Status, UsageSource};
use super::rollup::RollupDelta;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt stored value under {key}: {err}")]
    Corrupt { key: String, err: String },
    #[error("storage writer stopped")]
    WriterGone,
    /// The write was applied but its fsync failed: readable now, durability unknown.
    #[error("written but not made durable: {0}")]
    NotDurable(String),
    #[error("cannot prepare data directory {path}: {err}")]
    DataDir { path: String, err: String },
    /// The shared database (fleet mode) refused or could not be reached.
    #[error("database: {0}")]
    Database(String),
}

/// Balances per bucket name, exact.
pub type Balances = BTreeMap<String, Decimal>;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WalletState {
    #[serde(default)]
    pub balances: BTreeMap<String, StoredAmount>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredAmount(#[serde(with = "rust_decimal::serde::str")] pub Decimal);

impl WalletState {
    pub fn from_balances(b: &Balances) -> Self {
        WalletState {
            balances: b
                .iter()
                .map(|(k, v)| (k.clone(), StoredAmount(*v)))
                .collect(),
        }
    }
    pub fn balances(&self) -> Balances {
        self.balances
            .iter()
            .map(|(k, v)| (k.clone(), v.0))
            .collect()
    }
}

/// An open hold as persisted for crash recovery (R9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedHold {
    pub hold_id: u64,
    pub key_id: String,
    pub bucket: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub granted: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub consumed: Decimal,
    pub consumed_tokens: u64,
    pub updated_at: DateTime<Utc>,
    /// The request's record as far as it is known; settled as `interrupted` after a crash.
    pub draft: Box<LedgerRecord>,
}

/// A hold the wallet actor persists for the first time: a [`PersistedHold`] whose draft record
/// is still in the compact encoding the actor keeps it in. The sled store writes it without
/// decoding the draft (postcard lays a struct's fields end to end, and the draft is the last
/// one, so the hold's encoding is its other fields followed by the draft's); a store that needs
/// the fields reads it with [`NewHold::decode`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewHold {
    pub hold_id: u64,
    pub key_id: String,
    pub bucket: String,
    pub granted: Decimal,
    pub consumed: Decimal,
    pub consumed_tokens: u64,
    pub updated_at: DateTime<Utc>,
    /// The draft record from [`encode_compact`].
    pub draft: Box<[u8]>,
}

/// The fields of a [`PersistedHold`] before its draft, laid out as in it.
#[derive(Serialize)]
struct HoldHead<'a> {
    hold_id: u64,
    key_id: &'a str,
    bucket: &'a str,
    #[serde(with = "rust_decimal::serde::str")]
    granted: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    consumed: Decimal,
    consumed_tokens: u64,
    updated_at: DateTime<Utc>,
}

impl NewHold {
    /// The stored value: the same bytes as [`encode_compact`] of the decoded hold.
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        match self.draft.split_first() {
            Some((&POSTCARD_V3, draft)) => {
                let head = HoldHead {
                    hold_id: self.hold_id,
                    key_id: &self.key_id,
                    bucket: &self.bucket,
                    granted: self.granted,
                    consumed: self.consumed,
                    consumed_tokens: self.consumed_tokens,
                    updated_at: self.updated_at,
                };
                let mut out = Vec::with_capacity(64 + draft.len());
                out.push(POSTCARD_V3);
                let mut out = postcard::to_extend(&head, out).map_err(|e| StoreError::Corrupt {
                    key: "hold".into(),
                    err: e.to_string(),
                })?;
                out.extend_from_slice(draft);
                Ok(out)
            }
            // A draft that fell back to JSON: encode the hold the long way.
            _ => Ok(encode_compact(&self.clone().decode()?)),
        }
    }

    pub fn decode(self) -> Result<PersistedHold, StoreError> {
        Ok(PersistedHold {
            draft: Box::new(decode_compact(b"hold draft", &self.draft)?),
            hold_id: self.hold_id,
            key_id: self.key_id,
            bucket: self.bucket,
            granted: self.granted,
            consumed: self.consumed,
            consumed_tokens: self.consumed_tokens,
            updated_at: self.updated_at,
        })
    }
}

impl From<PersistedHold> for NewHold {
    fn from(h: PersistedHold) -> NewHold {
        NewHold {
            draft: encode_compact(&*h.draft).into_boxed_slice(),
            hold_id: h.hold_id,
            key_id: h.key_id,
            bucket: h.bucket,
            granted: h.granted,
            consumed: h.consumed,
            consumed_tokens: h.consumed_tokens,
            updated_at: h.updated_at,
        }
    }
}

/// [`PersistedHold`] as stored under compact version 1 (its draft without `task`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PersistedHoldV1 {
    hold_id: u64,
    key_id: String,
    bucket: String,
    #[serde(with = "rust_decimal::serde::str")]
    granted: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    consumed: Decimal,
    consumed_tokens: u64,
    updated_at: DateTime<Utc>,
    draft: Box<LedgerRecordV1>,
}

impl From<PersistedHoldV1> for PersistedHold {
    fn from(h: PersistedHoldV1) -> PersistedHold {
        PersistedHold {
            hold_id: h.hold_id,
            key_id: h.key_id,
            bucket: h.bucket,
            granted: h.granted,
            consumed: h.consumed,
            consumed_tokens: h.consumed_tokens,
            updated_at: h.updated_at,
            draft: Box::new((*h.draft).into()),
        }
    }
}

/// [`PersistedHold`] as stored under compact version 2 (its draft without the cache counts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PersistedHoldV2 {
    hold_id: u64,
    key_id: String,
    bucket: String,
    #[serde(with = "rust_decimal::serde::str")]
    granted: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    consumed: Decimal,
    consumed_tokens: u64,
    updated_at: DateTime<Utc>,
    draft: Box<LedgerRecordV2>,
}

impl From<PersistedHoldV2> for PersistedHold {
    fn from(h: PersistedHoldV2) -> PersistedHold {
        PersistedHold {
            hold_id: h.hold_id,
            key_id: h.key_id,
            bucket: h.bucket,
            granted: h.granted,
            consumed: h.consumed,
            consumed_tokens: h.consumed_tokens,
            updated_at: h.updated_at,
            draft: Box::new((*h.draft).into()),
        }
    }
}

/// An open hold's latest consumption, persisted every flush interval while it draws (R9),
/// apart from the hold itself so that the draft record is written only once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldDrawn {
    pub hold_id: u64,
    #[serde(with = "rust_decimal::serde::str")]
    pub consumed: Decimal,
    pub consumed_tokens: u64,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopupRef {
    pub bucket: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopupRecord {
    pub key_id: String,
    pub bucket: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub reference: Option<String>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    pub secret_sha256: String,
    pub workspace: String,
    pub project: String,
    pub models: Option<Vec<String>>,
    pub buckets: Option<Vec<String>>,
    pub allow_cross_bucket_fallback: bool,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_concurrent_streams: Option<u32>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

pub(crate) fn key_k(id: &str) -> Vec<u8> {
    format!("k/{id}").into_bytes()
}
pub(crate) fn key_w(id: &str) -> Vec<u8> {
    format!("w/{id}").into_bytes()
}
pub(crate) fn key_h(hold: u64) -> Vec<u8> {
    format!("h/{hold:016x}").into_bytes()
}
pub(crate) fn key_c(hold: u64) -> Vec<u8> {
    format!("c/{hold:016x}").into_bytes()
}
pub(crate) fn key_t(key_id: &str, reference: &str) -> Vec<u8> {
    format!("t/{key_id}/{reference}").into_bytes()
}
/// The key index entry of a top-up log entry (`u/` key).
pub(crate) fn key_v(key_id: &str, log: &[u8]) -> Vec<u8> {
    [
        &b"v/"[..],
        key_id.as_bytes(),
        b"/",
        log.get(2..).unwrap_or_default(),
    ]
    .concat()
}
/// Present once every top-up log entry has its `v/` index entry.
const TOPUP_INDEX_MARKER: &[u8] = b"m/topup_index";
pub(crate) fn micros(t: DateTime<Utc>) -> u64 {
    u64::try_from(t.timestamp_micros()).unwrap_or(0)
}
pub(crate) fn key_l(rec: &LedgerRecord) -> Vec<u8> {
    time_key(&[b"l/"], micros(rec.started_at), &rec.request_id)
}
pub(crate) fn key_x(rec: &LedgerRecord) -> Vec<u8> {
    let key_id = rec.key_id.as_bytes();
    time_key(
        &[b"x/", key_id, b"/"],
        micros(rec.started_at),
        &rec.request_id,
    )
}
/// The task index entry of a record of a workflow run: `a/{task}\0{micros:016x}{request_id}`,
/// empty value (the `l/` key is `l/` + its tail). The NUL ends the task, which is printable
/// ASCII, so that one task's prefix never takes in another's.
pub(crate) fn key_a(rec: &LedgerRecord) -> Option<Vec<u8>> {
    let task = rec.task.as_deref()?;
    Some(time_key(
        &[b"a/", task.as_bytes(), b"\0"],
        micros(rec.started_at),
        &rec.request_id,
    ))
}
/// `prefix` parts, 16 hex digits of `micros`, then the request id (the keys are written for every
/// record, so without the formatting machinery).
fn time_key(prefix: &[&[u8]], micros: u64, request_id: &str) -> Vec<u8> {
    let len = prefix.iter().map(|p| p.len()).sum::<usize>() + 16 + request_id.len();
    let mut k = Vec::with_capacity(len);
    prefix.iter().for_each(|p| k.extend_from_slice(p));
    push_hex(&mut k, u128::from(micros), 16);
    k.extend_from_slice(request_id.as_bytes());
    k
}
/// Appends the low `digits` hex digits of `v`, lowercase, zero-padded.
fn push_hex(out: &mut Vec<u8>, v: u128, digits: u32) {
    out.extend(
        (0..digits)
            .rev()
            .map(|i| b"0123456789abcdef"[((v >> (4 * i)) & 0xf) as usize]),
    );
}
pub(crate) fn key_i(request_id: &str) -> Vec<u8> {
    format!("i/{request_id}").into_bytes()
}

/// A request id that carries its start time: `req_` + 14 hex digits of Unix microseconds +
/// 18 random hex digits. Ids sort by start time, and the record's `l/` key follows from the
/// id alone, so such records need no `i/` index entry.
pub fn new_request_id(started_at: DateTime<Utc>) -> String {
    let mut id = Vec::with_capacity(36);
    id.extend_from_slice(b"req_");
    push_hex(&mut id, u128::from(micros(started_at)), 14);
    push_hex(&mut id, rand::random::<u128>(), 18);
    String::from_utf8(id).unwrap_or_default()
}

/// The start time (Unix microseconds) a request id carries, if it is one of [`new_request_id`]'s.
pub(crate) fn id_micros(request_id: &str) -> Option<u64> {
    let hex = request_id.strip_prefix("req_")?;
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex.get(..14)?, 16).ok()
}

/// The `l/` key a request id implies, if it carries its start time.
pub(crate) fn key_l_from_id(request_id: &str) -> Option<Vec<u8>> {
    Some(time_key(&[b"l/"], id_micros(request_id)?, request_id))
}

pub(crate) fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain data types cannot fail (no maps with non-string keys).
    serde_json::to_vec(v).unwrap_or_default()
}

pub(crate) fn from_json<T: for<'de> Deserialize<'de>>(
    key: &[u8],
    v: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        err: e.to_string(),
    })
}

/// First byte of a value stored as postcard in the layout before records had `task`; values
/// stored as JSON start with `{`. Still read, never written.
const POSTCARD_V1: u8 = 1;
/// First byte of a value stored as postcard in the layout before records had the cache counts
/// (`cache_read_tokens`, `cache_write_tokens`). Still read, never written.
const POSTCARD_V2: u8 = 2;
/// First byte of a value stored as postcard in the current layout.
const POSTCARD_V3: u8 = 3;

/// A value stored compactly. Postcard is positional, so a layout change gets a new version byte
/// and values written in an old layout are read through the old type.
pub(crate) trait Compact: Serialize + for<'de> Deserialize<'de> {
    /// The layout written under [`POSTCARD_V1`].
    type V1: for<'de> Deserialize<'de> + Into<Self>;
    /// The layout written under [`POSTCARD_V2`].
    type V2: for<'de> Deserialize<'de> + Into<Self>;
}

impl Compact for LedgerRecord {
    type V1 = LedgerRecordV1;
    type V2 = LedgerRecordV2;
}

impl Compact for PersistedHold {
    type V1 = PersistedHoldV1;
    type V2 = PersistedHoldV2;
}

impl Compact for HoldDrawn {
    type V1 = HoldDrawn;
    type V2 = HoldDrawn;
}

/// A ledger record or an open hold as stored: postcard behind a version byte.
pub(crate) fn encode_compact<T: Compact>(v: &T) -> Vec<u8> {
    // Encoding plain data into a growable buffer cannot fail.
    let mut out = Vec::with_capacity(512);
    out.push(POSTCARD_V3);
    match postcard::to_extend(v, out) {
        Ok(out) => out,
        Err(_) => to_json(v),
    }
}

/// Reads a value written by [`encode_compact`] (in this or an earlier layout), or as JSON by
/// earlier versions.
pub(crate) fn decode_compact<T: Compact>(key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    let corrupt = |e: postcard::Error| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        err: e.to_string(),
    };
    match v.split_first() {
        Some((&POSTCARD_V3, body)) => postcard::from_bytes(body).map_err(corrupt),
        Some((&POSTCARD_V2, body)) => postcard::from_bytes::<T::V2>(body)
            .map(Into::into)
            .map_err(corrupt),
        Some((&POSTCARD_V1, body)) => postcard::from_bytes::<T::V1>(body)
            .map(Into::into)
            .map_err(corrupt),
        _ => from_json(key, v),
    }
}

/// Adds a ledger record and its indexes to a batch, and its counts to the rollup changes that go
/// into the same batch (the caller takes out the counts of a record it replaces).
pub(crate) fn put_record(batch: &mut sled::Batch, rollups: &mut RollupDelta, rec: &LedgerRecord) {
    rollups.add(rec);
    let lk = key_l(rec);
    // The `x/` entry's value is empty: the `l/` key is its key's tail.
    batch.insert(key_x(rec), &[][..]);
    if let Some(a) = key_a(rec) {
        batch.insert(a, &[][..]);
    }
    if id_micros(&rec.request_id) != Some(micros(rec.started_at)) {
        // An id that does not carry its start time is found through the `i/` index.
        batch.insert(key_i(&rec.request_id), lk.clone());
    }
    batch.insert(lk, encode_compact(rec));
}

/// Which records a scan walks: all, or those of a key or of a workflow run through its index.
#[derive(Debug, Clone, Copy)]
pub enum Index<'a> {
    All,
    Key(&'a str),
    Task(&'a str),
}

/// sled's page cache when none is configured (`store.cache_mb`; sled's own default is 1 GiB).
/// It bounds the largest part of a serving gateway's resident memory: with 64 MiB, a gateway
/// that had settled 30,000 requests held 110 MiB with 200 streams open. The tree's upper nodes
/// and recent records (what the console and the admin API read most) fit; older pages come back
/// from the OS page cache.
pub const SLED_CACHE_BYTES: u64 = crate::config::DEFAULT_SLED_CACHE_MB << 20;

/// Read access to the store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
}

impl Store {
    /// Opens (creating) the store under `dir`, with owner-only permissions on what it creates,
    /// and the default page cache.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with_cache(dir, SLED_CACHE_BYTES)
    }

    /// [`Store::open`] with a page cache of `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        let dd = |e: std::io::Error| StoreError::DataDir {
            path: dir.display().to_string(),
            err: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(dd)?;
        set_mode(dir, 0o700).map_err(dd)?;
        let db = sled::Config::new()
            .path(dir.join("tollgate.sled"))
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(1000))
            .open()?;
        restrict_tree(&dir.join("tollgate.sled")).map_err(dd)?;
        let store = Store { db };
        store.ensure_topup_index()?;
        let started = std::time::Instant::now();
        if let Some(n) = store.ensure_rollups()? {
            if n > 0 {
                tracing::info!(
                    records = n,
                    seconds = started.elapsed().as_secs_f64(),
                    "built the ledger's hourly rollups"
                );
            }
        }
        Ok(store)
    }

    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn get_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let k = key_k(id);
        match self.db.get(&k)? {
            Some(v) => Ok(Some(from_json(&k, &v)?)),
            None => Ok(None),
        }
    }

    pub fn keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(b"k/") {
            let (k, v) = kv?;
            out.push(from_json(&k, &v)?);
        }
        out.sort_by(|a: &ApiKeyRecord, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    pub fn bootstrap_key_id(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .db
            .get(format!("m/bootstrap/{name}"))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn wallet(&self, key_id: &str) -> Result<WalletState, StoreError> {
        let k = key_w(key_id);
        match self.db.get(&k)? {
            Some(v) => from_json(&k, &v),
            None => Ok(WalletState::default()),
        }
    }

    pub fn topup_ref(&self, key_id: &str, reference: &str) -> Result<Option<TopupRef>, StoreError> {
        let k = key_t(key_id, reference);
        match self.db.get(&k)? {
            Some(v) => Ok(Some(from_json(&k, &v)?)),
            None => Ok(None),
        }
    }

    /// Every top-up applied.
    pub fn topups(&self) -> Result<Vec<TopupRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(b"u/") {
            let (k, v) = kv?;
            out.push(from_json(&k, &v)?);
        }
        Ok(out)
    }

    /// One key's top-ups, oldest first, through the key's top-up index.
    pub fn key_topups(&self, key_id: &str) -> Result<Vec<TopupRecord>, StoreError> {
        let prefix = key_v(key_id, b"u/");
        let mut out = Vec::new();
        for k in self.db.scan_prefix(&prefix).keys() {
            let k = k?;
            let log = [&b"u/"[..], k.get(prefix.len()..).unwrap_or_default()].concat();
            if let Some(v) = self.db.get(&log)? {
                out.push(from_json(&log, &v)?);
            }
        }
        Ok(out)
    }

    /// Writes the top-up index by key for a store from before it (once).
    pub(crate) fn ensure_topup_index(&self) -> Result<(), StoreError> {
        if self.db.contains_key(TOPUP_INDEX_MARKER)? {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for kv in self.db.scan_prefix(b"u/") {
            let (k, v) = kv?;
            let t: TopupRecord = from_json(&k, &v)?;
            batch.insert(key_v(&t.key_id, &k), &[][..]);
        }
        batch.insert(TOPUP_INDEX_MARKER, &[][..]);
        self.db.apply_batch(batch)?;
        Ok(())
    }

    /// Every open hold persisted, with its latest persisted consumption.
    pub fn holds(&self) -> Result<Vec<PersistedHold>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(b"h/") {
            let (k, v) = kv?;
            let mut h: PersistedHold = decode_compact(&k, &v)?;
            let c = key_c(h.hold_id);
            if let Some(v) = self.db.get(&c)? {
                let d: HoldDrawn = decode_compact(&c, &v)?;
                h.consumed = d.consumed;
                h.consumed_tokens = d.consumed_tokens;
                h.updated_at = d.updated_at;
            }
            out.push(h);
        }
        Ok(out)
    }

    pub fn record(&self, request_id: &str) -> Result<Option<LedgerRecord>, StoreError> {
        if let Some(lk) = key_l_from_id(request_id) {
            if let Some(v) = self.db.get(&lk)? {
                return Ok(Some(decode_compact(&lk, &v)?));
            }
        }
        let Some(lk) = self.db.get(key_i(request_id))? else {
            return Ok(None);
        };
        match self.db.get(&lk)? {
            Some(v) => Ok(Some(decode_compact(&lk, &v)?)),
            None => Ok(None),
        }
    }

    /// Whether the ledger has a record for `request_id`.
    pub fn has_record(&self, request_id: &str) -> Result<bool, StoreError> {
        if let Some(lk) = key_l_from_id(request_id) {
            if self.db.contains_key(lk)? {
                return Ok(true);
            }
        }
        Ok(self.db.contains_key(key_i(request_id))?)
    }

    /// Records newest first, starting after `cursor` (an `l/` key from a previous page).
    /// With `key_id`, walks that key's index instead of the whole ledger.
    pub fn scan_records<'a>(
        &'a self,
        key_id: Option<&str>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        cursor: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, LedgerRecord), StoreError>> + 'a {
        let index = match key_id {
            Some(k) => Index::Key(k),
            None => Index::All,
        };
        self.scan_index(index, since, until, cursor)
    }

    /// Records newest first through `index`, started in `[since, until)`, after `cursor` (an
    /// `l/` key from a previous page): each with its `l/` key.
    pub fn scan_index<'a>(
        &'a self,
        index: Index<'_>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        cursor: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, LedgerRecord), StoreError>> + 'a {
        let prefix: Vec<u8> = match index {
            Index::All => b"l/".to_vec(),
            Index::Key(k) => [&b"x/"[..], k.as_bytes(), b"/"].concat(),
            Index::Task(t) => [&b"a/"[..], t.as_bytes(), b"\0"].concat(),
        };
        let indexed = !matches!(index, Index::All);
        let lo = time_key(&[&prefix], since.map(micros).unwrap_or(0), "");
        let mut hi = time_key(&[&prefix], until.map(micros).unwrap_or(u64::MAX), "");
        if let Some(c) = cursor {
            // The cursor is an `l/` key; map it into this prefix's space.
            let tail = c.get(2..).unwrap_or_default();
            let mut ck = prefix.clone();
            ck.extend_from_slice(tail);
            if ck < hi {
                hi = ck;
            }
        }
        let db = self.db.clone();
        let prefix_len = prefix.len();
        self.db.range(lo..hi).rev().map(move |kv| {
            let (k, v) = kv?;
            let lk: Vec<u8> = match (indexed, v.is_empty()) {
                (false, _) => k.to_vec(),
                // Written before `x/` values were left empty: the value is the `l/` key.
                (true, false) => v.to_vec(),
                (true, true) => {
                    let mut lk = b"l/".to_vec();
                    lk.extend_from_slice(k.get(prefix_len..).unwrap_or_default());
                    lk
                }
            };
            if indexed {
                match db.get(&lk)? {
                    Some(rec) => Ok((lk.clone(), decode_compact(&lk, &rec)?)),
                    None => Err(StoreError::Corrupt {
                        key: String::from_utf8_lossy(&k).into_owned(),
                        err: "index points to a missing record".into(),
                    }),
                }
            } else {
                Ok((lk, decode_compact(&k, &v)?))
            }
        })
    }

    /// The first `limit` records of workflow run `task`, oldest first, and its newest record,
    /// through the task index: `limit + 1` record reads, whatever the run's length.
    pub fn task_ends(
        &self,
        task: &str,
        limit: usize,
    ) -> Result<(Vec<LedgerRecord>, Option<LedgerRecord>), StoreError> {
        let bound = |t: u64| time_key(&[b"a/", task.as_bytes(), b"\0"], t, "");
        let (lo, hi) = (bound(0), bound(u64::MAX));
        let tail_at = lo.len() - 16;
        let read = |k: &[u8]| -> Result<Option<LedgerRecord>, StoreError> {
            let mut lk = b"l/".to_vec();
            lk.extend_from_slice(k.get(tail_at..).unwrap_or_default());
            match self.db.get(&lk)? {
                Some(v) => Ok(Some(decode_compact(&lk, &v)?)),
                None => Ok(None),
            }
        };
        let mut first = Vec::new();
        for kv in self.db.range(lo.clone()..hi.clone()) {
            if first.len() >= limit {
                break;
            }
            let (k, _) = kv?;
            first.extend(read(&k)?);
        }
        let mut last = None;
        for kv in self.db.range(lo..hi).rev() {
            let (k, _) = kv?;
            if let Some(rec) = read(&k)? {
                last = Some(rec);
                break;
            }
        }
        Ok((first, last))
    }

    /// The records of one workflow run (`task`), oldest first, among those started in
    /// `[since, until)` (and of `key_id`, if given), through the task index (`a/`): the cost
    /// grows with the task's records, not with the ledger.
    pub fn task_records(
        &self,
        task: &str,
        key_id: Option<&str>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> Result<Vec<LedgerRecord>, StoreError> {
        let bound = |t: u64| time_key(&[b"a/", task.as_bytes(), b"\0"], t, "");
        let lo = bound(since.map(micros).unwrap_or(0));
        let hi = bound(until.map(micros).unwrap_or(u64::MAX));
        let tail_at = lo.len() - 16;
        let mut out = Vec::new();
        for kv in self.db.range(lo..hi) {
            let (k, _) = kv?;
            let mut lk = b"l/".to_vec();
            lk.extend_from_slice(k.get(tail_at..).unwrap_or_default());
            let Some(v) = self.db.get(&lk)? else {
                continue;
            };
            let rec: LedgerRecord = decode_compact(&lk, &v)?;
            if key_id.is_none_or(|k| rec.key_id == k) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Settles every hold left by a crash at its last persisted consumption, with an
    /// `interrupted` record, each in one atomic batch (R9). Returns how many.
    pub fn recover_holds(&self) -> Result<usize, StoreError> {
        let holds = self.holds()?;
        for h in &holds {
            let mut wallet = self.wallet(&h.key_id)?.balances();
            let balance = wallet.get(&h.bucket).copied().unwrap_or_default();
            let debit = h.consumed.min(balance).max(Decimal::ZERO);
            wallet.insert(h.bucket.clone(), balance - debit);
            let rec = interrupted_record(h, debit);
            let mut batch = sled::Batch::default();
            batch.insert(
                key_w(&h.key_id),
                to_json(&WalletState::from_balances(&wallet)),
            );
            batch.remove(key_h(h.hold_id));
            batch.remove(key_c(h.hold_id));
            let mut rollups = RollupDelta::default();
            // A disconnect may have left a fallback record for the request: this one replaces it.
            if let Some(old) = self.record(&rec.request_id)? {
                rollups.remove(&old);
            }
            put_record(&mut batch, &mut rollups, &rec);
            rollups.write_into(&self.db, &mut batch)?;
            self.db.apply_batch(batch)?;
        }
        // Consumption entries whose hold is gone (settled in the same batch that wrote them).
        let mut stray = sled::Batch::default();
        for k in self.db.scan_prefix(b"c/").keys() {
            stray.remove(k?);
        }
        self.db.apply_batch(stray)?;
        if !holds.is_empty() {
            self.db.flush()?;
        }
        Ok(holds.len())
    }
}

impl crate::store::WalletStore for Store {
    fn keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        Store::keys(self)
    }
    fn key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        Store::get_key(self, id)
    }
    fn key_by_secret_hash(&self, _: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        // One process owns this store: every key it has is in memory already.
        Ok(None)
    }
    fn bootstrap_key_id(&self, name: &str) -> Result<Option<String>, StoreError> {
        Store::bootstrap_key_id(self, name)
    }
    fn wallet(&self, key_id: &str) -> Result<WalletState, StoreError> {
        Store::wallet(self, key_id)
    }
    fn topups(&self) -> Result<Vec<TopupRecord>, StoreError> {
        Store::topups(self)
    }
    fn key_topups(&self, key_id: &str) -> Result<Vec<TopupRecord>, StoreError> {
        Store::key_topups(self, key_id)
    }
    fn holds(&self) -> Result<Vec<PersistedHold>, StoreError> {
        Store::holds(self)
    }
}

impl crate::store::LedgerStore for Store {
    fn record(&self, request_id: &str) -> Result<Option<LedgerRecord>, StoreError> {
        Store::record(self, request_id)
    }
    fn scan_records<'a>(
        &'a self,
        key_id: Option<&str>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        cursor: Option<&[u8]>,
    ) -> crate::store::RecordScan<'a> {
        Box::new(Store::scan_records(self, key_id, since, until, cursor))
    }
    fn task_records(
        &self,
        task: &str,
        key_id: Option<&str>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> Result<Vec<LedgerRecord>, StoreError> {
        Store::task_records(self, task, key_id, since, until)
    }
    fn task_cells(&self, task: &str) -> Result<super::rollup::TaskCells, StoreError> {
        Store::task_cells(self, task)
    }
    fn task_ends(
        &self,
        task: &str,
        limit: usize,
    ) -> Result<(Vec<LedgerRecord>, Option<LedgerRecord>), StoreError> {
        Store::task_ends(self, task, limit)
    }
    fn scan_index<'a>(
        &'a self,
        index: Index<'_>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        cursor: Option<&[u8]>,
    ) -> crate::store::RecordScan<'a> {
        Box::new(Store::scan_index(self, index, since, until, cursor))
    }
    fn fold_span(
        &self,
        scope: super::rollup::Scope<'_>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        visit: &mut dyn crate::store::SpanVisitor,
    ) -> Result<(), StoreError> {
        let mut visit = visit;
        Store::fold_span(
            self,
            scope,
            since,
            until,
            &mut visit,
            |v, r| v.record(r),
            |v, hour, sums| v.hour(hour, sums),
        )
    }
}

/// The `interrupted` record of an open hold left by a crash, billed `debit` of its persisted
/// consumption (R9): the output tokens it had drawn, counted by the gateway.
pub(crate) fn interrupted_record(h: &PersistedHold, debit: Decimal) -> LedgerRecord {
    let mut rec = (*h.draft).clone();
    rec.status = Status::Interrupted;
    rec.finished_at = h.updated_at;
    rec.output_tokens = h.consumed_tokens;
    rec.output_tokens_delivered = h.consumed_tokens;
    rec.usage_source = UsageSource::Counted;
    rec.upstream_usage = None;
    rec.cost = debit;
    rec.shortfall = h.consumed - debit;
    rec.duration_ms =
        u64::try_from((h.updated_at - rec.started_at).num_milliseconds()).unwrap_or(0);
    rec
}

/// Folders 0700, files 0600, below (and including) the store's own folder. Files sled creates
/// later inherit the umask, but sit inside a 0700 folder.
fn restrict_tree(path: &Path) -> std::io::Result<()> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    if meta.is_dir() {
        set_mode(path, 0o700)?;
        for entry in std::fs::read_dir(path)?.flatten() {
            restrict_tree(&entry.path())?;
        }
        Ok(())
    } else {
        set_mode(path, 0o600)
    }
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn record() -> LedgerRecord {
        let mut r = LedgerRecord::empty("req_1".into(), Utc::now());
        r.key_id = "key_1".into();
        r.end_user = Some("alice".into());
        r.endpoint = "chat.completions".into();
        r.requested_model = "m".into();
        r.cost = Decimal::new(123, 4);
        r
    }

    /// `value` in an earlier layout `old` (`Old` read from its JSON, which lacks the fields
    /// that layout did not have).
    fn encode_old<T: Compact, Old: Serialize + for<'de> Deserialize<'de>>(
        value: &T,
        version: u8,
    ) -> Vec<u8> {
        let old: Old = serde_json::from_value(serde_json::to_value(value).unwrap()).unwrap();
        let mut out = vec![version];
        out.extend(postcard::to_allocvec(&old).unwrap());
        out
    }

    fn hold(draft: LedgerRecord) -> PersistedHold {
        PersistedHold {
            hold_id: 7,
            key_id: "key_1".into(),
            bucket: "credit".into(),
            granted: Decimal::new(5, 1),
            consumed: Decimal::new(2, 1),
            consumed_tokens: 3,
            updated_at: Utc::now(),
            draft: Box::new(draft),
        }
    }

    /// A new hold written from its still-encoded draft is stored byte for byte as the decoded
    /// hold would be, and reads back whole; a draft kept as JSON takes the long way.
    #[test]
    fn a_new_hold_encodes_as_the_decoded_hold() {
        let mut rec = record();
        rec.task = Some("run-3".into());
        rec.cache_read_tokens = 11;
        let open = hold(rec.clone());
        let new = NewHold::from(open.clone());
        assert_eq!(new.encode().unwrap(), encode_compact(&open));
        assert_eq!(new.clone().decode().unwrap(), open);
        let stored = new.encode().unwrap();
        assert_eq!(
            decode_compact::<PersistedHold>(b"h/x", &stored).unwrap(),
            open
        );
        let json = NewHold {
            draft: to_json(&rec).into_boxed_slice(),
            ..new
        };
        assert_eq!(json.encode().unwrap(), encode_compact(&open));
        let broken = NewHold {
            draft: vec![POSTCARD_V3, 0xff].into_boxed_slice(),
            ..json.clone()
        };
        assert!(broken.clone().decode().is_err());
        // A truncated draft cannot be spliced into something that reads.
        let stored = broken.encode().unwrap();
        assert!(decode_compact::<PersistedHold>(b"h/x", &stored).is_err());
    }

    /// Records and open holds written before records had `task` still read, without one; the
    /// current layout keeps it.
    #[test]
    fn records_and_holds_in_the_previous_layout_still_read() {
        let rec = record();
        let old = encode_old::<_, LedgerRecordV1>(&rec, POSTCARD_V1);
        assert_eq!(decode_compact::<LedgerRecord>(b"l/x", &old).unwrap(), rec);

        let hold = hold(rec.clone());
        let old = encode_old::<_, PersistedHoldV1>(&hold, POSTCARD_V1);
        assert_eq!(decode_compact::<PersistedHold>(b"h/x", &old).unwrap(), hold);

        let mut with_task = rec;
        with_task.task = Some("run-1".into());
        let new = encode_compact(&with_task);
        assert_eq!(new[0], POSTCARD_V3);
        assert_eq!(
            decode_compact::<LedgerRecord>(b"l/x", &new).unwrap(),
            with_task
        );
        // JSON records from before the compact encoding read too, without `task`.
        let mut json = serde_json::to_value(&with_task).unwrap();
        json.as_object_mut().unwrap().remove("task");
        let read: LedgerRecord = decode_compact(b"l/x", &to_json(&json)).unwrap();
        assert_eq!(read.task, None);
    }

    /// Records and open holds written before the cache counts (layout 2) still read, with the
    /// counts at 0 and everything else kept; the current layout keeps the counts, and so does
    /// JSON, whose records from before them read with 0.
    #[test]
    fn records_and_holds_before_the_cache_counts_still_read() {
        let mut rec = record();
        rec.task = Some("run-2".into());
        rec.input_tokens = 900;
        rec.output_tokens = 12;
        let old = encode_old::<_, LedgerRecordV2>(&rec, POSTCARD_V2);
        assert_eq!(decode_compact::<LedgerRecord>(b"l/x", &old).unwrap(), rec);
        let open = hold(rec.clone());
        let old = encode_old::<_, PersistedHoldV2>(&open, POSTCARD_V2);
        assert_eq!(decode_compact::<PersistedHold>(b"h/x", &old).unwrap(), open);

        let mut cached = rec;
        cached.cache_read_tokens = 700;
        cached.cache_write_tokens = 150;
        let new = encode_compact(&cached);
        assert_eq!(new[0], POSTCARD_V3);
        assert_eq!(
            decode_compact::<LedgerRecord>(b"l/x", &new).unwrap(),
            cached
        );
        let json = to_json(&cached);
        assert_eq!(
            decode_compact::<LedgerRecord>(b"l/x", &json).unwrap(),
            cached
        );
        let mut before = serde_json::to_value(&cached).unwrap();
        let fields = before.as_object_mut().unwrap();
        fields.remove("cache_read_tokens");
        fields.remove("cache_write_tokens");
        let read: LedgerRecord = decode_compact(b"l/x", &to_json(&before)).unwrap();
        assert_eq!((read.cache_read_tokens, read.cache_write_tokens), (0, 0));
        assert_eq!(read.input_tokens, 900);
    }
}
