//! `bench sync`: the control plane in-process against the real maps: how long `apply`
//! takes for one endpoint change (next to an apply with nothing to change, the diff's own
//! cost, measured in the same run), how long the first full sync of many service ports
//! takes, and how much memory the maps take.

use super::common::{desired, endpoint_v4, progress, service_id, Bench, Shape, Summary};
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use aya::maps::{Array, Map, MapData, MapInfo};
use lb_common::{ALL_MAPS, MAGLEV_SLOTS, MAP_MAGLEV, MAX_BACKENDS, MAX_FRONTENDS};
use lb_userspace::model::Endpoint;
use lb_userspace::reconciler::ReconcileError;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Serialize)]
struct FullSync {
    shape: Shape,
    /// Wall time of the first apply on empty maps.
    ms: f64,
    services_applied: usize,
    services_not_applied: usize,
    /// Why some were not applied: service ports per shortage kind, if any.
    shortage: Option<String>,
    /// Map writes of the apply: MAGLEV slots (written in BPF_MAP_UPDATE_BATCH chunks) and all
    /// other calls (one syscall each).
    slots_written: usize,
    other_writes: usize,
}

#[derive(Serialize)]
struct Churn {
    shape: Shape,
    changes: usize,
    /// One endpoint added to or removed from one service port, apply wall time (ms).
    change_ms: Summary,
    /// Apply of the unchanged state (the diff alone), same run (ms).
    unchanged_ms: Summary,
    /// Median MAGLEV slots written per change.
    slots_written_p50: f64,
    /// Mean ns of one BPF_MAP_UPDATE_ELEM on MAGLEV from user space, same run: the unit
    /// cost of every map write the reconciler makes.
    map_update_ns: f64,
}

#[derive(Serialize)]
struct MapMem {
    name: String,
    map_type: String,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    bytes_memlock: u64,
}

#[derive(Serialize)]
pub struct SyncResults {
    churn: Churn,
    full_syncs: Vec<FullSync>,
    maps: Vec<MapMem>,
    maps_total_bytes: u64,
    /// maps_total_bytes / 10,000 service ports (the maps are preallocated, so the total
    /// does not depend on how many are in use).
    bytes_per_service_at_10000: f64,
    limits: Vec<String>,
}

pub fn run(quick: bool) -> Result<SyncResults> {
    let table10 = lb_userspace::maglev::table_size(10);
    let table1 = lb_userspace::maglev::table_size(1);
    let max10 = (MAGLEV_SLOTS / table10) as usize;
    let max1 = (MAGLEV_SLOTS / table1) as usize;
    let shape = |services, endpoints| Shape {
        services,
        frontends_per_service: 1,
        endpoints,
    };

    // Churn on 1,000 service ports with 10 endpoints each (1,009-slot tables: 1,009,000
    // of 1,048,576 slots, the rest leaves room for the new table of a changed service).
    let changes = if quick { 50 } else { 200 };
    eprintln!("bench sync: endpoint churn, {changes} changes on 1,000 service ports x 10");
    let churn = churn(shape(1_000, 10), changes)?;
    eprintln!(
        "    change p50 {:.3} ms p99 {:.3} ms; unchanged apply p50 {:.3} ms; \
         one MAGLEV update {:.0} ns",
        churn.change_ms.p50, churn.change_ms.p99, churn.unchanged_ms.p50, churn.map_update_ns
    );

    // The probe service port is dual-stack (two tables), hence the - 1.
    let mut shapes = vec![shape(10_000, 1), shape(max10 - 1, 10)];
    if !quick {
        // The 10,000 x 10 does not fit MAGLEV; run it anyway so the report shows
        // how much of it the reconciler applies and what it refuses.
        shapes.push(shape(max1 - 1, 1));
        shapes.push(shape(10_000, 10));
    }
    let mut full_syncs = Vec::new();
    let mut maps = None;
    for s in shapes {
        eprintln!(
            "bench sync: full sync of {} service ports x {} endpoints",
            s.services, s.endpoints
        );
        let (fs, mem) = full_sync(s)?;
        eprintln!(
            "    {:.1} ms, {} applied, {} not applied",
            fs.ms, fs.services_applied, fs.services_not_applied
        );
        if maps.is_none() {
            maps = Some(mem);
        }
        full_syncs.push(fs);
    }
    let maps = maps.ok_or_else(|| anyhow!("no full sync ran"))?;
    let total: u64 = maps.iter().map(|m| m.bytes_memlock).sum();
    eprintln!(
        "    maps: {:.1} MiB in total (bytes_memlock)",
        total as f64 / (1 << 20) as f64
    );
    Ok(SyncResults {
        churn,
        full_syncs,
        bytes_per_service_at_10000: total as f64 / 10_000.0,
        maps_total_bytes: total,
        maps,
        limits: vec![
            format!(
                "MAGLEV_SLOTS = {MAGLEV_SLOTS}: 10 endpoints need a {table10}-slot table, so at \
                 most {max10} service ports with 10 endpoints fit ({max1} with 1 endpoint)"
            ),
            format!(
                "MAX_BACKENDS = {MAX_BACKENDS}: 10,000 x 10 distinct endpoints would need \
                 100,000 backend ids"
            ),
            format!("MAX_FRONTENDS = {MAX_FRONTENDS}: 100,000 service ports cannot fit"),
        ],
    })
}

fn full_sync(shape: Shape) -> Result<(FullSync, Vec<MapMem>)> {
    let mut b = Bench::load("sync")?;
    let (state, _) = desired(shape);
    let t = Instant::now();
    let r = b.rec.apply(&state);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let (not_applied, shortage, stats) = match r {
        Ok(st) => (0, None, st),
        Err(ReconcileError::ServicesNotApplied { failures, stats }) => {
            // Counted by kind ("MaglevSlots", "BackendIds", ...): the messages differ in
            // their numbers.
            let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
            for f in &failures {
                let dbg = format!("{:?}", f.shortage);
                let kind = dbg.split([' ', '{', '(']).next().unwrap_or("?");
                *kinds.entry(kind.to_string()).or_default() += 1;
            }
            let why = kinds
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            (failures.len(), Some(why), *stats)
        }
        Err(e) => return Err(e).context("full sync apply"),
    };
    let (applied, _) = b.rec.counts();
    ensure!(
        applied + not_applied == shape.services,
        "{applied} applied + {not_applied} refused != {} service ports",
        shape.services
    );
    let mem = map_memory(&b)?;
    Ok((
        FullSync {
            shape,
            ms,
            services_applied: applied,
            services_not_applied: not_applied,
            shortage,
            slots_written: stats.slots_written,
            // writes() counts a table once; its slots are counted above.
            other_writes: stats.writes() - stats.tables_written,
        },
        mem,
    ))
}

fn churn(shape: Shape, changes: usize) -> Result<Churn> {
    let mut b = Bench::load("churn")?;
    let (mut state, mut next_ep) = desired(shape);
    let map_update_ns = map_update_ns(&b)?;
    progress(format!("initial sync of {} service ports", shape.services));
    b.apply(&state)?;
    let mut change_ms = Vec::with_capacity(changes);
    let mut unchanged_ms = Vec::with_capacity(changes);
    let mut slots = Vec::with_capacity(changes);
    let t0 = Instant::now();
    for c in 0..changes {
        // Spread over the service ports (1..n: the probe is dual-stack). A port with its
        // original count loses one endpoint, a port with one less gains a new one, like a
        // pod being replaced. Growing past 10 instead would need a larger table (1,103
        // slots); with MAGLEV 96% full, the freed 1,009-slot holes cannot hold it and the
        // reconciler refuses the change after a few dozen (seen: change 34).
        let i = 1 + (c * 7_919) % (shape.services - 1);
        let id = service_id(i);
        let s = state
            .services
            .get_mut(&id)
            .ok_or_else(|| anyhow!("service {i} missing from the generated state"))?;
        if s.endpoints.len() == shape.endpoints {
            s.endpoints.pop();
        } else {
            let (addr, port) = endpoint_v4(next_ep);
            s.endpoints.push(Endpoint {
                addr,
                port,
                target: Some(format!("bench/pod-{next_ep}")),
            });
            s.endpoints.sort();
            next_ep += 1;
        }
        let t = Instant::now();
        let st = b
            .rec
            .apply(&state)
            .with_context(|| format!("apply of change {c}"))?;
        change_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if st.tables_written != 1 {
            bail!(
                "change {c} wrote {} Maglev tables, expected 1",
                st.tables_written
            );
        }
        slots.push(st.slots_written as f64);
        let t = Instant::now();
        let st = b
            .rec
            .apply(&state)
            .context("apply of the unchanged state")?;
        unchanged_ms.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(st.writes() == 0, "an unchanged state wrote {st}");
        if t0.elapsed().as_secs() >= 5 && (c + 1) % 50 == 0 {
            progress(format!("{}/{changes} changes", c + 1));
        }
    }
    Ok(Churn {
        shape,
        changes,
        change_ms: Summary::of(&change_ms)?,
        unchanged_ms: Summary::of(&unchanged_ms)?,
        slots_written_p50: Summary::of(&slots)?.p50,
        map_update_ns,
    })
}

/// Times 100,000 single-slot updates of MAGLEV through aya: the cost of one map-update
/// syscall, which every write except Maglev tables still pays (`LbMaps::put_maglev` writes
/// tables in BPF_MAP_UPDATE_BATCH chunks). Runs on empty maps and writes the 0 the slots
/// already hold, so the state the reconciler then adopts is unchanged.
fn map_update_ns(b: &Bench) -> Result<f64> {
    const N: u32 = 100_000;
    let path = b.pin_dir().join(MAP_MAGLEV);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map = Map::from_map_data(data).context("MAGLEV as an aya map")?;
    let mut arr: Array<MapData, u32> = Array::try_from(map).context("MAGLEV as an array")?;
    let t = Instant::now();
    for i in 0..N {
        arr.set(i, 0, 0).context("updating MAGLEV")?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e9 / f64::from(N))
}

/// Each map's shape (aya's MapInfo of the pinned map) and the kernel's own accounting of
/// its memory (`bytes_memlock` from bpftool, which reads /proc/<pid>/fdinfo).
fn map_memory(b: &Bench) -> Result<Vec<MapMem>> {
    let mut out = Vec::new();
    for name in ALL_MAPS {
        let pin = b.pin_dir().join(name);
        let info = MapInfo::from_pin(&pin).with_context(|| format!("MapInfo of {name}"))?;
        let o = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&pin)
            .output()
            .context("running bpftool map show")?;
        ensure!(
            o.status.success(),
            "bpftool map show pinned {}: {}",
            pin.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_slice(&o.stdout).context("parsing bpftool's JSON")?;
        let bytes = v
            .get("bytes_memlock")
            .and_then(|b| b.as_u64())
            .ok_or_else(|| anyhow!("bpftool gave no bytes_memlock for {name}"))?;
        out.push(MapMem {
            name: name.to_string(),
            map_type: info
                .map_type()
                .map(|t| format!("{t:?}"))
                .unwrap_or_else(|e| format!("unknown ({e})")),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            bytes_memlock: bytes,
        });
    }
    Ok(out)
}
