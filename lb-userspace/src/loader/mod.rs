//! Loading the XDP object with pinned maps, attaching the programs to interfaces, and
//! keeping IFACES in step with what is attached.
//!
//! Interfaces are listed with `if_nameindex(3)` and inspected with ioctls, both of which
//! answer for the calling thread's network namespace. `/sys/class/net` is avoided on
//! purpose: it describes the namespace of whoever mounted sysfs, which is not ours when the
//! agent is started with `nsenter --net` (as it must be to share the node's bpffs).

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use lb_common::{
    IfaceInfo, ALL_MAPS, IFACE_F_GENERIC, IFACE_F_REDIRECT_OK, IFACE_F_VETH, IFACE_ROLE_EDGE,
    IFACE_ROLE_POD, MAGLEV_MIN_SIZE, MAGLEV_SLOTS, MAP_AFFINITY, MAP_BACKENDS, MAP_BE_META,
    MAP_BE_STATS, MAP_CT, MAP_MAGLEV, MAP_RNAT, MAP_SERVICES, MAP_SRC_RANGES, MAP_SVC_META,
    MAP_SVC_STATS, MAP_VIPS, MAX_AFFINITY, MAX_BACKENDS, MAX_FLOWS, MAX_FRONTENDS, MAX_SERVICES,
    MAX_SRC_RANGES, MAX_VIPS, PROG_EDGE, PROG_POD, SOCK_NETNS_GLOBAL, SOCK_PROGRAMS,
};

use crate::error_chain;
use crate::maps::{Ifaces, LbMaps, MapError};
use crate::reconciler::Limits;

/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xdplb";

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("reading /proc/mounts")]
    ReadMounts(#[source] std::io::Error),
    #[error("mounting bpffs at {}", path.display())]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating pin directory {}", path.display())]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the BPF object (pin directory {})", pin_dir.display())]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error(
        "pinned map {} was created by an incompatible xdplb version or with other map \
         capacities (--max-* flags): it has key size {}, value size {}, {} entries; this \
         agent needs {}, {}, {}. Start with the capacities it was made with, or remove {} \
         to start afresh (services are rewritten at once; tracked flows and counters are \
         lost)",
        path.display(), found.0, found.1, found.2, wanted.0, wanted.1, wanted.2,
        pin_dir.display()
    )]
    IncompatiblePin {
        path: PathBuf,
        pin_dir: PathBuf,
        /// (key size, value size, max entries)
        found: (u32, u32, u32),
        wanted: (u32, u32, u32),
    },
    #[error("reading pinned map {}", path.display())]
    ReadPin {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("parsing the BPF object")]
    Parse(#[source] Box<aya_obj::ParseError>),
    #[error("program {program} is not in the BPF object")]
    MissingProgram { program: &'static str },
    #[error("program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("map capacities")]
    Capacity(#[from] CapacityError),
    #[error("interface {name} does not exist")]
    NoSuchInterface { name: String },
    #[error("attaching {program} to {iface} (ifindex {ifindex}) in {mode:?} mode")]
    Attach {
        program: &'static str,
        iface: String,
        ifindex: u32,
        mode: XdpMode,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("invalid interface pattern {pattern:?}")]
    Pattern {
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
    #[error("aya-log")]
    Log(#[source] aya_log::Error),
    #[error("reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+)")]
    NetnsCookie(#[source] std::io::Error),
    #[error("cgroup v2 hierarchy at {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no cgroup v2 hierarchy found (looked at {}); mount one (`mount -t cgroup2 none \
         /sys/fs/cgroup/unified`) or name it with --cgroup-root",
        looked.join(", ")
    )]
    NoCgroup2 { looked: Vec<String> },
    #[error("attaching {program} to cgroup {}", cgroup.display())]
    AttachCgroup {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
}

/// Is `path` a bpffs mount point according to /proc/mounts?
pub fn is_bpffs(path: &Path) -> Result<bool, LoaderError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(LoaderError::ReadMounts)?;
    let want = path.to_string_lossy();
    Ok(mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_dev, mnt, fstype) = (f.next(), f.next(), f.next());
        mnt == Some(&*want) && fstype == Some("bpf")
    }))
}

/// Mounts bpffs at `path` unless it is mounted there. Returns true if it mounted it.
pub fn ensure_bpffs(path: &Path) -> Result<bool, LoaderError> {
    if is_bpffs(path)? {
        return Ok(false);
    }
    let err = |source| LoaderError::MountBpffs {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    let target = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call;
    // bpffs takes no mount data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(true)
}

/// Map capacities chosen when the object is loaded (`EbpfLoader::set_max_entries`), so a
/// small node does not preallocate for 65,536 services and a big one is not capped by
/// them. The defaults are the sizes in lb-common's definitions. The data path never uses
/// these as bounds (the kernel bounds-checks every array lookup), so only the maps and
/// the reconciler's allocators ([`Capacities::limits`]) need to agree on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// SERVICES entries: (address, port, protocol) frontends.
    pub frontends: u32,
    /// Service-port ids (SVC_STATS, SVC_META).
    pub services: u32,
    /// Backend ids (BACKENDS, BE_STATS, BE_META).
    pub backends: u32,
    /// MAGLEV slots of all service ports together.
    pub maglev_slots: u32,
    /// CT and RNAT entries each.
    pub flows: u32,
    /// Distinct VIP addresses (VIPS).
    pub vips: u32,
    /// AFFINITY entries.
    pub affinity: u32,
    /// SRC_RANGES prefixes.
    pub src_ranges: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            frontends: MAX_FRONTENDS,
            services: MAX_SERVICES,
            backends: MAX_BACKENDS,
            maglev_slots: MAGLEV_SLOTS,
            flows: MAX_FLOWS,
            vips: MAX_VIPS,
            affinity: MAX_AFFINITY,
            src_ranges: MAX_SRC_RANGES,
        }
    }
}

/// Upper bounds [`Capacities::validate`] accepts: well above any cluster's needs, low
/// enough that a typo (an extra zero or two) fails with a message instead of an ENOMEM or
/// an agent that preallocates gigabytes. (MAGLEV at the bound is 2 GiB: 8 bytes a slot.)
pub const MAX_CAPACITY_IDS: u32 = 1 << 22;
pub const MAX_CAPACITY_FLOWS: u32 = 1 << 25;
pub const MAX_CAPACITY_MAGLEV_SLOTS: u32 = 1 << 28;

/// A capacity out of range.
#[derive(Debug, thiserror::Error)]
#[error("{what} = {value} is out of range ({min}..={max})")]
pub struct CapacityError {
    pub what: &'static str,
    pub value: u32,
    pub min: u32,
    pub max: u32,
}

impl Capacities {
    /// Every capacity within its range: non-zero, and MAGLEV at least one smallest table.
    pub fn validate(&self) -> Result<(), CapacityError> {
        let checks = [
            ("frontends", self.frontends, 1, MAX_CAPACITY_IDS),
            ("services", self.services, 1, MAX_CAPACITY_IDS),
            ("backends", self.backends, 1, MAX_CAPACITY_IDS),
            (
                "maglev slots",
                self.maglev_slots,
                MAGLEV_MIN_SIZE,
                MAX_CAPACITY_MAGLEV_SLOTS,
            ),
            ("flows", self.flows, 1, MAX_CAPACITY_FLOWS),
            ("vips", self.vips, 1, MAX_CAPACITY_IDS),
            ("affinity", self.affinity, 1, MAX_CAPACITY_FLOWS),
            ("source ranges", self.src_ranges, 1, MAX_CAPACITY_IDS),
        ];
        for (what, value, min, max) in checks {
            if !(min..=max).contains(&value) {
                return Err(CapacityError {
                    what,
                    value,
                    min,
                    max,
                });
            }
        }
        Ok(())
    }

    /// The configured size of map `name`, `None` for maps of fixed size (REASONS, IFACES,
    /// SOCK_RNAT keep their definition's).
    pub fn max_entries(&self, name: &str) -> Option<u32> {
        Some(match name {
            MAP_SERVICES => self.frontends,
            MAP_VIPS => self.vips,
            MAP_BACKENDS | MAP_BE_STATS | MAP_BE_META => self.backends,
            MAP_MAGLEV => self.maglev_slots,
            MAP_CT | MAP_RNAT => self.flows,
            MAP_SVC_STATS | MAP_SVC_META => self.services,
            MAP_AFFINITY => self.affinity,
            MAP_SRC_RANGES => self.src_ranges,
            _ => return None,
        })
    }

    /// The reconciler's allocator bounds for maps of these sizes.
    pub fn limits(&self) -> Limits {
        Limits {
            services: self.services,
            backends: self.backends,
            maglev_slots: self.maglev_slots,
            frontends: self.frontends,
            vips: self.vips,
            src_ranges: self.src_ranges,
        }
    }

    fn apply(&self, loader: &mut EbpfLoader<'_>) {
        for name in ALL_MAPS {
            if let Some(n) = self.max_entries(name) {
                loader.map_max_entries(name, n);
            }
        }
    }
}

/// A loaded object: its programs, the maps the reconciler uses and IFACES.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub maps: LbMaps,
    pub ifaces: Ifaces,
    /// Present with `debug`: forwards the programs' aya-log records to `log` (and so to
    /// tracing); call `flush` when its fd is readable.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// [`load_with`] the default capacities.
pub fn load(obj: &[u8], pin_dir: &Path, debug: bool) -> Result<Loaded, LoaderError> {
    load_with(obj, pin_dir, debug, &Capacities::default())
}

/// Mounts bpffs if needed, creates `pin_dir` and loads `obj` with every map pinned under
/// it, sized by `caps`: maps already pinned there (a previous agent's) are reused, so live
/// flows, services and counters survive a restart; pins of other sizes are refused.
pub fn load_with(
    obj: &[u8],
    pin_dir: &Path,
    debug: bool,
    caps: &Capacities,
) -> Result<Loaded, LoaderError> {
    caps.validate()?;
    ensure_bpffs(Path::new(BPFFS))?;
    std::fs::create_dir_all(pin_dir).map_err(|source| LoaderError::PinDir {
        path: pin_dir.to_owned(),
        source,
    })?;
    check_pins(obj, pin_dir, caps)?;
    let debug_flag: u8 = debug.into();
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(pin_dir)
        .override_global("DEBUG", &debug_flag, true);
    caps.apply(&mut loader);
    // Pin every map by name even if its definition forgot `pinned`: an unpinned map would
    // silently lose its contents on restart.
    for name in ALL_MAPS {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    let mut ebpf = loader.load(obj).map_err(|source| LoaderError::Load {
        pin_dir: pin_dir.to_owned(),
        source: Box::new(source),
    })?;
    let logger = if debug {
        Some(aya_log::EbpfLogger::init(&mut ebpf).map_err(LoaderError::Log)?)
    } else {
        None
    };
    for program in [PROG_EDGE, PROG_POD] {
        xdp_mut(&mut ebpf, program)?
            .load()
            .map_err(|source| LoaderError::Program {
                program,
                source: Box::new(source),
            })?;
    }
    let maps = LbMaps::from_ebpf(&mut ebpf)?;
    let ifaces = Ifaces::from_ebpf(&mut ebpf)?;
    Ok(Loaded {
        ebpf,
        maps,
        ifaces,
        logger,
    })
}

/// aya reuses a pinned map by name without comparing it with the object's definition, and a
/// pin left by an older version (a smaller value type, fewer reason counters) would then be
/// shared with programs that read past its values or count into slots it lacks. Compare
/// every pinned map with the object's definition (its size replaced by the configured
/// capacity) before loading and refuse with a clear error instead.
fn check_pins(obj: &[u8], pin_dir: &Path, caps: &Capacities) -> Result<(), LoaderError> {
    let parsed = aya_obj::Object::parse(obj).map_err(|e| LoaderError::Parse(Box::new(e)))?;
    for name in ALL_MAPS {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some(def) = parsed.maps.get(name) else {
            continue;
        };
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|source| LoaderError::ReadPin {
            path: path.clone(),
            source: Box::new(source),
        })?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        let entries = caps.max_entries(name).unwrap_or_else(|| def.max_entries());
        let wanted = (def.key_size(), def.value_size(), entries);
        if found != wanted {
            return Err(LoaderError::IncompatiblePin {
                path,
                pin_dir: pin_dir.to_owned(),
                found,
                wanted,
            });
        }
    }
    Ok(())
}

fn xdp_mut<'a>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut Xdp, LoaderError> {
    ebpf.program_mut(program)
        .ok_or(LoaderError::MissingProgram { program })?
        .try_into()
        .map_err(|source| LoaderError::Program {
            program,
            source: Box::new(source),
        })
}

/// `--xdp-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ModeChoice {
    /// Native on edge interfaces (generic if the driver refuses), generic on pod veths.
    #[default]
    Auto,
    Native,
    Generic,
}

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

struct Attached {
    ifindex: u32,
    program: &'static str,
    link: aya::programs::xdp::XdpLinkId,
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
        let program = if role == IFACE_ROLE_EDGE {
            PROG_EDGE
        } else {
            PROG_POD
        };
        let veth = driver_name(name).is_ok_and(|d| d == "veth");
        let pin = self.links_dir.join(ifindex.to_string());
        if pin.exists() {
            match self.adopt(name, ifindex, role, program, &pin) {
                Ok(Some(ev)) => return Ok(ev),
                Ok(None) => {}
                Err(e) => tracing::info!(
                    iface = name,
                    "not reusing the pinned link ({}), attaching anew",
                    error_chain(&e)
                ),
            }
            // Removing the pin drops the old link (and its program) once our fd is closed.
            let _ = std::fs::remove_file(&pin);
        }
        let first = match (self.mode, role) {
            (ModeChoice::Generic, _) => XdpMode::Skb,
            (ModeChoice::Native, _) => XdpMode::Driver,
            // Pod veths get generic XDP so XDP_TX and redirects out of them keep the skb
            // path (see docs/architecture.md, "when redirecting is safe").
            (ModeChoice::Auto, r) if r == IFACE_ROLE_POD => XdpMode::Skb,
            (ModeChoice::Auto, _) => XdpMode::Driver,
        };
        let flags_for = |mode: XdpMode| {
            let mut f = 0;
            if veth {
                f |= IFACE_F_VETH;
            }
            if mode == XdpMode::Skb {
                f |= IFACE_F_GENERIC;
            }
            if role == IFACE_ROLE_EDGE && mode == XdpMode::Driver {
                f |= IFACE_F_REDIRECT_OK;
            }
            f
        };
        // IFACES first: the program must never run on an interface it has no entry for.
        self.ifaces.set(
            ifindex,
            IfaceInfo {
                role,
                flags: flags_for(first),
            },
        )?;
        let mut fell_back = None;
        let mut mode = first;
        let res = match xdp_mut(&mut self.ebpf, program)?.attach_to_if_index(ifindex, first) {
            Err(e) if self.mode == ModeChoice::Auto && first == XdpMode::Driver => {
                fell_back = Some(error_chain(&e));
                mode = XdpMode::Skb;
                self.ifaces.set(
                    ifindex,
                    IfaceInfo {
                        role,
                        flags: flags_for(mode),
                    },
                )?;
                xdp_mut(&mut self.ebpf, program)?.attach_to_if_index(ifindex, mode)
            }
            other => other,
        };
        let attach_err = |source| LoaderError::Attach {
            program,
            iface: name.to_owned(),
            ifindex,
            mode,
            source: Box::new(source),
        };
        let link = match res.and_then(|id| self.pin_link(program, id, &pin)) {
            Ok(l) => l,
            Err(source) => {
                let _ = self.ifaces.remove(ifindex);
                return Err(attach_err(source));
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
            flags: flags_for(mode),
            fell_back,
        })
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
        id: aya::programs::xdp::XdpLinkId,
        pin: &Path,
    ) -> Result<aya::programs::xdp::XdpLinkId, aya::programs::ProgramError> {
        use aya::programs::links::FdLink;
        use aya::programs::xdp::XdpLink;
        let p =
            xdp_mut(&mut self.ebpf, program).map_err(|_| aya::programs::ProgramError::NotLoaded)?;
        let link = p.take_link(id)?;
        // Only bpf_link attachments (kernel >= 5.9) can be pinned; a netlink attachment
        // fails here and the caller reports it.
        let fd = FdLink::try_from(link).map_err(|e| match e {
            aya::programs::links::LinkError::InvalidLink => {
                aya::programs::ProgramError::UnexpectedProgramType
            }
            e => aya::programs::ProgramError::IOError(std::io::Error::other(e.to_string())),
        })?;
        let pinned = fd.pin(pin).map_err(|e| {
            aya::programs::ProgramError::IOError(std::io::Error::other(e.to_string()))
        })?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| {
            aya::programs::ProgramError::IOError(std::io::Error::other(e.to_string()))
        })?;
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
            source: Box::new(aya::programs::ProgramError::IOError(std::io::Error::other(
                e,
            ))),
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

// ---------------------------------------------------------------------------------------
// Socket-level load balancing (lb-ebpf/src/sock.rs): services for processes in the
// agent's own network namespace, which XDP never sees.
// ---------------------------------------------------------------------------------------

/// Where a cgroup v2 hierarchy is looked for, in order, when none is named: the unified
/// layout, then the hybrid one (systemd's `unified` next to the v1 controllers).
pub const CGROUP2_CANDIDATES: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
const CGROUP2_SUPER_MAGIC: u32 = 0x6367_7270;
const SYSFS_MAGIC: u32 = 0x6265_6572;

/// The cookie of the calling thread's network namespace (SO_NETNS_COOKIE of a throwaway
/// socket): what the socket programs compare every socket's namespace with.
pub fn netns_cookie() -> std::io::Result<u64> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: fd is ours; the kernel writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    let e = std::io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(e);
    }
    Ok(cookie)
}

/// The filesystem type (statfs f_type) of `path`.
fn fs_magic(path: &Path) -> std::io::Result<u32> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: all-zero is a valid statfs; `c` is a valid NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the kernel fills `st`.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // f_type is a signed word on x86_64; the magics fit in 32 bits.
    Ok(st.f_type as u32)
}

/// The cgroup v2 directory to attach the socket programs to: `explicit` if given (it must
/// be cgroup v2), else the first of [`CGROUP2_CANDIDATES`] that is. When none is mounted
/// and `/sys/fs/cgroup` is a bare sysfs directory (nothing mounted there: a fresh mount
/// namespace, as `ip netns exec` gives), cgroup2 is mounted there, as bpffs is by
/// [`ensure_bpffs`]; a v1 layout is never covered over.
///
/// The hierarchy's root as this process sees it is used: in a cgroup namespace that is the
/// namespace's root, which covers only the processes below it (a pod without
/// `hostPID`-like access to the host's cgroup root covers only itself).
pub fn find_cgroup2(explicit: Option<&Path>) -> Result<PathBuf, LoaderError> {
    let cg_err = |path: &Path| {
        let path = path.to_owned();
        move |source| LoaderError::Cgroup { path, source }
    };
    if let Some(p) = explicit {
        return if fs_magic(p).map_err(cg_err(p))? == CGROUP2_SUPER_MAGIC {
            Ok(p.to_owned())
        } else {
            Err(LoaderError::NoCgroup2 {
                looked: vec![p.display().to_string()],
            })
        };
    }
    for c in CGROUP2_CANDIDATES {
        if fs_magic(Path::new(c)).is_ok_and(|m| m == CGROUP2_SUPER_MAGIC) {
            return Ok(PathBuf::from(c));
        }
    }
    let root = Path::new(CGROUP2_CANDIDATES[0]);
    if fs_magic(root).is_ok_and(|m| m == SYSFS_MAGIC) {
        let target = CString::new(root.as_os_str().as_encoded_bytes())
            .map_err(|e| cg_err(root)(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        // SAFETY: valid NUL-terminated strings for the duration of the call; cgroup2
        // takes no mount data.
        let rc = unsafe {
            libc::mount(
                c"cgroup2".as_ptr(),
                target.as_ptr(),
                c"cgroup2".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(cg_err(root)(std::io::Error::last_os_error()));
        }
        return Ok(root.to_owned());
    }
    Err(LoaderError::NoCgroup2 {
        looked: CGROUP2_CANDIDATES.iter().map(|s| s.to_string()).collect(),
    })
}

/// The socket-level load balancer: the cgroup sock_addr programs of `lb-ebpf/src/sock.rs`
/// attached to a cgroup v2 directory, acting only for sockets of the network namespace
/// the agent runs in.
///
/// It is a second load of the object, sharing every pinned map with the XDP programs'
/// load (the same pin directory): the namespace cookie is a load-time constant, and the
/// XDP load stays exactly as it was. Dropping it detaches the programs (the links are
/// not pinned), so an agent that dies leaves nothing translating behind.
pub struct SockLb {
    ebpf: Ebpf,
    links: Vec<(&'static str, CgroupSockAddrLinkId)>,
    netns_cookie: u64,
    cgroup: PathBuf,
}

impl SockLb {
    /// Loads the socket programs for the calling thread's network namespace and attaches
    /// them to `cgroup` (see [`find_cgroup2`]), the reverse ones (getpeername, recvmsg)
    /// first so that no socket is translated forward before its answers are translated
    /// back. Attached as bpf_links, which the kernel always adds as BPF_F_ALLOW_MULTI: other
    /// agents' (other namespaces') and other tools' programs on the same cgroup keep
    /// running.
    pub fn attach(obj: &[u8], pin_dir: &Path, cgroup: &Path) -> Result<Self, LoaderError> {
        Self::attach_with(obj, pin_dir, cgroup, &Capacities::default())
    }

    /// [`SockLb::attach`] sharing maps that were loaded with `caps` (the same as the XDP
    /// load's, or the pins are refused).
    pub fn attach_with(
        obj: &[u8],
        pin_dir: &Path,
        cgroup: &Path,
        caps: &Capacities,
    ) -> Result<Self, LoaderError> {
        caps.validate()?;
        let netns_cookie = netns_cookie().map_err(LoaderError::NetnsCookie)?;
        ensure_bpffs(Path::new(BPFFS))?;
        std::fs::create_dir_all(pin_dir).map_err(|source| LoaderError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        check_pins(obj, pin_dir, caps)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir).override_global(
            SOCK_NETNS_GLOBAL,
            &netns_cookie,
            true,
        );
        caps.apply(&mut loader);
        for name in ALL_MAPS {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let ebpf = loader.load(obj).map_err(|source| LoaderError::Load {
            pin_dir: pin_dir.to_owned(),
            source: Box::new(source),
        })?;
        let dir = std::fs::File::open(cgroup).map_err(|source| LoaderError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let mut me = Self {
            ebpf,
            links: Vec::new(),
            netns_cookie,
            cgroup: cgroup.to_owned(),
        };
        for program in SOCK_PROGRAMS {
            let p = sock_mut(&mut me.ebpf, program)?;
            p.load().map_err(|source| LoaderError::Program {
                program,
                source: Box::new(source),
            })?;
            // On error `me` drops here, detaching what was attached so far. `Single` is
            // what a bpf_link needs: the kernel refuses any flag on a cgroup link_create
            // (EINVAL with AllowMultiple) and always attaches links as BPF_F_ALLOW_MULTI.
            // (aya uses links from Linux 5.7; SO_NETNS_COOKIE already needs 5.14.)
            let link = p.attach(&dir, CgroupAttachMode::Single).map_err(|source| {
                LoaderError::AttachCgroup {
                    program,
                    cgroup: cgroup.to_owned(),
                    source: Box::new(source),
                }
            })?;
            me.links.push((program, link));
        }
        Ok(me)
    }

    /// The network namespace cookie the programs act for.
    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Detaches every program, forward ones first (the reverse of attaching). Pinned maps
    /// stay; sockets already connected to a backend keep talking to it.
    pub fn detach(mut self) -> Result<(), LoaderError> {
        let mut first_err = None;
        while let Some((program, link)) = self.links.pop() {
            let res = sock_mut(&mut self.ebpf, program).and_then(|p| {
                p.detach(link).map_err(|source| LoaderError::Program {
                    program,
                    source: Box::new(source),
                })
            });
            if let Err(e) = res {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn sock_mut<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut CgroupSockAddr, LoaderError> {
    ebpf.program_mut(program)
        .ok_or(LoaderError::MissingProgram { program })?
        .try_into()
        .map_err(|source| LoaderError::Program {
            program,
            source: Box::new(source),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

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
    fn netns_cookie_is_set_and_stable() {
        let a = netns_cookie().expect("SO_NETNS_COOKIE");
        assert_ne!(a, 0, "0 would disable the socket programs");
        assert_eq!(netns_cookie().expect("SO_NETNS_COOKIE"), a);
    }

    #[test]
    fn a_named_cgroup_must_be_cgroup2() {
        let err = find_cgroup2(Some(Path::new("/proc"))).expect_err("/proc is not cgroup2");
        assert!(matches!(err, LoaderError::NoCgroup2 { .. }), "{err:?}");
        assert!(matches!(
            find_cgroup2(Some(Path::new("/xdplb-no-such-dir"))),
            Err(LoaderError::Cgroup { .. })
        ));
    }

    #[test]
    fn capacities_out_of_range_are_refused() {
        assert!(Capacities::default().validate().is_ok());
        let zero = Capacities {
            services: 0,
            ..Capacities::default()
        };
        let err = zero.validate().expect_err("zero services");
        assert_eq!(
            err.to_string(),
            format!("services = 0 is out of range (1..={MAX_CAPACITY_IDS})")
        );
        let tiny = Capacities {
            maglev_slots: MAGLEV_MIN_SIZE - 1,
            ..Capacities::default()
        };
        assert_eq!(
            tiny.validate().expect_err("maglev below one table").what,
            "maglev slots"
        );
        let huge = Capacities {
            flows: MAX_CAPACITY_FLOWS + 1,
            ..Capacities::default()
        };
        assert_eq!(huge.validate().expect_err("flows typo").what, "flows");
        // Nothing is created for a refused configuration.
        let dir = PathBuf::from(format!("/sys/fs/bpf/xdplb-capzero-{}", std::process::id()));
        let err = load_with(crate::EBPF_OBJ, &dir, false, &zero)
            .err()
            .expect("refused");
        assert!(matches!(err, LoaderError::Capacity(_)), "{err:?}");
        assert!(!dir.exists());
    }

    /// The maps take the configured sizes, the reconciler's limits follow them, a second
    /// load with the same capacities reuses the pins, and one with other capacities is
    /// refused naming the map and both sizes.
    #[test]
    fn maps_are_sized_by_the_configured_capacities() -> anyhow::Result<()> {
        let caps = Capacities {
            frontends: 1_000,
            services: 500,
            backends: 700,
            maglev_slots: 5_003,
            flows: 2_048,
            vips: 300,
            affinity: 1_024,
            src_ranges: 64,
        };
        let pin = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/xdplb-caps-{}",
            std::process::id()
        )));
        let loaded = load_with(crate::EBPF_OBJ, &pin.0, false, &caps).context("load")?;
        let sizes = |dir: &Path| -> anyhow::Result<BTreeMap<&'static str, u32>> {
            let mut m = BTreeMap::new();
            for name in ALL_MAPS {
                let info = aya::maps::MapInfo::from_pin(dir.join(name))
                    .with_context(|| format!("MapInfo of {name}"))?;
                m.insert(name, info.max_entries());
            }
            Ok(m)
        };
        let got = sizes(&pin.0)?;
        let expect = [
            (MAP_SERVICES, 1_000),
            (MAP_VIPS, 300),
            (MAP_BACKENDS, 700),
            (MAP_BE_STATS, 700),
            (MAP_BE_META, 700),
            (MAP_MAGLEV, 5_003),
            (MAP_CT, 2_048),
            (MAP_RNAT, 2_048),
            (MAP_SVC_STATS, 500),
            (MAP_SVC_META, 500),
            (MAP_AFFINITY, 1_024),
            (MAP_SRC_RANGES, 64),
            (lb_common::MAP_IFACES, lb_common::MAX_IFACES),
        ];
        for (name, n) in expect {
            assert_eq!(got.get(name), Some(&n), "{name}: {got:?}");
        }
        let limits = caps.limits();
        assert_eq!(limits.maglev_slots, 5_003);
        assert_eq!(limits.services, 500);
        assert_eq!(limits.backends, 700);
        assert_eq!(limits.frontends, 1_000);
        assert_eq!(limits.vips, 300);
        crate::reconciler::Reconciler::adopt_with_limits(loaded.maps, limits)
            .context("adopt with the capacities' limits")?;
        drop(loaded.ebpf);

        let again = load_with(crate::EBPF_OBJ, &pin.0, false, &caps).context("reload")?;
        drop(again);
        assert_eq!(sizes(&pin.0)?, got, "the pins were reused, not recreated");

        let err = load(crate::EBPF_OBJ, &pin.0, false)
            .err()
            .context("default capacities over pins of other sizes must be refused")?;
        let LoaderError::IncompatiblePin {
            path,
            found,
            wanted,
            ..
        } = &err
        else {
            anyhow::bail!("wrong error: {err:?}");
        };
        assert_eq!(path, &pin.0.join(MAP_SERVICES), "{err}");
        assert_eq!(found.2, 1_000);
        assert_eq!(wanted.2, lb_common::MAX_FRONTENDS);
        let msg = err.to_string();
        assert!(msg.contains("other map capacities"), "{msg}");
        assert!(msg.contains(&pin.0.display().to_string()), "{msg}");
        assert_eq!(sizes(&pin.0)?, got, "a refused load changes nothing");
        Ok(())
    }

    #[test]
    fn missing_interface_has_no_driver() {
        assert!(driver_name("xdplb-nosuch0").is_err());
    }

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

    /// Root only: attaches in a namespace of its own and checks IFACES after each step.
    #[test]
    fn attaches_by_role_and_follows_pod_interfaces() -> anyhow::Result<()> {
        let name = format!("xdplb-ld-{}", std::process::id());
        let pin = PinDir(PathBuf::from(format!("/sys/fs/bpf/{name}")));
        ip(&["netns", "add", &name])?;
        let _ns = Netns(name.clone());
        ip(&[
            "-n", &name, "link", "add", "e0", "type", "veth", "peer", "name", "p-e0",
        ])?;
        ip(&["-n", &name, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n", &name, "link", "add", "lxc1", "type", "veth", "peer", "name", "p-lxc1",
        ])?;
        for dev in ["e0", "p-e0", "br0", "lxc1", "p-lxc1"] {
            ip(&["-n", &name, "link", "set", dev, "up"])?;
        }

        let ns = name.clone();
        let pin_dir = pin.0.clone();
        // A thread of its own, so the test harness' thread never changes namespace.
        std::thread::spawn(move || -> anyhow::Result<()> {
            enter(&ns)?;
            let loaded = load(crate::EBPF_OBJ, &pin_dir, false)?;
            let reader = Ifaces::open_pinned(&pin_dir)?;
            let mut att = Attacher::new(
                loaded.ebpf,
                loaded.ifaces,
                &pin_dir,
                vec!["e0".into(), "br0".into()],
                &["lxc*".into()],
                ModeChoice::Auto,
            )?;
            let events = att.start()?;
            assert_eq!(events.len(), 3, "{events:?}");
            let idx = list_interfaces()?;
            let e0 = idx["e0"];
            let br0 = idx["br0"];
            let lxc1 = idx["lxc1"];
            assert_eq!(
                entry(&reader, e0)?,
                Some((IFACE_ROLE_EDGE, IFACE_F_VETH | IFACE_F_REDIRECT_OK)),
                "veth edge: native"
            );
            assert_eq!(
                entry(&reader, br0)?,
                Some((IFACE_ROLE_EDGE, IFACE_F_GENERIC)),
                "a bridge refuses native XDP: generic, not a veth, no redirects into it"
            );
            assert_eq!(
                entry(&reader, lxc1)?,
                Some((IFACE_ROLE_POD, IFACE_F_VETH | IFACE_F_GENERIC)),
            );
            assert!(idx.contains_key("p-lxc1") && entry(&reader, idx["p-lxc1"])?.is_none());

            ip(&[
                "link", "add", "lxc2", "type", "veth", "peer", "name", "p-lxc2",
            ])?;
            let ev = att.sync();
            assert!(
                matches!(ev.as_slice(), [IfaceEvent::Attached { name, .. }] if name == "lxc2"),
                "{ev:?}"
            );
            let lxc2 = list_interfaces()?["lxc2"];
            assert!(entry(&reader, lxc2)?.is_some());

            ip(&["link", "del", "lxc1"])?;
            let ev = att.sync();
            assert!(
                matches!(ev.as_slice(), [IfaceEvent::Forgotten { name, .. }] if name == "lxc1"),
                "{ev:?}"
            );
            assert!(entry(&reader, lxc1)?.is_none());
            assert!(att.sync().is_empty(), "nothing changed");

            // Hand-over: the agent lets go (`--on-exit keep`), the programs stay attached
            // through their pinned links; the next agent swaps its programs in.
            let before = xdp_progs()?;
            assert_eq!(before.len(), 3, "{before:?}");
            att.release();
            assert_eq!(xdp_progs()?, before, "still attached after release");
            let loaded = load(crate::EBPF_OBJ, &pin_dir, false)?;
            let mut att = Attacher::new(
                loaded.ebpf,
                loaded.ifaces,
                &pin_dir,
                vec!["e0".into(), "br0".into()],
                &["lxc*".into()],
                ModeChoice::Auto,
            )?;
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
                entry(&reader, e0)?,
                Some((IFACE_ROLE_EDGE, IFACE_F_VETH | IFACE_F_REDIRECT_OK)),
            );
            assert_eq!(std::fs::read_dir(pin_dir.join(LINKS_DIR))?.count(), 3);

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
}
