//! Turning accumulated sums into a profile. Every signal's samples add up to its exact
//! total: stack samples that were threshold-sampled are calibrated against the totals
//! (`calibrate.rs`), and whatever no stack accounts for becomes an explicit synthetic
//! frame. Off-CPU samples are split by cause (`cause.rs`): the runnable tail of a wait is
//! CPU contention, the blocked part is classified from its stacks. Signals that keep
//! histograms (run queue, lock, syscall, disk) get them too.

use std::collections::HashSet;

use agent_common::{
    ConnectOutcome, DiskOp, FLAG_KERNEL_THREAD, FLAG_KSTACK_FAILED, FLAG_NO_CONTEXT,
    FLAG_USER_BEFORE_EXEC, FLAG_USER_LEAF_ONLY, FLAG_USTACK_FAILED, FdKind, LockKind, OffCpuState,
    RunQueueKind, SampleKey, SampleValue, Signal, SocketOp, TcpEvent, TotalKey,
};
use stallscope_profile::{Frame, FrameId, Histogram, Labels, Meta};

use crate::{
    aggregate::{
        accumulate::{Accumulator, function_names},
        calibrate::{self, Calibrated, Part},
        cause::{self, Cause},
        groups::{Member, group_of, group_order, split_run},
        period::PeriodProfile,
        sums::{self, Sums},
    },
    naming,
    probes::syscalls,
};

/// The frame standing for the part of a group no stack accounts for.
fn remainder_frame(signal: Signal, key: &TotalKey) -> String {
    match signal {
        Signal::OffCpu | Signal::Lock | Signal::SocketWait => calibrate::UNSAMPLED_FRAME.to_owned(),
        Signal::Syscall => "[faster than the slow-syscall threshold: no stack]".to_owned(),
        Signal::RunQueue => format!(
            "[run queue: {}]",
            RunQueueKind::from_u8(key.class).map_or("?", naming::runqueue_label)
        ),
        Signal::Disk | Signal::OnCpu | Signal::Connect => "[no stack]".to_owned(),
        Signal::Tcp => format!(
            "[tcp {}]",
            TcpEvent::from_u8(key.class).map_or("?", naming::tcp_event_label)
        ),
    }
}

/// Labels shared by everything of one process/thread.
fn identity(acc: &Accumulator, signal: Signal, tgid: u32, tid: u32) -> Labels {
    let mut labels = Labels::new();
    labels.insert("signal".into(), naming::signal_label(signal).into());
    if tgid != 0 {
        labels.insert("pid".into(), tgid.to_string());
        if let Some(name) = acc.process_names.get(&tgid) {
            labels.insert("process".into(), name.clone());
        }
        if let Some(identity) = acc.process_labels.get(&tgid) {
            labels.extend(identity.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    if tid != 0 {
        if acc.thread_ids {
            labels.insert("tid".into(), tid.to_string());
        }
        if let Some(name) = acc.thread_names.get(&tid) {
            labels.insert("thread".into(), name.clone());
        }
    }
    labels
}

/// Labels of a totals group (what all its samples share).
fn group_labels(acc: &Accumulator, key: &TotalKey) -> Labels {
    let signal = Signal::from_u8(key.signal).unwrap_or(Signal::OffCpu);
    let mut labels = identity(acc, signal, key.tgid, key.tid);
    match signal {
        Signal::OffCpu => {
            if let Some(state) = OffCpuState::from_u8(key.class) {
                labels.insert("state".into(), naming::state_label(state).into());
            }
        }
        Signal::RunQueue => {
            if let Some(kind) = RunQueueKind::from_u8(key.class) {
                labels.insert("kind".into(), naming::runqueue_label(kind).into());
            }
        }
        Signal::Lock => {
            if let Some(kind) = LockKind::from_u8(key.class) {
                labels.insert("lock_kind".into(), naming::lock_kind_label(kind).into());
            }
        }
        Signal::Syscall => {
            labels.insert("syscall".into(), syscall_name(key.aux));
        }
        Signal::Disk => {
            if let Some(op) = DiskOp::from_u8(key.class) {
                labels.insert("op".into(), naming::disk_op_label(op).into());
            }
            let device = acc
                .device_names
                .get(&key.aux)
                .cloned()
                .unwrap_or_else(|| naming::device_name(key.aux));
            labels.insert("device".into(), device);
        }
        Signal::Connect => {
            if let Some(outcome) = ConnectOutcome::from_u8(key.class) {
                labels.insert(
                    "outcome".into(),
                    naming::connect_outcome_label(outcome).into(),
                );
            }
            peer_labels(acc, key, &mut labels);
        }
        Signal::SocketWait => {
            if let Some(op) = SocketOp::from_u8(key.class) {
                labels.insert("op".into(), naming::socket_op_label(op).into());
            }
            // The same time is off-CPU time of the `network` cause.
            labels.insert("cause".into(), Cause::Network.label().into());
            peer_labels(acc, key, &mut labels);
        }
        Signal::Tcp => {
            let event = TcpEvent::from_u8(key.class);
            if let Some(event) = event {
                labels.insert("event".into(), naming::tcp_event_label(event).into());
            }
            if event == Some(TcpEvent::Retransmit) {
                labels.insert("tcp_state".into(), naming::tcp_state_label(key.detail));
            }
            peer_labels(acc, key, &mut labels);
        }
        Signal::OnCpu => {}
    }
    labels
}

/// The peer labels of a network totals group (its `aux` is the peer id).
fn peer_labels(acc: &Accumulator, key: &TotalKey, labels: &mut Labels) {
    match acc.peers.get(&key.aux) {
        Some(peer) => {
            for (name, value) in naming::peer_labels(peer) {
                labels.insert(name.into(), value);
            }
        }
        None => {
            labels.insert("peer".into(), format!("[unknown peer {:#x}]", key.aux));
        }
    }
}

fn syscall_name(nr: u32) -> String {
    syscalls::name(nr).map_or_else(|| format!("syscall_{nr}"), str::to_owned)
}

/// Note on user stacks that end before their thread's entry point.
const TRUNCATED_NOTE: &str = "user stack: probably truncated (a function without a frame pointer)";

/// A short explanation of why a sample's stack is incomplete.
fn stack_note(acc: &Accumulator, key: &SampleKey) -> Option<&'static str> {
    let flags = key.flags;
    if flags & FLAG_KERNEL_THREAD != 0 {
        None
    } else if flags & FLAG_USER_LEAF_ONLY != 0 {
        Some("user stack: leaf frame only")
    } else if flags & FLAG_USTACK_FAILED != 0 {
        Some("user stack: capture failed")
    } else if flags & FLAG_USER_BEFORE_EXEC != 0 {
        Some("user stack: none (the wait was inside exec, in a program the process replaced)")
    } else if flags & FLAG_KSTACK_FAILED != 0 {
        Some("kernel stack: capture failed")
    } else if flags & FLAG_NO_CONTEXT != 0 {
        Some("not submitted in process context")
    } else if acc.truncated_user_stacks.contains(&(key.tgid, key.ustack)) {
        Some(TRUNCATED_NOTE)
    } else {
        None
    }
}

/// Adds time and count to the two columns of `signal`.
fn add(
    period: &mut PeriodProfile,
    signal: Signal,
    stack: &[FrameId],
    labels: &Labels,
    ns: u64,
    count: u64,
) {
    if ns == 0 && count == 0 {
        return;
    }
    let [time, _] = naming::sample_types(signal);
    let Some(column) = period.sample_type_index(&time.kind, &time.unit) else {
        return;
    };
    period.add(
        column,
        stack,
        labels,
        i64::try_from(ns).unwrap_or(i64::MAX),
        i64::try_from(count).unwrap_or(i64::MAX),
    );
}

impl Accumulator {
    /// Builds the profile of everything accumulated since the last `finish`, and starts
    /// over (the frame table and symbol caches are kept).
    pub fn finish(&mut self, mut meta: Meta) -> PeriodProfile {
        let mut totals = std::mem::take(&mut self.totals);
        let samples = std::mem::take(&mut self.samples);
        // User frames join the shared frame table before the profile copies it.
        self.resolve_user_stacks(&samples);
        let tgids: Vec<u32> = samples
            .keys()
            .map(|k| k.tgid)
            .chain(totals.keys().map(|k| k.tgid))
            .collect();
        let seen: HashSet<u32> = tgids
            .iter()
            .copied()
            .chain(samples.keys().map(|k| k.tid))
            .chain(totals.keys().map(|k| k.tid))
            .collect();
        self.resolve_process_labels(tgids);
        // The frame table goes with the period; the next one starts from the frames of
        // the kernel stacks kept (`forget_beyond`).
        let mut profile =
            PeriodProfile::new(std::mem::take(&mut self.profile), self.keep_histograms);

        // The samples by their totals group: references into the period's table, sorted
        // (a copy grouped in a map of vectors cost up to 480 bytes a sample, most groups
        // holding one, at the period's end).
        let mut grouped: Vec<Member> = Vec::with_capacity(samples.len());
        for (key, value) in &samples {
            if key.signal == Signal::OnCpu as u8 {
                self.add_oncpu(&mut profile, key, value);
            } else {
                grouped.push((group_of(key), key, value));
            }
        }
        grouped.sort_unstable_by_key(|(group, ..)| group_order(group));
        sums::scale_sampled_syscalls(&mut totals);
        let mut keys: Vec<(&TotalKey, &Sums)> = totals.iter().collect();
        keys.sort_unstable_by_key(|(key, _)| group_order(key));
        // Both in the same order: each group's members are the next run of `grouped`;
        // runs whose totals are not there (lost to a full map) are kept as measured.
        let mut rest = &grouped[..];
        for (key, total) in keys {
            while let Some(((group, ..), _)) = rest.split_first()
                && group_order(group) < group_order(key)
            {
                let (members, after) = split_run(rest);
                self.add_uncalibrated_group(&mut profile, members);
                rest = after;
            }
            let (members, after) = match rest.first() {
                Some((group, ..)) if group == key => split_run(rest),
                _ => (&rest[..0], rest),
            };
            rest = after;
            self.add_group(&mut profile, key, total, members);
            self.add_histogram(&mut profile, key, total);
        }
        while !rest.is_empty() {
            let (members, after) = split_run(rest);
            self.add_uncalibrated_group(&mut profile, members);
            rest = after;
        }
        drop(grouped);
        self.report_losses(&mut meta, &totals);
        self.report_identity(&mut meta);
        profile.set_meta(meta);
        self.forget_beyond(&seen, &profile);
        profile
    }

    /// Keeps what the daemon remembers bounded by what recent periods see, whatever the
    /// host did before: names only of the processes and threads of the period just closed
    /// (the next drain brings them back from the probes' name map, or /proc does), and
    /// the stacks and frames recent periods used. Without this, a host that starts
    /// threads and processes all day grew the agent by every name, stack and frame it
    /// ever saw.
    fn forget_beyond(&mut self, seen: &HashSet<u32>, period: &PeriodProfile) {
        self.thread_names.retain(|id, _| seen.contains(id));
        self.process_names.retain(|id, _| seen.contains(id));
        self.profile = (self.stacks).end_period(period.frames(), period.sample_types().to_vec());
        let (raw, kernel) = self.stacks.sizes();
        tracing::debug!(
            target: "stallscope::memory",
            "kept after the period: {raw} raw stacks, {kernel} kernel stacks, {} frames, {} process and {} thread names; resolver: {}",
            self.profile.frames.len(),
            self.process_names.len(),
            self.thread_names.len(),
            self.resolver.table_sizes()
        );
    }

    fn add_oncpu(&self, profile: &mut PeriodProfile, key: &SampleKey, value: &SampleValue) {
        let mut labels = identity(self, Signal::OnCpu, key.tgid, key.tid);
        labels.insert("cause".into(), Cause::CpuWork.label().into());
        if let Some(note) = stack_note(self, key) {
            labels.insert("stack_note".into(), note.into());
        }
        let (kernel, user) = self.stacks_of(key);
        let stack = [kernel, user].concat();
        add(
            profile,
            Signal::OnCpu,
            &stack,
            &labels,
            value.ns,
            value.count,
        );
    }

    /// A group of samples whose totals are not there (lost to a full map): kept as
    /// measured.
    fn add_uncalibrated_group(&self, profile: &mut PeriodProfile, members: &[Member]) {
        let Some((key, ..)) = members.first() else {
            return;
        };
        let uncalibrated = Sums {
            ns: members
                .iter()
                .map(|(_, _, v)| Part::from_value(v).uncalibrated().0)
                .sum(),
            count: members
                .iter()
                .map(|(_, _, v)| Part::from_value(v).uncalibrated().1)
                .sum(),
            ..Sums::default()
        };
        self.add_group(profile, key, &uncalibrated, members);
    }

    /// One totals group: its calibrated stack samples and the unattributed rest.
    fn add_group(
        &self,
        profile: &mut PeriodProfile,
        key: &TotalKey,
        total: &Sums,
        members: &[Member],
    ) {
        let Some(signal) = Signal::from_u8(key.signal) else {
            return;
        };
        let parts: Vec<Part> = members
            .iter()
            .map(|(_, _, v)| Part::from_value(v))
            .collect();
        let calibrated = calibrate::calibrate(total.ns, total.count, &parts);
        if signal == Signal::OffCpu {
            self.add_offcpu_group(profile, key, total, members, &calibrated);
            return;
        }
        for (&(_, sample, _), &(ns, count)) in members.iter().zip(&calibrated.parts) {
            let labels = self.sample_labels(key, sample, profile.frames());
            let (kernel, user) = self.stacks_of(sample);
            add(
                profile,
                signal,
                &[kernel, user].concat(),
                &labels,
                ns,
                count,
            );
        }
        if calibrated.unattributed_ns > 0 || calibrated.unattributed_count > 0 {
            let frame = profile.intern(Frame::synthetic(remainder_frame(signal, key)));
            let labels = group_labels(self, key);
            add(
                profile,
                signal,
                &[frame],
                &labels,
                calibrated.unattributed_ns,
                calibrated.unattributed_count,
            );
        }
    }

    /// Labels of one stack sample of a group (`frames`: the period's frame table).
    fn sample_labels(&self, group: &TotalKey, sample: &SampleKey, frames: &[Frame]) -> Labels {
        let mut labels = group_labels(self, group);
        let signal = Signal::from_u8(sample.signal).unwrap_or(Signal::OffCpu);
        if sample.tid != group.tid {
            labels.extend(identity(self, signal, sample.tgid, sample.tid));
        }
        match signal {
            Signal::Lock => match LockKind::from_u8(sample.class) {
                Some(kind) if kind.is_file() => self.file_lock_labels(sample, &mut labels),
                kind => {
                    labels.insert("lock".into(), format!("{:#x}", sample.object[0]));
                    if matches!(kind, Some(LockKind::Futex | LockKind::FutexPi)) {
                        let (_, user) = self.stacks_of(sample);
                        let wait =
                            cause::classify_futex_wait(sample.detail, function_names(frames, user));
                        labels.insert("lock_wait".into(), wait.label().into());
                    }
                }
            },
            Signal::Syscall => {
                let kind = FdKind::from_u8(sample.detail).unwrap_or(FdKind::Unknown);
                if kind != FdKind::Unknown {
                    labels.insert("fd".into(), naming::fd_kind_label(kind).into());
                }
            }
            Signal::SocketWait => {
                labels.insert("syscall".into(), syscall_name(sample.object[0] as u32));
            }
            _ => {}
        }
        if let Some(note) = stack_note(self, sample) {
            labels.insert("stack_note".into(), note.into());
        }
        labels
    }

    /// Labels of a file lock wait: the file (device and inode: one lock object across
    /// threads and processes) and the process holding the lock, where the kernel named it
    /// (`flock` and record locks; a lease's holder is not in the request).
    fn file_lock_labels(&self, sample: &SampleKey, labels: &mut Labels) {
        let [ino, dev, holder] = sample.object;
        let (major, minor) = naming::dev_numbers(dev as u32);
        labels.insert("lock".into(), format!("file {major}:{minor} inode {ino}"));
        labels.insert(
            "lock_wait".into(),
            cause::FutexWait::Contention.label().into(),
        );
        if holder != 0 {
            let holder = holder as u32;
            labels.insert("lock_holder_pid".into(), holder.to_string());
            let name = self.process_names.get(&holder).cloned().or_else(|| {
                std::fs::read_to_string(format!("/proc/{holder}/comm"))
                    .ok()
                    .map(|comm| comm.trim_end().to_owned())
            });
            if let Some(name) = name {
                labels.insert("lock_holder".into(), name);
            }
        }
    }

    /// Off-CPU: each calibrated sample splits into its blocked part (cause from its
    /// stacks) and its runnable tail (CPU contention).
    fn add_offcpu_group(
        &self,
        profile: &mut PeriodProfile,
        key: &TotalKey,
        total: &Sums,
        members: &[Member],
        calibrated: &Calibrated,
    ) {
        let state = OffCpuState::from_u8(key.class).unwrap_or(OffCpuState::Other);
        // Exact waits carry their own tails; the rest of the group's tail is spread over
        // the estimated parts and the unattributed rest, in proportion.
        let exact_tail: u64 = members.iter().map(|(_, _, v)| v.tail_ns).sum();
        let exact_ns: u64 = members.iter().map(|(_, _, v)| v.ns).sum();
        let spread_tail = total.tail_ns.saturating_sub(exact_tail);
        let mut weights: Vec<u64> = members
            .iter()
            .zip(&calibrated.parts)
            .map(|((_, _, v), &(ns, _))| ns.saturating_sub(v.ns))
            .collect();
        weights.push(calibrated.unattributed_ns);
        let spread = if total.ns > exact_ns {
            calibrate::apportion(spread_tail.min(weights.iter().sum()), &weights)
        } else {
            vec![0; weights.len()]
        };
        for (index, (&(_, sample, value), &(ns, count))) in
            members.iter().zip(&calibrated.parts).enumerate()
        {
            let tail = (value.tail_ns + spread[index]).min(ns);
            let (kernel, user) = self.stacks_of(sample);
            let stack = [kernel, user].concat();
            let (blocked_cause, evidence) = cause::classify_blocked(
                state,
                key.detail,
                &function_names(profile.frames(), kernel),
                &function_names(profile.frames(), user),
            );
            let mut labels = group_labels(self, key);
            if let Some(note) = stack_note(self, sample) {
                labels.insert("stack_note".into(), note.into());
            }
            Self::add_by_cause(
                profile,
                &stack,
                labels,
                (ns - tail, tail),
                count,
                (blocked_cause, evidence),
            );
        }
        if calibrated.unattributed_ns > 0 || calibrated.unattributed_count > 0 {
            let ns = calibrated.unattributed_ns;
            let tail = spread.last().copied().unwrap_or(0).min(ns);
            let frame = profile.intern(Frame::synthetic(calibrate::UNSAMPLED_FRAME));
            let labels = group_labels(self, key);
            Self::add_by_cause(
                profile,
                &[frame],
                labels,
                (ns - tail, tail),
                calibrated.unattributed_count,
                cause::by_state(state, key.detail),
            );
        }
    }

    /// Adds a blocked part and a runnable tail as two samples with their causes; the wait
    /// count goes with the blocked part (with the tail when there is no blocked part).
    fn add_by_cause(
        profile: &mut PeriodProfile,
        stack: &[FrameId],
        labels: Labels,
        (blocked, tail): (u64, u64),
        count: u64,
        (blocked_cause, evidence): (Cause, &'static str),
    ) {
        if blocked > 0 || tail == 0 {
            let mut with_cause = labels.clone();
            with_cause.insert("cause".into(), blocked_cause.label().into());
            with_cause.insert("evidence".into(), evidence.into());
            add(profile, Signal::OffCpu, stack, &with_cause, blocked, count);
        }
        if tail > 0 {
            let mut with_cause = labels;
            with_cause.insert("cause".into(), Cause::CpuContention.label().into());
            with_cause.insert("evidence".into(), "runnable, waiting for a CPU".into());
            let tail_count = if blocked > 0 { 0 } else { count };
            add(
                profile,
                Signal::OffCpu,
                stack,
                &with_cause,
                tail,
                tail_count,
            );
        }
    }

    fn add_histogram(&self, profile: &mut PeriodProfile, key: &TotalKey, total: &Sums) {
        let Some(signal) = Signal::from_u8(key.signal) else {
            return;
        };
        if !profile.keeps_histograms()
            || matches!(signal, Signal::OffCpu | Signal::OnCpu)
            || total.count == 0
        {
            return;
        }
        // Retransmits and overflows are counts: only RTT samples have a distribution.
        if signal == Signal::Tcp && key.class != TcpEvent::Rtt as u8 {
            return;
        }
        // One histogram per process, not per thread: the tail latency of a service's
        // syscalls or disk writes is the question, and per-thread histograms on a host
        // that starts threads all day were most of the agent's memory at each period's
        // end (30,000 a period on the soak's load).
        let mut labels = group_labels(self, key);
        for per_thread in ["signal", "tid", "thread"] {
            labels.remove(per_thread);
        }
        profile.add_histogram(&Histogram {
            signal: naming::signal_label(signal).to_owned(),
            labels,
            count: total.count,
            sum_ns: total.ns,
            max_ns: total.max_ns,
            buckets: total.histogram(),
        });
    }
}
