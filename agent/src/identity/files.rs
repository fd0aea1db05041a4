//! The file identity source (migration only): a certificate chain, key and CA bundle on disk,
//! served as a SPIFFE Workload API on a private Unix socket, so that the agent consumes it
//! exactly like SPIRE (same `X509Source`, same TLS configs, same authorization).
//!
//! The socket lives in a fresh directory `identity-XXXXXX` (mode 0700, created exclusively by
//! `mkdtemp`) under `agent.state_dir`, which must be root's and writable by no one else: a path
//! a local user could predict and prepare (the old `/tmp/knhk-identity-<pid>`) is never used.
//!
//! The files are checked at start (a bad file is a startup error) and polled every second;
//! a change is loaded and pushed on the stream. A change that does not load (a half-written
//! file, a key that does not match) is logged and the previous identity keeps serving.

use super::workload_api::{
    concat_der,
    pb::{X509svid, X509svidResponse},
    X509SvidServer,
};
use crate::{config::FilePaths, secure_dir};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivatePkcs8KeyDer};
use spiffe::TrustDomain;
use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};
use tokio::sync::watch;

/// The private directories' name prefix (then six random characters).
const DIR_PREFIX: &str = "identity-";
/// The socket's name in its directory.
const SOCKET: &str = "workload.sock";

/// Removes what earlier runs killed with -9 left under `state_dir`: directories named
/// `identity-XXXXXX`, ours, holding at most a socket nobody serves any more. Anything else is
/// left alone.
fn remove_stale(state_dir: &Path, ours: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale_name = name
            .strip_prefix(DIR_PREFIX)
            .is_some_and(|rest| rest.len() == 6 && rest.bytes().all(|b| b.is_ascii_alphanumeric()));
        if dir == ours || !stale_name || secure_dir::check_dir(&dir).is_err() {
            continue;
        }
        let socket = dir.join(SOCKET);
        let live = std::os::unix::net::UnixStream::connect(&socket).is_ok();
        if live {
            continue;
        }
        if let Ok(m) = std::fs::symlink_metadata(&socket) {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() || std::fs::remove_file(&socket).is_err() {
                continue;
            }
        }
        // Fails, harmlessly, unless the directory is empty now.
        if std::fs::remove_dir(&dir).is_ok() {
            tracing::info!(dir = %dir.display(), "removed a stale file identity directory");
        }
    }
}

/// A running file-backed Workload API. Dropping it stops the server and removes the socket.
pub(crate) struct FileWorkloadApi {
    dir: PathBuf,
    socket: PathBuf,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FileWorkloadApi {
    /// Loads the files (an error names the file and the reason) and starts serving them on a
    /// socket in a fresh private directory under `state_dir`.
    pub(crate) async fn start(
        paths: FilePaths,
        trust_domain: &TrustDomain,
        state_dir: &Path,
    ) -> Result<FileWorkloadApi, String> {
        let first = load(&paths, trust_domain)?;
        let dir = secure_dir::private_dir(state_dir, DIR_PREFIX)
            .map_err(|e| format!("agent.state_dir {}: {e}", state_dir.display()))?;
        remove_stale(state_dir, &dir);
        let socket = dir.join(SOCKET);
        let listener = tokio::net::UnixListener::bind(&socket)
            .map_err(|e| format!("listening on {}: {e}", socket.display()))?;
        let (tx, rx) = watch::channel(Some(first));
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let result = tonic::transport::Server::builder()
                .add_service(X509SvidServer::service(rx))
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = result {
                tracing::error!("the file identity's Workload API stopped: {e}");
            }
        });
        let td = trust_domain.clone();
        let watcher = tokio::spawn(async move {
            let mut seen = fingerprint(&paths);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let now = fingerprint(&paths);
                if now == seen {
                    continue;
                }
                seen = now;
                match load(&paths, &td) {
                    Ok(response) => {
                        tracing::info!(cert = %paths.cert.display(), "identity files changed: loaded");
                        // No subscriber left (the source is gone): nothing to notify.
                        let _ = tx.send(Some(response));
                    }
                    Err(e) => tracing::error!(
                        "identity files changed but do not load ({e}); the previous identity keeps serving"
                    ),
                }
            }
        });
        Ok(FileWorkloadApi {
            dir,
            socket,
            tasks: vec![server, watcher],
        })
    }

    /// The socket the Workload API is served on.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for FileWorkloadApi {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Best effort on drop: a leftover is removed at the next start.
        let _ = std::fs::remove_file(&self.socket);
        // Likewise for its private directory.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// (modification time, size, inode) of each file: a change in any means "reload".
fn fingerprint(paths: &FilePaths) -> Vec<Option<(i64, i64, u64, u64)>> {
    [&paths.cert, &paths.key, &paths.ca]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                // A file that cannot be read now counts as changed; the reload reports why.
                .ok()
                .map(|m| (m.mtime(), m.mtime_nsec(), m.size(), m.ino()))
        })
        .collect()
}

/// Reads and checks the files into one Workload API response.
fn load(paths: &FilePaths, trust_domain: &TrustDomain) -> Result<X509svidResponse, String> {
    let meta = std::fs::metadata(&paths.key)
        .map_err(|e| format!("key_file {}: {e}", paths.key.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "key_file {} has mode {mode:04o}: a private key must not be readable by group or others (chmod 600 it)",
            paths.key.display()
        ));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("cert_file {}: {e}", paths.cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "cert_file {}: no PEM certificate in it",
            paths.cert.display()
        ));
    }
    let key = PrivatePkcs8KeyDer::from_pem_file(&paths.key).map_err(|e| {
        format!(
            "key_file {}: {e} (a PEM \"PRIVATE KEY\", PKCS#8, is expected)",
            paths.key.display()
        )
    })?;
    let bundle: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.ca)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("ca_file {}: {e}", paths.ca.display()))?;
    if bundle.is_empty() {
        return Err(format!(
            "ca_file {}: no PEM certificate in it",
            paths.ca.display()
        ));
    }
    let chain_der = concat_der(chain.iter().map(|c| c.as_ref()));
    let svid =
        spiffe::X509Svid::parse_from_der(&chain_der, key.secret_pkcs8_der()).map_err(|e| {
            format!(
                "cert_file {} with key_file {}: not a usable X.509-SVID: {e}",
                paths.cert.display(),
                paths.key.display()
            )
        })?;
    if svid.spiffe_id().trust_domain() != trust_domain {
        return Err(format!(
            "cert_file {}: its SPIFFE ID {} is not in trust_domain {:?}",
            paths.cert.display(),
            svid.spiffe_id(),
            trust_domain.as_str()
        ));
    }
    Ok(X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.spiffe_id().to_string(),
            x509_svid: chain_der,
            x509_svid_key: key.secret_pkcs8_der().to_vec(),
            bundle: concat_der(bundle.iter().map(|c| c.as_ref())),
            hint: String::new(),
        }],
        ..Default::default()
    })
}
