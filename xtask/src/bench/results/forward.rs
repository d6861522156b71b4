//! `bench forward`'s results: packets per second delivered to pods, per path and service
//! count, for established and new flows.

use super::{lenient_float, Summary};
use serde::{Deserialize, Serialize};

/// What carries the packets from the edge to the pods.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// `xdp_bench_redirect`: redirect to a pod's veth and nothing else.
    Ceiling,
    /// lb-agent `--xdp-mode auto`, with the pod veths flagged IFACE_F_REDIRECT_OK by the
    /// benchmark (their peers run NAPI here): native XDP_REDIRECT into the pod veth.
    XdplbRedirect,
    /// lb-agent `--xdp-mode generic`: the program runs on the skb and redirects it.
    XdplbGeneric,
    /// lb-agent `--xdp-mode auto` as shipped: native on the edge, NATed frames passed to
    /// the stack, which routes them to the pod.
    XdplbStack,
    /// kube-proxy iptables mode (iptables-restore of kube-proxy's chains).
    Iptables,
    /// kube-proxy nftables mode (`nft -f` of kube-proxy's table).
    Nftables,
}

/// Every path, in the order they are measured and shown.
pub const PATHS: [Path; 6] = [
    Path::Ceiling,
    Path::XdplbRedirect,
    Path::XdplbGeneric,
    Path::XdplbStack,
    Path::Iptables,
    Path::Nftables,
];

impl Path {
    /// Its name in the results.
    pub fn name(self) -> &'static str {
        match self {
            Path::Ceiling => "ceiling",
            Path::XdplbRedirect => "xdplb_redirect",
            Path::XdplbGeneric => "xdplb_generic",
            Path::XdplbStack => "xdplb_stack",
            Path::Iptables => "iptables",
            Path::Nftables => "nftables",
        }
    }

    /// Its name on the page.
    pub fn label(self) -> &'static str {
        match self {
            Path::Ceiling => "no-op XDP redirect (ceiling)",
            Path::XdplbRedirect => "xdplb, native redirect",
            Path::XdplbGeneric => "xdplb, generic-mode redirect",
            Path::XdplbStack => "xdplb, pass to stack (default)",
            Path::Iptables => "kube-proxy iptables",
            Path::Nftables => "kube-proxy nftables",
        }
    }
}

/// The traffic of a measurement.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Traffic {
    /// FLOWS flows, all known before the measurement.
    Established,
    /// NEW_FLOWS flows: nearly every packet starts one.
    NewFlows,
}

/// Every traffic, in the order they are measured.
pub const TRAFFIC: [Traffic; 2] = [Traffic::Established, Traffic::NewFlows];

/// One path's figures with one traffic.
#[derive(Debug, Serialize, Deserialize)]
pub struct Figures {
    /// Frames counted at the pods per second, per round.
    pub pps: Summary,
    /// Frames the generator sent per second, per round.
    pub sent_pps: Summary,
    /// Delivered / sent, per round.
    pub delivered_share: Summary,
    /// Per round: this path's pps / iptables' pps of the same round.
    pub vs_iptables: Summary,
    /// Per round: this path's pps / the ceiling's pps of the same round.
    pub vs_ceiling: Summary,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PathResult {
    pub path: Path,
    pub label: String,
    /// Setup time of this path (rules or agent start, attach), seconds.
    #[serde(deserialize_with = "lenient_float")]
    pub setup_s: f64,
    pub established: Figures,
    pub new_flows: Figures,
    /// xdplb's verdict counters over the whole point (which path the packets took).
    pub reasons: Vec<(String, u64)>,
}

impl PathResult {
    pub fn figures(&self, traffic: Traffic) -> &Figures {
        match traffic {
            Traffic::Established => &self.established,
            Traffic::NewFlows => &self.new_flows,
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

#[derive(Debug, Serialize, Deserialize)]
pub struct ForwardResults {
    pub rounds: usize,
    #[serde(deserialize_with = "lenient_float")]
    pub seconds_per_run: f64,
    #[serde(deserialize_with = "lenient_float")]
    pub seconds_per_new_flows_run: f64,
    pub frame_len_on_wire: usize,
    pub flows: u32,
    pub new_flows: u32,
    pub hot_services: usize,
    pub iptables_version: String,
    pub nft_version: String,
    pub points: Vec<Point>,
}
