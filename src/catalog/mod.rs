//! The live catalog: which models a key can call now, on which routes, at what price, from which
//! balance (docs/api.md, R21, R33). Built from the config, the routes' published health and the
//! key's wallet.

use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::app::AppState;
use crate::config::{Endpoint, Model};
use crate::keys::ApiKey;
use crate::route::breaker::State;
use crate::wallet::WalletSnapshot;

pub struct CatalogModel {
    pub id: String,
    pub available: bool,
    pub reason: Option<&'static str>,
    pub routes: Vec<Value>,
    pub endpoints: Vec<Endpoint>,
    pub tokenizer: &'static str,
}

impl CatalogModel {
    pub fn tollgate_json(&self) -> Value {
        let mut v = json!({"available": self.available, "routes": self.routes});
        if let Some(r) = self.reason {
            v["reason"] = json!(r);
        }
        v
    }
}

/// Every route of `model` as `/admin/catalog` shows it (docs/api.md).
pub fn route_views(state: &AppState, model: &Model) -> Vec<Value> {
    let now = std::time::Instant::now();
    model
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let snap = state.routes.snapshot(&r.id);
            let bucket = state.config.buckets.get(&r.bucket);
            let st = snap.as_ref().map(|s| s.effective_state(now)).unwrap_or(State::Closed);
            json!({
                "route": r.id,
                "provider": r.provider,
                "upstream_model": r.upstream_model,
                "kind": bucket.map(|b| b.kind.as_str()),
                "role": if i == 0 { "primary" } else { "backup" },
                "bucket": r.bucket,
                "currency": bucket.map(|b| b.currency.clone()),
                "input_per_mtok": r.input_per_mtok.normalize().to_string(),
                "output_per_mtok": r.output_per_mtok.normalize().to_string(),
                "cache_read_per_mtok": r.cache_read_per_mtok.normalize().to_string(),
                "cache_write_per_mtok": r.cache_write_per_mtok.normalize().to_string(),
                "priority": r.priority,
                "weight": r.weight,
                "state": st.as_str(),
                "last_probe": snap.as_ref().and_then(|s| s.last_probe.as_ref()).map(|p| json!({"at": p.at, "ok": p.ok, "latency_ms": p.latency_ms})),
                "last_failure": snap.as_ref().and_then(|s| s.last_failure.as_ref()).map(|f| json!({"at": f.at, "reason": f.reason, "source": f.source})),
                "recent_success_rate": snap.as_ref().and_then(|s| s.recent_success_rate),
                "recent_latency_p50_ms": snap.as_ref().and_then(|s| s.recent_latency_p50_ms),
            })
        })
        .collect()
}

/// The catalog as `key` sees it. Models the key may not use are left out unless
/// `include_not_allowed` (admin view), where they carry `model_not_allowed`.
pub async fn for_key(
    state: &AppState,
    key: &ApiKey,
    include_not_allowed: bool,
) -> Vec<CatalogModel> {
    let wallet = state.wallets.snapshot(key.id()).await.ok();
    for_key_with(state, key, wallet.as_ref(), include_not_allowed)
}

/// [`for_key`] with the key's wallet already read (`None`: no balance anywhere).
pub fn for_key_with(
    state: &AppState,
    key: &ApiKey,
    wallet: Option<&WalletSnapshot>,
    include_not_allowed: bool,
) -> Vec<CatalogModel> {
    let available = |bucket: &str| -> Decimal {
        wallet
            .as_ref()
            .map(|w| {
                w.balances.get(bucket).copied().unwrap_or_default()
                    - w.held.get(bucket).copied().unwrap_or_default()
            })
            .unwrap_or_default()
    };
    let now = std::time::Instant::now();
    let mut out = Vec::new();
    for m in &state.config.models {
        let allowed = key.may_use_model(&m.name);
        if !allowed && !include_not_allowed {
            continue;
        }
        let home = m
            .routes
            .iter()
            .find(|r| key.may_spend(&r.bucket))
            .map(|r| r.bucket.clone());
        let mut any_permitted = false;
        let mut any_healthy = false;
        let mut callable = false;
        for r in &m.routes {
            let permitted = key.may_spend(&r.bucket)
                && (Some(&r.bucket) == home.as_ref() || key.record.allow_cross_bucket_fallback);
            if !permitted {
                continue;
            }
            any_permitted = true;
            let healthy = state
                .routes
                .snapshot(&r.id)
                .map(|s| s.effective_state(now) != State::Open)
                .unwrap_or(true);
            if healthy {
                any_healthy = true;
                if available(&r.bucket) > Decimal::ZERO {
                    callable = true;
                }
            }
        }
        let reason = if !allowed {
            Some("model_not_allowed")
        } else if callable {
            None
        } else if !any_permitted {
            Some("bucket_not_allowed")
        } else if any_healthy {
            Some("insufficient_balance")
        } else {
            Some("no_route_available")
        };
        out.push(CatalogModel {
            id: m.name.clone(),
            available: reason.is_none(),
            reason,
            routes: route_views(state, m),
            endpoints: m.endpoints.clone(),
            tokenizer: m.tokenizer.as_str(),
        });
    }
    out
}

/// The buckets `key` may pay for `model` from, in route order and without repeats: the bucket
/// of the first route it may spend from, and with `allow_cross_bucket_fallback` every other
/// bucket it may spend (the same rule [`for_key`] applies). Names the bucket in a
/// "no balance in <bucket>" verdict.
pub fn spendable_buckets(key: &ApiKey, model: &Model) -> Vec<String> {
    let home = model
        .routes
        .iter()
        .find(|r| key.may_spend(&r.bucket))
        .map(|r| r.bucket.clone());
    let mut out: Vec<String> = Vec::new();
    for r in &model.routes {
        let permitted = key.may_spend(&r.bucket)
            && (Some(&r.bucket) == home.as_ref() || key.record.allow_cross_bucket_fallback);
        if permitted && !out.contains(&r.bucket) {
            out.push(r.bucket.clone());
        }
    }
    out
}

/// Whether any route of `model` may take an attempt now (its breaker not open), for the public
/// verdict that no key narrows.
pub fn any_route_up(state: &AppState, model: &Model) -> bool {
    let now = std::time::Instant::now();
    model.routes.iter().any(|r| {
        state
            .routes
            .snapshot(&r.id)
            .map(|s| s.effective_state(now) != State::Open)
            .unwrap_or(true)
    })
}
