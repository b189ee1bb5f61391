//! Reading kernel objects from the probes: the arguments of the syscall that is exiting
//! (from its saved user registers), pointer-sized fields, and the file behind a
//! descriptor (task->files->fdt->fd[i]) with its kind. Every read is fault-tolerant and
//! returns zero (or "unknown") where the kernel says no; the offsets come from BTF
//! through the read-only configuration.

use agent_common::FdKind;
use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::BtfTracePointContext};

use crate::maps::config;

/// Offsets of `di` and `si` (the first two syscall arguments) in x86-64 `struct pt_regs`.
#[cfg(not(bpf_target_arch = "aarch64"))]
const ARG0_OFFSET: usize = 14 * 8;
#[cfg(not(bpf_target_arch = "aarch64"))]
const ARG1_OFFSET: usize = 13 * 8;
/// Offsets of `regs[0]` and `regs[1]` in arm64 `struct pt_regs`.
#[cfg(bpf_target_arch = "aarch64")]
const ARG0_OFFSET: usize = 0;
#[cfg(bpf_target_arch = "aarch64")]
const ARG1_OFFSET: usize = 8;

/// Argument `index` (0 or 1) of the syscall that is exiting: the saved user registers
/// still hold the arguments at exit. `u64::MAX` if they cannot be read.
#[inline(always)]
pub fn syscall_arg(ctx: &BtfTracePointContext, index: usize) -> u64 {
    let regs: *const u8 = ctx.arg(0);
    if regs.is_null() {
        return u64::MAX;
    }
    let offset = if index == 0 { ARG0_OFFSET } else { ARG1_OFFSET };
    // SAFETY: a fault-tolerant read of the saved user registers.
    unsafe { bpf_probe_read_kernel(regs.add(offset).cast::<u64>()) }.unwrap_or(u64::MAX)
}

/// Reads a pointer-sized kernel value at `base + offset` (zero if `base` is null or the
/// read fails).
#[inline(always)]
pub fn read_ptr(base: u64, offset: u32) -> u64 {
    if base == 0 {
        return 0;
    }
    // SAFETY: fault-tolerant read of a kernel object.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const u64) }.unwrap_or(0)
}

/// The `struct file` behind descriptor `fd` of `task` (task->files->fdt->fd[fd]), zero
/// if there is none or the offsets are unknown.
#[inline(always)]
pub fn fd_file(task: *mut aya_ebpf::bindings::task_struct, fd: u64) -> u64 {
    if config!(fd_walk) == 0 {
        return 0;
    }
    let files = read_ptr(task as u64, config!(task_files_offset));
    let fdt = read_ptr(files, config!(files_fdt_offset));
    if fdt == 0 {
        return 0;
    }
    // SAFETY: fault-tolerant read of a kernel object.
    let max_fds: u32 = unsafe {
        bpf_probe_read_kernel((fdt + u64::from(config!(fdt_max_fds_offset))) as *const u32)
    }
    .unwrap_or(0);
    if fd >= u64::from(max_fds) {
        return 0;
    }
    let fd_array = read_ptr(fdt, config!(fdt_fd_offset));
    read_ptr(fd_array, (fd * 8) as u32)
}

/// What kind of file `file` is, from its inode's `i_mode`.
#[inline(always)]
pub fn file_kind(file: u64) -> FdKind {
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
