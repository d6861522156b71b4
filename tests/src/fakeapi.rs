//! A fake Kubernetes API server for the tests: real HTTP/1.1, real list and watch
//! semantics, real k8s-openapi JSON, so the agent's kube-rs source runs against it exactly
//! as it would against a cluster.
//!
//! What it serves (GET only, like a read-only service account):
//! - `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes`, the
//!   namespaced collection paths of the first two, and single objects by name;
//! - lists: `{kind}List` with `metadata.resourceVersion`; `limit` + `continue` pages over
//!   one consistent snapshot (as the API server does); items without `kind`/`apiVersion`,
//!   as the API server sends them;
//! - watches (`watch=true`): a chunked stream of `{"type":..,"object":..}` lines.
//!   `resourceVersion` absent or "0": synthetic ADDED events for every current object
//!   first. `resourceVersion=N`: every change after N, then live changes; N older than
//!   the retained history (see [`FakeApi::compact`]) → HTTP 200 and one ERROR event
//!   holding a `Status` with code 410 (reason `Expired`), which is what makes kube-rs
//!   re-list. `sendInitialEvents=true`: the initial events end with a BOOKMARK annotated
//!   `k8s.io/initial-events-end`. `allowWatchBookmarks=true`: periodic BOOKMARKs.
//!   `timeoutSeconds`: the stream ends cleanly after it;
//! - `fieldSelector` (`metadata.name`, `metadata.namespace`; `=`, `==`, `!=`) and
//!   `labelSelector` (`k=v`, `k!=v`, `k`, `!k`, `k in (..)`, `k notin (..)`);
//! - `/version`, `/api`, `/apis`, `/api/v1`, `/apis/discovery.k8s.io/v1` discovery
//!   documents; anything else → 404 with a `Status`, logged on stderr.
//!
//! The control API ([`FakeApi`]) is synchronous and usable from any thread, so plain
//! `#[test]`s drive it: create/update/delete objects with monotonically increasing
//! resourceVersions, forget history ([`FakeApi::compact`]), cut every watch
//! ([`FakeApi::drop_watches`]), simulate an outage ([`FakeApi::pause`] refuses
//! connections, [`FakeApi::hang`] accepts and never answers, [`FakeApi::resume`]), read the
//! request log ([`FakeApi::requests`]).
//!
//! The listening socket can be created inside a network namespace
//! ([`FakeApi::start_in_netns`]): the agent runs in the test's node namespace, where
//! 127.0.0.1 is that namespace's loopback, not the test process's.

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use futures::channel::mpsc;
use futures::SinkExt as _;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, watch};

/// How many history events a lagging watcher may fall behind before its watch is ended
/// with 410 (the API server's watch cache behaves the same way).
const BROADCAST_CAPACITY: usize = 4096;
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(5);

type Body = BoxBody<Bytes, std::io::Error>;

/// The kinds this server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }
}

/// One request the server received.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string (empty if none).
    pub query: String,
    /// Whether it was a watch (`watch=true` or `watch=1`).
    pub watch: bool,
    /// What the server answered (200 also for a watch that then sent a 410 ERROR event).
    pub status: u16,
    pub at: Instant,
}

impl RequestRecord {
    /// The value of query parameter `key`, percent-decoded.
    pub fn param(&self, key: &str) -> Option<String> {
        parse_query(&self.query).remove(key)
    }
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: Kind,
    /// ADDED, MODIFIED or DELETED.
    typ: &'static str,
    /// The object with `kind`, `apiVersion` and `metadata.resourceVersion == rv`.
    object: Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outage {
    None,
    /// The listening socket is closed: connections are refused (RST to the SYN).
    Refuse,
    /// Connections are accepted and requests read, but nothing is answered and open
    /// watches send nothing until [`FakeApi::resume`].
    Hang,
}

struct Store {
    /// The last resourceVersion handed out (etcd's revision: global over all kinds).
    rv: u64,
    /// Watches from a resourceVersion below this get 410 (history before it is gone).
    floor: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Event>,
    /// List snapshots for `continue` tokens: token → (rv, remaining items).
    pages: HashMap<String, (u64, Vec<Value>)>,
    next_page: u64,
    next_uid: u64,
    requests: Vec<RequestRecord>,
    bookmark_interval: Duration,
}

struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    /// Bumped to end every open watch stream abruptly.
    kill_watches: watch::Sender<u64>,
    /// Bumped to close every open connection (outage).
    kill_conns: watch::Sender<u64>,
    outage: watch::Sender<Outage>,
    /// Whether the port listens right now (set by the accept loop).
    listening: watch::Sender<bool>,
    open_watches: Mutex<usize>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves consistent data (every mutation is a
        // single step), so a poisoned lock is still usable.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake API server; stops (closing every connection) when dropped.
pub struct FakeApi {
    shared: Arc<Shared>,
    /// Runs the server; `Option` so that drop can shut it down without blocking (drop may
    /// happen inside another runtime, e.g. a `#[tokio::test]`).
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    netns: Option<String>,
}

/// Binds 127.0.0.1:`port` inside network namespace `ns` (by its `/run/netns` name), or in
/// the current one. A socket stays in the namespace it was created in, whichever thread
/// later uses it, so only a short-lived thread switches namespace.
pub fn bind_loopback(ns: Option<&str>, port: u16) -> Result<std::net::TcpListener> {
    let Some(ns) = ns else {
        return std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("binding 127.0.0.1:{port}"));
    };
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    let handle = std::thread::spawn(move || -> Result<std::net::TcpListener> {
        // SAFETY: setns(2) on a namespace fd we hold open; it affects this thread only,
        // which exits right after binding.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("setns into the namespace");
        }
        std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("binding 127.0.0.1:{port}"))
    });
    handle
        .join()
        .map_err(|_| anyhow!("the bind thread panicked"))?
        .with_context(|| format!("in network namespace {ns}"))
}

impl FakeApi {
    /// Starts the server on 127.0.0.1 (a free port) in the current network namespace.
    pub fn start() -> Result<Self> {
        Self::start_on(None)
    }

    /// Starts the server on 127.0.0.1 (a free port) inside network namespace `ns`.
    pub fn start_in_netns(ns: &str) -> Result<Self> {
        Self::start_on(Some(ns))
    }

    fn start_on(ns: Option<&str>) -> Result<Self> {
        let listener = bind_loopback(ns, 0)?;
        let addr = listener.local_addr().context("listener address")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fakeapi")
            .enable_all()
            .build()
            .context("building the fake API server's runtime")?;
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                // The first object gets a version > 1, so "0" (any version) and "1" differ.
                rv: 1,
                floor: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                pages: HashMap::new(),
                next_page: 1,
                next_uid: 1,
                requests: Vec::new(),
                bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            }),
            events,
            kill_watches: watch::Sender::new(0),
            kill_conns: watch::Sender::new(0),
            outage: watch::Sender::new(Outage::None),
            listening: watch::Sender::new(true),
            open_watches: Mutex::new(0),
        });
        let ns_owned = ns.map(str::to_string);
        {
            let shared = Arc::clone(&shared);
            let ns = ns_owned.clone();
            let _guard = runtime.enter();
            listener
                .set_nonblocking(true)
                .context("non-blocking listener")?;
            let listener = tokio::net::TcpListener::from_std(listener).context("tokio listener")?;
            runtime.spawn(accept_loop(shared, listener, ns, addr.port()));
        }
        Ok(FakeApi {
            shared,
            runtime: Some(runtime),
            addr,
            netns: ns_owned,
        })
    }

    /// `http://127.0.0.1:PORT` (reachable from the namespace the server listens in).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The network namespace the server listens in (`None`: the test's own).
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Writes a kubeconfig pointing at this server (no TLS, no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    \
             server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    \
             user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// How often watches that allow bookmarks get one (default 5 s).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.store().bookmark_interval = every;
    }

    /// The last resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Creates `obj`; fails if it exists. Returns its resourceVersion.
    pub fn create<K: k8s_openapi::Resource + serde::Serialize>(&self, obj: &K) -> Result<u64> {
        self.write(obj, Some(false))
    }

    /// Replaces `obj`; fails if it does not exist. Returns its new resourceVersion.
    pub fn update<K: k8s_openapi::Resource + serde::Serialize>(&self, obj: &K) -> Result<u64> {
        self.write(obj, Some(true))
    }

    /// Creates or replaces `obj`. Returns its resourceVersion.
    pub fn apply<K: k8s_openapi::Resource + serde::Serialize>(&self, obj: &K) -> Result<u64> {
        self.write(obj, None)
    }

    /// Deletes the object of `K`'s kind named `name` (in `namespace`; `""` for nodes).
    /// Returns the resourceVersion of the deletion.
    pub fn delete<K: k8s_openapi::Resource>(&self, namespace: &str, name: &str) -> Result<u64> {
        let kind = Kind::from_kind(K::KIND).with_context(|| format!("kind {}", K::KIND))?;
        let ns = if kind.namespaced() { namespace } else { "" };
        let mut st = self.shared.store();
        let key = (kind, ns.to_string(), name.to_string());
        let mut object = st
            .objects
            .remove(&key)
            .with_context(|| format!("{} {ns}/{name} does not exist", kind.name()))?;
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(&mut st, kind, "DELETED", object);
        Ok(rv)
    }

    /// Deletes `obj` (by its kind, namespace and name).
    pub fn delete_obj<K: k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta>>(
        &self,
        obj: &K,
    ) -> Result<u64> {
        let md = obj.metadata();
        let name = md.name.as_deref().context("object without a name")?;
        self.delete::<K>(md.namespace.as_deref().unwrap_or(""), name)
    }

    /// The current object of `K`'s kind named `name`, as the server holds it (with its
    /// resourceVersion, uid and creationTimestamp).
    pub fn get<K: k8s_openapi::Resource + serde::de::DeserializeOwned>(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<K>> {
        let kind = Kind::from_kind(K::KIND).with_context(|| format!("kind {}", K::KIND))?;
        let ns = if kind.namespaced() { namespace } else { "" };
        let st = self.shared.store();
        st.objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .map(|v| serde_json::from_value(v.clone()).context("decoding a stored object"))
            .transpose()
    }

    /// Forgets the change history, as an etcd compaction does: any watch resuming from a
    /// resourceVersion handed out so far gets 410 Gone (so the client re-lists), and so does
    /// a pending `continue` token. Lists made after this return a version that can be
    /// watched from.
    pub fn compact(&self) {
        let mut st = self.shared.store();
        // A new revision with no event of these kinds (in etcd: a write to some other
        // resource), so the next list's version is at or above the floor.
        st.rv += 1;
        st.floor = st.rv;
        st.history.clear();
        st.pages.clear();
    }

    /// Ends every open watch abruptly (the connection is reset mid-stream), as a load
    /// balancer or API server restart in front of the client would.
    pub fn drop_watches(&self) {
        self.shared.kill_watches.send_modify(|g| *g += 1);
    }

    /// API outage: closes the listening socket (new connections are refused) and every
    /// open connection, watches included, until [`FakeApi::resume`].
    pub fn pause(&self) {
        self.shared.outage.send_replace(Outage::Refuse);
        self.shared.kill_conns.send_modify(|g| *g += 1);
        self.wait_listening(false);
    }

    /// API outage of the hanging kind: connections are accepted, requests are never
    /// answered, open watches go silent, until [`FakeApi::resume`].
    pub fn hang(&self) {
        self.shared.outage.send_replace(Outage::Hang);
    }

    /// Ends an outage: the port listens again, held requests are answered, silent watches
    /// deliver what happened meanwhile.
    pub fn resume(&self) {
        self.shared.outage.send_replace(Outage::None);
        self.wait_listening(true);
    }

    /// Waits (briefly) until the accept loop has closed or reopened the port, so that a
    /// test's next step sees the outage state it asked for.
    fn wait_listening(&self, want: bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while *self.shared.listening.borrow() != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if *self.shared.listening.borrow() != want {
            eprintln!("fakeapi: the port did not switch to listening={want} within 5 s");
        }
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.store().requests.clone()
    }

    /// Watch streams open right now.
    pub fn open_watches(&self) -> usize {
        *self
            .shared
            .open_watches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until at least `n` watch streams are open (e.g. the agent's three watchers
    /// after their initial lists).
    pub fn wait_for_watches(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.open_watches() < n {
            if Instant::now() >= deadline {
                bail!(
                    "{} watch streams open after {timeout:?}, expected {n}",
                    self.open_watches()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn write<K: k8s_openapi::Resource + serde::Serialize>(
        &self,
        obj: &K,
        exists: Option<bool>,
    ) -> Result<u64> {
        let kind = Kind::from_kind(K::KIND).with_context(|| format!("kind {}", K::KIND))?;
        let mut object = serde_json::to_value(obj).context("serializing the object")?;
        object["kind"] = json!(kind.name());
        object["apiVersion"] = json!(kind.api_version());
        let name = object["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .context("object without metadata.name")?
            .to_string();
        let ns = if kind.namespaced() {
            let ns = object["metadata"]["namespace"]
                .as_str()
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                .to_string();
            object["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        let mut st = self.shared.store();
        let key = (kind, ns.clone(), name.clone());
        let old = st.objects.get(&key).cloned();
        match (exists, &old) {
            (Some(false), Some(_)) => bail!("{} {ns}/{name} already exists", kind.name()),
            (Some(true), None) => bail!("{} {ns}/{name} does not exist", kind.name()),
            _ => {}
        }
        // What the API server keeps of the old object whatever the client sends.
        let (uid, created) = match &old {
            Some(o) => (
                o["metadata"]["uid"].clone(),
                o["metadata"]["creationTimestamp"].clone(),
            ),
            None => {
                let uid = format!("00000000-0000-4000-8000-{:012x}", st.next_uid);
                st.next_uid += 1;
                let created = object["metadata"]["creationTimestamp"].clone();
                let created = if created.is_string() {
                    created
                } else {
                    json!(rfc3339_now())
                };
                (json!(uid), created)
            }
        };
        st.rv += 1;
        let rv = st.rv;
        let md = &mut object["metadata"];
        md["uid"] = uid;
        md["creationTimestamp"] = created;
        md["resourceVersion"] = json!(rv.to_string());
        st.objects.insert(key, object.clone());
        let typ = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.record(&mut st, kind, typ, object);
        Ok(rv)
    }

    fn record(&self, st: &mut Store, kind: Kind, typ: &'static str, object: Value) {
        let ev = Event {
            rv: st.rv,
            kind,
            typ,
            object,
        };
        st.history.push(ev.clone());
        // Sent under the store lock, so a watch that subscribes under the same lock sees
        // every event exactly once: in its history replay or on the channel.
        let _ = self.shared.events.send(ev);
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------

async fn accept_loop(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    ns: Option<String>,
    port: u16,
) {
    let mut listener = Some(listener);
    let mut outage = shared.outage.subscribe();
    loop {
        let current = *outage.borrow_and_update();
        match (current, listener.is_some()) {
            (Outage::Refuse, true) => {
                listener = None;
                shared.listening.send_replace(false);
            }
            (Outage::None | Outage::Hang, false) => {
                let ns = ns.clone();
                let bound =
                    tokio::task::spawn_blocking(move || bind_loopback(ns.as_deref(), port)).await;
                match bound {
                    Ok(Ok(l)) => {
                        let l = l
                            .set_nonblocking(true)
                            .map_err(anyhow::Error::from)
                            .and_then(|()| {
                                tokio::net::TcpListener::from_std(l).map_err(Into::into)
                            });
                        match l {
                            Ok(l) => {
                                listener = Some(l);
                                shared.listening.send_replace(true);
                            }
                            Err(e) => eprintln!("fakeapi: cannot listen again: {e:#}"),
                        }
                    }
                    Ok(Err(e)) => eprintln!("fakeapi: cannot listen again on {port}: {e:#}"),
                    Err(e) => eprintln!("fakeapi: bind task failed: {e}"),
                }
                if listener.is_none() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            _ => {}
        }
        let Some(l) = listener.as_ref() else {
            if outage.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            changed = outage.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            accepted = l.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // As Go's net package (the real API server) does: without it, the first
                // small watch event waits for the client's delayed ACK (~20-40 ms).
                let _ = stream.set_nodelay(true);
                let shared = Arc::clone(&shared);
                tokio::spawn(serve_connection(shared, stream));
            }
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: tokio::net::TcpStream) {
    let mut kill = shared.kill_conns.subscribe();
    kill.borrow_and_update();
    // Accepted just before an outage began (after its kill signal went out).
    if *shared.outage.borrow() == Outage::Refuse {
        return;
    }
    let svc_shared = Arc::clone(&shared);
    let service = hyper::service::service_fn(move |req| {
        let shared = Arc::clone(&svc_shared);
        async move { Ok::<_, std::convert::Infallible>(handle(shared, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        // Dropping the connection future closes the socket.
        _ = kill.changed() => {}
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let bytes = Bytes::from(body.to_string());
    let mut resp = Response::new(Full::new(bytes).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn error_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(code, status_object(code.as_u16(), reason, message))
}

/// What a request path names.
enum Target {
    Discovery(Value),
    Collection {
        kind: Kind,
        namespace: Option<String>,
    },
    Object {
        kind: Kind,
        namespace: String,
        name: String,
    },
}

fn route(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let kind_of = |group: &[&str], plural: &str| -> Option<Kind> {
        let k = match plural {
            "services" => Kind::Service,
            "endpointslices" => Kind::EndpointSlice,
            "nodes" => Kind::Node,
            _ => return None,
        };
        let want: Vec<&str> = k.api_version().split('/').collect();
        let prefix = if want.len() == 1 { "api" } else { "apis" };
        (group.first() == Some(&prefix) && group[1..] == want[..]).then_some(k)
    };
    match segs.as_slice() {
        ["version"] => Some(Target::Discovery(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-xdplb-fake",
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64",
        }))),
        ["api"] => Some(Target::Discovery(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"},
            ],
        }))),
        ["apis"] => Some(Target::Discovery(json!({
            "kind": "APIGroupList", "apiVersion": "v1",
            "groups": [{
                "name": "discovery.k8s.io",
                "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"},
            }],
        }))),
        ["api", "v1"] => Some(Target::Discovery(resource_list(
            "v1",
            &[Kind::Service, Kind::Node],
        ))),
        ["apis", "discovery.k8s.io", "v1"] => Some(Target::Discovery(resource_list(
            "discovery.k8s.io/v1",
            &[Kind::EndpointSlice],
        ))),
        ["api", "v1", plural] => kind_of(&segs[..2], plural).map(|kind| Target::Collection {
            kind,
            namespace: None,
        }),
        ["apis", g, "v1", plural] => {
            kind_of(&["apis", g, "v1"], plural).map(|kind| Target::Collection {
                kind,
                namespace: None,
            })
        }
        ["api", "v1", "nodes", name] => Some(Target::Object {
            kind: Kind::Node,
            namespace: String::new(),
            name: (*name).to_string(),
        }),
        ["api", "v1", "namespaces", ns, plural] => kind_of(&segs[..2], plural)
            .filter(|k| k.namespaced())
            .map(|kind| Target::Collection {
                kind,
                namespace: Some((*ns).to_string()),
            }),
        ["apis", g, "v1", "namespaces", ns, plural] => kind_of(&["apis", g, "v1"], plural)
            .filter(|k| k.namespaced())
            .map(|kind| Target::Collection {
                kind,
                namespace: Some((*ns).to_string()),
            }),
        ["api", "v1", "namespaces", ns, plural, name] => kind_of(&segs[..2], plural)
            .filter(|k| k.namespaced())
            .map(|kind| Target::Object {
                kind,
                namespace: (*ns).to_string(),
                name: (*name).to_string(),
            }),
        ["apis", g, "v1", "namespaces", ns, plural, name] => kind_of(&["apis", g, "v1"], plural)
            .filter(|k| k.namespaced())
            .map(|kind| Target::Object {
                kind,
                namespace: (*ns).to_string(),
                name: (*name).to_string(),
            }),
        _ => None,
    }
}

fn resource_list(group_version: &str, kinds: &[Kind]) -> Value {
    let resources: Vec<Value> = kinds
        .iter()
        .map(|k| {
            json!({
                "name": k.plural(), "singularName": k.name().to_lowercase(),
                "namespaced": k.namespaced(), "kind": k.name(),
                "verbs": ["get", "list", "watch"],
            })
        })
        .collect();
    json!({
        "kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": group_version, "resources": resources,
    })
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    // An outage of the hanging kind: the request is held until the outage ends.
    let mut outage = shared.outage.subscribe();
    while *outage.borrow_and_update() == Outage::Hang {
        if outage.changed().await.is_err() {
            break;
        }
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let params = parse_query(&query);
    let is_watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    let resp = if method != Method::GET {
        error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the fake API server is read-only",
        )
    } else {
        match route(&path) {
            None => {
                eprintln!("fakeapi: 404 for unknown path {path}?{query}");
                error_response(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("the server could not find the requested resource ({path})"),
                )
            }
            Some(Target::Discovery(doc)) => full(StatusCode::OK, doc),
            Some(Target::Object {
                kind,
                namespace,
                name,
            }) => get_object(&shared, kind, &namespace, &name),
            Some(Target::Collection { kind, namespace }) => {
                match Filter::new(kind, namespace, &params) {
                    Err(e) => error_response(StatusCode::BAD_REQUEST, "BadRequest", &e),
                    Ok(filter) if is_watch => start_watch(&shared, filter, &params),
                    Ok(filter) => list(&shared, filter, &params),
                }
            }
        }
    };
    shared.store().requests.push(RequestRecord {
        method: method.to_string(),
        path,
        query,
        watch: is_watch,
        status: resp.status().as_u16(),
        at: Instant::now(),
    });
    resp
}

fn get_object(shared: &Shared, kind: Kind, namespace: &str, name: &str) -> Response<Body> {
    let st = shared.store();
    match st
        .objects
        .get(&(kind, namespace.to_string(), name.to_string()))
    {
        Some(o) => full(StatusCode::OK, o.clone()),
        None => error_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} \"{name}\" not found", kind.plural()),
        ),
    }
}

/// Which objects a list or watch covers.
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    /// (field, wanted value, equal?)
    fields: Vec<(String, String, bool)>,
    labels: Vec<LabelReq>,
}

enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// Splits a selector on commas outside parentheses.
fn split_selector(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Filter {
    fn new(
        kind: Kind,
        namespace: Option<String>,
        params: &HashMap<String, String>,
    ) -> std::result::Result<Self, String> {
        let mut fields = Vec::new();
        for term in split_selector(params.get("fieldSelector").map_or("", String::as_str)) {
            let (k, v, eq) = if let Some((k, v)) = term.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, v, true)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, v, true)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let k = k.trim();
            if k != "metadata.name" && k != "metadata.namespace" {
                return Err(format!(
                    "field label not supported: {k} (the fake server knows metadata.name and \
                     metadata.namespace)"
                ));
            }
            fields.push((k.to_string(), v.trim().to_string(), eq));
        }
        let mut labels = Vec::new();
        for term in split_selector(params.get("labelSelector").map_or("", String::as_str)) {
            let set = |v: &str| -> Vec<String> {
                v.trim()
                    .trim_start_matches('(')
                    .trim_end_matches(')')
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect()
            };
            let req = if let Some((k, v)) = term.split_once(" notin ") {
                LabelReq::NotIn(k.trim().into(), set(v))
            } else if let Some((k, v)) = term.split_once(" in ") {
                LabelReq::In(k.trim().into(), set(v))
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelReq::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = term.strip_prefix('!') {
                LabelReq::NotExists(k.trim().into())
            } else {
                LabelReq::Exists(term.trim().into())
            };
            labels.push(req);
        }
        Ok(Filter {
            kind,
            namespace,
            fields,
            labels,
        })
    }

    fn matches(&self, kind: Kind, obj: &Value) -> bool {
        if kind != self.kind {
            return false;
        }
        let md = &obj["metadata"];
        let ns = md["namespace"].as_str().unwrap_or("");
        if self.namespace.as_deref().is_some_and(|want| want != ns) {
            return false;
        }
        for (k, v, eq) in &self.fields {
            let have = match k.as_str() {
                "metadata.name" => md["name"].as_str().unwrap_or(""),
                _ => ns,
            };
            if (have == v) != *eq {
                return false;
            }
        }
        let label = |k: &str| md["labels"][k].as_str().map(str::to_string);
        self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k).as_deref() == Some(v.as_str()),
            LabelReq::Ne(k, v) => label(k).as_deref() != Some(v.as_str()),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.contains(&l)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| !vs.contains(&l)),
        })
    }
}

/// A list item as the API server sends it: without `kind` and `apiVersion`.
fn list_item(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    o
}

fn list(shared: &Shared, filter: Filter, params: &HashMap<String, String>) -> Response<Body> {
    let mut st = shared.store();
    let limit = match params.get("limit").map(|l| l.parse::<usize>()) {
        None => None,
        Some(Ok(0)) => None,
        Some(Ok(l)) => Some(l),
        Some(Err(_)) => {
            return error_response(StatusCode::BAD_REQUEST, "BadRequest", "invalid limit")
        }
    };
    if let Some(rv) = params.get("resourceVersion").filter(|v| !v.is_empty()) {
        let Ok(n) = rv.parse::<u64>() else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("invalid resource version {rv:?}"),
            );
        };
        let exact = params.get("resourceVersionMatch").map(String::as_str) == Some("Exact");
        if exact && n != st.rv {
            // Only the latest version is kept as a snapshot.
            return error_response(
                StatusCode::GONE,
                "Expired",
                &format!("too old resource version: {n} ({})", st.rv),
            );
        }
    }
    let (rv, items) = if let Some(token) = params.get("continue").filter(|t| !t.is_empty()) {
        match st.pages.remove(token) {
            Some(p) => p,
            None => {
                return error_response(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                )
            }
        }
    } else {
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((k, _, _), o)| filter.matches(*k, o))
            .map(|(_, o)| list_item(o))
            .collect();
        (st.rv, items)
    };
    let (page, rest) = match limit {
        Some(l) if items.len() > l => {
            let mut items = items;
            let rest = items.split_off(l);
            (items, rest)
        }
        _ => (items, Vec::new()),
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if !rest.is_empty() {
        let token = format!("fake-continue-{}-{}", rv, st.next_page);
        st.next_page += 1;
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(rest.len());
        st.pages.insert(token, (rv, rest));
    }
    full(
        StatusCode::OK,
        json!({
            "kind": format!("{}List", filter.kind.name()),
            "apiVersion": filter.kind.api_version(),
            "metadata": metadata,
            "items": page,
        }),
    )
}

fn event_line(typ: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": typ, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn bookmark(kind: Kind, rv: u64, initial_end: bool) -> Value {
    let mut md = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": md})
}

struct WatchGuard(Arc<Shared>);

impl WatchGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        *shared
            .open_watches
            .lock()
            .unwrap_or_else(|e| e.into_inner()) += 1;
        WatchGuard(Arc::clone(shared))
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut n = self
            .0
            .open_watches
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
    }
}

fn start_watch(
    shared: &Arc<Shared>,
    filter: Filter,
    params: &HashMap<String, String>,
) -> Response<Body> {
    let bookmarks = matches!(
        params.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let initial_events = params.get("sendInitialEvents").map(String::as_str) == Some("true");
    let timeout = match params.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None => None,
        Some(Ok(t)) => Some(Duration::from_secs(t)),
        Some(Err(_)) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "invalid timeoutSeconds",
            )
        }
    };
    let from = match params.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid resource version {rv:?}"),
                )
            }
        },
    };

    // Everything the stream starts with, and its live subscription, taken under one lock
    // so that no event is missed or sent twice.
    let mut initial: Vec<Bytes> = Vec::new();
    let (rx, mut last_rv, gone) = {
        let st = shared.store();
        let rx = shared.events.subscribe();
        let mut gone = false;
        match from {
            None => {
                for ((k, _, _), o) in &st.objects {
                    if filter.matches(*k, o) {
                        initial.push(event_line("ADDED", o));
                    }
                }
                if initial_events {
                    initial.push(event_line("BOOKMARK", &bookmark(filter.kind, st.rv, true)));
                }
            }
            Some(n) if n < st.floor => {
                gone = true;
                let status = status_object(
                    410,
                    "Expired",
                    &format!("too old resource version: {n} ({})", st.floor),
                );
                initial.push(event_line("ERROR", &status));
            }
            Some(n) => {
                for ev in st.history.iter().filter(|e| e.rv > n) {
                    if filter.matches(ev.kind, &ev.object) {
                        initial.push(event_line(ev.typ, &ev.object));
                    }
                }
            }
        }
        (rx, st.rv, gone)
    };

    let (mut tx, body_rx) = mpsc::channel::<std::result::Result<Frame<Bytes>, std::io::Error>>(16);
    let body = StreamBody::new(body_rx).boxed();
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );

    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let _guard = WatchGuard::new(&shared);
        let mut rx = rx;
        let mut kill = shared.kill_watches.subscribe();
        kill.borrow_and_update();
        let mut outage = shared.outage.subscribe();
        let mut conns = shared.kill_conns.subscribe();
        conns.borrow_and_update();
        for line in initial {
            if tx.send(Ok(Frame::data(line))).await.is_err() {
                return;
            }
        }
        if gone {
            return;
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let interval = shared.store().bookmark_interval;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            // A hanging API server sends nothing; events queue up in the channel.
            let hanging = *outage.borrow_and_update() == Outage::Hang;
            tokio::select! {
                // Control signals first: a test that calls hang() and then changes an
                // object must not see that change delivered because both were ready.
                biased;
                _ = kill.changed() => {
                    // An error item makes hyper abort the connection mid-stream.
                    let _ = tx
                        .send(Err(std::io::Error::other("watch dropped by the test")))
                        .await;
                    return;
                }
                // The connection is being closed (outage): the stream goes with it.
                _ = conns.changed() => return,
                _ = outage.changed() => {}
                _ = until_deadline => return,
                ev = rx.recv(), if !hanging => match ev {
                    // Every event on the channel is newer than the initial part (both
                    // were taken under the store lock).
                    Ok(ev) => {
                        if filter.matches(ev.kind, &ev.object) {
                            let line = event_line(ev.typ, &ev.object);
                            if tx.send(Ok(Frame::data(line))).await.is_err() {
                                return;
                            }
                        }
                        last_rv = ev.rv;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let status = status_object(410, "Expired", "watch fell too far behind");
                        let _ = tx.send(Ok(Frame::data(event_line("ERROR", &status)))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick(), if bookmarks && !hanging => {
                    let line = event_line("BOOKMARK", &bookmark(filter.kind, last_rv, false));
                    if tx.send(Ok(Frame::data(line))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    resp
}

/// The current time as RFC 3339 (UTC, seconds), as `creationTimestamp` is written.
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
