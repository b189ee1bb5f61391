//! The batch as the collector decodes it: like `stallscope.v1.Batch`, except that frames
//! stay the raw bytes of their `Frame` messages (slices of the decoded buffer, no
//! allocation) and are read in place. A batch holds thousands of frames and storage only
//! needs their hashes and, for stacks it has not seen, their encoding; decoding each
//! frame's strings into owned `String`s was most of the decoding cost.

use prost::{
    Message as _,
    bytes::{BufMut as _, Bytes},
    encoding::{self, WireType},
};
use stallscope_proto::v1;

/// `stallscope.v1.Batch` with frames kept encoded. Field numbers are the proto's; unknown
/// fields (`notes`, and anything newer) are skipped.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DecodedBatch {
    #[prost(string, tag = "2")]
    pub host: String,
    #[prost(uint64, tag = "3")]
    pub sequence: u64,
    #[prost(int64, tag = "4")]
    pub start_unix_ns: i64,
    #[prost(int64, tag = "5")]
    pub duration_ns: i64,
    #[prost(message, repeated, tag = "6")]
    pub signals: Vec<v1::SignalType>,
    /// Each an encoded `stallscope.v1.Frame`.
    #[prost(bytes = "bytes", repeated, tag = "7")]
    pub frames: Vec<Bytes>,
    #[prost(message, repeated, tag = "8")]
    pub stacks: Vec<v1::Stack>,
    #[prost(string, repeated, tag = "9")]
    pub strings: Vec<String>,
    #[prost(message, repeated, tag = "10")]
    pub samples: Vec<v1::Sample>,
    #[prost(message, repeated, tag = "11")]
    pub losses: Vec<v1::Loss>,
    #[prost(uint64, tag = "13")]
    pub spool_dropped_total: u64,
    #[prost(message, repeated, tag = "14")]
    pub events: Vec<v1::ChangeEvent>,
    #[prost(message, repeated, tag = "15")]
    pub binaries: Vec<v1::BinaryInfo>,
}

impl From<v1::Batch> for DecodedBatch {
    /// For callers holding a decoded message (tests, synthetic data): the same bytes an
    /// agent would have sent, decoded the collector's way.
    fn from(batch: v1::Batch) -> Self {
        let encoded = batch.encode_to_vec();
        Self::decode(Bytes::from(encoded)).unwrap_or_default()
    }
}

/// A frame read in place from its encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameRef<'a> {
    pub function: &'a str,
    pub module: &'a str,
    pub file: &'a str,
    pub line: u32,
    pub address: u64,
    pub kind: i32,
}

/// Reads an encoded `stallscope.v1.Frame` without copying its strings. Fails as prost
/// would on malformed input (bad varints, truncated fields, invalid UTF-8).
pub fn parse_frame(mut bytes: &[u8]) -> Result<FrameRef<'_>, String> {
    let buf = &mut bytes;
    let mut frame = FrameRef::default();
    while !buf.is_empty() {
        let (tag, wire_type) = encoding::decode_key(buf).map_err(|err| err.to_string())?;
        match (tag, wire_type) {
            (1..=3, WireType::LengthDelimited) => {
                let len = length(buf)?;
                let (text, rest) = buf.split_at(len);
                let text = std::str::from_utf8(text)
                    .map_err(|_| format!("field {tag} is not valid UTF-8"))?;
                *buf = rest;
                match tag {
                    1 => frame.function = text,
                    2 => frame.module = text,
                    _ => frame.file = text,
                }
            }
            (4..=6, WireType::Varint) => {
                let value = encoding::decode_varint(buf).map_err(|err| err.to_string())?;
                match tag {
                    4 => frame.line = value as u32,
                    5 => frame.address = value,
                    _ => frame.kind = value as i32,
                }
            }
            (_, wire_type) => skip(buf, tag, wire_type)?,
        }
    }
    Ok(frame)
}

fn length(buf: &mut &[u8]) -> Result<usize, String> {
    let len = encoding::decode_varint(buf).map_err(|err| err.to_string())?;
    usize::try_from(len)
        .ok()
        .filter(|&len| len <= buf.len())
        .ok_or_else(|| "a field runs past the end of the frame".to_owned())
}

fn skip(buf: &mut &[u8], tag: u32, wire_type: WireType) -> Result<(), String> {
    let len = match wire_type {
        WireType::Varint => {
            encoding::decode_varint(buf).map_err(|err| err.to_string())?;
            0
        }
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::LengthDelimited => length(buf)?,
        WireType::StartGroup | WireType::EndGroup => {
            return Err(format!("field {tag} uses groups, which frames never do"));
        }
    };
    if len > buf.len() {
        return Err("a field runs past the end of the frame".to_owned());
    }
    *buf = &buf[len..];
    Ok(())
}

/// Appends `frame` as one element of a `repeated Frame` field numbered `tag`.
pub fn append_frame(out: &mut Vec<u8>, tag: u32, frame: &[u8]) {
    encoding::encode_key(tag, WireType::LengthDelimited, out);
    encoding::encode_varint(frame.len() as u64, out);
    out.put_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_in_place_match_prost() {
        let frame = v1::Frame {
            function: "main::run".to_owned(),
            module: "/usr/bin/svc".to_owned(),
            file: "src/main.rs".to_owned(),
            line: 42,
            address: 0xdead_beef,
            kind: v1::FrameKind::Kernel as i32,
        };
        let encoded = frame.encode_to_vec();
        let read = parse_frame(&encoded).expect("valid frame");
        assert_eq!(read.function, "main::run");
        assert_eq!(read.module, "/usr/bin/svc");
        assert_eq!(read.file, "src/main.rs");
        assert_eq!((read.line, read.address), (42, 0xdead_beef));
        assert_eq!(read.kind, v1::FrameKind::Kernel as i32);
        assert!(parse_frame(&encoded[..encoded.len() - 1]).is_err());
        assert!(parse_frame(&[0x0a, 0x02, 0xff, 0xfe]).is_err(), "bad UTF-8");
        // A field this version does not know is skipped.
        let mut extended = encoded.clone();
        encoding::encode_key(15, WireType::LengthDelimited, &mut extended);
        encoding::encode_varint(1, &mut extended);
        extended.push(b'x');
        assert_eq!(parse_frame(&extended), Ok(read));
    }

    #[test]
    fn a_batch_decodes_with_raw_frames() {
        let batch =
            crate::synthetic::batch("a", "h", 7, 10, 20, crate::synthetic::Shape::default());
        let frames = batch.frames.clone();
        let decoded = DecodedBatch::from(batch);
        assert_eq!(decoded.sequence, 7);
        assert_eq!(decoded.frames.len(), frames.len());
        let back = v1::Frame::decode(decoded.frames[3].clone()).expect("a frame");
        assert_eq!(back, frames[3]);
        let mut stack = Vec::new();
        append_frame(&mut stack, 1, &decoded.frames[3]);
        assert_eq!(
            crate::batch::StoredStack::decode(stack.as_slice())
                .expect("a stack")
                .frames,
            vec![frames[3].clone()]
        );
    }
}
