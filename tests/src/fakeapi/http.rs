//! Serving: the accept loop (which also plays the outages), one HTTP/1.1 connection,
//! routing a path to a kind or a discovery document, and the request handler that hands
//! lists and watches to [`super::list`] and [`super::watches`].

use super::list::{list, Filter};
use super::query::parse_query;
use super::responses::{error_response, full, Body};
use super::store::{Kind, Outage, RequestRecord, Shared};
use super::watches::start_watch;
use anyhow::{Context as _, Result};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Binds 127.0.0.1:`port` inside network namespace `ns` (by its `/run/netns` name), or in
/// the current one. A socket stays in the namespace it was created in, whichever thread
/// later uses it, so only a short-lived thread switches namespace.
pub fn bind_loopback(ns: Option<&str>, port: u16) -> Result<std::net::TcpListener> {
    let Some(ns) = ns else {
        return std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("binding 127.0.0.1:{port}"));
    };
    crate::netns::run_in_netns(ns, || {
        std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("binding 127.0.0.1:{port}"))
    })
    .with_context(|| format!("in network namespace {ns}"))
}

pub(crate) async fn accept_loop(
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

pub(crate) async fn serve_connection(shared: Arc<Shared>, stream: tokio::net::TcpStream) {
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

/// What a request path names.
pub(crate) enum Target {
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

pub(crate) fn route(path: &str) -> Option<Target> {
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

pub(crate) fn resource_list(group_version: &str, kinds: &[Kind]) -> Value {
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

pub(crate) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
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

pub(crate) fn get_object(
    shared: &Shared,
    kind: Kind,
    namespace: &str,
    name: &str,
) -> Response<Body> {
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
