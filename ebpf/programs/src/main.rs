//! knhk's kernel programs.
//!
//! - `knhk_connect4` / `knhk_connect6` (`cgroup/connect4`, `cgroup/connect6`): connection
//!   admission. Each `connect()` is looked up in the active policy slot (deepest owning cgroup
//!   scope, longest destination prefix, then port range and protocol), counted, and refused with
//!   EPERM on deny. They also count destination heat and start the handshake clock.
//! - `knhk_sockops` (`sockops`): handshake latency (connect to ESTABLISHED) and RTT samples into
//!   per-CPU log-linear histograms keyed by runtime class.
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
        bpf_get_current_ancestor_cgroup_id, bpf_ktime_get_ns, bpf_setsockopt, bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
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
#[map(name = "KNHK_SCOPES")]
static SCOPES: HashMap<ScopeKey, ScopeValue> = HashMap::pinned(MAX_SCOPES, 0);
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
#[map(name = "KNHK_HEAT_INSERTS")]
static HEAT_INSERTS: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);
#[map(name = "KNHK_SAMPLED")]
static SAMPLED: PerCpuArray<u64> = PerCpuArray::pinned(CLASSES as u32, 0);
#[map(name = "KNHK_LATENCY")]
static LATENCY: PerCpuArray<Histogram> = PerCpuArray::pinned(HISTOGRAMS as u32, 0);

/// What admission decided for one connect.
struct Verdict {
    action: u8,
    class: u8,
    counter: u32,
}

#[cgroup_sock_addr(connect4)]
pub fn knhk_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn knhk_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[sock_ops]
pub fn knhk_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx);
    1
}

/// The active slot and its settings. The slot number is read once, so a connect sees one
/// generation throughout even if the agent switches slots meanwhile.
#[inline(always)]
fn active_slot() -> Option<(u32, &'static SlotConfig)> {
    let cfg = CONFIG.get(0)?;
    let slot = unsafe { core::ptr::read_volatile(&cfg.active_slot) } & (SLOTS as u32 - 1);
    Some((slot, &cfg.slots[slot as usize]))
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    // With no config the agent has not finished loading: admit.
    let (slot, cfg) = active_slot().ok_or(ALLOWED)?;
    let sa = unsafe { &*ctx.sock_addr };
    let addr = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    let proto = sa.protocol as u8;
    let scope = owning_scope(slot, cfg);
    let key = Key::new(
        LPM_FIXED_BITS + 32,
        LpmKeyV4 { slot, _pad: 0, scope, addr },
    );
    let leaf = POLICY_V4.get(&key);
    let mut mapped = [0u8; 16];
    mapped[10] = 0xff;
    mapped[11] = 0xff;
    mapped[12..].copy_from_slice(&addr);
    Ok(admit::<false>(ctx, cfg, leaf, &mapped, port, proto))
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let (slot, cfg) = active_slot().ok_or(ALLOWED)?;
    let sa = unsafe { &*ctx.sock_addr };
    let words = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&words[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&words[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&words[2].to_ne_bytes());
    addr[12..16].copy_from_slice(&words[3].to_ne_bytes());
    let port = u16::from_be(sa.user_port as u16);
    let proto = sa.protocol as u8;
    let scope = owning_scope(slot, cfg);
    // An IPv4-mapped destination (::ffff:a.b.c.d, dual-stack sockets) is judged by the IPv4 policy.
    let leaf = if words[0] == 0 && words[1] == 0 && u32::from_be(words[2]) == 0xffff {
        let key = Key::new(
            LPM_FIXED_BITS + 32,
            LpmKeyV4 { slot, _pad: 0, scope, addr: words[3].to_ne_bytes() },
        );
        POLICY_V4.get(&key)
    } else {
        let key = Key::new(
            LPM_FIXED_BITS + 128,
            LpmKeyV6 { slot, _pad: 0, scope, addr },
        );
        POLICY_V6.get(&key)
    };
    Ok(admit::<true>(ctx, cfg, leaf, &addr, port, proto))
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

/// Decide, count, record heat and the handshake start; returns the program's return code.
#[inline(always)]
fn admit<const V6: bool>(
    ctx: &SockAddrContext,
    cfg: &SlotConfig,
    leaf: Option<&RuleLeaf>,
    heat_addr: &[u8; 16],
    port: u16,
    proto: u8,
) -> i32 {
    let mut verdict = Verdict { action: cfg.default_action, class: cfg.default_class, counter: 0 };
    if let Some(leaf) = leaf {
        let len = leaf.len;
        for i in 0..MAX_LEAF_ENTRIES {
            if i as u32 >= len {
                break;
            }
            let e = &leaf.entries[i];
            if e.matches(port, proto) {
                verdict = Verdict { action: e.action, class: e.class, counter: e.counter };
                break;
            }
        }
    }
    if verdict.action == ACTION_DENY && cfg.flags & FLAG_ENFORCE == 0 {
        verdict.action = ACTION_AUDIT;
    }
    let class = if (verdict.class as usize) < CLASSES { verdict.class } else { CLASS_C1 };
    // One clock read per connect at most, shared by the SLO, heat and histogram paths.
    let mut clock = Clock(0);
    // SLO admission (enforce mode only): a paused class's admitted connects are shed; a
    // degraded class's are parked on their rule's park target, if it has one. A normal class
    // spends its per-beat budget; past it, the class's over-budget state applies.
    if verdict.action != ACTION_DENY && cfg.flags & FLAG_ENFORCE != 0 {
        if let Some(ctl) = CLASS_STATE.get(class as u32) {
            let mut state = unsafe { core::ptr::read_volatile(&ctl.state) };
            let mut budget = BUDGETS.get_ptr_mut(class as u32);
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
                STATE_PAUSED => verdict.action = ACTION_SHED,
                STATE_DEGRADED => {
                    let target = if verdict.counter != 0 { unsafe { PARK.get(&verdict.counter) } } else { None };
                    let parked = match target {
                        Some(t) => park::<V6>(ctx, t),
                        None => false,
                    };
                    if parked {
                        verdict.action = ACTION_PARK;
                    } else {
                        lower_priority(ctx);
                    }
                }
                _ => {}
            }
        }
    }

    if let Some(n) = DECISIONS.get_ptr_mut(decision_index(verdict.action, class)) {
        unsafe { *n += 1 };
    }
    if let Some(n) = RULE_HITS.get_ptr_mut(verdict.counter) {
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1) };
    }
    if cfg.flags & FLAG_HEAT != 0 {
        record_heat(heat_addr, port, proto, clock.now());
    }
    if verdict.action == ACTION_DENY || verdict.action == ACTION_SHED {
        return REFUSED;
    }
    if cfg.flags & FLAG_HISTOGRAMS != 0 && proto == PROTO_TCP {
        let now = clock.now();
        let Some(last) = SAMPLED.get_ptr_mut(class as u32) else {
            return ALLOWED;
        };
        if now.wrapping_sub(unsafe { *last }) < cfg.histogram_interval_ns {
            return ALLOWED;
        }
        unsafe { *last = now };
        let mut state = ConnState { start_ns: now, class, _pad: [0; 7] };
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

/// Rewrites the destination to `t`; returns whether it could. `V6` is the program's family:
/// connect4 may only write `user_ip4`, connect6 only `user_ip6` (an IPv4 target becomes
/// `::ffff:a.b.c.d` there).
#[inline(always)]
fn park<const V6: bool>(ctx: &SockAddrContext, t: &ParkTarget) -> bool {
    let sa = unsafe { &mut *ctx.sock_addr };
    let w = |i: usize| u32::from_ne_bytes([t.addr[i], t.addr[i + 1], t.addr[i + 2], t.addr[i + 3]]);
    if !V6 {
        if t.family != 4 {
            return false;
        }
        sa.user_ip4 = w(0);
    } else if t.family == 6 {
        sa.user_ip6[0] = w(0);
        sa.user_ip6[1] = w(4);
        sa.user_ip6[2] = w(8);
        sa.user_ip6[3] = w(12);
    } else {
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = 0xffffu32.to_be();
        sa.user_ip6[3] = w(0);
    }
    sa.user_port = t.port_be;
    true
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

#[inline(always)]
fn record_heat(addr: &[u8; 16], port: u16, proto: u8, now: u64) {
    let key = HeatKey { addr: *addr, port, proto, _pad: 0 };
    match HEAT.get_ptr_mut(&key) {
        Some(v) => unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*v).attempts, 1);
            (*v).last_seen_ns = now;
        },
        None => {
            if HEAT.insert(&key, &HeatValue { attempts: 1, last_seen_ns: now }, BPF_NOEXIST as u64).is_ok() {
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
    let class = unsafe { (*state).class };
    if op == OP_ACTIVE_ESTABLISHED_CB {
        let start = unsafe { (*state).start_ns };
        let now = unsafe { bpf_ktime_get_ns() };
        record_latency(LATENCY_HANDSHAKE, class, now.saturating_sub(start));
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_RTT_CB_FLAG as i32);
    } else {
        // srtt_us holds the smoothed RTT in microseconds, left-shifted by 3.
        let srtt_us8 = unsafe { (*ctx.ops).srtt_us } as u64;
        record_latency(LATENCY_RTT, class, (srtt_us8 >> 3) * 1000);
    }
}

#[inline(always)]
fn record_latency(kind: usize, class: u8, value_ns: u64) {
    if class as usize >= CLASSES {
        return;
    }
    let Some(h) = LATENCY.get_ptr_mut(histogram_index(kind, class)) else {
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
