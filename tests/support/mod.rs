//! Shared helpers for the kernel tests: guards for throwaway cgroups and pin directories, real
//! listeners, and `connect()` calls made from a child process placed in a chosen cgroup.
//!
//! Tests never attach at the machine's cgroup root: every agent in a test attaches to a
//! throwaway child cgroup, and every guard cleans up in `Drop`, also when the test fails.
#![allow(dead_code)]

pub mod agent;
#[cfg(feature = "azure")]
pub mod azure;
pub mod cri;
pub mod harness;
pub mod http;
pub mod kms;
pub mod prom;
pub mod proxy;
#[cfg(feature = "s3")]
pub mod s3;
pub mod semconv;
pub mod spire;
pub mod witness;
#[allow(unused_imports)]
pub use agent::*;
#[allow(unused_imports)]
pub use harness::*;

use std::{
    ffi::CString,
    io::Read,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(name: &str) -> String {
    format!(
        "knhk-test-{}-{}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether the kernel features the tests need are present. Prints why not and returns `false`
/// (the test then returns early, loudly), or panics when `KNHK_REQUIRE_KERNEL_TESTS=1` (CI),
/// so that a skip can never pass silently there.
/// (resident, peak resident) memory of process `pid`, bytes (`VmRSS`, `VmHWM`).
pub fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub fn kernel_available(test: &str) -> bool {
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("needs root".to_string())
    } else if knhk_agent::datapath::cgroup::detect_cgroup2_mount().is_none() {
        Some("needs a cgroup v2 hierarchy".to_string())
    } else if let Err(e) = knhk_agent::datapath::mount_bpffs_if_missing() {
        Some(format!("needs a bpffs: {e}"))
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if std::env::var("KNHK_REQUIRE_KERNEL_TESTS").as_deref() == Ok("1") => {
            panic!("{test}: {why}, and KNHK_REQUIRE_KERNEL_TESTS=1 forbids skipping")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// A throwaway cgroup under the cgroup v2 mount, removed (with its children) on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let mount = knhk_agent::datapath::cgroup::detect_cgroup2_mount().expect("cgroup v2 mount");
        let path = mount.join(unique(name));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TestCgroup { path }
    }

    /// Creates (or returns) a child directory.
    pub fn child(&self, rel: &str) -> PathBuf {
        let p = self.path.join(rel);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// The cgroup id (inode) of `dir`.
    pub fn id_of(dir: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir).expect("cgroup exists").ino()
    }
}

fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    // Move any leftover process to the parent, then remove.
    if let (Ok(procs), Some(parent)) = (
        std::fs::read_to_string(dir.join("cgroup.procs")),
        dir.parent(),
    ) {
        for pid in procs.lines() {
            let _ = std::fs::write(parent.join("cgroup.procs"), pid);
        }
    }
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // A child that just exited may still be counted for a moment.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    std::fs::remove_dir(dir)
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup_tree(&self.path) {
            let msg = format!("cleanup: removing cgroup {}: {e}", self.path.display());
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

/// A throwaway pin root on bpffs, whose pins (and so the programs' links) are removed on drop.
pub struct TestPins {
    pub root: PathBuf,
}

impl TestPins {
    pub fn new(name: &str) -> Self {
        TestPins {
            root: PathBuf::from("/sys/fs/bpf").join(unique(name)),
        }
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Err(e) = knhk_agent::datapath::remove_pins(&self.root) {
            let msg = format!("cleanup: removing pins {}: {e}", self.root.display());
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

/// A TCP listener that accepts and drops connections on a background thread until the process
/// ends, so connect loops never fill its backlog.
pub fn tcp_sink(addr: &str) -> SocketAddr {
    let l = TcpListener::bind(addr).expect("bind listener");
    // std listens with a backlog of 128; a connect loop can outrun the accept thread for a few
    // milliseconds, and an overflow costs a 1 s SYN retransmit. Listening again resizes it.
    let r = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096) };
    assert_eq!(r, 0, "listen");
    let local = l.local_addr().expect("local addr");
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    local
}

/// A bound UDP socket (kept open for the life of the process).
pub fn udp_sink(addr: &str) -> SocketAddr {
    let s = UdpSocket::bind(addr).expect("bind udp");
    let local = s.local_addr().expect("local addr");
    std::mem::forget(s);
    local
}

/// The outcome of one `connect()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Connected.
    Connected,
    /// Refused by admission (EPERM).
    Denied,
    /// Admitted, but no listener (ECONNREFUSED).
    Refused,
    /// Another errno.
    Other(i32),
}

impl Outcome {
    fn from_code(code: i64) -> Self {
        match code {
            0 => Outcome::Connected,
            c if c == libc::EPERM as i64 => Outcome::Denied,
            c if c == libc::ECONNREFUSED as i64 => Outcome::Refused,
            c => Outcome::Other(c as i32),
        }
    }

    /// Whether admission let it through.
    pub fn admitted(self) -> bool {
        matches!(self, Outcome::Connected | Outcome::Refused)
    }
}

/// A prebuilt socket address, usable after `fork()` without allocating.
#[derive(Clone, Copy)]
struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
    family: libc::c_int,
}

fn raw_addr(addr: SocketAddr) -> RawAddr {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let (len, family) = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as _,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            (size_of::<libc::sockaddr_in>(), libc::AF_INET)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as _,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (size_of::<libc::sockaddr_in6>(), libc::AF_INET6)
        }
    };
    RawAddr {
        storage,
        len: len as _,
        family,
    }
}

/// One connect with raw syscalls (safe after fork). Returns 0 or the errno; `elapsed_ns` gets the
/// duration of the `connect()` call.
fn raw_connect(a: &RawAddr, sock_type: libc::c_int, elapsed_ns: &mut u64) -> i64 {
    unsafe {
        let fd = libc::socket(a.family, sock_type, 0);
        if fd < 0 {
            return 1000 + *libc::__errno_location() as i64;
        }
        let mut t0: libc::timespec = std::mem::zeroed();
        let mut t1: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t0);
        let r = libc::connect(fd, &a.storage as *const _ as *const libc::sockaddr, a.len);
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t1);
        let err = if r == 0 {
            0
        } else {
            *libc::__errno_location() as i64
        };
        // Close with a reset (linger 0): no TIME_WAIT, so connect loops never run out of
        // ephemeral ports.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as _,
        );
        *elapsed_ns = ((t1.tv_sec - t0.tv_sec) as i64 * 1_000_000_000
            + (t1.tv_nsec - t0.tv_nsec) as i64) as u64;
        libc::close(fd);
        err
    }
}

/// Runs `job` in a forked child that first moves itself into `cgroup`; returns what the job
/// wrote. The job must only make raw syscalls (no allocation: the parent is multi-threaded).
fn in_cgroup<const N: usize>(cgroup: &Path, job: impl FnOnce(&mut [i64; N])) -> [i64; N] {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).expect("path");
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(90);
            }
            libc::close(fd);
            let mut out = [0i64; N];
            job(&mut out);
            let bytes = size_of::<[i64; N]>();
            let mut off = 0;
            while off < bytes {
                let w = libc::write(
                    fds[1],
                    (out.as_ptr() as *const u8).add(off).cast(),
                    bytes - off,
                );
                if w <= 0 {
                    libc::_exit(91);
                }
                off += w as usize;
            }
            libc::_exit(0);
        }
    }
    unsafe { libc::close(fds[1]) };
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).expect("read from child");
    let mut status = 0;
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child in {} failed (status {status:#x}; 90 = could not join the cgroup)",
        cgroup.display()
    );
    assert_eq!(buf.len(), size_of::<[i64; N]>(), "short read from child");
    let mut out = [0i64; N];
    for (i, chunk) in buf.chunks_exact(8).enumerate() {
        out[i] = i64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
    }
    out
}

/// One TCP `connect()` from a process in `cgroup`.
pub fn tcp_connect_from(cgroup: &Path, addr: SocketAddr) -> Outcome {
    let a = raw_addr(addr);
    let [code] = in_cgroup::<1>(cgroup, move |out| {
        let mut ns = 0;
        out[0] = raw_connect(&a, libc::SOCK_STREAM, &mut ns);
    });
    Outcome::from_code(code)
}

/// One UDP `connect()` from a process in `cgroup`.
pub fn udp_connect_from(cgroup: &Path, addr: SocketAddr) -> Outcome {
    let a = raw_addr(addr);
    let [code] = in_cgroup::<1>(cgroup, move |out| {
        let mut ns = 0;
        out[0] = raw_connect(&a, libc::SOCK_DGRAM, &mut ns);
    });
    Outcome::from_code(code)
}

/// Counts of a connect loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopCounts {
    pub connected: u64,
    pub denied: u64,
    pub other: u64,
}

/// Connects from `cgroup` in the background until dropped (a busy node: its beat cycles decide
/// something, so each is receipted; an idle node's are not).
pub struct Busy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Busy {
    /// 20 connects to a local sink every 20 ms, from a process in `cgroup`.
    pub fn start(cgroup: &Path) -> Busy {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cgroup, flag) = (cgroup.to_path_buf(), stop.clone());
        let sink = tcp_sink("127.0.0.1:0");
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                tcp_connect_loop_from(&cgroup, sink, 20);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Busy {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `n` TCP connects in a loop from a process in `cgroup`.
pub fn tcp_connect_loop_from(cgroup: &Path, addr: SocketAddr, n: u64) -> LoopCounts {
    tcp_connect_cycle_from(cgroup, &[addr], n)
}

/// `N` TCP connects from a process in `cgroup`, returning each `connect()` duration in ns
/// (negative: the connect failed with that errno).
pub fn tcp_connect_timings_from<const N: usize>(cgroup: &Path, addr: SocketAddr) -> [i64; N] {
    let a = raw_addr(addr);
    in_cgroup::<N>(cgroup, move |out| {
        for slot in out.iter_mut() {
            let mut ns = 0;
            let e = raw_connect(&a, libc::SOCK_STREAM, &mut ns);
            *slot = if e == 0 { ns as i64 } else { -e };
        }
    })
}

/// `n` TCP connections from a process in `cgroup`, each sending a few bytes and waiting
/// `wait_ms` for their acknowledgement before closing; returns how many connected.
pub fn tcp_send_from(cgroup: &Path, addr: SocketAddr, n: u32, wait_ms: u32) -> u64 {
    let a = raw_addr(addr);
    let [connected] = in_cgroup::<1>(cgroup, move |out| unsafe {
        for _ in 0..n {
            let fd = libc::socket(a.family, libc::SOCK_STREAM, 0);
            if fd < 0 {
                continue;
            }
            if libc::connect(fd, &a.storage as *const _ as *const libc::sockaddr, a.len) == 0 {
                out[0] += 1;
                let _ = libc::write(fd, b"knhk".as_ptr().cast(), 4);
                let ts = libc::timespec {
                    tv_sec: (wait_ms / 1000) as _,
                    tv_nsec: ((wait_ms % 1000) as i64 * 1_000_000) as _,
                };
                libc::nanosleep(&ts, core::ptr::null_mut());
            }
            libc::close(fd);
        }
    });
    connected as u64
}

/// Open-loop load: TCP connects from a process in `cgroup` at the given offsets from now (ns,
/// ascending; e.g. Poisson arrivals), without waiting for earlier ones to complete. Each socket
/// is closed (with a reset) `hold_ms` after its connect started. Returns the connects started.
pub fn tcp_open_loop_from(
    cgroup: &Path,
    addr: SocketAddr,
    arrivals_ns: &[u64],
    hold_ms: u64,
) -> u64 {
    const RING: usize = 8192;
    let a = raw_addr(addr);
    let hold_ns = hold_ms * 1_000_000;
    let [started] = in_cgroup::<1>(cgroup, move |out| unsafe {
        let now = || {
            let mut t: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t);
            t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
        };
        let mut ring = [(0i32, 0u64); RING];
        let (mut head, mut tail) = (0usize, 0usize);
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let close = |fd: i32| {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as _,
            );
            libc::close(fd);
        };
        let t0 = now();
        for &at in arrivals_ns {
            loop {
                let t = now() - t0;
                while tail != head && ring[tail % RING].1 + hold_ns <= t {
                    close(ring[tail % RING].0);
                    tail += 1;
                }
                if t >= at {
                    break;
                }
                let wait = (at - t).min(1_000_000);
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: wait as _,
                };
                libc::nanosleep(&ts, core::ptr::null_mut());
            }
            if head - tail == RING {
                close(ring[tail % RING].0);
                tail += 1;
            }
            let fd = libc::socket(a.family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
            if fd < 0 {
                continue;
            }
            libc::connect(fd, &a.storage as *const _ as *const libc::sockaddr, a.len);
            ring[head % RING] = (fd, now() - t0);
            head += 1;
            out[0] += 1;
        }
        // The rest close on schedule too (all at once would be a burst of resets).
        while tail != head {
            let (fd, opened) = ring[tail % RING];
            let t = now() - t0;
            if opened + hold_ns > t {
                let wait = (opened + hold_ns - t).min(1_000_000);
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: wait as _,
                };
                libc::nanosleep(&ts, core::ptr::null_mut());
                continue;
            }
            close(fd);
            tail += 1;
        }
    });
    started as u64
}

/// Poisson arrival offsets (ns) at `rate` per second over `duration`, from a fixed seed.
pub fn poisson_arrivals(rate: f64, duration: Duration, seed: u64) -> Vec<u64> {
    let mut state = seed.max(1);
    let mut uniform = move || {
        // xorshift64*: deterministic and good enough for inter-arrival times.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        ((state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let end = duration.as_nanos() as f64;
    let mut t = 0.0;
    let mut out = Vec::new();
    loop {
        t += -uniform().ln() / rate * 1e9;
        if t >= end {
            return out;
        }
        out.push(t as u64);
    }
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tc(args: &[&str]) {
    let out = std::process::Command::new("tc")
        .args(args)
        .output()
        .expect("run tc (iproute2)");
    assert!(
        out.status.success(),
        "tc {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server in its own network namespace behind a veth pair whose host side is shaped by TBF
/// and kept saturated by a bulk UDP flow, so every packet towards the server (SYNs included)
/// waits behind a full queue: a real, stable network delay of about `latency_ms`. This kernel has
/// no netem; TBF plus a saturating flow is what it has.
pub struct DelayedServer {
    /// The server's listening address.
    pub addr: SocketAddr,
    netns: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl DelayedServer {
    /// A server behind a queue kept full: a steady extra delay of about `latency_ms`.
    pub fn new(latency_ms: u32) -> Self {
        Self::shaped("2mbit", latency_ms, true)
    }

    /// A server behind a link of `rate` (a `tc` rate such as `"100kbit"`) towards it, with room
    /// for 2 s of queue and no other traffic: connects queue only behind each other, so the
    /// link is a single FIFO server with a known service rate.
    pub fn rate_limited(rate: &str) -> Self {
        Self::shaped(rate, 2000, false)
    }

    fn shaped(rate: &str, latency_ms: u32, saturate: bool) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", std::process::id() % 100_000, n);
        let netns = format!("knhk-t{tag}");
        let (host_if, peer_if) = (format!("kh{tag}"), format!("kp{tag}"));
        let subnet = format!("10.213.{}.{}", std::process::id() % 250, (n % 60) * 4);
        let octets: Vec<u8> = subnet
            .split('.')
            .map(|o| o.parse().expect("octet"))
            .collect();
        let host_ip = format!(
            "{}.{}.{}.{}",
            octets[0],
            octets[1],
            octets[2],
            octets[3] + 1
        );
        let peer_ip = format!(
            "{}.{}.{}.{}",
            octets[0],
            octets[1],
            octets[2],
            octets[3] + 2
        );
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ]);
        ip(&["link", "set", &peer_if, "netns", &netns]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{peer_ip}/30"),
            "dev",
            &peer_if,
        ]);
        ip(&["-n", &netns, "link", "set", &peer_if, "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        tc(&[
            "qdisc",
            "add",
            "dev",
            &host_if,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            if saturate { "1600" } else { "100" },
            "latency",
            &format!("{latency_ms}ms"),
        ]);

        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns_path = format!("/var/run/netns/{netns}");
        let stop_l = stop.clone();
        let listen_ip = peer_ip.clone();
        let listener = std::thread::spawn(move || {
            let f = std::fs::File::open(&ns_path).expect("netns file");
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns");
            let l = TcpListener::bind(format!("{listen_ip}:0")).expect("bind in netns");
            l.set_nonblocking(true).expect("nonblocking");
            tx.send(l.local_addr().expect("addr")).expect("send addr");
            // Accepted connections stay open (the newest 1,024), so that clients can send data
            // and see it acknowledged.
            let mut open = std::collections::VecDeque::new();
            while !stop_l.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        open.push_back(c);
                        if open.len() > 1024 {
                            open.pop_front();
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("listener address");
        if !saturate {
            return DelayedServer {
                addr,
                netns,
                stop,
                threads: vec![listener],
            };
        }
        let stop_b = stop.clone();
        let blaster = std::thread::spawn(move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("udp");
            let payload = [0u8; 1200];
            let target: SocketAddr = format!("{peer_ip}:9").parse().expect("addr");
            while !stop_b.load(Ordering::Relaxed) {
                // 1200 bytes every 2 ms offers 4.8 Mbit/s to a 2 Mbit/s bucket: always full.
                let _ = s.send_to(&payload, target);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        // Wait for the queue to be full: tbf drops only once its queue is.
        let started = std::time::Instant::now();
        loop {
            let out = std::process::Command::new("tc")
                .args(["-s", "qdisc", "show", "dev", &host_if])
                .output()
                .expect("tc -s qdisc show");
            let text = String::from_utf8_lossy(&out.stdout);
            // "Sent 123 bytes 4 pkt (dropped 5, overlimits 6 requeues 0)"
            let dropped: u64 = text
                .split("dropped ")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if dropped > 0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the shaped queue of {host_if} never filled: {text}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        DelayedServer {
            addr,
            netns,
            stop,
            threads: vec![listener, blaster],
        }
    }
}

impl Drop for DelayedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Deleting the namespace removes the peer veth, which removes its host side too.
        let out = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("cleanup: ip netns del {} failed: {out:?}", self.netns);
        }
    }
}

static TIMING: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held by tests that compare timings: no other test of the binary runs meanwhile.
pub fn timing_exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    TIMING.write().unwrap_or_else(|e| e.into_inner())
}

/// Held by every other kernel test, so that timing tests run alone.
pub fn timing_shared() -> std::sync::RwLockReadGuard<'static, ()> {
    TIMING.read().unwrap_or_else(|e| e.into_inner())
}

/// `n` TCP connects from a process in `cgroup`, each to a different destination
/// `127.1.x.y:9` (nothing listens; each attempt still enters the heat map). Returns how many
/// were admitted (refused by the stack rather than by admission).
pub fn tcp_connect_many_from(cgroup: &Path, n: u32) -> u64 {
    let addrs: Vec<RawAddr> = (0..n)
        .map(|i| {
            raw_addr(SocketAddr::from((
                [127, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8],
                9,
            )))
        })
        .collect();
    let [admitted] = in_cgroup::<1>(cgroup, move |out| {
        let mut ns = 0;
        for a in &addrs {
            if raw_connect(a, libc::SOCK_STREAM, &mut ns) != libc::EPERM as i64 {
                out[0] += 1;
            }
        }
    });
    admitted as u64
}

/// `n` TCP connects from a process in `cgroup`, cycling through `addrs` (each closed with a
/// reset right away).
pub fn tcp_connect_cycle_from(cgroup: &Path, addrs: &[SocketAddr], n: u64) -> LoopCounts {
    let raw: Vec<RawAddr> = addrs.iter().map(|a| raw_addr(*a)).collect();
    let [c, d, o] = in_cgroup::<3>(cgroup, move |out| {
        let mut ns = 0;
        for i in 0..n as usize {
            match raw_connect(&raw[i % raw.len()], libc::SOCK_STREAM, &mut ns) {
                0 => out[0] += 1,
                e if e == libc::EPERM as i64 => out[1] += 1,
                _ => out[2] += 1,
            }
        }
    });
    LoopCounts {
        connected: c as u64,
        denied: d as u64,
        other: o as u64,
    }
}

/// `n` UDP datagrams sent with `sendto()` from one unconnected socket of a process in `cgroup`,
/// cycling through `addrs` (of one address family); `connected` counts datagrams sent.
pub fn udp_sendto_cycle_from(cgroup: &Path, addrs: &[SocketAddr], n: u64) -> LoopCounts {
    let raw: Vec<RawAddr> = addrs.iter().map(|a| raw_addr(*a)).collect();
    let [c, d, o] = in_cgroup::<3>(cgroup, move |out| unsafe {
        let fd = libc::socket(raw[0].family, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            out[2] = n as i64;
            return;
        }
        for i in 0..n as usize {
            let a = &raw[i % raw.len()];
            let r = libc::sendto(
                fd,
                b"knhk".as_ptr().cast(),
                4,
                0,
                &a.storage as *const _ as *const libc::sockaddr,
                a.len,
            );
            match r {
                4 => out[0] += 1,
                _ if *libc::__errno_location() == libc::EPERM => out[1] += 1,
                _ => out[2] += 1,
            }
        }
        libc::close(fd);
    });
    LoopCounts {
        connected: c as u64,
        denied: d as u64,
        other: o as u64,
    }
}

/// A UDP server that sends every datagram back to its sender (for the life of the process).
pub fn udp_echo(addr: &str) -> SocketAddr {
    let s = UdpSocket::bind(addr).expect("bind udp");
    let local = s.local_addr().expect("local addr");
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    local
}

/// The errno of the last failed call as an [`Outcome`] code (0 when `ok`).
fn errno_code(ok: bool) -> i64 {
    if ok {
        0
    } else {
        unsafe { *libc::__errno_location() as i64 }
    }
}

/// One UDP datagram sent with `sendto()` (no `connect()`) from a process in `cgroup`.
pub fn udp_sendto_from(cgroup: &Path, to: SocketAddr) -> Outcome {
    let a = raw_addr(to);
    let [code] = in_cgroup::<1>(cgroup, move |out| unsafe {
        let fd = libc::socket(a.family, libc::SOCK_DGRAM, 0);
        let r = libc::sendto(
            fd,
            b"knhk".as_ptr().cast(),
            4,
            0,
            &a.storage as *const _ as *const libc::sockaddr,
            a.len,
        );
        out[0] = errno_code(r == 4);
        libc::close(fd);
    });
    Outcome::from_code(code)
}

/// From a process in `cgroup`: a UDP socket `connect()`ed to `connected`, then one datagram
/// sent with `sendto()` to `to` on that socket. Returns (connect, sendto).
pub fn udp_connect_then_sendto_from(
    cgroup: &Path,
    connected: SocketAddr,
    to: SocketAddr,
) -> (Outcome, Outcome) {
    let (c, t) = (raw_addr(connected), raw_addr(to));
    let [cc, tc] = in_cgroup::<2>(cgroup, move |out| unsafe {
        let fd = libc::socket(c.family, libc::SOCK_DGRAM, 0);
        let r = libc::connect(fd, &c.storage as *const _ as *const libc::sockaddr, c.len);
        out[0] = errno_code(r == 0);
        let r = libc::sendto(
            fd,
            b"knhk".as_ptr().cast(),
            4,
            0,
            &t.storage as *const _ as *const libc::sockaddr,
            t.len,
        );
        out[1] = errno_code(r == 4);
        libc::close(fd);
    });
    (Outcome::from_code(cc), Outcome::from_code(tc))
}

/// One TCP Fast Open attempt from a process in `cgroup`: `sendto(MSG_FASTOPEN)` on a fresh
/// socket, which connects and sends in one call.
pub fn tcp_fastopen_from(cgroup: &Path, to: SocketAddr) -> Outcome {
    let a = raw_addr(to);
    let [code] = in_cgroup::<1>(cgroup, move |out| unsafe {
        let fd = libc::socket(a.family, libc::SOCK_STREAM, 0);
        let r = libc::sendto(
            fd,
            b"knhk".as_ptr().cast(),
            4,
            libc::MSG_FASTOPEN,
            &a.storage as *const _ as *const libc::sockaddr,
            a.len,
        );
        out[0] = errno_code(r >= 0);
        libc::close(fd);
    });
    Outcome::from_code(code)
}

/// From a process in `cgroup`: one datagram to `to` with `sendto()`, then the reply read with
/// `recvfrom()` (2 s timeout). Returns the send outcome and the address the reply came from.
pub fn udp_request_reply_from(cgroup: &Path, to: SocketAddr) -> (Outcome, Option<SocketAddr>) {
    let a = raw_addr(to);
    let [code, family, w0, w1, port] = in_cgroup::<5>(cgroup, move |out| unsafe {
        let fd = libc::socket(a.family, libc::SOCK_DGRAM, 0);
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as _,
        );
        let r = libc::sendto(
            fd,
            b"knhk".as_ptr().cast(),
            4,
            0,
            &a.storage as *const _ as *const libc::sockaddr,
            a.len,
        );
        out[0] = errno_code(r == 4);
        if r != 4 {
            return;
        }
        let mut buf = [0u8; 64];
        let mut from: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let n = libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&mut from as *mut libc::sockaddr_storage).cast(),
            &mut len,
        );
        if n >= 0 {
            out[1] = from.ss_family as i64;
            if from.ss_family as i32 == libc::AF_INET {
                let sin = &*(&from as *const _ as *const libc::sockaddr_in);
                out[2] = u32::from_be(sin.sin_addr.s_addr) as i64;
                out[4] = u16::from_be(sin.sin_port) as i64;
            } else {
                let sin6 = &*(&from as *const _ as *const libc::sockaddr_in6);
                let b = sin6.sin6_addr.s6_addr;
                out[2] = i64::from_be_bytes(b[..8].try_into().unwrap_or_default());
                out[3] = i64::from_be_bytes(b[8..].try_into().unwrap_or_default());
                out[4] = u16::from_be(sin6.sin6_port) as i64;
            }
        }
        libc::close(fd);
    });
    let from = match family as i32 {
        libc::AF_INET => Some(SocketAddr::from((
            std::net::Ipv4Addr::from(w0 as u32),
            port as u16,
        ))),
        libc::AF_INET6 => {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&w0.to_be_bytes());
            b[8..].copy_from_slice(&w1.to_be_bytes());
            Some(SocketAddr::from((std::net::Ipv6Addr::from(b), port as u16)))
        }
        _ => None,
    };
    (Outcome::from_code(code), from)
}

/// One TCP connect from a process in `cgroup`; returns the outcome and the socket's
/// `SO_PRIORITY` after it.
pub fn tcp_connect_priority_from(cgroup: &Path, addr: SocketAddr) -> (Outcome, i64) {
    let a = raw_addr(addr);
    let [code, prio] = in_cgroup::<2>(cgroup, move |out| unsafe {
        let fd = libc::socket(a.family, libc::SOCK_STREAM, 0);
        if fd < 0 {
            out[0] = 1000;
            return;
        }
        let r = libc::connect(fd, &a.storage as *const _ as *const libc::sockaddr, a.len);
        out[0] = if r == 0 {
            0
        } else {
            *libc::__errno_location() as i64
        };
        let mut p: libc::c_int = -1;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PRIORITY,
            (&mut p as *mut libc::c_int).cast(),
            &mut len,
        );
        out[1] = p as i64;
        libc::close(fd);
    });
    (Outcome::from_code(code), prio)
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A two-thread runtime for a test's servers and clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Polls `f` every 100 ms until it holds; fails the test after `timeout`, naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Now on the monotonic clock, ns (the clock the child of [`tcp_until_from`] reports on).
pub fn monotonic_ns() -> i64 {
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec * 1_000_000_000 + t.tv_nsec
}

/// From a process in `cgroup`, TCP connects to `addr` back to back until one is denied (`deny`
/// true) or admitted (`deny` false), for at most `max_ns`. Returns (monotonic ns when that
/// happened, or -1 on timeout; attempts made).
pub fn tcp_until_from(cgroup: &Path, addr: SocketAddr, deny: bool, max_ns: i64) -> (i64, i64) {
    let a = raw_addr(addr);
    let [at, attempts] = in_cgroup::<2>(cgroup, |out| {
        let start = monotonic_ns();
        let mut n = 0;
        loop {
            let mut ns = 0;
            let code = raw_connect(&a, libc::SOCK_STREAM, &mut ns);
            n += 1;
            let now = monotonic_ns();
            let denied = code == libc::EPERM as i64;
            if denied == deny {
                out[0] = now;
                break;
            }
            if now - start > max_ns {
                out[0] = -1;
                break;
            }
        }
        out[1] = n;
    });
    (at, attempts)
}
