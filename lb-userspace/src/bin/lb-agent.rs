//! lb-agent: loads the XDP programs with pinned maps, keeps the maps equal to the services
//! of the Kubernetes API (or of a file or directory), and attaches to edge and pod
//! interfaces as they come and go.

use std::io::IsTerminal as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use lb_userspace::error_chain;
use lb_userspace::loader::{self, Attacher, IfaceEvent, ModeChoice};
use lb_userspace::maps::LbMaps;
use lb_userspace::model::{DesiredState, NodeSettings};
use lb_userspace::ops::{HealthChecks, Ops, Serving, SyncOutcome};
use lb_userspace::reconciler::{ApplyStats, ReconcileError, Reconciler};
use lb_userspace::sources::file::FileSource;
use lb_userspace::sources::kube::{self, KubeSource};
use lb_userspace::sources::Update;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, info, warn};

/// How often interfaces are listed to attach new pod veths (the contract: within a second).
const IFACE_POLL: Duration = Duration::from_millis(250);

#[derive(Parser, Debug)]
#[command(about = "xdplb agent: XDP service load balancing in place of kube-proxy")]
struct Args {
    /// Services and EndpointSlices (YAML/JSON as `kubectl get -o yaml` prints): a file or a
    /// directory of files, followed for changes. Without it, the Kubernetes API is watched.
    #[arg(long)]
    services: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API. Default: KUBECONFIG, ~/.kube/config, then the
    /// in-cluster service account.
    #[arg(long, conflicts_with = "services")]
    kubeconfig: Option<PathBuf>,
    /// This node's name: endpoints on it are local (traffic policy Local), its Node
    /// object's InternalIP/ExternalIP addresses carry the NodePorts. Kubernetes mode
    /// default: the hostname, as kube-proxy's. File mode default: none (every endpoint
    /// local).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// An address NodePorts also listen on, besides the Node object's; repeatable.
    #[arg(long = "nodeport-address")]
    nodeport_address: Vec<IpAddr>,
    /// How long the Kubernetes API may take to answer the first list of every kind
    /// (e.g. 60s, 500ms, 2m) before the agent gives up.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    initial_sync_timeout: Duration,
    /// Interface facing the outside (xdp_edge); repeatable.
    #[arg(long = "edge-iface")]
    edge_iface: Vec<String>,
    /// Pod interface name or glob (`cali*`, `veth*`) (xdp_pod); repeatable. Matching
    /// interfaces that appear later are attached too.
    #[arg(long = "pod-iface")]
    pod_iface: Vec<String>,
    /// bpffs directory the maps are pinned in (and reused from on restart).
    #[arg(long, default_value = loader::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// auto: native XDP on edge interfaces (generic when the driver refuses), generic on
    /// pod interfaces.
    #[arg(long, value_enum, default_value_t = ModeChoice::Auto)]
    xdp_mode: ModeChoice,
    /// Per-packet logging from the programs (aya-log); slow.
    #[arg(long)]
    debug: bool,
    /// Where /metrics (Prometheus), /healthz and /readyz are served.
    #[arg(long, default_value = lb_userspace::ops::DEFAULT_METRICS_BIND)]
    metrics_bind: std::net::SocketAddr,
    /// Address the healthCheckNodePort servers listen on; the default 0.0.0.0 means every
    /// address of both families, as kube-proxy.
    #[arg(long, default_value = "0.0.0.0")]
    health_check_address: IpAddr,
    /// Services for processes in the agent's own network namespace too (host-network
    /// pods, node daemons), as kube-proxy's OUTPUT rules give them: cgroup socket
    /// programs rewrite their connect()/sendmsg() to a backend. `false` turns it off.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    host_services: bool,
    /// cgroup v2 directory the socket programs attach to (its whole subtree is covered).
    /// Default: /sys/fs/cgroup, else /sys/fs/cgroup/unified; when nothing is mounted at
    /// /sys/fs/cgroup, cgroup2 is mounted there.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// What happens to the XDP programs when the agent stops. `detach`: removed (no
    /// service translation until an agent runs again). `keep`: they stay attached through
    /// their pinned links and keep balancing with the maps as they are, as kube-proxy's
    /// rules stay when it stops; the next agent swaps its programs in atomically
    /// (rolling updates without a gap). Removing the pin directory detaches them.
    #[arg(long, value_enum, default_value_t = OnExit::Detach)]
    on_exit: OnExit,
    /// Map capacities, fixed when the maps are created (memory is preallocated for them:
    /// about 155 MiB with the defaults on 2 CPUs, docs/benchmarks.md). A pin directory made
    /// with other values is refused; remove it to resize. Frontends: (address, port,
    /// protocol) triples, also the VIP address capacity.
    #[arg(long, default_value_t = lb_common::MAX_FRONTENDS, value_parser = capacity(1))]
    max_frontends: u32,
    /// Service ports (a Service's port with all its frontends).
    #[arg(long, default_value_t = lb_common::MAX_SERVICES, value_parser = capacity(1))]
    max_services: u32,
    /// Distinct backends (address, port) over all services.
    #[arg(long, default_value_t = lb_common::MAX_BACKENDS, value_parser = capacity(1))]
    max_backends: u32,
    /// Maglev slots of all service ports together: each port (and family) takes the
    /// smallest size of the ladder 101, 211, 431, 863, ... (primes, each about twice the
    /// last) with at least 20 slots per endpoint (211 for 10 endpoints; 1 for a single
    /// endpoint); 8 bytes of kernel memory a slot (array values are rounded up to 8).
    #[arg(
        long,
        default_value_t = lb_common::MAGLEV_SLOTS,
        value_parser = clap::value_parser!(u32)
            .range(i64::from(lb_common::MAGLEV_MIN_SIZE)..=i64::from(loader::MAX_CAPACITY_MAGLEV_SLOTS))
    )]
    maglev_slots: u32,
    /// Tracked connections (CT and RNAT have this many entries each; the oldest are
    /// evicted when full).
    #[arg(
        long,
        default_value_t = lb_common::MAX_FLOWS,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(loader::MAX_CAPACITY_FLOWS))
    )]
    max_flows: u32,
}

/// An id capacity flag: `min..=MAX_CAPACITY_IDS`.
fn capacity(min: i64) -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(min..=i64::from(loader::MAX_CAPACITY_IDS))
}

impl Args {
    fn capacities(&self) -> loader::Capacities {
        loader::Capacities {
            frontends: self.max_frontends,
            services: self.max_services,
            backends: self.max_backends,
            maglev_slots: self.maglev_slots,
            flows: self.max_flows,
            // Every VIP carries at least one frontend.
            vips: self.max_frontends,
            ..loader::Capacities::default()
        }
    }
}

/// `--on-exit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnExit {
    Detach,
    Keep,
}

/// `60s`, `500ms`, `2m` or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 60s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// The hostname, lower-cased, as kube-proxy's default node name.
fn hostname() -> anyhow::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("gethostname");
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_lowercase();
    if name.is_empty() {
        bail!("the hostname is empty");
    }
    Ok(name)
}

/// Where the services come from.
// One value, moved once into its task: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Source {
    File(FileSource),
    Kube(KubeSource),
}

impl Source {
    async fn run(self, tx: tokio::sync::watch::Sender<Update>) -> anyhow::Result<()> {
        match self {
            Source::File(s) => s.run(tx).await.map_err(Into::into),
            Source::Kube(s) => s.run(tx).await.map_err(Into::into),
        }
    }
}

/// Sets up the source and reads the first full state from it: the file(s), or the
/// Kubernetes API's initial lists.
async fn open_source(args: &Args) -> anyhow::Result<(Source, Update)> {
    let node_name = args.node_name.clone().filter(|n| !n.trim().is_empty());
    if let Some(path) = &args.services {
        let node = NodeSettings {
            name: node_name,
            extra_addresses: args.nodeport_address.clone(),
        };
        let mut source = FileSource::new(path).with_node(node);
        let state = source
            .load()
            .with_context(|| format!("reading services from {}", path.display()))?;
        return Ok((Source::File(source), Update::new(state, true)));
    }
    let name = match node_name {
        Some(n) => n,
        None => {
            let h = hostname().context("--node-name not given and no hostname to use")?;
            info!(node = %h, "--node-name not given (NODE_NAME unset): using the hostname, as kube-proxy does");
            h
        }
    };
    let client = kube::client(args.kubeconfig.as_deref())
        .await
        .context("connecting to the Kubernetes API")?;
    let node = NodeSettings {
        name: Some(name.clone()),
        extra_addresses: args.nodeport_address.clone(),
    };
    let mut source = KubeSource::new(client, node);
    info!(node = %name, "listing Services, EndpointSlices and this node's Node");
    let first = source
        .initial_sync(args.initial_sync_timeout)
        .await
        .context("reading services from the Kubernetes API")?;
    Ok((Source::Kube(source), first))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // The programs' aya-log records arrive at debug level under the `lb_ebpf` target;
    // --debug would show nothing without letting them through.
    // kube-client logs every failed request at error level, each retry of an outage
    // included; the Kubernetes source logs each distinct failure once instead.
    let default_filter = if args.debug {
        "info,lb_ebpf=debug,kube_client::client::builder=off"
    } else {
        "info,kube_client::client::builder=off"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
    // The one place errors are printed: the whole context chain, on one line.
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn log_events(events: Vec<IfaceEvent>) {
    for ev in events {
        match ev {
            IfaceEvent::Attached {
                name,
                ifindex,
                role,
                mode,
                flags,
                fell_back,
            } => {
                if let Some(why) = fell_back {
                    warn!(iface = %name, "native XDP refused, using generic: {why}");
                }
                let role = if role == lb_common::IFACE_ROLE_EDGE {
                    "edge"
                } else {
                    "pod"
                };
                info!(iface = %name, ifindex, role, ?mode, flags, "attached");
            }
            IfaceEvent::Forgotten { name, ifindex } => {
                info!(iface = %name, ifindex, "interface gone, forgotten");
            }
            IfaceEvent::Failed { name, error } => {
                warn!(iface = %name, "attach failed: {}", error_chain(&error));
            }
        }
    }
}

/// Applies a state; failures of single services are logged, map errors returned. The
/// flag is false when some service ports kept their previous state.
fn apply<W: lb_userspace::maps::MapWriter>(
    rec: &mut Reconciler<W>,
    state: &DesiredState,
) -> Result<(ApplyStats, bool), ReconcileError> {
    match rec.apply(state) {
        Ok(stats) => Ok((stats, true)),
        Err(ReconcileError::ServicesNotApplied { failures, stats }) => {
            for f in &failures {
                warn!(service = %f.service, "not applied, previous state kept: {}", f.shortage);
            }
            Ok((*stats, false))
        }
        Err(e) => Err(e),
    }
}

/// Counts a sync in the metrics (`xdplb_syncs_total`, `xdplb_event_to_maps_seconds`, ...).
fn record_sync(ops: &Ops, result: &Result<(ApplyStats, bool), ReconcileError>, update: &Update) {
    let outcome = match result {
        Ok((stats, true)) => SyncOutcome::Applied(stats),
        Ok((stats, false)) => SyncOutcome::Partial(stats),
        Err(_) => SyncOutcome::Failed,
    };
    ops.record_sync(outcome, update.since, update.resync);
}

fn log_stats(stats: &ApplyStats, update: &Update) {
    let event_to_maps = update.since.elapsed();
    if stats.writes() == 0 {
        debug!(
            ?event_to_maps,
            resync = update.resync,
            "desired state unchanged in the maps"
        );
    } else {
        info!(
            writes = stats.writes(),
            ?event_to_maps,
            resync = update.resync,
            "applied: {stats}"
        );
    }
}

/// The agent from start to stop. Flags and services first: a wrong interface name or path
/// fails before anything is loaded, pinned or written.
async fn run(args: Args) -> anyhow::Result<()> {
    check_flags(&args)?;
    let (ops, _metrics, health_checks) = start_ops(&args).await?;
    let (source, first) = open_source(&args).await?;

    let caps = args.capacities();
    let loaded = loader::load_with(lb_userspace::EBPF_OBJ, &args.pin_dir, args.debug, &caps)
        .with_context(|| {
            format!(
                "loading xdplb with maps pinned in {}",
                args.pin_dir.display()
            )
        })?;
    let mut rec = Reconciler::adopt_with_limits(loaded.maps, caps.limits())
        .with_context(|| format!("reading the maps in {}", args.pin_dir.display()))?;
    let (svcs, fes) = rec.counts();
    info!(service_ports = svcs, frontends = fes, pin_dir = %args.pin_dir.display(), "adopted maps");
    initial_sync(&mut rec, &ops, &health_checks, &first)?;

    let mut attacher = Attacher::new(
        loaded.ebpf,
        loaded.ifaces,
        &args.pin_dir,
        args.edge_iface.clone(),
        &args.pod_iface,
        args.xdp_mode,
    )?;
    log_events(attacher.start().context("attaching to the interfaces")?);
    // After the first sync, before the ready line: host processes are served from then
    // on. Dropped on any error below, which detaches it.
    let sock_lb = attach_host_services(&args, &caps)?;

    let (svcs, fes) = rec.counts();
    println!(
        "lb-agent ready: {svcs} service ports, {fes} frontends, attached to [{}]",
        attacher.attached().join(", ")
    );
    ops.set_ready();

    let mut agent = Agent {
        rec,
        attacher,
        logger: loaded.logger,
        ops,
        health_checks,
    };
    let result = agent.main_loop(source, first).await;
    shutdown(&args, agent.attacher, sock_lb)?;
    result
}

/// The flags that can be checked before anything is started.
fn check_flags(args: &Args) -> anyhow::Result<()> {
    if args.edge_iface.is_empty() && args.pod_iface.is_empty() {
        bail!("give at least one --edge-iface or --pod-iface");
    }
    let present = loader::list_interfaces().context("listing network interfaces")?;
    if let Some(missing) = args.edge_iface.iter().find(|i| !present.contains_key(*i)) {
        bail!("--edge-iface {missing}: no such interface");
    }
    Ok(())
}

/// The metrics server and the healthCheckNodePort servers. Served before the first list
/// (up to --initial-sync-timeout): /healthz answers for the startup probe, /readyz says
/// 503 until the first sync is in the maps. A port that cannot be bound is a
/// configuration error: fail now.
async fn start_ops(args: &Args) -> anyhow::Result<(Ops, Serving, HealthChecks)> {
    let ops = Ops::new(&args.pin_dir);
    let metrics = ops
        .serve(args.metrics_bind)
        .await
        .with_context(|| format!("--metrics-bind {}", args.metrics_bind))?;
    let health_checks = ops
        .health_checks(args.health_check_address)
        .context("starting the healthCheckNodePort servers")?;
    Ok((ops, metrics, health_checks))
}

/// Writes the source's first state into the adopted maps.
fn initial_sync(
    rec: &mut Reconciler<LbMaps>,
    ops: &Ops,
    health_checks: &HealthChecks,
    first: &Update,
) -> anyhow::Result<()> {
    // load() / the initial lists have logged every invalid object with its object and
    // field.
    let result = apply(rec, &first.state);
    record_sync(ops, &result, first);
    let (stats, _) = result.context("writing the initial state to the maps")?;
    health_checks.update(&first.state);
    // Always at info: after a restart, "0 writes" is how one sees the maps were adopted.
    info!(writes = stats.writes(), "initial sync: {stats}");
    Ok(())
}

/// The cgroup socket programs for host processes, unless `--host-services false`.
fn attach_host_services(
    args: &Args,
    caps: &loader::Capacities,
) -> anyhow::Result<Option<loader::SockLb>> {
    if !args.host_services {
        return Ok(None);
    }
    let cgroup = loader::find_cgroup2(args.cgroup_root.as_deref())
        .context("--host-services: finding the cgroup v2 hierarchy (--cgroup-root names it; --host-services false runs without)")?;
    let sock_lb = loader::SockLb::attach_with(lb_userspace::EBPF_OBJ, &args.pin_dir, &cgroup, caps)
        .with_context(|| {
            format!(
                "--host-services: attaching the socket programs to {}",
                cgroup.display()
            )
        })?;
    info!(cgroup = %cgroup.display(), netns_cookie = sock_lb.netns_cookie(), "host services: socket programs attached");
    Ok(Some(sock_lb))
}

/// What the main loop drives once the agent is ready.
struct Agent {
    rec: Reconciler<LbMaps>,
    attacher: Attacher,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ops: Ops,
    health_checks: HealthChecks,
}

impl Agent {
    /// Applies the source's updates and follows the interfaces until a signal (Ok) or the
    /// source ends (its error). The source task is stopped on the way out.
    async fn main_loop(&mut self, source: Source, first: Update) -> anyhow::Result<()> {
        let (tx, mut rx) = tokio::sync::watch::channel(first);
        rx.mark_unchanged();
        let mut source_task = tokio::spawn(source.run(tx));
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut tick = tokio::time::interval(IFACE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let result = loop {
            tokio::select! {
                _ = sigterm.recv() => { info!("SIGTERM"); break Ok(()); }
                _ = sigint.recv() => { info!("SIGINT"); break Ok(()); }
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The source dropped its sender: it ended; its result says why.
                        break Err(source_ended((&mut source_task).await));
                    }
                    let update = rx.borrow_and_update().clone();
                    self.on_update(&update);
                }
                res = &mut source_task => break Err(source_ended(res)),
                _ = tick.tick() => self.on_tick(),
            }
        };
        source_task.abort();
        result
    }

    /// Applies a new state to the maps and the health checks.
    fn on_update(&mut self, update: &Update) {
        let result = apply(&mut self.rec, &update.state);
        record_sync(&self.ops, &result, update);
        // Whatever the maps did: the answers follow the Services' endpoints, as
        // kube-proxy's do.
        self.health_checks.update(&update.state);
        match result {
            Ok((stats, _)) => log_stats(&stats, update),
            // The maps stay usable (write order); the next change re-reads them.
            Err(e) => warn!("applying the new services failed: {}", error_chain(&e)),
        }
    }

    /// Every IFACE_POLL: heartbeat, new and gone interfaces, the programs' log records.
    fn on_tick(&mut self) {
        // /healthz fails when this stops (DEFAULT_STALL_AFTER).
        self.ops.heartbeat();
        log_events(self.attacher.sync());
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }
}

/// Why the services source ended: it never should while the agent runs.
fn source_ended(res: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match res {
        Ok(Ok(())) => anyhow::anyhow!("the services source stopped"),
        Ok(Err(e)) => e.context("services source"),
        Err(e) => anyhow::Error::new(e).context("services source task"),
    }
}

/// Stops serving host processes, then detaches or keeps the XDP programs (`--on-exit`);
/// an error in one does not keep the other attached.
fn shutdown(
    args: &Args,
    mut attacher: Attacher,
    sock_lb: Option<loader::SockLb>,
) -> anyhow::Result<()> {
    // Socket programs first: new host connections stop being translated.
    let sock_detached = sock_lb.map(loader::SockLb::detach).transpose();
    match args.on_exit {
        OnExit::Detach => {
            attacher
                .detach_all()
                .context("detaching the programs (maps stay pinned)")?;
            sock_detached.context("detaching the socket programs")?;
            info!(pin_dir = %args.pin_dir.display(), "detached; maps stay pinned");
        }
        OnExit::Keep => {
            attacher.release();
            sock_detached.context("detaching the socket programs")?;
            info!(
                pin_dir = %args.pin_dir.display(),
                "XDP programs stay attached (pinned links) with the maps as they are; \
                 the next agent takes them over, `rm -rf` of the pin directory removes them"
            );
        }
    }
    Ok(())
}
