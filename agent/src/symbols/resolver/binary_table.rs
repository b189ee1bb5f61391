//! The binaries the resolver symbolizes, one entry per build-id (file identity without
//! one) with its cache of symbolized frames: offsets wanted, batched to the symbolization
//! lanes, turned into frames, evicted when unused.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, atomic::Ordering},
};

use stallscope_profile::{BinaryInfo, Frame, FrameKind};

use super::{Resolver, normalize::NormFrame, shared::Outcome};
use crate::{
    metrics::{METRICS, SymbolCache},
    process::procfs::FileId,
    symbols::{
        binaries::{self, BinaryFile, BinaryId, BinaryKey},
        elf,
        lanes::{self, Failure, Job},
        symbolize::{self, Frames, LaneSymbolizers},
    },
};

pub(super) enum FileState {
    Ready(BinaryId),
    Failed(String),
}

/// Binaries kept when unused for a while; past it the least recently used are dropped.
pub(super) const MAX_BINARIES: usize = 1024;
/// Symbolized frames kept over all binaries before old binaries' caches are dropped.
pub(super) const MAX_CACHED_OFFSETS: usize = 1 << 20;

/// One binary and its symbolized frames.
pub struct Binary {
    pub key: BinaryKey,
    pub file: Arc<BinaryFile>,
    /// Symbolized frames by file offset, with the profile period that last used them.
    pub frames: HashMap<u64, (Frames, u64)>,
    /// Offsets asked for and not answered yet.
    pub requested: HashSet<u64>,
    /// Offsets waiting to be asked for (batched per poll).
    pub wanted: Vec<u64>,
    /// Profile period this binary was last used in (for eviction).
    pub last_used: u64,
    pub stacks: u64,
    pub truncated_stacks: u64,
    /// Why symbolization failed for its last batch, if it did.
    pub error: Option<String>,
    /// Whether its parsed symbol source is too large for a lane to keep between jobs:
    /// its offsets are then asked for once a period, when the period settles.
    pub parsed_per_job: bool,
}

impl Binary {
    pub fn new(key: BinaryKey, file: Arc<BinaryFile>, dwarf_max: u64) -> Self {
        Self {
            parsed_per_job: !symbolize::kept_between_jobs(&file, dwarf_max),
            key,
            file,
            frames: HashMap::new(),
            requested: HashSet::new(),
            wanted: Vec::new(),
            last_used: 0,
            stacks: 0,
            truncated_stacks: 0,
            error: None,
        }
    }

    /// Queues `offset` for symbolization unless known or asked for already.
    pub fn want(&mut self, offset: u64) {
        let cached = self.frames.contains_key(&offset);
        METRICS.symbol_lookups(SymbolCache::User, u64::from(cached), u64::from(!cached));
        if !cached && self.requested.insert(offset) {
            self.wanted.push(offset);
        }
    }

    /// The facts a profile carries about this binary; resets its per-profile counts.
    pub fn take_info(&mut self) -> BinaryInfo {
        BinaryInfo {
            path: self.file.path.to_string(),
            build_id: self.file.info.build_id_hex(),
            debug_file: self
                .file
                .debug
                .as_ref()
                .map(|debug| debug.path.display().to_string()),
            frame_pointers: self
                .file
                .info
                .frame_pointers
                .map(elf::FramePointers::present),
            stacks: std::mem::take(&mut self.stacks),
            truncated_stacks: std::mem::take(&mut self.truncated_stacks),
            error: self.error.clone(),
        }
    }
}

impl Resolver {
    /// Registers an opened binary under its build-id (or file identity), sharing the
    /// entry of an identical build opened before.
    pub(super) fn add_binary(&mut self, file_id: FileId, file: Arc<BinaryFile>) {
        let key = match &file.info.build_id {
            Some(id) => BinaryKey::BuildId(Arc::from(id.as_slice())),
            None => BinaryKey::File(file_id),
        };
        let id = if let Some(&id) = self.by_key.get(&key) {
            id
        } else {
            let id = self.next_binary;
            self.next_binary += 1;
            self.by_key.insert(key.clone(), id);
            let binary = Binary::new(key, file, self.settings.dwarf_max);
            self.binaries.insert(id, binary);
            id
        };
        self.files.insert(file_id, FileState::Ready(id));
        if let (Some(offsets), Some(binary)) =
            (self.waiting.remove(&file_id), self.binaries.get_mut(&id))
        {
            for offset in offsets {
                binary.want(offset);
            }
        }
    }

    pub(super) fn want(&mut self, file: FileId, offset: u64) {
        match self.files.get(&file) {
            Some(FileState::Ready(id)) => {
                if let Some(binary) = self.binaries.get_mut(id) {
                    binary.want(offset);
                }
            }
            Some(FileState::Failed(_)) => {}
            None => {
                self.waiting.entry(file).or_default().insert(offset);
            }
        }
    }

    /// Submits the offsets wanted to the lanes: of a binary parsed for every job, only
    /// when the period is `settling` (one parse a period, not one a drain).
    pub(super) fn request_symbols(&mut self, settling: bool) {
        let dwarf_max = self.settings.dwarf_max;
        for (&id, binary) in &mut self.binaries {
            if binary.wanted.is_empty() || (binary.parsed_per_job && !settling) {
                continue;
            }
            let offsets = std::mem::take(&mut binary.wanted);
            let file = Arc::clone(&binary.file);
            self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
            let (shared, failed) = (Arc::clone(&self.shared), Arc::clone(&self.shared));
            let failed_offsets = offsets.clone();
            self.symbol_lanes.submit(Job::new(
                lanes::key_of(&binary.key),
                self.settings.symbolize_deadline,
                move |lane: &mut LaneSymbolizers| {
                    let frames = symbolize::symbolize_offsets(lane, id, &file, &offsets, dwarf_max);
                    shared.report(Outcome::Symbols {
                        binary: id,
                        offsets,
                        result: Ok(frames),
                    });
                },
                move |failure: Failure| {
                    failed.report(Outcome::Symbols {
                        binary: id,
                        offsets: failed_offsets,
                        result: Err(failure.reason().to_owned()),
                    });
                },
            ));
        }
    }

    /// The frames of a user stack (innermost first) and whether it is probably truncated.
    pub fn user_frames(&mut self, pid: u32, key: u64) -> Option<(Vec<Frame>, bool)> {
        let stack = Arc::clone(self.stacks.get(&(pid, key))?);
        let mut frames = Vec::with_capacity(stack.len());
        let mut outermost_binary = None;
        for norm in stack.iter() {
            outermost_binary = None;
            match norm {
                NormFrame::File { file, offset, path } => {
                    let binary = match self.files.get(file) {
                        Some(FileState::Ready(id)) => {
                            outermost_binary = Some(*id);
                            self.binaries.get_mut(id)
                        }
                        _ => None,
                    };
                    let period = self.period;
                    let symbolized = binary.and_then(|b| {
                        b.last_used = period;
                        let (frames, used) = b.frames.get_mut(offset)?;
                        *used = period;
                        Some(&*frames)
                    });
                    if let Some(symbolized) = symbolized {
                        frames.extend(symbolized.iter().cloned());
                    } else {
                        let why = match self.files.get(file) {
                            Some(FileState::Failed(reason)) => reason.as_str(),
                            _ => "not symbolized in time",
                        };
                        frames.push(symbolize::unknown_frame(
                            format!("[unknown] {path}+{offset:#x} ({why})"),
                            Some(path.to_string()),
                            *offset,
                            FrameKind::User,
                        ));
                    }
                }
                NormFrame::Jit(name) => frames.push(symbolize::unknown_frame(
                    name.to_string(),
                    Some("[jit]".to_owned()),
                    0,
                    FrameKind::User,
                )),
                NormFrame::Unknown {
                    address,
                    module,
                    reason,
                } => {
                    let name = if reason.is_empty() {
                        format!("[unknown] {address:#x}")
                    } else {
                        format!("[unknown] {address:#x} ({reason})")
                    };
                    frames.push(symbolize::unknown_frame(
                        name,
                        module.as_deref().map(str::to_owned),
                        *address,
                        FrameKind::User,
                    ));
                }
            }
        }
        let truncated = frames.len() < agent_common::MAX_STACK_DEPTH
            && frames
                .last()
                .is_some_and(|outermost| !binaries::reaches_root(&outermost.function));
        if let Some(binary) = outermost_binary.and_then(|id| self.binaries.get_mut(&id)) {
            binary.stacks += 1;
            binary.truncated_stacks += u64::from(truncated);
        }
        self.truncated_stacks += u64::from(truncated);
        Some((frames, truncated))
    }

    /// Facts about the binaries used this period; resets their counters.
    pub fn take_binaries(&mut self) -> Vec<BinaryInfo> {
        let period = self.period;
        let mut infos: Vec<BinaryInfo> = self
            .binaries
            .values_mut()
            .filter(|b| b.last_used == period)
            .map(Binary::take_info)
            .collect();
        infos.sort_by(|a, b| a.path.cmp(&b.path));
        infos
    }

    /// Binaries used this period whose DWARF is over the budget (symbolized from their
    /// symbol tables): path and bytes of DWARF.
    pub fn symbols_only(&self) -> Vec<(String, u64)> {
        let mut over: Vec<(String, u64)> = self
            .binaries
            .values()
            .filter(|b| {
                b.last_used == self.period && b.file.dwarf_bytes() > self.settings.dwarf_max
            })
            .map(|b| (b.file.path.to_string(), b.file.dwarf_bytes()))
            .collect();
        over.sort();
        over
    }

    pub fn dwarf_max(&self) -> u64 {
        self.settings.dwarf_max
    }

    /// Forgets the symbolized offsets no stack used for
    /// [`KEEP_PERIODS`](crate::symbols::KEEP_PERIODS) periods. Offsets can keep
    /// coming on a busy host (a frame-pointer walk through code built without frame
    /// pointers reads return addresses that are anything, each a new offset); the
    /// capacity alone allowed a million.
    pub(super) fn forget_unused_offsets(&mut self) {
        let period = self.period;
        let keep = u64::from(crate::symbols::KEEP_PERIODS);
        for binary in self.binaries.values_mut() {
            binary
                .frames
                .retain(|_, (_, used)| period.saturating_sub(*used) < keep);
        }
    }

    pub(super) fn evict_binaries(&mut self) {
        let cached: usize = self.binaries.values().map(|b| b.frames.len()).sum();
        if self.binaries.len() <= MAX_BINARIES && cached <= MAX_CACHED_OFFSETS {
            return;
        }
        let mut by_age: Vec<(u64, BinaryId)> = self
            .binaries
            .iter()
            .filter(|(_, b)| {
                b.requested.is_empty()
                    && b.last_used < self.period
                    && b.file.file_id != binaries::VDSO_FILE
            })
            .map(|(&id, b)| (b.last_used, id))
            .collect();
        by_age.sort_unstable();
        let mut remaining_cached = cached;
        let mut count = self.binaries.len();
        for (_, id) in by_age {
            if count <= MAX_BINARIES / 2 && remaining_cached <= MAX_CACHED_OFFSETS / 2 {
                break;
            }
            if let Some(binary) = self.binaries.remove(&id) {
                remaining_cached -= binary.frames.len();
                count -= 1;
                self.by_key.remove(&binary.key);
                self.files
                    .retain(|_, state| !matches!(state, FileState::Ready(b) if *b == id));
            }
        }
        if let Ok(mut opening) = self.shared.opening.lock() {
            let files = &self.files;
            opening.retain(|file| files.contains_key(file));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        process::procfs::{find_mapping, parse_maps},
        symbols::resolver::ResolverSettings,
    };

    #[test]
    fn a_binary_parsed_for_every_job_is_symbolized_once_a_period() {
        let maps = std::fs::read("/proc/self/maps").expect("own maps");
        let mappings = parse_maps(&maps).expect("own maps parse").code;
        let here = a_binary_parsed_for_every_job_is_symbolized_once_a_period as *const () as u64;
        let mapping = find_mapping(&mappings, here).expect("mapped");
        let file_id = mapping.file.expect("a file");
        let binary = binaries::open_binary(std::process::id(), mapping).expect("opens");
        // This test binary (a debug build, over 24 MB) is larger than a lane's budget.
        assert!(!symbolize::kept_between_jobs(&binary, u64::MAX));
        let mut resolver = Resolver::new(ResolverSettings::default());
        resolver.add_binary(file_id, Arc::new(binary));
        let Some(FileState::Ready(id)) = resolver.files.get(&file_id) else {
            panic!("the binary is registered");
        };
        let id = *id;
        let offset = mapping.file_offset(here);
        resolver.want(file_id, offset);
        // A drain's poll leaves its offsets for the period's end.
        resolver.poll();
        assert_eq!(resolver.binaries[&id].wanted, [offset]);
        assert_eq!(resolver.shared.in_flight.load(Ordering::Relaxed), 0);
        resolver.settle();
        let (frames, _) = &resolver.binaries[&id].frames[&offset];
        assert!(
            frames
                .iter()
                .any(|f| f.function.contains("a_binary_parsed_for_every_job")),
            "{frames:?}"
        );
    }
}
