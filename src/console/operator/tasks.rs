//! `/console/tasks/{task}`: one workflow run (the requests a client sent with the same
//! `X-Tollgate-Task`): its requests in time order with their route chains, the models and routes
//! it used, fallbacks and retries, which buckets paid, and its cost per currency (never added
//! across currencies). Read through the ledger's task index (`Store::task_records`), so the page
//! costs what the run has, not what the ledger holds. The totals cover every request of the run;
//! the table lists its first [`ROWS`] requests, and a longer run links to the ledger explorer
//! filtered to it for the rest.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use maud::html;
use rust_decimal::Decimal;

use super::session::Operator;
use crate::app::AppState;
use crate::console::layout;
use crate::ledger::LedgerRecord;

/// Requests listed in the table at most.
pub const ROWS: usize = 500;

/// What a run spent: cost per currency, and per bucket (bucket → (currency, cost)).
fn totals(
    recs: &[LedgerRecord],
) -> (
    BTreeMap<String, Decimal>,
    BTreeMap<String, (String, Decimal)>,
) {
    let mut per_currency: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut per_bucket: BTreeMap<String, (String, Decimal)> = BTreeMap::new();
    for r in recs {
        if let (Some(c), Some(b)) = (&r.currency, &r.bucket) {
            let e = per_currency.entry(c.clone()).or_default();
            *e = e.checked_add(r.cost).unwrap_or(*e);
            let e = per_bucket
                .entry(b.clone())
                .or_insert_with(|| (c.clone(), Decimal::ZERO));
            e.1 = e.1.checked_add(r.cost).unwrap_or(e.1);
        }
    }
    (per_currency, per_bucket)
}

/// `GET /console/tasks/{task}`.
pub async fn page(
    op: Operator,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> HttpResponse {
    let task = path.into_inner();
    let store = state.store.clone();
    let t = task.clone();
    let recs = web::block(move || store.task_records(&t, None, None, None)).await;
    let recs = match recs {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let body = html! { h1 { "Task" } p.error { "The ledger could not be read: " (e.to_string()) } };
            return layout::respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                super::page(&op, "Task", "", body),
            );
        }
        Err(e) => {
            let body = html! { h1 { "Task" } p.error { (e.to_string()) } };
            return layout::respond(
                StatusCode::SERVICE_UNAVAILABLE,
                super::page(&op, "Task", "", body),
            );
        }
    };
    if recs.is_empty() {
        let body = html! {
            h1 { "Task " code { (task) } }
            p.error { "No request of this task is in the ledger." }
        };
        return layout::respond(StatusCode::NOT_FOUND, super::page(&op, "Task", "", body));
    }
    let (per_currency, per_bucket) = totals(&recs);
    let models: std::collections::BTreeSet<&str> =
        recs.iter().map(|r| r.requested_model.as_str()).collect();
    let routes: std::collections::BTreeSet<&str> =
        recs.iter().filter_map(|r| r.route.as_deref()).collect();
    let keys: std::collections::BTreeSet<&str> = recs.iter().map(|r| r.key_name.as_str()).collect();
    let fallbacks: u64 = recs.iter().map(|r| u64::from(r.fallbacks)).sum();
    let retries: u64 = recs.iter().map(|r| u64::from(r.retries)).sum();
    let (first, last) = (
        recs.first().map(|r| r.started_at),
        recs.last().map(|r| r.finished_at),
    );
    let body = html! {
        h1 { "Task " code #task-name { (task) } }
        div.cards {
            div.card { div.muted { "Requests" } div.v #task-requests { (recs.len()) } }
            @for (currency, cost) in &per_currency {
                div.card.cost data-currency=(currency) {
                    div.muted { "Cost in " (currency) }
                    div.v { (layout::money(*cost, currency, 6)) }
                }
            }
            div.card { div.muted { "Fallbacks / retries" } div.v { (fallbacks) " / " (retries) } }
        }
        p {
            @if let (Some(f), Some(l)) = (first, last) { "From " (layout::time(f)) " to " (layout::time(l)) ". " }
            "Keys: " (keys.iter().copied().collect::<Vec<_>>().join(", ")) ". "
            "Models: " (models.iter().copied().collect::<Vec<_>>().join(", ")) ". "
            "Routes: " (routes.iter().copied().collect::<Vec<_>>().join(", ")) "."
        }
        h2 { "Paid from" }
        table #task-buckets {
            thead { tr { th { "Bucket" } th.num { "Cost" } } }
            tbody {
                @for (bucket, (currency, cost)) in &per_bucket {
                    tr { td { (bucket) } td.num { (layout::money(*cost, currency, layout::scale(&state, Some(bucket)))) } }
                }
            }
        }
        h2 { "Requests, in time order" }
        @if recs.len() > ROWS {
            p.muted #task-more {
                "The first " (ROWS) " of " (recs.len()) " requests; "
                a href=(format!("/console/ledger?task={}", super::parts::enc(&task))) { "all of them in the ledger explorer" }
                " (newest first)."
            }
        }
        table #task-requests-table {
            thead { tr {
                th { "Started" } th { "Request" } th { "Key" } th { "Model" } th { "Route chain" } th.num { "Retries" }
                th { "Status" } th { "Paid from" } th.num { "Tokens in / out" } th.num { "Cost" }
            } }
            tbody {
                @for r in recs.iter().take(ROWS) {
                    tr data-request=(r.request_id) {
                        td { (layout::time(r.started_at)) }
                        td { a href={ "/console/ledger/" (r.request_id) } { code { (r.request_id) } } }
                        td { (r.key_name) } td { (r.requested_model) }
                        td { (layout::route_chain(&r.attempts)) } td.num { (r.retries) }
                        td { (r.status.as_str()) } td { (r.bucket.as_deref().unwrap_or("—")) }
                        td.num { (r.input_tokens) " / " (r.output_tokens) }
                        td.num { @match &r.currency {
                            Some(c) => (layout::money(r.cost, c, layout::scale(&state, r.bucket.as_deref()))),
                            None => "—",
                        } }
                    }
                }
            }
        }
    };
    layout::ok(super::page(&op, &format!("Task {task}"), "", body))
}
