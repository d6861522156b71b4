//! The file source (`--services <file|dir>`): Services, EndpointSlices and Nodes from
//! manifests as `kubectl get -o yaml` (multi-document, or `kind: List`) or `-o json`
//! prints them. The state is computed for the node given with [`FileSource::with_node`].
//!
//! Every load re-reads all files and rebuilds the object set, with these rules:
//! - a valid object replaces its previous version;
//! - an object that fails to decode or validate keeps its previous valid version (if it
//!   had one) and the error names the file, the object and the field;
//! - an object no longer in any file is removed;
//! - a file that cannot be read or is not valid YAML/JSON as a whole keeps every object
//!   it held before; so does, for the objects not found in it now, a file with a document
//!   whose kind or name cannot be read (the broken document may be any of them, and
//!   dropping a service because of a typo in its name line would be worse than keeping a
//!   deleted one until the typo is fixed).
//!
//! Changes are found by polling every 100 ms rather than through inotify: editors save
//! by renaming, and Kubernetes ConfigMap volumes swap a `..data` symlink, both of which
//! a watch on the original inode misses. A poll costs one `stat` per file. A change is
//! loaded once the files look the same on two polls in a row, so a file caught between
//! truncation and write (an in-place save) is never read as "all objects deleted".
//! Edits apply within about 0.2 s.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::watch;

use super::{decode, Decoded, Located, ObjectStore, Update};
use crate::model::{DesiredState, NodeSettings};
use crate::translate::ObjectRef;

/// How often the files are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A file modified this recently is also compared by content: file timestamps have a
/// granularity of a few milliseconds, so two quick writes of the same size can leave
/// size and mtime unchanged.
const RECENT: Duration = Duration::from_secs(2);

/// What a poll compares: per file, its identity, size, times and (for recently modified
/// files) a hash of the contents.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    recent_hash: Option<u64>,
}

type Fingerprint = BTreeMap<PathBuf, FileStamp>;

/// Reads Services, EndpointSlices and Nodes from a file or directory and follows its
/// changes.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    /// Which node this is: local endpoints and NodePort addresses.
    node: NodeSettings,
    store: ObjectStore,
    /// File each object in the store was read from.
    origin: BTreeMap<ObjectRef, PathBuf>,
    errors: Vec<String>,
    warnings: Vec<String>,
    /// Messages already logged, so an unchanged problem is not logged on every change.
    logged: BTreeSet<String>,
    /// Stamps of the files as of the last load.
    fingerprint: Option<Fingerprint>,
    /// A change seen by the last poll, loaded if the next poll sees the same.
    pending: Option<Fingerprint>,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            node: NodeSettings::default(),
            store: ObjectStore::new(),
            origin: BTreeMap::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
            logged: BTreeSet::new(),
            fingerprint: None,
            pending: None,
        }
    }

    /// Sets the node the state is computed for (default: no name, so every endpoint is
    /// local, and NodePorts only on the addresses of the Node objects in the files).
    pub fn with_node(mut self, node: NodeSettings) -> Self {
        self.node = node;
        self
    }

    /// The file or directory this source reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Errors from the last load (file, object, field and reason), one per problem.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Warnings from the last load: parts of valid objects that are skipped (SCTP ports,
    /// frontends claimed by two services).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Reads all files now and returns the resulting state. Err only when the path
    /// itself cannot be read (missing, or a directory that cannot be listed); problems in
    /// single files or objects are in [`FileSource::errors`].
    pub fn load(&mut self) -> anyhow::Result<DesiredState> {
        let fingerprint = self.fingerprint()?;
        let files: Vec<PathBuf> = fingerprint.keys().cloned().collect();
        let mut store = ObjectStore::new();
        let mut origin: BTreeMap<ObjectRef, PathBuf> = BTreeMap::new();
        let mut errors = Vec::new();
        let mut warnings = Vec::new();

        for file in &files {
            let shown = file.display().to_string();
            let docs = match std::fs::read_to_string(file) {
                Ok(text) => parse_documents(file, &text),
                Err(e) => Err(format!("cannot read: {e}")),
            };
            let docs = match docs {
                Ok(docs) => docs,
                Err(reason) => {
                    let msg = format!("{shown}: {reason}; keeping the objects read from it before");
                    errors.push(msg);
                    self.carry_file(file, &mut store, &mut origin);
                    continue;
                }
            };
            let mut unidentified = false;
            for (doc_no, doc) in docs {
                for item in decode(doc) {
                    let at = |location: &str| {
                        if location.is_empty() {
                            format!("{shown}: document {doc_no}")
                        } else {
                            format!("{shown}: document {doc_no}, {location}")
                        }
                    };
                    match item {
                        Ok(Located {
                            value: Decoded::Ignored { api_version, kind },
                            location,
                        }) => {
                            tracing::debug!(
                                file = %shown,
                                "{}: ignoring {api_version}/{kind}",
                                at(&location)
                            );
                        }
                        Ok(Located {
                            value: Decoded::Object(obj),
                            location,
                        }) => {
                            let key = obj.key();
                            if let Some(first) = origin.get(&key) {
                                errors.push(format!(
                                    "{}: {key}: also defined in {}; the first definition is used",
                                    at(&location),
                                    first.display()
                                ));
                                continue;
                            }
                            match store.apply(obj) {
                                Ok(w) => {
                                    origin.insert(key, file.clone());
                                    warnings.extend(
                                        w.into_iter().map(|w| format!("{}: {w}", at(&location))),
                                    );
                                }
                                Err(e) => {
                                    errors.push(format!("{}: {e}", at(&location)));
                                    self.carry(&key, file, &mut store, &mut origin);
                                }
                            }
                        }
                        Err(e) => {
                            let msg = format!("{shown}: document {doc_no}: {e}");
                            errors.push(msg);
                            match &e.object {
                                Some(key) if !key.name.is_empty() => {
                                    self.carry(key, file, &mut store, &mut origin);
                                }
                                _ => unidentified = true,
                            }
                        }
                    }
                }
            }
            if unidentified {
                self.carry_file(file, &mut store, &mut origin);
            }
        }

        let translation = store.translate(&self.node);
        warnings.extend(translation.conflicts.iter().map(|c| c.to_string()));

        for msg in &errors {
            if !self.logged.contains(msg) {
                tracing::warn!(path = %self.path.display(), "{msg}");
            }
        }
        for msg in &warnings {
            if !self.logged.contains(msg) {
                tracing::warn!(path = %self.path.display(), "{msg}");
            }
        }
        self.logged = errors.iter().chain(&warnings).cloned().collect();
        self.store = store;
        self.origin = origin;
        self.errors = errors;
        self.warnings = warnings;
        self.fingerprint = Some(fingerprint);
        Ok(translation.state)
    }

    /// The state of the last load, without reading anything.
    pub fn state(&self) -> DesiredState {
        self.store.desired_state(&self.node)
    }

    /// Loads again if the files changed since the last load and have not changed since
    /// the previous poll (a change is loaded on the second poll that sees it).
    /// `Ok(None)`: nothing to load (yet).
    pub fn poll(&mut self) -> anyhow::Result<Option<DesiredState>> {
        let now = self.fingerprint()?;
        if self.fingerprint.as_ref() == Some(&now) {
            self.pending = None;
            return Ok(None);
        }
        if self.pending.as_ref() != Some(&now) {
            self.pending = Some(now);
            return Ok(None);
        }
        self.pending = None;
        self.load().map(Some)
    }

    /// Sends the current state, then a new state after each change, until every receiver
    /// is dropped. Fails only if the path cannot be read at start; later read failures are
    /// logged and the last state stays in force.
    pub async fn run(self, tx: watch::Sender<Update>) -> anyhow::Result<()> {
        let path = self.path.display().to_string();
        let (mut this, first) = blocking(self, |s| s.load()).await?;
        let state = first.with_context(|| format!("reading services from {path}"))?;
        // A receiver that already holds this state (the agent loads once before it starts
        // the source) is not woken for nothing.
        send_if_changed(&tx, state);
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_failure: Option<String> = None;
        loop {
            tokio::select! {
                _ = tx.closed() => return Ok(()),
                _ = tick.tick() => {}
            }
            let (s, polled) = blocking(this, |s| s.poll()).await?;
            this = s;
            match polled {
                Ok(None) => {}
                Ok(Some(state)) => {
                    last_failure = None;
                    send_if_changed(&tx, state);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if last_failure.as_ref() != Some(&msg) {
                        tracing::warn!(
                            path = %path,
                            "cannot read services, keeping the last state: {msg}"
                        );
                        last_failure = Some(msg);
                    }
                }
            }
        }
    }

    /// Keeps the previous version of `key` (if any), now attributed to `file`.
    fn carry(
        &self,
        key: &ObjectRef,
        file: &Path,
        store: &mut ObjectStore,
        origin: &mut BTreeMap<ObjectRef, PathBuf>,
    ) {
        if origin.contains_key(key) {
            return;
        }
        if let Some(old) = self.store.get(key) {
            // It was valid when stored and validation is deterministic.
            if store.apply(old.clone()).is_ok() {
                origin.insert(key.clone(), file.to_owned());
            }
        }
    }

    /// Keeps every previous object of `file` not already present in the new set.
    fn carry_file(
        &self,
        file: &Path,
        store: &mut ObjectStore,
        origin: &mut BTreeMap<ObjectRef, PathBuf>,
    ) {
        let keys: Vec<ObjectRef> = self
            .origin
            .iter()
            .filter(|(_, f)| f.as_path() == file)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.carry(&key, file, store, origin);
        }
    }

    /// Lists the manifest files with their stamps.
    fn fingerprint(&self) -> anyhow::Result<Fingerprint> {
        let meta = std::fs::metadata(&self.path)
            .with_context(|| format!("cannot access {}", self.path.display()))?;
        let files = if meta.is_dir() {
            let mut files = Vec::new();
            let dir = std::fs::read_dir(&self.path)
                .with_context(|| format!("cannot list {}", self.path.display()))?;
            for entry in dir {
                let entry =
                    entry.with_context(|| format!("cannot list {}", self.path.display()))?;
                let p = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                // Hidden files: editor swap files, ConfigMap volumes' `..data` machinery.
                if name.starts_with('.') || !is_manifest_name(&name) {
                    continue;
                }
                // A dangling symlink stays in the list: reading it fails, and the objects
                // it held are kept, as for any file that cannot be read.
                if std::fs::metadata(&p).is_ok_and(|m| m.is_dir()) {
                    continue;
                }
                files.push(p);
            }
            files
        } else {
            vec![self.path.clone()]
        };
        let mut out = Fingerprint::new();
        for f in files {
            out.insert(f.clone(), stamp(&f));
        }
        Ok(out)
    }
}

fn send_if_changed(tx: &watch::Sender<Update>, state: DesiredState) {
    tx.send_if_modified(|cur| {
        if cur.state == state {
            return false;
        }
        // A file change is read in full: every update is a resync.
        *cur = Update::new(state, true);
        true
    });
}

/// Runs `f` on the source off the async threads (it reads files) and hands it back.
async fn blocking<T: Send + 'static>(
    src: FileSource,
    f: impl FnOnce(&mut FileSource) -> T + Send + 'static,
) -> anyhow::Result<(FileSource, T)> {
    tokio::task::spawn_blocking(move || {
        let mut src = src;
        let r = f(&mut src);
        (src, r)
    })
    .await
    .context("file source task failed")
}

fn is_manifest_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".yaml") || lower.ends_with(".yml") || lower.ends_with(".json")
}

fn is_json(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// A file's stamp; a file that vanished or cannot be read gets a stamp of its own (all
/// zero) so its reappearance counts as a change.
fn stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(path) else {
        return FileStamp {
            dev: 0,
            ino: 0,
            len: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            recent_hash: None,
        };
    };
    let mtime_ns = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
    let ctime_ns = i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec());
    // ctime, not mtime: a tool can set mtime back (`touch -d`, `cp -p`), not ctime.
    let now_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let recent = now_ns - ctime_ns < RECENT.as_nanos() as i128;
    let recent_hash = if recent {
        std::fs::read(path).ok().map(|bytes| hash_bytes(&bytes))
    } else {
        None
    };
    FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns,
        ctime_ns,
        recent_hash,
    }
}

fn hash_bytes(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// Splits a file into documents (numbered from 1). Err: the file as a whole is not valid
/// YAML (or JSON for `.json` files).
fn parse_documents(path: &Path, text: &str) -> Result<Vec<(usize, Value)>, String> {
    if is_json(path) {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        return Ok(vec![(1, v)]);
    }
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc_no = i + 1;
        let y = serde_yaml::Value::deserialize(de)
            .map_err(|e| format!("invalid YAML in document {doc_no}: {e}"))?;
        if y.is_null() {
            // `---` at the end of a file, or a document of only comments.
            continue;
        }
        let v = serde_json::to_value(&y)
            .map_err(|e| format!("document {doc_no} cannot be read as JSON-like data: {e}"))?;
        out.push((doc_no, v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Frontend, FrontendKind, Protocol, ServicePortId};
    use std::time::Instant;

    fn id(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortId {
        ServicePortId::new(ns, name, port, protocol)
    }

    fn vips(state: &DesiredState, id: &ServicePortId) -> Vec<String> {
        state.services[id]
            .frontends
            .iter()
            .map(|f| format!("{}:{}", f.addr, f.port))
            .collect()
    }

    fn backends(state: &DesiredState, id: &ServicePortId) -> Vec<String> {
        state.services[id]
            .endpoints
            .iter()
            .map(|e| format!("{}:{}", e.addr, e.port))
            .collect()
    }

    /// A service `name` in namespace `t` with one TCP port and a slice of `pods`.
    fn manifest(name: &str, vip: &str, port: &str, pods: &[&str]) -> String {
        let mut s = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: t\n\
             spec:\n  clusterIP: {vip}\n  ports:\n  - name: http\n    port: {port}\n    \
             targetPort: http\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: {name}-1\n  namespace: t\n  labels:\n    \
             kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: http\n  \
             port: 8080\n  protocol: TCP\nendpoints:\n"
        );
        for p in pods {
            s.push_str(&format!("- addresses: [{p}]\n"));
        }
        s
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).expect("write test manifest");
    }

    #[test]
    fn directory_with_service_and_slice_gives_the_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            &dir.path().join("a.yaml"),
            &format!(
                "{}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: a}}\n---\n",
                manifest("a", "198.18.100.1", "80", &["198.18.1.2", "198.18.1.1"])
            ),
        );
        let json = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"b","namespace":"t"},
             "spec":{"clusterIP":"198.18.100.2","ports":[{"port":53,"protocol":"UDP"}]}}]}"#;
        write(&dir.path().join("b.json"), json);
        let single = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"c","namespace":"t"},
             "spec":{"clusterIP":"2001:db8::c","ports":[{"port":443}]}}"#;
        write(&dir.path().join("c.JSON"), single);
        std::fs::create_dir(dir.path().join("sub.yaml")).expect("mkdir");
        // Not a manifest name: must not be read (it is not even YAML).
        write(&dir.path().join("notes.txt"), "{{{{ not yaml");
        write(&dir.path().join(".hidden.yaml"), "{{{{ not yaml");

        let mut src = FileSource::new(dir.path());
        let state = src.load().expect("load");
        assert!(src.errors().is_empty(), "{:?}", src.errors());
        assert_eq!(state.services.len(), 3);
        assert_eq!(
            vips(&state, &id("t", "c", "", Protocol::Tcp)),
            vec!["2001:db8::c:443"]
        );
        let a = id("t", "a", "http", Protocol::Tcp);
        let st = &state.services[&a];
        assert_eq!(
            st.frontends,
            vec![Frontend {
                addr: "198.18.100.1".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                kind: FrontendKind::ClusterIp,
            }]
        );
        assert_eq!(
            st.endpoints,
            vec![
                Endpoint {
                    addr: "198.18.1.1".parse().unwrap(),
                    port: 8080,
                    target: None
                },
                Endpoint {
                    addr: "198.18.1.2".parse().unwrap(),
                    port: 8080,
                    target: None
                },
            ]
        );
        let b = id("t", "b", "", Protocol::Udp);
        assert_eq!(vips(&state, &b), vec!["198.18.100.2:53"]);
        assert!(backends(&state, &b).is_empty());
    }

    #[test]
    fn example_manifest_loads_as_documented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/services.yaml");
        let mut src = FileSource::new(&path);
        let state = src.load().expect("load example");
        assert!(src.errors().is_empty(), "{:?}", src.errors());
        assert!(src.warnings().is_empty(), "{:?}", src.warnings());
        let web = id("shop", "web", "http", Protocol::Tcp);
        let syslog = id("logging", "syslog", "syslog", Protocol::Udp);
        let keys: Vec<_> = state.services.keys().cloned().collect();
        assert_eq!(keys, vec![syslog.clone(), web.clone()]);
        assert_eq!(
            vips(&state, &web),
            vec!["198.18.100.10:80", "198.18.200.10:80"]
        );
        assert_eq!(
            state.services[&web].frontends[1].kind,
            FrontendKind::LoadBalancer
        );
        // The terminating pod (198.18.1.12) is not ready.
        assert_eq!(
            backends(&state, &web),
            vec!["198.18.1.10:8080", "198.18.1.11:8080"]
        );
        assert_eq!(
            state.services[&web].endpoints[0].target.as_deref(),
            Some("shop/web-5c9d7f8b6-7kq2m")
        );
        assert_eq!(vips(&state, &syslog), vec!["198.18.100.20:514"]);
        assert_eq!(
            backends(&state, &syslog),
            vec!["198.18.2.20:5514", "198.18.2.21:5514"]
        );
        // The file holds no Node: web's NodePort listens only on --nodeport-address.
        let node = NodeSettings {
            name: Some("edge-1".into()),
            extra_addresses: vec!["198.18.0.5".parse().expect("address")],
        };
        let state = FileSource::new(&path)
            .with_node(node)
            .load()
            .expect("load example");
        assert_eq!(
            vips(&state, &web),
            vec!["198.18.0.5:31080", "198.18.100.10:80", "198.18.200.10:80"]
        );
    }

    fn addrs(eps: &[Endpoint]) -> Vec<String> {
        eps.iter()
            .map(|e| format!("{}:{}", e.addr, e.port))
            .collect()
    }

    #[test]
    fn edge_local_example_loads_as_documented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/edge-local.yaml");
        let on = |name: &str, extra: &[&str]| {
            let mut src = FileSource::new(&path).with_node(NodeSettings {
                name: Some(name.into()),
                extra_addresses: extra.iter().map(|a| a.parse().expect("address")).collect(),
            });
            let state = src.load().expect("load example");
            assert!(src.errors().is_empty(), "{:?}", src.errors());
            assert!(src.warnings().is_empty(), "{:?}", src.warnings());
            let id = id("shop", "checkout", "https", Protocol::Tcp);
            assert_eq!(state.services.len(), 1);
            state.services[&id].clone()
        };
        let st = on("edge-1", &[]);
        let fronts: Vec<(String, FrontendKind)> = st
            .frontends
            .iter()
            .map(|f| (format!("{}:{}", f.addr, f.port), f.kind))
            .collect();
        assert_eq!(
            fronts,
            vec![
                ("198.18.0.11:31443".into(), FrontendKind::NodePort),
                ("198.18.0.12:31443".into(), FrontendKind::NodePort),
                ("198.18.100.30:443".into(), FrontendKind::ClusterIp),
                ("198.18.200.30:443".into(), FrontendKind::LoadBalancer),
            ]
        );
        assert!(st.external_local && !st.internal_local);
        assert_eq!(st.health_check_node_port, Some(32443));
        assert_eq!(st.affinity_timeout_s, Some(600));
        let ranges: Vec<String> = st.source_ranges.iter().map(|p| p.to_string()).collect();
        assert_eq!(ranges, vec!["198.18.64.0/18"]);
        assert_eq!(
            addrs(&st.endpoints),
            vec!["198.18.1.30:8443", "198.18.1.31:8443"]
        );
        assert_eq!(addrs(&st.local_endpoints), vec!["198.18.1.30:8443"]);
        assert_eq!(addrs(&st.draining), vec!["198.18.1.32:8443"]);
        assert_eq!(
            st.endpoints_for(FrontendKind::LoadBalancer),
            &st.local_endpoints[..]
        );
        assert_eq!(st.endpoints_for(FrontendKind::ClusterIp), &st.endpoints[..]);

        // On edge-2 (no Node object for it in the file): NodePorts only on the given
        // address, and edge-2's pod is the local one.
        let st = on("edge-2", &["198.18.0.21"]);
        let node_ports: Vec<String> = st
            .frontends
            .iter()
            .filter(|f| f.kind == FrontendKind::NodePort)
            .map(|f| format!("{}:{}", f.addr, f.port))
            .collect();
        assert_eq!(node_ports, vec!["198.18.0.21:31443"]);
        assert_eq!(addrs(&st.local_endpoints), vec!["198.18.1.31:8443"]);
    }

    const NODE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status:
  addresses: [{type: InternalIP, address: 198.18.0.1}]
"#;

    const NODE_PORT_SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: np, namespace: t}
spec:
  type: NodePort
  clusterIP: 198.18.100.9
  ports: [{port: 80, nodePort: 30080}]
"#;

    #[test]
    fn node_object_edits_move_the_node_ports_and_a_bad_edit_keeps_the_last_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes = dir.path().join("nodes.yaml");
        write(&nodes, NODE);
        write(&dir.path().join("svc.yaml"), NODE_PORT_SVC);
        let np = id("t", "np", "", Protocol::Tcp);
        let mut src = FileSource::new(dir.path()).with_node(NodeSettings {
            name: Some("n1".into()),
            extra_addresses: Vec::new(),
        });
        let state = src.load().expect("load");
        assert!(src.errors().is_empty(), "{:?}", src.errors());
        assert_eq!(
            vips(&state, &np),
            vec!["198.18.0.1:30080", "198.18.100.9:80"]
        );

        // The node gets a second address.
        write(
            &nodes,
            &NODE.replace(
                "addresses: [{type: InternalIP, address: 198.18.0.1}]",
                "addresses: [{type: InternalIP, address: 198.18.0.1},                  {type: ExternalIP, address: 198.18.0.2}]",
            ),
        );
        let state = src.load().expect("load");
        assert_eq!(
            vips(&state, &np),
            vec!["198.18.0.1:30080", "198.18.0.2:30080", "198.18.100.9:80"]
        );

        // An invalid address: reported with the field, the previous version stays.
        write(&nodes, &NODE.replace("198.18.0.1", "198.18.0.256"));
        let state = src.load().expect("load");
        assert_eq!(src.errors().len(), 1, "{:?}", src.errors());
        assert!(
            src.errors()[0].contains("Node n1: status.addresses[0].address"),
            "{:?}",
            src.errors()
        );
        assert_eq!(
            vips(&state, &np),
            vec!["198.18.0.1:30080", "198.18.0.2:30080", "198.18.100.9:80"]
        );

        // The Node object removed: no NodePort frontends any more.
        write(&nodes, "");
        let state = src.load().expect("load");
        assert!(src.errors().is_empty(), "{:?}", src.errors());
        assert_eq!(vips(&state, &np), vec!["198.18.100.9:80"]);
    }

    #[test]
    fn invalid_edit_keeps_that_object_and_applies_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("svc.yaml");
        let a_ok = manifest("a", "198.18.100.1", "80", &["198.18.1.1"]);
        let b_ok = manifest("b", "198.18.100.2", "80", &["198.18.2.1"]);
        write(&file, &format!("{a_ok}---\n{b_ok}"));
        let mut src = FileSource::new(&file);
        let before = src.load().expect("load");
        assert_eq!(before.services.len(), 2);

        // a: port out of range (its EndpointSlice is unchanged); b: a valid change.
        let a_bad = manifest("a", "198.18.100.1", "70000", &["198.18.1.1"]);
        let b_new = manifest("b", "198.18.100.3", "80", &["198.18.2.1"]);
        write(&file, &format!("{a_bad}---\n{b_new}"));
        let after = src.load().expect("load");
        let a = id("t", "a", "http", Protocol::Tcp);
        let b = id("t", "b", "http", Protocol::Tcp);
        assert_eq!(after.services[&a], before.services[&a]);
        assert_eq!(vips(&after, &b), vec!["198.18.100.3:80"]);
        assert_eq!(src.errors().len(), 1, "{:?}", src.errors());
        let msg = &src.errors()[0];
        assert!(msg.contains("svc.yaml"), "{msg}");
        assert!(msg.contains("document 1"), "{msg}");
        assert!(msg.contains("Service t/a"), "{msg}");
        assert!(msg.contains("spec.ports[0].port"), "{msg}");
        assert!(msg.contains("70000"), "{msg}");

        // A type error (port is not a number) also names object and field, and also keeps
        // the previous version.
        let a_typo = a_ok.replace("port: 80\n", "port: eighty\n");
        write(&file, &format!("{a_typo}---\n{b_new}"));
        let typo = src.load().expect("load");
        assert_eq!(typo.services[&a], before.services[&a]);
        let msg = &src.errors()[0];
        assert!(msg.contains("Service t/a: spec.ports[0].port: "), "{msg}");

        // Fixing it applies again and clears the error.
        let a_fixed = manifest("a", "198.18.100.1", "81", &["198.18.1.1"]);
        write(&file, &format!("{a_fixed}---\n{b_new}"));
        let fixed = src.load().expect("load");
        assert_eq!(vips(&fixed, &a), vec!["198.18.100.1:81"]);
        assert!(src.errors().is_empty(), "{:?}", src.errors());
    }

    #[test]
    fn invalid_new_object_is_reported_and_not_added() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("svc.yaml");
        let bad = manifest("a", "198.18.100.300", "80", &["198.18.1.1"]);
        write(&file, &bad);
        let mut src = FileSource::new(&file);
        let state = src.load().expect("load");
        assert!(state.services.is_empty());
        assert_eq!(src.errors().len(), 1, "{:?}", src.errors());
        assert!(
            src.errors()[0].contains("Service t/a: spec.clusterIP: \"198.18.100.300\""),
            "{:?}",
            src.errors()
        );
    }

    #[test]
    fn deleted_document_removes_the_service() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("svc.yaml");
        let a = manifest("a", "198.18.100.1", "80", &["198.18.1.1"]);
        let b = manifest("b", "198.18.100.2", "80", &["198.18.2.1"]);
        write(&file, &format!("{a}---\n{b}"));
        let mut src = FileSource::new(&file);
        assert_eq!(src.load().expect("load").services.len(), 2);
        write(&file, &b);
        let state = src.load().expect("load");
        let names: Vec<_> = state.services.keys().map(|k| k.name.clone()).collect();
        assert_eq!(names, vec!["b"]);
    }

    #[test]
    fn deleted_file_removes_its_services() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            &dir.path().join("a.yaml"),
            &manifest("a", "198.18.100.1", "80", &[]),
        );
        write(
            &dir.path().join("b.yml"),
            &manifest("b", "198.18.100.2", "80", &[]),
        );
        let mut src = FileSource::new(dir.path());
        assert_eq!(src.load().expect("load").services.len(), 2);
        std::fs::remove_file(dir.path().join("a.yaml")).expect("rm");
        let state = src.load().expect("load");
        let names: Vec<_> = state.services.keys().map(|k| k.name.clone()).collect();
        assert_eq!(names, vec!["b"]);
    }

    #[test]
    fn unparsable_file_keeps_everything_it_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("svc.yaml");
        let other = dir.path().join("other.yaml");
        let a = manifest("a", "198.18.100.1", "80", &["198.18.1.1"]);
        write(&file, &a);
        write(&other, &manifest("c", "198.18.100.5", "80", &[]));
        let mut src = FileSource::new(dir.path());
        let before = src.load().expect("load");
        // Half-saved file: broken YAML (an unclosed flow sequence).
        write(&file, "apiVersion: v1\nkind: Service\nmetadata: {name: a\n");
        write(&other, &manifest("c", "198.18.100.6", "80", &[]));
        let after = src.load().expect("load");
        let a_id = id("t", "a", "http", Protocol::Tcp);
        assert_eq!(after.services[&a_id], before.services[&a_id]);
        assert_eq!(
            vips(&after, &id("t", "c", "http", Protocol::Tcp)),
            vec!["198.18.100.6:80"]
        );
        assert_eq!(src.errors().len(), 1, "{:?}", src.errors());
        assert!(
            src.errors()[0].contains("svc.yaml: invalid YAML"),
            "{:?}",
            src.errors()
        );
    }

    #[test]
    fn document_without_a_name_keeps_the_files_objects() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("svc.yaml");
        let a = manifest("a", "198.18.100.1", "80", &["198.18.1.1"]);
        write(&file, &a);
        let mut src = FileSource::new(&file);
        let before = src.load().expect("load");
        // The name line was deleted by mistake.
        write(&file, &a.replacen("  name: a\n", "", 1));
        let after = src.load().expect("load");
        assert_eq!(after, before);
        assert!(
            src.errors()
                .iter()
                .any(|e| e.contains("Service t/<unnamed>: metadata.name: missing")),
            "{:?}",
            src.errors()
        );
    }

    #[test]
    fn the_same_object_in_two_files_is_an_error_and_the_first_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            &dir.path().join("1.yaml"),
            &manifest("a", "198.18.100.1", "80", &[]),
        );
        write(
            &dir.path().join("2.yaml"),
            &manifest("a", "198.18.100.2", "80", &[]),
        );
        let mut src = FileSource::new(dir.path());
        let state = src.load().expect("load");
        assert_eq!(
            vips(&state, &id("t", "a", "http", Protocol::Tcp)),
            vec!["198.18.100.1:80"]
        );
        // The Service and the EndpointSlice are both defined twice.
        assert_eq!(src.errors().len(), 2, "{:?}", src.errors());
        assert!(
            src.errors()[0].contains("also defined in"),
            "{:?}",
            src.errors()
        );
    }

    #[test]
    fn missing_path_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut src = FileSource::new(dir.path().join("nope"));
        let err = src.load().expect_err("missing path");
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
    }

    #[test]
    fn quick_same_size_rewrite_is_noticed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("svc.yaml");
        write(&file, &manifest("a", "198.18.100.1", "80", &[]));
        let mut src = FileSource::new(&file);
        src.load().expect("load");
        assert!(src.poll().expect("poll").is_none(), "nothing changed yet");
        // Same length, written right away: size and (coarse) mtime may be unchanged.
        write(&file, &manifest("a", "198.18.100.2", "80", &[]));
        assert!(
            src.poll().expect("poll").is_none(),
            "loaded on the second look"
        );
        let state = src.poll().expect("poll").expect("a change");
        assert_eq!(
            vips(&state, &id("t", "a", "http", Protocol::Tcp)),
            vec!["198.18.100.2:80"]
        );
    }

    #[test]
    fn a_file_caught_between_truncate_and_write_is_not_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("svc.yaml");
        write(&file, &manifest("a", "198.18.100.1", "80", &[]));
        let mut src = FileSource::new(&file);
        src.load().expect("load");
        // An in-place save truncates first; a poll may see the empty file.
        write(&file, "");
        assert!(src.poll().expect("poll").is_none());
        write(&file, &manifest("a", "198.18.100.22", "80", &[]));
        assert!(src.poll().expect("poll").is_none());
        let state = src.poll().expect("poll").expect("the settled change");
        assert_eq!(
            vips(&state, &id("t", "a", "http", Protocol::Tcp)),
            vec!["198.18.100.22:80"]
        );
    }

    /// Waits until the watched state satisfies `f`, at most `limit`.
    async fn wait_for(
        rx: &mut watch::Receiver<Update>,
        limit: Duration,
        f: impl Fn(&DesiredState) -> bool,
    ) -> Duration {
        let start = Instant::now();
        tokio::time::timeout(limit, rx.wait_for(|u| f(&u.state)))
            .await
            .unwrap_or_else(|_| panic!("state did not change within {limit:?}"))
            .expect("source stopped");
        start.elapsed()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_applies_edits_live() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("svc.yaml");
        write(&file, &manifest("a", "198.18.100.1", "80", &["198.18.1.1"]));
        let (tx, mut rx) = watch::channel(Update::new(DesiredState::default(), false));
        let task = tokio::spawn(FileSource::new(dir.path()).run(tx));
        let a = id("t", "a", "http", Protocol::Tcp);
        wait_for(&mut rx, Duration::from_secs(5), |s| {
            s.services.contains_key(&a)
        })
        .await;

        // An in-place edit: a second endpoint.
        write(
            &file,
            &manifest("a", "198.18.100.1", "80", &["198.18.1.1", "198.18.1.2"]),
        );
        let took = wait_for(&mut rx, Duration::from_secs(1), |s| {
            s.services.get(&a).is_some_and(|p| p.endpoints.len() == 2)
        })
        .await;
        assert!(took < Duration::from_secs(1), "{took:?}");

        // An editor's save: write a temporary file, rename it over the original.
        let tmp = dir.path().join(".svc.yaml.swp");
        write(&tmp, &manifest("a", "198.18.100.7", "80", &["198.18.1.2"]));
        std::fs::rename(&tmp, &file).expect("rename");
        wait_for(&mut rx, Duration::from_secs(1), |s| {
            s.services
                .get(&a)
                .is_some_and(|p| p.frontends[0].addr.to_string() == "198.18.100.7")
        })
        .await;

        // An invalid Service keeps its previous version while its (valid) EndpointSlice
        // changes: objects are independent. A new file adds a service.
        write(&file, &manifest("a", "198.18.100.9", "0", &["198.18.1.3"]));
        write(
            &dir.path().join("b.yaml"),
            &manifest("b", "198.18.100.8", "80", &[]),
        );
        let b = id("t", "b", "http", Protocol::Tcp);
        wait_for(&mut rx, Duration::from_secs(1), |s| {
            s.services.contains_key(&b)
        })
        .await;
        let now = rx.borrow().state.clone();
        assert_eq!(vips(&now, &a), vec!["198.18.100.7:80"]);
        assert_eq!(backends(&now, &a), vec!["198.18.1.3:8080"]);

        // Removing the document removes the service.
        write(&file, "");
        wait_for(&mut rx, Duration::from_secs(1), |s| {
            !s.services.contains_key(&a)
        })
        .await;

        // Dropping the receiver stops the source.
        drop(rx);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("run stops when the receiver is dropped")
            .expect("task")
            .expect("run");
    }

    #[tokio::test]
    async fn run_fails_when_the_path_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, _rx) = watch::channel(Update::new(DesiredState::default(), false));
        let err = FileSource::new(dir.path().join("missing"))
            .run(tx)
            .await
            .expect_err("missing path");
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
    }
}
