//! Replays the window detector over a stopped collector's SQLite data: prints one
//! service's indicators per bucket with their z-scores, and the windows the detector would
//! have opened. For tuning thresholds on recorded data:
//! `cargo run -p stallscope-collector --example detect_replay -- DATA_DIR SERVICE STEP_S [TOML]`.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::Context as _;
use stallscope_collector::{
    detect::{
        DetectSettings,
        indicators::observe,
        scope::{Event, ScopeDetector},
        settings::{DetectArgs, DetectFile},
    },
    storage::{Filter, Retention, Storage, Tier, TimeRange, sqlite::SqliteStore},
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), Some(service), Some(step)) = (args.get(1), args.get(2), args.get(3)) else {
        anyhow::bail!("usage: detect_replay DATA_DIR SERVICE STEP_S [SETTINGS_TOML]");
    };
    let step: i64 = step.parse().context("STEP_S must be a number of seconds")?;
    let file: Option<DetectFile> = match args.get(4) {
        Some(path) => Some(toml::from_str(&std::fs::read_to_string(path)?)?),
        None => None,
    };
    let settings =
        DetectSettings::build(&DetectArgs::default(), file.as_ref()).map_err(anyhow::Error::msg)?;
    let retention = Retention {
        tiers: vec![
            Tier {
                resolution: Duration::from_secs(step as u64),
                keep: Duration::from_secs(86_400),
            },
            Tier {
                resolution: Duration::from_secs(60),
                keep: Duration::from_secs(14 * 86_400),
            },
        ],
    };
    let store = SqliteStore::open(&PathBuf::from(dir), retention)?;
    let targets = store
        .targets(TimeRange {
            from_unix_ns: 0,
            until_unix_ns: i64::MAX / 4,
        })
        .await?;
    let (first, last) = targets
        .iter()
        .filter(|t| &t.service == service)
        .fold((i64::MAX, i64::MIN), |(f, l), t| {
            (f.min(t.first_unix_s), l.max(t.last_unix_s))
        });
    anyhow::ensure!(first <= last, "no data for service {service}");
    let from = first - first.rem_euclid(step);
    let series = store
        .series_totals(
            TimeRange {
                from_unix_ns: from * 1_000_000_000,
                until_unix_ns: (last + step) * 1_000_000_000,
            },
            Filter {
                service: Some(service.clone()),
                ..Filter::default()
            },
            step,
        )
        .await?;
    let host = series.first().map(|s| s.host.clone()).unwrap_or_default();
    if std::env::var_os("DETECT_REPLAY_SIGNALS").is_some() {
        // Totals per (signal, cause, lock_wait) over the whole range.
        let mut totals: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for s in &series {
            let key = format!(
                "{} cause={} lock_wait={} direction={}",
                s.signal,
                s.cause,
                s.labels.get("lock_wait").map_or("", String::as_str),
                s.labels.get("direction").map_or("", String::as_str)
            );
            let entry = totals.entry(key).or_default();
            for p in &s.points {
                entry.0 += p.1;
                entry.1 += p.2;
            }
        }
        for (key, (value, count)) in totals {
            println!("{key}: {:.3} s, {count} events", value as f64 / 1e9);
        }
    }
    let observed = observe(&series, step, &settings);
    let mut scope = ScopeDetector::new(&host, service, step);
    let mut bucket = from;
    while bucket <= last {
        let observations = observed.get(&bucket).cloned();
        let events = scope.process(bucket, observations.clone(), &settings);
        if let Some(o) = &observations {
            let mut line = format!("{bucket} busy {:.0}ms", o.busy_ns / 1e6);
            for (key, value) in &o.values {
                match scope.baselines().get(key) {
                    Some(b) => {
                        let _ = write!(line, " {key}={value:.4e}(z{:.1})", b.z(*value));
                    }
                    None => {
                        let _ = write!(line, " {key}={value:.4e}");
                    }
                }
            }
            println!("{line}");
        }
        for event in events {
            match event {
                Event::Opened(w) => println!(
                    "OPEN at bucket {bucket}: onset {:.1} crossed {:?}",
                    w.onset_unix_ns as f64 / 1e9,
                    w.crossed
                        .iter()
                        .map(|c| format!(
                            "{} base {:.4} obs {:.4} z {:.1}",
                            c.key, c.baseline, c.observed, c.score
                        ))
                        .collect::<Vec<_>>()
                ),
                Event::Updated(w) => println!(
                    "UPDATE at bucket {bucket}: {:?}",
                    w.crossed
                        .iter()
                        .map(|c| c.key.to_string())
                        .collect::<Vec<_>>()
                ),
                Event::Closed {
                    end_unix_ns,
                    reason,
                    ..
                } => println!(
                    "CLOSE at bucket {bucket}: end {:.1} ({reason:?})",
                    end_unix_ns as f64 / 1e9
                ),
            }
        }
        bucket += step;
    }
    Ok(())
}
