//! The eBPF toolchain, installed inside the project: the nightly toolchain's `rust-src`
//! (for `-Z build-std=core`) and bpf-linker 0.13.0 linked against the nightly toolchain's
//! own LLVM shared library (Debian has no LLVM 22). Idempotent: when everything is there,
//! the check takes a few tens of milliseconds.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::util::{self, root};

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn toolchain_dir() -> PathBuf {
    root().join(".toolchain")
}

pub fn toolchain_bin() -> PathBuf {
    toolchain_dir().join("bin")
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let output = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("running rustup (is rustup installed?)")?;
    if output.status.success() {
        return Ok(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim(),
        ));
    }
    eprintln!("xtask: installing the nightly toolchain");
    util::run(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))?;
    nightly_sysroot_installed()
}

fn nightly_sysroot_installed() -> anyhow::Result<PathBuf> {
    let output = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()?;
    if !output.status.success() {
        bail!("the nightly toolchain does not run after installing it");
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

/// The nightly toolchain's LLVM shared library, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`,
/// and its major version.
fn nightly_llvm(sysroot: &Path) -> anyhow::Result<(PathBuf, u32)> {
    let lib = sysroot.join("lib");
    let entries = std::fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("libLLVM.so.") {
            let major = version
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .with_context(|| format!("cannot read the LLVM version of {name}"))?;
            return Ok((entry.path(), major));
        }
    }
    bail!(
        "no libLLVM.so.* in {}: the nightly toolchain lacks its LLVM library",
        lib.display()
    )
}

fn has_rust_src(sysroot: &Path) -> bool {
    sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file()
}

fn linker_ready(stamp: &str) -> bool {
    let linker = toolchain_bin().join("bpf-linker");
    let stamp_ok = std::fs::read_to_string(toolchain_dir().join("bpf-linker.stamp"))
        .is_ok_and(|s| s.trim() == stamp);
    stamp_ok
        && Command::new(&linker)
            .arg("--version")
            .output()
            .is_ok_and(|out| {
                out.status.success()
                    && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
            })
}

/// Makes sure the eBPF toolchain is installed; installs what is missing.
pub fn ensure() -> anyhow::Result<()> {
    let started = Instant::now();
    let sysroot = nightly_sysroot()?;
    if !has_rust_src(&sysroot) {
        eprintln!("xtask: adding rust-src to the nightly toolchain");
        util::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let (llvm_lib, major) = nightly_llvm(&sysroot)?;
    let llvm_name = llvm_lib
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stamp = format!("bpf-linker {BPF_LINKER_VERSION} against {llvm_name}");
    // The prefix bpf-linker is linked against: two names for the nightly's library. It
    // stays for good (the binary's rpath points at it).
    let prefix = toolchain_dir().join("llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link_name in ["libLLVM.so".to_owned(), llvm_name.clone()] {
        let link = prefix_lib.join(&link_name);
        if std::fs::read_link(&link).ok().as_deref() != Some(llvm_lib.as_path()) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&llvm_lib, &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    if linker_ready(&stamp) {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly LLVM {major} (about a minute)"
    );
    util::run(
        Command::new(env!("CARGO"))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
                "--root",
            ])
            .arg(toolchain_dir())
            .env("LLVM_PREFIX", &prefix)
            // Keep the install's build directory out of the project's target/.
            .env("CARGO_TARGET_DIR", toolchain_dir().join("build")),
    )?;
    std::fs::write(toolchain_dir().join("bpf-linker.stamp"), &stamp)?;
    let _ = std::fs::remove_dir_all(toolchain_dir().join("build"));
    if !linker_ready(&stamp) {
        bail!(
            "bpf-linker was installed but does not run: check {}",
            toolchain_bin().display()
        );
    }
    eprintln!("xtask: eBPF toolchain ready in {:.0?}", started.elapsed());
    Ok(())
}
