//! lb-agent: loads the XDP programs with pinned maps, keeps the maps equal to the services
//! in a file or directory, and attaches to edge and pod interfaces as they come and go.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use lb_userspace::loader::{self, error_chain, Attacher, IfaceEvent, ModeChoice};
use lb_userspace::model::DesiredState;
use lb_userspace::reconciler::{ApplyStats, ReconcileError, Reconciler};
use lb_userspace::sources::file::FileSource;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, info, warn};

/// How often interfaces are listed to attach new pod veths (the contract: within a second).
const IFACE_POLL: Duration = Duration::from_millis(250);

#[derive(Parser, Debug)]
#[command(about = "xdplb agent: XDP service load balancing in place of kube-proxy")]
struct Args {
    /// Services and EndpointSlices (YAML/JSON as `kubectl get -o yaml` prints): a file or a
    /// directory of files, followed for changes.
    #[arg(long)]
    services: PathBuf,
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
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // The programs' aya-log records arrive at debug level under the `lb_ebpf` target;
    // --debug would show nothing without letting them through.
    let default_filter = if args.debug {
        "info,lb_ebpf=debug"
    } else {
        "info"
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

/// Applies a state; failures of single services are logged, map errors returned.
fn apply<W: lb_userspace::reconciler::MapWriter>(
    rec: &mut Reconciler<W>,
    state: &DesiredState,
) -> Result<ApplyStats, ReconcileError> {
    match rec.apply(state) {
        Ok(stats) => Ok(stats),
        Err(ReconcileError::ServicesNotApplied { failures, stats }) => {
            for f in &failures {
                warn!(service = %f.service, "not applied, previous state kept: {}", f.shortage);
            }
            Ok(stats)
        }
        Err(e) => Err(e),
    }
}

fn log_stats(stats: &ApplyStats) {
    if stats.writes() == 0 {
        debug!("desired state unchanged in the maps");
    } else {
        info!(writes = stats.writes(), "applied: {stats}");
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.edge_iface.is_empty() && args.pod_iface.is_empty() {
        bail!("give at least one --edge-iface or --pod-iface");
    }

    // Flags and services first: a wrong interface name or path fails before anything is
    // loaded, pinned or written.
    let present = loader::list_interfaces().context("listing network interfaces")?;
    if let Some(missing) = args.edge_iface.iter().find(|i| !present.contains_key(*i)) {
        bail!("--edge-iface {missing}: no such interface");
    }
    let mut source = FileSource::new(&args.services);
    let state = source
        .load()
        .with_context(|| format!("reading services from {}", args.services.display()))?;

    let mut loaded =
        loader::load(lb_userspace::EBPF_OBJ, &args.pin_dir, args.debug).with_context(|| {
            format!(
                "loading xdplb with maps pinned in {}",
                args.pin_dir.display()
            )
        })?;
    let mut rec = Reconciler::adopt(loaded.maps)
        .with_context(|| format!("reading the maps in {}", args.pin_dir.display()))?;
    let (svcs, fes) = rec.counts();
    info!(service_ports = svcs, frontends = fes, pin_dir = %args.pin_dir.display(), "adopted maps");

    // load() above has logged every invalid object with its file, object and field.
    let stats = apply(&mut rec, &state).context("writing the initial state to the maps")?;
    // Always at info: after a restart, "0 writes" is how one sees the maps were adopted.
    info!(writes = stats.writes(), "initial sync: {stats}");

    let mut attacher = Attacher::new(
        loaded.ebpf,
        loaded.ifaces,
        args.edge_iface.clone(),
        &args.pod_iface,
        args.xdp_mode,
    )?;
    log_events(attacher.start().context("attaching to the interfaces")?);

    let (svcs, fes) = rec.counts();
    println!(
        "lb-agent ready: {svcs} service ports, {fes} frontends, attached to [{}]",
        attacher.attached().join(", ")
    );

    let (tx, mut rx) = tokio::sync::watch::channel(state);
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
                    break match (&mut source_task).await {
                        Ok(Ok(())) => Err(anyhow::anyhow!("the services source stopped")),
                        Ok(Err(e)) => Err(e.context("services source")),
                        Err(e) => Err(anyhow::Error::new(e).context("services source task")),
                    };
                }
                let state = rx.borrow_and_update().clone();
                match apply(&mut rec, &state) {
                    Ok(stats) => log_stats(&stats),
                    // The maps stay usable (write order); the next change re-reads them.
                    Err(e) => warn!("applying the new services failed: {}", error_chain(&e)),
                }
            }
            res = &mut source_task => {
                break match res {
                    Ok(Ok(())) => Err(anyhow::anyhow!("the services source stopped")),
                    Ok(Err(e)) => Err(e.context("services source")),
                    Err(e) => Err(anyhow::Error::new(e).context("services source task")),
                };
            }
            _ = tick.tick() => {
                log_events(attacher.sync());
                if let Some(l) = loaded.logger.as_mut() {
                    l.flush();
                }
            }
        }
    };

    source_task.abort();
    attacher
        .detach_all()
        .context("detaching the programs (maps stay pinned)")?;
    info!(pin_dir = %args.pin_dir.display(), "detached; maps stay pinned");
    result
}
