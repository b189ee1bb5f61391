//! `/windows/{id}`: a window and its `why` report (the query API's `Explain`, as the CLI
//! prints it): the answer, the baseline it was compared with, every cause category with
//! its change, share and significance, the evidence under each ranked cause (locks,
//! peers, devices, processes, code paths, builds), change events, what weakens the
//! answer; with links to the flame graphs behind each cause and piece of evidence.

use std::sync::Arc;

use axum::{
    extract::{Path, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use maud::{Markup, html};
use stallscope_proto::v1::{self, query_server::Query as _};

use super::{request, status_page};
use crate::{
    server::ui::{
        UiState,
        auth::Caller,
        html::{Section, category_title, human_ns, layout, rate, signed_rate},
        params::{Range, format_time, href, human_span, human_time},
    },
    storage::Storage,
    windows::valid_id,
};

/// `GET /windows/{id}`.
pub async fn page<S: Storage>(
    State(state): State<Arc<UiState<S>>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let Some(caller) = request.extensions().get::<Caller>().cloned() else {
        return super::error_page(StatusCode::UNAUTHORIZED, "sign in first");
    };
    if let Err(message) = valid_id(&id) {
        return super::bad_request(&message);
    }
    match render(&state, &caller, &id).await {
        Ok(markup) => markup.into_response(),
        Err(status) => status_page(&status),
    }
}

async fn render<S: Storage>(
    state: &UiState<S>,
    caller: &Caller,
    id: &str,
) -> Result<Markup, tonic::Status> {
    let window = state
        .query
        .get_window(request(caller, v1::GetWindowRequest { id: id.to_owned() }))
        .await?
        .into_inner()
        .window
        .unwrap_or_default();
    let report = state
        .query
        .explain(request(
            caller,
            v1::ExplainRequest {
                window_id: id.to_owned(),
                ..v1::ExplainRequest::default()
            },
        ))
        .await?
        .into_inner();
    let body = html! {
        h1 { "Window " span.mono { (window.id) } }
        (window_facts(&window))
        (report_markup(&report))
    };
    Ok(layout(&format!("Window {id}"), Section::Services, &body))
}

fn scope_links(host: &str, service: &str, range: Range) -> Markup {
    let around = Range {
        from_ns: range.from_ns - (range.until_ns - range.from_ns).max(900_000_000_000),
        until_ns: (range.until_ns + (range.until_ns - range.from_ns).max(900_000_000_000))
            .min(crate::unix_now_ns()),
    };
    let timeline = href(
        "/service",
        &[
            ("service", service),
            ("host", host),
            ("from", &format_time(around.from_ns)),
            ("until", &format_time(around.until_ns.max(range.until_ns))),
            ("sel_from", &format_time(range.from_ns)),
            ("sel_until", &format_time(range.until_ns)),
        ],
    );
    html! {
        @if !service.is_empty() || !host.is_empty() {
            a.timeline-link href=(timeline) { "Timeline around the window" }
        }
    }
}

fn window_facts(w: &v1::Window) -> Markup {
    let until = if w.until_unix_ns == 0 {
        crate::unix_now_ns()
    } else {
        w.until_unix_ns
    };
    let range = Range {
        from_ns: w.from_unix_ns,
        until_ns: until.max(w.from_unix_ns + 1_000_000_000),
    };
    html! {
        table.facts {
            tr { th { "Scope" } td {
                (if w.service.is_empty() { "every service" } else { &w.service })
                (if w.host.is_empty() { String::new() } else { format!(" on {}", w.host) })
                " · " (scope_links(&w.host, &w.service, range))
            } }
            tr { th { "Source" } td { span class={"badge src-" (w.source)} { (w.source) } } }
            tr { th { "Onset" } td { (human_time(w.from_unix_ns)) } }
            tr { th { "End" } td {
                @if w.until_unix_ns == 0 { span.badge.open { "open" } " (so far " (human_span((until - w.from_unix_ns) / 1_000_000_000)) ")" }
                @else { (human_time(w.until_unix_ns)) " (" (human_span((w.until_unix_ns - w.from_unix_ns) / 1_000_000_000)) ")" }
            } }
            @if !w.top_cause.is_empty() { tr { th { "Top cause (stored)" } td { (w.top_cause) } } }
            @if !w.note.is_empty() { tr { th { "Note" } td { (w.note) } } }
            @if !w.indicators.is_empty() {
                tr { th { "Indicators" } td {
                    ul.indicators {
                        @for i in &w.indicators {
                            li { span.mono { (i.name) } ": " (format!("{:.4}", i.observed)) " against a normal " (format!("{:.4}", i.baseline)) " (z " (format!("{:.1}", i.score)) ")" }
                        }
                    }
                } }
            }
            @if let Some(alert) = &w.alert {
                tr { th { "Alert" } td {
                    ul.labels {
                        @for l in &alert.labels { li { span.mono { (l.key) "=" (l.value) } } }
                        @for a in &alert.annotations { li { (a.key) ": " (a.value) } }
                    }
                } }
            }
        }
    }
}

fn q_text(q: f64) -> String {
    if q < 0.001 {
        "<0.001".to_owned()
    } else {
        format!("{q:.3}")
    }
}

fn per_event(window: Option<f64>, baseline: Option<f64>) -> String {
    match (window, baseline) {
        (Some(w), Some(b)) => format!("{} / {}", human_ns(w), human_ns(b)),
        (Some(w), None) => format!("{} / -", human_ns(w)),
        (None, Some(b)) => format!("- / {}", human_ns(b)),
        (None, None) => String::new(),
    }
}

/// The report's flame graph links: the cause in the window, and against the baseline.
struct Links {
    host: String,
    service: String,
    window: Range,
    baseline: Vec<Range>,
}

impl Links {
    fn flame(&self, pairs: &[(&str, &str)], compare: bool) -> String {
        let from = format_time(self.window.from_ns);
        let until = format_time(self.window.until_ns);
        let bases: Vec<String> = if compare {
            self.baseline.iter().map(Range::text).collect()
        } else {
            Vec::new()
        };
        let mut all: Vec<(&str, &str)> = vec![
            ("service", &self.service),
            ("host", &self.host),
            ("from", &from),
            ("until", &until),
        ];
        all.extend_from_slice(pairs);
        all.extend(bases.iter().map(|b| ("base", b.as_str())));
        href("/flame", &all)
    }

    /// Where a piece of evidence can be seen in a flame graph.
    fn evidence(&self, category: &str, e: &v1::ExplainEvidence) -> Option<String> {
        let first = |text: &str| text.split(" <- ").next().unwrap_or(text).trim().to_owned();
        Some(match e.kind.as_str() {
            "lock" => match e.name.split_once(' ') {
                Some(("futex" | "futex-pi", address)) => self.flame(
                    &[("signal", "lock"), ("label", &format!("lock={address}"))],
                    true,
                ),
                _ => self.flame(&[("signal", "lock")], true),
            },
            "peer" => self.flame(
                &[
                    ("signal", "socket-wait"),
                    ("label", &format!("peer={}", e.name)),
                ],
                true,
            ),
            "retransmits" => self.flame(
                &[("signal", "tcp"), ("label", &format!("peer={}", e.name))],
                true,
            ),
            "device" => self.flame(
                &[("signal", "disk"), ("label", &format!("device={}", e.name))],
                true,
            ),
            "process" => {
                let pid = e
                    .name
                    .rsplit_once("(pid ")?
                    .1
                    .trim_end_matches(')')
                    .to_owned();
                let from = format_time(self.window.from_ns);
                let until = format_time(self.window.until_ns);
                href(
                    "/flame",
                    &[
                        ("host", &self.host),
                        ("from", &from),
                        ("until", &until),
                        ("signal", "on-cpu"),
                        ("pid", &pid),
                    ],
                )
            }
            "function" | "stack" | "syscall" => {
                self.flame(&[("cause", category), ("q", &first(&e.name))], true)
            }
            _ => return None,
        })
    }
}

fn report_markup(r: &v1::ExplainResponse) -> Markup {
    let window = r.window.map_or(
        Range {
            from_ns: 0,
            until_ns: 1,
        },
        |w| Range {
            from_ns: w.from_unix_ns,
            until_ns: w.until_unix_ns,
        },
    );
    let links = Links {
        host: r.host.clone(),
        service: r.service.clone(),
        window,
        baseline: r
            .baseline
            .iter()
            .filter_map(|p| p.span)
            .map(|s| Range {
                from_ns: s.from_unix_ns,
                until_ns: s.until_unix_ns,
            })
            .collect(),
    };
    let answered = !matches!(r.verdict.as_str(), "no-data" | "not-enough-baseline");
    html! {
        section.report {
            h2 { "Why: what was different from normal" }
            p class={"answer verdict-" (r.verdict)} { strong #verdict { (r.verdict) } ": " span #summary { (r.summary) } }
            @if answered {
                p.baseline {
                    "Compared " (r.window_buckets) " buckets of " (r.bucket_ns / 1_000_000_000) " s in the window with " (r.baseline_buckets) " baseline buckets in " (r.baseline.len()) " period(s): "
                    @for (i, p) in r.baseline.iter().enumerate() {
                        @if i > 0 { ", " }
                        @if let Some(span) = p.span { (p.kind) " " (human_time(span.from_unix_ns)) " – " (human_time(span.until_unix_ns)) }
                    }
                }
                (causes_table(r, &links))
                @for c in r.causes.iter().filter(|c| c.rank > 0) {
                    (cause_section(c, &links))
                }
            }
            @if !r.events.is_empty() {
                h3 { "Changes near the window" }
                ul.events {
                    @for e in &r.events {
                        li {
                            (human_time(e.time_unix_ns)) " " strong { (e.kind) } " " (e.service)
                            @if !e.build_id.is_empty() {
                                " (build " @if !e.previous_build_id.is_empty() { span.mono { (e.previous_build_id) } " → " } span.mono { (e.build_id) } ")"
                            }
                            ": " (e.detail)
                        }
                    }
                }
            }
            @if !r.weaknesses.is_empty() {
                h3 { "What weakens this answer" }
                ul.weaknesses { @for w in &r.weaknesses { li { (w) } } }
            }
        }
    }
}

fn causes_table(r: &v1::ExplainResponse, links: &Links) -> Markup {
    html! {
        table.causes {
            thead { tr {
                th { "#" } th { "Cause" } th.num { "Window" } th.num { "Baseline" } th.num { "Change" }
                th.num { "Per wait (window / baseline)" } th { "Share of the change" } th.num { "q" } th { "Flame graphs" }
            } }
            tbody {
                @for c in &r.causes {
                    tr class={"cause" @if c.rank > 0 { " ranked" } @if c.significant { " significant" }} data-category=(c.category) data-rank=(c.rank) {
                        td.rank { @if c.rank > 0 { (c.rank) } }
                        td.category title=(category_title(&c.category)) { span class={"swatch c-" (c.category)} {} (c.category) }
                        td.num { (rate(c.window_ns_per_s)) }
                        td.num { (rate(c.baseline_ns_per_s)) }
                        td.num { (signed_rate(c.change_ns_per_s)) }
                        td.num { (per_event(c.window_ns_per_event, c.baseline_ns_per_event)) }
                        td.share {
                            @if c.rank > 0 {
                                meter min="0" max="1" value=(format!("{:.3}", c.share)) {}
                                " " (format!("{:.0}%", c.share * 100.0))
                            }
                        }
                        td.num { (q_text(c.q_value)) }
                        td.links {
                            a href=(links.flame(&[("cause", &c.category)], false)) { "window" }
                            " · "
                            a.diff href=(links.flame(&[("cause", &c.category)], true)) { "vs baseline" }
                        }
                    }
                }
                tr.idle {
                    td {} td title=(category_title("idle")) { span class="swatch c-idle" {} "idle" }
                    td.num { (rate(r.idle_window_ns_per_s)) }
                    td.num { (rate(r.idle_baseline_ns_per_s)) }
                    td.num { (signed_rate(r.idle_window_ns_per_s - r.idle_baseline_ns_per_s)) }
                    td colspan="4" { "servers waiting for requests, parked pools: never a cause" }
                }
            }
        }
        p.hint { "s/s: seconds of waiting per second of wall time (the average number of threads waiting). q: the false-discovery-adjusted p-value of the rise against the baseline's own variation." }
    }
}

fn cause_section(c: &v1::ExplainCause, links: &Links) -> Markup {
    html! {
        section.cause-detail data-category=(c.category) {
            h3 { (c.rank) " " (c.category) " " span.sub { (signed_rate(c.change_ns_per_s)) ", " (format!("{:.0}%", c.share * 100.0)) " of the change" } }
            p.actions {
                a href=(links.flame(&[("cause", &c.category)], false)) { "Flame graph of " (c.category) " in the window" }
                " · "
                a.diff href=(links.flame(&[("cause", &c.category)], true)) { "Differential against the baseline" }
            }
            @if c.evidence.is_empty() {
                p.empty { "No object stood out." }
            } @else {
                table.evidence {
                    thead { tr { th { "Kind" } th { "What" } th.num { "Change" } th.num { "Window" } th.num { "Baseline" } th.num { "Per event" } th.num { "q" } th {} } }
                    tbody {
                        @for e in &c.evidence {
                            tr {
                                td { (e.kind) }
                                td.mono {
                                    (e.name) @if e.new { " " span.badge.new { "new" } }
                                    @if !e.details.is_empty() {
                                        ul.details { @for d in &e.details { li { (d) } } }
                                    }
                                }
                                td.num { @if e.window_ns_per_s != 0.0 || e.baseline_ns_per_s != 0.0 { (signed_rate(e.window_ns_per_s - e.baseline_ns_per_s)) } }
                                td.num { @if e.window_ns_per_s != 0.0 { (rate(e.window_ns_per_s)) } }
                                td.num { @if e.baseline_ns_per_s != 0.0 { (rate(e.baseline_ns_per_s)) } }
                                td.num { (per_event(e.window_ns_per_event, e.baseline_ns_per_event)) }
                                td.num { @if let Some(q) = e.q_value { (q_text(q)) } }
                                td { @if let Some(link) = links.evidence(&c.category, e) { a href=(link) { "flame graph" } } }
                            }
                        }
                    }
                }
            }
        }
    }
}
