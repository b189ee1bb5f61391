//! The detector's thresholds: one documented setting each (README, "Degradation windows
//! found automatically"), read from the collector's TOML `[detect]` section and a few
//! flags, checked once at start-up.
//!
//! Counts are in buckets (the storage's finest resolution, `--retention`'s first tier),
//! rates per second of wall time, so the same file works for 10 s buckets and for a test
//! run with 2 s buckets; only the times that are about the clock (the arrival grace,
//! history spans) are durations.

use std::time::Duration;

use serde::Deserialize;

/// Every threshold of the detector.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectSettings {
    /// Whether the collector looks for windows at all.
    pub enabled: bool,
    /// How long after a bucket's data should have arrived (its agent's batch end) a
    /// bucket holding data is taken as complete: batches reach the collector a moment
    /// after they close. (A bucket is also complete as soon as the host has data in a
    /// later one: agents send their batches in order.)
    pub grace: Duration,
    /// How long to wait for a bucket that has no data at all before taking it as empty
    /// (an agent that stopped, or one that fell behind).
    pub max_delay: Duration,
    /// How often the detector wakes to see whether a bucket became complete.
    pub tick: Duration,
    /// The recent history the baseline is drawn from.
    pub recent_history: Duration,
    /// Up to this many earlier days, the same time of day...
    pub earlier_days: u32,
    /// ...over this span centred on it.
    pub earlier_day_span: Duration,
    /// How often the earlier days and the list of windows to leave out are re-read.
    pub history_refresh: Duration,
    /// Baselines are recomputed at bucket times that are multiples of this (aligned to
    /// the epoch, so every collector replica uses the same baseline for a bucket).
    pub baseline_refresh: Duration,
    /// A bucket joins the baseline only this many buckets after it (the first buckets of a
    /// degradation are usually left out by the window before they could count).
    pub baseline_lag: u32,
    /// An indicator is evaluated only with at least this many baseline buckets.
    pub min_baseline_buckets: u32,
    /// A bucket is evaluated only if the scope's request-path thread time (on-CPU, run
    /// queue, lock, disk, request-path network) is at least this many ns per second.
    pub min_busy_ns_per_s: f64,
    /// A per-event indicator is evaluated in a bucket only with at least this many events
    /// per second (and then as many per bucket as that makes, at least 3).
    pub min_events_per_s: f64,
    /// A bucket crosses when its robust z-score is at least this (and its effect is large
    /// enough, below)...
    pub z_open: f64,
    /// ...in this many consecutive evaluated buckets, with the CUSUM at `cusum_h`.
    pub open_buckets: u32,
    /// CUSUM reference: the z a bucket must exceed to push the sum up.
    pub cusum_k: f64,
    /// CUSUM decision threshold.
    pub cusum_h: f64,
    /// One bucket adds at most this z to the CUSUM (a single spike cannot open a window).
    pub z_clip: f64,
    /// A bucket has recovered when every indicator that crossed is below this z or below
    /// half its minimum effect...
    pub z_close: f64,
    /// ...in this many consecutive evaluated buckets.
    pub close_buckets: u32,
    /// More consecutive buckets than this without data or support reset an indicator's
    /// CUSUM (and close an open window at the last evaluated bucket).
    pub max_gap: u32,
    /// A window open this long is closed: the level it reached is the new normal.
    pub max_window: Duration,
    /// How often `why` runs on an open window (and once when it closes).
    pub explain_interval: Duration,
    /// Most indicators kept per (host, service) (objects beyond are not tracked).
    pub max_indicators: usize,
    /// A rise counts only if it costs the scope at least this much extra wait per second
    /// of wall time (ns; the rise times the events, operations or request-path time per
    /// second behind the indicator).
    pub min_impact_ns_per_s: f64,
    /// Minimum rise of a share of request-path time (absolute, 0..1)...
    pub min_share_increase: f64,
    /// ...and relative to its baseline.
    pub min_share_relative: f64,
    /// Minimum rise of a latency per event (run queue, lock, disk, socket, connect), ns...
    pub min_latency_increase_ns: f64,
    /// ...and relative to its baseline.
    pub min_latency_relative: f64,
    /// Minimum rise of CPU time per operation, ns...
    pub min_cpu_increase_ns: f64,
    /// ...and relative to its baseline.
    pub min_cpu_relative: f64,
    /// Minimum rise of retransmits per socket operation (absolute).
    pub min_retransmit_increase: f64,
    /// The spread a robust z divides by is at least this share of the baseline median
    /// (a very steady baseline does not make tiny moves significant).
    pub spread_floor: f64,
}

impl Default for DetectSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            grace: Duration::from_secs(3),
            max_delay: Duration::from_secs(30),
            tick: Duration::from_secs(1),
            recent_history: Duration::from_secs(2 * 3600),
            earlier_days: 7,
            earlier_day_span: Duration::from_secs(3600),
            history_refresh: Duration::from_secs(60),
            baseline_refresh: Duration::from_secs(60),
            baseline_lag: 6,
            min_baseline_buckets: 24,
            min_busy_ns_per_s: 20e6,
            min_events_per_s: 5.0,
            z_open: 3.0,
            open_buckets: 3,
            cusum_k: 1.5,
            cusum_h: 12.0,
            z_clip: 8.0,
            z_close: 2.0,
            close_buckets: 3,
            max_gap: 12,
            max_window: Duration::from_secs(3600),
            explain_interval: Duration::from_secs(300),
            max_indicators: 48,
            min_impact_ns_per_s: 50e6,
            min_share_increase: 0.10,
            min_share_relative: 0.3,
            min_latency_increase_ns: 100e3,
            min_latency_relative: 0.5,
            min_cpu_increase_ns: 20e3,
            min_cpu_relative: 0.3,
            min_retransmit_increase: 0.01,
            spread_floor: 0.05,
        }
    }
}

/// The `[detect]` section of the collector's TOML file: every key optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectFile {
    pub enabled: Option<bool>,
    pub grace: Option<String>,
    pub max_delay: Option<String>,
    pub tick: Option<String>,
    pub recent_history: Option<String>,
    pub earlier_days: Option<u32>,
    pub earlier_day_span: Option<String>,
    pub history_refresh: Option<String>,
    pub baseline_refresh: Option<String>,
    pub baseline_lag: Option<u32>,
    pub min_baseline_buckets: Option<u32>,
    pub min_busy: Option<String>,
    pub min_events_per_s: Option<f64>,
    pub z_open: Option<f64>,
    pub open_buckets: Option<u32>,
    pub cusum_k: Option<f64>,
    pub cusum_h: Option<f64>,
    pub z_clip: Option<f64>,
    pub z_close: Option<f64>,
    pub close_buckets: Option<u32>,
    pub max_gap: Option<u32>,
    pub max_window: Option<String>,
    pub explain_interval: Option<String>,
    pub max_indicators: Option<usize>,
    pub min_impact: Option<String>,
    pub min_share_increase: Option<f64>,
    pub min_share_relative: Option<f64>,
    pub min_latency_increase: Option<String>,
    pub min_latency_relative: Option<f64>,
    pub min_cpu_increase: Option<String>,
    pub min_cpu_relative: Option<f64>,
    pub min_retransmit_increase: Option<f64>,
    pub spread_floor: Option<f64>,
}

/// The detection flags (the rest is in the TOML file's `[detect]` section).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct DetectArgs {
    /// Do not look for degradation windows automatically.
    #[arg(long)]
    pub no_detect: bool,
    /// Wait this long after a bucket's batches should have arrived before reading it
    /// (default 3s).
    #[arg(long, value_name = "DURATION")]
    pub detect_grace: Option<String>,
    /// Baseline buckets an indicator needs before it is evaluated (default 24).
    #[arg(long, value_name = "N")]
    pub detect_min_baseline_buckets: Option<u32>,
    /// Buckets a bucket waits before it joins the baseline (default 6).
    #[arg(long, value_name = "N")]
    pub detect_baseline_lag: Option<u32>,
    /// Buckets without data after which a test starts over and an open window closes
    /// (default 12).
    #[arg(long, value_name = "N")]
    pub detect_max_gap: Option<u32>,
    /// How often baselines are recomputed (default 1m).
    #[arg(long, value_name = "DURATION")]
    pub detect_baseline_refresh: Option<String>,
}

/// Parses `250ms`, `100us`, `3s`, `5m`, `2h`, `1d` (a number and a unit; no unit is
/// seconds; fractions allowed).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 500ms, 3s, 5m or 2h"))?;
    let seconds = match unit.trim() {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" | "" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use us, ms, s, m, h or d)"
            ));
        }
    };
    let total = number * seconds;
    if !total.is_finite() || !(0.0..=1e9).contains(&total) {
        return Err(format!("`{text}` is not a usable duration"));
    }
    Ok(Duration::from_secs_f64(total))
}

fn duration(key: &str, text: Option<&String>, default: Duration) -> Result<Duration, String> {
    match text {
        Some(text) => parse_duration(text).map_err(|e| format!("[detect] {key}: {e}")),
        None => Ok(default),
    }
}

impl DetectSettings {
    /// Flags over the file over the defaults, checked.
    pub fn build(args: &DetectArgs, file: Option<&DetectFile>) -> Result<Self, String> {
        let d = Self::default();
        let empty = DetectFile::default();
        let f = file.unwrap_or(&empty);
        let flag_or_file = |flag: &Option<String>, key: &Option<String>| -> Option<String> {
            flag.clone().or_else(|| key.clone())
        };
        let settings = Self {
            enabled: !args.no_detect && f.enabled.unwrap_or(d.enabled),
            grace: duration(
                "grace",
                flag_or_file(&args.detect_grace, &f.grace).as_ref(),
                d.grace,
            )?,
            max_delay: duration("max_delay", f.max_delay.as_ref(), d.max_delay)?,
            tick: duration("tick", f.tick.as_ref(), d.tick)?,
            recent_history: duration(
                "recent_history",
                f.recent_history.as_ref(),
                d.recent_history,
            )?,
            earlier_days: f.earlier_days.unwrap_or(d.earlier_days),
            earlier_day_span: duration(
                "earlier_day_span",
                f.earlier_day_span.as_ref(),
                d.earlier_day_span,
            )?,
            history_refresh: duration(
                "history_refresh",
                f.history_refresh.as_ref(),
                d.history_refresh,
            )?,
            baseline_refresh: duration(
                "baseline_refresh",
                flag_or_file(&args.detect_baseline_refresh, &f.baseline_refresh).as_ref(),
                d.baseline_refresh,
            )?,
            baseline_lag: args
                .detect_baseline_lag
                .or(f.baseline_lag)
                .unwrap_or(d.baseline_lag),
            min_baseline_buckets: args
                .detect_min_baseline_buckets
                .or(f.min_baseline_buckets)
                .unwrap_or(d.min_baseline_buckets),
            min_busy_ns_per_s: match &f.min_busy {
                Some(text) => duration("min_busy", Some(text), Duration::ZERO)?.as_nanos() as f64,
                None => d.min_busy_ns_per_s,
            },
            min_events_per_s: f.min_events_per_s.unwrap_or(d.min_events_per_s),
            z_open: f.z_open.unwrap_or(d.z_open),
            open_buckets: f.open_buckets.unwrap_or(d.open_buckets),
            cusum_k: f.cusum_k.unwrap_or(d.cusum_k),
            cusum_h: f.cusum_h.unwrap_or(d.cusum_h),
            z_clip: f.z_clip.unwrap_or(d.z_clip),
            z_close: f.z_close.unwrap_or(d.z_close),
            close_buckets: f.close_buckets.unwrap_or(d.close_buckets),
            max_gap: args.detect_max_gap.or(f.max_gap).unwrap_or(d.max_gap),
            max_window: duration("max_window", f.max_window.as_ref(), d.max_window)?,
            explain_interval: duration(
                "explain_interval",
                f.explain_interval.as_ref(),
                d.explain_interval,
            )?,
            max_indicators: f.max_indicators.unwrap_or(d.max_indicators),
            min_impact_ns_per_s: match &f.min_impact {
                Some(text) => duration("min_impact", Some(text), Duration::ZERO)?.as_nanos() as f64,
                None => d.min_impact_ns_per_s,
            },
            min_share_increase: f.min_share_increase.unwrap_or(d.min_share_increase),
            min_share_relative: f.min_share_relative.unwrap_or(d.min_share_relative),
            min_latency_increase_ns: match &f.min_latency_increase {
                Some(text) => {
                    duration("min_latency_increase", Some(text), Duration::ZERO)?.as_nanos() as f64
                }
                None => d.min_latency_increase_ns,
            },
            min_latency_relative: f.min_latency_relative.unwrap_or(d.min_latency_relative),
            min_cpu_increase_ns: match &f.min_cpu_increase {
                Some(text) => {
                    duration("min_cpu_increase", Some(text), Duration::ZERO)?.as_nanos() as f64
                }
                None => d.min_cpu_increase_ns,
            },
            min_cpu_relative: f.min_cpu_relative.unwrap_or(d.min_cpu_relative),
            min_retransmit_increase: f
                .min_retransmit_increase
                .unwrap_or(d.min_retransmit_increase),
            spread_floor: f.spread_floor.unwrap_or(d.spread_floor),
        };
        settings.check()?;
        Ok(settings)
    }

    /// What makes no sense, in one line.
    pub fn check(&self) -> Result<(), String> {
        let positive = [
            ("z_open", self.z_open),
            ("cusum_h", self.cusum_h),
            ("z_clip", self.z_clip),
            ("min_events_per_s", self.min_events_per_s),
        ];
        for (key, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("[detect] {key} must be a positive number"));
            }
        }
        let non_negative = [
            ("cusum_k", self.cusum_k),
            ("z_close", self.z_close),
            ("min_share_increase", self.min_share_increase),
            ("min_share_relative", self.min_share_relative),
            ("min_latency_relative", self.min_latency_relative),
            ("min_cpu_relative", self.min_cpu_relative),
            ("min_retransmit_increase", self.min_retransmit_increase),
            ("spread_floor", self.spread_floor),
            ("min_busy", self.min_busy_ns_per_s),
            ("min_impact", self.min_impact_ns_per_s),
        ];
        for (key, value) in non_negative {
            if !(value.is_finite() && value >= 0.0) {
                return Err(format!("[detect] {key} must be a number >= 0"));
            }
        }
        if self.z_clip <= self.cusum_k {
            return Err(
                "[detect] z_clip must be larger than cusum_k (or nothing ever adds up)".to_owned(),
            );
        }
        if self.z_close > self.z_open {
            return Err("[detect] z_close must not exceed z_open (hysteresis)".to_owned());
        }
        if self.open_buckets == 0 || self.close_buckets == 0 || self.min_baseline_buckets < 3 {
            return Err("[detect] open_buckets and close_buckets must be at least 1, min_baseline_buckets at least 3".to_owned());
        }
        if self.tick.is_zero() || self.history_refresh.is_zero() || self.baseline_refresh.is_zero()
        {
            return Err(
                "[detect] tick, history_refresh and baseline_refresh must be longer than 0"
                    .to_owned(),
            );
        }
        if self.max_indicators == 0 {
            return Err("[detect] max_indicators must be at least 1".to_owned());
        }
        Ok(())
    }

    /// The smallest number of events a per-event indicator needs in a bucket of `step_s`.
    pub fn min_events(&self, step_s: i64) -> f64 {
        (self.min_events_per_s * step_s as f64).max(3.0)
    }

    /// The smallest request-path thread time (ns) an evaluated bucket of `step_s` holds.
    pub fn min_busy_ns(&self, step_s: i64) -> f64 {
        self.min_busy_ns_per_s * step_s as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_sub_second_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn flags_override_the_file_and_nonsense_is_refused() {
        let file: DetectFile = toml::from_str(
            "grace = \"1s\"\nmin_baseline_buckets = 40\nmin_latency_increase = \"50us\"\nmin_busy = \"5ms\"",
        )
        .unwrap_or_default();
        let args = DetectArgs {
            detect_min_baseline_buckets: Some(12),
            ..DetectArgs::default()
        };
        let settings = DetectSettings::build(&args, Some(&file));
        let Ok(settings) = settings else {
            panic!("{settings:?}");
        };
        assert_eq!(settings.grace, Duration::from_secs(1));
        assert_eq!(settings.min_baseline_buckets, 12);
        assert!((settings.min_latency_increase_ns - 50e3).abs() < 1e-6);
        assert!((settings.min_busy_ns_per_s - 5e6).abs() < 1e-6);
        let bad: DetectFile = toml::from_str("z_close = 9.0").unwrap_or_default();
        assert!(DetectSettings::build(&DetectArgs::default(), Some(&bad)).is_err());
        assert!(toml::from_str::<DetectFile>("z_opne = 3.0").is_err());
        let off = DetectArgs {
            no_detect: true,
            ..DetectArgs::default()
        };
        assert_eq!(
            DetectSettings::build(&off, None).map(|s| s.enabled),
            Ok(false)
        );
    }
}
