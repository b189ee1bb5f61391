//! The overhead guard: after every drain it measures what the agent costs the host (its
//! own CPU time plus the run time of its probes, from the kernel's `bpf_stats`) as a share
//! of the host's CPU, and holds it under a budget. Above the budget it turns down the
//! costliest signal one step (time fewer syscalls, take fewer wait stacks, and past the
//! sparsest sampling attach the syscall programs for only part of each drain interval);
//! after a few drains well under it, it turns the last one back up. Each event is measured
//! with the setting current when it happens, so totals stay unbiased: syscall counts stay
//! exact and their time is scaled to the count, wait totals stay exact and their stacks
//! are calibrated to them; under a duty cycle the syscall signal's totals are scaled by
//! the share of the interval its programs were attached (an estimate: counts are no
//! longer exact). What it does is logged, exported as metrics and noted in the profile.
//!
//! Sampling cannot lower the cost of the kernel entering a probe at all (the tracepoint
//! and trampoline, about half of the syscall signal's cost on a syscall-bound loop, see
//! docs/performance.md), nor of the programs counting every syscall: the duty cycle is
//! the lever below that floor.

mod duty;
mod levers;

use std::time::{Duration, Instant};

use self::duty::DutyCycle;
pub use self::levers::{Lever, Settings};
use crate::{
    aggregate::calibrate::DutyScale,
    metrics::METRICS,
    probes::{ProbeCost, Probes},
};

/// A step that leaves its lever's programs costing more than this share of what they
/// cost before saved too little: the lever is not turned further (while over budget).
const EFFECTIVE_SHARE: f64 = 0.75;
/// Each step multiplies a lever's setting by this.
const STEP: u64 = 4;
/// Drains in a row well under the budget before a lever is turned back up.
const CALM_DRAINS: u32 = 3;
/// "Well under": below this share of the budget.
const CALM_SHARE: f64 = 0.5;
/// Measurements kept for the summary (a day of one-second drains).
const MAX_COSTS_KEPT: usize = 86_400;
/// Shortest period a measurement covers (shorter drains are summed).
const MIN_PERIOD: Duration = Duration::from_secs(1);

/// One measurement: what the agent cost over a period, in shares of the host's CPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub agent: f64,
    pub probes: f64,
}

impl Cost {
    pub fn total(&self) -> f64 {
        self.agent + self.probes
    }
}

pub struct Guard {
    budget: f64,
    configured: Settings,
    settings: Settings,
    /// Levers the probes offer (the duty cycle only where the syscall programs serve the
    /// syscall signal alone).
    offered: Vec<Lever>,
    /// Levers turned down, the last one last (turned back up first).
    raised: Vec<Lever>,
    /// The last lever turned down, its setting and what its programs cost (a share of
    /// the host's CPU) before, to judge the step; levers whose step saved too little to
    /// try again.
    last_turn: Option<(Lever, u64, f64)>,
    ineffective: Vec<Lever>,
    calm: u32,
    cpus: f64,
    since: Instant,
    agent_cpu: Duration,
    probes: ProbeCost,
    /// The syscall programs' duty cycle in the drain period under way, and the probes'
    /// run time when it started.
    cycle: DutyCycle,
    cycle_runs: ProbeCost,
    /// What the guard did since the last profile closed.
    notes: Vec<String>,
    /// Whether the start-up period has been measured (and left out).
    warmed_up: bool,
    /// The costs measured (the first [`MAX_COSTS_KEPT`]), for the summary's median.
    costs: Vec<f64>,
    /// The highest cost measured, and the turns down and up so far.
    peak: f64,
    turned: (u32, u32),
}

impl Guard {
    /// A guard holding the agent under `budget_percent` of the host's CPU (all its CPUs)
    /// for `probes` (which it asks to count their run time), or `None` when the budget is
    /// zero.
    pub fn start(budget_percent: f64, probes: &mut Probes) -> Option<Self> {
        if budget_percent <= 0.0 {
            return None;
        }
        if let Err(err) = probes.count_run_time() {
            tracing::warn!(
                "overhead guard: the probes' run time cannot be measured ({err}); it holds the agent's own CPU time under the budget only"
            );
        }
        let budget = budget_percent / 100.0;
        METRICS.guard_budget(budget);
        tracing::info!(
            "overhead guard: holding the agent under {budget_percent}% of the host's CPU"
        );
        let settings = Settings {
            tuning: probes.tuning(),
            duty: 1,
        };
        let offered = Lever::ALL
            .into_iter()
            .filter(|&lever| lever != Lever::SyscallDutyCycle || probes.syscall_detachable())
            .collect();
        let now = Instant::now();
        Some(Self {
            budget,
            configured: settings,
            settings,
            offered,
            raised: Vec::new(),
            last_turn: None,
            ineffective: Vec::new(),
            calm: 0,
            cpus: std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
            since: now,
            agent_cpu: own_cpu_time(),
            probes: probes.run_time(),
            cycle: DutyCycle::new(now, true),
            cycle_runs: probes.run_time(),
            notes: Vec::new(),
            warmed_up: false,
            costs: Vec::new(),
            peak: 0.0,
            turned: (0, 0),
        })
    }

    /// Called as the sampling loop turns: under a duty cycle, attaches the syscall
    /// programs when their window in the drain period opens and detaches them when it
    /// closes.
    pub fn tick(&mut self, probes: &mut Probes) {
        if let Some(attach) = self.cycle.due(Instant::now())
            && let Err(err) = probes.attach_syscall_programs(attach)
        {
            tracing::warn!("overhead guard: attaching or detaching the syscall programs: {err}");
        }
    }

    /// What the syscall signal's drained totals stand for: the drain period, the part of
    /// it the syscall programs were attached, and what they cost a syscall meanwhile.
    pub fn syscall_scale(&self, probes: &Probes, drained_at: Instant) -> DutyScale {
        let (period, attached) = self.cycle.span(drained_at);
        let spent = probes.run_time().minus(&self.cycle_runs);
        // Each syscall seen runs both programs.
        let syscalls = u32::try_from(spent.syscall_runs / 2).unwrap_or(u32::MAX);
        DutyScale {
            period,
            attached,
            cost_per_event: spent.syscall.checked_div(syscalls).unwrap_or_default(),
        }
    }

    /// Starts the next drain period (of `interval`), begun by the drain at `drained_at`
    /// (events since then are in it, however long that drain took to ingest): under a
    /// duty cycle, the syscall programs' window in it starts at a random offset, so it
    /// does not always fall on the same moment after a drain, when the agent itself is
    /// busiest.
    pub fn new_period(&mut self, probes: &mut Probes, interval: Duration, drained_at: Instant) {
        let duty = u32::try_from(self.settings.duty).unwrap_or(u32::MAX).max(1);
        self.cycle = DutyCycle::new(drained_at, probes.syscall_attached());
        self.cycle_runs = probes.run_time();
        let now = Instant::now();
        if duty > 1 {
            self.cycle.plan(interval, duty, now);
        } else if !probes.syscall_attached() {
            match probes.attach_syscall_programs(true) {
                Ok(()) => self.cycle.attached_at(Instant::now()),
                Err(err) => {
                    tracing::warn!("overhead guard: attaching the syscall programs again: {err}");
                }
            }
        }
        self.tick(probes);
    }

    /// Measures the period since the last call (once it is long enough) and turns a
    /// lever if the cost calls for it.
    pub fn check(&mut self, probes: &mut Probes) {
        let now = Instant::now();
        let wall = now.saturating_duration_since(self.since);
        if wall < MIN_PERIOD {
            return;
        }
        let agent_cpu = own_cpu_time();
        let run_time = probes.run_time();
        let spent = run_time.minus(&self.probes);
        let capacity = wall.as_secs_f64() * self.cpus;
        let cost = Cost {
            agent: agent_cpu.saturating_sub(self.agent_cpu).as_secs_f64() / capacity,
            probes: spent.total().as_secs_f64() / capacity,
        };
        (self.since, self.agent_cpu, self.probes) = (now, agent_cpu, run_time);
        if !std::mem::replace(&mut self.warmed_up, true) {
            // The first period holds the agent's start-up (loading the probes, reading
            // every process, symbolizing the first stacks): a cost paid once.
            return;
        }
        self.peak = self.peak.max(cost.total());
        if self.costs.len() < MAX_COSTS_KEPT {
            self.costs.push(cost.total());
        }
        METRICS.guard_cost(cost.agent, cost.probes);
        let measured = format!(
            "agent at {:.2}% of the host's CPU ({:.2}% own, {:.2}% probes), budget {:.2}%",
            cost.total() * 100.0,
            cost.agent * 100.0,
            cost.probes * 100.0,
            self.budget * 100.0
        );
        if self.engaged() {
            tracing::info!("overhead guard: {measured}");
        } else {
            tracing::debug!("overhead guard: {measured}");
        }
        let share = |lever: Lever| lever.cost(&spent).as_secs_f64() / capacity;
        if let Some((lever, previous, before)) = self.last_turn.take()
            && share(lever) > before * EFFECTIVE_SHARE
            && !self.ineffective.contains(&lever)
        {
            // A step that buys little costs accuracy for nothing: undone.
            let tried = lever.get(&self.settings);
            let mut settings = self.settings;
            lever.set(&mut settings, previous);
            if settings.tuning == self.settings.tuning || probes.tune(settings.tuning).is_ok() {
                self.settings = settings;
                if previous == lever.get(&self.configured) {
                    self.raised.retain(|&l| l != lever);
                }
                METRICS.guard_turned(lever as usize, false);
                self.turned.1 += 1;
            }
            let note = format!(
                "overhead guard: {} saved too little ({:.2}% of the host's CPU before, {:.2}% after): back to {}, trying the next lever",
                lever.describe(tried),
                before * 100.0,
                share(lever) * 100.0,
                lever.value_text(lever.get(&self.settings))
            );
            tracing::info!("{note}");
            self.notes.push(note);
            self.ineffective.push(lever);
        }
        let offered: Vec<Lever> = self
            .offered
            .iter()
            .copied()
            .filter(|lever| !self.ineffective.contains(lever))
            .collect();
        let next = decide(
            self.budget,
            cost.total(),
            &spent,
            (&self.configured, &self.settings),
            (&offered, &self.raised),
            &mut self.calm,
        );
        let Some((lever, value)) = next else {
            return;
        };
        let before = lever.get(&self.settings);
        let mut settings = self.settings;
        lever.set(&mut settings, value);
        if settings.tuning != self.settings.tuning
            && let Err(err) = probes.tune(settings.tuning)
        {
            tracing::warn!("overhead guard: could not retune the probes: {err}");
            return;
        }
        self.settings = settings;
        let engaged = value > before;
        if engaged {
            self.raised.push(lever);
            self.turned.0 += 1;
            self.last_turn = Some((lever, before, share(lever)));
        } else {
            self.turned.1 += 1;
            self.ineffective.retain(|&l| l != lever);
            if value == lever.get(&self.configured) {
                self.raised.retain(|&l| l != lever);
            }
        }
        let what = if engaged {
            "over budget"
        } else {
            "well under budget"
        };
        let note = format!(
            "overhead guard: {measured}, {what}: {} (was {})",
            lever.describe(value),
            lever.value_text(before),
        );
        tracing::info!("{note}");
        self.notes.push(note);
        METRICS.guard_turned(lever as usize, engaged);
    }

    /// Logs what the guard saw and did over the whole recording.
    pub fn summarize(&self) {
        let mut costs = self.costs.clone();
        costs.sort_by(f64::total_cmp);
        let median = costs.get(costs.len() / 2).copied().unwrap_or_default();
        tracing::info!(
            "overhead guard: highest cost {:.2}% of the host's CPU, median {:.2}% (budget {:.2}%); {} steps down, {} back up",
            self.peak * 100.0,
            median * 100.0,
            self.budget * 100.0,
            self.turned.0,
            self.turned.1
        );
    }

    /// Whether any lever is turned down now.
    pub fn engaged(&self) -> bool {
        !self.raised.is_empty()
    }

    /// What the guard did since the last call, and what holds now, for a profile's notes.
    pub fn take_notes(&mut self) -> Vec<String> {
        let mut notes = std::mem::take(&mut self.notes);
        for lever in Lever::ALL {
            let value = lever.get(&self.settings);
            if value != lever.get(&self.configured) {
                notes.push(format!(
                    "overhead guard holds: {} (configured {})",
                    lever.describe(value),
                    lever.value_text(lever.get(&self.configured))
                ));
            }
        }
        notes
    }
}

/// The lever to turn and its new setting, if any: over `budget`, one step down for the
/// offered lever whose programs cost the most and can still turn; after [`CALM_DRAINS`]
/// drains under [`CALM_SHARE`] of it, one step back for the last lever turned (never past
/// its configured setting).
fn decide(
    budget: f64,
    cost: f64,
    spent: &ProbeCost,
    (configured, settings): (&Settings, &Settings),
    (offered, raised): (&[Lever], &[Lever]),
    calm: &mut u32,
) -> Option<(Lever, u64)> {
    if cost > budget {
        *calm = 0;
        // Reversed: of levers that cost the same, `max_by_key` keeps the last, the first.
        return offered
            .iter()
            .rev()
            .filter(|lever| lever.get(settings) < lever.limit() && !lever.cost(spent).is_zero())
            .max_by_key(|lever| lever.cost(spent))
            .map(|&lever| {
                let value = (lever.get(settings).max(1) * STEP).min(lever.limit());
                (lever, value)
            });
    }
    if cost >= budget * CALM_SHARE {
        *calm = 0;
        return None;
    }
    let &lever = raised.last()?;
    *calm += 1;
    if *calm < CALM_DRAINS {
        return None;
    }
    *calm = 0;
    let value = (lever.get(settings) / STEP).max(lever.get(configured));
    Some((lever, value))
}

/// CPU time (user and system) of the agent's process so far.
fn own_cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is valid, and getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid out-pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) } != 0 {
        return Duration::ZERO;
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use agent_common::Tuning;

    use super::*;

    const CONFIGURED: Settings = Settings {
        tuning: Tuning::DEFAULT,
        duty: 1,
    };

    fn spent(syscall_ms: u64, scheduler_ms: u64) -> ProbeCost {
        ProbeCost {
            syscall: Duration::from_millis(syscall_ms),
            scheduler: Duration::from_millis(scheduler_ms),
            ..ProbeCost::default()
        }
    }

    fn over(spent: &ProbeCost, settings: &Settings, offered: &[Lever]) -> Option<(Lever, u64)> {
        decide(
            0.01,
            0.03,
            spent,
            (&CONFIGURED, settings),
            (offered, &[]),
            &mut 0,
        )
    }

    #[test]
    fn over_budget_turns_the_costliest_lever_one_step() {
        let all = Lever::ALL;
        assert_eq!(
            over(&spent(50, 10), &CONFIGURED, &all),
            Some((Lever::SyscallSampling, 4))
        );
        assert_eq!(
            over(&spent(5, 10), &CONFIGURED, &all),
            Some((Lever::OffCpuStackThreshold, 4_000_000))
        );
        // Sampling at its limit: the duty cycle next, where offered.
        let mut sparse = CONFIGURED;
        sparse.tuning.syscall_sample_every = 1024;
        assert_eq!(
            over(&spent(50, 10), &sparse, &all),
            Some((Lever::SyscallDutyCycle, 4))
        );
        let without_duty = [
            Lever::SyscallSampling,
            Lever::OffCpuStackThreshold,
            Lever::LockStackThreshold,
        ];
        assert_eq!(
            over(&spent(50, 10), &sparse, &without_duty),
            Some((Lever::OffCpuStackThreshold, 4_000_000))
        );
        // Every lever of a cost at its limit, or nothing spent where one can turn.
        sparse.duty = 16;
        assert_eq!(over(&spent(50, 0), &sparse, &all), None);
    }

    #[test]
    fn well_under_budget_for_a_while_turns_the_last_lever_back() {
        let mut settings = CONFIGURED;
        settings.tuning.syscall_sample_every = 64;
        let raised = [Lever::SyscallSampling];
        let all = Lever::ALL;
        let quiet = spent(1, 1);
        let mut calm = 0;
        let under = |cost: f64, configured: &Settings, settings: &Settings, calm: &mut u32| {
            decide(
                0.01,
                cost,
                &quiet,
                (configured, settings),
                (&all, &raised),
                calm,
            )
        };
        for _ in 1..CALM_DRAINS {
            assert_eq!(under(0.001, &CONFIGURED, &settings, &mut calm), None);
        }
        assert_eq!(
            under(0.001, &CONFIGURED, &settings, &mut calm),
            Some((Lever::SyscallSampling, 16))
        );
        // Between half the budget and the budget: hold.
        let mut calm = 0;
        for _ in 0..5 {
            assert_eq!(under(0.007, &CONFIGURED, &settings, &mut calm), None);
        }
        // Never past the configured setting.
        let mut configured16 = CONFIGURED;
        configured16.tuning.syscall_sample_every = 16;
        settings.tuning.syscall_sample_every = 32;
        let mut calm = CALM_DRAINS;
        assert_eq!(
            under(0.0, &configured16, &settings, &mut calm),
            Some((Lever::SyscallSampling, 16))
        );
        // Nothing raised, nothing to turn back.
        assert_eq!(
            decide(
                0.01,
                0.0,
                &quiet,
                (&CONFIGURED, &CONFIGURED),
                (&all, &[]),
                &mut calm
            ),
            None
        );
    }
}
