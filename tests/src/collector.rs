//! Harness for the collector and the CLI: start `stallscope-collector` on a free loopback
//! port (SQLite in a scratch directory, or ClickHouse), scheduled as the caller is or out of
//! latency-sensitive work's way, stop or kill it, restart it, and run `stallscope`
//! subcommands with JSON output.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::binary;

/// The log line the collector prints once it listens.
pub const LISTENING_LOG: &str = "listening on";

/// Query token the test collectors accept.
pub const TEST_TOKEN: &str = "test-token";

/// A free TCP port on 127.0.0.1 (the listener is closed again; races are unlikely).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A scratch directory under the system temp dir, fresh for this test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stallscope-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// How the collector's threads are scheduled. Set between fork and exec, so every thread
/// the collector starts inherits it (changing a running process reaches its main thread
/// only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CpuPolicy {
    /// The caller's policy and niceness.
    #[default]
    Inherited,
    /// Out of the way of latency-sensitive work, at its full CPU share: `SCHED_BATCH`
    /// (its wakeups preempt no one) with the longest EEVDF slice, 100 ms (a task with the
    /// default, shorter slice that wakes preempts it at once instead of waiting for its
    /// slice to run out). Neither nice 19 nor `SCHED_IDLE` would do: on this kernel's
    /// EEVDF a nice-19 thread still holds the CPU for its slice when something wakes
    /// (about as long as at nice 0), and both starve when the CPUs are busy (a CPU hog, a
    /// build in another session), so the collector would fall behind exactly then.
    Background,
}

/// The EEVDF slice of [`CpuPolicy::Background`], the longest the kernel accepts (6.12 and
/// later; older kernels ignore it for fair policies).
const BACKGROUND_SLICE_NS: u64 = 100_000_000;

/// A running collector.
pub struct CollectorProcess {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    policy: CpuPolicy,
    pub port: u16,
}

impl CollectorProcess {
    /// Starts the collector with `args` plus `--listen 127.0.0.1:<port>` and waits until it
    /// listens.
    pub fn start(
        bin_dir: &Path,
        port: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_with_policy(bin_dir, port, args, env, CpuPolicy::Inherited)
    }

    /// [`CollectorProcess::start`] under `policy`, which restarts keep.
    pub fn start_with_policy(
        bin_dir: &Path,
        port: u16,
        args: &[&str],
        env: &[(&str, &str)],
        policy: CpuPolicy,
    ) -> anyhow::Result<Self> {
        let binary = binary(bin_dir, "stallscope-collector")?;
        let mut all: Vec<String> = vec!["--listen".into(), format!("127.0.0.1:{port}")];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let (child, stderr) = spawn(&binary, &all, &env, policy)?;
        let mut process = Self {
            child,
            stderr,
            binary,
            args: all,
            env,
            policy,
            port,
        };
        process.wait_listening(Duration::from_secs(60))?;
        Ok(process)
    }

    /// Starts a plaintext collector on a free loopback port, storing in SQLite under
    /// `data_dir`, its queries behind [`TEST_TOKEN`].
    pub fn start_plaintext(bin_dir: &Path, data_dir: &Path) -> anyhow::Result<Self> {
        let data = data_dir.to_string_lossy();
        Self::start(
            bin_dir,
            free_port()?,
            &[
                "--plaintext",
                "--query-tokens",
                TEST_TOKEN,
                "--data-dir",
                &data,
            ],
            &[],
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn plaintext_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn tls_url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    pub fn log(&self) -> String {
        self.stderr.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    fn wait_listening(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(LISTENING_LOG) {
                // The log line comes once the socket is bound; connect to be sure.
                for _ in 0..100 {
                    if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                        return Ok(());
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "collector exited ({status}) before listening: {}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!("collector not listening within {timeout:?}: {}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash or a power cut of the collector.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the collector to stop with SIGTERM, as a service manager would.
    pub fn terminate(&self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
    }

    /// Waits for the process to exit by itself (fault injection), up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("collector still running after {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts it again with the same arguments, with `env` instead of the original
    /// environment additions.
    pub fn restart(&mut self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.kill();
        self.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let (child, stderr) = spawn(&self.binary, &self.args, &self.env, self.policy)?;
        self.child = child;
        self.stderr = stderr;
        self.wait_listening(Duration::from_secs(60))
    }

    /// Peak resident memory of the collector, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for CollectorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(
    binary: &Path,
    args: &[String],
    env: &[(String, String)],
    policy: CpuPolicy,
) -> anyhow::Result<(Child, Arc<Mutex<Vec<String>>>)> {
    let mut command = Command::new(binary);
    command
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    if policy == CpuPolicy::Background {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: the closure runs in the child between fork and exec and only makes one
        // system call on itself (sched_setattr) with a pointer to a local; that is
        // async-signal-safe, allocates nothing and takes no lock.
        unsafe {
            command.pre_exec(|| {
                let attr = libc::sched_attr {
                    size: size_of::<libc::sched_attr>() as u32,
                    sched_policy: libc::SCHED_BATCH as u32,
                    sched_flags: 0,
                    sched_nice: 0,
                    sched_priority: 0,
                    sched_runtime: BACKGROUND_SLICE_NS,
                    sched_deadline: 0,
                    sched_period: 0,
                };
                if libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stderr = child.stderr.take().context("collector stderr")?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut lines) = sink.lock() {
                lines.push(line);
            }
        }
    });
    Ok((child, lines))
}

/// Runs `stallscope-collector <args>` that is expected to exit by itself (bad input, a
/// refused start), killing it after `timeout`; returns its exit and output.
pub fn run_collector(bin_dir: &Path, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
    let binary = binary(bin_dir, "stallscope-collector")?;
    let mut child = Command::new(&binary)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output()?;
            bail!(
                "stallscope-collector {} still running after {timeout:?}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

/// Runs `stallscope <args>` against `collector_url` with the test token.
pub fn cli(bin_dir: &Path, collector_url: &str, args: &[&str]) -> anyhow::Result<Output> {
    let binary = binary(bin_dir, "stallscope")?;
    Command::new(&binary)
        .args(args)
        .env("STALLSCOPE_COLLECTOR", collector_url)
        .env("STALLSCOPE_TOKEN", TEST_TOKEN)
        .env_remove("STALLSCOPE_CONFIG")
        .output()
        .with_context(|| format!("running {}", binary.display()))
}

/// Runs a `stallscope` subcommand with `--json` and parses its output.
pub fn cli_json(
    bin_dir: &Path,
    collector_url: &str,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut all = args.to_vec();
    all.push("--json");
    let output = cli(bin_dir, collector_url, &all)?;
    if !output.status.success() {
        bail!(
            "stallscope {} failed: {}",
            all.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("stallscope {} printed no JSON", all.join(" ")))
}

/// The ClickHouse URL for tests (`cargo xtask test` starts one on 127.0.0.1:18123).
pub fn clickhouse_url() -> String {
    std::env::var("STALLSCOPE_CLICKHOUSE_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:18123".to_owned())
}

/// Whether ClickHouse answers; in CI a missing ClickHouse is a failure, not a skip.
pub fn require_clickhouse(test: &str) -> bool {
    let url = clickhouse_url();
    let address = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let reachable = address
        .parse::<std::net::SocketAddr>()
        .ok()
        .is_some_and(|addr| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
        });
    if reachable {
        return true;
    }
    assert!(
        !crate::in_ci(),
        "{test} needs ClickHouse at {url}, and CI=true forbids skipping it"
    );
    eprintln!("skipping {test}: no ClickHouse at {url} (run `cargo xtask clickhouse start`)");
    false
}
