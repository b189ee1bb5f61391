//! `/services`: every service and host seen in the range, those with an open window
//! first, each with its wait time by cause as a small stacked chart and the means beside
//! it; the open windows above them.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    extract::{Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use maud::{Markup, html};
use stallscope_proto::v1::{self, query_server::Query as _};

use super::{bad_request, request, status_page};
use crate::{
    server::ui::{
        UiState,
        auth::Caller,
        chart::{self, Stacked},
        html::{CATEGORIES, IDLE, Section, layout, legend, range_picker, rate},
        params::{self, Params, Range, format_time, href, human_span, human_time},
    },
    storage::Storage,
};

/// About this many bars per small chart.
const BARS: i64 = 60;

/// A bucket width from the storage's own steps, giving about `bars` buckets over `range`.
pub fn step_for(range: Range, bars: i64) -> i64 {
    let span_s = ((range.until_ns - range.from_ns) / 1_000_000_000).max(1);
    let wanted = (span_s / bars).max(1);
    [
        1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
        86400,
    ]
    .into_iter()
    .find(|step| *step >= wanted)
    .unwrap_or(86_400)
}

/// A row: one (service, host).
struct Row {
    service: String,
    host: String,
    stacked: Stacked,
    open: Vec<v1::Window>,
    windows: usize,
}

/// Whether `window` covers (host, service): an empty scope field means every one.
pub fn covers(window: &v1::Window, host: &str, service: &str) -> bool {
    (window.host.is_empty() || window.host == host)
        && (window.service.is_empty() || window.service == service)
}

fn window_scope(window: &v1::Window) -> String {
    match (window.service.as_str(), window.host.as_str()) {
        ("", "") => "everything".to_owned(),
        (s, "") => s.to_owned(),
        ("", h) => format!("host {h}"),
        (s, h) => format!("{s} on {h}"),
    }
}

/// `GET /services`.
pub async fn page<S: Storage>(State(state): State<Arc<UiState<S>>>, request: Request) -> Response {
    let Some(caller) = request.extensions().get::<Caller>().cloned() else {
        return super::error_page(StatusCode::UNAUTHORIZED, "sign in first");
    };
    let params = Params::parse(request.uri().query());
    let range = match params::range(&params, "from", "until", 3600, crate::unix_now_ns()) {
        Ok(range) => range,
        Err(message) => return bad_request(&message),
    };
    match render(&state, &caller, range).await {
        Ok(markup) => markup.into_response(),
        Err(status) => status_page(&status),
    }
}

async fn render<S: Storage>(
    state: &UiState<S>,
    caller: &Caller,
    range: Range,
) -> Result<Markup, tonic::Status> {
    let step_s = step_for(range, BARS);
    let targets = state
        .query
        .targets(request(
            caller,
            v1::TargetsRequest {
                range: Some(range.proto()),
            },
        ))
        .await?
        .into_inner()
        .targets;
    let series = state
        .query
        .series(request(
            caller,
            v1::SeriesRequest {
                range: Some(range.proto()),
                filter: Some(v1::Filter::default()),
                group_by: "category".to_owned(),
                step_ns: step_s * 1_000_000_000,
                per_scope: true,
            },
        ))
        .await?
        .into_inner();
    let windows = state
        .query
        .windows(request(
            caller,
            v1::WindowsRequest {
                range: Some(range.proto()),
                ..v1::WindowsRequest::default()
            },
        ))
        .await?
        .into_inner()
        .windows;
    let step_s = series.step_ns / 1_000_000_000;
    let mut lines: BTreeMap<(String, String), Vec<v1::SeriesLine>> = BTreeMap::new();
    for t in &targets {
        lines
            .entry((t.service.clone(), t.host.clone()))
            .or_default();
    }
    for line in series.lines {
        lines
            .entry((line.service.clone(), line.host.clone()))
            .or_default()
            .push(line);
    }
    let mut rows: Vec<Row> = lines
        .into_iter()
        .map(|((service, host), lines)| {
            let scoped: Vec<&v1::Window> = windows
                .iter()
                .filter(|w| covers(w, &host, &service))
                .collect();
            Row {
                stacked: Stacked::from_lines(&lines, step_s, range),
                open: scoped
                    .iter()
                    .filter(|w| w.state == "open")
                    .map(|w| (*w).clone())
                    .collect(),
                windows: scoped.len(),
                service,
                host,
            }
        })
        .collect();
    // Open windows first, then by how much they wait.
    rows.sort_by(|a, b| {
        a.open
            .is_empty()
            .cmp(&b.open.is_empty())
            .then(b.stacked.mean_total().total_cmp(&a.stacked.mean_total()))
            .then(a.service.cmp(&b.service))
            .then(a.host.cmp(&b.host))
    });
    let open: Vec<&v1::Window> = windows.iter().filter(|w| w.state == "open").collect();
    let body = html! {
        h1 { "Services" }
        (range_picker("/services", &[], range))
        @if !open.is_empty() {
            section.open-windows {
                h2 { "Open windows" }
                ul {
                    @for w in &open {
                        li {
                            a href=(format!("/windows/{}", w.id)) { (window_scope(w)) }
                            " since " (human_time(w.from_unix_ns)) " (" (w.source) ")"
                            @if !w.top_cause.is_empty() { " · top cause " strong { (w.top_cause) } }
                            @if !w.note.is_empty() { " · " (w.note) }
                        }
                    }
                }
            }
        }
        (legend(false))
        p.hint { "Seconds of waiting (and on-CPU time) per second of wall time, request path only, in " (human_span(step_s)) " bars; each chart has its own scale. Idle waiting (servers waiting for requests, parked pools) is listed apart." }
        @if rows.is_empty() {
            p.empty { "No data between " (human_time(range.from_ns)) " and " (human_time(range.until_ns)) "." }
        } @else {
            table.services {
                thead {
                    tr {
                        th { "Service" } th { "Host" } th { "Windows" } th { "Wait time by cause" }
                        th.num { "total" }
                        @for c in CATEGORIES { th.num { (c) } }
                        th.num { (IDLE) }
                    }
                }
                tbody {
                    @for row in &rows { (row_markup(row, range)) }
                }
            }
        }
    };
    Ok(layout("Services", Section::Services, &body))
}

fn row_markup(row: &Row, range: Range) -> Markup {
    let link = href(
        "/service",
        &[
            ("service", row.service.as_str()),
            ("host", row.host.as_str()),
            ("from", &format_time(range.from_ns)),
            ("until", &format_time(range.until_ns)),
        ],
    );
    let all_hosts = href(
        "/service",
        &[
            ("service", row.service.as_str()),
            ("from", &format_time(range.from_ns)),
            ("until", &format_time(range.until_ns)),
        ],
    );
    html! {
        tr class=[(!row.open.is_empty()).then_some("has-open")] {
            td.service { a.svc href=(link) { (row.service) } " " a.allhosts href=(all_hosts) title="every host" { "(all hosts)" } }
            td.host { (row.host) }
            td.windows {
                @for w in &row.open {
                    a.badge.open href=(format!("/windows/{}", w.id)) title=(format!("open {} window", w.source)) { "open" }
                    " "
                }
                @if row.windows > row.open.len() { span.count { (row.windows - row.open.len()) " closed" } }
            }
            td.chart {
                @if row.stacked.has_data() { (chart::small(&row.stacked)) } @else { span.nodata { "no wait data" } }
            }
            td.num.total { (rate(row.stacked.mean_total())) }
            @for c in CATEGORIES { td.num { (rate(row.stacked.mean(c))) } }
            td.num.idle { (rate(row.stacked.mean(IDLE))) }
        }
    }
}
