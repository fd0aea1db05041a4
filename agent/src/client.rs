//! The CLI's client commands (`policy apply|get|diff|rollback`, `status`, `heat`, `slo`): gRPC
//! calls to a running agent, rendered for humans or as JSON.

use crate::{
    api::{
        convert,
        pb::{
            self, agent_service_client::AgentServiceClient,
            policy_service_client::PolicyServiceClient,
        },
    },
    config::Config,
    model::text::error_chain,
};
use serde_json::json;
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};
use tonic::transport::Channel;

/// A command's result, in both renderings.
#[derive(Debug)]
pub struct Report {
    /// For people.
    pub human: String,
    /// For scripts (`--output json`).
    pub json: serde_json::Value,
}

/// Why a client command failed; [`ClientError::exit_code`] is the process exit code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The policy file is invalid (checked locally; nothing was sent).
    #[error("{0}")]
    File(String),
    /// The agent could not be reached.
    #[error("cannot reach the agent at {endpoint}: {reason} (is `knhk-agent run` running? see --endpoint)")]
    Unavailable {
        /// Endpoint.
        endpoint: String,
        /// Cause.
        reason: String,
    },
    /// The connection failed during a call (the agent closed it, or went away): no answer.
    #[error(
        "the connection to the agent failed during the call: {0} (the agent may have refused \
         this caller: its API socket admits root and members of agent.api_socket_group only)"
    )]
    Disconnected(String),
    /// The agent did not answer within `--timeout`.
    #[error("the agent did not answer within {} (--timeout); is it overloaded or stuck? A policy change that timed out may or may not have been applied: check `policy get`", seconds(*.0))]
    Timeout(Duration),
    /// The agent answered a policy call (apply, diff, rollback) with an error.
    #[error("{}: {}", policy_code_name(.0.code()), .0.message())]
    Policy(tonic::Status),
    /// The agent answered another call (status, holds, receipts, ...) with an error.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rpc(tonic::Status),
}

fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s == 1.0 {
        "1 second".into()
    } else {
        format!("{s} seconds")
    }
}

/// What a refused policy call means.
fn policy_code_name(c: tonic::Code) -> &'static str {
    match c {
        tonic::Code::InvalidArgument => "invalid policy",
        tonic::Code::FailedPrecondition => "refused",
        tonic::Code::ResourceExhausted => "too large",
        other => code_name(other),
    }
}

/// What a refused call means, for calls other than policy changes.
fn code_name(c: tonic::Code) -> &'static str {
    match c {
        tonic::Code::InvalidArgument => "invalid request",
        tonic::Code::FailedPrecondition => "refused",
        tonic::Code::ResourceExhausted => "too large",
        tonic::Code::DeadlineExceeded => "deadline exceeded",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::Unimplemented => "not supported by this agent",
        tonic::Code::Cancelled => "cancelled",
        tonic::Code::Aborted => "aborted",
        tonic::Code::OutOfRange => "out of range",
        tonic::Code::DataLoss => "data loss",
        tonic::Code::Ok | tonic::Code::Unknown | tonic::Code::Internal => "the agent failed",
    }
}

/// Whether `e` (or a cause of it) is tonic's request timeout.
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<tonic::TimeoutExpired>() {
            return true;
        }
        next = err.source();
    }
    false
}

impl ClientError {
    /// A call's error: the agent's answer, or (a status made here, carrying its cause) a
    /// connection that failed or a request that timed out after `timeout`.
    pub fn from_status(status: tonic::Status) -> ClientError {
        match std::error::Error::source(&status) {
            Some(cause) if is_timeout(cause) => ClientError::Timeout(Duration::ZERO),
            Some(cause) => ClientError::Disconnected(error_chain(cause)),
            None => ClientError::Rpc(status),
        }
    }

    /// A policy call's error ([`ClientError::from_status`], with policy meanings for the codes).
    pub fn from_policy_status(status: tonic::Status) -> ClientError {
        match ClientError::from_status(status) {
            ClientError::Rpc(s) => ClientError::Policy(s),
            other => other,
        }
    }

    /// A timeout error names the limit that passed.
    pub fn with_timeout(self, timeout: Duration) -> ClientError {
        match self {
            ClientError::Timeout(_) => ClientError::Timeout(timeout),
            other => other,
        }
    }

    /// 64 invalid file or request, 65 the agent refused the policy as invalid, 69 agent
    /// unreachable, silent past `--timeout`, or past the call's deadline (nothing changed), 75 stale generation or nothing to roll back (retry
    /// after reading the live state), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::File(_) => 64,
            ClientError::Unavailable { .. }
            | ClientError::Disconnected(_)
            | ClientError::Timeout(_) => 69,
            ClientError::Policy(s) => match s.code() {
                tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted => 65,
                tonic::Code::FailedPrecondition => 75,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => 69,
                _ => 1,
            },
            ClientError::Rpc(s) => match s.code() {
                tonic::Code::InvalidArgument => 64,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => 69,
                _ => 1,
            },
        }
    }
}

/// Where and how to reach the agent.
#[derive(Debug, Clone)]
pub struct Target {
    /// `unix:///path` (a Unix socket), or `http://host:port` (or `host:port`).
    pub endpoint: String,
    /// mTLS with the caller's SPIFFE identity; `None`: plaintext.
    pub mtls: Option<ClientMtls>,
    /// The longest the agent may take to accept the connection, and then to answer a call.
    pub timeout: Duration,
}

/// The default `--timeout` of commands that read.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default `--timeout` of policy changes (`policy apply`, `diff`, `rollback`): the agent
/// compiles and writes the whole policy before it answers, seconds for 100,000 rules on a busy
/// node.
pub const DEFAULT_POLICY_TIMEOUT: Duration = Duration::from_secs(30);
/// The request timeout of [`connect`]'s channels (library callers set their own deadlines).
const LIBRARY_TIMEOUT: Duration = Duration::from_secs(60);

/// The caller's side of mTLS.
#[derive(Debug, Clone)]
pub struct ClientMtls {
    /// Workload API endpoint (`unix:/path`) the caller's SVID comes from.
    pub workload_api: String,
    /// Trust domains the agent's certificate may belong to (empty: the caller's own).
    pub trust_domains: Vec<spiffe::TrustDomain>,
    /// IDs the agent may present (empty: any of those trust domains).
    pub agent_ids: Vec<crate::model::spiffe::IdMatcher>,
}

impl Target {
    /// Plaintext to `endpoint`.
    pub fn plaintext(endpoint: impl Into<String>) -> Target {
        Target {
            endpoint: endpoint.into(),
            mtls: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Where an endpoint string points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:///path` (or `unix:/path`): a Unix socket.
    Unix(std::path::PathBuf),
    /// Anything else: an HTTP/2 URI (`http://host:port`).
    Uri(String),
}

/// Parses `--endpoint`: `unix://` followed by an absolute path (`unix:///run/knhk/agent.sock`;
/// `unix:/path` is accepted too), an `http://` or `https://` URI, or `HOST:PORT` (taken as
/// `http://HOST:PORT`).
pub fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    if let Some(rest) = s.strip_prefix("unix:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if !path.starts_with('/') {
            return Err(format!(
                "{s:?}: a Unix socket endpoint is unix:// followed by an absolute path, e.g. unix:///run/knhk/agent.sock"
            ));
        }
        return Ok(Endpoint::Unix(path.into()));
    }
    if s.contains("://") {
        return Ok(Endpoint::Uri(s.to_owned()));
    }
    let uri = format!("http://{s}");
    match uri.parse::<http::Uri>() {
        Ok(u) if u.port().is_some() && u.path() == "/" => Ok(Endpoint::Uri(uri)),
        _ => Err(format!(
            "{s:?} is not an endpoint: use unix:///PATH, http://HOST:PORT or HOST:PORT"
        )),
    }
}

/// The largest policy document the CLI reads back (`policy get`).
const MAX_POLICY_MESSAGE_BYTES: usize = 256 << 20;

/// A plaintext channel to `endpoint` (`unix:///path` or `http://host:port`), connected; each
/// call on it may take up to a minute.
pub async fn connect(endpoint: &str) -> Result<Channel, ClientError> {
    channel(&Target {
        timeout: LIBRARY_TIMEOUT,
        ..Target::plaintext(endpoint)
    })
    .await
}

async fn channel(target: &Target) -> Result<Channel, ClientError> {
    let endpoint = &target.endpoint;
    let unavailable = |reason: String| ClientError::Unavailable {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let parsed = parse_endpoint(endpoint).map_err(unavailable)?;
    let Some(mtls) = &target.mtls else {
        return match parsed {
            Endpoint::Unix(path) => {
                // The URI only fills the HTTP/2 :authority; the connector dials the socket.
                tonic::transport::Endpoint::from_static("http://localhost")
                    .connect_timeout(target.timeout)
                    .timeout(target.timeout)
                    .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(&path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    }))
                    .await
                    .map_err(|e| {
                        unavailable(format!(
                            "{} (the API socket admits root and members of agent.api_socket_group only)",
                            error_chain(&e)
                        ))
                    })
            }
            Endpoint::Uri(uri) => Channel::from_shared(uri)
                .map_err(|e| unavailable(error_chain(&e)))?
                .connect_timeout(target.timeout)
                .timeout(target.timeout)
                .connect()
                .await
                .map_err(|e| unavailable(error_chain(&e))),
        };
    };
    if let Endpoint::Unix(_) = parsed {
        return Err(unavailable(
            "with mTLS the endpoint must be an IP address and port, not a Unix socket".into(),
        ));
    }
    let authority = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    let addr: std::net::SocketAddr = authority.parse().map_err(|_| {
        unavailable(format!(
            "with mTLS the endpoint must be an IP address and port, not {authority:?}"
        ))
    })?;
    let source = spiffe::X509Source::builder()
        .endpoint(&mtls.workload_api)
        .initial_sync_timeout(Duration::from_secs(5))
        .build()
        .await
        .map_err(|e| {
            unavailable(format!(
                "no SVID for this client from the Workload API at {}: {e}",
                mtls.workload_api
            ))
        })?;
    let mut trust_domains = mtls.trust_domains.clone();
    if trust_domains.is_empty() {
        let own = source
            .svid()
            .map_err(|e| unavailable(e.to_string()))?
            .spiffe_id()
            .trust_domain()
            .clone();
        trust_domains.push(own);
    }
    let config =
        crate::identity::tls::client_config(source, &trust_domains, mtls.agent_ids.clone())
            .map_err(unavailable)?;
    let channel = crate::identity::tls::channel(addr, config).map_err(unavailable)?;
    Ok(channel)
}

/// Reads a policy file: a configuration file's `[[policy.rules]]`, and optionally its `[agent]`
/// `mode`, `default_action` and `default_class` (others are left to the agent's configuration).
pub fn read_policy_file(path: &Path) -> Result<pb::PolicyDocument, ClientError> {
    let config = Config::load_file(path).map_err(|e| ClientError::File(e.to_string()))?;
    let text = std::fs::read_to_string(path).map_err(|e| ClientError::File(e.to_string()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| ClientError::File(e.to_string()))?;
    let agent = table
        .get("agent")
        .or_else(|| table.get("sidecar"))
        .and_then(|v| v.as_table());
    let set = |key: &str| agent.is_some_and(|a| a.contains_key(key));
    let mut doc = convert::policy_to_proto(&config.policy());
    if !set("mode") {
        doc.mode = pb::Mode::Unspecified as i32;
    }
    if !set("default_action") {
        doc.default_action = pb::Action::Unspecified as i32;
    }
    if !set("default_class") {
        doc.default_class = pb::RuntimeClass::Unspecified as i32;
    }
    Ok(doc)
}

/// A runtime class as the configuration spells it (`R1`, `W1`, `C1`; `-` when unset).
pub fn class_name(v: i32) -> &'static str {
    match pb::RuntimeClass::try_from(v) {
        Ok(pb::RuntimeClass::R1) => "R1",
        Ok(pb::RuntimeClass::W1) => "W1",
        Ok(pb::RuntimeClass::C1) => "C1",
        _ => "-",
    }
}

/// An action as the configuration spells it (`allow`, `deny`, `audit`; `-` when unset).
pub fn action_name(v: i32) -> &'static str {
    match pb::Action::try_from(v) {
        Ok(pb::Action::Allow) => "allow",
        Ok(pb::Action::Deny) => "deny",
        Ok(pb::Action::Audit) => "audit",
        _ => "-",
    }
}

/// A mode as the configuration spells it (`enforce`, `audit`; `-` when unset).
pub fn mode_name(v: i32) -> &'static str {
    match pb::Mode::try_from(v) {
        Ok(pb::Mode::Enforce) => "enforce",
        Ok(pb::Mode::Audit) => "audit",
        _ => "-",
    }
}

/// A protocol as the configuration spells it (`tcp`, `udp`, `any`).
pub fn protocol_name(v: i32) -> &'static str {
    match pb::Protocol::try_from(v) {
        Ok(pb::Protocol::Tcp) => "tcp",
        Ok(pb::Protocol::Udp) => "udp",
        _ => "any",
    }
}

/// `n` with `noun`, plural (an added `s`) unless `n` is 1: `1 rule`, `2 rules`.
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    count_as(n, noun, &format!("{noun}s"))
}

/// `n` with `singular` when `n` is 1, else with `plural`: `1 trie entry`, `2 trie entries`.
pub fn count_as(n: impl Into<u64>, singular: &str, plural: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {singular}")
    } else {
        format!("{n} {plural}")
    }
}

/// A Unix time in nanoseconds as UTC, `2026-11-30T18:41:00Z` (`-` for 0).
pub fn utc(unix_nanos: i64) -> String {
    if unix_nanos == 0 {
        return "-".into();
    }
    let secs = unix_nanos.div_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

/// `policy apply FILE`.
pub async fn policy_apply(
    target: &Target,
    file: &Path,
    expected: Option<u64>,
) -> Result<Report, ClientError> {
    let doc = read_policy_file(file)?;
    let rules = doc.rules.len();
    let mut c = PolicyServiceClient::new(channel(target).await?);
    // The deadline travels with the call: an agent that cannot switch in time changes nothing.
    let mut request = tonic::Request::new(pb::ApplyPolicyRequest {
        policy: Some(doc),
        expected_generation: expected,
    });
    request.set_timeout(target.timeout);
    let r = c
        .apply_policy(request)
        .await
        .map_err(ClientError::from_policy_status)?
        .into_inner();
    Ok(Report {
        human: format!(
            "applied {}: generation {} is live (digest {}, {}, switched in {} µs)\npending cgroups: {}\n",
            count(rules as u64, "rule"),
            r.generation,
            &r.digest[..12.min(r.digest.len())],
            count_as(r.trie_entries, "trie entry", "trie entries"),
            r.switch_micros,
            list(&r.pending_cgroups)
        ),
        json: json!({"generation": r.generation, "digest": r.digest, "trie_entries": r.trie_entries,
                     "switch_micros": r.switch_micros, "pending_cgroups": r.pending_cgroups}),
    })
}

/// `policy get`.
pub async fn policy_get(target: &Target) -> Result<Report, ClientError> {
    // The documented maximum policy (100,000 rules) is larger than tonic's 4 MiB default.
    let mut c = PolicyServiceClient::new(channel(target).await?)
        .max_decoding_message_size(MAX_POLICY_MESSAGE_BYTES);
    let r = c
        .get_policy(pb::GetPolicyRequest {})
        .await
        .map_err(ClientError::from_status)?
        .into_inner();
    // This agent always sends the document; a reply without one shows it empty.
    let doc = r.policy.unwrap_or_default();
    let mut human = format!(
        "generation {} (digest {}): {}\nmode {}, default action {}, default class {}\n",
        r.generation,
        r.digest,
        count(doc.rules.len() as u64, "rule"),
        mode_name(doc.mode),
        action_name(doc.default_action),
        class_name(doc.default_class),
    );
    if !doc.rules.is_empty() {
        // Writing into a String cannot fail.
        let _ = writeln!(
            human,
            "  {:<24} {:<6} {:<5} {:<5} {:<24} {:<16} cgroup",
            "rule", "action", "class", "proto", "cidrs", "ports"
        );
    }
    let mut rules = Vec::new();
    for rule in &doc.rules {
        let selector = workload_selector_text(rule);
        let cgroup = match (&selector, rule.cgroup.is_empty()) {
            (Some(s), _) => s.as_str(),
            (None, true) => "*",
            (None, false) => &rule.cgroup,
        };
        // Writing into a String cannot fail.
        let _ = writeln!(
            human,
            "  {:<24} {:<6} {:<5} {:<5} {:<24} {:<16} {cgroup}",
            rule.name,
            action_name(rule.action),
            class_name(rule.runtime_class),
            protocol_name(rule.protocol),
            list(&rule.cidrs),
            list(&rule.ports),
        );
        let pod_selector = rule.pod_selector.as_ref().map(|p| {
            json!({"match_labels": p.match_labels, "match_expressions": p.match_expressions.iter()
                .map(|x| json!({"key": x.key, "operator": x.operator, "values": x.values}))
                .collect::<Vec<_>>()})
        });
        rules.push(json!({"name": rule.name, "action": action_name(rule.action), "cidrs": rule.cidrs,
            "ports": rule.ports, "cgroup": rule.cgroup, "runtime_class": class_name(rule.runtime_class),
            "protocol": protocol_name(rule.protocol), "namespaces": rule.namespaces,
            "pod_selector": pod_selector, "container": rule.container}));
    }
    Ok(Report {
        human,
        json: json!({"generation": r.generation, "digest": r.digest, "mode": mode_name(doc.mode),
                     "default_action": action_name(doc.default_action),
                     "default_class": class_name(doc.default_class), "rules": rules}),
    })
}

/// `policy diff FILE` (a dry run).
pub async fn policy_diff(target: &Target, file: &Path) -> Result<Report, ClientError> {
    let doc = read_policy_file(file)?;
    let mut c = PolicyServiceClient::new(channel(target).await?);
    let r = c
        .dry_run(pb::DryRunRequest { policy: Some(doc) })
        .await
        .map_err(ClientError::from_policy_status)?
        .into_inner();
    Ok(Report {
        human: format!(
            "against generation {}: added {}; removed {}; changed {}; settings {}\n",
            r.generation,
            list(&r.added),
            list(&r.removed),
            list(&r.changed),
            if r.settings_changed {
                "changed"
            } else {
                "unchanged"
            }
        ),
        json: json!({"generation": r.generation, "digest": r.digest, "added": r.added, "removed": r.removed,
                     "changed": r.changed, "settings_changed": r.settings_changed}),
    })
}

/// `policy rollback`.
pub async fn policy_rollback(
    target: &Target,
    expected: Option<u64>,
) -> Result<Report, ClientError> {
    let mut c = PolicyServiceClient::new(channel(target).await?);
    let mut request = tonic::Request::new(pb::RollbackRequest {
        expected_generation: expected,
    });
    request.set_timeout(target.timeout);
    let r = c
        .rollback(request)
        .await
        .map_err(ClientError::from_policy_status)?
        .into_inner();
    Ok(Report {
        human: format!(
            "rolled back: generation {} is live with the document of generation {}\n",
            r.generation, r.restored_generation
        ),
        json: json!({"generation": r.generation, "digest": r.digest, "restored_generation": r.restored_generation}),
    })
}

/// `status`.
pub async fn status(target: &Target) -> Result<Report, ClientError> {
    // Every hit rule of the maximum policy can be over tonic's 4 MiB default.
    let mut c = AgentServiceClient::new(channel(target).await?)
        .max_decoding_message_size(MAX_POLICY_MESSAGE_BYTES);
    let r = c
        .get_status(pb::GetStatusRequest {})
        .await
        .map_err(ClientError::from_status)?
        .into_inner();
    let mut human = format!(
        "knhk-agent {}: programs {} attached to {}{}\npolicy generation {}, {}\nrule cgroups: active {}; pending {}\n",
        r.version,
        list(&r.programs),
        r.cgroup_root,
        if r.adopted { " (re-adopted pins)" } else { "" },
        r.generation,
        count_as(r.trie_entries, "trie entry", "trie entries"),
        list(&r.active_cgroups),
        list(&r.pending_cgroups)
    );
    let mut decisions = Vec::new();
    for d in &r.decisions {
        let class = class_name(d.runtime_class);
        // Writing into a String cannot fail.
        let _ = writeln!(
            human,
            "  {class:<5} {:<9} allowed {:>10}  denied {:>10}  audited {:>10}  shed {:>10}",
            d.state, d.allowed, d.denied, d.audited, d.shed
        );
        decisions.push(json!({"runtime_class": class, "state": d.state, "allowed": d.allowed, "denied": d.denied,
                              "audited": d.audited, "shed": d.shed}));
    }
    if let Some(l) = &r.ledger {
        // Writing into a String cannot fail.
        let _ = writeln!(
            human,
            "receipts: {} written, {} waiting for the KMS, signing key {}",
            l.log_size,
            count(l.checkpoints_pending, "checkpoint"),
            l.signing_key
        );
    }
    if let Some(s) = &r.sync {
        // Writing into a String cannot fail.
        let _ = writeln!(
            human,
            "region {}: quorum {}, committed up to {}{}",
            s.region,
            s.quorum,
            count(s.committed_size, "receipt"),
            if s.problem.is_empty() {
                String::new()
            } else {
                format!("; {}", s.problem)
            }
        );
    }
    let ledger = r.ledger.as_ref().map(|l| {
        json!({"log_size": l.log_size, "checkpoints_pending": l.checkpoints_pending, "signing_key": l.signing_key})
    });
    let sync = r.sync.as_ref().map(|s| {
        json!({"region": s.region, "quorum": s.quorum, "committed_size": s.committed_size, "problem": s.problem})
    });
    if !r.rule_hits.is_empty() {
        human.push_str("rules with the most hits:\n");
        for h in r.rule_hits.iter().take(10) {
            // Writing into a String cannot fail.
            let _ = writeln!(human, "  {:<32} {:>12}", h.rule, h.hits);
        }
        if r.rule_hits.len() > 10 {
            // Writing into a String cannot fail.
            let _ = writeln!(
                human,
                "  ... and {} more (--output json lists them all)",
                r.rule_hits.len() - 10
            );
        }
    }
    let rule_hits: Vec<_> = r
        .rule_hits
        .iter()
        .map(|h| json!({"rule": h.rule, "hits": h.hits}))
        .collect();
    // Writing into a String cannot fail.
    let _ = writeln!(human, "live policy set by: {}", r.policy_source);
    let workloads = r.workloads.as_ref().map(|w| {
        // Writing into a String cannot fail.
        let _ = writeln!(
            human,
            "pods: {} classified, {} not yet classified",
            w.pods.len(),
            w.unclassified_cgroups.len()
        );
        for p in w.pods.iter().take(20) {
            let _ = writeln!(human, "  {}/{}  {}", p.namespace, p.name, p.cgroup);
        }
        let pods: Vec<_> = w
            .pods
            .iter()
            .map(|p| json!({"namespace": p.namespace, "name": p.name, "uid": p.uid, "cgroup": p.cgroup, "containers": p.containers}))
            .collect();
        json!({"pods": pods, "unclassified_cgroups": w.unclassified_cgroups})
    });
    Ok(Report {
        human,
        json: json!({"version": r.version, "programs": r.programs, "cgroup_root": r.cgroup_root, "generation": r.generation,
                     "adopted": r.adopted, "active_cgroups": r.active_cgroups, "pending_cgroups": r.pending_cgroups,
                     "trie_entries": r.trie_entries, "decisions": decisions, "receipts": ledger, "sync": sync,
                     "rule_hits": rule_hits, "policy_source": r.policy_source, "workloads": workloads}),
    })
}

/// `heat`: per destination, or with `by_pod` (or `pod`, NAMESPACE/NAME) per pod and destination.
pub async fn heat(
    target: &Target,
    limit: u32,
    by_pod: bool,
    pod: Option<&str>,
) -> Result<Report, ClientError> {
    let mut c = AgentServiceClient::new(channel(target).await?);
    let per_pod = by_pod || pod.is_some();
    let r = c
        .get_heat(pb::GetHeatRequest {
            limit,
            by_pod,
            pod: pod.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(ClientError::from_status)?
        .into_inner();
    let mut human = format!(
        "{} of {} heat entries in use\n",
        r.map_entries, r.map_capacity
    );
    if !r.entries.is_empty() {
        human.push_str("  rank destination                              proto     attempts       decayed     rising");
        human.push_str(if per_pod { "  pod\n" } else { "\n" });
    }
    for (i, e) in r.entries.iter().enumerate() {
        let pod = match (per_pod, e.pod.is_empty()) {
            (false, _) => String::new(),
            (true, true) => "  -".to_owned(),
            (true, false) => format!("  {}/{}", e.namespace, e.pod),
        };
        // Writing into a String cannot fail.
        let _ = writeln!(
            human,
            "  {:>3}. {:<40} {:<5} {:>12}  {:>12.1}  {:>+9.1}{}",
            i + 1,
            format!("{}:{}", e.address, e.port),
            e.protocol,
            e.attempts,
            e.decayed_heat,
            e.rising,
            crate::model::log_escape(&pod)
        );
    }
    let entries: Vec<_> = r
        .entries
        .iter()
        .map(|e| {
            let mut j = json!({"address": e.address, "port": e.port, "protocol": e.protocol, "attempts": e.attempts,
                               "decayed_heat": e.decayed_heat, "rising": e.rising});
            if per_pod {
                j["namespace"] = json!(e.namespace);
                j["pod"] = json!(e.pod);
            }
            j
        })
        .collect();
    Ok(Report {
        human,
        json: json!({"map_entries": r.map_entries, "map_capacity": r.map_capacity, "entries": entries}),
    })
}

/// `slo`.
pub async fn slo(target: &Target) -> Result<Report, ClientError> {
    let mut c = AgentServiceClient::new(channel(target).await?);
    let r = c
        .get_slo(pb::GetSloRequest {})
        .await
        .map_err(ClientError::from_status)?
        .into_inner();
    let mut human = String::from(
        "class   samples   handshake p50   handshake p99     rtt p99     ceiling   within\n",
    );
    let mut classes = Vec::new();
    let ms = |ns: u64| {
        if ns == 0 {
            "-".to_string()
        } else {
            format!("{:.3} ms", ns as f64 / 1e6)
        }
    };
    for c in &r.classes {
        let class = class_name(c.runtime_class);
        // Writing into a String cannot fail.
        let _ = writeln!(
            human,
            "{class:<5} {:>9}   {:>13}   {:>13}   {:>9}   {:>9}   {}",
            c.handshake_samples,
            ms(c.handshake_p50_ns),
            ms(c.handshake_p99_ns),
            ms(c.rtt_p99_ns),
            ms(c.p99_max_ns),
            if c.within_slo { "yes" } else { "NO" }
        );
        classes.push(json!({"runtime_class": class, "handshake_samples": c.handshake_samples,
            "handshake_p50_ns": c.handshake_p50_ns, "handshake_p99_ns": c.handshake_p99_ns, "rtt_p99_ns": c.rtt_p99_ns,
            "p99_max_ns": c.p99_max_ns, "within_slo": c.within_slo}));
    }
    Ok(Report {
        human,
        json: json!({"classes": classes}),
    })
}

use crate::api::receipts::pb as rpb;
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};

fn hold_json(h: &rpb::Hold) -> serde_json::Value {
    json!({"id": h.id, "case_id": h.case_id, "reason": h.reason, "from_seq": h.from_seq, "to_seq": h.to_seq,
        "from_time_unix_nanos": h.from_time_unix_nanos, "to_time_unix_nanos": h.to_time_unix_nanos,
        "kind": h.kind, "region": h.region, "placed_unix_nanos": h.placed_unix_nanos,
        "released_unix_nanos": h.released_unix_nanos})
}

/// `hold place`.
pub async fn hold_place(target: &Target, hold: rpb::Hold) -> Result<Report, ClientError> {
    let mut c = rpb::hold_service_client::HoldServiceClient::new(channel(target).await?);
    let id = c
        .place_hold(rpb::PlaceHoldRequest { hold: Some(hold) })
        .await
        .map_err(ClientError::from_status)?
        .into_inner()
        .id;
    Ok(Report {
        human: format!("hold {id} placed (receipted); covered receipts are kept past retention\n"),
        json: json!({"id": id}),
    })
}

/// `hold release`.
pub async fn hold_release(target: &Target, id: u64, reason: &str) -> Result<Report, ClientError> {
    let mut c = rpb::hold_service_client::HoldServiceClient::new(channel(target).await?);
    let hold = c
        .release_hold(rpb::ReleaseHoldRequest {
            id,
            reason: reason.to_owned(),
        })
        .await
        .map_err(ClientError::from_status)?
        .into_inner()
        .hold
        // Absent in the reply: shown empty.
        .unwrap_or_default();
    Ok(Report {
        human: format!("hold {id} released (receipted)\n"),
        json: hold_json(&hold),
    })
}

/// `hold list`.
pub async fn hold_list(target: &Target) -> Result<Report, ClientError> {
    let mut c = rpb::hold_service_client::HoldServiceClient::new(channel(target).await?);
    let holds = c
        .list_holds(rpb::ListHoldsRequest {})
        .await
        .map_err(ClientError::from_status)?
        .into_inner()
        .holds;
    let mut human = String::from(
        "id   placed                case            state      limits                          reason\n",
    );
    for h in &holds {
        let mut limits = Vec::new();
        if let (Some(a), Some(b)) = (h.from_seq, h.to_seq) {
            limits.push(format!("seq {a}..{b}"));
        }
        if let (Some(a), Some(b)) = (h.from_time_unix_nanos, h.to_time_unix_nanos) {
            limits.push(format!("time {}..{}", utc(a), utc(b)));
        }
        if !h.kind.is_empty() {
            limits.push(format!("kind {}", h.kind));
        }
        if !h.region.is_empty() {
            limits.push(format!("region {}", h.region));
        }
        // Writing into a String cannot fail.
        let _ = writeln!(
            human,
            "{:<4} {:<21} {:<15} {:<10} {:<31} {}",
            h.id,
            utc(h.placed_unix_nanos),
            h.case_id,
            if h.released_unix_nanos.is_some() {
                "released"
            } else {
                "active"
            },
            limits.join(", "),
            h.reason
        );
    }
    Ok(Report {
        human,
        json: json!({"holds": holds.iter().map(hold_json).collect::<Vec<_>>()}),
    })
}

/// `receipts list`.
pub async fn receipts_list(target: &Target, from: u64, limit: u32) -> Result<Report, ClientError> {
    let mut c = rpb::receipt_service_client::ReceiptServiceClient::new(channel(target).await?);
    let r = c
        .list_receipts(rpb::ListReceiptsRequest {
            from_seq: from,
            limit,
        })
        .await
        .map_err(ClientError::from_status)?
        .into_inner();
    let mut human = format!(
        "{} in the ledger\nseq      time                  kind            cycle     generation  payload\n",
        count(r.log_size, "receipt")
    );
    let mut items = Vec::new();
    for x in &r.receipts {
        let payload = if x.payload_compacted {
            "(compacted)".to_string()
        } else {
            String::from_utf8_lossy(&x.payload).into_owned()
        };
        // Writing into a String cannot fail.
        let _ = writeln!(
            human,
            "{:<8} {:<21} {:<15} {:<9} {:<11} {}",
            x.seq,
            utc(x.time_unix_nanos),
            x.kind,
            x.cycle,
            x.policy_generation,
            payload
        );
        items.push(json!({"seq": x.seq, "kind": x.kind, "cycle": x.cycle, "time_unix_nanos": x.time_unix_nanos,
            "policy_generation": x.policy_generation, "payload": payload, "key_id": x.key_id, "key_version": x.key_version}));
    }
    Ok(Report {
        human,
        json: json!({"log_size": r.log_size, "receipts": items}),
    })
}

/// `receipts keys`: the key history with fingerprints, oldest first.
pub async fn receipts_keys(target: &Target) -> Result<Report, ClientError> {
    let mut c = rpb::receipt_service_client::ReceiptServiceClient::new(channel(target).await?);
    let r = c
        .list_keys(rpb::ListKeysRequest {})
        .await
        .map_err(ClientError::from_status)?
        .into_inner();
    let mut human = format!(
        "{} in the history (the last is current)\n",
        count(r.keys.len() as u64, "signing key")
    );
    let mut items = Vec::new();
    for k in &r.keys {
        // Writing into a String cannot fail.
        let _ = writeln!(
            human,
            "{}#{}\n  fingerprint {}\n  current from {}{}",
            k.key_id,
            k.key_version,
            k.fingerprint,
            utc(k.since_unix_nanos),
            if k.transition_statement.is_empty() {
                "  (the first key: trust it out of band)"
            } else {
                "  (handed over by a statement signed by the previous key)"
            }
        );
        items.push(
            json!({"key_id": k.key_id, "key_version": k.key_version, "fingerprint": k.fingerprint,
            "public_key": B64.encode(&k.public_key), "since_unix_nanos": k.since_unix_nanos,
            "transition_statement": k.transition_statement,
            "transition_signature": B64.encode(&k.transition_signature)}),
        );
    }
    Ok(Report {
        human,
        json: json!({"keys": items}),
    })
}

/// `receipts checkpoints`: checkpoints from a number, with signing key and cosignatures.
pub async fn receipts_checkpoints(
    target: &Target,
    from: u64,
    limit: u32,
) -> Result<Report, ClientError> {
    let mut c = rpb::receipt_service_client::ReceiptServiceClient::new(channel(target).await?);
    let r = c
        .list_checkpoints(rpb::ListCheckpointsRequest {
            from_number: from,
            limit,
        })
        .await
        .map_err(ClientError::from_status)?
        .into_inner();
    let mut human =
        "number   size       signed  key                                    cosigned by\n"
            .to_string();
    let mut items = Vec::new();
    for x in &r.checkpoints {
        let regions: Vec<&str> = x.cosignatures.iter().map(|c| c.witness.as_str()).collect();
        // Writing into a String cannot fail.
        let _ = writeln!(
            human,
            "{:<8} {:<10} {:<7} {:<38} {}",
            x.number,
            x.tree_size,
            if x.signature.is_empty() { "no" } else { "yes" },
            format!("{}#{}", x.key_id, x.key_version),
            if regions.is_empty() {
                "-".to_string()
            } else {
                regions.join(", ")
            }
        );
        let cosignatures: Vec<serde_json::Value> = x
            .cosignatures
            .iter()
            .map(|c| {
                json!({"witness": c.witness, "verifier_key": c.verifier_key, "line": c.line,
                    "timestamp_unix": c.timestamp_unix})
            })
            .collect();
        items.push(json!({"number": x.number, "tree_size": x.tree_size, "root_hash": B64.encode(&x.root_hash),
            "body": x.body, "signature": B64.encode(&x.signature), "key_id": x.key_id,
            "key_version": x.key_version, "key_fingerprint": x.key_fingerprint,
            "origin": x.origin, "note": x.note, "cosignatures": cosignatures}));
    }
    Ok(Report {
        human,
        json: json!({"checkpoints": items}),
    })
}

/// Parses `DEST:PORT/PROTO` (`10.0.0.5:5432/tcp`, `[fd00::1]:53/udp`; PROTO defaults to tcp).
pub fn parse_destination(s: &str) -> Result<(std::net::IpAddr, u16, String), ClientError> {
    let (addr, proto) = match s.rsplit_once('/') {
        Some((a, p)) => (a, p.to_ascii_lowercase()),
        None => (s, "tcp".to_owned()),
    };
    if proto != "tcp" && proto != "udp" {
        return Err(ClientError::File(format!(
            "{s}: protocol {proto:?} is not tcp or udp (write DEST:PORT/PROTO, e.g. 10.0.0.5:5432/tcp)"
        )));
    }
    let sa: std::net::SocketAddr = addr.parse().map_err(|_| {
        ClientError::File(format!(
            "{s}: not DEST:PORT/PROTO (e.g. 10.0.0.5:5432/tcp or [fd00::1]:53/udp)"
        ))
    })?;
    Ok((sa.ip(), sa.port(), proto))
}

/// A selector rule's subject in one line (`pods ns=a,b app=api tier In (x,y) container=c`), or
/// `None` for a rule that applies by cgroup.
fn workload_selector_text(rule: &pb::Rule) -> Option<String> {
    if rule.namespaces.is_empty() && rule.pod_selector.is_none() && rule.container.is_empty() {
        return None;
    }
    let mut parts = vec!["pods".to_owned()];
    if !rule.namespaces.is_empty() {
        parts.push(format!("ns={}", rule.namespaces.join(",")));
    }
    if let Some(p) = &rule.pod_selector {
        let mut labels: Vec<_> = p.match_labels.iter().collect();
        labels.sort();
        parts.extend(labels.into_iter().map(|(k, v)| format!("{k}={v}")));
        parts.extend(p.match_expressions.iter().map(|x| {
            if x.values.is_empty() {
                format!("{} {}", x.key, x.operator)
            } else {
                format!("{} {} ({})", x.key, x.operator, x.values.join(","))
            }
        }));
    }
    if !rule.container.is_empty() {
        parts.push(format!("container={}", rule.container));
    }
    Some(parts.join(" "))
}

/// `explain`.
pub async fn explain(
    target: &Target,
    cgroup: &str,
    pod: Option<&str>,
    destination: &str,
) -> Result<Report, ClientError> {
    let (ip, port, protocol) = parse_destination(destination)?;
    if let Some(p) = pod.filter(|p| {
        p.split_once('/')
            .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty())
    }) {
        return Err(ClientError::File(format!(
            "--pod {p:?}: expected NAMESPACE/NAME, e.g. payments/api-0"
        )));
    }
    let mut c = AgentServiceClient::new(channel(target).await?);
    let r = c
        .explain(pb::ExplainRequest {
            cgroup: if pod.is_some() {
                String::new()
            } else {
                cgroup.to_owned()
            },
            destination: ip.to_string(),
            port: port.into(),
            protocol: protocol.clone(),
            pod: pod.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(ClientError::from_status)?
        .into_inner();
    let class = class_name(r.runtime_class);
    let mut human = format!(
        "{} from {}: {} (rule {}, class {class}, generation {})\n",
        destination,
        pod.map_or_else(
            || format!("cgroup {cgroup}"),
            |p| format!("pod {p} (cgroup {})", r.cgroup)
        ),
        r.action,
        if r.rule.is_empty() {
            "none: the default"
        } else {
            &r.rule
        },
        r.generation
    );
    for (i, step) in r.steps.iter().enumerate() {
        let _ = writeln!(human, "  {}. {step}", i + 1);
    }
    Ok(Report {
        human,
        json: json!({"cgroup": cgroup, "destination": ip.to_string(), "port": port, "protocol": protocol,
                     "generation": r.generation, "scope": r.scope, "prefix": r.prefix, "rule": r.rule,
                     "rule_action": r.rule_action, "class": class, "action": r.action,
                     "entries_scanned": r.entries_scanned, "steps": r.steps}),
    })
}

/// What `events` streams.
#[derive(Debug, Clone, Default)]
pub struct EventsRequest {
    /// Include kernel verdicts.
    pub verdicts: bool,
    /// Only kernel verdicts.
    pub only_verdicts: bool,
    /// Verdict actions to keep (empty: all).
    pub actions: Vec<String>,
    /// Verdicts of this cgroup subtree only.
    pub cgroup: Option<String>,
    /// Verdicts of this rule only.
    pub rule: Option<String>,
    /// Stop after this many events.
    pub count: Option<u64>,
    /// Stop after this long (None: until interrupted or `count`).
    pub duration: Option<Duration>,
}

/// `events`: streams events as they happen, calling `emit` with each; returns how many.
pub async fn events(
    target: &Target,
    req: &EventsRequest,
    mut emit: impl FnMut(Report),
) -> Result<u64, ClientError> {
    let mut c = AgentServiceClient::new(channel(target).await?);
    let mut stream = c
        .watch_events(pb::WatchEventsRequest {
            verdicts: req.verdicts || req.only_verdicts,
            only_verdicts: req.only_verdicts,
            actions: req.actions.clone(),
            cgroup: req.cgroup.clone().unwrap_or_default(),
            rule: req.rule.clone().unwrap_or_default(),
        })
        .await
        .map_err(ClientError::from_status)?
        .into_inner();
    let deadline = req.duration.map(|d| tokio::time::Instant::now() + d);
    let mut n = 0;
    while req.count.is_none_or(|c| n < c) {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, stream.message()).await {
                Ok(m) => m,
                Err(_) => break,
            },
            None => stream.message().await,
        };
        let Some(e) = next.map_err(ClientError::from_status)? else {
            break;
        };
        emit(event_report(e));
        n += 1;
    }
    Ok(n)
}

/// One event in both renderings.
fn event_report(e: pb::WatchEventsResponse) -> Report {
    use pb::watch_events_response::Event as E;
    let at = e.unix_millis;
    match e.event {
        Some(E::Verdict(v)) => Report {
            human: format!(
                "{at} verdict {:<5} {}:{}/{} from {} (rule {}, class {}, generation {}, {})\n",
                v.action,
                if v.destination.contains(':') {
                    format!("[{}]", v.destination)
                } else {
                    v.destination.clone()
                },
                v.port,
                v.protocol,
                if v.pod.is_empty() {
                    v.cgroup.clone()
                } else {
                    format!("pod {} ({})", v.pod, v.cgroup)
                },
                if v.rule.is_empty() {
                    "none: the default"
                } else {
                    &v.rule
                },
                class_name(v.runtime_class),
                v.generation,
                v.hook
            ),
            json: json!({"unix_millis": at, "type": "verdict", "cgroup": v.cgroup, "destination": v.destination,
                         "port": v.port, "protocol": v.protocol, "action": v.action,
                         "class": class_name(v.runtime_class), "rule": v.rule,
                         "generation": v.generation, "hook": v.hook, "pod": v.pod}),
        },
        Some(E::PolicySwitched(p)) => Report {
            human: format!(
                "{at} policy generation {} live ({}, digest {})\n",
                p.generation, p.cause, p.digest
            ),
            json: json!({"unix_millis": at, "type": "policy_switched", "generation": p.generation,
                         "cause": p.cause, "digest": p.digest}),
        },
        Some(E::Rollout(r)) => Report {
            human: format!(
                "{at} rollout {} of generation {}: {} at step {} ({}%){}\n",
                r.action,
                r.candidate_generation,
                r.state,
                r.step + 1,
                r.percent,
                if r.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", r.detail)
                }
            ),
            json: json!({"unix_millis": at, "type": "rollout", "action": r.action,
                         "candidate_generation": r.candidate_generation,
                         "candidate_digest": r.candidate_digest, "state": r.state,
                         "step": r.step, "percent": r.percent, "detail": r.detail}),
        },
        Some(E::CgroupChanged(g)) => Report {
            human: format!(
                "{at} rule cgroup {} {}\n",
                g.cgroup,
                if g.present { "appeared" } else { "removed" }
            ),
            json: json!({"unix_millis": at, "type": "cgroup_changed", "cgroup": g.cgroup, "present": g.present}),
        },
        Some(E::ClassStateChanged(s)) => Report {
            human: format!(
                "{at} class {} {} -> {}\n",
                class_name(s.runtime_class),
                s.from,
                s.to
            ),
            json: json!({"unix_millis": at, "type": "class_state_changed",
                         "class": class_name(s.runtime_class), "from": s.from, "to": s.to}),
        },
        None => Report {
            human: format!("{at} (an event this client does not know)\n"),
            json: json!({"unix_millis": at, "type": "unknown"}),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_without_a_scheme_are_http() {
        assert_eq!(
            parse_endpoint("127.0.0.1:50051"),
            Ok(Endpoint::Uri("http://127.0.0.1:50051".into()))
        );
        assert_eq!(
            parse_endpoint("[::1]:50051"),
            Ok(Endpoint::Uri("http://[::1]:50051".into()))
        );
        assert_eq!(
            parse_endpoint("unix:///run/knhk/agent.sock"),
            Ok(Endpoint::Unix("/run/knhk/agent.sock".into()))
        );
        assert!(parse_endpoint("127.0.0.1").is_err(), "no port");
        assert!(parse_endpoint("host:1/path").is_err());
        assert!(parse_endpoint("unix:relative").is_err());
    }

    #[test]
    fn times_are_utc_and_counts_plural() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1_000_000_000), "1970-01-01T00:00:01Z");
        assert_eq!(utc(951_782_400_000_000_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_150_460_500_000_000), "2026-12-01T18:41:00Z");
        assert_eq!(utc(-1_000_000_000), "1969-12-31T23:59:59Z");
        assert_eq!(count(1u64, "rule"), "1 rule");
        assert_eq!(count(0u64, "rule"), "0 rules");
        assert_eq!(count(2u64, "receipt"), "2 receipts");
        assert_eq!(
            count_as(3u64, "trie entry", "trie entries"),
            "3 trie entries"
        );
    }

    #[test]
    fn enum_names_are_the_configuration_words() {
        assert_eq!(class_name(pb::RuntimeClass::R1 as i32), "R1");
        assert_eq!(action_name(pb::Action::Deny as i32), "deny");
        assert_eq!(mode_name(pb::Mode::Enforce as i32), "enforce");
        assert_eq!(protocol_name(pb::Protocol::Udp as i32), "udp");
        assert_eq!(class_name(99), "-");
    }

    #[test]
    fn hold_errors_are_not_policy_errors() {
        let e = ClientError::Rpc(tonic::Status::invalid_argument("from_seq > to_seq"));
        assert_eq!(e.to_string(), "invalid request: from_seq > to_seq");
        assert_eq!(e.exit_code(), 64);
        let e = ClientError::Policy(tonic::Status::invalid_argument("rules[0]: bad"));
        assert_eq!(e.to_string(), "invalid policy: rules[0]: bad");
        assert_eq!(e.exit_code(), 65);
        let e = ClientError::Rpc(tonic::Status::internal("boom"));
        assert_eq!(e.to_string(), "the agent failed: boom");
        assert_eq!(
            ClientError::Timeout(Duration::from_secs(5)).to_string(),
            "the agent did not answer within 5 seconds (--timeout); is it overloaded or stuck? \
             A policy change that timed out may or may not have been applied: check `policy get`"
        );
    }
}

/// What `rollout start` asks for.
#[derive(Debug, Clone, Default)]
pub struct RolloutStart {
    /// The candidate policy file (`None`: the live policy, for a flags-only rollout).
    pub file: Option<PathBuf>,
    /// The candidate's feature flags (`None`: the live generation's).
    pub flags: Option<Vec<String>>,
    /// Steps, percent.
    pub steps: Vec<f64>,
    /// Beats per step (0: the agent's default).
    pub beats_per_step: u32,
    /// The split's seed.
    pub seed: Option<String>,
}

/// What `rollout` does to a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    /// Read it.
    Status,
    /// Make the candidate live.
    Promote,
    /// Stop analysing.
    Pause,
    /// Analyse again.
    Resume,
    /// Back to 0 %.
    Abort,
}

fn rollout_report(r: &pb::RolloutStatus) -> Report {
    if !r.present {
        return Report {
            human: "no rollout since the agent started\n".into(),
            json: json!({"present": false}),
        };
    }
    let steps: Vec<String> = r.steps.iter().map(|s| format!("{s}%")).collect();
    let mut human = format!(
        "rollout of generation {} (digest {}) over generation {}: {}\nsteps {}; step {} at {}% of workloads ({} of {} on the candidate)\n",
        r.candidate_generation,
        &r.candidate_digest[..12.min(r.candidate_digest.len())],
        r.stable_generation,
        r.state,
        steps.join(" → "),
        r.step + 1,
        r.percent,
        r.candidate_workloads,
        r.workloads,
    );
    human.push_str(&format!(
        "gates: SLO met in {} of {} beats (threshold {} of {} beats per step); deny rate candidate {:.2} % vs stable {:.2} %\nflags: {}; beats {}; auto-rollback {}\n",
        r.beats_met,
        r.beats_observed,
        r.slo_threshold,
        r.beats_per_step,
        r.candidate_deny_rate * 100.0,
        r.stable_deny_rate * 100.0,
        list(&r.feature_flags),
        r.beats,
        if r.auto_rollback { "on" } else { "off" },
    ));
    if let (Some(failed), Some(zeroed)) = (r.gate_failed_at_beat, r.zeroed_at_beat) {
        human.push_str(&format!(
            "a gate failed at beat {failed}; the candidate was at 0 % at beat {zeroed}\n"
        ));
    }
    if !r.reason.is_empty() {
        human.push_str(&format!("reason: {}\n", r.reason));
    }
    Report {
        human,
        json: json!({"present": true, "state": r.state, "steps": r.steps, "step": r.step,
                     "percent": r.percent, "beats_per_step": r.beats_per_step,
                     "beats_observed": r.beats_observed, "beats_met": r.beats_met,
                     "slo_threshold": r.slo_threshold,
                     "candidate_deny_rate": r.candidate_deny_rate,
                     "stable_deny_rate": r.stable_deny_rate,
                     "stable_generation": r.stable_generation,
                     "candidate_generation": r.candidate_generation,
                     "candidate_digest": r.candidate_digest, "feature_flags": r.feature_flags,
                     "candidate_workloads": r.candidate_workloads, "workloads": r.workloads,
                     "reason": r.reason, "seed": r.seed, "beats": r.beats,
                     "gate_failed_at_beat": r.gate_failed_at_beat,
                     "zeroed_at_beat": r.zeroed_at_beat, "auto_rollback": r.auto_rollback}),
    }
}

/// `rollout start`.
pub async fn rollout_start(target: &Target, start: &RolloutStart) -> Result<Report, ClientError> {
    let policy = match &start.file {
        Some(f) => Some(read_policy_file(f)?),
        None => None,
    };
    let mut c = pb::rollout_service_client::RolloutServiceClient::new(channel(target).await?)
        .max_decoding_message_size(MAX_POLICY_MESSAGE_BYTES);
    let r = c
        .start_rollout(pb::StartRolloutRequest {
            policy,
            set_feature_flags: start.flags.is_some(),
            feature_flags: start.flags.clone().unwrap_or_default(),
            steps: start.steps.clone(),
            beats_per_step: start.beats_per_step,
            seed: start.seed.clone().unwrap_or_default(),
        })
        .await
        .map_err(ClientError::from_policy_status)?
        .into_inner();
    Ok(rollout_report(&r))
}

/// `rollout status|promote|pause|resume|abort`.
pub async fn rollout(
    target: &Target,
    action: RolloutAction,
    reason: Option<String>,
) -> Result<Report, ClientError> {
    let mut c = pb::rollout_service_client::RolloutServiceClient::new(channel(target).await?);
    let control = pb::RolloutControlRequest {
        reason: reason.unwrap_or_default(),
    };
    let r = match action {
        RolloutAction::Status => c.get_rollout(pb::GetRolloutRequest {}).await,
        RolloutAction::Promote => c.promote_rollout(control).await,
        RolloutAction::Pause => c.pause_rollout(control).await,
        RolloutAction::Resume => c.resume_rollout(control).await,
        RolloutAction::Abort => c.abort_rollout(control).await,
    }
    .map_err(ClientError::from_policy_status)?
    .into_inner();
    Ok(rollout_report(&r))
}
