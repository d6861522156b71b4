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
//! Tables are per (service port, address family, scope): a frontend only ever reaches
//! endpoints of its own family, because the data path cannot translate between IPv4 and
//! IPv6, and a `Local` frontend (`externalTrafficPolicy` / `internalTrafficPolicy: Local`)
//! only this node's endpoints. A table exists only while some frontend uses it.
//!
//! Endpoints of a port that are in none of its tables (draining ones, and remote ones of a
//! port whose frontends are all `Local`) keep their BACKENDS slot, so that established
//! flows keep their pod; a backend is removed once no port lists it any more.
//!
//! `loadBalancerSourceRanges` go to SRC_RANGES before a frontend gets
//! `SVC_F_SOURCE_RANGES`, and are removed only after the frontends stopped using them.
//! ClientIP affinity entries (AFFINITY, written by the programs) of a port are deleted
//! after its frontends switched away from a backend (all of them when the port goes or
//! loses affinity), so that neither a leaving pod nor a later owner of its backend id
//! inherits them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use lb_common::{
    is_v4_mapped, Backend, NameMeta, ServiceKey, ServiceValue, VipInfo, BACKEND_F_ACTIVE,
    MAGLEV_SLOTS, MAX_BACKENDS, MAX_FRONTENDS, MAX_SERVICES, MAX_VIPS, SVC_F_AFFINITY,
    SVC_F_CLUSTER_IP, SVC_F_DROP_IF_EMPTY, SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_NODE_PORT,
    SVC_F_SOURCE_RANGES,
};

use crate::maps::{addr_from_map, addr_to_map, MapError, MapWriter, SrcRange};
use crate::model::{DesiredState, Endpoint, FrontendKind, ServicePortId, ServicePortState};

/// Capacities the allocators keep to. [`Limits::default`] are the map sizes in lb-common;
/// tests use small ones to reach exhaustion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub services: u32,
    pub backends: u32,
    pub maglev_slots: u32,
    pub frontends: u32,
    pub vips: u32,
    pub src_ranges: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            services: MAX_SERVICES,
            backends: MAX_BACKENDS,
            maglev_slots: MAGLEV_SLOTS,
            frontends: MAX_FRONTENDS,
            vips: MAX_VIPS,
            src_ranges: lb_common::MAX_SRC_RANGES,
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
    /// SRC_RANGES cannot hold the port's `loadBalancerSourceRanges` as well.
    SourceRanges {
        needed: usize,
    },
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
            Shortage::SourceRanges { needed } => {
                write!(f, "SRC_RANGES cannot take {needed} more source ranges")
            }
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
        /// Boxed: it would make every `Result` of the reconciler large.
        stats: Box<ApplyStats>,
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
    pub src_ranges_put: usize,
    pub src_ranges_deleted: usize,
    /// AFFINITY entries deleted (a backend left a port's tables, or the port went).
    pub affinity_deleted: usize,
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
            + self.src_ranges_put
            + self.src_ranges_deleted
            + self.affinity_deleted
    }
}

impl fmt::Display for ApplyStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "services +{} -{}, frontends put {} deleted {}, tables {} ({} slots, {} ranges freed), \
             backends put {} deleted {}, vips put {} deleted {}, source ranges put {} deleted {}, \
             affinity entries deleted {}",
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
            self.vips_deleted,
            self.src_ranges_put,
            self.src_ranges_deleted,
            self.affinity_deleted
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
/// enough (>= the rung `n` needs, see `maglev::table_size`) and not wastefully large (at
/// most two rungs above it). Maglev only remaps little more than 1/N of the slots when one
/// of N backends changes if the table keeps its size; a new size reshuffles nearly every
/// slot, so new flows of unchanged backends would land elsewhere. Growing past a rung
/// cannot avoid that; shrinking waits until the table is 4x larger than needed.
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

/// Table scopes; also the data path's `AffinityKey::scope`.
const CLUSTER: usize = 0;
const LOCAL: usize = 1;
/// Tables per service port: one per (family, scope).
const NT: usize = 4;

fn tix(fam: usize, scope: usize) -> usize {
    fam * 2 + scope
}

fn scope_of(flags: u32) -> usize {
    if flags & SVC_F_LOCAL != 0 {
        LOCAL
    } else {
        CLUSTER
    }
}

/// The table a frontend uses.
fn fe_table(k: &ServiceKey, flags: u32) -> usize {
    tix(family(&k.addr), scope_of(flags))
}

fn be_key(e: &Endpoint) -> BeKey {
    (addr_to_map(e.addr), e.port.to_be())
}

/// BE_META name: the pod when known, else the address (an IPv4-mapped one as IPv4).
fn be_meta(e: &Endpoint) -> String {
    e.target
        .clone()
        .unwrap_or_else(|| addr_from_map(&addr_to_map(e.addr)).to_string())
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
    /// By [`tix`].
    tables: [Option<Table>; NT],
    /// Ranges found in the maps besides the tables (a switch interrupted by a crash);
    /// freed at the next rebuild of this service.
    leftover_ranges: Vec<(u32, u32)>,
    /// Listed endpoints in none of the tables: their backends stay for established flows.
    /// Not in the maps as such (a backend is a backend): empty after adopting, until the
    /// first apply, which diffs every port.
    kept: BTreeSet<BeKey>,
    /// SRC_RANGES entries under `svc_id`.
    src_ranges: BTreeSet<SrcRange>,
}

impl SvcState {
    fn new(svc_id: u32) -> Self {
        Self {
            svc_id,
            frontends: BTreeMap::new(),
            tables: Default::default(),
            leftover_ranges: Vec::new(),
            kept: BTreeSet::new(),
            src_ranges: BTreeSet::new(),
        }
    }

    fn has_affinity(&self) -> bool {
        self.frontends
            .values()
            .any(|v| v.flags & SVC_F_AFFINITY != 0)
    }

    /// Backend ids of the tables of each scope: where the programs may have pinned an
    /// affinity entry.
    fn ids_by_scope(&self) -> [BTreeSet<u32>; 2] {
        let mut out: [BTreeSet<u32>; 2] = Default::default();
        for (ti, t) in self.tables.iter().enumerate() {
            if let Some(t) = t {
                out[ti % 2].extend(t.ids.iter().copied());
            }
        }
        out
    }
}

#[derive(Clone, Debug)]
struct BeState {
    key: BeKey,
    meta: String,
}

/// A service port of the desired state, in map terms.
#[derive(Default)]
struct Wanted {
    /// The SERVICES value without svc_id and table (filled in at the switch).
    frontends: BTreeMap<ServiceKey, ServiceValue>,
    /// Per [`tix`] with at least one frontend: endpoint → BE_META name.
    tables: [Option<BTreeMap<BeKey, String>>; NT],
    /// Listed endpoints of a family with frontends that are in none of the tables.
    kept: BTreeMap<BeKey, String>,
    /// `loadBalancerSourceRanges`, when some frontend uses them.
    src_ranges: Vec<crate::model::Prefix>,
}

impl Wanted {
    fn of(st: &ServicePortState) -> Self {
        let mut w = Wanted::default();
        // Endpoints per family: "no local endpoint" drops only while the service has
        // endpoints elsewhere; with none at all it refuses, as kube-proxy does.
        let mut cluster_any = [false; 2];
        for e in &st.endpoints {
            cluster_any[family(&addr_to_map(e.addr))] = true;
        }
        let mut local_any = [false; 2];
        for e in &st.local_endpoints {
            local_any[family(&addr_to_map(e.addr))] = true;
        }
        for f in &st.frontends {
            let key = frontend_key(f);
            let fam = family(&key.addr);
            let mut flags = match f.kind {
                FrontendKind::ClusterIp => SVC_F_CLUSTER_IP,
                FrontendKind::LoadBalancer | FrontendKind::ExternalIp => SVC_F_EXTERNAL,
                FrontendKind::NodePort => SVC_F_EXTERNAL | SVC_F_NODE_PORT,
            };
            if st.frontend_is_local(f.kind) {
                flags |= SVC_F_LOCAL;
                if !local_any[fam] && cluster_any[fam] {
                    flags |= SVC_F_DROP_IF_EMPTY;
                }
            }
            if st.affinity_timeout_s.is_some() {
                flags |= SVC_F_AFFINITY;
            }
            if f.kind == FrontendKind::LoadBalancer && !st.source_ranges.is_empty() {
                flags |= SVC_F_SOURCE_RANGES;
            }
            let v = w.frontends.entry(key).or_insert(ServiceValue {
                affinity_timeout_s: st.affinity_timeout_s.unwrap_or(0),
                ..Default::default()
            });
            v.flags |= flags;
        }
        let mut fams = [false; 2];
        for (k, v) in &w.frontends {
            w.tables[fe_table(k, v.flags)].get_or_insert_with(BTreeMap::new);
            fams[family(&k.addr)] = true;
        }
        for (eps, scope) in [(&st.endpoints, CLUSTER), (&st.local_endpoints, LOCAL)] {
            for e in eps {
                let k = be_key(e);
                if let Some(t) = &mut w.tables[tix(family(&k.0), scope)] {
                    t.entry(k).or_insert_with(|| be_meta(e));
                }
            }
        }
        for e in st
            .endpoints
            .iter()
            .chain(&st.local_endpoints)
            .chain(&st.draining)
        {
            let k = be_key(e);
            let fam = family(&k.0);
            let in_table = [CLUSTER, LOCAL].iter().any(|s| {
                w.tables[tix(fam, *s)]
                    .as_ref()
                    .is_some_and(|t| t.contains_key(&k))
            });
            if fams[fam] && !in_table {
                w.kept.entry(k).or_insert_with(|| be_meta(e));
            }
        }
        if w.frontends
            .values()
            .any(|v| v.flags & SVC_F_SOURCE_RANGES != 0)
        {
            w.src_ranges = st.source_ranges.clone();
        }
        w
    }
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
        // Ranges of an id nobody names are an orphan's: removed by the next apply.
        let mut ranges: BTreeMap<u32, BTreeSet<SrcRange>> = BTreeMap::new();
        for r in &snap.src_ranges {
            by_id.entry(r.svc_id).or_default();
            ranges.entry(r.svc_id).or_default().insert(*r);
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
            let mut tables: [Option<Table>; NT] = Default::default();
            let mut leftover = Vec::new();
            for (k, v) in &frontends {
                let range = (v.maglev_offset, v.maglev_size);
                match &mut tables[fe_table(k, v.flags)] {
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
            for (ti, t) in tables.iter_mut().enumerate() {
                let fam = ti / 2;
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
                    frontends,
                    tables,
                    leftover_ranges: keep_leftover,
                    src_ranges: ranges.remove(&svc_id).unwrap_or_default(),
                    ..SvcState::new(svc_id)
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
        let r = self.apply_inner(&sub, &keep, applied.is_none());
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
        full: bool,
    ) -> Result<ApplyStats, ReconcileError> {
        let mut stats = ApplyStats {
            ports_diffed: sub.len(),
            ..ApplyStats::default()
        };
        let mut failures: Vec<ServiceFailure> = Vec::new();

        // Desired state in map terms; a frontend claimed twice stays with the first.
        let mut wanted: BTreeMap<String, Wanted> = BTreeMap::new();
        let mut claimed: BTreeMap<ServiceKey, String> = BTreeMap::new();
        // Backends each port wants kept for established flows, also if the port fails: a
        // refused port keeps its old state, whose flows may use them.
        let mut desired_kept: BTreeMap<String, Vec<BeKey>> = BTreeMap::new();
        'svc: for (id, st) in sub {
            let name = id.to_string();
            let w = Wanted::of(st);
            desired_kept.insert(name.clone(), w.kept.keys().copied().collect());
            for key in w.frontends.keys() {
                if let Some(other) = claimed.get(key) {
                    if *other != name {
                        failures.push(ServiceFailure {
                            service: name,
                            shortage: Shortage::FrontendConflict {
                                frontend: crate::maps::fmt_key(key),
                                other: other.clone(),
                            },
                        });
                        continue 'svc;
                    }
                }
            }
            for k in w.frontends.keys() {
                claimed.insert(*k, name.clone());
            }
            wanted.insert(name, w);
        }

        // Capacity of SERVICES, VIPS and SRC_RANGES at the peak (before removals).
        let mut n_frontends: usize = self.services.values().map(|s| s.frontends.len()).sum();
        let mut n_vips = self.vips.len();
        let mut n_ranges: usize = self.services.values().map(|s| s.src_ranges.len()).sum();
        let current_keys: BTreeSet<ServiceKey> = self
            .services
            .values()
            .flat_map(|s| s.frontends.keys().copied())
            .collect();
        let mut new_vips: BTreeSet<[u8; 16]> = BTreeSet::new();
        let names: Vec<String> = wanted.keys().cloned().collect();
        for name in &names {
            let w = &wanted[name];
            let add: Vec<(&ServiceKey, &ServiceValue)> = w
                .frontends
                .iter()
                .filter(|(k, _)| !current_keys.contains(k))
                .collect();
            // NodePorts are on host addresses, which are not VIPs (see `is_vip`).
            let vips: BTreeSet<[u8; 16]> = add
                .iter()
                .filter(|(_, v)| is_vip(v.flags))
                .map(|(k, _)| k.addr)
                .filter(|a| !self.vips.contains_key(a) && !new_vips.contains(a))
                .collect();
            // Compared without the svc_id, which a new port does not have yet.
            let have: BTreeSet<SrcRange> = self
                .services
                .get(name)
                .map(|s| {
                    s.src_ranges
                        .iter()
                        .map(|r| SrcRange { svc_id: 0, ..*r })
                        .collect()
                })
                .unwrap_or_default();
            let new_ranges = w
                .src_ranges
                .iter()
                .map(|p| SrcRange::new(0, p))
                .collect::<BTreeSet<_>>()
                .difference(&have)
                .count();
            let shortage = if n_frontends + add.len() > self.limits.frontends as usize {
                Some(Shortage::Frontends)
            } else if n_vips + vips.len() > self.limits.vips as usize {
                Some(Shortage::Vips)
            } else if n_ranges + new_ranges > self.limits.src_ranges as usize {
                Some(Shortage::SourceRanges { needed: new_ranges })
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
            n_ranges += new_ranges;
            new_vips.extend(vips);
        }

        // 1. Backends: new ones (in tables or kept for flows), and changed names. Written
        // together after the loop (one batch per map, see `MapWriter::put_backends`); the
        // bookkeeping runs ahead of the maps only until then, and a failed write makes the
        // next apply re-read the maps anyway.
        let mut meta_done: BTreeSet<BeKey> = BTreeSet::new();
        let mut be_writes: Vec<(u32, Backend, NameMeta)> = Vec::new();
        for name in &names {
            let Some(w) = wanted.get(name) else { continue };
            let mut need: BTreeMap<BeKey, String> = BTreeMap::new();
            for t in w.tables.iter().flatten().chain([&w.kept]) {
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
                            be_writes.push((id, b, NameMeta::new(m)));
                            st.meta = m.clone();
                        }
                    }
                    None => {
                        let Some(id) = self.be_ids.alloc() else {
                            // Counted above; cannot happen.
                            continue;
                        };
                        be_writes.push((id, b, NameMeta::new(m)));
                        self.stale_be_meta.remove(&id);
                        self.be_by_key.insert(*k, id);
                        self.backends.insert(
                            id,
                            BeState {
                                key: *k,
                                meta: m.clone(),
                            },
                        );
                    }
                }
            }
        }
        self.writer.put_backends(&be_writes)?;
        stats.backends_put += be_writes.len();

        // 2. Tables: a new range for every changed (service port, family, scope).
        let mut new_tables: BTreeMap<String, [Option<Table>; NT]> = BTreeMap::new();
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
            let mut out: [Option<Table>; NT] = Default::default();
            let mut failed = None;
            for (ti, want) in w.tables.iter().enumerate() {
                let Some(want) = want else { continue };
                let members: BTreeSet<BeKey> = want.keys().copied().collect();
                let cur_t = cur.and_then(|s| s.tables[ti].as_ref());
                let size = if members.is_empty() {
                    0
                } else {
                    stable_maglev_size(members.len(), cur_t.map(|t| t.size))
                };
                let unchanged =
                    cur_t.is_some_and(|t| !t.dirty && t.size == size && t.members == members);
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
                out[ti] = Some(Table {
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

        // Final frontends: wanted ones, plus the current ones of services that failed;
        // whether each counts in VIPS.
        let mut final_fe: BTreeMap<ServiceKey, (String, bool)> = BTreeMap::new();
        for (name, w) in &wanted {
            for (k, v) in &w.frontends {
                final_fe.insert(*k, (name.clone(), is_vip(v.flags)));
            }
        }
        for f in &failures {
            if let Some(s) = self.services.get(&f.service) {
                for (k, v) in &s.frontends {
                    final_fe
                        .entry(*k)
                        .or_insert_with(|| (f.service.clone(), is_vip(v.flags)));
                }
            }
        }
        let mut final_vips: BTreeMap<[u8; 16], u32> = BTreeMap::new();
        for (k, (_, vip)) in &final_fe {
            if *vip {
                *final_vips.entry(k.addr).or_insert(0) += 1;
            }
        }
        // Unchanged ports keep their frontends; none is claimed by a diffed port (`apply`
        // pulled such holders into the diff), so they are counted without a copy.
        for name in keep {
            if let Some(s) = self.services.get(name) {
                for (k, v) in &s.frontends {
                    if is_vip(v.flags) && !final_fe.contains_key(k) {
                        *final_vips.entry(k.addr).or_insert(0) += 1;
                    }
                }
            }
        }

        // 3. Names, source ranges, VIPs, then frontends.
        let metas: Vec<(u32, NameMeta)> = new_svc_ids
            .iter()
            .filter(|(name, _)| wanted.contains_key(*name))
            .map(|(name, id)| (*id, NameMeta::new(name)))
            .collect();
        self.writer.put_svc_metas(&metas)?;
        for (name, id) in &new_svc_ids {
            if wanted.contains_key(name) {
                stats.services_added += 1;
                self.services.insert(name.clone(), SvcState::new(*id));
            }
        }
        // New prefixes before any frontend is flagged to check them; prefixes no longer
        // wanted go only after the frontends switched (step 4).
        let mut ranges_wanted: BTreeMap<&str, BTreeSet<SrcRange>> = BTreeMap::new();
        for (name, w) in &wanted {
            let Some(s) = self.services.get_mut(name) else {
                continue;
            };
            let want: BTreeSet<SrcRange> = w
                .src_ranges
                .iter()
                .map(|p| SrcRange::new(s.svc_id, p))
                .collect();
            for r in &want {
                if !s.src_ranges.contains(r) {
                    self.writer.put_src_range(r)?;
                    s.src_ranges.insert(*r);
                    stats.src_ranges_put += 1;
                }
            }
            ranges_wanted.insert(name.as_str(), want);
        }
        let vip_writes: Vec<([u8; 16], VipInfo)> = final_vips
            .iter()
            .filter(|(addr, n)| self.vips.get(*addr) != Some(*n))
            .map(|(addr, n)| {
                (
                    *addr,
                    VipInfo {
                        frontends: *n,
                        _pad: 0,
                    },
                )
            })
            .collect();
        self.writer.put_vips(&vip_writes)?;
        for (addr, v) in &vip_writes {
            self.vips.insert(*addr, v.frontends);
        }
        stats.vips_put += vip_writes.len();
        // Which service port holds each frontend now (a frontend can change hands).
        let mut owner: BTreeMap<ServiceKey, String> = self
            .services
            .iter()
            .flat_map(|(n, s)| s.frontends.keys().map(move |k| (*k, n.clone())))
            .collect();
        let mut old_ranges: Vec<(u32, u32)> = Vec::new();
        // Service ports whose AFFINITY entries must be checked after the switch; ports
        // without affinity have none (the programs write entries only for affinity
        // frontends, and losing affinity purges them).
        let mut purge: BTreeSet<u32> = BTreeSet::new();
        let had_affinity: BTreeSet<u32> = self
            .services
            .values()
            .filter(|s| s.has_affinity())
            .map(|s| s.svc_id)
            .collect();
        // A backend may have lost its last reference: scan for unreferenced ones.
        let mut may_orphan = keep.is_empty() || !failures.is_empty();
        // Frontend writes, made together after this loop (before any removal below).
        let mut fe_writes: Vec<(ServiceKey, ServiceValue)> = Vec::new();
        for (name, w) in &wanted {
            let tables = new_tables.remove(name).unwrap_or_default();
            let Some(s) = self.services.get(name) else {
                continue;
            };
            let svc_id = s.svc_id;
            let old_ids = s.ids_by_scope();
            // The tables this service uses from now on.
            let now: [Option<Table>; NT] =
                std::array::from_fn(|ti| match (&tables[ti], w.tables[ti].is_some()) {
                    (Some(t), _) => Some(t.clone()),
                    (None, true) => s.tables[ti].clone(),
                    (None, false) => None,
                });
            for (k, want) in &w.frontends {
                let Some(t) = &now[fe_table(k, want.flags)] else {
                    continue;
                };
                let v = ServiceValue {
                    svc_id,
                    maglev_offset: t.offset,
                    maglev_size: t.size,
                    ..*want
                };
                let current = owner
                    .get(k)
                    .and_then(|o| self.services.get(o))
                    .and_then(|o| o.frontends.get(k))
                    .copied();
                if current != Some(v) {
                    fe_writes.push((*k, v));
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
            for (old, new) in s.tables.iter().zip(&now) {
                let Some(old) = old else { continue };
                let replaced = new
                    .as_ref()
                    .is_none_or(|n| old.offset != n.offset || old.size != n.size);
                if replaced && old.size > 0 {
                    old_ranges.push((old.offset, old.size));
                }
            }
            // Leftover ranges belong to a dirty table, which was rebuilt above, and every
            // frontend that named them now names the new one (or is deleted below).
            old_ranges.append(&mut s.leftover_ranges);
            s.tables = now;
            let kept: BTreeSet<BeKey> = w.kept.keys().copied().collect();
            if !s.kept.is_subset(&kept) {
                may_orphan = true;
            }
            s.kept = kept;
            if had_affinity.contains(&svc_id) {
                let new_ids = s.ids_by_scope();
                let left = (0..2).any(|sc| !old_ids[sc].is_subset(&new_ids[sc]));
                if left || !s.has_affinity() {
                    purge.insert(svc_id);
                }
            }
        }

        self.writer.put_frontends(&fe_writes)?;
        stats.frontends_put += fe_writes.len();

        for f in &failures {
            if let (Some(s), Some(k)) = (
                self.services.get_mut(&f.service),
                desired_kept.get(&f.service),
            ) {
                s.kept.extend(k.iter().copied());
            }
        }

        // 4. Removals: frontends, source ranges, names, affinity entries, ranges,
        // backends, VIPs.
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
        for (name, want) in &ranges_wanted {
            let Some(s) = self.services.get_mut(*name) else {
                continue;
            };
            let old: Vec<SrcRange> = s.src_ranges.difference(want).copied().collect();
            for r in old {
                self.writer.delete_src_range(&r)?;
                s.src_ranges.remove(&r);
                stats.src_ranges_deleted += 1;
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
            let Some(s) = self.services.get_mut(&name) else {
                continue;
            };
            // Its frontends were deleted above. Ranges go before the name, so an entry
            // of SRC_RANGES always belongs to a named service port (adopt relies on it).
            let ranges: Vec<SrcRange> = s.src_ranges.iter().copied().collect();
            for r in ranges {
                self.writer.delete_src_range(&r)?;
                s.src_ranges.remove(&r);
                stats.src_ranges_deleted += 1;
            }
            let svc_id = s.svc_id;
            self.writer.delete_svc_meta(svc_id)?;
            stats.services_removed += 1;
            let Some(s) = self.services.remove(&name) else {
                continue;
            };
            if had_affinity.contains(&svc_id) {
                purge.insert(svc_id);
            }
            may_orphan = true;
            for t in s.tables.iter().flatten() {
                if t.size > 0 {
                    old_ranges.push((t.offset, t.size));
                }
            }
            old_ranges.extend(s.leftover_ranges);
            // Its id is reused only by a later apply, after the entries below are gone.
            self.svc_ids.release(svc_id);
        }
        self.purge_affinity(&purge, full, &mut stats)?;
        may_orphan |= !old_ranges.is_empty();
        for (off, size) in old_ranges {
            self.ranges.release(off, size);
            stats.ranges_freed += 1;
        }
        // Otherwise the scan of every table is skipped: an unchanged port's backends are
        // still referenced.
        let unused: Vec<u32> = if may_orphan {
            let mut live: BTreeSet<u32> = self
                .services
                .values()
                .flat_map(|s| s.tables.iter().flatten())
                .flat_map(|t| t.ids.iter().copied())
                .collect();
            for s in self.services.values() {
                live.extend(s.kept.iter().filter_map(|k| self.be_by_key.get(k)));
            }
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
            Err(ReconcileError::ServicesNotApplied {
                failures,
                stats: Box::new(stats),
            })
        }
    }

    /// Deletes the AFFINITY entries of the service ports `svc_ids` (every port when `all`)
    /// that no longer lead where new flows of the port may go: the port is gone or has no
    /// affinity, or the backend is not in a table of the entry's scope. Runs after the
    /// frontends switched, so the programs no longer pick such a backend themselves, and
    /// before unreferenced backends are deleted, so no entry outlives its backend id.
    fn purge_affinity(
        &mut self,
        svc_ids: &BTreeSet<u32>,
        all: bool,
        stats: &mut ApplyStats,
    ) -> Result<(), MapError> {
        if svc_ids.is_empty() && !all {
            return Ok(());
        }
        let valid: BTreeMap<u32, [BTreeSet<u32>; 2]> = self
            .services
            .values()
            .filter(|s| (all || svc_ids.contains(&s.svc_id)) && s.has_affinity())
            .map(|s| (s.svc_id, s.ids_by_scope()))
            .collect();
        for (k, v) in self.writer.affinity_entries()? {
            if !all && !svc_ids.contains(&k.svc_id) {
                continue;
            }
            let ok = valid
                .get(&k.svc_id)
                .and_then(|ids| ids.get(k.scope as usize))
                .is_some_and(|ids| ids.contains(&v.backend_id));
            if !ok {
                self.writer.delete_affinity(&k)?;
                stats.affinity_deleted += 1;
            }
        }
        Ok(())
    }
}

/// Whether a frontend's address is entered in VIPS. NodePorts are not: their address is
/// the node's own, and fragments or other protocols to it are the host's traffic.
fn is_vip(flags: u32) -> bool {
    flags & SVC_F_NODE_PORT == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::MapSnapshot;
    use crate::model::{Endpoint, Frontend, Protocol, ServicePortId, ServicePortState};
    use lb_common::{AffinityKey, AffinityValue};
    use std::net::{IpAddr, SocketAddr};

    /// AFFINITY key in a sortable form: (client, svc_id, scope).
    type AffKey = ([u8; 16], u32, u32);

    /// In-memory maps that check the data path's invariants after every single write.
    #[derive(Clone, Default)]
    struct Mem {
        services: BTreeMap<ServiceKey, ServiceValue>,
        vips: BTreeMap<[u8; 16], VipInfo>,
        backends: BTreeMap<u32, Backend>,
        be_meta: BTreeMap<u32, NameMeta>,
        svc_meta: BTreeMap<u32, NameMeta>,
        maglev: BTreeMap<u32, u32>,
        /// The LPM trie's entries, exactly as inserted (a trie keeps one entry per
        /// (prefix length, masked data); the reconciler always masks).
        src_ranges: BTreeSet<SrcRange>,
        /// The LRU map the programs write: entry → value and the identity (address, port)
        /// its backend id had when the "program" wrote it.
        affinity: BTreeMap<AffKey, (AffinityValue, BeKey)>,
        /// How often AFFINITY was walked.
        affinity_walks: std::cell::Cell<usize>,
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

        /// What the programs do on a new flow of an affinity frontend: remember the
        /// client's backend.
        fn remember(&mut self, client: &str, svc_id: u32, scope: u32, backend_id: u32) {
            let b = self.backends[&backend_id];
            self.affinity.insert(
                (addr_to_map(ip(client)), svc_id, scope),
                (
                    AffinityValue {
                        backend_id,
                        _pad: 0,
                        last_ns: 1,
                    },
                    (b.addr, b.port_be),
                ),
            );
        }

        fn check(&self) {
            if self.unchecked {
                return;
            }
            let last = self.writes.last().cloned().unwrap_or_default();
            for r in &self.src_ranges {
                assert!(
                    self.svc_meta.contains_key(&r.svc_id),
                    "after {last}: source range {} of unnamed svc_id",
                    crate::maps::fmt_src_range(r)
                );
            }
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
            for (k, v) in &self.services {
                let ctx = format!("after {last}: frontend {}", crate::maps::fmt_key(k));
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
            self.write(format!("put_src_range {}", crate::maps::fmt_src_range(r)))?;
            assert!(self.src_ranges.len() < lb_common::MAX_SRC_RANGES as usize);
            self.src_ranges.insert(*r);
            self.check();
            Ok(())
        }
        fn delete_src_range(&mut self, r: &SrcRange) -> Result<(), MapError> {
            self.write(format!(
                "delete_src_range {}",
                crate::maps::fmt_src_range(r)
            ))?;
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
                    local_endpoints: endpoints.clone(),
                    endpoints,
                    ..Default::default()
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

    /// The maps hold exactly `d`: every frontend with the flags the semantics ask for and
    /// its table (the endpoints of its family and scope), names, VIPs (not NodePorts),
    /// source ranges, backends kept for established flows, and nothing else; every
    /// AFFINITY entry leads to a backend of its port's tables of its scope.
    fn assert_maps_hold(m: &Mem, d: &DesiredState) {
        let mut want_keys = BTreeSet::new();
        let mut want_be: BTreeMap<BeKey, String> = BTreeMap::new();
        let mut want_vips: BTreeMap<[u8; 16], u32> = BTreeMap::new();
        let mut want_ranges: BTreeSet<SrcRange> = BTreeSet::new();
        // svc_id → scope → backend ids new flows may reach, for affinity ports.
        let mut affinity_ok: BTreeMap<u32, [BTreeSet<u32>; 2]> = BTreeMap::new();
        let mut svc_ids = BTreeSet::new();
        for (sid, st) in &d.services {
            let mut ids = BTreeSet::new();
            let fam_of = |e: &Endpoint| family(&addr_to_map(e.addr));
            for f in &st.frontends {
                let k = frontend_key(f);
                let fam = family(&k.addr);
                want_keys.insert(k);
                if f.kind != FrontendKind::NodePort {
                    *want_vips.entry(k.addr).or_default() += 1;
                }
                let v = m
                    .services
                    .get(&k)
                    .unwrap_or_else(|| panic!("{sid}: {f:?} missing"));
                ids.insert(v.svc_id);
                assert_eq!(m.svc_meta[&v.svc_id].as_str(), sid.to_string());
                let local = match f.kind {
                    FrontendKind::ClusterIp => st.internal_local,
                    _ => st.external_local,
                };
                let mut expected = match f.kind {
                    FrontendKind::ClusterIp => SVC_F_CLUSTER_IP,
                    FrontendKind::NodePort => SVC_F_EXTERNAL | SVC_F_NODE_PORT,
                    _ => SVC_F_EXTERNAL,
                };
                if local {
                    expected |= SVC_F_LOCAL;
                    if !st.local_endpoints.iter().any(|e| fam_of(e) == fam)
                        && st.endpoints.iter().any(|e| fam_of(e) == fam)
                    {
                        expected |= SVC_F_DROP_IF_EMPTY;
                    }
                }
                if st.affinity_timeout_s.is_some() {
                    expected |= SVC_F_AFFINITY;
                }
                if f.kind == FrontendKind::LoadBalancer && !st.source_ranges.is_empty() {
                    expected |= SVC_F_SOURCE_RANGES;
                    for p in &st.source_ranges {
                        want_ranges.insert(SrcRange::new(v.svc_id, p));
                    }
                }
                assert_eq!(v.flags, expected, "{sid}: {f:?} flags");
                assert_eq!(
                    v.affinity_timeout_s,
                    st.affinity_timeout_s.unwrap_or(0),
                    "{sid}: affinity timeout"
                );
                let eps = if local {
                    &st.local_endpoints
                } else {
                    &st.endpoints
                };
                let fam_eps: BTreeSet<SocketAddr> = eps
                    .iter()
                    .filter(|e| fam_of(e) == fam)
                    .map(|e| SocketAddr::new(e.addr, e.port))
                    .collect();
                for e in st
                    .endpoints
                    .iter()
                    .chain(&st.local_endpoints)
                    .chain(&st.draining)
                {
                    if fam_of(e) == fam {
                        want_be.insert(be_key(e), be_meta(e));
                    }
                }
                let needed = crate::maglev::table_size(fam_eps.len());
                assert!(
                    (needed == 0 && v.maglev_size == 0)
                        || (needed == 1 && v.maglev_size == 1)
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
                if st.affinity_timeout_s.is_some() {
                    affinity_ok.entry(v.svc_id).or_default()[usize::from(local)]
                        .extend(Mem::range(v).map(|s| m.maglev[&s]));
                }
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
        assert_eq!(m.src_ranges, want_ranges, "SRC_RANGES");
        for ((client, svc, scope), (v, _)) in &m.affinity {
            let ok = affinity_ok
                .get(svc)
                .is_some_and(|s| s[*scope as usize].contains(&v.backend_id));
            assert!(
                ok,
                "affinity entry {}/{svc}/{scope} -> backend {} leads nowhere new flows go",
                addr_from_map(client),
                v.backend_id
            );
        }
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
        // The removed backend owned ~1/10 of the slots; beyond that Maglev moves up to
        // 20% at ~20 slots per backend (maglev.rs: WORST_EXTRA; 9% here).
        assert!(share < 0.1 + 0.2, "{moved} of {} slots moved", old.len());
        // Another pod replacing it: 9 -> 10 is within the rung too.
        let mut replaced = ten[..9].to_vec();
        replaced.push("198.18.1.11");
        apply_ok(&mut r, &state(vec![web(&replaced)]));
        let back = r
            .writer()
            .services
            .values()
            .next()
            .copied()
            .expect("frontend");
        assert_eq!(
            back.maglev_size, before.maglev_size,
            "size kept on scale-up"
        );
        let again = slot_addrs(r.writer(), &back);
        let moved = new_slots.iter().zip(&again).filter(|(a, b)| a != b).count();
        assert!(
            (moved as f64 / old.len() as f64) < 1.0 / 10.0 + 0.2,
            "{moved} of {} slots moved",
            old.len()
        );
        // Shrinking to one endpoint: its table is one slot (every flow on that endpoint,
        // which is where the flows of the remaining endpoint stay).
        apply_ok(&mut r, &state(vec![web(&ten[..1])]));
        let one = r
            .writer()
            .services
            .values()
            .next()
            .copied()
            .expect("frontend");
        assert_eq!(one.maglev_size, 1);
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
        // Two endpoints each: a 101-slot table (one endpoint would take one slot).
        let svc = |name: &str, vip: &str, be: &str| {
            (
                id(name, "", Protocol::Tcp),
                vec![fe(vip, 80, Protocol::Tcp, FrontendKind::ClusterIp)],
                vec![ep(be, 80, None), ep(be, 81, None)],
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
                local_endpoints: ce.clone(),
                endpoints: ce,
                ..Default::default()
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

    // -----------------------------------------------------------------------------------
    // kube-proxy semantics: scopes, NodePorts, draining, affinity, source ranges.
    // -----------------------------------------------------------------------------------

    /// Endpoints on port 8080, in the model's order.
    fn eps(addrs: &[&str]) -> Vec<Endpoint> {
        let mut v: Vec<Endpoint> = addrs.iter().map(|a| ep(a, 8080, None)).collect();
        v.sort();
        v
    }

    fn shop_id() -> ServicePortId {
        id("shop", "http", Protocol::Tcp)
    }

    const SHOP_CIP: &str = "198.18.100.1";
    const SHOP_LB: &str = "198.18.200.1";
    const NODE: &str = "198.18.0.1";

    /// shop: a ClusterIP, a LoadBalancer IP and a NodePort on the node address.
    fn shop(
        endpoints: &[&str],
        local: &[&str],
        f: impl FnOnce(&mut ServicePortState),
    ) -> ServicePortState {
        let mut st = ServicePortState {
            frontends: vec![
                fe(SHOP_CIP, 80, Protocol::Tcp, FrontendKind::ClusterIp),
                fe(SHOP_LB, 80, Protocol::Tcp, FrontendKind::LoadBalancer),
                fe(NODE, 30080, Protocol::Tcp, FrontendKind::NodePort),
            ],
            endpoints: eps(endpoints),
            local_endpoints: eps(local),
            ..Default::default()
        };
        f(&mut st);
        st.frontends.sort();
        st
    }

    fn with(ports: Vec<(ServicePortId, ServicePortState)>) -> DesiredState {
        DesiredState {
            services: ports.into_iter().collect(),
        }
    }

    fn key(addr: &str, port: u16) -> ServiceKey {
        ServiceKey {
            addr: addr_to_map(ip(addr)),
            port_be: port.to_be(),
            proto: lb_common::PROTO_TCP,
            _pad: 0,
        }
    }

    fn be_id(m: &Mem, addr: &str) -> u32 {
        let k = (addr_to_map(ip(addr)), 8080u16.to_be());
        *m.backends
            .iter()
            .find(|(_, b)| (b.addr, b.port_be) == k)
            .unwrap_or_else(|| panic!("no backend {addr}"))
            .0
    }

    /// Index of the first write starting with `prefix` at or after `from`.
    fn write_at(m: &Mem, from: usize, prefix: &str) -> usize {
        m.writes[from..]
            .iter()
            .position(|w| w.starts_with(prefix))
            .map(|i| i + from)
            .unwrap_or_else(|| panic!("no {prefix} in {:?}", &m.writes[from..]))
    }

    #[test]
    fn local_frontends_use_the_node_local_table_and_drop_only_while_endpoints_exist() {
        let mut r = new();
        let all = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
        // externalTrafficPolicy: Local; one endpoint on this node.
        let d = with(vec![(
            shop_id(),
            shop(&all, &["198.18.1.1"], |s| s.external_local = true),
        )]);
        apply_ok(&mut r, &d);
        let m = r.writer();
        let (cip, lb, np) = (
            m.services[&key(SHOP_CIP, 80)],
            m.services[&key(SHOP_LB, 80)],
            m.services[&key(NODE, 30080)],
        );
        assert_eq!(cip.flags & SVC_F_LOCAL, 0);
        assert_eq!(lb.flags & SVC_F_LOCAL, SVC_F_LOCAL);
        // The external frontends share the local table; the ClusterIP has its own.
        assert_eq!(
            (lb.maglev_offset, lb.maglev_size),
            (np.maglev_offset, np.maglev_size)
        );
        assert_ne!(lb.maglev_offset, cip.maglev_offset);
        assert_eq!(lb.maglev_size, crate::maglev::table_size(1));
        assert_eq!(cip.maglev_size, crate::maglev::table_size(3));
        let writes = apply_ok(&mut r, &d).writes();
        assert_eq!(writes, 0);

        // internalTrafficPolicy: Local too: the cluster table goes, the remote endpoints'
        // backends stay (flows pinned to them keep working).
        let d = with(vec![(
            shop_id(),
            shop(&all, &["198.18.1.1"], |s| {
                s.external_local = true;
                s.internal_local = true;
            }),
        )]);
        let s = apply_ok(&mut r, &d);
        assert_eq!((s.ranges_freed, s.backends_deleted), (1, 0), "{s}");
        assert_eq!(s.tables_written, 0, "the local table is reused: {s}");

        // No local endpoint while others exist: drop (SVC_F_DROP_IF_EMPTY, size 0).
        let d = with(vec![(
            shop_id(),
            shop(&all, &[], |s| s.external_local = true),
        )]);
        apply_ok(&mut r, &d);
        let lb = r.writer().services[&key(SHOP_LB, 80)];
        assert_eq!(
            (lb.flags & SVC_F_DROP_IF_EMPTY, lb.maglev_size),
            (SVC_F_DROP_IF_EMPTY, 0)
        );
        // No endpoints at all: refuse, as without the policy.
        let d = with(vec![(
            shop_id(),
            shop(&[], &[], |s| s.external_local = true),
        )]);
        apply_ok(&mut r, &d);
        let lb = r.writer().services[&key(SHOP_LB, 80)];
        assert_eq!((lb.flags & SVC_F_DROP_IF_EMPTY, lb.maglev_size), (0, 0));
        assert!(r.writer().backends.is_empty());

        // Dual-stack: the rule is per family. IPv4 has a local endpoint, IPv6 only a remote
        // one: the IPv6 LoadBalancer frontend drops, the IPv4 one forwards.
        let d = with(vec![(
            shop_id(),
            shop(&["198.18.1.1", "2001:db8:1::1"], &["198.18.1.1"], |s| {
                s.external_local = true;
                s.frontends.push(fe(
                    "2001:db8:200::1",
                    80,
                    Protocol::Tcp,
                    FrontendKind::LoadBalancer,
                ));
            }),
        )]);
        apply_ok(&mut r, &d);
        let m = r.writer();
        let v6 = m.services[&key("2001:db8:200::1", 80)];
        assert_eq!(v6.flags & SVC_F_DROP_IF_EMPTY, SVC_F_DROP_IF_EMPTY);
        assert_eq!(m.services[&key(SHOP_LB, 80)].flags & SVC_F_DROP_IF_EMPTY, 0);
    }

    #[test]
    fn local_tables_keep_their_size_like_cluster_tables() {
        let ten: Vec<String> = (1..=10).map(|i| format!("198.18.1.{i}")).collect();
        let ten: Vec<&str> = ten.iter().map(String::as_str).collect();
        let mut r = new();
        let local = |n: usize| {
            with(vec![(
                shop_id(),
                shop(&ten, &ten[..n], |s| s.external_local = true),
            )])
        };
        apply_ok(&mut r, &local(10));
        let before = r.writer().services[&key(SHOP_LB, 80)];
        apply_ok(&mut r, &local(9));
        let after = r.writer().services[&key(SHOP_LB, 80)];
        assert_eq!(after.maglev_size, before.maglev_size, "size kept");
        assert_ne!(after.maglev_offset, before.maglev_offset, "a new range");
        // The cluster table did not change at all.
        let s = apply_ok(&mut r, &local(9));
        assert_eq!(s.writes(), 0);
    }

    #[test]
    fn nodeports_are_frontends_but_not_vips() {
        let limits = Limits {
            vips: 1,
            ..Limits::default()
        };
        let mut r = Reconciler::adopt_with_limits(Mem::default(), limits).expect("adopt");
        let d = with(vec![(
            shop_id(),
            shop(&["198.18.1.1"], &["198.18.1.1"], |s| {
                s.frontends.retain(|f| f.kind != FrontendKind::LoadBalancer);
                s.frontends.push(fe(
                    "2001:db8::1",
                    30080,
                    Protocol::Tcp,
                    FrontendKind::NodePort,
                ));
            }),
        )]);
        // One VIP fits: the node addresses do not count.
        apply_ok(&mut r, &d);
        let m = r.writer();
        let np = m.services[&key(NODE, 30080)];
        assert_eq!(np.flags, SVC_F_EXTERNAL | SVC_F_NODE_PORT);
        assert!(!m.vips.contains_key(&addr_to_map(ip(NODE))));
        assert_eq!(m.vips.len(), 1);
    }

    #[test]
    fn draining_endpoints_keep_their_backend_out_of_every_table() {
        let mut r = new();
        let two = with(vec![(
            shop_id(),
            shop(
                &["198.18.1.1", "198.18.1.2"],
                &["198.18.1.1", "198.18.1.2"],
                |_| {},
            ),
        )]);
        apply_ok(&mut r, &two);
        let id2 = be_id(r.writer(), "198.18.1.2");
        // 198.18.1.2 terminates: out of the tables, still a backend, same id.
        let draining = with(vec![(
            shop_id(),
            shop(&["198.18.1.1"], &["198.18.1.1"], |s| {
                s.draining = eps(&["198.18.1.2"])
            }),
        )]);
        let n = r.writer().writes.len();
        let s = apply_ok(&mut r, &draining);
        assert_eq!(s.backends_deleted, 0, "{s}");
        assert_eq!(be_id(r.writer(), "198.18.1.2"), id2);
        assert!(
            !r.writer().writes[n..]
                .iter()
                .any(|w| w.starts_with("put_backend")),
            "{:?}",
            &r.writer().writes[n..]
        );
        // A restarted agent adopts it without a write.
        let mut adopted = Reconciler::adopt(Mem {
            writes: Vec::new(),
            ..r.writer().clone()
        })
        .expect("adopt");
        assert_eq!(apply_ok(&mut adopted, &draining).writes(), 0);
        // A new endpoint does not disturb the draining one either.
        let more = with(vec![(
            shop_id(),
            shop(
                &["198.18.1.1", "198.18.1.3"],
                &["198.18.1.1", "198.18.1.3"],
                |s| s.draining = eps(&["198.18.1.2"]),
            ),
        )]);
        let s = apply_ok(&mut adopted, &more);
        assert_eq!((s.backends_put, s.backends_deleted), (1, 0), "{s}");
        // Gone from the slices: deleted.
        let gone = with(vec![(
            shop_id(),
            shop(&["198.18.1.1"], &["198.18.1.1"], |_| {}),
        )]);
        let n = adopted.writer().writes.len();
        let s = apply_ok(&mut adopted, &gone);
        assert_eq!(s.backends_deleted, 2, "{s}");
        assert!(adopted.writer().writes[n..].contains(&format!("delete_backend {id2}")));
        // Draining and back to ready: back into the table with the same id.
        apply_ok(&mut adopted, &draining);
        let id2 = be_id(adopted.writer(), "198.18.1.2");
        apply_ok(&mut adopted, &two);
        assert_eq!(be_id(adopted.writer(), "198.18.1.2"), id2);
    }

    fn affinity_port(endpoints: &[&str], timeout: Option<u32>) -> ServicePortState {
        shop(endpoints, endpoints, |s| s.affinity_timeout_s = timeout)
    }

    fn other_id() -> ServicePortId {
        id("other", "", Protocol::Tcp)
    }

    fn other_port(endpoints: &[&str]) -> ServicePortState {
        ServicePortState {
            frontends: vec![fe(
                "198.18.100.9",
                80,
                Protocol::Tcp,
                FrontendKind::ClusterIp,
            )],
            endpoints: eps(endpoints),
            local_endpoints: eps(endpoints),
            affinity_timeout_s: Some(10800),
            ..Default::default()
        }
    }

    #[test]
    fn affinity_flags_and_purge_of_backends_leaving_the_tables() {
        let abc = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
        let mut r = new();
        let d = with(vec![
            (shop_id(), affinity_port(&abc, Some(60))),
            (other_id(), other_port(&abc)),
            dns_port(&["198.18.1.5"]),
        ]);
        apply_ok(&mut r, &d);
        let lb = r.writer().services[&key(SHOP_LB, 80)];
        assert_eq!(lb.flags & SVC_F_AFFINITY, SVC_F_AFFINITY);
        assert_eq!(lb.affinity_timeout_s, 60);
        let shop_svc = lb.svc_id;
        let other_svc = r.writer().services[&key("198.18.100.9", 80)].svc_id;
        let m = r.writer_mut();
        let (b1, b2, b3) = (
            be_id(m, "198.18.1.1"),
            be_id(m, "198.18.1.2"),
            be_id(m, "198.18.1.3"),
        );
        m.remember("198.18.9.1", shop_svc, 0, b1);
        m.remember("198.18.9.2", shop_svc, 0, b2);
        m.remember("198.18.9.3", shop_svc, 0, b3);
        m.remember("198.18.9.2", other_svc, 0, b2);
        // The first apply walked AFFINITY once (nothing was known to be applied).
        m.affinity_walks.set(0);

        // 198.18.1.2 starts draining in shop only: shop's entry for it goes, after shop's
        // frontends switched to the new table; other's entry to the same backend stays.
        let d = with(vec![
            (
                shop_id(),
                shop(
                    &["198.18.1.1", "198.18.1.3"],
                    &["198.18.1.1", "198.18.1.3"],
                    |s| {
                        s.affinity_timeout_s = Some(60);
                        s.draining = eps(&["198.18.1.2"]);
                    },
                ),
            ),
            (other_id(), other_port(&abc)),
            dns_port(&["198.18.1.5"]),
        ]);
        let n = r.writer().writes.len();
        let s = apply_ok(&mut r, &d);
        assert_eq!(s.affinity_deleted, 1, "{s}");
        let m = r.writer();
        let del = write_at(m, n, "delete_affinity 198.18.9.2/");
        let switch = write_at(m, n, &format!("put_frontend {SHOP_LB}:80"));
        assert!(switch < del, "{:?}", &m.writes[n..]);
        let left: BTreeSet<(u32, u32)> = m
            .affinity
            .iter()
            .map(|((_, svc, _), (v, _))| (*svc, v.backend_id))
            .collect();
        assert_eq!(
            left,
            BTreeSet::from([(shop_svc, b1), (shop_svc, b3), (other_svc, b2)])
        );
        assert_eq!(m.affinity_walks.get(), 1);

        // A change to a port without affinity does not walk AFFINITY.
        let mut d2 = d.clone();
        let (dns_id, dns_st) = dns_port(&["198.18.1.6"]);
        d2.services.insert(dns_id, dns_st);
        apply_ok(&mut r, &d2);
        assert_eq!(r.writer().affinity_walks.get(), 1);

        // A scale-up keeps every entry (nobody left a table).
        let mut d3 = d2.clone();
        d3.services.insert(
            shop_id(),
            shop(
                &["198.18.1.1", "198.18.1.3", "198.18.1.4"],
                &["198.18.1.1", "198.18.1.3", "198.18.1.4"],
                |s| s.affinity_timeout_s = Some(60),
            ),
        );
        let s = apply_ok(&mut r, &d3);
        assert_eq!(s.affinity_deleted, 0, "{s}");
        assert_eq!(r.writer().affinity.len(), 3);

        // shop loses affinity: all its entries go; other's stay.
        let mut d4 = d3.clone();
        d4.services.insert(
            shop_id(),
            shop(
                &["198.18.1.1", "198.18.1.3", "198.18.1.4"],
                &["198.18.1.1", "198.18.1.3", "198.18.1.4"],
                |_| {},
            ),
        );
        let s = apply_ok(&mut r, &d4);
        assert_eq!(s.affinity_deleted, 2, "{s}");
        assert_eq!(r.writer().services[&key(SHOP_LB, 80)].affinity_timeout_s, 0);

        // other is removed: its entries go with it, before its backend ids are freed.
        let mut d5 = d4.clone();
        d5.services.remove(&other_id());
        let n = r.writer().writes.len();
        let s = apply_ok(&mut r, &d5);
        assert_eq!(s.affinity_deleted, 1, "{s}");
        assert!(r.writer().affinity.is_empty());
        let m = r.writer();
        let del = write_at(m, n, "delete_affinity");
        if let Some(be) = m.writes[n..]
            .iter()
            .position(|w| w.starts_with("delete_backend"))
        {
            assert!(del < n + be, "{:?}", &m.writes[n..]);
        }
    }

    #[test]
    fn affinity_entries_are_per_scope() {
        let abc = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
        let mut r = new();
        // The LoadBalancer and NodePort frontends use the local table {1}, the ClusterIP
        // the cluster table {1, 2, 3}.
        let st = |local: &[&str]| {
            shop(&abc, local, |s| {
                s.affinity_timeout_s = Some(10800);
                s.external_local = true;
            })
        };
        apply_ok(
            &mut r,
            &with(vec![(shop_id(), st(&["198.18.1.1", "198.18.1.2"]))]),
        );
        let svc = r.writer().services[&key(SHOP_LB, 80)].svc_id;
        let m = r.writer_mut();
        let (b1, b2) = (be_id(m, "198.18.1.1"), be_id(m, "198.18.1.2"));
        m.remember("198.18.9.1", svc, 1, b2);
        m.remember("198.18.9.1", svc, 0, b2);
        m.remember("198.18.9.2", svc, 1, b1);
        // 198.18.1.2 leaves the local table only: the local-scope entry for it goes, the
        // cluster-scope one stays.
        let s = apply_ok(&mut r, &with(vec![(shop_id(), st(&["198.18.1.1"]))]));
        assert_eq!(s.affinity_deleted, 1, "{s}");
        let left: BTreeSet<(u32, u32)> = r
            .writer()
            .affinity
            .iter()
            .map(|((_, _, scope), (v, _))| (*scope, v.backend_id))
            .collect();
        assert_eq!(left, BTreeSet::from([(0, b2), (1, b1)]));
    }

    #[test]
    fn adopting_checks_every_affinity_entry_once_and_writes_nothing_when_consistent() {
        let abc = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
        let mut r = new();
        let d = with(vec![(shop_id(), affinity_port(&abc, Some(60)))]);
        apply_ok(&mut r, &d);
        let svc = r.writer().services[&key(SHOP_LB, 80)].svc_id;
        let b1 = be_id(r.writer(), "198.18.1.1");
        r.writer_mut().remember("198.18.9.1", svc, 0, b1);
        let mut maps = r.writer().clone();
        maps.writes.clear();
        maps.affinity_walks.set(0);
        let mut adopted = Reconciler::adopt(maps.clone()).expect("adopt");
        let s = apply_ok(&mut adopted, &d);
        assert_eq!(s.writes(), 0, "{s}");
        assert_eq!(adopted.writer().affinity_walks.get(), 1);
        // Left behind by an agent that died mid-apply: an entry of a port that is gone
        // and one naming a backend outside the tables.
        maps.remember("198.18.9.2", svc + 7, 0, b1);
        maps.remember("198.18.9.3", svc, 1, b1);
        let mut adopted = Reconciler::adopt(maps).expect("adopt");
        let s = apply_ok(&mut adopted, &d);
        assert_eq!((s.affinity_deleted, s.writes()), (2, 2), "{s}");
    }

    fn ranged(endpoints: &[&str], ranges: &[&str]) -> ServicePortState {
        shop(endpoints, endpoints, |s| {
            s.source_ranges = ranges
                .iter()
                .map(|r| {
                    let (a, l) = r.split_once('/').expect("prefix");
                    crate::model::Prefix {
                        addr: ip(a),
                        len: l.parse().expect("length"),
                    }
                })
                .collect();
            s.source_ranges.sort();
        })
    }

    #[test]
    fn source_ranges_go_in_before_the_flag_and_out_after_it() {
        let mut r = new();
        let one = ["198.18.1.1"];
        let d = with(vec![(shop_id(), ranged(&one, &["198.18.50.0/24"]))]);
        apply_ok(&mut r, &d);
        let m = r.writer();
        let lb = m.services[&key(SHOP_LB, 80)];
        assert_eq!(lb.flags & SVC_F_SOURCE_RANGES, SVC_F_SOURCE_RANGES);
        // Only LoadBalancer frontends are restricted.
        assert_eq!(
            m.services[&key(SHOP_CIP, 80)].flags & SVC_F_SOURCE_RANGES,
            0
        );
        assert_eq!(m.services[&key(NODE, 30080)].flags & SVC_F_SOURCE_RANGES, 0);
        let range = m.src_ranges.iter().next().copied().expect("a range");
        assert_eq!(range.bits, 96 + 24, "IPv4 counts the mapped prefix");
        assert_eq!(range.key().prefix_len(), 32 + 96 + 24);
        assert_eq!(range.prefix().to_string(), "198.18.50.0/24");
        let put = write_at(m, 0, "put_src_range");
        let flag = write_at(m, 0, &format!("put_frontend {SHOP_LB}:80"));
        assert!(put < flag, "{:?}", m.writes);

        // Another set: the new prefixes first, the old one last.
        let d = with(vec![(
            shop_id(),
            ranged(&one, &["198.18.60.0/24", "2001:db8:50::/48"]),
        )]);
        let n = r.writer().writes.len();
        let s = apply_ok(&mut r, &d);
        assert_eq!((s.src_ranges_put, s.src_ranges_deleted), (2, 1), "{s}");
        let w = &r.writer().writes[n..];
        assert!(
            w[2].starts_with("delete_src_range") && w.len() == 3,
            "{w:?}"
        );

        // Adopted as they are.
        let mut adopted = Reconciler::adopt(Mem {
            writes: Vec::new(),
            ..r.writer().clone()
        })
        .expect("adopt");
        assert_eq!(apply_ok(&mut adopted, &d).writes(), 0);

        // No ranges any more: the flag is cleared before the prefixes go.
        let d = with(vec![(shop_id(), ranged(&one, &[]))]);
        let n = adopted.writer().writes.len();
        let s = apply_ok(&mut adopted, &d);
        assert_eq!(s.src_ranges_deleted, 2, "{s}");
        let m = adopted.writer();
        let flag = write_at(m, n, &format!("put_frontend {SHOP_LB}:80"));
        let del = write_at(m, n, "delete_src_range");
        assert!(flag < del, "{:?}", &m.writes[n..]);

        // A removed port takes its prefixes along, after its frontends and before its name.
        let d = with(vec![(shop_id(), ranged(&one, &["198.18.50.0/24"]))]);
        apply_ok(&mut adopted, &d);
        let n = adopted.writer().writes.len();
        apply_ok(&mut adopted, &with(vec![]));
        let m = adopted.writer();
        let fe_del = write_at(m, n, &format!("delete_frontend {SHOP_LB}:80"));
        let del = write_at(m, n, "delete_src_range");
        let name = write_at(m, n, "delete_svc_meta");
        assert!(fe_del < del && del < name, "{:?}", &m.writes[n..]);
    }

    #[test]
    fn prefixes_of_an_unnamed_svc_id_are_removed() {
        let stray = SrcRange::new(
            42,
            &crate::model::Prefix {
                addr: ip("198.18.50.0"),
                len: 24,
            },
        );
        let mut maps = Mem::default();
        maps.src_ranges.insert(stray);
        let mut r = Reconciler::adopt(maps).expect("adopt");
        let s = apply_ok(&mut r, &with(vec![]));
        assert_eq!(s.src_ranges_deleted, 1, "{s}");
        assert!(r.writer().src_ranges.is_empty());
    }

    #[test]
    fn src_range_keys_mask_host_bits_and_round_trip() {
        let p = |a: &str, len: u8| crate::model::Prefix { addr: ip(a), len };
        let r = SrcRange::new(3, &p("198.18.50.77", 20));
        assert_eq!(r.prefix(), p("198.18.48.0", 20));
        let k = r.key();
        assert_eq!(u32::from_be(k.data().svc_id_be), 3);
        assert_eq!(SrcRange::from_key(&k), Some(r));
        let r6 = SrcRange::new(3, &p("2001:db8:50::ff", 48));
        assert_eq!(r6.prefix(), p("2001:db8:50::", 48));
        assert_eq!(r6.key().prefix_len(), 32 + 48);
        let all4 = SrcRange::new(3, &p("0.0.0.0", 0));
        assert_eq!((all4.bits, all4.prefix()), (96, p("0.0.0.0", 0)));
    }

    #[test]
    fn failed_write_with_every_feature_is_recovered_by_the_next_apply() {
        let abc = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
        let before = with(vec![
            (
                shop_id(),
                shop(&abc, &["198.18.1.1", "198.18.1.2"], |s| {
                    s.external_local = true;
                    s.affinity_timeout_s = Some(60);
                    s.source_ranges = vec![crate::model::Prefix {
                        addr: ip("198.18.50.0"),
                        len: 24,
                    }];
                }),
            ),
            (other_id(), other_port(&abc)),
        ]);
        let after = with(vec![(
            shop_id(),
            shop(&["198.18.1.3", "198.18.1.4"], &["198.18.1.4"], |s| {
                s.internal_local = true;
                s.draining = eps(&["198.18.1.1"]);
                s.source_ranges = vec![crate::model::Prefix {
                    addr: ip("198.18.60.0"),
                    len: 24,
                }];
            }),
        )]);
        for fail_at in 0..40 {
            let mut r = new();
            apply_ok(&mut r, &before);
            let m = r.writer_mut();
            let svc = m.services[&key(SHOP_LB, 80)].svc_id;
            let other = m.services[&key("198.18.100.9", 80)].svc_id;
            let (b1, b2) = (be_id(m, "198.18.1.1"), be_id(m, "198.18.1.2"));
            m.remember("198.18.9.1", svc, 1, b1);
            m.remember("198.18.9.2", svc, 0, b2);
            m.remember("198.18.9.2", other, 0, b2);
            let n = m.writes.len();
            m.fail_at = Some(n + fail_at);
            let res = r.apply(&after);
            if res.is_ok() {
                assert_maps_hold(r.writer(), &after);
                assert!(fail_at > 5, "only {fail_at} writes");
                break;
            }
            assert!(matches!(res, Err(ReconcileError::Map(_))), "{res:?}");
            apply_ok(&mut r, &after);
        }
    }

    fn dns_port(endpoints: &[&str]) -> (ServicePortId, ServicePortState) {
        let (id, frontends, endpoints) = dns(endpoints);
        (
            id,
            ServicePortState {
                frontends,
                local_endpoints: endpoints.clone(),
                endpoints,
                ..Default::default()
            },
        )
    }

    #[test]
    fn a_refused_port_keeps_its_draining_backends() {
        let limits = Limits {
            backends: 2,
            ..Limits::default()
        };
        let st = |ready: &[&str]| shop(ready, ready, |s| s.draining = eps(&["198.18.1.9"]));
        let mut r = Reconciler::adopt_with_limits(Mem::default(), limits).expect("adopt");
        apply_ok(&mut r, &with(vec![(shop_id(), st(&["198.18.1.1"]))]));
        // A restarted agent, and the port now needs a third backend id: refused, and the
        // draining backend (in no table, known only from the desired state) stays.
        let maps = Mem {
            writes: Vec::new(),
            ..r.writer().clone()
        };
        let mut r = Reconciler::adopt_with_limits(maps, limits).expect("adopt");
        let more = with(vec![(shop_id(), st(&["198.18.1.1", "198.18.1.2"]))]);
        let err = r.apply(&more).expect_err("no backend id left");
        assert!(
            matches!(&err, ReconcileError::ServicesNotApplied { failures, .. }
                if matches!(failures[0].shortage, Shortage::BackendIds { .. })),
            "{err}"
        );
        assert_maps_hold(r.writer(), &with(vec![(shop_id(), st(&["198.18.1.1"]))]));
    }

    #[test]
    fn too_many_source_ranges_refuse_only_that_port() {
        let limits = Limits {
            src_ranges: 2,
            ..Limits::default()
        };
        let mut r = Reconciler::adopt_with_limits(Mem::default(), limits).expect("adopt");
        let one = ["198.18.1.1"];
        let a = with(vec![(shop_id(), ranged(&one, &["198.18.50.0/24"]))]);
        apply_ok(&mut r, &a);
        // Two more would need three entries at the peak (old ones go after the switch).
        let b = with(vec![(
            shop_id(),
            ranged(&one, &["198.18.60.0/24", "198.18.70.0/24"]),
        )]);
        let err = r.apply(&b).expect_err("SRC_RANGES holds 2");
        assert!(
            matches!(&err, ReconcileError::ServicesNotApplied { failures, .. }
                if failures[0].shortage == Shortage::SourceRanges { needed: 2 }),
            "{err}"
        );
        assert_maps_hold(r.writer(), &a);
        // One of them replacing the old one fits.
        let c = with(vec![(shop_id(), ranged(&one, &["198.18.60.0/24"]))]);
        apply_ok(&mut r, &c);
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
