//! The CLI as a new user meets it, against a real collector fed with batches of known
//! content (no root needed): `targets` lists services by wait time, `top` rows tell waits
//! apart, `diff` and `series` give rates per second of covered time, a query that matches
//! nothing fails, bad names and durations are refused in one line, every flag is
//! described, and a silent collector fails within the deadline.

use std::{
    net::TcpListener,
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use stallscope_proto::v1;
use stallscope_tests::{
    binary, binary_dir,
    collector::{CollectorProcess, TEST_TOKEN, cli, cli_json, free_port, scratch},
    wire::{connect_plain, frame, send},
};

const NS: i64 = 1_000_000_000;
/// Batches cover the last ten minutes before the test starts, 10 s each.
const BATCHES: i64 = 60;
/// Off-CPU time per batch of each `checkout` process: 0.8 s per 10 s.
const CHECKOUT_WAIT_NS: i64 = 800_000_000;
const LONG_NAME: &str = "a-service-with-a-name-much-longer-than-any-column-would-allow-0123456789";

fn now_ns() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos(),
    )
    .expect("fits")
}

/// Builds one batch's tables.
#[derive(Default)]
struct BatchBuilder {
    strings: Vec<String>,
    frames: Vec<v1::Frame>,
    stacks: Vec<v1::Stack>,
    samples: Vec<v1::Sample>,
}

impl BatchBuilder {
    fn intern(&mut self, text: &str) -> u32 {
        if self.strings.is_empty() {
            self.strings.push(String::new());
        }
        if let Some(index) = self.strings.iter().position(|s| s == text) {
            return index as u32;
        }
        self.strings.push(text.to_owned());
        (self.strings.len() - 1) as u32
    }

    /// A stack from frames innermost first: `[k]` marks kernel frames, `@lib` frames in
    /// libc, the rest in the program's binary.
    fn stack(&mut self, frames: &[&str], binary: &str) -> u32 {
        let mut ids = Vec::new();
        for name in frames {
            let (function, kind, module) = if let Some(kernel) = name.strip_suffix("[k]") {
                (kernel, v1::FrameKind::Kernel, "")
            } else if let Some(lib) = name.strip_suffix("@lib") {
                (
                    lib,
                    v1::FrameKind::User,
                    "/usr/lib/x86_64-linux-gnu/libc.so.6",
                )
            } else {
                (*name, v1::FrameKind::User, binary)
            };
            self.frames.push(v1::Frame {
                function: function.to_owned(),
                module: module.to_owned(),
                file: String::new(),
                line: 0,
                address: 16 * self.frames.len() as u64,
                kind: kind as i32,
            });
            ids.push((self.frames.len() - 1) as u32);
        }
        self.stacks.push(v1::Stack { frames: ids });
        (self.stacks.len() - 1) as u32
    }

    fn sample(&mut self, stack: u32, signal: u32, labels: &[(&str, &str)], value: i64) {
        let labels = labels
            .iter()
            .flat_map(|(k, v)| [self.intern(k), self.intern(v)])
            .collect();
        self.samples.push(v1::Sample {
            stack,
            signal,
            labels,
            value,
            count: 1,
        });
    }

    fn finish(self, sequence: u64, start_unix_ns: i64) -> v1::Batch {
        let signal = |name: &str, kind: &str| v1::SignalType {
            name: name.to_owned(),
            value_kind: kind.to_owned(),
            value_unit: "nanoseconds".to_owned(),
            count_kind: format!("{kind}_events"),
            count_unit: "count".to_owned(),
        };
        v1::Batch {
            agent_id: "cli-test".to_owned(),
            host: "host-a".to_owned(),
            sequence,
            start_unix_ns,
            duration_ns: 10 * NS,
            signals: vec![signal("off-cpu", "off_cpu"), signal("on-cpu", "on_cpu")],
            frames: self.frames,
            stacks: self.stacks,
            strings: self.strings,
            samples: self.samples,
            losses: Vec::new(),
            notes: Vec::new(),
            spool_dropped_total: 0,
            ..v1::Batch::default()
        }
    }
}

/// Ten seconds of three services: `checkout` (two processes, lock waits below its own
/// code), a service with a very long name, and twenty short-lived `sleep` processes.
fn batch(sequence: u64, start_unix_ns: i64) -> v1::Batch {
    let mut b = BatchBuilder::default();
    let lock = b.stack(
        &[
            "__schedule[k]",
            "futex_wait[k]",
            "do_syscall_64[k]",
            "entry_SYSCALL_64_after_hwframe[k]",
            "syscall@lib",
            "std::sys::sync::mutex::futex::Mutex::lock_contended",
            "checkout::cart::reserve",
            "checkout::handle_request",
            "std::sys::thread::unix::Thread::new::thread_start",
            "start_thread@lib",
            "clone3@lib",
        ],
        "/usr/bin/checkout",
    );
    let read = b.stack(
        &[
            "__schedule[k]",
            "ksys_read[k]",
            "do_syscall_64[k]",
            "read@lib",
            "checkout::db::query",
            "checkout::handle_request",
            "std::sys::thread::unix::Thread::new::thread_start",
            "start_thread@lib",
        ],
        "/usr/bin/checkout",
    );
    for pid in ["2001", "2002"] {
        let labels = [
            ("process", "checkout"),
            ("pid", pid),
            ("service", "checkout"),
            ("cause", "lock"),
        ];
        b.sample(lock, 0, &labels, CHECKOUT_WAIT_NS / 2);
        let labels = [
            ("process", "checkout"),
            ("pid", pid),
            ("service", "checkout"),
            ("cause", "disk"),
        ];
        b.sample(read, 0, &labels, CHECKOUT_WAIT_NS / 2);
        b.sample(
            read,
            1,
            &[
                ("process", "checkout"),
                ("pid", pid),
                ("service", "checkout"),
            ],
            1_000_000,
        );
    }
    let long = b.stack(&["__schedule[k]", "long_main"], "/usr/bin/long");
    b.sample(
        long,
        0,
        &[
            ("process", "long"),
            ("pid", "3001"),
            ("service", LONG_NAME),
            ("cause", "other"),
        ],
        300_000_000,
    );
    let sleep = b.stack(
        &[
            "__schedule[k]",
            "do_nanosleep[k]",
            "clock_nanosleep@lib",
            "main",
        ],
        "/usr/bin/sleep",
    );
    for pid in 0..20 {
        let pid = (4000 + pid).to_string();
        b.sample(
            sleep,
            0,
            &[
                ("process", "sleep"),
                ("pid", &pid),
                ("service", "sleep"),
                ("cause", "other"),
            ],
            1_000_000,
        );
    }
    b.finish(sequence, start_unix_ns)
}

/// A collector holding [`BATCHES`] batches that end at the start of the current 10 s.
fn collector_with_data(name: &str) -> (CollectorProcess, i64) {
    let dir = scratch(name);
    let data = dir.join("data").to_string_lossy().into_owned();
    let collector = CollectorProcess::start(
        &binary_dir(),
        free_port().expect("port"),
        &[
            "--plaintext",
            "--query-tokens",
            TEST_TOKEN,
            "--data-dir",
            &data,
        ],
        &[],
    )
    .expect("collector starts");
    let end = now_ns() / (10 * NS) * (10 * NS);
    let frames: Vec<v1::IngestFrame> = (0..BATCHES)
        .map(|i| frame(&batch(i as u64, end - (BATCHES - i) * 10 * NS)))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let acks = runtime
        .block_on(async {
            let mut client = connect_plain(collector.port).await.expect("connects");
            send(&mut client, Some("cli-test"), frames).await
        })
        .expect("batches stored");
    assert_eq!(acks.len(), BATCHES as usize);
    (collector, end)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs the CLI expecting failure: returns its one-line error.
fn fails(url: &str, args: &[&str]) -> String {
    let output = cli(&binary_dir(), url, args).expect("cli runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "stallscope {} succeeded: {}{stderr}",
        args.join(" "),
        stdout(&output)
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line for {args:?}: {stderr}");
    lines[0].to_owned()
}

#[test]
fn targets_lists_services_by_wait_time_with_pids_on_request() {
    let (collector, _) = collector_with_data("cli-targets");
    let url = collector.plaintext_url();
    let rows = cli_json(&binary_dir(), &url, &["targets", "--since", "15m"]).expect("targets");
    let rows = rows.as_array().expect("array");
    let services: Vec<&str> = rows.iter().filter_map(|r| r["service"].as_str()).collect();
    assert_eq!(services, ["checkout", LONG_NAME, "sleep"], "{rows:?}");
    assert_eq!(
        rows[0]["wait_ns"].as_i64(),
        Some(BATCHES * CHECKOUT_WAIT_NS * 2),
        "two checkout processes"
    );
    assert_eq!(rows[2]["pids"].as_u64(), Some(20), "{rows:?}");
    let pids = cli_json(
        &binary_dir(),
        &url,
        &["targets", "--since", "15m", "--pids"],
    )
    .expect("pids");
    assert_eq!(pids.as_array().expect("array").len(), 2 + 1 + 20);

    let text = stdout(&cli(&binary_dir(), &url, &["targets", "--since", "15m"]).expect("runs"));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        1 + 3 + 1,
        "header, three services, legend:\n{text}"
    );
    // Columns stay aligned whatever the names: WAIT ends at one position in every row.
    let header: Vec<char> = lines[0].chars().collect();
    let wait_end = header
        .windows(4)
        .position(|w| w.iter().collect::<String>() == "WAIT")
        .expect("WAIT column")
        + 4;
    for line in &lines[1..4] {
        let chars: Vec<char> = line.chars().collect();
        assert!(
            chars.get(wait_end - 1) == Some(&'s') && chars.get(wait_end) == Some(&' '),
            "misaligned row:\n{text}"
        );
    }
    assert!(text.contains("a-service-with-a…"), "{text}");
}

#[test]
fn top_rows_show_process_cause_and_own_code_without_entry_frames() {
    let (collector, _) = collector_with_data("cli-top");
    let url = collector.plaintext_url();
    let top = cli_json(
        &binary_dir(),
        &url,
        &["top", "--since", "15m", "--service", "checkout"],
    )
    .expect("top");
    let functions: Vec<&str> = top["functions"]
        .as_array()
        .expect("functions")
        .iter()
        .filter_map(|f| f["function"].as_str())
        .collect();
    assert_eq!(functions[0], "checkout::handle_request", "{functions:?}");
    for plumbing in [
        "do_syscall_64_[k]",
        "__schedule_[k]",
        "start_thread",
        "clone3",
    ] {
        assert!(
            !functions.contains(&plumbing),
            "{plumbing} in {functions:?}"
        );
    }
    let rows = top["stacks"].as_array().expect("stacks");
    let lock = rows
        .iter()
        .find(|r| r["cause"] == "lock")
        .unwrap_or_else(|| panic!("no lock row: {rows:?}"));
    assert_eq!(lock["process"], "checkout");
    assert_eq!(
        lock["frames"],
        serde_json::json!(["checkout::cart::reserve", "checkout::handle_request"])
    );
    assert_eq!(
        lock["calling"],
        "std::sys::sync::mutex::futex::Mutex::lock_contended"
    );
    let text = stdout(
        &cli(
            &binary_dir(),
            &url,
            &["top", "--since", "15m", "--service", "checkout"],
        )
        .expect("runs"),
    );
    let row = text
        .lines()
        .find(|l| l.contains("off-cpu/lock"))
        .unwrap_or_else(|| panic!("no lock row:\n{text}"));
    assert!(
        row.contains("checkout")
            && row.contains("checkout::cart::reserve <- checkout::handle_request")
            && row.contains("[in std::sys::sync::mutex::futex::Mutex::lock_contended]"),
        "{text}"
    );
}

#[test]
fn diff_and_series_give_rates_per_second_of_covered_time() {
    let (collector, _) = collector_with_data("cli-rates");
    let url = collector.plaintext_url();
    // The before range is half without data; the workload is steady, so nothing changed.
    let diff = cli(
        &binary_dir(),
        &url,
        &[
            "diff",
            "--before",
            "15m..5m",
            "--after",
            "5m..now",
            "--service",
            "checkout",
            "--json",
        ],
    )
    .expect("diff");
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stderr)
    );
    let warning = String::from_utf8_lossy(&diff.stderr);
    assert!(warning.contains("has data for"), "{warning}");
    let changes: serde_json::Value = serde_json::from_slice(&diff.stdout).expect("JSON");
    let before_s = changes["before_covered_s"].as_f64().expect("covered");
    assert!((before_s - 300.0).abs() <= 20.0, "{changes}");
    for change in changes["changes"].as_array().expect("changes") {
        let relative = change["delta_ns_per_s"].as_f64().unwrap_or(0.0).abs()
            / change["before_ns_per_s"].as_f64().unwrap_or(1.0).max(1.0);
        assert!(relative < 0.1, "a steady workload changed: {change}");
    }
    // A side without data is said to have none.
    let empty = cli(
        &binary_dir(),
        &url,
        &[
            "diff",
            "--before",
            "2h..1h",
            "--after",
            "5m..now",
            "--service",
            "checkout",
        ],
    )
    .expect("diff");
    assert!(
        String::from_utf8_lossy(&empty.stderr).contains("has no data"),
        "{}",
        String::from_utf8_lossy(&empty.stderr)
    );

    // 15 s marks would alias 10 s buckets (▄█▄█); marks hold whole buckets.
    let series = cli_json(
        &binary_dir(),
        &url,
        &[
            "series",
            "--since",
            "1h",
            "--step",
            "15s",
            "--service",
            "checkout",
        ],
    )
    .expect("series");
    let step = series["step_ns"].as_i64().expect("step");
    assert_eq!(step % (10 * NS), 0, "{series}");
    let text = stdout(
        &cli(
            &binary_dir(),
            &url,
            &[
                "series",
                "--since",
                "1h",
                "--step",
                "15s",
                "--service",
                "checkout",
            ],
        )
        .expect("series"),
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("off-cpu"))
        .unwrap_or_else(|| panic!("no off-cpu line:\n{text}"));
    let marks: std::collections::BTreeSet<char> =
        line.chars().filter(|c| ('▁'..='█').contains(c)).collect();
    assert_eq!(marks.len(), 1, "a steady workload drew a pattern:\n{text}");
    // 1.6 s of off-CPU time per 10 s with data, not averaged over the hour.
    assert!(line.contains("160.0ms/s"), "{text}");
}

#[test]
fn queries_without_data_and_bad_names_or_durations_fail_in_one_line() {
    let (collector, _) = collector_with_data("cli-refusals");
    let url = collector.plaintext_url();
    let dir = scratch("cli-refusals-out");
    let out = dir.join("flame.svg");
    let out_arg = out.to_string_lossy().into_owned();
    let line = fails(
        &url,
        &[
            "flame",
            "--since",
            "15m",
            "--service",
            "nosuch",
            "-o",
            &out_arg,
        ],
    );
    assert!(line.contains("no data for service=nosuch"), "{line}");
    let line = fails(
        &url,
        &[
            "flame", "--since", "15m", "--signal", "lock", "-o", &out_arg,
        ],
    );
    assert!(line.contains("no data for signal=lock"), "{line}");
    assert!(!out.exists(), "an empty flame graph was written");
    let line = fails(&url, &["top", "--since", "15m", "--cause", "bogus"]);
    assert!(
        line.contains("unknown cause `bogus`") && line.contains("cpu-contention"),
        "{line}"
    );
    let line = fails(&url, &["top", "--since", "15m", "--signal", "bogus"]);
    assert!(
        line.contains("unknown signal `bogus`") && line.contains("off-cpu"),
        "{line}"
    );
    let line = fails(&url, &["top", "--since", "10"]);
    assert!(line.contains("has no unit"), "{line}");
    let line = fails(&url, &["top", "--since", "0s"]);
    assert!(line.contains("longer than zero"), "{line}");
    let line = fails(&url, &["top", "--since", "-5s"]);
    assert!(line.contains("must be positive"), "{line}");
    let line = fails(&url, &["series", "--since", "15m", "--step", "0s"]);
    assert!(line.contains("longer than zero"), "{line}");
    // Names in other spellings are the same signal.
    let top = cli_json(
        &binary_dir(),
        &url,
        &["top", "--since", "15m", "--signal", "off_cpu"],
    )
    .expect("off_cpu");
    assert!(top["total_ns"].as_i64().unwrap_or(0) > 0);
}

#[test]
fn every_flag_is_described_in_help() {
    let stallscope = binary(&binary_dir(), "stallscope").expect("cli built");
    for command in ["targets", "flame", "top", "diff", "series", "agents"] {
        let output = Command::new(&stallscope)
            .args([command, "--help"])
            .output()
            .expect("runs");
        assert!(output.status.success());
        let text = stdout(&output);
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start();
            if !trimmed.starts_with('-') {
                continue;
            }
            let described_inline = trimmed.split("  ").filter(|p| !p.trim().is_empty()).count() > 1;
            let described_below = lines
                .get(i + 1)
                .is_some_and(|next| !next.trim().is_empty() && !next.trim_start().starts_with('-'));
            assert!(
                described_inline || described_below,
                "`stallscope {command} --help`: `{trimmed}` has no description:\n{text}"
            );
        }
        if command == "top" {
            assert!(text.contains("executable's file name"), "{text}");
        }
    }
}

#[test]
fn workload_help_does_not_wait_on_stdin() {
    let workload = binary(&binary_dir(), "stallscope-workload").expect("workload built");
    let mut child = Command::new(workload)
        .arg("--help")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`stallscope-workload --help` waited on stdin");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("output");
    assert!(output.status.success());
    assert!(
        stdout(&output).contains("Scenarios:"),
        "{}",
        stdout(&output)
    );
}

/// A listener that accepts connections and never answers.
fn silent_listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let accepting = listener.try_clone().expect("clone");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in accepting.incoming().map_while(Result::ok) {
            held.push(stream);
        }
    });
    (listener, url)
}

fn fails_within(args: &[&str], url: &str, config: Option<&Path>, limit: Duration) -> String {
    let mut command = Command::new(binary(&binary_dir(), "stallscope").expect("cli built"));
    command
        .args(args)
        .env("STALLSCOPE_COLLECTOR", url)
        .env("STALLSCOPE_TOKEN", TEST_TOKEN)
        .env_remove("STALLSCOPE_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let started = Instant::now();
    let mut child = command.spawn().expect("starts");
    while child.try_wait().expect("status").is_none() {
        if started.elapsed() > limit * 3 {
            let _ = child.kill();
            panic!(
                "stallscope {args:?} against a silent port still running after {:?}",
                started.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    let output = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{stderr}");
    assert!(took < limit, "took {took:?}, limit {limit:?}: {stderr}");
    stderr
}

#[test]
fn a_collector_port_that_never_answers_fails_within_the_deadline() {
    let (_listener, url) = silent_listener();
    // The defaults: 5 s to connect and hear from the server.
    let stderr = fails_within(&["agents"], &url, None, Duration::from_secs(9));
    assert!(
        stderr.contains("accepted the connection but did not answer within 5s")
            && stderr.contains("--connect-timeout"),
        "{stderr}"
    );
    let stderr = fails_within(
        &["agents", "--connect-timeout", "1s"],
        &url,
        None,
        Duration::from_secs(4),
    );
    assert!(stderr.contains("did not answer within 1s"), "{stderr}");
    // The same deadline from cli.toml.
    let dir = scratch("cli-silent");
    let config = dir.join("cli.toml");
    std::fs::write(&config, "connect_timeout = \"1s\"\n").expect("config");
    let stderr = fails_within(&["targets"], &url, Some(&config), Duration::from_secs(4));
    assert!(stderr.contains("did not answer within 1s"), "{stderr}");
    // A bad value there is one line naming the key.
    std::fs::write(&config, "timeout = \"10\"\n").expect("config");
    let stderr = fails_within(&["targets"], &url, Some(&config), Duration::from_secs(4));
    assert!(
        stderr.contains("`timeout`") && stderr.contains("has no unit"),
        "{stderr}"
    );
}

/// A gRPC server whose query service takes calls and never answers them.
#[derive(Clone)]
struct HangingQueries;

impl tonic::server::NamedService for HangingQueries {
    const NAME: &'static str = "stallscope.v1.Query";
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for HangingQueries {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Pending<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        std::future::pending()
    }
}

#[test]
fn a_query_the_collector_never_answers_fails_within_the_timeout() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(HangingQueries)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let stderr = fails_within(
        &["agents", "--timeout", "2s"],
        &url,
        None,
        Duration::from_secs(6),
    );
    assert!(
        stderr.contains("did not answer within 2s") && stderr.contains("--timeout"),
        "{stderr}"
    );
    let dir = scratch("cli-hanging");
    let config = dir.join("cli.toml");
    std::fs::write(&config, "timeout = \"1s\"\n").expect("config");
    let stderr = fails_within(&["targets"], &url, Some(&config), Duration::from_secs(5));
    assert!(stderr.contains("did not answer within 1s"), "{stderr}");
}
