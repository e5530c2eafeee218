//! Operator login: the admin token is exchanged for a session (in the console's one session
//! store, `console::session`: a random id in an HttpOnly, SameSite=Strict cookie scoped to
//! `/console`, `Secure` over TLS, expiring after `server.console_session_ttl_s`); logout ends
//! it. Each session carries its own CSRF token, which every state-changing form sends back
//! (`_csrf`); a POST without it is refused with 403. The login form itself is guarded by a
//! double-submit token (a cookie and a hidden field that must match). Failed logins are limited
//! per client address: after [`MAX_FAILURES`] in [`FAILURE_WINDOW`], 429 until the window
//! passes. Sessions live in memory: a restart asks operators to log in again.

use std::collections::HashMap;
use std::future::{ready, Ready};
use std::time::{Duration, Instant};

use actix_web::cookie::Cookie;
use actix_web::http::{header, StatusCode};
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, ResponseError};
use maud::{html, Markup};
use parking_lot::Mutex;
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::console::layout;
use crate::console::session::{over_tls, random_token, Holder};

/// The session cookie.
pub const COOKIE: &str = "tollgate_console";
/// The login form's double-submit cookie.
const LOGIN_COOKIE: &str = "tollgate_console_login";
/// Failed logins allowed per client address within [`FAILURE_WINDOW`].
pub const MAX_FAILURES: usize = 5;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Client addresses tracked at most for failed logins.
const MAX_TRACKED: usize = 10_000;

/// Recent failed logins per client address.
#[derive(Default)]
pub struct LoginFailures {
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The CSRF token of the request's live operator session, with its id.
fn operator_session(req: &HttpRequest, state: &AppState) -> Option<(String, String)> {
    let id = req.cookie(COOKIE)?.value().to_string();
    match state.sessions.get(&id)? {
        (Holder::Operator, csrf) => Some((id, csrf)),
        (Holder::Key(_), _) => None,
    }
}

impl LoginFailures {
    /// Seconds until `client` may try again, when it has failed too often.
    fn locked_out(&self, client: &str) -> Option<u64> {
        let now = Instant::now();
        let mut m = self.failures.lock();
        let f = m.get_mut(client)?;
        f.retain(|t| now.duration_since(*t) < FAILURE_WINDOW);
        if f.len() < MAX_FAILURES {
            return None;
        }
        let oldest = f.first().copied().unwrap_or(now);
        Some(
            FAILURE_WINDOW
                .saturating_sub(now.duration_since(oldest))
                .as_secs()
                .max(1),
        )
    }

    fn failed(&self, client: &str) {
        let now = Instant::now();
        let mut m = self.failures.lock();
        if m.len() > MAX_TRACKED {
            m.retain(|_, f| {
                f.last()
                    .is_some_and(|t| now.duration_since(*t) < FAILURE_WINDOW)
            });
        }
        m.entry(client.to_string()).or_default().push(now);
    }
}

/// A logged-in operator: the request carried a live session cookie. Handlers that take one are
/// behind the login; without a session the request is sent to the login page.
pub struct Operator {
    session: String,
    /// The session's CSRF token, for the forms on the page.
    pub csrf: String,
}

impl Operator {
    /// The hidden field every state-changing form carries.
    pub fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name="_csrf" value=(self.csrf); }
    }

    /// Refuses (403) a form whose `_csrf` is not this session's.
    pub fn check_csrf(&self, sent: Option<&str>) -> Result<(), Refused> {
        match sent {
            Some(t) if same(t, &self.csrf) => Ok(()),
            _ => Err(Refused::Csrf),
        }
    }
}

/// Why a console request was not served as asked.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("login required")]
    Login,
    #[error("the form's CSRF token is missing or wrong")]
    Csrf,
}

impl ResponseError for Refused {
    fn status_code(&self) -> StatusCode {
        match self {
            Refused::Login => StatusCode::SEE_OTHER,
            Refused::Csrf => StatusCode::FORBIDDEN,
        }
    }
    fn error_response(&self) -> HttpResponse {
        match self {
            Refused::Login => HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/console/login"))
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .finish(),
            Refused::Csrf => layout::respond(
                StatusCode::FORBIDDEN,
                layout::page(
                    "Refused",
                    &[("/console", "Console")],
                    "",
                    html! {
                        h1 { "Refused" }
                        p.error { "This form was sent without its CSRF token (or with a wrong one). Reload the page and send it again." }
                    },
                ),
            ),
        }
    }
}

impl FromRequest for Operator {
    type Error = Refused;
    type Future = Ready<Result<Operator, Refused>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let found = req
            .app_data::<web::Data<AppState>>()
            .and_then(|state| operator_session(req, state))
            .map(|(session, csrf)| Operator { session, csrf });
        ready(found.ok_or(Refused::Login))
    }
}

/// A form field from an `application/x-www-form-urlencoded` body.
pub fn form_field(form: &[(String, String)], name: &str) -> Option<String> {
    form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

fn client_address(req: &HttpRequest) -> String {
    req.peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn cookie(req: &HttpRequest, name: &'static str, value: String, max_age_s: i64) -> Cookie<'static> {
    crate::console::session::cookie(name, value, "/console", max_age_s, over_tls(req))
}

fn login_page(
    req: &HttpRequest,
    status: StatusCode,
    csrf: &str,
    error: Option<&str>,
) -> HttpResponse {
    let body = html! {
        h1 { "Operator console" }
        @if let Some(e) = error { p.error { (e) } }
        form method="post" action="/console/login" {
            input type="hidden" name="_csrf" value=(csrf);
            label { "Admin token " input type="password" name="token" autocomplete="current-password" autofocus; }
            " "
            button type="submit" { "Log in" }
        }
    };
    let mut r = layout::respond(status, layout::page("Log in", &[], "", body));
    let _ = r.add_cookie(&cookie(req, LOGIN_COOKIE, csrf.to_string(), 600));
    r
}

/// `GET /console/login`: the form (already logged in: to the overview).
pub async fn login_form(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if operator_session(&req, &state).is_some() {
        return HttpResponse::SeeOther()
            .insert_header((header::LOCATION, "/console"))
            .finish();
    }
    login_page(&req, StatusCode::OK, &random_token(), None)
}

/// `POST /console/login`: the admin token for a session.
pub async fn login(
    req: HttpRequest,
    state: web::Data<AppState>,
    form: web::Form<Vec<(String, String)>>,
) -> HttpResponse {
    let client = client_address(&req);
    if let Some(wait) = state.login_failures.locked_out(&client) {
        let msg = format!("Too many failed logins from this address: try again in {wait} s.");
        let mut r = login_page(
            &req,
            StatusCode::TOO_MANY_REQUESTS,
            &random_token(),
            Some(&msg),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(wait));
        return r;
    }
    let sent = form_field(&form, "_csrf");
    let expected = req.cookie(LOGIN_COOKIE).map(|c| c.value().to_string());
    let fresh = random_token();
    match (sent, expected) {
        (Some(s), Some(e)) if same(&s, &e) => {}
        _ => {
            return login_page(
                &req,
                StatusCode::FORBIDDEN,
                &fresh,
                Some("The login form expired or was not sent from this page: log in again."),
            )
        }
    }
    let token = form_field(&form, "token").unwrap_or_default();
    if !state.admin_token_matches(token.trim()) {
        state.login_failures.failed(&client);
        return login_page(
            &req,
            StatusCode::UNAUTHORIZED,
            &fresh,
            Some("Wrong admin token."),
        );
    }
    let ttl = state.config.server.console_session_ttl_s;
    let (id, _) = state
        .sessions
        .open(Holder::Operator, Duration::from_secs(ttl));
    let mut r = HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/console"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish();
    let _ = r.add_cookie(&cookie(
        &req,
        COOKIE,
        id,
        i64::try_from(ttl).unwrap_or(i64::MAX),
    ));
    let _ = r.add_removal_cookie(&cookie(&req, LOGIN_COOKIE, String::new(), 0));
    r
}

/// `POST /console/logout` (with the CSRF token): ends the session.
pub async fn logout(
    op: Operator,
    req: HttpRequest,
    state: web::Data<AppState>,
    form: web::Form<Vec<(String, String)>>,
) -> Result<HttpResponse, Refused> {
    op.check_csrf(form_field(&form, "_csrf").as_deref())?;
    state.sessions.close(&op.session);
    let mut r = HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/console/login"))
        .finish();
    let _ = r.add_removal_cookie(&cookie(&req, COOKIE, String::new(), 0));
    Ok(r)
}
