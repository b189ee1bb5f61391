//! The signals the agent can capture, by their command-line names, and the parsing of
//! signal lists (`offcpu,oncpu`, `network` for the three network signals).

use std::{collections::BTreeSet, fmt, str::FromStr};

use super::ConfigError;

/// A signal the agent can capture, by its command-line name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SignalName {
    OffCpu,
    OnCpu,
    RunQueue,
    Lock,
    Syscall,
    Disk,
    Connect,
    SocketWait,
    Tcp,
}

impl SignalName {
    pub const ALL: [Self; 9] = [
        Self::OffCpu,
        Self::OnCpu,
        Self::RunQueue,
        Self::Lock,
        Self::Syscall,
        Self::Disk,
        Self::Connect,
        Self::SocketWait,
        Self::Tcp,
    ];
    pub const NAMES: [&'static str; 10] = [
        "offcpu",
        "oncpu",
        "runqueue",
        "lock",
        "syscall",
        "disk",
        "connect",
        "socket-wait",
        "tcp",
        "network (= connect, socket-wait, tcp)",
    ];
    /// What `network` stands for.
    pub const NETWORK: [Self; 3] = [Self::Connect, Self::SocketWait, Self::Tcp];
    /// What `record` captures when no signal is named.
    pub const DEFAULT: [Self; 2] = [Self::OffCpu, Self::OnCpu];
    /// What `run` captures when no signal is named: what `why` needs to tell every cause
    /// category apart and name its object (which lock, which device, which peer, CPU
    /// contention per wakeup, retransmits and RTT per peer). Syscall latency, the
    /// costliest signal, is left to ask for.
    pub const RUN_DEFAULT: [Self; 8] = [
        Self::OffCpu,
        Self::OnCpu,
        Self::RunQueue,
        Self::Lock,
        Self::Disk,
        Self::Connect,
        Self::SocketWait,
        Self::Tcp,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::OffCpu => "offcpu",
            Self::OnCpu => "oncpu",
            Self::RunQueue => "runqueue",
            Self::Lock => "lock",
            Self::Syscall => "syscall",
            Self::Disk => "disk",
            Self::Connect => "connect",
            Self::SocketWait => "socket-wait",
            Self::Tcp => "tcp",
        }
    }

    /// The probes' signal.
    pub const fn signal(self) -> agent_common::Signal {
        match self {
            Self::OffCpu => agent_common::Signal::OffCpu,
            Self::OnCpu => agent_common::Signal::OnCpu,
            Self::RunQueue => agent_common::Signal::RunQueue,
            Self::Lock => agent_common::Signal::Lock,
            Self::Syscall => agent_common::Signal::Syscall,
            Self::Disk => agent_common::Signal::Disk,
            Self::Connect => agent_common::Signal::Connect,
            Self::SocketWait => agent_common::Signal::SocketWait,
            Self::Tcp => agent_common::Signal::Tcp,
        }
    }
}

impl fmt::Display for SignalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SignalName {
    type Err = ConfigError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name
            .trim()
            .to_ascii_lowercase()
            .replace(['-', '_'], "")
            .as_str()
        {
            "offcpu" => Ok(Self::OffCpu),
            "oncpu" => Ok(Self::OnCpu),
            "runqueue" | "rq" => Ok(Self::RunQueue),
            "lock" | "locks" => Ok(Self::Lock),
            "syscall" | "syscalls" => Ok(Self::Syscall),
            "disk" | "io" => Ok(Self::Disk),
            "connect" | "tcpconnect" => Ok(Self::Connect),
            "socketwait" | "socketwaits" | "socket" => Ok(Self::SocketWait),
            "tcp" => Ok(Self::Tcp),
            _ => Err(ConfigError::UnknownSignal(name.trim().to_owned())),
        }
    }
}

/// Parses a comma-separated signal list such as `offcpu,oncpu` (`network` names the three
/// network signals).
pub fn parse_signals(list: &str) -> Result<BTreeSet<SignalName>, ConfigError> {
    let mut signals = BTreeSet::new();
    for part in list.split(',').filter(|part| !part.trim().is_empty()) {
        let name = part.trim().to_ascii_lowercase();
        if name == "network" || name == "net" {
            signals.extend(SignalName::NETWORK);
        } else {
            signals.insert(SignalName::from_str(part)?);
        }
    }
    if signals.is_empty() {
        return Err(ConfigError::NoSignals);
    }
    Ok(signals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        let all = parse_signals("offcpu, on-cpu,runqueue,lock,syscall,disk").expect("valid");
        assert_eq!(all.len(), 6);
        let network = parse_signals("network,disk").expect("valid");
        assert_eq!(network.len(), 4);
        assert!(network.contains(&SignalName::SocketWait));
        let one = parse_signals("socket-wait").expect("valid");
        assert_eq!(
            one.into_iter().collect::<Vec<_>>(),
            [SignalName::SocketWait]
        );
        let err = parse_signals("offcpu,bogus").expect_err("invalid");
        assert!(err.to_string().contains("unknown signal `bogus`"), "{err}");
        assert!(matches!(parse_signals(" , "), Err(ConfigError::NoSignals)));
    }
}
