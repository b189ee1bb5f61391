//! `stallscope windows`: list degradation windows (the default), add one by hand, close
//! one, show one. Tables for people, `--json` for scripts.

use anyhow::Context as _;
use stallscope_proto::v1;
use tonic::Code;

use crate::{
    args::{RangeArgs, WindowsAction, WindowsList},
    client::{Collector, time_range},
    timespec::{format_time, now_ns, parse_duration, parse_time},
};

/// Listings without `--since`/`--from` cover the last day: windows are rare and long.
pub const DEFAULT_SPAN: &str = "24h";

pub async fn run(
    collector: &mut Collector,
    action: Option<&WindowsAction>,
    list_args: &WindowsList,
) -> anyhow::Result<()> {
    match action {
        None => list(collector, list_args).await,
        Some(WindowsAction::Add {
            service,
            host,
            from,
            until,
            note,
            json,
        }) => {
            add(
                collector,
                service.as_deref(),
                host.as_deref(),
                from.as_deref(),
                until.as_deref(),
                note,
                *json,
            )
            .await
        }
        Some(WindowsAction::Close { id, at, json }) => {
            close(collector, id, at.as_deref(), *json).await
        }
        Some(WindowsAction::Show { id, json }) => show(collector, id, *json).await,
    }
}

/// A range that defaults to the last `default` (before `--until`, or now) instead of
/// the usual 15 minutes.
pub fn resolve_range(range: &RangeArgs, default: &str) -> anyhow::Result<(i64, i64)> {
    if range.since.is_some() || range.from.is_some() {
        return range.resolve();
    }
    let now = now_ns();
    let until = range
        .until
        .as_deref()
        .map_or(Ok(now), |until| parse_time(until, now))?;
    let span = i64::try_from(parse_duration(default)?.as_nanos()).unwrap_or(i64::MAX);
    Ok((until.saturating_sub(span), until))
}

fn scope(window: &v1::Window) -> String {
    match (window.service.is_empty(), window.host.is_empty()) {
        (true, true) => "all".to_owned(),
        (false, true) => format!("service={}", window.service),
        (true, false) => format!("host={}", window.host),
        (false, false) => format!("service={} host={}", window.service, window.host),
    }
}

fn end(window: &v1::Window) -> String {
    if window.until_unix_ns == 0 {
        "-".to_owned()
    } else {
        format_time(window.until_unix_ns)
    }
}

fn pairs_json(pairs: &[v1::LabelMatch]) -> serde_json::Value {
    pairs
        .iter()
        .map(|p| (p.key.clone(), serde_json::Value::from(p.value.clone())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

pub fn window_json(window: &v1::Window) -> serde_json::Value {
    let optional_time = |ns: i64| (ns != 0).then(|| format_time(ns));
    serde_json::json!({
        "id": window.id,
        "source": window.source,
        "host": window.host,
        "service": window.service,
        "state": window.state,
        "onset": format_time(window.from_unix_ns),
        "end": optional_time(window.until_unix_ns),
        "onset_unix_ns": window.from_unix_ns,
        "end_unix_ns": (window.until_unix_ns != 0).then_some(window.until_unix_ns),
        "note": window.note,
        "top_cause": (!window.top_cause.is_empty()).then_some(&window.top_cause),
        "indicators": window.indicators.iter().map(|i| serde_json::json!({
            "name": i.name, "baseline": i.baseline, "observed": i.observed, "score": i.score,
        })).collect::<Vec<_>>(),
        "alert": window.alert.as_ref().map(|a| serde_json::json!({
            "labels": pairs_json(&a.labels),
            "annotations": pairs_json(&a.annotations),
            "fingerprint": a.fingerprint,
            "group_key": a.group_key,
            "receiver": a.receiver,
            "generator_url": a.generator_url,
            "external_url": a.external_url,
        })),
        "updated": format_time(window.updated_unix_ns),
        "updated_unix_ns": window.updated_unix_ns,
    })
}

/// A failed window call as one sentence.
fn window_error(status: &tonic::Status, collector: &Collector) -> anyhow::Error {
    match status.code() {
        Code::NotFound => anyhow::anyhow!(
            "{}: list windows with `stallscope windows --since 7d`",
            status.message()
        ),
        Code::FailedPrecondition | Code::InvalidArgument => anyhow::anyhow!("{}", status.message()),
        _ => collector.explain(status),
    }
}

async fn list(collector: &mut Collector, args: &WindowsList) -> anyhow::Result<()> {
    let (from, until) = resolve_range(&args.range, DEFAULT_SPAN)?;
    if let Some(source) = &args.source {
        anyhow::ensure!(
            ["automatic", "alertmanager", "manual"].contains(&source.as_str()),
            "--source `{source}`: use automatic, alertmanager or manual"
        );
    }
    if let Some(state) = &args.state {
        anyhow::ensure!(
            ["open", "closed"].contains(&state.as_str()),
            "--state `{state}`: use open or closed"
        );
    }
    let windows = collector
        .client
        .windows(v1::WindowsRequest {
            range: Some(time_range(from, until)),
            filter: Some(v1::Filter {
                host: args.host.clone().unwrap_or_default(),
                service: args.service.clone().unwrap_or_default(),
                ..v1::Filter::default()
            }),
            source: args.source.clone().unwrap_or_default(),
            state: args.state.clone().unwrap_or_default(),
        })
        .await
        .map_err(|status| window_error(&status, collector))?
        .into_inner()
        .windows;
    if args.json {
        let rows: Vec<serde_json::Value> = windows.iter().map(window_json).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if windows.is_empty() {
        println!(
            "no windows between {} and {}",
            format_time(from),
            format_time(until)
        );
        return Ok(());
    }
    println!(
        "{:<19} {:<12} {:<32} {:<20} {:<20} {:<6} TOP CAUSE / NOTE",
        "ID", "SOURCE", "SCOPE", "ONSET", "END", "STATE"
    );
    for window in &windows {
        let cause = if window.top_cause.is_empty() {
            window.note.clone()
        } else {
            format!("cause: {}", window.top_cause)
        };
        println!(
            "{:<19} {:<12} {:<32} {:<20} {:<20} {:<6} {}",
            window.id,
            window.source,
            scope(window),
            format_time(window.from_unix_ns),
            end(window),
            window.state,
            cause.lines().next().unwrap_or_default()
        );
    }
    Ok(())
}

async fn add(
    collector: &mut Collector,
    service: Option<&str>,
    host: Option<&str>,
    from: Option<&str>,
    until: Option<&str>,
    note: &str,
    json: bool,
) -> anyhow::Result<()> {
    let service = service.filter(|s| !s.is_empty()).context(
        "windows add needs --service S (the degraded service; --host H narrows it to one host)",
    )?;
    let from = from.context(
        "windows add needs --from T (when the degradation started: 15m, Unix seconds or RFC 3339)",
    )?;
    let now = now_ns();
    let from_ns = parse_time(from, now).context("--from")?;
    let until_ns = until
        .map(|until| parse_time(until, now).context("--until"))
        .transpose()?;
    if let Some(until_ns) = until_ns {
        anyhow::ensure!(
            until_ns > from_ns,
            "--until ({}) must be after --from ({})",
            format_time(until_ns),
            format_time(from_ns)
        );
    }
    let response = collector
        .client
        .add_window(v1::AddWindowRequest {
            host: host.unwrap_or_default().to_owned(),
            service: service.to_owned(),
            from_unix_ns: from_ns,
            until_unix_ns: until_ns.unwrap_or(0),
            note: note.to_owned(),
        })
        .await
        .map_err(|status| window_error(&status, collector))?
        .into_inner();
    let window = response
        .window
        .context("the collector answered without the window")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&window_json(&window))?);
        return Ok(());
    }
    let what = if response.created {
        "added"
    } else {
        "already recorded:"
    };
    println!(
        "{what} window {} ({}, {} .. {})",
        window.id,
        scope(&window),
        format_time(window.from_unix_ns),
        if window.until_unix_ns == 0 {
            "open".to_owned()
        } else {
            format_time(window.until_unix_ns)
        }
    );
    Ok(())
}

async fn close(
    collector: &mut Collector,
    id: &str,
    at: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let at_ns = at
        .map(|at| parse_time(at, now_ns()).context("--at"))
        .transpose()?;
    let window = collector
        .client
        .close_window(v1::CloseWindowRequest {
            id: id.to_owned(),
            at_unix_ns: at_ns.unwrap_or(0),
        })
        .await
        .map_err(|status| window_error(&status, collector))?
        .into_inner()
        .window
        .context("the collector answered without the window")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&window_json(&window))?);
    } else {
        println!("closed window {} at {}", window.id, end(&window));
    }
    Ok(())
}

async fn show(collector: &mut Collector, id: &str, json: bool) -> anyhow::Result<()> {
    let window = collector
        .client
        .get_window(v1::GetWindowRequest { id: id.to_owned() })
        .await
        .map_err(|status| window_error(&status, collector))?
        .into_inner()
        .window
        .context("the collector answered without the window")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&window_json(&window))?);
        return Ok(());
    }
    println!("id          {}", window.id);
    println!("source      {}", window.source);
    println!("scope       {}", scope(&window));
    println!("state       {}", window.state);
    println!("onset       {}", format_time(window.from_unix_ns));
    println!("end         {}", end(&window));
    if !window.note.is_empty() {
        println!("note        {}", window.note);
    }
    println!(
        "top cause   {}",
        if window.top_cause.is_empty() {
            "not explained yet"
        } else {
            &window.top_cause
        }
    );
    for indicator in &window.indicators {
        println!(
            "indicator   {}: baseline {:.4}, observed {:.4}, score {:.2}",
            indicator.name, indicator.baseline, indicator.observed, indicator.score
        );
    }
    if let Some(alert) = &window.alert {
        println!(
            "alert       fingerprint {}, group {}",
            alert.fingerprint, alert.group_key
        );
        for label in &alert.labels {
            println!("  label       {}={}", label.key, label.value);
        }
        for annotation in &alert.annotations {
            println!("  annotation  {}={}", annotation.key, annotation.value);
        }
        if !alert.generator_url.is_empty() {
            println!("  source      {}", alert.generator_url);
        }
    }
    println!("updated     {}", format_time(window.updated_unix_ns));
    Ok(())
}
