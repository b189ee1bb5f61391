//! Draining one generation of the probes' maps: the generation flips, an RCU barrier
//! waits out programs still writing the retired one, which is then read and emptied
//! (hash maps in batches, the per-CPU totals caches slot by slot), with the names and
//! peers its entries refer to and the cumulative loss counters.

use std::{os::fd::AsFd, time::Instant};

use agent_common::{
    CACHE_USERS, GENERATION_INDEX, LOSS_COUNTERS, Loss, Peer, SYSCALL_SLOTS, SampleKey,
    SampleValue, Signal, StackTrace, SyscallSlot, TotalCache, TotalKey, TotalValue,
    generation_value,
};
use aya::maps::PerCpuValues;

use super::{Probes, bpf_sys, error::ProbeError};
use crate::metrics::METRICS;

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
    pub fn drain(&mut self) -> Result<Drained, ProbeError> {
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

    /// What an earlier agent left in the generation it retired and had not drained when
    /// it died (its maps adopted, see `pins`): once, right after the hand-over.
    pub fn take_leftover(&mut self) -> Result<Option<Drained>, ProbeError> {
        if !std::mem::take(&mut self.leftover_pending) {
            return Ok(None);
        }
        self.read_retired(self.active ^ 1).map(Some)
    }

    /// Reads and empties generation `retired`, which no program writes any more.
    fn read_retired(&mut self, retired: u32) -> Result<Drained, ProbeError> {
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
