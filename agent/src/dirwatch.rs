//! Watching directories for subdirectories made and removed (inotify), for the two followers of
//! the cgroup tree: rule cgroups ([`crate::datapath`]'s follower) and pods ([`crate::workloads`]).
//!
//! One inotify instance per [`DirWatcher`]. Watches are added and removed through a
//! [`WatchHandle`] (which a synchronous caller may hold); [`DirWatcher::changed`] waits for the
//! next batch of [`Change`]s. Each watch costs the kernel about 1 KiB and counts against
//! `fs.inotify.max_user_watches` (per user, shared by every process of root): at the limit,
//! [`WatchHandle::watch`] fails with `ENOSPC` and the caller must fall back to rereading what it
//! could not watch. Without inotify at all, nothing is ever reported and every watch fails.

use std::{ffi::OsString, io, path::Path, time::Duration};
use tokio_stream::StreamExt;
use tracing::warn;

/// Identifies one watched directory (the kernel's watch descriptor).
pub type WatchId = inotify::WatchDescriptor;

/// Something that happened in the watched directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An entry named `name` was made, removed or renamed in the directory of `watch`.
    Entry {
        /// The directory's watch.
        watch: WatchId,
        /// The entry's name.
        name: OsString,
    },
    /// The watched directory itself was removed (or unmounted): its watch is gone.
    Gone {
        /// The directory's (former) watch.
        watch: WatchId,
    },
    /// The kernel's event queue overflowed: events were lost, so everything watched must be
    /// read again.
    Overflow,
}

/// An inotify instance that reports subdirectories made and removed.
pub struct DirWatcher {
    stream: Option<inotify::EventStream<Vec<u8>>>,
    handle: WatchHandle,
    /// Changes read but not yet returned: kept here, not in the future, so that a
    /// [`DirWatcher::changed`] dropped in a `select!` loses nothing.
    pending: Vec<Change>,
}

/// Adds and removes the watches of a [`DirWatcher`]; cheap to clone, usable from any thread.
#[derive(Clone, Debug)]
pub struct WatchHandle {
    watches: Option<inotify::Watches>,
}

impl DirWatcher {
    /// A new instance; `what` names what goes unwatched when inotify is unavailable (logged).
    pub fn new(what: &str) -> DirWatcher {
        let stream = inotify::Inotify::init()
            .and_then(|i| i.into_event_stream(vec![0u8; 16 * 1024]))
            .map_err(|e| warn!(error = %e, "inotify is unavailable: {what}"))
            .ok();
        let handle = WatchHandle {
            watches: stream.as_ref().map(|s| s.watches()),
        };
        DirWatcher {
            stream,
            handle,
            pending: Vec::new(),
        }
    }

    /// Whether inotify works (otherwise [`DirWatcher::changed`] never resolves).
    pub fn available(&self) -> bool {
        self.stream.is_some()
    }

    /// The handle that adds and removes this instance's watches.
    pub fn handle(&self) -> WatchHandle {
        self.handle.clone()
    }

    /// Resolves with the next batch of changes: the first event and every event queued within
    /// a millisecond of it (a burst is handled once). Never resolves without inotify.
    ///
    /// Cancel-safe: changes read by a call that is dropped before it resolves (another branch of
    /// a `select!` won) are returned by the next call.
    pub async fn changed(&mut self) -> Vec<Change> {
        let DirWatcher {
            stream, pending, ..
        } = self;
        let Some(stream) = stream.as_mut() else {
            return std::future::pending().await;
        };
        if pending.is_empty() {
            match stream.next().await {
                Some(Ok(e)) => pending.extend(change_of(e)),
                // A read error or the end of the stream: treat as lost events.
                Some(Err(_)) | None => pending.push(Change::Overflow),
            }
        }
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(1), stream.next()).await
        {
            match e {
                Ok(e) => pending.extend(change_of(e)),
                Err(_) => pending.push(Change::Overflow),
            }
        }
        std::mem::take(pending)
    }
}

impl WatchHandle {
    /// Watches `dir` for subdirectories made, removed or renamed, and for its own removal.
    /// Watching a directory twice returns the same id. Fails with `ENOSPC` at
    /// `fs.inotify.max_user_watches`, and always without inotify.
    pub fn watch(&mut self, dir: &Path) -> io::Result<WatchId> {
        let Some(watches) = self.watches.as_mut() else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "inotify is unavailable",
            ));
        };
        let mask = inotify::WatchMask::CREATE
            | inotify::WatchMask::DELETE
            | inotify::WatchMask::MOVE
            | inotify::WatchMask::DELETE_SELF
            | inotify::WatchMask::ONLYDIR;
        watches.add(dir, mask)
    }

    /// Removes a watch (one already gone is not an error).
    pub fn unwatch(&mut self, watch: WatchId) {
        if let Some(watches) = self.watches.as_mut() {
            // EINVAL: the directory was removed, and its watch with it.
            let _ = watches.remove(watch);
        }
    }
}

fn change_of(e: inotify::EventOwned) -> Option<Change> {
    use inotify::EventMask as M;
    if e.mask.contains(M::Q_OVERFLOW) {
        return Some(Change::Overflow);
    }
    if e.mask.intersects(M::IGNORED | M::DELETE_SELF | M::UNMOUNT) {
        return Some(Change::Gone { watch: e.wd });
    }
    e.name.map(|name| Change::Entry { watch: e.wd, name })
}

/// Whether `e` is `ENOSPC` from [`WatchHandle::watch`]: the user's inotify watches are used up.
pub fn is_watch_limit(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch is read, then the call is dropped (a `select!` branch that is ready on its third
    /// poll wins while `changed` waits for the rest of the burst): the next call returns it.
    #[tokio::test]
    async fn a_change_read_by_a_dropped_call_is_returned_by_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = DirWatcher::new("test");
        assert!(w.available(), "inotify is unavailable");
        let watch = w.handle().watch(dir.path()).expect("watch");
        std::fs::create_dir(dir.path().join("first")).expect("mkdir");
        let first = w.changed().await;
        assert_eq!(
            first,
            [Change::Entry {
                watch: watch.clone(),
                name: "first".into()
            }]
        );
        std::fs::create_dir(dir.path().join("second")).expect("mkdir");
        let won = tokio::select! {
            biased;
            c = w.changed() => c,
            () = async {
                tokio::task::yield_now().await;
                tokio::task::yield_now().await;
            } => Vec::new(),
        };
        let next = if won.is_empty() {
            tokio::time::timeout(Duration::from_secs(2), w.changed())
                .await
                .expect("the change read by the dropped call is lost")
        } else {
            won
        };
        assert_eq!(
            next,
            [Change::Entry {
                watch,
                name: "second".into()
            }]
        );
    }
}
