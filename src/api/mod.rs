//! The HTTP surface: client endpoints (`client.rs`), admin endpoints (`admin.rs`), TLS setup,
//! and the one mapping of errors to the OpenAI envelope (`error.rs`).

pub mod admin;
pub mod cli;
pub mod client;
pub mod error;
pub mod ledger_queries;
pub mod tls;

use std::sync::atomic::Ordering;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::app::AppState;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if !state.ready.load(Ordering::Acquire) {
        HttpResponse::ServiceUnavailable().json(json!({"status": "starting or draining"}))
    } else if state.writer.failing() {
        HttpResponse::ServiceUnavailable().json(json!({"status": "ledger store refusing writes"}))
    } else {
        HttpResponse::Ok().json(json!({"status": "ready"}))
    }
}
