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

mod http;
mod list;
mod query;
mod responses;
mod store;
mod watches;

use anyhow::{bail, Context as _, Result};
use http::accept_loop;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::{
    rfc3339_now, Event, Outage, Shared, Store, BROADCAST_CAPACITY, DEFAULT_BOOKMARK_INTERVAL,
};
use tokio::sync::{broadcast, watch};

pub use http::bind_loopback;
pub use store::{Kind, RequestRecord};

/// A running fake API server; stops (closing every connection) when dropped.
pub struct FakeApi {
    shared: Arc<Shared>,
    /// Runs the server; `Option` so that drop can shut it down without blocking (drop may
    /// happen inside another runtime, e.g. a `#[tokio::test]`).
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    netns: Option<String>,
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
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
