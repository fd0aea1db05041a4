//! `knhk-agent run`: wires the datapath, the control core, the gRPC API, the cgroup follower and
//! the admin server together.
//!
//! Order: validate config (done by the caller) → bind the gRPC and admin listeners (fail before
//! touching the kernel if an address is refused or taken) → load, attach or re-adopt the datapath
//! → switch in the policy → serve the gRPC API → follow rule cgroups until SIGINT/SIGTERM. Pins stay in place on exit (enforcement survives
//! restarts) unless `agent.detach_on_exit` is set.

use crate::{
    api,
    beat::BeatEngine,
    bundle::{self, Follower},
    config::{BundleKey, Config},
    control::{ControlError, Controller},
    datapath::{self, cgroup, Datapath, DatapathError, DatapathOptions, DatapathReader},
    identity::{Identity, IdentityError},
    model::ReceiptKind,
    receipts::{self, NewReceipt, Receipts, ReceiptsError},
    sync::Replicator,
    tasks::TaskGroup,
    telemetry::{self, AdminServer, DatapathCollector, Readiness},
    workloads::{Discovery, WorkloadSettings},
};

/// How long in-flight gRPC calls may take to finish after a stop.
const SHUTDOWN_API: Duration = Duration::from_secs(10);
/// How long each middle step of the shutdown may take (beat engine; receipts flush and final
/// checkpoint; receipts signing).
const SHUTDOWN_STEP: Duration = Duration::from_secs(3);
/// How long witnessing may push after a stop. With the steps above the total stays under
/// Kubernetes' default grace period of 30 s: 10 + 3 × 3 + 5 = 24 s at worst.
const SHUTDOWN_SYNC: Duration = Duration::from_secs(5);
use std::{path::PathBuf, sync::Arc, time::Duration};
use tokio::time::Instant;
use tracing::{error, info, warn};

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No cgroup v2 hierarchy was found and none was configured.
    #[error("no cgroup v2 hierarchy found at {tried}; set agent.cgroup_root")]
    NoCgroup2 {
        /// Where detection looked.
        tried: String,
    },
    /// The admin server could not bind.
    #[error("cannot listen on agent.metrics_address {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The datapath failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// Applying the configured policy failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The gRPC API could not start.
    #[error(transparent)]
    Api(#[from] api::ServeError),
    /// The receipts ledger could not start (its database or a local signer problem).
    #[error(transparent)]
    Receipts(#[from] ReceiptsError),
    /// The workload identity could not start (a local cause, such as unreadable files).
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The fleet bundle follower could not start (its public key, its store client).
    #[error("[bundle]: {0}")]
    Bundle(#[from] bundle::BundleError),
    /// A background task panicked.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Where verified fleet bundles go: the control core (their policy), the receipts ledger
/// (what was applied or refused).
struct BundleSink {
    controller: Arc<Controller>,
    receipts: Option<Arc<Receipts>>,
}

#[tonic::async_trait]
impl bundle::Sink for BundleSink {
    async fn apply(&self, b: &bundle::Bundle) -> Result<String, String> {
        // A bundle with a rollout (or flags) reaches the workloads step by step.
        if let Some(terms) = b.document.rollout_terms().map_err(|e| e.to_string())? {
            let req = crate::control::RolloutRequest {
                policy: None,
                flags: terms.flags,
                steps: terms.steps,
                beats_per_step: terms.beats_per_step,
                seed: terms.seed,
            };
            return self
                .controller
                .bundle_rollout(b.policy.clone(), req)
                .await
                .map_err(|e| e.to_string());
        }
        match self.controller.apply_bundle(b.policy.clone()).await {
            Ok(Some(applied)) => Ok(format!("generation {}", applied.generation.number)),
            Ok(None) => Ok(format!(
                "already live (generation {})",
                self.controller.live().await.number
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn record(&self, outcome: bundle::Outcome) {
        let Some(r) = &self.receipts else {
            return;
        };
        let (generation, payload) = match outcome {
            bundle::Outcome::Applied {
                url,
                digest,
                etag,
                from,
                detail,
            } => {
                let generation = self.controller.live().await.number;
                (
                    generation,
                    serde_json::json!({"outcome": "applied", "url": url, "digest": digest,
                        "etag": etag, "from": from, "detail": detail, "generation": generation}),
                )
            }
            bundle::Outcome::Refused {
                url,
                etag,
                reason,
                error,
            } => (
                0,
                serde_json::json!({"outcome": "refused", "url": url, "etag": etag,
                    "reason": reason, "error": error}),
            ),
        };
        let appended = r
            .append(NewReceipt {
                kind: ReceiptKind::Bundle,
                cycle: 0,
                policy_generation: generation,
                payload: payload.to_string().into_bytes(),
            })
            .await;
        if let Err(e) = appended {
            error!("receipts: the bundle receipt was not recorded: {e}");
        }
    }
}

/// The public key fleet bundles must be signed with: from its file, or AWS KMS's GetPublicKey.
/// A KMS key's public key is kept under `agent.state_dir` (`bundle-kms-public-key.json`), so a
/// restart while KMS cannot be reached still verifies bundles (the last good one from disk).
async fn bundle_public_key(
    settings: &crate::config::BundleSettings,
    state_dir: &std::path::Path,
) -> Result<Vec<u8>, AgentError> {
    use base64::Engine as _;
    let (key_id, endpoint_url) = match &settings.key_source {
        BundleKey::File { der, .. } => return Ok(der.clone()),
        BundleKey::Kms {
            key_id,
            endpoint_url,
        } => (key_id, endpoint_url),
    };
    let kept = state_dir.join("bundle-kms-public-key.json");
    let b64 = base64::engine::general_purpose::STANDARD;
    let kms = crate::config::SignerSettings::Aws {
        region: settings.region.clone(),
        key_id: key_id.clone(),
        endpoint_url: endpoint_url.clone(),
    };
    let fetched = match receipts::connect_signer(&kms).await {
        Ok(signer) => signer.current().await,
        Err(e) => Err(e),
    };
    match fetched {
        Ok(info) => {
            let record = serde_json::json!({"key_id": key_id, "public_key": b64.encode(&info.public_key_der)});
            if let Err(e) = std::fs::write(&kept, record.to_string()) {
                warn!(
                    "{}: {e}: a restart without KMS could not verify bundles",
                    kept.display()
                );
            }
            Ok(info.public_key_der)
        }
        Err(e) if e.is_transient() => {
            let cached = std::fs::read(&kept)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .filter(|v| v["key_id"].as_str() == Some(key_id.as_str()))
                .and_then(|v| v["public_key"].as_str().and_then(|k| b64.decode(k).ok()));
            match cached {
                Some(der) => {
                    warn!(
                        key_id = %key_id,
                        "the public key of bundle.kms_key_id cannot be fetched ({e}): using the one kept in {}",
                        kept.display()
                    );
                    Ok(der)
                }
                None => Err(AgentError::Bundle(bundle::BundleError::Key(format!(
                    "the public key of bundle.kms_key_id {key_id:?} cannot be fetched ({e}), and none is kept in {}",
                    kept.display()
                )))),
            }
        }
        Err(e) => Err(AgentError::Bundle(bundle::BundleError::Key(format!(
            "the public key of bundle.kms_key_id {key_id:?} cannot be had: {e}"
        )))),
    }
}

/// The cgroup root the agent attaches to: the configured one or the detected cgroup v2 mount.
pub fn cgroup_root(config: &Config) -> Result<PathBuf, AgentError> {
    match &config.agent.cgroup_root {
        Some(root) => Ok(root.clone()),
        None => cgroup::detect_cgroup2_mount().ok_or_else(|| AgentError::NoCgroup2 {
            tried: cgroup::CGROUP2_CANDIDATES.join(", "),
        }),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))
}

/// Writes a startup line to stdout. A closed or full stdout (a supervisor that stopped reading)
/// must not stop the agent, so a write error is logged, not raised.
fn announce(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        warn!("cannot write the startup lines to stdout ({e}); continuing");
    }
}

/// Detaches the programs when a start fails after attaching, if `agent.detach_on_exit` asks
/// for that on exit; disarmed once the agent runs (its own exit path then decides).
struct DetachOnFailure {
    pin_root: Option<PathBuf>,
}

impl DetachOnFailure {
    fn disarm(&mut self) {
        self.pin_root = None;
    }
}

impl Drop for DetachOnFailure {
    fn drop(&mut self) {
        if let Some(root) = self.pin_root.take() {
            match datapath::remove_pins(&root) {
                Ok(pins) => warn!(
                    removed = pins.len(),
                    "the start failed after attaching: programs detached (agent.detach_on_exit)"
                ),
                Err(e) => error!("the start failed after attaching, and detaching failed too: {e}"),
            }
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), AgentError> {
    // First of all: a SIGTERM or SIGINT that arrives while the agent starts is kept, and stops
    // it cleanly once it has started (rather than killing it half-attached).
    let signal = |kind: tokio::signal::unix::SignalKind, name: &str| {
        tokio::signal::unix::signal(kind)
            .map_err(|e| AgentError::Internal(format!("installing the {name} handler: {e}")))
    };
    let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate(), "SIGTERM")?;
    let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt(), "SIGINT")?;
    // One agent per pin root: a second one is refused first of all, before it binds, opens the
    // ledger or touches the kernel. Held until the process ends.
    let pin_root = config.agent.pin_root.clone();
    let mut pin_root_lock = blocking(move || datapath::PinRootLock::acquire(&pin_root)).await??;
    // Bind both listeners before anything touches the kernel: a bad address changes nothing.
    let identity_settings = config.settings.identity.clone();
    let api_listener = api::bind(&config.api_listen(), identity_settings.is_some()).await?;
    let root = cgroup_root(&config)?;
    let registry = prometheus::Registry::new();
    let readiness = Arc::new(Readiness::default());
    // Not ready until the programs are attached and the policy is live, whatever else is.
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let started = started.clone();
        readiness.register("started", move || {
            if started.load(std::sync::atomic::Ordering::SeqCst) {
                Ok(())
            } else {
                Err("loading the kernel programs and making the policy live".into())
            }
        });
    }
    let admin = AdminServer::start(
        config.agent.metrics_address,
        registry.clone(),
        readiness.clone(),
    )
    .map_err(|source| AgentError::Bind {
        addr: config.agent.metrics_address,
        source,
    })?;

    let identity = match identity_settings {
        Some(settings) => {
            let identity =
                Arc::new(Identity::start(settings, &config.agent.state_dir, &registry).await?);
            readiness.register("workload identity", identity.readiness_check());
            Some(identity)
        }
        None => None,
    };

    // The receipts ledger is opened before anything touches the kernel: a damaged ledger stops
    // the agent with nothing attached.
    let mut ledger = match &config.settings.receipts {
        Some(settings) => Some(Receipts::open_ledger(settings).await?),
        None => None,
    };

    let opts = DatapathOptions {
        cgroup_root: root.clone(),
        pin_root: config.agent.pin_root.clone(),
        heat_max_entries: config.agent.heat_max_entries,
    };
    // The live policy is kept under agent.state_dir (root's, 0700), so restarts re-adopt it.
    // Checked before anything touches the kernel: a damaged record changes nothing.
    crate::secure_dir::ensure_dir(&config.agent.state_dir, 0o700, None).map_err(|e| {
        ControlError::LiveState(format!(
            "agent.state_dir {}: {e}",
            config.agent.state_dir.display()
        ))
    })?;
    let store = crate::control::LiveStore::new(&config.agent.state_dir);
    let saved = store.load()?;
    if let Some(record) = &saved {
        record.policy(&config.policy())?;
    }
    // The fleet bundle's public key, before anything touches the kernel: a key that cannot be
    // had stops the start with nothing attached.
    let bundle_key = match &config.settings.bundle {
        Some(settings) => Some(bundle_public_key(settings, &config.agent.state_dir).await?),
        None => None,
    };
    // Workload discovery: the node's pods are read once before the first policy is compiled,
    // so selector rules and the unknown-pod guard hold from the first generation.
    let discovery = match &config.kubernetes {
        Some(section) => {
            let mut discovery = Discovery::new(WorkloadSettings::resolve(section, &root));
            let initial = discovery.snapshot(true).await;
            let s = discovery.settings();
            info!(
                kubepods_root = %s.kubepods_root,
                driver = ?s.driver,
                cri_socket = %s.cri_socket.as_deref().map_or_else(|| "(none)".into(), |p| p.display().to_string()),
                node = s.node_name.as_deref().unwrap_or(""),
                pods = initial.pods.len(),
                unclassified = initial.unclassified.len(),
                "workload discovery on"
            );
            Some((discovery, Arc::new(initial)))
        }
        None => None,
    };
    let initial_inventory = discovery.as_ref().map(|(_, i)| i.clone());
    let datapath = blocking(move || {
        let mut dp = Datapath::start(&opts)?;
        if let Some(inv) = initial_inventory {
            dp.set_inventory(inv)?;
        }
        Ok::<_, DatapathError>(dp)
    })
    .await??;
    pin_root_lock.keep();
    // From here on the programs are attached: a start that fails leaves the node as
    // agent.detach_on_exit says (the guard detaches on an early return).
    let mut detach_on_failure = DetachOnFailure {
        pin_root: config
            .agent
            .detach_on_exit
            .then(|| config.agent.pin_root.clone()),
    };
    let layout = datapath.pins().clone();
    let class_states = datapath.class_state_writer();

    // SLO admission: the beat engine runs when [slo] is configured. It is built before the
    // control core, which reads its view; both publish on the one event stream.
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let mut engine = match &config.settings.beat {
        Some(settings) => Some(BeatEngine::new(
            settings.clone(),
            DatapathReader::open(&layout)?,
            class_states,
            events.clone(),
            &registry,
        )?),
        None => None,
    };
    let controller = Controller::start(
        datapath,
        &config,
        events,
        engine.as_ref().map(|e| e.view()),
        Some((store, saved)),
    )
    .await?;

    let status = controller.status_handle();
    let collector = DatapathCollector::new(
        DatapathReader::open(&layout)?,
        status.clone(),
        config.agent.heat_top_n as usize,
        config.agent.rule_metrics_top_n as usize,
    );
    let registered = registry
        .register(Box::new(collector))
        .and_then(|()| controller.register_metrics(&registry))
        .and_then(|()| telemetry::register_build_info(&registry))
        .and_then(|()| registry.register(Box::new(telemetry::ProcessCollector::default())))
        .and_then(|()| {
            registry.register(Box::new(telemetry::ReadinessCollector::new(
                readiness.clone(),
            )))
        });
    if let Err(e) = registered {
        return Err(AgentError::Internal(format!("registering metrics: {e}")));
    }
    // OTLP export ([telemetry]): reads the registry above; spans from here on are exported.
    #[cfg(feature = "otlp")]
    let otlp = match &config.settings.telemetry {
        Some(settings) => Some(
            telemetry::Otlp::start(
                settings,
                &registry,
                telemetry::ResourceInfo {
                    instance_id: instance_id(),
                    region: config.settings.sync.as_ref().map(|s| s.region.clone()),
                },
            )
            .map_err(|e| AgentError::Internal(e.to_string()))?,
        ),
        None => None,
    };
    #[cfg(not(feature = "otlp"))]
    if config.settings.telemetry.is_some() {
        warn!("[telemetry] export is configured, but this agent was built without the `otlp` feature: nothing is exported");
    }
    let probe = DatapathReader::open(&layout)?;
    let link_dir = layout.links_dir();
    // The attach cgroup as it was at start: if it is removed (or replaced by a new cgroup of
    // the same name), the kernel detached the programs with it.
    let attach_root = root.clone();
    let attach_mount = datapath::cgroup::mount_of(&attach_root);
    let attach_id = attach_mount
        .as_deref()
        .and_then(|m| datapath::cgroup::resolve(m, &attach_root).ok().flatten())
        .map(|r| r.id);
    readiness.register("programs attached", move || {
        let now = attach_mount
            .as_deref()
            .and_then(|m| datapath::cgroup::resolve(m, &attach_root).ok().flatten())
            .map(|r| r.id);
        if now != attach_id {
            return Err(format!(
                "agent.cgroup_root {} {}: the kernel detached the programs with the cgroup, so nothing under it is enforced; restart the agent to attach to the cgroup there now",
                crate::model::log_escape(&attach_root.display().to_string()),
                if now.is_none() { "was removed" } else { "was removed and created again" }
            ));
        }
        for name in knhk_abi::program_names::ALL {
            if !link_dir.join(name).exists() {
                return Err(format!(
                    "link pin {} is missing",
                    link_dir.join(name).display()
                ));
            }
        }
        Ok(())
    });
    readiness.register("maps readable", move || {
        probe.decisions().map(|_| ()).map_err(|e| e.to_string())
    });
    if let Some((d, _)) = &discovery {
        readiness.register("container runtime", d.readiness_check());
    }
    started.store(true, std::sync::atomic::Ordering::SeqCst);

    let mut services = TaskGroup::new("agent");
    // New pods bound to rules: the cgroup follower takes up their cgroups at once.
    let inventory_changed = Arc::new(tokio::sync::Notify::new());
    if let Some((discovery, initial)) = discovery {
        controller.set_inventory(initial.clone()).await?;
        let c = controller.clone();
        let changed = inventory_changed.clone();
        let mut stop = services.stop_signal();
        services.spawn("workload discovery", async move {
            discovery
                .run(
                    (*initial).clone(),
                    move |inv| {
                        let c = c.clone();
                        let changed = changed.clone();
                        async move {
                            if let Err(e) = c.set_inventory(inv).await {
                                error!(
                                    "binding rules to the node's pods failed (will retry at the next change): {}",
                                    crate::model::log_escape(&e.to_string())
                                );
                            }
                            changed.notify_one();
                        }
                    },
                    async move { stop.requested().await },
                )
                .await;
        });
    }

    let mut summaries = None;
    if let (Some(engine), Some(settings)) = (engine.take(), &config.settings.beat) {
        let engine = engine.with_policy_status(controller.status_handle());
        summaries = Some(engine.summaries());
        if let Err(e) = registry.register(Box::new(engine.heat_view())) {
            return Err(AgentError::Internal(format!(
                "registering heat metrics: {e}"
            )));
        }
        info!(
            beat_ms = settings.interval.as_millis() as u64,
            window_beats = settings.window_beats,
            recover_beats = settings.recover_beats,
            strategy = ?settings.strategy,
            "SLO admission on"
        );
        let mut stop = services.stop_signal();
        services.spawn(
            "beat engine",
            engine.run(async move { stop.requested().await }),
        );
    }
    for w in config.warnings() {
        warn!("{w}");
    }

    // The receipts ledger runs when [kms] names a signing key.
    let (receipts, receipt_tasks) = match config.settings.receipts.clone() {
        Some(settings) => {
            let path = settings.path.clone();
            let signer = receipts::connect_signer(&settings.signer)
                .await
                .map_err(ReceiptsError::from)?;
            let ledger = match ledger.take() {
                Some(l) => l,
                None => Receipts::open_ledger(&settings).await?,
            };
            // Before compaction can run: with an archive, it removes only archived payloads.
            {
                let (l, on) = (ledger.clone(), config.settings.archive.is_some());
                tokio::task::spawn_blocking(move || -> Result<(), receipts::LedgerError> {
                    #[cfg(feature = "s3")]
                    crate::archive::set_compaction_gate(&l, on)?;
                    #[cfg(not(feature = "s3"))]
                    {
                        drop(l);
                        if on {
                            return Err(receipts::LedgerError::Refused(
                                "[archive]: this build of knhk-agent lacks S3 support (cargo feature s3)".into(),
                            ));
                        }
                    }
                    Ok(())
                })
                .await
                .map_err(|e| AgentError::Internal(e.to_string()))?
                .map_err(ReceiptsError::from)?;
            }
            let (receipts, tasks) = Receipts::start_on(
                ledger,
                settings,
                signer,
                &registry,
                Some(controller.subscribe()),
                summaries,
            )
            .await?;
            readiness.register("receipts ledger", receipts.ledger_readiness_check());
            readiness.register("receipts signing", receipts.readiness_check());
            let live = controller.live().await;
            let payload = serde_json::json!({
                "generation": live.number, "digest": live.digest, "cause": "startup",
            });
            receipts
                .append(NewReceipt {
                    kind: ReceiptKind::PolicySwitch,
                    cycle: 0,
                    policy_generation: live.number,
                    payload: payload.to_string().into_bytes(),
                })
                .await?;
            info!(path = %path.display(), "receipts ledger on");
            (Some(receipts), Some(tasks))
        }
        None => (None, None),
    };

    // The archive uploads the ledger to S3 with Object Lock when [archive] is set.
    #[cfg(feature = "s3")]
    let archive_tasks = match (&config.settings.archive, &receipts) {
        (Some(settings), Some(r)) => {
            let (archive, tasks) =
                crate::archive::Archive::start(settings.clone(), r.ledger().clone(), &registry)
                    .await
                    .map_err(|e| AgentError::Internal(format!("[archive]: {e}")))?;
            readiness.register("receipts archive", archive.readiness_check());
            info!(url = %settings.url, lock_mode = settings.lock_mode.as_str(), retention_days = settings.retention_days, "receipts archive on");
            Some(tasks)
        }
        _ => None,
    };

    // Witnessing pushes the ledger's checkpoints when [multi_region] enables it.
    let (sync, sync_tasks) = match (config.settings.sync.clone(), &receipts) {
        (Some(settings), Some(r)) => {
            info!(origin = %r.ledger().origin(), witnesses = settings.peers.len(), quorum = settings.quorum, "witnessing on");
            let (sync, tasks) = Replicator::start(settings, r.clone(), identity.clone(), &registry)
                .map_err(|e| AgentError::Internal(e.to_string()))?;
            readiness.register("witness quorum", sync.readiness_check());
            (Some(sync), Some(tasks))
        }
        (Some(_), None) => {
            warn!("[multi_region] enables witnessing but there is no receipts ledger ([kms]): nothing to witness");
            (None, None)
        }
        _ => (None, None),
    };

    // A fleet bundle ([bundle]) is the source of truth: direct applies are refused from before
    // the API serves, and the follower applies each verified bundle.
    if let (Some(settings), Some(key)) = (&config.settings.bundle, bundle_key) {
        let follower = Follower::new(settings, key, &config.agent.state_dir).await?;
        follower
            .register_metrics(&registry)
            .map_err(|e| AgentError::Internal(format!("registering bundle metrics: {e}")))?;
        readiness.register("fleet bundle", follower.readiness_check());
        controller.set_bundle_source(settings.url.clone());
        info!(url = %settings.url, poll_ms = settings.poll_interval.as_millis() as u64, "following the fleet bundle");
        let sink: Arc<dyn bundle::Sink> = Arc::new(BundleSink {
            controller: controller.clone(),
            receipts: receipts.clone(),
        });
        let mut stop = services.stop_signal();
        services.spawn(
            "bundle follower",
            follower.run(sink, async move { stop.requested().await }),
        );
    }

    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api = api::serve(
        api_listener,
        config.agent.max_request_bytes,
        controller.clone(),
        api::Extensions {
            identity: identity.clone(),
            receipts: receipts.clone(),
            sync: sync.clone(),
        },
        async {
            // A dropped sender is a stop too.
            let _stopped = api_stopped.await;
        },
    )
    .await?;

    let mode = format!("{:?}", config.agent.mode).to_lowercase();
    let generation = controller.live().await.number;
    announce(&format!(
        "knhk-agent running ({mode} mode, policy generation {generation}, attached to {})\n  grpc     {}\n  metrics  http://{}/metrics\n  health   http://{}/healthz  http://{}/readyz\n  pins     {}",
        root.display(),
        api.local_addr,
        admin.local_addr,
        admin.local_addr,
        admin.local_addr,
        layout.dir.display(),
    ));
    // One machine-readable line for scripts and tests (the lines above are for people).
    announce(
        &serde_json::json!({
            "ready": true,
            "grpc": api.local_addr.to_string(),
            "admin": admin.local_addr.to_string(),
            "pins": layout.dir.display().to_string(),
            "generation": generation,
        })
        .to_string(),
    );

    // Rule cgroups are followed by watching the cgroup tree (only the directories that decide
    // them, see `Follower`). A follower turn also runs when a policy switches or pods are bound
    // (new rule cgroups to watch; the retired slot reclaimed), and every
    // `cgroup_poll_interval_ms` for what inotify cannot do. No directory is read while nothing
    // changes, so idle cost does not grow with the number of rules.
    let mut switches = Some(controller.subscribe());
    let mut tree = crate::dirwatch::DirWatcher::new(&format!(
        "rule cgroups are read every {} s instead",
        crate::datapath::RESYNC_EVERY.as_secs()
    ));
    let follower = Arc::new(std::sync::Mutex::new(crate::datapath::Follower::new(
        tree.handle(),
    )));
    let poll = Duration::from_millis(config.agent.cgroup_poll_interval_ms);
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Rollouts step and are gated on the beat (the beat engine's period, 100 ms without [slo]).
    let beat = config
        .settings
        .beat
        .as_ref()
        .map_or(Duration::from_millis(100), |b| b.interval);
    let mut rollout_ticker = tokio::time::interval(beat);
    rollout_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changes = tokio::select! {
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = rollout_ticker.tick() => {
                if let Err(e) = controller.rollout_beat().await {
                    error!(
                        "rollout beat failed (will retry next beat): {}",
                        crate::model::log_escape(&e.to_string())
                    );
                }
                continue;
            }
            changes = tree.changed() => changes,
            () = policy_switched(&mut switches) => Vec::new(),
            () = inventory_changed.notified() => Vec::new(),
            _ = ticker.tick() => Vec::new(),
        };
        let follower = follower.clone();
        let turn = move |dp: &mut crate::datapath::Datapath| {
            // Poisoned only by a panic in an earlier turn: its bookkeeping is still consistent
            // enough to go on (a missed path is reread after the next overflow or error).
            let mut f = follower.lock().unwrap_or_else(|p| p.into_inner());
            f.turn(dp, &changes)
        };
        if let Err(e) = controller.tick(turn).await {
            error!(
                "following rule cgroups failed (will retry): {}",
                crate::model::log_escape(&e.to_string())
            );
        }
    }

    // Shutdown, within Kubernetes' default grace period of 30 s: the API first (no new work;
    // in-flight calls finish), then the beat engine, then the ledger (flushed, closed with a
    // checkpoint, signed if the KMS answers), then witnessing (pushes the final checkpoint).
    let stopping = Instant::now();
    // A dropped receiver means the server already stopped.
    let _already_stopped = stop_api.send(());
    let mut api_task = api.task;
    match tokio::time::timeout(SHUTDOWN_API, &mut api_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!("the gRPC server stopped with an error: {e}"),
        Ok(Err(e)) => warn!("the gRPC server task failed: {e}"),
        Err(_) => {
            warn!(
                "in-flight gRPC calls did not finish within {} s: cut off",
                SHUTDOWN_API.as_secs()
            );
            api_task.abort();
        }
    }
    services.shutdown(Instant::now() + SHUTDOWN_STEP).await;
    #[cfg(feature = "s3")]
    if let Some(tasks) = archive_tasks {
        tasks.shutdown(Instant::now() + SHUTDOWN_STEP).await;
    }
    if let (Some(r), Some(tasks)) = (&receipts, receipt_tasks) {
        if tokio::time::timeout(SHUTDOWN_STEP, r.pulse(0))
            .await
            .is_err()
        {
            warn!(
                "receipts: the final checkpoint was not written within {} s",
                SHUTDOWN_STEP.as_secs()
            );
        }
        tasks.shutdown(Instant::now() + SHUTDOWN_STEP).await;
    }
    if let Some(tasks) = sync_tasks {
        tasks.shutdown(Instant::now() + SHUTDOWN_SYNC).await;
    }
    // Last: what the shutdown itself traced and counted is sent too, within one step.
    #[cfg(feature = "otlp")]
    if let Some(otlp) = otlp {
        if tokio::time::timeout(SHUTDOWN_STEP, otlp.shutdown())
            .await
            .is_err()
        {
            warn!(
                "telemetry: the final OTLP export did not finish within {} s",
                SHUTDOWN_STEP.as_secs()
            );
        }
    }
    drop(controller);
    drop(admin);
    detach_on_failure.disarm();
    if config.agent.detach_on_exit {
        match datapath::remove_pins(&config.agent.pin_root) {
            Ok(pins) => info!(
                removed = pins.len(),
                "detached: programs and pins removed (agent.detach_on_exit)"
            ),
            Err(e) => warn!("detaching on exit failed: {e}"),
        }
    } else {
        info!(pins = %layout.dir.display(), "exiting; programs stay attached and enforcing (pinned)");
    }
    info!(took_ms = stopping.elapsed().as_millis() as u64, "stopped");
    Ok(())
}

/// `service.instance.id`: random per agent process (128 bits, hex).
#[cfg(feature = "otlp")]
fn instance_id() -> String {
    let mut b = [0u8; 16];
    // No randomness (never on Linux): the pid still tells processes on one node apart.
    if getrandom::fill(&mut b).is_err() {
        return format!("pid-{}", std::process::id());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Resolves at the next policy switch (or when switch events were missed); never once the
/// event stream is closed.
async fn policy_switched(
    events: &mut Option<tokio::sync::broadcast::Receiver<crate::model::Event>>,
) {
    use tokio::sync::broadcast::error::RecvError;
    while let Some(rx) = events.as_mut() {
        match rx.recv().await {
            Ok(crate::model::Event::PolicySwitched { .. }) | Err(RecvError::Lagged(_)) => return,
            Ok(_) => {}
            Err(RecvError::Closed) => *events = None,
        }
    }
    std::future::pending().await
}
