//! The Kubernetes source (`lb_userspace::sources::kube::KubeSource`) in-process against
//! the fake API server (`tests::fakeapi`), which speaks the real list/watch protocol:
//! initial list, watch events of every kind, 410 Gone and re-list, dropped watches, API
//! outages, bookmarks, and the latency from an API write to the update on the channel.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_userspace::model::{DesiredState, FrontendKind, NodeSettings, Protocol, ServicePortId};
use lb_userspace::sources::kube::KubeSource;
use lb_userspace::sources::Update;
use tests::fakeapi::FakeApi;
use tokio::sync::watch;

const NODE: &str = "node-a";

fn service(name: &str, cluster_ip: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                            "targetPort": 8080}]}
    }))
    .expect("test Service decodes")
}

fn node_port_service(name: &str, cluster_ip: &str, node_port: i32) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ipFamilies": ["IPv4"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                            "targetPort": 8080, "nodePort": node_port}]}
    }))
    .expect("test Service decodes")
}

fn slice(service: &str, addrs: &[&str]) -> EndpointSlice {
    let endpoints: Vec<_> = addrs
        .iter()
        .map(|a| {
            serde_json::json!({"addresses": [a], "conditions": {"ready": true},
                               "nodeName": NODE})
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{service}-abcde"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }))
    .expect("test EndpointSlice decodes")
}

fn node(name: &str, internal_ip: &str) -> Node {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": internal_ip},
                                 {"type": "Hostname", "address": name}]}
    }))
    .expect("test Node decodes")
}

fn id(name: &str) -> ServicePortId {
    ServicePortId::new("default", name, "http", Protocol::Tcp)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// The endpoint addresses of service `name`, `None` if the service is absent.
fn endpoints(state: &DesiredState, name: &str) -> Option<Vec<IpAddr>> {
    state
        .services
        .get(&id(name))
        .map(|s| s.endpoints.iter().map(|e| e.addr).collect())
}

fn node_port_addrs(state: &DesiredState, name: &str) -> Vec<IpAddr> {
    state
        .services
        .get(&id(name))
        .map(|s| {
            s.frontends
                .iter()
                .filter(|f| f.kind == FrontendKind::NodePort)
                .map(|f| f.addr)
                .collect()
        })
        .unwrap_or_default()
}

struct Running {
    rx: watch::Receiver<Update>,
    task: tokio::task::JoinHandle<()>,
    first: Update,
    _dir: TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts a `KubeSource` for `NODE` against `api` the way lb-agent does: from a
/// kubeconfig, initial sync, then `run` feeding a watch channel.
async fn start(api: &FakeApi, tag: &str) -> Result<Running> {
    let dir = std::env::temp_dir().join(format!("xdplb-kube-source-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = TempDir(dir);
    let kubeconfig = dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let client = lb_userspace::sources::kube::client(Some(&kubeconfig)).await?;
    let mut source = KubeSource::new(
        client,
        NodeSettings {
            name: Some(NODE.into()),
            extra_addresses: vec![ip("198.18.0.200")],
        },
    );
    let first = source.initial_sync(Duration::from_secs(20)).await?;
    let (tx, mut rx) = watch::channel(first.clone());
    rx.mark_unchanged();
    let task = tokio::spawn(async move {
        if let Err(e) = source.run(tx).await {
            eprintln!("kube source ended: {e}");
        }
    });
    Ok(Running {
        rx,
        task,
        first,
        _dir: dir,
    })
}

/// Waits for an update whose state satisfies `pred` (the current one included).
async fn wait_for(
    rx: &mut watch::Receiver<Update>,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&DesiredState) -> bool,
) -> Result<Update> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        {
            let cur = rx.borrow_and_update();
            if pred(&cur.state) {
                return Ok(cur.clone());
            }
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => bail!("the source stopped while waiting for {what}"),
            Err(_) => bail!(
                "no update with {what} within {timeout:?}; last state: {:?}",
                rx.borrow().state
            ),
        }
    }
}

/// Asserts no update arrives for `d`.
async fn assert_quiet(rx: &mut watch::Receiver<Update>, d: Duration, why: &str) {
    if let Ok(changed) = tokio::time::timeout(d, rx.changed()).await {
        assert!(
            changed.is_err(),
            "{why}: unexpected update {:?}",
            rx.borrow().state
        );
    }
}

/// `pause` closes the connections asynchronously: changes made before the watches are
/// gone could still be delivered.
async fn wait_watches_closed(api: &FakeApi) -> Result<()> {
    let deadline = Instant::now() + T;
    while api.open_watches() > 0 {
        if Instant::now() > deadline {
            bail!("{} watches still open after pause()", api.open_watches());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn list_requests(api: &FakeApi, path_end: &str) -> usize {
    api.requests()
        .iter()
        .filter(|r| !r.watch && r.path.ends_with(path_end))
        .count()
}

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_then_events_of_every_kind() -> Result<()> {
    let api = FakeApi::start()?;
    api.create(&service("a", "198.18.100.1"))?;
    api.create(&slice("a", &["198.18.1.1"]))?;
    api.create(&node_port_service("np", "198.18.100.9", 30080))?;
    api.create(&slice("np", &["198.18.1.9"]))?;
    api.create(&node(NODE, "198.18.0.1"))?;
    // Another node's addresses are none of this node's business.
    api.create(&node("node-b", "198.18.0.2"))?;
    let mut run = start(&api, "events").await?;

    let first = &run.first.state;
    assert!(run.first.resync, "the first update follows the lists");
    assert_eq!(endpoints(first, "a"), Some(vec![ip("198.18.1.1")]));
    assert_eq!(
        node_port_addrs(first, "np"),
        vec![ip("198.18.0.1"), ip("198.18.0.200")],
        "NodePorts on this node's InternalIP and --nodeport-address"
    );
    // Only this node was asked for.
    assert!(api.requests().iter().any(|r| r.path.ends_with("/nodes")
        && r.param("fieldSelector").as_deref() == Some("metadata.name=node-a")));

    // Service: add, modify, delete.
    api.create(&service("b", "198.18.100.2"))?;
    let u = wait_for(&mut run.rx, T, "service b", |s| {
        s.services.contains_key(&id("b"))
    })
    .await?;
    assert!(!u.resync, "a watch event is not a resync");
    api.update(&service("b", "198.18.100.3"))?;
    wait_for(&mut run.rx, T, "b on its new ClusterIP", |s| {
        s.services
            .get(&id("b"))
            .is_some_and(|p| p.frontends.iter().any(|f| f.addr == ip("198.18.100.3")))
    })
    .await?;
    api.delete::<Service>("default", "b")?;
    wait_for(&mut run.rx, T, "b gone", |s| {
        !s.services.contains_key(&id("b"))
    })
    .await?;

    // EndpointSlice: add endpoints, delete the slice.
    api.update(&slice("a", &["198.18.1.1", "198.18.1.2"]))?;
    wait_for(&mut run.rx, T, "a with two endpoints", |s| {
        endpoints(s, "a") == Some(vec![ip("198.18.1.1"), ip("198.18.1.2")])
    })
    .await?;
    api.delete::<EndpointSlice>("default", "a-abcde")?;
    wait_for(&mut run.rx, T, "a without endpoints", |s| {
        endpoints(s, "a") == Some(vec![])
    })
    .await?;
    api.create(&slice("a", &["198.18.1.3"]))?;
    wait_for(&mut run.rx, T, "a's slice back", |s| {
        endpoints(s, "a") == Some(vec![ip("198.18.1.3")])
    })
    .await?;

    // Node: a new address moves the NodePorts; deleting it leaves the extra address.
    api.update(&node(NODE, "198.18.0.5"))?;
    wait_for(&mut run.rx, T, "NodePort on the new node address", |s| {
        node_port_addrs(s, "np") == vec![ip("198.18.0.5"), ip("198.18.0.200")]
    })
    .await?;
    api.update(&node("node-b", "198.18.0.6"))?;
    assert_quiet(
        &mut run.rx,
        Duration::from_millis(500),
        "another node changed",
    )
    .await;
    api.delete::<Node>("", NODE)?;
    wait_for(&mut run.rx, T, "NodePort on the extra address only", |s| {
        node_port_addrs(s, "np") == vec![ip("198.18.0.200")]
    })
    .await?;

    // An invalid version keeps the previous one.
    let mut bad = service("a", "198.18.100.1");
    if let Some(spec) = bad.spec.as_mut() {
        spec.cluster_ip = Some("198.18.100.300".into());
        spec.cluster_ips = Some(vec!["198.18.100.300".into()]);
    }
    let before = run.rx.borrow().state.clone();
    api.update(&bad)?;
    assert_quiet(&mut run.rx, Duration::from_millis(500), "an invalid update").await;
    assert_eq!(run.rx.borrow().state, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_410_relists_and_removes_stale_objects() -> Result<()> {
    let api = FakeApi::start()?;
    api.create(&service("a", "198.18.100.1"))?;
    api.create(&service("b", "198.18.100.2"))?;
    api.create(&slice("b", &["198.18.1.2"]))?;
    api.create(&node(NODE, "198.18.0.1"))?;
    let mut run = start(&api, "gone").await?;
    api.wait_for_watches(3, T)?;
    let lists_before = list_requests(&api, "/services");

    // While the connection is down, b is deleted and the history is compacted: the
    // watcher's resume gets 410 Gone; only a re-list can tell that b is gone.
    api.pause();
    wait_watches_closed(&api).await?;
    api.delete::<Service>("default", "b")?;
    api.delete::<EndpointSlice>("default", "b-abcde")?;
    api.create(&service("c", "198.18.100.3"))?;
    api.compact();
    api.resume();

    let u = wait_for(
        &mut run.rx,
        Duration::from_secs(30),
        "b gone and c there",
        |s| !s.services.contains_key(&id("b")) && s.services.contains_key(&id("c")),
    )
    .await?;
    assert!(u.resync, "the update after a re-list is a resync");
    assert!(u.state.services.contains_key(&id("a")));
    assert!(
        list_requests(&api, "/services") > lists_before,
        "the services were listed again"
    );
    let gone: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.watch && r.path.ends_with("/services"))
        .collect();
    assert!(!gone.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_resumes_without_relist() -> Result<()> {
    let api = FakeApi::start()?;
    api.create(&service("a", "198.18.100.1"))?;
    api.create(&node(NODE, "198.18.0.1"))?;
    let mut run = start(&api, "drop").await?;
    api.wait_for_watches(3, T)?;
    let lists_before = list_requests(&api, "/services");

    api.drop_watches();
    api.create(&service("b", "198.18.100.2"))?;
    let u = wait_for(
        &mut run.rx,
        Duration::from_secs(30),
        "b after the watch broke",
        |s| s.services.contains_key(&id("b")),
    )
    .await?;
    assert!(u.state.services.contains_key(&id("a")));
    assert_eq!(
        list_requests(&api, "/services"),
        lists_before,
        "a broken watch resumes from its resourceVersion, no re-list"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_outage_keeps_the_last_state_then_converges() -> Result<()> {
    let api = FakeApi::start()?;
    api.create(&service("a", "198.18.100.1"))?;
    api.create(&slice("a", &["198.18.1.1"]))?;
    api.create(&node(NODE, "198.18.0.1"))?;
    let mut run = start(&api, "outage").await?;
    api.wait_for_watches(3, T)?;
    let before = run.rx.borrow().state.clone();

    api.pause();
    wait_watches_closed(&api).await?;
    api.update(&slice("a", &["198.18.1.1", "198.18.1.2"]))?;
    api.create(&service("d", "198.18.100.4"))?;
    // Down for a few seconds: the source retries, sends nothing, the state stays.
    assert_quiet(&mut run.rx, Duration::from_secs(4), "API down").await;
    assert_eq!(run.rx.borrow().state, before);
    assert!(!run.task.is_finished(), "the source keeps retrying");
    api.resume();
    let t0 = Instant::now();
    wait_for(
        &mut run.rx,
        Duration::from_secs(40),
        "the outage's changes",
        |s| {
            s.services.contains_key(&id("d"))
                && endpoints(s, "a") == Some(vec![ip("198.18.1.1"), ip("198.18.1.2")])
        },
    )
    .await?;
    eprintln!("converged {:?} after the API came back", t0.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_api_keeps_the_last_state_then_converges() -> Result<()> {
    let api = FakeApi::start()?;
    api.create(&service("a", "198.18.100.1"))?;
    let mut run = start(&api, "hang").await?;
    api.wait_for_watches(3, T)?;
    let before = run.rx.borrow().state.clone();
    // Accepted connections, no answers, silent watches: nothing can be learnt.
    api.hang();
    api.create(&service("h", "198.18.100.8"))?;
    api.delete::<Service>("default", "a")?;
    assert_quiet(&mut run.rx, Duration::from_secs(2), "API hanging").await;
    assert_eq!(run.rx.borrow().state, before);
    api.resume();
    wait_for(
        &mut run.rx,
        Duration::from_secs(30),
        "h added and a deleted",
        |s| s.services.contains_key(&id("h")) && !s.services.contains_key(&id("a")),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_times_out_with_a_clear_error() -> Result<()> {
    let api = FakeApi::start()?;
    api.pause();
    let dir =
        std::env::temp_dir().join(format!("xdplb-kube-source-timeout-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dir = TempDir(dir);
    let kubeconfig = dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let client = lb_userspace::sources::kube::client(Some(&kubeconfig)).await?;
    let mut source = KubeSource::new(client, NodeSettings::default());
    let err = source
        .initial_sync(Duration::from_secs(2))
        .await
        .expect_err("the API server refuses connections");
    let msg = err.to_string();
    assert!(
        msg.contains("did not complete the initial list of Services, EndpointSlices, Nodes"),
        "{msg}"
    );
    assert!(msg.contains("last error"), "{msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_are_accepted() -> Result<()> {
    let api = FakeApi::start()?;
    api.set_bookmark_interval(Duration::from_millis(100));
    api.create(&service("a", "198.18.100.1"))?;
    let mut run = start(&api, "bookmarks").await?;
    api.wait_for_watches(3, T)?;
    let lists_before = list_requests(&api, "/services");
    // Bookmarks move the watcher's resourceVersion and change no state.
    assert_quiet(&mut run.rx, Duration::from_secs(1), "bookmarks only").await;
    assert!(api
        .requests()
        .iter()
        .any(|r| r.watch && r.param("allowWatchBookmarks").as_deref() == Some("true")));
    // A resume after bookmarks starts from the bookmark's version, still no re-list.
    api.drop_watches();
    api.create(&service("b", "198.18.100.2"))?;
    wait_for(&mut run.rx, Duration::from_secs(30), "b", |s| {
        s.services.contains_key(&id("b"))
    })
    .await?;
    assert_eq!(list_requests(&api, "/services"), lists_before);
    Ok(())
}

/// API write → update on the channel, one event at a time; and `Update::since` →
/// received (the source's own share). Prints the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_to_update_latency() -> Result<()> {
    let api = FakeApi::start()?;
    api.create(&node(NODE, "198.18.0.1"))?;
    let mut run = start(&api, "latency").await?;
    api.wait_for_watches(3, T)?;
    let mut total = Vec::new();
    let mut own = Vec::new();
    for i in 0..100u32 {
        let name = format!("s{i}");
        let t0 = Instant::now();
        api.create(&service(
            &name,
            &format!("198.18.{}.{}", 100 + i / 250, 1 + i % 250),
        ))?;
        let u = wait_for(&mut run.rx, T, &name, |s| {
            s.services.contains_key(&id(&name))
        })
        .await?;
        let now = Instant::now();
        total.push(now - t0);
        own.push(now - u.since);
    }
    let slowest = total
        .iter()
        .enumerate()
        .max_by_key(|(_, d)| **d)
        .map(|(i, d)| format!("event #{i}: {d:?}"));
    eprintln!("slowest: {slowest:?}");
    total.sort();
    own.sort();
    let pct = |v: &[Duration], p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
    eprintln!(
        "API write -> update: p50 {:?} p99 {:?} max {:?}; since -> received: p50 {:?} p99 {:?}",
        pct(&total, 50),
        pct(&total, 99),
        total[total.len() - 1],
        pct(&own, 50),
        pct(&own, 99)
    );
    // Milliseconds, not the hundreds a poll or a coarse coalescing timer would add.
    assert!(pct(&total, 50) < Duration::from_millis(20), "{total:?}");
    Ok(())
}

/// lb-agent in Kubernetes mode fails with one clear line and exit status 1, before
/// loading or pinning anything, when the kubeconfig cannot be read or the API server
/// does not answer the first list in time. It runs in a network namespace of its own
/// (`unshare --net`): nothing it could attach to is shared with anyone, and the fake API
/// server listening in the test's namespace is unreachable from there.
#[test]
fn agent_fails_clearly_without_the_api() -> Result<()> {
    let agent = tests::e2e::bin_dir()?.join("lb-agent");
    let api = FakeApi::start()?;
    let dir = std::env::temp_dir().join(format!("xdplb-kube-agent-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dir = TempDir(dir);
    let kubeconfig = dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let pin_dir = dir.0.join("pins");
    let run = |kubeconfig: &std::path::Path| -> Result<(i32, String, Duration)> {
        let t0 = Instant::now();
        let out = std::process::Command::new("unshare")
            .arg("--net")
            .arg(&agent)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--edge-iface", "lo", "--node-name", NODE])
            .args(["--initial-sync-timeout", "2s"])
            .arg("--pin-dir")
            .arg(&pin_dir)
            .output()
            .context("running lb-agent under unshare --net")?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let last = stderr.lines().last().unwrap_or_default().to_string();
        Ok((out.status.code().unwrap_or(-1), last, t0.elapsed()))
    };

    let missing = dir.0.join("no-such-kubeconfig");
    let (code, line, _) = run(&missing)?;
    assert_eq!(code, 1, "{line}");
    assert!(
        line.starts_with(&format!(
            "lb-agent: connecting to the Kubernetes API: reading kubeconfig {}: ",
            missing.display()
        )),
        "{line}"
    );

    let (code, line, took) = run(&kubeconfig)?;
    assert_eq!(code, 1, "{line}");
    assert!(
        line.starts_with(
            "lb-agent: reading services from the Kubernetes API: the API server did not \
             complete the initial list of Services, EndpointSlices, Nodes within 2s (last \
             error: "
        ),
        "{line}"
    );
    assert!(took < Duration::from_secs(10), "gave up after {took:?}");
    assert!(!pin_dir.exists(), "nothing loaded or pinned");
    Ok(())
}
