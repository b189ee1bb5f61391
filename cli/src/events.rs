//! `stallscope events`: what changed in a service or on a host (deploys with both
//! build-ids, restarts), and with `--binaries` the binaries its stacks ran through.

use stallscope_proto::v1;

use crate::{
    args::{RangeArgs, ScopeArgs},
    client::{Collector, time_range},
    timespec::format_time,
    windows::resolve_range,
};

fn short(build_id: &str) -> &str {
    if build_id.is_empty() {
        "-"
    } else {
        &build_id[..build_id.len().min(16)]
    }
}

fn frame_pointers(code: i32) -> &'static str {
    match v1::FramePointers::try_from(code) {
        Ok(v1::FramePointers::Present) => "yes",
        Ok(v1::FramePointers::Absent) => "no",
        _ => "unknown",
    }
}

pub async fn events(
    collector: &mut Collector,
    range: &RangeArgs,
    scope: &ScopeArgs,
    binaries: bool,
    json: bool,
) -> anyhow::Result<()> {
    let (from, until) = resolve_range(range, "24h")?;
    let response = collector
        .client
        .events(v1::EventsRequest {
            range: Some(time_range(from, until)),
            filter: Some(v1::Filter {
                host: scope.host.clone().unwrap_or_default(),
                service: scope.service.clone().unwrap_or_default(),
                ..v1::Filter::default()
            }),
            binaries,
        })
        .await
        .map_err(|status| collector.explain(&status))?
        .into_inner();
    if json {
        let optional = |text: &str| (!text.is_empty()).then(|| text.to_owned());
        let events: Vec<serde_json::Value> = response
            .events
            .iter()
            .map(|e| {
                serde_json::json!({
                    "time": format_time(e.time_unix_ns), "time_unix_ns": e.time_unix_ns,
                    "kind": e.kind, "host": e.host, "service": e.service, "agent": e.agent,
                    "pid": e.pid, "previous_pid": (e.previous_pid != 0).then_some(e.previous_pid),
                    "build_id": optional(&e.build_id), "previous_build_id": optional(&e.previous_build_id),
                    "executable": optional(&e.executable),
                    "labels": e.labels.iter().map(|l| (l.key.clone(), serde_json::Value::from(l.value.clone())))
                        .collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        let value = if binaries {
            let binaries: Vec<serde_json::Value> = response
                .binaries
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "host": b.host, "service": b.service, "path": b.path,
                        "build_id": optional(&b.build_id), "debug_file": optional(&b.debug_file),
                        "frame_pointers": frame_pointers(b.frame_pointers), "stacks": b.stacks,
                        "truncated_stacks": b.truncated_stacks, "error": optional(&b.error),
                        "first": format_time(b.first_unix_ns), "last": format_time(b.last_unix_ns),
                    })
                })
                .collect();
            serde_json::json!({"events": events, "binaries": binaries})
        } else {
            serde_json::Value::from(events)
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    if response.events.is_empty() {
        println!(
            "no change events between {} and {}",
            format_time(from),
            format_time(until)
        );
    } else {
        println!(
            "{:<20} {:<8} {:<20} {:<24} {:>8} {:<17} {:<17}",
            "TIME", "KIND", "HOST", "SERVICE", "PID", "BUILD-ID", "PREVIOUS"
        );
        for e in &response.events {
            println!(
                "{:<20} {:<8} {:<20} {:<24} {:>8} {:<17} {:<17}",
                format_time(e.time_unix_ns),
                e.kind,
                e.host,
                e.service,
                e.pid,
                short(&e.build_id),
                short(&e.previous_build_id)
            );
        }
    }
    if binaries {
        println!();
        if response.binaries.is_empty() {
            println!("no binaries reported in this range");
            return Ok(());
        }
        println!(
            "{:<20} {:<24} {:<17} {:<8} {:>9} {:>9}  PATH",
            "HOST", "SERVICE", "BUILD-ID", "FP", "STACKS", "TRUNC"
        );
        for b in &response.binaries {
            println!(
                "{:<20} {:<24} {:<17} {:<8} {:>9} {:>9}  {}",
                b.host,
                if b.service.is_empty() {
                    "-"
                } else {
                    &b.service
                },
                short(&b.build_id),
                frame_pointers(b.frame_pointers),
                b.stacks,
                b.truncated_stacks,
                b.path
            );
        }
    }
    Ok(())
}
