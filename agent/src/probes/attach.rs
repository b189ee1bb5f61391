//! What this kernel offers each signal, and attaching the programs that serve it: BTF
//! tracepoints where the kernel has them (with the struct offsets the probes need, read
//! from BTF), classic tracepoints where it must, perf events for on-CPU sampling.

use agent_common::{ProbeConfig, Signal};
use aya::{
    Ebpf,
    programs::{
        BtfTracePoint, PerfEvent, TracePoint,
        links::FdLink,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        tp_btf::BtfTracePointLinkId,
    },
};

use crate::probes::{ProbeError, SchedHook, btf::Btf, tracefs};

/// The links of the attached programs, taken from aya so they can be pinned (and
/// outlive the agent, see `pins`). Perf-event attachments (classic tracepoints, on-CPU
/// sampling) are BPF links only where the kernel has perf links (5.15+); elsewhere they
/// stay with aya and are not pinned.
#[derive(Default)]
pub struct HeldLinks {
    pub fd: Vec<(String, FdLink)>,
}

impl HeldLinks {
    fn push(&mut self, name: &str, link: FdLink) {
        let index = self
            .fd
            .iter()
            .filter(|(n, _)| n.rsplit_once('-').is_some_and(|(n, _)| n == name))
            .count();
        self.fd.push((format!("{name}-{index}"), link));
    }

    /// Takes a perf-event link (classic tracepoint, perf event) where it is a BPF link.
    fn push_perf<L>(&mut self, name: &str, take: impl FnOnce() -> Option<L>)
    where
        L: TryInto<FdLink>,
    {
        if !aya::features().bpf_perf_link() {
            return;
        }
        if let Some(fd) = take().and_then(|link| link.try_into().ok()) {
            self.push(name, fd);
        }
    }
}

/// Whether the BTF scheduler path works with this BTF: `sched_switch` must pass
/// `prev_state` (5.18+) and `rseq_update` must exist.
pub fn btf_sched_supported(btf: &Btf) -> bool {
    btf.tracepoint_arg_count("sched_switch") == Some(4)
        && btf.tracepoint_arg_count("rseq_update").is_some()
        && btf.tracepoint_arg_count("sched_wakeup").is_some()
        && btf.member_offset("task_struct", "pid").is_ok()
        && btf.member_offset("task_struct", "flags").is_ok()
}

/// Whether this BTF has the lock contention tracepoints.
pub fn btf_lock_supported(btf: &Btf) -> bool {
    btf.tracepoint_arg_count("contention_begin").is_some()
        && btf.tracepoint_arg_count("contention_end").is_some()
}

/// Whether this BTF has the raw syscall tracepoints.
pub fn btf_syscall_supported(btf: &Btf) -> bool {
    btf.tracepoint_arg_count("sys_enter").is_some()
        && btf.tracepoint_arg_count("sys_exit").is_some()
}

/// Fills in the kernel struct offsets the probes read (zero where BTF lacks a member: the
/// probes then do without, e.g. no rseq means the eager user-stack path).
pub fn fill_offsets(config: &mut ProbeConfig, btf: &Btf) {
    let offset = |strukt: &str, member: &str| btf.member_offset(strukt, member).unwrap_or(0);
    config.task_pid_offset = offset("task_struct", "pid");
    config.task_tgid_offset = offset("task_struct", "tgid");
    config.task_flags_offset = offset("task_struct", "flags");
    config.task_rseq_offset = offset("task_struct", "rseq");
    let walk = [
        ("task_struct", "files"),
        ("files_struct", "fdt"),
        ("fdtable", "fd"),
        ("fdtable", "max_fds"),
        ("file", "f_inode"),
        ("inode", "i_mode"),
    ]
    .map(|(strukt, member)| btf.member_offset(strukt, member).ok());
    if let [
        Some(files),
        Some(fdt),
        Some(fd),
        Some(max_fds),
        Some(inode),
        Some(mode),
    ] = walk
    {
        config.task_files_offset = files;
        config.files_fdt_offset = fdt;
        config.fdt_fd_offset = fd;
        config.fdt_max_fds_offset = max_fds;
        config.file_inode_offset = inode;
        config.inode_mode_offset = mode;
        config.fd_walk = 1;
    }
    if let Some(
        [
            private_data,
            sk,
            daddr,
            dport,
            num,
            family,
            state,
            v6_daddr,
            err,
            protocol,
            srtt,
        ],
    ) = socket_offsets(btf)
    {
        config.file_private_data_offset = private_data;
        config.socket_sk_offset = sk;
        config.sk_daddr_offset = daddr;
        config.sk_dport_offset = dport;
        config.sk_num_offset = num;
        config.sk_family_offset = family;
        config.sk_state_offset = state;
        config.sk_v6_daddr_offset = v6_daddr;
        config.sk_err_offset = err;
        config.sk_protocol_offset = protocol;
        config.tcp_srtt_offset = srtt;
        config.sock_walk = 1;
    }
    if let Some(reason) = listen_overflow_reason(btf) {
        config.listen_overflow_reason = reason;
    }
    if let Some([core, blocker, pid, ino, sb, dev]) = file_lock_offsets(btf) {
        config.file_lock_core_offset = core;
        config.flc_blocker_offset = blocker;
        config.flc_pid_offset = pid;
        config.inode_ino_offset = ino;
        config.inode_sb_offset = sb;
        config.sb_dev_offset = dev;
        config.file_lock_walk = 1;
    }
}

/// Offsets the file-lock probes read, in [`ProbeConfig`] order: `struct file_lock`'s core
/// and in it `flc_blocker` and `flc_pid` (6.9+; before, `fl_blocker` and `fl_pid` in
/// `file_lock` itself), `i_ino` and `i_sb` of `struct inode`, `s_dev` of `super_block`.
fn file_lock_offsets(btf: &Btf) -> Option<[u32; 6]> {
    let (core, blocker, pid) = match btf.member_offset("file_lock", "c") {
        Ok(core) => (
            core,
            btf.member_offset("file_lock_core", "flc_blocker").ok()?,
            btf.member_offset("file_lock_core", "flc_pid").ok()?,
        ),
        Err(_) => (
            0,
            btf.member_offset("file_lock", "fl_blocker").ok()?,
            btf.member_offset("file_lock", "fl_pid").ok()?,
        ),
    };
    Some([
        core,
        blocker,
        pid,
        btf.member_offset("inode", "i_ino").ok()?,
        btf.member_offset("inode", "i_sb").ok()?,
        btf.member_offset("super_block", "s_dev").ok()?,
    ])
}

/// File-lock programs (BTF tracepoints `flock_lock_inode`, `posix_lock_inode`,
/// `break_lease_block/unblock`): they mark threads whose lock request the kernel deferred,
/// so the scheduler programs count their wait as a lock wait, per file. Optional: a
/// kernel without these tracepoints (or the offsets) only loses the file-lock cause.
pub fn attach_file_locks(
    ebpf: &mut Ebpf,
    ours: &Btf,
    theirs: &aya::Btf,
    links: &mut HeldLinks,
) -> Option<&'static str> {
    let events = [
        ("flock_lock_inode_btf", "flock_lock_inode"),
        ("posix_lock_inode_btf", "posix_lock_inode"),
        ("break_lease_block_btf", "break_lease_block"),
        ("break_lease_unblock_btf", "break_lease_unblock"),
    ];
    let available = file_lock_offsets(ours).is_some()
        && events
            .iter()
            .all(|(_, event)| ours.tracepoint_arg_count(event).is_some());
    if !available {
        tracing::warn!(
            "file lock waits are not told apart: this kernel lacks the BTF filelock tracepoints or the file_lock offsets"
        );
        return None;
    }
    match attach_btf(ebpf, theirs, &events, links) {
        Ok(()) => Some(
            "file locks (tp_btf flock_lock_inode, posix_lock_inode, break_lease_block/unblock)",
        ),
        Err(err) => {
            tracing::warn!("file lock waits are not told apart: {err}");
            None
        }
    }
}

/// Whether this BTF has what the network signals need: the TCP tracepoints and every
/// socket offset.
pub fn btf_net_supported(btf: &Btf) -> bool {
    btf.tracepoint_arg_count("inet_sock_set_state").is_some()
        && btf.tracepoint_arg_count("tcp_probe").is_some()
        && btf.tracepoint_arg_count("tcp_retransmit_skb").is_some()
        && socket_offsets(btf).is_some()
}

/// Whether this kernel reports listen overflows as a drop reason with the listener
/// (`kfree_skb` with `rx_sk`, 6.12+): the reason's value, if so.
pub fn listen_overflow_reason(btf: &Btf) -> Option<u32> {
    if btf.tracepoint_arg_count("kfree_skb") != Some(4) {
        return None;
    }
    btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW")
}

/// Offsets of the socket fields the network probes read, in [`ProbeConfig`] order.
fn socket_offsets(btf: &Btf) -> Option<[u32; 11]> {
    let common = btf.member_offset("sock", "__sk_common").ok()?;
    let sock_common = |member: &str| {
        btf.member_offset("sock_common", member)
            .ok()
            .map(|offset| common + offset)
    };
    Some([
        btf.member_offset("file", "private_data").ok()?,
        btf.member_offset("socket", "sk").ok()?,
        sock_common("skc_daddr")?,
        sock_common("skc_dport")?,
        sock_common("skc_num")?,
        sock_common("skc_family")?,
        sock_common("skc_state")?,
        sock_common("skc_v6_daddr")?,
        btf.member_offset("sock", "sk_err").ok()?,
        btf.member_offset("sock", "sk_protocol").ok()?,
        btf.member_offset("tcp_sock", "srtt_us").ok()?,
    ])
}

/// The ephemeral port range of this host's network namespace.
pub fn ephemeral_ports() -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut ports = text.split_whitespace().map(str::parse::<u32>);
    match (ports.next(), ports.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

pub fn ensure_tracefs() {
    if let Err(err) = tracefs::ensure_mounted() {
        tracing::warn!("tracefs is not mounted and mounting it failed: {err}");
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ProbeError::Program {
            program: name,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| ProbeError::Program {
            program: name,
            source,
        })
}

/// Loads and attaches BTF tracepoint programs, given as (program, tracepoint).
pub fn attach_btf(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    programs: &[(&'static str, &'static str)],
    links: &mut HeldLinks,
) -> Result<(), ProbeError> {
    let ids = attach_btf_links(ebpf, btf, programs)?;
    take_btf_links(ebpf, ids, links)
}

/// Takes the links of attached BTF tracepoint programs from aya into `links`.
pub fn take_btf_links(
    ebpf: &mut Ebpf,
    ids: Vec<(&'static str, BtfTracePointLinkId)>,
    links: &mut HeldLinks,
) -> Result<(), ProbeError> {
    for (name, id) in ids {
        let prog: &mut BtfTracePoint = program(ebpf, name)?;
        let link = prog.take_link(id).map_err(|source| ProbeError::Program {
            program: name,
            source,
        })?;
        links.push(name, link.into());
    }
    Ok(())
}

/// [`attach_btf`], returning each program's link (to detach it later).
pub fn attach_btf_links(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    programs: &[(&'static str, &'static str)],
) -> Result<Vec<(&'static str, BtfTracePointLinkId)>, ProbeError> {
    let mut links = Vec::new();
    for &(name, tracepoint) in programs {
        let prog: &mut BtfTracePoint = program(ebpf, name)?;
        prog.load(tracepoint, btf)
            .map_err(|source| ProbeError::Program {
                program: name,
                source,
            })?;
        let link = prog.attach().map_err(|source| ProbeError::Program {
            program: name,
            source,
        })?;
        links.push((name, link));
    }
    Ok(links)
}

/// Loads and attaches a classic tracepoint program to `category:event`.
pub fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    category: &str,
    event: &str,
    links: &mut HeldLinks,
) -> Result<(), ProbeError> {
    let prog: &mut TracePoint = program(ebpf, name)?;
    prog.load().map_err(|source| ProbeError::Program {
        program: name,
        source,
    })?;
    let id = prog
        .attach(category, event)
        .map_err(|source| ProbeError::Program {
            program: name,
            source,
        })?;
    links.push_perf(name, || prog.take_link(id).ok());
    Ok(())
}

/// Off-CPU and run-queue programs: the BTF path if it works here, else the classic
/// `sched_switch` tracepoint (off-CPU only).
pub fn attach_sched(
    ebpf: &mut Ebpf,
    btf: Option<&aya::Btf>,
    use_btf: bool,
    signals: &[Signal],
    links: &mut HeldLinks,
) -> Result<SchedHook, ProbeError> {
    if let (true, Some(btf)) = (use_btf, btf) {
        let mut programs = vec![
            ("sched_switch_out_btf", "sched_switch"),
            ("sched_switch_in_btf", "sched_switch"),
            ("sched_wakeup_btf", "sched_wakeup"),
            ("sched_wakeup_new_btf", "sched_wakeup_new"),
        ];
        if signals.contains(&Signal::OffCpu)
            || signals.contains(&Signal::Lock)
            || signals.contains(&Signal::SocketWait)
        {
            // Sampled waits take their user stack on the return to user space, where
            // socket waits end.
            programs.push(("rseq_update_btf", "rseq_update"));
        }
        // Thread names stay current across renames and execs (and outlive the threads).
        programs.push(("task_rename_btf", "task_rename"));
        programs.push(("sched_process_exec_btf", "sched_process_exec"));
        match attach_btf(ebpf, btf, &programs, links) {
            Ok(()) => return Ok(SchedHook::BtfTracepoint),
            Err(err) => tracing::warn!(
                "BTF scheduler probes failed ({err}); falling back to the classic tracepoint"
            ),
        }
    }
    if signals.contains(&Signal::RunQueue) {
        return Err(ProbeError::Unsupported {
            signal: "runqueue",
            need: "BTF tracepoints sched_switch (with prev_state, 5.18+) and sched_wakeup",
        });
    }
    if !signals.contains(&Signal::OffCpu) {
        // Only the lock signal asked for the scheduler: without BTF it gets kernel locks.
        return Ok(SchedHook::Tracepoint);
    }
    ensure_tracefs();
    attach_tracepoint(ebpf, "sched_switch_tp", "sched", "sched_switch", links)?;
    Ok(SchedHook::Tracepoint)
}

/// Lock programs: kernel lock contention (BTF tracepoints). Futex waits come with the
/// scheduler programs, which the lock signal needs on the BTF path.
pub fn attach_lock(
    ebpf: &mut Ebpf,
    btf: Option<(&Btf, &aya::Btf)>,
    sched: Option<SchedHook>,
    links: &mut HeldLinks,
) -> Result<Vec<&'static str>, ProbeError> {
    let mut attached = Vec::new();
    if sched == Some(SchedHook::BtfTracepoint) {
        attached.push("futex waits (sched_switch, from the waiter's registers)");
    }
    match btf {
        Some((ours, theirs)) if btf_lock_supported(ours) => {
            attach_btf(
                ebpf,
                theirs,
                &[
                    ("contention_begin_btf", "contention_begin"),
                    ("contention_end_btf", "contention_end"),
                ],
                links,
            )?;
            attached.push("kernel locks (lock:contention_begin/end)");
        }
        _ => tracing::warn!(
            "kernel lock waits unavailable: this kernel lacks BTF lock:contention_begin/end"
        ),
    }
    if attached.is_empty() {
        return Err(ProbeError::Unsupported {
            signal: "lock",
            need: "BTF tracepoints: sched_switch (5.18+) for futex waits, lock:contention_begin/end for kernel locks",
        });
    }
    Ok(attached)
}

/// Syscall programs (BTF raw tracepoints).
pub fn attach_syscall(
    ebpf: &mut Ebpf,
    btf: Option<(&Btf, &aya::Btf)>,
) -> Result<Vec<(&'static str, BtfTracePointLinkId)>, ProbeError> {
    match btf {
        Some((ours, theirs)) if btf_syscall_supported(ours) => attach_btf_links(
            ebpf,
            theirs,
            &[("sys_enter_btf", "sys_enter"), ("sys_exit_btf", "sys_exit")],
        ),
        _ => Err(ProbeError::Unsupported {
            signal: "syscall",
            need: "BTF tracepoints sys_enter/sys_exit (kernel BTF)",
        }),
    }
}

/// Network programs (BTF tracepoints): socket state changes for connects and the
/// direction of connections, `tcp_probe` and `tcp_retransmit_skb` for the TCP signal,
/// `kfree_skb` for listen overflows where the kernel reports them with the listener.
/// Socket waits come from the scheduler programs. Returns what serves each signal.
pub fn attach_net(
    ebpf: &mut Ebpf,
    btf: Option<(&Btf, &aya::Btf)>,
    signals: &[Signal],
    links: &mut HeldLinks,
) -> Result<Vec<(Signal, String)>, ProbeError> {
    let Some((ours, theirs)) = btf.filter(|(ours, _)| btf_net_supported(ours)) else {
        return Err(ProbeError::Unsupported {
            signal: "network",
            need: "kernel BTF with the tracepoints inet_sock_set_state, tcp_probe and tcp_retransmit_skb (4.16+) and the socket structs",
        });
    };
    let mut programs = vec![("inet_sock_set_state_btf", "inet_sock_set_state")];
    let mut hooks = Vec::new();
    for &signal in signals {
        match signal {
            Signal::Connect => hooks.push((
                signal,
                "tp_btf inet_sock_set_state (stacks at SYN_SENT, in the connecting thread)"
                    .to_owned(),
            )),
            Signal::SocketWait => hooks.push((
                signal,
                "tp_btf sched_switch (blocked inside a socket syscall) to rseq_update (back in user space), peers from the fd's socket"
                    .to_owned(),
            )),
            Signal::Tcp => {
                programs.push(("tcp_probe_btf", "tcp_probe"));
                programs.push(("tcp_retransmit_skb_btf", "tcp_retransmit_skb"));
                let overflow = if listen_overflow_reason(ours).is_some() {
                    programs.push(("kfree_skb_btf", "kfree_skb"));
                    "listen overflows at the handshake's last ACK (tp_btf kfree_skb, reason TCP_LISTEN_OVERFLOW; SYNs dropped by a full queue are not visible)"
                } else {
                    "no listen overflows (this kernel's kfree_skb has no listener or reason)"
                };
                hooks.push((
                    signal,
                    format!("tp_btf tcp_probe (RTT) + tcp_retransmit_skb; {overflow}"),
                ));
            }
            _ => {}
        }
    }
    attach_btf(ebpf, theirs, &programs, links)?;
    Ok(hooks)
}

/// Disk programs: `block_io_start` (or `block_rq_insert` before 6.5) for attribution,
/// `block_rq_issue` and `block_rq_complete` for the latency.
pub fn attach_disk(ebpf: &mut Ebpf, links: &mut HeldLinks) -> Result<&'static str, ProbeError> {
    ensure_tracefs();
    let start = if tracefs::event_dir("block", "block_io_start").is_some() {
        "block_io_start"
    } else {
        "block_rq_insert"
    };
    for event in [start, "block_rq_issue", "block_rq_complete"] {
        if tracefs::event_dir("block", event).is_none() {
            return Err(ProbeError::Unsupported {
                signal: "disk",
                need: "the block:block_rq_issue and block:block_rq_complete tracepoints",
            });
        }
    }
    attach_tracepoint(ebpf, "block_io_start", "block", start, links)?;
    attach_tracepoint(ebpf, "block_rq_issue", "block", "block_rq_issue", links)?;
    attach_tracepoint(
        ebpf,
        "block_rq_complete",
        "block",
        "block_rq_complete",
        links,
    )?;
    Ok(start)
}

/// On-CPU sampling: a `cpu-clock` perf event per online CPU.
pub fn attach_oncpu(
    ebpf: &mut Ebpf,
    frequency_hz: u64,
    links: &mut HeldLinks,
) -> Result<usize, ProbeError> {
    let cpus = aya::util::online_cpus()
        .map_err(|(what, err)| ProbeError::PerfEvent(format!("reading {what}: {err}")))?;
    let prog: &mut PerfEvent = program(ebpf, "oncpu_sample")?;
    prog.load().map_err(|source| ProbeError::Program {
        program: "oncpu_sample",
        source,
    })?;
    for &cpu in &cpus {
        let id = prog
            .attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(frequency_hz),
                false,
            )
            .map_err(|err| ProbeError::PerfEvent(format!("cpu {cpu}: {err}")))?;
        links.push_perf("oncpu_sample", || prog.take_link(id).ok());
    }
    Ok(cpus.len())
}
