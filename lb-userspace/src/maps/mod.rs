//! Access to xdplb's BPF maps through aya: opened from a freshly loaded object (the agent)
//! or from the pins under the pin directory (`lbctl`, while the agent runs). Implements the
//! reconciler's [`MapWriter`] and the read helpers lbctl shows.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, IterableMap as _, Map, MapData, PerCpuArray, PerCpuValues};
use aya::Ebpf;
use lb_common::{
    is_v4_mapped, v4_mapped, AffinityKey, AffinityValue, Backend, Counters, FlowKey, IfaceInfo,
    NameMeta, NatEntry, ServiceKey, ServiceValue, SrcRangeData, VipInfo, BACKEND_F_ACTIVE,
    MAP_AFFINITY, MAP_BACKENDS, MAP_BE_META, MAP_BE_STATS, MAP_CT, MAP_IFACES, MAP_MAGLEV,
    MAP_REASONS, MAP_RNAT, MAP_SERVICES, MAP_SRC_RANGES, MAP_SVC_META, MAP_SVC_STATS, MAP_VIPS,
    NUM_REASONS, REASON_NAMES,
};

use crate::model::Prefix;

pub mod fake;
mod writer;
pub use writer::{MapSnapshot, MapWriter};

/// A failed map operation, naming the map and the key.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("map {map} is not in the loaded BPF object")]
    Missing { map: &'static str },
    #[error("opening pinned map {}", path.display())]
    OpenPinned {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("map {map} has another type or key/value size than lb-common says")]
    Layout {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("{op} {map}[{key}]")]
    Op {
        op: &'static str,
        map: &'static str,
        key: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// Used by writers that are not backed by the kernel (tests, dry runs).
    #[error("{op} {map}[{key}]: {reason}")]
    Rejected {
        op: &'static str,
        map: &'static str,
        key: String,
        reason: String,
    },
}

/// A delete of a key that is not there: aya reports the kernel's ENOENT as a syscall
/// error (only lookups become `KeyNotFound`).
fn absent(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn op_err(
    op: &'static str,
    map: &'static str,
    key: impl ToString,
) -> impl FnOnce(aya::maps::MapError) -> MapError {
    let key = key.to_string();
    move |source| MapError::Op {
        op,
        map,
        key,
        source: Box::new(source),
    }
}

/// 16-byte map address (IPv4-mapped for IPv4) from an address.
pub fn addr_to_map(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4_mapped(v4.octets()),
            None => v6.octets(),
        },
    }
}

/// The address a 16-byte map address stands for (IPv4-mapped shown as IPv4).
pub fn addr_from_map(a: &[u8; 16]) -> IpAddr {
    if is_v4_mapped(a) {
        IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*a))
    }
}

/// One SRC_RANGES entry: a `loadBalancerSourceRanges` prefix of one service port, in the
/// map's terms (see `lb_common::SrcRangeData`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcRange {
    pub svc_id: u32,
    /// Prefix bits of `addr`: 0..=128, an IPv4 `a.b.c.d/n` being `96 + n` bits of its
    /// IPv4-mapped form.
    pub bits: u32,
    /// 16-byte address, bits past `bits` zeroed.
    pub addr: [u8; 16],
}

/// `addr` with every bit from `bits` on cleared.
fn mask(mut addr: [u8; 16], bits: u32) -> [u8; 16] {
    for (i, b) in addr.iter_mut().enumerate() {
        let first = i as u32 * 8;
        if bits <= first {
            *b = 0;
        } else if bits < first + 8 {
            *b &= 0xffu8 << (8 - (bits - first));
        }
    }
    addr
}

impl SrcRange {
    /// The entry of `p` for service port `svc_id` (host bits cleared, whatever `p` holds).
    pub fn new(svc_id: u32, p: &Prefix) -> Self {
        let bits = match p.addr {
            IpAddr::V4(_) => 96 + u32::from(p.len),
            IpAddr::V6(_) => u32::from(p.len),
        }
        .min(128);
        Self {
            svc_id,
            bits,
            addr: mask(addr_to_map(p.addr), bits),
        }
    }

    /// The LPM trie key: `svc_id` (32 bits) then the address bits.
    pub fn key(&self) -> LpmKey<SrcRangeData> {
        LpmKey::new(
            32 + self.bits,
            SrcRangeData {
                svc_id_be: self.svc_id.to_be(),
                addr: self.addr,
            },
        )
    }

    /// Back from a trie key; `None` for a key that does not cover the svc_id whole (not
    /// written by the agent).
    pub fn from_key(k: &LpmKey<SrcRangeData>) -> Option<Self> {
        let d = k.data();
        let bits = k.prefix_len().checked_sub(32).filter(|b| *b <= 128)?;
        Some(Self {
            svc_id: u32::from_be(d.svc_id_be),
            bits,
            addr: d.addr,
        })
    }

    /// As a person writes it: `198.18.0.0/24`, `2001:db8::/32`.
    pub fn prefix(&self) -> Prefix {
        let addr = addr_from_map(&self.addr);
        let len = match addr {
            IpAddr::V4(_) => self.bits.saturating_sub(96),
            IpAddr::V6(_) => self.bits,
        };
        Prefix {
            addr,
            len: len as u8,
        }
    }
}

fn sock(a: &[u8; 16], port_be: u16) -> SocketAddr {
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

/// The maps the agent writes and lbctl reads. IFACES is kept apart ([`Ifaces`]) because the
/// interface watcher owns it while the reconciler owns these.
pub struct LbMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    vips: HashMap<MapData, [u8; 16], VipInfo>,
    backends: Array<MapData, Backend>,
    maglev: Array<MapData, u32>,
    ct: HashMap<MapData, FlowKey, NatEntry>,
    rnat: HashMap<MapData, FlowKey, NatEntry>,
    svc_stats: PerCpuArray<MapData, Counters>,
    be_stats: PerCpuArray<MapData, Counters>,
    reasons: PerCpuArray<MapData, u64>,
    svc_meta: HashMap<MapData, u32, NameMeta>,
    be_meta: HashMap<MapData, u32, NameMeta>,
    /// An LRU hash; aya's `HashMap` handles both hash types.
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    src_ranges: LpmTrie<MapData, SrcRangeData, u32>,
    /// Set once the kernel refused BPF_MAP_UPDATE_BATCH on MAGLEV: slots are then written
    /// one syscall each.
    maglev_batch_unsupported: bool,
    /// MAGLEV mapped into this process when the map is BPF_F_MMAPABLE: tables are then
    /// plain stores, no syscall at all. Mapped on the first table written (lbctl, which
    /// only reads, never maps it); `Unavailable` for a map without the flag (pinned by an
    /// older agent), which is written with BPF_MAP_UPDATE_BATCH instead.
    maglev_mmap: MmapState,
    /// The same for the other maps the reconciler writes in bulk (SERVICES, VIPS,
    /// BACKENDS and the name maps).
    batch_unsupported: bool,
}

/// The IFACES map: ifindex → role and flags.
pub struct Ifaces {
    map: HashMap<MapData, u32, IfaceInfo>,
}

/// Where the maps come from: a loaded object (moved out of it) or a pin directory.
trait MapSource {
    fn open<T>(&mut self, name: &'static str) -> Result<T, MapError>
    where
        T: TryFrom<Map, Error = aya::maps::MapError>;
}

struct FromEbpf<'a>(&'a mut Ebpf);

impl MapSource for FromEbpf<'_> {
    fn open<T>(&mut self, name: &'static str) -> Result<T, MapError>
    where
        T: TryFrom<Map, Error = aya::maps::MapError>,
    {
        let map = self
            .0
            .take_map(name)
            .ok_or(MapError::Missing { map: name })?;
        T::try_from(map).map_err(|source| MapError::Layout {
            map: name,
            source: Box::new(source),
        })
    }
}

struct FromPins<'a>(&'a Path);

impl MapSource for FromPins<'_> {
    fn open<T>(&mut self, name: &'static str) -> Result<T, MapError>
    where
        T: TryFrom<Map, Error = aya::maps::MapError>,
    {
        let path = self.0.join(name);
        let data = MapData::from_pin(&path).map_err(|source| MapError::OpenPinned {
            path: path.clone(),
            source: Box::new(source),
        })?;
        let map = Map::from_map_data(data).map_err(|source| MapError::Layout {
            map: name,
            source: Box::new(source),
        })?;
        T::try_from(map).map_err(|source| MapError::Layout {
            map: name,
            source: Box::new(source),
        })
    }
}

impl LbMaps {
    fn open_from(src: &mut impl MapSource) -> Result<Self, MapError> {
        Ok(Self {
            services: src.open(MAP_SERVICES)?,
            vips: src.open(MAP_VIPS)?,
            backends: src.open(MAP_BACKENDS)?,
            maglev: src.open(MAP_MAGLEV)?,
            ct: src.open(MAP_CT)?,
            rnat: src.open(MAP_RNAT)?,
            svc_stats: src.open(MAP_SVC_STATS)?,
            be_stats: src.open(MAP_BE_STATS)?,
            reasons: src.open(MAP_REASONS)?,
            svc_meta: src.open(MAP_SVC_META)?,
            be_meta: src.open(MAP_BE_META)?,
            affinity: src.open(MAP_AFFINITY)?,
            src_ranges: src.open(MAP_SRC_RANGES)?,
            maglev_batch_unsupported: false,
            maglev_mmap: MmapState::Untried,
            batch_unsupported: false,
        })
    }

    /// Takes the maps out of a loaded object (the programs keep their references).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapError> {
        Self::open_from(&mut FromEbpf(ebpf))
    }

    /// Opens the maps pinned under `pin_dir` (e.g. `/sys/fs/bpf/xdplb`).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, MapError> {
        Self::open_from(&mut FromPins(pin_dir))
    }

    /// Writes `keys[i] -> values[i]` into the map `fd` (named `map`) in BPF_MAP_UPDATE_BATCH
    /// calls. `Ok(false)`: not done, this kernel has no batch command (nothing was written;
    /// the caller writes the entries one by one, as it does for a single entry).
    fn try_batch<K: aya::Pod, V: aya::Pod>(
        &mut self,
        fd: RawFd,
        map: &'static str,
        keys: &[K],
        values: &[V],
        key_name: impl Fn(&K) -> String,
    ) -> Result<bool, MapError> {
        if self.batch_unsupported || keys.len() < 2 {
            return Ok(false);
        }
        match update_batch(fd, keys, values) {
            Ok(()) => Ok(true),
            Err(BatchError::Unsupported(e)) => {
                tracing::debug!(
                    "BPF_MAP_UPDATE_BATCH on {map} not supported ({e}), writing entries one \
                     by one from now on"
                );
                self.batch_unsupported = true;
                Ok(false)
            }
            Err(BatchError::Failed { start, source, .. }) => {
                let key = keys.get(start).map_or_else(|| "?".into(), &key_name);
                Err(batch_err(map, key, source))
            }
        }
    }

    /// Service ports sorted by name (unnamed ones last, by id).
    pub fn list_services(&self) -> Result<Vec<ServiceInfo>, MapError> {
        let mut by_id: std::collections::BTreeMap<u32, ServiceInfo> = Default::default();
        for r in self.services.iter() {
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
                addr: sock(&b.addr, b.port_be),
                name,
                counters: c,
            });
        }
        Ok(out)
    }

    /// Tracked flows (CT), at most `limit`, in the map's iteration order.
    pub fn list_flows(&self, limit: usize) -> Result<Vec<FlowInfo>, MapError> {
        let mut out = Vec::new();
        for r in self.ct.iter() {
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
                client: sock(&k.src, k.sport_be),
                vip: sock(&k.dst, k.dport_be),
                backend: sock(&n.new_dst, n.new_dport_be),
                new_src: sock(&n.new_src, n.new_sport_be),
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
        for r in self.affinity.iter() {
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

    fn active_backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
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

fn hash_entries<K: aya::Pod, V: aya::Pod>(
    m: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, MapError> {
    m.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(op_err("iterate", name, "*"))
}

impl MapWriter for LbMaps {
    fn snapshot(&self) -> Result<MapSnapshot, MapError> {
        Ok(MapSnapshot {
            services: hash_entries(&self.services, MAP_SERVICES)?,
            vips: hash_entries(&self.vips, MAP_VIPS)?,
            backends: self.active_backends()?,
            svc_meta: hash_entries(&self.svc_meta, MAP_SVC_META)?,
            be_meta: hash_entries(&self.be_meta, MAP_BE_META)?,
            src_ranges: self.list_src_ranges()?,
        })
    }

    fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, MapError> {
        // The programs insert and evict while the keys are walked, and a walk whose current
        // key was evicted restarts from the first one: bound it.
        self.list_affinity(2 * lb_common::MAX_AFFINITY as usize)
    }

    fn delete_affinity(&mut self, key: &AffinityKey) -> Result<(), MapError> {
        match self.affinity.remove(key) {
            // Evicted or replaced meanwhile by the programs: gone either way.
            Ok(()) => Ok(()),
            Err(e) if absent(&e) => Ok(()),
            Err(source) => Err(op_err(
                "delete",
                MAP_AFFINITY,
                format!(
                    "{}/{}/{}",
                    addr_from_map(&key.client),
                    key.svc_id,
                    key.scope
                ),
            )(source)),
        }
    }

    fn put_src_range(&mut self, r: &SrcRange) -> Result<(), MapError> {
        self.src_ranges.insert(&r.key(), 1, 0).map_err(op_err(
            "insert",
            MAP_SRC_RANGES,
            fmt_src_range(r),
        ))
    }

    fn delete_src_range(&mut self, r: &SrcRange) -> Result<(), MapError> {
        match self.src_ranges.remove(&r.key()) {
            Ok(()) => Ok(()),
            Err(e) if absent(&e) => Ok(()),
            Err(source) => Err(op_err("delete", MAP_SRC_RANGES, fmt_src_range(r))(source)),
        }
    }

    fn read_maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>, MapError> {
        self.maglev_range(offset, len)
    }

    fn put_backend(&mut self, id: u32, b: &Backend, meta: &NameMeta) -> Result<(), MapError> {
        // Meta first: lbctl may show a backend without a name, never a name without one.
        self.be_meta
            .insert(id, meta, 0)
            .map_err(op_err("insert", MAP_BE_META, id))?;
        self.backends
            .set(id, b, 0)
            .map_err(op_err("set", MAP_BACKENDS, id))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.backends
            .set(id, Backend::default(), 0)
            .map_err(op_err("set", MAP_BACKENDS, id))?;
        match self.be_meta.remove(&id) {
            Ok(()) => Ok(()),
            Err(e) if absent(&e) => Ok(()),
            Err(source) => Err(op_err("delete", MAP_BE_META, id)(source)),
        }
    }

    fn put_maglev(&mut self, offset: u32, slots: &[u32]) -> Result<(), MapError> {
        let end = u32::try_from(slots.len())
            .ok()
            .and_then(|n| offset.checked_add(n))
            .ok_or_else(|| MapError::Rejected {
                op: "update batch",
                map: MAP_MAGLEV,
                key: format!("{offset}+{}", slots.len()),
                reason: "range exceeds u32 slot indices".into(),
            })?;
        if matches!(self.maglev_mmap, MmapState::Untried) {
            let mapped = self
                .maglev
                .map()
                .info()
                .map_err(|e| std::io::Error::other(format!("map info: {e}")))
                .and_then(|i| {
                    MaglevMmap::new(
                        self.maglev.map().fd().as_fd(),
                        i.map_flags(),
                        i.value_size(),
                        i.max_entries(),
                    )
                });
            self.maglev_mmap = match mapped {
                Ok(m) => MmapState::Mapped(m),
                Err(e) => {
                    tracing::debug!(
                        "{MAP_MAGLEV} cannot be mapped ({e}): writing tables with \
                         BPF_MAP_UPDATE_BATCH"
                    );
                    MmapState::Unavailable
                }
            };
        }
        if let MmapState::Mapped(m) = &mut self.maglev_mmap {
            return m.write(offset, slots).map_err(|reason| MapError::Rejected {
                op: "write",
                map: MAP_MAGLEV,
                key: format!("{offset}+{}", slots.len()),
                reason,
            });
        }
        if !self.maglev_batch_unsupported {
            let fd = self.maglev.map().fd().as_fd().as_raw_fd();
            let keys: Vec<u32> = (offset..end).collect();
            match update_batch(fd, &keys, slots) {
                Ok(()) => return Ok(()),
                Err(BatchError::Unsupported(e)) => {
                    // Fall through to single updates: nothing was written by the failed call
                    // that the loop below does not write again.
                    tracing::debug!(
                        "BPF_MAP_UPDATE_BATCH on {MAP_MAGLEV} not supported ({e}), \
                         writing slots one by one from now on"
                    );
                    self.maglev_batch_unsupported = true;
                }
                Err(BatchError::Failed { start, len, source }) => {
                    let first = u64::from(offset) + start as u64;
                    return Err(batch_err(
                        MAP_MAGLEV,
                        format!("{first}..{}", first + len as u64),
                        source,
                    ));
                }
            }
        }
        for (slot, id) in (offset..end).zip(slots) {
            self.maglev
                .set(slot, id, 0)
                .map_err(op_err("set", MAP_MAGLEV, slot))?;
        }
        Ok(())
    }

    fn put_backends(&mut self, items: &[(u32, Backend, NameMeta)]) -> Result<(), MapError> {
        let ids: Vec<u32> = items.iter().map(|(id, _, _)| *id).collect();
        let metas: Vec<NameMeta> = items.iter().map(|(_, _, m)| *m).collect();
        let backends: Vec<Backend> = items.iter().map(|(_, b, _)| *b).collect();
        // Every name before any backend, as `put_backend` orders one.
        let fd = self.be_meta.map().fd().as_fd().as_raw_fd();
        if self.try_batch(fd, MAP_BE_META, &ids, &metas, |id| id.to_string())? {
            let fd = self.backends.map().fd().as_fd().as_raw_fd();
            if self.try_batch(fd, MAP_BACKENDS, &ids, &backends, |id| id.to_string())? {
                return Ok(());
            }
        }
        for (id, b, m) in items {
            self.put_backend(*id, b, m)?;
        }
        Ok(())
    }

    fn put_frontends(&mut self, items: &[(ServiceKey, ServiceValue)]) -> Result<(), MapError> {
        let keys: Vec<ServiceKey> = items.iter().map(|(k, _)| *k).collect();
        let values: Vec<ServiceValue> = items.iter().map(|(_, v)| *v).collect();
        let fd = self.services.map().fd().as_fd().as_raw_fd();
        if !self.try_batch(fd, MAP_SERVICES, &keys, &values, fmt_key)? {
            for (k, v) in items {
                self.put_frontend(k, v)?;
            }
        }
        Ok(())
    }

    fn put_vips(&mut self, items: &[([u8; 16], VipInfo)]) -> Result<(), MapError> {
        let keys: Vec<[u8; 16]> = items.iter().map(|(k, _)| *k).collect();
        let values: Vec<VipInfo> = items.iter().map(|(_, v)| *v).collect();
        let fd = self.vips.map().fd().as_fd().as_raw_fd();
        let name = |a: &[u8; 16]| addr_from_map(a).to_string();
        if !self.try_batch(fd, MAP_VIPS, &keys, &values, name)? {
            for (k, v) in items {
                self.put_vip(k, v)?;
            }
        }
        Ok(())
    }

    fn put_svc_metas(&mut self, items: &[(u32, NameMeta)]) -> Result<(), MapError> {
        let keys: Vec<u32> = items.iter().map(|(k, _)| *k).collect();
        let values: Vec<NameMeta> = items.iter().map(|(_, v)| *v).collect();
        let fd = self.svc_meta.map().fd().as_fd().as_raw_fd();
        if !self.try_batch(fd, MAP_SVC_META, &keys, &values, |id| id.to_string())? {
            for (k, v) in items {
                self.put_svc_meta(*k, v)?;
            }
        }
        Ok(())
    }

    fn put_frontend(&mut self, key: &ServiceKey, v: &ServiceValue) -> Result<(), MapError> {
        self.services
            .insert(key, v, 0)
            .map_err(op_err("insert", MAP_SERVICES, fmt_key(key)))
    }

    fn delete_frontend(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        match self.services.remove(key) {
            Ok(()) => Ok(()),
            Err(e) if absent(&e) => Ok(()),
            Err(source) => Err(op_err("delete", MAP_SERVICES, fmt_key(key))(source)),
        }
    }

    fn put_vip(&mut self, addr: &[u8; 16], v: &VipInfo) -> Result<(), MapError> {
        self.vips
            .insert(addr, v, 0)
            .map_err(op_err("insert", MAP_VIPS, addr_from_map(addr)))
    }

    fn delete_vip(&mut self, addr: &[u8; 16]) -> Result<(), MapError> {
        match self.vips.remove(addr) {
            Ok(()) => Ok(()),
            Err(e) if absent(&e) => Ok(()),
            Err(source) => Err(op_err("delete", MAP_VIPS, addr_from_map(addr))(source)),
        }
    }

    fn put_svc_meta(&mut self, svc_id: u32, m: &NameMeta) -> Result<(), MapError> {
        self.svc_meta
            .insert(svc_id, m, 0)
            .map_err(op_err("insert", MAP_SVC_META, svc_id))
    }

    fn delete_svc_meta(&mut self, svc_id: u32) -> Result<(), MapError> {
        match self.svc_meta.remove(&svc_id) {
            Ok(()) => Ok(()),
            Err(e) if absent(&e) => Ok(()),
            Err(source) => Err(op_err("delete", MAP_SVC_META, svc_id)(source)),
        }
    }
}

/// Whether MAGLEV is mapped into this process (see `LbMaps::maglev_mmap`).
enum MmapState {
    Untried,
    Mapped(MaglevMmap),
    Unavailable,
}

/// `BPF_F_MMAPABLE` from include/uapi/linux/bpf.h.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// A BPF_F_MMAPABLE array map of u32 values mapped shared and writable: the kernel lays the
/// values out at `round_up(value_size, 8)` bytes each, the same memory the programs read.
struct MaglevMmap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    stride: usize,
    entries: u32,
}

// SAFETY: the mapping is owned by this value alone (unmapped on drop) and only written
// through `&mut self`; the programs read it concurrently, which is what the kernel's
// mmap of a BPF array is for, and every store is a whole aligned u32.
unsafe impl Send for MaglevMmap {}
// SAFETY: `&MaglevMmap` gives no access to the memory.
unsafe impl Sync for MaglevMmap {}

impl MaglevMmap {
    /// Maps the array map `fd`, whose kernel info (`MapInfo`) says `map_flags`,
    /// `value_size` and `max_entries`; fails for a map without BPF_F_MMAPABLE, of another
    /// value size, or that the kernel refuses to map.
    fn new(
        fd: std::os::fd::BorrowedFd<'_>,
        map_flags: u32,
        value_size: u32,
        max_entries: u32,
    ) -> Result<Self, std::io::Error> {
        if map_flags & BPF_F_MMAPABLE == 0 {
            return Err(std::io::Error::other(
                "map was created without BPF_F_MMAPABLE",
            ));
        }
        if value_size != 4 {
            return Err(std::io::Error::other(format!(
                "value size {value_size}, not 4"
            )));
        }
        let stride = 8usize;
        // SAFETY: sysconf with a constant argument.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| std::io::Error::other("no page size"))?;
        let len = (max_entries as usize * stride).div_ceil(page) * page;
        if len == 0 {
            return Err(std::io::Error::other("empty map"));
        }
        // SAFETY: a fresh shared mapping of the map's whole value area (the kernel checks
        // the length against the map's size); nothing else refers to this memory yet.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned NULL"))?;
        Ok(Self {
            ptr,
            len,
            stride,
            entries: max_entries,
        })
    }

    /// `values[i]` into slot `offset + i`. Each store is atomic (the data path never sees a
    /// torn id); the fence orders the whole table before whatever the caller writes next
    /// (the frontend that switches to it, through a syscall).
    fn write(&mut self, offset: u32, values: &[u32]) -> Result<(), String> {
        let end = u64::from(offset) + values.len() as u64;
        if end > u64::from(self.entries) {
            return Err(format!("slots up to {end} past the map's {}", self.entries));
        }
        for (i, v) in values.iter().enumerate() {
            let at = (offset as usize + i) * self.stride;
            // SAFETY: `at + 4 <= entries * stride <= len`: inside the mapping, and 8-byte
            // aligned (page-aligned base, stride 8), so a valid AtomicU32 location that only
            // atomic accesses (ours, the programs' loads) touch.
            let slot =
                unsafe { std::sync::atomic::AtomicU32::from_ptr(self.ptr.as_ptr().add(at).cast()) };
            slot.store(*v, std::sync::atomic::Ordering::Relaxed);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for MaglevMmap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; nothing refers to it any more.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Elements per BPF_MAP_UPDATE_BATCH call: bounds how long one syscall holds the CPU,
/// while a full 1 M-slot MAGLEV sync still takes only 16 calls.
const BATCH_CHUNK: usize = 1 << 16;

/// `BPF_MAP_UPDATE_BATCH` from `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The kernel's internal ENOTSUPP, which `bpf_map_do_batch` returns for a map type without
/// batch ops; it is not in libc (which has only the POSIX EOPNOTSUPP).
pub(crate) const ENOTSUPP: i32 = 524;

/// `union bpf_attr` as used by the BPF_MAP_*_BATCH commands (the `batch` struct of
/// include/uapi/linux/bpf.h), padded past the size of the whole union: the kernel rejects
/// attributes whose bytes after the command's last field are not zero, so the padding must
/// be there and be zero.
#[repr(C)]
pub(crate) struct BatchAttr {
    pub(crate) in_batch: u64,
    pub(crate) out_batch: u64,
    pub(crate) keys: u64,
    pub(crate) values: u64,
    pub(crate) count: u32,
    pub(crate) map_fd: u32,
    pub(crate) elem_flags: u64,
    pub(crate) flags: u64,
    pub(crate) _zero: [u8; 160 - 56],
}

#[derive(Debug)]
enum BatchError {
    /// This kernel or map has no BPF_MAP_UPDATE_BATCH; nothing was written.
    Unsupported(std::io::Error),
    /// The update of elements `start..start + len` (indices into the slices passed)
    /// failed; the elements before `start` are written.
    Failed {
        start: usize,
        len: usize,
        source: std::io::Error,
    },
}

/// Writes `values[i]` under `keys[i]` into map `fd` with BPF_MAP_UPDATE_BATCH (BPF_ANY),
/// in chunks of [`BATCH_CHUNK`]. `K` and `V` must be the map's key and value types (their
/// sizes are the map's key_size and value_size; aya checked that when opening it): the
/// kernel reads `count` packed keys and values. Arrays and hash maps have the command
/// since Linux 5.6; for a hash map it is one syscall instead of one per entry.
fn update_batch<K: aya::Pod, V: aya::Pod>(
    fd: RawFd,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    let failed = |start: usize, source| BatchError::Failed {
        start,
        len: keys.len() - start,
        source,
    };
    if keys.len() != values.len() {
        return Err(failed(0, std::io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let map_fd =
        u32::try_from(fd).map_err(|_| failed(0, std::io::Error::from_raw_os_error(libc::EBADF)))?;
    for (n, (kc, vc)) in keys
        .chunks(BATCH_CHUNK)
        .zip(values.chunks(BATCH_CHUNK))
        .enumerate()
    {
        let start = n * BATCH_CHUNK;
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: kc.as_ptr() as u64,
            values: vc.as_ptr() as u64,
            count: kc.len() as u32,
            map_fd,
            // BPF_ANY: create or replace (array slots always exist).
            elem_flags: 0,
            flags: 0,
            _zero: [0; 160 - 56],
        };
        // SAFETY: attr is a zero-padded `union bpf_attr` batch struct; keys and values point
        // to `count` packed keys and values of the map's sizes, alive for the call; the
        // kernel only reads them (and writes `count` back into attr).
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            let unsupported = matches!(
                err.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
            );
            // Only the first call can tell "not supported": a later chunk failing means the
            // command works and something else is wrong.
            if unsupported && n == 0 && attr.count == 0 {
                return Err(BatchError::Unsupported(err));
            }
            // On error the kernel reports in `count` how many elements it updated.
            let done = (attr.count as usize).min(kc.len());
            return Err(failed(start + done, err));
        }
    }
    Ok(())
}

fn batch_err(map: &'static str, key: String, source: std::io::Error) -> MapError {
    MapError::Op {
        op: "update batch",
        map,
        key,
        source: Box::new(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_batch",
            io_error: source,
        })),
    }
}

/// `3:198.18.0.0/24` (svc_id, prefix) for error messages.
pub fn fmt_src_range(r: &SrcRange) -> String {
    format!("{}:{}", r.svc_id, r.prefix())
}

/// `198.18.0.10:80/6` style key for error messages.
pub fn fmt_key(k: &ServiceKey) -> String {
    format!("{}/{}", sock(&k.addr, k.port_be), k.proto)
}

impl Ifaces {
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapError> {
        Ok(Self {
            map: FromEbpf(ebpf).open(MAP_IFACES)?,
        })
    }

    pub fn open_pinned(pin_dir: &Path) -> Result<Self, MapError> {
        Ok(Self {
            map: FromPins(pin_dir).open(MAP_IFACES)?,
        })
    }

    pub fn set(&mut self, ifindex: u32, info: IfaceInfo) -> Result<(), MapError> {
        self.map
            .insert(ifindex, info, 0)
            .map_err(op_err("insert", MAP_IFACES, ifindex))
    }

    pub fn remove(&mut self, ifindex: u32) -> Result<(), MapError> {
        match self.map.remove(&ifindex) {
            Ok(()) => Ok(()),
            Err(e) if absent(&e) => Ok(()),
            Err(source) => Err(op_err("delete", MAP_IFACES, ifindex)(source)),
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_map_form() {
        let v4: IpAddr = "198.18.0.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        assert_eq!(addr_from_map(&addr_to_map(v4)), v4);
        assert_eq!(addr_from_map(&addr_to_map(v6)), v6);
        assert_eq!(addr_to_map(mapped), addr_to_map(v4));
        assert!(is_v4_mapped(&addr_to_map(v4)));
        assert!(!is_v4_mapped(&addr_to_map(v6)));
    }
}

/// Against the kernel (root): the real object, maps pinned in a directory of their own.
#[cfg(test)]
mod kernel_tests {
    use super::*;
    use crate::model::{
        DesiredState, Endpoint, Frontend, FrontendKind, Prefix, Protocol, ServicePortId,
        ServicePortState,
    };
    use crate::reconciler::Reconciler;
    use anyhow::Context as _;

    /// Removes the pin directory (and so the maps) however the test ends.
    struct PinDir(PathBuf);

    impl Drop for PinDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn desired() -> DesiredState {
        let ip = |s: &str| -> IpAddr { s.parse().expect("test address") };
        let mut d = DesiredState::default();
        d.services.insert(
            ServicePortId {
                namespace: "shop".into(),
                name: "web".into(),
                port_name: "http".into(),
                protocol: Protocol::Tcp,
            },
            ServicePortState {
                frontends: vec![
                    Frontend {
                        addr: ip("198.18.100.10"),
                        port: 80,
                        protocol: Protocol::Tcp,
                        kind: FrontendKind::ClusterIp,
                    },
                    Frontend {
                        addr: ip("2001:db8:100::10"),
                        port: 80,
                        protocol: Protocol::Tcp,
                        kind: FrontendKind::ClusterIp,
                    },
                ],
                endpoints: vec![
                    Endpoint {
                        addr: ip("198.18.1.1"),
                        port: 8080,
                        target: Some("shop/web-0".into()),
                    },
                    Endpoint {
                        addr: ip("198.18.1.2"),
                        port: 8080,
                        target: None,
                    },
                    Endpoint {
                        addr: ip("2001:db8:1::1"),
                        port: 8080,
                        target: Some("shop/web-0".into()),
                    },
                ],
                ..Default::default()
            },
        );
        d
    }

    #[test]
    fn put_maglev_writes_every_slot_in_batches_across_chunk_boundaries() -> anyhow::Result<()> {
        let dir = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/xdplb-test-batch-{}",
            std::process::id()
        )));
        let loaded = crate::loader::load(crate::EBPF_OBJ, &dir.0, false).context("load")?;
        let mut maps = loaded.maps;
        // The batch path, as for MAGLEV maps pinned without BPF_F_MMAPABLE.
        maps.maglev_mmap = MmapState::Unavailable;
        put_maglev_round_trips(&mut maps)?;
        // The batch path ran, not the per-slot fallback: this kernel has the command.
        assert!(!maps.maglev_batch_unsupported);

        // Past the end of MAGLEV: an error naming the map and the first slot not written.
        let end = lb_common::MAGLEV_SLOTS;
        let e = maps
            .put_maglev(end - 10, &[1; 20])
            .expect_err("slots past MAGLEV_SLOTS");
        let msg = e.to_string();
        assert!(
            msg.contains(MAP_MAGLEV) && msg.contains(&format!("[{end}..{}]", end + 10)),
            "{msg}"
        );
        assert_eq!(maps.maglev_range(end - 10, 10)?, vec![1; 10]);
        Ok(())
    }

    /// An ARRAY of u32 with BPF_F_MMAPABLE, as lb-ebpf declares MAGLEV, made directly
    /// (BPF_MAP_CREATE) so the mapped path is tested whatever the object declares.
    fn mmapable_u32_array(entries: u32) -> anyhow::Result<Array<MapData, u32>> {
        use std::os::fd::{FromRawFd as _, OwnedFd};
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
            _zero: [u8; 128 - 20],
        }
        let mut attr = CreateAttr {
            map_type: 2, // BPF_MAP_TYPE_ARRAY
            key_size: 4,
            value_size: 4,
            max_entries: entries,
            map_flags: BPF_F_MMAPABLE,
            _zero: [0; 128 - 20],
        };
        // SAFETY: BPF_MAP_CREATE (0) with a zero-padded attribute; returns a new fd.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0 as libc::c_long,
                &mut attr as *mut CreateAttr,
                std::mem::size_of::<CreateAttr>() as libc::c_uint,
            )
        };
        anyhow::ensure!(
            fd >= 0,
            "BPF_MAP_CREATE: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the kernel just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let map = Map::from_map_data(MapData::from_fd(fd)?)?;
        Ok(Array::try_from(map)?)
    }

    #[test]
    fn put_maglev_writes_an_mmapable_map_through_its_mapping() -> anyhow::Result<()> {
        let dir = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/xdplb-test-mmap-{}",
            std::process::id()
        )));
        let loaded = crate::loader::load(crate::EBPF_OBJ, &dir.0, false).context("load")?;
        let mut maps = loaded.maps;
        let end = lb_common::MAGLEV_SLOTS;
        maps.maglev = mmapable_u32_array(end)?;
        maps.maglev_mmap = MmapState::Untried;
        put_maglev_round_trips(&mut maps)?;
        assert!(matches!(maps.maglev_mmap, MmapState::Mapped(_)));

        // Past the end: refused before anything is written.
        let e = maps
            .put_maglev(end - 10, &[1; 20])
            .expect_err("slots past MAGLEV_SLOTS");
        assert!(e.to_string().contains(MAP_MAGLEV), "{e}");
        assert_eq!(maps.maglev_range(end - 10, 10)?, vec![0; 10]);
        // The last slot is writable (the mapping covers the whole map).
        maps.put_maglev(end - 1, &[9])?;
        assert_eq!(maps.maglev_range(end - 1, 1)?, vec![9]);
        Ok(())
    }

    /// Tables written with `put_maglev` read back through the syscall (what the programs
    /// see), neighbours untouched, across batch-chunk boundaries and overwrites.
    fn put_maglev_round_trips(maps: &mut LbMaps) -> anyhow::Result<()> {
        let pattern = |base: u32, n: usize| -> Vec<u32> {
            (0..n as u32).map(|i| (base + i * 7) % 4093 + 1).collect()
        };

        // A few thousand slots at an offset: one batch call.
        let small = pattern(11, 3_000);
        maps.put_maglev(5_000, &small).context("small put")?;
        assert_eq!(maps.maglev_range(5_000, 3_000)?, small);
        // Neighbours untouched.
        assert_eq!(maps.maglev_range(4_999, 1)?, vec![0]);
        assert_eq!(maps.maglev_range(8_000, 1)?, vec![0]);

        // More than one chunk: the second call must continue exactly where the first stopped.
        let n = BATCH_CHUNK + 2_500;
        let big = pattern(3, n);
        let off = 100_000;
        maps.put_maglev(off, &big).context("multi-chunk put")?;
        let back = maps.maglev_range(off, n as u32)?;
        let edge = BATCH_CHUNK;
        assert_eq!(back[edge - 3..edge + 3], big[edge - 3..edge + 3]);
        assert_eq!(back, big);
        assert_eq!(maps.maglev_range(off - 1, 1)?, vec![0]);
        assert_eq!(maps.maglev_range(off + n as u32, 1)?, vec![0]);

        // Overwrite across the chunk boundary with other values (a rebuilt table).
        let over = pattern(1_000, 4_000);
        let over_off = off + BATCH_CHUNK as u32 - 2_000;
        maps.put_maglev(over_off, &over).context("overwrite")?;
        assert_eq!(maps.maglev_range(over_off, 4_000)?, over);
        assert_eq!(
            maps.maglev_range(over_off - 1, 1)?,
            vec![big[BATCH_CHUNK - 2_001]]
        );
        Ok(())
    }

    #[test]
    fn reconciled_maps_read_back_and_a_reload_adopts_them_without_writes() -> anyhow::Result<()> {
        let dir = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/xdplb-test-maps-{}",
            std::process::id()
        )));
        let d = desired();

        let loaded = crate::loader::load(crate::EBPF_OBJ, &dir.0, false).context("load")?;
        let mut rec = Reconciler::adopt(loaded.maps).context("adopt empty maps")?;
        let stats = rec.apply(&d).context("first apply")?;
        assert!(stats.writes() > 0);
        // Backends, names, VIPs and frontends went in as batches (this kernel has the
        // command for hash maps and arrays); what follows checks they all arrived.
        assert!(!rec.writer().batch_unsupported);

        // What lbctl sees, through the pins, while the loader still holds the object.
        let reader = LbMaps::open_pinned(&dir.0).context("open pinned")?;
        let svcs = reader.list_services()?;
        assert_eq!(svcs.len(), 1, "{svcs:?}");
        assert_eq!(svcs[0].name.as_deref(), Some("shop/web:http/TCP"));
        assert_eq!(svcs[0].frontends.len(), 2);
        let v4 = &svcs[0].frontends[0];
        assert_eq!((v4.addr, v4.port), ("198.18.100.10".parse()?, 80));
        assert_eq!(v4.maglev_size, crate::maglev::table_size(2));
        let v6 = &svcs[0].frontends[1];
        assert_eq!(v6.maglev_size, crate::maglev::table_size(1));
        assert_eq!(svcs[0].counters.new_flows, 0);

        let bes = reader.list_backends()?;
        let shown: Vec<(String, Option<String>)> = bes
            .iter()
            .map(|b| (b.addr.to_string(), b.name.clone()))
            .collect();
        let mut want = vec![
            ("198.18.1.1:8080".to_owned(), Some("shop/web-0".to_owned())),
            ("198.18.1.2:8080".to_owned(), Some("198.18.1.2".to_owned())),
            (
                "[2001:db8:1::1]:8080".to_owned(),
                Some("shop/web-0".to_owned()),
            ),
        ];
        let mut got = shown.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want);

        // The v4 table names only the two v4 backends, every slot.
        let v4_ids: std::collections::BTreeSet<u32> = bes
            .iter()
            .filter(|b| b.addr.is_ipv4())
            .map(|b| b.id)
            .collect();
        let slots = reader.maglev_range(v4.maglev_offset, v4.maglev_size)?;
        assert!(slots.iter().all(|id| v4_ids.contains(id)), "{slots:?}");
        assert_eq!(
            slots
                .iter()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            v4_ids
        );

        let reasons = reader.reasons()?;
        assert_eq!(reasons.len(), lb_common::NUM_REASONS as usize);
        assert!(
            reasons.iter().all(|(_, n)| *n == 0),
            "no traffic yet: {reasons:?}"
        );
        assert!(reader.list_flows(10)?.is_empty());
        assert_eq!(reader.count_rnat()?, 0);
        drop(reader);

        // A restarted agent: same object, same pins.
        drop(rec);
        drop(loaded.ebpf);
        drop(loaded.ifaces);
        let again = crate::loader::load(crate::EBPF_OBJ, &dir.0, false).context("reload")?;
        let mut rec = Reconciler::adopt(again.maps).context("adopt pinned maps")?;
        assert_eq!(rec.counts(), (1, 2));
        let stats = rec.apply(&d).context("apply after reload")?;
        assert_eq!(stats.writes(), 0, "{stats}");
        Ok(())
    }
    #[test]
    fn source_ranges_and_affinity_purge_on_the_kernel_maps() -> anyhow::Result<()> {
        let dir = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/xdplb-test-ranges-{}",
            std::process::id()
        )));
        let ip = |s: &str| -> IpAddr { s.parse().expect("test address") };
        let ep = |a: &str| Endpoint {
            addr: ip(a),
            port: 8080,
            target: None,
        };
        let state = |ready: &[&str], draining: &[&str]| {
            let mut d = DesiredState::default();
            let eps: Vec<Endpoint> = ready.iter().map(|a| ep(a)).collect();
            d.services.insert(
                ServicePortId::new("shop", "web", "http", Protocol::Tcp),
                ServicePortState {
                    frontends: vec![Frontend {
                        addr: ip("198.18.200.10"),
                        port: 80,
                        protocol: Protocol::Tcp,
                        kind: FrontendKind::LoadBalancer,
                    }],
                    local_endpoints: eps.clone(),
                    endpoints: eps,
                    draining: draining.iter().map(|a| ep(a)).collect(),
                    affinity_timeout_s: Some(60),
                    source_ranges: vec![
                        Prefix {
                            addr: ip("198.18.50.0"),
                            len: 24,
                        },
                        Prefix {
                            addr: ip("2001:db8:50::"),
                            len: 48,
                        },
                    ],
                    ..Default::default()
                },
            );
            d
        };
        let d = state(&["198.18.1.1", "198.18.1.2"], &[]);
        let loaded = crate::loader::load(crate::EBPF_OBJ, &dir.0, false).context("load")?;
        let mut rec = Reconciler::adopt(loaded.maps).context("adopt empty maps")?;
        rec.apply(&d).context("first apply")?;

        let reader = LbMaps::open_pinned(&dir.0).context("open pinned")?;
        let svc = reader.list_services()?;
        let svc_id = svc[0].svc_id;
        let f = &svc[0].frontends[0];
        let want =
            lb_common::SVC_F_EXTERNAL | lb_common::SVC_F_AFFINITY | lb_common::SVC_F_SOURCE_RANGES;
        assert_eq!((f.flags, f.affinity_timeout_s), (want, 60));
        let shown: Vec<String> = reader
            .list_src_ranges()?
            .iter()
            .map(|r| format!("{}:{}", r.svc_id, r.prefix()))
            .collect();
        assert_eq!(
            shown,
            vec![
                format!("{svc_id}:198.18.50.0/24"),
                format!("{svc_id}:2001:db8:50::/48")
            ]
        );
        // The lookup the program makes: all 160 bits of (svc_id, source).
        let allowed = |svc: u32, src: &str| -> anyhow::Result<bool> {
            let k = LpmKey::new(
                160,
                SrcRangeData {
                    svc_id_be: svc.to_be(),
                    addr: addr_to_map(ip(src)),
                },
            );
            match reader.src_ranges.get(&k, 0) {
                Ok(_) => Ok(true),
                Err(aya::maps::MapError::KeyNotFound) => Ok(false),
                Err(e) => Err(e.into()),
            }
        };
        assert!(allowed(svc_id, "198.18.50.77")?);
        assert!(!allowed(svc_id, "198.18.51.1")?);
        assert!(allowed(svc_id, "2001:db8:50:ffff::1")?);
        assert!(!allowed(svc_id, "2001:db8:51::1")?);
        assert!(
            !allowed(svc_id + 1, "198.18.50.77")?,
            "another port's source"
        );

        // What the program writes on new flows of two clients.
        let id_of = |a: &str| -> anyhow::Result<u32> {
            reader
                .list_backends()?
                .iter()
                .find(|b| b.addr.ip() == ip(a))
                .map(|b| b.id)
                .with_context(|| format!("no backend {a}"))
        };
        let (b1, b2) = (id_of("198.18.1.1")?, id_of("198.18.1.2")?);
        for (client, b) in [("198.18.9.1", b1), ("198.18.9.2", b2)] {
            rec.writer_mut().affinity.insert(
                AffinityKey {
                    client: addr_to_map(ip(client)),
                    svc_id,
                    scope: 0,
                },
                AffinityValue {
                    backend_id: b,
                    _pad: 0,
                    last_ns: 1,
                },
                0,
            )?;
        }
        // 198.18.1.2 terminates: out of the table, still a backend, and the client pinned
        // to it is forgotten.
        let draining = state(&["198.18.1.1"], &["198.18.1.2"]);
        let stats = rec.apply(&draining).context("draining")?;
        assert_eq!(stats.affinity_deleted, 1, "{stats}");
        let left: Vec<(IpAddr, u32)> = reader
            .list_affinity(100)?
            .iter()
            .map(|(k, v)| (addr_from_map(&k.client), v.backend_id))
            .collect();
        assert_eq!(left, vec![(ip("198.18.9.1"), b1)]);
        let bes = crate::cli::backends(&reader)?;
        let drain: Vec<(IpAddr, bool)> = bes.iter().map(|b| (b.address, b.draining)).collect();
        assert_eq!(
            drain,
            vec![(ip("198.18.1.1"), false), (ip("198.18.1.2"), true)]
        );
        let views = crate::cli::services(&reader)?;
        assert_eq!(
            views[0].source_ranges,
            vec!["198.18.50.0/24", "2001:db8:50::/48"]
        );

        // A restarted agent adopts all of it without a write.
        drop(rec);
        drop(loaded.ebpf);
        drop(loaded.ifaces);
        let again = crate::loader::load(crate::EBPF_OBJ, &dir.0, false).context("reload")?;
        let mut rec = Reconciler::adopt(again.maps).context("adopt pinned maps")?;
        let stats = rec.apply(&draining).context("apply after reload")?;
        assert_eq!(stats.writes(), 0, "{stats}");
        // Everything removed: ranges and affinity entries too.
        rec.apply(&DesiredState::default()).context("remove")?;
        assert!(reader.list_src_ranges()?.is_empty());
        assert!(reader.list_affinity(100)?.is_empty());
        assert!(reader.list_backends()?.is_empty());
        Ok(())
    }
}
