//! Directories that only the agent may write: checks that never follow a symlink, creation of
//! missing ones with a chosen mode and group, and fresh private (0700) directories with
//! `mkdtemp`'s exclusive-create semantics. Used for the API socket's directory and for
//! `agent.state_dir`. No domain knowledge.

use std::{
    ffi::{CString, OsString},
    os::unix::{
        ffi::OsStringExt,
        fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    },
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

/// Creates a fresh directory `<parent>/<prefix>XXXXXX` with mode 0700 (`mkdtemp(3)`: a random
/// name, created exclusively, so nothing planted beforehand can be reused), after checking
/// `parent` with [`ensure_dir`] (created 0700 if missing).
pub fn private_dir(parent: &Path, prefix: &str) -> Result<PathBuf, DirError> {
    ensure_dir(parent, 0o700, None)?;
    let mut template = parent
        .join(format!("{prefix}XXXXXX"))
        .into_os_string()
        .into_vec();
    template.push(0);
    let template_c = CString::from_vec_with_nul(template).map_err(|_| DirError::Io {
        path: parent.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte in the path"),
    })?;
    let mut buf = template_c.into_bytes_with_nul();
    // SAFETY: `buf` is a NUL-terminated template ending in "XXXXXX", which mkdtemp rewrites in
    // place; it lives across the call.
    let made = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) };
    if made.is_null() {
        return Err(io(parent)(std::io::Error::last_os_error()));
    }
    buf.pop();
    let dir = PathBuf::from(OsString::from_vec(buf));
    let meta = check_dir(&dir)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(DirError::Writable { path: dir, mode });
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn unsafe_directories_are_refused_and_symlinks_never_followed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let good = tmp.path().join("good");
        assert!(ensure_dir(&good, 0o750, None).expect("created"));
        assert_eq!(
            std::fs::metadata(&good).expect("stat").permissions().mode() & 0o7777,
            0o750
        );
        assert!(
            !ensure_dir(&good, 0o700, None).expect("exists"),
            "left as it is"
        );

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&good, &link).expect("symlink");
        assert!(matches!(check_dir(&link), Err(DirError::Symlink(_))));
        assert!(matches!(
            private_dir(&link, "x-"),
            Err(DirError::Symlink(_))
        ));

        let file = tmp.path().join("file");
        std::fs::write(&file, "").expect("write");
        assert!(matches!(check_dir(&file), Err(DirError::NotADirectory(_))));

        let open = tmp.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        chmod(&open, 0o777);
        let e = check_dir(&open).expect_err("world-writable");
        assert!(e.to_string().contains("mode 0777"), "{e}");
        // A child of a world-writable parent without the sticky bit could be swapped.
        let e = ensure_dir(&open.join("child"), 0o700, None).expect_err("parent");
        assert!(matches!(e, DirError::Writable { .. }), "{e}");

        if euid() == 0 {
            let theirs = tmp.path().join("theirs");
            std::fs::create_dir(&theirs).expect("mkdir");
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
            let e = check_dir(&theirs).expect_err("not ours");
            assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        }
    }

    #[test]
    fn private_directories_are_fresh_and_0700() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = tmp.path().join("state");
        let a = private_dir(&state, "identity-").expect("first");
        let b = private_dir(&state, "identity-").expect("second");
        assert_ne!(a, b);
        for d in [&a, &b] {
            assert!(d.starts_with(&state));
            let name = d.file_name().expect("name").to_string_lossy().into_owned();
            assert!(name.starts_with("identity-") && name.len() == 15, "{name}");
            assert_eq!(
                std::fs::metadata(d).expect("stat").permissions().mode() & 0o7777,
                0o700
            );
        }
        assert_eq!(
            std::fs::metadata(&state)
                .expect("stat")
                .permissions()
                .mode()
                & 0o7777,
            0o700
        );
    }
}
