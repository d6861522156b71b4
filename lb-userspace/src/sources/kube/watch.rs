//! The watchers: one kube-runtime watcher per kind, its events converted to the store's
//! objects (stripped of what translation never reads) and merged into one stream.

use std::pin::Pin;

use futures::stream::{BoxStream, Stream};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, NodeStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::utils::StreamBackoff;
use kube::runtime::watcher::{self, watcher, Event};
use kube::Api;

use crate::sources::Object;
use crate::translate::ObjectKind;

/// The three watched kinds, as an index into per-kind state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Kind {
    Services = 0,
    EndpointSlices = 1,
    Nodes = 2,
}

impl Kind {
    pub(super) const ALL: [Kind; 3] = [Kind::Services, Kind::EndpointSlices, Kind::Nodes];

    pub(super) fn object_kind(self) -> ObjectKind {
        match self {
            Kind::Services => ObjectKind::Service,
            Kind::EndpointSlices => ObjectKind::EndpointSlice,
            Kind::Nodes => ObjectKind::Node,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Services => "Services",
            Kind::EndpointSlices => "EndpointSlices",
            Kind::Nodes => "Nodes",
        }
    }
}

/// One watcher event of any kind, converted to the store's object type.
#[derive(Debug)]
pub(super) enum KindEvent {
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

pub(super) fn service_object(mut s: Service) -> Object {
    // managedFields are often larger than the object and never read.
    s.metadata.managed_fields = None;
    Object::Service(Box::new(s))
}

pub(super) fn slice_object(mut s: EndpointSlice) -> Object {
    s.metadata.managed_fields = None;
    Object::EndpointSlice(Box::new(s))
}

/// Keeps only what translation reads (name, addresses). The kubelet rewrites its Node's
/// status (conditions, images) on its own schedule; with those fields and the
/// resourceVersion gone, such an update compares equal to the stored Node and costs no
/// translation.
pub(super) fn node_object(n: Node) -> Object {
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

pub(super) type EventStream =
    Pin<Box<dyn Stream<Item = (Kind, Result<KindEvent, watcher::Error>)> + Send>>;

pub(super) fn kind_stream<K>(
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
