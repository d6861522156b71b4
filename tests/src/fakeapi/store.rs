//! The server's state: the objects by kind, namespace and name, the resourceVersion
//! counter and the history that watches resume from, the request log, and what the
//! serving side shares with the control API ([`Shared`]).

use super::query::parse_query;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, watch};

/// How many history events a lagging watcher may fall behind before its watch is ended
/// with 410 (the API server's watch cache behaves the same way).
pub(crate) const BROADCAST_CAPACITY: usize = 4096;
pub(crate) const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(5);

/// The kinds this server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub(crate) fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    pub(crate) fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    pub(crate) fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    pub(crate) fn namespaced(self) -> bool {
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
pub(crate) struct Event {
    pub(crate) rv: u64,
    pub(crate) kind: Kind,
    /// ADDED, MODIFIED or DELETED.
    pub(crate) typ: &'static str,
    /// The object with `kind`, `apiVersion` and `metadata.resourceVersion == rv`.
    pub(crate) object: Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outage {
    None,
    /// The listening socket is closed: connections are refused (RST to the SYN).
    Refuse,
    /// Connections are accepted and requests read, but nothing is answered and open
    /// watches send nothing until [`FakeApi::resume`].
    Hang,
}

pub(crate) struct Store {
    /// The last resourceVersion handed out (etcd's revision: global over all kinds).
    pub(crate) rv: u64,
    /// Watches from a resourceVersion below this get 410 (history before it is gone).
    pub(crate) floor: u64,
    pub(crate) objects: BTreeMap<(Kind, String, String), Value>,
    pub(crate) history: Vec<Event>,
    /// List snapshots for `continue` tokens: token → (rv, remaining items).
    pub(crate) pages: HashMap<String, (u64, Vec<Value>)>,
    pub(crate) next_page: u64,
    pub(crate) next_uid: u64,
    pub(crate) requests: Vec<RequestRecord>,
    pub(crate) bookmark_interval: Duration,
}

pub(crate) struct Shared {
    pub(crate) store: Mutex<Store>,
    pub(crate) events: broadcast::Sender<Event>,
    /// Bumped to end every open watch stream abruptly.
    pub(crate) kill_watches: watch::Sender<u64>,
    /// Bumped to close every open connection (outage).
    pub(crate) kill_conns: watch::Sender<u64>,
    pub(crate) outage: watch::Sender<Outage>,
    /// Whether the port listens right now (set by the accept loop).
    pub(crate) listening: watch::Sender<bool>,
    pub(crate) open_watches: Mutex<usize>,
}

impl Shared {
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves consistent data (every mutation is a
        // single step), so a poisoned lock is still usable.
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The current time as RFC 3339 (UTC, seconds), as `creationTimestamp` is written.
pub(crate) fn rfc3339_now() -> String {
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
