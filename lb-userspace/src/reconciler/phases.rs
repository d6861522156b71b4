//! The write phases of one apply, in the order of the module documentation. Each phase
//! is one function; [`Reconciler::apply_ports`] runs them in order, and that order is what
//! keeps the data path from ever seeing a half-written service port:
//!
//! 0. refuse the ports that cannot fit (frontends, VIPs, source ranges at the peak);
//! 1. new and changed backends;
//! 2. new Maglev tables into freshly allocated ranges;
//! 3. names of new ports, new source ranges, VIP counts, then every frontend as an atomic
//!    switch to its new table;
//! 4. removals ([`super::removals`]): unwanted frontends, old source ranges, removed ports,
//!    affinity entries, old ranges, unreferenced backends, unused VIPs.
//!
//! A port refused in any phase keeps what the maps hold for it; the others go on.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Backend, NameMeta, ServiceKey, ServiceValue, VipInfo, BACKEND_F_ACTIVE};

use super::keys::{frontend_table_index, is_vip, BackendIdentity};
use super::plan::{plan_ports, table_size, table_slots, WantedPort};
use super::state::{BackendState, SvcState, Table, Tables};
use super::{ApplyStats, PortsToDiff, ReconcileError, Reconciler, ServiceFailure, Shortage};
use crate::maps::{MapError, MapWriter, SrcRange};

/// One apply's working set, handed from phase to phase.
pub(super) struct Pass<'a> {
    /// Names of the ports whose maps already hold their desired state: left alone, but
    /// still counted for VIPs and backends.
    pub(super) unchanged: &'a BTreeSet<String>,
    pub(super) stats: ApplyStats,
    pub(super) failures: Vec<ServiceFailure>,
    /// The diffed ports still being applied, by SVC_META name.
    pub(super) wanted: BTreeMap<String, WantedPort>,
    /// Backends each diffed port wants kept for established flows (see `plan::Plan`).
    pub(super) desired_kept: BTreeMap<String, Vec<BackendIdentity>>,
}

impl Pass<'_> {
    /// Leaves port `name` as the maps hold it.
    fn refuse(&mut self, name: &str, shortage: Shortage) {
        self.failures.push(ServiceFailure {
            service: name.to_owned(),
            shortage,
        });
        self.wanted.remove(name);
    }

    fn wanted_names(&self) -> Vec<String> {
        self.wanted.keys().cloned().collect()
    }
}

/// Ports new in this apply, with what phase 2 made for the diffed ones.
#[derive(Default)]
struct NewTables {
    /// The tables written for each port (an entry for every diffed port that fit).
    tables: BTreeMap<String, Tables>,
    /// The svc_ids allocated for new ports.
    svc_ids: BTreeMap<String, u32>,
}

/// What the maps hold once this apply is through.
pub(super) struct FinalFrontends {
    /// Every frontend of a diffed or refused port → whether it counts in VIPS.
    pub(super) frontends: BTreeMap<ServiceKey, bool>,
    /// VIPS: address → number of frontends on it (unchanged ports' included).
    pub(super) vips: BTreeMap<[u8; 16], u32>,
}

/// What the switch (phase 3) leaves for the removals (phase 4).
pub(super) struct Switched {
    /// Which service port holds each frontend now (a frontend can change hands).
    pub(super) owner: BTreeMap<ServiceKey, String>,
    /// MAGLEV ranges no frontend names any more: freed after the removals.
    pub(super) old_ranges: Vec<(u32, u32)>,
    /// Ports whose AFFINITY entries must be checked after the switch; ports without
    /// affinity have none (the programs write entries only for affinity frontends, and
    /// losing affinity purges them).
    pub(super) purge: BTreeSet<u32>,
    /// Ports that had affinity before this apply.
    pub(super) had_affinity: BTreeSet<u32>,
    /// A backend may have lost its last reference: scan for unreferenced ones.
    pub(super) may_orphan: bool,
}

/// Frontends currently in the maps, counted against the limits.
struct Usage {
    frontends: usize,
    vips: usize,
    src_ranges: usize,
}

impl<W: MapWriter> Reconciler<W> {
    /// Applies `ports` (the diffed ones); `unchanged` ports are left alone; `diff_all`:
    /// nothing was known to be applied, so every port is diffed and every AFFINITY entry
    /// checked.
    pub(super) fn apply_ports(
        &mut self,
        ports: &PortsToDiff<'_>,
        unchanged: &BTreeSet<String>,
        diff_all: bool,
    ) -> Result<ApplyStats, ReconcileError> {
        let plan = plan_ports(ports);
        let mut pass = Pass {
            unchanged,
            stats: ApplyStats {
                ports_diffed: ports.len(),
                ..ApplyStats::default()
            },
            failures: plan.conflicts,
            wanted: plan.wanted,
            desired_kept: plan.desired_kept,
        };
        self.refuse_what_does_not_fit(&mut pass);
        self.write_backends(&mut pass)?;
        let new_tables = self.write_tables(&mut pass)?;
        let final_frontends = self.final_frontends(&pass);
        self.write_new_names(&mut pass, &new_tables.svc_ids)?;
        let src_ranges_wanted = self.write_new_src_ranges(&mut pass)?;
        self.write_vips(&mut pass, &final_frontends.vips)?;
        let mut switched = self.switch_frontends(&mut pass, new_tables.tables)?;
        self.keep_backends_of_refused(&pass);
        self.remove(
            &mut pass,
            &final_frontends,
            &src_ranges_wanted,
            &mut switched,
            diff_all,
        )?;
        if pass.failures.is_empty() {
            Ok(pass.stats)
        } else {
            Err(ReconcileError::ServicesNotApplied {
                failures: pass.failures,
                stats: Box::new(pass.stats),
            })
        }
    }

    /// Phase 0, capacity of SERVICES, VIPS and SRC_RANGES at the peak (before removals): a
    /// port that would overflow one is refused, the ones before it (by name) fit.
    fn refuse_what_does_not_fit(&self, pass: &mut Pass<'_>) {
        let mut usage = Usage {
            frontends: self.services.values().map(|s| s.frontends.len()).sum(),
            vips: self.vips.len(),
            src_ranges: self.services.values().map(|s| s.src_ranges.len()).sum(),
        };
        let current_keys: BTreeSet<ServiceKey> = self
            .services
            .values()
            .flat_map(|s| s.frontends.keys().copied())
            .collect();
        let mut new_vips: BTreeSet<[u8; 16]> = BTreeSet::new();
        for name in pass.wanted_names() {
            let Some(wanted) = pass.wanted.get(&name) else {
                continue;
            };
            let added: Vec<(&ServiceKey, &ServiceValue)> = wanted
                .frontends
                .iter()
                .filter(|(k, _)| !current_keys.contains(k))
                .collect();
            // NodePorts are on host addresses, which are not VIPs (see `is_vip`).
            let vips: BTreeSet<[u8; 16]> = added
                .iter()
                .filter(|(_, v)| is_vip(v.flags))
                .map(|(k, _)| k.addr)
                .filter(|a| !self.vips.contains_key(a) && !new_vips.contains(a))
                .collect();
            let new_ranges = self.new_src_range_count(&name, wanted);
            let limits = &self.limits;
            let shortage = if usage.frontends + added.len() > limits.frontends as usize {
                Some(Shortage::Frontends)
            } else if usage.vips + vips.len() > limits.vips as usize {
                Some(Shortage::Vips)
            } else if usage.src_ranges + new_ranges > limits.src_ranges as usize {
                Some(Shortage::SourceRanges { needed: new_ranges })
            } else {
                None
            };
            if let Some(shortage) = shortage {
                pass.refuse(&name, shortage);
                continue;
            }
            usage.frontends += added.len();
            usage.vips += vips.len();
            usage.src_ranges += new_ranges;
            new_vips.extend(vips);
        }
    }

    /// How many SRC_RANGES entries port `name` needs besides the ones it has.
    fn new_src_range_count(&self, name: &str, wanted: &WantedPort) -> usize {
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
        wanted
            .src_ranges
            .iter()
            .map(|p| SrcRange::new(0, p))
            .collect::<BTreeSet<_>>()
            .difference(&have)
            .count()
    }

    /// Phase 1, backends: new ones (in tables or kept for flows), and changed names.
    /// Written together after the loop (one batch per map, see `MapWriter::put_backends`);
    /// the bookkeeping runs ahead of the maps only until then, and a failed write makes
    /// the next apply re-read the maps anyway.
    fn write_backends(&mut self, pass: &mut Pass<'_>) -> Result<(), MapError> {
        let mut seen: BTreeSet<BackendIdentity> = BTreeSet::new();
        let mut writes: Vec<(u32, Backend, NameMeta)> = Vec::new();
        for name in pass.wanted_names() {
            let Some(wanted) = pass.wanted.get(&name) else {
                continue;
            };
            let needed = wanted.backends();
            let new = needed
                .keys()
                .filter(|identity| !self.backend_id_of.contains_key(*identity))
                .count();
            if new > self.backend_ids.available() {
                let free = self.backend_ids.available();
                pass.refuse(&name, Shortage::BackendIds { needed: new, free });
                continue;
            }
            for (identity, meta) in &needed {
                if seen.insert(*identity) {
                    writes.extend(self.note_backend(identity, meta));
                }
            }
        }
        self.writer.put_backends(&writes)?;
        pass.stats.backends_put += writes.len();
        Ok(())
    }

    /// Books backend `identity` named `meta` (a new id when it has none) and returns the
    /// write it needs, if any.
    fn note_backend(
        &mut self,
        identity: &BackendIdentity,
        meta: &str,
    ) -> Option<(u32, Backend, NameMeta)> {
        let backend = Backend {
            addr: identity.0,
            port_be: identity.1,
            _pad: [0; 2],
            flags: BACKEND_F_ACTIVE,
        };
        match self.backend_id_of.get(identity) {
            Some(&id) => {
                let state = self.backends.get_mut(&id)?;
                if state.meta == meta {
                    return None;
                }
                state.meta = meta.to_owned();
                Some((id, backend, NameMeta::new(meta)))
            }
            None => {
                // Counted by the caller; cannot fail.
                let id = self.backend_ids.alloc()?;
                self.stale_backend_meta.remove(&id);
                self.backend_id_of.insert(*identity, id);
                self.backends.insert(
                    id,
                    BackendState {
                        identity: *identity,
                        meta: meta.to_owned(),
                    },
                );
                Some((id, backend, NameMeta::new(meta)))
            }
        }
    }

    /// Phase 2, tables: a new range for every changed (service port, family, scope), and
    /// a svc_id for every new port.
    fn write_tables(&mut self, pass: &mut Pass<'_>) -> Result<NewTables, MapError> {
        let mut new = NewTables::default();
        for name in pass.wanted_names() {
            let Some(wanted) = pass.wanted.get(&name) else {
                continue;
            };
            if !self.services.contains_key(&name) {
                let Some(id) = self.service_ids.alloc() else {
                    pass.refuse(&name, Shortage::ServiceIds);
                    continue;
                };
                new.svc_ids.insert(name.clone(), id);
            }
            match self.write_port_tables(&name, wanted, &mut pass.stats)? {
                Ok(tables) => {
                    new.tables.insert(name, tables);
                }
                Err(shortage) => {
                    if let Some(id) = new.svc_ids.remove(&name) {
                        self.service_ids.release(id);
                    }
                    pass.refuse(&name, shortage);
                }
            }
        }
        Ok(new)
    }

    /// Writes the changed tables of port `name` into new ranges. The inner error: MAGLEV
    /// has no free range large enough; the ranges allocated so far are given back (no
    /// frontend names them yet).
    fn write_port_tables(
        &mut self,
        name: &str,
        wanted: &WantedPort,
        stats: &mut ApplyStats,
    ) -> Result<Result<Tables, Shortage>, MapError> {
        let mut out: Tables = Default::default();
        for (index, members) in wanted.tables.iter().enumerate() {
            let Some(members) = members else { continue };
            let members: BTreeSet<BackendIdentity> = members.keys().copied().collect();
            let current = self
                .services
                .get(name)
                .and_then(|s| s.tables[index].as_ref());
            let size = table_size(&members, current.map(|t| t.size));
            let unchanged =
                current.is_some_and(|t| !t.dirty && t.size == size && t.members == members);
            if unchanged {
                continue;
            }
            let offset = if size == 0 {
                0
            } else if let Some(offset) = self.maglev_ranges.alloc(size) {
                offset
            } else {
                for table in out.iter().flatten().filter(|t| t.size > 0) {
                    self.maglev_ranges.release(table.offset, table.size);
                }
                return Ok(Err(Shortage::MaglevSlots { needed: size }));
            };
            let mut ids = BTreeSet::new();
            if size > 0 {
                // Phase 1 gave every member an id; `table_slots` keeps the indices aligned
                // with BACKEND_NONE if that were ever broken.
                let slots = table_slots(&members, size, |b| self.backend_id_of.get(b).copied());
                ids.extend(slots.iter().copied());
                self.writer.put_maglev(offset, &slots)?;
                stats.tables_written += 1;
                stats.slots_written += slots.len();
            }
            out[index] = Some(Table {
                offset,
                size,
                ids,
                members,
                dirty: false,
            });
        }
        Ok(Ok(out))
    }

    /// Final frontends: wanted ones, plus the current ones of ports that were refused;
    /// and the VIP counts they (and the unchanged ports' frontends) make.
    fn final_frontends(&self, pass: &Pass<'_>) -> FinalFrontends {
        let mut frontends: BTreeMap<ServiceKey, bool> = BTreeMap::new();
        for wanted in pass.wanted.values() {
            for (k, v) in &wanted.frontends {
                frontends.insert(*k, is_vip(v.flags));
            }
        }
        for failure in &pass.failures {
            if let Some(s) = self.services.get(&failure.service) {
                for (k, v) in &s.frontends {
                    frontends.entry(*k).or_insert_with(|| is_vip(v.flags));
                }
            }
        }
        let mut vips: BTreeMap<[u8; 16], u32> = BTreeMap::new();
        for (k, vip) in &frontends {
            if *vip {
                *vips.entry(k.addr).or_insert(0) += 1;
            }
        }
        // Unchanged ports keep their frontends; none is claimed by a diffed port (`apply`
        // pulled such holders into the diff), so they are counted without a copy.
        for name in pass.unchanged {
            if let Some(s) = self.services.get(name) {
                for (k, v) in &s.frontends {
                    if is_vip(v.flags) && !frontends.contains_key(k) {
                        *vips.entry(k.addr).or_insert(0) += 1;
                    }
                }
            }
        }
        FinalFrontends { frontends, vips }
    }

    /// Phase 3a, SVC_META names of the new ports that are still wanted.
    fn write_new_names(
        &mut self,
        pass: &mut Pass<'_>,
        new_svc_ids: &BTreeMap<String, u32>,
    ) -> Result<(), MapError> {
        let metas: Vec<(u32, NameMeta)> = new_svc_ids
            .iter()
            .filter(|(name, _)| pass.wanted.contains_key(*name))
            .map(|(name, id)| (*id, NameMeta::new(name)))
            .collect();
        self.writer.put_svc_metas(&metas)?;
        for (name, id) in new_svc_ids {
            if pass.wanted.contains_key(name) {
                pass.stats.services_added += 1;
                self.services.insert(name.clone(), SvcState::new(*id));
            }
        }
        Ok(())
    }

    /// Phase 3b, source ranges: new prefixes before any frontend is flagged to check
    /// them; prefixes no longer wanted go only after the frontends switched (phase 4).
    /// Returns each port's wanted set.
    fn write_new_src_ranges(
        &mut self,
        pass: &mut Pass<'_>,
    ) -> Result<BTreeMap<String, BTreeSet<SrcRange>>, MapError> {
        let mut wanted_ranges: BTreeMap<String, BTreeSet<SrcRange>> = BTreeMap::new();
        for (name, wanted) in &pass.wanted {
            let Some(s) = self.services.get_mut(name) else {
                continue;
            };
            let want: BTreeSet<SrcRange> = wanted
                .src_ranges
                .iter()
                .map(|p| SrcRange::new(s.svc_id, p))
                .collect();
            for r in &want {
                if !s.src_ranges.contains(r) {
                    self.writer.put_src_range(r)?;
                    s.src_ranges.insert(*r);
                    pass.stats.src_ranges_put += 1;
                }
            }
            wanted_ranges.insert(name.clone(), want);
        }
        Ok(wanted_ranges)
    }

    /// Phase 3c, VIPS entries whose count changes (new ones included), before any
    /// frontend on them; the ones no frontend uses any more go last (phase 4).
    fn write_vips(
        &mut self,
        pass: &mut Pass<'_>,
        final_vips: &BTreeMap<[u8; 16], u32>,
    ) -> Result<(), MapError> {
        let writes: Vec<([u8; 16], VipInfo)> = final_vips
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
        self.writer.put_vips(&writes)?;
        for (addr, v) in &writes {
            self.vips.insert(*addr, v.frontends);
        }
        pass.stats.vips_put += writes.len();
        Ok(())
    }

    /// Phase 3d, the switch: every wanted frontend onto its port's new tables, written
    /// together (and before any removal).
    fn switch_frontends(
        &mut self,
        pass: &mut Pass<'_>,
        mut new_tables: BTreeMap<String, Tables>,
    ) -> Result<Switched, MapError> {
        let mut switched = Switched {
            owner: self
                .services
                .iter()
                .flat_map(|(n, s)| s.frontends.keys().map(move |k| (*k, n.clone())))
                .collect(),
            old_ranges: Vec::new(),
            purge: BTreeSet::new(),
            had_affinity: self
                .services
                .values()
                .filter(|s| s.has_affinity())
                .map(|s| s.svc_id)
                .collect(),
            may_orphan: pass.unchanged.is_empty() || !pass.failures.is_empty(),
        };
        let mut writes: Vec<(ServiceKey, ServiceValue)> = Vec::new();
        for (name, wanted) in &pass.wanted {
            let tables = new_tables.remove(name).unwrap_or_default();
            self.switch_port(name, wanted, tables, &mut switched, &mut writes);
        }
        self.writer.put_frontends(&writes)?;
        pass.stats.frontends_put += writes.len();
        Ok(switched)
    }

    /// The switch of one port: its frontend writes, and its bookkeeping moved to the new
    /// tables (the old ranges to be freed, affinity entries to be checked).
    fn switch_port(
        &mut self,
        name: &str,
        wanted: &WantedPort,
        new_tables: Tables,
        switched: &mut Switched,
        writes: &mut Vec<(ServiceKey, ServiceValue)>,
    ) {
        let Some(s) = self.services.get(name) else {
            return;
        };
        let svc_id = s.svc_id;
        let old_ids = s.ids_by_scope();
        // The tables this service uses from now on.
        let now: Tables = std::array::from_fn(|index| {
            match (&new_tables[index], wanted.tables[index].is_some()) {
                (Some(t), _) => Some(t.clone()),
                (None, true) => s.tables[index].clone(),
                (None, false) => None,
            }
        });
        self.switch_port_frontends(name, svc_id, wanted, &now, switched, writes);
        let Some(s) = self.services.get_mut(name) else {
            return;
        };
        for (old, new) in s.tables.iter().zip(&now) {
            let Some(old) = old else { continue };
            let replaced = new
                .as_ref()
                .is_none_or(|n| old.offset != n.offset || old.size != n.size);
            if replaced && old.size > 0 {
                switched.old_ranges.push((old.offset, old.size));
            }
        }
        // Leftover ranges belong to a dirty table, which was rebuilt above, and every
        // frontend that named them now names the new one (or is deleted below).
        switched.old_ranges.append(&mut s.leftover_ranges);
        s.tables = now;
        let kept: BTreeSet<BackendIdentity> = wanted.kept.keys().copied().collect();
        if !s.kept.is_subset(&kept) {
            switched.may_orphan = true;
        }
        s.kept = kept;
        if switched.had_affinity.contains(&svc_id) {
            let new_ids = s.ids_by_scope();
            let left = old_ids
                .iter()
                .zip(&new_ids)
                .any(|(old, new)| !old.is_subset(new));
            if left || !s.has_affinity() {
                switched.purge.insert(svc_id);
            }
        }
    }

    /// The frontend writes of port `name` onto tables `now`, booked as its frontends (a
    /// frontend taken from another port is that one's no more).
    fn switch_port_frontends(
        &mut self,
        name: &str,
        svc_id: u32,
        wanted: &WantedPort,
        now: &Tables,
        switched: &mut Switched,
        writes: &mut Vec<(ServiceKey, ServiceValue)>,
    ) {
        for (k, want) in &wanted.frontends {
            let Some(table) = &now[frontend_table_index(k, want.flags)] else {
                continue;
            };
            let v = ServiceValue {
                svc_id,
                maglev_offset: table.offset,
                maglev_size: table.size,
                ..*want
            };
            let current = switched
                .owner
                .get(k)
                .and_then(|o| self.services.get(o))
                .and_then(|o| o.frontends.get(k))
                .copied();
            if current == Some(v) {
                continue;
            }
            writes.push((*k, v));
            if let Some(previous) = switched.owner.insert(*k, name.to_owned()) {
                if previous != name {
                    if let Some(o) = self.services.get_mut(&previous) {
                        o.frontends.remove(k);
                    }
                }
            }
            if let Some(s) = self.services.get_mut(name) {
                s.frontends.insert(*k, v);
            }
        }
    }

    /// A refused port keeps its old state, whose flows may use the backends its desired
    /// state keeps: they stay referenced.
    fn keep_backends_of_refused(&mut self, pass: &Pass<'_>) {
        for failure in &pass.failures {
            if let (Some(s), Some(kept)) = (
                self.services.get_mut(&failure.service),
                pass.desired_kept.get(&failure.service),
            ) {
                s.kept.extend(kept.iter().copied());
            }
        }
    }
}
