//! Network-namespace topologies for the end-to-end tests and `cargo xtask demo`.
//!
//! The node is shaped like a Calico node: a client namespace (an outside host) reaches
//! the node namespace over a veth (the node's edge NIC); every pod namespace hangs off the
//! node by its own veth, has a /32 and a /128 address, and reaches everything through the
//! link-local gateways 169.254.1.1 (answered by proxy ARP on the host side) and fe80::1.
//!
//! Everything is built with `ip` commands inside namespaces this module creates; the root
//! namespace's addresses and routes are never touched. Names are unique per process and
//! per topology, so tests can run in parallel, and `Drop` kills every process started in
//! the namespaces and deletes them, also when a test panics.
//!
//! This file depends on std, anyhow and libc only: xtask includes it by path, because
//! xtask must build before the BPF toolchain (which the tests crate needs) is installed.

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The node's address on its edge interface (the client's next hop for the VIP ranges).
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The client's address (the outside host).
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// Ranges the client routes via the node: VIPs (ClusterIPs, LoadBalancer IPs) live here.
pub const VIP_RANGE_V4: &str = "198.19.0.0/16";
pub const VIP_RANGE_V6: &str = "2001:db8:f::/48";
/// Pod addresses are routed from the outside too, as with Calico's BGP mode.
pub const POD_RANGE_V4: &str = "198.18.1.0/24";
pub const POD_RANGE_V6: &str = "2001:db8:1::/64";
/// Gateways every pod uses (Calico's fixed link-local next hops).
pub const POD_GW_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const POD_GW_V6: &str = "fe80::1";

/// Ports of the servers a pod can run.
pub const POD_HTTP_PORT: u16 = 8080;
pub const POD_TCP_ECHO_PORT: u16 = 7000;
pub const POD_UDP_ECHO_PORT: u16 = 9000;
/// A TCP server that answers each connection with `<pod name> <client address>` (IPv4).
pub const POD_PEER_ECHO_PORT: u16 = 7100;

/// How long a server may take to listen.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);

static TOPOLOGY_COUNTER: AtomicU32 = AtomicU32::new(0);

/// IPv4 address of pod number `n` (1-based).
pub fn pod_v4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, n)
}

/// IPv6 address of pod number `n` (1-based).
pub fn pod_v6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, u16::from(n))
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion and fails (with its stderr) unless it exited 0.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let what = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{what}`"))?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// `ip <args>`, which must succeed.
pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// Runs `f` on a thread that entered network namespace `ns` (by its `/run/netns` name) and
/// returns what it returns. setns(2) moves only the calling thread, so the caller (a test's
/// thread) never changes namespace; sockets `f` creates stay in `ns`, whichever thread uses
/// them later.
pub fn run_in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns(2) on a namespace fd we hold open; CLONE_NEWNET moves only
                // this thread, which ends when `f` returns.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                ensure!(rc == 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .map_err(|_| anyhow!("the thread in network namespace {ns} panicked"))?
    })
}

/// A bare network namespace of a test's own (no topology in it), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Self> {
        ip(&["netns", "add", &name])?;
        Ok(Netns { name })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("deleting namespace {}: {e:#}", self.name);
        }
    }
}

/// A command run inside namespace `ns` (`ip netns exec`, which also gives it a /sys of
/// that namespace).
pub fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// Runs `args` inside `ns`; it must exit 0. Returns its stdout.
pub fn ns_run(ns: &str, args: &[&str]) -> Result<String> {
    let (program, rest) = args.split_first().context("empty command")?;
    let out = run(in_ns(ns, program).args(rest))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command run inside `ns` the way a host daemon sees the host: the namespace's network
/// and /sys, and the root namespace's bpffs at /sys/fs/bpf. `ip netns exec` alone mounts a
/// fresh /sys without it, and a bpffs mounted afterwards would be a new, empty instance,
/// so pins made there would be invisible to `lbctl` and to the test.
pub fn in_ns_with_host_bpffs(ns: &str, program: &str) -> Command {
    const SCRIPT: &str = r#"set -e
keep=$(mktemp -d)
if mountpoint -q /sys/fs/bpf; then mount --bind /sys/fs/bpf "$keep"; fi
umount -l /sys
mount -t sysfs sysfs /sys
if mountpoint -q "$keep"; then mount --bind "$keep" /sys/fs/bpf; umount -l "$keep"; fi
rmdir "$keep"
exec "$@""#;
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .args([
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "slave",
            "--",
            "sh",
            "-c",
            SCRIPT,
            "sh",
        ])
        .arg(program);
    c
}

/// Writes a sysctl inside `ns` (through /proc/sys: procps may not be installed).
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    run(in_ns(ns, "sh").args(["-c", "echo \"$1\" > \"$2\"", "sh", value, &path]))
        .map(drop)
        .with_context(|| format!("sysctl {key}={value} in {ns}"))
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what}: {e:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until something listens on `port` inside `ns` (`udp` selects the protocol).
pub fn wait_for_port(ns: &str, port: u16, udp: bool, timeout: Duration) -> Result<()> {
    let proto = if udp { "-Hlun" } else { "-Hltn" };
    let filter = format!("( sport = :{port} )");
    wait_until(timeout, &format!("port {port} in {ns}"), || {
        let out = ns_run(ns, &["ss", proto, &filter])?;
        Ok(!out.trim().is_empty())
    })
}

/// Kills a process group (background servers run in their own group so that forked
/// children, such as socat's per-connection processes, go too).
fn kill_group(child: &mut Child) {
    if let Ok(pgid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One pod: a namespace with eth0, connected to the node by `host_iface`.
#[derive(Clone, Debug)]
pub struct Pod {
    /// 1-based; the last byte of its addresses.
    pub n: u8,
    /// `pod-<n>`: what its servers answer, and the endpoint's targetRef name.
    pub name: String,
    pub ns: String,
    /// The node side of the pod's veth (no address, proxy ARP).
    pub host_iface: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// A client, a node and pods, torn down on drop.
pub struct Topology {
    /// Short unique prefix of every interface name (`<prefix>-edge`, `<prefix>-p1`...).
    pub prefix: String,
    pub client: String,
    pub node: String,
    /// The node's edge interface (in `node`).
    pub edge_iface: String,
    /// The client's end of the edge link (in `client`).
    pub client_iface: String,
    pub pods: Vec<Pod>,
    /// Scratch directory for server configs, services files and captures.
    pub dir: PathBuf,
    namespaces: Vec<String>,
    procs: Vec<Child>,
}

impl Topology {
    /// Builds client, node and `pods` pods. `tag` (a few letters) makes names readable.
    pub fn new(tag: &str, pods: u8) -> Result<Self> {
        let id = TOPOLOGY_COUNTER.fetch_add(1, Ordering::Relaxed);
        // Interface names are limited to 15 bytes: "xl" + pid + counter (base 36) stays
        // under 10, leaving room for "-edge" and "-p<n>".
        let prefix = format!(
            "xl{}{}",
            base36(u64::from(std::process::id())),
            base36(u64::from(id))
        );
        let dir = std::env::temp_dir().join(format!("xdplb-{tag}-{prefix}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Servers drop privileges (nginx workers); let them read their configs.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", dir.display()))?;
        let mut t = Topology {
            client: format!("xdplb-{tag}-{prefix}-client"),
            node: format!("xdplb-{tag}-{prefix}-node"),
            edge_iface: format!("{prefix}-edge"),
            client_iface: format!("{prefix}-cli"),
            prefix,
            pods: Vec::new(),
            dir,
            namespaces: Vec::new(),
            procs: Vec::new(),
        };
        t.build_edge()
            .context("building client and node namespaces")?;
        for _ in 0..pods {
            t.add_pod()?;
        }
        Ok(t)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn build_edge(&mut self) -> Result<()> {
        let (c, n) = (self.client.clone(), self.node.clone());
        let (edge, cli) = (self.edge_iface.clone(), self.client_iface.clone());
        self.add_ns(&c)?;
        self.add_ns(&n)?;
        ip(&[
            "-n", &n, "link", "add", &edge, "type", "veth", "peer", "name", &cli, "netns", &c,
        ])?;
        let node_v4 = format!("{NODE_V4}/24");
        let node_v6 = format!("{NODE_V6}/64");
        let client_v4 = format!("{CLIENT_V4}/24");
        let client_v6 = format!("{CLIENT_V6}/64");
        ip(&["-n", &n, "addr", "add", &node_v4, "dev", &edge])?;
        ip(&["-n", &n, "addr", "add", &node_v6, "dev", &edge, "nodad"])?;
        ip(&["-n", &n, "link", "set", &edge, "up"])?;
        ip(&["-n", &c, "addr", "add", &client_v4, "dev", &cli])?;
        ip(&["-n", &c, "addr", "add", &client_v6, "dev", &cli, "nodad"])?;
        ip(&["-n", &c, "link", "set", &cli, "up"])?;
        let (nv4, nv6) = (NODE_V4.to_string(), NODE_V6.to_string());
        for range in [VIP_RANGE_V4, POD_RANGE_V4] {
            ip(&["-n", &c, "route", "add", range, "via", &nv4])?;
        }
        for range in [VIP_RANGE_V6, POD_RANGE_V6] {
            ip(&["-n", &c, "-6", "route", "add", range, "via", &nv6])?;
        }
        // The client plays an outside host whose NIC receives frames that XDP redirects
        // out of the edge: a veth delivers those only when its peer runs NAPI (GRO on).
        ns_run(&c, &["ethtool", "-K", &cli, "gro", "on"])?;
        sysctl(&n, "net.ipv4.ip_forward", "1")?;
        sysctl(&n, "net.ipv6.conf.all.forwarding", "1")?;
        // The node's upstream is the client's network. Proxy ARP for the pods' gateway
        // 169.254.1.1 answers only when the node has a route to it through another
        // interface, which on a real node is this default route.
        ip(&[
            "-n",
            &n,
            "route",
            "add",
            "default",
            "via",
            &CLIENT_V4.to_string(),
        ])?;
        ip(&[
            "-n",
            &n,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &CLIENT_V6.to_string(),
        ])?;
        Ok(())
    }

    /// Adds the next pod (numbered from 1) and returns it.
    pub fn add_pod(&mut self) -> Result<Pod> {
        let n = u8::try_from(self.pods.len() + 1)
            .ok()
            .filter(|n| *n < 255)
            .context("too many pods")?;
        let pod = Pod {
            n,
            name: format!("pod-{n}"),
            ns: format!("xdplb-{}-pod{n}", self.prefix),
            host_iface: format!("{}-p{n}", self.prefix),
            v4: pod_v4(n),
            v6: pod_v6(n),
        };
        self.build_pod(&pod)
            .with_context(|| format!("building {}", pod.name))?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    fn build_pod(&mut self, pod: &Pod) -> Result<()> {
        let (p, node, hif) = (pod.ns.as_str(), self.node.clone(), pod.host_iface.as_str());
        self.add_ns(p)?;
        ip(&[
            "-n", &node, "link", "add", hif, "type", "veth", "peer", "name", "eth0", "netns", p,
        ])?;
        // Calico's host side: no address, proxy ARP answers for 169.254.1.1 at once (the
        // default proxy_delay holds replies back up to 0.8 s), fe80::1 for NDP.
        sysctl(&node, &format!("net.ipv4.conf.{hif}.proxy_arp"), "1")?;
        sysctl(&node, &format!("net.ipv4.neigh.{hif}.proxy_delay"), "0")?;
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            "fe80::1/64",
            "dev",
            hif,
            "nodad",
        ])?;
        ip(&["-n", &node, "link", "set", hif, "up"])?;
        let (v4, v6) = (format!("{}/32", pod.v4), format!("{}/128", pod.v6));
        ip(&["-n", p, "addr", "add", &v4, "dev", "eth0"])?;
        ip(&["-n", p, "addr", "add", &v6, "dev", "eth0", "nodad"])?;
        ip(&["-n", p, "link", "set", "eth0", "up"])?;
        let gw4 = POD_GW_V4.to_string();
        ip(&[
            "-n", p, "route", "add", "default", "via", &gw4, "dev", "eth0", "onlink",
        ])?;
        ip(&[
            "-n", p, "-6", "route", "add", "default", "via", POD_GW_V6, "dev", "eth0",
        ])?;
        ip(&["-n", &node, "route", "add", &v4, "dev", hif])?;
        ip(&["-n", &node, "-6", "route", "add", &v6, "dev", hif])?;
        Ok(())
    }

    /// The pod with number `n`.
    pub fn pod(&self, n: u8) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.n == n)
            .with_context(|| format!("no pod-{n}"))
    }

    /// The glob matching every pod's host-side interface, present and future.
    pub fn pod_iface_glob(&self) -> String {
        format!("{}-p*", self.prefix)
    }

    /// Starts `args` inside `ns` in the background; it is killed when the topology drops.
    pub fn spawn(&mut self, ns: &str, args: &[&str], log: &Path) -> Result<()> {
        let (program, rest) = args.split_first().context("empty command")?;
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let log_err = log_file.try_clone().context("cloning log file handle")?;
        let mut cmd = in_ns(ns, program);
        cmd.args(rest)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .process_group(0);
        let what = describe(&cmd);
        let child = cmd.spawn().with_context(|| format!("starting `{what}`"))?;
        self.procs.push(child);
        Ok(())
    }

    /// Keeps `child` to be killed (with its process group) when the topology drops.
    pub fn adopt(&mut self, child: Child) {
        self.procs.push(child);
    }

    /// nginx in the pod on port 8080 (IPv4 and IPv6), serving a page that is the pod's
    /// name and a newline.
    pub fn start_nginx(&mut self, n: u8) -> Result<()> {
        let pod = self.pod(n)?.clone();
        let dir = self.dir.join(format!("nginx-{}", pod.name));
        let www = dir.join("www");
        std::fs::create_dir_all(&www).with_context(|| format!("creating {}", www.display()))?;
        std::fs::write(www.join("index.html"), format!("{}\n", pod.name))
            .context("writing index.html")?;
        let d = dir.display();
        let mut conf = String::new();
        // Single process so that killing it leaves no workers behind; temp paths inside
        // the scratch directory because /var/lib/nginx may not exist.
        writeln!(
            conf,
            "daemon off;\nmaster_process off;\nuser root;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             default_type text/plain;\n  server {{\n    listen {POD_HTTP_PORT};\n\
             listen [::]:{POD_HTTP_PORT} ipv6only=on;\n    root {d}/www;\n\
             index index.html;\n  }}\n}}"
        )?;
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).context("writing nginx.conf")?;
        let conf_s = conf_path.to_string_lossy().into_owned();
        let prefix_s = format!("{d}/");
        self.spawn(
            &pod.ns,
            &["nginx", "-p", &prefix_s, "-c", &conf_s],
            &dir.join("stderr.log"),
        )?;
        wait_for_port(&pod.ns, POD_HTTP_PORT, false, SERVER_START_TIMEOUT)
            .with_context(|| format!("nginx in {}; see {d}/", pod.name))
    }

    /// A TCP line server on port 7000 (IPv4 and IPv6) that answers every line with
    /// `<pod name> <line>`.
    pub fn start_tcp_echo(&mut self, n: u8) -> Result<()> {
        let pod = self.pod(n)?.clone();
        let listen = format!("TCP6-LISTEN:{POD_TCP_ECHO_PORT},ipv6only=0,reuseaddr,fork");
        // No quotes in the command: socat versions differ in how they parse them.
        let answer = format!("SYSTEM:while read l; do echo {} $l; done", pod.name);
        let log = self.dir.join(format!("tcp-echo-{}.log", pod.name));
        self.spawn(&pod.ns, &["socat", &listen, &answer], &log)?;
        wait_for_port(&pod.ns, POD_TCP_ECHO_PORT, false, SERVER_START_TIMEOUT)
            .with_context(|| format!("TCP echo in {}", pod.name))
    }

    /// A TCP server on port 7100 (IPv4) that answers the first line of each connection
    /// with one line, `<pod name> <address of the connecting client>`, and closes it:
    /// shows whether the client's source address reached the pod unchanged.
    pub fn start_peer_echo(&mut self, n: u8) -> Result<()> {
        let pod = self.pod(n)?.clone();
        let listen = format!("TCP4-LISTEN:{POD_PEER_ECHO_PORT},reuseaddr,fork");
        // socat puts the peer's address in SOCAT_PEERADDR for the forked command; no
        // quotes in the command: socat versions differ in how they parse them. The command
        // reads the client's line before answering: a command that exits without reading
        // it makes socat fail to pass that line on (EPIPE) and close the connection
        // before relaying the answer, whenever the line arrives first.
        let answer = format!("SYSTEM:read line; echo {} $SOCAT_PEERADDR", pod.name);
        let log = self.dir.join(format!("peer-echo-{}.log", pod.name));
        self.spawn(&pod.ns, &["socat", &listen, &answer], &log)?;
        wait_for_port(&pod.ns, POD_PEER_ECHO_PORT, false, SERVER_START_TIMEOUT)
            .with_context(|| format!("peer echo in {}", pod.name))
    }

    /// A UDP server on port 9000 (IPv4 and IPv6) that answers every datagram with the
    /// pod's name and a newline. `udp_echo_bin` is the tests crate's `udp-echo`.
    pub fn start_udp_echo(&mut self, n: u8, udp_echo_bin: &Path) -> Result<()> {
        let pod = self.pod(n)?.clone();
        let bin = udp_echo_bin.to_string_lossy().into_owned();
        let port = POD_UDP_ECHO_PORT.to_string();
        let log = self.dir.join(format!("udp-echo-{}.log", pod.name));
        self.spawn(&pod.ns, &[&bin, &port, &pod.name], &log)?;
        wait_for_port(&pod.ns, POD_UDP_ECHO_PORT, true, SERVER_START_TIMEOUT)
            .with_context(|| format!("UDP echo in {}; see {}", pod.name, log.display()))
    }

    /// MAC address of `iface` in `ns`.
    pub fn mac(ns: &str, iface: &str) -> Result<[u8; 6]> {
        let s = ns_run(ns, &["cat", &format!("/sys/class/net/{iface}/address")])?;
        let bytes: Vec<u8> = s
            .trim()
            .split(':')
            .map(|h| u8::from_str_radix(h, 16))
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing MAC {s:?} of {iface}"))?;
        bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("MAC {s:?} of {iface} is not 6 bytes"))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for child in &mut self.procs {
            kill_group(child);
        }
        // Anything else still running inside (started by a test directly, or a process
        // that escaped its group) would keep the namespace's interfaces alive.
        for ns in &self.namespaces {
            if let Ok(out) = Command::new("ip")
                .args(["netns", "pids", ns])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill(2) on a pid listed in our own test namespace.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if std::env::var_os("XDPLB_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
