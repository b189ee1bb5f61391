//! End to end, as root, on the real kernel: network waits injected between two network
//! namespaces the tests create (and remove), measured by the workload and by the agent.
//! Connect latency against a full listener, socket waits on a slow and a fast peer (IPv4
//! and IPv6, and threads without rseq), retransmits on a lossy path and smoothed RTT on a shaped one, each against
//! a control peer.

use std::{collections::HashMap, net::SocketAddr, process::Command};

use stallscope_profile::{Histogram, Profile, Sample};
use stallscope_tests::{
    Workload, binary, binary_dir, label, netlab::NetLab, record_profile, record_started, reported,
    require_root, value_index,
};

fn within(actual: f64, expected: f64, tolerance: f64) -> bool {
    (actual - expected).abs() <= expected * tolerance
}

fn durations(results: &HashMap<String, String>, key: &str) -> Vec<u64> {
    results
        .get(key)
        .unwrap_or_else(|| panic!("workload did not report {key}: {results:?}"))
        .split(',')
        .filter_map(|v| v.parse().ok())
        .collect()
}

fn lab(tag: &str, links: usize) -> NetLab {
    NetLab::create(tag, links).unwrap_or_else(|e| panic!("creating the network lab: {e:#}"))
}

fn histograms<'a>(
    profile: &'a Profile,
    signal: &str,
    pairs: &[(&str, &str)],
) -> Vec<&'a Histogram> {
    profile
        .histograms
        .iter()
        .filter(|h| {
            h.signal == signal
                && pairs
                    .iter()
                    .all(|(k, v)| h.labels.get(*k).is_some_and(|l| l == v))
        })
        .collect()
}

/// `floor(log2(ns))`, the agent's histogram bucket.
fn bucket(ns: f64) -> usize {
    (ns.max(1.0) as u64).ilog2() as usize
}

#[test]
fn connect_latency_against_a_full_listener_is_the_syn_timeout() {
    if !require_root("connect_latency") {
        return;
    }
    let lab = lab("connect", 1);
    let addr = format!("{}:7001", lab.server_v4(0));
    let refused = format!("{}:7002", lab.server_v4(0));
    let (profile, exit) = record_profile(
        "net-connect",
        &["net-connect", &lab.client, &lab.server, &addr, "4"],
        "connect.pb.gz",
        &["--signals", "connect,tcp"],
    );
    let measured = durations(&exit.workload, "connect_ns");
    assert_eq!(measured.len(), 4);
    for &took in &measured {
        // The injected wait: the SYN is dropped and retransmitted after the initial RTO.
        assert!(
            within(took as f64, 1e9, 0.15),
            "the workload's connect took {took} ns, not the 1 s SYN timeout: {measured:?}"
        );
    }
    let time = value_index(&profile, "tcp_connect", "nanoseconds");
    let events = value_index(&profile, "tcp_connects", "count");
    let attempts = |s: &Sample| {
        label(s, "signal") == "tcp-connect"
            && label(s, "peer") == addr
            && label(s, "outcome") == "established"
            && label(s, "direction") == "client"
            && profile.stack_contains(s, "connect_marker")
    };
    let count = profile.total_where(events, attempts);
    let ns = profile.total_where(time, attempts) as f64;
    assert_eq!(count, 4, "connects with the marker stack to {addr}");
    let expected: f64 = measured.iter().map(|&d| d as f64).sum();
    assert!(
        within(ns, expected, 0.15),
        "agent: {:.3} s over 4 connects, workload: {:.3} s",
        ns / 1e9,
        expected / 1e9
    );
    // Each attempt on its own: four events between 0.85 s and 1.15 s.
    let hist = histograms(
        &profile,
        "tcp-connect",
        &[("peer", &addr), ("outcome", "established")],
    )
    .into_iter()
    .find(|h| h.count >= 4)
    .unwrap_or_else(|| panic!("no connect histogram for {addr}: {:?}", profile.histograms));
    let slow: u64 = hist.buckets[bucket(0.85e9)..=bucket(1.15e9)].iter().sum();
    assert_eq!(slow, 4, "connect latencies {:?}", hist.buckets);
    assert!(
        (hist.max_ns as f64) < 1.15e9,
        "slowest connect {} ns",
        hist.max_ns
    );
    // The failed connect counts for its own peer.
    let refusals = profile.total_where(events, |s| {
        label(s, "peer") == refused && label(s, "outcome") == "refused"
    });
    assert_eq!(refusals, 1, "refused connects to {refused}");
    // The dropped SYNs were retransmitted in state SYN_SENT.
    let tcp_events = value_index(&profile, "tcp_events", "count");
    let syn_retransmits = profile.total_where(tcp_events, |s| {
        label(s, "peer") == addr
            && label(s, "event") == "retransmit"
            && label(s, "tcp_state") == "SYN_SENT"
    });
    assert!(
        syn_retransmits >= 4,
        "{syn_retransmits} SYN retransmits to {addr}"
    );
}

/// A slow peer (30 ms per answer) and a fast one, 50 requests each, over the given
/// address family. Without rseq (glibc told not to register it), a thread's return to
/// user space is not seen and its socket waits end when it is switched in.
fn slow_and_fast_peer(tag: &str, ipv6: bool, rseq: bool) {
    let lab = lab(tag, 2);
    let server = |i: usize| -> SocketAddr {
        let text = if ipv6 {
            format!("[{}]:7100", lab.server_v6(i))
        } else {
            format!("{}:7100", lab.server_v4(i))
        };
        text.parse().expect("socket address")
    };
    let (slow, fast) = (server(0).to_string(), server(1).to_string());
    let scenario = [
        "net-peers",
        &lab.client,
        &lab.server,
        &slow,
        &fast,
        "50",
        "30",
    ];
    let mut command = Command::new(binary(&binary_dir(), "stallscope-workload").expect("workload"));
    command.args(scenario);
    if !rseq {
        command.env("GLIBC_TUNABLES", "glibc.pthread.rseq=0");
    }
    let workload = Workload::spawn(command).expect("workload starts");
    let (profile, exit) = record_started(
        tag,
        workload,
        &format!("{tag}.pb.gz"),
        &["--signals", "socket-wait,offcpu"],
    );
    let rseq_size = reported(&exit.workload, "rseq_size");
    assert_eq!(
        rseq_size > 0.0,
        rseq,
        "glibc's rseq registration ({rseq_size} bytes) is not what the test asked for"
    );
    let injected = 50.0 * 30e6;
    let measured_slow = reported(&exit.workload, "slow_wait_ns");
    assert!(
        within(measured_slow, injected, 0.10),
        "the workload itself waited {measured_slow} ns for the slow peer"
    );
    let wait = value_index(&profile, "socket_wait", "nanoseconds");
    // The workload times its requests, not its connects (a fresh IPv6 path's first
    // connect may wait a second for neighbour discovery).
    let of_peer = |peer: &str| {
        let peer = peer.to_owned();
        move |s: &Sample| {
            label(s, "signal") == "socket-wait"
                && label(s, "op") != "connect"
                && label(s, "peer") == peer
                && label(s, "direction") == "client"
                && label(s, "thread") == "requester"
        }
    };
    let slow_ns = profile.total_where(wait, of_peer(&slow)) as f64;
    assert!(
        within(slow_ns, injected, 0.10),
        "socket wait on {slow}: {:.3} s, injected {:.3} s; samples: {:?}",
        slow_ns / 1e9,
        injected / 1e9,
        profile
            .samples
            .iter()
            .filter(|s| label(s, "signal") == "socket-wait")
            .map(|s| (&s.labels, &s.values))
            .collect::<Vec<_>>()
    );
    let with_marker = profile.total_where(wait, |s| {
        of_peer(&slow)(s) && profile.stack_contains(s, "socket_marker_request")
    }) as f64;
    assert!(
        with_marker >= 0.9 * slow_ns,
        "only {with_marker} of {slow_ns} ns of socket wait on {slow} has the marker stack"
    );
    let fast_ns = profile.total_where(wait, of_peer(&fast)) as f64;
    assert!(
        fast_ns < 0.02 * injected,
        "socket wait on the fast peer {fast}: {fast_ns} ns"
    );
    // The same waits are off-CPU time of the `network` cause.
    let off = value_index(&profile, "off_cpu", "nanoseconds");
    let network = profile.total_where(off, |s| {
        label(s, "thread") == "requester" && label(s, "cause") == "network"
    }) as f64;
    assert!(
        within(network, slow_ns, 0.15),
        "off-CPU network time of the requester {:.3} s vs socket wait {:.3} s",
        network / 1e9,
        slow_ns / 1e9
    );
}

#[test]
fn socket_waits_are_attributed_to_the_slow_peer() {
    if !require_root("slow_peer") {
        return;
    }
    slow_and_fast_peer("net-peers-v4", false, true);
}

#[test]
fn socket_waits_of_threads_without_rseq() {
    if !require_root("slow_peer_no_rseq") {
        return;
    }
    slow_and_fast_peer("net-peers-no-rseq", false, false);
}

#[test]
fn socket_waits_are_attributed_to_the_slow_peer_over_ipv6() {
    if !require_root("slow_peer_ipv6") {
        return;
    }
    slow_and_fast_peer("net-peers-v6", true, true);
}

#[test]
fn retransmits_on_a_lossy_path_and_none_on_a_clean_one() {
    if !require_root("retransmits") {
        return;
    }
    let lab = lab("retransmit", 2);
    lab.lossy(0, 10)
        .unwrap_or_else(|e| panic!("nftables drop rule: {e:#}"));
    let lossy = format!("{}:7200", lab.server_v4(0));
    let clean = format!("{}:7200", lab.server_v4(1));
    let (profile, _) = record_profile(
        "net-retransmit",
        &[
            "net-bulk",
            &lab.client,
            &lab.server,
            "2000000",
            &lossy,
            &clean,
        ],
        "retransmit.pb.gz",
        &["--signals", "tcp"],
    );
    let events = value_index(&profile, "tcp_events", "count");
    let retransmits = |peer: &str| {
        profile.total_where(events, |s| {
            label(s, "peer") == peer && label(s, "event") == "retransmit"
        })
    };
    let (on_lossy, on_clean) = (retransmits(&lossy), retransmits(&clean));
    assert!(on_lossy > 0, "no retransmits to {lossy} through a 10% loss");
    assert_eq!(on_clean, 0, "retransmits to the clean peer {clean}");
    let established = profile.total_where(events, |s| {
        label(s, "peer") == lossy && label(s, "tcp_state") == "ESTABLISHED"
    });
    assert!(
        established > 0,
        "retransmits to {lossy} carry their TCP state"
    );
}

#[test]
fn smoothed_rtt_rises_on_a_shaped_path() {
    if !require_root("rtt") {
        return;
    }
    let lab = lab("rtt", 2);
    lab.shaped(0, "4mbit", "200ms")
        .unwrap_or_else(|e| panic!("tc tbf: {e:#}"));
    let shaped = format!("{}:7300", lab.server_v4(0));
    let clean = format!("{}:7300", lab.server_v4(1));
    let (profile, _) = record_profile(
        "net-rtt",
        &[
            "net-bulk",
            &lab.client,
            &lab.server,
            "1000000",
            &shaped,
            &clean,
        ],
        "rtt.pb.gz",
        &["--signals", "tcp"],
    );
    let mean_rtt = |peer: &str| {
        let (sum, count) = histograms(&profile, "tcp", &[("peer", peer), ("event", "rtt")])
            .into_iter()
            .fold((0u64, 0u64), |(sum, count), h| {
                (sum + h.sum_ns, count + h.count)
            });
        assert!(count > 0, "no RTT samples for {peer}");
        sum as f64 / count as f64
    };
    let (on_shaped, on_clean) = (mean_rtt(&shaped), mean_rtt(&clean));
    assert!(
        on_shaped > 5e6 && on_shaped > 10.0 * on_clean,
        "smoothed RTT: shaped path {:.3} ms, clean path {:.3} ms",
        on_shaped / 1e6,
        on_clean / 1e6
    );
}
