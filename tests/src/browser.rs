//! Real-browser tests: Debian's Chromium driven by `playwright-core` (npm, pinned, no
//! browser download: it drives the system Chromium). `cargo xtask test` installs both
//! (`chromium` with apt, `playwright-core` into `target/browser/` with npm); the tests run
//! `tests/browser/*.mjs` with Node and read the one JSON line the script prints.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

/// The pinned driver: the newest release that still runs on Debian 12's Node.js 18.
pub const PLAYWRIGHT_VERSION: &str = "1.61.1";

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Where the driver is installed: `target/browser/` of the workspace.
pub fn driver_dir(target_dir: &Path) -> PathBuf {
    target_dir.join("browser")
}

/// The installed driver's version, if any.
fn installed_version(dir: &Path) -> Option<String> {
    let package = dir.join("node_modules/playwright-core/package.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(package).ok()?).ok()?;
    json["version"].as_str().map(str::to_owned)
}

/// Installs the pinned `playwright-core` into `driver_dir(target_dir)` unless it is there
/// (npm, no install scripts: nothing but the package itself is fetched).
pub fn install_driver(target_dir: &Path) -> anyhow::Result<()> {
    let dir = driver_dir(target_dir);
    if installed_version(&dir).as_deref() == Some(PLAYWRIGHT_VERSION) {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let status = Command::new("npm")
        .args(["install", "--prefix"])
        .arg(&dir)
        .args([
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
            "--save-exact",
            &format!("playwright-core@{PLAYWRIGHT_VERSION}"),
        ])
        .status()
        .context("running npm (install Debian's nodejs and npm)")?;
    if !status.success() {
        bail!("npm install playwright-core@{PLAYWRIGHT_VERSION} failed ({status})");
    }
    Ok(())
}

/// What a browser test needs, found: Node, Chromium and the driver.
#[derive(Debug, Clone)]
pub struct Browser {
    node_modules: PathBuf,
}

impl Browser {
    /// Finds Node, Chromium and the pinned driver under `target_dir`, or says what is
    /// missing and how to get it.
    pub fn find(target_dir: &Path) -> Result<Self, String> {
        let dir = driver_dir(target_dir);
        if !Path::new(CHROMIUM).is_file() {
            return Err(format!(
                "{CHROMIUM} is missing (`apt-get install chromium`, or run `cargo xtask test`)"
            ));
        }
        if Command::new("node").arg("--version").output().is_err() {
            return Err(
                "node is missing (`apt-get install nodejs npm`, or run `cargo xtask test`)"
                    .to_owned(),
            );
        }
        if installed_version(&dir).as_deref() != Some(PLAYWRIGHT_VERSION) {
            return Err(format!(
                "playwright-core {PLAYWRIGHT_VERSION} is not installed in {} (`cargo xtask test` installs it)",
                dir.display()
            ));
        }
        Ok(Self {
            node_modules: dir.join("node_modules"),
        })
    }

    /// Runs `script` with `config` (plus `node_modules`) as its argument, within
    /// `timeout`; returns what it printed as JSON and whether it exited successfully.
    pub fn run(
        &self,
        script: &Path,
        mut config: serde_json::Value,
        timeout: Duration,
    ) -> anyhow::Result<(serde_json::Value, bool)> {
        config["node_modules"] = serde_json::Value::from(self.node_modules.to_string_lossy());
        let mut child = Command::new("node")
            .arg(script)
            .arg(config.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("running node {}", script.display()))?;
        // Read both pipes while the script runs, so a chatty one cannot block it.
        let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_string(&mut text);
                }
                text
            })
        };
        let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not finish within {timeout:?}", script.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        let line = stdout.lines().last().unwrap_or_default();
        let result: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} printed no JSON: {stdout}\n{stderr}", script.display()))?;
        Ok((result, status.success()))
    }
}
