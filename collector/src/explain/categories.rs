//! From stored series to the product's cause categories, per time bucket, with the idle
//! waits set apart.
//!
//! Thread time adds up: on-CPU (cpu-work) + runnable (cpu-contention) + lock + disk +
//! network + other. But much off-CPU time is idle: a server thread waiting for the next
//! request, a pool parked for work. Idle time is not a cause of slowness, and it moves
//! opposite to the request path (a worker stuck on a slow peer is not idle), so a
//! category that mixes both can stay flat while its request-path part doubles. `why`
//! therefore ranks request-path waits only:
//! - network: the socket waits of clients (the `socket-wait` signal, direction `client`);
//!   the rest of the off-CPU network time (servers waiting for requests, accept) is idle.
//!   Without the socket-wait signal the whole off-CPU network time counts, and the report
//!   says so.
//! - other: off-CPU `other` minus futex waits whose stacks show parking (`futex: idle
//!   wait`), which are idle.
//! - cpu-work from on-CPU samples; cpu-contention, lock and disk from off-CPU time.

use std::collections::BTreeMap;

use stallscope_profile::Labels;

use crate::storage::{SeriesTotals, signal_matches};

/// The product's cause categories (../PRODUCT.md), in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    CpuWork,
    CpuContention,
    Lock,
    Disk,
    Network,
    Other,
}

impl Category {
    pub const ALL: [Self; 6] = [
        Self::CpuWork,
        Self::CpuContention,
        Self::Lock,
        Self::Disk,
        Self::Network,
        Self::Other,
    ];

    /// The `cause` label value.
    pub const fn label(self) -> &'static str {
        match self {
            Self::CpuWork => "cpu-work",
            Self::CpuContention => "cpu-contention",
            Self::Lock => "lock",
            Self::Disk => "disk",
            Self::Network => "network",
            Self::Other => "other",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.label() == label)
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Signal names as agents label them.
pub mod signals {
    pub const OFF_CPU: &str = "off-cpu";
    pub const ON_CPU: &str = "on-cpu";
    pub const RUNQUEUE: &str = "runqueue";
    pub const LOCK: &str = "lock";
    pub const SYSCALL: &str = "syscall";
    pub const DISK: &str = "disk";
    pub const CONNECT: &str = "tcp-connect";
    pub const SOCKET_WAIT: &str = "socket-wait";
    pub const TCP: &str = "tcp";
}

/// The evidence label of futex waits whose stacks show parking, not a lock.
pub const IDLE_FUTEX_EVIDENCE: &str = "futex: idle wait";

/// Wait time (ns) and events of one bucket, per category, plus the idle time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BucketSums {
    pub ns: [f64; 6],
    pub events: [f64; 6],
    /// Off-CPU time off the request path (servers waiting for requests, parked pools).
    pub idle_ns: f64,
    /// Off-CPU network time before the request-path split (for the idle remainder).
    offcpu_network_ns: f64,
    offcpu_network_events: f64,
    client_socket_ns: f64,
    client_socket_events: f64,
}

impl BucketSums {
    pub fn ns(&self, category: Category) -> f64 {
        self.ns[category.index()]
    }

    pub fn events(&self, category: Category) -> f64 {
        self.events[category.index()]
    }

    fn add(&mut self, category: Category, ns: f64, events: f64) {
        self.ns[category.index()] += ns;
        self.events[category.index()] += events;
    }
}

/// Per bucket (start, Unix seconds): the category sums of one scope.
#[derive(Debug, Clone, Default)]
pub struct CategoryBuckets {
    pub buckets: BTreeMap<i64, BucketSums>,
    /// Whether any series of the socket-wait signal was seen: without it, network time
    /// cannot be split into request path and idle.
    pub has_socket_waits: bool,
}

impl CategoryBuckets {
    /// Sums the scope's series into categories. Buckets without any row are absent: no
    /// data is not zero.
    pub fn from_series(series: &[SeriesTotals]) -> Self {
        let mut out = Self {
            has_socket_waits: series
                .iter()
                .any(|s| signal_matches(&s.signal, signals::SOCKET_WAIT)),
            ..Self::default()
        };
        for s in series {
            for &(bucket, value, count) in &s.points {
                let (ns, events) = (value as f64, count as f64);
                match s.signal.as_str() {
                    signals::ON_CPU => out.entry(bucket).add(Category::CpuWork, ns, events),
                    signals::OFF_CPU => {
                        let sums = out.entry(bucket);
                        match Category::from_label(&s.cause) {
                            Some(Category::Network) => {
                                sums.offcpu_network_ns += ns;
                                sums.offcpu_network_events += events;
                            }
                            Some(Category::Other)
                                if s.labels.get("evidence").map(String::as_str)
                                    == Some(IDLE_FUTEX_EVIDENCE) =>
                            {
                                sums.idle_ns += ns;
                            }
                            Some(category) => sums.add(category, ns, events),
                            // An off-CPU sample without a cause label (an older agent):
                            // not attributable, so it counts as other.
                            None => sums.add(Category::Other, ns, events),
                        }
                    }
                    signals::SOCKET_WAIT if is_client(s) => {
                        let sums = out.entry(bucket);
                        sums.client_socket_ns += ns;
                        sums.client_socket_events += events;
                    }
                    _ => {}
                }
            }
        }
        let split = out.has_socket_waits;
        for sums in out.buckets.values_mut() {
            if split {
                // The client's socket waits are the request path; the rest of the
                // off-CPU network time is idle (a socket wait can slightly exceed its
                // off-CPU time: it includes the syscall's own CPU).
                let request = if sums.offcpu_network_ns > 0.0 {
                    sums.client_socket_ns.min(sums.offcpu_network_ns)
                } else {
                    sums.client_socket_ns
                };
                sums.add(Category::Network, request, sums.client_socket_events);
                sums.idle_ns += (sums.offcpu_network_ns - request).max(0.0);
            } else {
                let (ns, events) = (sums.offcpu_network_ns, sums.offcpu_network_events);
                sums.add(Category::Network, ns, events);
            }
        }
        out
    }

    fn entry(&mut self, bucket: i64) -> &mut BucketSums {
        self.buckets.entry(bucket).or_default()
    }
}

/// Whether a series is the client side of a connection.
pub fn is_client(series: &SeriesTotals) -> bool {
    is_client_labels(&series.labels)
}

/// Whether labels say the client side of a connection.
pub fn is_client_labels(labels: &Labels) -> bool {
    labels.get("direction").map(String::as_str) == Some("client")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(
        signal: &str,
        cause: &str,
        labels: &[(&str, &str)],
        points: &[(i64, i64, i64)],
    ) -> SeriesTotals {
        SeriesTotals {
            host: "h".into(),
            service: "svc".into(),
            signal: signal.into(),
            cause: cause.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Labels>(),
            points: points.to_vec(),
        }
    }

    #[test]
    fn idle_waits_are_set_apart_from_the_request_path() {
        let data = [
            series("on-cpu", "cpu-work", &[], &[(0, 200, 10)]),
            series("off-cpu", "lock", &[], &[(0, 300, 3)]),
            series(
                "off-cpu",
                "other",
                &[("evidence", IDLE_FUTEX_EVIDENCE)],
                &[(0, 5000, 5)],
            ),
            series(
                "off-cpu",
                "other",
                &[("evidence", "sleep, poll, pipe or child")],
                &[(0, 70, 1)],
            ),
            // 1000 ns of network waiting: 400 of it a client waiting for a peer.
            series("off-cpu", "network", &[], &[(0, 1000, 10)]),
            series(
                "socket-wait",
                "network",
                &[("direction", "client")],
                &[(0, 400, 4)],
            ),
            series(
                "socket-wait",
                "network",
                &[("direction", "server")],
                &[(0, 600, 6)],
            ),
        ];
        let sums = CategoryBuckets::from_series(&data);
        let b = &sums.buckets[&0];
        assert!(sums.has_socket_waits);
        assert!((b.ns(Category::CpuWork) - 200.0).abs() < 1e-9);
        assert!((b.ns(Category::Lock) - 300.0).abs() < 1e-9);
        assert!((b.ns(Category::Other) - 70.0).abs() < 1e-9);
        assert!((b.ns(Category::Network) - 400.0).abs() < 1e-9);
        assert!((b.events(Category::Network) - 4.0).abs() < 1e-9);
        assert!((b.idle_ns - 5600.0).abs() < 1e-9);
    }

    #[test]
    fn without_socket_waits_network_time_counts_whole() {
        let data = [series("off-cpu", "network", &[], &[(10, 1000, 10)])];
        let sums = CategoryBuckets::from_series(&data);
        assert!(!sums.has_socket_waits);
        assert!((sums.buckets[&10].ns(Category::Network) - 1000.0).abs() < 1e-9);
        assert!(sums.buckets[&10].idle_ns.abs() < 1e-9);
    }
}
