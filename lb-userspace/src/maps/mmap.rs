//! The MAGLEV array mapped into the agent's memory. A BPF_F_MMAPABLE array can be mapped
//! shared and writable, and the programs read the very same pages: writing a table is then
//! plain stores, no syscall at all, which matters for million-slot tables rebuilt on every
//! endpoint change. Maps pinned by an older agent without the flag cannot be mapped and are
//! written with BPF_MAP_UPDATE_BATCH instead (see `batch`).

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::IterableMap as _;
use lb_common::MAP_MAGLEV;

use super::LbMaps;

/// Whether MAGLEV is mapped into this process (see `LbMaps::maglev_mmap`).
pub(super) enum MmapState {
    Untried,
    Mapped(MaglevMmap),
    Unavailable,
}

/// `BPF_F_MMAPABLE` from include/uapi/linux/bpf.h.
pub(super) const BPF_F_MMAPABLE: u32 = 1 << 10;

/// A BPF_F_MMAPABLE array map of u32 values mapped shared and writable: the kernel lays the
/// values out at `round_up(value_size, 8)` bytes each, the same memory the programs read.
pub(super) struct MaglevMmap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    stride: usize,
    entries: u32,
}

// SAFETY: the mapping is owned by this value alone (unmapped on drop) and only written
// through `&mut self`; the programs read it concurrently, which is what the kernel's
// mmap of a BPF array is for, and every store is a whole aligned u32.
unsafe impl Send for MaglevMmap {}
// SAFETY: `&MaglevMmap` gives no access to the memory.
unsafe impl Sync for MaglevMmap {}

impl MaglevMmap {
    /// Maps the array map `fd`, whose kernel info (`MapInfo`) says `map_flags`,
    /// `value_size` and `max_entries`; fails for a map without BPF_F_MMAPABLE, of another
    /// value size, or that the kernel refuses to map.
    pub(super) fn new(
        fd: std::os::fd::BorrowedFd<'_>,
        map_flags: u32,
        value_size: u32,
        max_entries: u32,
    ) -> Result<Self, std::io::Error> {
        if map_flags & BPF_F_MMAPABLE == 0 {
            return Err(std::io::Error::other(
                "map was created without BPF_F_MMAPABLE",
            ));
        }
        if value_size != 4 {
            return Err(std::io::Error::other(format!(
                "value size {value_size}, not 4"
            )));
        }
        let stride = 8usize;
        // SAFETY: sysconf with a constant argument.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| std::io::Error::other("no page size"))?;
        let len = (max_entries as usize * stride).div_ceil(page) * page;
        if len == 0 {
            return Err(std::io::Error::other("empty map"));
        }
        // SAFETY: a fresh shared mapping of the map's whole value area (the kernel checks
        // the length against the map's size); nothing else refers to this memory yet.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned NULL"))?;
        Ok(Self {
            ptr,
            len,
            stride,
            entries: max_entries,
        })
    }

    /// `values[i]` into slot `offset + i`. Each store is atomic (the data path never sees a
    /// torn id); the fence orders the whole table before whatever the caller writes next
    /// (the frontend that switches to it, through a syscall).
    pub(super) fn write(&mut self, offset: u32, values: &[u32]) -> Result<(), String> {
        let end = u64::from(offset) + values.len() as u64;
        if end > u64::from(self.entries) {
            return Err(format!("slots up to {end} past the map's {}", self.entries));
        }
        for (i, v) in values.iter().enumerate() {
            let at = (offset as usize + i) * self.stride;
            // SAFETY: `at + 4 <= entries * stride <= len`: inside the mapping, and 8-byte
            // aligned (page-aligned base, stride 8), so a valid AtomicU32 location that only
            // atomic accesses (ours, the programs' loads) touch.
            let slot =
                unsafe { std::sync::atomic::AtomicU32::from_ptr(self.ptr.as_ptr().add(at).cast()) };
            slot.store(*v, std::sync::atomic::Ordering::Relaxed);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for MaglevMmap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; nothing refers to it any more.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

impl LbMaps {
    /// MAGLEV's mapping, made on the first call (lbctl, which only reads, never gets here).
    /// `None` for a map that cannot be mapped, which is remembered: it is written with
    /// BPF_MAP_UPDATE_BATCH from then on.
    pub(super) fn maglev_mapping(&mut self) -> Option<&mut MaglevMmap> {
        if matches!(self.maglev_mmap, MmapState::Untried) {
            let mapped = self
                .maglev
                .map()
                .info()
                .map_err(|e| std::io::Error::other(format!("map info: {e}")))
                .and_then(|i| {
                    MaglevMmap::new(
                        self.maglev.map().fd().as_fd(),
                        i.map_flags(),
                        i.value_size(),
                        i.max_entries(),
                    )
                });
            self.maglev_mmap = match mapped {
                Ok(m) => MmapState::Mapped(m),
                Err(e) => {
                    tracing::debug!(
                        "{MAP_MAGLEV} cannot be mapped ({e}): writing tables with \
                         BPF_MAP_UPDATE_BATCH"
                    );
                    MmapState::Unavailable
                }
            };
        }
        match &mut self.maglev_mmap {
            MmapState::Mapped(m) => Some(m),
            MmapState::Untried | MmapState::Unavailable => None,
        }
    }
}
