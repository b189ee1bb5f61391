//! The query API: every call is authorized by bearer token, validated (time ranges,
//! grouping), answered from storage, and profiles travel as pprof messages. Rates are per
//! second of covered time: the stored buckets of the workload asked about, so a range
//! that only partly has data is not diluted by the part without.

use std::sync::Arc;

use stallscope_profile::encode_pprof_uncompressed;
use stallscope_proto::v1::{self, query_server::Query};
use tonic::{Request, Response, Status};

use super::storage_status;
use crate::{
    events::wire::{binary_to_wire, event_to_wire},
    identity::QueryTokens,
    metrics::METRICS,
    storage::{Filter, GroupBy, Retention, SeriesLine, Storage, TimeRange},
    windows::{self, ManualWindow, WindowError, WindowFilter, wire::to_wire},
};

/// Widest time range one query may cover.
const MAX_RANGE_NS: i64 = 366 * 24 * 3600 * 1_000_000_000;

pub struct QueryService<S> {
    pub storage: Arc<S>,
    pub tokens: QueryTokens,
    /// Storage tiers: a bucket's width depends on its age.
    pub retention: Retention,
}

const NS: i64 = 1_000_000_000;

/// The storage resolution, in seconds, of rows `age_s` old: the first tier that keeps
/// them (rows older than every tier's keep are gone; the coarsest stands in).
fn resolution_at(retention: &Retention, age_s: i64) -> i64 {
    retention
        .tiers
        .iter()
        .find(|tier| age_s < tier.keep.as_secs() as i64)
        .or(retention.tiers.last())
        .map_or(1, |tier| tier.resolution.as_secs().max(1) as i64)
}

/// The stored buckets in `lines` (points at bucket starts, step 1 s) as merged time spans
/// in nanoseconds, each bucket as wide as its tier's resolution, clipped to
/// `[from_ns, until_ns)`.
fn covered_spans(
    lines: &[SeriesLine],
    retention: &Retention,
    now_s: i64,
    from_ns: i64,
    until_ns: i64,
) -> Vec<(i64, i64)> {
    let mut starts: Vec<i64> = lines
        .iter()
        .flat_map(|line| line.points.iter().map(|point| point.0))
        .collect();
    starts.sort_unstable();
    starts.dedup();
    let mut spans: Vec<(i64, i64)> = Vec::new();
    for start_s in starts {
        let width_s = resolution_at(retention, now_s - start_s);
        let from = start_s.saturating_mul(NS).max(from_ns);
        let until = (start_s + width_s).saturating_mul(NS).min(until_ns);
        if from >= until {
            continue;
        }
        match spans.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(until),
            _ => spans.push((from, until)),
        }
    }
    spans
}

/// Nanoseconds of `spans` inside `[from_ns, until_ns)`.
fn covered_within(spans: &[(i64, i64)], from_ns: i64, until_ns: i64) -> i64 {
    spans
        .iter()
        .map(|&(from, until)| (until.min(until_ns) - from.max(from_ns)).max(0))
        .sum()
}

/// The part of a filter that names a workload (host, service, pid): coverage is the time
/// the workload has data at all, whatever signal or cause the query narrows to.
fn workload_only(filter: &Filter) -> Filter {
    Filter {
        host: filter.host.clone(),
        service: filter.service.clone(),
        pid: filter.pid.clone(),
        ..Filter::default()
    }
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

impl<S: Storage> QueryService<S> {
    /// Checks the caller's token; counts the call (`method`, as the service names it) and
    /// any refusal in the self-metrics.
    fn authorize<T>(&self, method: &str, request: &Request<T>) -> Result<(), Status> {
        METRICS.query(method);
        self.tokens
            .check(request.metadata())
            .inspect_err(|_| METRICS.query_refused())
    }

    /// The covered spans of `range` for the workload `filter` names.
    async fn coverage(
        &self,
        range: TimeRange,
        filter: &Filter,
        lines: Option<&[SeriesLine]>,
    ) -> Result<Vec<(i64, i64)>, Status> {
        let fetched;
        let lines = if let Some(lines) = lines {
            lines
        } else {
            fetched = self
                .storage
                .series(range, workload_only(filter), GroupBy::Signal, 1)
                .await
                .map_err(|e| storage_status(&e))?;
            &fetched
        };
        let now_ns = crate::unix_now_ns();
        Ok(covered_spans(
            lines,
            &self.retention,
            now_ns / NS,
            range.from_unix_ns,
            range.until_unix_ns.min(now_ns),
        ))
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
        self.authorize("Targets", &request)?;
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
                    first_unix_ns: t.first_unix_s.saturating_mul(NS),
                    last_unix_ns: t.last_unix_s.saturating_mul(NS),
                    wait_ns: t.wait_ns,
                    cpu_ns: t.cpu_ns,
                })
                .collect(),
        }))
    }

    async fn profile(
        &self,
        request: Request<v1::ProfileRequest>,
    ) -> Result<Response<v1::ProfileResponse>, Status> {
        self.authorize("Profile", &request)?;
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
        self.authorize("Series", &request)?;
        let request = request.into_inner();
        let range = range(request.range, "series")?;
        let grouping = super::series::Grouping::parse(&request.group_by)?;
        let span_s = (range.until_unix_ns - range.from_unix_ns) / NS;
        let requested_s = if request.step_ns > 0 {
            (request.step_ns + NS - 1) / NS
        } else {
            span_s / 60
        };
        // Marks hold whole storage buckets: the step is a multiple of the coarsest
        // resolution in the range (that of its oldest rows), and marks start at multiples
        // of the step, so every mark holds the same number of buckets.
        let resolution_s = resolution_at(
            &self.retention,
            crate::unix_now_ns() / NS - range.from_unix_ns / NS,
        );
        let step_s =
            (requested_s.max(resolution_s) + resolution_s - 1) / resolution_s * resolution_s;
        if span_s / step_s > 100_000 {
            return Err(Status::invalid_argument(
                "series: the step is too small for this range (over 100000 points)",
            ));
        }
        let filter = filter(request.filter);
        let spans = self.coverage(range, &filter, None).await?;
        let mark_of = |unix_s: i64| unix_s - unix_s.rem_euclid(step_s);
        let mut marks: Vec<i64> = spans
            .iter()
            .flat_map(|&(from, until)| {
                let first = mark_of(from / NS);
                let last = mark_of((until - 1) / NS);
                (0..=(last - first) / step_s).map(move |i| first + i * step_s)
            })
            .collect();
        marks.dedup();
        let coverage = marks
            .into_iter()
            .map(|mark| v1::Coverage {
                unix_ns: mark.saturating_mul(NS),
                covered_ns: covered_within(&spans, mark * NS, (mark + step_s) * NS),
            })
            .collect();
        // Storage sums buckets into steps that start at multiples of the step: the marks.
        let lines = super::series::lines(
            &*self.storage,
            range,
            filter,
            grouping,
            step_s,
            request.per_scope,
        )
        .await?;
        Ok(Response::new(v1::SeriesResponse {
            step_ns: step_s * NS,
            lines,
            coverage,
        }))
    }

    async fn diff(
        &self,
        request: Request<v1::DiffRequest>,
    ) -> Result<Response<v1::DiffResponse>, Status> {
        self.authorize("Diff", &request)?;
        let request = request.into_inner();
        let before = range(request.before, "diff (before)")?;
        let after = range(request.after, "diff (after)")?;
        let filter = filter(request.filter);
        let covered = |spans: Vec<(i64, i64)>| spans.iter().map(|(from, until)| until - from).sum();
        let before_covered_ns = covered(self.coverage(before, &filter, None).await?);
        let after_covered_ns = covered(self.coverage(after, &filter, None).await?);
        let (before_pprof, _) = self.pprof(before, filter.clone()).await?;
        let (after_pprof, _) = self.pprof(after, filter).await?;
        Ok(Response::new(v1::DiffResponse {
            before_pprof,
            after_pprof,
            before_covered_ns,
            after_covered_ns,
        }))
    }

    async fn windows(
        &self,
        request: Request<v1::WindowsRequest>,
    ) -> Result<Response<v1::WindowsResponse>, Status> {
        self.authorize("Windows", &request)?;
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
        self.authorize("Events", &request)?;
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
        self.authorize("AddWindow", &request)?;
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
        self.authorize("CloseWindow", &request)?;
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
        self.authorize("GetWindow", &request)?;
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
        self.authorize("Explain", &request)?;
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
            self.retention.base_resolution_s(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn agents(
        &self,
        request: Request<v1::AgentsRequest>,
    ) -> Result<Response<v1::AgentsResponse>, Status> {
        self.authorize("Agents", &request)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line(starts: &[i64]) -> SeriesLine {
        SeriesLine {
            key: "off-cpu".to_owned(),
            value_unit: "nanoseconds".to_owned(),
            points: starts.iter().map(|&t| (t, 1, 1)).collect(),
        }
    }

    #[test]
    fn coverage_is_the_union_of_stored_buckets_clipped_to_the_range() {
        let retention = Retention::default();
        let now_s = 1_000_000;
        // Two lines sharing buckets, a gap, and a bucket half outside the range.
        let lines = [
            line(&[999_000, 999_010, 999_040]),
            line(&[999_010, 999_020]),
        ];
        let spans = covered_spans(&lines, &retention, now_s, 999_005 * NS, 999_045 * NS);
        assert_eq!(
            spans,
            vec![(999_005 * NS, 999_030 * NS), (999_040 * NS, 999_045 * NS)]
        );
        assert_eq!(covered_within(&spans, 999_000 * NS, 999_020 * NS), 15 * NS);
        // Rows older than the first tier's day are minute buckets.
        assert_eq!(resolution_at(&retention, 100), 10);
        assert_eq!(resolution_at(&retention, 2 * 86_400), 60);
        assert_eq!(resolution_at(&retention, 100 * 86_400), 60);
    }
}
