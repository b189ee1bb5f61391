//! The hourly rollup tier of the SQLite backend: per (service, hour, series) the sums per
//! stack of the rows in `samples` (a blob, as there), so a long range reads one row per hour instead of one per 10 s
//! bucket. `samples` stays the source of truth; the rollup is an index over it whose
//! valid span `[from, until)` (whole hours) is stored in `meta` next to it.
//!
//! Invariant, at every commit: for every hour `H` in the span, the rollup's rows for `H`
//! are exactly the sums of the `samples` rows whose bucket starts in `[H, H + 1 h)`.
//! - The maintenance pass extends the span up to the last complete hour, summing those
//!   hours from `samples` in its transaction.
//! - A batch whose bucket falls into the span (it arrived after its hour was rolled up)
//!   adds its rows to the rollup in the transaction that stores it.
//! - Downsampling into a tier whose resolution divides an hour keeps every row in its
//!   hour; downsampling into any other tier, and deletion, move the span's start past
//!   the rows touched (and drop the rollup rows before it).

use rusqlite::{Transaction, params};

/// Seconds in a rollup bucket.
pub const HOUR_S: i64 = 3600;

/// The hours the rollup is valid for, `[from, until)`, both hour-aligned Unix seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollupSpan {
    pub from: i64,
    pub until: i64,
}

impl RollupSpan {
    /// Whether rows of the bucket starting at `ts` belong in the rollup.
    pub fn covers(&self, ts: i64) -> bool {
        self.from <= ts && ts < self.until
    }

    /// The hours of `[from_s, until_s)` the rollup can answer: whole hours inside the
    /// range and inside the span (empty when `lo >= hi`).
    pub fn usable(&self, from_s: i64, until_s: i64) -> (i64, i64) {
        let lo = ceil_hour(from_s).max(self.from);
        let hi = floor_hour(until_s).min(self.until);
        (lo, hi)
    }

    pub fn load(conn: &rusqlite::Connection) -> rusqlite::Result<Self> {
        let get = |key: &str| -> rusqlite::Result<i64> {
            conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row([key], |row| row.get(0))
                .or_else(|err| match err {
                    rusqlite::Error::QueryReturnedNoRows => Ok(0),
                    other => Err(other),
                })
        };
        Ok(Self {
            from: get("rollup_from")?,
            until: get("rollup_until")?,
        })
    }

    fn save(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let mut stmt =
            tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?;
        stmt.execute(params!["rollup_from", self.from])?;
        stmt.execute(params!["rollup_until", self.until])?;
        Ok(())
    }
}

pub fn floor_hour(unix_s: i64) -> i64 {
    unix_s - unix_s.rem_euclid(HOUR_S)
}

pub fn ceil_hour(unix_s: i64) -> i64 {
    floor_hour(unix_s.saturating_add(HOUR_S - 1))
}

/// Extends the span to every hour complete at `now_s`, summing those hours from `samples`.
pub fn extend(
    tx: &Transaction<'_>,
    span: &mut RollupSpan,
    services: &[i64],
    now_s: i64,
) -> rusqlite::Result<()> {
    let start = span.until.max(span.from);
    let end = floor_hour(now_s);
    if end <= start {
        return Ok(());
    }
    let mut roll = tx.prepare_cached(
        "INSERT INTO rollup SELECT svc, ts - (ts % 3600), series, stacks_sum(stacks)
         FROM samples WHERE svc = ?1 AND ts >= ?2 AND ts < ?3 GROUP BY 2, 3
         ON CONFLICT (svc, hour, series) DO UPDATE SET stacks = stacks_merge(stacks, excluded.stacks)",
    )?;
    for &svc in services {
        roll.execute(params![svc, start, end])?;
    }
    span.until = end;
    span.save(tx)
}

/// Rows before `cutoff_s` were deleted or moved across hours: the span starts after them.
pub fn invalidate_below(
    tx: &Transaction<'_>,
    span: &mut RollupSpan,
    services: &[i64],
    cutoff_s: i64,
) -> rusqlite::Result<()> {
    let from = ceil_hour(cutoff_s);
    if from <= span.from {
        return Ok(());
    }
    let mut delete = tx.prepare_cached("DELETE FROM rollup WHERE svc = ?1 AND hour < ?2")?;
    for &svc in services {
        delete.execute(params![svc, from])?;
    }
    span.from = from;
    span.until = span.until.max(from);
    span.save(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_hours_are_whole_and_inside_the_span() {
        let span = RollupSpan {
            from: 3600,
            until: 10 * 3600,
        };
        assert_eq!(span.usable(0, 20 * 3600), (3600, 10 * 3600));
        assert_eq!(span.usable(3601, 5 * 3600 + 1), (7200, 5 * 3600));
        let (lo, hi) = span.usable(3601, 7000);
        assert!(lo >= hi, "no whole hour inside");
        assert!(span.covers(3600) && !span.covers(10 * 3600) && !span.covers(0));
        assert_eq!(ceil_hour(3600), 3600);
        assert_eq!(ceil_hour(3601), 7200);
    }
}
