//! End to end, as root, on the real kernel: user stacks through code built without frame
//! pointers. A C workload built `-O2 -fomit-frame-pointer` (`tests/fixtures/deepwait.c`)
//! waits eight calls deep on a contended mutex, a pipe read and a socket read, with a
//! little work before each wait. With unwind tables its stacks reach `main` with the
//! whole chain, through glibc's own frame-pointer-less functions; with tables off (the
//! kernel's frame-pointer walk) the same stacks are cut. The test shows both.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use stallscope_profile::{FrameKind, Profile, Sample};
use stallscope_tests::{
    Workload, label, record_started, require_root, scratch_dir, serial, value_index,
};

/// Outermost first: the chain every wait of the main thread goes down.
const CHAIN: [&str; 9] = [
    "main", "deep1", "deep2", "deep3", "deep4", "deep5", "deep6", "deep7", "deep8",
];
const WAITS: [&str; 3] = ["wait_futex", "wait_pipe", "wait_socket"];
/// The executable's name, which is also its main thread's.
const PROGRAM: &str = "deepwait";

fn compile(dir: &Path) -> PathBuf {
    let output = dir.join(PROGRAM);
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/deepwait.c");
    let status = Command::new("cc")
        .args(["-O2", "-g", "-fomit-frame-pointer", "-pthread", "-o"])
        .arg(&output)
        .arg(&source)
        .status()
        .expect("cc runs (cargo xtask test installs gcc)");
    assert!(status.success(), "cc failed");
    output
}

/// The user frames' functions of a sample, outermost first.
fn user_functions<'a>(profile: &'a Profile, sample: &'a Sample) -> Vec<&'a str> {
    let mut functions: Vec<&str> = profile
        .stack_frames(sample)
        .filter(|f| f.kind == FrameKind::User)
        .map(|f| f.function.as_str())
        .collect();
    functions.reverse();
    functions
}

/// Whether `functions` (outermost first) holds `main`, the chain in order, then each of
/// `then` in order.
fn whole(functions: &[&str], then: &[&str]) -> bool {
    let mut wanted = CHAIN.iter().chain(then).copied();
    let mut next = wanted.next();
    for function in functions {
        if next == Some(*function) {
            next = wanted.next();
        }
    }
    next.is_none()
}

/// Of the main thread's time in `kind` (off-CPU or on-CPU) during the phases (not in its
/// stdin reads, its settling second or its stop), the part in whole stacks, and all of
/// it, in ns or samples.
fn share(profile: &Profile, kind: &str, unit: &str, signal: &str) -> (i64, i64) {
    let index = value_index(profile, kind, unit);
    let mut whole_part = 0;
    let mut all = 0;
    for sample in profile.samples.iter().filter(|s| {
        label(s, "signal") == signal && label(s, "thread") == PROGRAM && s.values[index] > 0
    }) {
        let functions = user_functions(profile, sample);
        // The main thread's waits outside the phases, by design not in the chain.
        if functions.is_empty()
            || ["wait_for_line", "settle", "finish_phases"]
                .iter()
                .any(|f| functions.contains(f))
        {
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
        } else if std::env::var_os("UNWIND_WALK_VERBOSE").is_some() {
            eprintln!("not whole ({}): {functions:?}", sample.values[index]);
        }
    }
    (whole_part, all)
}

fn record(dir: &Path, exe: &Path, tables: bool) -> Profile {
    let config = dir.join(if tables {
        "tables.toml"
    } else {
        "no-tables.toml"
    });
    let rows = if tables { 262_144 } else { 0 };
    std::fs::write(&config, format!("[probes]\nunwind_table_rows = {rows}\n"))
        .expect("config written");
    let config = config.to_string_lossy().into_owned();
    let workload = Workload::start(exe, &[]).expect("workload starts");
    let name = if tables { "unwind-tables" } else { "unwind-fp" };
    let (profile, exit) = record_started(
        name,
        workload,
        "walk.pb.gz",
        &["--signals", "offcpu,oncpu,lock", "--config", &config],
    );
    for note in profile
        .meta
        .notes
        .iter()
        .filter(|n| n.starts_with("unwind tables") || n.starts_with("user stacks"))
    {
        eprintln!("{name}: {note}");
    }
    let _ = exit;
    profile
}

fn print_examples(profile: &Profile, what: &str) {
    for sample in profile
        .samples
        .iter()
        .filter(|s| label(s, "thread") == PROGRAM && label(s, "signal") == "off-cpu")
        .take(6)
    {
        eprintln!("{what}: {:?}", user_functions(profile, sample));
    }
}

#[test]
fn stacks_without_frame_pointers_reach_main_by_table() {
    if !require_root("stacks_without_frame_pointers_reach_main_by_table") {
        return;
    }
    let _serial = serial();
    let dir = scratch_dir("unwind-walk");
    let exe = compile(&dir);

    let cut = record(&dir, &exe, false);
    print_examples(&cut, "frame-pointer walk");
    let (fp_whole, fp_all) = share(&cut, "off_cpu", "nanoseconds", "off-cpu");
    eprintln!(
        "frame-pointer walk: {:.1}% of {:.3} s off-CPU in whole stacks",
        100.0 * fp_whole as f64 / fp_all.max(1) as f64,
        fp_all as f64 / 1e9
    );

    let walked = record(&dir, &exe, true);
    print_examples(&walked, "tables");
    let (off_whole, off_all) = share(&walked, "off_cpu", "nanoseconds", "off-cpu");
    let (on_whole, on_all) = share(&walked, "on_cpu_samples", "count", "on-cpu");
    eprintln!(
        "tables: {:.1}% of {:.3} s off-CPU and {on_whole} of {on_all} on-CPU samples in whole stacks",
        100.0 * off_whole as f64 / off_all.max(1) as f64,
        off_all as f64 / 1e9
    );
    assert!(off_all > 1_000_000_000, "the phases waited {off_all} ns");
    assert!(
        off_whole as f64 >= 0.95 * off_all as f64,
        "off-CPU: {off_whole} of {off_all} ns in stacks from main through the chain"
    );
    assert!(on_all >= 10, "{on_all} on-CPU samples of the main thread");
    assert!(
        on_whole as f64 >= 0.95 * on_all as f64,
        "on-CPU: {on_whole} of {on_all} samples in stacks from main through the chain"
    );
    // The frame-pointer walk of the same program loses the chain: the point of tables.
    assert!(
        (fp_whole as f64) < 0.5 * fp_all as f64,
        "the frame-pointer walk already gave whole stacks ({fp_whole} of {fp_all} ns)"
    );

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
