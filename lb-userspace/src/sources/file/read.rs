//! Finding the manifest files of the path and splitting a file into documents.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::{FileSourceError, ManifestError};

/// The manifest files of `path`: the file itself, or the files of the directory whose
/// names end in `.yaml`, `.yml` or `.json` (any case), hidden files excepted.
pub(super) fn list_manifests(path: &Path) -> Result<Vec<PathBuf>, FileSourceError> {
    let meta = std::fs::metadata(path).map_err(|source| FileSourceError::Access {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let list_err = |source| FileSourceError::List {
        path: path.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(list_err)? {
        let entry = entry.map_err(list_err)?;
        let p = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Hidden files: editor swap files, ConfigMap volumes' `..data` machinery.
        if name.starts_with('.') || !is_manifest_name(&name) {
            continue;
        }
        // A dangling symlink stays in the list: reading it fails, and the objects
        // it held are kept, as for any file that cannot be read.
        if std::fs::metadata(&p).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        files.push(p);
    }
    Ok(files)
}

fn is_manifest_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".yaml") || lower.ends_with(".yml") || lower.ends_with(".json")
}

fn is_json(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// Splits a file into documents (numbered from 1). Err: the file as a whole is not valid
/// YAML (or JSON for `.json` files).
pub(super) fn parse_documents(
    path: &Path,
    text: &str,
) -> Result<Vec<(usize, Value)>, ManifestError> {
    if is_json(path) {
        let v: Value = serde_json::from_str(text).map_err(|source| ManifestError::InvalidJson {
            path: path.to_owned(),
            source,
        })?;
        return Ok(vec![(1, v)]);
    }
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let y =
            serde_yaml::Value::deserialize(de).map_err(|source| ManifestError::InvalidYaml {
                path: path.to_owned(),
                document,
                source,
            })?;
        if y.is_null() {
            // `---` at the end of a file, or a document of only comments.
            continue;
        }
        let v = serde_json::to_value(&y).map_err(|source| ManifestError::NotData {
            path: path.to_owned(),
            document,
            source,
        })?;
        out.push((document, v));
    }
    Ok(out)
}
