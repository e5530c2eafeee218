//! The console: HTML pages rendered by the server, compiled into the binary, working offline.
//! `market/` is the public marketplace on the client listener (`GET /`): every model, its routes
//! and their live state, and with a key, what that key can call now and which balance pays.
//! `operator/` is the operator console on the admin listener (`/console`): overview, ledger,
//! in-flight requests, wallets, the spend explainer, routes, keys and workflow runs, behind a
//! login. `layout.rs` holds what every page shares: the frame, the style sheet, and how money,
//! times and route chains are written. Every figure comes from the same code as the JSON API.

pub mod layout;
pub mod market;
pub mod operator;
pub mod session;

use actix_web::web;

/// Pages on the client listener.
pub fn client_routes(cfg: &mut web::ServiceConfig) {
    market::configure(cfg);
}

/// Pages on the admin listener, under `/console`.
pub fn admin_routes(cfg: &mut web::ServiceConfig) {
    operator::configure(cfg);
}
