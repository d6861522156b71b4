//! Watches: the initial events (current objects, history after a resourceVersion, or a
//! 410 when that history is gone) taken under the store lock with the live subscription,
//! then a task streaming changes and bookmarks until a deadline or the test cuts it.

use super::list::Filter;
use super::responses::{error_response, status_object, Body};
use super::store::{Event, Kind, Outage, Shared};
use bytes::Bytes;
use futures::channel::mpsc;
use futures::SinkExt as _;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

pub(crate) fn event_line(typ: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": typ, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

pub(crate) fn bookmark(kind: Kind, rv: u64, initial_end: bool) -> Value {
    let mut md = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": md})
}

pub(crate) struct WatchGuard(Arc<Shared>);

impl WatchGuard {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
        *shared
            .open_watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        WatchGuard(Arc::clone(shared))
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut n = self
            .0
            .open_watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *n = n.saturating_sub(1);
    }
}

/// A watch request's query parameters.
struct WatchRequest {
    /// `allowWatchBookmarks`: periodic BOOKMARK events.
    bookmarks: bool,
    /// `sendInitialEvents=true`: the initial ADDED events end with a BOOKMARK.
    initial_events: bool,
    /// `timeoutSeconds`: the stream ends cleanly after it.
    timeout: Option<Duration>,
    /// `resourceVersion`: `None` (absent, "" or "0") starts with the current objects.
    from: Option<u64>,
}

impl WatchRequest {
    /// Reads the parameters; a malformed one is an error message for a 400 answer, as the
    /// API server gives.
    fn parse(params: &HashMap<String, String>) -> std::result::Result<Self, String> {
        let bookmarks = matches!(
            params.get("allowWatchBookmarks").map(String::as_str),
            Some("true" | "1")
        );
        let initial_events = params.get("sendInitialEvents").map(String::as_str) == Some("true");
        let timeout = match params.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
            None => None,
            Some(Ok(t)) => Some(Duration::from_secs(t)),
            Some(Err(_)) => return Err("invalid timeoutSeconds".to_string()),
        };
        let from = match params.get("resourceVersion").map(String::as_str) {
            None | Some("" | "0") => None,
            Some(rv) => match rv.parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => return Err(format!("invalid resource version {rv:?}")),
            },
        };
        Ok(WatchRequest {
            bookmarks,
            initial_events,
            timeout,
            from,
        })
    }
}

/// What a watch stream starts with and where it goes on from.
struct WatchStart {
    /// Event lines to send first.
    initial: Vec<Bytes>,
    /// Live changes after `last_rv`.
    rx: broadcast::Receiver<Event>,
    last_rv: u64,
    /// The requested resourceVersion is compacted away: the stream ends after `initial`
    /// (which holds the 410 ERROR event).
    gone: bool,
}

/// Everything the stream starts with, and its live subscription, taken under one lock so
/// that no event is missed or sent twice.
fn watch_start(shared: &Shared, filter: &Filter, request: &WatchRequest) -> WatchStart {
    let mut initial: Vec<Bytes> = Vec::new();
    let st = shared.store();
    let rx = shared.events.subscribe();
    let mut gone = false;
    match request.from {
        None => {
            for ((k, _, _), o) in &st.objects {
                if filter.matches(*k, o) {
                    initial.push(event_line("ADDED", o));
                }
            }
            if request.initial_events {
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
    WatchStart {
        initial,
        rx,
        last_rv: st.rv,
        gone,
    }
}

type FrameSender = mpsc::Sender<std::result::Result<Frame<Bytes>, std::io::Error>>;

/// Answers a watch request: a chunked stream fed by a task of its own (see
/// [`stream_watch`]).
pub(crate) fn start_watch(
    shared: &Arc<Shared>,
    filter: Filter,
    params: &HashMap<String, String>,
) -> Response<Body> {
    let request = match WatchRequest::parse(params) {
        Ok(request) => request,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    let start = watch_start(shared, &filter, &request);

    let (tx, body_rx) = mpsc::channel::<std::result::Result<Frame<Bytes>, std::io::Error>>(16);
    let body = StreamBody::new(body_rx).boxed();
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    tokio::spawn(stream_watch(Arc::clone(shared), filter, request, start, tx));
    resp
}

/// Sends the initial events, then live changes and bookmarks until the deadline, the
/// client going away, or the test cutting watches or connections.
async fn stream_watch(
    shared: Arc<Shared>,
    filter: Filter,
    request: WatchRequest,
    start: WatchStart,
    mut tx: FrameSender,
) {
    let _guard = WatchGuard::new(&shared);
    let WatchStart {
        initial,
        mut rx,
        mut last_rv,
        gone,
    } = start;
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
    let deadline = request.timeout.map(|t| tokio::time::Instant::now() + t);
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
            _ = ticker.tick(), if request.bookmarks && !hanging => {
                let line = event_line("BOOKMARK", &bookmark(filter.kind, last_rv, false));
                if tx.send(Ok(Frame::data(line))).await.is_err() {
                    return;
                }
            }
        }
    }
}
