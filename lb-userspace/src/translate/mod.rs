//! Kubernetes objects (`v1/Service`, `discovery.k8s.io/v1/EndpointSlice`, `v1/Node`) to
//! the desired state, with kube-proxy's semantics (1.28+). Both the file source and the
//! Kubernetes API source feed the same `k8s-openapi` types through this module, so they
//! cannot disagree. This comment is the specification; each rule has a test below.
//!
//! The node: a source resolves a [`NodeInfo`] from its Node objects and `NodeSettings`
//! ([`NodeInfo::resolve`]): the node's name (`--node-name`), and the addresses NodePorts
//! listen on: the `InternalIP` and `ExternalIP` addresses of the Node named so (of every
//! Node when there is no name) plus `--nodeport-address`.
//!
//! What a Service contributes, per port (one `ServicePortId` = namespace, name, port
//! name, protocol):
//! - frontends: every `spec.clusterIPs` address (or `spec.clusterIP` when `clusterIPs` is
//!   absent), `status.loadBalancer.ingress[].ip` when `type: LoadBalancer` (except ingress
//!   points with `ipMode: Proxy`: the load balancer then proxies to the nodes itself and
//!   kube-proxy does not capture the address either), `spec.externalIPs` for any type,
//!   and for `type: NodePort` and `LoadBalancer` the port's `nodePort` on every node
//!   address of the service's IP families (`spec.ipFamilies`, else the families of its
//!   clusterIPs, else both). One (address, port, protocol) listed twice in a service is
//!   one frontend, of the first kind in `FrontendKind` order.
//! - endpoints: from the EndpointSlices labelled `kubernetes.io/service-name: <name>` in
//!   the same namespace, the slice port whose `name` and protocol equal the service
//!   port's. The EndpointSlice controller has already resolved `targetPort` (named or
//!   numeric) into the slice ports, which is why kube-proxy never looks at `targetPort`.
//!   Conditions: `ready` (absent: true), `serving` (absent: the value of `ready`),
//!   `terminating` (absent: false). An endpoint is local when its `nodeName` is the
//!   node's name, or always when the node has no name. An endpoint listed more than once
//!   (a pod moving between slices) is one endpoint: the copy with the best conditions
//!   (ready, else serving and terminating) counts, local if any copy is.
//!   - `endpoints` (cluster set): the ready endpoints, or when there is none, the serving
//!     and terminating ones (kube-proxy keeps a service that is being rolled whole
//!     answering);
//!   - `local_endpoints`: the same rule applied to the local endpoints alone;
//!   - `draining`: every other listed endpoint (not in `endpoints`; it may be in
//!     `local_endpoints`): no new flows through the cluster table, but its backend stays
//!     so established flows keep it.
//! - `externalTrafficPolicy: Local` → `external_local`, only when the service is
//!   externally accessible (type NodePort or LoadBalancer, or externalIPs), as
//!   kube-proxy's `ExternalPolicyLocal`; `internalTrafficPolicy: Local` →
//!   `internal_local`. `healthCheckNodePort` counts for `type: LoadBalancer` with
//!   `external_local` only.
//! - `sessionAffinity: ClientIP` → `affinity_timeout_s` =
//!   `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800, valid 1..=86400).
//! - `spec.loadBalancerSourceRanges` (when empty, the comma-separated annotation
//!   `service.beta.kubernetes.io/load-balancer-source-ranges`, as kube-proxy), for
//!   `type: LoadBalancer` only: CIDR prefixes, whitespace trimmed, host bits zeroed,
//!   sorted, deduplicated. A bad entry makes the Service invalid, naming it
//!   (`spec.loadBalancerSourceRanges[2]`).
//!
//! Frontends claimed by several service ports (two services on one nodePort or external
//! IP in a file, a node address that is also an externalIP) go to one of them: see
//! [`translate_with_conflicts`].
//!
//! Dual stack: `ServicePortState.endpoints` holds the endpoints of *both* families. The
//! reconciler builds the Maglev table of each frontend from the endpoints of the
//! frontend's family only (a v4 VIP never sends to a v6 pod).
//!
//! Not translated: headless services (`clusterIP: None`) and `type: ExternalName` (no
//! virtual IP to capture), SCTP ports (the data path handles TCP and UDP; the port is
//! skipped and [`service_warnings`] reports it), slices of `addressType: FQDN`, topology
//! hints. Only the first of an endpoint's `addresses` is used, as the API allows.
//! Objects without `metadata.namespace` are in `default`, as `kubectl apply` would put
//! them; Nodes are cluster-scoped.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{
    DesiredState, Endpoint, Frontend, FrontendKind, NodeSettings, Prefix, Protocol, ServicePortId,
    ServicePortState,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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

/// Why an object (or, for [`TranslateError::UnsupportedProtocol`], one of its ports)
/// cannot be used. Every variant names the object and the field path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("{object}: {field}: required field is missing or empty")]
    Missing { object: ObjectRef, field: String },
    #[error("{object}: {field}: {value:?} is not an IP address")]
    BadIp {
        object: ObjectRef,
        field: String,
        value: String,
    },
    #[error("{object}: {field}: {value:?} is not an {expected} address (addressType)")]
    WrongFamily {
        object: ObjectRef,
        field: String,
        value: String,
        expected: &'static str,
    },
    #[error("{object}: {field}: port {value} is out of range (1-65535)")]
    PortOutOfRange {
        object: ObjectRef,
        field: String,
        value: i64,
    },
    #[error("{object}: {field}: port name {port_name:?} is also used by {first}")]
    DuplicatePortName {
        object: ObjectRef,
        field: String,
        port_name: String,
        /// Boxed to keep the error small (clippy::result_large_err).
        first: Box<str>,
    },
    #[error("{object}: {field}: port {port}/{protocol} is also declared by {first}")]
    DuplicatePort {
        object: ObjectRef,
        field: String,
        port: i32,
        protocol: &'static str,
        first: Box<str>,
    },
    #[error("{object}: {field}: unknown protocol {value:?} (expected TCP, UDP or SCTP)")]
    UnknownProtocol {
        object: ObjectRef,
        field: String,
        value: String,
    },
    /// A warning, not a rejection: the port is skipped, the rest of the service is used.
    #[error("{object}: {field}: protocol {protocol} is not supported, port skipped")]
    UnsupportedProtocol {
        object: ObjectRef,
        field: String,
        protocol: String,
    },
    #[error("{object}: {field}: unknown value {value:?} (expected one of {expected})")]
    UnknownValue {
        object: ObjectRef,
        field: String,
        value: String,
        expected: &'static str,
    },
    #[error("{object}: {field}: {reason}")]
    Invalid {
        object: ObjectRef,
        field: String,
        reason: String,
    },
}

impl TranslateError {
    /// The object the error is about.
    pub fn object(&self) -> &ObjectRef {
        match self {
            TranslateError::Missing { object, .. }
            | TranslateError::BadIp { object, .. }
            | TranslateError::WrongFamily { object, .. }
            | TranslateError::PortOutOfRange { object, .. }
            | TranslateError::DuplicatePortName { object, .. }
            | TranslateError::DuplicatePort { object, .. }
            | TranslateError::UnknownProtocol { object, .. }
            | TranslateError::UnsupportedProtocol { object, .. }
            | TranslateError::UnknownValue { object, .. }
            | TranslateError::Invalid { object, .. } => object,
        }
    }

    /// The field path, e.g. `spec.ports[1].port`.
    pub fn field(&self) -> &str {
        match self {
            TranslateError::Missing { field, .. }
            | TranslateError::BadIp { field, .. }
            | TranslateError::WrongFamily { field, .. }
            | TranslateError::PortOutOfRange { field, .. }
            | TranslateError::DuplicatePortName { field, .. }
            | TranslateError::DuplicatePort { field, .. }
            | TranslateError::UnknownProtocol { field, .. }
            | TranslateError::UnsupportedProtocol { field, .. }
            | TranslateError::UnknownValue { field, .. }
            | TranslateError::Invalid { field, .. } => field,
        }
    }

    /// True for problems that only skip part of an object (the object stays valid).
    pub fn is_warning(&self) -> bool {
        matches!(self, TranslateError::UnsupportedProtocol { .. })
    }
}

/// A protocol as the API spells it. SCTP is valid Kubernetes but not handled here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ApiProtocol {
    Supported(Protocol),
    Sctp,
}

impl ApiProtocol {
    fn name(self) -> &'static str {
        match self {
            ApiProtocol::Supported(Protocol::Tcp) => "TCP",
            ApiProtocol::Supported(Protocol::Udp) => "UDP",
            ApiProtocol::Sctp => "SCTP",
        }
    }
}

/// Parses a `protocol` field; absent means TCP (the API default).
fn parse_protocol(p: Option<&str>) -> Option<ApiProtocol> {
    match p {
        None | Some("TCP") => Some(ApiProtocol::Supported(Protocol::Tcp)),
        Some("UDP") => Some(ApiProtocol::Supported(Protocol::Udp)),
        Some("SCTP") => Some(ApiProtocol::Sctp),
        Some(_) => None,
    }
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns,
        _ => DEFAULT_NAMESPACE,
    }
}

fn port_in_range(p: i32) -> bool {
    (1..=65_535).contains(&p)
}

/// The service type, defaulting to ClusterIP.
fn service_type(svc: &Service) -> &str {
    svc.spec
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("ClusterIP")
}

/// True if the service has no virtual IP to capture (headless or ExternalName).
fn is_ignored(svc: &Service) -> bool {
    if service_type(svc) == "ExternalName" {
        return true;
    }
    let Some(spec) = svc.spec.as_ref() else {
        return false;
    };
    let first = spec
        .cluster_ips
        .as_ref()
        .and_then(|ips| ips.first())
        .or(spec.cluster_ip.as_ref());
    first.is_some_and(|ip| ip == "None")
}

fn check_ip(object: &ObjectRef, field: String, value: &str) -> Result<IpAddr, TranslateError> {
    value.parse::<IpAddr>().map_err(|_| TranslateError::BadIp {
        object: object.clone(),
        field,
        value: value.to_owned(),
    })
}

/// Checks everything `translate` relies on in a Service. Headless and ExternalName
/// services are valid (they are ignored, not rejected) as long as their metadata is.
pub fn validate_service(svc: &Service) -> Result<(), TranslateError> {
    let object = ObjectRef::new(ObjectKind::Service, &svc.metadata);
    if object.name.is_empty() {
        return Err(TranslateError::Missing {
            object,
            field: "metadata.name".into(),
        });
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(());
    };
    let ty = service_type(svc);
    if !matches!(
        ty,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        return Err(TranslateError::UnknownValue {
            object,
            field: "spec.type".into(),
            value: ty.to_owned(),
            expected: "ClusterIP, NodePort, LoadBalancer, ExternalName",
        });
    }
    if ty == "ExternalName" {
        // Nothing else of an ExternalName service is used.
        return Ok(());
    }

    let headless = is_ignored(svc);
    if let Some(ip) = spec.cluster_ip.as_deref() {
        if !ip.is_empty() && ip != "None" {
            check_ip(&object, "spec.clusterIP".into(), ip)?;
        }
    }
    if let Some(ips) = spec.cluster_ips.as_ref() {
        if ips.len() > 2 {
            return Err(TranslateError::Invalid {
                object,
                field: "spec.clusterIPs".into(),
                reason: format!("{} addresses, at most 2 (one per family)", ips.len()),
            });
        }
        let mut families = BTreeSet::new();
        for (i, ip) in ips.iter().enumerate() {
            let field = format!("spec.clusterIPs[{i}]");
            if headless {
                if ip != "None" {
                    return Err(TranslateError::Invalid {
                        object,
                        field,
                        reason: format!("{ip:?} in a headless service (clusterIP None)"),
                    });
                }
                continue;
            }
            let addr = check_ip(&object, field.clone(), ip)?;
            if !families.insert(addr.is_ipv4()) {
                return Err(TranslateError::Invalid {
                    object,
                    field,
                    reason: format!("{ip} is of the same family as another clusterIP"),
                });
            }
        }
        if let (Some(first), Some(single)) = (ips.first(), spec.cluster_ip.as_deref()) {
            if !single.is_empty() && first != single {
                return Err(TranslateError::Invalid {
                    object,
                    field: "spec.clusterIPs[0]".into(),
                    reason: format!("{first:?} differs from spec.clusterIP {single:?}"),
                });
            }
        }
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        check_ip(&object, format!("spec.externalIPs[{i}]"), ip)?;
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        if let Some(ip) = ing.ip.as_deref() {
            check_ip(&object, format!("status.loadBalancer.ingress[{i}].ip"), ip)?;
        }
    }

    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut numbers: BTreeMap<(i32, &str), usize> = BTreeMap::new();
    for (i, p) in ports.iter().enumerate() {
        let at = |leaf: &str| format!("spec.ports[{i}]{leaf}");
        if !port_in_range(p.port) {
            return Err(TranslateError::PortOutOfRange {
                object,
                field: at(".port"),
                value: p.port.into(),
            });
        }
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        let Some(api_proto) = parse_protocol(Some(proto)) else {
            return Err(TranslateError::UnknownProtocol {
                object,
                field: at(".protocol"),
                value: proto.to_owned(),
            });
        };
        match p.target_port.as_ref() {
            Some(IntOrString::Int(n)) if !port_in_range(*n) => {
                return Err(TranslateError::PortOutOfRange {
                    object,
                    field: at(".targetPort"),
                    value: (*n).into(),
                });
            }
            Some(IntOrString::String(s)) if s.is_empty() => {
                return Err(TranslateError::Missing {
                    object,
                    field: at(".targetPort"),
                });
            }
            _ => {}
        }
        let name = p.name.as_deref().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            // The API requires names on multi-port services: the name is what ties a
            // service port to its endpoint ports.
            return Err(TranslateError::Missing {
                object,
                field: at(".name"),
            });
        }
        if let Some(first) = names.insert(name, i) {
            return Err(TranslateError::DuplicatePortName {
                object,
                field: at(".name"),
                port_name: name.to_owned(),
                first: format!("spec.ports[{first}]").into(),
            });
        }
        if let Some(first) = numbers.insert((p.port, proto), i) {
            return Err(TranslateError::DuplicatePort {
                object,
                field: at(".port"),
                port: p.port,
                protocol: api_proto.name(),
                first: format!("spec.ports[{first}]").into(),
            });
        }
        if let Some(n) = p.node_port {
            if !port_in_range(n) {
                return Err(TranslateError::PortOutOfRange {
                    object,
                    field: at(".nodePort"),
                    value: n.into(),
                });
            }
        }
    }
    if let Some(n) = spec.health_check_node_port {
        if !port_in_range(n) {
            return Err(TranslateError::PortOutOfRange {
                object,
                field: "spec.healthCheckNodePort".into(),
                value: n.into(),
            });
        }
    }
    for (i, fam) in spec.ip_families.iter().flatten().enumerate() {
        if !matches!(fam.as_str(), "IPv4" | "IPv6") {
            return Err(TranslateError::UnknownValue {
                object,
                field: format!("spec.ipFamilies[{i}]"),
                value: fam.clone(),
                expected: "IPv4, IPv6",
            });
        }
    }
    traffic_policies(svc, &object)?;
    affinity_timeout(svc, &object)?;
    source_ranges(svc, &object)?;
    Ok(())
}

/// Problems that skip part of a valid service (today: SCTP ports). Log them; they do not
/// keep the service from being used.
pub fn service_warnings(svc: &Service) -> Vec<TranslateError> {
    if is_ignored(svc) {
        return Vec::new();
    }
    let object = ObjectRef::new(ObjectKind::Service, &svc.metadata);
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_deref());
    ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter(|(_, p)| parse_protocol(p.protocol.as_deref()) == Some(ApiProtocol::Sctp))
        .map(|(i, _)| TranslateError::UnsupportedProtocol {
            object: object.clone(),
            field: format!("spec.ports[{i}].protocol"),
            protocol: "SCTP".into(),
        })
        .collect()
}

/// Checks everything `translate` relies on in an EndpointSlice.
pub fn validate_slice(slice: &EndpointSlice) -> Result<(), TranslateError> {
    let object = ObjectRef::new(ObjectKind::EndpointSlice, &slice.metadata);
    if object.name.is_empty() {
        return Err(TranslateError::Missing {
            object,
            field: "metadata.name".into(),
        });
    }
    let family_v4 = match slice.address_type.as_str() {
        "IPv4" => Some(true),
        "IPv6" => Some(false),
        "FQDN" => None,
        other => {
            return Err(TranslateError::UnknownValue {
                object,
                field: "addressType".into(),
                value: other.to_owned(),
                expected: "IPv4, IPv6, FQDN",
            })
        }
    };
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL));
    if service.is_none_or(|s| s.is_empty()) {
        return Err(TranslateError::Missing {
            object,
            field: format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
        });
    }
    let Some(want_v4) = family_v4 else {
        // FQDN slices are ignored whole; their contents do not matter.
        return Ok(());
    };
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        if ep.addresses.is_empty() {
            return Err(TranslateError::Missing {
                object,
                field: format!("endpoints[{i}].addresses"),
            });
        }
        for (j, a) in ep.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            let addr = check_ip(&object, field.clone(), a)?;
            if addr.is_ipv4() != want_v4 {
                return Err(TranslateError::WrongFamily {
                    object,
                    field,
                    value: a.clone(),
                    expected: if want_v4 { "IPv4" } else { "IPv6" },
                });
            }
        }
    }
    let mut seen: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if let Some(port) = p.port {
            if !port_in_range(port) {
                return Err(TranslateError::PortOutOfRange {
                    object,
                    field: format!("ports[{i}].port"),
                    value: port.into(),
                });
            }
        }
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if parse_protocol(Some(proto)).is_none() {
            return Err(TranslateError::UnknownProtocol {
                object,
                field: format!("ports[{i}].protocol"),
                value: proto.to_owned(),
            });
        }
        let name = p.name.as_deref().unwrap_or_default();
        if let Some(first) = seen.insert((name, proto), i) {
            return Err(TranslateError::DuplicatePortName {
                object,
                field: format!("ports[{i}].name"),
                port_name: name.to_owned(),
                first: format!("ports[{first}]").into(),
            });
        }
    }
    Ok(())
}

/// One endpoint of a service port as the slices list it, with its conditions.
#[derive(Clone, Debug)]
struct ListedEndpoint {
    ep: Endpoint,
    /// `conditions.ready`; absent means true.
    ready: bool,
    /// `conditions.serving`; absent means the value of `ready`.
    serving: bool,
    /// `conditions.terminating`; absent means false.
    terminating: bool,
    /// `nodeName` is this node (always true without a node name).
    local: bool,
}

impl ListedEndpoint {
    /// Whether kube-proxy's fallback (no ready endpoint at all) would use it.
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }

    /// How much a copy of this endpoint is worth when two slices list it: a pod moving
    /// between slices can be listed twice, with different conditions for a moment.
    fn rank(&self) -> (bool, bool) {
        (self.ready, self.serving_terminating())
    }
}

/// Every listed endpoint of one service port, one entry per (address, port).
type ListedEndpoints = BTreeMap<(IpAddr, u16), ListedEndpoint>;

/// The endpoints of one service, per (port name, protocol).
type EndpointsByPort = BTreeMap<(String, Protocol), ListedEndpoints>;

/// Collects the endpoints of every slice, keyed by (namespace, service name). An endpoint
/// listed by several slices (or twice in one) is one endpoint: the copy with the best
/// conditions (ready, else serving and terminating) counts, and it is local if any copy
/// says so (as kube-proxy favours the local copy). Deciding per (address, port) before
/// classifying keeps one endpoint from being both in `endpoints` and in `draining`.
fn endpoints_by_service<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
) -> BTreeMap<(String, String), EndpointsByPort> {
    let mut out: BTreeMap<(String, String), EndpointsByPort> = BTreeMap::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let namespace = namespace_of(&slice.metadata);
        let by_port = out
            .entry((namespace.to_owned(), service.clone()))
            .or_default();
        for p in slice.ports.iter().flatten() {
            // A slice port without a number means "all ports" in the API; kube-proxy
            // cannot NAT to that and skips it, and so do we.
            let Some(port) = p.port.and_then(|n| u16::try_from(n).ok()) else {
                continue;
            };
            if port == 0 {
                continue;
            }
            let Some(ApiProtocol::Supported(protocol)) = parse_protocol(p.protocol.as_deref())
            else {
                continue;
            };
            let name = p.name.clone().unwrap_or_default();
            let eps = by_port.entry((name, protocol)).or_default();
            for ep in slice.endpoints.iter().flatten() {
                let Some(addr) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                    continue;
                };
                let cond = ep.conditions.as_ref();
                let ready = cond.and_then(|c| c.ready).unwrap_or(true);
                let listed = ListedEndpoint {
                    ep: Endpoint {
                        addr,
                        port,
                        target: ep.target_ref.as_ref().and_then(|r| {
                            let name = r.name.as_deref()?;
                            let ns = r.namespace.as_deref().unwrap_or(namespace);
                            Some(format!("{ns}/{name}"))
                        }),
                    },
                    ready,
                    serving: cond.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
                    local: match node.name.as_deref() {
                        None => true,
                        Some(me) => ep.node_name.as_deref() == Some(me),
                    },
                };
                match eps.entry((addr, port)) {
                    Entry::Vacant(v) => {
                        v.insert(listed);
                    }
                    Entry::Occupied(mut o) => {
                        let have = o.get_mut();
                        let local = have.local || listed.local;
                        let target = have.ep.target.take().or(listed.ep.target.clone());
                        if listed.rank() > have.rank() {
                            *have = listed;
                        }
                        have.local = local;
                        if have.ep.target.is_none() {
                            have.ep.target = target;
                        }
                    }
                }
            }
        }
    }
    out
}

/// The endpoint sets of one service port (see `ServicePortState`): cluster set, local
/// set, draining.
fn classify(listed: &ListedEndpoints) -> (Vec<Endpoint>, Vec<Endpoint>, Vec<Endpoint>) {
    // kube-proxy's CategorizeEndpoints: the ready endpoints, or, only when there is none,
    // the serving and terminating ones (so a rolling update of every pod at once does not
    // turn into refused connections). The same rule among this node's endpoints alone
    // gives the local set.
    let pick = |only_local: bool| -> Vec<Endpoint> {
        let candidates: Vec<&ListedEndpoint> =
            listed.values().filter(|l| !only_local || l.local).collect();
        let use_ready = candidates.iter().any(|l| l.ready);
        candidates
            .into_iter()
            .filter(|l| {
                if use_ready {
                    l.ready
                } else {
                    l.serving_terminating()
                }
            })
            .map(|l| l.ep.clone())
            .collect()
    };
    let cluster = pick(false);
    let local = pick(true);
    let in_cluster: BTreeSet<(IpAddr, u16)> = cluster.iter().map(|e| (e.addr, e.port)).collect();
    let draining = listed
        .iter()
        .filter(|(key, _)| !in_cluster.contains(key))
        .map(|(_, l)| l.ep.clone())
        .collect();
    (cluster, local, draining)
}

/// The Node address types NodePorts listen on (kube-proxy's default
/// `--nodeport-addresses` takes the node's addresses; `Hostname` and `InternalDNS` are
/// names, not addresses).
const NODE_ADDRESS_TYPES: [&str; 2] = ["InternalIP", "ExternalIP"];

/// What `translate` needs to know about the node it runs on, resolved by the source from
/// the Node objects and [`NodeSettings`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Endpoints whose `nodeName` equals it are local. `None`: every endpoint is local.
    pub name: Option<String>,
    /// The addresses NodePorts listen on, sorted, without duplicates.
    pub addresses: Vec<IpAddr>,
}

impl NodeInfo {
    /// Node addresses = the `InternalIP` and `ExternalIP` addresses of the Node named
    /// `settings.name` (of every Node when there is no name) plus
    /// `settings.extra_addresses`. A named node without a Node object has only the extra
    /// addresses.
    pub fn resolve<'a>(settings: &NodeSettings, nodes: impl Iterator<Item = &'a Node>) -> Self {
        let mut addresses: Vec<IpAddr> = settings.extra_addresses.clone();
        for node in nodes {
            if let Some(want) = settings.name.as_deref() {
                if node.metadata.name.as_deref() != Some(want) {
                    continue;
                }
            }
            addresses.extend(node_addresses(node));
        }
        addresses.sort();
        addresses.dedup();
        Self {
            name: settings.name.clone(),
            addresses,
        }
    }
}

/// The `InternalIP` / `ExternalIP` addresses of a Node (unparsable ones skipped; see
/// [`validate_node`]).
fn node_addresses(node: &Node) -> impl Iterator<Item = IpAddr> + '_ {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| NODE_ADDRESS_TYPES.contains(&a.type_.as_str()))
        .filter_map(|a| a.address.trim().parse().ok())
}

/// Checks a Node: a name, and parsable `InternalIP` / `ExternalIP` addresses.
pub fn validate_node(node: &Node) -> Result<(), TranslateError> {
    let object = ObjectRef::new(ObjectKind::Node, &node.metadata);
    if object.name.is_empty() {
        return Err(TranslateError::Missing {
            object,
            field: "metadata.name".into(),
        });
    }
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in addresses.into_iter().flatten().enumerate() {
        if NODE_ADDRESS_TYPES.contains(&a.type_.as_str()) {
            check_ip(
                &object,
                format!("status.addresses[{i}].address"),
                a.address.trim(),
            )?;
        }
    }
    Ok(())
}

/// The annotation kube-proxy reads when `spec.loadBalancerSourceRanges` is empty.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when absent (3 hours, the API default).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// The largest affinity timeout the API accepts (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// Parses `a.b.c.d/n` or `x::y/n` (whitespace around it ignored) and zeroes the host bits,
/// as Go's `net.ParseCIDR` does for the network. A bare address is not a prefix.
pub fn parse_prefix(text: &str) -> Option<Prefix> {
    let (addr, len) = text.trim().split_once('/')?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    let addr = match addr.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) => {
            if len > 32 {
                return None;
            }
            // A shift by the full width (len 0) is None: no network bits.
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            if len > 128 {
                return None;
            }
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    };
    Some(Prefix { addr, len })
}

/// The service's `loadBalancerSourceRanges` (LoadBalancer services only; empty: any
/// source): the spec field, or when it is empty the annotation (comma-separated), as
/// kube-proxy reads them. Sorted, without duplicates.
fn source_ranges(svc: &Service, object: &ObjectRef) -> Result<Vec<Prefix>, TranslateError> {
    if service_type(svc) != "LoadBalancer" {
        return Ok(Vec::new());
    }
    let spec_ranges = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_deref())
        .unwrap_or_default();
    let (field, entries): (String, Vec<&str>) = if !spec_ranges.is_empty() {
        (
            "spec.loadBalancerSourceRanges".into(),
            spec_ranges.iter().map(String::as_str).collect(),
        )
    } else {
        let annotation = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
            .map(|v| v.trim())
            .unwrap_or_default();
        if annotation.is_empty() {
            return Ok(Vec::new());
        }
        (
            format!("metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"),
            annotation.split(',').collect(),
        )
    };
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let Some(prefix) = parse_prefix(entry) else {
            return Err(TranslateError::Invalid {
                object: object.clone(),
                field: format!("{field}[{i}]"),
                reason: format!(
                    "{:?} is not an address range (a.b.c.d/n or x::y/n)",
                    entry.trim()
                ),
            });
        };
        out.push(prefix);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `sessionAffinity: ClientIP`: its timeout; `None` for `sessionAffinity: None`.
fn affinity_timeout(svc: &Service, object: &ObjectRef) -> Result<Option<u32>, TranslateError> {
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT_S)),
                Some(t) => u32::try_from(t)
                    .ok()
                    .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_S).contains(t))
                    .map(Some)
                    .ok_or_else(|| TranslateError::Invalid {
                        object: object.clone(),
                        field: "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        reason: format!("{t} is out of range (1-{MAX_AFFINITY_TIMEOUT_S})"),
                    }),
            }
        }
        Some(other) => Err(TranslateError::UnknownValue {
            object: object.clone(),
            field: "spec.sessionAffinity".into(),
            value: other.to_owned(),
            expected: "None, ClientIP",
        }),
    }
}

/// Whether a traffic policy field says `Local` (absent: `Cluster`).
fn policy_is_local(
    value: Option<&str>,
    field: &str,
    object: &ObjectRef,
) -> Result<bool, TranslateError> {
    match value {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(TranslateError::UnknownValue {
            object: object.clone(),
            field: field.to_owned(),
            value: other.to_owned(),
            expected: "Cluster, Local",
        }),
    }
}

/// Whether clients outside the cluster can reach the service, kube-proxy's
/// `ExternallyAccessible`: NodePort and LoadBalancer types, or externalIPs.
fn externally_accessible(svc: &Service) -> bool {
    matches!(service_type(svc), "NodePort" | "LoadBalancer")
        || svc
            .spec
            .as_ref()
            .and_then(|s| s.external_ips.as_ref())
            .is_some_and(|ips| !ips.is_empty())
}

/// `(external_local, internal_local)`. `externalTrafficPolicy: Local` only counts for an
/// externally accessible service (kube-proxy's `ExternalPolicyLocal`).
fn traffic_policies(svc: &Service, object: &ObjectRef) -> Result<(bool, bool), TranslateError> {
    let Some(spec) = svc.spec.as_ref() else {
        return Ok((false, false));
    };
    let external = policy_is_local(
        spec.external_traffic_policy.as_deref(),
        "spec.externalTrafficPolicy",
        object,
    )?;
    let internal = policy_is_local(
        spec.internal_traffic_policy.as_deref(),
        "spec.internalTrafficPolicy",
        object,
    )?;
    Ok((external && externally_accessible(svc), internal))
}

/// The IP families NodePorts of this service listen on: `spec.ipFamilies`, else the
/// families of its clusterIPs, else (a hand-written manifest without either) both.
/// Returned as (IPv4, IPv6).
fn node_port_families(svc: &Service) -> (bool, bool) {
    let Some(spec) = svc.spec.as_ref() else {
        return (true, true);
    };
    if let Some(fams) = spec.ip_families.as_ref().filter(|f| !f.is_empty()) {
        return (
            fams.iter().any(|f| f == "IPv4"),
            fams.iter().any(|f| f == "IPv6"),
        );
    }
    let cluster: Vec<IpAddr> = match spec.cluster_ips.as_ref() {
        Some(ips) if !ips.is_empty() => ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
        _ => spec
            .cluster_ip
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect(),
    };
    if cluster.is_empty() {
        return (true, true);
    }
    (
        cluster.iter().any(IpAddr::is_ipv4),
        cluster.iter().any(IpAddr::is_ipv6),
    )
}

/// Frontend addresses of a (non-ignored) service, with their kinds.
fn frontend_addrs(svc: &Service) -> Vec<(IpAddr, FrontendKind)> {
    let mut out = Vec::new();
    let Some(spec) = svc.spec.as_ref() else {
        return out;
    };
    let cluster: Vec<&String> = match spec.cluster_ips.as_ref() {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    out.extend(
        cluster
            .into_iter()
            .filter_map(|ip| ip.parse().ok())
            .map(|a| (a, FrontendKind::ClusterIp)),
    );
    if service_type(svc) == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        out.extend(
            ingress
                .into_iter()
                .flatten()
                .filter(|ing| ing.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|ing| ing.ip.as_deref()?.parse().ok())
                .map(|a| (a, FrontendKind::LoadBalancer)),
        );
    }
    out.extend(
        spec.external_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .map(|a| (a, FrontendKind::ExternalIp)),
    );
    out
}

/// Builds the desired state from valid Services and EndpointSlices (see
/// [`validate_service`] and [`validate_slice`]). Anything an invalid object would need is
/// skipped rather than trusted, so invalid input cannot panic here, but only validated
/// objects give meaningful results.
pub fn translate<'a, 'b>(
    services: impl Iterator<Item = &'a Service>,
    slices: impl Iterator<Item = &'b EndpointSlice>,
    node: &NodeInfo,
) -> DesiredState {
    translate_with_conflicts(services, slices, node).state
}

/// Two service ports claiming one (address, port, protocol): only one can own the
/// SERVICES entry. Possible with externalIPs and load balancer IPs (ClusterIPs are
/// allocated uniquely by the API server).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "frontend {}/{protocol} is claimed by {kept} and {dropped}: {kept} keeps it",
    std::net::SocketAddr::new(*addr, *port)
)]
pub struct FrontendConflict {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub kept: ServicePortId,
    pub dropped: ServicePortId,
}

/// The desired state and the frontend conflicts resolved on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub state: DesiredState,
    pub conflicts: Vec<FrontendConflict>,
}

/// [`translate`], also reporting frontends claimed by several service ports. Each such
/// frontend goes to one claimant, chosen deterministically: a ClusterIP before any other
/// kind, then the older Service (`metadata.creationTimestamp`, as MetalLB decides shared
/// IPs), then the smaller `ServicePortId`. The others lose only that frontend.
pub fn translate_with_conflicts<'a, 'b>(
    services: impl Iterator<Item = &'a Service>,
    slices: impl Iterator<Item = &'b EndpointSlice>,
    node: &NodeInfo,
) -> Translation {
    let mut endpoints = endpoints_by_service(slices, node);
    let mut state = DesiredState::default();
    let mut created: BTreeMap<(String, String), Option<Time>> = BTreeMap::new();
    for svc in services {
        if is_ignored(svc) {
            continue;
        }
        let Some(name) = svc.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
            continue;
        };
        let object = ObjectRef::new(ObjectKind::Service, &svc.metadata);
        let namespace = namespace_of(&svc.metadata);
        let addrs = frontend_addrs(svc);
        // Validation rejected anything these could fail on; for an unvalidated object
        // the feature is left off rather than guessed.
        let (external_local, internal_local) = traffic_policies(svc, &object).unwrap_or_default();
        let affinity_timeout_s = affinity_timeout(svc, &object).unwrap_or_default();
        let source_ranges = source_ranges(svc, &object).unwrap_or_default();
        let health_check_node_port = if service_type(svc) == "LoadBalancer" && external_local {
            svc.spec
                .as_ref()
                .and_then(|s| s.health_check_node_port)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|&p| p != 0)
        } else {
            None
        };
        let has_node_ports = matches!(service_type(svc), "NodePort" | "LoadBalancer");
        let (want_v4, want_v6) = node_port_families(svc);
        let node_addrs: Vec<IpAddr> = node
            .addresses
            .iter()
            .copied()
            .filter(|a| if a.is_ipv4() { want_v4 } else { want_v6 })
            .collect();
        let mut svc_endpoints = endpoints
            .remove(&(namespace.to_owned(), name.to_owned()))
            .unwrap_or_default();
        let ports = svc.spec.as_ref().and_then(|s| s.ports.as_deref());
        for p in ports.unwrap_or_default() {
            let Some(ApiProtocol::Supported(protocol)) = parse_protocol(p.protocol.as_deref())
            else {
                continue;
            };
            let Some(port) = u16::try_from(p.port).ok().filter(|&n| n != 0) else {
                continue;
            };
            let port_name = p.name.clone().unwrap_or_default();
            let mut frontends: Vec<Frontend> = addrs
                .iter()
                .map(|&(addr, kind)| Frontend {
                    addr,
                    port,
                    protocol,
                    kind,
                })
                .collect();
            let node_port = p
                .node_port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|&n| n != 0 && has_node_ports);
            if let Some(node_port) = node_port {
                frontends.extend(node_addrs.iter().map(|&addr| Frontend {
                    addr,
                    port: node_port,
                    protocol,
                    kind: FrontendKind::NodePort,
                }));
            }
            frontends.sort();
            // The same address and port listed twice (say as clusterIP and externalIP)
            // is one frontend: SERVICES has one entry per (address, port, protocol).
            // Sorting put the kinds in `FrontendKind` order (ClusterIP first), and the
            // first is the one kept.
            frontends.dedup_by_key(|f| (f.addr, f.port, f.protocol));

            let listed = svc_endpoints
                .remove(&(port_name.clone(), protocol))
                .unwrap_or_default();
            let (endpoints, local_endpoints, draining) = classify(&listed);

            state.services.insert(
                ServicePortId {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    port_name,
                    protocol,
                },
                ServicePortState {
                    frontends,
                    endpoints,
                    local_endpoints,
                    draining,
                    internal_local,
                    external_local,
                    affinity_timeout_s,
                    source_ranges: source_ranges.clone(),
                    health_check_node_port,
                },
            );
        }
        created.insert(
            (namespace.to_owned(), name.to_owned()),
            svc.metadata.creation_timestamp.clone(),
        );
    }
    let conflicts = resolve_conflicts(&mut state, &created);
    Translation { state, conflicts }
}

/// What SERVICES keys a frontend by: (address, port, protocol).
type FrontendKey = (IpAddr, u16, Protocol);

/// Gives every contested frontend to one service port (see [`translate_with_conflicts`]).
fn resolve_conflicts(
    state: &mut DesiredState,
    created: &BTreeMap<(String, String), Option<Time>>,
) -> Vec<FrontendConflict> {
    let mut claims: BTreeMap<FrontendKey, Vec<(&ServicePortId, FrontendKind)>> = BTreeMap::new();
    for (id, st) in &state.services {
        for f in &st.frontends {
            claims
                .entry((f.addr, f.port, f.protocol))
                .or_default()
                .push((id, f.kind));
        }
    }
    let mut losers: Vec<FrontendConflict> = Vec::new();
    for ((addr, port, protocol), mut who) in claims {
        if who.len() < 2 {
            continue;
        }
        who.sort_by_key(|(id, kind)| {
            let ts = created
                .get(&(id.namespace.clone(), id.name.clone()))
                .cloned()
                .flatten();
            // None (no timestamp, as in hand-written manifests) sorts after any time.
            (
                *kind != FrontendKind::ClusterIp,
                ts.is_none(),
                ts,
                (*id).clone(),
            )
        });
        let kept = who[0].0.clone();
        for (id, _) in &who[1..] {
            losers.push(FrontendConflict {
                addr,
                port,
                protocol,
                kept: kept.clone(),
                dropped: (*id).clone(),
            });
        }
    }
    for c in &losers {
        if let Some(st) = state.services.get_mut(&c.dropped) {
            st.frontends
                .retain(|f| (f.addr, f.port, f.protocol) != (c.addr, c.port, c.protocol));
        }
    }
    losers
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Parses a YAML manifest the way kubectl prints it.
    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("test Service parses")
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).expect("test EndpointSlice parses")
    }

    fn run(services: &[Service], slices: &[EndpointSlice]) -> DesiredState {
        for s in services {
            validate_service(s).expect("test Service is valid");
        }
        for s in slices {
            validate_slice(s).expect("test EndpointSlice is valid");
        }
        translate(services.iter(), slices.iter(), &NodeInfo::default())
    }

    fn id(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortId {
        ServicePortId::new(ns, name, port, protocol)
    }

    fn fe(addr: &str, port: u16, protocol: Protocol, kind: FrontendKind) -> Frontend {
        Frontend {
            addr: addr.parse().unwrap(),
            port,
            protocol,
            kind,
        }
    }

    fn ep(addr: &str, port: u16, target: Option<&str>) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            port,
            target: target.map(str::to_owned),
        }
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: ClusterIP
  clusterIP: 198.18.100.10
  clusterIPs: [198.18.100.10]
  ports:
  - port: 80
    protocol: TCP
    targetPort: 8080
"#;

    const WEB_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: ""
  port: 8080
  protocol: TCP
endpoints:
- addresses: [198.18.1.2]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: web-1, namespace: shop}
- addresses: [198.18.1.1]
  targetRef: {kind: Pod, name: web-0}
- addresses: [198.18.1.3]
  conditions: {ready: false, serving: true, terminating: true}
"#;

    #[test]
    fn cluster_ip_single_port() {
        let state = run(&[svc(WEB)], &[slice(WEB_SLICE)]);
        assert_eq!(state.services.len(), 1);
        let st = &state.services[&id("shop", "web", "", Protocol::Tcp)];
        assert_eq!(
            st.frontends,
            vec![fe(
                "198.18.100.10",
                80,
                Protocol::Tcp,
                FrontendKind::ClusterIp
            )]
        );
        // Sorted by address; the not-ready 198.18.1.3 takes no new flows; the targetRef
        // without namespace is in the slice's namespace.
        assert_eq!(
            st.endpoints,
            vec![
                ep("198.18.1.1", 8080, Some("shop/web-0")),
                ep("198.18.1.2", 8080, Some("shop/web-1")),
            ]
        );
    }

    #[test]
    fn service_without_slices_has_no_endpoints() {
        let state = run(&[svc(WEB)], &[]);
        let st = &state.services[&id("shop", "web", "", Protocol::Tcp)];
        assert_eq!(st.frontends.len(), 1);
        assert!(st.endpoints.is_empty());
    }

    #[test]
    fn slice_in_other_namespace_or_for_other_service_is_not_used() {
        let other_ns = WEB_SLICE.replace("namespace: shop\n  labels", "namespace: other\n  labels");
        let other_svc = WEB_SLICE.replace("service-name: web", "service-name: api");
        let state = run(&[svc(WEB)], &[slice(&other_ns), slice(&other_svc)]);
        assert!(state.services[&id("shop", "web", "", Protocol::Tcp)]
            .endpoints
            .is_empty());
    }

    const MULTI: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: app, namespace: default}
spec:
  clusterIP: 198.18.100.20
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: metrics, port: 9090, protocol: TCP, targetPort: 9100}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#;

    const MULTI_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: app-1
  labels: {kubernetes.io/service-name: app}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: metrics, port: 9100, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [198.18.2.1]
"#;

    #[test]
    fn multi_port_named_ports_and_target_ports_come_from_the_slice() {
        let state = run(&[svc(MULTI)], &[slice(MULTI_SLICE)]);
        assert_eq!(state.services.len(), 3);
        // targetPort "web" (named) resolved by the controller to 8080 in the slice.
        let http = &state.services[&id("default", "app", "http", Protocol::Tcp)];
        assert_eq!(http.endpoints, vec![ep("198.18.2.1", 8080, None)]);
        assert_eq!(
            http.frontends,
            vec![fe(
                "198.18.100.20",
                80,
                Protocol::Tcp,
                FrontendKind::ClusterIp
            )]
        );
        // targetPort 9100 (numeric): again the slice's port is what counts.
        let metrics = &state.services[&id("default", "app", "metrics", Protocol::Tcp)];
        assert_eq!(metrics.endpoints, vec![ep("198.18.2.1", 9100, None)]);
        assert_eq!(metrics.frontends[0].port, 9090);
        let dns = &state.services[&id("default", "app", "dns", Protocol::Udp)];
        assert_eq!(dns.endpoints, vec![ep("198.18.2.1", 5353, None)]);
        assert_eq!(
            dns.frontends,
            vec![fe(
                "198.18.100.20",
                53,
                Protocol::Udp,
                FrontendKind::ClusterIp
            )]
        );
    }

    #[test]
    fn slice_port_of_the_same_name_but_other_protocol_does_not_match() {
        let slice_udp = MULTI_SLICE.replace(
            "{name: http, port: 8080, protocol: TCP}",
            "{name: http, port: 8080, protocol: UDP}",
        );
        let state = run(&[svc(MULTI)], &[slice(&slice_udp)]);
        assert!(state.services[&id("default", "app", "http", Protocol::Tcp)]
            .endpoints
            .is_empty());
    }

    const LB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: front, namespace: edge}
spec:
  type: LoadBalancer
  clusterIP: 198.18.100.30
  clusterIPs: [198.18.100.30]
  externalIPs: [198.18.200.9]
  ports:
  - {name: https, port: 443, protocol: TCP, targetPort: 8443, nodePort: 31443}
status:
  loadBalancer:
    ingress:
    - ip: 198.18.200.1
      ipMode: VIP
    - ip: 198.18.200.2
    - hostname: lb.example.com
    - ip: 198.18.200.3
      ipMode: Proxy
"#;

    #[test]
    fn load_balancer_ingress_and_external_ips() {
        let state = run(&[svc(LB)], &[]);
        let st = &state.services[&id("edge", "front", "https", Protocol::Tcp)];
        // Sorted; the Proxy-mode ingress and the hostname-only one are not captured.
        assert_eq!(
            st.frontends,
            vec![
                fe("198.18.100.30", 443, Protocol::Tcp, FrontendKind::ClusterIp),
                fe(
                    "198.18.200.1",
                    443,
                    Protocol::Tcp,
                    FrontendKind::LoadBalancer
                ),
                fe(
                    "198.18.200.2",
                    443,
                    Protocol::Tcp,
                    FrontendKind::LoadBalancer
                ),
                fe("198.18.200.9", 443, Protocol::Tcp, FrontendKind::ExternalIp),
            ]
        );
    }

    #[test]
    fn ingress_ips_only_count_for_type_load_balancer() {
        let nodeport = LB.replace("type: LoadBalancer", "type: NodePort");
        let state = run(&[svc(&nodeport)], &[]);
        let st = &state.services[&id("edge", "front", "https", Protocol::Tcp)];
        assert_eq!(
            st.frontends,
            vec![
                fe("198.18.100.30", 443, Protocol::Tcp, FrontendKind::ClusterIp),
                fe("198.18.200.9", 443, Protocol::Tcp, FrontendKind::ExternalIp),
            ]
        );
    }

    #[test]
    fn external_ip_equal_to_cluster_ip_is_one_frontend() {
        let dup = LB.replace(
            "externalIPs: [198.18.200.9]",
            "externalIPs: [198.18.100.30]",
        );
        let state = run(&[svc(&dup)], &[]);
        let st = &state.services[&id("edge", "front", "https", Protocol::Tcp)];
        let vips: Vec<_> = st.frontends.iter().map(|f| (f.addr, f.kind)).collect();
        assert_eq!(
            vips,
            vec![
                (
                    IpAddr::V4(Ipv4Addr::new(198, 18, 100, 30)),
                    FrontendKind::ClusterIp
                ),
                (
                    IpAddr::V4(Ipv4Addr::new(198, 18, 200, 1)),
                    FrontendKind::LoadBalancer
                ),
                (
                    IpAddr::V4(Ipv4Addr::new(198, 18, 200, 2)),
                    FrontendKind::LoadBalancer
                ),
            ]
        );
    }

    #[test]
    fn contested_frontend_goes_to_one_service_port() {
        let older = r#"
apiVersion: v1
kind: Service
metadata: {name: zeta, namespace: a, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  clusterIP: 198.18.100.71
  externalIPs: [198.18.200.70]
  ports: [{port: 80}]
"#;
        let newer = r#"
apiVersion: v1
kind: Service
metadata: {name: alpha, namespace: a, creationTimestamp: "2026-02-01T00:00:00Z"}
spec:
  clusterIP: 198.18.100.72
  externalIPs: [198.18.200.70, 198.18.100.71]
  ports: [{port: 80}]
"#;
        let t = translate_with_conflicts(
            [svc(older), svc(newer)].iter(),
            [].iter(),
            &NodeInfo::default(),
        );
        let zeta = id("a", "zeta", "", Protocol::Tcp);
        let alpha = id("a", "alpha", "", Protocol::Tcp);
        let addrs = |i: &ServicePortId| -> Vec<String> {
            t.state.services[i]
                .frontends
                .iter()
                .map(|f| f.addr.to_string())
                .collect()
        };
        // The older service keeps the shared externalIP although "alpha" sorts first;
        // zeta's ClusterIP is zeta's even though alpha lists it as an externalIP.
        assert_eq!(addrs(&zeta), vec!["198.18.100.71", "198.18.200.70"]);
        assert_eq!(addrs(&alpha), vec!["198.18.100.72"]);
        assert_eq!(t.conflicts.len(), 2, "{:?}", t.conflicts);
        assert!(t
            .conflicts
            .iter()
            .all(|c| c.kept == zeta && c.dropped == alpha));
        assert_eq!(
            t.conflicts[1].to_string(),
            "frontend 198.18.200.70:80/TCP is claimed by a/zeta:-/TCP and a/alpha:-/TCP: \
             a/zeta:-/TCP keeps it"
        );
        // Other ports or protocols on the same address are not a conflict.
        let other_port = newer.replace("ports: [{port: 80}]", "ports: [{port: 81}]");
        let t = translate_with_conflicts(
            [svc(older), svc(&other_port)].iter(),
            [].iter(),
            &NodeInfo::default(),
        );
        assert!(t.conflicts.is_empty());
        assert_eq!(t.state.services[&alpha].frontends.len(), 3);
    }

    #[test]
    fn udp_single_port() {
        let dns = r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 198.18.100.53
  ports: [{port: 53, protocol: UDP}]
"#;
        let s = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-x, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{port: 53, protocol: UDP}]
endpoints: [{addresses: [198.18.3.1]}, {addresses: [198.18.3.2]}]
"#;
        let state = run(&[svc(dns)], &[slice(s)]);
        assert_eq!(state.services.len(), 1);
        let st = &state.services[&id("kube-system", "dns", "", Protocol::Udp)];
        assert_eq!(st.frontends[0].protocol, Protocol::Udp);
        assert_eq!(
            st.endpoints,
            vec![ep("198.18.3.1", 53, None), ep("198.18.3.2", 53, None)]
        );
    }

    #[test]
    fn several_slices_are_merged_sorted_and_deduplicated() {
        let second = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-def34
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- addresses: [198.18.1.0]
- addresses: [198.18.1.2]
  targetRef: {kind: Pod, name: web-1, namespace: shop}
"#;
        let state = run(&[svc(WEB)], &[slice(WEB_SLICE), slice(second)]);
        let st = &state.services[&id("shop", "web", "", Protocol::Tcp)];
        assert_eq!(
            st.endpoints,
            vec![
                ep("198.18.1.0", 8080, None),
                ep("198.18.1.1", 8080, Some("shop/web-0")),
                ep("198.18.1.2", 8080, Some("shop/web-1")),
            ]
        );
    }

    fn addrs(eps: &[Endpoint]) -> Vec<String> {
        eps.iter().map(|e| e.addr.to_string()).collect()
    }

    #[test]
    fn not_ready_endpoints_take_no_new_flows_but_drain() {
        let state = run(&[svc(WEB)], &[slice(WEB_SLICE)]);
        let st = &state.services[&id("shop", "web", "", Protocol::Tcp)];
        assert_eq!(addrs(&st.endpoints), vec!["198.18.1.1", "198.18.1.2"]);
        // The terminating pod keeps its established flows.
        assert_eq!(st.draining, vec![ep("198.18.1.3", 8080, None)]);
        // No node name: every endpoint is local.
        assert_eq!(st.local_endpoints, st.endpoints);
    }

    #[test]
    fn without_ready_endpoints_serving_terminating_ones_take_new_flows() {
        let all_down = WEB_SLICE.replace("conditions: {ready: true}", "conditions: {ready: false}");
        let all_down = all_down.replace(
            "targetRef: {kind: Pod, name: web-0}",
            "conditions: {ready: false}",
        );
        let state = run(&[svc(WEB)], &[slice(&all_down)]);
        let st = &state.services[&id("shop", "web", "", Protocol::Tcp)];
        // kube-proxy's fallback: 198.18.1.3 is serving and terminating; the other two are
        // not ready and (serving absent = ready = false) not serving.
        assert_eq!(st.endpoints, vec![ep("198.18.1.3", 8080, None)]);
        assert_eq!(st.local_endpoints, st.endpoints);
        assert_eq!(addrs(&st.draining), vec!["198.18.1.1", "198.18.1.2"]);

        // Terminating but not serving (a pod that failed its readiness probe while
        // shutting down) is no fallback: nothing takes new flows, all drain.
        let not_serving = all_down.replace(
            "conditions: {ready: false, serving: true, terminating: true}",
            "conditions: {ready: false, terminating: true}",
        );
        let state = run(&[svc(WEB)], &[slice(&not_serving)]);
        let st = &state.services[&id("shop", "web", "", Protocol::Tcp)];
        assert!(st.endpoints.is_empty(), "{:?}", st.endpoints);
        assert!(st.local_endpoints.is_empty());
        assert_eq!(st.draining.len(), 3);

        // Serving but not terminating (a not-ready pod that is starting) is no fallback.
        let starting = all_down.replace(
            "conditions: {ready: false, serving: true, terminating: true}",
            "conditions: {ready: false, serving: true}",
        );
        let state = run(&[svc(WEB)], &[slice(&starting)]);
        assert!(state.services[&id("shop", "web", "", Protocol::Tcp)]
            .endpoints
            .is_empty());
    }

    const NODES_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-nodes
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- {addresses: [198.18.1.1], nodeName: n1}
- {addresses: [198.18.1.2], nodeName: n2}
- {addresses: [198.18.1.3], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [198.18.1.4], nodeName: n2, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [198.18.1.5]}
"#;

    fn node(name: Option<&str>, addresses: &[&str]) -> NodeInfo {
        NodeInfo {
            name: name.map(str::to_owned),
            addresses: addresses
                .iter()
                .map(|a| a.parse().expect("test address"))
                .collect(),
        }
    }

    fn run_on(services: &[Service], slices: &[EndpointSlice], node: &NodeInfo) -> Translation {
        for s in services {
            validate_service(s).expect("test Service is valid");
        }
        for s in slices {
            validate_slice(s).expect("test EndpointSlice is valid");
        }
        translate_with_conflicts(services.iter(), slices.iter(), node)
    }

    #[test]
    fn local_endpoints_are_this_nodes_by_node_name() {
        let web = id("shop", "web", "", Protocol::Tcp);
        let on = |n: Option<&str>| {
            run_on(&[svc(WEB)], &[slice(NODES_SLICE)], &node(n, &[]))
                .state
                .services[&web]
                .clone()
        };
        let st = on(Some("n1"));
        assert_eq!(
            addrs(&st.endpoints),
            vec!["198.18.1.1", "198.18.1.2", "198.18.1.5"]
        );
        assert_eq!(addrs(&st.local_endpoints), vec!["198.18.1.1"]);
        assert_eq!(addrs(&st.draining), vec!["198.18.1.3", "198.18.1.4"]);
        // An endpoint without nodeName is nobody's.
        assert_eq!(addrs(&on(Some("n3")).local_endpoints), Vec::<String>::new());
        // No node name: every endpoint is local.
        let st = on(None);
        assert_eq!(st.local_endpoints, st.endpoints);

        // The local rule is applied to the local endpoints alone: n1's only ready pod
        // going away leaves n1 its serving-terminating pod although n2 still has a ready
        // one (kube-proxy's CategorizeEndpoints).
        let n1_down = NODES_SLICE.replace(
            "{addresses: [198.18.1.1], nodeName: n1}",
            "{addresses: [198.18.1.1], nodeName: n1, conditions: {ready: false}}",
        );
        let st = run_on(&[svc(WEB)], &[slice(&n1_down)], &node(Some("n1"), &[]))
            .state
            .services[&web]
            .clone();
        assert_eq!(addrs(&st.endpoints), vec!["198.18.1.2", "198.18.1.5"]);
        assert_eq!(addrs(&st.local_endpoints), vec!["198.18.1.3"]);
        // Draining is everything not in `endpoints`: the local fallback is in it too
        // (its backend must exist; the reconciler keeps it out of the cluster table).
        assert_eq!(
            addrs(&st.draining),
            vec!["198.18.1.1", "198.18.1.3", "198.18.1.4"]
        );
    }

    #[test]
    fn a_pod_listed_by_two_slices_is_one_endpoint_with_its_best_conditions() {
        // The controller moves a pod between slices: for a moment the old slice lists it
        // as not ready (terminating copy) while the new one lists it ready.
        let old = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-old, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- {addresses: [198.18.1.7], conditions: {ready: false, serving: false, terminating: true}}
- {addresses: [198.18.1.8], nodeName: n2, targetRef: {kind: Pod, name: web-8}}
"#;
        let new = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-new, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- {addresses: [198.18.1.7], nodeName: n1, targetRef: {kind: Pod, name: web-7}}
- {addresses: [198.18.1.8], nodeName: n1}
"#;
        let web = id("shop", "web", "", Protocol::Tcp);
        for order in [[old, new], [new, old]] {
            let slices = [slice(order[0]), slice(order[1])];
            let st = run_on(&[svc(WEB)], &slices, &node(Some("n1"), &[]))
                .state
                .services[&web]
                .clone();
            assert_eq!(
                st.endpoints,
                vec![
                    ep("198.18.1.7", 8080, Some("shop/web-7")),
                    ep("198.18.1.8", 8080, Some("shop/web-8")),
                ],
                "{order:?}"
            );
            // Never both taking new flows and draining.
            assert!(st.draining.is_empty(), "{:?}", st.draining);
            // Local if either copy says so.
            assert_eq!(st.local_endpoints, st.endpoints);
        }
    }

    const NP: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: np, namespace: edge}
spec:
  type: NodePort
  clusterIP: 198.18.100.50
  clusterIPs: [198.18.100.50]
  ports:
  - {name: http, port: 80, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
"#;

    fn kinds(st: &ServicePortState) -> Vec<(String, u16, FrontendKind)> {
        st.frontends
            .iter()
            .map(|f| (f.addr.to_string(), f.port, f.kind))
            .collect()
    }

    #[test]
    fn node_ports_listen_on_the_node_addresses_of_the_service_families() {
        let n = node(Some("n1"), &["198.18.0.1", "198.18.0.2", "2001:db8::1"]);
        let t = run_on(&[svc(NP)], &[], &n);
        let http = &t.state.services[&id("edge", "np", "http", Protocol::Tcp)];
        // No ipFamilies: the clusterIPs' family (IPv4) only.
        assert_eq!(
            kinds(http),
            vec![
                ("198.18.0.1".into(), 30080, FrontendKind::NodePort),
                ("198.18.0.2".into(), 30080, FrontendKind::NodePort),
                ("198.18.100.50".into(), 80, FrontendKind::ClusterIp),
            ]
        );
        let dns = &t.state.services[&id("edge", "np", "dns", Protocol::Udp)];
        assert!(dns
            .frontends
            .iter()
            .any(|f| f.kind == FrontendKind::NodePort
                && f.port == 30053
                && f.protocol == Protocol::Udp));

        // Dual stack: both families' node addresses.
        let ds = NP.replace(
            "clusterIPs: [198.18.100.50]",
            "clusterIPs: [198.18.100.50, \"2001:db8::50\"]\n  ipFamilies: [IPv4, IPv6]",
        );
        let t = run_on(&[svc(&ds)], &[], &n);
        let np: Vec<_> = kinds(&t.state.services[&id("edge", "np", "http", Protocol::Tcp)])
            .into_iter()
            .filter(|k| k.2 == FrontendKind::NodePort)
            .map(|k| k.0)
            .collect();
        assert_eq!(np, vec!["198.18.0.1", "198.18.0.2", "2001:db8::1"]);

        // ipFamilies wins over the clusterIPs (it is what the API allocated from).
        let v6 = NP.replace(
            "clusterIPs: [198.18.100.50]",
            "clusterIPs: [198.18.100.50]\n  ipFamilies: [IPv6]",
        );
        let t = run_on(&[svc(&v6)], &[], &n);
        let np: Vec<_> = kinds(&t.state.services[&id("edge", "np", "http", Protocol::Tcp)])
            .into_iter()
            .filter(|k| k.2 == FrontendKind::NodePort)
            .map(|k| k.0)
            .collect();
        assert_eq!(np, vec!["2001:db8::1"]);

        // A ClusterIP service has no NodePorts even if the manifest names one.
        let cip = NP.replace("type: NodePort", "type: ClusterIP");
        let t = run_on(&[svc(&cip)], &[], &n);
        assert!(t.state.services.values().all(|st| st
            .frontends
            .iter()
            .all(|f| f.kind != FrontendKind::NodePort)));
        // No node address known: no NodePort frontends.
        let t = run_on(&[svc(NP)], &[], &node(Some("n1"), &[]));
        assert_eq!(
            t.state.services[&id("edge", "np", "http", Protocol::Tcp)]
                .frontends
                .len(),
            1
        );
    }

    #[test]
    fn load_balancer_gets_ingress_ips_external_ips_and_node_ports() {
        let n = node(None, &["198.18.0.1"]);
        let t = run_on(&[svc(LB)], &[], &n);
        let st = &t.state.services[&id("edge", "front", "https", Protocol::Tcp)];
        assert_eq!(
            kinds(st),
            vec![
                ("198.18.0.1".into(), 31443, FrontendKind::NodePort),
                ("198.18.100.30".into(), 443, FrontendKind::ClusterIp),
                ("198.18.200.1".into(), 443, FrontendKind::LoadBalancer),
                ("198.18.200.2".into(), 443, FrontendKind::LoadBalancer),
                ("198.18.200.9".into(), 443, FrontendKind::ExternalIp),
            ]
        );
        // allocateLoadBalancerNodePorts: false leaves the ports without nodePort.
        let no_np = LB.replace(", nodePort: 31443", "");
        let t = run_on(&[svc(&no_np)], &[], &n);
        let st = &t.state.services[&id("edge", "front", "https", Protocol::Tcp)];
        assert!(st
            .frontends
            .iter()
            .all(|f| f.kind != FrontendKind::NodePort));
    }

    #[test]
    fn two_services_on_one_node_port_and_a_node_port_on_an_external_ip() {
        // The API server would never allocate one nodePort twice, but files can say so.
        let older = NP.replace(
            "metadata: {name: np, namespace: edge}",
            "metadata: {name: np, namespace: edge, creationTimestamp: \"2026-01-01T00:00:00Z\"}",
        );
        let newer = NP
            .replace(
                "metadata: {name: np, namespace: edge}",
                "metadata: {name: another, namespace: edge, creationTimestamp: \"2026-02-01T00:00:00Z\"}",
            )
            .replace("198.18.100.50", "198.18.100.51");
        let n = node(Some("n1"), &["198.18.0.1"]);
        let t = run_on(&[svc(&older), svc(&newer)], &[], &n);
        let np = id("edge", "np", "http", Protocol::Tcp);
        let another = id("edge", "another", "http", Protocol::Tcp);
        assert!(kinds(&t.state.services[&np]).contains(&(
            "198.18.0.1".into(),
            30080,
            FrontendKind::NodePort
        )));
        assert_eq!(
            kinds(&t.state.services[&another]),
            vec![("198.18.100.51".into(), 80, FrontendKind::ClusterIp)]
        );
        let lost: Vec<_> = t
            .conflicts
            .iter()
            .map(|c| {
                (
                    c.addr.to_string(),
                    c.port,
                    c.kept.name.as_str(),
                    c.dropped.name.as_str(),
                )
            })
            .collect();
        assert_eq!(
            lost,
            vec![
                ("198.18.0.1".into(), 30053, "np", "another"),
                ("198.18.0.1".into(), 30080, "np", "another"),
            ]
        );

        // An externalIP that is the node's address, on the port another service uses as
        // its nodePort: one SERVICES entry, the older service keeps it.
        let ext = r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: edge, creationTimestamp: "2025-06-01T00:00:00Z"}
spec:
  clusterIP: 198.18.100.52
  externalIPs: [198.18.0.1]
  ports: [{port: 30080}]
"#;
        let t = run_on(&[svc(&older), svc(ext)], &[], &n);
        let ext_id = id("edge", "ext", "", Protocol::Tcp);
        assert!(kinds(&t.state.services[&ext_id]).contains(&(
            "198.18.0.1".into(),
            30080,
            FrontendKind::ExternalIp
        )));
        assert!(!kinds(&t.state.services[&np])
            .iter()
            .any(|k| k.0 == "198.18.0.1" && k.1 == 30080));
        assert_eq!(t.conflicts.len(), 1, "{:?}", t.conflicts);
    }

    #[test]
    fn session_affinity_client_ip_and_its_timeout() {
        let st = |yaml: &str| {
            run_on(&[svc(yaml)], &[], &NodeInfo::default())
                .state
                .services[&id("shop", "web", "", Protocol::Tcp)]
                .clone()
        };
        assert_eq!(st(WEB).affinity_timeout_s, None);
        let none = WEB.replace(
            "type: ClusterIP",
            "type: ClusterIP\n  sessionAffinity: None",
        );
        assert_eq!(st(&none).affinity_timeout_s, None);
        let client = WEB.replace(
            "type: ClusterIP",
            "type: ClusterIP\n  sessionAffinity: ClientIP",
        );
        assert_eq!(st(&client).affinity_timeout_s, Some(10_800));
        let with = |t: &str| {
            client.replace(
                "sessionAffinity: ClientIP",
                &format!(
                    "sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}"
                ),
            )
        };
        assert_eq!(st(&with("60")).affinity_timeout_s, Some(60));
        assert_eq!(st(&with("86400")).affinity_timeout_s, Some(86_400));
        for bad in ["0", "86401", "-5"] {
            let err = validate_service(&svc(&with(bad))).expect_err(bad);
            assert_eq!(
                err.field(),
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                "{err}"
            );
            assert!(err.to_string().starts_with("Service shop/web: "), "{err}");
        }
        let err = validate_service(&svc(&client.replace("ClientIP", "Cookie"))).unwrap_err();
        assert_eq!(err.field(), "spec.sessionAffinity");
    }

    #[test]
    fn traffic_policies_local() {
        let get = |yaml: &str| {
            let s = svc(yaml);
            validate_service(&s).expect("valid");
            let t = translate_with_conflicts([&s].into_iter(), [].iter(), &NodeInfo::default());
            let st = t.state.services.into_values().next().expect("one port");
            (
                st.external_local,
                st.internal_local,
                st.health_check_node_port,
            )
        };
        let lb_local = LB.replace(
            "type: LoadBalancer",
            "type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001",
        );
        assert_eq!(get(&lb_local), (true, false, Some(32001)));
        assert_eq!(
            get(&lb_local.replace("Local", "Cluster")),
            (false, false, None)
        );
        // NodePort + Local: local, but health checks are for load balancers only.
        let np_local = lb_local.replace("type: LoadBalancer", "type: NodePort");
        assert_eq!(get(&np_local), (true, false, None));
        // ClusterIP with externalIPs is externally accessible; without, eTP means nothing.
        let cip_local = np_local.replace("type: NodePort", "type: ClusterIP");
        assert_eq!(get(&cip_local), (true, false, None));
        let cip_only = cip_local.replace("  externalIPs: [198.18.200.9]\n", "");
        assert_eq!(get(&cip_only), (false, false, None));
        let itp = WEB.replace(
            "type: ClusterIP",
            "type: ClusterIP\n  internalTrafficPolicy: Local",
        );
        assert_eq!(get(&itp), (false, true, None));

        for (field, yaml) in [
            (
                "spec.externalTrafficPolicy",
                lb_local.replace(": Local", ": Global"),
            ),
            (
                "spec.internalTrafficPolicy",
                itp.replace(": Local", ": Node"),
            ),
        ] {
            let err = validate_service(&svc(&yaml)).expect_err(field);
            assert_eq!(err.field(), field, "{err}");
        }
        let err = validate_service(&svc(&lb_local.replace("32001", "70000"))).unwrap_err();
        assert_eq!(err.field(), "spec.healthCheckNodePort");
    }

    #[test]
    fn load_balancer_source_ranges_from_the_field_or_the_annotation() {
        let ranges = |yaml: &str| -> Vec<String> {
            let s = svc(yaml);
            validate_service(&s).expect("valid");
            let t = translate_with_conflicts([&s].into_iter(), [].iter(), &NodeInfo::default());
            let st = t.state.services.into_values().next().expect("one port");
            st.source_ranges.iter().map(|p| p.to_string()).collect()
        };
        assert!(ranges(LB).is_empty());
        let field = LB.replace(
            "type: LoadBalancer",
            "type: LoadBalancer\n  loadBalancerSourceRanges: [\" 198.18.7.9/24 \", \"2001:db8:7::1/48\", 198.18.0.0/16, 198.18.7.0/24]",
        );
        // Host bits zeroed, whitespace trimmed, sorted, duplicates removed.
        assert_eq!(
            ranges(&field),
            vec!["198.18.0.0/16", "198.18.7.0/24", "2001:db8:7::/48"]
        );
        let annotated = LB.replace(
            "metadata: {name: front, namespace: edge}",
            "metadata:\n  name: front\n  namespace: edge\n  annotations:\n    service.beta.kubernetes.io/load-balancer-source-ranges: \" 198.18.9.0/24, 198.19.0.0/16 \"",
        );
        assert_eq!(ranges(&annotated), vec!["198.18.9.0/24", "198.19.0.0/16"]);
        // The field, when given, wins over the annotation (as kube-proxy).
        let both = annotated.replace(
            "type: LoadBalancer",
            "type: LoadBalancer\n  loadBalancerSourceRanges: [198.18.5.0/24]",
        );
        assert_eq!(ranges(&both), vec!["198.18.5.0/24"]);
        // Only load balancers are restricted.
        assert!(ranges(&field.replace("type: LoadBalancer", "type: NodePort")).is_empty());

        let bad = LB.replace(
            "type: LoadBalancer",
            "type: LoadBalancer\n  loadBalancerSourceRanges: [198.18.0.0/16, 198.18.1.0/24, 198.18.2.1]",
        );
        let err = validate_service(&svc(&bad)).unwrap_err();
        assert_eq!(err.field(), "spec.loadBalancerSourceRanges[2]");
        assert_eq!(
            err.to_string(),
            "Service edge/front: spec.loadBalancerSourceRanges[2]: \"198.18.2.1\" is not an \
             address range (a.b.c.d/n or x::y/n)"
        );
        let bad = annotated.replace("198.19.0.0/16", "198.19.0.0/33");
        let err = validate_service(&svc(&bad)).unwrap_err();
        assert_eq!(
            err.field(),
            "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges][1]"
        );
    }

    #[test]
    fn prefixes_parse_like_go_parse_cidr() {
        let p = |s: &str| parse_prefix(s).map(|p| p.to_string());
        assert_eq!(p("198.18.7.9/24").as_deref(), Some("198.18.7.0/24"));
        assert_eq!(p("198.18.7.9/32").as_deref(), Some("198.18.7.9/32"));
        assert_eq!(p("198.18.7.9/0").as_deref(), Some("0.0.0.0/0"));
        assert_eq!(p("2001:db8::ff/120").as_deref(), Some("2001:db8::/120"));
        assert_eq!(p("::/0").as_deref(), Some("::/0"));
        assert_eq!(p(" 2001:db8::1/128\t").as_deref(), Some("2001:db8::1/128"));
        for bad in [
            "198.18.7.9",
            "198.18.7.9/33",
            "2001:db8::/129",
            "198.18.7.9/",
            "/24",
            "198.18.7.9/+8",
            "198.18.7.9/ 8",
            "x/8",
            "",
            "198.18.7.9/999999999999",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn new_service_fields_are_validated_with_their_path() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "targetPort: 8080",
                "targetPort: 8080\n    nodePort: 0",
                "spec.ports[0].nodePort",
            ),
            (
                "targetPort: 8080",
                "targetPort: 8080\n    nodePort: 65536",
                "spec.ports[0].nodePort",
            ),
            (
                "clusterIPs: [198.18.100.10]",
                "clusterIPs: [198.18.100.10]\n  ipFamilies: [IPv4, IPv5]",
                "spec.ipFamilies[1]",
            ),
        ];
        for (from, to, field) in cases {
            assert!(WEB.contains(from), "{from}");
            let err = validate_service(&svc(&WEB.replacen(from, to, 1))).expect_err(to);
            assert_eq!(err.field(), *field, "{err}");
        }
    }

    #[test]
    fn node_info_from_node_objects_and_settings() {
        let n = |yaml: &str| -> Node { serde_yaml::from_str(yaml).expect("test Node parses") };
        let n1 = n(r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status:
  addresses:
  - {type: InternalIP, address: 198.18.0.1}
  - {type: ExternalIP, address: "2001:db8::1"}
  - {type: Hostname, address: n1.example.com}
  - {type: InternalDNS, address: n1.cluster.local}
"#);
        let n2 = n(r#"
apiVersion: v1
kind: Node
metadata: {name: n2}
status:
  addresses: [{type: InternalIP, address: 198.18.0.2}]
"#);
        validate_node(&n1).expect("valid");
        let extra: IpAddr = "198.18.0.9".parse().expect("address");
        let settings = |name: Option<&str>| NodeSettings {
            name: name.map(str::to_owned),
            extra_addresses: vec![extra, "198.18.0.1".parse().expect("address")],
        };
        let got = NodeInfo::resolve(&settings(Some("n1")), [&n1, &n2].into_iter());
        assert_eq!(got.name.as_deref(), Some("n1"));
        let shown: Vec<String> = got.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(shown, vec!["198.18.0.1", "198.18.0.9", "2001:db8::1"]);
        // No name: every node's addresses.
        let got = NodeInfo::resolve(&settings(None), [&n1, &n2].into_iter());
        assert_eq!(got.addresses.len(), 4);
        // Named but no Node object (yet): only the extra ones.
        let got = NodeInfo::resolve(&settings(Some("n3")), [&n1, &n2].into_iter());
        let shown: Vec<String> = got.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(shown, vec!["198.18.0.1", "198.18.0.9"]);

        let bad = n(r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status:
  addresses:
  - {type: Hostname, address: not-an-ip-but-fine}
  - {type: ExternalIP, address: 198.18.0.300}
"#);
        let err = validate_node(&bad).unwrap_err();
        assert_eq!(err.field(), "status.addresses[1].address");
        assert_eq!(
            err.to_string(),
            "Node n1: status.addresses[1].address: \"198.18.0.300\" is not an IP address"
        );
    }

    #[test]
    fn headless_and_external_name_are_ignored() {
        let headless = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  clusterIPs: [None]
  externalIPs: [198.18.200.50]
  ports: [{port: 5432}]
"#;
        let ext = r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec:
  type: ExternalName
  externalName: db.example.com
  ports: [{port: 5432}]
"#;
        let db_slice = WEB_SLICE.replace("service-name: web", "service-name: db");
        let state = run(&[svc(headless), svc(ext), svc(WEB)], &[slice(&db_slice)]);
        let names: Vec<_> = state.services.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, vec!["web"]);
        assert!(service_warnings(&svc(headless)).is_empty());
    }

    #[test]
    fn ipv6_single_stack() {
        let v6 = r#"
apiVersion: v1
kind: Service
metadata: {name: six, namespace: default}
spec:
  clusterIP: 2001:db8::10
  clusterIPs: ["2001:db8::10"]
  ipFamilies: [IPv6]
  ports: [{port: 80, targetPort: 8080}]
"#;
        let s = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: six-1, labels: {kubernetes.io/service-name: six}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["2001:db8:1::2"]}, {addresses: ["2001:db8:1::1"]}]
"#;
        let state = run(&[svc(v6)], &[slice(s)]);
        let st = &state.services[&id("default", "six", "", Protocol::Tcp)];
        assert_eq!(
            st.frontends,
            vec![fe(
                "2001:db8::10",
                80,
                Protocol::Tcp,
                FrontendKind::ClusterIp
            )]
        );
        assert_eq!(
            st.endpoints,
            vec![
                ep("2001:db8:1::1", 8080, None),
                ep("2001:db8:1::2", 8080, None)
            ]
        );
    }

    #[test]
    fn dual_stack_keeps_both_families_for_the_reconciler() {
        let ds = r#"
apiVersion: v1
kind: Service
metadata: {name: ds, namespace: default}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 198.18.100.40
  clusterIPs: [198.18.100.40, "2001:db8::40"]
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;
        let s4 = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v4, labels: {kubernetes.io/service-name: ds}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.18.4.1]}]
"#;
        let s6 = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v6, labels: {kubernetes.io/service-name: ds}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ["2001:db8:4::1"]}]
"#;
        let state = run(&[svc(ds)], &[slice(s4), slice(s6)]);
        assert_eq!(state.services.len(), 1);
        let st = &state.services[&id("default", "ds", "http", Protocol::Tcp)];
        assert_eq!(
            st.frontends,
            vec![
                fe("198.18.100.40", 80, Protocol::Tcp, FrontendKind::ClusterIp),
                fe("2001:db8::40", 80, Protocol::Tcp, FrontendKind::ClusterIp),
            ]
        );
        let fams: Vec<bool> = st.endpoints.iter().map(|e| e.addr.is_ipv4()).collect();
        assert_eq!(fams, vec![true, false]);
        assert_eq!(
            st.endpoints[1].addr,
            IpAddr::V6("2001:db8:4::1".parse::<Ipv6Addr>().unwrap())
        );
    }

    #[test]
    fn fqdn_slices_are_ignored() {
        let fqdn = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-fqdn, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: FQDN
ports: [{name: "", port: 8080}]
endpoints: [{addresses: [db.example.com]}]
"#;
        let state = run(&[svc(WEB)], &[slice(fqdn)]);
        assert!(state.services[&id("shop", "web", "", Protocol::Tcp)]
            .endpoints
            .is_empty());
    }

    #[test]
    fn sctp_port_is_skipped_with_a_warning_not_the_service() {
        let mixed = r#"
apiVersion: v1
kind: Service
metadata: {name: sig, namespace: tel}
spec:
  clusterIP: 198.18.100.60
  ports:
  - {name: sctp, port: 3868, protocol: SCTP}
  - {name: tcp, port: 3868, protocol: TCP}
"#;
        let s = svc(mixed);
        let state = run(std::slice::from_ref(&s), &[]);
        let keys: Vec<_> = state.services.keys().cloned().collect();
        assert_eq!(keys, vec![id("tel", "sig", "tcp", Protocol::Tcp)]);
        let warnings = service_warnings(&s);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].is_warning());
        assert_eq!(warnings[0].field(), "spec.ports[0].protocol");
        assert_eq!(
            warnings[0].to_string(),
            "Service tel/sig: spec.ports[0].protocol: protocol SCTP is not supported, port skipped"
        );
    }

    /// Each validation error names the object and the field.
    #[test]
    fn service_validation_errors_name_object_and_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("name: web\n", "name: \"\"\n", "metadata.name"),
            (
                "clusterIP: 198.18.100.10",
                "clusterIP: 198.18.100.300",
                "spec.clusterIP",
            ),
            (
                "clusterIPs: [198.18.100.10]",
                "clusterIPs: [198.18.100.10, 198.18.100.11]",
                "spec.clusterIPs[1]",
            ),
            (
                "clusterIPs: [198.18.100.10]",
                "clusterIPs: [198.18.100.11]",
                "spec.clusterIPs[0]",
            ),
            ("type: ClusterIP", "type: Magic", "spec.type"),
            ("port: 80", "port: 0", "spec.ports[0].port"),
            ("port: 80", "port: 70000", "spec.ports[0].port"),
            (
                "targetPort: 8080",
                "targetPort: 65536",
                "spec.ports[0].targetPort",
            ),
            ("protocol: TCP", "protocol: ICMP", "spec.ports[0].protocol"),
            (
                "spec:\n",
                "spec:\n  externalIPs: [198.18.200.1, not-an-ip]\n",
                "spec.externalIPs[1]",
            ),
        ];
        for (from, to, field) in cases {
            assert!(WEB.contains(from), "{from}");
            let s = svc(&WEB.replacen(from, to, 1));
            let err = validate_service(&s).expect_err(to);
            assert_eq!(err.field(), *field, "{err}");
            assert_eq!(err.object().kind, ObjectKind::Service);
            let msg = err.to_string();
            assert!(msg.contains(field), "{msg}");
            if *field != "metadata.name" {
                assert!(msg.starts_with("Service shop/web: "), "{msg}");
            } else {
                assert!(msg.starts_with("Service shop/<unnamed>: "), "{msg}");
            }
        }
    }

    #[test]
    fn ingress_ip_validation_names_the_index() {
        let bad = LB.replace("- ip: 198.18.200.2", "- ip: 198.18.200.x");
        let err = validate_service(&svc(&bad)).unwrap_err();
        assert_eq!(err.field(), "status.loadBalancer.ingress[1].ip");
        assert_eq!(
            err.to_string(),
            "Service edge/front: status.loadBalancer.ingress[1].ip: \"198.18.200.x\" is not an IP address"
        );
    }

    #[test]
    fn multi_port_names_must_be_unique_and_present() {
        let dup = MULTI.replace("{name: metrics, port: 9090", "{name: http, port: 9090");
        let err = validate_service(&svc(&dup)).unwrap_err();
        assert!(
            matches!(&err, TranslateError::DuplicatePortName { port_name, first, .. }
                if port_name == "http" && &**first == "spec.ports[0]"),
            "{err:?}"
        );
        assert_eq!(err.field(), "spec.ports[1].name");
        assert_eq!(err.object().to_string(), "Service default/app");

        let unnamed = MULTI.replace("{name: dns, port: 53", "{port: 53");
        let err = validate_service(&svc(&unnamed)).unwrap_err();
        assert_eq!(err.field(), "spec.ports[2].name");

        let same_port = MULTI.replace("{name: metrics, port: 9090", "{name: metrics, port: 80");
        let err = validate_service(&svc(&same_port)).unwrap_err();
        assert_eq!(err.field(), "spec.ports[1].port");
        assert!(matches!(
            err,
            TranslateError::DuplicatePort { port: 80, .. }
        ));
    }

    #[test]
    fn slice_validation_errors_name_object_and_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("name: web-abc12", "name: \"\"", "metadata.name"),
            ("addressType: IPv4", "addressType: IPX", "addressType"),
            (
                "kubernetes.io/service-name: web",
                "app: web",
                "metadata.labels[kubernetes.io/service-name]",
            ),
            (
                "[198.18.1.2]",
                "[198.18.1.256]",
                "endpoints[0].addresses[0]",
            ),
            (
                "[198.18.1.1]",
                "[198.18.1.9, \"2001:db8::1\"]",
                "endpoints[1].addresses[1]",
            ),
            ("[198.18.1.3]", "[]", "endpoints[2].addresses"),
            ("port: 8080", "port: 0", "ports[0].port"),
            ("port: 8080", "port: 65536", "ports[0].port"),
            ("protocol: TCP", "protocol: tcp", "ports[0].protocol"),
        ];
        for (from, to, field) in cases {
            assert!(WEB_SLICE.contains(from), "{from}");
            let s = slice(&WEB_SLICE.replacen(from, to, 1));
            let err = validate_slice(&s).expect_err(to);
            assert_eq!(err.field(), *field, "{err}");
            assert_eq!(err.object().kind, ObjectKind::EndpointSlice);
            assert_eq!(err.object().namespace, "shop");
            let msg = err.to_string();
            assert!(msg.starts_with("EndpointSlice shop/"), "{msg}");
            assert!(msg.contains(field), "{msg}");
        }
    }

    #[test]
    fn invalid_objects_do_not_panic_translate() {
        // translate only promises meaningful output for valid objects, but garbage must
        // not crash the agent.
        let bad = svc(&WEB
            .replace("port: 80", "port: 99999")
            .replace("clusterIP: 198.18.100.10", "clusterIP: nonsense"));
        let bad_slice = slice(&WEB_SLICE.replace("[198.18.1.2]", "[x]"));
        let state = translate(
            [&bad].into_iter(),
            [&bad_slice].into_iter(),
            &NodeInfo::default(),
        );
        assert!(state.services.is_empty());
    }
}
