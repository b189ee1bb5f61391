//! End to end, as root, on the real kernel: the bundled workload blocks 20 x 50 ms inside
//! `offcpu_marker_sleep` while another thread spins inside `oncpu_marker_spin`; the agent
//! must measure and attribute both, and its files must be readable by other tools.

use std::{path::PathBuf, process::Command};

use stallscope_profile::{
    Profile, SampleType,
    folded::{parse_folded, profile_from_folded},
    pprof::decode_pprof,
    svg::write_svg,
    view::FlameView,
};
use stallscope_tests::{
    binary_dir, label, record_workload, require_root, scratch_dir, value_index as index,
};

fn record(test: &str, file: &str, extra: &[&str]) -> PathBuf {
    let out = scratch_dir(test).join(file);
    let out_arg = out.to_string_lossy().into_owned();
    let mut args = vec!["-o", out_arg.as_str()];
    args.extend_from_slice(extra);
    let exit = record_workload(&binary_dir(), &["markers", "800"], &args).expect("recording runs");
    assert!(exit.status.success(), "agent failed: {}", exit.stderr);
    assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
    out
}

/// Parses pprof's `of 1.23s total` (or `ms`, `us`, `ns`, `min`, `hrs`) into nanoseconds.
fn pprof_total_ns(top: &str) -> f64 {
    let line = top
        .lines()
        .find(|l| l.starts_with("Showing nodes accounting for") && l.ends_with(" total"))
        .unwrap_or_else(|| panic!("no total in pprof output:\n{top}"));
    let before = line.split(" total").next().unwrap_or_default();
    let value = before.rsplit(' ').next().unwrap_or_default();
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .unwrap_or_else(|_| panic!("bad total `{value}`"));
    let scale = match unit {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "mins" | "min" => 60e9,
        "hrs" | "h" => 3600e9,
        _ => panic!("unknown unit in `{value}`"),
    };
    number * scale
}

#[test]
fn offcpu_and_oncpu_markers_are_measured_and_attributed() {
    if !require_root("offcpu_and_oncpu_markers_are_measured_and_attributed") {
        return;
    }
    let path = record("markers", "markers.pb.gz", &["--signals", "offcpu,oncpu"]);
    let bytes = std::fs::read(&path).expect("profile written");
    let profile: Profile = decode_pprof(&bytes).expect("valid pprof");

    // Off-CPU: 20 x 50 ms in offcpu_marker_sleep, interruptible sleep.
    let off_ns = index(&profile, "off_cpu", "nanoseconds");
    let marker_ns = profile.total_where(off_ns, |s| {
        label(s, "state") == "interruptible" && profile.stack_contains(s, "offcpu_marker_sleep")
    });
    let seconds = marker_ns as f64 / 1e9;
    assert!(
        (0.9..=1.1).contains(&seconds),
        "off-CPU time in offcpu_marker_sleep: {seconds:.3}s, expected 1.0s +-10%"
    );

    // On-CPU: the spinner's samples are in oncpu_marker_spin.
    let on_count = index(&profile, "on_cpu_samples", "count");
    let spinner = profile.total_where(on_count, |s| label(s, "thread") == "spinner");
    let in_marker = profile.total_where(on_count, |s| {
        label(s, "thread") == "spinner" && profile.stack_contains(s, "oncpu_marker_spin")
    });
    assert!(spinner >= 20, "too few spinner samples: {spinner}");
    let share = in_marker as f64 / spinner as f64;
    assert!(
        share >= 0.8,
        "only {:.0}% of {spinner} spinner samples in oncpu_marker_spin",
        share * 100.0
    );

    // The reference pprof reader agrees on the total.
    let top = Command::new("go")
        .args(["tool", "pprof", "-top"])
        .arg(&path)
        .output()
        .expect("go tool pprof runs (cargo xtask test installs golang-go)");
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "pprof failed: {}",
        String::from_utf8_lossy(&top.stderr)
    );
    let expected = profile.total(profile.meta.default_sample_type) as f64;
    let read = pprof_total_ns(&text);
    assert!(
        (read - expected).abs() <= expected * 0.01 + 1e6,
        "pprof total {read} ns vs profile total {expected} ns\n{text}"
    );
}

#[test]
fn folded_output_renders_to_svg() {
    if !require_root("folded_output_renders_to_svg") {
        return;
    }
    let path = record("folded", "markers.folded", &["--signals", "offcpu"]);
    let text = std::fs::read_to_string(&path).expect("folded written");
    let lines = parse_folded(text.as_bytes()).expect("valid folded stacks");
    assert!(
        lines
            .iter()
            .any(|(frames, _)| frames.iter().any(|f| f.contains("offcpu_marker_sleep"))),
        "no offcpu_marker_sleep stack in:\n{text}"
    );
    let profile = profile_from_folded(&lines, SampleType::new("off_cpu", "nanoseconds"));
    let mut svg = Vec::new();
    write_svg(&profile, 0, &FlameView::default(), "test", &mut svg).expect("renders");
    let svg = String::from_utf8_lossy(&svg);
    assert!(
        svg.starts_with("<?xml") || svg.starts_with("<svg"),
        "not an SVG"
    );
    assert!(svg.contains("offcpu_marker_sleep"));
}

#[test]
fn svg_output_is_written_directly() {
    if !require_root("svg_output_is_written_directly") {
        return;
    }
    let path = record("svg", "markers.svg", &["--signals", "offcpu,oncpu"]);
    let svg = std::fs::read_to_string(&path).expect("svg written");
    assert!(svg.contains("<svg"), "not an SVG");
    assert!(svg.contains("offcpu_marker_sleep") && svg.contains("oncpu_marker_spin"));
}

/// Off-CPU time of the agent's own process in a whole-host recording of 2 s.
fn agent_own_time(test: &str, extra: &[&str]) -> i64 {
    let out = scratch_dir(test).join("host.pb.gz");
    let out_arg = out.to_string_lossy().into_owned();
    let mut args = vec![
        "record",
        "--duration",
        "10m",
        "--signals",
        "offcpu",
        "-o",
        out_arg.as_str(),
    ];
    args.extend_from_slice(extra);
    let _serial = stallscope_tests::serial();
    let agent = stallscope_tests::start_agent(&args).expect("agent starts");
    let pid = agent.pid().to_string();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (profile, _) = stallscope_tests::stop_agent(agent, &out);
    let off = index(&profile, "off_cpu", "nanoseconds");
    profile.total_where(off, |s| label(s, "pid") == pid)
}

#[test]
fn the_agent_leaves_itself_out_unless_asked() {
    if !require_root("the_agent_leaves_itself_out_unless_asked") {
        return;
    }
    let left_out = agent_own_time("self-out", &[]);
    assert_eq!(left_out, 0, "the agent profiled its own threads");
    let included = agent_own_time("self-in", &["--include-agent"]);
    assert!(
        included > 0,
        "--include-agent: no off-CPU time of the agent's own threads"
    );
}
