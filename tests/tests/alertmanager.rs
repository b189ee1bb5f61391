//! The collector's Alertmanager receiver against a real Alertmanager (Debian's
//! `prometheus-alertmanager` 0.25, started here with a webhook receiver pointing at the
//! collector): an alert posted to Alertmanager's API opens one window, its resolution
//! closes it at `endsAt`, Alertmanager's repeated deliveries change nothing; over mTLS
//! too. Bad input gets a 4xx with a one-line reason and stores nothing; storage down
//! gets a 5xx, and the collector keeps serving. No probes are loaded: no root needed.

use std::{net::SocketAddr, path::Path, time::Duration};

use serde_json::Value;
use stallscope_tests::{
    alertmanager::{AlertmanagerProcess, Webhook, require_alertmanager, rfc3339},
    binary_dir,
    collector::{
        CollectorProcess, TEST_TOKEN, cli_json, clickhouse_url, free_port, require_clickhouse,
        scratch,
    },
    http::{self, Framing, Tls},
    pki::Pki,
    proxy::TcpProxy,
    wait_for,
};

const PATH: &str = "/webhook/alertmanager";
const NS: i64 = 1_000_000_000;

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Which storage a collector under test uses.
enum Backend {
    Sqlite,
    /// ClickHouse at this URL, in its own database.
    ClickHouse(String),
}

/// A plaintext collector with its HTTP listener on another loopback port.
struct Started {
    collector: CollectorProcess,
    http: SocketAddr,
    /// The ClickHouse database it uses, dropped at the end.
    database: Option<String>,
}

fn start_collector(dir: &Path, backend: &Backend, extra: &[&str]) -> Started {
    let http_port = free_port().expect("port");
    let http_listen = format!("127.0.0.1:{http_port}");
    let data = dir.join("data").to_string_lossy().into_owned();
    let database = format!("stallscope_am_{}_{http_port}", std::process::id());
    let mut args = vec![
        "--plaintext",
        "--query-tokens",
        TEST_TOKEN,
        "--http-listen",
        &http_listen,
    ];
    match backend {
        Backend::Sqlite => args.extend(["--data-dir", &data]),
        Backend::ClickHouse(url) => args.extend([
            "--storage",
            "clickhouse",
            "--clickhouse-url",
            url,
            "--clickhouse-database",
            &database,
        ]),
    }
    args.extend_from_slice(extra);
    let collector = CollectorProcess::start(&binary_dir(), free_port().expect("port"), &args, &[])
        .expect("collector starts");
    Started {
        collector,
        http: SocketAddr::from(([127, 0, 0, 1], http_port)),
        database: matches!(backend, Backend::ClickHouse(_)).then_some(database),
    }
}

fn drop_clickhouse_database(database: Option<&str>) {
    let Some(database) = database else {
        return;
    };
    let url = clickhouse_url();
    let address: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("ClickHouse address");
    let _ = http::request(
        address,
        None,
        "POST",
        "/",
        &[],
        format!("DROP DATABASE IF EXISTS {database}").as_bytes(),
        Framing::ContentLength,
    );
}

fn windows(collector: &CollectorProcess) -> Vec<Value> {
    let listed = cli_json(
        &binary_dir(),
        &collector.plaintext_url(),
        &["windows", "--since", "2h"],
    )
    .expect("stallscope windows");
    listed.as_array().cloned().unwrap_or_default()
}

/// The collector's log lines for Alertmanager deliveries whose group status is `status`.
fn deliveries(collector: &CollectorProcess, status: &str) -> usize {
    collector
        .log()
        .lines()
        .filter(|line| {
            line.contains("alertmanager delivery:") && line.contains(&format!(" {status}, "))
        })
        .count()
}

fn alert_json(starts_s: i64, ends_s: Option<i64>) -> String {
    let ends = ends_s
        .map(|s| format!(r#","endsAt":"{}""#, rfc3339(s)))
        .unwrap_or_default();
    format!(
        r#"[{{"labels":{{"alertname":"CheckoutSlow","service":"checkout","instance":"web-1:9100","severity":"page"}},
            "annotations":{{"summary":"p99 latency over 1s"}},
            "startsAt":"{}"{ends},"generatorURL":"http://prometheus.test/graph"}}]"#,
        rfc3339(starts_s)
    )
}

fn token_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("token");
    std::fs::write(&path, TEST_TOKEN).expect("token file");
    path
}

/// The whole round: open, repeats, close, replays; on one backend.
fn alert_opens_and_resolution_closes_one_window(backend: &Backend, name: &str) {
    let dir = scratch(name);
    let Started {
        collector,
        http: http_addr,
        database,
    } = start_collector(&dir, backend, &[]);
    let alertmanager = AlertmanagerProcess::start(
        &dir.join("alertmanager"),
        &Webhook {
            url: format!("http://{http_addr}{PATH}"),
            token_file: token_file(&dir),
            tls: None,
        },
    )
    .expect("alertmanager starts");
    let starts = now_s() - 60;
    alertmanager
        .post_alerts(&alert_json(starts, None))
        .expect("alert posted");

    // The first delivery opens the window.
    wait_for("a first delivery", Duration::from_secs(30), || {
        deliveries(&collector, "firing") >= 1
    });
    let first = windows(&collector);
    assert_eq!(first.len(), 1, "{first:#?}");
    let window = &first[0];
    assert_eq!(window["source"], "alertmanager");
    assert_eq!(window["state"], "open");
    assert_eq!(window["service"], "checkout");
    assert_eq!(window["host"], "web-1");
    assert_eq!(window["onset_unix_ns"], starts * NS);
    assert_eq!(window["end"], Value::Null);
    assert_eq!(window["note"], "CheckoutSlow: p99 latency over 1s");
    assert_eq!(window["alert"]["labels"]["severity"], "page");
    assert_eq!(
        window["alert"]["generator_url"],
        "http://prometheus.test/graph"
    );

    // Alertmanager resends the group: at least two more deliveries, nothing changes.
    wait_for("two repeated deliveries", Duration::from_secs(60), || {
        deliveries(&collector, "firing") >= 3
    });
    let repeats = deliveries(&collector, "firing");
    assert_eq!(
        windows(&collector),
        first,
        "after {repeats} firing deliveries"
    );
    assert!(
        collector
            .log()
            .contains("0 opened, 0 closed, 0 updated, 1 unchanged"),
        "{}",
        collector.log()
    );

    // The resolution closes it at endsAt.
    let ends = now_s() - 1;
    alertmanager
        .post_alerts(&alert_json(starts, Some(ends)))
        .expect("resolution posted");
    wait_for("the resolution", Duration::from_secs(30), || {
        windows(&collector)
            .first()
            .is_some_and(|w| w["state"] == "closed")
    });
    let closed = windows(&collector);
    assert_eq!(closed.len(), 1, "{closed:#?}");
    assert_eq!(closed[0]["id"], window["id"]);
    assert_eq!(closed[0]["end_unix_ns"], ends * NS);
    assert_eq!(closed[0]["onset_unix_ns"], starts * NS);

    let resolutions = deliveries(&collector, "resolved");
    // A retried resolution and a late firing delivery of the same alert change nothing.
    let group_key = closed[0]["alert"]["group_key"].as_str().expect("group key");
    let fingerprint = closed[0]["alert"]["fingerprint"]
        .as_str()
        .expect("fingerprint");
    for (status, ends_at) in [
        ("resolved", rfc3339(ends)),
        ("firing", "0001-01-01T00:00:00Z".to_owned()),
    ] {
        let alert = &closed[0]["alert"];
        let payload = serde_json::json!({
            "version": "4", "groupKey": group_key, "status": status, "receiver": alert["receiver"],
            "groupLabels": {"alertname": "CheckoutSlow"}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": alert["external_url"], "truncatedAlerts": 0,
            "alerts": [{"status": status, "labels": closed[0]["alert"]["labels"],
                "annotations": closed[0]["alert"]["annotations"], "startsAt": rfc3339(starts),
                "endsAt": ends_at, "generatorURL": "http://prometheus.test/graph",
                "fingerprint": fingerprint}],
        });
        let reply = http::post_json(
            http_addr,
            None,
            PATH,
            Some(TEST_TOKEN),
            &payload.to_string(),
        )
        .expect("replay");
        assert_eq!(reply.status, 200, "{}", reply.body);
        let outcome: Value = serde_json::from_str(&reply.body).expect("JSON answer");
        assert_eq!(outcome["unchanged"], 1, "{status}: {outcome}");
    }
    assert_eq!(windows(&collector), closed);
    eprintln!(
        "{name}: Alertmanager delivered {repeats} firing and {resolutions} resolved notifications; one window"
    );
    drop_clickhouse_database(database.as_deref());
}

#[test]
fn a_real_alertmanager_opens_and_closes_one_window_sqlite() {
    if !require_alertmanager("a_real_alertmanager_opens_and_closes_one_window_sqlite") {
        return;
    }
    alert_opens_and_resolution_closes_one_window(&Backend::Sqlite, "am-sqlite");
}

#[test]
fn a_real_alertmanager_opens_and_closes_one_window_clickhouse() {
    let test = "a_real_alertmanager_opens_and_closes_one_window_clickhouse";
    if !require_alertmanager(test) || !require_clickhouse(test) {
        return;
    }
    alert_opens_and_resolution_closes_one_window(
        &Backend::ClickHouse(clickhouse_url()),
        "am-clickhouse",
    );
}

/// (case, token, body, framing, expected status, expected reason).
type BadCase<'a> = (&'a str, Option<&'a str>, String, Framing, u16, &'a str);

#[test]
fn bad_webhook_input_gets_a_4xx_with_one_line_and_stores_nothing() {
    let dir = scratch("am-bad-input");
    let Started {
        mut collector,
        http: http_addr,
        ..
    } = start_collector(&dir, &Backend::Sqlite, &["--http-max-body-bytes", "4096"]);
    let valid = |version: &str| {
        format!(
            r#"{{"version":"{version}","groupKey":"{{}}:{{alertname=\"X\"}}","status":"firing","receiver":"r",
               "alerts":[{{"status":"firing","labels":{{"alertname":"X","job":"api"}},"annotations":{{}},
               "startsAt":"{}","endsAt":"0001-01-01T00:00:00Z","fingerprint":"0123abcd"}}]}}"#,
            rfc3339(now_s() - 10)
        )
    };
    let padded = format!(
        r#"{{"version":"4","padding":"{}","groupKey":"k","status":"firing","alerts":[]}}"#,
        "x".repeat(5000)
    );
    let cases: Vec<BadCase<'_>> = vec![
        ("no token", None, valid("4"), Framing::ContentLength, 401, "bearer token is required"),
        ("wrong token", Some("guess"), valid("4"), Framing::ContentLength, 401, "not valid"),
        ("invalid JSON", Some(TEST_TOKEN), "{\"version\": \"4\", \"groupKey\": ".to_owned(), Framing::ContentLength, 400, "invalid JSON"),
        ("wrong version", Some(TEST_TOKEN), valid("3"), Framing::ContentLength, 400, "version `3`"),
        (
            "missing groupKey",
            Some(TEST_TOKEN),
            r#"{"version":"4","status":"firing","alerts":[]}"#.to_owned(),
            Framing::ContentLength,
            400,
            "missing field `groupKey`",
        ),
        (
            "alert without startsAt",
            Some(TEST_TOKEN),
            r#"{"version":"4","groupKey":"k","status":"firing","alerts":[{"status":"firing","labels":{},"fingerprint":"f"}]}"#.to_owned(),
            Framing::ContentLength,
            400,
            "missing field `startsAt`",
        ),
        ("over the limit, declared", Some(TEST_TOKEN), padded.clone(), Framing::ContentLength, 413, "larger than 4096 bytes"),
        ("over the limit, chunked", Some(TEST_TOKEN), padded, Framing::Chunked, 413, "larger than 4096 bytes"),
    ];
    for (case, token, body, framing, status, reason) in &cases {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(bearer) = &bearer {
            headers.push(("Authorization", bearer.as_str()));
        }
        let reply = http::request(
            http_addr,
            None,
            "POST",
            PATH,
            &headers,
            body.as_bytes(),
            *framing,
        )
        .unwrap_or_else(|err| panic!("{case}: {err}"));
        assert_eq!(reply.status, *status, "{case}: {}", reply.body);
        assert!(reply.body.contains(reason), "{case}: {}", reply.body);
        assert_eq!(
            reply.body.matches('\n').count(),
            1,
            "{case}: one line: {:?}",
            reply.body
        );
        assert!(reply.body.ends_with('\n'));
    }
    let get = http::request(
        http_addr,
        None,
        "GET",
        PATH,
        &[],
        b"",
        Framing::ContentLength,
    )
    .expect("GET");
    assert_eq!(get.status, 405, "{}", get.body);
    let elsewhere = http::request(
        http_addr,
        None,
        "POST",
        "/nope",
        &[],
        b"{}",
        Framing::ContentLength,
    )
    .expect("POST elsewhere");
    assert_eq!(elsewhere.status, 404, "{}", elsewhere.body);

    assert!(windows(&collector).is_empty(), "nothing stored");
    assert!(collector.is_running());
    let accepted =
        http::post_json(http_addr, None, PATH, Some(TEST_TOKEN), &valid("4")).expect("valid");
    assert_eq!(accepted.status, 200, "{}", accepted.body);
    let stored = windows(&collector);
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0]["service"], "api",
        "the job label names the service"
    );
}

#[test]
fn storage_down_gets_a_5xx_and_the_collector_keeps_serving() {
    let test = "storage_down_gets_a_5xx_and_the_collector_keeps_serving";
    if !require_clickhouse(test) {
        return;
    }
    let dir = scratch("am-storage-down");
    let clickhouse: SocketAddr = clickhouse_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("ClickHouse address");
    let mut proxy = TcpProxy::start(clickhouse).expect("proxy");
    let Started {
        mut collector,
        http: http_addr,
        database,
    } = start_collector(
        &dir,
        &Backend::ClickHouse(format!("http://127.0.0.1:{}", proxy.port)),
        &[],
    );
    let delivery = |fingerprint: &str| {
        format!(
            r#"{{"version":"4","groupKey":"{{}}:{{alertname=\"Down\"}}","status":"firing",
               "alerts":[{{"status":"firing","labels":{{"alertname":"Down","app":"db"}},
               "startsAt":"{}","fingerprint":"{fingerprint}"}}]}}"#,
            rfc3339(now_s() - 30)
        )
    };
    let before =
        http::post_json(http_addr, None, PATH, Some(TEST_TOKEN), &delivery("aaaa")).expect("post");
    assert_eq!(before.status, 200, "{}", before.body);

    proxy.pause();
    let down =
        http::post_json(http_addr, None, PATH, Some(TEST_TOKEN), &delivery("bbbb")).expect("post");
    assert_eq!(down.status, 503, "{}", down.body);
    assert!(
        down.body.contains("storage is unavailable, retry later"),
        "{}",
        down.body
    );
    assert_eq!(down.body.matches('\n').count(), 1, "{:?}", down.body);
    assert!(collector.is_running());

    // Alertmanager retries: once ClickHouse is back, the same delivery is stored.
    proxy.resume().expect("proxy back");
    let retried =
        http::post_json(http_addr, None, PATH, Some(TEST_TOKEN), &delivery("bbbb")).expect("post");
    assert_eq!(retried.status, 200, "{}", retried.body);
    let stored = windows(&collector);
    assert_eq!(stored.len(), 2, "{stored:#?}");
    assert!(stored.iter().all(|w| w["service"] == "db"));
    drop_clickhouse_database(database.as_deref());
}

#[test]
fn alertmanager_delivers_over_mtls() {
    if !require_alertmanager("alertmanager_delivers_over_mtls") {
        return;
    }
    let dir = scratch("am-mtls");
    let pki = Pki::create(&dir.join("pki")).expect("test PKI");
    let http_port = free_port().expect("port");
    let http_listen = format!("127.0.0.1:{http_port}");
    let data = dir.join("data").to_string_lossy().into_owned();
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let (cert, key, ca) = (path(&pki.server.cert), path(&pki.server.key), path(&pki.ca));
    let collector = CollectorProcess::start(
        &binary_dir(),
        free_port().expect("port"),
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--client-ca",
            &ca,
            "--query-tokens",
            TEST_TOKEN,
            "--data-dir",
            &data,
            "--http-listen",
            &http_listen,
            "--http-require-client-cert",
        ],
        &[],
    )
    .expect("collector starts");
    let http_addr = SocketAddr::from(([127, 0, 0, 1], http_port));

    // Without a client certificate the handshake fails; with one, the token still counts.
    let anonymous = Tls {
        ca: &pki.ca,
        server_name: "localhost",
        client: None,
    };
    let refused = http::post_json(http_addr, Some(&anonymous), PATH, Some(TEST_TOKEN), "{}");
    assert!(refused.is_err(), "{refused:?}");
    let with_cert = Tls {
        client: Some((&pki.client.cert, &pki.client.key)),
        ..anonymous.clone()
    };
    let no_token = http::post_json(http_addr, Some(&with_cert), PATH, None, "{}").expect("reply");
    assert_eq!(no_token.status, 401, "{}", no_token.body);
    let plaintext = http::post_json(http_addr, None, PATH, Some(TEST_TOKEN), "{}");
    assert!(
        plaintext.is_err() || plaintext.is_ok_and(|r| r.status == 400),
        "plaintext is not served"
    );

    let alertmanager = AlertmanagerProcess::start(
        &dir.join("alertmanager"),
        &Webhook {
            url: format!("https://localhost:{http_port}{PATH}"),
            token_file: token_file(&dir),
            tls: Some((
                pki.ca.clone(),
                pki.client.cert.clone(),
                pki.client.key.clone(),
            )),
        },
    )
    .expect("alertmanager starts");
    let starts = now_s() - 30;
    alertmanager
        .post_alerts(&alert_json(starts, None))
        .expect("alert posted");
    wait_for("a delivery over mTLS", Duration::from_secs(30), || {
        deliveries(&collector, "firing") >= 1
    });
    let listed = cli_json(
        &binary_dir(),
        &collector.tls_url(),
        &["--ca", &ca, "windows", "--since", "1h"],
    )
    .expect("stallscope windows over TLS");
    let listed = listed.as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 1, "{listed:#?}\n{}", alertmanager.log());
    assert_eq!(listed[0]["onset_unix_ns"], starts * NS);
}
