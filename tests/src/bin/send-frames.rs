//! `send-frames <iface> <hex frame>...`: writes raw Ethernet frames, exactly as given, out
//! of `iface` through an AF_PACKET socket. The e2e tests run it inside the client
//! namespace (`ip netns exec`) to send malformed packets no socket API would build.

use anyhow::{bail, Context as _, Result};

fn parse_hex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd number of hex digits in {s:?}");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16).with_context(|| format!("bad hex at {i} in {s:?}"))
        })
        .collect()
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let iface = args
        .next()
        .context("usage: send-frames <iface> <hex frame>...")?;
    let frames: Vec<Vec<u8>> = args.map(|a| parse_hex(&a)).collect::<Result<_>>()?;
    let c_iface = std::ffi::CString::new(iface.clone()).context("interface name")?;
    // SAFETY: c_iface is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c_iface.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("no interface {iface}"));
    }
    // Protocol 0: the socket only sends, it never receives.
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: fd was just returned by socket(2) and is owned here alone.
    let _fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = i32::try_from(ifindex).context("ifindex out of range")?;
    addr.sll_halen = 6;
    for (i, frame) in frames.iter().enumerate() {
        if frame.len() < 14 {
            bail!("frame {i} is shorter than an Ethernet header");
        }
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and addr outlive the call; lengths are theirs.
        let n = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sending frame {i}"));
        }
        if n as usize != frame.len() {
            bail!("frame {i}: sent {n} of {} bytes", frame.len());
        }
    }
    println!("sent {} frames on {iface}", frames.len());
    Ok(())
}
