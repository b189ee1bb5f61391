//! `stallscope-agent record`: profile for a while, like `perf record`, and write one file.

use std::{
    io::{IsTerminal, Write},
    path::Path,
    time::Duration,
};

use agent_common::{Loss, Signal};
use anyhow::Context as _;
use stallscope_profile::Profile;

use super::{
    output::StagedOutput,
    sampler::{Sink, sample},
};
use crate::{
    aggregate::{accumulate::Accumulator, period::PeriodProfile},
    config::Config,
    naming,
    privilege::{self, Capability},
};

/// What a recording produced, for the closing line.
pub struct RecordSummary {
    pub profile: Profile,
    pub elapsed: Duration,
}

/// Records for `duration` (or until SIGINT/SIGTERM) and writes `output`.
pub fn record(config: &Config, duration: Duration, output: &Path) -> anyhow::Result<RecordSummary> {
    // Plain copies of compressed debug files go next to the output, which is writable.
    let output_dir = output.parent().filter(|dir| !dir.as_os_str().is_empty());
    crate::symbols::plain_dwarf::use_dir(output_dir.unwrap_or(Path::new(".")));
    let mut sink = FileSink {
        staged: Some(StagedOutput::create(output)?),
        signals: config.signals.iter().map(|s| s.as_str()).collect(),
        duration,
        progress: std::io::stderr().is_terminal(),
        written: None,
    };
    let elapsed = sample(config, Some(duration), &mut sink)?;
    let profile = sink
        .written
        .context("the recording ended without a profile")?;
    Ok(RecordSummary { profile, elapsed })
}

/// `record`'s sink: one profile, at the end, into one file.
struct FileSink {
    /// The output file, until the profile is written.
    staged: Option<StagedOutput>,
    signals: Vec<&'static str>,
    duration: Duration,
    /// Whether stderr is a terminal, for the progress line.
    progress: bool,
    /// The profile written.
    written: Option<Profile>,
}

impl Sink for FileSink {
    fn interval(&self) -> Option<Duration> {
        None
    }

    fn describe(&self) -> String {
        format!("recording for {:?}", self.duration)
    }

    fn drained(&mut self, accumulator: &Accumulator, elapsed: Duration) {
        if self.progress {
            print_progress(accumulator, elapsed, self.duration);
        }
    }

    /// The output is written wherever the user asked, which may be another user's
    /// directory.
    fn keeps(&self) -> &'static [Capability] {
        &[privilege::CAP_DAC_OVERRIDE]
    }

    fn accept(&mut self, profile: PeriodProfile, _last: bool) -> anyhow::Result<()> {
        let profile = profile.into_profile();
        if self.progress {
            eprint!("\r\x1b[2K");
        }
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
            self.signals.join(" + "),
            profile.meta.host,
            profile.meta.duration_ns as f64 / 1e9
        );
        let staged = self
            .staged
            .take()
            .context("a recording writes one profile")?;
        staged.commit(&profile, &title)?;
        self.written = Some(profile);
        Ok(())
    }
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
