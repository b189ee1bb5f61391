//! The UI's static files, embedded in the binary (no CDN, nothing fetched at run time):
//! one stylesheet, one plain script (timeline range selection, flame graph zoom and
//! search) and an icon. Served with an `ETag` so browsers revalidate cheaply after an upgrade.

use std::{fmt::Write as _, sync::LazyLock};

use axum::{
    extract::Path,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

pub const CSS_PATH: &str = "/assets/ui.css";
pub const JS_PATH: &str = "/assets/ui.js";
pub const ICON_PATH: &str = "/assets/icon.svg";

/// Every embedded file: name, content type, content.
const FILES: [(&str, &str, &str); 3] = [
    (
        "ui.css",
        "text/css; charset=utf-8",
        include_str!("assets/ui.css"),
    ),
    (
        "ui.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/ui.js"),
    ),
    ("icon.svg", "image/svg+xml", include_str!("assets/icon.svg")),
];

static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    FILES
        .iter()
        .map(|(_, _, content)| {
            let digest = ring::digest::digest(&ring::digest::SHA256, content.as_bytes());
            let hex: String = digest.as_ref()[..8]
                .iter()
                .fold(String::new(), |mut hex, b| {
                    let _ = write!(hex, "{b:02x}");
                    hex
                });
            format!("\"{hex}\"")
        })
        .collect()
});

/// `GET /assets/{name}`.
pub async fn serve(Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some(index) = FILES.iter().position(|(file, _, _)| *file == name) else {
        return (StatusCode::NOT_FOUND, "no such asset\n").into_response();
    };
    let (_, content_type, content) = FILES[index];
    let etag = &ETAGS[index];
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag));
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (StatusCode::OK, content).into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    if let Ok(value) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_stay_small_and_have_no_remote_references() {
        let bytes: usize = FILES.iter().map(|(_, _, content)| content.len()).sum();
        assert!(bytes < 64 * 1024, "{bytes} bytes of assets");
        for (name, _, content) in FILES {
            // The SVG namespace is a name, not a place anything is fetched from.
            let content = content.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !content.contains("http://") && !content.contains("https://"),
                "{name} refers to a remote source"
            );
        }
    }
}
