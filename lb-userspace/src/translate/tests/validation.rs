//! Validation errors name the object and the field; invalid objects never panic
//! `translate`.

use super::*;
use crate::translate::{ObjectKind, TranslateError};

#[test]
fn new_service_fields_are_validated_with_their_path() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "targetPort: 8080",
            "targetPort: 8080\n    nodePort: 0",
            "spec.ports[0].nodePort",
        ),
        (
            "targetPort: 8080",
            "targetPort: 8080\n    nodePort: 65536",
            "spec.ports[0].nodePort",
        ),
        (
            "clusterIPs: [198.18.100.10]",
            "clusterIPs: [198.18.100.10]\n  ipFamilies: [IPv4, IPv5]",
            "spec.ipFamilies[1]",
        ),
    ];
    for (from, to, field) in cases {
        assert!(WEB.contains(from), "{from}");
        let err = validate_service(&svc(&WEB.replacen(from, to, 1))).expect_err(to);
        assert_eq!(err.field(), *field, "{err}");
    }
}

/// Each validation error names the object and the field.
#[test]
fn service_validation_errors_name_object_and_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("name: web\n", "name: \"\"\n", "metadata.name"),
        (
            "clusterIP: 198.18.100.10",
            "clusterIP: 198.18.100.300",
            "spec.clusterIP",
        ),
        (
            "clusterIPs: [198.18.100.10]",
            "clusterIPs: [198.18.100.10, 198.18.100.11]",
            "spec.clusterIPs[1]",
        ),
        (
            "clusterIPs: [198.18.100.10]",
            "clusterIPs: [198.18.100.11]",
            "spec.clusterIPs[0]",
        ),
        ("type: ClusterIP", "type: Magic", "spec.type"),
        ("port: 80", "port: 0", "spec.ports[0].port"),
        ("port: 80", "port: 70000", "spec.ports[0].port"),
        (
            "targetPort: 8080",
            "targetPort: 65536",
            "spec.ports[0].targetPort",
        ),
        ("protocol: TCP", "protocol: ICMP", "spec.ports[0].protocol"),
        (
            "spec:\n",
            "spec:\n  externalIPs: [198.18.200.1, not-an-ip]\n",
            "spec.externalIPs[1]",
        ),
    ];
    for (from, to, field) in cases {
        assert!(WEB.contains(from), "{from}");
        let s = svc(&WEB.replacen(from, to, 1));
        let err = validate_service(&s).expect_err(to);
        assert_eq!(err.field(), *field, "{err}");
        assert_eq!(err.object().kind, ObjectKind::Service);
        let msg = err.to_string();
        assert!(msg.contains(field), "{msg}");
        if *field != "metadata.name" {
            assert!(msg.starts_with("Service shop/web: "), "{msg}");
        } else {
            assert!(msg.starts_with("Service shop/<unnamed>: "), "{msg}");
        }
    }
}

#[test]
fn ingress_ip_validation_names_the_index() {
    let bad = LB.replace("- ip: 198.18.200.2", "- ip: 198.18.200.x");
    let err = validate_service(&svc(&bad)).unwrap_err();
    assert_eq!(err.field(), "status.loadBalancer.ingress[1].ip");
    assert_eq!(
        err.to_string(),
        "Service edge/front: status.loadBalancer.ingress[1].ip: \"198.18.200.x\" is not an IP address"
    );
}

#[test]
fn multi_port_names_must_be_unique_and_present() {
    let dup = MULTI.replace("{name: metrics, port: 9090", "{name: http, port: 9090");
    let err = validate_service(&svc(&dup)).unwrap_err();
    assert!(
        matches!(&err, TranslateError::DuplicatePortName { port_name, first, .. }
            if port_name == "http" && &**first == "spec.ports[0]"),
        "{err:?}"
    );
    assert_eq!(err.field(), "spec.ports[1].name");
    assert_eq!(err.object().to_string(), "Service default/app");

    let unnamed = MULTI.replace("{name: dns, port: 53", "{port: 53");
    let err = validate_service(&svc(&unnamed)).unwrap_err();
    assert_eq!(err.field(), "spec.ports[2].name");

    let same_port = MULTI.replace("{name: metrics, port: 9090", "{name: metrics, port: 80");
    let err = validate_service(&svc(&same_port)).unwrap_err();
    assert_eq!(err.field(), "spec.ports[1].port");
    assert!(matches!(
        err,
        TranslateError::DuplicatePort { port: 80, .. }
    ));
}

#[test]
fn slice_validation_errors_name_object_and_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("name: web-abc12", "name: \"\"", "metadata.name"),
        ("addressType: IPv4", "addressType: IPX", "addressType"),
        (
            "kubernetes.io/service-name: web",
            "app: web",
            "metadata.labels[kubernetes.io/service-name]",
        ),
        (
            "[198.18.1.2]",
            "[198.18.1.256]",
            "endpoints[0].addresses[0]",
        ),
        (
            "[198.18.1.1]",
            "[198.18.1.9, \"2001:db8::1\"]",
            "endpoints[1].addresses[1]",
        ),
        ("[198.18.1.3]", "[]", "endpoints[2].addresses"),
        ("port: 8080", "port: 0", "ports[0].port"),
        ("port: 8080", "port: 65536", "ports[0].port"),
        ("protocol: TCP", "protocol: tcp", "ports[0].protocol"),
    ];
    for (from, to, field) in cases {
        assert!(WEB_SLICE.contains(from), "{from}");
        let s = slice(&WEB_SLICE.replacen(from, to, 1));
        let err = validate_slice(&s).expect_err(to);
        assert_eq!(err.field(), *field, "{err}");
        assert_eq!(err.object().kind, ObjectKind::EndpointSlice);
        assert_eq!(err.object().namespace, "shop");
        let msg = err.to_string();
        assert!(msg.starts_with("EndpointSlice shop/"), "{msg}");
        assert!(msg.contains(field), "{msg}");
    }
}

#[test]
fn invalid_objects_do_not_panic_translate() {
    // translate only promises meaningful output for valid objects, but garbage must
    // not crash the agent.
    let bad = svc(&WEB
        .replace("port: 80", "port: 99999")
        .replace("clusterIP: 198.18.100.10", "clusterIP: nonsense"));
    let bad_slice = slice(&WEB_SLICE.replace("[198.18.1.2]", "[x]"));
    let state = translate(
        [&bad].into_iter(),
        [&bad_slice].into_iter(),
        &NodeInfo::default(),
    );
    assert!(state.services.is_empty());
}
