//! The map operations the reconciler needs, as a trait: the aya implementation is
//! [`crate::maps::LbMaps`]; tests use an in-memory one. It lives with the maps so that the
//! dependency runs one way: the reconciler uses the map layer, never the reverse.

use lb_common::{AffinityKey, AffinityValue, Backend, NameMeta, ServiceKey, ServiceValue, VipInfo};

use super::{MapError, SrcRange};

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
