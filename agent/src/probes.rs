//! Loading and attaching the embedded eBPF probes: picks the best hook this kernel offers
//! for each signal (falling back where it must), configures map sizes and read-only
//! globals, and exposes the drain of one generation of aggregated data.

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::Duration,
};

use agent_common::{
    GENERATION_INDEX, Loss, ProbeConfig, SampleKey, SampleValue, StackTrace, TotalKey, TotalValue,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, PerCpuArray},
    programs::{
        BtfTracePoint, PerfEvent, TracePoint,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};
use thiserror::Error;

use crate::{
    bpf_sys::{self, Barrier},
    btf::{self, Btf},
    tracefs,
};

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
    pub offcpu: bool,
    pub oncpu: bool,
    pub offcpu_stack_threshold: Duration,
    pub oncpu_frequency_hz: u64,
    pub target_tgid: Option<u32>,
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
    /// Cumulative loss counters, summed over CPUs.
    pub losses: [u64; Loss::COUNT as usize],
}

/// Loaded and attached probes.
pub struct Probes {
    _ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    generation_map: Array<MapData, u32>,
    losses: PerCpuArray<MapData, u64>,
    totals: [MapData; 2],
    samples: [MapData; 2],
    stacks: [MapData; 2],
    active: u32,
    barrier: Barrier,
    sizes: MapSizes,
    pub sched_hook: Option<SchedHook>,
    pub oncpu_cpus: usize,
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

/// Whether the BTF `sched_switch` path can work with this BTF: the tracepoint must pass
/// `prev_state` (5.18+) and `rseq_update` must exist.
fn btf_sched_supported(btf: &Btf) -> bool {
    btf.tracepoint_arg_count("sched_switch") == Some(4)
        && btf.tracepoint_arg_count("rseq_update").is_some()
        && btf.member_offset("task_struct", "pid").is_ok()
        && btf.member_offset("task_struct", "flags").is_ok()
}

impl Probes {
    pub fn load(settings: &ProbeSettings) -> Result<Self, ProbeError> {
        if !privileged() {
            return Err(ProbeError::NotPrivileged);
        }
        let btf = load_btf(settings.btf_path.as_deref())?;
        let mut config = ProbeConfig {
            offcpu_stack_threshold_ns: settings.offcpu_stack_threshold.as_nanos().max(1) as u64,
            target_tgid: settings.target_tgid.unwrap_or(0),
            ..ProbeConfig::DEFAULT
        };
        let use_btf = settings.offcpu
            && settings.sched_hook == SchedHookChoice::Auto
            && btf
                .as_ref()
                .is_some_and(|(ours, _)| btf_sched_supported(ours));
        if let Some((ours, _)) = &btf
            && use_btf
        {
            config.task_pid_offset = ours.member_offset("task_struct", "pid").unwrap_or(0);
            config.task_flags_offset = ours.member_offset("task_struct", "flags").unwrap_or(0);
            // Zero (no rseq in this kernel's task_struct) sends every thread down the eager
            // user-stack path, which is correct, only slower.
            config.task_rseq_offset = ours.member_offset("task_struct", "rseq").unwrap_or(0);
        }
        if settings.offcpu {
            if !use_btf {
                ensure_tracefs();
            }
            match tracefs::field_offsets("sched", "sched_switch") {
                Some(fields) => {
                    if let (Some((state, _)), Some((next_pid, _))) =
                        (fields.get("prev_state"), fields.get("next_pid"))
                    {
                        config.tp_prev_state_offset = *state;
                        config.tp_next_pid_offset = *next_pid;
                    }
                }
                None if !use_btf => return Err(ProbeError::NoSchedSwitch),
                None => {}
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
            .map_max_entries("PENDING", sizes.pending)
            .map_max_entries("TOTALS_0", sizes.totals)
            .map_max_entries("TOTALS_1", sizes.totals)
            .map_max_entries("SAMPLES_0", sizes.samples)
            .map_max_entries("SAMPLES_1", sizes.samples)
            .map_max_entries("STACKS_0", sizes.stacks)
            .map_max_entries("STACKS_1", sizes.stacks);
        let mut ebpf = loader.load(PROBES_OBJECT)?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .inspect_err(|err| tracing::debug!("probe log channel unavailable: {err}"))
            .ok();

        let mut sched_hook = None;
        if settings.offcpu {
            if let (true, Some((_, theirs))) = (use_btf, &btf) {
                match attach_btf_sched(&mut ebpf, theirs) {
                    Ok(()) => sched_hook = Some(SchedHook::BtfTracepoint),
                    Err(err) => tracing::warn!(
                        "BTF sched_switch probe failed ({err}); falling back to the classic tracepoint"
                    ),
                }
            }
            if sched_hook.is_none() {
                ensure_tracefs();
                attach_tracepoint(&mut ebpf, "sched_switch_tp", "sched", "sched_switch")?;
                sched_hook = Some(SchedHook::Tracepoint);
            }
        }
        let oncpu_cpus = if settings.oncpu {
            attach_oncpu(&mut ebpf, settings.oncpu_frequency_hz)?
        } else {
            0
        };

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
        let mut probes = Self {
            _ebpf: ebpf,
            logger,
            generation_map,
            losses,
            totals,
            samples,
            stacks,
            active: 0,
            barrier: Barrier::Membarrier,
            sizes,
            sched_hook,
            oncpu_cpus,
        };
        probes.flush_log();
        Ok(probes)
    }

    /// Passes the probes' own log records (aya-log) to the agent's log.
    pub fn flush_log(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
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
        let totals = bpf_sys::drain_hash_map(self.totals[slot].fd().as_fd(), self.sizes.totals)
            .map_err(|source| ProbeError::Map {
                map: "TOTALS",
                source,
            })?;
        let samples = bpf_sys::drain_hash_map(self.samples[slot].fd().as_fd(), self.sizes.samples)
            .map_err(|source| ProbeError::Map {
                map: "SAMPLES",
                source,
            })?;
        let stacks = bpf_sys::drain_hash_map(self.stacks[slot].fd().as_fd(), self.sizes.stacks)
            .map_err(|source| ProbeError::Map {
                map: "STACKS",
                source,
            })?;
        let mut losses = [0u64; Loss::COUNT as usize];
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
        self.flush_log();
        Ok(Drained {
            totals,
            samples,
            stacks,
            losses,
        })
    }
}

fn ensure_tracefs() {
    if let Err(err) = tracefs::ensure_mounted() {
        tracing::warn!("tracefs is not mounted and mounting it failed: {err}");
    }
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

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ProbeError::Program {
            program: name,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| ProbeError::Program {
            program: name,
            source,
        })
}

fn attach_btf_sched(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<(), ProbeError> {
    for (name, tracepoint) in [
        ("sched_switch_btf", "sched_switch"),
        ("rseq_update_btf", "rseq_update"),
    ] {
        let prog: &mut BtfTracePoint = program(ebpf, name)?;
        prog.load(tracepoint, btf)
            .map_err(|source| ProbeError::Program {
                program: name,
                source,
            })?;
        prog.attach().map_err(|source| ProbeError::Program {
            program: name,
            source,
        })?;
    }
    Ok(())
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    category: &str,
    event: &str,
) -> Result<(), ProbeError> {
    let prog: &mut TracePoint = program(ebpf, name)?;
    prog.load().map_err(|source| ProbeError::Program {
        program: name,
        source,
    })?;
    prog.attach(category, event)
        .map_err(|source| ProbeError::Program {
            program: name,
            source,
        })?;
    Ok(())
}

fn attach_oncpu(ebpf: &mut Ebpf, frequency_hz: u64) -> Result<usize, ProbeError> {
    let cpus = aya::util::online_cpus()
        .map_err(|(what, err)| ProbeError::PerfEvent(format!("reading {what}: {err}")))?;
    let prog: &mut PerfEvent = program(ebpf, "oncpu_sample")?;
    prog.load().map_err(|source| ProbeError::Program {
        program: "oncpu_sample",
        source,
    })?;
    for &cpu in &cpus {
        prog.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Frequency(frequency_hz),
            false,
        )
        .map_err(|err| ProbeError::PerfEvent(format!("cpu {cpu}: {err}")))?;
    }
    Ok(cpus.len())
}
