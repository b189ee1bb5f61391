//! stallscope's eBPF probes: one module per probe family (sched_btf, sched_tp, oncpu, lock,
//! syscall, net, io), the raw syscall hooks two families share in `raw_syscalls`, shared
//! maps in `maps`, per-thread state in `threads` and `task_storage`, kernel reads in
//! `kernel`, the table-driven user stack walk in `unwind`. No family imports another.
#![no_std]
#![no_main]
// `atomic_xadd`: the only atomic add the BPF target offers (see `maps::atomic_add`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod filelock;
mod io;
mod kernel;
mod lock;
mod maps;
mod net;
mod oncpu;
mod raw_syscalls;
mod sched_btf;
mod sched_tp;
mod syscall;
mod task_storage;
mod threads;
mod unwind;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any program that could reach a panic; this is never called.
    loop {}
}

/// The helpers the probes use (stack walks, probe reads) are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
