//! Bad input to the collector's ingest: truncated or random bytes, inconsistent batches
//! (their change events and binaries too), an oversized frame and a compression bomb are each refused with a clear gRPC status,
//! the collector's memory stays bounded, and a well-behaved agent streaming at the same
//! time keeps being served.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, TcpStream},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prost::Message as _;
use stallscope_collector::synthetic::{self, Shape};
use stallscope_proto::v1::{self, IngestFrame};
use stallscope_tests::{
    binary_dir,
    collector::{CollectorProcess, cli_json, free_port, scratch},
    wire::{connect_plain, frame, send},
};
use tonic::Code;

/// Limits the collector runs with in this test.
const MAX_MESSAGE: usize = 1024 * 1024;
const MAX_BATCH: u64 = 8 * 1024 * 1024;

fn now_ns() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos(),
    )
    .expect("fits")
}

fn good(sequence: u64) -> v1::Batch {
    synthetic::batch(
        "good",
        "host-good",
        sequence,
        now_ns(),
        1_000_000_000,
        Shape::default(),
    )
}

#[test]
fn malformed_oversized_and_bomb_frames_are_refused_and_others_served() {
    let dir = scratch("bad-ingest");
    let data = dir.join("data").to_string_lossy().into_owned();
    let max_message = MAX_MESSAGE.to_string();
    let max_batch = MAX_BATCH.to_string();
    let mut collector = CollectorProcess::start(
        &binary_dir(),
        free_port().expect("port"),
        &[
            "--plaintext",
            "--insecure-no-query-auth",
            "--data-dir",
            &data,
            "--max-message-bytes",
            &max_message,
            "--max-batch-bytes",
            &max_batch,
        ],
        &[],
    )
    .expect("collector starts");
    let port = collector.port;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // Bad frames, each on its own stream, with the status the collector must answer.
    let random: Vec<u8> = (0..4096_u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let encoded_good = good(0).encode_to_vec();
    let compressed_good = zstd::bulk::compress(&encoded_good, 3).expect("zstd");
    let bomb = {
        // 2 GiB of zeros compress to a few hundred kilobytes; the frame claims 1 KiB.
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).expect("zstd");
        let zeros = vec![0_u8; 1024 * 1024];
        for _ in 0..2048 {
            encoder.write_all(&zeros).expect("compress");
        }
        encoder.finish().expect("zstd")
    };
    assert!(
        bomb.len() < MAX_MESSAGE,
        "the bomb must pass the message limit: {}",
        bomb.len()
    );
    let mut inconsistent = good(5);
    inconsistent.samples[0].stack = 10_000;
    let mut odd_labels = good(6);
    odd_labels.samples[0].labels.push(1);
    let mut dangling_event_label = good(9);
    dangling_event_label.events.push(v1::ChangeEvent {
        time_unix_ns: now_ns(),
        kind: "deploy".to_owned(),
        service: "svc-0".to_owned(),
        labels: vec![1, 99_999],
        ..v1::ChangeEvent::default()
    });
    let mut huge_binary = good(10);
    huge_binary.binaries.push(v1::BinaryInfo {
        path: "/".repeat(5000),
        ..v1::BinaryInfo::default()
    });
    let cases: Vec<(&str, IngestFrame, Code, &str)> = vec![
        (
            "random bytes",
            IngestFrame {
                sequence: 1,
                batch_zstd: random.clone(),
                uncompressed_size: 100,
            },
            Code::InvalidArgument,
            "not valid zstd",
        ),
        (
            "truncated zstd",
            IngestFrame {
                sequence: 2,
                batch_zstd: compressed_good[..compressed_good.len() / 2].to_vec(),
                uncompressed_size: encoded_good.len() as u64,
            },
            Code::InvalidArgument,
            "zstd",
        ),
        (
            "zstd of random bytes",
            IngestFrame {
                sequence: 3,
                batch_zstd: zstd::bulk::compress(&random, 3).expect("zstd"),
                uncompressed_size: 4096,
            },
            Code::InvalidArgument,
            "not a stallscope.v1.Batch",
        ),
        (
            "oversized frame",
            IngestFrame {
                sequence: 4,
                batch_zstd: vec![7; 2 * MAX_MESSAGE],
                uncompressed_size: 10,
            },
            Code::ResourceExhausted,
            "too large",
        ),
        (
            "dangling stack index",
            frame(&inconsistent),
            Code::InvalidArgument,
            "refers to stack 10000",
        ),
        (
            "odd label list",
            frame(&odd_labels),
            Code::InvalidArgument,
            "odd number of label",
        ),
        (
            "change event label past the string table",
            frame(&dangling_event_label),
            Code::InvalidArgument,
            "change event 0 refers to string 99999",
        ),
        (
            "binary path over the size limit",
            frame(&huge_binary),
            Code::InvalidArgument,
            "binary 0: the path is 5000 bytes long",
        ),
        (
            "claimed size over the limit",
            IngestFrame {
                sequence: 7,
                batch_zstd: compressed_good.clone(),
                uncompressed_size: MAX_BATCH + 1,
            },
            Code::ResourceExhausted,
            "compression bomb",
        ),
        (
            "compression bomb",
            IngestFrame {
                sequence: 8,
                batch_zstd: bomb,
                uncompressed_size: 1024,
            },
            Code::ResourceExhausted,
            "compression bomb",
        ),
    ];

    runtime.block_on(async {
        // A well-behaved agent streams throughout.
        let good_agent = tokio::spawn(async move {
            let mut client = connect_plain(port).await.expect("connect");
            let mut stored = 0;
            for round in 0..20_u64 {
                let acks = send(&mut client, Some("good-agent"), vec![frame(&good(round))])
                    .await
                    .expect("good batches are served");
                stored += acks.len();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            stored
        });
        for (name, bad, code, needle) in cases {
            let mut client = connect_plain(port).await.expect("connect");
            let status = send(&mut client, Some("bad-agent"), vec![bad])
                .await
                .expect_err(name);
            assert_eq!(status.code(), code, "{name}: {status:?}");
            assert!(
                status.message().contains(needle),
                "{name}: `{}` lacks `{needle}`",
                status.message()
            );
        }
        assert_eq!(good_agent.await.expect("good agent task"), 20);
    });

    // Garbage at the HTTP/2 level does not hurt either. Each connection is read until
    // the collector closes it, so the garbage was handled before the checks below; a
    // query is then served, and only after that is the process checked.
    for garbage in [&b"GET / HTTP/1.1\r\n\r\n"[..], &random[..]] {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.write_all(garbage).expect("send garbage");
        stream.shutdown(Shutdown::Write).expect("end of garbage");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        let mut answer = Vec::new();
        match stream.read_to_end(&mut answer) {
            Ok(_) => {}
            Err(err) if err.kind() == ErrorKind::ConnectionReset => {}
            Err(err) => panic!("the collector did not finish with garbage: {err}"),
        }
    }
    let agents = cli_json(&binary_dir(), &collector.plaintext_url(), &["agents"]).expect("agents");
    assert!(
        collector.is_running(),
        "collector died: {}",
        collector.log()
    );
    assert!(
        !collector.log().contains("panicked"),
        "collector panicked: {}",
        collector.log()
    );
    let peak_mib = collector.peak_rss_kib().expect("collector status") / 1024;
    assert!(
        peak_mib < 256,
        "collector peak RSS {peak_mib} MiB: the bomb was not bounded"
    );
    let agents = agents.as_array().expect("array");
    assert_eq!(
        agents.len(),
        1,
        "only the good agent stored anything: {agents:?}"
    );
    assert_eq!(agents[0]["batches"], 20);
}
