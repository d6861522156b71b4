//! Rebuilding the bookkeeping from the maps ([`MapSnapshot`]), so that a restarted agent
//! takes over pinned maps without rewriting (and disturbing) anything, and so that an
//! apply after a failed write starts from what the maps really hold.
//!
//! Whatever the maps hold that this reconciler could not have written (frontends without a
//! name, overlapping ranges, tables naming unknown backends) is adopted as something the
//! next apply replaces or removes, never as something it builds on.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{ServiceKey, ServiceValue};

use super::alloc::{IdAlloc, RangeAlloc};
use super::keys::{family, family_of_table, frontend_table_index};
use super::state::{BackendState, SvcState, Table, Tables};
use super::{ReconcileError, Reconciler};
use crate::maps::{MapError, MapSnapshot, MapWriter, SrcRange};

/// The snapshot's service ports, by svc_id.
struct PortsById {
    /// SVC_META.
    names: BTreeMap<u32, String>,
    /// Every svc_id that has a name, a frontend or a source range.
    frontends: BTreeMap<u32, BTreeMap<ServiceKey, ServiceValue>>,
    src_ranges: BTreeMap<u32, BTreeSet<SrcRange>>,
}

impl PortsById {
    fn of(snap: &MapSnapshot) -> Self {
        let names: BTreeMap<u32, String> = snap
            .svc_meta
            .iter()
            .map(|(id, m)| (*id, m.as_str().to_owned()))
            .collect();
        let mut frontends: BTreeMap<u32, BTreeMap<ServiceKey, ServiceValue>> = BTreeMap::new();
        for id in names.keys() {
            frontends.entry(*id).or_default();
        }
        for (k, v) in &snap.services {
            frontends.entry(v.svc_id).or_default().insert(*k, *v);
        }
        // Ranges of an id nobody names are an orphan's: removed by the next apply.
        let mut src_ranges: BTreeMap<u32, BTreeSet<SrcRange>> = BTreeMap::new();
        for r in &snap.src_ranges {
            frontends.entry(r.svc_id).or_default();
            src_ranges.entry(r.svc_id).or_default().insert(*r);
        }
        Self {
            names,
            frontends,
            src_ranges,
        }
    }
}

/// The tables a port's frontends name, and the other ranges they name (a switch
/// interrupted by a crash leaves frontends of one table on different ranges; the table is
/// then rebuilt).
fn tables_named_by(frontends: &BTreeMap<ServiceKey, ServiceValue>) -> (Tables, Vec<(u32, u32)>) {
    let mut tables: Tables = Default::default();
    let mut leftover = Vec::new();
    for (k, v) in frontends {
        let range = (v.maglev_offset, v.maglev_size);
        match &mut tables[frontend_table_index(k, v.flags)] {
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
                });
            }
        }
    }
    (tables, leftover)
}

impl<W: MapWriter> Reconciler<W> {
    /// Rebuilds the bookkeeping from the maps.
    pub(super) fn load(&mut self) -> Result<(), ReconcileError> {
        let snap = self.writer.snapshot()?;
        self.adopt_backends(&snap);
        self.adopt_ports(&snap)?;
        self.service_ids = IdAlloc::with_used(
            self.limits.services,
            self.services.values().map(|s| s.svc_id),
        );
        self.vips = snap.vips.iter().map(|(a, v)| (*a, v.frontends)).collect();
        self.resync = false;
        // Adopted tables may be dirty and leftover ranges must be freed: a full diff first.
        self.applied = None;
        Ok(())
    }

    fn adopt_backends(&mut self, snap: &MapSnapshot) {
        self.backends.clear();
        self.backend_id_of.clear();
        let meta: BTreeMap<u32, String> = snap
            .be_meta
            .iter()
            .map(|(id, m)| (*id, m.as_str().to_owned()))
            .collect();
        for (id, b) in &snap.backends {
            let identity = (b.addr, b.port_be);
            // Two slots with one identity cannot come from this reconciler; keep the first
            // as the identity's id, the other one is deleted once no table names it.
            self.backend_id_of.entry(identity).or_insert(*id);
            self.backends.insert(
                *id,
                BackendState {
                    identity,
                    meta: meta.get(id).cloned().unwrap_or_default(),
                },
            );
        }
        self.stale_backend_meta = meta
            .keys()
            .filter(|id| !self.backends.contains_key(id))
            .copied()
            .collect();
        self.backend_ids = IdAlloc::with_used(self.limits.backends, self.backends.keys().copied());
    }

    fn adopt_ports(&mut self, snap: &MapSnapshot) -> Result<(), MapError> {
        let mut ports = PortsById::of(snap);
        self.services.clear();
        self.maglev_ranges = RangeAlloc::new(self.limits.maglev_slots);
        for (svc_id, frontends) in std::mem::take(&mut ports.frontends) {
            let name = match ports.names.get(&svc_id) {
                Some(n) if !self.services.contains_key(n) => n.clone(),
                // Frontends without a name (or a duplicate name) are nobody's: they are
                // removed by the next apply, as no desired service has this name.
                _ => format!("<orphan svc_id {svc_id}>"),
            };
            let (mut tables, leftover) = tables_named_by(&frontends);
            let mut leftover_ranges = Vec::new();
            for (offset, size) in leftover {
                if self.maglev_ranges.reserve(offset, size) {
                    leftover_ranges.push((offset, size));
                }
            }
            self.adopt_tables(&mut tables)?;
            self.services.insert(
                name,
                SvcState {
                    frontends,
                    tables,
                    leftover_ranges,
                    src_ranges: ports.src_ranges.remove(&svc_id).unwrap_or_default(),
                    ..SvcState::new(svc_id)
                },
            );
        }
        Ok(())
    }

    /// Reserves the tables' ranges and reads their members from MAGLEV; a table that
    /// cannot be taken as it is gets marked dirty, to be rebuilt by the next apply.
    fn adopt_tables(&mut self, tables: &mut Tables) -> Result<(), MapError> {
        for (index, table) in tables.iter_mut().enumerate() {
            let Some(table) = table else { continue };
            if table.size == 0 {
                continue;
            }
            if !self.maglev_ranges.reserve(table.offset, table.size) {
                // Overlaps another table or lies outside MAGLEV: rebuild elsewhere and do
                // not free it afterwards (it is not ours alone).
                table.dirty = true;
                table.size = 0;
                table.offset = 0;
                continue;
            }
            for id in self.writer.read_maglev(table.offset, table.size)? {
                table.ids.insert(id);
                match self.backends.get(&id) {
                    Some(b)
                        if family(&b.identity.0) == family_of_table(index)
                            && self.backend_id_of.get(&b.identity) == Some(&id) =>
                    {
                        table.members.insert(b.identity);
                    }
                    _ => table.dirty = true,
                }
            }
        }
        Ok(())
    }
}
