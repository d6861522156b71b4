//! Counting the entries of a pinned map for the fill-level gauges.
//!
//! BPF has no "number of elements" in `bpf_map_info`, so a map has to be walked. The walk
//! uses `BPF_MAP_LOOKUP_BATCH` where the kernel has it (hash, LRU hash, array): it walks
//! the hash table bucket by bucket, so it is bounded by the number of buckets even while
//! the programs insert and evict entries (a `BPF_MAP_GET_NEXT_KEY` walk restarts from the
//! first bucket whenever the current key was evicted, and on a busy LRU map need not end).
//! A full 262 144-entry CT map took 0.09 s on a 2-CPU machine (debug build; up to 0.35 s
//! while it was busy), a key-by-key walk 0.37-0.9 s (the kernel test in `ops::tests`
//! prints both).
//! Maps without batch lookup (the LPM trie) are walked with `BPF_MAP_GET_NEXT_KEY`, capped
//! at the map's capacity.
//!
//! Under concurrent updates the count is approximate (an entry inserted behind the walk is
//! missed, one moved ahead may be seen twice): good enough for a gauge.

use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};
use std::path::Path;

use aya::maps::{MapData, MapType};

/// A pinned map's fill level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fill {
    pub entries: u64,
    pub capacity: u64,
}

/// Why a map could not be counted.
#[derive(Debug, thiserror::Error)]
pub enum CountError {
    #[error("opening pinned map {path}")]
    Open {
        path: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("{call} on map {map}")]
    Syscall {
        call: &'static str,
        map: String,
        #[source]
        source: std::io::Error,
    },
}

/// What to count in a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// Every present key (hash maps, LPM tries).
    Keys,
    /// Array slots whose value has `flag` set in the native-endian u32 at `offset` (BACKENDS:
    /// a free slot is all zero).
    ValuesWithFlag { offset: usize, flag: u32 },
}

/// Entries per BPF_MAP_LOOKUP_BATCH call: 16 384 CT entries are 1.5 MiB of buffers, and a
/// full CT map takes 16 calls (with 4 096 per call, one measurement gave 0.34 s against
/// 0.23 s).
const BATCH: u32 = 16384;

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

// The batch attribute layout and the kernel's ENOTSUPP are the ones the map writer uses.
use crate::maps::{BatchAttr, ENOTSUPP};

/// `union bpf_attr` for BPF_MAP_GET_NEXT_KEY (`map_fd`, `key`, `next_key`), zero-padded.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    _zero: [u8; 160 - 24],
}

fn bpf(cmd: libc::c_long, attr: *mut libc::c_void, size: usize) -> Result<(), std::io::Error> {
    // SAFETY: the callers pass a zero-padded `union bpf_attr` for `cmd` whose pointers
    // reference buffers alive for the call and large enough for what the kernel writes.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size as libc::c_uint) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Counts the map pinned at `path`.
pub fn count_pinned(path: &Path, what: Count) -> Result<Fill, CountError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let open_err = |source| CountError::Open {
        path: path.display().to_string(),
        source: Box::new(source),
    };
    let data = MapData::from_pin(path).map_err(open_err)?;
    let info = data.info().map_err(open_err)?;
    let map_type = info.map_type().map_err(open_err)?;
    let fd = data.fd().as_fd().as_raw_fd();
    let capacity = u64::from(info.max_entries());
    let key_size = info.key_size() as usize;
    let value_size = info.value_size() as usize;
    let batchable = matches!(map_type, MapType::Hash | MapType::LruHash | MapType::Array);
    let entries = if batchable {
        match count_batch(fd, key_size, value_size, capacity, what, &name) {
            Ok(n) => n,
            Err(BatchFailure::Unsupported) => {
                count_next_key(fd, key_size, capacity, what, map_type, &name)?
            }
            Err(BatchFailure::Error(e)) => return Err(e),
        }
    } else {
        count_next_key(fd, key_size, capacity, what, map_type, &name)?
    };
    Ok(Fill { entries, capacity })
}

enum BatchFailure {
    /// This kernel has no batch lookup for the map: nothing was counted.
    Unsupported,
    Error(CountError),
}

fn counts(what: Count, value: &[u8]) -> bool {
    match what {
        Count::Keys => true,
        Count::ValuesWithFlag { offset, flag } => value
            .get(offset..offset + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .is_some_and(|b| u32::from_ne_bytes(b) & flag != 0),
    }
}

/// Counts with BPF_MAP_LOOKUP_BATCH; `Unsupported` when the kernel refuses the first call.
fn count_batch(
    fd: RawFd,
    key_size: usize,
    value_size: usize,
    capacity: u64,
    what: Count,
    map: &str,
) -> Result<u64, BatchFailure> {
    let failed = |source| {
        BatchFailure::Error(CountError::Syscall {
            call: "bpf_map_lookup_batch",
            map: map.to_owned(),
            source,
        })
    };
    let map_fd =
        u32::try_from(fd).map_err(|_| failed(std::io::Error::from_raw_os_error(libc::EBADF)))?;
    let mut walk = BatchWalk::new(key_size, value_size);
    let mut total = 0u64;
    // Every successful call moves at least one bucket (or array slot) forward; a map has at
    // most `capacity` of either rounded up to a power of two, so this bounds the walk even
    // if a kernel misbehaved.
    let max_calls = capacity.saturating_mul(2).saturating_add(16);
    let mut calls = 0u64;
    loop {
        calls += 1;
        if calls > max_calls {
            return Err(failed(std::io::Error::other(
                "walk did not end within the map's size",
            )));
        }
        let (r, n) = walk.lookup(map_fd);
        total += walk.counted(n, what);
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(total),
            // A hash bucket holds more entries than the buffer: retry it with a larger one.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 && walk.can_grow() => {
                walk.grow();
                continue;
            }
            Err(e)
                if walk.first
                    && n == 0
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
                    ) =>
            {
                return Err(BatchFailure::Unsupported)
            }
            Err(source) => return Err(failed(source)),
        }
        walk.advance();
    }
}

/// The buffers and position of a BPF_MAP_LOOKUP_BATCH walk.
struct BatchWalk {
    key_size: usize,
    value_size: usize,
    /// Entries per call.
    batch: u32,
    keys: Vec<u8>,
    values: Vec<u8>,
    /// Where the next call starts (ignored on the first call).
    in_batch: Vec<u8>,
    /// Where the kernel says the walk stopped.
    out_batch: Vec<u8>,
    first: bool,
}

impl BatchWalk {
    fn new(key_size: usize, value_size: usize) -> Self {
        let batch = BATCH;
        // The batch token is a u32 bucket index for hash maps and a key for arrays; 16
        // bytes hold either.
        let token_len = key_size.max(16);
        Self {
            key_size,
            value_size,
            batch,
            keys: vec![0u8; key_size * batch as usize],
            values: vec![0u8; value_size * batch as usize],
            in_batch: vec![0u8; token_len],
            out_batch: vec![0u8; token_len],
            first: true,
        }
    }

    /// One call: the kernel's answer and how many entries it copied (on success and on
    /// ENOENT, the end, `count` says how many).
    fn lookup(&mut self, map_fd: u32) -> (Result<(), std::io::Error>, usize) {
        let mut attr = BatchAttr {
            in_batch: if self.first {
                0
            } else {
                self.in_batch.as_ptr() as u64
            },
            out_batch: self.out_batch.as_mut_ptr() as u64,
            keys: self.keys.as_mut_ptr() as u64,
            values: self.values.as_mut_ptr() as u64,
            count: self.batch,
            map_fd,
            elem_flags: 0,
            flags: 0,
            _zero: [0; 160 - 56],
        };
        let r = bpf(
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut BatchAttr as *mut libc::c_void,
            std::mem::size_of::<BatchAttr>(),
        );
        (r, (attr.count.min(self.batch)) as usize)
    }

    /// How many of the `n` entries the last call copied count.
    fn counted(&self, n: usize, what: Count) -> u64 {
        match what {
            Count::Keys => n as u64,
            Count::ValuesWithFlag { .. } => self
                .values
                .chunks_exact(self.value_size.max(1))
                .take(n)
                .filter(|v| counts(what, v))
                .count() as u64,
        }
    }

    fn can_grow(&self) -> bool {
        self.batch < 1 << 20
    }

    /// Four times the entries per call.
    fn grow(&mut self) {
        self.batch *= 4;
        self.keys.resize(self.key_size * self.batch as usize, 0);
        self.values.resize(self.value_size * self.batch as usize, 0);
    }

    /// The next call continues where the last one stopped.
    fn advance(&mut self) {
        self.in_batch.copy_from_slice(&self.out_batch);
        self.first = false;
    }
}

/// Walks the keys one syscall each, at most `capacity + 1` steps. Only `Count::Keys` can
/// be answered this way (values are not read); arrays always have `capacity` keys.
fn count_next_key(
    fd: RawFd,
    key_size: usize,
    capacity: u64,
    what: Count,
    map_type: MapType,
    map: &str,
) -> Result<u64, CountError> {
    if matches!(map_type, MapType::Array | MapType::PerCpuArray) || what != Count::Keys {
        // Reading values needs batch lookup (kernel 5.6+; the programs need newer ones
        // anyway); an array's key walk would only say "every slot".
        return Err(CountError::Syscall {
            call: "bpf_map_lookup_batch",
            map: map.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::Unsupported),
        });
    }
    let map_fd = u32::try_from(fd).map_err(|_| CountError::Syscall {
        call: "bpf_map_get_next_key",
        map: map.to_owned(),
        source: std::io::Error::from_raw_os_error(libc::EBADF),
    })?;
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut n = 0u64;
    let mut first = true;
    while n <= capacity {
        let mut attr = NextKeyAttr {
            map_fd,
            _pad: 0,
            // A NULL key asks for the first key.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            _zero: [0; 160 - 24],
        };
        match bpf(
            BPF_MAP_GET_NEXT_KEY,
            &mut attr as *mut NextKeyAttr as *mut libc::c_void,
            std::mem::size_of::<NextKeyAttr>(),
        ) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(source) => {
                return Err(CountError::Syscall {
                    call: "bpf_map_get_next_key",
                    map: map.to_owned(),
                    source,
                })
            }
        }
        n += 1;
        std::mem::swap(&mut key, &mut next);
        first = false;
    }
    Ok(n.min(capacity))
}
