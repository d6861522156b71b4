//! What is left out on purpose, as kube-proxy leaves it out, and how it is reported:
//! another proxy's objects, headless slices, Services without a clusterIP, addresses of a
//! family the Service lacks, NodePorts with no node address.

use super::*;
use crate::translate::{
    service_warnings, translate_with_ignored, Ignored, IgnoredReason, ObjectKind,
};

/// The translation and its ignored list, of valid objects.
fn run_ignored(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeInfo,
) -> (Translation, Vec<Ignored>) {
    for s in services {
        validate_service(s).expect("test Service is valid");
    }
    for s in slices {
        validate_slice(s).expect("test EndpointSlice is valid");
    }
    translate_with_ignored(services.iter(), slices.iter(), node)
}

fn reasons(ignored: &[Ignored]) -> Vec<(String, String, IgnoredReason)> {
    ignored
        .iter()
        .map(|i| (i.object.to_string(), i.field.clone(), i.reason))
        .collect()
}

/// The `Ignored` items among a service's warnings.
fn warned_about(s: &Service) -> Vec<Ignored> {
    service_warnings(s)
        .into_iter()
        .filter_map(|w| match w {
            crate::translate::TranslateError::Ignored(i) => Some(*i),
            _ => None,
        })
        .collect()
}

fn with_labels(yaml: &str, labels: &str) -> String {
    yaml.replace(
        "  name: web\n  namespace: shop\n",
        &format!("  name: web\n  namespace: shop\n  labels: {{{labels}}}\n"),
    )
}

#[test]
fn services_labelled_for_another_proxy_are_skipped_whatever_the_value() {
    for value in ["cilium", ""] {
        let other = with_labels(
            WEB,
            &format!("service.kubernetes.io/service-proxy-name: \"{value}\""),
        );
        let (t, ignored) = run_ignored(&[svc(&other)], &[slice(WEB_SLICE)], &node(None, &[]));
        assert!(t.state.services.is_empty(), "value {value:?}");
        assert_eq!(
            reasons(&ignored),
            vec![(
                "Service shop/web".into(),
                "metadata.labels[service.kubernetes.io/service-proxy-name]".into(),
                IgnoredReason::OtherProxy
            )]
        );
        assert_eq!(ignored[0].value, value);
        // Skipped on purpose: listed, but no warning in the log.
        assert!(service_warnings(&svc(&other)).is_empty());
    }
}

#[test]
fn endpoint_slices_labelled_for_another_proxy_or_headless_are_not_used() {
    let other = WEB_SLICE.replace(
        "    kubernetes.io/service-name: web",
        "    kubernetes.io/service-name: web\n    service.kubernetes.io/service-proxy-name: other",
    );
    let headless = WEB_SLICE.replace(
        "    kubernetes.io/service-name: web",
        "    kubernetes.io/service-name: web\n    service.kubernetes.io/headless: \"\"",
    );
    for (yaml, reason) in [
        (other, IgnoredReason::OtherProxy),
        (headless, IgnoredReason::Headless),
    ] {
        let (t, ignored) = run_ignored(&[svc(WEB)], &[slice(&yaml)], &node(None, &[]));
        let st = &t.state.services[&id("shop", "web", "", Protocol::Tcp)];
        assert!(st.endpoints.is_empty(), "{reason}");
        assert!(st.draining.is_empty(), "{reason}");
        assert_eq!(ignored.len(), 1);
        assert_eq!(ignored[0].object.kind, ObjectKind::EndpointSlice);
        assert_eq!(ignored[0].object.name, "web-abc12");
        assert_eq!(ignored[0].reason, reason);
    }
}

#[test]
fn external_and_load_balancer_ips_of_a_family_the_service_lacks_are_ignored_with_a_warning() {
    let mixed = LB
        .replace(
            "externalIPs: [198.18.200.9]",
            "ipFamilies: [IPv4]\n  externalIPs: [198.18.200.9, \"2001:db8:200::9\"]",
        )
        .replace(
            "    - ip: 198.18.200.2\n",
            "    - ip: 198.18.200.2\n    - ip: \"2001:db8:200::1\"\n",
        );
    let s = svc(&mixed);
    let (t, ignored) = run_ignored(
        std::slice::from_ref(&s),
        &[],
        &node(None, &["198.18.0.1", "2001:db8::1"]),
    );
    let st = &t.state.services[&id("edge", "front", "https", Protocol::Tcp)];
    // Before: the IPv6 addresses became frontends that refused every connection (an
    // IPv4-only service has no IPv6 endpoints). Now they are not programmed at all, and
    // nor is the IPv6 node address.
    assert!(st.frontends.iter().all(|f| f.addr.is_ipv4()), "{st:?}");
    assert_eq!(st.frontends.len(), 5);
    assert_eq!(
        reasons(&ignored),
        vec![
            (
                "Service edge/front".into(),
                "status.loadBalancer.ingress[2].ip".into(),
                IgnoredReason::WrongFamily
            ),
            (
                "Service edge/front".into(),
                "spec.externalIPs[1]".into(),
                IgnoredReason::WrongFamily
            ),
        ]
    );
    // The warning names the service and the address.
    let warnings: Vec<String> = service_warnings(&s)
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    assert_eq!(warnings.len(), 2);
    assert_eq!(
        warnings[1],
        "Service edge/front: spec.externalIPs[1]: 2001:db8:200::9 ignored (wrong-family): the \
         Service has no IPv6 family (spec.ipFamilies), so no frontend is made for it, as \
         kube-proxy"
    );
    assert!(service_warnings(&s)
        .iter()
        .all(super::super::error::TranslateError::is_warning));

    // Without ipFamilies, the clusterIPs' families count (here IPv4 only).
    let no_families = mixed.replace("ipFamilies: [IPv4]\n  ", "");
    let (_, ignored) = run_ignored(&[svc(&no_families)], &[], &node(None, &["198.18.0.1"]));
    assert_eq!(reasons(&ignored), reasons(&warned_about(&s)));
    // A dual-stack service keeps both families' addresses.
    let dual = mixed
        .replace("ipFamilies: [IPv4]", "ipFamilies: [IPv4, IPv6]")
        .replace(
            "clusterIPs: [198.18.100.30]",
            "clusterIPs: [198.18.100.30, \"2001:db8::30\"]",
        );
    let both = node(None, &["198.18.0.1", "2001:db8::1"]);
    let (t, ignored) = run_ignored(&[svc(&dual)], &[], &both);
    assert!(ignored.is_empty(), "{ignored:?}");
    let st = &t.state.services[&id("edge", "front", "https", Protocol::Tcp)];
    // ClusterIP, ingress IP, externalIP and NodePort of IPv6.
    assert_eq!(st.frontends.iter().filter(|f| f.addr.is_ipv6()).count(), 4);
}

#[test]
fn service_without_any_cluster_ip_is_skipped_with_a_warning() {
    let unset = WEB.replace(
        "  clusterIP: 198.18.100.10\n  clusterIPs: [198.18.100.10]\n",
        "",
    );
    let empty = WEB.replace(
        "  clusterIP: 198.18.100.10\n  clusterIPs: [198.18.100.10]\n",
        "  clusterIP: \"\"\n",
    );
    for yaml in [&unset, &empty] {
        let s = svc(yaml);
        let (t, ignored) = run_ignored(
            std::slice::from_ref(&s),
            &[slice(WEB_SLICE)],
            &node(None, &[]),
        );
        assert!(t.state.services.is_empty());
        assert_eq!(
            reasons(&ignored),
            vec![(
                "Service shop/web".into(),
                "spec.clusterIP".into(),
                IgnoredReason::NoClusterIp
            )]
        );
        let warnings = service_warnings(&s);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].is_warning());
        assert!(
            warnings[0]
                .to_string()
                .starts_with("Service shop/web: spec.clusterIP: ignored (no-cluster-ip): "),
            "{}",
            warnings[0]
        );
    }
    // clusterIPs alone (no clusterIP) is enough: a hand-written manifest may give only
    // the list.
    let list_only = WEB.replace("  clusterIP: 198.18.100.10\n", "");
    let (t, ignored) = run_ignored(&[svc(&list_only)], &[], &node(None, &[]));
    assert_eq!(t.state.services.len(), 1);
    assert!(ignored.is_empty());
}

#[test]
fn node_ports_without_a_node_address_are_reported_once_per_service_naming_the_fix() {
    // NP has two ports with nodePorts: one report for the service, not one per port.
    let (t, ignored) = run_ignored(&[svc(NP)], &[], &node(Some("n1"), &[]));
    assert!(t.state.services.values().all(|st| st
        .frontends
        .iter()
        .all(|f| f.kind != FrontendKind::NodePort)));
    assert_eq!(ignored.len(), 1);
    assert_eq!(ignored[0].reason, IgnoredReason::NoNodeAddress);
    let shown = ignored[0].to_string();
    assert!(shown.starts_with("Service edge/np: spec.ports[].nodePort: ignored (no-node-address): NodePorts not programmed: no IPv4 address of this node is known"), "{shown}");
    assert!(shown.contains("--node-name"), "{shown}");
    assert!(shown.contains("--nodeport-address"), "{shown}");
    // Only addresses of another family: the same report.
    let (_, ignored) = run_ignored(&[svc(NP)], &[], &node(Some("n1"), &["2001:db8::1"]));
    assert_eq!(ignored.len(), 1);
    // An address known: nothing to report.
    let (_, ignored) = run_ignored(&[svc(NP)], &[], &node(Some("n1"), &["198.18.0.1"]));
    assert!(ignored.is_empty(), "{ignored:?}");
    // No nodePort named (a ClusterIP service, or allocateLoadBalancerNodePorts: false):
    // nothing is missing.
    let cip = NP.replace("type: NodePort", "type: ClusterIP");
    let (_, ignored) = run_ignored(&[svc(&cip)], &[], &node(Some("n1"), &[]));
    assert!(ignored.is_empty(), "{ignored:?}");
    let no_np = LB.replace(", nodePort: 31443", "");
    let (_, ignored) = run_ignored(&[svc(&no_np)], &[], &node(Some("n1"), &[]));
    assert!(ignored.is_empty(), "{ignored:?}");
}

#[test]
fn headless_external_name_and_sctp_are_reported_with_their_own_reasons() {
    let headless = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  ports: [{port: 5432}]
"#;
    let ext = r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec:
  type: ExternalName
  externalName: db.example.com
"#;
    let sctp = r#"
apiVersion: v1
kind: Service
metadata: {name: sig, namespace: tel}
spec:
  clusterIP: 198.18.100.60
  ports:
  - {name: sctp, port: 3868, protocol: SCTP}
  - {name: tcp, port: 3868, protocol: TCP}
"#;
    let (t, ignored) = run_ignored(&[svc(headless), svc(ext), svc(sctp)], &[], &node(None, &[]));
    assert_eq!(t.state.services.len(), 1);
    assert_eq!(
        reasons(&ignored),
        vec![
            (
                "Service shop/db".into(),
                "spec.clusterIP".into(),
                IgnoredReason::Headless
            ),
            (
                "Service shop/ext".into(),
                "spec.type".into(),
                IgnoredReason::ExternalName
            ),
            (
                "Service tel/sig".into(),
                "spec.ports[0].protocol".into(),
                IgnoredReason::UnsupportedProtocol
            ),
        ]
    );
}

#[test]
fn ignored_reasons_are_a_small_fixed_set_of_metric_labels() {
    let labels: Vec<&str> = IgnoredReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        labels,
        vec![
            "other-proxy",
            "headless",
            "external-name",
            "no-cluster-ip",
            "wrong-family",
            "no-node-address",
            "unsupported-protocol",
        ]
    );
    // The plain translation is the same with or without the report.
    let n = node(Some("n1"), &[]);
    let services = [svc(NP), svc(LB), svc(WEB)];
    let (t, _) = run_ignored(&services, &[slice(WEB_SLICE)], &n);
    assert_eq!(
        t,
        translate_with_conflicts(services.iter(), [slice(WEB_SLICE)].iter(), &n)
    );
}
