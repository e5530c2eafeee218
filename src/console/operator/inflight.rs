//! `/console/inflight`: the requests open right now — the ledger as it moves while streams run.
//! One row per open hold: key, project, task, model, route, bucket, output tokens drawn so far
//! and the cost so far (input + drawn output) next to what is held. The figures are the holds'
//! drawn slots, read through one message per wallet actor, and in a fleet the other instances'
//! open holds as they last persisted them (`api::admin::open_requests`, the same call as
//! `GET /admin/inflight`). Our script refreshes the table every second from
//! `/console/inflight.json`; without it the page shows the moment it was loaded.

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use maud::{html, Markup};
use serde_json::Value;

use super::session::Operator;
use crate::app::AppState;
use crate::console::layout;
use crate::wallet::OpenRequest;

/// One open request as the page shows it.
struct Row {
    id: String,
    /// The fleet instance serving it (empty with sled).
    instance: String,
    key: String,
    project: String,
    task: String,
    model: String,
    route: String,
    bucket: String,
    started: String,
    tokens: u64,
    cost: String,
    held: String,
}

fn rows(state: &AppState, open: &[OpenRequest]) -> Vec<Row> {
    let now = chrono::Utc::now();
    open.iter()
        .map(|r| {
            let d = &r.draft;
            let currency = d.currency.as_deref().unwrap_or("");
            let scale = layout::scale(state, d.bucket.as_deref());
            Row {
                id: d.request_id.clone(),
                instance: d.instance_id.clone().unwrap_or_default(),
                key: d.key_name.clone(),
                project: d.project.clone(),
                task: d.task.clone().unwrap_or_else(|| "—".into()),
                model: d.requested_model.clone(),
                route: d.route.clone().unwrap_or_default(),
                bucket: d.bucket.clone().unwrap_or_default(),
                started: layout::ago(d.started_at, now),
                tokens: r.output_tokens,
                cost: layout::money(r.drawn, currency, scale),
                held: layout::money(r.held, currency, scale),
            }
        })
        .collect()
}

/// The table; `fleet` adds the instance serving each request.
fn table(rows: &[Row], fleet: bool) -> Markup {
    html! {
        table #inflight data-fleet=[fleet.then_some("1")] {
            thead { tr {
                th { "Request" } @if fleet { th { "Instance" } } th { "Key" } th { "Project" } th { "Task" } th { "Model" } th { "Route" }
                th { "Bucket" } th { "Started" } th.num { "Output tokens so far" } th.num { "Cost so far" } th.num { "Held" }
            } }
            tbody {
                @for r in rows {
                    tr data-request=(r.id) {
                        td { a href={ "/console/ledger/" (r.id) } { code { (r.id) } } }
                        @if fleet { td { (r.instance) } }
                        td { (r.key) } td { (r.project) } td { (r.task) } td { (r.model) } td { (r.route) }
                        td { (r.bucket) } td { (r.started) } td.num.tokens { (r.tokens) } td.num.cost { (r.cost) }
                        td.num { (r.held) }
                    }
                }
            }
        }
        @if rows.is_empty() { p.muted #none-open { "No request is open right now." } }
    }
}

async fn open_requests(state: &AppState) -> Result<Vec<OpenRequest>, String> {
    crate::api::admin::open_requests(state, None)
        .await
        .map_err(|e| e.to_string())
}

fn intro(state: &AppState) -> &'static str {
    if state.instance_id.is_some() {
        "Requests open right now on every instance of the fleet (another instance's figures are at most one flush interval old); refreshed every second while this page is open."
    } else {
        "Requests open right now; refreshed every second while this page is open."
    }
}

/// `GET /console/inflight`.
pub async fn page(op: Operator, state: web::Data<AppState>) -> HttpResponse {
    let body = match open_requests(&state).await {
        Ok(open) => html! {
            h1 { "In flight" }
            p.muted { (intro(&state)) }
            div #inflight-table { (table(&rows(&state, &open), state.instance_id.is_some())) }
            script src=(super::SCRIPT_PATH) {}
        },
        Err(e) => html! { h1 { "In flight" } p.error { "The wallets did not answer: " (e) } },
    };
    layout::ok(super::page(&op, "In flight", "/console/inflight", body))
}

/// `GET /console/inflight.json`: the table's rows for the script (session-guarded).
pub async fn rows_json(_op: Operator, state: web::Data<AppState>) -> HttpResponse {
    match open_requests(&state).await {
        Ok(open) => {
            let rows: Vec<Value> = rows(&state, &open)
                .into_iter()
                .map(|r| {
                    serde_json::json!({
                        "id": r.id, "instance": r.instance, "key": r.key, "project": r.project, "task": r.task,
                        "model": r.model, "route": r.route, "bucket": r.bucket,
                        "started": r.started, "tokens": r.tokens, "cost": r.cost, "held": r.held,
                    })
                })
                .collect();
            HttpResponse::Ok()
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .json(serde_json::json!({ "rows": rows }))
        }
        Err(e) => HttpResponse::ServiceUnavailable().json(serde_json::json!({ "error": e })),
    }
}
