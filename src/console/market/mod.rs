//! The public marketplace on the client listener (`GET /`): every model the configuration lists,
//! each route's kind, bucket, prices and live state, and a verdict per model. A key holder may
//! post their key (`POST /key`) to see the page as that key sees it: what it can call now and
//! why not, its balances per bucket, and its own recent requests. `GET /market/state` carries the
//! routes' live cells, which `GET /assets/market.js` (our one script) polls twice a second.
//! `page.rs` builds the view from the catalog, the wallet and the ledger; `session.rs` keeps
//! the key's session.

mod page;
pub mod session;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::Utc;
use serde_json::json;

use crate::api::client::method_not_allowed;
use crate::app::AppState;
use crate::catalog;
use crate::console::layout;

/// Our script, compiled into the binary.
const SCRIPT: &str = include_str!("market.js");

/// The longest key form the page reads (a key is far shorter).
const MAX_FORM_BYTES: usize = 4096;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/")
            .route(web::get().to(index))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/key")
            .app_data(web::FormConfig::default().limit(MAX_FORM_BYTES))
            .route(web::post().to(use_key))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/key/forget")
            .route(web::post().to(forget_key))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/market/state")
            .route(web::get().to(live_state))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/assets/market.js")
            .route(web::get().to(script))
            .default_service(web::to(method_not_allowed)),
    );
}

async fn index(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let key = session::key_id(&req, &state)
        .and_then(|id| state.keys.get(&id))
        .filter(|k| k.record.revoked_at.is_none());
    let market = match key {
        Some(k) => {
            let (models, view) = page::for_key(&state, &k).await;
            page::Market {
                models,
                key: Some(view),
                error: None,
            }
        }
        None => page::Market {
            models: page::public(&state),
            key: None,
            error: None,
        },
    };
    layout::ok(page::render(&market))
}

/// `POST /key` with the form field `key`: a valid key opens a session and goes back to `/`; a
/// wrong one gets the public page again with an error and 401, and nothing about why.
async fn use_key(
    req: HttpRequest,
    form: Result<web::Form<Vec<(String, String)>>, actix_web::Error>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if !same_origin(&req) {
        return refused(
            &state,
            StatusCode::FORBIDDEN,
            "This form must be sent from this page.",
        );
    }
    let key = form
        .ok()
        .and_then(|f| f.iter().find(|(k, _)| k == "key").map(|(_, v)| v.clone()))
        .and_then(|k| state.keys.authenticate(k.trim()));
    match key {
        Some(k) => see_other(session::open(&req, &state, k.id())),
        None => refused(&state, StatusCode::UNAUTHORIZED, "That key is not valid."),
    }
}

/// `POST /key/forget`: ends the session and clears the cookie.
async fn forget_key(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    see_other(session::close(&req, &state))
}

/// `GET /market/state`: every route's live cells and each model's public verdict (nothing
/// about any key).
async fn live_state(state: web::Data<AppState>) -> HttpResponse {
    let now = Utc::now();
    let mut routes = Vec::new();
    let mut models = Vec::new();
    for m in &state.config.models {
        for v in catalog::route_views(&state, m) {
            routes.push(json!({
                "route": v.get("route"),
                "cells": page::live_cells(&v, now),
            }));
        }
        let callable = catalog::any_route_up(&state, m);
        models.push(json!({
            "model": m.name,
            "callable": callable,
            "verdict": page::public_verdict(callable),
        }));
    }
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({"routes": routes, "models": models}))
}

async fn script() -> HttpResponse {
    crate::console::layout::script(SCRIPT)
}

fn refused(state: &AppState, status: StatusCode, error: &str) -> HttpResponse {
    let market = page::Market {
        models: page::public(state),
        key: None,
        error: Some(error.to_string()),
    };
    layout::respond(status, page::render(&market))
}

fn see_other(cookie: actix_web::cookie::Cookie<'static>) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .cookie(cookie)
        .finish()
}

/// A browser's cross-site form post says so (`Sec-Fetch-Site`, or another site's `Origin`):
/// refused, so no page elsewhere can sign a visitor in with a key of its choosing. (The page's
/// `no-referrer` policy makes browsers send `Origin: null` from our own form, so the fetch
/// metadata decides when present.)
fn same_origin(req: &HttpRequest) -> bool {
    let h = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = h("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    match h("origin") {
        None | Some("null") => true,
        Some(origin) => {
            let host = h("host").unwrap_or("");
            !host.is_empty() && origin.split_once("://").map(|(_, o)| o) == Some(host)
        }
    }
}
