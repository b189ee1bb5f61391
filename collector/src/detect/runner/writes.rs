//! Writing windows: a new window is taken up if the scope has one open in storage, or
//! stored under the next id of the scope's chain; every later version reads the stored
//! one first and keeps what others changed. A write that fails is retried at the next
//! tick.

use super::{Detector, Managed, TickReport};
use crate::{
    detect::{
        scope::{CloseReason, Event, OpenWindow},
        store::{IndicatorRecord, StoredWindow, WindowStore},
    },
    storage::{Storage, StorageError, TimeRange},
};

const NS: i64 = 1_000_000_000;

fn chain_id(host: &str, service: &str, previous: Option<&str>) -> String {
    let hash = crate::hash::StableHasher::new()
        .str("automatic")
        .str(host)
        .str(service)
        .str(previous.unwrap_or(""))
        .finish();
    format!("a-{:016x}", hash as u64)
}

fn records(window: &OpenWindow) -> Vec<IndicatorRecord> {
    let mut out: Vec<IndicatorRecord> = window
        .crossed
        .iter()
        .map(|c| IndicatorRecord {
            name: c.key.to_string(),
            baseline: c.baseline,
            observed: c.observed,
            score: c.score,
        })
        .collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    out
}

impl<S: Storage + WindowStore> Detector<S> {
    /// Stores what a scope reported; a failed write is retried at the next tick.
    pub(super) async fn apply(
        &mut self,
        host: &str,
        service: &str,
        event: Event,
        now_s: i64,
        report: &mut TickReport,
    ) -> Result<(), StorageError> {
        let result = match &event {
            Event::Opened(window) => {
                self.store_opened(host, service, window, now_s, report)
                    .await
            }
            Event::Updated(window) => self.store_version(host, service, window, None, now_s).await,
            Event::Closed {
                window,
                end_unix_ns,
                reason,
            } => {
                let stored = self
                    .store_version(host, service, window, Some((*end_unix_ns, *reason)), now_s)
                    .await;
                if stored.is_ok() {
                    report.closed.push(window.id.clone());
                }
                stored
            }
        };
        if let Err(err) = result {
            self.pending
                .push((host.to_owned(), service.to_owned(), event));
            return Err(err);
        }
        Ok(())
    }

    /// A new window: taken up if the scope already has one open in storage, else stored
    /// under the next id of the scope's chain.
    async fn store_opened(
        &mut self,
        host: &str,
        service: &str,
        window: &OpenWindow,
        now_s: i64,
        report: &mut TickReport,
    ) -> Result<(), StorageError> {
        let open = self.storage.open_automatic_windows().await?;
        if let Some(stored) = open.iter().find(|w| w.host == host && w.service == service) {
            self.scope_mut(host, service)
                .adopt(&stored.id, stored.onset_unix_ns);
            self.manage(&stored.id, host, service, true, now_s);
            report.adopted.push(stored.id.clone());
            return Ok(());
        }
        let previous = self
            .storage
            .windows_overlapping(TimeRange {
                from_unix_ns: 0,
                until_unix_ns: i64::MAX / 4,
            })
            .await?
            .into_iter()
            .filter(|w| w.automatic && w.host == host && w.service == service)
            .max_by(|a, b| {
                a.onset_unix_ns
                    .cmp(&b.onset_unix_ns)
                    .then_with(|| a.id.cmp(&b.id))
            });
        let id = chain_id(host, service, previous.as_ref().map(|w| w.id.as_str()));
        if let Some(existing) = self.storage.window_by_id(id.clone()).await? {
            // Another replica stored it between the two reads.
            let scope = self.scope_mut(host, service);
            match existing.end_unix_ns {
                None => {
                    scope.adopt(&existing.id, existing.onset_unix_ns);
                    self.manage(&existing.id, host, service, true, now_s);
                    report.adopted.push(existing.id);
                }
                Some(end) => scope.closed_elsewhere(end.div_euclid(NS)),
            }
            return Ok(());
        }
        let stored = StoredWindow {
            id: id.clone(),
            automatic: true,
            host: host.to_owned(),
            service: service.to_owned(),
            onset_unix_ns: window.onset_unix_ns,
            end_unix_ns: None,
            indicators: records(window),
            note: String::new(),
            top_cause: None,
            updated_unix_ns: now_s * NS,
        };
        self.storage.put_window(stored).await?;
        self.scope_mut(host, service).rename_open(&id);
        self.manage(&id, host, service, true, now_s);
        report.opened.push(id);
        Ok(())
    }

    /// Looks after window `id`: `why` runs on it `explain_interval` after `now_s` (and
    /// when it closes).
    pub(super) fn manage(&mut self, id: &str, host: &str, service: &str, open: bool, now_s: i64) {
        let entry = self
            .managed
            .entry(id.to_owned())
            .or_insert_with(|| Managed {
                host: host.to_owned(),
                service: service.to_owned(),
                explained_s: now_s,
                open,
                last_run_started: false,
            });
        entry.open = open;
    }

    /// Writes a new version of a window this scope has open (or closes it), keeping what
    /// others changed: a window already closed stays closed, the earliest onset wins,
    /// the top cause is kept.
    async fn store_version(
        &mut self,
        host: &str,
        service: &str,
        window: &OpenWindow,
        close: Option<(i64, CloseReason)>,
        now_s: i64,
    ) -> Result<(), StorageError> {
        let stored = self.storage.window_by_id(window.id.clone()).await?;
        if let Some(stored) = &stored
            && let Some(end) = stored.end_unix_ns
        {
            // Closed elsewhere (by hand, or by another replica).
            if close.is_none() {
                self.scope_mut(host, service)
                    .closed_elsewhere(end.div_euclid(NS));
            }
            self.manage(&window.id, host, service, false, now_s);
            return Ok(());
        }
        let note = match close {
            Some((_, CloseReason::NoData)) => format!(
                "closed: no data or too little activity for more than {} buckets",
                self.settings.max_gap
            ),
            Some((_, CloseReason::TooLong)) => format!(
                "closed after {} s open: the level it reached is the new baseline",
                self.settings.max_window.as_secs()
            ),
            _ => stored.as_ref().map(|s| s.note.clone()).unwrap_or_default(),
        };
        let version = StoredWindow {
            id: window.id.clone(),
            automatic: true,
            host: host.to_owned(),
            service: service.to_owned(),
            onset_unix_ns: stored.as_ref().map_or(window.onset_unix_ns, |s| {
                s.onset_unix_ns.min(window.onset_unix_ns)
            }),
            end_unix_ns: close.map(|(end, _)| end),
            indicators: records(window),
            note,
            top_cause: stored.as_ref().and_then(|s| s.top_cause.clone()),
            updated_unix_ns: (now_s * NS).max(stored.as_ref().map_or(0, |s| s.updated_unix_ns + 1)),
        };
        self.storage.put_window(version).await?;
        self.manage(&window.id, host, service, close.is_none(), now_s);
        Ok(())
    }
}
