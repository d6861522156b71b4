//! EndpointSlices: validating them, listing the endpoints of every service port, and
//! classifying them into the sets of `ServicePortState` (ready, serving and terminating,
//! topology, local, draining) with kube-proxy's rules.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointPort, EndpointSlice};

use super::error::TranslateError;
use super::fields::{check_ip, parse_protocol, port_in_range, ApiProtocol};
use super::ignored::{excluded_by_labels, Ignored};
use super::node::NodeInfo;
use super::object::{namespace_of, ObjectKind, ObjectRef};
use super::topology::{topology_of, Hints};
use crate::model::{Endpoint, Protocol};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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
    if service.is_none_or(std::string::String::is_empty) {
        return Err(TranslateError::Missing {
            object,
            field: format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
        });
    }
    let Some(want_v4) = family_v4 else {
        // FQDN slices are ignored whole; their contents do not matter.
        return Ok(());
    };
    validate_slice_endpoints(slice, &object, want_v4)?;
    validate_slice_ports(slice, &object)
}

/// Every endpoint has an address, and every address parses and is of the slice's
/// `addressType` (`want_v4`).
fn validate_slice_endpoints(
    slice: &EndpointSlice,
    object: &ObjectRef,
    want_v4: bool,
) -> Result<(), TranslateError> {
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        if ep.addresses.is_empty() {
            return Err(TranslateError::Missing {
                object: object.clone(),
                field: format!("endpoints[{i}].addresses"),
            });
        }
        for (j, a) in ep.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            let addr = check_ip(object, field.clone(), a)?;
            if addr.is_ipv4() != want_v4 {
                return Err(TranslateError::WrongFamily {
                    object: object.clone(),
                    field,
                    value: a.clone(),
                    expected: if want_v4 { "IPv4" } else { "IPv6" },
                });
            }
        }
    }
    Ok(())
}

/// Ports are in range, protocols known, and (name, protocol) unique: the pair is what
/// ties a slice port to its service port.
fn validate_slice_ports(slice: &EndpointSlice, object: &ObjectRef) -> Result<(), TranslateError> {
    let mut seen: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if let Some(port) = p.port {
            if !port_in_range(port) {
                return Err(TranslateError::PortOutOfRange {
                    object: object.clone(),
                    field: format!("ports[{i}].port"),
                    value: port.into(),
                });
            }
        }
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if parse_protocol(Some(proto)).is_none() {
            return Err(TranslateError::UnknownProtocol {
                object: object.clone(),
                field: format!("ports[{i}].protocol"),
                value: proto.to_owned(),
            });
        }
        let name = p.name.as_deref().unwrap_or_default();
        if let Some(first) = seen.insert((name, proto), i) {
            return Err(TranslateError::DuplicatePortName {
                object: object.clone(),
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
pub(super) struct ListedEndpoint {
    ep: Endpoint,
    /// `conditions.ready`; absent means true.
    ready: bool,
    /// `conditions.serving`; absent means the value of `ready`.
    serving: bool,
    /// `conditions.terminating`; absent means false.
    terminating: bool,
    /// `nodeName` is this node (always true without a node name).
    local: bool,
    /// `hints`: which zones and nodes it is meant for (see `topology`).
    hints: Hints,
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
pub(super) type ListedEndpoints = BTreeMap<(IpAddr, u16), ListedEndpoint>;

/// The endpoints of one service, per (port name, protocol).
pub(super) type EndpointsByPort = BTreeMap<(String, Protocol), ListedEndpoints>;

/// Collects the endpoints of every slice, keyed by (namespace, service name). An endpoint
/// listed by several slices (or twice in one) is one endpoint: the copy with the best
/// conditions (ready, else serving and terminating) counts, and it is local if any copy
/// says so (as kube-proxy favours the local copy). Deciding per (address, port) before
/// classifying keeps one endpoint from being both in `endpoints` and in `draining`.
/// Slices kube-proxy never sees (labelled for another proxy, or headless) are left out
/// and reported in `ignored`.
pub(super) fn endpoints_by_service<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
    ignored: &mut Vec<Ignored>,
) -> BTreeMap<(String, String), EndpointsByPort> {
    let mut out: BTreeMap<(String, String), EndpointsByPort> = BTreeMap::new();
    for slice in slices {
        let object = ObjectRef::new(ObjectKind::EndpointSlice, &slice.metadata);
        if let Some(excluded) = excluded_by_labels(&object, &slice.metadata) {
            ignored.push(excluded);
            continue;
        }
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
            let Some((name, protocol, port)) = usable_slice_port(p) else {
                continue;
            };
            let eps = by_port.entry((name, protocol)).or_default();
            for ep in slice.endpoints.iter().flatten() {
                if let Some(listed) = listed_endpoint(ep, port, namespace, node) {
                    insert_or_merge(eps, listed);
                }
            }
        }
    }
    out
}

/// A slice port's (name, protocol, number), or `None` for one that cannot be NATed to.
fn usable_slice_port(p: &EndpointPort) -> Option<(String, Protocol, u16)> {
    // A slice port without a number means "all ports" in the API; kube-proxy cannot NAT
    // to that and skips it, and so do we.
    let port = p.port.and_then(|n| u16::try_from(n).ok())?;
    if port == 0 {
        return None;
    }
    let Some(ApiProtocol::Supported(protocol)) = parse_protocol(p.protocol.as_deref()) else {
        return None;
    };
    Some((p.name.clone().unwrap_or_default(), protocol, port))
}

/// One slice endpoint on one port, with its conditions defaulted as the API says.
/// `None` when its first address does not parse.
fn listed_endpoint(
    ep: &SliceEndpoint,
    port: u16,
    namespace: &str,
    node: &NodeInfo,
) -> Option<ListedEndpoint> {
    let addr = ep
        .addresses
        .first()
        .and_then(|a| a.parse::<IpAddr>().ok())?;
    let cond = ep.conditions.as_ref();
    let ready = cond.and_then(|c| c.ready).unwrap_or(true);
    Some(ListedEndpoint {
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
        hints: Hints::of(ep),
    })
}

/// Adds an endpoint, or merges it with the copy already listed: the copy with the better
/// [`ListedEndpoint::rank`] wins, local if either is, keeping a target if either has one.
fn insert_or_merge(eps: &mut ListedEndpoints, listed: ListedEndpoint) {
    match eps.entry((listed.ep.addr, listed.ep.port)) {
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

/// The endpoint sets of one service port (see `ServicePortState`): cluster set, local
/// set, draining. Ready endpoints that topology hints keep out of the cluster set are
/// draining: no new flows here, established ones keep going.
pub(super) fn classify(
    listed: &ListedEndpoints,
    node: &NodeInfo,
) -> (Vec<Endpoint>, Vec<Endpoint>, Vec<Endpoint>) {
    // kube-proxy's CategorizeEndpoints: the ready endpoints (of the topology subset, for
    // the cluster set only), or, only when there is none, the serving and terminating
    // ones (so a rolling update of every pod at once does not turn into refused
    // connections). The same rule among this node's endpoints alone gives the local set.
    let topology = topology_of(listed.values().filter(|l| l.ready).map(|l| &l.hints), node);
    let pick = |only_local: bool| -> Vec<Endpoint> {
        let candidates: Vec<&ListedEndpoint> =
            listed.values().filter(|l| !only_local || l.local).collect();
        let use_ready = candidates.iter().any(|l| l.ready);
        candidates
            .into_iter()
            .filter(|l| {
                if use_ready {
                    l.ready && (only_local || topology.admits(&l.hints))
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
