//! Kernel tests of Kubernetes workloads as rule subjects (need root, cgroup v2, BPF, and
//! containerd + runc from `cargo xtask setup`): real pods run by a private containerd through
//! CRI, their cgroups under a throwaway `kubepods` root; rules select them by namespace, labels
//! and container; connects are made from inside the pods (ExecSync) or from processes placed
//! in their cgroups.

mod support;

use knhk_agent::api::pb::{self, agent_service_client::AgentServiceClient};
use std::{
    process::Command,
    time::{Duration, Instant},
};
use support::{cri::*, *};

/// The pods root, as containerd's cgroup_parent wants it: from the hierarchy root.
fn kubepods_parent(cg: &TestCgroup) -> String {
    let mount = knhk_agent::datapath::cgroup::detect_cgroup2_mount().expect("cgroup v2");
    format!(
        "/{}/kubepods",
        cg.path
            .strip_prefix(&mount)
            .expect("under the mount")
            .display()
    )
}

fn mount() -> std::path::PathBuf {
    knhk_agent::datapath::cgroup::detect_cgroup2_mount().expect("cgroup v2")
}

fn kubernetes_section(containerd: &Containerd, unknown: &str) -> String {
    format!(
        "[kubernetes]\ncri_socket = \"{}\"\nkubepods_root = \"kubepods\"\nunknown_pod_action = \"{unknown}\"\nresync_interval_ms = 1000\n",
        containerd.socket.display()
    )
}

fn deny_rule(port: u16) -> String {
    format!(
        "[[policy.rules]]\nname = \"payments-api-no-db\"\naction = \"deny\"\ncidrs = [\"127.0.0.1/32\"]\nports = [{port}]\n\
         namespace = \"payments\"\npod_selector = {{ match_labels = {{ app = \"api\" }}, match_expressions = [{{ key = \"tier\", operator = \"NotIn\", values = [\"batch\"] }}] }}\n"
    )
}

fn denied(out: &Result<(), String>) -> bool {
    matches!(out, Err(e) if e.contains("Operation not permitted"))
}

fn explain_pod(agent: &Agent, pod: &TestPod, port: u16) -> Result<pb::ExplainResponse, String> {
    runtime().block_on(async {
        AgentServiceClient::new(agent.channel().await)
            .explain(pb::ExplainRequest {
                pod: format!("{}/{}", pod.namespace, pod.name),
                destination: "127.0.0.1".into(),
                port: port.into(),
                protocol: "tcp".into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.message().to_owned())
    })
}

#[test]
fn kernel_pods_are_selected_by_namespace_and_labels() {
    let name = "kernel_pods_are_selected_by_namespace_and_labels";
    if !kernel_available(name) || !containerd_available(name) {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("pods");
    cg.child("kubepods");
    let pins = TestPins::new("pods");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ctr = Containerd::start("pods");
    let parent = kubepods_parent(&cg);
    let api = ctr.run_pod(
        &parent,
        &mount(),
        "payments",
        "api",
        &[("app", "api"), ("tier", "web")],
    );
    let worker = ctr.run_pod(
        &parent,
        &mount(),
        "payments",
        "worker",
        &[("app", "worker")],
    );
    let batch = ctr.run_pod(
        &parent,
        &mount(),
        "payments",
        "batch",
        &[("app", "api"), ("tier", "batch")],
    );
    let shop = ctr.run_pod(&parent, &mount(), "shop", "api", &[("app", "api")]);
    // Before the agent: every pod connects.
    assert_eq!(ctr.connect_from(&api, target.port()), Ok(()));

    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "{}{}",
            kubernetes_section(&ctr, "allow"),
            deny_rule(target.port())
        ),
    );
    let agent = Agent::start(&config);
    assert!(
        agent.logs().contains("workload discovery on"),
        "{}",
        agent.logs()
    );
    let out = ctr.connect_from(&api, target.port());
    assert!(denied(&out), "payments/api (app=api, tier=web): {out:?}");
    for (pod, why) in [
        (&worker, "payments/worker: other labels"),
        (&batch, "payments/batch: tier NotIn batch fails"),
        (&shop, "shop/api: other namespace"),
    ] {
        assert_eq!(ctr.connect_from(pod, target.port()), Ok(()), "{why}");
    }
    // Explain by pod names the pod's cgroup and the rule.
    let e = explain_pod(&agent, &api, target.port()).expect("explain");
    assert_eq!(e.rule, "payments-api-no-db");
    assert_eq!(e.action, "deny");
    assert!(
        e.cgroup.ends_with(&format!("pod{}", api.uid)),
        "{}",
        e.cgroup
    );
    let e = explain_pod(&agent, &worker, target.port()).expect("explain");
    assert_eq!(e.action, "allow");
    let unknown = explain_pod(
        &agent,
        &TestPod {
            name: "nope".into(),
            ..api.clone()
        },
        target.port(),
    )
    .expect_err("unknown pod");
    assert!(unknown.contains("no such pod on this node"), "{unknown}");

    // A pod started after the policy is enforced without restarting anything.
    let started = Instant::now();
    let late = ctr.run_pod(&parent, &mount(), "payments", "api-late", &[("app", "api")]);
    let sandbox_ready = started.elapsed();
    let out = ctr.connect_from(&late, target.port());
    assert!(
        denied(&out),
        "a pod started after the policy ({sandbox_ready:?} to run): {out:?}"
    );

    // A deleted pod leaves no entries: its scope goes from the live status.
    let api_cgroup = format!("kubepods/besteffort/pod{}", api.uid);
    assert!(active_scopes(&agent).contains(&api_cgroup));
    ctr.remove_pod(&api);
    wait_until(
        "the deleted pod's scope is gone",
        Duration::from_secs(5),
        || !active_scopes(&agent).contains(&api_cgroup),
    );
}

/// The active scopes of the live policy (`knhk-agent status --output json`).
fn active_scopes(agent: &Agent) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_knhk-agent"))
        .args([
            "status",
            "--output",
            "json",
            "--endpoint",
            &agent.endpoint(),
        ])
        .output()
        .expect("status");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    v["active_cgroups"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kernel_unknown_pods_are_guarded_and_the_runtime_may_go_away() {
    let name = "kernel_unknown_pods_are_guarded_and_the_runtime_may_go_away";
    if !kernel_available(name) || !containerd_available(name) {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("guard");
    cg.child("kubepods/besteffort");
    let pins = TestPins::new("guard");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ctr = Containerd::start("guard");
    let parent = kubepods_parent(&cg);
    let api = ctr.run_pod(&parent, &mount(), "payments", "api", &[("app", "api")]);
    let other = ctr.run_pod(&parent, &mount(), "shop", "web", &[("app", "web")]);
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "{}{}",
            kubernetes_section(&ctr, "deny"),
            deny_rule(target.port())
        ),
    );
    let agent = Agent::start(&config);
    // A pod the runtime does not know (a cgroup made by hand): every connect refused.
    let stray = cg.child("kubepods/besteffort/pod0000aaaa-0000-4000-8000-000000000001");
    assert_eq!(tcp_connect_from(&stray, target), Outcome::Denied);
    // Classified pods are judged by the rules.
    assert!(denied(&ctr.connect_from(&api, target.port())));
    assert_eq!(ctr.connect_from(&other, target.port()), Ok(()));

    // containerd stops: readiness names the runtime; known pods stay enforced (a process
    // placed in each pod's cgroup, since ExecSync needs containerd).
    ctr.stop_daemon();
    wait_until(
        "readiness names the runtime",
        Duration::from_secs(5),
        || agent.get("/readyz").contains("FAIL container runtime"),
    );
    assert_eq!(tcp_connect_from(&api.cgroup_dir, target), Outcome::Denied);
    assert_eq!(
        tcp_connect_from(&other.cgroup_dir, target),
        Outcome::Connected
    );

    // It comes back: a pod started now is classified and enforced.
    ctr.restart_daemon();
    let late = ctr.run_pod(&parent, &mount(), "payments", "api-2", &[("app", "api")]);
    assert!(denied(&ctr.connect_from(&late, target.port())));
    wait_until("readiness recovers", Duration::from_secs(5), || {
        agent.get("/readyz").contains("ok   container runtime")
    });
    assert_eq!(tcp_connect_from(&stray, target), Outcome::Denied);
}
