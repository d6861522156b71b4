//! `bench sync`: the control plane in-process against the real maps: how long `apply`
//! takes for one endpoint change (next to an apply with nothing to change, the diff's own
//! cost, measured in the same run), how long the first full sync of many service ports
//! takes, and how much memory the maps take.

use super::common::{
    capacities_for, desired, endpoint_v4, endpoint_v6, progress, service_id, vip_v6, Bench,
    VIP_PORT,
};
use super::results::sync::{Churn, FullSync, MapMem, SizedSync, SyncResults};
use super::results::{CapacitiesOut, Shape, Summary};
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use aya::maps::{Array, Map, MapData, MapInfo};
use lb_common::{
    ALL_MAPS, MAGLEV_SLOTS, MAP_AFFINITY, MAP_CT, MAP_MAGLEV, MAP_RNAT, MAP_SOCK_RNAT,
    MAX_BACKENDS, MAX_FRONTENDS, MAX_SERVICES, MAX_VIPS,
};
use lb_userspace::loader::{self, Capacities, Loaded};
use lb_userspace::maps::LbMaps;
use lb_userspace::model::{
    DesiredState, Endpoint, Frontend, FrontendKind, Protocol, ServicePortState,
};
use lb_userspace::reconciler::{ReconcileError, Reconciler};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub fn run(quick: bool) -> Result<SyncResults> {
    let limits = DefaultLimits::new();
    let churn = run_churn(quick)?;
    let (full_syncs, maps) = run_full_syncs(quick, &limits)?;
    let total: u64 = maps.iter().map(|m| m.bytes_memlock).sum();
    eprintln!(
        "    maps: {:.1} MiB in total (bytes_memlock)",
        total as f64 / (1 << 20) as f64
    );
    let (sized_syncs, sized_maps) = run_sized_syncs(quick)?;
    Ok(SyncResults {
        churn,
        full_syncs,
        sized_syncs,
        sized_maps,
        bytes_per_service_at_10000: total as f64 / 10_000.0,
        maps_total_bytes: total,
        maps,
        limits: limits.describe(),
    })
}

/// A shape with one frontend per service port.
fn shape(services: usize, endpoints: usize) -> Shape {
    Shape {
        services,
        frontends_per_service: 1,
        endpoints,
    }
}

/// How many service ports the default capacities hold.
struct DefaultLimits {
    /// Slots of a table for 10 endpoints, and for one.
    table10: u32,
    table1: u32,
    /// Service ports with 10 endpoints that fit MAGLEV.
    max10: usize,
    /// Service ports with one endpoint that fit every capacity.
    max1: usize,
}

impl DefaultLimits {
    fn new() -> Self {
        let table10 = lb_userspace::maglev::table_size(10);
        let table1 = lb_userspace::maglev::table_size(1);
        let max10 = (MAGLEV_SLOTS / table10) as usize;
        // One-endpoint ports take a 1-slot table: the id capacities run out first (the
        // probe port adds a frontend, a VIP and a backend, hence the margin).
        let max1 = (MAGLEV_SLOTS / table1)
            .min(MAX_SERVICES)
            .min(MAX_FRONTENDS)
            .min(MAX_VIPS)
            .min(MAX_BACKENDS) as usize
            - 2;
        Self {
            table10,
            table1,
            max10,
            max1,
        }
    }

    /// The limits as the results list them.
    fn describe(&self) -> Vec<String> {
        let Self {
            table10,
            table1,
            max10,
            max1,
        } = self;
        vec![
            format!(
                "MAGLEV_SLOTS = {MAGLEV_SLOTS}: 10 endpoints need a {table10}-slot table, so at \
                 most {max10} service ports with 10 endpoints fit; one endpoint takes \
                 {table1} slot(s), so MAX_SERVICES/MAX_FRONTENDS/MAX_VIPS/MAX_BACKENDS \
                 bound 1-endpoint ports ({max1} measured)"
            ),
            format!(
                "MAX_BACKENDS = {MAX_BACKENDS}: 10,000 x 10 distinct endpoints would need \
                 100,000 backend ids"
            ),
            format!(
                "MAX_FRONTENDS = {MAX_FRONTENDS}: 100,000 service ports cannot fit \
                 (lb-agent --max-frontends/--max-services/--max-backends/--maglev-slots \
                 raise these at load time)"
            ),
        ]
    }
}

/// Churn on 1,000 service ports with 10 endpoints each (211-slot tables: 211,000 of
/// 1,048,576 slots, the rest leaves room for the new table of a changed service).
fn run_churn(quick: bool) -> Result<Churn> {
    let changes = if quick { 50 } else { 200 };
    eprintln!("bench sync: endpoint churn, {changes} changes on 1,000 service ports x 10");
    let churn = churn(shape(1_000, 10), changes)?;
    eprintln!(
        "    change p50 {:.3} ms p99 {:.3} ms; unchanged apply p50 {:.3} ms; \
         one MAGLEV update {:.0} ns",
        churn.change_ms.p50, churn.change_ms.p99, churn.unchanged_ms.p50, churn.map_update_ns
    );
    Ok(churn)
}

/// Full syncs at the default capacities, with the maps' memory of the first.
fn run_full_syncs(quick: bool, limits: &DefaultLimits) -> Result<(Vec<FullSync>, Vec<MapMem>)> {
    // The probe service port is dual-stack (two tables), hence the - 1.
    let mut shapes = vec![shape(10_000, 1), shape(limits.max10 - 1, 10)];
    if !quick {
        // 10,000 x 10 does not fit the default MAGLEV; run it anyway so the report shows
        // how much of it the reconciler applies and what it refuses (sized below).
        shapes.push(shape(limits.max1, 1));
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
    Ok((full_syncs, maps))
}

/// The workloads on maps sized for them, with the maps' memory of the first.
fn run_sized_syncs(quick: bool) -> Result<(Vec<SizedSync>, Vec<MapMem>)> {
    // 10,000 x 10 also runs in --quick (about 2 s): it is the one the memory figure is for.
    let mut sized = vec![(shape(10_000, 10), "IPv4")];
    if !quick {
        sized.push((shape(100_000, 1), "IPv6"));
        // The larger target: 1,000,000 backends, 21.1 M MAGLEV slots (about
        // 0.6 GiB of maps).
        sized.push((shape(100_000, 10), "IPv6"));
    }
    let mut sized_syncs = Vec::new();
    let mut sized_maps = None;
    for (s, family) in sized {
        let (sync, mem) = sized_sync(s, family)?;
        if sized_maps.is_none() {
            sized_maps = Some(mem);
        }
        sized_syncs.push(sync);
    }
    let sized_maps = sized_maps.ok_or_else(|| anyhow!("no sized full sync ran"))?;
    Ok((sized_syncs, sized_maps))
}

/// One full sync on maps sized for its state, and where their memory goes.
fn sized_sync(s: Shape, family: &str) -> Result<(SizedSync, Vec<MapMem>)> {
    let state = if family == "IPv6" {
        desired_v6(s.services, s.endpoints)
    } else {
        desired(s).0
    };
    let caps = capacities_for(&state);
    eprintln!(
        "bench sync: full sync of {} service ports x {} endpoints ({family}) with \
         capacities sized for it: {caps:?}",
        s.services, s.endpoints
    );
    let (fs, mem) = full_sync_sized(s, &state, &caps)?;
    drop(state);
    let total: u64 = mem.iter().map(|m| m.bytes_memlock).sum();
    let bytes_of = |names: &[&str]| -> u64 {
        mem.iter()
            .filter(|m| names.contains(&m.name.as_str()))
            .map(|m| m.bytes_memlock)
            .sum()
    };
    let service_maps: u64 = mem
        .iter()
        .filter(|m| !FLOW_MAPS.contains(&m.name.as_str()))
        .map(|m| m.bytes_memlock)
        .sum();
    let per_flow = bytes_of(&[MAP_CT, MAP_RNAT]) as f64 / f64::from(caps.flows);
    let other_flow_maps = bytes_of(&[MAP_AFFINITY, MAP_SOCK_RNAT]);
    eprintln!(
        "    {:.1} ms (CPU: {:.1} ms user, {:.1} ms system), {} applied, {} not applied; \
         maps {:.1} MiB ({:.1} MiB without the flow tables, {:.0} bytes per service \
         port; flow tables {per_flow:.0} bytes per flow)",
        fs.ms,
        fs.cpu_user_ms,
        fs.cpu_sys_ms,
        fs.services_applied,
        fs.services_not_applied,
        total as f64 / (1 << 20) as f64,
        service_maps as f64 / (1 << 20) as f64,
        service_maps as f64 / s.services as f64
    );
    ensure!(
        fs.services_not_applied == 0,
        "sized capacities refused service ports: {:?}",
        fs.shortage
    );
    let sync = SizedSync {
        sync: fs,
        family: family.to_string(),
        capacities: CapacitiesOut::from(&caps),
        maps_total_bytes: total,
        service_maps_bytes: service_maps,
        bytes_per_service: service_maps as f64 / s.services as f64,
        bytes_per_flow: per_flow,
        other_flow_maps_bytes: other_flow_maps,
    };
    Ok((sync, mem))
}

/// Maps whose size depends on traffic, not on services: kept at their defaults when the
/// capacities are sized for a state.
const FLOW_MAPS: [&str; 4] = [MAP_CT, MAP_RNAT, MAP_AFFINITY, MAP_SOCK_RNAT];

/// `services` IPv6 service ports, one ClusterIP each (2001:db8:f::/48) and `endpoints`
/// distinct IPv6 endpoints each (2001:db8:e::/48): the address plan's IPv4 VIP range holds
/// 65,536.
fn desired_v6(services: usize, endpoints: usize) -> DesiredState {
    let mut st = DesiredState::default();
    let mut k = 0u32;
    for i in 0..services {
        let mut s = ServicePortState::default();
        s.frontends.push(Frontend {
            addr: vip_v6(i as u32),
            port: VIP_PORT,
            protocol: Protocol::Tcp,
            kind: FrontendKind::ClusterIp,
        });
        for _ in 0..endpoints {
            let (addr, port) = endpoint_v6(k);
            s.endpoints.push(Endpoint {
                addr,
                port,
                target: Some(format!("bench/pod-{k}")),
            });
            k += 1;
        }
        st.services.insert(service_id(i), s);
    }
    st
}

/// Removes the pin directory when dropped, also on failure.
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: removing {}: {e}", self.0.display());
            }
        }
    }
}

/// [`full_sync`] of `state` on maps loaded with `caps`, as `lb-agent --max-*` loads them.
fn full_sync_sized(
    shape: Shape,
    state: &DesiredState,
    caps: &Capacities,
) -> Result<(FullSync, Vec<MapMem>)> {
    let pin = PinGuard(PathBuf::from(format!(
        "{}/xdplb-bench-{}-sized-{}",
        loader::BPFFS,
        std::process::id(),
        shape.services
    )));
    let Loaded { ebpf, maps, .. } = loader::load_with(lb_userspace::EBPF_OBJ, &pin.0, false, caps)
        .with_context(|| format!("loading with {caps:?}"))?;
    let mut rec =
        Reconciler::adopt_with_limits(maps, caps.limits()).context("adopting the fresh maps")?;
    let r = apply_full(&mut rec, shape, state)?;
    let mem = map_memory(&pin.0)?;
    drop(rec);
    drop(ebpf);
    Ok((r, mem))
}

fn full_sync(shape: Shape) -> Result<(FullSync, Vec<MapMem>)> {
    let mut b = Bench::load("sync")?;
    let (state, _) = desired(shape);
    let r = apply_full(&mut b.rec, shape, &state)?;
    let mem = map_memory(b.pin_dir())?;
    Ok((r, mem))
}

/// The first apply of `state` on empty maps, timed, with what it could not apply.
fn apply_full(
    rec: &mut Reconciler<LbMaps>,
    shape: Shape,
    state: &DesiredState,
) -> Result<FullSync> {
    let cpu0 = thread_cpu()?;
    let t = Instant::now();
    let r = rec.apply(state);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let cpu1 = thread_cpu()?;
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
    let (applied, _) = rec.counts();
    ensure!(
        applied + not_applied == shape.services,
        "{applied} applied + {not_applied} refused != {} service ports",
        shape.services
    );
    Ok(FullSync {
        shape,
        ms,
        cpu_user_ms: cpu1.0 - cpu0.0,
        cpu_sys_ms: cpu1.1 - cpu0.1,
        services_applied: applied,
        services_not_applied: not_applied,
        shortage,
        slots_written: stats.slots_written,
        // writes() counts a table once; its slots are counted above.
        other_writes: stats.writes() - stats.tables_written,
    })
}

/// (user, system) CPU time of the calling thread so far, in ms.
fn thread_cpu() -> Result<(f64, f64)> {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a valid pointer.
    let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ensure!(
        r == 0,
        "getrusage(RUSAGE_THREAD): {}",
        std::io::Error::last_os_error()
    );
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    Ok((ms(ru.ru_utime), ms(ru.ru_stime)))
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
        // pod being replaced: 9 and 10 endpoints share the 211-slot rung, so the new
        // table has the old one's size (growing to 11 would move to the 431-slot rung).
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
/// syscall, which the reconciler's single writes pay (deletions, source ranges, a lone
/// changed entry; bulk writes go in batches and Maglev tables through the mmap). Runs on empty maps and writes the 0 the slots
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
fn map_memory(pin_dir: &Path) -> Result<Vec<MapMem>> {
    let mut out = Vec::new();
    for name in ALL_MAPS {
        let pin = pin_dir.join(name);
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
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| anyhow!("bpftool gave no bytes_memlock for {name}"))?;
        out.push(MapMem {
            name: name.to_string(),
            map_type: info
                .map_type()
                .map_or_else(|e| format!("unknown ({e})"), |t| format!("{t:?}")),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            map_flags: info.map_flags(),
            bytes_memlock: bytes,
        });
    }
    Ok(out)
}
