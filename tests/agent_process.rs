//! Kernel tests of the `knhk-agent` process (need root, cgroup v2 and BPF): the real binary,
//! started, killed with SIGKILL and restarted, against a throwaway cgroup and pin directory.

mod support;

use aya::maps::{lpm_trie::LpmTrie, HashMap as BpfHashMap, Map, MapData};
use knhk_abi::{map_names, LpmKeyV4, RuleLeaf, ScopeKey, ScopeValue, ABI_VERSION};
use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use support::{prom::Prometheus, *};

fn deny_rule(port: u16) -> String {
    format!("[[policy.rules]]\nname = \"block\"\naction = \"deny\"\ncidrs = [\"127.0.0.1/32\"]\nports = [\"{port}\"]\n")
}

#[test]
fn kernel_enforcement_survives_kill9_and_restart_readopts() {
    if !kernel_available("kernel_enforcement_survives_kill9_and_restart_readopts") {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("kill9");
    let pins = TestPins::new("kill9");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, &deny_rule(target.port()));

    let agent = Agent::start(&config);
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    assert!(agent.get("/readyz").contains("200 OK"), "ready");
    agent.kill9();
    assert_eq!(
        tcp_connect_from(&cg.path, target),
        Outcome::Denied,
        "enforcement continues with the agent dead"
    );

    let agent = Agent::start(&config);
    assert_eq!(
        tcp_connect_from(&cg.path, target),
        Outcome::Denied,
        "and after the restart"
    );
    let metrics = agent.get("/metrics");
    assert!(
        metrics.contains("knhk_policy_generation 1"),
        "the restart re-adopts the live generation (kept under agent.state_dir):\n{metrics}"
    );
    assert!(
        metrics.contains("knhk_connect_decisions_total{action=\"deny\",class=\"C1\"} 3"),
        "decision counters survive in the pinned maps:\n{metrics}"
    );
    assert!(
        agent.logs().contains("re-adopted pinned maps"),
        "the restart says it re-adopted"
    );
    // Exactly one link per program: the restart replaced the programs, it did not stack them.
    let links: Vec<_> = std::fs::read_dir(pins.root.join(format!("v{ABI_VERSION}/links")))
        .expect("links")
        .collect();
    assert_eq!(links.len(), knhk_abi::program_names::ALL.len());
    agent.kill9();
}

#[test]
fn kernel_pin_with_a_different_abi_is_refused() {
    if !kernel_available("kernel_pin_with_a_different_abi_is_refused") {
        return;
    }
    let cg = TestCgroup::new("abi");
    let pins = TestPins::new("abi");
    let maps = pins.root.join(format!("v{ABI_VERSION}/maps"));
    std::fs::create_dir_all(&maps).expect("pin dir");
    // An LPM trie of the right name but a different value size, as an incompatible build would
    // leave it.
    let name = std::ffi::CString::new("KNHK_POLICY_V4").expect("name");
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: size_of::<libbpf_sys::bpf_map_create_opts>() as _,
        map_flags: 1, // BPF_F_NO_PREALLOC
        ..Default::default()
    };
    let fd = unsafe {
        libbpf_sys::bpf_map_create(
            libbpf_sys::BPF_MAP_TYPE_LPM_TRIE,
            name.as_ptr(),
            4 + 24,
            64,
            16,
            &opts,
        )
    };
    assert!(fd >= 0, "bpf_map_create: {fd}");
    let path =
        std::ffi::CString::new(maps.join("KNHK_POLICY_V4").to_str().expect("utf8")).expect("path");
    assert_eq!(
        unsafe { libbpf_sys::bpf_obj_pin(fd, path.as_ptr()) },
        0,
        "pin"
    );
    unsafe { libc::close(fd) };

    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, "");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("does not match this agent's map ABI"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "value size is 64, expected {}",
            size_of::<RuleLeaf>()
        )),
        "{stderr}"
    );
    assert!(
        !pins
            .root
            .join(format!("v{ABI_VERSION}/links/knhk_connect4"))
            .exists(),
        "nothing was attached"
    );
}

#[test]
fn kernel_invalid_config_exits_before_touching_the_kernel() {
    if !kernel_available("kernel_invalid_config_exits_before_touching_the_kernel") {
        return;
    }
    let cg = TestCgroup::new("badcfg");
    let pins = TestPins::new("badcfg");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        "[[policy.rules]]\nname = \"bad\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/33\"]\n",
    );
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let line = std::fs::read_to_string(&config)
        .expect("read")
        .lines()
        .position(|l| l.starts_with("cidrs"))
        .expect("the cidrs line")
        + 1;
    assert!(
        stderr.contains(&format!("line {line}")),
        "names the line ({line}): {stderr}"
    );
    assert!(
        stderr.contains("\"10.0.0.0/33\" is not a valid prefix: length 33 exceeds 32 for IPv4"),
        "{stderr}"
    );
    assert!(!pins.root.exists(), "no pins were created");
}

fn scope_entries(pin_root: &Path, cgroup_id: u64) -> (usize, usize) {
    let maps = pin_root.join(format!("v{ABI_VERSION}/maps"));
    let open = |name: &str| {
        Map::from_map_data(MapData::from_pin(maps.join(name)).expect("pin")).expect("map")
    };
    let scopes: BpfHashMap<MapData, ScopeKey, ScopeValue> =
        BpfHashMap::try_from(open(map_names::SCOPES)).expect("scopes");
    let trie: LpmTrie<MapData, LpmKeyV4, RuleLeaf> =
        LpmTrie::try_from(open(map_names::POLICY_V4)).expect("trie");
    let s = scopes
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.cgroup_id == cgroup_id)
        .count();
    let t = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.data().scope == cgroup_id)
        .count();
    (s, t)
}

#[test]
fn kernel_cgroup_created_after_the_policy_is_enforced_and_removal_leaves_nothing() {
    if !kernel_available(
        "kernel_cgroup_created_after_the_policy_is_enforced_and_removal_leaves_nothing",
    ) {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("late");
    let pins = TestPins::new("late");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = format!(
        "[[policy.rules]]\nname = \"late-pod\"\naction = \"deny\"\ncgroup = \"late\"\ncidrs = [\"127.0.0.0/8\"]\nports = [\"{}\"]\n",
        target.port()
    );
    let config = write_config(dir.path(), &cg.path, &pins.root, &rules);
    let agent = Agent::start(&config);

    let late = cg.path.join("late");
    let created = Instant::now();
    std::fs::create_dir(&late).expect("mkdir");
    let id = TestCgroup::id_of(&late);
    let enforced_after = loop {
        if tcp_connect_from(&late, target) == Outcome::Denied {
            break created.elapsed();
        }
        assert!(created.elapsed() < Duration::from_secs(5), "never enforced");
    };
    eprintln!(
        "cgroup enforced {} ms after creation",
        enforced_after.as_millis()
    );
    assert!(
        enforced_after < Duration::from_millis(100),
        "enforced after {enforced_after:?}"
    );
    assert_eq!(scope_entries(&pins.root, id), (1, 1));

    std::fs::remove_dir(&late).expect("rmdir");
    let removed = Instant::now();
    // Removal is followed through the parent's inotify watch (5-10 ms here, also beside three
    // busy loops): a lost event would leave the entries for good. (One was lost, one run in
    // about ten under load, while `DirWatcher::changed` dropped the batch it had read when the
    // main loop's `select!` chose another branch.)
    while scope_entries(&pins.root, id) != (0, 0) {
        assert!(
            removed.elapsed() < Duration::from_secs(2),
            "stale entries: {:?}",
            scope_entries(&pins.root, id)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "cgroup removal followed {} ms after rmdir",
        removed.elapsed().as_millis()
    );
    // The entries go before the log line is written: wait for it rather than race it.
    wait_until("the removal is logged", Duration::from_secs(2), || {
        agent.logs().contains("rule cgroup removed")
    });
    drop(agent);
}

#[test]
fn kernel_metrics_are_scraped_by_a_real_prometheus_and_lint_clean() {
    if !kernel_available("kernel_metrics_are_scraped_by_a_real_prometheus_and_lint_clean") {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("prom");
    let pins = TestPins::new("prom");
    let dir = tempfile::tempdir().expect("tempdir");
    // With [slo], so that the beat engine's and the heat tracker's metrics are linted too.
    // Every decision counts as heat, so five connects make the hottest destination.
    let rules = format!(
        "heat_sample_every = 1\n{}[slo]\nr1_p99_max_ns = 200000\nbeat_interval_ms = 20\n",
        deny_rule(target.port())
    );
    let config = write_config(dir.path(), &cg.path, &pins.root, &rules);
    let agent = Agent::start(&config);
    for _ in 0..5 {
        assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    }
    // The events themselves, not a pause: a beat has run and the destination's decayed heat is
    // exported.
    let heat_line =
        format!("knhk_heat_decayed_attempts{{destination=\"{target}\",protocol=\"tcp\"}}");
    wait_until(
        "a beat has run and the destination's heat is exported",
        Duration::from_secs(10),
        || {
            let metrics = agent.get("/metrics");
            let value = |prefix: &str| {
                metrics
                    .lines()
                    .find(|l| l.starts_with(prefix))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<f64>().ok())
            };
            value("knhk_beats_total ").is_some_and(|b| b > 0.0)
                && value(&heat_line).is_some_and(|h| h > 0.0)
        },
    );

    // promtool lints the exposition as served.
    let response = agent.get("/metrics");
    let body = response.split("\r\n\r\n").nth(1).expect("body");
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let out = lint.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let prom = Prometheus::start(agent.metrics);
    let query = r#"knhk_connect_decisions_total{action="deny",class="C1"}"#;
    let started = Instant::now();
    let value = loop {
        if let Some(v) = prom.query(query) {
            break v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "prometheus never returned {query}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(value, 5.0, "the decisions the test's connects produced");
    assert_eq!(
        prom.query(r#"knhk_rule_hits_total{rule="block"}"#),
        Some(5.0)
    );
    assert_eq!(prom.query("up"), Some(1.0));
    assert!(
        prom.query("knhk_beats_total").is_some_and(|b| b > 0.0),
        "the beat engine runs and is scraped"
    );
    assert_eq!(
        prom.query(&format!(
            r#"knhk_heat_decayed_attempts{{destination="{target}",protocol="tcp"}}"#
        ))
        .map(|v| v > 0.0),
        Some(true),
        "the hottest destination is exported"
    );
    // The API ranks by decayed heat too.
    let out = Command::new(BIN)
        .args(["heat", "--output", "json", "--endpoint", &agent.endpoint()])
        .output()
        .expect("cli");
    let heat: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(heat["entries"][0]["port"], target.port(), "{heat}");
    assert!(
        heat["entries"][0]["decayed_heat"]
            .as_f64()
            .is_some_and(|h| h > 0.0),
        "{heat}"
    );
}

// ---- gRPC API ----

use knhk_agent::api::pb::{
    self, agent_service_client::AgentServiceClient, policy_service_client::PolicyServiceClient,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn policy_client(agent: &Agent) -> PolicyServiceClient<tonic::transport::Channel> {
    PolicyServiceClient::new(agent.channel().await).max_encoding_message_size(64 << 20)
}

fn rule(name: &str, action: pb::Action, cidr: &str, port: &str) -> pb::Rule {
    pb::Rule {
        name: name.into(),
        action: action as i32,
        cidrs: vec![cidr.into()],
        ports: if port.is_empty() {
            vec![]
        } else {
            vec![port.into()]
        },
        ..Default::default()
    }
}

fn doc(rules: Vec<pb::Rule>) -> pb::PolicyDocument {
    pb::PolicyDocument {
        rules,
        ..Default::default()
    }
}

#[test]
fn kernel_grpc_apply_is_enforced_when_it_returns_and_rollback_undoes_it() {
    if !kernel_available("kernel_grpc_apply_is_enforced_when_it_returns_and_rollback_undoes_it") {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("grpc");
    let pins = TestPins::new("grpc");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        "[[policy.rules]]\nname = \"open\"\naction = \"allow\"\ncidrs = [\"127.0.0.0/8\"]\n",
    );
    let agent = Agent::start(&config);
    let rt = runtime();
    rt.block_on(async {
        let mut c = policy_client(&agent).await;
        let mut events = AgentServiceClient::new(agent.channel().await)
            .watch_events(pb::WatchEventsRequest::default())
            .await
            .expect("watch")
            .into_inner();
        assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Connected);
        let live = c.get_policy(pb::GetPolicyRequest {}).await.expect("get").into_inner();
        assert_eq!(live.generation, 1);

        let deny = doc(vec![rule("block", pb::Action::Deny, "127.0.0.1/32", &target.port().to_string())]);
        let diff = c.dry_run(pb::DryRunRequest { policy: Some(deny.clone()) }).await.expect("dry run").into_inner();
        assert_eq!((diff.added, diff.removed, diff.changed), (vec!["block".to_string()], vec!["open".to_string()], vec![]));
        assert_eq!(c.get_policy(pb::GetPolicyRequest {}).await.expect("get").into_inner().generation, 1, "a dry run applies nothing");

        let applied = c
            .apply_policy(pb::ApplyPolicyRequest { policy: Some(deny), expected_generation: Some(1) })
            .await
            .expect("apply")
            .into_inner();
        assert_eq!(applied.generation, 2);
        assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied, "enforced as soon as ApplyPolicy returned");
        let ev = events.message().await.expect("event").expect("stream open");
        assert!(matches!(ev.event, Some(pb::watch_events_response::Event::PolicySwitched(ref p)) if p.generation == 2), "{ev:?}");

        // A writer holding an old generation is refused and changes nothing.
        let stale = c
            .apply_policy(pb::ApplyPolicyRequest { policy: Some(doc(vec![rule("x", pb::Action::Allow, "10.0.0.0/8", "")])), expected_generation: Some(1) })
            .await
            .expect_err("stale");
        assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
        assert!(stale.message().contains("expected generation 1, but the live generation is 2"), "{stale:?}");

        // Two writers racing with the same expected generation: exactly one wins.
        let mut c2 = policy_client(&agent).await;
        let one = doc(vec![rule("w1", pb::Action::Allow, "10.1.0.0/16", "")]);
        let two = doc(vec![rule("w2", pb::Action::Allow, "10.2.0.0/16", "")]);
        let live_now = c.get_policy(pb::GetPolicyRequest {}).await.expect("get").into_inner().generation;
        let (r1, r2) = tokio::join!(
            c.apply_policy(pb::ApplyPolicyRequest { policy: Some(one), expected_generation: Some(live_now) }),
            c2.apply_policy(pb::ApplyPolicyRequest { policy: Some(two), expected_generation: Some(live_now) }),
        );
        let codes = [r1.as_ref().err().map(|e| e.code()), r2.as_ref().err().map(|e| e.code())];
        assert!(
            codes.contains(&None) && codes.contains(&Some(tonic::Code::FailedPrecondition)),
            "one writer wins, the other is refused: {codes:?}"
        );
        // Put the deny policy back for the rollback below (generation 4 → 5).
        let back = c.get_policy(pb::GetPolicyRequest {}).await.expect("get").into_inner();
        assert_eq!(back.generation, live_now + 1);
        let rolled = c.rollback(pb::RollbackRequest { expected_generation: Some(back.generation) }).await.expect("rollback").into_inner();
        assert_eq!((rolled.generation, rolled.restored_generation), (4, 2));
        assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied, "the deny document is live again");

        let rolled = c.rollback(pb::RollbackRequest { expected_generation: Some(4) }).await.expect("rollback").into_inner();
        assert_eq!((rolled.generation, rolled.restored_generation), (5, 3));
        assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Connected, "allowed as soon as Rollback returned");

        let status = AgentServiceClient::new(agent.channel().await)
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(status.generation, 5);
        let c1 = status.decisions.iter().find(|d| d.runtime_class == pb::RuntimeClass::C1 as i32).expect("C1");
        assert_eq!((c1.allowed, c1.denied), (2, 2));
    });
}

#[test]
fn kernel_grpc_bad_policies_get_precise_errors_and_change_nothing() {
    if !kernel_available("kernel_grpc_bad_policies_get_precise_errors_and_change_nothing") {
        return;
    }
    let cg = TestCgroup::new("grpcbad");
    let pins = TestPins::new("grpcbad");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        "[policy]\nmax_rules = 100000\n[[policy.rules]]\nname = \"open\"\naction = \"allow\"\ncidrs = [\"0.0.0.0/0\"]\n",
    );
    // 8 MiB requests: 100,001 small rules fit (and are refused for their number), a document
    // of 16 MB does not.
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(
        &config,
        text.replacen("[agent]\n", "[agent]\nmax_request_bytes = 8388608\n", 1),
    )
    .expect("write");
    let agent = Agent::start(&config);
    let ok = |name: &str| rule(name, pb::Action::Deny, "10.0.0.0/8", "");
    let with = |f: &dyn Fn(&mut pb::Rule)| {
        let mut r = ok("r");
        f(&mut r);
        Some(doc(vec![r]))
    };
    let many = |n: usize| {
        Some(doc((0..n)
            .map(|i| {
                rule(
                    &format!("r{i}"),
                    pb::Action::Deny,
                    &format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255),
                    "",
                )
            })
            .collect()))
    };
    let cases: Vec<(&str, Option<pb::PolicyDocument>, tonic::Code, &str)> = vec![
        ("no document", None, tonic::Code::InvalidArgument, "policy: required"),
        ("empty document", Some(doc(vec![])), tonic::Code::InvalidArgument, "rules: a policy needs at least one rule"),
        ("prefix too long", with(&|r| r.cidrs = vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()]), tonic::Code::InvalidArgument, "rules[0].cidrs[1]: \"10.0.0.0/33\" is not a valid prefix: length 33 exceeds 32 for IPv4"),
        ("v6 prefix too long", with(&|r| r.cidrs = vec!["fd00::/200".into()]), tonic::Code::InvalidArgument, "rules[0].cidrs[0]: \"fd00::/200\" is not a valid prefix: length 200 exceeds 128 for IPv6"),
        ("not an address", with(&|r| r.cidrs = vec!["example.com/8".into()]), tonic::Code::InvalidArgument, "rules[0].cidrs[0]: \"example.com/8\" is not a valid prefix: \"example.com\" is not an IP address"),
        ("host bits", with(&|r| r.cidrs = vec!["10.1.2.3/8".into()]), tonic::Code::InvalidArgument, "rules[0].cidrs[0]: \"10.1.2.3/8\" has host bits set"),
        ("garbage prefix", with(&|r| r.cidrs = vec!["/".into()]), tonic::Code::InvalidArgument, "rules[0].cidrs[0]:"),
        ("no cidrs", with(&|r| r.cidrs.clear()), tonic::Code::InvalidArgument, "rules[0].cidrs: required"),
        ("inverted port range", with(&|r| r.ports = vec!["8080-80".into()]), tonic::Code::InvalidArgument, "rules[0].ports[0]: port range \"8080-80\" is out of order: 8080 > 80"),
        ("port too big", with(&|r| r.ports = vec!["65536".into()]), tonic::Code::InvalidArgument, "rules[0].ports[0]: port range \"65536\": \"65536\" is not a port"),
        ("port not a number", with(&|r| r.ports = vec!["http".into()]), tonic::Code::InvalidArgument, "rules[0].ports[0]:"),
        ("negative port", with(&|r| r.ports = vec!["-1".into()]), tonic::Code::InvalidArgument, "rules[0].ports[0]:"),
        ("missing action", with(&|r| r.action = 0), tonic::Code::InvalidArgument, "rules[0].action: required"),
        ("unknown action", with(&|r| r.action = 42), tonic::Code::InvalidArgument, "rules[0].action: unknown value 42"),
        ("unknown class", with(&|r| r.runtime_class = 9), tonic::Code::InvalidArgument, "rules[0].runtime_class: unknown runtime class 9"),
        ("unknown protocol", with(&|r| r.protocol = 6), tonic::Code::InvalidArgument, "rules[0].protocol: unknown value 6"),
        ("empty name", with(&|r| r.name.clear()), tonic::Code::InvalidArgument, "rules[0].name: rule name \"\" must be 1 to 63 characters long"),
        ("bad name", with(&|r| r.name = "no spaces".into()), tonic::Code::InvalidArgument, "rules[0].name: rule name \"no spaces\" contains ' '"),
        ("long name", with(&|r| r.name = "x".repeat(64)), tonic::Code::InvalidArgument, "must be 1 to 63 characters long"),
        ("absolute cgroup", with(&|r| r.cgroup = "/kubepods".into()), tonic::Code::InvalidArgument, "rules[0].cgroup: cgroup \"/kubepods\" must be relative"),
        ("escaping cgroup", with(&|r| r.cgroup = "a/../../etc".into()), tonic::Code::InvalidArgument, "rules[0].cgroup: cgroup \"a/../../etc\" has an invalid component \"..\""),
        ("bad park target", with(&|r| r.park_to = "tier2".into()), tonic::Code::InvalidArgument, "rules[0].park_to: \"tier2\" is not an address and port"),
        ("duplicate names", Some(doc(vec![ok("a"), ok("b"), ok("a")])), tonic::Code::InvalidArgument, "rules[2].name: duplicate rule name \"a\" (also rules[0].name)"),
        ("audit as default", Some(pb::PolicyDocument { rules: vec![ok("a")], default_action: pb::Action::Audit as i32, ..Default::default() }), tonic::Code::InvalidArgument, "default_action: must be ACTION_ALLOW or ACTION_DENY"),
        ("unknown mode", Some(pb::PolicyDocument { rules: vec![ok("a")], mode: 5, ..Default::default() }), tonic::Code::InvalidArgument, "mode: unknown value 5"),
        ("too many overlapping", Some(doc((0..1025).map(|i| rule(&format!("p{i}"), pb::Action::Deny, "10.0.0.0/8", &(1000 + i).to_string())).collect())), tonic::Code::InvalidArgument, "1025 rule entries (rule x port range) cover 10.0.0.0/8"),
        ("100,001 rules", many(100_001), tonic::Code::InvalidArgument, "rules: 100001 rules exceed the limit of 100000 (policy.max_rules)"),
        ("oversized message", with(&|r| r.cidrs = vec!["255.255.255.255/32".to_string(); 800_000]), tonic::Code::OutOfRange, "message length too large"),
    ];
    assert!(cases.len() >= 25);
    let rt = runtime();
    rt.block_on(async {
        let mut c = policy_client(&agent).await;
        let before = c
            .get_policy(pb::GetPolicyRequest {})
            .await
            .expect("get")
            .into_inner();
        for (what, policy, code, needle) in cases {
            let err = c
                .apply_policy(pb::ApplyPolicyRequest {
                    policy,
                    expected_generation: None,
                })
                .await
                .expect_err(what);
            assert_eq!(err.code(), code, "{what}: {err:?}");
            assert!(
                err.message().contains(needle),
                "{what}: expected {needle:?} in {:?}",
                err.message()
            );
            let now = c
                .get_policy(pb::GetPolicyRequest {})
                .await
                .expect("get")
                .into_inner();
            assert_eq!(
                (now.generation, &now.digest),
                (before.generation, &before.digest),
                "{what} changed the live policy"
            );
        }
        // A deadline that has passed when the switch would happen changes nothing either.
        let mut req = tonic::Request::new(pb::ApplyPolicyRequest {
            policy: many(50_000),
            expected_generation: None,
        });
        req.set_timeout(Duration::from_millis(1));
        let err = c.apply_policy(req).await.expect_err("deadline");
        assert!(
            matches!(
                err.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            "{err:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
        let now = c
            .get_policy(pb::GetPolicyRequest {})
            .await
            .expect("get")
            .into_inner();
        assert_eq!(
            now.generation, before.generation,
            "an expired apply switched nothing"
        );
    });
}

#[test]
fn kernel_grpc_health_reflection_and_cli() {
    if !kernel_available("kernel_grpc_health_reflection_and_cli") {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("grpccli");
    let pins = TestPins::new("grpccli");
    let dir = tempfile::tempdir().expect("tempdir");
    // Explicit plaintext loopback TCP (the API is on a Unix socket unless listen_address is set):
    // allowed, with a warning that every local user can reach it.
    let config = write_config_tcp(dir.path(), &cg.path, &pins.root, &deny_rule(target.port()));
    let agent = Agent::start(&config);
    assert!(agent.grpc_addr().ip().is_loopback(), "{}", agent.grpc);
    let rt = runtime();
    rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", agent.grpc))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        for service in [
            "",
            "knhk.agent.v1.PolicyService",
            "knhk.agent.v1.AgentService",
        ] {
            let r = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("health")
                .into_inner();
            assert_eq!(
                r.status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                "{service}"
            );
        }
        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut refl = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = refl
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .expect("reflection")
            .into_inner();
        let resp = stream.message().await.expect("message").expect("response");
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("{resp:?}")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for want in [
            "knhk.agent.v1.PolicyService",
            "knhk.agent.v1.AgentService",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
    });

    let endpoint = agent.endpoint();
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .args(["--endpoint", &endpoint])
            .output()
            .expect("cli")
    };
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    let policy_file = dir.path().join("open.toml");
    std::fs::write(
        &policy_file,
        "[[policy.rules]]\nname = \"open\"\naction = \"allow\"\ncidrs = [\"127.0.0.0/8\"]\n",
    )
    .expect("write");
    let out = cli(&[
        "policy",
        "diff",
        policy_file.to_str().expect("utf8"),
        "--output",
        "json",
    ]);
    let diff: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(diff["added"][0], "open", "{diff}");
    assert_eq!(diff["removed"][0], "block", "{diff}");
    let out = cli(&[
        "policy",
        "apply",
        policy_file.to_str().expect("utf8"),
        "--expected-generation",
        "1",
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(applied["generation"], 2);
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Connected);
    let out = cli(&[
        "policy",
        "apply",
        policy_file.to_str().expect("utf8"),
        "--expected-generation",
        "1",
    ]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "stale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[policy.rules]]\nname = \"x\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/33\"]\n",
    )
    .expect("write");
    let out = cli(&["policy", "apply", bad.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(64), "a bad file is refused locally");
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 4"));
    let out = cli(&["policy", "rollback"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    for cmd in [&["status"][..], &["heat"], &["slo"], &["policy", "get"]] {
        let out = cli(cmd);
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut json_args = cmd.to_vec();
        json_args.extend(["--output", "json"]);
        let out = cli(&json_args);
        let _: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{cmd:?} --output json: {e}"));
    }
    let out = Command::new(BIN)
        .args(["status", "--endpoint", "http://127.0.0.1:1"])
        .output()
        .expect("cli");
    assert_eq!(out.status.code(), Some(69), "unreachable agent");
    let logs = agent.logs();
    assert!(
        logs.contains("agent.listen_address") && logs.contains("any local user"),
        "explicit loopback TCP is warned about: {logs}"
    );
}

/// The "Fortune 5 Configuration" example of the readiness plan, verbatim.
const PLAN_EXAMPLE: &str = include_str!("data/fortune5-plan.toml");

#[test]
fn check_config_loads_the_plans_example_and_suggests_fixes_for_typos() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("fortune5.toml");
    std::fs::write(&plan, PLAN_EXAMPLE).expect("write");
    let out = Command::new(BIN)
        .args(["check-config"])
        .arg(&plan)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "active: [agent], [policy], [slo], [spiffe], [kms], [multi_region], [promotion]"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("warning: slo.r1_p99_max_ns: a ceiling of 2 ns"),
        "{stdout}"
    );
    // The other ways the plan's example loads but cannot work as written.
    for needle in [
        "warning: spiffe.authorized_ids.policy_writers is empty",
        "warning: spiffe.authorized_ids.region_peers is empty",
        "names one key: rotation creates a new key",
        "warning: multi_region.primary_region = \"us-east-1\" has no effect",
        "every class is paused within three beats",
    ] {
        assert!(stdout.contains(needle), "{needle:?} in {stdout}");
    }
    assert!(
        !stdout.contains("accepted, not active"),
        "every section of the plan is active: {stdout}"
    );
    let out = Command::new(BIN)
        .args(["check-config", "--output", "json"])
        .arg(&plan)
        .output()
        .expect("run");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["valid"], true);
    assert_eq!(json["inactive_sections"].as_array().map(Vec::len), Some(0));

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[agent]\nmetrics_adress = \"127.0.0.1:9464\"\n").expect("write");
    let out = Command::new(BIN)
        .args(["check-config"])
        .arg(&typo)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr.contains("line 2") && stderr.contains("did you mean `metrics_address`?"),
        "{stderr}"
    );

    // The plan's example with mTLS switched off: its 0.0.0.0 gRPC address needs mTLS, so run
    // refuses it before touching anything (exit 64), naming the key. (With mTLS on it would
    // attach at the machine's cgroup root, which a test must never do.)
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&plan)
        .env("KNHK_SPIFFE__ENABLED", "false")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("0.0.0.0:50051") && stderr.contains("sidecar.listen_address"),
        "{stderr}"
    );
}

/// `knhk-agent <args>` with plaintext access to `agent`'s gRPC API.
fn cli(agent: &Agent, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .args(["--endpoint", &agent.endpoint()])
        .output()
        .expect("run the CLI")
}

/// `n` clients placing legal holds through the CLI (case ids `<case>-<client>-<k>`) until `stop`;
/// each returns the hold ids acknowledged (returned only once their receipt is durable).
fn hold_clients(
    endpoint: &str,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    n: usize,
    case: &'static str,
) -> Vec<std::thread::JoinHandle<Vec<u64>>> {
    (0..n)
        .map(|c| {
            let (endpoint, stop) = (endpoint.to_owned(), stop.clone());
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut k = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    k += 1;
                    let out = Command::new(BIN)
                        .args(["hold", "place", "--case-id"])
                        .arg(format!("{case}-{c}-{k}"))
                        .args(["--reason", "load", "--from-seq", "0", "--to-seq", "1"])
                        .args(["--endpoint", &endpoint, "--output", "json"])
                        .output()
                        .expect("run the CLI");
                    if !out.status.success() {
                        continue; // refused or cut off while stopping: not acknowledged
                    }
                    let v: serde_json::Value =
                        serde_json::from_slice(&out.stdout).expect("hold place json");
                    acked.push(v["id"].as_u64().expect("hold id"));
                }
                acked
            })
        })
        .collect()
}

/// The ids of the holds whose `hold_placed` receipt is in the ledger at `db`.
fn receipted_holds(db: &Path) -> std::collections::BTreeSet<u64> {
    let ledger = knhk_agent::receipts::Ledger::open(db, "test", "local").expect("open");
    let size = ledger.size().expect("size");
    let mut receipted = std::collections::BTreeSet::new();
    for (receipt, payload) in ledger.receipts(0, size as usize).expect("receipts") {
        if receipt.kind == knhk_agent::model::ReceiptKind::HoldPlaced {
            let hold: serde_json::Value =
                serde_json::from_slice(payload.as_deref().unwrap_or_default()).expect("payload");
            receipted.insert(hold["id"].as_u64().expect("id"));
        }
    }
    receipted
}

/// The latest signed checkpoint (tree size, root) and the leaf hashes of the receipts it covers,
/// as a client would have seen them acknowledged.
fn acknowledged_tree(agent: &Agent) -> (u64, Vec<u8>, Vec<[u8; 32]>) {
    use knhk_agent::api::receipts::pb::{
        receipt_service_client::ReceiptServiceClient, GetCheckpointRequest, ListReceiptsRequest,
    };
    runtime().block_on(async {
        let mut c = ReceiptServiceClient::new(agent.channel().await);
        let cp = c
            .get_checkpoint(GetCheckpointRequest { number: None })
            .await
            .expect("the latest signed checkpoint")
            .into_inner()
            .checkpoint
            .expect("checkpoint");
        let mut leaves = Vec::new();
        while (leaves.len() as u64) < cp.tree_size {
            let page = c
                .list_receipts(ListReceiptsRequest {
                    from_seq: leaves.len() as u64,
                    limit: 1000,
                })
                .await
                .expect("list receipts")
                .into_inner();
            assert!(!page.receipts.is_empty(), "receipts up to the checkpoint");
            for r in page.receipts {
                if leaves.len() as u64 == cp.tree_size {
                    break;
                }
                leaves.push(knhk_agent::receipts::merkle::leaf(&r.encoding));
            }
        }
        (cp.tree_size, cp.root_hash, leaves)
    })
}

/// `kill -9` while receipts flood in (policy applies and legal holds in flight from several
/// clients, pulses every 8 ms): after the restart the ledger extends the last checkpoint
/// acknowledged before the kill (a consistency proof from its root verifies), every receipt it
/// covered has the same leaf hash, every acknowledged hold has its receipt, and the ledger
/// verifies offline.
#[test]
fn kernel_receipts_survive_kill9_mid_flood_and_extend_the_acknowledged_checkpoint() {
    if !kernel_available(
        "kernel_receipts_survive_kill9_mid_flood_and_extend_the_acknowledged_checkpoint",
    ) {
        return;
    }
    let _serial = timing_shared();
    let cg = TestCgroup::new("receipts");
    let pins = TestPins::new("receipts");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("receipts.redb");
    // 1 ms beats: a pulse every 8 ms checkpoints what the flood wrote since the last one.
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "[slo]\nbeat_interval_ms = 1\n[kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n[receipts]\npath = \"{}\"\nnode = \"test-node\"\n",
            dir.path().join("keys").display(),
            db.display()
        ),
    );
    let agent = Agent::start(&config);
    let endpoint = agent.endpoint();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, deny_rule(9)).expect("policy");

    // The flood: three clients placing holds, one applying policies, until told to stop; each
    // keeps what was acknowledged (a hold id is returned only once its receipt is durable).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holders = hold_clients(&endpoint, &stop, 3, "FLOOD");
    let applier = {
        let (endpoint, stop, policy) = (endpoint.clone(), stop.clone(), policy.clone());
        std::thread::spawn(move || {
            let mut acked = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new(BIN)
                    .args(["policy", "apply"])
                    .arg(&policy)
                    .args(["--endpoint", &endpoint])
                    .output()
                    .expect("run the CLI");
                acked += usize::from(out.status.success());
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    // Acknowledged before the kill: the latest signed checkpoint and the receipts under it.
    let (old_size, old_root, old_leaves) = acknowledged_tree(&agent);
    assert!(old_size > 20, "receipts are being written: {old_size}");
    // The kill lands the moment a client has a hold acknowledged, with more in flight (a kill
    // at a random moment rarely falls between an acknowledgement and its commit): a hold
    // acknowledged before its receipt was durable is lost here.
    let mut agent = agent;
    let last_hold = runtime().block_on(async {
        use knhk_agent::api::receipts::pb::{
            hold_service_client::HoldServiceClient, Hold, PlaceHoldRequest,
        };
        let channel = agent.channel().await;
        let mut placing = tokio::task::JoinSet::new();
        for k in 0..16 {
            let mut client = HoldServiceClient::new(channel.clone());
            placing.spawn(async move {
                client
                    .place_hold(PlaceHoldRequest {
                        hold: Some(Hold {
                            case_id: format!("FLOOD-killed-{k}"),
                            reason: "load".into(),
                            from_seq: Some(0),
                            to_seq: Some(1),
                            ..Default::default()
                        }),
                    })
                    .await
            });
        }
        let first = placing.join_next().await.expect("a hold placed");
        agent.child.kill().expect("SIGKILL");
        first
            .expect("the placing task")
            .expect("place a hold")
            .into_inner()
            .id
    });
    agent.kill9();
    // What was committed at the kill, read offline (as `receipts verify` does): the restarted
    // agent must keep all of it, acknowledged or not.
    let on_disk: Vec<[u8; 32]> = {
        let ledger = knhk_agent::receipts::Ledger::open(&db, "test", "local").expect("open");
        let size = ledger.size().expect("size");
        ledger
            .receipts(0, size as usize)
            .expect("receipts")
            .iter()
            .map(|(r, _)| knhk_agent::receipts::merkle::leaf(&r.encode()))
            .collect()
    };

    // Restart while the clients keep going; let the flood run on the new agent too.
    let agent = Agent::start(&config);
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked: Vec<u64> = holders
        .into_iter()
        .flat_map(|h| h.join().expect("client"))
        .chain([last_hold])
        .collect();
    let applies = applier.join().expect("applier");
    let (new_size, new_root, new_leaves) = acknowledged_tree(&agent);
    eprintln!(
        "kill -9 mid-flood: checkpoint {old_size} before, {new_size} after; {} holds and {applies} applies acknowledged",
        acked.len()
    );
    assert!(new_size > old_size, "the ledger grew after the restart");
    assert!(acked.len() >= 3 && applies >= 1, "the flood ran");
    // The new tree extends the acknowledged one: a consistency proof from its root verifies.
    let path = runtime().block_on(async {
        use knhk_agent::api::receipts::pb::{
            receipt_service_client::ReceiptServiceClient, GetConsistencyProofRequest,
        };
        ReceiptServiceClient::new(agent.channel().await)
            .get_consistency_proof(GetConsistencyProofRequest { old_size, new_size })
            .await
            .expect("consistency proof")
            .into_inner()
            .path
    });
    let hash = |b: &[u8]| -> [u8; 32] { b.try_into().expect("32-byte hash") };
    let path: Vec<[u8; 32]> = path.iter().map(|h| hash(h)).collect();
    assert!(
        knhk_agent::receipts::merkle::verify_consistency(
            &hash(&old_root),
            old_size,
            &hash(&new_root),
            new_size,
            &path
        ),
        "the ledger after the restart extends the checkpoint acknowledged before the kill"
    );
    assert_eq!(
        &new_leaves[..old_leaves.len()],
        &old_leaves[..],
        "every acknowledged receipt keeps its hash"
    );
    assert!(
        new_leaves.len() >= on_disk.len() && new_leaves[..on_disk.len()] == on_disk[..],
        "the restarted agent keeps the {} receipts committed before the kill",
        on_disk.len()
    );

    // Stop, then every acknowledged hold has its receipt and the ledger verifies offline.
    let (status, _) = agent.sigterm();
    assert!(status.success(), "{status}");
    let receipted = receipted_holds(&db);
    let lost: Vec<&u64> = acked.iter().filter(|id| !receipted.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged holds without a receipt: {lost:?}"
    );
    let out = Command::new(BIN)
        .args(["receipts", "verify", "--db"])
        .arg(&db)
        .output()
        .expect("verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("verified"),
        "{stdout}"
    );
}

/// SIGTERM under load (holds being placed, each acknowledged only once its receipt is durable):
/// the agent stops within Kubernetes' default grace period, every acknowledged hold has its
/// receipt in a ledger that verifies and ends in a signed checkpoint over all of it, and
/// enforcement stays pinned (`detach_on_exit = false`).
#[test]
fn kernel_sigterm_under_load_loses_no_acknowledged_receipt_and_keeps_enforcing() {
    if !kernel_available(
        "kernel_sigterm_under_load_loses_no_acknowledged_receipt_and_keeps_enforcing",
    ) {
        return;
    }
    let _serial = timing_shared();
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("sigterm");
    let pins = TestPins::new("sigterm");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("receipts.redb");
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            // No [slo]: without pulses a checkpoint comes once a second, so the receipts of the
            // last moments are covered only by the checkpoint the shutdown writes.
            "detach_on_exit = false\n[kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n[receipts]\npath = \"{}\"\n{}",
            dir.path().join("keys").display(),
            db.display(),
            deny_rule(target.port()),
        ),
    );
    let agent = Agent::start(&config);
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    let endpoint = agent.endpoint();

    // Four clients place holds until the agent stops answering; each records the ids it got.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = hold_clients(&endpoint, &stop, 4, "CASE");
    std::thread::sleep(Duration::from_millis(1500));
    let (status, took) = agent.sigterm();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked: Vec<u64> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client"))
        .collect();
    eprintln!(
        "SIGTERM: exit {status} after {} ms; {} holds acknowledged",
        took.as_millis(),
        acked.len()
    );
    assert!(status.success(), "clean exit: {status}");
    assert!(
        took < Duration::from_secs(25),
        "stopped within the grace period: {took:?}"
    );
    assert!(acked.len() >= 4, "the load ran: {} holds", acked.len());

    // Enforcement is still pinned with no agent running.
    assert_eq!(
        tcp_connect_from(&cg.path, target),
        Outcome::Denied,
        "enforcement continues after a SIGTERM"
    );

    // Every acknowledged hold's receipt is in the ledger, which verifies, and the last signed
    // checkpoint covers every receipt (the final checkpoint was written and signed).
    let database = redb::Database::open(&db).expect("the agent closed its ledger");
    let report = knhk_agent::receipts::verify(&database).expect("verify runs");
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.unsigned_checkpoints, 0, "{report:?}");
    drop(database);
    let ledger = knhk_agent::receipts::Ledger::open(&db, "test", "local").expect("open");
    let size = ledger.size().expect("size");
    let last = ledger
        .checkpoints()
        .expect("checkpoints")
        .pop()
        .expect("a checkpoint");
    let last = knhk_agent::receipts::CheckpointBody::decode(&last.1.body).expect("checkpoint");
    eprintln!(
        "ledger: {size} receipts, last checkpoint over {}",
        last.size
    );
    assert_eq!(last.size, size, "the final checkpoint covers every receipt");
    drop(ledger);
    let receipted = receipted_holds(&db);
    let lost: Vec<&u64> = acked.iter().filter(|id| !receipted.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged holds without a receipt: {lost:?}"
    );
}

/// Resident memory of `pid`, bytes.
fn rss_bytes(pid: u32) -> u64 {
    memory_of(pid).0
}

/// A small document that would expand to millions of rule entries (2,000 prefixes × 2,000
/// ports) is refused by DryRun and ApplyPolicy alike, by the same check, before anything is
/// built: INVALID_ARGUMENT, and the agent's memory does not grow.
#[test]
fn kernel_oversized_documents_are_refused_before_they_cost_memory() {
    if !kernel_available("kernel_oversized_documents_are_refused_before_they_cost_memory") {
        return;
    }
    let cg = TestCgroup::new("oversized");
    let pins = TestPins::new("oversized");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, "");
    let agent = Agent::start(&config);
    let pid = agent.child.id();
    let wide = pb::Rule {
        name: "wide".into(),
        action: pb::Action::Deny as i32,
        cidrs: (0..2000)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect(),
        ports: (1..=2000).map(|p| p.to_string()).collect(),
        ..Default::default()
    };
    // Many prefixes with 16 ports each: within every per-rule bound, over the policy's.
    let many = pb::Rule {
        name: "many".into(),
        action: pb::Action::Deny as i32,
        cidrs: (0..70_000u32)
            .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
            .collect(),
        ports: (1..=16).map(|p| p.to_string()).collect(),
        ..Default::default()
    };
    let mut growth = Vec::new();
    runtime().block_on(async {
        let mut c = policy_client(&agent).await;
        for (rule, needle) in [(wide, "2000 port ranges"), (many, "1120000 rule entries")] {
            let before = rss_bytes(pid);
            let d = c
                .dry_run(pb::DryRunRequest {
                    policy: Some(doc(vec![rule.clone()])),
                })
                .await
                .expect_err("dry run refused");
            assert_eq!(d.code(), tonic::Code::InvalidArgument, "{d:?}");
            assert!(d.message().contains(needle), "{d:?}");
            let a = c
                .apply_policy(pb::ApplyPolicyRequest {
                    policy: Some(doc(vec![rule])),
                    expected_generation: None,
                })
                .await
                .expect_err("apply refused");
            assert_eq!(
                (a.code(), a.message()),
                (d.code(), d.message()),
                "one validator for both"
            );
            growth.push(rss_bytes(pid).saturating_sub(before));
        }
    });
    eprintln!(
        "agent RSS growth: {} KiB for the 2,000 x 2,000 document (40 KB), {} KiB for the 70,000-prefix one (1 MB, decoded)",
        growth[0] / 1024,
        growth[1] / 1024
    );
    assert!(
        growth[0] < 8 << 20,
        "a 40 KB document grew RSS by {} KiB",
        growth[0] / 1024
    );
}

/// WatchEvents streams are capped per peer (stream N+1 gets RESOURCE_EXHAUSTED, a closed one
/// frees its place), and opening and closing streams does not grow the agent's memory.
#[test]
fn kernel_watch_streams_are_capped_and_cost_nothing_once_closed() {
    if !kernel_available("kernel_watch_streams_are_capped_and_cost_nothing_once_closed") {
        return;
    }
    use knhk_agent::api::watch::MAX_WATCHERS_PER_PEER;
    let cg = TestCgroup::new("watchers");
    let pins = TestPins::new("watchers");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, "");
    let agent = Agent::start(&config);
    let pid = agent.child.id();
    runtime().block_on(async {
        let mut c = AgentServiceClient::new(agent.channel().await);
        let mut open = Vec::new();
        for _ in 0..MAX_WATCHERS_PER_PEER {
            open.push(
                c.watch_events(pb::WatchEventsRequest::default())
                    .await
                    .expect("stream within the cap")
                    .into_inner(),
            );
        }
        let e = c
            .watch_events(pb::WatchEventsRequest::default())
            .await
            .expect_err("one stream too many");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        // Closing one frees its place (the server sees the reset stream).
        drop(open.pop());
        wait_until_async(|| {
            let mut c = c.clone();
            async move {
                c.watch_events(pb::WatchEventsRequest::default())
                    .await
                    .is_ok()
            }
        })
        .await;
        drop(open);

        // 1,000 open/close cycles: memory stays flat once warm.
        let cycle = |n: usize| {
            let mut c = c.clone();
            async move {
                for _ in 0..n {
                    // A stream's place is freed when the server sees its reset, which can lag
                    // the next open by a moment: wait for it rather than count it as a leak.
                    loop {
                        match c.watch_events(pb::WatchEventsRequest::default()).await {
                            Ok(s) => {
                                drop(s);
                                break;
                            }
                            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                            Err(e) => panic!("stream: {e:?}"),
                        }
                    }
                }
            }
        };
        cycle(200).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let warm = rss_bytes(pid);
        cycle(1000).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = rss_bytes(pid);
        eprintln!(
            "RSS after 200 cycles {} KiB, after 1,000 more {} KiB",
            warm / 1024,
            after / 1024
        );
        assert!(
            after < warm + (2 << 20),
            "1,000 open/close cycles grew RSS by {} KiB",
            after.saturating_sub(warm) / 1024
        );
    });
}

/// Polls `f` until it is true (5 s at most).
async fn wait_until_async<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < Duration::from_secs(5), "timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A start that fails after the programs are attached (here: a rule cgroup the kernel could not
/// probe, found when the policy is applied) exits 64 and, with `detach_on_exit`, leaves nothing
/// attached; a closed stdout does not stop a start that succeeds.
#[test]
fn kernel_a_failed_start_leaves_the_node_as_detach_on_exit_says() {
    if !kernel_available("kernel_a_failed_start_leaves_the_node_as_detach_on_exit_says") {
        return;
    }
    let cg = TestCgroup::new("failed-start");
    let pins = TestPins::new("failed-start");
    let dir = tempfile::tempdir().expect("tempdir");
    // 16 levels below agent.cgroup_root, which is itself a level below the hierarchy root.
    let deep: Vec<String> = (0..16).map(|i| format!("d{i}")).collect();
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "detach_on_exit = true\n[[policy.rules]]\nname = \"deep\"\naction = \"deny\"\ncgroup = \"{}\"\ncidrs = [\"10.0.0.0/8\"]\n",
            deep.join("/")
        ),
    );
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("would be at level 17"), "{stderr}");
    let links = pins.root.join(format!("v{ABI_VERSION}/links"));
    let left: Vec<_> = std::fs::read_dir(&links)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "programs left attached: {left:?}");

    // stdout closed before the agent writes its startup lines: it keeps running.
    let ok = write_config(dir.path(), &cg.path, &pins.root, "detach_on_exit = true\n");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&ok)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    // The event itself: the agent says it could not write its startup lines (it is past
    // them); then it must still be running. (stderr is drained to the end by a thread.)
    let stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(stderr).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let said = line.contains("cannot write the startup lines to stdout");
                seen.push(line);
                if said {
                    break;
                }
            }
            Err(e) => panic!("no word of the closed stdout ({e}): {seen:?}"),
        }
    }
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the agent died when its stdout was closed: {seen:?}"
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
}

/// The documented maximum policy (100,000 rules) applies over gRPC and reads back whole with
/// `policy get`, the CLI's client included.
#[test]
fn kernel_the_maximum_policy_applies_and_reads_back() {
    if !kernel_available("kernel_the_maximum_policy_applies_and_reads_back") {
        return;
    }
    let cg = TestCgroup::new("max-policy");
    let pins = TestPins::new("max-policy");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, "");
    let agent = Agent::start(&config);
    let rules: Vec<pb::Rule> = (0..100_000usize)
        .map(|i| {
            rule(
                // Long names: the document is over tonic's 4 MiB default message size.
                &format!("legacy-service-deny-rule-number-{i:06}"),
                pb::Action::Deny,
                &format!("10.{}.{}.{}/32", (i >> 16) & 255, (i >> 8) & 255, i & 255),
                &(1000 + i % 50_000).to_string(),
            )
        })
        .collect();
    runtime().block_on(async {
        let mut c = policy_client(&agent).await;
        let applied = c
            .apply_policy(pb::ApplyPolicyRequest {
                policy: Some(doc(rules)),
                expected_generation: None,
            })
            .await
            .expect("the maximum policy applies")
            .into_inner();
        assert_eq!(applied.trie_entries, 100_000);
    });
    let out = cli(&agent, &["policy", "get", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let count = v["policy"]["rules"]
        .as_array()
        .or_else(|| v["rules"].as_array())
        .map(Vec::len);
    assert_eq!(count, Some(100_000), "policy get reads back every rule");
}

/// A second agent started on the pin root of a running one is refused at once, with an error
/// that names the pin root and the running agent's pid, and changes nothing: the first keeps
/// enforcing its policy with its own links, the second writes no state. Once the first is gone
/// (even by SIGKILL), the pin root is free again.
#[test]
fn kernel_a_second_agent_on_the_same_pin_root_is_refused() {
    if !kernel_available("kernel_a_second_agent_on_the_same_pin_root_is_refused") {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("pin-lock");
    let pins = TestPins::new("pin-lock");
    let first_dir = tempfile::tempdir().expect("tempdir");
    let second_dir = tempfile::tempdir().expect("tempdir");
    let first_config = write_config(
        first_dir.path(),
        &cg.path,
        &pins.root,
        &deny_rule(target.port()),
    );
    // Its own socket, state and metrics port, the same pins, and a policy that would allow.
    let second_config = write_config(second_dir.path(), &cg.path, &pins.root, "");
    let first = Agent::start(&first_config);
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    let links = || -> Vec<_> {
        let mut names: Vec<_> = std::fs::read_dir(pins.root.join(format!("v{ABI_VERSION}/links")))
            .expect("links")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        names
    };
    let links_before = links();

    // Killed on drop: a second agent that was not refused must not outlive the test.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut second = KillOnDrop(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&second_config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the second agent"),
    );
    let mut status = None;
    wait_until("the second agent exits", Duration::from_secs(20), || {
        status = second.0.try_wait().expect("wait");
        status.is_some()
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(second.0.stderr.as_mut().expect("stderr"), &mut stderr)
        .expect("read stderr");
    drop(second);
    eprintln!("second agent: {status:?}: {stderr}");
    assert_eq!(status.and_then(|s| s.code()), Some(69), "{stderr}");
    let expected = format!(
        "agent.pin_root {} is in use by another knhk-agent (pid {})",
        pins.root.display(),
        first.child.id()
    );
    assert!(stderr.contains(&expected), "want {expected:?} in: {stderr}");
    // Nothing changed: the first agent's links, policy and enforcement; no state of the second.
    assert_eq!(links(), links_before);
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    assert!(
        first.get("/metrics").contains("knhk_policy_generation 1"),
        "the first agent's policy is untouched"
    );
    assert!(
        !second_dir.path().join("state").exists(),
        "the refused agent wrote state"
    );

    // The kernel drops the lock with its holder, however it ends.
    first.kill9();
    let second = Agent::start(&second_config);
    assert_eq!(
        tcp_connect_from(&cg.path, target),
        Outcome::Connected,
        "the pin root is free again: the second agent applied its policy"
    );
    second.kill9();
}

/// A tmpfs of `size`, mounted for the life of the value (lazily unmounted on drop).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_owned())
    }

    /// Fills it with `name` until the write fails with ENOSPC; returns the bytes written.
    fn fill(&self, name: &str) -> u64 {
        let mut f = std::fs::File::create(self.0.join(name)).expect("filler");
        let chunk = vec![0xa5u8; 4096];
        let mut written = 0;
        loop {
            match f.write(&chunk) {
                Ok(n) => written += n as u64,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling: {e}");
                    return written;
                }
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every receipt the running agent lists, by seq: its leaf hash (SHA-256(0x00 || encoding)).
async fn listed_hashes(agent: &Agent) -> std::collections::BTreeMap<u64, [u8; 32]> {
    use knhk_agent::api::receipts::pb;
    let mut client = pb::receipt_service_client::ReceiptServiceClient::new(agent.channel().await);
    let mut out = std::collections::BTreeMap::new();
    loop {
        let page = client
            .list_receipts(pb::ListReceiptsRequest {
                from_seq: out.len() as u64,
                limit: 1000,
            })
            .await
            .expect("list receipts")
            .into_inner();
        if page.receipts.is_empty() {
            return out;
        }
        for r in page.receipts {
            out.insert(r.seq, knhk_agent::receipts::merkle::leaf(&r.encoding));
        }
    }
}

/// The receipts ledger on a filesystem that fills up: writes fail cleanly, readiness names
/// ENOSPC, enforcement goes on, receipts that no one was told about are kept in memory; once
/// space returns the same process writes again (no restart), and every acknowledged receipt is
/// in the ledger hash for hash, with the kept ones after them.
#[test]
fn kernel_a_full_ledger_disk_fails_readiness_keeps_enforcing_and_resumes() {
    if !kernel_available("kernel_a_full_ledger_disk_fails_readiness_keeps_enforcing_and_resumes") {
        return;
    }
    let _serial = timing_shared();
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("ledger-full");
    let pins = TestPins::new("ledger-full");
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Tmpfs::mount(&dir.path().join("ledger-fs"), "2m");
    let db = fs.0.join("receipts.redb");
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "[kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n[receipts]\npath = \"{}\"\n{}",
            dir.path().join("keys").display(),
            db.display(),
            deny_rule(target.port()),
        ),
    );
    let agent = Agent::start(&config);
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    let rt = runtime();
    let hold = |n: u64| knhk_agent::api::receipts::pb::PlaceHoldRequest {
        hold: Some(knhk_agent::api::receipts::pb::Hold {
            case_id: format!("CASE-{n}"),
            reason: "disk full test".into(),
            from_seq: Some(0),
            to_seq: Some(1),
            ..Default::default()
        }),
    };
    let policy = |n: u64| {
        doc(vec![
            rule(
                "block",
                pb::Action::Deny,
                "127.0.0.1/32",
                &target.port().to_string(),
            ),
            rule(&format!("marker-{n}"), pb::Action::Allow, "10.9.0.0/16", ""),
        ])
    };
    let (before, after, acked_holds, during) = rt.block_on(async {
        let mut holds = knhk_agent::api::receipts::pb::hold_service_client::HoldServiceClient::new(
            agent.channel().await,
        );
        let mut policies = policy_client(&agent).await;
        let mut acked_holds = std::collections::BTreeSet::new();
        let mut n = 0;
        for _ in 0..20 {
            n += 1;
            let id = holds
                .place_hold(hold(n))
                .await
                .expect("a hold before the disk fills");
            acked_holds.insert(id.into_inner().id);
        }
        let before = listed_hashes(&agent).await;

        // The disk fills. Holds (acknowledged only once durable) are refused or, while redb
        // still has free pages, acknowledged; policy switches go on (their receipts are kept).
        let filler = fs.fill("filler");
        eprintln!("filled the ledger's tmpfs with {filler} bytes");
        let mut refused = 0;
        let mut during = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let readyz = loop {
            n += 1;
            match holds.place_hold(hold(n)).await {
                Ok(id) => {
                    acked_holds.insert(id.into_inner().id);
                }
                Err(e) => {
                    refused += 1;
                    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                }
            }
            let applied = policies
                .apply_policy(pb::ApplyPolicyRequest {
                    policy: Some(policy(n)),
                    expected_generation: None,
                })
                .await
                .expect("policy switches go on with the ledger full")
                .into_inner();
            during.push(applied.generation);
            let readyz = agent.get("/readyz");
            if readyz.contains("503") && readyz.to_lowercase().contains("no space left") {
                break readyz;
            }
            assert!(
                Instant::now() < deadline,
                "readiness never named ENOSPC: {readyz}"
            );
        };
        eprintln!("/readyz with the disk full ({refused} holds refused):\n{readyz}");
        assert!(readyz.contains("ENOSPC"), "{readyz}");
        // Still enforcing, still alive.
        assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
        assert!(agent.get("/healthz").contains("200"), "alive");
        // Refused now, precisely.
        n += 1;
        let e = holds
            .place_hold(hold(n))
            .await
            .expect_err("the ledger is full");
        assert!(
            e.message().to_lowercase().contains("no space left"),
            "the refusal says why: {e:?}"
        );
        for _ in 0..5 {
            n += 1;
            let applied = policies
                .apply_policy(pb::ApplyPolicyRequest {
                    policy: Some(policy(n)),
                    expected_generation: None,
                })
                .await
                .expect("a policy switch with the ledger full")
                .into_inner();
            during.push(applied.generation);
        }

        // Space returns: the same agent writes again.
        std::fs::remove_file(fs.0.join("filler")).expect("free the space");
        wait_until("the agent is ready again", Duration::from_secs(20), || {
            agent.get("/readyz").contains("200 OK")
        });
        for _ in 0..5 {
            n += 1;
            let id = holds
                .place_hold(hold(n))
                .await
                .expect("a hold once space returned");
            acked_holds.insert(id.into_inner().id);
        }
        let after = listed_hashes(&agent).await;
        (before, after, acked_holds, during)
    });
    {
        for (seq, hash) in &before {
            assert_eq!(
                after.get(seq),
                Some(hash),
                "receipt {seq} changed or vanished"
            );
        }
        eprintln!(
            "{} receipts listed before the disk filled, {} after it was freed; {} holds acknowledged; \
             policy generations switched with the disk full: {during:?}",
            before.len(),
            after.len(),
            acked_holds.len()
        );

        // Offline, after a clean stop: hash for hash, every acknowledged receipt; every
        // acknowledged hold and every policy switch made with the disk full has its receipt.
        let (status, _) = agent.sigterm();
        assert!(status.success(), "{status}");
        let ledger = knhk_agent::receipts::Ledger::open(&db, "test", "local").expect("open");
        let size = ledger.size().expect("size");
        let stored = ledger.receipts(0, size as usize).expect("receipts");
        let mut held = std::collections::BTreeSet::new();
        let mut switched = std::collections::BTreeSet::new();
        for (receipt, payload) in &stored {
            let hash = knhk_agent::receipts::merkle::leaf(&receipt.encode());
            if let Some(listed) = after.get(&receipt.seq) {
                assert_eq!(
                    &hash, listed,
                    "receipt {} differs from what was listed",
                    receipt.seq
                );
            }
            let json: serde_json::Value =
                serde_json::from_slice(payload.as_deref().unwrap_or_default()).expect("payload");
            match receipt.kind {
                knhk_agent::model::ReceiptKind::HoldPlaced => {
                    held.insert(json["id"].as_u64().expect("id"));
                }
                knhk_agent::model::ReceiptKind::PolicySwitch => {
                    switched.insert(json["generation"].as_u64().expect("generation"));
                }
                _ => {}
            }
        }
        assert!(size >= after.len() as u64, "{size} < {}", after.len());
        let lost: Vec<_> = acked_holds.difference(&held).collect();
        assert!(
            lost.is_empty(),
            "acknowledged holds without a receipt: {lost:?}"
        );
        let unrecorded: Vec<_> = during.iter().filter(|g| !switched.contains(g)).collect();
        assert!(
            unrecorded.is_empty(),
            "policy switches made with the disk full and never receipted: {unrecorded:?}"
        );
        let report =
            knhk_agent::receipts::verify(&*ledger.database().expect("open")).expect("verify");
        assert!(report.ok(), "{report:?}");
    }
}

/// Pins deleted under a running agent (on a private bpffs): enforcement never stops (the agent
/// holds every map and link), the pins come back within the second, and they keep enforcing
/// after the agent is gone; `detach` is refused while the agent runs.
#[test]
fn kernel_pins_deleted_under_a_running_agent_are_restored_without_a_gap() {
    if !kernel_available("kernel_pins_deleted_under_a_running_agent_are_restored_without_a_gap") {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("pins-deleted");
    let bpffs = tempfile::tempdir().expect("tempdir");
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(bpffs.path())
        .status()
        .expect("mount");
    assert!(status.success(), "mount a private bpffs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(bpffs.path().to_owned());
    let pin_root = bpffs.path().join("knhk");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pin_root, &deny_rule(target.port()));
    let agent = Agent::start(&config);
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    let version_dir = pin_root.join(format!("v{ABI_VERSION}"));
    let link = version_dir.join("links").join("knhk_connect4");
    assert!(link.exists());

    // `detach` while the agent runs is refused and removes nothing.
    let out = Command::new(BIN)
        .args(["detach", "--pin-root"])
        .arg(&pin_root)
        .output()
        .expect("detach");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is running on"), "{stderr}");
    assert!(link.exists(), "nothing was removed");

    // Every pin deleted: connects stay denied throughout.
    std::fs::remove_dir_all(&version_dir).expect("rm -rf the pins");
    let started = std::time::Instant::now();
    let mut checked = 0;
    while started.elapsed() < Duration::from_millis(300) {
        assert_eq!(
            tcp_connect_from(&cg.path, target),
            Outcome::Denied,
            "enforcement with the pins gone"
        );
        checked += 1;
    }
    wait_until("the pins are back", Duration::from_secs(5), || {
        link.exists()
    });
    assert!(
        version_dir.join("maps").join(map_names::CONFIG).exists(),
        "maps pinned again"
    );
    assert!(checked > 0);
    // Without the agent, the restored pins keep enforcing.
    agent.kill9();
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    knhk_agent::datapath::remove_pins(&pin_root).expect("clean up the pins");
    // The killed agent's descriptors are released by the kernel shortly after it exits.
    wait_until(
        "detached once pins and agent are gone",
        Duration::from_secs(5),
        || tcp_connect_from(&cg.path, target) == Outcome::Connected,
    );
}

/// The cgroup root removed under a running agent: the kernel detaches the programs with it, and
/// readiness says so (removed; removed and created again) instead of reporting ready.
#[test]
fn kernel_a_removed_cgroup_root_is_named_by_readiness() {
    if !kernel_available("kernel_a_removed_cgroup_root_is_named_by_readiness") {
        return;
    }
    let cg = TestCgroup::new("root-removed");
    let pins = TestPins::new("root-removed");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, &deny_rule(9));
    let agent = Agent::start(&config);
    wait_until("ready", Duration::from_secs(10), || {
        agent.get("/readyz").contains("200")
    });
    std::fs::remove_dir(&cg.path).expect("rmdir the cgroup root");
    wait_until(
        "readiness names the removed root",
        Duration::from_secs(10),
        || {
            let r = agent.get("/readyz");
            r.contains("503") && r.contains("was removed:")
        },
    );
    std::fs::create_dir(&cg.path).expect("mkdir the cgroup root again");
    wait_until(
        "readiness names the new cgroup",
        Duration::from_secs(10),
        || {
            agent
                .get("/readyz")
                .contains("was removed and created again")
        },
    );
    agent.kill9();
}
