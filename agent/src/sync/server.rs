//! The witness side of region sync: stores each origin's receipts in its own ledger file,
//! verifies them against the origin's signed checkpoints, and cosigns checkpoints that extend
//! the last one it cosigned for that origin.

use super::{pb, witness, Metrics};
use crate::config::settings::valid_region;
use crate::receipts::{
    format, ledger::cosigned_message, signer::verify_signature, CheckpointBody, KeyRecord, KeyRef,
    Ledger, LedgerError, Receipts, StoredCheckpoint,
};
use crate::semconv::{attr, span};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use opentelemetry::{
    trace::{FutureExt as _, SpanKind, TraceContextExt as _, Tracer as _},
    KeyValue,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};
use tonic::{Request, Response, Status};

/// The largest batch a peer accepts.
pub const MAX_BATCH: usize = 10_000;

/// The meta key of what this witness last cosigned for an origin.
const COSIGNED: &str = "cosigned";

/// What this witness last cosigned for an origin.
#[derive(Debug, Clone, Copy)]
struct Cosigned {
    size: u64,
    root: format::Hash,
}

/// [`Cosigned`] as stored (JSON, root in base64).
#[derive(Debug, Serialize, Deserialize)]
struct StoredCosigned {
    size: u64,
    root: String,
}

impl Cosigned {
    fn stored(&self) -> StoredCosigned {
        StoredCosigned {
            size: self.size,
            root: B64.encode(self.root),
        }
    }
}

/// What this witness last cosigned for the origin of `ledger` (`None`: nothing yet). A record
/// that does not decode is corruption, never "nothing cosigned": that would accept any history.
fn read_cosigned(ledger: &Ledger) -> Result<Option<Cosigned>, LedgerError> {
    let Some(bytes) = ledger.meta(COSIGNED)? else {
        return Ok(None);
    };
    let corrupt = |m: String| LedgerError::Corrupt(format!("witness record {COSIGNED:?}: {m}"));
    let stored: StoredCosigned =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let root = B64
        .decode(&stored.root)
        .map_err(|e| corrupt(e.to_string()))?
        .try_into()
        .map_err(|_| corrupt("the root is not 32 bytes".into()))?;
    Ok(Some(Cosigned {
        size: stored.size,
        root,
    }))
}

/// `f` on the origin's ledger, on a blocking thread (redb reads and commits are synchronous).
async fn on_ledger<T: Send + 'static>(
    ledger: &Ledger,
    f: impl FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, Status> {
    let ledger = ledger.clone();
    Ok(tokio::task::spawn_blocking(move || f(&ledger))
        .await
        .map_err(|e| Status::internal(format!("a ledger task failed: {e}")))??)
}

/// A stored checkpoint's body, from its JSON record under `key`.
fn decode_stored(bytes: &[u8], key: &str) -> Result<CheckpointBody, LedgerError> {
    let corrupt = |m: String| LedgerError::Corrupt(format!("witness record {key:?}: {m}"));
    let stored: StoredCheckpoint =
        serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    CheckpointBody::decode(&stored.body).map_err(|e| corrupt(e.to_string()))
}

/// JSON of a record to store (these types always serialize; an error is a bug, reported).
fn encode_json(v: &impl Serialize) -> Result<Vec<u8>, LedgerError> {
    serde_json::to_vec(v).map_err(|e| LedgerError::Db(format!("encoding a witness record: {e}")))
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
        let l = Ledger::open(&self.dir.join(format!("{origin}.redb")), origin, origin)?;
        map.insert(origin.to_owned(), l.clone());
        Ok(l)
    }

    fn reject(&self, status: Status) -> Status {
        self.metrics.rejected.inc();
        tracing::warn!("region sync: refused a batch: {}", status.message());
        status
    }

    /// The answer to a checkpoint the witness refuses: an invalid one is counted as a rejected
    /// batch; a fork is counted, logged loudly, and both checkpoints are kept as evidence.
    fn refuse(
        &self,
        ledger: &Ledger,
        cp: &witness::Presented<'_>,
        e: witness::WitnessError,
    ) -> Status {
        match e {
            witness::WitnessError::Invalid(m) => self.reject(Status::invalid_argument(m)),
            witness::WitnessError::Fork(m) => {
                self.metrics.forks.inc();
                let known = |key: &str| {
                    ledger
                        .meta(key)
                        .map_err(|e| {
                            tracing::error!("region sync: fork evidence {key:?} unreadable: {e}")
                        })
                        // Logged just above: evidence is best effort, the record is left out.
                        .ok()
                        .flatten()
                        .and_then(|v| {
                            serde_json::from_slice::<serde_json::Value>(&v)
                                .map_err(|e| {
                                    tracing::error!(
                                        "region sync: fork evidence {key:?} damaged: {e}"
                                    )
                                })
                                // Logged just above: the damaged record is left out.
                                .ok()
                        })
                };
                let size = CheckpointBody::decode(cp.body).map_or(0, |b| b.size);
                let evidence = serde_json::json!({
                    "seen_at_size": known(&format!("checkpoint-size:{size}")),
                    "cosigned": known(COSIGNED),
                    "second": {"number": cp.number, "body": cp.body, "signature": B64.encode(cp.signature)},
                });
                if let Err(err) = ledger.put_meta(
                    &format!("fork:{size}:{}", cp.number),
                    evidence.to_string().as_bytes(),
                ) {
                    tracing::error!(
                        "region sync: the evidence of a fork could not be stored: {err}"
                    );
                }
                tracing::error!(message = %m, "FORK: refusing to cosign; both checkpoints kept as evidence");
                Status::failed_precondition(format!("fork: {m}"))
            }
        }
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

impl SyncServer {
    /// `PushBatch` itself: store, verify, cosign.
    async fn push_batch_inner(
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
            .map_err(|e| Status::internal(e.to_string()))??;
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
        .map_err(|e| match e {
            LedgerError::Refused(m) => self.reject(Status::invalid_argument(m)),
            other => Status::from(other),
        })?;
        let keys_to_add = new_keys.clone();
        on_ledger(&ledger, move |l| {
            keys_to_add.iter().try_for_each(|k| l.add_key(k))
        })
        .await?;
        let mut keys: HashMap<KeyRef, Vec<u8>> = HashMap::new();
        for k in known.iter().chain(new_keys.iter()) {
            let der = B64.decode(&k.public_key).map_err(|e| {
                LedgerError::Corrupt(format!("origin {origin}: stored key {}: {e}", k.key))
            })?;
            keys.insert(k.key.clone(), der);
        }
        let mut cosigned = on_ledger(&ledger, read_cosigned).await?;
        let mut cosignature = None;
        if let Some(cp) = req.checkpoint {
            let presented = witness::Presented {
                number: cp.number,
                body: &cp.body,
                signature: &cp.signature,
            };
            let body = witness::check_presented(&origin, &presented, &keys, stored_size)
                .map_err(|e| self.refuse(&ledger, &presented, e))?;
            // What this witness holds of the origin at that size.
            let evidence_key = format!("checkpoint-size:{}", body.size);
            let key = evidence_key.clone();
            let seen = on_ledger(&ledger, move |l| match l.meta(&key)? {
                Some(bytes) => decode_stored(&bytes, &key).map(Some),
                None => Ok(None),
            })
            .await?;
            let l = ledger.clone();
            let size = body.size;
            let stored_root = tokio::task::spawn_blocking(move || l.root(size))
                .await
                .map_err(|e| Status::internal(e.to_string()))??;
            let history = witness::History {
                seen_at_size: seen.as_ref(),
                stored_root,
                cosigned: cosigned.as_ref().map(|c| (c.size, c.root)),
            };
            let proof: Vec<format::Hash> = req
                .consistency_proof
                .iter()
                // A hash of the wrong length makes the proof fail (refused).
                .filter_map(|h| h.as_slice().try_into().ok())
                .collect();
            witness::check_history(
                &origin,
                cp.number,
                &body,
                &history,
                req.proof_from_size,
                &proof,
            )
            .map_err(|e| self.refuse(&ledger, &presented, e))?;

            let stored = StoredCheckpoint {
                body: cp.body.clone(),
                signature: Some(B64.encode(&cp.signature)),
            };
            let (number, record) = (cp.number, encode_json(&stored)?);
            on_ledger(&ledger, move |l| {
                l.put_signed_checkpoint(number, &stored)?;
                l.put_meta(&evidence_key, &record)
            })
            .await?;
            let message = cosigned_message(&self.region, &cp.body);
            match self.receipts.sign_with_current(message.as_bytes()).await {
                Ok((key, signature)) => {
                    let now = Cosigned {
                        size: body.size,
                        root: body.root,
                    };
                    let record = encode_json(&now.stored())?;
                    on_ledger(&ledger, move |l| l.put_meta(COSIGNED, &record)).await?;
                    cosigned = Some(now);
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
        let cosigned_size = cosigned.map_or(0, |c| c.size);
        Ok(Response::new(pb::PushBatchResponse {
            stored_size,
            cosignature,
            cosigned_size,
        }))
    }
}

#[tonic::async_trait]
impl pb::region_sync_server::RegionSync for SyncServer {
    async fn push_batch(
        &self,
        request: Request<pb::PushBatchRequest>,
    ) -> Result<Response<pb::PushBatchResponse>, Status> {
        // The witness's verification joins the origin's push trace (its traceparent).
        let parent = crate::trace_context::extract(request.metadata());
        let tracer = opentelemetry::global::tracer("knhk-agent");
        let span = tracer
            .span_builder(span::KNHK_SYNC_WITNESS_VERIFY)
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new(
                    attr::KNHK_SYNC_ORIGIN,
                    request.get_ref().origin_region.clone(),
                ),
                KeyValue::new(
                    attr::KNHK_SYNC_BATCH_RECEIPTS,
                    request.get_ref().entries.len() as i64,
                ),
            ])
            .start_with_context(&tracer, &parent);
        let cx = parent.with_span(span);
        let result = self
            .push_batch_inner(request)
            .with_context(cx.clone())
            .await;
        let span = cx.span();
        match &result {
            Ok(r) => span.set_attribute(KeyValue::new(
                attr::KNHK_SYNC_COSIGNED,
                r.get_ref().cosignature.is_some(),
            )),
            Err(status) => {
                span.set_attribute(KeyValue::new(
                    attr::ERROR_TYPE,
                    format!("{:?}", status.code()).to_lowercase(),
                ));
                span.set_status(opentelemetry::trace::Status::error(
                    status.message().to_owned(),
                ));
            }
        }
        span.end();
        result
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
        let cosigned = on_ledger(&ledger, read_cosigned).await?;
        Ok(Response::new(pb::GetSyncStateResponse {
            stored_size: ledger.size()?,
            cosigned_size: cosigned.map_or(0, |c| c.size),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_witness_record_that_does_not_decode_is_corruption_not_a_fresh_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(&dir.path().join("east.redb"), "east", "east").expect("open");
        assert!(read_cosigned(&ledger).expect("empty").is_none());
        for garbage in [&b""[..], b"{}", b"{\"size\":3,\"root\":\"not base64\"}"] {
            ledger.put_meta(COSIGNED, garbage).expect("put");
            match read_cosigned(&ledger) {
                Err(LedgerError::Corrupt(m)) => assert!(m.contains("cosigned"), "{m}"),
                other => panic!("{garbage:?}: expected Corrupt, got {other:?}"),
            }
        }
        let good = Cosigned {
            size: 3,
            root: [7; 32],
        };
        ledger
            .put_meta(COSIGNED, &encode_json(&good.stored()).expect("encode"))
            .expect("put");
        let back = read_cosigned(&ledger).expect("read").expect("present");
        assert_eq!((back.size, back.root), (3, [7; 32]));
    }
}
