//! Kernel tests of every path a tenant can send by (need root, cgroup v2 and BPF): unconnected
//! UDP, `connect()` then `sendto()` elsewhere, TCP Fast Open, IPv4-mapped destinations on IPv6
//! sockets, parking over IPv6 and mapped IPv4 (and UDP replies translated back), Degrade
//! without a park target, rules with more port ranges than a trie leaf holds, and cached
//! verdicts following scope changes. Each is judged by real calls from a child process placed
//! in a throwaway cgroup.

mod support;

use knhk_abi::{ACTION_DENY, ACTION_PARK};
use knhk_agent::model::{Class, ClassState};
use std::net::SocketAddr;
use support::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn kernel_unconnected_udp_is_judged_per_datagram() {
    if !kernel_available("kernel_unconnected_udp_is_judged_per_datagram") {
        return;
    }
    let _serial = timing_shared();
    let sink = udp_sink("0.0.0.0:0");
    let port = sink.port();
    let h = Harness::start(
        "udp-sendto",
        &format!(
            r#"
            [[policy.rules]]
            name = "no-statsd"
            action = "deny"
            cidrs = ["127.0.0.3/32", "fd00::3/128"]
            ports = ["{port}"]
            protocol = "udp"
            "#
        ),
    );
    let allowed = addr(&format!("127.0.0.1:{port}"));
    let denied = addr(&format!("127.0.0.3:{port}"));
    assert_eq!(udp_sendto_from(&h.cg.path, denied), Outcome::Denied);
    assert_eq!(udp_sendto_from(&h.cg.path, allowed), Outcome::Connected);
    // connect() to an allowed address, then sendto() a denied one on the same socket.
    assert_eq!(
        udp_connect_then_sendto_from(&h.cg.path, allowed, denied),
        (Outcome::Connected, Outcome::Denied)
    );
    // IPv6 sockets: an IPv4-mapped destination is judged by the IPv4 rule, a native one by the
    // IPv6 rule (sendmsg6). Nothing needs to listen at fd00::3: the verdict comes first.
    assert_eq!(
        udp_sendto_from(&h.cg.path, addr(&format!("[::ffff:127.0.0.3]:{port}"))),
        Outcome::Denied
    );
    assert_eq!(
        udp_sendto_from(&h.cg.path, addr(&format!("[fd00::3]:{port}"))),
        Outcome::Denied
    );
    assert_eq!(h.hits("no-statsd"), 4);
    let d = h.reader().decisions().expect("decisions");
    assert_eq!(d.total(ACTION_DENY), 4, "{d:?}");
}

#[test]
fn kernel_tcp_fast_open_and_mapped_connects_are_judged() {
    if !kernel_available("kernel_tcp_fast_open_and_mapped_connects_are_judged") {
        return;
    }
    let _serial = timing_shared();
    let sink = tcp_sink("0.0.0.0:0");
    let port = sink.port();
    let h = Harness::start(
        "tfo",
        &format!(
            r#"
            [[policy.rules]]
            name = "deny"
            action = "deny"
            cidrs = ["127.0.0.3/32"]
            ports = ["{port}"]
            "#
        ),
    );
    let denied = addr(&format!("127.0.0.3:{port}"));
    let allowed = addr(&format!("127.0.0.1:{port}"));
    // sendto(MSG_FASTOPEN) connects inside sendto(): connect4 judges it.
    assert_eq!(tcp_fastopen_from(&h.cg.path, denied), Outcome::Denied);
    assert_eq!(tcp_fastopen_from(&h.cg.path, allowed), Outcome::Connected);
    // A dual-stack socket to ::ffff:127.0.0.3: connect6 judges it by the IPv4 policy.
    let mapped = addr(&format!("[::ffff:127.0.0.3]:{port}"));
    assert_eq!(tcp_connect_from(&h.cg.path, mapped), Outcome::Denied);
    let mapped_ok = addr(&format!("[::ffff:127.0.0.1]:{port}"));
    assert_eq!(tcp_connect_from(&h.cg.path, mapped_ok), Outcome::Connected);
    assert_eq!(h.hits("deny"), 2);
}

#[test]
fn kernel_degrade_parks_over_ipv6_and_mapped_ipv4() {
    if !kernel_available("kernel_degrade_parks_over_ipv6_and_mapped_ipv4") {
        return;
    }
    let _serial = timing_shared();
    let lower6 = tcp_sink("[::1]:0");
    let lower4 = tcp_sink("127.0.0.1:0");
    // Nothing listens on port 9: admitted, a connect is refused by the stack; parked, it
    // reaches the lower tier.
    let h = Harness::start(
        "park6",
        &format!(
            r#"
            [[policy.rules]]
            name = "cold6"
            action = "allow"
            class = "C1"
            cidrs = ["::1/128"]
            ports = ["9"]
            park_to = "{lower6}"
            [[policy.rules]]
            name = "cold4"
            action = "allow"
            class = "C1"
            cidrs = ["127.0.0.2/32"]
            ports = ["9"]
            park_to = "{lower4}"
            "#
        ),
    );
    let (v6, mapped) = (addr("[::1]:9"), addr("[::ffff:127.0.0.2]:9"));
    assert_eq!(tcp_connect_from(&h.cg.path, v6), Outcome::Refused);
    assert_eq!(tcp_connect_from(&h.cg.path, mapped), Outcome::Refused);
    h.dp.class_state_writer()
        .set(Class::C1, ClassState::Degraded);
    assert_eq!(
        tcp_connect_from(&h.cg.path, v6),
        Outcome::Connected,
        "IPv6, parked on an IPv6 target"
    );
    assert_eq!(
        tcp_connect_from(&h.cg.path, mapped),
        Outcome::Connected,
        "mapped IPv4 on an IPv6 socket, parked on an IPv4 target (as ::ffff:a.b.c.d)"
    );
    let d = h.reader().decisions().expect("decisions");
    assert_eq!(d.get(ACTION_PARK, Class::C1), 2, "{d:?}");
}

#[test]
fn kernel_parked_udp_replies_come_from_the_address_sent_to() {
    if !kernel_available("kernel_parked_udp_replies_come_from_the_address_sent_to") {
        return;
    }
    let _serial = timing_shared();
    let echo = udp_echo("127.0.0.1:0");
    let h = Harness::start(
        "park-udp",
        &format!(
            r#"
            [[policy.rules]]
            name = "cold"
            action = "allow"
            class = "C1"
            cidrs = ["127.0.0.2/32"]
            ports = ["9"]
            protocol = "udp"
            park_to = "{echo}"
            "#
        ),
    );
    h.dp.class_state_writer()
        .set(Class::C1, ClassState::Degraded);
    // The datagram goes to the echo server; its reply must appear to come from 127.0.0.2:9.
    let sent_to = addr("127.0.0.2:9");
    assert_eq!(
        udp_request_reply_from(&h.cg.path, sent_to),
        (Outcome::Connected, Some(sent_to))
    );
    let mapped = addr("[::ffff:127.0.0.2]:9");
    assert_eq!(
        udp_request_reply_from(&h.cg.path, mapped),
        (Outcome::Connected, Some(mapped)),
        "an IPv6 socket sending to a mapped address"
    );
    let d = h.reader().decisions().expect("decisions");
    assert_eq!(d.get(ACTION_PARK, Class::C1), 2, "{d:?}");
}

#[test]
fn kernel_degrade_without_a_park_target_lowers_the_priority() {
    if !kernel_available("kernel_degrade_without_a_park_target_lowers_the_priority") {
        return;
    }
    let _serial = timing_shared();
    let sink = tcp_sink("127.0.0.1:0");
    let h = Harness::start(
        "prio",
        r#"
        [[policy.rules]]
        name = "cold"
        action = "allow"
        class = "C1"
        cidrs = ["127.0.0.0/8"]
        "#,
    );
    assert_eq!(
        tcp_connect_priority_from(&h.cg.path, sink),
        (Outcome::Connected, 0)
    );
    h.dp.class_state_writer()
        .set(Class::C1, ClassState::Degraded);
    assert_eq!(
        tcp_connect_priority_from(&h.cg.path, sink),
        (Outcome::Connected, 2),
        "admitted at SO_PRIORITY 2 (TC_PRIO_BULK)"
    );
}

#[test]
fn kernel_a_rule_with_more_ports_than_a_leaf_holds_is_enforced() {
    if !kernel_available("kernel_a_rule_with_more_ports_than_a_leaf_holds_is_enforced") {
        return;
    }
    let _serial = timing_shared();
    let last = tcp_sink("127.0.0.1:0");
    let other = tcp_sink("127.0.0.1:0");
    // 40 legacy ports: 39 unused ones, then the sink's, which lands in the second overflow
    // chunk (16 entries inline, 16 per chunk).
    let mut ports: Vec<String> = (0..39)
        .map(|i| 20_000 + i)
        .filter(|p| *p != last.port() && *p != other.port())
        .map(|p| format!("\"{p}\""))
        .collect();
    ports.push(format!("\"{}\"", last.port()));
    let h = Harness::start(
        "ports",
        &format!(
            "[[policy.rules]]\nname = \"legacy\"\naction = \"deny\"\ncidrs = [\"127.0.0.1/32\"]\nports = [{}]\n",
            ports.join(", ")
        ),
    );
    assert_eq!(tcp_connect_from(&h.cg.path, last), Outcome::Denied);
    assert_eq!(tcp_connect_from(&h.cg.path, other), Outcome::Connected);
    assert_eq!(h.hits("legacy"), 1);
}

#[test]
fn kernel_cached_verdicts_follow_scope_changes() {
    if !kernel_available("kernel_cached_verdicts_follow_scope_changes") {
        return;
    }
    let _serial = timing_shared();
    let sink = tcp_sink("127.0.0.1:0");
    let mut h = Harness::start(
        "cache",
        "[[policy.rules]]\nname = \"late\"\naction = \"deny\"\ncgroup = \"late\"\ncidrs = [\"127.0.0.1/32\"]\n",
    );
    // The rule's cgroup appears after the policy: until the follower writes its scope, its
    // connects are judged (and cached) by the global scope.
    let late = h.cg.child("late");
    assert_eq!(tcp_connect_from(&late, sink), Outcome::Connected);
    assert_eq!(tcp_connect_from(&late, sink), Outcome::Connected);
    let changes = h.dp.refresh_scopes().expect("refresh");
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(
        tcp_connect_from(&late, sink),
        Outcome::Denied,
        "the cached allow is gone once the scope is written"
    );
}
