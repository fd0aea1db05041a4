//! `cargo xtask soak`: the agent's idle cost by policy size, and a soak under steady activity
//! (needs root). Each agent attaches to a throwaway cgroup with a private pin root.
//!
//! 1. **Idle cost** at 1, 10,000 and 100,000 rules (the documented maximum), for two service
//!    sets: `minimal` (metrics, the gRPC API and the cgroup follower) and `full` (also the beat
//!    engine with `[slo]` defaults and a receipts ledger signed with a file key). A fresh agent
//!    per size (nobody scraping) gets a generated policy whose every rule names its own cgroup
//!    (`t<i % 100>/w<i>`; the 100 parents and the first 1,000 rule cgroups exist, the rest are
//!    pending), settles 10 s, then its CPU time (`/proc/<pid>/stat` utime + stime, all threads)
//!    is read over a window (60 s by default) as a percentage of one core, with its RSS. RSS is
//!    fitted as baseline + bytes per rule (least squares).
//! 2. **Soak** for `--minutes`: two nodes in two regions pushing their checkpoints to a witness
//!    (`knhk-agent witness`; full services);
//!    the measured one gets steady connects from four cgroups (allowed and denied), a policy
//!    apply every 30 s, a legal hold placed and the previous one released every 60 s, a rule
//!    cgroup made and removed every 10 s, and scrapes every 5 s. Every 10 s a row goes to
//!    `soak.csv`: RSS, CPU, fds, threads, inotify watches, BPF map entries and ledger size. RSS
//!    and fds are fitted against time after a warm-up: growth within noise is a pass. Before the
//!    window, the measured agent's ledger is filled past its page cache (legal holds placed and
//!    released), so that the window sees the steady state and not the cache filling.
//!
//! Arguments: `--out DIR`, `--minutes N` (0: no soak), `--idle-window-secs S`, `--idle-sizes
//! 1,10000,100000` (empty: none), `--idle-services minimal,full`, `--agent PATH` (another build,
//! e.g. a baseline), `--label NAME` (the idle rows go to `idle-<label>.csv`), `--check` (exit 1
//! when a goal is missed), `--prefill-ledger-mib N` (default 16: legal holds placed and released
//! until the measured agent's ledger holds N MiB, before the window; 0: none).

#[path = "../../tests/support/mod.rs"]
mod support;

use knhk_agent::api::{
    pb::{self, policy_service_client::PolicyServiceClient},
    receipts::pb as rpb,
};
use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use support::*;

/// Idle CPU budget, percent of one core.
const IDLE_CPU_MAX: f64 = 0.5;
/// Baseline RSS budget.
const BASELINE_RSS_MAX: f64 = 32.0 * 1024.0 * 1024.0;
/// Rule cgroups that exist in the idle measurement (the rest are pending).
const EXISTING_RULE_CGROUPS: usize = 1_000;
/// Parents the rule cgroups are spread over.
const PARENTS: usize = 100;

struct Args {
    out: PathBuf,
    minutes: f64,
    idle_window: Duration,
    idle_sizes: Vec<usize>,
    agent: PathBuf,
    label: String,
    /// Which service sets the idle measurement runs: `false` minimal, `true` full.
    idle_services: Vec<bool>,
    check: bool,
    /// Before the soak's window, legal holds are placed and released until the measured agent's
    /// ledger directory holds this many MiB (0: no prefill).
    prefill_ledger_mib: u64,
}

fn args() -> Args {
    let mut a = Args {
        out: PathBuf::from("target/soak"),
        minutes: 10.0,
        idle_window: Duration::from_secs(60),
        idle_sizes: vec![1, 10_000, 100_000],
        agent: std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.parent()?.join("knhk-agent")))
            .unwrap_or_else(|| PathBuf::from("knhk-agent")),
        label: "this-build".into(),
        idle_services: vec![false, true],
        check: false,
        prefill_ledger_mib: 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--out" => a.out = PathBuf::from(v()),
            "--minutes" => a.minutes = v().parse().expect("--minutes: a number"),
            "--idle-window-secs" => {
                a.idle_window =
                    Duration::from_secs(v().parse().expect("--idle-window-secs: a number"))
            }
            "--idle-sizes" => {
                a.idle_sizes = v()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse().expect("--idle-sizes: numbers"))
                    .collect()
            }
            "--agent" => a.agent = PathBuf::from(v()),
            "--label" => a.label = v(),
            "--idle-services" => {
                a.idle_services = v()
                    .split(',')
                    .map(|s| match s {
                        "minimal" => false,
                        "full" => true,
                        other => panic!("--idle-services: minimal or full, not {other}"),
                    })
                    .collect()
            }
            "--check" => a.check = true,
            "--prefill-ledger-mib" => {
                a.prefill_ledger_mib = v().parse().expect("--prefill-ledger-mib: a number")
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// CPU time (utime + stime) of `pid`, all threads, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/pid/stat");
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the command.
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

fn count_dir(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// inotify watches the process holds (from its fds' fdinfo).
fn inotify_watches(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|s| s.lines().filter(|l| l.starts_with("inotify wd:")).count())
        .sum()
}

/// Starts `bin` on `config` (logs at warn, to this process's stderr).
fn start(bin: &Path, config: &Path) -> Agent {
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    Agent::attach(child)
}

fn stop(agent: Agent) {
    let (status, took) = agent.sigterm();
    if !status.success() {
        eprintln!("soak: the agent exited with {status} after {took:?}");
    }
}

/// `[agent]` (metrics, the gRPC API on loopback) and, with `services`, the beat engine
/// (`[slo]`, defaults) and a receipts ledger signed with a file key (`[kms]`); then `extra`.
fn config(dir: &Path, cg: &Path, pins: &Path, grpc: &str, services: bool, extra: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    let services = if services {
        format!(
            "[slo]\n[kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n\
             [receipts]\npath = \"{}\"\nnode = \"soak\"\n",
            dir.join("keys").display(),
            dir.join("receipts.redb").display(),
        )
    } else {
        String::new()
    };
    let text = format!(
        "[agent]\ncgroup_root = \"{}\"\npin_root = \"{}\"\nmetrics_address = \"127.0.0.1:0\"\n\
         listen_address = \"{grpc}\"\nstate_dir = \"{}\"\ndetach_on_exit = true\n\
         max_request_bytes = 67108864\n{services}{extra}",
        cg.display(),
        pins.display(),
        dir.join("state").display(),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn apply(grpc: &str, doc: pb::PolicyDocument) -> u64 {
    let mut c = PolicyServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect")
        .max_encoding_message_size(64 << 20);
    c.apply_policy(pb::ApplyPolicyRequest {
        policy: Some(doc),
        expected_generation: None,
    })
    .await
    .expect("apply")
    .into_inner()
    .generation
}

/// The idle policy: rule `i` denies one address from its own cgroup `t<i % 100>/w<i>`.
fn idle_policy(rules: usize) -> pb::PolicyDocument {
    pb::PolicyDocument {
        rules: (0..rules)
            .map(|i| pb::Rule {
                name: format!("r{i}"),
                action: pb::Action::Deny as i32,
                cgroup: format!("t{}/w{i}", i % PARENTS),
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

struct IdleRow {
    services: bool,
    rules: usize,
    cpu_pct: f64,
    rss: u64,
    fds: usize,
    watches: usize,
}

fn idle(a: &Args, services: bool) -> Vec<IdleRow> {
    let mut rows = Vec::new();
    for &rules in &a.idle_sizes {
        let cg = TestCgroup::new("soak-idle");
        for p in 0..PARENTS {
            cg.child(&format!("t{p}"));
        }
        for i in 0..rules.min(EXISTING_RULE_CGROUPS) {
            cg.child(&format!("t{}/w{i}", i % PARENTS));
        }
        let pins = TestPins::new("soak-idle");
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(
            dir.path(),
            &cg.path,
            &pins.root,
            "127.0.0.1:0",
            services,
            "",
        );
        let agent = start(&a.agent, &cfg);
        let pid = agent.child.id();
        let applied = Instant::now();
        rt().block_on(apply(&agent.grpc, idle_policy(rules)));
        let apply_took = applied.elapsed();
        // Settle: the switch's retired slot reclaimed, allocations returned.
        std::thread::sleep(Duration::from_secs(10));
        let c0 = cpu_seconds(pid);
        let t0 = Instant::now();
        std::thread::sleep(a.idle_window);
        let cpu_pct = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0;
        let (rss, _) = memory_of(pid);
        let row = IdleRow {
            services,
            rules,
            cpu_pct,
            rss,
            fds: count_dir(&format!("/proc/{pid}/fd")),
            watches: inotify_watches(pid),
        };
        println!(
            "idle  {:<7} {:>7} rules  CPU {:>6.3} % of a core over {} s  RSS {:>7.1} MiB  fds {:>3}  inotify watches {:>4}  (apply took {:.1} s)",
            services_name(services),
            rules,
            row.cpu_pct,
            a.idle_window.as_secs(),
            rss as f64 / 1048576.0,
            row.fds,
            row.watches,
            apply_took.as_secs_f64()
        );
        rows.push(row);
        stop(agent);
    }
    rows
}

/// Least squares y = a + b·x: (a, b, standard error of b).
fn fit(points: &[(f64, f64)]) -> (f64, f64, f64) {
    let n = points.len() as f64;
    if n < 2.0 {
        return (points.first().map_or(0.0, |p| p.1), 0.0, f64::INFINITY);
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let b = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let a0 = my - b * mx;
    let sse: f64 = points.iter().map(|p| (p.1 - a0 - b * p.0).powi(2)).sum();
    let se = if n > 2.0 && sxx > 0.0 {
        (sse / (n - 2.0) / sxx).sqrt()
    } else {
        f64::INFINITY
    };
    (a0, b, se)
}

fn goal(name: &str, met: bool, detail: &str, missed: &mut Vec<String>) {
    println!(
        "GOAL {name}: {} ({detail})",
        if met { "MET" } else { "MISSED" }
    );
    if !met {
        missed.push(name.to_owned());
    }
}

fn services_name(services: bool) -> &'static str {
    if services {
        "full"
    } else {
        "minimal"
    }
}

fn idle_csv(a: &Args, rows: &[IdleRow]) {
    let path = a.out.join(format!("idle-{}.csv", a.label));
    let mut f = std::fs::File::create(&path).expect("idle csv");
    writeln!(f, "services,rules,cpu_pct,rss_bytes,fds,inotify_watches").expect("write");
    for r in rows {
        writeln!(
            f,
            "{},{},{:.4},{},{},{}",
            services_name(r.services),
            r.rules,
            r.cpu_pct,
            r.rss,
            r.fds,
            r.watches
        )
        .expect("write");
    }
}

fn idle_report(rows: &[IdleRow], missed: &mut Vec<String>) {
    let Some(services) = rows.first().map(|r| services_name(r.services)) else {
        return;
    };
    let pts: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (r.rules as f64, r.rss as f64))
        .collect();
    let (base, per_rule, _) = fit(&pts);
    println!(
        "idle  {services}: RSS = {:.1} MiB + {:.0} bytes × rules (least squares over {} sizes)",
        base / 1048576.0,
        per_rule,
        rows.len()
    );
    for r in rows {
        goal(
            &format!(
                "idle CPU <= {IDLE_CPU_MAX} % of a core at {} rules ({services})",
                r.rules
            ),
            r.cpu_pct <= IDLE_CPU_MAX,
            &format!("{:.3} %", r.cpu_pct),
            missed,
        );
    }
    if !rows.is_empty() {
        goal(
            &format!("baseline RSS <= 32 MiB ({services})"),
            base <= BASELINE_RSS_MAX,
            &format!(
                "{:.1} MiB, plus {:.0} bytes per rule",
                base / 1048576.0,
                per_rule
            ),
            missed,
        );
    }
}

/// The soak's policy, generation `g`: connects to `allowed` pass, to `denied` are refused, from
/// each of `cgroups`; the churned cgroup has a rule of its own; `filler` more rules.
fn soak_policy(g: u64, allowed: u16, denied: u16, cgroups: usize) -> pb::PolicyDocument {
    let mut rules: Vec<pb::Rule> = (0..cgroups)
        .map(|i| pb::Rule {
            name: format!("deny-c{i}"),
            action: pb::Action::Deny as i32,
            cgroup: format!("c{i}"),
            cidrs: vec!["127.0.0.0/8".into()],
            ports: vec![denied.to_string()],
            ..Default::default()
        })
        .collect();
    rules.push(pb::Rule {
        name: "allow-loopback".into(),
        action: pb::Action::Allow as i32,
        cidrs: vec!["127.0.0.0/8".into()],
        ports: vec![allowed.to_string()],
        ..Default::default()
    });
    rules.push(pb::Rule {
        name: "churn".into(),
        action: pb::Action::Deny as i32,
        cgroup: "churn/x".into(),
        cidrs: vec!["127.0.0.0/8".into()],
        ports: vec![denied.to_string()],
        ..Default::default()
    });
    // A generation-dependent rule, so that every apply changes the tables.
    rules.push(pb::Rule {
        name: format!("gen-{g}"),
        action: pb::Action::Deny as i32,
        cidrs: vec![format!("10.9.{}.0/24", g % 256)],
        ..Default::default()
    });
    pb::PolicyDocument {
        rules,
        ..Default::default()
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

struct Sample {
    t: f64,
    rss: f64,
    cpu_pct: f64,
    fds: f64,
}

type HoldClient = rpb::hold_service_client::HoldServiceClient<tonic::transport::Channel>;

/// Places a legal hold for `case_id`; returns its id.
async fn place_hold(c: &mut HoldClient, case_id: String) -> u64 {
    c.place_hold(rpb::PlaceHoldRequest {
        hold: Some(rpb::Hold {
            case_id,
            reason: "soak".into(),
            kind: "policy_switch".into(),
            ..Default::default()
        }),
    })
    .await
    .expect("place hold")
    .into_inner()
    .id
}

/// Releases hold `id`.
async fn release_hold(c: &mut HoldClient, id: u64) {
    c.release_hold(rpb::ReleaseHoldRequest {
        id,
        reason: "soak".into(),
    })
    .await
    .expect("release hold");
}

/// Fills the ledger past the size of its page cache (`receipts::ledger`'s 4 MiB) before the
/// soak's window, so that the window sees the agent's steady state rather than the cache filling:
/// four clients place and release legal holds (two receipts each) until `dir` holds `bytes`.
fn prefill(rt: &tokio::runtime::Runtime, grpc: &str, dir: &Path, pid: u32, bytes: u64) {
    use std::sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    };
    let started = Instant::now();
    let (rss_before, _) = memory_of(pid);
    let done = Arc::new(AtomicBool::new(false));
    let holds = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (done, holds, url) = (done.clone(), holds.clone(), format!("http://{grpc}"));
            rt.spawn(async move {
                let mut c = rpb::hold_service_client::HoldServiceClient::connect(url)
                    .await
                    .expect("connect");
                let mut i = 0u64;
                while !done.load(Ordering::Relaxed) {
                    i += 1;
                    let id = place_hold(&mut c, format!("PREFILL-{client}-{i}")).await;
                    release_hold(&mut c, id).await;
                    holds.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // The runtime is single-threaded: the clients run while this waits inside it.
    rt.block_on(async {
        while dir_size(dir) < bytes {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(
                started.elapsed() < Duration::from_secs(1800),
                "the ledger did not reach {} MiB in 30 min",
                bytes >> 20
            );
        }
        done.store(true, Ordering::Relaxed);
        for c in clients {
            c.await.expect("prefill client");
        }
    });
    let (rss_after, _) = memory_of(pid);
    println!(
        "soak  prefill: {} holds placed and released ({} receipts) in {:.0} s, ledger {:.1} MiB; RSS {:.1} -> {:.1} MiB",
        holds.load(Ordering::Relaxed),
        2 * holds.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        dir_size(dir) as f64 / 1048576.0,
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
}

fn soak(a: &Args, missed: &mut Vec<String>) {
    const CGROUPS: usize = 4;
    let minutes = a.minutes;
    let duration = Duration::from_secs_f64(minutes * 60.0);
    let sink = tcp_sink("127.0.0.1:0");
    let denied_port = free_port();
    let denied: SocketAddr = format!("127.0.0.1:{denied_port}").parse().expect("addr");
    // Two nodes in two regions, `a` (measured) and `b`, each on its own cgroup and pins, both
    // pushing their checkpoints to one witness process.
    let (ga, gb) = (free_port(), free_port());
    let witness_port = free_port();
    let witness_dir = tempfile::tempdir().expect("tempdir");
    let mut witness = Command::new(&a.agent)
        .args(["witness", "--name", "witness.soak", "--listen"])
        .arg(format!("127.0.0.1:{witness_port}"))
        .arg("--key-file")
        .arg(witness_dir.path().join("witness.key"))
        .arg("--state")
        .arg(witness_dir.path().join("witness.redb"))
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap_or_else(|e| panic!("spawn the witness: {e}"));
    let mut regions = Vec::new();
    for (name, me) in [("soak-a", ga), ("soak-b", gb)] {
        let cg = TestCgroup::new(name);
        let pins = TestPins::new(name);
        let dir = tempfile::tempdir().expect("tempdir");
        let region = if me == ga { "us-east-1" } else { "eu-west-1" };
        let cfg = config(
            dir.path(),
            &cg.path,
            &pins.root,
            &format!("127.0.0.1:{me}"),
            true,
            &format!(
                "[multi_region]\nregion = \"{region}\"\ncross_region_sync_enabled = true\n\
                 receipt_sync_endpoints = [\"http://127.0.0.1:{witness_port}\"]\nquorum = 1\n"
            ),
        );
        regions.push((cg, pins, dir, cfg));
    }
    let agent_b = start(&a.agent, &regions[1].3);
    let agent_a = start(&a.agent, &regions[0].3);
    let pid = agent_a.child.id();
    let cg = regions[0].0.path.clone();
    let ledger_dir = regions[0].2.path().to_owned();
    let cgroups: Vec<PathBuf> = (0..CGROUPS)
        .map(|i| regions[0].0.child(&format!("c{i}")))
        .collect();
    regions[0].0.child("churn");
    let rt = rt();
    let grpc = agent_a.grpc.clone();
    let mut generation = rt.block_on(apply(
        &grpc,
        soak_policy(0, sink.port(), denied_port, CGROUPS),
    ));
    if a.prefill_ledger_mib > 0 {
        prefill(&rt, &grpc, &ledger_dir, pid, a.prefill_ledger_mib << 20);
    }
    let stop_at = Instant::now() + duration;
    // Steady connects: per cgroup, 40 connects (half allowed, half denied) every second.
    let workers: Vec<_> = cgroups
        .iter()
        .cloned()
        .map(|c| {
            std::thread::spawn(move || {
                let mut totals = LoopCounts::default();
                while Instant::now() < stop_at {
                    let n = tcp_connect_cycle_from(&c, &[sink, denied], 40);
                    totals.connected += n.connected;
                    totals.denied += n.denied;
                    totals.other += n.other;
                    std::thread::sleep(Duration::from_secs(1));
                }
                totals
            })
        })
        .collect();
    // Rule cgroup churn: made, then removed 3 s later, every 10 s.
    let churn = {
        let dir = cg.join("churn/x");
        std::thread::spawn(move || {
            let mut n = 0u64;
            while Instant::now() < stop_at {
                if std::fs::create_dir(&dir).is_ok() {
                    n += 1;
                }
                std::thread::sleep(Duration::from_secs(3));
                let _ = std::fs::remove_dir(&dir);
                std::thread::sleep(Duration::from_secs(7));
            }
            n
        })
    };
    let csv_path = a.out.join("soak.csv");
    let mut csv = std::fs::File::create(&csv_path).expect("soak csv");
    writeln!(
        csv,
        "t_s,rss_bytes,cpu_pct,fds,threads,inotify_watches,map_entries,ledger_bytes,receipts,generation,holds"
    )
    .expect("write");
    println!(
        "soak  {minutes} min: 2 regions, {CGROUPS} cgroups connecting, an apply every 30 s, a hold every 60 s, a rule cgroup churned every 10 s, scrapes every 5 s; samples every 10 s to {}",
        csv_path.display()
    );
    let start_t = Instant::now();
    let mut last_cpu = (start_t, cpu_seconds(pid));
    let mut samples = Vec::new();
    let mut holds = 0u64;
    let mut held: Option<u64> = None;
    let mut tick = 0u64;
    while Instant::now() < stop_at {
        std::thread::sleep(Duration::from_secs(5));
        tick += 1;
        // Scrapes (both regions), every 5 s.
        let body = http_get(agent_a.metrics, "/metrics");
        let _ = http_get(agent_a.metrics, "/readyz");
        let _ = http_get(agent_b.metrics, "/metrics");
        if tick.is_multiple_of(6) {
            generation = rt.block_on(apply(
                &grpc,
                soak_policy(generation + 1, sink.port(), denied_port, CGROUPS),
            ));
        }
        if tick.is_multiple_of(12) {
            let placed = rt.block_on(async {
                let mut c =
                    rpb::hold_service_client::HoldServiceClient::connect(format!("http://{grpc}"))
                        .await
                        .expect("connect");
                let id = place_hold(&mut c, format!("SOAK-{tick}")).await;
                if let Some(prev) = held {
                    release_hold(&mut c, prev).await;
                }
                id
            });
            held = Some(placed);
            holds += 1;
        }
        if tick.is_multiple_of(2) {
            let now = Instant::now();
            let cpu = cpu_seconds(pid);
            let cpu_pct = (cpu - last_cpu.1) / now.duration_since(last_cpu.0).as_secs_f64() * 100.0;
            last_cpu = (now, cpu);
            let (rss, _) = memory_of(pid);
            let t = start_t.elapsed().as_secs_f64();
            let fds = count_dir(&format!("/proc/{pid}/fd"));
            let row = format!(
                "{t:.0},{rss},{cpu_pct:.3},{fds},{},{},{},{},{},{generation},{holds}",
                count_dir(&format!("/proc/{pid}/task")),
                inotify_watches(pid),
                metric_sum(&body, "knhk_bpf_map_entries"),
                dir_size(&ledger_dir),
                metric_sum(&body, "knhk_receipts_appended_total"),
            );
            writeln!(csv, "{row}").expect("write");
            csv.flush().expect("flush");
            samples.push(Sample {
                t,
                rss: rss as f64,
                cpu_pct,
                fds: fds as f64,
            });
        }
    }
    let mut totals = LoopCounts::default();
    for w in workers {
        let n = w.join().expect("connect worker");
        totals.connected += n.connected;
        totals.denied += n.denied;
        totals.other += n.other;
    }
    let churned = churn.join().expect("churn");
    println!(
        "soak  connects: {} admitted, {} denied, {} other; {} rule cgroups made and removed; generation {generation}; {holds} holds",
        totals.connected, totals.denied, totals.other, churned
    );
    stop(agent_a);
    stop(agent_b);
    let _ = witness.kill();
    let _ = witness.wait();
    // Fit after a warm-up (the first fifth, at most 5 minutes): allocator pools and the
    // ledger's caches fill first.
    let warm = (duration.as_secs_f64() / 5.0).min(300.0);
    let steady: Vec<&Sample> = samples.iter().filter(|s| s.t >= warm).collect();
    let span = steady.last().map_or(0.0, |l| l.t) - steady.first().map_or(0.0, |f| f.t);
    let mean_cpu = steady.iter().map(|s| s.cpu_pct).sum::<f64>() / steady.len().max(1) as f64;
    println!("soak  CPU under this load: {mean_cpu:.2} % of a core (mean after the warm-up)");
    for (name, pick, tolerance, unit, scale) in [
        (
            "RSS",
            (|s: &Sample| s.rss) as fn(&Sample) -> f64,
            1048576.0,
            "MiB",
            1048576.0,
        ),
        ("fds", |s: &Sample| s.fds, 1.0, "fds", 1.0),
    ] {
        let pts: Vec<(f64, f64)> = steady.iter().map(|s| (s.t, pick(s))).collect();
        let (_, slope, se) = fit(&pts);
        let growth = slope * span;
        let noise = 3.0 * se * span;
        // Growth within noise: under three standard errors of the fitted slope, or under a
        // tolerance (1 MiB, 1 fd) over the whole window.
        let met = growth <= noise.max(tolerance) || pts.len() < 3;
        goal(
            &format!("no {name} growth over {:.0} min", minutes),
            met,
            &format!(
                "slope {:+.4} {unit}/h ± {:.4} (1 s.e.), {:+.2} {unit} over the {:.0} min after the warm-up; noise bound {:.2} {unit}",
                slope * 3600.0 / scale,
                se * 3600.0 / scale,
                growth / scale,
                span / 60.0,
                noise.max(tolerance) / scale
            ),
            missed,
        );
    }
    if minutes < 30.0 {
        println!("soak  (the goal is stated over 30 minutes; this run was {minutes} min)");
    }
}

fn main() {
    if !kernel_available("soak") {
        return;
    }
    let a = args();
    std::fs::create_dir_all(&a.out).expect("out dir");
    let mut missed = Vec::new();
    if !a.idle_sizes.is_empty() {
        let mut all = Vec::new();
        for services in a.idle_services.clone() {
            let rows = idle(&a, services);
            idle_report(&rows, &mut missed);
            all.extend(rows);
            idle_csv(&a, &all);
        }
    }
    if a.minutes > 0.0 {
        soak(&a, &mut missed);
    }
    if !missed.is_empty() {
        println!("{} goal(s) missed: {}", missed.len(), missed.join("; "));
        if a.check {
            std::process::exit(1);
        }
    }
}
