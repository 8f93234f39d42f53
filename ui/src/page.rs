//! What every page shares: the request's context (where the dashboard is mounted, the
//! CSRF token, the flash message of the last action), the layout, and formatting helpers.
//! HTML is written with `maud`, which escapes every value it inserts.

use axum::extract::{FromRequestParts, NestedPath, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use maud::{html, Markup, DOCTYPE};
use time::OffsetDateTime;

use crate::dashboard::{Auth, State};
use crate::security::{self, CSRF_COOKIE};

/// The cookie carrying the result of the last action to the page it redirected to.
const FLASH_COOKIE: &str = "natasks_flash";

/// The outcome of an action, shown once on the next page.
pub(crate) struct Flash {
    pub(crate) ok: bool,
    pub(crate) message: String,
}

/// The request as a page sees it.
pub(crate) struct Ctx {
    pub(crate) state: State,
    /// The path the dashboard is nested at ("" at the root).
    pub(crate) base: String,
    /// The CSRF token to put in forms.
    pub(crate) csrf: String,
    new_csrf: bool,
    flash: Option<Flash>,
    logged_in: bool,
}

/// The path the dashboard's router is nested at, "" at the root.
pub(crate) fn base_of(request: &Request) -> String {
    request
        .extensions()
        .get::<NestedPath>()
        .map(|p| p.as_str().trim_end_matches('/').to_owned())
        .unwrap_or_default()
}

impl FromRequestParts<State> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &State) -> Result<Self, Self::Rejection> {
        let base = parts
            .extensions
            .get::<NestedPath>()
            .map(|p| p.as_str().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        let existing = security::cookie(&parts.headers, CSRF_COOKIE)
            .filter(|t| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()));
        let (csrf, new_csrf) = match existing {
            Some(token) => (token.to_owned(), false),
            None => (security::random_token(), true),
        };
        let flash = security::cookie(&parts.headers, FLASH_COOKIE).and_then(decode_flash);
        let logged_in = matches!(state.auth, Some(Auth::Token(_)))
            && security::cookie(&parts.headers, security::AUTH_COOKIE).is_some();
        Ok(Self { state: state.clone(), base, csrf, new_csrf, flash, logged_in })
    }
}

fn decode_flash(value: &str) -> Option<Flash> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(value).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (kind, message) = text.split_once(':')?;
    Some(Flash { ok: kind == "ok", message: message.to_owned() })
}

/// Percent-encodes a path segment or query value: every byte but letters, digits and
/// `-_.~`, so a queue named `a?b`, `jobs#1`, `a/b` or `x%41` stays one value.
pub(crate) fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The dashboard path of `queue`'s page.
pub(crate) fn queue_path(queue: &str) -> String {
    format!("/queues/{}", urlencode(queue))
}

/// A `303 See Other` to `location`.
pub(crate) fn redirect(location: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, location.to_owned())]).into_response()
}

impl Ctx {
    /// A dashboard path (`/queues/x`) as a link from the browser. The overview of a
    /// dashboard nested at `/ops` is `/ops` (axum matches a nested root without the slash).
    pub(crate) fn url(&self, path: &str) -> String {
        if path == "/" && !self.base.is_empty() {
            return self.base.clone();
        }
        format!("{}{}", self.base, path)
    }

    /// A `Set-Cookie` value for this dashboard (its path, its `Secure` setting).
    pub(crate) fn cookie(&self, name: &str, value: &str, max_age: Option<u64>) -> HeaderValue {
        security::set_cookie(name, value, &self.base, max_age, self.state.secure_cookies)
    }

    /// Whether actions are shown.
    pub(crate) fn can_act(&self) -> bool {
        !self.state.read_only
    }

    /// Redirects to `path` and shows `message` there once.
    pub(crate) fn redirect_with(&self, path: &str, ok: bool, message: &str) -> Response {
        let mut response = redirect(&self.url(path));
        let text = format!("{}:{}", if ok { "ok" } else { "err" }, message);
        let value = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        response.headers_mut().append(header::SET_COOKIE, self.cookie(FLASH_COOKIE, &value, None));
        response
    }

    /// A form's hidden CSRF field.
    pub(crate) fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name="csrf" value=(self.csrf); }
    }

    /// A page with `status` saying why something failed.
    pub(crate) fn error_page(&self, status: StatusCode, title: &str, message: &str) -> Response {
        let body = html! {
            h1 { (title) }
            p.flash.err role="alert" { (message) }
            p { a href=(self.url("/")) { "Back to the overview" } }
        };
        let mut response = self.render(title, body);
        *response.status_mut() = status;
        response
    }

    /// The page `title` around `body`, with the navigation and the pending flash message.
    pub(crate) fn render(&self, title: &str, body: Markup) -> Response {
        let page = html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · natasks" }
                    link rel="stylesheet" href=(self.url("/assets/style.css"));
                }
                body {
                    header.top {
                        a.brand href=(self.url("/")) { "natasks" }
                        nav {
                            a href=(self.url("/")) { "Queues" }
                            a href=(self.url("/schedules")) { "Schedules" }
                            a href=(self.url("/search")) { "Search" }
                            @if self.can_act() { a href=(self.url("/dispatch")) { "Dispatch" } }
                        }
                        @if self.state.read_only { span.badge { "read-only" } }
                        @if self.logged_in {
                            form.inline method="post" action=(self.url("/logout")) {
                                (self.csrf_field())
                                button.link type="submit" { "Log out" }
                            }
                        }
                    }
                    main {
                        @if let Some(flash) = &self.flash {
                            p.flash.ok[flash.ok].err[!flash.ok] role="status" { (flash.message) }
                        }
                        (body)
                    }
                }
            }
        };
        let mut response = (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            page.into_string(),
        )
            .into_response();
        let headers = response.headers_mut();
        headers.insert("x-frame-options", header::HeaderValue::from_static("DENY"));
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            header::HeaderValue::from_static(
                "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'; form-action 'self'",
            ),
        );
        headers.insert("referrer-policy", header::HeaderValue::from_static("same-origin"));
        if self.new_csrf {
            headers.append(header::SET_COOKIE, self.cookie(CSRF_COOKIE, &self.csrf, None));
        }
        if self.flash.is_some() {
            headers.append(header::SET_COOKIE, self.cookie(FLASH_COOKIE, "", Some(0)));
        }
        response
    }
}

/// A time as `2026-11-29 14:03:07 UTC`.
pub(crate) fn time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// How long ago `t` was, roughly: `3s`, `5m`, `2h`, `4d`.
pub(crate) fn age(t: OffsetDateTime) -> String {
    let seconds = (OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The most payload bytes a page shows.
pub(crate) const PAYLOAD_SHOWN: usize = 256 * 1024;

/// A payload for reading: indented JSON when it is JSON, the text when it is UTF-8, a hex
/// dump otherwise; past [`PAYLOAD_SHOWN`] bytes, the start of it as text or hex. The
/// result is text; the caller's template escapes it.
pub(crate) fn payload(bytes: &[u8]) -> (&'static str, String) {
    let shown = &bytes[..bytes.len().min(PAYLOAD_SHOWN)];
    if shown.len() == bytes.len() {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) {
            if let Ok(pretty) = serde_json::to_string_pretty(&value) {
                return ("JSON", pretty);
            }
        }
    }
    // A cut may split a character: keep the text up to it.
    let text = match std::str::from_utf8(shown) {
        Ok(text) => Some(text),
        Err(err) if shown.len() < bytes.len() && err.error_len().is_none() => {
            std::str::from_utf8(&shown[..err.valid_up_to()]).ok()
        }
        Err(_) => None,
    };
    if let Some(text) = text {
        if !text.chars().any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r') {
            return ("text", text.to_owned());
        }
    }
    ("binary, hex", hex_dump(shown))
}

/// Sixteen bytes a line: offset, hex, printable ASCII.
fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (line, chunk) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' })
            .collect();
        out.push_str(&format!("{:08x}  {:<48}  {}\n", line * 16, hex.join(" "), ascii));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_shown_by_kind() {
        assert_eq!(payload(br#"{"a":1}"#), ("JSON", "{\n  \"a\": 1\n}".to_owned()));
        assert_eq!(payload(b"hello").0, "text");
        let (kind, dump) = payload(&[0, 1, 255]);
        assert_eq!(kind, "binary, hex");
        assert!(dump.starts_with("00000000  00 01 ff"), "{dump}");
        let big = vec![b'a'; PAYLOAD_SHOWN + 10];
        assert_eq!(payload(&big).1.len(), PAYLOAD_SHOWN, "a large payload is cut");
    }
}
