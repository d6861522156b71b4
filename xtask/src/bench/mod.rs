//! `cargo xtask bench [prog|forward|tcp|sync|all] [--quick]`: per-packet cost of the real
//! XDP program (`prog`), packets per second delivered to pods (`forward`), TCP connections
//! through a VIP (`tcp`) and the control plane's cost (`sync`), each figure next to a
//! baseline measured in the same run because the machine is shared and noisy. Results go to
//! `bench/results/<timestamp>-<suite>.json`; `docs/benchmarks.md` is regenerated from the
//! latest result of each suite.
//!
//! The suites need the BPF object, which needs bpf-linker, which xtask's `setup` installs:
//! so xtask itself must build without it. The engine lives behind the `lb-userspace`
//! feature, and `bench` without that feature re-runs xtask with it (in release mode, so the
//! reconciler is timed as the agent ships).

#[cfg(feature = "lb-userspace")]
mod common;
#[cfg(feature = "lb-userspace")]
mod forward;
// Plain text generation, built (and unit-tested) without the engine too.
#[cfg_attr(not(feature = "lb-userspace"), allow(dead_code))]
mod kubeproxy;
#[cfg(feature = "lb-userspace")]
mod prog;
// The page is generated from the files alone, so `bench report` needs no engine.
mod report;
// Written by the runners (with the engine), read by the report (with or without).
#[cfg_attr(not(feature = "lb-userspace"), allow(dead_code))]
mod results;
#[cfg(feature = "lb-userspace")]
mod sync;
#[cfg(feature = "lb-userspace")]
mod tcp;

use anyhow::{Context as _, Result};
use std::path::Path;
use std::process::Command;

/// Where results and the page go instead of bench/results and docs/ when set.
pub const OUT_DIR_ENV: &str = "XDPLB_BENCH_DIR";

/// In the smoke test's directory, `<suite>` + this names a suite that this machine's
/// kernel cannot run (the file holds the reason).
const REFUSED_SUFFIX: &str = ".refused";

/// Which benchmarks to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    Prog,
    Forward,
    Tcp,
    Sync,
    All,
    /// No measurement: regenerate docs/benchmarks.md and the plots from the newest result
    /// of each suite on disk (no root, no engine, no build of the agent).
    Report,
}

impl Suite {
    fn as_str(self) -> &'static str {
        match self {
            Suite::Prog => "prog",
            Suite::Forward => "forward",
            Suite::Tcp => "tcp",
            Suite::Sync => "sync",
            Suite::All => "all",
            Suite::Report => "report",
        }
    }
}

/// Entry point of `cargo xtask bench`. `run_cmd` runs the re-executed xtask (xtask's own
/// runner, which puts the freshly installed bpf-linker on PATH).
pub fn run(
    root: &Path,
    suite: Suite,
    quick: bool,
    run_cmd: fn(&mut Command) -> Result<()>,
) -> Result<()> {
    if suite == Suite::Report {
        // Nothing is measured: the page and its plots come from the result files alone.
        let doc = report::write_docs(root)?;
        eprintln!("bench: regenerated {}", doc.display());
        return Ok(());
    }
    #[cfg(feature = "lb-userspace")]
    {
        let _ = run_cmd;
        run_suites(root, suite, quick)
    }
    #[cfg(not(feature = "lb-userspace"))]
    {
        rerun_with_engine(root, suite, quick, run_cmd)
    }
}

/// Runs the selected suites in this process (which has the engine), writes their results
/// and regenerates the page.
#[cfg(feature = "lb-userspace")]
fn run_suites(root: &Path, suite: Suite, quick: bool) -> Result<()> {
    common::require_root()?;
    eprintln!(
        "bench {}{}",
        suite.as_str(),
        if quick { " --quick" } else { "" }
    );
    prepare_process()?;
    let env = results::Env::collect(root)?;
    let selected = |this: Suite| suite == this || suite == Suite::All;
    if selected(Suite::Prog) {
        run_suite(root, &env, Suite::Prog, quick, prog::run)?;
    }
    let mut refused = None;
    if selected(Suite::Forward) {
        match run_suite(root, &env, Suite::Forward, quick, forward::run) {
            Err(e) if e.chain().any(forward::is_live_frames_refused) => {
                let reason = e.root_cause().to_string();
                eprintln!("bench forward: NOT MEASURED: {reason}");
                refused = Some(reason);
            }
            other => other?,
        }
    }
    if selected(Suite::Tcp) {
        run_suite(root, &env, Suite::Tcp, quick, tcp::run)?;
    }
    if selected(Suite::Sync) {
        run_suite(root, &env, Suite::Sync, quick, sync::run)?;
    }
    let doc = report::write_docs(root)?;
    eprintln!("bench: regenerated {}", doc.display());
    if let Some(reason) = refused {
        if std::env::var_os(OUT_DIR_ENV).is_some() {
            // The smoke test's scratch directory: the smoke test reads the reason and
            // reports the suite as not run (neither passed nor failed).
            let marker = results::results_dir(root).join(format!("forward{REFUSED_SUFFIX}"));
            std::fs::write(&marker, &reason)
                .with_context(|| format!("writing {}", marker.display()))?;
        } else {
            anyhow::bail!("bench forward was not measured: {reason}");
        }
    }
    Ok(())
}

/// What the suites need of the process: Ctrl-C unwinding through the guards, and the
/// agent's binaries found.
#[cfg(feature = "lb-userspace")]
fn prepare_process() -> Result<()> {
    // Namespaces, agents and rules are torn down by Drop guards; Ctrl-C must unwind
    // through them instead of killing the process.
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: tearing down");
        crate::INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    })
    .context("installing the Ctrl-C handler")?;
    // forward and tcp start the real lb-agent, built next to this (release) xtask.
    if std::env::var_os("XDPLB_BIN_DIR").is_none() {
        let exe = std::env::current_exe().context("locating xtask")?;
        if let Some(dir) = exe.parent() {
            // Set before any thread starts; read by e2e::bin_dir.
            std::env::set_var("XDPLB_BIN_DIR", dir);
        }
    }
    Ok(())
}

/// Runs one suite and writes its JSON; the time each takes is printed because `bench all`
/// has a budget (15 min, `--quick` 3 min).
#[cfg(feature = "lb-userspace")]
fn run_suite<R: serde::Serialize>(
    root: &Path,
    env: &results::Env,
    suite: Suite,
    quick: bool,
    run: fn(bool) -> Result<R>,
) -> Result<()> {
    let name = suite.as_str();
    let started = std::time::Instant::now();
    let res = run(quick).with_context(|| format!("bench {name}"))?;
    let path = results::write_json(root, env, name, quick, &res)?;
    eprintln!(
        "bench {name}: wrote {} ({:.0} s)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Builds the agent and re-runs xtask with the engine (in release mode, so the reconciler
/// is timed as the agent ships).
#[cfg(not(feature = "lb-userspace"))]
fn rerun_with_engine(
    root: &Path,
    suite: Suite,
    quick: bool,
    run_cmd: fn(&mut Command) -> Result<()>,
) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // forward and tcp run the real lb-agent, found next to the re-run xtask.
    run_cmd(Command::new(&cargo).current_dir(root).args([
        "build",
        "--release",
        "--package",
        "lb-userspace",
        "--bins",
    ]))
    .context("building lb-agent and lbctl")?;
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args([
        "run",
        "--release",
        "--package",
        "xtask",
        "--features",
        "lb-userspace",
        "--",
        "bench",
        suite.as_str(),
    ]);
    if quick {
        cmd.arg("--quick");
    }
    run_cmd(&mut cmd).context("running xtask with the benchmark engine")
}

/// Fails once Ctrl-C was pressed, so long steps stop and unwind through their guards.
#[cfg(feature = "lb-userspace")]
pub fn check_interrupt() -> Result<()> {
    if crate::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

/// `cargo xtask test`'s smoke test: `bench all --quick` into a scratch directory, then
/// every figure each suite reports must be there and be a number (their values are not
/// judged: the machine is shared and noisy).
///
/// Returns the suites this machine's kernel refused to run, with the reason: reported by
/// `cargo xtask test` as not run, never as passed.
pub fn smoke(
    root: &Path,
    run_cmd: fn(&mut Command) -> Result<()>,
) -> Result<Vec<(&'static str, String)>> {
    let dir = std::env::temp_dir().join(format!("xdplb-bench-smoke-{}", std::process::id()));
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = Cleanup(dir.clone());
    let started = std::time::Instant::now();
    // The variable reaches the re-run xtask through the environment.
    std::env::set_var(OUT_DIR_ENV, &dir);
    let res = run(root, Suite::All, true, run_cmd);
    std::env::remove_var(OUT_DIR_ENV);
    res?;
    eprintln!(
        "    bench all --quick took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let mut missing = Vec::new();
    let mut refused = Vec::new();
    for suite in ["prog", "forward", "tcp", "sync"] {
        let marker = dir.join(format!("{suite}{REFUSED_SUFFIX}"));
        if marker.is_file() {
            let reason = std::fs::read_to_string(&marker)
                .with_context(|| format!("reading {}", marker.display()))?;
            refused.push((suite, reason));
            continue;
        }
        let file = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(&format!("-{suite}.json")))
            });
        let Some(file) = file else {
            missing.push(format!("{suite}: no result file"));
            continue;
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        for f in figures(suite) {
            check_figure(&v["results"], f, suite, &mut missing);
        }
        check_members(&v["results"], suite, &mut missing);
    }
    if !dir.join("benchmarks.md").is_file() {
        missing.push("benchmarks.md was not generated".into());
    }
    anyhow::ensure!(
        missing.is_empty(),
        "missing figures:\n  {}",
        missing.join("\n  ")
    );
    Ok(refused)
}

/// The figures of each suite, as JSON paths under `results`; `*` is every element of an
/// array (which must not be empty).
fn figures(suite: &str) -> &'static [&'static str] {
    match suite {
        "prog" => &[
            "points.*.capacities.frontends",
            "points.*.capacities.maglev_slots",
            "points.*.noop.p50",
            "points.*.noop_repeat.p50",
            "points.*.cases.*.ns.p50",
            "points.*.cases.*.ratio.p50",
            "points.*.cases.*.ratio.ci_95.*",
            "points.*.cases.*.ratio_net.p50",
            "points.*.cases.*.vs_first_point.p50",
            "points.*.cases.*.vs_first_point.ci_95.*",
        ],
        "forward" => &[
            "points.*.paths.*.established.pps.p50",
            "points.*.paths.*.established.vs_iptables.p50",
            "points.*.paths.*.established.vs_ceiling.p50",
            "points.*.paths.*.established.delivered_share.p50",
            "points.*.paths.*.new_flows.pps.p50",
            "points.*.paths.*.new_flows.vs_iptables.p50",
        ],
        "tcp" => &[
            "points.*.paths.*.conns_per_s.p50",
            "points.*.paths.*.latency_us.p50",
            "points.*.paths.*.latency_us.p99",
            "points.*.paths.*.p50_per_round_us.p50",
            "points.*.paths.*.p99_per_round_us.p50",
            "points.*.paths.*.p50_vs_iptables.p10",
            "points.*.paths.*.p50_vs_iptables.p50",
            "points.*.paths.*.p50_vs_iptables.p90",
            "points.*.paths.*.p50_vs_iptables.ci_95.*",
            "points.*.paths.*.p99_vs_iptables.p50",
            "points.*.paths.*.p99_vs_iptables.ci_95.*",
            "points.*.paths.*.rate_vs_iptables.p50",
            "points.*.paths.*.p50_vs_nftables.p50",
            "points.*.paths.*.p50_vs_nftables.ci_95.*",
            "points.*.paths.*.p99_vs_nftables.p50",
            "points.*.paths.*.p99_vs_nftables.ci_95.*",
            "points.*.paths.*.rate_vs_nftables.p50",
            "points.*.paths.*.p50_vs_first_point.p10",
            "points.*.paths.*.p50_vs_first_point.p90",
            "points.*.paths.*.p50_vs_first_point.ci_95.*",
        ],
        "sync" => &[
            "churn.change_ms.p99",
            "churn.unchanged_ms.p50",
            "full_syncs.*.ms",
            "maps_total_bytes",
            "sized_syncs.*.ms",
            "sized_syncs.*.maps_total_bytes",
            "sized_syncs.*.service_maps_bytes",
        ],
        _ => &[],
    }
}

/// The paths `bench forward` measures (their JSON names), in the page's order.
pub const FORWARD_PATHS: [&str; 6] = [
    "ceiling",
    "xdplb_redirect",
    "xdplb_generic",
    "xdplb_stack",
    "iptables",
    "nftables",
];

/// The paths `bench tcp` measures (their JSON names), in the page's order.
pub const TCP_PATHS: [&str; 3] = ["xdplb", "iptables", "nftables"];

/// What every point of a suite must hold: (array under the point, its naming field, the
/// names), so that a path or case that silently went missing fails the smoke test too.
fn members(suite: &str) -> &'static [(&'static str, &'static str, &'static [&'static str])] {
    match suite {
        "prog" => &[(
            "cases",
            "case",
            &["miss", "new_flow", "established", "reply"],
        )],
        "forward" => &[("paths", "path", &FORWARD_PATHS)],
        "tcp" => &[("paths", "path", &TCP_PATHS)],
        _ => &[],
    }
}

fn check_members(results: &serde_json::Value, suite: &str, missing: &mut Vec<String>) {
    let points = results["points"]
        .as_array()
        .map_or(&[][..], |a| a.as_slice());
    for (i, p) in points.iter().enumerate() {
        for (array, field, names) in members(suite) {
            for name in *names {
                let found = p[*array]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x[*field] == *name));
                if !found {
                    missing.push(format!("{suite}.points[{i}].{array}: no {name}"));
                }
            }
        }
    }
}

fn check_figure(v: &serde_json::Value, path: &str, at: &str, missing: &mut Vec<String>) {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    if head == "*" {
        match v.as_array() {
            Some(a) if !a.is_empty() => {
                for (i, x) in a.iter().enumerate() {
                    match rest {
                        Some(r) => check_figure(x, r, &format!("{at}[{i}]"), missing),
                        None if x.as_f64().is_some_and(f64::is_finite) => {}
                        None => missing.push(format!("{at}[{i}]: not a number")),
                    }
                }
            }
            _ => missing.push(format!("{at}: no entries")),
        }
        return;
    }
    let x = &v[head];
    let here = format!("{at}.{head}");
    match rest {
        Some(r) => check_figure(x, r, &here, missing),
        None if x.as_f64().is_some_and(f64::is_finite) => {}
        None => missing.push(format!("{here}: {x}")),
    }
}

#[cfg(test)]
mod smoke_tests {
    use super::{check_figure, check_members, FORWARD_PATHS, TCP_PATHS};
    use crate::bench::results::{forward, tcp};

    #[test]
    fn the_smoke_test_looks_for_every_path_the_suites_write() {
        assert_eq!(FORWARD_PATHS, forward::PATHS.map(forward::Path::name));
        assert_eq!(TCP_PATHS, tcp::PATHS.map(tcp::Path::name));
    }

    #[test]
    fn a_missing_path_is_reported() {
        let v = serde_json::json!({"points": [{"paths": [
            {"path": "xdplb"}, {"path": "iptables"}
        ]}]});
        let mut missing = Vec::new();
        check_members(&v, "tcp", &mut missing);
        assert_eq!(
            missing,
            vec!["tcp.points[0].paths: no nftables".to_string()]
        );
    }

    #[test]
    fn figures_are_checked_in_every_element() {
        let v = serde_json::json!({"points": [{"a": {"p50": 1.0}}, {"a": {"p50": null}}]});
        let mut missing = Vec::new();
        check_figure(&v, "points.*.a.p50", "x", &mut missing);
        assert_eq!(missing, vec!["x.points[1].a.p50: null".to_string()]);
        let mut missing = Vec::new();
        check_figure(
            &serde_json::json!({"points": []}),
            "points.*.a",
            "x",
            &mut missing,
        );
        assert_eq!(missing.len(), 1);
    }
}
