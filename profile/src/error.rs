//! The one error type of the file formats: reading, writing and rendering profiles.

use std::io;

/// Why a profile could not be read, written or rendered.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("I/O error while reading or writing a profile: {0}")]
    Io(#[from] io::Error),

    /// A line of folded-stack input that is not `frame;frame;... count`.
    #[error("folded stacks, line {line}: {reason}")]
    Malformed { line: usize, reason: String },

    #[error(
        "not a pprof profile (protobuf decoding failed: {0}); expected a gzip-compressed or raw profile.proto message"
    )]
    Protobuf(#[from] prost::DecodeError),

    /// A pprof message that decodes but does not hang together (dangling ids or string
    /// indices, corrupt gzip data).
    #[error("invalid pprof profile: {0}")]
    InvalidPprof(String),

    #[error(
        "profile decompresses to more than {limit} bytes; refusing it as a likely compression bomb"
    )]
    TooLarge { limit: u64 },

    #[error("rendering the flame graph failed: {0}")]
    Render(String),

    #[error("writing speedscope JSON failed: {0}")]
    Json(#[from] serde_json::Error),

    #[error(
        "sample type {index} does not exist: the profile has {available} sample type(s), numbered from 0"
    )]
    NoSuchSampleType { index: usize, available: usize },
}
