//! Kernel tests of verdict events and `explain` (need root, cgroup v2 and BPF): the real agent
//! process, its kernel programs judging real connects from a throwaway cgroup, its gRPC API
//! and CLI.

mod support;

use knhk_agent::api::pb::{self, agent_service_client::AgentServiceClient};
use std::{process::Command, time::Duration};
use support::*;

const RULES: &str = r#"
[[policy.rules]]
name = "no-db"
action = "deny"
cidrs = ["127.0.0.3/32"]
ports = ["5432"]
protocol = "tcp"
[[policy.rules]]
name = "no-statsd"
action = "deny"
cgroup = "app"
cidrs = ["127.0.0.0/8"]
ports = ["8125"]
protocol = "udp"
"#;

fn cli(agent: &Agent, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .args(["--endpoint", &agent.endpoint()])
        .output()
        .expect("run the CLI")
}

/// The next event of `s`, which must be a verdict, within 5 s.
async fn next_verdict(s: &mut tonic::Streaming<pb::WatchEventsResponse>) -> pb::Verdict {
    let m = tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("a verdict within 5 s")
        .expect("stream")
        .expect("not ended");
    match m.event {
        Some(pb::watch_events_response::Event::Verdict(v)) => v,
        other => panic!("not a verdict: {other:?}"),
    }
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn kernel_denied_connects_and_datagrams_stream_as_verdicts() {
    if !kernel_available("kernel_denied_connects_and_datagrams_stream_as_verdicts") {
        return;
    }
    let _serial = timing_shared();
    let cg = TestCgroup::new("verdicts");
    let app = cg.child("app");
    let pins = TestPins::new("verdicts");
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&write_config(dir.path(), &cg.path, &pins.root, RULES));
    runtime().block_on(async {
        let mut c = AgentServiceClient::new(agent.channel().await);
        let mut all = c
            .watch_events(pb::WatchEventsRequest {
                verdicts: true,
                only_verdicts: true,
                ..Default::default()
            })
            .await
            .expect("watch")
            .into_inner();
        let mut only_udp_rule = c
            .watch_events(pb::WatchEventsRequest {
                verdicts: true,
                only_verdicts: true,
                rule: "no-statsd".into(),
                ..Default::default()
            })
            .await
            .expect("watch")
            .into_inner();
        let cg_path = cg.path.clone();
        let app_path = app.clone();
        tokio::task::spawn_blocking(move || {
            assert_eq!(
                tcp_connect_from(&cg_path, "127.0.0.3:5432".parse().expect("addr")),
                Outcome::Denied
            );
            assert_eq!(
                udp_sendto_from(&app_path, "127.0.0.1:8125".parse().expect("addr")),
                Outcome::Denied
            );
        })
        .await
        .expect("connects");
        let tcp = next_verdict(&mut all).await;
        assert_eq!(
            (
                tcp.cgroup.as_str(),
                tcp.destination.as_str(),
                tcp.port,
                tcp.protocol.as_str(),
                tcp.action.as_str(),
                tcp.rule.as_str(),
                tcp.hook.as_str()
            ),
            (".", "127.0.0.3", 5432, "tcp", "deny", "no-db", "connect4")
        );
        assert!(tcp.generation >= 1);
        let udp = next_verdict(&mut all).await;
        assert_eq!(
            (
                udp.cgroup.as_str(),
                udp.port,
                udp.protocol.as_str(),
                udp.rule.as_str(),
                udp.hook.as_str()
            ),
            ("app", 8125, "udp", "no-statsd", "sendmsg4")
        );
        let filtered = next_verdict(&mut only_udp_rule).await;
        assert_eq!(
            filtered.rule, "no-statsd",
            "the filter drops the other rule's verdicts"
        );

        // Bad filters are refused with the field named.
        let e = c
            .watch_events(pb::WatchEventsRequest {
                verdicts: true,
                actions: vec!["yolo".into()],
                ..Default::default()
            })
            .await
            .expect_err("unknown action");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("actions[0]"), "{e:?}");
        let e = c
            .watch_events(pb::WatchEventsRequest {
                rule: "no-db".into(),
                ..Default::default()
            })
            .await
            .expect_err("a filter without verdicts");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    });

    // A flood is rate-limited per rule in the kernel: 2,000 denied connects in well under a
    // second give at most a few hundred events; the rest are counted as suppressed.
    let flood = tcp_connect_loop_from(&cg.path, "127.0.0.3:5432".parse().expect("addr"), 2000);
    assert_eq!(flood.denied, 2000);
    // The CLI streams them too: one JSON object per line. Denied connects are repeated until
    // the stream (started concurrently) has printed one.
    let mut follower = Command::new(BIN)
        .args([
            "events",
            "--follow",
            "--only-verdicts",
            "--rule",
            "no-db",
            "--count",
            "1",
            "--output",
            "json",
            "--endpoint",
        ])
        .arg(agent.endpoint())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("events --follow");
    let mut attempts = 0;
    while follower.try_wait().expect("wait").is_none() {
        assert!(attempts < 100, "events --follow printed nothing in 10 s");
        tcp_connect_from(&cg.path, "127.0.0.3:5432".parse().expect("addr"));
        attempts += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = follower.wait_with_output().expect("output");
    assert!(out.status.success());
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(
        (
            line["type"].as_str(),
            line["action"].as_str(),
            line["rule"].as_str(),
            line["port"].as_u64()
        ),
        (Some("verdict"), Some("deny"), Some("no-db"), Some(5432)),
        "{line}"
    );
    let metrics = agent.get("/metrics");
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}"))
    };
    let sent = metric("knhk_verdict_events_total{outcome=\"sent\"}");
    let suppressed = metric("knhk_verdict_events_total{outcome=\"suppressed\"}");
    let dropped = metric("knhk_verdict_events_total{outcome=\"dropped\"}");
    assert_eq!(
        sent + suppressed + dropped,
        2002.0 + attempts as f64,
        "every decision other than allow is sent, suppressed or dropped:\n{metrics}"
    );
    assert!(
        suppressed >= 1000.0,
        "the rate limit holds: {sent} sent, {suppressed} suppressed"
    );
}

#[test]
fn kernel_explain_answers_from_the_live_tables() {
    if !kernel_available("kernel_explain_answers_from_the_live_tables") {
        return;
    }
    let _serial = timing_shared();
    let cg = TestCgroup::new("explain");
    cg.child("app/worker");
    let pins = TestPins::new("explain");
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&write_config(dir.path(), &cg.path, &pins.root, RULES));
    wait_until("the app scope is followed", Duration::from_secs(5), || {
        let v = json_of(&cli(&agent, &["status", "--output", "json"]));
        v["active_cgroups"]
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c == "app"))
    });

    let v = json_of(&cli(
        &agent,
        &[
            "explain",
            "--cgroup",
            "app/worker",
            "127.0.0.9:8125/udp",
            "--output",
            "json",
        ],
    ));
    assert_eq!(v["scope"], "app", "{v}");
    assert_eq!(v["rule"], "no-statsd", "{v}");
    assert_eq!(v["action"], "deny", "{v}");
    assert_eq!(v["prefix"], "127.0.0.0/8", "{v}");
    // The same destination over TCP matches no entry: the default.
    let v = json_of(&cli(
        &agent,
        &[
            "explain",
            "--cgroup",
            "app/worker",
            "127.0.0.9:8125/tcp",
            "--output",
            "json",
        ],
    ));
    assert_eq!(
        (v["rule"].as_str(), v["action"].as_str()),
        (Some(""), Some("allow")),
        "{v}"
    );
    // The root cgroup is judged by the global rules.
    let v = json_of(&cli(
        &agent,
        &["explain", "127.0.0.3:5432", "--output", "json"],
    ));
    assert_eq!(
        (v["scope"].as_str(), v["rule"].as_str()),
        (Some(""), Some("no-db")),
        "{v}"
    );
    let human = cli(&agent, &["explain", "127.0.0.3:5432/tcp"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("deny") && text.contains("no-db") && text.contains("global rules"),
        "{text}"
    );
    // The kernel agrees with explain.
    assert_eq!(
        tcp_connect_from(&cg.path, "127.0.0.3:5432".parse().expect("addr")),
        Outcome::Denied
    );

    // Bad input: a precise message, nothing else.
    for (args, want) in [
        (vec!["explain", "127.0.0.1"], "not DEST:PORT/PROTO"),
        (vec!["explain", "127.0.0.1:80/sctp"], "not tcp or udp"),
        (
            vec!["explain", "--cgroup", "nope", "127.0.0.1:80"],
            "does not exist",
        ),
        (
            vec!["explain", "--cgroup", "../..", "127.0.0.1:80"],
            "may not contain '..'",
        ),
    ] {
        let out = cli(&agent, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
