//! SLO admission as the rest of the agent sees it: the state of each runtime class, and the
//! summary of each 8-beat cycle that the beat engine emits at its pulse.

use super::Class;
use std::net::IpAddr;

/// What admission does with a class's new connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClassState {
    /// Admitted.
    Normal,
    /// Parked to a lower tier (Degrade strategy).
    Degraded,
    /// Refused with EPERM (Strict strategy).
    Paused,
}

impl ClassState {
    /// Every state.
    pub const ALL: [ClassState; 3] = [ClassState::Normal, ClassState::Degraded, ClassState::Paused];

    /// Lower-case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ClassState::Normal => "normal",
            ClassState::Degraded => "degraded",
            ClassState::Paused => "paused",
        }
    }
}

/// What one 8-beat cycle saw, emitted at its pulse for the receipts ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleSummary {
    /// The pulse's beat number (a multiple of 8).
    pub cycle: u64,
    /// Per class (R1, W1, C1), during the cycle.
    pub classes: [ClassSummary; 3],
    /// Live policy generation at the pulse.
    pub policy_generation: u64,
    /// SHA-256 (hex) of the top-N heat list ("addr:port/proto heat" lines), or empty until
    /// computed.
    pub heat_digest: String,
    /// Nothing was decided during the cycle and nothing in it differs from the previous
    /// pulse's summary (states, window latencies, policy generation): the pulse still paces
    /// checkpoints, but the ledger does not receipt it (an idle node writes nothing).
    pub quiet: bool,
}

/// One class in a [`CycleSummary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClassSummary {
    /// Connects admitted (allowed, audited or parked).
    pub admitted: u64,
    /// Connects refused (denied by policy or shed by SLO admission).
    pub refused: u64,
    /// Connects parked on a lower tier.
    pub parked: u64,
    /// Window p50 of the class's latency source, ns.
    pub p50_ns: Option<u64>,
    /// Window p99 of the class's latency source, ns.
    pub p99_ns: Option<u64>,
    /// State at the pulse.
    pub state: Option<ClassState>,
}

/// A destination and its heat.
#[derive(Debug, Clone, PartialEq)]
pub struct HotDestination {
    /// Address.
    pub addr: IpAddr,
    /// Port.
    pub port: u16,
    /// IPPROTO number.
    pub proto: u8,
    /// Decayed attempts as of the beat asked about.
    pub heat: f64,
    /// Change of the attempt rate (attempts per beat) between the last two visits.
    pub rising: f64,
}

/// What the beat engine publishes for other services to read (the control core's status, SLO and
/// heat answers). Implemented by the beat engine's shared view; readers never block a beat.
pub trait SloView: Send + Sync + 'static {
    /// The current SLO admission state of `class`.
    fn class_state(&self, class: Class) -> ClassState;
    /// The `n` hottest destinations by decayed heat (summed over scopes), hottest first.
    fn hottest(&self, n: usize) -> Vec<HotDestination> {
        self.hottest_grouped(n, &|_| Some(0))
            .into_iter()
            .map(|(_, d)| d)
            .collect()
    }
    /// The `n` hottest (group, destination) pairs by decayed heat, hottest first: `group` maps
    /// the cgroup id of each deciding scope (0: the global scope) to a group whose scopes are
    /// summed (a pod), or leaves it out (`None`).
    fn hottest_grouped(
        &self,
        n: usize,
        group: &dyn Fn(u64) -> Option<u32>,
    ) -> Vec<(u32, HotDestination)>;
}
