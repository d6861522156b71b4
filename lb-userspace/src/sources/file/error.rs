//! Why the file source could not read its path. Problems inside single files or objects
//! are not errors of the source: they are collected in `FileSource::errors` and the
//! previous valid versions stay in force.

use std::path::PathBuf;

/// The path given with `--services` could not be read as a whole.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    /// The file or directory is missing or cannot be stat'ed.
    #[error("cannot access {}", path.display())]
    Access {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The directory cannot be listed.
    #[error("cannot list {}", path.display())]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The first load of a running source failed: nothing to send.
    #[error("reading services from {}", path.display())]
    FirstLoad {
        path: PathBuf,
        #[source]
        source: Box<FileSourceError>,
    },
    /// The blocking task that reads the files panicked or was cancelled.
    #[error("file source task failed")]
    Task(#[source] tokio::task::JoinError),
}
