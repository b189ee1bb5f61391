//! The agent's metrics listener (`run --metrics-listen ADDR`, off unless set): a small
//! HTTP/1.1 server on one thread of its own that answers `GET /metrics` (Prometheus text
//! format), `/healthz` (the drain loop is alive) and `/readyz` (the probes are attached).
//! One request per connection, a short deadline per client and a bounded request head:
//! a slow or hostile client costs one blocked thread for a few seconds, never the agent.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use stallscope_profile::exposition::CONTENT_TYPE;

use super::METRICS;

/// A client has this long to send its request head and read the answer.
const CLIENT_DEADLINE: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Binds `addr` and serves it on a thread for the rest of the process's life; returns
/// the address bound (port 0 picks one).
pub fn start(addr: SocketAddr) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(err) = answer(stream) {
                            tracing::debug!("metrics client: {err}");
                        }
                    }
                    Err(err) => {
                        tracing::warn!("metrics listener: accept failed: {err}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(bound)
}

fn answer(mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_DEADLINE))?;
    stream.set_write_timeout(Some(CLIENT_DEADLINE))?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..read]);
        if head.len() > MAX_HEAD_BYTES {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain; charset=utf-8",
                "request head too large\n",
                true,
            );
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let body_wanted = method != "HEAD";
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "use GET\n",
            body_wanted,
        );
    }
    match path {
        "/metrics" => respond(
            &mut stream,
            "200 OK",
            CONTENT_TYPE,
            &METRICS.render(),
            body_wanted,
        ),
        "/healthz" => match METRICS.unhealthy() {
            None => respond(
                &mut stream,
                "200 OK",
                "text/plain; charset=utf-8",
                "ok\n",
                body_wanted,
            ),
            Some(why) => respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain; charset=utf-8",
                &format!("{why}\n"),
                body_wanted,
            ),
        },
        "/readyz" => {
            if METRICS.ready() {
                respond(
                    &mut stream,
                    "200 OK",
                    "text/plain; charset=utf-8",
                    "ready\n",
                    body_wanted,
                )
            } else {
                respond(
                    &mut stream,
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    "loading the probes\n",
                    body_wanted,
                )
            }
        }
        _ => respond(
            &mut stream,
            "404 Not Found",
            "text/plain; charset=utf-8",
            "no such endpoint: /metrics, /healthz and /readyz are\n",
            body_wanted,
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    with_body: bool,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if with_body {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.write_all(request.as_bytes()).expect("send");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read");
        answer
    }

    #[test]
    fn serves_metrics_health_and_refuses_the_rest() {
        let addr = start("127.0.0.1:0".parse().expect("address")).expect("bind");
        let metrics = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
        assert!(
            metrics.contains("\nprocess_resident_memory_bytes "),
            "{metrics}"
        );
        let health = get(addr, "GET /healthz HTTP/1.0\r\n\r\n");
        assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
        // The process-wide metrics of this test binary: no probes were attached.
        let ready = get(addr, "GET /readyz HTTP/1.1\r\n\r\n");
        assert!(ready.starts_with("HTTP/1.1 503 "), "{ready}");
        let missing = get(addr, "GET /nothing HTTP/1.1\r\n\r\n");
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        let post = get(addr, "POST /metrics HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    }
}
