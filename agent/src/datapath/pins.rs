//! The pin directory and the compatibility check that aya does not do.
//!
//! Layout: `<pin_root>/v<ABI_VERSION>/maps/<MAP>` and `<pin_root>/v<ABI_VERSION>/links/<program>`.
//! A new ABI version pins into a new directory, so an upgrade never reuses maps of another
//! layout. Within one version, every pinned map is checked against [`expected_maps`] before it
//! is re-adopted: maps holding policy must match or the agent refuses to start; maps holding only
//! soft state (counters, heat, latency) are recreated, which resets them.

use knhk_abi::{map_names as m, *};
use std::path::{Path, PathBuf};

use super::DatapathError;

/// Paths of the pins of one ABI version.
#[derive(Debug, Clone)]
pub struct PinLayout {
    /// `<pin_root>/v<ABI_VERSION>`.
    pub dir: PathBuf,
}

impl PinLayout {
    /// The layout under `pin_root` for this build's ABI.
    pub fn new(pin_root: &Path) -> Self {
        Self {
            dir: pin_root.join(format!("v{ABI_VERSION}")),
        }
    }

    /// Directory of map pins.
    pub fn maps_dir(&self) -> PathBuf {
        self.dir.join("maps")
    }

    /// Pin of map `name`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Directory of link pins.
    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    /// Pin of the link of program `name`.
    pub fn link(&self, name: &str) -> PathBuf {
        self.links_dir().join(name)
    }
}

// bpf_map_type numbers (include/uapi/linux/bpf.h).
const HASH: u32 = 1;
const ARRAY: u32 = 2;
const PERCPU_ARRAY: u32 = 6;
const LRU_HASH: u32 = 9;
const LPM_TRIE: u32 = 11;
const SK_STORAGE: u32 = 24;
const RINGBUF: u32 = 27;

/// What a map must look like to be re-adopted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSpec {
    /// Map name.
    pub name: &'static str,
    /// `bpf_map_type`.
    pub map_type: u32,
    /// Key size, bytes.
    pub key_size: u32,
    /// Value size, bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// Creation flags.
    pub flags: u32,
    /// Whether it holds only soft state that may be reset by recreating it.
    pub soft: bool,
}

const fn size<T>() -> u32 {
    size_of::<T>() as u32
}

/// The maps of this ABI, as the kernel reports them once created.
pub fn expected_maps(heat_max_entries: u32) -> [MapSpec; 21] {
    let spec = |name, map_type, key_size, value_size, max_entries, flags, soft| MapSpec {
        name,
        map_type,
        key_size,
        value_size,
        max_entries,
        flags,
        soft,
    };
    [
        spec(
            m::CONFIG,
            ARRAY,
            4,
            size::<Config>(),
            1,
            BPF_F_MMAPABLE,
            false,
        ),
        spec(
            m::POLICY_V4,
            LPM_TRIE,
            4 + size::<LpmKeyV4>(),
            size::<RuleLeaf>(),
            MAX_PREFIXES,
            BPF_F_NO_PREALLOC,
            false,
        ),
        spec(
            m::POLICY_V6,
            LPM_TRIE,
            4 + size::<LpmKeyV6>(),
            size::<RuleLeaf>(),
            MAX_PREFIXES,
            BPF_F_NO_PREALLOC,
            false,
        ),
        spec(
            m::SCOPES,
            HASH,
            size::<ScopeKey>(),
            size::<ScopeValue>(),
            MAX_SCOPES,
            0,
            false,
        ),
        spec(m::DECISIONS, PERCPU_ARRAY, 4, 8, DECISION_COUNTERS, 0, true),
        spec(
            m::RULE_HITS,
            ARRAY,
            4,
            8,
            MAX_RULE_COUNTERS,
            BPF_F_MMAPABLE,
            true,
        ),
        spec(
            m::HEAT,
            LRU_HASH,
            size::<HeatKey>(),
            size::<HeatValue>(),
            heat_max_entries,
            0,
            true,
        ),
        spec(
            m::CONNS,
            SK_STORAGE,
            4,
            size::<ConnState>(),
            0,
            BPF_F_NO_PREALLOC,
            true,
        ),
        spec(m::SAMPLED, PERCPU_ARRAY, 4, 8, SAMPLED_CLOCKS, 0, true),
        spec(
            m::CLASS_STATE,
            ARRAY,
            4,
            size::<ClassControl>(),
            CLASSES as u32,
            BPF_F_MMAPABLE,
            true,
        ),
        spec(
            m::BUDGETS,
            ARRAY,
            4,
            8,
            CLASSES as u32,
            BPF_F_MMAPABLE,
            true,
        ),
        spec(m::HEAT_INSERTS, PERCPU_ARRAY, 4, 8, 1, 0, true),
        spec(
            m::PARK,
            HASH,
            4,
            size::<ParkTarget>(),
            MAX_PARK_TARGETS,
            0,
            false,
        ),
        spec(
            m::LATENCY,
            PERCPU_ARRAY,
            4,
            size::<Histogram>(),
            HISTOGRAMS as u32,
            0,
            true,
        ),
        spec(
            m::LEAF_CHUNKS,
            HASH,
            size::<ChunkKey>(),
            size::<RuleChunk>(),
            MAX_CHUNKS,
            BPF_F_NO_PREALLOC,
            false,
        ),
        spec(
            m::VERDICTS,
            PERCPU_ARRAY,
            4,
            size::<VerdictSlot>(),
            VERDICT_CACHE_SLOTS,
            0,
            true,
        ),
        spec(
            m::REVNAT,
            LRU_HASH,
            size::<RevNatKey>(),
            size::<RevNatValue>(),
            MAX_REVNAT,
            0,
            true,
        ),
        spec(m::EVENTS, RINGBUF, 0, 0, EVENTS_RING_BYTES, 0, true),
        spec(m::EVENT_GATE, ARRAY, 4, 8, MAX_RULE_COUNTERS, 0, true),
        spec(
            m::EVENT_COUNTERS,
            PERCPU_ARRAY,
            4,
            8,
            EVENT_COUNTERS,
            0,
            true,
        ),
        spec(m::SPLIT, HASH, 8, 4, MAX_SPLIT_CGROUPS, 0, false),
    ]
}

/// What a pinned map actually looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedShape {
    /// `bpf_map_type`.
    pub map_type: u32,
    /// Key size, bytes.
    pub key_size: u32,
    /// Value size, bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// Creation flags.
    pub flags: u32,
}

/// The differences between `spec` and `actual`, as readable phrases (empty when compatible).
pub fn differences(spec: &MapSpec, actual: &PinnedShape) -> Vec<String> {
    let mut out = Vec::new();
    let mut cmp = |what: &str, want: u32, got: u32| {
        if want != got {
            out.push(format!("{what} is {got}, expected {want}"));
        }
    };
    cmp("map type", spec.map_type, actual.map_type);
    cmp("key size", spec.key_size, actual.key_size);
    cmp("value size", spec.value_size, actual.value_size);
    cmp("max entries", spec.max_entries, actual.max_entries);
    cmp("flags", spec.flags, actual.flags);
    out
}

/// Reads the shape of the map pinned at `path`; `Ok(None)` when nothing is pinned there.
pub fn pinned_shape(path: &Path) -> std::io::Result<Option<PinnedShape>> {
    if !path.exists() {
        return Ok(None);
    }
    let info = aya::maps::MapInfo::from_pin(path).map_err(std::io::Error::other)?;
    Ok(Some(PinnedShape {
        map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }))
}

/// ABI versions whose pin layout (directory names, map and program names) this build knows:
/// [`remove_pins`] removes the pins of each.
pub const KNOWN_ABI_VERSIONS: std::ops::RangeInclusive<u32> = 1..=ABI_VERSION;

/// Removes knhk's own pins under `pin_root`, and nothing else: for every known ABI version,
/// `v<N>/maps/<MAP>` and `v<N>/links/<program>` with the names of [`knhk_abi::map_names`] and
/// [`knhk_abi::program_names`], then those directories if they are left empty, then `pin_root`
/// itself if it held one of them and is left empty. Unpinning the links detaches the programs.
///
/// Refuses, before removing anything, a pin root that is not a directory on bpffs, and any
/// symlink, directory or other non-pin where a pin or a pin directory is expected. Symlinks are
/// never followed (every step is `openat`/`fstatat`/`unlinkat` with `O_NOFOLLOW` relative to a
/// directory that was checked to be on bpffs). A missing pin root is nothing to remove.
pub fn remove_pins(pin_root: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    remove_versions(pin_root, KNOWN_ABI_VERSIONS)
}

/// Whether pins of an ABI version older than this build's exist under `pin_root`.
pub fn has_superseded_pins(pin_root: &Path) -> bool {
    (1..ABI_VERSION).any(|v| pin_root.join(format!("v{v}")).exists())
}

/// Removes the pins of ABI versions older than this build's (as [`remove_pins`] does for all):
/// their programs detach, so no older program keeps enforcing a frozen policy beside this
/// build's. Called once this build's programs enforce the new policy.
pub fn remove_superseded_pins(pin_root: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    remove_versions(pin_root, 1..=ABI_VERSION - 1)
}

fn remove_versions(
    pin_root: &Path,
    which: std::ops::RangeInclusive<u32>,
) -> Result<Vec<PathBuf>, DatapathError> {
    use std::os::fd::AsFd;
    // Without a trailing slash, O_NOFOLLOW applies to the last component.
    let pin_root: PathBuf = pin_root.components().collect();
    let refuse = |path: &Path, reason: String| DatapathError::DetachRefused {
        path: path.to_owned(),
        reason,
    };
    let root = match nofollow::open_dir(None, &pin_root) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(refuse(&pin_root, nofollow::why_not_dir(&pin_root, &e))),
    };
    let magic = nofollow::fs_magic(root.as_fd()).map_err(super::io_err("statfs", &pin_root))?;
    if magic != super::sys::BPF_FS_MAGIC {
        return Err(refuse(
            &pin_root,
            format!(
                "is not on a bpffs (file system magic {magic:#x}, bpffs is {:#x}): knhk-agent \
                 pins only on bpffs, so this is not its pin root (see agent.pin_root, e.g. \
                 /sys/fs/bpf/knhk)",
                super::sys::BPF_FS_MAGIC
            ),
        ));
    }

    // Plan: every directory and pin to remove, checked before anything is removed.
    struct Dir {
        fd: std::os::fd::OwnedFd,
        path: PathBuf,
        pins: Vec<(&'static str, PathBuf)>,
    }
    struct Version {
        name: String,
        dir: Dir,
        subs: Vec<(&'static str, Dir)>,
    }
    let mut versions: Vec<Version> = Vec::new();
    let open_sub = |parent: std::os::fd::BorrowedFd<'_>, parent_path: &Path, name: &str| {
        let path = parent_path.join(name);
        match nofollow::open_dir(Some(parent), Path::new(name)) {
            Ok(fd) => {
                let magic =
                    nofollow::fs_magic(fd.as_fd()).map_err(super::io_err("statfs", &path))?;
                if magic != super::sys::BPF_FS_MAGIC {
                    return Err(refuse(
                        &path,
                        format!("is not on a bpffs (file system magic {magic:#x})"),
                    ));
                }
                Ok(Some(Dir {
                    fd,
                    path,
                    pins: Vec::new(),
                }))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(refuse(&path, nofollow::why_not_dir(&path, &e))),
        }
    };
    for version in which {
        let name = format!("v{version}");
        let Some(vdir) = open_sub(root.as_fd(), &pin_root, &name)? else {
            continue;
        };
        let mut subs = Vec::new();
        for (sub, names) in [
            ("maps", &m::ALL[..]),
            ("links", &knhk_abi::program_names::ALL[..]),
        ] {
            let Some(mut dir) = open_sub(vdir.fd.as_fd(), &vdir.path, sub)? else {
                continue;
            };
            for pin in names {
                let path = dir.path.join(pin);
                match nofollow::file_type(dir.fd.as_fd(), pin) {
                    Ok(libc::S_IFREG) => dir.pins.push((pin, path)),
                    Ok(other) => {
                        return Err(refuse(
                            &path,
                            format!(
                                "is a {}, not a pin knhk-agent made (remove it yourself if it \
                                 is not needed)",
                                nofollow::kind(other)
                            ),
                        ))
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(super::io_err("inspecting pin", &path)(e)),
                }
            }
            subs.push((sub, dir));
        }
        versions.push(Version {
            name,
            dir: vdir,
            subs,
        });
    }

    // Remove the pins, then the directories that are left empty.
    let mut removed = Vec::new();
    for version in &versions {
        for (_, dir) in &version.subs {
            for (pin, path) in &dir.pins {
                match nofollow::unlink(dir.fd.as_fd(), pin, false) {
                    Ok(()) => removed.push(path.clone()),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(super::io_err("unpin", path)(e)),
                }
            }
        }
    }
    let keep = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::ENOTEMPTY | libc::EEXIST | libc::ENOENT | libc::EBUSY)
        )
    };
    for Version {
        name,
        dir: vdir,
        subs,
    } in &versions
    {
        for (sub, dir) in subs {
            match nofollow::unlink(vdir.fd.as_fd(), sub, true) {
                Err(e) if !keep(&e) => return Err(super::io_err("removing", &dir.path)(e)),
                _ => {}
            }
        }
        match nofollow::unlink(root.as_fd(), name, true) {
            Err(e) if !keep(&e) => return Err(super::io_err("removing", &vdir.path)(e)),
            _ => {}
        }
    }
    if !versions.is_empty() {
        // The agent created it (create_dir_all); a mount point such as /sys/fs/bpf stays (EBUSY).
        match std::fs::remove_dir(&pin_root) {
            Err(e) if !keep(&e) && e.raw_os_error() != Some(libc::ENOTDIR) => {
                return Err(super::io_err("removing", &pin_root)(e))
            }
            _ => {}
        }
    }
    Ok(removed)
}

/// `*at` calls that never follow a symlink.
mod nofollow {
    use std::{
        ffi::CString,
        io,
        os::{
            fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
            unix::ffi::OsStrExt,
        },
        path::Path,
    };

    fn cstr(path: &Path) -> io::Result<CString> {
        CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
    }

    /// Opens directory `path` (relative to `parent`, or to the working directory), refusing a
    /// symlink as its last component.
    pub(super) fn open_dir(parent: Option<BorrowedFd<'_>>, path: &Path) -> io::Result<OwnedFd> {
        let c = cstr(path)?;
        let dirfd = parent.map_or(libc::AT_FDCWD, |p| p.as_raw_fd());
        // SAFETY: a valid NUL-terminated path and directory fd.
        let fd = unsafe {
            libc::openat(
                dirfd,
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd owned by us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Why [`open_dir`] failed on `path`, as a phrase.
    pub(super) fn why_not_dir(path: &Path, e: &io::Error) -> String {
        let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        match e.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR) if is_link => match std::fs::read_link(path) {
                Ok(to) => format!(
                    "is a symlink (to {}); symlinks are never followed: give the directory itself",
                    to.display()
                ),
                Err(_) => "is a symlink; symlinks are never followed".into(),
            },
            Some(libc::ENOTDIR) => "is not a directory".into(),
            _ => format!("cannot be opened: {e}"),
        }
    }

    /// The file system magic (`statfs` `f_type`) of an open file.
    pub(super) fn fs_magic(fd: BorrowedFd<'_>) -> io::Result<i64> {
        // SAFETY: plain old data, filled by the kernel.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd and out-pointer.
        if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.f_type as i64)
    }

    /// The `S_IFMT` bits of `name` in `dir`, without following a symlink.
    pub(super) fn file_type(dir: BorrowedFd<'_>, name: &str) -> io::Result<libc::mode_t> {
        let c = cstr(Path::new(name))?;
        // SAFETY: plain old data, filled by the kernel.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd, path and out-pointer.
        let r = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.st_mode & libc::S_IFMT)
    }

    /// A file type, as a noun.
    pub(super) fn kind(mode: libc::mode_t) -> &'static str {
        match mode {
            libc::S_IFLNK => "symlink",
            libc::S_IFDIR => "directory",
            libc::S_IFIFO => "FIFO",
            libc::S_IFSOCK => "socket",
            libc::S_IFCHR | libc::S_IFBLK => "device",
            _ => "file of an unexpected type",
        }
    }

    /// Removes `name` in `dir` (a directory with `dir_entry`); a symlink itself, never its target.
    pub(super) fn unlink(dir: BorrowedFd<'_>, name: &str, dir_entry: bool) -> io::Result<()> {
        let c = cstr(Path::new(name))?;
        let flags = if dir_entry { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: a valid fd and path.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_mismatch() {
        let spec = expected_maps(100)[1];
        let mut shape = PinnedShape {
            map_type: spec.map_type,
            key_size: spec.key_size,
            value_size: spec.value_size,
            max_entries: spec.max_entries,
            flags: spec.flags,
        };
        assert!(differences(&spec, &shape).is_empty());
        shape.value_size += 8;
        shape.max_entries = 7;
        let d = differences(&spec, &shape);
        assert_eq!(d.len(), 2);
        assert!(d[0].starts_with("value size is"), "{d:?}");
        assert!(d[1].contains("max entries is 7"), "{d:?}");
    }

    #[test]
    fn layout_is_versioned() {
        let l = PinLayout::new(Path::new("/sys/fs/bpf/knhk"));
        assert_eq!(
            l.map("KNHK_HEAT"),
            Path::new(&format!("/sys/fs/bpf/knhk/v{ABI_VERSION}/maps/KNHK_HEAT"))
        );
        assert_eq!(
            l.link("knhk_connect4"),
            Path::new(&format!(
                "/sys/fs/bpf/knhk/v{ABI_VERSION}/links/knhk_connect4"
            ))
        );
    }
}

/// A descriptor of every pinned map and link of this build, opened from the pins once they are
/// all in place: while they are held, deleting the pins detaches nothing (a link lives as long
/// as a pin or a descriptor refers to it), and [`Held::restore`] pins what went missing.
#[derive(Debug, Default)]
pub struct Held {
    objects: Vec<(PathBuf, std::os::fd::OwnedFd)>,
}

impl Held {
    /// Opens every map and link pin of `layout`.
    pub fn open(layout: &PinLayout, heat_max_entries: u32) -> Result<Held, DatapathError> {
        let paths: Vec<PathBuf> = expected_maps(heat_max_entries)
            .iter()
            .map(|spec| layout.map(spec.name))
            .chain(knhk_abi::program_names::ALL.iter().map(|n| layout.link(n)))
            .collect();
        let mut objects = Vec::new();
        for path in paths {
            let fd = super::sys::obj_get(&path).map_err(super::io_err("open pin", &path))?;
            objects.push((path, fd));
        }
        Ok(Held { objects })
    }

    /// Pins again every map and link whose pin is missing (deleted under the running agent);
    /// returns the pins restored. Nothing was detached meanwhile: the descriptors are held.
    pub fn restore(&self, layout: &PinLayout) -> Result<Vec<PathBuf>, DatapathError> {
        use std::os::fd::AsFd;
        let missing = |p: &Path| matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
        let mut restored = Vec::new();
        for dir in [layout.maps_dir(), layout.links_dir()] {
            if missing(&dir) {
                std::fs::create_dir_all(&dir).map_err(super::io_err("create", &dir))?;
            }
        }
        for (path, fd) in &self.objects {
            if missing(path) {
                super::sys::obj_pin(fd.as_fd(), path).map_err(super::io_err("pin", path))?;
                restored.push(path.clone());
            }
        }
        Ok(restored)
    }
}
