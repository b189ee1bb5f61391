//! Syscall latency: every syscall of every (wanted) thread, from `sys_enter` to `sys_exit`
//! (BTF raw tracepoints), into per-(process, syscall) totals and log2 histograms. Syscalls
//! at or above the slow threshold also get the user stack (taken at exit, in the thread's
//! own context, where the user registers are the syscall's) and, for syscalls whose first
//! argument is a file descriptor, the kind of file it refers to.

use agent_common::{
    CACHE_SYSCALL, FD_SYSCALLS_LEN, FdKind, SampleKey, SampleValue, Signal, THREAD_IN_SYSCALL,
    TotalKey,
};
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map},
    maps::Array,
    programs::BtfTracePointContext,
};

use crate::{
    maps::{
        SLOT_SYSCALL, add_sample, add_total_cached, capture_current_stack, config, generation,
        wanted_current,
    },
    threads::{current_task, thread_of, thread_or_create},
};

/// Syscall numbers whose first argument is a file descriptor (1), set by the agent.
#[map]
static FD_SYSCALLS: Array<u8> = Array::with_max_entries(FD_SYSCALLS_LEN, 0);

/// Offset of `di` (the first syscall argument) in x86-64 `struct pt_regs`.
#[cfg(not(bpf_target_arch = "aarch64"))]
const ARG0_OFFSET: usize = 14 * 8;
/// Offset of `regs[0]` in arm64 `struct pt_regs`.
#[cfg(bpf_target_arch = "aarch64")]
const ARG0_OFFSET: usize = 0;

/// `sys_enter(struct pt_regs *regs, long id)`.
#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter_btf(ctx: BtfTracePointContext) -> i32 {
    if !wanted_current() {
        return 0;
    }
    let task = current_task();
    let id: u64 = ctx.arg(1);
    let Some(thread) = thread_or_create(&ctx, Signal::Syscall, task, true) else {
        return 0;
    };
    // SAFETY: helper without arguments.
    thread.syscall_since_ns = unsafe { bpf_ktime_get_ns() };
    thread.syscall_nr = id as u32;
    thread.flags |= THREAD_IN_SYSCALL;
    0
}

/// `sys_exit(struct pt_regs *regs, long ret)`.
#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit_btf(ctx: BtfTracePointContext) -> i32 {
    let task = current_task();
    let Some(thread) = thread_of(task) else {
        return 0;
    };
    if thread.flags & THREAD_IN_SYSCALL == 0 {
        return 0;
    }
    thread.flags &= !THREAD_IN_SYSCALL;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if thread.syscall_since_ns == 0 || thread.syscall_since_ns > now {
        return 0;
    }
    let duration = now - thread.syscall_since_ns;
    let generation = generation();
    let nr = thread.syscall_nr;
    let key = TotalKey {
        tgid: thread.tgid,
        tid: 0,
        signal: Signal::Syscall as u8,
        aux: nr,
        ..TotalKey::default()
    };
    add_total_cached(&ctx, generation, CACHE_SYSCALL, &key, duration);
    if duration < config!(syscall_slow_threshold_ns) {
        return 0;
    }
    let fd_kind = if FD_SYSCALLS.get(nr).copied().unwrap_or(0) != 0 {
        // The saved user registers still hold the arguments at exit.
        let regs: *const u8 = ctx.arg(0);
        let fd = if regs.is_null() {
            u64::MAX
        } else {
            // SAFETY: a fault-tolerant read of the saved user registers.
            unsafe { bpf_probe_read_kernel(regs.add(ARG0_OFFSET).cast::<u64>()) }
                .unwrap_or(u64::MAX)
        };
        fd_kind(task, fd)
    } else {
        FdKind::Unknown
    };
    let ustack = capture_current_stack(&ctx, Signal::Syscall, generation, SLOT_SYSCALL, true);
    let sample = SampleKey {
        tgid: thread.tgid,
        tid: thread.tid,
        ustack,
        signal: Signal::Syscall as u8,
        detail: fd_kind as u8,
        aux: nr,
        ..SampleKey::default()
    };
    let value = SampleValue {
        ns: duration,
        count: 1,
        ..SampleValue::default()
    };
    add_sample(&ctx, generation, &sample, &value);
    0
}

/// What file descriptor `fd` of `task` refers to: task->files->fdt->fd[fd]->f_inode->i_mode.
#[inline(always)]
fn fd_kind(task: *mut aya_ebpf::bindings::task_struct, fd: u64) -> FdKind {
    if config!(fd_walk) == 0 {
        return FdKind::Unknown;
    }
    let read_ptr = |base: u64, offset: u32| -> u64 {
        if base == 0 {
            return 0;
        }
        // SAFETY: fault-tolerant read of a kernel object.
        unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const u64) }.unwrap_or(0)
    };
    let files = read_ptr(task as u64, config!(task_files_offset));
    let fdt = read_ptr(files, config!(files_fdt_offset));
    if fdt == 0 {
        return FdKind::Unknown;
    }
    // SAFETY: fault-tolerant read of a kernel object.
    let max_fds: u32 = unsafe {
        bpf_probe_read_kernel((fdt + u64::from(config!(fdt_max_fds_offset))) as *const u32)
    }
    .unwrap_or(0);
    if fd >= u64::from(max_fds) {
        return FdKind::Unknown;
    }
    let fd_array = read_ptr(fdt, config!(fdt_fd_offset));
    let file = read_ptr(fd_array, (fd * 8) as u32);
    let inode = read_ptr(file, config!(file_inode_offset));
    if inode == 0 {
        return FdKind::Unknown;
    }
    // SAFETY: fault-tolerant read of a kernel object.
    let mode: u16 = unsafe {
        bpf_probe_read_kernel((inode + u64::from(config!(inode_mode_offset))) as *const u16)
    }
    .unwrap_or(0);
    FdKind::from_mode(u32::from(mode))
}
