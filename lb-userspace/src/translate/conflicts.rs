//! Frontends claimed by several service ports: SERVICES has one entry per (address,
//! port, protocol), so each contested frontend goes to one claimant, chosen
//! deterministically (see `resolve_conflicts`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::model::{DesiredState, FrontendKind, Protocol, ServicePortId};

/// Two service ports claiming one (address, port, protocol): only one can own the
/// SERVICES entry. Possible with externalIPs and load balancer IPs (ClusterIPs are
/// allocated uniquely by the API server).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "frontend {}/{protocol} is claimed by {kept} and {dropped}: {kept} keeps it",
    std::net::SocketAddr::new(*addr, *port)
)]
pub struct FrontendConflict {
    /// The contested frontend: address, port (host order), protocol.
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// The service port that keeps the frontend.
    pub kept: ServicePortId,
    /// A service port that loses it (and only it: its other frontends stay).
    pub dropped: ServicePortId,
}

/// What SERVICES keys a frontend by: (address, port, protocol).
type FrontendKey = (IpAddr, u16, Protocol);

/// Gives every contested frontend to one service port: a ClusterIP before any other
/// kind, then the older Service (`created`: `metadata.creationTimestamp` per (namespace,
/// name)), then the smaller `ServicePortId`. Removes it from the others and returns one
/// conflict per loser.
pub(super) fn resolve_conflicts(
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
    for ((addr, port, protocol), mut claimants) in claims {
        if claimants.len() < 2 {
            continue;
        }
        claimants.sort_by_key(|(id, kind)| {
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
        let kept = claimants[0].0.clone();
        for (id, _) in &claimants[1..] {
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
