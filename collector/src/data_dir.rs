//! The SQLite data directory's lock: one collector per directory. Two collectors writing
//! one SQLite store would each believe they own the retention passes and the rollup, so
//! the second one is refused at start-up with the first one's pid.
//!
//! The lock is an exclusive `flock` on `<data dir>/collector.lock`, held for the
//! collector's lifetime: the kernel releases it when the process exits, however it
//! exits, so a crash never leaves a stale lock behind.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "collector.lock";

#[derive(Debug, Error)]
pub enum DataDirError {
    #[error("cannot create the data directory {}: {source}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the lock file {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the data directory {} is in use by another stallscope-collector{}: stop that one, or give this one another --data-dir",
        dir.display(),
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    InUse { dir: PathBuf, holder: Option<u32> },
}

/// Holds the data directory's lock until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    // Dropping the file closes it, which releases the flock.
    _file: File,
}

impl DataDirLock {
    /// Creates `dir` if needed and takes its lock, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, DataDirError> {
        std::fs::create_dir_all(dir).map_err(|source| DataDirError::Create {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(LOCK_FILE);
        let open = |source| DataDirError::Open {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(open)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(DataDirError::InUse {
                    dir: dir.to_owned(),
                    holder: text.trim().parse().ok(),
                });
            }
            Err(TryLockError::Error(source)) => return Err(open(source)),
        }
        // The pid is for the message a second collector prints; the lock is the flock.
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = writeln!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_directory_is_refused_until_the_first_is_dropped() {
        let dir = std::env::temp_dir().join(format!("stallscope-datadir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = DataDirLock::acquire(&dir).expect("first lock");
        let err = DataDirLock::acquire(&dir).expect_err("second lock refused");
        let message = err.to_string();
        assert!(
            message.contains("in use by another stallscope-collector")
                && message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(first);
        let again = DataDirLock::acquire(&dir).expect("free again");
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
