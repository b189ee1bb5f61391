//! `stallscope-agent check`: what each signal needs, and whether this kernel and this
//! process have it. With privileges it loads and attaches each signal's probes for real.

use std::{fmt::Write as _, path::Path};

use crate::{
    btf::{self, Btf},
    config::{Config, SignalName},
    probes::{self, Probes, SchedHookChoice},
    system, tracefs,
};

/// One line of the report.
struct Line {
    subject: String,
    ok: bool,
    detail: String,
}

/// Runs the checks; returns the report and whether every requested signal works.
pub fn check(config: &Config) -> (String, bool) {
    let mut lines = Vec::new();
    let privileged = probes::privileged();
    lines.push(Line {
        subject: "privileges".into(),
        ok: privileged,
        detail: if privileged {
            "root or CAP_BPF + CAP_PERFMON".into()
        } else {
            "need root (or CAP_BPF + CAP_PERFMON): run with sudo".into()
        },
    });
    let btf_path = config
        .btf
        .clone()
        .unwrap_or_else(|| Path::new(btf::VMLINUX_BTF).to_owned());
    let btf = Btf::from_file(&btf_path);
    lines.push(Line {
        subject: "BTF".into(),
        ok: btf.is_ok(),
        detail: match &btf {
            Ok(_) => btf_path.display().to_string(),
            Err(err) => format!("{err}: off-CPU falls back to the classic tracepoint"),
        },
    });
    let tracefs_dir = tracefs::event_dir("sched", "sched_switch");
    lines.push(Line {
        subject: "tracefs".into(),
        ok: true,
        detail: match &tracefs_dir {
            Some(dir) => format!("sched_switch at {}", dir.display()),
            None => "not mounted; the agent mounts it if the classic tracepoint is needed".into(),
        },
    });

    let mut all_ok = true;
    for signal in &config.signals {
        let needs = match signal {
            SignalName::OffCpu => {
                let fast = btf.as_ref().is_ok_and(|b| {
                    b.tracepoint_arg_count("sched_switch") == Some(4)
                        && b.tracepoint_arg_count("rseq_update").is_some()
                });
                format!(
                    "needs sched_switch; fast path: BTF tracepoints sched_switch (5.18+) and rseq_update, task storage: {}",
                    if fast { "present" } else { "absent" }
                )
            }
            SignalName::OnCpu => {
                "needs perf_event_open (cpu-clock) on every CPU with a BPF program".to_owned()
            }
        };
        let (ok, detail) = if privileged {
            let mut single = config.clone();
            single.signals = std::iter::once(*signal).collect();
            match Probes::load(&single.probe_settings()) {
                Ok(loaded) => (true, describe(*signal, &loaded, config)),
                Err(err) => (false, format!("FAILED: {err}")),
            }
        } else {
            (false, "not tested: needs privileges".to_owned())
        };
        all_ok &= ok;
        lines.push(Line {
            subject: format!("signal {signal}"),
            ok,
            detail: format!("{detail}\n      {needs}"),
        });
    }

    let mut report = format!(
        "kernel {} ({})\n",
        system::kernel_release(),
        std::env::consts::ARCH
    );
    for line in lines {
        let _ = writeln!(
            report,
            "{:<14} {:<4} {}",
            line.subject,
            if line.ok { "ok" } else { "NO" },
            line.detail
        );
    }
    (report, all_ok)
}

fn describe(signal: SignalName, loaded: &Probes, config: &Config) -> String {
    match signal {
        SignalName::OffCpu => {
            let hook = loaded.sched_hook.map_or("none", |hook| hook.describe());
            let forced = if config.sched_hook == SchedHookChoice::Tracepoint {
                " (forced by configuration)"
            } else {
                ""
            };
            format!("{hook}{forced}")
        }
        SignalName::OnCpu => format!(
            "perf_event cpu-clock at {} Hz on {} CPUs",
            config.oncpu_frequency_hz, loaded.oncpu_cpus
        ),
    }
}
