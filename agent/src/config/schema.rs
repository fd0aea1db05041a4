//! The configuration schema. Value types validate themselves while parsing, so the TOML parser
//! reports their errors with a line, a column and a caret.

use super::{
    line_of,
    settings::{
        BeatSettings, IdentitySettings, PromotionSettings, ReceiptSettings, Settings, SyncSettings,
        TelemetrySection, TelemetrySettings,
    },
    ConfigError,
};
use crate::model::{AdmissionStrategy, Class, DefaultAction, LatencySource, Mode, RuleSpec};
use serde::Deserialize;
use std::{net::SocketAddr, path::PathBuf};
use toml::Spanned;

/// A validated configuration. Build one with [`Config::load_file`] or [`Config::parse`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[agent]` (alias `[sidecar]`).
    pub agent: AgentSection,
    /// `[policy]`: the admission rules.
    pub policy: PolicySection,
    /// `[slo]`: SLO admission by the beat engine.
    pub slo: Option<SloSection>,
    /// `[spiffe]`: workload identity and mTLS for the gRPC API.
    pub spiffe: Option<SpiffeSection>,
    /// `[kms]`: the key that signs receipt checkpoints; with it the receipts ledger runs.
    pub kms: Option<KmsSection>,
    /// `[receipts]`: where and how long receipts are kept.
    pub receipts: Option<ReceiptsSection>,
    /// `[multi_region]`: cross-region receipt sync.
    pub multi_region: Option<MultiRegionSection>,
    /// `[promotion]`: the node's ring, feature flags and rollout defaults.
    pub promotion: Option<PromotionSection>,
    /// `[kubernetes]`: workload discovery through the node's container runtime (CRI); with it,
    /// rules may select pods by namespace and labels.
    pub kubernetes: Option<KubernetesSection>,
    /// `[telemetry]`: OTLP export of metrics and traces.
    pub telemetry: Option<TelemetrySection>,
    /// The typed settings of the optional sections, built from the ones above while loading.
    pub settings: Settings,
}

impl Config {
    /// Sections present in the file that this version parses and checks but does not act on yet,
    /// with the reason, for `check-config`.
    pub fn inactive_sections(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if self
            .spiffe
            .as_ref()
            .is_some_and(|s| s.enabled != Some(true))
        {
            out.push((
                "spiffe",
                "enabled is not true: the gRPC API is plaintext, on agent.api_socket (or loopback agent.listen_address)",
            ));
        }
        if self.receipts.is_some() && self.kms.is_none() {
            out.push(("receipts", "the ledger needs [kms] (a signing key)"));
        }
        if self
            .multi_region
            .as_ref()
            .is_some_and(|m| m.cross_region_sync_enabled != Some(true))
        {
            out.push(("multi_region", "cross_region_sync_enabled is not true"));
        } else if self.multi_region.is_some() && self.kms.is_none() {
            out.push((
                "multi_region",
                "witnessing pushes the receipts ledger's checkpoints, which needs [kms]",
            ));
        }
        if self.telemetry.is_some() && self.settings.telemetry.is_none() {
            out.push((
                "telemetry",
                "neither otlp_endpoint nor weaver_live_check is set: OTLP export is off",
            ));
        } else if self.settings.telemetry.is_some() && !cfg!(feature = "otlp") {
            out.push((
                "telemetry",
                "this agent was built without the `otlp` feature: OTLP export is off",
            ));
        }
        out
    }
}

macro_rules! agent_table {
    ($(#[$meta:meta])* $vis:vis struct $name:ident { $($extra:tt)* }) => {
        $(#[$meta])*
        $vis struct $name {
            /// gRPC API over TCP. With `[spiffe] enabled = true` (mTLS) any address (default
            /// `127.0.0.1:50051`). Without mTLS the API is on `api_socket` unless this is set;
            /// then it is plaintext, loopback only, and any local user can reach it.
            #[serde(default)]
            pub listen_address: Option<SocketAddr>,
            /// The API's Unix socket without mTLS (unless `listen_address` is set): mode 0600,
            /// owned by root (0660 with `api_socket_group`), in a directory only root may write
            /// (created 0750 if missing); every connection's peer must be root or in the group.
            #[serde(default = "default_api_socket")]
            pub api_socket: PathBuf,
            /// A group (name) whose members may use the API socket besides root.
            #[serde(default)]
            pub api_socket_group: Option<String>,
            /// The agent's private runtime files (the file identity's Workload API socket, each
            /// run in a fresh 0700 directory): a directory owned by root and not writable by
            /// group or others, never a symlink (created 0700 if missing).
            #[serde(default = "default_state_dir")]
            pub state_dir: PathBuf,
            /// Largest gRPC request accepted, bytes.
            #[serde(default = "default_max_request_bytes")]
            pub max_request_bytes: usize,
            /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`.
            #[serde(default = "default_metrics_address")]
            pub metrics_address: SocketAddr,
            /// `enforce` (deny rules refuse with EPERM) or `audit` (they only count).
            #[serde(default)]
            pub mode: Mode,
            /// What happens to a connect that matches no rule.
            #[serde(default)]
            pub default_action: DefaultAction,
            /// Runtime class of connects that match no rule (and of rules that name none).
            #[serde(default = "default_class")]
            pub default_class: Class,
            /// Cgroup v2 directory the programs attach to; rule cgroups are relative to it.
            /// Default: the detected cgroup v2 mount (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
            #[serde(default)]
            pub cgroup_root: Option<PathBuf>,
            /// bpffs directory for pins; the agent uses its `v<ABI>` subdirectory.
            #[serde(default = "default_pin_root")]
            pub pin_root: PathBuf,
            /// Count connect attempts per destination in the kernel heat map.
            #[serde(default = "yes")]
            pub heat_enabled: bool,
            /// Size of the kernel heat LRU (destinations).
            #[serde(default = "default_heat_max_entries")]
            pub heat_max_entries: u32,
            /// Heat is recorded for one decision in this many (chosen at random), each sample
            /// counting this many attempts: an unbiased estimate at a fraction of the cost. A
            /// power of two, 1 (every decision) to 1024.
            #[serde(default = "default_heat_sample_every")]
            pub heat_sample_every: u32,
            /// Hottest destinations exported on `/metrics`.
            #[serde(default = "default_heat_top_n")]
            pub heat_top_n: u32,
            /// Rules with a `knhk_rule_hits_total` series on `/metrics`: the ones with the most
            /// hits (rules with no hits have none). Every rule's count is in `GetStatus`.
            #[serde(default = "default_rule_metrics_top_n")]
            pub rule_metrics_top_n: u32,
            /// Record TCP handshake and RTT histograms in the kernel.
            #[serde(default = "yes")]
            pub histograms_enabled: bool,
            /// Per CPU and class, time at most one TCP connect per this many microseconds for
            /// the histograms (0 = every connect). At low rates every connect is timed.
            #[serde(default = "default_histogram_interval_us")]
            pub histogram_interval_us: u64,
            /// The cgroup follower's fallback tick (milliseconds): rule cgroups are followed by
            /// inotify and on policy switches; this tick retries what could not be watched and
            /// reclaims retired policy slots.
            #[serde(default = "default_cgroup_poll_interval_ms")]
            pub cgroup_poll_interval_ms: u64,
            /// Detach programs and remove pins when the agent exits. Off by default, so that
            /// enforcement survives agent restarts and upgrades.
            #[serde(default)]
            pub detach_on_exit: bool,
            $($extra)*
        }
    };
}

agent_table!(
    /// `[agent]`: process-wide settings and the datapath's behaviour.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AgentSection {}
);

agent_table!(
    /// `[agent]` or `[sidecar]` as written: the agent keys plus, in the plan's layout, the other
    /// sections nested under it (`[sidecar.slo]`), which [`RawConfig::normalize`] hoists.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawAgentTable {
        policy: Option<Spanned<RawPolicy>>,
        slo: Option<Spanned<SloSection>>,
        spiffe: Option<Spanned<SpiffeSection>>,
        kms: Option<Spanned<KmsSection>>,
        receipts: Option<Spanned<ReceiptsSection>>,
        multi_region: Option<Spanned<MultiRegionSection>>,
        promotion: Option<Spanned<PromotionSection>>,
    }
);

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            listen_address: None,
            api_socket: default_api_socket(),
            api_socket_group: None,
            state_dir: default_state_dir(),
            max_request_bytes: default_max_request_bytes(),
            metrics_address: default_metrics_address(),
            mode: Mode::default(),
            default_action: DefaultAction::default(),
            default_class: default_class(),
            cgroup_root: None,
            pin_root: default_pin_root(),
            heat_enabled: true,
            heat_max_entries: default_heat_max_entries(),
            heat_sample_every: default_heat_sample_every(),
            heat_top_n: default_heat_top_n(),
            rule_metrics_top_n: default_rule_metrics_top_n(),
            histograms_enabled: true,
            histogram_interval_us: default_histogram_interval_us(),
            cgroup_poll_interval_ms: default_cgroup_poll_interval_ms(),
            detach_on_exit: false,
        }
    }
}

/// The API's TCP address with mTLS when `agent.listen_address` is not set.
pub const DEFAULT_LISTEN_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50051);
/// The API's Unix socket when mTLS is off and `agent.listen_address` is not set.
pub const DEFAULT_API_SOCKET: &str = "/run/knhk/agent.sock";
fn default_api_socket() -> PathBuf {
    PathBuf::from(DEFAULT_API_SOCKET)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/knhk")
}
fn default_max_request_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_metrics_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_class() -> Class {
    Class::C1
}
fn default_pin_root() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/knhk")
}
fn yes() -> bool {
    true
}
fn default_heat_sample_every() -> u32 {
    16
}
fn default_heat_max_entries() -> u32 {
    knhk_abi::DEFAULT_HEAT_MAX_ENTRIES
}
fn default_heat_top_n() -> u32 {
    20
}
fn default_rule_metrics_top_n() -> u32 {
    50
}
fn default_histogram_interval_us() -> u64 {
    1000
}
fn default_cgroup_poll_interval_ms() -> u64 {
    1000
}

/// `[policy]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySection {
    /// Most rules a policy may have (also for policies applied over gRPC).
    pub max_rules: usize,
    /// The rules, in declaration order (which breaks ties between equally specific rules).
    pub rules: Vec<RuleSpec>,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            max_rules: default_max_rules(),
            rules: Vec::new(),
        }
    }
}

fn default_max_rules() -> usize {
    100_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default = "default_max_rules")]
    max_rules: usize,
    #[serde(default)]
    rules: Vec<Spanned<RuleSpec>>,
}

/// `[slo]` (the plan's `[sidecar.slo]`): SLO admission by the beat engine.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloSection {
    /// Beat period, milliseconds (default 100, 1-60000).
    pub beat_interval_ms: Option<u64>,
    /// Consecutive healthy beats before a shed class recovers (default 10).
    pub recover_beats: Option<u32>,
    /// R1 p99 latency ceiling, nanoseconds.
    pub r1_p99_max_ns: Option<u64>,
    /// W1 p99 latency ceiling, milliseconds.
    pub w1_p99_max_ms: Option<u64>,
    /// C1 p99 latency ceiling, milliseconds.
    pub c1_p99_max_ms: Option<u64>,
    /// `strict` or `degrade`.
    pub admission_strategy: Option<AdmissionStrategy>,
    /// Beats in the sliding window (default 8).
    pub window_beats: Option<u32>,
    /// New R1 connects admitted per beat; past it, the strategy's action applies (default: no budget).
    pub r1_budget_per_beat: Option<u64>,
    /// New W1 connects admitted per beat.
    pub w1_budget_per_beat: Option<u64>,
    /// New C1 connects admitted per beat.
    pub c1_budget_per_beat: Option<u64>,
    /// Beats over which a destination's heat halves (default 50).
    pub heat_half_life_beats: Option<u32>,
    /// Set per-beat budgets from the capacity model's knee for classes without a static budget
    /// (default false).
    pub capacity_budgets: Option<bool>,
    /// What R1's ceiling is compared with: `handshake` (default) or `rtt`.
    pub r1_latency: Option<LatencySource>,
    /// What W1's ceiling is compared with: `handshake` (default) or `rtt`.
    pub w1_latency: Option<LatencySource>,
    /// What C1's ceiling is compared with: `handshake` (default) or `rtt`.
    pub c1_latency: Option<LatencySource>,
}

/// `[spiffe]` (the plan's `[sidecar.spiffe]`): workload identity and mTLS. See
/// `docs/identity.md`; checked by [`crate::identity::IdentitySettings::from_section`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpiffeSection {
    /// Serve the gRPC API over mTLS with a SPIFFE identity (default false).
    pub enabled: Option<bool>,
    /// Where the identity comes from: `workload_api` (default) or `files` (migration only).
    pub source: Option<IdentitySource>,
    /// Workload API socket (default `$SPIFFE_ENDPOINT_SOCKET`, else
    /// `/tmp/spire-agent/public/api.sock`).
    pub spiffe_socket_path: Option<PathBuf>,
    /// This node's trust domain (required when enabled).
    pub trust_domain: Option<String>,
    /// The SPIFFE ID the agent expects to be issued; another one is an error.
    pub spiffe_id: Option<String>,
    /// Foreign trust domains whose peers are accepted, with their bundles from the Workload API.
    pub federated_trust_domains: Option<Vec<String>>,
    /// Oldest acceptable SVID, hours (1-24, default 24): older fails readiness.
    pub max_svid_age_hours: Option<u32>,
    /// How long the first SVID may take before readiness says so, seconds (default 30).
    pub initial_sync_timeout_secs: Option<u64>,
    /// `source = "files"`: PEM certificate chain (leaf first).
    pub cert_file: Option<PathBuf>,
    /// `source = "files"`: PEM PKCS#8 private key; must not be readable by group or others.
    pub key_file: Option<PathBuf>,
    /// `source = "files"`: PEM bundle of the trust domain's CA certificates.
    pub ca_file: Option<PathBuf>,
    /// Who may call what.
    pub authorized_ids: Option<AuthorizedIds>,
}

/// Where the agent's SVID comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The SPIRE Workload API (streamed, rotated by SPIRE).
    #[default]
    WorkloadApi,
    /// Certificate, key and CA files, reloaded when they change (migration only).
    Files,
}

/// `[spiffe.authorized_ids]`: SPIFFE IDs allowed per API surface. Each entry is an exact ID
/// (`spiffe://td/ns/ops/sa/admin`) or a path prefix ending in `/*` (`spiffe://td/ns/ops/*`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizedIds {
    /// May change the policy (ApplyPolicy, Rollback); writers may also read.
    pub policy_writers: Option<Vec<String>>,
    /// May read (GetPolicy, DryRun, GetStatus, GetSlo, GetHeat, WatchEvents, reflection).
    /// Default: any ID of the local trust domain.
    pub readers: Option<Vec<String>>,
    /// May sync receipts as another region.
    pub region_peers: Option<Vec<String>>,
    /// May place and release legal holds.
    pub hold_writers: Option<Vec<String>>,
}

/// `[kms]` (the plan's `[sidecar.kms]`): the key that signs receipt checkpoints. See
/// `docs/receipts.md`; checked by [`crate::receipts::SignerSettings::from_section`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsSection {
    /// `aws`, `vault`, `azure` or `file`.
    pub provider: Option<String>,
    /// AWS region.
    pub region: Option<String>,
    /// AWS: key ARN, id or alias (an alias for rotation).
    pub key_id: Option<String>,
    /// AWS: a KMS-compatible endpoint instead of AWS's.
    pub endpoint_url: Option<String>,
    /// Signing key rotation interval, at most 24 hours (default 24).
    pub rotation_interval_hours: Option<u32>,
    /// Vault/OpenBao address, e.g. `https://vault:8200`.
    pub addr: Option<String>,
    /// Vault transit mount (default `transit`).
    pub mount_path: Option<String>,
    /// Vault transit key name (an `ecdsa-p256` key); Azure Key Vault key name (an EC P-256 key).
    pub key_name: Option<String>,
    /// Azure: the vault, `https://NAME.vault.azure.net`.
    pub vault_url: Option<String>,
    /// Azure: a PEM file of extra CAs for the vault and the token endpoint.
    pub ca_file: Option<PathBuf>,
    /// Vault token file (default: `$VAULT_TOKEN`).
    pub token_file: Option<PathBuf>,
    /// `file`: directory of local keys (development only).
    pub key_dir: Option<PathBuf>,
}

/// `[receipts]`: the ledger's storage and retention.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptsSection {
    /// The database file (default `/var/lib/knhk/receipts.redb`).
    pub path: Option<PathBuf>,
    /// This node's name in receipts (default: the host name).
    pub node: Option<String>,
    /// Days to keep each kind's payloads (`policy_switch = 365`); kinds not named are kept forever.
    pub retention_days: Option<std::collections::BTreeMap<String, u32>>,
    /// Unsigned checkpoints kept while the KMS is unreachable (default 1024; older ones are
    /// dropped, newer ones cover their receipts).
    pub max_pending_checkpoints: Option<usize>,
}

/// `[multi_region]` (the plan's `[sidecar.multi_region]`): cross-region receipt sync; checked by
/// [`crate::sync::SyncSettings::from_section`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiRegionSection {
    /// This node's region.
    pub region: Option<String>,
    /// The primary region.
    pub primary_region: Option<String>,
    /// Replicate receipts to the other regions.
    pub cross_region_sync_enabled: Option<bool>,
    /// Witness endpoints (`https://HOST:PORT`; `http://` for plaintext on loopback).
    pub receipt_sync_endpoints: Option<Vec<String>>,
    /// Witness cosignatures a checkpoint needs (default: a majority of the witnesses).
    pub quorum: Option<usize>,
    /// Accepted for compatibility; witnesses receive checkpoints, not receipt batches
    /// (1-10000).
    pub batch_size: Option<usize>,
    /// Wait this long after new checkpoints before pushing (default 20 ms).
    pub batch_linger_ms: Option<u64>,
    /// Per-call timeout towards a witness (default 5000 ms).
    pub timeout_ms: Option<u64>,
    /// Pinned witness keys, C2SP verifier keys `NAME+KEYID+BASE64` (type 0x04); empty: each
    /// witness's key is learned on first contact and kept.
    pub witness_keys: Option<Vec<String>>,
}

/// `[promotion]` (the plan's `[sidecar.promotion]`): the node's ring in a fleet rollout, the
/// feature flags enabled on it, and the defaults of the rollouts it runs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionSection {
    /// The node's ring: `canary`, `staging` or `production` (default).
    pub environment: Option<crate::model::Ring>,
    /// The canary ring's share of its workloads, in percent (default 5): it holds there until
    /// promoted.
    pub traffic_percent: Option<f64>,
    /// The feature flags enabled on this node (`heat_tracking`, `latency_histograms`,
    /// `verdict_events`); when given, it decides those three.
    pub feature_flags: Option<Vec<crate::model::FeatureFlag>>,
    /// Roll back automatically when a gate fails (default true); otherwise the rollout pauses.
    pub auto_rollback_enabled: Option<bool>,
    /// Fraction of a step's beats in which the candidate must meet every class's SLO (0..1,
    /// default 0.95).
    pub slo_threshold: Option<f64>,
    /// Default rollout steps, increasing percentages (default [1, 5, 25, 100]).
    pub steps: Option<Vec<f64>>,
    /// Beats each step is held and analysed (default 20).
    pub beats_per_step: Option<u32>,
    /// The deny-rate gate: fail when the candidate denies more than this many times the stable
    /// side's rate (default 10).
    pub deny_rate_factor: Option<f64>,
    /// Decisions the candidate needs in a step before its deny rate is judged (default 100).
    pub min_decisions: Option<u64>,
}

/// `[kubernetes]`: discover the node's pods from its container runtime, so rules can select
/// workloads by namespace, labels and container name.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSection {
    /// The CRI socket (default: the first of containerd's and CRI-O's standard sockets that
    /// exists).
    pub cri_socket: Option<PathBuf>,
    /// How the kubelet names pod cgroups (default: detected from the cgroup tree).
    pub cgroup_driver: Option<CgroupDriver>,
    /// The cgroup under which pods live, relative to `agent.cgroup_root` (default `kubepods`, or
    /// `kubepods.slice` with the systemd driver).
    pub kubepods_root: Option<crate::model::CgroupPath>,
    /// This node's name (default: the `NODE_NAME` environment variable); informational.
    pub node_name: Option<String>,
    /// What a pod's connects get before the agent has classified the pod: `allow` (judged by
    /// the rules as any cgroup; default), `deny` or `audit`.
    pub unknown_pod_action: Option<crate::model::Action>,
    /// How often the whole pod list is read again besides watching the cgroup tree, in ms
    /// (100-600000, default 5000).
    pub resync_interval_ms: Option<u64>,
}

/// The kubelet's cgroup driver: how pod and container cgroups are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// `kubepods/<qos>/pod<uid>/<container id>`.
    Cgroupfs,
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/cri-containerd-<id>.scope`.
    Systemd,
}

/// The file as written, before aliases are resolved.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    agent: Option<Spanned<RawAgentTable>>,
    sidecar: Option<Spanned<RawAgentTable>>,
    policy: Option<Spanned<RawPolicy>>,
    slo: Option<Spanned<SloSection>>,
    spiffe: Option<Spanned<SpiffeSection>>,
    kms: Option<Spanned<KmsSection>>,
    receipts: Option<Spanned<ReceiptsSection>>,
    multi_region: Option<Spanned<MultiRegionSection>>,
    promotion: Option<Spanned<PromotionSection>>,
    kubernetes: Option<Spanned<KubernetesSection>>,
    telemetry: Option<Spanned<TelemetrySection>>,
    bundle: Option<Spanned<super::settings::BundleSection>>,
    archive: Option<Spanned<super::settings::ArchiveSection>>,
}

/// Takes the one of a top-level section and its nested alias that is present; both is an error.
fn one_of<T>(
    top: Option<Spanned<T>>,
    nested: Option<Spanned<T>>,
    name: &str,
    table: &str,
    err: &dyn Fn(usize, String, String) -> ConfigError,
) -> Result<Option<Spanned<T>>, ConfigError> {
    match (top, nested) {
        (Some(_), Some(n)) => Err(err(
            n.span().start,
            format!("{table}.{name}"),
            format!("[{name}] is also given at the top level; keep one of the two"),
        )),
        (t, n) => Ok(t.or(n)),
    }
}

impl RawConfig {
    /// Resolves aliases and checks what spans several values.
    pub(super) fn normalize(self, text: &str, origin: &str) -> Result<Config, ConfigError> {
        let err = |pos: usize, key: String, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            line: line_of(text, pos),
            key,
            message,
        };
        let (table_name, table) = match (self.agent, self.sidecar) {
            (Some(_), Some(s)) => {
                return Err(err(
                    s.span().start,
                    "sidecar".into(),
                    "[sidecar] is an alias of [agent]; give one of them, not both".into(),
                ))
            }
            (Some(a), None) => ("agent", Some(a)),
            (None, Some(s)) => ("sidecar", Some(s)),
            (None, None) => ("agent", None),
        };
        let agent_pos = table.as_ref().map_or(0, |t| t.span().start);
        let (agent, nested) = match table {
            Some(t) => t.into_inner().split(),
            None => (AgentSection::default(), Nested::default()),
        };
        let policy = one_of(self.policy, nested.policy, "policy", table_name, &err)?;
        let slo = one_of(self.slo, nested.slo, "slo", table_name, &err)?;
        let spiffe = one_of(self.spiffe, nested.spiffe, "spiffe", table_name, &err)?;
        let kms = one_of(self.kms, nested.kms, "kms", table_name, &err)?;
        let receipts = one_of(self.receipts, nested.receipts, "receipts", table_name, &err)?;
        let multi_region = one_of(
            self.multi_region,
            nested.multi_region,
            "multi_region",
            table_name,
            &err,
        )?;
        let promotion = one_of(
            self.promotion,
            nested.promotion,
            "promotion",
            table_name,
            &err,
        )?;

        check_agent(&agent)
            .map_err(|(key, message)| err(agent_pos, format!("{table_name}.{key}"), message))?;
        let kubernetes = match self.kubernetes {
            Some(k) => {
                let pos = k.span().start;
                let k = k.into_inner();
                check_kubernetes(&k)
                    .map_err(|(key, message)| err(pos, format!("kubernetes.{key}"), message))?;
                Some(k)
            }
            None => None,
        };
        let section_err =
            |pos: usize| move |(key, message): (String, String)| err(pos, key, message);
        let identity = match &spiffe {
            Some(s) => IdentitySettings::from_section(s.get_ref())
                .map_err(|(k, m)| (format!("spiffe.{k}"), m))
                .map_err(section_err(s.span().start))?,
            None => None,
        };
        let sync = match &multi_region {
            Some(m) => SyncSettings::from_section(m.get_ref())
                .map_err(|(k, m)| (format!("multi_region.{k}"), m))
                .map_err(section_err(m.span().start))?,
            None => None,
        };
        let region = multi_region
            .as_ref()
            .and_then(|m| m.get_ref().region.as_deref());
        let receipt_settings = match &kms {
            Some(k) => Some(
                ReceiptSettings::from_sections(
                    k.get_ref(),
                    receipts.as_ref().map(|r| r.get_ref()),
                    region,
                )
                .map_err(|(key, message)| {
                    let pos = match (&receipts, key.starts_with("receipts.")) {
                        (Some(r), true) => r.span().start,
                        _ => k.span().start,
                    };
                    err(pos, key, message)
                })?,
            ),
            None => {
                if let Some(r) = &receipts {
                    super::settings::check_receipts(r.get_ref())
                        .map_err(section_err(r.span().start))?;
                }
                None
            }
        };
        if let Some(slo) = &slo {
            check_slo(slo.get_ref())
                .map_err(|(key, message)| err(slo.span().start, format!("slo.{key}"), message))?;
        }

        let mut rules = Vec::new();
        let mut max_rules = default_max_rules();
        let mut seen = std::collections::HashMap::new();
        let policy_pos = policy.as_ref().map_or(0, |p| p.span().start);
        if let Some(p) = policy {
            let pos = p.span().start;
            let p = p.into_inner();
            max_rules = p.max_rules;
            let limit = knhk_abi::MAX_RULE_COUNTERS as usize - 1;
            if !(1..=limit).contains(&max_rules) {
                return Err(err(
                    pos,
                    "policy.max_rules".into(),
                    format!("{max_rules} is out of range (1-{limit}, the kernel's rule counters)"),
                ));
            }
            if p.rules.len() > max_rules {
                return Err(err(
                    pos,
                    "policy.rules".into(),
                    format!(
                        "{} rules exceed policy.max_rules ({max_rules})",
                        p.rules.len()
                    ),
                ));
            }
            for (i, rule) in p.rules.into_iter().enumerate() {
                let pos = rule.span().start;
                let rule = rule.into_inner();
                if let Some(first) = seen.insert(rule.name.clone(), pos) {
                    return Err(err(
                        pos,
                        format!("policy.rules[{i}].name"),
                        format!(
                            "duplicate rule name \"{}\" (first defined at line {})",
                            rule.name,
                            line_of(text, first)
                        ),
                    ));
                }
                if rule.cidrs.is_empty() {
                    return Err(err(
                        pos,
                        format!("policy.rules[{i}].cidrs"),
                        format!("rule \"{}\" has no cidrs; use [\"0.0.0.0/0\", \"::/0\"] to match every destination", rule.name),
                    ));
                }
                if let Some(depth) = rule
                    .cgroup
                    .as_ref()
                    .map(|c| c.depth())
                    .filter(|d| *d > knhk_abi::MAX_SCOPE_LEVEL as usize)
                {
                    return Err(err(
                        pos,
                        format!("policy.rules[{i}].cgroup"),
                        format!(
                            "rule \"{}\": a cgroup {depth} levels deep is deeper than the {} levels the kernel judges rules at",
                            rule.name,
                            knhk_abi::MAX_SCOPE_LEVEL
                        ),
                    ));
                }
                if let Err(e) = rule.check_subject() {
                    return Err(err(
                        pos,
                        format!("policy.rules[{i}].{}", e.split(':').next().unwrap_or("")),
                        format!(
                            "rule \"{}\": {}",
                            rule.name,
                            e.split_once(": ").map_or(e.as_str(), |(_, m)| m)
                        ),
                    ));
                }
                if rule.ports.as_ref().is_some_and(|p| p.is_empty()) {
                    return Err(err(
                        pos,
                        format!("policy.rules[{i}].ports"),
                        format!(
                            "rule \"{}\" has an empty ports list; omit the key to match every port",
                            rule.name
                        ),
                    ));
                }
                rules.push(rule);
            }
        }
        if let Some(addr) = agent.listen_address.filter(|a| !a.ip().is_loopback()) {
            if identity.is_none() {
                return Err(err(
                    agent_pos,
                    format!("{table_name}.listen_address"),
                    format!(
                        "{addr} is not a loopback address: without mTLS any host could change the policy; \
                         enable [spiffe] (enabled = true, trust_domain = ...), or remove listen_address to \
                         serve on agent.api_socket (root only)"
                    ),
                ));
            }
        }
        // The kernel's limits (sizes, entries per trie leaf) are checked here too, so that a
        // config check-config accepts does not fail at start.
        let rule_line = |name: &str| {
            rules
                .iter()
                .position(|r| r.name.as_str() == name)
                .and_then(|i| seen.get(&rules[i].name).map(|pos| (i, *pos)))
        };
        crate::policy::check_bounds(&rules).map_err(|e| {
            let at = match &e {
                crate::policy::CompileError::TooLarge { rule: Some(i), .. } => rules
                    .get(*i)
                    .and_then(|r| seen.get(&r.name))
                    .map(|pos| (format!("policy.rules[{i}]"), *pos)),
                _ => None,
            };
            let (key, pos) = at.unwrap_or_else(|| ("policy.rules".into(), policy_pos));
            err(pos, key, e.to_string())
        })?;
        // Selector rules are checked where they all meet: one pod that every one selects.
        let any_pod: crate::model::CgroupPath = "kubepods/pod-check"
            .parse()
            .map_err(|e: String| err(policy_pos, "policy.rules".into(), e))?;
        let bindings = crate::policy::Bindings {
            selected: rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.workloads().is_some())
                .map(|(i, _)| (i, std::iter::once(any_pod.clone()).collect()))
                .collect(),
            guard: None,
            owners: Default::default(),
        };
        let scopes = crate::policy::scopes_of(&rules, &bindings);
        for scope in std::iter::once(None).chain(scopes.iter().map(Some)) {
            crate::policy::compile_scope(
                &rules,
                &bindings,
                scope,
                &Default::default(),
                agent.default_class,
            )
            .map_err(|e| {
                let first = match &e {
                    crate::policy::CompileError::LeafOverflow { rules: names, .. } => {
                        names.split(", ").next().and_then(rule_line)
                    }
                    crate::policy::CompileError::TooLarge { .. } => None,
                };
                let (index, pos) = first.unwrap_or((0, policy_pos));
                err(pos, format!("policy.rules[{index}]"), e.to_string())
            })?;
        }
        let beat = slo
            .as_ref()
            .map(|s| BeatSettings::from_slo(s.get_ref(), agent.heat_top_n as usize));
        let telemetry_settings = match &self.telemetry {
            Some(t) => TelemetrySettings::from_section(t.get_ref())
                .map_err(|(k, m)| (format!("telemetry.{k}"), m))
                .map_err(section_err(t.span().start))?,
            None => None,
        };
        let promotion_settings = match &promotion {
            Some(p) => PromotionSettings::from_section(p.get_ref())
                .map_err(|(k, m)| (format!("promotion.{k}"), m))
                .map_err(section_err(p.span().start))?,
            None => PromotionSettings::default(),
        };
        let bundle = match &self.bundle {
            Some(b) => Some(
                super::settings::BundleSettings::from_section(b.get_ref(), None).map_err(
                    |(k, m, pos)| err(pos.unwrap_or(b.span().start), format!("bundle.{k}"), m),
                )?,
            ),
            None => None,
        };
        let archive = match &self.archive {
            Some(a) => {
                let settings = super::settings::ArchiveSettings::from_section(a.get_ref())
                    .map_err(|(k, m, pos)| {
                        err(pos.unwrap_or(a.span().start), format!("archive.{k}"), m)
                    })?;
                if receipt_settings.is_none() {
                    return Err(err(
                        a.span().start,
                        "archive".into(),
                        "[archive] archives the receipts ledger, and there is none: configure [kms] (and [receipts]) too".into(),
                    ));
                }
                Some(settings)
            }
            None => None,
        };
        Ok(Config {
            settings: Settings {
                beat,
                identity,
                receipts: receipt_settings,
                sync,
                telemetry: telemetry_settings,
                promotion: promotion_settings,
                bundle,
                archive,
            },
            agent,
            policy: PolicySection { max_rules, rules },
            slo: slo.map(Spanned::into_inner),
            spiffe: spiffe.map(Spanned::into_inner),
            kms: kms.map(Spanned::into_inner),
            receipts: receipts.map(Spanned::into_inner),
            multi_region: multi_region.map(Spanned::into_inner),
            promotion: promotion.map(Spanned::into_inner),
            kubernetes,
            telemetry: self.telemetry.map(Spanned::into_inner),
        })
    }
}

#[derive(Default)]
struct Nested {
    policy: Option<Spanned<RawPolicy>>,
    slo: Option<Spanned<SloSection>>,
    spiffe: Option<Spanned<SpiffeSection>>,
    kms: Option<Spanned<KmsSection>>,
    receipts: Option<Spanned<ReceiptsSection>>,
    multi_region: Option<Spanned<MultiRegionSection>>,
    promotion: Option<Spanned<PromotionSection>>,
}

impl RawAgentTable {
    fn split(self) -> (AgentSection, Nested) {
        let agent = AgentSection {
            listen_address: self.listen_address,
            api_socket: self.api_socket,
            api_socket_group: self.api_socket_group,
            state_dir: self.state_dir,
            max_request_bytes: self.max_request_bytes,
            metrics_address: self.metrics_address,
            mode: self.mode,
            default_action: self.default_action,
            default_class: self.default_class,
            cgroup_root: self.cgroup_root,
            pin_root: self.pin_root,
            heat_enabled: self.heat_enabled,
            heat_max_entries: self.heat_max_entries,
            heat_sample_every: self.heat_sample_every,
            heat_top_n: self.heat_top_n,
            rule_metrics_top_n: self.rule_metrics_top_n,
            histograms_enabled: self.histograms_enabled,
            histogram_interval_us: self.histogram_interval_us,
            cgroup_poll_interval_ms: self.cgroup_poll_interval_ms,
            detach_on_exit: self.detach_on_exit,
        };
        let nested = Nested {
            policy: self.policy,
            slo: self.slo,
            spiffe: self.spiffe,
            kms: self.kms,
            receipts: self.receipts,
            multi_region: self.multi_region,
            promotion: self.promotion,
        };
        (agent, nested)
    }
}

/// Checks on `[kubernetes]`; returns (key, message).
fn check_kubernetes(k: &KubernetesSection) -> Result<(), (&'static str, String)> {
    if let Some(ms) = k
        .resync_interval_ms
        .filter(|ms| !(100..=600_000).contains(ms))
    {
        return Err((
            "resync_interval_ms",
            format!("{ms} is outside 100-600000 (milliseconds between full reads of the pod list)"),
        ));
    }
    if let Some(p) = k.cri_socket.as_ref().filter(|p| !p.is_absolute()) {
        return Err((
            "cri_socket",
            format!(
                "\"{}\" must be an absolute path, e.g. /run/containerd/containerd.sock",
                p.display()
            ),
        ));
    }
    if k.node_name.as_deref() == Some("") {
        return Err(("node_name", "is empty; omit it to use $NODE_NAME".into()));
    }
    Ok(())
}

/// Range checks on `[slo]`; returns (key, message).
fn check_slo(s: &SloSection) -> Result<(), (&'static str, String)> {
    if s.window_beats == Some(0) {
        return Err((
            "window_beats",
            "0 is out of range: the window needs at least 1 beat".into(),
        ));
    }
    if s.heat_half_life_beats == Some(0) {
        return Err((
            "heat_half_life_beats",
            "0 is out of range: heat needs at least 1 beat to halve".into(),
        ));
    }
    if s.recover_beats == Some(0) {
        return Err((
            "recover_beats",
            "0 is out of range: recovery needs at least 1 healthy beat".into(),
        ));
    }
    if let Some(ms) = s.beat_interval_ms {
        if !(1..=60_000).contains(&ms) {
            return Err((
                "beat_interval_ms",
                format!("{ms} is out of range (1-60000)"),
            ));
        }
    }
    for (key, v) in [
        ("r1_p99_max_ns", s.r1_p99_max_ns),
        ("w1_p99_max_ms", s.w1_p99_max_ms),
        ("c1_p99_max_ms", s.c1_p99_max_ms),
    ] {
        if v == Some(0) {
            return Err((
                key,
                "0 is not a valid ceiling: no handshake is that fast; omit the key for no SLO"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// The shortest TCP handshake the kernel path measures on this kind of machine (loopback, ns).
pub const MIN_MEASURABLE_HANDSHAKE_NS: u64 = 10_000;

impl Config {
    /// Settings that are valid but probably not what the operator meant, for `check-config`
    /// and the agent's startup log.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(flags) = &self.settings.promotion.feature_flags {
            use crate::model::FeatureFlag;
            for (key, value, flag) in [
                (
                    "heat_enabled",
                    self.agent.heat_enabled,
                    FeatureFlag::HeatTracking,
                ),
                (
                    "histograms_enabled",
                    self.agent.histograms_enabled,
                    FeatureFlag::LatencyHistograms,
                ),
            ] {
                if value != flags.contains(&flag) {
                    out.push(format!(
                        "agent.{key} = {value} is overridden by promotion.feature_flags, which {} {}",
                        if flags.contains(&flag) { "lists" } else { "does not list" },
                        flag.as_str()
                    ));
                }
            }
        }
        if let Some(slo) = &self.slo {
            for (key, ns) in [
                ("r1_p99_max_ns", slo.r1_p99_max_ns),
                (
                    "w1_p99_max_ms",
                    slo.w1_p99_max_ms.map(|ms| ms.saturating_mul(1_000_000)),
                ),
                (
                    "c1_p99_max_ms",
                    slo.c1_p99_max_ms.map(|ms| ms.saturating_mul(1_000_000)),
                ),
            ] {
                if let Some(ns) = ns.filter(|ns| *ns < MIN_MEASURABLE_HANDSHAKE_NS) {
                    out.push(format!(
                        "slo.{key}: a ceiling of {ns} ns is below what a TCP handshake can take (about {} µs even on loopback): \
                         every timed connect of that class breaches, so colder classes stay shed while it has traffic",
                        MIN_MEASURABLE_HANDSHAKE_NS / 1000
                    ));
                }
            }
            let r1_unmeetable = slo
                .r1_p99_max_ns
                .is_some_and(|ns| ns < MIN_MEASURABLE_HANDSHAKE_NS);
            if r1_unmeetable
                && slo.admission_strategy.unwrap_or(AdmissionStrategy::Strict)
                    == AdmissionStrategy::Strict
            {
                out.push(
                    "slo.admission_strategy: with \"strict\" and an R1 ceiling no handshake can meet, every class \
                     is paused within three beats of R1 traffic (C1, then W1, then R1 itself): every new connect is \
                     refused; raise slo.r1_p99_max_ns (nanoseconds) or use \"degrade\""
                        .into(),
                );
            }
            if self.agent.mode == Mode::Audit {
                out.push("slo: in audit mode class states are computed and exported but nothing is refused".into());
            }
        }
        if self.kubernetes.is_none() {
            if let Some((i, r)) = self
                .policy
                .rules
                .iter()
                .enumerate()
                .find(|(_, r)| r.workloads().is_some())
            {
                out.push(format!(
                    "policy.rules[{i}] (\"{}\") selects workloads, but there is no [kubernetes] section: \
                     without workload discovery it applies to no pod; add [kubernetes]",
                    r.name
                ));
            }
        }
        let identity = self.settings.identity.as_ref();
        match self.api_listen() {
            ApiListen::Tcp(addr) if identity.is_none() => out.push(format!(
                "agent.listen_address = {addr}: the API is plaintext TCP without authentication: any local \
                 user (every process on this host) can change the policy; remove listen_address to serve on \
                 agent.api_socket ({}, root only), or enable [spiffe]",
                self.agent.api_socket.display()
            )),
            ApiListen::Tcp(addr) if !addr.ip().is_loopback() => {
                if let Some(id) = identity.filter(|id| id.access.policy_writers.is_empty()) {
                    out.push(format!(
                        "spiffe.authorized_ids.policy_writers is empty: the API on {addr} accepts mTLS peers of {:?}, \
                         but none may apply or roll back a policy; name the operators' SPIFFE IDs there",
                        id.trust_domain.as_str()
                    ));
                }
            }
            _ => {}
        }
        if let (Some(group), ApiListen::Tcp(_)) = (&self.agent.api_socket_group, self.api_listen())
        {
            out.push(format!(
                "agent.api_socket_group = {group:?} has no effect: the API is on TCP (agent.listen_address or [spiffe]), not on agent.api_socket"
            ));
        }
        if let Some(sync) = &self.settings.sync {
            let tls_peers: Vec<&str> = sync
                .peers
                .iter()
                .filter(|p| p.tls)
                .map(|p| p.endpoint.as_str())
                .collect();
            match identity {
                None if !tls_peers.is_empty() => out.push(format!(
                    "multi_region.receipt_sync_endpoints: {} use https://, which needs this agent's SVID, but \
                     [spiffe] is not enabled: every push to them fails and quorum is never reached",
                    tls_peers.join(", ")
                )),
                Some(id) if id.access.region_peers.is_empty() => out.push(
                    "spiffe.authorized_ids.region_peers is empty: any SPIFFE ID of the accepted trust domains \
                     is accepted as a witness; list the witnesses' IDs (e.g. spiffe://example.org/knhk/witness/*)"
                        .into(),
                ),
                _ => {}
            }
        }
        if let Some(primary) = self
            .multi_region
            .as_ref()
            .and_then(|m| m.primary_region.as_deref())
        {
            out.push(format!(
                "multi_region.primary_region = {primary:?} has no effect: every node writes its own log and a \
                 checkpoint commits once `quorum` witnesses cosign it; there is no primary"
            ));
        }
        if let Some(crate::config::SignerSettings::Aws { key_id, .. }) =
            self.settings.receipts.as_ref().map(|r| &r.signer)
        {
            if !key_id.starts_with("alias/") {
                let hours = self
                    .settings
                    .receipts
                    .as_ref()
                    .map_or(24, |r| r.rotation_interval.as_secs() / 3600);
                out.push(format!(
                    "kms.key_id {key_id:?} names one key: rotation creates a new key and moves an alias to it, \
                     so with a key ARN or id the agent cannot rotate and /readyz fails after {hours} h \
                     (kms.rotation_interval_hours); use an alias (alias/NAME)"
                ));
            }
        }
        out
    }
}

/// Where the gRPC API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiListen {
    /// TCP: mTLS with `[spiffe]`, else plaintext on loopback (`listen_address` set explicitly).
    Tcp(SocketAddr),
    /// A Unix socket (`api_socket`), for root and members of `group`.
    Unix {
        /// The socket's path.
        path: PathBuf,
        /// `api_socket_group`.
        group: Option<String>,
    },
}

impl ApiListen {
    /// The endpoint for a client: `http://ADDR` or `unix:///PATH`.
    pub fn url(&self) -> String {
        match self {
            ApiListen::Tcp(addr) => format!("http://{addr}"),
            ApiListen::Unix { path, .. } => format!("unix://{}", path.display()),
        }
    }
}

impl Config {
    /// Where the gRPC API listens: TCP with `[spiffe]` (mTLS; `listen_address`, default
    /// 127.0.0.1:50051) or when `listen_address` is set, else the Unix socket `api_socket`.
    pub fn api_listen(&self) -> ApiListen {
        match (self.agent.listen_address, &self.settings.identity) {
            (Some(addr), _) => ApiListen::Tcp(addr),
            (None, Some(_)) => ApiListen::Tcp(DEFAULT_LISTEN_ADDRESS),
            (None, None) => ApiListen::Unix {
                path: self.agent.api_socket.clone(),
                group: self.agent.api_socket_group.clone(),
            },
        }
    }
}

/// The longest Unix socket path (`sun_path` holds 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Range checks on `[agent]`; returns (key, message).
fn check_agent(a: &AgentSection) -> Result<(), (&'static str, String)> {
    if !(1..=1 << 24).contains(&a.heat_max_entries) {
        return Err((
            "heat_max_entries",
            format!("{} is out of range (1-16777216)", a.heat_max_entries),
        ));
    }
    if !a.heat_sample_every.is_power_of_two() || a.heat_sample_every > 1024 {
        return Err((
            "heat_sample_every",
            format!(
                "{} is not a power of two from 1 to 1024 (e.g. 1, 16, 64)",
                a.heat_sample_every
            ),
        ));
    }
    if !(1024..=1 << 30).contains(&a.max_request_bytes) {
        return Err((
            "max_request_bytes",
            format!("{} is out of range (1024-1073741824)", a.max_request_bytes),
        ));
    }
    if !(1..=1000).contains(&a.heat_top_n) {
        return Err((
            "heat_top_n",
            format!("{} is out of range (1-1000)", a.heat_top_n),
        ));
    }
    if a.rule_metrics_top_n > 1000 {
        return Err((
            "rule_metrics_top_n",
            format!("{} is out of range (0-1000)", a.rule_metrics_top_n),
        ));
    }
    if a.histogram_interval_us > 60_000_000 {
        return Err((
            "histogram_interval_us",
            format!("{} is out of range (0-60000000)", a.histogram_interval_us),
        ));
    }
    if !(1..=10_000).contains(&a.cgroup_poll_interval_ms) {
        return Err((
            "cgroup_poll_interval_ms",
            format!("{} is out of range (1-10000)", a.cgroup_poll_interval_ms),
        ));
    }
    if !a.pin_root.is_absolute() {
        return Err((
            "pin_root",
            format!("{} must be an absolute path", a.pin_root.display()),
        ));
    }
    if let Some(root) = &a.cgroup_root {
        if !root.is_absolute() {
            return Err((
                "cgroup_root",
                format!("{} must be an absolute path", root.display()),
            ));
        }
    }
    if !a.state_dir.is_absolute() {
        return Err((
            "state_dir",
            format!("{} must be an absolute path", a.state_dir.display()),
        ));
    }
    let socket = &a.api_socket;
    if !socket.is_absolute()
        || socket.file_name().is_none()
        || socket.as_os_str().as_encoded_bytes().ends_with(b"/")
    {
        return Err((
            "api_socket",
            format!(
                "{} must be an absolute path to a socket file, e.g. {DEFAULT_API_SOCKET}",
                socket.display()
            ),
        ));
    }
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err((
            "api_socket",
            format!(
                "{} is {len} bytes long: a Unix socket path holds at most {MAX_SOCKET_PATH}",
                socket.display()
            ),
        ));
    }
    if let Some(group) = &a.api_socket_group {
        let valid = !group.is_empty()
            && group.len() <= 32
            && !group.starts_with('-')
            && group
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid {
            return Err((
                "api_socket_group",
                format!(
                    "{group:?} is not a group name (1-32 of A-Z a-z 0-9 _ - ., not starting with -)"
                ),
            ));
        }
    }
    Ok(())
}
