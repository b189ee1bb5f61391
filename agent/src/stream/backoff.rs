//! The sender's waits between reconnection attempts: exponential, with jitter so that
//! agents cut off together do not reconnect together.

use std::time::Duration;

/// Exponential backoff with jitter: each wait is drawn from [cap/2, cap], the cap
/// doubling from 250 ms up to the maximum.
pub(super) struct Backoff {
    cap: Duration,
    max: Duration,
    seed: u64,
}

impl Backoff {
    const START: Duration = Duration::from_millis(250);

    pub(super) fn new(max: Duration) -> Self {
        let seed = u64::from(std::process::id()) ^ crate::system::unix_now_ns() as u64;
        Self {
            cap: Self::START,
            max,
            seed: seed | 1,
        }
    }

    pub(super) fn reset(&mut self) {
        self.cap = Self::START;
    }

    pub(super) fn next(&mut self) -> Duration {
        // xorshift64: enough randomness to spread reconnecting agents apart.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let cap = self.cap.min(self.max);
        let half = cap / 2;
        let jitter = half.mul_f64((self.seed % 1000) as f64 / 1000.0);
        self.cap = (self.cap * 2).min(self.max);
        half + jitter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_up_to_the_maximum() {
        let mut backoff = Backoff::new(Duration::from_secs(4));
        let waits: Vec<Duration> = (0..8).map(|_| backoff.next()).collect();
        assert!(waits[0] >= Duration::from_millis(125) && waits[0] <= Duration::from_millis(250));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(4)));
        assert!(waits[7] >= Duration::from_secs(2));
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(250));
    }
}
