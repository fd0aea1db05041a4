//! The `knhk-agent` binary as a test subject: started with a config, its endpoints read from
//! its machine-readable ready line, its logs collected, killed on drop.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// The agent binary cargo built for the integration tests (examples that share these helpers
/// do not start agents).
pub const BIN: &str = match option_env!("CARGO_BIN_EXE_knhk-agent") {
    Some(bin) => bin,
    None => "knhk-agent",
};

/// A running agent; killed (SIGKILL) on drop if still running.
pub struct Agent {
    pub child: Child,
    pub metrics: SocketAddr,
    pub grpc: SocketAddr,
    pub stderr: mpsc::Receiver<String>,
}

impl Agent {
    pub fn start(config: &Path) -> Agent {
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
                // {"ready":true,"grpc":"127.0.0.1:PORT","admin":"127.0.0.1:PORT",...}
                let Ok(ready) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if ready["ready"] == true {
                    let field = |k: &str| ready[k].as_str().unwrap_or_default().to_owned();
                    let _ = tx.send((field("admin"), field("grpc")));
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
        let (metrics, grpc) = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok((m, g)) => (
                m.parse().expect("metrics address"),
                g.parse().expect("grpc address"),
            ),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().expect("wait");
                panic!("agent did not start ({status})");
            }
        };
        Agent {
            child,
            metrics,
            grpc,
            stderr: erx,
        }
    }

    /// Sends SIGTERM and waits for the exit; returns the status and how long it took.
    pub fn sigterm(mut self) -> (std::process::ExitStatus, Duration) {
        let sent = std::time::Instant::now();
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(r, 0, "kill -TERM {}", self.child.id());
        let status = self.child.wait().expect("wait");
        (status, sent.elapsed())
    }

    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    pub fn logs(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }

    pub fn get(&self, path: &str) -> String {
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

pub fn write_config(dir: &Path, cgroup_root: &Path, pin_root: &Path, rules: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    let text = format!(
        "[agent]\ncgroup_root = \"{}\"\npin_root = \"{}\"\nmetrics_address = \"127.0.0.1:0\"\nlisten_address = \"127.0.0.1:0\"\ncgroup_poll_interval_ms = 10\n{rules}",
        cgroup_root.display(),
        pin_root.display()
    );
    std::fs::write(&path, text).expect("write config");
    path
}
