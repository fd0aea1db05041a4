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
pub use signer::{KeyInfo, Signer, SignerError};
pub use verify::{verify, verify_file, VerifyFileError, VerifyReport};

use crate::{
    beat::CycleSummary,
    config::{KmsSection, ReceiptsSection},
    control::Event,
    resilience::{CircuitBreaker, CircuitState},
};
use backon::Retryable as _;
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::sync::{broadcast, mpsc, oneshot, Notify};

/// Which KMS signs, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignerSettings {
    /// AWS KMS.
    Aws {
        /// Region.
        region: String,
        /// Key ARN, id or alias.
        key_id: String,
        /// A KMS-compatible endpoint.
        endpoint_url: Option<String>,
    },
    /// Vault or OpenBao transit.
    Vault {
        /// Server address.
        addr: String,
        /// Transit mount.
        mount: String,
        /// Key name.
        key_name: String,
        /// Token file; `None`: `$VAULT_TOKEN`.
        token_file: Option<PathBuf>,
    },
    /// Local key files (development only).
    File {
        /// Key directory.
        key_dir: PathBuf,
    },
}

fn is_key_id(s: &str) -> bool {
    // An ARN (key or alias), a key id (UUID or multi-region mrk-), or an alias.
    if let Some(rest) = s.strip_prefix("arn:") {
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        return parts.len() == 5
            && parts[0].starts_with("aws")
            && parts[1] == "kms"
            && !parts[2].is_empty()
            && parts[3].len() == 12
            && parts[3].bytes().all(|b| b.is_ascii_digit())
            && (parts[4].starts_with("key/") || parts[4].starts_with("alias/"))
            && parts[4].split_once('/').is_some_and(|(_, r)| !r.is_empty());
    }
    if let Some(alias) = s.strip_prefix("alias/") {
        return !alias.is_empty()
            && alias
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b));
    }
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b.is_ascii_lowercase())
}

impl SignerSettings {
    /// Checks a `[kms]` section; errors name the key (relative to `kms.`).
    pub fn from_section(k: &KmsSection) -> Result<SignerSettings, (String, String)> {
        let bad = |key: &str, m: String| (key.to_owned(), m);
        if let Some(h) = k.rotation_interval_hours {
            if h == 0 || h > 24 {
                return Err(bad(
                    "rotation_interval_hours",
                    format!("{h} is out of range: keys must rotate at least every 24 hours (1-24)"),
                ));
            }
        }
        let provider = k.provider.as_deref().ok_or_else(|| {
            bad(
                "provider",
                "is required: \"aws\", \"vault\" or \"file\"".into(),
            )
        })?;
        let need = |key: &str, v: &Option<String>| {
            v.clone()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad(key, format!("is required with provider = {provider:?}")))
        };
        match provider {
            "aws" => {
                let key_id = need("key_id", &k.key_id)?;
                if !is_key_id(&key_id) {
                    return Err(bad(
                        "key_id",
                        format!(
                            "{key_id:?} is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID), key id or alias (alias/NAME)"
                        ),
                    ));
                }
                if let Some(url) = &k.endpoint_url {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(bad(
                            "endpoint_url",
                            format!("{url:?} is not an http(s) URL"),
                        ));
                    }
                }
                Ok(SignerSettings::Aws {
                    region: need("region", &k.region)?,
                    key_id,
                    endpoint_url: k.endpoint_url.clone(),
                })
            }
            "vault" => {
                let addr = need("addr", &k.addr)?;
                if !(addr.starts_with("http://") || addr.starts_with("https://")) {
                    return Err(bad("addr", format!("{addr:?} is not an http(s) URL")));
                }
                Ok(SignerSettings::Vault {
                    addr,
                    mount: k.mount_path.clone().unwrap_or_else(|| "transit".into()),
                    key_name: need("key_name", &k.key_name)?,
                    token_file: k.token_file.clone(),
                })
            }
            "file" => Ok(SignerSettings::File {
                key_dir: k
                    .key_dir
                    .clone()
                    .ok_or_else(|| bad("key_dir", "is required with provider = \"file\"".into()))?,
            }),
            other => Err(bad(
                "provider",
                format!("unknown provider {other:?}: expected \"aws\", \"vault\" or \"file\""),
            )),
        }
    }

    /// Connects the signer. Fails only on local problems (a missing token, a bad key file);
    /// an unreachable KMS shows later, as queued checkpoints.
    pub async fn connect(&self) -> Result<Arc<dyn Signer>, SignerError> {
        match self {
            #[cfg(feature = "aws-kms")]
            SignerSettings::Aws {
                region,
                key_id,
                endpoint_url,
            } => Ok(Arc::new(
                signer::AwsSigner::new(region, key_id, endpoint_url.as_deref()).await,
            )),
            #[cfg(feature = "vault")]
            SignerSettings::Vault {
                addr,
                mount,
                key_name,
                token_file,
            } => {
                let token = match token_file {
                    Some(f) => std::fs::read_to_string(f)
                        .map(|t| t.trim().to_owned())
                        .map_err(|e| SignerError::Refused {
                            provider: "vault",
                            message: format!("kms.token_file {}: {e}", f.display()),
                        })?,
                    None => std::env::var("VAULT_TOKEN").map_err(|_| SignerError::Refused {
                        provider: "vault",
                        message: "no token: set kms.token_file or VAULT_TOKEN".into(),
                    })?,
                };
                Ok(Arc::new(signer::VaultSigner::new(
                    addr, &token, mount, key_name,
                )?))
            }
            SignerSettings::File { key_dir } => {
                tracing::warn!(
                    key_dir = %key_dir.display(),
                    "receipts are signed with a LOCAL FILE KEY: for development only; use kms.provider = \"aws\" or \"vault\""
                );
                Ok(Arc::new(signer::FileSigner::open(key_dir)?))
            }
            #[allow(unreachable_patterns)]
            _ => Err(SignerError::Refused {
                provider: "kms",
                message:
                    "this build of knhk-agent lacks that provider (cargo features aws-kms, vault)"
                        .into(),
            }),
        }
    }
}

/// Ledger settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiptSettings {
    /// Database file.
    pub path: PathBuf,
    /// Node name.
    pub node: String,
    /// Region.
    pub region: String,
    /// Signing key rotation interval.
    pub rotation_interval: Duration,
    /// Payload retention per kind (absent: forever).
    pub retention: BTreeMap<String, Duration>,
    /// Unsigned checkpoints kept.
    pub max_pending_checkpoints: usize,
    /// The signer.
    pub signer: SignerSettings,
}

impl ReceiptSettings {
    /// Checks a `[receipts]` section; errors name the key (relative to `receipts.`).
    pub fn check_section(r: &ReceiptsSection) -> Result<(), (String, String)> {
        for (kind, days) in r.retention_days.iter().flatten() {
            if ReceiptKind::parse(kind).is_none() {
                let names: Vec<&str> = ReceiptKind::ALL.iter().map(|k| k.as_str()).collect();
                return Err((
                    format!("retention_days.{kind}"),
                    format!("unknown receipt kind; expected one of {}", names.join(", ")),
                ));
            }
            if *days == 0 {
                return Err((
                    format!("retention_days.{kind}"),
                    "0 is out of range (at least 1 day)".into(),
                ));
            }
        }
        if r.max_pending_checkpoints == Some(0) {
            return Err((
                "max_pending_checkpoints".into(),
                "0 is out of range (at least 1)".into(),
            ));
        }
        Ok(())
    }

    /// The settings of a configuration, if it has `[kms]`.
    pub fn from_config(config: &crate::config::Config) -> Option<ReceiptSettings> {
        let kms = config.kms.as_ref()?;
        let signer = SignerSettings::from_section(kms).ok()?;
        let r = config.receipts.clone().unwrap_or(ReceiptsSection {
            path: None,
            node: None,
            retention_days: None,
            max_pending_checkpoints: None,
        });
        Some(ReceiptSettings {
            path: r
                .path
                .unwrap_or_else(|| PathBuf::from("/var/lib/knhk/receipts.redb")),
            node: r.node.unwrap_or_else(host_name),
            region: config
                .multi_region
                .as_ref()
                .and_then(|m| m.region.clone())
                .unwrap_or_else(|| "local".into()),
            rotation_interval: Duration::from_secs(
                u64::from(kms.rotation_interval_hours.unwrap_or(24)) * 3600,
            ),
            retention: r
                .retention_days
                .unwrap_or_default()
                .into_iter()
                .map(|(k, d)| (k, Duration::from_secs(u64::from(d) * 86_400)))
                .collect(),
            max_pending_checkpoints: r.max_pending_checkpoints.unwrap_or(1024),
            signer,
        })
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}

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
}

struct KeyState {
    current: Option<KeyInfo>,
    since_ns: i64,
    problem: Option<String>,
}

/// Answers an append with its sequence number once durable.
type Ack = oneshot::Sender<Result<u64, String>>;

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
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Receipts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receipts")
            .field("ledger", &self.ledger)
            .finish_non_exhaustive()
    }
}

impl Drop for Receipts {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }
}

/// Receipt payloads (JSON) of the agent's own kinds.
fn json(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap_or_default()
}

impl Receipts {
    /// Opens the ledger and starts its tasks. `events` feeds policy switches and class-state
    /// changes; `summaries` (the beat engine's pulses) feeds cycle summaries and paces
    /// checkpoints — without it, a checkpoint is written every second.
    pub async fn start(
        settings: ReceiptSettings,
        signer: Arc<dyn Signer>,
        registry: &Registry,
        events: Option<broadcast::Receiver<Event>>,
        summaries: Option<broadcast::Receiver<CycleSummary>>,
    ) -> Result<Arc<Receipts>, ReceiptsError> {
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
    ) -> Result<Arc<Receipts>, ReceiptsError> {
        let metrics = Metrics::register(registry)?;
        let last_key = ledger.keys()?.pop();
        let (commands, rx) = mpsc::channel(4096);
        let receipts = Arc::new(Receipts {
            ledger,
            signer,
            breaker: CircuitBreaker::new(3, Duration::from_secs(5)),
            key: Mutex::new(KeyState {
                current: last_key.as_ref().and_then(|k| {
                    B64.decode(&k.public_key).ok().map(|der| KeyInfo {
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
            tasks: Mutex::new(Vec::new()),
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
        let writer = tokio::spawn(Arc::clone(&receipts).write_loop(rx, events, summaries));
        let signing = tokio::spawn(Arc::clone(&receipts).sign_loop());
        let rotation = tokio::spawn(Arc::clone(&receipts).rotation_loop());
        if let Ok(mut t) = receipts.tasks.lock() {
            t.extend([writer, signing, rotation]);
        }
        Ok(receipts)
    }

    /// Changes whenever receipts are appended or a checkpoint is signed (for replication; a
    /// change that happens while the receiver is busy is not lost).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// (receipts written, checkpoints waiting for the KMS, the signing key as `id#version`).
    pub fn status(&self) -> (u64, u64, String) {
        let size = self.ledger.size().unwrap_or(0);
        let pending = self
            .ledger
            .unsigned_checkpoints()
            .map_or(0, |u| u.len() as u64);
        let key = self.stamp().to_string();
        (size, pending, key)
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

    /// Stops the tasks (in-flight appends are answered with an error); the database closes
    /// when the last handle goes.
    pub fn shutdown(&self) {
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
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
    pub async fn append(&self, receipt: NewReceipt) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Append(receipt, tx))
            .await
            .map_err(|_| "the receipts writer stopped".to_string())?;
        rx.await
            .map_err(|_| "the receipts writer stopped".to_string())?
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
            let _ = rx.await;
        }
    }

    /// The key receipts are stamped with: the KMS's current key, or the last known one.
    fn stamp(&self) -> KeyRef {
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
        let _ = self
            .append(NewReceipt {
                kind: ReceiptKind::KeyRotation,
                cycle: 0,
                policy_generation: 0,
                payload,
            })
            .await;
        Ok(())
    }

    /// Rotates the signing key now.
    pub async fn rotate_now(&self) -> Result<KeyRef, SignerError> {
        self.sync_key().await?;
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
    ) {
        let mut fallback = tokio::time::interval(Duration::from_secs(1));
        fallback.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let paced = summaries.is_some();
        let mut compaction = tokio::time::interval(Duration::from_secs(3600));
        loop {
            let mut batch: Vec<(NewReceipt, Option<Ack>)> = Vec::new();
            let mut pulse = None;
            let mut pulse_acks = Vec::new();
            tokio::select! {
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
                let result = match result {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
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
                let _ = ack.send(());
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

    async fn sign_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.sign_now.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
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
                match self
                    .call(|| self.signer.sign(&body.key, text.as_bytes()))
                    .await
                {
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

    async fn rotation_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_secs(5);
        loop {
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
                tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
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
                    tokio::time::sleep(backoff).await;
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
    pub async fn place_hold(&self, mut hold: Hold) -> Result<u64, String> {
        hold.id = u64::MAX;
        hold.placed_ns = now_ns();
        hold.released_ns = None;
        let ledger = self.ledger.clone();
        let h = hold.clone();
        let id = tokio::task::spawn_blocking(move || ledger.put_hold(h))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        hold.id = id;
        self.append(NewReceipt {
            kind: ReceiptKind::HoldPlaced,
            cycle: 0,
            policy_generation: 0,
            payload: serde_json::to_vec(&hold).unwrap_or_default(),
        })
        .await?;
        Ok(id)
    }

    /// Releases hold `id` (a receipt records it).
    pub async fn release_hold(&self, id: u64, reason: &str) -> Result<Hold, String> {
        let mut hold = self
            .ledger
            .holds()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|h| h.id == id)
            .ok_or_else(|| format!("no hold {id}"))?;
        if hold.released_ns.is_some() {
            return Err(format!("hold {id} is already released"));
        }
        hold.released_ns = Some(now_ns());
        let ledger = self.ledger.clone();
        let h = hold.clone();
        tokio::task::spawn_blocking(move || ledger.put_hold(h))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
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
            if let Some(p) = me.key.lock().ok().and_then(|k| k.problem.clone()) {
                return Err(p);
            }
            let unsigned = me.ledger.unsigned_checkpoints().unwrap_or_default();
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

fn receipt_of_summary(s: &CycleSummary) -> NewReceipt {
    let classes: Vec<serde_json::Value> = crate::config::Class::ALL
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
