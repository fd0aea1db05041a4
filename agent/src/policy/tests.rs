use super::*;
use std::net::IpAddr;

/// The `[[policy.rules]]` of a TOML text (the compiler's input; config-level checks are the
/// config module's).
fn rules(text: &str) -> Vec<RuleSpec> {
    #[derive(serde::Deserialize)]
    struct Doc {
        policy: Section,
    }
    #[derive(serde::Deserialize)]
    struct Section {
        rules: Vec<RuleSpec>,
    }
    toml::from_str::<Doc>(text).expect("valid").policy.rules
}

#[test]
fn the_digest_encoding_is_stable() {
    // Version 1 of the canonical text, byte for byte: digests recorded in receipts by earlier
    // versions must still compare equal.
    let policy = Policy {
        rules: rules(
            "[[policy.rules]]\nname = \"r\"\naction = \"deny\"\nclass = \"R1\"\ncgroup = \"a/b\"\n\
             cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]\nports = [\"80\", \"8000-8080\"]\nprotocol = \"tcp\"\n\
             park_to = \"127.0.0.1:9090\"\n\
             [[policy.rules]]\nname = \"s\"\naction = \"audit\"\ncidrs = [\"0.0.0.0/0\"]\nprotocol = \"udp\"\n",
        ),
        mode: Mode::Enforce,
        default_action: DefaultAction::Allow,
        default_class: Class::C1,
        heat: true,
        heat_sample_every: 16,
        histograms: true,
        histogram_interval_us: 1000,
        verdict_events: true,
    };
    assert_eq!(
        policy.canonical_text(),
        "mode=Enforce\ndefault_action=Allow\ndefault_class=C1\n\
         name=r action=Deny class=R1 cgroup=a/b cidrs=10.0.0.0/8,fd00::/8 ports=80,8000-8080 protocol=Tcp park_to=127.0.0.1:9090\n\
         name=s action=Audit class=C1 cgroup= cidrs=0.0.0.0/0 ports= protocol=Udp park_to=\n"
    );
    assert_eq!(DIGEST_VERSION, 1);
    assert_eq!(policy.digest().len(), 64, "a version-1 digest is bare hex");
}

/// What the kernel would decide: longest prefix in the table, then the first matching entry.
/// Returns the index of the deciding rule (counters are index + 1 here).
fn decide(table: &ScopeTable, ip: &str, port: u16, proto: u8) -> Option<u32> {
    let ip: IpAddr = ip.parse().expect("ip");
    let leaf = match ip {
        IpAddr::V4(a) => table
            .v4
            .iter()
            .filter(|(n, _)| n.contains(&a))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, l)| l),
        IpAddr::V6(a) => table
            .v6
            .iter()
            .filter(|(n, _)| n.contains(&a))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, l)| l),
    }?;
    leaf.first_match(port, proto).map(|e| e.counter - 1)
}

fn compile(rs: &[RuleSpec], scope: Option<&str>) -> ScopeTable {
    let counters = Counters::from((1..=rs.len() as u32).collect::<Vec<u32>>());
    let scope = scope.map(|s| s.parse::<CgroupPath>().expect("path"));
    compile_scope(
        rs,
        &Bindings::default(),
        scope.as_ref(),
        &counters,
        Class::C1,
    )
    .expect("compiles")
}

const TCP: u8 = knhk_abi::PROTO_TCP;
const UDP: u8 = knhk_abi::PROTO_UDP;

#[test]
fn longest_prefix_wins_and_ports_fall_back_to_shorter_prefixes() {
    let rs = rules(
        r#"
        [[policy.rules]]
        name = "deny-net"
        action = "deny"
        cidrs = ["10.0.0.0/8"]
        [[policy.rules]]
        name = "allow-web-host"
        action = "allow"
        cidrs = ["10.1.2.3/32"]
        ports = ["443"]
        protocol = "tcp"
        "#,
    );
    let t = compile(&rs, None);
    assert_eq!(decide(&t, "10.1.2.3", 443, TCP), Some(1));
    assert_eq!(
        decide(&t, "10.1.2.3", 443, UDP),
        Some(0),
        "protocol mismatch falls back to the /8"
    );
    assert_eq!(
        decide(&t, "10.1.2.3", 80, TCP),
        Some(0),
        "port mismatch falls back to the /8"
    );
    assert_eq!(decide(&t, "10.9.9.9", 443, TCP), Some(0));
    assert_eq!(decide(&t, "11.0.0.1", 443, TCP), None);
}

#[test]
fn declaration_order_breaks_ties_and_catch_alls_end_the_leaf() {
    let rs = rules(
        r#"
        [[policy.rules]]
        name = "first"
        action = "allow"
        cidrs = ["192.168.0.0/16"]
        [[policy.rules]]
        name = "second"
        action = "deny"
        cidrs = ["192.168.0.0/16"]
        "#,
    );
    let t = compile(&rs, None);
    assert_eq!(decide(&t, "192.168.1.1", 1, TCP), Some(0));
    assert_eq!(t.v4[0].1.leaf.len, 1, "the shadowed catch-all is dropped");
}

#[test]
fn scoped_rules_override_inherited_ones() {
    let rs = rules(
        r#"
        [[policy.rules]]
        name = "global-deny"
        action = "deny"
        cidrs = ["10.0.0.0/8"]
        [[policy.rules]]
        name = "tenant-allow-https"
        action = "allow"
        cgroup = "tenants/a"
        cidrs = ["0.0.0.0/0"]
        ports = ["443"]
        [[policy.rules]]
        name = "other-tenant"
        action = "deny"
        cgroup = "tenants/b"
        cidrs = ["0.0.0.0/0"]
        "#,
    );
    let global = compile(&rs, None);
    assert_eq!(decide(&global, "10.1.1.1", 443, TCP), Some(0));
    assert_eq!(
        decide(&global, "8.8.8.8", 443, TCP),
        None,
        "scoped rules are not global"
    );
    let a = compile(&rs, Some("tenants/a"));
    assert_eq!(
        decide(&a, "10.1.1.1", 443, TCP),
        Some(1),
        "the scope's own rule wins over the longer global prefix"
    );
    assert_eq!(
        decide(&a, "10.1.1.1", 80, TCP),
        Some(0),
        "inherited rules still apply"
    );
    assert_eq!(decide(&a, "8.8.8.8", 80, TCP), None);
    let b = compile(&rs, Some("tenants/b"));
    assert_eq!(decide(&b, "8.8.8.8", 443, TCP), Some(2));
}

#[test]
fn ipv6_and_counters_and_classes_are_carried() {
    let rs = rules(
        r#"
        [[policy.rules]]
        name = "v6"
        action = "audit"
        class = "R1"
        cidrs = ["fd00::/8", "10.0.0.0/8"]
        ports = ["1-2", "5"]
        "#,
    );
    let t = compile(&rs, None);
    assert_eq!((t.v4.len(), t.v6.len()), (1, 1));
    let leaf = &t.v6[0].1.leaf;
    assert_eq!(leaf.len, 2);
    assert_eq!(leaf.entries[0].action, knhk_abi::ACTION_AUDIT);
    assert_eq!(leaf.entries[0].class, knhk_abi::CLASS_R1);
    assert_eq!(decide(&t, "fd00::1", 5, UDP), Some(0));
    assert_eq!(decide(&t, "fd00::1", 3, UDP), None);
}

#[test]
fn too_many_overlapping_entries_is_a_precise_error() {
    let mut text = String::new();
    for i in 0..=MAX_LEAF_ENTRIES {
        text.push_str(&format!(
            "[[policy.rules]]\nname = \"r{i}\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/8\"]\nports = [\"{}\"]\n",
            1000 + i
        ));
    }
    let rs = rules(&text);
    let counters = Counters::from((1..=rs.len() as u32).collect::<Vec<u32>>());
    let e = compile_scope(&rs, &Bindings::default(), None, &counters, Class::C1)
        .expect_err("overflow")
        .to_string();
    assert!(
        e.contains(&format!("{} rule entries", MAX_LEAF_ENTRIES + 1)),
        "{e}"
    );
    assert!(e.contains("cover 10.0.0.0/8"), "{e}");
    assert!(e.contains("r0, r1"), "{e}");
}

#[test]
fn ten_thousand_host_rules_compile_quickly() {
    let mut text = String::new();
    for i in 0..10_000 {
        text.push_str(&format!(
            "[[policy.rules]]\nname = \"h{i}\"\naction = \"deny\"\ncidrs = [\"10.{}.{}.1/32\"]\n",
            i / 256,
            i % 256
        ));
    }
    let rs = rules(&text);
    let t = compile(&rs, None);
    assert_eq!(t.v4.len(), 10_000);
    assert_eq!(decide(&t, "10.1.2.1", 1, TCP), Some(258));
}

#[test]
fn a_rule_with_more_ports_than_a_leaf_holds_continues_in_chunks() {
    // 40 single ports: 16 inline, then chunks of 16 and 8. The last port must still decide.
    let ports: Vec<String> = (0..40).map(|i| format!("\"{}\"", 2000 + 3 * i)).collect();
    let rs = rules(&format!(
        "[[policy.rules]]\nname = \"legacy\"\naction = \"deny\"\ncidrs = [\"10.1.0.0/16\"]\nports = [{}]\n\
         [[policy.rules]]\nname = \"rest\"\naction = \"allow\"\ncidrs = [\"10.0.0.0/8\"]\n",
        ports.join(", ")
    ));
    let t = compile(&rs, None);
    let (_, leaf) =
        t.v4.iter()
            .find(|(n, _)| n.prefix_len() == 16)
            .expect("the /16 leaf");
    assert_eq!(leaf.leaf.len, 16);
    assert_eq!(
        leaf.overflow.iter().map(|c| c.len).collect::<Vec<_>>(),
        [16, 9],
        "24 more ports, then the /8 rule's catch-all"
    );
    assert_eq!(decide(&t, "10.1.2.3", 2000 + 3 * 39, TCP), Some(0));
    assert_eq!(decide(&t, "10.1.2.3", 2000 + 3 * 15, TCP), Some(0));
    assert_eq!(decide(&t, "10.1.2.3", 2001, TCP), Some(1));
}

fn pod(ns: &str, name: &str, labels: &[(&str, &str)], containers: &[&str]) -> crate::model::Pod {
    let cgroup: CgroupPath = format!("kubepods/besteffort/pod{name}")
        .parse()
        .expect("path");
    crate::model::Pod {
        uid: name.into(),
        namespace: ns.into(),
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        containers: containers
            .iter()
            .map(|c| crate::model::workload::Container {
                name: c.to_string(),
                id: format!("{c}0000000000000"),
                cgroup: format!("{cgroup}/{c}0000000000000").parse().expect("path"),
            })
            .collect(),
        cgroup,
    }
}

fn inventory(unknown: Action, pods: Vec<crate::model::Pod>) -> Inventory {
    Inventory {
        kubepods_root: "kubepods".parse().expect("path"),
        unknown_pod_action: unknown,
        pods,
        unclassified: vec![],
    }
}

#[test]
fn selector_rules_bind_to_the_selected_pods_and_override_outer_cgroup_rules() {
    let rs = rules(
        "[[policy.rules]]\nname = \"kube-allow\"\naction = \"allow\"\ncgroup = \"kubepods\"\ncidrs = [\"10.0.0.0/8\"]\n\
         [[policy.rules]]\nname = \"api-deny\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/8\"]\nnamespace = \"payments\"\n\
         pod_selector = { match_labels = { app = \"api\" } }\n\
         [[policy.rules]]\nname = \"sidecar-deny\"\naction = \"deny\"\ncidrs = [\"10.1.0.0/16\"]\ncontainer = \"proxy\"\n",
    );
    let inv = inventory(
        Action::Allow,
        vec![
            pod("payments", "a", &[("app", "api")], &["app", "proxy"]),
            pod("payments", "b", &[("app", "web")], &["app"]),
            pod("shop", "c", &[("app", "api")], &["proxy"]),
        ],
    );
    let b = bind(&rs, Some(&inv));
    let paths =
        |i: usize| -> Vec<String> { b.selected[&i].iter().map(|p| p.to_string()).collect() };
    assert_eq!(paths(1), vec!["kubepods/besteffort/poda"]);
    assert_eq!(
        paths(2),
        vec![
            "kubepods/besteffort/poda/proxy0000000000000",
            "kubepods/besteffort/podc/proxy0000000000000"
        ]
    );
    assert!(b.guard.is_none(), "allow: no guard");
    let counters = Counters::from((1..=rs.len() as u32).collect::<Vec<u32>>());
    let table = |scope: &str| {
        let scope: CgroupPath = scope.parse().expect("path");
        compile_scope(&rs, &b, Some(&scope), &counters, Class::C1).expect("compiles")
    };
    // Pod a: its selector rule (deeper than kubepods) wins over the outer cgroup rule.
    assert_eq!(
        decide(&table("kubepods/besteffort/poda"), "10.2.3.4", 80, 6),
        Some(1)
    );
    // Its proxy container: the container rule (deeper still) for 10.1/16, the pod's for the rest.
    let proxy = table("kubepods/besteffort/poda/proxy0000000000000");
    assert_eq!(decide(&proxy, "10.1.2.3", 80, 6), Some(2));
    assert_eq!(decide(&proxy, "10.2.3.4", 80, 6), Some(1));
    // Pod b matches no selector: the cgroup rule decides.
    assert_eq!(
        decide(&table("kubepods/besteffort/podb"), "10.2.3.4", 80, 6),
        Some(0)
    );
    // Scopes: the rule cgroup and every bound workload.
    let all: Vec<String> = scopes_of(&rs, &b).iter().map(|p| p.to_string()).collect();
    assert_eq!(all.len(), 4, "{all:?}");
    // No inventory (discovery off): selector rules apply nowhere.
    assert_eq!(bind(&rs, None), Bindings::default());
}

#[test]
fn the_guard_catches_unclassified_pods_only() {
    let rs =
        rules("[[policy.rules]]\nname = \"all\"\naction = \"allow\"\ncidrs = [\"0.0.0.0/0\"]\n");
    let inv = inventory(Action::Deny, vec![pod("ns", "known", &[], &["app"])]);
    let b = bind(&rs, Some(&inv));
    let counters = Counters::from(vec![1, 2]);
    let decide_at = |scope: &str| {
        let scope: CgroupPath = scope.parse().expect("path");
        let t = compile_scope(&rs, &b, Some(&scope), &counters, Class::C1).expect("compiles");
        decide(&t, "192.0.2.1", 443, 6)
    };
    // The guard (counter 2, index 1) decides for the pods root and a QoS directory...
    assert_eq!(decide_at("kubepods"), Some(1));
    assert_eq!(decide_at("kubepods/besteffort"), Some(1));
    // ...but not for a known pod or its containers, nor outside the pods root.
    assert_eq!(decide_at("kubepods/besteffort/podknown"), Some(0));
    assert_eq!(
        decide_at("kubepods/besteffort/podknown/app0000000000000"),
        Some(0)
    );
    assert_eq!(decide_at("system.slice"), Some(0));
    let scopes: Vec<String> = scopes_of(&rs, &b).iter().map(|p| p.to_string()).collect();
    assert_eq!(scopes, vec!["kubepods", "kubepods/besteffort/podknown"]);
}

#[test]
fn selector_rules_have_their_own_digest_line_and_round_trip() {
    let rs = rules(
        "[[policy.rules]]\nname = \"s\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/8\"]\nnamespace = [\"b\", \"a\"]\n\
         pod_selector = { match_labels = { app = \"api\" }, match_expressions = [{ key = \"tier\", operator = \"In\", values = [\"y\", \"x\"] }] }\n\
         container = \"app\"\n",
    );
    let policy = Policy {
        rules: rs,
        mode: Mode::Enforce,
        default_action: DefaultAction::Allow,
        default_class: Class::C1,
        heat: false,
        heat_sample_every: 1,
        histograms: false,
        histogram_interval_us: 0,
        verdict_events: true,
    };
    assert!(
        policy
            .canonical_text()
            .ends_with(" park_to= workloads=ns=a,b pods={app=api;tier In (x,y)} container=app\n"),
        "{}",
        policy.canonical_text()
    );
    // The TOML form reads back to the same rules.
    let text = policy.to_config_toml();
    assert_eq!(rules(&text), policy.rules, "{text}");
}

#[test]
fn each_expansion_of_a_selector_rule_counts_on_its_own_counter() {
    let rs = rules(
        "[[policy.rules]]\nname = \"all\"\naction = \"allow\"\ncgroup = \"kubepods\"\ncidrs = [\"0.0.0.0/0\"]\n\
         [[policy.rules]]\nname = \"api-deny\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/8\"]\nnamespace = \"payments\"\n\
         pod_selector = { match_labels = { app = \"api\" } }\n\
         [[policy.rules]]\nname = \"proxy-deny\"\naction = \"deny\"\ncidrs = [\"10.1.0.0/16\"]\ncontainer = \"proxy\"\n",
    );
    let inv = inventory(
        Action::Allow,
        vec![
            pod("payments", "a", &[("app", "api")], &["app", "proxy"]),
            pod("payments", "b", &[("app", "api")], &["app"]),
            pod("payments", "c", &[("app", "web")], &["app"]),
        ],
    );
    let b = bind(&rs, Some(&inv));
    let path = |s: &str| -> CgroupPath { s.parse().expect("path") };
    let (pa, pb) = (
        path("kubepods/besteffort/poda"),
        path("kubepods/besteffort/podb"),
    );
    let proxy = path("kubepods/besteffort/poda/proxy0000000000000");
    // Every bound cgroup is named with its pod.
    let expansions: Vec<(usize, String)> =
        b.expansions().map(|(i, p)| (i, p.to_string())).collect();
    assert_eq!(
        expansions,
        vec![
            (1, pa.to_string()),
            (1, pb.to_string()),
            (2, proxy.to_string())
        ]
    );
    assert_eq!(
        b.owners.get(&proxy),
        Some(&PodName {
            namespace: "payments".into(),
            name: "a".into()
        })
    );
    // Rules count on 1, 2, 3; the expansions of api-deny on 10 (pod a) and 11 (pod b); the
    // proxy container's has none of its own (as past the attribution bound).
    let mut counters = Counters::from(vec![1, 2, 3]);
    counters.pods.insert(
        1,
        [(pa.clone(), 10), (pb.clone(), 11)].into_iter().collect(),
    );
    let counter_at = |scope: &CgroupPath, ip: &str| {
        let t = compile_scope(&rs, &b, Some(scope), &counters, Class::C1).expect("compiles");
        let ip: std::net::Ipv4Addr = ip.parse().expect("ip");
        t.v4.iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .and_then(|(_, l)| l.first_match(80, 6))
            .map(|e| e.counter)
    };
    assert_eq!(counter_at(&pa, "10.2.3.4"), Some(10), "pod a's expansion");
    assert_eq!(counter_at(&pb, "10.2.3.4"), Some(11), "pod b's expansion");
    // The proxy container inherits pod a's expansion of api-deny; its own rule, without an
    // expansion counter, counts on the rule's: attributed to the rule, never to another pod.
    assert_eq!(counter_at(&proxy, "10.2.3.4"), Some(10));
    assert_eq!(counter_at(&proxy, "10.1.2.3"), Some(3));
    // A pod the selector does not select: the cgroup rule.
    assert_eq!(
        counter_at(&path("kubepods/besteffort/podc"), "10.2.3.4"),
        Some(1)
    );
    // A change of an expansion's counter changes its scope's signature (its table is rewritten).
    let mut moved = counters.clone();
    moved.pods.entry(1).or_default().insert(pb.clone(), 12);
    assert_eq!(
        scope_signature(&b, &counters, &pa),
        scope_signature(&b, &moved, &pa)
    );
    assert_ne!(
        scope_signature(&b, &counters, &pb),
        scope_signature(&b, &moved, &pb)
    );
    assert_eq!(counters.of(1, Some(&pa)), 10);
    assert_eq!(
        counters.of(2, Some(&proxy)),
        3,
        "no expansion counter: the rule's"
    );
    assert_eq!(counters.of(9, None), 0, "no such rule: the no-rule counter");
}
