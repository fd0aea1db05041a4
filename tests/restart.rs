//! Kernel tests of the restart rule (need root, cgroup v2 and BPF): the live policy, whatever
//! set it, is kept under `agent.state_dir` and re-adopted with its generation after SIGKILL or
//! SIGTERM; the configuration file's policy is applied at start only when the operator changed
//! it; a damaged record stops the start before anything touches the kernel.

mod support;

use knhk_agent::api::pb::{self, policy_service_client::PolicyServiceClient};
use std::process::Command;
use support::*;

const FILE_RULE: &str =
    "[[policy.rules]]\nname = \"from-file\"\naction = \"allow\"\ncidrs = [\"10.9.9.9/32\"]\n";

fn live(agent: &Agent) -> (u64, Vec<String>) {
    runtime().block_on(async {
        let p = PolicyServiceClient::new(agent.channel().await)
            .get_policy(pb::GetPolicyRequest {})
            .await
            .expect("get policy")
            .into_inner();
        (
            p.generation,
            p.policy
                .map(|d| d.rules.into_iter().map(|r| r.name).collect())
                .unwrap_or_default(),
        )
    })
}

#[test]
fn kernel_a_policy_applied_over_grpc_survives_restarts() {
    if !kernel_available("kernel_a_policy_applied_over_grpc_survives_restarts") {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("restart");
    let pins = TestPins::new("restart");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, FILE_RULE);

    let agent = Agent::start(&config);
    assert_eq!(live(&agent), (1, vec!["from-file".to_string()]));
    runtime().block_on(async {
        PolicyServiceClient::new(agent.channel().await)
            .apply_policy(pb::ApplyPolicyRequest {
                policy: Some(pb::PolicyDocument {
                    rules: vec![pb::Rule {
                        name: "no-target".into(),
                        action: pb::Action::Deny as i32,
                        cidrs: vec!["127.0.0.1/32".into()],
                        ports: vec![target.port().to_string()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                expected_generation: Some(1),
            })
            .await
            .expect("apply");
    });
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);

    // SIGKILL, restart: the applied deny is still live, as generation 2.
    agent.kill9();
    let agent = Agent::start(&config);
    assert_eq!(live(&agent), (2, vec!["no-target".to_string()]));
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    assert!(
        agent.logs().contains("re-adopting the live policy"),
        "the log says which source is live"
    );

    // A clean stop and start: the same.
    let (status, _) = agent.sigterm();
    assert!(status.success(), "{status}");
    let agent = Agent::start(&config);
    assert_eq!(live(&agent), (2, vec!["no-target".to_string()]));
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    agent.kill9();

    // The operator changes the file: its policy is applied, as the next generation.
    let changed = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!("{FILE_RULE}[[policy.rules]]\nname = \"also-from-file\"\naction = \"allow\"\ncidrs = [\"10.9.9.10/32\"]\n"),
    );
    let agent = Agent::start(&changed);
    assert_eq!(
        live(&agent),
        (
            3,
            vec!["from-file".to_string(), "also-from-file".to_string()]
        )
    );
    assert!(tcp_connect_from(&cg.path, target).admitted());
    assert!(agent.logs().contains("changed since it was last applied"));
    agent.kill9();

    // A damaged record: refused with its path before anything is attached or changed.
    let record = dir.path().join("state/live-policy.json");
    std::fs::write(&record, "{ damaged").expect("damage the record");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&changed)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("live-policy.json is not a live-policy record")
            && stderr.contains("Fix or remove it"),
        "{stderr}"
    );
    // The kernel still enforces generation 3 (the file's policy), untouched.
    assert!(tcp_connect_from(&cg.path, target).admitted());
}
