//! The one sampling loop of `record` and `run`: load and attach the probes, drain them
//! every drain interval into the accumulator, close a profile every interval of the sink
//! (or once, at the end) and hand it to the sink, and stop cleanly at the deadline or on
//! SIGINT/SIGTERM: a last drain, the probes detached, the last profile handed over. The
//! sink is the only difference between the commands: a file for `record`, the spool and
//! the collector for `run`.

use std::time::{Duration, Instant};

use agent_common::Signal;
use stallscope_profile::{Meta, Profile};
use stallscope_proto::sd_notify::ServiceNotifier;

use super::{guard::Guard, shutdown};
use crate::{
    aggregate::{accumulate::Accumulator, calibrate},
    config::{Config, SignalName},
    metrics::METRICS,
    naming,
    privilege::{self, Capability},
    probes::{self, Drained, ProbeError, Probes},
    process::events,
    system,
};

/// Where finished profiles go.
pub trait Sink {
    /// How often a profile is closed and handed over; `None`: once, when sampling ends.
    fn interval(&self) -> Option<Duration>;

    /// What the sink does with the profiles, for the line scripts and tests wait for
    /// (`probes attached; <this>`).
    fn describe(&self) -> String;

    /// Called after every drain, with the time sampled so far (progress output).
    fn drained(&mut self, _accumulator: &Accumulator, _elapsed: Duration) {}

    /// Capabilities the sink needs after the probes are attached, besides those
    /// reading processes needs ([`privilege::RUN_KEEPS`]).
    fn keeps(&self) -> &'static [Capability] {
        &[]
    }

    /// A finished profile of the period since the previous one (`last`: the final one,
    /// after the probes were detached).
    fn accept(&mut self, profile: Profile, last: bool) -> anyhow::Result<()>;
}

/// The signals of a configuration, as the probes number them.
pub fn signals_of(config: &Config) -> Vec<Signal> {
    config
        .signals
        .iter()
        .map(|signal| signal.signal())
        .collect()
}

/// Samples with `config` for `duration` (or until SIGINT/SIGTERM), handing finished
/// profiles to `sink`; returns how long it sampled (up to the last drain).
pub fn sample(
    config: &Config,
    duration: Option<Duration>,
    sink: &mut dyn Sink,
) -> anyhow::Result<Duration> {
    if !probes::privileged() {
        return Err(ProbeError::NotPrivileged.into());
    }
    shutdown::install();
    let mut probes = Probes::load(&config.probe_settings())?;
    // Before the capabilities are dropped: counting the probes' run time may need one.
    let mut guard = Guard::start(config.overhead_budget_percent, &mut probes);
    system::release_free_memory();
    for (signal, hook) in &probes.hooks {
        tracing::info!("{}: {hook}", naming::signal_label(*signal));
    }
    // Tests and scripts wait for this line (at info level) before starting a workload.
    tracing::info!("probes attached; {}", sink.describe());
    METRICS.probes_attached(&signals_of(config), config.drain_interval);
    let notes = notes(config, &probes.hooks);
    let mut accumulator = Accumulator::new(&signals_of(config), config.resolver_settings());
    // Processes are read as they start (and the ones running now, right away), so their
    // stacks are symbolized even if they exit before the next drain.
    let _watcher = events::watch(accumulator.resolver.event_feed(), config.target_pid);
    accumulator.discover_processes();
    privilege::drop_after_attach(sink.keeps());
    let notifier = service_notifier();
    if let Some(notifier) = &notifier {
        warn_unsent(notifier.ready("probes attached"));
    }
    let mut heartbeat = notifier.as_ref().and_then(ServiceNotifier::heartbeat);
    let host = system::hostname();
    let started = Instant::now();
    let mut period = Period::begin();
    let mut next_drain = started + config.drain_interval;
    let mut next_close = sink.interval().map(|every| started + every);
    loop {
        // The watchdog hears from this loop only while it turns.
        if let Some(heartbeat) = &mut heartbeat {
            warn_unsent(heartbeat.beat());
        }
        let now = Instant::now();
        if shutdown::requested() || duration.is_some_and(|d| now - started >= d) {
            break;
        }
        let mut wake = next_drain;
        if let Some(close) = next_close {
            wake = wake.min(close);
        }
        if let Some(duration) = duration {
            wake = wake.min(started + duration);
        }
        std::thread::sleep(
            wake.saturating_duration_since(now)
                .min(Duration::from_millis(100)),
        );
        let now = Instant::now();
        if let Some(guard) = &mut guard {
            guard.tick(&mut probes);
        }
        if now >= next_drain {
            let scale = guard
                .as_ref()
                .map_or(1.0, |g| g.syscall_scale(Instant::now()));
            ingest(&mut accumulator, probes.drain()?, scale);
            next_drain += config.drain_interval;
            sink.drained(&accumulator, started.elapsed());
            if let Some(guard) = &mut guard {
                guard.check(&mut probes);
                guard.new_period(&mut probes, config.drain_interval);
            }
        }
        if let (Some(close), Some(every)) = (next_close, sink.interval())
            && now >= close
        {
            let notes = period_notes(&notes, guard.as_mut());
            let profile = period.close(&mut accumulator, &host, &notes, Instant::now());
            sink.accept(profile, false)?;
            next_close = Some(close + every);
        }
    }
    if let Some(notifier) = &notifier {
        warn_unsent(notifier.stopping());
    }
    let scale = guard
        .as_ref()
        .map_or(1.0, |g| g.syscall_scale(Instant::now()));
    ingest(&mut accumulator, probes.drain()?, scale);
    let ended = Instant::now();
    drop(probes);
    if let Some(guard) = &guard {
        guard.summarize();
    }
    let notes = period_notes(&notes, guard.as_mut());
    let profile = period.close(&mut accumulator, &host, &notes, ended);
    sink.accept(profile, true)?;
    Ok(ended - started)
}

/// A profile's notes: how it was recorded, and what the overhead guard did meanwhile.
fn period_notes(notes: &[String], guard: Option<&mut Guard>) -> Vec<String> {
    let mut notes = notes.to_vec();
    if let Some(guard) = guard {
        notes.extend(guard.take_notes());
    }
    notes
}

/// The service manager's notifier (`Type=notify` units), if the agent runs under one.
fn service_notifier() -> Option<ServiceNotifier> {
    ServiceNotifier::from_env()
        .map_err(|err| tracing::warn!("NOTIFY_SOCKET unusable, not notifying systemd: {err}"))
        .ok()
        .flatten()
}

fn warn_unsent(sent: std::io::Result<()>) {
    if let Err(err) = sent {
        tracing::warn!("notifying systemd (NOTIFY_SOCKET): {err}");
    }
}

/// Adds a drained generation to the accumulator, counting its events per signal (on-CPU:
/// samples) and the stacks that could not be resolved in the self-metrics. The syscall
/// signal's totals are scaled by `syscall_scale` (the overhead guard's duty cycle).
fn ingest(accumulator: &mut Accumulator, mut drained: Drained, syscall_scale: f64) {
    calibrate::scale_drained(
        &mut drained.totals,
        &mut drained.samples,
        Signal::Syscall,
        syscall_scale,
    );
    let mut events = [0u64; Signal::COUNT];
    for (key, value) in &drained.totals {
        if key.signal == Signal::OnCpu as u8 {
            continue;
        }
        if let Some(count) = events.get_mut(usize::from(key.signal)) {
            *count += value.count;
        }
    }
    for (key, value) in &drained.samples {
        if key.signal == Signal::OnCpu as u8 {
            events[Signal::OnCpu as usize] += value.count;
        }
    }
    for signal in Signal::ALL {
        if events[signal as usize] > 0 {
            METRICS.add_events(signal, events[signal as usize]);
        }
    }
    accumulator.ingest(drained);
    METRICS.unresolved_stacks(accumulator.unresolved_stacks);
}

/// The start of the period the next profile covers.
struct Period {
    start_unix_ns: i64,
    started: Instant,
}

impl Period {
    fn begin() -> Self {
        Self {
            start_unix_ns: system::unix_now_ns(),
            started: Instant::now(),
        }
    }

    /// The profile of the period ending at `end`; the next period starts now.
    fn close(
        &mut self,
        accumulator: &mut Accumulator,
        host: &str,
        notes: &[String],
        end: Instant,
    ) -> Profile {
        let meta = Meta {
            start_unix_ns: self.start_unix_ns,
            duration_ns: i64::try_from(end.saturating_duration_since(self.started).as_nanos())
                .unwrap_or(i64::MAX),
            host: host.to_owned(),
            notes: notes.to_vec(),
            ..Meta::default()
        };
        *self = Self::begin();
        accumulator.finish(meta)
    }
}

/// The facts a profile carries about how it was recorded: agent and kernel versions, the
/// hooks the loaded probes use (`hooks`), thresholds, the target.
pub fn notes(config: &Config, hooks: &[(Signal, String)]) -> Vec<String> {
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
        if config.syscall_sample_every > 1 {
            notes.push(format!(
                "syscalls: every one counted, one in {} timed at random; durations, histograms and slow-syscall stacks scaled to the count",
                config.syscall_sample_every
            ));
        }
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
