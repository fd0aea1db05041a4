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
            let beside_pods = self
                .candidate
                .as_ref()
                .map(|c| c.live.pod_keys())
                .unwrap_or_default();
            let live = self.rebind(
                self.active_slot(),
                live,
                &beside,
                &beside_pods,
                &mut changes,
            )?;
            self.live = Some(live);
        }
        if let Some(c) = self.candidate.clone() {
            let beside: Vec<String> = self
                .live
                .as_ref()
                .map(|l| l.rule_counters.iter().map(|(n, _)| n.clone()).collect())
                .unwrap_or_default();
            let beside_pods = self.live.as_ref().map(Live::pod_keys).unwrap_or_default();
            let live = self.rebind(c.slot, c.live, &beside, &beside_pods, &mut changes)?;
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
    /// new bindings change are rewritten in place. `beside` and `beside_pods`: the other
    /// generation's rule names and pod expansions, whose counters stay assigned. Each new
    /// expansion gets its own hit counter; the counts of expansions gone are folded into their
    /// rule's counter.
    fn rebind(
        &mut self,
        slot: u32,
        mut live: Live,
        beside: &[String],
        beside_pods: &[(String, CgroupPath)],
        changes: &mut Vec<ScopeChange>,
    ) -> Result<Live, DatapathError> {
        let bindings = bind(&live.policy.rules, self.inventory.as_deref());
        if bindings == *live.bindings {
            return Ok(live);
        }
        let mut counters = self.counters.clone();
        let mut rule_ids = live.counters.rules.clone();
        let mut fresh = Vec::new();
        if bindings.guard.is_some() && rule_ids.len() == live.policy.rules.len() {
            // The guard was bound after the policy went live: give it its counter.
            let own = switch::counter_names(&live.policy, &bindings).count();
            let (mut ids, new) = counters.assign(
                switch::counter_names(&live.policy, &bindings)
                    .chain(beside.iter().map(String::as_str)),
            )?;
            ids.truncate(own);
            fresh = new;
            live.rule_counters = switch::counter_names(&live.policy, &bindings)
                .zip(&ids)
                .map(|(n, c)| (n.to_owned(), *c))
                .collect();
            rule_ids = ids;
        }
        let pods = counters.assign_pods(
            switch::pod_keys(&live.policy, &bindings)
                .chain(beside_pods.iter().map(|(n, p)| (n.as_str(), p))),
        );
        fresh.extend(&pods.fresh);
        for id in &fresh {
            self.set_rule_hits(*id, 0);
        }
        self.counters = counters;
        let (new_counters, pod_counters) =
            switch::counters_of(&live.policy, &bindings, rule_ids, &self.counters);
        // Park targets are keyed by counter: new expansions of rules with `park_to` get theirs
        // before a table counts on them.
        let candidate = self.candidate.as_ref().is_some_and(|c| c.slot == slot);
        for p in pod_counters.iter() {
            let Some(addr) = live.policy.rules.get(p.rule).and_then(|r| r.park_to) else {
                continue;
            };
            self.park
                .insert(p.id, park_target(addr), 0)
                .map_err(map_err("insert", map_names::PARK))?;
            match self.candidate.as_mut().filter(|_| candidate) {
                Some(c) => c.parked.insert(p.id),
                None => self.parked.insert(p.id),
            };
        }
        if pods.unattributed > live.unattributed {
            warn!(
                unattributed = pods.unattributed,
                max = MAX_POD_COUNTERS,
                "more selector-rule expansions than pod hit counters: the hits of {} expansions count on their rule only, without namespace/pod",
                pods.unattributed
            );
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
            if crate::policy::scope_signature(&live.bindings, &live.counters, path)
                == crate::policy::scope_signature(&bindings, &new_counters, path)
            {
                continue;
            }
            let table = compile_scope(
                &live.policy.rules,
                &bindings,
                Some(path),
                &new_counters,
                live.policy.default_class,
            )?;
            self.rewrite_table(slot, r.id, &table)?;
        }
        live.scopes = scopes.into();
        live.bindings = Arc::new(bindings);
        live.counters = Arc::new(new_counters);
        live.pod_counters = pod_counters.into();
        live.unattributed = pods.unattributed;
        // The released expansions' scopes are gone: their counts go to their rules, their
        // park targets go.
        self.fold_released(&pods.released);
        for (id, _) in &pods.released {
            let in_live = self.parked.remove(id);
            let in_candidate = self.candidate.as_mut().is_some_and(|c| c.parked.remove(id));
            if in_live || in_candidate {
                ignore_missing(self.park.remove(id)).map_err(map_err("remove", map_names::PARK))?;
            }
        }
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
    /// the live generation and a rollout's candidate. Reads every rule cgroup; [`Follower`]
    /// reads only those that inotify shows changed.
    pub fn refresh_scopes(&mut self) -> Result<Vec<ScopeChange>, DatapathError> {
        let scopes = self.followed_scopes();
        self.unresolvable
            .retain(|p, _| scopes.binary_search(p).is_ok());
        self.refresh_paths(scopes.iter())
    }

    /// The rule cgroups the datapath follows, sorted: the live generation's, and a rollout's
    /// candidate's. The same `Arc` while neither changes (the follower compares pointers).
    pub fn followed_scopes(&mut self) -> Arc<[CgroupPath]> {
        let live = self
            .live
            .as_ref()
            .map_or_else(|| Arc::from([]), |l| l.scopes.clone());
        let Some(candidate) = self.candidate.as_ref().map(|c| c.live.scopes.clone()) else {
            return live;
        };
        let key = (
            Arc::as_ptr(&live) as *const u8 as usize,
            Arc::as_ptr(&candidate) as *const u8 as usize,
        );
        if let Some((k, union)) = &self.followed_union {
            if *k == key {
                return union.clone();
            }
        }
        let union: std::collections::BTreeSet<CgroupPath> =
            live.iter().chain(candidate.iter()).cloned().collect();
        let union: Arc<[CgroupPath]> = union.into_iter().collect();
        self.followed_union = Some((key, union.clone()));
        union
    }

    /// [`Datapath::refresh_scopes`] for some rule cgroups only (paths that are not rule
    /// cgroups of the live generation or the candidate are skipped).
    pub fn refresh_paths<'a>(
        &mut self,
        paths: impl IntoIterator<Item = &'a CgroupPath>,
    ) -> Result<Vec<ScopeChange>, DatapathError> {
        let paths: Vec<CgroupPath> = paths.into_iter().cloned().collect();
        let mut changes = self.refresh_generation(false, &paths)?;
        for change in self.refresh_generation(true, &paths)? {
            if !changes.contains(&change) {
                changes.push(change);
            }
        }
        if changes
            .iter()
            .any(|c| !matches!(c, ScopeChange::Unresolvable { .. }))
        {
            self.bump_epoch();
        }
        Ok(changes)
    }

    /// One generation's part of [`Datapath::refresh_paths`]: the live one, or the candidate.
    fn refresh_generation(
        &mut self,
        candidate: bool,
        paths: &[CgroupPath],
    ) -> Result<Vec<ScopeChange>, DatapathError> {
        // The immutable parts only (pointers): `resolved` is updated in place, path by path.
        let generation = if candidate {
            self.candidate.as_ref().map(|c| (&c.live, c.slot))
        } else {
            self.live.as_ref().map(|l| (l, self.active_slot()))
        };
        let Some((policy, bindings, counters, scopes, slot)) = generation.map(|(l, slot)| {
            (
                l.policy.clone(),
                l.bindings.clone(),
                l.counters.clone(),
                l.scopes.clone(),
                slot,
            )
        }) else {
            return Ok(Vec::new());
        };
        let mut changes = Vec::new();
        for path in paths {
            // Sorted: `scopes_of` collects a set.
            if scopes.binary_search(path).is_err() {
                continue;
            }
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
            let before = self
                .generation_mut(candidate)
                .and_then(|l| l.resolved.get(&path).copied());
            if now == before {
                continue;
            }
            if let Some(old) = before {
                // The cgroup is gone (or was recreated): its id is no one's any more.
                for s in 0..SLOTS as u32 {
                    self.remove_scope(s, old.id)?;
                }
                if let Some(l) = self.generation_mut(candidate) {
                    l.resolved.remove(&path);
                }
                changes.push(ScopeChange::Removed {
                    path: path.clone(),
                    id: old.id,
                });
            }
            if let Some(new) = now {
                let table = compile_scope(
                    &policy.rules,
                    &bindings,
                    Some(&path),
                    &counters,
                    policy.default_class,
                )?;
                self.write_table(slot, new.id, &table)?;
                self.widen_levels(slot, new.level);
                self.insert_scope(slot, new.id, new.level)?;
                if let Some(l) = self.generation_mut(candidate) {
                    l.resolved.insert(path.clone(), new);
                }
                changes.push(ScopeChange::Appeared {
                    path: path.clone(),
                    id: new.id,
                });
            }
        }
        Ok(changes)
    }

    fn generation_mut(&mut self, candidate: bool) -> Option<&mut Live> {
        if candidate {
            self.candidate.as_mut().map(|c| &mut c.live)
        } else {
            self.live.as_mut()
        }
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

/// How often rule cgroups that cannot be watched (the inotify watch limit, or no inotify) are
/// read again, and the least time between two full rereads after the kernel's inotify queue
/// overflowed.
pub const RESYNC_EVERY: Duration = Duration::from_secs(5);

/// Follows rule cgroups by watching the directories that decide them, instead of reading every
/// rule cgroup on every tick: idle cost does not grow with the number of rules.
///
/// For each rule cgroup it watches one directory: the cgroup's parent when it exists (where its
/// removal and re-creation show), else the deepest ancestor that exists (where the next missing
/// component appears). Rule cgroups that share a parent share its watch. A change of entry `n` in
/// a watched directory `d` rereads only the rule cgroups at or below `d/n` (a range of the sorted
/// rule cgroup list: nothing is kept per rule); a watched directory that goes away moves its
/// rule cgroups' watches up. Rule cgroups whose directory cannot be watched (at
/// `fs.inotify.max_user_watches`, or without inotify) are reread every [`RESYNC_EVERY`]
/// instead; when the kernel's event queue overflows, every rule cgroup is reread, at most once
/// every [`RESYNC_EVERY`].
pub struct Follower {
    watches: crate::dirwatch::WatchHandle,
    /// The rule cgroup list last seen (sorted; compared by pointer: a new policy or inventory
    /// makes a new list).
    seen: Arc<[CgroupPath]>,
    /// Watched directories (absolute).
    dirs: HashMap<PathBuf, crate::dirwatch::WatchId>,
    by_watch: HashMap<crate::dirwatch::WatchId, PathBuf>,
    /// Rule cgroups without a watch: reread every [`RESYNC_EVERY`].
    unwatched: std::collections::BTreeSet<CgroupPath>,
    last_poll: Instant,
    /// When a full reread is due (after an overflow or an error).
    resync_due: Option<Instant>,
    last_resync: Option<Instant>,
    warned_limit: bool,
}

impl Follower {
    /// A follower that adds its watches through `watches` (whose [`crate::dirwatch::DirWatcher`]
    /// the caller reads, passing each batch to [`Follower::turn`]).
    pub fn new(watches: crate::dirwatch::WatchHandle) -> Follower {
        Follower {
            watches,
            seen: Arc::from([]),
            dirs: HashMap::new(),
            by_watch: HashMap::new(),
            unwatched: Default::default(),
            last_poll: Instant::now(),
            resync_due: None,
            last_resync: None,
            warned_limit: false,
        }
    }

    /// How many directories are watched, and how many rule cgroups have no watch (and are
    /// reread every [`RESYNC_EVERY`]).
    pub fn watch_counts(&self) -> (usize, usize) {
        (self.dirs.len(), self.unwatched.len())
    }

    /// One turn: takes the live policy's rule cgroups (new ones are watched and read), the
    /// `changes` seen since the last turn (the rule cgroups they concern are read again), and any
    /// reread that is due. Cheap when nothing changed: no directory is read.
    pub fn turn(
        &mut self,
        dp: &mut Datapath,
        changes: &[crate::dirwatch::Change],
    ) -> Result<Vec<ScopeChange>, DatapathError> {
        use crate::dirwatch::Change;
        let now = Instant::now();
        let root = dp.cgroup_root.clone();
        let mut dirty: std::collections::BTreeSet<CgroupPath> = Default::default();
        let scopes: Arc<[CgroupPath]> = dp.followed_scopes();
        if !Arc::ptr_eq(&scopes, &self.seen) {
            let old = std::mem::replace(&mut self.seen, scopes.clone());
            // New rule cgroups are watched and read; watches nobody needs any more go.
            dirty.extend(
                scopes
                    .iter()
                    .filter(|p| old.binary_search(p).is_err())
                    .cloned(),
            );
            self.unwatched.retain(|p| scopes.binary_search(p).is_ok());
            let unneeded: Vec<PathBuf> = self
                .dirs
                .keys()
                .filter(|d| under(&scopes, &root, d, None).is_empty())
                .cloned()
                .collect();
            for d in unneeded {
                if let Some(w) = self.dirs.remove(&d) {
                    self.by_watch.remove(&w);
                    self.watches.unwatch(w);
                }
            }
        }
        for c in changes {
            match c {
                Change::Overflow => {
                    let earliest = self.last_resync.map_or(now, |t| t + RESYNC_EVERY);
                    self.resync_due = Some(self.resync_due.map_or(earliest, |d| d.min(earliest)));
                }
                Change::Gone { watch } => {
                    // Its rule cgroups move their watch up.
                    if let Some(dir) = self.by_watch.remove(watch) {
                        self.dirs.remove(&dir);
                        dirty.extend(under(&self.seen, &root, &dir, None).iter().cloned());
                    }
                }
                Change::Entry { watch, name } => {
                    if let Some(dir) = self.by_watch.get(watch) {
                        dirty.extend(under(&self.seen, &root, dir, Some(name)).iter().cloned());
                    }
                }
            }
        }
        let mut out = Vec::new();
        let mut full = false;
        if self.resync_due.is_some_and(|d| d <= now) {
            full = true;
            tracing::info!(
                "every rule cgroup is read again (after an inotify queue overflow or an error; at most every {} s)",
                RESYNC_EVERY.as_secs()
            );
            self.resync_due = None;
            self.last_resync = Some(now);
            dirty.extend(self.seen.iter().cloned());
        }
        if !self.unwatched.is_empty() && now.duration_since(self.last_poll) >= RESYNC_EVERY {
            self.last_poll = now;
            dirty.extend(std::mem::take(&mut self.unwatched));
        }
        // Watch first, then read: a change after the read is reported. A directory made or
        // removed between choosing the watch and reading moves the watch: a few rounds settle it.
        for _ in 0..4 {
            if dirty.is_empty() {
                break;
            }
            let mut placed = Vec::with_capacity(dirty.len());
            for p in &dirty {
                placed.push(self.place(&root, p));
            }
            // A full reread also forgets problems of rule cgroups that are gone.
            let read = if std::mem::take(&mut full) {
                dp.refresh_scopes()
            } else {
                dp.refresh_paths(dirty.iter())
            };
            match read {
                Ok(changes) => out.extend(changes),
                Err(e) => {
                    // Read everything again once the datapath may have recovered.
                    let retry = now + RESYNC_EVERY;
                    self.resync_due = Some(self.resync_due.map_or(retry, |d| d.min(retry)));
                    return Err(e);
                }
            }
            let mut moved = std::collections::BTreeSet::new();
            for (p, before) in dirty.into_iter().zip(placed) {
                if before.is_some() && watch_target(&root, &p) != before {
                    moved.insert(p);
                }
            }
            dirty = moved;
        }
        // Still moving after a few rounds: read again next time.
        self.unwatched.extend(dirty);
        Ok(out)
    }

    /// Watches the directory that decides `path`; returns it (with the entry name), or `None`
    /// when it cannot be watched (the path is then reread every [`RESYNC_EVERY`]).
    fn place(&mut self, root: &Path, path: &CgroupPath) -> Option<(PathBuf, std::ffi::OsString)> {
        let Some(target) = watch_target(root, path) else {
            self.unwatched.insert(path.clone());
            return None;
        };
        if !self.dirs.contains_key(&target.0) {
            match self.watches.watch(&target.0) {
                Ok(watch) => {
                    // The same directory under another name (a watch it already has): keep one.
                    if let Some(old) = self.by_watch.insert(watch.clone(), target.0.clone()) {
                        self.dirs.remove(&old);
                    }
                    self.dirs.insert(target.0.clone(), watch);
                }
                Err(e) => {
                    if crate::dirwatch::is_watch_limit(&e) && !self.warned_limit {
                        self.warned_limit = true;
                        warn!(
                            dir = %target.0.display(),
                            "the inotify watch limit (fs.inotify.max_user_watches) is reached: rule cgroups that cannot be watched are read every {} s instead",
                            RESYNC_EVERY.as_secs()
                        );
                    }
                    self.unwatched.insert(path.clone());
                    return None;
                }
            }
        }
        self.unwatched.remove(path);
        Some(target)
    }
}

/// The rule cgroups of `scopes` (sorted) at or below `dir/name` (`dir` absolute; without
/// `name`, at or below `dir`): a range of the list, found by binary search. All of them when
/// that is the cgroup root or above it; none when it is elsewhere.
fn under<'a>(
    scopes: &'a [CgroupPath],
    root: &Path,
    dir: &Path,
    name: Option<&std::ffi::OsStr>,
) -> &'a [CgroupPath] {
    let full = match name {
        Some(n) => dir.join(n),
        None => dir.to_owned(),
    };
    if root.starts_with(&full) {
        return scopes;
    }
    let Ok(rel) = full.strip_prefix(root) else {
        return &[];
    };
    let base = rel.to_string_lossy();
    let prefix = format!("{base}/");
    // Sorted: `base` first, then maybe siblings such as `base-x` (`-` < `/`), then `base/...`.
    let lo = scopes.partition_point(|p| p.as_str() < &*base);
    let exact = scopes.get(lo).is_some_and(|p| p.as_str() == base);
    let start = scopes.partition_point(|p| p.as_str() < prefix.as_str());
    let end = start + scopes[start..].partition_point(|p| p.as_str().starts_with(prefix.as_str()));
    if start == end {
        return if exact { &scopes[lo..lo + 1] } else { &[] };
    }
    if exact {
        // `base` through its subtree; siblings sorted in between (`base-x`) are reread too: a
        // few extra `stat`s, never a missed cgroup.
        return &scopes[lo..end];
    }
    &scopes[start..end]
}

/// The directory to watch for `path` (relative to `root`) and the name of its entry there: the
/// parent of the cgroup when it exists, else its deepest existing ancestor. `None` when not
/// even `root`'s filesystem root exists.
fn watch_target(root: &Path, path: &CgroupPath) -> Option<(PathBuf, std::ffi::OsString)> {
    let mut cur = root.join(path.as_str());
    if cur.is_dir() {
        let name = cur.file_name()?.to_owned();
        return Some((cur.parent()?.to_owned(), name));
    }
    loop {
        let parent = cur.parent()?.to_owned();
        if parent.is_dir() {
            return Some((parent, cur.file_name()?.to_owned()));
        }
        cur = parent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(v: &[&str]) -> Vec<CgroupPath> {
        let mut v: Vec<CgroupPath> = v.iter().map(|s| s.parse().expect("path")).collect();
        v.sort();
        v
    }

    #[test]
    fn under_finds_the_rule_cgroups_at_or_below_an_entry() {
        let scopes = paths(&["a", "a-b", "a.c", "a/b", "a/b/c", "ab", "b/a"]);
        let root = Path::new("/cg/root");
        let names = |dir: &str, name: Option<&str>| -> Vec<&str> {
            under(
                &scopes,
                root,
                Path::new(dir),
                name.map(std::ffi::OsStr::new),
            )
            .iter()
            .map(CgroupPath::as_str)
            .collect()
        };
        // `a-b` and `a.c` sort between `a` and `a/...`: reread too, never missed.
        assert_eq!(
            names("/cg/root", Some("a")),
            ["a", "a-b", "a.c", "a/b", "a/b/c"]
        );
        assert_eq!(names("/cg/root/a", Some("b")), ["a/b", "a/b/c"]);
        assert_eq!(
            names("/cg/root/a", None),
            ["a", "a-b", "a.c", "a/b", "a/b/c"]
        );
        assert_eq!(names("/cg/root/a/b", Some("c")), ["a/b/c"]);
        assert!(names("/elsewhere", Some("a")).is_empty());
        assert_eq!(names("/cg/root/b", Some("a")), ["b/a"]);
        assert!(names("/cg/root", Some("zz")).is_empty());
        assert_eq!(names("/cg/root", None).len(), scopes.len());
        assert_eq!(
            names("/cg", Some("root")).len(),
            scopes.len(),
            "above the root"
        );
    }
}
