//! The witness service (`knhk-agent witness`): one per region, it verifies and cosigns the
//! checkpoints of every node log (origin) that pushes to it, per C2SP `tlog-witness`.
//!
//! Per origin it keeps only the log's key history, the SPIFFE ID that registered it, and the
//! newest checkpoint it cosigned (size, root, note): never the receipts (the archive keeps
//! those). A checkpoint is cosigned only when it is signed by the origin's current key chain
//! and a consistency proof shows it extends the one cosigned before; anything else that claims
//! the same origin is refused, and a contradiction (a fork) is kept as evidence. Protocol:
//! `docs/multi-region.md`.

mod http;
mod key;
pub mod protocol;
mod store;

pub use http::{serve, serve_metrics, Transport};
#[cfg(feature = "vault")]
pub use key::VaultKey;
pub use key::{CosignKey, FileKey};

use crate::note::{self, Cosignature, SignatureLine, VerifierKey};
use crate::receipts::{
    format::Hash, merkle, signer::verify_signature, verify::check_handover, CheckpointBody,
    KeyRecord,
};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use p256::pkcs8::DecodePublicKey as _;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use protocol::{AddCheckpoint, LogKeys};
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
};

/// Why a witness refuses a request; each maps to the HTTP status C2SP `tlog-witness` gives it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 400: malformed.
    #[error("{0}")]
    Malformed(String),
    /// 403: not signed by the origin's key, or the caller may not speak for the origin.
    #[error("{0}")]
    Forbidden(String),
    /// 404: the origin has not registered its keys here.
    #[error("{0}")]
    UnknownOrigin(String),
    /// 409: the client's `old` is not the size this witness holds (given here).
    #[error("the witness holds size {0} for this origin")]
    Conflict(u64),
    /// 409: another key chain or SPIFFE ID already holds the origin.
    #[error("{0}")]
    Claimed(String),
    /// 422: the checkpoint contradicts the one cosigned before (a fork; evidence kept).
    #[error("fork: {0}")]
    Fork(String),
    /// 500/503: the witness cannot store or sign now.
    #[error("{0}")]
    Unavailable(String),
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::Forbidden(_) => "forbidden",
            Refusal::UnknownOrigin(_) => "unknown_origin",
            Refusal::Conflict(_) => "size_conflict",
            Refusal::Claimed(_) => "origin_claimed",
            Refusal::Fork(_) => "fork",
            Refusal::Unavailable(_) => "unavailable",
        }
    }
}

/// What the witness holds of one origin (stored as JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct OriginRecord {
    /// The log's key history, oldest first.
    keys: Vec<KeyRecord>,
    /// The SPIFFE ID that registered the origin (none over plaintext).
    owner: Option<String>,
    /// Size of the newest cosigned checkpoint (0: none).
    size: u64,
    /// Its root, base64.
    root: String,
    /// Its signed note.
    note: String,
    /// Forks detected.
    forks: u64,
}

/// One origin as the witness reports it.
#[derive(Debug, Clone, Serialize)]
pub struct OriginSummary {
    /// The origin.
    pub origin: String,
    /// Size of the newest cosigned checkpoint.
    pub size: u64,
    /// Its root, base64.
    pub root: String,
    /// Keys in its history.
    pub keys: usize,
    /// Who registered it.
    pub owner: Option<String>,
    /// Forks detected.
    pub forks: u64,
}

#[derive(Clone)]
struct Metrics {
    cosigned: IntCounter,
    refused: IntCounterVec,
    forks: IntCounter,
    origins: IntGauge,
}

impl Metrics {
    fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        let m = Metrics {
            cosigned: IntCounter::new(
                "knhk_witness_cosignatures_total",
                "Checkpoints this witness cosigned.",
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "knhk_witness_refusals_total",
                    "Requests this witness refused, by reason.",
                ),
                &["reason"],
            )?,
            forks: IntCounter::new(
                "knhk_witness_forks_detected_total",
                "Checkpoints that contradicted the one cosigned before for their origin (evidence kept).",
            )?,
            origins: IntGauge::new("knhk_witness_origins", "Origins this witness follows.")?,
        };
        registry.register(Box::new(m.cosigned.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.forks.clone()))?;
        registry.register(Box::new(m.origins.clone()))?;
        Ok(m)
    }
}

/// A witness: its key, and what it holds of every origin.
pub struct Witness {
    name: String,
    key: Arc<dyn CosignKey>,
    verifier_key: VerifierKey,
    store: store::Store,
    origins: Mutex<HashMap<String, Arc<tokio::sync::Mutex<OriginRecord>>>>,
    metrics: Metrics,
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.store.close();
    }
}

impl std::fmt::Debug for Witness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Witness")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Witness {
    /// Opens the witness `name` (a C2SP key name: no spaces or `+`) with its state in
    /// `state_file`, cosigning with `key`.
    pub fn open(
        name: &str,
        key: Arc<dyn CosignKey>,
        state_file: &Path,
        registry: &Registry,
    ) -> Result<Witness, String> {
        if !note::valid_key_name(name) {
            return Err(format!(
                "witness name {name:?}: a key name must be non-empty, without spaces or '+'"
            ));
        }
        let store = store::Store::open(state_file)?;
        let mut origins = HashMap::new();
        for (origin, bytes) in store.origins()? {
            let record: OriginRecord = serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{}: the record of origin {origin:?} is damaged: {e}",
                    state_file.display()
                )
            })?;
            origins.insert(origin, Arc::new(tokio::sync::Mutex::new(record)));
        }
        let metrics = Metrics::register(registry).map_err(|e| e.to_string())?;
        metrics.origins.set(origins.len() as i64);
        Ok(Witness {
            name: name.to_owned(),
            verifier_key: VerifierKey::cosignature(name, &key.public()),
            key,
            store,
            origins: Mutex::new(origins),
            metrics,
        })
    }

    /// The witness's verifier key (what nodes and verifiers pin).
    pub fn verifier_key(&self) -> &VerifierKey {
        &self.verifier_key
    }

    fn origin(&self, origin: &str) -> Option<Arc<tokio::sync::Mutex<OriginRecord>>> {
        self.origins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(origin)
            .cloned()
    }

    fn refused<T>(&self, r: Refusal) -> Result<T, Refusal> {
        self.metrics.refused.with_label_values(&[r.reason()]).inc();
        match &r {
            Refusal::Claimed(m) | Refusal::Fork(m) => tracing::error!(witness = %self.name, "{m}"),
            Refusal::Conflict(_) => {}
            other => tracing::warn!(witness = %self.name, "refused: {other}"),
        }
        Err(r)
    }

    /// Registers (or extends) an origin's key history, called by `peer` (its SPIFFE ID, when
    /// mTLS). The first registration binds the origin to its first key and to `peer`; later
    /// ones must repeat the known chain and may extend it with verified hand-overs. Returns
    /// the number of keys held.
    pub async fn register(&self, peer: Option<&str>, req: LogKeys) -> Result<usize, Refusal> {
        let origin = req.origin.clone();
        if !note::valid_key_name(&origin) {
            return self.refused(Refusal::Malformed(format!(
                "origin {origin:?}: not a valid origin (no spaces or '+')"
            )));
        }
        // The submitted chain must hold together on its own.
        let mut publics: Vec<Vec<u8>> = Vec::new();
        for (i, k) in req.keys.iter().enumerate() {
            let public = match B64.decode(&k.public_key) {
                Ok(p) if p256::PublicKey::from_public_key_der(&p).is_ok() => p,
                _ => {
                    return self.refused(Refusal::Malformed(format!(
                        "key {}: its public key is not a P-256 SubjectPublicKeyInfo in base64",
                        k.key
                    )))
                }
            };
            if i > 0 {
                if let Err(why) = check_handover(&req.keys[i - 1], &publics[i - 1], k) {
                    return self.refused(Refusal::Forbidden(why));
                }
            }
            publics.push(public);
        }
        if req.keys.is_empty() {
            return self.refused(Refusal::Malformed(format!("origin {origin}: no keys")));
        }
        let slot = {
            let mut all = self.origins.lock().unwrap_or_else(|e| e.into_inner());
            let before = all.len();
            let slot = all
                .entry(origin.clone())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(OriginRecord::default())))
                .clone();
            if all.len() != before {
                self.metrics.origins.set(all.len() as i64);
            }
            slot
        };
        let mut record = slot.lock().await;
        if let (Some(owner), Some(peer)) = (&record.owner, peer) {
            if owner != peer {
                return self.refused(Refusal::Claimed(format!(
                    "origin {origin} belongs to {owner}, and {peer} claims it too: two nodes \
                     with the same node name, or a copied ledger; give each node its own name"
                )));
            }
        }
        let known = record.keys.len();
        let prefix_matches = known <= req.keys.len()
            && record
                .keys
                .iter()
                .zip(&req.keys)
                .all(|(a, b)| a.public_key == b.public_key && a.key == b.key);
        if !prefix_matches {
            let held = record
                .keys
                .first()
                .map(|k| k.key.to_string())
                .unwrap_or_default();
            return self.refused(Refusal::Claimed(format!(
                "origin {origin} is held by the key chain starting at {held} ({known} keys); \
                 the registration presents another chain ({}): two nodes claim this origin",
                req.keys
                    .first()
                    .map(|k| k.key.to_string())
                    .unwrap_or_default()
            )));
        }
        if known == req.keys.len() && record.owner.is_some() == peer.is_some() {
            return Ok(known);
        }
        let mut next = record.clone();
        next.keys = req.keys;
        if next.owner.is_none() {
            next.owner = peer.map(str::to_owned);
        }
        self.persist(&origin, &next).await?;
        if known == 0 {
            tracing::info!(witness = %self.name, %origin, owner = ?peer, "new origin");
        }
        *record = next;
        Ok(record.keys.len())
    }

    async fn persist(&self, origin: &str, record: &OriginRecord) -> Result<(), Refusal> {
        let json = serde_json::to_vec(record)
            .map_err(|e| Refusal::Unavailable(format!("encoding the record: {e}")))?;
        match self
            .store
            .write(store::Write::Origin(origin.into(), json))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => self.refused(Refusal::Unavailable(e)),
        }
    }

    /// C2SP `add-checkpoint`: verifies `req` for the origin its checkpoint names and, when it
    /// extends what was cosigned before, cosigns it (durably recorded before returning).
    pub async fn add_checkpoint(
        &self,
        peer: Option<&str>,
        req: &AddCheckpoint,
    ) -> Result<SignatureLine, Refusal> {
        let origin = match parse_note(&req.note) {
            Ok((_, _, body)) => body.origin,
            Err(r) => return self.refused(r),
        };
        let Some(slot) = self.origin(&origin) else {
            return self.refused(Refusal::UnknownOrigin(format!(
                "origin {origin} is unknown here: register its keys at {} first",
                protocol::LOG_KEYS
            )));
        };
        let mut record = slot.lock().await;
        if record.keys.is_empty() {
            return self.refused(Refusal::UnknownOrigin(format!(
                "origin {origin} has no keys here"
            )));
        }
        if let (Some(owner), Some(peer)) = (&record.owner, peer) {
            if owner != peer {
                return self.refused(Refusal::Claimed(format!(
                    "origin {origin} belongs to {owner}; {peer} pushed a checkpoint for it: two \
                     nodes claim this origin"
                )));
            }
        }
        let cosigned = (record.size > 0)
            .then(|| B64.decode(&record.root).ok()?.try_into().ok())
            .flatten()
            .map(|root: Hash| (record.size, root));
        let (text, body) = match judge(&record.keys, cosigned, req) {
            Ok(x) => x,
            Err(fork @ Refusal::Fork(_)) => {
                record.forks += 1;
                self.metrics.forks.inc();
                let evidence = serde_json::json!({
                    "detected_unix": now_s(),
                    "cosigned": record.note,
                    "presented": req.note,
                    "old": req.old,
                    "proof": req.proof.iter().map(|h| B64.encode(h)).collect::<Vec<_>>(),
                    "why": fork.to_string(),
                });
                let stored = self
                    .store
                    .write(store::Write::Fork(
                        origin.clone(),
                        evidence.to_string().into_bytes(),
                    ))
                    .await;
                if let Err(e) = stored {
                    tracing::error!(witness = %self.name, "storing fork evidence failed: {e}");
                }
                let json = serde_json::to_vec(&*record).unwrap_or_default();
                if let Err(e) = self.store.write(store::Write::Origin(origin, json)).await {
                    tracing::error!(witness = %self.name, "storing the fork count failed: {e}");
                }
                return self.refused(fork);
            }
            Err(r) => return self.refused(r),
        };
        let timestamp = now_s();
        let message = note::cosigned_message(&text, timestamp);
        let signature = match self.key.sign(message.as_bytes()).await {
            Ok(s) => s,
            Err(e) => return self.refused(Refusal::Unavailable(format!("cosigning: {e}"))),
        };
        if body.size != record.size || record.note.is_empty() {
            let mut next = record.clone();
            next.size = body.size;
            next.root = B64.encode(body.root);
            next.note = req.note.clone();
            self.persist(&origin, &next).await?;
            *record = next;
        }
        self.metrics.cosigned.inc();
        Ok(Cosignature {
            witness: self.name.clone(),
            id: self.verifier_key.id,
            timestamp,
            signature,
        }
        .line())
    }

    /// Every origin's state.
    pub async fn origins(&self) -> Vec<OriginSummary> {
        let all: Vec<(String, Arc<tokio::sync::Mutex<OriginRecord>>)> = self
            .origins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = Vec::with_capacity(all.len());
        for (origin, slot) in all {
            let r = slot.lock().await;
            out.push(OriginSummary {
                origin,
                size: r.size,
                root: r.root.clone(),
                keys: r.keys.len(),
                owner: r.owner.clone(),
                forks: r.forks,
            });
        }
        out.sort_by(|a, b| a.origin.cmp(&b.origin));
        out
    }

    /// The fork evidence kept for `origin` (JSON documents, oldest first).
    pub fn fork_evidence(&self, origin: &str) -> Result<Vec<serde_json::Value>, String> {
        self.store
            .forks(origin)?
            .iter()
            .map(|b| serde_json::from_slice(b).map_err(|e| e.to_string()))
            .collect()
    }
}

/// A note's text, signature lines and checkpoint body; the refusal names what is malformed.
fn parse_note(note_text: &str) -> Result<(String, Vec<SignatureLine>, CheckpointBody), Refusal> {
    let (text, lines) =
        note::parse(note_text).map_err(|e| Refusal::Malformed(format!("checkpoint note: {e}")))?;
    let body = CheckpointBody::decode(&text).map_err(|e| Refusal::Malformed(e.to_string()))?;
    Ok((text, lines, body))
}

/// What a witness decides about an `add-checkpoint` request for an origin whose key history is
/// `keys` and whose newest cosigned checkpoint is `cosigned` (size, root), as a pure function:
/// the checkpoint must be signed by the key of the history its body names, `old` must be the
/// cosigned size (else [`Refusal::Conflict`] with it), and the consistency proof must show it
/// extends the cosigned one (else [`Refusal::Fork`]). Returns the text to cosign and its body.
pub fn judge(
    keys: &[KeyRecord],
    cosigned: Option<(u64, Hash)>,
    req: &AddCheckpoint,
) -> Result<(String, CheckpointBody), Refusal> {
    let (text, lines, body) = parse_note(&req.note)?;
    let origin = &body.origin;
    // The origin's signature: by a key of its history, the one the body names.
    let signed = keys.iter().find_map(|k| {
        let public = B64.decode(&k.public_key).ok()?;
        let id = note::ecdsa_key_id(&public);
        lines
            .iter()
            .find(|l| l.name == *origin && l.id == id)
            .map(|l| (k, public, l))
    });
    let Some((key, public, line)) = signed else {
        return Err(Refusal::Forbidden(format!(
            "the checkpoint of {origin} (size {}) carries no signature by a key registered for it",
            body.size
        )));
    };
    if key.key != body.key || !verify_signature(&public, text.as_bytes(), &line.signature) {
        return Err(Refusal::Forbidden(format!(
            "the checkpoint of {origin} (size {}): its signature does not verify with {}",
            body.size, key.key
        )));
    }
    let size = cosigned.map_or(0, |(s, _)| s);
    if req.old != size {
        return Err(Refusal::Conflict(size));
    }
    if body.size < size {
        return Err(Refusal::Malformed(format!(
            "the checkpoint's size {} is smaller than old {}",
            body.size, req.old
        )));
    }
    let consistent = match cosigned {
        None => req.proof.is_empty(),
        Some((_, root)) if body.size == size => root == body.root && req.proof.is_empty(),
        Some((_, root)) => {
            merkle::verify_consistency(&root, size, &body.root, body.size, &req.proof)
        }
    };
    if !consistent {
        return Err(Refusal::Fork(format!(
            "the checkpoint of {origin} at size {} is not consistent with the one of size {size} \
             this witness cosigned; refused, evidence kept",
            body.size
        )));
    }
    Ok((text, body))
}

/// Where a witness keeps its cosignature key.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A key file (development; created when missing).
    File(std::path::PathBuf),
    /// An `ed25519` transit key in OpenBao/Vault (created when missing).
    Vault {
        /// Server address.
        addr: String,
        /// Token.
        token: String,
        /// Transit mount.
        mount: String,
        /// Key name.
        name: String,
    },
}

impl KeySource {
    /// Opens the key.
    pub async fn open(&self) -> Result<Arc<dyn CosignKey>, String> {
        match self {
            KeySource::File(path) => Ok(Arc::new(FileKey::open(path)?)),
            #[cfg(feature = "vault")]
            KeySource::Vault {
                addr,
                token,
                mount,
                name,
            } => Ok(Arc::new(VaultKey::open(addr, token, mount, name).await?)),
            #[cfg(not(feature = "vault"))]
            KeySource::Vault { .. } => {
                Err("this agent was built without the `vault` feature".into())
            }
        }
    }
}

/// Runs a witness until `stop`: opens its key and state, serves on `listen` (mTLS with
/// `identity`'s SVID when given, callers matching `allowed`; else plaintext, loopback only),
/// and `/metrics` in plaintext on `metrics_listen` when given.
pub async fn run(
    name: &str,
    key: &KeySource,
    state_file: &Path,
    listen: std::net::SocketAddr,
    metrics_listen: Option<std::net::SocketAddr>,
    identity: Option<(
        crate::identity::Identity,
        Vec<crate::model::spiffe::IdMatcher>,
    )>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    if identity.is_none() && !listen.ip().is_loopback() {
        return Err(format!(
            "--listen {listen}: without mTLS (--config with [spiffe] enabled = true) a witness \
             serves plaintext on loopback only"
        ));
    }
    let registry = Registry::new();
    let key = key.open().await?;
    let witness = Arc::new(Witness::open(name, key, state_file, &registry)?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("--listen {listen}: {e}"))?;
    let transport = match &identity {
        None => Transport::Plain,
        Some((id, allowed)) => {
            let source = tokio::time::timeout(std::time::Duration::from_secs(30), async {
                loop {
                    if let Some(s) = id.source().await {
                        return s;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            })
            .await
            .map_err(|_| "no SVID from the Workload API within 30 s".to_owned())?;
            let tls = crate::identity::tls::ServerTls::new(
                source,
                &id.settings().accepted_trust_domains(),
            )?;
            Transport::Mtls(tls, allowed.clone())
        }
    };
    tracing::info!(
        witness = %name,
        key = %witness.verifier_key(),
        %listen,
        mtls = identity.is_some(),
        origins = witness.origins.lock().map(|o| o.len()).unwrap_or(0),
        "witness serving"
    );
    let (stopped, stopped_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
        let mut rx = stopped_rx.clone();
        tokio::spawn(serve_metrics(registry.clone(), l, async move {
            let _ = rx.changed().await;
        }));
    }
    serve(witness, registry, listener, transport, stop).await;
    let _ = stopped.send(true);
    Ok(())
}
