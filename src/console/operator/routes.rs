//! Routes: `/console/routes`, each route's live state as `/admin/routes` gives it (breaker
//! state, consecutive failures, requests, failures, latency EWMA, open until, last probe, last
//! failure), its prices, and what the ledger says it did over the last hour (attempts, failed
//! attempts, retries, fallbacks from it; `ledger::usage::RouteActivity`).

use actix_web::{web, HttpResponse};
use chrono::{Duration, Utc};
use maud::html;

use super::parts;
use super::session::Operator;
use crate::api::admin::{route_states, Filter};
use crate::api::ledger_queries::fold_records;
use crate::app::AppState;
use crate::console::layout;
use crate::ledger::usage::RouteActivity;

const CURRENT: &str = "/console/routes";

/// `GET /console/routes`.
pub async fn index(op: Operator, state: web::Data<AppState>) -> HttpResponse {
    let now = Utc::now();
    let since = now - Duration::hours(1);
    let filter = Filter {
        since: Some(since),
        ..Filter::default()
    };
    let activity =
        match fold_records(&state, filter, RouteActivity::default(), |a, r| a.add(r)).await {
            Ok(a) => a,
            Err(e) => return parts::failed(&op, CURRENT, &e),
        };
    let instant = std::time::Instant::now();
    let routes = route_states(&state);
    let body = html! {
        h1 { "Routes" }
        table {
            thead {
                tr {
                    th rowspan="2" { "Route" } th rowspan="2" { "Upstream model" } th rowspan="2" { "Bucket" }
                    th rowspan="2" { "Price in / out" }
                    th colspan="8" { "Live state" }
                    th colspan="4" { "Last hour (ledger)" }
                }
                tr {
                    th { "State" } th.num { "Consecutive failures" } th.num { "Requests" } th.num { "Failures" }
                    th.num { "Latency EWMA" } th { "Open until" } th { "Last probe" } th { "Last failure" }
                    th.num { "Attempts" } th.num { "Failed" } th.num { "Retries" } th.num { "Fallbacks from it" }
                }
            }
            tbody {
                @for (m, r, s) in &routes {
                    @let st = s.effective_state(instant).as_str();
                    @let b = state.config.buckets.get(&r.bucket);
                    @let (cur, scale, kind) = b.map_or(("", 6, ""), |b| (b.currency.as_str(), b.display_scale, b.kind.as_str()));
                    @let act = activity.routes.get(&r.id).copied().unwrap_or_default();
                    tr data-route=(r.id) {
                        td { strong { (r.id) } br; span.muted { (m.name) " via " (r.provider) " · priority " (r.priority) } }
                        td { code { (r.upstream_model) } }
                        td { (r.bucket) " " span.muted { "(" (kind) ")" } }
                        td.num {
                            (layout::per_mtok(r.input_per_mtok, cur, scale)) br; (layout::per_mtok(r.output_per_mtok, cur, scale))
                            @if r.cache_read_per_mtok != r.input_per_mtok || r.cache_write_per_mtok != r.input_per_mtok {
                                br; span.muted { "cache read " (layout::per_mtok(r.cache_read_per_mtok, cur, scale)) } br;
                                span.muted { "cache write " (layout::per_mtok(r.cache_write_per_mtok, cur, scale)) }
                            }
                        }
                        td class=(format!("state-{st}")) { (st) }
                        td.num { (s.consecutive_failures) }
                        td.num { (s.requests) }
                        td.num { (s.failures) }
                        td.num { (format!("{:.0} ms", s.latency_ewma_ms)) }
                        td { (s.open_until_at.map(layout::time).unwrap_or_else(|| "—".into())) }
                        td {
                            @match &s.last_probe {
                                None => "—",
                                Some(p) => {
                                    span class=(if p.ok { "ok" } else { "bad" }) { (if p.ok { "ok" } else { "failed" }) }
                                    " " (layout::ago(p.at, now)) ", " (p.latency_ms) " ms"
                                    @if let Some(code) = p.status { " · HTTP " (code) }
                                    @if let Some(why) = &p.reason { br; span.muted { (why) } }
                                }
                            }
                        }
                        td {
                            @match &s.last_failure {
                                None => "—",
                                Some(f) => { (f.reason) br; span.muted { (layout::ago(f.at, now)) " · " (format!("{:?}", f.source).to_lowercase()) } }
                            }
                        }
                        td.num { (act.attempts) }
                        td.num { (act.failed) }
                        td.num { (act.retries) }
                        td.num { (act.fallbacks) }
                    }
                }
            }
        }
        p.muted { "Live state since this process started; the last hour from the ledger (attempts sent or skipped)." }
    };
    layout::ok(super::page(&op, "Routes", CURRENT, body))
}
