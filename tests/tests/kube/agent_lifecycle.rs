//! The agent's life against the API: start-up waits for the first sync, an API outage
//! keeps the state and converges afterwards, a restart keeps established connections.

use crate::lab::{
    backend_addrs, find_port, node_obj, ready, slice, KubeLab, SvcDef, APPLY_TIMEOUT, CLUSTER_IP,
    ECHO_PORT, LB_IP, NODE, RECONVERGE_TIMEOUT,
};
use crate::traffic::{curl_status, names, spread, wait_for_pod, Sample, TrafficLoop};
use anyhow::{ensure, Context as _, Result};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tests::e2e::{self, Agent, LineConn, PinDir};
use tests::fakeapi::FakeApi;
use tests::netns::{self, Topology, NODE_V4, NODE_V6};

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
