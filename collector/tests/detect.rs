//! The window detector against real storage, on every backend: a service's batches
//! (request path, idle waits, noise) are stored as an agent would send them, and the
//! collector's detector ticks along on a synthetic clock. A minute of a slow peer gets one
//! automatic window with its indicators and top cause; a detector started anew on the
//! same storage while the window is open takes it up instead of opening another; two
//! detectors sharing one store, ticking at the same moments, store one window; an agent
//! whose batches arrive later than `max_delay` still gets its window, in the right place.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use stallscope_collector::{
    batch::{BatchLimits, normalize},
    detect::{
        DetectSettings, Detector,
        store::{StoredWindow, WindowStore},
    },
    storage::{
        Retention, Storage, Tier, TimeRange, clickhouse::ClickHouseStore, sqlite::SqliteStore,
    },
};
use stallscope_proto::v1;

const SECOND: i64 = 1_000_000_000;
/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600;
/// Batches start 3 s into their bucket.
const PHASE_S: i64 = 3;
/// Ten minutes healthy, then the shipping peer 10 ms slower for 6 batches.
const SLOW: std::ops::Range<u64> = 60..66;
const BATCHES: u64 = 90;

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn retention() -> Retention {
    Retention {
        tiers: vec![
            Tier {
                resolution: Duration::from_secs(10),
                keep: Duration::from_secs(365 * 86_400),
            },
            Tier {
                resolution: Duration::from_secs(60),
                keep: Duration::from_secs(2 * 365 * 86_400),
            },
        ],
    }
}

fn signal(name: &str, value: &str, count: &str) -> v1::SignalType {
    v1::SignalType {
        name: name.into(),
        value_kind: value.into(),
        value_unit: "nanoseconds".into(),
        count_kind: count.into(),
        count_unit: "count".into(),
    }
}

/// Deterministic noise in [-amplitude, +amplitude].
fn noise(sequence: u64, salt: u64, amplitude: f64) -> f64 {
    let mut z =
        sequence.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 29;
    z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 32;
    ((z % 2001) as f64 / 1000.0 - 1.0) * amplitude
}

struct Builder {
    batch: v1::Batch,
}

impl Builder {
    fn new(sequence: u64) -> Self {
        Self {
            batch: v1::Batch {
                agent_id: "agent-1".into(),
                host: "host-a".into(),
                sequence,
                start_unix_ns: start_s(sequence) * SECOND,
                duration_ns: 10 * SECOND,
                // Named as agents name them (after their pprof sample types).
                signals: vec![
                    signal("off-cpu", "off_cpu", "off_cpu_events"),
                    signal("on-cpu", "on_cpu", "on_cpu_samples"),
                    signal("lock-wait", "lock_wait", "lock_waits"),
                    signal("socket-wait", "socket_wait", "socket_waits"),
                    signal("runqueue", "runqueue", "runqueue_events"),
                ],
                strings: vec![String::new()],
                ..v1::Batch::default()
            },
        }
    }

    fn string(&mut self, text: &str) -> u32 {
        if let Some(i) = self.batch.strings.iter().position(|s| s == text) {
            return i as u32;
        }
        self.batch.strings.push(text.into());
        (self.batch.strings.len() - 1) as u32
    }

    fn sample(
        &mut self,
        signal: u32,
        function: &str,
        labels: &[(&str, &str)],
        seconds: f64,
        count: i64,
    ) {
        self.batch.frames.push(v1::Frame {
            function: function.into(),
            module: "/app/shop".into(),
            kind: v1::FrameKind::User as i32,
            ..v1::Frame::default()
        });
        self.batch.stacks.push(v1::Stack {
            frames: vec![(self.batch.frames.len() - 1) as u32],
        });
        let stack = (self.batch.stacks.len() - 1) as u32;
        let mut all = vec![
            ("service", "shop"),
            ("process", "shop"),
            ("pid", "42"),
            ("exe", "/app/shop"),
        ];
        all.extend_from_slice(labels);
        let labels = all
            .iter()
            .flat_map(|(k, v)| [self.string(k), self.string(v)])
            .collect();
        self.batch.samples.push(v1::Sample {
            stack,
            signal,
            labels,
            value: (seconds * 1e9) as i64,
            count,
        });
    }
}

fn start_s(sequence: u64) -> i64 {
    T0 + PHASE_S + 10 * sequence as i64
}

/// One 10 s batch: 2,000 requests, each 0.4 ms of CPU, a 2 ms and a 1 ms downstream call
/// (11 ms during the slow stretch), three wakeups; a parked pool and readers waiting.
fn batch(sequence: u64) -> v1::Batch {
    let mut b = Builder::new(sequence);
    let n = |salt, amplitude| 1.0 + noise(sequence, salt, amplitude);
    let requests = (2000.0 * n(1, 0.1)).round();
    let count = requests as i64;
    let shipping_ms = if SLOW.contains(&sequence) { 11.0 } else { 1.0 };
    b.sample(
        1,
        "render_page",
        &[("cause", "cpu-work")],
        requests * 0.4e-3 * n(2, 0.05),
        count / 10,
    );
    let (pricing, shipping) = (
        requests * 2e-3 * n(3, 0.05),
        requests * shipping_ms * 1e-3 * n(4, 0.05),
    );
    b.sample(
        0,
        "recv",
        &[("cause", "network")],
        pricing + shipping + 40.0,
        2 * count + 100,
    );
    b.sample(
        3,
        "call_pricing",
        &[
            ("cause", "network"),
            ("direction", "client"),
            ("peer", "10.0.0.2:7001"),
        ],
        pricing,
        count,
    );
    b.sample(
        3,
        "call_shipping",
        &[
            ("cause", "network"),
            ("direction", "client"),
            ("peer", "10.0.0.3:7002"),
        ],
        shipping,
        count,
    );
    b.sample(
        3,
        "read_request",
        &[
            ("cause", "network"),
            ("direction", "server"),
            ("peer", "127.0.0.1"),
        ],
        40.0,
        100,
    );
    let runqueue = requests * 3.0 * 30e-6 * n(5, 0.1);
    b.sample(
        0,
        "schedule",
        &[("cause", "cpu-contention")],
        runqueue,
        3 * count,
    );
    b.sample(4, "schedule", &[("kind", "woken")], runqueue, 3 * count);
    let lock = requests * 0.05 * 50e-6 * n(6, 0.2);
    b.sample(0, "lock_contended", &[("cause", "lock")], lock, count / 20);
    b.sample(
        2,
        "lock_contended",
        &[
            ("lock_kind", "futex"),
            ("lock", "0x1000"),
            ("lock_wait", "contention"),
        ],
        lock,
        count / 20,
    );
    b.sample(
        0,
        "park",
        &[("cause", "other"), ("evidence", "futex: idle wait")],
        80.0,
        count,
    );
    b.batch
}

async fn store_batch<S: Storage>(store: &S, sequence: u64) {
    let normalized = normalize(
        "agent-1",
        sequence,
        batch(sequence),
        &BatchLimits::default(),
    )
    .expect("valid batch");
    store.store(normalized).await.expect("store");
}

fn settings() -> DetectSettings {
    DetectSettings::default()
}

/// When the detector looks, after batch `sequence` was stored: 4 s after it ended.
fn clock_after(sequence: u64) -> i64 {
    (start_s(sequence) + 10 + 4) * SECOND
}

async fn automatic<S: Storage + WindowStore>(store: &S) -> Vec<StoredWindow> {
    store
        .windows_overlapping(TimeRange {
            from_unix_ns: 0,
            until_unix_ns: i64::MAX / 4,
        })
        .await
        .expect("windows")
        .into_iter()
        .filter(|w| w.automatic)
        .collect()
}

async fn one_window_with_its_cause<S: Storage + WindowStore>(store: Arc<S>) {
    let mut detector = Detector::new(Arc::clone(&store), settings(), 10);
    let mut opened_at = None;
    for sequence in 0..BATCHES {
        store_batch(&*store, sequence).await;
        let report = detector.tick(clock_after(sequence)).await.expect("tick");
        if !report.opened.is_empty() {
            opened_at.get_or_insert(sequence);
        }
    }
    detector
        .finish_explains(clock_after(BATCHES))
        .await
        .expect("why");
    let windows = automatic(&*store).await;
    assert_eq!(windows.len(), 1, "{windows:#?}");
    let window = &windows[0];
    assert_eq!(
        (window.host.as_str(), window.service.as_str()),
        ("host-a", "shop")
    );
    let truth_onset = start_s(SLOW.start);
    let truth_end = start_s(SLOW.end);
    let onset_error = (window.onset_unix_ns - truth_onset * SECOND).abs() as f64 / 1e9;
    let end = window.end_unix_ns.expect("closed");
    let end_error = (end - truth_end * SECOND).abs() as f64 / 1e9;
    assert!(
        onset_error <= 10.0,
        "onset off by {onset_error} s: {window:#?}"
    );
    assert!(end_error <= 10.0, "end off by {end_error} s: {window:#?}");
    let opened_at = opened_at.expect("opened");
    assert!(opened_at <= SLOW.start + 3, "opened with batch {opened_at}");
    assert!(
        window
            .indicators
            .iter()
            .any(|i| i.name == "socket-wait-per-op:10.0.0.3:7002" && i.observed > 5.0 * i.baseline),
        "{window:#?}"
    );
    assert_eq!(
        window.top_cause.as_deref(),
        Some("network (peer 10.0.0.3:7002)"),
        "{window:#?}"
    );
}

async fn a_restart_takes_the_open_window_up<S: Storage + WindowStore>(store: Arc<S>) {
    let mut first = Detector::new(Arc::clone(&store), settings(), 10);
    let mut sequence = 0;
    while automatic(&*store).await.is_empty() {
        assert!(sequence < SLOW.end, "no window opened");
        store_batch(&*store, sequence).await;
        first.tick(clock_after(sequence)).await.expect("tick");
        sequence += 1;
    }
    // The collector dies with the window open; a new one starts on the same storage.
    drop(first);
    let open = automatic(&*store).await;
    assert!(open[0].end_unix_ns.is_none());
    let mut second = Detector::new(Arc::clone(&store), settings(), 10);
    let mut reports = Vec::new();
    for s in sequence..BATCHES {
        store_batch(&*store, s).await;
        reports.push(second.tick(clock_after(s)).await.expect("tick"));
    }
    assert!(reports.iter().all(|r| r.opened.is_empty()), "{reports:?}");
    let windows = automatic(&*store).await;
    assert_eq!(windows.len(), 1, "{windows:#?}");
    assert_eq!(windows[0].id, open[0].id);
    assert!(windows[0].end_unix_ns.is_some(), "{windows:#?}");
}

async fn two_detectors_one_window<S: Storage + WindowStore>(store: Arc<S>) {
    let mut a = Detector::new(Arc::clone(&store), settings(), 10);
    // The second replica gives up on a bucket at once, and once reads the bucket where
    // the degradation begins before its batch is stored: it sees the change a bucket
    // later and places the onset differently.
    let impatient = DetectSettings {
        max_delay: Duration::ZERO,
        ..settings()
    };
    let mut b = Detector::new(Arc::clone(&store), impatient, 10);
    for sequence in 0..BATCHES {
        let now = clock_after(sequence);
        if sequence == SLOW.start {
            b.tick(now).await.expect("tick b, early");
        }
        store_batch(&*store, sequence).await;
        // The same moment: both may find no open window and open one.
        let (ra, rb) = tokio::join!(a.tick(now), b.tick(now + SECOND / 2));
        ra.expect("tick a");
        rb.expect("tick b");
    }
    let windows = automatic(&*store).await;
    assert_eq!(windows.len(), 1, "{windows:#?}");
    assert!(windows[0].end_unix_ns.is_some());
}

/// Every batch reaches the collector 45 s after it ended (an agent on a busy host, well
/// over `max_delay`'s 30 s) while the detector ticks every 2 s: no bucket is given up as
/// empty while the host's data keeps coming, so the window is found with the right onset.
async fn a_lagging_agent_still_gets_its_window<S: Storage + WindowStore>(store: Arc<S>) {
    const LAG_S: i64 = 45;
    let mut detector = Detector::new(Arc::clone(&store), settings(), 10);
    let mut stored = 0;
    let mut now_s = start_s(0);
    let last = start_s(BATCHES - 1) + 10 + LAG_S + 10;
    while now_s <= last {
        while stored < BATCHES && start_s(stored) + 10 + LAG_S <= now_s {
            store_batch(&*store, stored).await;
            stored += 1;
        }
        detector.tick(now_s * SECOND).await.expect("tick");
        now_s += 2;
    }
    detector.finish_explains(now_s * SECOND).await.expect("why");
    let windows = automatic(&*store).await;
    assert_eq!(windows.len(), 1, "{windows:#?}");
    let onset_error = (windows[0].onset_unix_ns - start_s(SLOW.start) * SECOND).abs() / SECOND;
    assert!(
        onset_error <= 10,
        "onset off by {onset_error} s: {windows:#?}"
    );
    let end = windows[0].end_unix_ns.expect("closed");
    let end_error = (end - start_s(SLOW.end) * SECOND).abs() / SECOND;
    assert!(end_error <= 10, "end off by {end_error} s: {windows:#?}");
}

fn sqlite_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "stallscope-detect-{name}-{}-{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn sqlite(name: &str) -> Arc<SqliteStore> {
    Arc::new(SqliteStore::open(&sqlite_dir(name), retention()).expect("open SQLite"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_one_window_with_its_cause() {
    one_window_with_its_cause(sqlite("cause")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_restart_takes_the_open_window_up() {
    a_restart_takes_the_open_window_up(sqlite("restart")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_detectors_one_window() {
    two_detectors_one_window(sqlite("two")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_lagging_agent_still_gets_its_window() {
    a_lagging_agent_still_gets_its_window(sqlite("lag")).await;
}

async fn clickhouse(name: &str) -> Option<Arc<ClickHouseStore>> {
    let Ok(url) = std::env::var("STALLSCOPE_CLICKHOUSE_URL") else {
        assert!(
            !in_ci(),
            "STALLSCOPE_CLICKHOUSE_URL is not set (cargo xtask clickhouse start)"
        );
        eprintln!("STALLSCOPE_CLICKHOUSE_URL is not set: skipping the ClickHouse run");
        return None;
    };
    let database = format!(
        "stallscope_detect_{name}_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    Some(Arc::new(
        ClickHouseStore::connect(&url, &database, retention())
            .await
            .expect("connect to ClickHouse"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_one_window_with_its_cause() {
    if let Some(store) = clickhouse("cause").await {
        one_window_with_its_cause(store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_two_detectors_one_window() {
    if let Some(store) = clickhouse("two").await {
        two_detectors_one_window(store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_a_lagging_agent_still_gets_its_window() {
    if let Some(store) = clickhouse("lag").await {
        a_lagging_agent_still_gets_its_window(store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_a_restart_takes_the_open_window_up() {
    if let Some(store) = clickhouse("restart").await {
        a_restart_takes_the_open_window_up(store).await;
    }
}
