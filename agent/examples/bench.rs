//! `cargo xtask bench`: the datapath's cost, measured side by side in one run (needs root).
//!
//! The policy comes from a seeded generator ([`generate_policy`]): prefixes from /8 to /32 that
//! overlap the destinations actually connected to, rules in several nested cgroup scopes, single
//! ports, ranges and protocols. Connects cycle through `--destinations` (default 1024) distinct
//! loopback addresses, so heat entries are created and updated as in a real workload.
//!
//! 1. **Per-connection kernel cost** (BPF run-time statistics): `connect4` alone, and every
//!    program run for one connection (`connect4` plus each `sockops` callback), against empty
//!    programs of the same types attached the same way in a sibling cgroup. Rounds interleave
//!    the two; each round gives a ratio; the report gives the median and the spread.
//! 2. **`sendmsg4`**: unconnected UDP `sendto()` through the agent's program against an empty one.
//! 3. **Throughput**: `connect()`+`close()` rate from a cgroup under the agent against one under
//!    no program, in interleaved paired rounds; the median ratio with its 95 % interval.
//! 4. **Beat**: one beat of the beat engine with a full heat map.
//!
//! Each goal prints MET or MISSED; with `--check` the process exits 1 when one is missed.
//! Everything runs in throwaway cgroups and pin directories that are removed at the end.

#[path = "../../tests/support/mod.rs"]
mod support;

use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use knhk_agent::{
    config::Config,
    datapath::{Datapath, DatapathOptions},
    policy::Policy,
};
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};
use support::*;

static EMPTY: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/knhk-bench-empty.o"));

/// Where the workload runs, below the attach cgroup: three levels, two of them rule scopes.
const WORKLOAD: &str = "svc-a/pod-1";

struct Args {
    connects: u64,
    rules: u64,
    rounds: usize,
    throughput_rounds: usize,
    max_cover: usize,
    seed: u64,
    destinations: usize,
    uniform: bool,
    check: bool,
}

fn args() -> Args {
    let args: Vec<String> = std::env::args().collect();
    let num = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name} {v}: not a number"))
            })
            .unwrap_or(default)
    };
    Args {
        connects: num("--connects", 10_000),
        rules: num("--rules", 10_000),
        rounds: num("--rounds", 11) as usize,
        throughput_rounds: num("--throughput-rounds", 41) as usize,
        max_cover: num("--max-cover", 16) as usize,
        seed: num("--seed", 0x6b6e_686b),
        destinations: num("--destinations", 1024).clamp(1, 50_000) as usize,
        uniform: args.iter().any(|a| a == "--uniform"),
        check: args.iter().any(|a| a == "--check"),
    }
}

/// splitmix64: a small seeded generator, so every run benchmarks the same policy.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The order connects visit `dests`: 8,192 draws with Zipf (s = 1) popularity, as services and
/// their clients are (a few hot destinations, a long tail; every destination is visited), or
/// with `uniform`, each in turn (the worst case for every cache: nothing repeats soon).
fn visit_order(dests: &[SocketAddr], uniform: bool, seed: u64) -> Vec<SocketAddr> {
    if uniform {
        return dests.to_vec();
    }
    let weights: Vec<f64> = (1..=dests.len()).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut cumulative = Vec::with_capacity(dests.len());
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cumulative.push(acc);
    }
    let mut rng = Rng(seed ^ 0x5eed);
    let mut order: Vec<SocketAddr> = dests.to_vec();
    while order.len() < 8192 {
        let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        let k = cumulative.partition_point(|c| *c < u).min(dests.len() - 1);
        order.push(dests[k]);
    }
    order
}

/// The destinations connected to: distinct addresses spread over 127.0.0.0/8.
fn destinations(port: u16, n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| {
            let a = 1 + (i % 200) as u8;
            let b = ((i / 200) * 41 % 256) as u8;
            let c = 1 + (i * 7 % 253) as u8;
            SocketAddr::from((Ipv4Addr::new(127, a, b, c), port))
        })
        .collect()
}

/// A seeded policy of `rules` rules. 70 % of the rules cover connected destinations (lengths
/// /32: 40 %, /24–/31: 30 %, /16–/23: 25 %, /8–/15: 5 %), the rest sit in 10.0.0.0/8. Scopes:
/// 40 % global, 20 % each `svc-a`, `svc-a/pod-1` and `svc-b`. A rule that could match the
/// workload's own traffic (TCP to `port`, UDP to `udp_port`) allows or audits it, so every
/// connect and datagram is admitted and takes the full path. No connected destination is covered by more than `max_cover` rule
/// entries (the kernel leaf limit of this ABI bounds it).
fn generate_policy(
    rules: u64,
    (port, udp_port): (u16, u16),
    dests: &[SocketAddr],
    max_cover: usize,
    seed: u64,
) -> String {
    let mut rng = Rng(seed);
    let mut cover = vec![0usize; dests.len()];
    let dest_ips: Vec<u32> = dests
        .iter()
        .map(|d| match d {
            SocketAddr::V4(a) => u32::from(*a.ip()),
            SocketAddr::V6(_) => unreachable!("IPv4 destinations"),
        })
        .collect();
    // One deny rule for the event path's measurement (127.255.0.1, nothing else goes there), in
    // the workload's own scope so that it wins there.
    let mut text = format!(
        "[agent]\ndefault_action = \"allow\"\n[[policy.rules]]\nname = \"bench-deny\"\naction = \"deny\"\ncidrs = [\"127.255.0.1/32\"]\ncgroup = \"{WORKLOAD}\"\n"
    );
    for i in 0..rules {
        let scope = match rng.below(10) {
            0..=3 => None,
            4 | 5 => Some("svc-a"),
            6 | 7 => Some("svc-a/pod-1"),
            _ => Some("svc-b"),
        };
        let (ports, range) = match rng.below(10) {
            0..=4 => (String::new(), 0..=u16::MAX),
            5..=7 => {
                let p = 1 + rng.below(65_535) as u16;
                (format!("ports = [\"{p}\"]\n"), p..=p)
            }
            _ => {
                let lo = 1 + rng.below(60_000) as u16;
                let hi = lo + rng.below(2_000) as u16;
                (format!("ports = [\"{lo}-{hi}\"]\n"), lo..=hi)
            }
        };
        let (protocol, tcp, udp) = match rng.below(10) {
            0..=3 => ("protocol = \"tcp\"\n", true, false),
            4 | 5 => ("protocol = \"udp\"\n", false, true),
            _ => ("", true, true),
        };
        let matches_workload = (tcp && range.contains(&port)) || (udp && range.contains(&udp_port));
        // A prefix over the connected destinations, unless that would cover one too often.
        let mut cidr = None;
        if rng.chance(70) {
            for _ in 0..20 {
                let base = dest_ips[rng.below(dest_ips.len() as u64) as usize];
                let len = match rng.below(100) {
                    0..=39 => 32,
                    40..=69 => 24 + rng.below(8) as u32,
                    70..=94 => 16 + rng.below(8) as u32,
                    _ => 8 + rng.below(8) as u32,
                };
                let mask = u32::MAX << (32 - len);
                let covered: Vec<usize> = (0..dest_ips.len())
                    .filter(|&j| dest_ips[j] & mask == base & mask)
                    .collect();
                if covered.iter().all(|&j| cover[j] < max_cover) {
                    covered.iter().for_each(|&j| cover[j] += 1);
                    cidr = Some((Ipv4Addr::from(base & mask), len, true));
                    break;
                }
            }
        }
        let (net, len, local) = cidr.unwrap_or_else(|| {
            let len = 16 + rng.below(17) as u32;
            let base = (10 << 24) | (rng.next() as u32 & 0x00ff_ffff);
            (Ipv4Addr::from(base & (u32::MAX << (32 - len))), len, false)
        });
        let action = if local && matches_workload {
            ["allow", "audit"][rng.below(2) as usize]
        } else {
            ["allow", "deny", "audit"][rng.below(3) as usize]
        };
        let class = [
            "",
            "class = \"R1\"\n",
            "class = \"W1\"\n",
            "class = \"C1\"\n",
        ][rng.below(4) as usize];
        let _ = write!(
            text,
            "[[policy.rules]]\nname = \"r{i}\"\naction = \"{action}\"\ncidrs = [\"{net}/{len}\"]\n{ports}{protocol}{class}"
        );
        if let Some(s) = scope {
            let _ = writeln!(text, "cgroup = \"{s}\"");
        }
    }
    text
}

fn policy_of(text: &str) -> Arc<Policy> {
    Arc::new(Config::parse(text, "bench").expect("bench policy").policy())
}

/// Sorted copy.
fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

fn median(v: &[f64]) -> f64 {
    let v = sorted(v);
    v[v.len() / 2]
}

/// "median (min–max)" of ratios.
fn spread(v: &[f64]) -> String {
    let s = sorted(v);
    format!(
        "{:.2}x (range {:.2}-{:.2}, {} rounds)",
        s[s.len() / 2],
        s[0],
        s[s.len() - 1],
        s.len()
    )
}

/// The median's 95 % confidence interval by order statistics (distribution-free).
fn median_interval(v: &[f64]) -> (f64, f64) {
    let s = sorted(v);
    let n = s.len() as f64;
    let half = 1.96 * n.sqrt() / 2.0;
    let lo = ((n / 2.0 - half).floor() as usize).clamp(1, s.len()) - 1;
    let hi = ((n / 2.0 + half).ceil() as usize).clamp(1, s.len()) - 1;
    (s[lo], s[hi])
}

/// Goals, printed as MET or MISSED at the end.
#[derive(Default)]
struct Goals(Vec<(String, bool)>);

impl Goals {
    fn check(&mut self, what: String, met: bool) {
        self.0.push((what, met));
    }
}

/// (run time, run count) of a program by its aya handle.
fn stats_of(info: aya::programs::ProgramInfo) -> (Duration, u64) {
    (info.run_time(), info.run_count())
}

/// The agent's programs' (run time, run count), by name.
fn agent_stats(dp: &Datapath, name: &str) -> Option<(Duration, u64)> {
    dp.program_stats()
        .expect("program stats")
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, t, c)| (t, c))
}

/// Nanoseconds between two (time, count) readings, and the runs.
fn delta(a: (Duration, u64), b: (Duration, u64)) -> (f64, u64) {
    ((b.0 - a.0).as_nanos() as f64, b.1 - a.1)
}

fn main() {
    if !kernel_available("bench") {
        std::process::exit(1);
    }
    let args = args();
    let mut goals = Goals::default();
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF stats");
    let tcp_target = tcp_sink("0.0.0.0:0");
    let udp_target = udp_sink("0.0.0.0:0");
    let all_dests = destinations(tcp_target.port(), args.destinations);
    let dests = visit_order(&all_dests, args.uniform, args.seed);
    let udp_dests = visit_order(
        &destinations(udp_target.port(), args.destinations),
        args.uniform,
        args.seed,
    );

    let agent_cg = TestCgroup::new("bench-agent");
    let empty_cg = TestCgroup::new("bench-empty");
    let bare_cg = TestCgroup::new("bench-none");
    let agent_leaf = agent_cg.child(WORKLOAD);
    let empty_leaf = empty_cg.child(WORKLOAD);
    let bare_leaf = bare_cg.child(WORKLOAD);
    agent_cg.child("svc-b");
    let pins = TestPins::new("bench");

    let mut dp = Datapath::start(&DatapathOptions {
        cgroup_root: agent_cg.path.clone(),
        pin_root: pins.root.clone(),
        heat_max_entries: 65_536,
    })
    .expect("start datapath");
    let text = generate_policy(
        args.rules,
        (tcp_target.port(), udp_target.port()),
        &all_dests,
        args.max_cover,
        args.seed,
    );
    let policy = policy_of(&text);
    let started = Instant::now();
    let report = dp.apply(&policy, None).expect("apply the generated policy");
    let apply_time = started.elapsed();

    // The empty programs, attached to their own cgroup the way the agent attaches its own.
    let mut empty = aya::Ebpf::load(EMPTY).expect("load the empty programs");
    let empty_root = std::fs::File::open(&empty_cg.path).expect("cgroup");
    for name in [
        "knhk_bench_empty_connect4",
        "knhk_bench_empty_connect6",
        "knhk_bench_empty_sendmsg4",
    ] {
        let p: &mut CgroupSockAddr = empty
            .program_mut(name)
            .expect(name)
            .try_into()
            .expect("sock_addr program");
        p.load().expect("load");
        p.attach(&empty_root, CgroupAttachMode::Single)
            .expect("attach");
    }
    let p: &mut SockOps = empty
        .program_mut("knhk_bench_empty_sockops")
        .expect("sockops")
        .try_into()
        .expect("sockops program");
    p.load().expect("load");
    p.attach(&empty_root, CgroupAttachMode::Single)
        .expect("attach");
    let empty_stats = |name: &str| -> (Duration, u64) {
        let p = empty.program(name).expect(name);
        let info = match p {
            aya::programs::Program::CgroupSockAddr(p) => p.info(),
            aya::programs::Program::SockOps(p) => p.info(),
            _ => unreachable!("only these types are attached"),
        };
        stats_of(info.expect("program info"))
    };

    // Warm up: caches, heat entries for every destination, the accept thread.
    for leaf in [&agent_leaf, &empty_leaf, &bare_leaf] {
        let n = 2 * dests.len().max(500) as u64;
        let c = tcp_connect_cycle_from(leaf, &dests, n);
        assert_eq!(c.connected, n, "warm-up: {c:?}");
    }

    // 1. Kernel cost per connection, interleaved rounds.
    let (mut c4_ratio, mut all_ratio) = (Vec::new(), Vec::new());
    let (mut c4_full, mut c4_empty, mut all_full, mut all_empty) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut callbacks = (0u64, 0u64, 0u64);
    for round in 0..args.rounds {
        let mut full = (0.0, 0.0);
        let mut bare = (0.0, 0.0);
        for k in 0..2 {
            if (round + k) % 2 == 0 {
                let c0 = agent_stats(&dp, knhk_abi::program_names::CONNECT4).expect("connect4");
                let s0 = agent_stats(&dp, knhk_abi::program_names::SOCKOPS).expect("sockops");
                let c = tcp_connect_cycle_from(&agent_leaf, &dests, args.connects);
                assert_eq!(c.connected, args.connects, "{c:?}");
                let c1 = agent_stats(&dp, knhk_abi::program_names::CONNECT4).expect("connect4");
                let s1 = agent_stats(&dp, knhk_abi::program_names::SOCKOPS).expect("sockops");
                let (c4, _) = delta(c0, c1);
                let (so, so_runs) = delta(s0, s1);
                full = (c4 / args.connects as f64, (c4 + so) / args.connects as f64);
                callbacks.0 += so_runs;
            } else {
                let c0 = empty_stats("knhk_bench_empty_connect4");
                let s0 = empty_stats("knhk_bench_empty_sockops");
                let c = tcp_connect_cycle_from(&empty_leaf, &dests, args.connects);
                assert_eq!(c.connected, args.connects, "{c:?}");
                let c1 = empty_stats("knhk_bench_empty_connect4");
                let s1 = empty_stats("knhk_bench_empty_sockops");
                let (c4, _) = delta(c0, c1);
                let (so, so_runs) = delta(s0, s1);
                bare = (c4 / args.connects as f64, (c4 + so) / args.connects as f64);
                callbacks.1 += so_runs;
            }
        }
        callbacks.2 += args.connects;
        c4_full.push(full.0);
        c4_empty.push(bare.0);
        all_full.push(full.1);
        all_empty.push(bare.1);
        c4_ratio.push(full.0 / bare.0);
        all_ratio.push(full.1 / bare.1);
    }

    // Where the cost goes: the same policy with features switched off (informative, one round
    // each; the policy's flags switch with it).
    let mut breakdown = Vec::new();
    for (what, heat, histograms) in [
        ("decide + count", false, false),
        ("+ heat", true, false),
        ("+ heat + histograms", true, true),
    ] {
        dp.apply(
            &Arc::new(Policy {
                heat,
                histograms,
                ..(*policy).clone()
            }),
            None,
        )
        .expect("apply");
        tcp_connect_cycle_from(&agent_leaf, &dests, dests.len().max(500) as u64);
        let c0 = agent_stats(&dp, knhk_abi::program_names::CONNECT4).expect("connect4");
        let c = tcp_connect_cycle_from(&agent_leaf, &dests, args.connects);
        assert_eq!(c.connected, args.connects, "{c:?}");
        let c1 = agent_stats(&dp, knhk_abi::program_names::CONNECT4).expect("connect4");
        let (ns, runs) = delta(c0, c1);
        breakdown.push((what, ns / runs.max(1) as f64));
    }

    // 1b. The rollout split: the workload with no rollout, on the stable side of a live rollout,
    //     and on its candidate side (the same policy plus one rule), in rotating order per round.
    dp.apply(&policy, None).expect("apply");
    let mut candidate = (*policy).clone();
    candidate.rules.push(
        knhk_agent::config::Config::parse(
            "[[policy.rules]]\nname = \"bench-candidate\"\naction = \"deny\"\ncidrs = [\"192.0.2.1/32\"]\n",
            "bench",
        )
        .expect("rule")
        .policy
        .rules
        .remove(0),
    );
    let candidate = Arc::new(candidate);
    let leaf_id = TestCgroup::id_of(&agent_leaf);
    let other_id = TestCgroup::id_of(&agent_cg.path.join("svc-b"));
    let (mut split_plain, mut split_stable, mut split_candidate) =
        (Vec::new(), Vec::new(), Vec::new());
    let mut zeroed_us = Vec::new();
    for round in 0..args.rounds {
        for k in 0..3 {
            let which = (round + k) % 3;
            if which == 0 {
                let start = Instant::now();
                dp.drop_candidate().expect("drop the candidate");
                zeroed_us.push(start.elapsed().as_secs_f64() * 1e6);
            } else {
                if dp.candidate().is_none() {
                    let g = dp.generation() + 1;
                    dp.stage_candidate(&candidate, g).expect("stage");
                }
                let on: std::collections::BTreeSet<u64> =
                    [if which == 2 { leaf_id } else { other_id }].into();
                dp.set_split(&on).expect("split");
            }
            // Refill the verdict cache after the epoch bump, then measure.
            tcp_connect_cycle_from(&agent_leaf, &dests, dests.len().max(500) as u64);
            let c0 = agent_stats(&dp, knhk_abi::program_names::CONNECT4).expect("connect4");
            let c = tcp_connect_cycle_from(&agent_leaf, &dests, args.connects);
            assert_eq!(c.connected, args.connects, "{c:?}");
            let c1 = agent_stats(&dp, knhk_abi::program_names::CONNECT4).expect("connect4");
            let (ns, runs) = delta(c0, c1);
            [&mut split_plain, &mut split_stable, &mut split_candidate][which]
                .push(ns / runs.max(1) as f64);
        }
    }
    dp.drop_candidate().expect("drop the candidate");
    let split_diff =
        |side: &[f64]| -> Vec<f64> { side.iter().zip(&split_plain).map(|(s, p)| s - p).collect() };
    let (stable_extra, candidate_extra) = (split_diff(&split_stable), split_diff(&split_candidate));

    // The event path at full deny rate: every connect denied (one rule), each a candidate event.
    let denied_to = SocketAddr::from(([127, 255, 0, 1], tcp_target.port()));
    let reader = knhk_agent::datapath::DatapathReader::open(dp.pins()).expect("reader");
    let c0 = agent_stats(&dp, knhk_abi::program_names::CONNECT4).expect("connect4");
    let e0 = reader.verdict_events().expect("event counters");
    let started = Instant::now();
    let c = tcp_connect_loop_from(&agent_leaf, denied_to, args.connects);
    let deny_secs = started.elapsed().as_secs_f64();
    assert_eq!(c.denied, args.connects, "{c:?}");
    let c1 = agent_stats(&dp, knhk_abi::program_names::CONNECT4).expect("connect4");
    let e1 = reader.verdict_events().expect("event counters");
    let (deny_ns, deny_runs) = delta(c0, c1);
    let deny_path = (
        deny_ns / deny_runs.max(1) as f64,
        args.connects as f64 / deny_secs,
        e1.0 - e0.0,
        e1.2 - e0.2,
        e1.1 - e0.1,
    );

    // 2. sendmsg4: unconnected UDP, when the agent has the program.
    let sendmsg = agent_stats(&dp, "knhk_sendmsg4").map(|_| {
        let mut ratios = Vec::new();
        let (mut full_ns, mut empty_ns) = (Vec::new(), Vec::new());
        for round in 0..args.rounds {
            let mut pair = [0.0; 2];
            for k in 0..2 {
                let which = (round + k) % 2;
                let before = if which == 0 {
                    agent_stats(&dp, "knhk_sendmsg4").expect("sendmsg4")
                } else {
                    empty_stats("knhk_bench_empty_sendmsg4")
                };
                let leaf = if which == 0 { &agent_leaf } else { &empty_leaf };
                let c = udp_sendto_cycle_from(leaf, &udp_dests, args.connects);
                assert_eq!(c.connected, args.connects, "{c:?}");
                let after = if which == 0 {
                    agent_stats(&dp, "knhk_sendmsg4").expect("sendmsg4")
                } else {
                    empty_stats("knhk_bench_empty_sendmsg4")
                };
                let (ns, runs) = delta(before, after);
                pair[which] = ns / runs.max(1) as f64;
            }
            full_ns.push(pair[0]);
            empty_ns.push(pair[1]);
            ratios.push(pair[0] / pair[1]);
        }
        (median(&full_ns), median(&empty_ns), ratios)
    });

    // 3. Throughput with BPF stats off again (they cost every program run): paired rounds, the
    //    order alternating, so slow drifts of the machine cancel out.
    drop(stats);
    let per_round = args.connects;
    let (mut with, mut without, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.throughput_rounds {
        let mut rate = [0f64; 2];
        for k in 0..2 {
            let which = (round + k) % 2;
            let leaf = [&agent_leaf, &bare_leaf][which];
            let start = Instant::now();
            let c = tcp_connect_cycle_from(leaf, &dests, per_round);
            let secs = start.elapsed().as_secs_f64();
            assert_eq!(c.connected, per_round, "{c:?}");
            rate[which] = per_round as f64 / secs;
        }
        with.push(rate[0]);
        without.push(rate[1]);
        ratio.push(rate[0] / rate[1]);
    }

    println!(
        "knhk-agent datapath benchmark: {} generated rules (seed {:#x}, at most {} entries over one destination), {} trie entries, {} scopes; {} destinations visited {}; {} connects per measurement",
        report.rules,
        args.seed,
        args.max_cover,
        report.trie_entries,
        policy_scopes(&policy),
        args.destinations,
        if args.uniform {
            "in turn (--uniform)"
        } else {
            "with Zipf popularity"
        },
        args.connects
    );
    println!(
        "policy apply (compile + write + switch): {:.1} ms",
        apply_time.as_secs_f64() * 1e3
    );
    println!();
    println!("1. kernel run time per TCP connection (BPF stats; agent and empty programs in interleaved rounds):");
    println!(
        "  connect4           : agent {:7.1} ns, empty {:7.1} ns: {}",
        median(&c4_full),
        median(&c4_empty),
        spread(&c4_ratio)
    );
    println!(
        "  connect4 + sockops : agent {:7.1} ns, empty {:7.1} ns: {}",
        median(&all_full),
        median(&all_empty),
        spread(&all_ratio)
    );
    println!(
        "  sockops callbacks per connection: agent {:.2}, empty {:.2}",
        callbacks.0 as f64 / callbacks.2 as f64,
        callbacks.1 as f64 / callbacks.2 as f64
    );
    let base = median(&c4_empty);
    for (what, ns) in &breakdown {
        println!(
            "  connect4, {what:<20}: {ns:7.1} ns ({:.2}x; one round)",
            ns / base
        );
    }
    let m = median(&c4_ratio);
    goals.check(
        format!("connect4 full path {m:.2}x the empty program (goal <= 2.00x)"),
        m <= 2.0,
    );
    let m = median(&all_ratio);
    goals.check(
        format!("every program of one connection {m:.2}x the empty programs (goal <= 3.00x)"),
        m <= 3.0,
    );
    let ns_spread = |v: &[f64]| {
        let s = sorted(v);
        format!(
            "{:+.1} ns (range {:+.1} to {:+.1}, {} rounds)",
            s[s.len() / 2],
            s[0],
            s[s.len() - 1],
            s.len()
        )
    };
    println!();
    println!("  the rollout split (connect4, interleaved rounds; differences per round against no rollout):");
    println!(
        "    no rollout {:7.1} ns; stable side of a live rollout {}; candidate side {}",
        median(&split_plain),
        ns_spread(&stable_extra),
        ns_spread(&candidate_extra)
    );
    println!(
        "    a failed gate to 0 %: the same beat (drop_candidate: one store and the split table emptied, median {:.0} µs)",
        median(&zeroed_us)
    );
    let worst = median(&stable_extra).max(median(&candidate_extra));
    goals.check(
        format!("rollout split {worst:+.1} ns per connect over the plain path (goal <= 10 ns)"),
        worst <= 10.0,
    );
    println!();
    println!(
        "  denied connects (event path): {:7.1} ns per connect4 run at {:.0} denied connects/s; events sent {}, suppressed by the per-rule limit {}, dropped {}",
        deny_path.0, deny_path.1, deny_path.2, deny_path.3, deny_path.4
    );
    println!();
    match sendmsg {
        Some((full, bare, ratios)) => {
            println!("2. kernel run time per unconnected UDP sendto() (sendmsg4):");
            println!(
                "  agent {full:7.1} ns, empty {bare:7.1} ns: {}",
                spread(&ratios)
            );
            let m = median(&ratios);
            goals.check(
                format!("sendmsg4 decision {m:.2}x the empty program (goal <= 2.00x)"),
                m <= 2.0,
            );
        }
        None => {
            println!("2. sendmsg4: the agent attaches no sendmsg4 program");
            goals.check("sendmsg4 decision: not measured (no program)".into(), false);
        }
    }
    println!();
    let (lo, hi) = median_interval(&ratio);
    let m = median(&ratio);
    println!(
        "3. loopback connect()+close() throughput, {} paired rounds of {per_round} connects:",
        args.throughput_rounds
    );
    println!(
        "  without programs : {:8.0} connects/s (median)",
        median(&without)
    );
    println!(
        "  under the agent  : {:8.0} connects/s (median); paired ratio median {m:.3}, 95 % interval {lo:.3}-{hi:.3}",
        median(&with)
    );
    goals.check(
        format!("throughput with the agent {m:.3}x of without (95 % interval {lo:.3}-{hi:.3}; goal >= 0.970)"),
        m >= 0.97,
    );

    // 4. One beat of the beat engine with a full heat map (65,536 destinations: heat recorded
    //    for every connect while filling it) and the latency histograms filled by the runs above.
    dp.apply(
        &Arc::new(Policy {
            heat_sample_every: 1,
            ..(*policy).clone()
        }),
        None,
    )
    .expect("apply");
    let filled = tcp_connect_many_from(&agent_leaf, 65_536);
    let reader = knhk_agent::datapath::DatapathReader::open(dp.pins()).expect("reader");
    let heat_entries = reader.heat().expect("heat").len();
    let settings = knhk_agent::config::BeatSettings {
        ceilings_ns: [Some(200_000), Some(1_000_000), Some(500_000_000)],
        ..Default::default()
    };
    let (events, _rx) = tokio::sync::broadcast::channel(1024);
    let mut engine = knhk_agent::beat::BeatEngine::new(
        settings,
        reader,
        dp.class_state_writer(),
        events,
        &prometheus::Registry::new(),
    )
    .expect("engine");
    let mut beats = Vec::new();
    for _ in 0..640 {
        let start = Instant::now();
        engine.beat().expect("beat");
        beats.push(start.elapsed().as_secs_f64() * 1e6);
    }
    let beats = sorted(&beats);
    let p99 = beats[beats.len() * 99 / 100];
    // A full ranking at scrape time over every tracked destination.
    let mut rankings = Vec::new();
    for _ in 0..21 {
        let start = Instant::now();
        let top = engine.hottest(20);
        rankings.push(start.elapsed().as_secs_f64() * 1e6);
        assert!(!top.is_empty());
    }
    // A destination never seen before turns hot: beats until it is in the top 20 (each beat
    // walks 1,024 heat entries, so a full walk of the map takes 64 beats).
    let newly_hot = SocketAddr::from(([127, 254, 1, 1], tcp_target.port()));
    let c = tcp_connect_loop_from(&agent_leaf, newly_hot, 5_000);
    assert_eq!(c.connected, 5_000, "{c:?}");
    let mut beats_to_top = None;
    for b in 1..=200u32 {
        engine.beat().expect("beat");
        if engine
            .hottest(20)
            .iter()
            .any(|h| h.addr == newly_hot.ip() && h.port == newly_hot.port())
        {
            beats_to_top = Some(b);
            break;
        }
    }
    println!();
    println!(
        "4. beat engine, one beat with {heat_entries} heat entries ({filled} connects to fill them):"
    );
    println!(
        "  p50 {:.0} µs   p99 {p99:.0} µs   max {:.0} µs over {} beats",
        beats[beats.len() / 2],
        beats[beats.len() - 1],
        beats.len()
    );
    println!(
        "  full ranking (top 20 of every tracked destination, at scrape time): median {:.0} µs, max {:.0} µs",
        median(&rankings),
        sorted(&rankings)[rankings.len() - 1]
    );
    match beats_to_top {
        Some(b) => println!(
            "  a newly hot destination (5,000 connects) reached the top 20 after {b} beats ({:.1} s at the default 100 ms beat)",
            f64::from(b) * 0.1
        ),
        None => println!("  a newly hot destination did not reach the top 20 within 200 beats"),
    }
    goals.check(
        format!("beat p99 {p99:.0} µs (goal <= 1000 µs)"),
        p99 <= 1000.0,
    );

    println!();
    println!("goals:");
    let mut missed = 0;
    for (what, met) in &goals.0 {
        println!("  {}  {what}", if *met { "MET   " } else { "MISSED" });
        missed += usize::from(!met);
    }
    drop(empty);
    drop(dp);
    drop(pins);
    if args.check && missed > 0 {
        eprintln!("bench: {missed} goal(s) missed");
        std::process::exit(1);
    }
}

/// Distinct rule scopes of a policy, the global one included.
fn policy_scopes(policy: &Policy) -> usize {
    1 + knhk_agent::policy::rule_scopes(&policy.rules).len()
}
