//! API keys: stored in sled by id with only the SHA-256 of the secret; authenticated against an
//! in-memory map published through `ArcSwap`, so the hot path takes no lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use chrono::Utc;
use parking_lot::Mutex;
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use crate::config::{BootstrapKey, Config};
use crate::ledger::store::ApiKeyRecord;
use crate::ledger::writer::StoreOp;
use crate::ledger::{LedgerWriter, StoreError};
use crate::store::StateStore;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub record: ApiKeyRecord,
}

impl ApiKey {
    pub fn id(&self) -> &str {
        &self.record.id
    }
    pub fn may_use_model(&self, model: &str) -> bool {
        self.record
            .models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }
    pub fn may_spend(&self, bucket: &str) -> bool {
        self.record
            .buckets
            .as_ref()
            .is_none_or(|b| b.iter().any(|x| x == bucket))
    }
}

pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Fields of a new key (admin API and bootstrap).
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub workspace: Option<String>,
    pub project: Option<String>,
    pub models: Option<Vec<String>>,
    pub buckets: Option<Vec<String>>,
    pub allow_cross_bucket_fallback: bool,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_concurrent_streams: Option<u32>,
}

/// A key's rate limits (R39, R41); `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_concurrent_streams: Option<u32>,
}

pub struct Keys {
    by_hash: ArcSwap<HashMap<[u8; 32], Arc<ApiKey>>>,
    by_id: ArcSwap<HashMap<String, Arc<ApiKey>>>,
    writer: LedgerWriter,
    store: Arc<dyn StateStore>,
    /// Secrets recently looked up in the store and not found there, with when: a store shared
    /// by a fleet is asked about an unknown secret at most once per [`MISS_TTL`].
    misses: Mutex<HashMap<[u8; 32], std::time::Instant>>,
    /// Serializes mutations of the published maps.
    mutate: Mutex<()>,
}

/// How long an unknown secret is remembered as unknown.
const MISS_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// Most unknown secrets remembered at once.
const MISS_CAP: usize = 10_000;

impl Keys {
    pub fn load(store: Arc<dyn StateStore>, writer: LedgerWriter) -> Result<Keys, StoreError> {
        let keys = Keys {
            by_hash: ArcSwap::from_pointee(HashMap::new()),
            by_id: ArcSwap::from_pointee(HashMap::new()),
            writer,
            store: store.clone(),
            misses: Mutex::new(HashMap::new()),
            mutate: Mutex::new(()),
        };
        for rec in store.keys()? {
            keys.publish(rec);
        }
        Ok(keys)
    }

    fn publish(&self, rec: ApiKeyRecord) {
        let _g = self.mutate.lock();
        let key = Arc::new(ApiKey { record: rec });
        let mut by_hash: HashMap<[u8; 32], Arc<ApiKey>> = (**self.by_hash.load()).clone();
        let mut by_id: HashMap<String, Arc<ApiKey>> = (**self.by_id.load()).clone();
        if let Some(old) = by_id.get(&key.record.id) {
            if let Ok(h) = hex_hash(&old.record.secret_sha256) {
                by_hash.remove(&h);
            }
        }
        if key.record.revoked_at.is_none() {
            if let Ok(h) = hex_hash(&key.record.secret_sha256) {
                by_hash.insert(h, key.clone());
            }
        }
        by_id.insert(key.record.id.clone(), key);
        self.by_hash.store(Arc::new(by_hash));
        self.by_id.store(Arc::new(by_id));
    }

    /// The live key for a bearer secret; revoked and unknown keys are `None`. A secret this
    /// process does not know is looked up in the store, which, shared by a fleet, may have it
    /// from another instance.
    pub fn authenticate(&self, secret: &str) -> Option<Arc<ApiKey>> {
        let hash = hash_secret(secret);
        if let Some(k) = self.by_hash.load().get(&hash) {
            return Some(k.clone());
        }
        self.look_up(hash)
    }

    /// The slow path of [`Keys::authenticate`].
    fn look_up(&self, hash: [u8; 32]) -> Option<Arc<ApiKey>> {
        if self
            .misses
            .lock()
            .get(&hash)
            .is_some_and(|t| t.elapsed() < MISS_TTL)
        {
            return None;
        }
        let rec = match self.store.key_by_secret_hash(&hex::encode(hash)) {
            Ok(Some(rec)) => rec,
            Ok(None) => {
                let mut misses = self.misses.lock();
                if misses.len() >= MISS_CAP {
                    misses.retain(|_, t| t.elapsed() < MISS_TTL);
                }
                if misses.len() < MISS_CAP {
                    misses.insert(hash, std::time::Instant::now());
                }
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot look a key up in the store");
                return None;
            }
        };
        self.publish(rec);
        self.by_hash.load().get(&hash).cloned()
    }

    /// Takes over the store's keys where they differ from the ones published (a fleet's keys
    /// changed through other instances).
    pub fn sync(&self, records: Vec<ApiKeyRecord>) {
        for rec in records {
            if self.get(&rec.id).map(|k| k.record != rec).unwrap_or(true) {
                self.publish(rec);
            }
        }
    }

    /// The key with this id, revoked or not. One this process does not know is looked up in
    /// the store (a fleet's other instances may have created it).
    pub fn get(&self, id: &str) -> Option<Arc<ApiKey>> {
        if let Some(k) = self.by_id.load().get(id) {
            return Some(k.clone());
        }
        match self.store.key(id) {
            Ok(Some(rec)) => {
                self.publish(rec);
                self.by_id.load().get(id).cloned()
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look a key up in the store");
                None
            }
        }
    }

    /// Every key, oldest first, as the store has them (a fleet's keys, whichever instance
    /// created them); the keys this process knows when the store cannot answer.
    pub fn list(&self) -> Vec<ApiKeyRecord> {
        match self.store.keys() {
            Ok(records) => return records,
            Err(e) => tracing::warn!(error = %e, "cannot list the keys in the store"),
        }
        self.list_known()
    }

    fn list_known(&self) -> Vec<ApiKeyRecord> {
        let mut v: Vec<ApiKeyRecord> = self
            .by_id
            .load()
            .values()
            .map(|k| k.record.clone())
            .collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    async fn put(
        &self,
        rec: ApiKeyRecord,
        bootstrap_name: Option<String>,
    ) -> Result<(), StoreError> {
        let r = Box::new(rec.clone());
        self.writer
            .ask(|reply| StoreOp::PutKey {
                record: r,
                bootstrap_name,
                reply,
            })
            .await?;
        self.publish(rec);
        Ok(())
    }

    /// Creates a key; returns its record and the secret, which is not stored.
    pub async fn create(&self, new: NewKey) -> Result<(ApiKeyRecord, String), StoreError> {
        let secret = format!("tg-{}", hex::encode(rand::random::<[u8; 24]>()));
        let rec = new_record(&new, &secret);
        self.put(rec.clone(), None).await?;
        Ok((rec, secret))
    }

    pub async fn revoke(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let Some(k) = self.get(id) else {
            return Ok(None);
        };
        let mut rec = k.record.clone();
        if rec.revoked_at.is_none() {
            rec.revoked_at = Some(Utc::now());
            self.put(rec.clone(), None).await?;
        }
        Ok(Some(rec))
    }

    /// Sets a key's limits (`None`: unlimited); they hold from its next request on. Returns
    /// the updated record, or `None` for an unknown key.
    pub async fn set_limits(
        &self,
        id: &str,
        limits: KeyLimits,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let Some(k) = self.get(id) else {
            return Ok(None);
        };
        let mut rec = k.record.clone();
        rec.rpm = limits.rpm;
        rec.tpm = limits.tpm;
        rec.max_concurrent_streams = limits.max_concurrent_streams;
        if rec != k.record {
            self.put(rec.clone(), None).await?;
        }
        Ok(Some(rec))
    }

    /// Creates or updates the configuration's keys. Returns (key id, top-ups to apply once).
    pub async fn bootstrap(
        &self,
        config: &Config,
    ) -> Result<Vec<(String, BTreeMap<String, Decimal>, String)>, StoreError> {
        let mut out = Vec::new();
        if !config.keys.is_empty() {
            // Another instance of a fleet may have created them since this one loaded.
            self.sync(self.store.keys()?);
        }
        for bk in &config.keys {
            let existing = self
                .store
                .bootstrap_key_id(&bk.name)?
                .and_then(|id| self.get(&id));
            let mut rec = new_record(&bootstrap_fields(bk), &bk.secret);
            if let Some(old) = existing {
                rec.id = old.record.id.clone();
                rec.created_at = old.record.created_at;
                rec.revoked_at = old.record.revoked_at;
            }
            if self.get(&rec.id).map(|k| k.record.clone()) != Some(rec.clone()) {
                self.put(rec.clone(), Some(bk.name.clone())).await?;
            }
            out.push((rec.id.clone(), bk.topup.clone(), bk.name.clone()));
        }
        Ok(out)
    }
}

fn bootstrap_fields(bk: &BootstrapKey) -> NewKey {
    NewKey {
        name: bk.name.clone(),
        workspace: Some(bk.workspace.clone()),
        project: Some(bk.project.clone()),
        models: bk.models.clone(),
        buckets: bk.buckets.clone(),
        allow_cross_bucket_fallback: bk.allow_cross_bucket_fallback,
        rpm: bk.rpm,
        tpm: bk.tpm,
        max_concurrent_streams: bk.max_concurrent_streams,
    }
}

fn new_record(new: &NewKey, secret: &str) -> ApiKeyRecord {
    ApiKeyRecord {
        id: format!("key_{}", &uuid::Uuid::new_v4().simple().to_string()[..20]),
        name: new.name.clone(),
        secret_sha256: hex::encode(hash_secret(secret)),
        workspace: new.workspace.clone().unwrap_or_else(|| "default".into()),
        project: new.project.clone().unwrap_or_else(|| "default".into()),
        models: new.models.clone(),
        buckets: new.buckets.clone(),
        allow_cross_bucket_fallback: new.allow_cross_bucket_fallback,
        rpm: new.rpm,
        tpm: new.tpm,
        max_concurrent_streams: new.max_concurrent_streams,
        created_at: Utc::now(),
        revoked_at: None,
    }
}

fn hex_hash(s: &str) -> Result<[u8; 32], hex::FromHexError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out)?;
    Ok(out)
}
