//! What several console pages share: query strings (read and written), an error shown next to
//! its form field, the 404 page, and a record's cost in its bucket's currency.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use maud::{html, Markup};
use rust_decimal::Decimal;

use super::session::Operator;
use crate::api::error::ApiError;
use crate::app::AppState;
use crate::console::layout;
use crate::ledger::LedgerRecord;

/// The non-empty parameters of a query string, in order (an empty form field is no filter).
/// A query string that does not parse reads as no parameters.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    web::Query::<Vec<(String, String)>>::from_query(query)
        .map(|q| q.into_inner())
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .collect()
}

/// The value of `name` among `pairs`.
pub fn param(pairs: &[(String, String)], name: &str) -> Option<String> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim().to_string())
}

/// Percent-encodes a query string component.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `a=1&b=2` from pairs, encoded.
pub fn query_string<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    pairs
        .into_iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A form error: its message, and the field it belongs to when there is one.
pub struct FieldError {
    pub param: Option<String>,
    pub message: String,
}

impl From<ApiError> for FieldError {
    fn from(e: ApiError) -> Self {
        FieldError {
            param: e.param,
            message: e.message,
        }
    }
}

impl FieldError {
    /// The message, when it belongs next to `field`.
    pub fn at(&self, field: &str) -> Option<&str> {
        (self.param.as_deref() == Some(field)).then_some(self.message.as_str())
    }
}

/// A labelled text input keeping its value, with `error` beside it when it is about `name`.
pub fn field(
    label: &str,
    name: &str,
    value: Option<&str>,
    hint: &str,
    error: Option<&FieldError>,
) -> Markup {
    let err = error.and_then(|e| e.at(name));
    html! {
        label {
            (label) " "
            input type="text" name=(name) value=[value] placeholder=(hint)
                aria-invalid=[err.map(|_| "true")];
        }
        @if let Some(m) = err { " " span.error data-field=(name) { (m) } }
        " "
    }
}

/// The 404 page.
pub fn not_found(op: &Operator, current: &str, message: &str) -> HttpResponse {
    layout::respond(
        StatusCode::NOT_FOUND,
        super::page(
            op,
            "Not found",
            current,
            html! { h1 { "Not found" } p.error { (message) } },
        ),
    )
}

/// A page saying something failed on our side (the store), never with a stack or a secret.
pub fn failed(op: &Operator, current: &str, e: &ApiError) -> HttpResponse {
    layout::respond(
        e.status,
        super::page(
            op,
            "Error",
            current,
            html! { h1 { "Something went wrong" } p.error { (e.message) } },
        ),
    )
}

/// A bucket's `display_scale` (4 for a bucket the configuration no longer has).
pub fn scale(state: &AppState, bucket: Option<&str>) -> u32 {
    layout::scale(state, bucket)
}

/// An amount of a bucket in its currency.
pub fn bucket_money(state: &AppState, bucket: &str, amount: Decimal) -> String {
    match state.config.buckets.get(bucket) {
        Some(b) => layout::money(amount, &b.currency, b.display_scale),
        None => amount.normalize().to_string(),
    }
}

/// What a record cost, in the currency of the bucket that paid (`—` when none paid).
pub fn record_cost(state: &AppState, r: &LedgerRecord) -> String {
    match &r.currency {
        Some(c) => layout::money(r.cost, c, scale(state, r.bucket.as_deref())),
        None => "—".into(),
    }
}
