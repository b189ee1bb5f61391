//! The offline Kubernetes manifest checks' tools: `kubernetes-validate` (from the Python package index, pinned) in a
//! virtual environment under `target/`, whose Python (with `PyYAML`, a dependency of the
//! validator) also turns the rendered YAML into JSON for the tests; and `kubectl
//! kustomize` to render the kustomize base, when kubectl is installed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The validator's pinned version (its schemas go up to Kubernetes 1.37).
pub const VALIDATE_VERSION: &str = "1.37.0";

/// The virtual environment holding the validator.
pub fn venv_dir(target_dir: &Path) -> PathBuf {
    target_dir.join("kubernetes-validate")
}

/// The validator's command, once installed.
pub fn validator(target_dir: &Path) -> PathBuf {
    venv_dir(target_dir).join("bin/kubernetes-validate")
}

/// The environment's Python (has `PyYAML`).
pub fn python(target_dir: &Path) -> PathBuf {
    venv_dir(target_dir).join("bin/python3")
}

fn installed_version(target_dir: &Path) -> Option<String> {
    let output = Command::new(validator(target_dir))
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    text.split_whitespace().last().map(str::to_owned)
}

/// Installs `kubernetes-validate` into `target/kubernetes-validate` unless that version is
/// there (needs Debian's `python3-venv`).
pub fn install_validator(target_dir: &Path) -> anyhow::Result<()> {
    if installed_version(target_dir).as_deref() == Some(VALIDATE_VERSION) {
        return Ok(());
    }
    let venv = venv_dir(target_dir);
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .context("running python3 -m venv (install Debian's python3-venv)")?;
    if !status.success() {
        bail!("python3 -m venv {} failed ({status})", venv.display());
    }
    let status = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("kubernetes-validate=={VALIDATE_VERSION}"),
        ])
        .status()
        .context("running pip of the validator's environment")?;
    if !status.success() {
        bail!("pip install kubernetes-validate=={VALIDATE_VERSION} failed ({status})");
    }
    Ok(())
}

/// Whether `kubectl` runs here.
pub fn has_kubectl() -> bool {
    Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|out| out.status.success())
}
