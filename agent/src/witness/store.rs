//! The witness's state on disk (one redb file): each origin's record, and fork evidence. Writes
//! are group-committed: every request waiting when a commit starts shares its one fsync, and
//! none is answered before its write is durable.

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use std::{
    path::Path,
    sync::{Arc, Condvar, Mutex},
};
use tokio::sync::oneshot;

/// origin → its record (JSON).
const ORIGINS: TableDefinition<&str, &[u8]> = TableDefinition::new("origins");
/// (origin, number) → fork evidence (JSON).
const FORKS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("forks");

/// One write.
#[derive(Debug)]
pub enum Write {
    /// An origin's record.
    Origin(String, Vec<u8>),
    /// Fork evidence for an origin (numbered after the ones stored).
    Fork(String, Vec<u8>),
}

type Pending = Vec<(Write, oneshot::Sender<Result<(), String>>)>;

/// The queue of writes and whether the store is closing.
#[derive(Default)]
struct Queue {
    pending: Pending,
    closing: bool,
}

/// The store.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    queue: Arc<(Mutex<Queue>, Condvar)>,
    committer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) `path`, and starts its committer thread.
    pub fn open(path: &Path) -> Result<Store, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        // A witness holds one small record per origin: redb's default 1 GiB page cache would let
        // its RSS grow with the file for nothing.
        let db = redb::Builder::new()
            .set_cache_size(4 << 20)
            .create(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        tx.open_table(ORIGINS).map_err(|e| e.to_string())?;
        tx.open_table(FORKS).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
        let store = Store {
            db: Arc::new(db),
            queue: Arc::new((Mutex::new(Queue::default()), Condvar::new())),
            committer: Arc::new(Mutex::new(None)),
        };
        let (db, queue) = (store.db.clone(), store.queue.clone());
        let handle = std::thread::Builder::new()
            .name("witness-store".into())
            .spawn(move || commit_loop(&db, &queue))
            .map_err(|e| format!("starting the witness store thread: {e}"))?;
        *store.committer.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(store)
    }

    /// Every origin's record.
    pub fn origins(&self) -> Result<Vec<(String, Vec<u8>)>, String> {
        let tx = self.db.begin_read().map_err(|e| e.to_string())?;
        let t = tx.open_table(ORIGINS).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| e.to_string())? {
            let (k, v) = entry.map_err(|e| e.to_string())?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// An origin's fork evidence, oldest first.
    pub fn forks(&self, origin: &str) -> Result<Vec<Vec<u8>>, String> {
        let tx = self.db.begin_read().map_err(|e| e.to_string())?;
        let t = tx.open_table(FORKS).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for entry in t
            .range((origin, 0)..=(origin, u64::MAX))
            .map_err(|e| e.to_string())?
        {
            out.push(entry.map_err(|e| e.to_string())?.1.value().to_vec());
        }
        Ok(out)
    }

    /// Writes durably; returns once committed.
    pub async fn write(&self, w: Write) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        {
            let (lock, wake) = &*self.queue;
            let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
            if q.closing {
                return Err("the witness store is closed".into());
            }
            q.pending.push((w, tx));
            wake.notify_one();
        }
        rx.await
            .map_err(|_| "the witness store stopped".to_owned())?
    }

    /// Commits what is queued, stops the committer thread and waits for it (the database file
    /// is then closed once the last handle goes).
    pub fn close(&self) {
        {
            let (lock, wake) = &*self.queue;
            lock.lock().unwrap_or_else(|e| e.into_inner()).closing = true;
            wake.notify_one();
        }
        let handle = self
            .committer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            // A panicked committer already answered nobody: nothing more to do.
            let _ = h.join();
        }
    }
}

fn commit_loop(db: &Database, queue: &(Mutex<Queue>, Condvar)) {
    let (lock, wake) = queue;
    loop {
        let (batch, closing) = {
            let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
            while q.pending.is_empty() && !q.closing {
                q = wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            (std::mem::take(&mut q.pending), q.closing)
        };
        if !batch.is_empty() {
            let result = commit(db, batch.iter().map(|(w, _)| w));
            for (_, reply) in batch {
                // The requester gave up (its connection closed): nothing to tell.
                let _ = reply.send(result.clone());
            }
        }
        if closing {
            return;
        }
    }
}

fn commit<'a>(db: &Database, writes: impl Iterator<Item = &'a Write>) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| format!("witness store: {e}");
    let tx = db.begin_write().map_err(|x| e(&x))?;
    {
        let mut origins = tx.open_table(ORIGINS).map_err(|x| e(&x))?;
        let mut forks = tx.open_table(FORKS).map_err(|x| e(&x))?;
        for w in writes {
            match w {
                Write::Origin(origin, record) => {
                    origins
                        .insert(origin.as_str(), &record[..])
                        .map_err(|x| e(&x))?;
                }
                Write::Fork(origin, evidence) => {
                    let next = forks
                        .range((origin.as_str(), 0)..=(origin.as_str(), u64::MAX))
                        .map_err(|x| e(&x))?
                        .next_back()
                        .transpose()
                        .map_err(|x| e(&x))?
                        .map_or(0, |(k, _)| k.value().1 + 1);
                    forks
                        .insert((origin.as_str(), next), &evidence[..])
                        .map_err(|x| e(&x))?;
                }
            }
        }
    }
    tx.commit().map_err(|x| e(&x))
}
