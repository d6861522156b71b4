//! The BPF maps of xdplb through aya: the one place user space touches them.
//!
//! **Opening.** The agent takes the maps out of the object it just loaded
//! ([`LbMaps::from_ebpf`]); lbctl and the tests open the same maps from their pins while the
//! agent runs ([`LbMaps::open_pinned`]). Either way every map is checked against the
//! layout in `lb-common` as it is opened, so a pin left by another version fails here with
//! the map's name instead of being read wrongly. IFACES is a handle of its own
//! ([`Ifaces`]): the interface watcher owns it while the reconciler owns the rest.
//!
//! **Writing** (`writer`): [`LbMaps`] is the kernel [`MapWriter`], the trait the
//! reconciler writes through. Bulk writes take the cheapest path the kernel offers: MAGLEV
//! through its memory mapping (`mmap`), other maps with BPF_MAP_UPDATE_BATCH (`batch`),
//! and one syscall per entry when a kernel has neither.
//!
//! **Reading** (`read`): what lbctl shows ([`ServiceInfo`], [`BackendInfo`],
//! [`FlowInfo`], [`Traffic`], ...) and what the reconciler adopts after a restart
//! ([`MapSnapshot`]).
//!
//! **Addresses** are 16 bytes in every map, IPv4 as IPv4-mapped IPv6 ([`addr_to_map`],
//! [`addr_from_map`]); `loadBalancerSourceRanges` prefixes are SRC_RANGES keys
//! ([`SrcRange`]). Every failure is a [`MapError`] naming the operation, map and key.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use aya::Ebpf;
use lb_common::{
    is_v4_mapped, v4_mapped, AffinityKey, AffinityValue, Backend, Counters, FlowKey, IfaceInfo,
    NameMeta, NatEntry, ServiceKey, ServiceValue, SrcRangeData, VipInfo, MAP_AFFINITY,
    MAP_BACKENDS, MAP_BE_META, MAP_BE_STATS, MAP_CT, MAP_IFACES, MAP_MAGLEV, MAP_REASONS, MAP_RNAT,
    MAP_SERVICES, MAP_SRC_RANGES, MAP_SVC_META, MAP_SVC_STATS, MAP_VIPS,
};

mod batch;
pub mod fake;
#[cfg(test)]
mod maglev_write_tests;
mod mmap;
mod read;
mod src_range;
mod writer;

pub(crate) use batch::{BatchAttr, ENOTSUPP};
use mmap::MmapState;
pub use read::{
    fmt_key, fmt_src_range, BackendInfo, FlowInfo, FrontendInfo, IfaceEntry, ServiceInfo, Traffic,
};
pub use src_range::SrcRange;
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
}

impl Ifaces {
    /// Takes IFACES out of a loaded object (the programs keep their references).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapError> {
        Ok(Self {
            map: FromEbpf(ebpf).open(MAP_IFACES)?,
        })
    }

    /// Opens IFACES pinned under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, MapError> {
        Ok(Self {
            map: FromPins(pin_dir).open(MAP_IFACES)?,
        })
    }

    /// Adds or replaces the entry of `ifindex`.
    pub fn set(&mut self, ifindex: u32, info: IfaceInfo) -> Result<(), MapError> {
        self.map
            .insert(ifindex, info, 0)
            .map_err(op_err("insert", MAP_IFACES, ifindex))
    }

    /// Removes the entry of `ifindex`; one that is not there is not an error.
    pub fn remove(&mut self, ifindex: u32) -> Result<(), MapError> {
        match self.map.remove(&ifindex) {
            Ok(()) => Ok(()),
            Err(e) if absent(&e) => Ok(()),
            Err(source) => Err(op_err("delete", MAP_IFACES, ifindex)(source)),
        }
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
