//! The subcommands: each asks the collector, then prints a table (or JSON) or writes a
//! file. Files appear complete or not at all (temporary file, then rename). A query that
//! matches no data says so and fails, instead of writing an empty file.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufWriter, Write as _},
    path::Path,
    time::Duration,
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
    client::{Collector, filter, time_range},
    report::{changes, human_ns, sparkline, top},
    table::{Column, render},
    timespec::format_time,
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
        .map_err(|status| collector.explain(&status))?;
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

/// One row of `targets`: a service (its processes merged) or one process.
#[derive(Debug, Default, serde::Serialize)]
struct TargetRow {
    host: String,
    service: String,
    /// Process names.
    processes: BTreeSet<String>,
    pids: BTreeSet<String>,
    signals: BTreeSet<String>,
    wait_ns: i64,
    cpu_ns: i64,
    first_unix_ns: i64,
    last_unix_ns: i64,
}

pub async fn targets(
    collector: &mut Collector,
    range: &RangeArgs,
    per_pid: bool,
    json: bool,
) -> anyhow::Result<()> {
    let (from, until) = range.resolve()?;
    let targets = collector
        .client
        .targets(v1::TargetsRequest {
            range: Some(time_range(from, until)),
        })
        .await
        .map_err(|status| collector.explain(&status))?
        .into_inner()
        .targets;
    let mut rows: BTreeMap<(String, String, String), TargetRow> = BTreeMap::new();
    for t in &targets {
        let key = (
            t.host.clone(),
            t.service.clone(),
            if per_pid {
                t.pid.clone()
            } else {
                String::new()
            },
        );
        let row = rows.entry(key).or_insert_with(|| TargetRow {
            host: t.host.clone(),
            service: t.service.clone(),
            first_unix_ns: t.first_unix_ns,
            last_unix_ns: t.last_unix_ns,
            ..TargetRow::default()
        });
        row.processes.insert(t.process.clone());
        row.pids.insert(t.pid.clone());
        row.signals.extend(t.signals.iter().cloned());
        row.wait_ns = row.wait_ns.saturating_add(t.wait_ns);
        row.cpu_ns = row.cpu_ns.saturating_add(t.cpu_ns);
        row.first_unix_ns = row.first_unix_ns.min(t.first_unix_ns);
        row.last_unix_ns = row.last_unix_ns.max(t.last_unix_ns);
    }
    let mut rows: Vec<TargetRow> = rows.into_values().collect();
    rows.sort_by(|a, b| {
        b.wait_ns
            .cmp(&a.wait_ns)
            .then(b.cpu_ns.cmp(&a.cpu_ns))
            .then_with(|| (&a.host, &a.service).cmp(&(&b.host, &b.service)))
    });
    if json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|t| {
                let mut row = serde_json::json!({"host": t.host, "service": t.service,
                    "processes": t.processes, "signals": t.signals, "wait_ns": t.wait_ns, "cpu_ns": t.cpu_ns,
                    "first": format_time(t.first_unix_ns), "last": format_time(t.last_unix_ns)});
                if per_pid {
                    row["pid"] = t.pids.iter().next().cloned().unwrap_or_default().into();
                    row["process"] = t.processes.iter().next().cloned().unwrap_or_default().into();
                } else {
                    row["pids"] = t.pids.len().into();
                }
                row
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!(
            "no data between {} and {}",
            format_time(from),
            format_time(until)
        );
        return Ok(());
    }
    let join = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(",");
    let time = |ns: i64| {
        if ns > 0 {
            human_ns(ns as f64)
        } else {
            "-".to_owned()
        }
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|t| {
            let mut cells = vec![t.host.clone(), t.service.clone()];
            if per_pid {
                cells.push(join(&t.pids));
                cells.push(join(&t.processes));
            } else {
                cells.push(t.pids.len().to_string());
            }
            cells.extend([
                time(t.wait_ns),
                time(t.cpu_ns),
                format_time(t.first_unix_ns),
                format_time(t.last_unix_ns),
                join(&t.signals),
            ]);
            cells
        })
        .collect();
    let mut columns = vec![Column::left("HOST", 24), Column::left("SERVICE", 32)];
    if per_pid {
        columns.extend([Column::right("PID"), Column::left("PROCESS", 16)]);
    } else {
        columns.push(Column::right("PIDS"));
    }
    columns.extend([
        Column::right("WAIT"),
        Column::right("CPU"),
        Column::left("FIRST", 20),
        Column::left("LAST", 20),
        Column::left("SIGNALS", 80),
    ]);
    print!("{}", render(&columns, &table));
    if !per_pid {
        println!(
            "(WAIT: off-CPU time, CPU: on-CPU time, {} to {}; --pids lists processes)",
            format_time(from),
            format_time(until)
        );
    }
    Ok(())
}

/// ` for service=x` for a filter, nothing for none.
fn for_filter(args: &FilterArgs) -> String {
    let filter = describe_filter(args);
    if filter == "everything" {
        String::new()
    } else {
        format!(" for {filter}")
    }
}

/// The error for a query that matched nothing.
fn no_data(filter_args: &FilterArgs, from: i64, until: i64) -> anyhow::Error {
    anyhow::anyhow!(
        "no data for {} between {} and {}: `stallscope targets` lists the services and signals the collector has",
        describe_filter(filter_args),
        format_time(from),
        format_time(until)
    )
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
    if profile.samples.is_empty() {
        return Err(no_data(filter_args, from, until));
    }
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
    if profile.samples.is_empty() {
        return Err(no_data(filter_args, from, until));
    }
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
    println!(
        "\nFUNCTIONS by time on the stack (thread entry, syscall entry and scheduler frames left out)"
    );
    let functions: Vec<Vec<String>> = top
        .functions
        .iter()
        .map(|row| {
            vec![
                format!("{:.1}%", row.share * 100.0),
                human_ns(row.total_ns as f64),
                human_ns(row.self_ns as f64),
                row.function.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                Column::right("SHARE"),
                Column::right("TOTAL"),
                Column::right("SELF"),
                Column::left("FUNCTION", 0),
            ],
            &functions
        )
    );
    println!(
        "\nWAITS by process, signal/cause and the program's own frames nearest the wait (innermost first)"
    );
    let waits: Vec<Vec<String>> = top
        .stacks
        .iter()
        .map(|row| {
            vec![
                format!("{:.1}%", row.share * 100.0),
                human_ns(row.value_ns as f64),
                row.process.clone(),
                row.kind(),
                row.code(),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                Column::right("SHARE"),
                Column::right("TIME"),
                Column::left("PROCESS", 16),
                Column::left("SIGNAL/CAUSE", 24),
                Column::left("CODE", 0),
            ],
            &waits
        )
    );
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
        .map_err(|status| collector.explain(&status))?
        .into_inner();
    let before_profile = decode(&response.before_pprof)?;
    let after_profile = decode(&response.after_pprof)?;
    // Rates are per second of covered time (a collector that does not report coverage
    // gets the ranges' lengths).
    let seconds = |covered_ns: i64, range: (i64, i64), profile: &Profile| -> f64 {
        if covered_ns > 0 || profile.samples.is_empty() {
            covered_ns as f64 / 1e9
        } else {
            (range.1 - range.0) as f64 / 1e9
        }
    };
    let before_s = seconds(response.before_covered_ns, before_range, &before_profile);
    let after_s = seconds(response.after_covered_ns, after_range, &after_profile);
    if before_s <= 0.0 && after_s <= 0.0 {
        anyhow::bail!(
            "no data for {} in either range ({before}, {after}): `stallscope targets` lists what the collector has",
            describe_filter(filter_args)
        );
    }
    for (side, text, covered, range) in [
        ("before", before, before_s, before_range),
        ("after", after, after_s, after_range),
    ] {
        let asked = (range.1 - range.0) as f64 / 1e9;
        if covered <= 0.0 {
            eprintln!(
                "warning: the {side} range {text} has no data{}: every change below is against nothing",
                for_filter(filter_args)
            );
        } else if covered < asked * LITTLE_DATA {
            eprintln!(
                "warning: the {side} range {text} has data for {} of its {}: rates are per second with data",
                human_duration(covered),
                human_duration(asked)
            );
        }
    }
    if let Some(path) = output {
        write_differential(path, &before_profile, &after_profile, before, after)?;
        eprintln!("wrote {}", path.display());
    }
    let changes = changes(&before_profile, before_s, &after_profile, after_s, limit);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "before_covered_s": before_s,
                "after_covered_s": after_s,
                "changes": changes,
            }))?
        );
        return Ok(());
    }
    println!(
        "wait time per second with data, before {before} ({} of data) vs after {after} ({} of data), {}",
        human_duration(before_s),
        human_duration(after_s),
        describe_filter(filter_args)
    );
    let rows: Vec<Vec<String>> = changes
        .iter()
        .map(|c| {
            vec![
                human_ns(c.before_ns_per_s),
                human_ns(c.after_ns_per_s),
                format!(
                    "{}{}",
                    if c.delta_ns_per_s > 0.0 { "+" } else { "" },
                    human_ns(c.delta_ns_per_s)
                ),
                c.function.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                Column::right("BEFORE/s"),
                Column::right("AFTER/s"),
                Column::right("CHANGE/s"),
                Column::left("FUNCTION", 0),
            ],
            &rows
        )
    );
    if changes.is_empty() {
        println!("no differences");
    }
    Ok(())
}

/// A side of a diff covering less than this share of its range gets a warning.
const LITTLE_DATA: f64 = 0.9;

/// `90s`, `15m`, `2.5h`: a span of seconds for messages.
fn human_duration(seconds: f64) -> String {
    if seconds >= 2.0 * 3600.0 {
        format!("{:.1}h", seconds / 3600.0)
    } else if seconds >= 120.0 {
        format!("{:.0}m", seconds / 60.0)
    } else {
        format!("{seconds:.0}s")
    }
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

/// Most marks a sparkline gets (a terminal's width).
const MAX_MARKS: i64 = 400;

pub async fn series(
    collector: &mut Collector,
    range: &RangeArgs,
    filter_args: &FilterArgs,
    by: GroupArg,
    step: Option<Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let (from, until) = range.resolve()?;
    let step_ns = step.map_or(0, |step| i64::try_from(step.as_nanos()).unwrap_or(i64::MAX));
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
        .map_err(|status| collector.explain(&status))?
        .into_inner();
    if response.lines.is_empty() {
        return Err(no_data(filter_args, from, until));
    }
    let covered: BTreeMap<i64, i64> = response
        .coverage
        .iter()
        .map(|c| (c.unix_ns, c.covered_ns))
        .collect();
    if json {
        let lines: Vec<serde_json::Value> = response
            .lines
            .iter()
            .map(|l| serde_json::json!({"key": l.key, "unit": l.value_unit,
                "points": l.points.iter().map(|p| serde_json::json!({"unix_ns": p.unix_ns, "value": p.value, "count": p.count,
                    "covered_ns": covered.get(&p.unix_ns).copied().unwrap_or(0)})).collect::<Vec<_>>()}))
            .collect();
        let coverage: Vec<serde_json::Value> = response
            .coverage
            .iter()
            .map(|c| serde_json::json!({"unix_ns": c.unix_ns, "covered_ns": c.covered_ns}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"step_ns": response.step_ns, "lines": lines, "coverage": coverage})
            )?
        );
        return Ok(());
    }
    // Marks start at multiples of the step, as the collector's buckets do, so each holds
    // whole storage buckets.
    let step = response.step_ns.max(1);
    let first_mark = from - from.rem_euclid(step);
    let marks = (until - first_mark + step - 1) / step;
    anyhow::ensure!(
        marks <= MAX_MARKS,
        "{marks} marks of {} do not fit a line: use a --step of at least {} (or --json)",
        human_ns(step as f64),
        human_ns(((until - first_mark) / MAX_MARKS) as f64)
    );
    let marks = usize::try_from(marks.max(1)).unwrap_or(1);
    let covered_s: f64 = covered.values().sum::<i64>() as f64 / 1e9;
    let asked_s = (until - from) as f64 / 1e9;
    println!(
        "{} to {}, one mark per {} (height: rate per second with data; blank: no data), {} of data",
        format_time(from),
        format_time(until),
        human_duration(step as f64 / 1e9),
        human_duration(covered_s),
    );
    if covered_s < asked_s * LITTLE_DATA {
        println!(
            "note: data covers {} of the {} asked for",
            human_duration(covered_s),
            human_duration(asked_s)
        );
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    for line in &response.lines {
        let mut values = vec![0_i64; marks];
        for point in &line.points {
            let index = usize::try_from((point.unix_ns - first_mark).div_euclid(step))
                .unwrap_or(0)
                .min(marks - 1);
            values[index] += point.value;
        }
        let rates: Vec<Option<f64>> = values
            .iter()
            .enumerate()
            .map(|(index, &value)| {
                let start = first_mark + index as i64 * step;
                covered
                    .get(&start)
                    .filter(|&&ns| ns > 0)
                    .map(|&ns| value as f64 / (ns as f64 / 1e9))
            })
            .collect();
        let total: i64 = values.iter().sum();
        rows.push(vec![
            line.key.clone(),
            sparkline(&rates),
            human_ns(total as f64),
            format!("{}/s", human_ns(total as f64 / covered_s.max(1e-9))),
        ]);
    }
    print!(
        "{}",
        render(
            &[
                Column::left(
                    match by {
                        GroupArg::Signal => "SIGNAL",
                        GroupArg::Cause => "CAUSE",
                    },
                    24
                ),
                Column::left("OVER TIME", MAX_MARKS as usize),
                Column::right("TOTAL"),
                Column::right("PER SECOND"),
            ],
            &rows
        )
    );
    Ok(())
}

pub async fn agents(collector: &mut Collector, json: bool) -> anyhow::Result<()> {
    let agents = collector
        .client
        .agents(v1::AgentsRequest {})
        .await
        .map_err(|status| collector.explain(&status))?
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
