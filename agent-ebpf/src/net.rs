//! Network latency per remote peer: TCP connect latency, socket waits, smoothed RTT,
//! retransmits and listen overflows (BTF tracepoints).
//!
//! - Connect: `inet_sock_set_state` CLOSE -> SYN_SENT runs in the connecting thread's own
//!   context (inside `connect`), where both its stacks are taken and the socket is
//!   remembered with its peer; SYN_SENT -> ESTABLISHED (or -> CLOSE: refused, timed out,
//!   aborted) ends the connect, usually in softirq context, from what was remembered.
//! - Socket waits: a thread switched out inside a receive, send, poll or connect syscall
//!   (its saved user registers say which, and on which descriptor; see `sched_btf.rs`)
//!   waits on a socket from then until it returns to user space (`rseq_update`; at
//!   switch-in for a thread without rseq). A wait of at least `socket_wait_min_ns` is
//!   followed from its descriptor to the socket and peer, added to the exact totals of
//!   (thread, operation, peer); waits at or above the stack threshold get the user stack
//!   (in the thread's own context), shorter ones are threshold-sampled like off-CPU waits.
//!   Syscalls that do not block cost nothing: no syscall is hooked.
//! - RTT: `tcp_probe` (every segment received on an established socket) samples a
//!   socket's `srtt_us` at most once per `tcp_rtt_interval_ns`, into a per-peer
//!   histogram. Retransmits (`tcp_retransmit_skb`) count per peer and TCP state; listen
//!   overflows come from `kfree_skb` with the listen-overflow drop reason.
//!
//! Peers are identified by a 32-bit id in `aux` (see [`Peer::id`]); `PEERS` maps ids back
//! to addresses for the agent. Sockets are remembered by address in an LRU map, which
//! also gives the owner of a socket to events that run in softirq context.

use agent_common::{
    ConnectOutcome, Direction, EST_COUNT_FP_SHIFT, FD_SYSCALLS_LEN, FdKind,
    PEER_DIRECTION_INFERRED, Peer, SampleKey, SampleValue, Signal, SocketInfo, SocketOp,
    THREAD_SOCKET_WAIT, TcpEvent, ThreadState, TotalKey,
};
use aya_ebpf::{
    EbpfContext,
    bindings::task_struct,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::bpf_get_prandom_u32,
    },
    macros::{btf_tracepoint, map},
    maps::{Array, LruHashMap},
    programs::BtfTracePointContext,
};

use crate::{
    kernel::{fd_file, file_kind, read_ptr},
    maps::{
        SLOT_NET, add_sample, add_total, capture_current_stack, config, generation, owns,
        remember_comm, wanted, wants,
    },
};

/// The [`SocketOp`] of each syscall number (0: not a socket operation), set by the agent.
#[map]
static SOCKET_SYSCALLS: Array<u8> = Array::with_max_entries(FD_SYSCALLS_LEN, 0);

/// Sockets the probes know, by the address of their `struct sock`.
#[map]
static SOCKETS: LruHashMap<u64, SocketInfo> = LruHashMap::with_max_entries(16384, 0);

/// Peers by id, for the agent (like thread names, kept across generations).
#[map]
pub static PEERS: LruHashMap<u32, Peer> = LruHashMap::with_max_entries(16384, 0);

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;

/// TCP states (`include/net/tcp_states.h`).
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;

/// The [`SocketOp`] of syscall `nr`.
#[inline(always)]
fn socket_op(nr: u32) -> u8 {
    SOCKET_SYSCALLS.get(nr).copied().unwrap_or(0)
}

/// Whether syscall `nr` can wait on a socket (receive, send, poll, connect).
#[inline(always)]
pub fn is_socket_syscall(nr: u32) -> bool {
    socket_op(nr) != SocketOp::None as u8
}

#[inline(always)]
fn read_u16(base: u64, offset: u32) -> u16 {
    // SAFETY: fault-tolerant read of a kernel object.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const u16) }.unwrap_or(0)
}

#[inline(always)]
fn read_u32(base: u64, offset: u32) -> u32 {
    // SAFETY: fault-tolerant read of a kernel object.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const u32) }.unwrap_or(0)
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The peer of socket `sk`, as seen from `direction` (inferred from the ports when
/// unknown); `None` for sockets that are neither IPv4 nor IPv6.
#[inline(always)]
fn peer_of(sk: u64, direction: u8) -> Option<Peer> {
    let family = read_u16(sk, config!(sk_family_offset));
    let (addr, family) = if family == AF_INET {
        (Peer::ipv4_mapped(read_u32(sk, config!(sk_daddr_offset))), 4)
    } else if family == AF_INET6 {
        // SAFETY: fault-tolerant read of a kernel object.
        let addr: [u64; 2] = unsafe {
            bpf_probe_read_kernel((sk + u64::from(config!(sk_v6_daddr_offset))) as *const _)
        }
        .unwrap_or([0; 2]);
        (addr, 6)
    } else {
        return None;
    };
    let remote = u16::from_be(read_u16(sk, config!(sk_dport_offset)));
    let local = read_u16(sk, config!(sk_num_offset));
    let (direction, flags) = if direction == Direction::Unknown as u8 {
        (infer_direction(local, remote), PEER_DIRECTION_INFERRED)
    } else {
        (direction, 0)
    };
    let (remote_port, local_port) = if direction == Direction::Client as u8 {
        (remote, 0)
    } else {
        (0, local)
    };
    Some(Peer {
        addr,
        remote_port,
        local_port,
        family,
        direction,
        flags,
        pad: 0,
    })
}

/// The direction of a socket opened before the probes saw it: the end with the
/// ephemeral port is the client.
#[inline(always)]
fn infer_direction(local: u16, remote: u16) -> u8 {
    let lo = config!(ephemeral_port_lo);
    let hi = config!(ephemeral_port_hi);
    let ephemeral = |port: u16| lo <= u32::from(port) && u32::from(port) <= hi;
    let client = match (ephemeral(local), ephemeral(remote)) {
        (true, false) => true,
        (false, true) => false,
        _ => local > remote,
    };
    if client {
        Direction::Client as u8
    } else {
        Direction::Server as u8
    }
}

/// Records `peer` in the peer table (once) and returns its id.
#[inline(always)]
fn register(peer: &Peer) -> u32 {
    let id = peer.id();
    if PEERS.get_ptr(id).is_none() {
        let _ = PEERS.insert(id, peer, 0);
    }
    id
}

/// Whether a socket event belongs to a process the probes measure. Events of sockets
/// whose owner is not known yet are measured only when every process is.
#[inline(always)]
fn wanted_owner(tgid: u32) -> bool {
    crate::maps::wanted(tgid)
}

/// `inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    if config!(sock_walk) == 0 || read_u16(sk, config!(sk_protocol_offset)) != IPPROTO_TCP {
        return 0;
    }
    if new == TCP_SYN_SENT {
        connect_start(&ctx, sk);
    } else if old == TCP_SYN_SENT {
        let outcome = if new == TCP_ESTABLISHED {
            ConnectOutcome::Established
        } else {
            ConnectOutcome::from_socket_error(read_u32(sk, config!(sk_err_offset)))
        };
        connect_end(&ctx, sk, outcome);
        if new == TCP_CLOSE {
            let _ = SOCKETS.remove(sk);
        }
    } else if old == TCP_SYN_RECV && new == TCP_ESTABLISHED {
        accepted(sk);
    } else if new == TCP_CLOSE {
        let _ = SOCKETS.remove(sk);
    }
    0
}

/// A connect starts, in the connecting thread's context: the socket's owner, direction
/// and peer (for every network signal), and for the connect signal its start and the
/// thread's stacks.
#[inline(always)]
fn connect_start(ctx: &BtfTracePointContext, sk: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if pid_tgid as u32 == 0 || !wanted(tgid) {
        return;
    }
    let Some(peer) = peer_of(sk, Direction::Client as u8) else {
        return;
    };
    let mut info = SocketInfo {
        tgid,
        tid: pid_tgid as u32,
        peer_id: register(&peer),
        direction: Direction::Client as u8,
        ..SocketInfo::default()
    };
    if wants(Signal::Connect) {
        remember_comm(pid_tgid as u32);
        let generation = generation();
        info.kstack = capture_current_stack(ctx, Signal::Connect, generation, SLOT_NET, false);
        info.ustack = capture_current_stack(ctx, Signal::Connect, generation, SLOT_NET, true);
        info.connect_start_ns = now_ns();
    }
    let _ = SOCKETS.insert(sk, info, 0);
}

/// A connect ends: established, or failed with `outcome`.
#[inline(always)]
fn connect_end(ctx: &BtfTracePointContext, sk: u64, outcome: ConnectOutcome) {
    let Some(info) = SOCKETS.get_ptr_mut(sk) else {
        return;
    };
    // SAFETY: the socket's entry; its state changes are serialised by the socket lock.
    let info = unsafe { &mut *info };
    let start = info.connect_start_ns;
    info.connect_start_ns = 0;
    let now = now_ns();
    if start == 0 || start > now {
        return;
    }
    let latency = now - start;
    let generation = generation();
    let total = TotalKey {
        tgid: info.tgid,
        tid: info.tid,
        signal: Signal::Connect as u8,
        class: outcome as u8,
        aux: info.peer_id,
        ..TotalKey::default()
    };
    add_total(ctx, generation, &total, latency, 0);
    let sample = SampleKey {
        tgid: info.tgid,
        tid: info.tid,
        kstack: info.kstack,
        ustack: info.ustack,
        signal: Signal::Connect as u8,
        class: outcome as u8,
        aux: info.peer_id,
        ..SampleKey::default()
    };
    let value = SampleValue {
        ns: latency,
        count: 1,
        ..SampleValue::default()
    };
    add_sample(ctx, generation, &sample, &value);
}

/// A passively opened connection is established: this end is the server.
#[inline(always)]
fn accepted(sk: u64) {
    let Some(peer) = peer_of(sk, Direction::Server as u8) else {
        return;
    };
    let info = SocketInfo {
        peer_id: register(&peer),
        direction: Direction::Server as u8,
        ..SocketInfo::default()
    };
    let _ = SOCKETS.insert(sk, info, 0);
}

/// What the probes know of socket `sk`, remembered now if it was not known (its direction
/// then inferred); `None` if it is not an IPv4 or IPv6 socket or the table is full.
#[inline(always)]
fn socket_info(sk: u64) -> Option<*mut SocketInfo> {
    if let Some(info) = SOCKETS.get_ptr_mut(sk) {
        return Some(info);
    }
    let peer = peer_of(sk, Direction::Unknown as u8)?;
    let info = SocketInfo {
        peer_id: register(&peer),
        direction: peer.direction,
        ..SocketInfo::default()
    };
    SOCKETS.insert(sk, info, 0).ok()?;
    SOCKETS.get_ptr_mut(sk)
}

/// The current thread blocks inside syscall `nr` (arguments `arg0`, `arg1`, from its saved
/// user registers): if that is a socket operation, its socket wait starts now. Called at
/// switch-out, in the thread's own context (a `poll` descriptor is read from its memory).
#[inline(always)]
pub fn socket_wait_begin(thread: &mut ThreadState, nr: u32, (arg0, arg1): (u64, u64), now: u64) {
    let op = socket_op(nr);
    if op == SocketOp::None as u8 {
        return;
    }
    let fd = if op == SocketOp::Poll as u8 {
        poll_fd(arg0, arg1)
    } else {
        arg0
    };
    if fd > u64::from(u32::MAX) {
        return;
    }
    thread.socket_since_ns = now;
    thread.socket_nr = nr;
    thread.socket_fd = fd as u32;
    thread.flags |= THREAD_SOCKET_WAIT;
}

/// The socket wait of `thread` (see [`socket_wait_begin`]) ended at `now`: if it lasted
/// long enough, a socket wait on that socket's peer. `ustack` gives the thread's user
/// stack, asked only for a wait that gets a sample. `task` is the thread's task.
#[inline(always)]
pub fn socket_wait_end<C: EbpfContext>(
    ctx: &C,
    generation: u32,
    task: *mut task_struct,
    thread: &mut ThreadState,
    now: u64,
    ustack: impl FnOnce() -> u64,
) {
    thread.flags &= !THREAD_SOCKET_WAIT;
    let since = thread.socket_since_ns;
    thread.socket_since_ns = 0;
    if since == 0 || since > now {
        return;
    }
    let wait_ns = now - since;
    if wait_ns < config!(socket_wait_min_ns) || config!(sock_walk) == 0 {
        return;
    }
    let (tgid, tid, nr) = (thread.tgid, thread.tid, thread.socket_nr);
    let op = socket_op(nr);
    let file = fd_file(task, u64::from(thread.socket_fd));
    if file == 0 || file_kind(file) != FdKind::Socket {
        return;
    }
    let socket = read_ptr(file, config!(file_private_data_offset));
    let sk = read_ptr(socket, config!(socket_sk_offset));
    if sk == 0 {
        return;
    }
    // Local (Unix) sockets have no peer: one read spares them the socket table's lookup.
    let family = read_u16(sk, config!(sk_family_offset));
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    let Some(info) = socket_info(sk) else {
        return;
    };
    // SAFETY: an LRU entry, valid for the program's run; racing writers only store
    // whole ids.
    let info = unsafe { &mut *info };
    info.tgid = tgid;
    let peer_id = info.peer_id;
    let total = TotalKey {
        tgid,
        tid,
        signal: Signal::SocketWait as u8,
        class: op,
        aux: peer_id,
        ..TotalKey::default()
    };
    add_total(ctx, generation, &total, wait_ns, 0);
    let threshold = config!(socket_stack_threshold_ns);
    let value = if wait_ns >= threshold {
        SampleValue {
            ns: wait_ns,
            count: 1,
            ..SampleValue::default()
        }
    } else {
        // Threshold sampling: kept with probability wait/threshold, a kept wait stands for
        // `threshold` nanoseconds and `threshold / wait` waits.
        // SAFETY: helper without arguments.
        let draw = (u64::from(unsafe { bpf_get_prandom_u32() }) * threshold) >> 32;
        if draw >= wait_ns {
            return;
        }
        SampleValue {
            est_ns: threshold,
            est_count_fp: (threshold << EST_COUNT_FP_SHIFT) / wait_ns.max(1),
            ..SampleValue::default()
        }
    };
    let sample = SampleKey {
        tgid,
        tid,
        ustack: ustack(),
        signal: Signal::SocketWait as u8,
        class: op,
        aux: peer_id,
        object: [u64::from(nr), 0, 0],
        ..SampleKey::default()
    };
    add_sample(ctx, generation, &sample, &value);
}

/// The descriptor of a `poll`/`ppoll` on exactly one descriptor (`u64::MAX` otherwise),
/// read from the caller's `pollfd`, in its own context.
#[inline(always)]
fn poll_fd(fds: u64, nfds: u64) -> u64 {
    if nfds != 1 {
        return u64::MAX;
    }
    // SAFETY: a fault-tolerant read of the current thread's own memory (`pollfd.fd`).
    match unsafe { bpf_probe_read_user(fds as *const i32) } {
        Ok(fd) if fd >= 0 => fd as u64,
        _ => u64::MAX,
    }
}

/// `tcp_probe(struct sock *sk, const struct sk_buff *skb)`: a segment arrived on an
/// established socket; its smoothed RTT is sampled at most once per interval.
#[btf_tracepoint(function = "tcp_probe")]
pub fn tcp_probe_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    if config!(sock_walk) == 0 {
        return 0;
    }
    let now = now_ns();
    let Some(info) = socket_info(sk) else {
        return 0;
    };
    // SAFETY: an LRU entry, valid for the program's run.
    let info = unsafe { &mut *info };
    if info.last_rtt_ns != 0 && now < info.last_rtt_ns + config!(tcp_rtt_interval_ns) {
        return 0;
    }
    info.last_rtt_ns = now;
    if !wanted_owner(info.tgid) {
        return 0;
    }
    // `srtt_us` holds eight times the smoothed RTT in microseconds.
    let srtt_ns = u64::from(read_u32(sk, config!(tcp_srtt_offset)) >> 3) * 1000;
    let key = TotalKey {
        tgid: info.tgid,
        signal: Signal::Tcp as u8,
        class: TcpEvent::Rtt as u8,
        aux: info.peer_id,
        ..TotalKey::default()
    };
    add_total(&ctx, generation(), &key, srtt_ns, 0);
    0
}

/// `tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb, int err)`.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    if config!(sock_walk) == 0 {
        return 0;
    }
    let Some(info) = socket_info(sk) else {
        return 0;
    };
    // SAFETY: an LRU entry, valid for the program's run.
    let (tgid, peer_id) = unsafe { ((*info).tgid, (*info).peer_id) };
    if !wanted_owner(tgid) {
        return 0;
    }
    // SAFETY: fault-tolerant read of a kernel object.
    let state: u8 =
        unsafe { bpf_probe_read_kernel((sk + u64::from(config!(sk_state_offset))) as *const u8) }
            .unwrap_or(0);
    let key = TotalKey {
        tgid,
        signal: Signal::Tcp as u8,
        class: TcpEvent::Retransmit as u8,
        detail: state,
        aux: peer_id,
        ..TotalKey::default()
    };
    add_total(&ctx, generation(), &key, 0, 0);
    0
}

/// `kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason,
/// struct sock *rx_sk)` (6.12+): a connection a listener dropped because its accept
/// queue was full, counted per listener (its local port).
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb_btf(ctx: BtfTracePointContext) -> i32 {
    if !owns() {
        return 0;
    }
    let reason: u64 = ctx.arg(2);
    if reason as u32 != config!(listen_overflow_reason) || config!(sock_walk) == 0 {
        return 0;
    }
    let sk: u64 = ctx.arg(3);
    if sk == 0 || config!(target_tgid) != 0 {
        return 0;
    }
    let Some(peer) = listener_of(sk) else {
        return 0;
    };
    let key = TotalKey {
        signal: Signal::Tcp as u8,
        class: TcpEvent::ListenOverflow as u8,
        aux: register(&peer),
        ..TotalKey::default()
    };
    add_total(&ctx, generation(), &key, 0, 0);
    0
}

/// A listener as a peer: its local address family and port, server side.
#[inline(always)]
fn listener_of(sk: u64) -> Option<Peer> {
    let family = read_u16(sk, config!(sk_family_offset));
    let family = if family == AF_INET {
        4
    } else if family == AF_INET6 {
        6
    } else {
        return None;
    };
    Some(Peer {
        local_port: read_u16(sk, config!(sk_num_offset)),
        family,
        direction: Direction::Server as u8,
        ..Peer::default()
    })
}
