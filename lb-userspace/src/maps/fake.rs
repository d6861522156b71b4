//! An in-memory [`MapWriter`](super::MapWriter) for tests: it checks the data path's
//! invariants after every single write and can be told to fail a given write, so tests can
//! show that a failed write never leaves a half-written service behind.
//!
//! The invariants are the ones the programs rely on: every frontend is named (SVC_META),
//! on a VIP unless it is a NodePort, and its MAGLEV range is written, names active
//! backends of its own family and overlaps no other port's range; a frontend that checks
//! source ranges has some; an AFFINITY entry never names a backend id that now belongs to
//! another backend; every SRC_RANGES entry belongs to a named port.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::Range;

use lb_common::{
    is_v4_mapped, AffinityKey, AffinityValue, Backend, NameMeta, ServiceKey, ServiceValue, VipInfo,
    BACKEND_F_ACTIVE, MAGLEV_SLOTS, MAX_BACKENDS, MAX_SRC_RANGES, SVC_F_DROP_IF_EMPTY, SVC_F_LOCAL,
    SVC_F_NODE_PORT, SVC_F_SOURCE_RANGES,
};

use super::{addr_from_map, addr_to_map, fmt_key, fmt_src_range};
use super::{MapError, MapSnapshot, MapWriter, SrcRange};

/// AFFINITY key in a sortable form: (client, svc_id, scope).
pub type AffinityIndex = ([u8; 16], u32, u32);

/// A backend's identity: (16-byte address, port in network byte order).
pub type BackendIdentity = ([u8; 16], u16);

/// In-memory maps that check the data path's invariants after every single write.
/// Tests read and change the maps directly through the public fields.
#[derive(Clone, Default)]
pub struct FakeMaps {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub vips: BTreeMap<[u8; 16], VipInfo>,
    pub backends: BTreeMap<u32, Backend>,
    pub be_meta: BTreeMap<u32, NameMeta>,
    pub svc_meta: BTreeMap<u32, NameMeta>,
    pub maglev: BTreeMap<u32, u32>,
    /// The LPM trie's entries, exactly as inserted (a trie keeps one entry per
    /// (prefix length, masked data); the reconciler always masks).
    pub src_ranges: BTreeSet<SrcRange>,
    /// The LRU map the programs write: entry → value and the identity its backend id had
    /// when the "program" wrote it, so a check can see the id change hands.
    pub affinity: BTreeMap<AffinityIndex, (AffinityValue, BackendIdentity)>,
    /// How often AFFINITY was walked.
    pub affinity_walks: Cell<usize>,
    /// Every write made, in order, as "op key" (e.g. `put_frontend 198.18.100.1:80/TCP`).
    pub writes: Vec<String>,
    /// Fail the write with this index (0-based count of all writes), once.
    pub fail_at: Option<usize>,
    /// Skip the per-write invariant checks (quadratic; for large states).
    pub unchecked: bool,
}

impl FakeMaps {
    /// Records a write, or fails it when it is the one `fail_at` names.
    fn write(&mut self, what: String) -> Result<(), MapError> {
        if self.fail_at == Some(self.writes.len()) {
            self.fail_at = None;
            return Err(MapError::Rejected {
                op: "test",
                map: "MEM",
                key: what,
                reason: "injected failure".into(),
            });
        }
        self.writes.push(what);
        Ok(())
    }

    /// Slots a frontend's range covers.
    pub fn slots(v: &ServiceValue) -> Range<u32> {
        v.maglev_offset..v.maglev_offset + v.maglev_size
    }

    /// What the programs do on a new flow of an affinity frontend: remember the client's
    /// backend. Panics if `backend_id` is not in BACKENDS (a mistake in the test).
    pub fn remember(&mut self, client: IpAddr, svc_id: u32, scope: u32, backend_id: u32) {
        let b = self
            .backends
            .get(&backend_id)
            .unwrap_or_else(|| panic!("remember: no backend {backend_id}"));
        let identity = (b.addr, b.port_be);
        self.affinity.insert(
            (addr_to_map(client), svc_id, scope),
            (
                AffinityValue {
                    backend_id,
                    _pad: 0,
                    last_ns: 1,
                },
                identity,
            ),
        );
    }

    /// Panics, naming the last write, if the maps break an invariant of the data path.
    fn check(&self) {
        if self.unchecked {
            return;
        }
        let last = self.writes.last().cloned().unwrap_or_default();
        for r in &self.src_ranges {
            assert!(
                self.svc_meta.contains_key(&r.svc_id),
                "after {last}: source range {} of unnamed svc_id",
                fmt_src_range(r)
            );
        }
        self.check_affinity(&last);
        for (k, v) in &self.services {
            self.check_frontend(&format!("after {last}: frontend {}", fmt_key(k)), k, v);
        }
    }

    fn check_affinity(&self, last: &str) {
        for ((client, svc, _), (v, identity)) in &self.affinity {
            if let Some(b) = self.backends.get(&v.backend_id) {
                assert_eq!(
                    (b.addr, b.port_be),
                    *identity,
                    "after {last}: affinity entry of {} (svc {svc}) names backend id {}, \
                     now another backend",
                    addr_from_map(client),
                    v.backend_id
                );
            }
        }
    }

    fn check_frontend(&self, ctx: &str, k: &ServiceKey, v: &ServiceValue) {
        assert!(self.svc_meta.contains_key(&v.svc_id), "{ctx}: no SVC_META");
        if v.flags & SVC_F_NODE_PORT == 0 {
            assert!(self.vips.contains_key(&k.addr), "{ctx}: no VIPS entry");
        }
        if v.flags & SVC_F_SOURCE_RANGES != 0 {
            assert!(
                self.src_ranges.iter().any(|r| r.svc_id == v.svc_id),
                "{ctx}: checks source ranges, none in SRC_RANGES (drops everyone)"
            );
        }
        if v.flags & SVC_F_DROP_IF_EMPTY != 0 {
            assert!(
                v.flags & SVC_F_LOCAL != 0 && v.maglev_size == 0,
                "{ctx}: drop-if-empty on {:#x} size {}",
                v.flags,
                v.maglev_size
            );
        }
        assert!(v.maglev_offset + v.maglev_size <= MAGLEV_SLOTS, "{ctx}");
        for slot in Self::slots(v) {
            let Some(id) = self.maglev.get(&slot) else {
                panic!("{ctx}: slot {slot} unwritten");
            };
            let Some(b) = self.backends.get(id) else {
                panic!("{ctx}: slot {slot} names inactive backend {id}");
            };
            assert!(b.flags & BACKEND_F_ACTIVE != 0, "{ctx}");
            assert_eq!(
                is_v4_mapped(&b.addr),
                is_v4_mapped(&k.addr),
                "{ctx}: other family"
            );
        }
        for (other_key, other) in &self.services {
            if other.svc_id != v.svc_id && v.maglev_size > 0 && other.maglev_size > 0 {
                let (a, b) = (Self::slots(v), Self::slots(other));
                assert!(
                    a.end <= b.start || b.end <= a.start,
                    "{ctx}: range overlaps {}'s",
                    fmt_key(other_key)
                );
            }
        }
    }
}

impl MapWriter for FakeMaps {
    fn snapshot(&self) -> Result<MapSnapshot, MapError> {
        Ok(MapSnapshot {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            vips: self.vips.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            svc_meta: self.svc_meta.iter().map(|(k, v)| (*k, *v)).collect(),
            be_meta: self.be_meta.iter().map(|(k, v)| (*k, *v)).collect(),
            src_ranges: self.src_ranges.iter().copied().collect(),
        })
    }
    fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, MapError> {
        self.affinity_walks.set(self.affinity_walks.get() + 1);
        Ok(self
            .affinity
            .iter()
            .map(|((client, svc_id, scope), (v, _))| {
                (
                    AffinityKey {
                        client: *client,
                        svc_id: *svc_id,
                        scope: *scope,
                    },
                    *v,
                )
            })
            .collect())
    }
    fn delete_affinity(&mut self, k: &AffinityKey) -> Result<(), MapError> {
        self.write(format!(
            "delete_affinity {}/{}/{}",
            addr_from_map(&k.client),
            k.svc_id,
            k.scope
        ))?;
        self.affinity.remove(&(k.client, k.svc_id, k.scope));
        self.check();
        Ok(())
    }
    fn put_src_range(&mut self, r: &SrcRange) -> Result<(), MapError> {
        self.write(format!("put_src_range {}", fmt_src_range(r)))?;
        assert!(self.src_ranges.len() < MAX_SRC_RANGES as usize);
        self.src_ranges.insert(*r);
        self.check();
        Ok(())
    }
    fn delete_src_range(&mut self, r: &SrcRange) -> Result<(), MapError> {
        self.write(format!("delete_src_range {}", fmt_src_range(r)))?;
        self.src_ranges.remove(r);
        self.check();
        Ok(())
    }
    fn read_maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>, MapError> {
        Ok((offset..offset + len)
            .map(|s| self.maglev.get(&s).copied().unwrap_or(0))
            .collect())
    }
    fn put_backend(&mut self, id: u32, b: &Backend, m: &NameMeta) -> Result<(), MapError> {
        self.write(format!("put_backend {id}"))?;
        assert!(id < MAX_BACKENDS);
        self.be_meta.insert(id, *m);
        self.backends.insert(id, *b);
        self.check();
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.write(format!("delete_backend {id}"))?;
        self.backends.remove(&id);
        self.be_meta.remove(&id);
        self.check();
        Ok(())
    }
    fn put_maglev(&mut self, offset: u32, slots: &[u32]) -> Result<(), MapError> {
        self.write(format!("put_maglev {offset}+{}", slots.len()))?;
        let end = offset + slots.len() as u32;
        for (k, v) in &self.services {
            let live = Self::slots(v);
            assert!(
                end <= live.start || live.end <= offset,
                "put_maglev {offset}..{end} rewrites the live table of {}",
                fmt_key(k)
            );
        }
        for (i, id) in slots.iter().enumerate() {
            self.maglev.insert(offset + i as u32, *id);
        }
        self.check();
        Ok(())
    }
    fn put_frontend(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), MapError> {
        self.write(format!("put_frontend {}", fmt_key(k)))?;
        self.services.insert(*k, *v);
        self.check();
        Ok(())
    }
    fn delete_frontend(&mut self, k: &ServiceKey) -> Result<(), MapError> {
        self.write(format!("delete_frontend {}", fmt_key(k)))?;
        self.services.remove(k);
        self.check();
        Ok(())
    }
    fn put_vip(&mut self, a: &[u8; 16], v: &VipInfo) -> Result<(), MapError> {
        self.write(format!("put_vip {}", addr_from_map(a)))?;
        self.vips.insert(*a, *v);
        self.check();
        Ok(())
    }
    fn delete_vip(&mut self, a: &[u8; 16]) -> Result<(), MapError> {
        self.write(format!("delete_vip {}", addr_from_map(a)))?;
        self.vips.remove(a);
        self.check();
        Ok(())
    }
    fn put_svc_meta(&mut self, id: u32, m: &NameMeta) -> Result<(), MapError> {
        self.write(format!("put_svc_meta {id}"))?;
        self.svc_meta.insert(id, *m);
        self.check();
        Ok(())
    }
    fn delete_svc_meta(&mut self, id: u32) -> Result<(), MapError> {
        self.write(format!("delete_svc_meta {id}"))?;
        self.svc_meta.remove(&id);
        self.check();
        Ok(())
    }
}
