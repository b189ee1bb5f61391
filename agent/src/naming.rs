//! Names the agent gives to signals, classes and devices in profiles: label values and
//! pprof sample types.

use std::path::Path;

use agent_common::{DiskOp, FdKind, LockKind, OffCpuState, RunQueueKind, Signal};
use stallscope_profile::SampleType;

pub const fn signal_label(signal: Signal) -> &'static str {
    match signal {
        Signal::OffCpu => "off-cpu",
        Signal::OnCpu => "on-cpu",
        Signal::RunQueue => "runqueue",
        Signal::Lock => "lock",
        Signal::Syscall => "syscall",
        Signal::Disk => "disk",
    }
}

/// The pprof sample types of a signal: time and events.
pub fn sample_types(signal: Signal) -> [SampleType; 2] {
    let (time, events) = match signal {
        Signal::OffCpu => ("off_cpu", "off_cpu_events"),
        Signal::OnCpu => ("on_cpu", "on_cpu_samples"),
        Signal::RunQueue => ("runqueue", "runqueue_events"),
        Signal::Lock => ("lock_wait", "lock_waits"),
        Signal::Syscall => ("syscall", "syscalls"),
        Signal::Disk => ("disk_io", "disk_ios"),
    };
    [
        SampleType::new(time, "nanoseconds"),
        SampleType::new(events, "count"),
    ]
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

pub const fn runqueue_label(kind: RunQueueKind) -> &'static str {
    match kind {
        RunQueueKind::Preempted => "preempted",
        RunQueueKind::Woken => "woken",
    }
}

pub const fn lock_kind_label(kind: LockKind) -> &'static str {
    match kind {
        LockKind::Spin => "spin",
        LockKind::Mutex => "mutex",
        LockKind::RwsemRead => "rwsem-read",
        LockKind::RwsemWrite => "rwsem-write",
        LockKind::RtMutex => "rt-mutex",
        LockKind::PercpuRwsem => "percpu-rwsem",
        LockKind::Futex => "futex",
        LockKind::FutexPi => "futex-pi",
        LockKind::Other => "other",
    }
}

pub const fn disk_op_label(op: DiskOp) -> &'static str {
    match op {
        DiskOp::Read => "read",
        DiskOp::Write => "write",
        DiskOp::Flush => "flush",
        DiskOp::Discard => "discard",
        DiskOp::Other => "other",
    }
}

pub const fn fd_kind_label(kind: FdKind) -> &'static str {
    match kind {
        FdKind::Unknown => "unknown",
        FdKind::File => "file",
        FdKind::Socket => "socket",
        FdKind::Pipe => "pipe",
        FdKind::Other => "other",
    }
}

/// `MAJOR:MINOR` of a kernel `dev_t` as the block tracepoints report it.
pub const fn dev_numbers(dev: u32) -> (u32, u32) {
    (dev >> 20, dev & 0x000f_ffff)
}

/// The device's name (`loop0`, `nvme0n1`), or `MAJOR:MINOR` when sysfs does not say.
pub fn device_name(dev: u32) -> String {
    let (major, minor) = dev_numbers(dev);
    let uevent = Path::new("/sys/dev/block")
        .join(format!("{major}:{minor}"))
        .join("uevent");
    std::fs::read_to_string(uevent)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("DEVNAME=").map(str::to_owned))
        })
        .unwrap_or_else(|| format!("{major}:{minor}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_follow_the_kernel_encoding() {
        assert_eq!(dev_numbers((7 << 20) | 3), (7, 3));
        assert_eq!(dev_numbers((259 << 20) | 1), (259, 1));
    }

    #[test]
    fn every_signal_has_distinct_sample_types() {
        let mut kinds: Vec<String> = Signal::ALL
            .iter()
            .flat_map(|&s| sample_types(s))
            .map(|t| t.kind)
            .collect();
        kinds.sort();
        kinds.dedup();
        assert_eq!(kinds.len(), Signal::ALL.len() * 2);
    }
}
