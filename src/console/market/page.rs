//! The marketplace page: its view model, built from the catalog (the code behind `/v1/models`
//! and `/admin/catalog`), the key's wallet and the ledger's key index, and its template.

use chrono::{DateTime, Utc};
use maud::{html, Markup};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;

use crate::app::AppState;
use crate::catalog;
use crate::console::layout;
use crate::keys::ApiKey;
use crate::ledger::LedgerRecord;

/// How many of a key's own requests the key view lists.
pub const RECENT_REQUESTS: usize = 20;

/// The live cells of one route, as the page shows them and `GET /market/state` sends them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LiveCells {
    /// `closed`, `half_open` or `open`.
    pub state: String,
    pub probe: String,
    pub failure: String,
    pub success: String,
    pub p50: String,
}

pub struct RouteRow {
    pub id: String,
    pub order: String,
    pub kind: String,
    pub bucket: String,
    pub currency: String,
    pub price_in: String,
    pub price_out: String,
    pub upstream_model: String,
    pub live: LiveCells,
}

pub struct ModelRow {
    pub name: String,
    pub callable: bool,
    /// `callable`, `not callable: <why>`, or in a key's view `callable from this key` / the reason.
    pub verdict: String,
    pub routes: Vec<RouteRow>,
}

pub struct BalanceLine {
    pub bucket: String,
    pub balance: String,
    pub held: String,
}

pub struct RequestRow {
    pub id: String,
    pub at: String,
    /// The workflow run (`X-Tollgate-Task`) it belongs to, if any.
    pub task: Option<String>,
    pub model: String,
    pub chain: String,
    pub status: String,
    pub bucket: String,
    pub tokens: String,
    pub cost: String,
}

pub struct KeyView {
    pub name: String,
    pub project: String,
    pub balances: Vec<BalanceLine>,
    pub requests: Vec<RequestRow>,
}

pub struct Market {
    pub models: Vec<ModelRow>,
    pub key: Option<KeyView>,
    /// The key form's error (a wrong key).
    pub error: Option<String>,
}

/// The public view: every model, its routes and the verdict no key narrows.
pub fn public(state: &AppState) -> Vec<ModelRow> {
    state
        .config
        .models
        .iter()
        .map(|m| {
            let callable = catalog::any_route_up(state, m);
            ModelRow {
                name: m.name.clone(),
                callable,
                verdict: public_verdict(callable).to_string(),
                routes: rows(state, &catalog::route_views(state, m)),
            }
        })
        .collect()
}

pub fn public_verdict(callable: bool) -> &'static str {
    if callable {
        "callable"
    } else {
        "not callable: no route available"
    }
}

/// The view of `key`: every model with what this key may do with it, its balances and its own
/// recent requests.
pub async fn for_key(state: &AppState, key: &ApiKey) -> (Vec<ModelRow>, KeyView) {
    // One snapshot for both the verdicts and the balances, so they cannot disagree.
    let wallet = state.wallets.snapshot(key.id()).await.ok();
    let models = catalog::for_key_with(state, key, wallet.as_ref(), true)
        .into_iter()
        .map(|c| {
            let verdict = match c.reason {
                None => "callable from this key".to_string(),
                Some(code) => format!("not callable: {}", reason_words(state, key, &c.id, code)),
            };
            ModelRow {
                routes: rows(state, &c.routes),
                name: c.id,
                callable: c.available,
                verdict,
            }
        })
        .collect();
    let balances = state
        .config
        .buckets
        .values()
        .filter(|b| {
            key.may_spend(&b.name)
                || wallet
                    .as_ref()
                    .is_some_and(|w| w.balances.contains_key(&b.name))
        })
        .map(|b| {
            let get = |m: Option<&crate::ledger::store::Balances>| {
                m.and_then(|m| m.get(&b.name).copied()).unwrap_or_default()
            };
            BalanceLine {
                bucket: b.name.clone(),
                balance: layout::money(
                    get(wallet.as_ref().map(|w| &w.balances)),
                    &b.currency,
                    b.display_scale,
                ),
                held: layout::money(
                    get(wallet.as_ref().map(|w| &w.held)),
                    &b.currency,
                    b.display_scale,
                ),
            }
        })
        .collect();
    state.settle_reads().await;
    let requests = state
        .store
        .scan_records(Some(key.id()), None, None, None)
        .take(RECENT_REQUESTS)
        .filter_map(|r| r.ok())
        .map(|(_, r)| request_row(state, &r))
        .collect();
    let view = KeyView {
        name: key.record.name.clone(),
        project: key.record.project.clone(),
        balances,
        requests,
    };
    (models, view)
}

/// The catalog's reason code in the page's words.
fn reason_words(state: &AppState, key: &ApiKey, model: &str, code: &str) -> String {
    match code {
        "model_not_allowed" => "model not allowed for this key".into(),
        "bucket_not_allowed" => "bucket not allowed".into(),
        "insufficient_balance" => {
            let buckets = state
                .config
                .model(model)
                .map(|m| catalog::spendable_buckets(key, m))
                .unwrap_or_default();
            format!("no balance in {}", buckets.join(" or "))
        }
        "no_route_available" => "no route available".into(),
        other => other.replace('_', " "),
    }
}

fn request_row(state: &AppState, r: &LedgerRecord) -> RequestRow {
    let scale = layout::scale(state, r.bucket.as_deref());
    RequestRow {
        id: r.request_id.clone(),
        at: layout::time(r.started_at),
        task: r.task.clone(),
        model: r.requested_model.clone(),
        chain: layout::route_chain(&r.attempts),
        status: r.status.as_str().to_string(),
        bucket: r.bucket.clone().unwrap_or_else(|| "—".into()),
        tokens: format!("{} in / {} out", r.input_tokens, r.output_tokens),
        cost: match &r.currency {
            Some(c) => layout::money(r.cost, c, scale),
            None => "—".into(),
        },
    }
}

/// The page's rows from the catalog's route views.
fn rows(state: &AppState, views: &[Value]) -> Vec<RouteRow> {
    let now = Utc::now();
    views
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let bucket = s("bucket");
            let scale = layout::scale(state, Some(&bucket));
            let currency = s("currency");
            let price = |k: &str| {
                s(k).parse::<Decimal>()
                    .map(|p| layout::per_mtok(p, &currency, scale))
                    .unwrap_or_default()
            };
            RouteRow {
                id: s("route"),
                order: if i == 0 {
                    "primary".into()
                } else {
                    format!("backup {i}")
                },
                kind: s("kind"),
                price_in: price("input_per_mtok"),
                price_out: price("output_per_mtok"),
                upstream_model: s("upstream_model"),
                live: live_cells(v, now),
                bucket,
                currency,
            }
        })
        .collect()
}

/// One route's live cells from its catalog view.
pub fn live_cells(v: &Value, now: DateTime<Utc>) -> LiveCells {
    let at = |x: &Value| {
        x.get("at")
            .cloned()
            .and_then(|a| serde_json::from_value::<DateTime<Utc>>(a).ok())
            .map(|t| layout::ago(t, now))
            .unwrap_or_default()
    };
    let probe = match v.get("last_probe").filter(|p| p.is_object()) {
        None => "no probe yet".to_string(),
        Some(p) => {
            let ok = p.get("ok").and_then(Value::as_bool) == Some(true);
            format!("{}, {}", if ok { "ok" } else { "failed" }, at(p))
        }
    };
    let failure = match v.get("last_failure").filter(|f| f.is_object()) {
        None => "none".to_string(),
        Some(f) => format!(
            "{} ({}, {})",
            f.get("reason").and_then(Value::as_str).unwrap_or(""),
            f.get("source").and_then(Value::as_str).unwrap_or(""),
            at(f)
        ),
    };
    LiveCells {
        state: v
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or("closed")
            .to_string(),
        probe,
        failure,
        success: v
            .get("recent_success_rate")
            .and_then(Value::as_f64)
            .map(|r| format!("{:.0}%", r * 100.0))
            .unwrap_or_else(|| "—".into()),
        p50: v
            .get("recent_latency_p50_ms")
            .and_then(Value::as_u64)
            .map(|ms| format!("{ms} ms"))
            .unwrap_or_else(|| "—".into()),
    }
}

/// The whole page.
pub fn render(m: &Market) -> Markup {
    let body = html! {
        div data-market="1" data-scope=(if m.key.is_some() { "key" } else { "public" }) {
            h1 { "Models you can call" }
            @match &m.key {
                None => { (key_form(m.error.as_deref())) }
                Some(k) => { (key_header(k)) }
            }
            @for model in &m.models { (model_section(model, m.key.is_none())) }
            @if let Some(k) = &m.key { (key_details(k)) }
            p.muted {
                "Prices are per million tokens in the bucket's currency. States update twice a second while "
                "this page is open; without JavaScript, reload to refresh."
            }
        }
        script src="/assets/market.js" defer {}
    };
    layout::page("Marketplace", &[("/", "Marketplace")], "/", body)
}

fn key_form(error: Option<&str>) -> Markup {
    html! {
        form #key-form method="post" action="/key" {
            label for="key" { "See this page as your API key sees it: " }
            input #key type="password" name="key" autocomplete="off" required placeholder="tg-…";
            " "
            button type="submit" { "Use key" }
            @if let Some(e) = error { " " span.error #key-error { (e) } }
        }
    }
}

fn key_header(k: &KeyView) -> Markup {
    html! {
        p.note #key-view {
            "Viewing as key " strong #key-name { (k.name) } " · project " strong #key-project { (k.project) } " "
            form.inline method="post" action="/key/forget" {
                button #forget type="submit" { "Forget key" }
            }
        }
    }
}

fn model_section(m: &ModelRow, live_verdict: bool) -> Markup {
    html! {
        section.model data-model=(m.name) {
            h2 {
                code { (m.name) } " — "
                span.verdict class=(if m.callable { "ok" } else { "bad" })
                    data-verdict=(m.name) data-live=[live_verdict.then_some("1")] { (m.verdict) }
            }
            table {
                thead { tr {
                    th { "Order" } th { "Route" } th { "Kind" } th { "Bucket" } th { "Price in" }
                    th { "Price out" } th { "Upstream model" } th { "State" } th { "Last probe" }
                    th { "Last failure" } th.num { "Success (recent)" } th.num { "p50" }
                } }
                tbody {
                    @for r in &m.routes {
                        tr data-route-row=(r.id) {
                            td { (r.order) }
                            td { code { (r.id) } }
                            td { (r.kind) }
                            td { (r.bucket) " (" (r.currency) ")" }
                            td.num { (r.price_in) }
                            td.num { (r.price_out) }
                            td { code { (r.upstream_model) } }
                            td class=(format!("state-{}", r.live.state)) data-route=(r.id) data-field="state" { (r.live.state) }
                            td data-route=(r.id) data-field="probe" { (r.live.probe) }
                            td data-route=(r.id) data-field="failure" { (r.live.failure) }
                            td.num data-route=(r.id) data-field="success" { (r.live.success) }
                            td.num data-route=(r.id) data-field="p50" { (r.live.p50) }
                        }
                    }
                }
            }
        }
    }
}

fn key_details(k: &KeyView) -> Markup {
    html! {
        h2 { "Balances" }
        table #balances {
            thead { tr { th { "Bucket" } th.num { "Balance" } th.num { "Held by open requests" } } }
            tbody {
                @for b in &k.balances {
                    tr data-bucket=(b.bucket) { td { (b.bucket) } td.num { (b.balance) } td.num { (b.held) } }
                }
            }
        }
        h2 { "Your recent requests" }
        @if k.requests.is_empty() {
            p.muted #no-requests { "No requests from this key yet." }
        } @else {
            table #requests {
                thead { tr {
                    th { "Request" } th { "Started" } th { "Task" } th { "Model" } th { "Route chain" } th { "Status" } th { "Paid from" }
                    th { "Tokens" } th.num { "Cost" }
                } }
                tbody {
                    @for r in &k.requests {
                        tr data-request=(r.id) { td { code { (r.id) } } td { (r.at) } td.task { (r.task.as_deref().unwrap_or("—")) } td { (r.model) } td { (r.chain) } td { (r.status) }
                             td { (r.bucket) } td { (r.tokens) } td.num { (r.cost) } }
                    }
                }
            }
        }
    }
}
