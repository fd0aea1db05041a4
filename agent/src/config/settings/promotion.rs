//! `[promotion]` → [`PromotionSettings`]: the node's ring, its feature flags and the defaults of
//! the rollouts it runs (steps, beats per step, gates).

use crate::config::PromotionSection;
use crate::model::{rollout::check_steps, FeatureFlag, FeatureFlags, Percent, Ring, RolloutPlan};

/// What `[promotion]` says (its defaults when the section is absent).
#[derive(Debug, Clone, PartialEq)]
pub struct PromotionSettings {
    /// The node's ring.
    pub ring: Ring,
    /// The canary ring's share of workloads (it holds there until promoted).
    pub traffic_percent: Percent,
    /// The flags enabled on this node; `None`: `agent.heat_enabled` and
    /// `agent.histograms_enabled` decide, verdict events are on.
    pub feature_flags: Option<FeatureFlags>,
    /// Roll back on a failed gate (otherwise pause for an operator).
    pub auto_rollback: bool,
    /// Fraction of a step's beats in which the candidate must meet every class's SLO.
    pub slo_threshold: f64,
    /// Default steps of a rollout.
    pub steps: Vec<Percent>,
    /// Default beats per step.
    pub beats_per_step: u32,
    /// The deny-rate gate's factor (`None`: off).
    pub deny_rate_factor: Option<f64>,
    /// Decisions the candidate needs in a step before its deny rate is judged.
    pub min_decisions: u64,
}

/// Default steps of a rollout.
pub const DEFAULT_STEPS: [f64; 4] = [1.0, 5.0, 25.0, 100.0];

impl Default for PromotionSettings {
    fn default() -> Self {
        PromotionSettings {
            ring: Ring::Production,
            traffic_percent: Percent::new(5.0).unwrap_or(Percent::ALL),
            feature_flags: None,
            auto_rollback: true,
            slo_threshold: 0.95,
            steps: check_steps(&DEFAULT_STEPS).unwrap_or_else(|_| vec![Percent::ALL]),
            beats_per_step: 20,
            deny_rate_factor: Some(10.0),
            min_decisions: 100,
        }
    }
}

impl PromotionSettings {
    /// The settings of a `[promotion]` section; errors are (key, message).
    pub fn from_section(p: &PromotionSection) -> Result<PromotionSettings, (String, String)> {
        let d = PromotionSettings::default();
        let err = |key: &str, m: String| (key.to_owned(), m);
        if let Some(t) = p.slo_threshold {
            if !(0.0..=1.0).contains(&t) {
                return Err(err(
                    "slo_threshold",
                    format!("{t} is outside 0..1 (the fraction of a step's beats in which the candidate must meet every class's SLO)"),
                ));
            }
        }
        let traffic_percent = match p.traffic_percent {
            Some(t) => Percent::new(t).map_err(|e| err("traffic_percent", e))?,
            None => d.traffic_percent,
        };
        let steps = match &p.steps {
            Some(s) => check_steps(s).map_err(|e| err("steps", e))?,
            None => d.steps,
        };
        if let Some(b) = p.beats_per_step {
            if !(1..=100_000).contains(&b) {
                return Err(err("beats_per_step", format!("{b} is outside 1-100000")));
            }
        }
        if let Some(f) = p.deny_rate_factor {
            if !f.is_finite() || f <= 1.0 {
                return Err(err(
                    "deny_rate_factor",
                    format!("{f} must be above 1 (how many times the stable side's deny rate the candidate may reach); omit the key for the default 10"),
                ));
            }
        }
        let feature_flags = match &p.feature_flags {
            Some(list) => {
                let mut set = FeatureFlags::new();
                for f in list {
                    if !set.insert(*f) {
                        return Err(err(
                            "feature_flags",
                            format!("{} is listed twice", f.as_str()),
                        ));
                    }
                }
                Some(set)
            }
            None => None,
        };
        Ok(PromotionSettings {
            ring: p.environment.unwrap_or(d.ring),
            traffic_percent,
            feature_flags,
            auto_rollback: p.auto_rollback_enabled.unwrap_or(d.auto_rollback),
            slo_threshold: p.slo_threshold.unwrap_or(d.slo_threshold),
            steps,
            beats_per_step: p.beats_per_step.unwrap_or(d.beats_per_step),
            deny_rate_factor: p.deny_rate_factor.or(d.deny_rate_factor),
            min_decisions: p.min_decisions.unwrap_or(d.min_decisions),
        })
    }

    /// A rollout plan from these defaults, with `seed`; the canary ring holds at
    /// `traffic_percent` (its steps stop there).
    pub fn plan(&self, seed: String) -> RolloutPlan {
        let (steps, hold_at) = match self.ring {
            Ring::Canary => {
                let mut steps: Vec<Percent> = self
                    .steps
                    .iter()
                    .copied()
                    .filter(|s| *s < self.traffic_percent)
                    .collect();
                steps.push(self.traffic_percent);
                (steps, Some(self.traffic_percent))
            }
            Ring::Staging | Ring::Production => (self.steps.clone(), None),
        };
        RolloutPlan {
            steps,
            beats_per_step: self.beats_per_step,
            seed,
            slo_threshold: self.slo_threshold,
            deny_rate_factor: self.deny_rate_factor,
            min_decisions: self.min_decisions,
            auto_rollback: self.auto_rollback,
            hold_at,
        }
    }

    /// Whether `flag` is on for this node (with the `[agent]` settings when no list is given).
    pub fn flag_on(&self, flag: FeatureFlag, heat_enabled: bool, histograms_enabled: bool) -> bool {
        match &self.feature_flags {
            Some(set) => set.contains(&flag),
            None => match flag {
                FeatureFlag::HeatTracking => heat_enabled,
                FeatureFlag::LatencyHistograms => histograms_enabled,
                FeatureFlag::VerdictEvents => true,
            },
        }
    }
}
