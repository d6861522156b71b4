//! The objects a source has read, each in its last valid version.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{DesiredState, NodeSettings};
use crate::translate::{self, NodeInfo, ObjectKind, ObjectRef, TranslateError, Translation};

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
