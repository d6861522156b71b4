//! The benchmarks' results as typed records: what the runners (`bench/prog.rs`, …) build
//! and write to `bench/results/<timestamp>-<suite>.json`, and what the report reads back
//! to generate `docs/benchmarks.md`. One module per suite ([`prog`], [`forward`], [`tcp`],
//! [`sync`]), the statistics they share in [`stats`].
//!
//! The files on disk are the record of past runs and must keep loading: a field added
//! after some files were written is `#[serde(default)]` (NaN for a figure, which the page
//! prints as such, as it did when it read the JSON untyped) or an `Option` where the page
//! tells a missing figure from a measured one. A figure that was not finite was written as
//! `null` and reads back as NaN.
//!
//! Every file is `{"env", "quick", "results", "suite"}` ([`ResultFile`]); its objects'
//! keys are sorted, because the file is written through a `serde_json::Value`.

pub mod forward;
pub mod prog;
pub mod stats;
pub mod sync;
pub mod tcp;

pub use stats::{Ratio, Summary};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One result file: a run of one suite.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResultFile<R> {
    pub env: Env,
    /// `--quick` runs have fewer points and rounds; the page prefers full ones.
    pub quick: bool,
    pub results: R,
    /// "prog", "forward", "tcp" or "sync".
    pub suite: String,
}

/// Where and on what a run was made.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Env {
    pub timestamp: String,
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub commit: String,
    pub dirty: bool,
}

fn output(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(o.status.success(), "{cmd:?} exited with {}", o.status);
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

impl Env {
    pub fn collect(root: &Path) -> Result<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".into(), |(_, m)| m.trim().to_string());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .context("reading the kernel release")?
            .trim()
            .to_string();
        let git = |args: &[&str]| output(Command::new("git").current_dir(root).args(args));
        Ok(Self {
            timestamp: output(Command::new("date").args(["-u", "+%Y%m%dT%H%M%SZ"]))?,
            nproc: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            cpu_model,
            kernel,
            commit: git(&["rev-parse", "HEAD"])?,
            // Untracked files count (new code is untracked until committed), but not this
            // command's own outputs, or every run after the first would look dirty.
            dirty: !git(&[
                "status",
                "--porcelain",
                "--",
                ".",
                ":(exclude)bench/results",
                ":(exclude)docs/benchmarks.md",
            ])?
            .is_empty(),
        })
    }
}

/// The shape of a generated desired state.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Shape {
    /// Service ports, the probe included.
    pub services: usize,
    /// Frontends of every service port but the probe (ClusterIP, then externalIPs).
    pub frontends_per_service: usize,
    /// Ready endpoints of every service port (per family for the probe).
    pub endpoints: usize,
}

/// The capacities a measurement was loaded with (`lb-agent --max-*`), as the results
/// record them; all zero in result files written before points were sized.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct CapacitiesOut {
    pub frontends: u32,
    pub services: u32,
    pub backends: u32,
    pub maglev_slots: u32,
    pub flows: u32,
    pub vips: u32,
}

/// `bench/results`, or `$XDPLB_BENCH_DIR` (the smoke test's scratch directory, so that
/// `cargo xtask test` leaves the committed results and page alone).
pub fn results_dir(root: &Path) -> PathBuf {
    match std::env::var_os(super::OUT_DIR_ENV) {
        Some(d) => PathBuf::from(d),
        None => root.join("bench").join("results"),
    }
}

/// Writes `bench/results/<timestamp>-<suite>.json`.
pub fn write_json(
    root: &Path,
    env: &Env,
    suite: &str,
    quick: bool,
    results: &impl Serialize,
) -> Result<PathBuf> {
    let dir = results_dir(root);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}-{suite}.json", env.timestamp));
    let file = ResultFile {
        env: env.clone(),
        quick,
        results,
        suite: suite.to_string(),
    };
    // Through a Value, whose objects sort their keys: the files have always been written
    // that way, and a diff between two runs then lines up field by field.
    let doc = serde_json::to_value(&file).context("serialising results")?;
    let text = serde_json::to_string_pretty(&doc).context("serialising results")?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Reads one result file of a suite.
pub fn read_json<R: serde::de::DeserializeOwned>(path: &Path) -> Result<ResultFile<R>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The value of a figure that a result file does not have.
fn missing_float() -> f64 {
    f64::NAN
}

/// A figure, `null` (a non-finite value, which serde_json writes as `null`) read as NaN.
fn lenient_float<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// An optional pair of figures (a confidence interval), `null` bounds read as NaN.
fn lenient_pair<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[f64; 2]>, D::Error> {
    let pair = Option::<[Option<f64>; 2]>::deserialize(d)?;
    Ok(pair.map(|[low, high]| [low.unwrap_or(f64::NAN), high.unwrap_or(f64::NAN)]))
}

#[cfg(test)]
mod tests {
    use super::{forward, prog, read_json, sync, tcp, ResultFile};
    use serde::de::DeserializeOwned;
    use serde::Serialize;
    use std::path::PathBuf;

    /// The committed results, oldest first, of one suite.
    fn committed(suite: &str) -> Vec<PathBuf> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("bench/results is committed")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(&format!("-{suite}.json")))
            })
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no committed {suite} result");
        files
    }

    /// Every committed file of the suite loads, and the newest, written back, is the same
    /// JSON as on disk: the runners keep writing what the report and older tools read.
    fn loads_and_round_trips<R: Serialize + DeserializeOwned>(suite: &str) {
        let files = committed(suite);
        for path in &files {
            let file: ResultFile<R> =
                read_json(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert_eq!(file.suite, suite, "{}", path.display());
        }
        let newest = files.last().expect("at least one file");
        let text = std::fs::read_to_string(newest).expect("readable");
        let on_disk: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let typed: ResultFile<R> = serde_json::from_str(&text).expect("typed");
        let written = serde_json::to_value(&typed).expect("serialisable");
        assert_eq!(written, on_disk, "{} changed shape", newest.display());
    }

    #[test]
    fn committed_prog_results_load_and_the_newest_round_trips() {
        loads_and_round_trips::<prog::ProgResults>("prog");
    }

    #[test]
    fn committed_forward_results_load_and_the_newest_round_trips() {
        loads_and_round_trips::<forward::ForwardResults>("forward");
    }

    #[test]
    fn committed_tcp_results_load_and_the_newest_round_trips() {
        loads_and_round_trips::<tcp::TcpResults>("tcp");
    }

    #[test]
    fn committed_sync_results_load_and_the_newest_round_trips() {
        loads_and_round_trips::<sync::SyncResults>("sync");
    }

    #[test]
    fn names_in_code_match_the_names_in_the_files() {
        for p in forward::PATHS {
            assert_eq!(serde_json::to_value(p).ok(), Some(p.name().into()));
        }
        for p in tcp::PATHS {
            assert_eq!(serde_json::to_value(p).ok(), Some(p.name().into()));
        }
        for c in [
            prog::Case::Miss,
            prog::Case::NewFlow,
            prog::Case::Established,
            prog::Case::Reply,
        ] {
            assert_eq!(serde_json::to_value(c).ok(), Some(c.as_str().into()));
        }
        for f in [prog::Family::Ipv4, prog::Family::Ipv6] {
            assert_eq!(serde_json::to_value(f).ok(), Some(f.as_str().into()));
        }
        for s in [prog::Sweep::Services, prog::Sweep::Endpoints] {
            assert_eq!(serde_json::to_value(s).ok(), Some(s.as_str().into()));
        }
    }

    #[test]
    fn a_figure_written_as_null_reads_as_nan() {
        let s: super::Summary = serde_json::from_value(serde_json::json!({
            "p10": null, "p50": 1.0, "p90": 2.0, "p99": 2.0, "min": 0.5, "max": 2.0, "n": 3
        }))
        .expect("a summary with a null figure loads");
        assert!(s.p10.is_nan() && s.p50 == 1.0);
    }
}
