//! One level down from a cause: which lock, which peer, which device, which other
//! process took the CPU. Each object is a group of stored series (bucket by bucket, so
//! its rise gets a p-value like a category's); the details beside it come from the
//! signals that describe it further (connect latency, retransmits and RTT per peer, run
//! queue latency per wakeup).

use std::collections::BTreeMap;

use super::{
    categories::{Category, is_client, signals},
    report::Evidence,
    timeline::{BucketAmounts, Rates, Timeline},
};
use crate::storage::{SeriesTotals, signal_matches};

/// A tested object before false-discovery control.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub category: Category,
    pub kind: &'static str,
    pub name: String,
    pub amounts: BucketAmounts,
    pub details: Vec<String>,
}

/// Adds every point of `series` to `amounts`.
fn add_points(amounts: &mut BucketAmounts, series: &SeriesTotals) {
    for &(bucket, value, count) in &series.points {
        let entry = amounts.entry(bucket).or_default();
        entry.0 += value as f64;
        entry.1 += count as f64;
    }
}

/// Groups series by a key, summing their points.
fn group<'a>(
    series: impl IntoIterator<Item = &'a SeriesTotals>,
    key: impl Fn(&SeriesTotals) -> Option<String>,
) -> BTreeMap<String, BucketAmounts> {
    let mut out: BTreeMap<String, BucketAmounts> = BTreeMap::new();
    for s in series {
        if let Some(k) = key(s) {
            add_points(out.entry(k).or_default(), s);
        }
    }
    out
}

fn label<'a>(series: &'a SeriesTotals, key: &str) -> Option<&'a str> {
    series.labels.get(key).map(String::as_str)
}

/// Human form of nanoseconds per event.
pub fn human_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.1} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.0} us", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn per_event_line(what: &str, rates: &Rates) -> Option<String> {
    let window = rates.window_ns_per_event?;
    Some(match rates.baseline_ns_per_event {
        Some(base) => format!("{what} {} (baseline {})", human_ns(window), human_ns(base)),
        None => format!("{what} {} (none in the baseline)", human_ns(window)),
    })
}

/// Locks: futex addresses and kernel lock kinds the scope's threads waited on (not idle
/// futex waits).
pub fn locks(series: &[SeriesTotals]) -> Vec<Candidate> {
    let lock_series = series.iter().filter(|s| {
        signal_matches(&s.signal, signals::LOCK) && label(s, "lock_wait") != Some("idle")
    });
    group(lock_series, |s| {
        let kind = label(s, "lock_kind").unwrap_or("lock");
        Some(match (kind, label(s, "lock")) {
            ("futex" | "futex-pi", Some(address)) => format!("{kind} {address}"),
            (_, _) => format!("kernel {kind} lock"),
        })
    })
    .into_iter()
    .map(|(name, amounts)| Candidate {
        category: Category::Lock,
        kind: "lock",
        name,
        amounts,
        details: Vec::new(),
    })
    .collect()
}

/// Peers the scope's threads waited for as clients, with their connect latency,
/// retransmits and RTT as details.
pub fn peers(series: &[SeriesTotals], timeline: &Timeline) -> Vec<Candidate> {
    let waits = group(
        series
            .iter()
            .filter(|s| signal_matches(&s.signal, signals::SOCKET_WAIT) && is_client(s)),
        |s| label(s, "peer").map(str::to_owned),
    );
    let connects = group(
        series
            .iter()
            .filter(|s| signal_matches(&s.signal, signals::CONNECT)),
        |s| label(s, "peer").map(str::to_owned),
    );
    let retransmits = group(
        series.iter().filter(|s| {
            signal_matches(&s.signal, signals::TCP) && label(s, "event") == Some("retransmit")
        }),
        |s| label(s, "peer").map(str::to_owned),
    );
    let rtts = group(
        series.iter().filter(|s| {
            signal_matches(&s.signal, signals::TCP) && label(s, "event") == Some("rtt")
        }),
        |s| label(s, "peer").map(str::to_owned),
    );
    let mut names: Vec<&String> = waits.keys().chain(retransmits.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|peer| {
            let amounts = waits.get(peer).cloned().unwrap_or_default();
            let mut details = Vec::new();
            if let Some(line) = per_event_line("per receive/send wait", &timeline.rates(&amounts)) {
                details.push(line);
            }
            if let Some(c) = connects.get(peer)
                && let Some(line) = per_event_line("per connect", &timeline.rates(c))
            {
                details.push(line);
            }
            if let Some(r) = retransmits.get(peer) {
                // Retransmit rows count events; their value is not a time.
                let counts: BucketAmounts = r.iter().map(|(b, (_, n))| (*b, (*n, *n))).collect();
                let rates = timeline.rates(&counts);
                details.push(format!(
                    "retransmits {:.1}/s (baseline {:.1}/s)",
                    rates.window_ns_per_s, rates.baseline_ns_per_s
                ));
            }
            if let Some(r) = rtts.get(peer)
                && let Some(line) = per_event_line("smoothed RTT", &timeline.rates(r))
            {
                details.push(line);
            }
            Candidate {
                category: Category::Network,
                kind: "peer",
                name: peer.clone(),
                amounts,
                details,
            }
        })
        .collect()
}

/// Retransmits per peer as their own candidates: a lossy path shows in retransmits even
/// when the time it costs is spread thin. Tested on the count per second.
pub fn retransmitting_peers(series: &[SeriesTotals]) -> Vec<Candidate> {
    group(
        series.iter().filter(|s| {
            signal_matches(&s.signal, signals::TCP) && label(s, "event") == Some("retransmit")
        }),
        |s| label(s, "peer").map(str::to_owned),
    )
    .into_iter()
    .map(|(peer, amounts)| Candidate {
        category: Category::Network,
        kind: "retransmits",
        name: peer,
        // Counts stand in for time: the per-second "rate" is retransmits per second.
        amounts: amounts
            .into_iter()
            .map(|(b, (_, n))| (b, (n * 1e9, n)))
            .collect(),
        details: Vec::new(),
    })
    .collect()
}

/// Block devices the scope's I/O waited on, per device.
pub fn devices(series: &[SeriesTotals], timeline: &Timeline) -> Vec<Candidate> {
    group(
        series
            .iter()
            .filter(|s| signal_matches(&s.signal, signals::DISK)),
        |s| label(s, "device").map(str::to_owned),
    )
    .into_iter()
    .map(|(device, amounts)| {
        let details = per_event_line("per I/O", &timeline.rates(&amounts))
            .into_iter()
            .collect();
        Candidate {
            category: Category::Disk,
            kind: "device",
            name: device,
            amounts,
            details,
        }
    })
    .collect()
}

/// Other processes on the scope's hosts that took CPU time (host-wide on-CPU series,
/// without the scope's own service): the culprits of CPU contention.
pub fn cpu_takers(host_oncpu: &[SeriesTotals], own_service: &str) -> Vec<Candidate> {
    group(
        host_oncpu
            .iter()
            .filter(|s| signal_matches(&s.signal, signals::ON_CPU) && s.service != own_service),
        |s| {
            let process = label(s, "process").unwrap_or(&s.service);
            let pid = label(s, "pid").unwrap_or("?");
            Some(format!("{process} (pid {pid})"))
        },
    )
    .into_iter()
    .map(|(name, amounts)| Candidate {
        category: Category::CpuContention,
        kind: "process",
        name,
        amounts,
        details: Vec::new(),
    })
    .collect()
}

/// The scope's run-queue latency per wakeup, as a detail line.
pub fn runqueue_detail(series: &[SeriesTotals], timeline: &Timeline) -> Option<String> {
    let amounts = group(
        series
            .iter()
            .filter(|s| signal_matches(&s.signal, signals::RUNQUEUE)),
        |_| Some(String::new()),
    )
    .remove("")?;
    per_event_line("run-queue latency per wakeup", &timeline.rates(&amounts))
}

/// Turns a tested candidate into evidence.
pub fn evidence(candidate: &Candidate, rates: &Rates, q_value: f64) -> Evidence {
    Evidence {
        kind: candidate.kind.to_owned(),
        name: candidate.name.clone(),
        window_ns_per_s: rates.window_ns_per_s,
        baseline_ns_per_s: rates.baseline_ns_per_s,
        window_ns_per_event: rates.window_ns_per_event,
        baseline_ns_per_event: rates.baseline_ns_per_event,
        details: candidate.details.clone(),
        q_value: Some(q_value),
        new: rates.baseline_ns_per_s <= 0.0 && rates.window_ns_per_s > 0.0,
    }
}

#[cfg(test)]
mod tests {
    use stallscope_profile::Labels;

    use super::*;

    fn series(signal: &str, labels: &[(&str, &str)], points: &[(i64, i64, i64)]) -> SeriesTotals {
        SeriesTotals {
            host: "h".into(),
            service: "svc".into(),
            signal: signal.into(),
            cause: String::new(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Labels>(),
            points: points.to_vec(),
        }
    }

    #[test]
    fn peers_carry_their_connects_and_retransmits() {
        let timeline = Timeline {
            step_s: 1,
            window: vec![10],
            baseline_runs: vec![vec![0, 1]],
        };
        let data = [
            series(
                "socket-wait",
                &[("direction", "client"), ("peer", "10.0.0.2:80")],
                &[(0, 100, 1), (1, 100, 1), (10, 3000, 1)],
            ),
            series(
                "socket-wait",
                &[("direction", "server"), ("peer", "10.0.0.9")],
                &[(10, 9000, 1)],
            ),
            series(
                "tcp-srtt",
                &[("event", "retransmit"), ("peer", "10.0.0.2:80")],
                &[(10, 0, 4)],
            ),
        ];
        let found = peers(&data, &timeline);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "10.0.0.2:80");
        let rates = timeline.rates(&found[0].amounts);
        assert!((rates.window_ns_per_s - 3000.0).abs() < 1e-9);
        assert!(
            found[0]
                .details
                .iter()
                .any(|d| d.contains("retransmits 4.0/s"))
        );
        let lossy = retransmitting_peers(&data);
        assert!((timeline.rates(&lossy[0].amounts).window_ns_per_s - 4e9).abs() < 1.0);
    }

    /// Stored series carry the agents' names (`lock-wait`), older ones the short name.
    #[test]
    fn locks_leave_idle_futex_waits_out() {
        let data = [
            series(
                "lock-wait",
                &[
                    ("lock_kind", "futex"),
                    ("lock", "0x10"),
                    ("lock_wait", "contention"),
                ],
                &[(0, 5, 1)],
            ),
            series(
                "lock",
                &[
                    ("lock_kind", "futex"),
                    ("lock", "0x20"),
                    ("lock_wait", "idle"),
                ],
                &[(0, 500, 1)],
            ),
            series("lock_wait", &[("lock_kind", "mutex")], &[(0, 7, 1)]),
        ];
        let names: Vec<String> = locks(&data).into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["futex 0x10", "kernel mutex lock"]);
    }
}
