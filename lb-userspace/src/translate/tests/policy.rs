//! Per-service options: session affinity, traffic policies, load balancer source ranges.

use super::*;
use crate::translate::parse_prefix;

#[test]
fn session_affinity_client_ip_and_its_timeout() {
    let st = |yaml: &str| {
        run_on(&[svc(yaml)], &[], &NodeInfo::default())
            .state
            .services[&id("shop", "web", "", Protocol::Tcp)]
            .clone()
    };
    assert_eq!(st(WEB).affinity_timeout_s, None);
    let none = WEB.replace(
        "type: ClusterIP",
        "type: ClusterIP\n  sessionAffinity: None",
    );
    assert_eq!(st(&none).affinity_timeout_s, None);
    let client = WEB.replace(
        "type: ClusterIP",
        "type: ClusterIP\n  sessionAffinity: ClientIP",
    );
    assert_eq!(st(&client).affinity_timeout_s, Some(10_800));
    let with = |t: &str| {
        client.replace(
            "sessionAffinity: ClientIP",
            &format!(
                "sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}"
            ),
        )
    };
    assert_eq!(st(&with("60")).affinity_timeout_s, Some(60));
    assert_eq!(st(&with("86400")).affinity_timeout_s, Some(86_400));
    for bad in ["0", "86401", "-5"] {
        let err = validate_service(&svc(&with(bad))).expect_err(bad);
        assert_eq!(
            err.field(),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            "{err}"
        );
        assert!(err.to_string().starts_with("Service shop/web: "), "{err}");
    }
    let err = validate_service(&svc(&client.replace("ClientIP", "Cookie"))).unwrap_err();
    assert_eq!(err.field(), "spec.sessionAffinity");
}

#[test]
fn traffic_policies_local() {
    let get = |yaml: &str| {
        let s = svc(yaml);
        validate_service(&s).expect("valid");
        let t = translate_with_conflicts([&s].into_iter(), [].iter(), &NodeInfo::default());
        let st = t.state.services.into_values().next().expect("one port");
        (
            st.external_local,
            st.internal_local,
            st.health_check_node_port,
        )
    };
    let lb_local = LB.replace(
        "type: LoadBalancer",
        "type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001",
    );
    assert_eq!(get(&lb_local), (true, false, Some(32001)));
    assert_eq!(
        get(&lb_local.replace("Local", "Cluster")),
        (false, false, None)
    );
    // NodePort + Local: local, but health checks are for load balancers only.
    let np_local = lb_local.replace("type: LoadBalancer", "type: NodePort");
    assert_eq!(get(&np_local), (true, false, None));
    // ClusterIP with externalIPs is externally accessible; without, eTP means nothing.
    let cip_local = np_local.replace("type: NodePort", "type: ClusterIP");
    assert_eq!(get(&cip_local), (true, false, None));
    let cip_only = cip_local.replace("  externalIPs: [198.18.200.9]\n", "");
    assert_eq!(get(&cip_only), (false, false, None));
    let itp = WEB.replace(
        "type: ClusterIP",
        "type: ClusterIP\n  internalTrafficPolicy: Local",
    );
    assert_eq!(get(&itp), (false, true, None));

    for (field, yaml) in [
        (
            "spec.externalTrafficPolicy",
            lb_local.replace(": Local", ": Global"),
        ),
        (
            "spec.internalTrafficPolicy",
            itp.replace(": Local", ": Node"),
        ),
    ] {
        let err = validate_service(&svc(&yaml)).expect_err(field);
        assert_eq!(err.field(), field, "{err}");
    }
    let err = validate_service(&svc(&lb_local.replace("32001", "70000"))).unwrap_err();
    assert_eq!(err.field(), "spec.healthCheckNodePort");
}

#[test]
fn load_balancer_source_ranges_from_the_field_or_the_annotation() {
    let ranges = |yaml: &str| -> Vec<String> {
        let s = svc(yaml);
        validate_service(&s).expect("valid");
        let t = translate_with_conflicts([&s].into_iter(), [].iter(), &NodeInfo::default());
        let st = t.state.services.into_values().next().expect("one port");
        st.source_ranges
            .iter()
            .map(std::string::ToString::to_string)
            .collect()
    };
    assert!(ranges(LB).is_empty());
    let field = LB.replace(
        "type: LoadBalancer",
        "type: LoadBalancer\n  loadBalancerSourceRanges: [\" 198.18.7.9/24 \", \"2001:db8:7::1/48\", 198.18.0.0/16, 198.18.7.0/24]",
    );
    // Host bits zeroed, whitespace trimmed, sorted, duplicates removed.
    assert_eq!(
        ranges(&field),
        vec!["198.18.0.0/16", "198.18.7.0/24", "2001:db8:7::/48"]
    );
    let annotated = LB.replace(
        "metadata: {name: front, namespace: edge}",
        "metadata:\n  name: front\n  namespace: edge\n  annotations:\n    service.beta.kubernetes.io/load-balancer-source-ranges: \" 198.18.9.0/24, 198.19.0.0/16 \"",
    );
    assert_eq!(ranges(&annotated), vec!["198.18.9.0/24", "198.19.0.0/16"]);
    // The field, when given, wins over the annotation (as kube-proxy).
    let both = annotated.replace(
        "type: LoadBalancer",
        "type: LoadBalancer\n  loadBalancerSourceRanges: [198.18.5.0/24]",
    );
    assert_eq!(ranges(&both), vec!["198.18.5.0/24"]);
    // Only load balancers are restricted.
    assert!(ranges(&field.replace("type: LoadBalancer", "type: NodePort")).is_empty());

    let bad = LB.replace(
        "type: LoadBalancer",
        "type: LoadBalancer\n  loadBalancerSourceRanges: [198.18.0.0/16, 198.18.1.0/24, 198.18.2.1]",
    );
    let err = validate_service(&svc(&bad)).unwrap_err();
    assert_eq!(err.field(), "spec.loadBalancerSourceRanges[2]");
    assert_eq!(
        err.to_string(),
        "Service edge/front: spec.loadBalancerSourceRanges[2]: \"198.18.2.1\" is not an \
         address range (a.b.c.d/n or x::y/n)"
    );
    let bad = annotated.replace("198.19.0.0/16", "198.19.0.0/33");
    let err = validate_service(&svc(&bad)).unwrap_err();
    assert_eq!(
        err.field(),
        "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges][1]"
    );
}

#[test]
fn prefixes_parse_like_go_parse_cidr() {
    let p = |s: &str| parse_prefix(s).map(|p| p.to_string());
    assert_eq!(p("198.18.7.9/24").as_deref(), Some("198.18.7.0/24"));
    assert_eq!(p("198.18.7.9/32").as_deref(), Some("198.18.7.9/32"));
    assert_eq!(p("198.18.7.9/0").as_deref(), Some("0.0.0.0/0"));
    assert_eq!(p("2001:db8::ff/120").as_deref(), Some("2001:db8::/120"));
    assert_eq!(p("::/0").as_deref(), Some("::/0"));
    assert_eq!(p(" 2001:db8::1/128\t").as_deref(), Some("2001:db8::1/128"));
    for bad in [
        "198.18.7.9",
        "198.18.7.9/33",
        "2001:db8::/129",
        "198.18.7.9/",
        "/24",
        "198.18.7.9/+8",
        "198.18.7.9/ 8",
        "x/8",
        "",
        "198.18.7.9/999999999999",
    ] {
        assert_eq!(p(bad), None, "{bad:?}");
    }
}

#[test]
fn source_ranges_restrict_only_the_load_balancer_ips_of_their_own_family() {
    // kube-proxy runs one proxier per family, and each keeps only its family's ranges
    // (newBaseServiceInfo: MapCIDRsByIPFamily): a family with no range of its own is not
    // filtered at all, even when the other family's are.
    let dual = r#"
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: edge}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 198.18.100.70
  clusterIPs: [198.18.100.70, "2001:db8::70"]
  loadBalancerSourceRanges: [198.18.50.0/24]
  ports: [{name: https, port: 443, targetPort: 8443}]
status:
  loadBalancer:
    ingress: [{ip: 198.18.200.70}, {ip: "2001:db8:200::70"}]
"#;
    let state = run(&[svc(dual)], &[]);
    let st = &state.services[&id("edge", "dual", "https", Protocol::Tcp)];
    let shown = |ranges: Vec<crate::model::Prefix>| -> Vec<String> {
        ranges
            .iter()
            .map(std::string::ToString::to_string)
            .collect()
    };
    let lb4 = fe(
        "198.18.200.70",
        443,
        Protocol::Tcp,
        FrontendKind::LoadBalancer,
    );
    let lb6 = fe(
        "2001:db8:200::70",
        443,
        Protocol::Tcp,
        FrontendKind::LoadBalancer,
    );
    let cip4 = fe("198.18.100.70", 443, Protocol::Tcp, FrontendKind::ClusterIp);
    assert!(st.frontends.contains(&lb4) && st.frontends.contains(&lb6));
    assert!(st.restricts_source(&lb4));
    assert_eq!(shown(st.source_ranges_for(&lb4)), vec!["198.18.50.0/24"]);
    // Before: every IPv6 client of the load balancer was dropped.
    assert!(!st.restricts_source(&lb6));
    assert!(st.source_ranges_for(&lb6).is_empty());
    assert!(!st.restricts_source(&cip4));

    // Ranges of both families: each family's frontends get their own.
    let both = dual.replace(
        "loadBalancerSourceRanges: [198.18.50.0/24]",
        "loadBalancerSourceRanges: [198.18.50.0/24, \"2001:db8:50::/48\"]",
    );
    let state = run(&[svc(&both)], &[]);
    let st = &state.services[&id("edge", "dual", "https", Protocol::Tcp)];
    assert_eq!(shown(st.source_ranges_for(&lb4)), vec!["198.18.50.0/24"]);
    assert_eq!(shown(st.source_ranges_for(&lb6)), vec!["2001:db8:50::/48"]);
    assert!(st.restricts_source(&lb6));
    // The state keeps both families' ranges (the data path holds them per service port).
    assert_eq!(
        shown(st.source_ranges.clone()),
        vec!["198.18.50.0/24", "2001:db8:50::/48"]
    );
}
