//! Syscall names, and which syscalls take a file descriptor as their first argument (the
//! probes classify that descriptor's file for slow syscalls). The numbers and names of
//! each supported architecture (the kernel ABI, as the `libc` crate lists it) are in
//! `x86_64.rs` and `aarch64.rs`.

use agent_common::SocketOp;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "aarch64")]
use self::aarch64::SYSCALLS;
#[cfg(target_arch = "x86_64")]
use self::x86_64::SYSCALLS;

/// Syscall (number, name) pairs, sorted by number: none known on other architectures.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const SYSCALLS: &[(u32, &str)] = &[];

/// The name of syscall `nr` on this architecture.
pub fn name(nr: u32) -> Option<&'static str> {
    SYSCALLS
        .binary_search_by_key(&nr, |&(number, _)| number)
        .ok()
        .map(|index| SYSCALLS[index].1)
}

/// The number of syscall `name` on this architecture.
pub fn number(name: &str) -> Option<u32> {
    SYSCALLS
        .iter()
        .find(|&&(_, n)| n == name)
        .map(|&(number, _)| number)
}

/// Syscalls whose first argument is a file descriptor.
const FD_FIRST: &[&str] = &[
    "read",
    "write",
    "pread64",
    "pwrite64",
    "readv",
    "writev",
    "preadv",
    "pwritev",
    "preadv2",
    "pwritev2",
    "recvfrom",
    "recvmsg",
    "recvmmsg",
    "sendto",
    "sendmsg",
    "sendmmsg",
    "connect",
    "accept",
    "accept4",
    "fsync",
    "fdatasync",
    "sync_file_range",
    "fallocate",
    "ftruncate",
    "getdents64",
    "ioctl",
    "fcntl",
    "flock",
    "lseek",
    "fstat",
    "splice",
    "tee",
    "copy_file_range",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "io_uring_enter",
    "shutdown",
    "listen",
    "sendfile",
];

/// Syscalls that can wait on a socket, by what they do. All but `poll`/`ppoll` take the
/// socket as first argument; those two count when they watch exactly one descriptor.
const SOCKET_OPS: &[(&str, SocketOp)] = &[
    ("read", SocketOp::Receive),
    ("readv", SocketOp::Receive),
    ("recvfrom", SocketOp::Receive),
    ("recvmsg", SocketOp::Receive),
    ("recvmmsg", SocketOp::Receive),
    ("write", SocketOp::Send),
    ("writev", SocketOp::Send),
    ("sendto", SocketOp::Send),
    ("sendmsg", SocketOp::Send),
    ("sendmmsg", SocketOp::Send),
    ("sendfile", SocketOp::Send),
    ("poll", SocketOp::Poll),
    ("ppoll", SocketOp::Poll),
    ("connect", SocketOp::Connect),
];

/// The socket syscalls of this architecture, with what they do.
pub fn socket_ops() -> impl Iterator<Item = (u32, SocketOp)> {
    SOCKET_OPS
        .iter()
        .filter_map(|&(name, op)| Some((number(name)?, op)))
}

/// Numbers of the syscalls whose first argument is a file descriptor.
pub fn fd_first_numbers() -> impl Iterator<Item = u32> {
    FD_FIRST.iter().filter_map(|name| number(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_agree_with_libc() {
        assert_eq!(name(libc::SYS_read as u32), Some("read"));
        assert_eq!(name(libc::SYS_futex as u32), Some("futex"));
        assert_eq!(number("fsync"), Some(libc::SYS_fsync as u32));
        assert_eq!(name(100_000), None);
        assert!(fd_first_numbers().count() > 30);
        // x86-64 has no `poll` on some architectures' tables, but every table has these.
        assert!(
            socket_ops().any(|(nr, op)| nr == libc::SYS_recvfrom as u32 && op == SocketOp::Receive)
        );
        assert!(
            socket_ops().any(|(nr, op)| nr == libc::SYS_connect as u32 && op == SocketOp::Connect)
        );
    }
}
