//! A directory of manifests and the shipped examples load to the documented state.

use super::*;
use crate::model::{Frontend, FrontendKind};

#[test]
fn directory_with_service_and_slice_gives_the_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir.path().join("a.yaml"),
        &format!(
            "{}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: a}}\n---\n",
            manifest("a", "198.18.100.1", "80", &["198.18.1.2", "198.18.1.1"])
        ),
    );
    let json = r#"{"apiVersion":"v1","kind":"List","items":[
        {"apiVersion":"v1","kind":"Service","metadata":{"name":"b","namespace":"t"},
         "spec":{"clusterIP":"198.18.100.2","ports":[{"port":53,"protocol":"UDP"}]}}]}"#;
    write(&dir.path().join("b.json"), json);
    let single = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"c","namespace":"t"},
         "spec":{"clusterIP":"2001:db8::c","ports":[{"port":443}]}}"#;
    write(&dir.path().join("c.JSON"), single);
    std::fs::create_dir(dir.path().join("sub.yaml")).expect("mkdir");
    // Not a manifest name: must not be read (it is not even YAML).
    write(&dir.path().join("notes.txt"), "{{{{ not yaml");
    write(&dir.path().join(".hidden.yaml"), "{{{{ not yaml");

    let mut src = FileSource::new(dir.path());
    let state = src.load().expect("load");
    assert!(src.errors().is_empty(), "{:?}", src.errors());
    assert_eq!(state.services.len(), 3);
    assert_eq!(
        vips(&state, &id("t", "c", "", Protocol::Tcp)),
        vec!["2001:db8::c:443"]
    );
    let a = id("t", "a", "http", Protocol::Tcp);
    let st = &state.services[&a];
    assert_eq!(
        st.frontends,
        vec![Frontend {
            addr: "198.18.100.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            kind: FrontendKind::ClusterIp,
        }]
    );
    assert_eq!(
        st.endpoints,
        vec![
            Endpoint {
                addr: "198.18.1.1".parse().unwrap(),
                port: 8080,
                target: None
            },
            Endpoint {
                addr: "198.18.1.2".parse().unwrap(),
                port: 8080,
                target: None
            },
        ]
    );
    let b = id("t", "b", "", Protocol::Udp);
    assert_eq!(vips(&state, &b), vec!["198.18.100.2:53"]);
    assert!(backends(&state, &b).is_empty());
}

#[test]
fn example_manifest_loads_as_documented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/services.yaml");
    let mut src = FileSource::new(&path);
    let state = src.load().expect("load example");
    assert!(src.errors().is_empty(), "{:?}", src.errors());
    assert!(src.warnings().is_empty(), "{:?}", src.warnings());
    let web = id("shop", "web", "http", Protocol::Tcp);
    let syslog = id("logging", "syslog", "syslog", Protocol::Udp);
    let keys: Vec<_> = state.services.keys().cloned().collect();
    assert_eq!(keys, vec![syslog.clone(), web.clone()]);
    assert_eq!(
        vips(&state, &web),
        vec!["198.18.100.10:80", "198.18.200.10:80"]
    );
    assert_eq!(
        state.services[&web].frontends[1].kind,
        FrontendKind::LoadBalancer
    );
    // The terminating pod (198.18.1.12) is not ready.
    assert_eq!(
        backends(&state, &web),
        vec!["198.18.1.10:8080", "198.18.1.11:8080"]
    );
    assert_eq!(
        state.services[&web].endpoints[0].target.as_deref(),
        Some("shop/web-5c9d7f8b6-7kq2m")
    );
    assert_eq!(vips(&state, &syslog), vec!["198.18.100.20:514"]);
    assert_eq!(
        backends(&state, &syslog),
        vec!["198.18.2.20:5514", "198.18.2.21:5514"]
    );
    // The file holds no Node: web's NodePort listens only on --nodeport-address.
    let node = NodeSettings {
        name: Some("edge-1".into()),
        extra_addresses: vec!["198.18.0.5".parse().expect("address")],
    };
    let state = FileSource::new(&path)
        .with_node(node)
        .load()
        .expect("load example");
    assert_eq!(
        vips(&state, &web),
        vec!["198.18.0.5:31080", "198.18.100.10:80", "198.18.200.10:80"]
    );
}

#[test]
fn edge_local_example_loads_as_documented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/edge-local.yaml");
    let on = |name: &str, extra: &[&str]| {
        let mut src = FileSource::new(&path).with_node(NodeSettings {
            name: Some(name.into()),
            extra_addresses: extra.iter().map(|a| a.parse().expect("address")).collect(),
        });
        let state = src.load().expect("load example");
        assert!(src.errors().is_empty(), "{:?}", src.errors());
        assert!(src.warnings().is_empty(), "{:?}", src.warnings());
        let id = id("shop", "checkout", "https", Protocol::Tcp);
        assert_eq!(state.services.len(), 1);
        state.services[&id].clone()
    };
    let st = on("edge-1", &[]);
    let fronts: Vec<(String, FrontendKind)> = st
        .frontends
        .iter()
        .map(|f| (format!("{}:{}", f.addr, f.port), f.kind))
        .collect();
    assert_eq!(
        fronts,
        vec![
            ("198.18.0.11:31443".into(), FrontendKind::NodePort),
            ("198.18.0.12:31443".into(), FrontendKind::NodePort),
            ("198.18.100.30:443".into(), FrontendKind::ClusterIp),
            ("198.18.200.30:443".into(), FrontendKind::LoadBalancer),
        ]
    );
    assert!(st.external_local && !st.internal_local);
    assert_eq!(st.health_check_node_port, Some(32443));
    assert_eq!(st.affinity_timeout_s, Some(600));
    let ranges: Vec<String> = st
        .source_ranges
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    assert_eq!(ranges, vec!["198.18.64.0/18"]);
    assert_eq!(
        addrs(&st.endpoints),
        vec!["198.18.1.30:8443", "198.18.1.31:8443"]
    );
    assert_eq!(addrs(&st.local_endpoints), vec!["198.18.1.30:8443"]);
    assert_eq!(addrs(&st.draining), vec!["198.18.1.32:8443"]);
    assert_eq!(
        st.endpoints_for(FrontendKind::LoadBalancer),
        &st.local_endpoints[..]
    );
    assert_eq!(st.endpoints_for(FrontendKind::ClusterIp), &st.endpoints[..]);

    // On edge-2 (no Node object for it in the file): NodePorts only on the given
    // address, and edge-2's pod is the local one.
    let st = on("edge-2", &["198.18.0.21"]);
    let node_ports: Vec<String> = st
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::NodePort)
        .map(|f| format!("{}:{}", f.addr, f.port))
        .collect();
    assert_eq!(node_ports, vec!["198.18.0.21:31443"]);
    assert_eq!(addrs(&st.local_endpoints), vec!["198.18.1.31:8443"]);
}
