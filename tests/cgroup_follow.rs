//! Kernel tests of the cgroup follower in the `knhk-agent` process (need root, cgroup v2 and
//! BPF): rule cgroups made, removed and made again after the policy is applied are followed.
//!
//! The agent's periodic tick is set to 10 s, longer than the tests wait: only the inotify
//! watches can notice the changes in time, so a follower that fell back to polling at that
//! interval would fail here.

mod support;

use std::{path::Path, time::Duration};
use support::*;

/// Removes an (empty) cgroup directory; a child that just left may be counted for a moment.
fn rmdir(dir: &Path) {
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    panic!("rmdir {}", dir.display());
}

/// Waits until a connect from `dir` to `target` is denied (`true`) or admitted (`false`).
fn until(dir: &Path, target: std::net::SocketAddr, denied: bool, what: &str) {
    wait_until(what, Duration::from_secs(5), || {
        let o = tcp_connect_from(dir, target);
        if denied {
            o == Outcome::Denied
        } else {
            o.admitted()
        }
    });
}

#[test]
fn kernel_rule_cgroups_made_removed_and_remade_after_apply_are_followed() {
    if !kernel_available("kernel_rule_cgroups_made_removed_and_remade_after_apply_are_followed") {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("follow");
    let pins = TestPins::new("follow");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rules = String::new();
    // A nested rule cgroup none of whose components exist; a flat one; and many pending rule
    // cgroups beside them (sharing watches).
    for (name, cgroup) in [("nested", "a/b/c"), ("flat", "x")] {
        rules.push_str(&format!(
            "[[policy.rules]]\nname = \"{name}\"\naction = \"deny\"\ncgroup = \"{cgroup}\"\ncidrs = [\"127.0.0.1/32\"]\nports = [\"{}\"]\n",
            target.port()
        ));
    }
    for i in 0..200 {
        rules.push_str(&format!(
            "[[policy.rules]]\nname = \"pending-{i}\"\naction = \"deny\"\ncgroup = \"p{}/q{i}\"\ncidrs = [\"127.0.0.1/32\"]\nports = [\"{}\"]\n",
            i % 10,
            target.port()
        ));
    }
    let config = write_config(dir.path(), &cg.path, &pins.root, &rules);
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace(
            "cgroup_poll_interval_ms = 10\n",
            "cgroup_poll_interval_ms = 10000\n",
        ),
    )
    .expect("config");
    let agent = Agent::start(&config);

    // Made after the apply, component by component.
    let c = cg.child("a/b/c");
    until(&c, target, true, "a/b/c, made after the apply, is enforced");
    assert!(
        tcp_connect_from(&cg.path.join("a/b"), target).admitted(),
        "its parent is not in the rule's subtree"
    );
    let x = cg.child("x");
    until(&x, target, true, "x, made after the apply, is enforced");

    // Removed (with its parents) and made again: a new cgroup id, enforced again.
    let first_id = TestCgroup::id_of(&c);
    rmdir(&c);
    rmdir(&cg.path.join("a/b"));
    rmdir(&cg.path.join("a"));
    std::thread::sleep(Duration::from_millis(200));
    let c = cg.child("a/b/c");
    assert_ne!(TestCgroup::id_of(&c), first_id, "a new cgroup");
    until(&c, target, true, "a/b/c, made again, is enforced");
    for _ in 0..3 {
        let first_id = TestCgroup::id_of(&x);
        rmdir(&x);
        let x = cg.child("x");
        assert_ne!(TestCgroup::id_of(&x), first_id, "a new cgroup");
        until(&x, target, true, "x, made again, is enforced");
    }
    // A pending one among the many.
    let q = cg.child("p7/q117");
    until(&q, target, true, "p7/q117 is enforced");

    let (status, logs) = agent.stop_with_logs();
    assert!(status.success(), "{status}\n{logs}");
    assert!(
        logs.matches("rule cgroup removed").count() >= 4,
        "each removal was seen:\n{logs}"
    );
}
