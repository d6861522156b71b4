//! Why the file source could not read its path. Problems inside single files or objects
//! are not errors of the source: they are collected in `FileSource::errors` and the
//! previous valid versions stay in force.

use std::path::{Path, PathBuf};

use crate::sources::DecodeError;
use crate::translate::{ObjectRef, TranslateError};

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

/// A problem in one manifest file, reported in `FileSource::errors`: the objects it
/// concerns keep their previous valid version. The messages name the file, the document
/// (numbered from 1), the item of a list and the object; each embeds its source's text,
/// so that the one-line message is complete (`error_chain` does not repeat it). The
/// larger sources are boxed to keep the type small.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A file of zero bytes is taken as being written (editors and config tools truncate
    /// before they write), so every object it held is kept. A file meant to hold no
    /// objects says so with content: a comment, or a `kind: List` without items.
    #[error(
        "{}: empty (zero bytes), taken as being written; keeping the objects read from it before \
         (write a comment into it to remove them)",
        path.display()
    )]
    Empty { path: PathBuf },
    /// The file cannot be read: every object it held is kept.
    #[error("{}: cannot read: {source}; keeping the objects read from it before", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `.json` file that is not JSON as a whole: every object it held is kept.
    #[error("{}: invalid JSON: {source}; keeping the objects read from it before", path.display())]
    InvalidJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A YAML document that does not parse: every object of the file is kept.
    #[error(
        "{}: invalid YAML in document {document}: {source}; keeping the objects read from it before",
        path.display()
    )]
    InvalidYaml {
        path: PathBuf,
        document: usize,
        #[source]
        source: serde_yaml::Error,
    },
    /// A YAML document that has no JSON form (a non-string key, say): every object of
    /// the file is kept.
    #[error(
        "{}: document {document} cannot be read as JSON-like data: {source}; keeping the objects read from it before",
        path.display()
    )]
    NotData {
        path: PathBuf,
        document: usize,
        #[source]
        source: serde_json::Error,
    },
    /// An item that does not decode into an object (its location is in `source`).
    #[error("{}: document {document}: {source}", path.display())]
    Undecodable {
        path: PathBuf,
        document: usize,
        #[source]
        source: Box<DecodeError>,
    },
    /// An object that decodes but is not valid.
    #[error("{}: {source}", item_location(path, *document, location))]
    Invalid {
        path: PathBuf,
        document: usize,
        /// `items[3]` inside a list, empty otherwise.
        location: String,
        #[source]
        source: Box<TranslateError>,
    },
    /// An object already read from another file (or earlier in this one).
    #[error(
        "{}: {object}: also defined in {}; the first definition is used",
        item_location(path, *document, location),
        first.display()
    )]
    Duplicate {
        path: PathBuf,
        document: usize,
        location: String,
        object: Box<ObjectRef>,
        /// The file whose definition is used.
        first: PathBuf,
    },
}

/// `file: document 2` or `file: document 2, items[3]`, the prefix of an item's messages.
pub(super) fn item_location(path: &Path, document: usize, location: &str) -> String {
    let shown = path.display();
    if location.is_empty() {
        format!("{shown}: document {document}")
    } else {
        format!("{shown}: document {document}, {location}")
    }
}
