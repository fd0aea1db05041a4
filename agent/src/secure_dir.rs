//! Directories that only the agent may write: checks that never follow a symlink, creation of
//! missing ones with a chosen mode and group. Used for the API socket's directory. No domain
//! knowledge.

use std::{
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// Why a directory is not safe to use.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The path is a symlink (never followed).
    #[error("{0} is a symlink: refusing to follow it (use the real directory's path)")]
    Symlink(PathBuf),
    /// The path exists and is not a directory.
    #[error("{0} exists and is not a directory")]
    NotADirectory(PathBuf),
    /// Owned by someone else: they could replace what the agent puts there.
    #[error(
        "{path} is owned by uid {uid}, not by root or this agent (uid {ours}): its owner could \
         replace what the agent keeps there; use a directory owned by root (chown root {path})"
    )]
    Owner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// The agent's effective uid.
        ours: u32,
    },
    /// Writable by group or others (without the sticky bit, for a parent).
    #[error(
        "{path} has mode {mode:04o}: it is writable by group or others, who could replace what \
         the agent keeps there (chmod go-w {path})"
    )]
    Writable {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A system call failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DirError + '_ {
    move |source| DirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The agent's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    unsafe { libc::geteuid() }
}

/// Checks that `path` is a directory (a symlink is refused, never followed), owned by root or
/// the agent's effective uid, and not writable by group or others.
pub fn check_dir(path: &Path) -> Result<std::fs::Metadata, DirError> {
    let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
    if meta.file_type().is_symlink() {
        return Err(DirError::Symlink(path.to_path_buf()));
    }
    if !meta.is_dir() {
        return Err(DirError::NotADirectory(path.to_path_buf()));
    }
    let ours = euid();
    if meta.uid() != 0 && meta.uid() != ours {
        return Err(DirError::Owner {
            path: path.to_path_buf(),
            uid: meta.uid(),
            ours,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(DirError::Writable {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(meta)
}

/// Checks the parent of a directory the agent keeps things in: whoever may write it could
/// rename that directory away and put another in its place. A parent writable by group or others
/// is accepted only with the sticky bit (as `/tmp`), where only a file's owner may rename it.
fn check_parent(path: &Path) -> Result<(), DirError> {
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    let meta = std::fs::metadata(parent).map_err(io(parent))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(DirError::Writable {
            path: parent.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Makes sure `path` is a directory only the agent may write: creates it (one level; its parent
/// must exist) with `mode` and, when given, group `gid`; or, when it exists, checks it with
/// [`check_dir`] and leaves it as it is. Returns whether it was created.
pub fn ensure_dir(path: &Path, mode: u32, gid: Option<u32>) -> Result<bool, DirError> {
    check_parent(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(_) => {
            check_dir(path)?;
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // mkdir(2) never follows a symlink in the last component and fails if anything
            // appeared there meanwhile.
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(path)
                .map_err(io(path))?;
            if let Some(gid) = gid {
                std::os::unix::fs::lchown(path, None, Some(gid)).map_err(io(path))?;
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(io(path))?;
            check_dir(path)?;
            Ok(true)
        }
        Err(e) => Err(io(path)(e)),
    }
}
