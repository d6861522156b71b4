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

fn results_dir(root: &Path) -> PathBuf {
    root.join("bench").join("results")
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
    let sync = latest(root, "sync")?;
    let mut md = String::new();
    md.push_str(
        "# Benchmarks\n\n\
         <!-- Generated by `cargo xtask bench` from bench/results/*.json. Do not edit. -->\n\n\
         `cargo xtask bench [prog|sync|all] [--quick]` measures the real XDP object and the \
         real reconciler on this machine and writes `bench/results/<timestamp>-<suite>.json` \
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
    if let Some((file, v)) = &sync {
        sync_section(&mut md, file, v);
    } else {
        md.push_str("## sync\n\nNo result yet: run `cargo xtask bench sync`.\n\n");
    }
    let path = root.join("docs").join("benchmarks.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

const CASES: [(&str, &str); 4] = [
    ("miss", "miss (IP to a non-VIP)"),
    ("new_flow", "new flow (SYN, Maglev, CT+RNAT insert)"),
    ("established", "established flow"),
    ("reply", "reply (reverse NAT)"),
];

fn case<'a>(p: &'a Value, c: &str, fam: &str) -> Option<&'a Value> {
    p["cases"]
        .as_array()?
        .iter()
        .find(|x| x["case"] == c && x["family"] == fam)
}

fn prog_section(md: &mut String, root: &Path, file: &str, v: &Value) -> Result<()> {
    let r = &v["results"];
    let points = r["points"]
        .as_array()
        .ok_or_else(|| anyhow!("{file}: no points"))?;
    writeln!(md, "## prog: nanoseconds per packet\n")?;
    writeln!(md, "Latest: `bench/results/{file}`, {}.\n", env_line(v))?;
    writeln!(
        md,
        "**Method.** The real object is loaded as the agent loads it (`loader::load`, pins in \
         a fresh directory under /sys/fs/bpf, removed afterwards) together with `xdp_noop`, a \
         program that only returns `XDP_PASS`. The real reconciler (`Reconciler::adopt` over \
         `LbMaps`) applies a generated desired state. Packets go through `xdp_edge` with \
         BPF_PROG_TEST_RUN, one repetition per call (with more, a DNAT program would \
         measure a miss on its own rewritten packet from the second repetition on), and the \
         sample is the kernel's `duration` of that call: the program's run time plus the \
         kernel's timer overhead, which the no-op pays as well. Each run makes {} calls per \
         case and takes the mean; there are {} runs after one discarded warm-up run, and the \
         tables show the median with p10–p90 over runs. The ratio is computed per run \
         against the no-op of the same run. All points are loaded at once (each with its own \
         object and maps) and every run measures each point in turn, starting at another \
         point each time, so the shared machine's noisy phases hit all points alike. \
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
         backend's answer in that flow, reverse-NATed through RNAT. After each point, the \
         REASONS counters must show exactly the paths measured (pass_not_service, fwd_pass, \
         rnat_pass) and RNAT must have grown by one entry per new-flow call, or the run \
         fails.\n"
    )?;
    writeln!(
        md,
        "The probe service port (where the packets go) is dual-stack, one IPv4 and one IPv6 \
         ClusterIP; the other service ports are IPv4 with the frontends given. Limits of \
         the sweep (lb-common capacities, not changed):\n"
    )?;
    for l in r["limits"].as_array().into_iter().flatten() {
        writeln!(md, "- {}", l.as_str().unwrap_or(""))?;
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
    let worst = |c: &str, key: &str| -> f64 {
        points
            .iter()
            .filter_map(|p| {
                ["ipv4", "ipv6"]
                    .iter()
                    .filter_map(|fam| case(p, c, fam).map(|x| f(&x[key]["p50"])))
                    .reduce(f64::max)
            })
            .fold(f64::NAN, f64::max)
    };
    for (c, label, limit) in [
        ("established", "established flow", 3.0),
        ("new_flow", "new flow", 5.0),
    ] {
        let (r, net) = (worst(c, "ratio"), worst(c, "ratio_net"));
        writeln!(
            md,
            "- {label} ≤ {limit}× no-op: worst point ×{r:.2} (net of timer overhead \
             ×{net:.1}): {}",
            yes(r <= limit)
        )?;
    }
    let svc: Vec<&Value> = points.iter().filter(|p| p["sweep"] == "services").collect();
    if svc.len() >= 2 {
        let most = svc.iter().map(|p| u(&p["frontends"])).max().unwrap_or(0);
        for (c, label) in CASES {
            for fam in ["ipv4", "ipv6"] {
                // Every point against the smallest one: the largest deviation counts.
                let r: Vec<f64> = svc
                    .iter()
                    .filter_map(|p| case(p, c, fam).map(|x| f(&x["ratio"]["p50"])))
                    .collect();
                let Some(first) = r.first().copied() else {
                    continue;
                };
                let d = r
                    .iter()
                    .map(|x| (x / first - 1.0) * 100.0)
                    .fold(0.0f64, |a, b| if b.abs() > a.abs() { b } else { a });
                let all: Vec<String> = r.iter().map(|x| format!("×{x:.2}")).collect();
                writeln!(
                    md,
                    "- flat within ±10% from 1 service port to {} frontends, {label} {fam}: \
                     {} (largest deviation {d:+.1}%): {}",
                    n(most),
                    all.join(" → "),
                    yes(d.abs() <= 10.0)
                )?;
            }
        }
    }
    md.push('\n');

    let svg = prog_svg(&svc)?;
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
         | parse, RNAT miss, SERVICES miss, counters (miss − no-op) | {:.0} |\n\
         | CT hit, BACKENDS check, NAT rewrite, FIB lookup, counters (established − miss) \
         | {:.0} |\n\
         | RNAT hit and reverse NAT instead (reply − miss) | {:.0} |\n\
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
         check, the incremental-checksum rewrite and the FIB lookup; against a no-op \
         whose run is almost only harness overhead, 3× leaves ~{:.0} ns for all of it \
         at this machine's no-op of {:.0} ns.\n",
        est - miss,
        3.0 * noop - noop,
        noop
    )?;
    Ok(())
}

/// A plain SVG: IPv4 ns/packet (median) of each case against frontends (SERVICES entries,
/// what the lookups' cost could depend on), log x axis.
fn prog_svg(svc: &[&Value]) -> Result<String> {
    let (w, h, l, r, t, b) = (640.0, 360.0, 60.0, 170.0, 20.0, 40.0);
    let xs: Vec<f64> = svc
        .iter()
        .map(|p| (u(&p["frontends"]).max(1) as f64).log10())
        .collect();
    let xmax = xs.iter().cloned().fold(1.0, f64::max);
    let mut series: Vec<(&str, Vec<f64>)> =
        vec![("no-op", svc.iter().map(|p| f(&p["noop"]["p50"])).collect())];
    for (c, _) in CASES {
        series.push((
            c,
            svc.iter()
                .map(|p| case(p, c, "ipv4").map_or(f64::NAN, |x| f(&x["ns"]["p50"])))
                .collect(),
        ));
    }
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().cloned())
        .filter(|y| y.is_finite())
        .fold(1.0, f64::max)
        * 1.1;
    let px = |x: f64| l + x / xmax * (w - l - r);
    let py = |y: f64| h - b - y / ymax * (h - t - b);
    let colors = ["#888", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let mut s = String::new();
    writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    )?;
    writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#)?;
    writeln!(
        s,
        r##"<polyline points="{l},{t} {l},{} {},{}" fill="none" stroke="#000"/>"##,
        h - b,
        w - r,
        h - b
    )?;
    for x in &svc.iter().map(|p| u(&p["frontends"])).collect::<Vec<_>>() {
        let xx = px(((*x).max(1) as f64).log10());
        writeln!(
            s,
            r#"<text x="{xx:.1}" y="{}" text-anchor="middle">{}</text>"#,
            h - b + 16.0,
            n(*x)
        )?;
    }
    for i in 0..=4 {
        let y = ymax / 4.0 * i as f64;
        writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{y:.0}</text>"#,
            l - 6.0,
            py(y) + 4.0
        )?;
    }
    writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">frontends = SERVICES entries (log scale)</text>"#,
        (l + w - r) / 2.0,
        h - 6.0
    )?;
    writeln!(
        s,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">ns per packet (IPv4, median)</text>"#,
        h / 2.0,
        h / 2.0
    )?;
    for (i, (name, ys)) in series.iter().enumerate() {
        let pts: Vec<String> = xs
            .iter()
            .zip(ys)
            .filter(|(_, y)| y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let c = colors[i % colors.len()];
        writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            pts.join(" ")
        )?;
        let ly = t + 16.0 * i as f64 + 10.0;
        writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
            w - r + 10.0,
            w - r + 30.0,
            w - r + 36.0,
            ly + 4.0
        )?;
    }
    s.push_str("</svg>\n");
    Ok(s)
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
         state on empty maps. *Memory*: each map's key/value size and max_entries from \
         aya's `MapInfo` and the kernel's `bytes_memlock` (bpftool); the maps are \
         preallocated, so the total does not depend on how many services are in use.\n"
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
         space (aya, same run): **{upd:.0} ns**; every write but Maglev tables pays it. A \
         change writes a whole new Maglev table, median {:.0} slots, in \
         BPF_MAP_UPDATE_BATCH chunks. `apply` diffs only the service ports whose desired \
         state changed; the unchanged apply is what still touches every port once \
         (comparing each with its last applied state).\n",
        f(&c["change_ms"]["p50"]) / f(&c["unchanged_ms"]["p50"]),
        f(&c["slots_written_p50"]),
    );
    let _ = writeln!(s, "### Full sync\n");
    let _ = writeln!(
        s,
        "| service ports | endpoints each | first apply | MAGLEV slots written | other map writes | estimated time of the single-entry writes (other writes × one update) | applied | not applied | why |\n|---|---|---|---|---|---|---|---|---|"
    );
    for x in r["full_syncs"].as_array().into_iter().flatten() {
        // Maglev slots go in batches; every other write is one syscall.
        let writes = u(&x["other_writes"]);
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} ms | {} | {} | {:.0} ms ({:.0}%) | {} | {} | {} |",
            n(u(&x["shape"]["services"])),
            u(&x["shape"]["endpoints"]),
            f(&x["ms"]),
            n(u(&x["slots_written"])),
            n(u(&x["other_writes"])),
            writes as f64 * upd / 1e6,
            writes as f64 * upd / 1e6 / f(&x["ms"]) * 100.0,
            n(u(&x["services_applied"])),
            n(u(&x["services_not_applied"])),
            x["shortage"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(s, "\nLimits (lb-common capacities):\n");
    for l in r["limits"].as_array().into_iter().flatten() {
        let _ = writeln!(s, "- {}", l.as_str().unwrap_or(""));
    }
    let _ = writeln!(s, "\n### Map memory\n");
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
        "| **total** | | | | | **{}** ({:.1} MiB) |\n\nThat is {:.0} bytes per service \
         port at 10,000 service ports.\n",
        n(total),
        total as f64 / (1u64 << 20) as f64,
        f(&r["bytes_per_service_at_10000"])
    );

    where_sync_time_goes(&mut s, r, u(&v["env"]["nproc"]).max(1));

    // Targets.
    let _ = writeln!(s, "### Targets\n");
    let p99 = f(&c["change_ms"]["p99"]);
    let _ = writeln!(
        s,
        "- endpoint change p99 < 5 ms: {p99:.3} ms: {}",
        yes(p99 < 5.0)
    );
    let full = r["full_syncs"].as_array().and_then(|a| {
        a.iter()
            .find(|x| u(&x["shape"]["services"]) == 10_000 && u(&x["services_not_applied"]) == 0)
    });
    match full {
        Some(x) => {
            let ms = f(&x["ms"]);
            let _ = writeln!(
                s,
                "- full sync of 10,000 service ports < 1 s: {ms:.0} ms with {} endpoint(s) \
                 each: {} (10 endpoints each do not fit the maps, see limits)",
                u(&x["shape"]["endpoints"]),
                yes(ms < 1000.0)
            );
        }
        None => {
            let _ = writeln!(
                s,
                "- full sync of 10,000 service ports < 1 s: not measured in this run"
            );
        }
    }
    let _ = writeln!(
        s,
        "- maps for 10,000 × 10 < 64 MiB: {:.1} MiB preallocated at the current capacities: \
         {} (but 10,000 × 10 itself does not fit MAGLEV_SLOTS and MAX_BACKENDS)\n",
        total as f64 / (1u64 << 20) as f64,
        yes(total < 64 << 20)
    );
    md.push_str(&s);
}

/// Explains the control plane's figures with this run's numbers (and a profile).
fn where_sync_time_goes(s: &mut String, r: &Value, nproc: u64) {
    let c = &r["churn"];
    let eps = (u(&c["shape"]["services"]) * u(&c["shape"]["endpoints"])) as f64;
    let unchanged = f(&c["unchanged_ms"]["p50"]);
    let upd = f(&c["map_update_ns"]);
    let by_name = |name: &str| {
        r["maps"]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["name"] == name))
            .map_or(0, |m| u(&m["bytes_memlock"]))
    };
    let total = u(&r["maps_total_bytes"]) as f64;
    let flows = (by_name("CT") + by_name("RNAT")) as f64;
    let percpu = (by_name("SVC_STATS") + by_name("BE_STATS")) as f64;
    let meta = (by_name("SVC_META") + by_name("BE_META")) as f64;
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let _ = writeln!(s, "### Where the time and memory go\n");
    let _ = writeln!(
        s,
        "- **Endpoint change.** `apply` keeps each service port as last applied and diffs \
         only the ports whose desired state changed (before that change, a profile put 83% \
         of apply in re-diffing the whole state: 7–13 ms p99 at 1,000 × 10). The unchanged \
         apply, {unchanged:.2} ms for {} endpoints ({:.2} µs per endpoint), is the \
         comparison of every port with its last applied state; a change adds its new \
         table ({:.0} slots, written in BPF_MAP_UPDATE_BATCH chunks) and a handful of \
         single-entry writes. Going further needs the source to report which ports \
         changed.",
        n(eps as u64),
        unchanged * 1e3 / eps,
        f(&c["slots_written_p50"])
    );
    let _ = writeln!(
        s,
        "- **Full sync.** Maglev tables are written with BPF_MAP_UPDATE_BATCH (a raw \
         bpf(2) call, 64k slots per call; aya 0.14 does not wrap it), which took a full \
         sync of 10,000 service ports from ~1.2 s (one {upd:.0} ns syscall per slot) to \
         the figures above. What remains is one syscall per SERVICES, VIPS, BACKENDS and \
         name entry (column \"single-entry writes\") and the reconciler's own work \
         (building Maglev tables, names)."
    );
    let _ = writeln!(
        s,
        "- **Memory.** The maps are preallocated at lb-common's capacities: CT + RNAT \
         ({} entries each) take {:.1} MiB of {:.1} MiB ({:.0}%); the names for lbctl \
         (SVC_META, BE_META, 128-byte values) {:.1} MiB; the per-CPU counters (SVC_STATS, \
         BE_STATS) {:.1} MiB on this {}-CPU machine, and they grow linearly with CPUs \
         (×{} on a 64-CPU node: {:.0} MiB). Meeting 64 MiB needs smaller flow tables \
         (MAX_FLOWS) or `BPF_F_NO_PREALLOC` hashes, and counters that do not scale with \
         CPUs × 65,536 entries; a capacity decision for the lead.\n",
        n(r["maps"]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["name"] == "CT"))
            .map_or(0, |m| u(&m["max_entries"]))),
        mib(flows),
        mib(total),
        flows / total * 100.0,
        mib(meta),
        mib(percpu),
        nproc,
        64 / nproc,
        mib(percpu) * 64.0 / nproc as f64
    );
}
