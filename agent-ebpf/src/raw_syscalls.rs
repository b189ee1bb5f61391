//! The raw syscall hooks, `sys_enter` and `sys_exit` (BTF raw tracepoints), shared by the
//! syscall signal (`syscall.rs`) and the network signal's socket waits (`net.rs`):
//! `sys_enter` keeps the syscall's number and start time in the thread's state, `sys_exit`
//! hands its duration to each family that wants it. With only the network signal on,
//! `sys_enter` keeps state for the socket syscalls alone.

use agent_common::{Signal, THREAD_IN_SYSCALL};
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::{
    maps::{generation, wanted, wanted_target_current, wants},
    net::{is_socket_syscall, socket_wait},
    syscall::syscall_latency,
    threads::{current_task, thread_of, thread_or_create},
};

/// `sys_enter(struct pt_regs *regs, long id)`.
#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter_btf(ctx: BtfTracePointContext) -> i32 {
    if !wanted_target_current() {
        return 0;
    }
    let task = current_task();
    let id: u64 = ctx.arg(1);
    // The network signal alone needs only the socket syscalls: every other syscall skips
    // the thread state.
    if !wants(Signal::Syscall) && !is_socket_syscall(id as u32) {
        return 0;
    }
    let Some(thread) = thread_or_create(&ctx, Signal::Syscall, task, true) else {
        return 0;
    };
    if !wanted(thread.tgid) {
        // The agent itself.
        return 0;
    }
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
    let ids = (thread.tgid, thread.tid);
    if wants(Signal::Syscall) {
        syscall_latency(&ctx, generation, task, ids, nr, duration);
    }
    if wants(Signal::SocketWait) {
        socket_wait(&ctx, generation, task, ids, nr, duration);
    }
    0
}
