//! Loading and attaching the embedded eBPF probes: picks the best hook this kernel offers
//! for each signal (falling back where it must), configures map sizes and read-only
//! globals, and exposes the drain of one generation of aggregated data.

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_common::{
    CACHE_USERS, GENERATION_INDEX, LOSS_COUNTERS, Loss, Peer, ProbeConfig, SYSCALL_SLOTS,
    SampleKey, SampleValue, Signal, StackTrace, SyscallSlot, TotalCache, TotalKey, TotalValue,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, PerCpuArray, PerCpuValues},
};
use thiserror::Error;

pub mod attach;
pub mod bpf_sys;
pub mod btf;
mod syscall_table;
pub mod syscalls;
pub mod tracefs;

use self::{bpf_sys::Barrier, btf::Btf};

/// The probe object built by `build.rs`.
static PROBES_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/stallscope"));

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "stallscope-agent needs root (or CAP_BPF with CAP_PERFMON): run it with sudo or grant those capabilities"
    )]
    NotPrivileged,
    #[error("BTF file {path} is unreadable ({reason}): pass an existing file with --btf, or omit --btf to use {default}", default = btf::VMLINUX_BTF)]
    BtfUnreadable { path: PathBuf, reason: String },
    #[error(
        "off-CPU profiling needs the sched:sched_switch tracepoint, which this kernel lacks (is tracefs mounted?)"
    )]
    NoSchedSwitch,
    #[error("loading the eBPF probes failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("loading program {program} failed: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {0} is missing from the probe object")]
    MissingMap(&'static str),
    #[error("reading map {map} failed: {source}")]
    Map {
        map: &'static str,
        source: std::io::Error,
    },
    #[error("map {map}: {source}")]
    MapApi {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("on-CPU sampling needs perf events on every CPU: {0}")]
    PerfEvent(String),
    #[error("signal `{signal}` is not available on this kernel: it needs {need}")]
    Unsupported {
        signal: &'static str,
        need: &'static str,
    },
}

/// How off-CPU time is hooked on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedHook {
    /// BTF tracepoints `sched_switch` and `rseq_update` (5.18+): stacks only for sampled
    /// waits.
    BtfTracepoint,
    /// Classic `sched:sched_switch`: stacks walked at every switch-out.
    Tracepoint,
}

impl SchedHook {
    pub const fn describe(self) -> &'static str {
        match self {
            Self::BtfTracepoint => {
                "tp_btf sched_switch + rseq_update (stacks for threshold-sampled waits)"
            }
            Self::Tracepoint => "tracepoint sched:sched_switch (stacks at every switch-out)",
        }
    }
}

/// Which scheduler hook to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchedHookChoice {
    /// The BTF tracepoint where the kernel has it, the classic one otherwise.
    #[default]
    Auto,
    /// Force the classic tracepoint (for kernels whose BTF tracepoints misbehave).
    Tracepoint,
}

/// Sizes of the probes' maps, in entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// Threads tracked at once.
    pub threads: u32,
    /// Distinct (thread, signal, class) per drain interval and generation.
    pub totals: u32,
    /// Distinct (thread, signal, class, stacks) per drain interval and generation.
    pub samples: u32,
    /// Distinct stacks per drain interval and generation.
    pub stacks: u32,
    /// Sampled waits waiting for their user stack.
    pub pending: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            threads: 32768,
            totals: 16384,
            samples: 16384,
            stacks: 4096,
            pending: 4096,
        }
    }
}

/// What to load.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    pub signals: Vec<Signal>,
    pub offcpu_stack_threshold: Duration,
    pub lock_stack_threshold: Duration,
    pub syscall_slow_threshold: Duration,
    pub socket_wait_min: Duration,
    pub socket_stack_threshold: Duration,
    pub tcp_rtt_interval: Duration,
    pub oncpu_frequency_hz: u64,
    pub target_tgid: Option<u32>,
    /// A process left out when every process is measured (the agent's own).
    pub exclude_tgid: Option<u32>,
    pub sched_hook: SchedHookChoice,
    pub btf_path: Option<PathBuf>,
    pub map_sizes: MapSizes,
}

/// One generation of aggregated data, read after it stopped receiving writes.
#[derive(Debug, Default)]
pub struct Drained {
    pub totals: Vec<(TotalKey, TotalValue)>,
    pub samples: Vec<(SampleKey, SampleValue)>,
    pub stacks: Vec<(u64, StackTrace)>,
    /// Cumulative loss counters, summed over CPUs, indexed by [`agent_common::Loss::index`].
    pub losses: Vec<u64>,
    /// Names the probes recorded for the threads (and processes) in this generation.
    pub names: Vec<(u32, String)>,
    /// The peers the network signals' entries in this generation refer to, by id.
    pub peers: Vec<(u32, Peer)>,
    /// When the probes started loading: every wait they measure started after it.
    pub measuring_since: Option<Instant>,
}

/// Loaded and attached probes.
pub struct Probes {
    ebpf: Ebpf,
    /// Cumulative loss counters at the previous drain, to log each kind's first loss.
    losses_seen: Vec<u64>,
    generation_map: Array<MapData, u32>,
    losses: PerCpuArray<MapData, u64>,
    comms: aya::maps::HashMap<MapData, u32, [u8; 16]>,
    peers: aya::maps::HashMap<MapData, u32, Peer>,
    total_cache: PerCpuArray<MapData, TotalCache>,
    syscall_cache: PerCpuArray<MapData, SyscallSlot>,
    totals: [MapData; 2],
    samples: [MapData; 2],
    stacks: [MapData; 2],
    active: u32,
    barrier: Barrier,
    sizes: MapSizes,
    pub sched_hook: Option<SchedHook>,
    pub oncpu_cpus: usize,
    /// What serves each signal, for `check` and the log.
    pub hooks: Vec<(Signal, String)>,
    /// When loading started: no wait they measure started earlier.
    measuring_since: Instant,
}

/// Whether this process may load tracing programs: root, or `CAP_BPF` + `CAP_PERFMON`, or
/// `CAP_SYS_ADMIN`.
pub fn privileged() -> bool {
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_PERFMON: u64 = 1 << 38;
    const CAP_BPF: u64 = 1 << 39;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let Some(caps) = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return false;
    };
    caps & CAP_SYS_ADMIN != 0 || (caps & CAP_BPF != 0 && caps & CAP_PERFMON != 0)
}

/// Kernel BTF: the file given with `--btf` (which must be readable), else the running
/// kernel's own, else none.
fn load_btf(path: Option<&Path>) -> Result<Option<(Btf, aya::Btf)>, ProbeError> {
    let (path, required) = match path {
        Some(path) => (path, true),
        None => (Path::new(btf::VMLINUX_BTF), false),
    };
    if !required && !path.exists() {
        return Ok(None);
    }
    let unreadable = |reason: String| ProbeError::BtfUnreadable {
        path: path.to_owned(),
        reason,
    };
    let ours = Btf::from_file(path).map_err(|err| unreadable(err.to_string()));
    let theirs = aya::Btf::parse_file(path, aya::Endianness::default())
        .map_err(|err| unreadable(err.to_string()));
    match (ours, theirs) {
        (Ok(ours), Ok(theirs)) => Ok(Some((ours, theirs))),
        (Err(err), _) | (_, Err(err)) if required => Err(err),
        _ => Ok(None),
    }
}

impl Probes {
    pub fn load(settings: &ProbeSettings) -> Result<Self, ProbeError> {
        let measuring_since = Instant::now();
        if !privileged() {
            return Err(ProbeError::NotPrivileged);
        }
        let wants = |signal: Signal| settings.signals.contains(&signal);
        let btf = load_btf(settings.btf_path.as_deref())?;
        let nanos = |d: Duration| d.as_nanos().clamp(1, u128::from(u64::MAX)) as u64;
        let mut config = ProbeConfig {
            offcpu_stack_threshold_ns: nanos(settings.offcpu_stack_threshold),
            lock_stack_threshold_ns: nanos(settings.lock_stack_threshold),
            syscall_slow_threshold_ns: nanos(settings.syscall_slow_threshold),
            socket_wait_min_ns: nanos(settings.socket_wait_min),
            socket_stack_threshold_ns: nanos(settings.socket_stack_threshold),
            tcp_rtt_interval_ns: nanos(settings.tcp_rtt_interval),
            target_tgid: settings.target_tgid.unwrap_or(0),
            exclude_tgid: settings.exclude_tgid.unwrap_or(0),
            signals: settings
                .signals
                .iter()
                .fold(0, |bits, &signal| bits | 1 << signal as u32),
            ..ProbeConfig::DEFAULT
        };
        if let Some((ours, _)) = &btf {
            attach::fill_offsets(&mut config, ours);
        }
        if let Some((lo, hi)) = attach::ephemeral_ports() {
            config.ephemeral_port_lo = lo;
            config.ephemeral_port_hi = hi;
        }
        let nr = |name: &str| syscalls::number(name).unwrap_or(u32::MAX);
        config.futex_nr = nr("futex");
        config.futex_wait_nr = nr("futex_wait");
        config.futex_waitv_nr = nr("futex_waitv");
        config.flock_nr = nr("flock");
        config.fcntl_nr = nr("fcntl");
        // Futex waits are seen by the scheduler programs, so the lock signal needs them.
        let sched = wants(Signal::OffCpu) || wants(Signal::RunQueue) || wants(Signal::Lock);
        let use_btf_sched = sched
            && settings.sched_hook == SchedHookChoice::Auto
            && btf
                .as_ref()
                .is_some_and(|(ours, _)| attach::btf_sched_supported(ours));
        if wants(Signal::OffCpu) && !use_btf_sched {
            attach::ensure_tracefs();
            let fields =
                tracefs::field_offsets("sched", "sched_switch").ok_or(ProbeError::NoSchedSwitch)?;
            if let (Some((state, _)), Some((next_pid, _))) =
                (fields.get("prev_state"), fields.get("next_pid"))
            {
                config.tp_prev_state_offset = *state;
                config.tp_next_pid_offset = *next_pid;
            }
        }
        if wants(Signal::Disk) {
            attach::ensure_tracefs();
            let start = ["block_io_start", "block_rq_insert"]
                .into_iter()
                .find_map(|event| tracefs::field_offsets("block", event));
            if let Some((rwbs, _)) = start.as_ref().and_then(|fields| fields.get("rwbs")) {
                config.tp_block_rwbs_offset = *rwbs;
            }
        }

        let sizes = settings.map_sizes;
        let mut loader = EbpfLoader::new();
        loader
            // Task-local storage maps are used by the probes only; aya need not wrap them.
            .allow_unsupported_maps()
            .btf(btf.as_ref().map(|(_, theirs)| theirs))
            .override_global("PROBE_CONFIG", &config, true)
            .map_max_entries("THREADS", sizes.threads)
            .map_max_entries("DISK_REQUESTS", sizes.pending)
            .map_max_entries("PENDING", sizes.pending)
            .map_max_entries("TOTALS_0", sizes.totals)
            .map_max_entries("TOTALS_1", sizes.totals)
            .map_max_entries("SAMPLES_0", sizes.samples)
            .map_max_entries("SAMPLES_1", sizes.samples)
            .map_max_entries("STACKS_0", sizes.stacks)
            .map_max_entries("STACKS_1", sizes.stacks);
        let mut ebpf = loader.load(PROBES_OBJECT)?;

        let btf_pair = btf.as_ref().map(|(ours, theirs)| (ours, theirs));
        let mut hooks = Vec::new();
        let mut sched_hook = None;
        let mut file_lock_hook = None;
        if sched {
            let hook = attach::attach_sched(
                &mut ebpf,
                btf_pair.map(|(_, theirs)| theirs),
                use_btf_sched,
                &settings.signals,
            )?;
            sched_hook = Some(hook);
            if hook == SchedHook::Tracepoint && !wants(Signal::OffCpu) {
                // Nothing attached: the lock signal falls back to kernel locks only.
                sched_hook = None;
            }
            let file_locks = if hook == SchedHook::BtfTracepoint
                && (wants(Signal::OffCpu) || wants(Signal::Lock))
            {
                btf_pair
                    .and_then(|(ours, theirs)| attach::attach_file_locks(&mut ebpf, ours, theirs))
            } else {
                None
            };
            for signal in [Signal::OffCpu, Signal::RunQueue] {
                if wants(signal) {
                    let mut hook = hook.describe().to_owned();
                    if signal == Signal::OffCpu && file_locks.is_some() {
                        hook.push_str("; file lock waits from tp_btf filelock events");
                    }
                    hooks.push((signal, hook));
                }
            }
            file_lock_hook = file_locks;
        }
        let mut oncpu_cpus = 0;
        if wants(Signal::OnCpu) {
            oncpu_cpus = attach::attach_oncpu(&mut ebpf, settings.oncpu_frequency_hz)?;
            hooks.push((
                Signal::OnCpu,
                format!(
                    "perf_event cpu-clock at {} Hz on {oncpu_cpus} CPUs",
                    settings.oncpu_frequency_hz
                ),
            ));
        }
        if wants(Signal::Lock) {
            let mut attached = attach::attach_lock(&mut ebpf, btf_pair, sched_hook)?;
            attached.extend(file_lock_hook);
            hooks.push((Signal::Lock, attached.join(", ")));
        }
        if wants(Signal::Syscall) || wants(Signal::SocketWait) {
            attach::attach_syscall(&mut ebpf, btf_pair)?;
            let mut fd_syscalls: Array<_, u8> =
                Array::try_from(take_map(&mut ebpf, "FD_SYSCALLS")?).map_err(|source| {
                    ProbeError::MapApi {
                        map: "FD_SYSCALLS",
                        source,
                    }
                })?;
            for nr in syscalls::fd_first_numbers() {
                if nr < agent_common::FD_SYSCALLS_LEN {
                    fd_syscalls
                        .set(nr, 1, 0)
                        .map_err(|source| ProbeError::MapApi {
                            map: "FD_SYSCALLS",
                            source,
                        })?;
                }
            }
            if wants(Signal::Syscall) {
                hooks.push((Signal::Syscall, "tp_btf sys_enter + sys_exit".to_owned()));
            }
        }
        let network: Vec<Signal> = [Signal::Connect, Signal::SocketWait, Signal::Tcp]
            .into_iter()
            .filter(|&signal| wants(signal))
            .collect();
        if !network.is_empty() {
            if wants(Signal::SocketWait) {
                fill_socket_syscalls(&mut ebpf)?;
            }
            hooks.extend(attach::attach_net(&mut ebpf, btf_pair, &network)?);
        }
        if wants(Signal::Disk) {
            let start = attach::attach_disk(&mut ebpf)?;
            hooks.push((
                Signal::Disk,
                format!("tracepoints block:{start}, block_rq_issue, block_rq_complete"),
            ));
        }

        let generation_map =
            Array::try_from(take_map(&mut ebpf, "GENERATION")?).map_err(|source| {
                ProbeError::MapApi {
                    map: "GENERATION",
                    source,
                }
            })?;
        let losses = PerCpuArray::try_from(take_map(&mut ebpf, "LOSSES")?).map_err(|source| {
            ProbeError::MapApi {
                map: "LOSSES",
                source,
            }
        })?;
        let comms =
            aya::maps::HashMap::try_from(take_map(&mut ebpf, "COMMS")?).map_err(|source| {
                ProbeError::MapApi {
                    map: "COMMS",
                    source,
                }
            })?;
        let peers =
            aya::maps::HashMap::try_from(take_map(&mut ebpf, "PEERS")?).map_err(|source| {
                ProbeError::MapApi {
                    map: "PEERS",
                    source,
                }
            })?;
        let total_cache =
            PerCpuArray::try_from(take_map(&mut ebpf, "TOTAL_CACHE")?).map_err(|source| {
                ProbeError::MapApi {
                    map: "TOTAL_CACHE",
                    source,
                }
            })?;
        let syscall_cache =
            PerCpuArray::try_from(take_map(&mut ebpf, "SYSCALL_CACHE")?).map_err(|source| {
                ProbeError::MapApi {
                    map: "SYSCALL_CACHE",
                    source,
                }
            })?;
        let totals = [
            hash_map(&mut ebpf, "TOTALS_0")?,
            hash_map(&mut ebpf, "TOTALS_1")?,
        ];
        let samples = [
            hash_map(&mut ebpf, "SAMPLES_0")?,
            hash_map(&mut ebpf, "SAMPLES_1")?,
        ];
        let stacks = [
            hash_map(&mut ebpf, "STACKS_0")?,
            hash_map(&mut ebpf, "STACKS_1")?,
        ];
        Ok(Self {
            ebpf,
            losses_seen: vec![0; LOSS_COUNTERS as usize],
            generation_map,
            losses,
            comms,
            peers,
            total_cache,
            syscall_cache,
            totals,
            samples,
            stacks,
            active: 0,
            barrier: Barrier::Membarrier,
            sizes,
            sched_hook,
            oncpu_cpus,
            hooks,
            measuring_since,
        })
    }

    /// The loaded programs and the instructions the verifier processed for each (its
    /// limit is a million): how close each program is to being rejected.
    pub fn verifier_work(&self) -> Vec<(String, u32)> {
        let mut work: Vec<(String, u32)> = self
            .ebpf
            .programs()
            .filter_map(|(name, program)| {
                let count = program.info().ok()?.verified_instruction_count()?;
                Some((name.to_owned(), count))
            })
            .collect();
        work.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        work
    }

    /// Logs each kind of loss the first time its counter moves: the probes started
    /// dropping data (every profile reports how much).
    fn log_first_losses(&mut self, losses: &[u64]) {
        for (index, (&now, seen)) in losses.iter().zip(self.losses_seen.iter_mut()).enumerate() {
            if *seen == 0 && now != 0 {
                let signal = Signal::from_u8((index as u32 / Loss::COUNT) as u8);
                let loss = Loss::ALL[index % Loss::COUNT as usize];
                tracing::warn!(
                    "probes started losing data: {} ({} so far, signal {}); profiles report it",
                    loss.name(),
                    now,
                    signal.map_or("unknown", crate::naming::signal_label),
                );
            }
            *seen = now;
        }
    }

    /// Retires the active generation and returns everything it holds. Programs switch to the
    /// other generation first; the RCU barrier guarantees none still writes the old one.
    pub fn drain(&mut self) -> Result<Drained, ProbeError> {
        let retired = self.active;
        let next = retired ^ 1;
        self.generation_map
            .set(GENERATION_INDEX, next, 0)
            .map_err(|source| ProbeError::MapApi {
                map: "GENERATION",
                source,
            })?;
        self.active = next;
        let barrier = bpf_sys::rcu_barrier(self.barrier);
        if barrier != self.barrier {
            tracing::warn!(
                "membarrier(MEMBARRIER_CMD_GLOBAL) is unavailable (nohz_full?); drains wait 20 ms for in-flight probes instead"
            );
            self.barrier = barrier;
        }
        let slot = retired as usize;
        let mut totals: Vec<(TotalKey, TotalValue)> =
            bpf_sys::drain_hash_map(self.totals[slot].fd().as_fd(), self.sizes.totals).map_err(
                |source| ProbeError::Map {
                    map: "TOTALS",
                    source,
                },
            )?;
        let samples: Vec<(SampleKey, SampleValue)> =
            bpf_sys::drain_hash_map(self.samples[slot].fd().as_fd(), self.sizes.samples).map_err(
                |source| ProbeError::Map {
                    map: "SAMPLES",
                    source,
                },
            )?;
        let stacks = bpf_sys::drain_hash_map(self.stacks[slot].fd().as_fd(), self.sizes.stacks)
            .map_err(|source| ProbeError::Map {
                map: "STACKS",
                source,
            })?;
        self.drain_total_caches(retired, &mut totals)?;
        self.drain_syscall_cache(retired, &mut totals)?;
        let mut losses = vec![0u64; LOSS_COUNTERS as usize];
        for (index, total) in losses.iter_mut().enumerate() {
            let per_cpu =
                self.losses
                    .get(&(index as u32), 0)
                    .map_err(|source| ProbeError::MapApi {
                        map: "LOSSES",
                        source,
                    })?;
            *total = per_cpu.iter().sum();
        }
        self.log_first_losses(&losses);
        let mut ids: Vec<u32> = totals
            .iter()
            .flat_map(|(k, _)| [k.tgid, k.tid])
            .chain(samples.iter().flat_map(|(k, _)| [k.tgid, k.tid]))
            .filter(|&id| id != 0)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let names = ids
            .into_iter()
            .filter_map(|id| {
                let comm = self.comms.get(&id, 0).ok()?;
                let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
                Some((id, String::from_utf8_lossy(&comm[..end]).into_owned()))
            })
            .collect();
        let mut peer_ids: Vec<u32> = totals
            .iter()
            .filter(|(key, _)| is_network(key.signal))
            .map(|(key, _)| key.aux)
            .chain(
                samples
                    .iter()
                    .filter(|(key, _)| is_network(key.signal))
                    .map(|(key, _)| key.aux),
            )
            .collect();
        peer_ids.sort_unstable();
        peer_ids.dedup();
        let peers = peer_ids
            .into_iter()
            .filter_map(|id| Some((id, self.peers.get(&id, 0).ok()?)))
            .collect();
        Ok(Drained {
            totals,
            samples,
            stacks,
            losses,
            names,
            peers,
            measuring_since: Some(self.measuring_since),
        })
    }
}

impl Probes {
    /// Moves what the per-CPU totals caches of generation `retired` hold into `totals`,
    /// and empties them (no program writes them any more).
    fn drain_total_caches(
        &mut self,
        retired: u32,
        totals: &mut Vec<(TotalKey, TotalValue)>,
    ) -> Result<(), ProbeError> {
        let map_error = |source| ProbeError::MapApi {
            map: "TOTAL_CACHE",
            source,
        };
        for user in 0..CACHE_USERS {
            let index = user * 2 + retired;
            let per_cpu = self.total_cache.get(&index, 0).map_err(map_error)?;
            let cpus = per_cpu.len();
            for cache in per_cpu.iter() {
                totals.extend(
                    cache
                        .entries
                        .iter()
                        .filter(|entry| entry.value.count != 0)
                        .map(|entry| (entry.key, entry.value)),
                );
            }
            let empty =
                PerCpuValues::try_from(vec![TotalCache::default(); cpus]).map_err(|err| {
                    ProbeError::Map {
                        map: "TOTAL_CACHE",
                        source: err,
                    }
                })?;
            self.total_cache.set(index, empty, 0).map_err(map_error)?;
        }
        Ok(())
    }
}

impl Probes {
    /// Moves what the per-CPU syscall cache slots of generation `retired` hold into
    /// `totals` (one entry per CPU and slot; the accumulator merges them: counts, sums and
    /// buckets add up, maxima take the larger), and empties the slots that held anything.
    fn drain_syscall_cache(
        &mut self,
        retired: u32,
        totals: &mut Vec<(TotalKey, TotalValue)>,
    ) -> Result<(), ProbeError> {
        let map_error = |source| ProbeError::MapApi {
            map: "SYSCALL_CACHE",
            source,
        };
        let first = retired * SYSCALL_SLOTS;
        for index in first..first + SYSCALL_SLOTS {
            let per_cpu = self.syscall_cache.get(&index, 0).map_err(map_error)?;
            let cpus = per_cpu.len();
            let before = totals.len();
            totals.extend(
                per_cpu
                    .iter()
                    .filter(|slot| slot.count != 0)
                    .map(SyscallSlot::total),
            );
            if totals.len() == before {
                continue;
            }
            let empty =
                PerCpuValues::try_from(vec![SyscallSlot::default(); cpus]).map_err(|err| {
                    ProbeError::Map {
                        map: "SYSCALL_CACHE",
                        source: err,
                    }
                })?;
            self.syscall_cache.set(index, empty, 0).map_err(map_error)?;
        }
        Ok(())
    }
}

/// Whether entries of `signal` carry a peer id in `aux`.
pub fn is_network(signal: u8) -> bool {
    [Signal::Connect, Signal::SocketWait, Signal::Tcp]
        .iter()
        .any(|&network| network as u8 == signal)
}

/// Marks the socket syscalls (receive, send, poll, connect) for the socket-wait probe.
fn fill_socket_syscalls(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    let map_error = |source| ProbeError::MapApi {
        map: "SOCKET_SYSCALLS",
        source,
    };
    let mut table: Array<_, u8> =
        Array::try_from(take_map(ebpf, "SOCKET_SYSCALLS")?).map_err(map_error)?;
    for (nr, op) in syscalls::socket_ops() {
        if nr < agent_common::FD_SYSCALLS_LEN {
            table.set(nr, op as u8, 0).map_err(map_error)?;
        }
    }
    Ok(())
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, ProbeError> {
    ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))
}

fn hash_map(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, ProbeError> {
    match take_map(ebpf, name)? {
        Map::HashMap(data) => Ok(data),
        _ => Err(ProbeError::MissingMap(name)),
    }
}
