//! Measures the flow-table layouts of `proto/ebpf` through BPF_PROG_TEST_RUN, one
//! repetition per call with a fresh tuple per new flow (with repeat > 1 a program sees its
//! own packet again), at table fills of 1%, 50% and 100% of 262,144 flows, against the
//! no-op program in the same run. See docs/flow-table.md.
//!
//! Usage: flowproto-host [OBJECT] [--runs N] [--calls N] [--fills 1,50,100]

use anyhow::{bail, Context as _, Result};
use aya::maps::Array;
use aya::programs::Xdp;
use aya::{Ebpf, TestRun, TestRunOptions};

const FLOWS: u32 = 262_144;
const VIP: [u8; 4] = [198, 18, 0, 10];
const CLIENT_PORT: u16 = 40_000;
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// First source address of fill mode (10.0.0.1, incremented per flow).
const FILL_BASE: u32 = 0x0a00_0001;
const XDP_PASS: u32 = 2;

const PROGRAMS: [&str; 28] = [
    "noop",
    "base",
    "new_a",
    "est_a",
    "rep_a",
    "new_b",
    "est_b",
    "rep_b",
    "new_c",
    "new_d",
    "est_d",
    "rep_d",
    "new_e",
    "est_e",
    "rep_e",
    "new_f",
    "rep_f",
    "new_g",
    "est_g",
    "rep_g",
    "est_g_ktime",
    "est_g_coarse",
    "new_an",
    "new_h",
    "est_h",
    "rep_h",
    "cas_h",
    "est_g_jiffies",
];

fn backend(client: [u8; 4]) -> [u8; 4] {
    [198, 18, 2, 1 + (client[3] & 15)]
}

/// Ethernet + IPv4 + TCP (ACK), checksums left zero: the programs do not check them.
fn frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20 + 16];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12] = 0x08;
    f[14] = 0x45;
    let tot = (f.len() - 14) as u16;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&src);
    f[30..34].copy_from_slice(&dst);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[46] = 0x50;
    f[47] = 0x10;
    f
}

fn xdp_md(len: usize) -> Vec<u8> {
    [0u32, len as u32, 0, 1, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
}

/// One call; (verdict, kernel duration in ns per repetition).
fn call(p: &Xdp, f: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let ctx = xdp_md(f.len());
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(f),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

fn prog<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Xdp> {
    ebpf.program(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not XDP"))
}

fn set_ctl(ebpf: &mut Ebpf, v: u32) -> Result<()> {
    let mut a: Array<_, u32> = Array::try_from(ebpf.map_mut("CTL").context("CTL")?)?;
    a.set(0, v, 0)?;
    Ok(())
}

fn addr(c: u32) -> [u8; 4] {
    c.to_be_bytes()
}

/// A case: program, frames taken in turn, and whether every call gets its own frame.
struct Case {
    label: String,
    prog: &'static str,
    frames: Vec<Vec<u8>>,
    /// New-flow cases consume a frame per call across runs (never the same tuple twice).
    fresh: bool,
    /// Cold cases: every call takes a flow of the fill drawn at random (Some(reply?)), so
    /// no case warms the next one's entries.
    cold: Option<bool>,
    ns: Vec<f64>,
    ok: u64,
    total: u64,
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A client packet of the flow numbered `c` (source FILL_BASE + c's address).
fn est_frame(c: u32) -> Vec<u8> {
    frame(addr(c), VIP, CLIENT_PORT, VIP_PORT)
}

/// The backend's reply in the same flow.
fn rep_frame(c: u32) -> Vec<u8> {
    frame(backend(addr(c)), addr(c), BACKEND_PORT, CLIENT_PORT)
}

/// Loads the object (fresh, unpinned maps), fills BACKS and loads every program.
fn load(bytes: &[u8]) -> Result<Ebpf> {
    let mut ebpf = Ebpf::load(bytes).context("loading the object")?;
    {
        let mut b: Array<_, [u8; 16]> = Array::try_from(ebpf.map_mut("BACKS").context("BACKS")?)?;
        for i in 0..16u8 {
            let mut a = [0u8; 16];
            a[10] = 0xff;
            a[11] = 0xff;
            a[12..].copy_from_slice(&backend([0, 0, 0, i])[..]);
            b.set(i as u32, a, 0)?;
        }
    }
    for name in PROGRAMS.iter() {
        let p: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        p.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(ebpf)
}

/// Puts `fill` flows into every layout's tables; returns `fill`.
fn fill_tables(ebpf: &mut Ebpf, fill_pct: u32) -> Result<u32> {
    let fill = (FLOWS as u64 * fill_pct as u64 / 100) as u32;
    let template = frame([10, 0, 0, 1], VIP, CLIENT_PORT, VIP_PORT);
    let t = std::time::Instant::now();
    for layout in [
        "new_a", "new_an", "new_b", "new_c", "new_d", "new_e", "new_f", "new_g", "new_h",
    ] {
        set_ctl(ebpf, FILL_BASE)?;
        // One call, `fill` repetitions: each takes the next source address.
        let mut left = fill;
        let mut failed = false;
        while left > 0 {
            let n = left.min(100_000);
            let (v, _) = call(prog(ebpf, layout)?, &template, n)?;
            // The verdict is the last repetition's: D refuses when full.
            failed |= v != XDP_PASS;
            left -= n;
        }
        if failed {
            eprintln!("  fill {fill_pct}%: {layout}: last insert of the fill was refused");
        }
    }
    set_ctl(ebpf, 0)?;
    eprintln!(
        "fill {fill_pct}% ({fill} flows per layout) in {:?}",
        t.elapsed()
    );
    Ok(fill)
}

fn case(
    label: &str,
    prog: &'static str,
    frames: Vec<Vec<u8>>,
    fresh: bool,
    cold: Option<bool>,
) -> Case {
    Case {
        label: label.into(),
        prog,
        frames,
        fresh,
        cold,
        ns: vec![],
        ok: 0,
        total: 0,
    }
}

/// Every case measured at one fill level; the no-op first (its per-run means are the
/// denominators of the ratios).
fn cases(fill: u32, runs: usize, calls: usize, seq: &mut u32) -> Vec<Case> {
    let hot_c = FILL_BASE + fill - 1;
    let new_frames: Vec<Vec<u8>> = (0..(runs + 1) * calls)
        .map(|_| {
            *seq += 1;
            // 11.x.y.z, never used by the fill.
            frame(addr(0x0b00_0000 | *seq), VIP, CLIENT_PORT, VIP_PORT)
        })
        .collect();
    let mut out = vec![
        case("noop", "noop", vec![est_frame(hot_c)], false, None),
        case(
            "base (parse+key)",
            "base",
            vec![est_frame(hot_c)],
            false,
            None,
        ),
    ];
    for (l, p) in [
        ("new A: CT+RNAT LRU (today)", "new_a"),
        ("new A': A with BPF_F_NO_COMMON_LRU", "new_an"),
        ("new B: LRU entry + LRU index", "new_b"),
        ("new C: one LRU entry", "new_c"),
        ("new D: hash entry + hash index", "new_d"),
        ("new E: array slots + array index", "new_e"),
        ("new F: LRU entry + array index", "new_f"),
        ("new G: 4-way set by client, no index", "new_g"),
        ("new H: 15-way tagged set by client", "new_h"),
    ] {
        out.push(case(l, p, new_frames.clone(), true, None));
    }
    for (l, p, is_rep) in [
        ("est A/C/F: LRU lookup", "est_a", false),
        ("est B: LRU lookup", "est_b", false),
        ("est D: hash lookup", "est_d", false),
        ("est E: array probe", "est_e", false),
        ("rep A: RNAT lookup", "rep_a", true),
        ("rep B: LRU index + LRU entry", "rep_b", true),
        ("rep D: hash index + hash entry", "rep_d", true),
        ("rep E: array index + slot", "rep_e", true),
        ("rep F: array index + LRU entry", "rep_f", true),
        ("est G: 4-way set by client", "est_g", false),
        ("rep G: same set, reply match", "rep_g", true),
        ("est H: 15-way tagged set", "est_h", false),
        ("rep H: same set, reply match", "rep_h", true),
        ("cmpxchg of a tag word of H", "cas_h", false),
        (
            "est G + last_seen refresh (ktime_get_ns)",
            "est_g_ktime",
            false,
        ),
        (
            "est G + last_seen refresh (ktime_get_coarse_ns)",
            "est_g_coarse",
            false,
        ),
        (
            "est G + last_seen refresh (jiffies64)",
            "est_g_jiffies",
            false,
        ),
    ] {
        let hot = if is_rep {
            rep_frame(hot_c)
        } else {
            est_frame(hot_c)
        };
        out.push(case(&format!("{l}, hot"), p, vec![hot], false, None));
        out.push(case(&format!("{l}, cold"), p, vec![], false, Some(is_rep)));
    }
    out
}

/// Runs every case `runs` times (plus a discarded warm-up), `calls` calls each, in an
/// order rotated every run; returns the no-op's mean per kept run.
fn measure(
    ebpf: &Ebpf,
    cases: &mut [Case],
    fill: u32,
    runs: usize,
    calls: usize,
) -> Result<Vec<f64>> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ fill as u64);
    // Cold: flows of the newest three quarters of the fill (the oldest are the first an
    // LRU evicts while new-flow cases run).
    let lo = fill / 4;
    let n = cases.len();
    let mut noop_means = Vec::new();
    for r in 0..=runs {
        for k in 0..n {
            let c = &mut cases[(k + r) % n];
            let p = prog(ebpf, c.prog)?;
            let mut sum = 0.0;
            for j in 0..calls {
                let drawn;
                let f = if let Some(is_rep) = c.cold {
                    let n = FILL_BASE + lo + (rng.next() % (fill - lo) as u64) as u32;
                    drawn = if is_rep { rep_frame(n) } else { est_frame(n) };
                    &drawn
                } else if c.fresh {
                    &c.frames[r * calls + j]
                } else {
                    &c.frames[j % c.frames.len()]
                };
                let (v, ns) = call(p, f, 1)?;
                sum += ns;
                if r > 0 {
                    c.total += 1;
                    c.ok += (v == XDP_PASS) as u64;
                }
            }
            if r > 0 {
                c.ns.push(sum / calls as f64);
            }
        }
        if r > 0 {
            noop_means.push(*cases[0].ns.last().context("noop")?);
        }
    }
    Ok(noop_means)
}

fn report(fill_pct: u32, fill: u32, cases: &[Case], noop_means: &[f64]) {
    println!("\n### fill {fill_pct}% of {FLOWS} ({fill} flows per layout before the runs)\n");
    println!("| case | ns median (p10-p90) | × no-op median (p10-p90) | ok |");
    println!("|---|---|---|---|");
    for c in cases {
        let mut ns = c.ns.clone();
        let mut ratio: Vec<f64> = c.ns.iter().zip(noop_means).map(|(a, b)| a / b).collect();
        println!(
            "| {} | {:.0} ({:.0}-{:.0}) | ×{:.2} ({:.2}-{:.2}) | {:.1}% |",
            c.label,
            pct(&mut ns, 0.5),
            pct(&mut ns, 0.1),
            pct(&mut ns, 0.9),
            pct(&mut ratio, 0.5),
            pct(&mut ratio, 0.1),
            pct(&mut ratio, 0.9),
            100.0 * c.ok as f64 / c.total.max(1) as f64
        );
    }
}

fn one_fill(bytes: &[u8], fill_pct: u32, runs: usize, calls: usize, seq: &mut u32) -> Result<()> {
    let mut ebpf = load(bytes)?;
    let fill = fill_tables(&mut ebpf, fill_pct)?;
    let mut cases = cases(fill, runs, calls, seq);
    let noop_means = measure(&ebpf, &mut cases, fill, runs, calls)?;
    report(fill_pct, fill, &cases, &noop_means);
    Ok(())
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut object = "target/bpf/bpfel-unknown-none/release/flowproto".to_string();
    let (mut runs, mut calls) = (11usize, 1000usize);
    let mut fills = vec![1u32, 50, 100];
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            "--calls" => calls = args.next().context("--calls N")?.parse()?,
            "--fills" => {
                fills = args
                    .next()
                    .context("--fills 1,50,100")?
                    .split(',')
                    .map(|s| s.parse())
                    .collect::<Result<_, _>>()?
            }
            o if !o.starts_with('-') => object = o.to_string(),
            o => bail!("unknown argument {o}"),
        }
    }
    let bytes = std::fs::read(&object).with_context(|| format!("reading {object}"))?;
    println!("runs {runs} (+1 warm-up), {calls} calls per case per run, repeat = 1 per call");
    let mut seq = 0u32;
    for f in fills {
        one_fill(&bytes, f, runs, calls, &mut seq)?;
    }
    Ok(())
}
