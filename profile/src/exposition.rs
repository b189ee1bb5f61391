//! The Prometheus text exposition format (version 0.0.4), written by hand for the
//! agent's and the collector's `/metrics`: metric families with `# HELP` and `# TYPE`,
//! escaped label values, histograms with cumulative buckets, and the standard
//! `process_*` metrics of the serving process read from `/proc/self`.

use std::fmt::Write as _;

/// The `Content-Type` of a text exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// A histogram's state: upper bounds (seconds, ascending, without `+Inf`) with the
/// count of observations in each bucket (not cumulative), the sum and the total count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramValues {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

/// One exposition being written. Families must be written whole, one after another.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the family `name`: its help text and type.
    pub fn family(&mut self, name: &str, kind: MetricKind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {}", kind.as_str());
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        write_labels(&mut self.text, labels, None);
        self.text.push(' ');
        write_value(&mut self.text, value);
        self.text.push('\n');
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: MetricKind, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The samples of one histogram of the current family (`name` without suffix).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], values: &HistogramValues) {
        let mut cumulative = 0u64;
        for &(bound, count) in &values.buckets {
            cumulative += count;
            let mut le = String::new();
            write_value(&mut le, bound);
            self.text.push_str(name);
            self.text.push_str("_bucket");
            write_labels(&mut self.text, labels, Some(&le));
            let _ = writeln!(self.text, " {cumulative}");
        }
        self.text.push_str(name);
        self.text.push_str("_bucket");
        write_labels(&mut self.text, labels, Some("+Inf"));
        let _ = writeln!(self.text, " {}", values.count);
        self.text.push_str(name);
        self.text.push_str("_sum");
        write_labels(&mut self.text, labels, None);
        self.text.push(' ');
        write_value(&mut self.text, values.sum);
        self.text.push('\n');
        self.text.push_str(name);
        self.text.push_str("_count");
        write_labels(&mut self.text, labels, None);
        let _ = writeln!(self.text, " {}", values.count);
    }

    /// `process_cpu_seconds_total`, `process_resident_memory_bytes`,
    /// `process_virtual_memory_bytes`, `process_start_time_seconds` and
    /// `process_open_fds` of this process (those it can read).
    pub fn process_metrics(&mut self) {
        let Some(stat) = ProcessStat::read() else {
            return;
        };
        self.single(
            "process_cpu_seconds_total",
            MetricKind::Counter,
            "User and system CPU time spent, in seconds.",
            stat.cpu_seconds,
        );
        self.single(
            "process_resident_memory_bytes",
            MetricKind::Gauge,
            "Resident memory size in bytes.",
            stat.resident_bytes as f64,
        );
        self.single(
            "process_virtual_memory_bytes",
            MetricKind::Gauge,
            "Virtual memory size in bytes.",
            stat.virtual_bytes as f64,
        );
        if let Some(start) = stat.start_time_seconds {
            self.single(
                "process_start_time_seconds",
                MetricKind::Gauge,
                "Start time of the process since the Unix epoch, in seconds.",
                start,
            );
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.single(
                "process_open_fds",
                MetricKind::Gauge,
                "Number of open file descriptors.",
                fds.count() as f64,
            );
        }
    }

    /// The finished text.
    pub fn finish(self) -> String {
        self.text
    }
}

fn write_labels(text: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    text.push('{');
    let mut first = true;
    for (key, value) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
        if !first {
            text.push(',');
        }
        first = false;
        text.push_str(key);
        text.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => text.push_str("\\\\"),
                '"' => text.push_str("\\\""),
                '\n' => text.push_str("\\n"),
                c => text.push(c),
            }
        }
        text.push('"');
    }
    text.push('}');
}

fn write_value(text: &mut String, value: f64) {
    if value.is_nan() {
        text.push_str("NaN");
    } else if value.is_infinite() {
        text.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        let _ = write!(text, "{}", value as i64);
    } else {
        let _ = write!(text, "{value}");
    }
}

/// What `/proc/self/stat` says about this process's CPU and memory.
struct ProcessStat {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time_seconds: Option<f64>,
}

impl ProcessStat {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The fields after the command name, which may itself hold spaces and parens.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // Field numbers of proc(5), counted from 1 with the pid; `fields[0]` is field 3.
        let field = |number: usize| -> Option<u64> { fields.get(number - 3)?.parse().ok() };
        // SAFETY: sysconf only reads configuration values; no pointers involved.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
        let page = u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096);
        let cpu_seconds = (field(14)? + field(15)?) as f64 / ticks;
        let start_time_seconds = field(22).and_then(|start_ticks| {
            let boot = std::fs::read_to_string("/proc/stat").ok()?;
            let btime: f64 = boot
                .lines()
                .find_map(|line| line.strip_prefix("btime "))?
                .trim()
                .parse()
                .ok()?;
            Some(btime + start_ticks as f64 / ticks)
        });
        Some(Self {
            cpu_seconds,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            start_time_seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_labels_and_histograms() {
        let mut out = Exposition::new();
        out.family("x_total", MetricKind::Counter, "Things.\nMore.");
        out.sample("x_total", &[("reason", "a\"b\\c\nd")], 3.0);
        out.sample("x_total", &[], 0.25);
        out.family("lat_seconds", MetricKind::Histogram, "Latency.");
        out.histogram(
            "lat_seconds",
            &[("to", "c")],
            &HistogramValues {
                buckets: vec![(0.1, 2), (1.0, 1)],
                sum: 0.7,
                count: 4,
            },
        );
        let text = out.finish();
        assert_eq!(
            text,
            "# HELP x_total Things.\\nMore.\n# TYPE x_total counter\n\
             x_total{reason=\"a\\\"b\\\\c\\nd\"} 3\nx_total 0.25\n\
             # HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\n\
             lat_seconds_bucket{to=\"c\",le=\"0.1\"} 2\nlat_seconds_bucket{to=\"c\",le=\"1\"} 3\n\
             lat_seconds_bucket{to=\"c\",le=\"+Inf\"} 4\nlat_seconds_sum{to=\"c\"} 0.7\n\
             lat_seconds_count{to=\"c\"} 4\n"
        );
    }

    #[test]
    fn own_process_metrics_are_read() {
        let mut out = Exposition::new();
        out.process_metrics();
        let text = out.finish();
        let rss: f64 = text
            .lines()
            .find_map(|line| line.strip_prefix("process_resident_memory_bytes "))
            .and_then(|value| value.parse().ok())
            .expect("rss line");
        assert!(rss > 1e5, "{text}");
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
    }
}
