//! Where the desired state comes from. Every source (the manifest files, the Kubernetes
//! API) keeps the last valid version of each Service, EndpointSlice and Node in an
//! [`ObjectStore`] (the file source decodes them with [`decode`]) and turns the store
//! into a `DesiredState` through `translate`, for the node described by a
//! `NodeSettings`, so both read objects the same way.

pub mod file;
pub mod kube;

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use crate::model::{DesiredState, NodeSettings};
use crate::translate::{
    self, NodeInfo, ObjectKind, ObjectRef, TranslateError, Translation, DEFAULT_NAMESPACE,
};

/// What a source sends the agent after every change: the whole desired state.
#[derive(Clone, Debug)]
pub struct Update {
    pub state: DesiredState,
    /// When the source received the oldest event this state reflects and the previous
    /// update did not: the start of the "event to maps" latency.
    pub since: std::time::Instant,
    /// The state follows a full (re)list: the agent counts a resync.
    pub resync: bool,
}

impl Update {
    pub fn new(state: DesiredState, resync: bool) -> Self {
        Self {
            state,
            since: std::time::Instant::now(),
            resync,
        }
    }
}

/// An object a source can feed to `translate`.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    /// Where NodePorts listen (`status.addresses`).
    Node(Box<Node>),
}

impl Object {
    /// Kind, namespace and name: the key under which the store keeps the object.
    pub fn key(&self) -> ObjectRef {
        match self {
            Object::Service(s) => ObjectRef::new(ObjectKind::Service, &s.metadata),
            Object::EndpointSlice(s) => ObjectRef::new(ObjectKind::EndpointSlice, &s.metadata),
            Object::Node(n) => ObjectRef::new(ObjectKind::Node, &n.metadata),
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
            Object::Node(n) => translate::validate_node(n).map(|()| Vec::new()),
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

    /// The desired state of everything in the store, as seen from the node `node`.
    pub fn desired_state(&self, node: &NodeSettings) -> DesiredState {
        self.translate(node).state
    }

    /// The node's name and NodePort addresses, from the Node objects in the store and
    /// `settings` (see [`NodeInfo::resolve`]).
    pub fn node_info(&self, settings: &NodeSettings) -> NodeInfo {
        let nodes = self.objects.values().filter_map(|o| match o {
            Object::Node(n) => Some(n.as_ref()),
            _ => None,
        });
        NodeInfo::resolve(settings, nodes)
    }

    /// The desired state and the frontend conflicts resolved on the way (log them).
    pub fn translate(&self, node: &NodeSettings) -> Translation {
        let services = self.objects.values().filter_map(|o| match o {
            Object::Service(s) => Some(s.as_ref()),
            _ => None,
        });
        let slices = self.objects.values().filter_map(|o| match o {
            Object::EndpointSlice(s) => Some(s.as_ref()),
            _ => None,
        });
        translate::translate_with_conflicts(services, slices, &self.node_info(node))
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
        ("v1", "Node") => ObjectKind::Node,
        _ => {
            out.push(Ok(Located {
                location,
                value: Decoded::Ignored { api_version, kind },
            }));
            return;
        }
    };
    // Identify the object before the typed decode so a type error still names it (and
    // the source can keep its previous version). Nodes are cluster-scoped: no namespace.
    let namespace = match object_kind {
        ObjectKind::Node => String::new(),
        ObjectKind::Service | ObjectKind::EndpointSlice => str_at(&doc, &["metadata", "namespace"])
            .filter(|n| !n.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_owned(),
    };
    let name = str_at(&doc, &["metadata", "name"]).unwrap_or_default();
    let object = ObjectRef {
        kind: object_kind,
        namespace,
        name: name.to_owned(),
    };
    if object.name.is_empty() {
        out.push(Err(err(Some(object), "metadata.name", "missing".into())));
        return;
    }
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
        ObjectKind::Node => {
            serde_path_to_error::deserialize::<_, Node>(doc).map(|n| Object::Node(Box::new(n)))
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
    fn nodes_decode_without_namespace_and_feed_node_info() {
        let doc = json(
            r#"{"apiVersion":"v1","kind":"List","items":[
                {"apiVersion":"v1","kind":"Node","metadata":{"name":"n1"},
                 "status":{"addresses":[{"type":"InternalIP","address":"198.18.0.1"},
                                        {"type":"Hostname","address":"n1"}]}},
                {"apiVersion":"v1","kind":"Node","metadata":{"name":"n2"},
                 "status":{"addresses":[{"type":"InternalIP","address":"2001:db8::2"}]}},
                {"apiVersion":"v1","kind":"Node","metadata":{"name":"n3"},
                 "status":{"addresses":[{"type":"InternalIP","address":7}]}}
            ]}"#,
        );
        let mut items = decode(doc).into_iter();
        let mut store = ObjectStore::new();
        for _ in 0..2 {
            let Some(Ok(Located {
                value: Decoded::Object(obj),
                ..
            })) = items.next()
            else {
                panic!("a Node object");
            };
            let key = obj.key();
            assert_eq!(key.kind, ObjectKind::Node);
            assert!(key.namespace.is_empty(), "{key:?}");
            store.apply(obj).expect("valid Node");
        }
        let Some(Err(e)) = items.next() else {
            panic!("n3 does not decode");
        };
        assert_eq!(e.field, "status.addresses[0].address");
        assert_eq!(
            e.object.as_ref().map(|o| o.to_string()).as_deref(),
            Some("Node n3")
        );

        let named = NodeSettings {
            name: Some("n1".into()),
            extra_addresses: vec!["198.18.0.9".parse().expect("address")],
        };
        let info = store.node_info(&named);
        assert_eq!(info.name.as_deref(), Some("n1"));
        let shown: Vec<String> = info.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(shown, vec!["198.18.0.1", "198.18.0.9"]);
        let all = store.node_info(&NodeSettings::default());
        let shown: Vec<String> = all.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(shown, vec!["198.18.0.1", "2001:db8::2"]);

        // A NodePort service sees them; the node named in the settings decides.
        let np = json(
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"np"},
                "spec":{"type":"NodePort","clusterIP":"198.18.100.1",
                        "ports":[{"port":80,"nodePort":30080}]}}"#,
        );
        let Some(Ok(Located {
            value: Decoded::Object(svc),
            ..
        })) = decode(np).into_iter().next()
        else {
            panic!("a Service");
        };
        store.apply(svc).expect("valid Service");
        let state = store.desired_state(&named);
        let fronts: Vec<String> = state
            .services
            .values()
            .flat_map(|st| &st.frontends)
            .map(|f| format!("{}:{}", f.addr, f.port))
            .collect();
        assert_eq!(
            fronts,
            vec!["198.18.0.1:30080", "198.18.0.9:30080", "198.18.100.1:80"]
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
        let before = store.desired_state(&NodeSettings::default());
        assert_eq!(before.services.len(), 1);
        let err = store.apply(obj(v2_bad)).expect_err("port 0 is invalid");
        assert_eq!(err.field(), "spec.ports[0].port");
        assert_eq!(store.desired_state(&NodeSettings::default()), before);
        let key = store.keys().next().cloned().expect("one object");
        assert!(store.remove(&key).is_some());
        assert!(store
            .desired_state(&NodeSettings::default())
            .services
            .is_empty());
    }
}
