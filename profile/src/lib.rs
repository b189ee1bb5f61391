//! stallscope's profile model, shared by agent, collector and CLI: interned frames,
//! samples with labels and values, merging, and the file formats (folded stacks, pprof,
//! SVG flame graphs, speedscope), and the Prometheus text format of the
//! components' self-metrics.

pub mod error;
pub mod exposition;
pub mod folded;
pub mod format;
pub mod model;
pub mod pprof;
pub mod speedscope;
pub mod svg;
pub mod view;

pub use error::FormatError;
pub use folded::{FoldedStack, folded_stacks, parse_folded, profile_from_folded, write_folded};
pub use format::{EXTENSIONS_HELP, OutputFormat, write_profile};
pub use model::{
    BinaryInfo, ChangeEvent, ChangeKind, Frame, FrameId, FrameKind, HashIndex, Histogram, Labels,
    Meta, Profile, Sample, SampleType,
};
pub use pprof::{decode_pprof, decode_pprof_with_limit, encode_pprof, encode_pprof_uncompressed};
pub use speedscope::write_speedscope;
pub use svg::write_svg;
pub use view::{FlameView, flame_frames};
