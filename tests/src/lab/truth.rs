//! Ground truth: what the lab injected, when, in which cause category, and the object
//! `stallscope why` must name. Everything here is what the lab did or the demo reported
//! doing (its replies' timestamps, its own measurements), never what stallscope measured.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::lab::protocol::{AddressRange, DemoMutex, ServiceStats};

/// The product's cause categories an injection falls into (PRODUCT.md), by their labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    CpuWork,
    CpuContention,
    Lock,
    Disk,
    Network,
}

impl Category {
    /// The `cause` label value the agent gives this category.
    pub const fn label(self) -> &'static str {
        match self {
            Self::CpuWork => "cpu-work",
            Self::CpuContention => "cpu-contention",
            Self::Lock => "lock",
            Self::Disk => "disk",
            Self::Network => "network",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The two downstream peers of the demo service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DemoPeer {
    /// Peer A, asked by `quote_price`.
    Pricing,
    /// Peer B, asked by `quote_shipping`.
    Shipping,
}

impl DemoPeer {
    pub const ALL: [Self; 2] = [Self::Pricing, Self::Shipping];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Pricing => "pricing",
            Self::Shipping => "shipping",
        }
    }

    /// The service's request-path function that calls this peer.
    pub const fn caller_function(self) -> &'static str {
        match self {
            Self::Pricing => "quote_price",
            Self::Shipping => "quote_shipping",
        }
    }

    /// The network path (veth pair) the lab gives this peer.
    pub const fn path(self) -> usize {
        match self {
            Self::Pricing => 0,
            Self::Shipping => 1,
        }
    }
}

/// A kind of injection, or a control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultClass {
    /// Control: nothing injected.
    Healthy,
    /// Control: the request rate doubles; the latency per request must not change.
    LoadDoubling,
    /// (1) a background thread holds one mutex of the request path.
    Lock,
    /// (2) one of the two peers answers late.
    SlowPeer,
    /// (3) a CPU-hungry neighbour process.
    CpuHog,
    /// (4) the journal's block device stalls the service's writes, again and again.
    Disk,
    /// (5) the service is restarted from a slower build (new build-id).
    Deploy,
    /// (6) packets to one peer are dropped.
    PacketLoss,
}

impl FaultClass {
    /// The six injections, in the order the issues number them.
    pub const INJECTIONS: [Self; 6] = [
        Self::Lock,
        Self::SlowPeer,
        Self::CpuHog,
        Self::Disk,
        Self::Deploy,
        Self::PacketLoss,
    ];
    pub const CONTROLS: [Self; 2] = [Self::Healthy, Self::LoadDoubling];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::LoadDoubling => "load-doubling",
            Self::Lock => "lock",
            Self::SlowPeer => "slow-peer",
            Self::CpuHog => "cpu-hog",
            Self::Disk => "disk",
            Self::Deploy => "deploy",
            Self::PacketLoss => "packet-loss",
        }
    }

    /// The cause category the injection's extra latency belongs to; none for controls.
    pub const fn category(self) -> Option<Category> {
        match self {
            Self::Healthy | Self::LoadDoubling => None,
            Self::Lock => Some(Category::Lock),
            Self::SlowPeer | Self::PacketLoss => Some(Category::Network),
            Self::CpuHog => Some(Category::CpuContention),
            Self::Disk => Some(Category::Disk),
            Self::Deploy => Some(Category::CpuWork),
        }
    }
}

impl fmt::Display for FaultClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultClass {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::CONTROLS
            .into_iter()
            .chain(Self::INJECTIONS)
            .find(|c| c.name() == text)
            .ok_or_else(|| {
                format!(
                    "unknown scenario class `{text}`: use healthy, load-doubling, lock, slow-peer, cpu-hog, disk, deploy or packet-loss"
                )
            })
    }
}

/// One injection with its parameters (what `Lab::inject` does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "class", rename_all = "kebab-case")]
pub enum Fault {
    Healthy,
    LoadDoubling,
    /// A background thread holds `mutex` for `hold` out of every `period`.
    Lock {
        mutex: DemoMutex,
        #[serde(with = "millis")]
        hold: Duration,
        #[serde(with = "millis")]
        period: Duration,
    },
    /// `peer` answers `extra_delay` later than normal.
    SlowPeer {
        peer: DemoPeer,
        #[serde(with = "millis")]
        extra_delay: Duration,
    },
    /// A process of `threads` spinning threads.
    CpuHog {
        threads: usize,
    },
    /// The journal's device takes no writes from the service's cgroup for `stall` out
    /// of every `period` (blkio throttling to 1 IOPS, lifted between stalls).
    Disk {
        #[serde(with = "millis")]
        stall: Duration,
        #[serde(with = "millis")]
        period: Duration,
    },
    /// The service restarts from a copy of its binary with a new build-id, whose
    /// `format_line_items` also runs `recompute_tax_table` for `tax_table` per checkout;
    /// at the end it is rolled back to the first build.
    Deploy {
        #[serde(with = "millis")]
        tax_table: Duration,
    },
    /// `percent` of the TCP segments the service sends to `peer` are dropped.
    PacketLoss {
        peer: DemoPeer,
        percent: u32,
    },
}

impl Fault {
    pub fn class(&self) -> FaultClass {
        match self {
            Self::Healthy => FaultClass::Healthy,
            Self::LoadDoubling => FaultClass::LoadDoubling,
            Self::Lock { .. } => FaultClass::Lock,
            Self::SlowPeer { .. } => FaultClass::SlowPeer,
            Self::CpuHog { .. } => FaultClass::CpuHog,
            Self::Disk { .. } => FaultClass::Disk,
            Self::Deploy { .. } => FaultClass::Deploy,
            Self::PacketLoss { .. } => FaultClass::PacketLoss,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        match self {
            Self::Healthy => write!(f, "nothing injected"),
            Self::LoadDoubling => write!(f, "the request rate doubles"),
            Self::Lock {
                mutex,
                hold,
                period,
            } => write!(
                f,
                "`{}` holds the `{}` mutex for {:.0} ms every {:.0} ms",
                mutex.holder_function(),
                mutex.name(),
                ms(hold),
                ms(period)
            ),
            Self::SlowPeer { peer, extra_delay } => write!(
                f,
                "the {} peer answers {:.0} ms later",
                peer.name(),
                ms(extra_delay)
            ),
            Self::CpuHog { threads } => {
                write!(f, "a neighbour process spins {threads} threads")
            }
            Self::Disk { stall, period } => write!(
                f,
                "the journal's device stalls the service's writes for {:.0} ms every {:.0} ms",
                ms(stall),
                ms(period)
            ),
            Self::Deploy { tax_table } => write!(
                f,
                "a new build recomputes the tax table ({:.1} ms) in every checkout",
                ms(tax_table)
            ),
            Self::PacketLoss { peer, percent } => write!(
                f,
                "{percent}% of the packets to the {} peer are dropped",
                peer.name()
            ),
        }
    }
}

/// What `why` must name for an injection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Object {
    /// Controls name nothing.
    None,
    /// A mutex of the service: its name, its static's symbol, where it lies in the
    /// service's address space (the futex word the waiters wait on is inside), the
    /// waiters' request-path function and the holder's function.
    Mutex {
        name: String,
        symbol: String,
        address: AddressRange,
        waiter_function: String,
        holder_function: String,
    },
    /// A downstream peer as the agent labels it (`peer`: address:port) and its caller.
    Peer {
        name: String,
        address: String,
        caller_function: String,
    },
    /// Another process on the host: its process name and pid.
    Process { name: String, pid: u32 },
    /// The journal's block device (`zram1`, `253:1`), the syscall that waited and its
    /// caller. stallscope's disk signal reads request tracepoints, which the bio-based
    /// zram device never reaches: the agent's data names the syscall, the file kind and
    /// the stack, not the device.
    Device {
        device: String,
        major_minor: String,
        syscall: String,
        function: String,
    },
    /// A deploy: both build-ids, the function that grew and the one the new build added.
    Build {
        executable: String,
        old_build_id: String,
        new_build_id: String,
        function: String,
        added_function: String,
        old_pid: u32,
        new_pid: u32,
    },
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => write!(f, "none"),
            Self::Mutex {
                name,
                symbol,
                address,
                waiter_function,
                holder_function,
            } => write!(
                f,
                "mutex {name} ({symbol} at {address}), waiters in {waiter_function}, held by {holder_function}"
            ),
            Self::Peer {
                name,
                address,
                caller_function,
            } => write!(f, "peer {name} at {address}, called from {caller_function}"),
            Self::Process { name, pid } => write!(f, "process {name} (pid {pid})"),
            Self::Device {
                device,
                major_minor,
                syscall,
                function,
            } => write!(
                f,
                "device {device} ({major_minor}), {syscall} in {function}"
            ),
            Self::Build {
                old_build_id,
                new_build_id,
                function,
                added_function,
                ..
            } => write!(
                f,
                "build {new_build_id} (was {old_build_id}), {function} grew, calls {added_function}"
            ),
        }
    }
}

/// The ground truth of one injection (or control): `start_unix_ns`..`end_unix_ns` is
/// when the fault took effect and when it was removed, from the demo's own replies (or
/// the lab's system calls for disk and packet loss).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Injection {
    pub fault: Fault,
    pub class: FaultClass,
    /// The category `why` should rank first; `None` for controls.
    pub category: Option<Category>,
    pub object: Object,
    /// The degraded service (the `service` label: the executable's file name).
    pub service: String,
    pub start_unix_ns: i64,
    pub end_unix_ns: i64,
    /// What the service measured itself during the injection.
    pub service_stats: ServiceStats,
}

impl Injection {
    pub fn duration(&self) -> Duration {
        Duration::from_nanos((self.end_unix_ns - self.start_unix_ns).max(0) as u64)
    }
}

/// A stretch of the lab's timeline: `healthy`, `recover`, or an injection's class name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub start_unix_ns: i64,
    pub end_unix_ns: i64,
}

/// Durations as milliseconds in JSON.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(duration.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}
