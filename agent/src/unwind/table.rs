//! A binary's unwind table, built from its call frame information: `.eh_frame` (what
//! the C++ and Rust runtimes unwind with, present in nearly every binary, frame
//! pointers or not), or `.debug_frame` where that is all there is. For each address
//! range of each function: where the canonical frame address is (the stack or frame
//! pointer plus an offset, or a PLT stub's expression) and where the caller's frame
//! pointer was saved. Rows are sorted by address; a row holds up to the next row.
//!
//! Reads go through an open file (binaries of other mount namespaces, deleted ones) and
//! touch only the section read, not the whole binary.

use std::{fs::File, io};

use agent_common::{CfaKind, RbpKind, UnwindRow};
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EndianSlice, Expression, LittleEndian,
    Operation, RegisterRule, UnwindContext, UnwindSection, X86_64,
};
use object::{CompressionFormat, Object, ObjectSection, read::ReadCache};

/// Why no table could be built.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot read the binary: {0}")]
    Read(#[from] io::Error),
    #[error("not an ELF file this agent reads: {0}")]
    Elf(#[from] object::Error),
    #[error("a {0:?} binary: unwind tables are built for x86-64 only")]
    Architecture(object::Architecture),
    #[error("no call frame information (.eh_frame or .debug_frame)")]
    NoFrameInfo,
    #[error(".debug_frame is compressed and this agent does not decompress it")]
    Compressed,
}

/// Where a table's rows came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    EhFrame,
    DebugFrame,
    /// `.eh_frame`, and `.debug_frame` for functions it does not describe.
    Both,
}

impl Source {
    pub fn section(self) -> &'static str {
        match self {
            Self::EhFrame => ".eh_frame",
            Self::DebugFrame => ".debug_frame",
            Self::Both => ".eh_frame and .debug_frame",
        }
    }
}

/// What building a table found, beyond its rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Functions (FDEs) read.
    pub functions: u64,
    /// Functions whose information could not be parsed (left out: not covered).
    pub skipped_functions: u64,
    /// Rows (before merging) of each kind the unwinder cannot follow.
    pub unsupported_cfa: u64,
    pub unsupported_rbp: u64,
    /// Rows of PLT stubs.
    pub plt: u64,
}

/// A binary's unwind table.
#[derive(Debug, Clone)]
pub struct UnwindTable {
    /// Sorted by `pc`; no two neighbours give the same rules.
    pub rows: Vec<UnwindRow>,
    pub source: Source,
    pub stats: TableStats,
}

impl UnwindTable {
    /// Bytes the rows take in a map.
    pub fn bytes(&self) -> usize {
        size_of_val(self.rows.as_slice())
    }

    /// The row that holds at `pc` (an address of the binary), if a function covers it.
    pub fn lookup(&self, pc: u64) -> Option<&UnwindRow> {
        let index = self
            .rows
            .partition_point(|row| row.pc <= pc)
            .checked_sub(1)?;
        let row = &self.rows[index];
        (row.cfa_kind != CfaKind::NotCovered as u8).then_some(row)
    }
}

/// Builds the unwind table of the ELF binary open as `file`: every function `.eh_frame`
/// describes, and those only `.debug_frame` describes (code built with
/// `-fno-asynchronous-unwind-tables` has its own functions there, beside the C runtime's
/// in `.eh_frame`).
pub fn build(file: &File) -> Result<UnwindTable, TableError> {
    let cache = ReadCache::new(file);
    let object = object::File::parse(&cache)?;
    if object.architecture() != object::Architecture::X86_64 {
        return Err(TableError::Architecture(object.architecture()));
    }
    let mut bases = BaseAddresses::default();
    if let Some(text) = object.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = object.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    let mut stats = TableStats::default();
    let mut functions = Vec::new();
    let mut source = None;
    if let Some(section) = object.section_by_name(".eh_frame").filter(|s| s.size() > 0) {
        let bases = bases.clone().set_eh_frame(section.address());
        let mut eh_frame = EhFrame::new(section.data()?, LittleEndian);
        eh_frame.set_address_size(8);
        functions = collect(&eh_frame, &bases, &mut stats);
        source = Some(Source::EhFrame);
    }
    if let Some(section) = object
        .section_by_name(".debug_frame")
        .filter(|s| s.size() > 0)
    {
        if section.compressed_file_range()?.format == CompressionFormat::None {
            let mut debug_frame = DebugFrame::new(section.data()?, LittleEndian);
            debug_frame.set_address_size(8);
            let more = collect(&debug_frame, &bases, &mut stats);
            let added = add_uncovered(&mut functions, more);
            source = match source {
                Some(Source::EhFrame) if added > 0 => Some(Source::Both),
                Some(source) => Some(source),
                None => Some(Source::DebugFrame),
            };
        } else if source.is_none() {
            return Err(TableError::Compressed);
        }
    }
    let source = source.ok_or(TableError::NoFrameInfo)?;
    Ok(UnwindTable {
        rows: merge(functions),
        source,
        stats,
    })
}

/// One function's rows, in address order, and the end of its code.
struct Function {
    rows: Vec<UnwindRow>,
    end: u64,
}

/// Adds the functions of `more` that no function of `functions` overlaps; how many.
fn add_uncovered(functions: &mut Vec<Function>, more: Vec<Function>) -> usize {
    let mut covered: Vec<(u64, u64)> = functions.iter().map(|f| (f.rows[0].pc, f.end)).collect();
    covered.sort_unstable();
    // The furthest end among the functions starting at or before each one.
    let reach: Vec<u64> = covered
        .iter()
        .scan(0, |furthest, &(_, end)| {
            *furthest = end.max(*furthest);
            Some(*furthest)
        })
        .collect();
    let overlaps = |start: u64, end: u64| {
        let before_end = covered.partition_point(|&(s, _)| s < end);
        before_end > 0 && reach[before_end - 1] > start
    };
    let before = functions.len();
    for function in more {
        if !overlaps(function.rows[0].pc, function.end) {
            functions.push(function);
        }
    }
    functions.len() - before
}

type Slice<'data> = EndianSlice<'data, LittleEndian>;

/// The rows of every function of `section` that has any.
fn collect<'data, S: UnwindSection<Slice<'data>>>(
    section: &S,
    bases: &BaseAddresses,
    stats: &mut TableStats,
) -> Vec<Function> {
    let mut context = Box::new(UnwindContext::new());
    let mut functions = Vec::new();
    let mut entries = section.entries(bases);
    loop {
        let entry = match entries.next() {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            // The section's framing is broken from here on: what was read stands.
            Err(_) => {
                stats.skipped_functions += 1;
                break;
            }
        };
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        stats.functions += 1;
        let Ok(fde) = partial.parse(S::cie_from_offset) else {
            stats.skipped_functions += 1;
            continue;
        };
        let Ok(mut table) = fde.rows(section, bases, &mut *context) else {
            stats.skipped_functions += 1;
            continue;
        };
        let mut rows = Vec::new();
        let complete = loop {
            match table.next_row() {
                Ok(Some(row)) => rows.push(convert(row, section, stats)),
                Ok(None) => break true,
                Err(_) => break false,
            }
        };
        if !complete {
            stats.skipped_functions += 1;
        } else if !rows.is_empty() {
            functions.push(Function {
                rows,
                end: fde.end_address(),
            });
        }
    }
    functions
}

/// The functions' rows, each function closed by a row marking its end, sorted; without
/// what adds nothing: the end of a function where the next one starts, and a row giving
/// the same rules as the one before it.
fn merge(functions: Vec<Function>) -> Vec<UnwindRow> {
    let mut rows = Vec::with_capacity(functions.iter().map(|f| f.rows.len() + 1).sum());
    for function in functions {
        rows.extend(function.rows);
        rows.push(UnwindRow {
            pc: function.end,
            ..UnwindRow::default()
        });
    }
    // Stable: at one address, a function's first row comes after the end of the one
    // before it, and the later row at an address is the one that holds.
    rows.sort_by_key(|row| row.pc);
    let mut merged: Vec<UnwindRow> = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(last) = merged.last_mut() {
            if last.pc == row.pc {
                if row.cfa_kind != CfaKind::NotCovered as u8 {
                    *last = row;
                }
                continue;
            }
            if last.same_rules(&row) {
                continue;
            }
        }
        merged.push(row);
    }
    // An earlier row may now equal its new predecessor (a replaced one in between).
    merged.dedup_by(|later, earlier| earlier.same_rules(later));
    merged
}

fn convert<'data, S: UnwindSection<Slice<'data>>>(
    row: &gimli::UnwindTableRow<usize>,
    section: &S,
    stats: &mut TableStats,
) -> UnwindRow {
    let mut out = UnwindRow {
        pc: row.start_address(),
        ..UnwindRow::default()
    };
    let (kind, offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RSP => {
            (CfaKind::StackPointer, *offset)
        }
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RBP => {
            (CfaKind::FramePointer, *offset)
        }
        CfaRule::RegisterAndOffset { .. } => (CfaKind::Unsupported, 0),
        CfaRule::Expression(expression) => expression
            .get(section)
            .ok()
            .and_then(plt_threshold)
            .map_or((CfaKind::Unsupported, 0), |threshold| {
                (CfaKind::Plt, i64::from(threshold))
            }),
    };
    let (kind, offset) = match (kind, i16::try_from(offset)) {
        (kind, Ok(offset)) => (kind, offset),
        (_, Err(_)) => (CfaKind::Unsupported, 0),
    };
    let kind = match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => CfaKind::Outermost,
        Some(RegisterRule::Offset(-8)) | None => kind,
        Some(_) => CfaKind::Unsupported,
    };
    match kind {
        CfaKind::Unsupported => stats.unsupported_cfa += 1,
        CfaKind::Plt => stats.plt += 1,
        _ => {}
    }
    out.cfa_kind = kind as u8;
    out.cfa_offset = if kind == CfaKind::Unsupported {
        0
    } else {
        offset
    };
    let (rbp_kind, rbp_offset) = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue | RegisterRule::Undefined) => (RbpKind::Unchanged, 0),
        Some(RegisterRule::Offset(offset)) => {
            i16::try_from(offset).map_or((RbpKind::Unsupported, 0), |o| (RbpKind::AtCfa, o))
        }
        Some(_) => (RbpKind::Unsupported, 0),
    };
    if rbp_kind == RbpKind::Unsupported {
        stats.unsupported_rbp += 1;
    }
    out.rbp_kind = rbp_kind as u8;
    out.rbp_offset = rbp_offset;
    out
}

fn constant(operation: Option<Operation<Slice<'_>>>) -> Option<u64> {
    match operation {
        Some(Operation::UnsignedConstant { value }) => Some(value),
        _ => None,
    }
}

fn register(operation: Option<Operation<Slice<'_>>>) -> Option<(gimli::Register, i64)> {
    match operation {
        Some(Operation::RegisterOffset {
            register, offset, ..
        }) => Some((register, offset)),
        _ => None,
    }
}

/// The threshold `k` of the expression compilers emit for PLT stubs:
/// `rsp + 8 + (((rip & 15) >= k) << 3)`; `None` for any other expression.
fn plt_threshold(expression: Expression<Slice<'_>>) -> Option<u8> {
    let encoding = gimli::Encoding {
        format: gimli::Format::Dwarf32,
        version: 4,
        address_size: 8,
    };
    let mut operations = expression.operations(encoding);
    let mut next = || operations.next().ok().flatten();
    if register(next())? != (X86_64::RSP, 8) || register(next())? != (X86_64::RA, 0) {
        return None;
    }
    if constant(next())? != 15 || !matches!(next(), Some(Operation::And)) {
        return None;
    }
    let threshold = u8::try_from(constant(next())?).ok()?;
    if !matches!(next(), Some(Operation::Ge)) || constant(next())? != 3 {
        return None;
    }
    if !matches!(next(), Some(Operation::Shl)) || !matches!(next(), Some(Operation::Plus)) {
        return None;
    }
    next().is_none().then_some(threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pc: u64, kind: CfaKind, offset: i16) -> UnwindRow {
        UnwindRow {
            pc,
            cfa_kind: kind as u8,
            cfa_offset: offset,
            ..UnwindRow::default()
        }
    }

    #[test]
    fn merging_keeps_function_starts_over_ends_and_drops_repeats() {
        let functions = vec![
            // Listed out of order, as sections may hold them.
            Function {
                rows: vec![row(0x40, CfaKind::StackPointer, 8)],
                end: 0x48,
            },
            Function {
                rows: vec![
                    row(0x10, CfaKind::StackPointer, 8),
                    row(0x11, CfaKind::StackPointer, 16),
                    row(0x18, CfaKind::StackPointer, 16),
                ],
                end: 0x20,
            },
            // Starts where the one before ends, with its own first rule.
            Function {
                rows: vec![row(0x20, CfaKind::StackPointer, 8)],
                end: 0x30,
            },
        ];
        let table = UnwindTable {
            rows: merge(functions),
            source: Source::EhFrame,
            stats: TableStats::default(),
        };
        let pcs: Vec<u64> = table.rows.iter().map(|r| r.pc).collect();
        assert_eq!(pcs, [0x10, 0x11, 0x20, 0x30, 0x40, 0x48]);
        assert_eq!(table.lookup(0x1f).map(|r| r.cfa_offset), Some(16));
        assert_eq!(table.lookup(0x20).map(|r| r.cfa_offset), Some(8));
        assert!(table.lookup(0x35).is_none(), "a gap between functions");
        assert!(table.lookup(0x8).is_none(), "before the first function");
        assert!(table.lookup(0x50).is_none(), "after the last function");
        assert_eq!(table.bytes(), 6 * 16);
    }

    #[test]
    fn debug_frame_adds_only_functions_eh_frame_does_not_describe() {
        let function = |start: u64, end: u64| Function {
            rows: vec![row(start, CfaKind::StackPointer, 8)],
            end,
        };
        let mut functions = vec![function(0x100, 0x200), function(0x300, 0x400)];
        let added = add_uncovered(
            &mut functions,
            vec![
                function(0x100, 0x200),
                function(0x180, 0x280),
                function(0x200, 0x300),
                function(0x3f0, 0x500),
                function(0x500, 0x600),
            ],
        );
        assert_eq!(added, 2);
        let starts: Vec<u64> = functions.iter().map(|f| f.rows[0].pc).collect();
        assert_eq!(starts, [0x100, 0x300, 0x200, 0x500]);
    }

    fn expression(bytes: &[u8]) -> Expression<Slice<'_>> {
        Expression(EndianSlice::new(bytes, LittleEndian))
    }

    #[test]
    fn the_plt_expression_is_recognized_and_no_other() {
        use gimli::constants::{
            DW_OP_and, DW_OP_breg7, DW_OP_breg16, DW_OP_ge, DW_OP_lit3, DW_OP_lit11, DW_OP_lit15,
            DW_OP_plus, DW_OP_shl,
        };
        // What the linker emits for `.plt`: breg7 +8; breg16 +0; lit15; and; lit11; ge;
        // lit3; shl; plus.
        let plt = [
            DW_OP_breg7.0,
            8,
            DW_OP_breg16.0,
            0,
            DW_OP_lit15.0,
            DW_OP_and.0,
            DW_OP_lit11.0,
            DW_OP_ge.0,
            DW_OP_lit3.0,
            DW_OP_shl.0,
            DW_OP_plus.0,
        ];
        assert_eq!(plt_threshold(expression(&plt)), Some(11));
        let mut other = plt;
        other[1] = 16;
        assert_eq!(plt_threshold(expression(&other)), None);
        assert_eq!(plt_threshold(expression(&plt[..9])), None);
        let mut longer = plt.to_vec();
        longer.push(DW_OP_plus.0);
        assert_eq!(plt_threshold(expression(&longer)), None);
    }
}
