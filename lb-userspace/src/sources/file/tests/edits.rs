//! Edits and mistakes: a valid change applies, an invalid one keeps the last valid
//! version of that object only, a removed object goes away.

use super::*;

const NODE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status:
  addresses: [{type: InternalIP, address: 198.18.0.1}]
"#;

const NODE_PORT_SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: np, namespace: t}
spec:
  type: NodePort
  clusterIP: 198.18.100.9
  ports: [{port: 80, nodePort: 30080}]
"#;

#[test]
fn node_object_edits_move_the_node_ports_and_a_bad_edit_keeps_the_last_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = dir.path().join("nodes.yaml");
    write(&nodes, NODE);
    write(&dir.path().join("svc.yaml"), NODE_PORT_SVC);
    let np = id("t", "np", "", Protocol::Tcp);
    let mut src = FileSource::new(dir.path()).with_node(NodeSettings {
        name: Some("n1".into()),
        extra_addresses: Vec::new(),
    });
    let state = src.load().expect("load");
    assert!(src.errors().is_empty(), "{:?}", src.errors());
    assert_eq!(
        vips(&state, &np),
        vec!["198.18.0.1:30080", "198.18.100.9:80"]
    );

    // The node gets a second address.
    write(
        &nodes,
        &NODE.replace(
            "addresses: [{type: InternalIP, address: 198.18.0.1}]",
            "addresses: [{type: InternalIP, address: 198.18.0.1},                  {type: ExternalIP, address: 198.18.0.2}]",
        ),
    );
    let state = src.load().expect("load");
    assert_eq!(
        vips(&state, &np),
        vec!["198.18.0.1:30080", "198.18.0.2:30080", "198.18.100.9:80"]
    );

    // An invalid address: reported with the field, the previous version stays.
    write(&nodes, &NODE.replace("198.18.0.1", "198.18.0.256"));
    let state = src.load().expect("load");
    assert_only_error(&src, "Node n1: status.addresses[0].address");
    assert_eq!(
        vips(&state, &np),
        vec!["198.18.0.1:30080", "198.18.0.2:30080", "198.18.100.9:80"]
    );

    // The Node object removed (the file says so: a zero-byte file would be taken as being
    // written): no NodePort frontends any more.
    write(&nodes, "# no Node here any more\n");
    let state = src.load().expect("load");
    assert!(src.errors().is_empty(), "{:?}", src.errors());
    assert_eq!(vips(&state, &np), vec!["198.18.100.9:80"]);
}

#[test]
fn invalid_edit_keeps_that_object_and_applies_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("svc.yaml");
    let a_ok = manifest("a", "198.18.100.1", "80", &["198.18.1.1"]);
    let b_ok = manifest("b", "198.18.100.2", "80", &["198.18.2.1"]);
    write(&file, &format!("{a_ok}---\n{b_ok}"));
    let mut src = FileSource::new(&file);
    let before = src.load().expect("load");
    assert_eq!(before.services.len(), 2);

    // a: port out of range (its EndpointSlice is unchanged); b: a valid change.
    let a_bad = manifest("a", "198.18.100.1", "70000", &["198.18.1.1"]);
    let b_new = manifest("b", "198.18.100.3", "80", &["198.18.2.1"]);
    write(&file, &format!("{a_bad}---\n{b_new}"));
    let after = src.load().expect("load");
    let a = id("t", "a", "http", Protocol::Tcp);
    let b = id("t", "b", "http", Protocol::Tcp);
    assert_eq!(after.services[&a], before.services[&a]);
    assert_eq!(vips(&after, &b), vec!["198.18.100.3:80"]);
    assert_eq!(src.errors().len(), 1, "{:?}", src.errors());
    let msg = src.errors()[0].to_string();
    assert!(msg.contains("svc.yaml"), "{msg}");
    assert!(msg.contains("document 1"), "{msg}");
    assert!(msg.contains("Service t/a"), "{msg}");
    assert!(msg.contains("spec.ports[0].port"), "{msg}");
    assert!(msg.contains("70000"), "{msg}");

    // A type error (port is not a number) also names object and field, and also keeps
    // the previous version.
    let a_typo = a_ok.replace("port: 80\n", "port: eighty\n");
    write(&file, &format!("{a_typo}---\n{b_new}"));
    let typo = src.load().expect("load");
    assert_eq!(typo.services[&a], before.services[&a]);
    let msg = src.errors()[0].to_string();
    assert!(msg.contains("Service t/a: spec.ports[0].port: "), "{msg}");

    // Fixing it applies again and clears the error.
    let a_fixed = manifest("a", "198.18.100.1", "81", &["198.18.1.1"]);
    write(&file, &format!("{a_fixed}---\n{b_new}"));
    let fixed = src.load().expect("load");
    assert_eq!(vips(&fixed, &a), vec!["198.18.100.1:81"]);
    assert!(src.errors().is_empty(), "{:?}", src.errors());
}

#[test]
fn invalid_new_object_is_reported_and_not_added() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("svc.yaml");
    let bad = manifest("a", "198.18.100.300", "80", &["198.18.1.1"]);
    write(&file, &bad);
    let mut src = FileSource::new(&file);
    let state = src.load().expect("load");
    assert!(state.services.is_empty());
    assert_only_error(&src, "Service t/a: spec.clusterIP: \"198.18.100.300\"");
}

#[test]
fn deleted_document_removes_the_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("svc.yaml");
    let a = manifest("a", "198.18.100.1", "80", &["198.18.1.1"]);
    let b = manifest("b", "198.18.100.2", "80", &["198.18.2.1"]);
    write(&file, &format!("{a}---\n{b}"));
    let mut src = FileSource::new(&file);
    assert_eq!(src.load().expect("load").services.len(), 2);
    write(&file, &b);
    let state = src.load().expect("load");
    let names: Vec<_> = state.services.keys().map(|k| k.name.clone()).collect();
    assert_eq!(names, vec!["b"]);
}

#[test]
fn deleted_file_removes_its_services() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir.path().join("a.yaml"),
        &manifest("a", "198.18.100.1", "80", &[]),
    );
    write(
        &dir.path().join("b.yml"),
        &manifest("b", "198.18.100.2", "80", &[]),
    );
    let mut src = FileSource::new(dir.path());
    assert_eq!(src.load().expect("load").services.len(), 2);
    std::fs::remove_file(dir.path().join("a.yaml")).expect("rm");
    let state = src.load().expect("load");
    let names: Vec<_> = state.services.keys().map(|k| k.name.clone()).collect();
    assert_eq!(names, vec!["b"]);
}

#[test]
fn unparsable_file_keeps_everything_it_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("svc.yaml");
    let other = dir.path().join("other.yaml");
    let a = manifest("a", "198.18.100.1", "80", &["198.18.1.1"]);
    write(&file, &a);
    write(&other, &manifest("c", "198.18.100.5", "80", &[]));
    let mut src = FileSource::new(dir.path());
    let before = src.load().expect("load");
    // Half-saved file: broken YAML (an unclosed flow sequence).
    write(&file, "apiVersion: v1\nkind: Service\nmetadata: {name: a\n");
    write(&other, &manifest("c", "198.18.100.6", "80", &[]));
    let after = src.load().expect("load");
    let a_id = id("t", "a", "http", Protocol::Tcp);
    assert_eq!(after.services[&a_id], before.services[&a_id]);
    assert_eq!(
        vips(&after, &id("t", "c", "http", Protocol::Tcp)),
        vec!["198.18.100.6:80"]
    );
    assert_only_error(&src, "svc.yaml: invalid YAML");
}

#[test]
fn document_without_a_name_keeps_the_files_objects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("svc.yaml");
    let a = manifest("a", "198.18.100.1", "80", &["198.18.1.1"]);
    write(&file, &a);
    let mut src = FileSource::new(&file);
    let before = src.load().expect("load");
    // The name line was deleted by mistake.
    write(&file, &a.replacen("  name: a\n", "", 1));
    let after = src.load().expect("load");
    assert_eq!(after, before);
    assert!(
        src.errors().iter().any(|e| e
            .to_string()
            .contains("Service t/<unnamed>: metadata.name: missing")),
        "{:?}",
        src.errors()
    );
}

#[test]
fn the_same_object_in_two_files_is_an_error_and_the_first_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir.path().join("1.yaml"),
        &manifest("a", "198.18.100.1", "80", &[]),
    );
    write(
        &dir.path().join("2.yaml"),
        &manifest("a", "198.18.100.2", "80", &[]),
    );
    let mut src = FileSource::new(dir.path());
    let state = src.load().expect("load");
    assert_eq!(
        vips(&state, &id("t", "a", "http", Protocol::Tcp)),
        vec!["198.18.100.1:80"]
    );
    // The Service and the EndpointSlice are both defined twice.
    assert_eq!(src.errors().len(), 2, "{:?}", src.errors());
    assert!(
        src.errors()[0].to_string().contains("also defined in"),
        "{:?}",
        src.errors()
    );
}

#[test]
fn missing_path_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = FileSource::new(dir.path().join("nope"));
    let err = src.load().expect_err("missing path");
    assert!(format!("{err:#}").contains("nope"), "{err:#}");
}

#[test]
fn a_zero_byte_file_is_taken_as_being_written_and_keeps_its_services() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("svc.yaml");
    write(
        &file,
        &manifest("web", "198.18.100.1", "80", &["198.18.1.1"]),
    );
    let web = id("t", "web", "http", Protocol::Tcp);
    let mut src = FileSource::new(dir.path());
    let state = src.load().expect("load");
    assert!(state.services.contains_key(&web));

    // Truncated mid-save: the service stays, and the file is reported.
    write(&file, "");
    let state = src.load().expect("load");
    assert_eq!(backends(&state, &web), vec!["198.18.1.1:8080"]);
    assert_only_error(&src, "svc.yaml: empty (zero bytes)");

    // Saved: the new content applies.
    write(
        &file,
        &manifest("web", "198.18.100.1", "80", &["198.18.1.2"]),
    );
    let state = src.load().expect("load");
    assert!(src.errors().is_empty(), "{:?}", src.errors());
    assert_eq!(backends(&state, &web), vec!["198.18.1.2:8080"]);

    // A file that says it holds nothing does remove the service.
    write(&file, "# nothing here\n");
    let state = src.load().expect("load");
    assert!(src.errors().is_empty(), "{:?}", src.errors());
    assert!(!state.services.contains_key(&web));
}

#[test]
fn a_byte_order_mark_at_the_start_of_a_file_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = manifest("web", "198.18.100.1", "80", &["198.18.1.1"]);
    write(&dir.path().join("svc.yaml"), &format!("\u{feff}{text}"));
    let json = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "t"},
        "spec": {"clusterIP": "198.18.100.2", "ports": [{"name": "http", "port": 80}]}}"#;
    write(&dir.path().join("api.json"), &format!("\u{feff}{json}"));
    let mut src = FileSource::new(dir.path());
    let state = src.load().expect("load");
    assert!(src.errors().is_empty(), "{:?}", src.errors());
    assert_eq!(
        backends(&state, &id("t", "web", "http", Protocol::Tcp)),
        vec!["198.18.1.1:8080"]
    );
    assert_eq!(
        vips(&state, &id("t", "api", "http", Protocol::Tcp)),
        vec!["198.18.100.2:80"]
    );
}

#[test]
fn endpoints_of_an_unread_kind_are_named_in_a_warning_and_other_kinds_pass_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "{}---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: web, namespace: t}}\n\
         ---\napiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\n\
         metadata: {{name: web-b, namespace: t}}\n\
         ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: t}}\n",
        manifest("web", "198.18.100.1", "80", &["198.18.1.1"])
    );
    write(&dir.path().join("svc.yaml"), &text);
    let mut src = FileSource::new(dir.path());
    let state = src.load().expect("load");
    assert!(src.errors().is_empty(), "{:?}", src.errors());
    assert_eq!(
        backends(&state, &id("t", "web", "http", Protocol::Tcp)),
        vec!["198.18.1.1:8080"]
    );
    let warnings = src.warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].contains("document 3")
            && warnings[0].contains("v1 Endpoints is not used")
            && warnings[0].contains("discovery.k8s.io/v1 EndpointSlices"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].contains("document 4")
            && warnings[1].contains("discovery.k8s.io/v1beta1 EndpointSlice is not used")
            && warnings[1].contains("apiVersion: discovery.k8s.io/v1"),
        "{warnings:?}"
    );
}
