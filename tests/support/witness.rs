//! `knhk-agent witness` as a test subject: a real process on a loopback port with a file key,
//! reached over plain HTTP/1.0 (or killed and restarted on the same state).

use super::agent::BIN;
use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running witness; killed on drop.
pub struct WitnessProcess {
    pub name: String,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    /// Further arguments (e.g. `--config` for mTLS).
    extra: Vec<String>,
    child: Option<Child>,
}

impl WitnessProcess {
    /// Starts witness `name` with its key and state under `dir`, on a free loopback port.
    pub fn start(name: &str, dir: PathBuf) -> WitnessProcess {
        WitnessProcess::start_with(name, dir, &[])
    }

    /// [`WitnessProcess::start`] with further arguments; with `--config` (mTLS) it is ready
    /// when its port accepts.
    pub fn start_with(name: &str, dir: PathBuf, extra: &[String]) -> WitnessProcess {
        let addr: SocketAddr = format!("127.0.0.1:{}", super::free_port())
            .parse()
            .expect("addr");
        let mut w = WitnessProcess {
            name: name.into(),
            addr,
            dir,
            extra: extra.to_vec(),
            child: None,
        };
        w.restart();
        w
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "witness".into(),
            "--name".into(),
            self.name.clone(),
            "--key-file".into(),
            self.dir.join("witness.key").display().to_string(),
            "--state".into(),
            self.dir.join("witness.redb").display().to_string(),
            "--listen".into(),
            self.addr.to_string(),
        ];
        args.extend(self.extra.iter().cloned());
        args
    }

    /// The witness's C2SP verifier key (`--print-key`).
    pub fn verifier_key(&self) -> String {
        let mut args = self.args();
        args.push("--print-key".into());
        let out = Command::new(BIN).args(&args).output().expect("print key");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// (Re)starts the process on the same key, state and port; waits until it answers.
    pub fn restart(&mut self) {
        self.kill9();
        let mut child = Command::new(BIN)
            .args(self.args())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn witness");
        let stderr = child.stderr.take().expect("stderr");
        let name = self.name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("witness {name}: {line}");
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mtls = !self.extra.is_empty();
        while !(if mtls {
            TcpStream::connect(self.addr).is_ok()
        } else {
            self.request("GET", "/healthz", "").0 == 200
        }) {
            assert!(
                Instant::now() < deadline,
                "witness {} did not start",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// One HTTP request: (status, body); status 0 when it cannot connect.
    pub fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        request(self.addr, method, path, body)
    }

    /// Each origin's state, as the witness lists it.
    pub fn origins(&self) -> Vec<serde_json::Value> {
        let (status, body) = self.request("GET", "/knhk/v1/origins", "");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("origins JSON")
    }

    /// A metric's value (the sum over its series), 0 when absent.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.request("GET", "/metrics", "");
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// One HTTP request to `addr`: (status, body); status 0 when it cannot connect.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    super::http::request(addr, method, path, &[], body).unwrap_or((0, String::new()))
}

/// One HTTP request to `addr`: the whole response (status line, headers, body); empty when it
/// cannot connect.
pub fn request_raw(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    super::http::raw(addr, method, path, &[], body).unwrap_or_default()
}

impl Drop for WitnessProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
