//! Loading the XDP object with pinned maps, attaching the programs to interfaces, and
//! keeping IFACES in step with what is attached.
//!
//! **Load** ([`load`], [`load_with`]): mount bpffs if it is missing ([`ensure_bpffs`]),
//! create the pin directory, compare every map already pinned there with the object's
//! definition (`bpffs::check_pins`), then load the object with every map pinned by name and
//! sized by the [`Capacities`]. Maps a previous agent pinned are reused as they are, so
//! services, backends, Maglev tables and live flows survive a restart; a pin of another
//! layout or size is refused with an error naming it instead of being shared with
//! programs that would read it wrongly. The result, [`Loaded`], hands the maps the
//! reconciler writes ([`LbMaps`]) and IFACES ([`Ifaces`]) out of the object.
//!
//! **Attach** ([`Attacher`], `xdp`): `xdp_edge` on the named edge interfaces, `xdp_pod` on
//! interfaces matching the pod patterns, each as a bpf_link pinned under
//! `<pin dir>/links/<ifindex>`. An interface's IFACES entry is written before its program
//! runs and removed after it stops. A pinned link outlives the agent: the next agent swaps
//! its own program into it atomically, so packets never see the interface without one.
//! [`Attacher::sync`] follows interfaces coming and going (pod veths).
//!
//! **Sockets** ([`SockLb`], `sock`): a second load of the same object, sharing every
//! pinned map, attaches the cgroup socket programs for the agent's own network namespace.
//!
//! Interfaces are listed with `if_nameindex(3)` and inspected with ioctls (`netdev`), both
//! of which answer for the calling thread's network namespace. `/sys/class/net` is avoided
//! on purpose: it describes the namespace of whoever mounted sysfs, which is not ours when
//! the agent is started with `nsenter --net` (as it must be to share the node's bpffs).

use std::path::{Path, PathBuf};

use aya::programs::XdpMode;
use aya::{Ebpf, EbpfLoader};
use lb_common::{
    ALL_MAPS, MAGLEV_MIN_SIZE, MAGLEV_SLOTS, MAP_AFFINITY, MAP_BACKENDS, MAP_BE_META, MAP_BE_STATS,
    MAP_CT, MAP_MAGLEV, MAP_RNAT, MAP_SERVICES, MAP_SRC_RANGES, MAP_SVC_META, MAP_SVC_STATS,
    MAP_VIPS, MAX_AFFINITY, MAX_BACKENDS, MAX_FLOWS, MAX_FRONTENDS, MAX_SERVICES, MAX_SRC_RANGES,
    MAX_VIPS, PROG_EDGE, PROG_POD,
};

use crate::maps::{Ifaces, LbMaps, MapError};
use crate::reconciler::Limits;

mod bpffs;
mod netdev;
mod sock;
mod xdp;
#[cfg(test)]
mod xdp_tests;

pub use bpffs::{ensure_bpffs, is_bpffs, BPFFS};
pub use netdev::{driver_name, list_interfaces, IfaceEvent};
pub use sock::{find_cgroup2, netns_cookie, SockLb, CGROUP2_CANDIDATES};
pub use xdp::{Attacher, ModeChoice, LINKS_DIR};

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xdplb";

/// A failed load, attach or detach, naming what it was done to.
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

    /// Sizes the maps `loader` creates (those it finds pinned keep their size).
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
    bpffs::prepare_pin_dir(obj, pin_dir, caps)?;
    let debug_flag: u8 = debug.into();
    let mut loader = pinned_loader(pin_dir, caps);
    loader.override_global("DEBUG", &debug_flag, true);
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
        xdp::xdp_mut(&mut ebpf, program)?
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

/// An object loader that pins every map under `pin_dir` by name, sized by `caps`: the
/// part of loading the XDP and the socket programs have in common.
fn pinned_loader<'a>(pin_dir: &Path, caps: &Capacities) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    caps.apply(&mut loader);
    // Pin every map by name even if its definition forgot `pinned`: an unpinned map would
    // silently lose its contents on restart.
    for name in ALL_MAPS {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    loader
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use anyhow::Context as _;

    /// Removes the pin directory (and so the maps) however the test ends.
    struct PinDir(PathBuf);

    impl Drop for PinDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
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
}
