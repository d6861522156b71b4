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
#[cfg(feature = "lb-userspace")]
mod report;
#[cfg(feature = "lb-userspace")]
mod sync;
#[cfg(feature = "lb-userspace")]
mod tcp;

use anyhow::{Context as _, Result};
use std::path::Path;
use std::process::Command;

/// Where results and the page go instead of bench/results and docs/ when set.
pub const OUT_DIR_ENV: &str = "XDPLB_BENCH_DIR";

/// Which benchmarks to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    Prog,
    Forward,
    Tcp,
    Sync,
    All,
    /// No measurement: regenerate docs/benchmarks.md from the results on disk.
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
    #[cfg(feature = "lb-userspace")]
    {
        let _ = run_cmd;
        common::require_root()?;
        eprintln!(
            "bench {}{}",
            suite.as_str(),
            if quick { " --quick" } else { "" }
        );
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
        let env = report::Env::collect(root)?;
        if matches!(suite, Suite::Prog | Suite::All) {
            let res = prog::run(quick).context("bench prog")?;
            let path = report::write_json(root, &env, "prog", quick, &res)?;
            eprintln!("bench prog: wrote {}", path.display());
        }
        if matches!(suite, Suite::Forward | Suite::All) {
            let res = forward::run(quick).context("bench forward")?;
            let path = report::write_json(root, &env, "forward", quick, &res)?;
            eprintln!("bench forward: wrote {}", path.display());
        }
        if matches!(suite, Suite::Tcp | Suite::All) {
            let res = tcp::run(quick).context("bench tcp")?;
            let path = report::write_json(root, &env, "tcp", quick, &res)?;
            eprintln!("bench tcp: wrote {}", path.display());
        }
        if matches!(suite, Suite::Sync | Suite::All) {
            let res = sync::run(quick).context("bench sync")?;
            let path = report::write_json(root, &env, "sync", quick, &res)?;
            eprintln!("bench sync: wrote {}", path.display());
        }
        let doc = report::write_docs(root)?;
        eprintln!("bench: regenerated {}", doc.display());
        Ok(())
    }
    #[cfg(not(feature = "lb-userspace"))]
    {
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
pub fn smoke(root: &Path, run_cmd: fn(&mut Command) -> Result<()>) -> Result<()> {
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
    for suite in ["prog", "forward", "tcp", "sync"] {
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
    }
    if !dir.join("benchmarks.md").is_file() {
        missing.push("benchmarks.md was not generated".into());
    }
    anyhow::ensure!(
        missing.is_empty(),
        "missing figures:\n  {}",
        missing.join("\n  ")
    );
    Ok(())
}

/// The figures of each suite, as JSON paths under `results`; `*` is every element of an
/// array (which must not be empty).
fn figures(suite: &str) -> &'static [&'static str] {
    match suite {
        "prog" => &[
            "points.*.noop.p50",
            "points.*.noop_repeat.p50",
            "points.*.cases.*.ns.p50",
            "points.*.cases.*.ratio.p50",
            "points.*.cases.*.ratio_net.p50",
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
            "points.*.paths.*.p50_vs_iptables.p50",
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
    use super::check_figure;

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
