//! Who may see the UI: a query bearer token, from an `Authorization: Bearer` header or
//! from the cookie the login page sets (`HttpOnly`, `SameSite=Strict`, `Secure` over
//! TLS), checked in constant time by [`QueryTokens`] like every query. Without one, pages
//! redirect to the login page and everything else (assets, downloads) is 401.

use std::{
    fmt::Write as _,
    sync::{Arc, LazyLock},
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use maud::{DOCTYPE, Markup, html};

use super::{UiState, params::Params, see_other};
use crate::storage::Storage;

/// The cookie holding the token (hex: cookie values cannot hold every character).
pub const COOKIE: &str = "stallscope_token";

/// How long the browser keeps the cookie.
const COOKIE_MAX_AGE_S: u64 = 12 * 3600;

/// Largest login form accepted.
const MAX_FORM_BYTES: usize = 4096;

/// The caller's token, for the queries a page makes on its behalf (`None` when the
/// collector runs without query auth).
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: Option<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

fn unhex(text: &str) -> Option<String> {
    if !text.len().is_multiple_of(2) || text.len() > 2048 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// The token from the cookie, else from a bearer header.
fn presented_token(headers: &HeaderMap) -> Option<String> {
    let from_cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .and_then(|(_, value)| unhex(value));
    from_cookie.or_else(|| {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|t| t.trim().to_owned())
    })
}

/// Whether a request is a browser asking for a page (redirected to the login page)
/// rather than for an asset or a download (refused with 401).
fn wants_page(request: &Request) -> bool {
    let path = request.uri().path();
    request.method() == Method::GET
        && !path.starts_with("/assets/")
        && !path.starts_with("/flame/download")
}

/// The middleware in front of every page but the login page.
pub async fn require<S: Storage>(
    State(state): State<Arc<UiState<S>>>,
    mut request: Request,
    next: Next,
) -> Response {
    let token = presented_token(request.headers());
    let valid = match &token {
        _ if !state.tokens.required() => true,
        Some(token) => state
            .tokens
            .check_bearer(Some(&format!("Bearer {token}")))
            .is_ok(),
        None => false,
    };
    if valid {
        request.extensions_mut().insert(Caller { token });
        return next.run(request).await;
    }
    if wants_page(&request) {
        let next_path = request
            .uri()
            .path_and_query()
            .map_or("/services", |p| p.as_str());
        return see_other(&super::params::href("/login", &[("next", next_path)]));
    }
    let mut response = (
        StatusCode::UNAUTHORIZED,
        "sign in at /login with one of the collector's query tokens\n",
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Where to go after signing in: a path on this UI, never another origin.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(path)
            if path.starts_with('/')
                && !path.starts_with("//")
                && !path.contains('\\')
                && !path.starts_with("/login") =>
        {
            path
        }
        _ => "/services",
    }
}

/// The login page's own stylesheet: inline, allowed by its hash (the page cannot load the
/// UI's stylesheet, which needs a token).
const LOGIN_STYLE: &str = "body{font:15px system-ui,sans-serif;background:#f4f5f7;color:#1d2330;display:flex;justify-content:center;padding-top:12vh}form{background:#fff;border:1px solid #d8dbe2;border-radius:6px;padding:24px 28px;width:340px}h1{font-size:20px;margin:0 0 4px}p{color:#5a6272;margin:0 0 16px}label{display:block;font-weight:600;margin-bottom:6px}input[type=password]{width:100%;box-sizing:border-box;padding:8px;font:inherit;border:1px solid #b9bfcb;border-radius:4px}button{margin-top:14px;padding:8px 16px;font:inherit;background:#2f5fa7;color:#fff;border:0;border-radius:4px}.error{color:#b3261e;font-weight:600}";

static LOGIN_POLICY: LazyLock<String> = LazyLock::new(|| {
    let digest = ring::digest::digest(&ring::digest::SHA256, LOGIN_STYLE.as_bytes());
    let hash = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
    super::CONTENT_SECURITY_POLICY
        .replace("style-src 'self'", &format!("style-src 'sha256-{hash}'"))
});

fn login_markup(next: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Sign in · stallscope" }
                // No icon request: the UI's icon is behind the sign-in.
                link rel="icon" href="data:,";
                style { (maud::PreEscaped(LOGIN_STYLE)) }
            }
            body {
                form method="post" action="/login" {
                    h1 { "stallscope" }
                    p { "Sign in with one of the collector's query tokens." }
                    @if let Some(error) = error {
                        p.error role="alert" { (error) }
                    }
                    label for="token" { "Query token" }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    input type="hidden" name="next" value=(next);
                    button type="submit" { "Sign in" }
                }
            }
        }
    }
}

fn login_response(status: StatusCode, next: &str, error: Option<&str>) -> Response {
    let mut response = (status, login_markup(next, error)).into_response();
    if let Ok(policy) = HeaderValue::from_str(&LOGIN_POLICY) {
        response
            .headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    response
}

/// `GET /login`.
pub async fn login_page<S: Storage>(
    State(state): State<Arc<UiState<S>>>,
    request: Request,
) -> Response {
    let params = Params::parse(request.uri().query());
    let next = safe_next(params.get("next"));
    if !state.tokens.required() {
        return see_other(next);
    }
    let error = params
        .get("failed")
        .map(|_| "That token is not valid for this collector.");
    login_response(StatusCode::OK, next, error)
}

/// Whether a form post comes from this UI's own pages (a browser sends `Origin` with
/// every POST; a login posted from another site is refused).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| !host.is_empty() && authority == host)
}

fn cookie(value: &str, max_age_s: u64, secure: bool) -> Option<HeaderValue> {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; Max-Age={max_age_s}; HttpOnly; SameSite=Strict{secure}"
    ))
    .ok()
}

/// `POST /login`: checks the token, sets the cookie, goes on to `next`.
pub async fn login<S: Storage>(
    State(state): State<Arc<UiState<S>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !same_origin(&headers) {
        return (
            StatusCode::FORBIDDEN,
            "sign in from this collector's own login page\n",
        )
            .into_response();
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM_BYTES).await else {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the login form is limited to {MAX_FORM_BYTES} bytes\n"),
        )
            .into_response();
    };
    let form = Params::parse_form(&bytes);
    let next = safe_next(form.get("next")).to_owned();
    let token = form.get("token").unwrap_or_default().trim().to_owned();
    let valid = !token.is_empty()
        && state
            .tokens
            .check_bearer(Some(&format!("Bearer {token}")))
            .is_ok();
    if !valid {
        tracing::warn!("web UI: a sign-in with an invalid token was refused");
        // Post, redirect, get: the form shows again with the reason, and reloading it
        // does not post the token again.
        return see_other(&super::params::href(
            "/login",
            &[("failed", "1"), ("next", &next)],
        ));
    }
    let mut response = see_other(&next);
    if let Some(value) = cookie(
        &hex(token.as_bytes()),
        COOKIE_MAX_AGE_S,
        state.secure_cookie,
    ) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `POST /logout`: forgets the cookie.
pub async fn logout<S: Storage>(State(state): State<Arc<UiState<S>>>) -> Response {
    let mut response = see_other("/login");
    if let Some(value) = cookie("", 0, state.secure_cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_survive_the_cookie() {
        let token = "s3cret; with=odd \u{e9} chars";
        assert_eq!(unhex(&hex(token.as_bytes())).as_deref(), Some(token));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {COOKIE}={}", hex(b"tok"))).expect("ascii"),
        );
        assert_eq!(presented_token(&headers).as_deref(), Some("tok"));
    }

    #[test]
    fn next_stays_on_this_origin() {
        assert_eq!(safe_next(Some("/service?service=a")), "/service?service=a");
        for bad in [
            "//evil.example/x",
            "https://evil.example",
            "/\\evil",
            "/login",
        ] {
            assert_eq!(safe_next(Some(bad)), "/services", "{bad}");
        }
        assert_eq!(safe_next(None), "/services");
    }

    #[test]
    fn cross_site_posts_are_told_apart() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7072"));
        assert!(same_origin(&headers), "no Origin: not a browser form post");
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:7072"),
        );
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&headers));
    }

    #[test]
    fn the_login_policy_allows_its_own_style_only() {
        assert!(LOGIN_POLICY.contains("style-src 'sha256-"));
        assert!(LOGIN_POLICY.contains("script-src 'self'"));
        assert!(!LOGIN_POLICY.contains("unsafe-inline"));
    }
}
