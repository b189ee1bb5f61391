//! The change-events part of the storage suite: events and binaries travel in batches,
//! are stored once however often a batch is replayed, per host and service, and listed
//! by time range and scope.

use stallscope_collector::{
    batch::{BatchLimits, NormalizedBatch, normalize},
    storage::{Filter, Storage, StoreOutcome},
    synthetic::{self, Shape},
};
use stallscope_proto::v1;

use super::{SECOND, T0, range};

/// (service, path, build-id, stacks, truncated stacks, frame pointers) of a binary.
type BinaryRow<'a> = (&'a str, &'a str, &'a str, u64, u64, Option<bool>);

fn intern(batch: &mut v1::Batch, text: &str) -> u32 {
    if let Some(index) = batch.strings.iter().position(|s| s == text) {
        return index as u32;
    }
    batch.strings.push(text.to_owned());
    (batch.strings.len() - 1) as u32
}

/// A synthetic batch (services `svc-0`, `svc-1`, binaries `/usr/bin/svc-N`) carrying a
/// deploy of `svc-1` and the binaries table.
fn batch_with_changes(agent: &str, sequence: u64, start_s: i64) -> NormalizedBatch {
    let mut wire = synthetic::batch(
        agent,
        "host-a",
        sequence,
        start_s * SECOND,
        10 * SECOND,
        Shape::default(),
    );
    let labels = vec![
        intern(&mut wire, "systemd_unit"),
        intern(&mut wire, "svc-1.service"),
    ];
    if sequence == 0 {
        wire.events.push(v1::ChangeEvent {
            time_unix_ns: (start_s + 3) * SECOND,
            kind: "deploy".into(),
            service: "svc-1".into(),
            pid: 2002,
            previous_pid: 1001,
            build_id: "bbbb".into(),
            previous_build_id: "aaaa".into(),
            executable: "/usr/bin/svc-1".into(),
            labels,
        });
    }
    for service in 0..2 {
        wire.binaries.push(v1::BinaryInfo {
            path: format!("/usr/bin/svc-{service}"),
            build_id: format!("b{service}"),
            frame_pointers: v1::FramePointers::Absent as i32,
            stacks: 10,
            truncated_stacks: 4,
            ..v1::BinaryInfo::default()
        });
    }
    normalize(agent, sequence, wire, &BatchLimits::default()).expect("valid batch")
}

pub async fn suite<S: Storage>(store: &S) {
    for sequence in 0..3 {
        let batch = batch_with_changes("agent-e", sequence, T0 + 10 * sequence as i64);
        assert_eq!(
            store.store(batch).await.expect("store"),
            StoreOutcome::Stored
        );
    }
    // Replays add nothing.
    for sequence in [0, 2] {
        let batch = batch_with_changes("agent-e", sequence, T0 + 10 * sequence as i64);
        assert_eq!(
            store.store(batch).await.expect("replay"),
            StoreOutcome::Duplicate
        );
    }
    let whole = range(T0 - 60, T0 + 3600);
    let events = store
        .events(whole, Filter::default())
        .await
        .expect("events");
    assert_eq!(events.len(), 1, "{events:?}");
    let deploy = &events[0];
    assert_eq!(
        (
            deploy.kind.as_str(),
            deploy.host.as_str(),
            deploy.service.as_str(),
            deploy.agent.as_str()
        ),
        ("deploy", "host-a", "svc-1", "agent-e")
    );
    assert_eq!((deploy.pid, deploy.previous_pid), (2002, Some(1001)));
    assert_eq!(
        (deploy.build_id.as_str(), deploy.previous_build_id.as_str()),
        ("bbbb", "aaaa")
    );
    assert_eq!(deploy.executable, "/usr/bin/svc-1");
    assert_eq!(deploy.labels["systemd_unit"], "svc-1.service");
    assert_eq!(deploy.time_unix_ns, (T0 + 3) * SECOND);
    let of = |service: &str| Filter {
        service: Some(service.into()),
        ..Filter::default()
    };
    assert_eq!(
        store
            .events(whole, of("svc-1"))
            .await
            .expect("events")
            .len(),
        1
    );
    assert!(
        store
            .events(whole, of("svc-0"))
            .await
            .expect("events")
            .is_empty()
    );
    let elsewhere = Filter {
        host: Some("host-b".into()),
        ..Filter::default()
    };
    assert!(
        store
            .events(whole, elsewhere)
            .await
            .expect("events")
            .is_empty()
    );
    assert!(
        store
            .events(range(T0 + 4, T0 + 60), Filter::default())
            .await
            .expect("events")
            .is_empty(),
        "the event happened at T0 + 3 s"
    );

    // Binaries: each service ran through its own binary; three batches' counts, once.
    let binaries = store
        .binaries(whole, Filter::default())
        .await
        .expect("binaries");
    let rows: Vec<BinaryRow<'_>> = binaries
        .iter()
        .map(|b| {
            (
                b.service.as_str(),
                b.path.as_str(),
                b.build_id.as_str(),
                b.stacks,
                b.truncated_stacks,
                b.frame_pointers,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("svc-0", "/usr/bin/svc-0", "b0", 30, 12, Some(false)),
            ("svc-1", "/usr/bin/svc-1", "b1", 30, 12, Some(false)),
        ]
    );
    assert_eq!(binaries[0].first_unix_ns, T0 * SECOND);
    assert_eq!(binaries[0].last_unix_ns, (T0 + 30) * SECOND);
    let svc1 = store.binaries(whole, of("svc-1")).await.expect("binaries");
    assert_eq!(svc1.len(), 1);
    assert!(
        store
            .binaries(range(T0 + 600, T0 + 900), Filter::default())
            .await
            .expect("binaries")
            .is_empty()
    );
}
