//! The agent's domain: the values every other module speaks in. No I/O, no kernel ABI numbers,
//! and no imports from the rest of the crate: this is the bottom layer (see `docs/architecture.md`).
//!
//! - [`rule`]: admission rules and their values (classes, actions, prefixes, ports, cgroups).
//! - [`slo`]: class states, cycle summaries, heat rankings, and the beat engine's read view.
//! - [`event`]: what the agent publishes on its event stream.
//! - [`receipt`]: the kinds of receipts the ledger records.
//! - [`spiffe`]: SPIFFE IDs and per-surface allow-lists.
//! - [`text`]: escaping outside text (cgroup paths) for logs.
//! - [`rollout`]: rollouts: rings, feature flags, plans, the workload split and the gates.
//! - [`workload`]: Kubernetes label selectors and the node's pods (the workload inventory).

/// Implements `Deserialize` for a type through its `FromStr`, so a TOML or JSON parser reports
/// the value's own error where it was written. `$what` says what was expected.
macro_rules! deserialize_from_str {
    ($t:ty, $what:literal) => {
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$t, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

pub mod event;
pub mod receipt;
pub mod rollout;
pub mod rule;
pub mod slo;
pub mod spiffe;
pub mod text;
pub mod workload;

pub use event::{Event, Verdict, VerdictFilter};
pub use receipt::ReceiptKind;
pub use rollout::{FeatureFlag, FeatureFlags, Percent, Ring, RolloutPlan, RolloutState, Side};
pub use rule::{
    Action, AdmissionStrategy, CgroupPath, Cidr, Class, DefaultAction, LatencySource, Mode,
    PortRange, Protocol, RuleName, RuleSpec,
};
pub use slo::{ClassState, ClassSummary, CycleSummary, HotDestination, SloView};
pub use text::log_escape;
pub use workload::{Inventory, LabelSelector, Pod, WorkloadSelector};
