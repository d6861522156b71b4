//! The desired state: what the maps should hold, in terms a person recognises. Sources
//! (file, Kubernetes API) produce it through `translate`; the reconciler turns it into map
//! entries.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number, as the data path compares it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// One port of one Service: the unit that owns a Maglev table and counters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ServicePortId {
    pub namespace: String,
    pub name: String,
    /// The port's name; empty for a single unnamed port.
    pub port_name: String,
    pub protocol: Protocol,
}

impl ServicePortId {
    pub fn new(namespace: &str, name: &str, port_name: &str, protocol: Protocol) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            port_name: port_name.into(),
            protocol,
        }
    }
}

impl fmt::Display for ServicePortId {
    /// `namespace/name:port/TCP`, with the port number's name or `-` when unnamed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = if self.port_name.is_empty() {
            "-"
        } else {
            &self.port_name
        };
        write!(
            f,
            "{}/{}:{}/{}",
            self.namespace, self.name, port, self.protocol
        )
    }
}

/// How a frontend address was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum FrontendKind {
    ClusterIp,
    LoadBalancer,
    ExternalIp,
    /// `spec.ports[].nodePort` on one of the node's addresses (NodePort and LoadBalancer
    /// services).
    NodePort,
}

impl FrontendKind {
    /// LoadBalancer ingress IPs, externalIPs and NodePorts: traffic from outside the
    /// cluster, governed by `externalTrafficPolicy`. ClusterIPs follow
    /// `internalTrafficPolicy`.
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

/// An address clients connect to: (VIP, port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub kind: FrontendKind,
}

/// An endpoint of a service port (a pod's address and target port).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    /// `namespace/pod` from the endpoint's targetRef, for display only.
    pub target: Option<String>,
}

/// An address prefix (`loadBalancerSourceRanges` entry), host bits zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Prefix {
    pub addr: IpAddr,
    /// 0..=32 for IPv4, 0..=128 for IPv6.
    pub len: u8,
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Everything the maps need for one service port.
///
/// Endpoint sets follow kube-proxy (1.28+): `endpoints` are the cluster-wide endpoints
/// that take new flows: the `ready` ones, or, when none is ready, those that are `serving`
/// and `terminating`. `local_endpoints` is the same rule applied to this node's endpoints
/// only. `draining` are the remaining endpoints still listed in the slices (terminating,
/// or not ready): they take no new flows, but their backends stay in the maps so that
/// established flows keep them until they end.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServicePortState {
    /// Sorted and without duplicates.
    pub frontends: Vec<Frontend>,
    /// Cluster-wide endpoints for new flows, sorted by (addr, port), without duplicates.
    /// Empty means the service refuses new connections (TCP RST / ICMP unreachable).
    pub endpoints: Vec<Endpoint>,
    /// This node's endpoints for new flows (same rule, same order); the table of `Local`
    /// frontends. Without a node name (file source, single node) every endpoint is local.
    pub local_endpoints: Vec<Endpoint>,
    /// Endpoints kept only for established flows (not in `endpoints`), same order.
    pub draining: Vec<Endpoint>,
    /// `internalTrafficPolicy: Local`: ClusterIP frontends use `local_endpoints`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`: LoadBalancer, externalIP and NodePort frontends use
    /// `local_endpoints`. A Local frontend with no local endpoint drops new flows when
    /// `endpoints` is not empty (and refuses them when it is), like kube-proxy.
    pub external_local: bool,
    /// `sessionAffinity: ClientIP`: the timeout in seconds (default 10800).
    pub affinity_timeout_s: Option<u32>,
    /// `loadBalancerSourceRanges` of both families, sorted, without duplicates. They
    /// restrict the LoadBalancer frontends only, and per family: each family's ranges
    /// apply to that family's frontends, and a family without ranges of its own is not
    /// restricted (each kube-proxy family proxier keeps only its family's ranges,
    /// `newBaseServiceInfo`). See [`ServicePortState::source_ranges_for`]. Empty: any
    /// source.
    pub source_ranges: Vec<Prefix>,
    /// `healthCheckNodePort` (LoadBalancer with `externalTrafficPolicy: Local`).
    pub health_check_node_port: Option<u16>,
}

impl ServicePortState {
    /// Whether a frontend of this kind uses the node-local table.
    pub fn frontend_is_local(&self, kind: FrontendKind) -> bool {
        if kind.is_external() {
            self.external_local
        } else {
            self.internal_local
        }
    }

    /// The source ranges that restrict new flows to frontend `f`: the
    /// `loadBalancerSourceRanges` of `f`'s family for a LoadBalancer frontend. Empty: any
    /// source may connect (other kinds, or no range of this family).
    pub fn source_ranges_for(&self, f: &Frontend) -> Vec<Prefix> {
        if f.kind != FrontendKind::LoadBalancer {
            return Vec::new();
        }
        self.source_ranges
            .iter()
            .filter(|p| p.addr.is_ipv4() == f.addr.is_ipv4())
            .copied()
            .collect()
    }

    /// Whether only [`ServicePortState::source_ranges_for`] `f` may connect to `f`.
    pub fn restricts_source(&self, f: &Frontend) -> bool {
        f.kind == FrontendKind::LoadBalancer
            && self
                .source_ranges
                .iter()
                .any(|p| p.addr.is_ipv4() == f.addr.is_ipv4())
    }

    /// The endpoints new flows to a frontend of this kind may use.
    pub fn endpoints_for(&self, kind: FrontendKind) -> &[Endpoint] {
        if self.frontend_is_local(kind) {
            &self.local_endpoints
        } else {
            &self.endpoints
        }
    }
}

/// What the source knows about the node the agent runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSettings {
    /// `--node-name` (default: `NODE_NAME`). Endpoints whose `nodeName` equals it are local.
    /// `None`: every endpoint is local (single-node edge box, file source).
    pub name: Option<String>,
    /// `--nodeport-address`: addresses NodePorts listen on besides the Node object's
    /// `InternalIP` / `ExternalIP` addresses.
    pub extra_addresses: Vec<IpAddr>,
}

/// The whole desired state of the node.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DesiredState {
    pub services: BTreeMap<ServicePortId, ServicePortState>,
}
