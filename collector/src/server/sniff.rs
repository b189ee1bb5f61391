//! A look at the first bytes of every accepted connection, to say what went wrong when a
//! client speaks the wrong protocol: plain HTTP/1 (a browser, curl without
//! `--http2-prior-knowledge`), TLS to a plaintext collector, or plaintext to a TLS one.
//! hyper only reports such connections as an opaque h2 protocol error, at debug level.
//! The bytes are passed on untouched.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The HTTP/2 connection preface every gRPC client sends first over plaintext.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// First byte of a TLS record carrying a handshake (a `ClientHello`).
const TLS_HANDSHAKE: u8 = 0x16;

/// HTTP/1 request methods, as the first bytes of a request.
const HTTP1_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// At most one warning of a kind per this many seconds: a port scanner must not flood
/// the log.
const WARN_EVERY_S: i64 = 10;

/// When each kind of wrong greeting was last logged (Unix seconds), shared by all
/// connections.
pub type LastWarnings = Arc<[AtomicI64; 4]>;

/// No warning logged yet.
pub fn last_warnings() -> LastWarnings {
    Arc::new([const { AtomicI64::new(0) }; 4])
}

/// What the first bytes of a connection say about the client's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Greeting {
    Http1,
    Tls,
    /// Plaintext HTTP/2 (or anything else) on a TLS port.
    NotTls,
    Unknown,
    /// What this port expects (or too few bytes to tell otherwise).
    Expected,
}

/// Classifies the first bytes a client sent to a port expecting TLS or plaintext HTTP/2.
pub fn classify(first: &[u8], expect_tls: bool) -> Greeting {
    let Some(&byte) = first.first() else {
        return Greeting::Expected;
    };
    let is_prefix_of = |whole: &[u8]| {
        let n = first.len().min(whole.len());
        first[..n] == whole[..n]
    };
    if HTTP1_METHODS.iter().any(|m| is_prefix_of(m)) && !is_prefix_of(H2_PREFACE) {
        return Greeting::Http1;
    }
    match (expect_tls, byte == TLS_HANDSHAKE) {
        (true, true) => Greeting::Expected,
        (true, false) => Greeting::NotTls,
        (false, true) => Greeting::Tls,
        (false, false) if is_prefix_of(H2_PREFACE) => Greeting::Expected,
        (false, false) => Greeting::Unknown,
    }
}

/// The hint logged for a wrong greeting.
pub fn hint(greeting: Greeting, peer: &str, listen: SocketAddr) -> Option<String> {
    let hint = match greeting {
        Greeting::Expected => return None,
        Greeting::Http1 => format!(
            "{peer} sent an HTTP/1 request to {listen}; the collector speaks gRPC (HTTP/2) only: use stallscope-agent or the stallscope CLI, or a gRPC client"
        ),
        Greeting::Tls => format!(
            "{peer} started a TLS handshake on {listen}, which serves plaintext (--plaintext): point the client at http://{listen}, or give the collector --tls-cert, --tls-key and --client-ca"
        ),
        Greeting::NotTls => format!(
            "{peer} sent plaintext to {listen}, which serves TLS: point the client at https://HOST:{}",
            listen.port()
        ),
        Greeting::Unknown => format!(
            "{peer} sent something other than gRPC (HTTP/2) to {listen}; the collector speaks gRPC only"
        ),
    };
    Some(hint)
}

/// An accepted TCP connection whose first bytes are checked once.
pub struct SniffedStream {
    inner: TcpStream,
    expect_tls: bool,
    listen: SocketAddr,
    sniffed: bool,
    last_warnings: LastWarnings,
}

impl SniffedStream {
    pub fn new(
        inner: TcpStream,
        expect_tls: bool,
        listen: SocketAddr,
        last_warnings: LastWarnings,
    ) -> Self {
        Self {
            inner,
            expect_tls,
            listen,
            sniffed: false,
            last_warnings,
        }
    }

    fn check(&self, first: &[u8]) {
        let peer = self
            .inner
            .peer_addr()
            .map_or_else(|_| "a client".to_owned(), |addr| addr.to_string());
        let greeting = classify(first, self.expect_tls);
        let Some(hint) = hint(greeting, &peer, self.listen) else {
            return;
        };
        let Some(last_warning_s) = self.last_warnings.get(greeting as usize) else {
            return;
        };
        let now_s = crate::unix_now_ns() / 1_000_000_000;
        let last = last_warning_s.load(Ordering::Relaxed);
        if now_s - last >= WARN_EVERY_S
            && last_warning_s
                .compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!("{hint}");
        }
    }
}

impl AsyncRead for SniffedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !self.sniffed && matches!(polled, Poll::Ready(Ok(()))) {
            let first = &buf.filled()[before..];
            if !first.is_empty() {
                self.sniffed = true;
                self.check(first);
            }
        }
        polled
    }
}

impl AsyncWrite for SniffedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for SniffedStream {
    // The TCP stream's own connect info, so TLS client certificates are found where
    // tonic puts them (`TlsConnectInfo<TcpConnectInfo>`).
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_are_told_apart() {
        assert_eq!(classify(H2_PREFACE, false), Greeting::Expected);
        assert_eq!(classify(b"PRI * HT", false), Greeting::Expected);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n", false), Greeting::Http1);
        assert_eq!(classify(b"POST /x HTTP/1.1\r\n", true), Greeting::Http1);
        assert_eq!(classify(&[0x16, 0x03, 0x01], false), Greeting::Tls);
        assert_eq!(classify(&[0x16, 0x03, 0x01], true), Greeting::Expected);
        assert_eq!(classify(H2_PREFACE, true), Greeting::NotTls);
        assert_eq!(classify(b"\x00\x01junk", false), Greeting::Unknown);
        assert_eq!(classify(b"", false), Greeting::Expected);
        let listen: SocketAddr = "127.0.0.1:7070".parse().expect("address");
        let text = hint(Greeting::Tls, "127.0.0.1:5555", listen).expect("a hint");
        assert!(text.contains("http://127.0.0.1:7070"), "{text}");
        assert!(hint(Greeting::Expected, "x", listen).is_none());
    }
}
