//! The query API: every call is authorized by bearer token, validated (time ranges,
//! grouping), answered from storage, and profiles travel as pprof messages.

use std::sync::Arc;

use stallscope_profile::encode_pprof_uncompressed;
use stallscope_proto::v1::{self, query_server::Query};
use tonic::{Request, Response, Status};

use crate::{
    events::wire::{binary_to_wire, event_to_wire},
    identity::QueryTokens,
    storage::{Filter, Storage, StorageError, TimeRange},
    windows::{self, ManualWindow, WindowError, WindowFilter, wire::to_wire},
};

/// Widest time range one query may cover.
const MAX_RANGE_NS: i64 = 366 * 24 * 3600 * 1_000_000_000;

pub struct QueryService<S> {
    pub storage: Arc<S>,
    pub tokens: QueryTokens,
    /// Resolution of the finest tier: the smallest useful series step.
    pub base_resolution_s: i64,
}

fn range(range: Option<v1::TimeRange>, what: &str) -> Result<TimeRange, Status> {
    let range = range
        .ok_or_else(|| Status::invalid_argument(format!("{what}: a time range is required")))?;
    if range.from_unix_ns < 0 || range.until_unix_ns <= range.from_unix_ns {
        return Err(Status::invalid_argument(format!(
            "{what}: the time range must have from < until (got {}..{})",
            range.from_unix_ns, range.until_unix_ns
        )));
    }
    if range.until_unix_ns - range.from_unix_ns > MAX_RANGE_NS {
        return Err(Status::invalid_argument(format!(
            "{what}: time ranges are limited to 366 days"
        )));
    }
    Ok(TimeRange {
        from_unix_ns: range.from_unix_ns,
        until_unix_ns: range.until_unix_ns,
    })
}

fn filter(filter: Option<v1::Filter>) -> Filter {
    let filter = filter.unwrap_or_default();
    let set = |text: String| (!text.is_empty()).then_some(text);
    Filter {
        host: set(filter.host),
        service: set(filter.service),
        pid: set(filter.pid),
        signal: set(filter.signal),
        cause: set(filter.cause),
        labels: filter
            .labels
            .into_iter()
            .map(|l| (l.key, l.value))
            .collect(),
    }
}

fn window_status(err: WindowError) -> Status {
    match err {
        WindowError::Invalid(message) => Status::invalid_argument(message),
        WindowError::NotFound(_) => Status::not_found(err.to_string()),
        WindowError::AlreadyClosed { .. } => Status::failed_precondition(err.to_string()),
        WindowError::Storage(err) => storage_status(&err),
    }
}

/// The optional parts of a windows listing's request.
fn window_filter(
    filter: Option<v1::Filter>,
    source: &str,
    state: &str,
) -> Result<WindowFilter, Status> {
    let filter = filter.unwrap_or_default();
    let set = |text: String| (!text.is_empty()).then_some(text);
    Ok(WindowFilter {
        host: set(filter.host),
        service: set(filter.service),
        source: (!source.is_empty())
            .then(|| source.parse())
            .transpose()
            .map_err(Status::invalid_argument)?,
        state: (!state.is_empty())
            .then(|| state.parse())
            .transpose()
            .map_err(Status::invalid_argument)?,
    })
}

pub(super) fn storage_status(err: &StorageError) -> Status {
    tracing::error!("query failed: {err}");
    Status::unavailable(format!("storage error: {err}"))
}

impl<S: Storage> QueryService<S> {
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.tokens.check(request.metadata())
    }

    async fn pprof(&self, range: TimeRange, filter: Filter) -> Result<(Vec<u8>, u64), Status> {
        let profile = self
            .storage
            .profile(range, filter)
            .await
            .map_err(|e| storage_status(&e))?;
        Ok((
            encode_pprof_uncompressed(&profile),
            profile.samples.len() as u64,
        ))
    }
}

#[tonic::async_trait]
impl<S: Storage> Query for QueryService<S> {
    async fn targets(
        &self,
        request: Request<v1::TargetsRequest>,
    ) -> Result<Response<v1::TargetsResponse>, Status> {
        self.authorize(&request)?;
        let range = range(request.into_inner().range, "targets")?;
        let targets = self
            .storage
            .targets(range)
            .await
            .map_err(|e| storage_status(&e))?;
        Ok(Response::new(v1::TargetsResponse {
            targets: targets
                .into_iter()
                .map(|t| v1::Target {
                    host: t.host,
                    service: t.service,
                    process: t.process,
                    pid: t.pid,
                    signals: t.signals,
                    first_unix_ns: t.first_unix_s.saturating_mul(1_000_000_000),
                    last_unix_ns: t.last_unix_s.saturating_mul(1_000_000_000),
                })
                .collect(),
        }))
    }

    async fn profile(
        &self,
        request: Request<v1::ProfileRequest>,
    ) -> Result<Response<v1::ProfileResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let (pprof, samples) = self
            .pprof(range(request.range, "profile")?, filter(request.filter))
            .await?;
        Ok(Response::new(v1::ProfileResponse { pprof, samples }))
    }

    async fn series(
        &self,
        request: Request<v1::SeriesRequest>,
    ) -> Result<Response<v1::SeriesResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let range = range(request.range, "series")?;
        let grouping = super::series::Grouping::parse(&request.group_by)?;
        let span_s = (range.until_unix_ns - range.from_unix_ns) / 1_000_000_000;
        let step_s = if request.step_ns > 0 {
            request.step_ns / 1_000_000_000
        } else {
            span_s / 60
        }
        .max(self.base_resolution_s)
        .max(1);
        if span_s / step_s > 100_000 {
            return Err(Status::invalid_argument(
                "series: the step is too small for this range (over 100000 points)",
            ));
        }
        let lines = super::series::lines(
            &*self.storage,
            range,
            filter(request.filter),
            grouping,
            step_s,
            request.per_scope,
        )
        .await?;
        Ok(Response::new(v1::SeriesResponse {
            step_ns: step_s * 1_000_000_000,
            lines,
        }))
    }

    async fn diff(
        &self,
        request: Request<v1::DiffRequest>,
    ) -> Result<Response<v1::DiffResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let before = range(request.before, "diff (before)")?;
        let after = range(request.after, "diff (after)")?;
        let filter = filter(request.filter);
        let (before_pprof, _) = self.pprof(before, filter.clone()).await?;
        let (after_pprof, _) = self.pprof(after, filter).await?;
        Ok(Response::new(v1::DiffResponse {
            before_pprof,
            after_pprof,
        }))
    }

    async fn windows(
        &self,
        request: Request<v1::WindowsRequest>,
    ) -> Result<Response<v1::WindowsResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let range = range(request.range, "windows")?;
        let filter = window_filter(request.filter, &request.source, &request.state)?;
        let windows = self
            .storage
            .windows(range, filter)
            .await
            .map_err(|e| storage_status(&e))?;
        Ok(Response::new(v1::WindowsResponse {
            windows: windows.into_iter().map(to_wire).collect(),
        }))
    }

    async fn events(
        &self,
        request: Request<v1::EventsRequest>,
    ) -> Result<Response<v1::EventsResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let range = range(request.range, "events")?;
        let filter = filter(request.filter);
        let events = self
            .storage
            .events(range, filter.clone())
            .await
            .map_err(|e| storage_status(&e))?;
        let binaries = if request.binaries {
            self.storage
                .binaries(range, filter)
                .await
                .map_err(|e| storage_status(&e))?
        } else {
            Vec::new()
        };
        Ok(Response::new(v1::EventsResponse {
            events: events.into_iter().map(event_to_wire).collect(),
            binaries: binaries.into_iter().map(binary_to_wire).collect(),
        }))
    }

    async fn add_window(
        &self,
        request: Request<v1::AddWindowRequest>,
    ) -> Result<Response<v1::AddWindowResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let manual = ManualWindow {
            host: request.host,
            service: request.service,
            from_unix_ns: request.from_unix_ns,
            until_unix_ns: (request.until_unix_ns != 0).then_some(request.until_unix_ns),
            note: request.note,
        };
        let (window, created) = windows::add_manual(&*self.storage, manual, crate::unix_now_ns())
            .await
            .map_err(window_status)?;
        if created {
            tracing::info!("window {} added by hand", window.id);
        }
        Ok(Response::new(v1::AddWindowResponse {
            window: Some(to_wire(window)),
            created,
        }))
    }

    async fn close_window(
        &self,
        request: Request<v1::CloseWindowRequest>,
    ) -> Result<Response<v1::CloseWindowResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let at = (request.at_unix_ns != 0).then_some(request.at_unix_ns);
        let window = windows::close(&*self.storage, &request.id, at, crate::unix_now_ns())
            .await
            .map_err(window_status)?;
        tracing::info!("window {} closed by hand", window.id);
        Ok(Response::new(v1::CloseWindowResponse {
            window: Some(to_wire(window)),
        }))
    }

    async fn get_window(
        &self,
        request: Request<v1::GetWindowRequest>,
    ) -> Result<Response<v1::GetWindowResponse>, Status> {
        self.authorize(&request)?;
        let id = request.into_inner().id;
        windows::valid_id(&id).map_err(Status::invalid_argument)?;
        let window = self
            .storage
            .window(id.clone())
            .await
            .map_err(|e| storage_status(&e))?
            .ok_or_else(|| window_status(WindowError::NotFound(id)))?;
        Ok(Response::new(v1::GetWindowResponse {
            window: Some(to_wire(window)),
        }))
    }

    async fn explain(
        &self,
        request: Request<v1::ExplainRequest>,
    ) -> Result<Response<v1::ExplainResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        // A stored window: its period and scope (an open one up to now).
        let (window, filter, window_id) = if request.window_id.is_empty() {
            (
                range(request.range, "explain")?,
                filter(request.filter),
                None,
            )
        } else {
            let id = request.window_id;
            windows::valid_id(&id).map_err(Status::invalid_argument)?;
            let stored = self
                .storage
                .window(id.clone())
                .await
                .map_err(|e| storage_status(&e))?
                .ok_or_else(|| window_status(WindowError::NotFound(id.clone())))?;
            let until = stored.end_unix_ns.unwrap_or_else(crate::unix_now_ns);
            let span = v1::TimeRange {
                from_unix_ns: stored.onset_unix_ns,
                until_unix_ns: until.max(stored.onset_unix_ns + 1),
            };
            let set = |text: String| (!text.is_empty()).then_some(text);
            let scope = Filter {
                host: set(stored.host),
                service: set(stored.service),
                ..Filter::default()
            };
            (range(Some(span), "explain")?, scope, Some(id))
        };
        let baseline = request
            .baseline
            .map(|b| range(Some(b), "explain (baseline)"))
            .transpose()?;
        let response = super::explain::answer(
            &*self.storage,
            window,
            &filter,
            baseline,
            window_id,
            &request.ranker,
            self.base_resolution_s,
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn agents(
        &self,
        request: Request<v1::AgentsRequest>,
    ) -> Result<Response<v1::AgentsResponse>, Status> {
        self.authorize(&request)?;
        let agents = self
            .storage
            .agents()
            .await
            .map_err(|e| storage_status(&e))?;
        Ok(Response::new(v1::AgentsResponse {
            agents: agents
                .into_iter()
                .map(|a| v1::AgentInfo {
                    agent: a.agent,
                    host: a.host,
                    batches: a.batches,
                    first_sequence: a.first_sequence,
                    last_sequence: a.last_sequence,
                    spool_dropped_total: a.spool_dropped_total,
                    last_batch_unix_ns: a.last_batch_unix_ns,
                    samples: a.samples,
                })
                .collect(),
        }))
    }
}
