//! `/console/tasks/{task}`: one workflow run (the requests a client sent with the same
//! `X-Tollgate-Task`): its requests in time order with their route chains, the keys, models and
//! routes it used, fallbacks and retries, which buckets paid, and its cost per currency (never
//! added across currencies).
//!
//! The totals are the admin usage answer for the run (`ledger_queries::usage_of`, the code behind
//! `/admin/usage?task=`), which reads the run's rollup: one entry, whatever the run's length. The
//! table reads only the records it lists, through the task index: the run's first [`ROWS`]
//! requests, and for a longer run a link to the ledger explorer filtered to it for the rest.

use std::collections::{BTreeMap, BTreeSet};

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use maud::html;
use rust_decimal::Decimal;

use super::parts;
use super::session::Operator;
use crate::api::admin::Filter;
use crate::api::ledger_queries::usage_of;
use crate::app::AppState;
use crate::console::layout;
use crate::ledger::usage::{GroupKey, UsageGroup};

/// Requests listed in the table at most.
pub const ROWS: usize = 200;

/// What the page says about a run, from its usage groups (by key, model, route and bucket).
#[derive(Debug, Default)]
struct Totals {
    requests: u64,
    fallbacks: u64,
    retries: u64,
    /// Cost per currency.
    per_currency: BTreeMap<String, Decimal>,
    /// Bucket → (currency, cost).
    per_bucket: BTreeMap<String, (String, Decimal)>,
    keys: BTreeSet<String>,
    models: BTreeSet<String>,
    routes: BTreeSet<String>,
}

impl Totals {
    fn of(groups: &[UsageGroup]) -> Totals {
        let mut t = Totals::default();
        let dim = |g: &UsageGroup, k: GroupKey| g.group.get(k.as_str()).cloned().flatten();
        for g in groups {
            t.requests += g.requests;
            t.fallbacks += g.fallbacks;
            t.retries += g.retries;
            t.keys.extend(dim(g, GroupKey::KeyId));
            t.models.extend(dim(g, GroupKey::Model));
            t.routes.extend(dim(g, GroupKey::Route));
            if let (Some(c), Some(b)) = (&g.currency, dim(g, GroupKey::Bucket)) {
                let e = t.per_currency.entry(c.clone()).or_default();
                *e = e.saturating_add(g.cost);
                let e = t
                    .per_bucket
                    .entry(b)
                    .or_insert_with(|| (c.clone(), Decimal::ZERO));
                e.1 = e.1.saturating_add(g.cost);
            }
        }
        t
    }
}

/// `GET /console/tasks/{task}`.
pub async fn page(
    op: Operator,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> HttpResponse {
    let task = path.into_inner();
    let f = Filter {
        key_id: None,
        project: None,
        task: Some(task.clone()),
        model: None,
        status: None,
        since: None,
        until: None,
    };
    let group_by = vec![
        GroupKey::KeyId,
        GroupKey::Model,
        GroupKey::Route,
        GroupKey::Bucket,
    ];
    let totals = match usage_of(&state, f, group_by).await {
        Ok(u) => Totals::of(&u.finish()),
        Err(e) => return parts::failed(&op, "", &e),
    };
    if totals.requests == 0 {
        let body = html! {
            h1 { "Task " code { (task) } }
            p.error { "No request of this task is in the ledger." }
        };
        return layout::respond(StatusCode::NOT_FOUND, super::page(&op, "Task", "", body));
    }
    let store = state.store.clone();
    let t = task.clone();
    let keys: Vec<String> = totals.keys.iter().cloned().collect();
    let read = web::block(move || {
        let ends = store.task_ends(&t, ROWS)?;
        let mut names = BTreeMap::new();
        for k in keys {
            let name = store.key(&k)?.map(|r| r.name);
            names.insert(k, name);
        }
        Ok::<_, crate::ledger::StoreError>((ends, names))
    })
    .await;
    let ((recs, last), names) = match read {
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
    let (first, last) = (
        recs.first().map(|r| r.started_at),
        last.map(|r| r.finished_at),
    );
    let joined = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(", ");
    let body = html! {
        h1 { "Task " code #task-name { (task) } }
        div.cards {
            div.card { div.muted { "Requests" } div.v #task-requests { (totals.requests) } }
            @for (currency, cost) in &totals.per_currency {
                div.card.cost data-currency=(currency) {
                    div.muted { "Cost in " (currency) }
                    div.v { (layout::money(*cost, currency, 6)) }
                }
            }
            div.card { div.muted { "Fallbacks / retries" } div.v #task-fallbacks { (totals.fallbacks) " / " (totals.retries) } }
        }
        p {
            @if let (Some(f), Some(l)) = (first, last) { "From " (layout::time(f)) " to " (layout::time(l)) ". " }
            "Keys: "
            @for (i, (id, name)) in names.iter().enumerate() {
                @if i > 0 { ", " }
                a href={ "/console/wallets/" (parts::enc(id)) } { (name.as_deref().unwrap_or(id)) }
            }
            ". Models: " (joined(&totals.models)) ". "
            "Routes: " (joined(&totals.routes)) "."
        }
        h2 { "Paid from" }
        table #task-buckets {
            thead { tr { th { "Bucket" } th.num { "Cost" } } }
            tbody {
                @for (bucket, (currency, cost)) in &totals.per_bucket {
                    tr { td { (bucket) } td.num { (layout::money(*cost, currency, layout::scale(&state, Some(bucket)))) } }
                }
            }
        }
        h2 { "Requests, in time order" }
        @if totals.requests > recs.len() as u64 {
            p.muted #task-more {
                "The first " (recs.len()) " of " (totals.requests) " requests; "
                a href=(format!("/console/ledger?task={}", parts::enc(&task))) { "all of them in the ledger explorer" }
                " (newest first)."
            }
        }
        table #task-requests-table {
            thead { tr {
                th { "Started" } th { "Request" } th { "Key" } th { "Model" } th { "Route chain" } th.num { "Retries" }
                th { "Status" } th { "Paid from" } th.num { "Tokens in / out" } th.num { "Cost" }
            } }
            tbody {
                @for r in &recs {
                    tr data-request=(r.request_id) {
                        td { (layout::time(r.started_at)) }
                        td { a href={ "/console/ledger/" (r.request_id) } { code { (r.request_id) } } }
                        td { (r.key_name) } td { (r.requested_model) }
                        td { (layout::route_chain(&r.attempts)) } td.num { (r.retries) }
                        td { (r.status.as_str()) } td { (r.bucket.as_deref().unwrap_or("—")) }
                        td.num { (r.input_tokens) " / " (r.output_tokens) }
                        td.num { (parts::record_cost(&state, r)) }
                    }
                }
            }
        }
    };
    layout::ok(super::page(&op, &format!("Task {task}"), "", body))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ledger::usage::{aggregate, tests::rec};

    /// The page's figures: costs per currency and bucket never mixed, and every key, model and
    /// route of the run.
    #[test]
    fn totals_keep_currencies_apart() {
        let mut a = rec("k1", Some(("m/p1", "credit", "USD")), 10, 5, "0.25");
        a.fallbacks = 1;
        let b = rec("k2", Some(("m/p2", "yuan", "CNY")), 10, 5, "1.5");
        let mut c = rec("k1", Some(("m/p1", "credit", "USD")), 10, 5, "0.5");
        c.retries = 2;
        let rejected = rec("k1", None, 0, 0, "0");
        let groups = aggregate(
            vec![
                GroupKey::KeyId,
                GroupKey::Model,
                GroupKey::Route,
                GroupKey::Bucket,
            ],
            [&a, &b, &c, &rejected],
        );
        let t = Totals::of(&groups);
        assert_eq!(t.requests, 4);
        assert_eq!((t.fallbacks, t.retries), (1, 2));
        assert_eq!(t.per_currency["USD"], Decimal::new(75, 2));
        assert_eq!(t.per_currency["CNY"], Decimal::new(15, 1));
        assert_eq!(t.per_currency.len(), 2);
        assert_eq!(t.per_bucket["credit"], ("USD".into(), Decimal::new(75, 2)));
        assert_eq!(t.keys.len(), 2);
        assert_eq!(
            t.routes.iter().map(String::as_str).collect::<Vec<_>>(),
            ["m/p1", "m/p2"]
        );
    }
}
