//! RFC 3339 timestamps as Alertmanager writes them (`2026-12-06T04:10:00.123456789Z`,
//! or with an offset), to Unix nanoseconds, exactly (no floating point). Go's zero time
//! (`0001-01-01T00:00:00Z`, what Alertmanager sends as the end of a firing alert) and
//! anything before 1970 read as "not set".

const NS: i64 = 1_000_000_000;

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn number(text: &str, what: &str, digits: usize) -> Result<i64, String> {
    if text.len() != digits || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("the {what} is not {digits} digits"));
    }
    text.parse()
        .map_err(|_| format!("the {what} is not a number"))
}

/// Unix nanoseconds of `text`; `None` for a time before 1970 (Go's zero time).
pub fn parse(text: &str) -> Result<Option<i64>, String> {
    let bad = |reason: String| {
        format!(
            "`{}` is not an RFC 3339 time: {reason}",
            text.escape_debug()
        )
    };
    if !text.is_ascii() || text.len() < 20 {
        return Err(bad(
            "expected YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)".to_owned()
        ));
    }
    let field = |range: std::ops::Range<usize>, what: &str| {
        number(&text[range.clone()], what, range.len()).map_err(bad)
    };
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if separators
        .iter()
        .any(|&(at, sep)| text.as_bytes()[at] != sep)
        || !matches!(text.as_bytes()[10], b'T' | b't' | b' ')
    {
        return Err(bad("expected YYYY-MM-DDTHH:MM:SS".to_owned()));
    }
    let (year, month, day) = (
        field(0..4, "year")?,
        field(5..7, "month")?,
        field(8..10, "day")?,
    );
    let (hour, minute, second) = (
        field(11..13, "hour")?,
        field(14..16, "minute")?,
        field(17..19, "second")?,
    );
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(bad("a field is out of range".to_owned()));
    }
    let mut rest = &text[19..];
    let mut nanos = 0_i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad("a decimal point without digits".to_owned()));
        }
        for (index, digit) in fraction.bytes().take(digits).enumerate() {
            if index < 9 {
                nanos = nanos * 10 + i64::from(digit - b'0');
            }
        }
        for _ in digits..9 {
            nanos *= 10;
        }
        rest = &fraction[digits..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':' =>
        {
            let hours = number(&rest[1..3], "offset hours", 2).map_err(bad)?;
            let minutes = number(&rest[4..6], "offset minutes", 2).map_err(bad)?;
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (hours * 3600 + minutes * 60)
        }
        _ => return Err(bad("expected Z or an offset ±HH:MM at the end".to_owned())),
    };
    let seconds =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    if seconds < 0 {
        return Ok(None);
    }
    Ok(Some(seconds.saturating_mul(NS).saturating_add(nanos)))
}

/// Unix nanoseconds as RFC 3339 UTC with nanoseconds (for logs and messages).
pub fn format(unix_ns: i64) -> String {
    let seconds = unix_ns.div_euclid(NS);
    let nanos = unix_ns.rem_euclid(NS);
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
    let clock = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60
    );
    if nanos == 0 {
        format!("{clock}Z")
    } else {
        format!("{clock}.{nanos:09}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alertmanager_times_parse_exactly() {
        assert_eq!(parse("2023-11-14T22:13:20Z"), Ok(Some(1_700_000_000 * NS)));
        assert_eq!(
            parse("2023-11-14T22:13:20.123456789Z"),
            Ok(Some(1_700_000_000 * NS + 123_456_789))
        );
        assert_eq!(
            parse("2023-11-14T22:13:20.5Z"),
            Ok(Some(1_700_000_000 * NS + 500_000_000))
        );
        assert_eq!(
            parse("2023-11-14T23:43:20.000+01:30"),
            Ok(Some(1_700_000_000 * NS))
        );
        assert_eq!(parse("0001-01-01T00:00:00Z"), Ok(None));
        for bad in [
            "",
            "yesterday",
            "2023-11-14",
            "2023-13-14T22:13:20Z",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20+0100",
            "2023-11-14T22:1x:20Z",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(format(1_700_000_000 * NS), "2023-11-14T22:13:20Z");
        assert_eq!(
            format(1_700_000_000 * NS + 5),
            "2023-11-14T22:13:20.000000005Z"
        );
    }
}
