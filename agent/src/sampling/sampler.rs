//! The one sampling loop of `record` and `run`: load and attach the probes, drain them
//! every drain interval into the accumulator, close a profile every interval of the sink
//! (or once, at the end) and hand it to the sink, and stop cleanly at the deadline or on
//! SIGINT/SIGTERM: a last drain, the probes detached, the last profile handed over. The
//! sink is the only difference between the commands: a file for `record`, the spool and
//! the collector for `run`.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use agent_common::Signal;
use stallscope_profile::Meta;
use stallscope_proto::sd_notify::ServiceNotifier;

use super::{
    guard::Guard,
    journal::{self, Journal, Recovered, Recovery},
    shutdown,
};
use crate::{
    aggregate::{
        accumulate::Accumulator,
        calibrate::{self, DutyScale},
        period::PeriodProfile,
    },
    config::{Config, SignalName},
    metrics::METRICS,
    naming,
    privilege::{self, Capability},
    probes::{self, Drained, ProbeError, Probes},
    process::events,
    system,
    unwind::loader::{self, LoaderFeed},
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

    /// Whether the sink's profiles carry latency histograms (built only for it).
    fn keeps_histograms(&self) -> bool {
        true
    }

    /// A finished profile of the period since the previous one (`last`: the final one,
    /// after the probes were detached).
    fn accept(&mut self, profile: PeriodProfile, last: bool) -> anyhow::Result<()>;

    /// Where drained generations are journaled until the profile holding them is
    /// accepted ([`Journal`]); `None`: not journaled.
    fn journal_dir(&self) -> Option<&Path> {
        None
    }

    /// Whether the sink already holds the profile of the period starting then.
    fn holds_period(&mut self, _start_unix_ns: i64) -> bool {
        false
    }
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
    accumulator.keep_histograms = sink.keeps_histograms();
    // Binaries without frame pointers get unwind tables as their processes are read.
    let unwind = probes.take_unwind_maps().and_then(|maps| {
        loader::spawn(maps)
            .map_err(|err| tracing::warn!("unwind tables off: starting their loader: {err}"))
            .ok()
    });
    if let Some(feed) = &unwind {
        accumulator
            .resolver
            .set_snapshot_listener(Box::new(feed.clone()));
    }
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
    // What an earlier agent left: its journal (drained, not spooled) and, where its
    // pinned maps were adopted, what it had not emptied yet. Both belong to the period
    // it was in when it died.
    let mut leftover = probes.take_leftover()?;
    // The maps' loss counters are this agent's; the earlier agent's final ones go with
    // its journal's last drain, below.
    let earlier_losses = leftover.as_mut().and_then(|left| {
        left.drained.losses.clear();
        left.earlier_losses.take()
    });
    let mut once_notes = std::mem::take(&mut probes.pin_notes);
    let journal_dir = sink.journal_dir().map(Path::to_owned);
    let recovery = match &journal_dir {
        Some(dir) => Journal::recover(dir)?,
        None => Recovery::Nothing,
    };
    if let Recovery::Refused(why) = &recovery {
        once_notes.push(format!(
            "the drain journal an earlier agent left is {why}: its drains (up to one batch interval) are lost"
        ));
    }
    if let Some(mut recovered) = recovery.drains() {
        if leftover
            .as_ref()
            .is_some_and(|left| left.journaled_at == Some(recovered.last_drain_unix_ns))
        {
            // It died while emptying a generation its journal already held.
            tracing::info!(
                "the adopted maps' last drained generation is in the drain journal already"
            );
            leftover = None;
        }
        if sink.holds_period(recovered.period_start_unix_ns) {
            tracing::info!(
                "the drain journal's {} drains are already in the spool (stopped between spooling and starting the journal over)",
                recovered.drains.len()
            );
        } else {
            recovered
                .drains
                .extend(leftover.take().map(|left| left.drained));
            // What its programs lost until the hand-over, after its last drain too.
            if let (Some(losses), Some(last)) = (earlier_losses, recovered.drains.last_mut()) {
                last.losses = losses;
            }
            spool_recovered(recovered, &mut accumulator, sink, &host, &notes)?;
        }
    }
    if let Some(left) = leftover {
        ingest(&mut accumulator, left.drained);
    }
    // What the earlier agent left is spooled or aggregated: its maps are emptied.
    probes.settle()?;
    let started = Instant::now();
    let mut period = Period::begin();
    let mut journal = journal_dir.as_deref().map(journal::Lane::new);
    if let Some(lane) = &mut journal {
        lane.begin(period.start_unix_ns, &accumulator.reported_losses);
    }
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
        if unwind.is_some() {
            // Processes read since: their unwind tables load now, not at the next drain.
            accumulator.resolver.apply_reports();
        }
        if let Some(guard) = &mut guard {
            guard.tick(&mut probes);
        }
        if now >= next_drain {
            let drained_at = Instant::now();
            let scale = guard
                .as_ref()
                .map_or(DutyScale::WHOLE, |g| g.syscall_scale(&probes, drained_at));
            let drained = drain_journaled(&mut probes, &mut journal, &scale)?;
            ingest(&mut accumulator, drained);
            next_drain += config.drain_interval;
            sink.drained(&accumulator, started.elapsed());
            if let Some(guard) = &mut guard {
                guard.check(&mut probes);
                guard.new_period(&mut probes, config.drain_interval, drained_at);
            }
        }
        if let (Some(close), Some(every)) = (next_close, sink.interval())
            && now >= close
        {
            let mut notes = period_notes(&notes, guard.as_mut(), unwind.as_ref());
            notes.append(&mut once_notes);
            let meta = period.close(&host, &notes, Instant::now());
            // The period's end is the agent's high-water mark (symbols settled, the
            // profile assembled on top of a full period's sums): what the drains left
            // free goes back first.
            system::release_free_memory();
            let profile = accumulator.finish(meta);
            sink.accept(profile, false)?;
            // The period's sums and the profile are freed: give the memory back.
            system::release_free_memory();
            // The closed period is in the sink: the journal starts over with the next.
            if let Some(lane) = &mut journal {
                lane.begin(period.start_unix_ns, &accumulator.reported_losses);
            }
            next_close = Some(close + every);
        }
    }
    if let Some(notifier) = &notifier {
        warn_unsent(notifier.stopping());
    }
    let scale = guard.as_ref().map_or(DutyScale::WHOLE, |g| {
        g.syscall_scale(&probes, Instant::now())
    });
    let drained = drain_journaled(&mut probes, &mut journal, &scale)?;
    ingest(&mut accumulator, drained);
    let ended = Instant::now();
    drop(probes);
    if let Some(guard) = &guard {
        guard.summarize();
    }
    let mut notes = period_notes(&notes, guard.as_mut(), unwind.as_ref());
    notes.append(&mut once_notes);
    let meta = period.close(&host, &notes, ended);
    let profile = accumulator.finish(meta);
    sink.accept(profile, true)?;
    if let Some(lane) = journal {
        lane.end();
    }
    Ok(ended - started)
}

/// Drains the probes and journals the drained generation before it is emptied from the
/// maps (marked there as journaled meanwhile) and aggregated: an agent killed at any
/// point leaves it in the maps or in the journal for the next one, never in neither.
fn drain_journaled(
    probes: &mut Probes,
    journal: &mut Option<journal::Lane>,
    syscall_scale: &DutyScale,
) -> anyhow::Result<Drained> {
    let drained = scaled(probes.drain()?, syscall_scale);
    if let Some(lane) = journal {
        let at = system::unix_now_ns();
        probes.mark_journaled(at)?;
        lane.append(&drained, at);
    }
    probes.settle()?;
    Ok(drained)
}

/// Hands the sink the profile of the period an earlier run drained and never handed
/// over (it was killed or crashed). The losses it
/// reports are those the earlier run had not reported yet; this run's probes count
/// their own from zero.
fn spool_recovered(
    recovered: Recovered,
    accumulator: &mut Accumulator,
    sink: &mut dyn Sink,
    host: &str,
    notes: &[String],
) -> anyhow::Result<()> {
    let drains = recovered.drains.len();
    if recovered.reported_losses.len() == accumulator.reported_losses.len() {
        accumulator
            .reported_losses
            .clone_from(&recovered.reported_losses);
    }
    for drained in recovered.drains {
        accumulator.ingest(drained);
    }
    let mut notes = notes.to_vec();
    notes.push(format!(
        "recovered from the drain journal after an unclean stop: {drains} drains{}",
        if recovered.torn_bytes > 0 {
            format!(
                ", and {} bytes of a drain cut off mid-write (lost)",
                recovered.torn_bytes
            )
        } else {
            String::new()
        }
    ));
    let meta = Meta {
        start_unix_ns: recovered.period_start_unix_ns,
        duration_ns: (recovered.last_drain_unix_ns - recovered.period_start_unix_ns).max(1),
        host: host.to_owned(),
        notes,
        ..Meta::default()
    };
    let profile = accumulator.finish(meta);
    tracing::info!(
        "recovered {drains} drains of an earlier run from the drain journal (it stopped uncleanly); spooling them"
    );
    sink.accept(profile, false)?;
    accumulator.losses.fill(0);
    accumulator.reported_losses.fill(0);
    Ok(())
}

/// A profile's notes: how it was recorded, and what the overhead guard did meanwhile.
fn period_notes(
    notes: &[String],
    guard: Option<&mut Guard>,
    unwind: Option<&LoaderFeed>,
) -> Vec<String> {
    let mut notes = notes.to_vec();
    if let Some(guard) = guard {
        notes.extend(guard.take_notes());
    }
    if let Some(stats) = unwind.map(LoaderFeed::stats) {
        notes.push(format!(
            "unwind tables: {} binaries (without frame pointers, and the vDSO), {} of {} rows ({} of {} KiB), {} processes unwound by table; {} binaries without a table, {} tables evicted",
            stats.tables,
            stats.rows,
            stats.capacity,
            u64::from(stats.rows) * 16 / 1024,
            u64::from(stats.capacity) * 16 / 1024,
            stats.processes,
            stats.failed,
            stats.evicted
        ));
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

/// A drained generation with the syscall signal's totals scaled for the overhead guard's
/// duty cycle.
fn scaled(mut drained: Drained, syscall_scale: &DutyScale) -> Drained {
    calibrate::scale_drained(
        &mut drained.totals,
        &mut drained.samples,
        Signal::Syscall,
        syscall_scale,
    );
    drained
}

/// Adds a drained generation to the accumulator, counting its events per signal (on-CPU:
/// samples) and the stacks that could not be resolved in the self-metrics.
fn ingest(accumulator: &mut Accumulator, drained: Drained) {
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

    /// The metadata of the period ending at `end`; the next period starts now.
    fn close(&mut self, host: &str, notes: &[String], end: Instant) -> Meta {
        let meta = Meta {
            start_unix_ns: self.start_unix_ns,
            duration_ns: i64::try_from(end.saturating_duration_since(self.started).as_nanos())
                .unwrap_or(i64::MAX),
            host: host.to_owned(),
            notes: notes.to_vec(),
            ..Meta::default()
        };
        *self = Self::begin();
        meta
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
