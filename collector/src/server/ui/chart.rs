//! Stacked wait-time charts as SVG: the services page's small ones and a service's
//! timeline, with windows shaded and the selected range marked. One bar per bucket with
//! data (a bucket without data is a gap, not a zero), the categories stacked in `why`'s
//! order, heights in seconds of waiting per second of wall time.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use maud::{Markup, html};
use stallscope_proto::v1;

use super::{
    html::{CATEGORIES, IDLE, rate},
    params::{Range, format_time},
};

const NS: f64 = 1e9;

/// Category lines of one scope, bucket by bucket.
#[derive(Debug, Clone)]
pub struct Stacked {
    pub from_s: i64,
    pub until_s: i64,
    pub step_s: i64,
    /// (category, bucket start in Unix seconds -> wait ns in the bucket), stacking order.
    layers: Vec<(&'static str, BTreeMap<i64, f64>)>,
    idle: BTreeMap<i64, f64>,
    /// Buckets in which the scope had data.
    buckets: BTreeSet<i64>,
}

impl Stacked {
    /// From the `Series` answer's category lines of one scope.
    pub fn from_lines<'a>(
        lines: impl IntoIterator<Item = &'a v1::SeriesLine>,
        step_s: i64,
        range: Range,
    ) -> Self {
        let mut by_key: BTreeMap<&str, BTreeMap<i64, f64>> = BTreeMap::new();
        let mut buckets = BTreeSet::new();
        for line in lines {
            let values = by_key.entry(line.key.as_str()).or_default();
            for point in &line.points {
                let bucket = point.unix_ns.div_euclid(1_000_000_000);
                buckets.insert(bucket);
                *values.entry(bucket).or_default() += point.value as f64;
            }
        }
        Self {
            from_s: range.from_ns.div_euclid(1_000_000_000),
            until_s: range.until_ns.div_euclid(1_000_000_000),
            step_s: step_s.max(1),
            layers: CATEGORIES
                .iter()
                .map(|&c| (c, by_key.remove(c).unwrap_or_default()))
                .collect(),
            idle: by_key.remove(IDLE).unwrap_or_default(),
            buckets,
        }
    }

    pub fn has_data(&self) -> bool {
        !self.buckets.is_empty()
    }

    /// Seconds of wall time the buckets with data cover.
    fn seconds(&self) -> f64 {
        (self.buckets.len() as i64 * self.step_s) as f64
    }

    /// A category's mean wait per second over the buckets with data (ns/s).
    pub fn mean(&self, category: &str) -> f64 {
        let values = if category == IDLE {
            Some(&self.idle)
        } else {
            self.layers
                .iter()
                .find(|(c, _)| *c == category)
                .map(|(_, v)| v)
        };
        let total: f64 = values.map_or(0.0, |v| v.values().sum());
        if self.seconds() > 0.0 {
            total / self.seconds()
        } else {
            0.0
        }
    }

    /// Every category's mean added up: request-path waits and CPU, idle left out.
    pub fn mean_total(&self) -> f64 {
        CATEGORIES.iter().map(|c| self.mean(c)).sum()
    }

    /// Per bucket, the stacked rates (ns/s) from the bottom, with idle on top if asked.
    fn columns(&self, with_idle: bool) -> Vec<(i64, Vec<(&'static str, f64)>)> {
        let step = self.step_s as f64;
        self.buckets
            .iter()
            .map(|&bucket| {
                let mut column: Vec<(&'static str, f64)> = self
                    .layers
                    .iter()
                    .map(|(c, v)| (*c, v.get(&bucket).copied().unwrap_or(0.0) / step))
                    .collect();
                if with_idle {
                    column.push((IDLE, self.idle.get(&bucket).copied().unwrap_or(0.0) / step));
                }
                (bucket, column)
            })
            .collect()
    }

    fn peak(columns: &[(i64, Vec<(&'static str, f64)>)]) -> f64 {
        columns
            .iter()
            .map(|(_, c)| c.iter().map(|(_, v)| v).sum::<f64>())
            .fold(0.0, f64::max)
    }
}

/// One path per category: a rectangle per bucket, `x` and `height` mapped by the caller.
fn bar_paths(
    columns: &[(i64, Vec<(&'static str, f64)>)],
    x: impl Fn(i64) -> f64,
    width: f64,
    y_of: impl Fn(f64) -> f64,
) -> Vec<(&'static str, String)> {
    let mut paths: BTreeMap<&'static str, String> = BTreeMap::new();
    for (bucket, column) in columns {
        let left = x(*bucket);
        let mut stacked = 0.0;
        for &(category, value) in column {
            if value <= 0.0 {
                continue;
            }
            let (bottom, top) = (y_of(stacked), y_of(stacked + value));
            stacked += value;
            let path = paths.entry(category).or_default();
            let _ = write!(
                path,
                "M{left:.2} {bottom:.2}V{top:.2}h{width:.2}V{bottom:.2}z"
            );
        }
    }
    CATEGORIES
        .iter()
        .copied()
        .chain([IDLE])
        .filter_map(|c| paths.remove(c).map(|d| (c, d)))
        .collect()
}

/// The services page's chart: 240 x 36, its own vertical scale (the peak is printed
/// beside it).
pub fn small(stacked: &Stacked) -> Markup {
    const W: f64 = 240.0;
    const H: f64 = 36.0;
    let columns = stacked.columns(false);
    let peak = Stacked::peak(&columns).max(1.0);
    let span = (stacked.until_s - stacked.from_s).max(1) as f64;
    let x = |bucket: i64| (bucket - stacked.from_s) as f64 / span * W;
    let width = (stacked.step_s as f64 / span * W).max(0.5);
    let paths = bar_paths(&columns, x, width, |v| H - v / peak * H);
    html! {
        svg.spark viewBox={"0 0 " (W) " " (H)} preserveAspectRatio="none" role="img" aria-label="wait time by cause" {
            rect.frame x="0" y="0" width=(W) height=(H) {}
            @for (category, d) in &paths {
                path class={"c-" (category)} d=(d) {}
            }
        }
    }
}

/// A window drawn on the timeline.
#[derive(Debug, Clone)]
pub struct WindowMark {
    pub id: String,
    pub source: String,
    pub from_ns: i64,
    /// `None` while open (drawn to the end of the range).
    pub until_ns: Option<i64>,
    pub title: String,
}

/// What the timeline marks besides the bars.
#[derive(Debug, Clone, Default)]
pub struct Marks {
    pub windows: Vec<WindowMark>,
    pub selection: Option<Range>,
    pub baseline: Option<Range>,
}

/// A tick step that gives at most about `count` ticks over `span` (from `candidates`).
fn tick_step(span: f64, count: f64, candidates: &[f64]) -> f64 {
    candidates
        .iter()
        .copied()
        .find(|step| span / step <= count)
        .unwrap_or_else(|| candidates.last().copied().unwrap_or(1.0))
}

/// A "nice" vertical scale maximum and tick step for values up to `peak`.
fn nice_scale(peak: f64) -> (f64, f64) {
    let peak = peak.max(1e-3);
    let magnitude = 10f64.powf(peak.log10().floor());
    let step = [0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|step| peak / step <= 4.0)
        .unwrap_or(magnitude * 10.0);
    ((peak / step).ceil() * step, step)
}

fn clock(unix_s: i64, with_date: bool, with_seconds: bool) -> String {
    let text = format_time(unix_s * 1_000_000_000);
    // 2026-12-06T14:02:05Z
    let date = text.get(5..10).unwrap_or_default();
    let time = if with_seconds {
        text.get(11..19)
    } else {
        text.get(11..16)
    }
    .unwrap_or_default();
    if with_date {
        format!("{date} {time}")
    } else {
        time.to_owned()
    }
}

/// A service's timeline: 1000 x 260, windows as shaded spans with a tab naming their
/// source (a link to the window), a hover column per bucket, the selection marked; the
/// script turns a drag over the plot into `href` plus `sel_from`/`sel_until`.
pub fn timeline(stacked: &Stacked, marks: &Marks, show_idle: bool, href: &str) -> Markup {
    const W: f64 = 1000.0;
    const H: f64 = 260.0;
    const LEFT: f64 = 58.0;
    const RIGHT: f64 = 10.0;
    const TOP: f64 = 20.0;
    const BOTTOM: f64 = 22.0;
    /// Wide enough for the longest source name.
    const TAB_MIN: f64 = 84.0;
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let columns = stacked.columns(show_idle);
    let (top_value, tick) = nice_scale(Stacked::peak(&columns) / NS);
    let span = (stacked.until_s - stacked.from_s).max(1) as f64;
    let x = |unix_s: f64| LEFT + (unix_s - stacked.from_s as f64) / span * plot_w;
    let x_ns = |ns: i64| x(ns as f64 / NS).clamp(LEFT, LEFT + plot_w);
    let y = |ns_per_s: f64| TOP + plot_h - ns_per_s / NS / top_value * plot_h;
    let width = (stacked.step_s as f64 / span * plot_w).max(0.5);
    let paths = bar_paths(&columns, |b| x(b as f64), width, y);
    let y_ticks: Vec<f64> = (0..=((top_value / tick).round() as i64))
        .map(|i| i as f64 * tick)
        .collect();
    let x_step = tick_step(
        span,
        8.0,
        &[
            10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 10800.0, 21600.0,
            43200.0, 86400.0, 172_800.0, 604_800.0,
        ],
    );
    let first_tick = ((stacked.from_s as f64 / x_step).ceil() * x_step) as i64;
    let tick_count = if first_tick > stacked.until_s {
        0
    } else {
        (stacked.until_s - first_tick) / x_step as i64 + 1
    };
    let x_ticks: Vec<i64> = (0..tick_count)
        .map(|i| first_tick + i * x_step as i64)
        .collect();
    let with_date = span > 86_400.0 || x_step >= 86_400.0;
    let with_seconds = x_step < 60.0;
    let band = |range: Range| (x_ns(range.from_ns), x_ns(range.until_ns));
    html! {
        svg.timeline viewBox={"0 0 " (W) " " (H)} role="img" aria-label="wait time per second by cause"
            data-from=(stacked.from_s) data-until=(stacked.until_s) data-step=(stacked.step_s)
            data-left=(LEFT) data-right=(LEFT + plot_w) data-href=(href) {
            @for value in &y_ticks {
                line.grid x1=(LEFT) x2=(LEFT + plot_w) y1=(format!("{:.1}", y(value * NS))) y2=(format!("{:.1}", y(value * NS))) {}
                text.ylabel x=(LEFT - 6.0) y=(format!("{:.1}", y(value * NS) + 4.0)) { (format!("{value:.3}").trim_end_matches('0').trim_end_matches('.')) }
            }
            text.yunit x="4" y=(TOP - 6.0) { "s/s" }
            @for t in &x_ticks {
                line.tick x1=(format!("{:.1}", x(*t as f64))) x2=(format!("{:.1}", x(*t as f64))) y1=(TOP + plot_h) y2=(TOP + plot_h + 4.0) {}
                text.xlabel x=(format!("{:.1}", x(*t as f64))) y=(H - 6.0) { (clock(*t, with_date, with_seconds)) }
            }
            @if let Some(baseline) = marks.baseline {
                @let (a, b) = band(baseline);
                rect.basesel x=(format!("{a:.1}")) y=(TOP) width=(format!("{:.1}", (b - a).max(1.0))) height=(plot_h) {}
            }
            @for w in &marks.windows {
                @let (a, b) = band(Range { from_ns: w.from_ns, until_ns: w.until_ns.unwrap_or(stacked.until_s * 1_000_000_000) });
                rect class={"win win-" (w.source)} x=(format!("{a:.1}")) y=(TOP) width=(format!("{:.1}", (b - a).max(2.0))) height=(plot_h) {}
            }
            @for (category, d) in &paths {
                path class={"c-" (category)} d=(d) {}
            }
            line.axis x1=(LEFT) x2=(LEFT + plot_w) y1=(TOP + plot_h) y2=(TOP + plot_h) {}
            @let (sel_a, sel_b) = marks.selection.map_or((0.0, 0.0), band);
            rect.sel x=(format!("{sel_a:.1}")) y=(TOP) width=(format!("{:.1}", sel_b - sel_a)) height=(plot_h) {}
            g.hover {
                @for (bucket, column) in &columns {
                    rect.hov x=(format!("{:.2}", x(*bucket as f64))) y=(TOP) width=(format!("{width:.2}")) height=(plot_h) {
                        title { (hover_text(*bucket, stacked.step_s, column)) }
                    }
                }
            }
            @for w in &marks.windows {
                @let (a, b) = band(Range { from_ns: w.from_ns, until_ns: w.until_ns.unwrap_or(stacked.until_s * 1_000_000_000) });
                @let tab_w = (b - a).max(TAB_MIN);
                // Kept inside the plot even for a window at its right edge.
                @let tab_x = a.min(LEFT + plot_w - tab_w);
                a.wintab href=(format!("/windows/{}", w.id)) {
                    title { (w.title) }
                    rect class={"tab win-" (w.source)} x=(format!("{tab_x:.1}")) y="2" width=(format!("{tab_w:.1}")) height=(TOP - 4.0) rx="2" {}
                    text x=(format!("{:.1}", tab_x + 4.0)) y=(TOP - 6.0) { (w.source) }
                }
            }
        }
    }
}

fn hover_text(bucket: i64, step_s: i64, column: &[(&str, f64)]) -> String {
    let mut text = format!("{} ({} s)", clock(bucket, true, true), step_s);
    for (category, value) in column {
        if *value > 0.0 {
            let _ = write!(text, "\n{category}: {}", rate(*value));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(key: &str, points: &[(i64, i64)]) -> v1::SeriesLine {
        v1::SeriesLine {
            key: key.to_owned(),
            value_unit: "nanoseconds".to_owned(),
            points: points
                .iter()
                .map(|&(t, v)| v1::SeriesPoint {
                    unix_ns: t * 1_000_000_000,
                    value: v,
                    count: 1,
                })
                .collect(),
            ..v1::SeriesLine::default()
        }
    }

    #[test]
    fn means_count_buckets_with_data_only() {
        let lines = [
            line("lock", &[(0, 20_000_000_000), (10, 0)]),
            line("cpu-work", &[(0, 10_000_000_000)]),
            line("idle", &[(10, 50_000_000_000)]),
        ];
        let range = Range {
            from_ns: 0,
            until_ns: 100_000_000_000,
        };
        let stacked = Stacked::from_lines(&lines, 10, range);
        // Two buckets with data (20 s): lock 20 s of waiting -> 1 s/s.
        assert!((stacked.mean("lock") - 1e9).abs() < 1.0);
        assert!((stacked.mean("cpu-work") - 0.5e9).abs() < 1.0);
        assert!((stacked.mean_total() - 1.5e9).abs() < 1.0);
        assert!((stacked.mean(IDLE) - 2.5e9).abs() < 1.0);
        let svg = timeline(&stacked, &Marks::default(), false, "/service?service=a").into_string();
        assert!(svg.contains("class=\"c-lock\""), "{svg}");
        assert!(!svg.contains("c-idle"), "idle is not drawn unless asked");
    }

    #[test]
    fn scales_are_round() {
        assert_eq!(nice_scale(3.3), (4.0, 1.0));
        let (top, step) = nice_scale(0.42);
        assert!(
            (top - 0.6).abs() < 1e-9 && (step - 0.2).abs() < 1e-9,
            "{top} {step}"
        );
        assert!((tick_step(3600.0, 8.0, &[60.0, 300.0, 600.0]) - 600.0).abs() < 1e-9);
    }
}
