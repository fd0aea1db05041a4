//! The Kubernetes manifests validate against the Kubernetes 1.37 schemas, strictly (unknown fields
//! fail), with `kubernetes-validate` from the project's `.venv` (`cargo xtask setup` installs it).

use std::{path::Path, process::Command};

#[test]
fn k8s_manifests_validate_strictly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tool = root.join(".venv/bin/kubernetes-validate");
    if !tool.exists() {
        let why = format!("{} is missing: run `cargo xtask setup`", tool.display());
        if std::env::var("KNHK_REQUIRE_KERNEL_TESTS").as_deref() == Ok("1") {
            panic!("{why}");
        }
        eprintln!("SKIPPED k8s_manifests_validate_strictly: {why}");
        return;
    }
    for entry in std::fs::read_dir(root.join("k8s")).expect("k8s/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let out = Command::new(&tool)
                .args(["--strict", "--kubernetes-version", "1.37"])
                .arg(&path)
                .output()
                .expect("run kubernetes-validate");
            assert!(
                out.status.success(),
                "{}:\n{}{}",
                path.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
