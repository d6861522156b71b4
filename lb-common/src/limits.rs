//! Map capacities: the `max_entries` the programs declare and the bounds user space
//! allocates ids below. Arrays are indexed by those ids, so an id at or above its bound
//! never reaches the kernel.

/// Frontends the agent can program: (VIP, port, protocol) triples, i.e. SERVICES entries.
pub const MAX_FRONTENDS: u32 = 65_536;
/// Service ports (a Service's port with all its frontends shares one id): the size of
/// SVC_STATS and SVC_META, and the bound on `svc_id`.
pub const MAX_SERVICES: u32 = 65_536;
/// Distinct backends (address, port) across all services: the size of BACKENDS,
/// BE_STATS and BE_META, and the bound on backend ids.
pub const MAX_BACKENDS: u32 = 65_536;
/// Slots of all Maglev tables together (the MAGLEV array). Each service port owns a
/// contiguous range.
pub const MAGLEV_SLOTS: u32 = 1 << 20;
/// Connection-tracking entries (each direction has its own map of this size).
pub const MAX_FLOWS: u32 = 262_144;
/// Distinct VIP addresses (VIPS entries).
pub const MAX_VIPS: u32 = 65_536;
/// Interfaces the programs are attached to (IFACES entries).
pub const MAX_IFACES: u32 = 4_096;
/// ClientIP session-affinity entries (client address, service port) -> backend.
pub const MAX_AFFINITY: u32 = 65_536;
/// `loadBalancerSourceRanges` prefixes over all service ports (SRC_RANGES entries).
pub const MAX_SRC_RANGES: u32 = 16_384;
/// Smallest Maglev table for two or more endpoints (one endpoint gets a 1-slot table), and
/// the first rung of the ladder of table sizes (each rung the smallest prime >= twice the
/// one below: 101, 211, 431, 863, ...).
pub const MAGLEV_MIN_SIZE: u32 = 101;
/// A table has at least this many slots per endpoint: the smallest rung >= 20 x N. With
/// shares differing by at most one slot, the busiest backend gets <= 21/20 of the quietest
/// one's new flows (lb-userspace's maglev.rs has the reasoning and the measurements).
pub const MAGLEV_MULTIPLIER: u32 = 20;
/// Sockets remembered for reverse translation (LRU: the oldest are forgotten first, which
/// only makes their getpeername()/recvmsg() show the backend instead of the VIP).
pub const MAX_SOCK_RNAT: u32 = 65_536;
/// Destinations in the next-hop cache: backends for forward packets, clients for replies.
/// LRU: when there are more, the least recently used ones are looked up again, which
/// costs speed only. 16,384 entries take ~1.9 MiB of locked memory (65,536 took 7.5 MiB).
pub const MAX_NEIGH: u32 = 16_384;
