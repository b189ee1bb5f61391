//! The collector's start and stop, without root: SIGTERM ends open agent streams with
//! `UNAVAILABLE` and the process exits within its shutdown deadline; a second collector
//! on the same data directory is refused; "listening" is logged only once the port is
//! bound; errors are one line without repeated causes; a client speaking the wrong
//! protocol gets a hint in the log; logs to a pipe carry no colour codes. (The same stop
//! with a real streaming agent, and nothing lost across it, is in `streaming_faults.rs`.)

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use stallscope_collector::synthetic::{self, Shape};
use stallscope_tests::{
    binary_dir,
    collector::{CollectorProcess, LISTENING_LOG, free_port, run_collector, scratch},
    wire::{connect_plain, frame},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, metadata::MetadataValue};

fn now_ns() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos(),
    )
    .expect("fits")
}

fn plaintext_args(data: &Path) -> Vec<String> {
    vec![
        "--plaintext".into(),
        "--insecure-no-query-auth".into(),
        "--data-dir".into(),
        data.to_string_lossy().into_owned(),
    ]
}

fn start(port: u16, args: &[String]) -> CollectorProcess {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    CollectorProcess::start(&binary_dir(), port, &args, &[]).expect("collector starts")
}

/// The error line a collector that refused to start printed.
fn refusal(args: &[&str]) -> String {
    let output = run_collector(&binary_dir(), args, Duration::from_secs(30))
        .expect("the collector exits by itself");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "started anyway: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// No `: X` part of an error line comes twice (`transport error: transport error`).
fn assert_no_repeated_cause(line: &str) {
    let parts: Vec<&str> = line.split(": ").map(str::trim).collect();
    for (i, part) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..].contains(part),
            "`{part}` repeats in the error: {line}"
        );
    }
}

#[test]
fn sigterm_ends_open_agent_streams_unavailable_and_exits_within_the_deadline() {
    let dir = scratch("lifecycle-sigterm");
    // The default shutdown deadline (10 s).
    let mut collector = start(
        free_port().expect("port"),
        &plaintext_args(&dir.join("data")),
    );
    let port = collector.port;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (code, message, stopped_after) = runtime.block_on(async {
        let mut client = connect_plain(port).await.expect("connects");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let batch = synthetic::batch(
            "streaming",
            "host-a",
            0,
            now_ns(),
            1_000_000_000,
            Shape::default(),
        );
        tx.send(frame(&batch)).await.expect("queued");
        let mut request = Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert(
            "x-stallscope-agent",
            MetadataValue::from_static("streaming"),
        );
        let mut acks = client.stream(request).await.expect("stream").into_inner();
        let ack = tokio::time::timeout(Duration::from_secs(60), acks.message())
            .await
            .expect("acknowledged in time")
            .expect("no error")
            .expect("an ack");
        assert_eq!(ack.sequence, 0);
        // The stream stays open (the sender `tx` lives on), as an agent's does.
        collector.terminate();
        let signalled = Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(30), acks.message())
            .await
            .expect("the collector ends the open stream");
        let status = end.expect_err("the stream ends with a status, not quietly");
        drop(tx);
        (
            status.code(),
            status.message().to_owned(),
            signalled.elapsed(),
        )
    });
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(message.contains("shutting down"), "{message}");
    assert!(
        stopped_after < Duration::from_secs(3),
        "the stream ended {stopped_after:?} after SIGTERM"
    );
    let signalled = Instant::now();
    let status = collector
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|err| panic!("{err:#}: {}", collector.log()));
    assert!(status.success(), "{status}: {}", collector.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(10 + 2),
        "exited {:?} after the stream ended, deadline 10s: {}",
        signalled.elapsed(),
        collector.log()
    );
}

#[test]
fn a_second_collector_on_the_same_data_directory_is_refused() {
    let dir = scratch("lifecycle-lock");
    let data = dir.join("data");
    let first = start(free_port().expect("port"), &plaintext_args(&data));
    let second_port = free_port().expect("port").to_string();
    let listen = format!("127.0.0.1:{second_port}");
    let data_arg = data.to_string_lossy().into_owned();
    let stderr = refusal(&[
        "--listen",
        &listen,
        "--plaintext",
        "--insecure-no-query-auth",
        "--data-dir",
        &data_arg,
    ]);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains("in use by another stallscope-collector")
            && lines[0].contains(&format!("pid {}", first.pid())),
        "{stderr}"
    );
    assert!(
        !stderr.contains(LISTENING_LOG),
        "the refused collector claimed to listen: {stderr}"
    );
    drop(first);
    // Once the first is gone, the directory is free again.
    let _again = start(free_port().expect("port"), &plaintext_args(&data));
}

#[test]
fn listening_is_logged_only_after_the_port_is_bound() {
    let dir = scratch("lifecycle-bind");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("address").to_string();
    let data = dir.join("data").to_string_lossy().into_owned();
    let stderr = refusal(&[
        "--listen",
        &listen,
        "--plaintext",
        "--insecure-no-query-auth",
        "--data-dir",
        &data,
    ]);
    assert!(
        !stderr.contains(LISTENING_LOG),
        "logged listening on a port it never bound: {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!("cannot listen on {listen}")) && last.contains("choose --listen"),
        "{stderr}"
    );
    assert_no_repeated_cause(last);
}

#[test]
fn errors_are_one_line_without_repeated_causes() {
    let dir = scratch("lifecycle-errors");
    let file = dir.join("not-a-directory");
    std::fs::write(&file, b"x").expect("file");
    let data = file.join("data").to_string_lossy().into_owned();
    let listen = format!("127.0.0.1:{}", free_port().expect("port"));
    let stderr = refusal(&[
        "--listen",
        &listen,
        "--plaintext",
        "--insecure-no-query-auth",
        "--data-dir",
        &data,
    ]);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("data directory"), "{stderr}");
    assert_no_repeated_cause(lines[0]);
}

#[test]
fn a_client_speaking_another_protocol_gets_a_hint_and_logs_have_no_colour_codes() {
    let dir = scratch("lifecycle-protocol");
    let collector = start(
        free_port().expect("port"),
        &plaintext_args(&dir.join("data")),
    );
    let address = format!("127.0.0.1:{}", collector.port);
    let greet = |bytes: &[u8]| {
        let mut stream = TcpStream::connect(&address).expect("connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream.write_all(bytes).expect("sent");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
    };
    greet(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    // The start of a TLS ClientHello.
    greet(&[
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = collector.log();
        if (log.contains("HTTP/1") && log.contains("TLS handshake")) || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        log.contains("sent an HTTP/1 request") && log.contains("speaks gRPC (HTTP/2) only"),
        "{log}"
    );
    assert!(
        log.contains("started a TLS handshake") && log.contains(&format!("http://{address}")),
        "{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log written to a pipe: {log:?}"
    );
}
