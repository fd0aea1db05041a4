//! `knhk-agent run`: wires the datapath, the control core, the gRPC API, the cgroup follower and
//! the admin server together.
//!
//! Order: validate config (done by the caller) → bind the gRPC and admin listeners (fail before
//! touching the kernel if an address is refused or taken) → load, attach or re-adopt the datapath
//! → switch in the policy → serve the gRPC API → follow rule cgroups until SIGINT/SIGTERM. Pins stay in place on exit (enforcement survives
//! restarts) unless `agent.detach_on_exit` is set.

use crate::{
    api,
    beat::{BeatEngine, BeatSettings},
    config::Config,
    control::{ControlError, Controller},
    datapath::{self, cgroup, Datapath, DatapathError, DatapathOptions, DatapathReader},
    identity::{Identity, IdentityError, IdentitySettings},
    receipts::{NewReceipt, ReceiptKind, ReceiptSettings, Receipts, ReceiptsError},
    sync::{Replicator, SyncSettings},
    telemetry::{AdminServer, DatapathCollector, Readiness},
};
use std::{path::PathBuf, sync::Arc, time::Duration};
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
    /// A background task panicked.
    #[error("internal error: {0}")]
    Internal(String),
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

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), AgentError> {
    // Bind both listeners before anything touches the kernel: a bad address changes nothing.
    let identity_settings = config
        .spiffe
        .as_ref()
        .and_then(|s| IdentitySettings::from_section(s).ok().flatten());
    let api_listener = api::bind(config.agent.listen_address, identity_settings.is_some()).await?;
    let root = cgroup_root(&config)?;
    let registry = prometheus::Registry::new();
    let readiness = Arc::new(Readiness::default());
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
            let identity = Arc::new(Identity::start(settings, &registry).await?);
            readiness.register("workload identity", identity.readiness_check());
            Some(identity)
        }
        None => None,
    };

    // The receipts ledger is opened before anything touches the kernel: a damaged ledger stops
    // the agent with nothing attached.
    let mut ledger = match ReceiptSettings::from_config(&config) {
        Some(settings) => Some(Receipts::open_ledger(&settings).await?),
        None => None,
    };

    let opts = DatapathOptions {
        cgroup_root: root.clone(),
        pin_root: config.agent.pin_root.clone(),
        heat_max_entries: config.agent.heat_max_entries,
    };
    let datapath = blocking(move || Datapath::start(&opts)).await??;
    let layout = datapath.pins().clone();
    let class_states = datapath.class_state_writer();
    let controller = Controller::start(datapath, &config).await?;

    let status = controller.status_handle();
    let collector = DatapathCollector::new(
        DatapathReader::open(&layout)?,
        status.clone(),
        config.agent.heat_top_n as usize,
    );
    if let Err(e) = registry.register(Box::new(collector)) {
        return Err(AgentError::Internal(format!("registering metrics: {e}")));
    }
    let probe = DatapathReader::open(&layout)?;
    let link_dir = layout.links_dir();
    readiness.register("programs attached", move || {
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

    // SLO admission: the beat engine runs when [slo] is configured.
    let (stop_beat, beat_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut summaries = None;
    let beat_task = match BeatSettings::from_config(&config) {
        Some(settings) => {
            let engine = BeatEngine::new(
                settings.clone(),
                DatapathReader::open(&layout)?,
                class_states,
                controller.event_sender(),
                &registry,
            )?
            .with_policy_status(controller.status_handle());
            summaries = Some(engine.summaries());
            controller.attach_ladder(engine.ladder_handle());
            controller.attach_heat(engine.heat_view());
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
            Some(tokio::spawn(engine.run(async {
                let _ = beat_stopped.await;
            })))
        }
        None => None,
    };
    for w in config.warnings() {
        warn!("{w}");
    }

    // The receipts ledger runs when [kms] names a signing key.
    let receipts = match ReceiptSettings::from_config(&config) {
        Some(settings) => {
            let path = settings.path.clone();
            let signer = settings
                .signer
                .connect()
                .await
                .map_err(ReceiptsError::from)?;
            let ledger = match ledger.take() {
                Some(l) => l,
                None => Receipts::open_ledger(&settings).await?,
            };
            let receipts = Receipts::start_on(
                ledger,
                settings,
                signer,
                &registry,
                Some(controller.event_sender().subscribe()),
                summaries,
            )
            .await?;
            readiness.register("receipts signing", receipts.readiness_check());
            let live = controller.live().await;
            receipts
                .append(NewReceipt {
                    kind: ReceiptKind::PolicySwitch,
                    cycle: 0,
                    policy_generation: live.number,
                    payload: serde_json::to_vec(&serde_json::json!({
                        "generation": live.number, "digest": live.digest, "cause": "startup",
                    }))
                    .unwrap_or_default(),
                })
                .await
                .map_err(AgentError::Internal)?;
            info!(path = %path.display(), "receipts ledger on");
            Some(receipts)
        }
        None => None,
    };

    // Region sync replicates the ledger when [multi_region] enables it.
    let sync = match (
        config
            .multi_region
            .as_ref()
            .and_then(|m| SyncSettings::from_section(m).ok().flatten()),
        &receipts,
    ) {
        (Some(settings), Some(r)) => {
            // Foreign ledgers live beside this region's own.
            let peers_dir = r
                .path()
                .parent()
                .map_or_else(|| PathBuf::from("peers"), |dir| dir.join("peers"));
            info!(region = %settings.region, peers = settings.peers.len(), quorum = settings.quorum, "region sync on");
            let sync =
                Replicator::start(settings, r.clone(), identity.clone(), peers_dir, &registry)
                    .map_err(|e| AgentError::Internal(e.to_string()))?;
            readiness.register("region quorum", sync.readiness_check());
            Some(sync)
        }
        (Some(_), None) => {
            warn!("[multi_region] enables sync but there is no receipts ledger ([kms]): nothing to replicate");
            None
        }
        _ => None,
    };

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
            let _ = api_stopped.await;
        },
    )
    .await?;

    let mode = format!("{:?}", config.agent.mode).to_lowercase();
    let generation = controller.live().await.number;
    println!(
        "knhk-agent running ({mode} mode, policy generation {generation}, attached to {})\n  grpc     {}\n  metrics  http://{}/metrics\n  health   http://{}/healthz  http://{}/readyz\n  pins     {}",
        root.display(),
        api.local_addr,
        admin.local_addr,
        admin.local_addr,
        admin.local_addr,
        layout.dir.display(),
    );

    let poll = Duration::from_millis(config.agent.cgroup_poll_interval_ms);
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| AgentError::Internal(format!("installing the SIGTERM handler: {e}")))?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = ticker.tick() => {
                if let Err(e) = controller.tick().await {
                    error!(
                        "following rule cgroups failed (will retry): {}",
                        crate::telemetry::log_escape(&e.to_string())
                    );
                }
            }
        }
    }
    if let Some(r) = &receipts {
        // A last checkpoint over everything written; its signature may come with the next run.
        r.pulse(0).await;
    }
    let _ = stop_api.send(());
    let _ = stop_beat.send(());
    if let Some(t) = beat_task {
        let _ = t.await;
    }
    match tokio::time::timeout(Duration::from_secs(5), api.task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!("the gRPC server stopped with an error: {e}"),
        _ => warn!("the gRPC server did not stop within 5 s"),
    }
    drop(controller);

    drop(admin);
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
    Ok(())
}
