//! One running role of the demo (`stallscope-demo serve|peer|load|hog`): started, its
//! `ready` line read, commands written to its stdin and their one-line replies read from
//! its stdout (`protocol.rs`), its stderr kept in a log file. Dropping it kills it.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::lab::protocol::{self, ServiceStats, unix_now_ns};

/// How long a role may take to print `ready`, and to answer a command.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Role {
    pub name: String,
    pub pid: u32,
    /// The `key=value` pairs of its `ready` line.
    pub ready: BTreeMap<String, String>,
    /// When the `ready` line arrived.
    pub ready_unix_ns: i64,
    pub log: PathBuf,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Role {
    /// Starts `command` (stdout piped, stderr to `log`) and waits for its `ready` line.
    pub fn start(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        let stdout = child.stdout.take().context("role stdout")?;
        let (sender, lines) = channel();
        thread::Builder::new()
            .name(format!("lab-{name}"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            })?;
        let mut role = Self {
            name: name.to_owned(),
            pid: child.id(),
            ready: BTreeMap::new(),
            ready_unix_ns: 0,
            log: log.to_path_buf(),
            stdin: child.stdin.take(),
            child,
            lines,
        };
        let line = role.next_line(READY_TIMEOUT)?;
        let Some(rest) = line.strip_prefix("ready ") else {
            bail!("{name} printed `{line}` instead of `ready ...`");
        };
        role.ready = protocol::pairs(rest);
        role.ready_unix_ns = unix_now_ns();
        Ok(role)
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    fn next_line(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => return Ok(line),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!("{} exited ({status}): {}", self.name, self.stderr_tail());
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    bail!("{} did not answer within {timeout:?}", self.name);
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// A `ready` value, or an error naming what is missing.
    pub fn ready_value(&self, key: &str) -> anyhow::Result<&str> {
        self.ready
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("{}'s ready line has no {key}: {:?}", self.name, self.ready))
    }

    /// Sends a command; returns its reply line (`ok ...` or `stats ...`).
    pub fn command(&mut self, command: &protocol::Command) -> anyhow::Result<String> {
        let stdin = self.stdin.as_mut().context("role stdin closed")?;
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("sending `{command}` to {}", self.name))?;
        let reply = self.next_line(REPLY_TIMEOUT)?;
        if let Some(reason) = reply.strip_prefix("error ") {
            bail!("{} refused `{command}`: {reason}", self.name);
        }
        Ok(reply)
    }

    /// Sends a command that answers `ok VERB unix_ns=T`; returns T.
    pub fn command_at(&mut self, command: &protocol::Command) -> anyhow::Result<i64> {
        let reply = self.command(command)?;
        protocol::pairs(&reply)
            .get("unix_ns")
            .and_then(|t| t.parse().ok())
            .with_context(|| format!("{} answered `{reply}` to `{command}`", self.name))
    }

    /// The service's own measurements so far.
    pub fn stats(&mut self) -> anyhow::Result<ServiceStats> {
        let reply = self.command(&protocol::Command::Stats)?;
        let json = reply
            .strip_prefix("stats ")
            .with_context(|| format!("{} answered `{reply}` to `stats`", self.name))?;
        serde_json::from_str(json).with_context(|| format!("{}'s stats: {json}", self.name))
    }

    /// Asks the role to quit and waits for it (killed after `timeout`); returns when it
    /// acknowledged.
    pub fn quit(mut self, timeout: Duration) -> anyhow::Result<i64> {
        let at = self.command_at(&protocol::Command::Quit)?;
        drop(self.stdin.take());
        let deadline = Instant::now() + timeout;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not exit within {timeout:?} after `quit`", self.name);
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(at)
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
