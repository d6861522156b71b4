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
}

/// An address clients connect to: (VIP, port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub kind: FrontendKind,
}

/// A ready endpoint of a service port: where new flows may go.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    /// `namespace/pod` from the endpoint's targetRef, for display only.
    pub target: Option<String>,
}

/// Everything the maps need for one service port.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServicePortState {
    /// Sorted and without duplicates.
    pub frontends: Vec<Frontend>,
    /// Ready endpoints, sorted by (addr, port) and without duplicates. Empty means the
    /// service refuses new connections.
    pub endpoints: Vec<Endpoint>,
}

/// The whole desired state of the node.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DesiredState {
    pub services: BTreeMap<ServicePortId, ServicePortState>,
}
