//! Row types of the ClickHouse tables, serialized as `RowBinary`, and the partition
//! names they fall in.

use clickhouse::Row;
use serde::{Deserialize, Serialize};

#[derive(Row, Serialize, Deserialize)]
pub(super) struct SampleRow {
    pub(super) series: i64,
    pub(super) ts: u32,
    pub(super) stack: i64,
    pub(super) batch: i64,
    pub(super) value: i64,
    pub(super) count: i64,
}

/// One attempt to write a batch's sample rows (see `ClickHouseStore::needs_final`).
#[derive(Row, Serialize, Deserialize)]
pub(super) struct RowWrite {
    pub(super) ts: u32,
    pub(super) agent: String,
    pub(super) sequence: u64,
}

#[derive(Row, Serialize, Deserialize)]
pub(super) struct StackRow {
    pub(super) id: i64,
    pub(super) frames: Vec<u8>,
}

#[derive(Row, Serialize, Deserialize)]
pub(super) struct SeriesRow {
    pub(super) id: i64,
    pub(super) ts: u32,
    pub(super) agent: String,
    pub(super) host: String,
    pub(super) signal: String,
    pub(super) service: String,
    pub(super) process: String,
    pub(super) pid: String,
    pub(super) cause: String,
    pub(super) labels: String,
}

#[derive(Row, Serialize, Deserialize)]
pub(super) struct SignalRow {
    pub(super) name: String,
    pub(super) value_kind: String,
    pub(super) value_unit: String,
    pub(super) count_kind: String,
    pub(super) count_unit: String,
}

#[derive(Row, Serialize, Deserialize)]
pub(super) struct BatchRow {
    pub(super) agent: String,
    pub(super) sequence: u64,
    pub(super) host: String,
    pub(super) start_ns: i64,
    pub(super) duration_ns: i64,
    pub(super) rows: u64,
    pub(super) spool_dropped_total: u64,
    pub(super) losses: String,
    pub(super) received_ns: i64,
}

#[derive(Row, Serialize, Deserialize)]
pub(super) struct TierRow {
    pub(super) tier: u8,
    pub(super) until: u32,
}

/// `YYYYMMDD` of a Unix time (UTC), as ClickHouse's `toYYYYMMDD` partition names it.
pub(super) fn day_number(unix_s: i64) -> i64 {
    // Civil-from-days (Howard Hinnant's algorithm).
    let days = unix_s.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    y * 10_000 + m * 100 + d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_numbers_match_clickhouse_partitions() {
        assert_eq!(day_number(0), 19_700_101);
        assert_eq!(day_number(1_795_930_500), 20_261_129);
        assert_eq!(day_number(951_782_400), 20_000_229);
    }
}
