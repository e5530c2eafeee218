//! What every console page shares: the frame (title, navigation, style sheet), the response
//! headers (no caching, a content security policy that allows only our own script), and how
//! money, times and route chains are written. maud escapes every interpolated value, so text
//! from keys, projects, users and upstreams always shows as text.

use actix_web::http::header;
use actix_web::HttpResponse;
use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use rust_decimal::Decimal;

use crate::ledger::Attempt;

/// The style sheet, inline in every page (no file to fetch).
const CSS: &str = r#"
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;align-items:center;flex-wrap:wrap}
header a{color:#cfd6e4;text-decoration:none}header a:hover,header a.on{color:#fff}
header .brand{font-weight:700;color:#fff;margin-right:1rem}
main{padding:1rem 1.2rem;max-width:1400px}
h1{font-size:1.3rem;margin:.2rem 0 1rem}h2{font-size:1.05rem;margin:1.4rem 0 .5rem}
table{border-collapse:collapse;background:#fff;width:100%;margin:.4rem 0 1rem}
th,td{border:1px solid #dfe3ea;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#17803d}.bad{color:#b42318}.warn{color:#9a6700}.muted{color:#667085}
.state-closed{color:#17803d}.state-half_open{color:#9a6700}.state-open{color:#b42318;font-weight:600}
form.inline{display:inline}input,select,button{font:inherit;padding:.2rem .4rem}
.error{color:#b42318;font-weight:600}.note{background:#fff8e1;border:1px solid #f0d78c;padding:.5rem .8rem}
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{background:#fff;border:1px solid #dfe3ea;padding:.6rem .9rem;min-width:12rem}
.card .v{font-size:1.3rem;font-weight:600}code{font-size:.92em}
"#;

/// A whole page: `title`, the navigation links (`(href, label)`, the current one marked), and
/// the body.
pub fn page(title: &str, nav: &[(&str, &str)], current: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · tollgate" }
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    span.brand { "tollgate" }
                    @for (href, label) in nav {
                        a href=(href) class=[(*href == current).then_some("on")] { (label) }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A page as a response: HTML, never cached, and only our own script may run.
pub fn respond(status: actix_web::http::StatusCode, markup: Markup) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((header::CONTENT_TYPE, "text/html; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
        ))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header(("referrer-policy", "no-referrer"))
        .body(markup.into_string())
}

/// One of our own scripts, compiled into the binary.
pub fn script(body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/javascript; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .body(body)
}

/// 200 with the page.
pub fn ok(markup: Markup) -> HttpResponse {
    respond(actix_web::http::StatusCode::OK, markup)
}

/// An amount with its currency, rounded for reading to the bucket's `display_scale` (R3;
/// stored and JSON amounts stay exact). Amounts of different currencies are never added.
pub fn money(amount: Decimal, currency: &str, scale: u32) -> String {
    let shown = amount.round_dp(scale);
    format!("{} {currency}", shown.normalize())
}

/// The `display_scale` of `bucket` (the configuration's default, 6, when there is none).
pub fn scale(state: &crate::app::AppState, bucket: Option<&str>) -> u32 {
    bucket
        .and_then(|b| state.config.buckets.get(b))
        .map_or(6, |b| b.display_scale)
}

/// A price per million tokens, as [`money`].
pub fn per_mtok(price: Decimal, currency: &str, scale: u32) -> String {
    format!("{} / 1M", money(price, currency, scale))
}

/// A route chain in attempt order: `route ✗ outcome → route ✓` (a skipped route shows its
/// reason the same way).
pub fn route_chain(attempts: &[Attempt]) -> String {
    attempts
        .iter()
        .map(|a| {
            if a.outcome == "ok" {
                format!("{} ✓", a.route)
            } else {
                format!("{} ✗ {}", a.route, a.outcome)
            }
        })
        .collect::<Vec<_>>()
        .join(" → ")
}

/// How long ago `t` was, in words a person reads at a glance (`4 s ago`, `3 min ago`).
pub fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - t).num_seconds().max(0);
    match s {
        0..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86_399 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// A time as RFC 3339, seconds precision, UTC.
pub fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn attempt(route: &str, outcome: &str) -> Attempt {
        Attempt {
            route: route.into(),
            upstream_model: "u".into(),
            bucket: "b".into(),
            retry: 0,
            outcome: outcome.into(),
            http_status: None,
            error: None,
            started_at: Utc::now(),
            latency_ms: 0,
        }
    }

    #[test]
    fn chains_read_in_attempt_order() {
        let a = [attempt("m1/alpha", "http_429"), attempt("m1/beta", "ok")];
        assert_eq!(route_chain(&a), "m1/alpha ✗ http_429 → m1/beta ✓");
    }

    #[test]
    fn money_rounds_for_reading_only_and_keeps_its_currency() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert_eq!(money(d("1.23456789"), "USD", 4), "1.2346 USD");
        assert_eq!(money(d("2.50"), "CNY", 4), "2.5 CNY");
    }

    #[test]
    fn text_is_escaped() {
        let body = html! { p { ("<script>alert(1)</script>") } };
        let out = page("t<b>", &[], "", body).into_string();
        assert!(out.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!out.contains("<script>alert"));
        assert!(out.contains("t&lt;b&gt;"));
    }
}
