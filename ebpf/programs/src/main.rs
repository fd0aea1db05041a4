//! knhk's kernel programs.
//!
//! - `knhk_connect4` / `knhk_connect6` (`cgroup/connect4`, `cgroup/connect6`): connection
//!   admission of every `connect()` (TCP, UDP, TCP Fast Open's `sendto(MSG_FASTOPEN)`): allow,
//!   refuse with EPERM, or count as audit; SLO admission (shed, park, lower priority, budgets);
//!   heat; the handshake clock.
//! - `knhk_sendmsg4` / `knhk_sendmsg6` (`cgroup/sendmsg4`, `cgroup/sendmsg6`): the same decision
//!   for every UDP datagram sent with a destination address (`sendto()`/`sendmsg()`, connected
//!   or not), so a UDP deny rule cannot be bypassed without `connect()`.
//! - `knhk_recvmsg4` / `knhk_recvmsg6`: replies from a parked UDP destination appear to come
//!   from the address the application sent to.
//! - `knhk_sockops` (`sockops`): handshake latency (connect to ESTABLISHED) and RTT samples into
//!   per-CPU log-linear histograms keyed by runtime class.
//!
//! A decision: the per-CPU verdict cache, keyed by (cgroup, destination, port, protocol) at the
//! current epoch; on a miss, the side of the caller's cgroup (the rollout split: the candidate
//! slot for cgroups in `KNHK_SPLIT` while a rollout is live, else the active slot), then that
//! slot's policy (deepest owning cgroup scope, longest destination prefix, then port range and
//! protocol), and the result, with its side, is cached. Counters and histograms are per side. Decisions other
//! than allow are sent to userspace as events, at most one per rule per interval.
//!
//! Map layouts and constants come from `knhk-abi`; nothing here defines its own ABI. Each entry
//! point is a thin wrapper around a `try_` function.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_SOCK_OPS_RTT_CB_FLAG},
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_prandom_u32,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_setsockopt, bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use knhk_abi::*;

const ALLOWED: i32 = 1;
const REFUSED: i32 = 0;

#[map(name = "KNHK_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, BPF_F_MMAPABLE);
#[map(name = "KNHK_POLICY_V4")]
static POLICY_V4: LpmTrie<LpmKeyV4, RuleLeaf> = LpmTrie::pinned(MAX_PREFIXES, 0);
#[map(name = "KNHK_POLICY_V6")]
static POLICY_V6: LpmTrie<LpmKeyV6, RuleLeaf> = LpmTrie::pinned(MAX_PREFIXES, 0);
#[map(name = "KNHK_LEAF_CHUNKS")]
static LEAF_CHUNKS: HashMap<ChunkKey, RuleChunk> = HashMap::pinned(MAX_CHUNKS, BPF_F_NO_PREALLOC);
#[map(name = "KNHK_SCOPES")]
static SCOPES: HashMap<ScopeKey, ScopeValue> = HashMap::pinned(MAX_SCOPES, 0);
#[map(name = "KNHK_VERDICTS")]
static VERDICTS: PerCpuArray<VerdictSlot> = PerCpuArray::pinned(VERDICT_CACHE_SLOTS, 0);
#[map(name = "KNHK_DECISIONS")]
static DECISIONS: PerCpuArray<u64> = PerCpuArray::pinned(DECISION_COUNTERS, 0);
#[map(name = "KNHK_RULE_HITS")]
static RULE_HITS: Array<u64> = Array::pinned(MAX_RULE_COUNTERS, BPF_F_MMAPABLE);
#[map(name = "KNHK_HEAT")]
static HEAT: LruHashMap<HeatKey, HeatValue> = LruHashMap::pinned(DEFAULT_HEAT_MAX_ENTRIES, 0);
/// Per-socket state of TCP connects (socket storage: lives and dies with the socket, no hashing).
#[btf_map(name = "KNHK_CONNS")]
static CONNS: SkStorage<ConnState> = SkStorage::new();
#[map(name = "KNHK_CLASS_STATE")]
static CLASS_STATE: Array<ClassControl> = Array::pinned(CLASSES as u32, BPF_F_MMAPABLE);
#[map(name = "KNHK_BUDGETS")]
static BUDGETS: Array<i64> = Array::pinned(CLASSES as u32, BPF_F_MMAPABLE);
#[map(name = "KNHK_PARK")]
static PARK: HashMap<u32, ParkTarget> = HashMap::pinned(MAX_PARK_TARGETS, 0);
#[map(name = "KNHK_REVNAT")]
static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(MAX_REVNAT, 0);
#[map(name = "KNHK_HEAT_INSERTS")]
static HEAT_INSERTS: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);
#[map(name = "KNHK_SAMPLED")]
static SAMPLED: PerCpuArray<u64> = PerCpuArray::pinned(SAMPLED_CLOCKS, 0);
#[map(name = "KNHK_LATENCY")]
static LATENCY: PerCpuArray<Histogram> = PerCpuArray::pinned(HISTOGRAMS as u32, 0);
#[map(name = "KNHK_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);
#[map(name = "KNHK_EVENT_GATE")]
static EVENT_GATE: Array<u64> = Array::pinned(MAX_RULE_COUNTERS, 0);
#[map(name = "KNHK_SPLIT")]
static SPLIT: HashMap<u64, u32> = HashMap::pinned(MAX_SPLIT_CGROUPS, 0);
#[map(name = "KNHK_EVENT_COUNTERS")]
static EVENT_COUNTS: PerCpuArray<u64> = PerCpuArray::pinned(knhk_abi::EVENT_COUNTERS, 0);

/// A destination as every hook sees it: IPv4 as `::ffff:a.b.c.d`.
struct Dest {
    addr: [u8; 16],
    port: u16,
    proto: u8,
    /// IPv4 (native or mapped): judged by the IPv4 policy.
    v4: bool,
}

impl Dest {
    #[inline(always)]
    fn v4(sa: &aya_ebpf::bindings::bpf_sock_addr) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&sa.user_ip4.to_ne_bytes());
        Dest { addr, port: u16::from_be(sa.user_port as u16), proto: sa.protocol as u8, v4: true }
    }

    #[inline(always)]
    fn v6(sa: &aya_ebpf::bindings::bpf_sock_addr) -> Self {
        let words = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
        let mut addr = [0u8; 16];
        addr[0..4].copy_from_slice(&words[0].to_ne_bytes());
        addr[4..8].copy_from_slice(&words[1].to_ne_bytes());
        addr[8..12].copy_from_slice(&words[2].to_ne_bytes());
        addr[12..16].copy_from_slice(&words[3].to_ne_bytes());
        // An IPv4-mapped destination (::ffff:a.b.c.d, dual-stack sockets) is judged by the IPv4
        // policy.
        let v4 = words[0] == 0 && words[1] == 0 && u32::from_be(words[2]) == 0xffff;
        Dest { addr, port: u16::from_be(sa.user_port as u16), proto: sa.protocol as u8, v4 }
    }

    #[inline(always)]
    fn words(&self) -> [u64; 2] {
        let a = &self.addr;
        [
            u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
            u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
        ]
    }
}

#[cgroup_sock_addr(connect4)]
pub fn knhk_connect4(ctx: SockAddrContext) -> i32 {
    let d = Dest::v4(unsafe { &*ctx.sock_addr });
    judge::<false, false>(&ctx, &d, HOOK_CONNECT4)
}

#[cgroup_sock_addr(connect6)]
pub fn knhk_connect6(ctx: SockAddrContext) -> i32 {
    let d = Dest::v6(unsafe { &*ctx.sock_addr });
    judge::<true, false>(&ctx, &d, HOOK_CONNECT6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn knhk_sendmsg4(ctx: SockAddrContext) -> i32 {
    let d = Dest::v4(unsafe { &*ctx.sock_addr });
    judge::<false, true>(&ctx, &d, HOOK_SENDMSG4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn knhk_sendmsg6(ctx: SockAddrContext) -> i32 {
    let d = Dest::v6(unsafe { &*ctx.sock_addr });
    judge::<true, true>(&ctx, &d, HOOK_SENDMSG6)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn knhk_recvmsg4(ctx: SockAddrContext) -> i32 {
    unpark_reply::<false>(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn knhk_recvmsg6(ctx: SockAddrContext) -> i32 {
    unpark_reply::<true>(&ctx);
    1
}

#[sock_ops]
pub fn knhk_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx);
    1
}

/// Decides one connect or datagram and applies the decision; returns the program's return code.
#[inline(always)]
fn judge<const V6: bool, const SEND: bool>(ctx: &SockAddrContext, d: &Dest, hook: u8) -> i32 {
    // With no config the agent has not finished loading: admit.
    let Some(cfg) = CONFIG.get(0) else {
        return ALLOWED;
    };
    // The epoch is read before the slots: a verdict cached under this epoch was computed from
    // the slots (and split) in effect during it (the agent switches first, then bumps the epoch).
    let epoch = unsafe { core::ptr::read_volatile(&cfg.epoch) };
    let active = unsafe { core::ptr::read_volatile(&cfg.active_slot) } & (SLOTS as u32 - 1);
    let candidate = unsafe { core::ptr::read_volatile(&cfg.candidate) };
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let (verdict, slot, scope) = cached_decision(cgroup, epoch, active, candidate, cfg, d);
    admit::<V6, SEND>(ctx, &cfg.slots[slot as usize], verdict, d, cgroup, scope, hook)
}

/// The slot that judges `side`: the candidate's while a rollout is live, else the active one.
#[inline(always)]
fn slot_of(side: u8, active: u32, candidate: u32) -> u32 {
    if side == SIDE_CANDIDATE && candidate != 0 {
        (candidate - 1) & (SLOTS as u32 - 1)
    } else {
        active
    }
}

/// The verdict for `d` from `cgroup`, the slot that decided it and the deciding scope (0: the
/// global scope): from the per-CPU cache (the cached word carries the side, the slot the scope, so
/// a hit needs no split or scope lookup), or looked up and cached.
///
/// On a miss the side comes from the split table, and the slot with it. The verifier must not
/// see the side as a constant on the way into `lookup` (it would then verify that costly path
/// once per side): it is read from map memory on both branches (the split table's value, or a
/// padding byte of the config that the agent always writes as zero), and never branched on.
#[inline(always)]
fn cached_decision(
    cgroup: u64,
    epoch: u32,
    active: u32,
    candidate: u32,
    cfg: &Config,
    d: &Dest,
) -> (Verdict, u32, u64) {
    let words = d.words();
    let meta = verdict_meta(d.port, d.proto, epoch);
    let hash = verdict_hash(cgroup, &words, meta);
    let first = verdict_index(hash);
    // The set's two slots: a hit in either; on a miss, a slot of an older epoch (or empty) is
    // replaced first, else the one the hash picks.
    let mut victim = None;
    for way in 0..VERDICT_CACHE_WAYS {
        let Some(e) = VERDICTS.get_ptr_mut(first + way) else {
            continue;
        };
        let s = unsafe { &*e };
        let (word, scope) = (s.verdict, s.scope);
        if s.meta == meta
            && s.cgroup_id == cgroup
            && s.addr[0] == words[0]
            && s.addr[1] == words[1]
            && s.check == verdict_check(hash, word, scope)
        {
            let v = Verdict::from_word(word);
            return (v, slot_of(v.side, active, candidate), scope);
        }
        if victim.is_none() && (s.meta as u32) != epoch {
            victim = Some(e);
        }
    }
    let opaque_zero = unsafe { core::ptr::read_volatile(&cfg.slots[0]._pad) } & 1;
    let split = if candidate != 0 { unsafe { SPLIT.get(&cgroup) } } else { None };
    let (side, slot) = match split {
        Some(v) => ((*v as u8) & 1, (candidate - 1) & (SLOTS as u32 - 1)),
        None => (opaque_zero, active),
    };
    let (mut verdict, scope) = lookup(slot, &cfg.slots[slot as usize], d);
    verdict.side = side;
    let victim = victim.or_else(|| VERDICTS.get_ptr_mut(first + ((hash >> 40) as u32 & (VERDICT_CACHE_WAYS - 1))));
    if let Some(e) = victim {
        let word = verdict.to_word();
        // SAFETY: a per-CPU slot; a writer preempted mid-way leaves a slot whose check fails.
        unsafe {
            (*e).cgroup_id = cgroup;
            (*e).addr = words;
            (*e).meta = meta;
            (*e).verdict = word;
            (*e).scope = scope;
            (*e).check = verdict_check(hash, word, scope);
        }
    }
    (verdict, slot, scope)
}

/// The policy's verdict: the deepest owning scope's trie, longest prefix, first matching entry;
/// and that scope.
#[inline(always)]
fn lookup(slot: u32, sc: &SlotConfig, d: &Dest) -> (Verdict, u64) {
    let scope = owning_scope(slot, sc);
    let leaf = if d.v4 {
        let key = Key::new(
            LPM_FIXED_BITS + 32,
            LpmKeyV4 { slot, _pad: 0, scope, addr: [d.addr[12], d.addr[13], d.addr[14], d.addr[15]] },
        );
        POLICY_V4.get(&key)
    } else {
        let key = Key::new(LPM_FIXED_BITS + 128, LpmKeyV6 { slot, _pad: 0, scope, addr: d.addr });
        POLICY_V6.get(&key)
    };
    let default = Verdict { action: sc.default_action, class: sc.default_class, side: 0, _pad: 0, counter: 0 };
    let Some(leaf) = leaf else {
        return (default, scope);
    };
    if let Some(v) = scan(&leaf.entries, leaf.len, d) {
        return (v, scope);
    }
    let (first, chunks) = (leaf.first_chunk, leaf.chunks);
    for i in 0..MAX_LEAF_CHUNKS {
        if i >= chunks {
            break;
        }
        let key = ChunkKey { slot, id: first.wrapping_add(i) };
        let Some(chunk) = (unsafe { LEAF_CHUNKS.get(&key) }) else {
            break;
        };
        if let Some(v) = scan(&chunk.entries, chunk.len, d) {
            return (v, scope);
        }
    }
    (default, scope)
}

/// The first of the first `len` entries that matches `d`'s port and protocol.
#[inline(always)]
fn scan(entries: &[RuleEntry; LEAF_INLINE_ENTRIES], len: u32, d: &Dest) -> Option<Verdict> {
    const _: () = assert!(CHUNK_ENTRIES == LEAF_INLINE_ENTRIES, "one scan for leaves and chunks");
    for i in 0..LEAF_INLINE_ENTRIES {
        if i as u32 >= len {
            break;
        }
        let e = &entries[i];
        if e.matches(d.port, d.proto) {
            return Some(Verdict { action: e.action, class: e.class, side: 0, _pad: 0, counter: e.counter });
        }
    }
    None
}

/// The deepest cgroup (an ancestor of the caller, or the caller itself) that owns rules in the
/// active slot, or 0 (the global scope). Only levels that hold scopes are probed.
#[inline(always)]
fn owning_scope(slot: u32, cfg: &SlotConfig) -> u64 {
    let (min, max) = (cfg.scope_level_min, cfg.scope_level_max);
    if max == 0 {
        return 0;
    }
    let mut level = max;
    for _ in 0..MAX_SCOPE_LEVEL {
        if level < min || level == 0 {
            break;
        }
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id != 0 {
            let key = ScopeKey { cgroup_id: id, slot, _pad: 0 };
            if unsafe { SCOPES.get(&key) }.is_some() {
                return id;
            }
        }
        level -= 1;
    }
    0
}

/// Applies a verdict: mode, SLO admission, counters, heat (attributed to `scope`, the deciding
/// scope), events, the handshake clock. `SEND`: a datagram (no budget is spent, no handshake is
/// timed).
#[inline(always)]
fn admit<const V6: bool, const SEND: bool>(
    ctx: &SockAddrContext,
    sc: &SlotConfig,
    verdict: Verdict,
    d: &Dest,
    cgroup: u64,
    scope: u64,
    hook: u8,
) -> i32 {
    let mut action = verdict.action;
    if action == ACTION_DENY && sc.flags & FLAG_ENFORCE == 0 {
        action = ACTION_AUDIT;
    }
    let class = if (verdict.class as usize) < CLASSES { verdict.class } else { CLASS_C1 };
    // One clock read per decision at most, shared by the SLO, heat, event and histogram paths.
    let mut clock = Clock(0);
    // SLO admission (enforce mode only): a paused class's admitted connects are shed; a
    // degraded class's are parked on their rule's park target, if it has one. A normal class
    // spends its per-beat budget (connects only); past it, the class's over-budget state applies.
    if action != ACTION_DENY && sc.flags & FLAG_ENFORCE != 0 {
        if let Some(ctl) = CLASS_STATE.get(class as u32) {
            let mut state = unsafe { core::ptr::read_volatile(&ctl.state) };
            let mut budget = if SEND { None } else { BUDGETS.get_ptr_mut(class as u32) };
            if let Some(b) = budget {
                if unsafe { core::ptr::read_volatile(b) } == BUDGET_UNLIMITED {
                    budget = None;
                }
            }
            if state != STATE_NORMAL || budget.is_some() {
                // Fail open on stale decisions: the agent stopped beating.
                let stale_after = unsafe { core::ptr::read_volatile(&ctl.stale_after_ns) };
                let heartbeat = unsafe { core::ptr::read_volatile(&ctl.heartbeat_ns) };
                if stale_after != 0 && clock.now().wrapping_sub(heartbeat) > stale_after {
                    state = STATE_NORMAL;
                    budget = None;
                }
            }
            if state == STATE_NORMAL {
                if let Some(b) = budget {
                    // Spend one, then look: a connect that took the budget below zero always
                    // sees it below zero, so no more than the budget is ever admitted per beat.
                    unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(b, -1) };
                    if unsafe { core::ptr::read_volatile(b) } < 0 {
                        state = unsafe { core::ptr::read_volatile(&ctl.over_budget) };
                    }
                }
            }
            match state {
                STATE_PAUSED => action = ACTION_SHED,
                STATE_DEGRADED => {
                    let target =
                        if verdict.counter != 0 { unsafe { PARK.get(&verdict.counter) } } else { None };
                    let parked = match target {
                        Some(t) => park::<V6>(ctx, t, d),
                        None => false,
                    };
                    if parked {
                        action = ACTION_PARK;
                    } else if !SEND {
                        lower_priority(ctx);
                    }
                }
                _ => {}
            }
        }
    }

    if let Some(n) = DECISIONS.get_ptr_mut(decision_index(verdict.side, action, class)) {
        unsafe { *n += 1 };
    }
    if let Some(n) = RULE_HITS.get_ptr_mut(verdict.counter) {
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1) };
    }
    if sc.flags & FLAG_HEAT != 0 {
        let shift = (sc.heat_sample_shift & 15) as u32;
        if shift == 0 || unsafe { bpf_get_prandom_u32() } & ((1u32 << shift) - 1) == 0 {
            record_heat(scope, d, clock.now(), 1u64 << shift);
        }
    }
    if action != ACTION_ALLOW && sc.flags & FLAG_EVENTS != 0 {
        send_event(sc, verdict.counter, action, class, d, cgroup, hook, clock.now());
    }
    if action == ACTION_DENY || action == ACTION_SHED {
        return REFUSED;
    }
    if !SEND && sc.flags & FLAG_HISTOGRAMS != 0 && d.proto == PROTO_TCP {
        let now = clock.now();
        let Some(last) = SAMPLED.get_ptr_mut(sampled_index(verdict.side, class)) else {
            return ALLOWED;
        };
        if now.wrapping_sub(unsafe { *last }) < sc.histogram_interval_ns {
            return ALLOWED;
        }
        unsafe { *last = now };
        let mut state = ConnState { start_ns: now, class, side: verdict.side, _pad: [0; 6] };
        let p = unsafe { CONNS.get_or_insert_ptr_mut(ctx, Some(&mut state)) };
        if !p.is_null() {
            // A reused socket may already have storage: overwrite it.
            unsafe { *p = state };
        }
    }
    ALLOWED
}

/// `bpf_ktime_get_ns()`, read on first use and then reused.
struct Clock(u64);

impl Clock {
    #[inline(always)]
    fn now(&mut self) -> u64 {
        if self.0 == 0 {
            self.0 = unsafe { bpf_ktime_get_ns() };
        }
        self.0
    }
}

/// Sends a verdict event, unless the rule sent one less than `event_interval_ns` ago.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn send_event(
    sc: &SlotConfig,
    counter: u32,
    action: u8,
    class: u8,
    d: &Dest,
    cgroup: u64,
    hook: u8,
    now: u64,
) {
    let Some(gate) = EVENT_GATE.get_ptr_mut(counter) else {
        return;
    };
    let last = unsafe { core::ptr::read_volatile(gate) };
    if last != 0 && now.wrapping_sub(last) < sc.event_interval_ns {
        count_event(EVENT_COUNTER_SUPPRESSED);
        return;
    }
    unsafe { core::ptr::write_volatile(gate, now) };
    match EVENTS.reserve::<VerdictEvent>(0) {
        Some(mut slot) => {
            slot.write(VerdictEvent {
                time_ns: now,
                cgroup_id: cgroup,
                generation: sc.generation,
                addr: d.addr,
                port: d.port,
                proto: d.proto,
                action,
                counter,
                class,
                hook,
                _pad: [0; 6],
            });
            slot.submit(0);
            count_event(EVENT_COUNTER_SENT);
        }
        None => count_event(EVENT_COUNTER_DROPPED),
    }
}

#[inline(always)]
fn count_event(index: u32) {
    if let Some(n) = EVENT_COUNTS.get_ptr_mut(index) {
        unsafe { *n += 1 };
    }
}

/// Rewrites the destination to `t`; returns whether it could. `V6` is the program's family:
/// IPv4 programs may only write `user_ip4`, IPv6 ones only `user_ip6` (an IPv4 target becomes
/// `::ffff:a.b.c.d` there). A parked UDP destination is remembered, so that replies can be
/// translated back.
#[inline(always)]
fn park<const V6: bool>(ctx: &SockAddrContext, t: &ParkTarget, d: &Dest) -> bool {
    let sa = unsafe { &mut *ctx.sock_addr };
    let w = |i: usize| u32::from_ne_bytes([t.addr[i], t.addr[i + 1], t.addr[i + 2], t.addr[i + 3]]);
    let mut target = [0u8; 16];
    if !V6 {
        if t.family != 4 {
            return false;
        }
        sa.user_ip4 = w(0);
        target[10] = 0xff;
        target[11] = 0xff;
        target[12..].copy_from_slice(&t.addr[..4]);
    } else if t.family == 6 {
        sa.user_ip6[0] = w(0);
        sa.user_ip6[1] = w(4);
        sa.user_ip6[2] = w(8);
        sa.user_ip6[3] = w(12);
        target = t.addr;
    } else {
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = 0xffffu32.to_be();
        sa.user_ip6[3] = w(0);
        target[10] = 0xff;
        target[11] = 0xff;
        target[12..].copy_from_slice(&t.addr[..4]);
    }
    sa.user_port = t.port_be;
    if d.proto == PROTO_UDP {
        let key = RevNatKey {
            cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            addr: target,
            port_be: t.port_be,
            _pad: 0,
        };
        let original = RevNatValue { addr: d.addr, port_be: (d.port.to_be()) as u32, _pad: 0 };
        let _ = REVNAT.insert(&key, &original, 0);
    }
    true
}

/// A datagram received from a park target by a socket that sent to it: the source becomes the
/// destination the application sent to.
#[inline(always)]
fn unpark_reply<const V6: bool>(ctx: &SockAddrContext) {
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    let slot = unsafe { core::ptr::read_volatile(&cfg.active_slot) } & (SLOTS as u32 - 1);
    let candidate = unsafe { core::ptr::read_volatile(&cfg.candidate) };
    let parks = cfg.slots[slot as usize].flags & FLAG_PARK != 0
        || (candidate != 0 && cfg.slots[slot_of(SIDE_CANDIDATE, slot, candidate) as usize].flags & FLAG_PARK != 0);
    if !parks {
        return;
    }
    let sa = unsafe { &mut *ctx.sock_addr };
    let d = if V6 { Dest::v6(sa) } else { Dest::v4(sa) };
    let key = RevNatKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: d.addr,
        port_be: sa.user_port,
        _pad: 0,
    };
    let Some(original) = (unsafe { REVNAT.get(&key) }) else {
        return;
    };
    let a = &original.addr;
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    if V6 {
        sa.user_ip6[0] = w(0);
        sa.user_ip6[1] = w(4);
        sa.user_ip6[2] = w(8);
        sa.user_ip6[3] = w(12);
    } else {
        sa.user_ip4 = w(12);
    }
    sa.user_port = original.port_be;
}

/// `SO_PRIORITY` for degraded connects without a park target: TC_PRIO_BULK, the lowest band
/// of the default `pfifo_fast` and `prio` qdiscs.
const DEGRADED_PRIORITY: i32 = 2;

/// Admits, but lowers the socket's priority (a degraded class with no lower tier to park on).
#[inline(always)]
fn lower_priority(ctx: &SockAddrContext) {
    const SOL_SOCKET: i32 = 1;
    const SO_PRIORITY: i32 = 12;
    let mut prio = DEGRADED_PRIORITY;
    unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_PRIORITY,
            (&raw mut prio).cast(),
            size_of::<i32>() as i32,
        )
    };
}

/// Adds `weight` attempts to the heat of (`scope`, destination).
#[inline(always)]
fn record_heat(scope: u64, d: &Dest, now: u64, weight: u64) {
    let key = HeatKey { scope, addr: d.addr, port: d.port, proto: d.proto, _pad: [0; 5] };
    match HEAT.get_ptr_mut(&key) {
        Some(v) => unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*v).attempts, weight);
            (*v).last_seen_ns = now;
        },
        None => {
            let value = HeatValue { attempts: weight, last_seen_ns: now };
            if HEAT.insert(&key, &value, BPF_NOEXIST as u64).is_ok() {
                if let Some(n) = HEAT_INSERTS.get_ptr_mut(0) {
                    unsafe { *n += 1 };
                }
            }
        }
    }
}

// sockops operations (include/uapi/linux/bpf.h).
const OP_ACTIVE_ESTABLISHED_CB: u32 = 4;
const OP_RTT_CB: u32 = 12;

fn try_sockops(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != OP_ACTIVE_ESTABLISHED_CB && op != OP_RTT_CB {
        return;
    }
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    let map = core::ptr::from_ref(&CONNS).cast_mut().cast();
    let state = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) } as *mut ConnState;
    if state.is_null() {
        // Not a connect that admission timed (UDP, histograms off, or before the agent).
        return;
    }
    let (class, side) = unsafe { ((*state).class, (*state).side) };
    if op == OP_ACTIVE_ESTABLISHED_CB {
        let start = unsafe { (*state).start_ns };
        let now = unsafe { bpf_ktime_get_ns() };
        record_latency(side, LATENCY_HANDSHAKE, class, now.saturating_sub(start));
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_RTT_CB_FLAG as i32);
    } else {
        // srtt_us holds the smoothed RTT in microseconds, left-shifted by 3.
        let srtt_us8 = unsafe { (*ctx.ops).srtt_us } as u64;
        record_latency(side, LATENCY_RTT, class, (srtt_us8 >> 3) * 1000);
    }
}

#[inline(always)]
fn record_latency(side: u8, kind: usize, class: u8, value_ns: u64) {
    if class as usize >= CLASSES {
        return;
    }
    let Some(h) = LATENCY.get_ptr_mut(histogram_index(side, kind, class)) else {
        return;
    };
    let b = bucket_of(value_ns);
    let h = unsafe { &mut *h };
    if b < BUCKETS {
        h.buckets[b] += 1;
    }
    h.count += 1;
    h.sum_ns = h.sum_ns.wrapping_add(value_ns);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
