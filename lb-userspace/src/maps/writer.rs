//! The map operations the reconciler needs, as a trait ([`MapWriter`]), and the kernel's
//! implementation of it on [`LbMaps`]; tests use an in-memory one (`maps::fake`). It lives
//! with the maps so that the dependency runs one way: the reconciler uses the map layer,
//! never the reverse.
//!
//! The kernel writer orders its writes the way lbctl and the data path need them (a name
//! before the backend it names) and names the map and the key in every error; bulk writes
//! take the cheapest path this kernel and map allow (`mmap`, then `batch`, then one
//! syscall per entry).

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::IterableMap as _;
use lb_common::{
    AffinityKey, AffinityValue, Backend, NameMeta, ServiceKey, ServiceValue, VipInfo, MAP_AFFINITY,
    MAP_BACKENDS, MAP_BE_META, MAP_MAGLEV, MAP_SERVICES, MAP_SRC_RANGES, MAP_SVC_META, MAP_VIPS,
};

use super::read::hash_entries;
use super::{absent, addr_from_map, fmt_key, fmt_src_range, op_err, LbMaps, MapError, SrcRange};

/// What the maps hold now (everything the reconciler needs to adopt them).
#[derive(Clone, Debug, Default)]
pub struct MapSnapshot {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub vips: Vec<([u8; 16], VipInfo)>,
    /// Only slots with `BACKEND_F_ACTIVE`.
    pub backends: Vec<(u32, Backend)>,
    pub svc_meta: Vec<(u32, NameMeta)>,
    pub be_meta: Vec<(u32, NameMeta)>,
    pub src_ranges: Vec<SrcRange>,
}

/// The map operations the reconciler needs. The aya implementation is
/// [`crate::maps::LbMaps`]; tests use an in-memory one.
pub trait MapWriter {
    fn snapshot(&self) -> Result<MapSnapshot, MapError>;
    /// The backend ids in MAGLEV slots `[offset, offset + len)`.
    fn read_maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>, MapError>;
    fn put_backend(&mut self, id: u32, b: &Backend, meta: &NameMeta) -> Result<(), MapError>;
    /// Zeroes the BACKENDS slot and removes the BE_META entry.
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError>;
    fn put_maglev(&mut self, offset: u32, slots: &[u32]) -> Result<(), MapError>;
    fn put_frontend(&mut self, key: &ServiceKey, v: &ServiceValue) -> Result<(), MapError>;
    fn delete_frontend(&mut self, key: &ServiceKey) -> Result<(), MapError>;
    fn put_vip(&mut self, addr: &[u8; 16], v: &VipInfo) -> Result<(), MapError>;
    fn delete_vip(&mut self, addr: &[u8; 16]) -> Result<(), MapError>;
    fn put_svc_meta(&mut self, svc_id: u32, m: &NameMeta) -> Result<(), MapError>;
    fn delete_svc_meta(&mut self, svc_id: u32) -> Result<(), MapError>;
    fn put_src_range(&mut self, r: &SrcRange) -> Result<(), MapError>;
    /// Several `put_backend`s; a writer may make them in fewer calls (every name may then
    /// be written before every backend). Stops at the first error.
    fn put_backends(&mut self, items: &[(u32, Backend, NameMeta)]) -> Result<(), MapError> {
        items
            .iter()
            .try_for_each(|(id, b, m)| self.put_backend(*id, b, m))
    }
    /// Several `put_frontend`s (distinct keys), possibly in fewer calls.
    fn put_frontends(&mut self, items: &[(ServiceKey, ServiceValue)]) -> Result<(), MapError> {
        items.iter().try_for_each(|(k, v)| self.put_frontend(k, v))
    }
    /// Several `put_vip`s (distinct addresses), possibly in fewer calls.
    fn put_vips(&mut self, items: &[([u8; 16], VipInfo)]) -> Result<(), MapError> {
        items.iter().try_for_each(|(a, v)| self.put_vip(a, v))
    }
    /// Several `put_svc_meta`s (distinct ids), possibly in fewer calls.
    fn put_svc_metas(&mut self, items: &[(u32, NameMeta)]) -> Result<(), MapError> {
        items
            .iter()
            .try_for_each(|(id, m)| self.put_svc_meta(*id, m))
    }
    /// Deleting an entry that is not there is not an error.
    fn delete_src_range(&mut self, r: &SrcRange) -> Result<(), MapError>;
    /// The AFFINITY entries (an LRU map the programs write: a snapshot, possibly already
    /// stale when it returns).
    fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, MapError>;
    /// Deleting an entry that is not there (evicted meanwhile) is not an error.
    fn delete_affinity(&mut self, key: &AffinityKey) -> Result<(), MapError>;
}

/// The kernel writer: every operation names the map and the key in its error.
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
        // Cheapest first: stores into the mapping, then one batch syscall, then one
        // syscall per slot.
        if let Some(mapping) = self.maglev_mapping() {
            return mapping
                .write(offset, slots)
                .map_err(|reason| MapError::Rejected {
                    op: "write",
                    map: MAP_MAGLEV,
                    key: format!("{offset}+{}", slots.len()),
                    reason,
                });
        }
        if self.put_maglev_batched(offset, end, slots)? {
            return Ok(());
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
        if self.try_batch(
            fd,
            MAP_BE_META,
            &ids,
            &metas,
            std::string::ToString::to_string,
        )? {
            let fd = self.backends.map().fd().as_fd().as_raw_fd();
            if self.try_batch(
                fd,
                MAP_BACKENDS,
                &ids,
                &backends,
                std::string::ToString::to_string,
            )? {
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
        if !self.try_batch(
            fd,
            MAP_SVC_META,
            &keys,
            &values,
            std::string::ToString::to_string,
        )? {
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
