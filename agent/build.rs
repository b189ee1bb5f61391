//! Builds the eBPF probes (crate `agent-ebpf`) for the BPF target with aya-build, so the
//! agent can embed them. Needs the nightly toolchain with `rust-src` and `bpf-linker`,
//! which `cargo xtask bootstrap` installs into `<workspace>/.toolchain`.
use std::{env, path::PathBuf};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("agent crate has no parent directory")?;
    let toolchain_bin = workspace.join(".toolchain").join("bin");
    println!("cargo:rerun-if-changed={}", toolchain_bin.display());

    // The probe build runs `bpf-linker` from PATH; put the project's own copy first.
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![toolchain_bin.clone()];
    dirs.extend(env::split_paths(&path));
    let joined = env::join_paths(dirs).context("PATH contains an invalid entry")?;
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("PATH", &joined) };
    let has_linker = env::split_paths(&joined).any(|dir| dir.join("bpf-linker").is_file());
    if !has_linker && env::var_os("AYA_BUILD_SKIP").is_none() {
        bail!(
            "bpf-linker not found in {} or PATH: run `cargo xtask bootstrap` first",
            toolchain_bin.display()
        );
    }

    let ebpf_dir = workspace.join("agent-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("workspace path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF probes failed (is the toolchain bootstrapped? run `cargo xtask bootstrap`)")
}
