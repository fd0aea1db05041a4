//! Rollouts: a candidate generation (a policy, feature flags, or both) reaching a node's
//! workloads step by step, split per workload in the kernel, gated on SLOs and rolled back
//! automatically. The pure parts live here: rings, flags, plans, the split function and the
//! gate analysis. `control` drives them; `datapath` writes the split.

use sha2::{Digest, Sha256};
use std::{collections::BTreeSet, fmt, str::FromStr};

/// Which generation judges a workload's connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// The live (stable) generation.
    Stable,
    /// The rollout's candidate generation.
    Candidate,
}

impl Side {
    /// Both sides, stable first.
    pub const ALL: [Side; 2] = [Side::Stable, Side::Candidate];

    /// `stable` or `candidate`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Stable => "stable",
            Side::Candidate => "candidate",
        }
    }
}

/// A node's ring in a fleet rollout (`[promotion] environment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// Takes a candidate first, and only up to `traffic_percent` of its workloads; it then holds
    /// until promoted (by an operator or the fleet's bundle).
    Canary,
    /// Takes a candidate after the canary ring passed its gates; runs every step to 100 %.
    Staging,
    /// Takes a candidate last; runs every step to 100 %.
    Production,
}

impl Ring {
    /// The name in configuration and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Ring::Canary => "canary",
            Ring::Staging => "staging",
            Ring::Production => "production",
        }
    }
}

impl FromStr for Ring {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "canary" => Ok(Ring::Canary),
            "staging" => Ok(Ring::Staging),
            "production" => Ok(Ring::Production),
            other => Err(format!(
                "unknown environment {other:?}: expected canary, staging or production"
            )),
        }
    }
}
deserialize_from_str!(Ring, "canary, staging or production");

/// A feature flag: a documented kernel feature bit, switched per workload (so it can be
/// canaried with the same split as a policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FeatureFlag {
    /// Record destination heat (kernel `FLAG_HEAT`).
    HeatTracking,
    /// Time TCP handshakes and RTTs into the latency histograms (kernel `FLAG_HISTOGRAMS`).
    LatencyHistograms,
    /// Send verdict events for decisions other than allow (kernel `FLAG_EVENTS`).
    VerdictEvents,
}

impl FeatureFlag {
    /// Every flag.
    pub const ALL: [FeatureFlag; 3] = [
        FeatureFlag::HeatTracking,
        FeatureFlag::LatencyHistograms,
        FeatureFlag::VerdictEvents,
    ];

    /// The name in configuration and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            FeatureFlag::HeatTracking => "heat_tracking",
            FeatureFlag::LatencyHistograms => "latency_histograms",
            FeatureFlag::VerdictEvents => "verdict_events",
        }
    }
}

impl FromStr for FeatureFlag {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FeatureFlag::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown feature flag {s:?}: the flags are {}",
                    FeatureFlag::ALL.map(FeatureFlag::as_str).join(", ")
                )
            })
    }
}
deserialize_from_str!(FeatureFlag, "a feature flag name");

/// The flags enabled on a side.
pub type FeatureFlags = BTreeSet<FeatureFlag>;

/// A share of a node's workloads, in basis points (1 = 0.01 %), from 1 to 10,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Percent(u32);

impl Percent {
    /// 100 %.
    pub const ALL: Percent = Percent(10_000);

    /// From a percentage (0 < p ≤ 100, at most two decimals are kept).
    pub fn new(percent: f64) -> Result<Percent, String> {
        if !percent.is_finite() || percent <= 0.0 || percent > 100.0 {
            return Err(format!(
                "{percent} is not a share of workloads: give a percentage above 0 and at most 100"
            ));
        }
        let bp = (percent * 100.0).round() as u32;
        if bp == 0 {
            return Err(format!(
                "{percent} % is below the 0.01 % resolution of a step"
            ));
        }
        Ok(Percent(bp))
    }

    /// Basis points (1..=10,000).
    pub fn basis_points(self) -> u32 {
        self.0
    }

    /// As a percentage.
    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(100) {
            write!(f, "{}%", self.0 / 100)
        } else {
            write!(f, "{}%", self.as_f64())
        }
    }
}

/// Checks a step list: not empty, each step above the one before. Returns the steps.
pub fn check_steps(steps: &[f64]) -> Result<Vec<Percent>, String> {
    if steps.is_empty() {
        return Err("no steps: give at least one percentage, e.g. [1, 5, 25, 100]".into());
    }
    let mut out: Vec<Percent> = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        let p = Percent::new(*s).map_err(|e| format!("step {} ({s}): {e}", i + 1))?;
        if let Some(prev) = out.last() {
            if p <= *prev {
                return Err(format!(
                    "step {} ({p}) does not increase on step {i} ({prev}): steps must increase",
                    i + 1
                ));
            }
        }
        out.push(p);
    }
    Ok(out)
}

/// How a rollout proceeds and what stops it.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutPlan {
    /// Shares of the workloads on the candidate, increasing; the last is usually 100 %.
    pub steps: Vec<Percent>,
    /// Beats each step is held (and analysed) before the next.
    pub beats_per_step: u32,
    /// The split's seed: every node with the same seed puts the same workload on the same side.
    pub seed: String,
    /// Fraction of a step's beats in which the candidate must meet every class's SLO (0..1).
    pub slo_threshold: f64,
    /// The deny-rate gate: fail when the candidate's deny rate exceeds this many times the
    /// stable side's (or 1/1000, whichever is larger). `None`: no deny-rate gate.
    pub deny_rate_factor: Option<f64>,
    /// Decisions the candidate side needs in a step before its deny rate is judged.
    pub min_decisions: u64,
    /// Roll back when a gate fails; otherwise the rollout pauses for an operator.
    pub auto_rollback: bool,
    /// The canary ring: hold at this share (after its gates pass) until promoted.
    pub hold_at: Option<Percent>,
}

/// The side of a workload at a share: SHA-256 over the seed, one zero byte and the workload's
/// key (UTF-8: the pod UID, or the cgroup path below `agent.cgroup_root`); its first 8 bytes
/// as a big-endian integer, modulo 10,000, is the workload's bucket; the workload is on the
/// candidate when its bucket is below the share in basis points. So raising the share only
/// moves workloads from stable to candidate, and every node agrees.
pub fn side_of(seed: &str, key: &str, share: Percent) -> Side {
    if bucket_of(seed, key) < share.basis_points() {
        Side::Candidate
    } else {
        Side::Stable
    }
}

/// A workload's bucket (0..10,000) under `seed` (see [`side_of`]).
pub fn bucket_of(seed: &str, key: &str) -> u32 {
    let mut h = Sha256::new();
    h.update(seed.as_bytes());
    h.update([0u8]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(first) % 10_000) as u32
}

/// What one beat showed of each side, for the gates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BeatSample {
    /// Per class (R1, W1, C1): whether the candidate side breached its SLO this beat (`None`:
    /// no latency samples).
    pub candidate_breach: [Option<bool>; 3],
    /// The same for the stable side.
    pub stable_breach: [Option<bool>; 3],
    /// Decisions and denies (deny + shed) on the candidate side this beat.
    pub candidate: (u64, u64),
    /// Decisions and denies on the stable side this beat.
    pub stable: (u64, u64),
}

impl BeatSample {
    /// The beat met the SLO on the candidate side: no class breached on the candidate while the
    /// same class did not breach on the stable side. (A breach on both sides is the node's, not
    /// the candidate's.)
    pub fn candidate_met(&self) -> bool {
        (0..3).all(|c| {
            !(self.candidate_breach[c] == Some(true) && self.stable_breach[c] != Some(true))
        })
    }
}

/// Why a gate failed.
#[derive(Debug, Clone, PartialEq)]
pub enum GateFailure {
    /// Too many beats breached the SLO on the candidate for the step to reach the threshold.
    Slo {
        /// Beats that met the SLO so far.
        met: u32,
        /// Beats observed so far.
        observed: u32,
        /// Beats per step.
        beats: u32,
        /// The threshold.
        threshold: f64,
    },
    /// The candidate denies far more than the stable side.
    DenyRate {
        /// The candidate's deny rate in the step.
        candidate: f64,
        /// The stable side's.
        stable: f64,
        /// The configured factor.
        factor: f64,
    },
}

impl GateFailure {
    /// A short label for metrics (`slo`, `deny_rate`).
    pub fn label(&self) -> &'static str {
        match self {
            GateFailure::Slo { .. } => "slo",
            GateFailure::DenyRate { .. } => "deny_rate",
        }
    }
}

impl fmt::Display for GateFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GateFailure::Slo {
                met,
                observed,
                beats,
                threshold,
            } => write!(
                f,
                "SLO gate failed: the candidate met every class's SLO in {met} of {observed} beats, so at most {} of {beats} beats can meet it, below slo_threshold {threshold}",
                met + (beats - observed)
            ),
            GateFailure::DenyRate {
                candidate,
                stable,
                factor,
            } => write!(
                f,
                "deny-rate gate failed: the candidate denied {:.2} % of its connects, stable {:.2} %, more than {factor}× stable",
                candidate * 100.0,
                stable * 100.0
            ),
        }
    }
}

/// The gates' running analysis of one step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepAnalysis {
    /// Beats observed in the step.
    pub observed: u32,
    /// Of those, beats in which the candidate met the SLO.
    pub met: u32,
    /// Decisions and denies on the candidate side in the step.
    pub candidate: (u64, u64),
    /// Decisions and denies on the stable side in the step.
    pub stable: (u64, u64),
}

/// What the gates say after a beat.
#[derive(Debug, Clone, PartialEq)]
pub enum GateVerdict {
    /// The step goes on.
    Continue,
    /// The step held for its beats and every gate passed.
    Passed,
    /// A gate failed.
    Failed(GateFailure),
}

fn rate((decisions, denies): (u64, u64)) -> f64 {
    if decisions == 0 {
        0.0
    } else {
        denies as f64 / decisions as f64
    }
}

impl StepAnalysis {
    /// Adds a beat and judges the step: the SLO gate fails as soon as the step can no longer
    /// reach `slo_threshold` (met + beats left < threshold × beats per step); the deny-rate gate
    /// once the candidate made `min_decisions`; the step passes after `beats_per_step` beats.
    pub fn observe(&mut self, beat: &BeatSample, plan: &RolloutPlan) -> GateVerdict {
        self.observed += 1;
        if beat.candidate_met() {
            self.met += 1;
        }
        self.candidate.0 += beat.candidate.0;
        self.candidate.1 += beat.candidate.1;
        self.stable.0 += beat.stable.0;
        self.stable.1 += beat.stable.1;
        let beats = plan.beats_per_step.max(1);
        let reachable = self.met + beats.saturating_sub(self.observed);
        if f64::from(reachable) < plan.slo_threshold * f64::from(beats) {
            return GateVerdict::Failed(GateFailure::Slo {
                met: self.met,
                observed: self.observed,
                beats,
                threshold: plan.slo_threshold,
            });
        }
        if let Some(factor) = plan.deny_rate_factor {
            if self.candidate.0 >= plan.min_decisions {
                let (c, s) = (rate(self.candidate), rate(self.stable));
                if c > factor * s.max(0.001) {
                    return GateVerdict::Failed(GateFailure::DenyRate {
                        candidate: c,
                        stable: s,
                        factor,
                    });
                }
            }
        }
        if self.observed >= beats {
            GateVerdict::Passed
        } else {
            GateVerdict::Continue
        }
    }

    /// The fraction of observed beats that met the SLO on the candidate (1 before any beat).
    pub fn met_fraction(&self) -> f64 {
        if self.observed == 0 {
            1.0
        } else {
            f64::from(self.met) / f64::from(self.observed)
        }
    }

    /// Deny rates (candidate, stable) in the step.
    pub fn deny_rates(&self) -> (f64, f64) {
        (rate(self.candidate), rate(self.stable))
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutState {
    /// Stepping: the current step is being analysed.
    Progressing,
    /// Paused by an operator (or by a failed gate without auto-rollback): the split stays, no
    /// beat is analysed.
    Paused,
    /// The canary ring reached its share and passed its gates: waiting for `promote`.
    Holding,
    /// The candidate became the live generation.
    Promoted,
    /// A gate failed: the candidate is at 0 %.
    RolledBack,
    /// An operator aborted it (or the agent restarted mid-rollout): the candidate is at 0 %.
    Aborted,
}

impl RolloutState {
    /// The name in the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Progressing => "progressing",
            RolloutState::Paused => "paused",
            RolloutState::Holding => "holding",
            RolloutState::Promoted => "promoted",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Aborted => "aborted",
        }
    }

    /// Whether the rollout has ended (the candidate is gone from the kernel).
    pub fn ended(self) -> bool {
        matches!(
            self,
            RolloutState::Promoted | RolloutState::RolledBack | RolloutState::Aborted
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(beats: u32, threshold: f64) -> RolloutPlan {
        RolloutPlan {
            steps: check_steps(&[1.0, 5.0, 25.0, 100.0]).unwrap(),
            beats_per_step: beats,
            seed: "s".into(),
            slo_threshold: threshold,
            deny_rate_factor: Some(10.0),
            min_decisions: 100,
            auto_rollback: true,
            hold_at: None,
        }
    }

    #[test]
    fn steps_must_increase_and_stay_within_0_and_100() {
        assert!(check_steps(&[]).unwrap_err().contains("no steps"));
        assert!(check_steps(&[5.0, 5.0])
            .unwrap_err()
            .contains("step 2 (5%) does not increase on step 1 (5%)"));
        assert!(check_steps(&[0.0]).unwrap_err().contains("above 0"));
        assert!(check_steps(&[101.0]).unwrap_err().contains("at most 100"));
        assert!(check_steps(&[f64::NAN]).is_err());
        assert_eq!(check_steps(&[0.5, 100.0]).unwrap()[0].to_string(), "0.5%");
    }

    #[test]
    fn the_split_is_stable_monotonic_and_near_the_share() {
        let keys: Vec<String> = (0..10_000).map(|i| format!("pod-{i}")).collect();
        let at = |p: f64| {
            let share = Percent::new(p).unwrap();
            keys.iter()
                .filter(|k| side_of("seed", k, share) == Side::Candidate)
                .cloned()
                .collect::<BTreeSet<_>>()
        };
        let (five, twenty_five) = (at(5.0), at(25.0));
        // Raising the share only moves workloads to the candidate.
        assert!(five.is_subset(&twenty_five));
        assert_eq!(at(100.0).len(), keys.len());
        // Binomial: n = 10,000, p = 0.25, sd = 43.3; 5 sd = 217.
        assert!(
            (twenty_five.len() as i64 - 2500).abs() < 217,
            "{}",
            twenty_five.len()
        );
        // Another seed splits differently.
        let other: BTreeSet<_> = keys
            .iter()
            .filter(|k| side_of("other", k, Percent::new(25.0).unwrap()) == Side::Candidate)
            .cloned()
            .collect();
        assert_ne!(other, twenty_five);
        // The documented function, byte by byte: SHA-256("seed" 0x00 "pod-0").
        let d = Sha256::digest(b"seed\0pod-0");
        let b = u64::from_be_bytes(d[..8].try_into().unwrap()) % 10_000;
        assert_eq!(bucket_of("seed", "pod-0"), b as u32);
    }

    #[test]
    fn the_slo_gate_fails_once_the_threshold_is_out_of_reach() {
        let p = plan(20, 0.95);
        let good = BeatSample::default();
        let mut bad = BeatSample::default();
        bad.candidate_breach[0] = Some(true);
        bad.stable_breach[0] = Some(false);
        let mut a = StepAnalysis::default();
        assert_eq!(a.observe(&good, &p), GateVerdict::Continue);
        // One breached beat of 20 still allows 19/20 = 0.95.
        assert_eq!(a.observe(&bad, &p), GateVerdict::Continue);
        match a.observe(&bad, &p) {
            GateVerdict::Failed(f @ GateFailure::Slo { .. }) => {
                assert!(f.to_string().contains("1 of 3 beats"), "{f}")
            }
            other => panic!("{other:?}"),
        }
        // A breach on both sides is not the candidate's.
        let mut both = bad;
        both.stable_breach[0] = Some(true);
        assert!(both.candidate_met());
        let mut a = StepAnalysis::default();
        for _ in 0..19 {
            assert_eq!(a.observe(&both, &p), GateVerdict::Continue);
        }
        assert_eq!(a.observe(&both, &p), GateVerdict::Passed);
    }

    #[test]
    fn the_deny_rate_gate_compares_the_sides() {
        let p = plan(20, 0.0);
        let mut a = StepAnalysis::default();
        let beat = BeatSample {
            candidate: (50, 10),
            stable: (1000, 1),
            ..Default::default()
        };
        // Below min_decisions: not judged yet.
        assert_eq!(a.observe(&beat, &p), GateVerdict::Continue);
        match a.observe(&beat, &p) {
            GateVerdict::Failed(GateFailure::DenyRate {
                candidate, stable, ..
            }) => {
                assert!((candidate - 0.2).abs() < 1e-9);
                assert!((stable - 0.001).abs() < 1e-9);
            }
            other => panic!("{other:?}"),
        }
        // Denying as much as stable passes.
        let mut a = StepAnalysis::default();
        let same = BeatSample {
            candidate: (100, 10),
            stable: (100, 10),
            ..Default::default()
        };
        for _ in 0..19 {
            assert_eq!(a.observe(&same, &p), GateVerdict::Continue);
        }
        assert_eq!(a.observe(&same, &p), GateVerdict::Passed);
    }
}
