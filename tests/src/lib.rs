//! Harness for stallscope's end-to-end runs: finding the built binaries, starting the
//! bundled workload with its ready/go handshake, running the agent until its probes are
//! attached, and the rule for privileged tests (run as root; in CI never skip). Fixtures
//! for symbolization and identity tests live in `fixtures.rs`.

pub mod fixtures;
pub mod fuse;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub mod alertmanager;
pub mod browser;
pub mod collector;
pub mod http;
pub mod kubernetes;
pub mod lab;
pub mod netlab;
pub mod pki;
pub mod proxy;
pub mod streaming;
pub mod systemd;
pub mod wire;

/// Serialises recordings within a test binary.
static SERIAL: Mutex<()> = Mutex::new(());

/// The line the agent logs (at info level) once its probes are attached.
pub const READY_LOG: &str = "probes attached";

/// Whether this runs in CI (`CI=true`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether the process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Privileged tests call this first: true if they can run. Outside CI a non-root run
/// skips with a message; in CI it fails, because a skipped privileged test proves nothing.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        !in_ci(),
        "{test} needs root to load eBPF probes, and CI=true forbids skipping it"
    );
    eprintln!("skipping {test}: needs root to load eBPF probes (run `sudo cargo xtask test`)");
    false
}

/// The directory holding the workspace's binaries for the profile the tests were built
/// with (`target/debug` or `target/release`): the parent of the test executable's `deps/`.
pub fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// A binary of the workspace, which must have been built (`cargo xtask test` does).
pub fn binary(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the workspace binaries first (`cargo xtask test` does)",
            path.display()
        );
    }
    Ok(path)
}

/// The bundled workload, started and waiting for `go`.
pub struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<String>>>,
    pub pid: u32,
}

impl Workload {
    pub fn start(binary: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        command.args(args);
        Self::spawn(command)
    }

    /// Starts a workload speaking the `ready`/`go`/`done` protocol from any command (a
    /// wrapper such as `unshare` may run first, as long as the workload prints its pid).
    pub fn spawn(mut command: Command) -> anyhow::Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let stdout = child.stdout.take().context("workload stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().context("workload exited before `ready`")??;
        let pid = first
            .strip_prefix("ready ")
            .and_then(|pid| pid.trim().parse().ok())
            .with_context(|| format!("unexpected first line from workload: {first}"))?;
        // Keep draining stdout so the workload never blocks on a full pipe.
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stdout);
        thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(mut lines) = sink.lock() {
                    lines.push(line);
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(Self {
            child,
            stdin,
            stdout,
            pid,
        })
    }

    /// Starts the scenario.
    pub fn go(&mut self) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("workload stdin closed")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits until the scenario printed `done` (the process stays alive).
    pub fn wait_done(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .stdout
                .lock()
                .is_ok_and(|lines| lines.iter().any(|l| l == "done"))
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("workload exited ({status}) before finishing its scenario");
            }
            if Instant::now() > deadline {
                bail!("workload scenario not done within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `result key=value` lines the scenario printed.
    pub fn results(&self) -> HashMap<String, String> {
        self.stdout
            .lock()
            .map(|lines| {
                lines
                    .iter()
                    .filter_map(|line| line.strip_prefix("result "))
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits for the workload to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        wait_with_timeout(&mut self.child, timeout)
    }

    /// The lines the workload printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Lets the workload exit and waits for it.
    pub fn finish(mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        drop(self.stdin.take());
        wait_with_timeout(&mut self.child, timeout)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("process {} did not finish within {timeout:?}", child.id());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A running `stallscope-agent` whose stderr is collected line by line.
pub struct AgentRun {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The thread collecting stderr; it ends when the agent's stderr closes.
    reader: Option<thread::JoinHandle<()>>,
    /// Leave the probes it pinned for the next agent to adopt ([`AgentRun::kill`]).
    keep_pins: bool,
}

/// How an agent run ended.
#[derive(Debug)]
pub struct AgentExit {
    pub status: ExitStatus,
    pub stderr: String,
    /// What the recorded workload reported measuring itself (`result key=value`).
    pub workload: HashMap<String, String>,
}

impl AgentRun {
    /// Starts the agent with `args` (info-level logs, so readiness is visible).
    pub fn start(binary: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        command.args(args);
        Self::spawn(command)
    }

    /// Starts the agent from a prepared command (its stdio and log level are set here).
    pub fn spawn(mut command: Command) -> anyhow::Result<Self> {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut lines) = sink.lock() {
                    lines.push(line);
                }
            }
        });
        Ok(Self {
            child,
            stderr: lines,
            reader: Some(reader),
            keep_pins: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// What the agent logged so far.
    pub fn log_text(&self) -> String {
        self.stderr_text()
    }

    /// Whether the agent still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the agent logs that its probes are attached.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr_text().contains(READY_LOG) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "agent exited ({status}) before attaching: {}",
                    self.stderr_text()
                );
            }
            if Instant::now() > deadline {
                bail!("agent not ready within {timeout:?}: {}", self.stderr_text());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the agent logs a line containing `needle`; returns its log so far.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.stderr_text();
            if text.contains(needle) {
                return Ok(text);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("agent exited ({status}) before logging `{needle}`: {text}");
            }
            if Instant::now() > deadline {
                bail!("agent did not log `{needle}` within {timeout:?}: {text}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks the agent to stop (SIGINT), as Ctrl-C would.
    pub fn interrupt(&self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
    }

    /// Asks the agent to stop with SIGTERM, as a service manager would.
    pub fn terminate(&self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
    }

    /// SIGKILL: the agent dies at once, without flushing anything, and leaves its
    /// pinned probes running for the next agent with its spool to adopt. Returns where
    /// they are pinned: the caller checks that the next agent's clean stop removed them.
    #[must_use = "the killed agent's probes stay pinned and attached: check that the next agent's clean stop removed them"]
    pub fn kill(mut self) -> Option<PathBuf> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.keep_pins = true;
        self.pin_dir()
    }

    /// The bpffs directory the agent pinned its probes in, from its log.
    pub fn pin_dir(&self) -> Option<PathBuf> {
        let text = self.stderr_text();
        let rest = &text[text.find(PINNED_LOG)? + PINNED_LOG.len()..];
        let dir = rest.split(" (").next()?.trim();
        (!dir.is_empty()).then(|| PathBuf::from(dir))
    }

    /// Waits for the agent to exit.
    pub fn wait(mut self, timeout: Duration) -> anyhow::Result<AgentExit> {
        let status = wait_with_timeout(&mut self.child, timeout)?;
        // The agent exited, so its stderr is closed: the reader has the last lines once
        // it reaches the end.
        if let Some(reader) = self.reader.take() {
            reader
                .join()
                .map_err(|_| anyhow::anyhow!("the agent's stderr reader panicked"))?;
        }
        Ok(AgentExit {
            status,
            stderr: self.stderr_text(),
            workload: HashMap::new(),
        })
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // An agent that did not stop cleanly left its probes pinned and counting: remove
        // the pins (which detaches them), or they would run on under the other tests.
        if !self.keep_pins
            && let Some(dir) = self.pin_dir()
        {
            let _ = std::fs::remove_dir_all(&dir);
            // The agent's directory above the layout's, once empty (as a clean stop does).
            if let Some(agent) = dir.parent() {
                let _ = std::fs::remove_dir(agent);
            }
        }
    }
}

/// What `run` logs when it pinned its probes: `probes pinned in DIR (...)`.
const PINNED_LOG: &str = "probes pinned in ";

/// Holds the lock that serialises recordings within a test binary.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records the off-CPU time of already started `workloads` with the agent configuration
/// `config` (written to `dir`): `go` to each once the probes are attached, stops the
/// agent when every scenario is done, returns the profile.
pub fn record_started_with_config(
    dir: &Path,
    config: &str,
    workloads: &mut [&mut Workload],
) -> stallscope_profile::Profile {
    let config_path = dir.join("agent.toml");
    std::fs::write(&config_path, config).expect("config written");
    let out = dir.join("recorded.pb.gz");
    let (out_arg, config_arg) = (
        out.to_string_lossy().into_owned(),
        config_path.to_string_lossy().into_owned(),
    );
    let agent = start_agent(&[
        "record",
        "--duration",
        "10m",
        "--signals",
        "offcpu",
        "--config",
        &config_arg,
        "-o",
        &out_arg,
    ])
    .expect("agent starts");
    for workload in workloads.iter_mut() {
        workload.go().expect("go");
    }
    for workload in workloads.iter_mut() {
        workload
            .wait_done(Duration::from_secs(60))
            .expect("scenario done");
    }
    stop_agent(agent, &out).0
}

/// Polls `check` every 200 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// The number a workload reported under `key` (`result key=value`); panics if it did not.
pub fn reported<S: std::hash::BuildHasher>(results: &HashMap<String, String, S>, key: &str) -> f64 {
    results
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("workload did not report {key}: {results:?}"))
}

/// The histogram of `signal` whose labels include every pair of `pairs`; panics if none.
pub fn histogram_with<'a>(
    profile: &'a stallscope_profile::Profile,
    signal: &str,
    pairs: &[(&str, &str)],
) -> &'a stallscope_profile::Histogram {
    profile
        .histograms
        .iter()
        .find(|h| {
            h.signal == signal
                && pairs
                    .iter()
                    .all(|(k, v)| h.labels.get(*k).is_some_and(|l| l == v))
        })
        .unwrap_or_else(|| panic!("no {signal} histogram with {pairs:?}"))
}

/// The samples of process `pid`.
pub fn samples_of(
    profile: &stallscope_profile::Profile,
    pid: u32,
) -> Vec<&stallscope_profile::Sample> {
    let pid = pid.to_string();
    profile
        .samples
        .iter()
        .filter(|s| label(s, "pid") == pid)
        .collect()
}

/// The one value `key` has over all of `samples` (panics if several).
pub fn only_value<'a>(samples: &[&'a stallscope_profile::Sample], key: &str) -> &'a str {
    let mut values: Vec<&str> = samples.iter().map(|s| label(s, key)).collect();
    values.sort_unstable();
    values.dedup();
    assert_eq!(values.len(), 1, "{key}: several values {values:?}");
    values[0]
}

/// Starts `stallscope-agent record` with `args` and waits until its probes are attached.
pub fn start_agent(args: &[&str]) -> anyhow::Result<AgentRun> {
    let mut agent = AgentRun::start(&binary(&binary_dir(), "stallscope-agent")?, args)?;
    agent.wait_ready(Duration::from_secs(60))?;
    Ok(agent)
}

/// Stops an agent started by [`start_agent`] (SIGINT), checks it succeeded without a
/// panic, and decodes the pprof file it wrote at `path`.
pub fn stop_agent(agent: AgentRun, path: &Path) -> (stallscope_profile::Profile, AgentExit) {
    agent.interrupt();
    let exit = agent
        .wait(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("agent did not stop: {e:#}"));
    assert!(exit.status.success(), "agent failed: {}", exit.stderr);
    assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("{} not written: {e}", path.display()));
    let profile = stallscope_profile::pprof::decode_pprof(&bytes)
        .unwrap_or_else(|e| panic!("{} is not valid pprof: {e}", path.display()));
    (profile, exit)
}

/// Records a scenario of the bundled workload: starts it, starts `stallscope-agent record`
/// on its pid (with `agent_args`, which must include `-o FILE`), starts the scenario once
/// the probes are attached, and stops the agent (SIGINT, like Ctrl-C) when the scenario is
/// done. Returns the agent's exit.
pub fn record_workload(
    bin_dir: &Path,
    scenario: &[&str],
    agent_args: &[&str],
) -> anyhow::Result<AgentExit> {
    // One recording at a time: the tests of a binary run in parallel threads, and two
    // workloads (or agents) at once would disturb each other's measurements.
    let _serial = serial();
    let mut workload = Workload::start(&binary(bin_dir, "stallscope-workload")?, scenario)?;
    let pid = workload.pid.to_string();
    let mut args = vec!["record", "--pid", pid.as_str(), "--duration", "10m"];
    args.extend_from_slice(agent_args);
    let mut agent = AgentRun::start(&binary(bin_dir, "stallscope-agent")?, &args)?;
    agent.wait_ready(Duration::from_secs(60))?;
    workload.go()?;
    workload.wait_done(Duration::from_secs(120))?;
    agent.interrupt();
    let mut exit = agent.wait(Duration::from_secs(120))?;
    exit.workload = workload.results();
    let status = workload.finish(Duration::from_secs(10))?;
    if !status.success() {
        bail!("workload failed: {status}");
    }
    Ok(exit)
}

/// A fresh scratch directory for one test.
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stallscope-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Records `scenario` of the bundled workload into `file` (in a scratch directory named
/// after `test`) and returns the decoded profile with the agent's exit. Panics with the
/// agent's output if anything fails: for tests.
pub fn record_profile(
    test: &str,
    scenario: &[&str],
    file: &str,
    agent_args: &[&str],
) -> (stallscope_profile::Profile, AgentExit) {
    let path = scratch_dir(test).join(file);
    let path_arg = path.to_string_lossy().into_owned();
    let mut args = vec!["-o", path_arg.as_str()];
    args.extend_from_slice(agent_args);
    let exit = match record_workload(&binary_dir(), scenario, &args) {
        Ok(exit) => exit,
        Err(err) => panic!("recording {scenario:?} failed: {err:#}"),
    };
    assert!(exit.status.success(), "agent failed: {}", exit.stderr);
    assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
    let bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{} not written: {e}", path.display()));
    let profile = stallscope_profile::pprof::decode_pprof(&bytes)
        .unwrap_or_else(|e| panic!("{} is not valid pprof: {e}", path.display()));
    (profile, exit)
}

/// Records an already started workload like [`record_workload`] (agent on its pid, `go`
/// once attached, stopped when the scenario is done) into `file` in a scratch directory
/// named after `test`; returns the decoded profile. Panics on failure: for tests.
pub fn record_started(
    test: &str,
    mut workload: Workload,
    file: &str,
    agent_args: &[&str],
) -> (stallscope_profile::Profile, AgentExit) {
    // Its own directory: the test's scratch directory may hold the workload's files.
    let path = scratch_dir(&format!("{test}-out")).join(file);
    let path_arg = path.to_string_lossy().into_owned();
    let pid = workload.pid.to_string();
    let mut args = vec![
        "record",
        "--pid",
        pid.as_str(),
        "--duration",
        "10m",
        "-o",
        path_arg.as_str(),
    ];
    args.extend_from_slice(agent_args);
    let agent = start_agent(&args).unwrap_or_else(|e| panic!("agent did not start: {e:#}"));
    workload.go().expect("workload takes `go`");
    workload
        .wait_done(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("workload: {e:#}"));
    let (profile, mut exit) = stop_agent(agent, &path);
    exit.workload = workload.results();
    let status = workload
        .finish(Duration::from_secs(10))
        .expect("workload exits");
    assert!(status.success(), "workload failed: {status}");
    (profile, exit)
}

/// A sample's label, or "".
pub fn label<'a>(sample: &'a stallscope_profile::Sample, key: &str) -> &'a str {
    sample.labels.get(key).map_or("", String::as_str)
}

/// The index of sample type `kind`/`unit` (panics if the profile lacks it).
pub fn value_index(profile: &stallscope_profile::Profile, kind: &str, unit: &str) -> usize {
    profile
        .sample_type_index(kind, unit)
        .unwrap_or_else(|| panic!("profile has no {kind}/{unit}: {:?}", profile.sample_types))
}
