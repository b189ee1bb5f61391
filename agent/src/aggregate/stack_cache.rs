//! The stacks the accumulator remembers between drains: raw addresses as the probes
//! stored them, and kernel stacks symbolized into the shared frame table. Each is kept
//! while it is used: an entry no sample touched for [`KEEP_PERIODS`] profile periods is
//! forgotten, and the frame table is rebuilt each period from the kernel stacks kept.
//! What the daemon holds is then bounded by what a few periods see, not by everything
//! the host ever ran (a host that starts a hundred short-lived processes a second brings
//! a thousand new raw stacks every ten seconds: user addresses differ with each process's
//! layout).

use std::collections::{HashMap, HashSet};

use stallscope_profile::{Frame, FrameId, Profile, SampleType};

use crate::symbols::KEEP_PERIODS;

/// Most raw stacks kept at once, whatever the periods: past it, only the current
/// period's stay.
const RAW_CAPACITY: usize = 65_536;

struct Kept<T> {
    value: T,
    /// The period that last used it.
    used: u32,
}

/// Raw and symbolized kernel stacks, by the probes' stack hash.
#[derive(Default)]
pub struct StackCache {
    period: u32,
    raw: HashMap<u64, Kept<Box<[u64]>>>,
    /// Symbolized kernel stacks, by (hash, whether the leaf address is exact).
    kernel: HashMap<(u64, bool), Kept<Vec<FrameId>>>,
    /// Kernel stacks (by hash) inside `execve`.
    exec: HashSet<u64>,
}

impl StackCache {
    /// Remembers a stack the probes stored (only its valid addresses).
    pub fn insert_raw(&mut self, hash: u64, ips: &[u64]) {
        let period = self.period;
        self.raw
            .entry(hash)
            .and_modify(|kept| kept.used = period)
            .or_insert_with(|| Kept {
                value: ips.into(),
                used: period,
            });
    }

    /// Bounds the raw stacks after a drain that brought more than [`RAW_CAPACITY`].
    pub fn bound_raw(&mut self) {
        if self.raw.len() > RAW_CAPACITY {
            let period = self.period;
            self.raw.retain(|_, kept| kept.used == period);
        }
    }

    /// The addresses of a raw stack, marked as used.
    pub fn raw(&mut self, hash: u64) -> Option<&[u64]> {
        let kept = self.raw.get_mut(&hash)?;
        kept.used = self.period;
        Some(&kept.value)
    }

    /// Whether a kernel stack is symbolized already (marking it used if so).
    pub fn touch_kernel(&mut self, key: (u64, bool)) -> bool {
        match self.kernel.get_mut(&key) {
            Some(kept) => {
                kept.used = self.period;
                true
            }
            None => false,
        }
    }

    pub fn insert_kernel(&mut self, key: (u64, bool), frames: Vec<FrameId>, in_exec: bool) {
        if in_exec {
            self.exec.insert(key.0);
        }
        self.kernel.insert(
            key,
            Kept {
                value: frames,
                used: self.period,
            },
        );
    }

    /// The frames of a symbolized kernel stack.
    pub fn kernel(&self, key: (u64, bool)) -> Option<&[FrameId]> {
        self.kernel.get(&key).map(|kept| kept.value.as_slice())
    }

    /// Whether a kernel stack (by hash) is inside `execve`.
    pub fn in_exec(&self, hash: u64) -> bool {
        self.exec.contains(&hash)
    }

    /// Ends a profile period: forgets the stacks no sample used for [`KEEP_PERIODS`]
    /// periods and returns the next shared frame table: the frames of the kernel stacks
    /// kept, taken from the period's table `frames` and renumbered.
    pub fn end_period(&mut self, frames: &[Frame], sample_types: Vec<SampleType>) -> Profile {
        let period = self.period;
        let recent = |kept_used: u32| period.wrapping_sub(kept_used) < KEEP_PERIODS;
        self.raw.retain(|_, kept| recent(kept.used));
        self.kernel.retain(|_, kept| recent(kept.used));
        let kernel = &self.kernel;
        self.exec.retain(|hash| {
            kernel.contains_key(&(*hash, false)) || kernel.contains_key(&(*hash, true))
        });
        let mut fresh = Profile::new(sample_types);
        for kept in self.kernel.values_mut() {
            for id in &mut kept.value {
                if let Some(frame) = frames.get(*id as usize) {
                    *id = fresh.intern(frame.clone());
                }
            }
        }
        self.period = self.period.wrapping_add(1);
        fresh
    }

    /// Raw and symbolized kernel stacks held (for the daemon's memory figures).
    pub fn sizes(&self) -> (usize, usize) {
        (self.raw.len(), self.kernel.len())
    }
}

#[cfg(test)]
mod tests {
    use stallscope_profile::{Frame, Profile};

    use super::{KEEP_PERIODS, StackCache};

    #[test]
    fn unused_stacks_are_forgotten_and_used_ones_kept_with_their_frames() {
        let mut table = Profile::default();
        let mut cache = StackCache::default();
        cache.insert_raw(1, &[0x10, 0x20]);
        cache.insert_raw(2, &[0x30]);
        let a = table.intern(Frame::synthetic("a"));
        let b = table.intern(Frame::synthetic("b"));
        cache.insert_kernel((7, false), vec![b], true);
        cache.insert_kernel((8, false), vec![a], false);
        for _ in 0..=KEEP_PERIODS {
            // Stack 1 and kernel stack 7 are used every period; 2 and 8 never again.
            assert!(cache.raw(1).is_some());
            assert!(cache.touch_kernel((7, false)));
            table = cache.end_period(&table.frames, Vec::new());
        }
        assert!(cache.raw(2).is_none(), "an unused raw stack is forgotten");
        assert!(cache.kernel((8, false)).is_none());
        assert_eq!(cache.raw(1), Some(&[0x10, 0x20][..]));
        assert!(cache.in_exec(7));
        // The table holds only the kept stack's frame, renumbered.
        assert_eq!(table.frames.len(), 1);
        let kept = cache.kernel((7, false)).expect("kernel stack 7 is kept");
        assert_eq!(table.frames[kept[0] as usize].function, "b");
    }

    #[test]
    fn a_flood_of_raw_stacks_keeps_only_the_current_period() {
        let mut cache = StackCache::default();
        cache.insert_raw(0, &[1]);
        let table = Profile::default();
        cache.end_period(&table.frames, Vec::new());
        for hash in 1..=super::RAW_CAPACITY as u64 + 1 {
            cache.insert_raw(hash, &[hash]);
        }
        cache.bound_raw();
        assert!(cache.raw(0).is_none());
        assert_eq!(cache.sizes().0, super::RAW_CAPACITY + 1);
    }
}
