//! The Kubernetes source: Services, EndpointSlices (`discovery.k8s.io/v1`, all
//! namespaces) and this node's Node, watched through the API server with kube-rs, fed
//! into the same [`ObjectStore`] and `translate` as the file source.
//!
//! Semantics:
//! - One `kube_runtime::watcher` per kind, with the default backoff (client-go's:
//!   0.8 s doubling to 30 s, jittered). API errors and outages are retried for ever; the
//!   last state stays in force meanwhile. Each distinct error is logged once per outage,
//!   not once per retry.
//! - Nothing is sent before all three watchers have finished their initial list: a
//!   partial first state (services without their endpoints) would make the agent refuse
//!   connections to services that have endpoints.
//! - A list (the initial one, and every re-list after a `410 Gone` or a broken watch the
//!   watcher cannot resume) replaces every object of its kind: objects not listed are
//!   removed, so deletions missed while the watch was down are applied. The update after
//!   it has `resync: true`.
//! - An invalid object (a bad IP, say) is logged with the object and field; the previous
//!   valid version stays in force ([`ObjectStore::apply`]).
//! - Watches are re-opened every [`WATCH_TIMEOUT_S`] from their resourceVersion, and a
//!   connection silent for [`READ_TIMEOUT`] fails, so a silently dead connection (or a
//!   hanging API server) is noticed within about a minute.
//! - Events are coalesced while more are ready on the stream (at most
//!   [`COALESCE_MAX`]), then the changed services are translated again (see `Cache`)
//!   and the state is sent: a single event reaches the channel within about a
//!   millisecond. Events that change no service (a Node status update, an invalid
//!   version) send nothing. `Update::since` is when the oldest event not yet reflected
//!   in a translation arrived.
//!
//! The watchers' own reflector stores are not used: the [`ObjectStore`] is the cache, as
//! it has to hold the last *valid* version of every object, which a reflector store (the
//! API's latest version, valid or not) cannot.
//!
//! Layout: `client` (configuration, client and [`KubeError`]), `watch` (the watchers and
//! their merged event stream), `state` (what each event does to the store), `incremental`
//! (re-translating only the changed services); this page holds the source that drives
//! them.

mod client;
mod incremental;
mod state;
#[cfg(test)]
mod tests;
mod watch;

use std::time::{Duration, Instant};

use futures::stream;
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::watch as channel;

pub use client::{client, KubeError};

use super::{ObjectStore, Update};
use crate::model::NodeSettings;
use state::Core;
use watch::{kind_stream, node_object, service_object, slice_object, EventStream, Kind};

/// Longest a burst of ready events is collected before the store is translated: bounds
/// the latency of the first event of a burst (a re-list of thousands of objects, say).
pub const COALESCE_MAX: Duration = Duration::from_millis(5);

/// How long the API server keeps a watch open (`timeoutSeconds`) before the watcher
/// re-opens it from its last resourceVersion (no re-list). kube's client-side idle timeout
/// is this plus 5 s: a watch connection that died silently (a NAT or load balancer in
/// front of the API server dropped it, no FIN) is noticed within 65 s instead of kube's
/// default 295 s, for one extra watch request per kind per minute.
pub const WATCH_TIMEOUT_S: u32 = 60;

/// No byte for this long on a connection fails the request (then retried with backoff):
/// bounds a list or watch start that hangs, which nothing else would. Longer than
/// [`WATCH_TIMEOUT_S`], since a quiet watch legitimately sends nothing until then.
pub const READ_TIMEOUT: Duration = Duration::from_secs(75);

/// What the source reads from the API: (API group, resource) pairs, each with
/// [`API_VERBS`]. The deploy manifests' ClusterRole must grant exactly these.
pub const API_RESOURCES: &[(&str, &str)] = &[
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("", "nodes"),
];

/// The verbs granted on each of [`API_RESOURCES`]. The watchers use `list` and `watch`
/// only; `get` is kube-proxy's grant too (system:node-proxier) and lets an operator's
/// `kubectl auth can-i get` as the agent's account answer as expected.
pub const API_VERBS: &[&str] = &["get", "list", "watch"];

/// Services, EndpointSlices and Nodes from the Kubernetes API.
pub struct KubeSource {
    core: Core,
    events: EventStream,
    /// Arrival of the oldest event not yet reflected in a translation.
    since: Option<Instant>,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// Watches every Service and EndpointSlice, and the Node named `node.name` (every
    /// Node when there is no name). Nothing is requested before the first poll.
    pub fn new(client: Client, node: NodeSettings) -> Self {
        let config = watcher::Config::default().timeout(WATCH_TIMEOUT_S);
        let node_config = match &node.name {
            Some(name) => config.clone().fields(&format!("metadata.name={name}")),
            None => config.clone(),
        };
        let events = stream::select_all([
            kind_stream(
                Kind::Services,
                Api::<Service>::all(client.clone()),
                config.clone(),
                service_object,
            ),
            kind_stream(
                Kind::EndpointSlices,
                Api::<EndpointSlice>::all(client.clone()),
                config,
                slice_object,
            ),
            kind_stream(
                Kind::Nodes,
                Api::<Node>::all(client),
                node_config,
                node_object,
            ),
        ]);
        Self {
            core: Core::new(node),
            events: Box::pin(events),
            since: None,
        }
    }

    /// Waits until every kind is listed and returns the first state (a resync). Retries
    /// API errors with backoff until `timeout`, then fails naming the kinds still missing
    /// and the last error.
    pub async fn initial_sync(&mut self, timeout: Duration) -> Result<Update, KubeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(update) = self.next_update() {
                return Ok(update);
            }
            match tokio::time::timeout_at(deadline, self.events.next()).await {
                Ok(Some((kind, item))) => {
                    if item.is_ok() {
                        self.since.get_or_insert_with(Instant::now);
                    }
                    self.core.handle(kind, item);
                    self.drain();
                }
                Ok(None) => return Err(KubeError::StreamsEnded),
                Err(_) => {
                    return Err(KubeError::InitialSync {
                        timeout,
                        waiting: self.core.waiting(),
                        last_error: self.core.last_error.clone(),
                    })
                }
            }
        }
    }

    /// Sends a state after the initial lists (unless [`KubeSource::initial_sync`] has
    /// returned it) and after every change, until every receiver is dropped. API errors
    /// are retried for ever; only the streams ending (not expected) is an error.
    pub async fn run(mut self, tx: channel::Sender<Update>) -> Result<(), KubeError> {
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return Ok(()),
                next = self.events.next() => next,
            };
            let Some((kind, item)) = next else {
                return Err(KubeError::StreamsEnded);
            };
            if item.is_ok() {
                self.since.get_or_insert_with(Instant::now);
            }
            self.core.handle(kind, item);
            self.drain();
            if let Some(update) = self.next_update() {
                tx.send_replace(update);
            }
        }
    }

    /// Handles the events already available, for at most [`COALESCE_MAX`].
    fn drain(&mut self) {
        let start = Instant::now();
        while start.elapsed() < COALESCE_MAX {
            match self.events.next().now_or_never() {
                Some(Some((kind, item))) => self.core.handle(kind, item),
                // An ended stream is reported by the next await.
                Some(None) | None => break,
            }
        }
    }

    /// Translates if due; an update when the state changed, a list completed, or nothing
    /// was sent yet.
    fn next_update(&mut self) -> Option<Update> {
        let Some((state, resync)) = self.core.take_state() else {
            if self.core.synced() {
                // Events that changed nothing in the store are done with.
                self.since = None;
            }
            return None;
        };
        let since = self.since.take().unwrap_or_else(Instant::now);
        Some(Update {
            state,
            since,
            resync,
        })
    }

    /// The object store (for inspection and tests).
    pub fn store(&self) -> &ObjectStore {
        self.core.store()
    }
}
