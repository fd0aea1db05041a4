//! `knhk-agent run`: wires the datapath, the cgroup follower and the admin server together.
//!
//! Order: validate config (done by the caller) → bind the admin server (fail before touching the
//! kernel if the port is taken) → load, attach or re-adopt the datapath → switch in the policy →
//! follow rule cgroups until SIGINT/SIGTERM. Pins stay in place on exit (enforcement survives
//! restarts) unless `agent.detach_on_exit` is set.

use crate::{
    config::Config,
    datapath::{
        self, cgroup, Datapath, DatapathError, DatapathOptions, DatapathReader, DatapathStatus,
        ScopeChange,
    },
    policy::Policy,
    telemetry::{AdminServer, DatapathCollector, Readiness},
};
use std::{
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};
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

    let opts = DatapathOptions {
        cgroup_root: root.clone(),
        pin_root: config.agent.pin_root.clone(),
        heat_max_entries: config.agent.heat_max_entries,
    };
    let datapath = blocking(move || Datapath::start(&opts)).await??;
    let layout = datapath.pins().clone();
    let datapath = Arc::new(Mutex::new(datapath));
    let policy = Policy::from_config(&config);
    let report = {
        let dp = datapath.clone();
        blocking(move || {
            dp.lock()
                .map_err(|_| poisoned())
                .and_then(|mut dp| dp.apply(&policy).map_err(AgentError::from))
        })
        .await??
    };
    info!(
        generation = report.generation,
        rules = report.rules,
        trie_entries = report.trie_entries,
        switch_us = report.switch_latency.as_micros() as u64,
        "policy switched in"
    );
    for p in &report.pending_scopes {
        info!(cgroup = %p, "rule cgroup does not exist yet: its rules take effect when it appears");
    }

    let status = Arc::new(RwLock::new(snapshot(&datapath)));
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

    let mode = format!("{:?}", config.agent.mode).to_lowercase();
    println!(
        "knhk-agent running ({mode} mode, policy generation {}, attached to {})\n  metrics  http://{}/metrics\n  health   http://{}/healthz  http://{}/readyz\n  pins     {}",
        report.generation,
        root.display(),
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
                let dp = datapath.clone();
                let result = blocking(move || {
                    let mut dp = dp.lock().map_err(|_| poisoned())?;
                    let changes = dp.refresh_scopes()?;
                    dp.reclaim_inactive_slot()?;
                    Ok::<_, AgentError>((changes, dp.status()))
                }).await?;
                match result {
                    Ok((changes, snap)) => {
                        for c in &changes {
                            match c {
                                ScopeChange::Appeared { path, id } => info!(cgroup = %path, id, "rule cgroup appeared: its rules are enforced"),
                                ScopeChange::Removed { path, id } => info!(cgroup = %path, id, "rule cgroup removed: its entries were cleared"),
                            }
                        }
                        if let Ok(mut s) = status.write() { *s = snap; }
                    }
                    Err(e) => error!("following rule cgroups failed (will retry): {e}"),
                }
            }
        }
    }

    drop(admin);
    if config.agent.detach_on_exit {
        drop(datapath);
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

fn poisoned() -> AgentError {
    AgentError::Internal("the datapath lock is poisoned after a panic".into())
}

fn snapshot(dp: &Arc<Mutex<Datapath>>) -> DatapathStatus {
    dp.lock().map(|d| d.status()).unwrap_or_default()
}
