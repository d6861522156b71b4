//! Lists, watch events and errors: when a state is sent and what it holds.

use kube::runtime::watcher;

use super::*;
use crate::translate::ObjectKind;

#[test]
fn first_state_only_after_every_kind_is_listed() {
    let mut core = Core::new(NodeSettings::default());
    list(&mut core, Kind::Services, vec![svc("a", "198.18.100.1")]);
    assert!(core.take_state().is_none(), "only Services listed");
    list(
        &mut core,
        Kind::EndpointSlices,
        vec![eps("a", "198.18.1.1")],
    );
    assert!(core.take_state().is_none(), "Nodes not listed yet");
    assert_eq!(core.waiting(), "Nodes");
    list(&mut core, Kind::Nodes, vec![]);
    let (state, resync) = core.take_state().expect("all listed");
    assert!(resync, "the first state follows the lists");
    let port = state.services.get(&id("a")).expect("service a translated");
    assert_eq!(port.endpoints.len(), 1, "{port:?}");
    assert!(core.take_state().is_none(), "nothing changed since");
}

#[test]
fn relist_removes_what_was_not_listed_and_only_of_its_kind() {
    let mut core = synced_core();
    core.take_state().expect("initial state");
    // A re-list after 410 Gone: b was deleted while the watch was down.
    list(&mut core, Kind::Services, vec![svc("a", "198.18.100.1")]);
    let (state, resync) = core.take_state().expect("a list completed");
    assert!(resync);
    assert!(state.services.contains_key(&id("a")));
    assert!(!state.services.contains_key(&id("b")), "{state:?}");
    // Slices are another kind's list: b's slice is still in the store.
    assert_eq!(
        core.store()
            .keys()
            .filter(|k| k.kind == ObjectKind::EndpointSlice)
            .count(),
        2
    );
    // A re-list that changes nothing still yields a (resync) update.
    list(&mut core, Kind::Services, vec![svc("a", "198.18.100.1")]);
    let (again, resync) = core.take_state().expect("a list completed");
    assert!(resync);
    assert_eq!(again, state);
}

#[test]
fn apply_delete_and_invalid_versions() {
    let mut core = synced_core();
    core.take_state().expect("initial state");
    core.event(Kind::Services, KindEvent::Apply(svc("c", "198.18.100.3")));
    let (state, resync) = core.take_state().expect("c added");
    assert!(!resync, "a watch event is not a resync");
    assert!(state.services.contains_key(&id("c")));

    // An invalid version keeps the previous one in force, also through a re-list.
    core.event(Kind::Services, KindEvent::Apply(svc("c", "not-an-ip")));
    assert!(core.take_state().is_none(), "nothing valid changed");
    assert!(core.invalid.keys().any(|k| k.name == "c"));
    list(
        &mut core,
        Kind::Services,
        vec![
            svc("a", "198.18.100.1"),
            svc("b", "198.18.100.2"),
            svc("c", "not-an-ip"),
        ],
    );
    let (state, _) = core.take_state().expect("list completed");
    let c = state.services.get(&id("c")).expect("previous c kept");
    assert_eq!(
        c.frontends[0].addr,
        "198.18.100.3".parse::<std::net::IpAddr>().expect("ip")
    );

    core.event(Kind::Services, KindEvent::Delete(svc("c", "not-an-ip")));
    let (state, _) = core.take_state().expect("c deleted");
    assert!(!state.services.contains_key(&id("c")));
    assert!(core.invalid.is_empty());
}

#[test]
fn node_heartbeats_change_nothing() {
    let mut core = synced_core();
    core.take_state().expect("initial state");
    core.event(
        Kind::Nodes,
        KindEvent::Apply(node("node-a", "198.18.0.1", "2")),
    );
    assert!(core.take_state().is_none(), "status-only Node update");
    core.event(
        Kind::Nodes,
        KindEvent::Apply(node("node-a", "198.18.0.9", "3")),
    );
    assert!(
        core.take_state().is_some(),
        "a new node address is a change"
    );
}

#[test]
fn updates_that_change_no_service_send_nothing() {
    let mut core = synced_core();
    core.take_state().expect("initial state");
    // A new resourceVersion and an annotation: a new object, the same service.
    let a2 = object(serde_json::json!({"kind": "Service",
        "metadata": {"name": "a", "namespace": "default", "resourceVersion": "7",
                     "annotations": {"touched-by": "kubectl"}},
        "spec": {"type": "ClusterIP", "clusterIP": "198.18.100.1",
                 "clusterIPs": ["198.18.100.1"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                            "targetPort": 8080}]}}));
    core.event(Kind::Services, KindEvent::Apply(a2));
    assert!(core.dirty, "the store changed");
    assert!(core.take_state().is_none(), "no service changed");
    // A re-list is still reported, changed or not (the agent counts resyncs).
    list(
        &mut core,
        Kind::Nodes,
        vec![node("node-a", "198.18.0.1", "9")],
    );
    assert!(matches!(core.take_state(), Some((_, true))));
}

#[test]
fn managed_fields_are_dropped() {
    let Object::Service(s) = svc("a", "198.18.100.1") else {
        panic!("a Service");
    };
    assert!(s.metadata.managed_fields.is_none());
}

#[test]
fn errors_are_logged_once_per_outage() {
    let mut core = synced_core();
    let err = || {
        watcher::Error::WatchError(Box::new(kube::core::Status {
            code: 500,
            message: "etcd unavailable".into(),
            ..Default::default()
        }))
    };
    core.handle(Kind::Services, Err(err()));
    core.handle(Kind::Services, Err(err()));
    assert_eq!(core.errors[Kind::Services as usize].len(), 1);
    assert!(core
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("etcd unavailable")));
    core.handle(
        Kind::Services,
        Ok(KindEvent::Apply(svc("a", "198.18.100.1"))),
    );
    assert!(core.errors[Kind::Services as usize].is_empty(), "recovered");
}
