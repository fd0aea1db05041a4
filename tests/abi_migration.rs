//! Kernel test of a map ABI change (needs root, cgroup v2 and BPF): an agent of the previous
//! ABI (built from git history by `cargo xtask test`, see xtask/src/previous_abi.rs) enforces a
//! policy; this build starts on the same pins and state, attaches its programs, switches the
//! live policy into its own maps, then removes the old version's pins. A connect loop runs
//! through the whole hand-over: no denied connect is ever admitted, no allowed one refused.

mod support;

use std::{
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};
use support::*;

/// The previous ABI's agent binary and version, from `cargo xtask test`.
fn previous_agent(test: &str) -> Option<(String, u32)> {
    let bin = std::env::var("KNHK_PREVIOUS_ABI_AGENT").ok();
    let version = std::env::var("KNHK_PREVIOUS_ABI_VERSION")
        .ok()
        .and_then(|v| v.parse().ok());
    match (bin, version) {
        (Some(b), Some(v)) => Some((b, v)),
        _ if std::env::var("KNHK_REQUIRE_KERNEL_TESTS").as_deref() == Ok("1") => panic!(
            "{test}: KNHK_PREVIOUS_ABI_AGENT is not set: run it through `cargo xtask test`, which builds the previous ABI's agent"
        ),
        _ => {
            eprintln!("SKIPPED {test}: KNHK_PREVIOUS_ABI_AGENT is not set (`cargo xtask test` sets it)");
            None
        }
    }
}

#[test]
fn kernel_an_agent_of_the_previous_map_abi_hands_over_without_an_enforcement_gap() {
    const TEST: &str =
        "kernel_an_agent_of_the_previous_map_abi_hands_over_without_an_enforcement_gap";
    if !kernel_available(TEST) {
        return;
    }
    let Some((old_bin, old_version)) = previous_agent(TEST) else {
        return;
    };
    let blocked = tcp_sink("127.0.0.1:0");
    let open = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("abi-migration");
    let workload = cg.child("w");
    let pins = TestPins::new("abi-migration");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config_with(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "api_socket = \"{}\"\nmode = \"enforce\"\n",
            dir.path().join("run/agent.sock").display()
        ),
        &format!(
            "[[policy.rules]]\nname = \"blocked\"\naction = \"deny\"\ncidrs = [\"127.0.0.1/32\"]\nports = [\"{}\"]\nprotocol = \"tcp\"\n",
            blocked.port()
        ),
    );

    // The previous ABI's agent enforces the policy, then stops (its pins stay).
    let old = Agent::attach(
        Command::new(&old_bin)
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the previous ABI's agent"),
    );
    assert_eq!(tcp_connect_from(&workload, blocked), Outcome::Denied);
    assert_eq!(tcp_connect_from(&workload, open), Outcome::Connected);
    let old_pins = pins.root.join(format!("v{old_version}"));
    assert!(old_pins.exists(), "{} pinned", old_pins.display());
    old.kill9();

    // Connects run through the hand-over.
    let stop = Arc::new(AtomicBool::new(false));
    let looper = |addr| {
        let (stop, dir) = (stop.clone(), workload.clone());
        std::thread::spawn(move || {
            let mut total = LoopCounts::default();
            while !stop.load(Ordering::Relaxed) {
                let c = tcp_connect_loop_from(&dir, addr, 50);
                total.connected += c.connected;
                total.denied += c.denied;
                total.other += c.other;
            }
            total
        })
    };
    let (to_blocked, to_open) = (looper(blocked), looper(open));
    std::thread::sleep(Duration::from_millis(300));
    let new = Agent::start(&config);
    wait_until("the old version's pins go", Duration::from_secs(10), || {
        !old_pins.exists()
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (blocked_counts, open_counts) = (
        to_blocked.join().expect("loop"),
        to_open.join().expect("loop"),
    );
    eprintln!("during the hand-over: blocked {blocked_counts:?}, open {open_counts:?}");
    assert_eq!(
        blocked_counts.connected, 0,
        "a denied connect was admitted during the hand-over"
    );
    assert!(blocked_counts.denied > 100, "{blocked_counts:?}");
    assert_eq!(
        open_counts.denied, 0,
        "an allowed connect was refused during the hand-over"
    );
    assert!(open_counts.connected > 100, "{open_counts:?}");
    // After it: this build's pins, the policy with the generation it had, enforced by them alone.
    assert!(pins
        .root
        .join(format!("v{}", knhk_abi::ABI_VERSION))
        .exists());
    assert!(
        new.logs().contains("removed the pins of an older map ABI"),
        "the log says the old programs were detached"
    );
    assert_eq!(tcp_connect_from(&workload, blocked), Outcome::Denied);
    assert_eq!(tcp_connect_from(&workload, open), Outcome::Connected);
    new.kill9();
}
