//! End to end, as root: symbols that hold up in production. A process that exits right
//! after its last wait, worker processes forked without exec that live 10 ms, a binary
//! only visible inside its own mount namespace, a stripped binary with a separate debug
//! file and an inlined function, and JIT code named by a perf map must all come out
//! symbolized.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use stallscope_profile::{Frame, FrameKind, Profile, Sample};
use stallscope_tests::{
    AgentRun, Workload, binary, binary_dir,
    fixtures::{self, Build},
    label, record_started, require_root, scratch_dir, serial, start_agent, stop_agent, value_index,
    wait_for,
};

fn within(actual: f64, expected: f64, tolerance: f64) -> bool {
    (actual - expected).abs() <= expected * tolerance
}

fn workload_binary() -> PathBuf {
    binary(&binary_dir(), "stallscope-workload").expect("workload built")
}

fn off_cpu_where(profile: &Profile, keep: impl Fn(&Sample) -> bool) -> f64 {
    let index = value_index(profile, "off_cpu", "nanoseconds");
    profile.total_where(index, keep) as f64
}

fn user_frames<'a>(profile: &'a Profile, sample: &'a Sample) -> Vec<&'a Frame> {
    profile
        .stack_frames(sample)
        .filter(|f| f.kind == FrameKind::User)
        .collect()
}

/// Each sample's off-CPU time and innermost user frames, for failure messages.
fn describe(profile: &Profile, samples: &[&Sample]) -> String {
    use std::fmt::Write;
    let index = value_index(profile, "off_cpu", "nanoseconds");
    let mut text = String::new();
    for sample in samples {
        let frames: Vec<&str> = user_frames(profile, sample)
            .iter()
            .take(6)
            .map(|f| f.function.as_str())
            .collect();
        let ns = sample.values.get(index).copied().unwrap_or_default();
        let _ = write!(text, "\n  pid {} {ns} ns {frames:?}", label(sample, "pid"));
    }
    text
}

/// User frames of `sample` placed in no binary of its process (an address only): the
/// process was not read, or read as another image. A frame placed in a binary that has
/// no symbol there (`[unknown] /usr/lib/...so+0x3844`, a stripped library's local
/// function) is no such failure.
fn unplaced<'a>(profile: &'a Profile, sample: &'a Sample) -> Vec<&'a str> {
    user_frames(profile, sample)
        .into_iter()
        .filter(|f| f.function.starts_with("[unknown] 0x"))
        .map(|f| f.function.as_str())
        .collect()
}

/// Starts recording off-CPU time of the whole host, drained only when stopped, into
/// `NAME.pb.gz` in a scratch directory.
fn record_offcpu_until_stopped(name: &str) -> (AgentRun, PathBuf) {
    let out = scratch_dir(name).join(format!("{name}.pb.gz"));
    let out_arg = out.to_string_lossy().into_owned();
    let agent = start_agent(&[
        "record",
        "--duration",
        "10m",
        "--signals",
        "offcpu",
        "--drain-interval",
        "10m",
        "-o",
        &out_arg,
    ])
    .expect("agent starts");
    (agent, out)
}

#[test]
fn process_that_exits_after_its_last_wait_is_fully_symbolized() {
    if !require_root("process_that_exits_after_its_last_wait_is_fully_symbolized") {
        return;
    }
    let _serial = serial();
    // The process is long gone by the drain, and it starts after the agent, so only
    // process events can have told the agent about it.
    let (agent, out) = record_offcpu_until_stopped("exited");
    let mut workload =
        Workload::start(&workload_binary(), &["exit-soon", "5", "100"]).expect("workload");
    let pid = workload.pid;
    workload.go().expect("go");
    let status = workload
        .wait_exit(Duration::from_secs(60))
        .expect("workload exits by itself");
    assert!(status.success(), "workload failed: {status}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    let (profile, exit) = stop_agent(agent, &out);
    wait_for("the workload's results", Duration::from_secs(10), || {
        workload.results().contains_key("slept_ns")
    });
    // Five 50 ms sleeps, as long as they lasted by the workload's own clock (a sleep
    // overshoots on a busy host).
    let slept: f64 = workload.results()["slept_ns"].parse().expect("slept_ns");

    let pid = pid.to_string();
    let mine: Vec<&Sample> = profile
        .samples
        .iter()
        .filter(|s| label(s, "pid") == pid)
        .collect();
    assert!(!mine.is_empty(), "no samples of the exited process {pid}");
    let marker = off_cpu_where(&profile, |s| {
        label(s, "pid") == pid && profile.stack_contains(s, "offcpu_marker_sleep")
    });
    assert!(
        within(marker, slept, 0.10),
        "off-CPU time in offcpu_marker_sleep: {marker:.0} ns, the workload slept 5 x 50 ms \
         for {slept:.0} ns; its samples: {}\nthe agent said: {}",
        describe(&profile, &mine),
        exit.stderr
    );
    for sample in &mine {
        let unplaced = unplaced(&profile, sample);
        assert!(
            unplaced.is_empty(),
            "frames placed in no binary: {unplaced:?}; the agent said: {}",
            exit.stderr
        );
    }
    let sample = mine
        .iter()
        .find(|s| profile.stack_contains(s, "offcpu_marker_sleep"))
        .expect("a marker sample");
    assert!(label(sample, "exe").ends_with("/stallscope-workload"));
    assert_eq!(
        label(sample, "build_id"),
        fixtures::build_id(&workload_binary()).expect("workload has a build-id")
    );
}

#[test]
fn forked_workers_that_exit_at_once_are_symbolized_from_their_parent() {
    if !require_root("forked_workers_that_exit_at_once_are_symbolized_from_their_parent") {
        return;
    }
    let _serial = serial();
    // Each worker is gone 10 ms after its fork, before any read of its own could start:
    // its stacks resolve through the snapshot it inherits.
    let (agent, out) = record_offcpu_until_stopped("forked");
    let mut workload =
        Workload::start(&workload_binary(), &["fork-workers", "20", "10"]).expect("workload");
    let parent = workload.pid.to_string();
    workload.go().expect("go");
    workload
        .wait_done(Duration::from_secs(60))
        .expect("workers done");
    let results = workload.results();
    let (profile, exit) = stop_agent(agent, &out);
    workload
        .finish(Duration::from_secs(10))
        .expect("workload exits");

    let workers: Vec<&str> = results["workers"].split(',').collect();
    assert_eq!(workers.len(), 20);
    let in_workers = |s: &Sample| workers.contains(&label(s, "pid"));
    let marker = off_cpu_where(&profile, |s| {
        in_workers(s) && profile.stack_contains(s, "offcpu_marker_sleep")
    });
    // Each 10 ms sleep lasts at least 10 ms and overshoots by the timer slack and the
    // wake-up latency (on a busy host, by a third): compared with the workers' own clocks.
    let slept: f64 = results["slept_ns"].parse().expect("slept_ns");
    assert!(
        (200e6..=400e6).contains(&slept),
        "the workers slept {slept:.0} ns for 20 x 10 ms"
    );
    let mine: Vec<&Sample> = profile.samples.iter().filter(|s| in_workers(s)).collect();
    assert!(
        within(marker, slept, 0.10),
        "off-CPU time of the workers in offcpu_marker_sleep: {marker:.0} ns, they slept 20 x 10 ms \
         for {slept:.0} ns; the workers' samples: {}\nthe agent said: {}",
        describe(&profile, &mine),
        exit.stderr
    );
    for sample in &mine {
        let unplaced = unplaced(&profile, sample);
        assert!(
            unplaced.is_empty(),
            "frames placed in no binary: {unplaced:?}; the agent said: {}",
            exit.stderr
        );
        assert!(label(sample, "exe").ends_with("/stallscope-workload"));
        assert_ne!(label(sample, "pid"), parent);
    }
}

#[test]
fn binary_in_a_private_mount_namespace_symbolizes() {
    if !require_root("binary_in_a_private_mount_namespace_symbolizes") {
        return;
    }
    let _serial = serial();
    let dir = scratch_dir("mntns");
    let inner = dir.join("inside");
    std::fs::create_dir_all(&inner).expect("mount point");
    let inner_binary = inner.join("ns-workload");
    // A tmpfs only the workload's namespace sees, holding its binary.
    let script = format!(
        "mount -t tmpfs stallscope-test '{inner}' && cp '{workload}' '{binary}' && exec '{binary}' markers 300",
        inner = inner.display(),
        workload = workload_binary().display(),
        binary = inner_binary.display(),
    );
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let workload = Workload::spawn(command).expect("workload in its own mount namespace");
    assert!(
        !inner_binary.exists(),
        "{} must not exist on the host",
        inner_binary.display()
    );
    let (profile, _) = record_started("mntns", workload, "mntns.pb.gz", &["--signals", "offcpu"]);

    let path = inner_binary.to_string_lossy().into_owned();
    let in_marker = off_cpu_where(&profile, |s| {
        profile.stack_frames(s).any(|f| {
            f.function.contains("offcpu_marker_sleep") && f.module.as_deref() == Some(&path)
        })
    });
    assert!(
        within(in_marker, 1e9, 0.10),
        "off-CPU time in offcpu_marker_sleep of {path}: {in_marker:.0} ns, expected 1 s"
    );
    assert!(
        profile.meta.binaries.iter().any(|b| b.path == path),
        "{:?}",
        profile.meta.binaries
    );
}

#[test]
fn stripped_binary_with_debuglink_symbolizes_with_inlined_frames() {
    if !require_root("stripped_binary_with_debuglink_symbolizes_with_inlined_frames") {
        return;
    }
    let dir = scratch_dir("debuglink");
    let app = dir.join("identapp");
    // No build-id: the debug file can only be found through the debuglink (and its CRC).
    fixtures::build_identapp(
        &app,
        Build {
            version: "1",
            build_id: false,
            split_debug: true,
        },
    )
    .expect("builds the C workload");
    let sections = fixtures::sections(&app).expect("readelf");
    assert!(
        !sections
            .iter()
            .any(|s| s == ".symtab" || s.starts_with(".debug")),
        "not stripped: {sections:?}"
    );
    assert!(sections.iter().any(|s| s == ".gnu_debuglink"));

    let workload = Workload::start(&app, &["10"]).expect("C workload");
    let (profile, _) = record_started(
        "debuglink",
        workload,
        "debuglink.pb.gz",
        &["--signals", "offcpu"],
    );

    let source_line =
        fixtures::line_of(&fixtures::identapp_source(), "INLINED_CALL_LINE").expect("marker line");
    let inlined = |s: &Sample| {
        let frames: Vec<&Frame> = profile.stack_frames(s).collect();
        frames.windows(2).any(|pair| {
            pair[0].function == "inlined_marker_wait"
                && pair[0]
                    .file
                    .as_deref()
                    .is_some_and(|f| f.ends_with("identapp.c"))
                && pair[0].line == Some(source_line)
                && pair[1].function == "outer_marker"
        })
    };
    let waited = off_cpu_where(&profile, inlined);
    assert!(
        within(waited, 500e6, 0.10),
        "off-CPU time under inlined_marker_wait (identapp.c:{source_line}) then outer_marker: {waited:.0} ns, expected 10 x 50 ms"
    );
    let path = app.to_string_lossy().into_owned();
    let binary = profile
        .meta
        .binaries
        .iter()
        .find(|b| b.path == path)
        .unwrap_or_else(|| panic!("{path} not in {:?}", profile.meta.binaries));
    assert!(
        binary
            .debug_file
            .as_deref()
            .is_some_and(|f| f.ends_with("identapp.debug")),
        "{binary:?}"
    );
}

#[test]
fn perf_map_names_jit_frames() {
    if !require_root("perf_map_names_jit_frames") {
        return;
    }
    let workload = Workload::start(&workload_binary(), &["jit"]).expect("workload");
    let (profile, _) = record_started("jit", workload, "jit.pb.gz", &["--signals", "offcpu"]);
    let through_jit = |s: &Sample| {
        let frames: Vec<&Frame> = profile.stack_frames(s).collect();
        frames.windows(3).any(|w| {
            w[0].function.ends_with("jit_callback")
                && w[1].function == "jit_marker_stub"
                && w[1].module.as_deref() == Some("[jit]")
                && w[2].function.ends_with("call_jit")
        })
    };
    let waited = off_cpu_where(&profile, through_jit);
    assert!(
        within(waited, 500e6, 0.10),
        "off-CPU time below jit_marker_stub: {waited:.0} ns, expected 10 x 50 ms"
    );
}

#[test]
fn check_tells_which_binaries_lack_frame_pointers() {
    if !require_root("check_tells_which_binaries_lack_frame_pointers") {
        return;
    }
    let workload = Workload::start(&workload_binary(), &["markers", "0"]).expect("workload");
    let agent = binary(&binary_dir(), "stallscope-agent").expect("agent built");
    let output = Command::new(agent)
        .args(["check", "--signals", "offcpu", "--pid"])
        .arg(workload.pid.to_string())
        .output()
        .expect("check runs");
    let report = String::from_utf8_lossy(&output.stdout);
    let line_of = |needle: &str| {
        report
            .lines()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no line for {needle} in:\n{report}"))
            .to_owned()
    };
    // The workload is built with frame pointers (.cargo/config.toml); Debian's C library
    // is not.
    assert!(
        line_of("/stallscope-workload ").contains("frame pointers: yes"),
        "{report}"
    );
    assert!(
        line_of("/libc.so").contains("frame pointers: NO"),
        "{report}"
    );
    drop(workload);
}

/// Function names (`t`/`T` symbols) of `binary`, as `nm` lists them.
fn nm_functions(binary: &Path) -> std::collections::BTreeSet<String> {
    let output = Command::new("nm")
        .arg(binary)
        .output()
        .expect("nm runs (cargo xtask test installs binutils)");
    assert!(output.status.success(), "nm {}", binary.display());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (_, kind, name) = (parts.next()?, parts.next()?, parts.next()?);
            matches!(kind, "t" | "T").then(|| name.to_owned())
        })
        .collect()
}

#[test]
fn short_c_function_names_are_named_as_nm_names_them() {
    if !require_root("short_c_function_names_are_named_as_nm_names_them") {
        return;
    }
    let _serial = serial();
    let dir = scratch_dir("short-names");
    let with_dwarf = dir.join("shortnames");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shortnames.c");
    let status = Command::new("cc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&with_dwarf)
        .arg(&source)
        .status()
        .expect("cc runs");
    assert!(status.success(), "cc failed");
    // The same without DWARF: the symbol table names the functions.
    let symbols_only = dir.join("shortnames-nodwarf");
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&with_dwarf)
        .arg(&symbols_only)
        .status()
        .expect("objcopy runs");
    assert!(status.success(), "objcopy --strip-debug failed");
    let chain = ["abcd", "abc", "xy", "x", "w", "c", "a"];
    for exe in [&with_dwarf, &symbols_only] {
        let names = nm_functions(exe);
        for function in chain {
            assert!(names.contains(function), "nm lacks {function}: {names:?}");
        }
        let workload = Workload::start(exe, &[]).expect("program starts");
        let (profile, _) = record_started(
            "short-names",
            workload,
            "short.pb.gz",
            &["--signals", "offcpu"],
        );
        let module = exe.to_string_lossy();
        let mut seen = std::collections::BTreeSet::new();
        for sample in &profile.samples {
            for frame in user_frames(&profile, sample) {
                if frame.module.as_deref() == Some(module.as_ref()) {
                    assert!(
                        names.contains(&frame.function),
                        "{}: frame `{}` is no function of the binary (nm: {names:?})",
                        exe.display(),
                        frame.function
                    );
                    seen.insert(frame.function.clone());
                }
            }
        }
        for function in chain {
            assert!(
                seen.contains(function),
                "{}: `{function}` missing from the stacks; named: {seen:?}",
                exe.display()
            );
        }
    }
}
