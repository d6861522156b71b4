//! Real traffic against the lab: request spreads, a traffic loop that runs across changes,
//! connects that must be dropped, HTTP status probes and ICMP echoes.

use anyhow::{bail, ensure, Context as _, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::e2e::{self};
use tests::netns::{self};

/// Bounds every traffic loop (the workplace's rule: loops stop by themselves).
pub(crate) const MAX_LOOP_REQUESTS: usize = 3000;

/// `count` HTTP requests with fresh connections; every one must succeed from `vip`.
/// Returns how many each pod answered.
pub(crate) fn spread(
    ns: &str,
    vip: IpAddr,
    port: u16,
    count: usize,
) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for i in 0..count {
        let url = format!("http://{}/", std::net::SocketAddr::new(vip, port));
        let r = e2e::http_get(ns, &url)
            .with_context(|| format!("request {i} of {count} to {vip}:{port}"))?;
        ensure!(
            r.remote_ip == vip.to_string(),
            "reply from {}, expected {vip}",
            r.remote_ip
        );
        ensure!(r.body.starts_with("pod-"), "body {:?} names no pod", r.body);
        *seen.entry(r.body).or_insert(0) += 1;
    }
    Ok(seen)
}

pub(crate) fn names(pods: &[u8]) -> BTreeSet<String> {
    pods.iter().map(|n| format!("pod-{n}")).collect()
}

/// One request of a traffic loop.
#[derive(Debug)]
pub(crate) struct Sample {
    pub(crate) started: Instant,
    /// The answering pod, or the failure.
    pub(crate) result: std::result::Result<String, String>,
}

/// HTTP requests in a loop from `ns` (fresh connection each), until stopped.
pub(crate) struct TrafficLoop {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) handle: std::thread::JoinHandle<Vec<Sample>>,
}

impl TrafficLoop {
    pub(crate) fn start(ns: &str, url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, flag) = (ns.to_string(), Arc::clone(&stop));
        let handle = std::thread::spawn(move || {
            let mut out = Vec::new();
            while !flag.load(Ordering::Relaxed) && out.len() < MAX_LOOP_REQUESTS {
                let started = Instant::now();
                let result = e2e::http_get(&ns, &url)
                    .map(|r| r.body)
                    .map_err(|e| format!("{e:#}"));
                out.push(Sample { started, result });
                std::thread::sleep(Duration::from_millis(20));
            }
            out
        });
        TrafficLoop { stop, handle }
    }

    pub(crate) fn finish(self) -> Result<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the traffic thread panicked"))
    }
}

/// Waits until the traffic loop's thread has seen `pod` answer (polls a shared flag via
/// plain requests of our own, since the loop's samples are only read at the end).
pub(crate) fn wait_for_pod(ns: &str, vip: Ipv4Addr, pod: &str, timeout: Duration) -> Result<()> {
    netns::wait_until(timeout, &format!("{pod} answering on {vip}"), || {
        Ok(e2e::http_get(ns, &format!("http://{vip}/"))?.body == pod)
    })
}

/// A TCP connect that must neither succeed nor be refused: the SYN is dropped.
pub(crate) fn assert_dropped(ns: &str, addr: Ipv4Addr, port: u16) -> Result<()> {
    let (res, took) = e2e::tcp_connect(ns, addr.into(), port)?;
    match res {
        Ok(()) => bail!("connected to {addr}:{port}; expected the SYN to be dropped"),
        Err(e) => ensure!(
            !e.contains("refused") && took >= Duration::from_millis(1900),
            "connect to {addr}:{port} ended after {took:?} with {e:?}; expected a timeout"
        ),
    }
    Ok(())
}

/// `curl` from `ns`: the HTTP status and the body.
pub(crate) fn curl_status(ns: &str, url: &str) -> Result<(u16, String)> {
    let out = netns::in_ns(ns, "curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", url])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("curl {url} in {ns}"))?;
    ensure!(
        out.status.success(),
        "curl {url} from {ns} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text
        .rsplit_once('\n')
        .context("curl output without a status")?;
    Ok((
        code.trim().parse().context("HTTP status")?,
        body.to_string(),
    ))
}

/// One ICMP echo from namespace `ns` to `dst` with `payload` bytes (over 1472 the kernel
/// sends it in fragments); waits 3 s for the matching reply. iputils' ping is not among
/// the packages the tests install, and a raw socket needs nothing else.
pub(crate) fn icmp_echo(ns: &str, dst: Ipv4Addr, payload: usize) -> Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let id = (std::process::id() as u16) ^ (payload as u16);
    netns::run_in_netns(ns, || -> Result<()> {
        // SAFETY: socket(2) with constant arguments; the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("raw ICMP socket");
        }
        // SAFETY: raw is a fresh, valid fd nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: 3,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a timeval of the right size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        let mut pkt = vec![8u8, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&1u16.to_be_bytes());
        pkt.extend((0..payload).map(|i| i as u8));
        let mut sum: u32 = pkt
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        pkt[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sendto with a buffer and a sockaddr_in of the stated sizes.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error()).context("sending the echo request");
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            // SAFETY: recv into a buffer of the stated size.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error()).context("no echo reply");
            }
            let got = &buf[..n as usize];
            let ihl = usize::from(got.first().copied().unwrap_or(0) & 0x0f) * 4;
            let Some(icmp) = got.get(ihl..) else { continue };
            if icmp.len() == 8 + payload && icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() {
                return Ok(());
            }
        }
        bail!("no echo reply within 3 s")
    })
    .with_context(|| format!("ICMP echo {ns} -> {dst}, {payload} bytes"))
}
