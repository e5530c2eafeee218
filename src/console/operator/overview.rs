//! The overview, `/console`: over the last hour and the last day, requests, spend per currency
//! (one line per currency, never summed across currencies; a record without a bucket cost
//! nothing), fallback and retry rates, cut-offs by ending, and the routes' breaker states
//! (`route_states`, as `/admin/routes`), with bar charts of requests drawn as inline SVG on the
//! server (12 five-minute bars for the hour, 24 one-hour bars for the day). The hour is read
//! record by record; the day takes its whole UTC hours from the ledger's hourly rollups
//! (`ledger_queries::fold_span`), so its bars are UTC hours, the first one starting 24 h ago.

use std::collections::BTreeMap;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Duration, Utc};
use maud::{html, Markup};

use super::parts;
use super::session::Operator;
use crate::api::admin::{route_states, Filter};
use crate::api::ledger_queries::{fold_records, fold_span};
use crate::app::AppState;
use crate::console::layout;
use crate::ledger::rollup::{hour_start, Sums};
use crate::ledger::{LedgerRecord, Status};
use rust_decimal::Decimal;

const CURRENT: &str = "/console";

/// The endings counted as cut-offs.
const CUTOFFS: [Status; 4] = [
    Status::BalanceExhausted,
    Status::ClientDisconnected,
    Status::UpstreamError,
    Status::Interrupted,
];

/// One window's figures: from `since` to now, in `bins` bars of `bin` each.
struct Window {
    name: &'static str,
    label: &'static str,
    since: DateTime<Utc>,
    bin: Duration,
    requests: u64,
    with_fallback: u64,
    with_retry: u64,
    cutoffs: BTreeMap<&'static str, u64>,
    /// Spend per currency.
    spend: BTreeMap<String, Decimal>,
    bars: Vec<u64>,
}

impl Window {
    fn new(
        name: &'static str,
        label: &'static str,
        now: DateTime<Utc>,
        bin: Duration,
        bins: i32,
    ) -> Window {
        Window {
            name,
            label,
            since: now - bin * bins,
            bin,
            requests: 0,
            with_fallback: 0,
            with_retry: 0,
            cutoffs: CUTOFFS.iter().map(|s| (s.as_str(), 0)).collect(),
            spend: BTreeMap::new(),
            bars: vec![0; usize::try_from(bins).unwrap_or(0)],
        }
    }

    fn add(&mut self, r: &LedgerRecord) {
        if r.started_at < self.since {
            return;
        }
        self.count(
            r.started_at,
            r.status.as_str(),
            r.fallbacks > 0,
            r.retries > 0,
            1,
        );
        if let (Some(_), Some(c)) = (&r.bucket, &r.currency) {
            self.spend_in(c, r.cost);
        }
    }

    /// A rollup's sums of a whole hour (`hour` since the epoch) within the window.
    fn add_sums(&mut self, hour: u64, sums: Sums<'_>) {
        let Some(start) = hour_start(hour).map(|t| t.max(self.since)) else {
            return;
        };
        match sums {
            Sums::Tally(t, n) => self.count(start, &t.status, t.fell_back, t.retried, n),
            Sums::Cell(c, s) => {
                if let Some(currency) = &c.currency {
                    self.spend_in(currency, s.cost);
                }
            }
        }
    }

    fn spend_in(&mut self, currency: &str, cost: Decimal) {
        let e = match self.spend.get_mut(currency) {
            Some(e) => e,
            None => self.spend.entry(currency.to_string()).or_default(),
        };
        *e = e.saturating_add(cost);
    }

    /// `n` requests started at `at` (their bar's time).
    fn count(&mut self, at: DateTime<Utc>, status: &str, fell_back: bool, retried: bool, n: u64) {
        self.requests += n;
        self.with_fallback += if fell_back { n } else { 0 };
        self.with_retry += if retried { n } else { 0 };
        if let Some(c) = self.cutoffs.get_mut(status) {
            *c += n;
        }
        let bin_ms = self.bin.num_milliseconds().max(1);
        let i = (at - self.since).num_milliseconds() / bin_ms;
        if let Some(b) = usize::try_from(i).ok().and_then(|i| self.bars.get_mut(i)) {
            *b += n;
        }
    }
}

fn rate(n: u64, of: u64) -> String {
    if of == 0 {
        "—".into()
    } else {
        format!("{:.1}%", n as f64 * 100.0 / of as f64)
    }
}

/// A bar chart of `bars` as inline SVG, oldest on the left; each bar's title gives its count.
fn bar_chart(id: &str, bars: &[u64], bin_label: &str) -> Markup {
    const W: usize = 18;
    const H: u64 = 60;
    let max = bars.iter().copied().max().unwrap_or(0).max(1);
    let width = bars.len() * W;
    html! {
        svg id=(id) xmlns="http://www.w3.org/2000/svg" width=(width) height=(H + 2)
            viewBox=(format!("0 0 {width} {}", H + 2)) role="img"
            aria-label=(format!("requests per {bin_label}")) {
            line x1="0" y1=(H + 1) x2=(width) y2=(H + 1) stroke="#c4cad6" {}
            @for (i, n) in bars.iter().enumerate() {
                @let h = n * H / max;
                rect x=(i * W + 2) y=(H + 1 - h) width=(W - 4) height=(h) fill="#3b6fd8" data-count=(n) {
                    title { (n) " requests" }
                }
            }
        }
    }
}

fn window_view(state: &AppState, w: Window, bars_label: &str) -> Markup {
    let scale = |cur: &str| {
        state
            .config
            .buckets
            .values()
            .filter(|b| b.currency == cur)
            .map(|b| b.display_scale)
            .max()
            .unwrap_or(6)
    };
    let n = w.name;
    html! {
        h2 { (w.label) }
        div.cards {
            div.card { div.muted { "Requests" } div.v id=(format!("{n}-requests")) { (w.requests) } }
            div.card {
                div.muted { "Spend" }
                @if w.spend.is_empty() { div.v { "—" } }
                @for (cur, cost) in &w.spend {
                    div.v id=(format!("{n}-spend-{cur}")) { (layout::money(*cost, cur, scale(cur))) }
                }
            }
            div.card { div.muted { "Fallback rate" } div.v id=(format!("{n}-fallback-rate")) { (rate(w.with_fallback, w.requests)) } }
            div.card { div.muted { "Retry rate" } div.v id=(format!("{n}-retry-rate")) { (rate(w.with_retry, w.requests)) } }
            div.card {
                div.muted { "Cut-offs" }
                @for (status, count) in &w.cutoffs {
                    div { (status) ": " strong id=(format!("{n}-cutoff-{status}")) { (count) } }
                }
            }
        }
        p { "Requests per " (bars_label) ":" }
        (bar_chart(&format!("{n}-chart"), &w.bars, bars_label))
    }
}

/// `GET /console`.
pub async fn index(op: Operator, state: web::Data<AppState>) -> HttpResponse {
    let now = Utc::now();
    let hour = Window::new("hour", "Last hour", now, Duration::minutes(5), 12);
    let day = Window::new("day", "Last day", now, Duration::hours(1), 24);
    let since = |t| Filter {
        since: Some(t),
        ..Filter::default()
    };
    let hour = fold_records(&state, since(hour.since), hour, |h, r| h.add(r));
    let day = fold_span(
        &state,
        since(day.since),
        day,
        |d, r| d.add(r),
        |d, h, sums| d.add_sums(h, sums),
    );
    let (hour, day) = match (hour.await, day.await) {
        (Ok(h), Ok(d)) => (h, d),
        (Err(e), _) | (_, Err(e)) => return parts::failed(&op, CURRENT, &e),
    };
    let instant = std::time::Instant::now();
    let mut breakers: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for (_, r, s) in route_states(&state) {
        breakers
            .entry(s.effective_state(instant).as_str())
            .or_default()
            .push(r.id.clone());
    }
    let body = html! {
        h1 { "Overview" }
        h2 { "Breakers" }
        div.cards {
            @for (st, routes) in &breakers {
                div.card {
                    div class=(format!("state-{st}")) { (st) }
                    div.v id=(format!("breakers-{st}")) { (routes.len()) }
                    div.muted { (routes.join(", ")) }
                }
            }
        }
        (window_view(&state, hour, "5 minutes"))
        (window_view(&state, day, "hour"))
        p.muted { "From the ledger, by the time each request started; " a href="/console/routes" { "routes" } " for each route's detail." }
    };
    layout::ok(super::page(&op, "Overview", CURRENT, body))
}
