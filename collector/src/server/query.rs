//! The query API: every call is authorized by bearer token, validated (time ranges,
//! grouping), answered from storage, and profiles travel as pprof messages.

use std::sync::Arc;

use stallscope_profile::encode_pprof_uncompressed;
use stallscope_proto::v1::{self, query_server::Query};
use tonic::{Request, Response, Status};

use crate::{
    identity::QueryTokens,
    storage::{Filter, GroupBy, Storage, StorageError, TimeRange},
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
        let group_by = match request.group_by.as_str() {
            "" | "signal" => GroupBy::Signal,
            "cause" => GroupBy::Cause,
            other => {
                return Err(Status::invalid_argument(format!(
                    "group_by `{other}`: use signal or cause"
                )));
            }
        };
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
        let lines = self
            .storage
            .series(range, filter(request.filter), group_by, step_s)
            .await
            .map_err(|e| storage_status(&e))?;
        Ok(Response::new(v1::SeriesResponse {
            step_ns: step_s * 1_000_000_000,
            lines: lines
                .into_iter()
                .map(|line| v1::SeriesLine {
                    key: line.key,
                    value_unit: line.value_unit,
                    points: line
                        .points
                        .into_iter()
                        .map(|(t, value, count)| v1::SeriesPoint {
                            unix_ns: t.saturating_mul(1_000_000_000),
                            value,
                            count,
                        })
                        .collect(),
                })
                .collect(),
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
        let windows = self
            .storage
            .windows(range(request.range, "windows")?, filter(request.filter))
            .await
            .map_err(|e| storage_status(&e))?;
        Ok(Response::new(v1::WindowsResponse {
            windows: windows
                .into_iter()
                .map(|w| v1::Window {
                    from_unix_ns: w.from_unix_ns,
                    until_unix_ns: w.until_unix_ns,
                    host: w.host,
                    service: w.service,
                    source: w.source,
                    note: w.note,
                })
                .collect(),
        }))
    }

    async fn explain(
        &self,
        request: Request<v1::ExplainRequest>,
    ) -> Result<Response<v1::ExplainResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        if !request.window_id.is_empty() {
            return Err(Status::unimplemented(
                "explain: windows by id are not stored yet; give a range and a service",
            ));
        }
        let window = range(request.range, "explain")?;
        let baseline = request
            .baseline
            .map(|b| range(Some(b), "explain (baseline)"))
            .transpose()?;
        let response = super::explain::answer(
            &*self.storage,
            window,
            &filter(request.filter),
            baseline,
            None,
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
