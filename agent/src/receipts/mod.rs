//! The receipts ledger: a signed, append-only, verifiable record of what the agent decided.
//! Format and verification: `docs/receipts.md`.
//!
//! Receipts are written for every policy switch, class-state change, pulse (the cycle summary),
//! key rotation and legal hold. They are appended to an RFC 6962 Merkle log stored in `redb`
//! ([`ledger`]); at every pulse a checkpoint (tree size, root, cycle, node, key) is written
//! after its receipts are durable, and a separate task signs it with the KMS — one KMS call per
//! checkpoint, never per receipt — through retry with backoff and a circuit breaker. While the
//! KMS is unreachable receipts keep being written and checkpoints queue (bounded); readiness
//! shows the backlog. The signing key rotates at least every `rotation_interval_hours`, the old
//! key signing a statement that names the new one. Payloads past their kind's retention are
//! compacted unless a legal hold covers them; headers and hashes stay, so the tree verifies.

pub mod format;
pub mod ledger;
pub mod merkle;
pub mod signer;
pub mod verify;

pub use format::{CheckpointBody, KeyRef, Receipt, ReceiptKind};
pub use ledger::{
    Hold, KeyRecord, Ledger, LedgerError, NewReceipt, StoredCheckpoint, StoredReceipt,
};
pub use signer::{connect as connect_signer, KeyInfo, Signer, SignerError};
pub use verify::{
    trusted_key_fingerprint, verify, verify_file, verify_file_with, verify_with, KeyEntry,
    KmsLookup, Trust, VerifyFileError, VerifyReport,
};

use crate::semconv::{attr, span};
use crate::{
    config::ReceiptSettings,
    model::{CycleSummary, Event},
    resilience::{CircuitBreaker, CircuitState},
    tasks::{Stop, TaskGroup},
};
use backon::Retryable as _;
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use opentelemetry::{
    trace::{Span as _, SpanKind, Tracer as _},
    KeyValue,
};
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::sync::{broadcast, mpsc, oneshot, Notify};

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

#[derive(Clone)]
struct Metrics {
    appended: IntCounterVec,
    size: IntGauge,
    pending: IntGauge,
    signed: IntCounter,
    sign_seconds: Histogram,
    circuit: IntGaugeVec,
    key_age: prometheus::Gauge,
    rotation_overdue: IntGauge,
    lost: IntCounter,
    compacted: IntCounter,
}

impl Metrics {
    fn register(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let appended = IntCounterVec::new(
            Opts::new(
                "knhk_receipts_appended_total",
                "Receipts made durable, by kind.",
            ),
            &["kind"],
        )?;
        let size = IntGauge::new(
            "knhk_receipts_log_size",
            "Receipts in the ledger (its Merkle tree size).",
        )?;
        let pending = IntGauge::new(
            "knhk_receipts_checkpoints_pending",
            "Checkpoints written but not yet signed (the KMS backlog).",
        )?;
        let signed = IntCounter::new(
            "knhk_receipts_checkpoints_signed_total",
            "Checkpoints signed by the KMS.",
        )?;
        let sign_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "knhk_receipts_sign_seconds",
                "KMS sign call latency (successful calls).",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
        )?;
        let circuit = IntGaugeVec::new(
            Opts::new(
                "knhk_receipts_kms_circuit",
                "1 for the KMS circuit breaker's current state.",
            ),
            &["state"],
        )?;
        let key_age = prometheus::Gauge::new(
            "knhk_receipts_signing_key_age_seconds",
            "Seconds since the current signing key became current.",
        )?;
        let rotation_overdue = IntGauge::new(
            "knhk_receipts_key_rotation_overdue",
            "1 while the signing key is older than kms.rotation_interval_hours (rotation failing).",
        )?;
        let lost = IntCounter::new(
            "knhk_receipts_lost_events_total",
            "Events the receipts writer could not keep up with (should stay 0).",
        )?;
        let compacted = IntCounter::new(
            "knhk_receipts_compacted_payloads_total",
            "Receipt payloads removed by retention (headers and hashes stay).",
        )?;
        for m in [
            Box::new(appended.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(size.clone()),
            Box::new(pending.clone()),
            Box::new(signed.clone()),
            Box::new(sign_seconds.clone()),
            Box::new(circuit.clone()),
            Box::new(key_age.clone()),
            Box::new(rotation_overdue.clone()),
            Box::new(lost.clone()),
            Box::new(compacted.clone()),
        ] {
            registry.register(m)?;
        }
        for k in ReceiptKind::ALL {
            appended.with_label_values(&[k.as_str()]);
        }
        Ok(Metrics {
            appended,
            size,
            pending,
            signed,
            sign_seconds,
            circuit,
            key_age,
            rotation_overdue,
            lost,
            compacted,
        })
    }

    fn circuit_state(&self, state: CircuitState) {
        for s in CircuitState::ALL {
            self.circuit
                .with_label_values(&[s.as_str()])
                .set(i64::from(s == state));
        }
    }
}

/// Why the receipts ledger could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptsError {
    /// The database.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The signer (a local cause).
    #[error("kms: {0}")]
    Signer(#[from] SignerError),
    /// Metrics registration.
    #[error("registering receipts metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The writer has stopped (the agent is shutting down): nothing was appended.
    #[error("the receipts writer has stopped; nothing was appended")]
    Stopped,
    /// No hold has that id.
    #[error("no hold {0}")]
    NoSuchHold(u64),
    /// The hold was released before.
    #[error("hold {0} is already released")]
    AlreadyReleased(u64),
    /// The ledger does not verify (tampered or damaged content): the agent will not extend it.
    #[error(
        "the receipts ledger {} does not verify, so the agent will not extend it: {summary}; \
         inspect it with `knhk-agent receipts verify --db {}`, then restore it from a backup or \
         move it away to start a new ledger",
        path.display(),
        path.display()
    )]
    Unverified {
        /// The ledger file.
        path: std::path::PathBuf,
        /// The first problem, and how many there are.
        summary: String,
    },
}

/// Receipts that failed to be written, kept in memory and written once the ledger takes
/// writes again (a full disk freed). Acknowledged appends are never kept: their callers got the
/// error. Beyond this many, the oldest kept are dropped (counted as lost).
const MAX_KEPT: usize = 65_536;

/// How often a failing ledger is closed and opened again to try writing.
const WRITE_RETRY: Duration = Duration::from_millis(250);

/// How often the rotation task looks at the wall clock: a key that became due (on schedule, or
/// because the clock stepped forward) rotates within this.
const ROTATION_LOOK: Duration = Duration::from_secs(5);

/// Why the ledger cannot be written, while it cannot.
#[derive(Debug, Clone)]
struct WriteFailure {
    /// The first error since the last successful write (the cause: later ones are `redb`'s
    /// "previous I/O error" until the database is opened again).
    cause: String,
    /// When it started, ns since the epoch.
    since_ns: i64,
    /// Receipts kept in memory to be written.
    kept: usize,
}

impl WriteFailure {
    fn describe(&self, path: &std::path::Path) -> String {
        let full = self.cause.contains("os error 28") || self.cause.contains("No space left");
        format!(
            "the receipts ledger {} cannot be written for {} s: {}{}; {} receipts wait in memory \
             and are written when it takes writes again, with no restart (enforcement continues; \
             acknowledged receipts are kept)",
            path.display(),
            (now_ns() - self.since_ns).max(0) / 1_000_000_000,
            self.cause,
            if full {
                " (ENOSPC: no space left on its filesystem: free space there)"
            } else {
                ""
            },
            self.kept
        )
    }
}

struct KeyState {
    current: Option<KeyInfo>,
    since_ns: i64,
    problem: Option<String>,
    /// The key history and the KMS disagree on the current key's public key: nothing is
    /// signed (a signature would not verify with the recorded key) until a restart finds them
    /// agreeing.
    conflict: Option<String>,
}

/// Answers an append with its sequence number once durable.
type Ack = oneshot::Sender<Result<u64, LedgerError>>;

enum Command {
    Append(NewReceipt, Ack),
    Pulse(u64, Option<oneshot::Sender<()>>),
}

/// The running ledger: a handle on its writer, signer and rotation tasks.
pub struct Receipts {
    ledger: Ledger,
    signer: Arc<dyn Signer>,
    settings: ReceiptSettings,
    breaker: CircuitBreaker,
    key: Mutex<KeyState>,
    /// The last failed signing attempt, until one succeeds.
    sign_error: Mutex<Option<SignerError>>,
    write_failure: Mutex<Option<WriteFailure>>,
    commands: mpsc::Sender<Command>,
    sign_now: Notify,
    /// Bumped whenever receipts are appended or a checkpoint is signed.
    changes: tokio::sync::watch::Sender<u64>,
    metrics: Metrics,
}

impl std::fmt::Debug for Receipts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receipts")
            .field("ledger", &self.ledger)
            .finish_non_exhaustive()
    }
}

/// Receipt payloads (JSON) of the agent's own kinds. (A `Value` always serializes.)
fn json(v: serde_json::Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// A ledger call on a blocking thread (redb commits are synchronous).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, LedgerError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(LedgerError::Db(format!("a ledger task failed: {e}"))))
}

impl Receipts {
    /// Opens the ledger and starts its tasks (writer, signer, key rotation), returned as a group
    /// for the caller to own. `events` feeds policy switches and class-state changes;
    /// `summaries` (the beat engine's pulses) feeds cycle summaries and paces checkpoints —
    /// without it, a checkpoint is written every second.
    ///
    /// On the group's stop, the writer appends everything already sent to it and writes a final
    /// checkpoint, and the signer makes one last attempt to sign what is unsigned; both within
    /// the deadline given to [`TaskGroup::shutdown`].
    pub async fn start(
        settings: ReceiptSettings,
        signer: Arc<dyn Signer>,
        registry: &Registry,
        events: Option<broadcast::Receiver<Event>>,
        summaries: Option<broadcast::Receiver<CycleSummary>>,
    ) -> Result<(Arc<Receipts>, TaskGroup), ReceiptsError> {
        let ledger = Self::open_ledger(&settings).await?;
        Self::start_on(ledger, settings, signer, registry, events, summaries).await
    }

    /// Opens (or creates) the ledger of `settings` and verifies it before anything extends it
    /// (every receipt and payload, every tree node, every checkpoint's root and signature, the
    /// key-transition chain: [`verify()`]); a damaged file is an error, not a panic, and a
    /// ledger that does not verify is [`ReceiptsError::Unverified`].
    pub async fn open_ledger(settings: &ReceiptSettings) -> Result<Ledger, ReceiptsError> {
        let (path, node, region) = (
            settings.path.clone(),
            settings.node.clone(),
            settings.region.clone(),
        );
        // Verified read-only first: a ledger that is refused is not written (opening it for
        // writing commits).
        let existing = std::fs::metadata(&path).is_ok_and(|m| !m.is_file() || m.len() > 0);
        let started = std::time::Instant::now();
        let report = if existing {
            let p = path.clone();
            let verified = tokio::task::spawn_blocking(move || verify_file(&p))
                .await
                .map_err(|e| LedgerError::Db(e.to_string()))?;
            Some(verified.map_err(|e| match e {
                VerifyFileError::Open { .. } => LedgerError::Db(e.to_string()),
                VerifyFileError::Corrupt { .. } => LedgerError::Corrupt(format!(
                    "{e}; restore it from a backup or move it away to start a new ledger"
                )),
            })?)
        } else {
            None
        };
        if let Some(report) = &report {
            if let Some(first) = report.problems.first() {
                let more = match report.problems.len() {
                    1 => String::new(),
                    n => format!(" (and {} more problems)", n - 1),
                };
                return Err(ReceiptsError::Unverified {
                    path: settings.path.clone(),
                    summary: format!("{first}{more}"),
                });
            }
            tracing::info!(
                receipts = report.receipts,
                checkpoints = report.checkpoints,
                keys = report.keys,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "receipts: the ledger verifies (internal consistency; keys as recorded)"
            );
        }
        let ledger = tokio::task::spawn_blocking(move || Ledger::open(&path, &node, &region))
            .await
            .map_err(|e| LedgerError::Db(e.to_string()))??;
        Ok(ledger)
    }

    /// [`Receipts::start`] on a ledger already opened with [`Receipts::open_ledger`].
    pub async fn start_on(
        ledger: Ledger,
        settings: ReceiptSettings,
        signer: Arc<dyn Signer>,
        registry: &Registry,
        events: Option<broadcast::Receiver<Event>>,
        summaries: Option<broadcast::Receiver<CycleSummary>>,
    ) -> Result<(Arc<Receipts>, TaskGroup), ReceiptsError> {
        let metrics = Metrics::register(registry)?;
        let last_key = ledger.keys()?.pop();
        let (commands, rx) = mpsc::channel(4096);
        let receipts = Arc::new(Receipts {
            ledger,
            signer,
            breaker: CircuitBreaker::new(3, Duration::from_secs(5)),
            key: Mutex::new(KeyState {
                current: last_key.as_ref().and_then(|k| {
                    B64.decode(&k.public_key)
                        .map_err(|e| {
                            tracing::error!(
                                key = %k.key,
                                "receipts: the ledger's last signing key does not decode \
                                 ({e}); the KMS's current key is taken as a new first key"
                            )
                        })
                        // Logged just above: the KMS is asked again.
                        .ok()
                        .map(|der| KeyInfo {
                            key: k.key.clone(),
                            public_key_der: der,
                        })
                }),
                since_ns: last_key.as_ref().map_or_else(now_ns, |k| k.since_ns),
                problem: None,
                conflict: None,
            }),
            settings,
            write_failure: Mutex::new(None),
            sign_error: Mutex::new(None),
            commands,
            sign_now: Notify::new(),
            changes: tokio::sync::watch::Sender::new(0),
            metrics,
        });
        receipts.metrics.circuit_state(CircuitState::Closed);
        receipts.metrics.size.set(receipts.ledger.size()? as i64);
        // Learn the KMS's current key now if it answers quickly (else the signer task keeps
        // trying, and the agent does not wait for the KMS to start).
        match tokio::time::timeout(Duration::from_secs(3), receipts.sync_key()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("receipts: the KMS did not answer at start ({e}); receipts are written and their checkpoints queue until it does"),
            Err(_) => tracing::warn!("receipts: the KMS did not answer within 3 s at start; receipts are written and their checkpoints queue until it does"),
        }
        let mut tasks = TaskGroup::new("receipts");
        let stop = tasks.stop_signal();
        tasks.spawn(
            "writer",
            Arc::clone(&receipts).write_loop(rx, events, summaries, stop.clone()),
        );
        tasks.spawn("signer", Arc::clone(&receipts).sign_loop(stop.clone()));
        tasks.spawn("key rotation", Arc::clone(&receipts).rotation_loop(stop));
        Ok((receipts, tasks))
    }

    /// Changes whenever receipts are appended or a checkpoint is signed (for replication; a
    /// change that happens while the receiver is busy is not lost).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// (receipts written, checkpoints waiting for the KMS, the signing key as `id#version`).
    /// A database error is an error, never a size of 0.
    pub fn status(&self) -> Result<(u64, u64, String), LedgerError> {
        let size = self.ledger.size()?;
        let pending = self.ledger.unsigned_checkpoints()?.len() as u64;
        Ok((size, pending, self.stamp().to_string()))
    }

    /// The node and region receipts are written as.
    pub fn origin(&self) -> (&str, &str) {
        (&self.settings.node, &self.settings.region)
    }

    /// The SubjectPublicKeyInfo DER of `key`, from the key history.
    pub async fn public_key_of(&self, key: &KeyRef) -> Result<Vec<u8>, String> {
        let ledger = self.ledger.clone();
        let keys = tokio::task::spawn_blocking(move || ledger.keys())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let record = keys
            .into_iter()
            .find(|k| k.key == *key)
            .ok_or_else(|| format!("key {key} is not in the ledger's key history"))?;
        B64.decode(&record.public_key)
            .map_err(|e| format!("the stored public key of {key} is not base64: {e}"))
    }

    /// The ledger's database file.
    pub fn path(&self) -> &std::path::Path {
        &self.settings.path
    }

    /// The ledger (for reads: receipts, proofs, checkpoints).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Appends one receipt and waits until it is durable; returns its sequence number.
    pub async fn append(&self, receipt: NewReceipt) -> Result<u64, ReceiptsError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Append(receipt, tx))
            .await
            .map_err(|_| ReceiptsError::Stopped)?;
        Ok(rx.await.map_err(|_| ReceiptsError::Stopped)??)
    }

    /// Writes a checkpoint now (as a pulse does), waits until it is durable, and wakes the
    /// signer.
    pub async fn pulse(&self, cycle: u64) {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Pulse(cycle, Some(tx)))
            .await
            .is_ok()
        {
            // Dropped only if the writer stops first; there is then nothing left to wait for.
            let _ = rx.await;
        }
    }

    /// The key receipts are stamped with: the KMS's current key, or the last known one.
    fn stamp(&self) -> KeyRef {
        // A poisoned lock falls back to the unknown key (version 0), re-stamped at signing.
        self.key
            .lock()
            .ok()
            .and_then(|k| k.current.as_ref().map(|c| c.key.clone()))
            .unwrap_or_else(|| KeyRef {
                id: "unknown".into(),
                version: 0,
            })
    }

    /// Asks the KMS for its current key; records a first key, or a key changed outside the
    /// agent (with a transition statement signed by the previous key).
    async fn sync_key(&self) -> Result<(), SignerError> {
        let info = self.call(|| self.signer.current()).await?;
        // A poisoned lock means no known previous key: the transition is not countersigned.
        let previous = self.key.lock().ok().and_then(|k| k.current.clone());
        match previous {
            Some(p) if p.key == info.key && p.public_key_der != info.public_key_der => {
                let conflict = format!(
                    "the ledger's key history gives {} the public key {}, but the KMS's key {} \
                     is {}: the history was changed (or the key id reused); checkpoints are not \
                     signed until they agree: check the ledger with `knhk-agent receipts verify \
                     --trusted-key`",
                    p.key,
                    format::fingerprint(&p.public_key_der),
                    info.key,
                    format::fingerprint(&info.public_key_der)
                );
                tracing::error!("receipts: {conflict}");
                if let Ok(mut k) = self.key.lock() {
                    k.conflict = Some(conflict.clone());
                }
                return Err(SignerError::Refused {
                    provider: "ledger",
                    message: conflict,
                });
            }
            Some(p) if p.key == info.key => {}
            Some(p) if p.key.version != 0 => self.record_transition(&p, &info).await?,
            _ => {
                self.ledger
                    .add_key(&KeyRecord {
                        key: info.key.clone(),
                        public_key: B64.encode(&info.public_key_der),
                        since_ns: now_ns(),
                        transition: None,
                    })
                    .map_err(ledger_error)?;
                if let Ok(mut k) = self.key.lock() {
                    k.current = Some(info);
                    k.since_ns = now_ns();
                }
            }
        }
        Ok(())
    }

    /// Records that `to` replaces `from`: a statement signed by `from`, stored in the key
    /// history and in a rotation receipt.
    async fn record_transition(&self, from: &KeyInfo, to: &KeyInfo) -> Result<(), SignerError> {
        let now = now_ns();
        // A new name for the same key (the file provider's stable id) keeps the key's age: its
        // lifetime is not extended by the rename.
        let since = if from.public_key_der == to.public_key_der {
            self.key.lock().map_or(now, |k| k.since_ns)
        } else {
            now
        };
        let statement = format::transition_statement(&from.key, &to.key, &to.public_key_der, now);
        let signature = self
            .sign_as(&from.key, &from.public_key_der, statement.as_bytes())
            .await?;
        self.ledger
            .add_key(&KeyRecord {
                key: to.key.clone(),
                public_key: B64.encode(&to.public_key_der),
                since_ns: since,
                transition: Some((statement.clone(), B64.encode(&signature))),
            })
            .map_err(ledger_error)?;
        if let Ok(mut k) = self.key.lock() {
            k.current = Some(to.clone());
            k.since_ns = since;
            k.problem = None;
        }
        tracing::info!(from = %from.key, to = %to.key, "receipts signing key rotated");
        let payload = rotation_payload(from, to, &statement, &signature);
        if let Err(e) = self
            .append(NewReceipt {
                kind: ReceiptKind::KeyRotation,
                cycle: 0,
                policy_generation: 0,
                payload,
            })
            .await
        {
            // The rotation happened in the KMS; only its receipt is missing: say so loudly.
            tracing::error!(
                "receipts: the key rotation to {} was not receipted: {e}",
                to.key
            );
        }
        Ok(())
    }

    /// Rotates the signing key now.
    pub async fn rotate_now(&self) -> Result<KeyRef, SignerError> {
        let tracer = opentelemetry::global::tracer("knhk-agent");
        let mut span = tracer
            .span_builder(span::KNHK_RECEIPTS_KEY_ROTATE)
            .with_kind(SpanKind::Internal)
            .with_attributes([KeyValue::new(
                attr::KNHK_KMS_PROVIDER,
                self.signer.provider(),
            )])
            .start(&tracer);
        let rotated = self.rotate_inner().await;
        match &rotated {
            Ok(key) => span.set_attribute(KeyValue::new(attr::KNHK_KMS_KEY_ID, key.to_string())),
            Err(e) => {
                span.set_attribute(KeyValue::new(attr::ERROR_TYPE, "kms_rotate"));
                span.set_status(opentelemetry::trace::Status::error(e.to_string()));
            }
        }
        span.end();
        rotated
    }

    async fn rotate_inner(&self) -> Result<KeyRef, SignerError> {
        self.sync_key().await?;
        // A poisoned lock is treated as "no current key": the rotation waits for the KMS.
        let from = self
            .key
            .lock()
            .ok()
            .and_then(|k| k.current.clone())
            .ok_or_else(|| SignerError::Unavailable {
                provider: self.signer.provider(),
                message: "no current key known".into(),
            })?;
        let to = self.call(|| self.signer.rotate()).await?;
        self.record_transition(&from, &to).await?;
        Ok(to.key)
    }

    /// A KMS call through the circuit breaker, retried with backoff on transient failures.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, SignerError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, SignerError>>,
    {
        if let Err(wait) = self.breaker.allow() {
            self.metrics.circuit_state(self.breaker.state());
            return Err(SignerError::Unavailable {
                provider: self.signer.provider(),
                message: format!("{CIRCUIT_OPEN}; next probe in {} ms", wait.as_millis()),
            });
        }
        let result = f
            .retry(crate::resilience::backoff(
                Duration::from_millis(50),
                Duration::from_secs(1),
                2,
            ))
            .when(|e: &SignerError| e.is_transient())
            // A throttling KMS said when to come back: wait that long (up to a bound, so a
            // long Retry-After fails this call and counts toward opening the circuit).
            .adjust(
                |e: &SignerError, backoff| match (backoff, e.retry_after()) {
                    (Some(_), Some(asked)) if asked > MAX_RETRY_AFTER => None,
                    (Some(d), Some(asked)) => Some(d.max(asked)),
                    (d, _) => d,
                },
            )
            .await;
        match &result {
            Ok(_) => self.breaker.success(),
            Err(e) if e.is_transient() => self.breaker.failure(),
            Err(_) => self.breaker.success(),
        }
        self.metrics.circuit_state(self.breaker.state());
        result
    }

    /// A signature of `message` by `key` (through [`Self::call`]) that verifies with
    /// `public_key_der`, the public key the key history records for `key`. One that does not
    /// is never used: the KMS signed with another key under that id (a key deleted and
    /// recreated with the same name, a history changed); that is recorded as the key conflict
    /// (nothing more is signed, readiness says why) and refused.
    async fn sign_as(
        &self,
        key: &KeyRef,
        public_key_der: &[u8],
        message: &[u8],
    ) -> Result<Vec<u8>, SignerError> {
        let signature = self.call(|| self.signer.sign(key, message)).await?;
        if signer::verify_signature(public_key_der, message, &signature) {
            return Ok(signature);
        }
        let conflict = format!(
            "the KMS ({}) signed with {key}, but the signature does not verify with the public key \
             {} that the ledger's key history records for {key}: the key history and the KMS \
             disagree (the KMS's key was deleted and a new key created under the same name, or \
             the history was changed); the signature was discarded and nothing more is signed \
             until a restart finds them agreeing: restore the original key in the KMS (from a \
             backup: a new key of the same name is a different key) and restart the agent; check \
             the ledger with `knhk-agent receipts verify --trusted-key`",
            self.signer.provider(),
            format::fingerprint(public_key_der),
        );
        tracing::error!("receipts: {conflict}");
        if let Ok(mut k) = self.key.lock() {
            k.conflict = Some(conflict.clone());
        }
        Err(SignerError::Refused {
            provider: "ledger",
            message: conflict,
        })
    }

    /// The public key the key history records for `key` (the current key's from memory).
    async fn recorded_public_key(&self, key: &KeyRef) -> Result<Vec<u8>, SignerError> {
        let current = self
            .key
            .lock()
            .ok()
            .and_then(|k| k.current.clone())
            .filter(|c| c.key == *key);
        match current {
            Some(c) => Ok(c.public_key_der),
            None => self
                .public_key_of(key)
                .await
                .map_err(|message| SignerError::Refused {
                    provider: "ledger",
                    message,
                }),
        }
    }

    async fn write_loop(
        self: Arc<Self>,
        mut commands: mpsc::Receiver<Command>,
        mut events: Option<broadcast::Receiver<Event>>,
        mut summaries: Option<broadcast::Receiver<CycleSummary>>,
        mut stop: Stop,
    ) {
        let mut fallback = tokio::time::interval(Duration::from_secs(1));
        fallback.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let paced = summaries.is_some();
        let mut compaction = tokio::time::interval(Duration::from_secs(3600));
        let mut stopping = false;
        let mut kept: Vec<NewReceipt> = Vec::new();
        let mut last_try = tokio::time::Instant::now();
        // Whether receipts may have been appended since the last checkpoint was written (true at
        // start: a previous run may have stopped between the two). A pulse with nothing new
        // costs nothing (an idle node's pulses).
        let mut unchecked = true;
        loop {
            let mut batch: Vec<(NewReceipt, Option<Ack>)> = Vec::new();
            let mut pulse = None;
            let mut pulse_acks = Vec::new();
            tokio::select! {
                _ = stop.requested(), if !stopping => {
                    // Append what was sent before the stop, then close with a checkpoint.
                    stopping = true;
                    pulse = Some(0);
                    while let Some(e) = recv_now(&mut events) {
                        batch.extend(self.receipt_of_event(e).map(|r| (r, None)));
                    }
                    while let Some(s) = recv_now(&mut summaries) {
                        batch.extend((!s.quiet).then(|| (receipt_of_summary(&s), None)));
                    }
                },
                c = commands.recv() => match c {
                    Some(Command::Append(r, ack)) => batch.push((r, Some(ack))),
                    Some(Command::Pulse(cycle, ack)) => { pulse = Some(cycle); pulse_acks.extend(ack); }
                    None => return,
                },
                e = recv_opt(&mut events) => match e {
                    Ok(e) => batch.extend(self.receipt_of_event(e).map(|r| (r, None))),
                    Err(n) => { self.metrics.lost.inc_by(n); tracing::error!(lost = n, "receipts writer fell behind the event stream"); }
                },
                s = recv_opt(&mut summaries) => match s {
                    Ok(s) => { pulse = Some(s.cycle); batch.extend((!s.quiet).then(|| (receipt_of_summary(&s), None))); }
                    Err(n) => { self.metrics.lost.inc_by(n); tracing::error!(lost = n, "receipts writer fell behind the pulses"); }
                },
                _ = fallback.tick(), if !paced => pulse = Some(0),
                _ = compaction.tick() => { self.compact().await; continue; }
            }
            // Take whatever else is ready into the same transaction.
            while batch.len() < 4096 {
                match commands.try_recv() {
                    Ok(Command::Append(r, ack)) => batch.push((r, Some(ack))),
                    Ok(Command::Pulse(cycle, ack)) => {
                        pulse = Some(cycle);
                        pulse_acks.extend(ack);
                    }
                    Err(_) => break,
                }
            }
            // Receipts kept from failed writes go first, in their order.
            if !kept.is_empty() {
                let mut all: Vec<(NewReceipt, Option<Ack>)> =
                    kept.drain(..).map(|r| (r, None)).collect();
                all.append(&mut batch);
                batch = all;
            }
            // While the ledger fails, it is reopened and tried again every WRITE_RETRY; in
            // between, writes are not attempted (acknowledged appends get the error at once).
            let failing = self.write_failing();
            let attempt = !failing || stopping || last_try.elapsed() >= WRITE_RETRY;
            if failing && attempt && (!batch.is_empty() || pulse.is_some()) {
                last_try = tokio::time::Instant::now();
                let ledger = self.ledger.clone();
                if let Err(e) = blocking(move || ledger.reopen()).await {
                    tracing::warn!("receipts: reopening the ledger failed: {e}");
                }
            }
            if !batch.is_empty() {
                let result = if attempt {
                    let key = self.stamp();
                    let ledger = self.ledger.clone();
                    let news: Vec<NewReceipt> = batch.iter().map(|(r, _)| r.clone()).collect();
                    blocking(move || ledger.append(&news, &key)).await
                } else {
                    Err(LedgerError::Db(self.write_failure_text()))
                };
                match &result {
                    Ok(range) => {
                        unchecked = true;
                        self.write_succeeded();
                        self.changes.send_modify(|v| *v += 1);
                        for (r, _) in &batch {
                            self.metrics
                                .appended
                                .with_label_values(&[r.kind.as_str()])
                                .inc();
                        }
                        self.metrics.size.set(range.end as i64);
                    }
                    Err(e) => {
                        if attempt {
                            tracing::error!(
                                "receipts: appending {} receipts failed: {e}",
                                batch.len()
                            );
                        }
                        let unacked = batch.iter().filter(|(_, ack)| ack.is_none()).count();
                        self.write_failed(e, kept.len() + unacked);
                    }
                }
                // While the ledger fails, callers get its cause (not redb's "previous I/O error").
                let result = result.map_err(|e| {
                    if self.write_failing() {
                        LedgerError::Db(self.write_failure_text())
                    } else {
                        e
                    }
                });
                for (i, (r, ack)) in batch.into_iter().enumerate() {
                    match ack {
                        // The caller may have gone (a cancelled RPC); a failure is logged above.
                        Some(ack) => {
                            let _ = ack.send(result.clone().map(|range| range.start + i as u64));
                        }
                        // Not acknowledged to anyone: kept to be written later.
                        None if result.is_err() => kept.push(r),
                        None => {}
                    }
                }
                if kept.len() > MAX_KEPT {
                    let over = kept.len() - MAX_KEPT;
                    kept.drain(..over);
                    self.metrics.lost.inc_by(over as u64);
                    tracing::error!(lost = over, "receipts: the ledger has failed for too long; the oldest receipts kept in memory are dropped");
                }
                if result.is_err() {
                    self.set_kept(kept.len());
                }
            }
            if let Some(cycle) = pulse.filter(|_| attempt && unchecked) {
                let key = self.stamp();
                let ledger = self.ledger.clone();
                match blocking(move || ledger.write_checkpoint(cycle, &key)).await {
                    Ok(Some(_)) => {
                        unchecked = false;
                        self.write_succeeded();
                        self.sign_now.notify_one();
                    }
                    Ok(None) => unchecked = false,
                    Err(e) => {
                        tracing::error!("receipts: writing a checkpoint failed: {e}");
                        self.write_failed(&e, kept.len());
                    }
                }
            }
            for ack in pulse_acks {
                // The caller may have gone; the checkpoint is written (or its failure logged).
                let _ = ack.send(());
            }
            if stopping {
                if !kept.is_empty() {
                    self.metrics.lost.inc_by(kept.len() as u64);
                    tracing::error!(
                        lost = kept.len(),
                        "receipts: stopping with receipts the ledger could not take (it still fails)"
                    );
                }
                tracing::info!("receipts: writer flushed and stopped");
                return;
            }
        }
    }

    /// Records the outcome of a signing attempt (`None`: it succeeded).
    fn note_sign_result(&self, error: Option<SignerError>) {
        if let Ok(mut last) = self.sign_error.lock() {
            // A call the open circuit failed fast never reached the KMS: the KMS's own last
            // answer (what opened the circuit: throttling, a timeout) is what readiness shows.
            let fast_fail = matches!(
                &error,
                Some(SignerError::Unavailable { message, .. }) if message.starts_with(CIRCUIT_OPEN)
            );
            if fast_fail && last.is_some() {
                return;
            }
            if error.is_none() && last.is_some() {
                tracing::info!("receipts: the KMS signs again");
            }
            *last = error;
        }
    }

    fn write_failing(&self) -> bool {
        self.write_failure.lock().is_ok_and(|f| f.is_some())
    }

    fn write_failure_text(&self) -> String {
        self.write_failure
            .lock()
            .ok()
            .and_then(|f| f.as_ref().map(|f| f.describe(&self.settings.path)))
            .unwrap_or_else(|| "the receipts ledger cannot be written".into())
    }

    fn write_failed(&self, e: &LedgerError, kept: usize) {
        if let Ok(mut f) = self.write_failure.lock() {
            match f.as_mut() {
                Some(f) => f.kept = kept,
                None => {
                    let failure = WriteFailure {
                        cause: e.to_string(),
                        since_ns: now_ns(),
                        kept,
                    };
                    tracing::error!("{}", failure.describe(&self.settings.path));
                    *f = Some(failure);
                }
            }
        }
    }

    fn set_kept(&self, kept: usize) {
        if let Ok(mut f) = self.write_failure.lock() {
            if let Some(f) = f.as_mut() {
                f.kept = kept;
            }
        }
    }

    /// A write outside the writer task failed: the failure is recorded (the writer reopens the
    /// ledger and retries), and while the ledger fails the caller gets its cause, not `redb`'s
    /// "previous I/O error".
    fn direct_write_failed(&self, e: LedgerError) -> LedgerError {
        if let Ok(mut f) = self.write_failure.lock() {
            if f.is_none() {
                let failure = WriteFailure {
                    cause: e.to_string(),
                    since_ns: now_ns(),
                    kept: 0,
                };
                tracing::error!("{}", failure.describe(&self.settings.path));
                *f = Some(failure);
            }
        }
        LedgerError::Db(self.write_failure_text())
    }

    fn write_succeeded(&self) {
        if let Ok(mut f) = self.write_failure.lock() {
            if f.take().is_some() {
                tracing::info!(
                    path = %self.settings.path.display(),
                    "receipts: the ledger takes writes again; the receipts kept in memory are written"
                );
            }
        }
    }

    /// A readiness check: the ledger takes writes (names the cause, `ENOSPC` included, while it
    /// does not).
    pub fn ledger_readiness_check(
        self: &Arc<Self>,
    ) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let me = Arc::downgrade(self);
        move || {
            let Some(me) = me.upgrade() else {
                return Err("the receipts ledger stopped".into());
            };
            if me.write_failing() {
                return Err(me.write_failure_text());
            }
            Ok(())
        }
    }

    fn receipt_of_event(&self, e: Event) -> Option<NewReceipt> {
        match e {
            Event::PolicySwitched {
                generation,
                digest,
                cause,
                ..
            } => Some(NewReceipt {
                kind: ReceiptKind::PolicySwitch,
                cycle: 0,
                policy_generation: generation,
                payload: json(
                    serde_json::json!({"generation": generation, "digest": digest, "cause": cause}),
                ),
            }),
            Event::ClassStateChanged {
                class, from, to, ..
            } => Some(NewReceipt {
                kind: ReceiptKind::ClassState,
                cycle: 0,
                policy_generation: 0,
                payload: json(
                    serde_json::json!({"class": class.as_str(), "from": from.as_str(), "to": to.as_str()}),
                ),
            }),
            Event::Rollout {
                action,
                candidate_generation,
                candidate_digest,
                state,
                step,
                percent,
                detail,
                ..
            } => Some(NewReceipt {
                kind: ReceiptKind::Rollout,
                cycle: 0,
                policy_generation: candidate_generation,
                payload: json(serde_json::json!({
                    "action": action,
                    "candidate_generation": candidate_generation,
                    "candidate_digest": candidate_digest,
                    "state": state,
                    "step": step,
                    "percent": percent,
                    "detail": detail,
                })),
            }),
            Event::CgroupChanged { .. } => None,
        }
    }

    async fn sign_loop(self: Arc<Self>, mut stop: Stop) {
        let mut last_pass = false;
        while !last_pass {
            tokio::select! {
                _ = self.sign_now.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                // One more pass on stop: the writer's final checkpoint was written before it.
                _ = stop.requested() => last_pass = true,
            }
            if self.key.lock().is_ok_and(|k| k.current.is_none()) {
                if let Err(e) = self.sync_key().await {
                    self.note_sign_result(Some(e));
                    self.update_backlog();
                    continue;
                }
            }
            if self.key.lock().is_ok_and(|k| k.conflict.is_some()) {
                self.update_backlog();
                continue;
            }
            let unsigned = match self.ledger.unsigned_checkpoints() {
                Ok(u) => u,
                Err(e) => {
                    tracing::error!("receipts: reading checkpoints failed: {e}");
                    continue;
                }
            };
            for (number, mut body) in unsigned {
                if body.key.version == 0 {
                    // Written before the KMS was first reached: sign with the current key.
                    body.key = self.stamp();
                    if body.key.version == 0 {
                        break;
                    }
                }
                let text = body.encode();
                let started = std::time::Instant::now();
                let tracer = opentelemetry::global::tracer("knhk-agent");
                let mut span = tracer
                    .span_builder(span::KNHK_RECEIPTS_CHECKPOINT_SIGN)
                    .with_kind(SpanKind::Internal)
                    .with_attributes([
                        KeyValue::new(attr::KNHK_KMS_PROVIDER, self.signer.provider()),
                        KeyValue::new(attr::KNHK_RECEIPTS_TREE_SIZE, body.size as i64),
                    ])
                    .start(&tracer);
                let signed = match self.recorded_public_key(&body.key).await {
                    Ok(public_key) => self.sign_as(&body.key, &public_key, text.as_bytes()).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = &signed {
                    span.set_attribute(KeyValue::new(attr::ERROR_TYPE, "kms_sign"));
                    span.set_status(opentelemetry::trace::Status::error(e.to_string()));
                }
                span.end();
                match signed {
                    Ok(sig) => {
                        self.metrics
                            .sign_seconds
                            .observe(started.elapsed().as_secs_f64());
                        let ledger = self.ledger.clone();
                        let stored = if text == body.encode() {
                            text.clone()
                        } else {
                            body.encode()
                        };
                        let r = tokio::task::spawn_blocking(move || {
                            ledger.sign_checkpoint_body(number, &stored, &sig)
                        })
                        .await;
                        if !matches!(r, Ok(Ok(()))) {
                            tracing::error!(
                                checkpoint = number,
                                "receipts: storing a signature failed: {r:?}"
                            );
                            break;
                        }
                        self.metrics.signed.inc();
                        self.changes.send_modify(|v| *v += 1);
                        self.note_sign_result(None);
                    }
                    Err(e) => {
                        tracing::warn!(
                            checkpoint = number,
                            "receipts: checkpoint not signed yet: {e}{}",
                            kms_hint(&e.to_string())
                        );
                        self.note_sign_result(Some(e));
                        break;
                    }
                }
            }
            if let Ok(dropped) = self
                .ledger
                .trim_unsigned(self.settings.max_pending_checkpoints)
            {
                if dropped > 0 {
                    tracing::warn!(dropped, "receipts: dropped the oldest unsigned checkpoints (newer ones cover their receipts)");
                }
            }
            self.update_backlog();
        }
    }

    fn update_backlog(&self) {
        if let Ok(u) = self.ledger.unsigned_checkpoints() {
            self.metrics.pending.set(u.len() as i64);
        }
    }

    /// Looks at the key's age every [`ROTATION_LOOK`] (wall clock, which may step either way: a
    /// key that seems younger than zero is age 0) and rotates it once it is due.
    async fn rotation_loop(self: Arc<Self>, mut stop: Stop) {
        let mut backoff = Duration::from_secs(5);
        loop {
            if stop.is_requested() {
                return;
            }
            let (since, has_key) = self
                .key
                .lock()
                .map(|k| (k.since_ns, k.current.is_some()))
                .unwrap_or((now_ns(), false));
            let age = Duration::from_nanos((now_ns() - since).max(0) as u64);
            self.metrics.key_age.set(age.as_secs_f64());
            let due = has_key && age >= self.settings.rotation_interval;
            self.metrics.rotation_overdue.set(i64::from(due));
            if !due {
                let wait = self
                    .settings
                    .rotation_interval
                    .saturating_sub(age)
                    .min(ROTATION_LOOK);
                tokio::select! {
                    _ = tokio::time::sleep(wait.max(Duration::from_millis(100))) => {}
                    _ = stop.requested() => return,
                }
                backoff = Duration::from_secs(5);
                continue;
            }
            match self.rotate_now().await {
                Ok(key) => {
                    tracing::info!(%key, "receipts signing key rotated on schedule");
                    self.metrics.rotation_overdue.set(0);
                }
                Err(e) => {
                    let problem = format!(
                        "the receipts signing key is {} h old and rotation failed ({e}); retrying in {} s: \
                         check the KMS and the agent's permission to create keys / rotate",
                        age.as_secs() / 3600,
                        backoff.as_secs()
                    );
                    tracing::error!("{problem}");
                    if let Ok(mut k) = self.key.lock() {
                        k.problem = Some(problem);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.requested() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                }
            }
        }
    }

    /// Runs retention now; returns how many payloads were removed.
    pub async fn compact(&self) -> u64 {
        let retention: BTreeMap<String, Duration> = self.settings.retention.clone();
        let ledger = self.ledger.clone();
        let r = tokio::task::spawn_blocking(move || {
            ledger.compact(now_ns(), |kind| {
                retention.get(kind.as_str()).map(|d| d.as_nanos() as i64)
            })
        })
        .await;
        match r {
            Ok(Ok(n)) => {
                self.metrics.compacted.inc_by(n);
                n
            }
            other => {
                tracing::error!("receipts: compaction failed: {other:?}");
                0
            }
        }
    }

    /// Places a legal hold (a receipt records it); returns its id.
    pub async fn place_hold(&self, mut hold: Hold) -> Result<u64, ReceiptsError> {
        hold.id = u64::MAX;
        hold.placed_ns = now_ns();
        hold.released_ns = None;
        let ledger = self.ledger.clone();
        let h = hold.clone();
        let id = blocking(move || ledger.put_hold(h))
            .await
            .map_err(|e| self.direct_write_failed(e))?;
        hold.id = id;
        self.append(NewReceipt {
            kind: ReceiptKind::HoldPlaced,
            cycle: 0,
            policy_generation: 0,
            payload: serde_json::to_vec(&hold)
                .map_err(|e| LedgerError::Db(format!("encoding hold {id}: {e}")))?,
        })
        .await?;
        Ok(id)
    }

    /// Releases hold `id` (a receipt records it).
    pub async fn release_hold(&self, id: u64, reason: &str) -> Result<Hold, ReceiptsError> {
        let ledger = self.ledger.clone();
        let mut hold = blocking(move || ledger.hold(id))
            .await?
            .ok_or(ReceiptsError::NoSuchHold(id))?;
        if hold.released_ns.is_some() {
            return Err(ReceiptsError::AlreadyReleased(id));
        }
        hold.released_ns = Some(now_ns());
        let ledger = self.ledger.clone();
        let h = hold.clone();
        blocking(move || ledger.put_hold(h))
            .await
            .map_err(|e| self.direct_write_failed(e))?;
        self.append(NewReceipt {
            kind: ReceiptKind::HoldReleased,
            cycle: 0,
            policy_generation: 0,
            payload: json(serde_json::json!({"id": id, "reason": reason, "hold": hold})),
        })
        .await?;
        Ok(hold)
    }

    /// A readiness check: the signing backlog and rotation.
    pub fn readiness_check(
        self: &Arc<Self>,
    ) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let me = Arc::downgrade(self);
        move || {
            let Some(me) = me.upgrade() else {
                return Err("the receipts ledger stopped".into());
            };
            // A poisoned lock hides no rotation problem; the checks below still run.
            if let Some(p) = me
                .key
                .lock()
                .ok()
                .and_then(|k| k.conflict.clone().or_else(|| k.problem.clone()))
            {
                return Err(p);
            }
            // A database that cannot be read is not ready (not "nothing waiting").
            let unsigned = me
                .ledger
                .unsigned_checkpoints()
                .map_err(|e| format!("the receipts ledger cannot be read: {e}"))?;
            let oldest = unsigned
                .first()
                .map(|(_, b)| (now_ns() - b.time_ns).max(0) / 1_000_000_000);
            let stuck = oldest.is_some_and(|s| s >= 10);
            let last_error = me.sign_error.lock().ok().and_then(|e| e.clone());
            // A refusal (the key disabled or pending deletion, access denied, a revoked token)
            // is not waited out: retrying cannot help until someone fixes it.
            if let Some(e) = last_error.as_ref().filter(|e| !e.is_transient()) {
                if !unsigned.is_empty() {
                    return Err(format!(
                        "the KMS ({}) refuses to sign: {e}{}; {} checkpoints wait to be signed \
                         (receipts are still written and durable; signing resumes by itself once \
                         this is fixed)",
                        me.signer.provider(),
                        kms_hint(&e.to_string()),
                        unsigned.len()
                    ));
                }
            }
            if stuck
                || me.breaker.state() != CircuitState::Closed
                || me.key.lock().is_ok_and(|k| k.current.is_none())
            {
                let why = if matches!(last_error, Some(SignerError::Throttled { .. })) {
                    "it is throttling the agent: HTTP 429 Too Many Requests, a rate limit or quota; \
                     calls are retried with backoff and signing resumes by itself when it lets them \
                     through"
                } else {
                    "unreachable or failing"
                };
                return Err(format!(
                    "the KMS ({}) has not signed for {} s ({why}): {} checkpoints wait to be signed \
                     (receipts are still written and durable){}",
                    me.signer.provider(),
                    oldest.unwrap_or(0),
                    unsigned.len(),
                    last_error
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default()
                ));
            }
            Ok(())
        }
    }
}

/// What a KMS refusal means and what fixes it, from the provider's error text ("" when the
/// text is not one of the known refusals).
fn kms_hint(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("pending deletion") || m.contains("pendingdeletion") {
        " (the key is scheduled for deletion: cancel it (kms:CancelKeyDeletion), then enable it \
         (kms:EnableKey))"
    } else if m.contains("disabledexception") || m.contains("is disabled") {
        " (the key is disabled: enable it (kms:EnableKey))"
    } else if m.contains("accessdenied") || m.contains("not authorized") {
        " (access denied: the agent's credentials may not use the key; check the key policy and \
         IAM)"
    } else if m.contains("permission denied") {
        " (the Vault token is revoked, expired or lacks the transit policy: write a valid token \
         to kms.token_file)"
    } else if m.contains("signing key not found")
        || (m.contains("transit key") && m.contains("http 404"))
    {
        " (the transit key is not on the server: it was deleted, or never created under this \
         name and mount: restore it from a backup (transit/restore); a new key created under the \
         same name is a different key, and the agent will not sign with it)"
    } else if m.contains("kmsinvalidstate") {
        " (the key is not in a state that can sign: check it with kms:DescribeKey)"
    } else {
        ""
    }
}

/// How a call the open circuit fails fast begins (it never reached the KMS).
const CIRCUIT_OPEN: &str = "circuit open after repeated failures";

/// The longest `Retry-After` a KMS call waits out before retrying; a longer one fails the call.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

/// A database failure while recording a key: not the KMS's fault, and not worth retrying.
fn ledger_error(e: LedgerError) -> SignerError {
    SignerError::Refused {
        provider: "ledger",
        message: e.to_string(),
    }
}

async fn recv_opt<T: Clone>(rx: &mut Option<broadcast::Receiver<T>>) -> Result<T, u64> {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    match r.recv().await {
        Ok(v) => Ok(v),
        Err(broadcast::error::RecvError::Lagged(n)) => Err(n),
        Err(broadcast::error::RecvError::Closed) => {
            *rx = None;
            std::future::pending().await
        }
    }
}

/// The next message already queued on `rx`, without waiting (skipping over a lag, which the
/// writer's normal path counts).
fn recv_now<T: Clone>(rx: &mut Option<broadcast::Receiver<T>>) -> Option<T> {
    let r = rx.as_mut()?;
    loop {
        match r.try_recv() {
            Ok(v) => return Some(v),
            Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// The `key_rotation` payload (its bytes are specified in docs/receipts.md).
fn rotation_payload(from: &KeyInfo, to: &KeyInfo, statement: &str, signature: &[u8]) -> Vec<u8> {
    json(serde_json::json!({
        "from": from.key.to_string(),
        "to": to.key.to_string(),
        "to_public_key": B64.encode(&to.public_key_der),
        "statement": statement,
        "signature": B64.encode(signature),
    }))
}

fn receipt_of_summary(s: &CycleSummary) -> NewReceipt {
    let classes: Vec<serde_json::Value> = crate::model::Class::ALL
        .iter()
        .zip(s.classes.iter())
        .map(|(c, x)| {
            serde_json::json!({
                "class": c.as_str(), "admitted": x.admitted, "refused": x.refused, "parked": x.parked,
                "p50_ns": x.p50_ns, "p99_ns": x.p99_ns, "state": x.state.map(|s| s.as_str()),
            })
        })
        .collect();
    NewReceipt {
        kind: ReceiptKind::CycleSummary,
        cycle: s.cycle,
        policy_generation: s.policy_generation,
        payload: json(serde_json::json!({
            "cycle": s.cycle, "policy_generation": s.policy_generation,
            "heat_digest": s.heat_digest, "classes": classes,
        })),
    }
}

#[cfg(test)]
mod payload_tests {
    use super::*;

    /// The payload bytes docs/receipts.md specifies, held byte for byte.
    #[test]
    fn rotation_and_hold_payloads_are_the_documented_bytes() {
        let key = |id: &str, version, der: &[u8]| KeyInfo {
            key: KeyRef {
                id: id.into(),
                version,
            },
            public_key_der: der.to_vec(),
        };
        let (from, to) = (key("k", 1, b"\x01"), key("k", 2, b"\x02\x03"));
        let statement = format::transition_statement(&from.key, &to.key, &to.public_key_der, 5);
        assert_eq!(
            statement,
            "knhk-key-transition/v1\nfrom: k#1\nto: k#2\nto_public_key: AgM=\ntime: 5\n"
        );
        let payload = rotation_payload(&from, &to, &statement, b"\xff");
        assert_eq!(
            String::from_utf8(payload).expect("utf-8"),
            r#"{"from":"k#1","signature":"/w==","statement":"knhk-key-transition/v1\nfrom: k#1\nto: k#2\nto_public_key: AgM=\ntime: 5\n","to":"k#2","to_public_key":"AgM="}"#
        );
        let hold = Hold {
            id: 3,
            case_id: "C-1".into(),
            reason: "r".into(),
            seq_range: Some((1, 9)),
            time_range: None,
            kind: Some("policy_switch".into()),
            region: None,
            placed_ns: 7,
            released_ns: None,
        };
        assert_eq!(
            String::from_utf8(serde_json::to_vec(&hold).expect("json")).expect("utf-8"),
            r#"{"id":3,"case_id":"C-1","reason":"r","seq_range":[1,9],"time_range":null,"kind":"policy_switch","region":null,"placed_ns":7,"released_ns":null}"#
        );
    }
}
