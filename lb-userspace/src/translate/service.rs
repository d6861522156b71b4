//! Services: validating one, the warnings that skip part of one, and what its ports
//! share when they are translated (frontend addresses, the node addresses of its
//! families for NodePorts, and the options of `policy`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::error::TranslateError;
use super::fields::{check_ip, parse_protocol, port_in_range, service_type, ApiProtocol};
use super::ignored::{excluded_by_labels, Ignored, IgnoredReason};
use super::node::NodeInfo;
use super::object::{ObjectKind, ObjectRef};
use super::policy::{affinity_timeout, source_ranges, traffic_policies};
use crate::model::{Frontend, FrontendKind, Prefix, Protocol};

/// True for a headless service (`clusterIP: None`).
fn is_headless(spec: &ServiceSpec) -> bool {
    let first = spec
        .cluster_ips
        .as_ref()
        .and_then(|ips| ips.first())
        .or(spec.cluster_ip.as_ref());
    first.is_some_and(|ip| ip == "None")
}

/// The cluster IPs as written: `spec.clusterIPs`, or `spec.clusterIP` when that list is
/// absent or empty (hand-written manifests often give only the latter). Empty strings
/// are no address.
fn cluster_ip_texts(spec: &ServiceSpec) -> Vec<&str> {
    let listed: Vec<&str> = match spec.cluster_ips.as_ref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.iter().map(String::as_str).collect(),
    };
    listed.into_iter().filter(|ip| !ip.is_empty()).collect()
}

/// Why a whole Service is not translated, or `None` when it is. kube-proxy's rules: its
/// informers' label selector (`!service.kubernetes.io/service-proxy-name`,
/// `!service.kubernetes.io/headless`; cmd/kube-proxy/app/server.go, `Run`), then
/// `ShouldSkipService` (pkg/proxy/util/utils.go: no clusterIP, `None`, ExternalName).
/// One difference: a Service that lists `clusterIPs` without `clusterIP` is translated
/// (the API server always fills both; a hand-written manifest may give only the list).
pub(super) fn skipped(svc: &Service) -> Option<Ignored> {
    let object = ObjectRef::new(ObjectKind::Service, &svc.metadata);
    if let Some(ignored) = excluded_by_labels(&object, &svc.metadata) {
        return Some(ignored);
    }
    let ignored = |field: &str, value: &str, reason, detail: &str| Ignored {
        object: object.clone(),
        field: field.to_owned(),
        value: value.to_owned(),
        reason,
        detail: detail.to_owned(),
    };
    if service_type(svc) == "ExternalName" {
        return Some(ignored(
            "spec.type",
            "ExternalName",
            IgnoredReason::ExternalName,
            "a DNS alias has no virtual IP to capture",
        ));
    }
    let spec = svc.spec.as_ref();
    if spec.is_some_and(is_headless) {
        return Some(ignored(
            "spec.clusterIP",
            "None",
            IgnoredReason::Headless,
            "a headless Service has no virtual IP to capture",
        ));
    }
    if spec.is_none_or(|spec| cluster_ip_texts(spec).is_empty()) {
        return Some(ignored(
            "spec.clusterIP",
            "",
            IgnoredReason::NoClusterIp,
            "no clusterIP (a manifest written before the API server allocated one?): the \
             Service is not programmed, as kube-proxy; give spec.clusterIP an address",
        ));
    }
    None
}

/// Checks everything `translate` relies on in a Service. Headless and ExternalName
/// services are valid (they are ignored, not rejected) as long as their metadata is.
pub fn validate_service(svc: &Service) -> Result<(), TranslateError> {
    let object = ObjectRef::new(ObjectKind::Service, &svc.metadata);
    if object.name.is_empty() {
        return Err(TranslateError::Missing {
            object,
            field: "metadata.name".into(),
        });
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(());
    };
    let ty = service_type(svc);
    if !matches!(
        ty,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        return Err(TranslateError::UnknownValue {
            object,
            field: "spec.type".into(),
            value: ty.to_owned(),
            expected: "ClusterIP, NodePort, LoadBalancer, ExternalName",
        });
    }
    if ty == "ExternalName" {
        // Nothing else of an ExternalName service is used.
        return Ok(());
    }
    validate_cluster_ips(spec, &object, is_headless(spec))?;
    validate_external_addresses(svc, spec, &object)?;
    validate_ports(spec.ports.as_deref().unwrap_or_default(), &object)?;
    if let Some(n) = spec.health_check_node_port {
        if !port_in_range(n) {
            return Err(TranslateError::PortOutOfRange {
                object,
                field: "spec.healthCheckNodePort".into(),
                value: n.into(),
            });
        }
    }
    for (i, fam) in spec.ip_families.iter().flatten().enumerate() {
        if !matches!(fam.as_str(), "IPv4" | "IPv6") {
            return Err(TranslateError::UnknownValue {
                object,
                field: format!("spec.ipFamilies[{i}]"),
                value: fam.clone(),
                expected: "IPv4, IPv6",
            });
        }
    }
    traffic_policies(svc, &object)?;
    affinity_timeout(svc, &object)?;
    source_ranges(svc, &object)?;
    Ok(())
}

/// `spec.clusterIP` and `spec.clusterIPs`: addresses (or all `None` when `headless`), at
/// most one per family, the first equal to `clusterIP`.
fn validate_cluster_ips(
    spec: &ServiceSpec,
    object: &ObjectRef,
    headless: bool,
) -> Result<(), TranslateError> {
    if let Some(ip) = spec.cluster_ip.as_deref() {
        if !ip.is_empty() && ip != "None" {
            check_ip(object, "spec.clusterIP".into(), ip)?;
        }
    }
    let Some(ips) = spec.cluster_ips.as_ref() else {
        return Ok(());
    };
    if ips.len() > 2 {
        return Err(TranslateError::Invalid {
            object: object.clone(),
            field: "spec.clusterIPs".into(),
            reason: format!("{} addresses, at most 2 (one per family)", ips.len()),
        });
    }
    let mut families = BTreeSet::new();
    for (i, ip) in ips.iter().enumerate() {
        let field = format!("spec.clusterIPs[{i}]");
        if headless {
            if ip != "None" {
                return Err(TranslateError::Invalid {
                    object: object.clone(),
                    field,
                    reason: format!("{ip:?} in a headless service (clusterIP None)"),
                });
            }
            continue;
        }
        let addr = check_ip(object, field.clone(), ip)?;
        if !families.insert(addr.is_ipv4()) {
            return Err(TranslateError::Invalid {
                object: object.clone(),
                field,
                reason: format!("{ip} is of the same family as another clusterIP"),
            });
        }
    }
    if let (Some(first), Some(single)) = (ips.first(), spec.cluster_ip.as_deref()) {
        if !single.is_empty() && first != single {
            return Err(TranslateError::Invalid {
                object: object.clone(),
                field: "spec.clusterIPs[0]".into(),
                reason: format!("{first:?} differs from spec.clusterIP {single:?}"),
            });
        }
    }
    Ok(())
}

/// `spec.externalIPs` and `status.loadBalancer.ingress[].ip` parse as addresses.
fn validate_external_addresses(
    svc: &Service,
    spec: &ServiceSpec,
    object: &ObjectRef,
) -> Result<(), TranslateError> {
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        check_ip(object, format!("spec.externalIPs[{i}]"), ip)?;
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        if let Some(ip) = ing.ip.as_deref() {
            check_ip(object, format!("status.loadBalancer.ingress[{i}].ip"), ip)?;
        }
    }
    Ok(())
}

/// `spec.ports`: each port valid on its own, names present (on multi-port services) and
/// unique, (port, protocol) unique. The first problem in list order is reported.
fn validate_ports(ports: &[ServicePort], object: &ObjectRef) -> Result<(), TranslateError> {
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut numbers: BTreeMap<(i32, &str), usize> = BTreeMap::new();
    for (i, p) in ports.iter().enumerate() {
        let at = |leaf: &str| format!("spec.ports[{i}]{leaf}");
        let api_proto = validate_port_fields(p, object, &at)?;
        let name = p.name.as_deref().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            // The API requires names on multi-port services: the name is what ties a
            // service port to its endpoint ports.
            return Err(TranslateError::Missing {
                object: object.clone(),
                field: at(".name"),
            });
        }
        if let Some(first) = names.insert(name, i) {
            return Err(TranslateError::DuplicatePortName {
                object: object.clone(),
                field: at(".name"),
                port_name: name.to_owned(),
                first: format!("spec.ports[{first}]").into(),
            });
        }
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if let Some(first) = numbers.insert((p.port, proto), i) {
            return Err(TranslateError::DuplicatePort {
                object: object.clone(),
                field: at(".port"),
                port: p.port,
                protocol: api_proto.name(),
                first: format!("spec.ports[{first}]").into(),
            });
        }
        if let Some(n) = p.node_port {
            if !port_in_range(n) {
                return Err(TranslateError::PortOutOfRange {
                    object: object.clone(),
                    field: at(".nodePort"),
                    value: n.into(),
                });
            }
        }
    }
    Ok(())
}

/// One port's `port`, `protocol` and `targetPort`; `at` turns a leaf (`.port`) into the
/// port's field path. Returns the protocol.
fn validate_port_fields(
    p: &ServicePort,
    object: &ObjectRef,
    at: &dyn Fn(&str) -> String,
) -> Result<ApiProtocol, TranslateError> {
    if !port_in_range(p.port) {
        return Err(TranslateError::PortOutOfRange {
            object: object.clone(),
            field: at(".port"),
            value: p.port.into(),
        });
    }
    let proto = p.protocol.as_deref().unwrap_or("TCP");
    let Some(api_proto) = parse_protocol(Some(proto)) else {
        return Err(TranslateError::UnknownProtocol {
            object: object.clone(),
            field: at(".protocol"),
            value: proto.to_owned(),
        });
    };
    match p.target_port.as_ref() {
        Some(IntOrString::Int(n)) if !port_in_range(*n) => Err(TranslateError::PortOutOfRange {
            object: object.clone(),
            field: at(".targetPort"),
            value: (*n).into(),
        }),
        Some(IntOrString::String(s)) if s.is_empty() => Err(TranslateError::Missing {
            object: object.clone(),
            field: at(".targetPort"),
        }),
        _ => Ok(api_proto),
    }
}

/// Problems that skip part of a valid service, or all of it, and that the user should
/// hear about: SCTP ports, addresses of a family the Service does not have, no
/// clusterIP. Log them; they do not make the service invalid. Services skipped on
/// purpose (another proxy's, headless, ExternalName) give no warning: they are listed by
/// [`translate_with_ignored`](super::translate_with_ignored) only.
pub fn service_warnings(svc: &Service) -> Vec<TranslateError> {
    if let Some(skip) = skipped(svc) {
        return match skip.reason {
            IgnoredReason::NoClusterIp => vec![TranslateError::Ignored(Box::new(skip))],
            _ => Vec::new(),
        };
    }
    let object = ObjectRef::new(ObjectKind::Service, &svc.metadata);
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_deref());
    let mut warnings: Vec<TranslateError> = ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter(|(_, p)| parse_protocol(p.protocol.as_deref()) == Some(ApiProtocol::Sctp))
        .map(|(i, _)| TranslateError::UnsupportedProtocol {
            object: object.clone(),
            field: format!("spec.ports[{i}].protocol"),
            protocol: "SCTP".into(),
        })
        .collect();
    let (_, wrong_family) = frontend_addrs(svc, &object);
    warnings.extend(
        wrong_family
            .into_iter()
            .map(|ignored| TranslateError::Ignored(Box::new(ignored))),
    );
    warnings
}

/// The SCTP ports of a service as [`Ignored`] items (the report's form of the
/// `UnsupportedProtocol` warnings).
fn unsupported_ports(svc: &Service, object: &ObjectRef) -> Vec<Ignored> {
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_deref());
    ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter(|(_, p)| parse_protocol(p.protocol.as_deref()) == Some(ApiProtocol::Sctp))
        .map(|(i, p)| Ignored {
            object: object.clone(),
            field: format!("spec.ports[{i}].protocol"),
            value: "SCTP".into(),
            reason: IgnoredReason::UnsupportedProtocol,
            detail: format!("port {} is not programmed (TCP and UDP only)", p.port),
        })
        .collect()
}

/// The IP families of a service: `spec.ipFamilies`, else the families of its
/// clusterIPs, else (a hand-written manifest without either) both. Returned as (IPv4,
/// IPv6). kube-proxy runs one proxier per family and each programs only the addresses of
/// its own family (pkg/proxy/serviceport.go, `newBaseServiceInfo`): externalIPs, load
/// balancer IPs and NodePorts of another family are left out.
fn service_families(svc: &Service) -> (bool, bool) {
    let Some(spec) = svc.spec.as_ref() else {
        return (true, true);
    };
    if let Some(fams) = spec.ip_families.as_ref().filter(|f| !f.is_empty()) {
        return (
            fams.iter().any(|f| f == "IPv4"),
            fams.iter().any(|f| f == "IPv6"),
        );
    }
    let cluster: Vec<IpAddr> = cluster_ip_texts(spec)
        .into_iter()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if cluster.is_empty() {
        return (true, true);
    }
    (
        cluster.iter().any(IpAddr::is_ipv4),
        cluster.iter().any(IpAddr::is_ipv6),
    )
}

/// The name of an IP family as `spec.ipFamilies` spells it.
fn family_name(is_v4: bool) -> &'static str {
    if is_v4 {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Frontend addresses of a (not skipped) service, with their kinds, and the externalIPs
/// and load balancer ingress IPs left out because the service does not have their family.
fn frontend_addrs(
    svc: &Service,
    object: &ObjectRef,
) -> (Vec<(IpAddr, FrontendKind)>, Vec<Ignored>) {
    let mut out = Vec::new();
    let mut ignored = Vec::new();
    let Some(spec) = svc.spec.as_ref() else {
        return (out, ignored);
    };
    out.extend(
        cluster_ip_texts(spec)
            .into_iter()
            .filter_map(|ip| ip.parse().ok())
            .map(|a| (a, FrontendKind::ClusterIp)),
    );
    // (field path, address, kind) of every other address, before the family filter.
    let mut others: Vec<(String, IpAddr, FrontendKind)> = Vec::new();
    if service_type(svc) == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(addr) = ing.ip.as_deref().and_then(|ip| ip.parse().ok()) {
                let field = format!("status.loadBalancer.ingress[{i}].ip");
                others.push((field, addr, FrontendKind::LoadBalancer));
            }
        }
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        if let Ok(addr) = ip.parse() {
            let field = format!("spec.externalIPs[{i}]");
            others.push((field, addr, FrontendKind::ExternalIp));
        }
    }
    let (has_v4, has_v6) = service_families(svc);
    for (field, addr, kind) in others {
        let is_v4 = addr.is_ipv4();
        if (is_v4 && has_v4) || (!is_v4 && has_v6) {
            out.push((addr, kind));
            continue;
        }
        ignored.push(Ignored {
            object: object.clone(),
            field,
            value: addr.to_string(),
            reason: IgnoredReason::WrongFamily,
            detail: format!(
                "the Service has no {} family (spec.ipFamilies), so no frontend is made \
                 for it, as kube-proxy",
                family_name(is_v4)
            ),
        });
    }
    (out, ignored)
}

/// Whether some TCP or UDP port of the service names a `nodePort`.
fn names_node_ports(svc: &Service) -> bool {
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_deref());
    ports.unwrap_or_default().iter().any(|p| {
        p.node_port.is_some_and(|n| n != 0)
            && matches!(
                parse_protocol(p.protocol.as_deref()),
                Some(ApiProtocol::Supported(_))
            )
    })
}

/// The report that a NodePort or LoadBalancer service gets no NodePort frontend because
/// no address of this node (of the service's families) is known.
fn no_node_address(object: &ObjectRef, families: (bool, bool)) -> Ignored {
    let wanted = match families {
        (true, true) => "IPv4 or IPv6",
        (true, false) => "IPv4",
        _ => "IPv6",
    };
    Ignored {
        object: object.clone(),
        field: "spec.ports[].nodePort".into(),
        value: String::new(),
        reason: IgnoredReason::NoNodeAddress,
        detail: format!(
            "NodePorts not programmed: no {wanted} address of this node is known; start \
             the agent with --node-name naming a Node in the input (its InternalIP and \
             ExternalIP addresses are used), or give --nodeport-address"
        ),
    }
}

/// What every port of one (not skipped) Service shares when it is translated.
pub(super) struct ServiceWide {
    /// ClusterIPs, load balancer ingress IPs and externalIPs, with their kinds.
    addrs: Vec<(IpAddr, FrontendKind)>,
    /// The node addresses of the service's IP families: where its NodePorts listen.
    node_addrs: Vec<IpAddr>,
    /// Type NodePort or LoadBalancer: only then does a port's `nodePort` count.
    has_node_ports: bool,
    pub(super) external_local: bool,
    pub(super) internal_local: bool,
    pub(super) affinity_timeout_s: Option<u32>,
    pub(super) source_ranges: Vec<Prefix>,
    pub(super) health_check_node_port: Option<u16>,
    /// What of the service is left out (ports, addresses, NodePorts), for the report.
    pub(super) ignored: Vec<Ignored>,
}

impl ServiceWide {
    pub(super) fn of(svc: &Service, node: &NodeInfo) -> Self {
        let object = ObjectRef::new(ObjectKind::Service, &svc.metadata);
        // Validation rejected anything these could fail on; for an unvalidated object
        // the feature is left off rather than guessed.
        let (external_local, internal_local) = traffic_policies(svc, &object).unwrap_or_default();
        let affinity_timeout_s = affinity_timeout(svc, &object).unwrap_or_default();
        let source_ranges = source_ranges(svc, &object).unwrap_or_default();
        let health_check_node_port = if service_type(svc) == "LoadBalancer" && external_local {
            svc.spec
                .as_ref()
                .and_then(|s| s.health_check_node_port)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|&p| p != 0)
        } else {
            None
        };
        let families = service_families(svc);
        let node_addrs: Vec<IpAddr> = node
            .addresses
            .iter()
            .copied()
            .filter(|a| if a.is_ipv4() { families.0 } else { families.1 })
            .collect();
        let has_node_ports = matches!(service_type(svc), "NodePort" | "LoadBalancer");
        let (addrs, mut ignored) = frontend_addrs(svc, &object);
        ignored.extend(unsupported_ports(svc, &object));
        if has_node_ports && node_addrs.is_empty() && names_node_ports(svc) {
            ignored.push(no_node_address(&object, families));
        }
        Self {
            addrs,
            node_addrs,
            has_node_ports,
            external_local,
            internal_local,
            affinity_timeout_s,
            source_ranges,
            health_check_node_port,
            ignored,
        }
    }

    /// The frontends of one service port: every service address on `port`, and every
    /// node address on `node_port` (the port's `nodePort` field), sorted, one per
    /// (address, port, protocol).
    pub(super) fn frontends(
        &self,
        port: u16,
        protocol: Protocol,
        node_port: Option<i32>,
    ) -> Vec<Frontend> {
        let mut frontends: Vec<Frontend> = self
            .addrs
            .iter()
            .map(|&(addr, kind)| Frontend {
                addr,
                port,
                protocol,
                kind,
            })
            .collect();
        let node_port = node_port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n != 0 && self.has_node_ports);
        if let Some(node_port) = node_port {
            frontends.extend(self.node_addrs.iter().map(|&addr| Frontend {
                addr,
                port: node_port,
                protocol,
                kind: FrontendKind::NodePort,
            }));
        }
        frontends.sort();
        // The same address and port listed twice (say as clusterIP and externalIP) is
        // one frontend: SERVICES has one entry per (address, port, protocol). Sorting put
        // the kinds in `FrontendKind` order (ClusterIP first), and the first is the one
        // kept.
        frontends.dedup_by_key(|f| (f.addr, f.port, f.protocol));
        frontends
    }
}
