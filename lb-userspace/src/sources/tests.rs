//! Decoding documents and keeping the last valid version of each object.

use serde_json::Value;

use super::*;
use crate::model::NodeSettings;
use crate::translate::ObjectKind;

fn json(s: &str) -> Value {
    serde_json::from_str(s).expect("test JSON parses")
}

#[test]
fn decodes_a_list_item_by_item() {
    let doc = json(
        r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},
             "spec":{"clusterIP":"198.18.100.1","ports":[{"port":80}]}},
            {"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d"}},
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"b","namespace":"x"},
             "spec":{"ports":[{"port":"eighty"}]}}
        ]}"#,
    );
    let items = decode(doc);
    assert_eq!(items.len(), 3);
    let Ok(Located {
        value: Decoded::Object(Object::Service(a)),
        location,
    }) = &items[0]
    else {
        panic!("{:?}", items[0]);
    };
    assert_eq!(location, "items[0]");
    assert_eq!(a.metadata.namespace.as_deref(), Some("default"));
    assert!(matches!(
        &items[1],
        Ok(Located { value: Decoded::Ignored { kind, .. }, .. }) if kind == "Deployment"
    ));
    let Err(e) = &items[2] else {
        panic!("{:?}", items[2]);
    };
    assert_eq!(e.field, "spec.ports[0].port");
    assert_eq!(
        e.object
            .as_ref()
            .map(std::string::ToString::to_string)
            .as_deref(),
        Some("Service x/b")
    );
    assert!(
        e.to_string()
            .starts_with("items[2]: Service x/b: spec.ports[0].port: "),
        "{e}"
    );
}

#[test]
fn nodes_decode_without_namespace_and_feed_node_info() {
    let doc = json(
        r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Node","metadata":{"name":"n1"},
             "status":{"addresses":[{"type":"InternalIP","address":"198.18.0.1"},
                                    {"type":"Hostname","address":"n1"}]}},
            {"apiVersion":"v1","kind":"Node","metadata":{"name":"n2"},
             "status":{"addresses":[{"type":"InternalIP","address":"2001:db8::2"}]}},
            {"apiVersion":"v1","kind":"Node","metadata":{"name":"n3"},
             "status":{"addresses":[{"type":"InternalIP","address":7}]}}
        ]}"#,
    );
    let mut items = decode(doc).into_iter();
    let mut store = ObjectStore::new();
    for _ in 0..2 {
        let Some(Ok(Located {
            value: Decoded::Object(obj),
            ..
        })) = items.next()
        else {
            panic!("a Node object");
        };
        let key = obj.key();
        assert_eq!(key.kind, ObjectKind::Node);
        assert!(key.namespace.is_empty(), "{key:?}");
        store.apply(obj).expect("valid Node");
    }
    let Some(Err(e)) = items.next() else {
        panic!("n3 does not decode");
    };
    assert_eq!(e.field, "status.addresses[0].address");
    assert_eq!(
        e.object
            .as_ref()
            .map(std::string::ToString::to_string)
            .as_deref(),
        Some("Node n3")
    );

    let named = NodeSettings {
        name: Some("n1".into()),
        extra_addresses: vec!["198.18.0.9".parse().expect("address")],
    };
    let info = store.node_info(&named);
    assert_eq!(info.name.as_deref(), Some("n1"));
    let shown: Vec<String> = info
        .addresses
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    assert_eq!(shown, vec!["198.18.0.1", "198.18.0.9"]);
    let all = store.node_info(&NodeSettings::default());
    let shown: Vec<String> = all
        .addresses
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    assert_eq!(shown, vec!["198.18.0.1", "2001:db8::2"]);

    // A NodePort service sees them; the node named in the settings decides.
    let np = json(
        r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"np"},
            "spec":{"type":"NodePort","clusterIP":"198.18.100.1",
                    "ports":[{"port":80,"nodePort":30080}]}}"#,
    );
    let Some(Ok(Located {
        value: Decoded::Object(svc),
        ..
    })) = decode(np).into_iter().next()
    else {
        panic!("a Service");
    };
    store.apply(svc).expect("valid Service");
    let state = store.desired_state(&named);
    let fronts: Vec<String> = state
        .services
        .values()
        .flat_map(|st| &st.frontends)
        .map(|f| format!("{}:{}", f.addr, f.port))
        .collect();
    assert_eq!(
        fronts,
        vec!["198.18.0.1:30080", "198.18.0.9:30080", "198.18.100.1:80"]
    );
}

#[test]
fn store_keeps_last_valid_version() {
    let v1 = json(
        r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},
            "spec":{"clusterIP":"198.18.100.1","ports":[{"port":80}]}}"#,
    );
    let v2_bad = json(
        r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},
            "spec":{"clusterIP":"198.18.100.1","ports":[{"port":0}]}}"#,
    );
    let obj = |v: Value| match decode(v).remove(0) {
        Ok(Located {
            value: Decoded::Object(o),
            ..
        }) => o,
        other => panic!("{other:?}"),
    };
    let mut store = ObjectStore::new();
    store.apply(obj(v1)).expect("valid");
    let before = store.desired_state(&NodeSettings::default());
    assert_eq!(before.services.len(), 1);
    let err = store.apply(obj(v2_bad)).expect_err("port 0 is invalid");
    assert_eq!(err.field(), "spec.ports[0].port");
    assert_eq!(store.desired_state(&NodeSettings::default()), before);
    let key = store.keys().next().cloned().expect("one object");
    assert!(store.remove(&key).is_some());
    assert!(store
        .desired_state(&NodeSettings::default())
        .services
        .is_empty());
}
