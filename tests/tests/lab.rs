//! End to end, as root: the scenario lab at CI scale (2 s batches). One lab runs a
//! healthy stretch, the healthy control, each of the six injections and the
//! load-doubling control, with a recovery after each, and checks through the collector's
//! query API that every injection shows in stallscope's data in its window and not
//! before, in the amount that was injected (or that the demo service measured itself),
//! and that the load generator saw the service degrade (or, for the controls, not).
//!
//! Windows are read as stored buckets: "during" holds the batches that started after the
//! onset and ended before the end, "before" the three batches that ended before the
//! onset. Amounts are compared per request, so they do not depend on how many batches a
//! window holds: the service asks the pricing peer once per request, and the number of
//! its receive waits on pricing is the number of requests the agent saw in the window.
//!
//! `STALLSCOPE_LAB_SEED` picks other fault parameters; `STALLSCOPE_LAB_BIN_DIR` runs
//! other builds (e.g. `target/release`) of the agent, collector and demo.

use std::{fmt::Write as _, time::Duration};

use stallscope_proto::v1;
use stallscope_tests::{
    lab::{
        CHECKOUT_SHARE, DemoMutex, DemoPeer, Fault, FaultClass, Injection, Lab, LabConfig,
        LoadSecond, LoadSummary, Object, Query, SERVICE, Scale, Window, random_fault,
    },
    require_root,
};

/// The timeline at CI scale: about 3.5 minutes with start-up.
const HEALTHY: Duration = Duration::from_secs(20);
const INJECT: Duration = Duration::from_secs(10);
const RECOVER: Duration = Duration::from_secs(12);

/// Rows of measured against expected, and the failed ones.
#[derive(Default)]
struct Checks {
    table: String,
    failures: Vec<String>,
}

impl Checks {
    fn row(&mut self, class: FaultClass, what: &str, measured: &str, expected: &str, ok: bool) {
        let _ = writeln!(
            self.table,
            "{:<14} {:<46} {:>24} {:>30} {}",
            class.name(),
            what,
            measured,
            expected,
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            self.failures.push(format!(
                "{class}: {what}: measured {measured}, expected {expected}"
            ));
        }
    }
}

fn ms(ns: f64) -> String {
    format!("{:.2} ms", ns / 1e6)
}

fn within(value: f64, reference: f64, low: f64, high: f64) -> bool {
    reference > 0.0 && value >= reference * low && value <= reference * high
}

fn label_is(sample: &stallscope_profile::Sample, key: &str, value: &str) -> bool {
    sample.labels.get(key).is_some_and(|v| v == value)
}

/// The stored batches around an injection, and how many requests each saw.
struct Around {
    before: Window,
    during: Window,
    requests_before: f64,
    requests_during: f64,
}

impl Around {
    fn read(query: &mut Query, injection: &Injection, batch: Duration, pricing: &str) -> Self {
        let b = batch.as_nanos() as i64;
        let (start, end) = (injection.start_unix_ns, injection.end_unix_ns);
        let before = query
            .window(start - 5 * b, start - 2 * b + 1, v1::Filter::default())
            .expect("before");
        let during = query
            .window(start, end - 2 * b + 1, v1::Filter::default())
            .expect("during");
        let (requests_before, requests_during) =
            (receives(&before, pricing), receives(&during, pricing));
        Self {
            before,
            during,
            requests_before,
            requests_during,
        }
    }

    /// `measure` of each window divided by its requests: (before, during).
    fn per_request(&self, measure: impl Fn(&Window) -> i64) -> (f64, f64) {
        (
            measure(&self.before) as f64 / self.requests_before.max(1.0),
            measure(&self.during) as f64 / self.requests_during.max(1.0),
        )
    }
}

/// The service's waits for replies from `peer`: one per request and peer.
fn receives(window: &Window, peer: &str) -> f64 {
    window.sum("socket_waits", |s| receive_from(s, peer)) as f64
}

fn receive_from(sample: &stallscope_profile::Sample, peer: &str) -> bool {
    label_is(sample, "service", SERVICE)
        && label_is(sample, "peer", peer)
        && label_is(sample, "direction", "client")
        && label_is(sample, "op", "receive")
}

/// Off-CPU time of the service in `cause` with `function` on the stack.
fn off_cpu_in(window: &Window, cause: &str, function: &str) -> i64 {
    window.sum("off_cpu", |s| {
        label_is(s, "service", SERVICE)
            && label_is(s, "cause", cause)
            && window
                .profile
                .stack_frames(s)
                .any(|f| f.function.ends_with(function))
    })
}

/// The mean latency a fault should add, from its parameters and the request mix
/// (`None` where there is no simple formula).
fn expected_mean_rise(fault: &Fault) -> Option<Duration> {
    match fault {
        Fault::Lock {
            mutex,
            hold,
            period,
        } => {
            let share = match mutex {
                DemoMutex::Inventory => CHECKOUT_SHARE,
                DemoMutex::Sessions => 1.0 - CHECKOUT_SHARE,
            };
            // A request that arrives during a hold waits for the rest of it.
            Some(hold.mul_f64(share * hold.as_secs_f64() / period.as_secs_f64() / 2.0))
        }
        Fault::SlowPeer { extra_delay, .. } => Some(*extra_delay),
        Fault::Disk { stall, period } => {
            Some(stall.mul_f64(CHECKOUT_SHARE * stall.as_secs_f64() / period.as_secs_f64() / 2.0))
        }
        Fault::Deploy { tax_table } => Some(tax_table.mul_f64(CHECKOUT_SHARE)),
        _ => None,
    }
}

/// What the load generator saw: the injection against the first healthy stretch.
fn check_load(
    checks: &mut Checks,
    injection: &Injection,
    load: &[LoadSecond],
    baseline: &LoadSummary,
) {
    let class = injection.class;
    let during = LoadSummary::of(load, injection.start_unix_ns, injection.end_unix_ns);
    let (mean_b, mean_d) = (baseline.mean_us() * 1e3, during.mean_us() * 1e3);
    let (p99_b, p99_d) = (baseline.p99_us() as f64 * 1e3, during.p99_us() as f64 * 1e3);
    let p99 = format!("{} -> {}", ms(p99_b), ms(p99_d));
    match (class, expected_mean_rise(&injection.fault)) {
        (FaultClass::Healthy | FaultClass::LoadDoubling, _) => {
            checks.row(
                class,
                "load: mean latency vs healthy",
                &format!("{} -> {}", ms(mean_b), ms(mean_d)),
                "< 1.3x + 1 ms",
                mean_d < 1.3 * mean_b + 1e6,
            );
            checks.row(
                class,
                "load: p99 vs healthy",
                &p99,
                "< 2x + 10 ms",
                p99_d < 2.0 * p99_b + 10e6,
            );
            if class == FaultClass::LoadDoubling {
                let (rate_b, rate_d) = (baseline.send_rate(), during.send_rate());
                checks.row(
                    class,
                    "load: requests sent per second",
                    &format!("{rate_b:.0} -> {rate_d:.0}"),
                    "2x +-5%",
                    within(rate_d, 2.0 * rate_b, 0.95, 1.05),
                );
                checks.row(
                    class,
                    "load: completed per sent",
                    &format!("{:.3}", during.completed as f64 / during.sent.max(1) as f64),
                    "0.98..1.02",
                    within(during.completed as f64, during.sent as f64, 0.98, 1.02),
                );
            }
        }
        (_, Some(rise)) => {
            let rise = rise.as_nanos() as f64;
            checks.row(
                class,
                "load: mean latency rise vs healthy",
                &ms(mean_d - mean_b),
                &format!(">= {} (half the injected)", ms(rise / 2.0)),
                mean_d - mean_b >= rise / 2.0,
            );
            checks.row(class, "load: p99 vs healthy", &p99, "higher", p99_d > p99_b);
        }
        (_, None) => {
            checks.row(
                class,
                "load: mean latency vs healthy",
                &format!("{} -> {}", ms(mean_b), ms(mean_d)),
                ">= 1.5x",
                mean_d >= 1.5 * mean_b,
            );
            checks.row(
                class,
                "load: p99 vs healthy",
                &p99,
                ">= 2x",
                p99_d >= 2.0 * p99_b,
            );
        }
    }
}

/// What stallscope stored about one injection, against what was injected.
fn check_stored(checks: &mut Checks, lab: &Lab, injection: &Injection, around: &Around) {
    let class = injection.class;
    let stats = &injection.service_stats;
    let own_per_request = |ns: u64| ns as f64 / stats.requests.max(1) as f64;
    match (&injection.fault, &injection.object) {
        (
            Fault::Lock { mutex, .. },
            Object::Mutex {
                address,
                waiter_function,
                ..
            },
        ) => {
            let (b, d) = around.per_request(|w| off_cpu_in(w, "lock", waiter_function));
            let own = own_per_request(stats.lock_wait_ns.get(mutex.name()).copied().unwrap_or(0));
            checks.row(
                class,
                &format!("lock wait in {waiter_function} per request"),
                &format!("{} -> {}", ms(b), ms(d)),
                &format!("{} (service's own), 0 before", ms(own)),
                within(d, own, 0.6, 1.3) && b < 0.05 * d,
            );
            let on_mutex = |w: &Window| {
                w.lock_wait_by_address(SERVICE, false)
                    .iter()
                    .filter(|(a, _)| address.contains(**a))
                    .map(|(_, ns)| ns)
                    .sum::<i64>()
            };
            let (b, d) = around.per_request(on_mutex);
            checks.row(
                class,
                &format!("lock signal: wait on {address} per request"),
                &format!("{} -> {}", ms(b), ms(d)),
                &format!("{} (service's own), < 5% before", ms(own)),
                within(d, own, 0.5, 1.3) && b < 0.05 * d,
            );
            let contended = around.during.lock_wait_by_address(SERVICE, true);
            let total: i64 = contended.values().sum();
            let share = on_mutex(&around.during) as f64 / total.max(1) as f64;
            checks.row(
                class,
                "lock signal: its share of contended waits",
                &format!("{:.0}% of {}", 100.0 * share, ms(total as f64)),
                ">= 80%",
                share >= 0.8,
            );
        }
        (Fault::SlowPeer { peer, extra_delay }, Object::Peer { address, .. }) => {
            let mean = |w: &Window, addr: &str| {
                w.sum("socket_wait", |s| receive_from(s, addr)) as f64 / receives(w, addr).max(1.0)
            };
            let grew = mean(&around.during, address) - mean(&around.before, address);
            checks.row(
                class,
                &format!("wait per reply from {address}: growth"),
                &ms(grew),
                &format!("{} (injected)", ms(extra_delay.as_nanos() as f64)),
                within(grew, extra_delay.as_nanos() as f64, 0.85, 1.2),
            );
            let other = lab.peer_address(
                DemoPeer::ALL
                    .into_iter()
                    .find(|p| p != peer)
                    .unwrap_or(*peer),
            );
            let other_grew = mean(&around.during, &other) - mean(&around.before, &other);
            checks.row(
                class,
                &format!("wait per reply from {other}: growth"),
                &ms(other_grew),
                "< 10% of the slow peer's",
                other_grew.abs() < 0.1 * grew,
            );
        }
        (Fault::CpuHog { threads }, Object::Process { name, .. }) => {
            let (b, d) = around.per_request(|w| w.cause_ns(SERVICE, "cpu-contention"));
            let own = own_per_request(stats.render_ns.saturating_sub(stats.render_cpu_ns));
            checks.row(
                class,
                "cpu-contention of the service per request",
                &format!("{} -> {}", ms(b), ms(d)),
                &format!(">= 3x, >= {} (render's own)", ms(own)),
                d >= 3.0 * b && d >= own,
            );
            let by_process = around.during.oncpu_by_process();
            let hog = by_process.get(name).copied().unwrap_or(0) as f64;
            let top = by_process
                .iter()
                .max_by_key(|(_, ns)| **ns)
                .map(|(p, _)| p.clone())
                .unwrap_or_default();
            // The window's length, from the requests the agent saw at the load's rate.
            let seconds = around.requests_during / lab.config().rate;
            let cpus = std::thread::available_parallelism()
                .map_or(1, usize::from)
                .min(*threads) as f64;
            let before = around
                .before
                .oncpu_by_process()
                .get(name)
                .copied()
                .unwrap_or(0);
            // The machine's other work takes its share too: at least 40% of what the hog's
            // threads could use, at most all of it.
            checks.row(
                class,
                &format!("{name} on-CPU in CPUs; top process"),
                &format!("{:.2}; {top}", hog / 1e9 / seconds),
                &format!("0.4..1.05 x {cpus}; {name}; 0 before"),
                within(hog / 1e9 / seconds, cpus, 0.4, 1.05) && top == *name && before == 0,
            );
        }
        (
            Fault::Disk { .. },
            Object::Device {
                device,
                syscall,
                function,
                ..
            },
        ) => {
            let (b, d) = around.per_request(|w| off_cpu_in(w, "disk", function));
            let own = own_per_request(stats.journal_sync_ns);
            checks.row(
                class,
                &format!("disk wait in {function} per request"),
                &format!("{} -> {}", ms(b), ms(d)),
                &format!("{} (service's own), < 5% before", ms(own)),
                within(d, own, 0.6, 1.3) && b < 0.05 * d,
            );
            let (sb, sd) = around.per_request(|w| w.syscall_ns(SERVICE, syscall));
            checks.row(
                class,
                &format!("syscall signal: {syscall} per request"),
                &format!("{} -> {}", ms(sb), ms(sd)),
                &format!("{} (service's own)", ms(own)),
                within(sd, own, 0.6, 1.3),
            );
            let fdatasync = |fd: Option<&str>| {
                around.during.sum("syscall", |s| {
                    label_is(s, "service", SERVICE)
                        && label_is(s, "syscall", syscall)
                        && fd.is_none_or(|fd| label_is(s, "fd", fd))
                })
            };
            let on_files = fdatasync(Some("file")) as f64 / fdatasync(None).max(1) as f64;
            checks.row(
                class,
                &format!("syscall signal: {syscall} time on files"),
                &format!("{:.0}%", 100.0 * on_files),
                &format!(">= 80% ({device} is bio-based: no disk signal)"),
                on_files >= 0.8,
            );
        }
        (
            Fault::Deploy { tax_table },
            Object::Build {
                old_build_id,
                new_build_id,
                added_function,
                ..
            },
        ) => {
            let (b, d) = around.per_request(|w| w.function_ns(SERVICE, "on_cpu", added_function));
            let injected =
                tax_table.as_nanos() as f64 * stats.checkout as f64 / stats.requests.max(1) as f64;
            checks.row(
                class,
                &format!("on-CPU in {added_function} per request"),
                &format!("{} -> {}", ms(b), ms(d)),
                &format!("{} (injected x checkouts), 0 before", ms(injected)),
                b == 0.0 && within(d, injected, 0.6, 1.3),
            );
            let ids_before = around.before.build_ids(SERVICE, "off_cpu");
            let ids_during = around.during.build_ids(SERVICE, "off_cpu");
            let short = |ids: &std::collections::BTreeSet<String>| {
                ids.iter()
                    .map(|id| id[..8.min(id.len())].to_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            checks.row(
                class,
                "build-ids of the service (before; during)",
                &format!("{}; {}", short(&ids_before), short(&ids_during)),
                &format!("{old_build_id:.8}; {new_build_id:.8}"),
                ids_before.iter().eq([old_build_id]) && ids_during.iter().eq([new_build_id]),
            );
            // TODO(windows issue, change events over the wire): check the `deploy`
            // change event with both build-ids once the proto carries change events; main
            // stores samples only, so a query shows the deploy as the build-id label.
        }
        (Fault::PacketLoss { peer, percent }, Object::Peer { address, .. }) => {
            let (b, d) = around.per_request(|w| w.retransmits(SERVICE, address));
            let injected = f64::from(*percent) / 100.0;
            checks.row(
                class,
                &format!("retransmits to {address} per request"),
                &format!("{b:.3} -> {d:.3}"),
                &format!("{injected:.3} (drop share), 0 before"),
                within(d, injected, 0.6, 1.5) && b < 0.05 * d,
            );
            let other = lab.peer_address(
                DemoPeer::ALL
                    .into_iter()
                    .find(|p| p != peer)
                    .unwrap_or(*peer),
            );
            let other_retransmits = around.during.retransmits(SERVICE, &other);
            checks.row(
                class,
                &format!("retransmits to {other}"),
                &other_retransmits.to_string(),
                "0",
                other_retransmits == 0,
            );
            let (wb, wd) = around.per_request(|w| w.socket_wait_ns(SERVICE, address));
            checks.row(
                class,
                &format!("socket wait on {address} per request"),
                &format!("{} -> {}", ms(wb), ms(wd)),
                ">= 2x",
                wd >= 2.0 * wb,
            );
        }
        (Fault::LoadDoubling, _) => {
            let ratio = around.requests_during / around.requests_before.max(1.0);
            checks.row(
                class,
                "requests per stored batch",
                &format!("x{ratio:.2}"),
                "about 2x (1.6..2.5)",
                (1.6..=2.5).contains(&ratio),
            );
            for cause in ["cpu-work", "cpu-contention", "lock", "disk"] {
                let (b, d) = around.per_request(|w| w.cause_ns(SERVICE, cause));
                checks.row(
                    class,
                    &format!("{cause} per request"),
                    &format!("{} -> {}", ms(b), ms(d)),
                    "within 1 ms",
                    (d - b).abs() < 1e6,
                );
            }
        }
        (Fault::Healthy, _) => {
            // Flat: every injection adds several milliseconds per request.
            for cause in ["cpu-work", "cpu-contention", "lock", "disk", "network"] {
                let (b, d) = around.per_request(|w| w.cause_ns(SERVICE, cause));
                checks.row(
                    class,
                    &format!("{cause} per request"),
                    &format!("{} -> {}", ms(b), ms(d)),
                    "within 1 ms",
                    (d - b).abs() < 1e6,
                );
            }
        }
        other => panic!("an injection without its object: {other:?}"),
    }
}

#[test]
#[ignore = "long scenario suite, not yet passing here (a restarted service's socket waits are not seen as the peer's); run with --ignored"]
fn every_injection_shows_in_its_window_and_not_before() {
    if !require_root("every_injection_shows_in_its_window_and_not_before") {
        return;
    }
    let seed = std::env::var("STALLSCOPE_LAB_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_206);
    eprintln!("lab seed {seed} (STALLSCOPE_LAB_SEED repeats another)");
    let scale = Scale::CI;
    let mut lab = Lab::start(LabConfig::new(scale, seed)).unwrap_or_else(|e| panic!("lab: {e:#}"));
    let healthy = lab.healthy(HEALTHY).expect("healthy");
    let mut classes = vec![FaultClass::Healthy];
    classes.extend(FaultClass::INJECTIONS);
    classes.push(FaultClass::LoadDoubling);
    let mut injections = Vec::new();
    for class in classes {
        let fault = random_fault(class, lab.rng());
        injections.push(
            lab.inject(fault, INJECT)
                .unwrap_or_else(|e| panic!("{class}: {e:#}")),
        );
        lab.recover(RECOVER).expect("recover");
    }
    let last_end = injections.last().map_or(0, |i| i.end_unix_ns);
    lab.wait_ingested(last_end).expect("stored");

    let mut query = lab.query().expect("query");
    let pricing = lab.peer_address(DemoPeer::Pricing);
    let load = lab.load_report().expect("load report");
    let baseline = LoadSummary::of(&load, healthy.start_unix_ns, healthy.end_unix_ns);
    let mut checks = Checks::default();
    for injection in &injections {
        eprintln!(
            "{}: {} ({})",
            injection.class, injection.fault, injection.object
        );
        let around = Around::read(&mut query, injection, scale.batch_interval(), &pricing);
        let seen = around.requests_before > 0.0 && around.requests_during > 0.0;
        checks.row(
            injection.class,
            "requests the agent saw (before, during)",
            &format!(
                "{:.0}, {:.0}",
                around.requests_before, around.requests_during
            ),
            "> 0",
            seen,
        );
        check_load(&mut checks, injection, &load, &baseline);
        if seen {
            check_stored(&mut checks, &lab, injection, &around);
        }
    }
    eprintln!(
        "{:<14} {:<46} {:>24} {:>30}\n{}",
        "class", "measure", "measured", "expected", checks.table
    );
    eprintln!(
        "ground truth: {}",
        lab.scratch().join("ground-truth.json").display()
    );
    assert!(checks.failures.is_empty(), "{}", checks.failures.join("\n"));
}
