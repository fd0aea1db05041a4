//! Why a connect gets its verdict: [`Datapath::explain`] walks the live kernel tables the way
//! the programs do (scope, prefix, leaf entries and chunks, mode, class state) and says what
//! decided at each step.

use super::*;
use crate::model::{ClassState, Protocol};
use ipnet::IpNet;
use std::net::IpAddr;

/// What the live kernel tables decide for one connect, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The live generation.
    pub generation: u64,
    /// The rule cgroup whose rules judge the caller; `None` for the global scope.
    pub scope: Option<String>,
    /// The longest prefix of that scope's table holding the destination.
    pub prefix: Option<IpNet>,
    /// The deciding rule; `None` for the default action.
    pub rule: Option<String>,
    /// The rule's action (or the default action): "allow", "deny" or "audit".
    pub rule_action: &'static str,
    /// The runtime class.
    pub class: Class,
    /// What a connect gets now: "allow", "deny", "audit", "shed", "park" or
    /// "allow at lower priority".
    pub action: &'static str,
    /// Leaf entries scanned up to the deciding one (all of them when none matched).
    pub entries_scanned: usize,
    /// One sentence per step.
    pub steps: Vec<String>,
}

impl Datapath {
    /// Explains the verdict for a connect from `cgroup` (relative to the cgroup root; it must
    /// exist) to `dest`:`port` over `protocol` (TCP or UDP), from the live kernel tables.
    pub fn explain(
        &self,
        cgroup: &str,
        dest: IpAddr,
        port: u16,
        protocol: Protocol,
    ) -> Result<Explanation, DatapathError> {
        let rel = cgroup.trim_matches('/');
        let rel = if rel == "." { "" } else { rel };
        let dir = self.cgroup_root.join(rel);
        let shown = if rel.is_empty() { "." } else { rel };
        let caller = cgroup::resolve(&self.cgroup_mount, &dir)
            .ok()
            .flatten()
            .ok_or_else(|| DatapathError::NoSuchCgroup {
                path: crate::model::log_escape(shown).into_owned(),
            })?;
        let cfg = self.config_ref();
        let slot = cfg.active_slot % SLOTS as u32;
        let sc = cfg.slots[slot as usize];
        let mut steps = Vec::new();

        // 1. The deepest ancestor (or the caller) that owns rules in the active slot.
        let mut scope_id = 0;
        if sc.scope_level_max > 0 {
            let below_mount = dir.strip_prefix(&self.cgroup_mount).unwrap_or(&dir);
            let parts: Vec<_> = below_mount.components().collect();
            let mut level = sc.scope_level_max.min(caller.level);
            while level >= sc.scope_level_min.max(1) {
                let ancestor: PathBuf = std::iter::once(self.cgroup_mount.as_os_str())
                    .chain(parts[..level as usize].iter().map(|c| c.as_os_str()))
                    .collect();
                if let Ok(Some(a)) = cgroup::resolve(&self.cgroup_mount, &ancestor) {
                    let key = ScopeKey {
                        cgroup_id: a.id,
                        slot,
                        _pad: 0,
                    };
                    if self.scopes.get(&key, 0).is_ok() {
                        scope_id = a.id;
                        break;
                    }
                }
                level -= 1;
            }
        }
        let live = self.live.as_ref();
        let scope = (scope_id != 0).then(|| {
            live.and_then(|l| l.resolved.iter().find(|(_, r)| r.id == scope_id))
                .map_or_else(|| format!("cgroup id {scope_id}"), |(p, _)| p.to_string())
        });
        steps.push(match &scope {
            Some(s) => format!(
                "cgroup {shown} is judged by the rules of cgroup {s}, the deepest rule cgroup among its ancestors (with the rules it inherits)"
            ),
            None => format!("cgroup {shown} is judged by the global rules: no rule cgroup is among its ancestors"),
        });

        // 2. The longest prefix holding the destination, and the kernel's leaf for it.
        let mapped = match dest {
            IpAddr::V6(a) => a.to_ipv4_mapped(),
            IpAddr::V4(a) => Some(a),
        };
        let keys = self.slots[slot as usize].get(&scope_id);
        let (prefix, leaf) = match mapped {
            Some(a) => (
                keys.and_then(|k| {
                    k.v4.iter()
                        .filter(|n| n.contains(&a))
                        .max_by_key(|n| n.prefix_len())
                })
                .map(|n| IpNet::V4(*n)),
                self.policy_v4.get(slot, scope_id, &Ipv4Net::from(a))?,
            ),
            None => {
                let IpAddr::V6(a) = dest else {
                    unreachable!("IPv4 is handled above")
                };
                (
                    keys.and_then(|k| {
                        k.v6.iter()
                            .filter(|n| n.contains(&a))
                            .max_by_key(|n| n.prefix_len())
                    })
                    .map(|n| IpNet::V6(*n)),
                    self.policy_v6.get(slot, scope_id, &Ipv6Net::from(a))?,
                )
            }
        };
        let proto = abi::protocol(protocol);
        let default = (
            abi::decision_name(sc.default_action),
            abi::class_of(sc.default_class),
        );
        let (mut rule, mut counter, mut entries_scanned) = (None, 0, 0);
        let (mut rule_action, mut class) = default;
        match (&leaf, prefix) {
            (Some(leaf), prefix) => {
                let mut entries: Vec<RuleEntry> =
                    leaf.entries[..(leaf.len as usize).min(LEAF_INLINE_ENTRIES)].to_vec();
                for id in leaf.first_chunk..leaf.first_chunk + leaf.chunks.min(MAX_LEAF_CHUNKS) {
                    // A chunk removed meanwhile ends the scan, as in the kernel.
                    let Ok(chunk) = self.chunks.get(&ChunkKey { slot, id }, 0) else {
                        break;
                    };
                    entries.extend_from_slice(
                        &chunk.entries[..(chunk.len as usize).min(CHUNK_ENTRIES)],
                    );
                }
                let at = prefix.map_or_else(|| "a prefix".to_owned(), |p| p.to_string());
                steps.push(format!(
                    "the longest prefix of that table holding {dest} is {at}, with {} rule entries (rule x port range), most specific first",
                    entries.len()
                ));
                match entries.iter().position(|e| e.matches(port, proto)) {
                    Some(i) => {
                        let e = entries[i];
                        entries_scanned = i + 1;
                        counter = e.counter;
                        rule = live.and_then(|l| {
                            l.rule_counters
                                .iter()
                                .find(|(_, c)| *c == e.counter)
                                .or_else(|| {
                                    // A selector rule's expansion counts on its own counter.
                                    let p = l.pod_counters.iter().find(|p| p.id == e.counter)?;
                                    l.rule_counters.get(p.rule)
                                })
                                .map(|(n, _)| n.clone())
                        });
                        rule_action = abi::decision_name(e.action);
                        class = abi::class_of(e.class);
                        steps.push(format!(
                            "entry {} matches port {port}/{}: rule {} ({rule_action}, class {class}; ports {}-{}, protocol {})",
                            i + 1,
                            protocol_name(proto),
                            rule.as_deref().unwrap_or("(unknown)"),
                            e.port_lo,
                            e.port_hi,
                            if e.proto == PROTO_ANY { "any" } else { protocol_name(e.proto) },
                        ));
                    }
                    None => {
                        entries_scanned = entries.len();
                        steps.push(format!(
                            "no entry matches port {port}/{}: the default action applies ({}, class {})",
                            protocol_name(proto),
                            default.0,
                            default.1
                        ));
                    }
                }
            }
            (None, _) => steps.push(format!(
                "no prefix of that table holds {dest}: the default action applies ({}, class {})",
                default.0, default.1
            )),
        }

        // 3. Mode and SLO admission.
        let enforce = sc.flags & FLAG_ENFORCE != 0;
        let mut action = rule_action;
        if rule_action == "deny" && !enforce {
            action = "audit";
            steps.push(
                "the mode is audit: the deny is counted as audit and the connect admitted".into(),
            );
        } else if rule_action != "deny" && enforce {
            match self.class_states.get(class) {
                s if s == abi::class_state(ClassState::Paused) => {
                    action = "shed";
                    steps.push(format!(
                        "class {class} is paused by SLO admission: the connect is refused (shed)"
                    ));
                }
                s if s == abi::class_state(ClassState::Degraded) => {
                    if counter != 0 && self.parked.contains(&counter) {
                        action = "park";
                        steps.push(format!("class {class} is degraded by SLO admission: the connect is parked on the rule's park target"));
                    } else {
                        action = "allow at lower priority";
                        steps.push(format!("class {class} is degraded by SLO admission and the rule has no park target: admitted at SO_PRIORITY 2"));
                    }
                }
                _ => {}
            }
            if self.class_states.budget(class).is_some() {
                steps.push(format!(
                    "class {class} has a per-beat admission budget: once it is spent, the class's over-budget state applies"
                ));
            }
        }
        Ok(Explanation {
            generation: sc.generation,
            scope,
            prefix,
            rule,
            rule_action,
            class,
            action,
            entries_scanned,
            steps,
        })
    }
}
