use super::*;
use crate::model::{CgroupPath, Mode, PortRange, Protocol};

/// The "Fortune 5 Configuration" example of the readiness plan, verbatim.
const PLAN_EXAMPLE: &str = include_str!("../../../tests/data/fortune5-plan.toml");

fn err(text: &str) -> String {
    Config::parse(text, "test.toml")
        .expect_err("must be refused")
        .to_string()
}

fn rule(body: &str) -> String {
    format!("[[policy.rules]]\nname = \"r\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/8\"]\n{body}")
}

#[test]
fn the_plans_example_loads_unchanged() {
    let c = Config::parse(PLAN_EXAMPLE, "plan").expect("the plan's example must load");
    assert_eq!(
        c.agent.listen_address.map(|a| a.to_string()).as_deref(),
        Some("0.0.0.0:50051")
    );
    assert_eq!(
        c.kms.as_ref().and_then(|k| k.rotation_interval_hours),
        Some(24)
    );
    assert_eq!(c.slo.as_ref().and_then(|s| s.r1_p99_max_ns), Some(2));
    assert_eq!(
        c.inactive_sections(),
        vec![],
        "[slo] (the beat engine), [spiffe] (mTLS), [kms] (receipts), [multi_region] (sync) and [promotion] are active"
    );
    let promotion = &c.settings.promotion;
    assert_eq!(promotion.ring, crate::model::Ring::Production);
    assert!(promotion.auto_rollback);
    assert_eq!(promotion.slo_threshold, 0.95);
    let sync = c
        .settings
        .sync
        .clone()
        .expect("[sidecar.multi_region] enables sync");
    assert_eq!(
        (sync.region.as_str(), sync.peers.len(), sync.quorum),
        ("us-east-1", 2, 2)
    );
    let identity = c
        .settings
        .identity
        .clone()
        .expect("[sidecar.spiffe] enables identity");
    assert_eq!(identity.trust_domain.as_str(), "fortune5.example.com");
    let warnings = c.warnings();
    assert!(
        warnings.iter().any(|w| w.contains(
            "slo.r1_p99_max_ns: a ceiling of 2 ns is below what a TCP handshake can take"
        )),
        "{warnings:?}"
    );
    // What the plan's own example gets wrong, each said once.
    for needle in [
        "spiffe.authorized_ids.policy_writers is empty",
        "spiffe.authorized_ids.region_peers is empty",
        "kms.key_id \"arn:aws:kms:us-east-1:123456789012:key/abc123\" names one key",
        "multi_region.primary_region = \"us-east-1\" has no effect",
        "every class is paused within three beats",
    ] {
        assert_eq!(
            warnings.iter().filter(|w| w.contains(needle)).count(),
            1,
            "{needle:?} in {warnings:#?}"
        );
    }
    assert!(c.policy.rules.is_empty());
}

/// The warnings of a configuration that loads.
fn warnings(text: &str) -> Vec<String> {
    Config::parse(text, "t.toml")
        .unwrap_or_else(|e| panic!("must load: {e}"))
        .warnings()
}

const SPIFFE: &str = "[spiffe]\nenabled = true\ntrust_domain = \"td\"\n";
const KMS_FILE: &str = "[kms]\nprovider = \"file\"\nkey_dir = \"/k\"\n";

#[test]
fn https_peers_without_spiffe_are_warned_about() {
    let sync = "[multi_region]\nregion = \"a\"\ncross_region_sync_enabled = true\n\
                receipt_sync_endpoints = [\"https://b.example:50051\"]\n";
    let w = warnings(&format!("{KMS_FILE}{sync}"));
    assert!(
        w.iter()
            .any(|w| w.contains("https://b.example:50051 use https://")
                && w.contains("[spiffe] is not enabled")),
        "{w:#?}"
    );
    // With [spiffe] (and region_peers) that warning is gone.
    let w = warnings(&format!(
        "{KMS_FILE}{sync}{SPIFFE}[spiffe.authorized_ids]\nregion_peers = [\"spiffe://td/b\"]\n"
    ));
    assert!(w.is_empty(), "{w:#?}");
}

#[test]
fn sync_without_region_peers_is_warned_about() {
    let sync = "[multi_region]\nregion = \"a\"\ncross_region_sync_enabled = true\n\
                receipt_sync_endpoints = [\"https://b.example:50051\"]\n";
    let w = warnings(&format!("{KMS_FILE}{sync}{SPIFFE}"));
    assert!(
        w.iter()
            .any(|w| w.contains("spiffe.authorized_ids.region_peers is empty")),
        "{w:#?}"
    );
}

#[test]
fn a_remote_api_without_policy_writers_is_warned_about() {
    let w = warnings(&format!(
        "[agent]\nlisten_address = \"0.0.0.0:50051\"\n{SPIFFE}"
    ));
    assert!(
        w.iter()
            .any(|w| w.contains("spiffe.authorized_ids.policy_writers is empty")),
        "{w:#?}"
    );
    let w = warnings(&format!(
        "[agent]\nlisten_address = \"0.0.0.0:50051\"\n{SPIFFE}[spiffe.authorized_ids]\npolicy_writers = [\"spiffe://td/ops\"]\n"
    ));
    assert!(w.is_empty(), "{w:#?}");
}

#[test]
fn the_plans_azure_fields_load_as_an_azure_signer() {
    let aws = "provider = \"aws\"\nregion = \"us-east-1\"\nkey_id = \"arn:aws:kms:us-east-1:123456789012:key/abc123\"\n";
    assert!(PLAN_EXAMPLE.contains(aws));
    let azure = PLAN_EXAMPLE.replace(
        aws,
        "provider = \"azure\"\nvault_url = \"https://fortune5.vault.azure.net/\"\nkey_name = \"knhk-receipts\"\n",
    );
    let c = Config::parse(&azure, "plan").expect("the plan with Azure Key Vault loads");
    assert_eq!(
        c.settings.receipts.as_ref().map(|r| &r.signer),
        Some(&crate::config::SignerSettings::Azure {
            vault_url: "https://fortune5.vault.azure.net/".into(),
            key_name: "knhk-receipts".into(),
            ca_file: None,
        })
    );
}

#[test]
fn an_aws_key_that_cannot_rotate_is_warned_about() {
    let kms = |key: &str| {
        format!("[kms]\nprovider = \"aws\"\nregion = \"us-east-1\"\nkey_id = \"{key}\"\nrotation_interval_hours = 6\n")
    };
    let w = warnings(&kms("1234abcd-12ab-34cd-56ef-1234567890ab"));
    assert!(
        w.iter()
            .any(|w| w.contains("names one key") && w.contains("after 6 h")),
        "{w:#?}"
    );
    assert!(warnings(&kms("alias/knhk-receipts")).is_empty());
}

#[test]
fn primary_region_is_said_to_have_no_effect() {
    let w = warnings("[multi_region]\nregion = \"a\"\nprimary_region = \"a\"\n");
    assert!(
        w.iter()
            .any(|w| w.contains("primary_region = \"a\" has no effect")),
        "{w:#?}"
    );
}

#[test]
fn strict_with_an_unmeetable_r1_ceiling_is_warned_about() {
    let w = warnings("[slo]\nr1_p99_max_ns = 2\nadmission_strategy = \"strict\"\n");
    assert!(
        w.iter().any(|w| w.contains("every class is paused")),
        "{w:#?}"
    );
    let w = warnings("[slo]\nr1_p99_max_ns = 2\nadmission_strategy = \"degrade\"\n");
    assert!(
        !w.iter().any(|w| w.contains("every class is paused")),
        "{w:#?}"
    );
}

#[test]
fn what_run_would_refuse_is_refused_at_load() {
    // More rule entries on one prefix than a kernel leaf holds: the compiler's error, with the
    // rule's line.
    let rule = |n: u16| {
        let ports: Vec<String> = (1..=n).map(|p| format!("\"{p}\"")).collect();
        format!(
            "[agent]\nmode = \"enforce\"\n\n[[policy.rules]]\nname = \"legacy\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/8\"]\nports = [{}]\n",
            ports.join(", ")
        )
    };
    // "Deny these 17 legacy ports" is one rule (the leaf continues in overflow chunks).
    Config::parse(&rule(17), "t").expect("17 ports fit");
    let e = err(&rule(1025));
    assert!(
        e.contains("line 4: policy.rules[0]") && e.contains("1025 port ranges"),
        "{e}"
    );
    // A non-loopback API without mTLS.
    let e = err("[agent]\nlisten_address = \"0.0.0.0:50051\"\n");
    assert!(
        e.contains("agent.listen_address") && e.contains("not a loopback address"),
        "{e}"
    );
}

#[test]
fn the_embedded_default_is_valid_and_safe() {
    let c = Config::embedded_default();
    assert_eq!(c.agent.mode, Mode::Audit);
    assert!(c.agent.metrics_address.ip().is_loopback());
    assert_eq!(
        c.agent.listen_address, None,
        "no plaintext TCP API by default"
    );
    assert_eq!(
        c.api_listen(),
        ApiListen::Unix {
            path: "/run/knhk/agent.sock".into(),
            group: None
        }
    );
    assert!(c.agent.detach_on_exit);
    assert_eq!(c.policy.rules.len(), 2);
}

#[test]
fn the_issue_example_rule_parses() {
    let c = Config::parse(
        r#"
        [agent]
        default_action = "allow"
        mode = "enforce"
        [[policy.rules]]
        name = "no-telnet"
        action = "deny"
        class = "C1"
        cgroup = "kubepods/besteffort"
        cidrs = ["10.0.0.0/8", "fd00::/8"]
        ports = ["23", "8000-8080"]
        protocol = "tcp"
        "#,
        "t",
    )
    .expect("valid");
    let r = &c.policy.rules[0];
    assert_eq!(r.ports.as_ref().map(Vec::len), Some(2));
    assert_eq!(
        r.ports.as_ref().map(|p| p[1]),
        Some(PortRange { lo: 8000, hi: 8080 })
    );
    assert_eq!(r.cgroup.as_ref().map(|c| c.depth()), Some(2));
    assert_eq!(r.protocol, Protocol::Tcp);
}

#[test]
fn bad_input_is_refused_with_file_line_and_reason() {
    let cases: &[(&str, String, &[&str])] = &[
        (
            "unknown key",
            "[agent]\nmoed = \"audit\"\n".into(),
            &["test.toml", "line 2", "unknown field `moed`", "mode"],
        ),
        (
            "unknown table",
            "[agnet]\n".into(),
            &["line 1", "unknown field `agnet`"],
        ),
        (
            "unknown rule key",
            rule("prots = [\"80\"]\n"),
            &["line 5", "unknown field `prots`"],
        ),
        (
            "prefix too long",
            "[[policy.rules]]\nname = \"r\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/33\"]\n".into(),
            &[
                "line 4",
                "\"10.0.0.0/33\" is not a valid prefix: length 33 exceeds 32 for IPv4",
            ],
        ),
        (
            "v6 prefix too long",
            "[[policy.rules]]\nname = \"r\"\naction = \"deny\"\ncidrs = [\"fd00::/129\"]\n".into(),
            &["exceeds 128 for IPv6"],
        ),
        (
            "not an address",
            "[[policy.rules]]\nname = \"r\"\naction = \"deny\"\ncidrs = [\"10.0.0/8\"]\n".into(),
            &["\"10.0.0\" is not an IP address"],
        ),
        (
            "host bits",
            "[[policy.rules]]\nname = \"r\"\naction = \"deny\"\ncidrs = [\"10.0.0.1/8\"]\n".into(),
            &["host bits", "did you mean \"10.0.0.0/8\""],
        ),
        (
            "port range out of order",
            rule("ports = [\"8080-8000\"]\n"),
            &["line 5", "out of order: 8080 > 8000"],
        ),
        (
            "port too big",
            rule("ports = [\"70000\"]\n"),
            &["\"70000\" is not a port"],
        ),
        (
            "port integer too big",
            rule("ports = [70000]\n"),
            &["70000 is not a port"],
        ),
        (
            "empty ports",
            rule("ports = []\n"),
            &["policy.rules[0].ports", "empty ports list"],
        ),
        (
            "unknown class",
            rule("class = \"X9\"\n"),
            &["line 5", "unknown variant `X9`"],
        ),
        (
            "unknown action",
            "[[policy.rules]]\nname = \"r\"\naction = \"drop\"\ncidrs = [\"10.0.0.0/8\"]\n".into(),
            &["line 3", "unknown variant `drop`", "allow"],
        ),
        (
            "unknown protocol",
            rule("protocol = \"sctp\"\n"),
            &["unknown variant `sctp`"],
        ),
        (
            "unknown mode",
            "[agent]\nmode = \"yolo\"\n".into(),
            &["unknown variant `yolo`", "enforce"],
        ),
        (
            "duplicate names",
            format!("{}{}", rule(""), rule("")),
            &[
                "test.toml, line 5",
                "policy.rules[1].name",
                "duplicate rule name \"r\" (first defined at line 1)",
            ],
        ),
        (
            "no cidrs",
            "[[policy.rules]]\nname = \"r\"\naction = \"deny\"\ncidrs = []\n".into(),
            &["policy.rules[0].cidrs", "has no cidrs"],
        ),
        (
            "missing cidrs",
            "[[policy.rules]]\nname = \"r\"\naction = \"deny\"\n".into(),
            &["missing field `cidrs`"],
        ),
        (
            "bad rule name",
            "[[policy.rules]]\nname = \"a b\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/8\"]\n"
                .into(),
            &["contains ' '"],
        ),
        (
            "absolute cgroup",
            rule("cgroup = \"/kubepods\"\n"),
            &["drop the leading '/'"],
        ),
        (
            "dotdot cgroup",
            rule("cgroup = \"a/../b\"\n"),
            &["invalid component \"..\""],
        ),
        (
            "wrong type",
            "[agent]\nheat_enabled = \"yes\"\n".into(),
            &["line 2", "invalid type: string \"yes\", expected a boolean"],
        ),
        (
            "heat out of range",
            "[agent]\nheat_max_entries = 0\n".into(),
            &["agent.heat_max_entries", "0 is out of range"],
        ),
        (
            "bad address",
            "[agent]\nmetrics_address = \"localhost\"\n".into(),
            &["line 2", "invalid socket address"],
        ),
        (
            "rotation above 24h",
            "[kms]\nprovider = \"file\"\nkey_dir = \"/k\"\nrotation_interval_hours = 25\n".into(),
            &["kms.rotation_interval_hours", "25 is out of range"],
        ),
        (
            "unknown kms provider",
            "[kms]\nprovider = \"gcp\"\n".into(),
            &["kms.provider", "unknown provider \"gcp\""],
        ),
        (
            "malformed key ARN",
            "[kms]\nprovider = \"aws\"\nregion = \"us-east-1\"\nkey_id = \"arn:aws:kms:us-east-1:123:key/abc\"\n".into(),
            &["kms.key_id", "is not a KMS key ARN"],
        ),
        (
            "vault without a key name",
            "[kms]\nprovider = \"vault\"\naddr = \"http://127.0.0.1:8200\"\n".into(),
            &["kms.key_name", "is required with provider = \"vault\""],
        ),
        (
            "azure without a vault",
            "[kms]\nprovider = \"azure\"\nkey_name = \"k\"\n".into(),
            &["kms.vault_url", "is required with provider = \"azure\""],
        ),
        (
            "azure without a key name",
            "[kms]\nprovider = \"azure\"\nvault_url = \"https://v.vault.azure.net\"\n".into(),
            &["kms.key_name", "is required with provider = \"azure\""],
        ),
        (
            "azure vault over http",
            "[kms]\nprovider = \"azure\"\nvault_url = \"http://v.vault.azure.net\"\nkey_name = \"k\"\n".into(),
            &["kms.vault_url", "\"http://v.vault.azure.net\" is not a Key Vault URL: it must start with https://"],
        ),
        (
            "azure vault with a key path",
            "[kms]\nprovider = \"azure\"\nvault_url = \"https://v.vault.azure.net/keys/k\"\nkey_name = \"k\"\n".into(),
            &["kms.vault_url", "without a path, query or fragment"],
        ),
        (
            "unknown retention kind",
            "[receipts]\nretention_days = { policy_swich = 30 }\n".into(),
            &["receipts.retention_days.policy_swich", "unknown receipt kind"],
        ),
        (
            "zero window",
            "[slo]\nwindow_beats = 0\n".into(),
            &["slo.window_beats"],
        ),
        (
            "unknown latency source",
            "[slo]\nr1_latency = \"p99\"\n".into(),
            &["line 2", "unknown variant `p99`", "handshake", "rtt"],
        ),
        (
            "agent and sidecar",
            "[agent]\n[sidecar]\n".into(),
            &["line 2", "alias of [agent]"],
        ),
        (
            "nested and top level",
            "[slo]\n[sidecar.slo]\n".into(),
            &["sidecar.slo", "also given at the top level"],
        ),
        ("malformed toml", "[agent\n".into(), &["line 1"]),
    ];
    for (what, text, needles) in cases {
        let e = err(text);
        for n in *needles {
            assert!(e.contains(n), "{what}: expected {n:?} in:\n{e}");
        }
    }
}

#[test]
fn cgroup_containment_is_by_component() {
    let p = |s: &str| s.parse::<CgroupPath>().expect("path");
    assert!(p("a").contains(&p("a/b")));
    assert!(p("a/b").contains(&p("a/b")));
    assert!(!p("a").contains(&p("ab")));
    assert!(!p("a/b").contains(&p("a")));
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn environment_overrides_set_any_key() {
    let c = Config::parse_with_env(
        "[agent]\nmode = \"enforce\"\n",
        "t",
        env(&[
            ("KNHK_AGENT__MODE", "audit"),
            ("KNHK_AGENT__METRICS_ADDRESS", "127.0.0.1:19999"),
            ("KNHK_AGENT__HEAT_ENABLED", "false"),
            ("KNHK_AGENT__HEAT_TOP_N", "7"),
            ("KNHK_POLICY__MAX_RULES", "50"),
            ("KNHK_SLO__R1_P99_MAX_NS", "200000"),
            (
                "KNHK_MULTI_REGION__RECEIPT_SYNC_ENDPOINTS",
                "[\"https://a:1\", \"https://b:2\"]",
            ),
            ("KNHK_ENDPOINT", "not an override"),
            ("PATH", "/usr/bin"),
        ]),
    )
    .expect("valid");
    assert_eq!(c.agent.mode, Mode::Audit);
    assert_eq!(c.agent.metrics_address.port(), 19999);
    assert!(!c.agent.heat_enabled);
    assert_eq!(c.agent.heat_top_n, 7);
    assert_eq!(c.policy.max_rules, 50);
    assert_eq!(c.slo.and_then(|s| s.r1_p99_max_ns), Some(200_000));
    assert_eq!(
        c.multi_region
            .and_then(|m| m.receipt_sync_endpoints)
            .map(|e| e.len()),
        Some(2)
    );
}

#[test]
fn environment_overrides_follow_the_files_aliases() {
    let c = Config::parse_with_env(
        PLAN_EXAMPLE,
        "plan",
        env(&[
            ("KNHK_AGENT__LISTEN_ADDRESS", "127.0.0.1:50051"),
            ("KNHK_SLO__W1_P99_MAX_MS", "5"),
        ]),
    )
    .expect("valid");
    assert!(c.agent.listen_address.is_some_and(|a| a.ip().is_loopback()));
    assert_eq!(c.slo.and_then(|s| s.w1_p99_max_ms), Some(5));
}

#[test]
fn bad_environment_overrides_name_the_variable() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "KNHK_AGENT__MODE",
            "yolo",
            "KNHK_AGENT__MODE=\"yolo\": unknown variant `yolo`",
        ),
        ("KNHK_AGENT__MOED", "audit", "did you mean `mode`?"),
        ("KNHK_AGNET__MODE", "audit", "unknown section `agnet`"),
        (
            "KNHK_AGENT__HEAT_MAX_ENTRIES",
            "0",
            "agent.heat_max_entries: 0 is out of range",
        ),
        (
            "KNHK_KMS__ROTATION_INTERVAL_HOURS",
            "48",
            "kms.rotation_interval_hours: 48 is out of range",
        ),
        (
            "KNHK_AGENT__HEAT_ENABLED",
            "maybe",
            "invalid type: string \"maybe\", expected a boolean",
        ),
    ];
    for (var, value, needle) in cases {
        let e = Config::parse_with_env("", "t", env(&[(var, value)]))
            .expect_err(var)
            .to_string();
        assert!(e.contains(needle), "{var}: expected {needle:?} in {e}");
    }
}

#[test]
fn latency_sources_are_chosen_per_class() {
    use crate::model::LatencySource::{Handshake, Rtt};
    let config = Config::parse(
        "[slo]\nr1_latency = \"rtt\"\nr1_p99_max_ns = 900000\n",
        "t.toml",
    )
    .expect("valid");
    let settings = config.settings.beat.expect("slo present");
    assert_eq!(settings.latency_sources, [Rtt, Handshake, Handshake]);
}

#[test]
fn rule_cgroups_deeper_than_the_kernel_probes_are_refused() {
    let deep: Vec<String> = (0..17).map(|i| format!("d{i}")).collect();
    let e = err(&format!(
        "[[policy.rules]]\nname = \"deep\"\naction = \"deny\"\ncgroup = \"{}\"\ncidrs = [\"10.0.0.0/8\"]\n",
        deep.join("/")
    ));
    assert!(
        e.contains("policy.rules[0].cgroup") && e.contains("17 levels deep"),
        "{e}"
    );
}

#[test]
fn the_api_is_on_a_root_only_unix_socket_unless_tcp_is_asked_for() {
    // Nothing set: the Unix socket, no warning.
    let c = Config::parse("", "t").expect("valid");
    assert_eq!(c.api_listen().url(), "unix:///run/knhk/agent.sock");
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    // Another socket and a group.
    let c = Config::parse(
        "[agent]\napi_socket = \"/run/k/api.sock\"\napi_socket_group = \"knhk-ops\"\n",
        "t",
    )
    .expect("valid");
    assert_eq!(
        c.api_listen(),
        ApiListen::Unix {
            path: "/run/k/api.sock".into(),
            group: Some("knhk-ops".into())
        }
    );
    // Explicit loopback TCP: allowed, with a warning naming the risk.
    let c = Config::parse("[agent]\nlisten_address = \"127.0.0.1:50051\"\n", "t").expect("valid");
    assert_eq!(c.api_listen().url(), "http://127.0.0.1:50051");
    let w = c.warnings().join("\n");
    assert!(
        w.contains("agent.listen_address") && w.contains("any local user"),
        "{w}"
    );
    // A group with TCP has no effect: said so.
    let c = Config::parse(
        "[agent]\nlisten_address = \"127.0.0.1:50051\"\napi_socket_group = \"ops\"\n",
        "t",
    )
    .expect("valid");
    assert!(
        c.warnings()
            .join("\n")
            .contains("api_socket_group = \"ops\" has no effect"),
        "{:?}",
        c.warnings()
    );
    // With mTLS the API is on TCP, the default address unless set.
    let c = Config::parse(SPIFFE, "t").expect("valid");
    assert_eq!(
        c.api_listen(),
        ApiListen::Tcp("127.0.0.1:50051".parse().expect("addr"))
    );
}

#[test]
fn bad_api_socket_and_state_dir_settings_are_refused_with_the_key() {
    for (text, key, says) in [
        (
            "api_socket = \"run/agent.sock\"",
            "agent.api_socket",
            "absolute path",
        ),
        (
            "api_socket = \"/run/knhk/\"",
            "agent.api_socket",
            "absolute path to a socket file",
        ),
        (
            "api_socket = \"/\"",
            "agent.api_socket",
            "absolute path to a socket file",
        ),
        (
            "api_socket_group = \"\"",
            "agent.api_socket_group",
            "not a group name",
        ),
        (
            "api_socket_group = \"a b\"",
            "agent.api_socket_group",
            "not a group name",
        ),
        (
            "api_socket_group = \"-x\"",
            "agent.api_socket_group",
            "not a group name",
        ),
    ] {
        let e = err(&format!("[agent]\n{text}\n"));
        assert!(e.contains(key) && e.contains(says), "{text}: {e}");
    }
    let e = err("[agent]\nstate_dir = \"var/lib/knhk\"\n");
    assert!(
        e.contains("agent.state_dir") && e.contains("must be an absolute path"),
        "{e}"
    );
    assert_eq!(
        Config::parse("", "t").expect("valid").agent.state_dir,
        std::path::PathBuf::from("/var/lib/knhk")
    );
    let long = format!("/run/{}/agent.sock", "x".repeat(100));
    let e = err(&format!("[agent]\napi_socket = \"{long}\"\n"));
    assert!(
        e.contains("agent.api_socket") && e.contains("at most 107"),
        "{e}"
    );
}

#[test]
fn bad_workload_selectors_name_the_key_and_the_line() {
    let base = "[[policy.rules]]\nname = \"r\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/8\"]\n";
    for (extra, needles) in [
        (
            "pod_selector = { match_expressions = [{ key = \"app\", operator = \"Has\", values = [\"x\"] }] }\n",
            &["line 5", "unknown operator \"Has\""][..],
        ),
        (
            "pod_selector = { match_expressions = [{ key = \"\", operator = \"Exists\" }] }\n",
            &["line 5", "label key is empty"][..],
        ),
        (
            "pod_selector = { match_expressions = [{ key = \"app\", operator = \"Exists\", values = [\"x\"] }] }\n",
            &["policy.rules[0].pod_selector", "operator Exists takes no values"][..],
        ),
        (
            "namespace = \"Payments\"\n",
            &["line 5", "namespace \"Payments\" is not a valid name"][..],
        ),
        ("namespace = []\n", &["namespace list is empty"][..]),
        (
            "cgroup = \"kubepods\"\nnamespace = \"payments\"\n",
            &["policy.rules[0].cgroup", "not both"][..],
        ),
        ("container = \"App\"\n", &["container \"App\""][..]),
    ] {
        let e = err(&format!("{base}{extra}"));
        for n in needles {
            assert!(e.contains(n), "{extra}: missing {n:?} in: {e}");
        }
    }
}

#[test]
fn kubernetes_settings_are_checked_and_selector_rules_without_it_warned_about() {
    for (section, needle) in [
        ("cri_socket = \"containerd.sock\"", "kubernetes.cri_socket"),
        ("resync_interval_ms = 10", "kubernetes.resync_interval_ms"),
        (
            "unknown_pod_action = \"reject\"",
            "unknown variant `reject`",
        ),
        ("cgroup_driver = \"docker\"", "unknown variant `docker`"),
        ("kubepods_root = \"/kubepods\"", "drop the leading '/'"),
        ("nodename = \"n\"", "unknown field `nodename`"),
    ] {
        let e = err(&format!("[kubernetes]\n{section}\n"));
        assert!(e.contains(needle), "{section}: {e}");
    }
    let ok = Config::parse(
        "[kubernetes]\ncri_socket = \"/run/containerd/containerd.sock\"\ncgroup_driver = \"systemd\"\n\
         unknown_pod_action = \"deny\"\n",
        "t",
    )
    .expect("valid");
    assert_eq!(
        ok.kubernetes.and_then(|k| k.cgroup_driver),
        Some(crate::config::CgroupDriver::Systemd)
    );
    let selector = "[[policy.rules]]\nname = \"r\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/8\"]\nnamespace = \"a\"\n";
    assert!(warnings(selector)
        .iter()
        .any(|w| w.contains("selects workloads, but there is no [kubernetes] section")));
}

#[test]
fn telemetry_is_checked_with_its_key_and_line() {
    let e = err("[agent]\nmode = \"audit\"\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\notlp_timeout_ms = 0\n");
    assert!(e.contains("telemetry.otlp_timeout_ms"), "{e}");
    assert!(e.contains("out of range (1-60000)"), "{e}");
    assert!(e.contains("line 3"), "the section's line: {e}");
    let e = err("[telemetry]\notlp_endpiont = \"http://c:4317\"\n");
    assert!(e.contains("did you mean `otlp_endpoint`"), "{e}");
    let e = err("[telemetry]\nweaver_live_check = \"4317\"\n");
    assert!(e.contains("telemetry.weaver_live_check"), "{e}");

    let on = Config::parse(
        "[telemetry]\nweaver_live_check = true\nsampling_ratio = 0.5\n",
        "t",
    )
    .expect("valid");
    let s = on.settings.telemetry.as_ref().expect("export on");
    assert_eq!(
        (s.endpoint.as_str(), s.sampling_ratio),
        ("http://127.0.0.1:4317", 0.5)
    );
    let off = Config::parse("[telemetry]\nsampling_ratio = 0.5\n", "t").expect("valid");
    assert!(off.settings.telemetry.is_none());
    assert!(off
        .inactive_sections()
        .iter()
        .any(|(s, why)| *s == "telemetry" && why.contains("export is off")));
    // The environment can set it too.
    let sections = super::SECTIONS;
    assert!(sections.contains(&"telemetry"));
}

#[test]
fn bad_promotion_settings_name_the_key_and_the_reason() {
    for (section, needles) in [
        (
            "environment = \"qa\"",
            &[
                "line 2",
                "unknown environment \"qa\": expected canary, staging or production",
            ][..],
        ),
        (
            "slo_threshold = 1.5",
            &["promotion.slo_threshold", "1.5 is outside 0..1"][..],
        ),
        (
            "slo_threshold = -0.1",
            &["promotion.slo_threshold", "-0.1 is outside 0..1"][..],
        ),
        (
            "steps = [5, 5, 100]",
            &[
                "promotion.steps",
                "step 2 (5%) does not increase on step 1 (5%)",
            ][..],
        ),
        ("steps = []", &["promotion.steps", "no steps"][..]),
        (
            "steps = [1, 150]",
            &["promotion.steps", "150 is not a share of workloads"][..],
        ),
        (
            "feature_flags = [\"heat_tracking\", \"turbo\"]",
            &["line 2", "unknown feature flag \"turbo\""][..],
        ),
        (
            "feature_flags = [\"heat_tracking\", \"heat_tracking\"]",
            &["promotion.feature_flags", "heat_tracking is listed twice"][..],
        ),
        (
            "traffic_percent = 0",
            &["promotion.traffic_percent", "above 0"][..],
        ),
        (
            "beats_per_step = 0",
            &["promotion.beats_per_step", "0 is outside 1-100000"][..],
        ),
        (
            "deny_rate_factor = 0.5",
            &["promotion.deny_rate_factor", "must be above 1"][..],
        ),
        ("rollback = true", &["unknown field `rollback`"][..]),
    ] {
        let e = err(&format!("[promotion]\n{section}\n"));
        for n in needles {
            assert!(e.contains(n), "{section}: missing {n:?} in: {e}");
        }
    }
}

#[test]
fn feature_flags_decide_the_kernel_features_and_a_canary_holds_at_its_share() {
    let c = Config::parse(
        "[agent]\nheat_enabled = true\n[promotion]\nenvironment = \"canary\"\ntraffic_percent = 10\nfeature_flags = [\"latency_histograms\"]\n",
        "test",
    )
    .expect("valid");
    let p = c.policy();
    assert!(!p.heat && p.histograms && !p.verdict_events);
    assert!(
        c.warnings()
            .iter()
            .any(|w| w
                .contains("agent.heat_enabled = true is overridden by promotion.feature_flags")),
        "{:?}",
        c.warnings()
    );
    let plan = c.settings.promotion.plan("s".into());
    let steps: Vec<String> = plan.steps.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        steps,
        ["1%", "5%", "10%"],
        "the canary stops at traffic_percent"
    );
    assert_eq!(plan.hold_at.map(|h| h.to_string()).as_deref(), Some("10%"));
    // Without feature_flags, [agent] decides, and events are on.
    let c = Config::parse("[agent]\nheat_enabled = false\n", "test").expect("valid");
    assert!(!c.policy().heat && c.policy().verdict_events);
}

#[test]
fn bundle_keys_are_checked_each_with_its_key_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = dir.path().join("bundle.pem");
    let key = p256::SecretKey::from_slice(&[4u8; 32]).expect("key");
    std::fs::write(
        &pem,
        p256::pkcs8::EncodePublicKey::to_public_key_pem(
            &key.public_key(),
            p256::pkcs8::LineEnding::LF,
        )
        .expect("pem"),
    )
    .expect("write pem");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").expect("write");
    let base = format!(
        "[agent]\nmode = \"audit\"\n[bundle]\nurl = \"s3://fleet-bundles/prod/bundle.json\"\npublic_key_file = \"{}\"\n",
        pem.display()
    );
    let ok = Config::parse(
        &format!("{base}endpoint_url = \"http://127.0.0.1:9000\"\npoll_interval_ms = 2000\njitter = 0.5\n"),
        "t",
    )
    .expect("valid");
    let b = ok.settings.bundle.as_ref().expect("[bundle]");
    assert_eq!(
        (b.bucket.as_str(), b.key.as_str()),
        ("fleet-bundles", "prod/bundle.json")
    );
    assert!(b.force_path_style, "on by default with an endpoint_url");
    assert_eq!(b.poll_interval, std::time::Duration::from_millis(2000));
    assert_eq!(b.region, "us-east-1");
    // Each bad value: its key, its line (the value's own) and why.
    for (extra, key, line, why) in [
        (
            "poll_interval_ms = 10\n",
            "bundle.poll_interval_ms",
            6,
            "10 is out of range (1000-86400000)",
        ),
        (
            "jitter = 1.5\n",
            "bundle.jitter",
            6,
            "1.5 is out of range (0-1",
        ),
        ("jitter = -0.1\n", "bundle.jitter", 6, "out of range (0-1"),
        (
            "timeout_ms = 0\n",
            "bundle.timeout_ms",
            6,
            "0 is out of range (100-60000)",
        ),
        (
            "endpoint_url = \"ftp://x\"\n",
            "bundle.endpoint_url",
            6,
            "is not an http(s) URL",
        ),
        (
            "region = \"EU West\"\n",
            "bundle.region",
            6,
            "is not a region name",
        ),
        (
            "kms_key_id = \"alias/k\"\n",
            "bundle.kms_key_id",
            6,
            "give public_key_file",
        ),
        (
            "kms_endpoint_url = \"http://127.0.0.1:1\"\n",
            "bundle.kms_endpoint_url",
            6,
            "is only used with kms_key_id",
        ),
    ] {
        let e = err(&format!("{base}{extra}"));
        assert!(e.contains(&format!("line {line}: {key}")), "{extra}: {e}");
        assert!(e.contains(why), "{extra}: {e}");
    }
    let e = err("[bundle]\nurl = \"https://fleet/b.json\"\nkms_key_id = \"k\"\n");
    assert!(
        e.contains("line 2: bundle.url") && e.contains("does not start with s3://"),
        "{e}"
    );
    let e = err("[bundle]\nurl = \"s3://Fleet/b.json\"\nkms_key_id = \"k\"\n");
    assert!(e.contains("is not a valid S3 bucket name"), "{e}");
    let e = err("[bundle]\nkms_key_id = \"k\"\n");
    assert!(e.contains("line 1: bundle.url: is required"), "{e}");
    let e = err("[bundle]\nurl = \"s3://fleet/b.json\"\n");
    assert!(
        e.contains("bundle.public_key_file: bundles must be verified"),
        "{e}"
    );
    let e = err("[bundle]\nurl = \"s3://fleet/b.json\"\nkms_key_id = \" \"\n");
    assert!(e.contains("line 3: bundle.kms_key_id: is empty"), "{e}");
    let e = err(&format!(
        "[bundle]\nurl = \"s3://fleet/b.json\"\npublic_key_file = \"{}\"\n",
        not_pem.display()
    ));
    assert!(
        e.contains("line 3: bundle.public_key_file")
            && e.contains("is not a P-256 public key in PEM"),
        "{e}"
    );
    let e =
        err("[bundle]\nurl = \"s3://fleet/b.json\"\npublic_key_file = \"/nonexistent/k.pem\"\n");
    assert!(
        e.contains("bundle.public_key_file: /nonexistent/k.pem: No such file"),
        "{e}"
    );
    let e = err("[bundle]\nurl = \"s3://fleet/b.json\"\npoll_intervall_ms = 1000\n");
    assert!(e.contains("unknown field `poll_intervall_ms`"), "{e}");
    assert!(e.contains("did you mean `poll_interval_ms`"), "{e}");
    let e = err("[bundle]\nurl = \"s3://fleet/b.json\"\njitter = \"lots\"\n");
    assert!(e.contains("line 3") && e.contains("invalid type"), "{e}");
}

#[test]
fn archive_keys_are_checked_each_with_its_key_and_line() {
    let base = "[kms]\nprovider = \"file\"\nkey_dir = \"/tmp/k\"\n[archive]\nurl = \"s3://receipts-archive/eu/node-7/\"\nlock_mode = \"governance\"\nretention_days = 30\n";
    let ok = Config::parse(
        &format!("{base}endpoint_url = \"http://127.0.0.1:9000\"\nsegment_max_receipts = 500\n"),
        "t",
    )
    .expect("valid");
    let a = ok.settings.archive.as_ref().expect("[archive]");
    assert_eq!(
        (a.bucket.as_str(), a.prefix.as_str()),
        ("receipts-archive", "eu/node-7"),
        "the trailing / is dropped"
    );
    assert_eq!(a.lock_mode, crate::objectstore::LockMode::Governance);
    assert!(a.force_path_style, "on by default with an endpoint_url");
    assert_eq!(
        (
            a.retention_days,
            a.segment_max_receipts,
            a.max_backlog_receipts
        ),
        (30, 500, 1_000_000)
    );
    assert_eq!(a.upload_interval, std::time::Duration::from_millis(5000));
    // Each bad value: its key, its line (the value's own) and why.
    for (extra, key, line, why) in [
        (
            "segment_max_receipts = 0\n",
            "archive.segment_max_receipts",
            8,
            "0 is out of range (1-100000)",
        ),
        (
            "segment_max_receipts = 100001\n",
            "archive.segment_max_receipts",
            8,
            "100001 is out of range (1-100000)",
        ),
        (
            "upload_interval_ms = 5\n",
            "archive.upload_interval_ms",
            8,
            "5 is out of range (100-3600000)",
        ),
        (
            "max_backlog_receipts = 10\nsegment_max_receipts = 100\n",
            "archive.max_backlog_receipts",
            8,
            "10 is less than segment_max_receipts (100)",
        ),
        (
            "max_backlog_receipts = 0\n",
            "archive.max_backlog_receipts",
            8,
            "0 is out of range (1-100000000)",
        ),
        (
            "timeout_ms = 1\n",
            "archive.timeout_ms",
            8,
            "1 is out of range (100-60000)",
        ),
        (
            "endpoint_url = \"ftp://x\"\n",
            "archive.endpoint_url",
            8,
            "is not an http(s) URL",
        ),
        (
            "region = \"EU West\"\n",
            "archive.region",
            8,
            "is not a region name",
        ),
    ] {
        let e = err(&format!("{base}{extra}"));
        assert!(e.contains(&format!("line {line}: {key}")), "{extra}: {e}");
        assert!(e.contains(why), "{extra}: {e}");
    }
    let kms = "[kms]\nprovider = \"file\"\nkey_dir = \"/tmp/k\"\n[archive]\n";
    for (section, expect) in [
        (
            "url = \"https://a/b\"\nlock_mode = \"compliance\"\nretention_days = 1\n",
            "line 5: archive.url: \"https://a/b\" does not start with s3://",
        ),
        (
            "url = \"s3://A/b\"\nlock_mode = \"compliance\"\nretention_days = 1\n",
            "is not a valid S3 bucket name",
        ),
        (
            "lock_mode = \"compliance\"\nretention_days = 1\n",
            "line 4: archive.url: is required",
        ),
        (
            "url = \"s3://abc/p\"\nretention_days = 1\n",
            "archive.lock_mode: is required",
        ),
        (
            "url = \"s3://abc/p\"\nlock_mode = \"legal\"\nretention_days = 1\n",
            "line 6: archive.lock_mode: \"legal\" is not an Object Lock mode (expected \"compliance\" or \"governance\")",
        ),
        (
            "url = \"s3://abc/p\"\nlock_mode = \"compliance\"\n",
            "archive.retention_days: is required (1-36500)",
        ),
        (
            "url = \"s3://abc/p\"\nlock_mode = \"compliance\"\nretention_days = 0\n",
            "line 7: archive.retention_days: 0 is out of range (1-36500)",
        ),
        (
            "url = \"s3://abc/p\"\nlock_mode = \"compliance\"\nretention_days = 1\nsegment_max = 3\n",
            "unknown field `segment_max`",
        ),
        (
            "url = \"s3://abc/p\"\nlock_mode = \"compliance\"\nretention_days = \"30d\"\n",
            "invalid type",
        ),
    ] {
        let e = err(&format!("{kms}{section}"));
        assert!(e.contains(expect), "{section}: {e}");
    }
    // Without a ledger there is nothing to archive.
    let e =
        err("[archive]\nurl = \"s3://abc/p\"\nlock_mode = \"compliance\"\nretention_days = 1\n");
    assert!(
        e.contains("line 1: archive") && e.contains("configure [kms]"),
        "{e}"
    );
}
