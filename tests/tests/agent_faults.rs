//! Faults around `stallscope-agent run`, as root with real probes: a spool disk that is
//! full (a tiny tmpfs) must behave like a full spool (drop the oldest, count exactly,
//! keep profiling, start cleanly), and a collector address that accepts connections but
//! never answers must not hold the agent's exit past its flush deadline.

use std::{
    io::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    thread::sleep,
    time::{Duration, Instant},
};

use stallscope_tests::{
    Workload, binary, binary_dir,
    collector::{CollectorProcess, TEST_TOKEN, cli_json, free_port, scratch},
    require_root,
    streaming::{spool_state, start_run, stop_run, wait_for_spool},
};

/// A tmpfs of `size` mounted at `path`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs at {}", path.display());
        Self(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` with one file until it has no space left.
fn fill(dir: &Path) -> PathBuf {
    let junk = dir.join("junk");
    let mut file = std::fs::File::create(&junk).expect("junk file");
    let block = vec![0u8; 4096];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
    junk
}

fn pulse() -> (Workload, String) {
    let mut workload = Workload::start(
        &binary(&binary_dir(), "stallscope-workload").expect("workload built"),
        &["pulse"],
    )
    .expect("workload");
    workload.go().expect("go");
    let pid = workload.pid.to_string();
    (workload, pid)
}

#[test]
fn a_full_spool_disk_drops_the_oldest_counts_exactly_and_keeps_profiling() {
    if !require_root("a_full_spool_disk_drops_the_oldest_counts_exactly_and_keeps_profiling") {
        return;
    }
    let dir = scratch("spool-disk-full");
    let spool = dir.join("spool");
    let _tmpfs = Tmpfs::mount(&spool, "160k");
    // Start on a disk that is already full, with the leftover of a write a full disk
    // interrupted earlier.
    let stale = spool.join("batch-00000000000000000007.tmp");
    std::fs::File::create(&stale).expect("stale temporary file");
    let junk = fill(&spool);
    let port = free_port().expect("port");
    let url = format!("http://127.0.0.1:{port}");
    let (_workload, pid) = pulse();
    let mut agent = start_run(
        &binary_dir(),
        &url,
        &spool,
        "disk-full-agent",
        &[
            "--pid",
            &pid,
            "--spool-max-batches",
            "100000",
            "--batch-interval",
            "500ms",
            "--drain-interval",
            "250ms",
            "--max-backoff",
            "1s",
        ],
    )
    .expect("the agent starts on a full disk");
    assert!(!stale.exists(), "the stale temporary file was left");
    agent
        .wait_log("dropped the new batch", Duration::from_secs(60))
        .expect("batches are dropped while the disk is full");
    // Space comes back: batches are stored until the disk is full again, then the
    // oldest make room.
    std::fs::remove_file(&junk).expect("remove junk");
    wait_for_spool(&spool, Duration::from_secs(120), |_, dropped| dropped >= 6)
        .expect("the spool fills the disk and drops its oldest batches");
    agent
        .wait_log("spool full (disk full)", Duration::from_secs(10))
        .expect("the oldest batch was dropped for the full disk");
    let leftovers: Vec<_> = std::fs::read_dir(&spool)
        .expect("spool dir")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "tmp"))
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let args = [
        "--plaintext",
        "--query-tokens",
        TEST_TOKEN,
        "--data-dir",
        &dir.join("data").to_string_lossy(),
    ]
    .map(str::to_owned);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _collector = CollectorProcess::start(&binary_dir(), port, &args, &[]).expect("collector");
    wait_for_spool(&spool, Duration::from_secs(60), |files, _| files <= 2)
        .expect("the spool drains once the collector is there");
    let (summary, exit) = stop_run(agent).expect("the agent kept running and stops");
    assert!(summary.all_acknowledged, "{}", exit.stderr);
    let agents = cli_json(&binary_dir(), &url, &["agents"]).expect("agents");
    let info = agents
        .as_array()
        .and_then(|a| a.first())
        .cloned()
        .expect("one agent");
    let stored = info["batches"].as_u64().expect("batches");
    eprintln!(
        "closed {} batches: {stored} stored, {} dropped (collector: {})",
        summary.batches, summary.dropped_total, info["spool_dropped_total"]
    );
    assert!(summary.dropped_total >= 6, "{summary:?}");
    assert_eq!(
        stored + summary.dropped_total,
        summary.batches,
        "every batch the agent closed was stored or counted as dropped: {info} {summary:?}"
    );
    assert_eq!(
        info["spool_dropped_total"].as_u64(),
        Some(summary.dropped_total),
        "the collector got the exact drop count: {info}"
    );
    assert_eq!(spool_state(&spool).1, summary.dropped_total);
}

#[test]
fn a_silent_collector_does_not_hold_the_exit_past_the_flush_timeout() {
    if !require_root("a_silent_collector_does_not_hold_the_exit_past_the_flush_timeout") {
        return;
    }
    // Accepts connections and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("address").port();
    let held = Arc::new(Mutex::new(Vec::new()));
    {
        let held = Arc::clone(&held);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Ok(mut held) = held.lock() {
                    held.push(stream);
                }
            }
        });
    }
    let dir = scratch("silent-collector");
    let (_workload, pid) = pulse();
    let agent = start_run(
        &binary_dir(),
        &format!("http://127.0.0.1:{port}"),
        &dir.join("spool"),
        "silent-agent",
        // The default flush timeout (5 s).
        &["--pid", &pid, "--duration", "5s", "--flush-timeout", "5s"],
    )
    .expect("agent runs");
    let started = Instant::now();
    let exit = agent
        .wait(Duration::from_secs(60))
        .expect("the agent exits by itself");
    let took = started.elapsed();
    eprintln!("exited {took:?} after attaching (5 s run, 5 s flush timeout)");
    assert!(exit.status.success(), "{}", exit.stderr);
    let exit = exit.stderr;
    // 5 s of recording, at most 5 s of flushing, and the closing batch.
    assert!(
        took < Duration::from_secs(14),
        "the agent took {took:?} to exit against a silent collector: {exit}"
    );
    assert!(
        exit.contains("did not answer"),
        "the agent did not say what happened: {exit}"
    );
    assert!(
        exit.contains("left in the spool for the next start"),
        "{exit}"
    );
    assert!(
        held.lock().map_or(0, |h| h.len()) >= 1,
        "the agent never connected"
    );
    sleep(Duration::from_millis(100));
}
