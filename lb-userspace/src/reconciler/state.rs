//! The reconciler's bookkeeping: what it knows the maps hold for each service port and
//! backend, so that an apply diffs against memory instead of re-reading the maps.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{ServiceKey, ServiceValue, SVC_F_AFFINITY};

use super::keys::{scope_of_table, BackendIdentity, SCOPES, TABLES_PER_PORT};
use crate::maps::SrcRange;

/// One Maglev table as it is in MAGLEV.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Table {
    pub(super) offset: u32,
    /// 0: no ready endpoints, no range.
    pub(super) size: u32,
    /// Backend ids the slots name.
    pub(super) ids: BTreeSet<u32>,
    /// Their identities.
    pub(super) members: BTreeSet<BackendIdentity>,
    /// Must be rebuilt even if the members are right (found inconsistent when adopting).
    pub(super) dirty: bool,
}

/// A port's tables, by [`table_index`](super::keys::table_index).
pub(super) type Tables = [Option<Table>; TABLES_PER_PORT];

/// A service port's entries in the maps.
#[derive(Clone, Debug)]
pub(super) struct SvcState {
    pub(super) svc_id: u32,
    pub(super) frontends: BTreeMap<ServiceKey, ServiceValue>,
    pub(super) tables: Tables,
    /// Ranges found in the maps besides the tables (a switch interrupted by a crash);
    /// freed at the next rebuild of this service.
    pub(super) leftover_ranges: Vec<(u32, u32)>,
    /// Listed endpoints in none of the tables: their backends stay for established flows.
    /// Not in the maps as such (a backend is a backend): empty after adopting, until the
    /// first apply, which diffs every port.
    pub(super) kept: BTreeSet<BackendIdentity>,
    /// SRC_RANGES entries under `svc_id`.
    pub(super) src_ranges: BTreeSet<SrcRange>,
}

impl SvcState {
    pub(super) fn new(svc_id: u32) -> Self {
        Self {
            svc_id,
            frontends: BTreeMap::new(),
            tables: Default::default(),
            leftover_ranges: Vec::new(),
            kept: BTreeSet::new(),
            src_ranges: BTreeSet::new(),
        }
    }

    pub(super) fn has_affinity(&self) -> bool {
        self.frontends
            .values()
            .any(|v| v.flags & SVC_F_AFFINITY != 0)
    }

    /// Backend ids of the tables of each scope: where the programs may have pinned an
    /// affinity entry.
    pub(super) fn ids_by_scope(&self) -> [BTreeSet<u32>; SCOPES] {
        let mut out: [BTreeSet<u32>; SCOPES] = Default::default();
        for (index, table) in self.tables.iter().enumerate() {
            if let Some(table) = table {
                out[scope_of_table(index)].extend(table.ids.iter().copied());
            }
        }
        out
    }
}

/// A BACKENDS slot in use.
#[derive(Clone, Debug)]
pub(super) struct BackendState {
    pub(super) identity: BackendIdentity,
    /// Its BE_META name.
    pub(super) meta: String,
}
