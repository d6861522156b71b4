//! Topology-aware routing: which ready endpoints this node's cluster set keeps when the
//! EndpointSlices carry hints. kube-proxy's rule (pkg/proxy/topology.go,
//! `topologyModeFromHints` and `availableForTopology`, as of Kubernetes 1.34), followed
//! here:
//! - only the *ready* endpoints are looked at; with none, there is no topology;
//! - when every ready endpoint has `hints.forNodes` and one of them names this node, the
//!   cluster set is the ready endpoints hinted for this node (`PreferSameNode`);
//! - else when every ready endpoint has `hints.forZones` and one of them names this node's
//!   zone (its Node's `topology.kubernetes.io/zone` label), the ready endpoints hinted
//!   for that zone (`PreferSameZone`, `PreferClose`, `topology-mode: Auto`);
//! - else every ready endpoint.
//!
//! The hints decide alone. `spec.trafficDistribution` and the
//! `service.kubernetes.io/topology-mode` annotation (and the older
//! `service.kubernetes.io/topology-aware-hints`) are what make the EndpointSlice
//! controller write hints; kube-proxy reads only the hints since the
//! `ServiceTrafficDistribution` gate went GA (1.33; older versions also required the
//! annotation, in `canUseTopology`). The local set (`externalTrafficPolicy` /
//! `internalTrafficPolicy: Local`) ignores hints, and so does the serving-and-terminating
//! fallback: both as kube-proxy's `CategorizeEndpoints`.

use k8s_openapi::api::discovery::v1::Endpoint as SliceEndpoint;

use super::node::NodeInfo;

/// An endpoint's `hints`: the zones and nodes the EndpointSlice controller meant it for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Hints {
    /// `hints.forZones[].name`.
    zones: Vec<String>,
    /// `hints.forNodes[].name`.
    nodes: Vec<String>,
}

impl Hints {
    pub(super) fn of(ep: &SliceEndpoint) -> Self {
        let Some(hints) = ep.hints.as_ref() else {
            return Self::default();
        };
        Self {
            zones: hints
                .for_zones
                .iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            nodes: hints
                .for_nodes
                .iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        }
    }
}

/// Which ready endpoints the cluster set keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Topology<'a> {
    /// Every ready endpoint (no usable hints).
    All,
    /// Those hinted for this node (by name).
    SameNode(&'a str),
    /// Those hinted for this node's zone.
    SameZone(&'a str),
}

impl Topology<'_> {
    /// Whether an endpoint with these hints is in the subset.
    pub(super) fn admits(self, hints: &Hints) -> bool {
        match self {
            Topology::All => true,
            Topology::SameNode(node) => hints.nodes.iter().any(|n| n == node),
            Topology::SameZone(zone) => hints.zones.iter().any(|z| z == zone),
        }
    }
}

/// The topology for one service port, from the hints of its *ready* endpoints (see the
/// module comment). Without a node name or zone the matching mode never applies.
pub(super) fn topology_of<'a, 'h>(
    ready_hints: impl Iterator<Item = &'h Hints>,
    node: &'a NodeInfo,
) -> Topology<'a> {
    let name = node.name.as_deref();
    let zone = node.zone.as_deref();
    let mut any_ready = false;
    let (mut all_have_nodes, mut one_for_node) = (true, false);
    let (mut all_have_zones, mut one_for_zone) = (true, false);
    for hints in ready_hints {
        any_ready = true;
        if hints.nodes.is_empty() {
            all_have_nodes = false;
        } else if name.is_some_and(|n| hints.nodes.iter().any(|h| h == n)) {
            one_for_node = true;
        }
        if hints.zones.is_empty() {
            all_have_zones = false;
        } else if zone.is_some_and(|z| hints.zones.iter().any(|h| h == z)) {
            one_for_zone = true;
        }
    }
    match (name, zone) {
        (Some(name), _) if any_ready && all_have_nodes && one_for_node => Topology::SameNode(name),
        (_, Some(zone)) if any_ready && all_have_zones && one_for_zone => Topology::SameZone(zone),
        _ => Topology::All,
    }
}
