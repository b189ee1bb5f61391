//! Reading stacks the way an engineer does: skip the C library, the language runtime and
//! the kernel's entry code, and name the program's own functions; find the syscall a
//! thread was in from its kernel frames.

use stallscope_profile::{Frame, FrameKind, Profile, Sample};

/// Function-name prefixes of runtime code that says nothing about the program.
const RUNTIME_PREFIXES: &[&str] = &[
    "std::",
    "core::",
    "alloc::",
    "<std::",
    "<core::",
    "<alloc::",
    "__rust",
    "rust_",
    "tokio::runtime::",
    "<tokio::runtime::",
    "__GI_",
    "__libc_",
    "__pthread",
    "pthread_",
    "___pthread",
    "__lll_",
    "__futex",
    "__syscall",
    "__clone",
    "__nanosleep",
    "__internal_",
];

/// Whole function names of entry and wrapper code.
const RUNTIME_NAMES: &[&str] = &[
    "syscall",
    "start_thread",
    "clone",
    "clone3",
    "_start",
    "main",
];

/// Modules (file names) of shared libraries that are never the program's own code.
const LIBRARY_MODULES: &[&str] = &[
    "libc.so",
    "libc-",
    "libpthread",
    "ld-linux",
    "libstdc++",
    "libgcc_s",
    "libm.so",
    "librt",
    "libdl",
];

/// Whether a user frame belongs to the C library or a language runtime.
pub fn is_runtime(frame: &Frame) -> bool {
    if frame.kind != FrameKind::User {
        return true;
    }
    let module = frame
        .module
        .as_deref()
        .and_then(|m| m.rsplit('/').next())
        .unwrap_or("");
    if LIBRARY_MODULES.iter().any(|lib| module.starts_with(lib)) {
        return true;
    }
    let function = frame.function.as_str();
    function.starts_with("0x")
        || RUNTIME_NAMES.contains(&function)
        || RUNTIME_PREFIXES
            .iter()
            .any(|prefix| function.starts_with(prefix))
}

/// The program's own user frames of a sample, innermost first.
pub fn own_frames<'a>(profile: &'a Profile, sample: &'a Sample) -> Vec<&'a Frame> {
    profile
        .stack_frames(sample)
        .filter(|frame| !is_runtime(frame))
        .collect()
}

/// A short name for where a sample's thread was in its own code: the innermost own frame
/// and up to `depth - 1` callers, innermost first, joined with ` <- `.
pub fn own_path(profile: &Profile, sample: &Sample, depth: usize) -> Option<String> {
    let frames = own_frames(profile, sample);
    if frames.is_empty() {
        return None;
    }
    Some(
        frames
            .iter()
            .take(depth)
            .map(|f| short_function(&f.function))
            .collect::<Vec<_>>()
            .join(" <- "),
    )
}

/// A function name without its argument list and generic noise, kept whole otherwise.
pub fn short_function(name: &str) -> String {
    let name = name.split('(').next().unwrap_or(name);
    name.trim().to_owned()
}

/// The syscall a thread was in, from its kernel frames (`__x64_sys_fdatasync`,
/// `__do_sys_flock`, `ksys_fsync`...): `fdatasync`, `flock`, `fsync`.
pub fn syscall_of(profile: &Profile, sample: &Sample) -> Option<String> {
    profile
        .stack_frames(sample)
        .filter(|frame| frame.kind == FrameKind::Kernel)
        .find_map(|frame| {
            let name = frame.function.as_str();
            [
                "__x64_sys_",
                "__arm64_sys_",
                "__do_sys_",
                "__se_sys_",
                "ksys_",
            ]
            .iter()
            .find_map(|prefix| name.strip_prefix(prefix))
            .map(|rest| rest.split('.').next().unwrap_or(rest).to_owned())
        })
}

#[cfg(test)]
mod tests {
    use stallscope_profile::{Labels, SampleType};

    use super::*;

    fn user(function: &str, module: &str) -> Frame {
        Frame {
            function: function.into(),
            module: Some(module.into()),
            file: None,
            line: None,
            address: 0,
            kind: FrameKind::User,
        }
    }

    fn kernel(function: &str) -> Frame {
        Frame {
            function: function.into(),
            module: None,
            file: None,
            line: None,
            address: 0,
            kind: FrameKind::Kernel,
        }
    }

    #[test]
    fn own_code_is_told_from_libraries_and_runtimes() {
        let mut profile = Profile::new(vec![SampleType::new("off_cpu", "nanoseconds")]);
        let frames = [
            kernel("futex_do_wait"),
            kernel("__x64_sys_futex"),
            user("syscall", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            user(
                "std::sys::sync::mutex::futex::Mutex::lock_contended",
                "/app/demo",
            ),
            user("demo::inventory::reserve", "/app/demo"),
            user("demo::handler::handle_request", "/app/demo"),
            user("std::thread::Builder::spawn_unchecked", "/app/demo"),
            user("start_thread", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
        ];
        let stack = frames.into_iter().map(|f| profile.intern(f)).collect();
        profile.add(stack, Labels::new(), &[5]);
        let sample = &profile.samples[0];
        assert_eq!(
            own_path(&profile, sample, 2).as_deref(),
            Some("demo::inventory::reserve <- demo::handler::handle_request")
        );
        assert_eq!(syscall_of(&profile, sample).as_deref(), Some("futex"));
    }

    #[test]
    fn syscalls_are_read_from_kernel_frames() {
        let mut profile = Profile::new(vec![SampleType::new("off_cpu", "nanoseconds")]);
        let stack = [
            kernel("io_schedule"),
            kernel("file_write_and_wait_range"),
            kernel("ext4_sync_file"),
            kernel("__x64_sys_fdatasync"),
        ]
        .into_iter()
        .map(|f| profile.intern(f))
        .collect();
        profile.add(stack, Labels::new(), &[5]);
        assert_eq!(
            syscall_of(&profile, &profile.samples[0]).as_deref(),
            Some("fdatasync")
        );
    }
}
