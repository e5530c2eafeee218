//! Sessions of the console's two kinds of visitors, in one store (`AppState::sessions`):
//! operators logged in with the admin token (`/console`) and key holders who posted their key on
//! the marketplace (`/`). A session is a random id (256 bits, hex) that the browser keeps in an
//! HttpOnly, SameSite=Strict cookie — `Secure` when the request came over TLS — mapped here to
//! whom it serves (never a secret), its CSRF token and its expiry. A session of one kind is no
//! session of the other. Sessions live in memory: a restart forgets them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix_web::cookie::{Cookie, SameSite};
use actix_web::HttpRequest;
use parking_lot::Mutex;
use rand::RngCore;

/// Sessions kept at most; beyond it the one closest to expiry goes (a flood of logins cannot
/// grow memory).
pub const MAX_SESSIONS: usize = 10_000;

/// Whom a session serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Operator,
    /// A key holder on the marketplace: the key's id.
    Key(String),
}

struct Session {
    holder: Holder,
    csrf: String,
    expires: Instant,
}

/// Every live session.
#[derive(Default)]
pub struct SessionStore {
    sessions: Mutex<HashMap<String, Session>>,
}

/// 256 random bits, hex: session ids and CSRF tokens.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

impl SessionStore {
    /// Opens a session for `holder` lasting `ttl`; returns (session id, CSRF token).
    pub fn open(&self, holder: Holder, ttl: Duration) -> (String, String) {
        let (id, csrf) = (random_token(), random_token());
        let now = Instant::now();
        let mut m = self.sessions.lock();
        m.retain(|_, s| s.expires > now);
        if m.len() >= MAX_SESSIONS {
            if let Some(oldest) = m
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                m.remove(&oldest);
            }
        }
        m.insert(
            id.clone(),
            Session {
                holder,
                csrf: csrf.clone(),
                expires: now + ttl,
            },
        );
        (id, csrf)
    }

    /// Whom the live session `id` serves, and its CSRF token.
    pub fn get(&self, id: &str) -> Option<(Holder, String)> {
        let now = Instant::now();
        let mut m = self.sessions.lock();
        match m.get(id) {
            Some(s) if s.expires > now => Some((s.holder.clone(), s.csrf.clone())),
            Some(_) => {
                m.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, id: &str) {
        self.sessions.lock().remove(id);
    }
}

/// Whether the request came over TLS (directly, or as a proxy in front says): its cookies are
/// then `Secure`.
pub fn over_tls(req: &HttpRequest) -> bool {
    req.connection_info().scheme() == "https"
}

/// A session cookie for `path`: HttpOnly, SameSite=Strict, lasting `max_age_s` (0: a removal),
/// `Secure` when `secure`.
pub fn cookie(
    name: &'static str,
    value: String,
    path: &'static str,
    max_age_s: i64,
    secure: bool,
) -> Cookie<'static> {
    Cookie::build(name, value)
        .path(path)
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(actix_web::cookie::time::Duration::seconds(max_age_s))
        .finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_session_serves_its_holder_until_closed_or_expired() {
        let store = SessionStore::default();
        let (id, csrf) = store.open(Holder::Key("key-1".into()), Duration::from_secs(60));
        assert_eq!(id.len(), 64);
        assert_ne!(id, csrf);
        assert_eq!(store.get(&id), Some((Holder::Key("key-1".into()), csrf)));
        store.close(&id);
        assert_eq!(store.get(&id), None);
        let (op, _) = store.open(Holder::Operator, Duration::ZERO);
        assert_eq!(store.get(&op), None, "expired");
        assert_eq!(store.get(&"0".repeat(64)), None);
    }

    #[test]
    fn cookies_are_http_only_strict_and_secure_on_tls() {
        let c = cookie("c", "v".into(), "/console", 60, false);
        assert_eq!(c.http_only(), Some(true));
        assert_eq!(c.same_site(), Some(SameSite::Strict));
        assert_eq!(c.path(), Some("/console"));
        assert_ne!(c.secure(), Some(true));
        assert_eq!(cookie("c", "v".into(), "/", 60, true).secure(), Some(true));
    }
}
