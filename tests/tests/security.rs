//! Security of the collector over loopback: ingest needs a client certificate from the
//! configured CA that has not expired, the agent identity comes from that certificate,
//! queries need a bearer token, and plaintext is refused on non-loopback addresses.

use std::{path::PathBuf, process::Command};

use stallscope_collector::synthetic::{self, Shape};
use stallscope_tests::{
    binary, binary_dir,
    collector::{CollectorProcess, TEST_TOKEN, cli, cli_json, free_port, scratch},
    pki::Pki,
    wire::{connect_tls, frame, send},
};
use tonic::Code;

struct Secured {
    collector: CollectorProcess,
    pki: Pki,
    _dir: PathBuf,
}

fn secured(test: &str) -> Secured {
    let dir = scratch(test);
    let pki = Pki::create(&dir.join("pki")).expect("test PKI");
    let data = dir.join("data");
    let token_file = dir.join("tokens");
    std::fs::write(&token_file, format!("{TEST_TOKEN}\n")).expect("token file");
    let path = |p: &PathBuf| p.to_string_lossy().into_owned();
    let collector = CollectorProcess::start(
        &binary_dir(),
        free_port().expect("port"),
        &[
            "--data-dir",
            &path(&data),
            "--tls-cert",
            &path(&pki.server.cert),
            "--tls-key",
            &path(&pki.server.key),
            "--client-ca",
            &path(&pki.ca),
            "--query-token-file",
            &path(&token_file),
        ],
        &[],
    )
    .expect("collector starts with TLS");
    Secured {
        collector,
        pki,
        _dir: dir,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn batch(sequence: u64) -> stallscope_proto::v1::Batch {
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos(),
    )
    .expect("fits");
    synthetic::batch(
        "claimed-name",
        "host-sec",
        sequence,
        now,
        1_000_000_000,
        Shape::default(),
    )
}

#[test]
fn ingest_requires_a_valid_client_certificate_and_uses_its_identity() {
    let secured = secured("sec-ingest");
    let port = secured.collector.port;
    let pki = &secured.pki;
    runtime().block_on(async {
        // A certificate from the configured CA: stored, under the certificate's name.
        let mut good = connect_tls(port, &pki.ca, Some(&pki.client))
            .await
            .expect("mTLS connects");
        let acks = send(&mut good, None, vec![frame(&batch(0))])
            .await
            .expect("accepted");
        assert_eq!(acks.len(), 1);

        // No certificate: the TLS session is allowed (queries use tokens), ingest is not.
        let mut anonymous = connect_tls(port, &pki.ca, None)
            .await
            .expect("TLS without client cert connects");
        let status = send(&mut anonymous, Some("agent-good"), vec![frame(&batch(1))])
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().contains("client certificate"),
            "{}",
            status.message()
        );

        // A certificate from another CA, or an expired one: the handshake fails.
        for (name, cert) in [
            ("foreign CA", &pki.foreign_client),
            ("expired", &pki.expired_client),
        ] {
            let refused = match connect_tls(port, &pki.ca, Some(cert)).await {
                Err(_) => true,
                Ok(mut client) => send(&mut client, None, vec![frame(&batch(2))])
                    .await
                    .is_err(),
            };
            assert!(refused, "a client certificate that is {name} was accepted");
        }
    });
    // Only the good batch was stored, attributed to the certificate's identity.
    let agents = cli_json_tls(&secured, &["agents"]);
    let agents = agents.as_array().expect("array");
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert_eq!(agents[0]["agent"], "agent-good");
    assert_eq!(agents[0]["batches"], 1);
}

fn cli_json_tls(secured: &Secured, args: &[&str]) -> serde_json::Value {
    let ca = secured.pki.ca.to_string_lossy().into_owned();
    let mut all = vec!["--ca", ca.as_str()];
    all.extend_from_slice(args);
    cli_json(&binary_dir(), &secured.collector.tls_url(), &all).expect("query with token over TLS")
}

#[test]
fn queries_need_a_bearer_token() {
    let secured = secured("sec-query");
    let ca = secured.pki.ca.to_string_lossy().into_owned();
    let stallscope = binary(&binary_dir(), "stallscope").expect("cli built");
    for token in [None, Some("not-the-token")] {
        let mut command = Command::new(&stallscope);
        command
            .args(["--ca", &ca, "targets", "--since", "1h"])
            .env("STALLSCOPE_COLLECTOR", secured.collector.tls_url())
            .env_remove("STALLSCOPE_TOKEN")
            .env_remove("STALLSCOPE_CONFIG")
            .env("HOME", "/nonexistent");
        if let Some(token) = token {
            command.env("STALLSCOPE_TOKEN", token);
        }
        let output = command.output().expect("cli runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "query with token {token:?} succeeded"
        );
        assert!(stderr.contains("refused the query"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one-line error: {stderr}");
    }
    let targets = cli_json_tls(&secured, &["targets", "--since", "1h"]);
    assert!(targets.is_array());
    // Without --ca the CLI says what to pass.
    let output = cli(&binary_dir(), &secured.collector.tls_url(), &["targets"]).expect("cli runs");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--ca"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn plaintext_is_refused_off_loopback_unless_allowed() {
    let collector = binary(&binary_dir(), "stallscope-collector").expect("collector built");
    let dir = scratch("sec-plain");
    let output = Command::new(&collector)
        .args([
            "--plaintext",
            "--insecure-no-query-auth",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .output()
        .expect("collector runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("refusing plaintext on 0.0.0.0:0"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--allow-plaintext-non-loopback"),
        "{stderr}"
    );
    // Neither TLS nor an explicit --plaintext: refused with what to do.
    let output = Command::new(&collector)
        .args([
            "--insecure-no-query-auth",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .output()
        .expect("collector runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("--tls-cert") && stderr.contains("--plaintext"),
        "{stderr}"
    );
    // No query tokens configured: refused unless explicitly disabled.
    let output = Command::new(&collector)
        .args(["--plaintext", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .env_remove("STALLSCOPE_QUERY_TOKENS")
        .output()
        .expect("collector runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("bearer tokens"));
}
