//! `cargo xtask bench` (part 5): the agent's memory by policy size (needs root).
//!
//! For 1, 1,000, 10,000 and 100,000 rules, a fresh `knhk-agent run` (the release binary beside
//! this example) gets the policy over gRPC; its resident memory after the switch and its peak
//! (`VmHWM`, which includes the compile) are read from `/proc`. Reported as a baseline plus bytes
//! per rule, against the DaemonSet's memory limit.

#[path = "../../tests/support/mod.rs"]
mod support;

use knhk_agent::api::pb::{self, policy_service_client::PolicyServiceClient};
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};
use support::*;

/// The DaemonSet's memory limit (k8s/base/daemonset.yaml).
const POD_LIMIT: u64 = 256 << 20;
/// Headroom the 100,000-rule peak must leave under the limit.
const HEADROOM: f64 = 0.25;

fn document(rules: usize) -> pb::PolicyDocument {
    pb::PolicyDocument {
        rules: (0..rules)
            .map(|i| pb::Rule {
                name: format!("deny-{i}"),
                action: pb::Action::Deny as i32,
                cidrs: vec![format!(
                    "10.{}.{}.{}/32",
                    (i >> 16) & 255,
                    (i >> 8) & 255,
                    i & 255
                )],
                ports: vec![(1000 + i % 50_000).to_string()],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Starts the agent on `config`; returns it with its gRPC address from the ready line.
fn start(bin: &std::path::Path, config: &std::path::Path) -> (std::process::Child, String) {
    let mut child = Command::new(bin)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn knhk-agent");
    let stdout = child.stdout.take().expect("stdout");
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["ready"] == true {
                return (child, v["grpc"].as_str().unwrap_or_default().to_owned());
            }
        }
    }
    let status = child.wait();
    panic!("the agent did not start: {status:?}");
}

fn main() {
    if !kernel_available("bench_memory") {
        return;
    }
    let bin = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("knhk-agent")))
        .filter(|p| p.exists())
        .expect(
            "the release knhk-agent beside target/release/examples (cargo build --release --bins)",
        );
    let cg = TestCgroup::new("bench-memory");
    let pins = TestPins::new("bench-memory");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config_tcp(dir.path(), &cg.path, &pins.root, "detach_on_exit = true\n");
    println!("agent memory by policy size (a fresh agent per size; release build):");
    println!(
        "{:>8}  {:>12}  {:>12}  {:>12}",
        "rules", "RSS after", "peak (HWM)", "idle RSS"
    );
    let mut rows = Vec::new();
    for rules in [1usize, 1_000, 10_000, 100_000] {
        let (mut child, grpc) = start(&bin, &config);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let (idle, _) = memory_of(child.id());
        // A runtime per agent, dropped before the agent stops: its client connection closes
        // instead of idling unpolled through the agent's graceful shutdown.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut c = PolicyServiceClient::connect(format!("http://{grpc}"))
                .await
                .expect("connect")
                .max_encoding_message_size(64 << 20);
            c.apply_policy(pb::ApplyPolicyRequest {
                policy: Some(document(rules)),
                expected_generation: None,
            })
            .await
            .expect("apply");
        });
        drop(rt);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let (rss, hwm) = memory_of(child.id());
        println!(
            "{rules:>8}  {:>9} KiB  {:>9} KiB  {:>9} KiB",
            rss / 1024,
            hwm / 1024,
            idle / 1024
        );
        rows.push((rules, idle, rss, hwm));
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }
    let (_, idle, rss, hwm) = rows[rows.len() - 1];
    let per_rule = |v: u64| v.saturating_sub(idle) as f64 / 100_000.0;
    println!(
        "baseline {} KiB; per rule: {:.0} bytes live, {:.0} bytes at the peak (100,000 rules)",
        idle / 1024,
        per_rule(rss),
        per_rule(hwm)
    );
    let budget = (POD_LIMIT as f64 * (1.0 - HEADROOM)) as u64;
    println!(
        "GOAL 100,000 rules peak within the pod limit ({} MiB) with {:.0}% headroom (<= {} MiB): {} ({} MiB)",
        POD_LIMIT >> 20,
        HEADROOM * 100.0,
        budget >> 20,
        if hwm <= budget { "MET" } else { "MISSED" },
        hwm >> 20
    );
    if hwm > budget && std::env::args().any(|a| a == "--check") {
        std::process::exit(1);
    }
}
