//! The fake Kubernetes API server checked with the real kube-rs client (`fakeapi_*`), and
//! the agent in Kubernetes mode against it with real traffic (`kube_*`).

use anyhow::{bail, ensure, Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::e2e::{self, Agent, LineConn, PinDir};
use tests::fakeapi::FakeApi;
use tests::netns::{
    self, Topology, NODE_V4, NODE_V6, POD_HTTP_PORT, POD_PEER_ECHO_PORT, POD_TCP_ECHO_PORT,
};

mod objects {
    //! k8s-openapi objects as a cluster would hold them.
    use k8s_openapi::api::core::v1::{
        Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec,
    };
    use k8s_openapi::api::discovery::v1::{
        Endpoint, EndpointConditions, EndpointPort, EndpointSlice,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use std::collections::BTreeMap;

    pub fn service(name: &str, cluster_ip: &str, port: i32, target: i32) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                cluster_ip: Some(cluster_ip.into()),
                cluster_ips: Some(vec![cluster_ip.into()]),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port,
                    protocol: Some("TCP".into()),
                    target_port: Some(IntOrString::Int(target)),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// One ready endpoint per address, on `node`.
    pub fn slice(
        service: &str,
        suffix: &str,
        addrs: &[&str],
        node: &str,
        port: i32,
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{service}-{suffix}")),
                namespace: Some("default".into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/service-name".to_string(),
                    service.to_string(),
                )])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(
                addrs
                    .iter()
                    .map(|a| Endpoint {
                        addresses: vec![(*a).to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            serving: Some(true),
                            terminating: Some(false),
                        }),
                        node_name: Some(node.into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(port),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
        }
    }

    pub fn node(name: &str, internal_ip: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: None,
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: internal_ip.into(),
                }]),
                ..Default::default()
            }),
        }
    }
}

/// A kube client configured the way the agent will be: from the kubeconfig the fake
/// server writes.
async fn client_for(api: &FakeApi, dir: &std::path::Path) -> Result<kube::Client> {
    let path = dir.join("kubeconfig");
    api.write_kubeconfig(&path)?;
    let kc = kube::config::Kubeconfig::read_from(&path).context("reading the kubeconfig")?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .context("kubeconfig to config")?;
    kube::Client::try_from(config).context("building the client")
}

fn scratch(tag: &str) -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("xdplb-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// Lists come back as typed objects with resourceVersions; pages follow `limit`; field and
/// label selectors filter; single objects by name; unknown paths are 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fakeapi_list_pages_selectors_get() -> Result<()> {
    let fake = FakeApi::start()?;
    let dir = scratch("fakeapi-list")?;
    let client = client_for(&fake, &dir).await?;
    for i in 0..7 {
        fake.create(&objects::service(
            &format!("svc-{i}"),
            &format!("198.19.0.{}", i + 1),
            80,
            8080,
        ))?;
    }
    fake.create(&objects::slice(
        "svc-1",
        "a",
        &["198.18.1.1"],
        "node-a",
        8080,
    ))?;
    fake.create(&objects::node("node-a", "198.18.0.1"))?;
    fake.create(&objects::node("node-b", "198.18.0.9"))?;

    let svcs: Api<Service> = Api::all(client.clone());
    let all = svcs.list(&ListParams::default()).await?;
    assert_eq!(all.items.len(), 7);
    let list_rv: u64 = all
        .metadata
        .resource_version
        .as_deref()
        .context("list without resourceVersion")?
        .parse()?;
    assert_eq!(list_rv, fake.resource_version());
    let names: BTreeSet<_> = all
        .items
        .iter()
        .map(|s| s.metadata.name.clone().unwrap_or_default())
        .collect();
    assert!(names.contains("svc-3"));
    for s in &all.items {
        assert!(s.metadata.resource_version.is_some(), "item without RV");
        assert!(s.metadata.uid.is_some(), "item without uid");
        assert!(
            s.metadata.creation_timestamp.is_some(),
            "no creationTimestamp"
        );
    }

    // Pages of 3: 3 + 3 + 1, one consistent snapshot even if objects change in between.
    let p1 = svcs.list(&ListParams::default().limit(3)).await?;
    assert_eq!(p1.items.len(), 3);
    let token = p1.metadata.continue_.clone().context("no continue token")?;
    fake.delete::<Service>("default", "svc-6")?;
    let p2 = svcs
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await?;
    assert_eq!(p2.items.len(), 3);
    let token = p2.metadata.continue_.clone().context("no second token")?;
    let p3 = svcs
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await?;
    assert_eq!(p3.items.len(), 1, "snapshot still holds svc-6");
    assert!(p3.metadata.continue_.as_deref().unwrap_or("").is_empty());

    let nodes: Api<Node> = Api::all(client.clone());
    let only_a = nodes
        .list(&ListParams::default().fields("metadata.name=node-a"))
        .await?;
    assert_eq!(only_a.items.len(), 1);
    assert_eq!(only_a.items[0].metadata.name.as_deref(), Some("node-a"));
    let node_a = nodes.get("node-a").await?;
    assert_eq!(
        node_a
            .status
            .and_then(|s| s.addresses)
            .map(|a| a[0].address.clone()),
        Some("198.18.0.1".to_string())
    );

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let by_label = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=svc-1"))
        .await?;
    assert_eq!(by_label.items.len(), 1);
    let none = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name in (svc-2,svc-3)"))
        .await?;
    assert!(none.items.is_empty());
    let other_ns: Api<EndpointSlice> = Api::namespaced(client.clone(), "kube-system");
    assert!(other_ns
        .list(&ListParams::default())
        .await?
        .items
        .is_empty());

    let err = svcs.get("nope").await.expect_err("a missing service");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err:?}"
    );
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(client.clone());
    let err = pods
        .list(&ListParams::default())
        .await
        .expect_err("pods are not served");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err:?}"
    );
    let reqs = fake.requests();
    assert!(reqs
        .iter()
        .any(|r| r.path == "/api/v1/pods" && r.status == 404));
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// A watch from a list's version delivers each change once, in order, with its version;
/// bookmarks when allowed; the stream ends after timeoutSeconds; an expired version gets
/// an ERROR event with a 410 Status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fakeapi_watch_events_bookmarks_timeout_410() -> Result<()> {
    let fake = FakeApi::start()?;
    fake.set_bookmark_interval(Duration::from_millis(200));
    let dir = scratch("fakeapi-watch")?;
    let client = client_for(&fake, &dir).await?;
    let svcs: Api<Service> = Api::all(client.clone());
    fake.create(&objects::service("a", "198.19.0.1", 80, 8080))?;
    let list = svcs.list(&ListParams::default()).await?;
    let rv = list.metadata.resource_version.clone().unwrap_or_default();

    let wp = WatchParams::default().timeout(2);
    let mut stream = svcs.watch(&wp, &rv).await?.boxed();
    let rv_b = fake.create(&objects::service("b", "198.19.0.2", 80, 8080))?;
    let mut changed = objects::service("a", "198.19.0.1", 81, 8080);
    changed.metadata.labels = Some([("x".to_string(), "y".to_string())].into());
    let rv_a2 = fake.update(&changed)?;
    let rv_del = fake.delete::<Service>("default", "b")?;
    // A node change is not a service event.
    fake.create(&objects::node("node-a", "198.18.0.1"))?;

    let mut seen = Vec::new();
    let mut bookmarks = 0;
    let started = std::time::Instant::now();
    while let Some(ev) = stream.try_next().await? {
        match ev {
            WatchEvent::Added(s) => seen.push(("ADDED", s)),
            WatchEvent::Modified(s) => seen.push(("MODIFIED", s)),
            WatchEvent::Deleted(s) => seen.push(("DELETED", s)),
            WatchEvent::Bookmark(b) => {
                bookmarks += 1;
                assert!(b.metadata.resource_version.parse::<u64>()? >= rv_del);
            }
            WatchEvent::Error(e) => anyhow::bail!("unexpected error event {e:?}"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "stream ended after {took:?}, timeoutSeconds=2"
    );
    let got: Vec<(&str, String, String)> = seen
        .iter()
        .map(|(t, s)| {
            (
                *t,
                s.metadata.name.clone().unwrap_or_default(),
                s.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("ADDED", "b".to_string(), rv_b.to_string()),
            ("MODIFIED", "a".to_string(), rv_a2.to_string()),
            ("DELETED", "b".to_string(), rv_del.to_string()),
        ]
    );
    assert!(bookmarks >= 3, "{bookmarks} bookmarks in 2 s at 200 ms");

    // Resuming from the first list's version replays the same history.
    let mut replay = svcs
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), &rv)
        .await?
        .boxed();
    let mut n = 0;
    while let Some(ev) = replay.try_next().await? {
        assert!(
            !matches!(ev, WatchEvent::Bookmark(_)),
            "bookmarks not asked for"
        );
        n += 1;
    }
    assert_eq!(n, 3);

    fake.compact();
    let mut gone = svcs.watch(&WatchParams::default(), &rv).await?.boxed();
    match gone.try_next().await? {
        Some(WatchEvent::Error(e)) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => anyhow::bail!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(gone.try_next().await?.is_none(), "stream ends after 410");
    // A fresh list's version is watchable again.
    let rv2 = svcs
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut ok = svcs
        .watch(&WatchParams::default().timeout(1), &rv2)
        .await?
        .boxed();
    while let Some(ev) = ok.try_next().await? {
        assert!(!matches!(ev, WatchEvent::Error(_)), "{ev:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// kube-runtime's watcher (what the agent's source uses): initial list, live changes,
/// resume after a dropped watch without re-listing, re-list after 410, recovery after an
/// outage with the changes made during it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fakeapi_kube_runtime_watcher_resume_relist_outage() -> Result<()> {
    let fake = FakeApi::start()?;
    fake.set_bookmark_interval(Duration::from_millis(200));
    let dir = scratch("fakeapi-runtime")?;
    let client = client_for(&fake, &dir).await?;
    fake.create(&objects::service("a", "198.19.0.1", 80, 8080))?;
    fake.create(&objects::service("b", "198.19.0.2", 80, 8080))?;
    let svcs: Api<Service> = Api::all(client.clone());
    // The same backoff the agent uses, shortened by nothing: the default.
    use kube::runtime::WatchStreamExt as _;
    let mut events = watcher(svcs, watcher::Config::default())
        .default_backoff()
        .boxed();

    // What the watcher's consumer would hold: names of the current objects.
    let mut names = BTreeSet::new();
    let mut relists = 0;
    async fn next(
        events: &mut (impl futures::Stream<Item = Result<watcher::Event<Service>, watcher::Error>>
                  + Unpin),
        names: &mut BTreeSet<String>,
        relists: &mut u32,
        until: impl Fn(&BTreeSet<String>) -> bool,
    ) -> Result<()> {
        let mut init: Option<BTreeSet<String>> = None;
        tokio::time::timeout(Duration::from_secs(20), async {
            while !until(names) || init.is_some() {
                let ev = events.next().await.context("watcher ended")?;
                match ev {
                    Ok(watcher::Event::Init) => init = Some(BTreeSet::new()),
                    Ok(watcher::Event::InitApply(s)) => {
                        if let Some(i) = init.as_mut() {
                            i.insert(s.metadata.name.unwrap_or_default());
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        *names = init.take().unwrap_or_default();
                        *relists += 1;
                    }
                    Ok(watcher::Event::Apply(s)) => {
                        names.insert(s.metadata.name.unwrap_or_default());
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        names.remove(&s.metadata.name.unwrap_or_default());
                    }
                    // Errors are retried by the watcher itself (with backoff).
                    Err(_) => {}
                }
            }
            Ok::<_, anyhow::Error>(())
        })
        .await
        .context("timed out waiting for the watcher")?
    }
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();

    next(&mut events, &mut names, &mut relists, |n| {
        n == &set(&["a", "b"])
    })
    .await?;
    assert_eq!(relists, 1);
    fake.create(&objects::service("c", "198.19.0.3", 80, 8080))?;
    next(&mut events, &mut names, &mut relists, |n| n.contains("c")).await?;

    // A dropped watch resumes from the last version: no re-list.
    let lists_before = fake.requests().iter().filter(|r| !r.watch).count();
    fake.drop_watches();
    fake.delete::<Service>("default", "a")?;
    next(&mut events, &mut names, &mut relists, |n| {
        n == &set(&["b", "c"])
    })
    .await?;
    assert_eq!(relists, 1, "a dropped watch must not cause a re-list");
    assert_eq!(
        fake.requests().iter().filter(|r| !r.watch).count(),
        lists_before
    );

    // History compacted while the watch is down: 410 → re-list, which also drops what was
    // deleted meanwhile (no DELETED event was ever seen for it).
    fake.pause();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while fake.open_watches() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.open_watches(), 0, "watches outlived the outage");
    fake.delete::<Service>("default", "b")?;
    fake.create(&objects::service("d", "198.19.0.4", 80, 8080))?;
    fake.compact();
    tokio::time::sleep(Duration::from_secs(1)).await;
    fake.resume();
    next(&mut events, &mut names, &mut relists, |n| {
        n == &set(&["c", "d"])
    })
    .await?;
    assert_eq!(relists, 2, "410 must lead to exactly one re-list");
    let reqs = fake.requests();
    assert!(
        reqs.iter().any(|r| r.watch && r.status == 200)
            && reqs
                .iter()
                .filter(|r| r.watch)
                .all(|r| r.param("timeoutSeconds").is_some()
                    && r.param("allowWatchBookmarks").as_deref() == Some("true")),
        "watch requests: {:?}",
        reqs.iter()
            .filter(|r| r.watch)
            .map(|r| &r.query)
            .collect::<Vec<_>>()
    );

    // kube-rs needs nothing beyond what the server implements (no discovery calls).
    let unknown: Vec<_> = reqs.iter().filter(|r| r.status == 404).collect();
    assert!(
        unknown.is_empty(),
        "requests the server did not know: {unknown:?}"
    );

    // A hanging server: nothing arrives, then everything does.
    fake.hang();
    fake.create(&objects::service("e", "198.19.0.5", 80, 8080))?;
    let early = tokio::time::timeout(
        Duration::from_millis(700),
        next(&mut events, &mut names, &mut relists, |n| n.contains("e")),
    )
    .await;
    assert!(early.is_err(), "an event arrived while the server hung");
    fake.resume();
    next(&mut events, &mut names, &mut relists, |n| n.contains("e")).await?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// The server listens inside a network namespace: reachable at 127.0.0.1 from inside it
/// (curl run there), not from the test's own namespace.
#[test]
fn fakeapi_listens_in_a_network_namespace() -> Result<()> {
    let topo = tests::netns::Topology::new("fkns", 0)?;
    let fake = FakeApi::start_in_netns(&topo.node)?;
    fake.create(&objects::node("node-a", "198.18.0.1"))?;
    let out = tests::netns::ns_run(
        &topo.node,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!(
                "{}/api/v1/nodes?fieldSelector=metadata.name%3Dnode-a",
                fake.url()
            ),
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("node list JSON")?;
    assert_eq!(v["kind"], "NodeList");
    assert_eq!(v["items"][0]["metadata"]["name"], "node-a");
    // Not in the test's namespace (unless some other process happens to hold the port).
    let outside = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], fake.port())),
        Duration::from_millis(500),
    );
    assert!(
        outside.is_err(),
        "the server must not listen in the root namespace"
    );

    // An outage refuses connections inside the namespace; resume listens again.
    fake.pause();
    let refused = tests::netns::in_ns(&topo.node, "curl")
        .args(["-sS", "--max-time", "3", &format!("{}/version", fake.url())])
        .output()
        .context("curl")?;
    // curl's exit code 7: could not connect (the SYN was answered with a RST).
    assert_eq!(
        refused.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    fake.resume();
    tests::netns::wait_until(Duration::from_secs(5), "the port to listen again", || {
        Ok(tests::netns::in_ns(&topo.node, "curl")
            .args(["-sS", "--max-time", "2", &format!("{}/version", fake.url())])
            .output()?
            .status
            .success())
    })?;
    Ok(())
}

// =======================================================================================
// The agent in Kubernetes mode, real traffic
// =======================================================================================

const NODE: &str = "node-a";
const OTHER_NODE: &str = "node-b";
/// node-b's address: it must never become a NodePort frontend of node-a's agent.
const OTHER_NODE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0xa);
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x10);
const ECHO_PORT: u16 = 7000;
const PEER_PORT: u16 = 7100;
const HTTP_NODE_PORT: u16 = 30080;
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// After an API outage the agent's watchers are in kube-runtime's backoff (0.8 s doubling,
/// with jitter): after the test's ~4 s outage the next retry is at most ~7 s away, and a
/// 410 re-lists at once (measured: ~5.5 s from the API's return to the maps).
const RECONVERGE_TIMEOUT: Duration = Duration::from_secs(15);
/// Bounds every traffic loop (the workplace's rule: loops stop by themselves).
const MAX_LOOP_REQUESTS: usize = 3000;

/// A Service as the API server would hold it after defaulting.
#[derive(Clone, Debug)]
struct SvcDef {
    name: &'static str,
    /// ClusterIP, NodePort or LoadBalancer.
    type_: &'static str,
    cluster_ip: Ipv4Addr,
    lb_ip: Option<Ipv4Addr>,
    /// Dual-stack (RequireDualStack): these IPv6 ClusterIP and LoadBalancer IP too.
    v6: Option<(Ipv6Addr, Option<Ipv6Addr>)>,
    /// (name, port, targetPort, nodePort); TCP.
    ports: Vec<(&'static str, u16, u16, Option<u16>)>,
    etp_local: bool,
    affinity_timeout: Option<i32>,
    source_ranges: Vec<&'static str>,
    health_check_node_port: Option<u16>,
}

impl SvcDef {
    /// `default/<name>`: http 80 -> 8080, echo 7000 -> 7000, peer 7100 -> 7100; NodePorts
    /// (as the API server allocates them) for NodePort and LoadBalancer types.
    fn new(name: &'static str, type_: &'static str, cluster_ip: Ipv4Addr) -> Self {
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

    fn lb(name: &'static str, cluster_ip: Ipv4Addr, lb_ip: Ipv4Addr) -> Self {
        let mut s = Self::new(name, "LoadBalancer", cluster_ip);
        s.lb_ip = Some(lb_ip);
        s
    }

    fn service(&self) -> Result<Service> {
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
    fn port_id(&self, port: &str) -> String {
        format!("default/{}:{port}/TCP", self.name)
    }
}

/// One endpoint (pod `pod`, IPv4) with its conditions and node.
#[derive(Clone, Copy, Debug)]
struct Ep {
    pod: u8,
    node: &'static str,
    ready: bool,
    serving: bool,
    terminating: bool,
}

fn ready(pod: u8) -> Ep {
    Ep {
        pod,
        node: NODE,
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn on(node: &'static str, pod: u8) -> Ep {
    Ep { node, ..ready(pod) }
}

/// Terminating but still serving (graceful shutdown in progress).
fn terminating(pod: u8) -> Ep {
    Ep {
        ready: false,
        serving: true,
        terminating: true,
        ..ready(pod)
    }
}

/// Terminating and no longer serving.
fn gone(pod: u8) -> Ep {
    Ep {
        serving: false,
        ..terminating(pod)
    }
}

/// The EndpointSlice of `svc` holding `eps`, as the EndpointSlice controller writes it.
fn slice(svc: &SvcDef, eps: &[Ep]) -> Result<EndpointSlice> {
    slice_of(svc, eps, false)
}

/// The IPv6 EndpointSlice of `svc` (a dual-stack service has one slice per family).
fn slice6(svc: &SvcDef, eps: &[Ep]) -> Result<EndpointSlice> {
    slice_of(svc, eps, true)
}

fn slice_of(svc: &SvcDef, eps: &[Ep], v6: bool) -> Result<EndpointSlice> {
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

fn node_obj(name: &str, addr: Ipv4Addr, addr6: Option<Ipv6Addr>) -> Result<Node> {
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
struct KubeLab {
    agent: Option<Agent>,
    pin: PinDir,
    fake: FakeApi,
    topo: Topology,
}

impl KubeLab {
    /// Builds `pods` pods (nginx, TCP echo and peer echo in each), node-a and node-b
    /// Node objects, the objects `setup` creates, then starts the agent as node-a.
    fn start(tag: &str, pods: u8, setup: impl FnOnce(&FakeApi) -> Result<()>) -> Result<Self> {
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

    fn pin(&self) -> &Path {
        &self.pin.0
    }

    fn agent_log(&self) -> String {
        self.agent.as_ref().map(Agent::log_text).unwrap_or_default()
    }

    /// What the agent, the maps and the API server saw, for failure messages.
    fn diag(&self) -> String {
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
    fn wait_services(
        &self,
        what: &str,
        check: impl Fn(&serde_json::Value) -> Result<bool>,
    ) -> Result<Instant> {
        self.wait_services_for(APPLY_TIMEOUT, what, check)
    }

    fn wait_services_for(
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
    fn wait_backends(&self, port_id: &str, pods: &[u8]) -> Result<Instant> {
        let want: BTreeSet<String> = pods.iter().map(|n| netns::pod_v4(*n).to_string()).collect();
        self.wait_services(&format!("{port_id} backends {want:?}"), |all| {
            Ok(find_port(all, port_id).is_some_and(|e| backend_addrs(e) == want))
        })
    }

    fn stats(&self) -> Result<serde_json::Value> {
        e2e::lbctl_json(self.pin(), "stats")
    }

    fn reason(&self, reason: &str) -> Result<u64> {
        let s = self.stats()?;
        s["reasons"][reason]
            .as_u64()
            .with_context(|| format!("no reason {reason} in lbctl stats: {s}"))
    }

    /// Stops the agent; it must exit 0 on SIGTERM.
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

fn request_summary(fake: &FakeApi) -> Vec<String> {
    fake.requests()
        .iter()
        .map(|r| format!("{} {}?{} -> {}", r.method, r.path, r.query, r.status))
        .collect()
}

fn find_port<'a>(all: &'a serde_json::Value, port_id: &str) -> Option<&'a serde_json::Value> {
    all.as_array()?
        .iter()
        .find(|s| s["service"].as_str() == Some(port_id))
}

fn backend_addrs(entry: &serde_json::Value) -> BTreeSet<String> {
    entry["backends"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter_map(|b| b["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn frontends(entry: &serde_json::Value) -> BTreeSet<(String, u64)> {
    entry["frontends"]
        .as_array()
        .map(|f| {
            f.iter()
                .filter_map(|f| Some((f["address"].as_str()?.to_string(), f["port"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// `count` HTTP requests with fresh connections; every one must succeed from `vip`.
/// Returns how many each pod answered.
fn spread(ns: &str, vip: IpAddr, port: u16, count: usize) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for i in 0..count {
        let url = format!("http://{}/", std::net::SocketAddr::new(vip, port));
        let r = e2e::http_get(ns, &url)
            .with_context(|| format!("request {i} of {count} to {vip}:{port}"))?;
        ensure!(
            r.remote_ip == vip.to_string(),
            "reply from {}, expected {vip}",
            r.remote_ip
        );
        ensure!(r.body.starts_with("pod-"), "body {:?} names no pod", r.body);
        *seen.entry(r.body).or_insert(0) += 1;
    }
    Ok(seen)
}

fn names(pods: &[u8]) -> BTreeSet<String> {
    pods.iter().map(|n| format!("pod-{n}")).collect()
}

/// One request of a traffic loop.
#[derive(Debug)]
struct Sample {
    started: Instant,
    /// The answering pod, or the failure.
    result: std::result::Result<String, String>,
}

/// HTTP requests in a loop from `ns` (fresh connection each), until stopped.
struct TrafficLoop {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Sample>>,
}

impl TrafficLoop {
    fn start(ns: &str, url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, flag) = (ns.to_string(), Arc::clone(&stop));
        let handle = std::thread::spawn(move || {
            let mut out = Vec::new();
            while !flag.load(Ordering::Relaxed) && out.len() < MAX_LOOP_REQUESTS {
                let started = Instant::now();
                let result = e2e::http_get(&ns, &url)
                    .map(|r| r.body)
                    .map_err(|e| format!("{e:#}"));
                out.push(Sample { started, result });
                std::thread::sleep(Duration::from_millis(20));
            }
            out
        });
        TrafficLoop { stop, handle }
    }

    fn finish(self) -> Result<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the traffic thread panicked"))
    }
}

/// Waits until the traffic loop's thread has seen `pod` answer (polls a shared flag via
/// plain requests of our own, since the loop's samples are only read at the end).
fn wait_for_pod(ns: &str, vip: Ipv4Addr, pod: &str, timeout: Duration) -> Result<()> {
    netns::wait_until(timeout, &format!("{pod} answering on {vip}"), || {
        Ok(e2e::http_get(ns, &format!("http://{vip}/"))?.body == pod)
    })
}

/// A TCP connect that must neither succeed nor be refused: the SYN is dropped.
fn assert_dropped(ns: &str, addr: Ipv4Addr, port: u16) -> Result<()> {
    let (res, took) = e2e::tcp_connect(ns, addr.into(), port)?;
    match res {
        Ok(()) => bail!("connected to {addr}:{port}; expected the SYN to be dropped"),
        Err(e) => ensure!(
            !e.contains("refused") && took >= Duration::from_millis(1900),
            "connect to {addr}:{port} ended after {took:?} with {e:?}; expected a timeout"
        ),
    }
    Ok(())
}

/// One ICMP echo from namespace `ns` to `dst` with `payload` bytes (over 1472 the kernel
/// sends it in fragments); waits 3 s for the matching reply. iputils' ping is not among
/// the packages the tests install, and a raw socket needs nothing else.
fn icmp_echo(ns: &str, dst: Ipv4Addr, payload: usize) -> Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let path = format!("/run/netns/{ns}");
    let netns_file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    let id = (std::process::id() as u16) ^ (payload as u16);
    let handle = std::thread::spawn(move || -> Result<()> {
        // SAFETY: setns(2) on a namespace fd we hold; affects this short-lived thread only.
        if unsafe { libc::setns(netns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        // SAFETY: socket(2) with constant arguments; the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("raw ICMP socket");
        }
        // SAFETY: raw is a fresh, valid fd nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: 3,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a timeval of the right size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        let mut pkt = vec![8u8, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&1u16.to_be_bytes());
        pkt.extend((0..payload).map(|i| i as u8));
        let mut sum: u32 = pkt
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        pkt[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sendto with a buffer and a sockaddr_in of the stated sizes.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error()).context("sending the echo request");
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            // SAFETY: recv into a buffer of the stated size.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error()).context("no echo reply");
            }
            let got = &buf[..n as usize];
            let ihl = usize::from(got.first().copied().unwrap_or(0) & 0x0f) * 4;
            let Some(icmp) = got.get(ihl..) else { continue };
            if icmp.len() == 8 + payload && icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() {
                return Ok(());
            }
        }
        bail!("no echo reply within 3 s")
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("the ping thread panicked"))?
        .with_context(|| format!("ICMP echo {ns} -> {dst}, {payload} bytes"))
}

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
            .map(|s| s.to_string())
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

/// Case 3: sessionAffinity ClientIP: back-to-back connections from one client stick to one
/// pod; once timeoutSeconds (2 s) passes between connections, each is placed afresh.
#[test]
fn kube_session_affinity_client_ip() -> Result<()> {
    let mut web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    web.affinity_timeout = Some(2);
    let w = web.clone();
    let lab = KubeLab::start("kaf", 3, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), ready(2), ready(3)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    for round in 0..3 {
        let seen = spread(&client, LB_IP.into(), 80, 12).with_context(|| lab.diag())?;
        assert_eq!(seen.len(), 1, "round {round}: affinity broken: {seen:?}");
        std::thread::sleep(Duration::from_millis(2600));
    }
    let mut after_timeout = BTreeSet::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(2600));
        let r = e2e::http_get(&client, &format!("http://{LB_IP}/"))?;
        after_timeout.insert(r.body);
    }
    // 8 independent placements over 3 pods all landing on one: (1/3)^7 ≈ 0.05 %.
    assert!(
        after_timeout.len() >= 2,
        "every connection after the timeout went to {after_timeout:?}\n{}",
        lab.diag()
    );
    lab.stop()
}

/// Case 4: externalTrafficPolicy Local: with endpoints only on another node, the LB IP drops
/// (no RST: the client times out) and counts drop_no_local_endpoints, while the ClusterIP
/// (internalTrafficPolicy Cluster) still serves; with a local endpoint the LB IP reaches
/// only it, and the pod sees the client's own address.
#[test]
fn kube_external_traffic_policy_local() -> Result<()> {
    let mut web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    web.etp_local = true;
    web.health_check_node_port = Some(32000);
    let w = web.clone();
    let lab = KubeLab::start("ketp", 3, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[on(OTHER_NODE, 1)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    let before = lab.reason("drop_no_local_endpoints")?;
    assert_dropped(&client, LB_IP, 80).with_context(|| lab.diag())?;
    let after = lab.reason("drop_no_local_endpoints")?;
    assert!(
        after > before,
        "drop_no_local_endpoints {before} -> {after}\n{}",
        lab.diag()
    );
    let pod3 = lab.topo.pod(3)?.ns.clone();
    let seen = spread(&pod3, CLUSTER_IP.into(), 80, 4).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[1]),
        "{seen:?}"
    );

    lab.fake
        .update(&slice(&web, &[on(OTHER_NODE, 1), ready(2)])?)?;
    netns::wait_until(APPLY_TIMEOUT, "the LB IP to serve", || {
        Ok(e2e::tcp_connect(&client, LB_IP.into(), 80)?.0.is_ok())
    })
    .with_context(|| lab.diag())?;
    let seen = spread(&client, LB_IP.into(), 80, 12).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[2]),
        "{seen:?}"
    );
    let mut conn = LineConn::open(&client, LB_IP, PEER_PORT)?;
    let answer = conn.ask("")?;
    assert_eq!(
        answer,
        format!("pod-2 {}", netns::CLIENT_V4),
        "source address not preserved"
    );
    lab.stop()
}

/// Case 5: Terminating endpoints: only ready ones take new connections; with none ready,
/// serving+terminating ones do (and non-serving ones never); a connection established to
/// a pod that becomes terminating keeps working.
#[test]
fn kube_terminating_endpoints() -> Result<()> {
    let web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    let w = web.clone();
    let lab = KubeLab::start("kterm", 3, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), terminating(2), ready(3)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    let seen = spread(&client, LB_IP.into(), 80, 20).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[1, 3]),
        "{seen:?}"
    );

    let mut conn = LineConn::open(&client, LB_IP, ECHO_PORT)?;
    let first = conn.ask("a")?;
    let pinned: u8 = first
        .strip_prefix("pod-")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("answer {first:?}"))?;
    ensure!(pinned == 1 || pinned == 3, "echo answered by pod-{pinned}");
    let other = 4 - pinned;
    // The pinned pod starts terminating (still serving); the other stays ready.
    let mut eps = vec![terminating(2), ready(other), terminating(pinned)];
    lab.fake.update(&slice(&web, &eps)?)?;
    lab.wait_backends(&web.port_id("http"), &[other])?;
    assert_eq!(
        conn.ask("b")?,
        format!("pod-{pinned} b"),
        "established connection moved"
    );
    let seen = spread(&client, LB_IP.into(), 80, 10).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[other]),
        "{seen:?}"
    );

    // None ready: the serving terminating ones (2 and the pinned one) take new
    // connections; the other one, terminating and not serving, none.
    eps = vec![terminating(2), gone(other), terminating(pinned)];
    lab.fake.update(&slice(&web, &eps)?)?;
    lab.wait_backends(&web.port_id("http"), &[2, pinned])?;
    let seen = spread(&client, LB_IP.into(), 80, 20).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[2, pinned]),
        "{seen:?}"
    );
    assert_eq!(
        conn.ask("c")?,
        format!("pod-{pinned} c"),
        "established connection moved"
    );
    lab.stop()
}

/// Case 6: the API in trouble in the middle of traffic, three ways: a dropped watch (the
/// agent resumes from its resourceVersion, no re-list, the change made meanwhile applies);
/// an API server that hangs (last state kept, changes apply once it answers); an outage
/// with connections refused while the history is compacted (last state kept, then
/// 410 → re-list, which removes a service deleted meanwhile). No request fails
/// throughout, and a pod removed during the outage gets no new connection afterwards.
#[test]
fn kube_api_outage_keeps_state_and_converges() -> Result<()> {
    let web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    let mut doomed = SvcDef::new("doomed", "ClusterIP", Ipv4Addr::new(198, 19, 0, 40));
    doomed.ports.truncate(1);
    let (w, d) = (web.clone(), doomed.clone());
    let lab = KubeLab::start("kout", 3, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), ready(2)])?)?;
        f.create(&d.service()?)?;
        f.create(&slice(&d, &[ready(3)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    let (web_http, doomed_http) = (web.port_id("http"), doomed.port_id("http"));
    let lists = |lab: &KubeLab| lab.fake.requests().iter().filter(|r| !r.watch).count();
    let traffic = TrafficLoop::start(&client, format!("http://{LB_IP}/"));
    std::thread::sleep(Duration::from_millis(500));

    // A dropped watch: resumed from the last resourceVersion, without a list.
    let lists_before = lists(&lab);
    lab.fake.drop_watches();
    lab.fake
        .update(&slice(&web, &[ready(1), ready(2), ready(3)])?)?;
    lab.wait_backends(&web_http, &[1, 2, 3])?;
    assert_eq!(
        lists(&lab),
        lists_before,
        "a dropped watch caused a re-list\n{}",
        lab.diag()
    );

    // A hanging API server: nothing changes until it answers again.
    lab.fake.hang();
    lab.fake.update(&slice(&web, &[ready(1), ready(2)])?)?;
    std::thread::sleep(Duration::from_secs(2));
    let all = e2e::lbctl_json(lab.pin(), "services")?;
    let three: BTreeSet<String> = [1, 2, 3]
        .iter()
        .map(|n| netns::pod_v4(*n).to_string())
        .collect();
    ensure!(
        find_port(&all, &web_http).is_some_and(|e| backend_addrs(e) == three),
        "a change went through a hanging API server?\n{}",
        lab.diag()
    );
    lab.fake.resume();
    lab.wait_backends(&web_http, &[1, 2])?;

    // An outage (connections refused) with compaction: 410 on resume, re-list.
    let lists_before = lists(&lab);
    lab.fake.pause();
    std::thread::sleep(Duration::from_secs(1));
    lab.fake.delete::<Service>("default", "doomed")?;
    lab.fake
        .delete::<EndpointSlice>("default", "doomed-abcde")?;
    lab.fake.update(&slice(&web, &[ready(1), ready(3)])?)?;
    lab.fake.compact();
    std::thread::sleep(Duration::from_secs(3));
    // Still the last state: the doomed service is there and serves, web is on pods 1, 2.
    let all = e2e::lbctl_json(lab.pin(), "services")?;
    ensure!(
        find_port(&all, &doomed_http).is_some(),
        "state dropped during the outage: {all}"
    );
    let pod3 = lab.topo.pod(3)?.ns.clone();
    let r = e2e::http_get(&pod3, "http://198.19.0.40/").with_context(|| lab.diag())?;
    assert_eq!(r.body, "pod-3");
    lab.fake.resume();

    let t0 = Instant::now();
    let want: BTreeSet<String> = [1, 3]
        .iter()
        .map(|n| netns::pod_v4(*n).to_string())
        .collect();
    let converged = lab.wait_services_for(
        RECONVERGE_TIMEOUT,
        "the outage's changes: web on pods 1 and 3, doomed gone",
        |all| {
            Ok(
                find_port(all, &web_http).is_some_and(|e| backend_addrs(e) == want)
                    && find_port(all, &doomed_http).is_none(),
            )
        },
    )?;
    eprintln!("after the outage: converged in {:?}", converged - t0);
    wait_for_pod(&client, LB_IP, "pod-3", APPLY_TIMEOUT).with_context(|| lab.diag())?;
    std::thread::sleep(Duration::from_millis(1500));
    let samples = traffic.finish()?;
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.result.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}\n{}",
        failed.len(),
        samples.len(),
        lab.diag()
    );
    let late: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.started > converged && s.result.as_deref() == Ok("pod-2"))
        .collect();
    assert!(
        late.is_empty(),
        "pod-2 answered after it was removed: {late:?}"
    );
    assert!(
        lists(&lab) > lists_before,
        "no re-list after 410\n{}",
        lab.diag()
    );
    lab.stop()
}

/// Case 7: loadBalancerSourceRanges: a client inside the ranges is served; outside, its
/// packets to the LB IP are dropped (timeout, not refusal) and counted, while the
/// ClusterIP is not restricted.
#[test]
fn kube_load_balancer_source_ranges() -> Result<()> {
    let mut web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    web.source_ranges = vec!["198.18.0.0/30"];
    let w = web.clone();
    let lab = KubeLab::start("ksr", 2, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), ready(2)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    spread(&client, LB_IP.into(), 80, 6).with_context(|| lab.diag())?;

    web.source_ranges = vec!["198.18.5.0/24", "2001:db8:5::/48"];
    lab.fake.update(&web.service()?)?;
    netns::wait_until(APPLY_TIMEOUT, "the client to be cut off", || {
        Ok(e2e::tcp_connect(&client, LB_IP.into(), 80)?.0.is_err())
    })
    .with_context(|| lab.diag())?;
    let before = lab.reason("drop_source_range")?;
    assert_dropped(&client, LB_IP, 80).with_context(|| lab.diag())?;
    let after = lab.reason("drop_source_range")?;
    assert!(
        after > before,
        "drop_source_range {before} -> {after}\n{}",
        lab.diag()
    );
    let pod1 = lab.topo.pod(1)?.ns.clone();
    spread(&pod1, CLUSTER_IP.into(), 80, 4).with_context(|| lab.diag())?;
    lab.stop()
}

/// `curl` from `ns`: the HTTP status and the body.
fn curl_status(ns: &str, url: &str) -> Result<(u16, String)> {
    let out = netns::in_ns(ns, "curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", url])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("curl {url} in {ns}"))?;
    ensure!(
        out.status.success(),
        "curl {url} from {ns} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text
        .rsplit_once('\n')
        .context("curl output without a status")?;
    Ok((
        code.trim().parse().context("HTTP status")?,
        body.to_string(),
    ))
}

/// Case 8: healthCheckNodePort (LoadBalancer + eTP Local) answers on the node address like
/// kube-proxy: 200 with the local endpoint count while node-a has an endpoint, 503 once
/// it has none; /metrics, /healthz and /readyz on the metrics address, with the sync,
/// latency, per-service and per-reason families an operator graphs.
#[test]
fn kube_health_check_node_port_and_metrics() -> Result<()> {
    const HC_PORT: u16 = 32100;
    let mut web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    web.etp_local = true;
    web.health_check_node_port = Some(HC_PORT);
    let w = web.clone();
    let lab = KubeLab::start("khc", 2, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), on(OTHER_NODE, 2)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    let hc_url = format!("http://{NODE_V4}:{HC_PORT}/healthz");
    let (code, body) = curl_status(&client, &hc_url).with_context(|| lab.diag())?;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("health check body {body:?}"))?;
    assert_eq!(v["service"]["namespace"], "default", "{body}");
    assert_eq!(v["service"]["name"], "web", "{body}");
    assert_eq!(v["localEndpoints"], 1, "{body}");
    assert_eq!(v["serviceProxyHealthy"], true, "{body}");
    spread(&client, LB_IP.into(), 80, 5).with_context(|| lab.diag())?;

    // node-a loses its endpoint: load balancers must take it out of rotation.
    lab.fake.update(&slice(&web, &[on(OTHER_NODE, 2)])?)?;
    netns::wait_until(APPLY_TIMEOUT, "the health check to fail", || {
        Ok(curl_status(&client, &hc_url)?.0 == 503)
    })
    .with_context(|| lab.diag())?;
    let (_, body) = curl_status(&client, &hc_url)?;
    let v: serde_json::Value = serde_json::from_str(&body).context("503 body")?;
    assert_eq!(v["localEndpoints"], 0, "{body}");
    assert_dropped(&client, LB_IP, 80).with_context(|| lab.diag())?;

    let node = lab.topo.node.clone();
    for path in ["healthz", "readyz"] {
        let (code, body) = curl_status(&node, &format!("http://127.0.0.1:10249/{path}"))?;
        assert_eq!(code, 200, "/{path}: {body}");
    }
    let (code, metrics) = curl_status(&node, "http://127.0.0.1:10249/metrics")?;
    assert_eq!(code, 200, "{metrics}");
    let samples: Vec<(&str, &str)> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .collect();
    let has = |name: &str| {
        samples
            .iter()
            .any(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
    };
    for family in [
        "xdplb_ready",
        "xdplb_syncs_total",
        "xdplb_event_to_maps_seconds_bucket",
        "xdplb_service_packets_total",
        "xdplb_drops_total",
        "xdplb_map_entries",
    ] {
        assert!(has(family), "no {family} in /metrics:\n{metrics}");
    }
    let value = |prefix: &str| -> Option<f64> {
        samples
            .iter()
            .find(|(k, _)| k.starts_with(prefix))
            .and_then(|(_, v)| v.parse().ok())
    };
    assert_eq!(value("xdplb_ready"), Some(1.0), "{metrics}");
    let drops = value("xdplb_drops_total{reason=\"drop_no_local_endpoints\"}");
    assert!(
        drops.is_some_and(|d| d >= 1.0),
        "drop_no_local_endpoints not in /metrics ({drops:?}):\n{metrics}"
    );
    let web_packets = samples
        .iter()
        .find(|(k, _)| {
            k.starts_with("xdplb_service_packets_total{") && k.contains("default/web:http/TCP")
        })
        .and_then(|(_, v)| v.parse::<f64>().ok());
    assert!(
        web_packets.is_some_and(|p| p >= 5.0),
        "web's packets ({web_packets:?}):\n{metrics}"
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

/// Case 10: ClientIP affinity does not hold a client on a pod that starts terminating: its
/// next connections go to one ready pod and stay there, also once the first pod is back.
#[test]
fn kube_session_affinity_leaves_terminating_pod() -> Result<()> {
    let mut web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    web.affinity_timeout = Some(600);
    let w = web.clone();
    let lab = KubeLab::start("kafm", 3, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), ready(2), ready(3)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    let one_pod = |what: &str| -> Result<u8> {
        let seen = spread(&client, LB_IP.into(), 80, 8).with_context(|| lab.diag())?;
        ensure!(seen.len() == 1, "{what}: affinity broken: {seen:?}");
        let name = seen.keys().next().context("no answer")?;
        name.strip_prefix("pod-")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("answer {name:?}"))
    };
    let first = one_pod("start")?;
    let mut eps: Vec<Ep> = (1..=3)
        .map(|n| if n == first { terminating(n) } else { ready(n) })
        .collect();
    lab.fake.update(&slice(&web, &eps)?)?;
    let others: Vec<u8> = (1..=3).filter(|n| *n != first).collect();
    lab.wait_backends(&web.port_id("http"), &others)?;
    let second = one_pod(&format!("after pod-{first} started terminating"))?;
    assert_ne!(
        second, first,
        "affinity kept the client on a terminating pod"
    );
    eps = (1..=3).map(ready).collect();
    lab.fake.update(&slice(&web, &eps)?)?;
    lab.wait_backends(&web.port_id("http"), &[1, 2, 3])?;
    assert_eq!(
        one_pod("pod back")?,
        second,
        "affinity lost when a pod came back"
    );
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

/// Case 12: start-up against the API. Unreachable (connections refused) for longer than
/// `--initial-sync-timeout`: the agent exits 1 with a one-line reason instead of running
/// with no services. Hanging: /healthz answers, /readyz says 503 and no ready line is
/// printed until the first full list; once the API answers, the agent becomes ready and
/// serves traffic.
#[test]
fn kube_agent_start_up_waits_for_the_first_sync() -> Result<()> {
    e2e::bin_dir()?;
    let mut topo = Topology::new("kstart", 1)?;
    topo.start_nginx(1)?;
    let fake = FakeApi::start_in_netns(&topo.node)?;
    fake.create(&node_obj(NODE, NODE_V4, Some(NODE_V6))?)?;
    let web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    fake.create(&web.service()?)?;
    fake.create(&slice(&web, &[ready(1)])?)?;
    let kubeconfig = topo.dir.join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig)?;
    let pin = PinDir::new(&topo)?;

    fake.pause();
    let started = Instant::now();
    let agent_bin = e2e::bin_dir()?.join("lb-agent");
    let out = netns::in_ns_with_host_bpffs(&topo.node, &agent_bin.to_string_lossy())
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--node-name", NODE, "--edge-iface", &topo.edge_iface])
        .args([
            "--pod-iface",
            &topo.pod_iface_glob(),
            "--initial-sync-timeout",
            "3s",
        ])
        .arg("--pin-dir")
        .arg(&pin.0)
        .stdin(Stdio::null())
        .output()
        .context("running lb-agent")?;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(took < Duration::from_secs(20), "gave up after {took:?}");
    assert!(
        !stdout.contains(e2e::READY_LINE),
        "ready without the API: {stdout}"
    );
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("lb-agent:") && last.contains("did not complete the initial list"),
        "the last line does not say why: {stderr}"
    );
    fake.resume();

    fake.hang();
    let node = topo.node.clone();
    let agent = std::thread::scope(|scope| -> Result<Agent> {
        let starter = scope.spawn(|| Agent::start_kube(&topo, &kubeconfig, NODE, &pin.0, &[]));
        netns::wait_until(Duration::from_secs(20), "/healthz while listing", || {
            Ok(curl_status(&node, "http://127.0.0.1:10249/healthz")?.0 == 200)
        })?;
        let (code, body) = curl_status(&node, "http://127.0.0.1:10249/readyz")?;
        assert_eq!(code, 503, "/readyz before the first sync: {body}");
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            !starter.is_finished(),
            "ready (or gone) while the API hangs"
        );
        fake.resume();
        starter
            .join()
            .map_err(|_| anyhow::anyhow!("the starter thread panicked"))?
    })?;
    let (code, body) = curl_status(&node, "http://127.0.0.1:10249/readyz")?;
    assert_eq!(code, 200, "/readyz after the ready line: {body}");
    let seen = spread(&topo.client, LB_IP.into(), 80, 3)?;
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), names(&[1]));
    let status = agent.stop()?;
    assert!(status.success(), "lb-agent exited with {status}");
    Ok(())
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

/// Case 14: the agent restarted in Kubernetes mode adopts its pinned maps: an
/// established connection keeps its pod across the restart, and the restarted agent's
/// first list changes nothing that was already right.
#[test]
fn kube_agent_restart_keeps_established_connections() -> Result<()> {
    let web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    let w = web.clone();
    let mut lab = KubeLab::start("krst", 3, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), ready(2), ready(3)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    let mut conn = LineConn::open(&client, LB_IP, ECHO_PORT)?;
    let first = conn.ask("before")?;
    let pod = first
        .split_once(' ')
        .map(|(p, _)| p.to_string())
        .with_context(|| format!("answer {first:?}"))?;
    let before = e2e::lbctl_json(lab.pin(), "services")?;
    let agent = lab.agent.take().context("no agent")?;
    let status = agent.stop()?;
    assert!(status.success(), "lb-agent exited with {status}");
    let kubeconfig = lab.topo.dir.join("kubeconfig");
    lab.agent = Some(Agent::start_kube(
        &lab.topo,
        &kubeconfig,
        NODE,
        &lab.pin.0,
        &[],
    )?);
    assert_eq!(conn.ask("after")?, format!("{pod} after"), "{}", lab.diag());
    let after = e2e::lbctl_json(lab.pin(), "services")?;
    let ids = |v: &serde_json::Value| -> Result<Vec<(String, u64, BTreeSet<String>)>> {
        v.as_array()
            .context("lbctl services is not an array")?
            .iter()
            .map(|s| {
                Ok((
                    s["service"]
                        .as_str()
                        .context("no service name")?
                        .to_string(),
                    s["svc_id"].as_u64().context("no svc_id")?,
                    backend_addrs(s),
                ))
            })
            .collect()
    };
    assert_eq!(
        ids(&before)?,
        ids(&after)?,
        "the restart reshuffled service ports"
    );
    spread(&client, LB_IP.into(), 80, 6).with_context(|| lab.diag())?;
    lab.stop()
}
