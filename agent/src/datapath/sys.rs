//! The few kernel interfaces aya 0.14 does not offer, in one place: shared mappings of
//! mmapable arrays, link program replacement, batch map reads and bpffs checks.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
    ptr::NonNull,
};

/// A shared read-write mapping of a `BPF_F_MMAPABLE` array map, unmapped on drop.
#[derive(Debug)]
pub(crate) struct MmapArray {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through raw pointers with atomic
// or volatile operations, which the kernel programs also use.
unsafe impl Send for MmapArray {}
unsafe impl Sync for MmapArray {}

impl MmapArray {
    /// Maps `len` bytes of the array behind `fd`.
    pub(crate) fn map(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<Self> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a map fd; the kernel validates fd, length and flags.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }

    /// Pointer to the element at byte `offset`, which must hold a `T` inside the mapping.
    pub(crate) fn at<T>(&self, offset: usize) -> *mut T {
        assert!(
            offset + size_of::<T>() <= self.len,
            "offset {offset} outside the mapping"
        );
        assert!(
            offset.is_multiple_of(align_of::<T>()),
            "misaligned offset {offset}"
        );
        // SAFETY: in bounds (checked above).
        unsafe { self.ptr.as_ptr().add(offset).cast() }
    }
}

impl Drop for MmapArray {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Opens a pinned bpffs object.
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = path_cstring(path)?;
    // SAFETY: a valid NUL-terminated path.
    let fd = unsafe { libbpf_sys::bpf_obj_get(c.as_ptr()) };
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(-fd));
    }
    // SAFETY: a new fd owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins a bpffs object (a map or link descriptor) at `path`.
pub(crate) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = path_cstring(path)?;
    // SAFETY: a valid fd and a valid NUL-terminated path.
    let ret = unsafe { libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), c.as_ptr()) };
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret));
    }
    Ok(())
}

/// Atomically replaces the program of a BPF link (`BPF_LINK_UPDATE`): connects never see the
/// hook without a program.
pub(crate) fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: both are valid fds; null options mean "no expected old program".
    let ret = unsafe {
        libbpf_sys::bpf_link_update(link.as_raw_fd(), program.as_raw_fd(), std::ptr::null())
    };
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret));
    }
    Ok(())
}

/// Where a batched walk of a hash map stands (the kernel's bucket cursor).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchCursor {
    token: [u8; 64],
    started: bool,
}

impl Default for BatchCursor {
    fn default() -> Self {
        BatchCursor {
            token: [0; 64],
            started: false,
        }
    }
}

/// Reads up to `max` entries of a hash-type map from `cursor` with one `BPF_MAP_LOOKUP_BATCH`;
/// returns them and whether the walk reached the end (the cursor then starts over).
pub(crate) fn lookup_batch_step<K: Copy + Default, V: Copy + Default>(
    fd: BorrowedFd<'_>,
    cursor: &mut BatchCursor,
    max: usize,
) -> io::Result<(Vec<(K, V)>, bool)> {
    let mut keys = vec![K::default(); max];
    let mut values = vec![V::default(); max];
    let mut count = max as u32;
    let mut next = [0u8; 64];
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: buffers hold `count` keys and values; the batch tokens are large enough for any
    // hash map's bucket cursor (the kernel uses a u32).
    let ret = unsafe {
        libbpf_sys::bpf_map_lookup_batch(
            fd.as_raw_fd(),
            if cursor.started {
                cursor.token.as_mut_ptr().cast()
            } else {
                std::ptr::null_mut()
            },
            next.as_mut_ptr().cast(),
            keys.as_mut_ptr().cast(),
            values.as_mut_ptr().cast(),
            &mut count,
            &opts,
        )
    };
    let done = ret < 0 && -ret == libc::ENOENT;
    if ret < 0 && !done {
        return Err(io::Error::from_raw_os_error(-ret));
    }
    let out = keys.into_iter().zip(values).take(count as usize).collect();
    *cursor = if done {
        BatchCursor::default()
    } else {
        BatchCursor {
            token: next,
            started: true,
        }
    };
    Ok((out, done))
}

/// Reads every entry of a hash-type map with `BPF_MAP_LOOKUP_BATCH` (thousands per syscall).
pub(crate) fn lookup_batch<K: Copy + Default, V: Copy + Default>(
    fd: BorrowedFd<'_>,
    capacity: usize,
) -> io::Result<Vec<(K, V)>> {
    let mut cursor = BatchCursor::default();
    let mut out = Vec::new();
    loop {
        let (chunk, done) = lookup_batch_step(fd, &mut cursor, 4096)?;
        out.extend(chunk);
        if done || out.len() >= capacity {
            return Ok(out);
        }
    }
}

/// Writes `keys[i] → values[i]` with `BPF_MAP_UPDATE_BATCH` (thousands per syscall). Returns
/// `Ok(false)` without writing anything when the map type has no batch support.
pub(crate) fn update_batch<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<bool> {
    const CHUNK: usize = 8192;
    assert_eq!(keys.len(), values.len(), "one value per key");
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
        elem_flags: 0,
        flags: 0,
    };
    for (k, v) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut count = k.len() as u32;
        // SAFETY: `count` keys and values of the map's key and value sizes, read by the kernel.
        let ret = unsafe {
            libbpf_sys::bpf_map_update_batch(
                fd.as_raw_fd(),
                k.as_ptr().cast(),
                v.as_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        if ret < 0 {
            let errno = -ret;
            // No batch support for this map type (checked on the first chunk only).
            if std::ptr::eq(k.as_ptr(), keys.as_ptr())
                && (errno == libc::EINVAL || errno == libc::EOPNOTSUPP || errno == 524)
            {
                return Ok(false);
            }
            return Err(io::Error::from_raw_os_error(errno));
        }
    }
    Ok(true)
}

/// `BPF_FS_MAGIC`.
pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = path_cstring(path)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// Whether `path` is on a bpffs.
pub(crate) fn is_bpffs(path: &Path) -> bool {
    fs_magic(path).is_ok_and(|m| m == BPF_FS_MAGIC)
}

/// Whether `path` is a cgroup v2 directory.
pub(crate) fn is_cgroup2(path: &Path) -> bool {
    fs_magic(path).is_ok_and(|m| m == CGROUP2_SUPER_MAGIC)
}

/// Mounts a bpffs at `target`.
pub(crate) fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = path_cstring(target)?;
    let (src, fstype) = (c"bpf", c"bpf");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let ret = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Waits for an RCU grace period, after which no BPF program that started before the call is
/// still running (`membarrier(MEMBARRIER_CMD_GLOBAL)` calls `synchronize_rcu()` in the kernel).
pub(crate) fn synchronize_rcu() -> io::Result<()> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: a plain syscall with no pointers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_GLOBAL,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        // nohz_full kernels refuse the command: a generous sleep outlasts any program run.
        if err.raw_os_error() == Some(libc::EINVAL) {
            std::thread::sleep(std::time::Duration::from_millis(50));
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
