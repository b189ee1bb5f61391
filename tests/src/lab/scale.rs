//! One factor scales every timing of a lab run: the agent's batch interval, the
//! collector's finest retention tier (its storage buckets), and the phases (healthy,
//! injected, recovering). Factor 1 is the product's defaults (10 s batches) with the
//! phases the windows issue measures (60 s degradations); [`Scale::CI`] (0.2: 2 s
//! batches) fits one scenario in about a minute and a half.

use std::time::Duration;

/// The timings of a lab run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale {
    factor: f64,
}

/// Phase lengths at factor 1.
const HEALTHY: Duration = Duration::from_secs(300);
const INJECT: Duration = Duration::from_secs(60);
const RECOVER: Duration = Duration::from_secs(120);
const BATCH: Duration = Duration::from_secs(10);

impl Scale {
    /// The product's defaults: 10 s batches, 5 min healthy, 60 s injected, 2 min recovery.
    pub const DEFAULT: Self = Self { factor: 1.0 };
    /// CI: 2 s batches, 60 s healthy, 12 s injected, 24 s recovery.
    pub const CI: Self = Self { factor: 0.2 };

    /// Any factor whose batch interval is a whole number of seconds dividing a minute
    /// (the collector's coarser tier is 1 minute).
    pub fn new(factor: f64) -> Result<Self, String> {
        let scale = Self { factor };
        let batch = BATCH.as_secs_f64() * factor;
        let whole = batch.round();
        if factor.is_nan()
            || factor <= 0.0
            || (batch - whole).abs() > 1e-9
            || whole < 1.0
            || 60 % (whole as u64) != 0
        {
            return Err(format!(
                "scale {factor}: the batch interval (10 s x factor = {batch} s) must be a whole number of seconds dividing 60"
            ));
        }
        Ok(scale)
    }

    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// `default` (a duration at factor 1) at this scale.
    pub fn scaled(&self, default: Duration) -> Duration {
        default.mul_f64(self.factor)
    }

    /// The agent's `--batch-interval`.
    pub fn batch_interval(&self) -> Duration {
        Duration::from_secs(self.scaled(BATCH).as_secs_f64().round() as u64)
    }

    /// The collector's `--retention`: buckets as long as a batch, then 1 minute.
    pub fn retention(&self) -> String {
        format!("{}s:24h,1m:14d", self.batch_interval().as_secs())
    }

    pub fn healthy(&self) -> Duration {
        self.scaled(HEALTHY)
    }

    pub fn inject(&self) -> Duration {
        self.scaled(INJECT)
    }

    pub fn recover(&self) -> Duration {
        self.scaled(RECOVER)
    }

    /// The collector's `[detect]` section with every setting about the clock scaled
    /// like the batches (counts are in buckets and rates per second, so the rest holds at
    /// any scale); at factor 1 these are the defaults. The grace for a late batch stays
    /// at least a second and `max_delay` (how long a host may be silent before its empty
    /// buckets are given up) is not scaled: a batch's trip to the collector, and an
    /// agent's lag on a busy host, do not shrink with the batch.
    pub fn detect_toml(&self) -> String {
        let secs = |default_s: f64| format!("\"{}ms\"", (default_s * self.factor * 1e3).round());
        format!(
            "[detect]\ngrace = \"{}ms\"\nmax_delay = \"30s\"\nbaseline_refresh = {}\nhistory_refresh = {}\nrecent_history = {}\nmax_window = {}\nexplain_interval = {}\n",
            (3000.0 * self.factor).max(1000.0).round(),
            secs(60.0),
            secs(60.0),
            secs(7200.0),
            secs(3600.0),
            secs(300.0),
        )
    }

    /// A healthy phase, one injection and its recovery.
    pub fn scenario(&self) -> Duration {
        self.healthy() + self.inject() + self.recover()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_scale_is_two_second_batches_and_fits_in_two_minutes() {
        assert_eq!(Scale::CI.batch_interval(), Duration::from_secs(2));
        assert_eq!(Scale::CI.retention(), "2s:24h,1m:14d");
        assert!(Scale::CI.scenario() <= Duration::from_secs(120));
        assert_eq!(Scale::DEFAULT.retention(), "10s:24h,1m:14d");
        assert_eq!(Scale::DEFAULT.inject(), Duration::from_secs(60));
        assert!(Scale::new(0.5).is_ok());
        assert!(Scale::new(0.7).is_err());
        assert!(Scale::new(0.0).is_err());
        let toml = Scale::CI.detect_toml();
        assert!(toml.contains("baseline_refresh = \"12000ms\""), "{toml}");
        assert!(toml.contains("grace = \"1000ms\""), "{toml}");
        assert!(toml.contains("max_delay = \"30s\""), "{toml}");
        assert!(Scale::DEFAULT.detect_toml().contains("max_delay = \"30s\""));
    }
}
