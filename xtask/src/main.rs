//! `cargo xtask setup|build|test|demo`: installs what xdplb needs, builds it, runs every
//! test, and shows the load balancer working in network namespaces.
//!
//! xtask must build on a machine that has nothing but the Rust toolchains, so it cannot
//! depend on the tests crate (which embeds the BPF object and so needs bpf-linker, which
//! `setup` installs). The demo shares the tests' topology and harness code by including
//! their files by path instead.

// The harness files carry helpers only the tests use.
#[allow(dead_code)]
#[path = "../../tests/src/e2e.rs"]
mod e2e;
#[allow(dead_code)]
#[path = "../../tests/src/netns.rs"]
mod netns;

mod bench;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

/// Debian packages the tests and the demo run: `ip`/`ss` (iproute2), `ethtool` (GRO on
/// the client's veth), servers and clients in the namespaces (nginx, curl, socat),
/// captures of what reaches pods (tcpdump), nsenter/unshare/mountpoint (util-linux),
/// map memory for the benchmarks (bpftool), kube-proxy's data paths for the benchmarks'
/// baselines (iptables, nftables; rules are only ever loaded inside test namespaces).
const DEB_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "nginx-light",
    "curl",
    "socat",
    "tcpdump",
    "util-linux",
    // `bench sync` reads the maps' memory from `bpftool map show`.
    "bpftool",
    // `bench forward` and `bench tcp` compare with kube-proxy's iptables and nftables modes.
    "iptables",
    "nftables",
];

/// bpf-linker release line known to build against the nightly toolchain's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
#[command(about = "xdplb developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: rust-src, bpf-linker, Debian packages; mount bpffs and
    /// tracefs. Idempotent.
    Setup,
    /// Toolchain setup, then build every binary (BPF object included).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Setup, build, then run all tests (end-to-end tests need root).
    Test,
    /// Setup, build, then balance HTTP across three pods in namespaces and show lbctl.
    Demo {
        /// Number of requests the client sends.
        #[arg(long, default_value_t = 30)]
        requests: usize,
    },
    /// Setup, then benchmark the XDP program (`prog`), forwarding to pods (`forward`), TCP
    /// through a VIP (`tcp`) and the control plane (`sync`), against kube-proxy's paths
    /// and no-op baselines: bench/results/<timestamp>-<suite>.json and docs/benchmarks.md.
    /// `bench report` measures nothing: it regenerates docs/benchmarks.md and the plots in
    /// bench/results/ from the newest result of each suite there (full runs before `--quick`
    /// ones).
    Bench {
        #[arg(value_enum, default_value = "all")]
        suite: bench::Suite,
        /// Fewer runs and points: under three minutes for all suites.
        #[arg(long)]
        quick: bool,
    },
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    // Building, and regenerating the benchmark page from files, touch nothing of root's.
    let needs_root = !matches!(
        cli.cmd,
        Cmd::Build { .. }
            | Cmd::Bench {
                suite: bench::Suite::Report,
                ..
            }
    );
    if needs_root {
        require_root()?;
    }
    match cli.cmd {
        Cmd::Setup => {
            setup_toolchain()?;
            setup_system()
        }
        Cmd::Build { release } => {
            setup_toolchain()?;
            build(&root, release, false)
        }
        Cmd::Test => {
            setup_toolchain()?;
            setup_system()?;
            test(&root)
        }
        Cmd::Demo { requests } => {
            setup_toolchain()?;
            setup_system()?;
            build(&root, false, false)?;
            demo(&root, requests)
        }
        Cmd::Bench { suite, quick } => {
            // With the feature, this is the re-run that bench::run started after setup; the
            // report only reads and writes files.
            if !cfg!(feature = "lb-userspace") && suite != bench::Suite::Report {
                setup_toolchain()?;
                setup_system()?;
            }
            bench::run(&root, suite, quick, run_visible)
        }
    }
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// Where cargo installs binaries: $CARGO_HOME, else ~/.cargo.
fn cargo_home() -> Result<PathBuf> {
    match std::env::var_os("CARGO_HOME") {
        Some(h) => Ok(PathBuf::from(h)),
        None => Ok(home()?.join(".cargo")),
    }
}

/// PATH with ~/.cargo/bin first, so a freshly installed bpf-linker is found by cargo.
fn path_with_cargo_bin() -> Result<OsString> {
    let bin = cargo_home()?.join("bin");
    let mut parts = vec![bin];
    if let Some(p) = std::env::var_os("PATH") {
        parts.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(parts).context("building PATH")
}

/// Runs a command with inherited output; fails unless it exits 0.
fn run_visible(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let status = cmd
        .env("PATH", path_with_cargo_bin()?)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout if it exited 0, `None` otherwise (also when it
/// cannot be started).
fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .env("PATH", path_with_cargo_bin().ok()?)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

// ---------------------------------------------------------------------------------------
// setup
// ---------------------------------------------------------------------------------------

fn setup_toolchain() -> Result<()> {
    step("checking the nightly toolchain");
    let version = probe(Command::new("rustc").args(["+nightly", "--version"])).context(
        "the nightly toolchain is missing (`rustup toolchain install nightly`); it builds \
         the XDP programs",
    )?;
    eprintln!("    {}", version.trim());

    let installed = probe(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("rustup component list failed")?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        step("rust-src (nightly): installed");
    } else {
        step("rust-src (nightly): installing");
        run_visible(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    setup_bpf_linker()
}

/// The nightly toolchain's libLLVM: (file, LLVM major version).
fn nightly_libllvm() -> Result<(PathBuf, u32)> {
    let sysroot = probe(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot failed")?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let mut found = None;
    for entry in std::fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))? {
        let name = entry
            .with_context(|| format!("listing {}", lib.display()))?
            .file_name();
        let name = name.to_string_lossy();
        // The soname form, e.g. libLLVM.so.22.1-rust-1.97.0-nightly.
        if let Some(rest) = name.strip_prefix("libLLVM.so.") {
            if name.contains("-rust-") {
                let major: u32 = rest
                    .split(['.', '-'])
                    .next()
                    .and_then(|m| m.parse().ok())
                    .with_context(|| format!("no LLVM version in {name}"))?;
                found = Some((lib.join(name.as_ref()), major));
            }
        }
    }
    found.with_context(|| {
        format!(
            "no libLLVM.so.*-rust-* in {} (is the nightly toolchain complete?)",
            lib.display()
        )
    })
}

/// Whether the bpf-linker on PATH runs and loads exactly `libllvm`.
fn bpf_linker_ok(libllvm: &Path) -> Result<bool> {
    let Some(version) = probe(Command::new("bpf-linker").arg("--version")) else {
        return Ok(false);
    };
    let Some(path) = probe(Command::new("sh").args(["-c", "command -v bpf-linker"])) else {
        return Ok(false);
    };
    let Some(ldd) = probe(Command::new("ldd").arg(path.trim())) else {
        return Ok(false);
    };
    let want = std::fs::canonicalize(libllvm)
        .with_context(|| format!("resolving {}", libllvm.display()))?;
    for line in ldd.lines() {
        // "libLLVM.so.22.1-rust-... => /path/to/lib (0x...)" or "... => not found"
        let Some((name, rest)) = line.trim().split_once(" => ") else {
            continue;
        };
        if !name.starts_with("libLLVM") {
            continue;
        }
        let resolved = rest.split(" (").next().unwrap_or("").trim();
        let ok = std::fs::canonicalize(resolved).is_ok_and(|r| r == want);
        if ok {
            eprintln!("    {} linked against {}", version.trim(), want.display());
        } else {
            eprintln!(
                "    bpf-linker loads {name} from {resolved:?}, not the nightly's {}",
                want.display()
            );
        }
        return Ok(ok);
    }
    eprintln!("    bpf-linker does not load a libLLVM (built elsewhere?)");
    Ok(false)
}

fn setup_bpf_linker() -> Result<()> {
    let (libllvm, major) = nightly_libllvm()?;
    step(&format!(
        "bpf-linker against {} (LLVM {major})",
        libllvm.display()
    ));
    if bpf_linker_ok(&libllvm)? {
        step("bpf-linker: installed");
        return Ok(());
    }
    // The nightly toolchain's own libLLVM, exposed in a prefix under both names the
    // build needs: libLLVM.so for the link step, the soname for the runtime lookup.
    let prefix = home()?.join(".local/share/xdplb/llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let soname = libllvm.file_name().context("libLLVM has no file name")?;
    for link in [prefix_lib.join(soname), prefix_lib.join("libLLVM.so")] {
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let cargo_root = cargo_home()?;
    let feature = format!("llvm-{major}");
    step(&format!(
        "bpf-linker: cargo install bpf-linker@{BPF_LINKER_VERSION} --features {feature} \
         (LLVM_PREFIX={})",
        prefix.display()
    ));
    let install = |locked: bool| {
        let mut c = Command::new("cargo");
        c.args(["install", "--force"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features", &feature, "--root"])
            .arg(&cargo_root)
            .env("LLVM_PREFIX", &prefix);
        if locked {
            c.arg("--locked");
        }
        run_visible(&mut c)
    };
    if let Err(e) = install(true) {
        eprintln!("    --locked install failed ({e:#}); retrying with fresh dependencies");
        install(false)?;
    }
    if !bpf_linker_ok(&libllvm)? {
        bail!(
            "bpf-linker was installed into {} but does not run against {}",
            cargo_root.display(),
            libllvm.display()
        );
    }
    Ok(())
}

/// setup, test and demo need root; checked first so that the error says so plainly.
fn require_root() -> Result<()> {
    if !is_root() {
        bail!(
            "this needs root: setup installs Debian packages and mounts bpffs and tracefs; \
             the tests and the demo create network namespaces and load XDP programs \
             (run it as root, or with `sudo -E cargo xtask ...`)"
        );
    }
    Ok(())
}

fn setup_system() -> Result<()> {
    require_root()?;
    let mut missing = Vec::new();
    for pkg in DEB_PACKAGES {
        let status = probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]));
        if status.as_deref() == Some("install ok installed") {
            step(&format!("package {pkg}: installed"));
        } else {
            missing.push(*pkg);
        }
    }
    if !missing.is_empty() {
        step(&format!("installing {}", missing.join(" ")));
        run_visible(Command::new("apt-get").args(["update"]))?;
        // Package scripts must not start services (nginx would listen in the root
        // namespace); policy-rc.d exit 101 is Debian's way to say so.
        let policy = Path::new("/usr/sbin/policy-rc.d");
        let own_policy = !policy.exists();
        if own_policy {
            std::fs::write(policy, "#!/bin/sh\nexit 101\n").context("writing policy-rc.d")?;
            std::fs::set_permissions(
                policy,
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
            )
            .context("chmod policy-rc.d")?;
        }
        let result = run_visible(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        );
        if own_policy {
            std::fs::remove_file(policy).context("removing policy-rc.d")?;
        }
        result?;
    }
    mount_if_missing("bpf", "/sys/fs/bpf")?;
    mount_if_missing("tracefs", "/sys/kernel/tracing")?;
    Ok(())
}

fn mount_if_missing(fstype: &str, target: &str) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    let present = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(1) == Some(target) && f.next() == Some(fstype)
    });
    if present {
        step(&format!("{fstype} at {target}: mounted"));
        return Ok(());
    }
    step(&format!("mounting {fstype} at {target}"));
    run_visible(Command::new("mount").args(["-t", fstype, fstype, target]))
}

// ---------------------------------------------------------------------------------------
// build, test
// ---------------------------------------------------------------------------------------

fn cargo(root: &Path) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root);
    c
}

fn build(root: &Path, release: bool, tests: bool) -> Result<()> {
    step("building");
    let mut c = cargo(root);
    c.args(["build", "--workspace", "--bins"]);
    if tests {
        c.arg("--tests");
    }
    if release {
        c.arg("--release");
    }
    run_visible(&mut c)
}

fn target_dir(root: &Path) -> Result<PathBuf> {
    let out = cargo(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stdin(Stdio::null())
        .output()
        .context("cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    v.get("target_directory")
        .and_then(|t| t.as_str())
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

/// Passed and failed test counts, summed over cargo test's `test result:` lines.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    /// Checks this machine cannot run, each with its reason (printed, and counted as
    /// skipped in the closing line).
    not_run: Vec<String>,
}

impl Tally {
    /// Adds a libtest summary line: `test result: ok. 15 passed; 0 failed; 0 ignored; ...`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            if let (Some(n), Some(what)) = (words.next(), words.next()) {
                if let Ok(n) = n.parse::<u64>() {
                    match what {
                        "passed" => self.passed += n,
                        "failed" => self.failed += n,
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Runs `cargo test` with the given arguments, echoing its output and counting results.
fn cargo_test(root: &Path, bin_dir: &Path, args: &[&str], tally: &mut Tally) -> Result<()> {
    use std::io::BufRead as _;
    let mut c = cargo(root);
    c.arg("test")
        .args(args)
        .env("XDPLB_BIN_DIR", bin_dir)
        .env("PATH", path_with_cargo_bin()?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let what = format!("{c:?}");
    let mut child = c.spawn().with_context(|| format!("running {what}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        tally.add_line(&line);
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {what}"))?;
    if !status.success() {
        bail!("{what} failed: {status}");
    }
    Ok(())
}

fn test(root: &Path) -> Result<()> {
    build(root, false, true)?;
    let bin_dir = target_dir(root)?.join("debug");
    let mut failed = Vec::new();
    let mut tally = Tally::default();
    step("unit and integration tests (all crates but the end-to-end one)");
    if let Err(e) = cargo_test(
        root,
        &bin_dir,
        &["--no-fail-fast", "--workspace", "--exclude", "tests"],
        &mut tally,
    ) {
        failed.push(format!("{e:#}"));
    }
    // The end-to-end tests each build namespaces and start servers and an agent; two at
    // a time keeps a 2-core machine from timing out on itself.
    step("tests crate (BPF_PROG_TEST_RUN fixtures and end-to-end tests), 2 threads");
    if let Err(e) = cargo_test(
        root,
        &bin_dir,
        &["--no-fail-fast", "-p", "tests", "--", "--test-threads", "2"],
        &mut tally,
    ) {
        failed.push(format!("{e:#}"));
    }
    // The benchmark harness once, quick: it must produce every figure (not given values).
    step("benchmark smoke test: cargo xtask bench all --quick");
    match bench::smoke(root, run_visible) {
        Ok(refused) => {
            println!("test bench_quick_produces_every_figure ... ok");
            tally.passed += 1;
            for (suite, reason) in refused {
                println!("test bench_quick_{suite} ... NOT RUN: {reason}");
                tally
                    .not_run
                    .push(format!("bench {suite} --quick: {reason}"));
            }
        }
        Err(e) => {
            println!("test bench_quick_produces_every_figure ... FAILED: {e:#}");
            tally.failed += 1;
            failed.push(format!("bench smoke test: {e:#}"));
        }
    }
    // One closing line for the whole run (the last line on success): the per-binary
    // summaries end with doc-test runs of zero tests.
    if tally.not_run.is_empty() {
        println!("tests: {} passed, {} failed", tally.passed, tally.failed);
    } else {
        eprintln!(
            "not run on this machine (counted as skipped, not as passed):\n  {}",
            tally.not_run.join("\n  ")
        );
        println!(
            "tests: {} passed, {} failed, {} skipped",
            tally.passed,
            tally.failed,
            tally.not_run.len()
        );
    }
    if !failed.is_empty() {
        bail!("tests failed:\n{}", failed.join("\n"));
    }
    if tally.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// demo
// ---------------------------------------------------------------------------------------

const DEMO_LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
const DEMO_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn demo(root: &Path, requests: usize) -> Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: tearing down");
        INTERRUPTED.store(true, Ordering::SeqCst);
    })
    .context("installing the Ctrl-C handler")?;
    let bin_dir = target_dir(root)?.join("debug");
    // Read by the harness (e2e::bin_dir); set before any thread starts.
    std::env::set_var("XDPLB_BIN_DIR", &bin_dir);

    step("building namespaces: client, node, three pods");
    let mut topo = netns::Topology::new("demo", 3)?;
    check_interrupt()?;
    for n in 1..=3 {
        topo.start_nginx(n)?;
    }
    check_interrupt()?;
    let services = write_demo_services(&topo)?;
    eprintln!("    services file: {}", services.display());
    let pin = e2e::PinDir::new(&topo)?;

    step(&format!(
        "starting lb-agent on {} and {}",
        topo.edge_iface,
        topo.pod_iface_glob()
    ));
    let agent = e2e::Agent::start(&topo, &services, &pin.0, &[])?;
    check_interrupt()?;

    step(&format!(
        "{requests} requests from the client to http://{DEMO_LB_IP}/"
    ));
    let mut failures = send_requests(&topo, requests)?;
    failures += show_lbctl(&pin.0);
    step("stopping lb-agent and tearing down");
    let status = agent.stop()?;
    if !status.success() {
        eprintln!("    lb-agent exited with {status}");
        failures += 1;
    }
    drop(pin);
    drop(topo);
    if failures > 0 {
        bail!("{failures} of the demo's steps failed");
    }
    step("demo done: every request answered from the VIP");
    Ok(())
}

/// The demo's one service (HTTP on a ClusterIP and a load-balancer IP, the three pods as
/// endpoints), written where lb-agent reads it.
fn write_demo_services(topo: &netns::Topology) -> Result<PathBuf> {
    let mut svc = e2e::ServiceSpec::new(
        "web",
        vec![e2e::PortSpec::new("http", 80, netns::POD_HTTP_PORT, "TCP")],
    );
    svc.cluster_ips = vec![DEMO_CLUSTER_IP.into()];
    svc.lb_ips = vec![DEMO_LB_IP.into()];
    svc.endpoints = topo
        .pods
        .iter()
        .map(|p| e2e::EndpointSpec::ready(p.v4, &p.name))
        .collect();
    let services = topo.dir.join("services.yaml");
    e2e::write_services(&services, &[svc])?;
    Ok(services)
}

/// Sends `requests` requests to the VIP and prints how they spread over the pods; returns
/// how many failed or were answered from another address.
fn send_requests(topo: &netns::Topology, requests: usize) -> Result<usize> {
    let url = format!("http://{DEMO_LB_IP}/");
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = 0usize;
    for i in 0..requests {
        check_interrupt()?;
        match e2e::http_get(&topo.client, &url) {
            Ok(r) if r.remote_ip == DEMO_LB_IP.to_string() => {
                *spread.entry(r.body).or_insert(0) += 1;
            }
            Ok(r) => {
                failures += 1;
                eprintln!("    request {i}: reply from {}, not the VIP", r.remote_ip);
            }
            Err(e) => {
                failures += 1;
                eprintln!("    request {i}: {e:#}");
            }
        }
    }
    println!("\nspread of {requests} requests:");
    for (pod, n) in &spread {
        println!("  {pod:8} {n:3}  {}", "#".repeat(*n));
    }
    if failures > 0 {
        println!("  failed   {failures:3}");
    }
    Ok(failures)
}

/// Shows what lbctl reports of the services and their counters; returns how many of its
/// commands failed.
fn show_lbctl(pin: &Path) -> usize {
    let mut failures = 0;
    for what in ["services", "stats"] {
        println!("\n$ lbctl --pin-dir {} {what} -o table", pin.display());
        match e2e::lbctl(pin, &[what, "-o", "table"]) {
            Ok(out) => print!("{out}"),
            Err(e) => {
                failures += 1;
                eprintln!("lbctl {what}: {e:#}");
            }
        }
    }
    failures
}

#[cfg(test)]
mod tally_tests {
    use super::Tally;

    #[test]
    fn sums_libtest_summaries() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 15 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        t.add_line("test result: FAILED. 9 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s");
        t.add_line("running 3 tests");
        assert_eq!((t.passed, t.failed), (24, 2));
    }
}
