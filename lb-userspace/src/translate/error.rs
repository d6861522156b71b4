//! Why an object, or part of one, cannot be used.

use super::ignored::Ignored;
use super::object::ObjectRef;

/// Why an object (or, for the warnings [`TranslateError::UnsupportedProtocol`] and
/// [`TranslateError::Ignored`], a part of it) cannot be used. Every variant names the
/// object and the field path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("{object}: {field}: required field is missing or empty")]
    Missing { object: ObjectRef, field: String },
    #[error("{object}: {field}: {value:?} is not an IP address")]
    BadIp {
        object: ObjectRef,
        field: String,
        value: String,
    },
    #[error("{object}: {field}: {value:?} is not an {expected} address (addressType)")]
    WrongFamily {
        object: ObjectRef,
        field: String,
        value: String,
        expected: &'static str,
    },
    #[error("{object}: {field}: port {value} is out of range (1-65535)")]
    PortOutOfRange {
        object: ObjectRef,
        field: String,
        value: i64,
    },
    #[error("{object}: {field}: port name {port_name:?} is also used by {first}")]
    DuplicatePortName {
        object: ObjectRef,
        field: String,
        port_name: String,
        /// Boxed to keep the error small (clippy::result_large_err).
        first: Box<str>,
    },
    #[error("{object}: {field}: port {port}/{protocol} is also declared by {first}")]
    DuplicatePort {
        object: ObjectRef,
        field: String,
        port: i32,
        protocol: &'static str,
        first: Box<str>,
    },
    #[error("{object}: {field}: unknown protocol {value:?} (expected TCP, UDP or SCTP)")]
    UnknownProtocol {
        object: ObjectRef,
        field: String,
        value: String,
    },
    /// A warning, not a rejection: the port is skipped, the rest of the service is used.
    #[error("{object}: {field}: protocol {protocol} is not supported, port skipped")]
    UnsupportedProtocol {
        object: ObjectRef,
        field: String,
        protocol: String,
    },
    #[error("{object}: {field}: unknown value {value:?} (expected one of {expected})")]
    UnknownValue {
        object: ObjectRef,
        field: String,
        value: String,
        expected: &'static str,
    },
    #[error("{object}: {field}: {reason}")]
    Invalid {
        object: ObjectRef,
        field: String,
        reason: String,
    },
    /// A warning, not a rejection: part of a valid object is left out, or all of it is
    /// (see [`Ignored`] for what and why). Boxed to keep the error small
    /// (clippy::result_large_err).
    #[error("{0}")]
    Ignored(Box<Ignored>),
}

impl TranslateError {
    /// The object the error is about.
    pub fn object(&self) -> &ObjectRef {
        match self {
            TranslateError::Missing { object, .. }
            | TranslateError::BadIp { object, .. }
            | TranslateError::WrongFamily { object, .. }
            | TranslateError::PortOutOfRange { object, .. }
            | TranslateError::DuplicatePortName { object, .. }
            | TranslateError::DuplicatePort { object, .. }
            | TranslateError::UnknownProtocol { object, .. }
            | TranslateError::UnsupportedProtocol { object, .. }
            | TranslateError::UnknownValue { object, .. }
            | TranslateError::Invalid { object, .. } => object,
            TranslateError::Ignored(ignored) => &ignored.object,
        }
    }

    /// The field path, e.g. `spec.ports[1].port`.
    pub fn field(&self) -> &str {
        match self {
            TranslateError::Missing { field, .. }
            | TranslateError::BadIp { field, .. }
            | TranslateError::WrongFamily { field, .. }
            | TranslateError::PortOutOfRange { field, .. }
            | TranslateError::DuplicatePortName { field, .. }
            | TranslateError::DuplicatePort { field, .. }
            | TranslateError::UnknownProtocol { field, .. }
            | TranslateError::UnsupportedProtocol { field, .. }
            | TranslateError::UnknownValue { field, .. }
            | TranslateError::Invalid { field, .. } => field,
            TranslateError::Ignored(ignored) => &ignored.field,
        }
    }

    /// True for problems that only skip part of an object (the object stays valid).
    pub fn is_warning(&self) -> bool {
        matches!(
            self,
            TranslateError::UnsupportedProtocol { .. } | TranslateError::Ignored(_)
        )
    }
}
