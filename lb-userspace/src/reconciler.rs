//! Turns a [`DesiredState`] into map contents and writes only the difference, in the order
//! of docs/architecture.md ("Agent") so the data path never sees a half-written service:
//!
//! 1. new and changed backends;
//! 2. new Maglev tables into freshly allocated ranges;
//! 3. frontends (and their VIPs and names), each an atomic switch to the new range;
//! 4. then removals: unwanted frontends, old ranges, unreferenced backends.
//!
//! The reconciler's bookkeeping can be rebuilt from the maps alone ([`Reconciler::adopt`]),
//! so a restarted agent takes over pinned maps without rewriting (and disturbing) anything.
//!
//! An apply diffs only the service ports whose desired state differs from what was last
//! applied successfully for them (plus the unchanged holders of frontends a changed port
//! claims), so its cost follows the change, not the size of the state. After adopting,
//! after a failed write and for ports that failed, nothing is taken as applied.
//!
//! Tables are per (service port, address family): a frontend only ever reaches endpoints of
//! its own family, because the data path cannot translate between IPv4 and IPv6.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use lb_common::{
    is_v4_mapped, Backend, NameMeta, ServiceKey, ServiceValue, VipInfo, BACKEND_F_ACTIVE,
    MAGLEV_SLOTS, MAX_BACKENDS, MAX_FRONTENDS, MAX_SERVICES, MAX_VIPS, SVC_F_CLUSTER_IP,
    SVC_F_EXTERNAL,
};

use crate::maps::{addr_from_map, addr_to_map, MapError};
use crate::model::{DesiredState, FrontendKind, ServicePortId, ServicePortState};

/// What the maps hold now (everything the reconciler needs to adopt them).
#[derive(Clone, Debug, Default)]
pub struct MapSnapshot {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub vips: Vec<([u8; 16], VipInfo)>,
    /// Only slots with `BACKEND_F_ACTIVE`.
    pub backends: Vec<(u32, Backend)>,
    pub svc_meta: Vec<(u32, NameMeta)>,
    pub be_meta: Vec<(u32, NameMeta)>,
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
}

/// Capacities the allocators keep to. [`Limits::default`] are the map sizes in lb-common;
/// tests use small ones to reach exhaustion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub services: u32,
    pub backends: u32,
    pub maglev_slots: u32,
    pub frontends: u32,
    pub vips: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            services: MAX_SERVICES,
            backends: MAX_BACKENDS,
            maglev_slots: MAGLEV_SLOTS,
            frontends: MAX_FRONTENDS,
            vips: MAX_VIPS,
        }
    }
}

/// Which capacity ran out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shortage {
    ServiceIds,
    BackendIds {
        needed: usize,
        free: usize,
    },
    MaglevSlots {
        needed: u32,
    },
    Frontends,
    Vips,
    /// Another service port of the desired state has the same (VIP, port, protocol).
    FrontendConflict {
        frontend: String,
        other: String,
    },
}

impl fmt::Display for Shortage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shortage::ServiceIds => write!(f, "no free service id (SVC_META/SVC_STATS full)"),
            Shortage::BackendIds { needed, free } => {
                write!(
                    f,
                    "needs {needed} new backend ids, {free} free (BACKENDS full)"
                )
            }
            Shortage::MaglevSlots { needed } => {
                write!(f, "no free MAGLEV range of {needed} slots")
            }
            Shortage::Frontends => write!(f, "SERVICES is full"),
            Shortage::Vips => write!(f, "VIPS is full"),
            Shortage::FrontendConflict { frontend, other } => {
                write!(f, "frontend {frontend} is already used by {other}")
            }
        }
    }
}

/// A service port that was left as it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFailure {
    /// `ServicePortId`'s Display.
    pub service: String,
    pub shortage: Shortage,
}

impl fmt::Display for ServiceFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.service, self.shortage)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A map operation failed mid-apply. The maps are consistent for the data path (the
    /// write order guarantees it) but may hold a mix of old and new state; the next apply
    /// re-reads the maps first.
    #[error("writing the maps failed")]
    Map(#[from] MapError),
    /// Some service ports could not be applied and kept their previous state; all other
    /// changes were applied (`stats`).
    #[error("{} service port(s) not applied: {}", failures.len(), join(failures))]
    ServicesNotApplied {
        failures: Vec<ServiceFailure>,
        stats: ApplyStats,
    },
}

fn join(f: &[ServiceFailure]) -> String {
    f.iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// What one apply wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub backends_put: usize,
    pub backends_deleted: usize,
    pub tables_written: usize,
    pub slots_written: usize,
    pub ranges_freed: usize,
    pub frontends_put: usize,
    pub frontends_deleted: usize,
    pub vips_put: usize,
    pub vips_deleted: usize,
    pub services_added: usize,
    pub services_removed: usize,
    /// Service ports whose desired state was diffed against the maps (the others were
    /// known to be applied already); not a write.
    pub ports_diffed: usize,
}

impl ApplyStats {
    /// Number of map write calls (a table counts once).
    pub fn writes(&self) -> usize {
        self.backends_put
            + self.backends_deleted
            + self.tables_written
            + self.frontends_put
            + self.frontends_deleted
            + self.vips_put
            + self.vips_deleted
            + self.services_added
            + self.services_removed
    }
}

impl fmt::Display for ApplyStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "services +{} -{}, frontends put {} deleted {}, tables {} ({} slots, {} ranges freed), \
             backends put {} deleted {}, vips put {} deleted {}",
            self.services_added,
            self.services_removed,
            self.frontends_put,
            self.frontends_deleted,
            self.tables_written,
            self.slots_written,
            self.ranges_freed,
            self.backends_put,
            self.backends_deleted,
            self.vips_put,
            self.vips_deleted
        )
    }
}

// ---------------------------------------------------------------------------------------
// Maglev glue: the one place that calls crate::maglev.
// ---------------------------------------------------------------------------------------

fn maglev_size(n: usize) -> u32 {
    crate::maglev::table_size(n)
}

/// How much larger than needed a table may stay before it is shrunk.
const MAGLEV_SHRINK_FACTOR: u32 = 4;

/// The table size for `n` endpoints, keeping the current size while it is still large
/// enough (>= 100 x n) and not wastefully large. Maglev only remaps ~1/N of the slots when
/// one of N backends changes if the table keeps its size; a new size reshuffles nearly
/// every slot, so new flows of unchanged backends would land elsewhere.
fn stable_maglev_size(n: usize, current: Option<u32>) -> u32 {
    let needed = maglev_size(n);
    match current {
        Some(c) if c >= needed && c <= needed.saturating_mul(MAGLEV_SHRINK_FACTOR) => c,
        _ => needed,
    }
}

/// Slot → index into `names`.
fn maglev_table(names: &[Vec<u8>], size: u32) -> Vec<u32> {
    crate::maglev::build_table(names, size)
}

// ---------------------------------------------------------------------------------------
// Allocators
// ---------------------------------------------------------------------------------------

/// Ids below `limit`, lowest free first.
#[derive(Clone, Debug)]
struct IdAlloc {
    limit: u32,
    /// Every id >= next is free.
    next: u32,
    /// Free ids below `next`.
    free: BTreeSet<u32>,
}

impl IdAlloc {
    fn new(limit: u32) -> Self {
        Self {
            limit,
            next: 0,
            free: BTreeSet::new(),
        }
    }

    /// Marks adopted ids as used.
    fn with_used(limit: u32, used: impl IntoIterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().filter(|&i| i < limit).collect();
        let next = used.last().map_or(0, |m| m + 1);
        let free = (0..next).filter(|i| !used.contains(i)).collect();
        Self { limit, next, free }
    }

    fn available(&self) -> usize {
        self.free.len() + (self.limit - self.next) as usize
    }

    fn alloc(&mut self) -> Option<u32> {
        if let Some(i) = self.free.pop_first() {
            return Some(i);
        }
        if self.next < self.limit {
            self.next += 1;
            return Some(self.next - 1);
        }
        None
    }

    fn release(&mut self, id: u32) {
        if id < self.next {
            self.free.insert(id);
        }
        while self.next > 0 && self.free.remove(&(self.next - 1)) {
            self.next -= 1;
        }
    }
}

/// Ranges of MAGLEV, first fit, coalescing on release.
#[derive(Clone, Debug)]
struct RangeAlloc {
    /// start → len of every free range; never two adjacent ones.
    free: BTreeMap<u32, u32>,
}

impl RangeAlloc {
    fn new(slots: u32) -> Self {
        let mut free = BTreeMap::new();
        if slots > 0 {
            free.insert(0, slots);
        }
        Self { free }
    }

    fn alloc(&mut self, len: u32) -> Option<u32> {
        let (&start, &flen) = self.free.iter().find(|(_, &l)| l >= len)?;
        self.free.remove(&start);
        if flen > len {
            self.free.insert(start + len, flen - len);
        }
        Some(start)
    }

    /// Takes `[start, start+len)` out of the free ranges (adopting). False if any part of
    /// it was not free (overlapping or out-of-bounds ranges in the maps).
    fn reserve(&mut self, start: u32, len: u32) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        let Some((&fstart, &flen)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if fstart + flen < end {
            return false;
        }
        self.free.remove(&fstart);
        if start > fstart {
            self.free.insert(fstart, start - fstart);
        }
        if fstart + flen > end {
            self.free.insert(end, fstart + flen - end);
        }
        true
    }

    fn release(&mut self, start: u32, len: u32) {
        let mut start = start;
        let mut len = len;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += nl;
        }
        self.free.insert(start, len);
    }
}

// ---------------------------------------------------------------------------------------
// Bookkeeping
// ---------------------------------------------------------------------------------------

/// Backend identity: (16-byte address, port in network byte order).
type BeKey = ([u8; 16], u16);

const V4: usize = 0;
const V6: usize = 1;

fn family(addr: &[u8; 16]) -> usize {
    if is_v4_mapped(addr) {
        V4
    } else {
        V6
    }
}

fn frontend_key(f: &crate::model::Frontend) -> ServiceKey {
    ServiceKey {
        addr: addr_to_map(f.addr),
        port_be: f.port.to_be(),
        proto: f.protocol.number(),
        _pad: 0,
    }
}

fn be_name(k: &BeKey) -> Vec<u8> {
    crate::maglev::backend_name(addr_from_map(&k.0), u16::from_be(k.1)).into_bytes()
}

/// One Maglev table as it is in MAGLEV.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Table {
    offset: u32,
    /// 0: no ready endpoints, no range.
    size: u32,
    /// Backend ids the slots name.
    ids: BTreeSet<u32>,
    /// Their identities.
    members: BTreeSet<BeKey>,
    /// Must be rebuilt even if the members are right (found inconsistent when adopting).
    dirty: bool,
}

#[derive(Clone, Debug)]
struct SvcState {
    svc_id: u32,
    frontends: BTreeMap<ServiceKey, ServiceValue>,
    tables: [Option<Table>; 2],
    /// Ranges found in the maps besides the tables (a switch interrupted by a crash);
    /// freed at the next rebuild of this service.
    leftover_ranges: Vec<(u32, u32)>,
}

#[derive(Clone, Debug)]
struct BeState {
    key: BeKey,
    meta: String,
}

/// A service port of the desired state, in map terms.
struct Wanted {
    frontends: BTreeMap<ServiceKey, u32>,
    /// Per family with at least one frontend: endpoint → BE_META name.
    tables: [Option<BTreeMap<BeKey, String>>; 2],
}

/// Keeps the maps equal to the desired state. See the module documentation.
pub struct Reconciler<W: MapWriter> {
    writer: W,
    limits: Limits,
    /// By `ServicePortId`'s Display, the name SVC_META holds.
    services: BTreeMap<String, SvcState>,
    be_by_key: BTreeMap<BeKey, u32>,
    backends: BTreeMap<u32, BeState>,
    /// BE_META entries of inactive slots (left by an interrupted delete).
    stale_be_meta: BTreeSet<u32>,
    vips: BTreeMap<[u8; 16], u32>,
    svc_ids: IdAlloc,
    be_ids: IdAlloc,
    ranges: RangeAlloc,
    /// A write failed: re-read the maps before the next apply.
    resync: bool,
    /// Each service port as last applied successfully, with its SVC_META name, so that an
    /// apply only diffs the ports whose desired state changed (diffing all of them cost
    /// ~0.7 µs per endpoint, most of an endpoint change at 10,000 endpoints). `None`: the
    /// bookkeeping came from the maps (adopt, resync) or an apply failed part-way, so
    /// nothing is known to be applied and the next apply diffs everything.
    applied: Option<BTreeMap<ServicePortId, (String, ServicePortState)>>,
}

impl<W: MapWriter> Reconciler<W> {
    /// Takes over whatever the maps hold (empty maps are fine).
    pub fn adopt(writer: W) -> Result<Self, ReconcileError> {
        Self::adopt_with_limits(writer, Limits::default())
    }

    pub fn adopt_with_limits(writer: W, limits: Limits) -> Result<Self, ReconcileError> {
        let mut r = Self {
            writer,
            limits,
            services: BTreeMap::new(),
            be_by_key: BTreeMap::new(),
            backends: BTreeMap::new(),
            stale_be_meta: BTreeSet::new(),
            vips: BTreeMap::new(),
            svc_ids: IdAlloc::new(limits.services),
            be_ids: IdAlloc::new(limits.backends),
            ranges: RangeAlloc::new(limits.maglev_slots),
            resync: false,
            applied: None,
        };
        r.load()?;
        Ok(r)
    }

    pub fn writer(&self) -> &W {
        &self.writer
    }

    pub fn writer_mut(&mut self) -> &mut W {
        &mut self.writer
    }

    /// Number of service ports and frontends the reconciler manages.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.services.len(),
            self.services.values().map(|s| s.frontends.len()).sum(),
        )
    }

    /// Rebuilds the bookkeeping from the maps.
    fn load(&mut self) -> Result<(), ReconcileError> {
        let snap = self.writer.snapshot()?;
        let limits = self.limits;

        self.backends.clear();
        self.be_by_key.clear();
        self.stale_be_meta.clear();
        let meta: BTreeMap<u32, String> = snap
            .be_meta
            .iter()
            .map(|(id, m)| (*id, m.as_str().to_owned()))
            .collect();
        for (id, b) in &snap.backends {
            let key = (b.addr, b.port_be);
            // Two slots with one identity cannot come from this reconciler; keep the first
            // as the identity's id, the other one is deleted once no table names it.
            self.be_by_key.entry(key).or_insert(*id);
            self.backends.insert(
                *id,
                BeState {
                    key,
                    meta: meta.get(id).cloned().unwrap_or_default(),
                },
            );
        }
        self.stale_be_meta = meta
            .keys()
            .filter(|id| !self.backends.contains_key(id))
            .copied()
            .collect();
        self.be_ids = IdAlloc::with_used(limits.backends, self.backends.keys().copied());

        let names: BTreeMap<u32, String> = snap
            .svc_meta
            .iter()
            .map(|(id, m)| (*id, m.as_str().to_owned()))
            .collect();
        let mut by_id: BTreeMap<u32, BTreeMap<ServiceKey, ServiceValue>> = BTreeMap::new();
        for id in names.keys() {
            by_id.entry(*id).or_default();
        }
        for (k, v) in &snap.services {
            by_id.entry(v.svc_id).or_default().insert(*k, *v);
        }

        self.services.clear();
        self.ranges = RangeAlloc::new(limits.maglev_slots);
        for (svc_id, frontends) in by_id {
            let name = match names.get(&svc_id) {
                Some(n) if !self.services.contains_key(n) => n.clone(),
                // Frontends without a name (or a duplicate name) are nobody's: they are
                // removed by the next apply, as no desired service has this name.
                _ => format!("<orphan svc_id {svc_id}>"),
            };
            let mut tables: [Option<Table>; 2] = [None, None];
            let mut leftover = Vec::new();
            for (k, v) in &frontends {
                let fam = family(&k.addr);
                let range = (v.maglev_offset, v.maglev_size);
                match &mut tables[fam] {
                    Some(t) if (t.offset, t.size) == range || (t.size == 0 && range.1 == 0) => {}
                    Some(t) => {
                        t.dirty = true;
                        if range.1 > 0 && !leftover.contains(&range) {
                            leftover.push(range);
                        }
                    }
                    slot @ None => {
                        *slot = Some(Table {
                            offset: if range.1 == 0 { 0 } else { range.0 },
                            size: range.1,
                            ids: BTreeSet::new(),
                            members: BTreeSet::new(),
                            dirty: false,
                        })
                    }
                }
            }
            let mut keep_leftover = Vec::new();
            for (off, size) in leftover {
                if self.ranges.reserve(off, size) {
                    keep_leftover.push((off, size));
                }
            }
            for (fam, t) in tables.iter_mut().enumerate() {
                let Some(t) = t else { continue };
                if t.size == 0 {
                    continue;
                }
                if !self.ranges.reserve(t.offset, t.size) {
                    // Overlaps another table or lies outside MAGLEV: rebuild elsewhere and do
                    // not free it afterwards (it is not ours alone).
                    t.dirty = true;
                    t.size = 0;
                    t.offset = 0;
                    continue;
                }
                for id in self.writer.read_maglev(t.offset, t.size)? {
                    t.ids.insert(id);
                    match self.backends.get(&id) {
                        Some(b)
                            if family(&b.key.0) == fam
                                && self.be_by_key.get(&b.key) == Some(&id) =>
                        {
                            t.members.insert(b.key);
                        }
                        _ => t.dirty = true,
                    }
                }
            }
            self.services.insert(
                name,
                SvcState {
                    svc_id,
                    frontends,
                    tables,
                    leftover_ranges: keep_leftover,
                },
            );
        }
        self.svc_ids =
            IdAlloc::with_used(limits.services, self.services.values().map(|s| s.svc_id));
        self.vips = snap.vips.iter().map(|(a, v)| (*a, v.frontends)).collect();
        self.resync = false;
        // Adopted tables may be dirty and leftover ranges must be freed: a full diff first.
        self.applied = None;
        Ok(())
    }

    /// Makes the maps hold `desired`. See the module documentation for the order.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<ApplyStats, ReconcileError> {
        if self.resync {
            self.load()?;
        }
        let applied = self.applied.take();
        // `sub`: the service ports to diff; `keep`: the names of those whose maps already
        // hold their desired state (left alone, but still counted for VIPs and backends).
        let mut sub: BTreeMap<&ServicePortId, &ServicePortState> = BTreeMap::new();
        let mut keep: BTreeSet<String> = BTreeSet::new();
        match &applied {
            None => sub.extend(desired.services.iter()),
            Some(applied) => {
                for (id, st) in &desired.services {
                    match applied.get(id) {
                        Some((name, a)) if a == st => {
                            keep.insert(name.clone());
                        }
                        _ => {
                            sub.insert(id, st);
                        }
                    }
                }
                // A changed port claiming a frontend an unchanged one holds: both are
                // diffed, so the conflict resolves as a full diff would resolve it (the
                // first by name keeps it). The unchanged one holds only its own frontends,
                // so one pass is enough.
                let owner: BTreeMap<ServiceKey, &str> = self
                    .services
                    .iter()
                    .flat_map(|(n, s)| s.frontends.keys().map(move |k| (*k, n.as_str())))
                    .collect();
                let mut pulled: BTreeSet<String> = BTreeSet::new();
                for st in sub.values() {
                    for f in &st.frontends {
                        if let Some(o) = owner.get(&frontend_key(f)) {
                            if keep.contains(*o) {
                                pulled.insert((*o).to_owned());
                            }
                        }
                    }
                }
                if !pulled.is_empty() {
                    for (id, (name, _)) in applied {
                        if pulled.contains(name) {
                            if let Some((id, st)) = desired.services.get_key_value(id) {
                                keep.remove(name);
                                sub.insert(id, st);
                            }
                        }
                    }
                }
            }
        }
        let r = self.apply_inner(&sub, &keep);
        let failed: BTreeSet<&str> = match &r {
            Ok(_) => BTreeSet::new(),
            Err(ReconcileError::ServicesNotApplied { failures, .. }) => {
                failures.iter().map(|f| f.service.as_str()).collect()
            }
            Err(_) => {
                // The maps may differ from the bookkeeping: the next apply re-reads them
                // and diffs everything (`applied` stays `None`).
                if matches!(r, Err(ReconcileError::Map(_))) {
                    self.resync = true;
                }
                return r;
            }
        };
        let mut applied = applied.unwrap_or_default();
        applied.retain(|id, _| desired.services.contains_key(id));
        for (id, st) in sub {
            let name = id.to_string();
            // A failed port keeps its old entries: diff it again next time.
            if failed.contains(name.as_str()) {
                applied.remove(id);
            } else {
                applied.insert(id.clone(), (name, st.clone()));
            }
        }
        self.applied = Some(applied);
        r
    }

    fn apply_inner(
        &mut self,
        sub: &BTreeMap<&ServicePortId, &ServicePortState>,
        keep: &BTreeSet<String>,
    ) -> Result<ApplyStats, ReconcileError> {
        let mut stats = ApplyStats {
            ports_diffed: sub.len(),
            ..ApplyStats::default()
        };
        let mut failures: Vec<ServiceFailure> = Vec::new();

        // Desired state in map terms; a frontend claimed twice stays with the first.
        let mut wanted: BTreeMap<String, Wanted> = BTreeMap::new();
        let mut claimed: BTreeMap<ServiceKey, String> = BTreeMap::new();
        'svc: for (id, st) in sub {
            let name = id.to_string();
            let mut w = Wanted {
                frontends: BTreeMap::new(),
                tables: [None, None],
            };
            for f in &st.frontends {
                let key = frontend_key(f);
                if let Some(other) = claimed.get(&key) {
                    if *other != name {
                        failures.push(ServiceFailure {
                            service: name,
                            shortage: Shortage::FrontendConflict {
                                frontend: crate::maps::fmt_key(&key),
                                other: other.clone(),
                            },
                        });
                        continue 'svc;
                    }
                }
                let flags = match f.kind {
                    FrontendKind::ClusterIp => SVC_F_CLUSTER_IP,
                    FrontendKind::LoadBalancer | FrontendKind::ExternalIp => SVC_F_EXTERNAL,
                };
                *w.frontends.entry(key).or_insert(0) |= flags;
                w.tables[family(&key.addr)].get_or_insert_with(BTreeMap::new);
            }
            for e in &st.endpoints {
                let addr = addr_to_map(e.addr);
                if let Some(t) = &mut w.tables[family(&addr)] {
                    let meta = e
                        .target
                        .clone()
                        .unwrap_or_else(|| addr_from_map(&addr).to_string());
                    t.entry((addr, e.port.to_be())).or_insert(meta);
                }
            }
            for k in w.frontends.keys() {
                claimed.insert(*k, name.clone());
            }
            wanted.insert(name, w);
        }

        // Capacity of SERVICES and VIPS at the peak (before removals).
        let mut n_frontends: usize = self.services.values().map(|s| s.frontends.len()).sum();
        let mut n_vips = self.vips.len();
        let current_keys: BTreeSet<ServiceKey> = self
            .services
            .values()
            .flat_map(|s| s.frontends.keys().copied())
            .collect();
        let mut new_vips: BTreeSet<[u8; 16]> = BTreeSet::new();
        let names: Vec<String> = wanted.keys().cloned().collect();
        for name in &names {
            let w = &wanted[name];
            let add: Vec<&ServiceKey> = w
                .frontends
                .keys()
                .filter(|k| !current_keys.contains(k))
                .collect();
            let vips: BTreeSet<[u8; 16]> = add
                .iter()
                .map(|k| k.addr)
                .filter(|a| !self.vips.contains_key(a) && !new_vips.contains(a))
                .collect();
            let shortage = if n_frontends + add.len() > self.limits.frontends as usize {
                Some(Shortage::Frontends)
            } else if n_vips + vips.len() > self.limits.vips as usize {
                Some(Shortage::Vips)
            } else {
                None
            };
            if let Some(shortage) = shortage {
                failures.push(ServiceFailure {
                    service: name.clone(),
                    shortage,
                });
                wanted.remove(name);
                continue;
            }
            n_frontends += add.len();
            n_vips += vips.len();
            new_vips.extend(vips);
        }

        // 1. Backends: new ones, and changed names of existing ones.
        let mut meta_done: BTreeSet<BeKey> = BTreeSet::new();
        for name in &names {
            let Some(w) = wanted.get(name) else { continue };
            let mut need: BTreeMap<BeKey, String> = BTreeMap::new();
            for t in w.tables.iter().flatten() {
                for (k, m) in t {
                    need.entry(*k).or_insert_with(|| m.clone());
                }
            }
            let new: Vec<(&BeKey, &String)> = need
                .iter()
                .filter(|(k, _)| !self.be_by_key.contains_key(*k))
                .collect();
            if new.len() > self.be_ids.available() {
                failures.push(ServiceFailure {
                    service: name.clone(),
                    shortage: Shortage::BackendIds {
                        needed: new.len(),
                        free: self.be_ids.available(),
                    },
                });
                wanted.remove(name);
                continue;
            }
            for (k, m) in &need {
                if !meta_done.insert(*k) {
                    continue;
                }
                let b = Backend {
                    addr: k.0,
                    port_be: k.1,
                    _pad: [0; 2],
                    flags: BACKEND_F_ACTIVE,
                };
                match self.be_by_key.get(k) {
                    Some(id) => {
                        let id = *id;
                        let Some(st) = self.backends.get_mut(&id) else {
                            continue;
                        };
                        if st.meta != *m {
                            self.writer.put_backend(id, &b, &NameMeta::new(m))?;
                            st.meta = m.clone();
                            stats.backends_put += 1;
                        }
                    }
                    None => {
                        let Some(id) = self.be_ids.alloc() else {
                            // Counted above; cannot happen.
                            continue;
                        };
                        self.writer.put_backend(id, &b, &NameMeta::new(m))?;
                        self.stale_be_meta.remove(&id);
                        self.be_by_key.insert(*k, id);
                        self.backends.insert(
                            id,
                            BeState {
                                key: *k,
                                meta: m.clone(),
                            },
                        );
                        stats.backends_put += 1;
                    }
                }
            }
        }

        // 2. Tables: a new range for every changed (service port, family).
        let mut new_tables: BTreeMap<String, [Option<Table>; 2]> = BTreeMap::new();
        let mut new_svc_ids: BTreeMap<String, u32> = BTreeMap::new();
        for name in &names {
            let Some(w) = wanted.get(name) else { continue };
            let cur = self.services.get(name);
            if cur.is_none() {
                let Some(id) = self.svc_ids.alloc() else {
                    failures.push(ServiceFailure {
                        service: name.clone(),
                        shortage: Shortage::ServiceIds,
                    });
                    wanted.remove(name);
                    continue;
                };
                new_svc_ids.insert(name.clone(), id);
            }
            let mut out: [Option<Table>; 2] = [None, None];
            let mut failed = None;
            for fam in [V4, V6] {
                let Some(want) = &w.tables[fam] else { continue };
                let members: BTreeSet<BeKey> = want.keys().copied().collect();
                let cur_size = cur.and_then(|s| s.tables[fam].as_ref()).map(|t| t.size);
                let size = if members.is_empty() {
                    0
                } else {
                    stable_maglev_size(members.len(), cur_size)
                };
                let unchanged = cur
                    .and_then(|s| s.tables[fam].as_ref())
                    .is_some_and(|t| !t.dirty && t.size == size && t.members == members);
                if unchanged {
                    continue;
                }
                let offset = if size == 0 {
                    0
                } else {
                    match self.ranges.alloc(size) {
                        Some(o) => o,
                        None => {
                            failed = Some(Shortage::MaglevSlots { needed: size });
                            break;
                        }
                    }
                };
                let mut ids = BTreeSet::new();
                if size > 0 {
                    // The model's order, (address, port), so the table is the one
                    // maglev.rs documents for these endpoints.
                    let mut order: Vec<BeKey> = members.iter().copied().collect();
                    order.sort_by_key(|k| (addr_from_map(&k.0), u16::from_be(k.1)));
                    // Phase 1 gave every member an id; BACKEND_NONE keeps the indices
                    // aligned if that were ever broken (the data path drops such slots).
                    let idx: Vec<u32> = order
                        .iter()
                        .map(|k| {
                            self.be_by_key
                                .get(k)
                                .copied()
                                .unwrap_or(lb_common::BACKEND_NONE)
                        })
                        .collect();
                    let names: Vec<Vec<u8>> = order.iter().map(be_name).collect();
                    let slots: Vec<u32> = maglev_table(&names, size)
                        .into_iter()
                        .map(|i| {
                            idx.get(i as usize)
                                .copied()
                                .unwrap_or(lb_common::BACKEND_NONE)
                        })
                        .collect();
                    ids.extend(slots.iter().copied());
                    self.writer.put_maglev(offset, &slots)?;
                    stats.tables_written += 1;
                    stats.slots_written += slots.len();
                }
                out[fam] = Some(Table {
                    offset,
                    size,
                    ids,
                    members,
                    dirty: false,
                });
            }
            if let Some(shortage) = failed {
                // Ranges allocated for this service were never referenced: give them back.
                for t in out.iter().flatten() {
                    if t.size > 0 {
                        self.ranges.release(t.offset, t.size);
                    }
                }
                if let Some(id) = new_svc_ids.remove(name) {
                    self.svc_ids.release(id);
                }
                failures.push(ServiceFailure {
                    service: name.clone(),
                    shortage,
                });
                wanted.remove(name);
                continue;
            }
            new_tables.insert(name.clone(), out);
        }

        // Final frontends: wanted ones, plus the current ones of services that failed.
        let mut final_fe: BTreeMap<ServiceKey, String> = BTreeMap::new();
        for (name, w) in &wanted {
            for k in w.frontends.keys() {
                final_fe.insert(*k, name.clone());
            }
        }
        for f in &failures {
            if let Some(s) = self.services.get(&f.service) {
                for k in s.frontends.keys() {
                    final_fe.entry(*k).or_insert_with(|| f.service.clone());
                }
            }
        }
        let mut final_vips: BTreeMap<[u8; 16], u32> = BTreeMap::new();
        for k in final_fe.keys() {
            *final_vips.entry(k.addr).or_insert(0) += 1;
        }
        // Unchanged ports keep their frontends; none is claimed by a diffed port (`apply`
        // pulled such holders into the diff), so they are counted without a copy.
        for name in keep {
            if let Some(s) = self.services.get(name) {
                for k in s.frontends.keys() {
                    if !final_fe.contains_key(k) {
                        *final_vips.entry(k.addr).or_insert(0) += 1;
                    }
                }
            }
        }

        // 3. Names, VIPs, then frontends.
        for (name, id) in &new_svc_ids {
            if wanted.contains_key(name) {
                self.writer.put_svc_meta(*id, &NameMeta::new(name))?;
                stats.services_added += 1;
                self.services.insert(
                    name.clone(),
                    SvcState {
                        svc_id: *id,
                        frontends: BTreeMap::new(),
                        tables: [None, None],
                        leftover_ranges: Vec::new(),
                    },
                );
            }
        }
        for (addr, n) in &final_vips {
            if self.vips.get(addr) != Some(n) {
                self.writer.put_vip(
                    addr,
                    &VipInfo {
                        frontends: *n,
                        _pad: 0,
                    },
                )?;
                self.vips.insert(*addr, *n);
                stats.vips_put += 1;
            }
        }
        // Which service port holds each frontend now (a frontend can change hands).
        let mut owner: BTreeMap<ServiceKey, String> = self
            .services
            .iter()
            .flat_map(|(n, s)| s.frontends.keys().map(move |k| (*k, n.clone())))
            .collect();
        let mut old_ranges: Vec<(u32, u32)> = Vec::new();
        for (name, w) in &wanted {
            let tables = new_tables.remove(name).unwrap_or([None, None]);
            let Some(s) = self.services.get(name) else {
                continue;
            };
            let svc_id = s.svc_id;
            // The tables this service uses from now on.
            let mut now: [Option<Table>; 2] = [None, None];
            for fam in [V4, V6] {
                now[fam] = match (&tables[fam], w.tables[fam].is_some()) {
                    (Some(t), _) => Some(t.clone()),
                    (None, true) => s.tables[fam].clone(),
                    (None, false) => None,
                };
            }
            for (k, flags) in &w.frontends {
                let Some(t) = &now[family(&k.addr)] else {
                    continue;
                };
                let v = ServiceValue {
                    svc_id,
                    maglev_offset: t.offset,
                    maglev_size: t.size,
                    flags: *flags,
                };
                let current = owner
                    .get(k)
                    .and_then(|o| self.services.get(o))
                    .and_then(|o| o.frontends.get(k))
                    .copied();
                if current != Some(v) {
                    self.writer.put_frontend(k, &v)?;
                    stats.frontends_put += 1;
                    // A frontend moving from another service port is that one's no more.
                    if let Some(prev) = owner.insert(*k, name.clone()) {
                        if prev != *name {
                            if let Some(o) = self.services.get_mut(&prev) {
                                o.frontends.remove(k);
                            }
                        }
                    }
                    if let Some(s) = self.services.get_mut(name) {
                        s.frontends.insert(*k, v);
                    }
                }
            }
            let Some(s) = self.services.get_mut(name) else {
                continue;
            };
            for fam in [V4, V6] {
                let replaced = match (&s.tables[fam], &now[fam]) {
                    (Some(old), Some(new)) => old.offset != new.offset || old.size != new.size,
                    (Some(_), None) => true,
                    _ => false,
                };
                if replaced {
                    if let Some(old) = &s.tables[fam] {
                        if old.size > 0 {
                            old_ranges.push((old.offset, old.size));
                        }
                    }
                }
            }
            // Leftover ranges belong to a dirty table, which was rebuilt above, and every
            // frontend that named them now names the new one (or is deleted below).
            old_ranges.append(&mut s.leftover_ranges);
            s.tables = now;
        }

        // 4. Removals: frontends, names, ranges, backends, VIPs.
        let gone: Vec<ServiceKey> = self
            .services
            .iter()
            .filter(|(n, _)| !keep.contains(*n))
            .flat_map(|(_, s)| s.frontends.keys().copied())
            .filter(|k| !final_fe.contains_key(k))
            .collect();
        for k in &gone {
            self.writer.delete_frontend(k)?;
            stats.frontends_deleted += 1;
            if let Some(o) = owner.remove(k) {
                if let Some(s) = self.services.get_mut(&o) {
                    s.frontends.remove(k);
                }
            }
        }
        let failed_names: BTreeSet<&str> = failures.iter().map(|f| f.service.as_str()).collect();
        let removed: Vec<String> = self
            .services
            .keys()
            .filter(|n| {
                !wanted.contains_key(*n) && !failed_names.contains(n.as_str()) && !keep.contains(*n)
            })
            .cloned()
            .collect();
        for name in removed {
            let Some(s) = self.services.remove(&name) else {
                continue;
            };
            self.writer.delete_svc_meta(s.svc_id)?;
            stats.services_removed += 1;
            self.svc_ids.release(s.svc_id);
            for t in s.tables.iter().flatten() {
                if t.size > 0 {
                    old_ranges.push((t.offset, t.size));
                }
            }
            old_ranges.extend(s.leftover_ranges);
        }
        // A backend loses its last reference only with a dropped table (replaced or
        // removed), a port refused after its backends were written, or an adopted slot:
        // otherwise the scan of every table is skipped.
        let may_orphan = keep.is_empty() || !old_ranges.is_empty() || !failures.is_empty();
        for (off, size) in old_ranges {
            self.ranges.release(off, size);
            stats.ranges_freed += 1;
        }
        let unused: Vec<u32> = if may_orphan {
            let live: BTreeSet<u32> = self
                .services
                .values()
                .flat_map(|s| s.tables.iter().flatten())
                .flat_map(|t| t.ids.iter().copied())
                .collect();
            self.backends
                .keys()
                .filter(|id| !live.contains(id))
                .copied()
                .collect()
        } else {
            Vec::new()
        };
        for id in unused
            .into_iter()
            .chain(std::mem::take(&mut self.stale_be_meta))
        {
            self.writer.delete_backend(id)?;
            stats.backends_deleted += 1;
            if let Some(b) = self.backends.remove(&id) {
                if self.be_by_key.get(&b.key) == Some(&id) {
                    self.be_by_key.remove(&b.key);
                }
            }
            self.be_ids.release(id);
        }
        let vips_gone: Vec<[u8; 16]> = self
            .vips
            .keys()
            .filter(|a| !final_vips.contains_key(*a))
            .copied()
            .collect();
        for a in vips_gone {
            self.writer.delete_vip(&a)?;
            self.vips.remove(&a);
            stats.vips_deleted += 1;
        }

        if failures.is_empty() {
            Ok(stats)
        } else {
            Err(ReconcileError::ServicesNotApplied { failures, stats })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Frontend, Protocol, ServicePortId, ServicePortState};
    use std::net::{IpAddr, SocketAddr};

    /// In-memory maps that check the data path's invariants after every single write.
    #[derive(Clone, Default)]
    struct Mem {
        services: BTreeMap<ServiceKey, ServiceValue>,
        vips: BTreeMap<[u8; 16], VipInfo>,
        backends: BTreeMap<u32, Backend>,
        be_meta: BTreeMap<u32, NameMeta>,
        svc_meta: BTreeMap<u32, NameMeta>,
        maglev: BTreeMap<u32, u32>,
        writes: Vec<String>,
        /// Fail the write with this index (0-based count of all writes).
        fail_at: Option<usize>,
        /// Skip the per-write invariant checks (quadratic; for the large-state test).
        unchecked: bool,
    }

    impl Mem {
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
        fn range(v: &ServiceValue) -> std::ops::Range<u32> {
            v.maglev_offset..v.maglev_offset + v.maglev_size
        }

        fn check(&self) {
            if self.unchecked {
                return;
            }
            let last = self.writes.last().cloned().unwrap_or_default();
            for (k, v) in &self.services {
                let ctx = format!("after {last}: frontend {}", crate::maps::fmt_key(k));
                assert!(self.svc_meta.contains_key(&v.svc_id), "{ctx}: no SVC_META");
                assert!(self.vips.contains_key(&k.addr), "{ctx}: no VIPS entry");
                assert!(v.maglev_offset + v.maglev_size <= MAGLEV_SLOTS, "{ctx}");
                for slot in Self::range(v) {
                    let id = self.maglev.get(&slot);
                    let Some(id) = id else {
                        panic!("{ctx}: slot {slot} unwritten");
                    };
                    let b = self.backends.get(id);
                    let Some(b) = b else {
                        panic!("{ctx}: slot {slot} names inactive backend {id}");
                    };
                    assert!(b.flags & BACKEND_F_ACTIVE != 0, "{ctx}");
                    assert_eq!(family(&b.addr), family(&k.addr), "{ctx}: other family");
                }
                for (k2, v2) in &self.services {
                    if v2.svc_id != v.svc_id && v.maglev_size > 0 && v2.maglev_size > 0 {
                        let (a, b) = (Self::range(v), Self::range(v2));
                        assert!(
                            a.end <= b.start || b.end <= a.start,
                            "{ctx}: range overlaps {}'s",
                            crate::maps::fmt_key(k2)
                        );
                    }
                }
            }
        }
    }

    impl MapWriter for Mem {
        fn snapshot(&self) -> Result<MapSnapshot, MapError> {
            Ok(MapSnapshot {
                services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
                vips: self.vips.iter().map(|(k, v)| (*k, *v)).collect(),
                backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
                svc_meta: self.svc_meta.iter().map(|(k, v)| (*k, *v)).collect(),
                be_meta: self.be_meta.iter().map(|(k, v)| (*k, *v)).collect(),
            })
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
                let r = Self::range(v);
                assert!(
                    end <= r.start || r.end <= offset,
                    "put_maglev {offset}..{end} rewrites the live table of {}",
                    crate::maps::fmt_key(k)
                );
            }
            for (i, id) in slots.iter().enumerate() {
                self.maglev.insert(offset + i as u32, *id);
            }
            self.check();
            Ok(())
        }
        fn put_frontend(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), MapError> {
            self.write(format!("put_frontend {}", crate::maps::fmt_key(k)))?;
            self.services.insert(*k, *v);
            self.check();
            Ok(())
        }
        fn delete_frontend(&mut self, k: &ServiceKey) -> Result<(), MapError> {
            self.write(format!("delete_frontend {}", crate::maps::fmt_key(k)))?;
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

    fn id(name: &str, port_name: &str, protocol: Protocol) -> ServicePortId {
        ServicePortId {
            namespace: "default".into(),
            name: name.into(),
            port_name: port_name.into(),
            protocol,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn fe(addr: &str, port: u16, protocol: Protocol, kind: FrontendKind) -> Frontend {
        Frontend {
            addr: ip(addr),
            port,
            protocol,
            kind,
        }
    }

    fn ep(addr: &str, port: u16, pod: Option<&str>) -> Endpoint {
        Endpoint {
            addr: ip(addr),
            port,
            target: pod.map(str::to_owned),
        }
    }

    fn state(svcs: Vec<(ServicePortId, Vec<Frontend>, Vec<Endpoint>)>) -> DesiredState {
        let mut d = DesiredState::default();
        for (id, mut frontends, mut endpoints) in svcs {
            frontends.sort();
            frontends.dedup();
            endpoints.sort_by_key(|e| (e.addr, e.port));
            endpoints.dedup();
            d.services.insert(
                id,
                ServicePortState {
                    frontends,
                    endpoints,
                },
            );
        }
        d
    }

    fn web(endpoints: &[&str]) -> (ServicePortId, Vec<Frontend>, Vec<Endpoint>) {
        (
            id("web", "http", Protocol::Tcp),
            vec![
                fe("198.18.100.1", 80, Protocol::Tcp, FrontendKind::ClusterIp),
                fe(
                    "198.18.200.1",
                    80,
                    Protocol::Tcp,
                    FrontendKind::LoadBalancer,
                ),
            ],
            endpoints
                .iter()
                .enumerate()
                .map(|(i, a)| ep(a, 8080, Some(&format!("default/web-{i}"))))
                .collect(),
        )
    }

    fn dns(endpoints: &[&str]) -> (ServicePortId, Vec<Frontend>, Vec<Endpoint>) {
        (
            id("dns", "", Protocol::Udp),
            vec![fe(
                "198.18.100.10",
                53,
                Protocol::Udp,
                FrontendKind::ClusterIp,
            )],
            endpoints.iter().map(|a| ep(a, 53, None)).collect(),
        )
    }

    /// The maps hold exactly `d`: every frontend, its table with the endpoints of its
    /// family, names, VIPs, and no other frontend, backend or name.
    fn assert_maps_hold(m: &Mem, d: &DesiredState) {
        let mut want_keys = BTreeSet::new();
        let mut want_be: BTreeMap<BeKey, String> = BTreeMap::new();
        let mut want_vips: BTreeMap<[u8; 16], u32> = BTreeMap::new();
        let mut svc_ids = BTreeSet::new();
        for (sid, st) in &d.services {
            let mut ids = BTreeSet::new();
            for f in &st.frontends {
                let k = ServiceKey {
                    addr: addr_to_map(f.addr),
                    port_be: f.port.to_be(),
                    proto: f.protocol.number(),
                    _pad: 0,
                };
                want_keys.insert(k);
                *want_vips.entry(k.addr).or_default() += 1;
                let v = m
                    .services
                    .get(&k)
                    .unwrap_or_else(|| panic!("{sid}: {f:?} missing"));
                ids.insert(v.svc_id);
                assert_eq!(m.svc_meta[&v.svc_id].as_str(), sid.to_string());
                let expected = if f.kind == FrontendKind::ClusterIp {
                    SVC_F_CLUSTER_IP
                } else {
                    SVC_F_EXTERNAL
                };
                assert_eq!(v.flags, expected);
                let fam_eps: BTreeSet<SocketAddr> = st
                    .endpoints
                    .iter()
                    .filter(|e| family(&addr_to_map(e.addr)) == family(&k.addr))
                    .map(|e| SocketAddr::new(e.addr, e.port))
                    .collect();
                for e in &st.endpoints {
                    let a = addr_to_map(e.addr);
                    if family(&a) == family(&k.addr) {
                        let meta = e.target.clone().unwrap_or_else(|| e.addr.to_string());
                        want_be.insert((a, e.port.to_be()), meta);
                    }
                }
                let needed = crate::maglev::table_size(fam_eps.len());
                assert!(
                    (needed == 0 && v.maglev_size == 0)
                        || (v.maglev_size >= needed
                            && v.maglev_size <= needed * MAGLEV_SHRINK_FACTOR
                            && crate::maglev::is_prime(v.maglev_size as u64)),
                    "{sid}: table size {} for {} endpoints",
                    v.maglev_size,
                    fam_eps.len()
                );
                let in_table: BTreeSet<SocketAddr> = Mem::range(v)
                    .map(|s| {
                        let b = m.backends[&m.maglev[&s]];
                        SocketAddr::new(addr_from_map(&b.addr), u16::from_be(b.port_be))
                    })
                    .collect();
                assert_eq!(in_table, fam_eps, "{sid}: {f:?} table");
            }
            assert!(
                ids.len() <= 1,
                "{sid}: frontends with different svc_ids {ids:?}"
            );
            svc_ids.extend(ids);
        }
        let keys: BTreeSet<ServiceKey> = m.services.keys().copied().collect();
        assert_eq!(keys, want_keys, "SERVICES holds other frontends");
        let names: BTreeSet<u32> = m.svc_meta.keys().copied().collect();
        assert_eq!(names, svc_ids, "SVC_META holds other service ports");
        let be: BTreeMap<BeKey, String> = m
            .backends
            .iter()
            .map(|(id, b)| ((b.addr, b.port_be), m.be_meta[id].as_str().to_owned()))
            .collect();
        assert_eq!(be, want_be, "BACKENDS/BE_META");
        assert_eq!(
            m.be_meta.len(),
            m.backends.len(),
            "BE_META of inactive slots"
        );
        let vips: BTreeMap<[u8; 16], u32> = m.vips.iter().map(|(a, v)| (*a, v.frontends)).collect();
        assert_eq!(vips, want_vips, "VIPS");
    }

    fn apply_ok(r: &mut Reconciler<Mem>, d: &DesiredState) -> ApplyStats {
        let stats = r.apply(d).expect("apply");
        assert_maps_hold(r.writer(), d);
        stats
    }

    fn new() -> Reconciler<Mem> {
        Reconciler::adopt(Mem::default()).expect("adopt empty maps")
    }

    #[test]
    fn creates_services() {
        let mut r = new();
        let d = state(vec![
            web(&["198.18.1.1", "198.18.1.2"]),
            dns(&["198.18.1.3"]),
        ]);
        let s = apply_ok(&mut r, &d);
        assert_eq!(s.services_added, 2);
        assert_eq!(s.frontends_put, 3);
        assert_eq!(s.tables_written, 2);
        assert_eq!(s.backends_put, 3);
        // Names: the pod when known, else the address.
        let names: BTreeSet<&str> = r.writer().be_meta.values().map(|m| m.as_str()).collect();
        assert!(
            names.contains("default/web-0") && names.contains("198.18.1.3"),
            "{names:?}"
        );
    }

    #[test]
    fn identical_state_writes_nothing() {
        let mut r = new();
        let d = state(vec![web(&["198.18.1.1", "198.18.1.2"]), dns(&[])]);
        apply_ok(&mut r, &d);
        let before = r.writer().writes.len();
        let s = apply_ok(&mut r, &d);
        assert_eq!(s.writes(), 0, "{s}");
        assert_eq!(r.writer().writes.len(), before);
    }

    #[test]
    fn adopted_maps_need_no_writes() {
        let mut r = new();
        let d = state(vec![
            web(&["198.18.1.1", "198.18.1.2", "2001:db8::1"]),
            dns(&["198.18.1.3"]),
            (
                id("v6", "", Protocol::Tcp),
                vec![
                    fe(
                        "2001:db8:100::1",
                        443,
                        Protocol::Tcp,
                        FrontendKind::ClusterIp,
                    ),
                    fe("198.18.100.20", 443, Protocol::Tcp, FrontendKind::ClusterIp),
                ],
                vec![ep("2001:db8::5", 8443, None)],
            ),
        ]);
        apply_ok(&mut r, &d);
        let maps = r.writer().clone();
        let mut again = Reconciler::adopt(Mem {
            writes: Vec::new(),
            ..maps
        })
        .expect("adopt");
        assert_eq!(again.counts(), r.counts());
        let s = apply_ok(&mut again, &d);
        assert_eq!(s.writes(), 0, "{s}");
        assert!(
            again.writer().writes.is_empty(),
            "{:?}",
            again.writer().writes
        );
        // And the adopted bookkeeping changes things as well as the original would.
        let d2 = state(vec![web(&["198.18.1.2"]), dns(&["198.18.1.3"])]);
        let s = apply_ok(&mut again, &d2);
        assert_eq!(s.services_removed, 1);
    }

    #[test]
    fn scales_up_and_down() {
        let mut r = new();
        apply_ok(&mut r, &state(vec![web(&["198.18.1.1"])]));
        let s = apply_ok(
            &mut r,
            &state(vec![web(&["198.18.1.1", "198.18.1.2", "198.18.1.3"])]),
        );
        assert_eq!(
            (s.backends_put, s.tables_written, s.frontends_put),
            (2, 1, 2),
            "{s}"
        );
        assert_eq!(s.ranges_freed, 1);
        let s = apply_ok(&mut r, &state(vec![web(&["198.18.1.3"])]));
        assert_eq!(s.backends_deleted, 2, "{s}");
        assert_eq!(r.writer().backends.len(), 1);
    }

    #[test]
    fn removing_one_endpoint_keeps_the_table_size_and_moves_few_slots() {
        let ten: Vec<String> = (1..=10).map(|i| format!("198.18.1.{i}")).collect();
        let ten: Vec<&str> = ten.iter().map(String::as_str).collect();
        let mut r = new();
        apply_ok(&mut r, &state(vec![web(&ten)]));
        let before = r
            .writer()
            .services
            .values()
            .next()
            .copied()
            .expect("frontend");
        let slot_addrs = |m: &Mem, v: &ServiceValue| -> Vec<[u8; 16]> {
            Mem::range(v)
                .map(|s| m.backends[&m.maglev[&s]].addr)
                .collect()
        };
        let old = slot_addrs(r.writer(), &before);
        apply_ok(&mut r, &state(vec![web(&ten[..9])]));
        let after = r
            .writer()
            .services
            .values()
            .next()
            .copied()
            .expect("frontend");
        assert_eq!(
            after.maglev_size, before.maglev_size,
            "size kept on scale-down"
        );
        let new_slots = slot_addrs(r.writer(), &after);
        let moved = old.iter().zip(&new_slots).filter(|(a, b)| a != b).count();
        let share = moved as f64 / old.len() as f64;
        // The removed backend owned ~1/10 of the slots; little else may move.
        assert!(share < 0.1 + 0.07, "{moved} of {} slots moved", old.len());
        // Shrinking to one endpoint is far below a quarter of the table: it shrinks.
        apply_ok(&mut r, &state(vec![web(&ten[..1])]));
        let one = r
            .writer()
            .services
            .values()
            .next()
            .copied()
            .expect("frontend");
        assert_eq!(one.maglev_size, crate::maglev::table_size(1));
    }

    #[test]
    fn removes_a_service_and_frees_everything() {
        let mut r = new();
        apply_ok(
            &mut r,
            &state(vec![
                web(&["198.18.1.1"]),
                dns(&["198.18.1.1", "198.18.1.9"]),
            ]),
        );
        let s = apply_ok(&mut r, &state(vec![web(&["198.18.1.1"])]));
        assert_eq!((s.services_removed, s.frontends_deleted), (1, 1), "{s}");
        // 198.18.1.1:53 and 198.18.1.9:53 are dns-only backends (web uses port 8080).
        assert_eq!(s.backends_deleted, 2, "{s}");
        assert_eq!(s.vips_deleted, 1, "{s}");
        let s = apply_ok(&mut r, &state(vec![]));
        assert_eq!(s.services_removed, 1);
        let m = r.writer();
        assert!(m.services.is_empty() && m.backends.is_empty() && m.svc_meta.is_empty());
        assert!(m.vips.is_empty() && m.be_meta.is_empty());
    }

    #[test]
    fn changes_ports() {
        let mut r = new();
        apply_ok(&mut r, &state(vec![web(&["198.18.1.1"])]));
        let svc_id = r.writer().services.values().next().map(|v| v.svc_id);
        let (sid, _, eps) = web(&["198.18.1.1"]);
        let d = state(vec![(
            sid,
            vec![fe(
                "198.18.100.1",
                8080,
                Protocol::Tcp,
                FrontendKind::ClusterIp,
            )],
            eps,
        )]);
        let s = apply_ok(&mut r, &d);
        assert_eq!((s.frontends_put, s.frontends_deleted), (1, 2), "{s}");
        assert_eq!(s.tables_written, 0, "the endpoints did not change: {s}");
        assert_eq!(
            r.writer().services.values().next().map(|v| v.svc_id),
            svc_id
        );
    }

    #[test]
    fn dual_stack_tables_hold_one_family_each() {
        let mut r = new();
        let d = state(vec![(
            id("ds", "", Protocol::Tcp),
            vec![
                fe("198.18.100.1", 80, Protocol::Tcp, FrontendKind::ClusterIp),
                fe(
                    "2001:db8:100::1",
                    80,
                    Protocol::Tcp,
                    FrontendKind::ClusterIp,
                ),
            ],
            vec![
                ep("198.18.1.1", 80, None),
                ep("198.18.1.2", 80, None),
                ep("2001:db8::1", 80, None),
            ],
        )]);
        apply_ok(&mut r, &d);
        let vals: Vec<ServiceValue> = r.writer().services.values().copied().collect();
        assert_eq!(vals.len(), 2);
        assert_eq!(vals[0].svc_id, vals[1].svc_id);
        assert_ne!(vals[0].maglev_offset, vals[1].maglev_offset);
        // A family without endpoints refuses (size 0) while the other keeps working.
        let d = state(vec![(
            id("ds", "", Protocol::Tcp),
            vec![
                fe("198.18.100.1", 80, Protocol::Tcp, FrontendKind::ClusterIp),
                fe(
                    "2001:db8:100::1",
                    80,
                    Protocol::Tcp,
                    FrontendKind::ClusterIp,
                ),
            ],
            vec![ep("198.18.1.1", 80, None)],
        )]);
        apply_ok(&mut r, &d);
        let v6 = r
            .writer()
            .services
            .iter()
            .find(|(k, _)| family(&k.addr) == V6);
        assert_eq!(v6.map(|(_, v)| v.maglev_size), Some(0));
    }

    #[test]
    fn no_endpoints_means_size_zero() {
        let mut r = new();
        apply_ok(&mut r, &state(vec![dns(&[])]));
        assert!(r.writer().services.values().all(|v| v.maglev_size == 0));
        assert!(r.writer().maglev.is_empty());
        apply_ok(&mut r, &state(vec![dns(&["198.18.1.1"])]));
        apply_ok(&mut r, &state(vec![dns(&[])]));
        assert!(r.writer().backends.is_empty());
    }

    #[test]
    fn freed_backend_id_is_not_reused_in_the_same_apply() {
        let mut r = new();
        apply_ok(&mut r, &state(vec![dns(&["198.18.1.1"])]));
        let old: Vec<u32> = r.writer().backends.keys().copied().collect();
        apply_ok(&mut r, &state(vec![dns(&["198.18.1.2"])]));
        let new: Vec<u32> = r.writer().backends.keys().copied().collect();
        assert_eq!(old.len(), 1);
        assert_eq!(new.len(), 1);
        assert_ne!(
            old, new,
            "a flow pinned to the old id would reach the new pod"
        );
    }

    #[test]
    fn frontend_moves_between_services() {
        let mut r = new();
        let a = |eps: &[&str]| {
            (
                id("a", "", Protocol::Tcp),
                vec![fe(
                    "198.18.100.1",
                    80,
                    Protocol::Tcp,
                    FrontendKind::ClusterIp,
                )],
                eps.iter().map(|e| ep(e, 80, None)).collect::<Vec<_>>(),
            )
        };
        apply_ok(&mut r, &state(vec![a(&["198.18.1.1"])]));
        let (_, f, e) = a(&["198.18.1.2"]);
        apply_ok(&mut r, &state(vec![(id("b", "", Protocol::Tcp), f, e)]));
    }

    #[test]
    fn exhausted_maglev_slots_fail_only_that_service() {
        let limits = Limits {
            maglev_slots: 250,
            ..Limits::default()
        };
        let mut r = Reconciler::adopt_with_limits(Mem::default(), limits).expect("adopt");
        let svc = |name: &str, vip: &str, be: &str| {
            (
                id(name, "", Protocol::Tcp),
                vec![fe(vip, 80, Protocol::Tcp, FrontendKind::ClusterIp)],
                vec![ep(be, 80, None)],
            )
        };
        let ab = state(vec![
            svc("a", "198.18.100.1", "198.18.1.1"),
            svc("b", "198.18.100.2", "198.18.1.2"),
        ]);
        apply_ok(&mut r, &ab);
        let before = r.writer().clone();
        let abc = state(vec![
            svc("a", "198.18.100.1", "198.18.1.1"),
            svc("b", "198.18.100.2", "198.18.1.2"),
            svc("c", "198.18.100.3", "198.18.1.3"),
        ]);
        let err = r.apply(&abc).expect_err("250 slots hold two tables of 101");
        let ReconcileError::ServicesNotApplied { failures, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].service, "default/c:-/TCP");
        assert!(matches!(
            failures[0].shortage,
            Shortage::MaglevSlots { needed: 101 }
        ));
        assert!(err.to_string().contains("default/c:-/TCP"), "{err}");
        assert_maps_hold(r.writer(), &ab);
        assert_eq!(r.writer().services, before.services, "a and b untouched");
        // Removing b frees its range for the next apply.
        let ac = state(vec![
            svc("a", "198.18.100.1", "198.18.1.1"),
            svc("c", "198.18.100.3", "198.18.1.3"),
        ]);
        let _ = r.apply(&ac);
        apply_ok(&mut r, &ac);
    }

    #[test]
    fn exhausted_ids_fail_only_that_service() {
        let limits = Limits {
            services: 1,
            backends: 2,
            ..Limits::default()
        };
        let mut r = Reconciler::adopt_with_limits(Mem::default(), limits).expect("adopt");
        let d = state(vec![dns(&["198.18.1.1"]), web(&["198.18.1.2"])]);
        let err = r.apply(&d).expect_err("one service id");
        let ReconcileError::ServicesNotApplied { failures, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(failures[0].service, "default/web:http/TCP");
        assert_eq!(failures[0].shortage, Shortage::ServiceIds);
        assert_maps_hold(r.writer(), &state(vec![dns(&["198.18.1.1"])]));

        let mut r = Reconciler::adopt_with_limits(
            Mem::default(),
            Limits {
                backends: 2,
                ..Limits::default()
            },
        )
        .expect("adopt");
        let d = state(vec![
            dns(&["198.18.1.1"]),
            web(&["198.18.1.2", "198.18.1.3"]),
        ]);
        let err = r.apply(&d).expect_err("two backend ids");
        let ReconcileError::ServicesNotApplied { failures, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(failures[0].service, "default/web:http/TCP");
        assert!(matches!(
            failures[0].shortage,
            Shortage::BackendIds { needed: 2, free: 1 }
        ));
        assert_maps_hold(r.writer(), &state(vec![dns(&["198.18.1.1"])]));
    }

    #[test]
    fn failed_write_is_recovered_by_the_next_apply() {
        for fail_at in 0..12 {
            let mut r = new();
            apply_ok(
                &mut r,
                &state(vec![web(&["198.18.1.1"]), dns(&["198.18.1.5"])]),
            );
            let n = r.writer().writes.len();
            r.writer_mut().fail_at = Some(n + fail_at);
            let d = state(vec![web(&["198.18.1.2", "198.18.1.3"])]);
            let res = r.apply(&d);
            if res.is_ok() {
                // Fewer writes than fail_at: nothing failed.
                assert_maps_hold(r.writer(), &d);
                continue;
            }
            assert!(matches!(res, Err(ReconcileError::Map(_))), "{res:?}");
            apply_ok(&mut r, &d);
        }
    }

    #[test]
    fn large_state_applies_once_and_then_writes_nothing() {
        let n = 3000;
        let d = state(
            (0..n)
                .map(|i| {
                    let (a, b) = ((i / 250) as u8, (i % 250) as u8);
                    (
                        id(&format!("svc{i}"), "", Protocol::Tcp),
                        vec![
                            fe(
                                &format!("198.18.{a}.{b}"),
                                80,
                                Protocol::Tcp,
                                FrontendKind::ClusterIp,
                            ),
                            fe(
                                &format!("198.19.{a}.{b}"),
                                80,
                                Protocol::Tcp,
                                FrontendKind::ExternalIp,
                            ),
                        ],
                        (0..3)
                            .map(|j| {
                                ep(&format!("198.19.{}.{}", 200 + j, b), 8000 + a as u16, None)
                            })
                            .collect(),
                    )
                })
                .collect(),
        );
        let mem = Mem {
            unchecked: true,
            ..Mem::default()
        };
        let mut r = Reconciler::adopt(mem).expect("adopt");
        let t = std::time::Instant::now();
        let s = r.apply(&d).expect("apply");
        assert_eq!(s.services_added, n);
        assert_eq!(s.frontends_put, 2 * n);
        let first = t.elapsed();
        let t = std::time::Instant::now();
        assert_eq!(r.apply(&d).expect("re-apply").writes(), 0);
        let again = t.elapsed();
        // Generous bounds: this guards against quadratic work, not for speed.
        assert!(
            first.as_secs() < 30 && again.as_secs() < 10,
            "{first:?} {again:?}"
        );
        let m = r.writer().clone();
        let mut adopted = Reconciler::adopt(Mem {
            writes: Vec::new(),
            ..m
        })
        .expect("adopt");
        assert_eq!(adopted.apply(&d).expect("apply").writes(), 0);
    }

    /// `n` service ports `svcN`, one ClusterIP each, two endpoints each; the first
    /// endpoint of every port is shared with the next port.
    fn many(n: usize, extra: Option<(usize, &str)>) -> DesiredState {
        state(
            (0..n)
                .map(|i| {
                    let mut eps = vec![
                        ep(&format!("198.18.2.{i}"), 80, None),
                        ep(&format!("198.18.2.{}", i + 1), 80, None),
                    ];
                    if let Some((j, addr)) = extra {
                        if j == i {
                            eps.push(ep(addr, 80, None));
                        }
                    }
                    (
                        id(&format!("svc{i:02}"), "", Protocol::Tcp),
                        vec![fe(
                            &format!("198.18.100.{i}"),
                            80,
                            Protocol::Tcp,
                            FrontendKind::ClusterIp,
                        )],
                        eps,
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn a_change_to_one_service_among_many_diffs_and_writes_only_it() {
        let mut r = new();
        let d = many(40, None);
        let s = apply_ok(&mut r, &d);
        assert_eq!(s.ports_diffed, 40);
        let s = apply_ok(&mut r, &d);
        assert_eq!((s.ports_diffed, s.writes()), (0, 0), "{s}");

        let before = r.writer().writes.len();
        let changed = many(40, Some((7, "198.18.3.1")));
        let s = apply_ok(&mut r, &changed);
        assert_eq!(s.ports_diffed, 1, "{s}");
        let key7 = ServiceKey {
            addr: addr_to_map(ip("198.18.100.7")),
            port_be: 80u16.to_be(),
            proto: lb_common::PROTO_TCP,
            _pad: 0,
        };
        let svc7 = r.writer().services[&key7];
        let writes = &r.writer().writes[before..];
        // New backend, new table, svc07's frontend switched to it: nothing else.
        assert_eq!(writes.len(), 3, "{writes:?}");
        assert!(writes[0].starts_with("put_backend "), "{writes:?}");
        assert_eq!(
            writes[1],
            format!("put_maglev {}+{}", svc7.maglev_offset, svc7.maglev_size)
        );
        assert_eq!(
            writes[2],
            format!("put_frontend {}", crate::maps::fmt_key(&key7))
        );

        // Removing svc08 keeps the backend it shares with svc07 (198.18.2.8) and
        // deletes only the one nobody else names (198.18.2.9 is svc09's too: kept).
        let mut fewer = changed.clone();
        fewer.services.remove(&id("svc08", "", Protocol::Tcp));
        let s = apply_ok(&mut r, &fewer);
        assert_eq!(s.ports_diffed, 0, "{s}");
        assert_eq!(
            (s.services_removed, s.frontends_deleted, s.backends_deleted),
            (1, 1, 0),
            "{s}"
        );
        let mut fewer2 = fewer.clone();
        fewer2.services.remove(&id("svc07", "", Protocol::Tcp));
        let s = apply_ok(&mut r, &fewer2);
        // 198.18.2.8 and 198.18.3.1 were svc07's alone now; 198.18.2.7 is svc06's too.
        assert_eq!((s.ports_diffed, s.backends_deleted), (0, 2), "{s}");
        assert_eq!(apply_ok(&mut r, &fewer2).writes(), 0);
    }

    #[test]
    fn frontend_moves_from_an_otherwise_unchanged_service() {
        let mut r = new();
        let svc = |name: &str, vips: &[&str], be: &str| {
            (
                id(name, "", Protocol::Tcp),
                vips.iter()
                    .map(|v| fe(v, 80, Protocol::Tcp, FrontendKind::ClusterIp))
                    .collect::<Vec<_>>(),
                vec![ep(be, 80, None)],
            )
        };
        let d = state(vec![
            svc("a", &["198.18.100.1", "198.18.100.2"], "198.18.1.1"),
            svc("b", &["198.18.100.3"], "198.18.1.2"),
        ]);
        apply_ok(&mut r, &d);
        // a gives 198.18.100.2 to b; a's endpoints stay as they are.
        let moved = state(vec![
            svc("a", &["198.18.100.1"], "198.18.1.1"),
            svc("b", &["198.18.100.2", "198.18.100.3"], "198.18.1.2"),
        ]);
        let s = apply_ok(&mut r, &moved);
        assert_eq!(
            (s.ports_diffed, s.frontends_put, s.frontends_deleted),
            (2, 1, 0),
            "{s}"
        );
        assert_eq!(apply_ok(&mut r, &moved).writes(), 0);

        // A new port "0" claims b's frontend while b is unchanged: as in a full diff the
        // first by name keeps it, and b, pulled into the diff, is the one refused.
        let mut claim = moved.clone();
        let (cid, cf, ce) = svc("0", &["198.18.100.3"], "198.18.1.3");
        claim.services.insert(
            cid,
            ServicePortState {
                frontends: cf,
                endpoints: ce,
            },
        );
        for _ in 0..2 {
            let err = r.apply(&claim).expect_err("b conflicts with 0");
            let ReconcileError::ServicesNotApplied { failures, stats } = &err else {
                panic!("{err}");
            };
            assert_eq!(failures.len(), 1, "{err}");
            assert_eq!(failures[0].service, "default/b:-/TCP");
            assert!(matches!(
                failures[0].shortage,
                Shortage::FrontendConflict { .. }
            ));
            assert!(stats.ports_diffed >= 1, "{stats}");
            let m = r.writer();
            let owner = |vip: &str| {
                let k = ServiceKey {
                    addr: addr_to_map(ip(vip)),
                    port_be: 80u16.to_be(),
                    proto: lb_common::PROTO_TCP,
                    _pad: 0,
                };
                m.svc_meta[&m.services[&k].svc_id].as_str().to_owned()
            };
            assert_eq!(owner("198.18.100.3"), "default/0:-/TCP");
            assert_eq!(owner("198.18.100.2"), "default/b:-/TCP");
            assert_eq!(owner("198.18.100.1"), "default/a:-/TCP");
        }
    }

    #[test]
    fn failed_service_is_retried_although_its_desired_state_did_not_change() {
        let limits = Limits {
            backends: 2,
            ..Limits::default()
        };
        let mut r = Reconciler::adopt_with_limits(Mem::default(), limits).expect("adopt");
        apply_ok(&mut r, &state(vec![dns(&["198.18.1.1"])]));
        // web needs two more backend ids: one is free.
        let d = state(vec![
            dns(&["198.18.1.1"]),
            web(&["198.18.1.2", "198.18.1.3"]),
        ]);
        let err = r.apply(&d).expect_err("two backend ids");
        let ReconcileError::ServicesNotApplied { failures, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(failures[0].service, "default/web:http/TCP");
        // dns lets go of its endpoint; the id is freed at the end of this apply, after
        // web was refused again.
        let d = state(vec![dns(&[]), web(&["198.18.1.2", "198.18.1.3"])]);
        let err = r.apply(&d).expect_err("the id is freed after web's turn");
        let ReconcileError::ServicesNotApplied { failures, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(failures[0].service, "default/web:http/TCP");
        // Same desired state: only web, which failed, is diffed, and now it fits.
        let s = apply_ok(&mut r, &d);
        assert_eq!((s.ports_diffed, s.services_added), (1, 1), "{s}");
        assert_eq!(apply_ok(&mut r, &d).ports_diffed, 0);
    }

    #[test]
    fn apply_after_adopt_diffs_everything() {
        let mut r = new();
        let d = state(vec![
            web(&["198.18.1.1", "198.18.1.2"]),
            dns(&["198.18.1.3"]),
        ]);
        apply_ok(&mut r, &d);
        // Someone (a crash mid-apply, an operator) removed a frontend behind our back.
        let mut maps = r.writer().clone();
        maps.writes.clear();
        let k = *maps.services.keys().next().expect("a frontend");
        maps.services.remove(&k);
        let mut adopted = Reconciler::adopt(maps).expect("adopt");
        let s = apply_ok(&mut adopted, &d);
        assert_eq!((s.ports_diffed, s.frontends_put), (2, 1), "{s}");
        let s = apply_ok(&mut adopted, &d);
        assert_eq!((s.ports_diffed, s.writes()), (0, 0), "{s}");
        // The same after a failed write: the maps are re-read and everything diffed.
        adopted.writer_mut().services.remove(&k);
        let n = adopted.writer().writes.len();
        adopted.writer_mut().fail_at = Some(n);
        let d2 = state(vec![web(&["198.18.1.1"]), dns(&["198.18.1.3"])]);
        assert!(matches!(adopted.apply(&d2), Err(ReconcileError::Map(_))));
        let s = apply_ok(&mut adopted, &d2);
        assert_eq!(s.ports_diffed, 2, "{s}");
    }

    #[test]
    fn allocators_coalesce_and_fit_first() {
        let mut a = RangeAlloc::new(1000);
        let x = a.alloc(101).expect("x");
        let y = a.alloc(101).expect("y");
        let z = a.alloc(101).expect("z");
        assert_eq!((x, y, z), (0, 101, 202));
        a.release(x, 101);
        a.release(y, 101);
        assert_eq!(a.alloc(202), Some(0), "x and y coalesced");
        a.release(0, 202);
        a.release(z, 101);
        assert_eq!(a.free.len(), 1, "{:?}", a.free);
        assert_eq!(a.alloc(1000), Some(0));
        assert_eq!(a.alloc(1), None);

        let mut ids = IdAlloc::with_used(4, [0, 2]);
        assert_eq!(ids.available(), 2);
        assert_eq!(ids.alloc(), Some(1));
        assert_eq!(ids.alloc(), Some(3));
        assert_eq!(ids.alloc(), None);
    }
}
