//! One storage test suite, run against every backend: SQLite always, ClickHouse when a
//! server is reachable at `STALLSCOPE_CLICKHOUSE_URL` (default `http://127.0.0.1:18123`,
//! where `cargo xtask test` starts one); with `CI=true` an unreachable ClickHouse fails
//! the suite instead of skipping it. Windows and change events have their parts in
//! `storage/`.

#[path = "storage/events.rs"]
mod events;
#[path = "storage/windows.rs"]
mod windows;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use stallscope_collector::{
    batch::{BatchLimits, NormalizedBatch, normalize},
    storage::{
        Filter, GroupBy, Retention, Storage, StoreOutcome, Tier, TimeRange,
        clickhouse::ClickHouseStore, sqlite::SqliteStore,
    },
    synthetic::{self, OFF_CPU_NS, ON_CPU_NS, Shape},
    windows::{WindowFilter, WindowSource},
};

const SECOND: i64 = 1_000_000_000;
/// A fixed, recent-looking start (2026-01-01T00:00:00Z), aligned to every tier.
const T0: i64 = 1_767_225_600;

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn clickhouse_url() -> String {
    std::env::var("STALLSCOPE_CLICKHOUSE_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:18123".to_owned())
}

fn retention() -> Retention {
    Retention {
        tiers: vec![
            Tier {
                resolution: Duration::from_secs(10),
                keep: Duration::from_secs(3600),
            },
            Tier {
                resolution: Duration::from_secs(60),
                keep: Duration::from_secs(6 * 3600),
            },
        ],
    }
}

fn sqlite_dir() -> PathBuf {
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "stallscope-storage-{}-{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn sqlite() -> SqliteStore {
    SqliteStore::open(&sqlite_dir(), retention()).expect("open SQLite")
}

async fn clickhouse() -> Option<ClickHouseStore> {
    clickhouse_named(&format!(
        "stallscope_test_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    ))
    .await
}

async fn clickhouse_named(database: &str) -> Option<ClickHouseStore> {
    match ClickHouseStore::connect(&clickhouse_url(), database, retention()).await {
        Ok(store) => Some(store),
        Err(err) => {
            assert!(
                !in_ci(),
                "ClickHouse at {} is unreachable and CI=true forbids skipping: {err}",
                clickhouse_url()
            );
            eprintln!(
                "skipping the ClickHouse run: {err} (start one with `cargo xtask clickhouse start`)"
            );
            None
        }
    }
}

fn batch(agent: &str, sequence: u64, start_s: i64, shape: Shape) -> NormalizedBatch {
    let wire = synthetic::batch(
        agent,
        "host-a",
        sequence,
        start_s * SECOND,
        10 * SECOND,
        shape,
    );
    normalize(agent, sequence, wire, &BatchLimits::default()).expect("synthetic batch is valid")
}

fn range(from_s: i64, until_s: i64) -> TimeRange {
    TimeRange {
        from_unix_ns: from_s * SECOND,
        until_unix_ns: until_s * SECOND,
    }
}

fn column_total(profile: &stallscope_profile::Profile, kind: &str) -> i64 {
    let index = profile
        .sample_types
        .iter()
        .position(|t| t.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} in {:?}", profile.sample_types));
    profile.total(index)
}

/// The whole suite against one backend.
async fn suite<S: Storage>(store: &S) {
    let shape = Shape::default();
    let per_batch = i64::try_from(shape.samples_per_signal()).expect("small");
    // Ten batches, 10 s apart, from one agent; a replay of three of them.
    for sequence in 0..10_u64 {
        let outcome = store
            .store(batch("agent-1", sequence, T0 + 10 * sequence as i64, shape))
            .await
            .expect("store");
        assert_eq!(outcome, StoreOutcome::Stored, "batch {sequence}");
    }
    for sequence in [0_u64, 4, 9] {
        assert!(store.is_stored("agent-1", sequence).await.expect("check"));
        let outcome = store
            .store(batch("agent-1", sequence, T0 + 10 * sequence as i64, shape))
            .await
            .expect("replay");
        assert_eq!(
            outcome,
            StoreOutcome::Duplicate,
            "replayed batch {sequence}"
        );
    }
    assert!(!store.is_stored("agent-1", 10).await.expect("check"));
    // Another agent, same sequence numbers: not a duplicate.
    assert_eq!(
        store
            .store(batch("agent-2", 0, T0, shape))
            .await
            .expect("store"),
        StoreOutcome::Stored
    );

    // Merged profile: every sample exactly once.
    let whole = range(T0 - 60, T0 + 3600);
    let profile = store
        .profile(whole, Filter::default())
        .await
        .expect("profile");
    assert_eq!(
        column_total(&profile, "off_cpu"),
        11 * per_batch * OFF_CPU_NS
    );
    assert_eq!(column_total(&profile, "on_cpu"), 11 * per_batch * ON_CPU_NS);
    assert_eq!(column_total(&profile, "on_cpu_samples"), 11 * per_batch * 2);
    assert_eq!(profile.meta.losses.get("map_full"), Some(&11));
    assert!(
        profile.frames.iter().any(|f| f.function == "svc1::f2_7"),
        "frames come back from the stack dictionary"
    );

    // Filters: service (falls back to process), pid, signal (any spelling), label.
    let service = Filter {
        service: Some("svc-1".into()),
        ..Filter::default()
    };
    let profile = store.profile(whole, service).await.expect("profile");
    assert_eq!(
        column_total(&profile, "off_cpu"),
        11 * per_batch / 2 * OFF_CPU_NS
    );
    assert!(
        profile
            .samples
            .iter()
            .all(|s| s.labels.get("process").map(String::as_str) == Some("svc-1"))
    );
    let signal = Filter {
        signal: Some("off_cpu".into()),
        pid: Some("1000".into()),
        ..Filter::default()
    };
    let profile = store.profile(whole, signal).await.expect("profile");
    assert_eq!(
        column_total(&profile, "off_cpu"),
        11 * per_batch / 2 * OFF_CPU_NS
    );
    assert_eq!(column_total(&profile, "on_cpu"), 0);
    let label = Filter {
        labels: vec![("tid".into(), "101001".into())],
        ..Filter::default()
    };
    let profile = store.profile(whole, label).await.expect("profile");
    assert_eq!(
        column_total(&profile, "off_cpu_events"),
        11 * i64::from(shape.stacks_per_thread)
    );
    let none = Filter {
        host: Some("nowhere".into()),
        ..Filter::default()
    };
    assert!(
        store
            .profile(whole, none)
            .await
            .expect("profile")
            .samples
            .is_empty()
    );

    // Time ranges select buckets: the first 50 s hold batches 0-4 of agent-1 and agent-2's.
    let early = store
        .profile(range(T0, T0 + 50), Filter::default())
        .await
        .expect("profile");
    assert_eq!(column_total(&early, "off_cpu"), 6 * per_batch * OFF_CPU_NS);

    // Totals over time per signal, 20 s steps.
    let lines = store
        .series(range(T0, T0 + 100), Filter::default(), GroupBy::Signal, 20)
        .await
        .expect("series");
    let keys: Vec<&str> = lines.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(keys, ["off-cpu", "on-cpu"]);
    let off = &lines[0];
    assert_eq!(off.value_unit, "nanoseconds");
    assert_eq!(off.points.len(), 5);
    assert_eq!(
        off.points[0],
        (T0, 3 * per_batch * OFF_CPU_NS, 3 * per_batch)
    );
    assert_eq!(
        off.points.iter().map(|p| p.1).sum::<i64>(),
        11 * per_batch * OFF_CPU_NS
    );
    let by_cause = store
        .series(range(T0, T0 + 100), Filter::default(), GroupBy::Cause, 100)
        .await
        .expect("series");
    assert_eq!(by_cause.len(), 2, "without cause labels, signals stand in");

    // Targets and agents.
    let targets = store.targets(whole).await.expect("targets");
    assert_eq!(targets.len(), 2);
    assert_eq!(targets[0].service, "svc-0");
    assert_eq!(targets[0].signals, ["off-cpu", "on-cpu"]);
    assert_eq!(targets[0].first_unix_s, T0);
    assert_eq!(targets[0].last_unix_s, T0 + 90);
    // Wait (off-CPU) and CPU time in the range: half of every batch is svc-0's.
    assert_eq!(targets[0].wait_ns, 11 * per_batch / 2 * OFF_CPU_NS);
    assert_eq!(targets[0].cpu_ns, 11 * per_batch / 2 * ON_CPU_NS);
    let early_targets = store.targets(range(T0, T0 + 50)).await.expect("targets");
    assert_eq!(early_targets[0].wait_ns, 6 * per_batch / 2 * OFF_CPU_NS);
    let agents = store.agents().await.expect("agents");
    assert_eq!(agents.len(), 2);
    assert_eq!(
        (
            agents[0].agent.as_str(),
            agents[0].batches,
            agents[0].first_sequence,
            agents[0].last_sequence
        ),
        ("agent-1", 10, 0, 9)
    );

    // Retention: after 1 h rows merge into 1-minute buckets, totals unchanged; after
    // 6 h they are gone.
    let before = store
        .profile(whole, Filter::default())
        .await
        .expect("profile");
    let report = store.maintain(T0 + 3600 + 120).await.expect("maintain");
    assert!(report.rows_downsampled > 0, "{report:?}");
    let after = store
        .profile(whole, Filter::default())
        .await
        .expect("profile");
    assert_eq!(
        column_total(&after, "off_cpu"),
        column_total(&before, "off_cpu")
    );
    assert_eq!(
        column_total(&after, "on_cpu_samples"),
        column_total(&before, "on_cpu_samples")
    );
    let lines = store
        .series(range(T0, T0 + 120), Filter::default(), GroupBy::Signal, 10)
        .await
        .expect("series");
    assert!(
        lines[0].points.iter().all(|p| p.0 % 60 == 0),
        "downsampled to minutes: {:?}",
        lines[0].points
    );
    store
        .maintain(T0 + 7 * 3600 + 86_400)
        .await
        .expect("maintain");
    let gone = store
        .profile(whole, Filter::default())
        .await
        .expect("profile");
    assert_eq!(gone.samples.len(), 0, "data past the last tier is deleted");
}

/// Long ranges: whole hours may be answered from a coarser tier (SQLite's hourly rollup)
/// and the edges from the 10 s rows; batches that arrive after their hour was rolled up
/// still count exactly once.
async fn long_range_suite<S: Storage>(store: &S) {
    let shape = Shape::default();
    let per_batch = i64::try_from(shape.samples_per_signal()).expect("small");
    // Eighteen batches 10 min apart: three hours.
    for sequence in 0..18_u64 {
        let start = T0 + 600 * sequence as i64;
        store
            .store(batch("agent-r", sequence, start, shape))
            .await
            .expect("store");
    }
    let off_cpu = |profile: &stallscope_profile::Profile| column_total(profile, "off_cpu");
    let batches = |n: i64| n * per_batch * OFF_CPU_NS;
    store.maintain(T0 + 3 * 3600 + 30).await.expect("maintain");
    // Late: its hour (T0 + 2 h) was complete when maintenance ran.
    let late = T0 + 2 * 3600 + 1510;
    assert_eq!(
        store
            .store(batch("agent-r", 100, late, shape))
            .await
            .expect("late batch"),
        StoreOutcome::Stored
    );
    assert_eq!(
        store
            .store(batch("agent-r", 100, late, shape))
            .await
            .expect("replayed late batch"),
        StoreOutcome::Duplicate
    );
    for round in 0..2 {
        let whole = store
            .profile(range(T0 - 3600, T0 + 4 * 3600), Filter::default())
            .await
            .expect("profile");
        assert_eq!(off_cpu(&whole), batches(19), "round {round}: whole range");
        // Partial hours at both edges: batches 2..=14 and the late one.
        let edges = store
            .profile(range(T0 + 900, T0 + 2 * 3600 + 1560), Filter::default())
            .await
            .expect("profile");
        assert_eq!(off_cpu(&edges), batches(14), "round {round}: edges");
        // Targets' wait time reads the same parts (rollup hours and 10 s edges).
        let wait: i64 = store
            .targets(range(T0 + 900, T0 + 2 * 3600 + 1560))
            .await
            .expect("targets")
            .iter()
            .map(|t| t.wait_ns)
            .sum();
        assert_eq!(wait, batches(14), "round {round}: targets' wait time");
        let hour = store
            .profile(range(T0 + 3600, T0 + 2 * 3600), Filter::default())
            .await
            .expect("profile");
        assert_eq!(off_cpu(&hour), batches(6), "round {round}: one hour");
        let service = store
            .profile(
                range(T0 - 3600, T0 + 4 * 3600),
                Filter {
                    service: Some("svc-1".into()),
                    ..Filter::default()
                },
            )
            .await
            .expect("profile");
        assert_eq!(off_cpu(&service), batches(19) / 2, "round {round}: service");
        // Then everything is downsampled to minutes (the late batch moves within its
        // hour) and more hours are complete.
        store.maintain(T0 + 5 * 3600).await.expect("maintain again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_long_ranges_count_once() {
    let store = sqlite();
    long_range_suite(&store).await;
    // Deleting up to a cutoff inside an hour: that hour's rollup no longer holds, so the
    // rows left in it must come from the 10 s tier. Keep is 6 h, so this deletes rows
    // before T0 + 1 h 45 min: batches 0..=10.
    store
        .maintain(T0 + 7 * 3600 + 2700)
        .await
        .expect("maintain");
    let left = store
        .profile(range(T0 - 3600, T0 + 4 * 3600), Filter::default())
        .await
        .expect("profile");
    let per_batch = i64::try_from(Shape::default().samples_per_signal()).expect("small");
    assert_eq!(column_total(&left, "off_cpu"), 8 * per_batch * OFF_CPU_NS);
    let partial = store
        .profile(range(T0 + 3600, T0 + 2 * 3600), Filter::default())
        .await
        .expect("profile");
    assert_eq!(column_total(&partial, "off_cpu"), per_batch * OFF_CPU_NS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_long_ranges_count_once() {
    let Some(store) = clickhouse().await else {
        return;
    };
    long_range_suite(&store).await;
    store.drop_database().await.expect("drop test database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_backend_passes_the_suite() {
    suite(&sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_windows_keep_the_latest_version() {
    windows::suite(&sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_windows_keep_the_latest_version() {
    let Some(store) = clickhouse().await else {
        return;
    };
    windows::suite(&store).await;
    store.drop_database().await.expect("drop test database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_change_events_are_stored_once() {
    events::suite(&sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_change_events_are_stored_once() {
    let Some(store) = clickhouse().await else {
        return;
    };
    events::suite(&store).await;
    store.drop_database().await.expect("drop test database");
}

/// Two collector replicas on one ClickHouse database derive the same window and both
/// write it, at once, in several versions: one window, the latest version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_replicas_writing_one_window_store_one() {
    let name = format!(
        "stallscope_test_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    );
    let (Some(first), Some(second)) =
        (clickhouse_named(&name).await, clickhouse_named(&name).await)
    else {
        return;
    };
    let mut versions = Vec::new();
    for version in 1..=4_i64 {
        let mut window = windows::window("auto-shared", WindowSource::Automatic, "checkout", T0);
        window.updated_unix_ns = version;
        window.end_unix_ns = (version == 4).then_some((T0 + 90) * SECOND);
        versions.push(window);
    }
    let mut writes = Vec::new();
    for window in &versions {
        for store in [&first, &second] {
            let (store, window) = (store.clone(), window.clone());
            writes.push(tokio::spawn(
                async move { store.upsert_window(window).await },
            ));
        }
    }
    for write in writes {
        write.await.expect("task").expect("upsert");
    }
    for store in [&first, &second] {
        let listed = store
            .windows(range(T0 - 60, T0 + 3600), WindowFilter::default())
            .await
            .expect("list");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0], versions[3]);
        assert!(store.open_windows(None).await.expect("open").is_empty());
    }
    first.drop_database().await.expect("drop test database");
}

/// A collector that crashed after writing a batch's rows but before its marker: the
/// replay must not double count (ClickHouse has no transaction to roll the rows back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_replay_after_partial_store_counts_once() {
    let Some(store) = clickhouse().await else {
        return;
    };
    let shape = Shape::default();
    let per_batch = i64::try_from(shape.samples_per_signal()).expect("small");
    store
        .store_rows_without_marker(&batch("agent-1", 0, T0, shape))
        .await
        .expect("partial store");
    assert!(!store.is_stored("agent-1", 0).await.expect("check"));
    assert_eq!(
        store
            .store(batch("agent-1", 0, T0, shape))
            .await
            .expect("replay"),
        StoreOutcome::Stored
    );
    // A second replica storing the same batch concurrently.
    store
        .store_rows_without_marker(&batch("agent-1", 0, T0, shape))
        .await
        .expect("second replica");
    let profile = store
        .profile(range(T0 - 60, T0 + 60), Filter::default())
        .await
        .expect("profile");
    assert_eq!(column_total(&profile, "off_cpu"), per_batch * OFF_CPU_NS);
    store.drop_database().await.expect("drop test database");
}

/// Duplicates whose writes were not recorded in `row_writes` still count once: a batch
/// with a marker but no recorded write (as an old replica leaves during a rolling
/// upgrade), and rows that were stored before `row_writes` existed (`legacy_rows`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_unrecorded_duplicates_count_once() {
    let database = format!(
        "stallscope_test_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    );
    let Some(store) = clickhouse_named(&database).await else {
        return;
    };
    let raw = clickhouse::Client::default()
        .with_url(clickhouse_url())
        .with_validation(false)
        .with_database(&database);
    let sql = |statement: &'static str| {
        let raw = raw.clone();
        async move { raw.query(statement).execute().await.expect(statement) }
    };
    let shape = Shape::default();
    let per_batch = i64::try_from(shape.samples_per_signal()).expect("small") * OFF_CPU_NS;
    let off_cpu_in = |store: &ClickHouseStore, from: i64| {
        let store = store.clone();
        async move {
            let profile = store
                .profile(range(from - 60, from + 60), Filter::default())
                .await
                .expect("profile");
            column_total(&profile, "off_cpu")
        }
    };

    // Written twice and acknowledged, then the record of its writes is lost.
    store
        .store_rows_without_marker(&batch("agent-1", 0, T0, shape))
        .await
        .expect("partial store");
    store
        .store(batch("agent-1", 0, T0, shape))
        .await
        .expect("replay");
    sql("TRUNCATE TABLE row_writes").await;
    assert_eq!(
        off_cpu_in(&store, T0).await,
        per_batch,
        "marker without a record"
    );
    // A batch stored once, its write recorded: read without FINAL, counted once.
    store
        .store(batch("agent-1", 1, T0 + 600, shape))
        .await
        .expect("store");
    assert_eq!(
        off_cpu_in(&store, T0 + 600).await,
        per_batch,
        "recorded once"
    );

    // Rows written twice and never acknowledged, by a version without `row_writes`.
    store
        .store_rows_without_marker(&batch("agent-1", 2, T0 + 1200, shape))
        .await
        .expect("partial store");
    store
        .store_rows_without_marker(&batch("agent-1", 2, T0 + 1200, shape))
        .await
        .expect("second partial store");
    sql("DROP TABLE row_writes").await;
    sql("DROP TABLE legacy_rows").await;
    let upgraded = clickhouse_named(&database).await.expect("reconnect");
    assert_eq!(
        off_cpu_in(&upgraded, T0 + 1200).await,
        per_batch,
        "rows stored before row_writes existed"
    );
    upgraded.drop_database().await.expect("drop test database");
}

/// A data directory of an older layout (one row per sample, before the file carried a
/// version) is refused with one line saying what to do, never misread; one of this
/// layout opens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refuses_a_data_dir_of_another_layout() {
    let old = sqlite_dir();
    std::fs::create_dir_all(&old).expect("data dir");
    rusqlite::Connection::open(old.join("stallscope.db"))
        .and_then(|conn| {
            conn.execute_batch(
                "CREATE TABLE samples (
                    svc INTEGER NOT NULL, ts INTEGER NOT NULL, series INTEGER NOT NULL,
                    stack INTEGER NOT NULL, value INTEGER NOT NULL, count INTEGER NOT NULL,
                    PRIMARY KEY (svc, ts, series, stack)) WITHOUT ROWID;",
            )
        })
        .expect("an old-layout file");
    let Err(err) = SqliteStore::open(&old, retention()) else {
        panic!("a data directory of the old layout was opened");
    };
    let text = err.to_string();
    assert!(
        text.contains("layout version 0") && text.contains("move the data directory aside"),
        "{text}"
    );
    assert!(!text.contains('\n'), "one line: {text}");

    let current = sqlite_dir();
    let store = SqliteStore::open(&current, retention()).expect("open");
    store
        .store(batch("agent-1", 0, T0, Shape::default()))
        .await
        .expect("store");
    drop(store);
    let reopened = SqliteStore::open(&current, retention()).expect("reopen");
    assert!(reopened.is_stored("agent-1", 0).await.expect("check"));
}
