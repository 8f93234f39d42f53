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

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, scoped to the dashboard's path;
/// `max_age` 0 removes the cookie.
pub(crate) fn set_cookie(name: &str, value: &str, base: &str, max_age: Option<u64>) -> HeaderValue {
    let path = if base.is_empty() { "/" } else { base };
    let age = max_age.map(|age| format!("; Max-Age={age}")).unwrap_or_default();
    let text = format!("{name}={value}; Path={path}; HttpOnly; SameSite=Strict{age}");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Whether the request carries the configured credentials.
fn authenticated(auth: &Auth, headers: &HeaderMap) -> bool {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match auth {
        Auth::Token(token) => {
            let bearer = authorization.and_then(|v| v.strip_prefix("Bearer "));
            bearer.or_else(|| cookie(headers, AUTH_COOKIE)).is_some_and(|t| same_secret(t, token))
        }
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
    if authenticated(auth, request.headers()) {
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

/// Refuses a form posted from another site or without the CSRF token of this browser's
/// cookie.
pub(crate) fn check_form(
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
        if origin_host.is_empty() || origin_host != host {
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

/// Checks the typed token and keeps it in an HttpOnly cookie.
pub(crate) async fn login(ctx: Ctx, headers: HeaderMap, Form(form): Form<Login>) -> Response {
    let Some(Auth::Token(token)) = &ctx.state.auth else {
        return (StatusCode::NOT_FOUND, "no login here").into_response();
    };
    if let Err((status, why)) = check_form(&headers, form.csrf.as_deref()) {
        return ctx.error_page(status, "Login refused", &why);
    }
    if !same_secret(&form.token, token) {
        return ctx.error_page(StatusCode::UNAUTHORIZED, "Login refused", "wrong token");
    }
    let mut response = page::redirect(&ctx.url("/"));
    let cookie = set_cookie(AUTH_COOKIE, &form.token, &ctx.base, None);
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
    if let Err((status, why)) = check_form(&headers, form.csrf.as_deref()) {
        return ctx.error_page(status, "Logout refused", &why);
    }
    let mut response = page::redirect(&ctx.url("/login"));
    response
        .headers_mut()
        .append(header::SET_COOKIE, set_cookie(AUTH_COOKIE, "", &ctx.base, Some(0)));
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
    fn tokens_are_random() {
        assert_eq!(random_token().len(), 64);
        assert_ne!(random_token(), random_token());
    }
}
