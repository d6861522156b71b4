//! Socket-level load balancing for host processes (lb-ebpf/src/sock.rs): a process in the
//! node's own network namespace reaching a service frontend, which XDP never sees.
//!
//! The real `lb-agent` (file source) runs in the node namespace and fills the pinned
//! maps; the socket programs are attached to the machine's cgroup v2 root through
//! `lb_userspace::loader::SockLb`, the call lb-agent makes, loaded for the node
//! namespace's cookie and sharing the agent's pinned maps. Clients are real: curl and socat
//! in the node namespace, and sockets of this test process opened from a thread that
//! entered the namespace (to see the addresses the application is shown).
//!
//! Run as root (`cargo xtask test` does). Names are unique per test; everything is torn
//! down on drop.

use anyhow::{ensure, Context as _, Result};
use lb_userspace::loader::{self, SockLb};
use std::collections::BTreeSet;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};
use tests::e2e::{self, Agent, EndpointSpec, PinDir, PortSpec, ServiceSpec};
use tests::netns::{self, Netns, Topology};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0xa);
/// `web`'s LoadBalancer ingress IP: host processes reach it too, as in kube-proxy.
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
const EMPTY_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
/// A service with `sessionAffinity: ClientIP`.
const STICKY_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 30);
const HTTP_PORT: u16 = 80;
const DNS_PORT: u16 = 53;
const UDP_ECHO_BIN: &str = env!("CARGO_BIN_EXE_udp-echo");
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// One HTTP/1.0 GET over `s`; returns the body (the serving pod's name).
fn http_over(mut s: TcpStream) -> Result<String> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text).context("reading the reply")?;
    let (_, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP reply: {text:?}"))?;
    Ok(body.trim().to_string())
}

/// One datagram from an unconnected socket to `to`; returns (answer, who answered).
fn udp_unconnected(to: SocketAddr) -> Result<(String, SocketAddr)> {
    let bind: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.send_to(b"hello\n", to)
        .with_context(|| format!("sendto {to}"))?;
    let mut buf = [0u8; 256];
    let (n, from) = s
        .recv_from(&mut buf)
        .with_context(|| format!("no answer to a datagram to {to}"))?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
}

/// The services file: `web` (both families, TCP and UDP), `empty` (no endpoints) and
/// `sticky` (ClientIP affinity, which `ServiceSpec` does not render: patched in).
fn services_yaml(topo: &Topology) -> Result<String> {
    let mut sticky = ServiceSpec::new(
        "sticky",
        vec![PortSpec::new(
            "http",
            HTTP_PORT,
            netns::POD_HTTP_PORT,
            "TCP",
        )],
    );
    sticky.cluster_ips = vec![STICKY_CLUSTER_IP.into()];
    for p in &topo.pods {
        sticky.endpoints.push(EndpointSpec::ready(p.v4, &p.name));
    }
    let sticky = e2e::render_services(&[sticky])?;
    ensure!(sticky.contains("  sessionAffinity: None\n"), "{sticky}");
    let sticky = sticky.replace(
        "  sessionAffinity: None\n",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      \
         timeoutSeconds: 600\n",
    );
    Ok(e2e::render_services(&services(topo))? + &sticky)
}

/// Agent flags that leave the socket programs to this test: an lb-agent that attaches its
/// own (`--host-services`, on by default once wired) is told not to, so that "before
/// attaching" and "after detaching" mean what they say.
fn without_agent_socket_lb() -> Result<Vec<&'static str>> {
    let agent = e2e::bin_dir()?.join("lb-agent");
    let out = Command::new(&agent)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", agent.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    Ok(if help.contains("--host-services") {
        vec!["--host-services", "false"]
    } else {
        Vec::new()
    })
}

fn services(topo: &Topology) -> Vec<ServiceSpec> {
    let mut web = ServiceSpec::new(
        "web",
        vec![
            PortSpec::new("http", HTTP_PORT, netns::POD_HTTP_PORT, "TCP"),
            PortSpec::new("dns", DNS_PORT, netns::POD_UDP_ECHO_PORT, "UDP"),
        ],
    );
    web.cluster_ips = vec![CLUSTER_IP.into(), CLUSTER_IP6.into()];
    web.lb_ips = vec![LB_IP.into()];
    for p in &topo.pods {
        web.endpoints.push(EndpointSpec::ready(p.v4, &p.name));
        web.endpoints.push(EndpointSpec::ready(p.v6, &p.name));
    }
    let mut empty = ServiceSpec::new(
        "empty",
        vec![
            PortSpec::new("http", HTTP_PORT, netns::POD_HTTP_PORT, "TCP"),
            PortSpec::new("dns", DNS_PORT, netns::POD_UDP_ECHO_PORT, "UDP"),
        ],
    );
    empty.cluster_ips = vec![EMPTY_CLUSTER_IP.into()];
    vec![web, empty]
}

/// Everything a host process sees, then isolation from other namespaces, then detach.
#[test]
fn host_processes_reach_services_through_socket_lb() -> Result<()> {
    e2e::bin_dir()?;
    let mut topo = Topology::new("sock", 2)?;
    for n in 1..=2 {
        topo.start_nginx(n)?;
        topo.start_udp_echo(n, std::path::Path::new(UDP_ECHO_BIN))?;
    }
    let services_path = topo.dir.join("services.yaml");
    std::fs::write(&services_path, services_yaml(&topo)?)?;
    let pin = PinDir::new(&topo)?;
    let agent = Agent::start(&topo, &services_path, &pin.0, &without_agent_socket_lb()?)?;
    let pod_names: BTreeSet<String> = topo.pods.iter().map(|p| p.name.clone()).collect();
    let node = topo.node.clone();

    // Before attaching: the node namespace has no translation (its default route leads
    // to the client namespace, which does not forward), so a connect goes nowhere.
    let before = e2e::http_get(&node, &format!("http://{CLUSTER_IP}:{HTTP_PORT}/"));
    ensure!(
        before.is_err(),
        "the ClusterIP answered the node before the socket LB was attached: {before:?}"
    );

    let sock = attach_for(&node, &pin)?;
    curl_from_the_node_reaches_every_frontend(&node, &pod_names, &agent)?;
    applications_are_shown_the_vip_never_the_pod(&node, &pod_names)?;
    translated_sockets_are_counted_as_new_flows(&pin)?;
    other_namespaces_are_not_translated(&topo)?;

    // Detached: the node's connects are no longer translated.
    sock.detach().context("detaching the socket LB")?;
    let after = e2e::http_get(&node, &format!("http://{CLUSTER_IP}:{HTTP_PORT}/"));
    ensure!(
        after.is_err(),
        "the ClusterIP still answered the node after detaching: {after:?}"
    );
    let status = agent.stop()?;
    ensure!(status.success(), "lb-agent exited with {status}");
    Ok(())
}

/// Attaches the socket programs for namespace `node` (sharing the agent's pins in `pin`),
/// as lb-agent does, and checks they act for that namespace's cookie.
fn attach_for(node: &str, pin: &PinDir) -> Result<SockLb> {
    let cgroup = loader::find_cgroup2(None).context("finding cgroup v2")?;
    let sock = netns::run_in_netns(node, || {
        Ok(SockLb::attach(lb_userspace::EBPF_OBJ, &pin.0, &cgroup)?)
    })
    .context("attaching the socket LB for the node namespace")?;
    let node_cookie = netns::run_in_netns(node, || Ok(loader::netns_cookie()?))?;
    ensure!(
        sock.netns_cookie() == node_cookie && node_cookie != loader::netns_cookie()?,
        "the programs act for namespace cookie {}, the node's is {node_cookie}",
        sock.netns_cookie()
    );
    Ok(sock)
}

/// curl from the node (a host process) through the ClusterIP, both families; every
/// connection is a new socket, so both pods answer over a few requests. Also the
/// ClientIP-affinity service and the LoadBalancer IP.
fn curl_from_the_node_reaches_every_frontend(
    node: &str,
    pod_names: &BTreeSet<String>,
    agent: &Agent,
) -> Result<()> {
    let mut seen = BTreeSet::new();
    for _ in 0..12 {
        let r = e2e::http_get(node, &format!("http://{CLUSTER_IP}:{HTTP_PORT}/")).with_context(
            || {
                format!(
                    "curl the ClusterIP from the node; agent log:\n{}",
                    agent.log_text()
                )
            },
        )?;
        ensure!(pod_names.contains(&r.body), "unexpected answer {r:?}");
        seen.insert(r.body);
    }
    ensure!(
        seen == *pod_names,
        "12 connections from the node reached only {seen:?}"
    );
    // ClientIP affinity: the node is one client, so every connection gets one pod.
    let mut sticky = BTreeSet::new();
    for _ in 0..12 {
        let r = e2e::http_get(node, &format!("http://{STICKY_CLUSTER_IP}:{HTTP_PORT}/"))?;
        sticky.insert(r.body);
    }
    ensure!(
        sticky.len() == 1 && sticky.is_subset(pod_names),
        "12 connections to a ClientIP-affinity service reached {sticky:?}"
    );
    let r6 = e2e::http_get(node, &format!("http://[{CLUSTER_IP6}]:{HTTP_PORT}/"))?;
    ensure!(
        pod_names.contains(&r6.body),
        "IPv6 ClusterIP answered {r6:?}"
    );
    let lb = e2e::http_get(node, &format!("http://{LB_IP}:{HTTP_PORT}/"))?;
    ensure!(
        pod_names.contains(&lb.body),
        "LoadBalancer IP answered {lb:?}"
    );
    Ok(())
}

/// What the application is shown: the VIP, never the pod. TCP over IPv4, over an IPv6
/// socket through the mapped address, and over IPv6; UDP unconnected (sendmsg/recvmsg)
/// in both families; UDP connected (socat). A service without endpoints is refused at
/// once.
fn applications_are_shown_the_vip_never_the_pod(
    node: &str,
    pod_names: &BTreeSet<String>,
) -> Result<()> {
    netns::run_in_netns(node, || {
        sockets_see_the_vip(pod_names)?;
        sockets_to_a_service_without_endpoints_are_refused()
    })?;
    let answer = e2e::udp_request(node, CLUSTER_IP.into(), DNS_PORT, "hi")?;
    ensure!(
        pod_names.contains(&answer),
        "connected UDP answered {answer:?}"
    );
    let (refused, took) = e2e::tcp_connect(node, EMPTY_CLUSTER_IP.into(), HTTP_PORT)?;
    ensure!(
        matches!(&refused, Err(e) if e.contains("refused")) && took < Duration::from_secs(1),
        "socat to a service without endpoints: {refused:?} after {took:?}"
    );
    Ok(())
}

/// Sockets of this process (on a thread in the node namespace): the peer is the VIP.
fn sockets_see_the_vip(names: &BTreeSet<String>) -> Result<()> {
    let vip: SocketAddr = (CLUSTER_IP, HTTP_PORT).into();
    let mapped: SocketAddr = SocketAddrV6::new(CLUSTER_IP.to_ipv6_mapped(), HTTP_PORT, 0, 0).into();
    let vip6: SocketAddr = (CLUSTER_IP6, HTTP_PORT).into();
    for to in [vip, mapped, vip6] {
        let s =
            TcpStream::connect_timeout(&to, IO_TIMEOUT).with_context(|| format!("connect {to}"))?;
        let peer = s.peer_addr()?;
        ensure!(
            peer == to,
            "getpeername after connect({to}) returned {peer}"
        );
        let body = http_over(s)?;
        ensure!(names.contains(&body), "{to} answered {body:?}");
    }
    for to in [
        SocketAddr::from((CLUSTER_IP, DNS_PORT)),
        // An IPv6 socket: the kernel hands mapped destinations to the IPv4 path.
        SocketAddrV6::new(CLUSTER_IP.to_ipv6_mapped(), DNS_PORT, 0, 0).into(),
        SocketAddr::from((CLUSTER_IP6, DNS_PORT)),
    ] {
        let (answer, from) = udp_unconnected(to)?;
        ensure!(names.contains(&answer), "UDP {to} answered {answer:?}");
        ensure!(
            from == to,
            "UDP answer to {to} came from {from}, not the VIP"
        );
    }
    Ok(())
}

/// A service without endpoints fails at once, with kube-proxy's errno.
fn sockets_to_a_service_without_endpoints_are_refused() -> Result<()> {
    let t = Instant::now();
    let err = TcpStream::connect_timeout(&(EMPTY_CLUSTER_IP, HTTP_PORT).into(), IO_TIMEOUT)
        .err()
        .context("connect to a service without endpoints succeeded")?;
    ensure!(
        err.kind() == ErrorKind::ConnectionRefused && t.elapsed() < Duration::from_secs(1),
        "connect to a service without endpoints: {err} after {:?}",
        t.elapsed()
    );
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    let err = s
        .send_to(b"x", (EMPTY_CLUSTER_IP, DNS_PORT))
        .err()
        .context("sendto a service without endpoints succeeded")?;
    ensure!(
        err.kind() == ErrorKind::ConnectionRefused,
        "sendto a service without endpoints: {err}"
    );
    Ok(())
}

/// Every translated socket was counted as a new flow of its service port (XDP saw none of
/// them: the node talked to the pods directly).
fn translated_sockets_are_counted_as_new_flows(pin: &PinDir) -> Result<()> {
    let svcs = e2e::lbctl_json(&pin.0, "services")?;
    for (port, at_least) in [("default/web:http/TCP", 17), ("default/web:dns/UDP", 4)] {
        let flows = svcs
            .as_array()
            .and_then(|a| a.iter().find(|s| s["service"] == port))
            .and_then(|s| s["counters"]["new_flows"].as_u64())
            .with_context(|| format!("no new_flows for {port} in {svcs}"))?;
        ensure!(
            flows >= at_least,
            "{port}: {flows} new flows counted, {at_least} sockets translated"
        );
    }
    Ok(())
}

/// A namespace that is not the agent's is not translated, although the programs run for
/// its sockets too (same cgroup): there, the ClusterIP is a local address with a server of
/// its own, and a connect reaches that server. Translated, it would go to a pod address
/// this namespace has no route to.
fn other_namespaces_are_not_translated(topo: &Topology) -> Result<()> {
    let other = Netns::new(format!("xdplb-sock-{}-other", topo.prefix))?;
    netns::ip(&["-n", &other.name, "link", "set", "lo", "up"])?;
    netns::ip(&[
        "-n",
        &other.name,
        "addr",
        "add",
        &format!("{CLUSTER_IP}/32"),
        "dev",
        "lo",
    ])?;
    netns::run_in_netns(&other.name, || {
        let l = TcpListener::bind((CLUSTER_IP, HTTP_PORT))?;
        let to: SocketAddr = (CLUSTER_IP, HTTP_PORT).into();
        let mut c = TcpStream::connect_timeout(&to, IO_TIMEOUT)
            .context("connect to the ClusterIP from another namespace")?;
        let (mut srv, _) = l.accept()?;
        srv.write_all(b"other\n")?;
        drop(srv);
        c.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut got = String::new();
        c.read_to_string(&mut got)?;
        ensure!(got.trim() == "other", "another namespace reached {got:?}");
        Ok(())
    })
}

/// Through the real agent: `--host-services` (on by default) attaches the socket programs
/// before the ready line, from the agent's own mount namespace (where the harness leaves
/// no cgroup2 mounted, so the agent mounts one), and SIGTERM detaches them.
#[test]
fn agent_serves_host_processes_and_detaches_on_stop() -> Result<()> {
    e2e::bin_dir()?;
    let mut topo = Topology::new("socka", 1)?;
    topo.start_nginx(1)?;
    let services_path = topo.dir.join("services.yaml");
    e2e::write_services(&services_path, &services(&topo))?;
    let pin = PinDir::new(&topo)?;
    let agent = Agent::start(&topo, &services_path, &pin.0, &[])?;
    let node = topo.node.clone();
    let url = format!("http://{CLUSTER_IP}:{HTTP_PORT}/");
    let r = e2e::http_get(&node, &url)
        .with_context(|| format!("curl from the node; agent log:\n{}", agent.log_text()))?;
    ensure!(r.body == "pod-1", "the ClusterIP answered {r:?}");
    let (refused, took) = e2e::tcp_connect(&node, EMPTY_CLUSTER_IP.into(), HTTP_PORT)?;
    ensure!(
        matches!(&refused, Err(e) if e.contains("refused")) && took < Duration::from_secs(1),
        "socat to a service without endpoints: {refused:?} after {took:?}"
    );
    let status = agent.stop()?;
    ensure!(status.success(), "lb-agent exited with {status}");
    let after = e2e::http_get(&node, &url);
    ensure!(
        after.is_err(),
        "the ClusterIP still answered the node after the agent stopped: {after:?}"
    );
    Ok(())
}
