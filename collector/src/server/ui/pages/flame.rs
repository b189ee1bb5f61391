//! `/flame`: a flame graph of a range and filter (signal, cause, process, thread, pid,
//! any label), interactive (zoom, search, reset), or a differential one against baseline
//! ranges (`base=FROM..UNTIL`, repeatable); `/flame/download` writes the same profile as
//! pprof, folded stacks, SVG or speedscope, with the writers the CLI uses.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use maud::{Markup, html};
use stallscope_profile::{
    FlameView, OutputFormat, Profile, decode_pprof_with_limit, folded_stacks, write_profile,
};
use stallscope_proto::v1::{self, query_server::Query as _};

use super::{bad_request, request, status_page};
use crate::{
    server::ui::{
        UiState,
        auth::Caller,
        flame::Flame,
        html::{CATEGORIES, Section, human_total, layout},
        params::{self, Params, Range, format_time, href, human_time},
    },
    storage::Storage,
};

/// Largest profile the UI decodes, as the CLI.
const MAX_PROFILE_BYTES: u64 = 1024 * 1024 * 1024;

/// The signals agents label samples with.
const SIGNALS: [&str; 9] = [
    "off-cpu",
    "on-cpu",
    "runqueue",
    "lock",
    "syscall",
    "disk",
    "tcp-connect",
    "socket-wait",
    "tcp",
];

/// What a flame graph URL asks for.
#[derive(Debug, Clone)]
pub struct FlameQuery {
    pub range: Range,
    pub host: String,
    pub service: String,
    pub signal: String,
    pub cause: String,
    pub process: String,
    pub thread: String,
    pub pid: String,
    /// `key=value` label matches.
    pub labels: Vec<String>,
    pub baseline: Vec<Range>,
    pub search: String,
}

impl FlameQuery {
    pub fn parse(params: &Params, now_ns: i64) -> Result<Self, String> {
        let text = |key: &str| params.get(key).unwrap_or_default().to_owned();
        let labels: Vec<String> = params.all("label").into_iter().map(str::to_owned).collect();
        if let Some(bad) = labels.iter().find(|l| !l.contains('=')) {
            return Err(format!("label `{bad}`: write it as key=value"));
        }
        let baseline = params
            .all("base")
            .into_iter()
            .map(|b| Range::parse(b, now_ns).map_err(|e| format!("base: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if baseline.len() > 16 {
            return Err("base: at most 16 baseline ranges".to_owned());
        }
        Ok(Self {
            range: params::range(params, "from", "until", 3600, now_ns)?,
            host: text("host"),
            service: text("service"),
            signal: text("signal"),
            cause: text("cause"),
            process: text("process"),
            thread: text("thread"),
            pid: text("pid"),
            labels,
            baseline,
            search: text("q"),
        })
    }

    fn filter(&self) -> v1::Filter {
        let mut labels: Vec<v1::LabelMatch> = Vec::new();
        for (key, value) in [("process", &self.process), ("thread", &self.thread)] {
            if !value.is_empty() {
                labels.push(v1::LabelMatch {
                    key: key.to_owned(),
                    value: value.clone(),
                });
            }
        }
        for label in &self.labels {
            if let Some((key, value)) = label.split_once('=') {
                labels.push(v1::LabelMatch {
                    key: key.trim().to_owned(),
                    value: value.trim().to_owned(),
                });
            }
        }
        v1::Filter {
            host: self.host.clone(),
            service: self.service.clone(),
            pid: self.pid.clone(),
            signal: self.signal.clone(),
            cause: self.cause.clone(),
            labels,
        }
    }

    /// The URL's parameters (baseline and search included when `full`).
    pub fn pairs(&self, full: bool) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = [
            ("service", &self.service),
            ("host", &self.host),
            ("signal", &self.signal),
            ("cause", &self.cause),
            ("process", &self.process),
            ("thread", &self.thread),
            ("pid", &self.pid),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect();
        pairs.extend(self.labels.iter().map(|l| ("label".to_owned(), l.clone())));
        pairs.push(("from".to_owned(), format_time(self.range.from_ns)));
        pairs.push(("until".to_owned(), format_time(self.range.until_ns)));
        if full {
            pairs.extend(self.baseline.iter().map(|b| ("base".to_owned(), b.text())));
            if !self.search.is_empty() {
                pairs.push(("q".to_owned(), self.search.clone()));
            }
        }
        pairs
    }

    pub fn href(&self, path: &str, full: bool, extra: &[(&str, &str)]) -> String {
        let pairs = self.pairs(full);
        let mut all: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        all.extend_from_slice(extra);
        href(path, &all)
    }

    /// What the graph shows, in a few words.
    fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        for (key, value) in [
            ("service", &self.service),
            ("host", &self.host),
            ("signal", &self.signal),
            ("cause", &self.cause),
            ("process", &self.process),
            ("thread", &self.thread),
            ("pid", &self.pid),
        ] {
            if !value.is_empty() {
                parts.push(format!("{key}={value}"));
            }
        }
        parts.extend(self.labels.iter().cloned());
        if parts.is_empty() {
            "everything".to_owned()
        } else {
            parts.join(" ")
        }
    }
}

/// One range's profile through the query API.
pub async fn fetch<S: Storage>(
    state: &UiState<S>,
    caller: &Caller,
    range: Range,
    filter: v1::Filter,
) -> Result<Profile, Response> {
    let reply = state
        .query
        .profile(request(
            caller,
            v1::ProfileRequest {
                range: Some(range.proto()),
                filter: Some(filter),
            },
        ))
        .await
        .map_err(|status| status_page(&status))?
        .into_inner();
    decode_pprof_with_limit(&reply.pprof, MAX_PROFILE_BYTES).map_err(|err| {
        super::error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the query API sent a profile that does not decode: {err}"),
        )
    })
}

/// The flame graph of `query` (differential when it has a baseline), with a line of totals.
pub async fn graph<S: Storage>(
    state: &UiState<S>,
    caller: &Caller,
    query: &FlameQuery,
) -> Result<(Markup, Profile), Response> {
    let profile = fetch(state, caller, query.range, query.filter()).await?;
    let view = FlameView::default();
    let render_error = |err: stallscope_profile::FormatError| {
        super::error_page(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string())
    };
    let stacks = folded_stacks(&profile.time_only(), 0, &view).map_err(render_error)?;
    let mut baseline_note = None;
    let flame = if query.baseline.is_empty() {
        Flame::build(&stacks, None)
    } else {
        let mut merged = Profile::default();
        let mut seconds = 0.0;
        for range in &query.baseline {
            let part = fetch(state, caller, *range, query.filter()).await?;
            seconds += range.seconds();
            if merged.sample_types.is_empty() {
                merged = part;
            } else {
                merged.merge(&part);
            }
        }
        let factor = query.range.seconds() / seconds.max(1e-9);
        let base_stacks = folded_stacks(&merged.time_only(), 0, &view).map_err(render_error)?;
        let base_total: u64 = base_stacks.iter().map(|(_, v)| v).sum();
        baseline_note = Some((base_total as f64 * factor, factor));
        Flame::build(&stacks, Some((&base_stacks, factor)))
    };
    let total = flame.total();
    let seconds = query.range.seconds();
    let markup = html! {
        p.totals {
            strong { (human_total(total as f64)) } " of wait and CPU time, "
            (format!("{:.3}", total as f64 / 1e9 / seconds.max(1e-9))) " s/s over " (human_time(query.range.from_ns)) " – " (human_time(query.range.until_ns))
            " (" (profile.samples.len()) " stacks with labels)"
            @if let Some((base, factor)) = baseline_note {
                br;
                "Baseline (" (query.baseline.len()) " period(s), scaled ×" (format!("{factor:.3}")) " to the window's length): " (human_total(base))
                ". Width: the window's time; " span.grew { "red: grew" } ", " span.shrank { "blue: shrank" } "."
            }
        }
        div.flame-tools {
            label for="flame-search" { "Search" }
            input #flame-search type="search" value=(query.search) placeholder="function or regex" autocomplete="off";
            button #flame-reset type="button" { "Reset zoom" }
            span #flame-matched {}
        }
        (flame.svg())
        p #flame-details.details { "Click a frame to zoom in; hover for its time." }
    };
    Ok((markup, profile))
}

/// Label values seen in the profile, most time first, for the filter form's suggestions.
fn seen(profile: &Profile, key: &str) -> Vec<String> {
    let mut totals: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    let time = profile.time_only();
    for sample in &time.samples {
        if let Some(value) = sample.labels.get(key) {
            *totals.entry(value.as_str()).or_default() +=
                sample.values.first().copied().unwrap_or(0);
        }
    }
    let mut values: Vec<(&str, i64)> = totals.into_iter().collect();
    values.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    values
        .into_iter()
        .take(200)
        .map(|(v, _)| v.to_owned())
        .collect()
}

fn filter_form(query: &FlameQuery, profile: &Profile) -> Markup {
    let processes = seen(profile, "process");
    let threads = seen(profile, "thread");
    html! {
        form.filters method="get" action="/flame" {
            label { "Service " input type="text" name="service" value=(query.service); }
            label { "Host " input type="text" name="host" value=(query.host); }
            label { "From " input type="text" name="from" value=(format_time(query.range.from_ns)) size="20"; }
            label { "Until " input type="text" name="until" value=(format_time(query.range.until_ns)) size="20"; }
            label { "Signal "
                select name="signal" {
                    option value="" { "any" }
                    @for signal in SIGNALS {
                        option value=(signal) selected[query.signal == signal] { (signal) }
                    }
                }
            }
            label { "Cause "
                select name="cause" {
                    option value="" { "any" }
                    @for cause in CATEGORIES {
                        option value=(cause) selected[query.cause == cause] { (cause) }
                    }
                }
            }
            label { "Process " input type="text" name="process" value=(query.process) list="processes"; }
            datalist #processes { @for p in &processes { option value=(p) {} } }
            label { "Thread " input type="text" name="thread" value=(query.thread) list="threads"; }
            datalist #threads { @for t in &threads { option value=(t) {} } }
            label { "PID " input type="text" name="pid" value=(query.pid) size="8"; }
            @for l in &query.labels {
                label { "Label " input type="text" name="label" value=(l) placeholder="key=value"; }
            }
            label { "Label " input type="text" name="label" value="" placeholder="key=value"; }
            @for b in &query.baseline {
                label { "Baseline " input type="text" name="base" value=(b.text()) size="42"; }
            }
            button type="submit" { "Apply" }
        }
    }
}

fn downloads(query: &FlameQuery) -> Markup {
    html! {
        p.downloads {
            "Download: "
            @for (format, label) in [("pprof", "pprof"), ("folded", "folded"), ("svg", "SVG"), ("speedscope", "speedscope")] {
                a.download href=(query.href("/flame/download", false, &[("format", format)])) download { (label) }
                " "
            }
        }
    }
}

/// `GET /flame`.
pub async fn page<S: Storage>(State(state): State<Arc<UiState<S>>>, request: Request) -> Response {
    let Some(caller) = request.extensions().get::<Caller>().cloned() else {
        return super::error_page(StatusCode::UNAUTHORIZED, "sign in first");
    };
    let params = Params::parse(request.uri().query());
    let query = match FlameQuery::parse(&params, crate::unix_now_ns()) {
        Ok(query) => query,
        Err(message) => return bad_request(&message),
    };
    let (graph, profile) = match graph(&state, &caller, &query).await {
        Ok(graph) => graph,
        Err(response) => return response,
    };
    let before = Range {
        from_ns: 2 * query.range.from_ns - query.range.until_ns,
        until_ns: query.range.from_ns,
    };
    let compare = FlameQuery {
        baseline: vec![before],
        ..query.clone()
    };
    let service_link = (!query.service.is_empty()).then(|| {
        href(
            "/service",
            &[
                ("service", query.service.as_str()),
                ("host", query.host.as_str()),
                ("from", &format_time(query.range.from_ns)),
                ("until", &format_time(query.range.until_ns)),
            ],
        )
    });
    let title = if query.baseline.is_empty() {
        "Flame graph"
    } else {
        "Differential flame graph"
    };
    let body = html! {
        h1 { (title) }
        p.scope { (query.describe()) }
        (filter_form(&query, &profile))
        p.actions {
            @if query.baseline.is_empty() {
                a href=(compare.href("/flame", true, &[])) { "Compare with the " (params::human_span((query.range.until_ns - query.range.from_ns) / 1_000_000_000)) " before" }
            } @else {
                a href=(query.href("/flame", false, &[])) { "Without the baseline" }
            }
            @if let Some(link) = &service_link {
                " · " a href=(link) { "Timeline of " (query.service) }
            }
        }
        (downloads(&query))
        (graph)
    };
    layout(title, Section::Flame, &body).into_response()
}

/// `GET /flame/download?...&format=pprof|folded|svg|speedscope`.
pub async fn download<S: Storage>(
    State(state): State<Arc<UiState<S>>>,
    request: Request,
) -> Response {
    let Some(caller) = request.extensions().get::<Caller>().cloned() else {
        return (StatusCode::UNAUTHORIZED, "sign in first\n").into_response();
    };
    let params = Params::parse(request.uri().query());
    let query = match FlameQuery::parse(&params, crate::unix_now_ns()) {
        Ok(query) => query,
        Err(message) => return (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response(),
    };
    let (format, content_type) = match params.get("format").unwrap_or("pprof") {
        "pprof" => (OutputFormat::Pprof, "application/octet-stream"),
        "folded" => (OutputFormat::Folded, "text/plain; charset=utf-8"),
        "svg" => (OutputFormat::Svg, "image/svg+xml"),
        "speedscope" => (OutputFormat::Speedscope, "application/json"),
        other => {
            return (
                StatusCode::BAD_REQUEST,
                format!("format `{other}`: use pprof, folded, svg or speedscope\n"),
            )
                .into_response();
        }
    };
    let profile = match fetch(&state, &caller, query.range, query.filter()).await {
        Ok(profile) => profile,
        Err(response) => return response,
    };
    let title = format!(
        "stallscope: {} from {} to {}",
        query.describe(),
        format_time(query.range.from_ns),
        format_time(query.range.until_ns)
    );
    let mut bytes = Vec::new();
    let view = FlameView::default();
    // As `stallscope flame` writes files: pprof keeps every column, the others show time.
    let written = if format == OutputFormat::Pprof {
        write_profile(format, &profile, 0, &view, &title, &mut bytes)
    } else {
        write_profile(format, &profile.time_only(), 0, &view, &title, &mut bytes)
    };
    if let Err(err) = written {
        return super::error_page(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string());
    }
    let name: String = format!(
        "stallscope-{}-{}",
        if query.service.is_empty() {
            "all"
        } else {
            &query.service
        },
        format_time(query.range.from_ns)
    )
    .chars()
    .map(|c| {
        if c.is_ascii_alphanumeric() || c == '-' {
            c
        } else {
            '_'
        }
    })
    .take(100)
    .collect();
    let mut response = (StatusCode::OK, bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(value) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{name}{}\"",
        format.extension()
    )) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}
