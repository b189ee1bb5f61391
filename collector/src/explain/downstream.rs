//! Following a slow peer downstream, the way an SRE follows a slow call: when a scope's
//! first cause is its wait on a peer, and exactly one other stored service serves that
//! peer's port (its server-side socket waits carry the port as `local_port`), `why` asks
//! the same question of that service over the same window and says what it found beside
//! the peer. A CPU-hungry neighbour slows every process on its host, the scope's peers
//! included, and the scope then waits longer on those peers than it waits for the CPU
//! itself: when the peer's own first cause is CPU contention on a host the scope runs on,
//! and the scope's CPU contention rose too, CPU contention is the scope's first cause,
//! with the peer as evidence, provided that contention is the peer's main change and
//! about the size of the scope's extra wait on it. Where a process on the host took at
//! least half a CPU more in the window (a hog, named in the scope's CPU contention
//! evidence) and the path to the peer did not retransmit more, it is enough that the
//! peer's CPU contention rose significantly: a starved peer's delay then includes more
//! than its own measured run-queue time, and how much more varies from run to run.

use super::{
    Question, Settings,
    categories::{Category, signals},
    detail_only, explain_scope,
    objects::human_ns,
    report::Report,
    summary,
};
use crate::storage::{Filter, Storage, StorageError, signal_matches};

/// The peer's CPU contention must be at least this share of its own change...
const MIN_DOWNSTREAM_SHARE: f64 = 0.5;
/// ...and at least this fraction of the scope's extra wait on the peer (the peer's
/// threads wait for the CPU in parallel, so its rise per second can be smaller than its
/// callers' extra wait, but not by orders of magnitude).
const MIN_EXPLAINED: f64 = 0.25;
/// A process whose on-CPU time rose at least this much (ns per second) is a CPU hog.
const HOG_NS_PER_S: f64 = 0.5e9;

/// The port of a client-side peer label: `10.0.0.2:7001`, `[fd00::2]:7001`.
fn peer_port(name: &str) -> Option<&str> {
    let (_, port) = name.rsplit_once(':')?;
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())).then_some(port)
}

/// The (host, service) pairs, other than `own`, whose server-side socket waits in the
/// window name `port` as their own.
async fn serving<S: Storage>(
    storage: &S,
    question: &Question,
    port: &str,
    own: &str,
) -> Result<Vec<(String, String)>, StorageError> {
    let filter = Filter {
        signal: Some(signals::SOCKET_WAIT.to_owned()),
        labels: vec![
            ("direction".to_owned(), "server".to_owned()),
            ("local_port".to_owned(), port.to_owned()),
        ],
        ..Filter::default()
    };
    let length_s = (question.window.until_unix_ns - question.window.from_unix_ns) / 1_000_000_000;
    let series = storage
        .series_totals(question.window, filter, length_s.max(1))
        .await?;
    let mut found: Vec<(String, String)> = series
        .into_iter()
        .filter(|s| {
            signal_matches(&s.signal, signals::SOCKET_WAIT)
                && s.labels.get("direction").map(String::as_str) == Some("server")
                && s.labels.get("local_port").map(String::as_str) == Some(port)
                && s.service != own
        })
        .map(|s| (s.host, s.service))
        .collect();
    found.sort();
    found.dedup();
    Ok(found)
}

/// Follows the first cause of `report` to the peer's own service, if it is a peer wait
/// and the service can be told; may make CPU contention the first cause (see the module).
pub async fn follow<S: Storage>(
    storage: &S,
    question: &Question,
    settings: &Settings,
    report: &mut Report,
) -> Result<(), StorageError> {
    let Some(top) = report.causes.iter().find(|c| c.rank == Some(1)) else {
        return Ok(());
    };
    if top.category != Category::Network.label() {
        return Ok(());
    }
    let Some(peer) = top.evidence.iter().find(|e| e.kind == "peer") else {
        return Ok(());
    };
    let Some(port) = peer_port(&peer.name) else {
        return Ok(());
    };
    let peer_name = peer.name.clone();
    let peer_rise = peer.window_ns_per_s - peer.baseline_ns_per_s;
    let own = question.service.as_deref().unwrap_or("");
    let servers = serving(storage, question, port, own).await?;
    // Several services on that port (one per network namespace, say): no telling which.
    let [(host, service)] = servers.as_slice() else {
        return Ok(());
    };
    let downstream = Question {
        window_id: None,
        host: Some(host.clone()),
        service: Some(service.clone()),
        window: question.window,
        baseline: question.baseline,
        exclude: question.exclude.clone(),
    };
    let answer = explain_scope(storage, &downstream, settings).await?;
    let Some(its_top) = answer.causes.iter().find(|c| c.rank == Some(1)) else {
        return Ok(());
    };
    let line = format!(
        "served by {service} on {host}: its own first cause {} +{}/s ({:.0}% of its change)",
        its_top.category,
        human_ns(its_top.change_ns_per_s),
        its_top.share * 100.0
    );
    if let Some(evidence) = report
        .causes
        .iter_mut()
        .find(|c| c.rank == Some(1))
        .and_then(|c| c.evidence.iter_mut().find(|e| e.name == peer_name))
    {
        evidence.details.push(line.clone());
    }
    // The peer's contention must be its main change and about the size of the scope's
    // extra wait on it: a peer that lost a little CPU while the path to it dropped
    // packets (the scope's wait grew by far more) explains nothing. With a hog on the
    // host and no sign of loss on the path, a significant rise is enough.
    let contention = Category::CpuContention.label();
    let main = its_top.category == contention
        && its_top.share >= MIN_DOWNSTREAM_SHARE
        && its_top.change_ns_per_s >= MIN_EXPLAINED * peer_rise;
    let hog = report
        .causes
        .iter()
        .filter(|c| c.category == contention)
        .flat_map(|c| &c.evidence)
        .find(|e| e.kind == "process" && e.change_ns_per_s() >= HOG_NS_PER_S)
        .map(|e| e.name.clone());
    let lossy = report
        .causes
        .iter()
        .flat_map(|c| &c.evidence)
        .any(|e| e.kind == "retransmits" && e.name == peer_name && e.change_ns_per_s() > 0.0);
    let starved = answer
        .causes
        .iter()
        .any(|c| c.category == contention && c.rank.is_some() && c.change_ns_per_s > 0.0);
    let line = match (&hog, main) {
        (Some(hog), false) => format!("{line}; {hog} took the CPU"),
        _ => line,
    };
    let hog_explains = hog.is_some() && !lossy && starved;
    if !(main || hog_explains) {
        return Ok(());
    }
    // The peer starved on a host the scope runs on: the scope's own CPU contention, if it
    // rose significantly, is the common cause.
    let scope_hosts = storage
        .targets(question.window)
        .await?
        .into_iter()
        .filter(|t| question.service.as_deref().is_none_or(|s| t.service == s))
        .filter(|t| question.host.as_deref().is_none_or(|h| t.host == h))
        .any(|t| t.host == *host);
    let Some(old_rank) = report
        .causes
        .iter()
        .find(|c| c.category == contention)
        .and_then(|c| c.rank)
    else {
        return Ok(());
    };
    if !scope_hosts {
        return Ok(());
    }
    for cause in &mut report.causes {
        match cause.rank {
            Some(rank) if cause.category == contention => {
                debug_assert_eq!(rank, old_rank);
                cause.rank = Some(1);
                cause.evidence.push(detail_only(
                    "downstream",
                    &format!(
                        "the wait on peer {peer_name} is {service}'s own CPU contention: {line}"
                    ),
                ));
            }
            Some(rank) if rank < old_rank => cause.rank = Some(rank + 1),
            _ => {}
        }
    }
    report
        .causes
        .sort_by_key(|c| (c.rank.is_none(), c.rank.unwrap_or(u32::MAX)));
    report.summary = summary(report, question);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_of_peer_labels() {
        assert_eq!(peer_port("10.99.0.2:7001"), Some("7001"));
        assert_eq!(peer_port("[fd00::2]:443"), Some("443"));
        assert_eq!(peer_port("10.99.0.2"), None);
        assert_eq!(peer_port("[unknown peer 0x2a]"), None);
    }
}
