//! Wallets: `/console/wallets` (every key's balance, held and available per bucket, each in its
//! own currency, never summed) and `/console/wallets/{key_id}` (per bucket: balance, held, the
//! top-ups with their references, spend per day over the last 14 days, the burn rate over the
//! last 24 h and the day the balance runs out at that rate). Balances come from the admin API's
//! `wallet_view`; spend from the ledger's hourly rollups (`ledger_queries::fold_span`, which the
//! spend explainer uses too), with the records of a partial hour read one by one.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use chrono::{Duration, NaiveDate, Utc};
use maud::html;
use rust_decimal::Decimal;
use serde_json::Value;

use super::parts;
use super::session::Operator;
use crate::api::admin::{wallet_view, Filter};
use crate::api::ledger_queries::fold_span;
use crate::app::AppState;
use crate::console::layout;
use crate::ledger::rollup::{hour_start, Sums};

const CURRENT: &str = "/console/wallets";
/// Days of spend shown per wallet.
const SPEND_DAYS: i64 = 14;

/// One bucket of a wallet, as `wallet_view` gives it.
pub struct BucketLine {
    pub bucket: String,
    pub currency: String,
    pub balance: Decimal,
    pub held: Decimal,
    pub available: Decimal,
}

fn dec(v: &Value) -> Decimal {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_default()
}

/// The buckets of a `wallet_view` answer.
pub fn bucket_lines(view: &Value) -> Vec<BucketLine> {
    view["buckets"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(name, b)| BucketLine {
                    bucket: name.clone(),
                    currency: b["currency"].as_str().unwrap_or_default().to_string(),
                    balance: dec(&b["balance"]),
                    held: dec(&b["held"]),
                    available: dec(&b["available"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `GET /console/wallets`.
pub async fn index(op: Operator, state: web::Data<AppState>) -> HttpResponse {
    let mut rows = Vec::new();
    for k in state.keys.list() {
        let lines = match wallet_view(&state, &k.id).await {
            Ok(v) => Ok(bucket_lines(&v)),
            Err(e) => Err(e.message),
        };
        rows.push((k, lines));
    }
    let m = |s: &AppState, b: &str, a: Decimal| parts::bucket_money(s, b, a);
    let body = html! {
        h1 { "Wallets" }
        p.muted { "Each bucket in its own currency; amounts in different currencies are never added." }
        table {
            thead { tr {
                th { "Key" } th { "Project" } th { "Bucket" } th { "Currency" }
                th.num { "Balance" } th.num { "Held" } th.num { "Available" }
            } }
            tbody {
                @for (k, lines) in &rows {
                    @match lines {
                        Err(e) => tr { td { (k.name) } td { (k.project) } td.error colspan="5" { (e) } },
                        Ok(lines) => {
                            @for (i, b) in lines.iter().enumerate() {
                                tr {
                                    @if i == 0 {
                                        td rowspan=(lines.len()) {
                                            a href=(format!("{CURRENT}/{}", parts::enc(&k.id))) { (k.name) }
                                            @if k.revoked_at.is_some() { " " span.muted { "(revoked)" } }
                                            br; code.muted { (k.id) }
                                        }
                                        td rowspan=(lines.len()) { (k.project) }
                                    }
                                    td { (b.bucket) }
                                    td { (b.currency) }
                                    td.num { (m(&state, &b.bucket, b.balance)) }
                                    td.num { (m(&state, &b.bucket, b.held)) }
                                    td.num { (m(&state, &b.bucket, b.available)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    layout::ok(super::page(&op, "Wallets", CURRENT, body))
}

/// `GET /console/wallets/{key_id}`.
pub async fn one(
    op: Operator,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    key_page(&state, &op, &path, None).await
}

/// A key's wallet page, with `notice` (what a top-up did) at the top.
pub async fn key_page(
    state: &web::Data<AppState>,
    op: &Operator,
    key_id: &str,
    notice: Option<String>,
) -> HttpResponse {
    let Some(key) = state.keys.get(key_id) else {
        return parts::not_found(op, CURRENT, &format!("no key with id '{key_id}'"));
    };
    let view = match wallet_view(state, key_id).await {
        Ok(v) => v,
        Err(e) => return parts::failed(op, CURRENT, &e),
    };
    let lines = bucket_lines(&view);
    let topups = match state.store.key_topups(key_id) {
        Ok(t) => t,
        Err(e) => {
            return parts::failed(
                op,
                CURRENT,
                &crate::api::error::ApiError::internal(e.to_string()),
            )
        }
    };
    let now = Utc::now();
    let first_day = (now - Duration::days(SPEND_DAYS - 1)).date_naive();
    let since = first_day.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    let day_ago = now - Duration::hours(24);
    let filter = |since| Filter {
        key_id: Some(key_id.to_string()),
        since,
        ..Filter::default()
    };
    // Spend per (day, bucket) and, over the last 24 h, per bucket; whole hours come from the
    // ledger's hourly rollups. A record without a bucket (or currency) cost nothing.
    let per_day = fold_span(
        state,
        filter(since),
        BTreeMap::new(),
        |m: &mut BTreeMap<(NaiveDate, String), Decimal>, r| {
            if let (Some(b), Some(_)) = (&r.bucket, &r.currency) {
                *m.entry((r.started_at.date_naive(), b.clone())).or_default() += r.cost;
            }
        },
        |m, hour, sums| {
            if let (Sums::Cell(cell, sums), Some(day)) = (sums, hour_start(hour)) {
                if cell.currency.is_some() {
                    *m.entry((day.date_naive(), cell.bucket.clone()))
                        .or_default() += sums.cost;
                }
            }
        },
    );
    let burn = fold_span(
        state,
        filter(Some(day_ago)),
        BTreeMap::new(),
        |m: &mut BTreeMap<String, Decimal>, r| {
            if let (Some(b), Some(_)) = (&r.bucket, &r.currency) {
                *m.entry(b.clone()).or_default() += r.cost;
            }
        },
        |m, _, sums| {
            if let Sums::Cell(cell, sums) = sums {
                if cell.currency.is_some() {
                    *m.entry(cell.bucket.clone()).or_default() += sums.cost;
                }
            }
        },
    );
    let (per_day, burn) = match (per_day.await, burn.await) {
        (Ok(d), Ok(b)) => (d, b),
        (Err(e), _) | (_, Err(e)) => return parts::failed(op, CURRENT, &e),
    };
    let days: Vec<NaiveDate> = (0..SPEND_DAYS)
        .map(|i| first_day + Duration::days(i))
        .collect();
    let m = |b: &str, a: Decimal| parts::bucket_money(state, b, a);
    let body = html! {
        h1 { "Wallet of " (key.record.name) " " code.muted { (key.record.id) } }
        @if let Some(n) = &notice { p.note { (n) } }
        p { "Project " (key.record.project) " · " a href=(format!("/console/ledger?key_id={}", parts::enc(key_id))) { "its requests" } " · " a href="/console/keys" { "top up or edit on the keys page" } }
        h2 { "Balances" }
        table {
            thead { tr {
                th { "Bucket" } th { "Currency" } th.num { "Balance" } th.num { "Held" } th.num { "Available" }
                th.num { "Burn rate (last 24 h)" } th { "Runs out" }
            } }
            tbody {
                @for b in &lines {
                    @let rate = burn.get(&b.bucket).copied().unwrap_or_default();
                    tr {
                        td { (b.bucket) }
                        td { (b.currency) }
                        td.num #{ "balance-" (b.bucket) } { (m(&b.bucket, b.balance)) }
                        td.num { (m(&b.bucket, b.held)) }
                        td.num { (m(&b.bucket, b.available)) }
                        td.num { (m(&b.bucket, rate)) " / day" }
                        td { (runs_out(b.available, rate, now)) }
                    }
                }
            }
        }
        h2 { "Spend per day (last " (SPEND_DAYS) " days, UTC)" }
        table {
            thead { tr { th { "Day" } @for b in &lines { th.num { (b.bucket) " (" (b.currency) ")" } } } }
            tbody {
                @for d in days.iter().rev() {
                    tr {
                        td { (d.to_string()) }
                        @for b in &lines {
                            td.num { (m(&b.bucket, per_day.get(&(*d, b.bucket.clone())).copied().unwrap_or_default())) }
                        }
                    }
                }
            }
        }
        h2 { "Top-ups" }
        @if topups.is_empty() { p.muted { "None." } }
        @else {
            table {
                thead { tr { th { "When" } th { "Bucket" } th.num { "Amount" } th { "Reference" } } }
                tbody {
                    @for t in topups.iter().rev() {
                        tr {
                            td { (layout::time(t.at)) }
                            td { (t.bucket) }
                            td.num { (m(&t.bucket, t.amount)) }
                            td { (t.reference.as_deref().unwrap_or("—")) }
                        }
                    }
                }
            }
        }
    };
    layout::respond(StatusCode::OK, super::page(op, "Wallet", CURRENT, body))
}

/// The day the available balance runs out at `per_day`, in words.
fn runs_out(available: Decimal, per_day: Decimal, now: chrono::DateTime<Utc>) -> String {
    if per_day <= Decimal::ZERO {
        return "no spend in the last 24 h".into();
    }
    if available <= Decimal::ZERO {
        return "now (nothing available)".into();
    }
    let secs = (available / per_day * Decimal::from(86_400))
        .round()
        .to_string()
        .parse::<i64>()
        .unwrap_or(i64::MAX);
    match now.checked_add_signed(Duration::seconds(secs.min(100 * 365 * 86_400))) {
        Some(t) if secs < 100 * 365 * 86_400 => t.date_naive().to_string(),
        _ => "not within 100 years".into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_run_out_day_follows_the_burn_rate() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert_eq!(runs_out(d("10"), d("2"), now), "2026-01-06");
        assert_eq!(runs_out(d("10"), d("0"), now), "no spend in the last 24 h");
        assert_eq!(runs_out(d("0"), d("1"), now), "now (nothing available)");
        assert_eq!(
            runs_out(d("1000000"), d("0.000001"), now),
            "not within 100 years"
        );
    }
}
