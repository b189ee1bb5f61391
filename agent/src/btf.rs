//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): struct member offsets and
//! the argument lists of BTF tracepoints. Rust eBPF has no CO-RE relocations, so the agent
//! reads the offsets it needs here and hands them to the probes as read-only globals.

use std::{collections::HashMap, path::Path};

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

#[derive(Debug, Clone)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    kind: u32,
    name: String,
    /// Referenced type (pointers, typedefs, modifiers, func protos' return).
    ref_type: u32,
    /// Struct/union members or func-proto parameters (offset unused).
    members: Vec<Member>,
}

/// Parsed kernel BTF: enough to find member offsets and tracepoint prototypes.
pub struct Btf {
    types: Vec<Type>,
    by_name: HashMap<(u32, String), u32>,
}

fn u32_at(data: &[u8], offset: usize) -> Result<u32, BtfError> {
    data.get(offset..offset + 4)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
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
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data
            .get(..2)
            .ok_or(BtfError::Malformed("truncated header"))?;
        if magic != [0x9f, 0xeb] {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?;
        let string_at = |offset: u32| -> String {
            let start = offset as usize;
            strings
                .get(start..)
                .and_then(|rest| rest.split(|&b| b == 0).next())
                .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
                .unwrap_or_default()
        };

        // Type id 0 is `void`.
        let mut types = vec![Type {
            kind: 0,
            name: String::new(),
            ref_type: 0,
            members: Vec::new(),
        }];
        let mut pos = 0;
        while pos < types_data.len() {
            let name_off = u32_at(types_data, pos)?;
            let info = u32_at(types_data, pos + 4)?;
            let size_or_type = u32_at(types_data, pos + 8)?;
            pos += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 != 0;
            let mut members = Vec::new();
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => pos += 4,
                KIND_ARRAY => pos += 12,
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let offset = u32_at(types_data, pos + 8)?;
                        members.push(Member {
                            name: string_at(u32_at(types_data, pos)?),
                            type_id: u32_at(types_data, pos + 4)?,
                            bit_offset: if kind_flag {
                                offset & 0x00ff_ffff
                            } else {
                                offset
                            },
                        });
                        pos += 12;
                    }
                }
                KIND_ENUM => pos += 8 * vlen,
                KIND_FUNC_PROTO => {
                    for _ in 0..vlen {
                        members.push(Member {
                            name: string_at(u32_at(types_data, pos)?),
                            type_id: u32_at(types_data, pos + 4)?,
                            bit_offset: 0,
                        });
                        pos += 8;
                    }
                }
                KIND_DATASEC | KIND_ENUM64 => pos += 12 * vlen,
                _ => {}
            }
            let ref_type = match kind {
                KIND_PTR | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC_PROTO | KIND_TYPE_TAG => size_or_type,
                _ => 0,
            };
            types.push(Type {
                kind,
                name: string_at(name_off),
                ref_type,
                members,
            });
        }
        let by_name = types
            .iter()
            .enumerate()
            .filter(|(_, ty)| !ty.name.is_empty())
            .map(|(id, ty)| ((ty.kind, ty.name.clone()), id as u32))
            .collect();
        Ok(Self { types, by_name })
    }

    /// Byte offset of `member` in `struct strukt`, looking through anonymous structs and
    /// unions the way C does.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = self
            .by_name
            .get(&(KIND_STRUCT, strukt.to_owned()))
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        self.find_member(*id, member, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            })
    }

    fn find_member(&self, type_id: u32, member: &str, base_bits: u32) -> Option<u32> {
        let ty = self.types.get(type_id as usize)?;
        for m in &ty.members {
            if m.name == member {
                return Some(base_bits + m.bit_offset);
            }
            if m.name.is_empty() {
                let inner = self.skip_modifiers(m.type_id);
                let inner_kind = self.types.get(inner as usize).map(|t| t.kind);
                if matches!(inner_kind, Some(KIND_STRUCT | KIND_UNION))
                    && let Some(found) = self.find_member(inner, member, base_bits + m.bit_offset)
                {
                    return Some(found);
                }
            }
        }
        None
    }

    fn skip_modifiers(&self, mut type_id: u32) -> u32 {
        for _ in 0..16 {
            match self.types.get(type_id as usize) {
                Some(ty)
                    if matches!(
                        ty.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    type_id = ty.ref_type;
                }
                _ => break,
            }
        }
        type_id
    }

    /// Number of arguments of BTF tracepoint `name` (its `btf_trace_<name>` typedef, minus
    /// the leading context pointer), or `None` if this kernel has no such tracepoint.
    pub fn tracepoint_arg_count(&self, name: &str) -> Option<usize> {
        let typedef = *self
            .by_name
            .get(&(KIND_TYPEDEF, format!("btf_trace_{name}")))?;
        let ptr = self.types.get(typedef as usize)?.ref_type;
        let proto_id = self.types.get(ptr as usize)?.ref_type;
        let proto = self.types.get(proto_id as usize)?;
        (proto.kind == KIND_FUNC_PROTO).then(|| proto.members.len().saturating_sub(1))
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
        let btf = Btf::parse(&sample_btf()).expect("parses");
        assert_eq!(btf.member_offset("outer", "a").expect("a"), 0);
        assert_eq!(btf.member_offset("outer", "c").expect("c"), 4);
        assert!(btf.member_offset("outer", "zz").is_err());
        assert!(btf.member_offset("nope", "a").is_err());
    }

    #[test]
    fn counts_tracepoint_arguments() {
        let btf = Btf::parse(&sample_btf()).expect("parses");
        assert_eq!(btf.tracepoint_arg_count("demo"), Some(2));
        assert_eq!(btf.tracepoint_arg_count("missing"), None);
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all").is_err());
        assert!(Btf::parse(&[]).is_err());
    }

    #[test]
    fn reads_the_running_kernel_when_present() {
        if !Path::new(VMLINUX_BTF).exists() {
            return;
        }
        let btf = Btf::from_sys_fs().expect("kernel BTF parses");
        assert!(btf.member_offset("task_struct", "pid").expect("pid") > 0);
        assert!(btf.tracepoint_arg_count("sched_switch").is_some());
    }
}
