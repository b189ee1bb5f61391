//! The subcommands: each asks the collector, then prints a table (or JSON) or writes a
//! file. Files appear complete or not at all (temporary file, then rename).

use std::{
    io::{BufWriter, Write as _},
    path::Path,
};

use anyhow::Context as _;
use inferno::flamegraph::{
    self,
    color::{MultiPalette, Palette},
};
use stallscope_profile::{
    EXTENSIONS_HELP, FlameView, OutputFormat, Profile, decode_pprof_with_limit, folded_stacks,
    write_profile,
};
use stallscope_proto::v1;

use crate::{
    args::{FilterArgs, GroupArg, RangeArgs, parse_span},
    client::{Collector, explain, filter, time_range},
    report::{changes, human_ns, short_stack, sparkline, top},
    timespec::{format_time, parse_duration},
};

const MAX_PROFILE_BYTES: u64 = 1024 * 1024 * 1024;

pub(crate) fn decode(bytes: &[u8]) -> anyhow::Result<Profile> {
    decode_pprof_with_limit(bytes, MAX_PROFILE_BYTES)
        .context("the collector sent a profile that does not decode")
}

async fn fetch_profile(
    collector: &mut Collector,
    from: i64,
    until: i64,
    filter_args: &FilterArgs,
) -> anyhow::Result<Profile> {
    let response = collector
        .client
        .profile(v1::ProfileRequest {
            range: Some(time_range(from, until)),
            filter: Some(filter(filter_args)?),
        })
        .await
        .map_err(|status| explain(&status, &collector.address))?;
    decode(&response.into_inner().pprof)
}

/// Writes `write` to `path` through a temporary sibling.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<std::fs::File>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.stallscope-{}.tmp", std::process::id()));
    let file = std::fs::File::create(&temp)
        .with_context(|| format!("cannot write {}: choose a writable path", path.display()))?;
    let mut out = BufWriter::new(file);
    let result = write(&mut out).and_then(|()| out.flush().map_err(Into::into));
    drop(out);
    match result.and_then(|()| std::fs::rename(&temp, path).map_err(Into::into)) {
        Ok(()) => Ok(()),
        Err(err) => {
            let _ = std::fs::remove_file(&temp);
            Err(err).with_context(|| format!("writing {}", path.display()))
        }
    }
}

fn describe_filter(args: &FilterArgs) -> String {
    let mut parts = Vec::new();
    for (key, value) in [
        ("host", &args.host),
        ("service", &args.service),
        ("signal", &args.signal),
        ("cause", &args.cause),
    ] {
        if let Some(value) = value {
            parts.push(format!("{key}={value}"));
        }
    }
    if let Some(pid) = args.pid {
        parts.push(format!("pid={pid}"));
    }
    parts.extend(args.labels.iter().cloned());
    if parts.is_empty() {
        "everything".to_owned()
    } else {
        parts.join(" ")
    }
}

pub async fn targets(
    collector: &mut Collector,
    range: &RangeArgs,
    json: bool,
) -> anyhow::Result<()> {
    let (from, until) = range.resolve()?;
    let targets = collector
        .client
        .targets(v1::TargetsRequest {
            range: Some(time_range(from, until)),
        })
        .await
        .map_err(|status| explain(&status, &collector.address))?
        .into_inner()
        .targets;
    if json {
        let rows: Vec<serde_json::Value> = targets
            .iter()
            .map(|t| serde_json::json!({"host": t.host, "service": t.service, "process": t.process, "pid": t.pid,
                "signals": t.signals, "first": format_time(t.first_unix_ns), "last": format_time(t.last_unix_ns)}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if targets.is_empty() {
        println!(
            "no data between {} and {}",
            format_time(from),
            format_time(until)
        );
        return Ok(());
    }
    println!(
        "{:<20} {:<24} {:>8}  {:<20} {:<20} SIGNALS",
        "HOST", "SERVICE", "PID", "FIRST", "LAST"
    );
    for t in &targets {
        println!(
            "{:<20} {:<24} {:>8}  {:<20} {:<20} {}",
            t.host,
            t.service,
            t.pid,
            format_time(t.first_unix_ns),
            format_time(t.last_unix_ns),
            t.signals.join(",")
        );
    }
    Ok(())
}

pub async fn flame(
    collector: &mut Collector,
    output: &Path,
    range: &RangeArgs,
    filter_args: &FilterArgs,
) -> anyhow::Result<()> {
    let format = OutputFormat::from_path(output).with_context(|| {
        format!(
            "unsupported output file {}: use one of {EXTENSIONS_HELP}",
            output.display()
        )
    })?;
    let (from, until) = range.resolve()?;
    let profile = fetch_profile(collector, from, until, filter_args).await?;
    let title = format!(
        "stallscope: {} from {} to {}",
        describe_filter(filter_args),
        format_time(from),
        format_time(until)
    );
    let view = FlameView::default();
    write_atomically(output, |out| {
        if format == OutputFormat::Pprof {
            write_profile(format, &profile, 0, &view, &title, out)?;
        } else {
            write_profile(format, &profile.time_only(), 0, &view, &title, out)?;
        }
        Ok(())
    })?;
    let time = profile.time_only();
    eprintln!(
        "wrote {} ({} stacks, {} of wait time)",
        output.display(),
        profile.samples.len(),
        human_ns(time.total(0) as f64)
    );
    Ok(())
}

pub async fn top_command(
    collector: &mut Collector,
    range: &RangeArgs,
    filter_args: &FilterArgs,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let (from, until) = range.resolve()?;
    let profile = fetch_profile(collector, from, until, filter_args).await?;
    let top = top(&profile, limit);
    if json {
        println!("{}", serde_json::to_string_pretty(&top)?);
        return Ok(());
    }
    let kinds: Vec<String> = top
        .by_kind
        .iter()
        .map(|(k, v)| format!("{k} {}", human_ns(*v as f64)))
        .collect();
    println!(
        "{}, {} to {}: {} in total ({})",
        describe_filter(filter_args),
        format_time(from),
        format_time(until),
        human_ns(top.total_ns as f64),
        kinds.join(", ")
    );
    if top.total_ns == 0 {
        println!("no samples: check `stallscope targets` for what the collector has");
        return Ok(());
    }
    println!("\n{:>7} {:>11} {:>11}  FUNCTION", "SHARE", "TOTAL", "SELF");
    for row in &top.functions {
        println!(
            "{:>6.1}% {:>11} {:>11}  {}",
            row.share * 100.0,
            human_ns(row.total_ns as f64),
            human_ns(row.self_ns as f64),
            row.function
        );
    }
    println!("\n{:>7} {:>11}  STACK (innermost first)", "SHARE", "TIME");
    for row in &top.stacks {
        println!(
            "{:>6.1}% {:>11}  {}",
            row.share * 100.0,
            human_ns(row.value_ns as f64),
            short_stack(&row.stack, 6)
        );
    }
    Ok(())
}

pub async fn diff(
    collector: &mut Collector,
    before: &str,
    after: &str,
    output: Option<&Path>,
    filter_args: &FilterArgs,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let before_range = parse_span(before)?;
    let after_range = parse_span(after)?;
    let response = collector
        .client
        .diff(v1::DiffRequest {
            before: Some(time_range(before_range.0, before_range.1)),
            after: Some(time_range(after_range.0, after_range.1)),
            filter: Some(filter(filter_args)?),
        })
        .await
        .map_err(|status| explain(&status, &collector.address))?
        .into_inner();
    let before_profile = decode(&response.before_pprof)?;
    let after_profile = decode(&response.after_pprof)?;
    if let Some(path) = output {
        write_differential(path, &before_profile, &after_profile, before, after)?;
        eprintln!("wrote {}", path.display());
    }
    let changes = changes(&before_profile, &after_profile, limit);
    if json {
        println!("{}", serde_json::to_string_pretty(&changes)?);
        return Ok(());
    }
    println!(
        "wait time per second of wall time, before {before} vs after {after} ({})",
        describe_filter(filter_args)
    );
    println!(
        "{:>12} {:>12} {:>12}  FUNCTION",
        "BEFORE/s", "AFTER/s", "CHANGE/s"
    );
    for c in &changes {
        println!(
            "{:>12} {:>12} {:>12}  {}",
            human_ns(c.before_ns_per_s),
            human_ns(c.after_ns_per_s),
            format!(
                "{}{}",
                if c.delta_ns_per_s > 0.0 { "+" } else { "" },
                human_ns(c.delta_ns_per_s)
            ),
            c.function
        );
    }
    if changes.is_empty() {
        println!("no differences");
    }
    Ok(())
}

/// A differential flame graph (inferno: widths from `after`, red where time grew, blue
/// where it shrank) or its folded input (`stack before after`).
pub(crate) fn write_differential(
    path: &Path,
    before: &Profile,
    after: &Profile,
    before_label: &str,
    after_label: &str,
) -> anyhow::Result<()> {
    let view = FlameView::default();
    let fold = |profile: &Profile| -> anyhow::Result<Vec<u8>> {
        let mut text = Vec::new();
        for (frames, value) in folded_stacks(&profile.time_only(), 0, &view)? {
            writeln!(text, "{} {value}", frames.join(";"))?;
        }
        Ok(text)
    };
    let mut lines = Vec::new();
    inferno::differential::from_readers(
        inferno::differential::Options {
            normalize: false,
            strip_hex: false,
        },
        fold(before)?.as_slice(),
        fold(after)?.as_slice(),
        &mut lines,
    )
    .context("building the differential stacks")?;
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if extension == "folded" {
        return write_atomically(path, |out| Ok(out.write_all(&lines)?));
    }
    anyhow::ensure!(
        extension == "svg",
        "diff output {}: use .svg (differential flame graph) or .folded",
        path.display()
    );
    let text = String::from_utf8_lossy(&lines).into_owned();
    let mut lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        lines.push("[no samples] 0 1");
    }
    let mut options = flamegraph::Options::default();
    options.title = format!("stallscope diff: {before_label} -> {after_label}");
    options.subtitle = Some("width: after; red: more wait time than before, blue: less".to_owned());
    "ns".clone_into(&mut options.count_name);
    options.colors = Palette::Multi(MultiPalette::Java);
    options.deterministic = true;
    write_atomically(path, |out| {
        flamegraph::from_lines(&mut options, lines.iter().copied(), out)
            .context("rendering the differential flame graph")?;
        Ok(())
    })
}

pub async fn series(
    collector: &mut Collector,
    range: &RangeArgs,
    filter_args: &FilterArgs,
    by: GroupArg,
    step: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let (from, until) = range.resolve()?;
    let step_ns = match step {
        Some(step) => i64::try_from(parse_duration(step)?.as_nanos()).unwrap_or(i64::MAX),
        None => 0,
    };
    let response = collector
        .client
        .series(v1::SeriesRequest {
            range: Some(time_range(from, until)),
            filter: Some(filter(filter_args)?),
            group_by: match by {
                GroupArg::Signal => "signal",
                GroupArg::Cause => "cause",
            }
            .to_owned(),
            step_ns,
            per_scope: false,
        })
        .await
        .map_err(|status| explain(&status, &collector.address))?
        .into_inner();
    if json {
        let lines: Vec<serde_json::Value> = response
            .lines
            .iter()
            .map(|l| serde_json::json!({"key": l.key, "unit": l.value_unit,
                "points": l.points.iter().map(|p| serde_json::json!({"unix_ns": p.unix_ns, "value": p.value, "count": p.count})).collect::<Vec<_>>()}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"step_ns": response.step_ns, "lines": lines})
            )?
        );
        return Ok(());
    }
    let step = response.step_ns.max(1);
    let buckets = usize::try_from((until - from) / step + 1)
        .unwrap_or(1)
        .min(400);
    println!(
        "{} to {}, one mark per {}:",
        format_time(from),
        format_time(until),
        human_ns(step as f64)
    );
    if response.lines.is_empty() {
        println!("no data: check `stallscope targets` for what the collector has");
    }
    for line in &response.lines {
        let mut values = vec![0_i64; buckets];
        for point in &line.points {
            let index = usize::try_from((point.unix_ns - from).div_euclid(step))
                .unwrap_or(0)
                .min(buckets - 1);
            values[index] += point.value;
        }
        let total: i64 = values.iter().sum();
        let seconds = (until - from) as f64 / 1e9;
        println!(
            "{:<16} {}  total {}, {}/s",
            line.key,
            sparkline(&values),
            human_ns(total as f64),
            human_ns(total as f64 / seconds)
        );
    }
    Ok(())
}

pub async fn agents(collector: &mut Collector, json: bool) -> anyhow::Result<()> {
    let agents = collector
        .client
        .agents(v1::AgentsRequest {})
        .await
        .map_err(|status| explain(&status, &collector.address))?
        .into_inner()
        .agents;
    if json {
        let rows: Vec<serde_json::Value> = agents
            .iter()
            .map(|a| serde_json::json!({"agent": a.agent, "host": a.host, "batches": a.batches, "first_sequence": a.first_sequence,
                "last_sequence": a.last_sequence, "spool_dropped_total": a.spool_dropped_total, "samples": a.samples,
                "last_batch": format_time(a.last_batch_unix_ns)}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<20} {:>9} {:>16} {:>9}  LAST BATCH",
        "AGENT", "HOST", "BATCHES", "SEQUENCES", "DROPPED"
    );
    for a in &agents {
        println!(
            "{:<24} {:<20} {:>9} {:>16} {:>9}  {}",
            a.agent,
            a.host,
            a.batches,
            format!("{}..{}", a.first_sequence, a.last_sequence),
            a.spool_dropped_total,
            format_time(a.last_batch_unix_ns)
        );
    }
    Ok(())
}
