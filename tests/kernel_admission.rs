//! Kernel tests of connection admission (need root, cgroup v2 and BPF): real programs attached to
//! a throwaway cgroup, judged by real `connect()` calls from child processes placed in it.

mod support;

use knhk_abi::{ACTION_ALLOW, ACTION_AUDIT, ACTION_DENY};
use knhk_agent::{
    datapath::ScopeChange,
    model::{Class, LatencySource},
};
use std::net::SocketAddr;
use support::*;

/// A policy that classes the shaped servers' subnet (`DelayedServer`, 10.213.0.0/16) as R1.
const DELAYED_SERVERS_ARE_R1: &str = r#"
[[policy.rules]]
name = "hot"
action = "allow"
class = "R1"
cidrs = ["10.213.0.0/16"]
"#;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn kernel_denies_ipv4_tcp_and_counts() {
    if !kernel_available("kernel_denies_ipv4_tcp_and_counts") {
        return;
    }
    let _serial = timing_shared();
    let open = tcp_sink("127.0.0.1:0");
    let blocked = tcp_sink("127.0.0.1:0");
    let h = Harness::start(
        "v4",
        &format!(
            r#"
            [[policy.rules]]
            name = "block"
            action = "deny"
            class = "W1"
            cidrs = ["127.0.0.1/32"]
            ports = ["{}"]
            protocol = "tcp"
            "#,
            blocked.port()
        ),
    );
    let inside = h.cg.child("pod");
    assert_eq!(tcp_connect_from(&inside, blocked), Outcome::Denied);
    assert_eq!(tcp_connect_from(&inside, open), Outcome::Connected);
    assert_eq!(
        tcp_connect_from(&h.cg.path, blocked),
        Outcome::Denied,
        "the root itself is enforced"
    );
    let d = h.reader().decisions().expect("decisions");
    assert_eq!(d.get(ACTION_DENY, Class::W1), 2);
    assert_eq!(
        d.get(ACTION_ALLOW, Class::C1),
        1,
        "unmatched connects get the default class"
    );
    assert_eq!(h.hits("block"), 2);

    // Detaching (dropping the pins) removes the verdict.
    let cg_path = h.cg.path.clone();
    let Harness { dp, pins, cg } = h;
    drop(dp);
    drop(pins);
    assert_eq!(
        tcp_connect_from(&cg_path, blocked),
        Outcome::Connected,
        "verdict gone after detach"
    );
    drop(cg);
}

#[test]
fn kernel_denies_ipv6_and_udp() {
    if !kernel_available("kernel_denies_ipv6_and_udp") {
        return;
    }
    let _serial = timing_shared();
    let v6 = tcp_sink("[::1]:0");
    let udp_blocked = udp_sink("127.0.0.1:0");
    let udp_open = udp_sink("127.0.0.1:0");
    let h = Harness::start(
        "v6udp",
        &format!(
            r#"
            [[policy.rules]]
            name = "no-v6-port"
            action = "deny"
            cidrs = ["::1/128"]
            ports = ["{}"]
            [[policy.rules]]
            name = "no-udp"
            action = "deny"
            cidrs = ["127.0.0.0/8"]
            ports = [{}]
            protocol = "udp"
            "#,
            v6.port(),
            udp_blocked.port()
        ),
    );
    assert_eq!(tcp_connect_from(&h.cg.path, v6), Outcome::Denied);
    assert_eq!(udp_connect_from(&h.cg.path, udp_blocked), Outcome::Denied);
    assert_eq!(udp_connect_from(&h.cg.path, udp_open), Outcome::Connected);
    // The UDP rule does not apply to TCP on the same port.
    assert!(tcp_connect_from(&h.cg.path, udp_blocked).admitted());
    // IPv4-mapped destinations on IPv6 sockets are judged by the IPv4 rules.
    let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", udp_blocked.port())
        .parse()
        .expect("addr");
    assert_eq!(udp_connect_from(&h.cg.path, mapped), Outcome::Denied);
    assert_eq!(h.hits("no-v6-port"), 1);
    assert_eq!(h.hits("no-udp"), 2);
}

#[test]
fn kernel_scopes_rules_to_a_cgroup_subtree() {
    if !kernel_available("kernel_scopes_rules_to_a_cgroup_subtree") {
        return;
    }
    let _serial = timing_shared();
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("scope-probe");
    drop(cg);
    let h = Harness::start(
        "scope",
        &format!(
            r#"
            [[policy.rules]]
            name = "tenant-a-only"
            action = "deny"
            cgroup = "tenant-a"
            cidrs = ["127.0.0.0/8"]
            ports = ["{}"]
            "#,
            target.port()
        ),
    );
    // The rule cgroup did not exist at apply time: pending until the follower sees it.
    assert_eq!(h.dp.status().pending_scopes.len(), 1);
    let a = h.cg.child("tenant-a/pod-1");
    let b = h.cg.child("tenant-b/pod-1");
    let mut h = h;
    let changes = h.dp.refresh_scopes().expect("refresh");
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(
        tcp_connect_from(&a, target),
        Outcome::Denied,
        "inside the subtree"
    );
    assert_eq!(
        tcp_connect_from(&h.cg.path.join("tenant-a"), target),
        Outcome::Denied,
        "the subtree root"
    );
    assert_eq!(
        tcp_connect_from(&b, target),
        Outcome::Connected,
        "outside the subtree"
    );
    assert_eq!(
        tcp_connect_from(&h.cg.path, target),
        Outcome::Connected,
        "the root"
    );
}

#[test]
fn kernel_audit_mode_admits_and_counts() {
    if !kernel_available("kernel_audit_mode_admits_and_counts") {
        return;
    }
    let _serial = timing_shared();
    let target = tcp_sink("127.0.0.1:0");
    let h = Harness::start(
        "audit",
        &format!(
            r#"
            [agent]
            mode = "audit"
            [[policy.rules]]
            name = "would-deny"
            action = "deny"
            class = "R1"
            cidrs = ["127.0.0.1/32"]
            ports = ["{}"]
            [[policy.rules]]
            name = "audit-rule"
            action = "audit"
            cidrs = ["127.0.0.2/32"]
            "#,
            target.port()
        ),
    );
    assert_eq!(tcp_connect_from(&h.cg.path, target), Outcome::Connected);
    assert!(tcp_connect_from(&h.cg.path, addr("127.0.0.2:9")).admitted());
    let d = h.reader().decisions().expect("decisions");
    assert_eq!(d.get(ACTION_AUDIT, Class::R1), 1);
    assert_eq!(d.total(ACTION_DENY), 0);
    assert_eq!(h.hits("would-deny"), 1);
    assert_eq!(h.hits("audit-rule"), 1);
}

#[test]
fn kernel_longest_prefix_and_port_range_edges() {
    if !kernel_available("kernel_longest_prefix_and_port_range_edges") {
        return;
    }
    let _serial = timing_shared();
    // No listeners: an admitted connect is refused by the stack (ECONNREFUSED), a denied one
    // fails with EPERM before reaching it.
    let h = Harness::start(
        "lpm",
        r#"
        [[policy.rules]]
        name = "deny-loopback-range"
        action = "deny"
        cidrs = ["127.0.0.0/8"]
        ports = ["20000-20010"]
        [[policy.rules]]
        name = "allow-one-host"
        action = "allow"
        cidrs = ["127.0.0.1/32"]
        "#,
    );
    let c = &h.cg.path;
    assert_eq!(
        tcp_connect_from(c, addr("127.0.0.1:20005")),
        Outcome::Refused,
        "/32 allow inside /8 deny wins"
    );
    assert_eq!(
        tcp_connect_from(c, addr("127.0.0.2:20000")),
        Outcome::Denied,
        "lower edge"
    );
    assert_eq!(
        tcp_connect_from(c, addr("127.0.0.2:20010")),
        Outcome::Denied,
        "upper edge"
    );
    assert_eq!(
        tcp_connect_from(c, addr("127.0.0.2:19999")),
        Outcome::Refused,
        "below the range"
    );
    assert_eq!(
        tcp_connect_from(c, addr("127.0.0.2:20011")),
        Outcome::Refused,
        "above the range"
    );
    assert_eq!(h.hits("deny-loopback-range"), 2);
    assert_eq!(h.hits("allow-one-host"), 1);
}

fn switch_policy(class: &str, port: u16, fillers: usize) -> String {
    let mut text = format!(
        "[agent]\ndefault_action = \"deny\"\n[[policy.rules]]\nname = \"target\"\naction = \"allow\"\nclass = \"{class}\"\ncidrs = [\"127.0.0.1/32\"]\nports = [\"{port}\"]\n"
    );
    for i in 0..fillers {
        text.push_str(&format!(
            "[[policy.rules]]\nname = \"filler-{i}\"\naction = \"deny\"\ncidrs = [\"10.{}.{}.0/24\"]\n",
            i / 256,
            i % 256
        ));
    }
    text
}

#[test]
fn kernel_policy_switch_under_load_is_atomic() {
    if !kernel_available("kernel_policy_switch_under_load_is_atomic") {
        return;
    }
    let _serial = timing_shared();
    let target = tcp_sink("127.0.0.1:0");
    let udp_target = udp_sink("127.0.0.1:0");
    // The target rule has no protocol: TCP connects and UDP datagrams to either port match it.
    let text = |class: &str| {
        switch_policy(class, target.port(), 500).replace(
            &format!("ports = [\"{}\"]", target.port()),
            &format!("ports = [\"{}\", \"{}\"]", target.port(), udp_target.port()),
        )
    };
    let a = policy(&text("R1"));
    let b = policy(&text("W1"));
    let mut h = Harness::start("switch", &text("R1"));
    let (cg, cg2) = (h.cg.path.clone(), h.cg.path.clone());
    const CONNECTS: u64 = 30_000;
    const DATAGRAMS: u64 = 100_000;
    let tcp = std::thread::spawn(move || tcp_connect_loop_from(&cg, target, CONNECTS));
    let udp = std::thread::spawn(move || udp_sendto_cycle_from(&cg2, &[udp_target], DATAGRAMS));
    let mut switches = 0;
    while !tcp.is_finished() || !udp.is_finished() {
        h.dp.apply(if switches % 2 == 0 { &b } else { &a }, None)
            .expect("apply");
        switches += 1;
    }
    let (tcp, udp) = (tcp.join().expect("tcp"), udp.join().expect("udp"));
    // Past slot reuse: every slot was written, retired, reclaimed and written again.
    assert!(
        switches > 2 * knhk_abi::SLOTS,
        "only {switches} switches happened during the loops"
    );
    // The default action is deny: a connect or datagram that saw a half-written generation (or
    // a verdict cached from a cleared slot) would match no rule and fail with EPERM.
    let all = |n| LoopCounts {
        connected: n,
        denied: 0,
        other: 0,
    };
    assert_eq!(tcp, all(CONNECTS), "TCP after {switches} switches");
    assert_eq!(udp, all(DATAGRAMS), "UDP after {switches} switches");
    let d = h.reader().decisions().expect("decisions");
    assert_eq!(
        d.get(ACTION_ALLOW, Class::R1) + d.get(ACTION_ALLOW, Class::W1),
        CONNECTS + DATAGRAMS
    );
    assert!(
        d.get(ACTION_ALLOW, Class::R1) > 0 && d.get(ACTION_ALLOW, Class::W1) > 0,
        "{d:?}"
    );
    assert_eq!(d.total(ACTION_DENY), 0);
    assert_eq!(
        h.reader().rule_hits(0),
        0,
        "nothing fell through to the default"
    );
    eprintln!(
        "policy switch under load: {switches} switches of 501-rule policies during {CONNECTS} TCP connects and {DATAGRAMS} UDP datagrams"
    );
}

#[test]
fn kernel_histograms_and_heat_fill_from_real_connections() {
    if !kernel_available("kernel_histograms_and_heat_fill_from_real_connections") {
        return;
    }
    let _serial = timing_exclusive();
    // A real network delay of about 20 ms dominates the handshake, so the connect() time seen in
    // userspace and the connect-to-ESTABLISHED time seen by the kernel measure the same thing.
    let server = DelayedServer::new(20);
    // Heat counts every connect (no sampling), so the count below is exact.
    let h = Harness::start(
        "latency",
        &format!("[agent]\nheat_sample_every = 1\n{DELAYED_SERVERS_ARE_R1}"),
    );
    const N: usize = 200;
    let timings = tcp_connect_timings_from::<N>(&h.cg.path, server.addr);
    assert!(
        timings.iter().all(|t| *t > 0),
        "every connect succeeds: {timings:?}"
    );
    let kernel = h
        .reader()
        .histogram(LatencySource::Handshake, Class::R1)
        .expect("histogram");
    assert_eq!(kernel.count, N as u64, "one handshake sample per connect");
    let mut user: Vec<u64> = timings.iter().map(|t| *t as u64).collect();
    user.sort_unstable();
    for q in [0.5, 0.99] {
        let exact = user[((N as f64 * q).ceil() as usize).max(1) - 1] as f64;
        let from_map = kernel.quantile(q).expect("samples") as f64;
        let diff = (from_map - exact) / exact;
        eprintln!("handshake p{}: kernel map {from_map:.0} ns, userspace {exact:.0} ns, difference {:+.2}%", q * 100.0, diff * 100.0);
        // Half a bucket (1.6%) plus the few microseconds of syscall around the handshake. The
        // userspace time also holds the wait to be scheduled once the handshake is done (a
        // clean CI run saw 1.2 ms at p99 on the two shared cores), so the map may read lower
        // by up to 2 ms more, never higher.
        let scheduling = 2e6 / exact;
        assert!(
            -0.035 - scheduling < diff && diff < 0.035,
            "p{q}: map {from_map} vs userspace {exact}"
        );
    }
    assert!(
        user[N / 2] > 5_000_000,
        "the shaped path adds real delay: median {} ns",
        user[N / 2]
    );

    let heat = h.reader().heat().expect("heat");
    let top = &heat[0];
    assert_eq!(
        (top.addr, top.port, top.attempts),
        (server.addr.ip(), server.addr.port(), N as u64),
        "{heat:?}"
    );
    assert!(top.last_seen_ns > 0);
}

#[test]
fn kernel_slo_admission_sheds_colder_classes_and_recovers() {
    if !kernel_available("kernel_slo_admission_sheds_colder_classes_and_recovers") {
        return;
    }
    let _serial = timing_exclusive();
    use knhk_agent::{config::BeatSettings, model::ClassState};
    // R1 goes to a server behind a real 20 ms delay; its SLO is 5 ms. Unmatched (local)
    // connects are C1.
    let server = DelayedServer::new(20);
    let local = tcp_sink("127.0.0.1:0");
    let h = Harness::start("slo", DELAYED_SERVERS_ARE_R1);
    let settings = BeatSettings {
        window_beats: 4,
        recover_beats: 3,
        ceilings_ns: [Some(5_000_000), None, None],
        ..BeatSettings::default()
    };
    let (mut engine, mut rx) = h.engine(settings);
    let beat = engine.beat().expect("beat");
    assert_eq!(
        beat.states,
        [ClassState::Normal; 3],
        "no samples, no breach"
    );
    assert_eq!(tcp_connect_from(&h.cg.path, local), Outcome::Connected);

    let timings = tcp_connect_timings_from::<5>(&h.cg.path, server.addr);
    assert!(
        timings.iter().all(|t| *t > 15_000_000),
        "R1 handshakes are slow: {timings:?}"
    );
    let beat = engine.beat().expect("beat");
    assert!(beat.breach[0], "R1 breaches: {beat:?}");
    assert!(beat.p99_ns[0].is_some_and(|p| p > 15_000_000), "{beat:?}");
    assert_eq!(
        beat.states,
        [ClassState::Normal, ClassState::Normal, ClassState::Paused],
        "C1 goes first"
    );
    assert_eq!(
        tcp_connect_from(&h.cg.path, local),
        Outcome::Denied,
        "a paused class is refused in the kernel"
    );
    let d = h.reader().decisions().expect("decisions");
    assert_eq!(
        d.get(knhk_abi::ACTION_SHED, Class::C1),
        1,
        "and the refusal is counted as shed"
    );
    let beat = engine.beat().expect("beat");
    assert_eq!(
        beat.states[1],
        ClassState::Paused,
        "then W1, while the breach lasts: {beat:?}"
    );
    assert_eq!(beat.states[0], ClassState::Normal);
    assert!(
        tcp_connect_from(&h.cg.path, server.addr).admitted(),
        "R1 itself is still admitted"
    );
    // That connect was slow too: with every colder class shed, Strict refuses R1 itself, visibly.
    let beat = engine.beat().expect("beat");
    assert_eq!(beat.states, [ClassState::Paused; 3], "{beat:?}");
    assert_eq!(tcp_connect_from(&h.cg.path, server.addr), Outcome::Denied);
    assert_eq!(
        h.reader()
            .decisions()
            .expect("decisions")
            .get(knhk_abi::ACTION_SHED, Class::R1),
        1
    );

    // No more slow traffic: the breach leaves the window; then every 3 healthy beats the
    // hottest shed class returns: R1, W1, C1.
    let mut recovered = Vec::new();
    let mut previous = [ClassState::Paused; 3];
    for n in 1..=30 {
        let beat = engine.beat().expect("beat");
        for (i, class) in Class::ALL.iter().enumerate() {
            if previous[i] != ClassState::Normal && beat.states[i] == ClassState::Normal {
                recovered.push((*class, n));
            }
        }
        previous = beat.states;
        if beat.states == [ClassState::Normal; 3] {
            break;
        }
    }
    let order: Vec<Class> = recovered.iter().map(|(c, _)| *c).collect();
    assert_eq!(order, [Class::R1, Class::W1, Class::C1], "{recovered:?}");
    assert_eq!(
        recovered[1].1 - recovered[0].1,
        3,
        "one class per recover_beats healthy beats: {recovered:?}"
    );
    assert_eq!(recovered[2].1 - recovered[1].1, 3, "{recovered:?}");
    assert_eq!(
        tcp_connect_from(&h.cg.path, local),
        Outcome::Connected,
        "C1 admitted again"
    );
    let mut changes = Vec::new();
    while let Ok(e) = rx.try_recv() {
        changes.push(e);
    }
    assert_eq!(
        changes.len(),
        6,
        "every state change is an event: {changes:?}"
    );
}

#[test]
fn kernel_slo_judges_a_class_by_rtt_when_configured() {
    if !kernel_available("kernel_slo_judges_a_class_by_rtt_when_configured") {
        return;
    }
    let _serial = timing_exclusive();
    use knhk_agent::config::BeatSettings;
    // R1 is judged by the smoothed RTT of its connections, over a real 20 ms path; its
    // ceiling is 5 ms. The ceiling of W1 (judged by handshakes, of which it has none) is never
    // breached.
    let server = DelayedServer::new(20);
    let h = Harness::start("slo-rtt", DELAYED_SERVERS_ARE_R1);
    let settings = BeatSettings {
        ceilings_ns: [Some(5_000_000), Some(5_000_000), None],
        latency_sources: [
            LatencySource::Rtt,
            LatencySource::Handshake,
            LatencySource::Handshake,
        ],
        ..BeatSettings::default()
    };
    let (mut engine, _rx) = h.engine(settings);
    engine.beat().expect("beat");
    let rtt_before = h
        .reader()
        .histogram(LatencySource::Rtt, Class::R1)
        .expect("rtt histogram")
        .count;
    assert_eq!(tcp_send_from(&h.cg.path, server.addr, 5, 150), 5);
    let rtt_after = h
        .reader()
        .histogram(LatencySource::Rtt, Class::R1)
        .expect("rtt histogram")
        .count;
    assert!(
        rtt_after > rtt_before,
        "the handshakes produced RTT samples"
    );
    let beat = engine.beat().expect("beat");
    let p99 = beat.p99_ns[0].expect("an R1 RTT p99");
    eprintln!("R1 window RTT p99: {p99} ns");
    assert!(p99 > 15_000_000, "RTT over the 20 ms path: {beat:?}");
    assert_eq!(beat.breach, [true, false, false], "{beat:?}");
}

#[test]
fn kernel_slo_degrade_parks_connects_on_the_lower_tier() {
    if !kernel_available("kernel_slo_degrade_parks_connects_on_the_lower_tier") {
        return;
    }
    let _serial = timing_exclusive();
    use knhk_agent::{config::BeatSettings, model::ClassState};
    let server = DelayedServer::new(20);
    let lower_tier = tcp_sink("127.0.0.1:0");
    // The C1 destination has no listener: admitted it is refused by the stack; parked it
    // connects to the lower tier.
    let h = Harness::start(
        "park",
        &format!(
            r#"
            [[policy.rules]]
            name = "hot"
            action = "allow"
            class = "R1"
            cidrs = ["10.213.0.0/16"]
            [[policy.rules]]
            name = "cold"
            action = "allow"
            class = "C1"
            cidrs = ["127.0.0.2/32"]
            ports = ["9"]
            park_to = "{lower_tier}"
            "#
        ),
    );
    let settings = BeatSettings {
        window_beats: 4,
        recover_beats: 3,
        ceilings_ns: [Some(5_000_000), None, None],
        strategy: knhk_agent::model::AdmissionStrategy::Degrade,
        ..BeatSettings::default()
    };
    let (mut engine, _rx) = h.engine(settings);
    engine.beat().expect("beat");
    let cold = addr("127.0.0.2:9");
    assert_eq!(
        tcp_connect_from(&h.cg.path, cold),
        Outcome::Refused,
        "normal: admitted, nobody listens"
    );
    tcp_connect_timings_from::<3>(&h.cg.path, server.addr);
    let beat = engine.beat().expect("beat");
    assert_eq!(beat.states[2], ClassState::Degraded, "{beat:?}");
    assert_eq!(
        tcp_connect_from(&h.cg.path, cold),
        Outcome::Connected,
        "degraded: parked on the lower tier"
    );
    assert_eq!(
        h.reader()
            .decisions()
            .expect("decisions")
            .get(knhk_abi::ACTION_PARK, Class::C1),
        1
    );
    for _ in 0..4 {
        tcp_connect_timings_from::<1>(&h.cg.path, server.addr);
        engine.beat().expect("beat");
    }
    let beat = engine.beat().expect("beat");
    assert_eq!(
        beat.states[0],
        ClassState::Normal,
        "Degrade never parks R1: {beat:?}"
    );
    assert!(tcp_connect_from(&h.cg.path, server.addr).admitted());
}

#[test]
fn kernel_budget_admits_exactly_n_per_beat() {
    if !kernel_available("kernel_budget_admits_exactly_n_per_beat") {
        return;
    }
    let _serial = timing_shared();
    use knhk_agent::config::BeatSettings;
    let target = tcp_sink("127.0.0.1:0");
    let h = Harness::start(
        "budget",
        r#"
        [[policy.rules]]
        name = "cold"
        action = "allow"
        class = "C1"
        cidrs = ["127.0.0.1/32"]
        "#,
    );
    let settings = BeatSettings {
        interval: std::time::Duration::from_secs(3600),
        budgets_per_beat: [None, None, Some(5)],
        ..BeatSettings::default()
    };
    let (mut engine, _rx) = h.engine(settings);
    // Beats are driven by the test: everything below happens "within one beat".
    engine.beat().expect("beat");
    let writer = h.dp.class_state_writer();
    assert_eq!(writer.budget(Class::C1), Some(5));
    let c = tcp_connect_loop_from(&h.cg.path, target, 8);
    assert_eq!(
        writer.budget(Class::C1),
        Some(-3),
        "every admitted-class connect spent one"
    );
    assert_eq!(
        c,
        LoopCounts {
            connected: 5,
            denied: 3,
            other: 0
        },
        "budget 5, 8 connects"
    );
    engine.beat().expect("beat");
    let c = tcp_connect_loop_from(&h.cg.path, target, 7);
    assert_eq!(
        c,
        LoopCounts {
            connected: 5,
            denied: 2,
            other: 0
        },
        "the next beat refills it"
    );
    let d = h.reader().decisions().expect("decisions");
    assert_eq!(
        (
            d.get(ACTION_ALLOW, Class::C1),
            d.get(knhk_abi::ACTION_SHED, Class::C1)
        ),
        (10, 5)
    );
}

#[test]
fn kernel_heat_ranks_decays_and_counts_evictions() {
    if !kernel_available("kernel_heat_ranks_decays_and_counts_evictions") {
        return;
    }
    let _serial = timing_shared();
    use knhk_agent::config::BeatSettings;
    let h = Harness::start_with_heat(
        "heat",
        "[agent]\nheat_sample_every = 1\n\
         [[policy.rules]]\nname = \"any\"\naction = \"allow\"\ncidrs = [\"127.0.0.0/8\"]\n",
        16,
    );
    let settings = BeatSettings {
        interval: std::time::Duration::from_secs(3600),
        heat_half_life_beats: 10.0,
        heat_top_n: 5,
        ..BeatSettings::default()
    };
    let (mut engine, _rx) = h.engine(settings);
    // 40 distinct destinations through a 16-entry LRU (nobody listens: the attempts still count).
    for port in 21_000..21_040u16 {
        assert!(tcp_connect_from(&h.cg.path, addr(&format!("127.0.0.1:{port}"))).admitted());
    }
    let hammered = addr("127.0.0.1:21100");
    let c = tcp_connect_loop_from(&h.cg.path, hammered, 50);
    assert_eq!(c.other + c.connected, 50);
    engine.beat().expect("beat");
    let top = engine.hottest(3);
    assert_eq!(
        (top[0].addr, top[0].port),
        (hammered.ip(), hammered.port()),
        "{top:?}"
    );
    assert!((top[0].heat - 50.0).abs() < 1e-6, "{top:?}");
    assert!(
        engine.heat_evictions() >= 24,
        "40 + 1 destinations through 16 entries: {} evictions",
        engine.heat_evictions()
    );
    // Traffic stops: after one half-life (10 beats) the heat has halved.
    for _ in 0..10 {
        engine.beat().expect("beat");
    }
    let top = engine.hottest(1);
    assert!((top[0].heat - 25.0).abs() < 1e-6, "{top:?}");
}

#[test]
fn kernel_slo_control_fails_open_when_the_beat_stops() {
    if !kernel_available("kernel_slo_control_fails_open_when_the_beat_stops") {
        return;
    }
    let _serial = timing_shared();
    use knhk_agent::config::BeatSettings;
    let target = tcp_sink("127.0.0.1:0");
    let h = Harness::start(
        "failopen",
        "[[policy.rules]]\nname = \"cold\"\naction = \"allow\"\nclass = \"C1\"\ncidrs = [\"127.0.0.1/32\"]\n",
    );
    let settings = BeatSettings {
        budgets_per_beat: [None, None, Some(0)],
        fail_open_after: std::time::Duration::from_millis(500),
        ..BeatSettings::default()
    };
    let (mut engine, _rx) = h.engine(settings);
    engine.beat().expect("beat");
    assert_eq!(
        tcp_connect_from(&h.cg.path, target),
        Outcome::Denied,
        "a zero budget sheds"
    );
    // The agent stops beating (crash, upgrade): after fail_open_after the kernel admits again.
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert_eq!(
        tcp_connect_from(&h.cg.path, target),
        Outcome::Connected,
        "stale decisions fail open"
    );
    engine.beat().expect("beat");
    assert_eq!(
        tcp_connect_from(&h.cg.path, target),
        Outcome::Denied,
        "and apply again once beats resume"
    );
}

/// A timing measurement (the knee is where handshake p99 crosses 20 ms behind a real rate-limited
/// link), so a benchmark: `cargo xtask bench` runs it. Its first form (a 2 Mbit/s link, a 5 ms
/// ceiling, one 2 s window per rate) failed a clean CI run at +28 %: there the knee sat in the
/// machine's scheduling noise and moved between 486 and 830/s from ramp to ramp.
#[test]
#[ignore = "benchmark: run by `cargo xtask bench` (needs root, BPF and an otherwise idle machine; about 3 minutes)"]
fn bench_capacity_model_predicts_the_knee_of_a_rate_limited_server() {
    if !kernel_available("bench_capacity_model_predicts_the_knee_of_a_rate_limited_server") {
        return;
    }
    let _serial = timing_exclusive();
    use knhk_agent::beat::capacity;
    use std::time::{Duration, Instant};
    // A server behind a 500 kbit/s TBF link with no other traffic: each connect puts about 200
    // bytes on it (SYN, ACK, RST), so the link serves about 300 connects/s. The link is slow so
    // that its queueing, not the two shared cores' scheduling (a millisecond or so), makes the
    // knee: at 20 ms the queue is ten times the noise.
    //
    // An open-loop Poisson load from the throwaway cgroup ramps 20, 40, 60 ... connects/s. Each
    // rate runs three 4 s windows; the rate's p99 is the median of the
    // windows' p99s (from the kernel's histograms), so one stalled window does not move it.
    //
    // The measured knee: where the monotone (isotonic) fit of those medians first crosses the
    // ceiling, interpolated. Held out: the model is fitted only on the rates below 75 % of the
    // measured knee, then its predicted knee is compared with the measured one.
    const LINK: &str = "500kbit";
    const CEILING_S: f64 = 0.02;
    const TRAINING_SHARE: f64 = 0.75;
    const WINDOWS_PER_RATE: usize = 3;
    let ramp = (1..=16).map(|i| 20.0 * i as f64);
    let step = Duration::from_secs(4);
    let server = DelayedServer::rate_limited(LINK);
    let h = Harness::start("capacity", DELAYED_SERVERS_ARE_R1);
    let mut loads = Vec::new();
    let mut measured: Vec<(f64, f64)> = Vec::new();
    for (i, rate) in ramp.enumerate() {
        let mut p99s = Vec::new();
        let mut offered = 0;
        for rep in 0..WINDOWS_PER_RATE {
            let arrivals = poisson_arrivals(rate, step, 7 + 100 * rep as u64 + i as u64);
            let before = h
                .reader()
                .histogram(LatencySource::Handshake, Class::R1)
                .expect("histogram");
            let (cg, addr) = (h.cg.path.clone(), server.addr);
            offered += arrivals.len();
            let started = Instant::now();
            loads.push(std::thread::spawn(move || {
                tcp_open_loop_from(&cg, addr, &arrivals, 1500)
            }));
            std::thread::sleep(step.saturating_sub(started.elapsed()));
            let window = h
                .reader()
                .histogram(LatencySource::Handshake, Class::R1)
                .expect("histogram")
                .minus(&before);
            p99s.push(window.quantile(0.99).unwrap_or(0) as f64 / 1e9);
        }
        let actual_rate = offered as f64 / (WINDOWS_PER_RATE as f64 * step.as_secs_f64());
        let mut sorted = p99s.clone();
        sorted.sort_by(f64::total_cmp);
        let p99 = sorted[sorted.len() / 2];
        eprintln!(
            "offered {rate}/s: {actual_rate:.0} connects/s, p99 of each window {:?} ms, median {:.2} ms",
            p99s.iter().map(|p| (p * 1e5).round() / 100.0).collect::<Vec<_>>(),
            p99 * 1e3
        );
        measured.push((actual_rate, p99));
        if p99 > 3.0 * CEILING_S {
            break;
        }
    }
    for load in loads {
        load.join().expect("load generator");
    }
    // The measured knee: where the monotone (isotonic) fit of the medians first crosses the ceiling.
    let smooth = isotonic(&measured.iter().map(|(_, p)| *p).collect::<Vec<_>>());
    let over = smooth
        .iter()
        .position(|p| *p > CEILING_S)
        .unwrap_or_else(|| panic!("the ramp never crossed {CEILING_S} s: {measured:?}"));
    assert!(
        over > 0,
        "the first step is already over the ceiling: {measured:?}"
    );
    let (r0, p0, r1, p1) = (
        measured[over - 1].0,
        smooth[over - 1],
        measured[over].0,
        smooth[over],
    );
    let measured_knee = r0 + (r1 - r0) * (CEILING_S - p0) / (p1 - p0);
    let training: Vec<(f64, f64)> = measured
        .iter()
        .copied()
        .filter(|(r, _)| *r < TRAINING_SHARE * measured_knee)
        .collect();
    let Some(fit) = capacity::fit(&training) else {
        eprintln!("goal: the predicted knee within 25 % of the measured knee: MISSED (the fit abstained: no queue seen)");
        panic!("the fit abstains on the training steps {training:?}: no queue seen (all: {measured:?})")
    };
    let predicted_knee = fit.knee(CEILING_S).expect("a knee above the base latency");
    let error = (predicted_knee - measured_knee) / measured_knee;
    eprintln!(
        "knee at p99 = {} ms: measured {measured_knee:.0}/s, predicted {predicted_knee:.0}/s ({:+.1}%) from {} steps below {:.0}/s; fit {fit:?}",
        CEILING_S * 1e3,
        error * 100.0,
        training.len(),
        TRAINING_SHARE * measured_knee
    );
    let goal = if error.abs() <= 0.25 { "MET" } else { "MISSED" };
    eprintln!(
        "goal: the predicted knee within 25 % of the measured knee: {goal} ({:+.1} %)",
        error * 100.0
    );
    // A miss fails the run only under `cargo xtask bench --check`, like every other goal.
    if error.abs() > 0.25 && std::env::var("KNHK_BENCH_CHECK").as_deref() == Ok("1") {
        panic!(
            "goal missed: predicted knee {predicted_knee:.0}/s vs measured {measured_knee:.0}/s ({fit:?}, training {training:?}, all {measured:?})"
        );
    }
}

/// The least-squares non-decreasing fit of `values` (pool adjacent violators): a noisy p99 that
/// dips between two steps is pooled with its neighbour instead of making a false crossing.
fn isotonic(values: &[f64]) -> Vec<f64> {
    let mut blocks: Vec<(f64, usize)> = Vec::new(); // (mean, length)
    for v in values {
        blocks.push((*v, 1));
        while let [.., (m0, n0), (m1, n1)] = blocks[..] {
            if m0 <= m1 {
                break;
            }
            blocks.pop();
            blocks.pop();
            let n = n0 + n1;
            blocks.push(((m0 * n0 as f64 + m1 * n1 as f64) / n as f64, n));
        }
    }
    blocks
        .iter()
        .flat_map(|(m, n)| std::iter::repeat_n(*m, *n))
        .collect()
}

#[test]
fn isotonic_pools_a_dip_and_keeps_a_rising_series() {
    assert_eq!(isotonic(&[1.0, 2.0, 3.0]), [1.0, 2.0, 3.0]);
    assert_eq!(isotonic(&[1.0, 4.0, 2.0, 5.0]), [1.0, 3.0, 3.0, 5.0]);
    assert_eq!(isotonic(&[3.0, 2.0, 1.0]), [2.0, 2.0, 2.0]);
}

/// A rule deeper than the programs probe would silently disable shallower rules: such a policy
/// is refused whole (whether its cgroup exists yet or not), and the live policy keeps working.
#[test]
fn kernel_a_rule_deeper_than_the_probed_levels_is_refused_and_changes_nothing() {
    if !kernel_available(
        "kernel_a_rule_deeper_than_the_probed_levels_is_refused_and_changes_nothing",
    ) {
        return;
    }
    let _serial = timing_shared();
    let target = tcp_sink("127.0.0.1:0");
    let deny = format!(
        "[[policy.rules]]\nname = \"shallow-deny\"\naction = \"deny\"\ncgroup = \"a\"\ncidrs = [\"127.0.0.1/32\"]\nports = [\"{}\"]\n",
        target.port()
    );
    let mut h = Harness::start("too-deep", &deny);
    let shallow = h.cg.child("a");
    h.dp.refresh_scopes().expect("refresh");
    assert_eq!(tcp_connect_from(&shallow, target), Outcome::Denied);

    // The same policy plus a rule 17 levels below the agent's cgroup root (which is itself a
    // level below the hierarchy root): the kernel could not probe both levels. Built by hand, as
    // a gRPC document would be (the config file refuses such depths when it is parsed).
    let deep_path: Vec<String> = (0..17).map(|i| format!("d{i}")).collect();
    let mut both = (*policy(&deny)).clone();
    let mut deep_rule = both.rules[0].clone();
    deep_rule.name = "deep".parse().expect("name");
    deep_rule.cgroup = Some(deep_path.join("/").parse().expect("path"));
    deep_rule.cidrs = vec!["10.9.9.9/32".parse().expect("cidr")];
    both.rules.push(deep_rule);
    for exists in [false, true] {
        if exists {
            h.cg.child(&deep_path.join("/"));
        }
        let e =
            h.dp.apply(&std::sync::Arc::new(both.clone()), None)
                .expect_err("a rule too deep must be refused");
        let message = e.to_string();
        assert!(
            message.contains("would be at level 18") && message.contains("levels 1 to 16"),
            "{message}"
        );
        h.dp.refresh_scopes().expect("refresh");
        assert_eq!(
            tcp_connect_from(&shallow, target),
            Outcome::Denied,
            "the shallow deny still holds (deep cgroup exists: {exists})"
        );
    }
}

/// A pending rule cgroup whose path can never be a cgroup (a component is a file) is reported
/// for its own rule; the follower keeps activating the others.
#[test]
fn kernel_a_bad_pending_cgroup_affects_only_its_own_rule() {
    if !kernel_available("kernel_a_bad_pending_cgroup_affects_only_its_own_rule") {
        return;
    }
    let _serial = timing_shared();
    let target = tcp_sink("127.0.0.1:0");
    let mut h = Harness::start(
        "bad-pending",
        &format!(
            r#"
            [[policy.rules]]
            name = "bad-path"
            action = "deny"
            cgroup = "aa/cgroup.procs/x"
            cidrs = ["127.0.0.1/32"]
            ports = ["{port}"]

            [[policy.rules]]
            name = "late"
            action = "deny"
            cgroup = "zz-late"
            cidrs = ["127.0.0.1/32"]
            ports = ["{port}"]
            "#,
            port = target.port()
        ),
    );
    assert_eq!(h.dp.status().pending_scopes.len(), 2);
    // `aa` appears: `aa/cgroup.procs` is a file, so `aa/cgroup.procs/x` can never be a cgroup.
    h.cg.child("aa");
    let changes =
        h.dp.refresh_scopes()
            .expect("one bad path must not stop the follower");
    assert!(
        changes.iter().any(|c| matches!(c, ScopeChange::Unresolvable { path, .. } if path.as_str() == "aa/cgroup.procs/x")),
        "{changes:?}"
    );
    // Reported once, not on every tick.
    assert!(h.dp.refresh_scopes().expect("refresh").is_empty());
    let late = h.cg.child("zz-late");
    let changes = h.dp.refresh_scopes().expect("refresh");
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, ScopeChange::Appeared { path, .. } if path.as_str() == "zz-late")),
        "{changes:?}"
    );
    assert_eq!(tcp_connect_from(&late, target), Outcome::Denied);
}
