//! Accumulates drained generations: exact totals and histograms and stack samples are
//! summed. Kernel stacks are symbolized when first seen; user stacks are normalized
//! against their process's memory map at drain time and symbolized per binary in the
//! background (`resolver.rs`), so a process that exited is still symbolized.
//! `assemble.rs` turns the sums into a profile.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    time::{Duration, Instant},
};

use agent_common::{
    FLAG_USER_BEFORE_EXEC, LOSS_COUNTERS, NO_STACK, Peer, STACK_USER, SampleKey, SampleValue,
    Signal, StackEnd, TotalKey,
};
use stallscope_profile::{Frame, FrameId, FrameKind, Labels, Profile};

use super::{stack_cache::StackCache, sums::Sums};
use crate::{
    naming,
    probes::Drained,
    symbols::resolver::{Resolver, ResolverSettings},
};

/// Name of the synthetic frame standing for stacks that could not be resolved.
pub const LOST_STACK_FRAME: &str = "[stack lost]";

/// Sums of everything drained so far.
pub struct Accumulator {
    /// Holds the frame table shared by every profile this accumulator produces.
    pub(crate) profile: Profile,
    pub(crate) signals: Vec<Signal>,
    pub(crate) totals: HashMap<TotalKey, Sums>,
    /// Whether totals keep their histograms and profiles carry them (`record`'s files
    /// do, `run`'s batches do not).
    pub(crate) keep_histograms: bool,
    pub(crate) samples: HashMap<SampleKey, SampleValue>,
    /// Raw stacks (the valid addresses only: whole `StackTrace`s, 1 KiB each, took
    /// 136 MiB on a busy host) and symbolized kernel stacks, kept while used.
    pub(crate) stacks: StackCache,
    /// User stacks of the profile being assembled (filled by `resolve_user_stacks`).
    user_stacks: HashMap<(u32, u64), Vec<FrameId>>,
    /// Of those, the ones probably cut short by a missing frame pointer.
    pub(crate) truncated_user_stacks: HashSet<(u32, u64)>,
    /// Identity labels of the processes of the profile being assembled.
    pub(crate) process_labels: HashMap<u32, Labels>,
    pub(crate) process_names: HashMap<u32, String>,
    pub(crate) thread_names: HashMap<u32, String>,
    /// User stacks drained this period, by how their walk ended ([`StackEnd`]).
    pub(crate) user_stack_ends: [u64; StackEnd::COUNT],
    /// Samples carry a `tid` label (see `ResolverSettings::thread_ids`).
    pub(crate) thread_ids: bool,
    pub(crate) device_names: HashMap<u32, String>,
    /// Peers of the network signals, by id.
    pub(crate) peers: HashMap<u32, Peer>,
    pub(crate) losses: Vec<u64>,
    pub(crate) reported_losses: Vec<u64>,
    pub(crate) unresolved_stacks: u64,
    /// User stacks whose raw addresses were gone before they could be normalized.
    lost_user_stacks: HashSet<(u32, u64)>,
    /// Read timeouts already reported in an earlier profile.
    pub(crate) reported_timeouts: u64,
    /// When the probes started measuring: no wait they report started earlier.
    measuring_since: Option<Instant>,
    /// Whether a broken wait-window invariant was logged already (once is enough).
    window_violation_logged: bool,
    pub resolver: Resolver,
}

/// Signals whose waits of one thread never overlap: a thread waits for one thing at a
/// time, so its waits add up to at most the time it was measured.
pub(crate) const THREAD_WAIT_SIGNALS: [Signal; 4] = [
    Signal::OffCpu,
    Signal::RunQueue,
    Signal::Lock,
    Signal::SocketWait,
];

/// Clock slack of the wait-window check (the probes' clock and the agent's are the same
/// monotonic clock; this covers reading it at slightly different moments).
const WINDOW_SLACK: Duration = Duration::from_millis(10);

impl Accumulator {
    pub fn new(signals: &[Signal], settings: ResolverSettings) -> Self {
        let types = signals
            .iter()
            .flat_map(|&signal| naming::sample_types(signal))
            .collect();
        Self {
            profile: Profile::new(types),
            signals: signals.to_vec(),
            totals: HashMap::new(),
            keep_histograms: true,
            samples: HashMap::new(),
            stacks: StackCache::default(),
            user_stacks: HashMap::new(),
            truncated_user_stacks: HashSet::new(),
            process_labels: HashMap::new(),
            process_names: HashMap::new(),
            thread_names: HashMap::new(),
            user_stack_ends: [0; StackEnd::COUNT],
            thread_ids: settings.thread_ids,
            device_names: HashMap::new(),
            peers: HashMap::new(),
            losses: vec![0; LOSS_COUNTERS as usize],
            reported_losses: vec![0; LOSS_COUNTERS as usize],
            unresolved_stacks: 0,
            lost_user_stacks: HashSet::new(),
            reported_timeouts: 0,
            measuring_since: None,
            window_violation_logged: false,
            resolver: Resolver::new(settings),
        }
    }

    /// Events counted so far, per signal (for progress lines).
    pub fn event_counts(&self) -> Vec<(Signal, u64)> {
        self.signals
            .iter()
            .map(|&signal| {
                let count = if signal == Signal::OnCpu {
                    self.samples
                        .iter()
                        .filter(|(key, _)| key.signal == signal as u8)
                        .map(|(_, value)| value.count)
                        .sum()
                } else {
                    self.totals
                        .iter()
                        .filter(|(key, _)| key.signal == signal as u8)
                        .map(|(_, value)| value.count)
                        .sum()
                };
                (signal, count)
            })
            .collect()
    }

    /// Events lost so far, all reasons together.
    pub fn lost_events(&self) -> u64 {
        self.losses.iter().sum::<u64>() + self.unresolved_stacks
    }

    /// Adds one drained generation.
    pub fn ingest(&mut self, drained: Drained) {
        if self.measuring_since.is_none() {
            self.measuring_since = drained.measuring_since;
        }
        self.resolver.apply_reports();
        // Names the probes saw win over /proc: they outlive the threads.
        for (id, name) in drained.names {
            self.thread_names.insert(id, name);
        }
        self.peers.extend(drained.peers);
        for stack in drained.stacks {
            if stack.flags & STACK_USER != 0
                && let Some(end) = StackEnd::of_flags(stack.flags)
            {
                self.user_stack_ends[end as usize] += 1;
            }
            self.stacks.insert_raw(stack.hash, &stack.ips);
        }
        self.stacks.bound_raw();
        let keep_histograms = self.keep_histograms;
        for (key, value) in drained.totals {
            (self.totals.entry(key))
                .or_insert_with(|| Sums::new(keep_histograms))
                .add(&value);
            self.remember_identity(key.tgid, key.tid);
            if key.signal == Signal::Disk as u8 {
                self.device_names
                    .entry(key.aux)
                    .or_insert_with(|| naming::device_name(key.aux));
            }
        }
        for (key, value) in drained.samples {
            let key = self.resolve_stacks(key);
            self.remember_identity(key.tgid, key.tid);
            let entry = self.samples.entry(key).or_default();
            entry.ns += value.ns;
            entry.count += value.count;
            entry.est_ns += value.est_ns;
            entry.est_count_fp += value.est_count_fp;
            entry.tail_ns += value.tail_ns;
        }
        if drained.losses.len() == self.losses.len() {
            self.losses = drained.losses;
        }
        self.resolver.poll();
    }

    /// The invariant of per-thread waits: for each signal of [`THREAD_WAIT_SIGNALS`], no
    /// thread waited longer in total than the probes have been measuring (every wait
    /// reported started after they loaded, and one thread's waits do not overlap). A
    /// violation means a wait was counted twice somewhere: the threads that break it are
    /// counted per signal (`<signal>.thread_wait_exceeds_window`, a loss) and the first
    /// one is logged.
    pub(crate) fn check_wait_window(
        &mut self,
        totals: &HashMap<TotalKey, Sums>,
    ) -> Vec<(Signal, u64)> {
        let Some(since) = self.measuring_since else {
            return Vec::new();
        };
        let window = since.elapsed() + WINDOW_SLACK;
        let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        let mut per_thread: HashMap<(u8, u32, u32), u64> = HashMap::new();
        for (key, value) in totals {
            if key.tid != 0 && THREAD_WAIT_SIGNALS.iter().any(|&s| s as u8 == key.signal) {
                *per_thread
                    .entry((key.signal, key.tgid, key.tid))
                    .or_default() += value.ns;
            }
        }
        let mut violations: Vec<(Signal, u64)> = Vec::new();
        for &signal in &THREAD_WAIT_SIGNALS {
            let mut broken: Vec<(u32, u32, u64)> = per_thread
                .iter()
                .filter(|((s, _, _), ns)| *s == signal as u8 && **ns > window_ns)
                .map(|(&(_, tgid, tid), &ns)| (tgid, tid, ns))
                .collect();
            if broken.is_empty() {
                continue;
            }
            broken.sort_unstable();
            if !self.window_violation_logged {
                self.window_violation_logged = true;
                let (tgid, tid, ns) = broken[0];
                tracing::warn!(
                    "{}: thread {tid} of process {tgid} waited {:.3}s in a {:.3}s window: a wait was counted twice (counted as the loss {}.thread_wait_exceeds_window; logged once)",
                    naming::signal_label(signal),
                    ns as f64 / 1e9,
                    window.as_secs_f64(),
                    naming::signal_label(signal),
                );
            }
            violations.push((signal, broken.len() as u64));
        }
        violations
    }

    /// Reports [`Self::check_wait_window`] as losses, one per signal it checks.
    pub(crate) fn report_wait_window(
        &mut self,
        meta: &mut stallscope_profile::Meta,
        totals: &HashMap<TotalKey, Sums>,
    ) {
        let violations = self.check_wait_window(totals);
        for &signal in self
            .signals
            .iter()
            .filter(|signal| THREAD_WAIT_SIGNALS.contains(signal))
        {
            let broken = violations
                .iter()
                .find(|(s, _)| *s == signal)
                .map_or(0, |(_, count)| *count);
            meta.losses.insert(
                format!(
                    "{}.thread_wait_exceeds_window",
                    naming::signal_label(signal)
                ),
                broken,
            );
        }
    }

    /// Starts reading the processes that exist already (all, or the target).
    pub fn discover_processes(&mut self) {
        self.resolver.discover_existing();
    }

    fn remember_identity(&mut self, tgid: u32, tid: u32) {
        if tgid == 0 {
            return;
        }
        self.resolver.discover(tgid);
        // The probes' name of the main thread is the process's name: no read needed.
        let known = self.thread_names.get(&tgid).cloned();
        self.process_names.entry(tgid).or_insert_with(|| {
            known
                .or_else(|| read_comm(&Path::new("/proc").join(tgid.to_string())))
                .unwrap_or_else(|| format!("[pid {tgid}]"))
        });
        if tid == 0 {
            return;
        }
        self.thread_names.entry(tid).or_insert_with(|| {
            let path = Path::new("/proc")
                .join(tgid.to_string())
                .join("task")
                .join(tid.to_string());
            read_comm(&path).unwrap_or_else(|| format!("[tid {tid}]"))
        });
    }

    /// Symbolized kernel frames of a raw stack, or a lost-stack marker if it is gone.
    fn symbolize_kernel(&mut self, hash: u64, leaf_exact: bool) -> Vec<FrameId> {
        let frames = if let Some(ips) = self.stacks.raw(hash) {
            let mut frames = self.resolver.kernel.frames(ips, leaf_exact);
            // A kernel stack the probe walked in its own context starts with the probe
            // itself (the program and the tracepoint's trampoline): not part of the traced
            // code path.
            let probe = frames
                .iter()
                .take_while(|f| {
                    ["bpf_prog_", "bpf_trace_run", "__bpf_trace_"]
                        .iter()
                        .any(|p| f.function.starts_with(p))
                })
                .count();
            frames.drain(..probe);
            frames
        } else {
            self.unresolved_stacks += 1;
            vec![Frame::synthetic(LOST_STACK_FRAME)]
        };
        frames.into_iter().map(|f| self.profile.intern(f)).collect()
    }

    /// Whether the first kernel frame of a sample's stack is an exact instruction pointer
    /// (interrupted code) rather than a return address.
    fn leaf_exact(key: &SampleKey) -> bool {
        key.signal == Signal::OnCpu as u8
    }

    /// Symbolizes the kernel stack of a sample the first time it is seen, and hands its
    /// user stack to the resolver (normalized now, symbolized in the background). Returns
    /// the key to accumulate under: without its user stack if the wait was inside exec.
    fn resolve_stacks(&mut self, mut key: SampleKey) -> SampleKey {
        let leaf_exact = Self::leaf_exact(&key);
        if key.kstack != NO_STACK && !self.stacks.touch_kernel((key.kstack, leaf_exact)) {
            let ids = self.symbolize_kernel(key.kstack, leaf_exact);
            let exec = in_exec(&self.function_names(&ids));
            self.stacks
                .insert_kernel((key.kstack, leaf_exact), ids, exec);
        }
        if key.ustack != NO_STACK && self.stacks.in_exec(key.kstack) {
            key.ustack = NO_STACK;
            key.flags |= FLAG_USER_BEFORE_EXEC;
        }
        if key.ustack != NO_STACK {
            match self.stacks.raw(key.ustack) {
                Some(ips) => {
                    self.resolver.add_user_stack(key.tgid, key.ustack, ips);
                }
                None => {
                    if self.lost_user_stacks.insert((key.tgid, key.ustack)) {
                        self.unresolved_stacks += 1;
                    }
                }
            }
        }
        key
    }

    /// Settles the resolver and turns the user stacks of `samples` into frames of the
    /// profile's table, with the identity labels of their processes.
    pub(crate) fn resolve_user_stacks(&mut self, samples: &HashMap<SampleKey, SampleValue>) {
        self.resolver.settle();
        self.user_stacks.clear();
        self.truncated_user_stacks.clear();
        for key in samples.keys() {
            let id = (key.tgid, key.ustack);
            if key.ustack == NO_STACK || self.user_stacks.contains_key(&id) {
                continue;
            }
            let ids = match self.resolver.user_frames(key.tgid, key.ustack) {
                Some((frames, truncated)) => {
                    if truncated {
                        self.truncated_user_stacks.insert(id);
                    }
                    frames.into_iter().map(|f| self.profile.intern(f)).collect()
                }
                None => vec![self.profile.intern(Frame::synthetic(LOST_STACK_FRAME))],
            };
            self.user_stacks.insert(id, ids);
        }
        self.lost_user_stacks.clear();
    }

    /// Drops what only the profile just assembled needed.
    pub(crate) fn user_stacks_done(&mut self) {
        self.user_stacks.clear();
        self.truncated_user_stacks.clear();
        self.process_labels.clear();
    }

    /// Computes the identity labels of every process in `tgids`.
    pub(crate) fn resolve_process_labels(&mut self, tgids: impl IntoIterator<Item = u32>) {
        self.process_labels.clear();
        for tgid in tgids {
            if tgid == 0 || self.process_labels.contains_key(&tgid) {
                continue;
            }
            let comm = self.process_names.get(&tgid).map(String::as_str);
            let labels = self.resolver.labels(tgid, comm);
            self.process_labels.insert(tgid, labels);
        }
    }

    /// The kernel and the user frames of a sample, each innermost first.
    pub(crate) fn stacks_of(&self, key: &SampleKey) -> (&[FrameId], &[FrameId]) {
        let kernel = if key.kstack == NO_STACK {
            &[][..]
        } else {
            self.stacks
                .kernel((key.kstack, Self::leaf_exact(key)))
                .unwrap_or(&[])
        };
        let user = if key.ustack == NO_STACK {
            &[][..]
        } else {
            self.user_stacks
                .get(&(key.tgid, key.ustack))
                .map_or(&[][..], Vec::as_slice)
        };
        (kernel, user)
    }

    /// Function names of frames of the shared table, innermost first, for
    /// classification.
    pub(crate) fn function_names(&self, ids: &[FrameId]) -> Vec<&str> {
        function_names(&self.profile.frames, ids)
    }
}

/// Function names of frames of `frames`, innermost first, for classification.
pub(crate) fn function_names<'a>(frames: &'a [Frame], ids: &[FrameId]) -> Vec<&'a str> {
    ids.iter()
        .filter_map(|&id| frames.get(id as usize))
        .filter(|frame| frame.kind != FrameKind::Synthetic)
        .map(|frame| frame.function.as_str())
        .collect()
}

/// The kernel's `execve` path (5.9+; `kernel_execve` when the kernel starts a program).
const EXEC_FUNCTIONS: [&str; 3] = ["bprm_execve", "do_execveat_common", "kernel_execve"];

/// Whether a kernel stack (function names, innermost first) is inside `execve`: from its
/// start the user registers are those of the call in the program being replaced, and
/// once the new memory map is in place a walk of them reads the new program's memory.
/// Either way the user stack belongs to no image the process's snapshot shows.
fn in_exec(kernel_functions: &[&str]) -> bool {
    kernel_functions.iter().any(|function| {
        let name = function.split_once('.').map_or(*function, |(name, _)| name);
        EXEC_FUNCTIONS.contains(&name)
    })
}

fn read_comm(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("comm"))
        .ok()
        .map(|comm| comm.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use stallscope_profile::Meta;

    use super::*;

    #[test]
    fn waits_inside_execve_are_told_by_their_kernel_stack() {
        assert!(in_exec(&[
            "do_close_on_exec",
            "begin_new_exec",
            "load_elf_binary",
            "bprm_execve",
            "do_execveat_common.isra.0",
            "__x64_sys_execve",
        ]));
        assert!(in_exec(&[
            "schedule",
            "kernel_execve",
            "call_usermodehelper_exec_async"
        ]));
        assert!(!in_exec(&[
            "schedule",
            "do_nanosleep",
            "__x64_sys_clock_nanosleep"
        ]));
        assert!(!in_exec(&["bprm_execve_ish"]));
    }

    fn lock_total(tid: u32, ns: u64) -> (TotalKey, Sums) {
        let key = TotalKey {
            tgid: 7,
            tid,
            signal: Signal::Lock as u8,
            ..TotalKey::default()
        };
        let value = Sums {
            count: 1,
            ns,
            ..Sums::default()
        };
        (key, value)
    }

    #[test]
    fn a_thread_waiting_longer_than_the_window_breaks_the_invariant() {
        let mut acc = Accumulator::new(&[Signal::Lock], ResolverSettings::default());
        acc.measuring_since = Instant::now().checked_sub(Duration::from_secs(1));
        // Two waits of one thread adding up to less than the window, and one thread
        // with more lock wait than time measured.
        let mut totals = HashMap::from([lock_total(1, 900_000_000), lock_total(3, 1_500_000_000)]);
        let (mut key, value) = lock_total(1, 50_000_000);
        key.class = 1;
        totals.insert(key, value);
        assert_eq!(acc.check_wait_window(&totals), [(Signal::Lock, 1)]);
        totals.remove(&lock_total(3, 0).0);
        assert!(acc.check_wait_window(&totals).is_empty());
    }

    /// Lock time of two threads of one process with the same name, as profiled.
    fn lock_samples(thread_ids: bool) -> Vec<(Labels, i64)> {
        let settings = ResolverSettings {
            thread_ids,
            ..ResolverSettings::default()
        };
        let mut acc = Accumulator::new(&[Signal::Lock], settings);
        acc.totals = HashMap::from([lock_total(1, 900), lock_total(3, 100)]);
        for tid in [1, 3] {
            acc.thread_names.insert(tid, "worker".into());
        }
        let profile = acc.finish(Meta::default()).into_profile();
        let ns = profile
            .sample_type_index("lock_wait", "nanoseconds")
            .expect("lock");
        profile
            .samples
            .iter()
            .map(|s| (s.labels.clone(), s.values[ns]))
            .collect()
    }

    #[test]
    fn threads_of_one_name_are_one_series_unless_thread_ids_are_asked_for() {
        let merged = lock_samples(false);
        assert_eq!(merged.len(), 1, "{merged:?}");
        assert_eq!(merged[0].1, 1000);
        assert_eq!(merged[0].0["thread"], "worker");
        assert!(!merged[0].0.contains_key("tid"));
        let mut apart: Vec<(String, i64)> = lock_samples(true)
            .into_iter()
            .map(|(labels, ns)| (labels["tid"].clone(), ns))
            .collect();
        apart.sort();
        assert_eq!(apart, [("1".to_owned(), 900), ("3".to_owned(), 100)]);
    }
}
