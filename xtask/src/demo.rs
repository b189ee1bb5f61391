//! `cargo xtask demo`: profile the bundled workload (a thread sleeping in
//! `offcpu_marker_sleep`, another spinning in `oncpu_marker_spin`) and write a flame graph.

use std::path::Path;

use anyhow::bail;
use stallscope_tests::record_workload;

use crate::{bootstrap, util};

pub fn run(_args: &[String]) -> anyhow::Result<()> {
    if !util::is_root() {
        bail!("the demo loads eBPF probes: run it as root, e.g. `sudo -E cargo xtask demo`");
    }
    bootstrap::ensure()?;
    util::cargo(&["build", "--release", "--bins"])?;
    let root = util::root();
    let out_dir = root.join("out");
    std::fs::create_dir_all(&out_dir)?;
    let bin_dir = root.join("target").join("release");
    let mut written = Vec::new();
    for file in ["demo.svg", "demo.pb.gz"] {
        let path = out_dir.join(file);
        let path_arg = path.to_string_lossy().into_owned();
        let exit = record_workload(
            &bin_dir,
            &["markers", "1000"],
            &["-o", &path_arg, "--signals", "offcpu,oncpu"],
        )?;
        if !exit.status.success() {
            bail!("the agent failed: {}", exit.stderr);
        }
        if let Some(summary) = exit.stderr.lines().rev().find(|l| l.starts_with("wrote ")) {
            println!("{summary}");
        }
        written.push(path);
    }
    println!();
    println!(
        "Flame graph (off-CPU + on-CPU of the demo workload): {}",
        shown(&written[0])
    );
    println!(
        "pprof profile: {}  (try: go tool pprof -top {})",
        shown(&written[1]),
        shown(&written[1])
    );
    Ok(())
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}
