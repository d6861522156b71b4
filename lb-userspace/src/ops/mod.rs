//! Operating the agent: `/metrics` (Prometheus text format), `/healthz`, `/readyz` on
//! `--metrics-bind`, and the healthCheckNodePort servers ([`HealthChecks`]).
//!
//! ```no_run
//! # async fn agent() -> Result<(), Box<dyn std::error::Error>> {
//! use lb_userspace::ops::{Ops, SyncOutcome};
//! let ops = Ops::new("/sys/fs/bpf/xdplb");
//! let _server = ops.serve("127.0.0.1:10249".parse()?).await?;
//! let hc = ops.health_checks("0.0.0.0".parse()?)?;
//! // after every sync:
//! # let (stats, state, since) = (Default::default(), Default::default(), std::time::Instant::now());
//! ops.record_sync(SyncOutcome::Applied(&stats), since, false);
//! hc.update(&state);
//! ops.set_ready(); // after the first full sync
//! // on every turn of the main loop:
//! ops.heartbeat();
//! # Ok(()) }
//! ```

pub mod health;
pub mod mapcount;
pub mod metrics;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

pub use health::{HealthChecks, HealthService};
pub use metrics::{MapCollector, MapReadings};

use crate::reconciler::ApplyStats;

/// Default of `--metrics-bind` (kube-proxy's metrics port, on loopback).
pub const DEFAULT_METRICS_BIND: &str = "127.0.0.1:10249";

/// `/healthz` fails when the main loop has not called [`Ops::heartbeat`] for this long.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(20);

/// Buckets of `xdplb_event_to_maps_seconds`: 100 µs to 1 s.
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("binding the metrics server to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    NoRuntime(#[from] health::NoRuntime),
}

/// Whether the agent's main loop is turning and whether it finished its first sync;
/// shared by `/healthz`, `/readyz` and the healthCheckNodePort answers
/// (`serviceProxyHealthy`).
#[derive(Clone, Debug)]
pub struct Liveness {
    inner: Arc<LivenessInner>,
}

#[derive(Debug)]
struct LivenessInner {
    started: Instant,
    stall_after: Duration,
    ready: AtomicBool,
    /// Milliseconds since `started` of the last heartbeat, plus one (0: none yet).
    last_beat: AtomicU64,
}

impl Liveness {
    pub fn new(stall_after: Duration) -> Self {
        Self {
            inner: Arc::new(LivenessInner {
                started: Instant::now(),
                stall_after,
                ready: AtomicBool::new(false),
                last_beat: AtomicU64::new(0),
            }),
        }
    }

    pub fn heartbeat(&self) {
        let ms = self.inner.started.elapsed().as_millis() as u64;
        self.inner.last_beat.store(ms + 1, Ordering::Relaxed);
    }

    pub fn set_ready(&self) {
        self.inner.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    /// How long the main loop has not turned; `None` before its first turn.
    pub fn stalled_for(&self) -> Option<Duration> {
        match self.inner.last_beat.load(Ordering::Relaxed) {
            0 => None,
            b => Some(
                self.inner
                    .started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(b - 1)),
            ),
        }
    }

    /// Healthy while the main loop turns. Before its first turn (loading, first sync) the
    /// agent counts as healthy: readiness, not liveness, says it is not serving yet, and a
    /// slow first list must not get it restarted.
    pub fn is_healthy(&self) -> bool {
        self.stalled_for()
            .is_none_or(|d| d < self.inner.stall_after)
    }
}

/// How a sync ended, for `xdplb_syncs_total{result}`.
#[derive(Clone, Copy, Debug)]
pub enum SyncOutcome<'a> {
    /// Every service port applied.
    Applied(&'a ApplyStats),
    /// Some service ports could not be applied (their previous state stays).
    Partial(&'a ApplyStats),
    /// The maps could not be written.
    Failed,
}

type ResultLabel = [(&'static str, &'static str); 1];

struct Inner {
    registry: Registry,
    liveness: Liveness,
    syncs: Family<ResultLabel, Counter>,
    resyncs: Counter,
    map_writes: Counter,
    event_to_maps: Histogram,
    ready: Gauge,
}

/// Metrics and health state of one agent. Cheap to clone (shared).
#[derive(Clone)]
pub struct Ops {
    inner: Arc<Inner>,
}

impl Ops {
    /// Metrics read the maps pinned in `pin_dir` at every scrape (they need not exist yet).
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        Self::with_stall_after(pin_dir, DEFAULT_STALL_AFTER)
    }

    pub fn with_stall_after(pin_dir: impl Into<PathBuf>, stall_after: Duration) -> Self {
        let mut registry = Registry::default();
        let syncs = Family::<ResultLabel, Counter>::default();
        // Every result shows from the start, so rate() and alerts see zeros, not gaps.
        for r in ["ok", "partial", "error"] {
            let _ = syncs.get_or_create(&[("result", r)]);
        }
        let resyncs = Counter::default();
        let map_writes = Counter::default();
        let event_to_maps = Histogram::new(LATENCY_BUCKETS);
        let ready = Gauge::default();
        registry.register(
            "xdplb_syncs",
            "Syncs of the desired state to the maps, by result (ok, partial: some service ports kept their previous state, error: the maps could not be written)",
            syncs.clone(),
        );
        registry.register(
            "xdplb_resyncs",
            "Syncs that followed a full (re)list of the source",
            resyncs.clone(),
        );
        registry.register(
            "xdplb_map_writes",
            "Map write calls made by syncs (a Maglev table counts once)",
            map_writes.clone(),
        );
        registry.register(
            "xdplb_event_to_maps_seconds",
            "Time from the source receiving a change to the maps holding it",
            event_to_maps.clone(),
        );
        registry.register(
            "xdplb_ready",
            "1 once the first full sync is in the maps",
            ready.clone(),
        );
        registry.register_collector(Box::new(MapCollector::new(pin_dir)));
        Self {
            inner: Arc::new(Inner {
                registry,
                liveness: Liveness::new(stall_after),
                syncs,
                resyncs,
                map_writes,
                event_to_maps,
                ready,
            }),
        }
    }

    pub fn liveness(&self) -> &Liveness {
        &self.inner.liveness
    }

    /// After the first full sync: `/readyz` turns 200.
    pub fn set_ready(&self) {
        self.inner.liveness.set_ready();
        self.inner.ready.set(1);
    }

    /// Once per turn of the main loop: `/healthz` stays 200.
    pub fn heartbeat(&self) {
        self.inner.liveness.heartbeat();
    }

    /// Counts a sync; `since` is `Update::since` (when the source saw the first change the
    /// sync carries), observed into `xdplb_event_to_maps_seconds` unless the sync failed.
    pub fn record_sync(&self, outcome: SyncOutcome<'_>, since: Instant, resync: bool) {
        let (result, stats) = match outcome {
            SyncOutcome::Applied(s) => ("ok", Some(s)),
            SyncOutcome::Partial(s) => ("partial", Some(s)),
            SyncOutcome::Failed => ("error", None),
        };
        self.inner.syncs.get_or_create(&[("result", result)]).inc();
        if resync {
            self.inner.resyncs.inc();
        }
        if let Some(s) = stats {
            self.inner.map_writes.inc_by(s.writes() as u64);
            self.inner
                .event_to_maps
                .observe(since.elapsed().as_secs_f64());
        }
    }

    /// The `/metrics` page (reads the maps: blocking syscalls).
    pub fn render_metrics(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.inner.registry)?;
        Ok(out)
    }

    /// `/metrics`, `/healthz`, `/readyz`.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/healthz", get(healthz_handler))
            .route("/readyz", get(readyz_handler))
            .with_state(self.clone())
    }

    /// Binds `addr` (an error if it cannot: a wrong `--metrics-bind` should stop the agent)
    /// and serves [`Ops::router`] until the returned [`Serving`] is dropped.
    pub async fn serve(&self, addr: SocketAddr) -> Result<Serving, OpsError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| OpsError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| OpsError::Bind { addr, source })?;
        let app = self.router();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(%local_addr, "metrics server stopped: {e}");
            }
        });
        Ok(Serving { local_addr, task })
    }

    /// The healthCheckNodePort servers, answering `serviceProxyHealthy` from this agent's
    /// liveness. Call inside the tokio runtime.
    pub fn health_checks(&self, addr: IpAddr) -> Result<HealthChecks, OpsError> {
        Ok(HealthChecks::new(addr, self.inner.liveness.clone())?)
    }
}

/// A running metrics server; stops when dropped.
pub struct Serving {
    pub local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

async fn metrics_handler(
    State(ops): State<Ops>,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    // Reading the maps is a few thousand syscalls: keep them off the async workers.
    match tokio::task::spawn_blocking(move || ops.render_metrics()).await {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            body,
        ),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, TEXT)],
            format!("encoding metrics: {e}\n"),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, TEXT)],
            format!("reading metrics: {e}\n"),
        ),
    }
}

async fn healthz_handler(
    State(ops): State<Ops>,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    let l = ops.liveness();
    let (status, body) = match l.stalled_for() {
        Some(d) if !l.is_healthy() => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("main loop stalled for {:.1}s\n", d.as_secs_f64()),
        ),
        _ => (StatusCode::OK, "ok\n".to_owned()),
    };
    (status, [(header::CONTENT_TYPE, TEXT)], body)
}

async fn readyz_handler(
    State(ops): State<Ops>,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    let l = ops.liveness();
    let (status, body) = if !l.is_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first full sync\n",
        )
    } else if !l.is_healthy() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: main loop stalled\n",
        )
    } else {
        (StatusCode::OK, "ok\n")
    };
    (status, [(header::CONTENT_TYPE, TEXT)], body.to_owned())
}
