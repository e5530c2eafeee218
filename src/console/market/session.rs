//! Marketplace sessions: a key holder posts their key once; the server keeps a random session id
//! mapped to the key's id (never the secret) with an expiry, and the browser keeps only the id,
//! in an HttpOnly, SameSite=Strict cookie. Sessions live in memory: a restart forgets them and
//! the holder posts the key again.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::HttpRequest;
use parking_lot::Mutex;

/// The cookie holding the session id.
pub const COOKIE: &str = "tg_market";
/// How long a session lasts after the key was posted.
pub const TTL: Duration = Duration::from_secs(12 * 3600);
/// At most this many live sessions; beyond it the oldest is dropped.
pub const MAX_SESSIONS: usize = 10_000;

struct Session {
    key_id: String,
    expires: Instant,
}

/// One table per process: every worker of the client listener sees the same sessions.
static SESSIONS: LazyLock<Mutex<HashMap<String, Session>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Opens a session for `key_id`; returns its id (256 random bits, hex).
pub fn open(key_id: &str) -> String {
    let id = hex::encode(rand::random::<[u8; 32]>());
    let now = Instant::now();
    let mut s = SESSIONS.lock();
    s.retain(|_, v| v.expires > now);
    if s.len() >= MAX_SESSIONS {
        if let Some(oldest) = s
            .iter()
            .min_by_key(|(_, v)| v.expires)
            .map(|(k, _)| k.clone())
        {
            s.remove(&oldest);
        }
    }
    s.insert(
        id.clone(),
        Session {
            key_id: key_id.to_string(),
            expires: now + TTL,
        },
    );
    id
}

/// The key id of the request's live session, if any.
pub fn key_id(req: &HttpRequest) -> Option<String> {
    let id = cookie(req)?;
    let now = Instant::now();
    let mut s = SESSIONS.lock();
    match s.get(&id) {
        Some(v) if v.expires > now => Some(v.key_id.clone()),
        Some(_) => {
            s.remove(&id);
            None
        }
        None => None,
    }
}

/// Ends the request's session, if any.
pub fn close(req: &HttpRequest) {
    if let Some(id) = cookie(req) {
        SESSIONS.lock().remove(&id);
    }
}

/// The `Set-Cookie` value carrying `id` (`secure` on a TLS listener).
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the cookie.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The session id from the `Cookie` header (only well-formed ids are looked up).
fn cookie(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn a_session_maps_its_cookie_to_the_key_id_until_closed() {
        let id = open("key-1");
        let req = TestRequest::default()
            .insert_header((header::COOKIE, format!("other=1; {COOKIE}={id}")))
            .to_http_request();
        assert_eq!(key_id(&req).as_deref(), Some("key-1"));
        close(&req);
        assert_eq!(key_id(&req), None);
        let forged = TestRequest::default()
            .insert_header((header::COOKIE, format!("{COOKIE}={}", "0".repeat(64))))
            .to_http_request();
        assert_eq!(key_id(&forged), None);
    }

    #[test]
    fn the_cookie_is_http_only_and_strict() {
        let c = set_cookie("abc", false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict"));
        assert!(set_cookie("abc", true).ends_with("; Secure"));
    }
}
