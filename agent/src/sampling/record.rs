//! `stallscope-agent record`: profile for a while, like `perf record`, and write one file.

use std::{
    io::{IsTerminal, Write},
    path::Path,
    time::{Duration, Instant},
};

use agent_common::{Loss, Signal};
use stallscope_profile::{Meta, Profile};

use crate::{
    aggregate::accumulate::Accumulator,
    config::{Config, SignalName},
    naming,
    probes::{ProbeError, Probes},
    process::events,
    sampling::{output::StagedOutput, shutdown},
    system,
};

/// What a recording produced, for the closing line.
pub struct RecordSummary {
    pub profile: Profile,
    pub elapsed: Duration,
}

pub fn signals_of(config: &Config) -> Vec<Signal> {
    config
        .signals
        .iter()
        .map(|signal| signal.signal())
        .collect()
}

/// Records for `duration` (or until SIGINT/SIGTERM) and writes `output`.
pub fn record(config: &Config, duration: Duration, output: &Path) -> anyhow::Result<RecordSummary> {
    let staged = StagedOutput::create(output)?;
    if !crate::probes::privileged() {
        return Err(ProbeError::NotPrivileged.into());
    }
    shutdown::install();
    let mut probes = Probes::load(&config.probe_settings())?;
    system::release_free_memory();
    for (signal, hook) in &probes.hooks {
        tracing::info!("{}: {hook}", naming::signal_label(*signal));
    }
    // Tests and scripts wait for this line (at info level) before starting a workload.
    tracing::info!("probes attached; recording for {duration:?}");
    let mut accumulator = Accumulator::new(&signals_of(config), config.resolver_settings());
    // Processes are read as they start (and the ones running now, right away), so their
    // stacks are symbolized even if they exit before the next drain.
    let _watcher = events::watch(accumulator.resolver.shared(), config.target_pid);
    accumulator.discover_processes();
    let start_ns = system::unix_now_ns();
    let started = Instant::now();
    let progress = std::io::stderr().is_terminal();
    let mut next_drain = started + config.drain_interval;
    loop {
        let now = Instant::now();
        let elapsed = now - started;
        if elapsed >= duration || shutdown::requested() {
            break;
        }
        let wake = next_drain.min(started + duration);
        std::thread::sleep(
            wake.saturating_duration_since(now)
                .min(Duration::from_millis(100)),
        );
        if Instant::now() >= next_drain {
            accumulator.ingest(probes.drain()?);
            next_drain += config.drain_interval;
            if progress {
                print_progress(&accumulator, started.elapsed(), duration);
            }
        }
    }
    accumulator.ingest(probes.drain()?);
    let elapsed = started.elapsed();
    let hooks = probes.hooks.clone();
    drop(probes);
    if progress {
        eprint!("\r\x1b[2K");
    }
    let meta = Meta {
        start_unix_ns: start_ns,
        duration_ns: i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX),
        host: system::hostname(),
        notes: notes(config, &hooks),
        ..Meta::default()
    };
    let profile = accumulator.finish(meta);
    for binary in profile
        .meta
        .binaries
        .iter()
        .filter(|b| b.truncated_stacks > 0)
    {
        tracing::info!(
            "{}: {} of {} user stacks ending there probably truncated (frame pointers: {})",
            binary.path,
            binary.truncated_stacks,
            binary.stacks,
            binary
                .frame_pointers
                .map_or("unknown", |fp| if fp { "yes" } else { "no" })
        );
    }
    let title = format!(
        "stallscope {} on {}, {:.1}s",
        config
            .signals
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" + "),
        profile.meta.host,
        elapsed.as_secs_f64()
    );
    staged.commit(&profile, &title)?;
    Ok(RecordSummary { profile, elapsed })
}

/// The facts a profile carries about how it was recorded: agent and kernel versions, the
/// hooks the loaded probes use (`hooks`), thresholds, the target.
pub(crate) fn notes(config: &Config, hooks: &[(Signal, String)]) -> Vec<String> {
    let mut notes = vec![
        system::AGENT_VERSION.to_owned(),
        format!("kernel {}", system::kernel_release()),
    ];
    for (signal, hook) in hooks {
        notes.push(format!("{} probes: {hook}", naming::signal_label(*signal)));
    }
    if config.wants(SignalName::OffCpu) {
        notes.push(format!(
            "off-CPU stacks: every wait >= {:?}, shorter waits threshold-sampled and calibrated to exact totals",
            config.offcpu_stack_threshold
        ));
    }
    if config.wants(SignalName::Lock) {
        notes.push(format!(
            "lock stacks: every wait >= {:?}, shorter waits threshold-sampled and calibrated",
            config.lock_stack_threshold
        ));
    }
    if config.wants(SignalName::Syscall) {
        notes.push(format!(
            "syscall stacks: syscalls >= {:?}",
            config.syscall_slow_threshold
        ));
    }
    if config.wants(SignalName::SocketWait) {
        notes.push(format!(
            "socket waits: socket syscalls >= {:?}; stacks for every wait >= {:?}, shorter waits threshold-sampled and calibrated",
            config.socket_wait_min, config.socket_stack_threshold
        ));
    }
    if config.wants(SignalName::Tcp) {
        notes.push(format!(
            "tcp: smoothed RTT sampled at most every {:?} per connection",
            config.tcp_rtt_interval
        ));
    }
    if let Some(pid) = config.target_pid {
        notes.push(format!("only pid {pid}"));
    }
    notes
}

fn print_progress(accumulator: &Accumulator, elapsed: Duration, duration: Duration) {
    let counts: Vec<String> = accumulator
        .event_counts()
        .into_iter()
        .map(|(signal, count)| format!("{} {count}", naming::signal_label(signal)))
        .collect();
    eprint!(
        "\r\x1b[2Krecording {:.0}s/{:.0}s: {}, {} lost",
        elapsed.as_secs_f64(),
        duration.as_secs_f64(),
        counts.join(", "),
        accumulator.lost_events()
    );
    let _ = std::io::stderr().flush();
}

/// The closing line of a recording.
pub fn summary_line(summary: &RecordSummary, output: &Path) -> String {
    let profile = &summary.profile;
    let mut parts = vec![format!(
        "wrote {} ({} stacks, {:.1}s)",
        output.display(),
        profile.samples.len(),
        summary.elapsed.as_secs_f64()
    )];
    for signal in Signal::ALL {
        let [time, events] = naming::sample_types(signal);
        if let (Some(t), Some(e)) = (
            profile.sample_type_index(&time.kind, &time.unit),
            profile.sample_type_index(&events.kind, &events.unit),
        ) {
            parts.push(format!(
                "{}: {:.3}s over {} events",
                naming::signal_label(signal),
                profile.total(t) as f64 / 1e9,
                profile.total(e),
            ));
        }
    }
    // Events not measured at all, apart from those that only lost (part of) a stack or
    // whose stack is probably cut short: the latter still count in every total.
    let (mut lost, mut partial, mut broken) = (0, 0, 0);
    for (name, &count) in &profile.meta.losses {
        if name.ends_with(WINDOW_VIOLATION) {
            broken += count;
        } else if EVENT_LOSSES.iter().any(|loss| name.ends_with(loss.name())) {
            lost += count;
        } else {
            partial += count;
        }
    }
    parts.push(format!("{lost} events lost"));
    if partial > 0 {
        parts.push(format!("{partial} stacks incomplete"));
    }
    if broken > 0 {
        parts.push(format!(
            "{broken} threads with more wait than time measured (a double count: see the log)"
        ));
    }
    parts.join(", ")
}

/// The loss naming threads whose waits exceed the time measured.
const WINDOW_VIOLATION: &str = "thread_wait_exceeds_window";

/// Losses that cost a whole event (the others cost a stack, or part of one).
const EVENT_LOSSES: [Loss; 4] = [
    Loss::ThreadTableFull,
    Loss::AggFull,
    Loss::PendingFull,
    Loss::MapBusy,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_tells_lost_events_from_incomplete_stacks() {
        let mut profile = Profile::default();
        for (name, count) in [
            ("off-cpu.thread_table_full", 2),
            ("syscall.aggregation_map_full", 1),
            ("off-cpu.stack_table_full", 3),
            ("user_stack_probably_truncated", 154),
            ("stack_unresolved", 4),
        ] {
            profile.meta.losses.insert(name.into(), count);
        }
        let summary = RecordSummary {
            profile,
            elapsed: Duration::from_secs(1),
        };
        let line = summary_line(&summary, Path::new("out.folded"));
        assert!(
            line.ends_with("3 events lost, 161 stacks incomplete"),
            "{line}"
        );
    }
}
