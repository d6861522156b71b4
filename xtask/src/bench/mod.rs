//! `cargo xtask bench [prog|sync|all] [--quick]`: per-packet cost of the real XDP program
//! (`prog`) and the control plane's cost (`sync`), each figure next to a baseline measured
//! in the same run because the machine is shared and noisy. Results go to
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
mod prog;
#[cfg(feature = "lb-userspace")]
mod report;
#[cfg(feature = "lb-userspace")]
mod sync;

use anyhow::{Context as _, Result};
use std::path::Path;
use std::process::Command;

/// Which benchmarks to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    Prog,
    Sync,
    All,
}

impl Suite {
    fn as_str(self) -> &'static str {
        match self {
            Suite::Prog => "prog",
            Suite::Sync => "sync",
            Suite::All => "all",
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
        let env = report::Env::collect(root)?;
        if matches!(suite, Suite::Prog | Suite::All) {
            let res = prog::run(quick).context("bench prog")?;
            let path = report::write_json(root, &env, "prog", quick, &res)?;
            eprintln!("bench prog: wrote {}", path.display());
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
