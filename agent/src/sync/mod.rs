//! Cross-region receipt sync (`knhk.sync.v1.RegionSync`): every region pushes its own receipts
//! and signed checkpoints to every peer; peers keep each origin's log in its own ledger file,
//! verify it, and cosign checkpoints as witnesses. A checkpoint is quorum-committed once
//! `quorum` regions (the origin counts as one) hold it with a cosignature. Protocol and failure
//! cases: `docs/multi-region.md`.
//!
//! Each origin's log has a single writer (its own agent), so there is nothing to elect: a
//! witness only checks that each checkpoint it cosigns extends the last one it cosigned for that
//! origin (a consistency proof), and refuses — keeping both as evidence — when it sees two
//! different checkpoints of the same size (a fork).

mod server;
pub mod witness;
pub use server::SyncServer;

use crate::semconv::{attr, span};
use crate::{
    config::{Peer, SyncSettings},
    receipts::{ledger::StoredCosignature, CheckpointBody, Receipts},
    resilience::{CircuitBreaker, CircuitState},
    tasks::{Stop, TaskGroup},
};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use opentelemetry::{
    trace::{SpanKind, TraceContextExt as _, Tracer as _},
    KeyValue,
};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::{net::SocketAddr, sync::Arc, time::Duration};

/// Generated types, client and server of `proto/knhk/sync/v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("knhk.sync.v1");
}

#[derive(Clone)]
struct Metrics {
    acked: IntGaugeVec,
    backlog: IntGaugeVec,
    circuit: IntGaugeVec,
    failures: IntCounterVec,
    committed: IntGauge,
    quorum_ok: IntGauge,
    forks: IntCounter,
    rejected: IntCounter,
}

impl Metrics {
    fn register(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let acked = IntGaugeVec::new(
            Opts::new(
                "knhk_sync_peer_acked_receipts",
                "Receipts of this region a peer holds durably.",
            ),
            &["peer"],
        )?;
        let backlog = IntGaugeVec::new(
            Opts::new(
                "knhk_sync_peer_backlog_receipts",
                "Receipts of this region a peer does not hold yet.",
            ),
            &["peer"],
        )?;
        let circuit = IntGaugeVec::new(
            Opts::new(
                "knhk_sync_peer_circuit",
                "1 for each peer's circuit breaker state.",
            ),
            &["peer", "state"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new("knhk_sync_peer_failures_total", "Failed pushes to a peer."),
            &["peer"],
        )?;
        let committed = IntGauge::new(
            "knhk_sync_quorum_committed_size",
            "Tree size of this region's newest quorum-committed checkpoint.",
        )?;
        let quorum_ok = IntGauge::new(
            "knhk_sync_quorum_committed",
            "1 while every signed checkpoint older than twice the sync timeout (at least 2 s) is quorum-committed; 0 while one waits longer (quorum lost).",
        )?;
        quorum_ok.set(1);
        let forks = IntCounter::new(
            "knhk_sync_forks_detected_total",
            "Two different checkpoints of the same size from one origin (refused; both kept as evidence).",
        )?;
        let rejected = IntCounter::new(
            "knhk_sync_batches_rejected_total",
            "Batches from peers refused as malformed, oversized or unverifiable (nothing stored).",
        )?;
        for m in [
            Box::new(acked.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(backlog.clone()),
            Box::new(circuit.clone()),
            Box::new(failures.clone()),
            Box::new(committed.clone()),
            Box::new(quorum_ok.clone()),
            Box::new(forks.clone()),
            Box::new(rejected.clone()),
        ] {
            registry.register(m)?;
        }
        Ok(Metrics {
            acked,
            backlog,
            circuit,
            failures,
            committed,
            quorum_ok,
            forks,
            rejected,
        })
    }
}

/// Why sync could not start.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Metrics.
    #[error("registering sync metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// TLS.
    #[error("region sync: {0}")]
    Tls(String),
}

/// The origin side: one replication task per peer, and the quorum view.
pub struct Replicator {
    settings: SyncSettings,
    receipts: Arc<Receipts>,
    metrics: Metrics,
    server: Arc<SyncServer>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("region", &self.settings.region)
            .finish_non_exhaustive()
    }
}

impl Replicator {
    /// Starts replicating `receipts` to the peers (one task per peer, returned as a group for
    /// the caller to own), and a witness server for theirs (under `peers_dir`). `identity` gives
    /// mTLS to `https://` peers. On the group's stop, each peer task pushes until it is caught up
    /// (or fails, or the shutdown deadline passes), then stops.
    pub fn start(
        settings: SyncSettings,
        receipts: Arc<Receipts>,
        identity: Option<Arc<crate::identity::Identity>>,
        peers_dir: std::path::PathBuf,
        registry: &Registry,
    ) -> Result<(Arc<Replicator>, TaskGroup), SyncError> {
        let metrics = Metrics::register(registry)?;
        let server = Arc::new(SyncServer::new(
            settings.region.clone(),
            receipts.clone(),
            peers_dir,
            settings.batch_size,
            metrics.clone(),
        ));
        let sync = Arc::new(Replicator {
            settings,
            receipts,
            metrics,
            server,
        });
        let mut tasks = TaskGroup::new("region sync");
        for peer in sync.settings.peers.clone() {
            let name = format!("push to {}", peer.endpoint);
            let stop = tasks.stop_signal();
            tasks.spawn(
                name,
                Arc::clone(&sync).replicate(peer, identity.clone(), stop),
            );
        }
        Ok((sync, tasks))
    }

    /// The witness service for the gRPC server.
    pub fn server(&self) -> Arc<SyncServer> {
        self.server.clone()
    }

    /// A readiness check: no signed checkpoint has waited for its quorum longer than twice the
    /// peer timeout (at least 2 s).
    pub fn readiness_check(
        self: &Arc<Self>,
    ) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let me = Arc::downgrade(self);
        move || {
            let Some(me) = me.upgrade() else {
                return Err("region sync stopped".into());
            };
            let limit = me.quorum_wait_limit_s();
            match me.quorum_state().1 {
                Some((size, age_s, holders)) if age_s >= limit => Err(format!(
                    "region {}: cannot reach quorum: the checkpoint of size {size} has waited {age_s} s and is held by {holders} of the {} regions needed; \
                     check the peers and the links to them (knhk_sync_peer_circuit)",
                    me.settings.region, me.settings.quorum
                )),
                _ => Ok(()),
            }
        }
    }

    /// (region, quorum, newest committed size, why quorum is not being reached).
    pub fn status(self: &Arc<Self>) -> (String, usize, u64, Option<String>) {
        let (committed, _) = self.quorum_state();
        let problem = (self.readiness_check())().err();
        (
            self.settings.region.clone(),
            self.settings.quorum,
            committed,
            problem,
        )
    }

    /// How long a signed checkpoint may wait for quorum before quorum counts as lost, seconds.
    fn quorum_wait_limit_s(&self) -> i64 {
        (self.settings.timeout * 2)
            .max(Duration::from_secs(2))
            .as_secs() as i64
    }

    /// (newest committed size, the oldest signed checkpoint past it: (size, age in s, regions
    /// holding it)).
    fn quorum_state(&self) -> (u64, Option<(u64, i64, usize)>) {
        let ledger = self.receipts.ledger();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        // Newest first, back to the newest committed one: only the checkpoints still waiting
        // are read, not the whole history.
        let mut committed = 0;
        let mut waiting = None;
        let scan = ledger.checkpoints_newest_first(|n, c| {
            if c.signature.is_none() {
                return true;
            }
            let Ok(body) = CheckpointBody::decode(&c.body) else {
                return true;
            };
            // A count that cannot be read counts no witness: quorum is never claimed wrongly.
            let holders = 1 + ledger.cosigner_count(n).unwrap_or(0);
            if holders >= self.settings.quorum {
                committed = body.size;
                return false;
            }
            waiting = Some((body.size, (now - body.time_ns) / 1_000_000_000, holders));
            true
        });
        if let Err(e) = scan {
            // The quorum view keeps what it read; readiness then reports the waiting checkpoint.
            tracing::error!("region sync: reading checkpoints for the quorum view failed: {e}");
        }
        self.metrics.committed.set(committed as i64);
        let lost = waiting.is_some_and(|(_, age_s, _)| age_s >= self.quorum_wait_limit_s());
        self.metrics.quorum_ok.set(i64::from(!lost));
        (committed, waiting)
    }

    async fn channel(
        &self,
        peer: &Peer,
        identity: Option<&crate::identity::Identity>,
    ) -> Result<tonic::transport::Channel, String> {
        let addr: SocketAddr = tokio::net::lookup_host(&peer.authority)
            .await
            .map_err(|e| format!("{}: cannot resolve {}: {e}", peer.endpoint, peer.authority))?
            .next()
            .ok_or_else(|| {
                format!(
                    "{}: {} resolves to no address",
                    peer.endpoint, peer.authority
                )
            })?;
        if !peer.tls {
            return tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())
                .map(|e| e.timeout(self.settings.timeout).connect_lazy());
        }
        let identity = identity.ok_or_else(|| {
            format!(
                "{}: https peers need [spiffe] enabled = true (mTLS)",
                peer.endpoint
            )
        })?;
        let source = identity
            .source()
            .await
            .ok_or_else(|| "no SVID for region sync".to_string())?;
        let config = crate::identity::tls::client_config(
            source,
            &identity.settings().accepted_trust_domains(),
            identity.settings().access.region_peers.clone(),
        )?;
        crate::identity::tls::channel(addr, config)
    }

    async fn replicate(
        self: Arc<Self>,
        peer: Peer,
        identity: Option<Arc<crate::identity::Identity>>,
        mut stop: Stop,
    ) {
        let name = peer.endpoint.clone();
        let breaker = CircuitBreaker::new(3, Duration::from_secs(2));
        let set_circuit = |s: CircuitState| {
            for x in CircuitState::ALL {
                self.metrics
                    .circuit
                    .with_label_values(&[&name, x.as_str()])
                    .set(i64::from(x == s));
            }
        };
        set_circuit(CircuitState::Closed);
        let mut changes = self.receipts.changes();
        let channel = loop {
            match self.channel(&peer, identity.as_deref()).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(peer = %name, "region sync cannot connect: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        _ = stop.requested() => return,
                    }
                }
            }
        };
        let mut client = pb::region_sync_client::RegionSyncClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let mut acked: Option<u64> = None;
        let mut cosigned: u64 = 0;
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Err(wait) = breaker.allow() {
                set_circuit(breaker.state());
                if stop.is_requested() {
                    return; // The peer is down: nothing more to push before the deadline.
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.requested() => {}
                }
                continue;
            }
            let result = self
                .push_once(&mut client, &name, &mut acked, &mut cosigned)
                .await;
            match result {
                Ok(more) => {
                    breaker.success();
                    set_circuit(breaker.state());
                    backoff = Duration::from_millis(100);
                    if !more {
                        if stop.is_requested() {
                            tracing::info!(peer = %name, "region sync caught up and stopped");
                            return;
                        }
                        // Caught up: wait for new receipts or checkpoints, then let a batch fill.
                        tokio::select! {
                            _ = changes.changed() => {}
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            // On stop, one more push: whatever the final checkpoint added.
                            _ = stop.requested() => continue,
                        }
                        tokio::time::sleep(self.settings.linger).await;
                    }
                }
                Err(e) => {
                    breaker.failure();
                    set_circuit(breaker.state());
                    self.metrics.failures.with_label_values(&[&name]).inc();
                    tracing::warn!(peer = %name, "region sync push failed (retrying in {} ms): {e}", backoff.as_millis());
                    acked = None;
                    if stop.is_requested() {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.requested() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            self.metrics
                .acked
                .with_label_values(&[&name])
                .set(acked.unwrap_or(0) as i64);
            // The backlog gauge keeps its last value when the database cannot be read (the
            // error is logged): 0 would claim the peer is caught up.
            match self.receipts.ledger().size() {
                Ok(size) => self
                    .metrics
                    .backlog
                    .with_label_values(&[&name])
                    .set(size.saturating_sub(acked.unwrap_or(0)) as i64),
                Err(e) => {
                    tracing::error!(peer = %name, "region sync: reading the ledger size failed: {e}")
                }
            }
            self.quorum_state();
        }
    }

    /// A request that gives up after the configured timeout.
    fn bounded<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.set_timeout(self.settings.timeout);
        r
    }

    /// One push: the next batch, with the newest signed checkpoint it completes. Returns whether
    /// more is waiting.
    async fn push_once(
        &self,
        client: &mut pb::region_sync_client::RegionSyncClient<tonic::transport::Channel>,
        peer: &str,
        acked: &mut Option<u64>,
        cosigned: &mut u64,
    ) -> Result<bool, String> {
        let region = self.settings.region.clone();
        if acked.is_none() {
            let state = client
                .get_sync_state(self.bounded(pb::GetSyncStateRequest {
                    origin_region: region.clone(),
                }))
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            *acked = Some(state.stored_size);
            *cosigned = state.cosigned_size;
        }
        let from = acked.unwrap_or(0);
        let ledger = self.receipts.ledger().clone();
        let batch = self.settings.batch_size;
        let cosigned_now = *cosigned;
        let prepared =
            tokio::task::spawn_blocking(move || prepare(&ledger, from, batch, cosigned_now))
                .await
                .map_err(|e| e.to_string())??;
        let Some((request, number, end, more)) = prepared.map(|(mut r, n, end, more)| {
            r.origin_region = region.clone();
            (r, n, end, more)
        }) else {
            return Ok(false);
        };
        // The push span; its traceparent goes to the witness, whose verify span joins the trace.
        let tracer = opentelemetry::global::tracer("knhk-agent");
        let span = tracer
            .span_builder(span::KNHK_SYNC_PUSH)
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new(attr::KNHK_SYNC_PEER, peer.to_owned()),
                KeyValue::new(attr::KNHK_SYNC_BATCH_RECEIPTS, request.entries.len() as i64),
            ])
            .start(&tracer);
        let cx = opentelemetry::Context::current().with_span(span);
        let mut call = self.bounded(request);
        crate::trace_context::inject(&cx, call.metadata_mut());
        let pushed = client.push_batch(call).await;
        if let Err(status) = &pushed {
            cx.span().set_attribute(KeyValue::new(
                attr::ERROR_TYPE,
                format!("{:?}", status.code()).to_lowercase(),
            ));
            cx.span().set_status(opentelemetry::trace::Status::error(
                status.message().to_owned(),
            ));
        }
        cx.span().end();
        let response = pushed.map_err(|s| s.to_string())?.into_inner();
        *acked = Some(response.stored_size);
        *cosigned = response.cosigned_size;
        if let (Some(c), Some(number)) = (response.cosignature, number) {
            let stored = StoredCosignature {
                region: c.witness_region,
                node: c.witness_node,
                key: crate::receipts::KeyRef {
                    id: c.key_id,
                    version: c.key_version,
                },
                public_key: B64.encode(&c.public_key_der),
                signature: B64.encode(&c.signature),
            };
            let ledger = self.receipts.ledger().clone();
            tokio::task::spawn_blocking(move || ledger.put_cosignature(number, &stored))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok(more || response.stored_size < end)
    }
}

type Prepared = Option<(pb::PushBatchRequest, Option<u64>, u64, bool)>;

/// The next batch from `from`: receipts, the key history, and the newest signed checkpoint the
/// peer will fully hold after it (with the consistency proof from `cosigned`). `None`: nothing
/// to send.
fn prepare(
    ledger: &crate::receipts::Ledger,
    from: u64,
    batch: usize,
    cosigned: u64,
) -> Result<Prepared, String> {
    let size = ledger.size().map_err(|e| e.to_string())?;
    let entries: Vec<pb::Entry> = ledger
        .receipts(from, batch)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(r, payload)| pb::Entry {
            seq: r.seq,
            encoding: r.encode(),
            // A compacted payload travels empty; the header's hash still covers it.
            payload: payload.unwrap_or_default(),
        })
        .collect();
    let end = from + entries.len() as u64;
    // The newest signed checkpoint the peer will fully hold, if it is newer than the one it
    // cosigned; read newest first, so only recent checkpoints are decoded.
    let mut checkpoint = None;
    ledger
        .checkpoints_newest_first(|n, c| {
            if c.signature.is_none() {
                return true;
            }
            let Ok(b) = CheckpointBody::decode(&c.body) else {
                return true;
            };
            if b.size > end {
                return true;
            }
            if b.size > cosigned {
                checkpoint = Some((n, c, b));
            }
            false
        })
        .map_err(|e| e.to_string())?;
    if entries.is_empty() && checkpoint.is_none() {
        return Ok(None);
    }
    // Our own stored key records: one that does not decode is corruption, reported rather than
    // sent to peers as an empty key (which they would refuse without saying why).
    let corrupt =
        |what: &str, e: base64::DecodeError| format!("stored {what} does not decode: {e}");
    let mut keys = Vec::new();
    for k in ledger.keys().map_err(|e| e.to_string())? {
        keys.push(pb::KeyRecord {
            public_key_der: B64
                .decode(&k.public_key)
                .map_err(|e| corrupt(&format!("public key of {}", k.key), e))?,
            transition_statement: k
                .transition
                .as_ref()
                .map(|t| t.0.clone())
                .unwrap_or_default(), // The first key has no transition.
            transition_signature: match &k.transition {
                Some((_, sig)) => B64
                    .decode(sig)
                    .map_err(|e| corrupt(&format!("transition signature of {}", k.key), e))?,
                None => Vec::new(),
            },
            key_id: k.key.id,
            key_version: k.key.version,
            since_unix_nanos: k.since_ns,
        });
    }
    let (number, checkpoint, proof) = match checkpoint {
        Some((n, c, b)) => {
            let proof = if cosigned > 0 && cosigned < b.size {
                ledger
                    .consistency_proof(cosigned, b.size)
                    .map_err(|e| e.to_string())?
            } else {
                Vec::new()
            };
            // Only signed checkpoints are pushed; a stored signature that does not decode is
            // corruption, reported.
            let sig = match c.signature.as_deref() {
                Some(s) => B64
                    .decode(s)
                    .map_err(|e| corrupt(&format!("signature of checkpoint {n}"), e))?,
                None => Vec::new(),
            };
            (
                Some(n),
                Some(pb::SignedCheckpoint {
                    number: n,
                    body: c.body,
                    signature: sig,
                }),
                proof,
            )
        }
        None => (None, None, Vec::new()),
    };
    Ok(Some((
        pb::PushBatchRequest {
            origin_region: String::new(),
            entries,
            keys,
            checkpoint,
            consistency_proof: proof.iter().map(|h| h.to_vec()).collect(),
            proof_from_size: cosigned,
        },
        number,
        end,
        end < size,
    )))
}
