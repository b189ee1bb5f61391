//! Disk I/O: block request latency from issue to completion, per device and operation,
//! attributed to the thread that submitted the request, with its stacks when it was
//! submitted in process context. The classic block tracepoints report device and sector,
//! which identify a request from `block_io_start` (submitter's context) through
//! `block_rq_issue` (handed to the driver) to `block_rq_complete`.

use agent_common::{
    DiskOp, DiskRequest, DiskRequestKey, FLAG_NO_CONTEXT, Loss, SampleKey, SampleValue, Signal,
    TotalKey,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};

use crate::maps::{
    SLOT_DISK, add_sample, add_total, capture_current_stack, config, count_loss, generation, owns,
    remember_comm, wanted,
};

/// Requests in flight.
#[map]
static DISK_REQUESTS: HashMap<DiskRequestKey, DiskRequest> = HashMap::with_max_entries(8192, 0);

/// Offsets shared by the block request tracepoints (stable since the tracepoints exist).
const DEV_OFFSET: usize = 8;
const SECTOR_OFFSET: usize = 16;

#[inline(always)]
fn request_key(ctx: &TracePointContext) -> DiskRequestKey {
    // SAFETY: bounds-checked reads of the tracepoint record.
    unsafe {
        DiskRequestKey {
            dev: ctx.read_at::<u32>(DEV_OFFSET).unwrap_or(0),
            pad: 0,
            sector: ctx.read_at::<u64>(SECTOR_OFFSET).unwrap_or(0),
        }
    }
}

#[inline(always)]
fn read_op(ctx: &TracePointContext) -> DiskOp {
    // SAFETY: bounds-checked read of the tracepoint record's `rwbs` string.
    let rwbs: [u8; 8] =
        unsafe { ctx.read_at(config!(tp_block_rwbs_offset) as usize) }.unwrap_or([0; 8]);
    DiskOp::from_rwbs(&rwbs)
}

/// `block_io_start` (in the submitter's context): who, and with which stacks.
#[tracepoint(category = "block", name = "block_io_start")]
pub fn block_io_start(ctx: TracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !wanted(tgid) {
        return 0;
    }
    let generation = generation();
    let in_process = pid_tgid as u32 != 0;
    remember_comm(pid_tgid as u32);
    let request = DiskRequest {
        // SAFETY: helper without arguments.
        start_ns: unsafe { bpf_ktime_get_ns() },
        kstack: capture_current_stack(&ctx, Signal::Disk, generation, SLOT_DISK, false),
        ustack: if in_process {
            capture_current_stack(&ctx, Signal::Disk, generation, SLOT_DISK, true)
        } else {
            0
        },
        tgid,
        tid: pid_tgid as u32,
        op: read_op(&ctx) as u8,
        flags: if in_process { 0 } else { FLAG_NO_CONTEXT },
        ..DiskRequest::default()
    };
    if DISK_REQUESTS.insert(request_key(&ctx), request, 0).is_err() {
        count_loss(&ctx, Signal::Disk, Loss::PendingFull);
    }
    0
}

/// `block_rq_issue`: the driver gets the request; the latency counts from here.
#[tracepoint(category = "block", name = "block_rq_issue")]
pub fn block_rq_issue(ctx: TracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let key = request_key(&ctx);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(request) = DISK_REQUESTS.get_ptr_mut(key) {
        // SAFETY: a request's entry is only touched by its own events, in order.
        unsafe { (*request).issue_ns = now };
    } else if config!(target_tgid) == 0 {
        // Started before the agent, or by a path without `block_io_start`: measured, not
        // attributed.
        let request = DiskRequest {
            start_ns: now,
            issue_ns: now,
            op: read_op(&ctx) as u8,
            flags: FLAG_NO_CONTEXT,
            ..DiskRequest::default()
        };
        if DISK_REQUESTS.insert(key, request, 0).is_err() {
            count_loss(&ctx, Signal::Disk, Loss::PendingFull);
        }
    }
    0
}

/// `block_rq_complete`: the request is done.
#[tracepoint(category = "block", name = "block_rq_complete")]
pub fn block_rq_complete(ctx: TracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let key = request_key(&ctx);
    let Some(request) = DISK_REQUESTS.get_ptr(key) else {
        return 0;
    };
    // SAFETY: the request's own entry, removed right below.
    let request = unsafe { *request };
    let _ = DISK_REQUESTS.remove(key);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let since = if request.issue_ns != 0 {
        request.issue_ns
    } else {
        request.start_ns
    };
    if since == 0 || since > now {
        return 0;
    }
    let latency = now - since;
    let generation = generation();
    let total = TotalKey {
        tgid: request.tgid,
        tid: request.tid,
        signal: Signal::Disk as u8,
        class: request.op,
        aux: key.dev,
        ..TotalKey::default()
    };
    add_total(&ctx, generation, &total, latency, 0);
    let sample = SampleKey {
        tgid: request.tgid,
        tid: request.tid,
        kstack: request.kstack,
        ustack: request.ustack,
        signal: Signal::Disk as u8,
        class: request.op,
        flags: request.flags,
        aux: key.dev,
        ..SampleKey::default()
    };
    let value = SampleValue {
        ns: latency,
        count: 1,
        ..SampleValue::default()
    };
    add_sample(&ctx, generation, &sample, &value);
    0
}
