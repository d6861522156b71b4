//! What lbctl shows and what the reconciler adopts: the maps read back into plain values
//! (names from SVC_META and BE_META, counters summed over CPUs, addresses as `IpAddr`).
//! Nothing here writes; everything works the same on maps opened from pins while the agent
//! runs, so the LRU maps (CT, RNAT, AFFINITY) may lose entries while they are walked.

use std::net::{IpAddr, SocketAddr};

use aya::maps::{HashMap, MapData, PerCpuValues};
use lb_common::{
    AffinityKey, AffinityValue, Backend, Counters, ServiceKey, BACKEND_F_ACTIVE, MAP_AFFINITY,
    MAP_BACKENDS, MAP_BE_META, MAP_BE_STATS, MAP_CT, MAP_IFACES, MAP_MAGLEV, MAP_REASONS, MAP_RNAT,
    MAP_SERVICES, MAP_SRC_RANGES, MAP_SVC_META, MAP_SVC_STATS, NUM_REASONS, REASON_NAMES,
};

use super::{addr_from_map, op_err, Ifaces, LbMaps, MapError, SrcRange};

/// The socket address of a 16-byte map address and a network-order port.
fn socket_addr(a: &[u8; 16], port_be: u16) -> SocketAddr {
    SocketAddr::new(addr_from_map(a), u16::from_be(port_be))
}

/// A service port's or backend's traffic, summed over CPUs (`lb_common::Counters`
/// without its padding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub new_flows: u64,
}

fn sum_counters(v: &PerCpuValues<Counters>) -> Traffic {
    v.iter().fold(Traffic::default(), |mut s, c| {
        s.fwd_packets += c.fwd_packets;
        s.fwd_bytes += c.fwd_bytes;
        s.rev_packets += c.rev_packets;
        s.rev_bytes += c.rev_bytes;
        s.new_flows += c.new_flows;
        s
    })
}

/// One frontend of a service port, as lbctl shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FrontendInfo {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub maglev_offset: u32,
    pub maglev_size: u32,
    pub flags: u32,
    pub affinity_timeout_s: u32,
}

/// A service port: its name (SVC_META), frontends (SERVICES) and counters summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServiceInfo {
    pub svc_id: u32,
    /// `None` when SVC_META has no entry (an inconsistent or foreign map).
    pub name: Option<String>,
    pub frontends: Vec<FrontendInfo>,
    pub counters: Traffic,
}

/// An active backend with its name (BE_META) and counters summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BackendInfo {
    pub id: u32,
    pub addr: SocketAddr,
    pub name: Option<String>,
    pub counters: Traffic,
}

/// A tracked flow (a CT entry): client → VIP as sent, and what it is rewritten to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FlowInfo {
    pub proto: u8,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    /// Destination after DNAT (the backend).
    pub backend: SocketAddr,
    /// Source after NAT: the client, or the VIP for hairpin flows (`NAT_F_SNAT`).
    pub new_src: SocketAddr,
    pub backend_id: u32,
    pub svc_id: u32,
    pub flags: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the flow was created.
    pub created_ns: u64,
}

/// An interface the programs are attached to (IFACES).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IfaceEntry {
    pub ifindex: u32,
    pub role: u32,
    pub flags: u32,
}

impl LbMaps {
    /// Service ports sorted by name (unnamed ones last, by id).
    pub fn list_services(&self) -> Result<Vec<ServiceInfo>, MapError> {
        let mut by_id: std::collections::BTreeMap<u32, ServiceInfo> = Default::default();
        for r in &self.services {
            let (k, v) = r.map_err(op_err("iterate", MAP_SERVICES, "*"))?;
            let e = by_id.entry(v.svc_id).or_insert_with(|| ServiceInfo {
                svc_id: v.svc_id,
                name: None,
                frontends: Vec::new(),
                counters: Traffic::default(),
            });
            e.frontends.push(FrontendInfo {
                addr: addr_from_map(&k.addr),
                port: u16::from_be(k.port_be),
                proto: k.proto,
                maglev_offset: v.maglev_offset,
                maglev_size: v.maglev_size,
                flags: v.flags,
                affinity_timeout_s: v.affinity_timeout_s,
            });
        }
        for e in by_id.values_mut() {
            e.frontends.sort_by_key(|f| (f.addr, f.port, f.proto));
            e.name = match self.svc_meta.get(&e.svc_id, 0) {
                Ok(m) => Some(m.as_str().to_owned()),
                Err(aya::maps::MapError::KeyNotFound) => None,
                Err(source) => return Err(op_err("get", MAP_SVC_META, e.svc_id)(source)),
            };
            if e.svc_id < self.svc_stats.len() {
                let c = self.svc_stats.get(&e.svc_id, 0).map_err(op_err(
                    "get",
                    MAP_SVC_STATS,
                    e.svc_id,
                ))?;
                e.counters = sum_counters(&c);
            }
        }
        let mut out: Vec<ServiceInfo> = by_id.into_values().collect();
        out.sort_by(|a, b| {
            (a.name.is_none(), &a.name, a.svc_id).cmp(&(b.name.is_none(), &b.name, b.svc_id))
        });
        Ok(out)
    }

    /// Active backends by id.
    pub fn list_backends(&self) -> Result<Vec<BackendInfo>, MapError> {
        let mut out = Vec::new();
        for (id, b) in self.active_backends()? {
            let name = match self.be_meta.get(&id, 0) {
                Ok(m) => Some(m.as_str().to_owned()),
                Err(aya::maps::MapError::KeyNotFound) => None,
                Err(source) => return Err(op_err("get", MAP_BE_META, id)(source)),
            };
            let c = if id < self.be_stats.len() {
                sum_counters(
                    &self
                        .be_stats
                        .get(&id, 0)
                        .map_err(op_err("get", MAP_BE_STATS, id))?,
                )
            } else {
                Traffic::default()
            };
            out.push(BackendInfo {
                id,
                addr: socket_addr(&b.addr, b.port_be),
                name,
                counters: c,
            });
        }
        Ok(out)
    }

    /// Tracked flows (CT), at most `limit`, in the map's iteration order.
    pub fn list_flows(&self, limit: usize) -> Result<Vec<FlowInfo>, MapError> {
        let mut out = Vec::new();
        for r in &self.ct {
            if out.len() >= limit {
                break;
            }
            let (k, n) = match r {
                Ok(kv) => kv,
                // An LRU entry can be evicted between the key walk and the lookup.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(source) => return Err(op_err("iterate", MAP_CT, "*")(source)),
            };
            out.push(FlowInfo {
                proto: k.proto,
                client: socket_addr(&k.src, k.sport_be),
                vip: socket_addr(&k.dst, k.dport_be),
                backend: socket_addr(&n.new_dst, n.new_dport_be),
                new_src: socket_addr(&n.new_src, n.new_sport_be),
                backend_id: n.backend_id,
                svc_id: n.svc_id,
                flags: n.flags,
                created_ns: n.created_ns,
            });
        }
        Ok(out)
    }

    /// Number of reply-direction (RNAT) entries.
    pub fn count_rnat(&self) -> Result<usize, MapError> {
        let mut n = 0;
        for k in self.rnat.keys() {
            match k {
                Ok(_) => n += 1,
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(op_err("iterate", MAP_RNAT, "*")(source)),
            }
        }
        Ok(n)
    }

    /// Every verdict reason with its packet count summed over CPUs, in `R_*` order.
    pub fn reasons(&self) -> Result<Vec<(&'static str, u64)>, MapError> {
        let mut out = Vec::with_capacity(NUM_REASONS as usize);
        for (i, name) in REASON_NAMES.iter().enumerate() {
            let i = i as u32;
            let n = if i < self.reasons.len() {
                self.reasons
                    .get(&i, 0)
                    .map_err(op_err("get", MAP_REASONS, i))?
                    .iter()
                    .sum()
            } else {
                0
            };
            out.push((*name, n));
        }
        Ok(out)
    }

    /// Every SRC_RANGES entry, sorted by svc_id, then IPv4 before IPv6, by address.
    pub fn list_src_ranges(&self) -> Result<Vec<SrcRange>, MapError> {
        let mut out = Vec::new();
        // Keys only: a value lookup on an LPM trie is a longest-prefix match, not the entry.
        for k in self.src_ranges.keys() {
            let k = k.map_err(op_err("iterate", MAP_SRC_RANGES, "*"))?;
            if let Some(r) = SrcRange::from_key(&k) {
                out.push(r);
            }
        }
        out.sort_by_key(|r| (r.svc_id, r.prefix()));
        Ok(out)
    }

    /// ClientIP affinity entries (AFFINITY), at most `limit`, in the map's order.
    pub fn list_affinity(
        &self,
        limit: usize,
    ) -> Result<Vec<(AffinityKey, AffinityValue)>, MapError> {
        let mut out = Vec::new();
        for r in &self.affinity {
            if out.len() >= limit {
                break;
            }
            match r {
                Ok(kv) => out.push(kv),
                // An LRU entry can be evicted between the key walk and the lookup.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(op_err("iterate", MAP_AFFINITY, "*")(source)),
            }
        }
        Ok(out)
    }

    /// Reads the whole MAGLEV range of one table (for lbctl and tests).
    pub fn maglev_range(&self, offset: u32, len: u32) -> Result<Vec<u32>, MapError> {
        (offset..offset.saturating_add(len))
            .map(|i| self.maglev.get(&i, 0).map_err(op_err("get", MAP_MAGLEV, i)))
            .collect()
    }

    pub(super) fn active_backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
        let mut out = Vec::new();
        for (i, r) in self.backends.iter().enumerate() {
            let b = r.map_err(op_err("get", MAP_BACKENDS, i))?;
            if b.flags & BACKEND_F_ACTIVE != 0 {
                out.push((i as u32, b));
            }
        }
        Ok(out)
    }
}

pub(super) fn hash_entries<K: aya::Pod, V: aya::Pod>(
    m: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, MapError> {
    m.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(op_err("iterate", name, "*"))
}

/// `3:198.18.0.0/24` (svc_id, prefix) for error messages.
pub fn fmt_src_range(r: &SrcRange) -> String {
    format!("{}:{}", r.svc_id, r.prefix())
}

/// `198.18.0.10:80/6` style key for error messages.
pub fn fmt_key(k: &ServiceKey) -> String {
    format!("{}/{}", socket_addr(&k.addr, k.port_be), k.proto)
}

impl Ifaces {
    /// The IFACES entries, by ifindex.
    pub fn list(&self) -> Result<Vec<IfaceEntry>, MapError> {
        let mut out: Vec<IfaceEntry> = hash_entries(&self.map, MAP_IFACES)?
            .into_iter()
            .map(|(ifindex, i)| IfaceEntry {
                ifindex,
                role: i.role,
                flags: i.flags,
            })
            .collect();
        out.sort_by_key(|e| e.ifindex);
        Ok(out)
    }
}
