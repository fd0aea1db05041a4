//! Rollouts on this node: a candidate generation (a policy, feature flags, or both) staged in the
//! kernel beside the live one, split per workload, stepped and gated every beat, promoted on its
//! own when every step passes, or put back to 0 % in the same beat a gate fails.
//!
//! The pure parts (split function, gates, plan) are `model::rollout`; the kernel side is
//! `datapath::split`. This module drives them under the controller's write lock, so a rollout
//! and an apply never interleave.

use super::{blocking, poisoned, ControlError, Controller, Generation, History};
use crate::{
    datapath::{DatapathReader, Decisions, LatencyHistogram},
    model::{
        rollout::{side_of, BeatSample, GateVerdict, StepAnalysis},
        Class, Event, FeatureFlag, FeatureFlags, LatencySource, Percent, RolloutPlan, RolloutState,
        Side,
    },
    policy::Policy,
};
use knhk_abi::{ACTION_DENY, ACTION_SHED};
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

/// What a rollout is asked to change.
#[derive(Debug, Clone, Default)]
pub struct RolloutRequest {
    /// The candidate policy (`None`: the live one, for a flags-only rollout).
    pub policy: Option<Policy>,
    /// The candidate's feature flags (`None`: the live generation's).
    pub flags: Option<FeatureFlags>,
    /// Steps (`None`: `[promotion] steps`, capped at `traffic_percent` on a canary node).
    pub steps: Option<Vec<Percent>>,
    /// Beats per step (`None`: `[promotion] beats_per_step`).
    pub beats_per_step: Option<u32>,
    /// The split's seed (`None`: the candidate's digest and flags, so every node running the
    /// same candidate splits the same way).
    pub seed: Option<String>,
}

/// A rollout as the API reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutStatus {
    /// Where it is.
    pub state: RolloutState,
    /// Its plan.
    pub plan: RolloutPlan,
    /// Index of the current step in `plan.steps`.
    pub step: usize,
    /// The live generation the candidate is compared with.
    pub stable_generation: u64,
    /// The candidate's generation.
    pub candidate_generation: u64,
    /// The candidate's policy digest.
    pub candidate_digest: String,
    /// The candidate's feature flags.
    pub flags: FeatureFlags,
    /// The gates' analysis of the current step.
    pub analysis: StepAnalysis,
    /// Workloads on the candidate, and in all, at the last beat.
    pub workloads: (usize, usize),
    /// Why it ended or paused (a gate's figures, an operator's reason).
    pub reason: Option<String>,
    /// When it started.
    pub started_at: SystemTime,
    /// Beats since it started.
    pub beats: u64,
    /// The beat at which a gate failed.
    pub gate_failed_at_beat: Option<u64>,
    /// The beat at which the candidate was at 0 % again (after a failed gate or an abort).
    pub zeroed_at_beat: Option<u64>,
}

impl RolloutStatus {
    /// The current step's share of workloads on the candidate (0 once it ended other than
    /// promoted).
    pub fn share(&self) -> Option<Percent> {
        match self.state {
            RolloutState::RolledBack | RolloutState::Aborted => None,
            RolloutState::Promoted => Some(Percent::ALL),
            _ => self.plan.steps.get(self.step).copied(),
        }
    }
}

/// The running rollout: its status and what the next beat compares with.
#[derive(Debug)]
pub(super) struct RolloutRun {
    pub(super) status: RolloutStatus,
    candidate: Generation,
    baseline: SideCounters,
}

/// Per-side counters at one beat, to take the next beat's difference.
#[derive(Debug, Clone, Default)]
struct SideCounters {
    decisions: [Decisions; 2],
    handshakes: [[LatencyHistogram; 3]; 2],
}

const CLASSES: [Class; 3] = [Class::R1, Class::W1, Class::C1];

fn read_sides(reader: &DatapathReader) -> Result<SideCounters, ControlError> {
    let mut out = SideCounters::default();
    for (i, side) in Side::ALL.into_iter().enumerate() {
        out.decisions[i] = reader.decisions_on(side)?;
        for (c, class) in CLASSES.into_iter().enumerate() {
            out.handshakes[i][c] = reader.histogram_on(side, LatencySource::Handshake, class)?;
        }
    }
    Ok(out)
}

fn totals(d: &Decisions) -> (u64, u64) {
    let all: u64 = d.0.iter().flatten().sum();
    (all, d.total(ACTION_DENY) + d.total(ACTION_SHED))
}

/// What a beat saw of each side: per-class handshake p99 against the class ceilings, and
/// decisions and denies, as differences from the previous beat.
fn beat_sample(
    now: &SideCounters,
    before: &SideCounters,
    ceilings: &[Option<u64>; 3],
) -> BeatSample {
    let mut s = BeatSample::default();
    for (c, ceiling) in ceilings.iter().enumerate() {
        for side in 0..2 {
            let delta = now.handshakes[side][c].minus(&before.handshakes[side][c]);
            let breach = match (*ceiling, delta.quantile(0.99)) {
                (Some(ceiling), Some(p99)) if delta.count > 0 => Some(p99 > ceiling),
                (_, _) if delta.count > 0 => Some(false),
                _ => None,
            };
            if side == 0 {
                s.stable_breach[c] = breach;
            } else {
                s.candidate_breach[c] = breach;
            }
        }
    }
    let diff = |a: (u64, u64), b: (u64, u64)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1));
    s.stable = diff(totals(&now.decisions[0]), totals(&before.decisions[0]));
    s.candidate = diff(totals(&now.decisions[1]), totals(&before.decisions[1]));
    s
}

/// The flags a policy carries.
pub fn flags_of(p: &Policy) -> FeatureFlags {
    let mut f = FeatureFlags::new();
    if p.heat {
        f.insert(FeatureFlag::HeatTracking);
    }
    if p.histograms {
        f.insert(FeatureFlag::LatencyHistograms);
    }
    if p.verdict_events {
        f.insert(FeatureFlag::VerdictEvents);
    }
    f
}

fn with_flags(mut p: Policy, f: &FeatureFlags) -> Policy {
    p.heat = f.contains(&FeatureFlag::HeatTracking);
    p.histograms = f.contains(&FeatureFlag::LatencyHistograms);
    p.verdict_events = f.contains(&FeatureFlag::VerdictEvents);
    p
}

/// The rollout record kept under `agent.state_dir` (`rollout.json`), so that a restart knows a
/// rollout was live and records how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// `RolloutState::as_str`.
    pub state: String,
    /// The candidate's generation.
    pub candidate_generation: u64,
    /// The candidate's digest.
    pub candidate_digest: String,
    /// The step's index.
    pub step: usize,
}

/// Where the rollout record is kept.
pub fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("rollout.json")
}

impl Controller {
    /// Starts a rollout: stages the candidate in the kernel beside the live generation (no
    /// workload on it yet); the next beat puts the first step's share on it. Refused while
    /// another rollout runs.
    pub async fn start_rollout(
        self: &Arc<Self>,
        req: RolloutRequest,
    ) -> Result<RolloutStatus, ControlError> {
        self.check_not_bundle_managed()?;
        let mut history = self.history.lock().await;
        self.start_locked(&mut history, req, "api").await
    }

    /// Runs a fleet bundle's rollout: unless the same candidate (policy digest and flags) is
    /// already rolling out, was promoted, or was rolled back (a bundle whose candidate failed
    /// its gates is not retried until a new bundle comes), a running rollout of another
    /// candidate is aborted as superseded and this one starts. Returns what happened.
    pub async fn bundle_rollout(
        self: &Arc<Self>,
        policy: Policy,
        req: RolloutRequest,
    ) -> Result<String, ControlError> {
        let policy = self.with_node_settings(policy);
        let mut history = self.history.lock().await;
        let flags = req
            .flags
            .clone()
            .unwrap_or_else(|| flags_of(&history.live.policy));
        let digest = with_flags(policy.clone(), &flags).digest();
        if digest == history.live.digest && flags == flags_of(&history.live.policy) {
            self.supersede_rollout(&mut history).await?;
            history.source = "bundle";
            return Ok(format!("already live (generation {})", history.live.number));
        }
        if let Some(run) = history.rollout.as_ref() {
            let same = run.status.candidate_digest == digest && run.status.flags == flags;
            if same {
                return Ok(format!(
                    "the rollout of this candidate (generation {}) is {}",
                    run.status.candidate_generation,
                    run.status.state.as_str()
                ));
            }
            if !run.status.state.ended() {
                self.end_locked(
                    &mut history,
                    RolloutState::Aborted,
                    "superseded by a new fleet bundle".into(),
                )
                .await?;
            }
        }
        let status = self
            .start_locked(
                &mut history,
                RolloutRequest {
                    policy: Some(policy),
                    ..req
                },
                "bundle",
            )
            .await?;
        Ok(format!(
            "rollout of generation {} started ({})",
            status.candidate_generation,
            status
                .plan
                .steps
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(" → ")
        ))
    }

    /// Ends a running rollout because the fleet bundle replaced it; no-op without one.
    pub(super) async fn supersede_rollout(
        &self,
        history: &mut History,
    ) -> Result<(), ControlError> {
        if history
            .rollout
            .as_ref()
            .is_some_and(|r| !r.status.state.ended())
        {
            self.end_locked(
                history,
                RolloutState::Aborted,
                "superseded by a new fleet bundle".into(),
            )
            .await?;
        }
        Ok(())
    }

    async fn start_locked(
        self: &Arc<Self>,
        history: &mut History,
        req: RolloutRequest,
        by: &'static str,
    ) -> Result<RolloutStatus, ControlError> {
        if let Some(run) = history.rollout.as_ref().filter(|r| !r.status.state.ended()) {
            return Err(in_progress(&run.status));
        }
        let live = history.live.clone();
        let base = req.policy.clone().unwrap_or_else(|| (*live.policy).clone());
        let flags = req.flags.clone().unwrap_or_else(|| flags_of(&live.policy));
        let candidate = Arc::new(with_flags(base, &flags));
        let digest = candidate.digest();
        if digest == live.digest && flags == flags_of(&live.policy) {
            return Err(ControlError::Rollout(format!(
                "the candidate is the live generation {} (same policy digest {digest} and feature flags): nothing to roll out",
                live.number
            )));
        }
        let seed = req.seed.clone().unwrap_or_else(|| {
            let names: Vec<&str> = flags.iter().map(|f| f.as_str()).collect();
            format!("{digest}/{}", names.join(","))
        });
        let mut plan = self.promotion.plan(seed);
        if let Some(steps) = req.steps {
            plan.hold_at = plan.hold_at.map(|h| *steps.last().unwrap_or(&h));
            plan.steps = steps;
        }
        if let Some(b) = req.beats_per_step {
            plan.beats_per_step = b;
        }
        let generation = self.next_generation(history);
        let dp = self.datapath.clone();
        let published = self.status.clone();
        let staged = candidate.clone();
        blocking(move || {
            let mut dp = dp.lock().map_err(|_| poisoned())?;
            let report = dp.stage_candidate(&staged, generation)?;
            if let Ok(mut s) = published.write() {
                *s = dp.status();
            }
            Ok::<_, ControlError>(report)
        })
        .await??;
        let baseline = read_sides(&self.reader)?;
        let status = RolloutStatus {
            state: RolloutState::Progressing,
            plan,
            step: 0,
            stable_generation: live.number,
            candidate_generation: generation,
            candidate_digest: digest.clone(),
            flags,
            analysis: StepAnalysis::default(),
            workloads: (0, 0),
            reason: None,
            started_at: SystemTime::now(),
            beats: 0,
            gate_failed_at_beat: None,
            zeroed_at_beat: None,
        };
        history.rollout = Some(RolloutRun {
            status: status.clone(),
            candidate: Generation {
                number: generation,
                policy: candidate,
                digest,
            },
            baseline,
        });
        self.rollout_event(&status, "start", None);
        self.save_rollout(&status);
        tracing::info!(
            candidate = generation,
            stable = live.number,
            by,
            steps = %status.plan.steps.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(" → "),
            beats_per_step = status.plan.beats_per_step,
            "rollout started: the candidate is staged beside the live generation"
        );
        Ok(status)
    }

    /// The current (or last) rollout.
    pub async fn rollout(&self) -> Option<RolloutStatus> {
        self.history
            .lock()
            .await
            .rollout
            .as_ref()
            .map(|r| r.status.clone())
    }

    /// One beat of the rollout, if one runs: the split of the current step written into the
    /// kernel, both sides' figures read, the gates judged, and the rollout advanced, promoted
    /// or rolled back (within this beat).
    pub async fn rollout_beat(self: &Arc<Self>) -> Result<(), ControlError> {
        let mut history = self.history.lock().await;
        let Some(run) = history.rollout.as_mut() else {
            return Ok(());
        };
        if run.status.state.ended() {
            return Ok(());
        }
        let Some(share) = run.status.share() else {
            return Ok(());
        };
        let seed = run.status.plan.seed.clone();
        let dp = self.datapath.clone();
        let workloads = blocking(move || {
            let mut dp = dp.lock().map_err(|_| poisoned())?;
            let all = dp.workloads();
            let mut ids = BTreeSet::new();
            let mut on = 0;
            for w in &all {
                if side_of(&seed, &w.key, share) == Side::Candidate {
                    on += 1;
                    ids.extend(w.cgroups.iter().copied());
                }
            }
            dp.set_split(&ids)?;
            Ok::<_, ControlError>((on, all.len()))
        })
        .await??;
        run.status.workloads = workloads;
        run.status.beats += 1;
        let now = read_sides(&self.reader)?;
        let sample = beat_sample(&now, &run.baseline, &self.ceilings_ns);
        run.baseline = now;
        self.metrics_rollout(&run.status);
        if run.status.state != RolloutState::Progressing {
            return Ok(());
        }
        let verdict = run.status.analysis.observe(&sample, &run.status.plan);
        match verdict {
            GateVerdict::Continue => {}
            GateVerdict::Passed => {
                let figures = gate_figures(&run.status);
                if run.status.step + 1 < run.status.plan.steps.len() {
                    run.status.step += 1;
                    run.status.analysis = StepAnalysis::default();
                    let status = run.status.clone();
                    self.rollout_event(&status, "step", Some(figures));
                    self.save_rollout(&status);
                } else if run.status.plan.hold_at.is_some() {
                    run.status.state = RolloutState::Holding;
                    let status = run.status.clone();
                    self.rollout_event(&status, "hold", Some(figures));
                    self.save_rollout(&status);
                } else {
                    self.promote_locked(&mut history, Some(figures)).await?;
                }
            }
            GateVerdict::Failed(failure) => {
                run.status.gate_failed_at_beat = Some(run.status.beats);
                let reason = failure.to_string();
                self.rollout_metrics.rollbacks(failure.label());
                if run.status.plan.auto_rollback {
                    tracing::warn!(
                        candidate = run.status.candidate_generation,
                        "{reason}: rolling the candidate back to 0 %"
                    );
                    self.end_locked(&mut history, RolloutState::RolledBack, reason)
                        .await?;
                } else {
                    run.status.state = RolloutState::Paused;
                    run.status.reason = Some(reason.clone());
                    let status = run.status.clone();
                    tracing::warn!(
                        candidate = status.candidate_generation,
                        "{reason}: auto-rollback is off, the rollout is paused for an operator"
                    );
                    self.rollout_event(&status, "pause", Some(reason));
                    self.save_rollout(&status);
                }
            }
        }
        if let Some(run) = history.rollout.as_ref() {
            self.metrics_rollout(&run.status);
        }
        Ok(())
    }

    /// Promotes the running rollout's candidate to the live generation now.
    pub async fn promote_rollout(self: &Arc<Self>) -> Result<RolloutStatus, ControlError> {
        let mut history = self.history.lock().await;
        running(&history)?;
        self.promote_locked(&mut history, Some("promoted by an operator".into()))
            .await?;
        current(&history)
    }

    /// Pauses the running rollout: the split stays as it is; no beat is analysed.
    pub async fn pause_rollout(&self, reason: String) -> Result<RolloutStatus, ControlError> {
        let mut history = self.history.lock().await;
        let run = running_mut(&mut history)?;
        if run.status.state == RolloutState::Paused {
            return Ok(run.status.clone());
        }
        run.status.state = RolloutState::Paused;
        run.status.reason = Some(reason.clone());
        let status = run.status.clone();
        self.rollout_event(&status, "pause", Some(reason));
        self.save_rollout(&status);
        self.metrics_rollout(&status);
        Ok(status)
    }

    /// Resumes a paused (or holding) rollout: its current step is analysed again from the start.
    pub async fn resume_rollout(&self) -> Result<RolloutStatus, ControlError> {
        let mut history = self.history.lock().await;
        let run = running_mut(&mut history)?;
        if run.status.state == RolloutState::Holding {
            return Err(ControlError::Rollout(format!(
                "the rollout of generation {} holds at {} (this node is in the canary ring): promote or abort it",
                run.status.candidate_generation,
                run.status.share().map_or_else(String::new, |s| s.to_string())
            )));
        }
        run.status.state = RolloutState::Progressing;
        run.status.reason = None;
        run.status.analysis = StepAnalysis::default();
        let status = run.status.clone();
        self.rollout_event(&status, "resume", None);
        self.save_rollout(&status);
        self.metrics_rollout(&status);
        Ok(status)
    }

    /// Aborts the running rollout: the candidate goes to 0 % now.
    pub async fn abort_rollout(
        self: &Arc<Self>,
        reason: String,
    ) -> Result<RolloutStatus, ControlError> {
        let mut history = self.history.lock().await;
        running(&history)?;
        self.end_locked(&mut history, RolloutState::Aborted, reason)
            .await?;
        current(&history)
    }

    /// Records, at start, that a rollout was live when the previous agent stopped: the
    /// datapath already put every workload back on the live generation.
    pub(super) async fn recover_rollout(&self) {
        let Some(dir) = &self.state_dir else {
            return;
        };
        let path = record_path(dir);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        let Ok(record) = serde_json::from_str::<RolloutRecord>(&text) else {
            tracing::warn!(file = %path.display(), "the rollout record cannot be parsed: ignoring it");
            return;
        };
        let ended = ["promoted", "rolled_back", "aborted"].contains(&record.state.as_str());
        if ended {
            return;
        }
        let reason = "the agent restarted during the rollout: its gate analysis was lost, so the candidate went back to 0 % and the rollout must be started again".to_owned();
        tracing::warn!(
            candidate = record.candidate_generation,
            step = record.step,
            "{reason}"
        );
        let _ = self.events.send(Event::Rollout {
            at: SystemTime::now(),
            action: "abort",
            candidate_generation: record.candidate_generation,
            candidate_digest: record.candidate_digest.clone(),
            state: RolloutState::Aborted.as_str(),
            step: record.step as u32,
            percent: 0.0,
            detail: reason,
        });
        let record = RolloutRecord {
            state: RolloutState::Aborted.as_str().into(),
            ..record
        };
        if let Ok(text) = serde_json::to_string(&record) {
            let _ = std::fs::write(&path, text);
        }
        self.rollout_metrics.rollbacks("restart");
    }

    async fn promote_locked(
        self: &Arc<Self>,
        history: &mut History,
        detail: Option<String>,
    ) -> Result<(), ControlError> {
        let Some(run) = history.rollout.as_mut() else {
            return Ok(());
        };
        let dp = self.datapath.clone();
        let published = self.status.clone();
        let generation = blocking(move || {
            let mut dp = dp.lock().map_err(|_| poisoned())?;
            let g = dp.promote_candidate()?;
            if let Ok(mut s) = published.write() {
                *s = dp.status();
            }
            Ok::<_, ControlError>(g)
        })
        .await??;
        run.status.state = RolloutState::Promoted;
        run.status.step = run.status.plan.steps.len().saturating_sub(1);
        let status = run.status.clone();
        let promoted = run.candidate.clone();
        tracing::info!(
            generation,
            digest = %promoted.digest,
            "rollout promoted: the candidate is the live generation"
        );
        let previous = std::mem::replace(&mut history.live, promoted.clone());
        history.previous = Some(previous);
        history.source = "rollout";
        self.keep_live(&promoted, "rollout").await;
        self.emit_switch(&promoted, "rollout");
        self.metrics.switched(&promoted.digest);
        self.rollout_event(&status, "promote", detail);
        self.save_rollout(&status);
        self.metrics_rollout(&status);
        Ok(())
    }

    async fn end_locked(
        &self,
        history: &mut History,
        state: RolloutState,
        reason: String,
    ) -> Result<(), ControlError> {
        let Some(run) = history.rollout.as_mut() else {
            return Ok(());
        };
        let dp = self.datapath.clone();
        let published = self.status.clone();
        blocking(move || {
            let mut dp = dp.lock().map_err(|_| poisoned())?;
            dp.drop_candidate()?;
            if let Ok(mut s) = published.write() {
                *s = dp.status();
            }
            Ok::<_, ControlError>(())
        })
        .await??;
        run.status.state = state;
        run.status.zeroed_at_beat = Some(run.status.beats);
        run.status.reason = Some(reason.clone());
        run.status.workloads.0 = 0;
        let status = run.status.clone();
        let action = if state == RolloutState::RolledBack {
            "rollback"
        } else {
            "abort"
        };
        if state == RolloutState::Aborted {
            self.rollout_metrics.rollbacks("abort");
        }
        self.rollout_event(&status, action, Some(reason));
        self.save_rollout(&status);
        self.metrics_rollout(&status);
        Ok(())
    }

    /// The next generation number: above the live one and any candidate ever staged.
    fn next_generation(&self, history: &History) -> u64 {
        let staged = history
            .rollout
            .as_ref()
            .map_or(0, |r| r.status.candidate_generation);
        history.live.number.max(staged) + 1
    }

    fn rollout_event(&self, s: &RolloutStatus, action: &'static str, detail: Option<String>) {
        // No subscriber is not an error.
        let _ = self.events.send(Event::Rollout {
            at: SystemTime::now(),
            action,
            candidate_generation: s.candidate_generation,
            candidate_digest: s.candidate_digest.clone(),
            state: s.state.as_str(),
            step: s.step as u32,
            percent: s.share().map_or(0.0, Percent::as_f64),
            detail: detail.unwrap_or_default(),
        });
    }

    fn save_rollout(&self, s: &RolloutStatus) {
        let Some(dir) = &self.state_dir else {
            return;
        };
        let record = RolloutRecord {
            state: s.state.as_str().into(),
            candidate_generation: s.candidate_generation,
            candidate_digest: s.candidate_digest.clone(),
            step: s.step,
        };
        let path = record_path(dir);
        let result = serde_json::to_string(&record)
            .map_err(std::io::Error::other)
            .and_then(|text| {
                let tmp = path.with_extension("json.tmp");
                std::fs::write(&tmp, text)?;
                std::fs::rename(&tmp, &path)
            });
        if let Err(e) = result {
            tracing::error!(file = %path.display(), "cannot keep the rollout record: {e}");
        }
    }

    fn metrics_rollout(&self, s: &RolloutStatus) {
        self.rollout_metrics.update(s);
    }
}

fn gate_figures(s: &RolloutStatus) -> String {
    let (c, st) = s.analysis.deny_rates();
    format!(
        "step {} ({}) passed: SLO met in {} of {} beats (threshold {}), deny rate candidate {:.2} % vs stable {:.2} %",
        s.step + 1,
        s.plan.steps.get(s.step).map_or_else(String::new, |p| p.to_string()),
        s.analysis.met,
        s.analysis.observed,
        s.plan.slo_threshold,
        c * 100.0,
        st * 100.0
    )
}

fn in_progress(s: &RolloutStatus) -> ControlError {
    ControlError::RolloutInProgress {
        candidate: s.candidate_generation,
        state: s.state.as_str(),
        share: s.share().map_or_else(|| "0%".into(), |p| p.to_string()),
    }
}

fn running(history: &History) -> Result<(), ControlError> {
    match history.rollout.as_ref() {
        Some(r) if !r.status.state.ended() => Ok(()),
        _ => Err(ControlError::Rollout("no rollout is running".into())),
    }
}

fn running_mut(history: &mut History) -> Result<&mut RolloutRun, ControlError> {
    match history.rollout.as_mut() {
        Some(r) if !r.status.state.ended() => Ok(r),
        _ => Err(ControlError::Rollout("no rollout is running".into())),
    }
}

fn current(history: &History) -> Result<RolloutStatus, ControlError> {
    history
        .rollout
        .as_ref()
        .map(|r| r.status.clone())
        .ok_or_else(|| ControlError::Internal("the rollout vanished under the write lock".into()))
}

/// Rollout metrics; registered by [`Controller::register_metrics`].
pub(super) struct RolloutMetrics {
    state: prometheus::IntGaugeVec,
    step: prometheus::IntGauge,
    percent: prometheus::Gauge,
    met: prometheus::Gauge,
    deny_rate: prometheus::GaugeVec,
    workloads: prometheus::IntGauge,
    rollbacks: prometheus::IntCounterVec,
}

/// Why rollouts ended without promotion, as `knhk_rollout_rollbacks_total` labels it.
pub const ROLLBACK_REASONS: [&str; 4] = ["slo", "deny_rate", "abort", "restart"];

impl RolloutMetrics {
    pub(super) fn new() -> Result<RolloutMetrics, prometheus::Error> {
        let state = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "knhk_rollout_state",
                "1 for the state of the current or last rollout (progressing, paused, holding, promoted, rolled_back, aborted).",
            ),
            &["state"],
        )?;
        let rollbacks = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "knhk_rollout_rollbacks_total",
                "Rollouts whose candidate went back to 0 %, by reason (slo, deny_rate, abort, restart).",
            ),
            &["reason"],
        )?;
        for r in ROLLBACK_REASONS {
            rollbacks.with_label_values(&[r]);
        }
        Ok(RolloutMetrics {
            state,
            step: prometheus::IntGauge::new(
                "knhk_rollout_step",
                "The running rollout's step (1-based; 0 without a running rollout).",
            )?,
            percent: prometheus::Gauge::new(
                "knhk_rollout_candidate_percent",
                "Share of this node's workloads on the rollout's candidate, percent.",
            )?,
            met: prometheus::Gauge::new(
                "knhk_rollout_gate_slo_met_ratio",
                "Fraction of the current step's beats in which the candidate met every class's SLO.",
            )?,
            deny_rate: prometheus::GaugeVec::new(
                prometheus::Opts::new(
                    "knhk_rollout_deny_rate_ratio",
                    "Deny rate of each side in the current step (stable, candidate).",
                ),
                &["side"],
            )?,
            workloads: prometheus::IntGauge::new(
                "knhk_rollout_candidate_workloads",
                "Workloads on the rollout's candidate at the last beat.",
            )?,
            rollbacks,
        })
    }

    pub(super) fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.state.clone()))?;
        registry.register(Box::new(self.step.clone()))?;
        registry.register(Box::new(self.percent.clone()))?;
        registry.register(Box::new(self.met.clone()))?;
        registry.register(Box::new(self.deny_rate.clone()))?;
        registry.register(Box::new(self.workloads.clone()))?;
        registry.register(Box::new(self.rollbacks.clone()))?;
        Ok(())
    }

    fn rollbacks(&self, reason: &str) {
        self.rollbacks.with_label_values(&[reason]).inc();
    }

    fn update(&self, s: &RolloutStatus) {
        for st in [
            RolloutState::Progressing,
            RolloutState::Paused,
            RolloutState::Holding,
            RolloutState::Promoted,
            RolloutState::RolledBack,
            RolloutState::Aborted,
        ] {
            self.state
                .with_label_values(&[st.as_str()])
                .set(i64::from(st == s.state));
        }
        let running = !s.state.ended();
        self.step.set(if running { s.step as i64 + 1 } else { 0 });
        self.percent.set(if running {
            s.share().map_or(0.0, Percent::as_f64)
        } else {
            0.0
        });
        self.met.set(s.analysis.met_fraction());
        let (c, st) = s.analysis.deny_rates();
        self.deny_rate.with_label_values(&["stable"]).set(st);
        self.deny_rate.with_label_values(&["candidate"]).set(c);
        self.workloads
            .set(if running { s.workloads.0 as i64 } else { 0 });
    }
}
