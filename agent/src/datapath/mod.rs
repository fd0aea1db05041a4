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
//! (tries first, then the scope entry that makes them reachable); [`Datapath::set_inventory`]
//! re-binds the rules that select Kubernetes workloads as pods come and go.
//!
//! A rollout ([`split`]) stages a candidate generation in a slot of its own beside the live one;
//! the split table names the cgroups it judges; it ends promoted or dropped with one store.
//!
//! [`DatapathReader`] reads counters, histograms and heat from the pins, independently of the
//! writer, for metrics.

pub mod cgroup;
mod class_state;
mod events;
mod explain;
mod follow;
mod load;
pub mod pins;
mod reader;
mod split;
mod switch;
mod sys;
mod trie;

pub use class_state::ClassStateWriter;
use class_state::CONTROL_STRIDE;
pub use events::VerdictRing;
pub use explain::Explanation;
pub use follow::{Follower, RESYNC_EVERY};
pub use split::Workload;
use switch::CounterIds;
pub use switch::{Prepared, MAX_POD_COUNTERS};

pub use reader::{
    per_destination, protocol_name, DatapathReader, Decisions, HeatCursor, HeatEntry,
    LatencyHistogram, PodRuleHits,
};

use crate::{
    abi,
    model::text::error_chain,
    model::{CgroupPath, Class, ClassState, DefaultAction, Inventory, Mode},
    policy::{
        bind, compile_scope, scopes_of, Bindings, CompileError, CompiledLeaf, Policy, ScopeTable,
        GUARD_RULE,
    },
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
    /// Another agent holds the pin root: two agents must never share pins.
    #[error(
        "agent.pin_root {path} is in use by another knhk-agent{}: two agents must never share pins; \
         stop that agent first, or give this one its own agent.pin_root (nothing was attached)",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    PinRootInUse {
        /// The pin root.
        path: PathBuf,
        /// The process that holds its lock, when `/proc/locks` names it.
        holder: Option<u32>,
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
    /// `explain` was asked about a cgroup that does not exist.
    #[error("cgroup {path} does not exist under agent.cgroup_root")]
    NoSuchCgroup {
        /// The cgroup, relative to the root (escaped for logs).
        path: String,
    },
    /// `explain` was asked about a pod the agent does not know.
    #[error("pod {pod}: {reason}")]
    NoSuchPod {
        /// `namespace/name` (escaped for logs).
        pod: String,
        /// Why it is unknown.
        reason: String,
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

/// The hit counter of one expansion of a selector rule: the rule's entries in the scope of one
/// pod (or, with `container`, one container) it selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCounter {
    /// Index of the rule in the policy (and in [`DatapathStatus::rule_counters`]).
    pub rule: usize,
    /// The rule's action as the mode applies it (`allow`, `deny`, or `audit`, which a deny
    /// becomes in audit mode).
    pub action: &'static str,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The bound cgroup (the pod's, or the selected container's).
    pub cgroup: CgroupPath,
    /// Counter id.
    pub id: u32,
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
    /// Hit counter of each expansion of a selector rule that has one (a rule's total is its
    /// own counter plus these).
    pub pod_counters: Arc<[PodCounter]>,
    /// Expansions of selector rules without a counter of their own (past
    /// [`MAX_POD_COUNTERS`]): their hits count on their rule only.
    pub pods_unattributed: usize,
    /// Rule cgroups that exist.
    pub active_scopes: Vec<CgroupPath>,
    /// Their cgroup ids (the scope ids the kernel attributes heat to), same order.
    pub active_scope_ids: Vec<u64>,
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
    /// Overflow chunk ids its leaves use.
    chunks: Vec<u32>,
}

/// The policy in the active slot and where its rule cgroups are. The live generation as the
/// datapath keeps it. Everything but `resolved` is immutable and
/// shared, so the cgroup follower (every tick) and status snapshots copy pointers, not rules.
#[derive(Debug, Clone)]
struct Live {
    policy: Arc<Policy>,
    counters: Arc<crate::policy::Counters>,
    /// (rule name, counter id), for metrics and status.
    rule_counters: Arc<[(String, u32)]>,
    /// The selector rules' expansions that have counters of their own.
    pod_counters: Arc<[PodCounter]>,
    /// Expansions without one.
    unattributed: usize,
    /// Where the policy's selector rules apply now (from the workload inventory).
    bindings: Arc<Bindings>,
    /// Every cgroup with a scope of its own: the rule cgroups and the bound workloads'.
    scopes: Arc<[CgroupPath]>,
    resolved: BTreeMap<CgroupPath, CgroupRef>,
}

impl Live {
    /// The expansion keys (rule name, bound cgroup) that have counters.
    fn pod_keys(&self) -> Vec<(String, CgroupPath)> {
        self.pod_counters
            .iter()
            .filter_map(|p| {
                self.rule_counters
                    .get(p.rule)
                    .map(|(n, _)| (n.clone(), p.cgroup.clone()))
            })
            .collect()
    }
}

/// A cached union of rule cgroups, keyed by the addresses of the two lists it was made of.
type FollowedUnion = ((usize, usize), Arc<[CgroupPath]>);

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
    policy_v4: trie::PolicyTrie<Ipv4Net>,
    policy_v6: trie::PolicyTrie<Ipv6Net>,
    scopes: BpfHashMap<MapData, ScopeKey, ScopeValue>,
    chunks: BpfHashMap<MapData, ChunkKey, RuleChunk>,
    /// Next free overflow chunk id of each slot (ids start at 1).
    next_chunk: [u32; SLOTS],
    /// Pins of an older ABI were found at start: removed after the first policy is live.
    superseded_pins: bool,
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
    /// The node's pods, when workload discovery runs ([`Datapath::set_inventory`]).
    inventory: Option<Arc<Inventory>>,
    /// A rollout's candidate generation, when one is staged.
    candidate: Option<split::Candidate>,
    /// The rollout split table, and the cgroup ids this datapath put in it.
    split_map: BpfHashMap<MapData, u64, u32>,
    split: std::collections::HashSet<u64>,
    /// The union of the live and candidate rule cgroups, keyed by their two `Arc`s (see
    /// [`Datapath::followed_scopes`]).
    followed_union: Option<FollowedUnion>,
    generation: u64,
    /// A descriptor of every map and link, held for as long as the datapath lives: deleting
    /// the pins under a running agent detaches nothing, and [`Datapath::restore_pins`] pins
    /// them again.
    held: pins::Held,
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
    fn config_ptr(&self) -> *mut Config {
        self.config.at::<Config>(0)
    }

    fn config_ref(&self) -> Config {
        // SAFETY: a volatile copy of the shared entry.
        unsafe { std::ptr::read_volatile(self.config_ptr()) }
    }

    /// Invalidates every cached verdict: called after each change of what connects read (a
    /// switch, a scope written or removed in place), never before it.
    fn bump_epoch(&self) {
        let cfg = self.config_ptr();
        // SAFETY: an aligned u32 in the shared mapping; programs read it with plain loads.
        unsafe { AtomicU32::from_ptr(&raw mut (*cfg).epoch).fetch_add(1, Ordering::SeqCst) };
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

    /// Pins again what was deleted under the running agent (an operator's `rm`, a bpffs
    /// cleanup): the agent holds a descriptor of every map and link, so enforcement never
    /// stopped; this makes it outlive the agent again. Returns the pins restored.
    pub fn restore_pins(&self) -> Result<Vec<PathBuf>, DatapathError> {
        self.held.restore(&self.layout)
    }

    /// A snapshot for status output and metrics.
    pub fn status(&self) -> DatapathStatus {
        let active = self.active_slot() as usize;
        let (rule_counters, pod_counters, pods_unattributed, active_scopes, pending_scopes) =
            match &self.live {
                Some(live) => (
                    live.rule_counters.clone(),
                    live.pod_counters.clone(),
                    live.unattributed,
                    live.resolved.keys().cloned().collect(),
                    live.scopes
                        .iter()
                        .filter(|p| !live.resolved.contains_key(*p))
                        .cloned()
                        .collect(),
                ),
                None => (Arc::from([]), Arc::from([]), 0, Vec::new(), Vec::new()),
            };
        DatapathStatus {
            generation: self.generation,
            adopted: self.adopted,
            programs: program_names::ALL.to_vec(),
            cgroup_root: self.cgroup_root.clone(),
            rule_counters,
            pod_counters,
            pods_unattributed,
            active_scope_ids: self
                .live
                .as_ref()
                .map(|l| l.resolved.values().map(|r| r.id).collect())
                .unwrap_or_default(),
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
                    reason: error_chain(&e),
                }
            })?;
            let id = FdLink::from(link)
                .info()
                .map_err(|e| DatapathError::Attach {
                    program: name,
                    cgroup: self.cgroup_root.clone(),
                    reason: error_chain(&e),
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

/// Verdict events: at most one per rule per this interval (100 per second per rule).
pub const EVENT_INTERVAL: Duration = Duration::from_millis(10);

fn flags_of(policy: &Policy) -> u32 {
    let mut flags = 0;
    if policy.verdict_events {
        flags |= FLAG_EVENTS;
    }
    if policy.rules.iter().any(|r| r.park_to.is_some()) {
        flags |= FLAG_PARK;
    }
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

/// The exclusive lock of a pin root, held for as long as the value lives (the agent holds it for
/// its whole run): an advisory `flock` on the pin root directory itself, so a second agent
/// started on the same pin root is refused before it touches anything, and the kernel releases
/// the lock when the holder exits, however it exits (`kill -9` included).
#[derive(Debug)]
pub struct PinRootLock {
    _dir: std::fs::File,
    /// The pin root, when this lock created it and nothing was pinned yet: removed (if still
    /// empty) when the lock is dropped, so a start refused later leaves nothing behind.
    created: Option<PathBuf>,
}

impl Drop for PinRootLock {
    fn drop(&mut self) {
        if let Some(dir) = self.created.take() {
            // Only an empty directory goes; anything else stays.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl PinRootLock {
    /// Creates `pin_root` if needed (mounting bpffs at `/sys/fs/bpf` first when the pin root is
    /// below it and none is mounted) and takes its lock, without waiting: another holder is
    /// [`DatapathError::PinRootInUse`], naming its pid when it can be found.
    pub fn acquire(pin_root: &Path) -> Result<PinRootLock, DatapathError> {
        use std::os::{fd::AsRawFd, unix::fs::OpenOptionsExt};
        let bpffs_err = |reason: String| DatapathError::Bpffs {
            path: pin_root.to_owned(),
            reason,
        };
        if pin_root.starts_with(BPFFS) {
            mount_bpffs_if_missing()?;
        }
        let created = !pin_root.exists();
        std::fs::create_dir_all(pin_root)
            .map_err(|e| bpffs_err(format!("creating {}: {e}", pin_root.display())))?;
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(pin_root)
            .map_err(|e| bpffs_err(format!("opening {}: {e}", pin_root.display())))?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(DatapathError::PinRootInUse {
                    path: pin_root.to_owned(),
                    holder: lock_holder(&dir),
                });
            }
            return Err(bpffs_err(format!("locking {}: {e}", pin_root.display())));
        }
        Ok(PinRootLock {
            _dir: dir,
            created: created.then(|| pin_root.to_owned()),
        })
    }

    /// The datapath started: the pin root stays when the lock is dropped.
    pub fn keep(&mut self) {
        self.created = None;
    }
}

/// The pid `/proc/locks` gives for the `flock` on `dir`'s inode, if any.
fn lock_holder(dir: &std::fs::File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = dir.metadata().ok()?;
    let dev = meta.dev();
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 4242 00:27:13575780 0 EOF"
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&id.as_str()))
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
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
