//! XDP on interfaces: [`Attacher`] attaches `xdp_edge` to edge interfaces and `xdp_pod` to
//! pod interfaces, each through a bpf_link pinned under `<pin dir>/links/<ifindex>`, keeps
//! IFACES equal to what is attached, and follows interfaces coming and going.
//!
//! The mode is chosen per interface ([`ModeChoice`]): native on edges (generic when the
//! driver refuses), generic on pod veths. A pinned link outlives the agent, so a restarted
//! agent takes the links over ([`Attacher::adopt`]) and swaps its program in atomically
//! instead of detaching and re-attaching.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::Ebpf;
use lb_common::{
    IfaceInfo, IFACE_F_GENERIC, IFACE_F_REDIRECT_OK, IFACE_F_VETH, IFACE_ROLE_EDGE, IFACE_ROLE_POD,
    PROG_EDGE, PROG_POD,
};

use super::netdev::{driver_name, list_interfaces, IfaceEvent};
use super::LoaderError;
use crate::error_chain;
use crate::maps::Ifaces;

/// `--xdp-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ModeChoice {
    /// Native on edge interfaces (generic if the driver refuses), generic on pod veths.
    #[default]
    Auto,
    Native,
    Generic,
}

impl ModeChoice {
    /// The mode to attach in first on an interface of `role`.
    fn first_mode(self, role: u32) -> XdpMode {
        match (self, role) {
            (ModeChoice::Generic, _) => XdpMode::Skb,
            (ModeChoice::Native, _) => XdpMode::Driver,
            // Pod veths get generic XDP so XDP_TX and redirects out of them keep the skb
            // path (see docs/architecture.md, "when redirecting is safe").
            (ModeChoice::Auto, r) if r == IFACE_ROLE_POD => XdpMode::Skb,
            (ModeChoice::Auto, _) => XdpMode::Driver,
        }
    }
}

struct Attached {
    ifindex: u32,
    program: &'static str,
    link: XdpLinkId,
    /// Where the link is pinned (`<pin dir>/links/<ifindex>`): a pinned XDP link stays
    /// attached after the agent exits, and the next agent swaps its program in.
    pin: PathBuf,
    role: u32,
    mode: XdpMode,
}

/// Directory under the pin directory holding the XDP links.
pub const LINKS_DIR: &str = "links";

/// Attaches `xdp_edge` to the edge interfaces and `xdp_pod` to interfaces matching the pod
/// patterns, keeps IFACES equal to what is attached, and follows interfaces coming and
/// going ([`Attacher::sync`]).
pub struct Attacher {
    ebpf: Ebpf,
    ifaces: Ifaces,
    links_dir: PathBuf,
    mode: ModeChoice,
    edge: Vec<String>,
    pod: Vec<glob::Pattern>,
    attached: BTreeMap<String, Attached>,
    /// (name, ifindex) that failed to attach: not retried every poll.
    failed: BTreeMap<String, u32>,
}

impl Attacher {
    /// `pin_dir` is where the maps are pinned; the XDP links are pinned under
    /// `pin_dir/links`.
    pub fn new(
        ebpf: Ebpf,
        ifaces: Ifaces,
        pin_dir: &Path,
        edge: Vec<String>,
        pod_patterns: &[String],
        mode: ModeChoice,
    ) -> Result<Self, LoaderError> {
        let links_dir = pin_dir.join(LINKS_DIR);
        std::fs::create_dir_all(&links_dir).map_err(|source| LoaderError::PinDir {
            path: links_dir.clone(),
            source,
        })?;
        let pod = pod_patterns
            .iter()
            .map(|p| {
                glob::Pattern::new(p).map_err(|source| LoaderError::Pattern {
                    pattern: p.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            ebpf,
            ifaces,
            links_dir,
            mode,
            edge,
            pod,
            attached: BTreeMap::new(),
            failed: BTreeMap::new(),
        })
    }

    /// The first sync: every edge interface must exist and attach; IFACES entries left by
    /// a previous agent for interfaces not attached now are removed.
    pub fn start(&mut self) -> Result<Vec<IfaceEvent>, LoaderError> {
        let present = list_interfaces().map_err(|e| LoaderError::NoSuchInterface {
            name: format!("<listing interfaces: {e}>"),
        })?;
        for e in &self.edge {
            if !present.contains_key(e) {
                return Err(LoaderError::NoSuchInterface { name: e.clone() });
            }
        }
        let mut events = Vec::new();
        for ev in self.sync_with(&present) {
            match ev {
                IfaceEvent::Failed { name, error } if self.edge.contains(&name) => {
                    // Leave no IFACES entries behind for the interfaces attached so far.
                    if let Err(e) = self.detach_all() {
                        tracing::warn!("cleaning up after a failed start: {}", error_chain(&e));
                    }
                    return Err(error);
                }
                ev => events.push(ev),
            }
        }
        let ours: Vec<u32> = self.attached.values().map(|a| a.ifindex).collect();
        for e in self.ifaces.list()? {
            if !ours.contains(&e.ifindex) {
                self.ifaces.remove(e.ifindex)?;
            }
        }
        // Links a previous agent left on interfaces this one does not serve (gone, or no
        // longer configured): removing the pin detaches them.
        if let Ok(dir) = std::fs::read_dir(&self.links_dir) {
            for entry in dir.flatten() {
                let keep = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|i| ours.contains(&i));
                if !keep {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(events)
    }

    /// Attaches newly appeared matching interfaces and forgets vanished ones.
    pub fn sync(&mut self) -> Vec<IfaceEvent> {
        match list_interfaces() {
            Ok(present) => self.sync_with(&present),
            Err(e) => vec![IfaceEvent::Failed {
                name: "<all>".into(),
                error: LoaderError::NoSuchInterface {
                    name: format!("<listing interfaces: {e}>"),
                },
            }],
        }
    }

    fn role_of(&self, name: &str) -> Option<u32> {
        if self.edge.iter().any(|e| e == name) {
            Some(IFACE_ROLE_EDGE)
        } else if self.pod.iter().any(|p| p.matches(name)) {
            Some(IFACE_ROLE_POD)
        } else {
            None
        }
    }

    fn sync_with(&mut self, present: &BTreeMap<String, u32>) -> Vec<IfaceEvent> {
        let mut events = Vec::new();
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|(n, a)| present.get(*n) != Some(&a.ifindex))
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            if let Some(a) = self.attached.remove(&name) {
                let ifindex = a.ifindex;
                self.drop_link(a);
                if let Err(e) = self.ifaces.remove(ifindex) {
                    events.push(IfaceEvent::Failed {
                        name: name.clone(),
                        error: e.into(),
                    });
                }
                events.push(IfaceEvent::Forgotten { name, ifindex });
            }
        }
        self.failed.retain(|n, idx| present.get(n) == Some(idx));
        for (name, &ifindex) in present {
            if self.attached.contains_key(name) || self.failed.get(name) == Some(&ifindex) {
                continue;
            }
            let Some(role) = self.role_of(name) else {
                continue;
            };
            match self.attach(name, ifindex, role) {
                Ok(ev) => events.push(ev),
                Err(error) => {
                    self.failed.insert(name.clone(), ifindex);
                    events.push(IfaceEvent::Failed {
                        name: name.clone(),
                        error,
                    });
                }
            }
        }
        events
    }

    fn attach(&mut self, name: &str, ifindex: u32, role: u32) -> Result<IfaceEvent, LoaderError> {
        let program = program_for(role);
        let veth = driver_name(name).is_ok_and(|d| d == "veth");
        let pin = self.links_dir.join(ifindex.to_string());
        if pin.exists() {
            if let Some(ev) = self.reuse_pinned_link(name, ifindex, role, program, &pin) {
                return Ok(ev);
            }
        }
        let first = self.mode.first_mode(role);
        // IFACES first: the program must never run on an interface it has no entry for.
        self.ifaces.set(
            ifindex,
            IfaceInfo {
                role,
                flags: iface_flags(veth, role, first),
            },
        )?;
        let attempt = self.attach_with_fallback(program, ifindex, role, veth, first)?;
        let mode = attempt.mode;
        let link = match attempt
            .result
            .and_then(|id| self.pin_link(program, id, &pin))
        {
            Ok(l) => l,
            Err(source) => {
                let _ = self.ifaces.remove(ifindex);
                return Err(LoaderError::Attach {
                    program,
                    iface: name.to_owned(),
                    ifindex,
                    mode,
                    source: Box::new(source),
                });
            }
        };
        self.attached.insert(
            name.to_owned(),
            Attached {
                ifindex,
                program,
                link,
                pin,
                role,
                mode,
            },
        );
        Ok(IfaceEvent::Attached {
            name: name.to_owned(),
            ifindex,
            role,
            mode,
            flags: iface_flags(veth, role, mode),
            fell_back: attempt.fell_back,
        })
    }

    /// The link a previous agent pinned at `pin`, taken over if it fits (see
    /// [`Attacher::adopt`]); otherwise the pin is removed so that a new link can take its
    /// place.
    fn reuse_pinned_link(
        &mut self,
        name: &str,
        ifindex: u32,
        role: u32,
        program: &'static str,
        pin: &Path,
    ) -> Option<IfaceEvent> {
        match self.adopt(name, ifindex, role, program, pin) {
            Ok(Some(ev)) => return Some(ev),
            Ok(None) => {}
            Err(e) => tracing::info!(
                iface = name,
                "not reusing the pinned link ({}), attaching anew",
                error_chain(&e)
            ),
        }
        // Removing the pin drops the old link (and its program) once our fd is closed.
        let _ = std::fs::remove_file(pin);
        None
    }

    /// Attaches `program` to `ifindex` in mode `first`. In auto mode a native attach the
    /// driver refuses is retried in generic mode, its IFACES entry rewritten first.
    fn attach_with_fallback(
        &mut self,
        program: &'static str,
        ifindex: u32,
        role: u32,
        veth: bool,
        first: XdpMode,
    ) -> Result<AttachAttempt, LoaderError> {
        let result = xdp_mut(&mut self.ebpf, program)?.attach_to_if_index(ifindex, first);
        match result {
            Err(e) if self.mode == ModeChoice::Auto && first == XdpMode::Driver => {
                let mode = XdpMode::Skb;
                self.ifaces.set(
                    ifindex,
                    IfaceInfo {
                        role,
                        flags: iface_flags(veth, role, mode),
                    },
                )?;
                Ok(AttachAttempt {
                    result: xdp_mut(&mut self.ebpf, program)?.attach_to_if_index(ifindex, mode),
                    mode,
                    fell_back: Some(error_chain(&e)),
                })
            }
            result => Ok(AttachAttempt {
                result,
                mode: first,
                fell_back: None,
            }),
        }
    }

    fn drop_link(&mut self, a: Attached) {
        if let Ok(p) = xdp_mut(&mut self.ebpf, a.program) {
            // The link of a deleted interface is already gone in the kernel; detaching it
            // only releases our handle, so an error here says nothing useful.
            if let Err(e) = p.detach(a.link) {
                tracing::debug!(ifindex = a.ifindex, error = %error_chain(&e), "detach");
            }
        }
        let _ = std::fs::remove_file(&a.pin);
    }

    /// Pins a freshly attached link and hands it back to the program (which keeps
    /// managing it by id): `take_link` is the only way to reach the link's fd.
    fn pin_link(
        &mut self,
        program: &'static str,
        id: XdpLinkId,
        pin: &Path,
    ) -> Result<XdpLinkId, ProgramError> {
        use aya::programs::links::FdLink;
        use aya::programs::xdp::XdpLink;
        let p = xdp_mut(&mut self.ebpf, program).map_err(|_| ProgramError::NotLoaded)?;
        let link = p.take_link(id)?;
        // Only bpf_link attachments (kernel >= 5.9) can be pinned; a netlink attachment
        // fails here and the caller reports it.
        let fd = FdLink::try_from(link).map_err(|e| match e {
            aya::programs::links::LinkError::InvalidLink => ProgramError::UnexpectedProgramType,
            e => ProgramError::IOError(std::io::Error::other(e.to_string())),
        })?;
        let pinned = fd
            .pin(pin)
            .map_err(|e| ProgramError::IOError(std::io::Error::other(e.to_string())))?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .map_err(|e| ProgramError::IOError(std::io::Error::other(e.to_string())))?;
        // Re-attaching the same program through the link (an atomic no-op swap) puts it
        // back under the program's management.
        p.attach_to_link(link)
    }

    /// Takes over the link a previous agent pinned for `ifindex`: the new program is
    /// swapped in atomically (`bpf_link_update`), so packets never see the interface
    /// without a program. `None` when the pinned link is not one to reuse (another
    /// role, or no IFACES entry telling its mode).
    fn adopt(
        &mut self,
        name: &str,
        ifindex: u32,
        role: u32,
        program: &'static str,
        pin: &Path,
    ) -> Result<Option<IfaceEvent>, LoaderError> {
        use aya::programs::links::{FdLink, PinnedLink};
        use aya::programs::xdp::XdpLink;
        let Some(prev) = self
            .ifaces
            .list()?
            .into_iter()
            .find(|e| e.ifindex == ifindex)
        else {
            return Ok(None);
        };
        if prev.role != role {
            return Ok(None);
        }
        let mode = if prev.flags & IFACE_F_GENERIC != 0 {
            XdpMode::Skb
        } else {
            XdpMode::Driver
        };
        // A link keeps the mode it was created with: reuse it only if this agent would
        // have chosen that mode (auto accepts generic on an edge: the driver's fallback).
        let wanted = match (self.mode, role) {
            (ModeChoice::Generic, _) => Some(XdpMode::Skb),
            (ModeChoice::Native, _) => Some(XdpMode::Driver),
            (ModeChoice::Auto, r) if r == IFACE_ROLE_POD => Some(XdpMode::Skb),
            (ModeChoice::Auto, _) => None,
        };
        if wanted.is_some_and(|w| w != mode) {
            return Ok(None);
        }
        let err = |e: String| LoaderError::Attach {
            program,
            iface: name.to_owned(),
            ifindex,
            mode,
            source: Box::new(ProgramError::IOError(std::io::Error::other(e))),
        };
        let pinned = PinnedLink::from_pin(pin).map_err(|e| err(e.to_string()))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| err(e.to_string()))?;
        // Fails on a link whose interface is gone (the kernel detached it).
        let link = xdp_mut(&mut self.ebpf, program)?
            .attach_to_link(link)
            .map_err(|e| err(error_chain(&e)))?;
        self.attached.insert(
            name.to_owned(),
            Attached {
                ifindex,
                program,
                link,
                pin: pin.to_owned(),
                role,
                mode,
            },
        );
        Ok(Some(IfaceEvent::Attached {
            name: name.to_owned(),
            ifindex,
            role,
            mode,
            flags: prev.flags,
            fell_back: None,
        }))
    }

    /// Lets go of every interface without detaching: the pinned links keep the programs
    /// (and the IFACES entries they read) in place, so traffic keeps being balanced with
    /// the maps as they are until the next agent takes the links over.
    pub fn release(self) {
        let n = self.attached.len();
        drop(self);
        tracing::debug!(links = n, "released the XDP links (they stay pinned)");
    }

    /// `name (ifindex, role, mode)` of every attached interface.
    pub fn attached(&self) -> Vec<String> {
        self.attached
            .iter()
            .map(|(n, a)| {
                format!(
                    "{n} ({}, {})",
                    if a.role == IFACE_ROLE_EDGE {
                        "edge"
                    } else {
                        "pod"
                    },
                    if a.mode == XdpMode::Skb {
                        "generic"
                    } else {
                        "native"
                    }
                )
            })
            .collect()
    }

    /// Detaches every program and removes the IFACES entries; the maps stay pinned.
    pub fn detach_all(&mut self) -> Result<(), LoaderError> {
        let all = std::mem::take(&mut self.attached);
        let mut first_err = None;
        for (_, a) in all {
            if let Ok(p) = xdp_mut(&mut self.ebpf, a.program) {
                if let Err(source) = p.detach(a.link) {
                    first_err.get_or_insert(LoaderError::Program {
                        program: a.program,
                        source: Box::new(source),
                    });
                }
            }
            if let Err(e) = std::fs::remove_file(&a.pin) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    first_err.get_or_insert(LoaderError::PinDir {
                        path: a.pin.clone(),
                        source: e,
                    });
                }
            }
            if let Err(e) = self.ifaces.remove(a.ifindex) {
                first_err.get_or_insert(e.into());
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// What [`Attacher::attach_with_fallback`] did.
struct AttachAttempt {
    result: Result<XdpLinkId, ProgramError>,
    /// The mode of the last attempt.
    mode: XdpMode,
    /// Why native mode was refused, when generic was used instead.
    fell_back: Option<String>,
}

/// The program for interfaces of `role`.
fn program_for(role: u32) -> &'static str {
    if role == IFACE_ROLE_EDGE {
        PROG_EDGE
    } else {
        PROG_POD
    }
}

/// The IFACES flags of an interface of `role` attached in `mode`.
fn iface_flags(veth: bool, role: u32, mode: XdpMode) -> u32 {
    let mut flags = 0;
    if veth {
        flags |= IFACE_F_VETH;
    }
    if mode == XdpMode::Skb {
        flags |= IFACE_F_GENERIC;
    }
    // Redirects into an interface only from native XDP on an edge: see
    // docs/architecture.md, "when redirecting is safe".
    if role == IFACE_ROLE_EDGE && mode == XdpMode::Driver {
        flags |= IFACE_F_REDIRECT_OK;
    }
    flags
}

/// The loaded object's XDP program `program`.
pub(super) fn xdp_mut<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut Xdp, LoaderError> {
    ebpf.program_mut(program)
        .ok_or(LoaderError::MissingProgram { program })?
        .try_into()
        .map_err(|source| LoaderError::Program {
            program,
            source: Box::new(source),
        })
}
