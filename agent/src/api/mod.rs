//! The gRPC API (tonic): `knhk.agent.v1.PolicyService`, `knhk.agent.v1.AgentService`, the
//! standard `grpc.health.v1.Health` and server reflection (so `grpcurl` works without protos).
//!
//! The services only translate between protobuf and domain types ([`convert`]) and call the
//! [`Controller`]; every outcome maps to one status code in [`status_of`].

pub mod authz;
pub mod convert;
pub mod receipts;
pub mod rollout;
pub mod socket;
pub mod watch;

/// Generated protobuf types, clients and servers of `proto/knhk/agent/v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("knhk.agent.v1");
    /// The encoded descriptor set served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("knhk_descriptor");
}

use crate::semconv::{attr, span};
use crate::{
    config::ApiListen,
    control::{ControlError, Controller, HeatQuery},
    datapath::DatapathError,
};
use opentelemetry::{
    trace::{FutureExt as _, SpanKind, TraceContextExt as _, Tracer as _},
    KeyValue,
};
use pb::{
    agent_service_server::{AgentService, AgentServiceServer},
    policy_service_server::{PolicyService, PolicyServiceServer},
};
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};
use tonic::{Request, Response, Status};

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A non-loopback address without mTLS.
    #[error(
        "refusing to serve the gRPC API on {0}: it is not a loopback address and mTLS is off; \
         enable [spiffe] (enabled = true, trust_domain = ...) or set agent.listen_address to 127.0.0.1:PORT or [::1]:PORT"
    )]
    NotLoopback(SocketAddr),
    /// The mTLS server config could not be built.
    #[error("{0}")]
    Tls(String),
    /// Binding failed.
    #[error("cannot listen on agent.listen_address {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The Unix socket (`agent.api_socket`) could not be set up: the message names the path
    /// and what to do.
    #[error("{0}")]
    Socket(String),
    /// Reflection could not be built.
    #[error("building server reflection: {0}")]
    Reflection(String),
}

/// Maps each control outcome to its gRPC status code.
pub fn status_of(e: ControlError) -> Status {
    match e {
        ControlError::StaleGeneration { .. }
        | ControlError::NoPrevious { .. }
        | ControlError::RolloutInProgress { .. }
        | ControlError::BundleManaged { .. } => Status::failed_precondition(e.to_string()),
        ControlError::Datapath(DatapathError::Compile(c)) => {
            Status::invalid_argument(c.to_string())
        }
        ControlError::Datapath(e @ DatapathError::ScopeTooDeep { .. }) => {
            Status::invalid_argument(e.to_string())
        }
        ControlError::Datapath(e @ DatapathError::Capacity { .. }) => {
            Status::resource_exhausted(e.to_string())
        }
        ControlError::Datapath(
            e @ (DatapathError::NoSuchCgroup { .. } | DatapathError::NoSuchPod { .. }),
        ) => Status::not_found(e.to_string()),
        ControlError::Datapath(DatapathError::DeadlineExceeded) => {
            Status::deadline_exceeded(DatapathError::DeadlineExceeded.to_string())
        }
        other => {
            tracing::error!(
                "API call failed: {}",
                crate::model::log_escape(&other.to_string())
            );
            Status::internal(other.to_string())
        }
    }
}

/// The deadline the client set (`grpc-timeout`), if any. A value the gRPC spec does not allow
/// (more than 8 digits, a sign, an unknown unit) is ignored, as tonic's server ignores it; a
/// deadline too far ahead to represent is no deadline.
fn deadline_of<T>(req: &Request<T>, received: Instant) -> Option<Instant> {
    // A header that is not ASCII is not a deadline (tonic ignores it too).
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Not a number: no deadline.
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    received.checked_add(d)
}

struct PolicyApi(Arc<Controller>);

#[tonic::async_trait]
impl PolicyService for PolicyApi {
    async fn apply_policy(
        &self,
        req: Request<pb::ApplyPolicyRequest>,
    ) -> Result<Response<pb::ApplyPolicyResponse>, Status> {
        let received = Instant::now();
        let deadline = deadline_of(&req, received);
        let cx = rpc_span(req.metadata(), span::KNHK_POLICY_APPLY, "ApplyPolicy");
        let req = req.into_inner();
        let rules = req.policy.as_ref().map_or(0, |p| p.rules.len());
        cx.span()
            .set_attribute(KeyValue::new(attr::KNHK_POLICY_RULES, rules as i64));
        let result = async {
            let policy = convert::policy_from_proto(
                req.policy.as_ref(),
                self.0.defaults(),
                self.0.max_rules(),
            )
            .map_err(|e| self.failed(Status::invalid_argument(e.join("\n"))))?;
            self.0
                .apply(policy, req.expected_generation, deadline)
                .await
                .map_err(|e| self.failed(status_of(e)))
        }
        .with_context(cx.clone())
        .await;
        end_rpc_span(
            &cx,
            result
                .as_ref()
                .map(|a| &a.generation)
                .map_err(|s| (s, reason_of(s))),
        );
        let applied = result?;
        Ok(Response::new(pb::ApplyPolicyResponse {
            generation: applied.generation.number,
            digest: applied.generation.digest,
            pending_cgroups: applied.pending_cgroups,
            trie_entries: applied.trie_entries as u64,
            switch_micros: applied
                .switched_at
                .saturating_duration_since(received)
                .as_micros() as u64,
        }))
    }

    async fn get_policy(
        &self,
        _: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        let live = self.0.live().await;
        Ok(Response::new(pb::GetPolicyResponse {
            generation: live.number,
            digest: live.digest,
            policy: Some(convert::policy_to_proto(&live.policy)),
        }))
    }

    async fn dry_run(
        &self,
        req: Request<pb::DryRunRequest>,
    ) -> Result<Response<pb::DryRunResponse>, Status> {
        let req = req.into_inner();
        let policy =
            convert::policy_from_proto(req.policy.as_ref(), self.0.defaults(), self.0.max_rules())
                .map_err(|e| Status::invalid_argument(e.join("\n")))?;
        // The checks of an apply, so that a dry run accepts exactly what an apply would.
        let (live, diff) = self.0.dry_run(&policy).await.map_err(status_of)?;
        Ok(Response::new(pb::DryRunResponse {
            generation: live.number,
            digest: policy.digest(),
            added: diff.added,
            removed: diff.removed,
            changed: diff.changed,
            settings_changed: diff.settings_changed,
        }))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        let deadline = deadline_of(&req, Instant::now());
        let cx = rpc_span(req.metadata(), span::KNHK_POLICY_ROLLBACK, "Rollback");
        let result = self
            .0
            .rollback(req.into_inner().expected_generation, deadline)
            .with_context(cx.clone())
            .await;
        let result = result.map_err(|e| {
            let no_previous = matches!(e, ControlError::NoPrevious { .. });
            let status = status_of(e);
            if no_previous {
                self.0.count_apply_failure("no_previous");
                (status, "no_previous")
            } else {
                let reason = reason_of(&status);
                (self.failed(status), reason)
            }
        });
        match &result {
            Ok((applied, from)) => {
                cx.span().set_attribute(KeyValue::new(
                    attr::KNHK_POLICY_ROLLED_BACK_FROM,
                    *from as i64,
                ));
                end_rpc_span(&cx, Ok(&applied.generation));
            }
            Err((status, reason)) => end_rpc_span(&cx, Err((status, reason))),
        }
        let (applied, restored) = result.map_err(|(status, _)| status)?;
        Ok(Response::new(pb::RollbackResponse {
            generation: applied.generation.number,
            digest: applied.generation.digest,
            restored_generation: restored,
        }))
    }
}

impl PolicyApi {
    /// Counts a refused apply or rollback by the reason its status gives, and returns the status.
    fn failed(&self, status: Status) -> Status {
        self.0.count_apply_failure(reason_of(&status));
        status
    }
}

/// Why an apply or rollback changed nothing, from its status (the `reason` label, `error.type`).
fn reason_of(status: &Status) -> &'static str {
    match status.code() {
        tonic::Code::InvalidArgument => "invalid",
        tonic::Code::ResourceExhausted => "capacity",
        tonic::Code::FailedPrecondition => "stale_generation",
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => "deadline",
        _ => "internal",
    }
}

/// A server span for a `PolicyService` call, a child of the caller's `traceparent` when it sent
/// one, as the context its work runs in.
fn rpc_span(
    metadata: &tonic::metadata::MetadataMap,
    name: &'static str,
    method: &'static str,
) -> opentelemetry::Context {
    let parent = crate::trace_context::extract(metadata);
    let tracer = opentelemetry::global::tracer("knhk-agent");
    let span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Server)
        .with_attributes([
            KeyValue::new(attr::RPC_SYSTEM, "grpc"),
            KeyValue::new(attr::RPC_SERVICE, "knhk.agent.v1.PolicyService"),
            KeyValue::new(attr::RPC_METHOD, method),
        ])
        .start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// Ends the call's span with the generation switched in, or the failure.
fn end_rpc_span(
    cx: &opentelemetry::Context,
    result: Result<&crate::control::Generation, (&Status, &'static str)>,
) {
    let span = cx.span();
    match result {
        Ok(g) => {
            span.set_attribute(KeyValue::new(attr::KNHK_POLICY_GENERATION, g.number as i64));
            span.set_attribute(KeyValue::new(attr::KNHK_POLICY_DIGEST, g.digest.clone()));
        }
        Err((status, reason)) => {
            span.set_attribute(KeyValue::new(attr::ERROR_TYPE, reason));
            span.set_status(opentelemetry::trace::Status::error(
                status.message().to_owned(),
            ));
        }
    }
    span.end();
}

struct AgentApi(
    Arc<Controller>,
    Option<Arc<crate::receipts::Receipts>>,
    Option<Arc<crate::sync::Replicator>>,
    Arc<watch::Watchers>,
);

type EventStream = watch::EventStream;

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let (status, decisions) = self.0.status().map_err(status_of)?;
        let ledger = match &self.1 {
            Some(r) => {
                let r = r.clone();
                let (log_size, checkpoints_pending, signing_key) =
                    tokio::task::spawn_blocking(move || r.status())
                        .await
                        .map_err(|e| Status::internal(e.to_string()))??;
                Some(pb::LedgerStatus {
                    log_size,
                    checkpoints_pending,
                    signing_key,
                })
            }
            None => None,
        };
        let sync = match &self.2 {
            Some(s) => {
                let s = s.clone();
                let (region, quorum, committed_size, problem) =
                    tokio::task::spawn_blocking(move || s.status())
                        .await
                        .map_err(|e| Status::internal(e.to_string()))?;
                Some(pb::SyncStatus {
                    region,
                    quorum: quorum as u32,
                    committed_size,
                    // No problem: the empty string, as the proto says.
                    problem: problem.unwrap_or_default(),
                })
            }
            None => None,
        };
        let rule_hits = self
            .0
            .rule_hits()
            .into_iter()
            .map(|(rule, hits)| pb::RuleHits { rule, hits })
            .collect();
        let workloads = self.0.inventory().map(|inv| pb::WorkloadStatus {
            pods: inv
                .pods
                .iter()
                .map(|p| pb::PodStatus {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    uid: p.uid.clone(),
                    cgroup: p.cgroup.to_string(),
                    containers: p.containers.iter().map(|c| c.name.clone()).collect(),
                })
                .collect(),
            unclassified_cgroups: inv.unclassified.iter().map(|c| c.to_string()).collect(),
        });
        Ok(Response::new(pb::GetStatusResponse {
            ledger,
            sync,
            rule_hits,
            workloads,
            policy_source: self.0.live_source().await.to_owned(),
            version: env!("CARGO_PKG_VERSION").into(),
            programs: status.programs.iter().map(|p| p.to_string()).collect(),
            cgroup_root: status.cgroup_root.display().to_string(),
            generation: status.generation,
            adopted: status.adopted,
            active_cgroups: status.active_scopes.iter().map(|p| p.to_string()).collect(),
            pending_cgroups: status
                .pending_scopes
                .iter()
                .map(|p| p.to_string())
                .collect(),
            trie_entries: status.trie_entries as u64,
            decisions: crate::model::Class::ALL
                .iter()
                .map(|c| {
                    let (allowed, denied, audited, shed) = Controller::decisions_of(&decisions, *c);
                    pb::ClassDecisions {
                        runtime_class: convert::class_to_proto(*c) as i32,
                        allowed,
                        denied,
                        audited,
                        shed,
                        state: self.0.class_state(*c).as_str().into(),
                    }
                })
                .collect(),
        }))
    }

    async fn get_slo(
        &self,
        _: Request<pb::GetSloRequest>,
    ) -> Result<Response<pb::GetSloResponse>, Status> {
        let classes = self.0.slo().await.map_err(status_of)?;
        Ok(Response::new(pb::GetSloResponse {
            classes: classes
                .into_iter()
                .map(|c| pb::ClassLatency {
                    runtime_class: convert::class_to_proto(c.class) as i32,
                    handshake_samples: c.handshake_samples,
                    handshake_p50_ns: c.handshake_p50_ns.unwrap_or(0),
                    handshake_p99_ns: c.handshake_p99_ns.unwrap_or(0),
                    rtt_p99_ns: c.rtt_p99_ns.unwrap_or(0),
                    p99_max_ns: c.p99_max_ns.unwrap_or(0),
                    within_slo: c.within_slo(),
                })
                .collect(),
        }))
    }

    async fn get_heat(
        &self,
        req: Request<pb::GetHeatRequest>,
    ) -> Result<Response<pb::GetHeatResponse>, Status> {
        let req = req.into_inner();
        let pod = if req.pod.is_empty() {
            None
        } else {
            match req.pod.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Some((ns.to_owned(), name.to_owned()))
                }
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "pod {:?}: expected NAMESPACE/NAME",
                        crate::model::log_escape(&req.pod)
                    )))
                }
            }
        };
        let heat = self
            .0
            .heat(HeatQuery {
                limit: req.limit as usize,
                by_pod: req.by_pod,
                pod,
            })
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::GetHeatResponse {
            entries: heat
                .entries
                .into_iter()
                .enumerate()
                .map(|(i, e)| {
                    let (decayed_heat, rising) = heat
                        .decayed
                        .as_ref()
                        .and_then(|d| d.get(i).copied())
                        .unwrap_or((0.0, 0.0));
                    // No pod (or not asked per pod): empty strings, as the proto says.
                    let (namespace, pod) = heat.pods.get(i).cloned().flatten().unwrap_or_default();
                    pb::HeatEntry {
                        address: e.addr.to_string(),
                        port: e.port.into(),
                        protocol: crate::datapath::protocol_name(e.proto).into(),
                        attempts: e.attempts,
                        decayed_heat,
                        rising,
                        namespace,
                        pod,
                    }
                })
                .collect(),
            map_entries: heat.map_entries as u64,
            map_capacity: heat.map_capacity.into(),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let (events, verdicts) = watch::request_of(req.get_ref())?;
        let peer = watch::peer_of(&req);
        let slot = self.3.admit(peer)?;
        Ok(Response::new(watch::event_stream(
            events.then(|| self.0.subscribe()),
            verdicts.map(|f| (self.0.verdicts(), f)),
            slot,
        )))
    }

    async fn explain(
        &self,
        req: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let req = req.into_inner();
        let dest: std::net::IpAddr = req.destination.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "destination {:?} is not an IP address",
                crate::model::log_escape(&req.destination)
            ))
        })?;
        let port = u16::try_from(req.port).map_err(|_| {
            Status::invalid_argument(format!("port {} is out of range (0-65535)", req.port))
        })?;
        let protocol = match req.protocol.as_str() {
            "" | "tcp" => crate::model::Protocol::Tcp,
            "udp" => crate::model::Protocol::Udp,
            other => {
                return Err(Status::invalid_argument(format!(
                    "protocol {:?}: expected tcp or udp",
                    crate::model::log_escape(other)
                )))
            }
        };
        if req.cgroup.split('/').any(|c| c == "..") {
            return Err(Status::invalid_argument(format!(
                "cgroup {:?} may not contain '..'",
                crate::model::log_escape(&req.cgroup)
            )));
        }
        let cgroup = if req.pod.is_empty() {
            req.cgroup
        } else {
            if !req.cgroup.is_empty() && req.cgroup != "." {
                return Err(Status::invalid_argument(
                    "give cgroup or pod, not both".to_owned(),
                ));
            }
            let Some((ns, name)) = req.pod.split_once('/') else {
                return Err(Status::invalid_argument(format!(
                    "pod {:?}: expected NAMESPACE/NAME",
                    crate::model::log_escape(&req.pod)
                )));
            };
            self.0.pod_cgroup(ns, name).await.map_err(status_of)?
        };
        let e = self
            .0
            .explain(cgroup.clone(), dest, port, protocol)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::ExplainResponse {
            cgroup,
            generation: e.generation,
            // The global scope, no prefix, no rule: empty strings, as the proto says.
            scope: e.scope.unwrap_or_default(),
            prefix: e.prefix.map(|p| p.to_string()).unwrap_or_default(),
            rule: e.rule.unwrap_or_default(),
            rule_action: e.rule_action.into(),
            runtime_class: convert::class_to_proto(e.class) as i32,
            action: e.action.into(),
            entries_scanned: e.entries_scanned as u32,
            steps: e.steps,
        }))
    }
}

/// Where a running API server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket.
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for ApiAddr {
    /// `127.0.0.1:50051`, or `unix:///run/knhk/agent.sock`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiAddr::Tcp(a) => write!(f, "{a}"),
            ApiAddr::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// A bound API listener, before serving.
#[derive(Debug)]
pub enum ApiListener {
    /// TCP (mTLS, or plaintext on loopback).
    Tcp(tokio::net::TcpListener),
    /// The Unix socket, with its peer-credential check.
    Unix(socket::UnixApiListener),
}

/// A running API server; it stops when `shutdown` resolves.
#[derive(Debug)]
pub struct ApiServer {
    /// Where it listens.
    pub local_addr: ApiAddr,
    /// The server task.
    pub task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

/// What the API serves beyond policy and status, when configured.
#[derive(Debug, Default)]
pub struct Extensions {
    /// mTLS with SPIFFE-ID authorization (else plaintext: the Unix socket, or loopback TCP).
    pub identity: Option<Arc<crate::identity::Identity>>,
    /// `ReceiptService` and `HoldService`.
    pub receipts: Option<Arc<crate::receipts::Receipts>>,
    /// Witnessing: quorum in `GetStatus`.
    pub sync: Option<Arc<crate::sync::Replicator>>,
}

/// Binds the API: a TCP address (any with mTLS, loopback only without), or the Unix socket
/// (see [`socket`]). Done before anything touches the kernel, so a bad address changes nothing.
pub async fn bind(listen: &ApiListen, mtls: bool) -> Result<ApiListener, ServeError> {
    match listen {
        ApiListen::Tcp(addr) => bind_tcp(*addr, mtls).await.map(ApiListener::Tcp),
        ApiListen::Unix { path, group } => {
            if mtls {
                return Err(ServeError::Socket(
                    "with [spiffe] the API is served over mTLS on TCP, not on a Unix socket".into(),
                ));
            }
            socket::bind(path, group.as_deref())
                .map(ApiListener::Unix)
                .map_err(ServeError::Socket)
        }
    }
}

/// Binds a TCP address: any address with mTLS, loopback only without.
pub async fn bind_tcp(addr: SocketAddr, mtls: bool) -> Result<tokio::net::TcpListener, ServeError> {
    if !mtls && !addr.ip().is_loopback() {
        return Err(ServeError::NotLoopback(addr));
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Serves the API on `listener` until `shutdown` resolves: over mTLS with SPIFFE-ID
/// authorization when `identity` is given (from its first SVID on; until then connections wait
/// in the listen backlog), else plaintext (TCP on loopback, or the Unix socket, whose peers are
/// checked per connection; the socket file is removed when the server stops).
pub async fn serve(
    listener: ApiListener,
    max_request_bytes: usize,
    controller: Arc<Controller>,
    extensions: Extensions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<ApiServer, ServeError> {
    let Extensions {
        identity,
        receipts: ledger,
        sync,
    } = extensions;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<PolicyServiceServer<PolicyApi>>()
        .await;
    health_reporter
        .set_serving::<AgentServiceServer<AgentApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    // grpcurl before 1.9 (and other older clients) speak only v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let router = tonic::transport::Server::builder()
        .layer(authz::AuthzLayer::new(identity.clone()))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            PolicyServiceServer::new(PolicyApi(controller.clone()))
                .max_decoding_message_size(max_request_bytes),
        )
        .add_service(
            pb::rollout_service_server::RolloutServiceServer::new(rollout::RolloutApi(
                controller.clone(),
            ))
            .max_decoding_message_size(max_request_bytes),
        )
        .add_service(
            AgentServiceServer::new(AgentApi(
                controller,
                ledger.clone(),
                sync.clone(),
                Arc::new(watch::Watchers::default()),
            ))
            .max_decoding_message_size(max_request_bytes),
        )
        .add_optional_service(ledger.clone().map(|r| {
            receipts::pb::receipt_service_server::ReceiptServiceServer::new(receipts::ReceiptApi(r))
        }))
        .add_optional_service(ledger.map(|r| {
            receipts::pb::hold_service_server::HoldServiceServer::new(receipts::HoldApi(r))
                .max_decoding_message_size(max_request_bytes)
        }));
    let listener = match (listener, &identity) {
        (ApiListener::Tcp(l), _) => l,
        (ApiListener::Unix(_), Some(_)) => {
            return Err(ServeError::Socket(
                "with [spiffe] the API is served over mTLS on TCP, not on a Unix socket".into(),
            ))
        }
        (ApiListener::Unix(l), None) => {
            let local_addr = ApiAddr::Unix(l.path().to_path_buf());
            let file = socket::socket_file(&l);
            let incoming = socket::incoming(l);
            let task = tokio::spawn(async move {
                let served = router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await;
                // Clients that come later get "no such file", not a dead socket.
                drop(file);
                served
            });
            return Ok(ApiServer { local_addr, task });
        }
    };
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let local_addr = ApiAddr::Tcp(addr);
    let Some(identity) = identity else {
        // No Nagle: small responses must not wait for a delayed ACK (40 ms on Linux).
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown));
        return Ok(ApiServer { local_addr, task });
    };
    let task = tokio::spawn(async move {
        tokio::pin!(shutdown);
        let source = tokio::select! {
            source = identity.source() => source,
            _ = &mut shutdown => return Ok(()),
        };
        let Some(source) = source else {
            return Ok(());
        };
        let config = match crate::identity::tls::ServerTls::new(
            source,
            &identity.settings().accepted_trust_domains(),
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("the gRPC API cannot serve mTLS: {e}");
                return Ok(());
            }
        };
        tracing::info!(local_addr = %addr, "gRPC API serving over mTLS (SPIFFE)");
        let incoming = crate::identity::tls::incoming(listener, config);
        router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    });
    Ok(ApiServer { local_addr, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(v: &str) -> Request<()> {
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("grpc-timeout", v.parse().expect("ascii"));
        req
    }

    #[test]
    fn a_grpc_timeout_too_large_for_an_instant_is_no_deadline() {
        let now = Instant::now();
        for v in [
            "18446744073709551615S",
            "18446744073709551615H",
            "18446744073709551615M",
            "18446744073709551615m",
            "18446744073709551615u",
            "18446744073709551615n",
            "5124095576030431H",
        ] {
            assert_eq!(deadline_of(&with_timeout(v), now), None, "{v}");
        }
        assert_eq!(
            deadline_of(&with_timeout("99999999H"), now),
            Some(now + Duration::from_secs(99_999_999 * 3600)),
            "the largest valid value, about 11,000 years, still fits"
        );
        assert_eq!(
            deadline_of(&with_timeout("250m"), now),
            Some(now + Duration::from_millis(250))
        );
        assert_eq!(
            deadline_of(&with_timeout("2H"), now),
            Some(now + Duration::from_secs(7200))
        );
        for bad in [
            "",
            "S",
            "12",
            "12x",
            "-1S",
            "1.5S",
            "99999999999999999999999S",
        ] {
            assert_eq!(deadline_of(&with_timeout(bad), now), None, "{bad:?}");
        }
    }
}
