//! Writing a profile file the way `perf record` does: the format comes from the extension,
//! the file appears complete or not at all (written to a temporary file in the same
//! directory, then renamed), and a failed run leaves nothing behind.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use stallscope_profile::{
    Profile,
    format::{EXTENSIONS_HELP, OutputFormat, write_profile},
    view::FlameView,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum OutputError {
    #[error("unsupported output file {path}: use one of {EXTENSIONS_HELP}")]
    UnknownFormat { path: PathBuf },
    #[error("cannot write {path}: {source}; choose a writable path")]
    Unwritable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path} failed: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// An output file being prepared: a temporary sibling that becomes the real file on
/// [`StagedOutput::commit`] and disappears if dropped before.
pub struct StagedOutput {
    target: PathBuf,
    temp: PathBuf,
    format: OutputFormat,
    committed: bool,
}

impl StagedOutput {
    /// Checks the extension and that the directory is writable, by creating the temporary
    /// file right away (before any profiling work).
    pub fn create(target: &Path) -> Result<Self, OutputError> {
        let format = OutputFormat::from_path(target).ok_or_else(|| OutputError::UnknownFormat {
            path: target.to_owned(),
        })?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = target.with_file_name(format!(".{name}.stallscope-{}.tmp", std::process::id()));
        File::create(&temp).map_err(|source| OutputError::Unwritable {
            path: target.to_owned(),
            source,
        })?;
        Ok(Self {
            target: target.to_owned(),
            temp,
            format,
            committed: false,
        })
    }

    pub fn format(&self) -> OutputFormat {
        self.format
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Writes `profile` and moves it into place.
    pub fn commit(mut self, profile: &Profile, title: &str) -> Result<(), OutputError> {
        let write_error = |reason: String| OutputError::Write {
            path: self.target.clone(),
            reason,
        };
        let file = File::create(&self.temp).map_err(|e| write_error(e.to_string()))?;
        let mut out = BufWriter::new(file);
        let view = FlameView::default();
        if self.format == OutputFormat::Pprof {
            write_profile(
                self.format,
                profile,
                profile.meta.default_sample_type,
                &view,
                title,
                &mut out,
            )
        } else {
            // Flame graphs take one value: the time columns of every signal, summed (each
            // sample belongs to one signal, so nothing is counted twice).
            let time = profile.time_only();
            write_profile(self.format, &time, 0, &view, title, &mut out)
        }
        .map_err(|e| write_error(e.to_string()))?;
        out.flush().map_err(|e| write_error(e.to_string()))?;
        out.get_ref()
            .sync_all()
            .map_err(|e| write_error(e.to_string()))?;
        std::fs::rename(&self.temp, &self.target).map_err(|e| write_error(e.to_string()))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}
