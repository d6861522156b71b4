//! lbctl: shows what xdplb's maps hold. Reads the maps pinned by lb-agent, so it works
//! while the agent runs (and after it stopped, as long as the pins exist).

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{cli, maps::LbMaps};

#[derive(Parser)]
#[command(
    name = "lbctl",
    about = "Inspect xdplb's service, backend, flow and counter maps"
)]
struct Args {
    /// Where lb-agent pinned the maps.
    #[arg(long, default_value = "/sys/fs/bpf/xdplb", global = true)]
    pin_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Service ports with their frontends (kind, scope, drop-if-empty, source ranges),
    /// endpoints, session affinity, source ranges and counters.
    Services,
    /// Endpoints (backends) with their pods and counters; `draining` ones are in no Maglev
    /// table (terminating or not ready): they keep established flows, take no new ones.
    Backends,
    /// Tracked connections (client → frontend → backend).
    Flows {
        /// Show at most this many flows.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Packets per verdict reason and traffic per service.
    Stats,
}

fn print<T: serde::Serialize>(
    out: Output,
    v: &T,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    let text = match out {
        Output::Json => serde_json::to_string_pretty(v)? + "\n",
        Output::Table => table(v),
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        // `lbctl flows | head`: the reader has all it wanted and went away. Not an error
        // (and `print!` would panic on it).
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to standard output"),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let maps = LbMaps::open_pinned(&args.pin_dir).with_context(|| {
        format!(
            "opening xdplb's maps under {} (is lb-agent running with this --pin-dir?)",
            args.pin_dir.display()
        )
    })?;
    match args.cmd {
        Cmd::Services => print(args.output, &cli::services(&maps)?, |v| {
            cli::render_services(v)
        }),
        Cmd::Backends => print(args.output, &cli::backends(&maps)?, |v| {
            cli::render_backends(v)
        }),
        Cmd::Flows { limit } => print(args.output, &cli::flows(&maps, limit)?, |v| {
            cli::render_flows(v)
        }),
        Cmd::Stats => print(args.output, &cli::stats(&maps)?, cli::render_stats),
    }
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("lbctl: {e:#}");
        std::process::exit(1);
    }
}
