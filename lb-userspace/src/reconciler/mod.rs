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
//!
//! Where each part lives:
//! - `plan`: desired state → frontends, tables and kept backends per port,
//!   Maglev sizes and slots (pure);
//! - `phases`, `switch` and `removals`: the write phases above, one function each, run in
//!   order by `phases`; `pass`: the working set they hand on;
//! - `adopt`: the bookkeeping rebuilt from a [`MapSnapshot`](crate::maps::MapSnapshot);
//! - `state`, `keys`, `alloc`: the bookkeeping, how things are named in the maps, and the
//!   id and MAGLEV range allocators;
//! - `outcome`: what an apply reports.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{MAGLEV_SLOTS, MAX_BACKENDS, MAX_FRONTENDS, MAX_SERVICES, MAX_VIPS};

use crate::maps::MapWriter;
use crate::model::{DesiredState, ServicePortId, ServicePortState};

mod adopt;
mod alloc;
mod keys;
mod outcome;
mod pass;
mod phases;
mod plan;
mod removals;
mod state;
mod switch;
#[cfg(test)]
mod tests;

pub use outcome::{ApplyStats, ReconcileError, ServiceFailure, Shortage};

use alloc::{IdAlloc, RangeAlloc};
use keys::{frontend_key, BackendIdentity};
use state::{BackendState, SvcState};

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

/// The service ports an apply diffs, by id.
type PortsToDiff<'a> = BTreeMap<&'a ServicePortId, &'a ServicePortState>;

/// Each service port as last applied successfully, with its SVC_META name.
type AppliedPorts = BTreeMap<ServicePortId, (String, ServicePortState)>;

/// Keeps the maps equal to the desired state. See the module documentation.
pub struct Reconciler<W: MapWriter> {
    writer: W,
    limits: Limits,
    /// By `ServicePortId`'s Display, the name SVC_META holds.
    services: BTreeMap<String, SvcState>,
    /// The BACKENDS slot of each backend identity.
    backend_id_of: BTreeMap<BackendIdentity, u32>,
    backends: BTreeMap<u32, BackendState>,
    /// BE_META entries of inactive slots (left by an interrupted delete).
    stale_backend_meta: BTreeSet<u32>,
    /// VIPS: address → number of frontends on it.
    vips: BTreeMap<[u8; 16], u32>,
    service_ids: IdAlloc,
    backend_ids: IdAlloc,
    maglev_ranges: RangeAlloc,
    /// A write failed: re-read the maps before the next apply.
    resync: bool,
    /// Each service port as last applied successfully, so that an apply only diffs the
    /// ports whose desired state changed (diffing all of them cost ~0.7 µs per endpoint,
    /// most of an endpoint change at 10,000 endpoints). `None`: the bookkeeping came from
    /// the maps (adopt, resync) or an apply failed part-way, so nothing is known to be
    /// applied and the next apply diffs everything.
    applied: Option<AppliedPorts>,
}

impl<W: MapWriter> Reconciler<W> {
    /// Takes over whatever the maps hold (empty maps are fine).
    pub fn adopt(writer: W) -> Result<Self, ReconcileError> {
        Self::adopt_with_limits(writer, Limits::default())
    }

    pub fn adopt_with_limits(writer: W, limits: Limits) -> Result<Self, ReconcileError> {
        let mut reconciler = Self {
            writer,
            limits,
            services: BTreeMap::new(),
            backend_id_of: BTreeMap::new(),
            backends: BTreeMap::new(),
            stale_backend_meta: BTreeSet::new(),
            vips: BTreeMap::new(),
            service_ids: IdAlloc::new(limits.services),
            backend_ids: IdAlloc::new(limits.backends),
            maglev_ranges: RangeAlloc::new(limits.maglev_slots),
            resync: false,
            applied: None,
        };
        reconciler.load()?;
        Ok(reconciler)
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

    /// Makes the maps hold `desired`. See the module documentation for the order.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<ApplyStats, ReconcileError> {
        if self.resync {
            self.load()?;
        }
        let applied = self.applied.take();
        let (ports, unchanged) = match &applied {
            None => (desired.services.iter().collect(), BTreeSet::new()),
            Some(applied) => self.ports_to_diff(desired, applied),
        };
        let result = self.apply_ports(&ports, &unchanged, applied.is_none());
        let failed: BTreeSet<&str> = match &result {
            Ok(_) => BTreeSet::new(),
            Err(ReconcileError::ServicesNotApplied { failures, .. }) => {
                failures.iter().map(|f| f.service.as_str()).collect()
            }
            Err(_) => {
                // The maps may differ from the bookkeeping: the next apply re-reads them
                // and diffs everything (`applied` stays `None`).
                if matches!(result, Err(ReconcileError::Map(_))) {
                    self.resync = true;
                }
                return result;
            }
        };
        self.record_applied(desired, applied, ports, &failed);
        result
    }

    /// The ports whose desired state differs from what was applied for them, and the
    /// names of the others (whose maps already hold their desired state).
    fn ports_to_diff<'a>(
        &self,
        desired: &'a DesiredState,
        applied: &AppliedPorts,
    ) -> (PortsToDiff<'a>, BTreeSet<String>) {
        let mut ports: PortsToDiff<'a> = BTreeMap::new();
        let mut unchanged: BTreeSet<String> = BTreeSet::new();
        for (id, st) in &desired.services {
            match applied.get(id) {
                Some((name, applied_state)) if applied_state == st => {
                    unchanged.insert(name.clone());
                }
                _ => {
                    ports.insert(id, st);
                }
            }
        }
        let pulled = self.holders_of_claimed_frontends(&ports, &unchanged);
        if !pulled.is_empty() {
            for (id, (name, _)) in applied {
                if pulled.contains(name) {
                    if let Some((id, st)) = desired.services.get_key_value(id) {
                        unchanged.remove(name);
                        ports.insert(id, st);
                    }
                }
            }
        }
        (ports, unchanged)
    }

    /// Unchanged ports holding a frontend that a diffed port claims. Both are diffed, so
    /// the conflict resolves as a full diff would resolve it (the first by name keeps it).
    /// The unchanged one holds only its own frontends, so one pass is enough.
    fn holders_of_claimed_frontends(
        &self,
        ports: &PortsToDiff<'_>,
        unchanged: &BTreeSet<String>,
    ) -> BTreeSet<String> {
        let owner: BTreeMap<lb_common::ServiceKey, &str> = self
            .services
            .iter()
            .flat_map(|(n, s)| s.frontends.keys().map(move |k| (*k, n.as_str())))
            .collect();
        let mut pulled: BTreeSet<String> = BTreeSet::new();
        for st in ports.values() {
            for f in &st.frontends {
                if let Some(holder) = owner.get(&frontend_key(f)) {
                    if unchanged.contains(*holder) {
                        pulled.insert((*holder).to_owned());
                    }
                }
            }
        }
        pulled
    }

    /// Remembers the diffed ports as applied, except the `failed` ones: a failed port
    /// keeps its old entries, so it is diffed again next time.
    fn record_applied(
        &mut self,
        desired: &DesiredState,
        applied: Option<AppliedPorts>,
        ports: PortsToDiff<'_>,
        failed: &BTreeSet<&str>,
    ) {
        let mut applied = applied.unwrap_or_default();
        applied.retain(|id, _| desired.services.contains_key(id));
        for (id, st) in ports {
            let name = id.to_string();
            if failed.contains(name.as_str()) {
                applied.remove(id);
            } else {
                applied.insert(id.clone(), (name, st.clone()));
            }
        }
        self.applied = Some(applied);
    }
}
