//! What a page's URL says: the time range (absolute, so a link pasted into a ticket shows
//! the same period tomorrow; `now-1h` style only as typed shortcuts), the scope and the
//! filters, and the links pages build from them.

use crate::{storage::parse_span, windows::rfc3339};

const NS: i64 = 1_000_000_000;

/// A query string or form body, as (key, value) pairs in order.
#[derive(Debug, Clone, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(query: Option<&str>) -> Self {
        Self::parse_form(query.unwrap_or_default().as_bytes())
    }

    pub fn parse_form(bytes: &[u8]) -> Self {
        Self(
            form_urlencoded::parse(bytes)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The first non-empty value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == key && !v.trim().is_empty())
            .map(|(_, v)| v.trim())
    }

    /// Every non-empty value of `key`.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, v)| k == key && !v.trim().is_empty())
            .map(|(_, v)| v.trim())
            .collect()
    }
}

/// `path?k=v&...`, values percent-encoded; empty values left out.
pub fn href(path: &str, pairs: &[(&str, &str)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (key, value) in pairs {
        if !value.is_empty() {
            query.append_pair(key, value);
            any = true;
        }
    }
    if any {
        format!("{path}?{}", query.finish())
    } else {
        path.to_owned()
    }
}

/// Unix nanoseconds of a time as URLs carry it: RFC 3339, Unix seconds, `now`, or
/// `now-<span>` (`now-15m`, `now-24h`).
pub fn parse_time(text: &str, now_ns: i64) -> Result<i64, String> {
    let text = text.trim();
    if text == "now" {
        return Ok(now_ns);
    }
    if let Some(span) = text.strip_prefix("now-") {
        let span = parse_span(span)?;
        let span_ns = i64::try_from(span.as_nanos()).unwrap_or(i64::MAX);
        return Ok(now_ns.saturating_sub(span_ns));
    }
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<i64>()
            .ok()
            .and_then(|s| s.checked_mul(NS))
            .ok_or_else(|| format!("`{text}` is not a time"));
    }
    rfc3339::parse(text)?.ok_or_else(|| format!("`{text}` is before 1970"))
}

/// The time as URLs and pages show it: RFC 3339 UTC, to the second.
pub fn format_time(unix_ns: i64) -> String {
    rfc3339::format(unix_ns.div_euclid(NS) * NS)
}

/// The time for people: `2026-12-06 14:02:05 UTC`.
pub fn human_time(unix_ns: i64) -> String {
    format_time(unix_ns).replace('T', " ").replace('Z', " UTC")
}

/// A half-open time range in Unix nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub from_ns: i64,
    pub until_ns: i64,
}

impl Range {
    pub fn seconds(&self) -> f64 {
        (self.until_ns - self.from_ns) as f64 / NS as f64
    }

    pub fn proto(&self) -> stallscope_proto::v1::TimeRange {
        stallscope_proto::v1::TimeRange {
            from_unix_ns: self.from_ns,
            until_unix_ns: self.until_ns,
        }
    }

    /// `from..until` as the `base` parameter carries it.
    pub fn text(&self) -> String {
        format!(
            "{}..{}",
            format_time(self.from_ns),
            format_time(self.until_ns)
        )
    }

    /// Parses `from..until` (each as [`parse_time`] reads it).
    pub fn parse(text: &str, now_ns: i64) -> Result<Self, String> {
        let (from, until) = text
            .split_once("..")
            .ok_or_else(|| format!("`{text}` is not a range FROM..UNTIL"))?;
        Self::checked(parse_time(from, now_ns)?, parse_time(until, now_ns)?)
    }

    fn checked(from_ns: i64, until_ns: i64) -> Result<Self, String> {
        if until_ns <= from_ns {
            return Err(format!(
                "the range must end after it starts ({} is not after {})",
                format_time(until_ns),
                format_time(from_ns)
            ));
        }
        Ok(Self { from_ns, until_ns })
    }
}

/// The page's range from `from_key` and `until_key`, `default_span` back from now when
/// they are absent.
pub fn range(
    params: &Params,
    from_key: &str,
    until_key: &str,
    default_span_s: i64,
    now_ns: i64,
) -> Result<Range, String> {
    let until = match params.get(until_key) {
        Some(text) => parse_time(text, now_ns).map_err(|e| format!("{until_key}: {e}"))?,
        None => now_ns,
    };
    let from = match params.get(from_key) {
        Some(text) => parse_time(text, now_ns).map_err(|e| format!("{from_key}: {e}"))?,
        None => until - default_span_s * NS,
    };
    Range::checked(from, until)
}

/// An optional second range (`sel_from`/`sel_until`): both or neither.
pub fn optional_range(
    params: &Params,
    from_key: &str,
    until_key: &str,
    now_ns: i64,
) -> Result<Option<Range>, String> {
    match (params.get(from_key), params.get(until_key)) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => range(params, from_key, until_key, 0, now_ns).map(Some),
        _ => Err(format!("give both {from_key} and {until_key}, or neither")),
    }
}

/// A readable length: `45 s`, `5 min`, `2 h`, `3 d`.
pub fn human_span(seconds: i64) -> String {
    match seconds {
        s if s % 86_400 == 0 && s >= 86_400 => format!("{} d", s / 86_400),
        s if s % 3600 == 0 && s >= 3600 => format!("{} h", s / 3600),
        s if s % 60 == 0 && s >= 60 => format!("{} min", s / 60),
        s if s >= 3600 => format!("{:.1} h", s as f64 / 3600.0),
        s if s >= 120 => format!("{:.1} min", s as f64 / 60.0),
        s => format!("{s} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_765_000_000 * NS;

    #[test]
    fn times_read_every_way_urls_write_them() {
        assert_eq!(parse_time("now", NOW), Ok(NOW));
        assert_eq!(parse_time("now-15m", NOW), Ok(NOW - 900 * NS));
        assert_eq!(parse_time("1765000000", NOW), Ok(NOW));
        let text = format_time(NOW + 123);
        assert_eq!(text, "2025-12-06T05:46:40Z");
        assert_eq!(parse_time(&text, 0), Ok(NOW));
        assert!(parse_time("yesterday", NOW).is_err());
        assert!(parse_time("now-5x", NOW).is_err());
    }

    #[test]
    fn ranges_default_and_refuse_backwards() {
        let params = Params::parse(Some("from=now-2h&until=now-1h"));
        let range = range(&params, "from", "until", 3600, NOW).expect("valid");
        assert_eq!(range.until_ns - range.from_ns, 3600 * NS);
        let default = super::range(&Params::default(), "from", "until", 900, NOW).expect("ok");
        assert_eq!((default.from_ns, default.until_ns), (NOW - 900 * NS, NOW));
        let backwards = Params::parse(Some("from=now&until=now-1h"));
        assert!(super::range(&backwards, "from", "until", 60, NOW).is_err());
        let half = Params::parse(Some("sel_from=now-1m"));
        assert!(optional_range(&half, "sel_from", "sel_until", NOW).is_err());
        let parsed = Range::parse(&range.text(), NOW).expect("round trip");
        assert_eq!(parsed, range);
    }

    #[test]
    fn links_encode_what_they_carry() {
        assert_eq!(
            href("/service", &[("service", "<img src=x>&a"), ("host", "")]),
            "/service?service=%3Cimg+src%3Dx%3E%26a"
        );
        let params = Params::parse(Some(
            "service=%3Cimg+src%3Dx%3E%26a&label=a%3Db&label=c%3Dd",
        ));
        assert_eq!(params.get("service"), Some("<img src=x>&a"));
        assert_eq!(params.all("label"), ["a=b", "c=d"]);
        assert_eq!(human_span(300), "5 min");
        assert_eq!(human_span(86_400), "1 d");
        assert_eq!(human_span(45), "45 s");
    }
}
