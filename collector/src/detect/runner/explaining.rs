//! `why` on the windows a detector looks after: open ones every `explain_interval`,
//! closed ones once; runs off the loop (a task each), and the loop stores the top cause,
//! so it never races the window's other writes.

use std::sync::Arc;

use super::{Detector, Managed, TickReport};
use crate::{
    detect::store::WindowStore,
    explain::{self, Question, report::Span},
    storage::{Storage, StorageError, TimeRange},
};

const NS: i64 = 1_000_000_000;
/// The longest a top cause may be (the window model's limit for names).
const MAX_CAUSE: usize = 253;

/// The top cause as a window carries it: the category `why` ranked first and its first
/// piece of evidence, e.g. `network (peer 10.0.0.7:5432)`.
pub fn top_cause_of(report: &explain::report::Report) -> Option<String> {
    let top = report.causes.iter().find(|c| c.rank == Some(1))?;
    let mut text = match top.evidence.first() {
        Some(e) if !e.name.is_empty() => format!("{} ({} {})", top.category, e.kind, e.name),
        _ => top.category.clone(),
    };
    if text.len() > MAX_CAUSE {
        let mut cut = MAX_CAUSE;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    Some(text)
}

impl<S: Storage + WindowStore> Detector<S> {
    /// Starts `why` on windows due for it: open ones every `explain_interval`, closed ones
    /// once.
    pub(super) fn start_explains(&mut self, now_unix_ns: i64) {
        // One at a time: `why` reads much more than a tick does, and on SQLite every read
        // takes turns on one connection; detection must not wait behind a queue of them.
        if !self.explains.is_empty() {
            return;
        }
        let now_s = now_unix_ns.div_euclid(NS);
        let interval = self.settings.explain_interval.as_secs() as i64;
        // Closed windows first (their last run), then the open one explained longest ago.
        let mut due: Vec<(String, Managed)> = self
            .managed
            .iter()
            .filter(|(id, m)| {
                !self.explaining.contains(*id) && (!m.open || now_s - m.explained_s >= interval)
            })
            .map(|(id, m)| (id.clone(), m.clone()))
            .collect();
        due.sort_by_key(|(_, m)| (m.open, m.explained_s));
        due.truncate(1);
        for (id, managed) in due {
            let storage = Arc::clone(&self.storage);
            let step_s = self.step_s;
            let exclude: Vec<Span> = self
                .known
                .iter()
                .filter(|w| w.id != id && w.covers(&managed.host, &managed.service))
                .map(|w| Span {
                    from_unix_ns: w.onset_unix_ns,
                    until_unix_ns: w.end_unix_ns.unwrap_or(i64::MAX),
                })
                .collect();
            self.explaining.insert(id.clone());
            if let Some(m) = self.managed.get_mut(&id) {
                m.explained_s = now_s;
                m.last_run_started |= !m.open;
            }
            self.explains.spawn(async move {
                let result = explain_window(&*storage, &id, exclude, step_s, now_unix_ns).await;
                (id, result)
            });
        }
    }

    /// Stores the top causes of finished `why` runs.
    pub(super) async fn collect_explains(
        &mut self,
        now_unix_ns: i64,
        report: &mut TickReport,
    ) -> Result<(), StorageError> {
        while let Some(done) = self.explains.try_join_next() {
            self.explained(done, now_unix_ns, report).await?;
        }
        Ok(())
    }

    /// Waits for the `why` runs in flight and stores their causes (tests, shutdown).
    pub async fn finish_explains(&mut self, now_unix_ns: i64) -> Result<TickReport, StorageError> {
        let mut report = TickReport::default();
        while let Some(done) = self.explains.join_next().await {
            self.explained(done, now_unix_ns, &mut report).await?;
        }
        Ok(report)
    }

    async fn explained(
        &mut self,
        done: Result<(String, Result<Option<String>, StorageError>), tokio::task::JoinError>,
        now_unix_ns: i64,
        report: &mut TickReport,
    ) -> Result<(), StorageError> {
        let Ok((id, result)) = done else {
            return Ok(());
        };
        self.explaining.remove(&id);
        // Done with a closed window once its last run (started after it closed) is in.
        if self
            .managed
            .get(&id)
            .is_some_and(|m| !m.open && m.last_run_started)
        {
            self.managed.remove(&id);
        }
        let cause = match result {
            Ok(cause) => cause,
            Err(err) => {
                tracing::warn!("why on window {id}: {err}");
                return Ok(());
            }
        };
        report.explained.push(id.clone());
        let Some(cause) = cause else {
            return Ok(());
        };
        let Some(mut stored) = self.storage.window_by_id(id.clone()).await? else {
            return Ok(());
        };
        if stored.top_cause.as_deref() == Some(cause.as_str()) {
            return Ok(());
        }
        stored.top_cause = Some(cause);
        stored.updated_unix_ns = now_unix_ns.max(stored.updated_unix_ns + 1);
        self.storage.put_window(stored).await
    }
}

/// `why` on one stored window: its top cause, if `why` ranked one.
async fn explain_window<S: Storage + WindowStore>(
    storage: &S,
    id: &str,
    exclude: Vec<Span>,
    step_s: i64,
    now_unix_ns: i64,
) -> Result<Option<String>, StorageError> {
    let Some(window) = storage.window_by_id(id.to_owned()).await? else {
        return Ok(None);
    };
    let question = Question {
        window_id: Some(window.id.clone()),
        host: Some(window.host.clone()).filter(|h| !h.is_empty()),
        service: Some(window.service.clone()).filter(|s| !s.is_empty()),
        window: TimeRange {
            from_unix_ns: window.onset_unix_ns,
            until_unix_ns: window.end_unix_ns.unwrap_or(now_unix_ns),
        },
        baseline: None,
        exclude,
    };
    let settings = explain::Settings {
        base_resolution_s: step_s,
        ..explain::Settings::default()
    };
    let report = explain::explain(storage, &question, &settings).await?;
    Ok(top_cause_of(&report))
}
