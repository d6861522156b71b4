//! `bench tcp`'s results: connections per second and exchange latency through a VIP, per
//! path and service count, with per-round ratios against kube-proxy's paths.

use super::{lenient_float, Ratio, Summary};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    Xdplb,
    Iptables,
    Nftables,
}

/// Every path, in the order they are measured and shown.
pub const PATHS: [Path; 3] = [Path::Xdplb, Path::Iptables, Path::Nftables];

impl Path {
    /// Its name in the results (and in the page's plot).
    pub fn name(self) -> &'static str {
        match self {
            Path::Xdplb => "xdplb",
            Path::Iptables => "iptables",
            Path::Nftables => "nftables",
        }
    }

    /// Its name on the page.
    pub fn label(self) -> &'static str {
        match self {
            Path::Xdplb => "xdplb (default mode)",
            Path::Iptables => "kube-proxy iptables",
            Path::Nftables => "kube-proxy nftables",
        }
    }
}

/// One path at one service count. The first result file had no per-round figures and
/// compared with iptables' p50 and rate only: what it lacks reads as NaN, or as absent
/// where the page leaves a missing comparison out.
#[derive(Debug, Serialize, Deserialize)]
pub struct PathResult {
    pub path: Path,
    pub label: String,
    /// Completed exchanges per second, per round.
    pub conns_per_s: Summary,
    /// Latency of every exchange of every round, microseconds.
    pub latency_us: Summary,
    /// This path's median latency of each round (µs), summarised over rounds.
    #[serde(default)]
    pub p50_per_round_us: Summary,
    /// This path's 99th percentile of each round (µs), summarised over rounds.
    #[serde(default)]
    pub p99_per_round_us: Summary,
    /// Per round: this path's median latency / iptables' of the same round.
    pub p50_vs_iptables: Ratio,
    /// Per round: this path's p99 latency / iptables' of the same round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_vs_iptables: Option<Ratio>,
    /// Per round: this path's connections/s / iptables' of the same round.
    pub rate_vs_iptables: Ratio,
    /// Per round: this path's median latency / nftables' of the same round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_vs_nftables: Option<Ratio>,
    /// Per round: this path's p99 latency / nftables' of the same round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_vs_nftables: Option<Ratio>,
    /// Per round: this path's connections/s / nftables' of the same round.
    #[serde(default)]
    pub rate_vs_nftables: Ratio,
    /// Per round: this path's median latency / the same path's at the first (smallest)
    /// service count, measured in the same round: how flat the path is.
    #[serde(default)]
    pub p50_vs_first_point: Ratio,
    pub errors: u64,
}

impl PathResult {
    /// This path's `quantile` ("p50" or "p99") latency against `baseline`'s, per round, if
    /// the result file has that comparison.
    pub fn latency_vs(&self, quantile: &str, baseline: Path) -> Option<&Ratio> {
        match (quantile, baseline) {
            ("p50", Path::Iptables) => Some(&self.p50_vs_iptables),
            ("p99", Path::Iptables) => self.p99_vs_iptables.as_ref(),
            ("p50", Path::Nftables) => self.p50_vs_nftables.as_ref(),
            ("p99", Path::Nftables) => self.p99_vs_nftables.as_ref(),
            _ => None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Point {
    pub services: usize,
    pub hot: usize,
    pub paths: Vec<PathResult>,
}

impl Point {
    pub fn path(&self, path: Path) -> Option<&PathResult> {
        self.paths.iter().find(|x| x.path == path)
    }
}

/// Result files written before rounds were sliced measured each setup in one go.
fn one_slice() -> usize {
    1
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TcpResults {
    pub rounds: usize,
    /// Seconds each setup is measured per round, in `slices_per_round` interleaved turns.
    #[serde(deserialize_with = "lenient_float")]
    pub seconds_per_run: f64,
    #[serde(default = "one_slice")]
    pub slices_per_round: usize,
    pub client_threads: usize,
    pub hot_services: usize,
    /// Not recorded by the first result file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iptables_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nft_version: Option<String>,
    pub points: Vec<Point>,
}
