//! What happened in the agent, as published on the event stream (`WatchEvents`, the receipts
//! ledger).

use super::{Class, ClassState};
use std::{net::IpAddr, time::SystemTime};

/// Something that happened, for `WatchEvents`.
#[derive(Debug, Clone, PartialEq)]
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
    /// A rollout started, stepped, passed or failed a gate, held, paused, resumed, was
    /// promoted, rolled back or aborted.
    Rollout {
        /// When.
        at: SystemTime,
        /// `start`, `step`, `hold`, `pause`, `resume`, `promote`, `rollback` or `abort`.
        action: &'static str,
        /// The candidate's generation.
        candidate_generation: u64,
        /// The candidate's policy digest.
        candidate_digest: String,
        /// The rollout's state after it (`RolloutState::as_str`).
        state: &'static str,
        /// The step's index.
        step: u32,
        /// The share of workloads on the candidate after it, percent.
        percent: f64,
        /// The gate's figures or the reason.
        detail: String,
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

/// A decision of the kernel programs other than allow, as `WatchEvents` and
/// `knhk-agent events` report it. At most one per rule per 10 ms is reported; the rest are
/// counted (`knhk_verdict_events_total`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// When the agent read it.
    pub at: SystemTime,
    /// The caller's cgroup, relative to the cgroup root ("." for the root), or "cgroup id N"
    /// when it is gone.
    pub cgroup: String,
    /// Destination address (an IPv4-mapped IPv6 address is reported as IPv4).
    pub destination: IpAddr,
    /// Destination port.
    pub port: u16,
    /// "tcp", "udp" or "other".
    pub protocol: &'static str,
    /// "deny", "audit", "shed" or "park".
    pub action: &'static str,
    /// The runtime class.
    pub class: Class,
    /// The deciding rule, `None` for the default action.
    pub rule: Option<String>,
    /// The generation that decided.
    pub generation: u64,
    /// "connect4", "connect6", "sendmsg4" or "sendmsg6".
    pub hook: &'static str,
    /// The caller's pod, `namespace/name`, when the cgroup is in a pod the agent knows (with
    /// `[kubernetes]`).
    pub pod: Option<String>,
}

/// Which verdicts a watcher wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerdictFilter {
    /// Only these actions; empty: all.
    pub actions: Vec<String>,
    /// Only this cgroup and those below it; `None`: all.
    pub cgroup: Option<String>,
    /// Only this rule; `None`: all.
    pub rule: Option<String>,
}

impl VerdictFilter {
    /// Whether `v` passes.
    pub fn matches(&self, v: &Verdict) -> bool {
        let action = self.actions.is_empty() || self.actions.iter().any(|a| a == v.action);
        let cgroup = self.cgroup.as_deref().is_none_or(|c| {
            let c = c.trim_matches('/');
            c.is_empty()
                || c == "."
                || v.cgroup == c
                || v.cgroup
                    .strip_prefix(c)
                    .is_some_and(|rest| rest.starts_with('/'))
        });
        let rule = self
            .rule
            .as_deref()
            .is_none_or(|r| v.rule.as_deref() == Some(r));
        action && cgroup && rule
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(cgroup: &str, action: &'static str, rule: Option<&str>) -> Verdict {
        Verdict {
            at: SystemTime::UNIX_EPOCH,
            cgroup: cgroup.into(),
            destination: [10, 0, 0, 1].into(),
            port: 80,
            protocol: "tcp",
            action,
            class: Class::C1,
            rule: rule.map(Into::into),
            generation: 1,
            hook: "connect4",
            pod: None,
        }
    }

    #[test]
    fn filters_match_by_action_cgroup_subtree_and_rule() {
        let v = verdict("kubepods/pod1/c1", "deny", Some("no-db"));
        assert!(VerdictFilter::default().matches(&v));
        let by = |actions: &[&str], cgroup: Option<&str>, rule: Option<&str>| VerdictFilter {
            actions: actions.iter().map(|a| a.to_string()).collect(),
            cgroup: cgroup.map(Into::into),
            rule: rule.map(Into::into),
        };
        assert!(by(&["deny"], None, None).matches(&v));
        assert!(!by(&["audit", "park"], None, None).matches(&v));
        assert!(by(&[], Some("kubepods/pod1"), None).matches(&v));
        assert!(by(&[], Some("/kubepods/"), None).matches(&v));
        assert!(
            !by(&[], Some("kubepods/pod"), None).matches(&v),
            "a prefix is not a parent"
        );
        assert!(by(&[], None, Some("no-db")).matches(&v));
        assert!(!by(&[], None, Some("other")).matches(&v));
        assert!(!by(&[], None, Some("no-db")).matches(&verdict("a", "deny", None)));
    }
}
