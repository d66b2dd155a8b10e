//! Directories of their own, removed afterwards.

use std::path::{Path, PathBuf};

use soloist::uuid::Uuid;

/// A new, empty directory `<prefix>-<uuid>`, removed with everything in it by
/// [`TempDir::remove`] or, best effort, when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    /// Cleared once removed, so that `Drop` does not try again.
    live: bool,
}

impl TempDir {
    /// A new directory under the system's temporary directory.
    pub fn new(prefix: &str) -> std::io::Result<TempDir> {
        TempDir::new_in(&std::env::temp_dir(), prefix)
    }

    /// A new directory under `parent` (created if missing): e.g. on the build's disk rather
    /// than a memory-backed `/tmp`, where a sync costs what it costs in production.
    pub fn new_in(parent: &Path, prefix: &str) -> std::io::Result<TempDir> {
        let path = parent.join(format!("{prefix}-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path, live: true })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directory and everything in it, and says whether that worked.
    pub fn remove(mut self) -> std::io::Result<()> {
        self.live = false;
        std::fs::remove_dir_all(&self.path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.live {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
