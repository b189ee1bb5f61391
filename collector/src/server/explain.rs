//! The `Explain` query: turns a request (a window, or a range and a scope) into a
//! [`Question`], asks [`explain`], and carries the report back as proto messages.

use stallscope_proto::v1;
use tonic::Status;

use crate::{
    explain::{
        self, Question, Ranker, Settings,
        report::{CauseChange, Evidence, Report, Span},
    },
    storage::{Filter, Storage, TimeRange},
    windows::WindowFilter,
};

fn proto_range(span: Span) -> v1::TimeRange {
    v1::TimeRange {
        from_unix_ns: span.from_unix_ns,
        until_unix_ns: span.until_unix_ns,
    }
}

fn evidence(e: Evidence) -> v1::ExplainEvidence {
    v1::ExplainEvidence {
        kind: e.kind,
        name: e.name,
        window_ns_per_s: e.window_ns_per_s,
        baseline_ns_per_s: e.baseline_ns_per_s,
        window_ns_per_event: e.window_ns_per_event,
        baseline_ns_per_event: e.baseline_ns_per_event,
        details: e.details,
        q_value: e.q_value,
        new: e.new,
    }
}

fn cause(c: CauseChange) -> v1::ExplainCause {
    v1::ExplainCause {
        category: c.category,
        rank: c.rank.unwrap_or(0),
        window_ns_per_s: c.window_ns_per_s,
        baseline_ns_per_s: c.baseline_ns_per_s,
        change_ns_per_s: c.change_ns_per_s,
        window_ns_per_event: c.window_ns_per_event,
        baseline_ns_per_event: c.baseline_ns_per_event,
        share: c.share,
        p_value: c.p_value,
        q_value: c.q_value,
        significant: c.significant,
        evidence: c.evidence.into_iter().map(evidence).collect(),
    }
}

/// The report as the wire carries it.
pub fn to_proto(report: Report) -> v1::ExplainResponse {
    v1::ExplainResponse {
        window_id: report.window_id.unwrap_or_default(),
        host: report.host,
        service: report.service,
        window: Some(proto_range(report.window)),
        verdict: report.verdict.as_str().to_owned(),
        summary: report.summary,
        bucket_ns: report.bucket_s.saturating_mul(1_000_000_000),
        window_buckets: u32::try_from(report.window_buckets).unwrap_or(u32::MAX),
        baseline_buckets: u32::try_from(report.baseline_buckets).unwrap_or(u32::MAX),
        baseline: report
            .baseline
            .into_iter()
            .map(|p| v1::ExplainBaselinePeriod {
                span: Some(proto_range(p.span)),
                kind: p.kind,
            })
            .collect(),
        causes: report.causes.into_iter().map(cause).collect(),
        idle_window_ns_per_s: report.idle_window_ns_per_s,
        idle_baseline_ns_per_s: report.idle_baseline_ns_per_s,
        events: report
            .events
            .into_iter()
            .map(|e| v1::ExplainEvent {
                time_unix_ns: e.time_unix_ns,
                kind: e.kind,
                host: e.host,
                service: e.service,
                build_id: e.build_id.unwrap_or_default(),
                previous_build_id: e.previous_build_id.unwrap_or_default(),
                detail: e.detail,
            })
            .collect(),
        weaknesses: report.weaknesses,
    }
}

/// Answers one `Explain` request for a scope and range (already validated).
pub async fn answer<S: Storage>(
    storage: &S,
    window: TimeRange,
    filter: &Filter,
    baseline: Option<TimeRange>,
    window_id: Option<String>,
    ranker: &str,
    base_resolution_s: i64,
) -> Result<v1::ExplainResponse, Status> {
    let ranker = match ranker {
        "" | "why" => Ranker::Why,
        "nsigma" => Ranker::NSigma,
        other => {
            return Err(Status::invalid_argument(format!(
                "explain: unknown ranker `{other}` (use why or nsigma)"
            )));
        }
    };
    if filter.service.is_none() && filter.host.is_none() {
        return Err(Status::invalid_argument(
            "explain: name a service (or a host) to explain, or a window id",
        ));
    }
    // Every other window of the scope stays out of the baseline.
    let lookback = TimeRange {
        from_unix_ns: window
            .from_unix_ns
            .saturating_sub(8 * 86_400 * 1_000_000_000),
        until_unix_ns: window.until_unix_ns,
    };
    let scope = WindowFilter {
        host: filter.host.clone(),
        service: filter.service.clone(),
        ..WindowFilter::default()
    };
    let exclude: Vec<Span> = storage
        .windows(lookback, scope)
        .await
        .map_err(|e| super::storage_status(&e))?
        .into_iter()
        .map(|w| Span {
            from_unix_ns: w.onset_unix_ns,
            // An open window reaches to now.
            until_unix_ns: w.end_unix_ns.unwrap_or(i64::MAX),
        })
        .collect();
    let question = Question {
        window_id,
        host: filter.host.clone(),
        service: filter.service.clone(),
        window,
        baseline,
        exclude,
    };
    let settings = Settings {
        ranker,
        base_resolution_s,
        ..Settings::default()
    };
    let report = explain::explain(storage, &question, &settings)
        .await
        .map_err(|e| super::storage_status(&e))?;
    Ok(to_proto(report))
}
