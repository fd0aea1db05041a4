//! Witnessing (the node side): the node's ledger is one log whose origin names the node and
//! region (`knhk/<region>/<node>/<epoch>`); this module pushes its signed checkpoints to the
//! configured witnesses (`knhk-agent witness`, one per region) with consistency proofs, per
//! C2SP `tlog-witness`, stores their cosignatures beside the checkpoints, and counts a
//! checkpoint committed once `quorum` witnesses cosigned it. Protocol and failure cases:
//! `docs/multi-region.md`.
//!
//! Each log has a single writer (its own agent), so there is nothing to elect: a witness only
//! checks that each checkpoint extends the last one it cosigned for that origin, and refuses a
//! contradiction (a fork), keeping it as evidence.

mod client;

use crate::note::{self, Cosignature, SignatureLine, VerifierKey};
use crate::{
    config::{Peer, SyncSettings},
    receipts::{ledger::StoredCosignature, CheckpointBody, Receipts, StoredCheckpoint},
    resilience::{CircuitBreaker, CircuitState},
    semconv::{attr, span},
    tasks::{Stop, TaskGroup},
    witness::protocol,
};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use client::WitnessClient;
use opentelemetry::{
    trace::{SpanKind, TraceContextExt as _, Tracer as _},
    KeyValue,
};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

#[derive(Clone)]
struct Metrics {
    cosigned: IntGaugeVec,
    circuit: IntGaugeVec,
    failures: IntCounterVec,
    committed: IntGauge,
    quorum_ok: IntGauge,
}

impl Metrics {
    fn register(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let cosigned = IntGaugeVec::new(
            Opts::new(
                "knhk_sync_witness_cosigned_size",
                "Tree size of this node's newest checkpoint a witness cosigned.",
            ),
            &["peer"],
        )?;
        let circuit = IntGaugeVec::new(
            Opts::new(
                "knhk_sync_peer_circuit",
                "1 for each witness's circuit breaker state.",
            ),
            &["peer", "state"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "knhk_sync_peer_failures_total",
                "Failed pushes to a witness.",
            ),
            &["peer"],
        )?;
        let committed = IntGauge::new(
            "knhk_sync_quorum_committed_size",
            "Tree size of this node's newest quorum-committed checkpoint.",
        )?;
        let quorum_ok = IntGauge::new(
            "knhk_sync_quorum_committed",
            "1 while every signed checkpoint older than twice the witness timeout (at least 2 s) is quorum-committed; 0 while one waits longer (quorum lost).",
        )?;
        quorum_ok.set(1);
        for m in [
            Box::new(cosigned.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(circuit.clone()),
            Box::new(failures.clone()),
            Box::new(committed.clone()),
            Box::new(quorum_ok.clone()),
        ] {
            registry.register(m)?;
        }
        Ok(Metrics {
            cosigned,
            circuit,
            failures,
            committed,
            quorum_ok,
        })
    }
}

/// Why witnessing could not start.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Metrics.
    #[error("registering witnessing metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The node side of witnessing: one push task per witness, and the quorum view.
pub struct Replicator {
    settings: SyncSettings,
    receipts: Arc<Receipts>,
    metrics: Metrics,
    /// The witnesses' keys: pinned (`witness_keys`) or learned on first contact.
    keys: Mutex<Vec<VerifierKey>>,
    /// Each witness's last problem, for readiness and status.
    problems: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("region", &self.settings.region)
            .finish_non_exhaustive()
    }
}

/// What one push achieved.
enum Pushed {
    /// Nothing new to push.
    UpToDate,
    /// The witness cosigned checkpoint `number`.
    Cosigned,
}

impl Replicator {
    /// Starts pushing `receipts`' checkpoints to the witnesses (one task per witness, returned as
    /// a group for the caller to own). `identity` gives mTLS to `https://` witnesses. On the
    /// group's stop, each task pushes the final checkpoint (or fails, or the shutdown deadline
    /// passes), then stops.
    pub fn start(
        settings: SyncSettings,
        receipts: Arc<Receipts>,
        identity: Option<Arc<crate::identity::Identity>>,
        registry: &Registry,
    ) -> Result<(Arc<Replicator>, TaskGroup), SyncError> {
        let metrics = Metrics::register(registry)?;
        let sync = Arc::new(Replicator {
            keys: Mutex::new(settings.witness_keys.clone()),
            settings,
            receipts,
            metrics,
            problems: Mutex::new(HashMap::new()),
        });
        let mut tasks = TaskGroup::new("witnessing");
        for peer in sync.settings.peers.clone() {
            let name = format!("push to {}", peer.endpoint);
            let stop = tasks.stop_signal();
            tasks.spawn(
                name,
                Arc::clone(&sync).push_loop(peer, identity.clone(), stop),
            );
        }
        Ok((sync, tasks))
    }

    /// A readiness check: no signed checkpoint has waited for its quorum longer than twice the
    /// witness timeout (at least 2 s).
    pub fn readiness_check(
        self: &Arc<Self>,
    ) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let me = Arc::downgrade(self);
        move || {
            let Some(me) = me.upgrade() else {
                return Err("witnessing stopped".into());
            };
            let limit = me.quorum_wait_limit_s();
            match me.quorum_state().1 {
                Some((size, age_s, holders)) if age_s >= limit => Err(format!(
                    "cannot reach quorum: the checkpoint of size {size} has waited {age_s} s and \
                     has {holders} of the {} witness cosignatures needed{}",
                    me.settings.quorum,
                    me.problem_list()
                )),
                _ => Ok(()),
            }
        }
    }

    fn problem_list(&self) -> String {
        let problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        if problems.is_empty() {
            return String::new();
        }
        let mut v: Vec<String> = problems.iter().map(|(w, p)| format!("{w}: {p}")).collect();
        v.sort();
        format!("; failing witnesses: {}", v.join("; "))
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

    fn quorum_wait_limit_s(&self) -> i64 {
        (self.settings.timeout * 2)
            .max(Duration::from_secs(2))
            .as_secs() as i64
    }

    /// (newest committed size, the oldest signed checkpoint past it: (size, age in s,
    /// cosignatures)).
    fn quorum_state(&self) -> (u64, Option<(u64, i64, usize)>) {
        let ledger = self.receipts.ledger();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
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
            let holders = ledger.cosigner_count(n).unwrap_or(0);
            if holders >= self.settings.quorum {
                committed = body.size;
                return false;
            }
            waiting = Some((body.size, (now - body.time_ns) / 1_000_000_000, holders));
            true
        });
        if let Err(e) = scan {
            tracing::error!("witnessing: reading checkpoints for the quorum view failed: {e}");
        }
        self.metrics.committed.set(committed as i64);
        let lost = waiting.is_some_and(|(_, age_s, _)| age_s >= self.quorum_wait_limit_s());
        self.metrics.quorum_ok.set(i64::from(!lost));
        (committed, waiting)
    }

    async fn tls(
        &self,
        peer: &Peer,
        identity: Option<&crate::identity::Identity>,
    ) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
        if !peer.tls {
            return Ok(None);
        }
        let identity = identity.ok_or_else(|| {
            format!(
                "{}: https witnesses need [spiffe] enabled = true (mTLS)",
                peer.endpoint
            )
        })?;
        let source = identity
            .source()
            .await
            .ok_or_else(|| "no SVID for witnessing yet".to_string())?;
        let config = crate::identity::tls::client_config(
            source,
            &identity.settings().accepted_trust_domains(),
            identity.settings().access.region_peers.clone(),
        )?;
        // HTTP/1.1: no ALPN (the witness's server offers h2 for gRPC callers).
        let mut config = (*config).clone();
        config.alpn_protocols.clear();
        Ok(Some(Arc::new(config)))
    }

    fn set_problem(&self, peer: &str, problem: Option<String>) {
        let mut p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        match problem {
            Some(m) => {
                p.insert(peer.to_owned(), m);
            }
            None => {
                p.remove(peer);
            }
        }
    }

    async fn push_loop(
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
        let tls = loop {
            match self.tls(&peer, identity.as_deref()).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(witness = %name, "witnessing cannot connect: {e}");
                    self.set_problem(&name, Some(e));
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        _ = stop.requested() => return,
                    }
                }
            }
        };
        let mut client = WitnessClient::new(peer.clone(), tls, self.settings.timeout);
        let mut state = PeerState::default();
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Err(wait) = breaker.allow() {
                set_circuit(breaker.state());
                if stop.is_requested() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.requested() => {}
                }
                continue;
            }
            match self.push_once(&mut client, &name, &mut state).await {
                Ok(pushed) => {
                    breaker.success();
                    set_circuit(breaker.state());
                    self.set_problem(&name, None);
                    backoff = Duration::from_millis(100);
                    if let Pushed::UpToDate = pushed {
                        if stop.is_requested() {
                            tracing::info!(witness = %name, "witnessing caught up and stopped");
                            return;
                        }
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
                    tracing::warn!(witness = %name, "witness push failed (retrying in {} ms): {e}", backoff.as_millis());
                    self.set_problem(&name, Some(e));
                    state.size = None;
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
            self.quorum_state();
        }
    }

    /// The witness key for `peer`: pinned, or learned on first contact (and kept in the
    /// ledger's meta, so a restart does not learn it again).
    async fn witness_key(
        &self,
        client: &mut WitnessClient,
        peer: &str,
    ) -> Result<VerifierKey, String> {
        let meta = format!("witness-key {peer}");
        let ledger = self.receipts.ledger().clone();
        let stored = {
            let meta = meta.clone();
            tokio::task::spawn_blocking(move || ledger.meta(&meta))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?
        };
        let reply = client
            .call("GET", protocol::WITNESS_KEY, "text/plain", Vec::new())
            .await?;
        if reply.status != 200 {
            return Err(format!(
                "{} answered {}: {}",
                protocol::WITNESS_KEY,
                reply.status,
                reply.body.trim()
            ));
        }
        let presented = VerifierKey::parse(reply.body.trim())?;
        let pinned = self.keys.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !self.settings.witness_keys.is_empty() {
            return pinned
                .into_iter()
                .find(|k| *k == presented)
                .ok_or_else(|| {
                    format!(
                        "the witness presents key {presented}, which is not in multi_region.witness_keys"
                    )
                });
        }
        if let Some(known) = stored.and_then(|b| String::from_utf8(b).ok()) {
            if known != presented.to_string() {
                return Err(format!(
                    "the witness now presents key {presented}, but this node learned {known} on \
                     first contact; pin the witness keys in multi_region.witness_keys if it was \
                     rotated on purpose"
                ));
            }
        } else {
            tracing::info!(witness = %peer, key = %presented, "learned the witness's key on first contact");
            let ledger = self.receipts.ledger().clone();
            let value = presented.to_string();
            tokio::task::spawn_blocking(move || ledger.put_meta(&meta, value.as_bytes()))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(presented.clone());
        Ok(presented)
    }

    async fn register(&self, client: &mut WitnessClient) -> Result<(), String> {
        let ledger = self.receipts.ledger().clone();
        let keys = tokio::task::spawn_blocking(move || ledger.keys())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let body = serde_json::to_vec(&protocol::LogKeys {
            origin: self.receipts.ledger().origin().to_owned(),
            keys,
        })
        .map_err(|e| e.to_string())?;
        let reply = client
            .call("POST", protocol::LOG_KEYS, "application/json", body)
            .await?;
        if reply.status != 200 {
            return Err(format!(
                "registering this node's keys: {} {}",
                reply.status,
                reply.body.trim()
            ));
        }
        Ok(())
    }

    /// One push: the newest signed checkpoint, unless this witness cosigned it already.
    async fn push_once(
        &self,
        client: &mut WitnessClient,
        peer: &str,
        state: &mut PeerState,
    ) -> Result<Pushed, String> {
        let witness_key = match &state.key {
            Some(k) => k.clone(),
            None => {
                let k = self.witness_key(client, peer).await?;
                state.key = Some(k.clone());
                k
            }
        };
        let ledger = self.receipts.ledger().clone();
        let newest = tokio::task::spawn_blocking(move || newest_signed(&ledger))
            .await
            .map_err(|e| e.to_string())??;
        let Some((number, stored, body)) = newest else {
            return Ok(Pushed::UpToDate);
        };
        if state.cosigned >= body.size && state.cosigned_number == Some(number) {
            return Ok(Pushed::UpToDate);
        }
        let public = self.receipts.public_key_of(&body.key).await?;
        let signature = B64
            .decode(stored.signature.as_deref().unwrap_or_default())
            .map_err(|e| format!("stored signature of checkpoint {number}: {e}"))?;
        let note_text = note::render(
            &stored.body,
            &[note::log_signature_line(&body.origin, &public, &signature)],
        );
        // At most a few rounds: learn the witness's size, register keys, push.
        for _ in 0..4 {
            let old = state.size.unwrap_or(0);
            if old > body.size {
                return Err(format!(
                    "the witness holds size {old} for this log, more than this node's newest \
                     checkpoint ({}): the ledger was restored from an older copy",
                    body.size
                ));
            }
            let proof = if old == 0 || old == body.size {
                Vec::new()
            } else {
                let ledger = self.receipts.ledger().clone();
                let size = body.size;
                tokio::task::spawn_blocking(move || ledger.consistency_proof(old, size))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?
            };
            let request = protocol::AddCheckpoint {
                old,
                proof,
                note: note_text.clone(),
            };
            let reply = self.traced_push(client, peer, request).await?;
            match reply.status {
                200 => {
                    let line = SignatureLine::parse(reply.body.trim_end_matches('\n'))?;
                    let c = Cosignature::from_line(&line)?;
                    if !c.verify(&stored.body, &witness_key) {
                        return Err(format!(
                            "the cosignature does not verify with the witness key {witness_key}"
                        ));
                    }
                    let record = StoredCosignature {
                        witness_key: witness_key.to_string(),
                        line: line.encode(),
                    };
                    let ledger = self.receipts.ledger().clone();
                    tokio::task::spawn_blocking(move || ledger.put_cosignature(number, &record))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                    state.size = Some(body.size);
                    state.cosigned = body.size;
                    state.cosigned_number = Some(number);
                    self.metrics
                        .cosigned
                        .with_label_values(&[peer])
                        .set(body.size as i64);
                    return Ok(Pushed::Cosigned);
                }
                409 if reply.content_type.starts_with(protocol::SIZE_CONTENT_TYPE) => {
                    state.size = Some(reply.body.trim().parse().map_err(|_| {
                        format!("the witness's size {:?} is not a number", reply.body.trim())
                    })?);
                }
                404 | 403 if !state.registered => {
                    self.register(client).await?;
                    state.registered = true;
                }
                status => {
                    state.registered = false;
                    return Err(format!("add-checkpoint: {status} {}", reply.body.trim()));
                }
            }
        }
        Err("add-checkpoint: no agreement with the witness after 4 rounds".into())
    }

    async fn traced_push(
        &self,
        client: &mut WitnessClient,
        peer: &str,
        request: protocol::AddCheckpoint,
    ) -> Result<client::Reply, String> {
        let tracer = opentelemetry::global::tracer("knhk-agent");
        let span = tracer
            .span_builder(span::KNHK_SYNC_PUSH)
            .with_kind(SpanKind::Client)
            .with_attributes([KeyValue::new(attr::KNHK_SYNC_PEER, peer.to_owned())])
            .start(&tracer);
        let cx = opentelemetry::Context::current().with_span(span);
        let reply = client
            .call(
                "POST",
                protocol::ADD_CHECKPOINT,
                "text/plain",
                request.encode().into_bytes(),
            )
            .await;
        match &reply {
            Err(e) => {
                cx.span()
                    .set_attribute(KeyValue::new(attr::ERROR_TYPE, "transport"));
                cx.span()
                    .set_status(opentelemetry::trace::Status::error(e.clone()));
            }
            Ok(r) if r.status != 200 => {
                cx.span()
                    .set_attribute(KeyValue::new(attr::ERROR_TYPE, r.status.to_string()));
            }
            Ok(_) => {}
        }
        cx.span().end();
        reply
    }
}

/// What the node knows of one witness.
#[derive(Default)]
struct PeerState {
    /// The size the witness holds for this log (`None`: unknown, learned from a 409).
    size: Option<u64>,
    /// The newest checkpoint it cosigned: size and number.
    cosigned: u64,
    cosigned_number: Option<u64>,
    /// The witness's verifier key.
    key: Option<VerifierKey>,
    /// Whether this node's keys were registered since the last failure.
    registered: bool,
}

/// The newest signed checkpoint: (number, stored, body).
fn newest_signed(
    ledger: &crate::receipts::Ledger,
) -> Result<Option<(u64, StoredCheckpoint, CheckpointBody)>, String> {
    let mut found = None;
    ledger
        .checkpoints_newest_first(|n, c| {
            if c.signature.is_none() {
                return true;
            }
            match CheckpointBody::decode(&c.body) {
                Ok(b) => {
                    found = Some((n, c, b));
                    false
                }
                Err(_) => true,
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(found)
}
