//! bpffs and the pin directory: mounting bpffs where the agent expects it, and checking
//! that maps left pinned by a previous agent are the ones this object defines before aya
//! reuses them.

use std::ffi::CString;
use std::path::Path;

use lb_common::ALL_MAPS;

use super::{Capacities, LoaderError};

/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";

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

/// aya reuses a pinned map by name without comparing it with the object's definition, and a
/// pin left by an older version (a smaller value type, fewer reason counters) would then be
/// shared with programs that read past its values or count into slots it lacks. Compare
/// every pinned map with the object's definition (its size replaced by the configured
/// capacity) before loading and refuse with a clear error instead.
pub(super) fn check_pins(obj: &[u8], pin_dir: &Path, caps: &Capacities) -> Result<(), LoaderError> {
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

/// What every load does before creating maps: bpffs mounted, `pin_dir` created, and the
/// maps already pinned there checked against `obj` (sized by `caps`).
pub(super) fn prepare_pin_dir(
    obj: &[u8],
    pin_dir: &Path,
    caps: &Capacities,
) -> Result<(), LoaderError> {
    ensure_bpffs(Path::new(BPFFS))?;
    std::fs::create_dir_all(pin_dir).map_err(|source| LoaderError::PinDir {
        path: pin_dir.to_owned(),
        source,
    })?;
    check_pins(obj, pin_dir, caps)
}
