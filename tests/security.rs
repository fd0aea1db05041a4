//! Attacks on the agent's own surfaces (issue 12): each test performs the attack and checks that
//! it gets a precise error, changes nothing and panics nothing.

mod support;

use knhk_abi::{map_names, program_names, ABI_VERSION};
use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    process::Command,
};
use support::*;

/// Every file, directory and symlink under `dir` (symlinks not followed), sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let e = e.expect("entry");
            if e.file_type().expect("type").is_dir() {
                stack.push(e.path());
            }
            out.push(e.path());
        }
    }
    out.sort();
    out
}

fn detach(pin_root: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(["detach", "--pin-root"])
        .arg(pin_root)
        .output()
        .expect("run detach")
}

#[test]
fn detach_refuses_a_pin_root_that_is_not_on_bpffs() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("victim"), "keep me").expect("write");
    let root = scratch.path();
    std::fs::write(root.join("unrelated.txt"), "keep me").expect("write");
    std::fs::create_dir_all(root.join("data/deeper")).expect("mkdir");
    std::fs::write(root.join("data/deeper/file"), "keep me").expect("write");
    // Shaped like a pin tree, but plain files on a plain file system.
    let maps = root.join(format!("v{ABI_VERSION}/maps"));
    std::fs::create_dir_all(&maps).expect("mkdir");
    std::fs::write(maps.join(map_names::CONFIG), "not a pin").expect("write");
    std::os::unix::fs::symlink(outside.path(), root.join("outside")).expect("symlink");
    let before = tree(root);

    let out = detach(root);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not on a bpffs"), "{stderr}");
    assert!(stderr.contains("nothing was removed"), "{stderr}");
    assert!(stderr.contains(&root.display().to_string()), "{stderr}");
    assert_eq!(tree(root), before, "detach changed the scratch tree");
    assert!(
        outside.path().join("victim").exists(),
        "followed the symlink"
    );

    // The library refuses the same way (the agent's detach_on_exit goes through it).
    let e = knhk_agent::datapath::remove_pins(root).expect_err("a scratch tree is refused");
    assert!(e.to_string().contains("not on a bpffs"), "{e}");
    assert_eq!(tree(root), before);
    assert!(outside.path().join("victim").exists());
}

/// Pins a fresh one-element array map at `path` (a pin that is not knhk's).
fn pin_dummy_map(path: &Path) {
    let name = CString::new("other").expect("name");
    let fd = unsafe {
        libbpf_sys::bpf_map_create(
            libbpf_sys::BPF_MAP_TYPE_ARRAY,
            name.as_ptr(),
            4,
            8,
            1,
            std::ptr::null(),
        )
    };
    assert!(fd >= 0, "bpf_map_create: {fd}");
    let c = CString::new(path.as_os_str().as_bytes()).expect("path");
    let r = unsafe { libbpf_sys::bpf_obj_pin(fd, c.as_ptr()) };
    unsafe { libc::close(fd) };
    assert_eq!(r, 0, "pin {}", path.display());
}

/// A bpffs directory that is not a pin root, removed (with what the test put there) on drop.
struct BpffsScratch(PathBuf);

impl Drop for BpffsScratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn kernel_detach_removes_only_knhk_pins_and_never_follows_symlinks() {
    if !kernel_available("kernel_detach_removes_only_knhk_pins_and_never_follows_symlinks") {
        return;
    }
    let cg = TestCgroup::new("detach-only");
    let pins = TestPins::new("detach-only");
    let opts = knhk_agent::datapath::DatapathOptions {
        cgroup_root: cg.path.clone(),
        pin_root: pins.root.clone(),
        heat_max_entries: 1024,
    };
    drop(knhk_agent::datapath::Datapath::start(&opts).unwrap_or_else(|e| panic!("start: {e}")));
    let v = pins.root.join(format!("v{ABI_VERSION}"));
    let knhk: Vec<PathBuf> = map_names::ALL
        .iter()
        .map(|m| v.join("maps").join(m))
        .chain(program_names::ALL.iter().map(|p| v.join("links").join(p)))
        .collect();
    for p in &knhk {
        assert!(p.exists(), "{} pinned", p.display());
    }
    // Someone else's things in the pin root.
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("victim"), "keep me").expect("write");
    let other_pins = [v.join("maps/OTHER_MAP"), pins.root.join("other_pin")];
    for p in &other_pins {
        pin_dummy_map(p);
    }
    std::fs::create_dir(pins.root.join("other_dir")).expect("mkdir on bpffs");
    pin_dummy_map(&pins.root.join("other_dir/pin"));
    std::os::unix::fs::symlink(outside.path(), v.join("links/outside")).expect("symlink");
    std::os::unix::fs::symlink(outside.path().join("victim"), pins.root.join("victim"))
        .expect("symlink");

    let out = detach(&pins.root);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains(&format!("removed {} pins", knhk.len())),
        "{stdout}"
    );
    for p in &knhk {
        assert!(
            std::fs::symlink_metadata(p).is_err(),
            "{} still pinned",
            p.display()
        );
    }
    for p in other_pins.iter().chain([
        &pins.root.join("other_dir/pin"),
        &v.join("links/outside"),
        &pins.root.join("victim"),
    ]) {
        assert!(
            std::fs::symlink_metadata(p).is_ok(),
            "{} was removed",
            p.display()
        );
    }
    assert!(outside.path().join("victim").exists());
    // Clean up what the test added, so that the pins guard finds only knhk's directories.
    for p in [
        v.join("maps/OTHER_MAP"),
        pins.root.join("other_pin"),
        pins.root.join("other_dir/pin"),
        v.join("links/outside"),
        pins.root.join("victim"),
    ] {
        std::fs::remove_file(&p).unwrap_or_else(|e| panic!("rm {}: {e}", p.display()));
    }
    std::fs::remove_dir(pins.root.join("other_dir")).expect("rmdir");
    drop(pins);
    drop(cg);

    // A pin directory that is a symlink to another bpffs directory is refused, and what it
    // points at is left alone, even a pin named like knhk's.
    let elsewhere = BpffsScratch(PathBuf::from(format!(
        "/sys/fs/bpf/knhk-test-{}-elsewhere",
        std::process::id()
    )));
    std::fs::create_dir_all(elsewhere.0.join("maps")).expect("mkdir");
    let foreign = elsewhere.0.join("maps").join(map_names::CONFIG);
    pin_dummy_map(&foreign);
    let root = BpffsScratch(PathBuf::from(format!(
        "/sys/fs/bpf/knhk-test-{}-symlinked",
        std::process::id()
    )));
    std::fs::create_dir(&root.0).expect("mkdir");
    let link = root.0.join(format!("v{ABI_VERSION}"));
    std::os::unix::fs::symlink(&elsewhere.0, &link).expect("symlink");
    let out = detach(&root.0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("symlink"), "{stderr}");
    assert!(stderr.contains(&link.display().to_string()), "{stderr}");
    assert!(
        foreign.exists(),
        "followed the symlink and unpinned another directory's pin"
    );
    assert!(std::fs::symlink_metadata(&link).is_ok());
}
