//! The web UI's router against real SQLite storage holding synthetic batches (one
//! service's process named like an HTML injection): every page and asset refused
//! without a token, the login flow and its cookie, the security headers, data labels
//! shown as text on every page, the numbers equal to the query API's, and downloads in
//! every format that decode. The browser test (`tests/tests/web_ui.rs`) drives the same
//! pages in Chromium against real agent data.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    http::{Request, Response, StatusCode, header},
};
use http_body_util::BodyExt as _;
use stallscope_collector::{
    batch::{BatchLimits, normalize},
    identity::QueryTokens,
    server::{
        QueryService,
        ui::{UiState, router},
    },
    storage::{Retention, Storage, Tier, sqlite::SqliteStore},
    synthetic::{self, Shape},
    windows::{ManualWindow, add_manual},
};
use stallscope_proto::v1::{self, query_server::Query as _};
use tower::ServiceExt as _;

const TOKEN: &str = "ui-test-token";
const PAYLOAD: &str = "<img src=x onerror=alert(1)>";
const NS: i64 = 1_000_000_000;

struct Fixture {
    router: Router,
    store: Arc<SqliteStore>,
    now_s: i64,
    window_id: String,
}

/// One day of 10-second buckets.
fn ten_second_buckets() -> Retention {
    Retention {
        tiers: vec![Tier {
            resolution: Duration::from_secs(10),
            keep: Duration::from_secs(24 * 3600),
        }],
    }
}

async fn fixture(name: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("stallscope-ui-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Arc::new(SqliteStore::open(&dir, ten_second_buckets()).expect("open SQLite"));
    let now_s = stallscope_collector::unix_now_ns() / NS;
    let start_s = now_s - 1800;
    for sequence in 0..180_u64 {
        let mut batch = synthetic::batch(
            "agent-1",
            "host-1",
            sequence,
            (start_s + sequence as i64 * 10) * NS,
            10 * NS,
            Shape::default(),
        );
        // Service 0's process gets a name that would be markup if it were not escaped.
        for text in &mut batch.strings {
            if text == "svc-0" {
                PAYLOAD.clone_into(text);
            }
        }
        let normalized =
            normalize("agent-1", sequence, batch, &BatchLimits::default()).expect("valid batch");
        store.store(normalized).await.expect("stored");
    }
    let (window, _) = add_manual(
        &*store,
        ManualWindow {
            host: String::new(),
            service: PAYLOAD.to_owned(),
            from_unix_ns: (now_s - 600) * NS,
            until_unix_ns: Some((now_s - 300) * NS),
            note: format!("note {PAYLOAD}"),
        },
        now_s * NS,
    )
    .await
    .expect("window added");
    let tokens = QueryTokens::new([TOKEN.to_owned()]);
    let state = Arc::new(UiState {
        query: QueryService {
            storage: Arc::clone(&store),
            tokens: tokens.clone(),
            retention: ten_second_buckets(),
        },
        tokens,
        secure_cookie: false,
    });
    Fixture {
        router: router(state),
        store,
        now_s,
        window_id: window.id,
    }
}

async fn send(router: &Router, request: Request<Body>) -> (Response<Body>, String) {
    let response = router.clone().oneshot(request).await.expect("answered");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (
        Response::from_parts(parts, Body::empty()),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn get(path: &str, token: Option<&str>) -> Request<Body> {
    let mut builder = Request::get(path).header(header::HOST, "127.0.0.1:7072");
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Body::empty()).expect("request")
}

fn encoded(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn pages(f: &Fixture) -> Vec<String> {
    let service = encoded(PAYLOAD);
    let (from, until) = (f.now_s - 1800, f.now_s);
    vec![
        "/".to_owned(),
        format!("/services?from={from}&until={until}"),
        format!("/service?service={service}&from={from}&until={until}"),
        format!(
            "/service?service={service}&from={from}&until={until}&sel_from={}&sel_until={}&base_from={}&base_until={}",
            until - 600,
            until - 300,
            until - 900,
            until - 600
        ),
        format!("/windows/{}", f.window_id),
        format!("/flame?service={service}&from={from}&until={until}&process={service}"),
        format!(
            "/flame?service={service}&from={from}&until={until}&base={}..{}",
            from - 600,
            from
        ),
    ]
}

#[tokio::test]
async fn without_a_token_only_the_login_page_answers() {
    let f = fixture("auth").await;
    let mut paths = pages(&f);
    paths.extend(
        [
            "/assets/ui.css",
            "/assets/ui.js",
            "/assets/nope.js",
            "/flame/download?format=pprof",
            "/no/such/page",
        ]
        .map(str::to_owned),
    );
    for token in [None, Some("wrong-token")] {
        for path in &paths {
            let (response, body) = send(&f.router, get(path, token)).await;
            let status = response.status();
            assert!(
                status == StatusCode::UNAUTHORIZED
                    || (status == StatusCode::SEE_OTHER
                        && response.headers()[header::LOCATION]
                            .to_str()
                            .is_ok_and(|l| l.starts_with("/login?next="))),
                "{path} with {token:?}: {status}"
            );
            assert!(
                !body.contains("svc-1") && !body.contains("img"),
                "{path}: {body}"
            );
        }
    }
    // A POST to a page is refused too.
    let request = Request::post("/logout")
        .body(Body::empty())
        .expect("request");
    assert_eq!(
        send(&f.router, request).await.0.status(),
        StatusCode::UNAUTHORIZED
    );
    let (response, body) = send(&f.router, get("/login?next=/services", None)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(body.contains("name=\"token\""), "{body}");
    let policy = response.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .expect("ascii");
    assert!(policy.contains("style-src 'sha256-") && policy.contains("script-src 'self'"));
}

fn login(token: &str, origin: Option<&str>) -> Request<Body> {
    let mut builder = Request::post("/login")
        .header(header::HOST, "127.0.0.1:7072")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(origin) = origin {
        builder = builder.header(header::ORIGIN, origin);
    }
    builder
        .body(Body::from(format!(
            "token={}&next={}",
            encoded(token),
            encoded("/services?from=now-1h")
        )))
        .expect("request")
}

#[tokio::test]
async fn the_login_page_sets_an_http_only_cookie_that_opens_the_pages() {
    let f = fixture("login").await;
    let (response, _) = send(&f.router, login("wrong", Some("http://127.0.0.1:7072"))).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert!(response.headers().get(header::SET_COOKIE).is_none());
    let again = response.headers()[header::LOCATION]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(again.starts_with("/login?failed=1&next="), "{again}");
    let (response, body) = send(&f.router, get(&again, None)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(body.contains("not valid"), "{body}");
    let (response, _) = send(&f.router, login(TOKEN, Some("https://evil.example"))).await;
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "a cross-site login"
    );
    let (response, _) = send(&f.router, login(TOKEN, Some("http://127.0.0.1:7072"))).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        response.headers()[header::LOCATION],
        "/services?from=now-1h"
    );
    let cookie = response.headers()[header::SET_COOKIE]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(TOKEN),
        "the token travels hex-encoded: {cookie}"
    );
    let pair = cookie.split(';').next().expect("name=value").to_owned();
    let request = Request::get("/services")
        .header(header::COOKIE, &pair)
        .body(Body::empty())
        .expect("request");
    let (response, body) = send(&f.router, request).await;
    assert_eq!(response.status(), StatusCode::OK, "{body}");
    assert!(body.contains("svc-1"), "{body}");
    let request = Request::post("/logout")
        .header(header::COOKIE, &pair)
        .body(Body::empty())
        .expect("request");
    let (response, _) = send(&f.router, request).await;
    assert!(
        response.headers()[header::SET_COOKIE]
            .to_str()
            .is_ok_and(|c| c.contains("Max-Age=0"))
    );
}

#[tokio::test]
async fn labels_from_the_data_show_as_text_on_every_page() {
    let f = fixture("escape").await;
    for path in pages(&f) {
        let (response, body) = send(&f.router, get(&path, Some(TOKEN))).await;
        let status = response.status();
        if path == "/" {
            assert_eq!(status, StatusCode::SEE_OTHER);
            continue;
        }
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let headers = response.headers();
        assert_eq!(
            headers[header::CONTENT_SECURITY_POLICY],
            stallscope_collector::server::ui::CONTENT_SECURITY_POLICY
        );
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(
            !body.contains(PAYLOAD),
            "{path}: the payload appears unescaped"
        );
        assert!(
            body.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{path}: the payload is not shown as text"
        );
        assert!(
            !body.contains("<script>") && !body.contains(" onclick="),
            "{path}"
        );
        assert!(
            !body.contains("style=\""),
            "{path}: an inline style the CSP refuses"
        );
    }
}

#[tokio::test]
async fn the_numbers_are_the_query_apis() {
    let f = fixture("numbers").await;
    let (from, until) = (f.now_s - 1800, f.now_s);
    let service = QueryService {
        storage: Arc::clone(&f.store),
        tokens: QueryTokens::disabled(),
        retention: ten_second_buckets(),
    };
    let reply = service
        .series(tonic::Request::new(v1::SeriesRequest {
            range: Some(v1::TimeRange {
                from_unix_ns: from * NS,
                until_unix_ns: until * NS,
            }),
            filter: Some(v1::Filter {
                service: "svc-1".to_owned(),
                ..v1::Filter::default()
            }),
            group_by: "category".to_owned(),
            step_ns: 10 * NS,
            per_scope: true,
        }))
        .await
        .expect("series")
        .into_inner();
    let line = |key: &str| {
        reply
            .lines
            .iter()
            .find(|l| l.key == key)
            .unwrap_or_else(|| panic!("no {key} line: {reply:?}"))
    };
    assert_eq!(line("cpu-work").service, "svc-1");
    assert_eq!(line("cpu-work").host, "host-1");
    // Synthetic off-CPU samples carry no cause label: `why` counts them as other.
    let per_bucket = synthetic::OFF_CPU_NS * 2 * 3;
    assert!(line("other").points.iter().all(|p| p.value == per_bucket));
    // The services page shows the same mean: 6 ms per 10 s bucket is 0.001 s/s.
    let (_, body) = send(
        &f.router,
        get(&format!("/services?from={from}&until={until}"), Some(TOKEN)),
    )
    .await;
    let row = body
        .split("<tr")
        .find(|row| row.contains(">svc-1<"))
        .unwrap_or_else(|| panic!("no svc-1 row: {body}"));
    assert!(row.contains("0.001 s/s"), "{row}");
    // Categories per scope need group_by category.
    let refused = service
        .series(tonic::Request::new(v1::SeriesRequest {
            range: Some(v1::TimeRange {
                from_unix_ns: from * NS,
                until_unix_ns: until * NS,
            }),
            group_by: "cause".to_owned(),
            per_scope: true,
            ..v1::SeriesRequest::default()
        }))
        .await;
    assert_eq!(
        refused.map(|_| ()).map_err(|s| s.code()),
        Err(tonic::Code::InvalidArgument)
    );
}

#[tokio::test]
async fn downloads_come_in_every_format() {
    let f = fixture("download").await;
    let (from, until) = (f.now_s - 1800, f.now_s);
    let base = format!("/flame/download?service=svc-1&from={from}&until={until}");
    let (response, _) = send(&f.router, get(&format!("{base}&format=pprof"), Some(TOKEN))).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()[header::CONTENT_DISPOSITION]
            .to_str()
            .is_ok_and(
                |d| d.starts_with("attachment; filename=\"stallscope-svc-1-")
                    && d.ends_with(".pb.gz\"")
            )
    );
    let bytes = router_bytes(&f.router, &format!("{base}&format=pprof")).await;
    let profile = stallscope_profile::decode_pprof(&bytes).expect("pprof decodes");
    assert!(profile.total(0) > 0);
    let folded = String::from_utf8(router_bytes(&f.router, &format!("{base}&format=folded")).await)
        .expect("UTF-8");
    assert!(folded.lines().all(|l| {
        l.rsplit_once(' ')
            .is_some_and(|(_, v)| v.parse::<u64>().is_ok())
    }));
    let svg = String::from_utf8(router_bytes(&f.router, &format!("{base}&format=svg")).await)
        .expect("UTF-8");
    assert!(svg.starts_with("<?xml") && svg.contains("svc1::f0_1"));
    let speedscope: serde_json::Value = serde_json::from_slice(
        &router_bytes(&f.router, &format!("{base}&format=speedscope")).await,
    )
    .expect("JSON");
    assert_eq!(
        speedscope["$schema"],
        "https://www.speedscope.app/file-format-schema.json"
    );
    let (response, body) = send(&f.router, get(&format!("{base}&format=png"), Some(TOKEN))).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(
        body.contains("use pprof, folded, svg or speedscope"),
        "{body}"
    );
}

async fn router_bytes(router: &Router, path: &str) -> Vec<u8> {
    let response = router
        .clone()
        .oneshot(get(path, Some(TOKEN)))
        .await
        .expect("answered");
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec()
}

#[tokio::test]
async fn bad_urls_say_what_to_fix() {
    let f = fixture("bad").await;
    for (path, reason) in [
        ("/services?from=yesterday", "is not an RFC 3339 time"),
        (
            "/services?from=now&until=now-1h",
            "must end after it starts",
        ),
        ("/service", "name a service"),
        (
            "/service?service=a&sel_from=now-1m",
            "give both sel_from and sel_until",
        ),
        ("/flame?label=nokey", "write it as key=value"),
        ("/windows/m-0000000000000000", "no window with id"),
        ("/windows/..%2f..", "is not a window id"),
    ] {
        let (response, body) = send(&f.router, get(path, Some(TOKEN))).await;
        assert!(
            response.status().is_client_error(),
            "{path}: {}",
            response.status()
        );
        assert!(body.contains(reason), "{path}: {body}");
    }
}
