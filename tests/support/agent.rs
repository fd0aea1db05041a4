//! The `knhk-agent` binary as a test subject: started with a config, its endpoints read from
//! its machine-readable ready line, its logs collected, killed on drop.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
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
    /// Where the gRPC API listens, as the ready line says: `127.0.0.1:PORT` (TCP) or
    /// `unix:///PATH` (the Unix socket).
    pub grpc: String,
    pub stderr: mpsc::Receiver<String>,
}

impl Agent {
    pub fn start(config: &Path) -> Agent {
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn knhk-agent");
        Agent::attach(child)
    }

    /// Starts the agent with `config` once `before` has run with the pid it will have: a shell
    /// prints its pid, waits for a line, then execs the agent (same pid).
    pub fn start_after(config: &Path, before: impl FnOnce(u32)) -> Agent {
        let mut child = Command::new("sh")
            .args(["-c", "echo $$; read _go; exec \"$0\" run --config \"$1\""])
            .arg(BIN)
            .arg(config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let stdout = child.stdout.as_mut().expect("stdout");
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).expect("read the pid") == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        let pid: u32 = String::from_utf8_lossy(&line).trim().parse().expect("pid");
        before(pid);
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("release the agent");
        drop(stdin);
        Agent::attach(child)
    }

    /// Follows a spawned agent until its ready line.
    pub fn attach(mut child: Child) -> Agent {
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // {"ready":true,"grpc":"unix:///PATH" or "127.0.0.1:PORT","admin":"127.0.0.1:PORT",...}
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
            Ok((m, g)) => (m.parse().expect("metrics address"), g),
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

    /// The API endpoint for the CLI's `--endpoint` and [`knhk_agent::client::connect`]:
    /// `unix:///PATH` or `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        if self.grpc.starts_with("unix://") {
            self.grpc.clone()
        } else {
            format!("http://{}", self.grpc)
        }
    }

    /// The API's TCP address (mTLS, or explicit loopback); panics for a Unix socket.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .parse()
            .unwrap_or_else(|_| panic!("the API is not on TCP: {}", self.grpc))
    }

    /// The API's Unix socket; panics for TCP.
    pub fn grpc_socket(&self) -> PathBuf {
        PathBuf::from(
            self.grpc
                .strip_prefix("unix://")
                .unwrap_or_else(|| panic!("the API is not on a Unix socket: {}", self.grpc)),
        )
    }

    /// A plaintext gRPC channel to the API (Unix socket or loopback TCP).
    pub async fn channel(&self) -> tonic::transport::Channel {
        knhk_agent::client::connect(&self.endpoint())
            .await
            .unwrap_or_else(|e| panic!("connect to the agent at {}: {e}", self.endpoint()))
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

    /// Sends SIGTERM, waits for the exit, then reads its stderr to the end (the pipe closes
    /// when the process is gone): every line it wrote, none still in flight.
    pub fn stop_with_logs(self) -> (std::process::ExitStatus, String) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(r, 0, "kill -TERM {}", self.child.id());
        let mut me = self;
        let status = me.child.wait().expect("wait");
        // The reader thread ends at EOF and drops its sender: the iterator ends with it.
        let logs = me.stderr.iter().collect::<Vec<_>>().join("\n");
        (status, logs)
    }

    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    pub fn logs(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }

    /// `GET path` on the admin server: the whole response (status line, headers, body).
    pub fn get(&self, path: &str) -> String {
        super::http::raw(self.metrics, "GET", path, &[], "")
            .unwrap_or_else(|| panic!("GET {path} on the admin server at {} failed", self.metrics))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A configuration for a test agent: its API on a Unix socket in `dir` (`dir/run/agent.sock`),
/// its state in `dir/state`, metrics on a free loopback port; then `rules` (any further tables).
pub fn write_config(dir: &Path, cgroup_root: &Path, pin_root: &Path, rules: &str) -> PathBuf {
    write_config_with(
        dir,
        cgroup_root,
        pin_root,
        &format!(
            "api_socket = \"{}\"\n",
            dir.join("run").join("agent.sock").display()
        ),
        rules,
    )
}

/// As [`write_config`], with the API on TCP at a free loopback port (`listen_address`): mTLS
/// with `[spiffe]` in `rules`, else plaintext loopback (which any local user can reach).
pub fn write_config_tcp(dir: &Path, cgroup_root: &Path, pin_root: &Path, rules: &str) -> PathBuf {
    write_config_with(
        dir,
        cgroup_root,
        pin_root,
        "listen_address = \"127.0.0.1:0\"\n",
        rules,
    )
}

/// A configuration with `agent_keys` (lines of `[agent]`) added, then `rules`.
pub fn write_config_with(
    dir: &Path,
    cgroup_root: &Path,
    pin_root: &Path,
    agent_keys: &str,
    rules: &str,
) -> PathBuf {
    let path = dir.join("agent.toml");
    let text = format!(
        "[agent]\ncgroup_root = \"{}\"\npin_root = \"{}\"\nmetrics_address = \"127.0.0.1:0\"\ncgroup_poll_interval_ms = 10\n\
         state_dir = \"{}\"\n{agent_keys}{rules}",
        cgroup_root.display(),
        pin_root.display(),
        dir.join("state").display()
    );
    std::fs::write(&path, text).expect("write config");
    path
}
