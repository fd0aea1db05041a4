//! The receipts archive: the ledger's receipts, signed checkpoints and key history copied to
//! S3-compatible storage as immutable, content-addressed objects under Object Lock
//! (`[archive]`, the `s3` feature). Layout and formats: `docs/receipts.md`, "Archive".
//!
//! A background task ([`Archive::start`]) uploads in rounds every `upload_interval_ms`: the
//! key records not yet archived, then the receipts up to the newest signed checkpoint in
//! segments of at most `segment_max_receipts` (cut at multiples of it and at signed
//! checkpoints' sizes, so a restart derives the same segments and names), then the signed
//! checkpoints they complete. Each object is written once: `HEAD`, then one `PutObject` with
//! `If-None-Match: *`, the lock mode and retain-until date, and the legal hold when an active
//! hold covers one of its receipts. Progress is kept in the ledger's meta
//! ([`META_ARCHIVE_ACKED_SIZE`]); the backlog stays in the ledger (never more than one segment
//! in memory), and the ledger's compaction removes only payloads the archive acknowledged.
//! Calls are retried with backoff inside a circuit breaker; readiness names an outage with the
//! backlog. Holds placed or released through the agent set or clear the S3 legal hold of every
//! archived segment they cover ([`Archive::sync_legal_holds`]).
//!
//! [`restore`] rebuilds a ledger file from an archive, for `receipts verify --s3`.

pub mod layout;
mod restore;

pub use restore::{restore, RestoreReport};

use crate::{
    config::ArchiveSettings,
    objectstore::{Created, ObjectLock, ObjectStore, ObjectUrl, StoreError, StoreSettings},
    receipts::{
        ledger::{EncodedReceipt, META_ARCHIVE_ACKED_SIZE, META_ARCHIVE_GATE},
        Hold, Ledger, LedgerError, Receipt, StoredCheckpoint,
    },
    resilience::{CircuitBreaker, CircuitState},
    tasks::{Stop, TaskGroup},
};
use backon::Retryable as _;
use layout::ObjectKind;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Meta: how many key records are archived (decimal ASCII).
const META_ACKED_KEYS: &str = "archive_acked_keys";
/// Meta: the next checkpoint number to archive (decimal ASCII).
const META_ACKED_CHECKPOINT: &str = "archive_next_checkpoint";
/// Meta: the names (below the prefix) of segments whose legal hold is on, JSON array.
const META_LEGAL_HOLDS: &str = "archive_legal_holds";
/// Meta: the holds the legal holds were last set for (their JSON's SHA-256, hex).
const META_HOLDS_APPLIED: &str = "archive_holds_applied";

/// Why the archive failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The ledger.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The object store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Metrics registration.
    #[error("registering archive metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl ArchiveError {
    fn reason(&self) -> &'static str {
        match self {
            ArchiveError::Ledger(_) => "ledger",
            ArchiveError::Store(e) => e.reason(),
            ArchiveError::Metrics(_) => "metrics",
        }
    }
}

/// Sets or clears the compaction gate of `ledger`: while an archive is configured, compaction
/// removes only payloads the archive acknowledged. Call before compaction can run.
pub fn set_compaction_gate(ledger: &Ledger, archive_configured: bool) -> Result<(), LedgerError> {
    if archive_configured {
        ledger.put_meta(META_ARCHIVE_GATE, b"1")
    } else if ledger.meta(META_ARCHIVE_GATE)?.is_some() {
        ledger.put_meta(META_ARCHIVE_GATE, b"0")
    } else {
        Ok(())
    }
}

fn meta_u64(ledger: &Ledger, name: &str) -> Result<u64, LedgerError> {
    Ok(ledger
        .meta(name)?
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
        .unwrap_or(0))
}

fn put_u64(ledger: &Ledger, name: &str, v: u64) -> Result<(), LedgerError> {
    ledger.put_meta(name, v.to_string().as_bytes())
}

/// A ledger call on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, LedgerError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(LedgerError::Db(format!("a ledger task failed: {e}"))))
}

/// The size a signed checkpoint covers. The one place that reads a checkpoint's text: the rest
/// of the archive treats checkpoints as the ledger's opaque values.
fn signed_size(c: &StoredCheckpoint) -> Option<u64> {
    c.signature.as_ref()?;
    crate::receipts::CheckpointBody::decode(&c.body)
        .ok()
        .map(|b| b.size)
}

#[derive(Clone)]
struct Metrics {
    acked: IntGauge,
    backlog: IntGauge,
    uploads: IntCounterVec,
    receipts: IntCounter,
    failures: IntCounterVec,
    circuit: IntGaugeVec,
    legal_holds: IntGauge,
}

impl Metrics {
    fn new() -> Result<Metrics, prometheus::Error> {
        let uploads = IntCounterVec::new(
            Opts::new(
                "knhk_archive_uploads_total",
                "Objects written to the archive, by kind: segments, checkpoints, keys.",
            ),
            &["object"],
        )?;
        for k in [ObjectKind::Segment, ObjectKind::Checkpoint, ObjectKind::Key] {
            uploads.with_label_values(&[k.as_str()]);
        }
        let failures = IntCounterVec::new(
            Opts::new(
                "knhk_archive_failures_total",
                "Failed archive rounds, by reason: unavailable, refused, not_found, too_large, ledger.",
            ),
            &["reason"],
        )?;
        for r in ["unavailable", "refused", "not_found", "too_large", "ledger"] {
            failures.with_label_values(&[r]);
        }
        let circuit = IntGaugeVec::new(
            Opts::new(
                "knhk_archive_circuit",
                "1 for the archive store's circuit breaker's current state.",
            ),
            &["state"],
        )?;
        Ok(Metrics {
            acked: IntGauge::new(
                "knhk_archive_acked_size",
                "Receipts 0..N are in the archive (the ledger may compact their payloads).",
            )?,
            backlog: IntGauge::new(
                "knhk_archive_backlog_receipts",
                "Receipts in the ledger not yet archived.",
            )?,
            uploads,
            receipts: IntCounter::new(
                "knhk_archive_receipts_total",
                "Receipts archived (in segments written or found already written).",
            )?,
            failures,
            circuit,
            legal_holds: IntGauge::new(
                "knhk_archive_legal_hold_segments",
                "Archived segments whose S3 legal hold is on.",
            )?,
        })
    }

    fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.acked.clone()))?;
        registry.register(Box::new(self.backlog.clone()))?;
        registry.register(Box::new(self.uploads.clone()))?;
        registry.register(Box::new(self.receipts.clone()))?;
        registry.register(Box::new(self.failures.clone()))?;
        registry.register(Box::new(self.circuit.clone()))?;
        registry.register(Box::new(self.legal_holds.clone()))?;
        Ok(())
    }

    fn circuit_state(&self, state: CircuitState) {
        for s in CircuitState::ALL {
            self.circuit
                .with_label_values(&[s.as_str()])
                .set(i64::from(s == state));
        }
    }
}

/// What one upload round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// Objects written now.
    pub written: u64,
    /// Objects found already written (an earlier round's, before a crash).
    pub existed: u64,
    /// Receipts archived by this round.
    pub receipts: u64,
    /// Legal holds set or cleared.
    pub legal_hold_changes: u64,
}

/// The running archive.
pub struct Archive {
    settings: ArchiveSettings,
    ledger: Ledger,
    store: ObjectStore,
    breaker: CircuitBreaker,
    metrics: Metrics,
    last_error: Mutex<Option<String>>,
    /// One round at a time (the task's, or a caller's [`Archive::round`]).
    round_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive")
            .field("url", &self.settings.url)
            .finish_non_exhaustive()
    }
}

impl Archive {
    /// An archive of `ledger` to the store of `settings` (nothing contacted yet), its metrics
    /// registered in `registry`, and the compaction gate set.
    pub async fn new(
        settings: ArchiveSettings,
        ledger: Ledger,
        registry: &Registry,
    ) -> Result<Arc<Archive>, ArchiveError> {
        let store = ObjectStore::connect(&StoreSettings {
            endpoint_url: settings.endpoint_url.clone(),
            region: settings.region.clone(),
            force_path_style: settings.force_path_style,
            timeout: settings.timeout,
        })
        .await?;
        let metrics = Metrics::new()?;
        metrics.register(registry)?;
        metrics.circuit_state(CircuitState::Closed);
        let l = ledger.clone();
        blocking(move || set_compaction_gate(&l, true)).await?;
        let archive = Arc::new(Archive {
            settings,
            ledger,
            store,
            breaker: CircuitBreaker::new(3, Duration::from_secs(5)),
            metrics,
            last_error: Mutex::new(None),
            round_lock: tokio::sync::Mutex::new(()),
        });
        archive.update_backlog();
        Ok(archive)
    }

    /// [`Archive::new`] and its upload task, returned as a group for the caller to own.
    pub async fn start(
        settings: ArchiveSettings,
        ledger: Ledger,
        registry: &Registry,
    ) -> Result<(Arc<Archive>, TaskGroup), ArchiveError> {
        let archive = Archive::new(settings, ledger, registry).await?;
        let mut tasks = TaskGroup::new("archive");
        let stop = tasks.stop_signal();
        tasks.spawn("uploader", Arc::clone(&archive).run(stop));
        Ok((archive, tasks))
    }

    async fn run(self: Arc<Self>, mut stop: Stop) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.settings.upload_interval) => {}
                _ = stop.requested() => return,
            }
            if let Err(wait) = self.breaker.allow() {
                self.metrics.circuit_state(self.breaker.state());
                tracing::debug!(
                    wait_ms = wait.as_millis() as u64,
                    "archive: circuit open, round skipped"
                );
                continue;
            }
            let result = tokio::select! {
                r = self.round_inner() => r,
                _ = stop.requested() => return,
            };
            match result {
                Ok(r) => {
                    self.breaker.success();
                    if let Ok(mut e) = self.last_error.lock() {
                        *e = None;
                    }
                    if r.written > 0 || r.legal_hold_changes > 0 {
                        tracing::debug!(?r, "archive: round done");
                    }
                }
                Err(e) => {
                    self.breaker.failure();
                    self.metrics.failures.with_label_values(&[e.reason()]).inc();
                    tracing::warn!(url = %self.settings.url, "archive: upload failed (retried next round): {e}");
                    if let Ok(mut last) = self.last_error.lock() {
                        *last = Some(e.to_string());
                    }
                }
            }
            self.metrics.circuit_state(self.breaker.state());
            self.update_backlog();
        }
    }

    /// Runs one upload round now (outside the breaker): every key record, receipt and signed
    /// checkpoint not yet archived, and the legal holds.
    pub async fn round(&self) -> Result<Round, ArchiveError> {
        let r = self.round_inner().await;
        self.update_backlog();
        r
    }

    /// Receipts `0..N` are archived: N.
    pub fn acked_size(&self) -> u64 {
        meta_u64(&self.ledger, META_ARCHIVE_ACKED_SIZE).unwrap_or(0)
    }

    /// Receipts in the ledger not yet archived.
    pub fn backlog(&self) -> Result<u64, LedgerError> {
        Ok(self.ledger.size()?.saturating_sub(self.acked_size()))
    }

    fn update_backlog(&self) {
        let acked = self.acked_size();
        self.metrics.acked.set(acked as i64);
        if let Ok(b) = self.backlog() {
            self.metrics.backlog.set(b as i64);
        }
    }

    fn url(&self, rel: &str) -> ObjectUrl {
        ObjectUrl {
            bucket: self.settings.bucket.clone(),
            key: layout::under(&self.settings.prefix, rel),
        }
    }

    fn lock(&self, legal_hold: bool) -> ObjectLock {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        ObjectLock {
            mode: self.settings.lock_mode,
            retain_until_secs: now + self.settings.retention_days as i64 * 86_400,
            legal_hold,
        }
    }

    /// A store call with retries (transient failures only).
    async fn retried<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        f.retry(crate::resilience::backoff(
            Duration::from_millis(100),
            Duration::from_secs(2),
            2,
        ))
        .when(|e: &StoreError| matches!(e, StoreError::Unavailable { .. }))
        .await
    }

    /// Writes one object once: `HEAD`, then a conditional, locked `PutObject`.
    async fn put_once(
        &self,
        kind: ObjectKind,
        rel: &str,
        body: Vec<u8>,
        legal_hold: bool,
    ) -> Result<Created, StoreError> {
        let url = self.url(rel);
        if self.retried(|| self.store.head(&url)).await?.is_some() {
            return Ok(Created::Existed);
        }
        let content_type = match kind {
            ObjectKind::Segment => "application/octet-stream",
            _ => "application/json",
        };
        let lock = self.lock(legal_hold);
        let created = self
            .retried(|| {
                self.store
                    .create_locked(&url, body.clone(), content_type, &lock)
            })
            .await?;
        if created == Created::Written {
            self.metrics
                .uploads
                .with_label_values(&[kind.as_str()])
                .inc();
        }
        Ok(created)
    }

    async fn round_inner(&self) -> Result<Round, ArchiveError> {
        let _one = self.round_lock.lock().await;
        let mut round = Round::default();
        let count = |round: &mut Round, c: Created| match c {
            Created::Written => round.written += 1,
            Created::Existed => round.existed += 1,
        };
        // 1. The key history.
        let l = self.ledger.clone();
        let (keys, acked_keys) =
            blocking(move || Ok((l.keys()?, meta_u64(&l, META_ACKED_KEYS)?))).await?;
        for (i, k) in keys.iter().enumerate().skip(acked_keys as usize) {
            let body = serde_json::to_vec(k).map_err(|e| LedgerError::Db(e.to_string()))?;
            let rel = layout::key_name(i as u64, &body);
            let c = self.put_once(ObjectKind::Key, &rel, body, false).await?;
            count(&mut round, c);
            let l = self.ledger.clone();
            blocking(move || put_u64(&l, META_ACKED_KEYS, i as u64 + 1)).await?;
        }
        // 2. Receipts up to the newest signed checkpoint, then that checkpoint.
        let l = self.ledger.clone();
        let (mut acked, next_checkpoint, holds) = blocking(move || {
            Ok((
                meta_u64(&l, META_ARCHIVE_ACKED_SIZE)?,
                meta_u64(&l, META_ACKED_CHECKPOINT)?,
                l.holds()?,
            ))
        })
        .await?;
        // Holds placed since the last round reach the segments already archived first.
        round.legal_hold_changes += self.sync_legal_holds(&holds, acked).await?;
        let active: Vec<Hold> = holds
            .iter()
            .filter(|h| h.released_ns.is_none())
            .cloned()
            .collect();
        let l = self.ledger.clone();
        let newest = blocking(move || {
            let mut newest = None;
            l.checkpoints_newest_first(|n, c| match signed_size(&c) {
                Some(size) => {
                    newest = Some((n, c, size));
                    false
                }
                None => true,
            })?;
            Ok(newest)
        })
        .await?;
        if let Some((number, checkpoint, size)) = newest {
            while acked < size {
                let from = acked;
                let existing = self.existing_segment(from).await?;
                let end = match &existing {
                    Some(name) => name.end,
                    None => layout::next_boundary(from, size, self.settings.segment_max_receipts),
                };
                let l = self.ledger.clone();
                let entries: Vec<EncodedReceipt> =
                    blocking(move || l.encoded_receipts(from, end.saturating_sub(from) as usize))
                        .await?;
                if end <= from || entries.len() as u64 != end - from {
                    return Err(LedgerError::Corrupt(format!(
                        "receipts {from}..{end} are not all in the ledger"
                    ))
                    .into());
                }
                let covered = segment_covered(&entries, &active);
                let body = layout::encode_segment(&entries);
                drop(entries);
                let rel = layout::segment_name(from, end, &body);
                let created = match existing {
                    // Written before a crash (or by a run whose progress was lost): the same
                    // receipts give the same name, and nothing is written again.
                    Some(name) if rel.ends_with(&format!("-{}.seg", name.sha256)) => {
                        Created::Existed
                    }
                    Some(name) => {
                        return Err(StoreError::Refused {
                            url: self.url(&rel).to_string(),
                            message: format!(
                                "the archive already holds a segment of receipts {from}..{end} with SHA-256 {}, not this ledger's: another ledger writes to this prefix",
                                name.sha256
                            ),
                        }
                        .into())
                    }
                    None => {
                        let url = self.url(&rel);
                        let lock = self.lock(covered);
                        let c = self
                            .retried(|| {
                                self.store.create_locked(
                                    &url,
                                    body.clone(),
                                    "application/octet-stream",
                                    &lock,
                                )
                            })
                            .await?;
                        if c == Created::Written {
                            self.metrics
                                .uploads
                                .with_label_values(&[ObjectKind::Segment.as_str()])
                                .inc();
                        }
                        c
                    }
                };
                count(&mut round, created);
                if covered {
                    // Found written: its hold is set again, to be sure.
                    if created == Created::Existed {
                        let url = self.url(&rel);
                        self.retried(|| self.store.set_legal_hold(&url, true))
                            .await?;
                    }
                    self.note_legal_hold(&rel, true).await?;
                }
                let l = self.ledger.clone();
                blocking(move || put_u64(&l, META_ARCHIVE_ACKED_SIZE, end)).await?;
                acked = end;
                round.receipts += end - from;
                self.metrics.receipts.inc_by(end - from);
                self.metrics.acked.set(end as i64);
            }
            if next_checkpoint <= number {
                let body =
                    serde_json::to_vec(&checkpoint).map_err(|e| LedgerError::Db(e.to_string()))?;
                let rel = layout::checkpoint_name(number, &body);
                let c = self
                    .put_once(ObjectKind::Checkpoint, &rel, body, false)
                    .await?;
                count(&mut round, c);
                let l = self.ledger.clone();
                blocking(move || put_u64(&l, META_ACKED_CHECKPOINT, number + 1)).await?;
            }
        }
        // 3. Legal holds, when the holds changed during the round.
        let l = self.ledger.clone();
        let holds = blocking(move || l.holds()).await?;
        round.legal_hold_changes += self.sync_legal_holds(&holds, acked).await?;
        Ok(round)
    }

    /// The archived segment that starts at receipt `from`, if there is one (`LIST` by its
    /// name's prefix: a segment's name begins with its first receipt).
    async fn existing_segment(&self, from: u64) -> Result<Option<layout::Name>, StoreError> {
        let prefix = layout::under(&self.settings.prefix, &format!("segments/{from:020}-"));
        let strip = layout::under(&self.settings.prefix, "");
        let found = self
            .retried(|| self.store.list(&self.settings.bucket, &prefix))
            .await?;
        Ok(found.iter().find_map(|(key, _)| {
            layout::parse_name(key.strip_prefix(&strip).unwrap_or(key))
                .filter(|n| n.kind == ObjectKind::Segment && n.first == from)
        }))
    }

    /// Records that the legal hold of segment `rel` is on (or off).
    async fn note_legal_hold(&self, rel: &str, on: bool) -> Result<(), LedgerError> {
        let l = self.ledger.clone();
        let rel = rel.to_owned();
        let n = blocking(move || {
            let mut set = legal_hold_set(&l)?;
            if on {
                set.insert(rel);
            } else {
                set.remove(&rel);
            }
            store_legal_hold_set(&l, &set)?;
            Ok(set.len())
        })
        .await?;
        self.metrics.legal_holds.set(n as i64);
        Ok(())
    }

    /// Makes the S3 legal hold of every archived segment (receipts below `acked`) match the
    /// active holds: on where one covers a receipt of the segment, off elsewhere. Runs only
    /// when the holds changed since the last time; returns how many holds were set or cleared.
    pub async fn sync_legal_holds(&self, holds: &[Hold], acked: u64) -> Result<u64, ArchiveError> {
        let fingerprint = layout::sha256_hex(
            &serde_json::to_vec(holds).map_err(|e| LedgerError::Db(e.to_string()))?,
        );
        let l = self.ledger.clone();
        let (applied, mut on) = blocking(move || {
            Ok((
                l.meta(META_HOLDS_APPLIED)?.unwrap_or_default(),
                legal_hold_set(&l)?,
            ))
        })
        .await?;
        if applied == fingerprint.as_bytes() {
            return Ok(0);
        }
        let active: Vec<Hold> = holds
            .iter()
            .filter(|h| h.released_ns.is_none())
            .cloned()
            .collect();
        let prefix = layout::under(&self.settings.prefix, "segments/");
        let objects = self
            .retried(|| self.store.list(&self.settings.bucket, &prefix))
            .await?;
        let strip = layout::under(&self.settings.prefix, "");
        let mut changes = 0;
        for (key, _) in objects {
            let rel = key.strip_prefix(&strip).unwrap_or(&key).to_owned();
            let Some(name) = layout::parse_name(&rel) else {
                continue;
            };
            if name.end > acked {
                continue;
            }
            let might = active.iter().any(|h| {
                h.seq_range
                    .is_none_or(|(a, b)| a < name.end && name.first < b)
            });
            let covered = might && {
                let (l, from, n) = (self.ledger.clone(), name.first, name.end - name.first);
                let entries = blocking(move || l.encoded_receipts(from, n as usize)).await?;
                segment_covered(&entries, &active)
            };
            if covered != on.contains(&rel) {
                let url = self.url(&rel);
                self.retried(|| self.store.set_legal_hold(&url, covered))
                    .await?;
                if covered {
                    on.insert(rel.clone());
                } else {
                    on.remove(&rel);
                }
                changes += 1;
                let (l, set) = (self.ledger.clone(), on.clone());
                blocking(move || store_legal_hold_set(&l, &set)).await?;
            }
        }
        let l = self.ledger.clone();
        blocking(move || l.put_meta(META_HOLDS_APPLIED, fingerprint.as_bytes())).await?;
        self.metrics.legal_holds.set(on.len() as i64);
        if changes > 0 {
            tracing::info!(
                changes,
                on = on.len(),
                "archive: S3 legal holds follow the ledger's holds"
            );
        }
        Ok(changes)
    }

    /// A readiness check: fails while the store's circuit is open or the backlog is past
    /// `max_backlog_receipts`, naming both.
    pub fn readiness_check(
        self: &Arc<Self>,
    ) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let me = Arc::downgrade(self);
        move || {
            let Some(me) = me.upgrade() else {
                return Err("the receipts archive stopped".into());
            };
            let backlog = me
                .backlog()
                .map_err(|e| format!("the receipts ledger cannot be read: {e}"))?;
            let state = me.breaker.state();
            if state != CircuitState::Closed || backlog > me.settings.max_backlog_receipts {
                let last = me.last_error.lock().ok().and_then(|e| e.clone());
                return Err(format!(
                    "the receipts archive {} is unreachable or failing (circuit {}): {backlog} receipts wait to be archived (bound {}); they stay in the ledger, which compacts nothing unarchived, and are uploaded when the store answers{}",
                    me.settings.url,
                    state.as_str(),
                    me.settings.max_backlog_receipts,
                    last.map(|e| format!("; last error: {e}")).unwrap_or_default()
                ));
            }
            Ok(())
        }
    }
}

/// Whether an active hold covers a receipt of the segment.
fn segment_covered(entries: &[EncodedReceipt], active: &[Hold]) -> bool {
    !active.is_empty()
        && entries.iter().any(|(_, encoding, _)| {
            Receipt::decode(encoding).is_ok_and(|r| active.iter().any(|h| h.covers(&r)))
        })
}

fn legal_hold_set(l: &Ledger) -> Result<BTreeSet<String>, LedgerError> {
    match l.meta(META_LEGAL_HOLDS)? {
        Some(v) => serde_json::from_slice(&v)
            .map_err(|e| LedgerError::Corrupt(format!("meta {META_LEGAL_HOLDS}: {e}"))),
        None => Ok(BTreeSet::new()),
    }
}

fn store_legal_hold_set(l: &Ledger, set: &BTreeSet<String>) -> Result<(), LedgerError> {
    let json = serde_json::to_vec(set).map_err(|e| LedgerError::Db(e.to_string()))?;
    l.put_meta(META_LEGAL_HOLDS, &json)
}
