//! Unwind table rows: how to find a caller's frame at an address of a binary built
//! without frame pointers, from its call frame information (`.eh_frame`). The agent
//! builds one sorted table per binary (`agent/src/unwind/`); a row holds from its `pc` to
//! the next row's. x86-64: the return address is always at CFA - 8.

/// How to find the canonical frame address (CFA, the caller's stack pointer before the
/// call) at a row's addresses. Stored in [`UnwindRow::cfa_kind`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CfaKind {
    /// No function covers these addresses (the end of a function with a gap after it).
    NotCovered = 0,
    /// CFA = stack pointer + `cfa_offset`.
    StackPointer = 1,
    /// CFA = frame pointer + `cfa_offset`.
    FramePointer = 2,
    /// A PLT stub's expression: CFA = stack pointer + 8, plus 8 more when
    /// `(pc & 15) >= cfa_offset`.
    Plt = 3,
    /// The return address is undefined: a thread's or process's entry point, where a
    /// stack ends.
    Outermost = 4,
    /// A rule the unwinder does not follow (another base register, a general DWARF
    /// expression, an offset beyond 16 bits, a return address not at CFA - 8).
    Unsupported = 5,
}

impl CfaKind {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::NotCovered),
            1 => Some(Self::StackPointer),
            2 => Some(Self::FramePointer),
            3 => Some(Self::Plt),
            4 => Some(Self::Outermost),
            5 => Some(Self::Unsupported),
            _ => None,
        }
    }
}

/// Where the caller's frame pointer (rbp) is. Stored in [`UnwindRow::rbp_kind`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RbpKind {
    /// Not saved by this function: the caller's is still in the register.
    Unchanged = 0,
    /// Saved at CFA + `rbp_offset`.
    AtCfa = 1,
    /// A rule the unwinder does not follow (in another register, an expression).
    Unsupported = 2,
}

impl RbpKind {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Unchanged),
            1 => Some(Self::AtCfa),
            2 => Some(Self::Unsupported),
            _ => None,
        }
    }
}

/// One row of a binary's unwind table: 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    /// The first address the row holds for, as the binary's own virtual addresses.
    pub pc: u64,
    pub cfa_offset: i16,
    pub rbp_offset: i16,
    /// A [`CfaKind`].
    pub cfa_kind: u8,
    /// A [`RbpKind`].
    pub rbp_kind: u8,
    pub pad: [u8; 2],
}

impl UnwindRow {
    /// Whether two rows give the same rules (a row equal to the one before it adds
    /// nothing).
    pub fn same_rules(&self, other: &Self) -> bool {
        (
            self.cfa_kind,
            self.cfa_offset,
            self.rbp_kind,
            self.rbp_offset,
        ) == (
            other.cfa_kind,
            other.cfa_offset,
            other.rbp_kind,
            other.rbp_offset,
        )
    }
}

/// Most mappings of binaries with tables one process lists (its executable, the C
/// library, the libraries it loaded): the probes scan them in order per frame.
pub const UNWIND_MAPPINGS: usize = 32;

/// An executable mapping of a binary with an unwind table, in one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    /// The mapping's addresses in the process: `start..end`.
    pub start: u64,
    pub end: u64,
    /// What to subtract from an address of the mapping to get the binary's own address.
    pub bias: u64,
    /// The binary's rows in the rows map: `first_row..first_row + rows`.
    pub first_row: u32,
    pub rows: u32,
}

/// The mappings of one process whose binaries have unwind tables (value of the
/// processes map, keyed by the process id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnwindProcess {
    /// Valid entries of `mappings`.
    pub count: u32,
    pub pad: u32,
    pub mappings: [UnwindMapping; UNWIND_MAPPINGS],
}

impl Default for UnwindProcess {
    fn default() -> Self {
        Self {
            count: 0,
            pad: 0,
            mappings: [UnwindMapping::default(); UNWIND_MAPPINGS],
        }
    }
}

/// Why a table-driven walk of a user stack stopped: bits 8..16 of
/// [`crate::StackTrace::flags`] (0: the kernel's frame-pointer walker took the stack).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StackEnd {
    /// The kernel's frame-pointer walk (the process has no tables).
    FramePointerWalk = 0,
    /// A row said the return address is undefined: a thread's or the process's entry
    /// point. The stack is whole.
    EntryPoint = 1,
    /// In code without a table, the frame-pointer chain ended (a zero frame pointer).
    FramePointerEnd = 2,
    /// An address no function of its binary's table covers.
    NotCovered = 3,
    /// A row with a rule the walk does not follow.
    Unsupported = 4,
    /// Reading the thread's stack failed (the address is not mapped, or paged out).
    ReadFailed = 5,
    /// The walk reached the deepest stack recorded.
    DepthLimit = 6,
    /// The thread's user registers could not be read.
    NoRegisters = 7,
}

impl StackEnd {
    pub const COUNT: usize = 8;

    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::FramePointerWalk),
            1 => Some(Self::EntryPoint),
            2 => Some(Self::FramePointerEnd),
            3 => Some(Self::NotCovered),
            4 => Some(Self::Unsupported),
            5 => Some(Self::ReadFailed),
            6 => Some(Self::DepthLimit),
            7 => Some(Self::NoRegisters),
            _ => None,
        }
    }

    /// The reason in a stack's flags.
    pub const fn of_flags(flags: u32) -> Option<Self> {
        Self::from_u8(((flags >> STACK_END_SHIFT) & 0xff) as u8)
    }
}

/// Where [`StackEnd`] sits in a stack's flags.
pub const STACK_END_SHIFT: u32 = 8;
/// [`crate::StackTrace::flags`]: at least one frame of the stack came from an unwind table.
pub const STACK_TABLE: u32 = 1 << 2;
