//! healthCheckNodePort servers, as kube-proxy runs them: for every Service of type
//! LoadBalancer with `externalTrafficPolicy: Local`, an HTTP listener on its
//! `healthCheckNodePort` that tells the cloud load balancer whether this node has local
//! endpoints (200) or not (503), so that it only sends traffic to nodes that can serve it
//! without a second hop.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::http::{header, HeaderName, StatusCode};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::Liveness;
use crate::model::DesiredState;

/// How often ports that could not be bound are tried again.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// The Service a healthCheckNodePort answers for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HealthService {
    pub namespace: String,
    pub name: String,
    /// Distinct addresses of this node's ready endpoints over all the Service's ports
    /// (kube-proxy counts 10.0.0.1:80 and 10.0.0.1:443 as one endpoint).
    pub local_endpoints: usize,
}

/// A healthCheckNodePort also claimed by another Service: (port, namespace, name of the
/// Service that does not get it).
pub type PortConflict = (u16, String, String);

/// Port → Service from a desired state. A port claimed by two Services (the API server
/// allocates them uniquely, so only a broken source produces this) goes to the first by
/// namespace and name; the others are returned for logging.
pub fn wanted_ports(state: &DesiredState) -> (BTreeMap<u16, HealthService>, Vec<PortConflict>) {
    // Per Service: its healthCheckNodePorts and the addresses of its local endpoints.
    type PerService = (BTreeSet<u16>, BTreeSet<IpAddr>);
    let mut by_svc: BTreeMap<(&str, &str), PerService> = BTreeMap::new();
    for (id, st) in &state.services {
        let e = by_svc
            .entry((id.namespace.as_str(), id.name.as_str()))
            .or_default();
        if let Some(p) = st.health_check_node_port {
            e.0.insert(p);
        }
        // kube-proxy counts only ready endpoints, so that a node whose pods are all
        // terminating fails the check and the load balancer drains it. The state does
        // not say which local endpoints are ready; a local endpoint that is not also in
        // the cluster-wide set is a terminating fallback (the cluster has ready ones
        // elsewhere) and is left out. When no endpoint is ready anywhere both sets are
        // the terminating ones and are counted, where kube-proxy would answer 503.
        e.1.extend(
            st.local_endpoints
                .iter()
                .filter(|ep| st.endpoints.contains(ep))
                .map(|ep| ep.addr),
        );
    }
    let mut ports = BTreeMap::new();
    let mut conflicts = Vec::new();
    for ((ns, name), (hc_ports, ips)) in by_svc {
        for p in hc_ports {
            if p == 0 {
                continue;
            }
            if ports.contains_key(&p) {
                conflicts.push((p, ns.to_owned(), name.to_owned()));
                continue;
            }
            ports.insert(
                p,
                HealthService {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                    local_endpoints: ips.len(),
                },
            );
        }
    }
    (ports, conflicts)
}

/// kube-proxy's answer: 200 when the Service has local endpoints and the proxy is healthy,
/// 503 otherwise, with the same JSON body (Go's tab-indented layout).
pub fn response(svc: &HealthService, proxy_healthy: bool) -> (StatusCode, String) {
    let status = if svc.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let q = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        q(&svc.namespace),
        q(&svc.name),
        svc.local_endpoints,
        proxy_healthy
    );
    (status, body)
}

struct State {
    addr: IpAddr,
    services: BTreeMap<u16, HealthService>,
    listeners: BTreeMap<u16, JoinHandle<()>>,
    /// Last bind error logged per port, so a retry every few seconds logs only changes.
    bind_errors: BTreeMap<u16, String>,
}

/// The healthCheckNodePort listeners. Create it inside the agent's tokio runtime; call
/// [`HealthChecks::update`] after every sync. Listeners close when it is dropped.
pub struct HealthChecks {
    state: Arc<Mutex<State>>,
    liveness: Liveness,
    rt: tokio::runtime::Handle,
    retry: JoinHandle<()>,
}

/// [`HealthChecks::new`] was called outside a tokio runtime.
#[derive(Debug, thiserror::Error)]
#[error("health-check servers need a tokio runtime")]
pub struct NoRuntime;

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A handler that panicked while holding the lock left the state consistent (it only
    // reads); keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HealthChecks {
    /// Listeners will bind `addr` (`--health-check-address`). `0.0.0.0` means every
    /// address of both families, as in kube-proxy (IPv4 only on a node without IPv6).
    pub fn new(addr: IpAddr, liveness: Liveness) -> Result<Self, NoRuntime> {
        Self::with_retry(addr, liveness, RETRY_INTERVAL)
    }

    /// [`HealthChecks::new`] retrying unbindable ports every `retry` instead.
    pub fn with_retry(
        addr: IpAddr,
        liveness: Liveness,
        retry: Duration,
    ) -> Result<Self, NoRuntime> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| NoRuntime)?;
        let state = Arc::new(Mutex::new(State {
            addr,
            services: BTreeMap::new(),
            listeners: BTreeMap::new(),
            bind_errors: BTreeMap::new(),
        }));
        let retry = {
            let state = Arc::clone(&state);
            let liveness = liveness.clone();
            let rt2 = rt.clone();
            rt.spawn(async move {
                let mut tick = tokio::time::interval(retry);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    open_missing(&state, &liveness, &rt2);
                }
            })
        };
        Ok(Self {
            state,
            liveness,
            rt,
            retry,
        })
    }

    /// Makes the listeners match the state: opens new ports, closes ports no Service uses
    /// any more, updates the local endpoint counts. Ports that cannot be bound are logged
    /// and retried every [`RETRY_INTERVAL`].
    pub fn update(&self, desired: &DesiredState) {
        let (wanted, conflicts) = wanted_ports(desired);
        for (port, ns, name) in conflicts {
            warn!(port, service = %format!("{ns}/{name}"), "healthCheckNodePort already used by another service; not served for this one");
        }
        {
            let mut st = lock(&self.state);
            let gone: Vec<u16> = st
                .listeners
                .keys()
                .filter(|p| !wanted.contains_key(p))
                .copied()
                .collect();
            for p in gone {
                if let Some(task) = st.listeners.remove(&p) {
                    // Dropping the serve future closes the listening socket at once.
                    task.abort();
                    info!(port = p, "healthCheckNodePort closed");
                }
            }
            st.bind_errors.retain(|p, _| wanted.contains_key(p));
            st.services = wanted;
        }
        open_missing(&self.state, &self.liveness, &self.rt);
    }

    /// Ports with an open listener.
    pub fn listening(&self) -> Vec<u16> {
        lock(&self.state).listeners.keys().copied().collect()
    }

    /// Ports wanted but not bound (yet), with the last error.
    pub fn failing(&self) -> Vec<(u16, String)> {
        let st = lock(&self.state);
        st.bind_errors
            .iter()
            .filter(|(p, _)| !st.listeners.contains_key(p))
            .map(|(p, e)| (*p, e.clone()))
            .collect()
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.retry.abort();
        for (_, task) in std::mem::take(&mut lock(&self.state).listeners) {
            task.abort();
        }
    }
}

fn open_missing(state: &Arc<Mutex<State>>, liveness: &Liveness, rt: &tokio::runtime::Handle) {
    let mut st = lock(state);
    let missing: Vec<u16> = st
        .services
        .keys()
        .filter(|p| !st.listeners.contains_key(p))
        .copied()
        .collect();
    for port in missing {
        let addr = SocketAddr::new(st.addr, port);
        match bind(addr, rt) {
            Ok(listener) => {
                let app = router(Arc::clone(state), port, liveness.clone());
                let task = rt.spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        warn!(port, "healthCheckNodePort server stopped: {e}");
                    }
                });
                st.listeners.insert(port, task);
                st.bind_errors.remove(&port);
                info!(%addr, "healthCheckNodePort listening");
            }
            Err(e) => {
                let msg = e.to_string();
                if st.bind_errors.get(&port) != Some(&msg) {
                    warn!(%addr, "cannot listen on healthCheckNodePort (will retry): {msg}");
                }
                st.bind_errors.insert(port, msg);
            }
        }
    }
}

fn bind(addr: SocketAddr, rt: &tokio::runtime::Handle) -> std::io::Result<tokio::net::TcpListener> {
    // std's bind (SO_REUSEADDR on Unix) is synchronous, so update() needs no .await and
    // reports the error right away; the socket then joins the runtime's reactor.
    let l = if addr.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
        // kube-proxy's "0.0.0.0" (Go's) listens on every address of both families, so a
        // load balancer health-checking nodes over IPv6 gets an answer too: `[::]` does
        // that with Linux's default `net.ipv6.bindv6only=0`. Without IPv6 on the node,
        // IPv4 only.
        match std::net::TcpListener::bind(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            addr.port(),
        )) {
            Ok(l) => l,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                ) =>
            {
                std::net::TcpListener::bind(addr)?
            }
            Err(e) => return Err(e),
        }
    } else {
        std::net::TcpListener::bind(addr)?
    };
    l.set_nonblocking(true)?;
    let _guard = rt.enter();
    tokio::net::TcpListener::from_std(l)
}

fn router(state: Arc<Mutex<State>>, port: u16, liveness: Liveness) -> axum::Router {
    // kube-proxy answers on every path and method; so do we.
    axum::Router::new().fallback(move || {
        let state = Arc::clone(&state);
        let liveness = liveness.clone();
        async move {
            let svc = lock(&state).services.get(&port).cloned();
            let nosniff = (HeaderName::from_static("x-content-type-options"), "nosniff");
            match svc {
                Some(svc) => {
                    let (status, body) = response(&svc, liveness.is_healthy());
                    (
                        status,
                        [(header::CONTENT_TYPE, "application/json"), nosniff],
                        body,
                    )
                }
                // The port is being closed: the service went away.
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::CONTENT_TYPE, "text/plain"), nosniff],
                    "no service\n".to_owned(),
                ),
            }
        }
    })
}
