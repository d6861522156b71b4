//! One load: every file read again into a new object set, keeping the previous valid
//! version of whatever cannot be read now (the rules are on the module page).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::item_location;
use super::poll::fingerprint;
use super::read::parse_documents;
use super::{FileSource, FileSourceError, ManifestError};
use crate::model::DesiredState;
use crate::sources::{decode, DecodeError, Decoded, Located, Object, ObjectStore};
use crate::translate::ObjectRef;

impl FileSource {
    /// Reads all files now and returns the resulting state. Err only when the path
    /// itself cannot be read (missing, or a directory that cannot be listed); problems in
    /// single files or objects are in [`FileSource::errors`].
    pub fn load(&mut self) -> Result<DesiredState, FileSourceError> {
        let fingerprint = fingerprint(&self.path)?;
        let mut next = Loading::new(&self.store, &self.origin);
        for file in fingerprint.keys() {
            next.read_file(file);
        }
        let Loading {
            store,
            origin,
            errors,
            mut warnings,
            ..
        } = next;

        let translation = store.translate(&self.node);
        warnings.extend(
            translation
                .conflicts
                .iter()
                .map(std::string::ToString::to_string),
        );
        let error_texts: Vec<String> = errors.iter().map(ToString::to_string).collect();
        self.log_new_messages(&error_texts, &warnings);
        self.store = store;
        self.origin = origin;
        self.errors = errors;
        self.warnings = warnings;
        self.fingerprint = Some(fingerprint);
        Ok(translation.state)
    }

    /// Logs the problems not already logged by the previous load: an unchanged problem
    /// is not repeated on every change of another file.
    fn log_new_messages(&mut self, errors: &[String], warnings: &[String]) {
        for msg in errors.iter().chain(warnings) {
            if !self.logged.contains(msg) {
                tracing::warn!(path = %self.path.display(), "{msg}");
            }
        }
        self.logged = errors.iter().chain(warnings).cloned().collect();
    }
}

/// A load in progress: the new object set, built file by file, with the previous load's
/// objects at hand to keep the ones that cannot be read now.
struct Loading<'a> {
    previous: &'a ObjectStore,
    previous_origin: &'a BTreeMap<ObjectRef, PathBuf>,
    store: ObjectStore,
    /// File each object of `store` was read from (or kept for).
    origin: BTreeMap<ObjectRef, PathBuf>,
    errors: Vec<ManifestError>,
    warnings: Vec<String>,
}

impl<'a> Loading<'a> {
    fn new(previous: &'a ObjectStore, previous_origin: &'a BTreeMap<ObjectRef, PathBuf>) -> Self {
        Self {
            previous,
            previous_origin,
            store: ObjectStore::new(),
            origin: BTreeMap::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Reads one file; a file that cannot be read or parsed as a whole keeps every object
    /// it held.
    fn read_file(&mut self, file: &Path) {
        let docs = std::fs::read_to_string(file)
            .map_err(|source| ManifestError::Unreadable {
                path: file.to_owned(),
                source,
            })
            .and_then(|text| {
                if text.is_empty() {
                    return Err(ManifestError::Empty {
                        path: file.to_owned(),
                    });
                }
                // Some Windows editors start UTF-8 files with a byte order mark, which
                // neither YAML nor JSON parsers take as white space.
                parse_documents(file, text.strip_prefix('\u{feff}').unwrap_or(&text))
            });
        let docs = match docs {
            Ok(docs) => docs,
            Err(e) => {
                self.errors.push(e);
                self.carry_file(file);
                return;
            }
        };
        let mut unidentified = false;
        for (document, doc) in docs {
            unidentified |= self.read_document(file, document, doc);
        }
        if unidentified {
            self.carry_file(file);
        }
    }

    /// Applies the objects of one document. True when an item could not even be named,
    /// so that any of the file's previous objects may be the broken one.
    fn read_document(&mut self, file: &Path, document: usize, doc: Value) -> bool {
        let mut unidentified = false;
        for item in decode(doc) {
            match item {
                Ok(Located {
                    value: Decoded::Ignored { api_version, kind },
                    location,
                }) => {
                    let at = item_location(file, document, &location);
                    if let Some(instead) = unused_endpoints_kind(&api_version, &kind) {
                        self.warnings
                            .push(format!("{at}: {api_version} {kind} is not used: {instead}"));
                    } else {
                        tracing::debug!(file = %file.display(), "{at}: ignoring {api_version}/{kind}");
                    }
                }
                Ok(Located {
                    value: Decoded::Object(obj),
                    location,
                }) => self.apply_object(file, document, location, obj),
                Err(e) => unidentified |= self.undecodable(file, document, e),
            }
        }
        unidentified
    }

    /// Takes a decoded object, unless another file defined it first; an invalid one
    /// keeps its previous version.
    fn apply_object(&mut self, file: &Path, document: usize, location: String, obj: Object) {
        let key = obj.key();
        if let Some(first) = self.origin.get(&key) {
            self.errors.push(ManifestError::Duplicate {
                path: file.to_owned(),
                document,
                location,
                object: Box::new(key),
                first: first.clone(),
            });
            return;
        }
        match self.store.apply(obj) {
            Ok(w) => {
                self.origin.insert(key, file.to_owned());
                let at = item_location(file, document, &location);
                self.warnings
                    .extend(w.into_iter().map(|w| format!("{at}: {w}")));
            }
            Err(source) => {
                self.errors.push(ManifestError::Invalid {
                    path: file.to_owned(),
                    document,
                    location,
                    source: Box::new(source),
                });
                self.carry(&key, file);
            }
        }
    }

    /// Reports an item that did not decode and keeps the previous version of its object.
    /// True when the object could not be named.
    fn undecodable(&mut self, file: &Path, document: usize, e: DecodeError) -> bool {
        let named = match &e.object {
            Some(key) if !key.name.is_empty() => Some(key.clone()),
            _ => None,
        };
        self.errors.push(ManifestError::Undecodable {
            path: file.to_owned(),
            document,
            source: Box::new(e),
        });
        match named {
            Some(key) => {
                self.carry(&key, file);
                false
            }
            None => true,
        }
    }

    /// Keeps the previous version of `key` (if any), now attributed to `file`.
    fn carry(&mut self, key: &ObjectRef, file: &Path) {
        if self.origin.contains_key(key) {
            return;
        }
        if let Some(old) = self.previous.get(key) {
            // It was valid when stored and validation is deterministic.
            if self.store.apply(old.clone()).is_ok() {
                self.origin.insert(key.clone(), file.to_owned());
            }
        }
    }

    /// Keeps every previous object of `file` not already present in the new set.
    fn carry_file(&mut self, file: &Path) {
        let keys: Vec<ObjectRef> = self
            .previous_origin
            .iter()
            .filter(|(_, f)| f.as_path() == file)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.carry(&key, file);
        }
    }
}

/// Endpoint objects in a form xdplb does not read. Other kinds are ignored quietly (a
/// services file may hold Deployments and the like), but these look like the endpoints of
/// a service and would leave it without any: said (once, as a warning), with what to write.
fn unused_endpoints_kind(api_version: &str, kind: &str) -> Option<&'static str> {
    match (api_version, kind) {
        ("v1", "Endpoints") => Some(
            "endpoints are read from discovery.k8s.io/v1 EndpointSlices, as kube-proxy reads \
             them (`kubectl get endpointslices -A -o yaml` prints them)",
        ),
        (version, "EndpointSlice") if version != "discovery.k8s.io/v1" => Some(
            "only discovery.k8s.io/v1 EndpointSlices are read (v1beta1 was removed in \
             Kubernetes 1.25): write `apiVersion: discovery.k8s.io/v1`",
        ),
        _ => None,
    }
}
