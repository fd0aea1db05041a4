//! `[slo]` → [`BeatSettings`], the beat engine's settings.

use crate::config::SloSection;
use crate::model::{AdmissionStrategy, LatencySource};
use std::time::Duration;

/// The engine's settings, from `[slo]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BeatSettings {
    /// Beat period.
    pub interval: Duration,
    /// Beats in the sliding window.
    pub window_beats: usize,
    /// Healthy beats before a shed class recovers.
    pub recover_beats: u32,
    /// p99 ceilings in ns, per class (R1, W1, C1); `None`: no SLO for that class.
    pub ceilings_ns: [Option<u64>; 3],
    /// The latency each class's ceiling is compared with (R1, W1, C1).
    pub latency_sources: [LatencySource; 3],
    /// Refuse or park.
    pub strategy: AdmissionStrategy,
    /// New connects admitted per beat, per class (R1, W1, C1); `None`: no budget.
    pub budgets_per_beat: [Option<u64>; 3],
    /// Beats over which a destination's heat halves.
    pub heat_half_life_beats: f64,
    /// Hottest and rising destinations exported.
    pub heat_top_n: usize,
    /// Set each class's per-beat budget from the capacity model's knee (where it has one and
    /// no static budget is configured).
    pub capacity_budgets: bool,
    /// When no beat has run for this long, the kernel ignores class states and budgets (fails
    /// open) instead of shedding on stale decisions.
    pub fail_open_after: Duration,
}

impl Default for BeatSettings {
    /// The defaults of `[slo]`: 100 ms beats, 8-beat window, 10 beats to recover, no ceilings,
    /// Strict, no budgets, heat half-life 50 beats, top 20.
    fn default() -> Self {
        BeatSettings {
            interval: Duration::from_millis(100),
            window_beats: 8,
            recover_beats: 10,
            ceilings_ns: [None; 3],
            latency_sources: [LatencySource::Handshake; 3],
            strategy: AdmissionStrategy::Strict,
            budgets_per_beat: [None; 3],
            heat_half_life_beats: 50.0,
            heat_top_n: 20,
            capacity_budgets: false,
            fail_open_after: Duration::from_secs(1),
        }
    }
}

impl BeatSettings {
    /// The settings an `[slo]` section describes, exporting the `heat_top_n` hottest destinations.
    pub fn from_slo(slo: &SloSection, heat_top_n: usize) -> BeatSettings {
        BeatSettings {
            interval: Duration::from_millis(slo.beat_interval_ms.unwrap_or(100)),
            window_beats: slo.window_beats.unwrap_or(8) as usize,
            recover_beats: slo.recover_beats.unwrap_or(10),
            ceilings_ns: [
                slo.r1_p99_max_ns,
                slo.w1_p99_max_ms.map(|ms| ms.saturating_mul(1_000_000)),
                slo.c1_p99_max_ms.map(|ms| ms.saturating_mul(1_000_000)),
            ],
            latency_sources: [
                // Not set: handshake latency, the documented default (also for W1 and C1 below).
                slo.r1_latency.unwrap_or_default(),
                slo.w1_latency.unwrap_or_default(), // Likewise.
                slo.c1_latency.unwrap_or_default(), // Likewise.
            ],
            strategy: slo.admission_strategy.unwrap_or(AdmissionStrategy::Strict),
            budgets_per_beat: [
                slo.r1_budget_per_beat,
                slo.w1_budget_per_beat,
                slo.c1_budget_per_beat,
            ],
            heat_half_life_beats: slo.heat_half_life_beats.unwrap_or(50) as f64,
            heat_top_n,
            capacity_budgets: slo.capacity_budgets.unwrap_or(false),
            fail_open_after: (Duration::from_millis(slo.beat_interval_ms.unwrap_or(100)) * 10)
                .max(Duration::from_secs(1)),
        }
    }
}
