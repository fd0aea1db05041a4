//! The policy compiler: rules in, kernel trie leaves out. Pure functions, no kernel access.
//!
//! # Semantics
//! A connect is judged by the rules that apply to its cgroup: rules without a `cgroup`, and rules
//! whose `cgroup` is the connecting cgroup or one of its ancestors. Among the rules that match the
//! destination address, port and protocol, the winner is the one with
//! 1. the deepest `cgroup` scope (a subtree's own rules override the ones it inherits), then
//! 2. the longest matching prefix, then
//! 3. the earliest declaration.
//!
//! # Layout
//! The kernel does one trie lookup per connect, so each scope's trie is *flattened*: every prefix
//! gets a leaf listing every rule entry (rule × port range) that covers it — its own and those of
//! shorter covering prefixes and of outer scopes — already in winning order. The kernel takes the
//! first entry whose port range and protocol match. Entries after a catch-all entry (every port,
//! any protocol) can never win and are dropped.

use crate::{
    abi,
    model::{Action, CgroupPath, Class, DefaultAction, Inventory, Mode, PortRange, RuleSpec},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use knhk_abi::{
    RuleChunk, RuleEntry, RuleLeaf, CHUNK_ENTRIES, LEAF_INLINE_ENTRIES, MAX_LEAF_ENTRIES,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A policy as the datapath applies it: the rules plus the settings that switch with them.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The rules, in declaration order.
    pub rules: Vec<RuleSpec>,
    /// Enforce or audit.
    pub mode: Mode,
    /// Action for connects that match no rule.
    pub default_action: DefaultAction,
    /// Class for connects that match no rule and rules that name none.
    pub default_class: Class,
    /// Record destination heat.
    pub heat: bool,
    /// Record heat for one decision in this many (a power of two), each counting as many.
    pub heat_sample_every: u32,
    /// Record latency histograms.
    pub histograms: bool,
    /// Time at most one connect per CPU and class per this many µs (0 = every connect).
    pub histogram_interval_us: u64,
    /// Send verdict events for decisions other than allow (the `verdict_events` flag).
    pub verdict_events: bool,
}

/// The version of [`Policy::canonical_text`] that [`Policy::digest`] hashes.
///
/// Version 1 is the encoding digests were first recorded with (receipts, `GetPolicy`): one
/// `key=value` line per setting, then one line per rule in declaration order, with the fixed
/// names below — never derived from Rust identifiers, so renaming a type changes no digest. A
/// version-1 digest is the bare SHA-256 hex; a later version will prefix its digests with
/// `v<N>:`, so a digest says how it was computed and old ones stay comparable.
pub const DIGEST_VERSION: u32 = 1;

impl Policy {
    /// The canonical text (encoding version [`DIGEST_VERSION`]): the same policy always gives
    /// the same text. Documented in `docs/receipts.md`.
    pub fn canonical_text(&self) -> String {
        let mut out = format!(
            "mode={}\ndefault_action={}\ndefault_class={}\n",
            canonical::mode(self.mode),
            canonical::default_action(self.default_action),
            self.default_class.as_str()
        );
        for r in &self.rules {
            out.push_str(&rule_line(r, self.default_class));
            out.push('\n');
        }
        out
    }

    /// SHA-256 of [`Policy::canonical_text`], hex.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        Sha256::digest(self.canonical_text().as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// What changes from `self` to `next`.
    pub fn diff(&self, next: &Policy) -> PolicyDiff {
        let before: std::collections::BTreeMap<&str, String> = self
            .rules
            .iter()
            .map(|r| (r.name.as_str(), rule_line(r, self.default_class)))
            .collect();
        let after: std::collections::BTreeMap<&str, String> = next
            .rules
            .iter()
            .map(|r| (r.name.as_str(), rule_line(r, next.default_class)))
            .collect();
        PolicyDiff {
            added: after
                .keys()
                .filter(|n| !before.contains_key(*n))
                .map(|n| n.to_string())
                .collect(),
            removed: before
                .keys()
                .filter(|n| !after.contains_key(*n))
                .map(|n| n.to_string())
                .collect(),
            changed: after
                .iter()
                .filter(|(n, line)| before.get(*n).is_some_and(|b| b != *line))
                .map(|(n, _)| n.to_string())
                .collect(),
            settings_changed: (self.mode, self.default_action, self.default_class)
                != (next.mode, next.default_action, next.default_class),
        }
    }
}

/// The fixed names of the canonical encoding, version 1.
mod canonical {
    use crate::model::{Action, DefaultAction, Mode, Protocol};

    pub fn mode(m: Mode) -> &'static str {
        match m {
            Mode::Enforce => "Enforce",
            Mode::Audit => "Audit",
        }
    }

    pub fn default_action(a: DefaultAction) -> &'static str {
        match a {
            DefaultAction::Allow => "Allow",
            DefaultAction::Deny => "Deny",
        }
    }

    pub fn action(a: Action) -> &'static str {
        match a {
            Action::Allow => "Allow",
            Action::Deny => "Deny",
            Action::Audit => "Audit",
        }
    }

    pub fn protocol(p: Protocol) -> &'static str {
        match p {
            Protocol::Any => "Any",
            Protocol::Tcp => "Tcp",
            Protocol::Udp => "Udp",
        }
    }
}

fn rule_line(r: &RuleSpec, default_class: Class) -> String {
    let list = |v: Vec<String>| v.join(",");
    format!(
        "name={} action={} class={} cgroup={} cidrs={} ports={} protocol={} park_to={}",
        r.name,
        canonical::action(r.action),
        r.class.unwrap_or(default_class).as_str(),
        r.cgroup.as_ref().map(|c| c.as_str()).unwrap_or(""),
        list(r.cidrs.iter().map(|c| c.to_string()).collect()),
        list(r.ports.iter().flatten().map(|p| p.to_string()).collect()),
        canonical::protocol(r.protocol),
        // No park target: empty in the canonical text.
        r.park_to.map(|a| a.to_string()).unwrap_or_default()
    ) + &r
        .workloads()
        // Appended only to selector rules, so every other rule's line (and digest) is as before.
        .map(|w| format!(" workloads={}", w.canonical()))
        .unwrap_or_default()
}

impl Policy {
    /// The policy as configuration text: `[agent]` `mode`, `default_action`, `default_class`
    /// and its `[[policy.rules]]`, which `Config::parse` reads back to the same rules and
    /// settings (heat and histogram switches are the agent's, not the document's).
    pub fn to_config_toml(&self) -> String {
        use toml::{Table, Value};
        let word = |s: &str| Value::String(s.to_owned());
        let mut agent = Table::new();
        agent.insert(
            "mode".into(),
            word(match self.mode {
                Mode::Enforce => "enforce",
                Mode::Audit => "audit",
            }),
        );
        agent.insert(
            "default_action".into(),
            word(match self.default_action {
                DefaultAction::Allow => "allow",
                DefaultAction::Deny => "deny",
            }),
        );
        agent.insert(
            "default_class".into(),
            word(&self.default_class.to_string()),
        );
        let rules: Vec<Value> = self
            .rules
            .iter()
            .map(|r| {
                let mut t = Table::new();
                t.insert("name".into(), word(r.name.as_str()));
                t.insert(
                    "action".into(),
                    word(match r.action {
                        crate::model::Action::Allow => "allow",
                        crate::model::Action::Deny => "deny",
                        crate::model::Action::Audit => "audit",
                    }),
                );
                if let Some(c) = r.class {
                    t.insert("class".into(), word(&c.to_string()));
                }
                if let Some(c) = &r.cgroup {
                    t.insert("cgroup".into(), word(&c.to_string()));
                }
                t.insert(
                    "cidrs".into(),
                    Value::Array(r.cidrs.iter().map(|c| word(&c.to_string())).collect()),
                );
                if let Some(ports) = &r.ports {
                    t.insert(
                        "ports".into(),
                        Value::Array(ports.iter().map(|p| word(&p.to_string())).collect()),
                    );
                }
                match r.protocol {
                    crate::model::Protocol::Any => {}
                    crate::model::Protocol::Tcp => {
                        t.insert("protocol".into(), word("tcp"));
                    }
                    crate::model::Protocol::Udp => {
                        t.insert("protocol".into(), word("udp"));
                    }
                }
                if let Some(a) = r.park_to {
                    t.insert("park_to".into(), word(&a.to_string()));
                }
                if let Some(ns) = &r.namespace {
                    t.insert(
                        "namespace".into(),
                        Value::Array(ns.0.iter().map(|n| word(n.as_str())).collect()),
                    );
                }
                if let Some(sel) = &r.pod_selector {
                    t.insert("pod_selector".into(), selector_toml(sel));
                }
                if let Some(c) = &r.container {
                    t.insert("container".into(), word(c.as_str()));
                }
                Value::Table(t)
            })
            .collect();
        let mut policy = Table::new();
        policy.insert("rules".into(), Value::Array(rules));
        let mut doc = Table::new();
        doc.insert("agent".into(), Value::Table(agent));
        doc.insert("policy".into(), Value::Table(policy));
        // A table of strings and arrays of strings always serializes.
        toml::to_string(&doc).unwrap_or_default()
    }
}

fn selector_toml(sel: &crate::model::LabelSelector) -> toml::Value {
    use toml::{Table, Value};
    let mut t = Table::new();
    if !sel.match_labels.is_empty() {
        t.insert(
            "match_labels".into(),
            Value::Table(
                sel.match_labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), Value::String(v.0.clone())))
                    .collect(),
            ),
        );
    }
    if !sel.match_expressions.is_empty() {
        let exprs = sel
            .match_expressions
            .iter()
            .map(|e| {
                let mut x = Table::new();
                x.insert("key".into(), Value::String(e.key.to_string()));
                x.insert("operator".into(), Value::String(e.operator.as_str().into()));
                if !e.values.is_empty() {
                    x.insert(
                        "values".into(),
                        Value::Array(
                            e.values
                                .iter()
                                .map(|v| Value::String(v.0.clone()))
                                .collect(),
                        ),
                    );
                }
                Value::Table(x)
            })
            .collect();
        t.insert("match_expressions".into(), Value::Array(exprs));
    }
    Value::Table(t)
}

/// Rule-level differences between two policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyDiff {
    /// Rule names only in the new policy.
    pub added: Vec<String>,
    /// Rule names only in the old policy.
    pub removed: Vec<String>,
    /// Rule names in both with different content.
    pub changed: Vec<String>,
    /// Whether mode, default action or default class differ.
    pub settings_changed: bool,
}

/// The compiled trie content of one scope.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScopeTable {
    /// IPv4 prefixes and their leaves.
    pub v4: Vec<(Ipv4Net, CompiledLeaf)>,
    /// IPv6 prefixes and their leaves.
    pub v6: Vec<(Ipv6Net, CompiledLeaf)>,
}

/// A compiled trie leaf: the first [`LEAF_INLINE_ENTRIES`] entries in the trie value itself,
/// the rest, in order, in overflow chunks (written beside the trie; the datapath fills in the
/// leaf's `first_chunk` and `chunks` when it writes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledLeaf {
    /// The trie value.
    pub leaf: RuleLeaf,
    /// The entries past the inline ones.
    pub overflow: Vec<RuleChunk>,
}

impl CompiledLeaf {
    /// A leaf of `entries`, in winning order.
    fn new(entries: &[RuleEntry]) -> Self {
        let (inline, rest) = entries.split_at(entries.len().min(LEAF_INLINE_ENTRIES));
        let mut leaf = RuleLeaf {
            len: inline.len() as u32,
            ..RuleLeaf::default()
        };
        leaf.entries[..inline.len()].copy_from_slice(inline);
        let overflow = rest
            .chunks(CHUNK_ENTRIES)
            .map(|part| {
                let mut chunk = RuleChunk {
                    len: part.len() as u32,
                    ..RuleChunk::default()
                };
                chunk.entries[..part.len()].copy_from_slice(part);
                chunk
            })
            .collect();
        CompiledLeaf { leaf, overflow }
    }

    /// Every entry, in winning order.
    pub fn entries(&self) -> impl Iterator<Item = &RuleEntry> {
        let inline = &self.leaf.entries[..(self.leaf.len as usize).min(LEAF_INLINE_ENTRIES)];
        inline.iter().chain(
            self.overflow
                .iter()
                .flat_map(|c| &c.entries[..(c.len as usize).min(CHUNK_ENTRIES)]),
        )
    }

    /// The entry that decides a connect to `port` over `proto`: the first that matches, as
    /// the kernel scans.
    pub fn first_match(&self, port: u16, proto: u8) -> Option<&RuleEntry> {
        self.entries().find(|e| e.matches(port, proto))
    }
}

impl ScopeTable {
    /// Number of trie entries.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Overflow chunks its leaves need.
    pub fn chunks(&self) -> usize {
        let v4: usize = self.v4.iter().map(|(_, l)| l.overflow.len()).sum();
        let v6: usize = self.v6.iter().map(|(_, l)| l.overflow.len()).sum();
        v4 + v6
    }
}

/// Most rule entries (destination prefix × port range, summed over rules) a policy may have.
/// Checked before anything is built, so an oversized document costs no memory.
pub const MAX_POLICY_ENTRIES: usize = 1 << 20;

/// Checks a policy's size before it is compiled: each rule at most [`MAX_LEAF_ENTRIES`] port
/// ranges (a kernel leaf holds that many entries per prefix), at most `MAX_PREFIXES` prefixes
/// and [`MAX_POLICY_ENTRIES`] entries in all. O(rules); allocates nothing.
pub fn check_bounds(rules: &[RuleSpec]) -> Result<(), CompileError> {
    let (mut prefixes, mut entries) = (0usize, 0usize);
    for (i, r) in rules.iter().enumerate() {
        let ports = r.ports.as_ref().map_or(1, Vec::len);
        if ports > MAX_LEAF_ENTRIES {
            return Err(CompileError::TooLarge {
                rule: Some(i),
                message: format!(
                    "rules[{i}] (\"{}\"): {ports} port ranges; a kernel leaf holds {MAX_LEAF_ENTRIES} entries per prefix: merge ranges or split the rule",
                    r.name
                ),
            });
        }
        prefixes = prefixes.saturating_add(r.cidrs.len());
        entries = entries.saturating_add(r.cidrs.len().saturating_mul(ports));
    }
    let max_prefixes = knhk_abi::MAX_PREFIXES as usize;
    if prefixes > max_prefixes {
        return Err(CompileError::TooLarge {
            rule: None,
            message: format!("{prefixes} destination prefixes; at most {max_prefixes}"),
        });
    }
    if entries > MAX_POLICY_ENTRIES {
        return Err(CompileError::TooLarge {
            rule: None,
            message: format!(
                "{entries} rule entries (prefix x port range); at most {MAX_POLICY_ENTRIES}"
            ),
        });
    }
    Ok(())
}

/// Why a policy cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// The policy is larger than the kernel maps can hold (checked before compiling).
    #[error("the policy is too large: {message}")]
    TooLarge {
        /// The rule at fault, when one is.
        rule: Option<usize>,
        /// What is too large, and the bound.
        message: String,
    },
    /// More rule entries cover one prefix than a kernel leaf holds.
    #[error(
        "{count} rule entries (rule x port range) cover {prefix}{scope}, more than the {max} a kernel leaf holds \
         (rules: {rules}); merge port ranges or split the prefix"
    )]
    LeafOverflow {
        /// The prefix.
        prefix: IpNet,
        /// " in cgroup X" or "".
        scope: String,
        /// Entries covering it.
        count: usize,
        /// The limit.
        max: usize,
        /// Names of the rules involved.
        rules: String,
    },
}

/// One candidate before ordering.
#[derive(Clone, Copy)]
struct Candidate {
    rank: usize,
    prefix_len: u8,
    order: usize,
    entry: RuleEntry,
}

/// Where the rules that select workloads apply on this node now, and the unknown-pod guard:
/// what [`bind`] makes of the node's [`Inventory`] for one policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bindings {
    /// For each selector rule (by index), the cgroups of the pods (or containers) it selects.
    pub selected: BTreeMap<usize, BTreeSet<CgroupPath>>,
    /// The guard of unclassified pods, when `unknown_pod_action` is not `allow`.
    pub guard: Option<Guard>,
    /// The pod (namespace, name) of every bound cgroup: what its hit counters are labelled with.
    pub owners: BTreeMap<CgroupPath, PodName>,
}

/// A pod's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodName {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// The hit counters a compile writes into rule entries.
///
/// A rule's entries count on the rule's own counter, except a selector rule's: it expands into
/// one scope per cgroup it selects, and each expansion (rule, bound cgroup) that has a counter
/// of its own in `pods` counts there, so the kernel's per-counter hits split by pod at no cost
/// per connect. An expansion without one (the agent's attribution bound was reached) counts on
/// the rule's own counter: attributed to the rule only, never to another pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// `rules[i]` counts rule `i`; with a guard, `rules[rules.len()]` counts the guard.
    pub rules: Vec<u32>,
    /// For a selector rule (by index), the counter of each bound cgroup that has its own.
    pub pods: BTreeMap<usize, BTreeMap<CgroupPath, u32>>,
}

impl From<Vec<u32>> for Counters {
    fn from(rules: Vec<u32>) -> Self {
        Counters {
            rules,
            pods: BTreeMap::new(),
        }
    }
}

impl Counters {
    /// The counter of rule `index` at `bound` (the bound cgroup of a selector rule that applies
    /// at the scope), else the rule's own; 0 (the no-rule counter) for an unknown index.
    pub fn of(&self, index: usize, bound: Option<&CgroupPath>) -> u32 {
        bound
            .and_then(|b| self.pods.get(&index)?.get(b))
            .or_else(|| self.rules.get(index))
            .copied()
            .unwrap_or(0)
    }
}

/// Connects from cgroups under `root` that are not in a classified pod get `action`, ahead of
/// every rule, counted on the hit counter [`GUARD_RULE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    /// The cgroup under which pods live.
    pub root: CgroupPath,
    /// `Deny` or `Audit`.
    pub action: Action,
    /// The cgroups of classified pods (each gets a scope of its own, without the guard).
    pub known_pods: BTreeSet<CgroupPath>,
}

/// The hit-counter name of the unknown-pod guard (not a valid rule name, so it never clashes).
pub const GUARD_RULE: &str = "(unknown pod)";

/// Binds `rules` to the node's pods: each selector rule to the cgroups of the pods it selects
/// (or, with `container`, of that container in each of them).
pub fn bind(rules: &[RuleSpec], inventory: Option<&Inventory>) -> Bindings {
    let Some(inv) = inventory else {
        return Bindings::default();
    };
    let (mut selected, mut owners) = (BTreeMap::new(), BTreeMap::new());
    for (i, rule) in rules.iter().enumerate() {
        let Some(sel) = rule.workloads() else {
            continue;
        };
        let mut paths = BTreeSet::new();
        for p in inv.pods.iter().filter(|p| sel.selects(p)) {
            let bound = match &sel.container {
                None => vec![p.cgroup.clone()],
                Some(name) => p
                    .containers
                    .iter()
                    .filter(|c| c.name == name.as_str())
                    .map(|c| c.cgroup.clone())
                    .collect(),
            };
            for path in bound {
                owners.insert(
                    path.clone(),
                    PodName {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                    },
                );
                paths.insert(path);
            }
        }
        selected.insert(i, paths);
    }
    let guard = (inv.unknown_pod_action != Action::Allow).then(|| Guard {
        root: inv.kubepods_root.clone(),
        action: inv.unknown_pod_action,
        known_pods: inv.pods.iter().map(|p| p.cgroup.clone()).collect(),
    });
    Bindings {
        selected,
        guard,
        owners,
    }
}

impl Bindings {
    /// Whether the guard applies at `scope`: under the pods' root, outside every known pod.
    fn guards(&self, scope: Option<&CgroupPath>) -> Option<&Guard> {
        let (g, scope) = (self.guard.as_ref()?, scope?);
        (g.root.contains(scope) && !g.known_pods.iter().any(|p| p.contains(scope))).then_some(g)
    }

    /// The deepest cgroup bound to rule `index` that is or contains `scope`: the expansion of
    /// the rule that applies there.
    pub fn bound_at(&self, index: usize, scope: Option<&CgroupPath>) -> Option<&CgroupPath> {
        let scope = scope?;
        self.selected
            .get(&index)?
            .iter()
            .filter(|p| p.contains(scope))
            .max_by_key(|p| p.depth())
    }

    /// Every expansion of the selector rules: (rule index, bound cgroup), in order.
    pub fn expansions(&self) -> impl Iterator<Item = (usize, &CgroupPath)> {
        self.selected
            .iter()
            .flat_map(|(i, paths)| paths.iter().map(move |p| (*i, p)))
    }
}

/// Compiles the trie for one scope: `scope` is a rule cgroup path, or `None` for the global scope
/// (connects from cgroups that no rule names). `counters` says which hit counter each rule
/// entry, and the guard's, counts on (see [`Counters`]).
pub fn compile_scope(
    rules: &[RuleSpec],
    bindings: &Bindings,
    scope: Option<&CgroupPath>,
    counters: &Counters,
    default_class: Class,
) -> Result<ScopeTable, CompileError> {
    let mut v4: Vec<(Ipv4Net, Candidate)> = Vec::new();
    let mut v6: Vec<(Ipv6Net, Candidate)> = Vec::new();
    if let Some(g) = bindings.guards(scope) {
        let entry = RuleEntry {
            port_lo: 0,
            port_hi: u16::MAX,
            proto: knhk_abi::PROTO_ANY,
            action: abi::action(g.action),
            class: abi::class(default_class),
            _pad: 0,
            counter: counters.of(rules.len(), None),
        };
        // Ahead of every rule: the deepest possible rank.
        let cand = Candidate {
            rank: usize::MAX,
            prefix_len: 0,
            order: rules.len(),
            entry,
        };
        // Every address: 0.0.0.0/0 and ::/0 (always valid prefixes).
        if let (Ok(any4), Ok(any6)) = (
            Ipv4Net::new(std::net::Ipv4Addr::UNSPECIFIED, 0),
            Ipv6Net::new(std::net::Ipv6Addr::UNSPECIFIED, 0),
        ) {
            v4.push((any4, cand));
            v6.push((any6, cand));
        }
    }
    for (order, rule) in rules.iter().enumerate() {
        let (rank, bound) = if rule.workloads().is_some() {
            match bindings.bound_at(order, scope) {
                Some(bound) => (bound.depth(), Some(bound)),
                None => continue,
            }
        } else {
            match (&rule.cgroup, scope) {
                (None, _) => (0, None),
                (Some(own), Some(scope)) if own.contains(scope) => (own.depth(), None),
                _ => continue,
            }
        };
        let counter = counters.of(order, bound);
        let ports = rule.ports.as_deref().unwrap_or(&[PortRange::ALL]);
        for cidr in &rule.cidrs {
            for p in ports {
                let entry = RuleEntry {
                    port_lo: p.lo,
                    port_hi: p.hi,
                    proto: abi::protocol(rule.protocol),
                    action: abi::action(rule.action),
                    class: abi::class(rule.class.unwrap_or(default_class)),
                    _pad: 0,
                    counter,
                };
                let cand = Candidate {
                    rank,
                    prefix_len: cidr.0.prefix_len(),
                    order,
                    entry,
                };
                match cidr.0 {
                    IpNet::V4(n) => v4.push((n, cand)),
                    IpNet::V6(n) => v6.push((n, cand)),
                }
            }
        }
    }
    // The global scope: no suffix.
    let describe_scope = || scope.map(|s| format!(" in cgroup {s}")).unwrap_or_default();
    let name_of = |order: usize| {
        rules
            .get(order)
            .map_or_else(|| GUARD_RULE.to_owned(), |r| r.name.to_string())
    };
    Ok(ScopeTable {
        v4: flatten(
            v4,
            |n| n.prefix_len(),
            // Lengths come from existing prefixes: always valid.
            |n, len| Ipv4Net::new(n.network(), len).map(|n| n.trunc()).ok(),
        )
        .map_err(|(p, c)| overflow(IpNet::V4(p), c, describe_scope(), name_of))?,
        v6: flatten(
            v6,
            |n| n.prefix_len(),
            // Lengths come from existing prefixes: always valid.
            |n, len| Ipv6Net::new(n.network(), len).map(|n| n.trunc()).ok(),
        )
        .map_err(|(p, c)| overflow(IpNet::V6(p), c, describe_scope(), name_of))?,
    })
}

fn overflow(
    prefix: IpNet,
    cands: Vec<Candidate>,
    scope: String,
    name_of: impl Fn(usize) -> String,
) -> CompileError {
    let names: BTreeSet<usize> = cands.iter().map(|c| c.order).collect();
    CompileError::LeafOverflow {
        prefix,
        scope,
        count: cands.len(),
        max: MAX_LEAF_ENTRIES,
        rules: names
            .into_iter()
            .map(name_of)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Builds one leaf per distinct prefix from the candidates of every covering prefix.
#[allow(clippy::type_complexity)]
fn flatten<N: Copy + Eq + std::hash::Hash + Ord>(
    cands: Vec<(N, Candidate)>,
    len_of: impl Fn(&N) -> u8,
    truncate: impl Fn(&N, u8) -> Option<N>,
) -> Result<Vec<(N, CompiledLeaf)>, (N, Vec<Candidate>)> {
    let mut by_prefix: HashMap<N, Vec<Candidate>> = HashMap::new();
    for (net, c) in cands {
        by_prefix.entry(net).or_default().push(c);
    }
    let lengths: BTreeSet<u8> = by_prefix.keys().map(&len_of).collect();
    let mut prefixes: Vec<N> = by_prefix.keys().copied().collect();
    prefixes.sort();
    let mut out = Vec::with_capacity(prefixes.len());
    for net in prefixes {
        let own_len = len_of(&net);
        let mut covering: Vec<Candidate> = Vec::new();
        for &len in lengths.iter().filter(|l| **l <= own_len) {
            if let Some(cands) = truncate(&net, len).and_then(|outer| by_prefix.get(&outer)) {
                covering.extend_from_slice(cands);
            }
        }
        covering.sort_by(|a, b| {
            b.rank
                .cmp(&a.rank)
                .then(b.prefix_len.cmp(&a.prefix_len))
                .then(a.order.cmp(&b.order))
        });
        if let Some(catch_all) = covering.iter().position(|c| {
            c.entry.port_lo == 0
                && c.entry.port_hi == u16::MAX
                && c.entry.proto == knhk_abi::PROTO_ANY
        }) {
            covering.truncate(catch_all + 1);
        }
        if covering.len() > MAX_LEAF_ENTRIES {
            return Err((net, covering));
        }
        let entries: Vec<RuleEntry> = covering.iter().map(|c| c.entry).collect();
        out.push((net, CompiledLeaf::new(&entries)));
    }
    Ok(out)
}

/// The distinct cgroup paths that rules name, in a stable order.
pub fn rule_scopes(rules: &[RuleSpec]) -> Vec<CgroupPath> {
    let set: BTreeSet<&CgroupPath> = rules.iter().filter_map(|r| r.cgroup.as_ref()).collect();
    set.into_iter().cloned().collect()
}

/// Every cgroup that needs a scope of its own: the rules' cgroups, the bound workloads', and
/// with a guard its root and every known pod.
pub fn scopes_of(rules: &[RuleSpec], bindings: &Bindings) -> Vec<CgroupPath> {
    let mut set: BTreeSet<CgroupPath> = rule_scopes(rules).into_iter().collect();
    set.extend(bindings.selected.values().flatten().cloned());
    if let Some(g) = &bindings.guard {
        set.insert(g.root.clone());
        set.extend(g.known_pods.iter().cloned());
    }
    set.into_iter().collect()
}

/// What decides a scope's table besides the policy: the bound rules, their ranks and the
/// counters of their expansions there, and the guard. Two bindings (with their counters) give
/// `scope` the same table when this is equal.
#[allow(clippy::type_complexity)]
pub fn scope_signature(
    bindings: &Bindings,
    counters: &Counters,
    scope: &CgroupPath,
) -> (Vec<(usize, usize, u32)>, bool) {
    let ranks = bindings
        .selected
        .keys()
        .filter_map(|&i| {
            bindings
                .bound_at(i, Some(scope))
                .map(|b| (i, b.depth(), counters.of(i, Some(b))))
        })
        .collect();
    (ranks, bindings.guards(Some(scope)).is_some())
}

#[cfg(test)]
mod tests;
