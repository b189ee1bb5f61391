//! User stacks normalized against their process's snapshot: each address becomes
//! (binary file, file offset), a JIT symbol or an explicit unknown, as soon as the
//! process is read; a walk that left mapped code is cut there.

use std::{sync::Arc, time::Instant};

use super::Resolver;
use crate::{
    process::{
        procfs::{self, FileId},
        snapshot::ProcessSnapshot,
    },
    symbols::{binaries, symbolize},
};

/// One address of a normalized user stack.
#[derive(Debug, Clone)]
pub(super) enum NormFrame {
    File {
        file: FileId,
        offset: u64,
        path: Arc<str>,
    },
    Jit(Arc<str>),
    Unknown {
        address: u64,
        module: Option<Arc<str>>,
        reason: &'static str,
    },
}

pub(super) struct PendingStack {
    /// Lookup addresses (return addresses minus one).
    pub(super) addresses: Vec<u64>,
    pub(super) since: Instant,
}

pub(super) const NOT_MAPPED: &str = "not mapped when the process was read";
/// A caller address in a mapped file's data: never a return address.
pub(super) const NOT_CODE: &str = "in a mapped file's data, not its code";

/// No user-space address reaches this high on any architecture the agent runs on
/// (x86-64 with 5-level paging ends below 2^56, arm64 below 2^52): a caller address at
/// or above it is a frame-pointer walk gone into data (e.g. the bytes of a string).
const USER_ADDRESS_LIMIT: u64 = 1 << 56;

/// Nothing is mapped in the first page (the kernel's `mmap_min_addr` is at least that):
/// a caller address below it (a zero read as a return address) ends a walk too.
const USER_ADDRESS_MIN: u64 = 0x1000;

/// How many addresses of a user stack (innermost first) to keep: all of them, or those
/// before its first caller address that cannot be a user address. The leaf is kept
/// whatever it is.
pub(super) fn usable_addresses(addresses: &[u64]) -> usize {
    addresses
        .iter()
        .skip(1)
        .position(|&address| !(USER_ADDRESS_MIN..USER_ADDRESS_LIMIT).contains(&address))
        .map_or(addresses.len(), |bad| bad + 1)
}

/// Cuts a user stack (innermost first) before its first caller address that cannot be a
/// return address; says whether it cut. In a mapped file's data, never; covered by no
/// executable mapping, only when the snapshot was `fresh` (taken after the stack: an
/// older one may miss a library loaded since). The leaf is kept whatever it is: an
/// unmapped leaf is a fact worth showing.
pub(super) fn cut_at_bad_caller(frames: &mut Vec<NormFrame>, fresh: bool) -> bool {
    let bad = frames.iter().skip(1).position(|frame| {
        matches!(frame, NormFrame::Unknown { reason, .. }
            if *reason == NOT_CODE || (fresh && *reason == NOT_MAPPED))
    });
    if let Some(good) = bad {
        frames.truncate(good + 1);
    }
    bad.is_some()
}

/// One address of a stack against its process's snapshot; `stale` is set when the
/// snapshot may be too old to map it.
pub(super) fn normalize_address(
    snapshot: &ProcessSnapshot,
    address: u64,
    stale: &mut bool,
) -> NormFrame {
    let Some(mapping) = procfs::find_mapping(&snapshot.maps, address) else {
        if procfs::in_ranges(&snapshot.file_data, address) {
            return NormFrame::Unknown {
                address,
                module: None,
                reason: NOT_CODE,
            };
        }
        *stale = true;
        return NormFrame::Unknown {
            address,
            module: None,
            reason: NOT_MAPPED,
        };
    };
    if let Some(file) = mapping.file {
        return NormFrame::File {
            file,
            offset: mapping.file_offset(address),
            path: Arc::clone(&mapping.path),
        };
    }
    if mapping.path.is_empty() {
        if let Some(name) = snapshot.perf_map.as_ref().and_then(|m| m.lookup(address)) {
            return NormFrame::Jit(Arc::clone(name));
        }
        *stale = true;
        return NormFrame::Unknown {
            address,
            module: None,
            reason: "JIT code without a perf map entry",
        };
    }
    if &*mapping.path == "[vdso]" {
        return NormFrame::File {
            file: binaries::VDSO_FILE,
            offset: mapping.file_offset(address),
            path: Arc::clone(&mapping.path),
        };
    }
    NormFrame::Unknown {
        address,
        module: Some(Arc::clone(&mapping.path)),
        reason: "",
    }
}

impl Resolver {
    /// A user stack (addresses innermost first) of process `pid`, seen for the first time
    /// under `key`; normalized now or as soon as the process is read.
    pub fn add_user_stack(&mut self, pid: u32, key: u64, ips: &[u64]) {
        if self.stacks.contains_key(&(pid, key)) || self.pending.contains_key(&(pid, key)) {
            return;
        }
        self.discover(pid);
        self.pending.insert(
            (pid, key),
            PendingStack {
                addresses: symbolize::lookup_addresses(ips, true),
                since: Instant::now(),
            },
        );
        self.normalize_pending(false);
    }

    pub(super) fn normalize_pending(&mut self, last_chance: bool) {
        let keys: Vec<(u32, u64)> = self.pending.keys().copied().collect();
        for key in keys {
            let Some(pending) = self.pending.get(&key) else {
                continue;
            };
            if let Some((frames, cut)) = self.normalize(key.0, pending, last_chance) {
                self.pending.remove(&key);
                self.cut_stacks += u64::from(cut);
                for frame in frames.iter() {
                    if let NormFrame::File { file, offset, .. } = frame {
                        self.want(*file, *offset);
                    }
                }
                self.stacks.insert(key, frames);
            } else {
                self.request(key.0, false);
            }
        }
    }

    /// Normalizes a stack against its process's snapshot, or `None` to wait for a (newer)
    /// snapshot: none yet, or one taken before the stack whose mappings miss an address.
    /// Also says whether the stack was cut: an address past the leaf in a mapped file's
    /// data, or (in a snapshot taken after the stack) one no executable mapping covers,
    /// cannot be a return address. The frame-pointer walk went wrong there (a thread
    /// fresh out of `clone3` has no frame chain yet, code built without frame pointers
    /// such as the dynamic loader uses `rbp` for data, and the kernel's walker follows
    /// whatever `rbp` holds), so the stack ends at the last good frame instead of listing
    /// garbage.
    pub(super) fn normalize(
        &self,
        pid: u32,
        pending: &PendingStack,
        last_chance: bool,
    ) -> Option<(Arc<[NormFrame]>, bool)> {
        let entry = self.processes.get(&pid);
        let exited = entry.is_some_and(|e| e.exited);
        // Impossible addresses end the walk whatever the snapshot says.
        let usable = usable_addresses(&pending.addresses);
        let addresses = &pending.addresses[..usable];
        let impossible = usable < pending.addresses.len();
        let Some(snapshot) = entry.and_then(|e| e.snapshot.as_ref()) else {
            // An exited child whose parent's read is under way still gets its snapshot.
            if last_chance || (exited && !self.awaits_parents_read(pid)) {
                let reason = "process exited before its memory map was read";
                let frames = addresses
                    .iter()
                    .map(|&address| NormFrame::Unknown {
                        address,
                        module: None,
                        reason,
                    })
                    .collect();
                return Some((frames, impossible));
            }
            return None;
        };
        let mut stale = false;
        let mut frames: Vec<NormFrame> = addresses
            .iter()
            .map(|&address| normalize_address(snapshot, address, &mut stale))
            .collect();
        let fresh = !snapshot.inherited && snapshot.taken >= pending.since;
        if stale && !last_chance && !exited && !fresh {
            return None;
        }
        let cut = cut_at_bad_caller(&mut frames, fresh) || impossible;
        Some((frames.into(), cut))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown(reason: &'static str) -> NormFrame {
        NormFrame::Unknown {
            address: 0x55d5_a199_902f,
            module: None,
            reason,
        }
    }

    fn jit() -> NormFrame {
        NormFrame::Jit(Arc::from("jitted"))
    }

    #[test]
    fn a_walk_into_impossible_addresses_ends_before_them() {
        // `.proc/se` read as a return address: past any user address space.
        let garbage = 0x6573_2f63_6f72_702e;
        assert_eq!(
            usable_addresses(&[0x55d5_a199_902f, 0x55d5_a199_9100, garbage, 1]),
            2
        );
        assert_eq!(usable_addresses(&[0x55d5_a199_902f, 0x7ffd_0000_1000]), 2);
        // A zero read as a return address ends the walk too.
        assert_eq!(
            usable_addresses(&[0x55d5_a199_902f, 0, 0x7ffd_0000_1000]),
            1
        );
        // The leaf is kept whatever it is.
        assert_eq!(usable_addresses(&[garbage]), 1);
        assert_eq!(usable_addresses(&[]), 0);
    }

    #[test]
    fn a_walk_into_unmapped_memory_is_cut_before_it() {
        let mut frames = vec![
            jit(),
            jit(),
            unknown(NOT_MAPPED),
            unknown(NOT_MAPPED),
            jit(),
        ];
        let mut stale = frames.clone();
        assert!(cut_at_bad_caller(&mut frames, true));
        assert_eq!(frames.len(), 2);
        // A snapshot older than the stack may miss a library loaded since.
        assert!(!cut_at_bad_caller(&mut stale, false));
        assert_eq!(stale.len(), 5);
    }

    #[test]
    fn a_walk_into_a_files_data_is_cut_whatever_the_snapshots_age() {
        for fresh in [true, false] {
            let mut frames = vec![jit(), jit(), unknown(NOT_CODE), jit()];
            assert!(cut_at_bad_caller(&mut frames, fresh));
            assert_eq!(frames.len(), 2);
        }
    }

    #[test]
    fn an_unmapped_leaf_and_other_unknowns_are_kept() {
        let mut frames = vec![unknown(NOT_MAPPED), jit(), unknown("anonymous"), jit()];
        assert!(!cut_at_bad_caller(&mut frames, true));
        assert_eq!(frames.len(), 4);
        let mut frames = vec![unknown(NOT_CODE), jit()];
        assert!(!cut_at_bad_caller(&mut frames, false));
    }
}
