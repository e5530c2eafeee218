//! The run's report: JSON (everything), Markdown (the tables a reader wants), and a hand-written
//! SVG chart of latency percentiles and throughput over time, per target.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::dbstat::DbCost;
use crate::runner::{Cost, PhaseRun};
use crate::scenario::{Mode, Scenario};
use crate::stats::{timeline_points, Point, Summary};
use crate::verify::VerifyReport;

/// Below this many open requests the Markdown report gives no RSS figure per open request.
const MIN_OPEN_FOR_RSS_PER_OPEN: u64 = 100;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub scenario: Scenario,
    pub started_at: String,
    pub base_url: String,
    pub direct_url: Option<String>,
    /// The reference proxy in front of the mock (`--proxy-url`), run side by side.
    pub proxy_url: Option<String>,
    /// `/proc/loadavg` before and after, and the core count: the load conditions.
    pub conditions: String,
    pub phases: Vec<PhaseReport>,
    pub verify: Option<VerifyReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    pub name: String,
    pub mode: Mode,
    pub concurrency: u32,
    pub rate: f64,
    pub direct: Option<Summary>,
    pub gateway: Summary,
    pub overhead: Option<Overhead>,
    pub gateway_cost: Option<Cost>,
    /// The reference proxy's figures, its overhead over direct and its process cost.
    pub proxy: Option<Summary>,
    pub proxy_overhead: Option<Overhead>,
    pub proxy_cost: Option<Cost>,
    /// Gateway ÷ proxy, measured in the same run.
    pub versus_proxy: Option<VersusProxy>,
    pub mock_tokens: Option<u64>,
    /// A fleet's database transactions at steady state (`--pg-url`).
    pub db: Option<DbCost>,
    /// Per target (`direct`, `gateway`): one point per second with completions.
    pub timeline: BTreeMap<String, Vec<Point>>,
}

/// What the gateway adds over the direct mock, in one run (gateway − direct).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Overhead {
    pub added_ttft_p50_us: i64,
    pub added_ttft_p99_us: i64,
    pub added_gap_p50_us: i64,
    pub added_gap_p99_us: i64,
    pub added_e2e_p50_us: i64,
    pub added_e2e_p99_us: i64,
    /// Gateway ÷ direct, in tokens/s for streams (requests/s when no tokens flowed).
    pub throughput_ratio: f64,
}

/// The gateway beside the reference proxy, both measured in the same run: process cost ratios
/// (gateway ÷ proxy; 0 when the proxy's figure is 0) and what each adds over the direct mock.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct VersusProxy {
    pub cpu_per_request_ratio: f64,
    /// Per token, which for the mock is per chunk (one token per content event).
    pub cpu_per_token_ratio: f64,
    pub peak_rss_ratio: f64,
    pub proxy_added_ttft_p50_us: i64,
    pub proxy_added_ttft_p99_us: i64,
    pub gateway_added_ttft_p50_us: i64,
    pub gateway_added_ttft_p99_us: i64,
    pub proxy_added_e2e_p50_us: i64,
    pub proxy_added_e2e_p99_us: i64,
    pub gateway_added_e2e_p50_us: i64,
    pub gateway_added_e2e_p99_us: i64,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Gateway ÷ proxy from the two processes' costs and overheads (either may be missing).
pub fn versus_proxy(
    gateway_cost: Option<&Cost>,
    proxy_cost: Option<&Cost>,
    gateway_overhead: Option<&Overhead>,
    proxy_overhead: Option<&Overhead>,
) -> VersusProxy {
    let (g, p) = match (gateway_cost, proxy_cost) {
        (Some(g), Some(p)) => (g.clone(), p.clone()),
        _ => (Cost::default(), Cost::default()),
    };
    let zero = Overhead {
        added_ttft_p50_us: 0,
        added_ttft_p99_us: 0,
        added_gap_p50_us: 0,
        added_gap_p99_us: 0,
        added_e2e_p50_us: 0,
        added_e2e_p99_us: 0,
        throughput_ratio: 0.0,
    };
    let go = gateway_overhead.unwrap_or(&zero);
    let po = proxy_overhead.unwrap_or(&zero);
    VersusProxy {
        cpu_per_request_ratio: ratio(g.cpu_us_per_request, p.cpu_us_per_request),
        cpu_per_token_ratio: ratio(g.cpu_us_per_token, p.cpu_us_per_token),
        peak_rss_ratio: ratio(g.peak_rss_kib as f64, p.peak_rss_kib as f64),
        proxy_added_ttft_p50_us: po.added_ttft_p50_us,
        proxy_added_ttft_p99_us: po.added_ttft_p99_us,
        gateway_added_ttft_p50_us: go.added_ttft_p50_us,
        gateway_added_ttft_p99_us: go.added_ttft_p99_us,
        proxy_added_e2e_p50_us: po.added_e2e_p50_us,
        proxy_added_e2e_p99_us: po.added_e2e_p99_us,
        gateway_added_e2e_p50_us: go.added_e2e_p50_us,
        gateway_added_e2e_p99_us: go.added_e2e_p99_us,
    }
}

fn diff(a: u64, b: u64) -> i64 {
    i64::try_from(a).unwrap_or(i64::MAX) - i64::try_from(b).unwrap_or(i64::MAX)
}

pub fn overhead(gateway: &Summary, direct: &Summary) -> Overhead {
    let ratio = if direct.tokens_per_s > 0.0 {
        gateway.tokens_per_s / direct.tokens_per_s
    } else if direct.requests_per_s > 0.0 {
        gateway.requests_per_s / direct.requests_per_s
    } else {
        0.0
    };
    Overhead {
        added_ttft_p50_us: diff(gateway.ttft_us.p50, direct.ttft_us.p50),
        added_ttft_p99_us: diff(gateway.ttft_us.p99, direct.ttft_us.p99),
        added_gap_p50_us: diff(gateway.gap_us.p50, direct.gap_us.p50),
        added_gap_p99_us: diff(gateway.gap_us.p99, direct.gap_us.p99),
        added_e2e_p50_us: diff(gateway.e2e_us.p50, direct.e2e_us.p50),
        added_e2e_p99_us: diff(gateway.e2e_us.p99, direct.e2e_us.p99),
        throughput_ratio: ratio,
    }
}

pub fn phase_report(run: &PhaseRun) -> PhaseReport {
    let gateway = run.gateway.summary();
    let direct = run.direct.as_ref().map(|d| d.summary());
    let proxy = run.proxy.as_ref().map(|p| p.summary());
    let mut timeline = BTreeMap::new();
    timeline.insert("gateway".to_string(), timeline_points(&run.gateway));
    if let Some(d) = &run.direct {
        timeline.insert("direct".to_string(), timeline_points(d));
    }
    if let Some(p) = &run.proxy {
        timeline.insert("proxy".to_string(), timeline_points(p));
    }
    let gateway_overhead = direct.as_ref().map(|d| overhead(&gateway, d));
    let proxy_overhead = match (&proxy, &direct) {
        (Some(p), Some(d)) => Some(overhead(p, d)),
        _ => None,
    };
    let versus = proxy.as_ref().map(|_| {
        versus_proxy(
            run.cost.as_ref(),
            run.proxy_cost.as_ref(),
            gateway_overhead.as_ref(),
            proxy_overhead.as_ref(),
        )
    });
    PhaseReport {
        name: run.phase.name.clone(),
        mode: run.phase.mode,
        concurrency: run.phase.concurrency,
        rate: run.phase.rate,
        overhead: gateway_overhead,
        direct,
        gateway,
        gateway_cost: run.cost.clone(),
        proxy,
        proxy_overhead,
        proxy_cost: run.proxy_cost.clone(),
        versus_proxy: versus,
        mock_tokens: run.mock_tokens,
        db: run.db.clone(),
        timeline,
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn signed_ms(us: i64) -> String {
    format!("{:+.3}", us as f64 / 1000.0)
}

pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Load test: {}\n", r.scenario.name);
    if !r.scenario.description.is_empty() {
        let _ = writeln!(md, "{}\n", r.scenario.description);
    }
    let _ = writeln!(md, "- started: {}", r.started_at);
    let _ = writeln!(md, "- target: `{}`", r.base_url);
    if let Some(d) = &r.direct_url {
        let _ = writeln!(md, "- direct (side by side): `{d}`");
    }
    if let Some(p) = &r.proxy_url {
        let _ = writeln!(
            md,
            "- reference proxy in front of the mock (side by side): `{p}`"
        );
    }
    let _ = writeln!(md, "- conditions: {}", r.conditions);
    let _ = writeln!(
        md,
        "- rounds per target: {} (alternating ABBA)\n",
        r.scenario.rounds
    );
    for p in &r.phases {
        let shape = match p.mode {
            Mode::Closed => format!("closed loop, concurrency {}", p.concurrency),
            Mode::Open => format!("open loop, {} req/s", p.rate),
        };
        let _ = writeln!(md, "## Phase `{}` ({shape})\n", p.name);
        let _ = writeln!(
            md,
            "| target | requests | ok | errors | req/s | tokens/s | TTFT p50 / p99 ms | gap p50 / p99 ms | e2e p50 / p99 ms |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
        let mut rows: Vec<(&str, &Summary)> = Vec::new();
        if let Some(d) = &p.direct {
            rows.push(("direct", d));
        }
        if let Some(x) = &p.proxy {
            rows.push(("proxy", x));
        }
        rows.push(("gateway", &p.gateway));
        for (label, s) in rows {
            let errors = if s.errors.is_empty() {
                "0".to_string()
            } else {
                s.errors
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {errors} | {:.1} | {:.0} | {} / {} | {} / {} | {} / {} |",
                s.requests,
                s.ok,
                s.requests_per_s,
                s.tokens_per_s,
                ms(s.ttft_us.p50),
                ms(s.ttft_us.p99),
                ms(s.gap_us.p50),
                ms(s.gap_us.p99),
                ms(s.e2e_us.p50),
                ms(s.e2e_us.p99),
            );
        }
        if let Some(o) = &p.overhead {
            let _ = writeln!(
                md,
                "\nOverhead (gateway − direct, same run): TTFT p50 {} ms, TTFT p99 {} ms, gap p50 {} ms, gap p99 {} ms, e2e p50 {} ms, e2e p99 {} ms; throughput ratio {:.3}.",
                signed_ms(o.added_ttft_p50_us),
                signed_ms(o.added_ttft_p99_us),
                signed_ms(o.added_gap_p50_us),
                signed_ms(o.added_gap_p99_us),
                signed_ms(o.added_e2e_p50_us),
                signed_ms(o.added_e2e_p99_us),
                o.throughput_ratio
            );
        }
        if let Some(c) = &p.gateway_cost {
            // With few requests open, RSS growth is caches and buffers, not a cost per request.
            let per_open = if c.peak_open >= MIN_OPEN_FOR_RSS_PER_OPEN {
                format!("{:.1} KiB per open request", c.rss_kib_per_open)
            } else {
                format!("no per-request figure below {MIN_OPEN_FOR_RSS_PER_OPEN} open")
            };
            let _ = writeln!(
                md,
                "\nGateway process: {:.2} CPU-s for {} requests and {} tokens → {:.1} µs/request ({:.4} CPU-s per 1,000 requests), {:.2} µs/token ({:.4} CPU-s per 1,000 tokens); RSS idle {} KiB, peak {} KiB with {} open → {per_open} (VmHWM {} KiB).",
                c.cpu_s,
                c.requests,
                c.tokens,
                c.cpu_us_per_request,
                c.cpu_s_per_1k_requests,
                c.cpu_us_per_token,
                c.cpu_s_per_1k_tokens,
                c.idle_rss_kib,
                c.peak_rss_kib,
                c.peak_open,
                c.hwm_kib
            );
        }
        if let Some(c) = &p.proxy_cost {
            let _ = writeln!(
                md,
                "\nProxy process: {:.2} CPU-s for {} requests and {} tokens → {:.1} µs/request, {:.2} µs/token; RSS idle {} KiB, peak {} KiB with {} open (VmHWM {} KiB).",
                c.cpu_s,
                c.requests,
                c.tokens,
                c.cpu_us_per_request,
                c.cpu_us_per_token,
                c.idle_rss_kib,
                c.peak_rss_kib,
                c.peak_open,
                c.hwm_kib
            );
        }
        if let Some(v) = &p.versus_proxy {
            versus_table(&mut md, p, v);
        }
        if let Some(db) = &p.db {
            let _ = writeln!(
                md,
                "\nDatabase at steady state (after warm-up, under load): {} transactions ({} writing) for {} requests → {:.3} transactions per request ({:.3} writing).",
                db.transactions,
                db.write_transactions,
                db.requests,
                db.transactions_per_request,
                db.write_transactions_per_request
            );
        }
        let _ = writeln!(md);
    }
    if let Some(v) = &r.verify {
        let _ = writeln!(
            md,
            "## Ledger verification: {}\n",
            if v.passed { "PASSED" } else { "FAILED" }
        );
        let _ = writeln!(
            md,
            "Key `{}`: {} records {:?}; by route {:?}; {} fallbacks, {} retries; cost {:?}; shortfall {:?}.\n",
            v.key_id,
            v.records,
            v.by_status,
            v.by_route,
            v.fallbacks,
            v.retries,
            v.cost_by_bucket,
            v.shortfall_by_bucket
        );
        let _ = writeln!(md, "| check | ok | detail |\n|---|---|---|");
        for c in &v.checks {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                c.name,
                if c.ok { "yes" } else { "**NO**" },
                c.detail
            );
        }
    }
    md
}

/// The gateway ÷ proxy table of one phase.
fn versus_table(md: &mut String, p: &PhaseReport, v: &VersusProxy) {
    let _ = writeln!(
        md,
        "\nGateway beside the reference proxy (same run):\n\n| measure | proxy | gateway | gateway ÷ proxy |\n|---|---:|---:|---:|"
    );
    if let (Some(g), Some(x)) = (&p.gateway_cost, &p.proxy_cost) {
        let _ = writeln!(
            md,
            "| CPU per request | {:.1} µs | {:.1} µs | {:.2}× |",
            x.cpu_us_per_request, g.cpu_us_per_request, v.cpu_per_request_ratio
        );
        if x.tokens > 0 && g.tokens > 0 {
            let _ = writeln!(
                md,
                "| CPU per chunk (token) | {:.2} µs | {:.2} µs | {:.2}× |",
                x.cpu_us_per_token, g.cpu_us_per_token, v.cpu_per_token_ratio
            );
        }
        let _ = writeln!(
            md,
            "| peak RSS | {:.1} MiB | {:.1} MiB | {:.2}× |",
            x.peak_rss_kib as f64 / 1024.0,
            g.peak_rss_kib as f64 / 1024.0,
            v.peak_rss_ratio
        );
    }
    if p.direct.is_some() {
        let _ = writeln!(
            md,
            "| added TTFT p50 / p99 over direct | {} / {} ms | {} / {} ms | |",
            signed_ms(v.proxy_added_ttft_p50_us),
            signed_ms(v.proxy_added_ttft_p99_us),
            signed_ms(v.gateway_added_ttft_p50_us),
            signed_ms(v.gateway_added_ttft_p99_us),
        );
        let _ = writeln!(
            md,
            "| added e2e p50 / p99 over direct | {} / {} ms | {} / {} ms | |",
            signed_ms(v.proxy_added_e2e_p50_us),
            signed_ms(v.proxy_added_e2e_p99_us),
            signed_ms(v.gateway_added_e2e_p50_us),
            signed_ms(v.gateway_added_e2e_p99_us),
        );
    }
}

/// Reads one latency percentile off a timeline point.
type PointValue = fn(&Point) -> u64;

const W: f64 = 960.0;
const PANEL_H: f64 = 230.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 30.0;
const GAP: f64 = 60.0;

/// Latency (TTFT for streams, end-to-end otherwise) p50/p90/p99 per second on top, throughput
/// per second below; one colour per target, dash pattern per percentile.
pub fn svg(r: &Report) -> String {
    // Concatenate every phase's points per target (phases run one after the other).
    let mut series: BTreeMap<String, Vec<Point>> = BTreeMap::new();
    for p in &r.phases {
        for (target, points) in &p.timeline {
            series
                .entry(target.clone())
                .or_default()
                .extend(points.iter().cloned());
        }
    }
    let streaming = r.scenario.request.stream;
    let t_max = series
        .values()
        .flatten()
        .map(|p| p.t_s)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let lat_max = series
        .values()
        .flatten()
        .map(|p| p.p99_us)
        .max()
        .unwrap_or(0)
        .max(1) as f64
        / 1000.0;
    let thr = |p: &Point| {
        if streaming {
            p.tokens as f64
        } else {
            p.completed as f64
        }
    };
    let thr_max = series
        .values()
        .flatten()
        .map(thr)
        .fold(0.0, f64::max)
        .max(1.0);
    let plot_w = W - LEFT - RIGHT;
    let h = TOP + PANEL_H * 2.0 + GAP + 40.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="18" font-size="13">{}: {} per second (ms) and throughput</text>"#,
        escape(&r.scenario.name),
        if streaming { "TTFT" } else { "latency" }
    );
    let panels = [
        (
            TOP,
            lat_max,
            if streaming { "TTFT ms" } else { "latency ms" },
        ),
        (
            TOP + PANEL_H + GAP,
            thr_max,
            if streaming { "tokens/s" } else { "requests/s" },
        ),
    ];
    for (y0, max, label) in panels {
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{y0}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="#999"/>"##
        );
        for k in 0..=4 {
            let v = max * f64::from(k) / 4.0;
            let y = y0 + PANEL_H - PANEL_H * f64::from(k) / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + plot_w,
                LEFT - 4.0,
                y + 4.0,
                short(v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">{label}</text>"#,
            y0 + PANEL_H / 2.0,
            y0 + PANEL_H / 2.0
        );
        for k in 0..=5 {
            let t = t_max * f64::from(k) / 5.0;
            let x = LEFT + plot_w * f64::from(k) / 5.0;
            let _ = writeln!(
                s,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{:.0}s</text>"#,
                y0 + PANEL_H + 14.0,
                t
            );
        }
    }
    let colours = [
        ("direct", "#1f77b4"),
        ("gateway", "#d62728"),
        ("proxy", "#2ca02c"),
    ];
    let mut legend_y = TOP + 10.0;
    for (target, points) in &series {
        let colour = colours
            .iter()
            .find(|(t, _)| t == target)
            .map(|(_, c)| *c)
            .unwrap_or("#7f7f7f");
        let x = |t: u64| LEFT + plot_w * t as f64 / t_max;
        let lat: [(&str, &str, PointValue); 3] = [
            ("p50", "", |p| p.p50_us),
            ("p90", "6 3", |p| p.p90_us),
            ("p99", "2 2", |p| p.p99_us),
        ];
        for (name, dash, get) in lat {
            for run in runs(points) {
                let pts: Vec<String> = run
                    .iter()
                    .map(|p| {
                        let v = get(p) as f64 / 1000.0;
                        format!(
                            "{:.1},{:.1}",
                            x(p.t_s),
                            TOP + PANEL_H - PANEL_H * v / lat_max
                        )
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" stroke-dasharray="{dash}" points="{}"/>"#,
                    pts.join(" ")
                );
            }
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" x2="{:.1}" y1="{legend_y:.1}" y2="{legend_y:.1}" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{:.1}" y="{:.1}">{target} {name}</text>"#,
                W - RIGHT + 10.0,
                W - RIGHT + 40.0,
                W - RIGHT + 46.0,
                legend_y + 4.0
            );
            legend_y += 16.0;
        }
        let y0 = TOP + PANEL_H + GAP;
        for run in runs(points) {
            let pts: Vec<String> = run
                .iter()
                .map(|p| {
                    format!(
                        "{:.1},{:.1}",
                        x(p.t_s),
                        y0 + PANEL_H - PANEL_H * thr(p) / thr_max
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
                pts.join(" ")
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Splits points into runs of consecutive seconds, so idle stretches are not bridged.
fn runs(points: &[Point]) -> Vec<&[Point]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=points.len() {
        if i == points.len() || points[i].t_s > points[i - 1].t_s + 1 {
            if i > start {
                out.push(&points[start..i]);
            }
            start = i;
        }
    }
    out
}

fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::stats::{Outcome, Recorder};
    use std::time::Duration;

    fn sample_report() -> Report {
        let scenario = Scenario::parse(
            r#"
name = "t <x>"
[request]
models = [{ name = "m" }]
[[phases]]
name = "p"
mode = "closed"
concurrency = 2
requests = 10
duration_s = 1
"#,
        )
        .unwrap();
        let mut direct = Recorder::default();
        let mut gateway = Recorder::default();
        for (i, rec) in [&mut direct, &mut gateway].into_iter().enumerate() {
            for t in [0.0, 1.0, 5.0] {
                rec.record(&Outcome {
                    started_s: t,
                    ttft: Some(Duration::from_millis(10 + i as u64)),
                    e2e: Duration::from_millis(100),
                    gaps_us: vec![2000 + 100 * i as u64; 4],
                    tokens: 5,
                    ..Outcome::default()
                });
            }
            rec.active = Duration::from_secs(6);
        }
        let run = PhaseRun {
            phase: scenario.phases[0].clone(),
            direct: Some(direct),
            gateway,
            cost: None,
            proxy: None,
            proxy_cost: None,
            mock_tokens: None,
            db: None,
        };
        Report {
            tool: "tollgate-loadtest",
            version: "0",
            started_at: "now".into(),
            base_url: "http://127.0.0.1:1/v1".into(),
            direct_url: None,
            proxy_url: None,
            conditions: "test".into(),
            phases: vec![phase_report(&run)],
            verify: None,
            scenario,
        }
    }

    #[test]
    fn overhead_is_gateway_minus_direct() {
        let r = sample_report();
        let o = r.phases[0].overhead.clone().unwrap();
        assert!((900..=1100).contains(&o.added_ttft_p50_us), "{o:?}");
        assert!((90..=110).contains(&o.added_gap_p99_us), "{o:?}");
        assert!((o.throughput_ratio - 1.0).abs() < 1e-9);
    }

    #[test]
    fn renders_markdown_json_and_svg() {
        let r = sample_report();
        let md = markdown(&r);
        assert!(md.contains("| gateway | 3 | 3 | 0 |"), "{md}");
        assert!(md.contains("throughput ratio 1.000"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["phases"][0]["gateway"]["ok"], 3);
        let svg = svg(&r);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;x&gt;"));
        // Seconds 0-1 and 5 are separate runs: 2 polylines per percentile and for throughput.
        assert_eq!(svg.matches("<polyline").count(), 2 * (3 * 2 + 2));
    }

    #[test]
    fn rss_per_open_request_only_with_enough_open() {
        let mut r = sample_report();
        let cost = |peak_open| Cost {
            idle_rss_kib: 20_000,
            peak_rss_kib: 25_000,
            peak_open,
            rss_kib_per_open: 5_000.0 / peak_open as f64,
            ..Cost::default()
        };
        r.phases[0].gateway_cost = Some(cost(1));
        let md = markdown(&r);
        assert!(
            md.contains("with 1 open → no per-request figure below 100 open"),
            "{md}"
        );
        r.phases[0].gateway_cost = Some(cost(500));
        let md = markdown(&r);
        assert!(
            md.contains("with 500 open → 10.0 KiB per open request"),
            "{md}"
        );
    }

    #[test]
    fn compares_the_gateway_with_the_proxy() {
        let mut r = sample_report();
        let md = markdown(&r);
        assert!(!md.contains("reference proxy"), "{md}");
        let cost = |us_req: f64, us_tok: f64, peak| Cost {
            requests: 100,
            tokens: 6400,
            cpu_us_per_request: us_req,
            cpu_us_per_token: us_tok,
            peak_rss_kib: peak,
            ..Cost::default()
        };
        let gateway_cost = cost(120.0, 5.5, 40 * 1024);
        let proxy_cost = cost(25.0, 1.1, 16 * 1024);
        // The proxy adds 0.2 ms TTFT at p50 over direct, the gateway 1 ms (sample_report's 11 ms
        // against 10 ms).
        let direct = r.phases[0].direct.clone().unwrap();
        let mut proxy = direct.clone();
        proxy.ttft_us.p50 += 200;
        let p = &mut r.phases[0];
        p.proxy_overhead = Some(overhead(&proxy, &direct));
        p.proxy = Some(proxy);
        p.versus_proxy = Some(versus_proxy(
            Some(&gateway_cost),
            Some(&proxy_cost),
            p.overhead.as_ref(),
            p.proxy_overhead.as_ref(),
        ));
        p.gateway_cost = Some(gateway_cost);
        p.proxy_cost = Some(proxy_cost);
        let v = p.versus_proxy.clone().unwrap();
        assert!((v.cpu_per_request_ratio - 4.8).abs() < 1e-9, "{v:?}");
        assert!((v.cpu_per_token_ratio - 5.0).abs() < 1e-9, "{v:?}");
        assert!((v.peak_rss_ratio - 2.5).abs() < 1e-9, "{v:?}");
        assert!((150..=250).contains(&v.proxy_added_ttft_p50_us), "{v:?}");
        assert!((900..=1100).contains(&v.gateway_added_ttft_p50_us), "{v:?}");
        let md = markdown(&r);
        assert!(md.contains("| proxy | 3 | 3 | 0 |"), "{md}");
        assert!(
            md.contains("| CPU per request | 25.0 µs | 120.0 µs | 4.80× |"),
            "{md}"
        );
        assert!(
            md.contains("| CPU per chunk (token) | 1.10 µs | 5.50 µs | 5.00× |"),
            "{md}"
        );
        assert!(
            md.contains("| peak RSS | 16.0 MiB | 40.0 MiB | 2.50× |"),
            "{md}"
        );
        assert!(
            md.contains("| added TTFT p50 / p99 over direct | +0.2"),
            "{md}"
        );
        // No proxy figure, no ratio (not a division by zero).
        assert_eq!(
            versus_proxy(None, None, None, None).cpu_per_request_ratio,
            0.0
        );
    }

    #[test]
    fn reports_the_database_per_request() {
        let mut r = sample_report();
        let md = markdown(&r);
        assert!(!md.contains("Database at steady state"), "{md}");
        let mut db = DbCost::default();
        db.add(
            crate::dbstat::DbSample {
                transactions: 10,
                next_xid: 100,
            },
            crate::dbstat::DbSample {
                transactions: 70,
                next_xid: 130,
            },
            1000,
        );
        r.phases[0].db = Some(db);
        let md = markdown(&r);
        assert!(
            md.contains("60 transactions (30 writing) for 1000 requests → 0.060 transactions per request (0.030 writing)"),
            "{md}"
        );
    }
}
