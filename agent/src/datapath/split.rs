//! The rollout split: a candidate generation written into a slot of its own beside the live
//! one ([`Datapath::stage_candidate`]), the split table naming the cgroups it judges
//! ([`Datapath::set_split`]), and its end: promoted to live ([`Datapath::promote_candidate`])
//! or removed ([`Datapath::drop_candidate`]), each with one store and an epoch bump.

use super::*;
use std::collections::{BTreeSet, HashSet};

/// The candidate generation in the kernel.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    /// Its slot.
    pub(super) slot: u32,
    /// Its generation number.
    pub(super) generation: u64,
    /// Its policy and scopes, followed as the live one's are.
    pub(super) live: Live,
    /// Counter ids it parks.
    pub(super) parked: HashSet<u32>,
}

impl Datapath {
    /// Writes `policy` as generation `generation` into a free slot beside the live one and
    /// points the kernel's rollout at it. No workload is on it until [`Datapath::set_split`]
    /// names some. Refused while another candidate is staged.
    pub fn stage_candidate(
        &mut self,
        policy: &Arc<Policy>,
        generation: u64,
    ) -> Result<ApplyReport, DatapathError> {
        if let Some(c) = &self.candidate {
            return Err(DatapathError::Load(format!(
                "a candidate (generation {}) is already staged",
                c.generation
            )));
        }
        let started = Instant::now();
        let beside: Vec<String> = self
            .live
            .as_ref()
            .map(|l| l.rule_counters.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        let beside_pods = self.live.as_ref().map(Live::pod_keys).unwrap_or_default();
        let prepared = self.prepare_beside(policy, &beside, &beside_pods)?;
        let written = self.write_generation(policy, prepared, generation, None, started)?;
        self.counters = written.counters;
        self.fold_released(&written.released);
        self.clear_split()?;
        let cfg = self.config_ptr();
        // SAFETY: aligned u32 of the shared entry; the split table is empty, so no connect
        // reads the candidate slot yet.
        unsafe {
            AtomicU32::from_ptr(&raw mut (*cfg).candidate).store(written.slot + 1, Ordering::SeqCst)
        };
        self.bump_epoch();
        self.candidate = Some(Candidate {
            slot: written.slot,
            generation,
            live: written.live,
            parked: written.parked,
        });
        Ok(written.report)
    }

    /// The staged candidate's generation and policy.
    pub fn candidate(&self) -> Option<(u64, Arc<Policy>)> {
        self.candidate
            .as_ref()
            .map(|c| (c.generation, c.live.policy.clone()))
    }

    /// Puts exactly `cgroups` (cgroup ids) on the candidate side; returns how many entries were
    /// added and removed. Cached verdicts are invalidated when anything changed.
    pub fn set_split(&mut self, cgroups: &BTreeSet<u64>) -> Result<(usize, usize), DatapathError> {
        if self.candidate.is_none() {
            return Ok((0, 0));
        }
        if cgroups.len() > MAX_SPLIT_CGROUPS as usize {
            return Err(DatapathError::Capacity {
                what: "cgroups on the candidate side",
                needed: cgroups.len(),
                live: self.split.len(),
                max: MAX_SPLIT_CGROUPS as usize,
            });
        }
        let gone: Vec<u64> = self
            .split
            .iter()
            .filter(|id| !cgroups.contains(id))
            .copied()
            .collect();
        let new: Vec<u64> = cgroups
            .iter()
            .filter(|id| !self.split.contains(id))
            .copied()
            .collect();
        for id in &new {
            self.split_map
                .insert(*id, u32::from(SIDE_CANDIDATE), 0)
                .map_err(map_err("insert", map_names::SPLIT))?;
            self.split.insert(*id);
        }
        for id in &gone {
            ignore_missing(self.split_map.remove(id))
                .map_err(map_err("remove", map_names::SPLIT))?;
            self.split.remove(id);
        }
        if !new.is_empty() || !gone.is_empty() {
            self.bump_epoch();
        }
        Ok((new.len(), gone.len()))
    }

    /// Cgroups on the candidate side now.
    pub fn split_len(&self) -> usize {
        self.split.len()
    }

    /// Makes the candidate the live generation (one store of `active_slot`, the rollout cleared
    /// with it); the former live slot is retired. Returns the new live generation.
    pub fn promote_candidate(&mut self) -> Result<u64, DatapathError> {
        let Some(c) = self.candidate.take() else {
            return Err(DatapathError::Load("no candidate is staged".into()));
        };
        let active = self.active_slot();
        let cfg = self.config_ptr();
        // SAFETY: aligned u32 stores of the shared entry: the candidate's slot becomes the
        // active one, then the rollout is cleared; a connect reading between the two sees the
        // candidate through either.
        unsafe {
            AtomicU32::from_ptr(&raw mut (*cfg).active_slot).store(c.slot, Ordering::SeqCst);
            AtomicU32::from_ptr(&raw mut (*cfg).candidate).store(0, Ordering::SeqCst);
        }
        self.bump_epoch();
        self.switches += 1;
        self.retired[active as usize] = Some(self.switches);
        self.clear_split()?;
        // Counters and park targets of rules only the former live generation had go.
        let mut counters = self.counters.clone();
        counters.assign(c.live.rule_counters.iter().map(|(n, _)| n.as_str()))?;
        let keys = c.live.pod_keys();
        let released = counters
            .assign_pods(keys.iter().map(|(n, p)| (n.as_str(), p)))
            .released;
        self.counters = counters;
        self.fold_released(&released);
        self.drop_park_targets_except(&c.parked)?;
        self.parked = c.parked;
        self.generation = c.generation;
        self.live = Some(c.live);
        Ok(c.generation)
    }

    /// Removes the candidate: the rollout is cleared with one store, so every workload is on the
    /// live generation again; the candidate's slot is retired.
    pub fn drop_candidate(&mut self) -> Result<(), DatapathError> {
        let cfg = self.config_ptr();
        // SAFETY: aligned u32 of the shared entry.
        unsafe { AtomicU32::from_ptr(&raw mut (*cfg).candidate).store(0, Ordering::SeqCst) };
        self.bump_epoch();
        self.clear_split()?;
        let Some(c) = self.candidate.take() else {
            return Ok(());
        };
        self.switches += 1;
        self.retired[c.slot as usize] = Some(self.switches);
        let names: Vec<String> = self
            .live
            .as_ref()
            .map(|l| l.rule_counters.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        let mut counters = self.counters.clone();
        counters.assign(names.iter().map(String::as_str))?;
        let keys = self.live.as_ref().map(Live::pod_keys).unwrap_or_default();
        let released = counters
            .assign_pods(keys.iter().map(|(n, p)| (n.as_str(), p)))
            .released;
        self.counters = counters;
        self.fold_released(&released);
        let keep = self.parked.clone();
        let stale: Vec<u32> = c.parked.difference(&keep).copied().collect();
        for id in stale {
            ignore_missing(self.park.remove(&id)).map_err(map_err("remove", map_names::PARK))?;
        }
        Ok(())
    }

    /// Empties the split table (what this datapath wrote, and anything an earlier run left).
    pub(super) fn clear_split(&mut self) -> Result<(), DatapathError> {
        let mut keys = Vec::new();
        for key in self.split_map.keys() {
            keys.push(key.map_err(map_err("iterate", map_names::SPLIT))?);
        }
        for key in keys {
            ignore_missing(self.split_map.remove(&key))
                .map_err(map_err("remove", map_names::SPLIT))?;
        }
        self.split.clear();
        Ok(())
    }

    /// The rule names of the staged candidate (to keep their counters while it is staged).
    pub(super) fn candidate_rule_names(&self) -> Vec<String> {
        self.candidate
            .as_ref()
            .map(|c| {
                c.live
                    .rule_counters
                    .iter()
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A workload as the rollout split sees it: its stable key and the cgroups its connects come
/// from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// The pod UID for a Kubernetes pod; otherwise the cgroup's path below `agent.cgroup_root`
    /// (`.` for the root itself).
    pub key: String,
    /// Cgroup ids: a pod's cgroup and everything below it, or the one cgroup.
    pub cgroups: Vec<u64>,
}

/// Deepest directory level below the cgroup root the split walks (the kernel probes 16 levels).
const MAX_WALK_DEPTH: usize = MAX_SCOPE_LEVEL as usize;

impl Datapath {
    /// The node's workloads under `agent.cgroup_root`: every classified pod (keyed by UID,
    /// with its whole cgroup subtree) and every other cgroup (keyed by its path). One walk of
    /// the cgroup tree; cgroups that vanish during it are skipped.
    pub fn workloads(&self) -> Vec<Workload> {
        let pods: HashMap<String, &str> = self
            .inventory
            .as_deref()
            .map(|inv| {
                inv.pods
                    .iter()
                    .map(|p| (p.cgroup.as_str().to_owned(), p.uid.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        // (directory, path below the root, the pod it belongs to)
        let mut stack: Vec<(PathBuf, String, Option<String>, usize)> =
            vec![(self.cgroup_root.clone(), String::new(), None, 0)];
        while let Some((dir, rel, pod, depth)) = stack.pop() {
            let pod = pod.or_else(|| pods.get(&rel).map(|uid| (*uid).to_owned()));
            let Ok(Some(r)) = cgroup::resolve(&self.cgroup_mount, &dir) else {
                continue;
            };
            let key = match &pod {
                Some(uid) => uid.clone(),
                None if rel.is_empty() => ".".to_owned(),
                None => rel.clone(),
            };
            by_key.entry(key).or_default().push(r.id);
            if depth >= MAX_WALK_DEPTH {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                let child_rel = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((e.path(), child_rel, pod.clone(), depth + 1));
            }
        }
        by_key
            .into_iter()
            .map(|(key, cgroups)| Workload { key, cgroups })
            .collect()
    }
}
