//! Who may use the dashboard and which requests may act: authentication (bearer token,
//! login cookie or basic auth), CSRF protection (a random token bound to a cookie, checked
//! on every action, plus the browser's Origin and Sec-Fetch-Site headers), and cookies.

use axum::extract::{Request, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Form;
use base64::Engine as _;
use maud::html;
use serde::Deserialize;

use crate::dashboard::{Auth, State};
use crate::page::{self, Ctx};

/// The cookie holding the CSRF token the forms repeat.
pub(crate) const CSRF_COOKIE: &str = "natasks_csrf";
/// The cookie holding the token typed into the login form.
pub(crate) const AUTH_COOKIE: &str = "natasks_auth";

/// A random token: 32 bytes from the operating system, as hex.
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // The operating system's generator failing is not something a dashboard can recover
    // from; a fixed token would silently void the CSRF protection.
    getrandom::fill(&mut bytes).expect("the operating system's random generator failed");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two secrets in time that does not depend on where they differ.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// A `Set-Cookie` value: HttpOnly, scoped to the dashboard's path, and `Secure` if
/// `secure`; `max_age` 0 removes the cookie. SameSite=Strict, except the login session's,
/// which is Lax so that a link to the dashboard from elsewhere opens it logged in; actions
/// stay guarded by the CSRF cookie, which is Strict, and the origin checks.
pub(crate) fn set_cookie(
    name: &str,
    value: &str,
    base: &str,
    max_age: Option<u64>,
    secure: bool,
) -> HeaderValue {
    let path = if base.is_empty() { "/" } else { base };
    let age = max_age.map(|age| format!("; Max-Age={age}")).unwrap_or_default();
    let secure = if secure { "; Secure" } else { "" };
    let same_site = if name == AUTH_COOKIE { "Lax" } else { "Strict" };
    let text = format!("{name}={value}; Path={path}; HttpOnly; SameSite={same_site}{secure}{age}");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The most login sessions kept; logging in beyond it ends the oldest.
const MAX_SESSIONS: usize = 1024;

/// The login sessions: each login form hands out a random id as its cookie, so the cookie
/// never holds the token itself, whatever characters it has, and logging out ends the
/// session on the server too.
#[derive(Default)]
pub(crate) struct Sessions(std::sync::Mutex<std::collections::VecDeque<String>>);

impl Sessions {
    /// A new session's id.
    fn open(&self) -> String {
        let id = random_token();
        let mut ids = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if ids.len() >= MAX_SESSIONS {
            ids.pop_front();
        }
        ids.push_back(id.clone());
        id
    }

    /// Whether `id` is an open session.
    fn valid(&self, id: &str) -> bool {
        let ids = self.0.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter().fold(false, |found, open| found | same_secret(open, id))
    }

    /// Ends session `id`.
    fn close(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).retain(|open| open != id);
    }
}

/// Whether the request carries the configured credentials.
fn authenticated(auth: &Auth, sessions: &Sessions, headers: &HeaderMap) -> bool {
    if !auth.usable() {
        return false;
    }
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match auth {
        Auth::Token(token) => match authorization.and_then(|v| v.strip_prefix("Bearer ")) {
            Some(bearer) => same_secret(bearer, token),
            None => cookie(headers, AUTH_COOKIE).is_some_and(|id| sessions.valid(id)),
        },
        Auth::Basic { user, password } => authorization
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok())
            .and_then(|raw| String::from_utf8(raw).ok())
            .is_some_and(|pair| same_secret(&pair, &format!("{user}:{password}"))),
    }
}

/// Middleware: with authentication configured, every page and action needs it. A browser
/// without it is sent to the login form (token) or asked by the browser (basic auth).
pub(crate) async fn require_auth(
    Extract(state): Extract<State>,
    request: Request,
    next: Next,
) -> Response {
    let Some(auth) = &state.auth else { return next.run(request).await };
    if authenticated(auth, &state.sessions, request.headers()) {
        return next.run(request).await;
    }
    match auth {
        Auth::Basic { .. } => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"natasks\", charset=\"UTF-8\"")],
            "authentication required",
        )
            .into_response(),
        Auth::Token(_) => {
            let base = page::base_of(&request);
            let login = format!("{base}/login");
            (
                StatusCode::UNAUTHORIZED,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                html! { p { "Authentication required: " a href=(login) { "log in" } "." } }
                    .into_string(),
            )
                .into_response()
        }
    }
}

/// Splits `host[:port]` (`[v6]:port` too) into its lowercase name and port.
fn split_host(host: &str) -> (String, Option<&str>) {
    let host = host.trim();
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, port)) => (format!("[{v6}]"), port.strip_prefix(':')),
            None => (host.to_owned(), None),
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                (name.to_owned(), Some(port))
            }
            _ => (host.to_owned(), None),
        }
    };
    (name.to_ascii_lowercase(), port)
}

/// Whether `host` is one of the configured names (`name` any port, `name:port` that port).
fn configured(allowed: &[String], host: &str) -> bool {
    let (name, port) = split_host(host);
    let with_port = port.map(|p| format!("{name}:{p}"));
    allowed.iter().any(|a| *a == name || Some(a) == with_port.as_ref())
}

/// Whether the dashboard answers to `host`: `localhost`, an IP address (a name another
/// site could rebind to this address is never an IP address), or a configured name.
fn host_allowed(allowed: &[String], host: &str) -> bool {
    let (name, _) = split_host(host);
    name == "localhost"
        || name.parse::<std::net::Ipv4Addr>().is_ok()
        || name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .is_some_and(|n| n.parse::<std::net::Ipv6Addr>().is_ok())
        || configured(allowed, host)
}

/// Middleware: refuses a request naming a host the dashboard does not answer to, such as
/// a page of another site whose name was rebound to this address. A request without a
/// `Host` header (HTTP/2) is judged by its URI's authority, which then serves as its host.
pub(crate) async fn require_host(
    Extract(state): Extract<State>,
    mut request: Request,
    next: Next,
) -> Response {
    let host = match request.headers().get(header::HOST) {
        Some(value) => value.to_str().unwrap_or("").to_owned(),
        None => request.uri().authority().map(|a| a.as_str().to_owned()).unwrap_or_default(),
    };
    if !host_allowed(&state.allowed_hosts, &host) {
        let why = format!(
            "refused: this dashboard does not answer to host {host:?}; an operator can allow \
             it (allowed hosts, `natasks ui --allowed-host`)"
        );
        return (StatusCode::FORBIDDEN, why).into_response();
    }
    if !request.headers().contains_key(header::HOST) {
        if let Ok(value) = HeaderValue::from_str(&host) {
            request.headers_mut().insert(header::HOST, value);
        }
    }
    next.run(request).await
}

/// Refuses a form posted from another site or without the CSRF token of this browser's
/// cookie. The form's origin must be the request's host or one of the `allowed` hosts.
pub(crate) fn check_form(
    allowed: &[String],
    headers: &HeaderMap,
    form_token: Option<&str>,
) -> Result<(), (StatusCode, String)> {
    let forbidden = |why: &str| Err((StatusCode::FORBIDDEN, why.to_owned()));
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site != "same-origin" && site != "none" {
            return forbidden("refused: the request came from another site");
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        let origin = origin.to_str().unwrap_or("");
        let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or("");
        let same = !origin_host.is_empty()
            && (origin_host.eq_ignore_ascii_case(host) || configured(allowed, origin_host));
        if !same {
            return forbidden("refused: the request came from another origin");
        }
    }
    let cookie_token = cookie(headers, CSRF_COOKIE);
    match (cookie_token, form_token) {
        (Some(expected), Some(given)) if !expected.is_empty() && same_secret(expected, given) => {
            Ok(())
        }
        _ => forbidden(
            "refused: the form's security token is missing or stale; reload the page and try again",
        ),
    }
}

/// The login form (token authentication).
pub(crate) async fn login_page(ctx: Ctx) -> Response {
    let body = html! {
        h1 { "Log in" }
        @if !matches!(ctx.state.auth, Some(Auth::Token(_))) {
            p { "This dashboard does not use a login token." }
        } @else {
            form.card method="post" action=(ctx.url("/login")) {
                input type="hidden" name="csrf" value=(ctx.csrf);
                label { "Token" input type="password" name="token" autocomplete="current-password" required; }
                button type="submit" { "Log in" }
            }
        }
    };
    ctx.render("Log in", body)
}

/// The login form's fields.
#[derive(Deserialize)]
pub(crate) struct Login {
    csrf: Option<String>,
    token: String,
}

/// Checks the typed token and opens a session, whose id an HttpOnly cookie keeps.
pub(crate) async fn login(ctx: Ctx, headers: HeaderMap, Form(form): Form<Login>) -> Response {
    let Some(Auth::Token(token)) = &ctx.state.auth else {
        return (StatusCode::NOT_FOUND, "no login here").into_response();
    };
    if let Err((status, why)) = check_form(&ctx.state.allowed_hosts, &headers, form.csrf.as_deref())
    {
        return ctx.error_page(status, "Login refused", &why);
    }
    if !ctx.state.auth.as_ref().is_some_and(Auth::usable) || !same_secret(&form.token, token) {
        return ctx.error_page(StatusCode::UNAUTHORIZED, "Login refused", "wrong token");
    }
    let mut response = page::redirect(&ctx.url("/"));
    let cookie = ctx.cookie(AUTH_COOKIE, &ctx.state.sessions.open(), None);
    response.headers_mut().append(header::SET_COOKIE, cookie);
    response
}

/// The logout form's fields.
#[derive(Deserialize)]
pub(crate) struct Logout {
    csrf: Option<String>,
}

/// Forgets the login cookie.
pub(crate) async fn logout(ctx: Ctx, headers: HeaderMap, Form(form): Form<Logout>) -> Response {
    if let Err((status, why)) = check_form(&ctx.state.allowed_hosts, &headers, form.csrf.as_deref())
    {
        return ctx.error_page(status, "Logout refused", &why);
    }
    if let Some(id) = cookie(&headers, AUTH_COOKIE) {
        ctx.state.sessions.close(id);
    }
    let mut response = page::redirect(&ctx.url("/login"));
    response.headers_mut().append(header::SET_COOKIE, ctx.cookie(AUTH_COOKIE, "", Some(0)));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_several() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; natasks_csrf=xyz"));
        assert_eq!(cookie(&headers, CSRF_COOKIE), Some("xyz"));
        assert_eq!(cookie(&headers, "b"), None);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }

    #[test]
    fn hosts_are_loopback_ip_or_configured() {
        let allowed = vec!["ops.example.com".to_owned(), "other.example:8443".to_owned()];
        for host in ["localhost:80", "127.0.0.1", "10.0.0.5:8080", "[::1]:8080", "OPS.example.com"]
        {
            assert!(host_allowed(&allowed, host), "{host}");
        }
        assert!(host_allowed(&allowed, "other.example:8443"));
        for host in ["evil.example", "other.example:80", "", "[::1", "localhost.evil.example"] {
            assert!(!host_allowed(&allowed, host), "{host}");
        }
    }

    #[test]
    fn tokens_are_random() {
        assert_eq!(random_token().len(), 64);
        assert_ne!(random_token(), random_token());
    }
}
