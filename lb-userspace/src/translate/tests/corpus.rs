//! The test corpus `tests/corpus/*.yaml` (manifests as `kubectl get -o yaml` prints
//! them: managed fields, status blocks, long annotations, `---` documents, `kind: List`),
//! one file per kube-proxy parity case, each with the expected translation beside it in
//! `<case>.expected.json`: the programmed service ports and the ignored list. Files are
//! read through the file source's decoding (`sources::decode`, and `FileSource` itself
//! for the state and its warnings), for the node `node-a`.
//!
//! After an intended change, `XDPLB_BLESS_CORPUS=1 cargo test -p lb-userspace --lib
//! corpus` rewrites the expected files; review their diff like code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

use super::*;
use crate::model::{Endpoint, NodeSettings};
use crate::sources::file::FileSource;
use crate::sources::{decode, Decoded, Object, ObjectStore};
use crate::translate::{translate_with_ignored, Ignored, IgnoredReason};

/// The node every case is translated for.
const NODE: &str = "node-a";

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus")
}

fn settings() -> NodeSettings {
    NodeSettings {
        name: Some(NODE.to_owned()),
        extra_addresses: Vec::new(),
    }
}

/// Splits a file into documents and decodes them as the file source does (YAML
/// documents, each converted to JSON-like data, then `sources::decode`), into a store.
fn load_store(path: &Path) -> ObjectStore {
    let text = std::fs::read_to_string(path).expect("corpus file reads");
    let mut store = ObjectStore::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let yaml = serde_yaml::Value::deserialize(document).expect("corpus YAML parses");
        if yaml.is_null() {
            continue;
        }
        let doc: serde_json::Value = serde_json::to_value(&yaml).expect("JSON-like data");
        for item in decode(doc) {
            let item = item.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Decoded::Object(obj) = item.value {
                store
                    .apply(obj)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
    }
    store
}

/// The translation of a store and what it left out, for `node-a`.
fn translate_store(store: &ObjectStore) -> (Translation, Vec<Ignored>) {
    let objects: Vec<&Object> = store.keys().filter_map(|k| store.get(k)).collect();
    let services = objects.iter().filter_map(|o| match o {
        Object::Service(s) => Some(s.as_ref()),
        _ => None,
    });
    let slices = objects.iter().filter_map(|o| match o {
        Object::EndpointSlice(s) => Some(s.as_ref()),
        _ => None,
    });
    translate_with_ignored(services, slices, &store.node_info(&settings()))
}

fn endpoint_texts(eps: &[Endpoint]) -> Vec<String> {
    eps.iter()
        .map(|e| SocketAddr::new(e.addr, e.port).to_string())
        .collect()
}

/// The translation as the expected files hold it: one line of text per frontend and
/// endpoint, so that a diff reads like a `lbctl services` listing.
fn rendered(t: &Translation, ignored: &[Ignored]) -> Value {
    let services: Vec<Value> = t
        .state
        .services
        .iter()
        .map(|(id, st)| {
            let frontends: Vec<String> = st
                .frontends
                .iter()
                .map(|f| {
                    let mut text = format!(
                        "{}/{} {:?}",
                        SocketAddr::new(f.addr, f.port),
                        f.protocol,
                        f.kind
                    );
                    if st.restricts_source(f) {
                        let ranges: Vec<String> = st
                            .source_ranges_for(f)
                            .iter()
                            .map(std::string::ToString::to_string)
                            .collect();
                        text.push_str(&format!(" from {}", ranges.join(",")));
                    }
                    text
                })
                .collect();
            json!({
                "port": id.to_string(),
                "frontends": frontends,
                "endpoints": endpoint_texts(&st.endpoints),
                "local_endpoints": endpoint_texts(&st.local_endpoints),
                "draining": endpoint_texts(&st.draining),
                "external_local": st.external_local,
                "internal_local": st.internal_local,
            })
        })
        .collect();
    let ignored: Vec<Value> = ignored
        .iter()
        .map(|i| {
            json!({
                "object": i.object.to_string(),
                "field": i.field,
                "value": i.value,
                "reason": i.reason.as_str(),
            })
        })
        .collect();
    json!({ "services": services, "ignored": ignored })
}

/// Loads one case, checks it against its expected file (or writes that file when
/// blessing), checks that the file source programs the same state and warns about every
/// ignored item that warrants a warning, and returns the translation for the case's own
/// assertions.
fn check_case(case: &str) -> (Translation, Vec<Ignored>) {
    let manifest = corpus_dir().join(format!("{case}.yaml"));
    let expected_path = corpus_dir().join(format!("{case}.expected.json"));
    let store = load_store(&manifest);
    let (t, ignored) = translate_store(&store);
    let got = serde_json::to_string_pretty(&rendered(&t, &ignored)).expect("renders") + "\n";
    if std::env::var_os("XDPLB_BLESS_CORPUS").is_some() {
        std::fs::write(&expected_path, &got).expect("expected file writes");
    }
    let expected = std::fs::read_to_string(&expected_path)
        .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
    assert_eq!(
        got, expected,
        "{case}: translation differs from {case}.expected.json"
    );

    let mut source = FileSource::new(&manifest).with_node(settings());
    let state = source.load().expect("the file source loads the case");
    assert_eq!(
        state, t.state,
        "{case}: the file source programs the same state"
    );
    assert!(source.errors().is_empty(), "{case}: {:?}", source.errors());
    for item in ignored.iter().filter(|i| {
        matches!(
            i.reason,
            IgnoredReason::WrongFamily | IgnoredReason::NoClusterIp
        )
    }) {
        let shown = item.to_string();
        assert!(
            source.warnings().iter().any(|w| w.contains(&shown)),
            "{case}: no warning {shown:?} in {:?}",
            source.warnings()
        );
    }
    (t, ignored)
}

/// (object, reason) of every ignored item.
fn ignored_reasons(ignored: &[Ignored]) -> Vec<(String, &'static str)> {
    ignored
        .iter()
        .map(|i| (i.object.to_string(), i.reason.as_str()))
        .collect()
}

#[test]
fn corpus_other_proxy_services_and_slices_and_headless_slices_are_not_programmed() {
    let (t, ignored) = check_case("other-proxy");
    let names: Vec<String> = t
        .state
        .services
        .keys()
        .map(std::string::ToString::to_string)
        .collect();
    assert_eq!(names, vec!["mesh/api:http/TCP"]);
    assert_eq!(
        ignored_reasons(&ignored),
        vec![
            ("Service mesh/db".into(), "headless"),
            ("Service mesh/gateway".into(), "other-proxy"),
            ("EndpointSlice mesh/db-s8d7f".into(), "headless"),
            ("EndpointSlice mesh/gateway-9qk2m".into(), "other-proxy"),
        ]
    );
}

#[test]
fn corpus_addresses_of_a_family_the_service_lacks_are_ignored() {
    let (t, ignored) = check_case("wrong-family");
    let st = &t.state.services[&id("shop", "storefront", "https", Protocol::Tcp)];
    assert!(st.frontends.iter().all(|f| f.addr.is_ipv4()), "{st:?}");
    let fields: Vec<&str> = ignored.iter().map(|i| i.field.as_str()).collect();
    assert_eq!(
        fields,
        vec!["status.loadBalancer.ingress[1].ip", "spec.externalIPs[1]"]
    );
}

#[test]
fn corpus_dual_stack_source_ranges_filter_only_their_own_family() {
    let (t, ignored) = check_case("source-ranges-dual-stack");
    assert!(ignored.is_empty());
    let st = &t.state.services[&id("ops", "admin", "https", Protocol::Tcp)];
    let lb: Vec<(bool, bool)> = st
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::LoadBalancer)
        .map(|f| (f.addr.is_ipv4(), st.restricts_source(f)))
        .collect();
    assert_eq!(lb, vec![(true, true), (false, false)]);
}

#[test]
fn corpus_service_without_cluster_ip_is_skipped_and_the_next_one_programmed() {
    let (t, ignored) = check_case("no-cluster-ip");
    let names: Vec<String> = t
        .state
        .services
        .keys()
        .map(std::string::ToString::to_string)
        .collect();
    assert_eq!(names, vec!["default/live:80-8080/TCP"]);
    assert_eq!(
        ignored_reasons(&ignored),
        vec![("Service default/draft".into(), "no-cluster-ip")]
    );
}

#[test]
fn corpus_topology_hints_pick_this_nodes_zone_or_node_when_every_endpoint_has_one() {
    let (t, ignored) = check_case("topology-hints");
    assert!(ignored.is_empty());
    let cluster = |name: &str, port: &str| {
        addrs(&t.state.services[&id("shop", name, port, Protocol::Tcp)].endpoints)
    };
    assert_eq!(
        cluster("catalog", "grpc"),
        vec!["198.18.15.1", "198.18.15.3"]
    );
    assert_eq!(cluster("cache", "redis"), vec!["198.18.16.1"]);
    assert_eq!(
        cluster("legacy", "http"),
        vec!["198.18.17.1", "198.18.17.2"]
    );
}

#[test]
fn corpus_node_ports_without_node_address_are_reported_once_per_service() {
    let (t, ignored) = check_case("no-node-address");
    assert!(t.state.services.values().all(|st| st
        .frontends
        .iter()
        .all(|f| f.kind != FrontendKind::NodePort)));
    assert_eq!(
        ignored_reasons(&ignored),
        vec![
            ("Service default/echo".into(), "no-node-address"),
            ("Service default/web".into(), "no-node-address"),
        ]
    );
}
