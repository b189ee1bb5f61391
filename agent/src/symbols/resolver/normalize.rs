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

/// No user-space address reaches this high on any architecture the agent runs on
/// (x86-64 with 5-level paging ends below 2^56, arm64 below 2^52): a caller address at
/// or above it is a frame-pointer walk gone into data (e.g. the bytes of a string).
const USER_ADDRESS_LIMIT: u64 = 1 << 56;

/// How many addresses of a user stack (innermost first) to keep: all of them, or those
/// before its first caller address that cannot be a user address. The leaf is kept
/// whatever it is.
pub(super) fn usable_addresses(addresses: &[u64]) -> usize {
    addresses
        .iter()
        .skip(1)
        .position(|&address| address >= USER_ADDRESS_LIMIT)
        .map_or(addresses.len(), |bad| bad + 1)
}

/// Cuts a user stack (innermost first), normalized against a snapshot taken after it,
/// before its first caller address that no executable mapping covers; says whether it
/// cut. The leaf is kept whatever it is: an unmapped leaf is a fact worth showing.
pub(super) fn cut_at_unmapped(frames: &mut Vec<NormFrame>) -> bool {
    let bad = frames.iter().skip(1).position(
        |frame| matches!(frame, NormFrame::Unknown { reason, .. } if *reason == NOT_MAPPED),
    );
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
                self.request(key.0);
            }
        }
    }

    /// Normalizes a stack against its process's snapshot, or `None` to wait for a (newer)
    /// snapshot: none yet, or one taken before the stack whose mappings miss an address.
    /// Also says whether the stack was cut: in a snapshot taken after the stack, an
    /// address past the leaf that no executable mapping covers cannot be a return
    /// address. The frame-pointer walk went wrong there (a thread fresh out of `clone3`
    /// has no frame chain yet, and the kernel's walker follows whatever `rbp` holds), so
    /// the stack ends at the last good frame instead of listing garbage.
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
            if last_chance || exited {
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
        let cut = (fresh && cut_at_unmapped(&mut frames)) || impossible;
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
        assert!(cut_at_unmapped(&mut frames));
        assert_eq!(frames.len(), 2);
    }

    #[test]
    fn an_unmapped_leaf_and_other_unknowns_are_kept() {
        let mut frames = vec![unknown(NOT_MAPPED), jit(), unknown("anonymous"), jit()];
        assert!(!cut_at_unmapped(&mut frames));
        assert_eq!(frames.len(), 4);
    }
}
