//! The fake API server's lists, checked with the real kube-rs client: typed objects with
//! resourceVersions, pages, selectors, single objects, 404s; and listening inside a
//! network namespace.

use crate::client::{client_for, scratch};
use crate::objects;
use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use std::collections::BTreeSet;
use std::time::Duration;
use tests::fakeapi::FakeApi;

/// A fake server holding services svc-0..svc-6, an EndpointSlice of svc-1 and Nodes node-a
/// and node-b, a kube client for it, and the scratch directory its kubeconfig is in.
async fn populated(tag: &str) -> Result<(FakeApi, std::path::PathBuf, kube::Client)> {
    let fake = FakeApi::start()?;
    let dir = scratch(tag)?;
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
    Ok((fake, dir, client))
}

/// Lists come back as typed objects with resourceVersions, uids and creation timestamps,
/// the list's resourceVersion the server's current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fakeapi_lists_typed_objects_with_resource_versions() -> Result<()> {
    let (fake, dir, client) = populated("fakeapi-list").await?;
    let svcs: Api<Service> = Api::all(client);
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
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// Pages follow `limit`: 3 + 3 + 1, one consistent snapshot even if objects change in
/// between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fakeapi_pages_follow_limit_over_one_snapshot() -> Result<()> {
    let (fake, dir, client) = populated("fakeapi-pages").await?;
    let svcs: Api<Service> = Api::all(client);
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
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// Field and label selectors filter, namespaces separate, and single objects come by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fakeapi_selectors_filter_and_objects_come_by_name() -> Result<()> {
    let (_fake, dir, client) = populated("fakeapi-selectors").await?;
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
    let other_ns: Api<EndpointSlice> = Api::namespaced(client, "kube-system");
    assert!(other_ns
        .list(&ListParams::default())
        .await?
        .items
        .is_empty());
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// A missing object and an unknown path are 404, and the server logs the unknown path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fakeapi_missing_objects_and_unknown_paths_are_404() -> Result<()> {
    let (fake, dir, client) = populated("fakeapi-404").await?;
    let svcs: Api<Service> = Api::all(client.clone());
    let err = svcs.get("nope").await.expect_err("a missing service");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err:?}"
    );
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(client);
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
