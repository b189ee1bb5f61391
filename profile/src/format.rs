//! Choosing an output format from a file name, and writing a profile in it.

use std::{fmt, io::Write, path::Path};

use crate::{
    error::FormatError, folded::write_folded, model::Profile, pprof::encode_pprof,
    speedscope::write_speedscope, svg::write_svg, view::FlameView,
};

/// The supported file extensions, for "unknown format" messages.
pub const EXTENSIONS_HELP: &str = ".folded (folded stacks), .pb.gz or .pb (pprof), \
                                   .svg (flame graph), .json (speedscope)";

/// A file format a profile can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputFormat {
    /// Folded stacks, one `root;...;leaf value` line per stack.
    Folded,
    /// pprof's gzip-compressed protobuf.
    Pprof,
    /// An interactive flame graph.
    Svg,
    /// speedscope's JSON.
    Speedscope,
}

impl OutputFormat {
    /// The format a file name asks for, by extension (case-insensitive); `None` for
    /// others (see [`EXTENSIONS_HELP`]).
    pub fn from_path(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        [
            (".folded", Self::Folded),
            (".pb.gz", Self::Pprof),
            (".pb", Self::Pprof),
            (".svg", Self::Svg),
            (".json", Self::Speedscope),
        ]
        .into_iter()
        .find(|(extension, _)| name.len() > extension.len() && name.ends_with(extension))
        .map(|(_, format)| format)
    }

    /// The usual extension of files in this format, with its dot.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Folded => ".folded",
            Self::Pprof => ".pb.gz",
            Self::Svg => ".svg",
            Self::Speedscope => ".json",
        }
    }
}

impl fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Folded => "folded stacks",
            Self::Pprof => "pprof",
            Self::Svg => "SVG flame graph",
            Self::Speedscope => "speedscope JSON",
        })
    }
}

/// Writes `profile` in `format`. `value_index` picks the value column of the
/// single-column formats (folded, SVG, speedscope) and `title` names the graph or
/// speedscope profile; pprof always carries every column and ignores both.
pub fn write_profile<W: Write>(
    format: OutputFormat,
    profile: &Profile,
    value_index: usize,
    view: &FlameView,
    title: &str,
    mut out: W,
) -> Result<(), FormatError> {
    match format {
        OutputFormat::Folded => write_folded(profile, value_index, view, out),
        OutputFormat::Pprof => {
            out.write_all(&encode_pprof(profile))?;
            out.flush()?;
            Ok(())
        }
        OutputFormat::Svg => write_svg(profile, value_index, view, title, out),
        OutputFormat::Speedscope => write_speedscope(profile, value_index, view, title, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Frame, Labels, SampleType},
        pprof::decode_pprof,
    };

    #[test]
    fn formats_come_from_extensions() {
        let format = |name: &str| OutputFormat::from_path(Path::new(name));
        assert_eq!(format("out/waits.folded"), Some(OutputFormat::Folded));
        assert_eq!(format("waits.pb.gz"), Some(OutputFormat::Pprof));
        assert_eq!(format("waits.PB"), Some(OutputFormat::Pprof));
        assert_eq!(format("waits.svg"), Some(OutputFormat::Svg));
        assert_eq!(format("waits.json"), Some(OutputFormat::Speedscope));
        assert_eq!(format("waits.txt"), None);
        assert_eq!(format("waits.gz"), None);
        assert_eq!(format(".svg"), None, "a bare extension is not a file name");
        assert_eq!(format("dir.svg/"), Some(OutputFormat::Svg));
        assert_eq!(format(""), None);
        for format in [
            OutputFormat::Folded,
            OutputFormat::Pprof,
            OutputFormat::Svg,
            OutputFormat::Speedscope,
        ] {
            let name = format!("x{}", format.extension());
            assert_eq!(OutputFormat::from_path(Path::new(&name)), Some(format));
            assert!(EXTENSIONS_HELP.contains(format.extension()));
        }
    }

    #[test]
    fn write_profile_dispatches_to_each_writer() {
        let mut profile = Profile::new(vec![SampleType::new("off_cpu", "nanoseconds")]);
        let main = profile.intern(Frame::synthetic("main"));
        profile.add(vec![main], Labels::new(), &[9]);
        let write = |format| {
            let mut out = Vec::new();
            write_profile(format, &profile, 0, &FlameView::default(), "t", &mut out)
                .expect("writes to memory");
            out
        };
        assert_eq!(write(OutputFormat::Folded), b"main 9\n");
        let decoded = decode_pprof(&write(OutputFormat::Pprof)).expect("pprof decodes");
        assert_eq!(decoded.total(0), 9);
        assert!(write(OutputFormat::Svg).starts_with(b"<?xml"));
        assert!(write(OutputFormat::Speedscope).starts_with(b"{\"$schema\""));
    }
}
