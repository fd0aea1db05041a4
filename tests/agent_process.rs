//! Kernel tests of the `knhk-agent` process (need root, cgroup v2 and BPF): the real binary,
//! started, killed with SIGKILL and restarted, against a throwaway cgroup and pin directory.

mod support;

use aya::maps::{lpm_trie::LpmTrie, HashMap as BpfHashMap, Map, MapData};
use knhk_abi::{map_names, LpmKeyV4, RuleLeaf, ScopeKey, ScopeValue, ABI_VERSION};
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_knhk-agent");

/// A running agent; killed (SIGKILL) on drop if still running.
struct Agent {
    child: Child,
    metrics: SocketAddr,
    stderr: mpsc::Receiver<String>,
}

impl Agent {
    fn start(config: &Path) -> Agent {
        let mut child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn knhk-agent");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.trim().strip_prefix("metrics  http://") {
                    let _ = tx.send(rest.trim_end_matches("/metrics").to_owned());
                }
            }
        });
        let (etx, erx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                let _ = etx.send(line);
            }
        });
        let metrics = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("metrics address"),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().expect("wait");
                panic!("agent did not start ({status})");
            }
        };
        Agent {
            child,
            metrics,
            stderr: erx,
        }
    }

    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    fn logs(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }

    fn get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.metrics).expect("connect to admin server");
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("response");
        body
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, cgroup_root: &Path, pin_root: &Path, rules: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    let text = format!(
        "[agent]\ncgroup_root = \"{}\"\npin_root = \"{}\"\nmetrics_address = \"127.0.0.1:0\"\ncgroup_poll_interval_ms = 10\n{rules}",
        cgroup_root.display(),
        pin_root.display()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

fn deny_rule(port: u16) -> String {
    format!("[[policy.rules]]\nname = \"block\"\naction = \"deny\"\ncidrs = [\"127.0.0.1/32\"]\nports = [\"{port}\"]\n")
}

#[test]
fn kernel_enforcement_survives_kill9_and_restart_readopts() {
    if !kernel_available("kernel_enforcement_survives_kill9_and_restart_readopts") {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("kill9");
    let pins = TestPins::new("kill9");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, &deny_rule(target.port()));

    let agent = Agent::start(&config);
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    assert!(agent.get("/readyz").contains("200 OK"), "ready");
    agent.kill9();
    assert_eq!(
        tcp_connect_from(&cg.path, target),
        Outcome::Denied,
        "enforcement continues with the agent dead"
    );

    let agent = Agent::start(&config);
    assert_eq!(
        tcp_connect_from(&cg.path, target),
        Outcome::Denied,
        "and after the restart"
    );
    let metrics = agent.get("/metrics");
    assert!(
        metrics.contains("knhk_policy_generation 2"),
        "the restart continues the generation count:\n{metrics}"
    );
    assert!(
        metrics.contains("knhk_connect_decisions_total{action=\"deny\",class=\"C1\"} 3"),
        "decision counters survive in the pinned maps:\n{metrics}"
    );
    assert!(
        agent.logs().contains("re-adopted pinned maps"),
        "the restart says it re-adopted"
    );
    // Exactly one link per program: the restart replaced the programs, it did not stack them.
    let links: Vec<_> = std::fs::read_dir(pins.root.join(format!("v{ABI_VERSION}/links")))
        .expect("links")
        .collect();
    assert_eq!(links.len(), 3);
    agent.kill9();
}

#[test]
fn kernel_pin_with_a_different_abi_is_refused() {
    if !kernel_available("kernel_pin_with_a_different_abi_is_refused") {
        return;
    }
    let cg = TestCgroup::new("abi");
    let pins = TestPins::new("abi");
    let maps = pins.root.join(format!("v{ABI_VERSION}/maps"));
    std::fs::create_dir_all(&maps).expect("pin dir");
    // An LPM trie of the right name but a different value size, as an incompatible build would
    // leave it.
    let name = std::ffi::CString::new("KNHK_POLICY_V4").expect("name");
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: size_of::<libbpf_sys::bpf_map_create_opts>() as _,
        map_flags: 1, // BPF_F_NO_PREALLOC
        ..Default::default()
    };
    let fd = unsafe {
        libbpf_sys::bpf_map_create(
            libbpf_sys::BPF_MAP_TYPE_LPM_TRIE,
            name.as_ptr(),
            4 + 24,
            64,
            16,
            &opts,
        )
    };
    assert!(fd >= 0, "bpf_map_create: {fd}");
    let path =
        std::ffi::CString::new(maps.join("KNHK_POLICY_V4").to_str().expect("utf8")).expect("path");
    assert_eq!(
        unsafe { libbpf_sys::bpf_obj_pin(fd, path.as_ptr()) },
        0,
        "pin"
    );
    unsafe { libc::close(fd) };

    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, "");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("does not match this agent's map ABI"),
        "{stderr}"
    );
    assert!(
        stderr.contains("value size is 64, expected 388"),
        "{stderr}"
    );
    assert!(
        !pins
            .root
            .join(format!("v{ABI_VERSION}/links/knhk_connect4"))
            .exists(),
        "nothing was attached"
    );
}

#[test]
fn kernel_invalid_config_exits_before_touching_the_kernel() {
    if !kernel_available("kernel_invalid_config_exits_before_touching_the_kernel") {
        return;
    }
    let cg = TestCgroup::new("badcfg");
    let pins = TestPins::new("badcfg");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        "[[policy.rules]]\nname = \"bad\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/33\"]\n",
    );
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("line 9"), "names the line: {stderr}");
    assert!(
        stderr.contains("\"10.0.0.0/33\" is not a valid prefix: length 33 exceeds 32 for IPv4"),
        "{stderr}"
    );
    assert!(!pins.root.exists(), "no pins were created");
}

fn scope_entries(pin_root: &Path, cgroup_id: u64) -> (usize, usize) {
    let maps = pin_root.join(format!("v{ABI_VERSION}/maps"));
    let open = |name: &str| {
        Map::from_map_data(MapData::from_pin(maps.join(name)).expect("pin")).expect("map")
    };
    let scopes: BpfHashMap<MapData, ScopeKey, ScopeValue> =
        BpfHashMap::try_from(open(map_names::SCOPES)).expect("scopes");
    let trie: LpmTrie<MapData, LpmKeyV4, RuleLeaf> =
        LpmTrie::try_from(open(map_names::POLICY_V4)).expect("trie");
    let s = scopes
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.cgroup_id == cgroup_id)
        .count();
    let t = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.data().scope == cgroup_id)
        .count();
    (s, t)
}

#[test]
fn kernel_cgroup_created_after_the_policy_is_enforced_and_removal_leaves_nothing() {
    if !kernel_available(
        "kernel_cgroup_created_after_the_policy_is_enforced_and_removal_leaves_nothing",
    ) {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("late");
    let pins = TestPins::new("late");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = format!(
        "[[policy.rules]]\nname = \"late-pod\"\naction = \"deny\"\ncgroup = \"late\"\ncidrs = [\"127.0.0.0/8\"]\nports = [\"{}\"]\n",
        target.port()
    );
    let config = write_config(dir.path(), &cg.path, &pins.root, &rules);
    let agent = Agent::start(&config);

    let late = cg.path.join("late");
    let created = Instant::now();
    std::fs::create_dir(&late).expect("mkdir");
    let id = TestCgroup::id_of(&late);
    let enforced_after = loop {
        if tcp_connect_from(&late, target) == Outcome::Denied {
            break created.elapsed();
        }
        assert!(created.elapsed() < Duration::from_secs(5), "never enforced");
    };
    eprintln!(
        "cgroup enforced {} ms after creation",
        enforced_after.as_millis()
    );
    assert!(
        enforced_after < Duration::from_millis(100),
        "enforced after {enforced_after:?}"
    );
    assert_eq!(scope_entries(&pins.root, id), (1, 1));

    std::fs::remove_dir(&late).expect("rmdir");
    let removed = Instant::now();
    while scope_entries(&pins.root, id) != (0, 0) {
        assert!(
            removed.elapsed() < Duration::from_secs(2),
            "stale entries: {:?}",
            scope_entries(&pins.root, id)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(agent.logs().contains("rule cgroup removed"));
    drop(agent);
}

/// A real Prometheus server scraping `target` every second; stopped on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: knhk\n    static_configs:\n      - targets: ['{target}']\n"),
        )
        .expect("write prometheus.yml");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (Debian package prometheus; cargo xtask setup installs it)");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The value of an instant PromQL query with one result, if it has one.
    fn query(&self, promql: &str) -> Option<f64> {
        let mut enc = String::new();
        for b in promql.bytes() {
            match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => enc.push(b as char),
                _ => enc.push_str(&format!("%{b:02X}")),
            }
        }
        let mut s = TcpStream::connect(self.addr).ok()?;
        write!(
            s,
            "GET /api/v1/query?query={enc} HTTP/1.0\r\nHost: x\r\n\r\n"
        )
        .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        let json: serde_json::Value = serde_json::from_str(body.split("\r\n\r\n").nth(1)?).ok()?;
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn kernel_metrics_are_scraped_by_a_real_prometheus_and_lint_clean() {
    if !kernel_available("kernel_metrics_are_scraped_by_a_real_prometheus_and_lint_clean") {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("prom");
    let pins = TestPins::new("prom");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &cg.path, &pins.root, &deny_rule(target.port()));
    let agent = Agent::start(&config);
    for _ in 0..5 {
        assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    }

    // promtool lints the exposition as served.
    let response = agent.get("/metrics");
    let body = response.split("\r\n\r\n").nth(1).expect("body");
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let out = lint.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let prom = Prometheus::start(agent.metrics);
    let query = r#"knhk_connect_decisions_total{action="deny",class="C1"}"#;
    let started = Instant::now();
    let value = loop {
        if let Some(v) = prom.query(query) {
            break v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "prometheus never returned {query}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(value, 5.0, "the decisions the test's connects produced");
    assert_eq!(
        prom.query(r#"knhk_rule_hits_total{rule="block"}"#),
        Some(5.0)
    );
    assert_eq!(prom.query("up"), Some(1.0));
}
