//! Accumulates drained generations into a profile: exact totals and stack samples are
//! summed, stacks are symbolized as soon as they are first seen (while their process is
//! still alive), and `finish` turns everything into a [`Profile`], calibrating
//! threshold-sampled stacks against the exact totals.

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
};

use agent_common::{
    FLAG_KERNEL_THREAD, FLAG_KSTACK_FAILED, FLAG_USER_LEAF_ONLY, FLAG_USTACK_FAILED, Loss,
    NO_STACK, OffCpuState, SampleKey, SampleValue, Signal, StackTrace, TotalKey, TotalValue,
};
use stallscope_profile::{Frame, FrameId, Labels, Meta, Profile, SampleType};

use crate::{calibrate, probes::Drained, symbolize::Symbolizer};

/// Raw stacks kept for samples that refer to them in a later generation (the
/// classic-tracepoint path stores stacks at switch-out, counts the wait at switch-in).
const RAW_STACK_CAPACITY: usize = 65_536;

/// Name of the synthetic frame standing for stacks that could not be resolved.
pub const LOST_STACK_FRAME: &str = "[stack lost]";

pub const fn signal_label(signal: Signal) -> &'static str {
    match signal {
        Signal::OffCpu => "off-cpu",
        Signal::OnCpu => "on-cpu",
    }
}

pub const fn state_label(state: OffCpuState) -> &'static str {
    match state {
        OffCpuState::Runnable => "runnable",
        OffCpuState::Interruptible => "interruptible",
        OffCpuState::Uninterruptible => "uninterruptible",
        OffCpuState::Idle => "idle",
        OffCpuState::Other => "other",
    }
}

/// The pprof sample types of a signal: time and events.
pub fn sample_types(signal: Signal) -> [SampleType; 2] {
    match signal {
        Signal::OffCpu => [
            SampleType::new("off_cpu", "nanoseconds"),
            SampleType::new("off_cpu_events", "count"),
        ],
        Signal::OnCpu => [
            SampleType::new("on_cpu", "nanoseconds"),
            SampleType::new("on_cpu_samples", "count"),
        ],
    }
}

/// An off-CPU calibration group: (tgid, tid, state).
type GroupKey = (u32, u32, u8);

/// Sums of everything drained so far.
pub struct Accumulator {
    profile: Profile,
    signals: Vec<Signal>,
    totals: HashMap<TotalKey, TotalValue>,
    samples: HashMap<SampleKey, SampleValue>,
    raw_stacks: HashMap<u64, StackTrace>,
    raw_order: VecDeque<u64>,
    kernel_stacks: HashMap<(u64, bool), Vec<FrameId>>,
    user_stacks: HashMap<(u32, u64), Vec<FrameId>>,
    process_names: HashMap<u32, String>,
    thread_names: HashMap<u32, String>,
    losses: [u64; Loss::COUNT as usize],
    reported_losses: [u64; Loss::COUNT as usize],
    unresolved_stacks: u64,
    symbolizer: Symbolizer,
}

impl Accumulator {
    pub fn new(signals: &[Signal]) -> Self {
        let types = signals
            .iter()
            .flat_map(|&signal| sample_types(signal))
            .collect();
        Self {
            profile: Profile::new(types),
            signals: signals.to_vec(),
            totals: HashMap::new(),
            samples: HashMap::new(),
            raw_stacks: HashMap::new(),
            raw_order: VecDeque::new(),
            kernel_stacks: HashMap::new(),
            user_stacks: HashMap::new(),
            process_names: HashMap::new(),
            thread_names: HashMap::new(),
            losses: [0; Loss::COUNT as usize],
            reported_losses: [0; Loss::COUNT as usize],
            unresolved_stacks: 0,
            symbolizer: Symbolizer::new(),
        }
    }

    /// Off-CPU waits and on-CPU samples counted so far (for progress lines).
    pub fn event_counts(&self) -> (u64, u64) {
        let offcpu = self
            .totals
            .iter()
            .filter(|(key, _)| key.signal == Signal::OffCpu as u8)
            .map(|(_, value)| value.count)
            .sum();
        let oncpu = self
            .samples
            .iter()
            .filter(|(key, _)| key.signal == Signal::OnCpu as u8)
            .map(|(_, value)| value.count)
            .sum();
        (offcpu, oncpu)
    }

    /// Events lost so far, all reasons together.
    pub fn lost_events(&self) -> u64 {
        self.losses.iter().sum::<u64>() + self.unresolved_stacks
    }

    /// Adds one drained generation.
    pub fn ingest(&mut self, drained: Drained) {
        for (hash, stack) in drained.stacks {
            if self.raw_stacks.insert(hash, stack).is_none() {
                self.raw_order.push_back(hash);
            }
        }
        while self.raw_order.len() > RAW_STACK_CAPACITY {
            if let Some(old) = self.raw_order.pop_front() {
                self.raw_stacks.remove(&old);
            }
        }
        for (key, value) in drained.totals {
            let entry = self.totals.entry(key).or_default();
            entry.ns += value.ns;
            entry.count += value.count;
            self.remember_identity(key.tgid, key.tid);
        }
        for (key, value) in drained.samples {
            self.resolve_stacks(&key);
            self.remember_identity(key.tgid, key.tid);
            let entry = self.samples.entry(key).or_default();
            entry.ns += value.ns;
            entry.count += value.count;
            entry.est_ns += value.est_ns;
            entry.est_count_fp += value.est_count_fp;
        }
        self.losses = drained.losses;
    }

    fn remember_identity(&mut self, tgid: u32, tid: u32) {
        self.process_names.entry(tgid).or_insert_with(|| {
            read_comm(&Path::new("/proc").join(tgid.to_string()))
                .unwrap_or_else(|| format!("[pid {tgid}]"))
        });
        self.thread_names.entry(tid).or_insert_with(|| {
            let path = Path::new("/proc")
                .join(tgid.to_string())
                .join("task")
                .join(tid.to_string());
            read_comm(&path).unwrap_or_else(|| format!("[tid {tid}]"))
        });
    }

    /// Symbolized frames of a raw stack, or a lost-stack marker if it is gone.
    fn symbolize_raw(
        &mut self,
        hash: u64,
        user_pid: Option<u32>,
        leaf_exact: bool,
    ) -> Vec<FrameId> {
        let frames = if let Some(stack) = self.raw_stacks.get(&hash) {
            let ips = &stack.ips[..(stack.len as usize).min(stack.ips.len())];
            match user_pid {
                Some(pid) => self.symbolizer.user_frames(pid, ips, leaf_exact),
                None => self.symbolizer.kernel_frames(ips, leaf_exact),
            }
        } else {
            self.unresolved_stacks += 1;
            vec![Frame::synthetic(LOST_STACK_FRAME)]
        };
        frames.into_iter().map(|f| self.profile.intern(f)).collect()
    }

    /// Symbolizes the stacks of a sample the first time they are seen.
    fn resolve_stacks(&mut self, key: &SampleKey) {
        let leaf_exact = key.signal == Signal::OnCpu as u8;
        if key.kstack != NO_STACK && !self.kernel_stacks.contains_key(&(key.kstack, leaf_exact)) {
            let ids = self.symbolize_raw(key.kstack, None, leaf_exact);
            self.kernel_stacks.insert((key.kstack, leaf_exact), ids);
        }
        if key.ustack != NO_STACK && !self.user_stacks.contains_key(&(key.tgid, key.ustack)) {
            let ids = self.symbolize_raw(key.ustack, Some(key.tgid), true);
            self.user_stacks.insert((key.tgid, key.ustack), ids);
        }
    }

    /// The frames of a sample, innermost first: kernel frames, then user frames.
    fn stack_of(&self, key: &SampleKey) -> Vec<FrameId> {
        let leaf_exact = key.signal == Signal::OnCpu as u8;
        let mut stack = Vec::new();
        if key.kstack != NO_STACK
            && let Some(ids) = self.kernel_stacks.get(&(key.kstack, leaf_exact))
        {
            stack.extend_from_slice(ids);
        }
        if key.ustack != NO_STACK
            && let Some(ids) = self.user_stacks.get(&(key.tgid, key.ustack))
        {
            stack.extend_from_slice(ids);
        }
        stack
    }

    fn labels(&self, signal: Signal, tgid: u32, tid: u32, class: u8, flags: u8) -> Labels {
        let mut labels = Labels::new();
        labels.insert("signal".into(), signal_label(signal).into());
        labels.insert("pid".into(), tgid.to_string());
        labels.insert("tid".into(), tid.to_string());
        if let Some(name) = self.process_names.get(&tgid) {
            labels.insert("process".into(), name.clone());
        }
        if let Some(name) = self.thread_names.get(&tid) {
            labels.insert("thread".into(), name.clone());
        }
        if signal == Signal::OffCpu
            && let Some(state) = OffCpuState::from_u8(class)
        {
            labels.insert("state".into(), state_label(state).into());
        }
        if let Some(note) = stack_note(flags) {
            labels.insert("stack_note".into(), note.into());
        }
        labels
    }

    /// Builds the profile of everything accumulated since the last `finish`, and starts
    /// over (the frame table and symbol caches are kept).
    pub fn finish(&mut self, mut meta: Meta) -> Profile {
        let mut profile = Profile::new(self.profile.sample_types.clone());
        profile.frames.clone_from(&self.profile.frames);
        let totals = std::mem::take(&mut self.totals);
        let samples = std::mem::take(&mut self.samples);

        // Off-CPU: calibrate each (thread, state) group against its exact totals.
        let mut groups: HashMap<GroupKey, Vec<(&SampleKey, &SampleValue)>> = HashMap::new();
        for (key, value) in &samples {
            if key.signal == Signal::OffCpu as u8 {
                groups
                    .entry((key.tgid, key.tid, key.class))
                    .or_default()
                    .push((key, value));
            }
        }
        let time_index = self.value_index(Signal::OffCpu);
        for (key, total) in &totals {
            if key.signal != Signal::OffCpu as u8 {
                continue;
            }
            let group_key = (key.tgid, key.tid, key.class);
            let members = groups.remove(&group_key).unwrap_or_default();
            let parts: Vec<calibrate::Part> = members
                .iter()
                .map(|(_, value)| calibrate::Part::from_value(value))
                .collect();
            let calibrated = calibrate::calibrate(total.ns, total.count, &parts);
            if let Some(index) = time_index {
                for ((sample_key, _), (ns, count)) in members.iter().zip(&calibrated.parts) {
                    let labels = self.labels(
                        Signal::OffCpu,
                        sample_key.tgid,
                        sample_key.tid,
                        sample_key.class,
                        sample_key.flags,
                    );
                    let stack = self.stack_of(sample_key);
                    add_values(&mut profile, stack, labels, index, *ns, *count);
                }
                if calibrated.unattributed_ns > 0 || calibrated.unattributed_count > 0 {
                    let frame = profile.intern(Frame::synthetic(calibrate::UNSAMPLED_FRAME));
                    let labels = self.labels(Signal::OffCpu, key.tgid, key.tid, key.class, 0);
                    add_values(
                        &mut profile,
                        vec![frame],
                        labels,
                        index,
                        calibrated.unattributed_ns,
                        calibrated.unattributed_count,
                    );
                }
            }
        }
        // Sampled waits whose totals landed in a later drain (a wait that straddled the
        // end): keep them as measured.
        for members in groups.into_values() {
            for (key, value) in members {
                if let Some(index) = time_index {
                    let (ns, count) = calibrate::Part::from_value(value).uncalibrated();
                    let labels =
                        self.labels(Signal::OffCpu, key.tgid, key.tid, key.class, key.flags);
                    add_values(&mut profile, self.stack_of(key), labels, index, ns, count);
                }
            }
        }
        // On-CPU samples are exact.
        if let Some(index) = self.value_index(Signal::OnCpu) {
            for (key, value) in &samples {
                if key.signal == Signal::OnCpu as u8 {
                    let labels = self.labels(Signal::OnCpu, key.tgid, key.tid, 0, key.flags);
                    add_values(
                        &mut profile,
                        self.stack_of(key),
                        labels,
                        index,
                        value.ns,
                        value.count,
                    );
                }
            }
        }
        // Frames interned while building belong to the shared table too.
        self.profile.frames.clone_from(&profile.frames);

        for loss in Loss::ALL {
            let index = loss as usize;
            let delta = self.losses[index].saturating_sub(self.reported_losses[index]);
            meta.losses.insert(loss.name().to_owned(), delta);
        }
        self.reported_losses = self.losses;
        meta.losses.insert(
            "stack_unresolved".to_owned(),
            std::mem::take(&mut self.unresolved_stacks),
        );
        let offcpu_total: u64 = totals
            .iter()
            .filter(|(key, _)| key.signal == Signal::OffCpu as u8)
            .map(|(_, value)| value.ns)
            .sum();
        if self.signals.contains(&Signal::OffCpu) {
            meta.notes
                .push(format!("off-CPU exact total: {offcpu_total} ns"));
        }
        profile.meta = meta;
        profile
    }

    fn value_index(&self, signal: Signal) -> Option<usize> {
        let [time, _] = sample_types(signal);
        self.profile.sample_type_index(&time.kind, &time.unit)
    }
}

/// Adds time and count to the two columns of a signal, starting at `index`.
fn add_values(
    profile: &mut Profile,
    stack: Vec<FrameId>,
    labels: Labels,
    index: usize,
    ns: u64,
    count: u64,
) {
    if ns == 0 && count == 0 {
        return;
    }
    let mut values = vec![0i64; profile.sample_types.len()];
    values[index] = i64::try_from(ns).unwrap_or(i64::MAX);
    if let Some(slot) = values.get_mut(index + 1) {
        *slot = i64::try_from(count).unwrap_or(i64::MAX);
    }
    profile.add(stack, labels, &values);
}

/// A short explanation of why a sample's stack is incomplete.
fn stack_note(flags: u8) -> Option<&'static str> {
    if flags & FLAG_KERNEL_THREAD != 0 {
        None
    } else if flags & FLAG_USER_LEAF_ONLY != 0 {
        Some("user stack: leaf frame only")
    } else if flags & FLAG_USTACK_FAILED != 0 {
        Some("user stack: capture failed")
    } else if flags & FLAG_KSTACK_FAILED != 0 {
        Some("kernel stack: capture failed")
    } else {
        None
    }
}

fn read_comm(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("comm"))
        .ok()
        .map(|comm| comm.trim_end().to_owned())
}
