//! End to end, as root, on the real kernel: user stacks through code built without frame
//! pointers. A C workload built `-O2 -fomit-frame-pointer` (`tests/fixtures/deepwait.c`)
//! and a Rust release binary (`deepwait.rs`) wait eight calls deep on a contended mutex,
//! a pipe read and a socket read, with a little work before each wait. With unwind tables
//! their stacks reach `main` with the whole chain, through glibc's own frame-pointer-less
//! functions; with tables off (the kernel's frame-pointer walk) the same stacks are cut.
//! The tests show both. A third program loads a library with `dlopen` after it started
//! and is unwound through it.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use stallscope_profile::{FrameKind, Profile, Sample};
use stallscope_tests::{
    Workload, label, record_started, require_root, scratch_dir, serial, start_agent, stop_agent,
    value_index,
};

/// Outermost first: the chain every wait of the main thread goes down.
const CHAIN: [&str; 9] = [
    "main", "deep1", "deep2", "deep3", "deep4", "deep5", "deep6", "deep7", "deep8",
];
const WAITS: [&str; 3] = ["wait_futex", "wait_pipe", "wait_socket"];
/// The main thread's waits outside the phases (stdin, the settling second, the stop), by
/// design not in the chain.
const OUTSIDE_PHASES: [&str; 4] = ["wait_for_line", "settle", "finish_phases", "join"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn run(command: &mut Command) {
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("{command:?}: {e} (cargo xtask test installs gcc)"));
    assert!(status.success(), "{command:?} failed");
}

/// The C workload, `-O2 -fomit-frame-pointer`.
fn compile_c(dir: &Path) -> PathBuf {
    let output = dir.join("deepwait");
    run(Command::new("cc")
        .args(["-O2", "-g", "-fomit-frame-pointer", "-pthread", "-o"])
        .arg(&output)
        .arg(fixture("deepwait.c")));
    output
}

/// The Rust workload as a release build without frame pointers.
fn compile_rust(dir: &Path) -> PathBuf {
    let output = dir.join("deepwait-rs");
    run(Command::new("rustc")
        .args([
            "-O",
            "-C",
            "force-frame-pointers=no",
            "-C",
            "debuginfo=1",
            "--edition",
            "2024",
            "-o",
        ])
        .arg(&output)
        .arg(fixture("deepwait.rs")));
    output
}

/// A function's own name: the last path segment of a Rust path (`deepwait::deep1`).
fn short(function: &str) -> &str {
    function.rsplit("::").next().unwrap_or(function)
}

/// The user frames' functions of a sample, outermost first.
fn user_functions<'a>(profile: &'a Profile, sample: &'a Sample) -> Vec<&'a str> {
    let mut functions: Vec<&str> = profile
        .stack_frames(sample)
        .filter(|f| f.kind == FrameKind::User)
        .map(|f| short(&f.function))
        .collect();
    functions.reverse();
    functions
}

/// Whether `functions` (outermost first) holds each of `wanted` in order.
fn in_order<'a>(functions: &[&str], wanted: impl IntoIterator<Item = &'a str>) -> bool {
    let mut wanted = wanted.into_iter();
    let mut next = wanted.next();
    for function in functions {
        if next == Some(*function) {
            next = wanted.next();
        }
    }
    next.is_none()
}

/// Whether `functions` (outermost first) holds `main`, the chain in order, then each of
/// `then` in order.
fn whole(functions: &[&str], then: &[&str]) -> bool {
    in_order(functions, CHAIN.iter().chain(then).copied())
}

/// Of the main thread's time in `kind` (off-CPU or on-CPU) during the phases (not in its
/// stdin reads, its settling second or its stop), the part in whole stacks, all of it
/// (in ns or samples), and the largest stacks that were not whole (for the failure
/// message).
fn share(
    profile: &Profile,
    thread: &str,
    kind: &str,
    unit: &str,
    signal: &str,
) -> (i64, i64, String) {
    let index = value_index(profile, kind, unit);
    let mut whole_part = 0;
    let mut all = 0;
    let mut cut: Vec<(i64, Vec<&str>)> = Vec::new();
    for sample in profile.samples.iter().filter(|s| {
        label(s, "signal") == signal && label(s, "thread") == thread && s.values[index] > 0
    }) {
        let functions = user_functions(profile, sample);
        if functions.is_empty() || OUTSIDE_PHASES.iter().any(|f| functions.contains(f)) {
            continue;
        }
        all += sample.values[index];
        // Off-CPU: down to the wait; on-CPU: down the chain (the work before a wait, or
        // the lock's own spinning).
        let is_whole = if signal == "on-cpu" {
            whole(&functions, &[])
        } else {
            WAITS.iter().any(|w| whole(&functions, &[w]))
        };
        if is_whole {
            whole_part += sample.values[index];
        } else {
            cut.push((sample.values[index], functions));
        }
    }
    cut.sort_by_key(|(value, _)| std::cmp::Reverse(*value));
    let mut examples = String::new();
    for (value, functions) in cut.iter().take(6) {
        let _ = write!(examples, "\n  {value}: {functions:?}");
    }
    (whole_part, all, examples)
}

/// The agent's configuration with unwind tables on or off.
fn config(dir: &Path, tables: bool) -> String {
    let path = dir.join(if tables {
        "tables.toml"
    } else {
        "no-tables.toml"
    });
    let rows = if tables { 262_144 } else { 0 };
    std::fs::write(&path, format!("[probes]\nunwind_table_rows = {rows}\n"))
        .expect("config written");
    path.to_string_lossy().into_owned()
}

fn print_notes(profile: &Profile, what: &str) {
    for note in profile
        .meta
        .notes
        .iter()
        .filter(|n| n.starts_with("unwind tables") || n.starts_with("user stacks"))
    {
        eprintln!("{what}: {note}");
    }
    for (reason, count) in &profile.meta.losses {
        if reason.starts_with("user_stack_unwind.") && *count > 0 {
            eprintln!("{what}: {reason} {count}");
        }
    }
}

/// Records `exe` (its scenario) with the off-CPU, on-CPU and lock signals.
fn record(dir: &Path, exe: &Path, tables: bool) -> Profile {
    let config = config(dir, tables);
    let workload = Workload::start(exe, &[]).expect("workload starts");
    let name = format!(
        "unwind-{}-{}",
        exe.file_name().unwrap_or_default().to_string_lossy(),
        if tables { "tables" } else { "fp" }
    );
    let (profile, _) = record_started(
        &name,
        workload,
        "walk.pb.gz",
        // 999 Hz: the phases' ~0.3 s of work gives a few hundred on-CPU samples, so one
        // odd sample does not decide the 95% (at the default 49 Hz there are ~15).
        &[
            "--signals",
            "offcpu,oncpu,lock",
            "--frequency",
            "999",
            "--config",
            &config,
        ],
    );
    print_notes(&profile, &name);
    profile
}

fn print_examples(profile: &Profile, thread: &str, what: &str) {
    for sample in profile
        .samples
        .iter()
        .filter(|s| label(s, "thread") == thread && label(s, "signal") == "off-cpu")
        .take(4)
    {
        eprintln!("{what}: {:?}", user_functions(profile, sample));
    }
}

fn percent(part: i64, all: i64) -> f64 {
    100.0 * part as f64 / all.max(1) as f64
}

/// Records the program with and without tables and checks the main thread's stacks:
/// whole by table (>= 95% of its off-CPU time and on-CPU samples), cut by frame pointers.
/// The profile with tables.
fn whole_by_table_cut_without(exe: &Path) -> Profile {
    let dir = exe.parent().expect("scratch directory");
    let thread = exe
        .file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned();
    let cut = record(dir, exe, false);
    print_examples(&cut, &thread, "frame-pointer walk");
    let (fp_whole, fp_all, _) = share(&cut, &thread, "off_cpu", "nanoseconds", "off-cpu");
    eprintln!(
        "{thread}, frame-pointer walk: {:.1}% of {:.3} s off-CPU in whole stacks",
        percent(fp_whole, fp_all),
        fp_all as f64 / 1e9
    );
    let walked = record(dir, exe, true);
    print_examples(&walked, &thread, "tables");
    let (off_whole, off_all, off_cut) =
        share(&walked, &thread, "off_cpu", "nanoseconds", "off-cpu");
    let (on_whole, on_all, on_cut) = share(&walked, &thread, "on_cpu_samples", "count", "on-cpu");
    eprintln!(
        "{thread}, tables: {:.1}% of {:.3} s off-CPU and {on_whole} of {on_all} on-CPU samples in whole stacks; on-CPU others:{on_cut}",
        percent(off_whole, off_all),
        off_all as f64 / 1e9
    );
    assert!(off_all > 1_000_000_000, "the phases waited {off_all} ns");
    assert!(
        off_whole as f64 >= 0.95 * off_all as f64,
        "{thread}: off-CPU {off_whole} of {off_all} ns in stacks from main through the chain; the largest others:{off_cut}"
    );
    assert!(on_all >= 50, "{on_all} on-CPU samples of the main thread");
    assert!(
        on_whole as f64 >= 0.95 * on_all as f64,
        "{thread}: on-CPU {on_whole} of {on_all} samples in stacks from main through the chain; the others:{on_cut}"
    );
    // The frame-pointer walk of the same program loses the chain: the point of tables.
    assert!(
        (fp_whole as f64) < 0.5 * fp_all as f64,
        "{thread}: the frame-pointer walk already gave whole stacks ({fp_whole} of {fp_all} ns)"
    );
    walked
}

#[test]
fn c_without_frame_pointers_reaches_main_by_table() {
    if !require_root("c_without_frame_pointers_reaches_main_by_table") {
        return;
    }
    let _serial = serial();
    let exe = compile_c(&scratch_dir("unwind-walk-c"));
    let walked = whole_by_table_cut_without(&exe);

    // Each kind of wait, through glibc's frames: the caller of pthread_mutex_lock, read
    // and recv is on the stack.
    let off = value_index(&walked, "off_cpu", "nanoseconds");
    for (wait, libc) in [
        ("wait_futex", "pthread_mutex_lock"),
        ("wait_pipe", "read"),
        ("wait_socket", "recv"),
    ] {
        let found = walked.samples.iter().any(|s| {
            s.values[off] > 0 && {
                let functions = user_functions(&walked, s);
                whole(&functions, &[wait])
                    && functions
                        .iter()
                        .skip_while(|f| **f != wait)
                        .any(|f| f.contains(libc))
            }
        });
        assert!(found, "no off-CPU stack with {wait} calling {libc}");
    }
    // The lock signal's stacks name the function that took the lock.
    let lock = value_index(&walked, "lock_wait", "nanoseconds");
    let lock_named = walked.samples.iter().any(|s| {
        s.values[lock] > 0 && {
            let functions = user_functions(&walked, s);
            whole(&functions, &["wait_futex"])
                && functions.iter().any(|f| f.contains("pthread_mutex_lock"))
        }
    });
    assert!(
        lock_named,
        "no lock-wait stack naming wait_futex and pthread_mutex_lock"
    );
    // The helper's sleeps: the function calling nanosleep is on the stack.
    let slept = walked.samples.iter().any(|s| {
        label(s, "thread") == "holder" && s.values[off] > 0 && {
            let functions = user_functions(&walked, s);
            functions.contains(&"sleep_ms") && functions.iter().any(|f| f.contains("nanosleep"))
        }
    });
    assert!(
        slept,
        "no off-CPU stack of the holder naming sleep_ms over nanosleep"
    );
}

#[test]
fn a_rust_release_binary_reaches_main_by_table() {
    if !require_root("a_rust_release_binary_reaches_main_by_table") {
        return;
    }
    let _serial = serial();
    let exe = compile_rust(&scratch_dir("unwind-walk-rust"));
    whole_by_table_cut_without(&exe);
}

/// The library's chain, outermost first, under the thread function.
const LIBRARY_CHAIN: [&str; 5] = [
    "measured_main",
    "lib_deep1",
    "lib_deep2",
    "lib_deep3",
    "lib_sleep",
];

#[test]
fn a_library_loaded_after_start_is_unwound_through() {
    if !require_root("a_library_loaded_after_start_is_unwound_through") {
        return;
    }
    let _serial = serial();
    let dir = scratch_dir("unwind-dlopen");
    let library = dir.join("libdeep.so");
    run(Command::new("cc")
        .args([
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-fPIC",
            "-shared",
            "-o",
        ])
        .arg(&library)
        .arg(fixture("deeplib.c")));
    let exe = dir.join("deepload");
    run(Command::new("cc")
        .args(["-O2", "-g", "-fomit-frame-pointer", "-pthread", "-o"])
        .arg(&exe)
        .arg(fixture("deepload.c"))
        .arg("-ldl"));
    let config = config(&dir, true);
    let library_arg = library.to_string_lossy().into_owned();
    let mut workload = Workload::start(&exe, &[&library_arg]).expect("workload starts");
    let out = dir.join("dlopen.pb.gz");
    let out_arg = out.to_string_lossy().into_owned();
    let pid = workload.pid.to_string();
    let agent = start_agent(&[
        "record",
        "--pid",
        &pid,
        "--duration",
        "10m",
        "--signals",
        "offcpu",
        "--config",
        &config,
        "-o",
        &out_arg,
    ])
    .expect("agent starts");
    // The agent has read the process before the library is loaded.
    std::thread::sleep(std::time::Duration::from_secs(2));
    workload.go().expect("go: load the library");
    // The warm-up thread's stacks run through code the agent has not seen mapped: it
    // reads the process again at its next drain, and loads the library's table.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert!(
        workload.lines().iter().any(|l| l == "loaded"),
        "the library did not load: {:?}",
        workload.lines()
    );
    workload.go().expect("go: the measured thread");
    workload
        .wait_done(std::time::Duration::from_secs(60))
        .expect("scenario done");
    let (profile, _) = stop_agent(agent, &out);
    print_notes(&profile, "dlopen");
    let off = value_index(&profile, "off_cpu", "nanoseconds");
    let (mut whole_ns, mut all_ns) = (0, 0);
    for sample in profile
        .samples
        .iter()
        .filter(|s| label(s, "thread") == "measured" && s.values[off] > 0)
    {
        let functions = user_functions(&profile, sample);
        if functions.is_empty() {
            continue;
        }
        all_ns += sample.values[off];
        if in_order(&functions, LIBRARY_CHAIN) && functions.iter().any(|f| f.contains("nanosleep"))
        {
            whole_ns += sample.values[off];
        } else {
            eprintln!("not whole: {functions:?}");
        }
    }
    eprintln!(
        "dlopen: {:.1}% of {:.3} s off-CPU of the measured thread in whole stacks",
        percent(whole_ns, all_ns),
        all_ns as f64 / 1e9
    );
    assert!(
        all_ns > 1_000_000_000,
        "the measured thread slept {all_ns} ns"
    );
    assert!(
        whole_ns as f64 >= 0.95 * all_ns as f64,
        "{whole_ns} of {all_ns} ns in stacks through the library's chain"
    );
}
