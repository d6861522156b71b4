//! The write phases of one apply, in the order of the module documentation. Each phase
//! is one function; [`Reconciler::apply_ports`] runs them in order, and that order is what
//! keeps the data path from ever seeing a half-written service port:
//!
//! 0. refuse the ports that cannot fit (frontends, VIPs, source ranges at the peak);
//! 1. new and changed backends;
//! 2. new Maglev tables into freshly allocated ranges;
//! 3. ([`super::switch`]) names of new ports, new source ranges, VIP counts, then every
//!    frontend as an atomic switch to its new table;
//! 4. ([`super::removals`]) unwanted frontends, old source ranges, removed ports, affinity
//!    entries, old ranges, unreferenced backends, unused VIPs.
//!
//! A port refused in any phase keeps what the maps hold for it; the others go on. The
//! working set handed from phase to phase is in [`super::pass`].

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Backend, NameMeta, ServiceKey, ServiceValue, BACKEND_F_ACTIVE};

use super::keys::{is_vip, BackendIdentity};
use super::pass::Pass;
use super::plan::{plan_ports, table_size, table_slots, WantedPort};
use super::state::{BackendState, Table, Tables};
use super::{ApplyStats, PortsToDiff, ReconcileError, Reconciler, Shortage};
use crate::maps::{MapError, MapWriter, SrcRange};

/// What phase 2 made: the new tables of the diffed ports, the svc_ids of the new ones.
#[derive(Default)]
struct NewTables {
    /// The tables written for each port (an entry for every diffed port that fit).
    tables: BTreeMap<String, Tables>,
    /// The svc_ids allocated for new ports.
    svc_ids: BTreeMap<String, u32>,
}

/// Entries of SERVICES, VIPS and SRC_RANGES at the peak of the apply so far, counted
/// against the limits.
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
}
