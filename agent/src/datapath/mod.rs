//! The datapath: the only module that touches aya and BPF maps.
//!
//! [`Datapath::start`] loads the embedded kernel programs, re-adopting pinned maps and links from
//! an earlier run after checking them ([`pins`]), or attaching and pinning them afresh.
//! [`Datapath::apply`] compiles a [`Policy`] and makes it live with one switch:
//!
//! 1. resolve rule cgroups; compile every scope's trie (pure, [`crate::policy`]); check capacity;
//! 2. pick a free slot (of `knhk_abi::SLOTS`); only if none is free, wait for an RCU grace period
//!    and clear the retired ones first;
//! 3. write the new generation's tries, scope entries and settings into that slot;
//! 4. flip `active_slot` with one aligned 32-bit store through the config map's shared mapping;
//!    the slot it replaces is retired, and cleared after a grace period by
//!    [`Datapath::begin_reclaim`] / [`Datapath::finish_reclaim`] in the background.
//!
//! Any error before step 4 leaves the live generation untouched. [`Datapath::refresh_scopes`]
//! follows rule cgroups as they are created and removed, patching the active slot scope by scope
//! (tries first, then the scope entry that makes them reachable).
//!
//! [`DatapathReader`] reads counters, histograms and heat from the pins, independently of the
//! writer, for metrics.

pub mod cgroup;
pub mod pins;
mod reader;
mod sys;

pub use reader::{
    protocol_name, DatapathReader, Decisions, HeatCursor, HeatEntry, LatencyHistogram,
};

use crate::{
    abi,
    model::{CgroupPath, Class, ClassState, DefaultAction, Mode},
    policy::{compile_scope, rule_scopes, CompileError, Policy, ScopeTable},
};
use aya::{
    maps::{lpm_trie::Key, HashMap as BpfHashMap, LpmTrie, MapData, MapError},
    programs::{links::FdLink, CgroupAttachMode},
    Ebpf, EbpfLoader,
};
use cgroup::CgroupRef;
use ipnet::{Ipv4Net, Ipv6Net};
use knhk_abi::{map_names, program_names, *};
use pins::PinLayout;
use std::{
    collections::{BTreeMap, HashMap},
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tracing::{info, warn};

/// The kernel programs, built by `build.rs` from `ebpf/programs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/knhk-ebpf.o"));

/// Where and how to run the datapath.
#[derive(Debug, Clone)]
pub struct DatapathOptions {
    /// Cgroup v2 directory to attach to; rule cgroups are relative to it.
    pub cgroup_root: PathBuf,
    /// bpffs directory for pins (the versioned subdirectory is added).
    pub pin_root: PathBuf,
    /// Capacity of the heat LRU.
    pub heat_max_entries: u32,
}

/// Why the datapath could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The cgroup root is not a cgroup v2 directory.
    #[error("{path} is not a cgroup v2 directory: set agent.cgroup_root to a directory of the cgroup v2 hierarchy (tried to detect one at {tried})")]
    NotCgroup2 {
        /// The configured or detected root.
        path: PathBuf,
        /// Where detection looked.
        tried: String,
    },
    /// bpffs is missing and could not be mounted.
    #[error("cannot use bpffs for pins at {path}: {reason}")]
    Bpffs {
        /// The pin directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// `detach` refused a pin root, or something in it that knhk-agent did not make.
    #[error("detach refused: {path} {reason}; nothing was removed")]
    DetachRefused {
        /// What was refused.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A pinned map does not match this build's ABI and holds policy, so it cannot be replaced
    /// without dropping enforcement.
    #[error(
        "pinned map {path} does not match this agent's map ABI v{ABI_VERSION}: {differences}. \
         It was pinned by an incompatible build. Remove the old pins with `knhk-agent detach --pin-root {pin_root}` \
         (enforcement stops until the agent attaches again), then restart"
    )]
    IncompatiblePin {
        /// The pin.
        path: PathBuf,
        /// What differs.
        differences: String,
        /// The pin root to pass to `detach`.
        pin_root: PathBuf,
    },
    /// The kernel refused to load the object or a program.
    #[error("loading the eBPF programs failed: {0}")]
    Load(String),
    /// Attaching or pinning a program failed.
    #[error("attaching {program} to {cgroup}: {reason}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// Cgroup directory.
        cgroup: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A map operation failed.
    #[error("{op} on map {map} failed: {source}")]
    Map {
        /// Operation.
        op: &'static str,
        /// Map name.
        map: &'static str,
        /// Cause.
        source: MapError,
    },
    /// The policy does not compile.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// A rule's cgroup would sit deeper in the hierarchy than the kernel programs probe.
    #[error(
        "rule cgroup {path} would be at level {level} of the cgroup hierarchy (agent.cgroup_root is at level {root_level}); \
         the kernel judges rules at levels 1 to {max}: give the rule a shallower cgroup"
    )]
    ScopeTooDeep {
        /// The rule cgroup (escaped for logs).
        path: String,
        /// Its level below the hierarchy root.
        level: u32,
        /// The level of `agent.cgroup_root`.
        root_level: u32,
        /// The deepest level the programs probe (`MAX_SCOPE_LEVEL`).
        max: u32,
    },
    /// The caller's deadline passed before the switch; nothing was switched.
    #[error(
        "the deadline passed before the policy could be switched in; the live policy is unchanged"
    )]
    DeadlineExceeded,
    /// The policy does not fit the kernel maps.
    #[error("the policy needs {needed} {what}, but the kernel map holds {max} (including the live generation's {live})")]
    Capacity {
        /// What ran out.
        what: &'static str,
        /// Needed by the new generation.
        needed: usize,
        /// Used by the live generation.
        live: usize,
        /// Capacity.
        max: usize,
    },
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DatapathError + 'a {
    move |source| DatapathError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn map_err(op: &'static str, map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { op, map, source }
}

/// What [`Datapath::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// The new live generation.
    pub generation: u64,
    /// Rules in it.
    pub rules: usize,
    /// Trie entries written (all scopes, both families).
    pub trie_entries: usize,
    /// Rule cgroups that exist and are enforced.
    pub active_scopes: Vec<CgroupPath>,
    /// Rule cgroups that do not exist yet; they take effect when they appear.
    pub pending_scopes: Vec<CgroupPath>,
    /// Time from start of apply to the switch.
    pub switch_latency: Duration,
}

/// Writes SLO admission control into the kernel: class states (`knhk_abi::STATE_*`) and
/// per-beat budgets, each one aligned store through a shared mapping, read by every connect.
/// Cheap to clone; needs no lock.
#[derive(Debug, Clone)]
pub struct ClassStateWriter(
    std::sync::Arc<sys::MmapArray>,
    std::sync::Arc<sys::MmapArray>,
);

/// The kernel lays out mmapable array elements at a stride of the value size rounded up to 8.
const MMAP_ELEM_STRIDE: usize = 8;
/// Stride of `ClassControl` elements in the class-state mapping.
const CONTROL_STRIDE: usize = size_of::<ClassControl>().div_ceil(8) * 8;

impl ClassStateWriter {
    /// The `ClassControl` element of `class` in the shared mapping. Fields are reached through
    /// it (no hand-computed offsets).
    fn control(&self, class: Class) -> *mut ClassControl {
        self.0.at::<ClassControl>(class.index() * CONTROL_STRIDE)
    }

    /// The budget element of `class`.
    fn budget_cell(&self, class: Class) -> &std::sync::atomic::AtomicI64 {
        let p = self.1.at::<i64>(class.index() * MMAP_ELEM_STRIDE);
        // SAFETY: aligned i64 inside the mapping, alive as long as `self`; the kernel updates it
        // atomically too.
        unsafe { std::sync::atomic::AtomicI64::from_ptr(p) }
    }

    /// Sets the state of `class`.
    pub fn set(&self, class: Class, state: ClassState) {
        // SAFETY: aligned u32 field inside the mapping; the kernel reads it with a plain load.
        unsafe {
            AtomicU32::from_ptr(&raw mut (*self.control(class)).state)
                .store(abi::class_state(state), Ordering::SeqCst)
        };
    }

    /// Sets the state applied to `class`'s connects once its budget is spent.
    pub fn set_over_budget(&self, class: Class, state: ClassState) {
        // SAFETY: as in `set`.
        unsafe {
            AtomicU32::from_ptr(&raw mut (*self.control(class)).over_budget)
                .store(abi::class_state(state), Ordering::SeqCst)
        };
    }

    /// Sets `class`'s admission budget for the coming beat (`None`: unlimited).
    pub fn set_budget(&self, class: Class, budget: Option<u64>) {
        let v = budget.map_or(BUDGET_UNLIMITED, |b| b.min(i64::MAX as u64 - 1) as i64);
        self.budget_cell(class).store(v, Ordering::SeqCst);
    }

    /// What is left of `class`'s budget this beat (`None`: unlimited; negative: overspent).
    pub fn budget(&self, class: Class) -> Option<i64> {
        let v = self.budget_cell(class).load(Ordering::SeqCst);
        (v != BUDGET_UNLIMITED).then_some(v)
    }

    /// Marks the decisions as fresh now; the kernel ignores states and budgets once no heartbeat
    /// came for `stale_after` (`None`: never; SLO admission then never fails open).
    pub fn heartbeat(&self, stale_after: Option<Duration>) {
        let now = sys::monotonic_ns();
        let stale = stale_after.map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64);
        for class in CLASSES_IN_ABI_ORDER {
            let c = self.control(class);
            // SAFETY: aligned u64 fields of the class's `ClassControl` inside the mapping.
            unsafe {
                std::sync::atomic::AtomicU64::from_ptr(&raw mut (*c).heartbeat_ns)
                    .store(now, Ordering::SeqCst);
                std::sync::atomic::AtomicU64::from_ptr(&raw mut (*c).stale_after_ns)
                    .store(stale, Ordering::SeqCst);
            }
        }
    }

    /// The state of `class`.
    pub fn get(&self, class: Class) -> u32 {
        // SAFETY: as in `set`.
        unsafe { AtomicU32::from_ptr(&raw mut (*self.control(class)).state).load(Ordering::SeqCst) }
    }
}

/// Proof that a reclaim started at a given switch; see [`Datapath::begin_reclaim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReclaimTicket {
    switches: u64,
}

/// Waits for an RCU grace period: afterwards no connect that started before the call is still
/// reading any slot. Takes a few milliseconds; call it without holding the datapath.
pub fn grace_period() -> Result<(), DatapathError> {
    sys::synchronize_rcu().map_err(io_err("membarrier", Path::new("(synchronize_rcu)")))
}

/// A rule cgroup that appeared or disappeared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeChange {
    /// The cgroup now exists and its rules are enforced.
    Appeared {
        /// Rule cgroup path.
        path: CgroupPath,
        /// Its cgroup id.
        id: u64,
    },
    /// The cgroup is gone; its entries were removed.
    Removed {
        /// Rule cgroup path.
        path: CgroupPath,
        /// Its former cgroup id.
        id: u64,
    },
    /// The path cannot be looked up (a component is not a directory, permissions, or it sits
    /// deeper than the programs probe): its rules stay pending; reported once until it changes.
    Unresolvable {
        /// Rule cgroup path.
        path: CgroupPath,
        /// Why.
        reason: String,
    },
}

/// A snapshot of the datapath for status output and metrics.
#[derive(Debug, Clone, Default)]
pub struct DatapathStatus {
    /// Live policy generation (0 before the first apply).
    pub generation: u64,
    /// Whether pins from an earlier run were re-adopted at start.
    pub adopted: bool,
    /// Attached programs.
    pub programs: Vec<&'static str>,
    /// Cgroup the programs are attached to.
    pub cgroup_root: PathBuf,
    /// Hit counter of each rule of the live policy, by name (shared with the datapath).
    pub rule_counters: Arc<[(String, u32)]>,
    /// Rule cgroups that exist.
    pub active_scopes: Vec<CgroupPath>,
    /// Rule cgroups that do not exist yet.
    pub pending_scopes: Vec<CgroupPath>,
    /// Trie entries of the live generation, IPv4 + IPv6.
    pub trie_entries: usize,
    /// Capacity of the heat map.
    pub heat_capacity: u32,
}

/// Keys written into one slot for one scope (0 = global).
#[derive(Debug, Default, Clone)]
struct ScopeKeys {
    v4: Vec<Ipv4Net>,
    v6: Vec<Ipv6Net>,
    /// `Some(level)` when a scope-table entry exists for it.
    level: Option<u32>,
}

/// The policy in the active slot and where its rule cgroups are. The live generation as the
/// datapath keeps it. Everything but `resolved` is immutable and
/// shared, so the cgroup follower (every tick) and status snapshots copy pointers, not rules.
#[derive(Debug, Clone)]
struct Live {
    policy: Arc<Policy>,
    counters: Arc<[u32]>,
    /// (rule name, counter id), for metrics and status.
    rule_counters: Arc<[(String, u32)]>,
    /// The distinct rule cgroups.
    scopes: Arc<[CgroupPath]>,
    resolved: BTreeMap<CgroupPath, CgroupRef>,
}

/// Stable hit-counter ids per rule name; counter 0 counts connects that matched no rule.
#[derive(Debug, Clone, Default)]
struct CounterIds {
    by_name: HashMap<String, u32>,
    free: Vec<u32>,
    next: u32,
}

impl CounterIds {
    /// Ids for `names`, keeping those of names already known; returns (ids, newly assigned).
    fn assign<'a>(
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

/// A policy checked and compiled by [`Datapath::prepare`], ready to be written.
#[derive(Debug)]
pub struct Prepared {
    resolved: BTreeMap<CgroupPath, cgroup::CgroupRef>,
    pending: Vec<CgroupPath>,
    counters: CounterIds,
    ids: Vec<u32>,
    fresh: Vec<u32>,
    tables: Vec<(u64, Option<u32>, ScopeTable)>,
    new_v4: usize,
    new_v6: usize,
}

impl Prepared {
    /// Trie entries the policy compiles to, over every scope that exists now.
    pub fn trie_entries(&self) -> usize {
        self.new_v4 + self.new_v6
    }
}

/// The loaded, attached kernel programs and the writer side of their maps.
pub struct Datapath {
    layout: PinLayout,
    cgroup_mount: PathBuf,
    cgroup_root: PathBuf,
    /// Level of `cgroup_root` below the hierarchy root.
    root_level: u32,
    /// Rule cgroups whose lookup failed, with the reason last reported.
    unresolvable: BTreeMap<CgroupPath, String>,
    heat_capacity: u32,
    adopted: bool,
    config: sys::MmapArray,
    rule_hits: sys::MmapArray,
    class_states: ClassStateWriter,
    policy_v4: LpmTrie<MapData, LpmKeyV4, RuleLeaf>,
    policy_v6: LpmTrie<MapData, LpmKeyV6, RuleLeaf>,
    /// Duplicates of the tries' fds, for batch writes (aya 0.14 has none).
    policy_v4_fd: std::os::fd::OwnedFd,
    policy_v6_fd: std::os::fd::OwnedFd,
    scopes: BpfHashMap<MapData, ScopeKey, ScopeValue>,
    park: BpfHashMap<MapData, u32, ParkTarget>,
    /// Counter ids that have a park target in `park`.
    parked: std::collections::HashSet<u32>,
    /// Keys each slot holds.
    slots: [HashMap<u64, ScopeKeys>; SLOTS],
    /// For each slot that was live and no longer is: the switch count at which it was retired.
    /// Connects that started before then may still read it until an RCU grace period passes.
    retired: [Option<u64>; SLOTS],
    /// Switches made by this datapath.
    switches: u64,
    counters: CounterIds,
    live: Option<Live>,
    generation: u64,
    // Keeps the programs loaded for as long as the datapath lives; the pinned links keep them
    // attached beyond that.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pins", &self.layout.dir)
            .field("cgroup_root", &self.cgroup_root)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

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
        let dup = |m: &MapData, name: &'static str| {
            m.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(io_err("dup", &layout.map(name)))
        };
        let policy_v4_fd = dup(&v4_map, map_names::POLICY_V4)?;
        let policy_v6_fd = dup(&v6_map, map_names::POLICY_V6)?;
        let policy_v4 = LpmTrie::try_from(aya::maps::Map::LpmTrie(v4_map))
            .map_err(map_err("open", map_names::POLICY_V4))?;
        let policy_v6 = LpmTrie::try_from(aya::maps::Map::LpmTrie(v6_map))
            .map_err(map_err("open", map_names::POLICY_V6))?;
        let scopes = BpfHashMap::try_from(aya::maps::Map::HashMap(take_map(
            &mut ebpf,
            map_names::SCOPES,
        )?))
        .map_err(map_err("open", map_names::SCOPES))?;

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
            policy_v4_fd,
            policy_v6_fd,
            scopes,
            park,
            parked: Default::default(),
            slots: Default::default(),
            retired: [None; SLOTS],
            switches: 0,
            counters: CounterIds::default(),
            live: None,
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
        // SAFETY (for the writes below): the mapping holds one `Config`, and fields are written
        // with volatile stores that the kernel's plain loads observe.
        let cfg = dp.config_ptr();
        unsafe {
            std::ptr::write_volatile(&raw mut (*cfg).abi_version, ABI_VERSION);
            std::ptr::write_volatile(&raw mut (*cfg).attach_cgroup_id, attach.id);
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
    fn recover_slots(&mut self) -> Result<(), DatapathError> {
        for key in self.policy_v4.keys() {
            let key = key.map_err(map_err("iterate", map_names::POLICY_V4))?;
            let data = key.data();
            let len = key.prefix_len().saturating_sub(LPM_FIXED_BITS) as u8;
            if let Ok(net) = Ipv4Net::new(data.addr.into(), len) {
                self.slots[data.slot as usize % SLOTS]
                    .entry(data.scope)
                    .or_default()
                    .v4
                    .push(net);
            }
        }
        for key in self.policy_v6.keys() {
            let key = key.map_err(map_err("iterate", map_names::POLICY_V6))?;
            let data = key.data();
            let len = key.prefix_len().saturating_sub(LPM_FIXED_BITS) as u8;
            if let Ok(net) = Ipv6Net::new(data.addr.into(), len) {
                self.slots[data.slot as usize % SLOTS]
                    .entry(data.scope)
                    .or_default()
                    .v6
                    .push(net);
            }
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

    fn attach_programs(
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
                        let fd = p.fd().map_err(|e| attach_err(chain(&e)))?;
                        replace_program(&link_path, fd.as_fd())
                            .map_err(|e| attach_err(chain(&e)))?;
                    } else {
                        let id = p
                            .attach(&cgroup_file, CgroupAttachMode::Single)
                            .map_err(|e| attach_err(chain(&e)))?;
                        let link = p.take_link(id).map_err(|e| attach_err(chain(&e)))?;
                        let link = FdLink::try_from(link).map_err(|e| attach_err(chain(&e)))?;
                        link.pin(&link_path).map_err(|e| attach_err(chain(&e)))?;
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

    fn config_ptr(&self) -> *mut Config {
        self.config.at::<Config>(0)
    }

    fn config_ref(&self) -> Config {
        // SAFETY: a volatile copy of the shared entry.
        unsafe { std::ptr::read_volatile(self.config_ptr()) }
    }

    fn active_slot(&self) -> u32 {
        // SAFETY: aligned u32 inside the mapping.
        let word = unsafe { AtomicU32::from_ptr(&raw mut (*self.config_ptr()).active_slot) };
        word.load(Ordering::SeqCst) % SLOTS as u32
    }

    /// The live policy generation (0 before the first apply).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Everything [`Datapath::apply`] checks, without writing: bounds, cgroup levels, counter
    /// ids, the compile of every scope, and whether the result could ever fit the maps. The one
    /// validator of ApplyPolicy and DryRun.
    pub fn prepare(&self, policy: &Policy) -> Result<Prepared, DatapathError> {
        crate::policy::check_bounds(&policy.rules)?;
        let mut resolved = BTreeMap::new();
        let mut pending = Vec::new();
        for path in rule_scopes(&policy.rules) {
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
        let (ids, fresh) = counters.assign(policy.rules.iter().map(|r| r.name.as_str()))?;
        let mut tables: Vec<(u64, Option<u32>, ScopeTable)> = vec![(
            0,
            None,
            compile_scope(&policy.rules, None, &ids, policy.default_class)?,
        )];
        for (path, r) in &resolved {
            tables.push((
                r.id,
                Some(r.level),
                compile_scope(&policy.rules, Some(path), &ids, policy.default_class)?,
            ));
        }
        let new_v4: usize = tables.iter().map(|t| t.2.v4.len()).sum();
        let new_v6: usize = tables.iter().map(|t| t.2.v6.len()).sum();
        for (what, needed, max) in [
            ("IPv4 prefixes", new_v4, MAX_PREFIXES as usize),
            ("IPv6 prefixes", new_v6, MAX_PREFIXES as usize),
            ("cgroup scopes", resolved.len(), MAX_SCOPES as usize),
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
            resolved,
            pending,
            counters,
            ids,
            fresh,
            tables,
            new_v4,
            new_v6,
        })
    }

    /// Compiles `policy` and switches it in atomically. On error the live generation is
    /// unchanged, including when `deadline` passes before the switch.
    pub fn apply(
        &mut self,
        policy: &Arc<Policy>,
        deadline: Option<Instant>,
    ) -> Result<ApplyReport, DatapathError> {
        let started = Instant::now();
        let Prepared {
            resolved,
            pending,
            counters,
            ids,
            fresh,
            tables,
            new_v4,
            new_v6,
        } = self.prepare(policy)?;
        // A free slot, and room in the maps: both may need the retired slots reclaimed first.
        let fits = |dp: &Self| {
            let (v4, v6, sc) = dp.entries_in_use();
            v4 + new_v4 <= MAX_PREFIXES as usize
                && v6 + new_v6 <= MAX_PREFIXES as usize
                && sc + resolved.len() <= MAX_SCOPES as usize
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
        let active = self.active_slot();
        let (live_v4, live_v6, live_scopes) = self.entries_in_use();
        for (what, needed, live, max) in [
            ("IPv4 prefixes", new_v4, live_v4, MAX_PREFIXES as usize),
            ("IPv6 prefixes", new_v6, live_v6, MAX_PREFIXES as usize),
            (
                "cgroup scopes",
                resolved.len(),
                live_scopes,
                MAX_SCOPES as usize,
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
        let generation = self.generation + 1;
        let slot_config = SlotConfig {
            generation,
            flags: flags_of(policy),
            default_action: match policy.default_action {
                DefaultAction::Allow => ACTION_ALLOW,
                DefaultAction::Deny => ACTION_DENY,
            },
            default_class: abi::class(policy.default_class),
            _pad: [0; 2],
            scope_level_min: level_min,
            scope_level_max: level_max,
            histogram_interval_ns: policy.histogram_interval_us.saturating_mul(1000),
        };
        // Park targets are keyed by the rules' (stable) counter ids: write the new ones before
        // the switch, drop the unused ones after it.
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
        // SAFETY: the inactive slot's settings are not read by connects (they read the active
        // slot's); the switch below is one aligned atomic store.
        unsafe {
            std::ptr::write_volatile(&raw mut (*cfg).slots[inactive as usize], slot_config);
            AtomicU32::from_ptr(&raw mut (*cfg).active_slot).store(inactive, Ordering::SeqCst);
        }
        let switch_latency = started.elapsed();
        tracing::debug!(
            compile_us = compiled.as_micros() as u64,
            write_us = writing.elapsed().as_micros() as u64,
            total_us = switch_latency.as_micros() as u64,
            slot = inactive,
            "policy written and switched"
        );
        self.switches += 1;
        self.retired[active as usize] = Some(self.switches);
        for stale in self.parked.difference(&parked).copied().collect::<Vec<_>>() {
            ignore_missing(self.park.remove(&stale)).map_err(map_err("remove", map_names::PARK))?;
        }
        self.parked = parked;
        self.generation = generation;
        self.counters = counters;
        self.live = Some(Live {
            rule_counters: policy
                .rules
                .iter()
                .zip(&ids)
                .map(|(r, c)| (r.name.to_string(), *c))
                .collect(),
            scopes: rule_scopes(&policy.rules).into(),
            policy: policy.clone(),
            counters: ids.into(),
            resolved: resolved.clone(),
        });
        Ok(ApplyReport {
            generation,
            rules: policy.rules.len(),
            trie_entries: new_v4 + new_v6,
            active_scopes: resolved.into_keys().collect(),
            pending_scopes: pending,
            switch_latency,
        })
    }

    /// A slot that is neither live nor retired (and so empty).
    fn free_slot(&self) -> Option<u32> {
        let active = self.active_slot() as usize;
        (0..SLOTS)
            .find(|s| *s != active && self.retired[*s].is_none())
            .map(|s| s as u32)
    }

    /// Trie entries (IPv4, IPv6) and scope entries held by every slot.
    fn entries_in_use(&self) -> (usize, usize, usize) {
        self.slots
            .iter()
            .flat_map(|s| s.values())
            .fold((0, 0, 0), |(a, b, c), k| {
                (
                    a + k.v4.len(),
                    b + k.v6.len(),
                    c + k.level.is_some() as usize,
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

    fn clear_retired(
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
            }
        }
        Ok(false)
    }

    /// Removes up to `budget` entries of one scope from a slot, the scope entry (which makes the
    /// tries reachable) first; returns the budget left.
    fn remove_scope_entries(
        &mut self,
        slot: u32,
        scope: u64,
        mut budget: usize,
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
        while budget > 0 {
            let Some(net) = keys.v4.pop() else { break };
            let data = LpmKeyV4 {
                slot,
                _pad: 0,
                scope,
                addr: net.network().octets(),
            };
            let key = Key::new(LPM_FIXED_BITS + net.prefix_len() as u32, data);
            ignore_missing(self.policy_v4.remove(&key))
                .map_err(map_err("remove", map_names::POLICY_V4))?;
            budget -= 1;
        }
        while budget > 0 {
            let Some(net) = keys.v6.pop() else { break };
            let data = LpmKeyV6 {
                slot,
                _pad: 0,
                scope,
                addr: net.network().octets(),
            };
            let key = Key::new(LPM_FIXED_BITS + net.prefix_len() as u32, data);
            ignore_missing(self.policy_v6.remove(&key))
                .map_err(map_err("remove", map_names::POLICY_V6))?;
            budget -= 1;
        }
        if keys.v4.is_empty() && keys.v6.is_empty() {
            self.slots[slot as usize].remove(&scope);
        }
        Ok(budget)
    }

    fn write_table(
        &mut self,
        slot: u32,
        scope: u64,
        table: &ScopeTable,
    ) -> Result<(), DatapathError> {
        let v4_keys: Vec<Key<LpmKeyV4>> = table
            .v4
            .iter()
            .map(|(net, _)| {
                let data = LpmKeyV4 {
                    slot,
                    _pad: 0,
                    scope,
                    addr: net.network().octets(),
                };
                Key::new(LPM_FIXED_BITS + net.prefix_len() as u32, data)
            })
            .collect();
        let v6_keys: Vec<Key<LpmKeyV6>> = table
            .v6
            .iter()
            .map(|(net, _)| {
                let data = LpmKeyV6 {
                    slot,
                    _pad: 0,
                    scope,
                    addr: net.network().octets(),
                };
                Key::new(LPM_FIXED_BITS + net.prefix_len() as u32, data)
            })
            .collect();
        let v4_leaves: Vec<RuleLeaf> = table.v4.iter().map(|(_, l)| *l).collect();
        let v6_leaves: Vec<RuleLeaf> = table.v6.iter().map(|(_, l)| *l).collect();
        // Record the keys first: if a write fails midway, the slot's cleanup still finds them.
        let keys = self.slots[slot as usize].entry(scope).or_default();
        keys.v4.extend(table.v4.iter().map(|(n, _)| *n));
        keys.v6.extend(table.v6.iter().map(|(n, _)| *n));
        let batch_err = |map: &'static str| {
            move |e: io::Error| DatapathError::Map {
                op: "batch update",
                map,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_batch",
                    io_error: e,
                }),
            }
        };
        let batched_v4 = v4_keys.is_empty()
            || sys::update_batch(self.policy_v4_fd.as_fd(), &v4_keys, &v4_leaves)
                .map_err(batch_err(map_names::POLICY_V4))?;
        tracing::trace!(batched_v4, "trie write");
        if !batched_v4 {
            for (key, leaf) in v4_keys.iter().zip(&v4_leaves) {
                self.policy_v4
                    .insert(key, leaf, 0)
                    .map_err(map_err("insert", map_names::POLICY_V4))?;
            }
        }
        let batched_v6 = v6_keys.is_empty()
            || sys::update_batch(self.policy_v6_fd.as_fd(), &v6_keys, &v6_leaves)
                .map_err(batch_err(map_names::POLICY_V6))?;
        if !batched_v6 {
            for (key, leaf) in v6_keys.iter().zip(&v6_leaves) {
                self.policy_v6
                    .insert(key, leaf, 0)
                    .map_err(map_err("insert", map_names::POLICY_V6))?;
            }
        }
        Ok(())
    }

    fn insert_scope(&mut self, slot: u32, scope: u64, level: u32) -> Result<(), DatapathError> {
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
    fn remove_scope(&mut self, slot: u32, scope: u64) -> Result<(), DatapathError> {
        self.remove_scope_entries(slot, scope, usize::MAX)
            .map(|_| ())
    }

    fn set_rule_hits(&self, counter: u32, value: u64) {
        let p = self.rule_hits.at::<u64>(counter as usize * 8);
        // SAFETY: aligned u64 inside the mapping; the kernel updates it atomically too.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(p).store(value, Ordering::Relaxed) };
    }

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
        Ok(changes)
    }

    fn widen_levels(&self, slot: u32, level: u32) {
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

    /// A snapshot for status output and metrics.
    pub fn status(&self) -> DatapathStatus {
        let active = self.active_slot() as usize;
        let (rule_counters, active_scopes, pending_scopes) = match &self.live {
            Some(live) => (
                live.rule_counters.clone(),
                live.resolved.keys().cloned().collect(),
                live.scopes
                    .iter()
                    .filter(|p| !live.resolved.contains_key(*p))
                    .cloned()
                    .collect(),
            ),
            None => (Arc::from([]), Vec::new(), Vec::new()),
        };
        DatapathStatus {
            generation: self.generation,
            adopted: self.adopted,
            programs: program_names::ALL.to_vec(),
            cgroup_root: self.cgroup_root.clone(),
            rule_counters,
            active_scopes,
            pending_scopes,
            trie_entries: self.slots[active]
                .values()
                .map(|k| k.v4.len() + k.v6.len())
                .sum(),
            heat_capacity: self.heat_capacity,
        }
    }

    /// Kernel run-time statistics of the attached programs: (program, total run time, runs).
    /// The kernel counts only while BPF stats are enabled (`aya::sys::enable_stats`, or the
    /// `kernel.bpf_stats_enabled` sysctl); otherwise both figures stay 0.
    pub fn program_stats(&self) -> Result<Vec<(&'static str, Duration, u64)>, DatapathError> {
        let mut out = Vec::new();
        for name in program_names::ALL {
            let path = self.layout.link(name);
            let link = aya::programs::links::PinnedLink::from_pin(&path).map_err(|e| {
                DatapathError::Attach {
                    program: name,
                    cgroup: self.cgroup_root.clone(),
                    reason: chain(&e),
                }
            })?;
            let id = FdLink::from(link)
                .info()
                .map_err(|e| DatapathError::Attach {
                    program: name,
                    cgroup: self.cgroup_root.clone(),
                    reason: chain(&e),
                })?
                .program_id();
            let info = aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .find(|p| p.id() == id)
                .ok_or_else(|| {
                    DatapathError::Load(format!("program {name} (id {id}) is not loaded"))
                })?;
            out.push((name, info.run_time(), info.run_count()));
        }
        Ok(out)
    }

    /// A writer of the kernel's class states (for the beat engine).
    pub fn class_state_writer(&self) -> ClassStateWriter {
        self.class_states.clone()
    }

    /// The pin layout in use.
    pub fn pins(&self) -> &PinLayout {
        &self.layout
    }

    /// Keys of one scope in the active slot, for tests and diagnostics: (IPv4, IPv6, has scope entry).
    pub fn scope_entry_counts(&self, cgroup_id: u64) -> (usize, usize, bool) {
        let mut total = (0, 0, false);
        for slot in &self.slots {
            if let Some(k) = slot.get(&cgroup_id) {
                total = (
                    total.0 + k.v4.len(),
                    total.1 + k.v6.len(),
                    total.2 || k.level.is_some(),
                );
            }
        }
        total
    }
}

/// Detaches knhk's programs: removes knhk's own pins under `pin_root` (every known ABI
/// version) and nothing else; refuses a pin root that is not on bpffs and never follows a
/// symlink (see [`pins::remove_pins`]). Enforcement stops. Returns the pins removed.
pub fn remove_pins(pin_root: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    pins::remove_pins(pin_root)
}

fn park_target(addr: std::net::SocketAddr) -> ParkTarget {
    let mut t = ParkTarget {
        port_be: u32::from(addr.port().to_be()),
        ..Default::default()
    };
    match addr {
        std::net::SocketAddr::V4(a) => {
            t.family = 4;
            t.addr[..4].copy_from_slice(&a.ip().octets());
        }
        std::net::SocketAddr::V6(a) => {
            t.family = 6;
            t.addr = a.ip().octets();
        }
    }
    t
}

fn flags_of(policy: &Policy) -> u32 {
    let mut flags = 0;
    if policy.mode == Mode::Enforce {
        flags |= FLAG_ENFORCE;
    }
    if policy.heat {
        flags |= FLAG_HEAT;
    }
    if policy.histograms {
        flags |= FLAG_HISTOGRAMS;
    }
    flags
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, DatapathError> {
    match ebpf.take_map(name) {
        Some(
            aya::maps::Map::Array(m)
            | aya::maps::Map::LpmTrie(m)
            | aya::maps::Map::HashMap(m)
            | aya::maps::Map::PerCpuArray(m)
            | aya::maps::Map::LruHashMap(m)
            | aya::maps::Map::SkStorage(m),
        ) => Ok(m),
        _ => Err(DatapathError::Load(format!(
            "map {name} is missing from the object or has an unexpected type"
        ))),
    }
}

/// An error and its sources, joined: aya's messages name the syscall, the source says why.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn page_round(len: usize) -> usize {
    len.div_ceil(4096) * 4096
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn replace_program(link_path: &Path, program: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    let link = sys::obj_get(link_path)?;
    sys::link_update(link.as_fd(), program)
}

fn verifier_message(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            format!(
                "{io_error}; verifier log (last lines):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        }
        other => other.to_string(),
    }
}

/// The conventional bpffs mount point.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts a bpffs at [`BPFFS`] unless one is there; returns whether it mounted one.
pub fn mount_bpffs_if_missing() -> Result<bool, DatapathError> {
    let mount = Path::new(BPFFS);
    if sys::is_bpffs(mount) {
        return Ok(false);
    }
    sys::mount_bpffs(mount).map_err(|e| DatapathError::Bpffs {
        path: mount.to_owned(),
        reason: format!("it is not a bpffs and mounting one failed: {e}"),
    })?;
    info!("mounted bpffs at {BPFFS}");
    Ok(true)
}

/// Makes sure `pin_root` is on a bpffs (mounting one at `/sys/fs/bpf` if none is there) and
/// creates the pin directories.
fn prepare_pin_dirs(layout: &PinLayout, pin_root: &Path) -> Result<(), DatapathError> {
    let bpffs_err = |reason: String| DatapathError::Bpffs {
        path: pin_root.to_owned(),
        reason,
    };
    if pin_root.starts_with(BPFFS) {
        mount_bpffs_if_missing()?;
    }
    for dir in [layout.maps_dir(), layout.links_dir()] {
        std::fs::create_dir_all(&dir)
            .map_err(|e| bpffs_err(format!("creating {}: {e}", dir.display())))?;
    }
    if !sys::is_bpffs(&layout.dir) {
        return Err(bpffs_err(format!(
            "{} is not on a bpffs (mount one with `mount -t bpf bpf DIR`)",
            layout.dir.display()
        )));
    }
    Ok(())
}

/// Checks every existing map pin against this build's ABI. Returns whether anything was
/// pinned (a re-adoption). Soft-state maps that do not match are removed, to be recreated.
fn check_pins(
    layout: &PinLayout,
    pin_root: &Path,
    heat_max_entries: u32,
) -> Result<bool, DatapathError> {
    let mut adopted = false;
    for spec in pins::expected_maps(heat_max_entries) {
        let path = layout.map(spec.name);
        let Some(shape) = pins::pinned_shape(&path).map_err(io_err("inspecting pin", &path))?
        else {
            continue;
        };
        adopted = true;
        let diff = pins::differences(&spec, &shape);
        if diff.is_empty() {
            continue;
        }
        if spec.soft {
            warn!(
                pin = %path.display(),
                differences = %diff.join(", "),
                "pinned map does not match this build (e.g. heat_max_entries changed): recreating it, which resets its contents"
            );
            std::fs::remove_file(&path).map_err(io_err("unpin", &path))?;
        } else {
            return Err(DatapathError::IncompatiblePin {
                path,
                differences: diff.join(", "),
                pin_root: pin_root.to_owned(),
            });
        }
    }
    Ok(adopted)
}

/// Classes in ABI order, for readers.
pub(crate) const CLASSES_IN_ABI_ORDER: [Class; 3] = [Class::R1, Class::W1, Class::C1];
