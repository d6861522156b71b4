//! The working set of one apply, handed from phase to phase ([`super::phases`],
//! [`super::switch`], [`super::removals`]).

use std::collections::{BTreeMap, BTreeSet};

use lb_common::ServiceKey;

use super::keys::BackendIdentity;
use super::plan::WantedPort;
use super::{ApplyStats, ServiceFailure, Shortage};

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
    pub(super) fn refuse(&mut self, name: &str, shortage: Shortage) {
        self.failures.push(ServiceFailure {
            service: name.to_owned(),
            shortage,
        });
        self.wanted.remove(name);
    }

    pub(super) fn wanted_names(&self) -> Vec<String> {
        self.wanted.keys().cloned().collect()
    }
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
