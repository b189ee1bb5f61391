//! `why` on stored data, on every backend: a service with a request path (CPU work, a
//! mutex, two downstream peers) and a lot of idle waiting (servers waiting for requests,
//! a parked pool), healthy for 10 minutes with bucket-to-bucket noise, then degraded for
//! a minute by one cause. The report must rank the injected cause first and name the
//! object, say "inconclusive" for a healthy minute, and refuse plainly without data or
//! without a baseline. (The scenario tests in tests/ do the same with real agents and a
//! real service; this suite pins the engine's arithmetic on both backends.)

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use stallscope_collector::{
    batch::{BatchLimits, normalize},
    explain::{self, Question, Settings, report::Verdict},
    storage::{
        Retention, Storage, Tier, TimeRange, clickhouse::ClickHouseStore, sqlite::SqliteStore,
    },
};
use stallscope_proto::v1;

const SECOND: i64 = 1_000_000_000;
/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600;
/// Healthy batches before the first degradation (10 s each).
const HEALTHY: i64 = 60;

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

/// What one 10-second batch of the service looks like.
#[derive(Debug, Clone, Copy, Default)]
struct Phase {
    /// Extra lock wait on the `inventory` futex, seconds per batch.
    extra_lock: f64,
    /// Extra wait on peer B (shipping), seconds per batch.
    extra_peer_b: f64,
    /// The second build runs (build-id `bb`), whose `render_page` costs this much more
    /// CPU per batch.
    new_build_extra_cpu: Option<f64>,
    /// The host also runs `pricing` (serving port 7001, shop's peer A) and `demo-hog`.
    neighbours: bool,
    /// What goes wrong around pricing.
    fault: NeighbourFault,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum NeighbourFault {
    #[default]
    None,
    /// `demo-hog` spins: shop waits for the CPU a little longer and for pricing much
    /// longer, since pricing waits for the CPU too.
    Hog,
    /// `demo-hog` spins, and shop's extra wait on pricing is several times pricing's own
    /// measured run-queue time (what else starves on the way is not pricing's).
    HogFarFromPricing,
    /// Pricing sleeps longer per request (no CPU contention anywhere).
    SlowPricing,
    /// The path to pricing drops packets (shop waits much longer on it) while a busy
    /// host takes a little CPU from pricing and shop.
    LossyPricing,
}

/// Builds batches with named frames and labels.
struct Builder {
    batch: v1::Batch,
    build: &'static str,
    /// Service and pid of the samples added next.
    who: (&'static str, &'static str),
}

impl Builder {
    fn new(sequence: u64, start_s: i64) -> Self {
        let signal = |name: &str, value: &str, count: &str| v1::SignalType {
            name: name.into(),
            value_kind: value.into(),
            value_unit: "nanoseconds".into(),
            count_kind: count.into(),
            count_unit: "count".into(),
        };
        Self {
            batch: v1::Batch {
                agent_id: "agent-1".into(),
                host: "host-a".into(),
                sequence,
                start_unix_ns: start_s * SECOND,
                duration_ns: 10 * SECOND,
                signals: vec![
                    signal("off-cpu", "off_cpu", "off_cpu_events"),
                    signal("on-cpu", "on_cpu", "on_cpu_samples"),
                    signal("lock", "lock_wait", "lock_waits"),
                    signal("socket-wait", "socket_wait", "socket_waits"),
                ],
                strings: vec![String::new()],
                ..v1::Batch::default()
            },
            build: "aa",
            who: ("shop", "42"),
        }
    }

    fn string(&mut self, text: &str) -> u32 {
        if let Some(i) = self.batch.strings.iter().position(|s| s == text) {
            return i as u32;
        }
        self.batch.strings.push(text.into());
        (self.batch.strings.len() - 1) as u32
    }

    /// A sample with a user stack of `functions` (innermost first) in /app/shop.
    fn sample(
        &mut self,
        signal: u32,
        functions: &[&str],
        labels: &[(&str, &str)],
        seconds: f64,
        count: i64,
    ) {
        let mut frame_ids = Vec::new();
        for function in functions {
            self.batch.frames.push(v1::Frame {
                function: (*function).into(),
                module: "/app/shop".into(),
                kind: v1::FrameKind::User as i32,
                ..v1::Frame::default()
            });
            frame_ids.push((self.batch.frames.len() - 1) as u32);
        }
        self.batch.stacks.push(v1::Stack { frames: frame_ids });
        let stack = (self.batch.stacks.len() - 1) as u32;
        let (service, pid) = self.who;
        let mut all = vec![
            ("service", service),
            ("process", service),
            ("pid", pid),
            ("build_id", self.build),
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

/// Deterministic noise in [-amplitude, +amplitude].
fn noise(sequence: u64, salt: u64, amplitude: f64) -> f64 {
    let mut z =
        sequence.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 29;
    z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 32;
    ((z % 2001) as f64 / 1000.0 - 1.0) * amplitude
}

fn batch(sequence: u64, phase: Phase) -> v1::Batch {
    let start = T0 + 10 * sequence as i64;
    let mut b = Builder::new(sequence, start);
    let n = |salt, amplitude| 1.0 + noise(sequence, salt, amplitude);
    // 8 workers and a pool: 10 threads x 10 s of thread time per batch.
    let extra_cpu = phase.new_build_extra_cpu.unwrap_or(0.0);
    if phase.new_build_extra_cpu.is_some() {
        b.build = "bb";
    }
    b.sample(
        1,
        &["render_page", "handle_request"],
        &[("cause", "cpu-work")],
        2.0 * n(1, 0.1),
        98,
    );
    if extra_cpu > 0.0 {
        b.sample(
            1,
            &["render_page_v2", "render_page", "handle_request"],
            &[("cause", "cpu-work")],
            extra_cpu,
            147,
        );
    }
    b.sample(
        0,
        &["lock_contended", "reserve_inventory", "handle_request"],
        &[("cause", "lock"), ("state", "interruptible")],
        0.05 * n(2, 0.3) + phase.extra_lock,
        50,
    );
    b.sample(
        2,
        &["lock_contended", "reserve_inventory", "handle_request"],
        &[
            ("lock_kind", "futex"),
            ("lock", "0x7f00aa"),
            ("lock_wait", "contention"),
        ],
        0.05 * n(2, 0.3) + phase.extra_lock,
        50,
    );
    let extra_peer_a = if phase.fault == NeighbourFault::None {
        0.0
    } else {
        4.0
    };
    let (peer_a, peer_b) = (
        1.0 * n(3, 0.1) + extra_peer_a,
        1.0 * n(4, 0.1) + phase.extra_peer_b,
    );
    let server = 30.0 * n(5, 0.05) - phase.extra_peer_b - extra_peer_a;
    // Off-CPU network time: clients waiting for peers plus servers waiting for requests.
    b.sample(
        0,
        &["recv", "call_peer", "handle_request"],
        &[("cause", "network"), ("state", "interruptible")],
        peer_a + peer_b + server,
        3000,
    );
    b.sample(
        3,
        &["recv", "call_pricing", "handle_request"],
        &[("direction", "client"), ("peer", "10.0.0.2:7001")],
        peer_a,
        1000,
    );
    b.sample(
        3,
        &["recv", "call_shipping", "handle_request"],
        &[("direction", "client"), ("peer", "10.0.0.3:7002")],
        peer_b,
        1000,
    );
    b.sample(
        3,
        &["recv", "read_request"],
        &[("direction", "server"), ("peer", "127.0.0.1")],
        server,
        1000,
    );
    b.sample(
        0,
        &["futex_wait", "park", "pool_worker"],
        &[("cause", "other"), ("evidence", "futex: idle wait")],
        40.0 * n(6, 0.05) - phase.extra_lock - extra_cpu,
        100,
    );
    if phase.neighbours {
        neighbours(&mut b, sequence, phase);
    }
    b.batch
}

/// Shop's run-queue wait, and the two other processes of its host: `pricing` (its peer A,
/// serving port 7001: CPU, waits for the CPU, sleeps, and idle waits for requests) and
/// `demo-hog` (CPU only).
fn neighbours(b: &mut Builder, sequence: u64, phase: Phase) {
    let n = |salt, amplitude| 1.0 + noise(sequence, salt, amplitude);
    b.sample(
        0,
        &["handle_request"],
        &[("cause", "cpu-contention"), ("state", "runnable")],
        0.2 * n(7, 0.2)
            + match phase.fault {
                NeighbourFault::Hog | NeighbourFault::HogFarFromPricing => 1.0,
                NeighbourFault::LossyPricing => 0.5,
                _ => 0.0,
            },
        500,
    );
    b.who = ("pricing", "50");
    let contention = 0.1 * n(8, 0.2)
        + match phase.fault {
            NeighbourFault::Hog => 3.0,
            NeighbourFault::HogFarFromPricing => 0.6,
            NeighbourFault::LossyPricing => 0.3,
            _ => 0.0,
        };
    let slow = phase.fault == NeighbourFault::SlowPricing;
    let sleep = 0.5 * n(9, 0.1) + if slow { 4.0 } else { 0.0 };
    b.sample(
        1,
        &["quote", "serve"],
        &[("cause", "cpu-work")],
        1.0 * n(10, 0.1),
        49,
    );
    b.sample(
        0,
        &["quote", "serve"],
        &[("cause", "cpu-contention"), ("state", "runnable")],
        contention,
        1000,
    );
    b.sample(
        0,
        &["nanosleep", "quote", "serve"],
        &[("cause", "other"), ("state", "interruptible")],
        sleep,
        1000,
    );
    let idle = 8.0 * n(11, 0.05) - contention - sleep;
    b.sample(
        0,
        &["recv", "read_request", "serve"],
        &[("cause", "network"), ("state", "interruptible")],
        idle,
        1000,
    );
    b.sample(
        3,
        &["recv", "read_request", "serve"],
        &[
            ("direction", "server"),
            ("peer", "10.0.0.1"),
            ("local_port", "7001"),
        ],
        idle,
        1000,
    );
    b.who = ("demo-hog", "60");
    let hog = matches!(
        phase.fault,
        NeighbourFault::Hog | NeighbourFault::HogFarFromPricing
    );
    b.sample(
        1,
        &["spin"],
        &[("cause", "cpu-work")],
        0.01 + if hog { 12.0 } else { 0.0 },
        if hog { 600 } else { 1 },
    );
    b.who = ("shop", "42");
}

/// The deploy event an agent reports when the second build's process starts.
fn deploy_event(batch: &mut v1::Batch) {
    batch.events.push(v1::ChangeEvent {
        time_unix_ns: batch.start_unix_ns + SECOND,
        kind: "deploy".into(),
        service: "shop".into(),
        pid: 43,
        previous_pid: 42,
        build_id: "bb".into(),
        previous_build_id: "aa".into(),
        executable: "/app/shop".into(),
        labels: Vec::new(),
    });
}

async fn load<S: Storage>(store: &S, phases: &[(i64, Phase)]) {
    let mut sequence = 0u64;
    let mut deployed = false;
    for &(batches, phase) in phases {
        for _ in 0..batches {
            let mut wire = batch(sequence, phase);
            if phase.new_build_extra_cpu.is_some() && !deployed {
                deploy_event(&mut wire);
                deployed = true;
            }
            let normalized =
                normalize("agent-1", sequence, wire, &BatchLimits::default()).expect("valid batch");
            store.store(normalized).await.expect("store");
            sequence += 1;
        }
    }
}

fn range(from_batch: i64, until_batch: i64) -> TimeRange {
    TimeRange {
        from_unix_ns: (T0 + 10 * from_batch) * SECOND,
        until_unix_ns: (T0 + 10 * until_batch) * SECOND,
    }
}

fn question(service: &str, window: TimeRange) -> Question {
    Question {
        window_id: None,
        host: None,
        service: Some(service.into()),
        window,
        baseline: None,
        exclude: Vec::new(),
    }
}

async fn suite<S: Storage>(store: &S) {
    let healthy = Phase::default();
    let lock = Phase {
        extra_lock: 15.0,
        ..Phase::default()
    };
    let slow = Phase {
        extra_peer_b: 5.0,
        ..Phase::default()
    };
    let deploy = Phase {
        new_build_extra_cpu: Some(3.0),
        ..Phase::default()
    };
    // 10 min healthy, 1 min lock, 3 min healthy, 1 min slow peer B, 3 min healthy, then
    // a deploy of a slower build.
    load(
        store,
        &[
            (HEALTHY, healthy),
            (6, lock),
            (18, healthy),
            (6, slow),
            (18, healthy),
            (6, deploy),
        ],
    )
    .await;
    let settings = Settings::default();

    let lock_window = range(HEALTHY, HEALTHY + 6);
    let report = explain::explain(store, &question("shop", lock_window), &settings)
        .await
        .expect("explain");
    assert_eq!(report.verdict, Verdict::Explained, "{report:#?}");
    assert_eq!(report.top_cause(), Some("lock"), "{report:#?}");
    let top = &report.causes[0];
    assert!(top.share > 0.9, "{top:#?}");
    assert!(
        top.evidence
            .iter()
            .any(|e| e.kind == "lock" && e.name == "futex 0x7f00aa"),
        "{top:#?}"
    );
    assert!(
        top.evidence
            .iter()
            .any(|e| e.details.iter().any(|d| d.contains("reserve_inventory"))),
        "the waiters' code path: {top:#?}"
    );
    // The parked pool's time fell: idle, never ranked.
    assert!(report.idle_window_ns_per_s < report.idle_baseline_ns_per_s);
    assert!(report.baseline.iter().all(|p| p.kind == "before"));
    assert!(report.baseline_buckets >= 50, "{}", report.baseline_buckets);

    // Peer B slows down: off-CPU network time stays flat (its workers stop waiting for
    // requests as long as they wait for B), but the request path's network time rises.
    let slow_window = range(HEALTHY + 24, HEALTHY + 30);
    let report = explain::explain(
        store,
        &Question {
            // The lock window is known: it stays out of this baseline.
            exclude: vec![explain::report::Span {
                from_unix_ns: lock_window.from_unix_ns,
                until_unix_ns: lock_window.until_unix_ns,
            }],
            ..question("shop", slow_window)
        },
        &settings,
    )
    .await
    .expect("explain");
    assert_eq!(report.top_cause(), Some("network"), "{report:#?}");
    let network = &report.causes[0];
    assert_eq!(network.evidence[0].name, "10.0.0.3:7002", "{network:#?}");
    assert!(
        network.evidence.iter().all(|e| e.name != "10.0.0.2:7001"),
        "the healthy peer is not evidence: {network:#?}"
    );
    let lock_buckets: Vec<_> = report
        .baseline
        .iter()
        .filter(|p| {
            p.span.from_unix_ns < lock_window.until_unix_ns
                && p.span.until_unix_ns > lock_window.from_unix_ns
        })
        .collect();
    assert!(
        lock_buckets.is_empty(),
        "the known window is left out: {:?}",
        report.baseline
    );

    // The deploy: CPU work grew, in the new build only, and the stored event is listed.
    let deploy_window = range(HEALTHY + 48, HEALTHY + 54);
    let report = explain::explain(store, &question("shop", deploy_window), &settings)
        .await
        .expect("explain");
    assert_eq!(report.top_cause(), Some("cpu-work"), "{report:#?}");
    let build = report.causes[0]
        .evidence
        .iter()
        .find(|e| e.kind == "build")
        .unwrap_or_else(|| panic!("no build evidence: {report:#?}"));
    assert_eq!(build.name, "bb");
    assert!(
        build
            .details
            .iter()
            .any(|d| d.contains("grew in the new build: render_page_v2")),
        "{build:#?}"
    );
    let event = &report.events[0];
    assert_eq!(event.kind, "deploy");
    assert_eq!(event.build_id.as_deref(), Some("bb"));
    assert_eq!(event.previous_build_id.as_deref(), Some("aa"));
    assert!(event.detail.contains("pid 42 -> 43"), "{event:#?}");

    // The n-sigma baseline ranker on the same data: it ranks by deviation alone.
    let nsigma = Settings {
        ranker: explain::Ranker::NSigma,
        ..Settings::default()
    };
    let report = explain::explain(store, &question("shop", lock_window), &nsigma)
        .await
        .expect("explain");
    assert_eq!(report.top_cause(), Some("lock"), "{report:#?}");

    // A healthy minute: inconclusive.
    let report = explain::explain(
        store,
        &question("shop", range(HEALTHY + 12, HEALTHY + 18)),
        &settings,
    )
    .await
    .expect("explain");
    assert_eq!(report.verdict, Verdict::Inconclusive, "{report:#?}");
    assert!(report.causes.iter().all(|c| c.rank.is_none()));
    assert!(
        report.summary.starts_with("inconclusive"),
        "{}",
        report.summary
    );

    // No data: which service and range.
    let report = explain::explain(store, &question("nosuch", lock_window), &settings)
        .await
        .expect("explain");
    assert_eq!(report.verdict, Verdict::NoData);
    assert!(
        report.summary.contains("service nosuch"),
        "{}",
        report.summary
    );

    // At the very start there is nothing to compare with.
    let report = explain::explain(store, &question("shop", range(1, 7)), &settings)
        .await
        .expect("explain");
    assert_eq!(report.verdict, Verdict::NotEnoughBaseline, "{report:#?}");
    assert!(
        report.summary.contains("needs at least") && report.summary.contains("before the window"),
        "{}",
        report.summary
    );

    // A baseline range given and too short: the message is about that range.
    let mut given = question("shop", lock_window);
    given.baseline = Some(range(HEALTHY - 2, HEALTHY));
    let report = explain::explain(store, &given, &settings)
        .await
        .expect("explain");
    assert_eq!(report.verdict, Verdict::NotEnoughBaseline, "{report:#?}");
    assert!(
        report.summary.contains("in the given baseline")
            && report.summary.contains("pass a longer baseline range")
            && !report.summary.contains("before the window"),
        "{}",
        report.summary
    );
}

/// A CPU hog on shop's host slows shop's peer (pricing, on the same host) more than shop
/// itself: shop's largest rise is its wait on the peer, but `why` follows the peer to
/// pricing, whose first cause is CPU contention, and ranks CPU contention first for shop.
/// A peer slow on its own (pricing sleeping longer) leaves the network first. With the
/// hog named, pricing's contention need not be as large as shop's extra wait on it; with
/// loss on the path (and no hog) it must.
async fn downstream_suite<S: Storage>(store: &S) {
    let healthy = Phase {
        neighbours: true,
        ..Phase::default()
    };
    let hog = Phase {
        fault: NeighbourFault::Hog,
        ..healthy
    };
    let slow = Phase {
        fault: NeighbourFault::SlowPricing,
        ..healthy
    };
    let lossy = Phase {
        fault: NeighbourFault::LossyPricing,
        ..healthy
    };
    let far = Phase {
        fault: NeighbourFault::HogFarFromPricing,
        ..healthy
    };
    load(
        store,
        &[
            (HEALTHY, healthy),
            (6, lossy),
            (18, healthy),
            (6, slow),
            (18, healthy),
            (6, hog),
            (18, healthy),
            (6, far),
        ],
    )
    .await;
    let settings = Settings::default();

    let (lossy_from, slow_from, hog_from, far_from) =
        (HEALTHY, HEALTHY + 24, HEALTHY + 48, HEALTHY + 72);
    // The earlier faults are known windows: they stay out of this baseline.
    let span = |from: i64| {
        let r = range(from, from + 6);
        explain::report::Span {
            from_unix_ns: r.from_unix_ns,
            until_unix_ns: r.until_unix_ns,
        }
    };
    let report = explain::explain(
        store,
        &Question {
            exclude: vec![span(lossy_from), span(slow_from), span(hog_from)],
            ..question("shop", range(far_from, far_from + 6))
        },
        &settings,
    )
    .await
    .expect("explain");
    assert_eq!(report.top_cause(), Some("cpu-contention"), "{report:#?}");
    assert!(
        report.causes[0]
            .evidence
            .iter()
            .any(|e| e.kind == "downstream" && e.name.contains("demo-hog")),
        "the downstream evidence does not name the hog: {report:#?}"
    );
    let report = explain::explain(
        store,
        &question("shop", range(hog_from, hog_from + 6)),
        &settings,
    )
    .await
    .expect("explain");
    assert_eq!(report.top_cause(), Some("cpu-contention"), "{report:#?}");
    let contention = &report.causes[0];
    assert!(
        contention
            .evidence
            .iter()
            .any(|e| e.name.contains("demo-hog")),
        "the hog is not named: {contention:#?}"
    );
    assert!(
        contention.evidence.iter().any(|e| e.kind == "downstream"
            && e.name.contains("10.0.0.2:7001")
            && e.name.contains("pricing")),
        "no downstream evidence: {contention:#?}"
    );
    let network = report
        .causes
        .iter()
        .find(|c| c.category == "network")
        .expect("network cause");
    assert_eq!(network.rank, Some(2), "{report:#?}");
    assert!(
        report.summary.starts_with("cpu-contention"),
        "{}",
        report.summary
    );

    let report = explain::explain(
        store,
        &question("shop", range(slow_from, slow_from + 6)),
        &settings,
    )
    .await
    .expect("explain");
    assert_eq!(report.top_cause(), Some("network"), "{report:#?}");
    assert_peer_a_served_by_pricing(&report, "other");

    // Packet loss on the way to pricing while the host is a little busier: pricing's first
    // cause is CPU contention, and shop's rose too, but pricing's is far smaller than
    // shop's extra wait on it: the network stays first.
    let report = explain::explain(
        store,
        &question("shop", range(lossy_from, lossy_from + 6)),
        &settings,
    )
    .await
    .expect("explain");
    assert_eq!(report.top_cause(), Some("network"), "{report:#?}");
    let ranked = |category: &str| {
        report
            .causes
            .iter()
            .any(|c| c.category == category && c.rank.is_some())
    };
    assert!(ranked("cpu-contention"), "{report:#?}");
    assert_peer_a_served_by_pricing(&report, "cpu-contention");
    assert!(
        report
            .causes
            .iter()
            .flat_map(|c| &c.evidence)
            .all(|e| e.kind != "downstream"),
        "{report:#?}"
    );
}

/// Runs `suite` on a fresh SQLite store.
async fn on_sqlite(suite: impl AsyncFnOnce(&SqliteStore)) {
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "stallscope-explain-{}-{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let store = SqliteStore::open(&dir, retention()).expect("open SQLite");
    suite(&store).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `suite` on a fresh ClickHouse database (skipped, outside CI, without a server).
async fn on_clickhouse(suite: impl AsyncFnOnce(&ClickHouseStore)) {
    let url = std::env::var("STALLSCOPE_CLICKHOUSE_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:18123".to_owned());
    let database = format!(
        "stallscope_explain_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    );
    match ClickHouseStore::connect(&url, &database, retention()).await {
        Ok(store) => suite(&store).await,
        Err(err) => {
            assert!(
                !in_ci(),
                "ClickHouse at {url} is unreachable and CI=true forbids skipping: {err}"
            );
            eprintln!(
                "skipping the ClickHouse run: {err} (start one with `cargo xtask clickhouse start`)"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_follows_a_slow_peer_downstream() {
    on_sqlite(async |store| downstream_suite(store).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_follows_a_slow_peer_downstream() {
    on_clickhouse(async |store| downstream_suite(store).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_explains_injected_causes() {
    on_sqlite(async |store| suite(store).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_explains_injected_causes() {
    on_clickhouse(async |store| suite(store).await).await;
}

/// The report's first cause names peer A and says beside it that pricing serves it, with
/// `first_cause` as pricing's own first cause.
fn assert_peer_a_served_by_pricing(report: &explain::report::Report, first_cause: &str) {
    let peer = report.causes[0]
        .evidence
        .iter()
        .find(|e| e.name == "10.0.0.2:7001")
        .expect("peer A named");
    let note = format!("first cause {first_cause}");
    assert!(
        peer.details
            .iter()
            .any(|d| d.contains("served by pricing") && d.contains(&note)),
        "{peer:#?}"
    );
}
