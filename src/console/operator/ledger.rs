//! The ledger explorer: `/console/ledger` (the admin ledger's filters as query parameters, its
//! cursor for stable paging, export links, a live tail) and `/console/ledger/{request_id}` (every
//! attempt and every field of one record). The records come from the admin API's own query
//! (`api::admin::ledger_page`, `ledger_record`, `ledger_queries::export_response`).

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{Duration, Utc};
use maud::{html, Markup};
use serde::Serialize;
use serde_json::{json, Value};

use super::parts::{self, FieldError};
use super::session::Operator;
use crate::api::admin::{ledger_page, ledger_record, LedgerQuery};
use crate::api::error::ApiError;
use crate::api::ledger_queries::export_response;
use crate::app::AppState;
use crate::console::layout;
use crate::ledger::record::FIELDS;
use crate::ledger::LedgerRecord;

const CURRENT: &str = "/console/ledger";

/// The filters, in the order of the form.
const FILTERS: [(&str, &str, &str); 7] = [
    ("key_id", "Key id", ""),
    ("project", "Project", ""),
    ("task", "Task", ""),
    ("model", "Model", ""),
    ("status", "Status", "completed, upstream_error…"),
    ("since", "Since", "RFC 3339"),
    ("until", "Until", "RFC 3339"),
];

/// How far back the live tail looks for records that finished after the newest one shown
/// (records are ordered by their start; a long stream lands behind newer short ones).
const TAIL_LOOKBACK_MIN: i64 = 10;
/// Records one tail poll returns at most.
const TAIL_LIMIT: &str = "100";

/// The admin ledger query from a page's parameters (empty fields are no filter).
pub fn ledger_query(pairs: &[(String, String)]) -> LedgerQuery {
    let p = |n: &str| parts::param(pairs, n);
    LedgerQuery {
        key_id: p("key_id"),
        project: p("project"),
        task: p("task"),
        model: p("model"),
        status: p("status"),
        since: p("since"),
        until: p("until"),
        limit: p("limit"),
        cursor: p("cursor"),
    }
}

/// The filter parameters present, without paging.
fn filter_pairs(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    FILTERS
        .iter()
        .filter_map(|(name, _, _)| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| (*name, v.as_str()))
        })
        .collect()
}

/// A ledger row as the page and the live tail show it.
#[derive(Serialize)]
pub struct Row {
    pub request_id: String,
    pub time: String,
    pub key: String,
    pub project: String,
    pub model: String,
    pub chain: String,
    pub retries: u32,
    pub status: &'static str,
    pub bucket: String,
    pub tokens: String,
    pub cost: String,
}

pub fn row(state: &AppState, r: &LedgerRecord) -> Row {
    Row {
        request_id: r.request_id.clone(),
        time: layout::time(r.started_at),
        key: format!("{} ({})", r.key_name, r.key_id),
        project: r.project.clone(),
        model: r.requested_model.clone(),
        chain: layout::route_chain(&r.attempts),
        retries: r.retries,
        status: r.status.as_str(),
        bucket: r.bucket.clone().unwrap_or_else(|| "—".into()),
        tokens: format!("{} in / {} out", r.input_tokens, r.output_tokens),
        cost: parts::record_cost(state, r),
    }
}

fn status_class(status: &str) -> &'static str {
    if status == "completed" {
        "ok"
    } else {
        "bad"
    }
}

/// The table of rows (also used by other pages).
pub fn table(rows: &[Row], tail: Option<(&str, &str)>) -> Markup {
    html! {
        table #ledger-rows data-tail=[tail.map(|t| t.0)] data-newest=[tail.map(|t| t.1)] {
            thead { tr {
                th { "Time" } th { "Request" } th { "Key" } th { "Project" } th { "Model" }
                th { "Route chain" } th.num { "Retries" } th { "Status" } th { "Bucket that paid" }
                th.num { "Tokens" } th.num { "Cost" }
            } }
            tbody {
                @for r in rows {
                    tr data-id=(r.request_id) {
                        td { (r.time) }
                        td { a href=(format!("/console/ledger/{}", parts::enc(&r.request_id))) { code { (r.request_id) } } }
                        td { (r.key) }
                        td { (r.project) }
                        td { (r.model) }
                        td { (r.chain) }
                        td.num { (r.retries) }
                        td class=(status_class(r.status)) { (r.status) }
                        td { (r.bucket) }
                        td.num { (r.tokens) }
                        td.num { (r.cost) }
                    }
                }
            }
        }
    }
}

fn list_page(
    op: &Operator,
    state: &AppState,
    pairs: &[(String, String)],
    found: Result<(Vec<LedgerRecord>, Option<String>), FieldError>,
) -> HttpResponse {
    let filters = filter_pairs(pairs);
    let (records, next, error) = match found {
        Ok((r, n)) => (r, n, None),
        Err(e) => (Vec::new(), None, Some(e)),
    };
    let rows: Vec<Row> = records.iter().map(|r| row(state, r)).collect();
    let filter_qs = parts::query_string(filters.iter().copied());
    let with = |extra: &[(&str, &str)]| {
        let mut all: Vec<(&str, &str)> = filters.clone();
        all.extend_from_slice(extra);
        parts::query_string(all)
    };
    let limit = parts::param(pairs, "limit");
    let first_page = parts::param(pairs, "cursor").is_none();
    // Only the first page follows new records, and only when no `until` bounds it.
    let tail_url = format!("/console/ledger/tail?{filter_qs}");
    let newest = records
        .first()
        .map(|r| {
            r.started_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        })
        .unwrap_or_default();
    let tail = (first_page && error.is_none() && parts::param(pairs, "until").is_none())
        .then_some((tail_url.as_str(), newest.as_str()));
    let general = error.as_ref().filter(|e| {
        e.param
            .as_deref()
            .is_none_or(|p| !FILTERS.iter().any(|f| f.0 == p) && p != "limit")
    });
    let limit_pair: Vec<(&str, &str)> =
        limit.as_deref().map(|l| ("limit", l)).into_iter().collect();
    let first_href = format!("{CURRENT}?{}", with(&limit_pair));
    let next_href = next.as_deref().map(|c| {
        let mut extra = limit_pair.clone();
        extra.push(("cursor", c));
        format!("{CURRENT}?{}", with(&extra))
    });
    let body = html! {
        h1 { "Ledger" }
        form method="get" action=(CURRENT) {
            @for (name, label, hint) in FILTERS {
                (parts::field(label, name, parts::param(pairs, name).as_deref(), hint, error.as_ref()))
            }
            (parts::field("Per page", "limit", limit.as_deref(), "100", error.as_ref()))
            button type="submit" { "Filter" }
            " " a href=(CURRENT) { "Clear" }
        }
        @if let Some(e) = general { p.error { (e.message) } }
        p {
            "Export these records: "
            a href=(format!("/console/ledger/export?{}", with(&[("format", "csv")]))) { "CSV" }
            " · "
            a href=(format!("/console/ledger/export?{}", with(&[("format", "jsonl")]))) { "JSONL" }
        }
        @if error.is_none() {
            @if rows.is_empty() { p.muted { "No records match." } }
            (table(&rows, tail))
            p {
                @if !first_page { a href=(first_href) { "First page" } " " }
                @if let Some(h) = &next_href { a href=(h) { "Next page →" } }
            }
            @if tail.is_some() { p.muted { "New records appear at the top as they are written." } }
        }
        script src=(super::SCRIPT_PATH) {}
    };
    layout::ok(super::page(op, "Ledger", CURRENT, body))
}

/// `GET /console/ledger`.
pub async fn list(op: Operator, req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let pairs = parts::query_pairs(req.query_string());
    let found = ledger_page(&state, &ledger_query(&pairs)).await;
    if let Err(e) = &found {
        if e.status.is_server_error() {
            return parts::failed(&op, CURRENT, e);
        }
    }
    list_page(&op, &state, &pairs, found.map_err(FieldError::from))
}

/// `GET /console/ledger/export?format=csv|jsonl&<filters>`: the admin export, for the session.
pub async fn export(op: Operator, req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let pairs = parts::query_pairs(req.query_string());
    let format = parts::param(&pairs, "format");
    match export_response(&state, &ledger_query(&pairs), format.as_deref()).await {
        Ok(mut r) => {
            let name = match format.as_deref() {
                Some("csv") => "ledger.csv",
                _ => "ledger.jsonl",
            };
            if let Ok(v) =
                header::HeaderValue::from_str(&format!("attachment; filename=\"{name}\""))
            {
                r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
            }
            r
        }
        Err(e) if e.status.is_server_error() => parts::failed(&op, CURRENT, &e),
        Err(e) => list_page(&op, &state, &pairs, Err(e.into())),
    }
}

/// `GET /console/ledger/tail?after=<time>&<filters>`: the records started since a little
/// before `after`, as rows, for the page's live tail (JSON; the script skips rows it shows).
pub async fn tail(
    _op: Operator,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let pairs = parts::query_pairs(req.query_string());
    let mut q = ledger_query(&pairs);
    q.cursor = None;
    q.limit = Some(TAIL_LIMIT.into());
    if let Some(after) = parts::param(&pairs, "after") {
        let t = chrono::DateTime::parse_from_rfc3339(&after)
            .map_err(|_| ApiError::invalid_value("after", "'after' must be an RFC 3339 time"))?
            .with_timezone(&Utc);
        let from = t - Duration::minutes(TAIL_LOOKBACK_MIN);
        let since = q
            .since
            .as_deref()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|s| s.with_timezone(&Utc));
        if since.is_none_or(|s| s < from) {
            q.since = Some(from.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
        }
    }
    let (records, _) = ledger_page(&state, &q).await?;
    let rows: Vec<Row> = records.iter().map(|r| row(&state, r)).collect();
    let newest = records
        .iter()
        .map(|r| r.started_at)
        .max()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({"rows": rows, "newest": newest})))
}

fn shown(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "—".into(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// `GET /console/ledger/{request_id}`.
pub async fn one(
    op: Operator,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let rec = match ledger_record(&state, &path).await {
        Ok(r) => r,
        Err(e) if e.status.as_u16() == 404 => return parts::not_found(&op, CURRENT, &e.message),
        Err(e) => return parts::failed(&op, CURRENT, &e),
    };
    let fields = match serde_json::to_value(&rec) {
        Ok(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let scale = parts::scale(&state, rec.bucket.as_deref());
    let body = html! {
        h1 { "Request " code { (rec.request_id) } }
        p {
            "Route chain: " strong { (layout::route_chain(&rec.attempts)) }
            " · bucket that paid: " strong { (rec.bucket.as_deref().unwrap_or("—")) }
            " · cost: " strong { (parts::record_cost(&state, &rec)) }
            " · status: " strong class=(status_class(rec.status.as_str())) { (rec.status.as_str()) }
        }
        h2 { "Attempts" }
        @if rec.attempts.is_empty() { p.muted { "No upstream attempt." } }
        @else {
            table {
                thead { tr {
                    th { "#" } th { "Route" } th { "Upstream model" } th { "Bucket" } th.num { "Retry" }
                    th { "Outcome" } th.num { "HTTP status" } th { "Error" } th { "Started" } th.num { "Latency" }
                } }
                tbody {
                    @for (i, a) in rec.attempts.iter().enumerate() {
                        tr {
                            td.num { (i + 1) }
                            td { (a.route) }
                            td { (a.upstream_model) }
                            td { (a.bucket) }
                            td.num { (a.retry) }
                            td class=(if a.outcome == "ok" { "ok" } else { "bad" }) { (a.outcome) }
                            td.num { (a.http_status.map(|s| s.to_string()).unwrap_or_else(|| "—".into())) }
                            td { (a.error.as_deref().unwrap_or("—")) }
                            td { (layout::time(a.started_at)) }
                            td.num { (a.latency_ms) " ms" }
                        }
                    }
                }
            }
        }
        h2 { "Ledger fields" }
        table {
            tbody {
                @for name in FIELDS {
                    tr {
                        th { (name) }
                        td {
                            @match (*name, &rec.currency) {
                                ("cost", Some(c)) => {
                                    (layout::money(rec.cost, c, scale)) " " span.muted { "(exact: " (rec.cost) ")" }
                                }
                                ("shortfall", Some(c)) => { (layout::money(rec.shortfall, c, scale)) }
                                _ => { code { (shown(fields.get(*name))) } }
                            }
                        }
                    }
                }
            }
        }
        p { a href=(format!("{CURRENT}?{}", parts::query_string([("key_id", rec.key_id.as_str())]))) { "This key's requests" } }
    };
    layout::ok(super::page(&op, "Request", CURRENT, body))
}
