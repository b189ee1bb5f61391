//! Loading and attaching the embedded eBPF probes: picks the best hook this kernel offers
//! for each signal (falling back where it must), configures map sizes and read-only
//! globals, and exposes the drain of one generation of aggregated data.

pub mod attach;
pub mod bpf_sys;
pub mod btf;
mod drain;
mod error;
pub mod pins;
mod settings;
pub mod syscalls;
pub mod tracefs;
mod tuning;
pub mod unwind;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use agent_common::{
    GENERATION_INDEX, LOSS_COUNTERS, Peer, ProbeConfig, Signal, SyscallSlot, TotalCache, Tuning,
    generation_owner, generation_value,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        tp_btf::BtfTracePointLinkId,
    },
};

use self::{bpf_sys::Barrier, btf::Btf};
pub use self::{
    drain::{Drained, DrainedStack, Leftover, is_network},
    error::ProbeError,
    settings::{MapSizes, ProbeSettings, SchedHook, SchedHookChoice},
    tuning::ProbeCost,
};

/// The probe object built by `build.rs`.
static PROBES_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/stallscope"));

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
    /// What the overhead guard tunes while the programs run, and its current value.
    tuning_map: Array<MapData, Tuning>,
    tuning: Tuning,
    /// Holds the kernel's run-time accounting of BPF programs on while it is open.
    run_time_stats: Option<std::os::fd::OwnedFd>,
    /// The syscall signal's programs and their links while attached, when the guard may
    /// detach them (`None`: it may not).
    syscall_links: Option<Vec<(&'static str, Option<BtfTracePointLinkId>)>>,
    syscall_cache: PerCpuArray<MapData, SyscallSlot>,
    totals: [MapData; 2],
    samples: [MapData; 2],
    stacks: [MapData; 2],
    active: u32,
    barrier: Barrier,
    sizes: MapSizes,
    /// The unwind maps until the table loader takes them.
    unwind: Option<unwind::UnwindMaps>,
    pub sched_hook: Option<SchedHook>,
    pub oncpu_cpus: usize,
    /// What serves each signal, for `check` and the log.
    pub hooks: Vec<(Signal, String)>,
    /// When loading started: no wait they measure started earlier (for adopted maps:
    /// when the first agent pinned them).
    measuring_since: Instant,
    /// This agent's owner tag in `GENERATION`.
    owner: u32,
    /// The links of the attached programs (pinned ones live in `pinned`).
    _links: Vec<FdLink>,
    /// Where the probes are pinned and this agent's pinned links; removed on a clean
    /// stop (drop).
    pinned: Option<(std::path::PathBuf, Vec<PinnedLink>)>,
    /// The adopted maps' retired generation still has to be read ([`Probes::take_leftover`]).
    leftover_pending: bool,
    /// The adopted agent's cumulative loss counters at the hand-over (for the leftover).
    earlier_losses: Option<Vec<u64>>,
    /// The retired generation read and not yet emptied ([`Probes::settle`]).
    unsettled: Option<drain::Unsettled>,
    /// For the first profile: what adopting or replacing pinned probes meant.
    pub pin_notes: Vec<String>,
}

impl Drop for Probes {
    fn drop(&mut self) {
        // A clean stop: nothing may stay attached once the agent is gone for good.
        if let Some((dir, links)) = self.pinned.take() {
            drop(links);
            let _ = pins::remove(&dir);
        }
    }
}

/// An owner tag for a new agent: non-zero (a fresh `GENERATION` holds 0) and not the
/// previous owner's.
fn new_owner(previous: u32) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = (u64::from(std::process::id()) << 32 | u64::from(nanos))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let owner = 1 + (seed >> 33) as u32 % 0x7fff_fffe;
    if owner == previous {
        previous % 0x7fff_fffe + 1
    } else {
        owner
    }
}

/// The owner tag and generation bit in a pinned `GENERATION` map, if there is one.
fn pinned_generation(dir: &Path) -> Option<u32> {
    let data = MapData::from_pin(dir.join("GENERATION")).ok()?;
    let array: Array<MapData, u32> = Array::try_from(Map::Array(data)).ok()?;
    array.get(&GENERATION_INDEX, 0).ok()
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
        let tuning = Tuning {
            offcpu_stack_threshold_ns: nanos(settings.offcpu_stack_threshold),
            lock_stack_threshold_ns: nanos(settings.lock_stack_threshold),
            syscall_sample_every: settings.syscall_sample_every.max(1),
            ..Tuning::DEFAULT
        };
        let mut config = ProbeConfig {
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
        // Socket waits start when a thread blocks inside a socket syscall: the scheduler
        // programs see them.
        let sched = wants(Signal::OffCpu)
            || wants(Signal::RunQueue)
            || wants(Signal::Lock)
            || wants(Signal::SocketWait);
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
        let mut pin_notes = Vec::new();
        let pin_plan = match &settings.pin_dir {
            Some(base) => {
                match pins::layout_id(PROBES_OBJECT, &sizes).and_then(|l| pins::plan(base, &l)) {
                    Ok(plan) => Some(plan),
                    Err(err) => {
                        let note = format!(
                            "{err}: running without pinned probes, so an unclean stop of this agent loses its waits in progress and what it had not drained"
                        );
                        tracing::warn!("{note}");
                        pin_notes.push(note);
                        None
                    }
                }
            }
            None => None,
        };
        let previous = pin_plan
            .as_ref()
            .filter(|plan| plan.adopting)
            .and_then(|plan| pinned_generation(&plan.dir))
            .unwrap_or(0);
        let owner = new_owner(generation_owner(previous));
        config.owner = owner;
        let mut loader = EbpfLoader::new();
        if let Some(plan) = &pin_plan {
            pins::point_loader(plan, &mut loader);
        }
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
        unwind::size_maps(&mut loader, &sizes);
        let mut ebpf = loader.load(PROBES_OBJECT)?;
        let unwind = unwind::take(&mut ebpf, &sizes)?;
        // Before any program attaches: the programs read it on every event.
        let mut tuning_map: Array<MapData, Tuning> =
            Array::try_from(take_map(&mut ebpf, "TUNING")?).map_err(|source| {
                ProbeError::MapApi {
                    map: "TUNING",
                    source,
                }
            })?;
        tuning_map
            .set(0, tuning, 0)
            .map_err(|source| ProbeError::MapApi {
                map: "TUNING",
                source,
            })?;

        let btf_pair = btf.as_ref().map(|(ours, theirs)| (ours, theirs));
        let mut links = attach::HeldLinks::default();
        let mut hooks = Vec::new();
        let mut sched_hook = None;
        let mut file_lock_hook = None;
        if sched {
            let hook = attach::attach_sched(
                &mut ebpf,
                btf_pair.map(|(_, theirs)| theirs),
                use_btf_sched,
                &settings.signals,
                &mut links,
            )?;
            sched_hook = Some(hook);
            if hook == SchedHook::Tracepoint && !wants(Signal::OffCpu) {
                // Nothing attached: the lock signal falls back to kernel locks only.
                sched_hook = None;
            }
            let file_locks = if hook == SchedHook::BtfTracepoint
                && (wants(Signal::OffCpu) || wants(Signal::Lock))
            {
                btf_pair.and_then(|(ours, theirs)| {
                    attach::attach_file_locks(&mut ebpf, ours, theirs, &mut links)
                })
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
        let mut syscall_links = None;
        let mut oncpu_cpus = 0;
        if wants(Signal::OnCpu) {
            oncpu_cpus = attach::attach_oncpu(&mut ebpf, settings.oncpu_frequency_hz, &mut links)?;
            hooks.push((
                Signal::OnCpu,
                format!(
                    "perf_event cpu-clock at {} Hz on {oncpu_cpus} CPUs",
                    settings.oncpu_frequency_hz
                ),
            ));
        }
        if wants(Signal::Lock) {
            let mut attached = attach::attach_lock(&mut ebpf, btf_pair, sched_hook, &mut links)?;
            attached.extend(file_lock_hook);
            hooks.push((Signal::Lock, attached.join(", ")));
        }
        if wants(Signal::Syscall) {
            // The guard may detach these for a while (their totals then scaled): they stay
            // with aya (the guard detaches them by id) and are not pinned.
            syscall_links = Some(attach::attach_syscall(&mut ebpf, btf_pair)?);
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
            hooks.push((Signal::Syscall, "tp_btf sys_enter + sys_exit".to_owned()));
        }
        // Socket waits are seen by the BTF scheduler programs only.
        let socket_waits_seen = sched_hook == Some(SchedHook::BtfTracepoint);
        if wants(Signal::SocketWait) && !socket_waits_seen {
            tracing::warn!(
                "socket waits not recorded: they need the BTF sched_switch and rseq_update tracepoints (5.18+, --sched-hook auto)"
            );
        }
        let network: Vec<Signal> = [Signal::Connect, Signal::SocketWait, Signal::Tcp]
            .into_iter()
            .filter(|&signal| wants(signal) && (signal != Signal::SocketWait || socket_waits_seen))
            .collect();
        if !network.is_empty() {
            if network.contains(&Signal::SocketWait) {
                fill_socket_syscalls(&mut ebpf)?;
            }
            hooks.extend(attach::attach_net(
                &mut ebpf, btf_pair, &network, &mut links,
            )?);
        }
        if wants(Signal::Disk) {
            let start = attach::attach_disk(&mut ebpf, &mut links)?;
            hooks.push((
                Signal::Disk,
                format!("tracepoints block:{start}, block_rq_issue, block_rq_complete"),
            ));
        }

        let mut generation_map: Array<MapData, u32> =
            Array::try_from(take_map(&mut ebpf, "GENERATION")?).map_err(|source| {
                ProbeError::MapApi {
                    map: "GENERATION",
                    source,
                }
            })?;
        // Every program is attached and idle: the hand-over makes them count (and an
        // earlier agent's programs stop) in one map update.
        let active = previous & 1;
        let handed = pins::hand_over(
            pin_plan,
            links.fd,
            &mut generation_map,
            generation_value(owner, active),
            owner,
            &mut pin_notes,
        )?;
        let adopting = handed.adopting;
        let measuring_since = handed.measuring_since.unwrap_or(measuring_since);
        let losses_map = take_map(&mut ebpf, "LOSSES")?;
        let earlier_losses = match &handed.pinned {
            Some((dir, _)) => {
                pins::pin_losses(&losses_map, dir, owner);
                adopting
                    .then(|| pins::take_earlier_losses(dir, owner, LOSS_COUNTERS))
                    .flatten()
            }
            None => None,
        };
        let losses = PerCpuArray::try_from(losses_map).map_err(|source| ProbeError::MapApi {
            map: "LOSSES",
            source,
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
            tuning_map,
            tuning,
            run_time_stats: None,
            syscall_links: syscall_links
                .map(|links| links.into_iter().map(|(n, l)| (n, Some(l))).collect()),
            syscall_cache,
            totals,
            samples,
            stacks,
            active,
            barrier: Barrier::Membarrier,
            sizes,
            sched_hook,
            oncpu_cpus,
            hooks,
            measuring_since,
            owner,
            _links: handed.unpinned,
            pinned: handed.pinned,
            leftover_pending: adopting,
            earlier_losses,
            unsettled: None,
            pin_notes,
            unwind,
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
