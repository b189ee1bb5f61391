//! Network scenarios with injected waits, between two network namespaces the test created
//! (client threads enter one, server threads the other): a connect whose SYN a full
//! listener drops, a slow and a fast peer, and bulk transfers over paths the test made
//! lossy or slow. Each prints what it measured itself (`result key=value`).

use std::{
    fs::File,
    hint::black_box,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::waits::result;

/// Moves the calling thread into network namespace `name` (`ip netns add` made it).
fn enter_netns(name: &str) {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: setns(2) on a namespace file we hold open; affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
}

fn parse_addr(text: &str) -> SocketAddr {
    text.parse()
        .unwrap_or_else(|e| panic!("bad socket address {text}: {e}"))
}

/// A listening TCP socket on `addr` with accept backlog `backlog` (std always asks
/// for 128).
fn listen(addr: SocketAddr, backlog: i32) -> TcpListener {
    // SAFETY: plain socket calls on a descriptor this function owns; the sockaddr
    // structures are fully initialised and passed with their sizes.
    unsafe {
        let family = if addr.is_ipv6() {
            libc::AF_INET6
        } else {
            libc::AF_INET
        };
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        let rc = match addr {
            SocketAddr::V4(v4) => {
                let mut sa: libc::sockaddr_in = std::mem::zeroed();
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_port = v4.port().to_be();
                sa.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
                libc::bind(
                    fd,
                    (&raw const sa).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
            SocketAddr::V6(v6) => {
                let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
                sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sa.sin6_port = v6.port().to_be();
                sa.sin6_addr.s6_addr = v6.ip().octets();
                libc::bind(
                    fd,
                    (&raw const sa).cast(),
                    size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        };
        assert_eq!(rc, 0, "bind {addr}: {}", std::io::Error::last_os_error());
        let rc = libc::listen(fd, backlog);
        assert_eq!(rc, 0, "listen {addr}: {}", std::io::Error::last_os_error());
        TcpListener::from_raw_fd(fd)
    }
}

/// Connects to `addr` (the connect marker): returns the stream and how long it took.
#[inline(never)]
pub fn connect_marker(addr: SocketAddr) -> (std::io::Result<TcpStream>, Duration) {
    let started = Instant::now();
    let stream = black_box(TcpStream::connect(addr));
    (stream, started.elapsed())
}

/// `net-connect CLIENT_NS SERVER_NS ADDR:PORT ATTEMPTS`: a listener with a backlog of
/// zero that never accepts; one connection fills its queue. Each attempt's SYN is then
/// dropped; a moment later the server replaces the full listener with an empty one (it
/// still never accepts), so the retransmitted SYN, one initial RTO (1 s) later, gets
/// through and fills the new queue for the next attempt. Then one connect to a port
/// nobody listens on (refused). Reports each connect's duration.
pub fn connect(client_ns: &str, server_ns: &str, addr: &str, attempts: usize) {
    let addr = parse_addr(addr);
    let (room_tx, room_rx) = mpsc::channel::<bool>();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let server_ns = server_ns.to_owned();
    let server = thread::Builder::new()
        .name("full-listener".into())
        .spawn(move || {
            enter_netns(&server_ns);
            let mut listener = listen(addr, 0);
            ready_tx.send(()).expect("client alive");
            // `true`: make room after a while; `false`: done.
            while room_rx.recv().unwrap_or(false) {
                thread::sleep(Duration::from_millis(300));
                drop(listener);
                listener = listen(addr, 0);
            }
            drop(listener);
        })
        .expect("spawn server");
    let client_ns = client_ns.to_owned();
    let client = thread::Builder::new()
        .name("connector".into())
        .spawn(move || {
            enter_netns(&client_ns);
            ready_rx.recv().expect("server ready");
            let mut held = vec![TcpStream::connect(addr).expect("filler connection")];
            let mut durations = Vec::new();
            for _ in 0..attempts {
                room_tx.send(true).expect("server alive");
                let (stream, took) = connect_marker(addr);
                held.push(stream.expect("connect completes after the SYN retransmit"));
                durations.push(took.as_nanos().to_string());
            }
            room_tx.send(false).expect("server alive");
            let closed = SocketAddr::new(addr.ip(), addr.port() + 1);
            let (refused, _) = connect_marker(closed);
            assert!(refused.is_err(), "nothing listens on {closed}");
            durations
        })
        .expect("spawn client");
    let durations = client.join().expect("client");
    server.join().expect("server");
    result("connect_ns", durations.join(","));
}

/// One request and its response (the socket-wait marker): returns how long it took.
#[inline(never)]
pub fn socket_marker_request(stream: &mut TcpStream, buffer: &mut [u8; 64]) -> Duration {
    let started = Instant::now();
    exchange(stream, buffer);
    black_box(&buffer);
    started.elapsed()
}

/// The request and response themselves, in a framed function of their own: the frameless
/// libc wrappers hide their direct caller from frame-pointer unwinding, and that caller
/// must not be the marker. They use `write`/`read` on the socket rather than std's
/// `send`/`recv`: glibc's `recv` and `send` use the frame-pointer register for data, so
/// frame-pointer unwinding stops inside them (until the agent unwinds with `.eh_frame`).
#[inline(never)]
fn exchange(stream: &mut TcpStream, buffer: &mut [u8; 64]) {
    // SAFETY: the descriptor stays owned by `stream`; `ManuallyDrop` never closes it.
    let mut file = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(stream.as_raw_fd()) });
    file.write_all(&buffer[..]).expect("send request");
    file.read_exact(&mut buffer[..]).expect("read response");
}

/// Serves one connection on `addr`: answers every 64-byte request after `delay`.
fn echo_server(server_ns: &str, addr: SocketAddr, delay: Duration, ready: &mpsc::Sender<()>) {
    enter_netns(server_ns);
    let listener = listen(addr, 16);
    ready.send(()).expect("client alive");
    let (mut stream, _) = listener.accept().expect("accept");
    let mut buffer = [0u8; 64];
    while stream.read_exact(&mut buffer).is_ok() {
        thread::sleep(delay);
        if stream.write_all(&buffer).is_err() {
            break;
        }
    }
}

/// `net-peers CLIENT_NS SERVER_NS SLOW_ADDR:PORT FAST_ADDR:PORT REQUESTS DELAY_MS`: a
/// slow peer answers each request after `DELAY_MS`, a fast one at once; the client sends
/// `REQUESTS` requests to each. Reports the total time the client measured per peer.
pub fn peers(
    client_ns: &str,
    server_ns: &str,
    (slow, fast): (&str, &str),
    requests: usize,
    delay: Duration,
) {
    let (slow, fast) = (parse_addr(slow), parse_addr(fast));
    let (ready_tx, ready_rx) = mpsc::channel();
    let servers: Vec<_> = [
        (slow, delay, "slow-peer"),
        (fast, Duration::ZERO, "fast-peer"),
    ]
    .into_iter()
    .map(|(addr, delay, name)| {
        let ready = ready_tx.clone();
        let ns = server_ns.to_owned();
        thread::Builder::new()
            .name(name.into())
            .spawn(move || echo_server(&ns, addr, delay, &ready))
            .expect("spawn server")
    })
    .collect();
    let client_ns = client_ns.to_owned();
    let client = thread::Builder::new()
        .name("requester".into())
        .spawn(move || {
            enter_netns(&client_ns);
            for _ in 0..2 {
                ready_rx.recv().expect("server ready");
            }
            let mut totals = Vec::new();
            for addr in [slow, fast] {
                let mut stream = TcpStream::connect(addr).expect("connect");
                stream.set_nodelay(true).expect("nodelay");
                let mut buffer = [7u8; 64];
                let total: Duration = (0..requests)
                    .map(|_| socket_marker_request(&mut stream, &mut buffer))
                    .sum();
                totals.push(total.as_nanos());
            }
            totals
        })
        .expect("spawn client");
    let totals = client.join().expect("client");
    for server in servers {
        server.join().expect("server");
    }
    result("slow_wait_ns", totals[0]);
    result("fast_wait_ns", totals[1]);
    result("rseq_size", rseq_size());
}

unsafe extern "C" {
    /// glibc (2.35+): the size of the rseq area it registers for every thread, 0 when it
    /// registers none (`GLIBC_TUNABLES=glibc.pthread.rseq=0`).
    static __rseq_size: u32;
}

/// Whether glibc registered rseq for this process's threads (its registered size).
fn rseq_size() -> u32 {
    // SAFETY: a constant glibc sets before `main` and never changes.
    unsafe { __rseq_size }
}

/// Sends `bytes` to `stream` in 16 KiB writes (the bulk-transfer marker).
#[inline(never)]
pub fn bulk_marker_send(stream: &mut TcpStream, bytes: usize) {
    let chunk = [0x5au8; 16384];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n]).expect("bulk write");
        left -= n;
    }
}

/// `net-bulk CLIENT_NS SERVER_NS BYTES ADDR:PORT...`: sends BYTES to each peer in turn
/// (each server reads and discards until the client closes, then closes too).
pub fn bulk(client_ns: &str, server_ns: &str, bytes: usize, peers: &[String]) {
    let peers: Vec<SocketAddr> = peers.iter().map(|p| parse_addr(p)).collect();
    let (ready_tx, ready_rx) = mpsc::channel();
    let servers: Vec<_> = peers
        .iter()
        .enumerate()
        .map(|(index, &addr)| {
            let ready = ready_tx.clone();
            let ns = server_ns.to_owned();
            thread::Builder::new()
                .name(format!("sink-{index}"))
                .spawn(move || {
                    enter_netns(&ns);
                    let listener = listen(addr, 16);
                    ready.send(()).expect("client alive");
                    let (mut stream, _) = listener.accept().expect("accept");
                    let mut sink = vec![0u8; 65536];
                    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                })
                .expect("spawn sink")
        })
        .collect();
    let client_ns = client_ns.to_owned();
    let count = peers.len();
    let client = thread::Builder::new()
        .name("bulk-sender".into())
        .spawn(move || {
            enter_netns(&client_ns);
            for _ in 0..count {
                ready_rx.recv().expect("sink ready");
            }
            let mut took = Vec::new();
            for addr in peers {
                let started = Instant::now();
                let mut stream = TcpStream::connect(addr).expect("connect");
                bulk_marker_send(&mut stream, bytes);
                stream
                    .shutdown(std::net::Shutdown::Write)
                    .expect("shutdown");
                // Wait for the sink to close: everything was delivered.
                let mut rest = [0u8; 16];
                let _ = stream.read(&mut rest);
                took.push(started.elapsed().as_nanos().to_string());
            }
            took
        })
        .expect("spawn client");
    let took = client.join().expect("client");
    for server in servers {
        server.join().expect("sink");
    }
    result("bulk_ns", took.join(","));
}

/// `net-rr ROUND_TRIPS`: request/response over loopback, one 64-byte message each way per
/// round trip, between a server and a client thread (the network benchmark's workload).
/// Reports round trips per second.
pub fn request_response(round_trips: usize) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let server = thread::Builder::new()
        .name("rr-server".into())
        .spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            stream.set_nodelay(true).expect("nodelay");
            let mut buffer = [0u8; 64];
            while stream.read_exact(&mut buffer).is_ok() {
                if stream.write_all(&buffer).is_err() {
                    break;
                }
            }
        })
        .expect("spawn server");
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut buffer = [1u8; 64];
    let started = Instant::now();
    for _ in 0..round_trips {
        stream.write_all(&buffer).expect("request");
        stream.read_exact(&mut buffer).expect("response");
    }
    let elapsed = started.elapsed();
    drop(stream);
    server.join().expect("server");
    result(
        "rr_per_sec",
        format!("{:.0}", round_trips as f64 / elapsed.as_secs_f64()),
    );
}
