//! Socket-level load balancing (lb-ebpf/src/sock.rs): services for processes in the
//! agent's own network namespace, which XDP never sees. The cgroup sock_addr programs
//! translate at connect/sendmsg time, so they need a cgroup v2 hierarchy to attach to and
//! the namespace's cookie to tell the agent's sockets from everyone else's.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::Ebpf;
use lb_common::{SOCK_NETNS_GLOBAL, SOCK_PROGRAMS};

use super::bpffs::prepare_pin_dir;
use super::{pinned_loader, Capacities, LoaderError};

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
/// [`ensure_bpffs`](super::ensure_bpffs); a v1 layout is never covered over.
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
        looked: CGROUP2_CANDIDATES
            .iter()
            .map(std::string::ToString::to_string)
            .collect(),
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
        prepare_pin_dir(obj, pin_dir, caps)?;
        let mut loader = pinned_loader(pin_dir, caps);
        loader.override_global(SOCK_NETNS_GLOBAL, &netns_cookie, true);
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
}
