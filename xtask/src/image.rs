//! `cargo xtask image [--debug] [--check]`: one container image holding the agent, the
//! collector and the CLI, built with Debian's buildah from local files only: the binaries
//! (release, or debug with `--debug`), the shared libraries `ldd` says they load, a
//! minimal `/etc`, and `deploy/container/Containerfile` (`FROM scratch`). `--check` runs
//! the agent from the image with podman the way the `DaemonSet` does (host PID and network
//! namespaces, only the `DaemonSet`'s capabilities, unconfined seccomp, read-only root)
//! against a workload outside the container, and checks that the profile it writes has
//! that host process's stacks, symbolized.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use stallscope_tests::{AgentRun, Workload};

use crate::{bootstrap, debian, util};

/// The image's name and tag (the workspace's version).
pub fn image_name() -> String {
    format!("localhost/stallscope:{}", env!("CARGO_PKG_VERSION"))
}

/// The binaries in the image.
const BINARIES: [&str; 3] = ["stallscope-agent", "stallscope-collector", "stallscope"];

/// The capabilities the `DaemonSet` grants (deploy/kubernetes/agent-daemonset.yaml).
const AGENT_CAPABILITIES: [&str; 8] = [
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_NET_ADMIN",
    "CAP_SETPCAP",
    "CAP_SYS_PTRACE",
    "CAP_DAC_READ_SEARCH",
    "CAP_CHECKPOINT_RESTORE",
    "CAP_SYSLOG",
];

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let debug = args.iter().any(|a| a == "--debug");
    let check = args.iter().any(|a| a == "--check");
    if let Some(other) = args
        .iter()
        .find(|a| !matches!(a.as_str(), "--debug" | "--check"))
    {
        bail!("unknown option `{other}`: use --debug (debug binaries) and/or --check");
    }
    if !util::is_root() {
        bail!(
            "building and running the image needs root (buildah, podman): run `sudo -E cargo xtask image`"
        );
    }
    // runc, not Debian's default crun: crun refuses hosts with hybrid cgroups ("cgroups in
    // hybrid mode not supported"), this project's test machines among them.
    debian::ensure(&["buildah", "podman", "runc"])?;
    bootstrap::ensure()?;
    let profile = if debug { "debug" } else { "release" };
    let mut build = vec![
        "build",
        "--bins",
        "-p",
        "stallscope-agent",
        "-p",
        "stallscope-collector",
        "-p",
        "stallscope-cli",
    ];
    if check {
        build.extend(["-p", "stallscope-tests"]);
    }
    if !debug {
        build.push("--release");
    }
    util::cargo(&build)?;
    let bin_dir = util::root().join("target").join(profile);
    let context = util::root().join("target/image");
    assemble_rootfs(&bin_dir, &context.join("rootfs"))?;
    util::run(
        Command::new("buildah")
            .args(["build", "--layers=false", "--file"])
            .arg(util::root().join("deploy/container/Containerfile"))
            .args(["--tag", &image_name()])
            .arg(&context),
    )?;
    eprintln!("xtask: built {} ({profile} binaries)", image_name());
    if check {
        check_image(&bin_dir)?;
    }
    Ok(())
}

/// Fills `rootfs` with the binaries of `bin_dir`, the libraries they load and a minimal
/// `/etc` and `/tmp`.
fn assemble_rootfs(bin_dir: &Path, rootfs: &Path) -> anyhow::Result<()> {
    if rootfs.exists() {
        std::fs::remove_dir_all(rootfs)
            .with_context(|| format!("clearing {}", rootfs.display()))?;
    }
    let bin = rootfs.join("usr/local/bin");
    std::fs::create_dir_all(&bin)?;
    let mut libraries: Vec<PathBuf> = Vec::new();
    for name in BINARIES {
        let source = bin_dir.join(name);
        std::fs::copy(&source, bin.join(name))
            .with_context(|| format!("copying {} (built?)", source.display()))?;
        libraries.extend(shared_libraries(&source)?);
    }
    libraries.sort();
    libraries.dedup();
    for library in &libraries {
        let target = rootfs.join(library.strip_prefix("/").unwrap_or(library));
        std::fs::create_dir_all(target.parent().context("library path")?)?;
        // The file itself, under the name the binaries ask for (symlinks followed).
        std::fs::copy(library, &target)
            .with_context(|| format!("copying {}", library.display()))?;
    }
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/:/nonexistent\nstallscope:x:65532:65532:stallscope:/:/nonexistent\n",
    )?;
    std::fs::write(etc.join("group"), "root:x:0:\nstallscope:x:65532:\n")?;
    for dir in [
        "tmp",
        "var/lib/stallscope",
        "var/lib/stallscope-agent",
        "sys",
        "proc",
        "dev",
    ] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    util::run(Command::new("chmod").arg("1777").arg(rootfs.join("tmp")))?;
    eprintln!(
        "xtask: image root: {} binaries, {} libraries ({})",
        BINARIES.len(),
        libraries.len(),
        libraries
            .iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// The shared libraries `binary` loads (the dynamic loader included), as `ldd` lists them.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (Debian's libc-bin)")?;
    if !output.status.success() {
        // A static binary: `not a dynamic executable`.
        return Ok(Vec::new());
    }
    let mut libraries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("{}: {line}", binary.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim().split(' ').next().unwrap_or(""),
            None => line.split(' ').next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// `--ulimit` flags keeping this process's own limits: podman's defaults raise the open
/// files limit (and the runtime applies them) beyond what a process without
/// `CAP_SYS_RESOURCE`, such as this project's sandboxed test machines, may set.
fn inherited_limits() -> Vec<String> {
    let soft = |resource| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the struct we own.
        let ok = unsafe { libc::getrlimit(resource, &raw mut limit) } == 0;
        ok.then_some(limit.rlim_cur)
    };
    let mut flags = Vec::new();
    if let Some(files) = soft(libc::RLIMIT_NOFILE) {
        flags.push(format!("--ulimit=nofile={files}:{files}"));
    }
    if let Some(processes) = soft(libc::RLIMIT_NPROC) {
        let processes = processes.min(4096);
        flags.push(format!("--ulimit=nproc={processes}:{processes}"));
    }
    flags
}

/// Runs the agent from the image as the `DaemonSet` would, against a workload on the host,
/// and checks its profile has the workload's own functions.
fn check_image(bin_dir: &Path) -> anyhow::Result<()> {
    let out_dir = util::root().join("target/image/check");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir)?;
    let mut workload = Workload::start(&bin_dir.join("stallscope-workload"), &["markers", "3000"])?;
    let pid = workload.pid.to_string();
    let mut podman = Command::new("podman");
    podman
        .args([
            "--runtime",
            "runc",
            "run",
            "--rm",
            "--pid=host",
            "--network=host",
            "--read-only",
            "--cap-drop=all",
        ])
        .arg(format!("--cap-add={}", AGENT_CAPABILITIES.join(",")))
        .args([
            "--security-opt",
            "seccomp=unconfined",
            "--env",
            "RUST_LOG=info",
        ])
        .args(inherited_limits())
        .args(["--volume", "/sys/kernel/tracing:/sys/kernel/tracing:ro"])
        .args(["--volume", "/sys/kernel/debug:/sys/kernel/debug:ro"])
        .arg("--volume")
        .arg(format!("{}:/out", out_dir.display()))
        .arg(image_name())
        .args([
            "/usr/local/bin/stallscope-agent",
            "record",
            "--pid",
            &pid,
            "--duration",
            "2m",
            "--signals",
            "offcpu,oncpu",
            "-o",
            "/out/profile.folded",
        ]);
    eprintln!("xtask: {podman:?}");
    let mut agent = AgentRun::spawn(podman)?;
    agent.wait_ready(Duration::from_secs(120))?;
    workload.go()?;
    workload.wait_done(Duration::from_secs(60))?;
    agent.interrupt();
    let exit = agent.wait(Duration::from_secs(120))?;
    if !exit.status.success() {
        bail!(
            "the agent in the container failed ({}): {}",
            exit.status,
            exit.stderr
        );
    }
    let _ = workload.finish(Duration::from_secs(10));
    let folded = std::fs::read_to_string(out_dir.join("profile.folded"))
        .context("the agent in the container wrote no profile")?;
    for function in ["offcpu_marker_sleep", "oncpu_marker_spin"] {
        let stacks = folded
            .lines()
            .filter(|line| line.contains(function))
            .count();
        if stacks == 0 {
            bail!(
                "no stack of the host workload's `{function}` in the container's profile: {}",
                folded.lines().take(20).collect::<Vec<_>>().join("\n")
            );
        }
        eprintln!("xtask: image check: {stacks} stacks through `{function}` of host pid {pid}");
    }
    eprintln!(
        "xtask: image check passed: the agent in {} profiled and symbolized a host process",
        image_name()
    );
    Ok(())
}
