//! Helpers shared by the tasks: paths, running commands, lint and fmt.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The workspace root (the parent of this crate).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Runs `command`, failing with its status if it fails.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Runs `cargo <args>` in the workspace root.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(env!("CARGO")).args(args).current_dir(root()))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether this runs in CI (`CI=true`), where privileged tests must not skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

pub fn lint() -> anyhow::Result<()> {
    crate::bootstrap::ensure()?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    let toolchain = crate::bootstrap::toolchain_bin();
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

pub fn fmt() -> anyhow::Result<()> {
    run(Command::new("cargo")
        .args(["+nightly", "fmt", "--all"])
        .current_dir(root()))
}
