//! The read-only configuration the agent writes into the probes before loading them.

/// Read-only configuration of the probes (a `.rodata` global).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Syscalls at or above this many nanoseconds get a user stack and their fd kind.
    pub syscall_slow_threshold_ns: u64,
    /// Socket syscalls shorter than this did not wait: they are not socket waits.
    pub socket_wait_min_ns: u64,
    /// Socket waits at or above this always get a user stack; shorter ones are
    /// threshold-sampled.
    pub socket_stack_threshold_ns: u64,
    /// A TCP socket's smoothed RTT is sampled at most once per this interval.
    pub tcp_rtt_interval_ns: u64,
    /// Only this process (tgid) is measured; zero measures every process.
    pub target_tgid: u32,
    /// Enabled signals: bit `1 << Signal as u8` (the scheduler programs serve several).
    pub signals: u32,
    /// Offsets in kernel structs, read from BTF (Rust eBPF has no CO-RE); zero if unknown.
    pub task_pid_offset: u32,
    pub task_tgid_offset: u32,
    pub task_flags_offset: u32,
    /// The `rseq` pointer of `task_struct`; zero makes every thread take the eager
    /// user-stack path (correct, slower).
    pub task_rseq_offset: u32,
    pub task_files_offset: u32,
    pub files_fdt_offset: u32,
    pub fdt_fd_offset: u32,
    pub fdt_max_fds_offset: u32,
    pub file_inode_offset: u32,
    pub inode_mode_offset: u32,
    /// Offset of `prev_state` in the classic `sched_switch` tracepoint record.
    pub tp_prev_state_offset: u32,
    /// Offset of `next_pid` in the classic `sched_switch` tracepoint record.
    pub tp_next_pid_offset: u32,
    /// Offset of `rwbs` in the `block_io_start`/`block_rq_issue` records.
    pub tp_block_rwbs_offset: u32,
    /// Syscall numbers of `futex`, `futex_wait` and `futex_waitv` on this architecture
    /// (`u32::MAX` where it has none): a thread switched out inside one of them is waiting
    /// on a user-space lock or condition.
    pub futex_nr: u32,
    pub futex_wait_nr: u32,
    pub futex_waitv_nr: u32,
    /// This process (tgid) is not measured when every process is (the agent itself);
    /// zero excludes nothing.
    pub exclude_tgid: u32,
    /// This agent's owner tag: the programs count only while the `GENERATION` value
    /// carries it ([`generation_value`]), so an agent that adopts the maps of an earlier
    /// one (pinned, see the agent's `probes::pins`) takes over from its programs in one
    /// map update, with no event counted twice or missed.
    pub owner: u32,
    pub owner_pad: u32,
    /// 1 when BTF gave every offset of the fd walk (`files`, `fdt`, `fd`, `max_fds`,
    /// `f_inode`, `i_mode`; several of them are legitimately zero).
    pub fd_walk: u32,
    /// Offsets for the socket behind a file and its peer: `file->private_data`,
    /// `socket->sk`, and in `struct sock` (its `sock_common` first):
    /// `skc_daddr`, `skc_dport`, `skc_num`, `skc_family`, `skc_state`, `skc_v6_daddr`,
    /// `sk_err`, `sk_protocol`; `srtt_us` in `struct tcp_sock`.
    pub file_private_data_offset: u32,
    pub socket_sk_offset: u32,
    pub sk_daddr_offset: u32,
    pub sk_dport_offset: u32,
    pub sk_num_offset: u32,
    pub sk_family_offset: u32,
    pub sk_state_offset: u32,
    pub sk_v6_daddr_offset: u32,
    pub sk_err_offset: u32,
    pub sk_protocol_offset: u32,
    pub tcp_srtt_offset: u32,
    /// 1 when BTF gave every socket offset above (several are legitimately zero).
    pub sock_walk: u32,
    /// The ephemeral port range (`net.ipv4.ip_local_port_range`), to infer the direction
    /// of sockets opened before the probes saw them.
    pub ephemeral_port_lo: u32,
    pub ephemeral_port_hi: u32,
    /// The `skb_drop_reason` value of `SKB_DROP_REASON_TCP_LISTEN_OVERFLOW` on this
    /// kernel (`u32::MAX` if it has none).
    pub listen_overflow_reason: u32,
    /// Syscall numbers of `flock` and `fcntl` (`u32::MAX` where there is none): a
    /// deferred file lock request is waited for inside one of them.
    pub flock_nr: u32,
    pub fcntl_nr: u32,
    /// Offsets for file locks: `struct file_lock`'s `c` (its `struct file_lock_core`,
    /// 6.9+; zero before, when the fields sit in `file_lock` itself), and in that core
    /// `flc_blocker` and `flc_pid`; `i_ino` and `i_sb` of `struct inode`, `s_dev` of
    /// `struct super_block`.
    pub file_lock_core_offset: u32,
    pub flc_blocker_offset: u32,
    pub flc_pid_offset: u32,
    pub inode_ino_offset: u32,
    pub inode_sb_offset: u32,
    pub sb_dev_offset: u32,
    /// 1 when BTF gave every file-lock offset above.
    pub file_lock_walk: u32,
}

impl ProbeConfig {
    pub const DEFAULT: Self = Self {
        syscall_slow_threshold_ns: 1_000_000,
        socket_wait_min_ns: 10_000,
        socket_stack_threshold_ns: 1_000_000,
        tcp_rtt_interval_ns: 10_000_000,
        target_tgid: 0,
        signals: 0,
        task_pid_offset: 0,
        task_tgid_offset: 0,
        task_flags_offset: 0,
        task_rseq_offset: 0,
        task_files_offset: 0,
        files_fdt_offset: 0,
        fdt_fd_offset: 0,
        fdt_max_fds_offset: 0,
        file_inode_offset: 0,
        inode_mode_offset: 0,
        tp_prev_state_offset: 32,
        tp_next_pid_offset: 56,
        tp_block_rwbs_offset: 34,
        futex_nr: u32::MAX,
        futex_wait_nr: u32::MAX,
        futex_waitv_nr: u32::MAX,
        exclude_tgid: 0,
        owner: 0,
        owner_pad: 0,
        fd_walk: 0,
        file_private_data_offset: 0,
        socket_sk_offset: 0,
        sk_daddr_offset: 0,
        sk_dport_offset: 0,
        sk_num_offset: 0,
        sk_family_offset: 0,
        sk_state_offset: 0,
        sk_v6_daddr_offset: 0,
        sk_err_offset: 0,
        sk_protocol_offset: 0,
        tcp_srtt_offset: 0,
        sock_walk: 0,
        ephemeral_port_lo: 32768,
        ephemeral_port_hi: 60999,
        listen_overflow_reason: u32::MAX,
        flock_nr: u32::MAX,
        fcntl_nr: u32::MAX,
        file_lock_core_offset: 0,
        flc_blocker_offset: 0,
        flc_pid_offset: 0,
        inode_ino_offset: 0,
        inode_sb_offset: 0,
        sb_dev_offset: 0,
        file_lock_walk: 0,
    };

    /// Whether `signal` is enabled.
    pub const fn wants(&self, signal: crate::Signal) -> bool {
        self.signals & (1 << signal as u32) != 0
    }
}

/// Index into the `GENERATION` array holding the owner tag and the active generation.
pub const GENERATION_INDEX: u32 = 0;

/// Indices into the `GENERATION` array of the low and high halves of the drain journal
/// record (its wall-clock time, unix ns) that holds the retired generation while the
/// agent empties it: 0 when no retired generation is being journaled. An agent adopting
/// the maps after a kill finds there whether its journal already has what the retired
/// generation still holds (programs never read them).
pub const JOURNALED_LOW_INDEX: u32 = 1;
pub const JOURNALED_HIGH_INDEX: u32 = 2;
/// Entries of the `GENERATION` array.
pub const GENERATION_ENTRIES: u32 = 3;

/// The `GENERATION` value: the owner tag above the active generation (bit 0).
pub const fn generation_value(owner: u32, generation: u32) -> u32 {
    (owner << 1) | (generation & 1)
}

/// The owner tag of a `GENERATION` value.
pub const fn generation_owner(value: u32) -> u32 {
    value >> 1
}

/// Size of the `FD_SYSCALLS` array: syscall numbers below this can be marked as taking a
/// file descriptor as first argument.
pub const FD_SYSCALLS_LEN: u32 = 512;

/// What the overhead guard changes while the probes run: an array map of one entry
/// (`TUNING`) that the programs read on every event, written by the loader with the
/// configured values before the programs attach. Each event uses the values current when
/// it happens, so every estimate stays unbiased when they change.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Off-CPU waits at or above this many nanoseconds always get stacks; shorter waits
    /// are threshold-sampled with probability `wait / threshold`.
    pub offcpu_stack_threshold_ns: u64,
    /// The same for lock waits.
    pub lock_stack_threshold_ns: u64,
    /// The syscall signal times one syscall in this many, chosen at random per syscall
    /// (every syscall is still counted); 0 and 1 time every syscall.
    pub syscall_sample_every: u32,
    /// Incremented each time the syscall programs are attached again after the guard
    /// detached them: a syscall entered in an earlier attachment is not timed at its exit
    /// (its thread may have entered others unseen since).
    pub syscall_epoch: u32,
}

impl Tuning {
    pub const DEFAULT: Self = Self {
        offcpu_stack_threshold_ns: 1_000_000,
        lock_stack_threshold_ns: 1_000_000,
        syscall_sample_every: 1,
        syscall_epoch: 0,
    };
}
