//! Windows in the query API's form (`stallscope.v1.Window`).

use stallscope_profile::Labels;
use stallscope_proto::v1;

use super::Window;

fn pairs(labels: &Labels) -> Vec<v1::LabelMatch> {
    labels
        .iter()
        .map(|(key, value)| v1::LabelMatch {
            key: key.clone(),
            value: value.clone(),
        })
        .collect()
}

pub fn to_wire(window: Window) -> v1::Window {
    let state = window.state().as_str().to_owned();
    v1::Window {
        from_unix_ns: window.onset_unix_ns,
        until_unix_ns: window.end_unix_ns.unwrap_or(0),
        host: window.host,
        service: window.service,
        source: window.source.as_str().to_owned(),
        note: window.note,
        id: window.id,
        state,
        indicators: window
            .indicators
            .into_iter()
            .map(|i| v1::Indicator {
                name: i.name,
                baseline: i.baseline,
                observed: i.observed,
                score: i.score,
            })
            .collect(),
        alert: window.alert.map(|alert| v1::AlertInfo {
            labels: pairs(&alert.labels),
            annotations: pairs(&alert.annotations),
            fingerprint: alert.fingerprint,
            group_key: alert.group_key,
            receiver: alert.receiver,
            generator_url: alert.generator_url,
            external_url: alert.external_url,
        }),
        top_cause: window.top_cause.unwrap_or_default(),
        updated_unix_ns: window.updated_unix_ns,
    }
}
