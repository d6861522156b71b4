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

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::stream::{self, BoxStream, Stream};
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{Node, NodeStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::utils::StreamBackoff;
use kube::runtime::watcher::{self, watcher, Event};
use kube::{Api, Client};
use tokio::sync::watch;

use super::{Object, ObjectStore, Update};
use crate::error_chain;
use crate::model::{DesiredState, NodeSettings, ServicePortId};
use crate::translate::{
    self, FrontendConflict, NodeInfo, ObjectKind, ObjectRef, TranslateError, Translation,
    SERVICE_NAME_LABEL,
};

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

/// The causes are kept as text (their whole chain, without the repetitions kube's
/// errors have), so that a `{:#}` chain prints each cause once.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    #[error("no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster): {0}")]
    Infer(String),
    #[error("creating the Kubernetes client: {0}")]
    Client(String),
    #[error(
        "the API server did not complete the initial list of {waiting} within {timeout:?}{}",
        last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )]
    InitialSync {
        timeout: Duration,
        /// The kinds still not listed, e.g. `EndpointSlices, Nodes`.
        waiting: String,
        last_error: Option<String>,
    },
    #[error("the watch streams ended")]
    StreamsEnded,
}

/// A client from `kubeconfig`, or without it from kube's inference (`KUBECONFIG`,
/// `~/.kube/config`, then the in-cluster service account), as kubectl and kube-proxy do.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let shown = path.display().to_string();
            let bad = |e: kube::config::KubeconfigError| KubeError::Kubeconfig {
                path: shown.clone(),
                reason: error_chain(&e),
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(bad)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(bad)?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Infer(error_chain(&e)))?,
    };
    let mut config = config;
    config.read_timeout = Some(READ_TIMEOUT);
    // Count from the request, not from when a pooled connection went idle.
    config.reset_reader_on_write = true;
    Client::try_from(config).map_err(|e| KubeError::Client(error_chain(&e)))
}

/// The three watched kinds, as an index into per-kind state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Services = 0,
    EndpointSlices = 1,
    Nodes = 2,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Services, Kind::EndpointSlices, Kind::Nodes];

    fn object_kind(self) -> ObjectKind {
        match self {
            Kind::Services => ObjectKind::Service,
            Kind::EndpointSlices => ObjectKind::EndpointSlice,
            Kind::Nodes => ObjectKind::Node,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Services => "Services",
            Kind::EndpointSlices => "EndpointSlices",
            Kind::Nodes => "Nodes",
        }
    }
}

/// One watcher event of any kind, converted to the store's object type.
#[derive(Debug)]
enum KindEvent {
    /// The API server answered a watch with 410 Gone: the watcher lists again.
    Expired,
    Init,
    InitApply(Object),
    InitDone,
    Apply(Object),
    Delete(Object),
}

fn convert<K>(ev: Event<K>, f: impl Fn(K) -> Object) -> KindEvent {
    match ev {
        Event::Init => KindEvent::Init,
        Event::InitApply(k) => KindEvent::InitApply(f(k)),
        Event::InitDone => KindEvent::InitDone,
        Event::Apply(k) => KindEvent::Apply(f(k)),
        Event::Delete(k) => KindEvent::Delete(f(k)),
    }
}

fn service_object(mut s: Service) -> Object {
    // managedFields are often larger than the object and never read.
    s.metadata.managed_fields = None;
    Object::Service(Box::new(s))
}

fn slice_object(mut s: EndpointSlice) -> Object {
    s.metadata.managed_fields = None;
    Object::EndpointSlice(Box::new(s))
}

/// Keeps only what translation reads (name, addresses). The kubelet rewrites its Node's
/// status (conditions, images) on its own schedule; with those fields and the
/// resourceVersion gone, such an update compares equal to the stored Node and costs no
/// translation.
fn node_object(n: Node) -> Object {
    let mut metadata = n.metadata;
    metadata.managed_fields = None;
    metadata.resource_version = None;
    metadata.generation = None;
    metadata.annotations = None;
    let status = n.status.map(|s| NodeStatus {
        addresses: s.addresses,
        ..NodeStatus::default()
    });
    Object::Node(Box::new(Node {
        metadata,
        spec: None,
        status,
    }))
}

type EventStream = Pin<Box<dyn Stream<Item = (Kind, Result<KindEvent, watcher::Error>)> + Send>>;

fn kind_stream<K>(
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    f: fn(K) -> Object,
) -> BoxStream<'static, (Kind, Result<KindEvent, watcher::Error>)>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let events = watcher(api, config).map(move |r| match r {
        // 410 Gone is the API server's way of saying "list again", not a failure: the
        // watcher has already reset itself and its next item starts the re-list. Passed
        // through the backoff as an error it would wait one more (already grown) backoff
        // step first (seen: 8-10 s after an outage); client-go re-lists at once.
        Err(watcher::Error::WatchError(status)) if status.code == 410 => Ok(KindEvent::Expired),
        r => r.map(|ev| convert(ev, f)),
    });
    StreamBackoff::new(events, watcher::DefaultBackoff::default())
        .map(move |r| (kind, r))
        .boxed()
}

/// The event-handling core: pure (no I/O), so it is unit-tested with synthetic events.
#[derive(Debug)]
struct Core {
    node: NodeSettings,
    store: ObjectStore,
    /// Objects of a list in progress, per kind (between `Init` and `InitDone`).
    listing: [Option<Vec<Object>>; 3],
    /// The kind has completed a list.
    synced: [bool; 3],
    /// The store changed since the last translation.
    dirty: bool,
    /// A list completed since the last update: the next update is a resync.
    resync: bool,
    /// Invalid objects and the error last logged for each (logged again only if it
    /// changes; forgotten once the object is valid or deleted).
    invalid: BTreeMap<ObjectRef, String>,
    /// Warnings about valid objects (parts skipped) last logged, per object.
    object_warnings: BTreeMap<ObjectRef, Vec<String>>,
    /// Frontend conflicts as of the last translation.
    conflicts: BTreeSet<String>,
    /// Per kind: errors logged during the current outage.
    errors: [BTreeSet<String>; 3],
    /// The most recent error of any kind, for the initial-sync timeout message.
    last_error: Option<String>,
    cache: Cache,
}

impl Core {
    fn new(node: NodeSettings) -> Self {
        Self {
            node,
            store: ObjectStore::new(),
            listing: [None, None, None],
            synced: [false; 3],
            dirty: false,
            resync: false,
            invalid: BTreeMap::new(),
            object_warnings: BTreeMap::new(),
            conflicts: BTreeSet::new(),
            errors: Default::default(),
            last_error: None,
            cache: Cache::default(),
        }
    }

    /// `ObjectStore::apply`, telling the cache which services it touched.
    fn store_apply(&mut self, obj: Object) -> Result<Vec<TranslateError>, TranslateError> {
        let key = obj.key();
        let before = self.store.get(&key).and_then(Cache::service_of);
        let after = Cache::service_of(&obj);
        let result = self.store.apply(obj);
        if result.is_ok() {
            self.cache.touched(&key, before, after);
        }
        result
    }

    /// `ObjectStore::remove`, telling the cache which service it touched.
    fn store_remove(&mut self, key: &ObjectRef) -> Option<Object> {
        let removed = self.store.remove(key);
        if let Some(obj) = &removed {
            self.cache.touched(key, Cache::service_of(obj), None);
        }
        removed
    }

    /// Every kind has completed its initial list.
    fn synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }

    /// The kinds whose initial list has not completed, for messages.
    fn waiting(&self) -> String {
        Kind::ALL
            .iter()
            .filter(|k| !self.synced[**k as usize])
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn store(&self) -> &ObjectStore {
        &self.store
    }

    /// Applies one watcher item.
    fn handle(&mut self, kind: Kind, item: Result<KindEvent, watcher::Error>) {
        match item {
            Ok(ev) => {
                // `Init` comes before the list request, so it proves nothing.
                if !matches!(ev, KindEvent::Init | KindEvent::Expired)
                    && !self.errors[kind as usize].is_empty()
                {
                    self.errors[kind as usize].clear();
                    tracing::info!(kind = kind.name(), "API server answering again");
                }
                self.event(kind, ev);
            }
            Err(e) => self.error(kind, &e),
        }
    }

    fn error(&mut self, kind: Kind, e: &watcher::Error) {
        let msg = error_chain(e);
        self.last_error = Some(format!("{}: {msg}", kind.name()));
        if !self.errors[kind as usize].insert(msg.clone()) {
            return;
        }
        if let watcher::Error::WatchError(status) = e {
            if status.code == 410 {
                // The API server's history no longer reaches back to where the watch
                // was: the watcher lists again, which is routine.
                tracing::info!(
                    kind = kind.name(),
                    "watch expired (410 Gone), listing again"
                );
                return;
            }
        }
        let kept = if self.synced() {
            ", the last state stays in force"
        } else {
            ""
        };
        tracing::warn!(kind = kind.name(), "{msg}; retrying with backoff{kept}");
    }

    /// Applies one event to the store.
    fn event(&mut self, kind: Kind, ev: KindEvent) {
        let k = kind as usize;
        match ev {
            KindEvent::Expired => {
                tracing::info!(
                    kind = kind.name(),
                    "watch expired (410 Gone), listing again"
                );
            }
            KindEvent::Init => self.listing[k] = Some(Vec::new()),
            KindEvent::InitApply(obj) => match self.listing[k].as_mut() {
                Some(buf) => buf.push(obj),
                // The watcher always starts a list with Init; be lenient anyway.
                None => self.apply(obj),
            },
            KindEvent::InitDone => {
                let listed = self.listing[k].take().unwrap_or_default();
                self.replace_kind(kind, listed);
                if !self.synced[k] {
                    tracing::info!(kind = kind.name(), "initial list complete");
                }
                self.synced[k] = true;
                self.resync = true;
                self.dirty = true;
            }
            KindEvent::Apply(obj) => self.apply(obj),
            KindEvent::Delete(obj) => {
                let key = obj.key();
                self.invalid.remove(&key);
                self.object_warnings.remove(&key);
                if self.store_remove(&key).is_some() {
                    self.dirty = true;
                }
            }
        }
    }

    /// Makes the store's objects of `kind` exactly `listed` (keeping the previous valid
    /// version of a listed object that is now invalid).
    fn replace_kind(&mut self, kind: Kind, listed: Vec<Object>) {
        let keys: BTreeSet<ObjectRef> = listed.iter().map(Object::key).collect();
        let stale: Vec<ObjectRef> = self
            .store
            .keys()
            .filter(|key| key.kind == kind.object_kind() && !keys.contains(*key))
            .cloned()
            .collect();
        for key in stale {
            tracing::debug!("{key}: gone from the list, removed");
            self.invalid.remove(&key);
            self.object_warnings.remove(&key);
            self.store_remove(&key);
        }
        self.invalid
            .retain(|key, _| key.kind != kind.object_kind() || keys.contains(key));
        for obj in listed {
            self.apply(obj);
        }
    }

    fn apply(&mut self, obj: Object) {
        let key = obj.key();
        if self.store.get(&key) == Some(&obj) {
            return;
        }
        match self.store_apply(obj) {
            Ok(warnings) => {
                let warnings: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
                let before = self.object_warnings.get(&key).map(Vec::as_slice);
                for w in &warnings {
                    if !before.is_some_and(|b| b.contains(w)) {
                        tracing::warn!("{w}");
                    }
                }
                if warnings.is_empty() {
                    self.object_warnings.remove(&key);
                } else {
                    self.object_warnings.insert(key.clone(), warnings);
                }
                if self.invalid.remove(&key).is_some() {
                    tracing::info!("{key}: valid again");
                }
                self.dirty = true;
            }
            Err(e) => {
                let msg = e.to_string();
                if self.invalid.get(&key) != Some(&msg) {
                    let kept = if self.store.get(&key).is_some() {
                        "the previous version stays in force"
                    } else {
                        "ignored"
                    };
                    tracing::warn!("invalid object: {msg}; {kept}");
                    self.invalid.insert(key, msg);
                }
            }
        }
    }

    /// When the state changed (or a list completed, or nothing was returned yet): the new
    /// state and whether it follows a list. Clears the flags.
    fn take_state(&mut self) -> Option<(DesiredState, bool)> {
        if !self.synced() || !(self.dirty || self.resync) {
            return None;
        }
        let (translation, changed) = self.cache.translate(&self.store, &self.node);
        let conflicts: BTreeSet<String> = translation
            .conflicts
            .iter()
            .map(|c| c.to_string())
            .collect();
        for c in conflicts.difference(&self.conflicts) {
            tracing::warn!("{c}");
        }
        self.conflicts = conflicts;
        let resync = self.resync;
        self.dirty = false;
        self.resync = false;
        // A status-only update, say, changes no service.
        (changed || resync).then_some((translation.state, resync))
    }
}

/// A service by (namespace, name).
type ServiceKey = (String, String);

/// What SERVICES keys a frontend by: (address, port, protocol).
type FrontendKey = (std::net::IpAddr, u16, crate::model::Protocol);

/// Incremental translation. Translating the whole store costs 3-7 us per service
/// (release build: 3.4 ms for 1,000 services, 66 ms for 10,000; 14 ms and 150 ms on the
/// same 2-CPU machine under load), paid after every event; re-translating the changed
/// services costs 0.35 ms at 1,000 and 6.6 ms at 10,000, mostly copying the state out
/// (`translation_cost` test).
/// A service's state depends only on the Service, its EndpointSlices and the node's
/// addresses, so only services whose objects changed are translated again (by
/// `translate_with_conflicts` on that one service: the same code as a full translation)
/// and merged into the previous state. The exception is a frontend claimed by two
/// service ports, which `translate` resolves across services: while any exists, the
/// whole store is translated.
#[derive(Debug, Default)]
struct Cache {
    /// Every service was translated since the last rebuild request.
    valid: bool,
    node: Option<NodeInfo>,
    /// The node's addresses may have changed.
    node_dirty: bool,
    /// Services whose Service or slices changed since the last translation.
    dirty: BTreeSet<ServiceKey>,
    /// Slices by the service they belong to (`kubernetes.io/service-name`).
    slices: BTreeMap<ServiceKey, BTreeSet<ObjectRef>>,
    /// The service ports each service translated to.
    ports: BTreeMap<ServiceKey, Vec<ServicePortId>>,
    /// Every service's translation, conflicts unresolved.
    merged: DesiredState,
    /// Service ports claiming each frontend, and how many frontends have more than one.
    claims: std::collections::HashMap<FrontendKey, u32>,
    contested: usize,
}

impl Cache {
    /// The service an object belongs to: itself for a Service, its label for a slice.
    fn service_of(obj: &Object) -> Option<ServiceKey> {
        match obj {
            Object::Service(s) => {
                let key = ObjectRef::new(ObjectKind::Service, &s.metadata);
                Some((key.namespace, key.name))
            }
            Object::EndpointSlice(s) => {
                let key = ObjectRef::new(ObjectKind::EndpointSlice, &s.metadata);
                let name = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
                Some((key.namespace, name.clone()))
            }
            Object::Node(_) => None,
        }
    }

    /// Records that the object `key` changed from belonging to `before` to `after`.
    fn touched(&mut self, key: &ObjectRef, before: Option<ServiceKey>, after: Option<ServiceKey>) {
        match key.kind {
            ObjectKind::Node => self.node_dirty = true,
            ObjectKind::Service => {
                self.dirty.extend(before);
                self.dirty.extend(after);
            }
            ObjectKind::EndpointSlice => {
                if let Some(svc) = before {
                    if let Some(set) = self.slices.get_mut(&svc) {
                        set.remove(key);
                        if set.is_empty() {
                            self.slices.remove(&svc);
                        }
                    }
                    self.dirty.insert(svc);
                }
                if let Some(svc) = after {
                    self.slices
                        .entry(svc.clone())
                        .or_default()
                        .insert(key.clone());
                    self.dirty.insert(svc);
                }
            }
        }
    }

    fn claim(&mut self, st: &crate::model::ServicePortState, add: bool) {
        for f in &st.frontends {
            let key = (f.addr, f.port, f.protocol);
            let n = self.claims.entry(key).or_insert(0);
            let was_contested = *n > 1;
            if add {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
            }
            match (was_contested, *n > 1) {
                (false, true) => self.contested += 1,
                (true, false) => self.contested -= 1,
                _ => {}
            }
            if *n == 0 {
                self.claims.remove(&key);
            }
        }
    }

    /// The store's translation, re-translating only what changed, and whether it differs
    /// from the previous one (always true for the first).
    fn translate(&mut self, store: &ObjectStore, settings: &NodeSettings) -> (Translation, bool) {
        let mut changed = !self.valid;
        if self.node_dirty || self.node.is_none() {
            let info = store.node_info(settings);
            if self.node.as_ref() != Some(&info) {
                self.node = Some(info);
                self.valid = false;
                changed = true;
            }
            self.node_dirty = false;
        }
        let node = self.node.clone().unwrap_or_default();
        let dirty: Vec<ServiceKey> = if self.valid {
            std::mem::take(&mut self.dirty).into_iter().collect()
        } else {
            self.dirty.clear();
            self.ports.clear();
            self.merged = DesiredState::default();
            self.claims.clear();
            self.contested = 0;
            self.valid = true;
            store
                .keys()
                .filter(|k| k.kind == ObjectKind::Service)
                .map(|k| (k.namespace.clone(), k.name.clone()))
                .collect()
        };
        let mut conflicts: Vec<FrontendConflict> = Vec::new();
        for key in dirty {
            let mut old = Vec::new();
            for id in self.ports.remove(&key).unwrap_or_default() {
                if let Some(st) = self.merged.services.remove(&id) {
                    self.claim(&st, false);
                    old.push((id, st));
                }
            }
            let svc_ref = ObjectRef {
                kind: ObjectKind::Service,
                namespace: key.0.clone(),
                name: key.1.clone(),
            };
            let Some(Object::Service(svc)) = store.get(&svc_ref) else {
                changed |= !old.is_empty();
                continue;
            };
            let slices =
                self.slices
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .filter_map(|k| match store.get(k) {
                        Some(Object::EndpointSlice(s)) => Some(s.as_ref()),
                        _ => None,
                    });
            let t =
                translate::translate_with_conflicts(std::iter::once(svc.as_ref()), slices, &node);
            // Within one service (two ports on one frontend): resolved by translate.
            conflicts.extend(t.conflicts);
            // Both in ServicePortId order (BTreeMap).
            changed |= !t
                .state
                .services
                .iter()
                .eq(old.iter().map(|(id, st)| (id, st)));
            let mut ids = Vec::with_capacity(t.state.services.len());
            for (id, st) in t.state.services {
                self.claim(&st, true);
                ids.push(id.clone());
                self.merged.services.insert(id, st);
            }
            self.ports.insert(key, ids);
        }
        if self.contested > 0 {
            // The resolution may move a frontend between services that did not change.
            return (store.translate(settings), true);
        }
        let t = Translation {
            state: self.merged.clone(),
            conflicts,
        };
        (t, changed)
    }
}

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
    pub async fn run(mut self, tx: watch::Sender<Update>) -> Result<(), KubeError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServicePortId;

    fn svc(name: &str, ip: &str) -> Object {
        let v = serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "1",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                                "targetPort": 8080}]}
        });
        service_object(serde_json::from_value(v).expect("test Service decodes"))
    }

    fn eps(service: &str, addr: &str) -> Object {
        let v = serde_json::json!({
            "metadata": {"name": format!("{service}-1"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [addr], "conditions": {"ready": true},
                           "nodeName": "node-a"}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        });
        slice_object(serde_json::from_value(v).expect("test EndpointSlice decodes"))
    }

    fn node(name: &str, addr: &str, heartbeat: &str) -> Object {
        let v = serde_json::json!({
            "metadata": {"name": name, "resourceVersion": heartbeat},
            "status": {"addresses": [{"type": "InternalIP", "address": addr}],
                       "conditions": [{"type": "Ready", "status": "True",
                                       "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                                       "reason": heartbeat}]}
        });
        node_object(serde_json::from_value(v).expect("test Node decodes"))
    }

    fn id(name: &str) -> ServicePortId {
        ServicePortId::new("default", name, "http", crate::model::Protocol::Tcp)
    }

    fn list(core: &mut Core, kind: Kind, objs: Vec<Object>) {
        core.event(kind, KindEvent::Init);
        for o in objs {
            core.event(kind, KindEvent::InitApply(o));
        }
        core.event(kind, KindEvent::InitDone);
    }

    fn synced_core() -> Core {
        let mut core = Core::new(NodeSettings {
            name: Some("node-a".into()),
            extra_addresses: Vec::new(),
        });
        list(
            &mut core,
            Kind::Services,
            vec![svc("a", "198.18.100.1"), svc("b", "198.18.100.2")],
        );
        list(
            &mut core,
            Kind::EndpointSlices,
            vec![eps("a", "198.18.1.1"), eps("b", "198.18.1.2")],
        );
        list(
            &mut core,
            Kind::Nodes,
            vec![node("node-a", "198.18.0.1", "1")],
        );
        core
    }

    #[test]
    fn first_state_only_after_every_kind_is_listed() {
        let mut core = Core::new(NodeSettings::default());
        list(&mut core, Kind::Services, vec![svc("a", "198.18.100.1")]);
        assert!(core.take_state().is_none(), "only Services listed");
        list(
            &mut core,
            Kind::EndpointSlices,
            vec![eps("a", "198.18.1.1")],
        );
        assert!(core.take_state().is_none(), "Nodes not listed yet");
        assert_eq!(core.waiting(), "Nodes");
        list(&mut core, Kind::Nodes, vec![]);
        let (state, resync) = core.take_state().expect("all listed");
        assert!(resync, "the first state follows the lists");
        let port = state.services.get(&id("a")).expect("service a translated");
        assert_eq!(port.endpoints.len(), 1, "{port:?}");
        assert!(core.take_state().is_none(), "nothing changed since");
    }

    #[test]
    fn relist_removes_what_was_not_listed_and_only_of_its_kind() {
        let mut core = synced_core();
        core.take_state().expect("initial state");
        // A re-list after 410 Gone: b was deleted while the watch was down.
        list(&mut core, Kind::Services, vec![svc("a", "198.18.100.1")]);
        let (state, resync) = core.take_state().expect("a list completed");
        assert!(resync);
        assert!(state.services.contains_key(&id("a")));
        assert!(!state.services.contains_key(&id("b")), "{state:?}");
        // Slices are another kind's list: b's slice is still in the store.
        assert_eq!(
            core.store()
                .keys()
                .filter(|k| k.kind == ObjectKind::EndpointSlice)
                .count(),
            2
        );
        // A re-list that changes nothing still yields a (resync) update.
        list(&mut core, Kind::Services, vec![svc("a", "198.18.100.1")]);
        let (again, resync) = core.take_state().expect("a list completed");
        assert!(resync);
        assert_eq!(again, state);
    }

    #[test]
    fn apply_delete_and_invalid_versions() {
        let mut core = synced_core();
        core.take_state().expect("initial state");
        core.event(Kind::Services, KindEvent::Apply(svc("c", "198.18.100.3")));
        let (state, resync) = core.take_state().expect("c added");
        assert!(!resync, "a watch event is not a resync");
        assert!(state.services.contains_key(&id("c")));

        // An invalid version keeps the previous one in force, also through a re-list.
        core.event(Kind::Services, KindEvent::Apply(svc("c", "not-an-ip")));
        assert!(core.take_state().is_none(), "nothing valid changed");
        assert!(core.invalid.keys().any(|k| k.name == "c"));
        list(
            &mut core,
            Kind::Services,
            vec![
                svc("a", "198.18.100.1"),
                svc("b", "198.18.100.2"),
                svc("c", "not-an-ip"),
            ],
        );
        let (state, _) = core.take_state().expect("list completed");
        let c = state.services.get(&id("c")).expect("previous c kept");
        assert_eq!(
            c.frontends[0].addr,
            "198.18.100.3".parse::<std::net::IpAddr>().expect("ip")
        );

        core.event(Kind::Services, KindEvent::Delete(svc("c", "not-an-ip")));
        let (state, _) = core.take_state().expect("c deleted");
        assert!(!state.services.contains_key(&id("c")));
        assert!(core.invalid.is_empty());
    }

    #[test]
    fn node_heartbeats_change_nothing() {
        let mut core = synced_core();
        core.take_state().expect("initial state");
        core.event(
            Kind::Nodes,
            KindEvent::Apply(node("node-a", "198.18.0.1", "2")),
        );
        assert!(core.take_state().is_none(), "status-only Node update");
        core.event(
            Kind::Nodes,
            KindEvent::Apply(node("node-a", "198.18.0.9", "3")),
        );
        assert!(
            core.take_state().is_some(),
            "a new node address is a change"
        );
    }

    #[test]
    fn updates_that_change_no_service_send_nothing() {
        let mut core = synced_core();
        core.take_state().expect("initial state");
        // A new resourceVersion and an annotation: a new object, the same service.
        let a2 = object(serde_json::json!({"kind": "Service",
            "metadata": {"name": "a", "namespace": "default", "resourceVersion": "7",
                         "annotations": {"touched-by": "kubectl"}},
            "spec": {"type": "ClusterIP", "clusterIP": "198.18.100.1",
                     "clusterIPs": ["198.18.100.1"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                                "targetPort": 8080}]}}));
        core.event(Kind::Services, KindEvent::Apply(a2));
        assert!(core.dirty, "the store changed");
        assert!(core.take_state().is_none(), "no service changed");
        // A re-list is still reported, changed or not (the agent counts resyncs).
        list(
            &mut core,
            Kind::Nodes,
            vec![node("node-a", "198.18.0.1", "9")],
        );
        assert!(matches!(core.take_state(), Some((_, true))));
    }

    #[test]
    fn managed_fields_are_dropped() {
        let Object::Service(s) = svc("a", "198.18.100.1") else {
            panic!("a Service");
        };
        assert!(s.metadata.managed_fields.is_none());
    }

    #[test]
    fn errors_are_logged_once_per_outage() {
        let mut core = synced_core();
        let err = || {
            watcher::Error::WatchError(Box::new(kube::core::Status {
                code: 500,
                message: "etcd unavailable".into(),
                ..Default::default()
            }))
        };
        core.handle(Kind::Services, Err(err()));
        core.handle(Kind::Services, Err(err()));
        assert_eq!(core.errors[Kind::Services as usize].len(), 1);
        assert!(core
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("etcd unavailable")));
        core.handle(
            Kind::Services,
            Ok(KindEvent::Apply(svc("a", "198.18.100.1"))),
        );
        assert!(core.errors[Kind::Services as usize].is_empty(), "recovered");
    }

    fn object(v: serde_json::Value) -> Object {
        match v["kind"].as_str() {
            Some("Service") => service_object(serde_json::from_value(v).expect("Service")),
            Some("EndpointSlice") => slice_object(serde_json::from_value(v).expect("slice")),
            _ => node_object(serde_json::from_value(v).expect("Node")),
        }
    }

    /// After every step the incremental result must be what translating the whole store
    /// gives.
    #[test]
    fn incremental_translation_equals_full() {
        let mut core = synced_core();
        let step = |core: &mut Core, what: &str, ev: Option<(Kind, KindEvent)>| {
            if let Some((kind, ev)) = ev {
                core.event(kind, ev);
            }
            let (state, _) = core
                .take_state()
                .unwrap_or_else(|| panic!("{what} changed nothing"));
            assert_eq!(
                state,
                core.store().translate(&core.node).state,
                "after {what}"
            );
            state
        };
        step(&mut core, "the initial lists", None);
        let np = object(serde_json::json!({"kind": "Service",
            "metadata": {"name": "np", "namespace": "default"},
            "spec": {"type": "NodePort", "clusterIP": "198.18.100.9", "ipFamilies": ["IPv4"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                                "nodePort": 30080}]}}));
        step(
            &mut core,
            "a NodePort service",
            Some((Kind::Services, KindEvent::Apply(np))),
        );
        let st = step(
            &mut core,
            "a new node address",
            Some((
                Kind::Nodes,
                KindEvent::Apply(node("node-a", "198.18.0.7", "5")),
            )),
        );
        assert!(st.services[&id("np")]
            .frontends
            .iter()
            .any(|f| f.addr.to_string() == "198.18.0.7"));
        // The slice of a moves to b (same slice, new service-name label).
        let moved = object(serde_json::json!({"kind": "EndpointSlice",
            "metadata": {"name": "a-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "b"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["198.18.1.7"], "conditions": {"ready": true}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}));
        let st = step(
            &mut core,
            "a slice relabelled",
            Some((Kind::EndpointSlices, KindEvent::Apply(moved))),
        );
        assert!(st.services[&id("a")].endpoints.is_empty());
        assert_eq!(st.services[&id("b")].endpoints.len(), 2);
        // d claims b's ClusterIP as an externalIP: resolved across services.
        let d = object(serde_json::json!({"kind": "Service",
            "metadata": {"name": "d", "namespace": "default"},
            "spec": {"clusterIP": "198.18.100.4", "externalIPs": ["198.18.100.2"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}));
        let st = step(
            &mut core,
            "a conflict",
            Some((Kind::Services, KindEvent::Apply(d.clone()))),
        );
        assert_eq!(
            st.services[&id("d")].frontends.len(),
            1,
            "d lost the contested IP"
        );
        assert_eq!(core.cache.contested, 1);
        step(
            &mut core,
            "an event while contested",
            Some((
                Kind::EndpointSlices,
                KindEvent::Apply(eps("d", "198.18.1.4")),
            )),
        );
        step(
            &mut core,
            "the conflict gone",
            Some((Kind::Services, KindEvent::Delete(d))),
        );
        assert_eq!(core.cache.contested, 0);
        step(
            &mut core,
            "a service deleted",
            Some((Kind::Services, KindEvent::Delete(svc("a", "198.18.100.1")))),
        );
        list(
            &mut core,
            Kind::EndpointSlices,
            vec![eps("b", "198.18.1.2")],
        );
        step(&mut core, "a re-list of slices", None);
        step(
            &mut core,
            "the node deleted",
            Some((
                Kind::Nodes,
                KindEvent::Delete(node("node-a", "198.18.0.7", "6")),
            )),
        );
    }

    /// What translating costs per update: the first (everything) and after one slice
    /// changed (run with `--release --nocapture` for the figures in the report).
    #[test]
    fn translation_cost() {
        for n in [1_000usize, 10_000] {
            let mut core = Core::new(NodeSettings {
                name: Some("node-a".into()),
                extra_addresses: Vec::new(),
            });
            let services = (0..n)
                .map(|i| {
                    svc(
                        &format!("s{i}"),
                        &format!("198.18.{}.{}", 100 + i / 250, i % 250),
                    )
                })
                .collect();
            let slices = (0..n)
                .map(|i| eps(&format!("s{i}"), &format!("198.19.{}.{}", i / 250, i % 250)))
                .collect();
            list(&mut core, Kind::Services, services);
            list(&mut core, Kind::EndpointSlices, slices);
            list(
                &mut core,
                Kind::Nodes,
                vec![node("node-a", "198.18.0.1", "1")],
            );
            let t = Instant::now();
            let (state, _) = core.take_state().expect("synced");
            let first = t.elapsed();
            assert_eq!(state.services.len(), n);
            let mut runs = Vec::new();
            for i in 0..5 {
                core.event(
                    Kind::EndpointSlices,
                    KindEvent::Apply(eps("s0", &format!("198.19.255.{i}"))),
                );
                let t = Instant::now();
                core.take_state().expect("changed");
                runs.push(t.elapsed());
            }
            runs.sort();
            let mut full = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                let _ = core.store().translate(&core.node);
                full.push(t.elapsed());
            }
            full.sort();
            eprintln!(
                "translate {n} services: first {first:?}; one slice changed: incremental \
                 {:?}, whole store {:?} (medians of 5)",
                runs[2], full[2]
            );
            if n == 10_000 {
                assert!(runs[2] * 2 < full[2], "incremental {runs:?}, full {full:?}");
            }
        }
    }
}
