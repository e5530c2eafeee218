//! The operator console on the admin listener, under `/console` (never on the client
//! listener): login and sessions (`session.rs`), then one file per page. Every page but the
//! login needs a session ([`session::Operator`]); every POST carries the session's CSRF token.

pub mod inflight;
pub mod session;
pub mod tasks;

use actix_web::web;
use maud::{html, Markup};

use crate::console::layout;
use session::Operator;

/// The console's navigation, in the order of the header.
pub const NAV: &[(&str, &str)] = &[
    ("/console", "Overview"),
    ("/console/ledger", "Ledger"),
    ("/console/inflight", "In flight"),
    ("/console/wallets", "Wallets"),
    ("/console/explain", "Spend explainer"),
    ("/console/routes", "Routes"),
    ("/console/keys", "Keys"),
];

/// A console page: the frame, the navigation with `current` marked, and a logout button.
pub fn page(op: &Operator, title: &str, current: &str, body: Markup) -> Markup {
    let body = html! {
        form.inline method="post" action="/console/logout" style="float:right" {
            (op.csrf_field())
            button type="submit" { "Log out" }
        }
        (body)
    };
    layout::page(title, NAV, current, body)
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/console/login")
            .route(web::get().to(session::login_form))
            .route(web::post().to(session::login)),
    )
    .service(web::resource("/console/logout").route(web::post().to(session::logout)))
    .service(web::resource("/console/inflight").route(web::get().to(inflight::page)))
    .service(web::resource("/console/inflight.json").route(web::get().to(inflight::rows_json)))
    .service(web::resource("/console/assets/inflight.js").route(web::get().to(inflight::script)))
    .service(web::resource("/console/tasks/{task}").route(web::get().to(tasks::page)));
}
