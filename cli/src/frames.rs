//! Which frames of a stack tell one wait from another. Every stack passes through thread
//! or process entry (`start_thread`, `_start`, `std::rt::lang_start`), the syscall entry
//! (`do_syscall_64`) and the scheduler (`__schedule`): ranked by inclusive time they head
//! every table and say nothing. What does say something is the program's own code, the
//! frames nearest the wait that are neither kernel, shared libraries nor a language
//! runtime, and the library function it called into.

use stallscope_profile::{Frame, FrameKind};

/// Entry and scheduler frames, by exact name.
const PLUMBING: [&str; 24] = [
    // Thread and process entry.
    "start_thread",
    "clone",
    "clone3",
    "__clone",
    "__clone3",
    "_start",
    "__libc_start_main",
    "__libc_start_main_impl",
    "__libc_start_call_main",
    "__rust_begin_short_backtrace",
    // The syscall entry.
    "do_syscall_64",
    "entry_SYSCALL_64",
    "entry_SYSCALL_64_after_hwframe",
    "x64_sys_call",
    "syscall_exit_to_user_mode",
    // The scheduler: every off-CPU stack ends in it.
    "schedule",
    "__schedule",
    "finish_task_switch",
    "finish_task_switch.isra.0",
    "preempt_schedule_common",
    // Kernel thread entry.
    "ret_from_fork",
    "ret_from_fork_asm",
    "kthread",
    "worker_thread",
];

/// Entry frames by part of the name (Rust's thread and main trampolines).
const PLUMBING_PARTS: [&str; 6] = [
    "std::rt::lang_start",
    "::thread_start",
    "FnOnce::call_once",
    "std::panicking::",
    "std::panic::catch_unwind",
    "{{vtable.shim}}",
];

/// Name prefixes of language runtimes linked into the program's own binary.
const RUNTIME_PREFIXES: [&str; 7] = [
    "std::", "core::", "alloc::", "<std::", "<core::", "<alloc::", "__rust",
];

/// Whether `frame` is entry, syscall-entry or scheduler plumbing.
pub fn is_plumbing(frame: &Frame) -> bool {
    let name = frame.function.as_str();
    PLUMBING.contains(&name) || PLUMBING_PARTS.iter().any(|part| name.contains(part))
}

/// Whether `frame` is in a shared library (`libc.so.6`, `libpthread.so.0`, ...).
fn in_shared_library(frame: &Frame) -> bool {
    frame.module.as_deref().is_some_and(|module| {
        let file = module.rsplit('/').next().unwrap_or(module);
        file.contains(".so")
    })
}

/// Whether `frame` is the program's own code: user space, not a shared library, not a
/// language runtime, not plumbing.
pub fn is_own_code(frame: &Frame) -> bool {
    frame.kind == FrameKind::User
        && !in_shared_library(frame)
        && !RUNTIME_PREFIXES
            .iter()
            .any(|prefix| frame.function.starts_with(prefix))
        && !is_plumbing(frame)
}

/// What tells a stack apart, from frames innermost first: up to `keep` frames of the
/// program's own code nearest the wait (else of any user code, else of the kernel),
/// innermost first, and the function that code called into (library or kernel), if any.
pub fn telling_frames<'a>(stack: &[&'a Frame], keep: usize) -> (Vec<&'a Frame>, Option<&'a Frame>) {
    let own: Vec<usize> = stack
        .iter()
        .enumerate()
        .filter(|(_, frame)| is_own_code(frame))
        .map(|(i, _)| i)
        .collect();
    let chosen: Vec<usize> = if own.is_empty() {
        let user: Vec<usize> = stack
            .iter()
            .enumerate()
            .filter(|(_, f)| f.kind != FrameKind::Kernel && !is_plumbing(f))
            .map(|(i, _)| i)
            .collect();
        if user.is_empty() {
            stack
                .iter()
                .enumerate()
                .filter(|(_, f)| !is_plumbing(f))
                .map(|(i, _)| i)
                .collect()
        } else {
            user
        }
    } else {
        own
    };
    let frames: Vec<&Frame> = chosen.iter().take(keep).map(|&i| stack[i]).collect();
    // The callee of the innermost chosen frame: the nearest frame inside it that is not
    // plumbing (the library function, or the kernel's syscall handler).
    let called = chosen.first().and_then(|&innermost| {
        stack[..innermost]
            .iter()
            .rev()
            .find(|frame| !is_plumbing(frame))
            .copied()
    });
    (frames, called)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str, kind: FrameKind, module: Option<&str>) -> Frame {
        Frame {
            function: name.to_owned(),
            module: module.map(str::to_owned),
            file: None,
            line: None,
            address: 0,
            kind,
        }
    }

    #[test]
    fn own_code_and_its_callee_tell_stacks_apart() {
        let app = Some("/usr/bin/app");
        let libc = Some("/usr/lib/x86_64-linux-gnu/libc.so.6");
        let frames = [
            frame("__schedule", FrameKind::Kernel, None),
            frame("futex_wait", FrameKind::Kernel, None),
            frame("do_syscall_64", FrameKind::Kernel, None),
            frame("syscall", FrameKind::User, libc),
            frame(
                "std::sys::sync::mutex::futex::Mutex::lock_contended",
                FrameKind::User,
                app,
            ),
            frame("app::worker::process", FrameKind::User, app),
            frame("app::worker::run", FrameKind::User, app),
            frame(
                "std::sys::thread::unix::Thread::new::thread_start",
                FrameKind::User,
                app,
            ),
            frame("start_thread", FrameKind::User, libc),
        ];
        let stack: Vec<&Frame> = frames.iter().collect();
        let (own, called) = telling_frames(&stack, 3);
        let names: Vec<&str> = own.iter().map(|f| f.function.as_str()).collect();
        assert_eq!(names, ["app::worker::process", "app::worker::run"]);
        assert_eq!(
            called.map(|f| f.function.as_str()),
            Some("std::sys::sync::mutex::futex::Mutex::lock_contended")
        );
        assert!(is_plumbing(&frames[0]) && is_plumbing(&frames[2]) && is_plumbing(&frames[8]));
        assert!(!is_plumbing(&frames[1]));
        // A kernel thread: kernel frames other than the plumbing.
        let kworker = [
            frame("__schedule", FrameKind::Kernel, None),
            frame("rcu_gp_kthread", FrameKind::Kernel, None),
            frame("kthread", FrameKind::Kernel, None),
        ];
        let stack: Vec<&Frame> = kworker.iter().collect();
        let (frames, called) = telling_frames(&stack, 3);
        assert_eq!(frames[0].function, "rcu_gp_kthread");
        assert!(called.is_none());
    }
}
