//! `stallscope-agent check`: what each signal needs, and whether this kernel and this
//! process have it. With privileges it loads and attaches each signal's probes for real.

use std::{collections::HashSet, fmt::Write as _, path::Path, sync::mpsc, time::Duration};

use crate::{
    config::{Config, SignalName},
    probes::{
        self, Probes, SchedHookChoice, attach,
        btf::{self, Btf},
        tracefs,
    },
    process::snapshot,
    symbols::binaries,
    system,
    unwind::table,
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
        let needs = needs(*signal, btf.as_ref().ok());
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
            detail: format!("{detail}\n      needs: {needs}"),
        });
    }

    if privileged && config.signals.len() > 1 {
        let (ok, detail) = match Probes::load(&config.probe_settings()) {
            Ok(loaded) => (true, verifier_summary(&loaded.verifier_work())),
            Err(err) => (false, format!("FAILED: {err}")),
        };
        all_ok &= ok;
        lines.push(Line {
            subject: "all together".into(),
            ok,
            detail,
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
    if let Some(pid) = config.target_pid {
        report.push_str(&binaries_report(pid, config.read_deadline));
    }
    (report, all_ok)
}

/// The executable binaries of `pid`, each with its build-id and whether its functions
/// keep frame pointers: where they do not, user stacks through it are probably cut short.
/// Reads run on a thread abandoned after `deadline` per binary (a hung mount).
fn binaries_report(pid: u32, deadline: Duration) -> String {
    let mut report =
        format!("binaries of pid {pid} (frame pointers from a sample of function prologues):\n");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let snapshot = match snapshot::read_snapshot(pid, false) {
            Ok(snapshot) => snapshot,
            Err(err) => {
                let _ = tx.send(Err(format!("cannot read pid {pid}: {err}")));
                return;
            }
        };
        let mut seen = HashSet::new();
        for mapping in snapshot.maps.iter().filter(|m| m.file.is_some()) {
            if seen.insert(mapping.file) {
                let line = match binaries::open_binary(pid, mapping) {
                    Ok(binary) => describe_binary(&binary),
                    Err(err) => format!("{}: {err}", mapping.path),
                };
                if tx.send(Ok(line)).is_err() {
                    return;
                }
            }
        }
    });
    loop {
        match rx.recv_timeout(deadline.max(Duration::from_secs(5))) {
            Ok(Ok(line)) => {
                let _ = writeln!(report, "  {line}");
            }
            Ok(Err(err)) => {
                let _ = writeln!(report, "  {err}");
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = writeln!(report, "  (a read timed out: a hung filesystem?)");
                break;
            }
        }
    }
    report
}

fn describe_binary(binary: &binaries::BinaryFile) -> String {
    let info = &binary.info;
    let frame_pointers = match info.frame_pointers {
        Some(fp) if fp.present() => format!(
            "frame pointers: yes ({}/{} functions)",
            fp.with_frame_pointer, fp.sampled
        ),
        Some(fp) => format!(
            "frame pointers: NO ({}/{} functions)",
            fp.with_frame_pointer, fp.sampled
        ),
        None => {
            "frame pointers: unknown (no function symbols whose first instructions tell)".to_owned()
        }
    };
    let symbols = match (&binary.debug, info.has_dwarf, info.has_symtab) {
        (Some(debug), _, _) => format!("symbols from {}", debug.path.display()),
        (None, true, _) => "symbols and DWARF in the binary".to_owned(),
        (None, false, true) => "symbols, no DWARF".to_owned(),
        (None, false, false) => "stripped (dynamic symbols only), no debug file found".to_owned(),
    };
    // The agent loads tables for binaries whose functions lack frame pointers (as the
    // prologue sample says); the others keep the kernel's frame-pointer walk.
    let by_table = !info
        .frame_pointers
        .is_some_and(crate::symbols::elf::FramePointers::present);
    let unwind = match (table::build(&binary.file), by_table) {
        (Ok(table), true) => format!(
            "unwound by table: {} rows ({} KiB) from {}",
            table.rows.len(),
            table.bytes().div_ceil(1024),
            table.source.section()
        ),
        (Ok(_), false) => "unwound by frame pointers".to_owned(),
        (Err(err), true) => {
            format!("no unwind table ({err}): user stacks through it are probably truncated")
        }
        (Err(err), false) => format!("no unwind table ({err}): frame pointers only"),
    };
    format!(
        "{} build-id {}; {frame_pointers}; {symbols}; {unwind}",
        binary.path,
        info.build_id_hex().as_deref().unwrap_or("none")
    )
}

/// The verifier's work for the heaviest program, against its limit.
fn verifier_summary(work: &[(String, u32)]) -> String {
    // Every program's count, for comparing builds (`RUST_LOG=debug`).
    for (name, count) in work {
        tracing::debug!("verifier work: {name} {count} instructions");
    }
    match work.first() {
        Some((name, count)) => format!(
            "{} programs; most verifier work: {name}, {count} of 1000000 instructions",
            work.len()
        ),
        None => format!("{} programs loaded", work.len()),
    }
}

/// What a signal needs, and whether this BTF has the fast path's pieces.
fn needs(signal: SignalName, btf: Option<&Btf>) -> String {
    let has = |ok: bool| if ok { "present" } else { "absent" };
    match signal {
        SignalName::OffCpu => format!(
            "sched:sched_switch; fast path: BTF tracepoints sched_switch (5.18+), sched_wakeup, rseq_update and task storage ({})",
            has(btf.is_some_and(attach::btf_sched_supported))
        ),
        SignalName::RunQueue => format!(
            "BTF tracepoints sched_switch (5.18+) and sched_wakeup ({})",
            has(btf.is_some_and(attach::btf_sched_supported))
        ),
        SignalName::OnCpu => {
            "perf_event_open (cpu-clock) on every CPU with a BPF program".to_owned()
        }
        SignalName::Lock => format!(
            "BTF lock:contention_begin/end for kernel locks ({}), the BTF scheduler path for futex waits ({})",
            has(btf.is_some_and(attach::btf_lock_supported)),
            has(btf.is_some_and(attach::btf_sched_supported))
        ),
        SignalName::Syscall => format!(
            "BTF tracepoints sys_enter/sys_exit ({})",
            has(btf.is_some_and(attach::btf_syscall_supported))
        ),
        SignalName::Connect | SignalName::SocketWait | SignalName::Tcp => format!(
            "kernel BTF with tracepoints inet_sock_set_state, tcp_probe, tcp_retransmit_skb and the socket structs ({}){}",
            has(btf.is_some_and(attach::btf_net_supported)),
            match signal {
                SignalName::SocketWait => format!(
                    ", BTF tracepoints sched_switch (5.18+) and rseq_update, where socket waits start and end ({})",
                    has(btf.is_some_and(attach::btf_sched_supported))
                ),
                SignalName::Tcp => format!(
                    ", kfree_skb with the listener and reason TCP_LISTEN_OVERFLOW for listen overflows ({})",
                    has(btf.and_then(attach::listen_overflow_reason).is_some())
                ),
                _ => String::new(),
            }
        ),
        SignalName::Disk => format!(
            "block:block_rq_issue/block_rq_complete ({}), block:block_io_start for attribution ({})",
            has(tracefs::event_dir("block", "block_rq_issue").is_some()),
            has(tracefs::event_dir("block", "block_io_start").is_some())
        ),
    }
}

fn describe(signal: SignalName, loaded: &Probes, config: &Config) -> String {
    let hook = loaded
        .hooks
        .iter()
        .find(|(s, _)| *s == signal.signal())
        .map_or("attached", |(_, hook)| hook.as_str());
    let forced = if matches!(signal, SignalName::OffCpu)
        && config.sched_hook == SchedHookChoice::Tracepoint
    {
        " (forced by configuration)"
    } else {
        ""
    };
    format!("{hook}{forced}")
}
