//! Load, attach or re-adopt: the programs and maps, their pins, and the slots a previous run
//! left in the maps.

use super::*;

impl Datapath {
    /// Loads the programs and attaches them to `opts.cgroup_root`, re-adopting compatible pins
    /// of an earlier run (enforcement continues across restarts) or pinning afresh.
    pub fn start(opts: &DatapathOptions) -> Result<Datapath, DatapathError> {
        let cgroup_mount =
            cgroup::mount_of(&opts.cgroup_root).ok_or_else(|| DatapathError::NotCgroup2 {
                path: opts.cgroup_root.clone(),
                tried: cgroup::CGROUP2_CANDIDATES.join(", "),
            })?;
        let attach = cgroup::resolve(&cgroup_mount, &opts.cgroup_root)
            .map_err(io_err("resolving cgroup", &opts.cgroup_root))?
            .ok_or_else(|| DatapathError::NotCgroup2 {
                path: opts.cgroup_root.clone(),
                tried: cgroup::CGROUP2_CANDIDATES.join(", "),
            })?;
        let layout = PinLayout::new(&opts.pin_root);
        let superseded_pins = pins::has_superseded_pins(&opts.pin_root);
        prepare_pin_dirs(&layout, &opts.pin_root)?;
        let adopted = check_pins(&layout, &opts.pin_root, opts.heat_max_entries)?;

        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> =
            map_names::ALL.iter().map(|n| (*n, layout.map(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader.map_max_entries(map_names::HEAT, opts.heat_max_entries);
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(e.to_string()))?;
        // The object and this build's ABI must agree on every map: a mismatch is a build defect,
        // caught here rather than as garbage in a shared mapping.
        for spec in pins::expected_maps(opts.heat_max_entries) {
            let path = layout.map(spec.name);
            let shape = pins::pinned_shape(&path).map_err(io_err("inspecting pin", &path))?;
            let diff = shape
                .map(|s| pins::differences(&spec, &s))
                .unwrap_or_else(|| vec!["not pinned".into()]);
            if !diff.is_empty() {
                return Err(DatapathError::Load(format!(
                    "map {} of the embedded object does not match the agent's ABI: {}",
                    spec.name,
                    diff.join(", ")
                )));
            }
        }

        let config_map = take_map(&mut ebpf, map_names::CONFIG)?;
        let config = sys::MmapArray::map(
            config_map.fd().as_fd(),
            page_round(size_of::<Config>()),
            true,
        )
        .map_err(io_err("mmap", &layout.map(map_names::CONFIG)))?;
        let rule_hits_map = take_map(&mut ebpf, map_names::RULE_HITS)?;
        let rule_hits = sys::MmapArray::map(
            rule_hits_map.fd().as_fd(),
            page_round(MAX_RULE_COUNTERS as usize * 8),
            true,
        )
        .map_err(io_err("mmap", &layout.map(map_names::RULE_HITS)))?;
        let park = BpfHashMap::try_from(aya::maps::Map::HashMap(take_map(
            &mut ebpf,
            map_names::PARK,
        )?))
        .map_err(map_err("open", map_names::PARK))?;
        let states_map = take_map(&mut ebpf, map_names::CLASS_STATE)?;
        let budgets_map = take_map(&mut ebpf, map_names::BUDGETS)?;
        let mmap_small = |m: &MapData, name: &'static str| {
            sys::MmapArray::map(m.fd().as_fd(), page_round(CLASSES * CONTROL_STRIDE), true)
                .map(std::sync::Arc::new)
                .map_err(io_err("mmap", &layout.map(name)))
        };
        let class_states = ClassStateWriter(
            mmap_small(&states_map, map_names::CLASS_STATE)?,
            mmap_small(&budgets_map, map_names::BUDGETS)?,
        );
        let v4_map = take_map(&mut ebpf, map_names::POLICY_V4)?;
        let v6_map = take_map(&mut ebpf, map_names::POLICY_V6)?;
        let policy_v4 = trie::PolicyTrie::open(v4_map, &layout.map(map_names::POLICY_V4))?;
        let policy_v6 = trie::PolicyTrie::open(v6_map, &layout.map(map_names::POLICY_V6))?;
        let scopes = BpfHashMap::try_from(aya::maps::Map::HashMap(take_map(
            &mut ebpf,
            map_names::SCOPES,
        )?))
        .map_err(map_err("open", map_names::SCOPES))?;
        let chunks = BpfHashMap::try_from(aya::maps::Map::HashMap(take_map(
            &mut ebpf,
            map_names::LEAF_CHUNKS,
        )?))
        .map_err(map_err("open", map_names::LEAF_CHUNKS))?;

        let split_map = BpfHashMap::try_from(aya::maps::Map::HashMap(take_map(
            &mut ebpf,
            map_names::SPLIT,
        )?))
        .map_err(map_err("open", map_names::SPLIT))?;

        let mut dp = Datapath {
            layout,
            cgroup_mount,
            cgroup_root: opts.cgroup_root.clone(),
            root_level: attach.level,
            unresolvable: BTreeMap::new(),
            heat_capacity: opts.heat_max_entries,
            adopted,
            config,
            rule_hits,
            class_states,
            policy_v4,
            policy_v6,
            scopes,
            chunks,
            next_chunk: [1; SLOTS],
            superseded_pins,
            park,
            parked: Default::default(),
            slots: Default::default(),
            retired: [None; SLOTS],
            switches: 0,
            counters: CounterIds::default(),
            live: None,
            inventory: None,
            candidate: None,
            split_map,
            split: Default::default(),
            followed_union: None,
            held: pins::Held::default(),
            generation: 0,
            _ebpf: ebpf,
        };
        dp.recover_slots()?;
        // SLO admission starts neutral; the beat engine (if configured) takes over.
        for class in CLASSES_IN_ABI_ORDER {
            dp.class_states.set(class, ClassState::Normal);
            dp.class_states.set_over_budget(class, ClassState::Normal);
            dp.class_states.set_budget(class, None);
        }
        dp.class_states.heartbeat(None);
        let previous_root = dp.config_ref().attach_cgroup_id;
        dp.attach_programs(attach, previous_root)?;
        dp.held = pins::Held::open(&dp.layout, opts.heat_max_entries)?;
        // SAFETY (for the writes below): the mapping holds one `Config`, and fields are written
        // with volatile stores that the kernel's plain loads observe.
        let cfg = dp.config_ptr();
        unsafe {
            std::ptr::write_volatile(&raw mut (*cfg).abi_version, ABI_VERSION);
            std::ptr::write_volatile(&raw mut (*cfg).attach_cgroup_id, attach.id);
        }
        if dp.config_ref().candidate != 0 {
            // A rollout was live when the previous agent stopped. Its gate analysis is gone
            // with it, so this agent cannot vouch for the candidate: every workload goes back
            // to the live generation (the control layer records the rollout as aborted).
            let candidate = dp.config_ref().candidate - 1;
            // SAFETY: aligned u32 of the shared entry.
            unsafe { AtomicU32::from_ptr(&raw mut (*cfg).candidate).store(0, Ordering::SeqCst) };
            dp.bump_epoch();
            dp.clear_split()?;
            warn!(
                slot = candidate,
                "a rollout's candidate was live in the kernel at start: every workload is back on the live generation"
            );
        }
        let active = dp.active_slot();
        dp.generation = dp.config_ref().slots[active as usize].generation;
        // Slots an earlier run left filled may still be read by connects it admitted just before
        // exiting: treat them as retired.
        for slot in 0..SLOTS {
            if slot as u32 != active && !dp.slots[slot].is_empty() {
                dp.retired[slot] = Some(0);
            }
        }
        if dp.adopted {
            info!(
                pins = %dp.layout.dir.display(),
                generation = dp.generation,
                "re-adopted pinned maps and links; the previous policy stays enforced until the new one is switched in"
            );
        }
        Ok(dp)
    }

    /// Reads which keys each slot holds (after a restart the maps may hold an earlier run's).
    pub(super) fn recover_slots(&mut self) -> Result<(), DatapathError> {
        for (slot, scope, net) in self.policy_v4.entries()? {
            self.slots[slot as usize % SLOTS]
                .entry(scope)
                .or_default()
                .v4
                .push(net);
        }
        for (slot, scope, net) in self.policy_v6.entries()? {
            self.slots[slot as usize % SLOTS]
                .entry(scope)
                .or_default()
                .v6
                .push(net);
        }
        // Overflow chunks cannot be told apart by scope once written: a slot's recovered chunks
        // are kept with its global scope, and removed when the slot is cleared.
        let mut chunk_keys = Vec::new();
        for key in self.chunks.keys() {
            chunk_keys.push(key.map_err(map_err("iterate", map_names::LEAF_CHUNKS))?);
        }
        for ChunkKey { slot, id } in chunk_keys {
            let slot = slot as usize % SLOTS;
            self.slots[slot].entry(0).or_default().chunks.push(id);
            self.next_chunk[slot] = self.next_chunk[slot].max(id + 1);
        }
        let mut scope_entries = Vec::new();
        for key in self.scopes.keys() {
            scope_entries.push(key.map_err(map_err("iterate", map_names::SCOPES))?);
        }
        for key in scope_entries {
            let level = self.scopes.get(&key, 0).map(|v| v.level).unwrap_or(0);
            self.slots[key.slot as usize % SLOTS]
                .entry(key.cgroup_id)
                .or_default()
                .level = Some(level);
        }
        Ok(())
    }

    pub(super) fn attach_programs(
        &mut self,
        attach: CgroupRef,
        previous_root: u64,
    ) -> Result<(), DatapathError> {
        let cgroup_file =
            std::fs::File::open(&self.cgroup_root).map_err(io_err("open", &self.cgroup_root))?;
        for name in program_names::ALL {
            let attach_err = |reason: String| DatapathError::Attach {
                program: name,
                cgroup: self.cgroup_root.clone(),
                reason,
            };
            let program = self
                ._ebpf
                .program_mut(name)
                .ok_or_else(|| attach_err("not in the object".into()))?;
            let link_path = self.layout.link(name);
            let relink = link_path.exists() && previous_root == attach.id;
            if link_path.exists() && !relink {
                warn!(link = %link_path.display(), "the cgroup root changed: detaching the old link");
                std::fs::remove_file(&link_path).map_err(io_err("unpin", &link_path))?;
            }
            // aya's program types share these methods but no trait: one body for both.
            macro_rules! load_and_link {
                ($p:expr) => {{
                    let p = $p;
                    p.load().map_err(|e| {
                        DatapathError::Load(format!("{name}: {}", verifier_message(&e)))
                    })?;
                    if relink {
                        let fd = p.fd().map_err(|e| attach_err(error_chain(&e)))?;
                        replace_program(&link_path, fd.as_fd())
                            .map_err(|e| attach_err(error_chain(&e)))?;
                    } else {
                        let id = p
                            .attach(&cgroup_file, CgroupAttachMode::Single)
                            .map_err(|e| attach_err(error_chain(&e)))?;
                        let link = p.take_link(id).map_err(|e| attach_err(error_chain(&e)))?;
                        let link =
                            FdLink::try_from(link).map_err(|e| attach_err(error_chain(&e)))?;
                        link.pin(&link_path)
                            .map_err(|e| attach_err(error_chain(&e)))?;
                    }
                }};
            }
            match program {
                aya::programs::Program::CgroupSockAddr(p) => load_and_link!(p),
                aya::programs::Program::SockOps(p) => load_and_link!(p),
                _ => return Err(attach_err("unexpected program type".into())),
            }
        }
        Ok(())
    }
}
