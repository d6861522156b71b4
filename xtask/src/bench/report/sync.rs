//! The `sync` section: the control plane's endpoint changes and full syncs, the maps'
//! memory at the default capacities and sized for the workload, where the time and memory
//! go, and the targets.

use super::{reached, section_head, thousands};
use crate::bench::results::sync::{SizedSync, SyncResults};
use crate::bench::results::ResultFile;
use anyhow::Result;
use std::fmt::Write as _;

pub fn section(md: &mut String, file: &str, run: &ResultFile<SyncResults>) -> Result<()> {
    section_head(md, "sync: the control plane", file, run)?;
    let r = &run.results;
    let nproc = (run.env.nproc as u64).max(1);
    writeln!(
        md,
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
    )?;
    churn(md, r)?;
    full_syncs(md, r)?;
    default_maps(md, r)?;
    sized_section(md, r)?;
    where_sync_time_goes(md, r, nproc)?;
    writeln!(md, "### Targets\n")?;
    let p99 = r.churn.change_ms.p99;
    writeln!(
        md,
        "- endpoint change p99 < 5 ms: {p99:.3} ms: {}",
        reached(p99 < 5.0)
    )?;
    full_sync_targets(md, r)?;
    memory_target(md, r, nproc)
}

/// One endpoint changed against nothing changed.
fn churn(md: &mut String, r: &SyncResults) -> Result<()> {
    let c = &r.churn;
    let cs = &c.shape;
    writeln!(
        md,
        "### Endpoint change ({} changes, {} service ports × {} endpoints)\n",
        c.changes,
        thousands(cs.services as u64),
        cs.endpoints
    )?;
    writeln!(
        md,
        "| apply | p50 | p90 | p99 | max |\n|---|---|---|---|---|"
    )?;
    for (x, label) in [
        (&c.change_ms, "one endpoint changed"),
        (&c.unchanged_ms, "nothing changed (baseline)"),
    ] {
        writeln!(
            md,
            "| {label} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms |",
            x.p50, x.p90, x.p99, x.max
        )?;
    }
    let upd = c.map_update_ns;
    writeln!(
        md,
        "\nChange p50 is ×{:.2} the unchanged apply. One BPF_MAP_UPDATE_ELEM from user \
         space (aya, same run): **{upd:.0} ns**; the reconciler's single writes pay it \
         (deletions, source ranges, a lone changed entry). A change writes a whole new \
         Maglev table, median {:.0} slots, {}. `apply` diffs only the service ports whose \
         desired state changed; the unchanged apply is what still touches every port once \
         (comparing each with its last applied state).\n",
        c.change_ms.p50 / c.unchanged_ms.p50,
        c.slots_written_p50,
        maglev_write_path(r)
    )?;
    Ok(())
}

/// First applies at the default capacities, and those capacities' limits.
fn full_syncs(md: &mut String, r: &SyncResults) -> Result<()> {
    writeln!(md, "### Full sync\n")?;
    writeln!(
        md,
        "| service ports | endpoints each | first apply (wall) | CPU user | CPU system | MAGLEV slots written | other map entries written | applied | not applied | why |\n|---|---|---|---|---|---|---|---|---|---|"
    )?;
    for x in &r.full_syncs {
        writeln!(
            md,
            "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} | {} | {} | {} |",
            thousands(x.shape.services as u64),
            x.shape.endpoints,
            x.ms,
            x.cpu_user_ms,
            x.cpu_sys_ms,
            thousands(x.slots_written as u64),
            thousands(x.other_writes as u64),
            thousands(x.services_applied as u64),
            thousands(x.services_not_applied as u64),
            x.shortage.as_deref().unwrap_or("")
        )?;
    }
    writeln!(
        md,
        "\nLimits of the default capacities (lb-common's; `lb-agent --max-*` changes them, \
         see the sized runs below):\n"
    )?;
    for l in &r.limits {
        writeln!(md, "- {l}")?;
    }
    Ok(())
}

fn default_maps(md: &mut String, r: &SyncResults) -> Result<()> {
    writeln!(md, "\n### Map memory at the default capacities\n")?;
    writeln!(
        md,
        "| map | type | key | value | max_entries | bytes_memlock |\n|---|---|---|---|---|---|"
    )?;
    for m in &r.maps {
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            m.name,
            m.map_type,
            m.key_size,
            m.value_size,
            thousands(m.max_entries.into()),
            thousands(m.bytes_memlock)
        )?;
    }
    let total = r.maps_total_bytes;
    writeln!(
        md,
        "| **total** | | | | | **{}** ({:.1} MiB) |\n",
        thousands(total),
        total as f64 / (1u64 << 20) as f64,
    )?;
    Ok(())
}

/// How this run wrote Maglev tables: through the mmap when MAGLEV is BPF_F_MMAPABLE (what
/// `LbMaps::put_maglev` does then), else with BPF_MAP_UPDATE_BATCH.
fn maglev_write_path(r: &SyncResults) -> &'static str {
    if maglev_mmapable(r) {
        "stored straight into MAGLEV's memory (the map is BPF_F_MMAPABLE and the agent maps it: no syscall per slot)"
    } else {
        "in BPF_MAP_UPDATE_BATCH calls (MAGLEV is not BPF_F_MMAPABLE in this run's object)"
    }
}

/// Whether this run's MAGLEV map was created with BPF_F_MMAPABLE.
fn maglev_mmapable(r: &SyncResults) -> bool {
    const BPF_F_MMAPABLE: u32 = 1 << 10;
    r.maps
        .iter()
        .find(|m| m.name == "MAGLEV")
        .is_some_and(|m| m.map_flags & BPF_F_MMAPABLE != 0)
}

/// Full syncs and memory on maps loaded with capacities sized for the state (what
/// `lb-agent --max-*` does).
fn sized_section(md: &mut String, r: &SyncResults) -> Result<()> {
    let sized = &r.sized_syncs;
    if sized.is_empty() {
        return Ok(());
    }
    writeln!(md, "### Capacities sized for the workload\n")?;
    writeln!(
        md,
        "The maps loaded with capacities computed from the state (its frontends, VIPs, \
         service ports, distinct backends and Maglev slots, plus 10% room for changes: \
         `lb-agent --max-frontends/--max-services/--max-backends/--maglev-slots`); flow \
         tables (CT, RNAT, AFFINITY, SOCK_RNAT) keep their defaults, their size being a \
         matter of traffic (`--max-flows`). The issue's targets are these runs.\n"
    )?;
    writeln!(
        md,
        "| service ports | endpoints each | family | backends (cap.) | MAGLEV slots (cap.) | first apply (wall) | CPU user | CPU system | other map entries written | applied | maps | without flow tables | per service port (without flow tables) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    for x in sized {
        let c = &x.capacities;
        let svc = x.service_maps_bytes;
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} | {:.1} MiB | {:.1} MiB | {} bytes |",
            thousands(x.sync.shape.services as u64),
            x.sync.shape.endpoints,
            x.family,
            thousands(c.backends.into()),
            thousands(c.maglev_slots.into()),
            x.sync.ms,
            x.sync.cpu_user_ms,
            x.sync.cpu_sys_ms,
            thousands(x.sync.other_writes as u64),
            thousands(x.sync.services_applied as u64),
            x.maps_total_bytes as f64 / (1u64 << 20) as f64,
            svc as f64 / (1u64 << 20) as f64,
            thousands(svc / (x.sync.shape.services as u64).max(1)),
        )?;
    }
    writeln!(md, "\nMap memory with capacities sized for 10,000 × 10:\n")?;
    writeln!(
        md,
        "| map | max_entries | bytes_memlock | bytes per entry |\n|---|---|---|---|"
    )?;
    for m in &r.sized_maps {
        writeln!(
            md,
            "| {} | {} | {} | {:.0} |",
            m.name,
            thousands(m.max_entries.into()),
            thousands(m.bytes_memlock),
            m.bytes_memlock as f64 / u64::from(m.max_entries).max(1) as f64
        )?;
    }
    md.push('\n');
    Ok(())
}

/// Explains the control plane's figures with this run's numbers (and a profile).
fn where_sync_time_goes(md: &mut String, r: &SyncResults, nproc: u64) -> Result<()> {
    let c = &r.churn;
    let eps = (c.shape.services as u64 * c.shape.endpoints as u64) as f64;
    let unchanged = c.unchanged_ms.p50;
    let by_name = |name: &str| r.sized_map_bytes(name);
    let percpu = (by_name("SVC_STATS") + by_name("BE_STATS")) as f64;
    let meta = (by_name("SVC_META") + by_name("BE_META")) as f64;
    let maglev = by_name("MAGLEV") as f64;
    let mib = |b: f64| b / (1u64 << 20) as f64;
    writeln!(md, "### Where the time and memory go\n")?;
    writeln!(
        md,
        "- **Endpoint change.** `apply` keeps each service port as last applied and diffs \
         only the ports whose desired state changed (before that change, a profile put 83% \
         of apply in re-diffing the whole state: 7–13 ms p99 at 1,000 × 10). The unchanged \
         apply, {unchanged:.2} ms for {} endpoints ({:.2} µs per endpoint), is the \
         comparison of every port with its last applied state; a change adds its new \
         table ({:.0} slots) and a handful of single-entry writes. Going further needs the \
         source to report which ports changed.",
        thousands(eps as u64),
        unchanged * 1e3 / eps,
        c.slots_written_p50
    )?;
    let mmapable = maglev_mmapable(r);
    writeln!(
        md,
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
    )?;
    writeln!(
        md,
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
    )?;
    Ok(())
}

/// The sized full syncs of the workloads against their time limits.
fn full_sync_targets(md: &mut String, r: &SyncResults) -> Result<()> {
    for (svcs, eps, limit_ms) in [
        (10_000, 10, 1_000.0),
        (100_000, 10, 10_000.0),
        (100_000, 1, 10_000.0),
    ] {
        match find_sized(r, svcs, eps) {
            Some(x) => {
                let ms = x.sync.ms;
                writeln!(
                    md,
                    "- full sync of {} × {eps} < {:.0} s (capacities sized for it, {}): \
                     {ms:.0} ms wall, {:.0} ms CPU: {}",
                    thousands(svcs),
                    limit_ms / 1e3,
                    x.family,
                    x.sync.cpu_user_ms + x.sync.cpu_sys_ms,
                    reached(ms < limit_ms)
                )?;
            }
            None => {
                writeln!(
                    md,
                    "- full sync of {} × {eps} < {:.0} s: not measured in this run (full run only)",
                    thousands(svcs),
                    limit_ms / 1e3
                )?;
            }
        }
    }
    Ok(())
}

fn find_sized(r: &SyncResults, services: u64, endpoints: u64) -> Option<&SizedSync> {
    r.sized_syncs.iter().find(|x| {
        x.sync.shape.services as u64 == services && x.sync.shape.endpoints as u64 == endpoints
    })
}

/// The maps for 10,000 × 10 against 64 MiB, on this machine and on a 64-CPU node, with and
/// without the flow tables.
fn memory_target(md: &mut String, r: &SyncResults, nproc: u64) -> Result<()> {
    let Some(x) = find_sized(r, 10_000, 10) else {
        writeln!(
            md,
            "- maps for 10,000 × 10 < 64 MiB: not measured in this run\n"
        )?;
        return Ok(());
    };
    let svc = x.service_maps_bytes;
    let total = x.maps_total_bytes;
    let flows = u64::from(x.capacities.flows);
    let per_flow = x.bytes_per_flow;
    let other = x.other_flow_maps_bytes as f64;
    let small = 65_536.0;
    let percpu: u64 = r
        .sized_maps
        .iter()
        .filter(|m| m.name == "SVC_STATS" || m.name == "BE_STATS")
        .map(|m| m.bytes_memlock)
        .sum();
    writeln!(
        md,
        "- maps for 10,000 × 10 < 64 MiB (the maps that grow with services, capacities \
                 sized for it): {:.1} MiB on this {nproc}-CPU machine: {}; the per-CPU counters \
                 in it ({:.1} MiB) grow with CPUs: these maps would take {:.0} MiB on a 64-CPU \
                 node. With the flow \
                 tables, which `--max-flows` sizes \
                 for traffic ({per_flow:.0} bytes per flow for CT + RNAT, plus {:.1} MiB of \
                 AFFINITY and SOCK_RNAT): {:.1} MiB at the default {} flows, {:.1} MiB at \
                 `--max-flows {}`.\n",
        svc as f64 / (1u64 << 20) as f64,
        reached(svc < 64 << 20),
        percpu as f64 / (1u64 << 20) as f64,
        (svc - percpu) as f64 / (1u64 << 20) as f64
            + percpu as f64 / (1u64 << 20) as f64 * 64.0 / nproc as f64,
        other / (1u64 << 20) as f64,
        total as f64 / (1u64 << 20) as f64,
        thousands(flows),
        (svc as f64 + other + per_flow * small) / (1u64 << 20) as f64,
        thousands(small as u64),
    )?;
    Ok(())
}
