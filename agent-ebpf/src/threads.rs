//! Per-thread state in task-local storage, shared by every BTF-path probe family
//! (scheduler, syscalls, locks): found from the task pointer without hashing, freed by the
//! kernel when the thread exits.

use agent_common::{Loss, Signal, THREAD_KERNEL, ThreadState};
use aya_ebpf::{
    EbpfContext,
    bindings::task_struct,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel, generated::bpf_get_current_task_btf,
    },
    macros::btf_map,
};

use crate::{
    maps::{config, count_loss, remember_comm},
    task_storage::TaskStorage,
};

#[btf_map]
static THREAD_STATE: TaskStorage<ThreadState> = TaskStorage::new();

/// `PF_KTHREAD` in `task->flags`.
const PF_KTHREAD: u32 = 0x0020_0000;

/// Reads a `u32` field of a kernel task at `offset` (zero if the read fails).
#[inline(always)]
pub fn read_task_u32(task: *mut task_struct, offset: u32) -> u32 {
    // SAFETY: fault-tolerant read of a kernel object.
    unsafe { bpf_probe_read_kernel(task.cast::<u8>().add(offset as usize).cast::<u32>()) }
        .unwrap_or(0)
}

/// Reads a `u64` field of a kernel task at `offset` (zero if the read fails).
#[inline(always)]
pub fn read_task_u64(task: *mut task_struct, offset: u32) -> u64 {
    // SAFETY: fault-tolerant read of a kernel object.
    unsafe { bpf_probe_read_kernel(task.cast::<u8>().add(offset as usize).cast::<u64>()) }
        .unwrap_or(0)
}

/// The state of `task`, if it has one.
#[inline(always)]
pub fn thread_of(task: *mut task_struct) -> Option<&'static mut ThreadState> {
    if task.is_null() {
        return None;
    }
    // SAFETY: task-local storage lives as long as the task; a thread's entry is touched
    // only from its own context or while the scheduler holds it (switch, wakeup).
    THREAD_STATE.lookup(task).map(|ptr| unsafe { &mut *ptr })
}

/// The state of `task`, created (and identified) if it has none. `is_current` says whether
/// `task` is the current task: its ids then come from `bpf_get_current_pid_tgid` and its
/// name is recorded; otherwise the ids are read from the task.
#[inline(always)]
pub fn thread_or_create<C: EbpfContext>(
    ctx: &C,
    signal: Signal,
    task: *mut task_struct,
    is_current: bool,
) -> Option<&'static mut ThreadState> {
    if task.is_null() {
        return None;
    }
    let Some(ptr) = THREAD_STATE.get_or_create(task) else {
        count_loss(ctx, signal, Loss::ThreadTableFull);
        return None;
    };
    // SAFETY: see `thread_of`.
    let thread = unsafe { &mut *ptr };
    if thread.tid == 0 {
        let (tgid, tid) = if is_current {
            let ids = bpf_get_current_pid_tgid();
            remember_comm(ids as u32);
            ((ids >> 32) as u32, ids as u32)
        } else {
            (
                read_task_u32(task, config!(task_tgid_offset)),
                read_task_u32(task, config!(task_pid_offset)),
            )
        };
        thread.tgid = tgid;
        thread.tid = tid;
        if read_task_u32(task, config!(task_flags_offset)) & PF_KTHREAD != 0 {
            thread.flags |= THREAD_KERNEL;
        }
    }
    Some(thread)
}

/// The current task.
#[inline(always)]
pub fn current_task() -> *mut task_struct {
    // SAFETY: helper without arguments; the current task is always valid.
    unsafe { bpf_get_current_task_btf() }
}

/// The current task and its `pid_tgid`.
#[inline(always)]
pub fn current() -> (*mut task_struct, u64) {
    // SAFETY: helper without arguments; the current task is always valid.
    (
        unsafe { bpf_get_current_task_btf() },
        bpf_get_current_pid_tgid(),
    )
}
