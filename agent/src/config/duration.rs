//! Durations as the agent reads them from flags and its configuration file: a positive
//! number with a unit, nothing else.

use std::time::Duration;

use serde::Deserialize as _;

use super::ConfigError;

/// Parses a positive duration with its unit: `500ms`, `10s`, `2m`, `1h`, `250us`,
/// `100ns`. A bare number is refused (`10` could mean anything), as are zero and
/// negative durations.
pub fn parse_duration(text: &str) -> Result<Duration, ConfigError> {
    let text = text.trim();
    if text.starts_with('-') {
        return Err(ConfigError::DurationNotPositive(text.to_owned()));
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| ConfigError::Duration(text.to_owned()))?;
    if number == 0.0 {
        return Err(ConfigError::DurationNotPositive(text.to_owned()));
    }
    let seconds_per_unit = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "" => return Err(ConfigError::DurationUnit(text.to_owned())),
        _ => return Err(ConfigError::Duration(text.to_owned())),
    };
    let seconds = number * seconds_per_unit;
    if !seconds.is_finite() || seconds > 1e9 {
        return Err(ConfigError::Duration(text.to_owned()));
    }
    let duration = Duration::from_secs_f64(seconds);
    if duration.is_zero() {
        return Err(ConfigError::DurationNotPositive(text.to_owned()));
    }
    Ok(duration)
}

/// [`parse_duration`] of a duration given with `flag` (or another named setting), naming
/// it in errors: a value that is no duration at all says how to write one, a bare
/// number or a duration that is not positive says what is wrong with it.
pub fn flag_duration(flag: &'static str, text: &str) -> Result<Duration, ConfigError> {
    parse_duration(text).map_err(|source| match source {
        ConfigError::Duration(value) => ConfigError::FlagDuration { flag, value },
        source => ConfigError::Setting {
            what: flag,
            source: Box::new(source),
        },
    })
}

/// A duration in the TOML file, such as `"500ms"`.
pub(super) fn deserialize_duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    let text = Option::<String>::deserialize(deserializer)?;
    text.map(|text| parse_duration(&text).map_err(serde::de::Error::custom))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").expect("10s"), Duration::from_secs(10));
        assert_eq!(
            parse_duration("500ms").expect("ms"),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("2m").expect("m"), Duration::from_secs(120));
        assert_eq!(
            parse_duration("1.5s").expect("fraction"),
            Duration::from_millis(1500)
        );
        assert_eq!(
            parse_duration("250us").expect("us"),
            Duration::from_micros(250)
        );
        for bad in ["", "ten", "5 parsecs", "1e400s"] {
            assert!(
                matches!(parse_duration(bad), Err(ConfigError::Duration(_))),
                "{bad}"
            );
        }
        // A bare number, zero and negative durations each get their own one-line error.
        let bare = parse_duration("10").expect_err("no unit").to_string();
        assert_eq!(
            bare,
            "duration `10` has no unit: write 10s for seconds (or ms, m, h)"
        );
        for not_positive in ["0s", "0", "0.0ms", "-5s", "-1"] {
            let err = parse_duration(not_positive).expect_err("not positive");
            assert!(
                matches!(err, ConfigError::DurationNotPositive(_)),
                "{not_positive}: {err}"
            );
        }
        let named = flag_duration("--duration", "0s").expect_err("zero");
        assert_eq!(
            named.to_string(),
            "--duration: duration `0s` is not positive: give one above zero, e.g. 10s"
        );
        let named = flag_duration("--flush-timeout", "later").expect_err("no duration");
        assert_eq!(
            named.to_string(),
            "invalid duration `later` for --flush-timeout: use a number with a unit, e.g. 500ms, 10s, 2m, 1h"
        );
    }
}
