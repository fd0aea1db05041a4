//! The beat engine: every `beat_interval_ms` it reads the kernel's handshake histograms, keeps a
//! sliding window of the last `window_beats` beats per class, decides class states with the
//! brownout [`ladder`], and writes them into the kernel.
//!
//! Beats count a monotonic `cycle`; `tick = cycle & 7`; tick 0 is the pulse that closes an 8-beat
//! cycle. A beat that overruns its period is counted and logged, never skipped silently.
//!
//! What the engine measures per class is the window's p99 of the class's latency source (the
//! kernel's sampled TCP handshake histograms by default, or its RTT histograms with
//! `<class>_latency = "rtt"`), compared with the `[slo]` ceiling of the class. Each beat also refills
//! the per-class admission budgets (`*_budget_per_beat`): the kernel spends one per admitted
//! connect, and past zero applies the strategy's action (refuse or park) until the next refill.

pub mod capacity;
pub mod heat;
pub mod ladder;

use crate::{
    config::BeatSettings,
    datapath::{ClassStateWriter, DatapathError, DatapathReader, LatencyHistogram},
    model::{
        AdmissionStrategy, Class, ClassState, ClassSummary, CycleSummary, Event, HotDestination,
        SloView,
    },
};
use ladder::Ladder;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGaugeVec, Opts, Registry};
use std::{
    collections::VecDeque,
    sync::{Arc, RwLock},
    time::{Instant, SystemTime},
};
use tokio::sync::broadcast;

/// What one beat saw and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeatReport {
    /// Beat number.
    pub cycle: u64,
    /// Window p99 per class, ns (`None` without samples).
    pub p99_ns: [Option<u64>; 3],
    /// Which classes breached.
    pub breach: [bool; 3],
    /// Class states after the beat.
    pub states: [ClassState; 3],
    /// On a pulse (`tick == 0`), the summary of the 8-beat cycle it closes (without its heat
    /// digest, which [`BeatEngine::run`] adds off the beat).
    pub pulse: Option<CycleSummary>,
}

/// Beats in a cycle; the beat with `cycle & 7 == 0` is the pulse.
pub const BEATS_PER_CYCLE: u64 = 8;

/// Heat entries read per beat: one batch syscall of about half a millisecond.
const HEAT_CHUNK: usize = 1024;

/// Capacity samples kept per class (one per window with enough samples).
const CAPACITY_SAMPLES: usize = 64;
/// Latency samples a window needs before its p99 counts as a capacity sample.
const MIN_SAMPLE_LATENCIES: u64 = 50;

struct Metrics {
    capacity: prometheus::GaugeVec,
    headroom: prometheus::GaugeVec,
    heat_evictions: IntCounter,
    beats: IntCounter,
    overruns: IntCounter,
    duration: Histogram,
    state: IntGaugeVec,
    window_p99: prometheus::GaugeVec,
}

impl Metrics {
    fn register(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let beats = IntCounter::new("knhk_beats_total", "Beats run by the beat engine.")?;
        let overruns = IntCounter::new(
            "knhk_beat_overruns_total",
            "Beats that took longer than the beat period.",
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new("knhk_beat_duration_seconds", "Processing time of one beat.")
                .buckets(vec![
                    1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1,
                ]),
        )?;
        let state = IntGaugeVec::new(
            Opts::new(
                "knhk_class_state",
                "1 for the current SLO admission state of each class (normal, degraded, paused).",
            ),
            &["class", "state"],
        )?;
        let window_p99 = prometheus::GaugeVec::new(
            Opts::new(
                "knhk_class_window_p99_seconds",
                "p99 over the beat window of the latency each class's SLO is judged by (source: handshake or rtt; absent without samples).",
            ),
            &["class", "source"],
        )?;
        let capacity = prometheus::GaugeVec::new(
            Opts::new(
                "knhk_class_capacity_connects_per_second",
                "Capacity model: the admission rate at which the class's handshake p99 reaches its ceiling (absent while unknown).",
            ),
            &["class"],
        )?;
        let headroom = prometheus::GaugeVec::new(
            Opts::new(
                "knhk_class_headroom_ratio",
                "Capacity model: predicted knee rate over the current admission rate (absent while unknown).",
            ),
            &["class"],
        )?;
        registry.register(Box::new(capacity.clone()))?;
        registry.register(Box::new(headroom.clone()))?;
        let heat_evictions = IntCounter::new(
            "knhk_heat_evictions_total",
            "Destinations evicted from the kernel heat LRU (inserted minus present).",
        )?;
        registry.register(Box::new(heat_evictions.clone()))?;
        registry.register(Box::new(beats.clone()))?;
        registry.register(Box::new(overruns.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(state.clone()))?;
        registry.register(Box::new(window_p99.clone()))?;
        for class in Class::ALL {
            for s in ClassState::ALL {
                state
                    .with_label_values(&[class.as_str(), s.as_str()])
                    .set((s == ClassState::Normal) as i64);
            }
        }
        // The window p99, capacity and headroom series are absent until they have a value
        // (never NaN: a NaN compares false in every alert expression).
        Ok(Metrics {
            capacity,
            headroom,
            heat_evictions,
            beats,
            overruns,
            duration,
            state,
            window_p99,
        })
    }
}

/// Sets the series of `labels` to `value`, or removes it when there is no finite value: an
/// unknown value is an absent series, never NaN.
fn set_or_remove(vec: &prometheus::GaugeVec, labels: &[&str], value: Option<f64>) {
    match value.filter(|v| v.is_finite()) {
        Some(v) => vec.with_label_values(labels).set(v),
        None => {
            // Absent already: nothing to remove.
            let _ = vec.remove_label_values(labels);
        }
    }
}

/// The engine's published state, read by other services through [`SloView`].
struct BeatView {
    ladder: Arc<RwLock<Ladder>>,
    heat: heat::HeatView,
}

impl SloView for BeatView {
    fn class_state(&self, class: Class) -> ClassState {
        // A poisoned lock means a beat panicked mid-write; report no shedding rather than stale.
        self.ladder
            .read()
            .map_or(ClassState::Normal, |l| l.state(class))
    }

    fn hottest(&self, n: usize) -> Vec<HotDestination> {
        self.heat.top(n)
    }

    fn hottest_grouped(
        &self,
        n: usize,
        group: &dyn Fn(u64) -> Option<u32>,
    ) -> Vec<(u32, HotDestination)> {
        self.heat.top_grouped(n, group)
    }
}

/// The beat engine. Owns its reader and writer; shared state is its published ladder.
pub struct BeatEngine {
    settings: BeatSettings,
    reader: DatapathReader,
    writer: ClassStateWriter,
    last: [LatencyHistogram; 3],
    /// Per beat of the window: latency deltas (`None`: no sample that beat) and connects
    /// admitted, per class.
    window: VecDeque<([Option<LatencyHistogram>; 3], [u64; 3])>,
    /// Per class, the sum of the window's deltas (kept as beats enter and leave it), and its
    /// p50 and p99 (recomputed only when the sum changed: an idle beat merges nothing).
    window_sum: [LatencyHistogram; 3],
    window_quantiles: [Option<(Option<u64>, Option<u64>)>; 3],
    ladder: Ladder,
    cycle: u64,
    published: Arc<RwLock<Ladder>>,
    events: broadcast::Sender<Event>,
    metrics: Metrics,
    heat: heat::HeatView,
    heat_cursor: crate::datapath::HeatCursor,
    /// The decision counters when the current (or, between walks, the last) heat walk began.
    /// The kernel records heat only with a decision: once two walks have begun and ended with
    /// the counters unchanged, the tracker has seen the map as it is, with every rate settled
    /// at zero, and no new walk starts until a decision (an idle node does not scan the heat
    /// map's buckets ten times a second). Rankings still decay to the current beat.
    heat_walk_from: Option<crate::datapath::Decisions>,
    /// Complete walks since the decision counters last moved.
    heat_quiet_walks: u8,
    /// Whether the last heat step ended a walk (the next one starts a new walk).
    heat_walk_done: bool,
    heat_inserts_seen: Option<u64>,
    last_pulse_decisions: Option<crate::datapath::Decisions>,
    /// The previous pulse's classes and policy generation, to tell a quiet cycle.
    last_pulse_seen: Option<([ClassSummary; 3], u64)>,
    last_beat_decisions: Option<crate::datapath::Decisions>,
    capacity_samples: [VecDeque<(f64, f64)>; 3],
    capacity_fits: [Option<capacity::Fit>; 3],
    /// Per class, the admission rate at which the model predicts the ceiling is reached.
    knees: [Option<f64>; 3],
    current_rates: [f64; 3],
    policy_status: Option<Arc<RwLock<crate::datapath::DatapathStatus>>>,
    summaries: broadcast::Sender<CycleSummary>,
}

impl std::fmt::Debug for BeatEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BeatEngine")
            .field("cycle", &self.cycle)
            .finish_non_exhaustive()
    }
}

impl BeatEngine {
    /// An engine over the datapath's maps. Every class starts `Normal` in the kernel.
    pub fn new(
        settings: BeatSettings,
        reader: DatapathReader,
        writer: ClassStateWriter,
        events: broadcast::Sender<Event>,
        registry: &Registry,
    ) -> Result<BeatEngine, DatapathError> {
        let metrics = Metrics::register(registry)
            .map_err(|e| DatapathError::Load(format!("registering beat metrics: {e}")))?;
        let over_budget = match settings.strategy {
            AdmissionStrategy::Strict => ClassState::Paused,
            AdmissionStrategy::Degrade => ClassState::Degraded,
        };
        for class in Class::ALL {
            writer.set(class, ClassState::Normal);
            writer.set_over_budget(class, over_budget);
            writer.set_budget(class, settings.budgets_per_beat[class.index()]);
        }
        writer.heartbeat(Some(settings.fail_open_after));
        let mut last: [LatencyHistogram; 3] = Default::default();
        for class in Class::ALL {
            let source = settings.latency_sources[class.index()];
            last[class.index()] = reader.histogram(source, class)?;
        }
        Ok(BeatEngine {
            reader,
            writer,
            last,
            window: VecDeque::new(),
            window_sum: Default::default(),
            window_quantiles: [None; 3],
            ladder: Ladder::default(),
            cycle: 0,
            published: Arc::new(RwLock::new(Ladder::default())),
            events,
            metrics,
            heat: heat::HeatView::new(
                heat::HeatTracker::new(settings.heat_half_life_beats),
                settings.heat_top_n,
            ),
            heat_cursor: Default::default(),
            heat_walk_from: None,
            heat_quiet_walks: 0,
            heat_walk_done: true,
            heat_inserts_seen: None,
            last_pulse_decisions: None,
            last_pulse_seen: None,
            last_beat_decisions: None,
            capacity_samples: Default::default(),
            capacity_fits: [None; 3],
            knees: [None; 3],
            current_rates: [0.0; 3],
            policy_status: None,
            summaries: broadcast::channel(64).0,
            settings,
        })
    }

    /// What other services read of this engine: class states as of the last beat, and heat
    /// rankings.
    pub fn view(&self) -> Arc<dyn SloView> {
        Arc::new(BeatView {
            ladder: self.published.clone(),
            heat: self.heat.clone(),
        })
    }

    /// Runs one beat: refill budgets, read, window, decide, write.
    pub fn beat(&mut self) -> Result<BeatReport, DatapathError> {
        self.cycle += 1;
        self.writer.heartbeat(Some(self.settings.fail_open_after));
        for class in Class::ALL {
            let i = class.index();
            let budget = capacity::budget_per_beat(
                self.settings.budgets_per_beat[i],
                self.settings.capacity_budgets,
                self.knees[i],
                self.settings.interval,
            );
            self.writer.set_budget(class, budget);
        }
        let mut delta: [Option<LatencyHistogram>; 3] = Default::default();
        for class in Class::ALL {
            let i = class.index();
            let source = self.settings.latency_sources[i];
            let now = self.reader.histogram(source, class)?;
            if now.count != self.last[i].count {
                let d = now.minus(&self.last[i]);
                self.window_sum[i].add_histogram(&d);
                self.window_quantiles[i] = None;
                delta[i] = Some(d);
                self.last[i] = now;
            }
        }
        let admitted = self.count_admissions()?;
        self.window.push_back((delta, admitted));
        while self.window.len() > self.settings.window_beats.max(1) {
            if let Some((gone, _)) = self.window.pop_front() {
                for (i, d) in gone.iter().enumerate() {
                    if let Some(d) = d {
                        self.window_sum[i].remove_histogram(d);
                        self.window_quantiles[i] = None;
                    }
                }
            }
        }
        let mut p99_ns = [None; 3];
        let mut p50_ns = [None; 3];
        let mut breach = [false; 3];
        for class in Class::ALL {
            let i = class.index();
            let sum = &self.window_sum[i];
            let (p50, p99) = *self.window_quantiles[i]
                .get_or_insert_with(|| (sum.quantile(0.5), sum.quantile(0.99)));
            p99_ns[i] = p99;
            p50_ns[i] = p50;
            if self
                .cycle
                .is_multiple_of(self.settings.window_beats.max(1) as u64)
            {
                self.sample_capacity(class, p99);
            }
            breach[i] = matches!((p99_ns[i], self.settings.ceilings_ns[i]), (Some(p), Some(max)) if p > max);
            set_or_remove(
                &self.metrics.window_p99,
                &[class.as_str(), self.settings.latency_sources[i].as_str()],
                p99_ns[i].map(|ns| ns as f64 / 1e9),
            );
        }
        if let Some(change) =
            self.ladder
                .step(breach, self.settings.strategy, self.settings.recover_beats)
        {
            self.writer.set(change.class, change.to);
            self.metrics
                .state
                .with_label_values(&[change.class.as_str(), change.from.as_str()])
                .set(0);
            self.metrics
                .state
                .with_label_values(&[change.class.as_str(), change.to.as_str()])
                .set(1);
            tracing::warn!(
                class = change.class.as_str(),
                from = change.from.as_str(),
                to = change.to.as_str(),
                cycle = self.cycle,
                p99_ns = ?p99_ns,
                "SLO admission changed a class state"
            );
            // No subscriber (no API watcher, no ledger) is not an error.
            let _ = self.events.send(Event::ClassStateChanged {
                at: SystemTime::now(),
                class: change.class,
                from: change.from,
                to: change.to,
            });
        }
        if let Ok(mut p) = self.published.write() {
            *p = self.ladder;
        }
        self.heat_step()?;
        if self.cycle.is_multiple_of(BEATS_PER_CYCLE) {
            self.refit_capacity();
        }
        let pulse = if self.cycle.is_multiple_of(BEATS_PER_CYCLE) {
            Some(self.pulse(p50_ns, p99_ns))
        } else {
            None
        };
        Ok(BeatReport {
            cycle: self.cycle,
            p99_ns,
            breach,
            states: self.ladder.states,
            pulse,
        })
    }

    /// Connects admitted per class since the last beat (allowed, audited or parked); updates
    /// the current admission rates.
    fn count_admissions(&mut self) -> Result<[u64; 3], DatapathError> {
        use knhk_abi::{ACTION_ALLOW, ACTION_AUDIT, ACTION_PARK};
        let now = self.reader.decisions()?;
        let before = self.last_beat_decisions.replace(now);
        let mut admitted = [0; 3];
        let Some(before) = before else {
            return Ok(admitted);
        };
        for class in Class::ALL {
            let i = class.index();
            admitted[i] = [ACTION_ALLOW, ACTION_AUDIT, ACTION_PARK]
                .iter()
                .map(|a| now.get(*a, class).saturating_sub(before.get(*a, class)))
                .sum();
            self.current_rates[i] = admitted[i] as f64 / self.settings.interval.as_secs_f64();
        }
        Ok(admitted)
    }

    /// One capacity sample of `class` per window (windows do not overlap): the window's
    /// admission rate and its p99 — the same statistic the ladder compares with the ceiling.
    fn sample_capacity(&mut self, class: Class, p99: Option<u64>) {
        let i = class.index();
        if self.window_sum[i].count < MIN_SAMPLE_LATENCIES {
            return;
        }
        let Some(p99) = p99 else {
            return;
        };
        let admitted: u64 = self.window.iter().map(|(_, a)| a[i]).sum();
        let secs = self.settings.interval.as_secs_f64() * self.window.len() as f64;
        let samples = &mut self.capacity_samples[i];
        samples.push_back((admitted as f64 / secs, p99 as f64 / 1e9));
        while samples.len() > CAPACITY_SAMPLES {
            samples.pop_front();
        }
    }

    /// Refits the capacity model of each class (at pulses) and exports knee and headroom.
    fn refit_capacity(&mut self) {
        for class in Class::ALL {
            let i = class.index();
            let samples: Vec<(f64, f64)> = self.capacity_samples[i].iter().copied().collect();
            self.capacity_fits[i] = capacity::fit(&samples);
            let ceiling = self.settings.ceilings_ns[i].map(|ns| ns as f64 / 1e9);
            let knee = self.capacity_fits[i]
                .zip(ceiling)
                .and_then(|(f, c)| f.knee(c));
            self.knees[i] = knee;
            let headroom = ceiling.and_then(|c| {
                capacity::headroom(self.capacity_fits[i].as_ref(), c, self.current_rates[i])
            });
            set_or_remove(&self.metrics.capacity, &[class.as_str()], knee);
            set_or_remove(&self.metrics.headroom, &[class.as_str()], headroom);
        }
    }

    /// The capacity model of `class` as of the last pulse.
    pub fn capacity_fit(&self, class: Class) -> Option<capacity::Fit> {
        self.capacity_fits[class.index()]
    }

    /// The summary of the cycle that ends at this pulse (decision deltas since the last pulse).
    fn pulse(&mut self, p50_ns: [Option<u64>; 3], p99_ns: [Option<u64>; 3]) -> CycleSummary {
        use knhk_abi::{ACTION_ALLOW, ACTION_AUDIT, ACTION_DENY, ACTION_PARK, ACTION_SHED};
        // The counters this beat already read for the capacity samples.
        // Before the first beat and pulse the counts start from zero.
        let now = self.last_beat_decisions.unwrap_or_default();
        let before = self.last_pulse_decisions.replace(now).unwrap_or_default();
        let delta = |action: u8, class: Class| {
            now.get(action, class)
                .saturating_sub(before.get(action, class))
        };
        let mut classes = [ClassSummary::default(); 3];
        for class in Class::ALL {
            let i = class.index();
            classes[i] = ClassSummary {
                admitted: delta(ACTION_ALLOW, class)
                    + delta(ACTION_AUDIT, class)
                    + delta(ACTION_PARK, class),
                refused: delta(ACTION_DENY, class) + delta(ACTION_SHED, class),
                parked: delta(ACTION_PARK, class),
                p50_ns: p50_ns[i],
                p99_ns: p99_ns[i],
                state: Some(self.ladder.states[i]),
            };
        }
        let policy_generation = self
            .policy_status
            .as_ref()
            // A poisoned status (a panicked writer) reports generation 0, as before any apply.
            .and_then(|s| s.read().ok().map(|s| s.generation))
            .unwrap_or(0);
        let seen = (classes, policy_generation);
        let quiet = self.last_pulse_seen.replace(seen) == Some(seen)
            && classes.iter().all(|c| c.admitted == 0 && c.refused == 0);
        CycleSummary {
            cycle: self.cycle,
            classes,
            policy_generation,
            heat_digest: String::new(),
            quiet,
        }
    }

    /// Cycle summaries from now on: one per pulse, for the receipts ledger.
    pub fn summaries(&self) -> broadcast::Receiver<CycleSummary> {
        self.summaries.subscribe()
    }

    /// Lets pulses report the live policy generation.
    pub fn with_policy_status(
        mut self,
        status: Arc<RwLock<crate::datapath::DatapathStatus>>,
    ) -> Self {
        self.policy_status = Some(status);
        self
    }

    /// Reads the next chunk of the heat map into the tracker; at the end of a walk, counts
    /// evictions. Rankings are computed by whoever asks ([`heat::HeatView`]), not in the beat.
    fn heat_step(&mut self) -> Result<(), DatapathError> {
        if self.heat_walk_done {
            let decisions = self.last_beat_decisions;
            if decisions.is_none() || decisions != self.heat_walk_from {
                self.heat_walk_from = decisions;
                self.heat_quiet_walks = 0;
            } else if self.heat_quiet_walks >= 2 {
                self.heat.advance(self.cycle);
                return Ok(());
            }
        }
        let (entries, done) = self.reader.heat_step(&mut self.heat_cursor, HEAT_CHUNK)?;
        self.heat_walk_done = done;
        if done {
            self.heat_quiet_walks = self.heat_quiet_walks.saturating_add(1);
        }
        let present = self.heat.observe(self.cycle, &entries, done);
        if let Some(present) = present {
            let inserts = self.reader.heat_inserts()?;
            let evicted = inserts.saturating_sub(present as u64);
            let before = self.heat_inserts_seen.replace(evicted).unwrap_or(0);
            if evicted > before {
                self.metrics.heat_evictions.inc_by(evicted - before);
            }
        }
        Ok(())
    }

    /// A shared view of the heat tracker: rankings, and a Prometheus collector of them.
    pub fn heat_view(&self) -> heat::HeatView {
        self.heat.clone()
    }

    /// The hottest destinations as of the last beat (`n` of them).
    pub fn hottest(&self, n: usize) -> Vec<HotDestination> {
        self.heat.top(n)
    }

    /// Destinations evicted from the kernel heat LRU, as of the last completed walk.
    pub fn heat_evictions(&self) -> u64 {
        self.heat_inserts_seen.unwrap_or(0)
    }

    /// Completes a pulse's summary with the heat digest (a ranking: computed off the beat) and
    /// publishes it.
    fn emit(&self, mut summary: CycleSummary, runtime: &tokio::runtime::Handle) {
        if summary.quiet {
            // Not receipted: no heat digest to compute.
            let _ = self.summaries.send(summary);
            return;
        }
        let heat = self.heat.clone();
        let top_n = self.settings.heat_top_n;
        let tx = self.summaries.clone();
        runtime.spawn_blocking(move || {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for d in heat.top(top_n) {
                h.update(format!("{}:{}/{} {:.3}\n", d.addr, d.port, d.proto, d.heat).as_bytes());
            }
            summary.heat_digest = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            tracing::debug!(cycle = summary.cycle, "cycle summary");
            // No ledger subscribed (no [kms]): the summary is only logged.
            let _ = tx.send(summary);
        });
    }

    /// Beats until `shutdown` resolves. Overruns are counted and logged; a failed beat is
    /// logged and the next one tries again.
    ///
    /// The beats run on a thread of their own (`knhk-beat`): a beat is a few dozen map syscalls,
    /// and one thread sleeping to the next deadline wakes once per beat, where a runtime timer
    /// plus `block_in_place` woke several threads per beat (most of an idle agent's CPU).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Handle::current();
        let spawned = std::thread::Builder::new()
            .name("knhk-beat".into())
            .spawn(move || {
                self.beat_until(&stop_rx, &runtime);
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            tracing::error!("SLO admission is off: starting the beat thread failed: {e}");
            return;
        }
        shutdown.await;
        let _ = stop_tx.send(());
        // The thread leaves the kernel neutral before it ends; a beat in flight finishes first.
        let _ = done_rx.await;
    }

    /// The beat thread: one beat per interval until `stop` receives (or its sender is gone).
    fn beat_until(
        mut self,
        stop: &std::sync::mpsc::Receiver<()>,
        runtime: &tokio::runtime::Handle,
    ) {
        use std::sync::mpsc::RecvTimeoutError;
        let interval = self.settings.interval;
        let mut next = Instant::now() + interval;
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            match stop.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
            }
            let started = Instant::now();
            match self.beat() {
                Ok(BeatReport {
                    pulse: Some(summary),
                    ..
                }) => self.emit(summary, runtime),
                Ok(_) => {}
                Err(e) => tracing::error!(
                    cycle = self.cycle,
                    "beat failed (the next one retries): {e}"
                ),
            }
            let took = started.elapsed();
            self.metrics.beats.inc();
            self.metrics.duration.observe(took.as_secs_f64());
            if took > interval {
                self.metrics.overruns.inc();
                tracing::warn!(
                    cycle = self.cycle,
                    took_us = took.as_micros() as u64,
                    "beat overran its period"
                );
            }
            // After an overrun the next beat is a whole interval later (no burst to catch up).
            let now = Instant::now();
            next += interval;
            if next < now {
                next = now + interval;
            }
        }
        // Leave the kernel neutral: nothing shed on decisions nobody maintains.
        for class in Class::ALL {
            self.writer.set(class, ClassState::Normal);
            self.writer.set_budget(class, None);
        }
    }
}
