//! The three ways `put_maglev` writes a table (mapping, batch syscalls, single updates),
//! against the kernel (root, bpffs at /sys/fs/bpf): the object's maps, pinned in a
//! directory of their own. The object is loaded with aya directly: the map layer is tested
//! without the loader, which depends on it.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::maps::{Array, Map, MapData};
use aya::Ebpf;
use lb_common::MAP_MAGLEV;

use super::batch::BATCH_CHUNK;
use super::mmap::{MmapState, BPF_F_MMAPABLE};
use super::{LbMaps, MapWriter as _};

/// Removes the pin directory (and so the maps) however the test ends.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The object's maps, created and pinned under `pin_dir`, and the object holding the
/// programs' references to them.
fn load_maps(pin_dir: &Path) -> anyhow::Result<(Ebpf, LbMaps)> {
    std::fs::create_dir_all(pin_dir).context("pin directory")?;
    let mut ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(crate::EBPF_OBJ)
        .context("load")?;
    let maps = LbMaps::from_ebpf(&mut ebpf)?;
    Ok((ebpf, maps))
}

#[test]
fn put_maglev_writes_every_slot_in_batches_across_chunk_boundaries() -> anyhow::Result<()> {
    let dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/xdplb-test-batch-{}",
        std::process::id()
    )));
    let (_ebpf, mut maps) = load_maps(&dir.0)?;
    // The batch path, as for MAGLEV maps pinned without BPF_F_MMAPABLE.
    maps.maglev_mmap = MmapState::Unavailable;
    put_maglev_round_trips(&mut maps)?;
    // The batch path ran, not the per-slot fallback: this kernel has the command.
    assert!(!maps.maglev_batch_unsupported);

    // Past the end of MAGLEV: an error naming the map and the first slot not written.
    let end = lb_common::MAGLEV_SLOTS;
    let e = maps
        .put_maglev(end - 10, &[1; 20])
        .expect_err("slots past MAGLEV_SLOTS");
    let msg = e.to_string();
    assert!(
        msg.contains(MAP_MAGLEV) && msg.contains(&format!("[{end}..{}]", end + 10)),
        "{msg}"
    );
    assert_eq!(maps.maglev_range(end - 10, 10)?, vec![1; 10]);
    Ok(())
}

/// An ARRAY of u32 with BPF_F_MMAPABLE, as lb-ebpf declares MAGLEV, made directly
/// (BPF_MAP_CREATE) so the mapped path is tested whatever the object declares.
fn mmapable_u32_array(entries: u32) -> anyhow::Result<Array<MapData, u32>> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        _zero: [u8; 128 - 20],
    }
    let mut attr = CreateAttr {
        map_type: 2, // BPF_MAP_TYPE_ARRAY
        key_size: 4,
        value_size: 4,
        max_entries: entries,
        map_flags: BPF_F_MMAPABLE,
        _zero: [0; 128 - 20],
    };
    // SAFETY: BPF_MAP_CREATE (0) with a zero-padded attribute; returns a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0 as libc::c_long,
            &mut attr as *mut CreateAttr,
            std::mem::size_of::<CreateAttr>() as libc::c_uint,
        )
    };
    anyhow::ensure!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let map = Map::from_map_data(MapData::from_fd(fd)?)?;
    Ok(Array::try_from(map)?)
}

#[test]
fn put_maglev_writes_an_mmapable_map_through_its_mapping() -> anyhow::Result<()> {
    let dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/xdplb-test-mmap-{}",
        std::process::id()
    )));
    let (_ebpf, mut maps) = load_maps(&dir.0)?;
    let end = lb_common::MAGLEV_SLOTS;
    maps.maglev = mmapable_u32_array(end)?;
    maps.maglev_mmap = MmapState::Untried;
    put_maglev_round_trips(&mut maps)?;
    assert!(matches!(maps.maglev_mmap, MmapState::Mapped(_)));

    // Past the end: refused before anything is written.
    let e = maps
        .put_maglev(end - 10, &[1; 20])
        .expect_err("slots past MAGLEV_SLOTS");
    assert!(e.to_string().contains(MAP_MAGLEV), "{e}");
    assert_eq!(maps.maglev_range(end - 10, 10)?, vec![0; 10]);
    // The last slot is writable (the mapping covers the whole map).
    maps.put_maglev(end - 1, &[9])?;
    assert_eq!(maps.maglev_range(end - 1, 1)?, vec![9]);
    Ok(())
}

/// Tables written with `put_maglev` read back through the syscall (what the programs
/// see), neighbours untouched, across batch-chunk boundaries and overwrites.
fn put_maglev_round_trips(maps: &mut LbMaps) -> anyhow::Result<()> {
    let pattern = |base: u32, n: usize| -> Vec<u32> {
        (0..n as u32).map(|i| (base + i * 7) % 4093 + 1).collect()
    };

    // A few thousand slots at an offset: one batch call.
    let small = pattern(11, 3_000);
    maps.put_maglev(5_000, &small).context("small put")?;
    assert_eq!(maps.maglev_range(5_000, 3_000)?, small);
    // Neighbours untouched.
    assert_eq!(maps.maglev_range(4_999, 1)?, vec![0]);
    assert_eq!(maps.maglev_range(8_000, 1)?, vec![0]);

    // More than one chunk: the second call must continue exactly where the first stopped.
    let n = BATCH_CHUNK + 2_500;
    let big = pattern(3, n);
    let off = 100_000;
    maps.put_maglev(off, &big).context("multi-chunk put")?;
    let back = maps.maglev_range(off, n as u32)?;
    let edge = BATCH_CHUNK;
    assert_eq!(back[edge - 3..edge + 3], big[edge - 3..edge + 3]);
    assert_eq!(back, big);
    assert_eq!(maps.maglev_range(off - 1, 1)?, vec![0]);
    assert_eq!(maps.maglev_range(off + n as u32, 1)?, vec![0]);

    // Overwrite across the chunk boundary with other values (a rebuilt table).
    let over = pattern(1_000, 4_000);
    let over_off = off + BATCH_CHUNK as u32 - 2_000;
    maps.put_maglev(over_off, &over).context("overwrite")?;
    assert_eq!(maps.maglev_range(over_off, 4_000)?, over);
    assert_eq!(
        maps.maglev_range(over_off - 1, 1)?,
        vec![big[BATCH_CHUNK - 2_001]]
    );
    Ok(())
}
