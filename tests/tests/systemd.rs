//! The systemd units in `deploy/systemd/`: `systemd-analyze verify` accepts both; the
//! collector and the agent speak `sd_notify` on a real `NOTIFY_SOCKET` (`READY=1`
//! once listening / attached, `WATCHDOG=1` at half of `WATCHDOG_USEC`, `STOPPING=1`);
//! and, as root, the agent started with exactly the capabilities its unit grants (not
//! root's) records real, symbolized stacks and keeps, once attached, only the ones it
//! still needs, in every thread.

use std::{path::Path, process::Command, time::Duration};

use stallscope_profile::FrameKind;
use stallscope_tests::{
    AgentRun, Workload, binary, binary_dir,
    collector::{CollectorProcess, free_port, scratch},
    label, require_root, scratch_dir, serial,
    systemd::{
        NotifySocket, capability_mask, process_capabilities, unit_capabilities, unit_file,
        with_only_capabilities,
    },
    value_index,
};

/// 400 ms: the daemons ping every 200 ms, so a few seconds show several pings.
const WATCHDOG_USEC: &str = "400000";

fn read_unit(name: &str) -> String {
    let path = unit_file(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `systemd-analyze verify` on `units` (name and text) installed in a scratch
/// directory, their `/usr/local/bin/` binaries pointing at the built ones (verify
/// checks that `ExecStart=` exists). Returns its exit success and its output.
fn verify(test: &str, units: &[(&str, String)]) -> (bool, String) {
    let dir = scratch(test);
    let bin = binary_dir();
    let mut paths = Vec::new();
    for (name, text) in units {
        let installed = text.replace("/usr/local/bin/", &format!("{}/", bin.display()));
        let path = dir.join(name);
        std::fs::write(&path, installed).expect("write unit");
        paths.push(path);
    }
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .current_dir(&dir)
        .output()
        .expect("systemd-analyze runs (`cargo xtask bootstrap` installs the systemd package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn systemd_analyze_verify_accepts_both_units() {
    let agent = read_unit("stallscope-agent.service");
    let collector = read_unit("stallscope-collector.service");
    let (ok, output) = verify(
        "verify-units",
        &[
            ("stallscope-agent.service", agent.clone()),
            ("stallscope-collector.service", collector.clone()),
        ],
    );
    assert!(
        ok && output.trim().is_empty(),
        "verify complained:\n{output}"
    );
    // The check can fail: a misspelt key and a missing binary are reported.
    let broken = agent
        .replace("WatchdogSec=", "WatchDogSec=")
        .replace("stallscope-agent run", "stallscope-agnet run");
    let (ok, output) = verify("verify-broken", &[("stallscope-agent.service", broken)]);
    assert!(
        !ok && output.contains("WatchDogSec") && output.contains("stallscope-agnet"),
        "{output}"
    );
    for unit in [&agent, &collector] {
        assert!(unit.contains("\nType=notify\n") && unit.contains("\nWatchdogSec="));
    }
    // The agent's state directory is where its spool is by default.
    let state = agent
        .lines()
        .find_map(|line| line.strip_prefix("StateDirectory="))
        .expect("the agent's unit has a state directory");
    let printed = Command::new(binary(&binary_dir(), "stallscope-agent").expect("agent built"))
        .args(["run", "--print-config"])
        .output()
        .expect("agent runs");
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.contains(&format!("spool_dir = \"/var/lib/{state}/spool\"")),
        "{printed}"
    );
    // The example configuration files the units read are valid: the agent's as a
    // whole; the collector's up to reading its credentials, which only systemd passes.
    let config_dir = unit_file("agent.toml");
    let printed = Command::new(binary(&binary_dir(), "stallscope-agent").expect("agent built"))
        .args(["run", "--print-config", "--config"])
        .arg(&config_dir)
        .output()
        .expect("agent runs");
    assert!(
        printed.status.success()
            && String::from_utf8_lossy(&printed.stdout)
                .contains(&format!("spool_dir = \"/var/lib/{state}/spool\"")),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let refused =
        Command::new(binary(&binary_dir(), "stallscope-collector").expect("collector built"))
            .args(["--print-config", "--config"])
            .arg(unit_file("collector.toml"))
            .output()
            .expect("collector runs");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains("reading /run/credentials/stallscope-collector.service/tls.crt"),
        "{stderr}"
    );
}

#[test]
fn collector_notifies_ready_watchdog_and_stopping() {
    let mut notify = NotifySocket::bind("collector").expect("notify socket");
    let data = scratch("notify-collector");
    let data_arg = data.to_string_lossy().into_owned();
    let address = notify.address();
    let mut collector = CollectorProcess::start(
        &binary_dir(),
        free_port().expect("port"),
        &[
            "--plaintext",
            "--insecure-no-query-auth",
            "--data-dir",
            &data_arg,
        ],
        &[
            ("NOTIFY_SOCKET", &address),
            ("WATCHDOG_USEC", WATCHDOG_USEC),
        ],
    )
    .expect("collector starts");
    notify
        .wait_for("READY=1", 1, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}: {}", collector.log()));
    assert_eq!(notify.received()[0].lines().next(), Some("READY=1"));
    notify
        .wait_for("WATCHDOG=1", 4, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(notify.count("STOPPING=1"), 0);
    collector.terminate();
    let status = collector
        .wait_exit(Duration::from_secs(30))
        .expect("collector exits");
    assert!(status.success(), "{}", collector.log());
    notify
        .wait_for("STOPPING=1", 1, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// What the agent keeps once attached, as the unit's comments and README say.
const KEPT: [&str; 4] = [
    "sys_ptrace",
    "dac_read_search",
    "checkpoint_restore",
    "syslog",
];

#[test]
fn agent_with_the_units_capabilities_records_symbolized_stacks_and_drops_the_rest() {
    if !require_root(
        "agent_with_the_units_capabilities_records_symbolized_stacks_and_drops_the_rest",
    ) {
        return;
    }
    let _serial = serial();
    let caps = unit_capabilities(&read_unit("stallscope-agent.service"));
    assert!(caps.contains(&"bpf".to_owned()) && caps.contains(&"perfmon".to_owned()));
    assert!(
        !caps.contains(&"sys_admin".to_owned()),
        "the unit grants CAP_SYS_ADMIN: {caps:?}"
    );
    let bin = binary_dir();
    let mut workload = Workload::start(
        &binary(&bin, "stallscope-workload").expect("workload built"),
        &["markers", "300"],
    )
    .expect("workload starts");
    let workload_pid = workload.pid.to_string();
    let out = scratch_dir("unit-caps").join("unit-caps.pb.gz");
    let mut notify = NotifySocket::bind("agent").expect("notify socket");
    let mut command = with_only_capabilities(
        &binary(&bin, "stallscope-agent").expect("agent built"),
        &caps,
    );
    command
        .args(["record", "--signals", "offcpu,oncpu", "--duration", "10m"])
        .args(["--pid", &workload.pid.to_string(), "-o"])
        .arg(&out)
        .env("NOTIFY_SOCKET", notify.address())
        .env("WATCHDOG_USEC", WATCHDOG_USEC);
    let mut agent = AgentRun::spawn(command).expect("agent starts");
    notify
        .wait_for("READY=1", 1, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}: {}", agent.log_text()));
    let log = agent
        .wait_log("capabilities: kept", Duration::from_secs(5))
        .expect("the agent says what it kept");

    // Once attached: only what reading processes needs, in every thread, and nothing
    // left in the bounding set to get the rest back.
    let kept = capability_mask(&KEPT);
    let pid = agent.pid();
    let (effective, permitted, bounding) = process_capabilities(pid).expect("agent status");
    assert_eq!(
        (effective, permitted, bounding),
        (kept, kept, kept),
        "CapEff/CapPrm/CapBnd {effective:x}/{permitted:x}/{bounding:x}, expected {kept:x}: {log}"
    );
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let task = task.expect("task").path();
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let tid: u32 = task
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .expect("tid");
        if status.is_empty() {
            continue;
        }
        let caps = process_capabilities(tid).expect("thread status");
        assert_eq!(caps, (kept, kept, kept), "thread {tid}");
        threads += 1;
    }
    assert!(threads > 1, "the agent runs several threads");

    workload.go().expect("go");
    workload
        .wait_done(Duration::from_secs(60))
        .expect("workload done");
    // The sampling loop kept the watchdog fed meanwhile.
    notify
        .wait_for("WATCHDOG=1", 3, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
    agent.interrupt();
    let exit = agent.wait(Duration::from_secs(120)).expect("agent stops");
    assert!(exit.status.success(), "agent failed: {}", exit.stderr);
    notify
        .wait_for("STOPPING=1", 1, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
    workload
        .finish(Duration::from_secs(10))
        .expect("workload exits");

    let profile = stallscope_profile::pprof::decode_pprof(
        &std::fs::read(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display())),
    )
    .expect("valid pprof");
    let off_cpu = value_index(&profile, "off_cpu", "nanoseconds");
    let marker = profile.total_where(off_cpu, |s| {
        label(s, "pid") == workload_pid && profile.stack_contains(s, "offcpu_marker_sleep")
    });
    assert!(
        marker > 100_000_000,
        "off-CPU time under offcpu_marker_sleep: {marker} ns (the workload slept 300 ms)"
    );
    let sample = profile
        .samples
        .iter()
        .find(|s| profile.stack_contains(s, "offcpu_marker_sleep"))
        .expect("a marker sample");
    let frames: Vec<_> = profile.stack_frames(sample).collect();
    let kernel_named = frames
        .iter()
        .filter(|f| f.kind == FrameKind::Kernel && !f.function.starts_with("[unknown]"))
        .count();
    let unknown: Vec<&str> = frames
        .iter()
        .filter(|f| f.function.starts_with("[unknown]"))
        .map(|f| f.function.as_str())
        .collect();
    assert!(
        kernel_named > 0 && unknown.is_empty(),
        "kernel frames named: {kernel_named}, unknown frames: {unknown:?}"
    );
    assert!(Path::new(&out).exists());
}
