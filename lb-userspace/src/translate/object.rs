//! How this module names the Kubernetes objects it reads: in error messages, and as the
//! key the sources keep objects under.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Namespace of objects that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The kinds of object this module reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    /// Cluster-scoped: its `ObjectRef` has an empty namespace.
    Node,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
        })
    }
}

/// Names an object in messages: `Service default/web`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: ObjectKind,
    /// Empty for cluster-scoped kinds (Node).
    pub namespace: String,
    /// Empty when the object has no `metadata.name`.
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: ObjectKind, meta: &ObjectMeta) -> Self {
        let namespace = match kind {
            ObjectKind::Node => String::new(),
            ObjectKind::Service | ObjectKind::EndpointSlice => namespace_of(meta).to_owned(),
        };
        Self {
            kind,
            namespace,
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.name.is_empty() {
            "<unnamed>"
        } else {
            &self.name
        };
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, name)
        }
    }
}

/// The namespace of a namespaced object; `default` when it names none, as `kubectl apply`
/// would put it.
pub(super) fn namespace_of(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns,
        _ => DEFAULT_NAMESPACE,
    }
}
