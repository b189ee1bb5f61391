//! The TOML configuration file (`--config`): every key optional, unknown keys refused,
//! durations written as `500ms`, `10s`, `2m`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{ConfigError, parse_duration};
use crate::{probes::SchedHookChoice, process::identity::ServiceRule};

fn deserialize_duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    let text = Option::<String>::deserialize(deserializer)?;
    text.map(|text| parse_duration(&text).map_err(serde::de::Error::custom))
        .transpose()
}

/// The TOML configuration file. Every field is optional; flags override it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Signals to capture, e.g. `["offcpu", "oncpu"]`.
    pub signals: Option<Vec<String>>,
    #[serde(default)]
    pub offcpu: OffCpuFile,
    #[serde(default)]
    pub oncpu: OnCpuFile,
    #[serde(default)]
    pub lock: LockFile,
    #[serde(default)]
    pub syscall: SyscallFile,
    #[serde(default)]
    pub network: NetworkFile,
    #[serde(default)]
    pub probes: ProbesFile,
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub drain_interval: Option<Duration>,
    #[serde(default)]
    pub identity: IdentityFile,
    #[serde(default)]
    pub symbols: SymbolsFile,
}

/// `[symbols]`: how user stacks are symbolized.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymbolsFile {
    /// Binaries with more DWARF than this many megabytes are symbolized from their
    /// symbol tables (function names only); bounds the memory one symbolization takes.
    /// 0: never read DWARF.
    pub dwarf_max_mb: Option<u64>,
}

/// `[identity]`: how processes are named and what is read about them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// Collect command lines (secret-looking values redacted). Off by default.
    pub cmdline: Option<bool>,
    /// `[[identity.service]]` rules naming the `service` label; the first match wins.
    #[serde(default)]
    pub service: Vec<ServiceRule>,
    /// Deadline of one read of another process's files (`/proc`, its binaries).
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub read_deadline: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffCpuFile {
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub stack_threshold: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub stack_threshold: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyscallFile {
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub slow_threshold: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkFile {
    /// Socket syscalls shorter than this are not socket waits.
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub min_wait: Option<Duration>,
    /// Socket waits at least this long always get stacks; shorter ones are sampled.
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub stack_threshold: Option<Duration>,
    /// A TCP connection's smoothed RTT is sampled at most once per this interval.
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub rtt_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnCpuFile {
    pub frequency_hz: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbesFile {
    pub sched_hook: Option<SchedHookChoice>,
    pub btf: Option<PathBuf>,
    pub max_threads: Option<u32>,
    pub max_totals: Option<u32>,
    pub max_samples: Option<u32>,
    pub max_stacks: Option<u32>,
    pub max_pending: Option<u32>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: err.message().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_file_keys_are_rejected() {
        let err = toml::from_str::<FileConfig>("sampling = 3").expect_err("unknown key");
        assert!(err.to_string().contains("sampling"), "{err}");
    }
}
