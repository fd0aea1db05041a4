//! Writing a policy: the checks and compile of [`Datapath::prepare`], the write into a free slot
//! and the one-store switch of [`Datapath::apply`], and the reclaim of retired slots.

use super::*;

/// Most (selector rule, bound cgroup) expansions with a hit counter of their own: half the
/// counter space, so pods can never starve the rules of counters. Expansions past it count on
/// their rule's own counter (attributed to the rule, never to another pod).
pub const MAX_POD_COUNTERS: u32 = MAX_RULE_COUNTERS / 2;

/// Stable hit-counter ids per rule name, and per (rule name, bound cgroup) for the expansions of
/// selector rules; counter 0 counts connects that matched no rule.
#[derive(Debug, Clone, Default)]
pub(super) struct CounterIds {
    by_name: HashMap<String, u32>,
    by_pod: HashMap<(String, CgroupPath), u32>,
    /// Released ids, oldest first: reused oldest first.
    free: std::collections::VecDeque<u32>,
    next: u32,
    /// The bound on `by_pod` (`None`: [`MAX_POD_COUNTERS`]; tests set a small one).
    pod_limit: Option<u32>,
}

/// What [`CounterIds::assign_pods`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct PodAssignment {
    /// Ids new to their expansion (to be zeroed before the kernel counts on them).
    pub(super) fresh: Vec<u32>,
    /// Ids of expansions no generation has any more, with their rule's name: their counts are
    /// folded into the rule's own counter, so the rule's total never goes down.
    pub(super) released: Vec<(u32, String)>,
    /// Expansions left without a counter of their own (the bound was reached).
    pub(super) unattributed: usize,
}

impl CounterIds {
    /// Ids for `names`, keeping those of names already known; returns (ids, newly assigned).
    pub(super) fn assign<'a>(
        &mut self,
        names: impl Iterator<Item = &'a str>,
    ) -> Result<(Vec<u32>, Vec<u32>), DatapathError> {
        let names: Vec<&str> = names.collect();
        let keep: std::collections::HashSet<&str> = names.iter().copied().collect();
        let gone: Vec<String> = self
            .by_name
            .keys()
            .filter(|n| !keep.contains(n.as_str()))
            .cloned()
            .collect();
        for n in gone {
            if let Some(id) = self.by_name.remove(&n) {
                self.free.push_back(id);
            }
        }
        let (mut ids, mut fresh) = (Vec::with_capacity(names.len()), Vec::new());
        for n in names {
            let id = match self.by_name.get(n) {
                Some(id) => *id,
                None => {
                    let id = match self.free.pop_front() {
                        Some(id) => id,
                        None => {
                            self.next = self.next.max(1);
                            let id = self.next;
                            self.next += 1;
                            id
                        }
                    };
                    if id >= MAX_RULE_COUNTERS {
                        return Err(DatapathError::Capacity {
                            what: "rule counters",
                            needed: id as usize + 1,
                            live: self.by_name.len() + self.by_pod.len(),
                            max: MAX_RULE_COUNTERS as usize,
                        });
                    }
                    self.by_name.insert(n.to_owned(), id);
                    fresh.push(id);
                    id
                }
            };
            ids.push(id);
        }
        Ok((ids, fresh))
    }

    /// Ids for the expansions `keys` (rule name, bound cgroup) of every generation in the
    /// kernel, keeping those already known and releasing the others. A new expansion takes an
    /// id never used before while there is one, so an id is reused only long after its last
    /// count (no connect still in flight on an old table can count for the new owner); past
    /// [`MAX_POD_COUNTERS`] expansions (or the counter space), it gets none.
    pub(super) fn assign_pods<'a>(
        &mut self,
        keys: impl Iterator<Item = (&'a str, &'a CgroupPath)>,
    ) -> PodAssignment {
        let keys: std::collections::BTreeSet<(&str, &CgroupPath)> = keys.collect();
        let mut out = PodAssignment::default();
        let gone: Vec<(String, CgroupPath)> = self
            .by_pod
            .keys()
            .filter(|(n, p)| !keys.contains(&(n.as_str(), p)))
            .cloned()
            .collect();
        for key in gone {
            if let Some(id) = self.by_pod.remove(&key) {
                out.released.push((id, key.0));
            }
        }
        let limit = self.pod_limit.unwrap_or(MAX_POD_COUNTERS) as usize;
        for (name, path) in keys {
            let key = (name.to_owned(), path.clone());
            if self.by_pod.contains_key(&key) {
                continue;
            }
            if self.by_pod.len() >= limit {
                out.unattributed += 1;
                continue;
            }
            self.next = self.next.max(1);
            let id = if self.next < MAX_RULE_COUNTERS {
                self.next += 1;
                Some(self.next - 1)
            } else {
                self.free.pop_front()
            };
            match id {
                Some(id) => {
                    self.by_pod.insert(key, id);
                    out.fresh.push(id);
                }
                None => out.unattributed += 1,
            }
        }
        // Released only now: never handed out again in the call that released them.
        self.free.extend(out.released.iter().map(|(id, _)| *id));
        out
    }

    /// The id of rule `name`.
    pub(super) fn rule(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// The id of the expansion of rule `name` at `path`.
    pub(super) fn pod(&self, name: &str, path: &CgroupPath) -> Option<u32> {
        self.by_pod.get(&(name.to_owned(), path.clone())).copied()
    }
}

/// The counters of `policy` bound by `bindings`: the rules' ids (`rule_ids`, the guard's
/// last) and every expansion's own id where it has one; with the pod counters as status and
/// metrics show them.
pub(super) fn counters_of(
    policy: &Policy,
    bindings: &Bindings,
    rule_ids: Vec<u32>,
    ids: &CounterIds,
) -> (crate::policy::Counters, Vec<PodCounter>) {
    let mut counters = crate::policy::Counters::from(rule_ids);
    let mut pods = Vec::new();
    for (i, path) in bindings.expansions() {
        let (Some(rule), Some(owner)) = (policy.rules.get(i), bindings.owners.get(path)) else {
            continue;
        };
        if let Some(id) = ids.pod(rule.name.as_str(), path) {
            counters.pods.entry(i).or_default().insert(path.clone(), id);
            pods.push(PodCounter {
                rule: i,
                action: match (rule.action, policy.mode) {
                    (crate::model::Action::Allow, _) => "allow",
                    (crate::model::Action::Deny, crate::model::Mode::Enforce) => "deny",
                    (crate::model::Action::Deny, crate::model::Mode::Audit)
                    | (crate::model::Action::Audit, _) => "audit",
                },
                namespace: owner.namespace.clone(),
                pod: owner.name.clone(),
                cgroup: path.clone(),
                id,
            });
        }
    }
    (counters, pods)
}

/// The expansion keys (rule name, bound cgroup) of a policy's selector rules.
pub(super) fn pod_keys<'a>(
    policy: &'a Policy,
    bindings: &'a Bindings,
) -> impl Iterator<Item = (&'a str, &'a CgroupPath)> {
    bindings
        .expansions()
        .filter_map(|(i, p)| policy.rules.get(i).map(|r| (r.name.as_str(), p)))
}

/// The hit-counter names of a policy: its rules', then the unknown-pod guard's when bound.
pub(super) fn counter_names<'a>(
    policy: &'a Policy,
    bindings: &Bindings,
) -> impl Iterator<Item = &'a str> {
    let guard = bindings.guard.is_some().then_some(GUARD_RULE);
    policy.rules.iter().map(|r| r.name.as_str()).chain(guard)
}

/// A generation written into a free slot by [`Datapath::write_generation`], not yet live.
pub(super) struct Written {
    pub(super) slot: u32,
    pub(super) parked: std::collections::HashSet<u32>,
    pub(super) counters: CounterIds,
    pub(super) live: Live,
    pub(super) report: ApplyReport,
    /// Expansion counters released: folded into their rules' counters once this is live.
    pub(super) released: Vec<(u32, String)>,
}

/// A policy checked and compiled by [`Datapath::prepare`], ready to be written.
#[derive(Debug)]
pub struct Prepared {
    bindings: Bindings,
    resolved: BTreeMap<CgroupPath, cgroup::CgroupRef>,
    pending: Vec<CgroupPath>,
    counters: CounterIds,
    ids: crate::policy::Counters,
    pod_counters: Vec<PodCounter>,
    released: Vec<(u32, String)>,
    unattributed: usize,
    fresh: Vec<u32>,
    tables: Vec<(u64, Option<u32>, ScopeTable)>,
    new_v4: usize,
    new_v6: usize,
    new_chunks: usize,
}

impl Prepared {
    /// Trie entries the policy compiles to, over every scope that exists now.
    pub fn trie_entries(&self) -> usize {
        self.new_v4 + self.new_v6
    }
}

impl Datapath {
    /// Everything [`Datapath::apply`] checks, without writing: bounds, cgroup levels, counter
    /// ids, the compile of every scope, and whether the result could ever fit the maps. The one
    /// validator of ApplyPolicy and DryRun.
    pub fn prepare(&self, policy: &Policy) -> Result<Prepared, DatapathError> {
        self.prepare_beside(policy, &[], &[])
    }

    /// As [`Datapath::prepare`], keeping the hit counters of `beside` (the rule names of the
    /// other generation in the kernel during a rollout) and of its pod expansions
    /// (`beside_pods`) assigned as well.
    pub(super) fn prepare_beside(
        &self,
        policy: &Policy,
        beside: &[String],
        beside_pods: &[(String, CgroupPath)],
    ) -> Result<Prepared, DatapathError> {
        crate::policy::check_bounds(&policy.rules)?;
        let bindings = bind(&policy.rules, self.inventory.as_deref());
        let mut resolved = BTreeMap::new();
        let mut pending = Vec::new();
        for path in scopes_of(&policy.rules, &bindings) {
            // A rule's level is known before its cgroup exists: refuse what the programs
            // could not probe (it would silently disable shallower rules).
            let level = self.root_level + path.depth() as u32;
            if level > MAX_SCOPE_LEVEL {
                return Err(DatapathError::ScopeTooDeep {
                    path: crate::model::log_escape(path.as_str()).into_owned(),
                    level,
                    root_level: self.root_level,
                    max: MAX_SCOPE_LEVEL,
                });
            }
            let dir = self.cgroup_root.join(path.as_str());
            match cgroup::resolve(&self.cgroup_mount, &dir) {
                Ok(Some(r)) => {
                    resolved.insert(path, r);
                }
                // A path that cannot be looked up now is pending; the follower reports why.
                Ok(None) | Err(_) => pending.push(path),
            }
        }
        let mut counters = self.counters.clone();
        let own = counter_names(policy, &bindings).count();
        let (mut rule_ids, mut fresh) = counters
            .assign(counter_names(policy, &bindings).chain(beside.iter().map(String::as_str)))?;
        rule_ids.truncate(own);
        let pods = counters.assign_pods(
            pod_keys(policy, &bindings).chain(beside_pods.iter().map(|(n, p)| (n.as_str(), p))),
        );
        fresh.extend(&pods.fresh);
        let (ids, pod_counters) = counters_of(policy, &bindings, rule_ids, &counters);
        let mut tables: Vec<(u64, Option<u32>, ScopeTable)> = vec![(
            0,
            None,
            compile_scope(&policy.rules, &bindings, None, &ids, policy.default_class)?,
        )];
        for (path, r) in &resolved {
            tables.push((
                r.id,
                Some(r.level),
                compile_scope(
                    &policy.rules,
                    &bindings,
                    Some(path),
                    &ids,
                    policy.default_class,
                )?,
            ));
        }
        let new_v4: usize = tables.iter().map(|t| t.2.v4.len()).sum();
        let new_v6: usize = tables.iter().map(|t| t.2.v6.len()).sum();
        let new_chunks: usize = tables.iter().map(|t| t.2.chunks()).sum();
        for (what, needed, max) in [
            ("IPv4 prefixes", new_v4, MAX_PREFIXES as usize),
            ("IPv6 prefixes", new_v6, MAX_PREFIXES as usize),
            ("cgroup scopes", resolved.len(), MAX_SCOPES as usize),
            ("leaf overflow chunks", new_chunks, MAX_CHUNKS as usize),
        ] {
            if needed > max {
                return Err(DatapathError::Capacity {
                    what,
                    needed,
                    live: 0,
                    max,
                });
            }
        }
        Ok(Prepared {
            bindings,
            resolved,
            pending,
            counters,
            ids,
            pod_counters,
            released: pods.released,
            unattributed: pods.unattributed,
            fresh,
            tables,
            new_v4,
            new_v6,
            new_chunks,
        })
    }

    /// Compiles `policy` and switches it in atomically as the next generation. On error the
    /// live generation is unchanged, including when `deadline` passes before the switch.
    pub fn apply(
        &mut self,
        policy: &Arc<Policy>,
        deadline: Option<Instant>,
    ) -> Result<ApplyReport, DatapathError> {
        self.apply_as(policy, deadline, None)
    }

    /// As [`Datapath::apply`], numbering the generation `generation` when given (a restart
    /// re-adopting a kept generation, or continuing its count on fresh maps).
    pub fn apply_as(
        &mut self,
        policy: &Arc<Policy>,
        deadline: Option<Instant>,
        generation: Option<u64>,
    ) -> Result<ApplyReport, DatapathError> {
        let started = Instant::now();
        let beside = self.candidate_rule_names();
        let beside_pods = self
            .candidate
            .as_ref()
            .map(|c| c.live.pod_keys())
            .unwrap_or_default();
        let prepared = self.prepare_beside(policy, &beside, &beside_pods)?;
        let generation = generation.unwrap_or(self.generation + 1);
        let written = self.write_generation(policy, prepared, generation, deadline, started)?;
        let active = self.active_slot();
        let cfg = self.config_ptr();
        // SAFETY: one aligned atomic store; the slot's settings were written before it.
        unsafe {
            AtomicU32::from_ptr(&raw mut (*cfg).active_slot).store(written.slot, Ordering::SeqCst)
        };
        self.bump_epoch();
        let switch_latency = started.elapsed();
        tracing::debug!(
            total_us = switch_latency.as_micros() as u64,
            slot = written.slot,
            "policy written and switched"
        );
        self.switches += 1;
        self.retired[active as usize] = Some(self.switches);
        self.drop_park_targets_except(&written.parked)?;
        self.parked = written.parked;
        self.generation = generation;
        self.remove_superseded_pins_once()?;
        self.counters = written.counters;
        self.fold_released(&written.released);
        let report = ApplyReport {
            switch_latency,
            ..written.report
        };
        self.live = Some(written.live);
        Ok(report)
    }

    /// Writes `policy` as `generation` into a free slot (tries, scopes, park targets, the slot's
    /// settings) without making it live. Nothing connects read changes.
    pub(super) fn write_generation(
        &mut self,
        policy: &Arc<Policy>,
        prepared: Prepared,
        generation: u64,
        deadline: Option<Instant>,
        started: Instant,
    ) -> Result<Written, DatapathError> {
        let Prepared {
            bindings,
            resolved,
            pending,
            counters,
            ids,
            pod_counters,
            released,
            unattributed,
            fresh,
            tables,
            new_v4,
            new_v6,
            new_chunks,
        } = prepared;
        // A free slot, and room in the maps: both may need the retired slots reclaimed first.
        let fits = |dp: &Self| {
            let (v4, v6, sc, ch) = dp.entries_in_use();
            v4 + new_v4 <= MAX_PREFIXES as usize
                && v6 + new_v6 <= MAX_PREFIXES as usize
                && sc + resolved.len() <= MAX_SCOPES as usize
                && ch + new_chunks <= MAX_CHUNKS as usize
        };
        let compiled = started.elapsed();
        if self.free_slot().is_none() || !fits(self) {
            tracing::debug!(
                "no free policy slot or map room: waiting for a grace period to reclaim"
            );
            sys::synchronize_rcu().map_err(io_err("membarrier", Path::new("(synchronize_rcu)")))?;
            self.clear_retired(self.switches, usize::MAX)?;
        }
        let Some(inactive) = self.free_slot() else {
            return Err(DatapathError::Load(
                "no free policy slot after reclaiming".into(),
            ));
        };
        let (live_v4, live_v6, live_scopes, live_chunks) = self.entries_in_use();
        for (what, needed, live, max) in [
            ("IPv4 prefixes", new_v4, live_v4, MAX_PREFIXES as usize),
            ("IPv6 prefixes", new_v6, live_v6, MAX_PREFIXES as usize),
            (
                "cgroup scopes",
                resolved.len(),
                live_scopes,
                MAX_SCOPES as usize,
            ),
            (
                "leaf overflow chunks",
                new_chunks,
                live_chunks,
                MAX_CHUNKS as usize,
            ),
        ] {
            if needed + live > max {
                return Err(DatapathError::Capacity {
                    what,
                    needed,
                    live,
                    max,
                });
            }
        }

        for id in &fresh {
            self.set_rule_hits(*id, 0);
        }
        let (mut level_min, mut level_max) = (0u32, 0u32);
        let writing = Instant::now();
        for (scope, level, table) in &tables {
            self.write_table(inactive, *scope, table)?;
            if let Some(level) = level {
                level_min = if level_min == 0 {
                    *level
                } else {
                    level_min.min(*level)
                };
                level_max = level_max.max(*level);
            }
        }
        for (scope, level, _) in &tables {
            if let Some(level) = level {
                self.insert_scope(inactive, *scope, *level)?;
            }
        }
        let slot_config = SlotConfig {
            generation,
            flags: flags_of(policy),
            default_action: match policy.default_action {
                DefaultAction::Allow => ACTION_ALLOW,
                DefaultAction::Deny => ACTION_DENY,
            },
            default_class: abi::class(policy.default_class),
            heat_sample_shift: policy.heat_sample_every.max(1).trailing_zeros() as u8,
            _pad: 0,
            scope_level_min: level_min,
            scope_level_max: level_max,
            histogram_interval_ns: policy.histogram_interval_us.saturating_mul(1000),
            event_interval_ns: EVENT_INTERVAL.as_nanos() as u64,
        };
        // Park targets are keyed by the rules' (stable) counter ids: written before the switch;
        // the caller drops the unused ones after it. A rule on both sides of a rollout parks on
        // the target of the side written last.
        let mut parked = std::collections::HashSet::new();
        // A selector rule's expansions park on their own counters' targets too.
        let expansions = pod_counters
            .iter()
            .filter_map(|p| policy.rules.get(p.rule).map(|r| (r, &p.id)));
        for (rule, counter) in policy.rules.iter().zip(&ids.rules).chain(expansions) {
            if let Some(addr) = rule.park_to {
                let target = park_target(addr);
                self.park
                    .insert(*counter, target, 0)
                    .map_err(map_err("insert", map_names::PARK))?;
                parked.insert(*counter);
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(DatapathError::DeadlineExceeded);
        }
        let cfg = self.config_ptr();
        // SAFETY: the inactive slot's settings are not read by connects until it is switched in.
        unsafe { std::ptr::write_volatile(&raw mut (*cfg).slots[inactive as usize], slot_config) };
        tracing::debug!(
            compile_us = compiled.as_micros() as u64,
            write_us = writing.elapsed().as_micros() as u64,
            slot = inactive,
            generation,
            "policy written into a free slot"
        );
        let live = Live {
            rule_counters: counter_names(policy, &bindings)
                .zip(&ids.rules)
                .map(|(n, c)| (n.to_owned(), *c))
                .collect(),
            pod_counters: pod_counters.into(),
            unattributed,
            scopes: scopes_of(&policy.rules, &bindings).into(),
            bindings: Arc::new(bindings),
            policy: policy.clone(),
            counters: Arc::new(ids),
            resolved: resolved.clone(),
        };
        Ok(Written {
            slot: inactive,
            parked,
            counters,
            live,
            released,
            report: ApplyReport {
                generation,
                rules: policy.rules.len(),
                trie_entries: new_v4 + new_v6,
                active_scopes: resolved.into_keys().collect(),
                pending_scopes: pending,
                switch_latency: started.elapsed(),
            },
        })
    }

    /// Removes the park targets of counters not in `keep` (nor parked by a rollout's candidate).
    pub(super) fn drop_park_targets_except(
        &mut self,
        keep: &std::collections::HashSet<u32>,
    ) -> Result<(), DatapathError> {
        let candidate_parks = self
            .candidate
            .as_ref()
            .map(|c| c.parked.clone())
            .unwrap_or_default();
        for stale in self.parked.difference(keep).copied().collect::<Vec<_>>() {
            if candidate_parks.contains(&stale) {
                continue;
            }
            ignore_missing(self.park.remove(&stale)).map_err(map_err("remove", map_names::PARK))?;
        }
        Ok(())
    }

    /// After the first switch by this build: the older ABI's pins go (their programs detach).
    fn remove_superseded_pins_once(&mut self) -> Result<(), DatapathError> {
        if self.superseded_pins {
            // This build's programs enforce the new policy: the older ABI's may go.
            let removed =
                pins::remove_superseded_pins(self.layout.dir.parent().unwrap_or(&self.layout.dir))?;
            info!(
                pins = removed.len(),
                "removed the pins of an older map ABI: its programs are detached"
            );
            self.superseded_pins = false;
        }
        Ok(())
    }

    /// A slot that is neither live nor retired (and so empty).
    pub(super) fn free_slot(&self) -> Option<u32> {
        let active = self.active_slot() as usize;
        let candidate = self.candidate.as_ref().map(|c| c.slot as usize);
        (0..SLOTS)
            .find(|s| *s != active && Some(*s) != candidate && self.retired[*s].is_none())
            .map(|s| s as u32)
    }

    /// Trie entries (IPv4, IPv6), scope entries and overflow chunks held by every slot.
    pub(super) fn entries_in_use(&self) -> (usize, usize, usize, usize) {
        self.slots
            .iter()
            .flat_map(|s| s.values())
            .fold((0, 0, 0, 0), |(a, b, c, d), k| {
                (
                    a + k.v4.len(),
                    b + k.v6.len(),
                    c + k.level.is_some() as usize,
                    d + k.chunks.len(),
                )
            })
    }

    /// Starts reclaiming retired slots: returns a ticket when there is something to reclaim.
    /// Wait for [`grace_period`] (without holding the datapath), then call
    /// [`Datapath::finish_reclaim`] with the ticket. `apply` never waits for the grace period
    /// while a free slot is left.
    pub fn begin_reclaim(&self) -> Option<ReclaimTicket> {
        self.retired
            .iter()
            .any(Option::is_some)
            .then_some(ReclaimTicket {
                switches: self.switches,
            })
    }

    /// Clears up to `budget` entries of the slots retired up to `ticket` (which the caller took
    /// before waiting for a grace period); returns whether entries remain. Small budgets keep
    /// each hold of the datapath short, so applies are not held up behind a large reclaim.
    pub fn finish_reclaim(
        &mut self,
        ticket: ReclaimTicket,
        budget: usize,
    ) -> Result<bool, DatapathError> {
        self.clear_retired(ticket.switches, budget)
    }

    pub(super) fn clear_retired(
        &mut self,
        up_to_switch: u64,
        mut budget: usize,
    ) -> Result<bool, DatapathError> {
        for slot in 0..SLOTS {
            if self.retired[slot].is_none_or(|at| at > up_to_switch) {
                continue;
            }
            let scopes: Vec<u64> = self.slots[slot].keys().copied().collect();
            for scope in scopes {
                if budget == 0 {
                    return Ok(true);
                }
                budget = self.remove_scope_entries(slot as u32, scope, budget)?;
            }
            if self.slots[slot].is_empty() {
                self.retired[slot] = None;
                self.next_chunk[slot] = 1;
            }
        }
        Ok(false)
    }

    /// Removes up to `budget` entries of one scope from a slot, the scope entry (which makes the
    /// tries reachable) first; returns the budget left.
    pub(super) fn remove_scope_entries(
        &mut self,
        slot: u32,
        scope: u64,
        budget: usize,
    ) -> Result<usize, DatapathError> {
        let Some(keys) = self.slots[slot as usize].get_mut(&scope) else {
            return Ok(budget);
        };
        if keys.level.take().is_some() {
            let key = ScopeKey {
                cgroup_id: scope,
                slot,
                _pad: 0,
            };
            ignore_missing(self.scopes.remove(&key))
                .map_err(map_err("remove", map_names::SCOPES))?;
        }
        let budget = self.policy_v4.remove(slot, scope, &mut keys.v4, budget)?;
        let budget = self.policy_v6.remove(slot, scope, &mut keys.v6, budget)?;
        if keys.v4.is_empty() && keys.v6.is_empty() {
            // No leaf refers to the chunks any more.
            for id in keys.chunks.drain(..) {
                ignore_missing(self.chunks.remove(&ChunkKey { slot, id }))
                    .map_err(map_err("remove", map_names::LEAF_CHUNKS))?;
            }
            self.slots[slot as usize].remove(&scope);
        }
        Ok(budget)
    }

    pub(super) fn write_table(
        &mut self,
        slot: u32,
        scope: u64,
        table: &ScopeTable,
    ) -> Result<(), DatapathError> {
        // Record the keys first: if a write fails midway, the slot's cleanup still finds them.
        let keys = self.slots[slot as usize].entry(scope).or_default();
        keys.v4.extend(table.v4.iter().map(|(n, _)| *n));
        keys.v6.extend(table.v6.iter().map(|(n, _)| *n));
        // Overflow chunks before the leaves that refer to them.
        let first_v4 = self.write_chunks(slot, scope, table.v4.iter().map(|(_, l)| l))?;
        let first_v6 = self.write_chunks(slot, scope, table.v6.iter().map(|(_, l)| l))?;
        self.policy_v4.write(slot, scope, &table.v4, &first_v4)?;
        self.policy_v6.write(slot, scope, &table.v6, &first_v6)
    }

    /// Writes the overflow chunks of `leaves` into `slot`; returns each leaf's first chunk id
    /// (0 for a leaf without overflow).
    fn write_chunks<'a>(
        &mut self,
        slot: u32,
        scope: u64,
        leaves: impl Iterator<Item = &'a CompiledLeaf>,
    ) -> Result<Vec<u32>, DatapathError> {
        let mut firsts = Vec::new();
        for leaf in leaves {
            if leaf.overflow.is_empty() {
                firsts.push(0);
                continue;
            }
            let next = &mut self.next_chunk[slot as usize];
            let first = (*next).max(1);
            *next = first + leaf.overflow.len() as u32;
            let keys = self.slots[slot as usize].entry(scope).or_default();
            keys.chunks
                .extend(first..first + leaf.overflow.len() as u32);
            for (id, chunk) in (first..).zip(&leaf.overflow) {
                self.chunks
                    .insert(ChunkKey { slot, id }, chunk, 0)
                    .map_err(map_err("insert", map_names::LEAF_CHUNKS))?;
            }
            firsts.push(first);
        }
        Ok(firsts)
    }

    pub(super) fn insert_scope(
        &mut self,
        slot: u32,
        scope: u64,
        level: u32,
    ) -> Result<(), DatapathError> {
        let key = ScopeKey {
            cgroup_id: scope,
            slot,
            _pad: 0,
        };
        self.scopes
            .insert(key, ScopeValue { level, _pad: 0 }, 0)
            .map_err(map_err("insert", map_names::SCOPES))?;
        self.slots[slot as usize].entry(scope).or_default().level = Some(level);
        Ok(())
    }

    /// Removes one scope's entries from a slot: the scope entry first (making the tries
    /// unreachable), then the tries.
    /// Removes every entry of one scope from a slot.
    pub(super) fn remove_scope(&mut self, slot: u32, scope: u64) -> Result<(), DatapathError> {
        self.remove_scope_entries(slot, scope, usize::MAX)
            .map(|_| ())
    }

    /// Folds the counts of released expansion counters into their rules' own counters (when
    /// the rule is still known), and zeroes them: a rule's total never goes down when a pod
    /// goes away. Call with `self.counters` already the assignment that released them.
    pub(super) fn fold_released(&self, released: &[(u32, String)]) {
        for (id, rule) in released {
            if *id == 0 || *id >= MAX_RULE_COUNTERS {
                continue;
            }
            let p = self.rule_hits.at::<u64>(*id as usize * 8);
            // SAFETY: aligned u64 inside the mapping; the kernel updates it atomically too.
            let hits =
                unsafe { std::sync::atomic::AtomicU64::from_ptr(p).swap(0, Ordering::Relaxed) };
            if let Some(own) = self.counters.rule(rule).filter(|c| *c < MAX_RULE_COUNTERS) {
                let q = self.rule_hits.at::<u64>(own as usize * 8);
                // SAFETY: as above.
                unsafe {
                    std::sync::atomic::AtomicU64::from_ptr(q).fetch_add(hits, Ordering::Relaxed)
                };
            }
        }
    }

    pub(super) fn set_rule_hits(&self, counter: u32, value: u64) {
        let p = self.rule_hits.at::<u64>(counter as usize * 8);
        // SAFETY: aligned u64 inside the mapping; the kernel updates it atomically too.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(p).store(value, Ordering::Relaxed) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> CgroupPath {
        s.parse().expect("path")
    }

    #[test]
    fn each_pod_expansion_gets_its_own_stable_counter() {
        let mut ids = CounterIds::default();
        let (rules, _) = ids.assign(["r", "s"].into_iter()).expect("assign");
        assert_eq!(rules, vec![1, 2]);
        let (a, b, c) = (path("kp/poda"), path("kp/podb"), path("kp/podc"));
        let out = ids.assign_pods([("r", &a), ("r", &b), ("s", &a)].into_iter());
        assert_eq!(out.fresh, vec![3, 4, 5], "distinct ids, none a rule's");
        assert!(out.released.is_empty());
        let (ra, rb, sa) = (ids.pod("r", &a), ids.pod("r", &b), ids.pod("s", &a));
        assert_eq!((ra, rb, sa), (Some(3), Some(4), Some(5)));
        // Known expansions keep their ids; a new pod gets a new one; one gone is released with
        // its rule's name (its counts are folded into the rule's counter).
        let out = ids.assign_pods([("r", &a), ("r", &c), ("s", &a)].into_iter());
        assert_eq!(out.fresh, vec![6]);
        assert_eq!(out.released, vec![(4, "r".to_owned())]);
        assert_eq!(ids.pod("r", &a), Some(3));
        assert_eq!(ids.pod("r", &c), Some(6));
        assert_eq!(ids.pod("r", &b), None);
        // Rule reassignment leaves the expansions alone.
        ids.assign(["r", "s"].into_iter()).expect("assign");
        assert_eq!(ids.pod("s", &a), Some(5));
        assert_eq!(ids.rule("r"), Some(1));
        // A released id is not handed out while unused ones remain (an in-flight count on an
        // old table can never land on a new owner's counter).
        let out = ids.assign_pods([("r", &a), ("r", &b), ("r", &c), ("s", &a)].into_iter());
        assert_eq!(out.fresh, vec![7]);
    }

    #[test]
    fn past_the_bound_expansions_get_no_counter_and_say_so() {
        let mut ids = CounterIds {
            pod_limit: Some(2),
            ..CounterIds::default()
        };
        ids.assign(["r"].into_iter()).expect("assign");
        let ps: Vec<CgroupPath> = (0..4).map(|i| path(&format!("kp/pod{i}"))).collect();
        let out = ids.assign_pods(ps.iter().map(|p| ("r", p)));
        assert_eq!(out.fresh.len(), 2);
        assert_eq!(out.unattributed, 2);
        let with: Vec<bool> = ps.iter().map(|p| ids.pod("r", p).is_some()).collect();
        assert_eq!(with, vec![true, true, false, false]);
        // Once room is made, the rest get theirs.
        let out = ids.assign_pods(ps[2..].iter().map(|p| ("r", p)));
        assert_eq!(out.released.len(), 2);
        assert_eq!(out.fresh.len(), 2);
        assert_eq!(out.unattributed, 0);
        // Rules are never refused for pods: they have the other half of the counter space.
        ids.assign(["r", "s", "t"].into_iter())
            .expect("rules still get ids");
    }

    #[test]
    fn when_the_counter_space_is_used_up_released_ids_are_reused_oldest_first() {
        let mut ids = CounterIds {
            next: MAX_RULE_COUNTERS - 1,
            ..CounterIds::default()
        };
        let (a, b, c) = (path("kp/poda"), path("kp/podb"), path("kp/podc"));
        let out = ids.assign_pods([("r", &a)].into_iter());
        assert_eq!(out.fresh, vec![MAX_RULE_COUNTERS - 1]);
        // Full, nothing released: no counter, never a wrong one.
        let out = ids.assign_pods([("r", &a), ("r", &b)].into_iter());
        assert_eq!((out.fresh.len(), out.unattributed), (0, 1));
        // `a` goes: its id is released, and only a later call hands it out again.
        let out = ids.assign_pods([("r", &b)].into_iter());
        assert_eq!(out.released, vec![(MAX_RULE_COUNTERS - 1, "r".to_owned())]);
        assert_eq!(
            out.unattributed, 1,
            "not reused in the call that released it"
        );
        let out = ids.assign_pods([("r", &b), ("r", &c)].into_iter());
        assert_eq!(out.fresh, vec![MAX_RULE_COUNTERS - 1]);
        assert_eq!(out.unattributed, 1);
    }
}
