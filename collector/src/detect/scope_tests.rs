//! The detector on synthetic series: a service with a request path (CPU, two downstream
//! peers, a mutex, a disk, the run queue), idle waits (readers waiting for requests, a
//! parked pool), a background thread that sleeps and one that burns a little CPU, and
//! bucket-to-bucket noise (request counts and per-event waits vary like real ones). One
//! parameter at a time is degraded for a minute from a time inside a bucket; the truth is
//! known to the nanosecond.

use stallscope_profile::Labels;

use super::{
    indicators::observe,
    scope::{CloseReason, Crossed, Event, OpenWindow, ScopeDetector},
    settings::DetectSettings,
};
use crate::{explain::stats::SplitMix64, storage::SeriesTotals};

const NS: i64 = 1_000_000_000;
const MS: f64 = 1e6;
/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600;
const STEP: i64 = 10;

/// What one request costs, and how many arrive.
#[derive(Debug, Clone, Copy)]
struct Service {
    requests_per_s: f64,
    cpu_ms: f64,
    pricing_ms: f64,
    shipping_ms: f64,
    /// Contended lock waits per request, and their length.
    lock_waits: f64,
    lock_ms: f64,
    /// Disk writes per request, and their latency.
    disk_ios: f64,
    disk_ms: f64,
    /// Run-queue latency per wakeup (three wakeups per request).
    runqueue_ms: f64,
}

const HEALTHY: Service = Service {
    requests_per_s: 200.0,
    cpu_ms: 0.4,
    pricing_ms: 2.0,
    shipping_ms: 1.0,
    lock_waits: 0.05,
    lock_ms: 0.05,
    disk_ios: 0.5,
    disk_ms: 0.3,
    runqueue_ms: 0.03,
};

struct Noise {
    rng: SplitMix64,
}

impl Noise {
    fn new(seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
        }
    }

    fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-12);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `count` events of mean `mean_ns` each, with the per-event spread of real waits
    /// (coefficient of variation 1): their sum varies by 1/sqrt(count).
    fn total(&mut self, count: f64, mean_ns: f64) -> f64 {
        if count <= 0.0 {
            return 0.0;
        }
        (count * mean_ns * (1.0 + self.normal() / count.sqrt())).max(0.0)
    }
}

fn series(
    signal: &str,
    cause: &str,
    labels: &[(&str, &str)],
    bucket: i64,
    value: f64,
    count: f64,
) -> SeriesTotals {
    SeriesTotals {
        host: "host-a".into(),
        service: "shop".into(),
        signal: signal.into(),
        cause: cause.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<Labels>(),
        points: vec![(bucket, value.round() as i64, count.round() as i64)],
    }
}

/// The series of one bucket in which a fraction `degraded_share` of the time ran as
/// `degraded` and the rest as `healthy`.
fn bucket_series(
    noise: &mut Noise,
    bucket: i64,
    healthy: Service,
    degraded: Service,
    degraded_share: f64,
) -> Vec<SeriesTotals> {
    let mut out = Vec::new();
    let step = STEP as f64;
    let mut busy_cpu = 0.0;
    for (service, share) in [(healthy, 1.0 - degraded_share), (degraded, degraded_share)] {
        if share <= 0.0 {
            continue;
        }
        let seconds = step * share;
        let expected = service.requests_per_s * seconds;
        let requests = (expected + noise.normal() * expected.sqrt())
            .max(0.0)
            .round();
        let cpu = noise.total(requests, service.cpu_ms * MS);
        busy_cpu += cpu;
        out.push(series(
            "on-cpu",
            "cpu-work",
            &[],
            bucket,
            cpu,
            cpu / 10.0 / MS,
        ));
        for (peer, ms) in [
            ("10.0.0.2:7001", service.pricing_ms),
            ("10.0.0.3:7002", service.shipping_ms),
        ] {
            let wait = noise.total(requests, ms * MS);
            out.push(series(
                "socket-wait",
                "network",
                &[("direction", "client"), ("peer", peer), ("op", "receive")],
                bucket,
                wait,
                requests,
            ));
            out.push(series("off-cpu", "network", &[], bucket, wait, requests));
        }
        let wakeups = 3.0 * requests;
        let runqueue = noise.total(wakeups, service.runqueue_ms * MS);
        out.push(series(
            "runqueue",
            "",
            &[("kind", "woken")],
            bucket,
            runqueue,
            wakeups,
        ));
        out.push(series(
            "off-cpu",
            "cpu-contention",
            &[],
            bucket,
            runqueue,
            wakeups,
        ));
        let waits = (service.lock_waits * requests).round();
        let lock = noise.total(waits, service.lock_ms * MS);
        out.push(series(
            "lock",
            "lock",
            &[
                ("lock_kind", "futex"),
                ("lock", "0x1000"),
                ("lock_wait", "contention"),
            ],
            bucket,
            lock,
            waits,
        ));
        out.push(series("off-cpu", "lock", &[], bucket, lock, waits));
        let ios = (service.disk_ios * requests).round();
        let disk = noise.total(ios, service.disk_ms * MS);
        out.push(series(
            "disk",
            "",
            &[("device", "loop7"), ("op", "write")],
            bucket,
            disk,
            ios,
        ));
        out.push(series("off-cpu", "disk", &[], bucket, disk, ios));
        // Workers park between requests (idle), readers wait for the next request.
        out.push(series(
            "off-cpu",
            "other",
            &[("evidence", crate::explain::categories::IDLE_FUTEX_EVIDENCE)],
            bucket,
            32.0 * seconds * 1e9 * 0.9,
            requests,
        ));
        out.push(series(
            "socket-wait",
            "network",
            &[
                ("direction", "server"),
                ("peer", "10.0.0.9"),
                ("op", "receive"),
            ],
            bucket,
            8.0 * seconds * 1e9 * 0.95,
            requests,
        ));
    }
    // A background thread sleeping all the time, one burning 5 ms of CPU a second.
    out.push(series("off-cpu", "other", &[], bucket, step * 1e9, step));
    let background = noise.total(step * 10.0, 0.5 * MS);
    out.push(series(
        "on-cpu",
        "cpu-work",
        &[],
        bucket,
        background,
        background / 10.0 / MS,
    ));
    let _ = busy_cpu;
    out
}

/// A run: `buckets` buckets from `T0`, each with the service `at(time)` returns for the
/// degraded part and the share of the bucket's data time that ran degraded.
struct Run {
    events: Vec<(i64, Event)>,
}

fn run(
    detector: &mut ScopeDetector,
    settings: &DetectSettings,
    seed: u64,
    buckets: std::ops::Range<i64>,
    degraded: Service,
    fault: (f64, f64),
    healthy: Service,
) -> Run {
    run_from(
        detector, settings, seed, buckets, 0, degraded, fault, healthy,
    )
}

/// [`run`], with the detector seeing only the buckets from index `first_seen` on (it
/// started later; the data before is generated all the same).
#[expect(
    clippy::too_many_arguments,
    reason = "a test helper with a line per knob"
)]
fn run_from(
    detector: &mut ScopeDetector,
    settings: &DetectSettings,
    seed: u64,
    buckets: std::ops::Range<i64>,
    first_seen: i64,
    degraded: Service,
    fault: (f64, f64),
    healthy: Service,
) -> Run {
    let mut noise = Noise::new(seed);
    let mut events = Vec::new();
    for index in buckets {
        let bucket = T0 + index * STEP;
        // The share of [bucket, bucket + STEP) inside the fault (Unix seconds, floats).
        let (from, until) = (bucket as f64, (bucket + STEP) as f64);
        let overlap = (fault.1.min(until) - fault.0.max(from)).max(0.0) / STEP as f64;
        let data = bucket_series(&mut noise, bucket, healthy, degraded, overlap);
        if index < first_seen {
            continue;
        }
        let observed = observe(&data, STEP, settings).remove(&bucket);
        for event in detector.process(bucket, observed, settings) {
            events.push((bucket, event));
        }
    }
    Run { events }
}

fn opened(run: &Run) -> Vec<&OpenWindow> {
    run.events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Opened(w) => Some(w),
            _ => None,
        })
        .collect()
}

fn closed(run: &Run) -> Vec<(&OpenWindow, i64, CloseReason)> {
    run.events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Closed {
                window,
                end_unix_ns,
                reason,
            } => Some((window, *end_unix_ns, *reason)),
            _ => None,
        })
        .collect()
}

/// The fault's times: healthy for an hour, then degraded for 60 s from 3.5 s into a
/// bucket.
fn fault_times() -> (f64, f64) {
    let onset = (T0 + 360 * STEP) as f64 + 3.5;
    (onset, onset + 60.0)
}

fn degrade(what: &str) -> Service {
    let mut s = HEALTHY;
    match what {
        "slow-peer" => s.shipping_ms = 12.0,
        "lock" => {
            s.lock_waits = 0.6;
            s.lock_ms = 8.0;
        }
        "cpu-contention" => s.runqueue_ms = 2.0,
        "disk" => s.disk_ms = 15.0,
        "cpu-work" => s.cpu_ms = 1.2,
        _ => {}
    }
    s
}

#[test]
fn a_step_change_opens_one_window_with_onset_and_end_near_the_truth() {
    let settings = DetectSettings::default();
    for (seed, cause) in ["slow-peer", "lock", "cpu-contention", "disk", "cpu-work"]
        .into_iter()
        .enumerate()
    {
        let mut detector = ScopeDetector::new("host-a", "shop", STEP);
        let fault = fault_times();
        let result = run(
            &mut detector,
            &settings,
            seed as u64 + 1,
            0..420,
            degrade(cause),
            fault,
            HEALTHY,
        );
        let opened = opened(&result);
        assert_eq!(opened.len(), 1, "{cause}: {:?}", result.events);
        let window = opened[0];
        let onset_error = (window.onset_unix_ns as f64 / NS as f64 - fault.0).abs();
        assert!(
            onset_error <= 10.0,
            "{cause}: onset off by {onset_error:.1} s"
        );
        let opened_at = result
            .events
            .iter()
            .find(|(_, e)| matches!(e, Event::Opened(_)))
            .map_or(0, |(b, _)| *b + STEP);
        let delay = opened_at as f64 - fault.0;
        assert!(
            delay <= 50.0,
            "{cause}: opened {delay:.1} s after the onset"
        );
        let closed = closed(&result);
        assert_eq!(closed.len(), 1, "{cause}");
        let (_, end, reason) = closed[0];
        assert_eq!(reason, CloseReason::Recovered);
        let end_error = (end as f64 / NS as f64 - fault.1).abs();
        assert!(end_error <= 10.0, "{cause}: end off by {end_error:.1} s");
        let names: Vec<String> = window.crossed.iter().map(|c| c.key.to_string()).collect();
        println!(
            "{cause}: opened {delay:.1} s after the onset, onset error {onset_error:.1} s, end error {end_error:.1} s, crossed {names:?}"
        );
        let expected = match cause {
            "slow-peer" => "socket-wait-per-op:10.0.0.3:7002",
            "lock" => "lock-per-wait",
            "cpu-contention" => "runqueue-per-wakeup",
            "disk" => "disk-per-io:loop7",
            _ => "cpu-per-client-op",
        };
        assert!(
            names.iter().any(|n| n == expected),
            "{cause}: crossed {names:?}"
        );
        for crossed in &window.crossed {
            assert!(crossed.observed > crossed.baseline && crossed.score >= settings.z_open);
        }
    }
}

#[test]
fn a_load_doubling_or_halving_opens_nothing() {
    let settings = DetectSettings::default();
    for (seed, factor) in [(11, 2.0), (12, 0.5)] {
        let mut more = HEALTHY;
        more.requests_per_s *= factor;
        let mut detector = ScopeDetector::new("host-a", "shop", STEP);
        // An hour at the old load, then 30 minutes at the new one.
        let onset = (T0 + 360 * STEP) as f64 + 3.5;
        let result = run(
            &mut detector,
            &settings,
            seed,
            0..540,
            more,
            (onset, f64::MAX),
            HEALTHY,
        );
        assert!(result.events.is_empty(), "x{factor}: {:?}", result.events);
    }
}

#[test]
fn hours_of_noise_open_nothing() {
    let settings = DetectSettings::default();
    for seed in 20..23 {
        let mut detector = ScopeDetector::new("host-a", "shop", STEP);
        // Six hours.
        let result = run(
            &mut detector,
            &settings,
            seed,
            0..2160,
            HEALTHY,
            (0.0, 0.0),
            HEALTHY,
        );
        assert!(result.events.is_empty(), "seed {seed}: {:?}", result.events);
    }
}

#[test]
fn a_restarted_detector_resumes_the_open_window_without_a_second_one() {
    let settings = DetectSettings::default();
    let fault = fault_times();
    let slow = degrade("slow-peer");
    // The first collector runs until two buckets after its window opened, then dies.
    let mut first = ScopeDetector::new("host-a", "shop", STEP);
    let before = run(&mut first, &settings, 7, 0..368, slow, fault, HEALTHY);
    let opened_first = opened(&before);
    assert_eq!(opened_first.len(), 1);
    let stored = opened_first[0].clone();
    // The new one reads the open window back (id, onset, crossed indicators as stored),
    // replays the stored history, then goes on live.
    let mut second = ScopeDetector::new("host-a", "shop", STEP);
    second.resume(OpenWindow::resumed(
        stored.id.clone(),
        stored.onset_unix_ns,
        stored.onset_bucket,
        stored
            .crossed
            .iter()
            .map(|c| Crossed::restored(c.key.clone(), c.baseline, c.observed, c.score))
            .collect(),
    ));
    let after = run(&mut second, &settings, 7, 0..420, slow, fault, HEALTHY);
    assert!(opened(&after).is_empty(), "{:?}", after.events);
    let closed_second = closed(&after);
    assert_eq!(closed_second.len(), 1);
    assert_eq!(closed_second[0].0.id, stored.id);
    // The uninterrupted detector ends the window where the resumed one does.
    let mut whole = ScopeDetector::new("host-a", "shop", STEP);
    let uninterrupted = run(&mut whole, &settings, 7, 0..420, slow, fault, HEALTHY);
    let difference = (closed(&uninterrupted)[0].1 - closed_second[0].1).abs();
    assert!(difference < NS / 10, "ends differ by {difference} ns");
}

#[test]
fn a_replica_started_hours_later_finds_the_same_window() {
    let settings = DetectSettings::default();
    // Four hours healthy, then the lock for a minute.
    let onset = (T0 + 1440 * STEP) as f64 + 6.0;
    let fault = (onset, onset + 60.0);
    let lock = degrade("lock");
    let mut a = ScopeDetector::new("host-a", "shop", STEP);
    let mut b = ScopeDetector::new("host-a", "shop", STEP);
    let run_a = run(&mut a, &settings, 3, 0..1500, lock, fault, HEALTHY);
    // The second replica started 2.5 hours in; it read the last two hours back from
    // storage (the same buckets) and reached the same baselines on the same grid.
    let run_b = run_from(
        &mut b,
        &settings,
        3,
        0..1500,
        900 - 720,
        lock,
        fault,
        HEALTHY,
    );
    let (opened_a, opened_b) = (opened(&run_a), opened(&run_b));
    assert_eq!(opened_a.len(), 1, "{:?}", run_a.events);
    assert_eq!(opened_a, opened_b);
    assert_eq!(closed(&run_a), closed(&run_b));
}
