//! Following rule cgroups as they come and go ([`Datapath::refresh_scopes`]).

use super::*;

impl Datapath {
    /// Follows rule cgroups: enforces the rules of cgroups that appeared since the last call
    /// and removes the entries of cgroups that are gone (or were recreated under a new id).
    pub fn refresh_scopes(&mut self) -> Result<Vec<ScopeChange>, DatapathError> {
        let Some(live) = self.live.clone() else {
            return Ok(Vec::new());
        };
        let active = self.active_slot();
        let mut changes = Vec::new();
        let mut resolved = live.resolved.clone();
        let scopes = live.scopes.clone();
        self.unresolvable.retain(|p, _| scopes.contains(p));
        for path in scopes.iter() {
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
                for slot in 0..SLOTS as u32 {
                    self.remove_scope(slot, old.id)?;
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
                    Some(&path),
                    &live.counters,
                    live.policy.default_class,
                )?;
                self.write_table(active, new.id, &table)?;
                self.widen_levels(active, new.level);
                self.insert_scope(active, new.id, new.level)?;
                resolved.insert(path.clone(), new);
                changes.push(ScopeChange::Appeared {
                    path: path.clone(),
                    id: new.id,
                });
            }
        }
        if let Some(l) = self.live.as_mut() {
            l.resolved = resolved;
        }
        if changes
            .iter()
            .any(|c| !matches!(c, ScopeChange::Unresolvable { .. }))
        {
            self.bump_epoch();
        }
        Ok(changes)
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
