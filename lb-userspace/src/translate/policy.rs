//! Per-service traffic options: traffic policies (`Local` / `Cluster`), session affinity
//! and its timeout, load balancer source ranges. Each is read once by validation (which
//! reports a bad value with its field path) and once by translation (which leaves an
//! option off for an object validation would have rejected).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;

use super::error::TranslateError;
use super::fields::service_type;
use super::object::ObjectRef;
use crate::model::Prefix;

/// The annotation kube-proxy reads when `spec.loadBalancerSourceRanges` is empty.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when absent (3 hours, the API default).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// The largest affinity timeout the API accepts (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// Parses `a.b.c.d/n` or `x::y/n` (whitespace around it ignored) and zeroes the host bits,
/// as Go's `net.ParseCIDR` does for the network. A bare address is not a prefix.
pub fn parse_prefix(text: &str) -> Option<Prefix> {
    let (addr, len) = text.trim().split_once('/')?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    let addr = match addr.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) => {
            if len > 32 {
                return None;
            }
            // A shift by the full width (len 0) is None: no network bits.
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            if len > 128 {
                return None;
            }
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    };
    Some(Prefix { addr, len })
}

/// The service's `loadBalancerSourceRanges` (LoadBalancer services only; empty: any
/// source): the spec field, or when it is empty the annotation (comma-separated), as
/// kube-proxy reads them. Sorted, without duplicates.
pub(super) fn source_ranges(
    svc: &Service,
    object: &ObjectRef,
) -> Result<Vec<Prefix>, TranslateError> {
    if service_type(svc) != "LoadBalancer" {
        return Ok(Vec::new());
    }
    let spec_ranges = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_deref())
        .unwrap_or_default();
    let (field, entries): (String, Vec<&str>) = if !spec_ranges.is_empty() {
        (
            "spec.loadBalancerSourceRanges".into(),
            spec_ranges.iter().map(String::as_str).collect(),
        )
    } else {
        let annotation = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
            .map(|v| v.trim())
            .unwrap_or_default();
        if annotation.is_empty() {
            return Ok(Vec::new());
        }
        (
            format!("metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"),
            annotation.split(',').collect(),
        )
    };
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let Some(prefix) = parse_prefix(entry) else {
            return Err(TranslateError::Invalid {
                object: object.clone(),
                field: format!("{field}[{i}]"),
                reason: format!(
                    "{:?} is not an address range (a.b.c.d/n or x::y/n)",
                    entry.trim()
                ),
            });
        };
        out.push(prefix);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `sessionAffinity: ClientIP`: its timeout; `None` for `sessionAffinity: None`.
pub(super) fn affinity_timeout(
    svc: &Service,
    object: &ObjectRef,
) -> Result<Option<u32>, TranslateError> {
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT_S)),
                Some(t) => u32::try_from(t)
                    .ok()
                    .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_S).contains(t))
                    .map(Some)
                    .ok_or_else(|| TranslateError::Invalid {
                        object: object.clone(),
                        field: "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        reason: format!("{t} is out of range (1-{MAX_AFFINITY_TIMEOUT_S})"),
                    }),
            }
        }
        Some(other) => Err(TranslateError::UnknownValue {
            object: object.clone(),
            field: "spec.sessionAffinity".into(),
            value: other.to_owned(),
            expected: "None, ClientIP",
        }),
    }
}

/// Whether a traffic policy field says `Local` (absent: `Cluster`).
fn policy_is_local(
    value: Option<&str>,
    field: &str,
    object: &ObjectRef,
) -> Result<bool, TranslateError> {
    match value {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(TranslateError::UnknownValue {
            object: object.clone(),
            field: field.to_owned(),
            value: other.to_owned(),
            expected: "Cluster, Local",
        }),
    }
}

/// Whether clients outside the cluster can reach the service, kube-proxy's
/// `ExternallyAccessible`: NodePort and LoadBalancer types, or externalIPs.
fn externally_accessible(svc: &Service) -> bool {
    matches!(service_type(svc), "NodePort" | "LoadBalancer")
        || svc
            .spec
            .as_ref()
            .and_then(|s| s.external_ips.as_ref())
            .is_some_and(|ips| !ips.is_empty())
}

/// `(external_local, internal_local)`. `externalTrafficPolicy: Local` only counts for an
/// externally accessible service (kube-proxy's `ExternalPolicyLocal`).
pub(super) fn traffic_policies(
    svc: &Service,
    object: &ObjectRef,
) -> Result<(bool, bool), TranslateError> {
    let Some(spec) = svc.spec.as_ref() else {
        return Ok((false, false));
    };
    let external = policy_is_local(
        spec.external_traffic_policy.as_deref(),
        "spec.externalTrafficPolicy",
        object,
    )?;
    let internal = policy_is_local(
        spec.internal_traffic_policy.as_deref(),
        "spec.internalTrafficPolicy",
        object,
    )?;
    Ok((external && externally_accessible(svc), internal))
}
