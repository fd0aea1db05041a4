//! Cgroup v2 lookups: where the hierarchy is mounted, and a cgroup directory's id and level.

use super::sys;
use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Mount points probed for the cgroup v2 hierarchy, in order: a pure v2 host (most Kubernetes
/// nodes), then the hybrid layout.
pub const CGROUP2_CANDIDATES: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// The cgroup v2 mount point, detected from [`CGROUP2_CANDIDATES`].
pub fn detect_cgroup2_mount() -> Option<PathBuf> {
    CGROUP2_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| sys::is_cgroup2(p))
}

/// The mount point of the cgroup v2 hierarchy that contains `dir`: its highest ancestor that is
/// still on cgroup2.
pub fn mount_of(dir: &Path) -> Option<PathBuf> {
    if !sys::is_cgroup2(dir) {
        return None;
    }
    let mut mount = dir.to_path_buf();
    while let Some(parent) = mount.parent() {
        if !sys::is_cgroup2(parent) {
            break;
        }
        mount = parent.to_path_buf();
    }
    Some(mount)
}

/// Where a cgroup is: its id (the directory's inode, as `bpf_get_current_cgroup_id()` reports
/// it) and its level below the hierarchy root (root = 0), as `bpf_get_current_ancestor_cgroup_id`
/// counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupRef {
    /// Cgroup id.
    pub id: u64,
    /// Level below the hierarchy root.
    pub level: u32,
}

/// Resolves `dir` (inside the hierarchy mounted at `mount`). `Ok(None)` when it does not exist.
pub fn resolve(mount: &Path, dir: &Path) -> io::Result<Option<CgroupRef>> {
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return Ok(None);
    }
    let rel = dir.strip_prefix(mount).map_err(|_| {
        io::Error::other(format!(
            "{} is not under the cgroup mount {}",
            dir.display(),
            mount.display()
        ))
    })?;
    Ok(Some(CgroupRef {
        id: meta.ino(),
        level: rel.components().count() as u32,
    }))
}
