//! Draining one generation of the probes' maps: the generation flips, an RCU barrier
//! waits out programs still writing the retired one, which is then read (hash maps in
//! batches, the per-CPU totals caches slot by slot), with the names and peers its
//! entries refer to and the cumulative loss counters. It is emptied only once what was
//! read is safe ([`Probes::settle`]): after `run` appended it to its drain journal, with
//! the journal record's time marked in `GENERATION` meanwhile. An agent killed at any
//! point of a drain leaves the retired generation either still in the maps or in its
//! journal (the mark says which), never in neither and never counted twice.

use std::{os::fd::AsFd, time::Instant};

use agent_common::{
    CACHE_USERS, GENERATION_INDEX, JOURNALED_HIGH_INDEX, JOURNALED_LOW_INDEX, LOSS_COUNTERS, Loss,
    Peer, SYSCALL_SLOTS, SampleKey, SampleValue, Signal, StackTrace, SyscallSlot, TotalKey,
    TotalValue, generation_value,
};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuValues};

use super::{Probes, bpf_sys, error::ProbeError};
use crate::metrics::METRICS;

/// One generation of aggregated data, read after it stopped receiving writes.
#[derive(Debug, Default)]
pub struct Drained {
    pub totals: Vec<(TotalKey, TotalValue)>,
    pub samples: Vec<(SampleKey, SampleValue)>,
    pub stacks: Vec<DrainedStack>,
    /// Cumulative loss counters, summed over CPUs, indexed by [`agent_common::Loss::index`].
    pub losses: Vec<u64>,
    /// Names the probes recorded for the threads (and processes) in this generation.
    pub names: Vec<(u32, String)>,
    /// The peers the network signals' entries in this generation refer to, by id.
    pub peers: Vec<(u32, Peer)>,
    /// When the probes started loading: every wait they measure started after it.
    pub measuring_since: Option<Instant>,
}

/// A drained stack: its id in the probes' stack map, its `STACK_*` flags and its valid
/// addresses only (the map's `StackTrace` is 1 KiB whatever the depth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainedStack {
    pub hash: u64,
    pub flags: u32,
    pub ips: Box<[u64]>,
}

impl DrainedStack {
    pub fn of_trace(hash: u64, trace: &StackTrace) -> Self {
        let len = (trace.len as usize).min(trace.ips.len());
        Self {
            hash,
            flags: trace.flags,
            ips: trace.ips[..len].into(),
        }
    }
}

/// What an earlier agent left in the retired generation of the maps it pinned.
#[derive(Debug)]
pub struct Leftover {
    pub drained: Drained,
    /// The time of the earlier agent's drain journal record that already holds this
    /// generation (it died while emptying it): its journal has it, not to be counted
    /// again when that journal's last record has this time.
    pub journaled_at: Option<i64>,
    /// The earlier agent's loss counters (cumulative, summed over CPUs) when its
    /// programs stopped counting: with its journal's, what it lost after its last drain.
    pub earlier_losses: Option<Vec<u64>>,
}

/// The retired generation a drain read and has not emptied yet: what to delete and
/// reset once what was read is safe.
#[derive(Debug, Default)]
pub(super) struct Unsettled {
    slot: usize,
    totals: Vec<TotalKey>,
    samples: Vec<SampleKey>,
    stacks: Vec<u64>,
    total_caches: Vec<u32>,
    syscall_slots: Vec<u32>,
    /// A journal record's time is marked in `GENERATION`.
    marked: bool,
}

impl Probes {
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
    /// The retired generation stays in the maps until [`Probes::settle`].
    pub fn drain(&mut self) -> Result<Drained, ProbeError> {
        // Never flip onto a generation that still holds data.
        self.settle()?;
        let retired = self.active;
        let next = retired ^ 1;
        self.generation_map
            .set(GENERATION_INDEX, generation_value(self.owner, next), 0)
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
        self.read_retired(retired)
    }

    /// What an earlier agent left in the generation it retired and had not emptied when
    /// it died (its maps adopted, see `pins`): once, right after the hand-over. Emptied
    /// by the next [`Probes::settle`] (at the latest, the first drain).
    pub fn take_leftover(&mut self) -> Result<Option<Leftover>, ProbeError> {
        if !std::mem::take(&mut self.leftover_pending) {
            return Ok(None);
        }
        let word = |map: &Array<MapData, u32>, index| {
            map.get(&index, 0).map_err(|source| ProbeError::MapApi {
                map: "GENERATION",
                source,
            })
        };
        let low = word(&self.generation_map, JOURNALED_LOW_INDEX)?;
        let high = word(&self.generation_map, JOURNALED_HIGH_INDEX)?;
        let mark = (i64::from(high) << 32) | i64::from(low);
        let drained = self.read_retired(self.active ^ 1)?;
        if let Some(unsettled) = &mut self.unsettled {
            // The earlier agent's mark goes with the generation it marked.
            unsettled.marked = mark != 0;
        }
        Ok(Some(Leftover {
            drained,
            journaled_at: (mark != 0).then_some(mark),
            earlier_losses: self.earlier_losses.take(),
        }))
    }

    /// Marks the retired generation just drained as being appended to the drain journal
    /// in the record of time `unix_ns`: from here until [`Probes::settle`] an agent
    /// adopting these maps looks for that record before counting what they hold.
    pub fn mark_journaled(&mut self, unix_ns: i64) -> Result<(), ProbeError> {
        let Some(unsettled) = &mut self.unsettled else {
            return Ok(());
        };
        for (index, half) in [
            (JOURNALED_LOW_INDEX, unix_ns as u32),
            (JOURNALED_HIGH_INDEX, (unix_ns >> 32) as u32),
        ] {
            self.generation_map
                .set(index, half, 0)
                .map_err(|source| ProbeError::MapApi {
                    map: "GENERATION",
                    source,
                })?;
        }
        unsettled.marked = true;
        Ok(())
    }

    /// Empties the retired generation the last drain read (what was read is safe: in
    /// the journal or past needing it) and clears the journal mark. Nothing to do when
    /// there is none.
    pub fn settle(&mut self) -> Result<(), ProbeError> {
        let Some(unsettled) = self.unsettled.take() else {
            return Ok(());
        };
        let slot = unsettled.slot;
        let map_error = |map: &'static str| move |source| ProbeError::Map { map, source };
        bpf_sys::delete_keys(self.totals[slot].fd().as_fd(), &unsettled.totals)
            .map_err(map_error("TOTALS"))?;
        bpf_sys::delete_keys(self.samples[slot].fd().as_fd(), &unsettled.samples)
            .map_err(map_error("SAMPLES"))?;
        bpf_sys::delete_keys(self.stacks[slot].fd().as_fd(), &unsettled.stacks)
            .map_err(map_error("STACKS"))?;
        for &index in &unsettled.total_caches {
            empty_per_cpu(&mut self.total_cache, index, "TOTAL_CACHE")?;
        }
        for &index in &unsettled.syscall_slots {
            empty_per_cpu(&mut self.syscall_cache, index, "SYSCALL_CACHE")?;
        }
        if unsettled.marked {
            for index in [JOURNALED_LOW_INDEX, JOURNALED_HIGH_INDEX] {
                self.generation_map
                    .set(index, 0, 0)
                    .map_err(|source| ProbeError::MapApi {
                        map: "GENERATION",
                        source,
                    })?;
            }
        }
        Ok(())
    }

    /// Reads generation `retired`, which no program writes any more, and remembers what
    /// [`Probes::settle`] has to empty.
    fn read_retired(&mut self, retired: u32) -> Result<Drained, ProbeError> {
        let slot = retired as usize;
        let mut totals: Vec<(TotalKey, TotalValue)> =
            bpf_sys::read_hash_map(self.totals[slot].fd().as_fd(), self.sizes.totals).map_err(
                |source| ProbeError::Map {
                    map: "TOTALS",
                    source,
                },
            )?;
        let samples: Vec<(SampleKey, SampleValue)> =
            bpf_sys::read_hash_map(self.samples[slot].fd().as_fd(), self.sizes.samples).map_err(
                |source| ProbeError::Map {
                    map: "SAMPLES",
                    source,
                },
            )?;
        let stacks = bpf_sys::read_hash_map_as(
            self.stacks[slot].fd().as_fd(),
            self.sizes.stacks,
            |&hash, trace: &StackTrace| DrainedStack::of_trace(hash, trace),
        )
        .map_err(|source| ProbeError::Map {
            map: "STACKS",
            source,
        })?;
        let mut unsettled = Unsettled {
            slot,
            totals: totals.iter().map(|(key, _)| *key).collect(),
            samples: samples.iter().map(|(key, _)| *key).collect(),
            stacks: stacks.iter().map(|stack| stack.hash).collect(),
            ..Unsettled::default()
        };
        for (index, (entries, capacity)) in [
            (totals.len(), self.sizes.totals),
            (samples.len(), self.sizes.samples),
            (stacks.len(), self.sizes.stacks),
        ]
        .into_iter()
        .enumerate()
        {
            METRICS.map_fill(index, entries, capacity);
        }
        unsettled.total_caches = self.read_total_caches(retired, &mut totals)?;
        unsettled.syscall_slots = self.read_syscall_cache(retired, &mut totals)?;
        tracing::debug!(
            "drained {} totals, {} samples, {} stacks ({} addresses)",
            totals.len(),
            samples.len(),
            stacks.len(),
            stacks.iter().map(|stack| stack.ips.len()).sum::<usize>()
        );
        self.unsettled = Some(unsettled);
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
        METRICS.drained(&losses);
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
    /// Adds what the per-CPU totals caches of generation `retired` hold to `totals`; the
    /// cache indices that held anything.
    fn read_total_caches(
        &mut self,
        retired: u32,
        totals: &mut Vec<(TotalKey, TotalValue)>,
    ) -> Result<Vec<u32>, ProbeError> {
        let mut held = Vec::new();
        for user in 0..CACHE_USERS {
            let index = user * 2 + retired;
            let per_cpu = self
                .total_cache
                .get(&index, 0)
                .map_err(|source| ProbeError::MapApi {
                    map: "TOTAL_CACHE",
                    source,
                })?;
            let before = totals.len();
            for cache in per_cpu.iter() {
                totals.extend(
                    cache
                        .entries
                        .iter()
                        .filter(|entry| entry.value.count != 0)
                        .map(|entry| (entry.key, entry.value)),
                );
            }
            if totals.len() != before {
                held.push(index);
            }
        }
        Ok(held)
    }

    /// Adds what the per-CPU syscall cache slots of generation `retired` hold to `totals`
    /// (one entry per CPU and slot; the accumulator merges them: counts, sums and buckets
    /// add up, maxima take the larger); the slots that held anything.
    fn read_syscall_cache(
        &mut self,
        retired: u32,
        totals: &mut Vec<(TotalKey, TotalValue)>,
    ) -> Result<Vec<u32>, ProbeError> {
        let mut held = Vec::new();
        let first = retired * SYSCALL_SLOTS;
        for index in first..first + SYSCALL_SLOTS {
            let per_cpu =
                self.syscall_cache
                    .get(&index, 0)
                    .map_err(|source| ProbeError::MapApi {
                        map: "SYSCALL_CACHE",
                        source,
                    })?;
            let before = totals.len();
            totals.extend(
                per_cpu
                    .iter()
                    .filter(|slot| slot.count != 0)
                    .map(SyscallSlot::total),
            );
            if totals.len() != before {
                held.push(index);
            }
        }
        Ok(held)
    }
}

/// Sets every CPU's value of entry `index` of a per-CPU array back to the default.
fn empty_per_cpu<T: aya::Pod + Default + Clone>(
    map: &mut PerCpuArray<MapData, T>,
    index: u32,
    name: &'static str,
) -> Result<(), ProbeError> {
    let api_error = |source| ProbeError::MapApi { map: name, source };
    let cpus = map.get(&index, 0).map_err(api_error)?.len();
    let empty = PerCpuValues::try_from(vec![T::default(); cpus])
        .map_err(|source| ProbeError::Map { map: name, source })?;
    map.set(index, empty, 0).map_err(api_error)
}

/// Whether entries of `signal` carry a peer id in `aux`.
pub fn is_network(signal: u8) -> bool {
    [Signal::Connect, Signal::SocketWait, Signal::Tcp]
        .iter()
        .any(|&network| network as u8 == signal)
}
