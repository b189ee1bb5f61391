//! `cargo xtask test`: bootstrap the toolchain, install the test peers (and the browser
//! test's driver), start a private ClickHouse on loopback, build every binary, run unit
//! and end-to-end tests, stop ClickHouse. End-to-end tests load real probes and need
//! root; with `CI=true` they fail rather than skip, and so do the ClickHouse tests and
//! the browser test.

use crate::{bootstrap, clickhouse, debian, util};

/// Debian packages the tests use as real peers: `go tool pprof` reads our pprof files;
/// the network tests build namespaces and veth pairs (`ip`), shape a path (`tc`) and
/// drop packets on one (`nft`); a C compiler and binutils build, strip and split the
/// debug info of the C workload the symbolization tests make; util-linux's `unshare`
/// gives a workload its own mount namespace and `losetup`; `e2fsprogs` and `mount` make
/// and mount the scenario lab's journal file system; ClickHouse is the fleet storage
/// backend; Alertmanager is the real sender of the webhook the collector receives;
/// Chromium and Node.js run the web UI's browser test (its driver, playwright-core,
/// comes from npm); `systemd-analyze verify` checks the shipped units (and util-linux's
/// `setpriv` starts the agent with only their capabilities); Prometheus's `promtool`
/// checks the `/metrics` outputs; `python3-venv` holds `kubernetes-validate` (a Python
/// package), the offline check of the Kubernetes manifests.
const TEST_PACKAGES: &[&str] = &[
    "golang-go",
    "iproute2",
    "nftables",
    "gcc",
    "libc6-dev",
    "binutils",
    "util-linux",
    "e2fsprogs",
    "mount",
    "clickhouse-server",
    "prometheus-alertmanager",
    "prometheus",
    "python3-venv",
    "chromium",
    "nodejs",
    "systemd",
];

pub fn run(extra: &[String]) -> anyhow::Result<()> {
    bootstrap::ensure()?;
    let can_install = util::is_root() || util::in_ci();
    if can_install {
        debian::ensure(TEST_PACKAGES)?;
        // npm comes with some Node.js builds and is a package of its own in Debian.
        if !util::command_exists("npm") {
            debian::ensure(&["npm"])?;
        }
        stallscope_tests::browser::install_driver(&util::root().join("target"))?;
        stallscope_tests::kubernetes::install_validator(&util::root().join("target"))?;
    } else {
        eprintln!(
            "xtask: not root: end-to-end tests will skip (they load eBPF probes); run `sudo -E cargo xtask test` for all"
        );
    }
    let server = if can_install || clickhouse::answering() {
        Some(clickhouse::ensure_running()?)
    } else {
        None
    };
    util::cargo(&["build", "--bins"])?;
    let pinned_before = pinned_probes();
    let mut args = vec!["test", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    let result = util::run(
        std::process::Command::new(env!("CARGO"))
            .args(&args)
            .current_dir(util::root())
            .env("STALLSCOPE_CLICKHOUSE_URL", clickhouse::url()),
    );
    drop(server);
    // An agent the tests killed without removing its pins would leave its probes
    // attached and counting on this host: that fails the suite (and they are removed).
    let left: Vec<_> = pinned_probes()
        .into_iter()
        .filter(|dir| !pinned_before.contains(dir))
        .collect();
    for dir in &left {
        let _ = std::fs::remove_dir_all(dir);
    }
    result?;
    if !left.is_empty() {
        anyhow::bail!(
            "the tests left agents' probes pinned and attached (removed now): {left:?}; a test killed an agent without removing its pins"
        );
    }
    Ok(())
}

/// The directories of pinned probes on this host (`run.pin_dir`'s default): one per
/// agent and map layout. An agent's directory left empty is removed, not counted.
fn pinned_probes() -> Vec<std::path::PathBuf> {
    let mut pinned = Vec::new();
    let Ok(agents) = std::fs::read_dir("/sys/fs/bpf/stallscope") else {
        return pinned;
    };
    for agent in agents.flatten() {
        let layouts: Vec<_> = std::fs::read_dir(agent.path())
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        if layouts.is_empty() {
            let _ = std::fs::remove_dir(agent.path());
        }
        pinned.extend(layouts);
    }
    pinned
}
