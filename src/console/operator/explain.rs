//! The spend explainer, `/console/explain`: a form with two periods (and optionally a key or a
//! project), and the admin explainer's decomposition (`ledger_queries::explain_periods`) per
//! currency: a table of the drivers and an SVG bar chart of their contributions. Each driver
//! links to the ledger filtered to the current period. Without periods the form proposes the
//! last 7 days against the 7 before.

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Duration, DurationRound, Utc};
use maud::{html, Markup};
use rust_decimal::prelude::ToPrimitive;

use super::parts::{self, FieldError};
use super::session::Operator;
use crate::api::admin::Filter;
use crate::api::ledger_queries::{explain_periods, ExplainQuery};
use crate::app::AppState;
use crate::console::layout;
use crate::ledger::explain::CurrencyChange;

const CURRENT: &str = "/console/explain";

const FIELDS: [(&str, &str); 6] = [
    ("base_since", "Base from"),
    ("base_until", "Base to"),
    ("since", "Current from"),
    ("until", "Current to"),
    ("key_id", "Key id"),
    ("project", "Project"),
];

/// The query from the page's parameters; without any period, the last 7 days against the 7
/// before (whole hours).
fn explain_query(pairs: &[(String, String)], now: DateTime<Utc>) -> ExplainQuery {
    let p = |n: &str| parts::param(pairs, n);
    let mut q = ExplainQuery {
        base_since: p("base_since"),
        base_until: p("base_until"),
        since: p("since"),
        until: p("until"),
        key_id: p("key_id"),
        project: p("project"),
    };
    let none = [&q.base_since, &q.base_until, &q.since, &q.until]
        .iter()
        .all(|v| v.is_none());
    if none {
        let end = now.duration_trunc(Duration::hours(1)).unwrap_or(now) + Duration::hours(1);
        q.until = Some(layout::time(end));
        q.since = Some(layout::time(end - Duration::days(7)));
        q.base_until = q.since.clone();
        q.base_since = Some(layout::time(end - Duration::days(14)));
    }
    q
}

/// A horizontal bar chart of the drivers' contributions around zero.
fn chart(id: &str, c: &CurrencyChange) -> Markup {
    const W: f64 = 360.0;
    const ROW: usize = 22;
    const LABEL: usize = 120;
    let values: Vec<f64> = c
        .drivers
        .iter()
        .map(|d| d.contribution.to_f64().unwrap_or(0.0))
        .collect();
    let max = values
        .iter()
        .fold(0.0_f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    let mid = LABEL as f64 + W / 2.0;
    let height = c.drivers.len() * ROW + 4;
    let width = LABEL + W as usize + 10;
    html! {
        svg id=(id) xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
            viewBox=(format!("0 0 {width} {height}")) role="img"
            aria-label=(format!("contributions to the change in {}", c.currency)) {
            line x1=(mid) y1="0" x2=(mid) y2=(height) stroke="#c4cad6" {}
            @for (i, (d, v)) in c.drivers.iter().zip(&values).enumerate() {
                @let len = v.abs() / max * (W / 2.0 - 4.0);
                @let x = if *v < 0.0 { mid - len } else { mid };
                @let y = i * ROW + 4;
                text x="0" y=(y + 13) font-size="12" { (d.driver) }
                rect x=(format!("{x:.1}")) y=(y) width=(format!("{len:.1}")) height=(ROW - 6)
                    fill=(if *v < 0.0 { "#17803d" } else { "#b42318" }) data-driver=(d.driver) data-contribution=(d.contribution) {
                    title { (d.driver) ": " (d.contribution) " " (c.currency) }
                }
            }
        }
    }
}

fn currency_view(state: &AppState, c: &CurrencyChange, ledger_link: &str) -> Markup {
    let scale = state
        .config
        .buckets
        .values()
        .filter(|b| b.currency == c.currency)
        .map(|b| b.display_scale)
        .max()
        .unwrap_or(6);
    let m = |d| layout::money(d, &c.currency, scale);
    html! {
        h2 { (c.currency) }
        p {
            "Base " strong { (m(c.base_cost)) } " → current " strong { (m(c.current_cost)) }
            " · change " strong id=(format!("change-{}", c.currency)) { (m(c.change)) }
        }
        table data-currency=(c.currency) {
            thead { tr { th { "Driver" } th.num { "Base" } th.num { "Current" } th.num { "Contribution" } th { "What it means" } th {} } }
            tbody {
                @for d in &c.drivers {
                    tr data-driver=(d.driver) {
                        td { (d.driver) }
                        td.num { (d.base) }
                        td.num { (d.current) }
                        td.num { (m(d.contribution)) }
                        td { (d.summary) }
                        td { a href=(ledger_link) { "requests" } }
                    }
                }
            }
        }
        (chart(&format!("chart-{}", c.currency), c))
    }
}

/// The ledger filtered to a period (and the key or project asked for).
fn ledger_link(f: &Filter) -> String {
    let since = f.since.map(layout::time);
    let until = f.until.map(layout::time);
    let pairs = [
        ("since", since.as_deref()),
        ("until", until.as_deref()),
        ("key_id", f.key_id.as_deref()),
        ("project", f.project.as_deref()),
    ];
    format!(
        "/console/ledger?{}",
        parts::query_string(pairs.iter().filter_map(|(k, v)| v.map(|v| (*k, v))))
    )
}

/// `GET /console/explain?base_since=&base_until=&since=&until=[&key_id=][&project=]`.
pub async fn index(op: Operator, req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let pairs = parts::query_pairs(req.query_string());
    let q = explain_query(&pairs, Utc::now());
    let found = explain_periods(&state, &q).await;
    let (explained, error) = match found {
        Ok(e) => (Some(e), None),
        Err(e) if e.status.is_server_error() => return parts::failed(&op, CURRENT, &e),
        Err(e) => (None, Some(FieldError::from(e))),
    };
    let value = |name: &str| -> Option<String> {
        match name {
            "base_since" => q.base_since.clone(),
            "base_until" => q.base_until.clone(),
            "since" => q.since.clone(),
            "until" => q.until.clone(),
            "key_id" => q.key_id.clone(),
            _ => q.project.clone(),
        }
    };
    let body = html! {
        h1 { "Spend explainer" }
        p.muted { "Why spend moved between two periods, per currency, split over drivers whose contributions add up to the change." }
        form method="get" action=(CURRENT) {
            @for (name, label) in FIELDS {
                (parts::field(label, name, value(name).as_deref(), if name.contains("since") || name.contains("until") { "RFC 3339" } else { "any" }, error.as_ref()))
            }
            button type="submit" { "Explain" }
        }
        @if let Some(e) = error.as_ref().filter(|e| e.param.as_deref().is_none_or(|p| !FIELDS.iter().any(|f| f.0 == p))) {
            p.error { (e.message) }
        }
        @if let Some(x) = &explained {
            @let link = ledger_link(&x.current);
            p { "Current period's requests: " a #current-ledger href=(link) { "in the ledger" } " · base period's: " a href=(ledger_link(&x.base)) { "in the ledger" } }
            @if x.currencies.is_empty() { p.muted { "No billed requests in either period." } }
            @for c in &x.currencies { (currency_view(&state, c, &link)) }
        }
    };
    layout::ok(super::page(&op, "Spend explainer", CURRENT, body))
}
