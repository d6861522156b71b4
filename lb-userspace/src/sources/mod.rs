//! Where the desired state comes from. Every source (the manifest files, the Kubernetes
//! API) keeps the last valid version of each Service, EndpointSlice and Node in an
//! [`ObjectStore`] (the file source decodes them with [`decode`]) and turns the store
//! into a `DesiredState` through `translate`, for the node described by a
//! `NodeSettings`, so both read objects the same way.
//!
//! Layout: `decode` (manifests to objects), `store` ([`Object`], [`ObjectStore`]), and
//! the two sources, `file` and `kube`, each a directory whose page says how it follows
//! its origin.

pub mod file;
pub mod kube;

mod decode;
mod store;
#[cfg(test)]
mod tests;

pub use decode::{decode, DecodeError, Decoded, Located};
pub use store::{Object, ObjectStore};

use crate::model::DesiredState;

/// What a source sends the agent after every change: the whole desired state.
#[derive(Clone, Debug)]
pub struct Update {
    pub state: DesiredState,
    /// When the source received the oldest event this state reflects and the previous
    /// update did not: the start of the "event to maps" latency.
    pub since: std::time::Instant,
    /// The state follows a full (re)list: the agent counts a resync.
    pub resync: bool,
}

impl Update {
    pub fn new(state: DesiredState, resync: bool) -> Self {
        Self {
            state,
            since: std::time::Instant::now(),
            resync,
        }
    }
}
