//! The windows part of the storage suite: upserts by id with the latest version winning,
//! lookups, listings by range (open windows included) and filter, open windows by source.

use stallscope_collector::{
    storage::Storage,
    windows::{
        AlertInfo, Indicator, UpsertOutcome, Window, WindowFilter, WindowSource, WindowState,
    },
};

use super::{SECOND, T0, range};

pub fn window(id: &str, source: WindowSource, service: &str, onset_s: i64) -> Window {
    Window {
        id: id.to_owned(),
        source,
        host: String::new(),
        service: service.to_owned(),
        onset_unix_ns: onset_s * SECOND,
        end_unix_ns: None,
        indicators: Vec::new(),
        alert: None,
        note: String::new(),
        top_cause: None,
        updated_unix_ns: 1,
    }
}

fn ids(windows: &[Window]) -> Vec<&str> {
    windows.iter().map(|w| w.id.as_str()).collect()
}

pub async fn suite<S: Storage>(store: &S) {
    assert_eq!(store.window("nope".into()).await.expect("get"), None);
    // An automatic window with indicators, open.
    let mut automatic = window("auto-1", WindowSource::Automatic, "checkout", T0 + 100);
    automatic.host = "web-1".into();
    automatic.indicators = vec![Indicator {
        name: "lock_wait_per_acquire_ns".into(),
        baseline: 1200.5,
        observed: 48_000.25,
        score: 9.75,
    }];
    assert_eq!(
        store
            .upsert_window(automatic.clone())
            .await
            .expect("upsert"),
        UpsertOutcome::Created
    );
    // The same version again, and an identical newer one: nothing changes.
    assert_eq!(
        store
            .upsert_window(automatic.clone())
            .await
            .expect("upsert"),
        UpsertOutcome::Unchanged
    );
    let mut same = automatic.clone();
    same.updated_unix_ns = 2;
    assert_eq!(
        store.upsert_window(same).await.expect("upsert"),
        UpsertOutcome::Unchanged
    );
    assert_eq!(
        store.window("auto-1".into()).await.expect("get"),
        Some(automatic.clone())
    );
    // Closed and explained in a newer version; an older version written late loses.
    let mut closed = automatic.clone();
    closed.end_unix_ns = Some((T0 + 160) * SECOND);
    closed.top_cause = Some("lock".into());
    closed.updated_unix_ns = 5;
    assert_eq!(
        store.upsert_window(closed.clone()).await.expect("upsert"),
        UpsertOutcome::Updated
    );
    let mut stale = automatic.clone();
    stale.note = "a late writer".into();
    stale.updated_unix_ns = 4;
    assert_eq!(
        store.upsert_window(stale).await.expect("upsert"),
        UpsertOutcome::Unchanged
    );
    let stored = store
        .window("auto-1".into())
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(stored, closed);
    assert!(stored.is_explained());
    assert_eq!(stored.state(), WindowState::Closed);

    // An Alertmanager window (open) and two manual ones, one for every service.
    let mut alert = window("am-1", WindowSource::Alertmanager, "checkout", T0 + 300);
    alert.alert = Some(AlertInfo {
        labels: [("alertname".to_owned(), "HighLatency".to_owned())].into(),
        annotations: [("summary".to_owned(), "p99 > 1s".to_owned())].into(),
        fingerprint: "f00d".into(),
        group_key: "{}:{alertname=\"HighLatency\"}".into(),
        ..AlertInfo::default()
    });
    store.upsert_window(alert.clone()).await.expect("upsert");
    let mut manual = window("m-1", WindowSource::Manual, "", T0 + 50);
    manual.end_unix_ns = Some((T0 + 70) * SECOND);
    manual.note = "someone's ssh session".into();
    store.upsert_window(manual.clone()).await.expect("upsert");
    let other = window("m-2", WindowSource::Manual, "billing", T0 + 1000);
    store.upsert_window(other.clone()).await.expect("upsert");
    assert_eq!(
        store.window("am-1".into()).await.expect("get"),
        Some(alert.clone()),
        "labels and annotations come back"
    );

    // Listings: overlap with the range, open windows reach to now, by onset.
    let all = store
        .windows(range(T0, T0 + 2000), WindowFilter::default())
        .await
        .expect("list");
    assert_eq!(ids(&all), ["m-1", "auto-1", "am-1", "m-2"]);
    let middle = store
        .windows(range(T0 + 65, T0 + 150), WindowFilter::default())
        .await
        .expect("list");
    assert_eq!(ids(&middle), ["m-1", "auto-1"]);
    let later = store
        .windows(range(T0 + 5000, T0 + 6000), WindowFilter::default())
        .await
        .expect("list");
    assert_eq!(ids(&later), ["am-1", "m-2"], "open windows continue");
    let checkout = WindowFilter {
        service: Some("checkout".into()),
        ..WindowFilter::default()
    };
    let of_checkout = store
        .windows(range(T0, T0 + 2000), checkout.clone())
        .await
        .expect("list");
    assert_eq!(
        ids(&of_checkout),
        ["m-1", "auto-1", "am-1"],
        "with the every-service window"
    );
    let open_automatic = WindowFilter {
        source: Some(WindowSource::Alertmanager),
        state: Some(WindowState::Open),
        ..checkout
    };
    assert_eq!(
        ids(&store
            .windows(range(T0, T0 + 2000), open_automatic)
            .await
            .expect("list")),
        ["am-1"]
    );
    let on_host = WindowFilter {
        host: Some("web-2".into()),
        ..WindowFilter::default()
    };
    assert_eq!(
        ids(&store
            .windows(range(T0, T0 + 2000), on_host)
            .await
            .expect("list")),
        ["m-1", "am-1", "m-2"],
        "auto-1 is web-1's only"
    );

    // Open windows, by source: what a restarted detector resumes.
    assert_eq!(
        ids(&store.open_windows(None).await.expect("open")),
        ["am-1", "m-2"]
    );
    assert_eq!(
        ids(&store
            .open_windows(Some(WindowSource::Manual))
            .await
            .expect("open")),
        ["m-2"]
    );
    assert!(
        store
            .open_windows(Some(WindowSource::Automatic))
            .await
            .expect("open")
            .is_empty()
    );
    // Invalid windows are refused, not stored.
    let mut backwards = window("bad", WindowSource::Manual, "x", T0);
    backwards.end_unix_ns = Some((T0 - 1) * SECOND);
    assert!(store.upsert_window(backwards).await.is_err());
    assert_eq!(store.window("bad".into()).await.expect("get"), None);
}
