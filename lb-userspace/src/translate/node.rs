//! The node `translate` runs for: its name (which endpoints are local), its zone (which
//! topology hints apply) and the addresses NodePorts listen on.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

use super::error::TranslateError;
use super::fields::check_ip;
use super::object::{ObjectKind, ObjectRef};
use crate::model::NodeSettings;

/// The Node address types NodePorts listen on (kube-proxy's default
/// `--nodeport-addresses` takes the node's addresses; `Hostname` and `InternalDNS` are
/// names, not addresses).
const NODE_ADDRESS_TYPES: [&str; 2] = ["InternalIP", "ExternalIP"];

/// The Node label that names its zone, matched against EndpointSlice `hints.forZones`.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What `translate` needs to know about the node it runs on, resolved by the source from
/// the Node objects and [`NodeSettings`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Endpoints whose `nodeName` equals it are local. `None`: every endpoint is local.
    pub name: Option<String>,
    /// The addresses NodePorts listen on, sorted, without duplicates.
    pub addresses: Vec<IpAddr>,
    /// The `topology.kubernetes.io/zone` label of the Node named `name`. `None` (no
    /// name, no Node object, no label): zone hints never apply.
    pub zone: Option<String>,
}

impl NodeInfo {
    /// Node addresses = the `InternalIP` and `ExternalIP` addresses of the Node named
    /// `settings.name` (of every Node when there is no name) plus
    /// `settings.extra_addresses`. A named node without a Node object has only the extra
    /// addresses. The zone is the named Node's `topology.kubernetes.io/zone` label.
    pub fn resolve<'a>(settings: &NodeSettings, nodes: impl Iterator<Item = &'a Node>) -> Self {
        let mut addresses: Vec<IpAddr> = settings.extra_addresses.clone();
        let mut zone = None;
        for node in nodes {
            if let Some(want) = settings.name.as_deref() {
                if node.metadata.name.as_deref() != Some(want) {
                    continue;
                }
                zone = node
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(ZONE_LABEL))
                    .filter(|z| !z.is_empty())
                    .cloned();
            }
            addresses.extend(node_addresses(node));
        }
        addresses.sort();
        addresses.dedup();
        Self {
            name: settings.name.clone(),
            addresses,
            zone,
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
