//! `stallscope why`: asks the collector to explain a window and renders the answer for a
//! terminal (one screen), as markdown or as JSON; with `--out-dir`, writes a differential
//! flame graph (baseline -> window, per second of wall time) for each ranked cause.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde_json::json;
use stallscope_profile::Profile;
use stallscope_proto::v1;

use crate::{
    args::{FilterArgs, WhyFormat},
    client::{Collector, filter, time_range},
    commands::{decode, write_differential},
    report::human_ns,
    timespec::format_time,
};

const NS: f64 = 1e9;

/// What `why` was asked.
pub struct WhyRequest<'a> {
    pub window_id: Option<&'a str>,
    pub range: Option<(i64, i64)>,
    pub filter: &'a FilterArgs,
    pub baseline: Option<(i64, i64)>,
    pub format: WhyFormat,
    pub out_dir: Option<&'a Path>,
    /// `why` (default) or `nsigma` (the evaluation's baseline ranker).
    pub ranker: &'a str,
}

pub async fn why(collector: &mut Collector, request: &WhyRequest<'_>) -> anyhow::Result<()> {
    let response = collector
        .client
        .explain(v1::ExplainRequest {
            window_id: request.window_id.unwrap_or_default().to_owned(),
            range: request.range.map(|(f, u)| time_range(f, u)),
            filter: Some(filter(request.filter)?),
            baseline: request.baseline.map(|(f, u)| time_range(f, u)),
            ranker: request.ranker.to_owned(),
        })
        .await
        .map_err(|status| collector.explain(&status))?
        .into_inner();
    let mut written = Vec::new();
    if let Some(dir) = request.out_dir
        && response.verdict == "explained"
    {
        written = flame_graphs(collector, &response, dir).await?;
    }
    match request.format {
        WhyFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&response, &written))?
        ),
        WhyFormat::Markdown => print!("{}", markdown(&response, &written)),
        WhyFormat::Text => print!("{}", text(&response, &written)),
    }
    if matches!(response.verdict.as_str(), "no-data" | "not-enough-baseline") {
        anyhow::bail!("{}", response.summary);
    }
    Ok(())
}

/// Wait per second of wall time: seconds of waiting per second, i.e. the average number
/// of threads waiting.
fn rate(ns_per_s: f64) -> String {
    format!("{:.3} s/s", ns_per_s / NS)
}

fn signed_rate(ns_per_s: f64) -> String {
    format!(
        "{}{:.3} s/s",
        if ns_per_s >= 0.0 { "+" } else { "" },
        ns_per_s / NS
    )
}

fn per_event(window: Option<f64>, baseline: Option<f64>) -> String {
    match (window, baseline) {
        (Some(w), Some(b)) => format!("{} / {}", human_ns(w), human_ns(b)),
        (Some(w), None) => format!("{} / -", human_ns(w)),
        (None, Some(b)) => format!("- / {}", human_ns(b)),
        (None, None) => String::new(),
    }
}

fn q_text(q: f64) -> String {
    if q < 0.001 {
        "<0.001".to_owned()
    } else {
        format!("{q:.3}")
    }
}

fn window_line(r: &v1::ExplainResponse) -> String {
    let (from, until) = r
        .window
        .as_ref()
        .map_or((0, 0), |w| (w.from_unix_ns, w.until_unix_ns));
    let scope = match (r.service.as_str(), r.host.as_str()) {
        ("", "") => "every service".to_owned(),
        (s, "") => format!("service {s}"),
        ("", h) => format!("host {h}"),
        (s, h) => format!("service {s} on {h}"),
    };
    let id = if r.window_id.is_empty() {
        String::new()
    } else {
        format!("window {} ", r.window_id)
    };
    format!(
        "{id}{scope}: {} .. {} ({} s, {} buckets of {} s)",
        format_time(from),
        format_time(until),
        (until - from) / 1_000_000_000,
        r.window_buckets,
        r.bucket_ns / 1_000_000_000
    )
}

fn baseline_line(r: &v1::ExplainResponse) -> String {
    let mut kinds: Vec<String> = r.baseline.iter().map(|p| p.kind.clone()).collect();
    kinds.dedup();
    format!(
        "{} buckets ({} s) in {} periods: {}",
        r.baseline_buckets,
        i64::from(r.baseline_buckets) * r.bucket_ns / 1_000_000_000,
        r.baseline.len(),
        kinds.join(", ")
    )
}

fn evidence_line(e: &v1::ExplainEvidence) -> String {
    let mut line = format!("{:<10} {}", e.kind, e.name);
    if e.window_ns_per_s != 0.0 || e.baseline_ns_per_s != 0.0 {
        let _ = write!(
            line,
            "  {} (window {}, baseline {})",
            signed_rate(e.window_ns_per_s - e.baseline_ns_per_s),
            rate(e.window_ns_per_s),
            rate(e.baseline_ns_per_s)
        );
    }
    if let Some(q) = e.q_value {
        let _ = write!(line, " q={}", q_text(q));
    }
    if e.new {
        line.push_str(" [new]");
    }
    line
}

/// The terminal report: what the window is, the answer, the causes table, the evidence
/// of ranked causes, events and weaknesses.
pub fn text(r: &v1::ExplainResponse, written: &[(String, PathBuf)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "why: {}", window_line(r));
    if matches!(r.verdict.as_str(), "no-data" | "not-enough-baseline") {
        return out;
    }
    let _ = writeln!(out, "baseline: {}", baseline_line(r));
    let _ = writeln!(out, "answer: {}", r.summary);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "  # {:<15} {:>11} {:>11} {:>12}  {:<21} {:>6} {:>7}",
        "cause", "window", "baseline", "change", "per wait (win / base)", "share", "q"
    );
    for c in &r.causes {
        let _ = writeln!(
            out,
            "  {} {:<15} {:>11} {:>11} {:>12}  {:<21} {:>6} {:>7}",
            if c.rank > 0 {
                c.rank.to_string()
            } else {
                " ".to_owned()
            },
            c.category,
            rate(c.window_ns_per_s),
            rate(c.baseline_ns_per_s),
            signed_rate(c.change_ns_per_s),
            per_event(c.window_ns_per_event, c.baseline_ns_per_event),
            if c.rank > 0 {
                format!("{:.0}%", 100.0 * c.share)
            } else {
                String::new()
            },
            q_text(c.q_value)
        );
    }
    let _ = writeln!(
        out,
        "    {:<15} {:>11} {:>11} {:>12}  (servers waiting for requests, parked pools: never a cause)",
        "idle",
        rate(r.idle_window_ns_per_s),
        rate(r.idle_baseline_ns_per_s),
        signed_rate(r.idle_window_ns_per_s - r.idle_baseline_ns_per_s)
    );
    let _ = writeln!(
        out,
        "  (s/s: seconds of waiting per second of wall time, the average number of threads waiting)"
    );
    for c in r.causes.iter().filter(|c| c.rank > 0) {
        let _ = writeln!(out);
        let _ = writeln!(out, "{} {}:", c.rank, c.category);
        for e in &c.evidence {
            let _ = writeln!(out, "  {}", evidence_line(e));
            for detail in &e.details {
                let _ = writeln!(out, "      {detail}");
            }
        }
        if c.evidence.is_empty() {
            let _ = writeln!(out, "  (no object stood out)");
        }
    }
    if !r.events.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "changes near the window:");
        for e in &r.events {
            let _ = writeln!(
                out,
                "  {} {} {}{}: {}",
                format_time(e.time_unix_ns),
                e.kind,
                e.service,
                build_change(e),
                e.detail
            );
        }
    }
    if !r.weaknesses.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "what weakens this answer:");
        for w in &r.weaknesses {
            let _ = writeln!(out, "  - {w}");
        }
    }
    if !written.is_empty() {
        let _ = writeln!(out);
        for (category, path) in written {
            let _ = writeln!(
                out,
                "flame graph ({category}, baseline -> window): {}",
                path.display()
            );
        }
    }
    out
}

fn build_change(e: &v1::ExplainEvent) -> String {
    match (e.previous_build_id.as_str(), e.build_id.as_str()) {
        ("", "") => String::new(),
        ("", new) => format!(" (build {new})"),
        (old, new) => format!(" (build {old} -> {new})"),
    }
}

/// The report as markdown, for an incident ticket.
pub fn markdown(r: &v1::ExplainResponse, written: &[(String, PathBuf)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## why: {}\n", window_line(r));
    let _ = writeln!(out, "**{}**\n", r.summary);
    if matches!(r.verdict.as_str(), "no-data" | "not-enough-baseline") {
        return out;
    }
    let _ = writeln!(out, "Baseline: {}\n", baseline_line(r));
    let _ = writeln!(
        out,
        "| # | cause | window | baseline | change | per wait (window / baseline) | share | q |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for c in &r.causes {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            if c.rank > 0 {
                c.rank.to_string()
            } else {
                String::new()
            },
            c.category,
            rate(c.window_ns_per_s),
            rate(c.baseline_ns_per_s),
            signed_rate(c.change_ns_per_s),
            per_event(c.window_ns_per_event, c.baseline_ns_per_event),
            if c.rank > 0 {
                format!("{:.0}%", 100.0 * c.share)
            } else {
                String::new()
            },
            q_text(c.q_value)
        );
    }
    for c in r.causes.iter().filter(|c| c.rank > 0) {
        let _ = writeln!(out, "\n### {} {}\n", c.rank, c.category);
        for e in &c.evidence {
            let _ = writeln!(out, "- `{}`", evidence_line(e).replace('`', "'"));
            for detail in &e.details {
                let _ = writeln!(out, "  - {detail}");
            }
        }
    }
    if !r.events.is_empty() {
        let _ = writeln!(out, "\n### Changes near the window\n");
        for e in &r.events {
            let _ = writeln!(
                out,
                "- {} {} {}{}: {}",
                format_time(e.time_unix_ns),
                e.kind,
                e.service,
                build_change(e),
                e.detail
            );
        }
    }
    if !r.weaknesses.is_empty() {
        let _ = writeln!(out, "\n### What weakens this answer\n");
        for w in &r.weaknesses {
            let _ = writeln!(out, "- {w}");
        }
    }
    for (category, path) in written {
        let _ = writeln!(out, "\nFlame graph ({category}): `{}`", path.display());
    }
    out
}

fn to_json(r: &v1::ExplainResponse, written: &[(String, PathBuf)]) -> serde_json::Value {
    let range = |t: Option<&v1::TimeRange>| {
        t.map(|t| json!({"from_unix_ns": t.from_unix_ns, "until_unix_ns": t.until_unix_ns}))
    };
    json!({
        "window_id": r.window_id,
        "host": r.host,
        "service": r.service,
        "window": range(r.window.as_ref()),
        "verdict": r.verdict,
        "summary": r.summary,
        "bucket_s": r.bucket_ns / 1_000_000_000,
        "window_buckets": r.window_buckets,
        "baseline_buckets": r.baseline_buckets,
        "baseline": r.baseline.iter().map(|p| json!({"span": range(p.span.as_ref()), "kind": p.kind})).collect::<Vec<_>>(),
        "causes": r.causes.iter().map(|c| json!({
            "category": c.category,
            "rank": (c.rank > 0).then_some(c.rank),
            "window_ns_per_s": c.window_ns_per_s,
            "baseline_ns_per_s": c.baseline_ns_per_s,
            "change_ns_per_s": c.change_ns_per_s,
            "window_ns_per_event": c.window_ns_per_event,
            "baseline_ns_per_event": c.baseline_ns_per_event,
            "share": c.share,
            "p_value": c.p_value,
            "q_value": c.q_value,
            "significant": c.significant,
            "evidence": c.evidence.iter().map(|e| json!({
                "kind": e.kind,
                "name": e.name,
                "window_ns_per_s": e.window_ns_per_s,
                "baseline_ns_per_s": e.baseline_ns_per_s,
                "window_ns_per_event": e.window_ns_per_event,
                "baseline_ns_per_event": e.baseline_ns_per_event,
                "details": e.details,
                "q_value": e.q_value,
                "new": e.new,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "idle_window_ns_per_s": r.idle_window_ns_per_s,
        "idle_baseline_ns_per_s": r.idle_baseline_ns_per_s,
        "events": r.events.iter().map(|e| json!({
            "time_unix_ns": e.time_unix_ns,
            "kind": e.kind,
            "host": e.host,
            "service": e.service,
            "build_id": e.build_id,
            "previous_build_id": e.previous_build_id,
            "detail": e.detail,
        })).collect::<Vec<_>>(),
        "weaknesses": r.weaknesses,
        "flame_graphs": written.iter().map(|(c, p)| json!({"cause": c, "path": p.display().to_string()})).collect::<Vec<_>>(),
    })
}

/// Fetches one cause's profile over `spans` (merged).
async fn cause_profile(
    collector: &mut Collector,
    response: &v1::ExplainResponse,
    category: &str,
    spans: &[v1::TimeRange],
) -> anyhow::Result<Profile> {
    let mut merged = Profile::default();
    for span in spans {
        let request = v1::ProfileRequest {
            range: Some(*span),
            filter: Some(v1::Filter {
                host: response.host.clone(),
                service: response.service.clone(),
                cause: category.to_owned(),
                ..v1::Filter::default()
            }),
        };
        let reply = collector
            .client
            .profile(request)
            .await
            .map_err(|status| collector.explain(&status))?
            .into_inner();
        let part = decode(&reply.pprof)?;
        if merged.sample_types.is_empty() {
            merged = part;
        } else {
            merged.merge(&part);
        }
    }
    Ok(merged)
}

/// Multiplies every value of a profile by `factor` (rounded).
fn scaled(profile: &Profile, factor: f64) -> Profile {
    let mut out = profile.clone();
    for sample in &mut out.samples {
        for value in &mut sample.values {
            *value = (*value as f64 * factor).round() as i64;
        }
    }
    out
}

/// One differential flame graph per ranked cause, the baseline scaled to the window's
/// length so widths and colours compare time per second.
async fn flame_graphs(
    collector: &mut Collector,
    response: &v1::ExplainResponse,
    dir: &Path,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create --out-dir {}", dir.display()))?;
    let Some(window) = response.window else {
        return Ok(Vec::new());
    };
    let baseline: Vec<v1::TimeRange> = response.baseline.iter().filter_map(|p| p.span).collect();
    let seconds = |spans: &[v1::TimeRange]| -> f64 {
        spans
            .iter()
            .map(|s| (s.until_unix_ns - s.from_unix_ns) as f64 / NS)
            .sum()
    };
    let factor = seconds(&[window]) / seconds(&baseline).max(1e-9);
    let mut written = Vec::new();
    let ranked: Vec<&v1::ExplainCause> = response
        .causes
        .iter()
        .filter(|c| c.rank > 0)
        .take(3)
        .collect();
    for cause in ranked {
        let after = cause_profile(collector, response, &cause.category, &[window]).await?;
        let before = scaled(
            &cause_profile(collector, response, &cause.category, &baseline).await?,
            factor,
        );
        let path = dir.join(format!("why-{}-{}.svg", cause.rank, cause.category));
        write_differential(
            &path,
            &before,
            &after,
            "baseline (per window length)",
            "window",
        )?;
        written.push((cause.category.clone(), path));
    }
    Ok(written)
}
