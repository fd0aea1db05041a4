//! `cargo xtask bench`: the datapath's cost, measured side by side in one run (needs root).
//!
//! 1. Admission program cost: average kernel run time per `connect()` of `knhk_connect4` with
//!    `--rules` rules loaded (heat and histograms on), against an empty `connect4` program,
//!    both measured with BPF run-time statistics in the same run.
//! 2. Loopback `connect()` throughput from a cgroup under the agent's programs against a cgroup
//!    with none, in alternating rounds; medians are compared.
//!
//! Everything runs in throwaway cgroups and pin directories that are removed at the end.

#[path = "../../tests/support/mod.rs"]
mod support;

use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use knhk_agent::{
    config::Config,
    datapath::{Datapath, DatapathOptions},
    policy::Policy,
};
use std::time::{Duration, Instant};
use support::*;

static EMPTY: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/knhk-bench-empty.o"));

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn policy(port: u16, rules: u64) -> std::sync::Arc<Policy> {
    let mut text = format!(
        "[[policy.rules]]\nname = \"target\"\naction = \"allow\"\nclass = \"R1\"\ncidrs = [\"127.0.0.1/32\"]\nports = [\"{port}\"]\nprotocol = \"tcp\"\n"
    );
    for i in 1..rules {
        text.push_str(&format!(
            "[[policy.rules]]\nname = \"deny-{i}\"\naction = \"deny\"\ncidrs = [\"10.{}.{}.{}/32\"]\n",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        ));
    }
    std::sync::Arc::new(
        Config::parse(&text, "bench")
            .expect("bench policy")
            .policy(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !kernel_available("bench") {
        std::process::exit(1);
    }
    let connects = arg("--connects", 10_000);
    let rules = arg("--rules", 10_000);
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF stats");
    let target = tcp_sink("127.0.0.1:0");

    let agent_cg = TestCgroup::new("bench-agent");
    let empty_cg = TestCgroup::new("bench-empty");
    let bare_cg = TestCgroup::new("bench-none");
    let pins = TestPins::new("bench");

    let mut dp = Datapath::start(&DatapathOptions {
        cgroup_root: agent_cg.path.clone(),
        pin_root: pins.root.clone(),
        heat_max_entries: 65_536,
    })
    .expect("start datapath");
    let started = Instant::now();
    let report = dp
        .apply(&policy(target.port(), rules), None)
        .expect("apply");
    let apply_time = started.elapsed();

    let mut empty = aya::Ebpf::load(EMPTY).expect("load the empty program");
    let prog: &mut CgroupSockAddr = empty
        .program_mut("knhk_bench_empty")
        .expect("empty program")
        .try_into()
        .expect("connect4 program");
    prog.load().expect("load");
    let cg_file = std::fs::File::open(&empty_cg.path).expect("cgroup");
    prog.attach(&cg_file, CgroupAttachMode::Single)
        .expect("attach");

    let connect4_stats = |dp: &Datapath| {
        dp.program_stats()
            .expect("stats")
            .into_iter()
            .find(|(n, _, _)| *n == knhk_abi::program_names::CONNECT4)
            .map(|(_, t, c)| (t, c))
            .expect("connect4")
    };
    let sockops_stats = |dp: &Datapath| {
        dp.program_stats()
            .expect("stats")
            .into_iter()
            .find(|(n, _, _)| *n == knhk_abi::program_names::SOCKOPS)
            .map(|(_, t, c)| (t, c))
            .expect("sockops")
    };
    let empty_stats = |p: &CgroupSockAddr| {
        let i = p.info().expect("info");
        (i.run_time(), i.run_count())
    };

    // Warm up caches, the heat entry and the accept thread.
    for cg in [&agent_cg, &empty_cg, &bare_cg] {
        let c = tcp_connect_loop_from(&cg.path, target, 500);
        assert_eq!(c.connected, 500, "warm-up: {c:?}");
    }

    // 1. Per-run cost in the kernel, for the full policy and with features switched off (the
    //    same programs; the policy's flags switch with it), against the empty program.
    let per_run = |t: Duration, n: u64| t.as_nanos() as f64 / n.max(1) as f64;
    let measure_agent = |dp: &mut Datapath, policy: &std::sync::Arc<Policy>| {
        dp.apply(policy, None).expect("apply");
        tcp_connect_loop_from(&agent_cg.path, target, 200);
        let (t0, n0) = connect4_stats(dp);
        let (s0, sn0) = sockops_stats(dp);
        let c = tcp_connect_loop_from(&agent_cg.path, target, connects);
        assert_eq!(c.connected, connects, "{c:?}");
        let (t1, n1) = connect4_stats(dp);
        let (s1, sn1) = sockops_stats(dp);
        (
            per_run(t1 - t0, n1 - n0),
            per_run(s1 - s0, sn1 - sn0),
            sn1 - sn0,
        )
    };
    let full = policy(target.port(), rules);
    let with = |p: &std::sync::Arc<Policy>, heat: bool, histograms: bool| {
        std::sync::Arc::new(Policy {
            heat,
            histograms,
            ..(**p).clone()
        })
    };
    let lean = with(&full, false, false);
    let heat_only = with(&full, true, false);
    let one_rule = with(&policy(target.port(), 1), false, false);
    let (lean_ns, _, _) = measure_agent(&mut dp, &lean);
    let (one_ns, _, _) = measure_agent(&mut dp, &one_rule);
    let (heat_ns, _, _) = measure_agent(&mut dp, &heat_only);
    let (full_ns, sockops_ns, sockops_runs) = measure_agent(&mut dp, &full);
    let prog: &CgroupSockAddr = empty
        .program("knhk_bench_empty")
        .expect("p")
        .try_into()
        .expect("p");
    let (e0, en0) = empty_stats(prog);
    let c = tcp_connect_loop_from(&empty_cg.path, target, connects);
    assert_eq!(c.connected, connects, "{c:?}");
    let (e1, en1) = empty_stats(prog);
    let empty_ns = per_run(e1 - e0, en1 - en0);

    // 2. Throughput with BPF stats off again (they cost every program run). Many short rounds,
    //    the three cgroups in rotating order within each round; each round gives a paired ratio,
    //    so slow drifts of the machine cancel out. Reported: medians.
    drop(stats);
    let rounds = 21;
    let per_round = connects;
    let (mut with, mut without, mut empty_only) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ratio_agent, mut ratio_empty) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut rate = [0f64; 3];
        for k in 0..3 {
            let which = (round + k) % 3;
            let cg = [&agent_cg, &bare_cg, &empty_cg][which];
            let start = Instant::now();
            let c = tcp_connect_loop_from(&cg.path, target, per_round);
            let secs = start.elapsed().as_secs_f64();
            assert_eq!(c.connected, per_round, "{c:?}");
            rate[which] = per_round as f64 / secs;
        }
        with.push(rate[0]);
        without.push(rate[1]);
        empty_only.push(rate[2]);
        ratio_agent.push(rate[0] / rate[1]);
        ratio_empty.push(rate[2] / rate[1]);
    }
    let (with_m, without_m, empty_m) = (
        median(with.clone()),
        median(without.clone()),
        median(empty_only.clone()),
    );
    let quartiles = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 4], v[v.len() / 2], v[3 * v.len() / 4])
    };
    let (a25, a50, a75) = quartiles(ratio_agent);
    let (e25, e50, e75) = quartiles(ratio_empty);

    println!("knhk-agent datapath benchmark ({connects} connects per measurement, {} rules, {} trie entries)", report.rules, report.trie_entries);
    println!(
        "policy apply (compile + write + switch): {:.1} ms",
        apply_time.as_secs_f64() * 1e3
    );
    println!();
    println!("admission program, kernel run time per connect() (BPF stats, same run):");
    println!("  empty connect4 program                              : {empty_ns:8.1} ns");
    println!(
        "  knhk_connect4, 1 rule, decide + count               : {one_ns:8.1} ns  ({:.2}x)",
        one_ns / empty_ns
    );
    println!(
        "  knhk_connect4, {} rules, decide + count          : {lean_ns:8.1} ns  ({:.2}x)",
        report.rules,
        lean_ns / empty_ns
    );
    println!(
        "  knhk_connect4, {} rules, + heat                  : {heat_ns:8.1} ns  ({:.2}x)",
        report.rules,
        heat_ns / empty_ns
    );
    println!("  knhk_connect4, {} rules, + heat + histograms     : {full_ns:8.1} ns  ({:.2}x, goal <= 2.00x)", report.rules, full_ns / empty_ns);
    println!(
        "  knhk_sockops, per callback ({sockops_runs} callbacks)         : {sockops_ns:8.1} ns"
    );
    println!();
    println!("loopback connect()+close() throughput, {rounds} rounds of {per_round} connects per cgroup:");
    println!("  without programs        : {without_m:8.0} connects/s (median)");
    println!("  empty connect4 program  : {empty_m:8.0} connects/s; paired ratio median {e50:.3} (quartiles {e25:.3}-{e75:.3})");
    println!("  under knhk-agent        : {with_m:8.0} connects/s; paired ratio median {a50:.3} (quartiles {a25:.3}-{a75:.3}), goal >= 0.970");

    // 3. One beat of the beat engine with a full heat map (65,536 destinations) and the
    //    latency histograms filled by the runs above.
    let filled = tcp_connect_many_from(&agent_cg.path, 65_536);
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
    beats.sort_by(f64::total_cmp);
    println!();
    println!(
        "beat engine, one beat with {heat_entries} heat entries ({filled} connects to fill them) and the histograms above:"
    );
    println!(
        "  p50 {:.0} µs   p99 {:.0} µs   max {:.0} µs over {} beats (10 walks of the heat map; goal p99 <= 1000 µs)",
        beats[beats.len() / 2],
        beats[beats.len() * 99 / 100],
        beats[beats.len() - 1],
        beats.len()
    );

    drop(empty);
    drop(dp);
    drop(pins);
}
