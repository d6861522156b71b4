//! Results: one JSON file per suite and run under `bench/results/`, and
//! `docs/benchmarks.md` (with SVG plots under `docs/img/`) generated from the latest result
//! of each suite. The page is read from the JSON files, never from memory, so it always
//! shows what is on disk.

use anyhow::{anyhow, Context as _, Result};
use serde::Serialize;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where and on what a run was made.
#[derive(Serialize)]
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
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .context("reading the kernel release")?
            .trim()
            .to_string();
        let git = |args: &[&str]| output(Command::new("git").current_dir(root).args(args));
        Ok(Self {
            timestamp: output(Command::new("date").args(["-u", "+%Y%m%dT%H%M%SZ"]))?,
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
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

/// `bench/results`, or `$XDPLB_BENCH_DIR` (the smoke test's scratch directory, so that
/// `cargo xtask test` leaves the committed results and page alone).
fn results_dir(root: &Path) -> PathBuf {
    match std::env::var_os(super::OUT_DIR_ENV) {
        Some(d) => PathBuf::from(d),
        None => root.join("bench").join("results"),
    }
}

fn docs_path(root: &Path) -> PathBuf {
    match std::env::var_os(super::OUT_DIR_ENV) {
        Some(d) => PathBuf::from(d).join("benchmarks.md"),
        None => root.join("docs").join("benchmarks.md"),
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
    let doc = serde_json::json!({
        "suite": suite,
        "quick": quick,
        "env": env,
        "results": results,
    });
    let path = dir.join(format!("{}-{suite}.json", env.timestamp));
    let text = serde_json::to_string_pretty(&doc).context("serialising results")?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The latest result file of a suite (timestamps sort), preferring full runs over
/// `--quick` ones.
fn latest(root: &Path, suite: &str) -> Result<Option<(String, Value)>> {
    let dir = results_dir(root);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(&format!("-{suite}.json")))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    files.sort();
    let mut best: Option<(String, Value)> = None;
    for p in files.iter().rev() {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let quick = v["quick"].as_bool().unwrap_or(true);
        if !quick {
            return Ok(Some((name, v)));
        }
        if best.is_none() {
            best = Some((name, v));
        }
    }
    Ok(best)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Thousands separators, for counts people read.
fn n(x: u64) -> String {
    let s = x.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn yes(b: bool) -> &'static str {
    if b {
        "**reached**"
    } else {
        "**not reached**"
    }
}

fn env_line(v: &Value) -> String {
    let e = &v["env"];
    format!(
        "{} on {} ({} CPUs), kernel {}, commit `{}`{}{}",
        e["timestamp"].as_str().unwrap_or("?"),
        e["cpu_model"].as_str().unwrap_or("?"),
        u(&e["nproc"]),
        e["kernel"].as_str().unwrap_or("?"),
        e["commit"].as_str().unwrap_or("?").get(..12).unwrap_or("?"),
        if e["dirty"].as_bool().unwrap_or(true) {
            " (with uncommitted changes)"
        } else {
            ""
        },
        if v["quick"].as_bool().unwrap_or(false) {
            ", `--quick`"
        } else {
            ""
        }
    )
}

/// Regenerates docs/benchmarks.md from the latest results.
pub fn write_docs(root: &Path) -> Result<PathBuf> {
    let prog = latest(root, "prog")?;
    let forward = latest(root, "forward")?;
    let tcp = latest(root, "tcp")?;
    let sync = latest(root, "sync")?;
    let mut md = String::new();
    md.push_str(
        "# Benchmarks\n\n\
         <!-- Generated by `cargo xtask bench` from bench/results/*.json. Do not edit. -->\n\n\
         `cargo xtask bench [prog|forward|tcp|sync|all] [--quick]` measures the real XDP \
         object, the real agent and the real reconciler on this machine, next to kube-proxy's \
         iptables and nftables data paths, and writes `bench/results/<timestamp>-<suite>.json` \
         (machine, kernel, commit and every figure), then regenerates this page from the \
         latest full result of each suite (a `--quick` one if there is none). The machines \
         are shared and noisy, so every figure sits next to a baseline measured in the same \
         run, and the ratio is the figure to compare across machines.\n\n",
    );
    if let Some((file, v)) = &prog {
        prog_section(&mut md, root, file, v)?;
    } else {
        md.push_str("## prog\n\nNo result yet: run `cargo xtask bench prog`.\n\n");
    }
    if let Some((file, v)) = &forward {
        forward_section(&mut md, root, file, v)?;
    } else {
        md.push_str("## forward\n\nNo result yet: run `cargo xtask bench forward`.\n\n");
    }
    if let Some((file, v)) = &tcp {
        tcp_section(&mut md, root, file, v)?;
    } else {
        md.push_str("## tcp\n\nNo result yet: run `cargo xtask bench tcp`.\n\n");
    }
    if let Some((file, v)) = &sync {
        sync_section(&mut md, file, v);
    } else {
        md.push_str("## sync\n\nNo result yet: run `cargo xtask bench sync`.\n\n");
    }
    let path = docs_path(root);
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

const CASES: [(&str, &str); 4] = [
    ("miss", "miss (IP to a non-VIP)"),
    ("new_flow", "new flow (SYN, Maglev, CT+RNAT insert)"),
    ("established", "established flow"),
    ("reply", "reply (reverse NAT, xdp_pod)"),
];

fn case<'a>(p: &'a Value, c: &str, fam: &str) -> Option<&'a Value> {
    p["cases"]
        .as_array()?
        .iter()
        .find(|x| x["case"] == c && x["family"] == fam)
}

/// The heading and provenance line of a suite's section; returns its results and points.
fn section_head<'a>(
    md: &mut String,
    title: &str,
    file: &str,
    v: &'a Value,
) -> Result<(&'a Value, &'a [Value])> {
    let r = &v["results"];
    let points = r["points"]
        .as_array()
        .ok_or_else(|| anyhow!("{file}: no points"))?;
    writeln!(md, "## {title}\n")?;
    writeln!(md, "Latest: `bench/results/{file}`, {}.\n", env_line(v))?;
    Ok((r, points))
}

fn prog_section(md: &mut String, root: &Path, file: &str, v: &Value) -> Result<()> {
    let (r, points) = section_head(md, "prog: nanoseconds per packet", file, v)?;
    writeln!(
        md,
        "**Method.** The real object is loaded as the agent loads it (`loader::load_with`, \
         pins in a fresh directory under /sys/fs/bpf, removed afterwards) together with \
         `xdp_noop`, a program that only returns `XDP_PASS`. Every point is loaded with \
         capacities sized for its state, as `lb-agent --max-frontends/--max-services/\
         --max-backends/--maglev-slots` would be for that cluster (its frontends, VIPs, \
         service ports, backends and Maglev slots plus 10%; the flow tables CT, RNAT and \
         AFFINITY at their defaults, the same at every point), so a point's SERVICES and \
         MAGLEV maps are as large as its services need. The real reconciler \
         (`Reconciler::adopt_with_limits` over `LbMaps`) applies a generated desired state. \
         Packets go through the program they arrive at on a node: clients' packets (miss, \
         new flow, established flow) through `xdp_edge`, backends' answers (reply) through \
         `xdp_pod`, with BPF_PROG_TEST_RUN, one repetition per call (with more, a DNAT program would \
         measure a miss on its own rewritten packet from the second repetition on), and the \
         sample is the kernel's `duration` of that call: the program's run time plus the \
         kernel's timer overhead, which the no-op pays as well. Each run makes {} calls per \
         case and takes the mean; there are {} runs after one discarded warm-up run, and the \
         tables show the median with p10–p90 over runs. The ratio is computed per run \
         against the no-op of the same run. All points are loaded at once (each with its own \
         object and maps) and every run measures each point in turn, starting at another \
         point each time, so the shared machine's noisy phases hit all points alike. \
         Before the points, one more object is loaded and never measured: the first object \
         loaded in a process ran new flows 5–8% slower than every later one, whichever \
         point it held (loading the points in reverse order moved the slowdown from 1 \
         service port to the last sweep's last point; cause in the kernel not identified), \
         which had made new flows look ~6% faster at 100,000 service ports than at 1. \
         The benchmark runs in a network namespace of its own, so `bpf_fib_lookup` finds no \
         route and forwarded packets are passed to the stack (no redirect).\n",
        u(&r["calls_per_run"]),
        u(&r["runs"])
    )?;
    writeln!(
        md,
        "Cases: *miss* is a TCP packet to an address that is no VIP; *new flow* is a SYN \
         from a source (address, port) never seen before, one per call; *established* is a \
         data segment of a flow opened by one SYN before the measurement; *reply* is the \
         backend's answer in that flow, reverse-NATed through RNAT by `xdp_pod` (the \
         ingress is loopback, which has no IFACES entry, where a real pod veth would add \
         the partial-checksum check). After each point, the \
         REASONS counters must show exactly the paths measured (pass_not_service, fwd_pass, \
         rnat_pass) and RNAT must have grown by one entry per new-flow call, or the run \
         fails.\n"
    )?;
    writeln!(
        md,
        "The probe service port (where the packets go) is dual-stack, one IPv4 and one IPv6 \
         ClusterIP; the other service ports are IPv4 with the frontends given (the VIP \
         range's 65,536 addresses on port 80, then on port 81: 100,000 service ports are \
         100,001 SERVICES entries on 65,536 VIPs).\n"
    )?;
    writeln!(
        md,
        "Capacities each point was loaded with:\n\n\
         | sweep | service ports | endpoints | --max-frontends | --max-services | \
         --max-backends | --maglev-slots | VIPS | --max-flows |\n\
         |---|---|---|---|---|---|---|---|---|"
    )?;
    for p in points {
        let c = &p["capacities"];
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p["sweep"].as_str().unwrap_or("?"),
            n(u(&p["shape"]["services"])),
            n(u(&p["shape"]["endpoints"])),
            n(u(&c["frontends"])),
            n(u(&c["services"])),
            n(u(&c["backends"])),
            n(u(&c["maglev_slots"])),
            n(u(&c["vips"])),
            n(u(&c["flows"]))
        )?;
    }
    md.push('\n');

    for (sweep, title) in [
        ("services", "Sweep over services (1 endpoint each)"),
        ("endpoints", "Sweep over endpoints (8 service ports)"),
    ] {
        let pts: Vec<&Value> = points.iter().filter(|p| p["sweep"] == sweep).collect();
        if pts.is_empty() {
            continue;
        }
        for (fam, fam_title) in [("ipv4", "IPv4"), ("ipv6", "IPv6")] {
            writeln!(md, "### {title}, {fam_title}\n")?;
            writeln!(
                md,
                "ns per packet, median (p10–p90) over runs; ×: median per-run ratio to the \
                 no-op of the same run (repeat = 1, like the cases); net ×: the same with \
                 the per-call timer overhead (no-op at repeat 1 minus no-op at repeat \
                 100,000) taken out of both.\n"
            )?;
            md.push_str(
                "| service ports | frontends | endpoints | Maglev table | apply | no-op | \
                 no-op, repeat 100k |",
            );
            for (_, label) in CASES {
                write!(md, " {label} |")?;
            }
            md.push_str("\n|---|---|---|---|---|---|---|---|---|---|---|\n");
            for p in &pts {
                let s = &p["shape"];
                write!(
                    md,
                    "| {} | {} | {} | {} | {:.0} ms | {:.1} ({:.1}–{:.1}) | {:.1} |",
                    n(u(&s["services"])),
                    n(u(&p["frontends"])),
                    n(u(&s["endpoints"])),
                    n(u(&p["maglev_table_size"])),
                    f(&p["apply_ms"]),
                    f(&p["noop"]["p50"]),
                    f(&p["noop"]["p10"]),
                    f(&p["noop"]["p90"]),
                    f(&p["noop_repeat"]["p50"]),
                )?;
                for (c, _) in CASES {
                    match case(p, c, fam) {
                        Some(x) => write!(
                            md,
                            " {:.1} ({:.1}–{:.1}) ×{:.2}, net ×{:.1} |",
                            f(&x["ns"]["p50"]),
                            f(&x["ns"]["p10"]),
                            f(&x["ns"]["p90"]),
                            f(&x["ratio"]["p50"]),
                            f(&x["ratio_net"]["p50"])
                        )?,
                        None => md.push_str(" – |"),
                    }
                }
                md.push('\n');
            }
            md.push('\n');
        }
    }

    // Targets.
    writeln!(md, "### Targets\n")?;
    writeln!(
        md,
        "Each point's ratio to the no-op is taken per run; a per-packet target is decided \
         on the ~95% confidence interval of that ratio's median over the runs at every \
         point and family: *reached* when every interval lies at or under the limit, *not \
         reached* when some interval lies wholly above it, *not decided* when an interval \
         straddles it (and none is wholly above). The same holds for flatness below, \
         against its ±10% band.\n"
    )?;
    let net_worst = |c: &str| -> f64 {
        points
            .iter()
            .filter_map(|p| {
                ["ipv4", "ipv6"]
                    .iter()
                    .filter_map(|fam| case(p, c, fam).map(|x| f(&x["ratio_net"]["p50"])))
                    .reduce(f64::max)
            })
            .fold(f64::NAN, f64::max)
    };
    for (c, label, limit) in [
        ("established", "established flow", 3.0),
        ("new_flow", "new flow", 5.0),
    ] {
        // (median, CI, where) of every point and family.
        let mut all: Vec<(f64, (f64, f64), String)> = Vec::new();
        for p in points {
            for fam in ["ipv4", "ipv6"] {
                if let Some(x) = case(p, c, fam) {
                    let s = &p["shape"];
                    all.push((
                        f(&x["ratio"]["p50"]),
                        ci_of(&x["ratio"]),
                        format!(
                            "{} service ports × {} endpoint{}, {fam}",
                            n(u(&s["services"])),
                            n(u(&s["endpoints"])),
                            if u(&s["endpoints"]) == 1 { "" } else { "s" }
                        ),
                    ));
                }
            }
        }
        let Some(worst) = all.iter().max_by(|a, b| a.0.total_cmp(&b.0)) else {
            continue;
        };
        let verdicts: Vec<Verdict> = all
            .iter()
            .map(|(_, (a, b), _)| Verdict::range(*a, *b, 0.0, limit))
            .collect();
        let verdict = verdicts
            .iter()
            .copied()
            .max()
            .unwrap_or(Verdict::NotReached);
        let count = |v: Verdict| verdicts.iter().filter(|x| **x == v).count();
        writeln!(
            md,
            "- {label} ≤ {limit}× no-op: worst point ×{:.2} (95% CI {:.3}–{:.3}; {}; net of \
             timer overhead ×{:.1}); of {} points × families, {} within the limit, {} \
             straddling it, {} above it: {}",
            worst.0,
            worst.1 .0,
            worst.1 .1,
            worst.2,
            net_worst(c),
            all.len(),
            count(Verdict::Reached),
            count(Verdict::Noise),
            count(Verdict::NotReached),
            verdict.text()
        )?;
    }
    let svc: Vec<&Value> = points.iter().filter(|p| p["sweep"] == "services").collect();
    if svc.len() >= 2 {
        let most = svc
            .iter()
            .map(|p| u(&p["shape"]["services"]))
            .max()
            .unwrap_or(0);
        let target = 100_000;
        writeln!(
            md,
            "\nFlatness is each case's ratio to the no-op at a point over the same case's at \
             1 service port, taken within each run (the points are measured in turn in every \
             run), and judged on the ~95% confidence interval of its median over the runs \
             (order statistics); the p10–p90 of single runs is shown too: a single run of a \
             point lasts milliseconds, and a burst of other work on this shared 2-CPU machine \
             moves it by more than 10%.\n"
        )?;
        for (c, label) in CASES {
            for fam in ["ipv4", "ipv6"] {
                // Every point against the smallest one, within the same run (the points
                // are measured in turn in every run); judged on the spread over runs.
                let r: Vec<f64> = svc
                    .iter()
                    .filter_map(|p| case(p, c, fam).map(|x| f(&x["ratio"]["p50"])))
                    .collect();
                let later: Vec<(u64, &Value)> = svc
                    .iter()
                    .skip(1)
                    .filter_map(|p| Some((u(&p["shape"]["services"]), case(p, c, fam)?)))
                    .collect();
                if later.is_empty() {
                    continue;
                }
                let verdict = later
                    .iter()
                    .map(|(_, x)| {
                        let (a, b) = prog_flat_ci(x);
                        Verdict::range(a, b, 0.9, 1.1)
                    })
                    .max()
                    .unwrap_or(Verdict::NotReached);
                let verdict = if most >= target {
                    verdict.text().to_string()
                } else {
                    format!(
                        "{} up to {} service ports; 100,000 not measured in this run",
                        verdict.text(),
                        n(most)
                    )
                };
                let medians: Vec<String> = r.iter().map(|x| format!("×{x:.2}")).collect();
                let per_run: Vec<String> = later
                    .iter()
                    .map(|(svc, x)| {
                        let (a, b) = prog_flat_ci(x);
                        format!(
                            "{}: {}, 95% CI of the median {a:.3}–{b:.3}",
                            n(*svc),
                            ratio_spread(&x["vs_first_point"]),
                        )
                    })
                    .collect();
                writeln!(
                    md,
                    "- flat within ±10% from 1 to {} service ports, {label} {fam}: {} \
                     (× no-op); per run against 1 service port, median (p10–p90): {}: {}",
                    n(target),
                    medians.join(" → "),
                    per_run.join("; "),
                    verdict
                )?;
            }
        }
    }
    md.push('\n');

    let svg = prog_svg(&svc);
    let plot = results_dir(root).join("prog-services.svg");
    std::fs::write(&plot, svg).with_context(|| format!("writing {}", plot.display()))?;
    writeln!(
        md,
        "![ns per packet against frontends (IPv4), log scale]\
         (../bench/results/prog-services.svg)\n"
    )?;
    where_time_goes(md, points)?;
    Ok(())
}

/// The CI of a prog case's flatness ratio: `vs_first_point.ci_95`, or the separate
/// `vs_first_point_ci` of result files written before.
fn prog_flat_ci(x: &Value) -> (f64, f64) {
    match x["vs_first_point_ci"].as_array().map(Vec::as_slice) {
        Some([a, b]) => (f(a), f(b)),
        _ => ci_of(&x["vs_first_point"]),
    }
}

/// The differences between cases of the first point (IPv4), and what a profile of the
/// new-flow path showed.
fn where_time_goes(md: &mut String, points: &[Value]) -> Result<()> {
    let Some(p) = points.first() else {
        return Ok(());
    };
    let g = |c: &str| case(p, c, "ipv4").map_or(f64::NAN, |x| f(&x["ns"]["p50"]));
    let (noop, noop_rep) = (f(&p["noop"]["p50"]), f(&p["noop_repeat"]["p50"]));
    let (miss, new, est, reply) = (g("miss"), g("new_flow"), g("established"), g("reply"));
    writeln!(md, "### Where the time goes\n")?;
    writeln!(
        md,
        "From the first point above (IPv4, medians, this run):\n\n\
         | step | ns |\n|---|---|\n\
         | per-call overhead of BPF_PROG_TEST_RUN's timer (no-op at repeat 1 − at repeat \
         100k) | {:.0} |\n\
         | no-op program itself (repeat 100k) | {noop_rep:.1} |\n\
         | parse, SERVICES and RNAT misses, counters (miss − no-op) | {:.0} |\n\
         | SERVICES and CT hits, BACKENDS check, NAT rewrite, forwarding decision, counters \
         (established − miss) | {:.0} |\n\
         | `xdp_pod`'s RNAT hit and reverse NAT instead (reply − miss) | {:.0} |\n\
         | scheduling a new flow: Maglev slot, two LRU inserts (CT, RNAT), \
         bpf_ktime_get_ns (new flow − established) | {:.0} |\n",
        noop - noop_rep,
        miss - noop,
        est - miss,
        reply - miss,
        new - est
    )?;
    writeln!(
        md,
        "Profile (`perf record -F 20000 -g` of a full `bench prog`, 2026-11-26, the \
         104,027 samples whose stack is under `bpf_test_run`, by leaf function):\n\n\
         | where | share |\n|---|---|\n\
         | LRU inserts of new flows: `htab_lru_map_update_elem` and everything under it \
         (`bpf_lru_pop_free` 8.2%, `htab_map_hash`, `prealloc_lru_pop`) | 20.1% |\n\
         | hash lookups inlined into the program, walking buckets \
         (`lookup_nulls_elem_raw`: RNAT, SERVICES, CT with 40-byte keys; cold buckets \
         for new flows) | 17.8% |\n\
         | the program's own code (`xdp_edge`, `rewrite`, `schedule`, `forward`) | 17.4% |\n\
         | test harness and timer (`bpf_test_run`, `read_tsc`, `ktime_get`, \
         `bpf_test_timer_continue`, `__local_bh_enable_ip`): the per-call overhead \
         that the no-op pays too; `read_tsc` also serves the program's `bpf_ktime_get_ns` \
         | 31.3% |\n\
         | FIB lookup (`bpf_xdp_fib_lookup`, `bpf_ipv4/6_fib_lookup`, \
         `dev_get_by_index_rcu`) | 3.3% |\n\n\
         New flows take ~1,100–1,500 ns more than established ones; the LRU inserts \
         (two per flow: CT and RNAT) and cold-bucket lookups are most of that. The \
         LRU maps use the common LRU list, so every insert takes an entry from a \
         shared free list (`bpf_lru_pop_free`, with a spinlock when the per-CPU cache \
         runs dry). Options for the data path (not changed here, reported to the \
         lead): `BPF_F_NO_COMMON_LRU` (per-CPU LRU lists), one conntrack entry per \
         flow found from both directions instead of two inserts, a smaller key. The \
         established flow's cost over a miss ({:.0} ns) is one CT hit, the BACKENDS \
         check, the incremental-checksum rewrite and the forwarding decision; against a no-op \
         whose run is almost only harness overhead, 3× leaves ~{:.0} ns for all of it \
         at this machine's no-op of {:.0} ns.\n",
        est - miss,
        3.0 * noop - noop,
        noop
    )?;
    Ok(())
}

/// IPv4 ns/packet (median) of each case against frontends (SERVICES entries, what the
/// lookups' cost could depend on), log x axis.
fn prog_svg(svc: &[&Value]) -> String {
    let xs: Vec<u64> = svc.iter().map(|p| u(&p["frontends"])).collect();
    let mut series = vec![(
        "no-op".to_string(),
        svc.iter().map(|p| f(&p["noop"]["p50"])).collect(),
    )];
    for (c, _) in CASES {
        series.push((
            c.to_string(),
            svc.iter()
                .map(|p| case(p, c, "ipv4").map_or(f64::NAN, |x| f(&x["ns"]["p50"])))
                .collect(),
        ));
    }
    plot_svg(
        "frontends = SERVICES entries (log scale)",
        "ns per packet (IPv4, median)",
        &xs,
        &series,
    )
}

fn sync_section(md: &mut String, file: &str, v: &Value) {
    let r = &v["results"];
    let mut s = String::new();
    let _ = writeln!(s, "## sync: the control plane\n");
    let _ = writeln!(s, "Latest: `bench/results/{file}`, {}.\n", env_line(v));
    let _ = writeln!(
        s,
        "**Method.** In-process against the real maps of a freshly loaded object (pins in \
         their own directory), through the reconciler the agent uses. *Endpoint change*: \
         one endpoint added to or removed from one service port of the state, then `apply` \
         timed until it returns (it writes the new Maglev table into a fresh range, switches \
         the frontend and frees the old range); each change is followed by an `apply` of the \
         same state again, which finds nothing to write: that is the baseline (the diff of \
         the whole state alone). *Full sync*: wall time of the first `apply` of a whole \
         state on empty maps, and the CPU time of the applying thread (user, and system for \
         the map writes): the machine is shared, so wall time also counts waiting for a CPU. \
         *Memory*: each map's key/value size and max_entries from aya's `MapInfo` and the \
         kernel's `bytes_memlock` (bpftool); the maps are preallocated, so the total does \
         not depend on how many services are in use.\n"
    );
    let c = &r["churn"];
    let cs = &c["shape"];
    let _ = writeln!(
        s,
        "### Endpoint change ({} changes, {} service ports × {} endpoints)\n",
        u(&c["changes"]),
        n(u(&cs["services"])),
        u(&cs["endpoints"])
    );
    let _ = writeln!(
        s,
        "| apply | p50 | p90 | p99 | max |\n|---|---|---|---|---|"
    );
    for (k, label) in [
        ("change_ms", "one endpoint changed"),
        ("unchanged_ms", "nothing changed (baseline)"),
    ] {
        let x = &c[k];
        let _ = writeln!(
            s,
            "| {label} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms |",
            f(&x["p50"]),
            f(&x["p90"]),
            f(&x["p99"]),
            f(&x["max"])
        );
    }
    let upd = f(&c["map_update_ns"]);
    let _ = writeln!(
        s,
        "\nChange p50 is ×{:.2} the unchanged apply. One BPF_MAP_UPDATE_ELEM from user \
         space (aya, same run): **{upd:.0} ns**; the reconciler's single writes pay it \
         (deletions, source ranges, a lone changed entry). A change writes a whole new \
         Maglev table, median {:.0} slots, {}. `apply` diffs only the service ports whose \
         desired state changed; the unchanged apply is what still touches every port once \
         (comparing each with its last applied state).\n",
        f(&c["change_ms"]["p50"]) / f(&c["unchanged_ms"]["p50"]),
        f(&c["slots_written_p50"]),
        maglev_write_path(r)
    );
    let _ = writeln!(s, "### Full sync\n");
    let _ = writeln!(
        s,
        "| service ports | endpoints each | first apply (wall) | CPU user | CPU system | MAGLEV slots written | other map entries written | applied | not applied | why |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for x in r["full_syncs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} | {} | {} | {} |",
            n(u(&x["shape"]["services"])),
            u(&x["shape"]["endpoints"]),
            f(&x["ms"]),
            f(&x["cpu_user_ms"]),
            f(&x["cpu_sys_ms"]),
            n(u(&x["slots_written"])),
            n(u(&x["other_writes"])),
            n(u(&x["services_applied"])),
            n(u(&x["services_not_applied"])),
            x["shortage"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(
        s,
        "\nLimits of the default capacities (lb-common's; `lb-agent --max-*` changes them, \
         see the sized runs below):\n"
    );
    for l in r["limits"].as_array().into_iter().flatten() {
        let _ = writeln!(s, "- {}", l.as_str().unwrap_or(""));
    }
    let _ = writeln!(s, "\n### Map memory at the default capacities\n");
    let _ = writeln!(
        s,
        "| map | type | key | value | max_entries | bytes_memlock |\n|---|---|---|---|---|---|"
    );
    for m in r["maps"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            m["name"].as_str().unwrap_or("?"),
            m["map_type"].as_str().unwrap_or("?"),
            u(&m["key_size"]),
            u(&m["value_size"]),
            n(u(&m["max_entries"])),
            n(u(&m["bytes_memlock"]))
        );
    }
    let total = u(&r["maps_total_bytes"]);
    let _ = writeln!(
        s,
        "| **total** | | | | | **{}** ({:.1} MiB) |\n",
        n(total),
        total as f64 / (1u64 << 20) as f64,
    );

    sized_section(&mut s, r);

    where_sync_time_goes(&mut s, r, u(&v["env"]["nproc"]).max(1));

    // Targets.
    let _ = writeln!(s, "### Targets\n");
    let p99 = f(&c["change_ms"]["p99"]);
    let _ = writeln!(
        s,
        "- endpoint change p99 < 5 ms: {p99:.3} ms: {}",
        yes(p99 < 5.0)
    );
    let sized = sized_syncs(r);
    let find = |svcs: u64, eps: u64| {
        sized
            .iter()
            .find(|x| u(&x["shape"]["services"]) == svcs && u(&x["shape"]["endpoints"]) == eps)
    };
    for (svcs, eps, limit_ms) in [
        (10_000, 10, 1_000.0),
        (100_000, 10, 10_000.0),
        (100_000, 1, 10_000.0),
    ] {
        match find(svcs, eps) {
            Some(x) => {
                let ms = f(&x["ms"]);
                let _ = writeln!(
                    s,
                    "- full sync of {} × {eps} < {:.0} s (capacities sized for it, {}): \
                     {ms:.0} ms wall, {:.0} ms CPU: {}",
                    n(svcs),
                    limit_ms / 1e3,
                    x["family"].as_str().unwrap_or("?"),
                    f(&x["cpu_user_ms"]) + f(&x["cpu_sys_ms"]),
                    yes(ms < limit_ms)
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "- full sync of {} × {eps} < {:.0} s: not measured in this run (full run only)",
                    n(svcs),
                    limit_ms / 1e3
                );
            }
        }
    }
    match find(10_000, 10) {
        Some(x) => {
            let svc = u(&x["service_maps_bytes"]);
            let total = u(&x["maps_total_bytes"]);
            let flows = u(&x["capacities"]["flows"]);
            let per_flow = f(&x["bytes_per_flow"]);
            let other = u(&x["other_flow_maps_bytes"]) as f64;
            let small = 65_536.0;
            let percpu: u64 = r["sized_maps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["name"] == "SVC_STATS" || m["name"] == "BE_STATS")
                .map(|m| u(&m["bytes_memlock"]))
                .sum();
            let nproc = u(&v["env"]["nproc"]).max(1);
            let _ = writeln!(
                s,
                "- maps for 10,000 × 10 < 64 MiB (the maps that grow with services, capacities \
                 sized for it): {:.1} MiB on this {nproc}-CPU machine: {}; the per-CPU counters \
                 in it ({:.1} MiB) grow with CPUs: these maps would take {:.0} MiB on a 64-CPU \
                 node. With the flow \
                 tables, which `--max-flows` sizes \
                 for traffic ({per_flow:.0} bytes per flow for CT + RNAT, plus {:.1} MiB of \
                 AFFINITY and SOCK_RNAT): {:.1} MiB at the default {} flows, {:.1} MiB at \
                 `--max-flows {}`.\n",
                svc as f64 / (1u64 << 20) as f64,
                yes(svc < 64 << 20),
                percpu as f64 / (1u64 << 20) as f64,
                (svc - percpu) as f64 / (1u64 << 20) as f64
                    + percpu as f64 / (1u64 << 20) as f64 * 64.0 / nproc as f64,
                other / (1u64 << 20) as f64,
                total as f64 / (1u64 << 20) as f64,
                n(flows),
                (svc as f64 + other + per_flow * small) / (1u64 << 20) as f64,
                n(small as u64),
            );
        }
        None => {
            let _ = writeln!(
                s,
                "- maps for 10,000 × 10 < 64 MiB: not measured in this run\n"
            );
        }
    }
    md.push_str(&s);
}

/// How this run wrote Maglev tables: through the mmap when MAGLEV is BPF_F_MMAPABLE (what
/// `LbMaps::put_maglev` does then), else with BPF_MAP_UPDATE_BATCH.
fn maglev_write_path(r: &Value) -> &'static str {
    if maglev_mmapable(r) {
        "stored straight into MAGLEV's memory (the map is BPF_F_MMAPABLE and the agent maps it: no syscall per slot)"
    } else {
        "in BPF_MAP_UPDATE_BATCH calls (MAGLEV is not BPF_F_MMAPABLE in this run's object)"
    }
}

/// Whether this run's MAGLEV map was created with BPF_F_MMAPABLE.
fn maglev_mmapable(r: &Value) -> bool {
    const BPF_F_MMAPABLE: u64 = 1 << 10;
    r["maps"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["name"] == "MAGLEV"))
        .is_some_and(|m| u(&m["map_flags"]) & BPF_F_MMAPABLE != 0)
}

fn sized_syncs(r: &Value) -> Vec<&Value> {
    r["sized_syncs"].as_array().into_iter().flatten().collect()
}

/// Full syncs and memory on maps loaded with capacities sized for the state (what
/// `lb-agent --max-*` does).
fn sized_section(s: &mut String, r: &Value) {
    let sized = sized_syncs(r);
    if sized.is_empty() {
        return;
    }
    let _ = writeln!(s, "### Capacities sized for the workload\n");
    let _ = writeln!(
        s,
        "The maps loaded with capacities computed from the state (its frontends, VIPs, \
         service ports, distinct backends and Maglev slots, plus 10% room for changes: \
         `lb-agent --max-frontends/--max-services/--max-backends/--maglev-slots`); flow \
         tables (CT, RNAT, AFFINITY, SOCK_RNAT) keep their defaults, their size being a \
         matter of traffic (`--max-flows`). The issue's targets are these runs.\n"
    );
    let _ = writeln!(
        s,
        "| service ports | endpoints each | family | backends (cap.) | MAGLEV slots (cap.) | first apply (wall) | CPU user | CPU system | other map entries written | applied | maps | without flow tables | per service port (without flow tables) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for x in &sized {
        let c = &x["capacities"];
        let svc = u(&x["service_maps_bytes"]);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} | {:.1} MiB | {:.1} MiB | {} bytes |",
            n(u(&x["shape"]["services"])),
            u(&x["shape"]["endpoints"]),
            x["family"].as_str().unwrap_or("?"),
            n(u(&c["backends"])),
            n(u(&c["maglev_slots"])),
            f(&x["ms"]),
            f(&x["cpu_user_ms"]),
            f(&x["cpu_sys_ms"]),
            n(u(&x["other_writes"])),
            n(u(&x["services_applied"])),
            u(&x["maps_total_bytes"]) as f64 / (1u64 << 20) as f64,
            svc as f64 / (1u64 << 20) as f64,
            n(svc / u(&x["shape"]["services"]).max(1)),
        );
    }
    let _ = writeln!(s, "\nMap memory with capacities sized for 10,000 × 10:\n");
    let _ = writeln!(
        s,
        "| map | max_entries | bytes_memlock | bytes per entry |\n|---|---|---|---|"
    );
    for m in r["sized_maps"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} |",
            m["name"].as_str().unwrap_or("?"),
            n(u(&m["max_entries"])),
            n(u(&m["bytes_memlock"])),
            u(&m["bytes_memlock"]) as f64 / u(&m["max_entries"]).max(1) as f64
        );
    }
    s.push('\n');
}

/// Explains the control plane's figures with this run's numbers (and a profile).
fn where_sync_time_goes(s: &mut String, r: &Value, nproc: u64) {
    let c = &r["churn"];
    let eps = (u(&c["shape"]["services"]) * u(&c["shape"]["endpoints"])) as f64;
    let unchanged = f(&c["unchanged_ms"]["p50"]);
    let by_name = |name: &str| {
        r["sized_maps"]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["name"] == name))
            .map_or(0, |m| u(&m["bytes_memlock"]))
    };
    let percpu = (by_name("SVC_STATS") + by_name("BE_STATS")) as f64;
    let meta = (by_name("SVC_META") + by_name("BE_META")) as f64;
    let maglev = by_name("MAGLEV") as f64;
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let _ = writeln!(s, "### Where the time and memory go\n");
    let _ = writeln!(
        s,
        "- **Endpoint change.** `apply` keeps each service port as last applied and diffs \
         only the ports whose desired state changed (before that change, a profile put 83% \
         of apply in re-diffing the whole state: 7–13 ms p99 at 1,000 × 10). The unchanged \
         apply, {unchanged:.2} ms for {} endpoints ({:.2} µs per endpoint), is the \
         comparison of every port with its last applied state; a change adds its new \
         table ({:.0} slots) and a handful of single-entry writes. Going further needs the \
         source to report which ports changed.",
        n(eps as u64),
        unchanged * 1e3 / eps,
        f(&c["slots_written_p50"])
    );
    let mmapable = maglev_mmapable(r);
    let _ = writeln!(
        s,
        "- **Full sync.** Two changes took 10,000 × 10 from 2,866 ms (run \
         20261126T121846Z) to the figures above: (1) Maglev tables of the smallest rung of \
         a ladder of about doubling primes >= 20 × endpoints (211 slots for 10 endpoints) \
         instead of the smallest prime >= 100 × endpoints (1,009): 5× fewer slots to fill \
         and write (and one slot for a single endpoint instead of 101, which took 100,000 \
         × 1 from 3,773 ms to about 1.6 s); (2) backends, names, VIPs and frontends written with one \
         BPF_MAP_UPDATE_BATCH per map instead of one syscall per entry. In a profile of \
         the rest (perf, `bench sync --quick`), the kernel's per-element work in \
         `generic_map_update_batch` (copy_from_user, `bpf_map_update_value`) was ~30% of \
         all samples, about 200 ns per MAGLEV slot, which is most of the CPU system column: \
         10,000 tables of 211 slots took 423–437 ms that way and 2.5–2.8 ms stored through \
         an mmap of a BPF_F_MMAPABLE array (same process, interleaved, 3 rounds). The \
         agent writes tables that way when MAGLEV has the flag; {} The CPU user column is \
         the reconciler's own work (building the tables, the bookkeeping of every backend).",
        if mmapable {
            "this run's object has it."
        } else {
            "this run's object does not declare it yet, so the tables went in batches."
        }
    );
    let _ = writeln!(
        s,
        "- **Memory.** At 10,000 × 10 with sized capacities, MAGLEV takes {:.1} MiB (the \
         kernel stores array values in 8-byte slots, so a u32 slot costs 8 bytes); the \
         names for lbctl (SVC_META, BE_META, 128-byte values in preallocated hashes, ~200 \
         bytes per entry) {:.1} MiB; the per-CPU counters (SVC_STATS, BE_STATS) {:.1} MiB \
         on this {}-CPU machine, growing linearly with CPUs (×{} on a 64-CPU node: {:.0} \
         MiB). `BPF_F_NO_PREALLOC` on the name maps would not help here: every entry is in \
         use. The flow tables are sized for traffic, not services (see the target line \
         for bytes per flow).\n",
        mib(maglev),
        mib(meta),
        mib(percpu),
        nproc,
        64 / nproc,
        mib(percpu) * 64.0 / nproc as f64
    );
}

/// A line plot of `series` against `xs` (service counts, log scale), for the page.
fn plot_svg(x_label: &str, y_label: &str, xs: &[u64], series: &[(String, Vec<f64>)]) -> String {
    let (w, h, l, r, t, b) = (680.0, 360.0, 64.0, 230.0, 20.0, 40.0);
    let lx: Vec<f64> = xs.iter().map(|x| ((*x).max(1) as f64).log10()).collect();
    let xmax = lx.iter().cloned().fold(1.0, f64::max);
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().cloned())
        .filter(|y| y.is_finite())
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.1;
    let px = |x: f64| l + x / xmax * (w - l - r);
    let py = |y: f64| h - b - y / ymax * (h - t - b);
    let colors = [
        "#888", "#1f77b4", "#2ca02c", "#17becf", "#d62728", "#ff7f0e", "#9467bd",
    ];
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r##"<polyline points="{l},{t} {l},{} {},{}" fill="none" stroke="#000"/>"##,
        h - b,
        w - r,
        h - b
    );
    for (x, lxv) in xs.iter().zip(&lx) {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            px(*lxv),
            h - b + 16.0,
            n(*x)
        );
    }
    for i in 0..=4 {
        let y = ymax / 4.0 * i as f64;
        let label = if ymax >= 10.0 {
            format!("{y:.0}")
        } else {
            format!("{y:.2}")
        };
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{label}</text>"#,
            l - 6.0,
            py(y) + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text>"#,
        (l + w - r) / 2.0,
        h - 6.0
    );
    let _ = writeln!(
        s,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{y_label}</text>"#,
        h / 2.0,
        h / 2.0
    );
    for (i, (name, ys)) in series.iter().enumerate() {
        let pts: Vec<String> = lx
            .iter()
            .zip(ys)
            .filter(|(_, y)| y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let c = colors[i % colors.len()];
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            pts.join(" ")
        );
        for p in &pts {
            if let Some((x, y)) = p.split_once(',') {
                let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{c}"/>"#);
            }
        }
        let ly = t + 16.0 * i as f64 + 10.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
            w - r + 10.0,
            w - r + 30.0,
            w - r + 36.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn paths_of<'a>(p: &'a Value, key: &str) -> Option<&'a Value> {
    p["paths"].as_array()?.iter().find(|x| x["path"] == key)
}

use super::FORWARD_PATHS;

fn forward_section(md: &mut String, root: &Path, file: &str, v: &Value) -> Result<()> {
    let (r, points) = section_head(md, "forward: packets per second delivered to pods", file, v)?;
    writeln!(
        md,
        "**Topology.** For every path its own set of namespaces, built by the tests' \
         harness: a generator (the client namespace), the node, and two pods, each joined \
         to the node by a veth (the node side has no address and answers ARP by proxy, as \
         Calico does). The node has {} service ports, one count per point (ClusterIPs in 198.19.0.0/16, UDP port \
         80 to pod port 8080); the first {} (or all, if fewer) carry the traffic and have one endpoint on each \
         pod, the others one endpoint each. The same services are given to lb-agent (as \
         v1/Service and EndpointSlice manifests) and, for the baselines, to iptables and \
         nftables exactly as kube-proxy writes them.\n",
        points
            .iter()
            .map(|p| n(u(&p["services"])))
            .collect::<Vec<_>>()
            .join(", "),
        u(&r["hot_services"])
    )?;
    writeln!(
        md,
        "**Generator.** `xdp_bench_gen` (lb-ebpf `gen.rs`) run by BPF_PROG_TEST_RUN with \
         BPF_F_TEST_XDP_LIVE_FRAMES in the generator namespace, on one CPU: every frame is \
         rewritten whole (Ethernet, IPv4 with its checksum, UDP) and leaves with XDP_TX \
         into the node's edge veth. {}-byte frames on the wire (60 + FCS) over the hot \
         VIPs, two kinds of traffic: *established flows*, {} flows (128 source addresses × \
         64 source ports), all known (xdplb's CT, the kernel's conntrack, neighbour \
         entries) from a warm-up before the measurement, so this is the per-packet cost; \
         and *new flows*, {} flows, each coming back only after every other one, by when \
         xdplb's CT and conntrack have evicted it, so nearly every packet starts a flow \
         (the per-connection cost: Maglev and CT inserts in xdplb, a new conntrack entry and \
         the NAT chains in kube-proxy). A new-flows run leaves a conntrack entry per frame \
         for 30 s (UDP, unreplied) in the kube-proxy paths' namespaces, all masqueraded \
         from the node's one address to two pods, so new-flows runs are short ({:.2} s): \
         past ~2 × 64k entries the masquerade runs out of source ports and past \
         nf_conntrack_max conntrack drops new flows outright, flood failures of their own \
         rather than the per-flow cost. Rates are frames over the kernel's own run time of \
         the generator's loop (BPF_PROG_TEST_RUN's duration, in which the veths' NAPI polls \
         run too), which leaves out the page pool each call sets up (~20 ms). \
         Established-flows runs last {:.1} s; {} rounds, \
         each measuring every path in turn (starting at another path each round) with each \
         traffic; ratios are taken within a round and the median is shown.\n",
        u(&r["frame_len_on_wire"]),
        n(u(&r["flows"])),
        n(u(&r["new_flows"])),
        f(&r["seconds_per_new_flows_run"]),
        f(&r["seconds_per_run"]),
        u(&r["rounds"])
    )?;
    writeln!(
        md,
        "**Counting.** `xdp_bench_count` on each pod's eth0 (native XDP) counts and drops \
         the benchmark's UDP frames, so the figure is frames that reached the pod, whatever \
         the node's counters say (a frame redirected into a veth that cannot take it is \
         counted as sent by the node and lost silently). It is the same on every path, and \
         dropping there keeps the pods' socket layer, identical on every path, out of the \
         figure. The program also gives the pod veth the NAPI instance that frames \
         redirected into it from native XDP need.\n"
    )?;
    writeln!(
        md,
        "**Paths.** *ceiling*: `xdp_bench_redirect` on the edge redirects every frame to a \
         pod veth and does nothing else. *xdplb, native redirect*: lb-agent (`--xdp-mode \
         auto`), with the pod veths flagged IFACE_F_REDIRECT_OK by the benchmark: what the \
         data path does when the pods' veths run NAPI (the agent does not flag pod veths \
         itself, because a CNI does not enable NAPI in pods). *xdplb, generic-mode \
         redirect*: lb-agent `--xdp-mode generic`, the program runs on the skb and \
         redirects it (GRO on the edge veth for NAPI). *xdplb, pass to stack*: lb-agent as \
         shipped (native XDP on the edge, NATed packets passed to the kernel, which routes \
         them to the pod). *kube-proxy iptables*: {} (`iptables-restore` of KUBE-SERVICES → \
         KUBE-SVC-* → KUBE-SEP-* with `statistic` probabilities, KUBE-MARK-MASQ for \
         sources outside the cluster CIDR, KUBE-POSTROUTING masquerade, and the filter \
         table's KUBE-FORWARD/KUBE-SERVICES/firewall chains; the hot services' rules are \
         spread evenly through KUBE-SERVICES, where kube-proxy's map order puts a service \
         on average halfway). *kube-proxy nftables*: {} (table `ip kube-proxy`: \
         `service-ips` verdict map, per-service chains with `numgen random mod N vmap`, \
         endpoint chains with DNAT, the masquerade chains and the filter-hook checks). \
         The kube-proxy paths have `xdp_noop` (XDP_PASS) on the edge, so that the edge \
         veth runs NAPI as a real NIC does and the only difference is what follows.\n",
        r["iptables_version"].as_str().unwrap_or("?"),
        r["nft_version"].as_str().unwrap_or("?")
    )?;
    writeln!(
        md,
        "Mpps delivered to the pods, median (p10–p90) over rounds; ×: median per-round \
         ratio to kube-proxy iptables; % of ceiling: the same against the no-op redirect. \
         *delivered/sent* is below 100% when a queue on the way overflowed (the generator \
         otherwise waits for the frames it sent to be processed, being on the same CPU).\n"
    )?;
    writeln!(
        md,
        "| service ports | path | established flows | × iptables | % of ceiling | new flows \
         | × iptables | delivered/sent (est., new) | xdplb verdicts over both |\n\
         |---|---|---|---|---|---|---|---|---|"
    )?;
    let mpps = |x: &Value| {
        format!(
            "{:.3} ({:.3}–{:.3})",
            f(&x["pps"]["p50"]) / 1e6,
            f(&x["pps"]["p10"]) / 1e6,
            f(&x["pps"]["p90"]) / 1e6
        )
    };
    for p in points {
        for key in FORWARD_PATHS {
            let Some(x) = paths_of(p, key) else { continue };
            let (e, nf) = (&x["established"], &x["new_flows"]);
            let reasons: Vec<String> = x["reasons"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| Some(format!("{} {}", r[0].as_str()?, n(u(&r[1])))))
                .collect();
            writeln!(
                md,
                "| {} | {} | {} | ×{:.2} | {:.0}% | {} | ×{:.2} | {:.0}%, {:.0}% | {} |",
                n(u(&p["services"])),
                x["label"].as_str().unwrap_or(key),
                mpps(e),
                f(&e["vs_iptables"]["p50"]),
                f(&e["vs_ceiling"]["p50"]) * 100.0,
                mpps(nf),
                f(&nf["vs_iptables"]["p50"]),
                f(&e["delivered_share"]["p50"]) * 100.0,
                f(&nf["delivered_share"]["p50"]) * 100.0,
                reasons.join(", ")
            )?;
        }
    }
    md.push('\n');
    let xs: Vec<u64> = points.iter().map(|p| u(&p["services"])).collect();
    for (traffic, file, title) in [
        ("established", "forward-pps.svg", "established flows"),
        ("new_flows", "forward-new-flows.svg", "new flows"),
    ] {
        let series: Vec<(String, Vec<f64>)> = FORWARD_PATHS
            .iter()
            .map(|key| {
                let label = points
                    .iter()
                    .find_map(|p| paths_of(p, key)?["label"].as_str())
                    .unwrap_or(key)
                    .to_string();
                let ys = points
                    .iter()
                    .map(|p| {
                        paths_of(p, key).map_or(f64::NAN, |x| f(&x[traffic]["pps"]["p50"]) / 1e6)
                    })
                    .collect();
                (label, ys)
            })
            .collect();
        let plot = results_dir(root).join(file);
        std::fs::write(
            &plot,
            plot_svg(
                "service ports (log scale)",
                &format!("delivered Mpps, {title} (median)"),
                &xs,
                &series,
            ),
        )
        .with_context(|| format!("writing {}", plot.display()))?;
        writeln!(
            md,
            "![delivered Mpps against service ports, {title}](../bench/results/{file})\n"
        )?;
    }

    writeln!(md, "### Targets\n")?;
    let first = points.first();
    let last = points.last();
    for key in ["xdplb_redirect", "xdplb_generic", "xdplb_stack"] {
        let label = first
            .and_then(|p| paths_of(p, key))
            .and_then(|x| x["label"].as_str())
            .unwrap_or(key);
        let ratio_at = |p: Option<&Value>, traffic: &str| {
            p.and_then(|p| paths_of(p, key))
                .map(|x| f(&x[traffic]["vs_iptables"]["p50"]))
        };
        for (traffic, tl) in [("established", "established"), ("new_flows", "new flows")] {
            if let Some(r1) = ratio_at(first, traffic) {
                writeln!(
                    md,
                    "- {label}, {tl}: ≥ 4× iptables with {} service port(s): ×{r1:.2}: {}",
                    n(first.map_or(0, |p| u(&p["services"]))),
                    yes(r1 >= 4.0)
                )?;
            }
            if let (Some(p), Some(rn)) = (last, ratio_at(last, traffic)) {
                if u(&p["services"]) >= 10_000 {
                    writeln!(
                        md,
                        "- {label}, {tl}: ≥ 10× iptables with {} service ports: ×{rn:.2}: {}",
                        n(u(&p["services"])),
                        yes(rn >= 10.0)
                    )?;
                } else {
                    writeln!(
                        md,
                        "- {label}, {tl}: ≥ 10× iptables with 10,000 service ports: not \
                         measured in this run (largest point {})",
                        n(u(&p["services"]))
                    )?;
                }
            }
        }
        let worst = points
            .iter()
            .filter_map(|p| paths_of(p, key).map(|x| f(&x["established"]["vs_ceiling"]["p50"])))
            .fold(f64::NAN, f64::min);
        writeln!(
            md,
            "- {label}: ≥ 70% of the no-op redirect ceiling (established flows): worst point \
             {:.0}%: {}",
            worst * 100.0,
            yes(worst >= 0.7)
        )?;
    }
    md.push('\n');
    md.push_str(FORWARD_FINDINGS);
    Ok(())
}

/// What the numbers above come from (investigated on this machine; see the report of the
/// run that introduced `bench forward`).
const FORWARD_FINDINGS: &str = "### Why the ratios are what they are\n\n\
- **One CPU does everything.** The generator, the node's forwarding and the pods' \
counters run on the generator's CPU (a veth delivers into its peer's NAPI on the sending \
CPU), so every figure is the inverse of the whole chain's cost per packet: the ceiling's \
~250–300 ns is the generator, two veth hops and the counter; a path's extra cost over it \
is what the node does. *delivered/sent* stays near 100% because nothing else can run \
while the chain works.\n\
- **Established flows do not walk kube-proxy's chains.** Netfilter's NAT chains are \
consulted only for a connection's first packet; later packets are translated from the \
conntrack entry. For established flows the iptables and nftables paths cost a conntrack \
lookup, the netfilter hooks and the kernel's routing and forwarding, nearly whatever the \
number of services, so xdplb's ratio there (table above) is what skipping that stack is \
worth: the default pass-to-stack path still goes through the kernel's forwarding, minus \
conntrack and netfilter; the native redirect skips it. The ≥ 4× \
and ≥ 10× targets assumed a per-packet chain walk that kube-proxy does not do for \
established flows. The difference grows with the number of services only for *new* flows \
(see the targets for which are reached), where kube-proxy creates a conntrack entry and \
walks KUBE-SERVICES (linear in the number of services: \
~90–125 µs per new flow at 10,000 service ports) or, with nftables, does a verdict-map lookup \
(flat, but conntrack creation dominates), while xdplb's new flow is a Maglev slot and two \
LRU inserts, independent of the number of services.\n\
- **xdplb against the no-op redirect (established flows).** xdplb's native redirect \
adds ~800–1,000 ns per packet to the ceiling's chain, where `bench prog` puts its \
established-flow cost at ~300 ns with one hot flow. A `perf record -a -g` over a run \
(2026-11-26) put 61% of `xdp_edge`'s time in `lookup_nulls_elem_raw`, the bucket walk of \
the map lookups inlined into the program, and 14% in `bpf_fib_lookup`: with 8,192 flows, \
every packet takes cache misses on RNAT's bucket (looked up, and missed, for every client \
packet before SERVICES), on CT's bucket and on its entry, in 262,144-entry LRU hashes. An \
earlier run with a single flow (and a wall-clock time base that compressed every ratio \
towards 1) gave the native redirect 62–67% of the ceiling against 42–51% with 8,192 flows: \
the flow-table misses are a large part of the gap. Reaching 70% needs fewer cold lookups \
per packet (data-path options, reported to the lead, not changed here): look up SERVICES \
before RNAT on edge interfaces (a client's packet to a VIP never needs RNAT), one \
conntrack entry per flow found from both directions instead of CT + RNAT, smaller keys.\n\
- **The generic-mode redirect** runs the program on an skb (allocated for the generic \
hook) and redirects the skb: cheaper than the stack, dearer than redirecting the XDP \
frame.\n\
- **kube-proxy's new flows and the masquerade.** Traffic from outside the cluster CIDR to \
a ClusterIP is masqueraded by kube-proxy, here from the node's single address to two pods: \
at most ~2 × 64k concurrent UDP flows, each held for 30 s by conntrack. Earlier runs of \
this benchmark with longer new-flows runs ran into that limit (kube-proxy's figures fell \
to near zero in some rounds, at ~150 µs per packet); the runs are now short enough to stay \
clear of it, and that limit is a property of kube-proxy under a flood of new flows, not \
measured here.\n\n";

/// How a per-round (per-run) ratio stands against the band `[lo, hi]`, decided on the ~95%
/// confidence interval of its median over rounds: the interval says where the typical
/// round lies, and narrows with more rounds, where the spread of single rounds does not.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Verdict {
    /// The whole interval inside the band.
    Reached,
    /// The interval straddles a limit: this run cannot tell.
    Noise,
    /// The whole interval outside the band.
    NotReached,
}

/// The ~95% CI of a ratio's median (`ci_95`), or for result files written before it was
/// recorded, the p10–p90 spread those were judged on.
fn ci_of(s: &Value) -> (f64, f64) {
    match s["ci_95"].as_array().map(Vec::as_slice) {
        Some([a, b]) => (f(a), f(b)),
        _ => (f(&s["p10"]), f(&s["p90"])),
    }
}

/// What a verdict means, for the method texts.
const VERDICT_MEANING: &str = "A target is *reached* when the whole ~95% confidence \
interval of the median per-round ratio (distribution-free, from order statistics: the sign \
test's interval) lies within the limit at every point it covers, *not reached* when the \
whole interval lies beyond the limit at some point, and *not decided* otherwise: the \
median's uncertainty in this run straddles the limit, so more rounds or a quieter machine \
would be needed to tell. The interval narrows as 1/√rounds; the p10–p90 shown next to it \
is the spread of single rounds, which does not.";

impl Verdict {
    /// On the CI of a per-round ratio's median.
    fn of(s: &Value, lo: f64, hi: f64) -> Self {
        let (a, b) = ci_of(s);
        Self::range(a, b, lo, hi)
    }

    /// On an interval `[a, b]` (a spread or a confidence interval).
    fn range(a: f64, b: f64, lo: f64, hi: f64) -> Self {
        if !(a.is_finite() && b.is_finite()) {
            Verdict::NotReached
        } else if a >= lo && b <= hi {
            Verdict::Reached
        } else if b < lo || a > hi {
            Verdict::NotReached
        } else {
            Verdict::Noise
        }
    }

    fn text(self) -> &'static str {
        match self {
            Verdict::Reached => "**reached**",
            Verdict::Noise => {
                "**not decided**: the 95% CI of the median straddles the limit, so this \
                 run cannot tell"
            }
            Verdict::NotReached => "**not reached**",
        }
    }
}

/// `×median (p10–p90)` of a per-round ratio.
fn ratio_spread(s: &Value) -> String {
    format!(
        "×{:.2} ({:.2}–{:.2})",
        f(&s["p50"]),
        f(&s["p10"]),
        f(&s["p90"])
    )
}

/// `×median (p10–p90), CI lo–hi` of a per-round ratio: the spread of single rounds and the
/// interval the verdict is decided on.
fn ratio_ci(s: &Value) -> String {
    let (a, b) = ci_of(s);
    // Three decimals: at two, a bound just inside a ±5% limit prints as the limit.
    format!("{}, CI {a:.3}–{b:.3}", ratio_spread(s))
}

use super::TCP_PATHS;

fn tcp_section(md: &mut String, root: &Path, file: &str, v: &Value) -> Result<()> {
    let (r, points) = section_head(md, "tcp: connections through a VIP", file, v)?;
    // Result files written before rounds were sliced measured each setup in one go.
    let slices = r["slices_per_round"].as_u64().unwrap_or(1).max(1);
    writeln!(
        md,
        "**Method.** The same topology as `forward`, one per path and service count, with \
         nginx in both pods (port 8080). {} client threads of this process, moved into the \
         client namespace, each run a closed loop: connect to one of the first {} VIPs (TCP \
         port 80, taken in turn, each from its own client address), send `GET / \
         HTTP/1.0`, read the whole answer (nginx closes after it), close. A sample is that \
         whole exchange (two round trips through the load balancer, and a new flow for it \
         every time: Maglev scheduling and CT/RNAT inserts in xdplb, a conntrack entry and \
         the NAT rules in kube-proxy); an answer that is not a 200 from a pod counts as an \
         error (and costs the 2-s timeout, which shows in connections/s). The pods keep no \
         TIME_WAIT sockets (`tcp_max_tw_buckets = 0`): nginx closes first, every VIP leads \
         to the same two pod addresses, and client ports came back to a pod's TIME_WAIT \
         within seconds, costing one-second SYN retransmissions on every path alike. All \
         topologies (every service count × every path) are built before measuring; each of \
         the {} rounds measures every one of them for {:.1} s, in {} turns of {:.2} s \
         taken in rotation (starting at another one each turn), so setups that are compared \
         are measured within a second of each other and a noisy phase of the machine hits \
         every path and service count alike. Ratios are taken within a round (against \
         iptables and nftables at the same service count, and against the same path at \
         the smallest service count, which is how flatness is judged) and shown as median \
         (p10–p90) over rounds. {} Latency p50/p99 are over every exchange of every round. \
         xdplb runs as shipped (`--xdp-mode auto`: native on the edge, pass to the stack \
         towards the pods, reverse NAT in `xdp_pod` redirected out of the edge). \
         kube-proxy's paths are the iptables ruleset ({}) and the nftables table ({}) of `forward`, with TCP.\n",
        u(&r["client_threads"]),
        u(&r["hot_services"]),
        u(&r["rounds"]),
        f(&r["seconds_per_run"]),
        slices,
        f(&r["seconds_per_run"]) / slices as f64,
        VERDICT_MEANING,
        r["iptables_version"].as_str().unwrap_or("?"),
        r["nft_version"].as_str().unwrap_or("?"),
    )?;
    writeln!(
        md,
        "| service ports | path | connections/s median (p10–p90) | latency p50 | latency \
         p99 | p50 × iptables | p99 × iptables | p50 × nftables | connections/s × \
         iptables | p50 × same path at {} service port(s) | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|",
        n(points.first().map_or(0, |p| u(&p["services"])))
    )?;
    for p in points {
        for key in TCP_PATHS {
            let Some(x) = paths_of(p, key) else { continue };
            writeln!(
                md,
                "| {} | {} | {:.0} ({:.0}–{:.0}) | {:.0} µs | {:.0} µs | {} | {} | {} | {} | {} \
                 | {} |",
                n(u(&p["services"])),
                x["label"].as_str().unwrap_or(key),
                f(&x["conns_per_s"]["p50"]),
                f(&x["conns_per_s"]["p10"]),
                f(&x["conns_per_s"]["p90"]),
                f(&x["latency_us"]["p50"]),
                f(&x["latency_us"]["p99"]),
                ratio_spread(&x["p50_vs_iptables"]),
                ratio_spread(&x["p99_vs_iptables"]),
                ratio_spread(&x["p50_vs_nftables"]),
                ratio_spread(&x["rate_vs_iptables"]),
                ratio_spread(&x["p50_vs_first_point"]),
                u(&x["errors"])
            )?;
        }
    }
    md.push('\n');
    let xs: Vec<u64> = points.iter().map(|p| u(&p["services"])).collect();
    let mut series = Vec::new();
    for key in TCP_PATHS {
        for q in ["p50", "p99"] {
            let ys = points
                .iter()
                .map(|p| paths_of(p, key).map_or(f64::NAN, |x| f(&x["latency_us"][q])))
                .collect();
            series.push((format!("{key} {q}"), ys));
        }
    }
    let plot = results_dir(root).join("tcp-latency.svg");
    std::fs::write(
        &plot,
        plot_svg("service ports (log scale)", "latency, µs", &xs, &series),
    )
    .with_context(|| format!("writing {}", plot.display()))?;
    writeln!(
        md,
        "![TCP exchange latency against service ports](../bench/results/tcp-latency.svg)\n"
    )?;
    writeln!(md, "### Targets\n")?;
    // Flatness: every larger point against the smallest, within the same round.
    let flat: Vec<(u64, &Value)> = points
        .iter()
        .skip(1)
        .filter_map(|p| {
            Some((
                u(&p["services"]),
                &paths_of(p, "xdplb")?["p50_vs_first_point"],
            ))
        })
        .collect();
    if !flat.is_empty() {
        let verdict = flat
            .iter()
            .map(|(_, s)| Verdict::of(s, 0.95, 1.05))
            .max()
            .unwrap_or(Verdict::NotReached);
        let all: Vec<String> = flat
            .iter()
            .map(|(svc, s)| format!("{}: {}", n(*svc), ratio_ci(s)))
            .collect();
        writeln!(
            md,
            "- xdplb latency flat (±5%) from {} to {} service ports, p50 against the same \
             round's at {}, median (p10–p90) and 95% CI of the median: {}: {}",
            n(xs.first().copied().unwrap_or(0)),
            n(xs.last().copied().unwrap_or(0)),
            n(xs.first().copied().unwrap_or(0)),
            all.join("; "),
            verdict.text()
        )?;
    }
    for (base, target) in [("iptables", true), ("nftables", false)] {
        let mut verdict = Verdict::Reached;
        let mut all = Vec::new();
        for p in points {
            let Some(x) = paths_of(p, "xdplb") else {
                continue;
            };
            for q in ["p50", "p99"] {
                let s = &x[format!("{q}_vs_{base}").as_str()];
                if s.is_null() {
                    continue;
                }
                let v = Verdict::of(s, 0.0, 1.0);
                verdict = verdict.max(v);
                all.push(format!(
                    "{} {q} {}{}",
                    n(u(&p["services"])),
                    ratio_ci(s),
                    match v {
                        Verdict::Reached => "",
                        Verdict::Noise => " (not decided)",
                        Verdict::NotReached => " (worse)",
                    }
                ));
            }
        }
        if all.is_empty() {
            continue;
        }
        writeln!(
            md,
            "- xdplb never worse than {base} (p50 and p99 at every point, the 95% CI of the \
             median per-round ratio ≤ 1){}: {}: {}",
            if target {
                ""
            } else {
                " (not a target of the issue; shown for comparison)"
            },
            all.join("; "),
            verdict.text()
        )?;
    }
    md.push('\n');
    md.push_str(TCP_FINDINGS);
    Ok(())
}

const TCP_FINDINGS: &str = "### Why\n\n\
- Every exchange is a new flow for the load balancer. For the SYN, kube-proxy's iptables \
path creates a conntrack entry and walks KUBE-SERVICES, linearly: the hot services' rules \
sit on average halfway down the chain, 5,000 rules at 10,000 service ports, and latency and \
connection rate degrade with the number of services. Its nftables path creates the same \
conntrack entry but finds the service in one verdict-map lookup, whatever the number of \
services. xdplb's SYN costs a SERVICES hash lookup, a Maglev slot and two LRU inserts, \
whatever the number of services.\n\
- **Noise.** On this shared 2-CPU machine a single round's p50 moves by 10–25% (other \
work, nginx and the client threads compete for the two CPUs), more than the ±5% asked for, \
however many rounds there are: that spread (p10–p90) is shown, but the verdicts are decided \
on the confidence interval of the median per-round ratio, which many short rounds narrow \
to a few percent. A round's p99 rests on its slowest ~1% of exchanges and moves far more, \
so its interval stays wider. Where two paths cost the same (few services: the exchange is \
TCP stacks and nginx), a ratio's interval straddles 1 and \"never worse\" stays *not \
decided* at that point: equal is neither better nor worse within what this machine can \
resolve.\n\
- With few services xdplb and kube-proxy are close: the exchange is dominated by the TCP \
stacks, nginx and scheduling on two CPUs, and xdplb's default mode still hands the NATed \
packets to the kernel's forwarding towards the pods (see `forward`).\n\
- **Found here, fixed since (data path):** with one client address for all 16 VIPs, xdplb \
had exchanges time out (2 s) at 1,000 and 10,000 service ports. After DNAT, a client port \
reused towards another VIP is the same (client, port, pod, 8080) tuple at the pod, and \
xdplb does not SNAT, so the two flows share one RNAT key; coming back to the first VIP hit \
its still-live CT entry while RNAT named the other VIP. The program now checks the reply \
entry on every TCP SYN and UDP packet of a tracked flow and rewrites it when it names \
another frontend (fixture `port_reuse_across_frontends_sharing_a_backend_keeps_replies_right`). \
Two such flows *at the same time* still clash (kube-proxy masquerades with a random source \
port; xdplb would need SNAT); the benchmark keeps one client address per VIP so that it \
measures latency, not that clash.\n\n";

#[cfg(test)]
mod tests {
    use super::Verdict;

    #[test]
    fn a_verdict_needs_the_whole_interval_on_one_side() {
        assert!(Verdict::range(0.96, 1.04, 0.95, 1.05) == Verdict::Reached);
        assert!(Verdict::range(0.90, 1.04, 0.95, 1.05) == Verdict::Noise);
        assert!(Verdict::range(1.06, 1.20, 0.95, 1.05) == Verdict::NotReached);
        assert!(Verdict::range(0.80, 0.90, 0.95, 1.05) == Verdict::NotReached);
        assert!(Verdict::range(f64::NAN, 1.0, 0.0, 1.0) == Verdict::NotReached);
        // Older result files: judged on the spread of single rounds.
        let s = serde_json::json!({"p10": 0.8, "p50": 0.9, "p90": 1.1});
        assert!(Verdict::of(&s, 0.0, 1.0) == Verdict::Noise);
        // With the median's interval, that decides: single rounds may stray past the limit.
        let s = serde_json::json!({"p10": 0.8, "p50": 0.9, "p90": 1.1, "ci_95": [0.86, 0.95]});
        assert_eq!(Verdict::of(&s, 0.0, 1.0), Verdict::Reached);
        let s = serde_json::json!({"p10": 0.9, "p50": 1.1, "p90": 1.3, "ci_95": [1.02, 1.2]});
        assert_eq!(Verdict::of(&s, 0.0, 1.0), Verdict::NotReached);
        let s = serde_json::json!({"p10": 0.9, "p50": 1.0, "p90": 1.1, "ci_95": [0.98, 1.01]});
        assert_eq!(Verdict::of(&s, 0.0, 1.0), Verdict::Noise);
    }
}
