//! Pinned probes: a restart of `run` loses nothing. The maps that hold measurements and
//! waits in progress, and the links that keep the programs attached, are pinned in bpffs
//! under a directory per spool (one agent) and map layout. An agent that is killed,
//! crashes or is OOM-killed leaves them behind: its programs keep counting into the maps.
//! The next agent with the same spool and layout adopts the maps, attaches its own
//! programs (idle: they count only for the owner tag in `GENERATION`), hands over in one
//! map update, and detaches the old programs; what the old agent had not drained yet is
//! drained by the new one. Nothing is counted twice and no event falls between the two.
//!
//! A different layout (an upgrade that changed the maps) cannot be adopted: the old
//! programs are detached and their pins removed, and the profile says that their
//! undrained data and waits in progress were lost. A clean stop (SIGTERM, SIGINT, the
//! end of `--duration`) drains everything and removes the pins, so nothing is left
//! running.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use agent_common::GENERATION_INDEX;
use aya::{
    EbpfLoader,
    maps::{Array, MapData},
    programs::links::{FdLink, PinnedLink},
};

use super::{
    MapSizes, ProbeError,
    bpf_sys::{self, Barrier},
};

/// Maps holding measurements or waits in progress: what an agent adopts. The programs'
/// settings (`.rodata`, `TUNING`, the syscall tables), scratch space and the loss
/// counters (each agent counts its own) are not pinned.
pub const PINNED_MAPS: &[&str] = &[
    "GENERATION",
    "TOTALS_0",
    "TOTALS_1",
    "SAMPLES_0",
    "SAMPLES_1",
    "STACKS_0",
    "STACKS_1",
    "COMMS",
    "TOTAL_CACHE",
    "SYSCALL_CACHE",
    "DISK_REQUESTS",
    "THREADS",
    "SOCKETS",
    "PEERS",
    "PENDING",
    "THREAD_STATE",
    "USER_SNAPSHOT",
];

/// Each agent pins its own loss counters as `losses-<owner>` (not adopted: the next
/// agent's programs count their own): what an agent that died counted after its last
/// drain is read from there by the agent that adopts its maps.
const LOSSES_PREFIX: &str = "losses-";

/// Pins this agent's loss counters (`LOSSES`) in `dir` for the agent that may adopt its
/// maps one day; without the pin, losses its programs count after it died go unreported.
pub fn pin_losses(map: &aya::maps::Map, dir: &Path, owner: u32) {
    let path = dir.join(format!("{LOSSES_PREFIX}{owner:08x}"));
    if let Err(err) = map.pin(&path) {
        tracing::warn!(
            "pinning the loss counters in {}: {err}; losses counted after an unclean stop go unreported",
            path.display()
        );
    }
}

/// The loss counters (summed over CPUs, cumulative) of the earlier agents whose maps
/// were adopted from `dir`, their pins removed: what their programs counted until the
/// hand-over, including after their last drain. `None` when there are none.
pub fn take_earlier_losses(dir: &Path, owner: u32, counters: u32) -> Option<Vec<u64>> {
    let ours = format!("{LOSSES_PREFIX}{owner:08x}");
    let mut found: Option<Vec<u64>> = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(LOSSES_PREFIX) || name == ours {
            continue;
        }
        let read = MapData::from_pin(entry.path())
            .ok()
            .and_then(|data| {
                aya::maps::PerCpuArray::<MapData, u64>::try_from(aya::maps::Map::PerCpuArray(data))
                    .ok()
            })
            .map(|map| {
                (0..counters)
                    .map(|index| map.get(&index, 0).map_or(0, |cpus| cpus.iter().sum()))
                    .collect::<Vec<u64>>()
            });
        let _ = fs::remove_file(entry.path());
        if let Some(losses) = read {
            match &mut found {
                Some(sum) => sum.iter_mut().zip(&losses).for_each(|(s, l)| *s += l),
                None => found = Some(losses),
            }
        }
    }
    found
}

/// Bumped when a pinned map's entries change meaning without changing size.
const LAYOUT_REVISION: u32 = 1;
const LINKS: &str = "links";
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Where this agent's probes are pinned, and what it found there.
pub struct PinPlan {
    pub dir: PathBuf,
    /// The maps of an earlier agent with this layout are there: adopt them.
    pub adopting: bool,
    /// When the earlier agent pinned them (its waits in progress started after that).
    pub pinned_at: Option<SystemTime>,
    /// Notes for the profile: probes of another layout replaced, with their data.
    pub notes: Vec<String>,
}

/// FNV-1a: stable across builds and toolchains (the pin directories' names must be).
struct Fnv(u64);

impl Fnv {
    const fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The layout of the pinned maps in `object` with `sizes`: type, key and value size,
/// entries and flags of each, as a short hex id.
pub fn layout_id(object: &[u8], sizes: &MapSizes) -> Result<String, ProbeError> {
    let parsed = aya_obj::Object::parse(object)
        .map_err(|err| ProbeError::Layout(format!("parsing the probe object: {err}")))?;
    let mut hasher = Fnv::new();
    hasher.write(&LAYOUT_REVISION.to_le_bytes());
    for name in PINNED_MAPS {
        let Some(map) = parsed.maps.get(*name) else {
            return Err(ProbeError::Layout(format!(
                "the probe object has no map {name}"
            )));
        };
        let entries = match *name {
            "THREADS" => sizes.threads,
            "DISK_REQUESTS" | "PENDING" => sizes.pending,
            "TOTALS_0" | "TOTALS_1" => sizes.totals,
            "SAMPLES_0" | "SAMPLES_1" => sizes.samples,
            "STACKS_0" | "STACKS_1" => sizes.stacks,
            _ => map.max_entries(),
        };
        hasher.write(name.as_bytes());
        for value in [
            map.map_type(),
            map.key_size(),
            map.value_size(),
            entries,
            map.map_flags(),
        ] {
            hasher.write(&value.to_le_bytes());
        }
    }
    Ok(format!("layout-{:016x}", hasher.0))
}

/// Whether `path` is on a bpffs.
fn on_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct it is given; the path is NUL-terminated.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &raw mut stat) == 0 && stat.f_type as u32 == BPF_FS_MAGIC
    }
}

/// The conventional bpffs mount point; mounted here when nothing is (systemd mounts it
/// at boot, minimal hosts do not).
const BPFFS: &str = "/sys/fs/bpf";

/// Mounts a bpffs at [`BPFFS`] if `base` lies under it and no bpffs is there yet.
fn ensure_bpffs(base: &Path) -> Result<(), String> {
    let root = Path::new(BPFFS);
    if !base.starts_with(root) || on_bpffs(root) {
        return Ok(());
    }
    // SAFETY: all pointers are valid NUL-terminated strings.
    let ret = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if ret == 0 {
        tracing::info!("mounted a bpffs at {BPFFS}");
        Ok(())
    } else {
        Err(format!(
            "no bpffs at {BPFFS}, and mounting one failed: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// Detaches every program pinned under `dir/links` whose pin name does not start with
/// `keep` (all of them when `keep` is empty); returns how many.
fn detach_links(dir: &Path, keep: &str) -> usize {
    let Ok(entries) = fs::read_dir(dir.join(LINKS)) else {
        return 0;
    };
    let mut detached = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !keep.is_empty() && name.starts_with(keep) {
            continue;
        }
        // Dropping the last reference to a link detaches its program.
        match PinnedLink::from_pin(entry.path()) {
            Ok(link) => drop(link.unpin()),
            Err(_) => drop(fs::remove_file(entry.path())),
        }
        detached += 1;
    }
    detached
}

/// Detaches the programs and removes the pins under `dir`, and `dir` itself; returns
/// how many programs were detached.
pub fn remove(dir: &Path) -> usize {
    let detached = detach_links(dir, "");
    let _ = fs::remove_dir(dir.join(LINKS));
    for name in PINNED_MAPS {
        let _ = fs::remove_file(dir.join(name));
    }
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(LOSSES_PREFIX)
        {
            let _ = fs::remove_file(entry.path());
        }
    }
    if let Err(err) = fs::remove_dir(dir)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("removing the probes' pins {}: {err}", dir.display());
    }
    // The agent's directory, once it holds no layout any more.
    if let Some(agent) = dir.parent() {
        let _ = fs::remove_dir(agent);
    }
    detached
}

/// Prepares pinning under `base` (one agent's directory) for `layout`: removes the pins
/// of other layouts there (detaching their programs) and tells whether there are maps
/// to adopt.
pub fn plan(base: &Path, layout: &str) -> Result<PinPlan, ProbeError> {
    let unusable = |reason: String| ProbeError::Pin {
        path: base.to_owned(),
        reason,
    };
    ensure_bpffs(base).map_err(unusable)?;
    fs::create_dir_all(base).map_err(|err| unusable(err.to_string()))?;
    if !on_bpffs(base) {
        return Err(unusable(
            "not on a bpffs (mount one: `mount -t bpf bpf /sys/fs/bpf`)".to_owned(),
        ));
    }
    let mut notes = Vec::new();
    if let Ok(entries) = fs::read_dir(base) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy() == layout {
                continue;
            }
            let programs = remove(&entry.path());
            let note = format!(
                "the probes of an earlier agent with another map layout were replaced ({programs} programs detached): what they had not drained, and the waits in progress, were lost"
            );
            tracing::warn!("{note}");
            notes.push(note);
        }
    }
    let dir = base.join(layout);
    fs::create_dir_all(dir.join(LINKS)).map_err(|err| unusable(err.to_string()))?;
    let generation = dir.join("GENERATION");
    let adopting = generation.exists();
    let pinned_at = adopting
        .then(|| fs::metadata(&generation).and_then(|m| m.modified()).ok())
        .flatten();
    Ok(PinPlan {
        dir,
        adopting,
        pinned_at,
        notes,
    })
}

/// Points the loader's pinned maps at their files in `plan`'s directory: existing pins
/// are adopted, missing ones created and pinned.
pub fn point_loader(plan: &PinPlan, loader: &mut EbpfLoader<'_>) {
    for name in PINNED_MAPS {
        loader.map_pin_path(name, plan.dir.join(name));
    }
}

/// Pins this agent's links (named after its owner tag) in `dir`.
fn pin_links(
    dir: &Path,
    owner: u32,
    links: Vec<(String, FdLink)>,
) -> Result<Vec<PinnedLink>, ProbeError> {
    links
        .into_iter()
        .map(|(name, link)| {
            let path = dir.join(LINKS).join(format!("{owner:08x}-{name}"));
            link.pin(&path).map_err(|err| ProbeError::Pin {
                path,
                reason: err.to_string(),
            })
        })
        .collect()
}

/// After the hand-over: detaches the programs of earlier owners.
fn detach_others(dir: &Path, owner: u32) -> usize {
    detach_links(dir, &format!("{owner:08x}-"))
}

/// What the hand-over left: the links (pinned where there is a plan) and, for adopted
/// maps, since when their waits may run.
pub struct HandedOver {
    pub pinned: Option<(PathBuf, Vec<PinnedLink>)>,
    pub unpinned: Vec<FdLink>,
    pub adopting: bool,
    pub measuring_since: Option<Instant>,
}

/// Pins the links (with a plan), makes this agent's programs count by writing `value`
/// (its owner tag and the active generation) into `GENERATION`, and detaches an earlier
/// agent's programs once none can still be running.
pub fn hand_over(
    plan: Option<PinPlan>,
    links: Vec<(String, FdLink)>,
    generation: &mut Array<MapData, u32>,
    value: u32,
    owner: u32,
    notes: &mut Vec<String>,
) -> Result<HandedOver, ProbeError> {
    let (pinned_links, unpinned) = match &plan {
        Some(plan) => match pin_links(&plan.dir, owner, links) {
            Ok(pinned) => (pinned, Vec::new()),
            Err(err) => {
                tracing::warn!("{err}; the programs detach if this agent dies");
                (Vec::new(), Vec::new())
            }
        },
        None => (
            Vec::new(),
            links.into_iter().map(|(_, link)| link).collect(),
        ),
    };
    generation
        .set(GENERATION_INDEX, value, 0)
        .map_err(|source| ProbeError::MapApi {
            map: "GENERATION",
            source,
        })?;
    let mut handed = HandedOver {
        pinned: None,
        unpinned,
        adopting: false,
        measuring_since: None,
    };
    let Some(plan) = plan else {
        return Ok(handed);
    };
    // The earlier programs may still be inside a run that read the old owner.
    bpf_sys::rcu_barrier(Barrier::Membarrier);
    let detached = detach_others(&plan.dir, owner);
    handed.adopting = plan.adopting;
    if plan.adopting {
        notes.push(format!(
            "adopted the pinned probes of an earlier agent that stopped uncleanly: its {detached} program links detached after the hand-over, its undrained data in this run's first profiles"
        ));
        handed.measuring_since = plan.pinned_at.map(instant_of);
    }
    tracing::info!(
        "probes pinned in {} ({})",
        plan.dir.display(),
        if plan.adopting {
            format!("adopted from an earlier agent, {detached} of its links detached")
        } else {
            "new".to_owned()
        }
    );
    notes.extend(plan.notes);
    handed.pinned = Some((plan.dir, pinned_links));
    Ok(handed)
}

/// The instant the earlier agent pinned its maps, for the wait-window check.
fn instant_of(time: SystemTime) -> Instant {
    let age = SystemTime::now()
        .duration_since(time)
        .unwrap_or(Duration::ZERO);
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

/// The pin directory of the agent whose spool is `spool_dir`, under `root`: one per
/// spool, so two agents on a host (tests, say) never adopt each other's probes.
pub fn agent_dir(root: &Path, spool_dir: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt as _;
    let spool = fs::canonicalize(spool_dir).unwrap_or_else(|_| spool_dir.to_owned());
    let mut hasher = Fnv::new();
    hasher.write(spool.as_os_str().as_bytes());
    root.join(format!("spool-{:016x}", hasher.0))
}
