//! Phase 3 of an apply (see [`super::phases`]): everything a frontend needs before it
//! names it (the names of new ports, new source ranges, VIP counts), then every wanted
//! frontend as one atomic write onto its port's new tables. After the switch no frontend
//! names an old range, so phase 4 may remove what only the old state used.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{NameMeta, ServiceKey, ServiceValue, VipInfo};

use super::keys::{frontend_table_index, is_vip, BackendIdentity};
use super::pass::{FinalFrontends, Pass, Switched};
use super::plan::WantedPort;
use super::state::{SvcState, Tables};
use super::Reconciler;
use crate::maps::{MapError, MapWriter, SrcRange};

impl<W: MapWriter> Reconciler<W> {
    /// Final frontends: wanted ones, plus the current ones of ports that were refused;
    /// and the VIP counts they (and the unchanged ports' frontends) make.
    pub(super) fn final_frontends(&self, pass: &Pass<'_>) -> FinalFrontends {
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
    pub(super) fn write_new_names(
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
    pub(super) fn write_new_src_ranges(
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
    pub(super) fn write_vips(
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
    pub(super) fn switch_frontends(
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
    pub(super) fn keep_backends_of_refused(&mut self, pass: &Pass<'_>) {
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
