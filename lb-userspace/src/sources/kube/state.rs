//! The event-handling core of the source: what each watcher event does to the store, which
//! errors are logged when, and when a new state is due.

use std::collections::{BTreeMap, BTreeSet};

use kube::runtime::watcher;

use super::incremental::Cache;
use super::watch::{Kind, KindEvent};
use crate::error_chain;
use crate::model::{DesiredState, NodeSettings};
use crate::sources::{Object, ObjectStore};
use crate::translate::{ObjectRef, TranslateError};

/// The event-handling core: pure (no I/O), so it is unit-tested with synthetic events.
#[derive(Debug)]
pub(super) struct Core {
    pub(super) node: NodeSettings,
    store: ObjectStore,
    /// Objects of a list in progress, per kind (between `Init` and `InitDone`).
    listing: [Option<Vec<Object>>; 3],
    /// The kind has completed a list.
    synced: [bool; 3],
    /// The store changed since the last translation.
    pub(super) dirty: bool,
    /// A list completed since the last update: the next update is a resync.
    resync: bool,
    /// Invalid objects and the error last logged for each (logged again only if it
    /// changes; forgotten once the object is valid or deleted).
    pub(super) invalid: BTreeMap<ObjectRef, String>,
    /// Warnings about valid objects (parts skipped) last logged, per object.
    object_warnings: BTreeMap<ObjectRef, Vec<String>>,
    /// Frontend conflicts as of the last translation.
    conflicts: BTreeSet<String>,
    /// Per kind: errors logged during the current outage.
    pub(super) errors: [BTreeSet<String>; 3],
    /// The most recent error of any kind, for the initial-sync timeout message.
    pub(super) last_error: Option<String>,
    pub(super) cache: Cache,
}

impl Core {
    pub(super) fn new(node: NodeSettings) -> Self {
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
    pub(super) fn synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }

    /// The kinds whose initial list has not completed, for messages.
    pub(super) fn waiting(&self) -> String {
        Kind::ALL
            .iter()
            .filter(|k| !self.synced[**k as usize])
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(super) fn store(&self) -> &ObjectStore {
        &self.store
    }

    /// Applies one watcher item.
    pub(super) fn handle(&mut self, kind: Kind, item: Result<KindEvent, watcher::Error>) {
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
    pub(super) fn event(&mut self, kind: Kind, ev: KindEvent) {
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
                let warnings: Vec<String> = warnings
                    .iter()
                    .map(std::string::ToString::to_string)
                    .collect();
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
    pub(super) fn take_state(&mut self) -> Option<(DesiredState, bool)> {
        if !self.synced() || !(self.dirty || self.resync) {
            return None;
        }
        let (translation, changed) = self.cache.translate(&self.store, &self.node);
        let conflicts: BTreeSet<String> = translation
            .conflicts
            .iter()
            .map(std::string::ToString::to_string)
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
