//! Writing a policy: the checks and compile of [`Datapath::prepare`], the write into a free slot
//! and the one-store switch of [`Datapath::apply`], and the reclaim of retired slots.

use super::*;

/// Stable hit-counter ids per rule name; counter 0 counts connects that matched no rule.
#[derive(Debug, Clone, Default)]
pub(super) struct CounterIds {
    by_name: HashMap<String, u32>,
    free: Vec<u32>,
    next: u32,
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
                self.free.push(id);
            }
        }
        let (mut ids, mut fresh) = (Vec::with_capacity(names.len()), Vec::new());
        for n in names {
            let id = match self.by_name.get(n) {
                Some(id) => *id,
                None => {
                    let id = match self.free.pop() {
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
                            live: self.by_name.len(),
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
}

/// A policy checked and compiled by [`Datapath::prepare`], ready to be written.
#[derive(Debug)]
pub struct Prepared {
    bindings: Bindings,
    resolved: BTreeMap<CgroupPath, cgroup::CgroupRef>,
    pending: Vec<CgroupPath>,
    counters: CounterIds,
    ids: Vec<u32>,
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
        self.prepare_beside(policy, &[])
    }

    /// As [`Datapath::prepare`], keeping the hit counters of `beside` (the rule names of the
    /// other generation in the kernel during a rollout) assigned as well.
    pub(super) fn prepare_beside(
        &self,
        policy: &Policy,
        beside: &[String],
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
        let (mut ids, fresh) = counters
            .assign(counter_names(policy, &bindings).chain(beside.iter().map(String::as_str)))?;
        ids.truncate(own);
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
        let prepared = self.prepare_beside(policy, &beside)?;
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
        for (rule, counter) in policy.rules.iter().zip(&ids) {
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
                .zip(&ids)
                .map(|(n, c)| (n.to_owned(), *c))
                .collect(),
            scopes: scopes_of(&policy.rules, &bindings).into(),
            bindings: Arc::new(bindings),
            policy: policy.clone(),
            counters: ids.into(),
            resolved: resolved.clone(),
        };
        Ok(Written {
            slot: inactive,
            parked,
            counters,
            live,
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

    pub(super) fn set_rule_hits(&self, counter: u32, value: u64) {
        let p = self.rule_hits.at::<u64>(counter as usize * 8);
        // SAFETY: aligned u64 inside the mapping; the kernel updates it atomically too.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(p).store(value, Ordering::Relaxed) };
    }
}
