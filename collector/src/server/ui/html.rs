//! The page frame (head, navigation, sign-out) and the small pieces every page uses:
//! rates, the range picker, category colours and names. Markup is built with `maud`,
//! which escapes every interpolated value: data from agents (process, thread, service
//! and function names, labels) can only ever show as text.

use maud::{DOCTYPE, Markup, html};

use super::params::{Range, format_time, href, human_span, human_time};

/// The categories in stacking order (bottom first), `why`'s order, then idle.
pub const CATEGORIES: [&str; 6] = [
    "cpu-work",
    "cpu-contention",
    "lock",
    "disk",
    "network",
    "other",
];
pub const IDLE: &str = crate::server::series::IDLE_KEY;

/// What a category means, for legends and tooltips.
pub fn category_title(category: &str) -> &'static str {
    match category {
        "cpu-work" => "on CPU",
        "cpu-contention" => "runnable, waiting for a CPU",
        "lock" => "waiting for a lock",
        "disk" => "waiting for disk or file I/O",
        "network" => "a client waiting for a peer",
        "other" => "sleeps, timers, pipes, children",
        IDLE => "servers waiting for requests, parked pools: never a cause",
        _ => "",
    }
}

/// Wait per second of wall time, as `why` prints it: seconds of waiting per second, the
/// average number of threads waiting.
pub fn rate(ns_per_s: f64) -> String {
    // `+ 0.0` turns a negative zero (an empty float sum) into zero.
    format!("{:.3} s/s", ns_per_s / 1e9 + 0.0)
}

pub fn signed_rate(ns_per_s: f64) -> String {
    let value = ns_per_s / 1e9 + 0.0;
    format!("{}{value:.3} s/s", if value >= 0.0 { "+" } else { "" })
}

/// Nanoseconds for people (`1.2 ms`).
pub fn human_ns(ns: f64) -> String {
    crate::explain::objects::human_ns(ns)
}

/// A total of wait time (`3.42 s`, `12 min`).
pub fn human_total(ns: f64) -> String {
    let s = ns / 1e9;
    if s >= 3600.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s >= 120.0 {
        format!("{:.1} min", s / 60.0)
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        human_ns(ns)
    }
}

/// Which section of the navigation a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Services,
    Flame,
    Other,
}

/// The whole page around `body`.
pub fn layout(title: &str, section: Section, body: &Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · stallscope" }
                link rel="stylesheet" href=(super::assets::CSS_PATH);
                link rel="icon" href=(super::assets::ICON_PATH) type="image/svg+xml";
                script src=(super::assets::JS_PATH) defer {}
            }
            body {
                header.top {
                    a.brand href="/services" { "stallscope" }
                    nav {
                        a href="/services" class=[(section == Section::Services).then_some("current")] { "Services" }
                        a href="/flame" class=[(section == Section::Flame).then_some("current")] { "Flame graph" }
                    }
                    form.signout method="post" action="/logout" {
                        button type="submit" { "Sign out" }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The quick ranges and the from/until form of a page at `path` with `keep` parameters.
pub fn range_picker(path: &str, keep: &[(&str, &str)], range: Range) -> Markup {
    let quick: [(&str, &str); 6] = [
        ("15 min", "now-15m"),
        ("1 h", "now-1h"),
        ("6 h", "now-6h"),
        ("24 h", "now-24h"),
        ("3 d", "now-3d"),
        ("7 d", "now-7d"),
    ];
    let with = |from: &str, until: &str| {
        let mut pairs: Vec<(&str, &str)> = keep.to_vec();
        pairs.push(("from", from));
        pairs.push(("until", until));
        href(path, &pairs)
    };
    let earlier = Range {
        from_ns: range.from_ns - (range.until_ns - range.from_ns),
        until_ns: range.from_ns,
    };
    let later = Range {
        from_ns: range.until_ns,
        until_ns: range.until_ns + (range.until_ns - range.from_ns),
    };
    html! {
        div.range {
            span.now { (human_time(range.from_ns)) " – " (human_time(range.until_ns)) " (" (human_span((range.until_ns - range.from_ns) / 1_000_000_000)) ")" }
            a.step href=(with(&format_time(earlier.from_ns), &format_time(earlier.until_ns))) title="the period before" { "◀" }
            a.step href=(with(&format_time(later.from_ns), &format_time(later.until_ns))) title="the period after" { "▶" }
            @for (label, from) in quick {
                a.quick href=(with(from, "now")) { (label) }
            }
            form.custom method="get" action=(path) {
                @for (key, value) in keep {
                    @if !value.is_empty() {
                        input type="hidden" name=(key) value=(value);
                    }
                }
                input type="text" name="from" value=(format_time(range.from_ns)) aria-label="from" size="20";
                input type="text" name="until" value=(format_time(range.until_ns)) aria-label="until" size="20";
                button type="submit" { "Show" }
            }
        }
    }
}

/// The colour legend of the category charts.
pub fn legend(show_idle: bool) -> Markup {
    html! {
        ul.legend {
            @for category in CATEGORIES {
                li title=(category_title(category)) { span class={"swatch c-" (category)} {} (category) }
            }
            @if show_idle {
                li title=(category_title(IDLE)) { span class={"swatch c-" (IDLE)} {} (IDLE) }
            }
        }
    }
}
