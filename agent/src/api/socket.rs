//! The API's Unix socket (the default without mTLS): created by root in a directory only root
//! may write, mode 0600 (0660 with `agent.api_socket_group`), and every connection's peer
//! credentials (`SO_PEERCRED`, `SO_PEERGROUPS`) checked before any byte of it is read: root, the
//! agent's own uid, or a process in the configured group. Anyone else is disconnected and logged.

use crate::secure_dir;
use std::{
    ffi::CString,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{wrappers::UnixListenerStream, Stream, StreamExt};

/// Who may use the socket besides root and the agent's own uid.
#[derive(Debug, Clone)]
pub struct Group {
    /// `agent.api_socket_group`.
    pub name: String,
    /// Its gid.
    pub gid: u32,
}

/// A bound API socket; the file is removed when this (or the server holding it) is dropped,
/// if it is still the socket bound here.
#[derive(Debug)]
pub struct UnixApiListener {
    listener: UnixListener,
    path: PathBuf,
    group: Option<Group>,
    inode: (u64, u64),
}

impl UnixApiListener {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes the socket file on drop if it is still the one bound here.
#[derive(Debug)]
pub(super) struct SocketFile {
    path: PathBuf,
    inode: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.inode {
                // Best effort on exit: a socket left behind is replaced at the next start.
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Creates the socket's directory if missing (else checks it), removes a stale socket, and
/// binds `path` with mode 0600 (0660 of `group`). An error names the path and what to do.
pub(super) fn bind(path: &Path, group: Option<&str>) -> Result<UnixApiListener, String> {
    let group = group.map(resolve_group).transpose()?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| format!("agent.api_socket {}: not a path to a file", path.display()))?;
    let created = secure_dir::ensure_dir(dir, 0o750, group.as_ref().map(|g| g.gid))
        .map_err(|e| format!("agent.api_socket {}: its directory: {e}", path.display()))?;
    if let (false, Some(g)) = (created, &group) {
        let m = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mode = m.permissions().mode();
        let reachable = mode & 0o001 != 0 || (m.gid() == g.gid && mode & 0o010 != 0);
        if !reachable {
            tracing::warn!(
                "members of group {} cannot reach the API socket: its directory {} is mode {:04o}, group {}; \
                 chgrp {} {} and chmod 0750 it",
                g.name, dir.display(), mode & 0o7777, m.gid(), g.name, dir.display()
            );
        }
    }
    remove_stale(path)?;
    let listener = {
        // The socket is created with mode 0600 (no window in which others could connect): the
        // umask is set around bind(2). Nothing else creates files this early.
        // SAFETY: umask(2) cannot fail.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        bound.map_err(|e| format!("cannot listen on agent.api_socket {}: {e}", path.display()))?
    };
    if let Some(g) = &group {
        std::os::unix::fs::lchown(path, None, Some(g.gid))
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)))
            .map_err(|e| {
                format!(
                    "agent.api_socket {}: giving it to group {}: {e}",
                    path.display(),
                    g.name
                )
            })?;
    }
    let m = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(UnixApiListener {
        listener,
        path: path.to_path_buf(),
        group,
        inode: (m.dev(), m.ino()),
    })
}

/// A socket left by an agent that did not exit cleanly is removed; a socket another process
/// still serves, a symlink, or anything that is not a socket is refused.
fn remove_stale(path: &Path) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("agent.api_socket {}: {e}", path.display())),
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(format!(
            "agent.api_socket {} is a symlink: refusing to follow or replace it; remove it",
            path.display()
        ));
    }
    if !kind.is_socket() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_file() {
            "a regular file"
        } else {
            "not a socket"
        };
        return Err(format!(
            "agent.api_socket {} exists and is {what}, not a socket: refusing to replace it; \
             remove it or choose another path",
            path.display()
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!(
            "agent.api_socket {}: another process is serving on it (another knhk-agent?); stop it first",
            path.display()
        ));
    }
    std::fs::remove_file(path).map_err(|e| {
        format!(
            "agent.api_socket {}: removing the stale socket: {e}",
            path.display()
        )
    })
}

fn resolve_group(name: &str) -> Result<Group, String> {
    let c =
        CString::new(name).map_err(|_| format!("agent.api_socket_group {name:?}: a NUL byte"))?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: all-zero is a valid `group` (plain data and null pointers).
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: the pointers are valid for the call; `buf` outlives the use of `grp`.
        let r = unsafe {
            libc::getgrnam_r(
                c.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if r == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if r != 0 {
            return Err(format!(
                "agent.api_socket_group {name:?}: looking it up: {}",
                std::io::Error::from_raw_os_error(r)
            ));
        }
        if found.is_null() {
            return Err(format!(
                "agent.api_socket_group {name:?}: no such group on this host (getent group {name})"
            ));
        }
        return Ok(Group {
            name: name.to_owned(),
            gid: grp.gr_gid,
        });
    }
}

/// `SO_PEERGROUPS` (Linux 4.13): the peer's supplementary groups when it connected. Not
/// exported by the `libc` crate for every architecture; 59 on all but a few (alpha, mips,
/// parisc, sparc) that this agent does not run on.
const SO_PEERGROUPS: libc::c_int = 59;

/// The supplementary groups of the process that connected `stream` (at `connect()` time, like
/// `SO_PEERCRED`).
fn peer_groups(stream: &UnixStream) -> std::io::Result<Vec<libc::gid_t>> {
    use std::os::fd::AsRawFd;
    let size = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * size) as libc::socklen_t;
        // SAFETY: `groups` has room for `len` bytes; the kernel writes at most that many and
        // sets `len` to what it wrote (or, with ERANGE, to what it needs).
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            groups.truncate(len as usize / size);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        let needed = len as usize / size;
        if e.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= 1 << 16 {
            groups.resize(needed, 0);
            continue;
        }
        return Err(e);
    }
}

/// Admits root, the agent's own uid, and processes in `group` (as their primary or a
/// supplementary group when they connected); `Err` says who was refused.
fn admit(stream: &UnixStream, group: Option<&Group>) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("reading its peer credentials failed ({e})"))?;
    let (uid, gid) = (cred.uid(), cred.gid());
    let who = match cred.pid() {
        Some(pid) => format!("uid {uid} gid {gid} pid {pid}"),
        None => format!("uid {uid} gid {gid}"),
    };
    if uid == 0 || uid == secure_dir::euid() {
        return Ok(());
    }
    let Some(group) = group else {
        return Err(format!(
            "{who} is not root (only root may use the API; see agent.api_socket_group)"
        ));
    };
    if gid == group.gid {
        return Ok(());
    }
    let groups =
        peer_groups(stream).map_err(|e| format!("{who}: reading its groups failed ({e})"))?;
    if groups.contains(&group.gid) {
        Ok(())
    } else {
        Err(format!(
            "{who} is neither root nor in group {} (gid {})",
            group.name, group.gid
        ))
    }
}

/// Accepts connections and yields those whose peer is admitted; the others are closed at once,
/// before any byte is read, and logged. Ends when the consumer drops it.
pub(super) fn incoming(
    listener: UnixApiListener,
) -> impl Stream<Item = std::io::Result<UnixStream>> {
    let UnixApiListener {
        listener,
        path,
        group,
        ..
    } = listener;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut accepted = UnixListenerStream::new(listener);
        loop {
            let stream = tokio::select! {
                s = accepted.next() => match s {
                    Some(Ok(s)) => s,
                    Some(Err(e)) => {
                        // E.g. out of file descriptors: wait rather than spin.
                        tracing::warn!("accepting a gRPC connection on {} failed: {e}", path.display());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    None => return,
                },
                _ = tx.closed() => return,
            };
            match admit(&stream, group.as_ref()) {
                Ok(()) => {
                    if tx.send(Ok(stream)).await.is_err() {
                        return;
                    }
                }
                Err(why) => tracing::warn!(
                    "refused a connection to the API socket {}: {why}",
                    path.display()
                ),
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

pub(super) fn socket_file(l: &UnixApiListener) -> SocketFile {
    SocketFile {
        path: l.path.clone(),
        inode: l.inode,
    }
}
