//! `cargo xtask lint` and `cargo xtask fmt`: rustfmt and clippy over the host crates and
//! the eBPF crate.

use std::process::Command;

use crate::{
    bootstrap,
    util::{cargo, root, run},
};

pub fn lint() -> anyhow::Result<()> {
    bootstrap::ensure()?;
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

pub fn fmt() -> anyhow::Result<()> {
    run(Command::new("cargo")
        .args(["+nightly", "fmt", "--all"])
        .current_dir(root()))
}
