//! The operator surface against real components: the metrics' cardinality bounds at the
//! documented maximum policy, PromQL quantiles from a real Prometheus against the kernel's, the
//! shipped alert rules (promtool, and each alert firing under its fault in a real Prometheus
//! while a healthy agent stays silent), and every CLI command in both output forms.

mod support;

use knhk_agent::api::pb::{self, policy_service_client::PolicyServiceClient};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant, SystemTime},
};
use support::{
    prom::{Prometheus, Target},
    spire::{FakeSpire, TestCa},
    *,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The body of an HTTP response.
fn body(response: &str) -> &str {
    response.split("\r\n\r\n").nth(1).unwrap_or("")
}

/// Series per metric family in a text exposition (histograms count their `_bucket`, `_sum`
/// and `_count` lines under the family).
fn series_by_family(text: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
            .unwrap_or(name);
        *out.entry(family.to_owned()).or_default() += 1;
    }
    out
}

fn rule(name: String, cidr: String) -> pb::Rule {
    pb::Rule {
        name,
        action: pb::Action::Deny as i32,
        cidrs: vec![cidr],
        ..Default::default()
    }
}

fn cli(agent: &Agent, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--endpoint", &agent.endpoint()])
        .output()
        .expect("run the CLI")
}

/// The documented bound: with the maximum policy (100,000 rules, 200 of them hit) and 200 hot
/// destinations, a scrape has at most `rule_metrics_top_n` rule series and `heat_top_n` heat
/// series, and otherwise exactly the series it had with no rules at all.
#[test]
fn kernel_metrics_stay_bounded_at_100000_rules() {
    if !kernel_available("kernel_metrics_stay_bounded_at_100000_rules") {
        return;
    }
    let cg = TestCgroup::new("bounded");
    let pins = TestPins::new("bounded");
    let dir = tempfile::tempdir().expect("tempdir");
    // Every connect counts as heat (no sampling), so 200 destinations are 200 heat entries.
    let config = write_config(dir.path(), &cg.path, &pins.root, "heat_sample_every = 1\n");
    let agent = Agent::start(&config);
    let before = agent.get("/metrics");
    let before = series_by_family(body(&before));

    // Rule i denies 127.1.x.y, the i-th destination of tcp_connect_many_from.
    let rules: Vec<pb::Rule> = (0..100_000u32)
        .map(|i| {
            rule(
                format!("deny-{i:06}"),
                format!("127.{}.{}.{}/32", 1 + (i >> 16), (i >> 8) & 255, i & 255),
            )
        })
        .collect();
    let started = Instant::now();
    runtime().block_on(async {
        PolicyServiceClient::new(agent.channel().await)
            .max_encoding_message_size(64 << 20)
            .apply_policy(pb::ApplyPolicyRequest {
                policy: Some(pb::PolicyDocument {
                    rules,
                    ..Default::default()
                }),
                expected_generation: None,
            })
            .await
            .expect("the maximum policy applies");
    });
    eprintln!("applied 100,000 rules in {:?}", started.elapsed());
    // 200 rules hit once, the first 30 of them twice: the top 50 is those 30, then 20 by name.
    assert_eq!(tcp_connect_many_from(&cg.path, 200), 0, "all denied");
    assert_eq!(tcp_connect_many_from(&cg.path, 30), 0, "all denied");

    let response = agent.get("/metrics");
    let text = body(&response);
    let after = series_by_family(text);
    let total: usize = after.values().sum();
    eprintln!(
        "scrape at 100,000 rules: {} bytes, {total} series ({} before the policy)",
        text.len(),
        before.values().sum::<usize>()
    );
    let mut hit: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("knhk_rule_hits_total{rule=\""))
        .map(|l| &l[..l.find('"').unwrap_or(0)])
        .collect();
    hit.sort();
    let expected: Vec<String> = (0..50).map(|i| format!("deny-{i:06}")).collect();
    assert_eq!(
        hit, expected,
        "the 50 rules with the most hits, ties by name"
    );
    assert!(
        text.contains("knhk_rule_hits_total{rule=\"deny-000000\"} 2"),
        "{text}"
    );
    assert_eq!(after["knhk_heat_top_connect_attempts"], 20, "heat_top_n");
    assert!(
        !text.contains("rank=\""),
        "no rank label: a change of order makes no new series"
    );
    for (family, n) in &after {
        let was = before.get(family).copied().unwrap_or(0);
        let allowed = match family.as_str() {
            "knhk_rule_hits_total" => 50,
            "knhk_heat_top_connect_attempts" => 20,
            _ => was,
        };
        assert!(
            *n <= allowed,
            "{family}: {n} series at 100,000 rules, {was} without rules"
        );
    }
    assert!(total < 1000, "{total} series");
    // The agent's own signals are there too.
    for needle in [
        &format!(
            "knhk_build_info{{abi_version=\"{}\",version=\"{}\"}} 1",
            knhk_abi::ABI_VERSION,
            env!("CARGO_PKG_VERSION")
        )[..],
        "knhk_ready 1",
        "knhk_readiness_check{check=\"programs attached\"} 1",
        "knhk_readiness_check{check=\"maps readable\"} 1",
        "knhk_policy_generation 2",
        "knhk_policy_apply_failures_total{reason=\"invalid\"} 0",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_start_time_seconds ",
        "knhk_policy_last_switch_timestamp_seconds ",
    ] {
        assert!(text.contains(needle), "{needle} in\n{text}");
    }
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("knhk_policy_info{digest=\""))
            .count(),
        1,
        "one digest series, the live one"
    );
    assert!(text.len() < 128 * 1024, "{} bytes", text.len());

    // Every hit rule, with its count, is over gRPC.
    let out = cli(&agent, &["status", "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let hits = status["rule_hits"].as_array().expect("rule_hits");
    assert_eq!(hits.len(), 200, "every rule that was hit");
    assert_eq!(hits[0]["rule"], "deny-000000");
    assert_eq!(hits[0]["hits"], 2);
    assert_eq!(hits[199]["rule"], "deny-000199");
}

/// The exported buckets are fine enough that a real Prometheus's `histogram_quantile` p99 agrees
/// with the kernel's own p99 (its 1,152-bucket histogram, as `knhk-agent slo` reports it) within
/// the stated 20%. The handshakes go to a server behind a real ~20 ms queueing delay: a narrow
/// distribution, which power-of-4 buckets (16.8 ms to 67 ms) would smear into a p99 near 67 ms.
#[test]
fn kernel_promql_p99_agrees_with_the_kernel_p99() {
    if !kernel_available("kernel_promql_p99_agrees_with_the_kernel_p99") {
        return;
    }
    let _serial = timing_exclusive();
    let server = DelayedServer::new(20);
    let cg = TestCgroup::new("p99");
    let pins = TestPins::new("p99");
    let dir = tempfile::tempdir().expect("tempdir");
    // Every connect timed.
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        "histogram_interval_us = 0\n",
    );
    let agent = Agent::start(&config);
    let prom = Prometheus::start(agent.metrics);
    let counts = tcp_connect_loop_from(&cg.path, server.addr, 200);
    assert_eq!(counts.connected, 200, "{counts:?}");

    let out = cli(&agent, &["slo", "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let slo: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let c1 = slo["classes"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["runtime_class"] == "C1"))
        .expect("C1")
        .clone();
    let samples = c1["handshake_samples"].as_u64().expect("samples");
    assert!(samples >= 200, "{c1}");
    let kernel_p99 = c1["handshake_p99_ns"].as_u64().expect("p99") as f64 / 1e9;
    assert!(kernel_p99 > 0.015, "the delay is real: {c1}");

    // Wait until Prometheus has scraped every sample.
    wait_until(
        "prometheus has every handshake",
        Duration::from_secs(30),
        || {
            prom.query(r#"knhk_tcp_handshake_duration_seconds_count{class="C1"}"#)
                == Some(samples as f64)
        },
    );
    let promql = prom
        .query(
            r#"histogram_quantile(0.99, knhk_tcp_handshake_duration_seconds_bucket{class="C1"})"#,
        )
        .expect("a p99");
    let ratio = promql / kernel_p99;
    let bound = knhk_agent::telemetry::MAX_BUCKET_RATIO;
    eprintln!(
        "p99 over {samples} handshakes: PromQL {:.3} ms, kernel {:.3} ms, ratio {ratio:.3} (stated bound {bound})",
        promql * 1e3,
        kernel_p99 * 1e3,
    );
    assert!(
        ratio <= bound && ratio >= 1.0 / bound,
        "PromQL p99 {promql} s vs kernel p99 {kernel_p99} s: ratio {ratio}"
    );
}

/// The rule groups of the plain rules file and of the PrometheusRule.
fn rule_files() -> (String, String) {
    let alerts = repo().join("k8s/alerts");
    let plain = std::fs::read_to_string(alerts.join("knhk-agent.rules.yaml")).expect("rules");
    let crd = std::fs::read_to_string(alerts.join("prometheusrule.yaml")).expect("crd");
    (plain, crd)
}

/// The PrometheusRule's `spec.groups`, de-indented into a plain rules file.
fn crd_as_rules_file(crd: &str) -> String {
    let spec = &crd[crd.find("\nspec:\n").expect("spec") + "\nspec:\n".len()..];
    spec.lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn groups_of(rules_file: &str) -> &str {
    &rules_file[rules_file.find("groups:\n").expect("groups")..]
}

#[test]
fn alert_rules_pass_promtool_and_the_prometheusrule_has_the_same_rules() {
    let (plain, crd) = rule_files();
    let as_rules = crd_as_rules_file(&crd);
    assert_eq!(
        groups_of(&as_rules),
        groups_of(&plain),
        "k8s/alerts/prometheusrule.yaml has the rules of knhk-agent.rules.yaml"
    );
    assert!(crd.contains("kind: PrometheusRule\n"));
    let dir = tempfile::tempdir().expect("tempdir");
    let extracted = dir.path().join("from-crd.rules.yaml");
    std::fs::write(&extracted, &as_rules).expect("write");
    for file in [repo().join("k8s/alerts/knhk-agent.rules.yaml"), extracted] {
        let out = Command::new("promtool")
            .args(["check", "rules"])
            .arg(&file)
            .output()
            .expect("promtool (Debian package prometheus; cargo xtask setup installs it)");
        assert!(
            out.status.success(),
            "promtool check rules {}:\n{}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("SUCCESS: 9 rules found"),
            "{out:?}"
        );
    }
}

/// The shipped rules with every `for:` shortened to 2 s, for a test's Prometheus.
fn test_copy_of_rules(dir: &Path) -> PathBuf {
    let (plain, _) = rule_files();
    let short: String = plain
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 2s", &l[..l.len() - l.trim_start().len()]),
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = dir.join("rules.yaml");
    std::fs::write(&path, short + "\n").expect("write rules");
    path
}

const TD: &str = "knhk.test";

/// One agent of the alert test: what it is for and its guards.
struct Subject {
    job: &'static str,
    agent: Option<Agent>,
    metrics: std::net::SocketAddr,
    _cg: TestCgroup,
    _pins: TestPins,
    dir: tempfile::TempDir,
}

fn subject(job: &'static str, rules: impl FnOnce(&Path) -> (bool, String)) -> Subject {
    let cg = TestCgroup::new(job);
    let pins = TestPins::new(job);
    let dir = tempfile::tempdir().expect("tempdir");
    let (tcp, text) = rules(dir.path());
    let config = if tcp {
        write_config_tcp(dir.path(), &cg.path, &pins.root, &text)
    } else {
        write_config(dir.path(), &cg.path, &pins.root, &text)
    };
    let agent = Agent::start(&config);
    Subject {
        job,
        metrics: agent.metrics,
        agent: Some(agent),
        _cg: cg,
        _pins: pins,
        dir,
    }
}

fn kms(dir: &Path) -> String {
    format!(
        "[kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n[receipts]\npath = \"{}\"\nnode = \"test-node\"\n",
        dir.join("keys").display(),
        dir.join("receipts.redb").display()
    )
}

fn spiffe(socket: &Path, extra: &str) -> String {
    format!(
        "[spiffe]\nenabled = true\ntrust_domain = \"{TD}\"\nspiffe_id = \"spiffe://{TD}/agent\"\nspiffe_socket_path = \"{}\"\ninitial_sync_timeout_secs = 1\n{extra}",
        socket.display()
    )
}

/// Each shipped alert fires under its fault, on the faulty agent, and a healthy agent with every
/// feature on ([slo], [spiffe] with a fresh SVID, [kms]) raises none. One Prometheus (1 s
/// scrapes and evaluations, `for:` shortened to 2 s) watches all of them.
#[test]
fn kernel_each_alert_fires_under_its_fault_and_a_healthy_agent_stays_silent() {
    if !kernel_available("kernel_each_alert_fires_under_its_fault_and_a_healthy_agent_stays_silent")
    {
        return;
    }
    let _serial = timing_shared();
    let rt = runtime();
    let ca = TestCa::new(TD);
    let spires = tempfile::tempdir().expect("tempdir");
    let now = SystemTime::now();

    // Healthy: every feature on, a fresh SVID.
    let healthy_spire = FakeSpire::start(&rt, &spires.path().join("healthy.sock"));
    healthy_spire.push(
        &ca.issue_at(
            "/agent",
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        ),
        &ca,
        &[],
    );
    let healthy = subject("knhk-healthy", |dir| {
        (
            true,
            format!(
                "[slo]\nbeat_interval_ms = 20\n{}{}",
                spiffe(&spires.path().join("healthy.sock"), ""),
                kms(dir)
            ),
        )
    });
    // Killed.
    let mut killed = subject("knhk-killed", |_| (false, String::new()));
    // No Workload API at all: no SVID ever, so not ready.
    let no_svid = subject("knhk-no-svid", |_| {
        (true, spiffe(&spires.path().join("nobody.sock"), ""))
    });
    // An SVID issued 2 h ago, with max_svid_age_hours = 1: rotation overdue.
    let old_spire = FakeSpire::start(&rt, &spires.path().join("old.sock"));
    old_spire.push(
        &ca.issue_at(
            "/agent",
            now - Duration::from_secs(2 * 3600),
            now + Duration::from_secs(20 * 3600),
        ),
        &ca,
        &[],
    );
    let old_svid = subject("knhk-old-svid", |_| {
        (
            true,
            spiffe(&spires.path().join("old.sock"), "max_svid_age_hours = 1\n"),
        )
    });
    // Class shed: R1 (this sink) has a 1 µs p99 ceiling that any handshake breaches; the long
    // window and recovery keep the colder classes paused for the whole test.
    let r1_sink = tcp_sink("127.0.0.1:0");
    let shed = subject("knhk-shed", |_| {
        (
            false,
            format!(
                "[[policy.rules]]\nname = \"hot\"\naction = \"allow\"\nclass = \"R1\"\ncidrs = [\"127.0.0.1/32\"]\nports = [\"{}\"]\n\
                 [slo]\nbeat_interval_ms = 20\nwindow_beats = 3000\nrecover_beats = 3000\nr1_p99_max_ns = 1000\n",
                r1_sink.port()
            ),
        )
    });
    // Key rotation overdue: the ledger says the key became current 2 h ago (as after 2 h of
    // failing rotations), and the next key cannot be written (a directory where its file goes).
    let mut rotation = subject("knhk-key-rotation", |dir| {
        (
            false,
            kms(dir).replace("[kms]\n", "[kms]\nrotation_interval_hours = 1\n"),
        )
    });
    {
        let agent = rotation.agent.take().expect("agent");
        wait_until("the first key is recorded", Duration::from_secs(10), || {
            rotation.dir.path().join("keys/v1.pem").exists()
        });
        let (status, _) = agent.sigterm();
        assert!(status.success(), "{status}");
        // The key became current 2 h ago: its record is edited in place (a second record of
        // the same key would be a hand-over without a statement, which the start-up check of
        // the ledger refuses).
        {
            use redb::ReadableTable;
            const KEYS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("keys");
            let db = redb::Database::open(rotation.dir.path().join("receipts.redb"))
                .expect("open the ledger");
            let tx = db.begin_write().expect("write");
            {
                let mut t = tx.open_table(KEYS).expect("keys");
                let (index, mut key) = {
                    let (k, v) = t.last().expect("last").expect("the first key");
                    let key: serde_json::Value =
                        serde_json::from_slice(v.value()).expect("key record");
                    (k.value(), key)
                };
                let since = key["since_ns"].as_u64().expect("since_ns");
                key["since_ns"] = (since - 2 * 3600 * 1_000_000_000).into();
                let json = serde_json::to_vec(&key).expect("json");
                t.insert(index, &json[..]).expect("rewrite the key record");
            }
            tx.commit().expect("commit");
        }
        std::fs::create_dir(rotation.dir.path().join("keys/v2.tmp")).expect("block v2");
        let config = rotation.dir.path().join("agent.toml");
        let agent = Agent::start(&config);
        rotation.metrics = agent.metrics;
        rotation.agent = Some(agent);
    }
    // Policy apply failing: an invalid document over gRPC, once Prometheus has seen the agent.
    let failing = subject("knhk-apply-failing", |_| (false, String::new()));
    // Witness quorum lost: quorum 1 and the only witness is down, so no signed checkpoint ever
    // gets its cosignature.
    let dead_peer = free_port();
    let quorum = subject("knhk-quorum", |dir| {
        (
            true,
            format!(
                "[slo]\nbeat_interval_ms = 25\n{}[multi_region]\nregion = \"us-east-1\"\ncross_region_sync_enabled = true\n\
                 receipt_sync_endpoints = [\"http://127.0.0.1:{dead_peer}\"]\nquorum = 1\ntimeout_ms = 1000\n",
                kms(dir)
            ),
        )
    });

    killed.agent.take().expect("agent").kill9();
    let subjects = [
        &healthy, &killed, &no_svid, &old_svid, &shed, &rotation, &failing, &quorum,
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = test_copy_of_rules(dir.path());
    let prom = Prometheus::start_with(
        &subjects
            .iter()
            .map(|s| Target {
                job: s.job.into(),
                addr: s.metrics,
            })
            .collect::<Vec<_>>(),
        Some(&rules),
    );
    let started = Instant::now();
    let scraped = Instant::now();
    while prom.query(r#"count(up{job=~"knhk.*"} == 1)"#) != Some(7.0) {
        assert!(
            scraped.elapsed() < Duration::from_secs(30),
            "not every live agent is scraped: {:?}\n{:?}",
            prom.query_all("up"),
            prom.api("/api/v1/targets")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        tcp_connect_from(&shed._cg.path, r1_sink),
        Outcome::Connected
    );
    rt.block_on(async {
        let channel =
            knhk_agent::client::connect(&failing.agent.as_ref().expect("agent").endpoint())
                .await
                .expect("connect");
        let refused = PolicyServiceClient::new(channel)
            .apply_policy(pb::ApplyPolicyRequest {
                policy: Some(pb::PolicyDocument {
                    rules: vec![rule("bad".into(), "10.0.0.0/33".into())],
                    ..Default::default()
                }),
                expected_generation: None,
            })
            .await
            .expect_err("an invalid document is refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    });

    /// An alert, the agent it must fire for, and a label it must carry.
    type Expected<'a> = (&'a str, &'a Subject, Option<(&'a str, &'a str)>);
    let expected: [Expected; 10] = [
        ("KnhkAgentDown", &killed, None),
        (
            "KnhkAgentNotReady",
            &no_svid,
            Some(("check", "workload identity")),
        ),
        ("KnhkSvidNeverReceived", &no_svid, None),
        ("KnhkSvidRotationOverdue", &old_svid, None),
        ("KnhkClassShed", &shed, Some(("class", "C1"))),
        ("KnhkSigningKeyRotationOverdue", &rotation, None),
        (
            "KnhkPolicyApplyFailing",
            &failing,
            Some(("reason", "invalid")),
        ),
        (
            "KnhkAgentNotReady",
            &rotation,
            Some(("check", "receipts signing")),
        ),
        ("KnhkRegionQuorumLost", &quorum, None),
        (
            "KnhkAgentNotReady",
            &quorum,
            Some(("check", "witness quorum")),
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let firing = prom.firing();
        let healthy_alerts: Vec<_> = firing
            .iter()
            .filter(|(_, l)| l["job"] == healthy.job)
            .collect();
        assert!(
            healthy_alerts.is_empty(),
            "the healthy agent raised {healthy_alerts:?}"
        );
        let missing: Vec<String> = expected
            .iter()
            .filter(|(name, s, label)| {
                !firing.iter().any(|(n, l)| {
                    n == name && l["job"] == s.job && label.is_none_or(|(k, v)| l[k] == v)
                })
            })
            .map(|(name, s, label)| format!("{name} on {} {label:?}", s.job))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if !missing.is_empty() {
        for s in subjects {
            if let Some(a) = &s.agent {
                eprintln!("---- {}\n{}\n{}", s.job, a.logs(), a.get("/metrics"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not firing: {missing:?}\nfiring: {:?}",
        prom.firing()
    );
    eprintln!("every alert fired within {:?}", started.elapsed());
    // No NaN anywhere: a value not known yet is an absent series (the shed agent's W1 and C1
    // windows have no samples, the SVID-less agent has no expiry).
    for s in subjects {
        if let Some(a) = &s.agent {
            let metrics = a.get("/metrics");
            let nan: Vec<_> = body(&metrics)
                .lines()
                .filter(|l| l.ends_with(" NaN"))
                .collect();
            assert!(nan.is_empty(), "{}: {nan:?}", s.job);
        }
    }
    // Over the whole run, the healthy agent never had an alert, not even pending.
    assert_eq!(
        prom.query(&format!(
            r#"count(count_over_time(ALERTS{{job="{}"}}[10m]))"#,
            healthy.job
        )),
        None,
        "the healthy agent raised an alert at some point"
    );
    assert_eq!(
        prom.query(&format!(r#"up{{job="{}"}}"#, healthy.job)),
        Some(1.0)
    );
    assert_eq!(
        prom.query(&format!(r#"knhk_ready{{job="{}"}}"#, healthy.job)),
        Some(1.0)
    );
    drop(old_spire);
    drop(healthy_spire);
}

/// Runs the CLI with `args` against `endpoint` in both forms; returns (human, json) outputs.
fn both(endpoint: &str, args: &[&str]) -> (Output, Output) {
    let run = |output: &str| {
        Command::new(BIN)
            .args(args)
            .args(["--endpoint", endpoint, "--output", output])
            .output()
            .expect("run the CLI")
    };
    let (human, json) = (run("human"), run("json"));
    // For whoever reads the test's output (--nocapture): what a person sees.
    eprintln!("$ knhk-agent {}\n{}", args.join(" "), text(&human));
    (human, json)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// What no human output may contain: protobuf enum names, doubled prefixes, "1 rules".
fn assert_readable(what: &str, o: &Output) {
    let t = text(o);
    for bad in [
        "RUNTIME_CLASS_",
        "ACTION_",
        "MODE_",
        "PROTOCOL_",
        "error: error:",
        " 1 rules",
        " 1 receipts",
        " 1 pins",
    ] {
        assert!(!t.contains(bad), "{what}: {bad:?} in\n{t}");
    }
}

fn json_of(what: &str, o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{what} --output json: {e}\n{}", text(o)))
}

/// Every CLI command in both forms against a real agent (plaintext TCP, given as HOST:PORT
/// without a scheme; [slo] and a [kms] ledger so that every command has something to show):
/// human output in the configuration's words, JSON that parses and carries the same facts.
#[test]
fn kernel_every_cli_command_in_both_forms() {
    if !kernel_available("kernel_every_cli_command_in_both_forms") {
        return;
    }
    let cg = TestCgroup::new("cli");
    let pins = TestPins::new("cli");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config_tcp(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!("[slo]\nbeat_interval_ms = 20\n{}", kms(dir.path())),
    );
    let agent = Agent::start(&config);
    // HOST:PORT, no scheme.
    let endpoint = agent.grpc.clone();
    assert!(!endpoint.contains("://"), "{endpoint}");
    let sink = tcp_sink("127.0.0.1:0");
    assert_eq!(tcp_connect_from(&cg.path, sink), Outcome::Connected);
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[agent]\nmode = \"enforce\"\ndefault_action = \"allow\"\ndefault_class = \"W1\"\n\
             [[policy.rules]]\nname = \"hot\"\naction = \"allow\"\nclass = \"R1\"\nprotocol = \"tcp\"\ncidrs = [\"127.0.0.1/32\"]\nports = [\"{}\"]\n",
            sink.port()
        ),
    )
    .expect("policy");
    let policy = policy.to_str().expect("utf-8");
    let cfg = config.to_str().expect("utf-8");

    // Local commands.
    for args in [&["check-config", cfg][..], &["default-config"][..]] {
        let run = |output: &str| {
            Command::new(BIN)
                .args(args)
                .args(["--output", output])
                .output()
                .expect("cli")
        };
        let (h, j) = (run("human"), run("json"));
        assert!(h.status.success() && j.status.success(), "{args:?}");
        assert_readable(args[0], &h);
        json_of(args[0], &j);
    }

    // policy apply (1 rule), then again (for a rollback to have a previous generation).
    let (h, j) = both(&endpoint, &["policy", "apply", policy]);
    assert!(h.status.success(), "{}", text(&h));
    assert_readable("policy apply", &h);
    assert!(text(&h).contains("applied 1 rule:"), "{}", text(&h));
    let applied = json_of("policy apply", &j);
    assert!(applied["generation"].as_u64().is_some(), "{applied}");

    let (h, j) = both(&endpoint, &["policy", "get"]);
    assert!(h.status.success(), "{}", text(&h));
    assert_readable("policy get", &h);
    let t = text(&h);
    assert!(
        t.contains("mode enforce, default action allow, default class W1"),
        "{t}"
    );
    let row = t
        .lines()
        .find(|l| l.contains("hot"))
        .expect("the rule's row");
    for word in ["allow", "R1", "tcp", "127.0.0.1/32"] {
        assert!(row.contains(word), "{word} in {row:?}");
    }
    let got = json_of("policy get", &j);
    assert_eq!(got["mode"], "enforce", "{got}");
    assert_eq!(got["default_action"], "allow", "{got}");
    assert_eq!(got["default_class"], "W1", "{got}");
    assert_eq!(got["rules"][0]["runtime_class"], "R1", "{got}");
    assert_eq!(got["rules"][0]["protocol"], "tcp", "{got}");
    assert_eq!(got["rules"][0]["action"], "allow", "{got}");

    let (h, j) = both(&endpoint, &["policy", "diff", policy]);
    assert!(h.status.success(), "{}", text(&h));
    assert_readable("policy diff", &h);
    assert_eq!(json_of("policy diff", &j)["settings_changed"], false);

    let (h, j) = both(&endpoint, &["policy", "rollback"]);
    assert!(h.status.success() && j.status.success(), "{}", text(&h));
    assert_readable("policy rollback", &h);
    assert!(json_of("policy rollback", &j)["restored_generation"].is_u64());

    assert_eq!(tcp_connect_from(&cg.path, sink), Outcome::Connected);
    for args in [
        &["status"][..],
        &["heat"][..],
        &["slo"][..],
        &["receipts", "list"][..],
        &["receipts", "keys"][..],
        &["receipts", "checkpoints"][..],
    ] {
        let (h, j) = both(&endpoint, args);
        assert!(h.status.success(), "{args:?}: {}", text(&h));
        assert!(j.status.success(), "{args:?}: {}", text(&j));
        assert_readable(args[0], &h);
        let v = json_of(args[0], &j);
        match args.join(" ").as_str() {
            "receipts keys" => {
                assert!(text(&h).contains("fingerprint sha256:"), "{}", text(&h));
                assert!(
                    v["keys"][0]["fingerprint"]
                        .as_str()
                        .is_some_and(|f| f.starts_with("sha256:") && f.len() == 71),
                    "{v}"
                );
            }
            "receipts checkpoints" => {
                assert!(text(&h).starts_with("number "), "{}", text(&h));
                assert!(v["checkpoints"].is_array(), "{v}");
            }
            "status" => {
                assert!(text(&h).contains("C1"), "{}", text(&h));
                assert!(v["decisions"][0]["runtime_class"] == "R1", "{v}");
            }
            "slo" => {
                assert!(
                    text(&h).lines().any(|l| l.starts_with("C1 ")),
                    "{}",
                    text(&h)
                );
                assert_eq!(v["classes"][2]["runtime_class"], "C1", "{v}");
            }
            "receipts list" => {
                let header = text(&h).lines().nth(1).unwrap_or("").to_owned();
                assert!(header.contains("time"), "{header}");
                assert!(
                    text(&h)
                        .lines()
                        .nth(2)
                        .is_some_and(|l| l.contains('T') && l.contains('Z')),
                    "{}",
                    text(&h)
                );
                assert!(
                    v["receipts"][0]["time_unix_nanos"].as_i64().is_some(),
                    "{v}"
                );
            }
            _ => {}
        }
    }

    // Holds: place, list (with its time column), release; errors say what they are about.
    let (h, j) = both(
        &endpoint,
        &[
            "hold",
            "place",
            "--case-id",
            "CASE-1",
            "--reason",
            "audit",
            "--from-seq",
            "0",
            "--to-seq",
            "5",
        ],
    );
    assert!(h.status.success() && j.status.success(), "{}", text(&h));
    assert_readable("hold place", &h);
    // Both forms placed a hold: the human one says its id.
    let human_id: u64 = text(&h)
        .strip_prefix("hold ")
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("hold N placed");
    let id = json_of("hold place", &j)["id"].as_u64().expect("id");
    let (h, j) = both(&endpoint, &["hold", "list"]);
    assert!(h.status.success(), "{}", text(&h));
    assert!(text(&h)
        .lines()
        .next()
        .is_some_and(|l| l.contains("placed")));
    assert!(
        text(&h)
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains('T') && l.contains('Z')),
        "{}",
        text(&h)
    );
    assert_eq!(
        json_of("hold list", &j)["holds"].as_array().map(Vec::len),
        Some(2)
    );
    let release = |id: u64, output: &str| {
        Command::new(BIN)
            .args(["hold", "release", &id.to_string(), "--reason", "closed"])
            .args(["--endpoint", &endpoint, "--output", output])
            .output()
            .expect("cli")
    };
    let h = release(human_id, "human");
    assert!(h.status.success(), "{}", text(&h));
    assert_readable("hold release", &h);
    let j = release(id, "json");
    assert!(json_of("hold release", &j)["released_unix_nanos"].is_i64());
    let (h, j) = both(&endpoint, &["hold", "release", "999", "--reason", "x"]);
    assert_eq!(h.status.code(), Some(1), "{}", text(&h));
    assert!(text(&h).contains("error: not found:"), "{}", text(&h));
    assert!(!text(&h).contains("policy"), "{}", text(&h));
    assert_eq!(json_of("hold release", &j)["exit_code"], 1);
    let (h, _) = both(
        &endpoint,
        &[
            "hold",
            "place",
            "--case-id",
            "C",
            "--reason",
            "r",
            "--from-seq",
            "9",
            "--to-seq",
            "3",
        ],
    );
    assert_eq!(h.status.code(), Some(64), "{}", text(&h));
    assert!(text(&h).contains("error: invalid request:"), "{}", text(&h));

    // grpcurl 1.8 and other older clients speak reflection v1alpha.
    runtime().block_on(async {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut c = ServerReflectionClient::new(agent.channel().await);
        let mut replies = c
            .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            }]))
            .await
            .expect("v1alpha reflection is served")
            .into_inner();
        let reply = replies.message().await.expect("reply").expect("one reply");
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("{reply:?}");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"knhk.agent.v1.PolicyService"), "{names:?}");
    });

    // A server that accepts and never answers: exit 69 within the timeout, saying so.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr").to_string();
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["status", "--endpoint", &silent_addr, "--timeout", "1"])
        .output()
        .expect("cli");
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(text(&out).contains("--timeout"), "{}", text(&out));
    drop(silent);

    // The ledger, verified offline once the agent stopped; a missing file says so.
    let (status, _) = agent.sigterm();
    assert!(status.success());
    let db = dir.path().join("receipts.redb");
    let db = db.to_str().expect("utf-8");
    let missing = dir.path().join("nope.redb");
    for (file, code) in [(db, 0), (missing.to_str().expect("utf-8"), 64)] {
        let run = |output: &str| {
            Command::new(BIN)
                .args(["receipts", "verify", "--db", file, "--output", output])
                .output()
                .expect("cli")
        };
        let (h, j) = (run("human"), run("json"));
        assert_eq!(h.status.code(), Some(code), "{}", text(&h));
        assert_eq!(j.status.code(), Some(code), "{}", text(&j));
        assert_readable("receipts verify", &h);
        json_of("receipts verify", &j);
        if code == 64 {
            assert!(text(&h).contains("does not exist"), "{}", text(&h));
        }
    }
    // detach, in both forms (the second finds nothing left to remove).
    let pin_root = pins.root.to_str().expect("utf-8");
    for output in ["human", "json"] {
        let out = Command::new(BIN)
            .args(["detach", "--pin-root", pin_root, "--output", output])
            .output()
            .expect("cli");
        assert!(out.status.success(), "{}", text(&out));
        assert_readable("detach", &out);
        if output == "json" {
            json_of("detach", &out);
        }
    }
}
