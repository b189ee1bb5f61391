//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): struct member offsets and
//! the argument lists of BTF tracepoints. Rust eBPF has no CO-RE relocations, so the agent
//! reads the offsets it needs here and hands them to the probes as read-only globals.

use std::path::Path;

use thiserror::Error;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("kernel BTF has no member `{member}` in struct `{strukt}`")]
    NoMember { strukt: String, member: String },
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Parsed kernel BTF: the raw bytes and where each type starts. Names and members are
/// read on demand, so parsing the kernel's ~6 MB of BTF allocates one offset per type.
pub struct Btf {
    data: Vec<u8>,
    /// Byte range of the string section in `data`.
    strings: std::ops::Range<usize>,
    /// Offset in `data` of each type's record; index 0 stands for `void`.
    offsets: Vec<u32>,
}

/// A type record's header.
#[derive(Debug, Clone, Copy)]
struct Header {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// Size, or referenced type for pointers, typedefs, modifiers and func protos.
    size_or_type: u32,
    /// Offset in `data` of the kind-specific part.
    body: usize,
}

fn u32_at(data: &[u8], offset: usize) -> Result<u32, BtfError> {
    data.get(offset..offset + 4)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

/// Size of a type record's kind-specific part.
const fn body_len(kind: u32, vlen: usize) -> usize {
    match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        _ => 0,
    }
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let magic = data
            .get(..2)
            .ok_or(BtfError::Malformed("truncated header"))?;
        if magic != [0x9f, 0xeb] {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(&data, 4)? as usize;
        let type_off = u32_at(&data, 8)? as usize;
        let type_len = u32_at(&data, 12)? as usize;
        let str_off = u32_at(&data, 16)? as usize;
        let str_len = u32_at(&data, 20)? as usize;
        let types = hdr_len + type_off..hdr_len + type_off + type_len;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if data.get(types.clone()).is_none() || data.get(strings.clone()).is_none() {
            return Err(BtfError::Malformed("section out of bounds"));
        }
        let mut offsets = vec![0];
        let mut pos = types.start;
        while pos < types.end {
            let info = u32_at(&data, pos + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            offsets.push(u32::try_from(pos).map_err(|_| BtfError::Malformed("too large"))?);
            pos += 12 + body_len(kind, vlen);
        }
        if pos != types.end {
            return Err(BtfError::Malformed("type section ends inside a type"));
        }
        Ok(Self {
            data,
            strings,
            offsets,
        })
    }

    fn header(&self, id: u32) -> Option<Header> {
        let pos = *self.offsets.get(id as usize)? as usize;
        if id == 0 {
            return None;
        }
        let info = u32_at(&self.data, pos + 4).ok()?;
        Some(Header {
            name_off: u32_at(&self.data, pos).ok()?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 != 0,
            size_or_type: u32_at(&self.data, pos + 8).ok()?,
            body: pos + 12,
        })
    }

    fn name(&self, name_off: u32) -> &[u8] {
        let start = self.strings.start + name_off as usize;
        self.data
            .get(start..self.strings.end)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .unwrap_or_default()
    }

    fn find(&self, kind: u32, name: &str) -> Option<u32> {
        (1..self.offsets.len() as u32).find(|&id| {
            self.header(id)
                .is_some_and(|h| h.kind == kind && self.name(h.name_off) == name.as_bytes())
        })
    }

    /// Byte offset of `member` in `struct strukt`, looking through anonymous structs and
    /// unions the way C does.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = self
            .find(KIND_STRUCT, strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        self.find_member(id, member, 0, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            })
    }

    fn find_member(&self, type_id: u32, member: &str, base_bits: u32, depth: u32) -> Option<u32> {
        let header = self.header(type_id)?;
        if depth > 8 || !matches!(header.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for index in 0..header.vlen {
            let at = header.body + 12 * index;
            let name_off = u32_at(&self.data, at).ok()?;
            let member_type = u32_at(&self.data, at + 4).ok()?;
            let raw_offset = u32_at(&self.data, at + 8).ok()?;
            let bits = if header.kind_flag {
                raw_offset & 0x00ff_ffff
            } else {
                raw_offset
            };
            let name = self.name(name_off);
            if name == member.as_bytes() {
                return Some(base_bits + bits);
            }
            if name.is_empty()
                && let Some(found) = self.find_member(
                    self.skip_modifiers(member_type),
                    member,
                    base_bits + bits,
                    depth + 1,
                )
            {
                return Some(found);
            }
        }
        None
    }

    fn skip_modifiers(&self, mut type_id: u32) -> u32 {
        for _ in 0..16 {
            match self.header(type_id) {
                Some(h)
                    if matches!(
                        h.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    type_id = h.size_or_type;
                }
                _ => break,
            }
        }
        type_id
    }

    /// The value of `variant` in `enum name` (32-bit enums), or `None` if this kernel has
    /// no such enum or variant.
    pub fn enum_value(&self, name: &str, variant: &str) -> Option<u32> {
        let id = self.find(KIND_ENUM, name)?;
        let header = self.header(id)?;
        (0..header.vlen).find_map(|index| {
            let at = header.body + 8 * index;
            let name_off = u32_at(&self.data, at).ok()?;
            (self.name(name_off) == variant.as_bytes())
                .then(|| u32_at(&self.data, at + 4).ok())
                .flatten()
        })
    }

    /// Number of arguments of BTF tracepoint `name` (its `btf_trace_<name>` typedef, minus
    /// the leading context pointer), or `None` if this kernel has no such tracepoint.
    pub fn tracepoint_arg_count(&self, name: &str) -> Option<usize> {
        let typedef = self.find(KIND_TYPEDEF, &format!("btf_trace_{name}"))?;
        let ptr = self.header(typedef)?;
        let ptr = self.header(ptr.size_or_type)?;
        if ptr.kind != KIND_PTR {
            return None;
        }
        let proto = self.header(ptr.size_or_type)?;
        (proto.kind == KIND_FUNC_PROTO).then(|| proto.vlen.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: struct outer { int a; union { int b; int c; }; } plus a
    /// tracepoint typedef with two arguments.
    fn sample_btf() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0btf_trace_demo\0".to_vec();
        let name = |s: &str| -> u32 {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .expect("string present") as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int
        push(&[name("int"), KIND_INT << 24, 4, 32]);
        // 2: anonymous union { int b; int c; }
        push(&[0, (KIND_UNION << 24) | 2, 4]);
        push(&[name("b"), 1, 0]);
        push(&[name("c"), 1, 0]);
        // 3: struct outer { int a; union; }
        push(&[name("outer"), (KIND_STRUCT << 24) | 2, 8]);
        push(&[name("a"), 1, 0]);
        push(&[0, 2, 32]);
        // 4: func proto (void *ctx, int, int)
        push(&[0, (KIND_FUNC_PROTO << 24) | 3, 0]);
        push(&[0, 0, 0, 1, 0, 1]);
        // 5: ptr -> 4
        push(&[0, KIND_PTR << 24, 4]);
        // 6: typedef btf_trace_demo -> 5
        push(&[name("btf_trace_demo"), KIND_TYPEDEF << 24, 5]);
        let mut blob = Vec::new();
        blob.extend_from_slice(&[0x9f, 0xeb, 1, 0]);
        for word in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&word.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(&strings);
        blob
    }

    #[test]
    fn finds_members_through_anonymous_unions() {
        let btf = Btf::parse(sample_btf()).expect("parses");
        assert_eq!(btf.member_offset("outer", "a").expect("a"), 0);
        assert_eq!(btf.member_offset("outer", "c").expect("c"), 4);
        assert!(btf.member_offset("outer", "zz").is_err());
        assert!(btf.member_offset("nope", "a").is_err());
    }

    #[test]
    fn counts_tracepoint_arguments() {
        let btf = Btf::parse(sample_btf()).expect("parses");
        assert_eq!(btf.tracepoint_arg_count("demo"), Some(2));
        assert_eq!(btf.tracepoint_arg_count("missing"), None);
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all".to_vec()).is_err());
        assert!(Btf::parse(Vec::new()).is_err());
    }

    #[test]
    fn reads_the_running_kernel_when_present() {
        if !Path::new(VMLINUX_BTF).exists() {
            return;
        }
        let btf = Btf::from_sys_fs().expect("kernel BTF parses");
        assert!(btf.member_offset("task_struct", "pid").expect("pid") > 0);
        assert!(btf.tracepoint_arg_count("sched_switch").is_some());
        assert_eq!(btf.enum_value("skb_drop_reason", "SKB_CONSUMED"), Some(1));
        assert_eq!(btf.enum_value("skb_drop_reason", "NO_SUCH_REASON"), None);
    }
}
