//! Fixtures the symbolization and identity tests build for themselves: the C workload
//! (`tests/fixtures/identapp.c`) compiled, stripped and given a separate debug file, and
//! cgroups shaped like Kubernetes' and systemd's, removed again on drop.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The C workload's source.
pub fn identapp_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/identapp.c")
}

fn run(command: &mut Command) -> anyhow::Result<String> {
    let output = command.output().with_context(|| {
        format!("running {command:?} (cargo xtask test installs gcc and binutils)")
    })?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Compiles the C workload to `output` with exactly `flags` (optimization, frame
/// pointers); panics if the compiler fails.
pub fn compile_identapp(output: &Path, flags: &[&str]) {
    let status = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(output)
        .arg(identapp_source())
        .status()
        .expect("cc runs (cargo xtask test installs gcc)");
    assert!(status.success(), "cc {flags:?} failed");
}

/// How to build the C workload.
#[derive(Debug, Clone, Copy)]
pub struct Build<'a> {
    /// Baked into the binary, so two versions have different build-ids.
    pub version: &'a str,
    /// Give the binary a build-id (else it is found through its debuglink's CRC only).
    pub build_id: bool,
    /// Strip it completely and move its symbols and DWARF to `<binary>.debug`, linked
    /// with `.gnu_debuglink`.
    pub split_debug: bool,
}

/// Compiles the C workload to `output` (optimized, frame pointers, DWARF).
pub fn build_identapp(output: &Path, build: Build<'_>) -> anyhow::Result<()> {
    let mut cc = Command::new("cc");
    cc.args(["-O2", "-g", "-fno-omit-frame-pointer"])
        .arg(format!("-DVERSION=\"{}\"", build.version))
        .arg(if build.build_id {
            "-Wl,--build-id=sha1"
        } else {
            "-Wl,--build-id=none"
        })
        .arg("-o")
        .arg(output)
        .arg(identapp_source());
    run(&mut cc)?;
    if build.split_debug {
        let debug = debug_file_of(output);
        run(Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(output)
            .arg(&debug))?;
        run(Command::new("strip").arg("--strip-all").arg(output))?;
        // The debuglink names the file; readers look for it next to the binary.
        run(Command::new("objcopy")
            .arg(format!("--add-gnu-debuglink={}", debug.display()))
            .arg(output))?;
    }
    Ok(())
}

pub fn debug_file_of(binary: &Path) -> PathBuf {
    let mut name = binary.file_name().unwrap_or_default().to_os_string();
    name.push(".debug");
    binary.with_file_name(name)
}

/// Section names of an ELF file (`readelf -S`).
pub fn sections(binary: &Path) -> anyhow::Result<Vec<String>> {
    let text = run(Command::new("readelf").arg("-SW").arg(binary))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let start = line.find(']')?;
            line[start + 1..]
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .collect())
}

/// The build-id of an ELF file in hex (`readelf -n`).
pub fn build_id(binary: &Path) -> anyhow::Result<String> {
    let text = run(Command::new("readelf").arg("-n").arg(binary))?;
    text.lines()
        .find_map(|line| line.trim().strip_prefix("Build ID: "))
        .map(str::to_owned)
        .with_context(|| format!("{} has no build-id", binary.display()))
}

/// The line of `source` holding `marker`, 1-based.
pub fn line_of(source: &Path, marker: &str) -> anyhow::Result<u32> {
    let text = std::fs::read_to_string(source)?;
    text.lines()
        .position(|line| line.contains(marker))
        .map(|index| index as u32 + 1)
        .with_context(|| format!("{marker} not in {}", source.display()))
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on pure-v2 hosts, often
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    mounts
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            (after.split_whitespace().next() == Some("cgroup2"))
                .then(|| before.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .context("no cgroup2 hierarchy mounted")
}

/// A cgroup tree the test created; on drop its processes go back to the root cgroup and
/// the directories are removed, deepest first, even when the test failed.
pub struct CgroupTree {
    mount: PathBuf,
    /// Directories created, outermost first.
    created: Vec<PathBuf>,
}

impl CgroupTree {
    /// Creates `relative` (e.g. `stallscope-test/kubepods.slice/...`) under the cgroup2
    /// mount; directories that existed before are left alone.
    pub fn create(relative: &str) -> anyhow::Result<Self> {
        let mount = cgroup2_mount()?;
        let mut tree = Self {
            mount: mount.clone(),
            created: Vec::new(),
        };
        let mut path = mount;
        for component in relative.split('/').filter(|c| !c.is_empty()) {
            path.push(component);
            if !path.exists() {
                std::fs::create_dir(&path)
                    .with_context(|| format!("creating cgroup {}", path.display()))?;
                tree.created.push(path.clone());
            }
        }
        Ok(tree)
    }

    /// The deepest cgroup's path as `/proc/PID/cgroup` shows it.
    pub fn path(&self) -> String {
        let leaf = self
            .created
            .last()
            .cloned()
            .unwrap_or_else(|| self.mount.clone());
        format!(
            "/{}",
            leaf.strip_prefix(&self.mount).unwrap_or(&leaf).display()
        )
    }

    /// Moves process `pid` (all its threads) into the deepest cgroup.
    pub fn enter(&self, pid: u32) -> anyhow::Result<()> {
        let leaf = self.created.last().context("no cgroup created")?;
        std::fs::write(leaf.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", leaf.display()))
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        let root_procs = self.mount.join("cgroup.procs");
        for dir in self.created.iter().rev() {
            if let Ok(pids) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in pids.lines() {
                    let _ = std::fs::write(&root_procs, pid);
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}
