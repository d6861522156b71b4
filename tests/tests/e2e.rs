//! End-to-end tests: a client, a Calico-shaped node and pods in network namespaces, real
//! servers (nginx, socat) and clients (curl, socat, raw frames), the real `lb-agent`
//! attached to the node's edge and pod interfaces, and `lbctl` reading its pinned maps.
//!
//! Run as root (`cargo xtask test` does). Each test builds its own topology with unique
//! names and tears it down on drop.

use anyhow::{ensure, Context as _, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::e2e::{self, tcp_line, Agent, EndpointSpec, LineConn, PinDir, PortSpec, ServiceSpec};
use tests::netns::{self, Topology, POD_HTTP_PORT, POD_TCP_ECHO_PORT, POD_UDP_ECHO_PORT};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x10);
const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0xa);
const EMPTY_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
const EMPTY_LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 20);
const UDP_PORT: u16 = 53;
const ECHO_PORT: u16 = 7000;
const UDP_ECHO_BIN: &str = env!("CARGO_BIN_EXE_udp-echo");

/// A topology with an agent: dropped in field order, agent before the namespaces.
struct Lab {
    agent: Option<Agent>,
    pin: PinDir,
    services_path: PathBuf,
    topo: Topology,
}

impl Lab {
    /// Builds `pods` pods running nginx, the TCP and the UDP echo servers, writes
    /// `services(&topo)` and starts the agent.
    fn start(
        tag: &str,
        pods: u8,
        services: impl FnOnce(&Topology) -> Result<Vec<ServiceSpec>>,
    ) -> Result<Self> {
        // Fail before building anything when the binaries are missing.
        e2e::bin_dir()?;
        let mut topo = Topology::new(tag, pods)?;
        for n in 1..=pods {
            start_servers(&mut topo, n)?;
        }
        let services_path = topo.dir.join("services.yaml");
        e2e::write_services(&services_path, &services(&topo)?)?;
        let pin = PinDir::new(&topo)?;
        let agent = Agent::start(&topo, &services_path, &pin.0, &[])?;
        Ok(Lab {
            agent: Some(agent),
            pin,
            services_path,
            topo,
        })
    }

    fn update(&self, services: &[ServiceSpec]) -> Result<()> {
        e2e::write_services(&self.services_path, services)
    }

    /// What the agent and the maps say, for failure messages.
    fn diag(&self) -> String {
        let stats = e2e::lbctl(self.pin(), &["stats", "-o", "json"])
            .unwrap_or_else(|e| format!("lbctl stats failed: {e:#}"));
        let flows = e2e::lbctl(self.pin(), &["flows", "-o", "json"])
            .unwrap_or_else(|e| format!("lbctl flows failed: {e:#}"));
        let log = self.agent.as_ref().map(Agent::log_text).unwrap_or_default();
        format!("lbctl stats: {stats}\nlbctl flows: {flows}\nagent output:\n{log}")
    }

    fn pin(&self) -> &std::path::Path {
        &self.pin.0
    }

    /// Stops the agent and checks it exited 0 on SIGTERM, as its contract says.
    fn stop(mut self) -> Result<()> {
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

fn start_servers(topo: &mut Topology, n: u8) -> Result<()> {
    topo.start_nginx(n)?;
    topo.start_tcp_echo(n)?;
    topo.start_udp_echo(n, Path::new(UDP_ECHO_BIN))
}

fn ready_v4(topo: &Topology, pods: &[u8]) -> Result<Vec<EndpointSpec>> {
    pods.iter()
        .map(|n| {
            let p = topo.pod(*n)?;
            Ok(EndpointSpec::ready(p.v4, &p.name))
        })
        .collect()
}

/// `default/web`: ClusterIP 198.19.0.10, LoadBalancer 198.19.1.10, HTTP 80 -> 8080,
/// UDP 53 -> 9000 and echo 7000 -> 7000.
fn web(endpoints: Vec<EndpointSpec>) -> ServiceSpec {
    let mut s = ServiceSpec::new(
        "web",
        vec![
            PortSpec::new("http", 80, POD_HTTP_PORT, "TCP"),
            PortSpec::new("dns", UDP_PORT, POD_UDP_ECHO_PORT, "UDP"),
            PortSpec::new("echo", ECHO_PORT, POD_TCP_ECHO_PORT, "TCP"),
        ],
    );
    s.cluster_ips = vec![CLUSTER_IP.into()];
    s.lb_ips = vec![LB_IP.into()];
    s.endpoints = endpoints;
    s
}

fn web_all(topo: &Topology) -> Result<ServiceSpec> {
    let ns: Vec<u8> = topo.pods.iter().map(|p| p.n).collect();
    Ok(web(ready_v4(topo, &ns)?))
}

fn pod_names(topo: &Topology, pods: &[u8]) -> BTreeSet<String> {
    pods.iter()
        .map(|n| format!("pod-{n}"))
        .filter(|n| topo.pods.iter().any(|p| &p.name == n))
        .collect()
}

/// `count` HTTP requests with fresh connections from `ns`; fails on any failed request,
/// on a reply from an address other than the one connected to, or a body that names no
/// pod. Returns how many replies each pod gave.
fn spread(
    ns: &str,
    url: &str,
    expect_remote: IpAddr,
    count: usize,
) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for i in 0..count {
        let r = e2e::http_get(ns, url).with_context(|| format!("request {i} of {count}"))?;
        let remote: IpAddr = r
            .remote_ip
            .parse()
            .with_context(|| format!("curl's remote_ip {:?}", r.remote_ip))?;
        ensure!(
            remote == expect_remote,
            "request {i}: reply from {remote}, expected {expect_remote}"
        );
        ensure!(
            r.body.starts_with("pod-"),
            "request {i}: body {:?} names no pod",
            r.body
        );
        *seen.entry(r.body).or_insert(0) += 1;
    }
    Ok(seen)
}

fn counter(v: &serde_json::Value, path: &[&str]) -> Result<u64> {
    let mut cur = v;
    for p in path {
        cur = cur
            .get(*p)
            .with_context(|| format!("no {p:?} in {cur} (path {path:?})"))?;
    }
    cur.as_u64()
        .with_context(|| format!("{path:?} is not a number: {cur}"))
}

/// The entry of `lbctl services -o json` for `service`.
fn service_entry(pin: &std::path::Path, service: &str) -> Result<serde_json::Value> {
    let all = e2e::lbctl_json(pin, "services")?;
    all.as_array()
        .context("lbctl services -o json is not an array")?
        .iter()
        .find(|s| s.get("service").and_then(|n| n.as_str()) == Some(service))
        .cloned()
        .with_context(|| format!("service {service} not in lbctl services: {all}"))
}

fn backend_addrs(entry: &serde_json::Value) -> Result<BTreeSet<String>> {
    entry
        .get("backends")
        .and_then(|b| b.as_array())
        .context("no backends array")?
        .iter()
        .map(|b| {
            b.get("address")
                .and_then(|a| a.as_str())
                .map(str::to_string)
                .with_context(|| format!("backend without address: {b}"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------

/// The harness itself, without the load balancer: pods answer the client over plain
/// routing (IPv4 and IPv6), pods reach each other, and dropping the topology removes
/// every namespace it made.
#[test]
fn topology_routes_client_to_pods_and_cleans_up() -> Result<()> {
    e2e::ensure_bpffs()?;
    let names;
    {
        let mut topo = Topology::new("topo", 3)?;
        for n in 1..=3 {
            topo.start_nginx(n)?;
        }
        for p in topo.pods.clone() {
            let r = e2e::http_get(&topo.client, &format!("http://{}:{POD_HTTP_PORT}/", p.v4))?;
            assert_eq!(r.body, p.name);
            assert_eq!(r.remote_ip, p.v4.to_string());
            let r6 = e2e::http_get(&topo.client, &format!("http://[{}]:{POD_HTTP_PORT}/", p.v6))?;
            assert_eq!(r6.body, p.name);
        }
        let (p1, p2) = (topo.pod(1)?.clone(), topo.pod(2)?.clone());
        let r = e2e::http_get(&p1.ns, &format!("http://{}:{POD_HTTP_PORT}/", p2.v4))?;
        assert_eq!(r.body, "pod-2", "pod-1 -> pod-2 through the node");
        // The other servers, and the way the tests recognise a refusal, on the real
        // kernel's own answers: nothing listens on port 81 or UDP 82.
        topo.start_tcp_echo(1)?;
        topo.start_udp_echo(1, Path::new(UDP_ECHO_BIN))?;
        let a = tcp_line(&topo.client, p1.v4, POD_TCP_ECHO_PORT, "hi")?;
        assert_eq!(a, "pod-1 hi");
        let a = e2e::udp_request(&topo.client, p1.v4.into(), POD_UDP_ECHO_PORT, "q")?;
        assert_eq!(a, "pod-1");
        let a = e2e::udp_request(&topo.client, p1.v6.into(), POD_UDP_ECHO_PORT, "q")?;
        assert_eq!(a, "pod-1");
        let err = e2e::udp_request(&topo.client, p1.v4.into(), 82, "q").err();
        let err = format!("{:#}", err.context("UDP to a closed port got an answer")?);
        assert!(err.contains("Connection refused"), "{err}");
        let (res, took) = e2e::tcp_connect(&topo.client, p1.v4.into(), 81)?;
        let err = res.err().context("TCP to a closed port connected")?;
        assert!(err.contains("Connection refused"), "{err}");
        assert!(took < Duration::from_millis(500), "refusal took {took:?}");
        let (res, _) = e2e::tcp_connect(&topo.client, p1.v4.into(), POD_HTTP_PORT)?;
        assert_eq!(res, Ok(()), "TCP to nginx");
        // The agent's view of the node: the node's interfaces in /sys and the host's bpffs.
        let out = netns::run(
            netns::in_ns_with_host_bpffs(&topo.node, "sh")
                .args(["-c", "ls /sys/class/net; stat -f -c %T /sys/fs/bpf"]),
        )?;
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.contains(&topo.edge_iface) && out.contains(&p1.host_iface),
            "{out}"
        );
        assert!(out.contains("bpf_fs"), "{out}");
        names = vec![topo.client.clone(), topo.node.clone(), p1.ns.clone()];
    }
    let list = netns::run(Command::new("ip").args(["netns", "list"]))?;
    let list = String::from_utf8_lossy(&list.stdout);
    for n in names {
        assert!(!list.contains(&n), "namespace {n} left behind: {list}");
    }
    Ok(())
}

/// TCP to a LoadBalancer IP from outside reaches every pod, and every reply comes from
/// the VIP (curl connected to the VIP and says so).
#[test]
fn tcp_to_lb_ip_reaches_every_pod() -> Result<()> {
    let lab = Lab::start("tcp", 3, |t| Ok(vec![web_all(t)?]))?;
    let seen = spread(
        &lab.topo.client,
        &format!("http://{LB_IP}/"),
        LB_IP.into(),
        60,
    )?;
    let pods: BTreeSet<String> = seen.keys().cloned().collect();
    assert_eq!(pods, pod_names(&lab.topo, &[1, 2, 3]), "spread: {seen:?}");
    // The ClusterIP of the same service port works too (it shares the table).
    let seen = spread(
        &lab.topo.client,
        &format!("http://{CLUSTER_IP}/"),
        CLUSTER_IP.into(),
        6,
    )?;
    assert_eq!(seen.values().sum::<usize>(), 6);
    // Piped into a reader that stops early (`lbctl flows | head`), lbctl exits quietly.
    for what in ["services", "backends", "flows", "stats"] {
        for output in ["table", "json"] {
            let (status, stderr) = e2e::lbctl_into_closed_pipe(lab.pin(), &[what, "-o", output])?;
            assert!(
                status.success() && stderr.is_empty(),
                "lbctl {what} -o {output} into a closed pipe: {status}, stderr {stderr:?}"
            );
        }
    }
    lab.stop()
}

/// A pod asks a ClusterIP over UDP and gets an answer from some pod, sent from the
/// ClusterIP (socat's connected socket accepts nothing else).
#[test]
fn udp_through_cluster_ip_from_pod() -> Result<()> {
    let lab = Lab::start("udp", 3, |t| Ok(vec![web_all(t)?]))?;
    let client = lab.topo.pod(1)?.ns.clone();
    let mut seen = BTreeSet::new();
    for i in 0..12 {
        let answer = e2e::udp_request(&client, CLUSTER_IP.into(), UDP_PORT, &format!("q{i}"))
            .with_context(|| format!("request {i}; {}", lab.diag()))?;
        ensure!(answer.starts_with("pod-"), "answer {answer:?} names no pod");
        seen.insert(answer);
    }
    // The client sends from one socket per request (new source port), so the answers
    // spread; at least two pods among twelve flows.
    assert!(seen.len() >= 2, "all UDP flows went to {seen:?}");
    // And from outside as well.
    let answer = e2e::udp_request(&lab.topo.client, LB_IP.into(), UDP_PORT, "outside")?;
    assert!(answer.starts_with("pod-"), "{answer:?}");
    lab.stop()
}

/// A pod reaching itself through its own Service (the only endpoint is itself).
#[test]
fn pod_reaches_itself_through_its_service() -> Result<()> {
    let lab = Lab::start("hair", 3, |t| {
        let mut self_svc = ServiceSpec::new(
            "self",
            vec![PortSpec::new("http", 80, POD_HTTP_PORT, "TCP")],
        );
        self_svc.cluster_ips = vec![Ipv4Addr::new(198, 19, 0, 30).into()];
        self_svc.endpoints = ready_v4(t, &[1])?;
        Ok(vec![web_all(t)?, self_svc])
    })?;
    let pod1 = lab.topo.pod(1)?.ns.clone();
    let vip = Ipv4Addr::new(198, 19, 0, 30);
    let seen = spread(&pod1, &format!("http://{vip}/"), vip.into(), 5)?;
    assert_eq!(seen.get("pod-1"), Some(&5), "{seen:?}");
    // Through the shared service too: every reply, including pod-1's own, from the VIP.
    let seen = spread(
        &pod1,
        &format!("http://{CLUSTER_IP}/"),
        CLUSTER_IP.into(),
        30,
    )?;
    assert!(
        seen.contains_key("pod-1"),
        "pod-1 never reached itself: {seen:?}"
    );
    lab.stop()
}

/// An established TCP connection keeps its pod while an endpoint is added and another
/// removed; new connections avoid the removed endpoint and reach the added one.
#[test]
fn established_connection_survives_endpoint_changes() -> Result<()> {
    let lab = Lab::start("ct", 4, |t| Ok(vec![web(ready_v4(t, &[1, 2, 3])?)]))?;
    let client = lab.topo.client.clone();
    let mut conn = LineConn::open(&client, LB_IP, ECHO_PORT)?;
    let first = conn.ask("before")?;
    let (pod, rest) = first.split_once(' ').context("answer without pod name")?;
    assert_eq!(rest, "before");
    let pod = pod.to_string();
    let kept: u8 = pod
        .strip_prefix("pod-")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("answer {first:?}"))?;
    ensure!(
        (1..=3).contains(&kept),
        "answer from {pod}, not an endpoint"
    );
    let removed = if kept == 1 { 2 } else { 1 };
    let mut new_set: Vec<u8> = (1..=4).filter(|n| *n != removed).collect();
    new_set.sort();
    lab.update(&[web(ready_v4(&lab.topo, &new_set)?)])?;
    let want: BTreeSet<String> = new_set
        .iter()
        .map(|n| netns::pod_v4(*n).to_string())
        .collect();
    let svc = "default/web:echo/TCP";
    netns::wait_until(
        Duration::from_secs(10),
        "the agent to apply the edit",
        || Ok(backend_addrs(&service_entry(lab.pin(), svc)?)? == want),
    )?;
    let again = conn.ask("after")?;
    assert_eq!(again, format!("{pod} after"), "the live connection moved");
    let mut seen = BTreeSet::new();
    for i in 0..30 {
        let a = tcp_line(&client, LB_IP, ECHO_PORT, &format!("new{i}"))?;
        let p = a
            .split_once(' ')
            .map(|(p, _)| p.to_string())
            .context("answer")?;
        seen.insert(p);
    }
    assert!(
        !seen.contains(&format!("pod-{removed}")),
        "removed endpoint still used: {seen:?}"
    );
    assert_eq!(
        seen,
        pod_names(&lab.topo, &new_set),
        "new connections went to {seen:?}"
    );
    drop(conn);
    lab.stop()
}

/// A service without ready endpoints refuses at once: TCP gets a RST (curl: connection
/// refused, well under a second), UDP an ICMP port unreachable (connected socket:
/// connection refused).
#[test]
fn service_without_endpoints_refuses_promptly() -> Result<()> {
    let lab = Lab::start("rej", 3, |t| {
        let mut empty = ServiceSpec::new(
            "empty",
            vec![
                PortSpec::new("http", 80, POD_HTTP_PORT, "TCP"),
                PortSpec::new("dns", UDP_PORT, POD_UDP_ECHO_PORT, "UDP"),
            ],
        );
        empty.cluster_ips = vec![EMPTY_CLUSTER_IP.into()];
        empty.lb_ips = vec![EMPTY_LB_IP.into()];
        // A pod that is not ready takes no new flows.
        let p1 = t.pod(1)?;
        empty.endpoints = vec![EndpointSpec {
            addr: p1.v4.into(),
            pod: p1.name.clone(),
            ready: false,
        }];
        Ok(vec![web_all(t)?, empty])
    })?;
    let pod1 = lab.topo.pod(1)?.ns.clone();
    // Every case is tried before failing, so one run shows which paths refuse.
    let mut failures = Vec::new();
    for (ns, vip) in [(&lab.topo.client, EMPTY_LB_IP), (&pod1, EMPTY_CLUSTER_IP)] {
        let (res, took) = e2e::tcp_connect(ns, vip.into(), 80)?;
        match res {
            Ok(()) => failures.push(format!("TCP {ns} -> {vip}:80 connected")),
            Err(e) if !e.contains("Connection refused") => {
                failures.push(format!("TCP {ns} -> {vip}:80: {e}"));
            }
            Err(_) if took >= Duration::from_millis(500) => {
                failures.push(format!("TCP {ns} -> {vip}:80: refused after {took:?}"));
            }
            Err(_) => {}
        }
        match e2e::udp_request(ns, vip.into(), UDP_PORT, "anyone?") {
            Ok(a) => failures.push(format!("UDP {ns} -> {vip}:{UDP_PORT} answered {a:?}")),
            Err(e) if !format!("{e:#}").contains("Connection refused") => {
                failures.push(format!("UDP {ns} -> {vip}:{UDP_PORT}: {e:#}"));
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "not refused:\n{}", failures.join("\n"));
    // The working service next to it is unaffected.
    let r = e2e::http_get(&lab.topo.client, &format!("http://{LB_IP}/"))?;
    assert!(r.body.starts_with("pod-"));
    let stats = e2e::lbctl_json(lab.pin(), "stats")?;
    assert!(
        counter(&stats, &["reasons", "reject_no_endpoints"])? >= 4,
        "{stats}"
    );
    lab.stop()
}

/// IPv6 through a LoadBalancer VIP and a ClusterIP.
#[test]
fn ipv6_through_vip() -> Result<()> {
    let lab = Lab::start("v6", 3, |t| {
        let mut s = ServiceSpec::new(
            "web6",
            vec![PortSpec::new("http", 80, POD_HTTP_PORT, "TCP")],
        );
        s.cluster_ips = vec![CLUSTER_IP6.into()];
        s.lb_ips = vec![LB_IP6.into()];
        s.endpoints = t
            .pods
            .iter()
            .map(|p| EndpointSpec::ready(p.v6, &p.name))
            .collect();
        Ok(vec![s])
    })?;
    let seen = spread(
        &lab.topo.client,
        &format!("http://[{LB_IP6}]/"),
        LB_IP6.into(),
        45,
    )?;
    let pods: BTreeSet<String> = seen.keys().cloned().collect();
    assert_eq!(pods, pod_names(&lab.topo, &[1, 2, 3]), "spread: {seen:?}");
    let pod2 = lab.topo.pod(2)?.ns.clone();
    let seen = spread(
        &pod2,
        &format!("http://[{CLUSTER_IP6}]/"),
        CLUSTER_IP6.into(),
        6,
    )?;
    assert_eq!(seen.values().sum::<usize>(), 6);
    lab.stop()
}

// --- malformed frames ----------------------------------------------------------------

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for (i, chunk) in header.chunks(2).enumerate() {
        if i == 5 {
            continue; // the checksum field itself
        }
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

const ETH: usize = 14;

fn fix_ipv4_checksum(f: &mut [u8]) {
    let ihl = usize::from(f[ETH] & 0x0f) * 4;
    let c = ipv4_checksum(&f[ETH..ETH + ihl]);
    f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
}

struct Frames {
    src: [u8; 6],
    dst: [u8; 6],
}

impl Frames {
    fn tcp4(&self, dst: Ipv4Addr, payload: &[u8]) -> Result<Vec<u8>> {
        let b = etherparse::PacketBuilder::ethernet2(self.src, self.dst)
            .ipv4(netns::CLIENT_V4.octets(), dst.octets(), 64)
            .tcp(40000, 80, 1, 64240)
            .syn();
        let mut v = Vec::new();
        b.write(&mut v, payload).context("building TCP frame")?;
        Ok(v)
    }

    fn udp4(&self, dst: Ipv4Addr, port: u16, payload: &[u8]) -> Result<Vec<u8>> {
        let b = etherparse::PacketBuilder::ethernet2(self.src, self.dst)
            .ipv4(netns::CLIENT_V4.octets(), dst.octets(), 64)
            .udp(40001, port);
        let mut v = Vec::new();
        b.write(&mut v, payload).context("building UDP frame")?;
        Ok(v)
    }

    fn tcp6(&self, dst: Ipv6Addr, payload: &[u8]) -> Result<Vec<u8>> {
        let b = etherparse::PacketBuilder::ethernet2(self.src, self.dst)
            .ipv6(netns::CLIENT_V6.octets(), dst.octets(), 64)
            .tcp(40002, 80, 1, 64240)
            .syn();
        let mut v = Vec::new();
        b.write(&mut v, payload)
            .context("building TCP/IPv6 frame")?;
        Ok(v)
    }
}

fn hex(f: &[u8]) -> String {
    f.iter().map(|b| format!("{b:02x}")).collect()
}

/// Malformed packets to VIPs are dropped before any rewrite (no pod sees them), traffic
/// after them still works, and `lbctl stats` counts each drop reason.
#[test]
fn malformed_frames_are_dropped_and_counted() -> Result<()> {
    let mut lab = Lab::start("bad", 3, |t| {
        let mut w6 = ServiceSpec::new(
            "web6",
            vec![PortSpec::new("http", 80, POD_HTTP_PORT, "TCP")],
        );
        w6.cluster_ips = vec![CLUSTER_IP6.into()];
        w6.lb_ips = vec![LB_IP6.into()];
        w6.endpoints = t
            .pods
            .iter()
            .map(|p| EndpointSpec::ready(p.v6, &p.name))
            .collect();
        Ok(vec![web_all(t)?, w6])
    })?;
    // Capture everything on every pod's eth0.
    let mut captures = Vec::new();
    for p in lab.topo.pods.clone() {
        let pcap = lab.topo.dir.join(format!("{}.pcap", p.name));
        let log = lab.topo.dir.join(format!("{}.tcpdump.log", p.name));
        let pcap_s = pcap.to_string_lossy().into_owned();
        lab.topo.spawn(
            &p.ns,
            &[
                "tcpdump", "-i", "eth0", "-n", "-U", "-s", "0", "-Z", "root", "-w", &pcap_s,
            ],
            &log,
        )?;
        netns::wait_until(Duration::from_secs(10), "tcpdump to listen", || {
            Ok(std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening on"))
        })?;
        captures.push(pcap);
    }
    let src = Topology::mac(&lab.topo.client, &lab.topo.client_iface)?;
    let dst = Topology::mac(&lab.topo.node, &lab.topo.edge_iface)?;
    let fb = Frames { src, dst };
    let bad: &[u8] = b"XDPLB-BAD-FRAME-MARKER";
    let good: &[u8] = b"XDPLB-GOOD-FRAME-MARKER";
    let mut frames: Vec<(&str, Vec<u8>)> = Vec::new();

    let mut f = fb.tcp4(LB_IP, bad)?;
    f[ETH] = 0x43; // IHL 3
    frames.push(("drop_bad_l3", f));
    let mut f = fb.tcp4(LB_IP, bad)?;
    f[ETH + 2..ETH + 4].copy_from_slice(&1400u16.to_be_bytes()); // beyond the frame
    fix_ipv4_checksum(&mut f);
    frames.push(("drop_bad_l3", f));
    let mut f = fb.tcp4(LB_IP, bad)?;
    f.splice(ETH + 20..ETH + 20, [1u8, 1, 1, 1]); // four NOP options
    f[ETH] = 0x46;
    let tl = u16::from_be_bytes([f[ETH + 2], f[ETH + 3]]) + 4;
    f[ETH + 2..ETH + 4].copy_from_slice(&tl.to_be_bytes());
    fix_ipv4_checksum(&mut f);
    frames.push(("drop_ipv4_options", f));
    let mut f = fb.tcp4(LB_IP, bad)?;
    f[ETH + 6] |= 0x20; // more fragments
    fix_ipv4_checksum(&mut f);
    frames.push(("drop_fragment", f));
    let mut f = fb.tcp4(LB_IP, bad)?;
    f[ETH + 20 + 12] = 0x40; // TCP data offset 4
    frames.push(("drop_bad_l4", f));
    let mut f = fb.udp4(LB_IP, UDP_PORT, bad)?;
    f[ETH + 20 + 4..ETH + 20 + 6].copy_from_slice(&4u16.to_be_bytes()); // UDP length 4
    frames.push(("drop_bad_l4", f));
    let mut f = fb.tcp4(LB_IP, bad)?;
    f[ETH + 9] = 47; // GRE
    fix_ipv4_checksum(&mut f);
    frames.push(("drop_unknown_proto", f));
    let mut f = fb.tcp6(LB_IP6, bad)?;
    // A hop-by-hop options header (8 bytes: next header TCP, PadN) before TCP.
    f.splice(ETH + 40..ETH + 40, [6u8, 0, 1, 4, 0, 0, 0, 0]);
    f[ETH + 6] = 0;
    let pl = u16::from_be_bytes([f[ETH + 4], f[ETH + 5]]) + 8;
    f[ETH + 4..ETH + 6].copy_from_slice(&pl.to_be_bytes());
    frames.push(("drop_ipv6_exthdr", f));
    // Last, a well-formed datagram: once a pod captured it, every frame before it has
    // been through the program.
    frames.push(("", fb.udp4(LB_IP, UDP_PORT, good)?));

    let before = e2e::lbctl_json(lab.pin(), "stats")?;
    let sender = env!("CARGO_BIN_EXE_send-frames");
    let mut args: Vec<String> = vec![sender.to_string(), lab.topo.client_iface.clone()];
    args.extend(frames.iter().map(|(_, f)| hex(f)));
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    netns::ns_run(&lab.topo.client, &args_ref)?;

    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    netns::wait_until(
        Duration::from_secs(5),
        "the good frame to reach a pod",
        || {
            Ok(captures
                .iter()
                .any(|c| contains(&std::fs::read(c).unwrap_or_default(), good)))
        },
    )?;
    for c in &captures {
        let data = std::fs::read(c).with_context(|| format!("reading {}", c.display()))?;
        assert!(
            !contains(&data, bad),
            "a malformed frame reached a pod ({})",
            c.display()
        );
    }
    let after = e2e::lbctl_json(lab.pin(), "stats")?;
    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    for (reason, _) in &frames {
        if !reason.is_empty() {
            *expected.entry(reason).or_insert(0) += 1;
        }
    }
    for (reason, n) in expected {
        let d = counter(&after, &["reasons", reason])? - counter(&before, &["reasons", reason])?;
        assert!(d >= n, "{reason}: counted {d}, sent {n}; stats: {after}");
    }
    // Traffic after them is undisturbed.
    let seen = spread(
        &lab.topo.client,
        &format!("http://{LB_IP}/"),
        LB_IP.into(),
        10,
    )?;
    assert_eq!(seen.values().sum::<usize>(), 10);
    lab.stop()
}

/// `lbctl services -o json` names the service, its frontends and backends, and its
/// counters grow with traffic; `lbctl stats` counts forwarded packets; the table output
/// names the service too.
#[test]
fn lbctl_reports_service_and_counters_grow() -> Result<()> {
    let lab = Lab::start("ctl", 3, |t| Ok(vec![web_all(t)?]))?;
    let svc = "default/web:http/TCP";
    let before = service_entry(lab.pin(), svc)?;
    let frontends = before
        .get("frontends")
        .and_then(|f| f.as_array())
        .context("no frontends")?;
    for vip in [CLUSTER_IP, LB_IP] {
        assert!(
            frontends
                .iter()
                .any(
                    |f| f.get("address").and_then(|a| a.as_str()) == Some(&vip.to_string())
                        && f.get("port").and_then(serde_json::Value::as_u64) == Some(80)
                        && f.get("protocol").and_then(|p| p.as_str()) == Some("TCP")
                ),
            "frontend {vip}:80/TCP missing: {before}"
        );
    }
    let want: BTreeSet<String> = (1..=3).map(|n| netns::pod_v4(n).to_string()).collect();
    assert_eq!(backend_addrs(&before)?, want);
    let targets: BTreeSet<&str> = before["backends"]
        .as_array()
        .context("backends")?
        .iter()
        .filter_map(|b| b.get("target").and_then(|t| t.as_str()))
        .collect();
    assert_eq!(
        targets,
        BTreeSet::from(["default/pod-1", "default/pod-2", "default/pod-3"])
    );
    let stats_before = e2e::lbctl_json(lab.pin(), "stats")?;

    spread(
        &lab.topo.client,
        &format!("http://{LB_IP}/"),
        LB_IP.into(),
        10,
    )?;

    let after = service_entry(lab.pin(), svc)?;
    for c in ["fwd_packets", "fwd_bytes", "rev_packets", "rev_bytes"] {
        let (b, a) = (
            counter(&before, &["counters", c])?,
            counter(&after, &["counters", c])?,
        );
        // Ten connections: at least SYN, ACK+request, FIN... each way.
        assert!(a >= b + 30, "{c}: {b} -> {a}");
    }
    let (b, a) = (
        counter(&before, &["counters", "new_flows"])?,
        counter(&after, &["counters", "new_flows"])?,
    );
    assert_eq!(a - b, 10, "new_flows {b} -> {a}");
    let stats_after = e2e::lbctl_json(lab.pin(), "stats")?;
    let fwd = |s: &serde_json::Value| -> Result<u64> {
        Ok(counter(s, &["reasons", "fwd_pass"])? + counter(s, &["reasons", "fwd_redirect"])?)
    };
    assert!(
        fwd(&stats_after)? >= fwd(&stats_before)? + 30,
        "{stats_after}"
    );
    let table = e2e::lbctl(lab.pin(), &["services", "-o", "table"])?;
    assert!(
        table.contains(svc) && table.contains(&LB_IP.to_string()),
        "{table}"
    );
    lab.stop()
}

/// A pod whose interface appears after the agent started is attached within a second
/// and reachable through a service.
#[test]
fn pod_added_after_start_is_attached_and_reachable() -> Result<()> {
    let mut lab = Lab::start("late", 3, |t| Ok(vec![web_all(t)?]))?;
    let start = Instant::now();
    let pod = lab.topo.add_pod()?;
    let node = lab.topo.node.clone();
    netns::wait_until(
        Duration::from_secs(1).saturating_sub(start.elapsed()),
        "XDP on the new pod interface",
        || {
            let out = netns::ns_run(&node, &["ip", "-d", "link", "show", "dev", &pod.host_iface])?;
            Ok(out.contains("xdp"))
        },
    )
    .with_context(|| {
        format!(
            "agent output:\n{}",
            lab.agent.as_ref().map(Agent::log_text).unwrap_or_default()
        )
    })?;
    start_servers(&mut lab.topo, pod.n)?;
    let mut late = ServiceSpec::new(
        "late",
        vec![PortSpec::new("http", 80, POD_HTTP_PORT, "TCP")],
    );
    let vip = Ipv4Addr::new(198, 19, 1, 40);
    late.cluster_ips = vec![Ipv4Addr::new(198, 19, 0, 40).into()];
    late.lb_ips = vec![vip.into()];
    late.endpoints = vec![EndpointSpec::ready(pod.v4, &pod.name)];
    lab.update(&[web_all(&lab.topo)?, late])?;
    netns::wait_until(Duration::from_secs(10), "the late service", || {
        Ok(service_entry(lab.pin(), "default/late:http/TCP").is_ok())
    })?;
    // Replies from the new pod are reverse-NATed on its interface: without the program
    // there they would come from the pod's address and curl would not accept them.
    let seen = spread(&lab.topo.client, &format!("http://{vip}/"), vip.into(), 5)?;
    assert_eq!(seen.get(&pod.name), Some(&5), "{seen:?}");
    lab.stop()
}

/// Guards against a harness that silently tests nothing: the binaries must exist.
/// Bad flags get a clear error and exit 1 before anything is loaded or pinned; lbctl
/// without an agent says which pin directory it looked in.
#[test]
fn bad_flags_fail_clearly_and_leave_nothing() -> Result<()> {
    let dir = e2e::bin_dir()?;
    let pin = PathBuf::from(format!("/sys/fs/bpf/xdplb-badflags-{}", std::process::id()));
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/services.yaml");
    let pin_s = pin.to_string_lossy().into_owned();
    let example_s = example.to_string_lossy().into_owned();
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "--services",
                "/nonexistent/xdplb.yaml",
                "--edge-iface",
                "lo",
                "--pin-dir",
                &pin_s,
            ],
            "reading services from /nonexistent/xdplb.yaml",
        ),
        (
            &[
                "--services",
                &example_s,
                "--edge-iface",
                "xdplb-nope0",
                "--pin-dir",
                &pin_s,
            ],
            "--edge-iface xdplb-nope0: no such interface",
        ),
        (
            &["--services", &example_s, "--pin-dir", &pin_s],
            "give at least one --edge-iface or --pod-iface",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(dir.join("lb-agent")).args(args).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1) && stderr.contains(want),
            "lb-agent {args:?}: {:?}, stderr:\n{stderr}",
            out.status
        );
        ensure!(!pin.exists(), "lb-agent {args:?} created {}", pin.display());
    }
    let out = Command::new(dir.join("lbctl"))
        .args(["--pin-dir", &pin_s, "services"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && stderr.contains(&pin_s),
        "lbctl without maps: {:?}, stderr:\n{stderr}",
        out.status
    );
    Ok(())
}

/// A pin directory left by an incompatible version (here: a SERVICES map whose values are
/// smaller than this version's) is refused with an error naming the map and what to do,
/// instead of being shared with programs that would read past its values.
#[test]
fn incompatible_pinned_map_is_refused_clearly() -> Result<()> {
    let dir = e2e::bin_dir()?;
    e2e::ensure_bpffs()?;
    let pin = PathBuf::from(format!("/sys/fs/bpf/xdplb-oldpin-{}", std::process::id()));
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    std::fs::create_dir_all(&pin)?;
    let _cleanup = Cleanup(pin.clone());
    let services = pin.join("SERVICES");
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&services)
        .args([
            "type", "hash", "key", "20", "value", "16", "entries", "65536", "name", "SERVICES",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/services.yaml");
    // No interface matches the pattern: even if the check were missing, nothing would be
    // attached anywhere.
    let mut child = Command::new(dir.join("lb-agent"))
        .arg("--services")
        .arg(&example)
        .args(["--pod-iface", "xdplb-nomatch*", "--pin-dir"])
        .arg(&pin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        status.and_then(|s| s.code()) == Some(1)
            && stderr.contains("incompatible")
            && stderr.contains("SERVICES")
            && stderr.contains(&*pin.to_string_lossy()),
        "lb-agent with an old SERVICES pin: {status:?}, stderr:\n{stderr}"
    );
    Ok(())
}

/// XDP program ids on the node's interfaces (`ip -j -d link show`), by interface.
fn node_xdp_progs(topo: &Topology) -> Result<BTreeMap<String, u64>> {
    let out = netns::ns_run(&topo.node, &["ip", "-j", "-d", "link", "show"])?;
    let links: serde_json::Value = serde_json::from_str(&out)?;
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            let id = l.get("xdp")?["prog"]["id"].as_u64()?;
            Some((l["ifname"].as_str()?.to_owned(), id))
        })
        .collect())
}

/// `--on-exit keep`: the programs stay attached through their pinned links while no agent
/// runs, so a rolling restart loses neither live connections nor new ones; the next agent
/// swaps its programs in, and one stopping with the default `detach` removes them.
#[test]
fn programs_kept_attached_serve_while_the_agent_restarts() -> Result<()> {
    e2e::bin_dir()?;
    let mut topo = Topology::new("keep", 2)?;
    for n in 1..=2 {
        start_servers(&mut topo, n)?;
    }
    let services_path = topo.dir.join("services.yaml");
    e2e::write_services(&services_path, &[web(ready_v4(&topo, &[1, 2])?)])?;
    let pin = PinDir::new(&topo)?;
    let agent = Agent::start(&topo, &services_path, &pin.0, &["--on-exit", "keep"])?;
    let client = topo.client.clone();
    let mut conn = LineConn::open(&client, LB_IP, ECHO_PORT)?;
    let first = conn.ask("before")?;
    let pod = first.split_once(' ').context("answer")?.0.to_owned();
    let before = node_xdp_progs(&topo)?;
    ensure!(before.len() == 3, "edge + 2 pod veths attached: {before:?}");
    let log = agent.log_text();
    let status = agent.stop()?;
    ensure!(status.success(), "lb-agent --on-exit keep: {status}\n{log}");

    // No agent runs: the same programs, the live connection and new ones all work.
    ensure!(
        node_xdp_progs(&topo)? == before,
        "programs changed after the agent stopped"
    );
    ensure!(
        conn.ask("during")? == format!("{pod} during"),
        "live connection lost"
    );
    let mut seen = BTreeSet::new();
    for i in 0..10 {
        let a = tcp_line(&client, LB_IP, ECHO_PORT, &format!("gap{i}"))?;
        seen.insert(a.split_once(' ').context("answer")?.0.to_owned());
    }
    ensure!(
        seen == pod_names(&topo, &[1, 2]),
        "during the gap: {seen:?}"
    );

    // The next agent takes the links over with its own programs.
    let agent = Agent::start(&topo, &services_path, &pin.0, &[])?;
    let after = node_xdp_progs(&topo)?;
    ensure!(
        after.keys().eq(before.keys()) && after.iter().all(|(k, id)| before[k] != *id),
        "not taken over: before {before:?}, after {after:?}"
    );
    ensure!(
        conn.ask("after")? == format!("{pod} after"),
        "live connection moved"
    );
    let a = tcp_line(&client, LB_IP, ECHO_PORT, "new")?;
    ensure!(a.ends_with(" new"), "{a}");
    drop(conn);
    let status = agent.stop()?;
    ensure!(status.success(), "lb-agent: {status}");
    let left = node_xdp_progs(&topo)?;
    ensure!(left.is_empty(), "--on-exit detach left {left:?}");
    Ok(())
}
