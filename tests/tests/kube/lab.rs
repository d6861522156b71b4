//! The lab every agent test runs in: a topology, the fake API server in its node
//! namespace holding Services, EndpointSlices and Nodes as a cluster writes them
//! ([`SvcDef`], [`Ep`]), and the real agent in Kubernetes mode ([`KubeLab`]), with readers
//! of what `lbctl` shows.

use anyhow::{ensure, Context as _, Result};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::{Duration, Instant};
use tests::e2e::{self, Agent, PinDir};
use tests::fakeapi::FakeApi;
use tests::netns::{
    self, Topology, NODE_V4, NODE_V6, POD_HTTP_PORT, POD_PEER_ECHO_PORT, POD_TCP_ECHO_PORT,
};

// The agent in Kubernetes mode, real traffic
// =======================================================================================

pub(crate) const NODE: &str = "node-a";

pub(crate) const OTHER_NODE: &str = "node-b";

/// node-b's address: it must never become a NodePort frontend of node-a's agent.
pub(crate) const OTHER_NODE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);

pub(crate) const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);

pub(crate) const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);

pub(crate) const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0xa);

pub(crate) const LB_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x10);

pub(crate) const ECHO_PORT: u16 = 7000;

pub(crate) const PEER_PORT: u16 = 7100;

pub(crate) const HTTP_NODE_PORT: u16 = 30080;

pub(crate) const APPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// After an API outage the agent's watchers are in kube-runtime's backoff (0.8 s doubling,
/// with jitter): after the test's ~4 s outage the next retry is at most ~7 s away, and a
/// 410 re-lists at once (measured: ~5.5 s from the API's return to the maps).
pub(crate) const RECONVERGE_TIMEOUT: Duration = Duration::from_secs(15);

/// A Service as the API server would hold it after defaulting.
#[derive(Clone, Debug)]
pub(crate) struct SvcDef {
    pub(crate) name: &'static str,
    /// ClusterIP, NodePort or LoadBalancer.
    pub(crate) type_: &'static str,
    pub(crate) cluster_ip: Ipv4Addr,
    pub(crate) lb_ip: Option<Ipv4Addr>,
    /// Dual-stack (RequireDualStack): these IPv6 ClusterIP and LoadBalancer IP too.
    pub(crate) v6: Option<(Ipv6Addr, Option<Ipv6Addr>)>,
    /// (name, port, targetPort, nodePort); TCP.
    pub(crate) ports: Vec<(&'static str, u16, u16, Option<u16>)>,
    pub(crate) etp_local: bool,
    pub(crate) affinity_timeout: Option<i32>,
    pub(crate) source_ranges: Vec<&'static str>,
    pub(crate) health_check_node_port: Option<u16>,
}

impl SvcDef {
    /// `default/<name>`: http 80 -> 8080, echo 7000 -> 7000, peer 7100 -> 7100; NodePorts
    /// (as the API server allocates them) for NodePort and LoadBalancer types.
    pub(crate) fn new(name: &'static str, type_: &'static str, cluster_ip: Ipv4Addr) -> Self {
        let np = |n: u16| (type_ != "ClusterIP").then_some(n);
        SvcDef {
            name,
            type_,
            cluster_ip,
            lb_ip: None,
            v6: None,
            ports: vec![
                ("http", 80, POD_HTTP_PORT, np(HTTP_NODE_PORT)),
                ("echo", ECHO_PORT, POD_TCP_ECHO_PORT, np(30700)),
                ("peer", PEER_PORT, POD_PEER_ECHO_PORT, np(30710)),
            ],
            etp_local: false,
            affinity_timeout: None,
            source_ranges: Vec::new(),
            health_check_node_port: None,
        }
    }

    pub(crate) fn lb(name: &'static str, cluster_ip: Ipv4Addr, lb_ip: Ipv4Addr) -> Self {
        let mut s = Self::new(name, "LoadBalancer", cluster_ip);
        s.lb_ip = Some(lb_ip);
        s
    }

    pub(crate) fn service(&self) -> Result<Service> {
        let ports: Vec<serde_json::Value> = self
            .ports
            .iter()
            .map(|(name, port, target, node_port)| {
                let mut p =
                    json!({"name": name, "port": port, "targetPort": target, "protocol": "TCP"});
                if let Some(np) = node_port {
                    p["nodePort"] = json!(np);
                }
                p
            })
            .collect();
        let mut cluster_ips = vec![self.cluster_ip.to_string()];
        let mut families = vec!["IPv4"];
        let mut ingress = Vec::new();
        if let Some(ip) = self.lb_ip {
            ingress.push(json!({"ip": ip.to_string(), "ipMode": "VIP"}));
        }
        if let Some((c6, lb6)) = self.v6 {
            cluster_ips.push(c6.to_string());
            families.push("IPv6");
            if let Some(ip) = lb6 {
                ingress.push(json!({"ip": ip.to_string(), "ipMode": "VIP"}));
            }
        }
        let policy = if self.v6.is_some() {
            "RequireDualStack"
        } else {
            "SingleStack"
        };
        let mut spec = json!({
            "type": self.type_,
            "clusterIP": self.cluster_ip.to_string(),
            "clusterIPs": cluster_ips,
            "ipFamilies": families,
            "ipFamilyPolicy": policy,
            "internalTrafficPolicy": "Cluster",
            "ports": ports,
            "sessionAffinity": "None",
        });
        if self.type_ != "ClusterIP" {
            spec["externalTrafficPolicy"] = json!(if self.etp_local { "Local" } else { "Cluster" });
        }
        if let Some(t) = self.affinity_timeout {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
        }
        if !self.source_ranges.is_empty() {
            spec["loadBalancerSourceRanges"] = json!(self.source_ranges);
        }
        if let Some(p) = self.health_check_node_port {
            spec["healthCheckNodePort"] = json!(p);
        }
        let status = if ingress.is_empty() {
            json!({"loadBalancer": {}})
        } else {
            json!({"loadBalancer": {"ingress": ingress}})
        };
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": self.name, "namespace": "default"},
            "spec": spec, "status": status,
        }))
        .context("building a Service")
    }

    /// `lbctl`'s name of port `port` of this service.
    pub(crate) fn port_id(&self, port: &str) -> String {
        format!("default/{}:{port}/TCP", self.name)
    }
}

/// One endpoint (pod `pod`, IPv4) with its conditions and node.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ep {
    pub(crate) pod: u8,
    pub(crate) node: &'static str,
    pub(crate) ready: bool,
    pub(crate) serving: bool,
    pub(crate) terminating: bool,
}

pub(crate) fn ready(pod: u8) -> Ep {
    Ep {
        pod,
        node: NODE,
        ready: true,
        serving: true,
        terminating: false,
    }
}

pub(crate) fn on(node: &'static str, pod: u8) -> Ep {
    Ep { node, ..ready(pod) }
}

/// Terminating but still serving (graceful shutdown in progress).
pub(crate) fn terminating(pod: u8) -> Ep {
    Ep {
        ready: false,
        serving: true,
        terminating: true,
        ..ready(pod)
    }
}

/// Terminating and no longer serving.
pub(crate) fn gone(pod: u8) -> Ep {
    Ep {
        serving: false,
        ..terminating(pod)
    }
}

/// The EndpointSlice of `svc` holding `eps`, as the EndpointSlice controller writes it.
pub(crate) fn slice(svc: &SvcDef, eps: &[Ep]) -> Result<EndpointSlice> {
    slice_of(svc, eps, false)
}

/// The IPv6 EndpointSlice of `svc` (a dual-stack service has one slice per family).
pub(crate) fn slice6(svc: &SvcDef, eps: &[Ep]) -> Result<EndpointSlice> {
    slice_of(svc, eps, true)
}

pub(crate) fn slice_of(svc: &SvcDef, eps: &[Ep], v6: bool) -> Result<EndpointSlice> {
    let endpoints: Vec<serde_json::Value> = eps
        .iter()
        .map(|e| {
            let addr: IpAddr = if v6 {
                netns::pod_v6(e.pod).into()
            } else {
                netns::pod_v4(e.pod).into()
            };
            json!({
                "addresses": [addr.to_string()],
                "conditions": {
                    "ready": e.ready, "serving": e.serving, "terminating": e.terminating,
                },
                "nodeName": e.node,
                "targetRef": {
                    "kind": "Pod", "name": format!("pod-{}", e.pod), "namespace": "default",
                },
            })
        })
        .collect();
    let ports: Vec<serde_json::Value> = svc
        .ports
        .iter()
        .map(|(name, _, target, _)| json!({"name": name, "port": target, "protocol": "TCP"}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-{}", svc.name, if v6 { "v6xyz" } else { "abcde" }),
            "namespace": "default",
            "labels": {
                "kubernetes.io/service-name": svc.name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "endpoints": endpoints,
        "ports": ports,
    }))
    .context("building an EndpointSlice")
}

pub(crate) fn node_obj(name: &str, addr: Ipv4Addr, addr6: Option<Ipv6Addr>) -> Result<Node> {
    let mut addresses = vec![json!({"type": "InternalIP", "address": addr.to_string()})];
    if let Some(a6) = addr6 {
        addresses.push(json!({"type": "InternalIP", "address": a6.to_string()}));
    }
    addresses.push(json!({"type": "Hostname", "address": name}));
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"addresses": addresses},
    }))
    .context("building a Node")
}

/// A topology, a fake API server listening in its node namespace and the agent in
/// Kubernetes mode. Fields drop in order: agent, pins, API server, namespaces.
pub(crate) struct KubeLab {
    pub(crate) agent: Option<Agent>,
    pub(crate) pin: PinDir,
    pub(crate) fake: FakeApi,
    pub(crate) topo: Topology,
}

impl KubeLab {
    /// Builds `pods` pods (nginx, TCP echo and peer echo in each), node-a and node-b
    /// Node objects, the objects `setup` creates, then starts the agent as node-a.
    pub(crate) fn start(
        tag: &str,
        pods: u8,
        setup: impl FnOnce(&FakeApi) -> Result<()>,
    ) -> Result<Self> {
        e2e::bin_dir()?;
        let mut topo = Topology::new(tag, pods)?;
        for n in 1..=pods {
            topo.start_nginx(n)?;
            topo.start_tcp_echo(n)?;
            topo.start_peer_echo(n)?;
        }
        let fake = FakeApi::start_in_netns(&topo.node)?;
        fake.create(&node_obj(NODE, NODE_V4, Some(NODE_V6))?)?;
        fake.create(&node_obj(OTHER_NODE, OTHER_NODE_V4, None)?)?;
        setup(&fake)?;
        let kubeconfig = topo.dir.join("kubeconfig");
        fake.write_kubeconfig(&kubeconfig)?;
        let pin = PinDir::new(&topo)?;
        let agent = Agent::start_kube(&topo, &kubeconfig, NODE, &pin.0, &[])
            .with_context(|| format!("API requests: {:?}", request_summary(&fake)))?;
        Ok(KubeLab {
            agent: Some(agent),
            pin,
            fake,
            topo,
        })
    }

    pub(crate) fn pin(&self) -> &Path {
        &self.pin.0
    }

    pub(crate) fn agent_log(&self) -> String {
        self.agent.as_ref().map(Agent::log_text).unwrap_or_default()
    }

    /// What the agent, the maps and the API server saw, for failure messages.
    pub(crate) fn diag(&self) -> String {
        let services = e2e::lbctl(self.pin(), &["services", "-o", "json"])
            .unwrap_or_else(|e| format!("lbctl services failed: {e:#}"));
        let stats = e2e::lbctl(self.pin(), &["stats", "-o", "json"])
            .unwrap_or_else(|e| format!("lbctl stats failed: {e:#}"));
        format!(
            "lbctl services: {services}\nlbctl stats: {stats}\nAPI requests: {:?}\n\
             agent output:\n{}",
            request_summary(&self.fake),
            self.agent_log()
        )
    }

    /// Waits until `check` holds on `lbctl services -o json`; returns when it held.
    pub(crate) fn wait_services(
        &self,
        what: &str,
        check: impl Fn(&serde_json::Value) -> Result<bool>,
    ) -> Result<Instant> {
        self.wait_services_for(APPLY_TIMEOUT, what, check)
    }

    pub(crate) fn wait_services_for(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> Result<bool>,
    ) -> Result<Instant> {
        netns::wait_until(timeout, what, || {
            check(&e2e::lbctl_json(self.pin(), "services")?)
        })
        .with_context(|| self.diag())?;
        Ok(Instant::now())
    }

    /// Waits until port `port_id` spreads new flows over exactly `pods`.
    pub(crate) fn wait_backends(&self, port_id: &str, pods: &[u8]) -> Result<Instant> {
        let want: BTreeSet<String> = pods.iter().map(|n| netns::pod_v4(*n).to_string()).collect();
        self.wait_services(&format!("{port_id} backends {want:?}"), |all| {
            Ok(find_port(all, port_id).is_some_and(|e| backend_addrs(e) == want))
        })
    }

    pub(crate) fn stats(&self) -> Result<serde_json::Value> {
        e2e::lbctl_json(self.pin(), "stats")
    }

    pub(crate) fn reason(&self, reason: &str) -> Result<u64> {
        let s = self.stats()?;
        s["reasons"][reason]
            .as_u64()
            .with_context(|| format!("no reason {reason} in lbctl stats: {s}"))
    }

    /// Stops the agent; it must exit 0 on SIGTERM.
    pub(crate) fn stop(mut self) -> Result<()> {
        let agent = self.agent.take().context("agent already stopped")?;
        let log = agent.log_text();
        let status = agent.stop()?;
        ensure!(
            status.success(),
            "lb-agent exited with {status} on SIGTERM; output:\n{log}"
        );
        Ok(())
    }
}

pub(crate) fn request_summary(fake: &FakeApi) -> Vec<String> {
    fake.requests()
        .iter()
        .map(|r| format!("{} {}?{} -> {}", r.method, r.path, r.query, r.status))
        .collect()
}

pub(crate) fn find_port<'a>(
    all: &'a serde_json::Value,
    port_id: &str,
) -> Option<&'a serde_json::Value> {
    all.as_array()?
        .iter()
        .find(|s| s["service"].as_str() == Some(port_id))
}

pub(crate) fn backend_addrs(entry: &serde_json::Value) -> BTreeSet<String> {
    entry["backends"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter_map(|b| b["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn frontends(entry: &serde_json::Value) -> BTreeSet<(String, u64)> {
    entry["frontends"]
        .as_array()
        .map(|f| {
            f.iter()
                .filter_map(|f| Some((f["address"].as_str()?.to_string(), f["port"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}
