//! End to end, as root: the windows and `why` issues' scenario tests at CI scale. One lab
//! (2 s batches, a collector whose detector runs with its clock settings scaled like the
//! batches) runs a healthy stretch, the healthy control, the six injected faults and the
//! load-doubling control, with recoveries between. Then, per injection: exactly one
//! automatic window of `demo-shop` overlaps it, it appeared at most 60 s x scale after
//! the onset, its onset is within 20 s x scale of the truth and its end within 30 s x
//! scale of the recovery; `stallscope why --format json` on it ranks the injected
//! category first and the top cause's evidence names the injected object; the controls
//! have no window, and `why` on the healthy control's range is inconclusive; `why` on a
//! range without data names the service and the range. The table of measured against
//! injected is printed before anything is asserted.
//!
//! `STALLSCOPE_LAB_SEED` picks other fault parameters; `STALLSCOPE_LAB_BIN_DIR` runs
//! other builds (e.g. `target/release`) of the agent, collector, CLI and demo.

use stallscope_collector::explain::iso;
use stallscope_tests::{
    lab::{
        FaultClass, Lab, LabConfig, SERVICE, Scale,
        score::{self, WindowWatch},
    },
    require_root,
};

const NS: i64 = 1_000_000_000;

#[test]
fn every_injection_opens_one_window_and_why_names_its_cause() {
    if !require_root("every_injection_opens_one_window_and_why_names_its_cause") {
        return;
    }
    let seed = std::env::var("STALLSCOPE_LAB_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_207);
    eprintln!("scenario seed {seed} (STALLSCOPE_LAB_SEED repeats another)");
    let scale = Scale::CI;
    let mut config = LabConfig::new(scale, seed);
    config.collector_config = Some(scale.detect_toml());
    let bin_dir = config.bin_dir.clone();
    let mut lab = Lab::start(config).unwrap_or_else(|e| panic!("lab: {e:#}"));
    let watch = WindowWatch::start(&lab).expect("window watch");
    let injections = lab
        .run_scenarios(&score::sequence())
        .unwrap_or_else(|e| panic!("scenarios: {e:#}"));
    let (scored, windows) = score::score_run(&mut lab, watch, &injections, &bin_dir)
        .unwrap_or_else(|e| panic!("scoring: {e:#}"));

    // A range before the lab existed has no data: `why` says for which service and range.
    let lab_start = lab.phases().first().map_or(0, |p| p.start_unix_ns);
    let (empty_from, empty_until) = (lab_start / NS - 7200, lab_start / NS - 3600);
    let empty = score::run_why(
        &bin_dir,
        &lab,
        &[
            "--service".into(),
            SERVICE.into(),
            "--from".into(),
            empty_from.to_string(),
            "--until".into(),
            empty_until.to_string(),
        ],
    )
    .expect("why on an empty range");

    eprintln!("\n{}", score::run_table(&scored));
    let stray = score::stray_windows(&windows, &injections);
    for w in &stray {
        eprintln!(
            "automatic window outside every injection and control: {} {}..{} indicators {:?}",
            w.window.id,
            w.window.from_unix_ns / NS,
            w.window.until_unix_ns / NS,
            w.window
                .indicators
                .iter()
                .map(|i| format!("{} z={:.1}", i.name, i.score))
                .collect::<Vec<_>>()
        );
    }
    for s in &scored {
        if let Some(answer) = &s.why {
            eprintln!(
                "{} why: {} | {}",
                s.injection.class,
                answer.summary,
                answer
                    .ranked()
                    .iter()
                    .map(|c| format!(
                        "{} [{}]",
                        c.category,
                        c.evidence
                            .iter()
                            .map(score::WhyEvidence::text)
                            .collect::<Vec<_>>()
                            .join(" / ")
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
    }
    eprintln!("no-data range: {} ({})", empty.summary, empty.verdict);
    eprintln!(
        "ground truth: {}",
        lab.scratch().join("ground-truth.json").display()
    );

    let mut failures: Vec<String> = scored.iter().flat_map(|s| s.failures(scale)).collect();
    if let Some(healthy) = scored
        .iter()
        .find(|s| s.injection.class == FaultClass::Healthy)
        && let Some(answer) = &healthy.why
        && healthy.windows.is_empty()
        && answer.verdict != "inconclusive"
    {
        failures.push(format!(
            "healthy control: why says {} ({}), expected inconclusive",
            answer.verdict, answer.summary
        ));
    }
    let (from_text, until_text) = (iso(empty_from * NS), iso(empty_until * NS));
    if empty.verdict != "no-data"
        || !empty.summary.contains(SERVICE)
        || !empty.summary.contains(&from_text)
        || !empty.summary.contains(&until_text)
    {
        failures.push(format!(
            "why on a range without data: {} `{}`, expected no-data naming {SERVICE}, {from_text} and {until_text}",
            empty.verdict, empty.summary
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
