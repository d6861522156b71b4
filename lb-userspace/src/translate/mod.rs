//! Kubernetes objects (`v1/Service`, `discovery.k8s.io/v1/EndpointSlice`, `v1/Node`) to
//! the desired state, with kube-proxy's semantics (1.34). Both the file source and the
//! Kubernetes API source feed the same `k8s-openapi` types through this module, so they
//! cannot disagree. This comment is the specification; each rule has a test in `tests/`,
//! and each kube-proxy parity case a manifest in `tests/corpus/` with its expected
//! translation.
//!
//! The node: a source resolves a [`NodeInfo`] from its Node objects and `NodeSettings`
//! ([`NodeInfo::resolve`]): the node's name (`--node-name`), its zone (the Node's
//! `topology.kubernetes.io/zone` label), and the addresses NodePorts listen on: the
//! `InternalIP` and `ExternalIP` addresses of the Node named so (of every Node when there
//! is no name) plus `--nodeport-address`.
//!
//! What is skipped whole, as kube-proxy skips it: Services and EndpointSlices labelled
//! `service.kubernetes.io/service-proxy-name` (any value: another proxy's) or
//! `service.kubernetes.io/headless` (kube-proxy's informers select both away), headless
//! Services (`clusterIP: None`), `type: ExternalName`, and Services with no clusterIP at
//! all (neither `clusterIP` nor `clusterIPs`: a manifest written before allocation).
//!
//! The IP families of a Service: `spec.ipFamilies`, else those of its clusterIPs.
//! kube-proxy runs one proxier per family, each programming only its family's addresses,
//! so externalIPs and load balancer IPs of another family are ignored (with a warning),
//! and NodePorts listen on node addresses of the Service's families only.
//!
//! What a Service contributes, per port (one `ServicePortId` = namespace, name, port
//! name, protocol):
//! - frontends: every `spec.clusterIPs` address (or `spec.clusterIP` when `clusterIPs` is
//!   absent), `status.loadBalancer.ingress[].ip` when `type: LoadBalancer` (except ingress
//!   points with `ipMode: Proxy`: the load balancer then proxies to the nodes itself and
//!   kube-proxy does not capture the address either), `spec.externalIPs` for any type,
//!   and for `type: NodePort` and `LoadBalancer` the port's `nodePort` on every node
//!   address of the service's families (none known: reported once per Service, naming
//!   `--node-name` and `--nodeport-address`). One (address, port, protocol) listed twice
//!   in a service is one frontend, of the first kind in `FrontendKind` order.
//! - endpoints: from the EndpointSlices labelled `kubernetes.io/service-name: <name>` in
//!   the same namespace, the slice port whose `name` and protocol equal the service
//!   port's. The EndpointSlice controller has already resolved `targetPort` (named or
//!   numeric) into the slice ports, which is why kube-proxy never looks at `targetPort`.
//!   Conditions: `ready` (absent: true), `serving` (absent: the value of `ready`),
//!   `terminating` (absent: false). An endpoint is local when its `nodeName` is the
//!   node's name, or always when the node has no name. An endpoint listed more than once
//!   (a pod moving between slices) is one endpoint: the copy with the best conditions
//!   (ready, else serving and terminating) counts, local if any copy is.
//!   - `endpoints` (cluster set): the ready endpoints of the topology subset (below), or
//!     when there is no ready endpoint, the serving and terminating ones (kube-proxy
//!     keeps a service that is being rolled whole answering);
//!   - `local_endpoints`: the same rule applied to the local endpoints alone, without
//!     topology;
//!   - `draining`: every other listed endpoint (not in `endpoints`; it may be in
//!     `local_endpoints`): no new flows through the cluster table, but its backend stays
//!     so established flows keep it.
//! - topology (`topology`, kube-proxy's `topologyModeFromHints`): when every ready
//!   endpoint has `hints.forNodes` and one names this node, the subset is the endpoints
//!   hinted for this node (`trafficDistribution: PreferSameNode`); else when every ready
//!   endpoint has `hints.forZones` and one names this node's zone, those hinted for the
//!   zone (`PreferClose`, `topology-mode: Auto`); else all. The hints decide, not the
//!   Service fields that asked the EndpointSlice controller to write them.
//! - `externalTrafficPolicy: Local` → `external_local`, only when the service is
//!   externally accessible (type NodePort or LoadBalancer, or externalIPs), as
//!   kube-proxy's `ExternalPolicyLocal`; `internalTrafficPolicy: Local` →
//!   `internal_local`. `healthCheckNodePort` counts for `type: LoadBalancer` with
//!   `external_local` only.
//! - `sessionAffinity: ClientIP` → `affinity_timeout_s` =
//!   `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800, valid 1..=86400).
//! - `spec.loadBalancerSourceRanges` (when empty, the comma-separated annotation
//!   `service.beta.kubernetes.io/load-balancer-source-ranges`), for `type: LoadBalancer`
//!   only: CIDR prefixes, whitespace trimmed, host bits zeroed, sorted, deduplicated. A
//!   bad entry makes the Service invalid, naming it (`spec.loadBalancerSourceRanges[2]`).
//!   Each family's ranges restrict that family's load balancer IPs; a family without
//!   ranges of its own is not restricted (`ServicePortState::source_ranges_for`).
//!
//! Frontends claimed by several service ports (two services on one nodePort or external
//! IP in a file, a node address that is also an externalIP) go to one of them: see
//! [`translate_with_conflicts`].
//!
//! Everything left out on purpose is listed by [`translate_with_ignored`], one
//! [`Ignored`] per object or field with an [`IgnoredReason`] (`other-proxy`, `headless`,
//! `external-name`, `no-cluster-ip`, `wrong-family`, `no-node-address`,
//! `unsupported-protocol`); [`service_warnings`] returns the ones a user should be
//! warned about (no clusterIP, wrong family, SCTP ports).
//!
//! Dual stack: `ServicePortState.endpoints` holds the endpoints of *both* families. The
//! reconciler builds the Maglev table of each frontend from the endpoints of the
//! frontend's family only (a v4 VIP never sends to a v6 pod).
//!
//! Also not translated: SCTP ports (the data path handles TCP and UDP; the port is
//! skipped), slices of `addressType: FQDN`. Only the first of an endpoint's `addresses`
//! is used, as the API allows. Objects without `metadata.namespace` are in `default`, as
//! `kubectl apply` would put them; Nodes are cluster-scoped.
//!
//! The module, one concern per file, dependencies running one way (down this list):
//! - this page: the entry ([`translate`], [`translate_with_conflicts`],
//!   [`translate_with_ignored`]), assembling one `ServicePortState` per service port;
//! - `service`: validating a Service, what is skipped of it, and what its ports share
//!   (frontend addresses of its families, NodePort addresses); `policy`: its traffic
//!   policies, session affinity and source ranges;
//! - `endpoints`: EndpointSlices: validation, listing and classifying endpoints;
//!   `topology`: the hints' subset;
//! - `conflicts`: frontends claimed by several service ports;
//! - `node`: [`NodeInfo`] and validating a Node;
//! - `ignored`: [`Ignored`] and the label rules shared by Services and slices;
//! - `fields`, `error`, `object`: reading single field values, [`TranslateError`], and
//!   naming objects.

mod conflicts;
mod endpoints;
mod error;
mod fields;
mod ignored;
mod node;
mod object;
mod policy;
mod service;
#[cfg(test)]
mod tests;
mod topology;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

pub use conflicts::FrontendConflict;
pub use endpoints::{validate_slice, SERVICE_NAME_LABEL};
pub use error::TranslateError;
pub use ignored::{Ignored, IgnoredReason, HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL};
pub use node::{validate_node, NodeInfo, ZONE_LABEL};
pub use object::{ObjectKind, ObjectRef, DEFAULT_NAMESPACE};
pub use policy::{
    parse_prefix, DEFAULT_AFFINITY_TIMEOUT_S, MAX_AFFINITY_TIMEOUT_S, SOURCE_RANGES_ANNOTATION,
};
pub use service::{service_warnings, validate_service};

use crate::model::{DesiredState, ServicePortId, ServicePortState};
use conflicts::resolve_conflicts;
use endpoints::{classify, endpoints_by_service, EndpointsByPort};
use fields::{parse_protocol, ApiProtocol};
use object::namespace_of;
use service::{skipped, ServiceWide};

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

/// The desired state and the frontend conflicts resolved on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    /// What the maps should hold.
    pub state: DesiredState,
    /// One entry per service port that lost a frontend to another: for the source to log.
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
    translate_with_ignored(services, slices, node).0
}

/// [`translate_with_conflicts`], also listing everything left out on purpose, one
/// [`Ignored`] per object or field, with a reason from [`IgnoredReason`]: Services and
/// EndpointSlices of another proxy (`other-proxy`), headless and ExternalName Services
/// and headless slices (`headless`, `external-name`), Services without a clusterIP
/// (`no-cluster-ip`), externalIPs and load balancer IPs of a family the Service does not
/// have (`wrong-family`), NodePorts with no node address to listen on
/// (`no-node-address`, once per Service), SCTP ports (`unsupported-protocol`). In input
/// order (Services first, then slices). This is what warnings, the
/// `xdplb_objects_ignored_total{reason}` metric and `lbctl services --all` report.
pub fn translate_with_ignored<'a, 'b>(
    services: impl Iterator<Item = &'a Service>,
    slices: impl Iterator<Item = &'b EndpointSlice>,
    node: &NodeInfo,
) -> (Translation, Vec<Ignored>) {
    let mut slices_ignored = Vec::new();
    let mut endpoints = endpoints_by_service(slices, node, &mut slices_ignored);
    let mut ignored = Vec::new();
    let mut state = DesiredState::default();
    // (namespace, name) → creation time: the tie-break for contested frontends.
    let mut created: BTreeMap<(String, String), Option<Time>> = BTreeMap::new();
    for svc in services {
        if let Some(skip) = skipped(svc) {
            ignored.push(skip);
            continue;
        }
        let Some(name) = svc.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
            continue;
        };
        let namespace = namespace_of(&svc.metadata);
        let key = (namespace.to_owned(), name.to_owned());
        let listed = endpoints.remove(&key).unwrap_or_default();
        let shared = ServiceWide::of(svc, node);
        add_service_ports(svc, &shared, namespace, name, listed, node, &mut state);
        ignored.extend(shared.ignored);
        created.insert(key, svc.metadata.creation_timestamp.clone());
    }
    ignored.extend(slices_ignored);
    let conflicts = resolve_conflicts(&mut state, &created);
    (Translation { state, conflicts }, ignored)
}

/// Adds one `ServicePortState` per TCP or UDP port of a (not skipped) service, with the
/// endpoints `listed` for that port's (name, protocol).
fn add_service_ports(
    svc: &Service,
    shared: &ServiceWide,
    namespace: &str,
    name: &str,
    mut listed: EndpointsByPort,
    node: &NodeInfo,
    state: &mut DesiredState,
) {
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_deref());
    for p in ports.unwrap_or_default() {
        let Some(ApiProtocol::Supported(protocol)) = parse_protocol(p.protocol.as_deref()) else {
            continue;
        };
        let Some(port) = u16::try_from(p.port).ok().filter(|&n| n != 0) else {
            continue;
        };
        let port_name = p.name.clone().unwrap_or_default();
        let frontends = shared.frontends(port, protocol, p.node_port);
        let port_endpoints = listed
            .remove(&(port_name.clone(), protocol))
            .unwrap_or_default();
        let (endpoints, local_endpoints, draining) = classify(&port_endpoints, node);
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
                internal_local: shared.internal_local,
                external_local: shared.external_local,
                affinity_timeout_s: shared.affinity_timeout_s,
                source_ranges: shared.source_ranges.clone(),
                health_check_node_port: shared.health_check_node_port,
            },
        );
    }
}
