//! What the translation leaves out on purpose, with a reason from a small fixed set: the
//! report behind warnings, `/metrics` (`xdplb_objects_ignored_total{reason}`) and
//! `lbctl services --all`. A skipped object or field is never an error: the rest of the
//! input is programmed as usual.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::object::ObjectRef;

/// The label that gives a Service (and, copied by the EndpointSlice controller, its
/// slices) to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// The label the EndpointSlice controller puts on the slices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Why something is not programmed. The set is fixed and small so that it can label a
/// metric; [`IgnoredReason::as_str`] is the label value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IgnoredReason {
    /// Labelled `service.kubernetes.io/service-proxy-name`: another proxy implements it
    /// (a Service, or an EndpointSlice carrying the label copied from its Service).
    OtherProxy,
    /// A headless Service (`clusterIP: None`), or an EndpointSlice labelled
    /// `service.kubernetes.io/headless`: no virtual IP to capture.
    Headless,
    /// `type: ExternalName`: a DNS alias, no virtual IP.
    ExternalName,
    /// No `clusterIP` at all (not `None`: unset, as in a manifest written before the API
    /// server allocated one).
    NoClusterIp,
    /// An externalIP or load balancer ingress IP of an IP family the Service does not
    /// have.
    WrongFamily,
    /// NodePorts of a NodePort or LoadBalancer Service with no address of this node to
    /// listen on (of the Service's families).
    NoNodeAddress,
    /// A port of a protocol the data path does not handle (SCTP).
    UnsupportedProtocol,
}

impl IgnoredReason {
    /// Every reason, in a fixed order (for metrics that list zero counts too).
    pub const ALL: [IgnoredReason; 7] = [
        IgnoredReason::OtherProxy,
        IgnoredReason::Headless,
        IgnoredReason::ExternalName,
        IgnoredReason::NoClusterIp,
        IgnoredReason::WrongFamily,
        IgnoredReason::NoNodeAddress,
        IgnoredReason::UnsupportedProtocol,
    ];

    /// The reason as a metric label value and in `lbctl` output (`other-proxy`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            IgnoredReason::OtherProxy => "other-proxy",
            IgnoredReason::Headless => "headless",
            IgnoredReason::ExternalName => "external-name",
            IgnoredReason::NoClusterIp => "no-cluster-ip",
            IgnoredReason::WrongFamily => "wrong-family",
            IgnoredReason::NoNodeAddress => "no-node-address",
            IgnoredReason::UnsupportedProtocol => "unsupported-protocol",
        }
    }
}

impl fmt::Display for IgnoredReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One object, or one field of an object, that the translation leaves out.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ignored {
    /// The object (the whole of it when `field` is empty).
    pub object: ObjectRef,
    /// The field path left out (`spec.externalIPs[1]`), empty for the whole object.
    pub field: String,
    /// The value left out (an address), empty when the field or object says it all.
    pub value: String,
    pub reason: IgnoredReason,
    /// What it means and, where the user can fix it, how: the end of the warning.
    pub detail: String,
}

impl fmt::Display for Ignored {
    /// `Service shop/web: spec.externalIPs[1]: 2001:db8::9 ignored (wrong-family): ...`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.object)?;
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        if self.value.is_empty() {
            write!(f, ": ignored ({}): {}", self.reason, self.detail)
        } else {
            write!(
                f,
                ": {} ignored ({}): {}",
                self.value, self.reason, self.detail
            )
        }
    }
}

/// Whether kube-proxy would never see this Service or EndpointSlice: its informers list
/// both kinds with the label selector `!service.kubernetes.io/service-proxy-name,
/// !service.kubernetes.io/headless` (cmd/kube-proxy/app/server.go, `Run`), whatever the
/// labels' values.
pub(super) fn excluded_by_labels(object: &ObjectRef, meta: &ObjectMeta) -> Option<Ignored> {
    let labels = meta.labels.as_ref()?;
    let (label, value, reason, detail) = if let Some(v) = labels.get(SERVICE_PROXY_NAME_LABEL) {
        (
            SERVICE_PROXY_NAME_LABEL,
            v,
            IgnoredReason::OtherProxy,
            "another proxy implements it (as kube-proxy, xdplb leaves it alone)",
        )
    } else if let Some(v) = labels.get(HEADLESS_LABEL) {
        (
            HEADLESS_LABEL,
            v,
            IgnoredReason::Headless,
            "a headless Service has no virtual IP to capture",
        )
    } else {
        return None;
    };
    Some(Ignored {
        object: object.clone(),
        field: format!("metadata.labels[{label}]"),
        value: value.clone(),
        reason,
        detail: detail.to_owned(),
    })
}
