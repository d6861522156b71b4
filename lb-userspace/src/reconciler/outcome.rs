//! What an apply reports: the writes it made ([`ApplyStats`]) and, when it could not do
//! everything, which service ports it left as they were and why ([`ReconcileError`]).

use std::fmt;

use crate::maps::MapError;

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

/// Why an apply did not make the maps hold the whole desired state.
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

fn join(failures: &[ServiceFailure]) -> String {
    failures
        .iter()
        .map(std::string::ToString::to_string)
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
