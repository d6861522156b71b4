//! `bench prog`'s results: nanoseconds per packet of each case, per point of the sweeps
//! over services and endpoints, next to the no-op of the same runs.

use super::{lenient_float, lenient_pair, CapacitiesOut, Ratio, Shape, Summary};
use serde::{Deserialize, Serialize};

/// What a measured packet is.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Case {
    Miss,
    NewFlow,
    Established,
    Reply,
}

impl Case {
    /// Its name in the results, which the page's plot uses too.
    pub fn as_str(self) -> &'static str {
        match self {
            Case::Miss => "miss",
            Case::NewFlow => "new_flow",
            Case::Established => "established",
            Case::Reply => "reply",
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// Its name in the results, which the page's target lines use too.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// Which sweep a point belongs to.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Sweep {
    /// More and more service ports, one endpoint each.
    Services,
    /// More and more endpoints on 8 service ports.
    Endpoints,
}

impl Sweep {
    /// Its name in the results, which the page shows too.
    pub fn as_str(self) -> &'static str {
        match self {
            Sweep::Services => "services",
            Sweep::Endpoints => "endpoints",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CaseResult {
    pub case: Case,
    pub family: Family,
    /// Mean ns per packet of each run.
    pub ns: Summary,
    /// Per run: this case's mean / the no-op's mean of the same run (with the ~95% CI of
    /// its median, which the per-packet targets are decided on).
    pub ratio: Ratio,
    /// Per run, with the per-call timer overhead (no-op at repeat = 1 minus no-op at
    /// repeat = NOOP_REPEAT) taken out of both: (case - overhead) / no-op(repeat).
    pub ratio_net: Summary,
    /// Per run: this case's ratio to the no-op / the same case's ratio at the first point
    /// of the sweep, in the same run: how flat the case is across the sweep. Flatness is
    /// judged on the ~95% CI of its median: single runs are noisier than the ±10% asked
    /// for, the median over runs is not.
    #[serde(default)]
    pub vs_first_point: Ratio,
    /// The CI of `vs_first_point`'s median as result files recorded it before it moved
    /// into `vs_first_point.ci_95`; no longer written.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_pair"
    )]
    pub vs_first_point_ci: Option<[f64; 2]>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Point {
    pub sweep: Sweep,
    pub shape: Shape,
    pub frontends: usize,
    /// The map sizes the point was loaded with (`lb-agent --max-*`).
    #[serde(default)]
    pub capacities: CapacitiesOut,
    pub maglev_table_size: u32,
    pub maglev_slots_used: u64,
    /// Wall time of the reconciler's first apply of this state.
    #[serde(deserialize_with = "lenient_float")]
    pub apply_ms: f64,
    pub noop: Summary,
    /// The no-op's ns per repetition with repeat = NOOP_REPEAT (one call): the program
    /// without the per-call timer overhead.
    pub noop_repeat: Summary,
    pub cases: Vec<CaseResult>,
}

impl Point {
    /// The result of one case in one family, if measured.
    pub fn case(&self, case: Case, family: Family) -> Option<&CaseResult> {
        self.cases
            .iter()
            .find(|x| x.case == case && x.family == family)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProgResults {
    pub runs: usize,
    pub calls_per_run: usize,
    pub method: String,
    /// Program each case runs through (not recorded by the first runs).
    #[serde(default)]
    pub programs: Vec<(Case, String)>,
    pub points: Vec<Point>,
}
