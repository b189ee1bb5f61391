//! The mixed user stack walk: for a process whose binaries the agent has given unwind
//! tables (built from their `.eh_frame`), each frame in such a binary is unwound by its
//! table, every other frame by its frame pointer. Processes without tables keep the
//! kernel's frame-pointer walker (`bpf_get_stack`). The walk runs in the thread's own
//! context (its user registers are those saved at its entry into the kernel), so it
//! serves waits (at `sched_switch`, at the return to user space) as well as CPU samples.

use core::ffi::c_void;

use agent_common::{
    CfaKind, MAX_STACK_DEPTH, RbpKind, STACK_END_SHIFT, STACK_FULL, STACK_TABLE, STACK_USER,
    StackEnd, StackTrace, UNWIND_MAPPINGS, UnwindProcess, UnwindRow,
};
use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_loop, bpf_task_pt_regs},
    },
    macros::map,
    maps::{Array, HashMap},
};

/// Every binary's rows, each binary's contiguous; sized by the agent at load.
#[map]
static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1, 0);

/// The mappings with tables of each process that has any; sized by the agent at load.
#[map]
static UNWIND_PROCESSES: HashMap<u32, UnwindProcess> = HashMap::with_max_entries(1, 0);

/// Steps of the binary search over one binary's rows: up to 2^24 rows.
const SEARCH_STEPS: usize = 24;

/// The walk's state, shared with each step of `bpf_loop`.
#[repr(C)]
struct Walk {
    stack: *mut StackTrace,
    process: *const UnwindProcess,
    ip: u64,
    sp: u64,
    bp: u64,
    len: u32,
    end: u32,
    tabled: u32,
    pad: u32,
}

/// Walks the current thread's user stack into `stack` if process `tgid` has unwind
/// tables; `false` (and `stack` untouched) if it has none.
#[inline(never)]
pub fn walk_user_stack(tgid: u32, stack: &mut StackTrace) -> bool {
    // SAFETY: a read-only lookup; the value stays valid for this program's run.
    let Some(process) = (unsafe { UNWIND_PROCESSES.get(tgid) }) else {
        return false;
    };
    // SAFETY: the helpers take the current task; the registers are read, not trusted.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    let read = |field: *const u64| {
        // SAFETY: a checked kernel read; a failure is handled.
        unsafe { bpf_probe_read_kernel(field) }.ok()
    };
    let registers = if regs.is_null() {
        None
    } else {
        // SAFETY: only field addresses are computed; the reads are checked.
        unsafe {
            read(&raw const (*regs).rip)
                .zip(read(&raw const (*regs).rsp))
                .zip(read(&raw const (*regs).rbp))
        }
    };
    let Some(((ip, sp), bp)) = registers else {
        stack.len = 0;
        stack.flags = STACK_USER | ((StackEnd::NoRegisters as u32) << STACK_END_SHIFT);
        return true;
    };
    let mut walk = Walk {
        stack,
        process,
        ip,
        sp,
        bp,
        len: 0,
        end: StackEnd::DepthLimit as u32,
        tabled: 0,
        pad: 0,
    };
    // SAFETY: `walk_step` matches the callback ABI; `walk` outlives the call.
    unsafe {
        bpf_loop(
            MAX_STACK_DEPTH as u32,
            walk_step as *mut c_void,
            (&raw mut walk).cast(),
            0,
        );
    }
    let len = walk.len.min(MAX_STACK_DEPTH as u32);
    stack.len = len;
    stack.flags = STACK_USER | (walk.end << STACK_END_SHIFT);
    if walk.tabled != 0 {
        stack.flags |= STACK_TABLE;
    }
    if len as usize == MAX_STACK_DEPTH {
        stack.flags |= STACK_FULL;
    }
    true
}

/// One frame: records the current address, then finds the caller's registers by the
/// table of the binary the address is in, or by the frame pointer.
extern "C" fn walk_step(index: u64, walk: *mut c_void) -> i64 {
    // SAFETY: `walk` is the `Walk` passed to `bpf_loop`.
    let walk = unsafe { &mut *walk.cast::<Walk>() };
    let index = index as usize;
    if index >= MAX_STACK_DEPTH {
        return 1;
    }
    if walk.ip == 0 {
        walk.end = StackEnd::FramePointerEnd as u32;
        return 1;
    }
    // SAFETY: the stack outlives the loop; the index is bounds-checked above.
    unsafe { (*walk.stack).ips[index] = walk.ip };
    walk.len = index as u32 + 1;
    // A return address is the instruction after the call: the call itself (one byte
    // back) is in the caller's function, whose row holds there.
    let pc = if index == 0 { walk.ip } else { walk.ip - 1 };
    let result = match find_mapping(walk.process, pc) {
        Some((bias, first, rows)) => table_step(walk, pc.wrapping_sub(bias), first, rows),
        None => frame_pointer_step(walk),
    };
    match result {
        Ok(()) => 0,
        Err(end) => {
            walk.end = end as u32;
            1
        }
    }
}

/// The mapping with a table that holds `pc`: its bias and rows.
#[inline(always)]
fn find_mapping(process: *const UnwindProcess, pc: u64) -> Option<(u64, u32, u32)> {
    // SAFETY: the map value outlives the walk.
    let count = unsafe { (*process).count }.min(UNWIND_MAPPINGS as u32);
    let mut scan = Scan {
        process,
        pc,
        found: 0,
        pad: 0,
    };
    // A loop of its own (`bpf_loop`): the verifier checks its step once, where an
    // inline loop inside the walk's step multiplied the states it explores.
    // SAFETY: `scan_step` matches the callback ABI; `scan` outlives the call.
    unsafe {
        bpf_loop(count, scan_step as *mut c_void, (&raw mut scan).cast(), 0);
    }
    let index = scan.found.checked_sub(1)? as usize;
    if index >= UNWIND_MAPPINGS {
        return None;
    }
    // SAFETY: as above; the index is bounds-checked.
    let mapping = unsafe { &(*process).mappings[index] };
    Some((mapping.bias, mapping.first_row, mapping.rows))
}

/// The state of `find_mapping`'s loop.
#[repr(C)]
struct Scan {
    process: *const UnwindProcess,
    pc: u64,
    /// The index of the mapping found, plus one (0: none yet).
    found: u32,
    pad: u32,
}

extern "C" fn scan_step(index: u64, scan: *mut c_void) -> i64 {
    // SAFETY: `scan` is the `Scan` passed to `bpf_loop`.
    let scan = unsafe { &mut *scan.cast::<Scan>() };
    let index = index as usize;
    if index >= UNWIND_MAPPINGS {
        return 1;
    }
    // SAFETY: the map value outlives the loop; the index is bounds-checked above.
    let mapping = unsafe { &(*scan.process).mappings[index] };
    if scan.pc >= mapping.start && scan.pc < mapping.end {
        scan.found = index as u32 + 1;
        return 1;
    }
    0
}

/// The row of `first..first + rows` that holds at `address` (the last starting at or
/// before it), unless it marks addresses no function covers.
#[inline(always)]
fn find_row(first: u32, rows: u32, address: u64) -> Option<UnwindRow> {
    let mut search = Search {
        low: first,
        high: first.saturating_add(rows),
        address,
    };
    // SAFETY: `search_step` matches the callback ABI; `search` outlives the call.
    unsafe {
        bpf_loop(
            SEARCH_STEPS as u32,
            search_step as *mut c_void,
            (&raw mut search).cast(),
            0,
        );
    }
    if search.low <= first || search.low > search.high {
        return None;
    }
    let row = *UNWIND_ROWS.get(search.low - 1)?;
    (row.cfa_kind != CfaKind::NotCovered as u8).then_some(row)
}

/// The state of `find_row`'s binary search: the row wanted is the last before `low`.
#[repr(C)]
struct Search {
    low: u32,
    high: u32,
    address: u64,
}

extern "C" fn search_step(_: u64, search: *mut c_void) -> i64 {
    // SAFETY: `search` is the `Search` passed to `bpf_loop`.
    let search = unsafe { &mut *search.cast::<Search>() };
    if search.low >= search.high {
        return 1;
    }
    let middle = search.low + (search.high - search.low) / 2;
    let Some(row) = UNWIND_ROWS.get(middle) else {
        // Outside the map: no answer (low past high).
        search.low = search.high.saturating_add(1);
        return 1;
    };
    if row.pc <= search.address {
        search.low = middle + 1;
    } else {
        search.high = middle;
    }
    0
}

fn read_user(address: u64) -> Result<u64, StackEnd> {
    // SAFETY: a checked read of the current thread's memory.
    unsafe { bpf_probe_read_user(address as *const u64) }.map_err(|_| StackEnd::ReadFailed)
}

#[inline(always)]
fn table_step(walk: &mut Walk, address: u64, first: u32, rows: u32) -> Result<(), StackEnd> {
    let row = find_row(first, rows, address).ok_or(StackEnd::NotCovered)?;
    let offset = row.cfa_offset as i64 as u64;
    let cfa = match CfaKind::from_u8(row.cfa_kind) {
        Some(CfaKind::StackPointer) => walk.sp.wrapping_add(offset),
        Some(CfaKind::FramePointer) => walk.bp.wrapping_add(offset),
        Some(CfaKind::Plt) => {
            let past_push = if walk.ip & 15 >= offset { 8 } else { 0 };
            walk.sp.wrapping_add(8 + past_push)
        }
        Some(CfaKind::Outermost) => return Err(StackEnd::EntryPoint),
        _ => return Err(StackEnd::Unsupported),
    };
    let return_address = read_user(cfa.wrapping_sub(8))?;
    match RbpKind::from_u8(row.rbp_kind) {
        Some(RbpKind::Unchanged) => {}
        Some(RbpKind::AtCfa) => {
            walk.bp = read_user(cfa.wrapping_add(row.rbp_offset as i64 as u64))?;
        }
        _ => return Err(StackEnd::Unsupported),
    }
    walk.sp = cfa;
    walk.ip = return_address;
    walk.tabled = 1;
    Ok(())
}

/// The frame-pointer step the kernel's walker takes: the saved frame pointer at `bp`,
/// the return address above it.
#[inline(always)]
fn frame_pointer_step(walk: &mut Walk) -> Result<(), StackEnd> {
    let bp = walk.bp;
    if bp == 0 {
        return Err(StackEnd::FramePointerEnd);
    }
    let return_address = read_user(bp.wrapping_add(8))?;
    let caller_bp = read_user(bp)?;
    walk.sp = bp.wrapping_add(16);
    walk.bp = caller_bp;
    walk.ip = return_address;
    Ok(())
}
