//! The `prog` section: nanoseconds per packet of each case against the no-op, per point
//! of the sweeps over services and endpoints, the per-packet and flatness targets, and
//! where the time goes.

use super::svg::plot_svg;
use super::{ratio_spread, section_head, thousands, write_plot, Verdict};
use crate::bench::results::prog::{Case, CaseResult, Family, Point, ProgResults, Sweep};
use crate::bench::results::ResultFile;
use anyhow::Result;
use std::fmt::Write as _;
use std::path::Path;

const CASES: [(Case, &str); 4] = [
    (Case::Miss, "miss (IP to a non-VIP)"),
    (Case::NewFlow, "new flow (SYN, Maglev, CT+RNAT insert)"),
    (Case::Established, "established flow"),
    (Case::Reply, "reply (reverse NAT, xdp_pod)"),
];

const FAMILIES: [Family; 2] = [Family::Ipv4, Family::Ipv6];

pub fn section(
    md: &mut String,
    root: &Path,
    file: &str,
    run: &ResultFile<ProgResults>,
) -> Result<()> {
    section_head(md, "prog: nanoseconds per packet", file, run)?;
    let r = &run.results;
    let points = &r.points;
    method(md, r)?;
    capacities_table(md, points)?;
    for (sweep, title) in [
        (Sweep::Services, "Sweep over services (1 endpoint each)"),
        (Sweep::Endpoints, "Sweep over endpoints (8 service ports)"),
    ] {
        let pts: Vec<&Point> = points.iter().filter(|p| p.sweep == sweep).collect();
        if pts.is_empty() {
            continue;
        }
        for (fam, fam_title) in [(Family::Ipv4, "IPv4"), (Family::Ipv6, "IPv6")] {
            sweep_table(md, &format!("{title}, {fam_title}"), fam, &pts)?;
        }
    }

    writeln!(md, "### Targets\n")?;
    per_packet_targets(md, points)?;
    let svc: Vec<&Point> = points
        .iter()
        .filter(|p| p.sweep == Sweep::Services)
        .collect();
    if svc.len() >= 2 {
        flatness_targets(md, &svc)?;
    }
    md.push('\n');

    write_plot(root, "prog-services.svg", services_plot(&svc))?;
    writeln!(
        md,
        "![ns per packet against frontends (IPv4), log scale]\
         (../bench/results/prog-services.svg)\n"
    )?;
    where_time_goes(md, points)?;
    Ok(())
}

/// How the figures are measured, and what the cases and the probe service are.
fn method(md: &mut String, r: &ProgResults) -> Result<()> {
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
        r.calls_per_run,
        r.runs
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
    Ok(())
}

fn capacities_table(md: &mut String, points: &[Point]) -> Result<()> {
    writeln!(
        md,
        "Capacities each point was loaded with:\n\n\
         | sweep | service ports | endpoints | --max-frontends | --max-services | \
         --max-backends | --maglev-slots | VIPS | --max-flows |\n\
         |---|---|---|---|---|---|---|---|---|"
    )?;
    for p in points {
        let c = &p.capacities;
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.sweep.as_str(),
            thousands(p.shape.services as u64),
            thousands(p.shape.endpoints as u64),
            thousands(c.frontends.into()),
            thousands(c.services.into()),
            thousands(c.backends.into()),
            thousands(c.maglev_slots.into()),
            thousands(c.vips.into()),
            thousands(c.flows.into())
        )?;
    }
    md.push('\n');
    Ok(())
}

/// One sweep's points in one family: the no-op and every case.
fn sweep_table(md: &mut String, title: &str, fam: Family, pts: &[&Point]) -> Result<()> {
    writeln!(md, "### {title}\n")?;
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
    for p in pts {
        let s = &p.shape;
        write!(
            md,
            "| {} | {} | {} | {} | {:.0} ms | {:.1} ({:.1}–{:.1}) | {:.1} |",
            thousands(s.services as u64),
            thousands(p.frontends as u64),
            thousands(s.endpoints as u64),
            thousands(p.maglev_table_size.into()),
            p.apply_ms,
            p.noop.p50,
            p.noop.p10,
            p.noop.p90,
            p.noop_repeat.p50,
        )?;
        for (c, _) in CASES {
            match p.case(c, fam) {
                Some(x) => write!(
                    md,
                    " {:.1} ({:.1}–{:.1}) ×{:.2}, net ×{:.1} |",
                    x.ns.p50, x.ns.p10, x.ns.p90, x.ratio.spread.p50, x.ratio_net.p50
                )?,
                None => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    md.push('\n');
    Ok(())
}

/// Established flows and new flows against their limits in multiples of the no-op.
fn per_packet_targets(md: &mut String, points: &[Point]) -> Result<()> {
    writeln!(
        md,
        "Each point's ratio to the no-op is taken per run; a per-packet target is decided \
         on the ~95% confidence interval of that ratio's median over the runs at every \
         point and family: *reached* when every interval lies at or under the limit, *not \
         reached* when some interval lies wholly above it, *not decided* when an interval \
         straddles it (and none is wholly above). The same holds for flatness below, \
         against its ±10% band.\n"
    )?;
    for (c, label, limit) in [
        (Case::Established, "established flow", 3.0),
        (Case::NewFlow, "new flow", 5.0),
    ] {
        per_packet_target(md, points, c, label, limit)?;
    }
    Ok(())
}

fn per_packet_target(
    md: &mut String,
    points: &[Point],
    c: Case,
    label: &str,
    limit: f64,
) -> Result<()> {
    // (median, CI, where) of every point and family.
    let mut all: Vec<(f64, (f64, f64), String)> = Vec::new();
    for p in points {
        for fam in FAMILIES {
            if let Some(x) = p.case(c, fam) {
                let s = &p.shape;
                all.push((
                    x.ratio.spread.p50,
                    x.ratio.interval(),
                    format!(
                        "{} service ports × {} endpoint{}, {}",
                        thousands(s.services as u64),
                        thousands(s.endpoints as u64),
                        if s.endpoints == 1 { "" } else { "s" },
                        fam.as_str()
                    ),
                ));
            }
        }
    }
    let Some(worst) = all.iter().max_by(|a, b| a.0.total_cmp(&b.0)) else {
        return Ok(());
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
        worst_net_ratio(points, c),
        all.len(),
        count(Verdict::Reached),
        count(Verdict::Noise),
        count(Verdict::NotReached),
        verdict.text()
    )?;
    Ok(())
}

/// The largest median ratio to the no-op net of timer overhead, over points and families.
fn worst_net_ratio(points: &[Point], c: Case) -> f64 {
    points
        .iter()
        .filter_map(|p| {
            FAMILIES
                .iter()
                .filter_map(|fam| p.case(c, *fam).map(|x| x.ratio_net.p50))
                .reduce(f64::max)
        })
        .fold(f64::NAN, f64::max)
}

/// Every case's ratio to the no-op across the services sweep, against the first point's.
fn flatness_targets(md: &mut String, svc: &[&Point]) -> Result<()> {
    let most = svc.iter().map(|p| p.shape.services).max().unwrap_or(0) as u64;
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
        for fam in FAMILIES {
            flatness_target(md, svc, most, (c, label), fam)?;
        }
    }
    Ok(())
}

fn flatness_target(
    md: &mut String,
    svc: &[&Point],
    most: u64,
    (c, label): (Case, &str),
    fam: Family,
) -> Result<()> {
    let target = 100_000;
    // Every point against the smallest one, within the same run (the points are measured
    // in turn in every run); judged on the spread over runs.
    let r: Vec<f64> = svc
        .iter()
        .filter_map(|p| p.case(c, fam).map(|x| x.ratio.spread.p50))
        .collect();
    let later: Vec<(u64, &CaseResult)> = svc
        .iter()
        .skip(1)
        .filter_map(|p| Some((p.shape.services as u64, p.case(c, fam)?)))
        .collect();
    if later.is_empty() {
        return Ok(());
    }
    let verdict = later
        .iter()
        .map(|(_, x)| {
            let (a, b) = flat_ci(x);
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
            thousands(most)
        )
    };
    let medians: Vec<String> = r.iter().map(|x| format!("×{x:.2}")).collect();
    let per_run: Vec<String> = later
        .iter()
        .map(|(svc, x)| {
            let (a, b) = flat_ci(x);
            format!(
                "{}: {}, 95% CI of the median {a:.3}–{b:.3}",
                thousands(*svc),
                ratio_spread(&x.vs_first_point),
            )
        })
        .collect();
    writeln!(
        md,
        "- flat within ±10% from 1 to {} service ports, {label} {}: {} \
         (× no-op); per run against 1 service port, median (p10–p90): {}: {}",
        thousands(target),
        fam.as_str(),
        medians.join(" → "),
        per_run.join("; "),
        verdict
    )?;
    Ok(())
}

/// The CI of a prog case's flatness ratio: `vs_first_point.ci_95`, or the separate
/// `vs_first_point_ci` of result files written before.
fn flat_ci(x: &CaseResult) -> (f64, f64) {
    match x.vs_first_point_ci {
        Some([a, b]) => (a, b),
        None => x.vs_first_point.interval(),
    }
}

/// The differences between cases of the first point (IPv4), and what a profile of the
/// new-flow path showed.
fn where_time_goes(md: &mut String, points: &[Point]) -> Result<()> {
    let Some(p) = points.first() else {
        return Ok(());
    };
    let median_ns = |c: Case| p.case(c, Family::Ipv4).map_or(f64::NAN, |x| x.ns.p50);
    let (noop, noop_rep) = (p.noop.p50, p.noop_repeat.p50);
    let (miss, new, est, reply) = (
        median_ns(Case::Miss),
        median_ns(Case::NewFlow),
        median_ns(Case::Established),
        median_ns(Case::Reply),
    );
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
fn services_plot(svc: &[&Point]) -> String {
    let xs: Vec<u64> = svc.iter().map(|p| p.frontends as u64).collect();
    let mut series = vec![(
        "no-op".to_string(),
        svc.iter().map(|p| p.noop.p50).collect(),
    )];
    for (c, _) in CASES {
        series.push((
            c.as_str().to_string(),
            svc.iter()
                .map(|p| p.case(c, Family::Ipv4).map_or(f64::NAN, |x| x.ns.p50))
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
