//! Where the desired state comes from. Every source (the manifest files today, the
//! Kubernetes API later) decodes objects with [`decode`], keeps the last valid version of
//! each in an [`ObjectStore`] and turns the store into a `DesiredState` through
//! `translate`, so both read manifests the same way.

pub mod file;

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use crate::model::DesiredState;
use crate::translate::{
    self, ObjectKind, ObjectRef, TranslateError, Translation, DEFAULT_NAMESPACE,
};

/// An object a source can feed to `translate`.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
}

impl Object {
    /// Kind, namespace and name: the key under which the store keeps the object.
    pub fn key(&self) -> ObjectRef {
        match self {
            Object::Service(s) => ObjectRef::new(ObjectKind::Service, &s.metadata),
            Object::EndpointSlice(s) => ObjectRef::new(ObjectKind::EndpointSlice, &s.metadata),
        }
    }

    /// Validates the object; `Ok` carries warnings (parts that will be skipped).
    pub fn validate(&self) -> Result<Vec<TranslateError>, TranslateError> {
        match self {
            Object::Service(s) => {
                translate::validate_service(s)?;
                Ok(translate::service_warnings(s))
            }
            Object::EndpointSlice(s) => translate::validate_slice(s).map(|()| Vec::new()),
        }
    }
}

/// The last valid version of every object, keyed by kind/namespace/name.
#[derive(Clone, Debug, Default)]
pub struct ObjectStore {
    objects: BTreeMap<ObjectRef, Object>,
}

impl ObjectStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates `obj` and, if valid, makes it the object's current version. If invalid,
    /// the store is unchanged (the previous valid version, if any, stays in force) and the
    /// error says why. `Ok` carries warnings about parts of the object that are skipped.
    pub fn apply(&mut self, obj: Object) -> Result<Vec<TranslateError>, TranslateError> {
        let warnings = obj.validate()?;
        self.objects.insert(obj.key(), obj);
        Ok(warnings)
    }

    /// Forgets an object (deleted upstream). Returns the removed version.
    pub fn remove(&mut self, key: &ObjectRef) -> Option<Object> {
        self.objects.remove(key)
    }

    pub fn get(&self, key: &ObjectRef) -> Option<&Object> {
        self.objects.get(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &ObjectRef> {
        self.objects.keys()
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// The desired state of everything in the store.
    pub fn desired_state(&self) -> DesiredState {
        self.translate().state
    }

    /// The desired state and the frontend conflicts resolved on the way (log them).
    pub fn translate(&self) -> Translation {
        let services = self.objects.values().filter_map(|o| match o {
            Object::Service(s) => Some(s.as_ref()),
            Object::EndpointSlice(_) => None,
        });
        let slices = self.objects.values().filter_map(|o| match o {
            Object::EndpointSlice(s) => Some(s.as_ref()),
            Object::Service(_) => None,
        });
        translate::translate_with_conflicts(services, slices)
    }
}

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

fn decode_into(doc: Value, location: String, out: &mut Vec<Result<Located<Decoded>, DecodeError>>) {
    let err = |object: Option<ObjectRef>, field: &str, reason: String| DecodeError {
        location: location.clone(),
        object,
        field: field.to_owned(),
        reason,
    };
    if !doc.is_object() {
        out.push(Err(err(
            None,
            "",
            "not a mapping (expected a Kubernetes object)".into(),
        )));
        return;
    }
    let Some(kind) = str_at(&doc, &["kind"]).map(str::to_owned) else {
        out.push(Err(err(None, "kind", "missing".into())));
        return;
    };
    let api_version = str_at(&doc, &["apiVersion"]).unwrap_or_default().to_owned();
    if kind.ends_with("List") {
        if let Some(Value::Array(items)) = doc.get("items") {
            for (i, item) in items.iter().enumerate() {
                let loc = if location.is_empty() {
                    format!("items[{i}]")
                } else {
                    format!("{location}.items[{i}]")
                };
                decode_into(item.clone(), loc, out);
            }
            return;
        }
    }
    let object_kind = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => ObjectKind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => ObjectKind::EndpointSlice,
        _ => {
            out.push(Ok(Located {
                location,
                value: Decoded::Ignored { api_version, kind },
            }));
            return;
        }
    };
    // Identify the object before the typed decode so a type error still names it (and
    // the source can keep its previous version).
    let object = str_at(&doc, &["metadata", "name"])
        .filter(|n| !n.is_empty())
        .map(|name| ObjectRef {
            kind: object_kind,
            namespace: str_at(&doc, &["metadata", "namespace"])
                .filter(|n| !n.is_empty())
                .unwrap_or(DEFAULT_NAMESPACE)
                .to_owned(),
            name: name.to_owned(),
        });
    let Some(object) = object else {
        let unnamed = ObjectRef {
            kind: object_kind,
            namespace: str_at(&doc, &["metadata", "namespace"])
                .unwrap_or(DEFAULT_NAMESPACE)
                .to_owned(),
            name: String::new(),
        };
        out.push(Err(err(Some(unnamed), "metadata.name", "missing".into())));
        return;
    };
    let typed = match object_kind {
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
    };
    out.push(match typed {
        Ok(obj) => Ok(Located {
            location,
            value: Decoded::Object(obj),
        }),
        Err(e) => {
            let field = e.path().to_string();
            Err(err(Some(object), &field, e.into_inner().to_string()))
        }
    });
}

fn default_namespace(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Value {
        serde_json::from_str(s).expect("test JSON parses")
    }

    #[test]
    fn decodes_a_list_item_by_item() {
        let doc = json(
            r#"{"apiVersion":"v1","kind":"List","items":[
                {"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},
                 "spec":{"clusterIP":"198.18.100.1","ports":[{"port":80}]}},
                {"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d"}},
                {"apiVersion":"v1","kind":"Service","metadata":{"name":"b","namespace":"x"},
                 "spec":{"ports":[{"port":"eighty"}]}}
            ]}"#,
        );
        let items = decode(doc);
        assert_eq!(items.len(), 3);
        let Ok(Located {
            value: Decoded::Object(Object::Service(a)),
            location,
        }) = &items[0]
        else {
            panic!("{:?}", items[0]);
        };
        assert_eq!(location, "items[0]");
        assert_eq!(a.metadata.namespace.as_deref(), Some("default"));
        assert!(matches!(
            &items[1],
            Ok(Located { value: Decoded::Ignored { kind, .. }, .. }) if kind == "Deployment"
        ));
        let Err(e) = &items[2] else {
            panic!("{:?}", items[2]);
        };
        assert_eq!(e.field, "spec.ports[0].port");
        assert_eq!(
            e.object.as_ref().map(|o| o.to_string()).as_deref(),
            Some("Service x/b")
        );
        assert!(
            e.to_string()
                .starts_with("items[2]: Service x/b: spec.ports[0].port: "),
            "{e}"
        );
    }

    #[test]
    fn store_keeps_last_valid_version() {
        let v1 = json(
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},
                "spec":{"clusterIP":"198.18.100.1","ports":[{"port":80}]}}"#,
        );
        let v2_bad = json(
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},
                "spec":{"clusterIP":"198.18.100.1","ports":[{"port":0}]}}"#,
        );
        let obj = |v: Value| match decode(v).remove(0) {
            Ok(Located {
                value: Decoded::Object(o),
                ..
            }) => o,
            other => panic!("{other:?}"),
        };
        let mut store = ObjectStore::new();
        store.apply(obj(v1)).expect("valid");
        let before = store.desired_state();
        assert_eq!(before.services.len(), 1);
        let err = store.apply(obj(v2_bad)).expect_err("port 0 is invalid");
        assert_eq!(err.field(), "spec.ports[0].port");
        assert_eq!(store.desired_state(), before);
        let key = store.keys().next().cloned().expect("one object");
        assert!(store.remove(&key).is_some());
        assert!(store.desired_state().services.is_empty());
    }
}
