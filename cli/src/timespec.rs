//! Times on the command line: `now`, a duration before now (`15m`, `2h`, `1d`), Unix
//! seconds, or RFC 3339 (`2026-11-29T05:30:00Z`, with an optional offset).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};

const NS: i64 = 1_000_000_000;

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Parses a positive duration with its unit: `30s`, `15m`, `2h`, `1d`, `500ms`. A bare
/// number is refused (seconds or minutes? the reader cannot tell), and so are zero and
/// negative durations.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    if text.starts_with('-') {
        bail!("`{text}`: a duration must be positive, e.g. 30s, 15m, 2h or 1d");
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("`{text}` is not a duration such as 30s, 15m, 2h or 1d"))?;
    let seconds = number
        * match unit.trim() {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            "" => bail!("`{text}` has no unit: write {text}s, {text}m, {text}h or {text}d"),
            other => bail!("`{text}`: unknown unit `{other}` (use ms, s, m, h or d)"),
        };
    if seconds <= 0.0 {
        bail!("`{text}`: a duration must be longer than zero");
    }
    if seconds > 1e10 {
        bail!("`{text}` is out of range");
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// [`parse_duration`] for clap.
pub fn duration_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|err| err.to_string())
}

/// Parses a point in time (see the module docs) relative to `now_ns`.
pub fn parse_time(text: &str, now_ns: i64) -> anyhow::Result<i64> {
    let text = text.trim();
    if text == "now" {
        return Ok(now_ns);
    }
    if text.len() >= 9 && text.chars().all(|c| c.is_ascii_digit()) {
        let seconds: i64 = text.parse().context("Unix seconds")?;
        return Ok(seconds.saturating_mul(NS));
    }
    if text.contains('T') || (text.len() >= 10 && text.as_bytes().get(4) == Some(&b'-')) {
        return parse_rfc3339(text);
    }
    let ago = text
        .strip_suffix(" ago")
        .unwrap_or(text)
        .trim_start_matches('-');
    let duration = parse_duration(ago).with_context(|| {
        format!("`{text}` is not a time: use now, a duration before now (15m), Unix seconds or RFC 3339 (2026-11-29T05:30:00Z)")
    })?;
    Ok(now_ns - i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX))
}

fn parse_rfc3339(text: &str) -> anyhow::Result<i64> {
    let bad = || anyhow::anyhow!("`{text}` is not RFC 3339 time like 2026-11-29T05:30:00Z");
    let (date, rest) = text.split_at(text.find(['T', ' ']).unwrap_or(text.len()));
    let mut parts = date.split('-').map(str::parse::<i64>);
    let (Some(Ok(year)), Some(Ok(month)), Some(Ok(day))) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let rest = rest.trim_start_matches(['T', ' ']);
    let (clock, offset_s) = if let Some(clock) = rest.strip_suffix('Z') {
        (clock, 0)
    } else if let Some(position) = rest.rfind(['+', '-']).filter(|&p| p > 0) {
        let (clock, offset) = rest.split_at(position);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let mut hm = offset[1..].split(':').map(str::parse::<i64>);
        let hours = hm.next().and_then(Result::ok).ok_or_else(bad)?;
        let minutes = hm.next().and_then(Result::ok).unwrap_or(0);
        (clock, sign * (hours * 3600 + minutes * 60))
    } else {
        (rest, 0)
    };
    let mut hms = clock.split(':');
    let hour: i64 = hms
        .next()
        .filter(|h| !h.is_empty())
        .map_or(Ok(0), str::parse)
        .map_err(|_| bad())?;
    let minute: i64 = hms.next().map_or(Ok(0), str::parse).map_err(|_| bad())?;
    let second: f64 = hms.next().map_or(Ok(0.0), str::parse).map_err(|_| bad())?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || !(0.0..61.0).contains(&second)
    {
        return Err(bad());
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 - offset_s;
    Ok(seconds * NS + (second * 1e9) as i64)
}

/// Formats Unix nanoseconds as RFC 3339 UTC, to the second.
pub fn format_time(unix_ns: i64) -> String {
    let seconds = unix_ns.div_euclid(NS);
    let days = seconds.div_euclid(86_400);
    let in_day = seconds.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_every_form() {
        let now = 1_800_000_000 * NS;
        assert_eq!(parse_time("now", now).expect("now"), now);
        assert_eq!(parse_time("15m", now).expect("ago"), now - 900 * NS);
        assert_eq!(
            parse_time("1700000000", now).expect("unix"),
            1_700_000_000 * NS
        );
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z", now).expect("rfc3339"),
            1_700_000_000 * NS
        );
        assert_eq!(
            parse_time("2023-11-14T23:13:20+01:00", now).expect("offset"),
            1_700_000_000 * NS
        );
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("10", now).is_err(), "a bare number has no unit");
        assert!(parse_time("2023-13-01T00:00:00Z", now).is_err());
        assert_eq!(format_time(1_700_000_000 * NS), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn durations_need_a_unit_and_a_positive_length() {
        assert_eq!(parse_duration("90s").expect("90s"), Duration::from_secs(90));
        assert_eq!(
            parse_duration("500ms").expect("ms"),
            Duration::from_millis(500)
        );
        let no_unit = parse_duration("10").expect_err("bare number");
        assert!(no_unit.to_string().contains("has no unit"), "{no_unit}");
        let zero = parse_duration("0s").expect_err("zero");
        assert!(zero.to_string().contains("longer than zero"), "{zero}");
        let negative = parse_duration("-5s").expect_err("negative");
        assert!(negative.to_string().contains("positive"), "{negative}");
        assert!(parse_duration("5 parsecs").is_err());
    }
}
