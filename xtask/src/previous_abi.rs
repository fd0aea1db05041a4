//! The agent of the previous map ABI, built from git history, so the migration test can start it
//! and then this build on the same pins (`tests/abi_migration.rs`).
//!
//! Its source is the tree of [`PREVIOUS_ABI_COMMIT`] (`git archive`), renamed to the package
//! `knhk-agent-previous-abi` (binary of the same name) and built into the workspace's target
//! directory: its dependencies are this build's, so only its own crates compile.

use anyhow::{bail, Context, Result};
use std::{path::Path, path::PathBuf, process::Command};

/// The last commit of map ABI v3. Move it to the last commit of the old version with every ABI
/// change (the test then proves that change's migration).
pub const PREVIOUS_ABI_COMMIT: &str = "db40bb75a543b9e0fb02b16ba658ccec54ff4c6a";
/// Its map ABI version.
pub const PREVIOUS_ABI_VERSION: u32 = 3;

/// Builds (or reuses) the previous ABI's agent; returns the binary.
pub fn build(root: &Path, target: &Path) -> Result<PathBuf> {
    let src = target.join("previous-abi").join(PREVIOUS_ABI_COMMIT);
    if !src.join("Cargo.toml").exists() {
        let parent = src.parent().context("previous-abi directory")?;
        let _ = std::fs::remove_dir_all(parent);
        std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
        let archive = Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["archive", "--format=tar", PREVIOUS_ABI_COMMIT])
            .output()
            .context("running git archive")?;
        if !archive.status.success() {
            bail!(
                "git archive {PREVIOUS_ABI_COMMIT} failed ({}): the ABI migration test needs the \
                 commit of the previous map ABI in this clone's history (a shallow clone lacks it; \
                 `git fetch --unshallow`)",
                String::from_utf8_lossy(&archive.stderr).trim()
            );
        }
        let mut tar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(&src)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("running tar")?;
        {
            use std::io::Write;
            tar.stdin
                .take()
                .context("tar stdin")?
                .write_all(&archive.stdout)
                .context("feeding tar")?;
        }
        if !tar.wait()?.success() {
            bail!("tar -x of the previous ABI's source failed");
        }
        // Cargo names path packages' artifacts by their path below the workspace root, so the
        // old tree's packages would share (and be mistaken for) this build's artifacts: give
        // them names of their own, keeping the crate names the code uses.
        for (file, from, to) in [
            (
                "agent/Cargo.toml",
                "[package]\nname = \"knhk-agent\"",
                "[package]\nname = \"knhk-agent-previous-abi\"",
            ),
            (
                "agent/Cargo.toml",
                "[[bin]]\nname = \"knhk-agent\"",
                "[[bin]]\nname = \"knhk-agent-previous-abi\"",
            ),
            (
                "ebpf/abi/Cargo.toml",
                "[package]\nname = \"knhk-abi\"",
                "[package]\nname = \"knhk-abi-previous\"",
            ),
            (
                "Cargo.toml",
                "knhk-abi = { path = \"ebpf/abi\" }",
                "knhk-abi = { path = \"ebpf/abi\", package = \"knhk-abi-previous\" }",
            ),
            (
                "ebpf/programs/Cargo.lock",
                "\"knhk-abi\"",
                "\"knhk-abi-previous\"",
            ),
            (
                "ebpf/programs/Cargo.toml",
                "knhk-abi = { path = \"../abi\" }",
                "knhk-abi = { path = \"../abi\", package = \"knhk-abi-previous\" }",
            ),
        ] {
            let path = src.join(file);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let renamed = text.replace(from, to);
            if renamed == text {
                bail!("cannot rename {from:?} in {}", path.display());
            }
            std::fs::write(&path, renamed)?;
        }
    }
    let status = super::cargo()
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", target)
        .args([
            "build",
            "-p",
            "knhk-agent-previous-abi",
            "--bin",
            "knhk-agent-previous-abi",
            // With the default features, as the workspace builds them: the dependencies this
            // build compiles are the test build's too. Without them (tried: 203 s instead of
            // 309 s here) the test build compiled the KMS and OTLP stacks itself and took 96 s
            // longer, a net loss.
        ])
        .status()
        .context("building the previous ABI's agent")?;
    if !status.success() {
        bail!("building the previous ABI's agent (commit {PREVIOUS_ABI_COMMIT}) failed: {status}");
    }
    Ok(target.join("debug/knhk-agent-previous-abi"))
}
