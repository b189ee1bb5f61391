//! The pages, and what they share: asking the query API on the caller's behalf, and
//! turning its refusals into pages that say what to do.

pub mod flame;
pub mod service;
pub mod services;
pub mod window;

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use maud::html;
use tonic::{Code, Request, Status, metadata::MetadataValue};

use super::{
    auth::Caller,
    html::{Section, layout},
};

/// A query API request carrying the caller's token, as the CLI sends it.
pub fn request<T>(caller: &Caller, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = &caller.token
        && let Ok(value) = MetadataValue::try_from(format!("Bearer {token}"))
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// A page saying what went wrong, with a way back.
pub fn error_page(status: StatusCode, message: &str) -> Response {
    let body = html! {
        h1 { (status.canonical_reason().unwrap_or("Error")) }
        p.error role="alert" { (message) }
        p { a href="/services" { "Back to the services" } }
    };
    (status, layout("Error", Section::Other, &body)).into_response()
}

/// A bad parameter in the page's URL.
pub fn bad_request(message: &str) -> Response {
    error_page(StatusCode::BAD_REQUEST, message)
}

/// The query API's refusal as a page: its message, with the HTTP status that fits.
pub fn status_page(status: &Status) -> Response {
    let code = match status.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unauthenticated => return super::see_other("/login"),
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unavailable | Code::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_page(code, status.message())
}
