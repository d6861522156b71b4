//! The file source (`--services <file|dir>`): Services, EndpointSlices and Nodes from
//! manifests as `kubectl get -o yaml` (multi-document, or `kind: List`) or `-o json`
//! prints them. The state is computed for the node given with [`FileSource::with_node`].
//!
//! Every load re-reads all files and rebuilds the object set, with these rules:
//! - a valid object replaces its previous version;
//! - an object that fails to decode or validate keeps its previous valid version (if it
//!   had one) and the error names the file, the object and the field;
//! - an object no longer in any file is removed;
//! - a file that cannot be read or is not valid YAML/JSON as a whole keeps every object
//!   it held before; so does, for the objects not found in it now, a file with a document
//!   whose kind or name cannot be read (the broken document may be any of them, and
//!   dropping a service because of a typo in its name line would be worse than keeping a
//!   deleted one until the typo is fixed).
//!
//! Changes are found by polling every 100 ms rather than through inotify: editors save
//! by renaming, and Kubernetes ConfigMap volumes swap a `..data` symlink, both of which
//! a watch on the original inode misses. A poll costs one `stat` per file. A change is
//! loaded once the files look the same on two polls in a row, so a file caught between
//! truncation and write (an in-place save) is never read as "all objects deleted".
//! Edits apply within about 0.2 s.//!
//! Layout: `load` (one full read of the files into a new object set), `read` (listing
//! and parsing the files), `poll` (the stamps that detect a change and the loop that
//! follows it), `error` (why the path as a whole could not be read).

mod error;
mod load;
mod poll;
mod read;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use error::{FileSourceError, ManifestError};
pub use poll::POLL_INTERVAL;

use super::ObjectStore;
use crate::model::{DesiredState, NodeSettings};
use crate::translate::ObjectRef;
use poll::Fingerprint;

/// Reads Services, EndpointSlices and Nodes from a file or directory and follows its
/// changes.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    /// Which node this is: local endpoints and NodePort addresses.
    node: NodeSettings,
    store: ObjectStore,
    /// File each object in the store was read from.
    origin: BTreeMap<ObjectRef, PathBuf>,
    errors: Vec<ManifestError>,
    warnings: Vec<String>,
    /// Messages already logged, so an unchanged problem is not logged on every change.
    logged: BTreeSet<String>,
    /// Stamps of the files as of the last load.
    fingerprint: Option<Fingerprint>,
    /// A change seen by the last poll, loaded if the next poll sees the same.
    pending: Option<Fingerprint>,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            node: NodeSettings::default(),
            store: ObjectStore::new(),
            origin: BTreeMap::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
            logged: BTreeSet::new(),
            fingerprint: None,
            pending: None,
        }
    }

    /// Sets the node the state is computed for (default: no name, so every endpoint is
    /// local, and NodePorts only on the addresses of the Node objects in the files).
    pub fn with_node(mut self, node: NodeSettings) -> Self {
        self.node = node;
        self
    }

    /// The file or directory this source reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Errors from the last load (file, object, field and reason), one per problem.
    pub fn errors(&self) -> &[ManifestError] {
        &self.errors
    }

    /// Warnings from the last load: parts of valid objects that are skipped (SCTP ports,
    /// frontends claimed by two services).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The state of the last load, without reading anything.
    pub fn state(&self) -> DesiredState {
        self.store.desired_state(&self.node)
    }
}
