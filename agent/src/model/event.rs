//! What happened in the agent, as published on the event stream (`WatchEvents`, the receipts
//! ledger).

use super::{Class, ClassState};
use std::time::SystemTime;

/// Something that happened, for `WatchEvents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A generation went live.
    PolicySwitched {
        /// When.
        at: SystemTime,
        /// Generation number.
        generation: u64,
        /// Its digest.
        digest: String,
        /// "apply", "rollback" or "startup".
        cause: &'static str,
    },
    /// SLO admission changed a class's state.
    ClassStateChanged {
        /// When.
        at: SystemTime,
        /// The class.
        class: Class,
        /// Before.
        from: ClassState,
        /// After.
        to: ClassState,
    },
    /// A rule cgroup appeared (`present`) or was removed.
    CgroupChanged {
        /// When.
        at: SystemTime,
        /// Rule cgroup path.
        cgroup: String,
        /// Whether it exists now.
        present: bool,
    },
}
