//! The node's network interfaces as the calling thread's network namespace sees them:
//! names and indexes (`if_nameindex(3)`), drivers (the ethtool ioctl), and what the
//! interface watcher reports about them ([`IfaceEvent`]).

use std::collections::BTreeMap;
use std::ffi::CStr;

use aya::programs::XdpMode;

use super::LoaderError;

/// The interface's kind as the ethtool driver name says (`veth`, `virtio_net`, ...).
pub fn driver_name(iface: &str) -> std::io::Result<String> {
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        // struct ifreq's union is 24 bytes on 64-bit targets.
        _pad: [u8; 16],
    }
    if iface.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: plain-old-data structs; all-zero is a valid value for both.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is ours; `req` points at `info`, both live until the call returns.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut req as *mut IfReq) };
    let e = std::io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(e);
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Every interface of the current network namespace: name → ifindex.
pub fn list_interfaces() -> std::io::Result<BTreeMap<String, u32>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, or NULL.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = BTreeMap::new();
    let mut p = head;
    // SAFETY: walking the array up to its terminator; freed once below.
    unsafe {
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.insert(name, (*p).if_index);
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    Ok(out)
}

/// What the watcher did to one interface.
#[derive(Debug)]
pub enum IfaceEvent {
    Attached {
        name: String,
        ifindex: u32,
        role: u32,
        mode: XdpMode,
        flags: u32,
        /// Native was refused and generic used instead (auto mode on an edge interface).
        fell_back: Option<String>,
    },
    /// Gone (or renumbered): its link and IFACES entry were dropped.
    Forgotten { name: String, ifindex: u32 },
    /// Attaching failed; not retried until the interface is recreated.
    Failed { name: String, error: LoaderError },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_and_not_a_veth() {
        let ifs = list_interfaces().expect("if_nameindex");
        assert_eq!(ifs.get("lo"), Some(&1));
        let d = driver_name("lo");
        assert!(
            !matches!(d.as_deref(), Ok("veth")),
            "lo reported as veth: {d:?}"
        );
    }

    #[test]
    fn missing_interface_has_no_driver() {
        assert!(driver_name("xdplb-nosuch0").is_err());
    }
}
