//! Names of the maps, programs and globals in the object file: the pin names under the
//! pin directory (default `/sys/fs/bpf/xdplb`), and what the loader, the agent and lbctl
//! look them up by. BPF object names are at most 15 bytes.

/// Frontends: `ServiceKey` → `ServiceValue`. Written by the agent.
pub const MAP_SERVICES: &str = "SERVICES";
/// Frontend addresses: 16-byte address → `VipInfo`. Written by the agent.
pub const MAP_VIPS: &str = "VIPS";
/// Backends: backend id → `Backend`. Written by the agent.
pub const MAP_BACKENDS: &str = "BACKENDS";
/// All Maglev tables: slot → backend id. Written by the agent.
pub const MAP_MAGLEV: &str = "MAGLEV";
/// Forward connection tracking: `FlowKey` as the client sent it → `NatEntry`. Written by
/// the programs.
pub const MAP_CT: &str = "CT";
/// Reply connection tracking: `FlowKey` as the backend sends it → `NatEntry`. Written by
/// the programs.
pub const MAP_RNAT: &str = "RNAT";
/// Per-CPU `Counters` per svc_id. Written by the programs, read by lbctl.
pub const MAP_SVC_STATS: &str = "SVC_STATS";
/// Per-CPU `Counters` per backend id. Written by the programs, read by lbctl.
pub const MAP_BE_STATS: &str = "BE_STATS";
/// Per-CPU packet count per verdict reason (`R_*`). Written by the programs.
pub const MAP_REASONS: &str = "REASONS";
/// Attached interfaces: ifindex → `IfaceInfo`. Written by the agent.
pub const MAP_IFACES: &str = "IFACES";
/// Service port names for lbctl: svc_id → `NameMeta`. Written by the agent.
pub const MAP_SVC_META: &str = "SVC_META";
/// Backend names for lbctl: backend id → `NameMeta`. Written by the agent.
pub const MAP_BE_META: &str = "BE_META";
/// ClientIP session affinity: `AffinityKey` → `AffinityValue`. Written by the programs;
/// the agent deletes stale entries.
pub const MAP_AFFINITY: &str = "AFFINITY";
/// `loadBalancerSourceRanges`: LPM trie over `SrcRangeData`. Written by the agent.
pub const MAP_SRC_RANGES: &str = "SRC_RANGES";
/// Reverse translation of sockets whose destination a socket program rewrote to a
/// backend: `SockRnatKey` → `SockRnatValue`. Written by the socket programs.
pub const MAP_SOCK_RNAT: &str = "SOCK_RNAT";
/// The next-hop cache of the redirect path: `NeighKey` → `NeighEntry`. Written by the
/// programs. Not pinned and not in [`ALL_MAPS`]: a cache whose entries live one second is
/// not state worth keeping over a restart, and a fresh agent starts empty.
pub const MAP_NEIGH: &str = "NEIGH";

/// Every pinned map the programs define, in the order `lbctl` lists them.
pub const ALL_MAPS: [&str; 15] = [
    MAP_SERVICES,
    MAP_VIPS,
    MAP_BACKENDS,
    MAP_MAGLEV,
    MAP_CT,
    MAP_RNAT,
    MAP_SVC_STATS,
    MAP_BE_STATS,
    MAP_REASONS,
    MAP_IFACES,
    MAP_SVC_META,
    MAP_BE_META,
    MAP_AFFINITY,
    MAP_SRC_RANGES,
    MAP_SOCK_RNAT,
];

/// The XDP program for edge interfaces (NICs): client traffic to VIPs, so it looks
/// SERVICES up before RNAT.
pub const PROG_EDGE: &str = "xdp_edge";
/// The XDP program for the host side of pod veths: mostly backend replies, so it looks
/// RNAT up first.
pub const PROG_POD: &str = "xdp_pod";

// The cgroup sock_addr programs (lb-ebpf/src/sock.rs) translate services for processes
// in the agent's own network namespace, which XDP never sees (host-network pods, node
// daemons; kube-proxy's OUTPUT chain).

/// Reverse-translates the source of datagrams an IPv4 UDP socket receives from a backend.
pub const PROG_SOCK_RECVMSG4: &str = "sock_recvmsg4";
/// Reverse-translates the source of datagrams an IPv6 UDP socket receives from a backend.
pub const PROG_SOCK_RECVMSG6: &str = "sock_recvmsg6";
/// Makes getpeername() of a translated IPv4 socket show the frontend, not the backend.
pub const PROG_SOCK_GETPEER4: &str = "sock_getpeer4";
/// Makes getpeername() of a translated IPv6 socket show the frontend, not the backend.
pub const PROG_SOCK_GETPEER6: &str = "sock_getpeer6";
/// Translates connect() of an IPv4 socket to a frontend into connect() to a backend.
pub const PROG_SOCK_CONNECT4: &str = "sock_connect4";
/// Translates connect() of an IPv6 socket to a frontend into connect() to a backend.
pub const PROG_SOCK_CONNECT6: &str = "sock_connect6";
/// Translates the destination of an IPv4 UDP sendmsg() to a frontend.
pub const PROG_SOCK_SENDMSG4: &str = "sock_sendmsg4";
/// Translates the destination of an IPv6 UDP sendmsg() to a frontend.
pub const PROG_SOCK_SENDMSG6: &str = "sock_sendmsg6";
/// The cgroup sock_addr programs, in attach order: the reverse programs first, so no
/// socket is ever translated forward without its answers being translated back.
pub const SOCK_PROGRAMS: [&str; 8] = [
    PROG_SOCK_RECVMSG4,
    PROG_SOCK_RECVMSG6,
    PROG_SOCK_GETPEER4,
    PROG_SOCK_GETPEER6,
    PROG_SOCK_CONNECT4,
    PROG_SOCK_CONNECT6,
    PROG_SOCK_SENDMSG4,
    PROG_SOCK_SENDMSG6,
];
/// The load-time global holding the network namespace cookie the programs act for (0, the
/// default, is never a namespace's cookie: the programs then do nothing).
pub const SOCK_NETNS_GLOBAL: &str = "SOCK_NETNS_COOKIE";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_fit_bpf_object_names() {
        for n in ALL_MAPS {
            assert!(n.len() <= 15, "{n} is longer than a BPF object name");
        }
    }
}
