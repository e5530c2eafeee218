//! Keys: `/console/keys` lists every key (name, id, project, models, buckets, limits, created,
//! revoked) with forms to create one (its secret is shown once, on the result page), revoke
//! one, edit its limits and top its wallet up with a reference. Every form is a POST with the
//! session's CSRF token, and goes through the admin API's own functions (`create_key_from`,
//! `revoke_key_by_id`, `set_key_limits`, `apply_topup`).

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use maud::{html, Markup};
use serde_json::Value;

use super::parts::{self, FieldError};
use super::session::{form_field, Operator, Refused};
use crate::api::admin::{
    apply_topup, create_key_from, revoke_key_by_id, set_key_limits, CreateKey,
};
use crate::api::error::ApiError;
use crate::app::AppState;
use crate::console::layout;
use crate::keys::KeyLimits;
use crate::ledger::store::ApiKeyRecord;
use crate::ledger::TopupOutcome;

const CURRENT: &str = "/console/keys";

type Form = web::Form<Vec<(String, String)>>;

/// A form field, trimmed; empty is absent.
fn value(form: &Form, name: &str) -> Option<String> {
    form_field(form, name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A comma-separated list; empty is absent (no restriction).
fn list(form: &Form, name: &str) -> Option<Vec<String>> {
    value(form, name).map(|v| {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

/// A limit: empty is none (unlimited), else a positive integer.
fn limit<T: std::str::FromStr>(form: &Form, name: &str) -> Result<Option<T>, ApiError> {
    match value(form, name) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ApiError::invalid_value(
                name,
                format!("'{name}' must be a positive integer, or empty for no limit"),
            )
        }),
    }
}

fn limits_of(form: &Form) -> Result<KeyLimits, ApiError> {
    Ok(KeyLimits {
        rpm: limit(form, "rpm")?,
        tpm: limit(form, "tpm")?,
        max_concurrent_streams: limit(form, "max_concurrent_streams")?,
    })
}

fn or_any(v: &Option<Vec<String>>) -> String {
    match v {
        None => "any".into(),
        Some(v) if v.is_empty() => "none".into(),
        Some(v) => v.join(", "),
    }
}

fn or_unlimited<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "—".into(), |v| v.to_string())
}

/// A message at the top of the page: what a form did, or why it did not.
pub enum Notice {
    Done(String),
    Failed(FieldError, Option<String>),
}

/// Which form an error belongs to: `create`, or a key id.
fn error_for<'a>(notice: &'a Option<Notice>, form: &str) -> Option<&'a FieldError> {
    match notice {
        Some(Notice::Failed(e, f)) if f.as_deref() == Some(form) => Some(e),
        _ => None,
    }
}

fn key_row(state: &AppState, op: &Operator, k: &ApiKeyRecord, notice: &Option<Notice>) -> Markup {
    let id = parts::enc(&k.id);
    let err = error_for(notice, &k.id);
    let buckets: Vec<&String> = state
        .config
        .buckets
        .keys()
        .filter(|b| k.buckets.as_ref().is_none_or(|bs| bs.contains(b)))
        .collect();
    html! {
        tr {
            td { (k.name) }
            td { code { (k.id) } }
            td { (k.project) " " span.muted { "(" (k.workspace) ")" } }
            td { (or_any(&k.models)) }
            td { (or_any(&k.buckets)) }
            td.num { (or_unlimited(k.rpm)) }
            td.num { (or_unlimited(k.tpm)) }
            td.num { (or_unlimited(k.max_concurrent_streams)) }
            td { (layout::time(k.created_at)) }
            td {
                @match k.revoked_at {
                    Some(t) => span.bad { "revoked " (layout::time(t)) },
                    None => form.inline method="post" action=(format!("/console/keys/{id}/revoke")) {
                        (op.csrf_field())
                        button type="submit" { "Revoke" }
                    },
                }
            }
            td {
                a href=(format!("/console/wallets/{id}")) { "Wallet" } " · "
                a href=(format!("/console/ledger?key_id={id}")) { "Requests" }
            }
        }
        @if k.revoked_at.is_none() {
            tr {
                td colspan="11" {
                    form.inline method="post" action=(format!("/console/keys/{id}/limits")) {
                        (op.csrf_field())
                        "Limits: "
                        (parts::field("rpm", "rpm", k.rpm.map(|v| v.to_string()).as_deref(), "none", err))
                        (parts::field("tpm", "tpm", k.tpm.map(|v| v.to_string()).as_deref(), "none", err))
                        (parts::field("streams", "max_concurrent_streams", k.max_concurrent_streams.map(|v| v.to_string()).as_deref(), "none", err))
                        button type="submit" { "Save limits" }
                    }
                    " | "
                    form.inline method="post" action=(format!("/console/keys/{id}/topup")) {
                        (op.csrf_field())
                        "Top up: "
                        select name="bucket" {
                            @for b in &buckets {
                                option value=(b) { (b) " (" (state.config.buckets.get(*b).map(|x| x.currency.as_str()).unwrap_or("")) ")" }
                            }
                        }
                        " "
                        (parts::field("amount", "amount", None, "10.00", err))
                        (parts::field("reference", "reference", None, "invoice id", err))
                        button type="submit" { "Top up" }
                    }
                    @if let Some(e) = err.filter(|e| e.param.as_deref().is_none_or(|p| !["rpm", "tpm", "max_concurrent_streams", "amount", "reference"].contains(&p))) {
                        " " span.error { (e.message) }
                    }
                }
            }
        }
    }
}

/// The keys page, with `notice` at the top.
fn keys_page(
    state: &AppState,
    op: &Operator,
    notice: Option<Notice>,
    status: StatusCode,
) -> HttpResponse {
    let keys = state.keys.list();
    let create_err = error_for(&notice, "create");
    let body = html! {
        h1 { "Keys" }
        @match &notice {
            Some(Notice::Done(m)) => p.note { (m) },
            Some(Notice::Failed(e, _)) => p.error { (e.message) },
            None => {},
        }
        table {
            thead { tr {
                th { "Name" } th { "Id" } th { "Project" } th { "Models" } th { "Buckets" }
                th.num { "rpm" } th.num { "tpm" } th.num { "Streams" } th { "Created" } th { "Revoked" } th {}
            } }
            tbody { @for k in &keys { (key_row(state, op, k, &notice)) } }
        }
        h2 { "Create a key" }
        form method="post" action="/console/keys" {
            (op.csrf_field())
            (parts::field("Name", "name", None, "", create_err))
            (parts::field("Workspace", "workspace", None, "default", create_err))
            (parts::field("Project", "project", None, "default", create_err))
            (parts::field("Models", "models", None, "any (comma-separated)", create_err))
            (parts::field("Buckets", "buckets", None, "any (comma-separated)", create_err))
            (parts::field("rpm", "rpm", None, "none", create_err))
            (parts::field("tpm", "tpm", None, "none", create_err))
            (parts::field("Streams", "max_concurrent_streams", None, "none", create_err))
            label { input type="checkbox" name="allow_cross_bucket_fallback" value="true"; " cross-bucket fallback" }
            " "
            button type="submit" { "Create" }
        }
    };
    layout::respond(status, super::page(op, "Keys", CURRENT, body))
}

/// A form's error as a page: the keys page with the message next to the field (400), or the
/// 404 page for an unknown key.
fn refused(state: &AppState, op: &Operator, e: ApiError, form: &str) -> HttpResponse {
    match e.status.as_u16() {
        404 => parts::not_found(op, CURRENT, &e.message),
        500.. => parts::failed(op, CURRENT, &e),
        _ => keys_page(
            state,
            op,
            Some(Notice::Failed(e.into(), Some(form.to_string()))),
            StatusCode::BAD_REQUEST,
        ),
    }
}

/// `GET /console/keys`.
pub async fn index(op: Operator, state: web::Data<AppState>) -> HttpResponse {
    keys_page(&state, &op, None, StatusCode::OK)
}

/// `POST /console/keys`: creates a key and shows its secret, once.
pub async fn create(
    op: Operator,
    state: web::Data<AppState>,
    form: Form,
) -> Result<HttpResponse, Refused> {
    op.check_csrf(form_field(&form, "_csrf").as_deref())?;
    let fields = (|| -> Result<CreateKey, ApiError> {
        Ok(CreateKey {
            name: value(&form, "name").unwrap_or_default(),
            workspace: value(&form, "workspace"),
            project: value(&form, "project"),
            buckets: list(&form, "buckets"),
            models: list(&form, "models"),
            allow_cross_bucket_fallback: value(&form, "allow_cross_bucket_fallback").is_some(),
            rpm: limit(&form, "rpm")?,
            tpm: limit(&form, "tpm")?,
            max_concurrent_streams: limit(&form, "max_concurrent_streams")?,
        })
    })();
    let created = match fields {
        Ok(c) => create_key_from(&state, c).await,
        Err(e) => Err(e),
    };
    let (rec, secret) = match created {
        Ok(x) => x,
        Err(e) => return Ok(refused(&state, &op, e, "create")),
    };
    let body = html! {
        h1 { "Key created" }
        p { "Key " strong { (rec.name) } " (" code { (rec.id) } ") in project " (rec.project) "." }
        p.note {
            "Its secret, shown only this once (tollgate keeps only its hash): "
            code #secret { (secret) }
        }
        p { a href=(CURRENT) { "Back to the keys" } " · " a href=(format!("/console/wallets/{}", parts::enc(&rec.id))) { "Its wallet" } }
    };
    Ok(layout::ok(super::page(&op, "Key created", CURRENT, body)))
}

/// `POST /console/keys/{id}/revoke`.
pub async fn revoke(
    op: Operator,
    path: web::Path<String>,
    state: web::Data<AppState>,
    form: Form,
) -> Result<HttpResponse, Refused> {
    op.check_csrf(form_field(&form, "_csrf").as_deref())?;
    Ok(match revoke_key_by_id(&state, &path).await {
        Ok(r) => keys_page(
            &state,
            &op,
            Some(Notice::Done(format!(
                "Key '{}' ({}) is revoked.",
                r.name, r.id
            ))),
            StatusCode::OK,
        ),
        Err(e) => refused(&state, &op, e, &path),
    })
}

/// `POST /console/keys/{id}/limits`: `rpm`, `tpm`, `max_concurrent_streams` (empty: none).
pub async fn limits(
    op: Operator,
    path: web::Path<String>,
    state: web::Data<AppState>,
    form: Form,
) -> Result<HttpResponse, Refused> {
    op.check_csrf(form_field(&form, "_csrf").as_deref())?;
    let done = match limits_of(&form) {
        Ok(l) => set_key_limits(&state, &path, l).await,
        Err(e) => Err(e),
    };
    Ok(match done {
        Ok(r) => keys_page(
            &state,
            &op,
            Some(Notice::Done(format!(
                "Limits of '{}' ({}): rpm {}, tpm {}, streams {}.",
                r.name,
                r.id,
                or_unlimited(r.rpm),
                or_unlimited(r.tpm),
                or_unlimited(r.max_concurrent_streams)
            ))),
            StatusCode::OK,
        ),
        Err(e) => refused(&state, &op, e, &path),
    })
}

/// `POST /console/keys/{id}/topup`: `bucket`, `amount`, optional `reference` (a reference
/// applies once; sending it again changes nothing, and the page says so).
pub async fn topup(
    op: Operator,
    path: web::Path<String>,
    state: web::Data<AppState>,
    form: Form,
) -> Result<HttpResponse, Refused> {
    op.check_csrf(form_field(&form, "_csrf").as_deref())?;
    let bucket = value(&form, "bucket").unwrap_or_default();
    let amount = Value::String(value(&form, "amount").unwrap_or_default());
    let reference = value(&form, "reference");
    let outcome = apply_topup(&state, &path, &bucket, &amount, reference.clone()).await;
    let what = match outcome {
        Ok(TopupOutcome::Duplicate) => format!(
            "Reference '{}' was applied before: this top-up changed nothing.",
            reference.unwrap_or_default()
        ),
        Ok(_) => format!(
            "Topped up {} in bucket {bucket}{}.",
            parts::bucket_money(
                &state,
                &bucket,
                amount
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_default()
            ),
            reference
                .map(|r| format!(" (reference '{r}')"))
                .unwrap_or_default()
        ),
        Err(e) => return Ok(refused(&state, &op, e, &path)),
    };
    Ok(super::wallets::key_page(&state, &op, &path, Some(what)).await)
}
