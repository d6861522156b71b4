//! Decoding manifests as `kubectl get -o yaml|json` prints them into [`Object`]s, item by
//! item, naming the object and the field of every failure.

use std::fmt;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use super::Object;
use crate::translate::{ObjectKind, ObjectRef, DEFAULT_NAMESPACE};

/// What one decoded item is.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    Object(Object),
    /// A kind this agent does not use (a Deployment in the same manifest, say).
    Ignored {
        api_version: String,
        kind: String,
    },
}

/// A document or list item that could not be decoded into an object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct DecodeError {
    /// `items[3]` for an item of a `kind: List`, empty for a top-level document.
    pub location: String,
    /// The object, when its kind and name could be read.
    pub object: Option<ObjectRef>,
    /// Field path within the object (or item), e.g. `spec.ports[0].port`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.location.is_empty() {
            write!(f, "{}: ", self.location)?;
        }
        if let Some(o) = &self.object {
            write!(f, "{o}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.reason)
    }
}

/// The location of an item in its document, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located<T> {
    /// `items[3]` inside a list, empty otherwise.
    pub location: String,
    pub value: T,
}

type Items = Vec<Result<Located<Decoded>, DecodeError>>;

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// Decodes one document as `kubectl get -o yaml|json` prints it: a single object, or a
/// `kind: List` (or `ServiceList`, ...) whose `items` are objects. Each item is decoded
/// on its own, so one bad item does not hide the others. Missing namespaces become
/// `default`.
pub fn decode(doc: Value) -> Vec<Result<Located<Decoded>, DecodeError>> {
    let mut out = Vec::new();
    decode_into(doc, String::new(), &mut out);
    out
}

/// Decodes `doc` found at `location` (a list's items recursively) into `out`.
fn decode_into(doc: Value, location: String, out: &mut Items) {
    let err = |object: Option<ObjectRef>, field: &str, reason: &str| DecodeError {
        location: location.clone(),
        object,
        field: field.to_owned(),
        reason: reason.to_owned(),
    };
    if !doc.is_object() {
        let reason = "not a mapping (expected a Kubernetes object)";
        out.push(Err(err(None, "", reason)));
        return;
    }
    let Some(kind) = str_at(&doc, &["kind"]).map(str::to_owned) else {
        out.push(Err(err(None, "kind", "missing")));
        return;
    };
    let api_version = str_at(&doc, &["apiVersion"]).unwrap_or_default().to_owned();
    if kind.ends_with("List") {
        if let Some(Value::Array(items)) = doc.get("items") {
            decode_list_items(items, &location, out);
            return;
        }
    }
    let Some(object_kind) = known_kind(&api_version, &kind) else {
        out.push(Ok(Located {
            location,
            value: Decoded::Ignored { api_version, kind },
        }));
        return;
    };
    // Identify the object before the typed decode so a type error still names it (and
    // the source can keep its previous version).
    let object = identify(&doc, object_kind);
    if object.name.is_empty() {
        out.push(Err(err(Some(object), "metadata.name", "missing")));
        return;
    }
    out.push(match decode_typed(doc, object_kind) {
        Ok(obj) => Ok(Located {
            location,
            value: Decoded::Object(obj),
        }),
        Err(e) => {
            let field = e.path().to_string();
            Err(err(Some(object), &field, &e.into_inner().to_string()))
        }
    });
}

/// The items of a `kind: List`, each at `items[i]` under `location`.
fn decode_list_items(items: &[Value], location: &str, out: &mut Items) {
    for (i, item) in items.iter().enumerate() {
        let loc = if location.is_empty() {
            format!("items[{i}]")
        } else {
            format!("{location}.items[{i}]")
        };
        decode_into(item.clone(), loc, out);
    }
}

/// The kinds this agent reads; `None` for every other kind.
fn known_kind(api_version: &str, kind: &str) -> Option<ObjectKind> {
    match (api_version, kind) {
        ("v1", "Service") => Some(ObjectKind::Service),
        ("discovery.k8s.io/v1", "EndpointSlice") => Some(ObjectKind::EndpointSlice),
        ("v1", "Node") => Some(ObjectKind::Node),
        _ => None,
    }
}

/// Kind, namespace and name as far as they can be read from the untyped document (the
/// name empty when missing). Nodes are cluster-scoped: no namespace.
fn identify(doc: &Value, kind: ObjectKind) -> ObjectRef {
    let namespace = match kind {
        ObjectKind::Node => String::new(),
        ObjectKind::Service | ObjectKind::EndpointSlice => str_at(doc, &["metadata", "namespace"])
            .filter(|n| !n.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_owned(),
    };
    let name = str_at(doc, &["metadata", "name"]).unwrap_or_default();
    ObjectRef {
        kind,
        namespace,
        name: name.to_owned(),
    }
}

/// The typed object; the error carries the path of the field that failed.
fn decode_typed(
    doc: Value,
    kind: ObjectKind,
) -> Result<Object, serde_path_to_error::Error<serde_json::Error>> {
    match kind {
        ObjectKind::Service => serde_path_to_error::deserialize::<_, Service>(doc).map(|mut s| {
            default_namespace(&mut s.metadata);
            Object::Service(Box::new(s))
        }),
        ObjectKind::EndpointSlice => {
            serde_path_to_error::deserialize::<_, EndpointSlice>(doc).map(|mut s| {
                default_namespace(&mut s.metadata);
                Object::EndpointSlice(Box::new(s))
            })
        }
        ObjectKind::Node => {
            serde_path_to_error::deserialize::<_, Node>(doc).map(|n| Object::Node(Box::new(n)))
        }
    }
}

fn default_namespace(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
    }
}
