//! `cargo xtask lint` and `cargo xtask fmt`: rustfmt and clippy over the host crates and
//! the eBPF crate, no import cycles between the modules of a crate, and the agent's files
//! kept short.

use std::process::Command;

use anyhow::bail;

use crate::{
    bootstrap, import_cycles,
    util::{cargo, root, run},
};

pub fn lint() -> anyhow::Result<()> {
    bootstrap::ensure()?;
    import_cycle_check()?;
    file_length_check()?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    let toolchain = bootstrap::toolchain_bin();
    let path = std::env::join_paths(std::iter::once(toolchain).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    run(Command::new("cargo")
        .args([
            "+nightly",
            "clippy",
            "--package",
            "agent-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ])
        .env("PATH", path)
        .env("CARGO_TARGET_DIR", root().join("target").join("ebpf-lint"))
        .current_dir(root()))
}

/// The agent's files stay focused: none over this many lines.
const AGENT_MAX_LINES: usize = 600;

/// No file under `agent/src` is longer than [`AGENT_MAX_LINES`].
fn file_length_check() -> anyhow::Result<()> {
    let mut long = Vec::new();
    let mut pending = vec![root().join("agent").join("src")];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let lines = std::fs::read_to_string(&path)?.lines().count();
                if lines > AGENT_MAX_LINES {
                    long.push(format!("{} ({lines} lines)", path.display()));
                }
            }
        }
    }
    if !long.is_empty() {
        long.sort();
        bail!(
            "files in agent/src over {AGENT_MAX_LINES} lines (split them by concern):\n{}",
            long.join("\n")
        );
    }
    Ok(())
}

/// No module of a crate imports another that imports it back (see `import_cycles.rs`).
pub fn import_cycle_check() -> anyhow::Result<()> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml"))?;
    let members = workspace_members(&manifest);
    let roots = import_cycles::crate_roots(&root(), &members);
    let cycles = import_cycles::check(&roots)?;
    if !cycles.is_empty() {
        let reports: Vec<&str> = cycles.iter().map(|cycle| cycle.report.as_str()).collect();
        bail!(
            "import cycles between modules (move what both need into a module both import, or make one a child of the other):\n{}",
            reports.join("\n")
        );
    }
    eprintln!(
        "xtask: no import cycles between the modules of {} crate roots",
        roots.len()
    );
    Ok(())
}

/// The `members = [...]` of the workspace manifest.
fn workspace_members(manifest: &str) -> Vec<&str> {
    let Some(start) = manifest.find("members = [") else {
        return Vec::new();
    };
    let list = &manifest[start + "members = [".len()..];
    let list = &list[..list.find(']').unwrap_or(list.len())];
    list.split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty() && !m.starts_with('#'))
        .collect()
}

pub fn fmt() -> anyhow::Result<()> {
    run(Command::new("cargo")
        .args(["+nightly", "fmt", "--all"])
        .current_dir(root()))
}
