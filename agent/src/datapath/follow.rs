//! Following rule cgroups as they come and go ([`Datapath::refresh_scopes`]), and workloads as
//! the node's pods change ([`Datapath::set_inventory`]).

use super::*;

impl Datapath {
    /// Takes the node's current pods: re-binds the live policy's selector rules (and the
    /// unknown-pod guard) to them and patches the active slot. Scopes of pods that went away or
    /// stopped matching lose their entries; new ones are written when their cgroup resolves.
    /// Before the first apply it only records the inventory for it.
    pub fn set_inventory(
        &mut self,
        inventory: Arc<Inventory>,
    ) -> Result<Vec<ScopeChange>, DatapathError> {
        self.inventory = Some(inventory);
        let mut changes = Vec::new();
        if let Some(live) = self.live.clone() {
            let beside = self.candidate_rule_names();
            let live = self.rebind(self.active_slot(), live, &beside, &mut changes)?;
            self.live = Some(live);
        }
        if let Some(c) = self.candidate.clone() {
            let beside: Vec<String> = self
                .live
                .as_ref()
                .map(|l| l.rule_counters.iter().map(|(n, _)| n.clone()).collect())
                .unwrap_or_default();
            let live = self.rebind(c.slot, c.live, &beside, &mut changes)?;
            if let Some(c) = self.candidate.as_mut() {
                c.live = live;
            }
        }
        if !changes.is_empty() {
            self.bump_epoch();
        }
        changes.extend(self.refresh_scopes()?);
        Ok(changes)
    }

    /// Re-binds one generation's selector rules (in `slot`) to the current inventory: scopes
    /// that are no longer needed lose their entries (in `slot` and retired slots), tables the
    /// new bindings change are rewritten in place. `beside`: the other generation's rule names,
    /// whose counters stay assigned.
    fn rebind(
        &mut self,
        slot: u32,
        mut live: Live,
        beside: &[String],
        changes: &mut Vec<ScopeChange>,
    ) -> Result<Live, DatapathError> {
        let bindings = bind(&live.policy.rules, self.inventory.as_deref());
        if bindings == *live.bindings {
            return Ok(live);
        }
        if bindings.guard.is_some() && live.counters.len() == live.policy.rules.len() {
            // The guard was bound after the policy went live: give it its counter.
            let mut counters = self.counters.clone();
            let own = switch::counter_names(&live.policy, &bindings).count();
            let (mut ids, fresh) = counters.assign(
                switch::counter_names(&live.policy, &bindings)
                    .chain(beside.iter().map(String::as_str)),
            )?;
            ids.truncate(own);
            for id in &fresh {
                self.set_rule_hits(*id, 0);
            }
            self.counters = counters;
            live.rule_counters = switch::counter_names(&live.policy, &bindings)
                .zip(&ids)
                .map(|(n, c)| (n.to_owned(), *c))
                .collect();
            live.counters = ids.into();
        }
        let scopes: Vec<CgroupPath> = scopes_of(&live.policy.rules, &bindings);
        let keep: std::collections::BTreeSet<&CgroupPath> = scopes.iter().collect();
        // Scopes no longer needed: entries gone from this generation's slot (and retired ones).
        for (path, r) in &live.resolved.clone() {
            if !keep.contains(path) {
                for s in 0..SLOTS as u32 {
                    if s == slot || self.retired[s as usize].is_some() {
                        self.remove_scope(s, r.id)?;
                    }
                }
                live.resolved.remove(path);
                changes.push(ScopeChange::Removed {
                    path: path.clone(),
                    id: r.id,
                });
            }
        }
        // Scopes whose table the new bindings change: rewritten in place.
        for (path, r) in &live.resolved {
            if crate::policy::scope_signature(&live.bindings, path)
                == crate::policy::scope_signature(&bindings, path)
            {
                continue;
            }
            let table = compile_scope(
                &live.policy.rules,
                &bindings,
                Some(path),
                &live.counters,
                live.policy.default_class,
            )?;
            self.rewrite_table(slot, r.id, &table)?;
        }
        live.scopes = scopes.into();
        live.bindings = Arc::new(bindings);
        Ok(live)
    }

    /// Replaces one scope's table in `slot` in place: new leaves over old, then the prefixes
    /// and chunks only the old table had. Each leaf is swapped whole, so a connect sees the old
    /// or the new leaf of its prefix.
    fn rewrite_table(
        &mut self,
        slot: u32,
        scope: u64,
        table: &ScopeTable,
    ) -> Result<(), DatapathError> {
        let old = self.slots[slot as usize]
            .get_mut(&scope)
            .map(|k| {
                (
                    std::mem::take(&mut k.v4),
                    std::mem::take(&mut k.v6),
                    std::mem::take(&mut k.chunks),
                )
            })
            .unwrap_or_default();
        self.write_table(slot, scope, table)?;
        let new_v4: std::collections::HashSet<Ipv4Net> = table.v4.iter().map(|(n, _)| *n).collect();
        let new_v6: std::collections::HashSet<Ipv6Net> = table.v6.iter().map(|(n, _)| *n).collect();
        let mut stale_v4: Vec<Ipv4Net> =
            old.0.into_iter().filter(|n| !new_v4.contains(n)).collect();
        let mut stale_v6: Vec<Ipv6Net> =
            old.1.into_iter().filter(|n| !new_v6.contains(n)).collect();
        self.policy_v4
            .remove(slot, scope, &mut stale_v4, usize::MAX)?;
        self.policy_v6
            .remove(slot, scope, &mut stale_v6, usize::MAX)?;
        for id in old.2 {
            ignore_missing(self.chunks.remove(&ChunkKey { slot, id }))
                .map_err(map_err("remove", map_names::LEAF_CHUNKS))?;
        }
        self.bump_epoch();
        Ok(())
    }

    /// Follows rule cgroups: enforces the rules of cgroups that appeared since the last call
    /// and removes the entries of cgroups that are gone (or were recreated under a new id), for
    /// the live generation and a rollout's candidate.
    pub fn refresh_scopes(&mut self) -> Result<Vec<ScopeChange>, DatapathError> {
        let mut changes = Vec::new();
        let mut keep_unresolvable: std::collections::BTreeSet<CgroupPath> = Default::default();
        if let Some(live) = self.live.clone() {
            keep_unresolvable.extend(live.scopes.iter().cloned());
            let resolved = self.refresh_generation(self.active_slot(), &live, &mut changes)?;
            if let Some(l) = self.live.as_mut() {
                l.resolved = resolved;
            }
        }
        if let Some(c) = self.candidate.clone() {
            keep_unresolvable.extend(c.live.scopes.iter().cloned());
            let mut more = Vec::new();
            let resolved = self.refresh_generation(c.slot, &c.live, &mut more)?;
            if let Some(c) = self.candidate.as_mut() {
                c.live.resolved = resolved;
            }
            for change in more {
                if !changes.contains(&change) {
                    changes.push(change);
                }
            }
        }
        self.unresolvable
            .retain(|p, _| keep_unresolvable.contains(p));
        if changes
            .iter()
            .any(|c| !matches!(c, ScopeChange::Unresolvable { .. }))
        {
            self.bump_epoch();
        }
        Ok(changes)
    }

    /// One generation's part of [`Datapath::refresh_scopes`]: returns its scopes' cgroups now.
    fn refresh_generation(
        &mut self,
        slot: u32,
        live: &Live,
        changes: &mut Vec<ScopeChange>,
    ) -> Result<BTreeMap<CgroupPath, CgroupRef>, DatapathError> {
        let mut resolved = live.resolved.clone();
        for path in live.scopes.iter() {
            let path = path.clone();
            let dir = self.cgroup_root.join(path.as_str());
            // One bad path affects only its own rules: it stays pending, reported once.
            let looked_up = cgroup::resolve(&self.cgroup_mount, &dir)
                .map_err(|e| e.to_string())
                .and_then(|r| match r {
                    Some(r) if r.level > MAX_SCOPE_LEVEL => Err(format!(
                        "it is at level {} of the cgroup hierarchy; the kernel judges rules at levels 1 to {MAX_SCOPE_LEVEL}",
                        r.level
                    )),
                    other => Ok(other),
                });
            let now = match looked_up {
                Ok(now) => {
                    self.unresolvable.remove(&path);
                    now
                }
                Err(reason) => {
                    if self.unresolvable.get(&path) != Some(&reason) {
                        self.unresolvable.insert(path.clone(), reason.clone());
                        changes.push(ScopeChange::Unresolvable {
                            path: path.clone(),
                            reason,
                        });
                    }
                    None
                }
            };
            let before = live.resolved.get(&path).copied();
            if now == before {
                continue;
            }
            if let Some(old) = before {
                // The cgroup is gone (or was recreated): its id is no one's any more.
                for s in 0..SLOTS as u32 {
                    self.remove_scope(s, old.id)?;
                }
                resolved.remove(&path);
                changes.push(ScopeChange::Removed {
                    path: path.clone(),
                    id: old.id,
                });
            }
            if let Some(new) = now {
                let table = compile_scope(
                    &live.policy.rules,
                    &live.bindings,
                    Some(&path),
                    &live.counters,
                    live.policy.default_class,
                )?;
                self.write_table(slot, new.id, &table)?;
                self.widen_levels(slot, new.level);
                self.insert_scope(slot, new.id, new.level)?;
                resolved.insert(path.clone(), new);
                changes.push(ScopeChange::Appeared {
                    path: path.clone(),
                    id: new.id,
                });
            }
        }
        Ok(resolved)
    }

    pub(super) fn widen_levels(&self, slot: u32, level: u32) {
        let cfg = self.config_ptr();
        // SAFETY: aligned u32 fields of the shared entry; widening only adds probes.
        unsafe {
            let min = AtomicU32::from_ptr(&raw mut (*cfg).slots[slot as usize].scope_level_min);
            let max = AtomicU32::from_ptr(&raw mut (*cfg).slots[slot as usize].scope_level_max);
            if min.load(Ordering::SeqCst) == 0 || min.load(Ordering::SeqCst) > level {
                min.store(level, Ordering::SeqCst);
            }
            if max.load(Ordering::SeqCst) < level {
                max.store(level, Ordering::SeqCst);
            }
        }
    }
}
