//! `/service`: one service (on one host, or on all) over a range: a stacked timeline of
//! wait time per second by cause with its windows shaded (and their source), the windows
//! listed; a range selected on the timeline (`sel_from`/`sel_until`) shows its flame
//! graph, and "compare" (`base_from`/`base_until`) the differential one against a
//! baseline range.

use std::{fmt::Write as _, sync::Arc};

use axum::{
    extract::{Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use maud::{Markup, html};
use stallscope_proto::v1::{self, query_server::Query as _};

use super::{
    bad_request,
    flame::{FlameQuery, graph},
    request,
    services::step_for,
    status_page,
};
use crate::{
    server::ui::{
        UiState,
        auth::Caller,
        chart::{self, Marks, Stacked, WindowMark},
        html::{CATEGORIES, IDLE, Section, layout, legend, range_picker, rate},
        params::{self, Params, Range, format_time, href, human_span, human_time},
    },
    storage::Storage,
};

/// About this many buckets on the timeline.
const BUCKETS: i64 = 300;

/// What the page shows.
struct ServiceQuery {
    service: String,
    host: String,
    range: Range,
    selection: Option<Range>,
    baseline: Option<Range>,
    show_idle: bool,
}

impl ServiceQuery {
    fn parse(params: &Params, now_ns: i64) -> Result<Self, String> {
        let service = params.get("service").unwrap_or_default().to_owned();
        let host = params.get("host").unwrap_or_default().to_owned();
        if service.is_empty() && host.is_empty() {
            return Err("name a service (service=...) or a host (host=...)".to_owned());
        }
        let baseline = params::optional_range(params, "base_from", "base_until", now_ns)?;
        let selection = params::optional_range(params, "sel_from", "sel_until", now_ns)?;
        if baseline.is_some() && selection.is_none() {
            return Err("a baseline (base_from, base_until) compares a selection: give sel_from and sel_until too".to_owned());
        }
        Ok(Self {
            service,
            host,
            range: params::range(params, "from", "until", 3600, now_ns)?,
            selection,
            baseline,
            show_idle: params.get("idle") == Some("1"),
        })
    }

    /// This page with other parts: `selection` and `baseline` replaced, idle as given.
    fn href(&self, selection: Option<Range>, baseline: Option<Range>, show_idle: bool) -> String {
        let from = format_time(self.range.from_ns);
        let until = format_time(self.range.until_ns);
        let sel = selection.map(|s| (format_time(s.from_ns), format_time(s.until_ns)));
        let base = baseline.map(|b| (format_time(b.from_ns), format_time(b.until_ns)));
        let mut pairs: Vec<(&str, &str)> = vec![
            ("service", &self.service),
            ("host", &self.host),
            ("from", &from),
            ("until", &until),
        ];
        if show_idle {
            pairs.push(("idle", "1"));
        }
        if let Some((a, b)) = &sel {
            pairs.push(("sel_from", a));
            pairs.push(("sel_until", b));
        }
        if let Some((a, b)) = &base {
            pairs.push(("base_from", a));
            pairs.push(("base_until", b));
        }
        href("/service", &pairs)
    }

    fn name(&self) -> String {
        match (self.service.as_str(), self.host.as_str()) {
            ("", host) => format!("host {host}"),
            (service, "") => format!("{service} (all hosts)"),
            (service, host) => format!("{service} on {host}"),
        }
    }
}

/// `GET /service`.
pub async fn page<S: Storage>(State(state): State<Arc<UiState<S>>>, request: Request) -> Response {
    let Some(caller) = request.extensions().get::<Caller>().cloned() else {
        return super::error_page(StatusCode::UNAUTHORIZED, "sign in first");
    };
    let params = Params::parse(request.uri().query());
    let query = match ServiceQuery::parse(&params, crate::unix_now_ns()) {
        Ok(query) => query,
        Err(message) => return bad_request(&message),
    };
    match render(&state, &caller, &query).await {
        Ok(markup) => markup.into_response(),
        Err(response) => response,
    }
}

fn window_title(w: &v1::Window) -> String {
    let end = if w.until_unix_ns == 0 {
        "open".to_owned()
    } else {
        human_time(w.until_unix_ns)
    };
    let mut title = format!(
        "{} window {}: {} – {end}",
        w.source,
        w.id,
        human_time(w.from_unix_ns)
    );
    if !w.top_cause.is_empty() {
        let _ = write!(title, ", top cause {}", w.top_cause);
    }
    if !w.note.is_empty() {
        let _ = write!(title, "\n{}", w.note);
    }
    title
}

async fn render<S: Storage>(
    state: &UiState<S>,
    caller: &Caller,
    query: &ServiceQuery,
) -> Result<Markup, Response> {
    let filter = v1::Filter {
        host: query.host.clone(),
        service: query.service.clone(),
        ..v1::Filter::default()
    };
    let series = state
        .query
        .series(request(
            caller,
            v1::SeriesRequest {
                range: Some(query.range.proto()),
                filter: Some(filter.clone()),
                group_by: "category".to_owned(),
                step_ns: step_for(query.range, BUCKETS) * 1_000_000_000,
                per_scope: false,
            },
        ))
        .await
        .map_err(|s| status_page(&s))?
        .into_inner();
    let windows = state
        .query
        .windows(request(
            caller,
            v1::WindowsRequest {
                range: Some(query.range.proto()),
                filter: Some(filter),
                ..v1::WindowsRequest::default()
            },
        ))
        .await
        .map_err(|s| status_page(&s))?
        .into_inner()
        .windows;
    let step_s = series.step_ns / 1_000_000_000;
    let stacked = Stacked::from_lines(&series.lines, step_s, query.range);
    let marks = Marks {
        windows: windows
            .iter()
            .map(|w| WindowMark {
                id: w.id.clone(),
                source: w.source.clone(),
                from_ns: w.from_unix_ns,
                until_ns: (w.until_unix_ns != 0).then_some(w.until_unix_ns),
                title: window_title(w),
            })
            .collect(),
        selection: query.selection,
        baseline: query.baseline,
    };
    let base_href = query.href(None, None, query.show_idle);
    let selection = match query.selection {
        Some(selection) => Some(selection_section(state, caller, query, selection).await?),
        None => None,
    };
    let body = html! {
        h1 { (query.name()) }
        (range_picker("/service", &[("service", &query.service), ("host", &query.host)], query.range))
        div.legend-row {
            (legend(query.show_idle))
            @if query.show_idle {
                a.toggle href=(query.href(query.selection, query.baseline, false)) { "Hide idle" }
            } @else {
                a.toggle href=(query.href(query.selection, query.baseline, true)) { "Show idle" }
            }
        }
        @if stacked.has_data() {
            (chart::timeline(&stacked, &marks, query.show_idle, &base_href))
            p.hint { "Wait time (and on-CPU time) per second of wall time, in " (human_span(step_s)) " buckets. Drag across the chart to select a range and see its flame graph." }
            table.means {
                tr {
                    th { "mean" }
                    @for c in CATEGORIES { td { span class={"swatch c-" (c)} {} (c) " " (rate(stacked.mean(c))) } }
                    td.idle { (IDLE) " " (rate(stacked.mean(IDLE))) }
                }
            }
        } @else {
            p.empty { "No data for " (query.name()) " between " (human_time(query.range.from_ns)) " and " (human_time(query.range.until_ns)) "." }
        }
        (windows_table(query, &windows))
        @if let Some(selection) = selection { (selection) } @else {
            p.hint { "No range selected: drag across the timeline, or pick a window above." }
        }
    };
    Ok(layout(&query.name(), Section::Services, &body))
}

fn windows_table(query: &ServiceQuery, windows: &[v1::Window]) -> Markup {
    html! {
        h2 { "Windows" }
        @if windows.is_empty() {
            p.empty { "No window in this range." }
        } @else {
            table.windows {
                thead { tr { th { "Window" } th { "Source" } th { "Scope" } th { "Onset" } th { "End" } th { "Top cause" } th { "Note" } th {} } }
                tbody {
                    @for w in windows {
                        @let end = if w.until_unix_ns == 0 { crate::unix_now_ns().min(query.range.until_ns) } else { w.until_unix_ns };
                        @let selection = Range { from_ns: w.from_unix_ns, until_ns: end.max(w.from_unix_ns + 1_000_000_000) };
                        tr class={"win-row state-" (w.state)} {
                            td { a.window-link href=(format!("/windows/{}", w.id)) { (w.id) } }
                            td { span class={"badge src-" (w.source)} { (w.source) } }
                            td { (if w.service.is_empty() { "every service" } else { &w.service }) (if w.host.is_empty() { String::new() } else { format!(" on {}", w.host) }) }
                            td { (human_time(w.from_unix_ns)) }
                            td { @if w.until_unix_ns == 0 { span.badge.open { "open" } } @else { (human_time(w.until_unix_ns)) } }
                            td { (w.top_cause) }
                            td { (w.note) }
                            td { a href=(query.href(Some(selection), None, query.show_idle)) { "select" } }
                        }
                    }
                }
            }
        }
    }
}

async fn selection_section<S: Storage>(
    state: &UiState<S>,
    caller: &Caller,
    query: &ServiceQuery,
    selection: Range,
) -> Result<Markup, Response> {
    let flame_query = FlameQuery {
        range: selection,
        host: query.host.clone(),
        service: query.service.clone(),
        signal: String::new(),
        cause: String::new(),
        process: String::new(),
        thread: String::new(),
        pid: String::new(),
        labels: Vec::new(),
        baseline: query.baseline.into_iter().collect(),
        search: String::new(),
    };
    let (graph, _) = graph(state, caller, &flame_query).await?;
    let length = selection.until_ns - selection.from_ns;
    let before = Range {
        from_ns: selection.from_ns - length,
        until_ns: selection.from_ns,
    };
    Ok(html! {
        section.selection {
            h2 {
                @if let Some(baseline) = query.baseline {
                    "Selected " (human_time(selection.from_ns)) " – " (human_time(selection.until_ns)) ", compared with " (human_time(baseline.from_ns)) " – " (human_time(baseline.until_ns))
                } @else {
                    "Selected " (human_time(selection.from_ns)) " – " (human_time(selection.until_ns)) " (" (human_span(length / 1_000_000_000)) ")"
                }
            }
            p.actions {
                @if query.baseline.is_some() {
                    a href=(query.href(Some(selection), None, query.show_idle)) { "Without the baseline" }
                } @else {
                    a.compare href=(query.href(Some(selection), Some(before), query.show_idle)) { "Compare with the " (human_span(length / 1_000_000_000)) " before" }
                }
                " · " a href=(flame_query.href("/flame", true, &[])) { "Open in the flame graph page (filters, downloads)" }
                " · " a href=(query.href(None, None, query.show_idle)) { "Clear the selection" }
            }
            (graph)
        }
    })
}
