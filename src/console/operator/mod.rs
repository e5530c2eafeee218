//! The operator console on the admin listener, under `/console` (never on the client
//! listener): login and sessions (`session.rs`), then one file per page. Every page but the
//! login needs a session ([`session::Operator`]); every POST carries the session's CSRF token.

pub mod explain;
pub mod inflight;
pub mod keys;
pub mod ledger;
pub mod overview;
pub mod parts;
pub mod routes;
pub mod session;
pub mod tasks;
pub mod wallets;

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

/// Where the console's one script is served: the live parts of the ledger (its tail) and the
/// in-flight page, which poll JSON from the console; the pages read fine without it.
pub const SCRIPT_PATH: &str = "/console/assets/console.js";

/// `GET /console/assets/console.js`, compiled into the binary.
async fn script() -> actix_web::HttpResponse {
    layout::script(include_str!("console.js"))
}

/// `GET` of a path under `/console` that is no page.
async fn unknown_page(op: Operator, req: actix_web::HttpRequest) -> actix_web::HttpResponse {
    parts::not_found(
        &op,
        "",
        &format!("There is no console page at {}.", req.path()),
    )
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
    .service(web::resource(SCRIPT_PATH).route(web::get().to(script)))
    .service(web::resource("/console/tasks/{task}").route(web::get().to(tasks::page)))
    .service(web::resource("/console").route(web::get().to(overview::index)))
    .service(web::resource("/console/ledger").route(web::get().to(ledger::list)))
    // Before `/console/ledger/{request_id}`, so that these are not taken for ids.
    .service(web::resource("/console/ledger/export").route(web::get().to(ledger::export)))
    .service(web::resource("/console/ledger/tail").route(web::get().to(ledger::tail)))
    .service(web::resource("/console/ledger/{request_id}").route(web::get().to(ledger::one)))
    .service(
        web::resource("/console/keys")
            .route(web::get().to(keys::index))
            .route(web::post().to(keys::create)),
    )
    .service(web::resource("/console/keys/{id}/revoke").route(web::post().to(keys::revoke)))
    .service(web::resource("/console/keys/{id}/limits").route(web::post().to(keys::limits)))
    .service(web::resource("/console/keys/{id}/topup").route(web::post().to(keys::topup)))
    .service(web::resource("/console/explain").route(web::get().to(explain::index)))
    .service(web::resource("/console/routes").route(web::get().to(routes::index)))
    .service(web::resource("/console/wallets").route(web::get().to(wallets::index)))
    .service(web::resource("/console/wallets/{key_id}").route(web::get().to(wallets::one)))
    // Last: any other path under /console is the console's own 404 page (behind the login).
    .service(web::resource("/console/{rest:.*}").route(web::get().to(unknown_page)));
}
