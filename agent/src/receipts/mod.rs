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
pub use verify::{verify, verify_file, VerifyFileError, VerifyReport};

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
}

struct KeyState {
    current: Option<KeyInfo>,
    since_ns: i64,
    problem: Option<String>,
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

    /// Opens (or creates) the ledger of `settings`; a damaged file is an error, not a panic.
    pub async fn open_ledger(settings: &ReceiptSettings) -> Result<Ledger, ReceiptsError> {
        let (path, node, region) = (
            settings.path.clone(),
            settings.node.clone(),
            settings.region.clone(),
        );
        Ok(
            tokio::task::spawn_blocking(move || Ledger::open(&path, &node, &region))
                .await
                .map_err(|e| LedgerError::Db(e.to_string()))??,
        )
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
            }),
            settings,
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

    /// Signs `message` with the current key (through the circuit breaker); for witness
    /// cosignatures.
    pub async fn sign_with_current(
        &self,
        message: &[u8],
    ) -> Result<(KeyInfo, Vec<u8>), SignerError> {
        if self.key.lock().is_ok_and(|k| k.current.is_none()) {
            self.sync_key().await?;
        }
        // A poisoned lock (a panicked signer) is treated as "no current key": unavailable.
        let key = self
            .key
            .lock()
            .ok()
            .and_then(|k| k.current.clone())
            .ok_or_else(|| SignerError::Unavailable {
                provider: self.signer.provider(),
                message: "no current key known".into(),
            })?;
        let sig = self.call(|| self.signer.sign(&key.key, message)).await?;
        Ok((key, sig))
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
        let since = now_ns();
        let statement = format::transition_statement(&from.key, &to.key, &to.public_key_der, since);
        let signature = self
            .call(|| self.signer.sign(&from.key, statement.as_bytes()))
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
        let payload = json(serde_json::json!({
            "from": from.key.to_string(),
            "to": to.key.to_string(),
            "to_public_key": B64.encode(&to.public_key_der),
            "statement": statement,
            "signature": B64.encode(&signature),
        }));
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
                message: format!(
                    "circuit open after repeated failures; next probe in {} ms",
                    wait.as_millis()
                ),
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
                        batch.push((receipt_of_summary(&s), None));
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
                    Ok(s) => { pulse = Some(s.cycle); batch.push((receipt_of_summary(&s), None)); }
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
            if !batch.is_empty() {
                let key = self.stamp();
                let ledger = self.ledger.clone();
                let news: Vec<NewReceipt> = batch.iter().map(|(r, _)| r.clone()).collect();
                let result = tokio::task::spawn_blocking(move || ledger.append(&news, &key)).await;
                let result = result.unwrap_or_else(|e| {
                    Err(LedgerError::Db(format!("the append task failed: {e}")))
                });
                match &result {
                    Ok(range) => {
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
                        tracing::error!("receipts: appending {} receipts failed: {e}", batch.len())
                    }
                }
                for (i, (_, ack)) in batch.into_iter().enumerate() {
                    if let Some(ack) = ack {
                        // The caller may have gone (a cancelled RPC); a failure is logged above.
                        let _ = ack.send(result.clone().map(|r| r.start + i as u64));
                    }
                }
            }
            if let Some(cycle) = pulse {
                let key = self.stamp();
                let ledger = self.ledger.clone();
                match tokio::task::spawn_blocking(move || ledger.write_checkpoint(cycle, &key))
                    .await
                {
                    Ok(Ok(Some(_))) => self.sign_now.notify_one(),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => tracing::error!("receipts: writing a checkpoint failed: {e}"),
                    Err(e) => tracing::error!("receipts: writing a checkpoint failed: {e}"),
                }
            }
            for ack in pulse_acks {
                // The caller may have gone; the checkpoint is written (or its failure logged).
                let _ = ack.send(());
            }
            if stopping {
                tracing::info!("receipts: writer flushed and stopped");
                return;
            }
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
            if self.key.lock().is_ok_and(|k| k.current.is_none()) && self.sync_key().await.is_err()
            {
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
                let signed = self
                    .call(|| self.signer.sign(&body.key, text.as_bytes()))
                    .await;
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
                    }
                    Err(e) => {
                        tracing::warn!(
                            checkpoint = number,
                            "receipts: checkpoint not signed yet: {e}"
                        );
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
                    .min(Duration::from_secs(60));
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
        let id = blocking(move || ledger.put_hold(h)).await?;
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
        let mut hold = blocking(move || ledger.holds())
            .await?
            .into_iter()
            .find(|h| h.id == id)
            .ok_or(ReceiptsError::NoSuchHold(id))?;
        if hold.released_ns.is_some() {
            return Err(ReceiptsError::AlreadyReleased(id));
        }
        hold.released_ns = Some(now_ns());
        let ledger = self.ledger.clone();
        let h = hold.clone();
        blocking(move || ledger.put_hold(h)).await?;
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
            if let Some(p) = me.key.lock().ok().and_then(|k| k.problem.clone()) {
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
            if stuck
                || me.breaker.state() != CircuitState::Closed
                || me.key.lock().is_ok_and(|k| k.current.is_none())
            {
                return Err(format!(
                    "the KMS ({}) has not signed for {} s (unreachable or failing): {} checkpoints wait to be signed \
                     (receipts are still written and durable)",
                    me.signer.provider(),
                    oldest.unwrap_or(0),
                    unsigned.len()
                ));
            }
            Ok(())
        }
    }
}

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
