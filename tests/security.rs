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

// ---- item 2: the admin HTTP server against clients that hold connections ----

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

/// What a client sees when it waits for the server on `s`: `Closed` (EOF or reset) or `Open`
/// (nothing within `wait`), and how long that took.
#[derive(Debug, PartialEq)]
enum Seen {
    Closed,
    Open,
    Data(String),
}

fn wait_for_server(s: &mut TcpStream, wait: Duration) -> (Seen, Duration) {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let seen = match s.read(&mut buf) {
        Ok(0) => Seen::Closed,
        Ok(n) => Seen::Data(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Seen::Open
        }
        Err(_) => Seen::Closed,
    };
    (seen, start.elapsed())
}

/// One keep-alive `GET /healthz` on `s`: the response head and body.
fn healthz_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).ends_with("ok\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).expect("connect to the admin server")
}

#[test]
fn kernel_admin_server_closes_slowloris_and_caps_connections_grpc_unaffected() {
    if !kernel_available(
        "kernel_admin_server_closes_slowloris_and_caps_connections_grpc_unaffected",
    ) {
        return;
    }
    let cg = TestCgroup::new("admin-cap");
    let pins = TestPins::new("admin-cap");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, "");
    let agent = Agent::start(&config);
    let timeout = knhk_agent::telemetry::ADMIN_HEADER_READ_TIMEOUT;
    let cap = knhk_agent::telemetry::ADMIN_MAX_CONNECTIONS;

    // Slowloris: part of a request line, then nothing. Closed at the header read timeout.
    let mut slow = connect(agent.metrics);
    slow.write_all(b"GET /metr").expect("partial request");
    let (seen, after) = wait_for_server(&mut slow, timeout + Duration::from_secs(5));
    assert_eq!(seen, Seen::Closed, "a slowloris connection stays open");
    assert!(
        after >= timeout - Duration::from_millis(500) && after < timeout + Duration::from_secs(3),
        "closed after {after:?}, the timeout is {timeout:?}"
    );

    // The cap: one keep-alive client and cap-1 idle ones hold every slot.
    let mut keep = connect(agent.metrics);
    assert!(healthz_on(&mut keep).contains("200 OK"));
    let mut idle: Vec<TcpStream> = (1..cap).map(|_| connect(agent.metrics)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut over = connect(agent.metrics);
    let (seen, after) = wait_for_server(&mut over, Duration::from_secs(2));
    assert_eq!(seen, Seen::Closed, "connection {} was not refused", cap + 1);
    assert!(
        after < Duration::from_secs(1),
        "refused only after {after:?}"
    );
    // The connections already in keep serving, and gRPC is a different server.
    assert!(healthz_on(&mut keep).contains("200 OK"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = knhk_agent::api::pb::policy_service_client::PolicyServiceClient::new(
            agent.channel().await,
        );
        let live = c
            .get_policy(knhk_agent::api::pb::GetPolicyRequest {})
            .await
            .expect("GetPolicy while the admin server is at its cap");
        assert_eq!(live.into_inner().generation, 1);
    });
    // Closing connections frees their slots.
    drop(keep);
    idle.clear();
    let start = Instant::now();
    loop {
        let mut s = connect(agent.metrics);
        let answer = healthz_on(&mut s);
        if answer.contains("200 OK") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no slot freed after closing: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn admin_server(limits: knhk_agent::telemetry::AdminLimits) -> knhk_agent::telemetry::AdminServer {
    let readiness = std::sync::Arc::new(knhk_agent::telemetry::Readiness::default());
    knhk_agent::telemetry::AdminServer::start_with_limits(
        "127.0.0.1:0".parse().expect("addr"),
        prometheus::Registry::new(),
        readiness,
        limits,
    )
    .expect("admin server")
}

#[test]
fn admin_server_closes_slow_and_idle_clients_at_the_header_timeout() {
    let timeout = Duration::from_millis(400);
    let server = admin_server(knhk_agent::telemetry::AdminLimits {
        max_connections: 8,
        header_read_timeout: timeout,
    });
    let in_time =
        |after: Duration| after >= timeout - Duration::from_millis(100) && after < timeout * 4;
    let opened = Instant::now();
    // Part of a request line, then nothing.
    let mut partial = connect(server.local_addr);
    partial.write_all(b"GET /heal").expect("write");
    // Nothing at all.
    let mut silent = connect(server.local_addr);
    for (name, s) in [
        ("partial request line", &mut partial),
        ("silent", &mut silent),
    ] {
        let (seen, _) = wait_for_server(s, timeout * 4);
        let after = opened.elapsed();
        assert_eq!(seen, Seen::Closed, "{name} connection left open");
        assert!(
            in_time(after),
            "{name}: closed after {after:?}, timeout {timeout:?}"
        );
    }
    // A byte every 50 ms, each well inside the timeout: the head as a whole is late.
    let mut drip = connect(server.local_addr);
    let opened = Instant::now();
    let mut closed = false;
    for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    {
        if drip.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        if wait_for_server(&mut drip, Duration::from_millis(1)).0 == Seen::Closed {
            closed = true;
            break;
        }
    }
    let after = opened.elapsed();
    assert!(closed, "a client dripping its request head is never closed");
    assert!(
        in_time(after),
        "drip: closed after {after:?}, timeout {timeout:?}"
    );
    // A keep-alive client idle for longer than the timeout is closed too; prompt ones are served.
    let mut keep = connect(server.local_addr);
    assert!(healthz_on(&mut keep).contains("200 OK"));
    let (seen, after) = wait_for_server(&mut keep, timeout * 4);
    assert_eq!(
        seen,
        Seen::Closed,
        "an idle keep-alive connection is never closed"
    );
    assert!(in_time(after), "keep-alive: closed after {after:?}");
    assert!(healthz_on(&mut connect(server.local_addr)).contains("200 OK"));
}

#[test]
fn admin_server_refuses_connections_over_its_cap_and_frees_slots_on_close() {
    let cap = 4;
    let server = admin_server(knhk_agent::telemetry::AdminLimits {
        max_connections: cap,
        header_read_timeout: Duration::from_secs(30),
    });
    let mut keep = connect(server.local_addr);
    assert!(healthz_on(&mut keep).contains("200 OK"));
    let mut idle: Vec<TcpStream> = (1..cap).map(|_| connect(server.local_addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    for attempt in 0..3 {
        let mut over = connect(server.local_addr);
        let (seen, after) = wait_for_server(&mut over, Duration::from_secs(3));
        assert_eq!(
            seen,
            Seen::Closed,
            "attempt {attempt}: connection {} was served",
            cap + 1
        );
        assert!(
            after < Duration::from_secs(1),
            "refused only after {after:?}"
        );
    }
    assert!(
        healthz_on(&mut keep).contains("200 OK"),
        "a connection inside the cap keeps being served"
    );
    // One closed connection frees one slot.
    idle.pop();
    let start = Instant::now();
    let mut fresh = loop {
        let mut s = connect(server.local_addr);
        if healthz_on(&mut s).contains("200 OK") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no slot was freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(healthz_on(&mut fresh).contains("200 OK"));
    let mut over = connect(server.local_addr);
    assert_eq!(
        wait_for_server(&mut over, Duration::from_secs(3)).0,
        Seen::Closed
    );
}

// ---- item 3: `receipts verify` is read-only and never panics; the agent refuses a corrupt ledger ----

use knhk_agent::{
    config::{ReceiptSettings, SignerSettings},
    receipts::{NewReceipt, ReceiptKind, Receipts},
};

/// A valid ledger with signed checkpoints, written through the crate's API, at `dir/receipts.redb`.
fn write_ledger(dir: &Path) -> PathBuf {
    let path = dir.join("receipts.redb");
    let settings = ReceiptSettings {
        path: path.clone(),
        node: "node-a".into(),
        region: "local".into(),
        rotation_interval: Duration::from_secs(24 * 3600),
        retention: Default::default(),
        max_pending_checkpoints: 1024,
        signer: SignerSettings::File {
            key_dir: dir.join("keys"),
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let signer = knhk_agent::receipts::connect_signer(&settings.signer)
            .await
            .expect("signer");
        let (r, tasks) =
            Receipts::start(settings, signer, &prometheus::Registry::new(), None, None)
                .await
                .expect("receipts");
        for i in 0..40u64 {
            r.append(NewReceipt {
                kind: ReceiptKind::PolicySwitch,
                cycle: i,
                policy_generation: i,
                payload: format!("{{\"generation\":{i}}}").into_bytes(),
            })
            .await
            .expect("append");
        }
        let start = Instant::now();
        while !r
            .ledger()
            .unsigned_checkpoints()
            .expect("checkpoints")
            .is_empty()
            || r.ledger().checkpoints().expect("checkpoints").is_empty()
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "checkpoints unsigned"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let late = tasks
            .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
        assert!(late.is_empty(), "{late:?}");
        drop(r);
    });
    path
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).expect("read ledger");
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn verify_cmd(db: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(["receipts", "verify", "--db"]).arg(db);
    c
}

#[test]
fn receipts_verify_does_not_write_the_ledger_and_verifies_a_read_only_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = write_ledger(dir.path());
    let before = sha256(&ledger);
    for run in 0..3 {
        let out = verify_cmd(&ledger).output().expect("verify");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "run {run}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("verified"), "{stdout}");
        assert_eq!(
            sha256(&ledger),
            before,
            "run {run}: verify changed the ledger"
        );
    }
    // A read-only copy (0444, in a directory the verifying user cannot write), verified by an
    // unprivileged user when the test runs as root (root ignores file modes).
    let ro_dir = tempfile::tempdir().expect("tempdir");
    let copy = ro_dir.path().join("copy.redb");
    std::fs::copy(&ledger, &copy).expect("copy");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o444)).expect("chmod");
    std::fs::set_permissions(ro_dir.path(), std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let mut cmd = verify_cmd(&copy);
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::process::CommandExt;
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().expect("verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("verified"), "{stdout}");
    assert_eq!(sha256(&copy), before);
    std::fs::set_permissions(ro_dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");

    // A copy taken while a writer has the ledger open was not closed cleanly: redb would have to
    // repair it, which writes. It is verified through a private repaired copy, still unwritten.
    let live = dir.path().join("live.redb");
    std::fs::copy(&ledger, &live).expect("copy");
    let writer = knhk_agent::receipts::Ledger::open(&live, "node-a", "local").expect("open");
    let hot = dir.path().join("hot-copy.redb");
    std::fs::copy(&live, &hot).expect("copy while open");
    drop(writer);
    let hot_before = sha256(&hot);
    let out = verify_cmd(&hot).output().expect("verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("verified"), "{stdout}");
    assert!(stderr.contains("not closed cleanly"), "{stderr}");
    assert_eq!(
        sha256(&hot),
        hot_before,
        "verify repaired the copy in place"
    );
    // The ledger of a running writer is refused with a precise error, and not written.
    let writer = knhk_agent::receipts::Ledger::open(&live, "node-a", "local").expect("open");
    let live_before = sha256(&live);
    let out = verify_cmd(&live).output().expect("verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("open by a running agent"), "{stderr}");
    assert_eq!(sha256(&live), live_before);
    drop(writer);
}

/// Byte offsets to flip in a file of `len` bytes: the whole first page densely (headers), then
/// a spread over the rest.
fn flip_offsets(len: usize, count: usize) -> Vec<usize> {
    let mut out: Vec<usize> = (0..len.min(512)).step_by(3).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while out.len() < count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push((x % len as u64) as usize);
    }
    out
}

#[test]
fn receipts_verify_never_panics_on_byte_flipped_ledgers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = write_ledger(dir.path());
    let original = std::fs::read(&ledger).expect("read");
    let copy = dir.path().join("flipped.redb");
    let mut panics = Vec::new();
    let (mut verified, mut failed) = (0, 0);
    for (i, at) in flip_offsets(original.len(), 300).into_iter().enumerate() {
        let mut bytes = original.clone();
        bytes[at] ^= if i % 2 == 0 { 0xff } else { 0x01 };
        std::fs::write(&copy, &bytes).expect("write copy");
        let out = verify_cmd(&copy).output().expect("verify");
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => verified += 1,
            Some(1 | 64) if !stderr.contains("panicked") => {
                failed += 1;
                if failed <= 5 {
                    eprintln!(
                        "byte {at}: exit {:?}: {}{stderr}",
                        out.status.code(),
                        String::from_utf8_lossy(&out.stdout)
                    );
                }
            }
            other => panics.push(format!("byte {at}: exit {other:?}: {stderr}")),
        }
    }
    assert!(
        panics.is_empty(),
        "{} of 300 flipped copies panicked or exited oddly, e.g. {}",
        panics.len(),
        panics[0]
    );
    assert!(failed > 0, "no flip was noticed ({verified} verified)");
}

#[test]
fn ledger_open_never_panics_on_byte_flipped_ledgers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = write_ledger(dir.path());
    let original = std::fs::read(&ledger).expect("read");
    let copy = dir.path().join("flipped.redb");
    let mut panics = Vec::new();
    let mut refused = 0;
    for (i, at) in flip_offsets(original.len(), 300).into_iter().enumerate() {
        let mut bytes = original.clone();
        bytes[at] ^= if i % 2 == 0 { 0xff } else { 0x01 };
        std::fs::write(&copy, &bytes).expect("write copy");
        let opened = std::panic::catch_unwind(|| {
            knhk_agent::receipts::Ledger::open(&copy, "node-a", "local").map(|_| ())
        });
        match opened {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                refused += 1;
                assert!(e.to_string().contains("receipts database"), "{e}");
            }
            Err(_) => panics.push(at),
        }
    }
    assert!(
        panics.is_empty(),
        "Ledger::open panicked on flips at {panics:?}"
    );
    eprintln!("{refused} of 300 flipped copies refused with an error");
}

#[test]
fn kernel_agent_refuses_a_damaged_ledger_before_attaching() {
    if !kernel_available("kernel_agent_refuses_a_damaged_ledger_before_attaching") {
        return;
    }
    let cg = TestCgroup::new("bad-ledger");
    let pins = TestPins::new("bad-ledger");
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = dir.path().join("receipts.redb");
    // A ledger-sized file that is not a redb database.
    std::fs::write(&ledger, vec![0x5au8; 64 * 1024]).expect("write");
    let before = sha256(&ledger);
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "[kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n[receipts]\npath = \"{}\"\n",
            dir.path().join("keys").display(),
            ledger.display()
        ),
    );
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("receipts database"), "{stderr}");
    assert!(stderr.contains(&ledger.display().to_string()), "{stderr}");
    assert!(
        !pins.root.exists(),
        "the datapath was started (pins at {}) before the ledger was refused",
        pins.root.display()
    );
    assert_eq!(sha256(&ledger), before, "the damaged ledger was written");
}

// ---- item 4: a grpc-timeout too large for a deadline ----

#[test]
fn kernel_grpc_timeout_too_large_for_a_deadline_is_served_without_panicking() {
    if !kernel_available("kernel_grpc_timeout_too_large_for_a_deadline_is_served_without_panicking")
    {
        return;
    }
    use knhk_agent::api::pb;
    let cg = TestCgroup::new("grpc-timeout");
    let pins = TestPins::new("grpc-timeout");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, "");
    let agent = Agent::start(&config);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = pb::policy_service_client::PolicyServiceClient::new(agent.channel().await);
        for (i, timeout) in [
            "18446744073709551615S",
            "18446744073709551615H",
            "99999999H",
        ]
        .into_iter()
        .enumerate()
        {
            let mut req = tonic::Request::new(pb::ApplyPolicyRequest {
                policy: Some(pb::PolicyDocument {
                    rules: vec![pb::Rule {
                        name: format!("r{i}"),
                        action: pb::Action::Allow as i32,
                        cidrs: vec!["10.0.0.0/8".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                expected_generation: None,
            });
            req.metadata_mut()
                .insert("grpc-timeout", timeout.parse().expect("ascii"));
            let applied = c
                .apply_policy(req)
                .await
                .unwrap_or_else(|e| panic!("ApplyPolicy with grpc-timeout {timeout}: {e:?}"))
                .into_inner();
            assert_eq!(applied.generation, i as u64 + 2);
            let mut req = tonic::Request::new(pb::RollbackRequest {
                expected_generation: Some(0),
            });
            req.metadata_mut()
                .insert("grpc-timeout", timeout.parse().expect("ascii"));
            let stale = c.rollback(req).await.expect_err("a stale rollback");
            assert_eq!(
                stale.code(),
                tonic::Code::FailedPrecondition,
                "Rollback with grpc-timeout {timeout}: {stale:?}"
            );
        }
    });
    // Every line the agent wrote, read to the end once it has exited (no sleep: a panic logged
    // while handling those RPCs is in there).
    let (status, logs) = agent.stop_with_logs();
    assert!(status.success(), "{status}: {logs}");
    assert!(!logs.contains("panicked"), "{logs}");
}

// ---- item 5: a configuration that is a FIFO, a device, or too large ----

/// Runs `knhk-agent check-config FILE` with at most 1 GiB of address space; kills it after 10 s.
/// Returns (exit code, stderr), or None when it had to be killed.
fn check_config_bounded(file: &Path) -> Option<(Option<i32>, String)> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(BIN);
    cmd.arg("check-config")
        .arg(file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn check-config");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            return Some((status.code(), stderr));
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `Config::load_file(path)` on a thread; None if it has not returned within 5 s.
fn load_bounded(path: &Path) -> Option<Result<knhk_agent::config::Config, String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send(knhk_agent::config::Config::load_file(&path).map_err(|e| e.to_string()));
    });
    rx.recv_timeout(Duration::from_secs(5)).ok()
}

#[test]
fn a_config_that_is_a_fifo_is_refused_without_hanging() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("agent.toml");
    let c = CString::new(fifo.as_os_str().as_bytes()).expect("path");
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let e = load_bounded(&fifo)
        .expect("Config::load_file hangs on a FIFO")
        .expect_err("a FIFO is refused");
    assert!(e.contains(&fifo.display().to_string()), "{e}");
    assert!(
        e.contains("FIFO") && e.contains("not a regular file"),
        "{e}"
    );
    let (code, stderr) = check_config_bounded(&fifo).expect("check-config hangs on a FIFO");
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("FIFO") && stderr.contains("not a regular file"),
        "{stderr}"
    );
}

#[test]
fn a_config_that_is_a_device_or_too_large_is_refused_without_reading_it_all() {
    let (code, stderr) =
        check_config_bounded(Path::new("/dev/zero")).expect("check-config never ends on /dev/zero");
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("/dev/zero"), "{stderr}");
    assert!(
        stderr.contains("character device") && stderr.contains("not a regular file"),
        "{stderr}"
    );
    let e = load_bounded(Path::new("/dev/zero"))
        .expect("Config::load_file never ends on /dev/zero")
        .expect_err("a device is refused");
    assert!(e.contains("character device"), "{e}");
    let e = load_bounded(&std::env::temp_dir())
        .expect("Config::load_file on a directory")
        .expect_err("a directory is refused");
    assert!(e.contains("directory"), "{e}");

    // A regular file over the size limit: refused by its size, not read.
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.toml");
    let f = std::fs::File::create(&big).expect("create");
    let limit = knhk_agent::config::MAX_CONFIG_BYTES;
    f.set_len(limit + 1).expect("sparse file");
    let e = load_bounded(&big)
        .expect("Config::load_file on a large file")
        .expect_err("a large file is refused");
    assert!(e.contains(&format!("{} bytes", limit + 1)), "{e}");
    assert!(e.contains("64 MiB"), "{e}");
    let (code, stderr) = check_config_bounded(&big).expect("check-config on a large file");
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains(&format!("{} bytes", limit + 1)), "{stderr}");
    // A configuration of ordinary size still loads.
    let ok = dir.path().join("ok.toml");
    std::fs::write(&ok, "[agent]\nmode = \"audit\"\n").expect("write");
    load_bounded(&ok)
        .expect("load")
        .expect("a small regular file loads");
}

// ---- item 6: cgroup names reach the logs escaped ----

#[test]
fn kernel_cgroup_names_with_newlines_and_escape_codes_are_logged_escaped() {
    if !kernel_available("kernel_cgroup_names_with_newlines_and_escape_codes_are_logged_escaped") {
        return;
    }
    let cg = TestCgroup::new("log-escape");
    let pins = TestPins::new("log-escape");
    let dir = tempfile::tempdir().expect("tempdir");
    // A rule for a cgroup that does not exist yet, whose name forges a log line and carries
    // terminal escape codes (TOML \n and \u001b escapes).
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        "[[policy.rules]]\nname = \"r\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/8\"]\ncgroup = \"pods/x\\n2026-01-01T00:00:00Z  INFO FORGED: all connects allowed \\u001b[2J\"\n",
    );
    let agent = Agent::start(&config);
    let start = Instant::now();
    let mut lines: Vec<String> = Vec::new();
    while start.elapsed() < Duration::from_secs(10)
        && !lines
            .iter()
            .any(|l| l.contains("rule cgroup does not exist yet"))
    {
        if let Ok(l) = agent.stderr.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
        }
    }
    let logged = lines
        .iter()
        .find(|l| l.contains("rule cgroup does not exist yet"))
        .unwrap_or_else(|| panic!("no pending-cgroup log line in {lines:#?}"));
    assert!(
        logged.contains(r"pods/x\n2026-01-01T00:00:00Z  INFO FORGED"),
        "{logged}"
    );
    assert!(
        !logged.contains('\u{1b}'),
        "a raw escape code reached the log: {logged:?}"
    );
    assert!(logged.contains(r"\u{1b}[2J"), "{logged}");
    assert!(
        !lines.iter().any(|l| l.starts_with("2026-01-01T00:00:00Z")),
        "a forged log line: {lines:#?}"
    );
}

// ---- local users against the API and the identity directory (issue 12, part b) ----

/// A directory every user may read and traverse, for files an unprivileged attacker uses.
fn public_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// `knhk-agent ARGS` run as `uid`:`gid` with no supplementary groups (fork, setgid, setgroups,
/// setuid, exec).
fn cli_as(uid: u32, gid: u32, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    Command::new(BIN)
        .args(args)
        .uid(uid)
        .gid(gid)
        .output()
        .expect("run knhk-agent")
}

/// The live policy generation, read as root.
fn live_generation(endpoint: &str) -> u64 {
    let out = Command::new(BIN)
        .args(["policy", "get", "--output", "json", "--endpoint", endpoint])
        .output()
        .expect("policy get");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "policy get: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    doc["generation"].as_u64().expect("generation")
}

/// An allow-everything policy in a file anyone can read.
fn allow_all_policy(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("allow-all.toml");
    std::fs::write(
        &path,
        "[[policy.rules]]\nname = \"open\"\naction = \"allow\"\ncidrs = [\"0.0.0.0/0\", \"::/0\"]\n",
    )
    .expect("write policy");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    path
}

/// (uid, gid) of a user with no passwd entry and no supplementary groups.
const STRANGER: (u32, u32) = (4242, 4242);

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// (mode in octal, uid, gid) of `path`, not following a symlink.
fn owner_and_mode(path: &Path) -> (String, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (format!("{:04o}", m.mode() & 0o7777), m.uid(), m.gid())
}

/// Applies `policy` as `uid`:`gid`; returns (exit code, stderr).
fn apply_as(uid: u32, gid: u32, endpoint: &str, policy: &str) -> (Option<i32>, String) {
    let out = cli_as(
        uid,
        gid,
        &["policy", "apply", policy, "--endpoint", endpoint],
    );
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn kernel_a_local_user_cannot_change_the_policy_over_the_api() {
    if !kernel_available("kernel_a_local_user_cannot_change_the_policy_over_the_api") {
        return;
    }
    let cg = TestCgroup::new("api-local-user");
    let pins = TestPins::new("api-local-user");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, "");
    let agent = Agent::start(&config);
    let endpoint = agent.endpoint();
    let socket = agent.grpc_socket();
    let public = public_dir();
    let policy = allow_all_policy(public.path());
    let policy = policy.to_str().expect("utf-8");

    // What the agent made: its directory 0750 and the socket 0600, both root's.
    let run = socket.parent().expect("dir");
    assert_eq!(
        owner_and_mode(run),
        ("0750".into(), 0, 0),
        "{}",
        run.display()
    );
    assert_eq!(
        owner_and_mode(&socket),
        ("0600".into(), 0, 0),
        "{}",
        socket.display()
    );

    // The attack: nobody applies an allow-all policy. The directory keeps it out.
    chmod(dir.path(), 0o755);
    let (code, out) = apply_as(65534, 65534, &endpoint, policy);
    assert_eq!(code, Some(69), "uid 65534 reached the API: {out}");
    assert!(out.contains("Permission denied"), "{out}");
    // The socket's mode alone keeps it out.
    chmod(run, 0o755);
    let (code, out) = apply_as(65534, 65534, &endpoint, policy);
    assert_eq!(code, Some(69), "uid 65534 reached the API: {out}");
    assert!(out.contains("Permission denied"), "{out}");
    // And the peer-credential check alone: with the socket made world-writable behind the
    // agent's back, nobody connects but is cut off before a byte is read.
    chmod(&socket, 0o666);
    let (code, out) = apply_as(65534, 65534, &endpoint, policy);
    assert_eq!(
        code,
        Some(69),
        "uid 65534 got past the peer-credential check: {out}"
    );
    assert!(
        out.contains("admits root and members of agent.api_socket_group only"),
        "{out}"
    );
    let logs = agent.logs();
    assert!(
        logs.contains("refused a connection to the API socket")
            && logs.contains("uid 65534 gid 65534")
            && logs.contains("is not root"),
        "{logs}"
    );
    let (code, out) = apply_as(STRANGER.0, STRANGER.1, &endpoint, policy);
    assert_eq!(
        code,
        Some(69),
        "uid {} got past the peer-credential check: {out}",
        STRANGER.0
    );
    assert_eq!(live_generation(&endpoint), 1, "the policy changed");

    // Root may.
    let (code, out) = apply_as(0, 0, &endpoint, policy);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(live_generation(&endpoint), 2);

    // On exit the socket goes; a stale one (kill -9) is replaced on the next start.
    let (status, _) = agent.sigterm();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the socket outlived the agent");
}

#[test]
fn kernel_the_api_socket_admits_its_group_and_refuses_others() {
    if !kernel_available("kernel_the_api_socket_admits_its_group_and_refuses_others") {
        return;
    }
    // The group of gid 65534 (nogroup on Debian), with uid 65534 in it.
    let out = Command::new("getent")
        .args(["group", "65534"])
        .output()
        .expect("getent");
    let group = String::from_utf8_lossy(&out.stdout)
        .split(':')
        .next()
        .expect("group name")
        .to_owned();
    assert!(!group.is_empty(), "no group with gid 65534");
    let cg = TestCgroup::new("api-group");
    let pins = TestPins::new("api-group");
    let dir = tempfile::tempdir().expect("tempdir");
    chmod(dir.path(), 0o755);
    let socket = dir.path().join("run").join("agent.sock");
    let config = write_config_with(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "api_socket = \"{}\"\napi_socket_group = \"{group}\"\n",
            socket.display()
        ),
        "",
    );
    let agent = Agent::start(&config);
    let endpoint = agent.endpoint();
    assert_eq!(agent.grpc_socket(), socket);
    assert_eq!(
        owner_and_mode(socket.parent().expect("dir")),
        ("0750".into(), 0, 65534)
    );
    assert_eq!(owner_and_mode(&socket), ("0660".into(), 0, 65534));
    let public = public_dir();
    let policy = allow_all_policy(public.path());
    let policy = policy.to_str().expect("utf-8");

    // A member (primary group) may; someone else may not, by mode, then by credentials.
    let (code, out) = apply_as(65534, 65534, &endpoint, policy);
    assert_eq!(code, Some(0), "a member of {group} was refused: {out}");
    assert_eq!(live_generation(&endpoint), 2);
    let (code, out) = apply_as(STRANGER.0, STRANGER.1, &endpoint, policy);
    assert_eq!(code, Some(69), "{out}");
    assert!(out.contains("Permission denied"), "{out}");
    chmod(socket.parent().expect("dir"), 0o755);
    chmod(&socket, 0o666);
    let (code, out) = apply_as(STRANGER.0, STRANGER.1, &endpoint, policy);
    assert_eq!(code, Some(69), "{out}");
    assert_eq!(live_generation(&endpoint), 2, "the policy changed");
    let logs = agent.logs();
    assert!(
        logs.contains(&format!("uid {} gid {}", STRANGER.0, STRANGER.1))
            && logs.contains(&format!("neither root nor in group {group}")),
        "{logs}"
    );
    // A member by a supplementary group only.
    let out = Command::new("setpriv")
        .arg(format!("--reuid={}", STRANGER.0))
        .arg(format!("--regid={}", STRANGER.1))
        .arg("--groups=65534")
        .args([BIN, "policy", "rollback", "--endpoint", &endpoint])
        .output()
        .expect("setpriv");
    assert!(
        out.status.success(),
        "a supplementary member of {group} was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(live_generation(&endpoint), 3);
}

#[test]
fn kernel_the_api_socket_path_refuses_symlinks_and_other_files() {
    if !kernel_available("kernel_the_api_socket_path_refuses_symlinks_and_other_files") {
        return;
    }
    let cg = TestCgroup::new("api-socket-path");
    let pins = TestPins::new("api-socket-path");
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    std::fs::create_dir(&run).expect("mkdir");
    chmod(&run, 0o750);
    let socket = run.join("agent.sock");
    let config = write_config(dir.path(), &cg.path, &pins.root, "");
    let run_agent = || {
        let out = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A regular file, and a symlink (to a file that must stay), are refused and left alone.
    let target = dir.path().join("precious");
    std::fs::write(&target, "keep").expect("write");
    for planted in ["file", "symlink"] {
        if planted == "file" {
            std::fs::write(&socket, "not a socket").expect("write");
        } else {
            std::os::unix::fs::symlink(&target, &socket).expect("symlink");
        }
        let (code, stderr) = run_agent();
        assert_eq!(code, Some(64), "{planted}: {stderr}");
        let says = if planted == "file" {
            "is a regular file, not a socket"
        } else {
            "is a symlink"
        };
        assert!(
            stderr.contains("agent.api_socket") && stderr.contains(says),
            "{planted}: {stderr}"
        );
        assert!(
            std::fs::symlink_metadata(&socket).is_ok(),
            "{planted} removed"
        );
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep");
        assert!(
            !pins.root.join("v1").exists(),
            "{planted}: something was pinned"
        );
        std::fs::remove_file(&socket).expect("rm");
    }
    // A directory for the socket that others may write is refused.
    chmod(&run, 0o777);
    let (code, stderr) = run_agent();
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("writable by group or others"), "{stderr}");
    chmod(&run, 0o750);
    // A stale socket (an agent killed with -9) is replaced.
    let agent = Agent::start(&config);
    agent.kill9();
    assert!(socket.exists(), "kill -9 leaves the socket");
    let agent = Agent::start(&config);
    let generation = live_generation(&agent.endpoint());
    // A second agent on a live socket is refused, and the first keeps it. (Its own pin root:
    // on the same one it would be refused earlier, for the pins.)
    let other = tempfile::tempdir().expect("tempdir");
    let other_pins = TestPins::new("api-socket-path-2");
    let other_config = write_config_with(
        other.path(),
        &cg.path,
        &other_pins.root,
        &format!("api_socket = \"{}\"\n", socket.display()),
        "",
    );
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&other_config)
        .output()
        .expect("run");
    let (code, stderr) = (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("another process is serving on it"),
        "{stderr}"
    );
    assert_eq!(live_generation(&agent.endpoint()), generation);
}

/// Runs `cmd ARGS` as uid/gid 65534 (nobody); panics unless it succeeds.
fn as_nobody(cmd: &str, args: &[&str]) {
    use std::os::unix::process::CommandExt;
    let out = Command::new(cmd)
        .args(args)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody");
    assert!(
        out.status.success(),
        "{cmd} {args:?} as nobody: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Certificate, key and CA files of the file identity source, and the `[spiffe]` table using them.
fn identity_files(dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let ca = support::spire::TestCa::new("knhk.test");
    let svid = ca.issue("/agent", Duration::from_secs(3600));
    let (cert, key, bundle) = (
        dir.join("svid.pem"),
        dir.join("svid.key"),
        dir.join("bundle.pem"),
    );
    std::fs::write(&cert, &svid.cert_pem).expect("cert");
    std::fs::write(&key, &svid.key_pem).expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(&bundle, &ca.bundle_pem).expect("bundle");
    format!(
        "[spiffe]\nenabled = true\ntrust_domain = \"knhk.test\"\nsource = \"files\"\n\
         cert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
        cert.display(),
        key.display(),
        bundle.display()
    )
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .collect()
}

#[test]
fn kernel_file_identity_ignores_a_predictable_directory_planted_by_a_local_user() {
    if !kernel_available(
        "kernel_file_identity_ignores_a_predictable_directory_planted_by_a_local_user",
    ) {
        return;
    }
    planted_identity_dir(false);
}

#[test]
fn kernel_file_identity_ignores_a_predictable_symlink_planted_by_a_local_user() {
    if !kernel_available(
        "kernel_file_identity_ignores_a_predictable_symlink_planted_by_a_local_user",
    ) {
        return;
    }
    planted_identity_dir(true);
}

/// The agent's private identity directories under `state_dir`.
fn identity_dirs(state_dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = entries(state_dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("identity-"))
        })
        .collect();
    dirs.sort();
    dirs
}

/// Starts the agent with a file identity after uid 65534 planted a directory (or a symlink to a
/// root-owned directory) at the path the agent used to pick for its private Workload API socket.
fn planted_identity_dir(symlink: bool) {
    let name = if symlink {
        "identity-symlink"
    } else {
        "identity-dir"
    };
    let cg = TestCgroup::new(name);
    let pins = TestPins::new(name);
    let dir = tempfile::tempdir().expect("tempdir");
    // A free port, not [spiffe]'s default 50051: tests (and other agents) run side by side.
    let config = write_config_with(
        dir.path(),
        &cg.path,
        &pins.root,
        "listen_address = \"127.0.0.1:0\"\n",
        &identity_files(dir.path()),
    );
    // A root-owned directory the symlink variant points at.
    let victim = public_dir();
    let mut planted = PathBuf::new();
    let agent = Agent::start_after(&config, |pid| {
        // The attack: before the agent starts, nobody creates the directory the agent would
        // have used (the old predictable path), or a symlink there to a root-owned one.
        planted = std::env::temp_dir().join(format!("knhk-identity-{pid}"));
        let p = planted.to_str().expect("utf-8");
        if symlink {
            as_nobody("ln", &["-s", victim.path().to_str().expect("utf-8"), p]);
        } else {
            as_nobody("mkdir", &["-m", "0777", p]);
        }
    });
    let ready = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        agent.get("/readyz").contains("200 OK")
    });
    // Neither the planted directory nor the symlink's target was used or changed.
    if symlink {
        assert_eq!(
            owner_and_mode(victim.path()),
            ("0755".into(), 0, 0),
            "the agent changed the root-owned directory the planted symlink points at"
        );
        assert_eq!(
            entries(victim.path()),
            Vec::<PathBuf>::new(),
            "the agent put its socket in the symlink's target"
        );
    } else {
        assert_eq!(
            owner_and_mode(&planted),
            ("0777".into(), 65534, 65534),
            "the agent took over the attacker's directory"
        );
        assert_eq!(
            entries(&planted),
            Vec::<PathBuf>::new(),
            "the agent put its Workload API socket in a directory uid 65534 owns"
        );
    }
    let what = if symlink { "symlink" } else { "directory" };
    assert!(
        ready,
        "{what} variant: the agent is not ready: {}",
        agent.get("/readyz")
    );
    // The agent's socket is in a fresh 0700 directory of root's under agent.state_dir, which
    // nobody can write.
    let state = dir.path().join("state");
    assert_eq!(owner_and_mode(&state), ("0700".into(), 0, 0));
    let private = identity_dirs(&state);
    assert_eq!(private.len(), 1, "{private:?}");
    assert_eq!(owner_and_mode(&private[0]), ("0700".into(), 0, 0));
    assert_eq!(entries(&private[0]), vec![private[0].join("workload.sock")]);
    assert!(
        agent.logs().contains("SVID received"),
        "the identity came from the agent's own socket"
    );
    drop(agent);
    let _ = std::fs::remove_file(&planted);
    let _ = std::fs::remove_dir_all(&planted);
}

#[test]
fn kernel_an_unsafe_state_dir_is_refused_before_anything_is_attached() {
    if !kernel_available("kernel_an_unsafe_state_dir_is_refused_before_anything_is_attached") {
        return;
    }
    let cg = TestCgroup::new("state-dir");
    let pins = TestPins::new("state-dir");
    let dir = tempfile::tempdir().expect("tempdir");
    chmod(dir.path(), 0o755);
    let spiffe = identity_files(dir.path());
    let run_with = |state_dir: &Path| {
        let config = write_config_with(
            dir.path(),
            &cg.path,
            &pins.root,
            "listen_address = \"127.0.0.1:0\"\n",
            &spiffe,
        );
        // write_config_with sets state_dir = DIR/state: point it elsewhere.
        let text = std::fs::read_to_string(&config).expect("read").replace(
            &format!("state_dir = \"{}\"", dir.path().join("state").display()),
            &format!("state_dir = \"{}\"", state_dir.display()),
        );
        std::fs::write(&config, text).expect("write");
        let out = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Made by uid 65534 (who could swap the socket in it), world-writable, a symlink.
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    chmod(&theirs, 0o700);
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    chmod(&open, 0o777);
    let real = dir.path().join("real");
    std::fs::create_dir(&real).expect("mkdir");
    chmod(&real, 0o700);
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    for (state_dir, says) in [
        (&theirs, "is owned by uid 65534, not by root"),
        (&open, "has mode 0777: it is writable by group or others"),
        (&link, "is a symlink: refusing to follow it"),
    ] {
        let (code, stderr) = run_with(state_dir);
        assert_eq!(code, Some(64), "{}: {stderr}", state_dir.display());
        assert!(
            stderr.contains("agent.state_dir") && stderr.contains(says),
            "{}: {stderr}",
            state_dir.display()
        );
        assert!(
            entries(state_dir).is_empty(),
            "{} was used",
            state_dir.display()
        );
        assert!(!pins.root.join("v1").exists(), "something was pinned");
    }
    assert!(entries(&real).is_empty(), "the symlink was followed");
    // A relative state_dir is a configuration error.
    let (code, stderr) = run_with(Path::new("var/lib/knhk"));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("agent.state_dir") && stderr.contains("must be an absolute path"),
        "{stderr}"
    );

    // A good one: a run killed with -9 leaves its directory; the next run removes it.
    let config = write_config_tcp(dir.path(), &cg.path, &pins.root, &spiffe);
    let state = dir.path().join("state");
    let agent = Agent::start(&config);
    let first = identity_dirs(&state);
    assert_eq!(first.len(), 1, "{first:?}");
    agent.kill9();
    let agent = Agent::start(&config);
    let second = identity_dirs(&state);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(first, second, "a run reused an old directory");
    let (status, _) = agent.sigterm();
    assert!(status.success(), "{status}");
    assert_eq!(
        identity_dirs(&state),
        Vec::<PathBuf>::new(),
        "removed on exit"
    );
}
