//! A namespace whose FIB and neighbours the forwarding tests control, and the IFACES
//! entries that tell the programs what an interface can take.

use crate::fixture::{Fixture, NEXT_FIXTURE};
use anyhow::ensure;
use aya::maps::{HashMap, MapData};
use lb_common::{IfaceInfo, MAP_IFACES};
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::atomic::Ordering,
};
use tests::netns::{run_in_netns, Netns};

/// A namespace with a veth pair: `in0` is the ingress the test run pretends to come from,
/// `out0` the egress the FIB picks for the backend subnet, with a permanent neighbour so
/// the lookup resolves MACs. Deleted on drop.
pub(crate) struct FibNetns {
    netns: Netns,
}

pub(crate) const FIB_BACKEND_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 10);
pub(crate) const FIB_BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x10);
pub(crate) const FIB_NEIGH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];

impl FibNetns {
    pub(crate) fn new() -> anyhow::Result<Self> {
        let n = NEXT_FIXTURE.fetch_add(1, Ordering::SeqCst);
        let name = format!("xdplbfx{}n{n}", std::process::id());
        let ns = FibNetns {
            netns: Netns::new(name)?,
        };
        let n = ns.name();
        for args in [
            vec![
                "-n", n, "link", "add", "in0", "type", "veth", "peer", "name", "out0",
            ],
            vec!["-n", n, "link", "set", "in0", "up"],
            vec!["-n", n, "link", "set", "out0", "up"],
            vec!["-n", n, "addr", "add", "198.18.200.1/24", "dev", "out0"],
            vec![
                "-n",
                n,
                "addr",
                "add",
                "2001:db8:200::1/64",
                "dev",
                "out0",
                "nodad",
            ],
            vec![
                "-n",
                n,
                "neigh",
                "add",
                "198.18.200.10",
                "lladdr",
                "02:00:00:00:00:aa",
                "dev",
                "out0",
                "nud",
                "permanent",
            ],
            vec![
                "-n",
                n,
                "neigh",
                "add",
                "2001:db8:200::10",
                "lladdr",
                "02:00:00:00:00:aa",
                "dev",
                "out0",
                "nud",
                "permanent",
            ],
        ] {
            tests::netns::ip(&args)?;
        }
        // bpf_fib_lookup answers FWD_DISABLED unless the namespace forwards.
        tests::netns::sysctl(n, "net.ipv4.ip_forward", "1")?;
        tests::netns::sysctl(n, "net.ipv6.conf.all.forwarding", "1")?;
        Ok(ns)
    }

    pub(crate) fn name(&self) -> &str {
        &self.netns.name
    }

    /// Runs `f` on a thread that entered the namespace, so the test run's ingress_ifindex
    /// and the FIB are the namespace's.
    pub(crate) fn enter<T: Send>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        run_in_netns(self.name(), f)
    }
}

pub(crate) fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(
        i != 0,
        "no interface {name}: {}",
        std::io::Error::last_os_error()
    );
    Ok(i)
}

pub(crate) fn set_iface(fx: &mut Fixture, ifindex: u32, flags: u32) -> anyhow::Result<()> {
    let mut m: HashMap<&mut MapData, u32, IfaceInfo> = HashMap::try_from(fx.map_mut(MAP_IFACES)?)?;
    m.insert(
        ifindex,
        IfaceInfo {
            role: lb_common::IFACE_ROLE_EDGE,
            flags,
        },
        0,
    )?;
    Ok(())
}
