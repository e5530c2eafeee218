//! Admin endpoints that read the ledger in bulk (docs/api.md, R31, R32): the streamed export, usage
//! groups and the spend-change explainer. Every read runs on the blocking pool (`web::block`) and
//! walks the store in time order, so memory stays bounded by a batch or by the number of groups,
//! never by the size of the ledger.

use std::sync::Arc;

use actix_web::{web, HttpResponse};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::admin::{parse_time, Filter, LedgerQuery};
use super::error::ApiError;
use crate::app::AppState;
use crate::ledger::explain::{self, Period};
use crate::ledger::export::Format;
use crate::ledger::rollup::{Scope, Sums};
use crate::ledger::usage::{parse_group_by, GroupKey, Usage};
use crate::ledger::{LedgerRecord, StoreError};
use crate::store::StateStore;

/// Records per export batch (one `web::block` each).
const EXPORT_BATCH: usize = 500;
/// Records scanned per batch at most, matching or not, so a selective filter over a large
/// ledger still yields to the executor regularly.
const EXPORT_SCAN: usize = 20_000;

#[derive(Deserialize)]
pub struct ExportQuery {
    format: Option<String>,
}

/// Where an export stands between batches.
struct ExportCursor {
    store: Arc<dyn StateStore>,
    filter: Arc<Filter>,
    format: Format,
    /// The `l/` key of the last record scanned; `None` before the first batch.
    after: Option<Vec<u8>>,
    done: bool,
}

/// One export batch: the formatted records, the key to resume after, and whether the scan is
/// over.
struct Batch {
    bytes: Vec<u8>,
    last: Option<Vec<u8>>,
    done: bool,
}

/// One batch: up to `EXPORT_BATCH` matching records after `after`, formatted.
fn export_batch(
    store: &dyn StateStore,
    f: &Filter,
    format: Format,
    after: Option<&[u8]>,
) -> Result<Batch, StoreError> {
    let mut out = Vec::with_capacity(64 * 1024);
    let (mut matched, mut scanned) = (0, 0);
    let mut last = None;
    for item in store.scan_index(f.index(), f.since, f.until, after) {
        let (k, rec) = item?;
        scanned += 1;
        if f.matches(&rec) {
            format.write(&mut out, &rec);
            matched += 1;
        }
        last = Some(k);
        if matched == EXPORT_BATCH || scanned == EXPORT_SCAN {
            return Ok(Batch {
                bytes: out,
                last,
                done: false,
            });
        }
    }
    Ok(Batch {
        bytes: out,
        last,
        done: true,
    })
}

/// `GET /admin/ledger/export?format=jsonl|csv&...`: the ledger's filters without paging,
/// newest first, streamed batch by batch.
pub async fn export(
    q: web::Query<LedgerQuery>,
    fq: web::Query<ExportQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    export_response(&state, &q, fq.format.as_deref()).await
}

/// The export of the records `q` selects in `format` (`jsonl` unless given), streamed: the
/// admin API's export and the console's export links.
pub async fn export_response(
    state: &AppState,
    q: &LedgerQuery,
    format: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    state.settle_reads().await;
    let filter = Arc::new(Filter::parse(q)?);
    let name = format.unwrap_or("jsonl");
    let format = Format::parse(name).ok_or_else(|| {
        ApiError::invalid_value(
            "format",
            format!("unknown format '{name}': use jsonl or csv"),
        )
    })?;
    let header = Bytes::from(format.header());
    let start = ExportCursor {
        store: state.store.clone(),
        filter,
        format,
        after: None,
        done: false,
    };
    let batches = futures_util::stream::unfold(start, |mut c| async move {
        if c.done {
            return None;
        }
        let (store, filter, after) = (c.store.clone(), c.filter.clone(), c.after.take());
        let format = c.format;
        let res = web::block(move || export_batch(&*store, &filter, format, after.as_deref()))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match res {
            Ok(b) => {
                c.done = b.done || b.last.is_none();
                c.after = b.last;
                Some((Ok(Bytes::from(b.bytes)), c))
            }
            Err(e) => {
                // The status line is gone already: abort the body so the client sees a
                // truncated transfer, not a short but complete export.
                tracing::error!(error = %e, "ledger export failed");
                c.done = true;
                Some((Err(std::io::Error::other(e)), c))
            }
        }
    });
    let body =
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(header) }).chain(batches);
    Ok(HttpResponse::Ok()
        .content_type(format.content_type())
        .streaming(body))
}

#[derive(Deserialize)]
pub struct UsageQuery {
    since: Option<String>,
    until: Option<String>,
    group_by: Option<String>,
    key_id: Option<String>,
    project: Option<String>,
    task: Option<String>,
    model: Option<String>,
    status: Option<String>,
}

/// Folds every record that `f` matches into `add`, on the blocking pool (the usage and explain
/// endpoints, and the console's figures).
pub async fn fold_records<T: Send + 'static>(
    state: &AppState,
    f: Filter,
    mut acc: T,
    add: impl Fn(&mut T, &LedgerRecord) + Send + 'static,
) -> Result<T, ApiError> {
    state.settle_reads().await;
    let store = state.store.clone();
    web::block(move || -> Result<T, StoreError> {
        for item in store.scan_index(f.index(), f.since, f.until, None) {
            let (_, rec) = item?;
            if f.matches(&rec) {
                add(&mut acc, &rec);
            }
        }
        Ok(acc)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(e.to_string()))
}

/// Folds the records `f` selects like [`fold_records`], but takes whole hours from the ledger's
/// hourly rollups (`add_hour(hour, sums)`: see `Store::fold_span`) and only the records of
/// the partial hours at either end one by one (`add`): the cost grows with the hours of the
/// range, not its records. For the filters the rollups are kept by (key and project); with any
/// other filter every record goes to `add`.
pub async fn fold_span<T: Send + 'static>(
    state: &AppState,
    f: Filter,
    acc: T,
    add: impl Fn(&mut T, &LedgerRecord) + Send + 'static,
    add_hour: impl Fn(&mut T, u64, Sums<'_>) + Send + 'static,
) -> Result<T, ApiError> {
    if f.task.is_some() || f.model.is_some() || f.status.is_some() {
        return fold_records(state, f, acc, add).await;
    }
    state.settle_reads().await;
    let store = state.store.clone();
    web::block(move || -> Result<T, StoreError> {
        let scope = Scope::of(f.key_id.as_deref(), f.project.as_deref());
        let mut visit = Folder { acc, add, add_hour };
        store.fold_span(scope, f.since, f.until, &mut visit)?;
        Ok(visit.acc)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(e.to_string()))
}

/// The usage of the records `f` selects, grouped by `group_by`: the admin usage endpoint and the
/// console's task page. A filter on a workflow run without time bounds is answered from the
/// run's rollup (`LedgerStore::task_cells`, one entry whatever the run's length); any other
/// folds the records.
pub async fn usage_of(
    state: &AppState,
    f: Filter,
    group_by: Vec<GroupKey>,
) -> Result<Usage, ApiError> {
    let Some(task) = f
        .task
        .clone()
        .filter(|_| f.since.is_none() && f.until.is_none())
    else {
        return fold_records(state, f, Usage::new(group_by), |u, r| u.add(r)).await;
    };
    state.settle_reads().await;
    let store = state.store.clone();
    let cells = web::block(move || store.task_cells(&task))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let task = f.task.as_deref().unwrap_or_default();
    let mut usage = Usage::new(group_by);
    for (c, sums) in &cells {
        let selected = f.key_id.as_ref().is_none_or(|k| &c.key_id == k)
            && f.project.as_ref().is_none_or(|p| &c.project == p)
            && f.model.as_ref().is_none_or(|m| &c.model == m)
            && f.status.is_none_or(|s| c.status == s.as_str());
        if selected {
            usage.add_task_cell(task, c, sums);
        }
    }
    Ok(usage)
}

/// `GET /admin/usage?since=&until=&group_by=...` (R32). Also takes the ledger's `key_id`,
/// `project`, `task`, `model` and `status` filters.
pub async fn usage(
    q: web::Query<UsageQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let group_by = parse_group_by(q.group_by.as_deref().unwrap_or("")).map_err(|bad| {
        ApiError::invalid_value(
            "group_by",
            format!(
                "unknown group_by '{bad}': use any of key_id, project, task, model, route, bucket"
            ),
        )
    })?;
    let q = q.into_inner();
    let f = Filter::parse(&LedgerQuery {
        key_id: q.key_id,
        project: q.project,
        task: q.task,
        model: q.model,
        status: q.status,
        since: q.since,
        until: q.until,
        ..LedgerQuery::default()
    })?;
    let usage = usage_of(&state, f, group_by).await?;
    Ok(HttpResponse::Ok().json(json!({"groups": usage.finish()})))
}

#[derive(Debug, Default, Deserialize)]
pub struct ExplainQuery {
    pub base_since: Option<String>,
    pub base_until: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub key_id: Option<String>,
    pub project: Option<String>,
}

fn period_bound(field: &str, v: &Option<String>) -> Result<DateTime<Utc>, ApiError> {
    parse_time(field, v)?.ok_or_else(|| {
        ApiError::invalid_value(field, format!("'{field}' is required (an RFC 3339 time)"))
    })
}

fn period(
    q: &ExplainQuery,
    since: (&str, &Option<String>),
    until: (&str, &Option<String>),
) -> Result<Filter, ApiError> {
    let (s, u) = (
        period_bound(since.0, since.1)?,
        period_bound(until.0, until.1)?,
    );
    if s >= u {
        return Err(ApiError::invalid_value(
            since.0,
            format!("'{}' must be before '{}'", since.0, until.0),
        ));
    }
    Ok(Filter {
        key_id: q.key_id.clone(),
        project: q.project.clone(),
        task: None,
        model: None,
        status: None,
        since: Some(s),
        until: Some(u),
    })
}

/// An explanation: the two periods (as ledger filters) and the change per currency.
pub struct Explanation {
    pub base: Filter,
    pub current: Filter,
    pub currencies: Vec<explain::CurrencyChange>,
}

/// Explains the change in spend between `q`'s two periods (see `ledger::explain`): the admin
/// explain endpoint and the console's spend explainer.
pub async fn explain_periods(state: &AppState, q: &ExplainQuery) -> Result<Explanation, ApiError> {
    let base = period(
        q,
        ("base_since", &q.base_since),
        ("base_until", &q.base_until),
    )?;
    let current = period(q, ("since", &q.since), ("until", &q.until))?;
    let (base_f, current_f) = (base.clone(), current.clone());
    let fold = |f: Filter| {
        fold_span(
            state,
            f,
            Period::default(),
            |p, r| p.add(r),
            |p, _, sums| {
                if let Sums::Cell(cell, sums) = sums {
                    p.add_cell(cell, sums)
                }
            },
        )
    };
    let base = fold(base).await?;
    let current = fold(current).await?;
    Ok(Explanation {
        base: base_f,
        current: current_f,
        currencies: explain::explain(&base, &current),
    })
}

/// `GET /admin/usage/explain?base_since=&base_until=&since=&until=[&key_id=][&project=]`:
/// the change in spend between two periods per currency, attributed to drivers (see
/// `ledger::explain` for the method).
pub async fn explain(
    q: web::Query<ExplainQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let e = explain_periods(&state, &q).await?;
    let bounds = |f: &Filter| json!({"since": f.since, "until": f.until});
    Ok(HttpResponse::Ok().json(json!({
        "base": bounds(&e.base),
        "current": bounds(&e.current),
        "currencies": e.currencies,
    })))
}

/// Folds records and rollup hours into one accumulator (a [`crate::store::SpanVisitor`]).
struct Folder<T, R, H> {
    acc: T,
    add: R,
    add_hour: H,
}

impl<T, R, H> crate::store::SpanVisitor for Folder<T, R, H>
where
    R: Fn(&mut T, &LedgerRecord),
    H: Fn(&mut T, u64, Sums<'_>),
{
    fn record(&mut self, rec: &LedgerRecord) {
        (self.add)(&mut self.acc, rec)
    }
    fn hour(&mut self, hour: u64, sums: Sums<'_>) {
        (self.add_hour)(&mut self.acc, hour, sums)
    }
}
