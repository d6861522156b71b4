//! Phase 4 of an apply: removals, after every frontend switched (see [`super::switch`]).
//! Frontends go first, then what only they used: source ranges, the names of removed
//! ports, AFFINITY entries, MAGLEV ranges, backends nobody lists, VIPs nobody uses.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::ServiceKey;

use super::keys::SCOPES;
use super::pass::{FinalFrontends, Pass, Switched};
use super::{ApplyStats, Reconciler};
use crate::maps::{MapError, MapWriter, SrcRange};

impl<W: MapWriter> Reconciler<W> {
    /// Phase 4, removals: frontends, source ranges, names, affinity entries, ranges,
    /// backends, VIPs, in this order.
    pub(super) fn remove(
        &mut self,
        pass: &mut Pass<'_>,
        final_frontends: &FinalFrontends,
        src_ranges_wanted: &BTreeMap<String, BTreeSet<SrcRange>>,
        switched: &mut Switched,
        diff_all: bool,
    ) -> Result<(), MapError> {
        self.delete_frontends(pass, &final_frontends.frontends, &mut switched.owner)?;
        self.delete_old_src_ranges(&mut pass.stats, src_ranges_wanted)?;
        self.remove_ports(pass, switched)?;
        self.purge_affinity(&switched.purge, diff_all, &mut pass.stats)?;
        switched.may_orphan |= !switched.old_ranges.is_empty();
        for (offset, size) in switched.old_ranges.drain(..) {
            self.maglev_ranges.release(offset, size);
            pass.stats.ranges_freed += 1;
        }
        self.delete_unused_backends(&mut pass.stats, switched.may_orphan)?;
        self.delete_unused_vips(&mut pass.stats, &final_frontends.vips)
    }

    /// Frontends of diffed ports that are not in the final set.
    fn delete_frontends(
        &mut self,
        pass: &mut Pass<'_>,
        final_frontends: &BTreeMap<ServiceKey, bool>,
        owner: &mut BTreeMap<ServiceKey, String>,
    ) -> Result<(), MapError> {
        let gone: Vec<ServiceKey> = self
            .services
            .iter()
            .filter(|(name, _)| !pass.unchanged.contains(*name))
            .flat_map(|(_, s)| s.frontends.keys().copied())
            .filter(|k| !final_frontends.contains_key(k))
            .collect();
        for k in &gone {
            self.writer.delete_frontend(k)?;
            pass.stats.frontends_deleted += 1;
            if let Some(o) = owner.remove(k) {
                if let Some(s) = self.services.get_mut(&o) {
                    s.frontends.remove(k);
                }
            }
        }
        Ok(())
    }

    /// Prefixes a still wanted port no longer lists (its frontends no longer check them).
    fn delete_old_src_ranges(
        &mut self,
        stats: &mut ApplyStats,
        src_ranges_wanted: &BTreeMap<String, BTreeSet<SrcRange>>,
    ) -> Result<(), MapError> {
        for (name, want) in src_ranges_wanted {
            let Some(s) = self.services.get_mut(name) else {
                continue;
            };
            let old: Vec<SrcRange> = s.src_ranges.difference(want).copied().collect();
            for r in old {
                self.writer.delete_src_range(&r)?;
                s.src_ranges.remove(&r);
                stats.src_ranges_deleted += 1;
            }
        }
        Ok(())
    }

    /// Ports neither wanted, refused nor unchanged: their source ranges and name; their
    /// ranges, svc_id and affinity entries are released later in this phase.
    fn remove_ports(
        &mut self,
        pass: &mut Pass<'_>,
        switched: &mut Switched,
    ) -> Result<(), MapError> {
        let failed: BTreeSet<&str> = pass.failures.iter().map(|f| f.service.as_str()).collect();
        let removed: Vec<String> = self
            .services
            .keys()
            .filter(|name| {
                !pass.wanted.contains_key(*name)
                    && !failed.contains(name.as_str())
                    && !pass.unchanged.contains(*name)
            })
            .cloned()
            .collect();
        for name in removed {
            self.remove_port(&name, switched, &mut pass.stats)?;
        }
        Ok(())
    }

    fn remove_port(
        &mut self,
        name: &str,
        switched: &mut Switched,
        stats: &mut ApplyStats,
    ) -> Result<(), MapError> {
        let Some(s) = self.services.get_mut(name) else {
            return Ok(());
        };
        // Its frontends were deleted before. Ranges go before the name, so an entry of
        // SRC_RANGES always belongs to a named service port (adopt relies on it).
        let ranges: Vec<SrcRange> = s.src_ranges.iter().copied().collect();
        for r in ranges {
            self.writer.delete_src_range(&r)?;
            s.src_ranges.remove(&r);
            stats.src_ranges_deleted += 1;
        }
        let svc_id = s.svc_id;
        self.writer.delete_svc_meta(svc_id)?;
        stats.services_removed += 1;
        let Some(s) = self.services.remove(name) else {
            return Ok(());
        };
        if switched.had_affinity.contains(&svc_id) {
            switched.purge.insert(svc_id);
        }
        switched.may_orphan = true;
        for t in s.tables.iter().flatten() {
            if t.size > 0 {
                switched.old_ranges.push((t.offset, t.size));
            }
        }
        switched.old_ranges.extend(s.leftover_ranges);
        // Its id is reused only by a later apply, after the entries below are gone.
        self.service_ids.release(svc_id);
        Ok(())
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
        let valid: BTreeMap<u32, [BTreeSet<u32>; SCOPES]> = self
            .services
            .values()
            .filter(|s| (all || svc_ids.contains(&s.svc_id)) && s.has_affinity())
            .map(|s| (s.svc_id, s.ids_by_scope()))
            .collect();
        for (k, v) in self.writer.affinity_entries()? {
            if !all && !svc_ids.contains(&k.svc_id) {
                continue;
            }
            let leads_somewhere = valid
                .get(&k.svc_id)
                .and_then(|ids| ids.get(k.scope as usize))
                .is_some_and(|ids| ids.contains(&v.backend_id));
            if !leads_somewhere {
                self.writer.delete_affinity(&k)?;
                stats.affinity_deleted += 1;
            }
        }
        Ok(())
    }

    /// Backends no table names and no port keeps, and BE_META entries of inactive slots.
    /// Without `may_orphan` the scan of every table is skipped: nothing lost a reference.
    fn delete_unused_backends(
        &mut self,
        stats: &mut ApplyStats,
        may_orphan: bool,
    ) -> Result<(), MapError> {
        let unused: Vec<u32> = if may_orphan {
            let mut live: BTreeSet<u32> = self
                .services
                .values()
                .flat_map(|s| s.tables.iter().flatten())
                .flat_map(|t| t.ids.iter().copied())
                .collect();
            for s in self.services.values() {
                live.extend(s.kept.iter().filter_map(|k| self.backend_id_of.get(k)));
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
            .chain(std::mem::take(&mut self.stale_backend_meta))
        {
            self.writer.delete_backend(id)?;
            stats.backends_deleted += 1;
            if let Some(b) = self.backends.remove(&id) {
                if self.backend_id_of.get(&b.identity) == Some(&id) {
                    self.backend_id_of.remove(&b.identity);
                }
            }
            self.backend_ids.release(id);
        }
        Ok(())
    }

    /// VIPS entries no final frontend uses.
    fn delete_unused_vips(
        &mut self,
        stats: &mut ApplyStats,
        final_vips: &BTreeMap<[u8; 16], u32>,
    ) -> Result<(), MapError> {
        let gone: Vec<[u8; 16]> = self
            .vips
            .keys()
            .filter(|a| !final_vips.contains_key(*a))
            .copied()
            .collect();
        for addr in gone {
            self.writer.delete_vip(&addr)?;
            self.vips.remove(&addr);
            stats.vips_deleted += 1;
        }
        Ok(())
    }
}
