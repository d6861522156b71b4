//! `bench sync`'s results: the control plane's endpoint changes, full syncs and the maps'
//! memory, at the default capacities and sized for the workload.

use super::{lenient_float, missing_float, CapacitiesOut, Shape, Summary};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct FullSync {
    pub shape: Shape,
    /// Wall time of the first apply on empty maps.
    #[serde(deserialize_with = "lenient_float")]
    pub ms: f64,
    /// CPU time of that apply (the calling thread, user and kernel: the map writes are
    /// system calls), apart from the wall time because the machine is shared: what the
    /// apply costs rather than how long it waited for a CPU. Not recorded by the first
    /// runs.
    #[serde(default = "missing_float", deserialize_with = "lenient_float")]
    pub cpu_user_ms: f64,
    #[serde(default = "missing_float", deserialize_with = "lenient_float")]
    pub cpu_sys_ms: f64,
    pub services_applied: usize,
    pub services_not_applied: usize,
    /// Why some were not applied: service ports per shortage kind, if any.
    pub shortage: Option<String>,
    /// Map writes of the apply: MAGLEV slots (stored through the map's mmap, or in
    /// BPF_MAP_UPDATE_BATCH chunks when MAGLEV is not BPF_F_MMAPABLE) and all other entries
    /// (one batch per map and phase for the bulk of them: backends, names, VIPs,
    /// frontends; one syscall each for the rest).
    pub slots_written: usize,
    pub other_writes: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Churn {
    pub shape: Shape,
    pub changes: usize,
    /// One endpoint added to or removed from one service port, apply wall time (ms).
    pub change_ms: Summary,
    /// Apply of the unchanged state (the diff alone), same run (ms).
    pub unchanged_ms: Summary,
    /// Median MAGLEV slots written per change.
    #[serde(deserialize_with = "lenient_float")]
    pub slots_written_p50: f64,
    /// Mean ns of one BPF_MAP_UPDATE_ELEM on MAGLEV from user space, same run: the unit
    /// cost of every map write the reconciler makes.
    #[serde(deserialize_with = "lenient_float")]
    pub map_update_ns: f64,
}

/// One map's shape and the kernel's accounting of its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MapMem {
    pub name: String,
    pub map_type: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// BPF_F_* creation flags (BPF_F_MMAPABLE on MAGLEV: tables written through the mmap).
    /// Not recorded by the first runs.
    #[serde(default)]
    pub map_flags: u32,
    pub bytes_memlock: u64,
}

/// A full sync on maps loaded with capacities sized for its state (`lb-agent --max-*`).
#[derive(Debug, Serialize, Deserialize)]
pub struct SizedSync {
    #[serde(flatten)]
    pub sync: FullSync,
    /// "IPv4" or "IPv6" ClusterIPs and endpoints (100,000 distinct IPv4 ClusterIPs do not
    /// fit the benchmark's address plan in 198.18.0.0/15).
    pub family: String,
    pub capacities: CapacitiesOut,
    pub maps_total_bytes: u64,
    /// Everything but the flow tables (CT, RNAT, AFFINITY, SOCK_RNAT), whose size is a
    /// matter of traffic, not of services.
    pub service_maps_bytes: u64,
    /// service_maps_bytes / service ports.
    #[serde(default = "missing_float", deserialize_with = "lenient_float")]
    pub bytes_per_service: f64,
    /// CT + RNAT bytes per flow of `--max-flows` (one entry in each).
    #[serde(default = "missing_float", deserialize_with = "lenient_float")]
    pub bytes_per_flow: f64,
    /// AFFINITY + SOCK_RNAT (fixed sizes, not scaled by --max-flows).
    #[serde(default)]
    pub other_flow_maps_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SyncResults {
    pub churn: Churn,
    pub full_syncs: Vec<FullSync>,
    /// Full syncs with capacities sized for the state (none in the first runs).
    #[serde(default)]
    pub sized_syncs: Vec<SizedSync>,
    /// Map memory with capacities sized for 10,000 x 10.
    #[serde(default)]
    pub sized_maps: Vec<MapMem>,
    pub maps: Vec<MapMem>,
    pub maps_total_bytes: u64,
    /// maps_total_bytes / 10,000 service ports (the maps are preallocated, so the total
    /// does not depend on how many are in use).
    #[serde(deserialize_with = "lenient_float")]
    pub bytes_per_service_at_10000: f64,
    pub limits: Vec<String>,
}

impl SyncResults {
    /// bytes_memlock of one of the maps sized for 10,000 x 10 (0 if not recorded).
    pub fn sized_map_bytes(&self, name: &str) -> u64 {
        self.sized_maps
            .iter()
            .find(|m| m.name == name)
            .map_or(0, |m| m.bytes_memlock)
    }
}
