//! Admin endpoints (docs/api.md) on the admin listener: keys, wallets and top-ups, the ledger,
//! the requests open right now, routes and the catalog. Everything under `/admin` needs the admin token; `/metrics`,
//! `/healthz` and `/readyz` do not.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::ledger_queries;
use crate::app::AppState;
use crate::config::{Model, Route};
use crate::keys::{KeyLimits, NewKey};
use crate::ledger::store::{ApiKeyRecord, Index};
use crate::ledger::{LedgerRecord, Status, TopupOutcome};
use crate::wallet::{OpenRequest, WalletError};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/metrics").route(web::get().to(metrics)))
        .service(web::resource("/healthz").route(web::get().to(super::healthz)))
        .service(web::resource("/readyz").route(web::get().to(super::readyz)))
        .service(
            web::scope("/admin")
                .wrap(actix_web::middleware::from_fn(require_admin_token))
                .service(
                    web::resource("/keys")
                        .route(web::post().to(create_key))
                        .route(web::get().to(list_keys)),
                )
                .service(
                    web::resource("/keys/{id}")
                        .route(web::delete().to(revoke_key))
                        .route(web::patch().to(patch_key))
                        .route(web::get().to(get_key)),
                )
                .service(web::resource("/keys/{id}/topup").route(web::post().to(topup)))
                .service(web::resource("/keys/{id}/wallet").route(web::get().to(wallet)))
                .service(web::resource("/ledger").route(web::get().to(ledger)))
                // Before `/ledger/{request_id}`, so that `export` is not taken for an id.
                .service(
                    web::resource("/ledger/export").route(web::get().to(ledger_queries::export)),
                )
                .service(web::resource("/usage").route(web::get().to(ledger_queries::usage)))
                .service(
                    web::resource("/usage/explain").route(web::get().to(ledger_queries::explain)),
                )
                .service(web::resource("/ledger/{request_id}").route(web::get().to(ledger_one)))
                .service(web::resource("/routes").route(web::get().to(routes_view)))
                .service(web::resource("/catalog").route(web::get().to(catalog)))
                .service(web::resource("/inflight").route(web::get().to(inflight)))
                .default_service(web::to(admin_not_found)),
        )
        .default_service(web::to(super::client::not_found));
}

async fn admin_not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(format!(
        "no admin route for {} {}",
        req.method(),
        req.path()
    )))
}

/// Checks the admin token before any handler runs, so before its body extractor reads up to
/// the body limit: a caller without the token cannot make the listener read or buffer a body.
async fn require_admin_token(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    match req.app_data::<web::Data<AppState>>() {
        Some(state) => authorize(req.request(), state)?,
        None => return Err(ApiError::internal("admin state missing").into()),
    }
    next.call(req).await
}

/// The key with this id, or 404 `not_found`.
pub fn key_or_404(
    state: &AppState,
    id: &str,
) -> Result<std::sync::Arc<crate::keys::ApiKey>, ApiError> {
    state
        .keys
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no key with id '{id}'")))
}

pub(crate) fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let token = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim);
    match token {
        Some(t) if state.admin_token_matches(t) => Ok(()),
        _ => Err(ApiError::unauthorized("missing or invalid admin token")),
    }
}

fn json_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_syntax() || e.is_eof() {
            "invalid_json"
        } else {
            "invalid_value"
        };
        ApiError::invalid(code, format!("invalid request body: {e}"))
    })
}

pub fn key_view(k: &ApiKeyRecord) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "workspace": k.workspace,
        "project": k.project,
        "buckets": k.buckets,
        "models": k.models,
        "allow_cross_bucket_fallback": k.allow_cross_bucket_fallback,
        "rpm": k.rpm,
        "tpm": k.tpm,
        "max_concurrent_streams": k.max_concurrent_streams,
        "created_at": k.created_at,
        "revoked_at": k.revoked_at,
    })
}

/// A new key's fields (`POST /admin/keys`, the console's create form).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: String,
    pub workspace: Option<String>,
    pub project: Option<String>,
    pub buckets: Option<Vec<String>>,
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub allow_cross_bucket_fallback: bool,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_concurrent_streams: Option<u32>,
}

/// Checks and creates a key; returns its record and its secret (shown once, never stored).
pub async fn create_key_from(
    state: &AppState,
    c: CreateKey,
) -> Result<(ApiKeyRecord, String), ApiError> {
    if c.name.trim().is_empty() {
        return Err(ApiError::invalid_value("name", "'name' must not be empty"));
    }
    for b in c.buckets.iter().flatten() {
        if !state.config.buckets.contains_key(b) {
            return Err(ApiError::invalid_value(
                "buckets",
                format!("unknown bucket '{b}'"),
            ));
        }
    }
    for m in c.models.iter().flatten() {
        if state.config.model(m).is_none() {
            return Err(ApiError::invalid_value(
                "models",
                format!("unknown model '{m}'"),
            ));
        }
    }
    state
        .keys
        .create(NewKey {
            name: c.name,
            workspace: c.workspace,
            project: c.project,
            models: c.models,
            buckets: c.buckets,
            allow_cross_bucket_fallback: c.allow_cross_bucket_fallback,
            rpm: c.rpm,
            tpm: c.tpm,
            max_concurrent_streams: c.max_concurrent_streams,
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))
}

async fn create_key(
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let c: CreateKey = json_body(&body)?;
    let (rec, secret) = create_key_from(&state, c).await?;
    let mut v = key_view(&rec);
    v["secret"] = json!(secret);
    Ok(HttpResponse::Created().json(v))
}

async fn list_keys(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let keys: Vec<Value> = state.keys.list().iter().map(key_view).collect();
    Ok(HttpResponse::Ok().json(json!({"keys": keys})))
}

async fn get_key(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let k = key_or_404(&state, &path)?;
    Ok(HttpResponse::Ok().json(key_view(&k.record)))
}

/// Revokes a key (idempotent); returns its record.
pub async fn revoke_key_by_id(state: &AppState, id: &str) -> Result<ApiKeyRecord, ApiError> {
    match state.keys.revoke(id).await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(ApiError::not_found(format!("no key with id '{id}'"))),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

async fn revoke_key(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    revoke_key_by_id(&state, &path).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Sets a key's limits; returns its record.
pub async fn set_key_limits(
    state: &AppState,
    id: &str,
    limits: KeyLimits,
) -> Result<ApiKeyRecord, ApiError> {
    for (name, v) in [
        ("rpm", limits.rpm.map(u64::from)),
        ("tpm", limits.tpm),
        (
            "max_concurrent_streams",
            limits.max_concurrent_streams.map(u64::from),
        ),
    ] {
        if v == Some(0) {
            return Err(ApiError::invalid_value(
                name,
                format!("'{name}' must be at least 1 (null for no limit)"),
            ));
        }
    }
    match state.keys.set_limits(id, limits).await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(ApiError::not_found(format!("no key with id '{id}'"))),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

/// A limit in a `PATCH /admin/keys/{id}` body: absent keeps it, `null` removes it, a positive
/// integer sets it.
fn patch_limit<T: TryFrom<u64>>(
    body: &serde_json::Map<String, Value>,
    name: &str,
    old: Option<T>,
) -> Result<Option<T>, ApiError> {
    let bad = || {
        ApiError::invalid_value(
            name,
            format!("'{name}' must be a positive integer or null (no limit)"),
        )
    };
    match body.get(name) {
        None => Ok(old),
        Some(Value::Null) => Ok(None),
        Some(v) => {
            let n = v.as_u64().filter(|n| *n > 0).ok_or_else(bad)?;
            T::try_from(n).map(Some).map_err(|_| bad())
        }
    }
}

/// `PATCH /admin/keys/{id}` with any of `rpm`, `tpm`, `max_concurrent_streams`.
async fn patch_key(
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let body: serde_json::Map<String, Value> = json_body(&body)?;
    if let Some(k) = body
        .keys()
        .find(|k| !["rpm", "tpm", "max_concurrent_streams"].contains(&k.as_str()))
    {
        return Err(ApiError::invalid_value(
            k,
            format!(
                "unknown field '{k}': a key's rpm, tpm and max_concurrent_streams can be changed"
            ),
        ));
    }
    let key = key_or_404(&state, &path)?;
    let old = &key.record;
    let limits = KeyLimits {
        rpm: patch_limit(&body, "rpm", old.rpm)?,
        tpm: patch_limit(&body, "tpm", old.tpm)?,
        max_concurrent_streams: patch_limit(
            &body,
            "max_concurrent_streams",
            old.max_concurrent_streams,
        )?,
    };
    let rec = set_key_limits(&state, &path, limits).await?;
    Ok(HttpResponse::Ok().json(key_view(&rec)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopupBody {
    bucket: String,
    amount: Value,
    reference: Option<String>,
}

/// Integer digits a top-up amount may have (R40): far below what a balance can hold, so that
/// no number of top-ups a person could send overflows one.
const AMOUNT_MAX_INT_DIGITS: u32 = 18;

/// A top-up amount: a positive decimal with at most 18 integer digits and at most `scale`
/// (the bucket's `display_scale`) decimal places (R40).
fn parse_amount(v: &Value, scale: u32) -> Result<Decimal, ApiError> {
    let d = match v {
        Value::String(s) => Decimal::from_str_exact(s.trim()).ok(),
        Value::Number(n) => Decimal::from_str_exact(&n.to_string()).ok(),
        _ => None,
    };
    let Some(d) = d.map(|d| d.normalize()) else {
        return Err(ApiError::invalid_value(
            "amount",
            "'amount' must be a decimal string such as \"10.50\"",
        ));
    };
    if d <= Decimal::ZERO {
        return Err(ApiError::invalid_value(
            "amount",
            "'amount' must be greater than 0",
        ));
    }
    let limit = Decimal::from(10u64.pow(AMOUNT_MAX_INT_DIGITS));
    if d >= limit {
        return Err(ApiError::invalid_value(
            "amount",
            format!(
                "'amount' may have at most {AMOUNT_MAX_INT_DIGITS} digits before the decimal point"
            ),
        ));
    }
    if d.scale() > scale {
        return Err(ApiError::invalid_value(
            "amount",
            format!("'amount' may have at most {scale} decimal places in this bucket"),
        ));
    }
    Ok(d)
}

/// A key's wallet per bucket it may spend: balance, held, available, each in its currency
/// (`GET /admin/keys/{id}/wallet`).
pub async fn wallet_view(state: &AppState, key_id: &str) -> Result<Value, ApiError> {
    let key = key_or_404(state, key_id)?;
    let snap = state.wallets.snapshot(key_id).await.map_err(|e| {
        ApiError::new(
            503,
            "service_unavailable",
            "wallet_unavailable",
            e.to_string(),
        )
    })?;
    let mut buckets = serde_json::Map::new();
    for (name, b) in &state.config.buckets {
        if !key.may_spend(name) {
            continue;
        }
        let balance = snap.balances.get(name).copied().unwrap_or_default();
        let held = snap.held.get(name).copied().unwrap_or_default();
        buckets.insert(
            name.clone(),
            json!({
                "currency": b.currency,
                "balance": balance.normalize().to_string(),
                "held": held.normalize().to_string(),
                "available": (balance - held).max(Decimal::ZERO).normalize().to_string(),
            }),
        );
    }
    Ok(json!({"key_id": key_id, "buckets": buckets}))
}

/// Tops up a key's bucket (R40): checks the bucket and the amount, applies a reference at
/// most once. `Duplicate` when the reference was applied before (nothing changes).
pub async fn apply_topup(
    state: &AppState,
    key_id: &str,
    bucket: &str,
    amount: &Value,
    reference: Option<String>,
) -> Result<TopupOutcome, ApiError> {
    let key = key_or_404(state, key_id)?;
    if !state.config.buckets.contains_key(bucket) {
        return Err(ApiError::invalid_value(
            "bucket",
            format!("unknown bucket '{bucket}'"),
        ));
    }
    if !key.may_spend(bucket) {
        return Err(ApiError::invalid_value(
            "bucket",
            format!("key '{}' may not spend bucket '{bucket}'", key.record.id),
        ));
    }
    let scale = state
        .config
        .buckets
        .get(bucket)
        .map_or(0, |b| b.display_scale);
    let amount = parse_amount(amount, scale)?;
    if let Some(r) = &reference {
        if r.is_empty() || r.len() > 256 {
            return Err(ApiError::invalid_value(
                "reference",
                "'reference' must be 1 to 256 characters",
            ));
        }
    }
    match state
        .wallets
        .topup(key.id(), bucket, amount, reference.clone())
        .await
    {
        Ok(o @ (TopupOutcome::Applied | TopupOutcome::Duplicate)) => Ok(o),
        Ok(TopupOutcome::Conflict(prev)) => Err(ApiError::new(
            409,
            "invalid_request_error",
            "reference_conflict",
            format!(
                "reference '{}' was already used for {} in bucket {}",
                reference.unwrap_or_default(),
                prev.amount.normalize(),
                prev.bucket
            ),
        )),
        Err(WalletError::Invalid(m)) => Err(ApiError::invalid_value("amount", m)),
        Err(e) => {
            // The store may have taken it all the same (a failed fsync).
            let advice = match reference {
                Some(_) => "retry with the same reference, which applies it at most once",
                None => "check the wallet before retrying (a reference makes retries safe)",
            };
            Err(ApiError::new(
                503,
                "service_unavailable",
                "wallet_unavailable",
                format!("{e}; the top-up may have been applied: {advice}"),
            ))
        }
    }
}

async fn topup(
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    key_or_404(&state, &path)?;
    let t: TopupBody = json_body(&body)?;
    apply_topup(&state, &path, &t.bucket, &t.amount, t.reference).await?;
    Ok(HttpResponse::Ok().json(wallet_view(&state, &path).await?))
}

async fn wallet(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(wallet_view(&state, &path).await?))
}

#[derive(Deserialize)]
struct InflightQuery {
    key_id: Option<String>,
}

/// One open request as `GET /admin/inflight` shows it: the draft record's attribution and route,
/// what it has drawn so far and what its hold grants; amounts as decimal strings. In a fleet,
/// `instance_id` names the instance serving it.
pub fn inflight_view(r: &OpenRequest) -> Value {
    let d = &r.draft;
    json!({
        "request_id": d.request_id,
        "instance_id": d.instance_id,
        "key_id": d.key_id,
        "project": d.project,
        "task": d.task,
        "requested_model": d.requested_model,
        "route": d.route,
        "bucket": d.bucket,
        "currency": d.currency,
        "started_at": d.started_at,
        "output_tokens": r.output_tokens,
        "cost": r.drawn.normalize().to_string(),
        "held": r.held.normalize().to_string(),
    })
}

/// `GET /admin/inflight?key_id=`: the requests open right now, one per open hold, newest first.
async fn inflight(
    q: web::Query<InflightQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let key_id = q.key_id.as_deref();
    if let Some(k) = key_id {
        key_or_404(&state, k)?;
    }
    let open = open_requests(&state, key_id).await.map_err(|e| {
        ApiError::new(
            503,
            "service_unavailable",
            "wallet_unavailable",
            e.to_string(),
        )
    })?;
    let requests: Vec<Value> = open.iter().map(inflight_view).collect();
    Ok(HttpResponse::Ok().json(json!({ "requests": requests })))
}

/// The requests open right now, newest first; with `key_id`, only that key's. This instance's
/// come from its wallet actors, as they are. In a fleet, the other instances' come from the
/// open holds they persist at every flush (R9), so their figures are at most one flush
/// interval old; each request's draft names the instance serving it.
pub async fn open_requests(
    state: &AppState,
    key_id: Option<&str>,
) -> Result<Vec<OpenRequest>, WalletError> {
    let mut open = state.wallets.inflight(key_id).await?;
    let Some(me) = state.instance_id.clone() else {
        return Ok(open);
    };
    let store = state.store.clone();
    let key = key_id.map(str::to_string);
    let persisted = web::block(move || store.fleet_holds(key.as_deref()))
        .await
        .map_err(|e| WalletError::Unavailable(e.to_string()))?
        .map_err(|e| WalletError::Unavailable(e.to_string()))?;
    for r in &mut open {
        r.draft.instance_id = Some(me.clone());
    }
    // This instance's own rows are older copies of what its actors just answered.
    open.extend(
        persisted
            .into_iter()
            .filter(|(instance, _)| *instance != me)
            .map(|(instance, h)| {
                let mut draft = *h.draft;
                draft.instance_id = Some(instance);
                OpenRequest {
                    hold_id: h.hold_id,
                    draft,
                    drawn: h.consumed,
                    output_tokens: h.consumed_tokens,
                    held: h.granted,
                }
            }),
    );
    open.sort_by(|a, b| {
        (b.draft.started_at, &b.draft.request_id).cmp(&(a.draft.started_at, &a.draft.request_id))
    });
    Ok(open)
}

/// Ledger filters (R31).
#[derive(Debug, Default, Deserialize)]
pub struct LedgerQuery {
    pub key_id: Option<String>,
    pub project: Option<String>,
    pub task: Option<String>,
    pub model: Option<String>,
    pub status: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

pub(crate) fn parse_time(
    field: &str,
    v: &Option<String>,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    match v {
        None => Ok(None),
        Some(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| {
                ApiError::invalid_value(field, format!("'{field}' must be an RFC 3339 time"))
            }),
    }
}

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub key_id: Option<String>,
    pub project: Option<String>,
    /// Exact match on the record's `task`.
    pub task: Option<String>,
    pub model: Option<String>,
    pub status: Option<Status>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    pub fn parse(q: &LedgerQuery) -> Result<Filter, ApiError> {
        let status = match &q.status {
            None => None,
            Some(s) => Some(Status::parse(s).ok_or_else(|| {
                ApiError::invalid_value("status", format!("unknown status '{s}'"))
            })?),
        };
        Ok(Filter {
            key_id: q.key_id.clone(),
            project: q.project.clone(),
            task: q.task.clone(),
            model: q.model.clone(),
            status,
            since: parse_time("since", &q.since)?,
            until: parse_time("until", &q.until)?,
        })
    }
    /// The index that walks the fewest records for this filter: a workflow run's (`task`), else
    /// the key's, else the whole ledger. [`Filter::matches`] still decides each record.
    pub fn index(&self) -> Index<'_> {
        match (&self.task, &self.key_id) {
            (Some(t), _) => Index::Task(t),
            (None, Some(k)) => Index::Key(k),
            (None, None) => Index::All,
        }
    }

    pub fn matches(&self, r: &LedgerRecord) -> bool {
        self.project.as_ref().is_none_or(|p| &r.project == p)
            && self
                .task
                .as_ref()
                .is_none_or(|t| r.task.as_ref() == Some(t))
            && self.model.as_ref().is_none_or(|m| &r.requested_model == m)
            && self.status.is_none_or(|s| r.status == s)
            && self.key_id.as_ref().is_none_or(|k| &r.key_id == k)
    }
}

impl LedgerQuery {
    /// The page size: 100 unless given, at most 1000.
    pub fn page_limit(&self) -> Result<usize, ApiError> {
        match &self.limit {
            None => Ok(100),
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=1000).contains(&n) => Ok(n),
                _ => Err(ApiError::invalid_value(
                    "limit",
                    "'limit' must be an integer from 1 to 1000",
                )),
            },
        }
    }

    /// The `l/` key the page starts after, from the previous page's `next_cursor`.
    pub fn page_cursor(&self) -> Result<Option<Vec<u8>>, ApiError> {
        match &self.cursor {
            None => Ok(None),
            Some(c) => hex::decode(c)
                .map(Some)
                .map_err(|_| ApiError::invalid_value("cursor", "invalid cursor")),
        }
    }
}

/// One page of the ledger (R31), newest first: the records `q` selects and the cursor of the
/// next page when there is one. `GET /admin/ledger` and the console's ledger explorer.
pub async fn ledger_page(
    state: &web::Data<AppState>,
    q: &LedgerQuery,
) -> Result<(Vec<LedgerRecord>, Option<String>), ApiError> {
    state.settle_reads().await;
    let f = Filter::parse(q)?;
    let limit = q.page_limit()?;
    let cursor = q.page_cursor()?;
    let state2 = state.clone();
    web::block(
        move || -> Result<(Vec<LedgerRecord>, Option<String>), String> {
            let mut out = Vec::new();
            let mut last_key = None;
            let mut more = false;
            for item in state2
                .store
                .scan_index(f.index(), f.since, f.until, cursor.as_deref())
            {
                let (k, rec) = item.map_err(|e| e.to_string())?;
                if !f.matches(&rec) {
                    continue;
                }
                if out.len() == limit {
                    more = true;
                    break;
                }
                last_key = Some(k);
                out.push(rec);
            }
            Ok((
                out,
                if more {
                    last_key.map(hex::encode)
                } else {
                    None
                },
            ))
        },
    )
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(ApiError::internal)
}

async fn ledger(
    q: web::Query<LedgerQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (records, next) = ledger_page(&state, &q).await?;
    Ok(HttpResponse::Ok().json(json!({"records": records, "next_cursor": next})))
}

/// One request's ledger record; `not_found` when there is none.
pub async fn ledger_record(state: &AppState, request_id: &str) -> Result<LedgerRecord, ApiError> {
    state.settle_reads().await;
    match state.store.record(request_id) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(ApiError::not_found(format!(
            "no ledger record for request '{request_id}'"
        ))),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

async fn ledger_one(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(ledger_record(&state, &path).await?))
}

/// Every route in configuration order with its model and its live snapshot (breaker state,
/// counters, last probe, last failure): `GET /admin/routes` and the console's routes page.
pub fn route_states(
    state: &AppState,
) -> Vec<(Arc<Model>, Arc<Route>, Arc<crate::route::RouteSnapshot>)> {
    state
        .config
        .routes()
        .filter_map(|(m, r)| {
            let s = state.routes.snapshot(&r.id)?;
            Some((m.clone(), r.clone(), s))
        })
        .collect()
}

async fn routes_view(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let now = std::time::Instant::now();
    let mut out = Vec::new();
    for (m, r, s) in route_states(&state) {
        let bucket = state.config.buckets.get(&r.bucket);
        out.push(json!({
            "route": r.id,
            "model": m.name,
            "provider": r.provider,
            "upstream_model": r.upstream_model,
            "bucket": r.bucket,
            "kind": bucket.map(|b| b.kind.as_str()),
            "priority": r.priority,
            "weight": r.weight,
            "state": s.effective_state(now).as_str(),
            "consecutive_failures": s.consecutive_failures,
            "requests": s.requests,
            "failures": s.failures,
            "latency_ewma_ms": s.latency_ewma_ms,
            "open_until": s.open_until_at,
            "last_probe": s.last_probe,
            "last_failure": s.last_failure,
        }));
    }
    // Route health is each instance's own (F5): the answer names the instance asked.
    Ok(HttpResponse::Ok().json(json!({"instance_id": state.instance_id, "routes": out})))
}

#[derive(Deserialize)]
struct CatalogQuery {
    key_id: Option<String>,
}

async fn catalog(
    q: web::Query<CatalogQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let models: Vec<Value> = match &q.key_id {
        Some(id) => {
            let key = key_or_404(&state, id)?;
            crate::catalog::for_key(&state, &key, true)
                .await
                .into_iter()
                .map(|m| {
                    json!({"id": m.id, "endpoints": m.endpoints, "tokenizer": m.tokenizer, "available": m.available, "reason": m.reason, "routes": m.routes})
                })
                .collect()
        }
        None => state
            .config
            .models
            .iter()
            .map(|m| {
                let keys: Vec<String> = state
                    .keys
                    .list()
                    .into_iter()
                    .filter(|k| k.revoked_at.is_none() && k.models.as_ref().is_none_or(|ms| ms.contains(&m.name)))
                    .map(|k| k.id)
                    .collect();
                json!({"id": m.name, "endpoints": m.endpoints, "tokenizer": m.tokenizer.as_str(), "routes": crate::catalog::route_views(&state, m), "keys": keys})
            })
            .collect(),
    };
    Ok(HttpResponse::Ok().json(json!({"models": models})))
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    metrics::gauge!(crate::metrics::WALLET_ACTORS).set(state.wallets.actor_count() as f64);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::metrics::render(&state.metrics))
}
