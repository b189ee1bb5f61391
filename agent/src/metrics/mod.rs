//! The agent's self-metrics: process-wide atomic counters and gauges that the sampling
//! loop, the probes' drain, the spool and the symbolizers bump as they work (a relaxed
//! atomic add each, nothing on the probes' side), rendered in the Prometheus text format
//! by `render` for the `/metrics` endpoint (`server`). This module imports nothing else of
//! the agent, so every part can report into it.

pub mod server;

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agent_common::{LOSS_COUNTERS, Loss, Signal};
use stallscope_profile::exposition::{Exposition, HistogramValues, MetricKind};

/// Upper bounds (seconds) of the send latency histogram: from spooling-and-sending to the
/// collector's acknowledgement (which comes after it stored the batch).
const SEND_LATENCY_BOUNDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The probes' maps whose fill is reported, in [`AgentMetrics::map_fill`]'s order.
pub const FILLED_MAPS: [&str; 3] = ["totals", "samples", "stacks"];

/// The overhead guard's levers, as the guard numbers them.
pub const GUARD_LEVERS: [&str; 4] = [
    "syscall_sample_every",
    "syscall_duty_cycle",
    "offcpu_stack_threshold",
    "lock_stack_threshold",
];

/// Which symbolization cache a lookup went to.
#[derive(Debug, Clone, Copy)]
pub enum SymbolCache {
    /// Kernel addresses (kallsyms), per address.
    Kernel = 0,
    /// User frames, per binary and file offset.
    User = 1,
}

/// Every number the agent exports about itself.
pub struct AgentMetrics {
    signals_on: [AtomicBool; Signal::COUNT],
    events: [AtomicU64; Signal::COUNT],
    /// Cumulative loss counters of the probes, as last drained.
    losses: [AtomicU64; LOSS_COUNTERS as usize],
    unresolved_stacks: AtomicU64,
    /// Entries and capacity of the totals, samples and stacks maps in the last drain.
    map_entries: [AtomicU64; 3],
    map_capacity: [AtomicU64; 3],
    drains: AtomicU64,
    last_drain_unix_ms: AtomicU64,
    drain_interval_ms: AtomicU64,
    probes_attached: AtomicBool,
    spool_bytes: AtomicU64,
    spool_batches: AtomicU64,
    spool_dropped: AtomicU64,
    batches_spooled: AtomicU64,
    batches_acknowledged: AtomicU64,
    send_latency: [AtomicU64; SEND_LATENCY_BOUNDS.len() + 1],
    send_latency_sum_us: AtomicU64,
    symbol_hits: [AtomicU64; 2],
    symbol_misses: [AtomicU64; 2],
    /// The overhead guard: budget and last measured cost (own, probes) as shares of the
    /// host's CPU (f64 bits), and per lever its steps down and its turns each way.
    guard_budget: AtomicU64,
    guard_cost: [AtomicU64; 2],
    guard_steps: [AtomicU64; 4],
    guard_turns: [[AtomicU64; 2]; 4],
}

/// The agent's metrics (one agent per process).
pub static METRICS: AgentMetrics = AgentMetrics::new();

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

impl AgentMetrics {
    pub const fn new() -> Self {
        Self {
            signals_on: [const { AtomicBool::new(false) }; Signal::COUNT],
            events: [const { AtomicU64::new(0) }; Signal::COUNT],
            losses: [const { AtomicU64::new(0) }; LOSS_COUNTERS as usize],
            unresolved_stacks: AtomicU64::new(0),
            map_entries: [const { AtomicU64::new(0) }; 3],
            map_capacity: [const { AtomicU64::new(0) }; 3],
            drains: AtomicU64::new(0),
            last_drain_unix_ms: AtomicU64::new(0),
            drain_interval_ms: AtomicU64::new(0),
            probes_attached: AtomicBool::new(false),
            spool_bytes: AtomicU64::new(0),
            spool_batches: AtomicU64::new(0),
            spool_dropped: AtomicU64::new(0),
            batches_spooled: AtomicU64::new(0),
            batches_acknowledged: AtomicU64::new(0),
            send_latency: [const { AtomicU64::new(0) }; SEND_LATENCY_BOUNDS.len() + 1],
            send_latency_sum_us: AtomicU64::new(0),
            symbol_hits: [const { AtomicU64::new(0) }; 2],
            symbol_misses: [const { AtomicU64::new(0) }; 2],
            guard_budget: AtomicU64::new(0),
            guard_cost: [const { AtomicU64::new(0) }; 2],
            guard_steps: [const { AtomicU64::new(0) }; 4],
            guard_turns: [const { [const { AtomicU64::new(0) }; 2] }; 4],
        }
    }

    /// The overhead guard holds the agent under `budget` (a share of the host's CPU).
    pub fn guard_budget(&self, budget: f64) {
        self.guard_budget.store(budget.to_bits(), Ordering::Relaxed);
    }

    /// The guard measured the agent's own CPU and its probes' run time, as shares of the
    /// host's CPU.
    pub fn guard_cost(&self, own: f64, probes: f64) {
        self.guard_cost[0].store(own.to_bits(), Ordering::Relaxed);
        self.guard_cost[1].store(probes.to_bits(), Ordering::Relaxed);
    }

    /// The guard turned lever `lever` (of [`GUARD_LEVERS`]) one step down (`down`) or up.
    pub fn guard_turned(&self, lever: usize, down: bool) {
        let (Some(steps), Some(turns)) = (self.guard_steps.get(lever), self.guard_turns.get(lever))
        else {
            return;
        };
        if down {
            steps.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = steps.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| s.checked_sub(1));
        }
        turns[usize::from(!down)].fetch_add(1, Ordering::Relaxed);
    }

    /// The probes of `signals` are attached and drained every `drain_interval`.
    pub fn probes_attached(&self, signals: &[Signal], drain_interval: Duration) {
        for &signal in signals {
            self.signals_on[signal as usize].store(true, Ordering::Relaxed);
        }
        self.drain_interval_ms
            .store(drain_interval.as_millis() as u64, Ordering::Relaxed);
        self.last_drain_unix_ms.store(unix_ms(), Ordering::Relaxed);
        self.probes_attached.store(true, Ordering::Relaxed);
    }

    /// A drain read `events` events of `signal`.
    pub fn add_events(&self, signal: Signal, events: u64) {
        self.events[signal as usize].fetch_add(events, Ordering::Relaxed);
    }

    /// A drain finished; `losses` are the probes' cumulative loss counters.
    pub fn drained(&self, losses: &[u64]) {
        for (counter, &value) in self.losses.iter().zip(losses) {
            counter.store(value, Ordering::Relaxed);
        }
        self.drains.fetch_add(1, Ordering::Relaxed);
        self.last_drain_unix_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// The drained generation held `entries` of the `capacity` of map `index` of
    /// [`FILLED_MAPS`].
    pub fn map_fill(&self, index: usize, entries: usize, capacity: u32) {
        if let (Some(e), Some(c)) = (self.map_entries.get(index), self.map_capacity.get(index)) {
            e.store(entries as u64, Ordering::Relaxed);
            c.store(u64::from(capacity), Ordering::Relaxed);
        }
    }

    /// Stacks that could not be resolved so far (cumulative).
    pub fn unresolved_stacks(&self, total: u64) {
        self.unresolved_stacks.store(total, Ordering::Relaxed);
    }

    /// The spool holds `batches` batches in `bytes` bytes; `dropped` were dropped in all.
    pub fn spool(&self, batches: usize, bytes: u64, dropped: u64) {
        self.spool_batches.store(batches as u64, Ordering::Relaxed);
        self.spool_bytes.store(bytes, Ordering::Relaxed);
        self.spool_dropped.store(dropped, Ordering::Relaxed);
    }

    pub fn batch_spooled(&self) {
        self.batches_spooled.fetch_add(1, Ordering::Relaxed);
    }

    /// A batch sent `latency` ago was acknowledged.
    pub fn batch_acknowledged(&self, latency: Duration) {
        self.batches_acknowledged.fetch_add(1, Ordering::Relaxed);
        let seconds = latency.as_secs_f64();
        let bucket = SEND_LATENCY_BOUNDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(SEND_LATENCY_BOUNDS.len());
        self.send_latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.send_latency_sum_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// `hits` lookups of `cache` were answered from it, `misses` were not.
    pub fn symbol_lookups(&self, cache: SymbolCache, hits: u64, misses: u64) {
        self.symbol_hits[cache as usize].fetch_add(hits, Ordering::Relaxed);
        self.symbol_misses[cache as usize].fetch_add(misses, Ordering::Relaxed);
    }

    /// Whether the probes are loaded and attached (readiness).
    pub fn ready(&self) -> bool {
        self.probes_attached.load(Ordering::Relaxed)
    }

    /// Why the agent is unhealthy, if it is: its drain loop has not drained for three
    /// drain intervals (at least 30 s) since the probes were attached.
    pub fn unhealthy(&self) -> Option<String> {
        if !self.ready() {
            return None;
        }
        let last = self.last_drain_unix_ms.load(Ordering::Relaxed);
        let limit = (self.drain_interval_ms.load(Ordering::Relaxed) * 3).max(30_000);
        let since = unix_ms().saturating_sub(last);
        (since > limit).then(|| format!("no drain for {:.1}s", since as f64 / 1000.0))
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed) as f64;
        let mut out = Exposition::new();
        let signals: Vec<Signal> = Signal::ALL
            .into_iter()
            .filter(|&s| self.signals_on[s as usize].load(Ordering::Relaxed))
            .collect();
        let name = "stallscope_agent_events_total";
        out.family(
            name,
            MetricKind::Counter,
            "Events measured by the probes, per signal (waits, syscalls, requests, on-CPU samples).",
        );
        for &signal in &signals {
            out.sample(
                name,
                &[("signal", signal_name(signal))],
                load(&self.events[signal as usize]),
            );
        }
        let name = "stallscope_agent_losses_total";
        out.family(
            name,
            MetricKind::Counter,
            "Events the probes lost or could not measure fully, per signal and reason.",
        );
        for &signal in &signals {
            for loss in Loss::ALL {
                out.sample(
                    name,
                    &[("signal", signal_name(signal)), ("reason", loss.name())],
                    load(&self.losses[loss.index(signal) as usize]),
                );
            }
        }
        out.single(
            "stallscope_agent_unresolved_stacks_total",
            MetricKind::Counter,
            "Stacks whose raw addresses were gone before they could be resolved.",
            load(&self.unresolved_stacks),
        );
        let name = "stallscope_agent_map_fill_ratio";
        out.family(
            name,
            MetricKind::Gauge,
            "Entries of the last drained generation of a probe map over its capacity (1: full, events are lost).",
        );
        for (index, map) in FILLED_MAPS.iter().enumerate() {
            let capacity = load(&self.map_capacity[index]);
            let fill = if capacity > 0.0 {
                load(&self.map_entries[index]) / capacity
            } else {
                0.0
            };
            out.sample(name, &[("map", map)], fill);
        }
        out.single(
            "stallscope_agent_drains_total",
            MetricKind::Counter,
            "Drains of the probes' maps.",
            load(&self.drains),
        );
        out.single(
            "stallscope_agent_last_drain_timestamp_seconds",
            MetricKind::Gauge,
            "When the probes' maps were last drained, in seconds since the Unix epoch.",
            load(&self.last_drain_unix_ms) / 1000.0,
        );
        out.single(
            "stallscope_agent_probes_attached",
            MetricKind::Gauge,
            "1 once the probes are loaded and attached.",
            f64::from(u8::from(self.ready())),
        );
        self.render_streaming(&mut out);
        self.render_guard(&mut out);
        let name = "stallscope_agent_symbol_cache_hits_total";
        out.family(
            name,
            MetricKind::Counter,
            "Symbolization lookups answered from a cache (kernel: per address; user: per binary and offset).",
        );
        for (index, cache) in ["kernel", "user"].iter().enumerate() {
            out.sample(name, &[("cache", cache)], load(&self.symbol_hits[index]));
        }
        let name = "stallscope_agent_symbol_cache_misses_total";
        out.family(
            name,
            MetricKind::Counter,
            "Symbolization lookups that had to symbolize (not in the cache).",
        );
        for (index, cache) in ["kernel", "user"].iter().enumerate() {
            out.sample(name, &[("cache", cache)], load(&self.symbol_misses[index]));
        }
        out.process_metrics();
        out.finish()
    }

    fn render_guard(&self, out: &mut Exposition) {
        let share = |value: &AtomicU64| f64::from_bits(value.load(Ordering::Relaxed));
        out.single(
            "stallscope_agent_overhead_budget_ratio",
            MetricKind::Gauge,
            "The overhead guard's budget: the share of the host's CPU the agent may use (0: no guard).",
            share(&self.guard_budget),
        );
        let name = "stallscope_agent_overhead_ratio";
        out.family(
            name,
            MetricKind::Gauge,
            "What the agent cost over the guard's last measurement, as a share of the host's CPU: its own CPU time and its probes' run time.",
        );
        for (index, part) in ["agent", "probes"].iter().enumerate() {
            out.sample(name, &[("part", part)], share(&self.guard_cost[index]));
        }
        let name = "stallscope_agent_guard_steps";
        out.family(
            name,
            MetricKind::Gauge,
            "Steps the overhead guard has turned each lever down from its configured setting (0: as configured).",
        );
        for (index, lever) in GUARD_LEVERS.iter().enumerate() {
            let steps = self.guard_steps[index].load(Ordering::Relaxed) as f64;
            out.sample(name, &[("lever", lever)], steps);
        }
        let name = "stallscope_agent_guard_turns_total";
        out.family(
            name,
            MetricKind::Counter,
            "Times the overhead guard turned a lever down (over budget) or back up.",
        );
        for (index, lever) in GUARD_LEVERS.iter().enumerate() {
            for (way, direction) in ["down", "up"].iter().enumerate() {
                let turns = self.guard_turns[index][way].load(Ordering::Relaxed) as f64;
                out.sample(name, &[("lever", lever), ("direction", direction)], turns);
            }
        }
    }

    fn render_streaming(&self, out: &mut Exposition) {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed) as f64;
        out.single(
            "stallscope_agent_spool_batches",
            MetricKind::Gauge,
            "Batches in the on-disk spool, not yet acknowledged by the collector.",
            load(&self.spool_batches),
        );
        out.single(
            "stallscope_agent_spool_bytes",
            MetricKind::Gauge,
            "Bytes of the batches in the on-disk spool.",
            load(&self.spool_bytes),
        );
        out.single(
            "stallscope_agent_spool_dropped_batches_total",
            MetricKind::Counter,
            "Batches a full spool dropped, over the spool's life (kept across restarts).",
            load(&self.spool_dropped),
        );
        out.single(
            "stallscope_agent_batches_spooled_total",
            MetricKind::Counter,
            "Batches written to the spool.",
            load(&self.batches_spooled),
        );
        out.single(
            "stallscope_agent_batches_acknowledged_total",
            MetricKind::Counter,
            "Batches the collector acknowledged (stored).",
            load(&self.batches_acknowledged),
        );
        let name = "stallscope_agent_send_latency_seconds";
        out.family(
            name,
            MetricKind::Histogram,
            "Time from sending a batch to the collector's acknowledgement.",
        );
        let buckets: Vec<(f64, u64)> = SEND_LATENCY_BOUNDS
            .iter()
            .zip(&self.send_latency)
            .map(|(&bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        let over = self.send_latency[SEND_LATENCY_BOUNDS.len()].load(Ordering::Relaxed);
        let count = buckets.iter().map(|(_, c)| c).sum::<u64>() + over;
        out.histogram(
            name,
            &[],
            &HistogramValues {
                buckets,
                sum: load(&self.send_latency_sum_us) / 1e6,
                count,
            },
        );
    }
}

/// The signal's name as `--signals` spells it.
fn signal_name(signal: Signal) -> &'static str {
    match signal {
        Signal::OffCpu => "offcpu",
        Signal::OnCpu => "oncpu",
        Signal::RunQueue => "runqueue",
        Signal::Lock => "lock",
        Signal::Syscall => "syscall",
        Signal::Disk => "disk",
        Signal::Connect => "connect",
        Signal::SocketWait => "socket-wait",
        Signal::Tcp => "tcp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_with_their_labels() {
        let metrics = AgentMetrics::new();
        metrics.probes_attached(&[Signal::OffCpu, Signal::Lock], Duration::from_secs(1));
        metrics.add_events(Signal::Lock, 5);
        let mut losses = vec![0u64; LOSS_COUNTERS as usize];
        losses[Loss::AggFull.index(Signal::Lock) as usize] = 7;
        metrics.drained(&losses);
        metrics.map_fill(1, 50, 100);
        metrics.batch_acknowledged(Duration::from_millis(30));
        metrics.batch_acknowledged(Duration::from_secs(60));
        metrics.symbol_lookups(SymbolCache::User, 3, 1);
        metrics.guard_budget(0.02);
        metrics.guard_cost(0.005, 0.0125);
        metrics.guard_turned(0, true);
        metrics.guard_turned(0, true);
        metrics.guard_turned(0, false);
        let text = metrics.render();
        for line in [
            "stallscope_agent_events_total{signal=\"lock\"} 5",
            "stallscope_agent_events_total{signal=\"offcpu\"} 0",
            "stallscope_agent_losses_total{signal=\"lock\",reason=\"aggregation_map_full\"} 7",
            "stallscope_agent_map_fill_ratio{map=\"samples\"} 0.5",
            "stallscope_agent_send_latency_seconds_bucket{le=\"0.025\"} 0",
            "stallscope_agent_send_latency_seconds_bucket{le=\"0.05\"} 1",
            "stallscope_agent_send_latency_seconds_bucket{le=\"30\"} 1",
            "stallscope_agent_send_latency_seconds_bucket{le=\"+Inf\"} 2",
            "stallscope_agent_send_latency_seconds_count 2",
            "stallscope_agent_symbol_cache_hits_total{cache=\"user\"} 3",
            "stallscope_agent_probes_attached 1",
            "stallscope_agent_overhead_budget_ratio 0.02",
            "stallscope_agent_overhead_ratio{part=\"probes\"} 0.0125",
            "stallscope_agent_guard_steps{lever=\"syscall_sample_every\"} 1",
            "stallscope_agent_guard_turns_total{lever=\"syscall_sample_every\",direction=\"down\"} 2",
            "stallscope_agent_guard_turns_total{lever=\"syscall_sample_every\",direction=\"up\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(!text.contains("signal=\"disk\""), "{text}");
        assert!(metrics.unhealthy().is_none());
    }
}
