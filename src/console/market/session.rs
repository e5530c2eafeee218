//! Marketplace sessions: a key holder posts their key once; the console's session store
//! (`console::session`) keeps a random session id mapped to the key's id (never the secret) with
//! an expiry, and the browser keeps only the id, in an HttpOnly, SameSite=Strict cookie
//! (`Secure` over TLS). Sessions live in memory: a restart forgets them and the holder posts the
//! key again.

use std::time::Duration;

use actix_web::cookie::Cookie;
use actix_web::HttpRequest;

use crate::app::AppState;
use crate::console::session::{cookie, over_tls, Holder};

/// The cookie holding the session id.
pub const COOKIE: &str = "tg_market";
/// How long a session lasts after the key was posted.
pub const TTL: Duration = Duration::from_secs(12 * 3600);

/// Opens a session for `key_id`; returns the cookie that carries it.
pub fn open(req: &HttpRequest, state: &AppState, key_id: &str) -> Cookie<'static> {
    let (id, _) = state.sessions.open(Holder::Key(key_id.to_string()), TTL);
    let max_age = i64::try_from(TTL.as_secs()).unwrap_or(i64::MAX);
    cookie(COOKIE, id, "/", max_age, over_tls(req))
}

/// The key id of the request's live marketplace session, if any.
pub fn key_id(req: &HttpRequest, state: &AppState) -> Option<String> {
    let id = req.cookie(COOKIE)?;
    match state.sessions.get(id.value())? {
        (Holder::Key(key_id), _) => Some(key_id),
        (Holder::Operator, _) => None,
    }
}

/// Ends the request's session, if any; returns the cookie that removes it.
pub fn close(req: &HttpRequest, state: &AppState) -> Cookie<'static> {
    if let Some(id) = req.cookie(COOKIE) {
        state.sessions.close(id.value());
    }
    cookie(COOKIE, String::new(), "/", 0, over_tls(req))
}
