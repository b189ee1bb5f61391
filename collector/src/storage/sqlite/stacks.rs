//! The `stacks` column of the SQLite tables: one (series, bucket) row holds every stack's
//! (value, count) of that series and bucket as a compact blob, so a batch writes one row
//! per series instead of one per sample. Also the SQL functions that merge such blobs
//! (`stacks_merge(a, b)` for upserts, `stacks_sum(blob)` as an aggregate for downsampling
//! and the rollup), so merges stay inside the transaction that needs them.
//!
//! Format: entries sorted by stack id, each id at most once, each entry the stack id as
//! 8 little-endian bytes, then value and count as zigzag varints. Sums saturate, like the
//! sums of a batch's samples.

use rusqlite::{
    Connection,
    functions::{Aggregate, Context, FunctionFlags},
};

/// One stack's sums in a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub stack: i64,
    pub value: i64,
    pub count: i64,
}

/// A blob that does not follow the format (never written by this code).
#[derive(Debug, thiserror::Error)]
#[error("a stored stacks blob is malformed at byte {offset}: {reason}")]
pub struct MalformedStacks {
    offset: usize,
    reason: &'static str,
}

/// Appends `entries` (sorted by stack, each stack once) in the blob format.
pub fn encode(entries: impl IntoIterator<Item = Entry>, out: &mut Vec<u8>) {
    for entry in entries {
        out.extend_from_slice(&entry.stack.to_le_bytes());
        put_varint(out, zigzag(entry.value));
        put_varint(out, zigzag(entry.count));
    }
}

/// The entries of a blob, in stack order.
pub fn decode(blob: &[u8]) -> Entries<'_> {
    Entries { blob, offset: 0 }
}

/// Iterator over a blob's entries; yields an error (then stops) on a malformed blob.
pub struct Entries<'a> {
    blob: &'a [u8],
    offset: usize,
}

impl Iterator for Entries<'_> {
    type Item = Result<Entry, MalformedStacks>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.offset >= self.blob.len() {
            return None;
        }
        let entry = self.read();
        if entry.is_err() {
            self.offset = self.blob.len();
        }
        Some(entry)
    }
}

impl Entries<'_> {
    fn read(&mut self) -> Result<Entry, MalformedStacks> {
        let start = self.offset;
        let id: [u8; 8] = self
            .blob
            .get(start..start + 8)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(MalformedStacks {
                offset: start,
                reason: "truncated stack id",
            })?;
        self.offset += 8;
        let value = unzigzag(self.varint()?);
        let count = unzigzag(self.varint()?);
        Ok(Entry {
            stack: i64::from_le_bytes(id),
            value,
            count,
        })
    }

    fn varint(&mut self) -> Result<u64, MalformedStacks> {
        let mut value = 0_u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.blob.get(self.offset) else {
                break;
            };
            self.offset += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(MalformedStacks {
            offset: self.offset,
            reason: "truncated or overlong varint",
        })
    }
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Adds `entry` into `sums` (sorted by stack, each once) keeping it sorted. Entries
/// usually arrive in stack order, so the common case is an append.
fn add_sorted(sums: &mut Vec<Entry>, entry: Entry) {
    match sums.last_mut() {
        Some(last) if last.stack == entry.stack => add_into(last, entry),
        Some(last) if last.stack > entry.stack => {
            match sums.binary_search_by_key(&entry.stack, |e| e.stack) {
                Ok(index) => add_into(&mut sums[index], entry),
                Err(index) => sums.insert(index, entry),
            }
        }
        _ => sums.push(entry),
    }
}

fn add_into(sum: &mut Entry, entry: Entry) {
    sum.value = sum.value.saturating_add(entry.value);
    sum.count = sum.count.saturating_add(entry.count);
}

/// The blob holding the sums of two blobs.
pub fn merge(a: &[u8], b: &[u8]) -> Result<Vec<u8>, MalformedStacks> {
    let mut sums = Vec::new();
    sum_into(&mut sums, a)?;
    sum_into(&mut sums, b)?;
    let mut out = Vec::with_capacity(a.len().max(b.len()) + 16);
    encode(sums, &mut out);
    Ok(out)
}

/// Adds a blob's entries into `sums` (sorted by stack, each once).
pub fn sum_into(sums: &mut Vec<Entry>, blob: &[u8]) -> Result<(), MalformedStacks> {
    for entry in decode(blob) {
        add_sorted(sums, entry?);
    }
    Ok(())
}

fn user_error(err: MalformedStacks) -> rusqlite::Error {
    rusqlite::Error::UserFunctionError(Box::new(err))
}

/// `stacks_sum(blob)`: the blob of the sums of a group's blobs.
struct StacksSum;

impl Aggregate<Vec<Entry>, Vec<u8>> for StacksSum {
    fn init(&self, _: &mut Context<'_>) -> rusqlite::Result<Vec<Entry>> {
        Ok(Vec::new())
    }

    fn step(&self, ctx: &mut Context<'_>, sums: &mut Vec<Entry>) -> rusqlite::Result<()> {
        let blob = ctx.get_raw(0).as_blob()?;
        sum_into(sums, blob).map_err(user_error)
    }

    fn finalize(&self, _: &mut Context<'_>, sums: Option<Vec<Entry>>) -> rusqlite::Result<Vec<u8>> {
        let mut out = Vec::new();
        encode(sums.unwrap_or_default(), &mut out);
        Ok(out)
    }
}

/// Registers `stacks_merge` and `stacks_sum` on a connection that writes the tables.
pub fn register(conn: &Connection) -> rusqlite::Result<()> {
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    conn.create_scalar_function("stacks_merge", 2, flags, |ctx| {
        merge(ctx.get_raw(0).as_blob()?, ctx.get_raw(1).as_blob()?).map_err(user_error)
    })?;
    conn.create_aggregate_function("stacks_sum", 1, flags, StacksSum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(stack: i64, value: i64, count: i64) -> Entry {
        Entry {
            stack,
            value,
            count,
        }
    }

    fn entries(blob: &[u8]) -> Vec<Entry> {
        decode(blob).collect::<Result<_, _>>().expect("well-formed")
    }

    #[test]
    fn round_trips_extremes() {
        let input = vec![
            entry(i64::MIN, 0, 1),
            entry(-1, -5, i64::MAX),
            entry(0, i64::MIN, -1),
            entry(i64::MAX, i64::MAX, 0),
        ];
        let mut blob = Vec::new();
        encode(input.clone(), &mut blob);
        assert_eq!(entries(&blob), input);
        assert!(entries(&[]).is_empty());
    }

    #[test]
    fn merges_sum_per_stack_in_order() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode([entry(1, 10, 1), entry(5, 50, 5)], &mut a);
        encode([entry(-3, 7, 7), entry(5, 1, 1), entry(9, 9, 9)], &mut b);
        let merged = merge(&a, &b).expect("merge");
        assert_eq!(
            entries(&merged),
            [
                entry(-3, 7, 7),
                entry(1, 10, 1),
                entry(5, 51, 6),
                entry(9, 9, 9)
            ]
        );
        let mut sums = Vec::new();
        sum_into(&mut sums, &b).expect("sum");
        sum_into(&mut sums, &a).expect("sum");
        assert_eq!(sums, entries(&merged), "order of merging does not matter");
        let mut max = Vec::new();
        encode([entry(1, i64::MAX, 1)], &mut max);
        assert_eq!(entries(&merge(&max, &a).expect("merge"))[0].value, i64::MAX);
    }

    #[test]
    fn malformed_blobs_are_errors_not_panics() {
        let mut blob = Vec::new();
        encode([entry(1, 300, 1)], &mut blob);
        for cut in 1..blob.len() {
            assert!(
                decode(&blob[..cut]).any(|e| e.is_err()),
                "cut at {cut} must fail"
            );
        }
        let overlong = [[0_u8; 8].as_slice(), &[0xff; 11]].concat();
        assert!(decode(&overlong).any(|e| e.is_err()));
    }

    #[test]
    fn sql_functions_merge_and_sum() {
        let conn = Connection::open_in_memory().expect("sqlite");
        register(&conn).expect("register");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode([entry(1, 10, 1)], &mut a);
        encode([entry(1, 5, 2), entry(2, 1, 1)], &mut b);
        let merged: Vec<u8> = conn
            .query_row("SELECT stacks_merge(?1, ?2)", [&a, &b], |r| r.get(0))
            .expect("merge");
        assert_eq!(entries(&merged), [entry(1, 15, 3), entry(2, 1, 1)]);
        conn.execute_batch("CREATE TABLE t (g INTEGER, s BLOB)")
            .expect("table");
        for blob in [&a, &b, &a] {
            conn.execute("INSERT INTO t VALUES (1, ?1)", [blob])
                .expect("insert");
        }
        let summed: Vec<u8> = conn
            .query_row("SELECT stacks_sum(s) FROM t GROUP BY g", [], |r| r.get(0))
            .expect("sum");
        assert_eq!(entries(&summed), [entry(1, 25, 4), entry(2, 1, 1)]);
        assert!(
            conn.query_row("SELECT stacks_merge(x'01', ?1)", [&a], |r| r
                .get::<_, Vec<u8>>(0))
                .is_err()
        );
    }
}
