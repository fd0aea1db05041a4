//! Kernel tests of rollouts (need root, cgroup v2 and BPF): a real agent, a candidate policy
//! split per workload in the kernel across throwaway cgroups, judged by real `connect()` calls;
//! gates on real handshake latency behind a shaped link; promotion, rollback and SIGKILL.

mod support;

use knhk_agent::api::pb::{
    self, policy_service_client::PolicyServiceClient, rollout_service_client::RolloutServiceClient,
};
use sha2::{Digest, Sha256};
use std::{collections::BTreeSet, path::PathBuf, time::Duration};
use support::*;

/// The documented split function, written again from docs/promotion.md (not the agent's code):
/// SHA-256(seed, 0x00, key); first 8 bytes big-endian, modulo 10,000; candidate below the share
/// in basis points.
fn on_candidate(seed: &str, key: &str, percent: f64) -> bool {
    let mut h = Sha256::new();
    h.update(seed.as_bytes());
    h.update([0u8]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let bucket = u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) % 10_000;
    bucket < (percent * 100.0).round() as u64
}

fn rollout(agent: &Agent) -> pb::RolloutStatus {
    runtime().block_on(async {
        RolloutServiceClient::new(agent.channel().await)
            .get_rollout(pb::GetRolloutRequest {})
            .await
            .expect("get rollout")
            .into_inner()
    })
}

fn live_policy(agent: &Agent) -> pb::GetPolicyResponse {
    runtime().block_on(async {
        PolicyServiceClient::new(agent.channel().await)
            .get_policy(pb::GetPolicyRequest {})
            .await
            .expect("get policy")
            .into_inner()
    })
}

fn start(agent: &Agent, req: pb::StartRolloutRequest) -> Result<pb::RolloutStatus, tonic::Status> {
    runtime().block_on(async {
        RolloutServiceClient::new(agent.channel().await)
            .start_rollout(req)
            .await
            .map(|r| r.into_inner())
    })
}

fn deny_port(name: &str, port: u16) -> pb::Rule {
    pb::Rule {
        name: name.into(),
        action: pb::Action::Deny as i32,
        cidrs: vec!["127.0.0.1/32".into()],
        ports: vec![port.to_string()],
        ..Default::default()
    }
}

fn allow_all() -> pb::Rule {
    pb::Rule {
        name: "everything".into(),
        action: pb::Action::Allow as i32,
        cidrs: vec!["0.0.0.0/0".into()],
        ..Default::default()
    }
}

const FILE_POLICY: &str =
    "[[policy.rules]]\nname = \"everything\"\naction = \"allow\"\ncidrs = [\"0.0.0.0/0\"]\n";

/// The workloads `cg/w000` … that a test connects from.
fn workloads(cg: &TestCgroup, n: usize) -> Vec<(String, PathBuf)> {
    (0..n)
        .map(|i| {
            let key = format!("w{i:03}");
            let dir = cg.child(&key);
            (key, dir)
        })
        .collect()
}

fn denied_from(ws: &[(String, PathBuf)], target: std::net::SocketAddr) -> BTreeSet<String> {
    ws.iter()
        .filter(|(_, dir)| tcp_connect_from(dir, target) == Outcome::Denied)
        .map(|(k, _)| k.clone())
        .collect()
}

#[test]
fn kernel_rollout_splits_200_workloads_by_the_documented_hash_and_promotes_on_its_own() {
    if !kernel_available(
        "kernel_rollout_splits_200_workloads_by_the_documented_hash_and_promotes_on_its_own",
    ) {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("rollout-split");
    let ws = workloads(&cg, 200);
    let pins = TestPins::new("rollout-split");
    let dir = tempfile::tempdir().expect("tempdir");
    // The deny-rate gate would (rightly) stop a candidate that denies everything it sees.
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "{FILE_POLICY}[promotion]\nenvironment = \"production\"\ndeny_rate_factor = 1e12\n"
        ),
    );
    let agent = Agent::start(&config);
    assert!(
        denied_from(&ws, target).is_empty(),
        "stable admits everything"
    );

    let started = start(
        &agent,
        pb::StartRolloutRequest {
            policy: Some(pb::PolicyDocument {
                rules: vec![deny_port("candidate-deny", target.port()), allow_all()],
                ..Default::default()
            }),
            steps: vec![25.0, 100.0],
            beats_per_step: 40,
            ..Default::default()
        },
    )
    .expect("start rollout");
    assert_eq!(started.state, "progressing");
    let seed = started.seed.clone();
    assert!(!seed.is_empty());

    // While a rollout runs, direct applies are refused, naming it.
    let refused = runtime().block_on(async {
        PolicyServiceClient::new(agent.channel().await)
            .apply_policy(pb::ApplyPolicyRequest {
                policy: Some(pb::PolicyDocument {
                    rules: vec![allow_all()],
                    ..Default::default()
                }),
                expected_generation: None,
            })
            .await
            .expect_err("an apply during a rollout is refused")
    });
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains(&format!(
            "rollout of candidate generation {}",
            started.candidate_generation
        )),
        "{}",
        refused.message()
    );

    wait_until("the first step's split", Duration::from_secs(10), || {
        rollout(&agent).workloads >= 200
    });
    let expected: BTreeSet<String> = ws
        .iter()
        .filter(|(k, _)| on_candidate(&seed, k, 25.0))
        .map(|(k, _)| k.clone())
        .collect();
    let first = denied_from(&ws, target);
    let mid = rollout(&agent);
    assert_eq!(mid.state, "progressing", "{mid:?}");
    assert_eq!(mid.step, 0, "still the first step: {mid:?}");
    assert_eq!(
        first, expected,
        "the kernel split is the documented function"
    );
    // Binomial(200, 0.25): mean 50, sd 6.1; within 4 sd.
    assert!(
        (26..=74).contains(&first.len()),
        "{} of 200 on the candidate at 25 %",
        first.len()
    );
    // Each workload stays on its side for the whole step.
    let again = denied_from(&ws, target);
    assert_eq!(again, first, "sides do not change within a step");
    assert_eq!(rollout(&agent).step, 0);

    // Every gate passes: 100 %, then promotion on its own.
    wait_until("promotion", Duration::from_secs(30), || {
        rollout(&agent).state == "promoted"
    });
    let all: BTreeSet<String> = ws.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(denied_from(&ws, target), all, "promoted: every workload");
    let live = live_policy(&agent);
    assert_eq!(live.generation, started.candidate_generation);
    let metrics = agent.get("/metrics");
    assert!(
        metrics.contains("knhk_rollout_state{state=\"promoted\"} 1"),
        "{metrics}"
    );
    agent.kill9();
}

#[test]
fn kernel_rollout_rolls_back_within_the_beat_when_the_candidate_breaches_its_slo() {
    if !kernel_available(
        "kernel_rollout_rolls_back_within_the_beat_when_the_candidate_breaches_its_slo",
    ) {
        return;
    }
    let _serial = timing_shared();
    let slow = DelayedServer::new(40);
    let marker = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("rollout-breach");
    let ws = workloads(&cg, 24);
    let pins = TestPins::new("rollout-breach");
    let dir = tempfile::tempdir().expect("tempdir");
    // Stable classes the slow path C1 (its ceiling is far above 40 ms); the candidate classes
    // it R1, whose ceiling (5 ms) a 40 ms handshake breaches. "degrade" keeps the beat engine
    // from refusing connects while R1 breaches.
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        "[[policy.rules]]\nname = \"slow\"\naction = \"allow\"\nclass = \"C1\"\ncidrs = [\"10.213.0.0/16\"]\n\
         [[policy.rules]]\nname = \"everything\"\naction = \"allow\"\ncidrs = [\"0.0.0.0/0\"]\n\
         [slo]\nr1_p99_max_ns = 5000000\nw1_p99_max_ms = 10000\nc1_p99_max_ms = 10000\nadmission_strategy = \"degrade\"\n\
         [promotion]\nslo_threshold = 0.9\nbeats_per_step = 50\n",
    );
    let agent = Agent::start(&config);
    let started = start(
        &agent,
        pb::StartRolloutRequest {
            policy: Some(pb::PolicyDocument {
                rules: vec![
                    pb::Rule {
                        name: "slow".into(),
                        action: pb::Action::Allow as i32,
                        runtime_class: pb::RuntimeClass::R1 as i32,
                        cidrs: vec!["10.213.0.0/16".into()],
                        ..Default::default()
                    },
                    deny_port("candidate-marker", marker.port()),
                    allow_all(),
                ],
                ..Default::default()
            }),
            steps: vec![50.0, 100.0],
            ..Default::default()
        },
    )
    .expect("start rollout");
    wait_until("the first step's split", Duration::from_secs(10), || {
        rollout(&agent).workloads >= 24
    });
    let candidate: BTreeSet<String> = ws
        .iter()
        .filter(|(k, _)| on_candidate(&started.seed, k, 50.0))
        .map(|(k, _)| k.clone())
        .collect();
    assert!(!candidate.is_empty() && candidate.len() < ws.len());
    // Load on the slow path from every workload until the rollout ends.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = ws
        .iter()
        .map(|(_, dir)| {
            let (dir, stop, addr) = (dir.clone(), stop.clone(), slow.addr);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tcp_connect_loop_from(&dir, addr, 3);
                }
            })
        })
        .collect();
    // Stable workloads never see the candidate while it runs.
    let mut stable_checked = 0;
    while rollout(&agent).state == "progressing" && stable_checked < 200 {
        for (k, dir) in ws.iter().filter(|(k, _)| !candidate.contains(k)) {
            assert_eq!(
                tcp_connect_from(dir, marker),
                Outcome::Connected,
                "{k} is on the stable side"
            );
            stable_checked += 1;
        }
    }
    wait_until("the rollback", Duration::from_secs(30), || {
        rollout(&agent).state == "rolled_back"
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in load {
        let _ = t.join();
    }
    let r = rollout(&agent);
    assert!(r.reason.contains("SLO gate failed"), "{r:?}");
    let (failed, zeroed) = (
        r.gate_failed_at_beat.expect("failed at"),
        r.zeroed_at_beat.expect("zeroed at"),
    );
    assert!(
        zeroed - failed <= 1,
        "0 % within one beat: {failed} → {zeroed}"
    );
    assert_eq!(r.percent, 0.0);
    // The candidate is gone from the kernel: its marker deny applies to no one.
    assert!(denied_from(&ws, marker).is_empty());
    let metrics = agent.get("/metrics");
    assert!(
        metrics.contains("knhk_rollout_rollbacks_total{reason=\"slo\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("knhk_rollout_candidate_percent 0"),
        "{metrics}"
    );
    // The live policy is still the stable one.
    let live = live_policy(&agent);
    assert_eq!(live.generation, started.stable_generation);
    agent.kill9();
}

#[test]
fn kernel_sigkill_mid_rollout_falls_back_to_stable_and_says_so() {
    if !kernel_available("kernel_sigkill_mid_rollout_falls_back_to_stable_and_says_so") {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("rollout-kill");
    let ws = workloads(&cg, 40);
    let pins = TestPins::new("rollout-kill");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!("{FILE_POLICY}[promotion]\ndeny_rate_factor = 1e12\n"),
    );
    let agent = Agent::start(&config);
    let started = start(
        &agent,
        pb::StartRolloutRequest {
            policy: Some(pb::PolicyDocument {
                rules: vec![deny_port("candidate-deny", target.port()), allow_all()],
                ..Default::default()
            }),
            steps: vec![50.0, 100.0],
            beats_per_step: 100_000,
            ..Default::default()
        },
    )
    .expect("start rollout");
    wait_until("the first step's split", Duration::from_secs(10), || {
        rollout(&agent).workloads >= 40
    });
    let on = denied_from(&ws, target);
    assert!(!on.is_empty(), "some workloads are on the candidate");
    agent.kill9();
    // Without an agent the kernel keeps the split (pins outlive the process).
    assert_eq!(denied_from(&ws, target), on);

    let agent = Agent::start(&config);
    assert!(
        denied_from(&ws, target).is_empty(),
        "after the restart every workload is on the stable generation"
    );
    assert!(
        agent.logs().contains("agent restarted during the rollout"),
        "the log says why"
    );
    let record = std::fs::read_to_string(dir.path().join("state/rollout.json")).expect("record");
    assert!(record.contains("\"aborted\""), "{record}");
    assert!(agent
        .get("/metrics")
        .contains("knhk_rollout_rollbacks_total{reason=\"restart\"} 1"));
    // A new rollout can start; the generation numbers do not go back.
    let again = start(
        &agent,
        pb::StartRolloutRequest {
            policy: Some(pb::PolicyDocument {
                rules: vec![deny_port("candidate-deny", target.port()), allow_all()],
                ..Default::default()
            }),
            steps: vec![50.0],
            beats_per_step: 100_000,
            ..Default::default()
        },
    )
    .expect("a new rollout");
    assert!(again.candidate_generation > started.stable_generation);
    agent.kill9();
}

#[test]
fn kernel_bad_rollout_requests_are_refused_with_their_field_and_change_nothing() {
    if !kernel_available(
        "kernel_bad_rollout_requests_are_refused_with_their_field_and_change_nothing",
    ) {
        return;
    }
    let cg = TestCgroup::new("rollout-bad");
    let pins = TestPins::new("rollout-bad");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, FILE_POLICY);
    let agent = Agent::start(&config);
    let doc = || {
        Some(pb::PolicyDocument {
            rules: vec![deny_port("x", 1), allow_all()],
            ..Default::default()
        })
    };
    for (req, code, says) in [
        (
            pb::StartRolloutRequest {
                policy: doc(),
                steps: vec![25.0, 5.0],
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "steps: step 2 (5%) does not increase on step 1 (25%)",
        ),
        (
            pb::StartRolloutRequest {
                policy: doc(),
                steps: vec![0.0],
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "steps: step 1 (0): 0 is not a share of workloads",
        ),
        (
            pb::StartRolloutRequest {
                policy: doc(),
                set_feature_flags: true,
                feature_flags: vec!["warp_drive".into()],
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "feature_flags[0]: unknown feature flag \"warp_drive\"",
        ),
        (
            pb::StartRolloutRequest {
                policy: Some(pb::PolicyDocument {
                    rules: vec![pb::Rule {
                        name: "bad".into(),
                        action: pb::Action::Deny as i32,
                        cidrs: vec!["10.0.0.0/33".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "policy.rules[0].cidrs[0]",
        ),
        (
            pb::StartRolloutRequest::default(),
            tonic::Code::FailedPrecondition,
            "the candidate is the live generation",
        ),
    ] {
        let e = start(&agent, req).expect_err("refused");
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(says), "{}", e.message());
    }
    let none = runtime().block_on(async {
        RolloutServiceClient::new(agent.channel().await)
            .promote_rollout(pb::RolloutControlRequest::default())
            .await
            .expect_err("nothing to promote")
    });
    assert_eq!(none.code(), tonic::Code::FailedPrecondition);
    assert!(none.message().contains("no rollout is running"));
    assert!(!rollout(&agent).present, "nothing started");
    // One running: a second start is refused, naming it.
    start(
        &agent,
        pb::StartRolloutRequest {
            policy: doc(),
            beats_per_step: 100_000,
            ..Default::default()
        },
    )
    .expect("start");
    let twice = start(
        &agent,
        pb::StartRolloutRequest {
            policy: doc(),
            ..Default::default()
        },
    )
    .expect_err("a second rollout");
    assert_eq!(twice.code(), tonic::Code::FailedPrecondition);
    assert!(
        twice
            .message()
            .contains("a rollout of candidate generation 2 is progressing"),
        "{}",
        twice.message()
    );
    // Abort: back to 0 %, recorded.
    let aborted = runtime().block_on(async {
        RolloutServiceClient::new(agent.channel().await)
            .abort_rollout(pb::RolloutControlRequest {
                reason: "testing abort".into(),
            })
            .await
            .expect("abort")
            .into_inner()
    });
    assert_eq!(aborted.state, "aborted");
    assert_eq!(aborted.reason, "testing abort");
    agent.kill9();
}

/// `knhk_verdict_events_total{outcome="sent"}` from the agent's metrics.
fn events_sent(agent: &Agent) -> u64 {
    agent
        .get("/metrics")
        .lines()
        .find(|l| l.starts_with("knhk_verdict_events_total{outcome=\"sent\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn kernel_a_feature_flag_is_canaried_per_workload_with_the_same_split() {
    if !kernel_available("kernel_a_feature_flag_is_canaried_per_workload_with_the_same_split") {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("rollout-flags");
    let ws = workloads(&cg, 16);
    let pins = TestPins::new("rollout-flags");
    let dir = tempfile::tempdir().expect("tempdir");
    // Both sides deny the target; only the flags differ: the candidate sends no verdict events.
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "[[policy.rules]]\nname = \"blocked\"\naction = \"deny\"\ncidrs = [\"127.0.0.1/32\"]\nports = [\"{}\"]\n\
             [promotion]\nfeature_flags = [\"heat_tracking\", \"latency_histograms\", \"verdict_events\"]\n",
            target.port()
        ),
    );
    let agent = Agent::start(&config);
    let started = start(
        &agent,
        pb::StartRolloutRequest {
            set_feature_flags: true,
            feature_flags: vec!["heat_tracking".into(), "latency_histograms".into()],
            steps: vec![50.0],
            beats_per_step: 100_000,
            ..Default::default()
        },
    )
    .expect("a flags-only rollout");
    assert_eq!(
        started.feature_flags,
        ["heat_tracking", "latency_histograms"]
    );
    assert_eq!(
        started.candidate_digest,
        live_policy(&agent).digest,
        "the same policy: only the flags change"
    );
    wait_until("the split", Duration::from_secs(10), || {
        rollout(&agent).workloads >= 16
    });
    let (candidate, stable): (Vec<_>, Vec<_>) = ws
        .iter()
        .partition(|(k, _)| on_candidate(&started.seed, k, 50.0));
    assert!(!candidate.is_empty() && !stable.is_empty());
    // Denied on both sides; events only from the stable side (at most one per rule per 10 ms).
    let before = events_sent(&agent);
    for (_, dir) in &candidate {
        for _ in 0..3 {
            assert_eq!(tcp_connect_from(dir, target), Outcome::Denied);
            std::thread::sleep(Duration::from_millis(12));
        }
    }
    assert_eq!(
        events_sent(&agent),
        before,
        "the candidate's workloads run with verdict_events off"
    );
    for (_, dir) in &stable {
        assert_eq!(tcp_connect_from(dir, target), Outcome::Denied);
        std::thread::sleep(Duration::from_millis(12));
    }
    assert!(
        events_sent(&agent) >= before + stable.len() as u64,
        "the stable side's workloads still send events"
    );
    agent.kill9();
}
