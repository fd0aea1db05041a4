//! The map ABI shared by knhk's kernel programs (`ebpf/programs`) and its agent.
//!
//! Everything the kernel and userspace exchange is defined here, once: map names, key and value
//! layouts, flag bits and the latency-histogram bucketing. The types are plain `#[repr(C)]`
//! values with explicit padding, so their layout is the same on both sides; the tests at the end
//! pin every size and offset. Changing any of them means bumping [`ABI_VERSION`], which moves the
//! agent's pins to a new directory instead of silently reusing incompatible maps.
//!
//! The `user` feature adds `aya::Pod` impls for userspace.
#![no_std]

/// Version of this ABI. Pins live under `<bpffs>/knhk/v<ABI_VERSION>/`.
pub const ABI_VERSION: u32 = 4;

/// Runtime classes (hot, warm, cold). A rule names one; unmatched connects get the default.
pub const CLASS_R1: u8 = 0;
/// Warm path.
pub const CLASS_W1: u8 = 1;
/// Cold path.
pub const CLASS_C1: u8 = 2;
/// Number of runtime classes.
pub const CLASSES: usize = 3;

/// Sides of a rollout: a workload's connects are judged by the stable generation (the active
/// slot) or, while a rollout is live, by the candidate generation when the workload's cgroup is
/// in [`map_names::SPLIT`].
pub const SIDE_STABLE: u8 = 0;
/// The candidate generation's side.
pub const SIDE_CANDIDATE: u8 = 1;
/// Number of sides: decision counters and latency histograms are kept per side.
pub const SIDES: usize = 2;
/// Capacity of the split table (cgroups on the candidate side).
pub const MAX_SPLIT_CGROUPS: u32 = 65_536;

/// Rule and decision actions.
pub const ACTION_ALLOW: u8 = 0;
/// Refuse the connect with EPERM (in enforce mode).
pub const ACTION_DENY: u8 = 1;
/// Allow, but count as a would-be deny.
pub const ACTION_AUDIT: u8 = 2;
/// Refused with EPERM because the connect's class is paused by SLO admission (a decision
/// counter only; rules cannot name it).
pub const ACTION_SHED: u8 = 3;
/// Admitted, but parked: the destination was rewritten to the rule's park target because the
/// connect's class is degraded by SLO admission (a decision counter only).
pub const ACTION_PARK: u8 = 4;
/// Number of decision actions.
pub const ACTIONS: usize = 5;

/// Capacity of the park-target table (rules with `park_to`).
pub const MAX_PARK_TARGETS: u32 = 4096;

/// Class states written by the agent's beat engine into `CLASS_STATE`.
pub const STATE_NORMAL: u32 = 0;
/// Parked to a lower tier (Degrade strategy).
pub const STATE_DEGRADED: u32 = 1;
/// New connects refused with EPERM (Strict strategy; enforce mode only).
pub const STATE_PAUSED: u32 = 2;

/// `BUDGETS` value meaning "no admission budget".
pub const BUDGET_UNLIMITED: i64 = i64::MAX;

/// SLO admission control of one class, written by the beat engine (mmapable array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassControl {
    /// `STATE_*` of the class.
    pub state: u32,
    /// `STATE_*` applied to a connect of a `STATE_NORMAL` class once its per-beat budget is
    /// spent (`STATE_PAUSED` under Strict, `STATE_DEGRADED` under Degrade).
    pub over_budget: u32,
    /// CLOCK_MONOTONIC ns of the beat engine's last beat.
    pub heartbeat_ns: u64,
    /// When non-zero and the last heartbeat is older than this, the kernel ignores state and
    /// budget: SLO admission fails open while the agent is not beating (stopped, crashed,
    /// upgrading), instead of shedding on stale decisions.
    pub stale_after_ns: u64,
}

/// Rule protocols (`RuleEntry::proto`). Values are IPPROTO numbers, with 0 for "any".
pub const PROTO_ANY: u8 = 0;
/// IPPROTO_TCP.
pub const PROTO_TCP: u8 = 6;
/// IPPROTO_UDP.
pub const PROTO_UDP: u8 = 17;

/// `Config::flags`: deny rules refuse (otherwise every deny is downgraded to audit).
pub const FLAG_ENFORCE: u32 = 1 << 0;
/// `Config::flags`: record destination heat.
pub const FLAG_HEAT: u32 = 1 << 1;
/// `Config::flags`: record handshake and RTT histograms.
pub const FLAG_HISTOGRAMS: u32 = 1 << 2;
/// `Config::flags`: send verdict events (deny, audit, shed, park) to [`map_names::EVENTS`].
pub const FLAG_EVENTS: u32 = 1 << 3;
/// `Config::flags`: some rule has a park target (the `recvmsg` programs have work to do).
pub const FLAG_PARK: u32 = 1 << 4;

/// Deepest cgroup level (from the hierarchy root) a rule's scope may sit at.
pub const MAX_SCOPE_LEVEL: u32 = 16;
/// Rule entries held in a trie leaf itself; more go to chunks in [`map_names::LEAF_CHUNKS`].
pub const LEAF_INLINE_ENTRIES: usize = 16;
/// Rule entries per overflow chunk.
pub const CHUNK_ENTRIES: usize = 16;
/// Most overflow chunks one leaf may use.
pub const MAX_LEAF_CHUNKS: u32 = 63;
/// Most rule entries (rule × port range) that may cover one destination prefix.
pub const MAX_LEAF_ENTRIES: usize = LEAF_INLINE_ENTRIES + MAX_LEAF_CHUNKS as usize * CHUNK_ENTRIES;
/// Capacity of the overflow chunk table (over both policy slots).
pub const MAX_CHUNKS: u32 = 65_536;
/// Slots of the per-CPU verdict cache (a power of two): sets of [`VERDICT_CACHE_WAYS`]
/// adjacent slots.
pub const VERDICT_CACHE_SLOTS: u32 = 8192;
/// Slots per set of the verdict cache: a key may sit in either slot of its set, so two hot keys
/// that hash to one set do not evict each other.
pub const VERDICT_CACHE_WAYS: u32 = 2;
/// Capacity of the reverse-translation table of parked UDP destinations.
pub const MAX_REVNAT: u32 = 65_536;
/// Size of the verdict event ring buffer, bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;
/// Capacity of the rule-hit counter array; counter 0 counts connects that matched no rule.
pub const MAX_RULE_COUNTERS: u32 = 131_072;
/// Capacity of each LPM trie (prefixes, over both policy slots and every scope).
pub const MAX_PREFIXES: u32 = 524_288;
/// Capacity of the scope table (cgroups that own rules, over both slots).
pub const MAX_SCOPES: u32 = 16_384;
/// Default capacity of the heat LRU (`agent.heat_max_entries` overrides it at load time).
pub const DEFAULT_HEAT_MAX_ENTRIES: u32 = 65_536;

/// `BPF_F_MMAPABLE`: the map can be `mmap`ed (used for `CONFIG` and `RULE_HITS`).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_F_NO_PREALLOC`, required on LPM tries.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Map names, as they appear in the object file and as pin file names.
pub mod map_names {
    /// [`super::Config`] at index 0 (mmapable).
    pub const CONFIG: &str = "KNHK_CONFIG";
    /// IPv4 policy trie: `LpmKeyV4` → [`super::RuleLeaf`].
    pub const POLICY_V4: &str = "KNHK_POLICY_V4";
    /// IPv6 policy trie: `LpmKeyV6` → [`super::RuleLeaf`].
    pub const POLICY_V6: &str = "KNHK_POLICY_V6";
    /// Scope table: [`super::ScopeKey`] → [`super::ScopeValue`].
    pub const SCOPES: &str = "KNHK_SCOPES";
    /// Per-CPU decision counters indexed by [`super::decision_index`].
    pub const DECISIONS: &str = "KNHK_DECISIONS";
    /// Rule hit counters (mmapable array of u64, atomically incremented).
    pub const RULE_HITS: &str = "KNHK_RULE_HITS";
    /// Destination heat per deciding scope: [`super::HeatKey`] → [`super::HeatValue`] (LRU).
    pub const HEAT: &str = "KNHK_HEAT";
    /// TCP connect state per socket (socket storage) → [`super::ConnState`].
    pub const CONNS: &str = "KNHK_CONNS";
    /// Per-CPU latency histograms indexed by [`super::histogram_index`].
    pub const LATENCY: &str = "KNHK_LATENCY";
    /// Per-CPU time of the last timed connect, by class (histogram sampling).
    pub const SAMPLED: &str = "KNHK_SAMPLED";
    /// Class control ([`super::ClassControl`] per class; mmapable), written by the beat engine.
    pub const CLASS_STATE: &str = "KNHK_CLASS_STATE";
    /// Admission budget per class for the current beat (i64; mmapable): refilled by the beat
    /// engine, decremented by each admitted connect; [`super::BUDGET_UNLIMITED`] = no budget.
    pub const BUDGETS: &str = "KNHK_BUDGETS";
    /// Park targets: rule counter id → [`super::ParkTarget`].
    pub const PARK: &str = "KNHK_PARK";
    /// Per-CPU count of entries ((scope, destination) pairs) inserted into the heat map
    /// (evictions = inserts − entries).
    pub const HEAT_INSERTS: &str = "KNHK_HEAT_INSERTS";
    /// Overflow chunks of trie leaves: [`super::ChunkKey`] → [`super::RuleChunk`].
    pub const LEAF_CHUNKS: &str = "KNHK_LEAF_CHUNKS";
    /// Per-CPU verdict cache: [`super::VerdictSlot`] by hash of (cgroup, destination).
    pub const VERDICTS: &str = "KNHK_VERDICTS";
    /// Parked UDP destinations, to translate replies back: [`super::RevNatKey`] →
    /// [`super::RevNatValue`] (LRU).
    pub const REVNAT: &str = "KNHK_REVNAT";
    /// Verdict events (ring buffer of [`super::VerdictEvent`]).
    pub const EVENTS: &str = "KNHK_EVENTS";
    /// Per rule counter: `bpf_ktime_get_ns()` of the rule's last event (rate limit).
    pub const EVENT_GATE: &str = "KNHK_EVENT_GATE";
    /// Per-CPU event counters, indexed by `EVENT_COUNTER_*`.
    pub const EVENT_COUNTERS: &str = "KNHK_EVENT_COUNTERS";
    /// The rollout split: cgroup id (u64) → side (u32, [`super::SIDE_CANDIDATE`]). Read only
    /// while [`super::Config::candidate`] is set; a cgroup that is absent is on the stable side.
    pub const SPLIT: &str = "KNHK_SPLIT";
    /// Every map, in pin order.
    pub const ALL: [&str; 21] = [
        CONFIG,
        POLICY_V4,
        POLICY_V6,
        SCOPES,
        DECISIONS,
        RULE_HITS,
        HEAT,
        CONNS,
        LATENCY,
        SAMPLED,
        CLASS_STATE,
        PARK,
        BUDGETS,
        HEAT_INSERTS,
        LEAF_CHUNKS,
        VERDICTS,
        REVNAT,
        EVENTS,
        EVENT_GATE,
        EVENT_COUNTERS,
        SPLIT,
    ];
}

/// Program names (the Rust function names in `ebpf/programs`), also used as link pin names.
pub mod program_names {
    /// `cgroup/connect4` admission.
    pub const CONNECT4: &str = "knhk_connect4";
    /// `cgroup/connect6` admission.
    pub const CONNECT6: &str = "knhk_connect6";
    /// `cgroup/sendmsg4` admission of UDP datagrams sent with a destination address.
    pub const SENDMSG4: &str = "knhk_sendmsg4";
    /// `cgroup/sendmsg6` admission of UDP datagrams sent with a destination address.
    pub const SENDMSG6: &str = "knhk_sendmsg6";
    /// `cgroup/recvmsg4`: replies from a parked UDP destination appear to come from the original.
    pub const RECVMSG4: &str = "knhk_recvmsg4";
    /// `cgroup/recvmsg6`: as [`RECVMSG4`] for IPv6 sockets.
    pub const RECVMSG6: &str = "knhk_recvmsg6";
    /// `sockops` latency recorder.
    pub const SOCKOPS: &str = "knhk_sockops";
    /// Every program, in attach order.
    pub const ALL: [&str; 7] = [
        CONNECT4, CONNECT6, SENDMSG4, SENDMSG6, RECVMSG4, RECVMSG6, SOCKOPS,
    ];
}

/// Settings of one policy slot: what a connect sees together with that slot's rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotConfig {
    /// Policy generation written into this slot.
    pub generation: u64,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Action for connects that match no rule (`ACTION_ALLOW` or `ACTION_DENY`).
    pub default_action: u8,
    /// Class for connects that match no rule.
    pub default_class: u8,
    /// Heat is recorded for one decision in `2^heat_sample_shift` (chosen at random), each
    /// sample counting `2^heat_sample_shift` attempts: an unbiased estimate at a fraction of
    /// the cost.
    pub heat_sample_shift: u8,
    /// Padding, always zero (the programs read it as a zero the verifier cannot predict).
    pub _pad: u8,
    /// Shallowest cgroup level that owns a scope in this slot (0 when there are none).
    pub scope_level_min: u32,
    /// Deepest cgroup level that owns a scope in this slot (0 when there are none).
    pub scope_level_max: u32,
    /// Per CPU and class, at most one TCP connect per this many ns is timed for the latency
    /// histograms (0 = every connect). Timing needs per-socket storage, the costliest step of
    /// admission, so under load only a sample is timed; at low rates every connect is.
    pub histogram_interval_ns: u64,
    /// At most one verdict event per rule per this many ns.
    pub event_interval_ns: u64,
}

/// Policy slots. A new generation is written into a free slot and switched in; the slot it
/// replaces is cleared after an RCU grace period. Several slots let back-to-back policy changes
/// proceed without waiting for that grace period. A power of two.
pub const SLOTS: usize = 16;

/// Global settings read by every program on every event (mmapable array map, one entry).
///
/// The agent writes it through a shared mapping: it fills a free slot's [`SlotConfig`]
/// (and that slot's trie and scope entries), then switches `active_slot` with one aligned 32-bit
/// store. A connect reads `active_slot` once, so it sees one whole generation or the other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// ABI version of the agent that wrote this entry.
    pub abi_version: u32,
    /// Policy slot (`0..SLOTS`) that connects use.
    pub active_slot: u32,
    /// Inode (cgroup id) of the cgroup the programs are attached to.
    pub attach_cgroup_id: u64,
    /// Verdict cache epoch: a cached verdict is valid only while this is unchanged. The agent
    /// increments it after every change of the tables connects read (a switch of
    /// `active_slot`, a scope added or removed in place, a change of `candidate` or of the
    /// split table); programs read it before `active_slot`.
    pub epoch: u32,
    /// The rollout: 0 when none is live; otherwise 1 + the slot of the candidate generation,
    /// which judges the connects of cgroups in [`map_names::SPLIT`].
    pub candidate: u32,
    /// Every slot's settings.
    pub slots: [SlotConfig; SLOTS],
}

/// LPM trie key data for IPv4. The trie compares bits from the start of this struct, so the
/// fixed part (`slot`, `scope`) is always matched in full: prefix length = [`LPM_FIXED_BITS`] + the
/// address prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LpmKeyV4 {
    /// Policy slot (`0..SLOTS`).
    pub slot: u32,
    /// Padding, always zero.
    pub _pad: u32,
    /// Cgroup id of the scope that owns the entry; 0 = the global scope.
    pub scope: u64,
    /// Address in network byte order (the bytes as written in the dotted quad).
    pub addr: [u8; 4],
}

/// LPM trie key data for IPv6 (see [`LpmKeyV4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LpmKeyV6 {
    /// Policy slot (`0..SLOTS`).
    pub slot: u32,
    /// Padding, always zero.
    pub _pad: u32,
    /// Cgroup id of the scope that owns the entry; 0 = the global scope.
    pub scope: u64,
    /// Address in network byte order.
    pub addr: [u8; 16],
}

/// Bits of an LPM key before the address: `slot`, `_pad` and `scope`, always matched exactly.
pub const LPM_FIXED_BITS: u32 = 128;

/// One (rule, port range, protocol) candidate at a trie leaf.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleEntry {
    /// First port (host byte order), inclusive.
    pub port_lo: u16,
    /// Last port (host byte order), inclusive.
    pub port_hi: u16,
    /// `PROTO_*`.
    pub proto: u8,
    /// `ACTION_*`.
    pub action: u8,
    /// `CLASS_*`.
    pub class: u8,
    /// Padding, always zero.
    pub _pad: u8,
    /// Index into the rule-hit counters.
    pub counter: u32,
}

/// The value of a trie leaf: every rule entry that covers this prefix, most specific first
/// (deepest scope, then longest prefix, then declaration order). The first entry whose port
/// range and protocol match decides. The first [`LEAF_INLINE_ENTRIES`] are held here; the
/// rest continue, in order, in `chunks` chunks of [`map_names::LEAF_CHUNKS`] numbered from
/// `first_chunk` (in the same slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleLeaf {
    /// Number of valid inline entries.
    pub len: u32,
    /// Id of the first overflow chunk (meaningful when `chunks > 0`).
    pub first_chunk: u32,
    /// Number of overflow chunks, at most [`MAX_LEAF_CHUNKS`].
    pub chunks: u32,
    /// Entries; only the first `len` are meaningful, the rest are zero.
    pub entries: [RuleEntry; LEAF_INLINE_ENTRIES],
}

impl Default for RuleLeaf {
    fn default() -> Self {
        Self {
            len: 0,
            first_chunk: 0,
            chunks: 0,
            entries: [RuleEntry::default(); LEAF_INLINE_ENTRIES],
        }
    }
}

impl RuleLeaf {
    /// The first inline entry matching `port` and `proto`. Mirrors the kernel scan.
    pub fn first_match(&self, port: u16, proto: u8) -> Option<&RuleEntry> {
        let len = (self.len as usize).min(LEAF_INLINE_ENTRIES);
        self.entries[..len].iter().find(|e| e.matches(port, proto))
    }
}

/// Key of an overflow chunk.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    /// Policy slot (`0..SLOTS`).
    pub slot: u32,
    /// Chunk id within the slot (from 1).
    pub id: u32,
}

/// An overflow chunk: the continuation of a leaf's entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleChunk {
    /// Number of valid entries.
    pub len: u32,
    /// Entries; only the first `len` are meaningful.
    pub entries: [RuleEntry; CHUNK_ENTRIES],
}

impl Default for RuleChunk {
    fn default() -> Self {
        Self {
            len: 0,
            entries: [RuleEntry::default(); CHUNK_ENTRIES],
        }
    }
}

impl RuleChunk {
    /// The first entry matching `port` and `proto`. Mirrors the kernel scan.
    pub fn first_match(&self, port: u16, proto: u8) -> Option<&RuleEntry> {
        let len = (self.len as usize).min(CHUNK_ENTRIES);
        self.entries[..len].iter().find(|e| e.matches(port, proto))
    }
}

/// A decision as the verdict cache and the events carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// `ACTION_*` of the deciding rule (or the default), before enforce/audit mode applies.
    pub action: u8,
    /// `CLASS_*`.
    pub class: u8,
    /// `SIDE_*`: the generation that decided (stable, or a rollout's candidate).
    pub side: u8,
    /// Padding, always zero.
    pub _pad: u8,
    /// Rule-hit counter of the deciding rule; 0 = no rule matched.
    pub counter: u32,
}

impl Verdict {
    /// Packed into one word (as the cache stores it).
    #[inline(always)]
    pub fn to_word(self) -> u64 {
        self.action as u64
            | (self.class as u64) << 8
            | (self.side as u64) << 16
            | (self.counter as u64) << 32
    }

    /// Unpacked from [`Verdict::to_word`].
    #[inline(always)]
    pub fn from_word(w: u64) -> Self {
        Verdict {
            action: w as u8,
            class: (w >> 8) as u8,
            side: (w >> 16) as u8,
            _pad: 0,
            counter: (w >> 32) as u32,
        }
    }
}

/// One slot of the per-CPU verdict cache: (cgroup, destination, port, protocol) at an epoch →
/// verdict. `check` is [`verdict_check`] of the rest, so a slot torn by a concurrent writer
/// reads as a miss, never as a wrong verdict. 64 bytes: a set of two is two cache lines.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictSlot {
    /// Cgroup id of the caller.
    pub cgroup_id: u64,
    /// Destination (IPv4 as `::ffff:a.b.c.d`), network byte order, as two words.
    pub addr: [u64; 2],
    /// `port << 48 | proto << 40 | epoch`.
    pub meta: u64,
    /// [`Verdict::to_word`].
    pub verdict: u64,
    /// [`verdict_check`].
    pub check: u64,
    /// The deciding scope's cgroup id (0: the global scope), for heat.
    pub scope: u64,
    /// Padding, always zero.
    pub _pad: u64,
}

/// `meta` of a [`VerdictSlot`].
#[inline(always)]
pub fn verdict_meta(port: u16, proto: u8, epoch: u32) -> u64 {
    (port as u64) << 48 | (proto as u64) << 40 | epoch as u64
}

#[inline(always)]
fn mix(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
}

/// Hash of a cache key; its top bits index the cache.
#[inline(always)]
pub fn verdict_hash(cgroup_id: u64, addr: &[u64; 2], meta: u64) -> u64 {
    let h = mix(mix(mix(cgroup_id, addr[0]), addr[1]), meta);
    h ^ (h >> 32)
}

/// The first slot of the cache set of a key hash.
#[inline(always)]
pub fn verdict_index(hash: u64) -> u32 {
    hash as u32 & (VERDICT_CACHE_SLOTS - 1) & !(VERDICT_CACHE_WAYS - 1)
}

/// The `check` word of a slot holding `verdict_word` and `scope` for a key of hash `hash`.
#[inline(always)]
pub fn verdict_check(hash: u64, verdict_word: u64, scope: u64) -> u64 {
    mix(mix(hash, verdict_word), scope) | 1
}

/// Key of the reverse-translation table: a parked UDP socket and the park target it sends to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    /// `bpf_get_socket_cookie()` of the socket.
    pub cookie: u64,
    /// The park target (IPv4 as `::ffff:a.b.c.d`), network byte order.
    pub addr: [u8; 16],
    /// The park target's port, network byte order.
    pub port_be: u32,
    /// Padding, always zero.
    pub _pad: u32,
}

/// Value of the reverse-translation table: the destination the application sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatValue {
    /// Original destination (IPv4 as `::ffff:a.b.c.d`), network byte order.
    pub addr: [u8; 16],
    /// Original port, network byte order.
    pub port_be: u32,
    /// Padding, always zero.
    pub _pad: u32,
}

/// The hook a decision was made at (`VerdictEvent::hook`).
pub const HOOK_CONNECT4: u8 = 0;
/// `cgroup/connect6`.
pub const HOOK_CONNECT6: u8 = 1;
/// `cgroup/sendmsg4`.
pub const HOOK_SENDMSG4: u8 = 2;
/// `cgroup/sendmsg6`.
pub const HOOK_SENDMSG6: u8 = 3;

/// One verdict, sent to userspace for decisions other than allow, at most one per rule per
/// `SlotConfig::event_interval_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictEvent {
    /// `bpf_ktime_get_ns()` of the decision.
    pub time_ns: u64,
    /// Cgroup id of the caller.
    pub cgroup_id: u64,
    /// Policy generation that decided.
    pub generation: u64,
    /// Destination (IPv4 as `::ffff:a.b.c.d`), network byte order.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// IPPROTO number.
    pub proto: u8,
    /// `ACTION_*` taken (after mode and SLO admission).
    pub action: u8,
    /// Rule-hit counter of the deciding rule; 0 = no rule matched.
    pub counter: u32,
    /// `CLASS_*`.
    pub class: u8,
    /// `HOOK_*`.
    pub hook: u8,
    /// Padding, always zero.
    pub _pad: [u8; 6],
}

/// `EVENT_COUNTERS` index: events written to the ring.
pub const EVENT_COUNTER_SENT: u32 = 0;
/// `EVENT_COUNTERS` index: events lost because the ring was full.
pub const EVENT_COUNTER_DROPPED: u32 = 1;
/// `EVENT_COUNTERS` index: events not sent because of the per-rule rate limit.
pub const EVENT_COUNTER_SUPPRESSED: u32 = 2;
/// Number of event counters.
pub const EVENT_COUNTERS: u32 = 3;

impl RuleEntry {
    /// Whether this entry covers `port` (host byte order) and `proto` (IPPROTO number).
    #[inline(always)]
    pub fn matches(&self, port: u16, proto: u8) -> bool {
        port >= self.port_lo
            && port <= self.port_hi
            && (self.proto == PROTO_ANY || self.proto == proto)
    }
}

/// Key of the scope table: a cgroup that owns rules, in one policy slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ScopeKey {
    /// Cgroup id (the inode number of the cgroup v2 directory).
    pub cgroup_id: u64,
    /// Policy slot (`0..SLOTS`).
    pub slot: u32,
    /// Padding, always zero.
    pub _pad: u32,
}

/// Value of the scope table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScopeValue {
    /// Level of the cgroup below the hierarchy root (root = 0).
    pub level: u32,
    /// Padding, always zero.
    pub _pad: u32,
}

/// Where a degraded class's connects matching a rule are parked (the lower tier).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParkTarget {
    /// 4 or 6.
    pub family: u32,
    /// Port, network byte order (as `user_port` holds it).
    pub port_be: u32,
    /// IPv4 in the first 4 bytes, or IPv6; network byte order.
    pub addr: [u8; 16],
}

/// Key of the heat map: a destination, attributed to the scope that decided the connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HeatKey {
    /// Cgroup id of the deciding scope (the deepest cgroup owning rules among the caller's
    /// ancestors, as the admission lookup found it); 0 for the global scope.
    pub scope: u64,
    /// IPv6 address, or an IPv4-mapped one (`::ffff:a.b.c.d`), network byte order.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// IPPROTO number.
    pub proto: u8,
    /// Padding, always zero.
    pub _pad: [u8; 5],
}

/// Value of the heat map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeatValue {
    /// Connect attempts since the entry was created.
    pub attempts: u64,
    /// `bpf_ktime_get_ns()` of the latest attempt (CLOCK_MONOTONIC).
    pub last_seen_ns: u64,
}

/// TCP connect state, stored on the socket itself (socket-local storage).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// `bpf_ktime_get_ns()` when `connect()` was called.
    pub start_ns: u64,
    /// Runtime class of the rule that admitted it.
    pub class: u8,
    /// `SIDE_*` of the generation that admitted it.
    pub side: u8,
    /// Padding, always zero.
    pub _pad: [u8; 6],
}

/// Latency kinds recorded by `sockops`.
pub const LATENCY_HANDSHAKE: usize = 0;
/// Smoothed RTT samples.
pub const LATENCY_RTT: usize = 1;
/// Number of latency kinds.
pub const LATENCY_KINDS: usize = 2;
/// Number of histograms in the latency map (per side, kind and class).
pub const HISTOGRAMS: usize = SIDES * LATENCY_KINDS * CLASSES;

/// Log-linear (HDR-style) bucketing: values below `2^SUB_BITS` get one bucket each; above, each
/// power of two is split into `2^SUB_BITS` equal buckets, so a bucket's width is at most 1/32 of
/// its lower edge (a relative error under 3.2%, half that from the midpoint).
pub const SUB_BITS: u32 = 5;
/// Sub-buckets per power of two.
pub const SUB_BUCKETS: usize = 1 << SUB_BITS;
/// Values at or above `2^MAX_EXP` ns (about 18 minutes) land in the last bucket.
pub const MAX_EXP: u32 = 40;
/// Buckets per histogram.
pub const BUCKETS: usize = (MAX_EXP - SUB_BITS + 1) as usize * SUB_BUCKETS;

/// One latency histogram (per CPU, per class, per kind). Values are nanoseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Histogram {
    /// Samples recorded.
    pub count: u64,
    /// Sum of the recorded values (ns), saturating at `u64::MAX` in practice never reached.
    pub sum_ns: u64,
    /// Bucket counts; see [`bucket_of`].
    pub buckets: [u64; BUCKETS],
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            count: 0,
            sum_ns: 0,
            buckets: [0; BUCKETS],
        }
    }
}

/// The bucket holding `value_ns`. Total: every u64 maps to a bucket below [`BUCKETS`].
#[inline(always)]
pub fn bucket_of(value_ns: u64) -> usize {
    if value_ns < SUB_BUCKETS as u64 {
        return value_ns as usize;
    }
    if value_ns >= 1u64 << MAX_EXP {
        return BUCKETS - 1;
    }
    // exp = index of the highest set bit, in SUB_BITS..MAX_EXP.
    let exp = 63 - value_ns.leading_zeros();
    let sub = (value_ns >> (exp - SUB_BITS)) as usize & (SUB_BUCKETS - 1);
    (exp - SUB_BITS + 1) as usize * SUB_BUCKETS + sub
}

/// The lowest value (ns) that lands in `bucket`.
pub fn bucket_lower_bound(bucket: usize) -> u64 {
    if bucket < SUB_BUCKETS {
        return bucket as u64;
    }
    let exp = (bucket / SUB_BUCKETS) as u32 - 1 + SUB_BITS;
    let sub = (bucket % SUB_BUCKETS) as u64;
    (1u64 << exp) + (sub << (exp - SUB_BITS))
}

/// The first value (ns) past `bucket` (its exclusive upper edge).
pub fn bucket_upper_bound(bucket: usize) -> u64 {
    if bucket + 1 >= BUCKETS {
        return u64::MAX;
    }
    bucket_lower_bound(bucket + 1)
}

/// Index of a histogram in the latency map. `side` is masked to a valid side.
#[inline(always)]
pub fn histogram_index(side: u8, kind: usize, class: u8) -> u32 {
    (((side as usize & 1) * LATENCY_KINDS + kind) * CLASSES + class as usize) as u32
}

/// Index of a decision counter in the decisions map. `side` is masked to a valid side.
#[inline(always)]
pub fn decision_index(side: u8, action: u8, class: u8) -> u32 {
    ((side as u32 & 1) * ACTIONS as u32 + action as u32) * CLASSES as u32 + class as u32
}

/// Number of decision counters (per side, action and class).
pub const DECISION_COUNTERS: u32 = (SIDES * ACTIONS * CLASSES) as u32;

/// Index of a histogram-sampling clock in [`map_names::SAMPLED`].
#[inline(always)]
pub fn sampled_index(side: u8, class: u8) -> u32 {
    (side as u32 & 1) * CLASSES as u32 + class as u32
}

/// Number of histogram-sampling clocks (per side and class).
pub const SAMPLED_CLOCKS: u32 = (SIDES * CLASSES) as u32;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is `#[repr(C)]`, `Copy`, made only of integers and integer arrays, with
    // explicit padding fields, so any bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for SlotConfig {}
    unsafe impl aya::Pod for LpmKeyV4 {}
    unsafe impl aya::Pod for LpmKeyV6 {}
    unsafe impl aya::Pod for RuleEntry {}
    unsafe impl aya::Pod for RuleLeaf {}
    unsafe impl aya::Pod for ScopeKey {}
    unsafe impl aya::Pod for ScopeValue {}
    unsafe impl aya::Pod for HeatKey {}
    unsafe impl aya::Pod for ParkTarget {}
    unsafe impl aya::Pod for ClassControl {}
    unsafe impl aya::Pod for HeatValue {}
    unsafe impl aya::Pod for ConnState {}
    unsafe impl aya::Pod for Histogram {}
    unsafe impl aya::Pod for ChunkKey {}
    unsafe impl aya::Pod for RuleChunk {}
    unsafe impl aya::Pod for VerdictSlot {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for VerdictEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layouts_are_pinned() {
        assert_eq!(size_of::<SlotConfig>(), 40);
        assert_eq!(offset_of!(SlotConfig, flags), 8);
        assert_eq!(offset_of!(SlotConfig, default_action), 12);
        assert_eq!(offset_of!(SlotConfig, scope_level_min), 16);
        assert_eq!(size_of::<Config>(), 24 + 40 * SLOTS);
        assert_eq!(offset_of!(Config, epoch), 16);
        assert_eq!(offset_of!(Config, candidate), 20);
        assert_eq!(SIDES, 2);
        assert_eq!(
            decision_index(SIDE_CANDIDATE, 0, 0),
            (ACTIONS * CLASSES) as u32
        );
        assert_eq!(
            decision_index(1, ACTIONS as u8 - 1, 2),
            DECISION_COUNTERS - 1
        );
        assert_eq!(
            histogram_index(1, LATENCY_KINDS - 1, 2),
            HISTOGRAMS as u32 - 1
        );
        assert_eq!(sampled_index(1, 2), SAMPLED_CLOCKS - 1);
        assert!(SLOTS.is_power_of_two());
        assert_eq!(offset_of!(Config, active_slot), 4);
        assert_eq!(offset_of!(Config, attach_cgroup_id), 8);
        assert_eq!(offset_of!(Config, slots), 24);
        assert_eq!(size_of::<LpmKeyV4>(), 24);
        assert_eq!(offset_of!(LpmKeyV4, addr), 16);
        assert_eq!(size_of::<LpmKeyV6>(), 32);
        assert_eq!(offset_of!(LpmKeyV6, addr), 16);
        assert_eq!(LPM_FIXED_BITS as usize, offset_of!(LpmKeyV4, addr) * 8);
        assert_eq!(size_of::<RuleEntry>(), 12);
        assert_eq!(size_of::<RuleLeaf>(), 12 + 12 * LEAF_INLINE_ENTRIES);
        assert_eq!(size_of::<RuleChunk>(), 4 + 12 * CHUNK_ENTRIES);
        assert_eq!(MAX_LEAF_ENTRIES, 1024);
        assert_eq!(size_of::<VerdictSlot>(), 64);
        assert!(VERDICT_CACHE_SLOTS.is_power_of_two());
        assert_eq!(size_of::<RevNatKey>(), 32);
        assert_eq!(size_of::<RevNatValue>(), 24);
        assert_eq!(size_of::<VerdictEvent>(), 56);
        assert_eq!(size_of::<Verdict>(), 8);
        assert_eq!(size_of::<ScopeKey>(), 16);
        assert_eq!(size_of::<ScopeValue>(), 8);
        assert_eq!(size_of::<HeatKey>(), 32);
        assert_eq!(offset_of!(HeatKey, addr), 8);
        assert_eq!(offset_of!(HeatKey, port), 24);
        assert_eq!(offset_of!(HeatKey, proto), 26);
        assert_eq!(offset_of!(VerdictSlot, scope), 48);
        assert_eq!(size_of::<ParkTarget>(), 24);
        assert_eq!(size_of::<ClassControl>(), 24);
        assert_eq!(size_of::<HeatValue>(), 16);
        assert_eq!(size_of::<ConnState>(), 16);
        assert_eq!(size_of::<Histogram>(), 16 + 8 * BUCKETS);
        // Per-CPU map values are limited to 32 KiB by the kernel.
        assert!(size_of::<Histogram>() <= 32 * 1024);
    }

    #[test]
    fn buckets_are_monotonic_and_contiguous() {
        assert_eq!(BUCKETS, 1152);
        let mut prev = 0;
        for b in 0..BUCKETS {
            let lo = bucket_lower_bound(b);
            assert!(b == 0 || lo > prev, "bucket {b} does not grow");
            assert_eq!(bucket_of(lo), b, "lower edge of {b}");
            if b + 1 < BUCKETS {
                assert_eq!(bucket_of(bucket_upper_bound(b) - 1), b, "upper edge of {b}");
            }
            prev = lo;
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_of(0), 0);
    }

    #[test]
    fn bucket_relative_width_is_bounded() {
        for b in SUB_BUCKETS..BUCKETS - 1 {
            let (lo, hi) = (bucket_lower_bound(b), bucket_upper_bound(b));
            assert!((hi - lo) * 32 <= lo, "bucket {b}: [{lo}, {hi})");
        }
    }

    #[test]
    fn leaf_scan_takes_the_first_matching_entry() {
        let mut leaf = RuleLeaf::default();
        leaf.entries[0] = RuleEntry {
            port_lo: 80,
            port_hi: 80,
            proto: PROTO_TCP,
            action: ACTION_DENY,
            counter: 1,
            ..Default::default()
        };
        leaf.entries[1] = RuleEntry {
            port_lo: 0,
            port_hi: u16::MAX,
            proto: PROTO_ANY,
            action: ACTION_ALLOW,
            counter: 2,
            ..Default::default()
        };
        leaf.len = 2;
        assert_eq!(leaf.first_match(80, PROTO_TCP).map(|e| e.counter), Some(1));
        assert_eq!(leaf.first_match(80, PROTO_UDP).map(|e| e.counter), Some(2));
        assert_eq!(leaf.first_match(81, PROTO_TCP).map(|e| e.counter), Some(2));
        leaf.len = 0;
        assert_eq!(leaf.first_match(80, PROTO_TCP), None);
    }
}
