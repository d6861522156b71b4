//! BPF_MAP_UPDATE_BATCH: many entries of one map in one syscall. aya 0.14 has no wrapper
//! for it, so the `union bpf_attr` is built here. The reconciler's bulk writes (whole
//! Maglev tables, a full resync's services and backends) go through it; a kernel without
//! the command is detected on the first call and the writer falls back to one syscall per
//! entry.

use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};

use aya::maps::IterableMap as _;
use lb_common::MAP_MAGLEV;

use super::{LbMaps, MapError};

/// Elements per BPF_MAP_UPDATE_BATCH call: bounds how long one syscall holds the CPU,
/// while a full 1 M-slot MAGLEV sync still takes only 16 calls.
pub(super) const BATCH_CHUNK: usize = 1 << 16;

/// `BPF_MAP_UPDATE_BATCH` from `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The kernel's internal ENOTSUPP, which `bpf_map_do_batch` returns for a map type without
/// batch ops; it is not in libc (which has only the POSIX EOPNOTSUPP).
pub(crate) const ENOTSUPP: i32 = 524;

/// `union bpf_attr` as used by the BPF_MAP_*_BATCH commands (the `batch` struct of
/// include/uapi/linux/bpf.h), padded past the size of the whole union: the kernel rejects
/// attributes whose bytes after the command's last field are not zero, so the padding must
/// be there and be zero.
#[repr(C)]
pub(crate) struct BatchAttr {
    pub(crate) in_batch: u64,
    pub(crate) out_batch: u64,
    pub(crate) keys: u64,
    pub(crate) values: u64,
    pub(crate) count: u32,
    pub(crate) map_fd: u32,
    pub(crate) elem_flags: u64,
    pub(crate) flags: u64,
    pub(crate) _zero: [u8; 160 - 56],
}

/// Why an [`update_batch`] call did not write everything.
#[derive(Debug)]
pub(super) enum BatchError {
    /// This kernel or map has no BPF_MAP_UPDATE_BATCH; nothing was written.
    Unsupported(std::io::Error),
    /// The update of elements `start..start + len` (indices into the slices passed)
    /// failed; the elements before `start` are written.
    Failed {
        start: usize,
        len: usize,
        source: std::io::Error,
    },
}

/// Writes `values[i]` under `keys[i]` into map `fd` with BPF_MAP_UPDATE_BATCH (BPF_ANY),
/// in chunks of [`BATCH_CHUNK`]. `K` and `V` must be the map's key and value types (their
/// sizes are the map's key_size and value_size; aya checked that when opening it): the
/// kernel reads `count` packed keys and values. Arrays and hash maps have the command
/// since Linux 5.6; for a hash map it is one syscall instead of one per entry.
pub(super) fn update_batch<K: aya::Pod, V: aya::Pod>(
    fd: RawFd,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    let failed = |start: usize, source| BatchError::Failed {
        start,
        len: keys.len() - start,
        source,
    };
    if keys.len() != values.len() {
        return Err(failed(0, std::io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let map_fd =
        u32::try_from(fd).map_err(|_| failed(0, std::io::Error::from_raw_os_error(libc::EBADF)))?;
    for (n, (kc, vc)) in keys
        .chunks(BATCH_CHUNK)
        .zip(values.chunks(BATCH_CHUNK))
        .enumerate()
    {
        let start = n * BATCH_CHUNK;
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: kc.as_ptr() as u64,
            values: vc.as_ptr() as u64,
            count: kc.len() as u32,
            map_fd,
            // BPF_ANY: create or replace (array slots always exist).
            elem_flags: 0,
            flags: 0,
            _zero: [0; 160 - 56],
        };
        // SAFETY: attr is a zero-padded `union bpf_attr` batch struct; keys and values point
        // to `count` packed keys and values of the map's sizes, alive for the call; the
        // kernel only reads them (and writes `count` back into attr).
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            let unsupported = matches!(
                err.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
            );
            // Only the first call can tell "not supported": a later chunk failing means the
            // command works and something else is wrong.
            if unsupported && n == 0 && attr.count == 0 {
                return Err(BatchError::Unsupported(err));
            }
            // On error the kernel reports in `count` how many elements it updated.
            let done = (attr.count as usize).min(kc.len());
            return Err(failed(start + done, err));
        }
    }
    Ok(())
}

fn batch_err(map: &'static str, key: String, source: std::io::Error) -> MapError {
    MapError::Op {
        op: "update batch",
        map,
        key,
        source: Box::new(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_batch",
            io_error: source,
        })),
    }
}

impl LbMaps {
    /// Writes `keys[i] -> values[i]` into the map `fd` (named `map`) in BPF_MAP_UPDATE_BATCH
    /// calls. `Ok(false)`: not done, this kernel has no batch command (nothing was written;
    /// the caller writes the entries one by one, as it does for a single entry).
    pub(super) fn try_batch<K: aya::Pod, V: aya::Pod>(
        &mut self,
        fd: RawFd,
        map: &'static str,
        keys: &[K],
        values: &[V],
        key_name: impl Fn(&K) -> String,
    ) -> Result<bool, MapError> {
        if self.batch_unsupported || keys.len() < 2 {
            return Ok(false);
        }
        match update_batch(fd, keys, values) {
            Ok(()) => Ok(true),
            Err(BatchError::Unsupported(e)) => {
                tracing::debug!(
                    "BPF_MAP_UPDATE_BATCH on {map} not supported ({e}), writing entries one \
                     by one from now on"
                );
                self.batch_unsupported = true;
                Ok(false)
            }
            Err(BatchError::Failed { start, source, .. }) => {
                let key = keys.get(start).map_or_else(|| "?".into(), &key_name);
                Err(batch_err(map, key, source))
            }
        }
    }

    /// `slots` into MAGLEV `[offset, end)` with BPF_MAP_UPDATE_BATCH. `Ok(false)`: not
    /// written, this kernel has no batch command (remembered; the caller writes the slots
    /// one syscall each).
    pub(super) fn put_maglev_batched(
        &mut self,
        offset: u32,
        end: u32,
        slots: &[u32],
    ) -> Result<bool, MapError> {
        if self.maglev_batch_unsupported {
            return Ok(false);
        }
        let fd = self.maglev.map().fd().as_fd().as_raw_fd();
        let keys: Vec<u32> = (offset..end).collect();
        match update_batch(fd, &keys, slots) {
            Ok(()) => Ok(true),
            Err(BatchError::Unsupported(e)) => {
                // Fall through to single updates: nothing was written by the failed call
                // that the caller's loop does not write again.
                tracing::debug!(
                    "BPF_MAP_UPDATE_BATCH on {MAP_MAGLEV} not supported ({e}), \
                     writing slots one by one from now on"
                );
                self.maglev_batch_unsupported = true;
                Ok(false)
            }
            Err(BatchError::Failed { start, len, source }) => {
                let first = u64::from(offset) + start as u64;
                Err(batch_err(
                    MAP_MAGLEV,
                    format!("{first}..{}", first + len as u64),
                    source,
                ))
            }
        }
    }

    /// Whether the bulk writes to SERVICES, VIPS, BACKENDS and the name maps still go
    /// through BPF_MAP_UPDATE_BATCH: false once this kernel refused the command, after
    /// which they take one syscall per entry.
    pub fn writes_in_batches(&self) -> bool {
        !self.batch_unsupported
    }
}
