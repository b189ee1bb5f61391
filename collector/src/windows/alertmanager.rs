//! Alertmanager's webhook (payload version 4) turned into windows. A firing alert opens a
//! window at its `startsAt`; its resolution closes it at `endsAt`. The window id is
//! derived from (`groupKey`, `fingerprint`, `startsAt`), so Alertmanager's resends of a
//! whole group (every `group_interval` and `repeat_interval`) change nothing. The scope
//! comes from the alert's labels by a configurable rule.
//!
//! Parsing and planning are pure: a payload is checked as a whole before anything is
//! stored, so a bad delivery stores nothing.

use std::collections::BTreeSet;

use serde::Deserialize;
use stallscope_profile::Labels;

use super::{AlertInfo, UpsertOutcome, Window, WindowSource, rfc3339, window_id};
use crate::storage::{Storage, StorageError};

/// Which labels name an alert's service and host: the first label present wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRule {
    pub service_labels: Vec<String>,
    /// Their values lose a trailing `:port` (`instance="web-1:9100"` is host `web-1`).
    pub host_labels: Vec<String>,
}

pub const DEFAULT_SERVICE_LABELS: [&str; 5] = ["service", "app", "job", "container", "pod"];
pub const DEFAULT_HOST_LABELS: [&str; 4] = ["instance", "host", "node", "nodename"];

impl Default for LabelRule {
    fn default() -> Self {
        Self {
            service_labels: DEFAULT_SERVICE_LABELS.map(str::to_owned).to_vec(),
            host_labels: DEFAULT_HOST_LABELS.map(str::to_owned).to_vec(),
        }
    }
}

impl LabelRule {
    /// (host, service) of an alert; empty where no label of the rule is present.
    pub fn scope(&self, labels: &Labels) -> (String, String) {
        let first = |names: &[String]| {
            names
                .iter()
                .find_map(|name| labels.get(name).filter(|v| !v.is_empty()))
                .cloned()
                .unwrap_or_default()
        };
        (
            strip_port(&first(&self.host_labels)),
            first(&self.service_labels),
        )
    }
}

/// `web-1:9100` -> `web-1`, `[::1]:9100` -> `::1`; anything else as it is.
fn strip_port(value: &str) -> String {
    if let Some(rest) = value.strip_prefix('[')
        && let Some((address, port)) = rest.split_once("]:")
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        return address.to_owned();
    }
    match value.rsplit_once(':') {
        // One colon only: an IPv6 address without brackets has several.
        Some((host, port))
            if !host.contains(':')
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            host.to_owned()
        }
        _ => value.to_owned(),
    }
}

/// The webhook payload; fields not listed are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Payload {
    pub version: String,
    pub group_key: String,
    pub status: String,
    #[serde(default)]
    pub receiver: String,
    #[serde(default)]
    pub group_labels: Labels,
    #[serde(default)]
    pub common_labels: Labels,
    #[serde(default)]
    pub common_annotations: Labels,
    #[serde(default, rename = "externalURL")]
    pub external_url: String,
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub status: String,
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    pub starts_at: String,
    #[serde(default)]
    pub ends_at: String,
    #[serde(default, rename = "generatorURL")]
    pub generator_url: String,
    pub fingerprint: String,
}

/// Most alerts one delivery may carry.
pub const MAX_ALERTS: usize = 10_000;

/// Parses and checks a delivery; the error is one line saying what is wrong.
pub fn parse(body: &[u8]) -> Result<Payload, String> {
    let payload: Payload = serde_json::from_slice(body).map_err(|err| {
        if err.is_data() {
            format!("not an Alertmanager webhook payload: {err}")
        } else {
            format!("invalid JSON: {err}")
        }
    })?;
    if payload.version != "4" {
        return Err(format!(
            "payload version `{}` is not supported: this endpoint reads Alertmanager's version 4",
            payload.version.escape_debug()
        ));
    }
    if payload.group_key.is_empty() {
        return Err("`groupKey` is empty".to_owned());
    }
    if !matches!(payload.status.as_str(), "firing" | "resolved") {
        return Err(format!(
            "`status` is `{}`: expected firing or resolved",
            payload.status.escape_debug()
        ));
    }
    if payload.alerts.len() > MAX_ALERTS {
        return Err(format!(
            "{} alerts in one delivery (at most {MAX_ALERTS}); lower `max_alerts` in the webhook configuration",
            payload.alerts.len()
        ));
    }
    Ok(payload)
}

/// Turns every alert of a checked payload into the window it stands for; fails, naming
/// the alert, if any alert is unusable (then nothing is stored).
pub fn plan(payload: &Payload, rule: &LabelRule, now_unix_ns: i64) -> Result<Vec<Window>, String> {
    let mut planned = Vec::with_capacity(payload.alerts.len());
    for (index, alert) in payload.alerts.iter().enumerate() {
        let what = |reason: String| format!("alert {index}: {reason}");
        if alert.fingerprint.is_empty() {
            return Err(what("`fingerprint` is empty".to_owned()));
        }
        let starts = rfc3339::parse(&alert.starts_at)
            .map_err(|err| what(format!("`startsAt`: {err}")))?
            .filter(|&ns| ns > 0)
            .ok_or_else(|| what("`startsAt` is not set".to_owned()))?;
        let end = match alert.status.as_str() {
            "firing" => None,
            "resolved" => {
                let missing = || what("a resolved alert needs `endsAt`".to_owned());
                if alert.ends_at.is_empty() {
                    return Err(missing());
                }
                let ends = rfc3339::parse(&alert.ends_at)
                    .map_err(|err| what(format!("`endsAt`: {err}")))?
                    .ok_or_else(missing)?;
                if ends < starts {
                    return Err(what(format!(
                        "`endsAt` ({}) is before `startsAt` ({})",
                        alert.ends_at, alert.starts_at
                    )));
                }
                Some(ends)
            }
            other => {
                return Err(what(format!(
                    "`status` is `{}`: expected firing or resolved",
                    other.escape_debug()
                )));
            }
        };
        let (host, service) = rule.scope(&alert.labels);
        let name = alert.labels.get("alertname").cloned().unwrap_or_default();
        let summary = ["summary", "description", "message"]
            .iter()
            .find_map(|key| alert.annotations.get(*key))
            .cloned()
            .unwrap_or_default();
        let note = match (name.is_empty(), summary.is_empty()) {
            (false, false) => format!("{name}: {summary}"),
            (false, true) => name,
            (true, _) => summary,
        };
        let note: String = note.chars().take(super::MAX_NOTE / 4).collect();
        let window = Window {
            id: window_id(
                "am",
                &[&payload.group_key, &alert.fingerprint, &starts.to_string()],
            ),
            source: WindowSource::Alertmanager,
            host,
            service,
            onset_unix_ns: starts,
            end_unix_ns: end,
            indicators: Vec::new(),
            alert: Some(AlertInfo {
                labels: alert.labels.clone(),
                annotations: alert.annotations.clone(),
                fingerprint: alert.fingerprint.clone(),
                group_key: payload.group_key.clone(),
                receiver: payload.receiver.clone(),
                generator_url: alert.generator_url.clone(),
                external_url: payload.external_url.clone(),
            }),
            note,
            top_cause: None,
            updated_unix_ns: now_unix_ns,
        };
        window.validate().map_err(what)?;
        planned.push(window);
    }
    Ok(planned)
}

/// What a delivery changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    pub opened: usize,
    pub closed: usize,
    pub updated: usize,
    pub unchanged: usize,
}

/// The window to store for `planned` given what is stored, or `None` when the stored
/// one already says everything. A resolution is final: a late firing delivery of the
/// same alert (same id) does not reopen it. What was learned since (the top cause, a
/// note edited by hand) is kept.
fn merge(stored: Option<&Window>, planned: &Window) -> Option<Window> {
    let Some(stored) = stored else {
        return Some(planned.clone());
    };
    if stored.end_unix_ns.is_some() && planned.end_unix_ns.is_none() {
        return None;
    }
    let mut next = planned.clone();
    next.top_cause.clone_from(&stored.top_cause);
    next.updated_unix_ns = planned.updated_unix_ns.max(stored.updated_unix_ns + 1);
    (!next.same_content(stored)).then_some(next)
}

/// Stores what a checked delivery means. Idempotent: applying it again stores nothing.
pub async fn apply<S: Storage>(
    storage: &S,
    planned: Vec<Window>,
) -> Result<Delivery, StorageError> {
    let mut delivery = Delivery::default();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for window in planned {
        if !seen.insert(window.id.clone()) {
            delivery.unchanged += 1;
            continue;
        }
        let stored = storage.window(window.id.clone()).await?;
        let Some(next) = merge(stored.as_ref(), &window) else {
            delivery.unchanged += 1;
            continue;
        };
        let closes =
            next.end_unix_ns.is_some() && stored.as_ref().is_none_or(|s| s.end_unix_ns.is_none());
        let opens = stored.is_none() && next.end_unix_ns.is_none();
        match storage.upsert_window(next).await? {
            UpsertOutcome::Unchanged => delivery.unchanged += 1,
            _ if opens => delivery.opened += 1,
            _ if closes => delivery.closed += 1,
            _ => delivery.updated += 1,
        }
    }
    Ok(delivery)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRING: &str = r#"{
      "receiver": "stallscope", "status": "firing", "version": "4",
      "groupKey": "{}:{alertname=\"HighLatency\"}", "truncatedAlerts": 0,
      "groupLabels": {"alertname": "HighLatency"},
      "commonLabels": {"alertname": "HighLatency"}, "commonAnnotations": {},
      "externalURL": "http://am:9093",
      "alerts": [{
        "status": "firing",
        "labels": {"alertname": "HighLatency", "job": "checkout", "instance": "web-1:9100"},
        "annotations": {"summary": "p99 over 500ms"},
        "startsAt": "2026-12-06T04:10:00.5Z", "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prom/graph", "fingerprint": "a1b2c3"
      }]
    }"#;

    #[test]
    fn a_firing_alert_plans_an_open_window_with_its_scope() {
        let payload = parse(FIRING.as_bytes()).expect("valid");
        let planned = plan(&payload, &LabelRule::default(), 7).expect("plan");
        let window = &planned[0];
        assert_eq!(
            (window.host.as_str(), window.service.as_str()),
            ("web-1", "checkout")
        );
        assert_eq!(window.end_unix_ns, None);
        assert_eq!(window.note, "HighLatency: p99 over 500ms");
        assert_eq!(
            Some(window.onset_unix_ns),
            rfc3339::parse("2026-12-06T04:10:00.5Z").expect("time")
        );
        assert!(window.id.starts_with("am-"));
        let alert = window.alert.as_ref().expect("alert");
        assert_eq!(alert.fingerprint, "a1b2c3");
        assert_eq!(alert.external_url, "http://am:9093");
        // The same alert resolved keeps its id.
        let resolved = FIRING
            .replace(
                r#""status": "firing",
        "labels""#,
                r#""status": "resolved",
        "labels""#,
            )
            .replace("0001-01-01T00:00:00Z", "2026-12-06T04:15:00Z");
        let closed = plan(
            &parse(resolved.as_bytes()).expect("valid"),
            &LabelRule::default(),
            8,
        )
        .expect("plan");
        assert_eq!(closed[0].id, window.id);
        assert!(closed[0].end_unix_ns.is_some());
    }

    #[test]
    fn bad_deliveries_say_what_is_wrong() {
        for (body, reason) in [
            ("{", "invalid JSON"),
            ("[]", "not an Alertmanager webhook payload"),
            (
                r#"{"version":"3","groupKey":"k","status":"firing","alerts":[]}"#,
                "version `3`",
            ),
            (
                r#"{"version":"4","status":"firing","alerts":[]}"#,
                "missing field `groupKey`",
            ),
            (
                r#"{"version":"4","groupKey":"","status":"firing","alerts":[]}"#,
                "`groupKey` is empty",
            ),
            (
                r#"{"version":"4","groupKey":"k","status":"odd","alerts":[]}"#,
                "expected firing",
            ),
        ] {
            let err = parse(body.as_bytes()).expect_err(reason);
            assert!(err.contains(reason), "{body}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let alert = |fields: &str| {
            format!(
                r#"{{"version":"4","groupKey":"k","status":"firing","alerts":[{{"labels":{{}},{fields}}}]}}"#
            )
        };
        for (fields, reason) in [
            (
                r#""status":"firing","startsAt":"x","fingerprint":"f""#,
                "`startsAt`",
            ),
            (
                r#""status":"firing","startsAt":"0001-01-01T00:00:00Z","fingerprint":"f""#,
                "not set",
            ),
            (
                r#""status":"resolved","startsAt":"2026-01-01T00:00:00Z","fingerprint":"f""#,
                "needs `endsAt`",
            ),
            (
                r#""status":"resolved","startsAt":"2026-01-01T00:00:00Z","endsAt":"2025-01-01T00:00:00Z","fingerprint":"f""#,
                "before",
            ),
            (
                r#""status":"firing","startsAt":"2026-01-01T00:00:00Z","fingerprint":"""#,
                "fingerprint",
            ),
        ] {
            let payload = parse(alert(fields).as_bytes()).expect("parses");
            let err = plan(&payload, &LabelRule::default(), 1).expect_err(reason);
            assert!(err.contains(reason), "{fields}: {err}");
        }
    }

    #[test]
    fn scopes_follow_the_rule_and_ports_are_stripped() {
        let labels = |pairs: &[(&str, &str)]| -> Labels {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let rule = LabelRule::default();
        assert_eq!(
            rule.scope(&labels(&[("pod", "p-1"), ("app", "api"), ("node", "n1")])),
            ("n1".to_owned(), "api".to_owned())
        );
        assert_eq!(rule.scope(&labels(&[])), (String::new(), String::new()));
        let custom = LabelRule {
            service_labels: vec!["team_service".to_owned()],
            host_labels: vec!["hostname".to_owned()],
        };
        assert_eq!(
            custom.scope(&labels(&[
                ("team_service", "x"),
                ("job", "y"),
                ("hostname", "[::1]:80")
            ])),
            ("::1".to_owned(), "x".to_owned())
        );
        assert_eq!(strip_port("fe80::1"), "fe80::1");
        assert_eq!(strip_port("web-1"), "web-1");
        assert_eq!(strip_port("web-1:"), "web-1:");
    }

    #[test]
    fn repeats_change_nothing_and_resolutions_are_final() {
        let payload = parse(FIRING.as_bytes()).expect("valid");
        let open = plan(&payload, &LabelRule::default(), 10).expect("plan")[0].clone();
        assert!(merge(None, &open).is_some());
        let mut repeat = open.clone();
        repeat.updated_unix_ns = 20;
        assert_eq!(merge(Some(&open), &repeat), None, "a resend");
        let mut closed = open.clone();
        closed.end_unix_ns = Some(open.onset_unix_ns + 1);
        closed.updated_unix_ns = 30;
        let mut explained = open.clone();
        explained.top_cause = Some("lock".to_owned());
        let stored = merge(Some(&explained), &closed).expect("closes");
        assert_eq!(
            stored.top_cause.as_deref(),
            Some("lock"),
            "the cause is kept"
        );
        assert_eq!(
            merge(Some(&stored), &repeat),
            None,
            "a late firing does not reopen"
        );
    }
}
