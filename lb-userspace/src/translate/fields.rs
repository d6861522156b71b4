//! Reading single API field values, shared by the Service, EndpointSlice and Node
//! validators so that they agree on what a protocol, a port or an address is.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;

use super::error::TranslateError;
use super::object::ObjectRef;
use crate::model::Protocol;

/// A protocol as the API spells it. SCTP is valid Kubernetes but not handled here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ApiProtocol {
    Supported(Protocol),
    Sctp,
}

impl ApiProtocol {
    pub(super) fn name(self) -> &'static str {
        match self {
            ApiProtocol::Supported(Protocol::Tcp) => "TCP",
            ApiProtocol::Supported(Protocol::Udp) => "UDP",
            ApiProtocol::Sctp => "SCTP",
        }
    }
}

/// Parses a `protocol` field; absent means TCP (the API default).
pub(super) fn parse_protocol(p: Option<&str>) -> Option<ApiProtocol> {
    match p {
        None | Some("TCP") => Some(ApiProtocol::Supported(Protocol::Tcp)),
        Some("UDP") => Some(ApiProtocol::Supported(Protocol::Udp)),
        Some("SCTP") => Some(ApiProtocol::Sctp),
        Some(_) => None,
    }
}

/// Whether a port number fits a TCP/UDP port (0 is "none" in the API, not a port).
pub(super) fn port_in_range(p: i32) -> bool {
    (1..=65_535).contains(&p)
}

/// Parses an address field, or names the field and value in the error.
pub(super) fn check_ip(
    object: &ObjectRef,
    field: String,
    value: &str,
) -> Result<IpAddr, TranslateError> {
    value.parse::<IpAddr>().map_err(|_| TranslateError::BadIp {
        object: object.clone(),
        field,
        value: value.to_owned(),
    })
}

/// The service type, defaulting to ClusterIP.
pub(super) fn service_type(svc: &Service) -> &str {
    svc.spec
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("ClusterIP")
}
