//! Services from the API reach their endpoints: ClusterIP and LoadBalancer while scaling
//! under traffic, NodePorts on the node's addresses, dual stack, external IPs and
//! `ipMode: Proxy`, headless services, and a LoadBalancer IP assigned later.

use crate::lab::{
    backend_addrs, find_port, frontends, on, ready, slice, slice6, KubeLab, SvcDef, APPLY_TIMEOUT,
    CLUSTER_IP, CLUSTER_IP6, HTTP_NODE_PORT, LB_IP, LB_IP6, OTHER_NODE, OTHER_NODE_V4, PEER_PORT,
};
use crate::traffic::{icmp_echo, names, spread, wait_for_pod, Sample, TrafficLoop};
use anyhow::{Context as _, Result};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};
use tests::e2e::{self, LineConn};
use tests::netns::{self, NODE_V4, NODE_V6};

/// Case 1: Services and EndpointSlices from the API: ClusterIP (from a pod) and LoadBalancer IP
/// (from outside) reach the endpoints; scaling up and down under continuous traffic
/// loses no request, new pods get traffic and removed ones none.
#[test]
fn kube_services_and_scaling_under_traffic() -> Result<()> {
    let web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    let w = web.clone();
    let lab = KubeLab::start("ksc", 3, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), ready(2)])?)?;
        Ok(())
    })?;
    let http = web.port_id("http");
    let all = e2e::lbctl_json(lab.pin(), "services")?;
    let entry = find_port(&all, &http).with_context(|| format!("{http} missing: {all}"))?;
    assert_eq!(
        backend_addrs(entry),
        ["198.18.1.1", "198.18.1.2"]
            .iter()
            .map(std::string::ToString::to_string)
            .collect()
    );
    let fe = frontends(entry);
    for want in [CLUSTER_IP, LB_IP] {
        assert!(
            fe.contains(&(want.to_string(), 80)),
            "{want}:80 not a frontend: {fe:?}"
        );
    }
    let client = lab.topo.client.clone();
    let seen = spread(&client, LB_IP.into(), 80, 20).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[1, 2]),
        "{seen:?}"
    );
    let pod3 = lab.topo.pod(3)?.ns.clone();
    let seen = spread(&pod3, CLUSTER_IP.into(), 80, 6).with_context(|| lab.diag())?;
    assert!(seen.keys().all(|p| names(&[1, 2]).contains(p)), "{seen:?}");

    let traffic = TrafficLoop::start(&client, format!("http://{LB_IP}/"));
    std::thread::sleep(Duration::from_millis(500));
    // Scale up: pod-3 joins.
    let t0 = Instant::now();
    lab.fake
        .update(&slice(&web, &[ready(1), ready(2), ready(3)])?)?;
    let applied = lab.wait_backends(&http, &[1, 2, 3])?;
    // The figure includes the polling (one `lbctl services` run per 50 ms); one run's
    // own cost is printed next to it.
    let lbctl_started = Instant::now();
    e2e::lbctl_json(lab.pin(), "services")?;
    eprintln!(
        "scale-up: API write to lbctl showing it: {:?} (one lbctl run: {:?})",
        applied - t0,
        lbctl_started.elapsed()
    );
    wait_for_pod(&client, LB_IP, "pod-3", APPLY_TIMEOUT).with_context(|| lab.diag())?;
    // Scale down: pod-2 leaves the slice (its nginx keeps running, as during a graceful
    // scale-down; requests must simply stop reaching it).
    lab.fake.update(&slice(&web, &[ready(1), ready(3)])?)?;
    let removed = lab.wait_backends(&http, &[1, 3])?;
    std::thread::sleep(Duration::from_secs(2));
    let samples = traffic.finish()?;
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.result.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}\n{}",
        failed.len(),
        samples.len(),
        lab.diag()
    );
    let after_removal: Vec<&Sample> = samples.iter().filter(|s| s.started > removed).collect();
    assert!(
        after_removal.len() >= 10,
        "only {} requests after the removal",
        after_removal.len()
    );
    let to_removed: Vec<&&Sample> = after_removal
        .iter()
        .filter(|s| s.result.as_deref() == Ok("pod-2"))
        .collect();
    assert!(
        to_removed.is_empty(),
        "pod-2 answered after it left the slice: {to_removed:?}"
    );
    assert!(
        samples.iter().any(|s| s.result.as_deref() == Ok("pod-3")),
        "pod-3 never answered the traffic loop"
    );
    lab.stop()
}

/// Case 2: NodePort: the node's InternalIP (from node-a's Node object) serves the NodePort;
/// node-b's address is not a frontend; traffic to the node address that is not for a
/// NodePort (ping, fragmented ping, fragmented UDP, another TCP port) still reaches the
/// node's own stack.
#[test]
fn kube_node_port_on_node_address() -> Result<()> {
    let mut web = SvcDef::new("web", "NodePort", CLUSTER_IP);
    web.ports.truncate(1);
    let w = web.clone();
    let mut lab = KubeLab::start("knp", 2, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), ready(2)])?)?;
        Ok(())
    })?;
    let all = e2e::lbctl_json(lab.pin(), "services")?;
    let entry = find_port(&all, &web.port_id("http")).with_context(|| format!("{all}"))?;
    let fe = frontends(entry);
    assert!(
        fe.contains(&(NODE_V4.to_string(), u64::from(HTTP_NODE_PORT))),
        "{fe:?}"
    );
    assert!(
        !fe.iter().any(|(a, _)| a == &OTHER_NODE_V4.to_string()),
        "node-b's address became a frontend: {fe:?}"
    );
    // An IPv4-only service gets no NodePort on the node's IPv6 address.
    assert!(
        !fe.iter().any(|(a, _)| a == &NODE_V6.to_string()),
        "IPv6 node address on an IPv4 service: {fe:?}"
    );
    let client = lab.topo.client.clone();
    let seen = spread(&client, NODE_V4.into(), HTTP_NODE_PORT, 20).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[1, 2]),
        "{seen:?}"
    );

    // The node's own services on its address.
    let node = lab.topo.node.clone();
    let log = lab.topo.dir.join("node-udp.log");
    lab.topo.spawn(
        &node,
        &[env!("CARGO_BIN_EXE_udp-echo"), "5353", "node"],
        &log,
    )?;
    netns::wait_for_port(&node, 5353, true, Duration::from_secs(10))?;
    let log = lab.topo.dir.join("node-tcp.log");
    lab.topo.spawn(
        &node,
        &[
            "socat",
            "TCP4-LISTEN:7777,reuseaddr,fork",
            "SYSTEM:echo node",
        ],
        &log,
    )?;
    netns::wait_for_port(&node, 7777, false, Duration::from_secs(10))?;
    let frag_before = lab.reason("drop_fragment")?;
    icmp_echo(&client, NODE_V4, 56).context("ping to the node address")?;
    icmp_echo(&client, NODE_V4, 3000).context("fragmented ping to the node address")?;
    // 3000 bytes over a 1500-byte MTU: the datagram leaves the client in fragments.
    let answer = e2e::udp_request(&client, NODE_V4.into(), 5353, &"x".repeat(3000))
        .with_context(|| format!("fragmented UDP to the node address; {}", lab.diag()))?;
    assert_eq!(answer, "node");
    let (res, _) = e2e::tcp_connect(&client, NODE_V4.into(), 7777)?;
    assert_eq!(res, Ok(()), "TCP to a port the node itself serves");
    assert_eq!(
        lab.reason("drop_fragment")?,
        frag_before,
        "fragments to the node address were dropped"
    );
    lab.stop()
}

/// Case 9: a dual-stack LoadBalancer service (one EndpointSlice per family): the IPv6
/// LoadBalancer IP and ClusterIP reach the pods over IPv6, and its NodePort is open on
/// both of node-a's InternalIPs.
#[test]
fn kube_dual_stack_load_balancer_and_node_ports() -> Result<()> {
    let mut web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    web.v6 = Some((CLUSTER_IP6, Some(LB_IP6)));
    let w = web.clone();
    let lab = KubeLab::start("kds", 2, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), ready(2)])?)?;
        f.create(&slice6(&w, &[ready(1), ready(2)])?)?;
        Ok(())
    })?;
    let all = e2e::lbctl_json(lab.pin(), "services")?;
    let entry = find_port(&all, &web.port_id("http")).with_context(|| format!("{all}"))?;
    let fe = frontends(entry);
    for (addr, port) in [
        (IpAddr::from(LB_IP6), 80),
        (CLUSTER_IP6.into(), 80),
        (NODE_V4.into(), HTTP_NODE_PORT),
        (NODE_V6.into(), HTTP_NODE_PORT),
    ] {
        assert!(
            fe.contains(&(addr.to_string(), u64::from(port))),
            "{addr} port {port} is not a frontend: {fe:?}"
        );
    }
    let client = lab.topo.client.clone();
    for (vip, port) in [(IpAddr::from(LB_IP6), 80), (NODE_V6.into(), HTTP_NODE_PORT)] {
        let seen = spread(&client, vip, port, 16).with_context(|| lab.diag())?;
        assert_eq!(
            seen.keys().cloned().collect::<BTreeSet<_>>(),
            names(&[1, 2]),
            "{vip} port {port}: {seen:?}"
        );
    }
    let pod2 = lab.topo.pod(2)?.ns.clone();
    spread(&pod2, CLUSTER_IP6.into(), 80, 4).with_context(|| lab.diag())?;
    lab.stop()
}

/// Case 11: `spec.externalIPs` on a ClusterIP service are frontends and follow
/// externalTrafficPolicy Local (only node-a's endpoint, client address preserved) while
/// the ClusterIP uses every endpoint; a LoadBalancer ingress with `ipMode: Proxy` is not
/// a frontend (the load balancer proxies to the nodes); headless services are ignored.
#[test]
fn kube_external_ips_ip_mode_proxy_and_headless() -> Result<()> {
    const EXT_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 10);
    const EXT_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 50);
    const PROXY_LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 30);
    let ext_def = SvcDef::new("ext", "ClusterIP", EXT_CLUSTER_IP);
    let mut ext = ext_def.service()?;
    let spec = ext.spec.as_mut().context("spec")?;
    spec.external_ips = Some(vec![EXT_IP.to_string()]);
    spec.external_traffic_policy = Some("Local".into());
    let proxied_def = SvcDef::lb("proxied", Ipv4Addr::new(198, 19, 0, 60), PROXY_LB_IP);
    let mut proxied = proxied_def.service()?;
    for ing in proxied
        .status
        .as_mut()
        .and_then(|s| s.load_balancer.as_mut())
        .and_then(|l| l.ingress.as_mut())
        .context("ingress")?
    {
        ing.ip_mode = Some("Proxy".into());
    }
    let headless_def = SvcDef::new("headless", "ClusterIP", Ipv4Addr::new(198, 19, 0, 70));
    let mut headless = headless_def.service()?;
    let spec = headless.spec.as_mut().context("spec")?;
    spec.cluster_ip = Some("None".into());
    spec.cluster_ips = Some(vec!["None".into()]);
    let lab = KubeLab::start("kext", 3, |f| {
        f.create(&ext)?;
        f.create(&slice(&ext_def, &[on(OTHER_NODE, 1), ready(2)])?)?;
        f.create(&proxied)?;
        f.create(&slice(&proxied_def, &[ready(1)])?)?;
        f.create(&headless)?;
        f.create(&slice(&headless_def, &[ready(1)])?)?;
        Ok(())
    })?;
    let all = e2e::lbctl_json(lab.pin(), "services")?;
    let ext_fe = frontends(find_port(&all, &ext_def.port_id("http")).context("ext")?);
    assert!(ext_fe.contains(&(EXT_IP.to_string(), 80)), "{ext_fe:?}");
    let proxied_fe = frontends(find_port(&all, &proxied_def.port_id("http")).context("proxied")?);
    assert!(
        !proxied_fe
            .iter()
            .any(|(a, _)| a == &PROXY_LB_IP.to_string()),
        "an ipMode Proxy ingress IP became a frontend: {proxied_fe:?}"
    );
    assert!(
        proxied_fe.contains(&("198.19.0.60".to_string(), 80)),
        "{proxied_fe:?}"
    );
    let listed: Vec<&str> = all
        .as_array()
        .context("services array")?
        .iter()
        .filter_map(|s| s["service"].as_str())
        .collect();
    assert!(
        !listed.iter().any(|s| s.starts_with("default/headless:")),
        "headless service programmed: {listed:?}"
    );

    // The client's route to 198.19.0.0/16 goes via the node: the externalIP is reachable.
    let client = lab.topo.client.clone();
    let seen = spread(&client, EXT_IP.into(), 80, 10).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[2]),
        "{seen:?}"
    );
    let mut conn = LineConn::open(&client, EXT_IP, PEER_PORT)?;
    assert_eq!(conn.ask("")?, format!("pod-2 {}", netns::CLIENT_V4));
    let pod3 = lab.topo.pod(3)?.ns.clone();
    let seen = spread(&pod3, EXT_CLUSTER_IP.into(), 80, 16).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[1, 2]),
        "{seen:?}"
    );
    lab.stop()
}

/// Case 13: a LoadBalancer IP assigned after the service was created (the cloud
/// controller writes `status.loadBalancer.ingress` later) becomes a frontend; a changed
/// ingress IP moves the frontend.
#[test]
fn kube_load_balancer_ip_assigned_later() -> Result<()> {
    const MOVED_LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 11);
    let mut web = SvcDef::new("web", "LoadBalancer", CLUSTER_IP);
    let w = web.clone();
    let lab = KubeLab::start("klate", 2, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), ready(2)])?)?;
        Ok(())
    })?;
    let http = web.port_id("http");
    let has_frontend = |all: &serde_json::Value, ip: Ipv4Addr| {
        find_port(all, &http).is_some_and(|e| frontends(e).contains(&(ip.to_string(), 80)))
    };
    let all = e2e::lbctl_json(lab.pin(), "services")?;
    assert!(
        !has_frontend(&all, LB_IP),
        "a frontend before any ingress IP: {all}"
    );
    web.lb_ip = Some(LB_IP);
    lab.fake.update(&web.service()?)?;
    lab.wait_services("the ingress IP", |all| Ok(has_frontend(all, LB_IP)))?;
    let client = lab.topo.client.clone();
    spread(&client, LB_IP.into(), 80, 6).with_context(|| lab.diag())?;
    web.lb_ip = Some(MOVED_LB_IP);
    lab.fake.update(&web.service()?)?;
    lab.wait_services("the moved ingress IP", |all| {
        Ok(has_frontend(all, MOVED_LB_IP) && !has_frontend(all, LB_IP))
    })?;
    spread(&client, MOVED_LB_IP.into(), 80, 6).with_context(|| lab.diag())?;
    lab.stop()
}
