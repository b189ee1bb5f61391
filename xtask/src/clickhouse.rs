//! A private ClickHouse server for tests and benchmarks: Debian's `clickhouse-server`
//! (18.16 on Debian 12), started with a minimal configuration of our own that listens on
//! 127.0.0.1 only and keeps its data under `target/clickhouse/`, never touching the
//! system service's configuration. Idempotent: a server already answering on the port is
//! reused (and then left running).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{debian, util};

/// HTTP port of the test server (the tests' default `STALLSCOPE_CLICKHOUSE_URL`).
pub const HTTP_PORT: u16 = 18123;
const TCP_PORT: u16 = 19000;

pub fn url() -> String {
    format!("http://127.0.0.1:{HTTP_PORT}")
}

fn home() -> PathBuf {
    util::root().join("target").join("clickhouse")
}

fn config(home: &Path) -> String {
    let dir = home.display();
    format!(
        r#"<?xml version="1.0"?>
<!-- Written by `cargo xtask`: a private test server, loopback only. -->
<yandex>
  <logger>
    <level>warning</level>
    <log>{dir}/server.log</log>
    <errorlog>{dir}/error.log</errorlog>
    <size>10M</size>
    <count>1</count>
  </logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>{HTTP_PORT}</http_port>
  <tcp_port>{TCP_PORT}</tcp_port>
  <path>{dir}/data/</path>
  <tmp_path>{dir}/tmp/</tmp_path>
  <user_files_path>{dir}/user_files/</user_files_path>
  <format_schema_path>{dir}/format_schemas/</format_schema_path>
  <users_config>{dir}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>64</max_concurrent_queries>
</yandex>
"#
    )
}

const USERS: &str = r#"<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users>
    <default>
      <password></password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <quotas><default></default></quotas>
</yandex>
"#;

/// Whether a ClickHouse server answers `/ping` on the test port.
pub fn answering() -> bool {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], HTTP_PORT).into(), Duration::from_secs(1))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("Ok.")
}

/// A server this process started; stopped when dropped.
pub struct Server {
    child: Option<Child>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // SAFETY: plain kill(2) on our own child; SIGTERM lets it shut down cleanly.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(home().join("server.pid"));
        }
    }
}

/// Installs ClickHouse if needed and makes sure a test server answers on 127.0.0.1.
pub fn ensure_running() -> anyhow::Result<Server> {
    if answering() {
        eprintln!(
            "xtask: using the ClickHouse server already answering at {}",
            url()
        );
        return Ok(Server { child: None });
    }
    debian::ensure(&["clickhouse-server"])?;
    let home = home();
    for sub in ["data", "tmp", "user_files", "format_schemas"] {
        std::fs::create_dir_all(home.join(sub))
            .with_context(|| format!("creating {}", home.display()))?;
    }
    std::fs::write(home.join("config.xml"), config(&home))?;
    std::fs::write(home.join("users.xml"), USERS)?;
    let binary = ["/usr/bin/clickhouse-server", "/usr/sbin/clickhouse-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("clickhouse-server is not installed (apt-get install clickhouse-server)")?;
    eprintln!(
        "xtask: starting ClickHouse at {} (data in {})",
        url(),
        home.display()
    );
    let log = std::fs::File::create(home.join("stdout.log"))?;
    let child = Command::new(binary)
        .arg(format!(
            "--config-file={}",
            home.join("config.xml").display()
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {binary}"))?;
    std::fs::write(home.join("server.pid"), child.id().to_string())?;
    let mut server = Server { child: Some(child) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !answering() {
        if let Some(child) = &mut server.child
            && let Some(status) = child.try_wait()?
        {
            server.child = None;
            let errors = std::fs::read_to_string(home.join("error.log")).unwrap_or_default();
            bail!(
                "clickhouse-server exited ({status}) at start-up: {}",
                errors.lines().last().unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "ClickHouse did not answer at {} within 60 s; see {}",
                url(),
                home.join("error.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(server)
}

/// `cargo xtask clickhouse start|stop`: a server for running tests by hand.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("start") => {
            let mut server = ensure_running()?;
            // Leave it running for the developer; `stop` ends it by its pid file.
            if let Some(child) = server.child.take() {
                eprintln!(
                    "xtask: ClickHouse runs as pid {}; `cargo xtask clickhouse stop` ends it",
                    child.id()
                );
            }
            Ok(())
        }
        Some("stop") => {
            let pid_file = home().join("server.pid");
            let Ok(pid) = std::fs::read_to_string(&pid_file) else {
                eprintln!(
                    "xtask: no ClickHouse started by xtask is recorded ({})",
                    pid_file.display()
                );
                return Ok(());
            };
            let pid: libc::pid_t = pid.trim().parse().context("pid file")?;
            // SAFETY: kill(2) on the pid xtask recorded when it started the server.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let _ = std::fs::remove_file(pid_file);
            eprintln!("xtask: stopped ClickHouse (pid {pid})");
            Ok(())
        }
        _ => bail!("usage: cargo xtask clickhouse start|stop"),
    }
}
