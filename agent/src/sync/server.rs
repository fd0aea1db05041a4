//! The witness side of region sync: stores each origin's receipts in its own ledger file,
//! verifies them against the origin's signed checkpoints, and cosigns checkpoints that extend
//! the last one it cosigned for that origin.

use super::{pb, Metrics};
use crate::config::settings::valid_region;
use crate::receipts::{
    format, ledger::cosigned_message, merkle, signer::verify_signature, CheckpointBody, KeyRecord,
    KeyRef, Ledger, LedgerError, Receipts, StoredCheckpoint,
};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};
use tonic::{Request, Response, Status};

/// The largest batch a peer accepts.
pub const MAX_BATCH: usize = 10_000;

/// What this witness last cosigned for an origin.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Cosigned {
    size: u64,
    root: String,
}

/// The `RegionSync` service.
pub struct SyncServer {
    region: String,
    receipts: Arc<Receipts>,
    dir: PathBuf,
    max_batch: usize,
    metrics: Metrics,
    ledgers: Mutex<HashMap<String, Ledger>>,
    writer: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for SyncServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncServer")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

fn db_status(e: LedgerError) -> Status {
    match e {
        LedgerError::Db(m) => Status::unavailable(m),
        other => Status::invalid_argument(other.to_string()),
    }
}

impl SyncServer {
    pub(super) fn new(
        region: String,
        receipts: Arc<Receipts>,
        dir: PathBuf,
        batch_size: usize,
        metrics: Metrics,
    ) -> SyncServer {
        SyncServer {
            region,
            receipts,
            dir,
            max_batch: batch_size.max(MAX_BATCH),
            metrics,
            ledgers: Mutex::new(HashMap::new()),
            writer: tokio::sync::Mutex::new(()),
        }
    }

    /// The ledger of `origin` (opened on first use).
    #[allow(clippy::result_large_err)]
    fn ledger(&self, origin: &str) -> Result<Ledger, Status> {
        let mut map = self
            .ledgers
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        if let Some(l) = map.get(origin) {
            return Ok(l.clone());
        }
        let l = Ledger::open(&self.dir.join(format!("{origin}.redb")), origin, origin)
            .map_err(db_status)?;
        map.insert(origin.to_owned(), l.clone());
        Ok(l)
    }

    fn reject(&self, status: Status) -> Status {
        self.metrics.rejected.inc();
        tracing::warn!("region sync: refused a batch: {}", status.message());
        status
    }

    /// The keys of the request as records, checked to extend `known` with transitions signed
    /// by each previous key.
    #[allow(clippy::result_large_err)]
    fn new_keys(known: &[KeyRecord], given: &[pb::KeyRecord]) -> Result<Vec<KeyRecord>, Status> {
        let bad = |m: String| Status::invalid_argument(format!("keys: {m}"));
        if given.len() < known.len() {
            return Err(bad(format!(
                "{} keys given, {} already known",
                given.len(),
                known.len()
            )));
        }
        let mut out = Vec::new();
        let mut previous: Option<(KeyRef, Vec<u8>)> = None;
        for (i, k) in given.iter().enumerate() {
            let key = KeyRef {
                id: k.key_id.clone(),
                version: k.key_version,
            };
            if let Some(old) = known.get(i) {
                if old.key != key || old.public_key != B64.encode(&k.public_key_der) {
                    return Err(bad(format!(
                        "key {i} ({key}) differs from the one already known ({})",
                        old.key
                    )));
                }
            } else if let Some((prev, prev_public)) = &previous {
                let expected = format!(
                    "{}\nfrom: {prev}\nto: {key}\nto_public_key: {}\n",
                    format::TRANSITION_HEADER,
                    B64.encode(&k.public_key_der)
                );
                if !k.transition_statement.starts_with(&expected)
                    || !verify_signature(
                        prev_public,
                        k.transition_statement.as_bytes(),
                        &k.transition_signature,
                    )
                {
                    return Err(bad(format!(
                        "key {key} is not handed over by a statement signed with {prev}"
                    )));
                }
                out.push(KeyRecord {
                    key: key.clone(),
                    public_key: B64.encode(&k.public_key_der),
                    since_ns: k.since_unix_nanos,
                    transition: Some((
                        k.transition_statement.clone(),
                        B64.encode(&k.transition_signature),
                    )),
                });
            } else {
                // The first key of an origin is taken on first contact (pin it out of band to be sure).
                out.push(KeyRecord {
                    key: key.clone(),
                    public_key: B64.encode(&k.public_key_der),
                    since_ns: k.since_unix_nanos,
                    transition: None,
                });
            }
            previous = Some((key, k.public_key_der.clone()));
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl pb::region_sync_server::RegionSync for SyncServer {
    async fn push_batch(
        &self,
        request: Request<pb::PushBatchRequest>,
    ) -> Result<Response<pb::PushBatchResponse>, Status> {
        let req = request.into_inner();
        let origin = req.origin_region.clone();
        if !valid_region(&origin) {
            return Err(self.reject(Status::invalid_argument(format!(
                "origin_region: {origin:?} is not a region name"
            ))));
        }
        if origin == self.region {
            return Err(self.reject(Status::invalid_argument(format!(
                "origin_region: {origin:?} is this region; a region does not witness itself"
            ))));
        }
        if req.entries.len() > self.max_batch {
            return Err(self.reject(Status::out_of_range(format!(
                "entries: {} receipts in one batch; at most {}",
                req.entries.len(),
                self.max_batch
            ))));
        }
        let _one_writer = self.writer.lock().await;
        let ledger = self.ledger(&origin)?;
        let l = ledger.clone();
        let known = tokio::task::spawn_blocking(move || l.keys())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(db_status)?;
        let new_keys = Self::new_keys(&known, &req.keys).map_err(|s| self.reject(s))?;
        // Receipts: all or nothing.
        let entries: Vec<crate::receipts::ledger::EncodedReceipt> = req
            .entries
            .into_iter()
            .map(|e| {
                (
                    e.seq,
                    e.encoding,
                    (!e.payload.is_empty()).then_some(e.payload),
                )
            })
            .collect();
        let l = ledger.clone();
        let stored_size = tokio::task::spawn_blocking(move || {
            if entries.is_empty() {
                l.size()
            } else {
                l.append_encoded(&entries)
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| self.reject(db_status(e)))?;
        for k in &new_keys {
            ledger.add_key(k).map_err(db_status)?;
        }
        let mut keys: HashMap<KeyRef, Vec<u8>> = HashMap::new();
        for k in known.iter().chain(new_keys.iter()) {
            keys.insert(k.key.clone(), B64.decode(&k.public_key).unwrap_or_default());
        }
        let mut cosigned: Cosigned = ledger
            .meta("cosigned")
            .map_err(db_status)?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default();
        let mut cosignature = None;
        if let Some(cp) = req.checkpoint {
            let body = CheckpointBody::decode(&cp.body)
                .map_err(|e| self.reject(Status::invalid_argument(format!("checkpoint: {e}"))))?;
            if body.region != origin {
                return Err(self.reject(Status::invalid_argument(format!(
                    "checkpoint: it is of region {:?}, not {origin:?}",
                    body.region
                ))));
            }
            let public = keys.get(&body.key).ok_or_else(|| {
                self.reject(Status::invalid_argument(format!(
                    "checkpoint: signed by {}, which is not in the key history",
                    body.key
                )))
            })?;
            if !verify_signature(public, cp.body.as_bytes(), &cp.signature) {
                return Err(self.reject(Status::invalid_argument(format!(
                    "checkpoint {}: its signature does not verify with {}",
                    cp.number, body.key
                ))));
            }
            if body.size > stored_size {
                return Err(self.reject(Status::invalid_argument(format!(
                    "checkpoint {}: covers {} receipts but only {stored_size} are stored here",
                    cp.number, body.size
                ))));
            }
            // Fork: another checkpoint of the same size with a different root.
            let evidence_key = format!("checkpoint-size:{}", body.size);
            if let Some(seen) = ledger.meta(&evidence_key).map_err(db_status)? {
                let seen: StoredCheckpoint =
                    serde_json::from_slice(&seen).map_err(|e| Status::internal(e.to_string()))?;
                if let Ok(old) = CheckpointBody::decode(&seen.body) {
                    if old.root != body.root {
                        self.metrics.forks.inc();
                        let evidence = serde_json::json!({"first": seen, "second": {"body": cp.body, "signature": B64.encode(&cp.signature)}});
                        let _ = ledger.put_meta(
                            &format!("fork:{}:{}", body.size, cp.number),
                            evidence.to_string().as_bytes(),
                        );
                        tracing::error!(%origin, size = body.size, "FORK: two different checkpoints of the same size; refusing to cosign, both kept as evidence");
                        return Err(Status::failed_precondition(format!(
                            "fork: region {origin} presented two different checkpoints of size {}; refusing to cosign (evidence kept)",
                            body.size
                        )));
                    }
                }
            }
            // Its root must be that of the receipts stored here (every receipt's inclusion).
            let l = ledger.clone();
            let size = body.size;
            let root = tokio::task::spawn_blocking(move || l.root(size))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(db_status)?;
            if root != body.root {
                return Err(self.reject(Status::invalid_argument(format!(
                    "checkpoint {}: its root does not match the {} receipts stored here",
                    cp.number, body.size
                ))));
            }
            // Append-only: consistent with what was cosigned before.
            if cosigned.size > 0 {
                let old_root: format::Hash = B64
                    .decode(&cosigned.root)
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .unwrap_or([0; 32]);
                let proof: Vec<format::Hash> = req
                    .consistency_proof
                    .iter()
                    .filter_map(|h| h.as_slice().try_into().ok())
                    .collect();
                let consistent = if body.size == cosigned.size {
                    // The same checkpoint again (a re-sent batch).
                    body.root == old_root
                } else {
                    body.size > cosigned.size
                        && req.proof_from_size == cosigned.size
                        && merkle::verify_consistency(
                            &old_root,
                            cosigned.size,
                            &body.root,
                            body.size,
                            &proof,
                        )
                };
                if !consistent {
                    self.metrics.forks.inc();
                    let _ = ledger.put_meta(
                        &format!("fork:{}:{}", body.size, cp.number),
                        serde_json::json!({"cosigned": cosigned, "second": {"body": cp.body, "signature": B64.encode(&cp.signature)}})
                            .to_string()
                            .as_bytes(),
                    );
                    return Err(Status::failed_precondition(format!(
                        "fork: checkpoint {} of region {origin} is not consistent with the one of size {} cosigned before",
                        cp.number, cosigned.size
                    )));
                }
            }
            let stored = StoredCheckpoint {
                body: cp.body.clone(),
                signature: Some(B64.encode(&cp.signature)),
            };
            ledger
                .put_signed_checkpoint(cp.number, &stored)
                .map_err(db_status)?;
            ledger
                .put_meta(
                    &evidence_key,
                    &serde_json::to_vec(&stored).unwrap_or_default(),
                )
                .map_err(db_status)?;
            let message = cosigned_message(&self.region, &cp.body);
            match self.receipts.sign_with_current(message.as_bytes()).await {
                Ok((key, signature)) => {
                    cosigned = Cosigned {
                        size: body.size,
                        root: B64.encode(body.root),
                    };
                    ledger
                        .put_meta(
                            "cosigned",
                            &serde_json::to_vec(&cosigned).unwrap_or_default(),
                        )
                        .map_err(db_status)?;
                    cosignature = Some(pb::Cosignature {
                        witness_region: self.region.clone(),
                        witness_node: self.receipts.origin().0.to_owned(),
                        key_id: key.key.id,
                        key_version: key.key.version,
                        public_key_der: key.public_key_der,
                        signature,
                    });
                }
                Err(e) => tracing::warn!(%origin, "region sync: cannot cosign now (the KMS): {e}"),
            }
        }
        Ok(Response::new(pb::PushBatchResponse {
            stored_size,
            cosignature,
            cosigned_size: cosigned.size,
        }))
    }

    async fn get_sync_state(
        &self,
        request: Request<pb::GetSyncStateRequest>,
    ) -> Result<Response<pb::GetSyncStateResponse>, Status> {
        let origin = request.into_inner().origin_region;
        if !valid_region(&origin) {
            return Err(Status::invalid_argument(format!(
                "origin_region: {origin:?} is not a region name"
            )));
        }
        let ledger = self.ledger(&origin)?;
        let cosigned: Cosigned = ledger
            .meta("cosigned")
            .map_err(db_status)?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default();
        Ok(Response::new(pb::GetSyncStateResponse {
            stored_size: ledger.size().map_err(db_status)?,
            cosigned_size: cosigned.size,
        }))
    }
}
