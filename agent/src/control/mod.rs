//! The agent's control core: every operation the API and the CLI offer, on domain types.
//!
//! [`Controller`] owns the datapath writer, the policy history (live and previous generation) and
//! the event stream. Writers are serialized by one async lock, and each write may carry the
//! generation it expects to replace (compare-and-swap). The gRPC services in [`crate::api`] only
//! translate to and from these calls.

use crate::semconv::{attr, span};
use crate::{
    config::Config,
    datapath::{
        Datapath, DatapathError, DatapathReader, DatapathStatus, Decisions, Explanation, HeatEntry,
        LatencyHistogram, ScopeChange, VerdictRing,
    },
    model::{
        log_escape, Class, ClassState, Event, Inventory, LatencySource, Protocol, SloView, Verdict,
    },
    policy::{Policy, PolicyDiff},
};
use knhk_abi::{ACTION_ALLOW, ACTION_AUDIT, ACTION_DENY};
use opentelemetry::{
    trace::{FutureExt as _, Span as _, SpanKind, Tracer as _},
    KeyValue,
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Instant, SystemTime},
};
use tokio::sync::broadcast;

mod live_store;
mod rollout;
pub use live_store::{LiveRecord, LiveStore};
pub use rollout::{RolloutRecord, RolloutRequest, RolloutStatus, ROLLBACK_REASONS};

/// Why a control operation was refused or failed. Nothing was applied in any case.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The caller expected another live generation.
    #[error("expected generation {expected}, but the live generation is {live}; read it again and retry")]
    StaleGeneration {
        /// What the caller expected.
        expected: u64,
        /// The live generation.
        live: u64,
    },
    /// There is no earlier generation to roll back to.
    #[error("there is no previous generation to roll back to (live generation {live})")]
    NoPrevious {
        /// The live generation.
        live: u64,
    },
    /// The datapath refused or failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The live policy kept under `agent.state_dir` cannot be read or written.
    #[error("{0}")]
    LiveState(String),
    /// A policy change was asked for while a rollout runs.
    #[error(
        "a rollout of candidate generation {candidate} is {state} (at {share} of workloads): \
         promote or abort it (`knhk-agent rollout promote|abort`) before changing the policy"
    )]
    RolloutInProgress {
        /// The candidate's generation.
        candidate: u64,
        /// The rollout's state.
        state: &'static str,
        /// Its share of workloads.
        share: String,
    },
    /// A rollout operation was refused (none running, nothing to roll out, holding).
    #[error("{0}")]
    Rollout(String),
    /// A worker thread failed.
    #[error("internal error: {0}")]
    Internal(String),
    /// A fleet bundle is this node's source of truth: direct applies and rollbacks are refused.
    #[error("this node follows the fleet bundle {url} ([bundle]): its policy changes only by publishing a new bundle there (`knhk-agent bundle publish`), not through ApplyPolicy or Rollback")]
    BundleManaged {
        /// The bundle URL.
        url: String,
    },
}

impl ControlError {
    /// A low-cardinality name of the failure (the `error.type` of spans).
    pub fn error_type(&self) -> &'static str {
        match self {
            ControlError::StaleGeneration { .. } => "stale_generation",
            ControlError::NoPrevious { .. } => "no_previous",
            ControlError::Datapath(_) => "datapath",
            ControlError::LiveState(_) => "live_state",
            ControlError::RolloutInProgress { .. } | ControlError::Rollout(_) => "rollout",
            ControlError::Internal(_) => "internal",
            ControlError::BundleManaged { .. } => "bundle_managed",
        }
    }
}

/// One generation: its number, document and digest.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generation number.
    pub number: u64,
    /// The document.
    pub policy: Arc<Policy>,
    /// `policy.digest()`.
    pub digest: String,
}

/// What an apply or rollback did.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The new live generation.
    pub generation: Generation,
    /// Rule cgroups that do not exist yet.
    pub pending_cgroups: Vec<String>,
    /// Trie entries written.
    pub trie_entries: usize,
    /// When the kernel switched to the new generation.
    pub switched_at: Instant,
}

/// Measured latency of one class against its SLO ceiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassLatency {
    /// The class.
    pub class: Class,
    /// Handshakes timed.
    pub handshake_samples: u64,
    /// Handshake p50, ns.
    pub handshake_p50_ns: Option<u64>,
    /// Handshake p99, ns.
    pub handshake_p99_ns: Option<u64>,
    /// RTT p99, ns.
    pub rtt_p99_ns: Option<u64>,
    /// Configured p99 ceiling, ns.
    pub p99_max_ns: Option<u64>,
}

impl ClassLatency {
    /// Whether the handshake p99 is within the ceiling (true without ceiling or samples).
    pub fn within_slo(&self) -> bool {
        match (self.handshake_p99_ns, self.p99_max_ns) {
            (Some(p99), Some(max)) => p99 <= max,
            _ => true,
        }
    }
}

/// Groups of heat scopes: the group of each scope id, and the pod (namespace, name) of each
/// group (group 0: no pod).
type HeatGroups = (HashMap<u64, u32>, Vec<Option<(String, String)>>);

/// What [`Controller::heat`] is asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeatQuery {
    /// Entries to return (0: `agent.heat_top_n`).
    pub limit: usize,
    /// One entry per (pod, destination) instead of one per destination.
    pub by_pod: bool,
    /// Only the attempts of this pod (namespace, name); implies `by_pod`.
    pub pod: Option<(String, String)>,
}

/// Heat of the hottest destinations.
#[derive(Debug, Clone, PartialEq)]
pub struct Heat {
    /// Hottest first: by decayed heat when the beat engine runs, else by raw attempts. Summed
    /// over the deciding scopes of each destination (per pod: of each pod and destination);
    /// `scope` is 0.
    pub entries: Vec<HeatEntry>,
    /// Per pod: the pod (namespace, name) of each entry (same order); `None` for attempts decided
    /// by a scope that is no pod the agent knows (the global scope, a rule cgroup above the
    /// pods). Empty when not asked per pod.
    pub pods: Vec<Option<(String, String)>>,
    /// Decayed heat and rising rate of each entry (same order), when the beat engine runs.
    pub decayed: Option<Vec<(f64, f64)>>,
    /// Entries in the map: (deciding scope, destination) pairs.
    pub map_entries: usize,
    /// Map capacity.
    pub map_capacity: u32,
}

struct History {
    live: Generation,
    previous: Option<Generation>,
    /// What set the live generation: one of `live_store::SOURCES`.
    source: &'static str,
    /// The running (or last) rollout.
    rollout: Option<rollout::RolloutRun>,
}

/// The control core. Cheap to share behind an `Arc`.
pub struct Controller {
    datapath: Arc<Mutex<Datapath>>,
    reader: DatapathReader,
    history: tokio::sync::Mutex<History>,
    status: Arc<RwLock<DatapathStatus>>,
    events: broadcast::Sender<Event>,
    /// Kernel verdicts (deny, audit, shed, park), apart from `events`: they come in bursts, and
    /// must not crowd out the events the receipts ledger records.
    verdicts: broadcast::Sender<Verdict>,
    /// Where the live policy is kept across restarts (`None`: not kept, e.g. benchmarks).
    store: Option<LiveStore>,
    /// Digest of the configuration file's policy, as recorded with each saved generation.
    file_digest: String,
    defaults: Policy,
    max_rules: usize,
    /// p99 ceilings per class (ns), from `[slo]`.
    ceilings_ns: [Option<u64>; 3],
    heat_top_n: usize,
    /// The beat engine's view, when SLO admission runs.
    slo_view: Option<Arc<dyn SloView>>,
    metrics: PolicyMetrics,
    /// The node's pods, when workload discovery runs.
    inventory: RwLock<Option<Arc<Inventory>>>,
    /// The node's ring, flags and rollout defaults (`[promotion]`).
    promotion: crate::config::PromotionSettings,
    /// `agent.state_dir`, where the live policy and the rollout record are kept (`None`: not
    /// kept).
    state_dir: Option<std::path::PathBuf>,
    rollout_metrics: rollout::RolloutMetrics,
    /// When the pins were last checked (see [`Controller::tick`]).
    pin_check: Mutex<Instant>,
    /// The fleet bundle URL when one is the source of truth (`[bundle]`): then `apply` and
    /// `rollback` are refused and only [`Controller::apply_bundle`] changes the policy.
    bundle_source: std::sync::OnceLock<String>,
}

/// Policy switch metrics; registered by [`Controller::register_metrics`].
struct PolicyMetrics {
    info: prometheus::IntGaugeVec,
    /// The digest `info` carries now.
    digest: std::sync::Mutex<Option<String>>,
    last_switch: prometheus::Gauge,
    failures: prometheus::IntCounterVec,
}

/// Why a policy change failed, as `knhk_policy_apply_failures_total` labels it.
pub const APPLY_FAILURE_REASONS: [&str; 6] = [
    "invalid",
    "capacity",
    "stale_generation",
    "no_previous",
    "deadline",
    "internal",
];

impl PolicyMetrics {
    fn new() -> Result<PolicyMetrics, prometheus::Error> {
        let info = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "knhk_policy_info",
                "1 for the live policy generation, labelled with its digest (one series).",
            ),
            &["digest"],
        )?;
        let last_switch = prometheus::Gauge::new(
            "knhk_policy_last_switch_timestamp_seconds",
            "When the kernel last switched to a new policy generation (Unix time).",
        )?;
        let failures = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "knhk_policy_apply_failures_total",
                "ApplyPolicy and Rollback calls that changed nothing, by reason (invalid, capacity, stale_generation, no_previous, deadline, internal).",
            ),
            &["reason"],
        )?;
        for r in APPLY_FAILURE_REASONS {
            failures.with_label_values(&[r]);
        }
        Ok(PolicyMetrics {
            info,
            digest: std::sync::Mutex::new(None),
            last_switch,
            failures,
        })
    }

    fn switched(&self, digest: &str) {
        // The new series first, then the old one goes: a scrape never sees none.
        self.info.with_label_values(&[digest]).set(1);
        if let Ok(mut current) = self.digest.lock() {
            if let Some(old) = current.replace(digest.to_owned()) {
                if old != digest {
                    // Already absent: nothing to remove.
                    let _ = self.info.remove_label_values(&[&old]);
                }
            }
        }
        self.last_switch.set(
            SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
    }
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ControlError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))
}

impl Controller {
    /// Takes over a started datapath and makes a policy live: the one `live` kept (its store
    /// and the record the caller loaded from it, re-adopted with its generation) unless the
    /// configuration's policy changed since, else the configuration's. Events are published on
    /// `events`; `slo_view` is the beat engine's view when SLO admission runs.
    pub async fn start(
        datapath: Datapath,
        config: &Config,
        events: broadcast::Sender<Event>,
        slo_view: Option<Arc<dyn SloView>>,
        live: Option<(LiveStore, Option<LiveRecord>)>,
    ) -> Result<Arc<Controller>, ControlError> {
        let reader = DatapathReader::open(datapath.pins())?;
        let ring = VerdictRing::open(datapath.pins(), &datapath.status().cgroup_root)?;
        let policy = Arc::new(config.policy());
        let file_digest = policy.digest();
        let (store, saved) = match live {
            Some((store, saved)) => (Some(store), saved),
            None => (None, None),
        };
        let state_dir = store
            .as_ref()
            .and_then(|s| s.path().parent().map(std::path::Path::to_path_buf));
        // Until the first switch below, the live generation is whatever the pins held.
        let adopted = Generation {
            number: datapath.generation(),
            digest: String::new(),
            policy: policy.clone(),
        };
        let status = datapath.status();
        let controller = Arc::new(Controller {
            datapath: Arc::new(Mutex::new(datapath)),
            reader,
            history: tokio::sync::Mutex::new(History {
                live: adopted,
                previous: None,
                source: "file",
                rollout: None,
            }),
            status: Arc::new(RwLock::new(status)),
            events,
            verdicts: broadcast::channel(VERDICT_CHANNEL).0,
            store,
            file_digest: file_digest.clone(),
            // The settings only: documents bring their own rules.
            defaults: Policy {
                rules: Vec::new(),
                ..(*policy).clone()
            },
            max_rules: config.policy.max_rules,
            ceilings_ns: config
                .settings
                .beat
                .as_ref()
                .map_or([None; 3], |b| b.ceilings_ns),
            heat_top_n: config.agent.heat_top_n as usize,
            slo_view,
            metrics: PolicyMetrics::new()
                .map_err(|e| ControlError::Internal(format!("policy metrics: {e}")))?,
            inventory: RwLock::new(None),
            promotion: config.settings.promotion.clone(),
            state_dir,
            rollout_metrics: rollout::RolloutMetrics::new()
                .map_err(|e| ControlError::Internal(format!("rollout metrics: {e}")))?,
            pin_check: Mutex::new(Instant::now()),
            bundle_source: std::sync::OnceLock::new(),
        });
        spawn_verdict_pump(Arc::downgrade(&controller), ring)?;
        // Which policy is live: the one kept under agent.state_dir (same generation), unless
        // the operator changed the file's policy since it was last applied.
        let floor = controller
            .datapath
            .lock()
            .map_err(|_| poisoned())?
            .generation();
        let (policy, generation, cause, source) = match saved {
            Some(record) if record.file_digest == file_digest => {
                let kept = record.policy(&policy)?;
                if kept.digest() != record.digest {
                    return Err(ControlError::LiveState(format!(
                        "the policy kept in {} has digest {}, but the record says {}; remove the file to apply the configuration's policy",
                        controller.store.as_ref().map_or_else(String::new, |s| s.path().display().to_string()),
                        kept.digest(),
                        record.digest
                    )));
                }
                let source = live_store::SOURCES
                    .into_iter()
                    .find(|s| *s == record.source)
                    .unwrap_or("file");
                tracing::info!(
                    generation = record.generation,
                    source,
                    "re-adopting the live policy kept under agent.state_dir: the configuration file's policy has not changed since it was last applied"
                );
                (
                    Arc::new(kept),
                    Some(record.generation),
                    "re-adopted",
                    source,
                )
            }
            Some(record) => {
                tracing::info!(
                    previous_generation = record.generation,
                    previous_source = %record.source,
                    "the configuration file's policy changed since it was last applied: applying it"
                );
                let next = record.generation.max(floor) + 1;
                (policy, Some(next), "file changed", "file")
            }
            None => (policy, None, "startup", "file"),
        };
        let applied = controller
            .switch(policy, None, cause, source, generation)
            .await?;
        let mut history = controller.history.lock().await;
        history.live = applied.generation;
        history.source = source;
        drop(history);
        controller.recover_rollout().await;
        Ok(controller)
    }

    /// The configured settings that documents without their own fall back to (mode, default
    /// action and class, heat and histogram switches); its rules are the configuration's.
    pub fn defaults(&self) -> &Policy {
        &self.defaults
    }

    /// Most rules a policy may have.
    pub fn max_rules(&self) -> usize {
        self.max_rules
    }

    /// Registers the policy metrics (`knhk_policy_info`, `knhk_policy_last_switch_timestamp_seconds`,
    /// `knhk_policy_apply_failures_total`) with `registry`.
    pub fn register_metrics(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.metrics.info.clone()))?;
        registry.register(Box::new(self.metrics.last_switch.clone()))?;
        registry.register(Box::new(self.metrics.failures.clone()))?;
        self.rollout_metrics.register(registry)?;
        Ok(())
    }

    /// Counts a policy change that failed (`reason`: one of [`APPLY_FAILURE_REASONS`]), for
    /// `knhk_policy_apply_failures_total`; the API calls it for every refused apply or rollback.
    pub fn count_apply_failure(&self, reason: &str) {
        let reason = if APPLY_FAILURE_REASONS.contains(&reason) {
            reason
        } else {
            "internal"
        };
        self.metrics.failures.with_label_values(&[reason]).inc();
    }

    /// A shared snapshot of the datapath, refreshed after every change (for metrics).
    pub fn status_handle(&self) -> Arc<RwLock<DatapathStatus>> {
        self.status.clone()
    }

    /// Makes the fleet bundle at `url` this node's source of truth: from now on `apply` and
    /// `rollback` are refused naming it. Set once, at start.
    pub fn set_bundle_source(&self, url: String) {
        // Already set: the first URL stays (there is one [bundle] per agent).
        let _ = self.bundle_source.set(url);
    }

    /// A bundle's policy with this node's own settings (heat, histograms, verdict events): the
    /// document brings rules and modes.
    fn with_node_settings(&self, policy: Policy) -> Policy {
        let d = &self.defaults;
        Policy {
            heat: d.heat,
            heat_sample_every: d.heat_sample_every,
            histograms: d.histograms,
            histogram_interval_us: d.histogram_interval_us,
            verdict_events: d.verdict_events,
            ..policy
        }
    }

    fn check_not_bundle_managed(&self) -> Result<(), ControlError> {
        match self.bundle_source.get() {
            Some(url) => Err(ControlError::BundleManaged { url: url.clone() }),
            None => Ok(()),
        }
    }

    /// Switches in the policy of a verified fleet bundle (source and cause "bundle"), unless it
    /// is already live (same digest): then `Ok(None)`.
    pub async fn apply_bundle(
        self: &Arc<Self>,
        policy: Policy,
    ) -> Result<Option<Applied>, ControlError> {
        let policy = self.with_node_settings(policy);
        let this = self.clone();
        tokio::spawn(async move {
            let mut history = this.history.lock().await;
            // The bundle is the source of truth: a rollout of an earlier bundle gives way.
            this.supersede_rollout(&mut history).await?;
            if history.live.digest == policy.digest() {
                history.source = "bundle";
                return Ok(None);
            }
            let applied = this
                .switch(Arc::new(policy), None, "bundle", "bundle", None)
                .await?;
            let previous = std::mem::replace(&mut history.live, applied.generation.clone());
            history.previous = Some(previous);
            history.source = "bundle";
            Ok(Some(applied))
        })
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))?
    }

    /// Switches in `policy` as a new generation. With `expected`, fails unless that is the live
    /// generation; with `deadline`, fails (changing nothing) if it passes before the switch.
    ///
    /// The write runs as a task of its own: a caller that goes away (a cancelled RPC) cannot
    /// leave the kernel switched but the history not updated.
    pub async fn apply(
        self: &Arc<Self>,
        policy: Policy,
        expected: Option<u64>,
        deadline: Option<Instant>,
    ) -> Result<Applied, ControlError> {
        self.check_not_bundle_managed()?;
        let this = self.clone();
        // The caller's trace (the ApplyPolicy span) goes along into the task.
        let cx = opentelemetry::Context::current();
        tokio::spawn(
            async move {
                let mut history = this.history.lock().await;
                refuse_during_rollout(&history)?;
                check_expected(expected, history.live.number)?;
                let applied = this
                    .switch(Arc::new(policy), deadline, "apply", "apply", None)
                    .await?;
                let previous = std::mem::replace(&mut history.live, applied.generation.clone());
                history.previous = Some(previous);
                history.source = "apply";
                Ok(applied)
            }
            .with_context(cx),
        )
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))?
    }

    /// Applies the previous generation's document again, as a new generation (in a task of its
    /// own, like [`Controller::apply`]).
    pub async fn rollback(
        self: &Arc<Self>,
        expected: Option<u64>,
        deadline: Option<Instant>,
    ) -> Result<(Applied, u64), ControlError> {
        self.check_not_bundle_managed()?;
        let this = self.clone();
        let cx = opentelemetry::Context::current();
        tokio::spawn(async move { this.rollback_now(expected, deadline).await }.with_context(cx))
            .await
            .map_err(|e| ControlError::Internal(e.to_string()))?
    }

    async fn rollback_now(
        &self,
        expected: Option<u64>,
        deadline: Option<Instant>,
    ) -> Result<(Applied, u64), ControlError> {
        let mut history = self.history.lock().await;
        refuse_during_rollout(&history)?;
        check_expected(expected, history.live.number)?;
        let Some(previous) = history.previous.clone() else {
            return Err(ControlError::NoPrevious {
                live: history.live.number,
            });
        };
        let applied = self
            .switch(
                previous.policy.clone(),
                deadline,
                "rollback",
                "rollback",
                None,
            )
            .await?;
        let replaced = std::mem::replace(&mut history.live, applied.generation.clone());
        history.previous = Some(replaced);
        history.source = "rollback";
        Ok((applied, previous.number))
    }

    /// Switches `policy` in (as `generation` when given, else the next one), then keeps it
    /// under `agent.state_dir` with its `source` before the caller is answered.
    async fn switch(
        &self,
        policy: Arc<Policy>,
        deadline: Option<Instant>,
        cause: &'static str,
        source: &'static str,
        generation: Option<u64>,
    ) -> Result<Applied, ControlError> {
        let dp = self.datapath.clone();
        let p = policy.clone();
        let published = self.status.clone();
        // The kernel switch, a child of the caller's span (ApplyPolicy, Rollback) when there is one.
        let tracer = opentelemetry::global::tracer("knhk-agent");
        let mut span = tracer
            .span_builder(span::KNHK_DATAPATH_SWITCH)
            .with_kind(SpanKind::Internal)
            .with_attributes([
                KeyValue::new(attr::KNHK_POLICY_CAUSE, cause),
                KeyValue::new(attr::KNHK_POLICY_RULES, policy.rules.len() as i64),
            ])
            .start(&tracer);
        let switched = blocking(move || {
            let mut dp = dp.lock().map_err(|_| poisoned())?;
            let started = Instant::now();
            let report = dp.apply_as(&p, deadline, generation)?;
            let switched_at = started + report.switch_latency;
            // Published under the datapath lock, so snapshots are published in datapath order.
            if let Ok(mut s) = published.write() {
                *s = dp.status();
            }
            drop(dp);
            // A large switch (a 100,000-rule compile) leaves tens of MB freed but kept by the
            // allocator; hand them back so the pod's resident memory reflects the live policy.
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only releases free heap pages; it has no other effect.
            unsafe {
                libc::malloc_trim(0);
            }
            Ok::<_, ControlError>((report, switched_at))
        })
        .await
        .and_then(|r| r);
        match &switched {
            Ok((report, _)) => {
                span.set_attribute(KeyValue::new(
                    attr::KNHK_POLICY_GENERATION,
                    report.generation as i64,
                ));
                span.set_attribute(KeyValue::new(
                    attr::KNHK_POLICY_TRIE_ENTRIES,
                    report.trie_entries as i64,
                ));
            }
            Err(e) => {
                span.set_attribute(KeyValue::new(attr::ERROR_TYPE, e.error_type()));
                span.set_status(opentelemetry::trace::Status::error(e.to_string()));
            }
        }
        span.end();
        let (report, switched_at) = switched?;
        let generation = Generation {
            number: report.generation,
            digest: policy.digest(),
            policy,
        };
        tracing::info!(
            generation = generation.number,
            cause,
            rules = generation.policy.rules.len(),
            trie_entries = report.trie_entries,
            switch_us = report.switch_latency.as_micros() as u64,
            digest = %generation.digest,
            "policy switched in"
        );
        for p in &report.pending_scopes {
            tracing::info!(cgroup = %log_escape(&p.to_string()), "rule cgroup does not exist yet: its rules take effect when it appears");
        }
        self.keep_live(&generation, source).await;
        self.emit_switch(&generation, cause);
        self.metrics.switched(&generation.digest);
        Ok(Applied {
            generation,
            pending_cgroups: report
                .pending_scopes
                .iter()
                .map(|p| p.to_string())
                .collect(),
            trie_entries: report.trie_entries,
            switched_at,
        })
    }

    /// Keeps `generation` under `agent.state_dir` as the live policy, set by `source`. The
    /// kernel already enforces it; a failure to keep it is loud, and a restart would re-adopt
    /// the generation kept before.
    async fn keep_live(&self, generation: &Generation, source: &'static str) {
        let Some(store) = &self.store else {
            return;
        };
        let record = LiveRecord {
            generation: generation.number,
            digest: generation.digest.clone(),
            source: source.into(),
            file_digest: self.file_digest.clone(),
            policy: generation.policy.to_config_toml(),
        };
        let store = store.clone();
        let number = generation.number;
        match blocking(move || store.save(&record)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(
                generation = number,
                "{e}: a restart would not re-adopt this generation"
            ),
            Err(e) => tracing::error!(generation = number, "keeping the live policy: {e}"),
        }
    }

    fn emit_switch(&self, g: &Generation, cause: &'static str) {
        // No subscriber (no API watcher, no ledger) is not an error.
        let _ = self.events.send(Event::PolicySwitched {
            at: SystemTime::now(),
            generation: g.number,
            digest: g.digest.clone(),
            cause,
        });
    }

    /// The live generation.
    pub async fn live(&self) -> Generation {
        self.history.lock().await.live.clone()
    }

    /// What set the live generation: "file", "apply", "rollback" or "bundle".
    pub async fn live_source(&self) -> &'static str {
        self.history.lock().await.source
    }

    /// What applying `policy` would change against the live generation, after every check an
    /// apply makes (the datapath's [`Datapath::prepare`]); nothing is written.
    pub async fn dry_run(&self, policy: &Policy) -> Result<(Generation, PolicyDiff), ControlError> {
        let dp = self.datapath.clone();
        let p = policy.clone();
        blocking(move || {
            let dp = dp.lock().map_err(|_| poisoned())?;
            dp.prepare(&p).map(|_| ()).map_err(ControlError::from)
        })
        .await??;
        let live = self.live().await;
        let diff = live.policy.diff(policy);
        Ok((live, diff))
    }

    /// Follows rule cgroups with `follow` (e.g. [`crate::datapath::Follower::turn`], or
    /// [`Datapath::refresh_scopes`]) and reclaims retired policy slots; called periodically and
    /// when the cgroup tree changed. The RCU grace period is waited for without holding the
    /// datapath, so applies never wait on it. Status is republished only when a scope changed.
    pub async fn tick<F>(&self, follow: F) -> Result<(), ControlError>
    where
        F: FnOnce(&mut Datapath) -> Result<Vec<ScopeChange>, DatapathError> + Send + 'static,
    {
        // Missing pins are looked for once a second (a stat per pin), not every tick.
        let pins_due = match self.pin_check.lock() {
            Ok(mut last) if last.elapsed() >= PIN_CHECK_INTERVAL => {
                *last = Instant::now();
                true
            }
            _ => false,
        };
        let dp = self.datapath.clone();
        let published = self.status.clone();
        let changes = blocking(move || {
            let ticket = {
                let dp = dp.lock().map_err(|_| poisoned())?;
                dp.begin_reclaim()
            };
            if let Some(ticket) = ticket {
                crate::datapath::grace_period()?;
                // A few hundred removals (well under a millisecond) per hold of the datapath,
                // so an apply never waits long behind a reclaim.
                while dp
                    .lock()
                    .map_err(|_| poisoned())?
                    .finish_reclaim(ticket, 256)?
                {}
            }
            let mut dp = dp.lock().map_err(|_| poisoned())?;
            let changes = follow(&mut dp)?;
            if pins_due {
                let restored = dp.restore_pins()?;
                if !restored.is_empty() {
                    tracing::warn!(
                        pins = restored.len(),
                        first = %restored[0].display(),
                        "pins were deleted under the running agent: pinned them again (enforcement never stopped: the agent holds every map and link)"
                    );
                }
            }
            // Under the datapath lock: a switch that follows cannot be overwritten by this.
            if !changes.is_empty() {
                if let Ok(mut s) = published.write() {
                    *s = dp.status();
                }
            }
            Ok::<_, ControlError>(changes)
        })
        .await??;
        self.report_scope_changes(changes);
        Ok(())
    }

    /// Logs and publishes scope changes.
    fn report_scope_changes(&self, changes: Vec<ScopeChange>) {
        for c in changes {
            let (cgroup, present) = match &c {
                ScopeChange::Appeared { path, id } => {
                    tracing::info!(cgroup = %log_escape(&path.to_string()), id, "rule cgroup appeared: its rules are enforced");
                    (path.to_string(), true)
                }
                ScopeChange::Removed { path, id } => {
                    tracing::info!(cgroup = %log_escape(&path.to_string()), id, "rule cgroup removed: its entries were cleared");
                    (path.to_string(), false)
                }
                ScopeChange::Unresolvable { path, reason } => {
                    tracing::error!(
                        cgroup = %log_escape(path.as_str()),
                        reason = %log_escape(reason),
                        "rule cgroup cannot be followed: its rules stay pending (other rules are unaffected); fix or remove the rule"
                    );
                    continue;
                }
            };
            // No subscriber is not an error.
            let _ = self.events.send(Event::CgroupChanged {
                at: SystemTime::now(),
                cgroup,
                present,
            });
        }
    }

    /// Kernel verdicts from now on (see [`Verdict`]).
    pub fn verdicts(&self) -> broadcast::Receiver<Verdict> {
        self.verdicts.subscribe()
    }

    /// Which rule of the live kernel tables decides a connect from `cgroup` (relative to the
    /// cgroup root) to `dest`:`port` over `protocol`, and why.
    pub async fn explain(
        &self,
        cgroup: String,
        dest: std::net::IpAddr,
        port: u16,
        protocol: Protocol,
    ) -> Result<Explanation, ControlError> {
        let dp = self.datapath.clone();
        blocking(move || {
            let dp = dp.lock().map_err(|_| poisoned())?;
            Ok(dp.explain(&cgroup, dest, port, protocol)?)
        })
        .await?
    }

    /// Takes the node's current pods (from workload discovery): the live policy's selector
    /// rules are re-bound to them in the kernel at once.
    pub async fn set_inventory(&self, inventory: Arc<Inventory>) -> Result<(), ControlError> {
        if let Ok(mut i) = self.inventory.write() {
            *i = Some(inventory.clone());
        }
        let dp = self.datapath.clone();
        let published = self.status.clone();
        let changes = blocking(move || {
            let mut dp = dp.lock().map_err(|_| poisoned())?;
            let changes = dp.set_inventory(inventory)?;
            if let Ok(mut s) = published.write() {
                *s = dp.status();
            }
            Ok::<_, ControlError>(changes)
        })
        .await??;
        self.report_scope_changes(changes);
        Ok(())
    }

    /// The node's pods as last reported by workload discovery (`None`: discovery is off).
    pub fn inventory(&self) -> Option<Arc<Inventory>> {
        self.inventory.read().ok().and_then(|i| i.clone())
    }

    /// The cgroup (relative to the cgroup root) of the pod `namespace/name` on this node.
    pub async fn pod_cgroup(&self, namespace: &str, name: &str) -> Result<String, ControlError> {
        let Some(inv) = self.inventory() else {
            return Err(ControlError::Datapath(DatapathError::NoSuchPod {
                pod: format!("{namespace}/{name}"),
                reason: "workload discovery is off (add a [kubernetes] section)".into(),
            }));
        };
        inv.pod(namespace, name)
            .map(|p| p.cgroup.to_string())
            .ok_or_else(|| {
                ControlError::Datapath(DatapathError::NoSuchPod {
                    pod: format!("{namespace}/{name}"),
                    reason: format!("no such pod on this node ({} pods known)", inv.pods.len()),
                })
            })
    }

    /// The datapath snapshot and the decision counters.
    pub fn status(&self) -> Result<(DatapathStatus, Decisions), ControlError> {
        // A poisoned snapshot (a panicked writer) reads as empty; the counters below are live.
        let status = self.status.read().map(|s| s.clone()).unwrap_or_default();
        Ok((status, self.reader.decisions()?))
    }

    /// Every rule of the live policy with at least one hit, most hits first (ties by name).
    pub fn rule_hits(&self) -> Vec<(String, u64)> {
        // A poisoned snapshot (a panicked writer) reads as no rules.
        let counters = self
            .status
            .read()
            .map(|s| (s.rule_counters.clone(), s.pod_counters.clone()))
            .unwrap_or_else(|_| (std::sync::Arc::from([]), std::sync::Arc::from([])));
        self.reader.ranked_rule_hits(&counters.0, &counters.1, None)
    }

    /// Latency per class against the `[slo]` ceilings (map reads on a blocking thread).
    pub async fn slo(self: &Arc<Self>) -> Result<Vec<ClassLatency>, ControlError> {
        let this = self.clone();
        blocking(move || this.slo_now()).await?
    }

    fn slo_now(&self) -> Result<Vec<ClassLatency>, ControlError> {
        let mut out = Vec::new();
        for class in Class::ALL {
            let hs: LatencyHistogram = self.reader.histogram(LatencySource::Handshake, class)?;
            let rtt = self.reader.histogram(LatencySource::Rtt, class)?;
            let ceiling = self.ceilings_ns[class.index()];
            out.push(ClassLatency {
                class,
                handshake_samples: hs.count,
                handshake_p50_ns: hs.quantile(0.5),
                handshake_p99_ns: hs.quantile(0.99),
                rtt_p99_ns: rtt.quantile(0.99),
                p99_max_ns: ceiling,
            });
        }
        Ok(out)
    }

    /// The hottest destinations (or, per pod, (pod, destination) pairs) `q` asks for. Reads the
    /// whole heat map (up to `agent.heat_max_entries` entries), on a blocking thread.
    pub async fn heat(self: &Arc<Self>, q: HeatQuery) -> Result<Heat, ControlError> {
        let this = self.clone();
        blocking(move || this.heat_now(q)).await?
    }

    /// Groups of scopes for a per-pod answer: the group of each scope id of the live
    /// generation that is (or is in) a pod of the inventory, and the pod of each group (group 0:
    /// no pod). With `only`, just that pod's scopes.
    fn heat_groups(&self, only: Option<&(String, String)>) -> HeatGroups {
        let mut groups = HashMap::new();
        let mut pods: Vec<Option<(String, String)>> = vec![None];
        let Some(inv) = self.inventory() else {
            return (groups, pods);
        };
        let Ok(status) = self.status.read() else {
            return (groups, pods);
        };
        let mut by_pod: HashMap<(&str, &str), u32> = HashMap::new();
        for (id, path) in status.active_scope_ids.iter().zip(&status.active_scopes) {
            let Some(p) = inv.pod_of(path) else { continue };
            if only.is_some_and(|(ns, name)| *ns != p.namespace || *name != p.name) {
                continue;
            }
            let g = *by_pod
                .entry((p.namespace.as_str(), p.name.as_str()))
                .or_insert_with(|| {
                    pods.push(Some((p.namespace.clone(), p.name.clone())));
                    (pods.len() - 1) as u32
                });
            groups.insert(*id, g);
        }
        (groups, pods)
    }

    fn heat_now(&self, q: HeatQuery) -> Result<Heat, ControlError> {
        let all = self.reader.heat_entries()?;
        let limit = if q.limit == 0 {
            self.heat_top_n
        } else {
            q.limit
        };
        let map_entries = all.len();
        let per_pod = q.by_pod || q.pod.is_some();
        let (groups, pods) = if per_pod {
            self.heat_groups(q.pod.as_ref())
        } else {
            (HashMap::new(), vec![None])
        };
        // Per destination: every scope in group 0. Per pod: a pod's scopes in its group, the
        // rest in group 0 (left out when one pod is asked for).
        let group = |scope: u64| -> Option<u32> {
            match groups.get(&scope) {
                Some(g) => Some(*g),
                None if q.pod.is_some() => None,
                None => Some(0),
            }
        };
        type Key = (u32, std::net::IpAddr, u16, u8);
        // Raw attempts summed per (group, destination).
        let mut attempts: HashMap<Key, HeatEntry> = HashMap::new();
        for e in all {
            let Some(g) = group(e.scope) else { continue };
            attempts
                .entry((g, e.addr, e.port, e.proto))
                .and_modify(|s| {
                    s.attempts = s.attempts.saturating_add(e.attempts);
                    s.last_seen_ns = s.last_seen_ns.max(e.last_seen_ns);
                })
                .or_insert(HeatEntry { scope: 0, ..e });
        }
        let (ranked, decayed): (Vec<(u32, HeatEntry)>, _) = match &self.slo_view {
            Some(view) => {
                let top = view.hottest_grouped(limit, &group);
                let entries = top
                    .iter()
                    .map(|(g, d)| {
                        let e = attempts
                            .get(&(*g, d.addr, d.port, d.proto))
                            .cloned()
                            .unwrap_or(HeatEntry {
                                scope: 0,
                                addr: d.addr,
                                port: d.port,
                                proto: d.proto,
                                attempts: 0,
                                last_seen_ns: 0,
                            });
                        (*g, e)
                    })
                    .collect();
                (
                    entries,
                    Some(top.iter().map(|(_, d)| (d.heat, d.rising)).collect()),
                )
            }
            None => {
                let mut v: Vec<(u32, HeatEntry)> =
                    attempts.into_iter().map(|((g, ..), e)| (g, e)).collect();
                // Most attempts first, ties by destination, then pod.
                v.sort_by(|(ga, a), (gb, b)| {
                    b.attempts
                        .cmp(&a.attempts)
                        .then(a.addr.cmp(&b.addr))
                        .then(a.port.cmp(&b.port))
                        .then(a.proto.cmp(&b.proto))
                        .then_with(|| pods[*ga as usize].cmp(&pods[*gb as usize]))
                });
                v.truncate(limit);
                (v, None)
            }
        };
        Ok(Heat {
            map_entries,
            map_capacity: self.reader.heat_capacity(),
            pods: if per_pod {
                ranked
                    .iter()
                    .map(|(g, _)| pods.get(*g as usize).cloned().flatten())
                    .collect()
            } else {
                Vec::new()
            },
            entries: ranked.into_iter().map(|(_, e)| e).collect(),
            decayed,
        })
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The sender other components (the beat engine) publish their events on.
    pub fn event_sender(&self) -> broadcast::Sender<Event> {
        self.events.clone()
    }

    /// The SLO admission state of `class` (`Normal` without a beat engine).
    pub fn class_state(&self, class: Class) -> ClassState {
        self.slo_view
            .as_ref()
            .map_or(ClassState::Normal, |v| v.class_state(class))
    }

    /// Decision counts of `class`: (allowed, denied, audited, shed).
    pub fn decisions_of(d: &Decisions, class: Class) -> (u64, u64, u64, u64) {
        (
            d.get(ACTION_ALLOW, class),
            d.get(ACTION_DENY, class),
            d.get(ACTION_AUDIT, class),
            d.get(knhk_abi::ACTION_SHED, class),
        )
    }
}

/// Verdicts buffered for slow watchers before they fall behind (and are dropped).
const VERDICT_CHANNEL: usize = 4096;
/// Verdicts read from the ring per wake-up.
const VERDICT_BATCH: usize = 256;

/// Reads the kernel's verdict ring as events arrive and publishes them on the controller's
/// verdict channel (and at trace level in the log). Ends with the controller.
fn spawn_verdict_pump(
    controller: std::sync::Weak<Controller>,
    ring: VerdictRing,
) -> Result<(), ControlError> {
    struct Ring(VerdictRing);
    impl std::os::fd::AsRawFd for Ring {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            std::os::fd::AsRawFd::as_raw_fd(&self.0.fd())
        }
    }
    // SAFETY: the ring owns its file descriptor and keeps it open, unreplaced, for as long as
    // the `AsyncFd` holds it.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(Ring(ring), tokio::io::Interest::READABLE)
    }
    .map_err(|e| ControlError::Internal(format!("watching the verdict ring: {e}")))?;
    tokio::spawn(async move {
        // Rule names of the generation and pod expansions last seen: ((generation, pod
        // counters), counter id -> name).
        let mut names: ((u64, usize), HashMap<u32, String>) = ((u64::MAX, 0), HashMap::new());
        loop {
            let mut ready = match fd.readable_mut().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("verdict events stopped: waiting on the ring failed: {e}");
                    return;
                }
            };
            let Some(ctl) = controller.upgrade() else {
                return;
            };
            if let Ok(status) = ctl.status.read() {
                let seen = (
                    status.generation,
                    std::sync::Arc::as_ptr(&status.pod_counters) as *const u8 as usize,
                );
                if seen != names.0 {
                    names = (
                        seen,
                        status
                            .rule_counters
                            .iter()
                            .map(|(n, c)| (*c, n.clone()))
                            .chain(status.pod_counters.iter().filter_map(|p| {
                                // A selector rule's expansions name their rule.
                                status
                                    .rule_counters
                                    .get(p.rule)
                                    .map(|(n, _)| (p.id, n.clone()))
                            }))
                            .collect(),
                    );
                }
            }
            let batch = ready.get_inner_mut().0.drain(VERDICT_BATCH, &names.1);
            if batch.len() < VERDICT_BATCH {
                ready.clear_ready();
            }
            let inventory = ctl.inventory();
            for mut v in batch {
                if let Some(inv) = &inventory {
                    v.pod = v
                        .cgroup
                        .parse::<crate::model::CgroupPath>()
                        .ok()
                        .and_then(|c| inv.pod_of(&c))
                        .map(|p| format!("{}/{}", p.namespace, p.name));
                }
                tracing::trace!(
                    cgroup = %log_escape(&v.cgroup),
                    destination = %v.destination,
                    port = v.port,
                    protocol = v.protocol,
                    action = v.action,
                    class = %v.class,
                    rule = %log_escape(v.rule.as_deref().unwrap_or("(default)")),
                    generation = v.generation,
                    hook = v.hook,
                    "verdict"
                );
                // No watcher is not an error.
                let _ = ctl.verdicts.send(v);
            }
        }
    });
    Ok(())
}

/// How often [`Controller::tick`] looks for pins deleted under the running agent.
const PIN_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Refuses a direct policy change while a rollout runs.
fn refuse_during_rollout(history: &History) -> Result<(), ControlError> {
    match history.rollout.as_ref() {
        Some(r) if !r.status.state.ended() => Err(ControlError::RolloutInProgress {
            candidate: r.status.candidate_generation,
            state: r.status.state.as_str(),
            share: r
                .status
                .share()
                .map_or_else(|| "0%".into(), |p| p.to_string()),
        }),
        _ => Ok(()),
    }
}

fn check_expected(expected: Option<u64>, live: u64) -> Result<(), ControlError> {
    match expected {
        Some(e) if e != live => Err(ControlError::StaleGeneration { expected: e, live }),
        _ => Ok(()),
    }
}

fn poisoned() -> ControlError {
    ControlError::Internal("the datapath lock is poisoned after a panic".into())
}
