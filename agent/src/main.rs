//! The `knhk-agent` command line. Dispatch only: the work happens in the library.

use clap::{Parser, Subcommand, ValueEnum};
use knhk_agent::{agent, client, config::Config, datapath};
use std::{path::PathBuf, process::ExitCode};

/// Exit code for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code of `run` when the receipts ledger does not verify (EX_DATAERR): nothing attached.
const EXIT_LEDGER_UNVERIFIED: u8 = 65;
/// Exit code when the kernel datapath cannot start (EX_UNAVAILABLE).
const EXIT_DATAPATH: u8 = 69;

#[derive(Parser)]
#[command(
    name = "knhk-agent",
    version,
    about = "eBPF node agent for SLO-driven connection admission",
    long_about = "knhk-agent loads eBPF programs that admit or refuse every connect() on the node \
                  according to a policy, records handshake latency and destination heat, and exports \
                  them as Prometheus metrics. With [slo] it sheds colder runtime classes when a hotter one \
                  breaches its latency SLO; with [spiffe] its gRPC API is mTLS with SPIFFE-ID authorization; \
                  with [kms] it keeps a signed receipts ledger of its decisions; with [multi_region] it \
                  pushes that ledger's checkpoints to witnesses (knhk-agent witness), which cosign them.",
    after_help = "Exit codes: 0 success; 1 other error (receipts verify: the ledger does not verify); 64 invalid configuration \
                  or policy file, unusable identity files or key, a request the agent refused as invalid that is not a \
                  policy (nothing changed); 65 the agent refused the policy as invalid (client commands), or (run) the receipts \
                  ledger does not verify and nothing was attached; 69 kernel datapath unavailable \
                  (run) or agent unreachable or silent past --timeout (client commands); 75 stale --expected-generation \
                  or nothing to roll back."
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the programs, apply the policy, and serve metrics until SIGINT/SIGTERM.
    #[command(
        after_help = "Examples:\n  knhk-agent run                         # embedded default: audit mode, API on /run/knhk/agent.sock\n  knhk-agent run --config /etc/knhk/agent.toml"
    )]
    Run {
        /// Configuration file (TOML). Without it, the embedded default is used.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file without touching the kernel.
    #[command(
        after_help = "Examples:\n  knhk-agent check-config /etc/knhk/agent.toml\n  knhk-agent check-config agent.toml --output json"
    )]
    CheckConfig {
        /// Configuration file (TOML).
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
    },
    /// Detach the programs: remove knhk's own pins (only those, never following a symlink; a
    /// DIR that is not on bpffs is refused). Enforcement stops.
    #[command(
        after_help = "Examples:\n  knhk-agent detach\n  knhk-agent detach --pin-root /sys/fs/bpf/knhk"
    )]
    Detach {
        /// bpffs directory holding the pins (default: agent.pin_root of --config, else /sys/fs/bpf/knhk).
        #[arg(long)]
        pin_root: Option<PathBuf>,
        /// Take pin_root from this configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
    },
    /// Print the embedded default configuration.
    DefaultConfig {
        /// Output format (json: {"toml": TEXT}).
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
    },
    /// Work with a receipts ledger.
    #[command(subcommand)]
    Receipts(ReceiptsCommand),
    /// Legal holds on receipts of a running agent (over gRPC).
    #[command(subcommand)]
    Hold(HoldCommand),
    /// Fleet bundles: sign a policy (with its rollout and flags) and publish it to S3-compatible
    /// storage, where every node with a [bundle] section follows it.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Read or change the live policy of a running agent (over gRPC).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run a receipts witness: verify and cosign the checkpoints of every node log that pushes
    /// to it (C2SP tlog-witness over HTTP; docs/multi-region.md). One per region.
    Witness {
        /// The witness's name: its key name in cosignatures (no spaces or '+'), e.g.
        /// "witness.us-east-1.example.com".
        #[arg(long)]
        name: String,
        /// Address to serve on.
        #[arg(long, default_value = "127.0.0.1:7380")]
        listen: std::net::SocketAddr,
        /// Also serve /metrics and /healthz in plaintext here (for Prometheus, which cannot
        /// present an SVID to the mTLS port).
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        /// The witness's state (redb file): each origin's keys and newest cosigned checkpoint.
        #[arg(long, default_value = "/var/lib/knhk-witness/witness.redb")]
        state: PathBuf,
        /// Ed25519 key file, created when missing (development; use --vault-key in production).
        #[arg(
            long,
            conflicts_with = "vault_key",
            required_unless_present = "vault_key"
        )]
        key_file: Option<PathBuf>,
        /// An ed25519 transit key in OpenBao/Vault (created when missing); token from $VAULT_TOKEN.
        #[arg(long, requires = "vault_addr")]
        vault_key: Option<String>,
        /// OpenBao/Vault address.
        #[arg(long, env = "VAULT_ADDR")]
        vault_addr: Option<String>,
        /// Transit mount.
        #[arg(long, default_value = "transit")]
        vault_mount: String,
        /// Serve mTLS with the SVID of this configuration's [spiffe] section; callers must match
        /// spiffe.authorized_ids.region_peers. Without it: plaintext, loopback only.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the witness's verifier key (what nodes pin in multi_region.witness_keys) and exit.
        #[arg(long)]
        print_key: bool,
    },
    /// Roll a candidate policy or feature flags out to a running agent's workloads step by step,
    /// gated on SLOs (over gRPC; see docs/promotion.md).
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Programs, attach point, policy generation, rule cgroups and decisions of a running agent.
    #[command(after_help = "Example:\n  knhk-agent status --output json")]
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The hottest destinations of a running agent, or per pod the hottest (pod, destination)
    /// pairs.
    #[command(
        after_help = "Examples:\n  knhk-agent heat --limit 5\n  knhk-agent heat --by-pod\n  knhk-agent heat --pod payments/api-0 --output json"
    )]
    Heat {
        /// How many (0: the agent's agent.heat_top_n).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// One row per pod and destination: the attempts each pod's rule scope decided (needs
        /// [kubernetes] and rules that select the pods; other attempts show no pod).
        #[arg(long)]
        by_pod: bool,
        /// Only this pod's rows, NAMESPACE/NAME (implies --by-pod).
        #[arg(long)]
        pod: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Measured latency per class against the [slo] ceilings, from a running agent.
    #[command(after_help = "Example:\n  knhk-agent slo")]
    Slo {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Which rule of a running agent's live kernel tables decides a connect, and why.
    #[command(
        after_help = "Examples:\n  knhk-agent explain --cgroup kubepods/besteffort/pod1 10.0.0.5:5432/tcp\n  knhk-agent explain --cgroup . [fd00::1]:53/udp --output json\n  knhk-agent explain --pod payments/api-0 10.0.0.5:5432/tcp"
    )]
    Explain {
        /// The connecting cgroup, relative to agent.cgroup_root ("." for the root). It must exist.
        #[arg(long, default_value = ".")]
        cgroup: String,
        /// Instead of --cgroup: a pod on this node, NAMESPACE/NAME (needs [kubernetes]).
        #[arg(long, conflicts_with = "cgroup")]
        pod: Option<String>,
        /// DEST:PORT/PROTO, e.g. 10.0.0.5:5432/tcp or [fd00::1]:53/udp (PROTO: tcp or udp, default tcp).
        destination: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Kernel verdicts (deny, audit, shed, park) and agent events of a running agent, as they
    /// happen: at most one verdict per rule per 10 ms is reported (the rest are counted).
    #[command(
        after_help = "Examples:\n  knhk-agent events --follow\n  knhk-agent events --follow --action deny --cgroup kubepods/besteffort\n  knhk-agent events --follow --output json --count 100"
    )]
    Events {
        /// Keep streaming until interrupted (or --count); without it, print what arrives in
        /// --wait seconds and exit.
        #[arg(long)]
        follow: bool,
        /// Without --follow: how long to listen, seconds.
        #[arg(long, default_value_t = 1.0)]
        wait: f64,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Only kernel verdicts (no policy, class-state and cgroup events).
        #[arg(long)]
        only_verdicts: bool,
        /// No kernel verdicts (policy, class-state and cgroup events only).
        #[arg(long, conflicts_with = "only_verdicts")]
        no_verdicts: bool,
        /// Only verdicts with this action (repeatable): deny, audit, shed, park.
        #[arg(long = "action", value_name = "ACTION")]
        actions: Vec<String>,
        /// Only verdicts from this cgroup or below (relative to agent.cgroup_root).
        #[arg(long)]
        cgroup: Option<String>,
        /// Only verdicts decided by this rule.
        #[arg(long)]
        rule: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Options of every client command.
#[derive(clap::Args)]
struct ClientArgs {
    /// gRPC endpoint of the agent: unix:///PATH (a Unix socket) or http://HOST:PORT [default:
    /// the API of --config (agent.api_socket, or agent.listen_address when set or with
    /// [spiffe]), else unix:///run/knhk/agent.sock].
    #[arg(long, env = "KNHK_ENDPOINT")]
    endpoint: Option<String>,
    /// Take the endpoint (agent.api_socket or agent.listen_address) and, with [spiffe] enabled,
    /// mTLS settings from this configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Use mTLS with this client's SVID from the SPIFFE Workload API at PATH (a socket path or
    /// unix: URI) [default with --config and [spiffe] enabled: its spiffe_socket_path].
    #[arg(long, value_name = "PATH")]
    spiffe_socket: Option<String>,
    /// With mTLS: the SPIFFE ID the agent must present (exact, or a prefix ending in /*)
    /// [default: spiffe.spiffe_id of --config, else any ID of the trust domain].
    #[arg(long, value_name = "SPIFFE_ID")]
    agent_id: Option<String>,
    /// Give up when the agent has not accepted the connection, or not answered, within this
    /// many seconds (exit 69) [default: 5; 30 for policy apply, diff and rollback].
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    timeout: Option<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
}

/// `--timeout`: positive seconds, at most a day.
fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a timeout: give seconds, more than 0 and at most 86400"
        )),
    }
}

impl ClientArgs {
    /// Where and how to reach the agent: `--endpoint`, else the configuration's API, else the
    /// default socket; mTLS with `--spiffe-socket`, or when the configuration enables [spiffe].
    fn target(&self, default_timeout: std::time::Duration) -> Result<client::Target, ExitCode> {
        let config = match &self.config {
            Some(path) => Some(load(Some(path))?),
            None => None,
        };
        let endpoint = match (&self.endpoint, &config) {
            (Some(e), _) => e.clone(),
            (None, Some(c)) => c.api_listen().url(),
            (None, None) => format!("unix://{}", knhk_agent::config::DEFAULT_API_SOCKET),
        };
        if let Err(e) = client::parse_endpoint(&endpoint) {
            eprintln!("error: --endpoint: {e}");
            return Err(ExitCode::from(EXIT_CONFIG));
        }
        let identity = config.and_then(|c| c.settings.identity);
        let agent_ids = match &self.agent_id {
            Some(id) => match knhk_agent::model::spiffe::IdMatcher::parse(id) {
                Ok(m) => vec![m],
                Err(e) => {
                    eprintln!("error: --agent-id: {e}");
                    return Err(ExitCode::from(EXIT_CONFIG));
                }
            },
            None => identity
                .as_ref()
                .and_then(|s| s.expected_id.clone())
                .map(knhk_agent::model::spiffe::IdMatcher::Exact)
                .into_iter()
                .collect(),
        };
        let workload_api = match (&self.spiffe_socket, &identity) {
            (Some(p), _) if p.starts_with("unix:") => Some(p.clone()),
            (Some(p), _) => Some(format!("unix:{p}")),
            (None, Some(s)) => Some(s.endpoint()),
            (None, None) => None,
        };
        Ok(client::Target {
            timeout: self
                .timeout
                .map_or(default_timeout, std::time::Duration::from_secs_f64),
            endpoint,
            mtls: workload_api.map(|workload_api| client::ClientMtls {
                workload_api,
                trust_domains: identity
                    .as_ref()
                    .map(|s| s.accepted_trust_domains())
                    // No [spiffe]: no trust domains (plaintext).
                    .unwrap_or_default(),
                agent_ids,
            }),
        })
    }
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Replace the live policy with the [[policy.rules]] of FILE (and its [agent] mode,
    /// default_action, default_class when given). Enforced when the command returns.
    #[command(
        after_help = "Examples:\n  knhk-agent policy apply policy.toml\n  knhk-agent policy apply policy.toml --expected-generation 7"
    )]
    Apply {
        /// Policy file (the configuration format).
        file: PathBuf,
        /// Refuse unless this is the live generation (guards against concurrent writers).
        #[arg(long)]
        expected_generation: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the live generation and its rules.
    #[command(after_help = "Example:\n  knhk-agent policy get --output json")]
    Get {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show what applying FILE would change, without applying it.
    #[command(after_help = "Example:\n  knhk-agent policy diff policy.toml")]
    Diff {
        /// Policy file.
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Apply the previous generation's document again, as a new generation.
    #[command(after_help = "Example:\n  knhk-agent policy rollback")]
    Rollback {
        /// Refuse unless this is the live generation.
        #[arg(long)]
        expected_generation: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn rollout_command(cmd: RolloutCommand) -> ExitCode {
    use client::RolloutAction as A;
    let (c, action, reason) = match cmd {
        RolloutCommand::Start {
            file,
            flags,
            steps,
            beats_per_step,
            seed,
            client: c,
        } => {
            let flags = flags.map(|f| {
                if f == "none" {
                    Vec::new()
                } else {
                    f.split(',').map(|s| s.trim().to_owned()).collect()
                }
            });
            let start = client::RolloutStart {
                file,
                flags,
                steps,
                beats_per_step,
                seed,
            };
            return policy_command(&c, move |e| async move {
                client::rollout_start(&e, &start).await
            });
        }
        RolloutCommand::Status { client: c } => (c, A::Status, None),
        RolloutCommand::Promote { client: c } => (c, A::Promote, None),
        RolloutCommand::Pause { reason, client: c } => (c, A::Pause, reason),
        RolloutCommand::Resume { client: c } => (c, A::Resume, None),
        RolloutCommand::Abort { reason, client: c } => (c, A::Abort, reason),
    };
    policy_command(&c, move |e| async move {
        client::rollout(&e, action, reason).await
    })
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Start a rollout of the [[policy.rules]] of FILE (and/or new feature flags). The
    /// candidate reaches the steps' shares of workloads beat by beat and is rolled back when a
    /// gate fails.
    #[command(
        after_help = "Examples:\n  knhk-agent rollout start policy.toml\n  knhk-agent rollout start policy.toml --steps 1,5,25,100 --beats-per-step 50\n  knhk-agent rollout start --flags heat_tracking,verdict_events"
    )]
    Start {
        /// Candidate policy file (the configuration format); omit to roll out flags only.
        #[arg(required_unless_present = "flags")]
        file: Option<PathBuf>,
        /// The candidate's feature flags, comma-separated (heat_tracking, latency_histograms,
        /// verdict_events); "none" turns every flag off.
        #[arg(long)]
        flags: Option<String>,
        /// Steps in percent of workloads, increasing, comma-separated (default: [promotion] steps).
        #[arg(long, value_delimiter = ',')]
        steps: Vec<f64>,
        /// Beats each step is held (default: [promotion] beats_per_step).
        #[arg(long, default_value_t = 0)]
        beats_per_step: u32,
        /// The split's seed (default: the candidate's digest, so every node agrees).
        #[arg(long)]
        seed: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The running (or last) rollout: step, share, gates, workloads.
    #[command(after_help = "Example:\n  knhk-agent rollout status --output json")]
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make the candidate the live generation now.
    Promote {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop analysing beats; the split stays as it is.
    Pause {
        /// Why.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Analyse the current step again from its start.
    Resume {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Put the candidate back to 0 % now.
    Abort {
        /// Why.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Check, sign and upload a bundle. The policy is checked as a node will check it; the
    /// signature (ECDSA P-256 / SHA-256) is made by a receipts signer: a local key directory
    /// (development) or an AWS KMS ECC_NIST_P256 key. With --out the signed object is also
    /// written to a file; with --no-upload only written.
    #[command(
        after_help = "Examples:\n  knhk-agent bundle publish --policy policy.toml --url s3://fleet/prod/bundle.json --kms-key-id alias/knhk-bundles\n  knhk-agent bundle publish --policy policy.toml --flags flags.toml --url s3://fleet/dev/bundle.json \\\n      --endpoint-url http://127.0.0.1:9000 --key-dir ./dev-key\n  knhk-agent bundle publish --policy policy.toml --key-dir ./dev-key --out bundle.json --no-upload"
    )]
    Publish {
        /// The policy: a configuration file ([agent] mode, default_action, default_class and
        /// [[policy.rules]]).
        #[arg(long)]
        policy: PathBuf,
        /// The rollout, a TOML file (carried in the bundle).
        #[arg(long)]
        rollout: Option<PathBuf>,
        /// Feature flags, a TOML file (carried in the bundle).
        #[arg(long)]
        flags: Option<PathBuf>,
        /// Free text stored with the bundle (who, why).
        #[arg(long)]
        comment: Option<String>,
        /// Where: s3://BUCKET/KEY (required unless --no-upload).
        #[arg(long, required_unless_present = "no_upload")]
        url: Option<String>,
        /// The S3 API endpoint (default: AWS's).
        #[arg(long, env = "AWS_ENDPOINT_URL_S3")]
        endpoint_url: Option<String>,
        /// The region.
        #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
        region: String,
        /// Path-style addressing (default: on with --endpoint-url).
        #[arg(long)]
        force_path_style: Option<bool>,
        /// Sign with the development key in this directory (v1.pem, ...; created if empty).
        #[arg(
            long,
            conflicts_with = "kms_key_id",
            required_unless_present = "kms_key_id"
        )]
        key_dir: Option<PathBuf>,
        /// Sign with this AWS KMS key (id, ARN or alias; ECC_NIST_P256, SIGN_VERIFY).
        #[arg(long)]
        kms_key_id: Option<String>,
        /// A KMS-compatible endpoint for --kms-key-id (default: AWS's).
        #[arg(long, env = "AWS_ENDPOINT_URL_KMS")]
        kms_endpoint_url: Option<String>,
        /// Also write the signed object here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Do not upload (with --out: sign only).
        #[arg(long, requires = "out")]
        no_upload: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
    },
    /// Print the public key (PEM) of a signing key, for [bundle] public_key_file.
    #[command(
        after_help = "Examples:\n  knhk-agent bundle public-key --key-dir ./dev-key > bundle-key.pem\n  knhk-agent bundle public-key --kms-key-id alias/knhk-bundles"
    )]
    PublicKey {
        /// The development key directory.
        #[arg(
            long,
            conflicts_with = "kms_key_id",
            required_unless_present = "kms_key_id"
        )]
        key_dir: Option<PathBuf>,
        /// An AWS KMS key.
        #[arg(long)]
        kms_key_id: Option<String>,
        /// The region of --kms-key-id.
        #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
        region: String,
        /// A KMS-compatible endpoint for --kms-key-id.
        #[arg(long, env = "AWS_ENDPOINT_URL_KMS")]
        kms_endpoint_url: Option<String>,
    },
}

#[derive(Subcommand)]
enum HoldCommand {
    /// Place a legal hold: receipts it covers are never compacted. Give at least one limit.
    #[command(
        after_help = "Examples:\n  knhk-agent hold place --case-id CASE-7 --reason litigation --from-seq 1000 --to-seq 2000\n  knhk-agent hold place --case-id AUDIT-2026 --reason 'annual audit' --kind policy_switch"
    )]
    Place {
        /// Case identifier.
        #[arg(long)]
        case_id: String,
        /// Why the receipts must be kept.
        #[arg(long)]
        reason: String,
        /// First receipt held.
        #[arg(long, requires = "to_seq")]
        from_seq: Option<u64>,
        /// First receipt after the held range.
        #[arg(long, requires = "from_seq")]
        to_seq: Option<u64>,
        /// Hold receipts written from this time (seconds since the epoch).
        #[arg(long, requires = "to_unix")]
        from_unix: Option<i64>,
        /// ... until this time (exclusive).
        #[arg(long, requires = "from_unix")]
        to_unix: Option<i64>,
        /// Only receipts of this kind (policy_switch, class_state, cycle_summary, key_rotation, hold_placed, hold_released, rollout, bundle).
        #[arg(long)]
        kind: Option<String>,
        /// Only receipts of this region.
        #[arg(long)]
        region: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Release a hold (its receipts become subject to retention again).
    #[command(after_help = "Example:\n  knhk-agent hold release 3 --reason 'case closed'")]
    Release {
        /// Hold id.
        id: u64,
        /// Why.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List holds, active and released.
    #[command(after_help = "Example:\n  knhk-agent hold list --output json")]
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum ReceiptsCommand {
    /// List receipts of a running agent, from a sequence number.
    #[command(after_help = "Example:\n  knhk-agent receipts list --from 0 --limit 20")]
    List {
        /// First sequence number.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// How many (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The key history of a running agent's ledger: every signing key with its fingerprint
    /// (compare the first with your KMS, or pass it to `receipts verify --trusted-key`).
    #[command(after_help = "Example:\n  knhk-agent receipts keys --output json")]
    Keys {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Checkpoints of a running agent's ledger, from a number, with their witnesses'
    /// cosignatures.
    #[command(after_help = "Example:\n  knhk-agent receipts checkpoints --from 0 --limit 20")]
    Checkpoints {
        /// First checkpoint number.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// How many (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Verify a ledger offline with only its public keys: every receipt against its payload
    /// hash, every tree node, every checkpoint's root and signature, the key-transition chain.
    /// Without --trusted-key that is internal consistency only (a copy re-signed with another
    /// key passes), and the output says so; with it, the newest signed checkpoint must be
    /// signed by a trusted key or one handed over from it. The file is opened read-only and
    /// never written. Exit 0 when it verifies, 1 with the first bad entry named otherwise (or
    /// when the file is not a readable ledger), 64 when the file cannot be opened (missing, not
    /// a regular file, held by a running agent) or a --trusted-key is unusable.
    #[command(
        after_help = "Examples:\n  knhk-agent receipts verify --db /var/lib/knhk/receipts.redb\n  knhk-agent receipts verify --db receipts.redb --trusted-key sha256:3f1c...e0\n  knhk-agent receipts verify --db receipts.redb --trusted-key signing-key.pub.pem\n  knhk-agent receipts verify --db receipts.redb --trusted-key aws-kms:alias/knhk-receipts --kms-region eu-west-1\n  knhk-agent receipts verify --s3 s3://receipts-archive/node-7 --trusted-key sha256:3f1c...e0"
    )]
    Verify {
        /// The ledger database (stop the agent first, or copy the file).
        #[arg(long, required_unless_present = "s3", conflicts_with = "s3")]
        db: Option<PathBuf>,
        /// Or: a node's archive, s3://BUCKET/PREFIX (as `[archive] url`): every object's content
        /// hash against its name, then the ledger rebuilt from it, verified as --db is.
        #[arg(long, value_name = "URL")]
        s3: Option<String>,
        /// The S3 endpoint for --s3 (MinIO, moto); default: AWS's.
        #[arg(long, env = "AWS_ENDPOINT_URL_S3", requires = "s3")]
        s3_endpoint_url: Option<String>,
        /// The S3 region for --s3.
        #[arg(long, default_value = "us-east-1", requires = "s3")]
        s3_region: String,
        /// A key to trust (repeatable): its fingerprint (sha256:<64 hex digits>, as `receipts
        /// keys` and this command print), a public key file (PEM or SubjectPublicKeyInfo DER), or
        /// aws-kms:KEY_ID (key id, ARN or alias; its public key is fetched with GetPublicKey).
        #[arg(long = "trusted-key", value_name = "KEY")]
        trusted_keys: Vec<String>,
        /// AWS region for aws-kms: keys.
        #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
        kms_region: String,
        /// A KMS-compatible endpoint for aws-kms: keys (default: AWS's).
        #[arg(long, env = "AWS_ENDPOINT_URL_KMS")]
        kms_endpoint_url: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    match cli.command {
        Command::Run { config } => {
            let config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let runtime = match service_runtime() {
                Ok(r) => r,
                Err(code) => return code,
            };
            match runtime.block_on(agent::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(
                    e @ agent::AgentError::Receipts(
                        knhk_agent::receipts::ReceiptsError::Unverified { .. },
                    ),
                ) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_LEDGER_UNVERIFIED)
                }
                Err(
                    e @ (agent::AgentError::Api(
                        knhk_agent::api::ServeError::NotLoopback(_)
                        | knhk_agent::api::ServeError::Socket(_),
                    )
                    | agent::AgentError::Identity(_)
                    | agent::AgentError::Receipts(_)
                    | agent::AgentError::Bundle(_)
                    | agent::AgentError::Control(knhk_agent::control::ControlError::LiveState(
                        _,
                    ))
                    | agent::AgentError::Control(knhk_agent::control::ControlError::Datapath(
                        knhk_agent::datapath::DatapathError::Compile(_)
                        | knhk_agent::datapath::DatapathError::ScopeTooDeep { .. },
                    ))),
                ) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(e @ (agent::AgentError::Datapath(_) | agent::AgentError::NoCgroup2 { .. })) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_DATAPATH)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { file, output } => match Config::load_file(&file) {
            Ok(config) => {
                let inactive = config.inactive_sections();
                let mut active = vec!["agent", "policy"];
                if config.slo.is_some() {
                    active.push("slo");
                }
                if config
                    .spiffe
                    .as_ref()
                    .is_some_and(|s| s.enabled == Some(true))
                {
                    active.push("spiffe");
                }
                if config.kms.is_some() {
                    active.push("kms");
                    if config.receipts.is_some() {
                        active.push("receipts");
                    }
                    if config
                        .multi_region
                        .as_ref()
                        .is_some_and(|m| m.cross_region_sync_enabled == Some(true))
                    {
                        active.push("multi_region");
                    }
                }
                if config.settings.telemetry.is_some() && cfg!(feature = "otlp") {
                    active.push("telemetry");
                }
                if config.promotion.is_some() {
                    active.push("promotion");
                }
                if config.settings.bundle.is_some() && cfg!(feature = "s3") {
                    active.push("bundle");
                }
                if config.settings.archive.is_some() && cfg!(feature = "s3") {
                    active.push("archive");
                }
                match output {
                    Output::Json => {
                        let doc = serde_json::json!({
                            "valid": true,
                            "file": file.display().to_string(),
                            "rules": config.policy.rules.len(),
                            "active_sections": active,
                            "warnings": config.warnings(),
                            "inactive_sections": inactive.iter().map(|(s, why)| serde_json::json!({"section": s, "reason": why})).collect::<Vec<_>>(),
                        });
                        println!("{doc}");
                    }
                    Output::Human => {
                        println!(
                            "{}: valid ({})",
                            file.display(),
                            client::count(config.policy.rules.len() as u64, "rule")
                        );
                        println!(
                            "  active: {}",
                            active
                                .iter()
                                .map(|s| format!("[{s}]"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                        for w in config.warnings() {
                            println!("  warning: {w}");
                        }
                        for (section, why) in inactive {
                            println!("  accepted, not active: [{section}] ({why})");
                        }
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                match output {
                    Output::Json => println!(
                        "{}",
                        serde_json::json!({"valid": false, "error": e.to_string()})
                    ),
                    Output::Human => eprintln!("error: {e}"),
                }
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Detach {
            pin_root,
            config,
            output,
        } => {
            let pin_root = match (pin_root, config) {
                (Some(p), _) => p,
                (None, Some(c)) => match load(Some(&c)) {
                    Ok(c) => c.agent.pin_root,
                    Err(code) => return code,
                },
                (None, None) => Config::embedded_default().agent.pin_root,
            };
            // A running agent holds the pin root (and every map and link): it would pin them
            // again. Stop it first.
            let _lock = match datapath::PinRootLock::acquire(&pin_root) {
                Ok(lock) => Some(lock),
                Err(datapath::DatapathError::PinRootInUse { path, holder }) => {
                    return fail(
                        output,
                        &format!(
                            "detach refused: a knhk-agent{} is running on {}: it holds every map and link and would pin them again. Stop it (or delete the DaemonSet) first; nothing was removed",
                            holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                            path.display()
                        ),
                        1,
                    )
                }
                // A pin root that cannot be locked (not there, not a directory): remove_pins
                // says what is wrong with it.
                Err(_) => None,
            };
            match datapath::remove_pins(&pin_root) {
                Ok(removed) => {
                    match output {
                        Output::Json => println!(
                            "{}",
                            serde_json::json!({"pin_root": pin_root.display().to_string(),
                                "removed": removed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()})
                        ),
                        Output::Human => println!(
                            "removed {} under {}; knhk programs are detached",
                            client::count(removed.len() as u64, "pin"),
                            pin_root.display()
                        ),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(output, &e.to_string(), 1),
            }
        }
        Command::Receipts(ReceiptsCommand::Verify {
            db,
            s3,
            s3_endpoint_url,
            s3_region,
            trusted_keys,
            kms_region,
            kms_endpoint_url,
            output,
        }) => {
            let trusted = match trusted_fingerprints(&trusted_keys, kms_region, kms_endpoint_url) {
                Ok(t) => t,
                Err(e) => return fail(output, &e, EXIT_CONFIG),
            };
            // --s3: the archive is rebuilt into a private temporary ledger, verified below.
            let (db, label, archive_problems, _rebuilt) = match (db, s3) {
                (Some(db), _) => (db.clone(), db.display().to_string(), Vec::new(), None),
                (None, Some(url)) => match rebuild_archive(&url, s3_endpoint_url, s3_region) {
                    Ok((file, problems)) => (file.0.clone(), url, problems, Some(file)),
                    Err((e, code)) => return fail(output, &e, code),
                },
                (None, None) => return fail(output, "give --db or --s3", EXIT_CONFIG),
            };
            // A damaged file can make the database library panic; verify_file turns that into
            // an error, and the message is printed once, below, not by the panic hook.
            std::panic::set_hook(Box::new(|_| {}));
            match knhk_agent::receipts::verify_file_with(&db, &trusted) {
                Ok(mut report) => {
                    // What only the archive can get wrong comes first.
                    if !archive_problems.is_empty() {
                        let mut all = archive_problems;
                        all.append(&mut report.problems);
                        report.problems = all;
                    }
                    match output {
                        Output::Json => println!("{}", serde_json::json!(report)),
                        Output::Human => {
                            println!(
                                "{}: {} receipts ({} payloads compacted), {} checkpoints ({} not yet signed), {} keys",
                                label,
                                report.receipts,
                                report.compacted_payloads,
                                report.checkpoints,
                                report.unsigned_checkpoints,
                                report.keys
                            );
                            for k in &report.key_history {
                                println!(
                                    "  key {}  {}  current from {}{}",
                                    k.key,
                                    k.fingerprint,
                                    client::utc(k.since_ns),
                                    if k.anchored { "  (trusted)" } else { "" }
                                );
                            }
                            for t in &report.trust.trusted_keys {
                                println!("  trusted key {t}");
                            }
                            if let Some(origin) = &report.origin {
                                println!("  origin {origin}");
                            }
                            for w in &report.witnesses {
                                println!(
                                    "  witness {}  {} cosignatures, newest size {}",
                                    w.verifier_key, w.cosignatures, w.newest_size
                                );
                            }
                            println!("trust: {}", report.trust.statement);
                            // The report's verdict (no problems), not a Result conversion.
                            if report.ok() && report.trust.pinned {
                                println!("verified");
                            } else if report.ok() {
                                println!("verified (internal consistency only)");
                            }
                            for p in &report.problems {
                                println!("FAILED: {p}");
                            }
                        }
                    }
                    // The report's verdict again (not a Result conversion).
                    if report.ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e @ knhk_agent::receipts::VerifyFileError::Open { .. }) => {
                    fail(output, &e.to_string(), EXIT_CONFIG)
                }
                Err(e) => fail(output, &e.to_string(), 1),
            }
        }
        Command::Bundle(command) => bundle_command(command),
        Command::Witness {
            name,
            listen,
            metrics_listen,
            state,
            key_file,
            vault_key,
            vault_addr,
            vault_mount,
            config,
            print_key,
        } => witness_command(
            name,
            listen,
            metrics_listen,
            state,
            key_file,
            vault_key.map(|k| (vault_addr.unwrap_or_default(), vault_mount, k)),
            config,
            print_key,
        ),
        Command::Receipts(ReceiptsCommand::List {
            from,
            limit,
            client: c,
        }) => client_command(&c, move |t| async move {
            client::receipts_list(&t, from, limit).await
        }),
        Command::Receipts(ReceiptsCommand::Keys { client: c }) => {
            client_command(&c, move |t| async move { client::receipts_keys(&t).await })
        }
        Command::Receipts(ReceiptsCommand::Checkpoints {
            from,
            limit,
            client: c,
        }) => client_command(&c, move |t| async move {
            client::receipts_checkpoints(&t, from, limit).await
        }),
        Command::Hold(HoldCommand::Place {
            case_id,
            reason,
            from_seq,
            to_seq,
            from_unix,
            to_unix,
            kind,
            region,
            client: c,
        }) => {
            let hold = knhk_agent::api::receipts::pb::Hold {
                case_id,
                reason,
                from_seq,
                to_seq,
                from_time_unix_nanos: from_unix.map(|s| s.saturating_mul(1_000_000_000)),
                to_time_unix_nanos: to_unix.map(|s| s.saturating_mul(1_000_000_000)),
                // Not given: no limit on kind.
                kind: kind.unwrap_or_default(),
                // Not given: no limit on region.
                region: region.unwrap_or_default(),
                ..Default::default()
            };
            client_command(
                &c,
                move |t| async move { client::hold_place(&t, hold).await },
            )
        }
        Command::Hold(HoldCommand::Release {
            id,
            reason,
            client: c,
        }) => client_command(&c, move |t| async move {
            client::hold_release(&t, id, &reason).await
        }),
        Command::Hold(HoldCommand::List { client: c }) => {
            client_command(&c, move |t| async move { client::hold_list(&t).await })
        }
        Command::DefaultConfig { output } => {
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"toml": knhk_agent::config::EMBEDDED_DEFAULT})
                ),
                Output::Human => print!("{}", knhk_agent::config::EMBEDDED_DEFAULT),
            }
            ExitCode::SUCCESS
        }
        Command::Policy(PolicyCommand::Apply {
            file,
            expected_generation,
            client: c,
        }) => policy_command(&c, move |e| async move {
            client::policy_apply(&e, &file, expected_generation).await
        }),
        Command::Policy(PolicyCommand::Get { client: c }) => {
            client_command(&c, move |e| async move { client::policy_get(&e).await })
        }
        Command::Policy(PolicyCommand::Diff { file, client: c }) => policy_command(
            &c,
            move |e| async move { client::policy_diff(&e, &file).await },
        ),
        Command::Policy(PolicyCommand::Rollback {
            expected_generation,
            client: c,
        }) => policy_command(&c, move |e| async move {
            client::policy_rollback(&e, expected_generation).await
        }),
        Command::Rollout(cmd) => rollout_command(cmd),
        Command::Status { client: c } => {
            client_command(&c, move |e| async move { client::status(&e).await })
        }
        Command::Heat {
            limit,
            by_pod,
            pod,
            client: c,
        } => client_command(&c, move |e| async move {
            client::heat(&e, limit, by_pod, pod.as_deref()).await
        }),
        Command::Slo { client: c } => {
            client_command(&c, move |e| async move { client::slo(&e).await })
        }
        Command::Explain {
            cgroup,
            pod,
            destination,
            client: c,
        } => client_command(&c, move |e| async move {
            client::explain(&e, &cgroup, pod.as_deref(), &destination).await
        }),
        Command::Events {
            follow,
            wait,
            count,
            only_verdicts,
            no_verdicts,
            actions,
            cgroup,
            rule,
            client: c,
        } => {
            if !(wait.is_finite() && wait >= 0.0) {
                eprintln!("error: --wait {wait}: expected a number of seconds, 0 or more");
                return ExitCode::from(EXIT_CONFIG);
            }
            let req = client::EventsRequest {
                verdicts: !no_verdicts,
                only_verdicts,
                actions,
                cgroup,
                rule,
                count,
                duration: (!follow).then(|| std::time::Duration::from_secs_f64(wait)),
            };
            let json = matches!(c.output, Output::Json);
            stream_command(&c, move |e| async move {
                use std::io::Write as _;
                client::events(&e, &req, |r| {
                    let mut out = std::io::stdout().lock();
                    // A closed stdout (a pipe whose reader left) ends nothing here; the stream
                    // ends with the process.
                    let _ = if json {
                        writeln!(out, "{}", r.json)
                    } else {
                        write!(out, "{}", r.human)
                    };
                    let _ = out.flush();
                })
                .await
                .map(|_| client::Report {
                    human: String::new(),
                    json: serde_json::Value::Null,
                })
            })
        }
    }
}

/// Reports an error in the chosen form (JSON on stdout: `{"error", "exit_code"}`) and exits
/// with `code`.
/// A file in its own private temporary directory, both removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        // Best effort: a private temporary file and its directory.
        let _ = std::fs::remove_file(&self.0);
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `receipts verify --s3`: the archive at `url` read into a new private temporary ledger, and
/// what reading it found wrong; or an error and its exit code.
#[cfg(feature = "s3")]
fn rebuild_archive(
    url: &str,
    endpoint_url: Option<String>,
    region: String,
) -> Result<(TempFile, Vec<String>), (String, u8)> {
    let (bucket, prefix) =
        knhk_agent::config::settings::parse_archive_url(url).map_err(|e| (e, EXIT_CONFIG))?;
    let dir = std::env::temp_dir().join(format!(
        "knhk-archive-verify-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| (format!("{}: {e}", dir.display()), EXIT_CONFIG))?;
    }
    let file = TempFile(dir.join("archive.redb"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (format!("cannot start the runtime: {e}"), 1))?;
    let result = runtime.block_on(async {
        let store = knhk_agent::objectstore::ObjectStore::connect(
            &knhk_agent::objectstore::StoreSettings {
                force_path_style: endpoint_url.is_some(),
                endpoint_url,
                region,
                timeout: std::time::Duration::from_secs(30),
            },
        )
        .await?;
        knhk_agent::archive::restore(&store, &bucket, &prefix, &file.0).await
    });
    let report = result.map_err(|e| (format!("reading the archive {url}: {e}"), EXIT_CONFIG))?;
    Ok((file, report.problems))
}

/// Without the `s3` feature there is no archive to read.
#[cfg(not(feature = "s3"))]
fn rebuild_archive(
    _url: &str,
    _endpoint_url: Option<String>,
    _region: String,
) -> Result<(TempFile, Vec<String>), (String, u8)> {
    Err((
        "this build of knhk-agent lacks S3 support (cargo feature s3)".into(),
        EXIT_CONFIG,
    ))
}

/// The fingerprints of `receipts verify --trusted-key` arguments (fetching aws-kms: keys).
fn trusted_fingerprints(
    args: &[String],
    kms_region: String,
    kms_endpoint_url: Option<String>,
) -> Result<Vec<String>, String> {
    if args.is_empty() {
        return Ok(Vec::new());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let kms = knhk_agent::receipts::KmsLookup {
        region: Some(kms_region),
        endpoint_url: kms_endpoint_url,
    };
    runtime.block_on(async {
        let mut out = Vec::new();
        for a in args {
            out.push(knhk_agent::receipts::trusted_key_fingerprint(a, &kms).await?);
        }
        Ok(out)
    })
}

/// The receipts signer of `bundle` commands: a key directory or an AWS KMS key.
fn bundle_signer(
    key_dir: Option<PathBuf>,
    kms_key_id: Option<String>,
    region: String,
    kms_endpoint_url: Option<String>,
) -> knhk_agent::config::SignerSettings {
    match (key_dir, kms_key_id) {
        (Some(key_dir), _) => knhk_agent::config::SignerSettings::File { key_dir },
        (None, key_id) => knhk_agent::config::SignerSettings::Aws {
            region,
            // clap requires one of the two.
            key_id: key_id.unwrap_or_default(),
            endpoint_url: kms_endpoint_url,
        },
    }
}

/// `knhk-agent bundle ...`.
/// The runtime of a long-running service (`run`, `witness`): two worker threads.
fn service_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

#[allow(clippy::too_many_arguments)]
fn witness_command(
    name: String,
    listen: std::net::SocketAddr,
    metrics_listen: Option<std::net::SocketAddr>,
    state: PathBuf,
    key_file: Option<PathBuf>,
    vault: Option<(String, String, String)>,
    config: Option<PathBuf>,
    print_key: bool,
) -> ExitCode {
    use knhk_agent::witness::{self, KeySource};
    let key = match (key_file, vault) {
        (Some(path), _) => KeySource::File(path),
        (None, Some((addr, mount, name))) => {
            let Ok(token) = std::env::var("VAULT_TOKEN") else {
                eprintln!("error: --vault-key needs the token in $VAULT_TOKEN");
                return ExitCode::from(EXIT_CONFIG);
            };
            KeySource::Vault {
                addr,
                token,
                mount,
                name,
            }
        }
        (None, None) => {
            eprintln!("error: give --key-file or --vault-key");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let settings = match config.as_deref().map(|p| load(Some(p))).transpose() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match service_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let result = runtime.block_on(async move {
        if print_key {
            let key = key.open().await?;
            let vk = knhk_agent::note::VerifierKey::cosignature(&name, &key.public());
            println!("{vk}");
            return Ok(());
        }
        let identity = match settings.and_then(|c| c.settings.identity.clone().map(|i| (c, i))) {
            None => None,
            Some((c, i)) => {
                let allowed = i.access.region_peers.clone();
                let id = knhk_agent::identity::Identity::start(
                    i,
                    &c.agent.state_dir,
                    &prometheus::Registry::new(),
                )
                .await
                .map_err(|e| e.to_string())?;
                Some((id, allowed))
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
        let stop = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        witness::run(&name, &key, &state, listen, metrics_listen, identity, stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bundle_command(command: BundleCommand) -> ExitCode {
    use knhk_agent::{bundle, objectstore::StoreSettings, receipts};
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        BundleCommand::PublicKey {
            key_dir,
            kms_key_id,
            region,
            kms_endpoint_url,
        } => {
            let settings = bundle_signer(key_dir, kms_key_id, region, kms_endpoint_url);
            let result = runtime.block_on(async {
                let signer = receipts::connect_signer(&settings)
                    .await
                    .map_err(|e| e.to_string())?;
                let info = signer.current().await.map_err(|e| e.to_string())?;
                knhk_agent::objectstore::signed::public_key_der_to_pem(&info.public_key_der)
            });
            match result {
                Ok(pem) => {
                    print!("{pem}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(Output::Human, &e, EXIT_CONFIG),
            }
        }
        BundleCommand::Publish {
            policy,
            rollout,
            flags,
            comment,
            url,
            endpoint_url,
            region,
            force_path_style,
            key_dir,
            kms_key_id,
            kms_endpoint_url,
            out,
            no_upload,
            output,
        } => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
            };
            let document = match (|| {
                Ok::<_, String>(bundle::BundleDocument {
                    version: 1,
                    policy: read(&policy)?,
                    rollout: rollout.as_ref().map(read).transpose()?,
                    flags: flags.as_ref().map(read).transpose()?,
                    comment,
                })
            })() {
                Ok(d) => d,
                Err(e) => return fail(output, &e, EXIT_CONFIG),
            };
            let target = match (no_upload, url) {
                (false, Some(url)) => Some(bundle::PublishTarget {
                    url,
                    store: StoreSettings {
                        force_path_style: force_path_style.unwrap_or(endpoint_url.is_some()),
                        endpoint_url,
                        region: region.clone(),
                        timeout: std::time::Duration::from_secs(30),
                    },
                }),
                _ => None,
            };
            let settings = bundle_signer(key_dir, kms_key_id, region, kms_endpoint_url);
            let result = runtime.block_on(async {
                let signer = receipts::connect_signer(&settings)
                    .await
                    .map_err(|e| bundle::BundleError::Key(e.to_string()))?;
                let sign = |message: Vec<u8>| async move {
                    let info = signer.current().await.map_err(|e| e.to_string())?;
                    let sig = signer
                        .sign(&info.key, &message)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok((info.key.to_string(), sig))
                };
                bundle::publish(&document, sign, target.as_ref(), out.as_deref()).await
            });
            match result {
                Ok((digest, etag)) => {
                    let url = target.as_ref().map(|t| t.url.clone());
                    match output {
                        Output::Json => println!(
                            "{}",
                            serde_json::json!({"digest": digest, "etag": etag, "url": url})
                        ),
                        Output::Human => match url {
                            Some(url) => println!(
                                "published {url} (digest {digest}, etag {})",
                                etag.as_deref().unwrap_or("none")
                            ),
                            None => println!("signed (digest {digest}), not uploaded"),
                        },
                    }
                    ExitCode::SUCCESS
                }
                Err(
                    e @ (bundle::BundleError::InvalidPolicy(_) | bundle::BundleError::Malformed(_)),
                ) => fail(output, &e.to_string(), EXIT_CONFIG),
                Err(e) => fail(output, &e.to_string(), 1),
            }
        }
    }
}

fn fail(output: Output, message: &str, code: u8) -> ExitCode {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"error": message, "exit_code": code})
        ),
        Output::Human => eprintln!("error: {message}"),
    }
    ExitCode::from(code)
}

/// Runs one client command on a small runtime and prints its report.
fn client_command<F, Fut>(args: &ClientArgs, command: F) -> ExitCode
where
    F: FnOnce(client::Target) -> Fut,
    Fut: std::future::Future<Output = Result<client::Report, client::ClientError>>,
{
    client_command_with(args, client::DEFAULT_TIMEOUT, true, command)
}

/// [`client_command`] for a stream that runs until it ends (`events --follow`): the timeout
/// bounds connecting and the call's start, not the stream.
fn stream_command<F, Fut>(args: &ClientArgs, command: F) -> ExitCode
where
    F: FnOnce(client::Target) -> Fut,
    Fut: std::future::Future<Output = Result<client::Report, client::ClientError>>,
{
    client_command_with(args, client::DEFAULT_TIMEOUT, false, command)
}

/// [`client_command`] for a policy change: a longer default timeout.
fn policy_command<F, Fut>(args: &ClientArgs, command: F) -> ExitCode
where
    F: FnOnce(client::Target) -> Fut,
    Fut: std::future::Future<Output = Result<client::Report, client::ClientError>>,
{
    client_command_with(args, client::DEFAULT_POLICY_TIMEOUT, true, command)
}

/// Runs one client command with `default_timeout` unless `--timeout` is given; with
/// `whole_call`, the timeout (plus a second) bounds the command as a whole too.
fn client_command_with<F, Fut>(
    args: &ClientArgs,
    default_timeout: std::time::Duration,
    whole_call: bool,
    command: F,
) -> ExitCode
where
    F: FnOnce(client::Target) -> Fut,
    Fut: std::future::Future<Output = Result<client::Report, client::ClientError>>,
{
    let target = match args.target(default_timeout) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let timeout = target.timeout;
    // A backstop for every phase (an mTLS handshake, a stream): the command as a whole gets the
    // timeout plus a second; the channel's own timeouts normally answer first.
    let result = runtime.block_on(async move {
        if !whole_call {
            return command(target).await.map_err(|e| e.with_timeout(timeout));
        }
        match tokio::time::timeout(timeout + std::time::Duration::from_secs(1), command(target))
            .await
        {
            Ok(r) => r.map_err(|e| e.with_timeout(timeout)),
            Err(_) => Err(client::ClientError::Timeout(timeout)),
        }
    });
    match result {
        Ok(report) => {
            match args.output {
                Output::Human => print!("{}", report.human),
                // A streaming command printed as it went.
                Output::Json if report.json.is_null() => {}
                Output::Json => println!("{}", report.json),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            match args.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"error": e.to_string(), "exit_code": e.exit_code()})
                ),
                Output::Human => eprintln!("error: {e}"),
            }
            ExitCode::from(e.exit_code())
        }
    }
}

fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    match path {
        None => Config::load_embedded_default().map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }),
        Some(p) => Config::load_file(p).map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }),
    }
}
