//! The attacher against the kernel (root): attaching by role in a network namespace of the
//! test's own, following pod interfaces, handing the links over to a restarted agent and
//! detaching, with IFACES checked after each step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lb_common::{
    IFACE_F_GENERIC, IFACE_F_REDIRECT_OK, IFACE_F_VETH, IFACE_ROLE_EDGE, IFACE_ROLE_POD,
};

use super::{list_interfaces, load, Attacher, IfaceEvent, ModeChoice, LINKS_DIR};
use crate::maps::Ifaces;

/// A network namespace of this test's own, deleted with its interfaces on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let st = std::process::Command::new("ip").args(args).status()?;
    anyhow::ensure!(st.success(), "ip {args:?}: {st}");
    Ok(())
}

/// Moves the calling thread into the namespace (setns affects this thread only).
fn enter(ns: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns on an fd we own; CLONE_NEWNET switches only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    anyhow::ensure!(rc == 0, "setns: {}", std::io::Error::last_os_error());
    Ok(())
}

fn entry(ifaces: &Ifaces, ifindex: u32) -> anyhow::Result<Option<(u32, u32)>> {
    Ok(ifaces
        .list()?
        .into_iter()
        .find(|e| e.ifindex == ifindex)
        .map(|e| (e.role, e.flags)))
}

/// Interface name -> (XDP mode, program id) from `ip -j -d link show`, in the calling
/// thread's namespace.
fn xdp_progs() -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-d", "link", "show"])
        .output()?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut m = BTreeMap::new();
    for l in links.as_array().into_iter().flatten() {
        let (Some(name), Some(xdp)) = (l["ifname"].as_str(), l.get("xdp")) else {
            continue;
        };
        let mode = xdp["mode"].as_u64().unwrap_or(0);
        let id = xdp["prog"]["id"].as_u64().unwrap_or(0);
        m.insert(name.to_owned(), (mode, id));
    }
    Ok(m)
}

/// Namespace `name` with an edge veth (e0), a bridge (br0, which refuses native XDP) and a
/// pod veth (lxc1), all up, deleted when the result drops.
fn namespace_with_interfaces(name: &str) -> anyhow::Result<Netns> {
    ip(&["netns", "add", name])?;
    let ns = Netns(name.to_owned());
    ip(&[
        "-n", name, "link", "add", "e0", "type", "veth", "peer", "name", "p-e0",
    ])?;
    ip(&["-n", name, "link", "add", "br0", "type", "bridge"])?;
    ip(&[
        "-n", name, "link", "add", "lxc1", "type", "veth", "peer", "name", "p-lxc1",
    ])?;
    for dev in ["e0", "p-e0", "br0", "lxc1", "p-lxc1"] {
        ip(&["-n", name, "link", "set", dev, "up"])?;
    }
    Ok(ns)
}

/// A freshly loaded object's attacher: e0 and br0 as edges, `lxc*` as pods, auto mode.
fn attacher(pin_dir: &Path) -> anyhow::Result<Attacher> {
    let loaded = load(crate::EBPF_OBJ, pin_dir, false)?;
    Ok(Attacher::new(
        loaded.ebpf,
        loaded.ifaces,
        pin_dir,
        vec!["e0".into(), "br0".into()],
        &["lxc*".into()],
        ModeChoice::Auto,
    )?)
}

/// The first start attaches all three interfaces, each with the flags of its role and
/// mode, and leaves the pod veth's peer alone. Returns the ifindexes of e0 and lxc1.
fn check_first_start(att: &mut Attacher, reader: &Ifaces) -> anyhow::Result<(u32, u32)> {
    let events = att.start()?;
    assert_eq!(events.len(), 3, "{events:?}");
    let idx = list_interfaces()?;
    let e0 = idx["e0"];
    let br0 = idx["br0"];
    let lxc1 = idx["lxc1"];
    assert_eq!(
        entry(reader, e0)?,
        Some((IFACE_ROLE_EDGE, IFACE_F_VETH | IFACE_F_REDIRECT_OK)),
        "veth edge: native"
    );
    assert_eq!(
        entry(reader, br0)?,
        Some((IFACE_ROLE_EDGE, IFACE_F_GENERIC)),
        "a bridge refuses native XDP: generic, not a veth, no redirects into it"
    );
    assert_eq!(
        entry(reader, lxc1)?,
        Some((IFACE_ROLE_POD, IFACE_F_VETH | IFACE_F_GENERIC)),
    );
    assert!(idx.contains_key("p-lxc1") && entry(reader, idx["p-lxc1"])?.is_none());
    Ok((e0, lxc1))
}

/// A new pod interface is attached on the next sync, a deleted one forgotten.
fn check_pod_interfaces_followed(
    att: &mut Attacher,
    reader: &Ifaces,
    lxc1: u32,
) -> anyhow::Result<()> {
    ip(&[
        "link", "add", "lxc2", "type", "veth", "peer", "name", "p-lxc2",
    ])?;
    let ev = att.sync();
    assert!(
        matches!(ev.as_slice(), [IfaceEvent::Attached { name, .. }] if name == "lxc2"),
        "{ev:?}"
    );
    let lxc2 = list_interfaces()?["lxc2"];
    assert!(entry(reader, lxc2)?.is_some());

    ip(&["link", "del", "lxc1"])?;
    let ev = att.sync();
    assert!(
        matches!(ev.as_slice(), [IfaceEvent::Forgotten { name, .. }] if name == "lxc1"),
        "{ev:?}"
    );
    assert!(entry(reader, lxc1)?.is_none());
    assert!(att.sync().is_empty(), "nothing changed");
    Ok(())
}

/// Hand-over: the agent lets go (`--on-exit keep`), the programs stay attached through
/// their pinned links; the next agent swaps its programs in, same interfaces and modes.
fn check_handover(
    att: Attacher,
    reader: &Ifaces,
    pin_dir: &Path,
    e0: u32,
) -> anyhow::Result<Attacher> {
    let before = xdp_progs()?;
    assert_eq!(before.len(), 3, "{before:?}");
    att.release();
    assert_eq!(xdp_progs()?, before, "still attached after release");
    let mut att = attacher(pin_dir)?;
    let events = att.start()?;
    assert_eq!(events.len(), 3, "{events:?}");
    let after = xdp_progs()?;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the same interfaces"
    );
    for (dev, (mode, id)) in &after {
        let (old_mode, old_id) = &before[dev];
        assert_eq!(mode, old_mode, "{dev} keeps its mode");
        assert_ne!(id, old_id, "{dev} runs the new agent's program");
    }
    assert_eq!(
        entry(reader, e0)?,
        Some((IFACE_ROLE_EDGE, IFACE_F_VETH | IFACE_F_REDIRECT_OK)),
    );
    assert_eq!(std::fs::read_dir(pin_dir.join(LINKS_DIR))?.count(), 3);
    Ok(att)
}

/// Root only: attaches in a namespace of its own and checks IFACES after each step.
#[test]
fn attaches_by_role_and_follows_pod_interfaces() -> anyhow::Result<()> {
    let name = format!("xdplb-ld-{}", std::process::id());
    let pin = PinDir(PathBuf::from(format!("/sys/fs/bpf/{name}")));
    let _ns = namespace_with_interfaces(&name)?;

    let ns = name.clone();
    let pin_dir = pin.0.clone();
    // A thread of its own, so the test harness' thread never changes namespace.
    std::thread::spawn(move || -> anyhow::Result<()> {
        enter(&ns)?;
        let mut att = attacher(&pin_dir)?;
        let reader = Ifaces::open_pinned(&pin_dir)?;
        let (e0, lxc1) = check_first_start(&mut att, &reader)?;
        check_pod_interfaces_followed(&mut att, &reader, lxc1)?;
        let mut att = check_handover(att, &reader, &pin_dir, e0)?;

        att.detach_all()?;
        assert!(reader.list()?.is_empty(), "IFACES emptied on detach");
        assert_eq!(
            std::fs::read_dir(pin_dir.join(LINKS_DIR))?.count(),
            0,
            "link pins removed on detach"
        );
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("test thread panicked"))??;
    // Detached for real: no XDP program left on any interface.
    let out = std::process::Command::new("ip")
        .args(["-n", &name, "-d", "link", "show"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("prog/xdp"), "{text}");
    Ok(())
}
