//! The few raw kernel calls aya 0.14 does not wrap: reading a hash map and deleting
//! what was read in batches (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_DELETE_BATCH`: one syscall
//! per few thousand entries) with per-element fallbacks for kernels before 5.6, writing a run of array entries in
//! batches (`BPF_MAP_UPDATE_BATCH`: an unwind table's rows), and the RCU grace period
//! that makes a generation flip safe to drain behind.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd, BorrowedFd},
    time::Duration,
};

use aya::Pod;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr` as used by the element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// `union bpf_attr` as used by the batch commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a properly laid out prefix of `union bpf_attr` for `cmd`, and its
    // pointers refer to buffers that outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes `values` into an array map from index `first` on, a few thousand per syscall;
/// `Unsupported` where the kernel has no batch update (before 5.6: write one by one).
pub fn update_array<V: Pod>(fd: BorrowedFd<'_>, first: u32, values: &[V]) -> io::Result<()> {
    const CHUNK: usize = 4096;
    let mut keys: Vec<u32> = Vec::with_capacity(CHUNK);
    for (index, chunk) in values.chunks(CHUNK).enumerate() {
        let start = first + (index * CHUNK) as u32;
        keys.clear();
        keys.extend((0..chunk.len() as u32).map(|i| start + i));
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            Ok(()) if attr.count as usize == chunk.len() => {}
            Ok(()) => {
                return Err(io::Error::other(format!(
                    "batch update wrote {} of {} entries",
                    attr.count,
                    chunk.len()
                )));
            }
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                return Err(io::Error::from(io::ErrorKind::Unsupported));
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Reads every entry of a hash map, a few thousand per syscall (one by one on kernels
/// before 5.6). Only call it when no program writes to the map any more (after a
/// generation flip and [`rcu_barrier`]); [`delete_keys`] empties it once what was read
/// is safe.
pub fn read_hash_map<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    max_entries: u32,
) -> io::Result<Vec<(K, V)>> {
    read_hash_map_as(fd, max_entries, |key: &K, value: &V| (*key, *value))
}

/// [`read_hash_map`], each entry converted by `convert` as it is read: a map of large
/// values (1 KiB stacks) is never held whole in its map form.
pub fn read_hash_map_as<K: Pod, V: Pod, T>(
    fd: BorrowedFd<'_>,
    max_entries: u32,
    mut convert: impl FnMut(&K, &V) -> T,
) -> io::Result<Vec<T>> {
    match read_batched(fd, max_entries, &mut convert) {
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => read_one_by_one(fd, &mut convert),
        other => other,
    }
}

/// Values read per batch: about 1 MiB of them, between 64 and 4096 entries.
fn batch_entries<V>(max_entries: u32) -> usize {
    let by_size = ((1 << 20) / size_of::<V>().max(1)).clamp(64, 4096);
    by_size.min(max_entries.max(1) as usize)
}

fn read_batched<K: Pod, V: Pod, T>(
    fd: BorrowedFd<'_>,
    max_entries: u32,
    convert: &mut impl FnMut(&K, &V) -> T,
) -> io::Result<Vec<T>> {
    // A batch must hold at least one whole hash bucket; one that does not is read
    // the slow way (ENOSPC below).
    let chunk = batch_entries::<V>(max_entries);
    let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(chunk);
    let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(chunk);
    keys.resize_with(chunk, MaybeUninit::uninit);
    values.resize_with(chunk, MaybeUninit::uninit);
    let mut out = Vec::new();
    let mut in_batch = 0u64;
    let mut out_batch = 0u64;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_mut(&mut in_batch) as u64
            },
            out_batch: std::ptr::from_mut(&mut out_batch) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = attr.count as usize;
        for i in 0..got.min(chunk) {
            // SAFETY: the kernel initialised the first `count` keys and values.
            out.push(unsafe { convert(keys[i].assume_init_ref(), values[i].assume_init_ref()) });
        }
        match result {
            Ok(()) => {
                first = false;
                in_batch = out_batch;
            }
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(err)
                if err.raw_os_error() == Some(libc::ENOSPC) && chunk < max_entries as usize =>
            {
                // One bucket holds more than a chunk: read it all the slow way.
                return read_one_by_one(fd, convert);
            }
            Err(err) => return Err(err),
        }
    }
}

fn read_one_by_one<K: Pod, V: Pod, T>(
    fd: BorrowedFd<'_>,
    convert: &mut impl FnMut(&K, &V) -> T,
) -> io::Result<Vec<T>> {
    let mut out = Vec::new();
    let mut previous: Option<K> = None;
    loop {
        let mut key = MaybeUninit::<K>::uninit();
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: previous
                .as_ref()
                .map_or(0, |k| std::ptr::from_ref(k) as u64),
            value_or_next_key: key.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(err) => return Err(err),
        }
        // SAFETY: GET_NEXT_KEY succeeded and wrote a whole key.
        let key = unsafe { key.assume_init() };
        let mut value = MaybeUninit::<V>::uninit();
        let mut lookup = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: std::ptr::from_ref(&key) as u64,
            value_or_next_key: value.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        if bpf(BPF_MAP_LOOKUP_ELEM, &mut lookup).is_ok() {
            // SAFETY: LOOKUP succeeded and wrote a whole value.
            out.push(convert(&key, unsafe { value.assume_init_ref() }));
        }
        previous = Some(key);
    }
}

/// Deletes `keys` from a hash map, a few thousand per syscall (one by one on kernels
/// before 5.6); keys already gone are no error.
pub fn delete_keys<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    const CHUNK: usize = 4096;
    for chunk in keys.chunks(CHUNK) {
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) if attr.count as usize == chunk.len() => {}
            // EINVAL: no batch delete; ENOENT: a key was gone, the rest are done one by one.
            Ok(()) => delete_one_by_one(fd, &chunk[attr.count as usize..])?,
            Err(err) if matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {
                let done = if err.raw_os_error() == Some(libc::ENOENT) {
                    attr.count as usize
                } else {
                    0
                };
                delete_one_by_one(fd, &chunk[done.min(chunk.len())..])?;
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn delete_one_by_one<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    for key in keys {
        let mut delete = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: std::ptr::from_ref(key) as u64,
            ..ElemAttr::default()
        };
        match bpf(BPF_MAP_DELETE_ELEM, &mut delete) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// How a drain knows that no program still writes into the generation it just retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Barrier {
    /// `membarrier(MEMBARRIER_CMD_GLOBAL)`, which waits for an RCU grace period; every BPF
    /// tracing program runs inside an RCU read-side section.
    Membarrier,
    /// `nohz_full` kernels refuse that command; BPF programs run for microseconds, so a
    /// generous sleep stands in for the grace period.
    Sleep,
}

const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
const QUIESCENCE_SLEEP: Duration = Duration::from_millis(20);

/// Waits until every program that may have read the previous generation has returned.
pub fn rcu_barrier(preferred: Barrier) -> Barrier {
    if preferred == Barrier::Membarrier {
        // SAFETY: membarrier takes no pointers.
        let ret = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
        if ret == 0 {
            return Barrier::Membarrier;
        }
    }
    std::thread::sleep(QUIESCENCE_SLEEP);
    Barrier::Sleep
}
