//! The signal and cause names a query may filter on: what the agent writes into the
//! `signal` and `cause` labels (agent `naming.rs` and `cause.rs`). A name outside these
//! is refused before asking the collector, with the valid ones listed, instead of
//! silently matching nothing.

/// Signal labels, as stored.
pub const SIGNALS: [&str; 9] = [
    "off-cpu",
    "on-cpu",
    "runqueue",
    "lock",
    "syscall",
    "disk",
    "tcp-connect",
    "socket-wait",
    "tcp",
];

/// Cause labels: the product's cause categories.
pub const CAUSES: [&str; 6] = [
    "cpu-work",
    "cpu-contention",
    "lock",
    "disk",
    "network",
    "other",
];

fn normalized(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace(['-', '_'], "")
}

/// The stored name of signal `name`, whatever its separators (`off_cpu`, `offcpu` and
/// `off-cpu` are one); the agent's `--signals connect` is stored as `tcp-connect`.
pub fn signal(name: &str) -> Result<String, String> {
    let wanted = normalized(name);
    let wanted = if wanted == "connect" {
        normalized("tcp-connect")
    } else {
        wanted
    };
    SIGNALS
        .iter()
        .find(|known| normalized(known) == wanted)
        .map(|known| (*known).to_owned())
        .ok_or_else(|| format!("unknown signal `{name}`: use one of {}", SIGNALS.join(", ")))
}

/// The stored name of cause `name`.
pub fn cause(name: &str) -> Result<String, String> {
    let wanted = normalized(name);
    CAUSES
        .iter()
        .find(|known| normalized(known) == wanted)
        .map(|known| (*known).to_owned())
        .ok_or_else(|| format!("unknown cause `{name}`: use one of {}", CAUSES.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_and_normalized() {
        assert_eq!(signal("off_cpu").as_deref(), Ok("off-cpu"));
        assert_eq!(signal("OffCpu").as_deref(), Ok("off-cpu"));
        assert_eq!(signal("connect").as_deref(), Ok("tcp-connect"));
        let err = signal("bogus").expect_err("refused");
        assert!(err.contains("off-cpu, on-cpu"), "{err}");
        assert_eq!(cause("cpu_contention").as_deref(), Ok("cpu-contention"));
        let err = cause("bogus").expect_err("refused");
        assert!(err.contains("cpu-work, cpu-contention, lock"), "{err}");
    }
}
