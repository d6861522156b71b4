//! End-to-end harness: services files, the real `lb-agent` and `lbctl` binaries, and the
//! clients the tests and the demo use (curl, socat) inside a [`Topology`].
//!
//! Like `netns`, this file depends on std, anyhow, libc and serde_json only, because
//! xtask includes it by path (see `netns`).

use crate::netns::{self, Topology};
use anyhow::{bail, Context as _, Result};
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The line `lb-agent` prints on stderr once it is synced and attached.
pub const READY_LINE: &str = "lb-agent ready:";
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Directory holding `lb-agent` and `lbctl`: `$XDPLB_BIN_DIR` (set by `cargo xtask
/// test`), else the cargo target directory the running test binary was built in.
pub fn bin_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("XDPLB_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            // target/<profile>/deps/<test binary> -> target/<profile>
            let exe = std::env::current_exe().context("locating the test binary")?;
            exe.parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .with_context(|| format!("no target directory above {}", exe.display()))?
        }
    };
    for bin in ["lb-agent", "lbctl"] {
        if !dir.join(bin).is_file() {
            bail!(
                "{} not found in {} (run `cargo xtask test`, or `cargo build --workspace \
                 --bins` and set XDPLB_BIN_DIR)",
                bin,
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Mounts bpffs at /sys/fs/bpf in the root mount namespace when it is missing: the agent's
/// pins must be where `lbctl` (run from the root namespace) finds them.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(1) == Some("/sys/fs/bpf") && f.next() == Some("bpf")
    });
    if !mounted {
        netns::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
            .context("mounting bpffs at /sys/fs/bpf")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Services files
// ---------------------------------------------------------------------------------------

/// One port of a Service and its EndpointSlice port.
#[derive(Clone, Debug)]
pub struct PortSpec {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    /// "TCP" or "UDP".
    pub protocol: &'static str,
}

impl PortSpec {
    pub fn new(name: &str, port: u16, target_port: u16, protocol: &'static str) -> Self {
        Self {
            name: name.to_string(),
            port,
            target_port,
            protocol,
        }
    }
}

/// An endpoint (a pod address) of a Service.
#[derive(Clone, Debug)]
pub struct EndpointSpec {
    pub addr: IpAddr,
    pub pod: String,
    pub ready: bool,
}

impl EndpointSpec {
    pub fn ready(addr: impl Into<IpAddr>, pod: &str) -> Self {
        Self {
            addr: addr.into(),
            pod: pod.to_string(),
            ready: true,
        }
    }
}

/// A Service with its endpoints, written as `v1/Service` plus one
/// `discovery.k8s.io/v1/EndpointSlice` per address family.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// ClusterIP / LoadBalancer (type follows from `lb_ips`).
    pub cluster_ips: Vec<IpAddr>,
    pub lb_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub ports: Vec<PortSpec>,
    pub endpoints: Vec<EndpointSpec>,
}

impl ServiceSpec {
    pub fn new(name: &str, ports: Vec<PortSpec>) -> Self {
        Self {
            namespace: "default".to_string(),
            name: name.to_string(),
            cluster_ips: Vec::new(),
            lb_ips: Vec::new(),
            external_ips: Vec::new(),
            ports,
            endpoints: Vec::new(),
        }
    }

    /// `lbctl`'s name of port `port_name` of this service (`ns/name:port/PROTO`).
    pub fn port_id(&self, port_name: &str, protocol: &str) -> String {
        let p = if port_name.is_empty() { "-" } else { port_name };
        format!("{}/{}:{}/{}", self.namespace, self.name, p, protocol)
    }

    fn render(&self, out: &mut String) -> Result<()> {
        let svc_type = if self.lb_ips.is_empty() {
            "ClusterIP"
        } else {
            "LoadBalancer"
        };
        let families: Vec<&str> = self
            .cluster_ips
            .iter()
            .map(|a| if a.is_ipv4() { "IPv4" } else { "IPv6" })
            .collect();
        writeln!(out, "---\napiVersion: v1\nkind: Service\nmetadata:")?;
        writeln!(
            out,
            "  name: {}\n  namespace: {}",
            self.name, self.namespace
        )?;
        writeln!(out, "spec:\n  type: {svc_type}")?;
        if let Some(first) = self.cluster_ips.first() {
            writeln!(out, "  clusterIP: {first}\n  clusterIPs:")?;
            for a in &self.cluster_ips {
                writeln!(out, "  - {a}")?;
            }
            writeln!(out, "  ipFamilies:")?;
            for f in &families {
                writeln!(out, "  - {f}")?;
            }
            let policy = if families.len() > 1 {
                "RequireDualStack"
            } else {
                "SingleStack"
            };
            writeln!(out, "  ipFamilyPolicy: {policy}")?;
        }
        if !self.external_ips.is_empty() {
            writeln!(out, "  externalIPs:")?;
            for a in &self.external_ips {
                writeln!(out, "  - {a}")?;
            }
        }
        writeln!(out, "  ports:")?;
        for p in &self.ports {
            writeln!(
                out,
                "  - name: {}\n    port: {}\n    protocol: {}\n    targetPort: {}",
                p.name, p.port, p.protocol, p.target_port
            )?;
        }
        writeln!(out, "  sessionAffinity: None")?;
        writeln!(out, "status:\n  loadBalancer:")?;
        if self.lb_ips.is_empty() {
            writeln!(out, "    {{}}")?;
        } else {
            writeln!(out, "    ingress:")?;
            for a in &self.lb_ips {
                writeln!(out, "    - ip: {a}")?;
            }
        }
        for (family, v4) in [("IPv4", true), ("IPv6", false)] {
            let eps: Vec<&EndpointSpec> = self
                .endpoints
                .iter()
                .filter(|e| e.addr.is_ipv4() == v4)
                .collect();
            // A family the service has no endpoints in gets an empty slice only when the
            // service uses that family, as the EndpointSlice controller does.
            let uses_family = self.cluster_ips.iter().any(|a| a.is_ipv4() == v4)
                || self.lb_ips.iter().any(|a| a.is_ipv4() == v4);
            if eps.is_empty() && !uses_family {
                continue;
            }
            writeln!(
                out,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:"
            )?;
            writeln!(
                out,
                "  name: {}-{}\n  namespace: {}\n  labels:\n    \
                 kubernetes.io/service-name: {}\n    \
                 endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io",
                self.name,
                family.to_lowercase(),
                self.namespace,
                self.name
            )?;
            writeln!(out, "addressType: {family}")?;
            if eps.is_empty() {
                writeln!(out, "endpoints: []")?;
            } else {
                writeln!(out, "endpoints:")?;
            }
            for e in eps {
                writeln!(
                    out,
                    "- addresses:\n  - {}\n  conditions:\n    ready: {}\n    serving: {}\n    \
                     terminating: false\n  nodeName: node-1\n  targetRef:\n    kind: Pod\n    \
                     name: {}\n    namespace: {}",
                    e.addr, e.ready, e.ready, e.pod, self.namespace
                )?;
            }
            writeln!(out, "ports:")?;
            for p in &self.ports {
                writeln!(
                    out,
                    "- name: {}\n  port: {}\n  protocol: {}",
                    p.name, p.target_port, p.protocol
                )?;
            }
        }
        Ok(())
    }
}

/// The multi-document YAML of `services`.
pub fn render_services(services: &[ServiceSpec]) -> Result<String> {
    // Never zero bytes, even for no services: the agent takes an empty file as one
    // caught mid-write and keeps what it had.
    let mut out = String::from("# services of an xdplb test or demo\n");
    for s in services {
        s.render(&mut out)
            .with_context(|| format!("rendering service {}", s.name))?;
    }
    Ok(out)
}

/// Writes the services file atomically (a temporary file renamed over it, as editors and
/// ConfigMap updates do), so the agent never reads half a file.
pub fn write_services(path: &Path, services: &[ServiceSpec]) -> Result<()> {
    let text = render_services(services)?;
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

// ---------------------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------------------

/// A pin directory under /sys/fs/bpf, removed on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(topo: &Topology) -> Result<Self> {
        ensure_bpffs()?;
        let p = PathBuf::from(format!("/sys/fs/bpf/xdplb-{}", topo.prefix));
        if p.exists() {
            std::fs::remove_dir_all(&p)
                .with_context(|| format!("removing stale pin dir {}", p.display()))?;
        }
        Ok(Self(p))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct AgentLog {
    text: String,
    ready: bool,
    /// Output streams not yet at EOF; 0 means the agent is gone.
    open_streams: usize,
}

/// A running `lb-agent` in the node namespace; killed on drop.
pub struct Agent {
    child: Option<Child>,
    log: Arc<(Mutex<AgentLog>, Condvar)>,
    pub pin_dir: PathBuf,
}

impl Agent {
    /// Starts `lb-agent` in the node namespace on the topology's edge interface and pod
    /// glob, and waits for its ready line.
    pub fn start(topo: &Topology, services: &Path, pin_dir: &Path, extra: &[&str]) -> Result<Self> {
        let agent = bin_dir()?.join("lb-agent");
        let mut cmd = netns::in_ns_with_host_bpffs(&topo.node, &agent.to_string_lossy());
        cmd.arg("--services")
            .arg(services)
            .args(["--edge-iface", &topo.edge_iface])
            .args(["--pod-iface", &topo.pod_iface_glob()])
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(extra);
        Self::launch(cmd, pin_dir)
    }

    /// Starts `lb-agent` in Kubernetes mode in the node namespace (`--kubeconfig`,
    /// `--node-name`; the API server must be reachable from the node namespace, e.g. the
    /// tests' fake one listening there), on the topology's edge interface and pod glob,
    /// and waits for its ready line (which comes after the first full sync).
    pub fn start_kube(
        topo: &Topology,
        kubeconfig: &Path,
        node_name: &str,
        pin_dir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let agent = bin_dir()?.join("lb-agent");
        let mut cmd = netns::in_ns_with_host_bpffs(&topo.node, &agent.to_string_lossy());
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--node-name", node_name])
            .args(["--edge-iface", &topo.edge_iface])
            .args(["--pod-iface", &topo.pod_iface_glob()])
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(extra);
        Self::launch(cmd, pin_dir)
    }

    fn launch(mut cmd: Command, pin_dir: &Path) -> Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting lb-agent")?;
        let log: Arc<(Mutex<AgentLog>, Condvar)> = Arc::default();
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        // The contract puts the ready line on stderr; it is accepted on stdout too, so a
        // mix-up there shows as a report rather than as every test timing out.
        let streams: Vec<Box<dyn std::io::Read + Send>> = [
            stdout.map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            stderr.map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        log.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .open_streams = streams.len();
        for stream in streams {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let (m, cv) = &*log;
                    let mut l = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if line.starts_with(READY_LINE) {
                        l.ready = true;
                    }
                    l.text.push_str(&line);
                    l.text.push('\n');
                    cv.notify_all();
                }
                let (m, cv) = &*log;
                let mut l = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                l.open_streams = l.open_streams.saturating_sub(1);
                cv.notify_all();
            });
        }
        let mut agent = Agent {
            child: Some(child),
            log,
            pin_dir: pin_dir.to_path_buf(),
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        let (m, cv) = &*self.log;
        let mut l = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if l.ready {
                return Ok(());
            }
            if l.open_streams == 0 {
                drop(l);
                let status = self.child.as_mut().map(std::process::Child::wait);
                bail!(
                    "lb-agent exited before it was ready ({status:?}); its output:\n{}",
                    self.log_text()
                );
            }
            let now = Instant::now();
            if now >= deadline {
                drop(l);
                bail!(
                    "lb-agent not ready after {AGENT_READY_TIMEOUT:?}; its output:\n{}",
                    self.log_text()
                );
            }
            l = cv
                .wait_timeout(l, deadline - now)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }

    /// Waits until the agent has printed a line containing `needle`; returns that line.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.log;
        let mut l = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(line) = l.text.lines().find(|line| line.contains(needle)) {
                return Ok(line.to_string());
            }
            let now = Instant::now();
            if now >= deadline || l.open_streams == 0 {
                let text = l.text.clone();
                drop(l);
                bail!(
                    "lb-agent printed no line with {needle:?} within {timeout:?}; output:\n{text}"
                );
            }
            l = cv
                .wait_timeout(l, deadline - now)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }

    /// Everything the agent printed so far.
    pub fn log_text(&self) -> String {
        self.log
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .text
            .clone()
    }

    /// Sends SIGTERM and waits for the agent to exit; returns its exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().context("waiting for lb-agent")? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "lb-agent did not exit within {AGENT_STOP_TIMEOUT:?} of SIGTERM; output:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on our own child; SIGTERM lets it detach its programs.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `lbctl --pin-dir <pin_dir> <args>` from the root namespace; returns stdout.
pub fn lbctl(pin_dir: &Path, args: &[&str]) -> Result<String> {
    let bin = bin_dir()?.join("lbctl");
    let out = netns::run(Command::new(bin).arg("--pin-dir").arg(pin_dir).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `lbctl <args>` writing into a pipe whose reader is already gone (as `lbctl flows |
/// head` ends): its exit status and what it wrote to stderr.
pub fn lbctl_into_closed_pipe(
    pin_dir: &Path,
    args: &[&str],
) -> Result<(std::process::ExitStatus, String)> {
    let bin = bin_dir()?.join("lbctl");
    let mut child = Command::new(bin)
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting lbctl")?;
    // Closing our end before lbctl writes makes its first write fail with EPIPE.
    drop(child.stdout.take());
    let out = child.wait_with_output().context("waiting for lbctl")?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `lbctl <what> -o json`, parsed.
pub fn lbctl_json(pin_dir: &Path, what: &str) -> Result<serde_json::Value> {
    let text = lbctl(pin_dir, &[what, "-o", "json"])?;
    serde_json::from_str(&text).with_context(|| format!("lbctl {what} -o json printed {text:?}"))
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// What one HTTP request returned.
#[derive(Clone, Debug)]
pub struct HttpReply {
    /// The body, trimmed: the serving pod's name.
    pub body: String,
    /// The address curl was connected to (`%{remote_ip}`).
    pub remote_ip: String,
}

/// One HTTP GET with a fresh connection from `ns` (curl; IPv6 URLs in brackets).
pub fn http_get(ns: &str, url: &str) -> Result<HttpReply> {
    let out = netns::in_ns(ns, "curl")
        .args([
            "-sS",
            "-g",
            "--connect-timeout",
            "2",
            "--max-time",
            "5",
            "-w",
            "\n%{remote_ip}",
            url,
        ])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running curl {url} in {ns}"))?;
    if !out.status.success() {
        bail!(
            "curl {url} from {ns} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, remote) = text
        .rsplit_once('\n')
        .with_context(|| format!("curl output {text:?}"))?;
    Ok(HttpReply {
        body: body.trim().to_string(),
        remote_ip: remote.trim().to_string(),
    })
}

/// How long a UDP client waits for an answer.
const UDP_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// One UDP request from `ns` through a connected socket (socat), so only an answer from
/// `addr` itself is accepted. Returns the first line of the answer, or the error socat
/// reported (a connected socket reports an ICMP port unreachable as "Connection
/// refused").
pub fn udp_request(ns: &str, addr: IpAddr, port: u16, payload: &str) -> Result<String> {
    let target = match addr {
        IpAddr::V4(a) => format!("UDP4:{a}:{port}"),
        IpAddr::V6(a) => format!("UDP6:[{a}]:{port}"),
    };
    // socat would wait `-t` after stdin's EOF even when the answer came at once; the
    // answer is taken as soon as it arrives and socat is killed then.
    let mut child = netns::in_ns(ns, "socat")
        .args(["-t", "5", "-", &target])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting socat")?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("socat stdin")?;
        stdin
            .write_all(format!("{payload}\n").as_bytes())
            .context("writing to socat")?;
    }
    let stdout = child.stdout.take().context("socat stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let answer = rx.recv_timeout(UDP_ANSWER_TIMEOUT);
    if !matches!(answer, Err(std::sync::mpsc::RecvTimeoutError::Disconnected)) {
        let _ = child.kill();
    }
    let out = child.wait_with_output().context("waiting for socat")?;
    match answer {
        Ok(line) => Ok(line.trim().to_string()),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            bail!("UDP {target} from {ns}: no answer within {UDP_ANSWER_TIMEOUT:?}")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => bail!(
            "UDP {target} from {ns}: no answer ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// Opens a TCP connection from `ns` (socat, 2 s timeout) and closes it. Returns how the
/// attempt ended (`Ok` if connected, else socat's error, which names the cause, e.g.
/// "Connection refused" for a RST) and how long it took.
pub fn tcp_connect(ns: &str, addr: IpAddr, port: u16) -> Result<(Result<(), String>, Duration)> {
    let target = match addr {
        IpAddr::V4(a) => format!("TCP4:{a}:{port},connect-timeout=2"),
        IpAddr::V6(a) => format!("TCP6:[{a}]:{port},connect-timeout=2"),
    };
    let start = Instant::now();
    let out = netns::in_ns(ns, "socat")
        .args(["-T", "3", "/dev/null", &target])
        .stdin(Stdio::null())
        .output()
        .context("running socat")?;
    let took = start.elapsed();
    let result = if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    };
    Ok((result, took))
}

/// A long-lived TCP connection (a socat client in `ns`) that answers lines; its output is
/// read in the background.
pub struct LineConn {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl LineConn {
    pub fn open(ns: &str, addr: std::net::Ipv4Addr, port: u16) -> Result<Self> {
        let mut child = netns::in_ns(ns, "socat")
            .args(["-", &format!("TCP4:{addr}:{port}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting socat")?;
        let stdin = child.stdin.take().context("socat stdin")?;
        let stdout = child.stdout.take().context("socat stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            lines,
        })
    }

    /// Sends a line and waits (at most 5 s) for the answer.
    pub fn ask(&mut self, line: &str) -> Result<String> {
        use std::io::Write as _;
        writeln!(self.stdin, "{line}").context("writing to the connection")?;
        self.stdin.flush().context("flushing")?;
        self.lines
            .recv_timeout(Duration::from_secs(5))
            .with_context(|| format!("no answer to {line:?} within 5 s"))
    }
}

impl Drop for LineConn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line over a fresh TCP connection, and its answer.
pub fn tcp_line(ns: &str, addr: std::net::Ipv4Addr, port: u16, line: &str) -> Result<String> {
    LineConn::open(ns, addr, port)?.ask(line)
}
