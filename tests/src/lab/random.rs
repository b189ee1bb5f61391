//! Randomised injections from a seed: which mutex or peer, how strong, and onset jitter.
//! The same seed gives the same run (parameters and onsets), so a failing evaluation
//! run can be repeated.

use std::time::Duration;

use crate::lab::{
    protocol::DemoMutex,
    truth::{DemoPeer, Fault, FaultClass},
};

/// SplitMix64: small, fast, and good enough to draw test parameters.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [low, high].
    pub fn between(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// A duration uniform in [low, high].
    pub fn duration(&mut self, low: Duration, high: Duration) -> Duration {
        Duration::from_secs_f64(self.between(low.as_secs_f64(), high.as_secs_f64()))
    }

    /// One of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next_u64() % items.len() as u64) as usize]
    }
}

/// The ranges injections are drawn from. Each is large enough that the service's
/// latency clearly rises at the lab's load, and small enough that it does not collapse
/// (the queue stays bounded), so the degradation ends when the injection does.
pub fn random_fault(class: FaultClass, rng: &mut Rng) -> Fault {
    match class {
        FaultClass::Healthy => Fault::Healthy,
        FaultClass::LoadDoubling => Fault::LoadDoubling,
        FaultClass::Lock => {
            let hold = rng.duration(Duration::from_millis(40), Duration::from_millis(80));
            Fault::Lock {
                mutex: rng.pick(&DemoMutex::ALL),
                hold,
                period: hold.mul_f64(rng.between(2.0, 3.0)),
            }
        }
        FaultClass::SlowPeer => Fault::SlowPeer {
            peer: rng.pick(&DemoPeer::ALL),
            extra_delay: rng.duration(Duration::from_millis(20), Duration::from_millis(50)),
        },
        FaultClass::CpuHog => Fault::CpuHog {
            threads: 2 * std::thread::available_parallelism().map_or(1, usize::from)
                + (rng.next_u64() % 3) as usize,
        },
        FaultClass::Disk => {
            let stall = rng.duration(Duration::from_millis(150), Duration::from_millis(300));
            Fault::Disk {
                stall,
                period: stall.mul_f64(rng.between(2.0, 3.0)),
            }
        }
        FaultClass::Deploy => Fault::Deploy {
            tax_table: rng.duration(Duration::from_millis(8), Duration::from_millis(14)),
        },
        FaultClass::PacketLoss => Fault::PacketLoss {
            peer: rng.pick(&DemoPeer::ALL),
            percent: 8 + (rng.next_u64() % 8) as u32,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_faults() {
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            FaultClass::INJECTIONS
                .map(|class| random_fault(class, &mut rng))
                .to_vec()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let x = rng.between(2.0, 3.0);
            assert!((2.0..=3.0).contains(&x));
        }
    }
}
