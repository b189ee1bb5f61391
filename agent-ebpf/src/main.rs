//! stallscope's eBPF probes: one module per probe family, shared maps in `maps`.
#![no_std]
#![no_main]
// `atomic_xadd`: the only atomic add the BPF target offers (see `maps::atomic_add`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod filelock;
mod io;
mod lock;
mod maps;
mod net;
mod oncpu;
mod sched_btf;
mod sched_tp;
mod syscall;
mod task_storage;
mod threads;

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
