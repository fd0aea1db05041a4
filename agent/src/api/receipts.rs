//! `knhk.receipts.v1`: `ReceiptService` (read the ledger, get proofs) and `HoldService` (legal
//! holds), thin over [`crate::receipts::Receipts`].

/// Generated types, clients and servers of `proto/knhk/receipts/v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("knhk.receipts.v1");
}

use crate::note::{self, Cosignature, SignatureLine};
use crate::receipts::{
    format::fingerprint, ledger::StoredCosignature, CheckpointBody, Hold, LedgerError, ReceiptKind,
    Receipts, ReceiptsError, StoredCheckpoint, StoredReceipt,
};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use pb::{hold_service_server::HoldService, receipt_service_server::ReceiptService};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The one mapping of the ledger service's errors to gRPC codes.
fn status_of(e: ReceiptsError) -> Status {
    match e {
        ReceiptsError::Ledger(e) => Status::from(e),
        ReceiptsError::Signer(e) => Status::unavailable(e.to_string()),
        ReceiptsError::Stopped => Status::unavailable(e.to_string()),
        ReceiptsError::NoSuchHold(_) => Status::not_found(e.to_string()),
        ReceiptsError::AlreadyReleased(_) => Status::failed_precondition(e.to_string()),
        ReceiptsError::Metrics(_) => Status::internal(e.to_string()),
        ReceiptsError::Unverified { .. } => Status::data_loss(e.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::from)
}

fn receipt_pb((r, payload): StoredReceipt) -> pb::Receipt {
    pb::Receipt {
        seq: r.seq,
        cycle: r.cycle,
        kind: r.kind.as_str().into(),
        time_unix_nanos: r.time_ns,
        policy_generation: r.policy_generation,
        payload_sha256: r.payload_hash.to_vec(),
        payload_compacted: payload.is_none(),
        // A compacted payload is sent empty; its hash is in the header.
        payload: payload.unwrap_or_default(),
        node: r.node.clone(),
        region: r.region.clone(),
        key_id: r.key_id.clone(),
        key_version: r.key_version,
        encoding: r.encode(),
    }
}

/// Checkpoints as protobuf, each with its signing key's fingerprint (from the key history) and
/// its cosignatures; a stored value that does not decode is `DATA_LOSS` naming it.
#[allow(clippy::result_large_err)]
fn with_cosignatures(
    ledger: &crate::receipts::Ledger,
    found: Vec<(u64, StoredCheckpoint)>,
) -> Result<Vec<Result<pb::Checkpoint, Status>>, LedgerError> {
    let keys = ledger.keys()?;
    let mut out = Vec::with_capacity(found.len());
    for (number, stored) in found {
        let cosignatures = ledger.cosignatures_of(number)?;
        out.push(checkpoint_pb(number, stored, &keys, cosignatures));
    }
    Ok(out)
}

#[allow(clippy::result_large_err)]
fn checkpoint_pb(
    number: u64,
    stored: StoredCheckpoint,
    keys: &[crate::receipts::KeyRecord],
    cosignatures: Vec<StoredCosignature>,
) -> Result<pb::Checkpoint, Status> {
    let lost = |what: &str, e: &dyn std::fmt::Display| {
        Status::data_loss(format!("checkpoint {number}: {what}: {e}"))
    };
    let body = CheckpointBody::decode(&stored.body).map_err(|e| lost("body", &e))?;
    let key_fingerprint = keys
        .iter()
        .find(|k| k.key == body.key)
        .and_then(|k| B64.decode(&k.public_key).ok())
        // Not in the history (unstamped) or not base64 (verify reports it): no fingerprint.
        .map(|der| fingerprint(&der))
        .unwrap_or_default();
    let public = keys
        .iter()
        .find(|k| k.key == body.key)
        .and_then(|k| B64.decode(&k.public_key).ok());
    let mut lines = Vec::new();
    let cosignatures = cosignatures
        .into_iter()
        .map(|c| {
            let line = SignatureLine::parse(c.line.trim_end_matches('\n'))
                .map_err(|e| lost(&format!("cosignature by {}", c.witness()), &e))?;
            let parsed = Cosignature::from_line(&line)
                .map_err(|e| lost(&format!("cosignature by {}", c.witness()), &e))?;
            lines.push(line);
            Ok(pb::Cosignature {
                witness: parsed.witness,
                verifier_key: c.witness_key,
                line: c.line,
                timestamp_unix: parsed.timestamp,
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    let signature = stored
        .signature
        .as_deref()
        .map(|s| B64.decode(s))
        .transpose()
        .map_err(|e| lost("signature not base64", &e))?
        // Unsigned (queued for the KMS): empty, as the proto says.
        .unwrap_or_default();
    let note = match (&public, signature.is_empty()) {
        (Some(public), false) => {
            let mut all = vec![note::log_signature_line(&body.origin, public, &signature)];
            all.extend(lines);
            note::render(&stored.body, &all)
        }
        _ => String::new(),
    };
    Ok(pb::Checkpoint {
        number,
        signature,
        origin: body.origin.clone(),
        note,
        body: stored.body,
        tree_size: body.size,
        root_hash: body.root.to_vec(),
        key_id: body.key.id,
        key_version: body.key.version,
        key_fingerprint,
        cosignatures,
    })
}

/// The receipt reader.
#[derive(Debug, Clone)]
pub struct ReceiptApi(pub Arc<Receipts>);

#[tonic::async_trait]
impl ReceiptService for ReceiptApi {
    async fn get_receipt(
        &self,
        request: Request<pb::GetReceiptRequest>,
    ) -> Result<Response<pb::GetReceiptResponse>, Status> {
        let seq = request.into_inner().seq;
        let ledger = self.0.ledger().clone();
        let r = blocking(move || ledger.receipt(seq)).await?;
        Ok(Response::new(pb::GetReceiptResponse {
            receipt: Some(receipt_pb(r)),
        }))
    }

    async fn list_receipts(
        &self,
        request: Request<pb::ListReceiptsRequest>,
    ) -> Result<Response<pb::ListReceiptsResponse>, Status> {
        let req = request.into_inner();
        let limit = match req.limit {
            0 => 100,
            n if n > 1000 => {
                return Err(Status::out_of_range(format!(
                    "limit: {n} is more than 1000 receipts per call"
                )))
            }
            n => n as usize,
        };
        let ledger = self.0.ledger().clone();
        let (receipts, size) = blocking(move || {
            let size = ledger.size()?;
            Ok((ledger.receipts(req.from_seq, limit)?, size))
        })
        .await?;
        Ok(Response::new(pb::ListReceiptsResponse {
            receipts: receipts.into_iter().map(receipt_pb).collect(),
            log_size: size,
        }))
    }

    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        let wanted = request.into_inner().number;
        let ledger = self.0.ledger().clone();
        let found = blocking(move || match wanted {
            Some(n) => Ok(ledger.checkpoint(n)?.map(|c| (n, c))),
            None => {
                let mut latest = None;
                ledger.checkpoints_newest_first(|n, c| {
                    if c.signature.is_some() {
                        latest = Some((n, c));
                        return false;
                    }
                    true
                })?;
                Ok(latest)
            }
        })
        .await?;
        let (number, stored) = found.ok_or_else(|| match wanted {
            Some(n) => Status::not_found(format!("no checkpoint {n}")),
            None => Status::not_found("no signed checkpoint yet"),
        })?;
        let ledger = self.0.ledger().clone();
        let mut checkpoints = blocking(move || with_cosignatures(&ledger, vec![(number, stored)]))
            .await?
            .into_iter();
        Ok(Response::new(pb::GetCheckpointResponse {
            checkpoint: checkpoints.next().transpose()?,
        }))
    }

    async fn list_keys(
        &self,
        _: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let ledger = self.0.ledger().clone();
        let keys = blocking(move || ledger.keys()).await?;
        let keys = keys
            .into_iter()
            .map(|k| {
                let public_key = B64.decode(&k.public_key).map_err(|e| {
                    Status::data_loss(format!("key {}: public key not base64: {e}", k.key))
                })?;
                let (statement, signature) = match k.transition {
                    Some((statement, sig)) => (
                        statement,
                        B64.decode(&sig).map_err(|e| {
                            Status::data_loss(format!(
                                "key {}: transition signature not base64: {e}",
                                k.key
                            ))
                        })?,
                    ),
                    // The first key: no transition, empty fields as the proto says.
                    None => Default::default(),
                };
                Ok(pb::SigningKey {
                    fingerprint: fingerprint(&public_key),
                    key_id: k.key.id,
                    key_version: k.key.version,
                    public_key,
                    since_unix_nanos: k.since_ns,
                    transition_statement: statement,
                    transition_signature: signature,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        Ok(Response::new(pb::ListKeysResponse { keys }))
    }

    async fn list_checkpoints(
        &self,
        request: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let req = request.into_inner();
        let limit = match req.limit {
            0 => 100,
            n if n > 1000 => {
                return Err(Status::out_of_range(format!(
                    "limit: {n} is more than 1000 checkpoints per call"
                )))
            }
            n => n as usize,
        };
        let ledger = self.0.ledger().clone();
        let checkpoints = blocking(move || {
            let found = ledger.checkpoints_from(req.from_number, limit)?;
            with_cosignatures(&ledger, found)
        })
        .await?;
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: checkpoints.into_iter().collect::<Result<_, _>>()?,
        }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::GetInclusionProofResponse>, Status> {
        let req = request.into_inner();
        let ledger = self.0.ledger().clone();
        let (path, leaf) = blocking(move || {
            let path = ledger.inclusion_proof(req.seq, req.tree_size)?;
            let (r, _) = ledger.receipt(req.seq)?;
            Ok((path, crate::receipts::format::leaf_hash(&r.encode())))
        })
        .await?;
        Ok(Response::new(pb::GetInclusionProofResponse {
            path: path.iter().map(|h| h.to_vec()).collect(),
            leaf_hash: leaf.to_vec(),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<pb::GetConsistencyProofRequest>,
    ) -> Result<Response<pb::GetConsistencyProofResponse>, Status> {
        let req = request.into_inner();
        let ledger = self.0.ledger().clone();
        let path = blocking(move || ledger.consistency_proof(req.old_size, req.new_size)).await?;
        Ok(Response::new(pb::GetConsistencyProofResponse {
            path: path.iter().map(|h| h.to_vec()).collect(),
        }))
    }
}

/// Legal holds.
#[derive(Debug, Clone)]
pub struct HoldApi(pub Arc<Receipts>);

fn hold_pb(h: Hold) -> pb::Hold {
    pb::Hold {
        id: h.id,
        case_id: h.case_id,
        reason: h.reason,
        from_seq: h.seq_range.map(|r| r.0),
        to_seq: h.seq_range.map(|r| r.1),
        from_time_unix_nanos: h.time_range.map(|r| r.0),
        to_time_unix_nanos: h.time_range.map(|r| r.1),
        // Absent limit: the empty string, as the proto says.
        kind: h.kind.unwrap_or_default(),
        // Absent limit: the empty string, as the proto says.
        region: h.region.unwrap_or_default(),
        placed_unix_nanos: h.placed_ns,
        released_unix_nanos: h.released_ns,
    }
}

/// A hold request as a [`Hold`], or every problem with it as `field: what is wrong`.
#[allow(clippy::result_large_err)]
pub fn hold_from_pb(h: pb::Hold) -> Result<Hold, Status> {
    let mut problems = Vec::new();
    if h.case_id.trim().is_empty() {
        problems.push("hold.case_id: is required".to_string());
    }
    if h.reason.trim().is_empty() {
        problems.push("hold.reason: is required (why the receipts must be kept)".to_string());
    }
    let range =
        |from: Option<i128>, to: Option<i128>, what: &str, problems: &mut Vec<String>| match (
            from, to,
        ) {
            (None, None) => None,
            (Some(a), Some(b)) if a < b => Some((a, b)),
            (Some(_), Some(_)) => {
                problems.push(format!("hold.from_{what}: must be below to_{what}"));
                None
            }
            _ => {
                problems.push(format!(
                    "hold.from_{what} and hold.to_{what}: give both or neither"
                ));
                None
            }
        };
    let seq = range(
        h.from_seq.map(i128::from),
        h.to_seq.map(i128::from),
        "seq",
        &mut problems,
    );
    let time = range(
        h.from_time_unix_nanos.map(i128::from),
        h.to_time_unix_nanos.map(i128::from),
        "time_unix_nanos",
        &mut problems,
    );
    if !h.kind.is_empty() && ReceiptKind::parse(&h.kind).is_none() {
        let names: Vec<&str> = ReceiptKind::ALL.iter().map(|k| k.as_str()).collect();
        problems.push(format!(
            "hold.kind: {:?} is not a receipt kind ({})",
            h.kind,
            names.join(", ")
        ));
    }
    if seq.is_none()
        && time.is_none()
        && h.kind.is_empty()
        && h.region.is_empty()
        && problems.is_empty()
    {
        problems
            .push("hold: give at least one limit (seq range, time range, kind or region)".into());
    }
    if !problems.is_empty() {
        return Err(Status::invalid_argument(problems.join("; ")));
    }
    Ok(Hold {
        id: 0,
        case_id: h.case_id,
        reason: h.reason,
        seq_range: seq.map(|(a, b)| (a as u64, b as u64)),
        time_range: time.map(|(a, b)| (a as i64, b as i64)),
        kind: (!h.kind.is_empty()).then_some(h.kind),
        region: (!h.region.is_empty()).then_some(h.region),
        placed_ns: 0,
        released_ns: None,
    })
}

#[tonic::async_trait]
impl HoldService for HoldApi {
    async fn place_hold(
        &self,
        request: Request<pb::PlaceHoldRequest>,
    ) -> Result<Response<pb::PlaceHoldResponse>, Status> {
        let hold = request
            .into_inner()
            .hold
            .ok_or_else(|| Status::invalid_argument("hold: is required"))?;
        let hold = hold_from_pb(hold)?;
        let id = self.0.place_hold(hold).await.map_err(status_of)?;
        Ok(Response::new(pb::PlaceHoldResponse { id }))
    }

    async fn release_hold(
        &self,
        request: Request<pb::ReleaseHoldRequest>,
    ) -> Result<Response<pb::ReleaseHoldResponse>, Status> {
        let req = request.into_inner();
        if req.reason.trim().is_empty() {
            return Err(Status::invalid_argument("reason: is required"));
        }
        let hold = self
            .0
            .release_hold(req.id, &req.reason)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::ReleaseHoldResponse {
            hold: Some(hold_pb(hold)),
        }))
    }

    async fn list_holds(
        &self,
        _: Request<pb::ListHoldsRequest>,
    ) -> Result<Response<pb::ListHoldsResponse>, Status> {
        let ledger = self.0.ledger().clone();
        let holds = blocking(move || ledger.holds()).await?;
        Ok(Response::new(pb::ListHoldsResponse {
            holds: holds.into_iter().map(hold_pb).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hold_release_errors_have_their_own_codes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = crate::config::ReceiptSettings {
            path: dir.path().join("r.redb"),
            node: "n".into(),
            region: "local".into(),
            rotation_interval: std::time::Duration::from_secs(3600),
            retention: Default::default(),
            max_pending_checkpoints: 16,
            signer: crate::config::SignerSettings::File {
                key_dir: dir.path().join("keys"),
            },
        };
        let signer = crate::receipts::connect_signer(&settings.signer)
            .await
            .expect("signer");
        let (receipts, tasks) =
            Receipts::start(settings, signer, &prometheus::Registry::new(), None, None)
                .await
                .expect("receipts");
        let api = HoldApi(receipts);
        let hold = pb::Hold {
            case_id: "C".into(),
            reason: "r".into(),
            from_seq: Some(0),
            to_seq: Some(10),
            ..Default::default()
        };
        let id = api
            .place_hold(Request::new(pb::PlaceHoldRequest { hold: Some(hold) }))
            .await
            .expect("placed")
            .into_inner()
            .id;
        let release = |id: u64| {
            api.release_hold(Request::new(pb::ReleaseHoldRequest {
                id,
                reason: "done".into(),
            }))
        };
        release(id).await.expect("released");
        let again = release(id).await.expect_err("released twice");
        assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
        let missing = release(id + 100).await.expect_err("no such hold");
        assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
        tasks
            .shutdown(tokio::time::Instant::now() + std::time::Duration::from_secs(5))
            .await;
    }

    #[test]
    fn bad_holds_name_every_problem() {
        let e = hold_from_pb(pb::Hold::default()).expect_err("empty");
        assert!(e.message().contains("hold.case_id: is required"), "{e:?}");
        assert!(e.message().contains("hold.reason: is required"), "{e:?}");
        let base = pb::Hold {
            case_id: "C".into(),
            reason: "r".into(),
            ..Default::default()
        };
        let e = hold_from_pb(base.clone()).expect_err("no limit");
        assert!(e.message().contains("at least one limit"), "{e:?}");
        let e = hold_from_pb(pb::Hold {
            from_seq: Some(5),
            to_seq: Some(5),
            kind: "policy".into(),
            ..base.clone()
        })
        .expect_err("bad range and kind");
        assert!(
            e.message().contains("hold.from_seq: must be below to_seq"),
            "{e:?}"
        );
        assert!(
            e.message()
                .contains("hold.kind: \"policy\" is not a receipt kind"),
            "{e:?}"
        );
        let e = hold_from_pb(pb::Hold {
            from_time_unix_nanos: Some(1),
            ..base.clone()
        })
        .expect_err("half a range");
        assert!(e.message().contains("give both or neither"), "{e:?}");
        let ok = hold_from_pb(pb::Hold {
            region: "eu".into(),
            ..base
        })
        .expect("region only");
        assert_eq!(ok.region.as_deref(), Some("eu"));
    }
}
