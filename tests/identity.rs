//! Kernel tests of workload identity (need root, cgroup v2 and BPF, because they run the real
//! agent): the `knhk-agent` binary serving its gRPC API over mTLS with an SVID from a SPIFFE
//! Workload API, and real clients that take their own SVIDs through the real `spiffe` crate.
//! SPIRE cannot run here; `support::spire` stands in for it, speaking the Workload API proto.

mod support;

use knhk_agent::{
    api::pb::{
        self, agent_service_client::AgentServiceClient, policy_service_client::PolicyServiceClient,
    },
    identity::tls,
};
use spiffe::{TrustDomain, X509Source};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};
use support::{spire::*, *};

const TD: &str = "knhk.test";

/// An agent with SPIFFE mTLS on, attached to a throwaway cgroup, whose Workload API is
/// `spire` (already serving or not).
fn start_agent(dir: &Path, cg: &TestCgroup, pins: &TestPins, spiffe: &str) -> Agent {
    let config = write_config_tcp(
        dir,
        &cg.path,
        &pins.root,
        &format!(
            "[spiffe]\nenabled = true\ntrust_domain = \"{TD}\"\nspiffe_id = \"spiffe://{TD}/agent\"\n{spiffe}"
        ),
    );
    Agent::start(&config)
}

/// A client's SVID source on its own Workload API.
async fn client_source(socket: &Path) -> X509Source {
    X509Source::builder()
        .endpoint(format!("unix:{}", socket.display()))
        .initial_sync_timeout(Duration::from_secs(5))
        .build()
        .await
        .expect("client SVID")
}

fn client_config(source: &X509Source, trust_domains: &[&str]) -> Arc<rustls::ClientConfig> {
    let tds: Vec<TrustDomain> = trust_domains
        .iter()
        .map(|t| TrustDomain::new(t).expect("trust domain"))
        .collect();
    tls::client_config(source.clone(), &tds, vec![]).expect("client config")
}

/// A TLS handshake with the agent; the serial of the certificate it presented, or why it failed.
/// Under TLS 1.3 the server judges the client's certificate after the client thinks the
/// handshake is done, so a round trip (an HTTP/2 preface and the server's SETTINGS) settles it.
async fn handshake(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())?;
    let serial = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| serial_string(c.as_ref()))
        .ok_or("no server certificate")?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(serial)
}

fn metric(agent: &Agent, name: &str) -> f64 {
    let body = agent.get("/metrics");
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

fn ready(agent: &Agent) -> (bool, String) {
    let body = agent.get("/readyz");
    (
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        body,
    )
}

struct Setup {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    ca: TestCa,
    cg: TestCgroup,
    pins: TestPins,
}

impl Setup {
    fn new(name: &str) -> Setup {
        Setup {
            rt: runtime(),
            dir: tempfile::tempdir().expect("tempdir"),
            ca: TestCa::new(TD),
            cg: TestCgroup::new(name),
            pins: TestPins::new(name),
        }
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    /// A Workload API serving one SVID of this trust domain at `path`.
    fn workload(&self, name: &str, path: &str, federated: &[&TestCa]) -> FakeSpire {
        let spire = FakeSpire::start(&self.rt, &self.socket(name));
        spire.push(
            &self.ca.issue(path, Duration::from_secs(3600)),
            &self.ca,
            federated,
        );
        spire
    }
}

#[test]
fn kernel_mtls_rotation_keeps_streams_and_new_handshakes_use_the_newest_svid() {
    if !kernel_available(
        "kernel_mtls_rotation_keeps_streams_and_new_handshakes_use_the_newest_svid",
    ) {
        return;
    }
    let _serial = timing_shared();
    let s = Setup::new("mtls-rotation");
    let agent_spire = s.workload("agent", "/agent", &[]);
    let ops = s.workload("ops", "/ops", &[]);
    let agent = start_agent(
        s.dir.path(),
        &s.cg,
        &s.pins,
        &format!(
            "spiffe_socket_path = \"{}\"\n[spiffe.authorized_ids]\npolicy_writers = [\"spiffe://{TD}/ops\"]\n",
            agent_spire.socket.display()
        ),
    );
    wait_until("the agent is ready", Duration::from_secs(20), || {
        ready(&agent).0
    });
    let addr = agent.grpc_addr();
    s.rt.block_on(async {
        let source = client_source(&ops.socket).await;
        let config = client_config(&source, &[TD]);
        let channel = tls::channel(addr, config.clone()).expect("channel");
        let mut events = AgentServiceClient::new(channel.clone())
            .watch_events(pb::WatchEventsRequest::default())
            .await
            .expect("WatchEvents over mTLS")
            .into_inner();
        let mut serials = vec![handshake(addr, config.clone()).await.expect("handshake")];
        let mut refused_at_swap = 0;
        for rotation in 1..=5 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let svid = s.ca.issue("/agent", Duration::from_secs(3600));
            agent_spire.push(&svid, &s.ca, &[]);
            // The agent takes the new SVID within moments; every new handshake then sees it.
            // (A refusal at the swap would be a bug: it is counted, and the count must be 0.)
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let seen = match handshake(addr, config.clone()).await {
                    Ok(seen) => seen,
                    Err(e) => {
                        refused_at_swap += 1;
                        eprintln!("rotation {rotation}: handshake refused during the swap: {e}");
                        assert!(Instant::now() < deadline, "rotation {rotation}: handshakes keep failing: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                if seen == svid.serial {
                    serials.push(seen);
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "rotation {rotation}: still serving {seen}, not {}",
                    svid.serial
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // The long-lived connection is the same one, still answering.
            AgentServiceClient::new(channel.clone())
                .get_status(pb::GetStatusRequest::default())
                .await
                .expect("GetStatus on the long-lived channel");
        }
        eprintln!("server serials across rotations: {serials:?}; handshakes refused at a swap: {refused_at_swap}");
        assert_eq!(refused_at_swap, 0, "handshakes refused at a swap");
        // The stream opened before the first rotation still delivers: a policy switch now.
        let mut writer = PolicyServiceClient::new(channel.clone());
        let mut policy = writer
            .get_policy(pb::GetPolicyRequest::default())
            .await
            .expect("GetPolicy")
            .into_inner()
            .policy
            .unwrap_or_default();
        policy.rules.push(pb::Rule {
            name: "audit-all".into(),
            action: pb::Action::Audit as i32,
            cidrs: vec!["0.0.0.0/0".into()],
            ..Default::default()
        });
        writer
            .apply_policy(pb::ApplyPolicyRequest {
                policy: Some(policy),
                ..Default::default()
            })
            .await
            .expect("ApplyPolicy as a policy writer");
        let event = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .expect("an event in time")
            .expect("the stream survived five rotations")
            .expect("an event");
        eprintln!("event after 5 rotations: {event:?}");
    });
    assert!(
        metric(&agent, "knhk_identity_svid_rotations_total") >= 5.0,
        "{}",
        agent.get("/metrics")
    );
    assert!(metric(&agent, "knhk_identity_svid_expiry_seconds") > 3000.0);
}

/// Twenty SVID rotations under a steady load of new handshakes: the agent keeps presenting the
/// previous certificate until the next one is fully built, so no handshake is refused at a swap,
/// and each new certificate is in use moments after the Workload API sends it.
#[test]
fn kernel_mtls_twenty_rotations_under_handshake_load_refuse_none() {
    if !kernel_available("kernel_mtls_twenty_rotations_under_handshake_load_refuse_none") {
        return;
    }
    let _serial = timing_shared();
    let s = Setup::new("mtls-rotation-load");
    let agent_spire = s.workload("agent", "/agent", &[]);
    let ops = s.workload("ops", "/ops", &[]);
    let agent = start_agent(
        s.dir.path(),
        &s.cg,
        &s.pins,
        &format!(
            "spiffe_socket_path = \"{}\"\n[spiffe.authorized_ids]\npolicy_writers = [\"spiffe://{TD}/ops\"]\n",
            agent_spire.socket.display()
        ),
    );
    wait_until("the agent is ready", Duration::from_secs(20), || {
        ready(&agent).0
    });
    let addr = agent.grpc_addr();
    const ROTATIONS: usize = 20;
    const LOADERS: usize = 3;
    s.rt.block_on(async {
        let source = client_source(&ops.socket).await;
        let config = client_config(&source, &[TD]);
        // Every handshake of the load: (serial presented) or why it was refused.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let loaders: Vec<_> = (0..LOADERS)
            .map(|_| {
                let config = config.clone();
                let stop = stop_rx.clone();
                let seen = seen_tx.clone();
                tokio::spawn(async move {
                    while !*stop.borrow() {
                        let result = handshake(addr, config.clone()).await;
                        if seen.send(result).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        drop(seen_tx);
        let mut refused: Vec<(usize, String)> = Vec::new();
        let mut per_rotation = vec![0usize; ROTATIONS + 1];
        let mut rotation = 0;
        // Takes the load's results until `serial` is presented (and then `more` handshakes).
        let mut drain = async |rotation: usize,
                               serial: &str,
                               more: usize,
                               refused: &mut Vec<(usize, String)>,
                               per_rotation: &mut Vec<usize>| {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut after = None;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let result = tokio::time::timeout(left, seen_rx.recv())
                    .await
                    .unwrap_or_else(|_| panic!("rotation {rotation}: {serial} not presented within 10 s"))
                    .expect("the load runs");
                per_rotation[rotation] += 1;
                match result {
                    Ok(seen) if seen == serial && after.is_none() => after = Some(0),
                    Ok(_) => {}
                    Err(e) => refused.push((rotation, e)),
                }
                if let Some(n) = after.as_mut() {
                    *n += 1;
                    if *n > more {
                        return;
                    }
                }
            }
        };
        let first = handshake(addr, config.clone()).await.expect("the first handshake");
        drain(0, &first, 50, &mut refused, &mut per_rotation).await;
        while rotation < ROTATIONS {
            rotation += 1;
            let svid = s.ca.issue("/agent", Duration::from_secs(3600));
            agent_spire.push(&svid, &s.ca, &[]);
            drain(rotation, &svid.serial, 50, &mut refused, &mut per_rotation).await;
        }
        stop_tx.send(true).expect("stop the load");
        for loader in loaders {
            loader.await.expect("a load task");
        }
        while let Some(result) = seen_rx.recv().await {
            per_rotation[ROTATIONS] += 1;
            if let Err(e) = result {
                refused.push((ROTATIONS, e));
            }
        }
        let total: usize = per_rotation.iter().sum();
        eprintln!(
            "{ROTATIONS} rotations under {LOADERS} handshake loops: {total} handshakes, {} refused; \
             handshakes per rotation window: {per_rotation:?}; refused: {refused:?}",
            refused.len()
        );
        assert!(refused.is_empty(), "handshakes refused at a swap: {refused:?}");
    });
    assert!(
        metric(&agent, "knhk_identity_svid_rotations_total") >= ROTATIONS as f64,
        "{}",
        agent.get("/metrics")
    );
}

#[test]
fn kernel_mtls_authorizes_each_rpc_by_spiffe_id() {
    if !kernel_available("kernel_mtls_authorizes_each_rpc_by_spiffe_id") {
        return;
    }
    let _serial = timing_shared();
    let s = Setup::new("mtls-authz");
    let partner = TestCa::new("partner.test");
    let evil = TestCa::new("evil.test");
    let agent_spire = s.workload("agent", "/agent", &[&partner]);
    let ops = s.workload("ops", "/ops", &[]);
    let monitor = s.workload("monitor", "/monitor", &[]);
    let other = s.workload("other", "/other", &[]);
    let partner_spire = FakeSpire::start(&s.rt, &s.socket("partner"));
    partner_spire.push(
        &partner.issue("/region/eu", Duration::from_secs(3600)),
        &partner,
        &[&s.ca],
    );
    let evil_spire = FakeSpire::start(&s.rt, &s.socket("evil"));
    evil_spire.push(
        &evil.issue("/ops", Duration::from_secs(3600)),
        &evil,
        &[&s.ca],
    );
    let agent = start_agent(
        s.dir.path(),
        &s.cg,
        &s.pins,
        &format!(
            "spiffe_socket_path = \"{}\"\nfederated_trust_domains = [\"partner.test\"]\n\
             [spiffe.authorized_ids]\npolicy_writers = [\"spiffe://{TD}/ops\"]\n\
             readers = [\"spiffe://{TD}/monitor\", \"spiffe://partner.test/region/*\"]\n",
            agent_spire.socket.display()
        ),
    );
    wait_until("the agent is ready", Duration::from_secs(20), || {
        ready(&agent).0
    });
    let addr = agent.grpc_addr();
    s.rt.block_on(async {
        let status = |socket: PathBuf, tds: &'static [&'static str]| async move {
            let source = client_source(&socket).await;
            let channel = tls::channel(addr, client_config(&source, tds)).expect("channel");
            AgentServiceClient::new(channel)
                .get_status(pb::GetStatusRequest::default())
                .await
        };
        let rollback = |socket: PathBuf| async move {
            let source = client_source(&socket).await;
            let channel = tls::channel(addr, client_config(&source, &[TD])).expect("channel");
            PolicyServiceClient::new(channel)
                .rollback(pb::RollbackRequest::default())
                .await
        };
        // The writer reads and writes (Rollback with nothing to roll back: FAILED_PRECONDITION,
        // i.e. authorized and then judged).
        status(ops.socket.clone(), &[TD])
            .await
            .expect("writer reads");
        let code = rollback(ops.socket.clone())
            .await
            .expect_err("nothing to roll back")
            .code();
        assert_eq!(
            code,
            tonic::Code::FailedPrecondition,
            "the writer got past authorization"
        );
        // A reader reads, but may not write.
        status(monitor.socket.clone(), &[TD])
            .await
            .expect("reader reads");
        let e = rollback(monitor.socket.clone())
            .await
            .expect_err("reader may not write");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains("spiffe://knhk.test/monitor")
                && e.message().contains("policy_writers"),
            "{e:?}"
        );
        // Another workload of the same trust domain: verified, but on no list.
        let e = status(other.socket.clone(), &[TD])
            .await
            .expect_err("not a reader");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // A federated trust domain whose bundle the agent has: accepted.
        status(partner_spire.socket.clone(), &[TD])
            .await
            .expect("federated reader");
        // A foreign trust domain without federation: the handshake fails.
        let source = client_source(&evil_spire.socket).await;
        let e = handshake(addr, client_config(&source, &[TD]))
            .await
            .expect_err("foreign domain refused");
        eprintln!("foreign trust domain: {e}");
        let e = status(evil_spire.socket.clone(), &[TD])
            .await
            .expect_err("foreign domain refused");
        assert_ne!(e.code(), tonic::Code::Ok);
        // No client certificate at all: no handshake.
        let bare = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_no_client_auth();
        let e = handshake(addr, Arc::new(bare))
            .await
            .expect_err("a client without an SVID is refused");
        eprintln!("no client certificate: {e}");
        // The partner's bundle leaves the agent's Workload API stream: its next handshake fails.
        agent_spire.push(&s.ca.issue("/agent", Duration::from_secs(3600)), &s.ca, &[]);
        let partner_source = client_source(&partner_spire.socket).await;
        let config = client_config(&partner_source, &[TD]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while handshake(addr, config.clone()).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "the removed bundle is still trusted"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // The CLI over mTLS, with its own SVID: a reader's `status` works, another workload's not.
    let cli = |socket: &Path| {
        std::process::Command::new(BIN)
            .args(["status", "--endpoint", &agent.grpc, "--spiffe-socket"])
            .arg(socket)
            .args(["--agent-id", &format!("spiffe://{TD}/agent")])
            .output()
            .expect("run the CLI")
    };
    let out = cli(&monitor.socket);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("policy generation"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = cli(&other.socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("permission denied"),
        "{stderr}"
    );

    let body = agent.get("/metrics");
    let denied = |surface: &str| {
        body.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "knhk_identity_authorization_denials_total{{surface=\"{surface}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(denied("policy_writers"), 1.0, "{body}");
    assert_eq!(denied("readers"), 2.0, "{body}");
}

/// A verifier for the no-certificate client, which must not fail on the server's side first.
#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[test]
fn kernel_identity_readiness_follows_the_workload_api_and_svid_age() {
    if !kernel_available("kernel_identity_readiness_follows_the_workload_api_and_svid_age") {
        return;
    }
    let _serial = timing_shared();
    let s = Setup::new("identity-age");
    let socket = s.socket("agent");
    // No Workload API yet: the agent runs, not ready, and says why.
    let agent = start_agent(
        s.dir.path(),
        &s.cg,
        &s.pins,
        &format!(
            "spiffe_socket_path = \"{}\"\nmax_svid_age_hours = 1\ninitial_sync_timeout_secs = 1\n",
            socket.display()
        ),
    );
    wait_until(
        "readiness reports the missing Workload API",
        Duration::from_secs(10),
        || {
            let (ok, body) = ready(&agent);
            !ok && body.contains("no SVID from the Workload API")
        },
    );
    // SPIRE arrives with a 26 h SVID issued 8 s short of the configured 1 h maximum age.
    let spire = FakeSpire::start(&s.rt, &socket);
    let issued = SystemTime::now() - Duration::from_secs(3600 - 8);
    let svid =
        s.ca.issue_at("/agent", issued, issued + Duration::from_secs(26 * 3600));
    spire.push(&svid, &s.ca, &[]);
    wait_until("the agent is ready", Duration::from_secs(40), || {
        ready(&agent).0
    });
    // No rotation: past the maximum age, readiness fails and the alarm is raised.
    wait_until(
        "readiness fails on the old SVID",
        Duration::from_secs(20),
        || {
            let (ok, body) = ready(&agent);
            !ok && body.contains("max_svid_age_hours = 1")
        },
    );
    assert_eq!(metric(&agent, "knhk_identity_svid_rotation_overdue"), 1.0);
    // The Workload API goes away: the last valid SVID keeps serving new handshakes.
    let ops = s.workload("ops", "/ops", &[]);
    spire.stop();
    s.rt.block_on(async {
        let source = client_source(&ops.socket).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let seen = handshake(agent.grpc_addr(), client_config(&source, &[TD]))
            .await
            .expect("still serving without the Workload API");
        assert_eq!(seen, svid.serial);
    });
    wait_until(
        "the stream is reported down",
        Duration::from_secs(10),
        || metric(&agent, "knhk_identity_workload_api_up") == 0.0,
    );
}

#[test]
fn kernel_identity_from_files_reloads_on_change_and_refuses_an_open_key() {
    if !kernel_available("kernel_identity_from_files_reloads_on_change_and_refuses_an_open_key") {
        return;
    }
    let _serial = timing_shared();
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new("identity-files");
    let (cert, key, ca) = (
        s.dir.path().join("svid.pem"),
        s.dir.path().join("svid.key"),
        s.dir.path().join("bundle.pem"),
    );
    let write = |svid: &Svid, mode: u32| {
        // Replace atomically, as a certificate manager does.
        for (path, text) in [
            (&cert, &svid.cert_pem),
            (&key, &svid.key_pem),
            (&ca, &s.ca.bundle_pem),
        ] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).expect("write");
            let m = if path == &key { mode } else { 0o644 };
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m)).expect("chmod");
            std::fs::rename(&tmp, path).expect("rename");
        }
    };
    let files = format!(
        "source = \"files\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
        cert.display(),
        key.display(),
        ca.display()
    );
    // A key readable by others: refused before anything is attached.
    write(&s.ca.issue("/agent", Duration::from_secs(3600)), 0o644);
    let config = write_config_tcp(
        s.dir.path(),
        &s.cg.path,
        &s.pins.root,
        &format!("[spiffe]\nenabled = true\ntrust_domain = \"{TD}\"\n{files}"),
    );
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("mode 0644") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    assert!(!s.pins.root.join("v1").exists(), "nothing was pinned");

    let first = s.ca.issue("/agent", Duration::from_secs(3600));
    write(&first, 0o600);
    let agent = start_agent(s.dir.path(), &s.cg, &s.pins, &files);
    wait_until("the agent is ready", Duration::from_secs(20), || {
        ready(&agent).0
    });
    let ops = s.workload("ops", "/ops", &[]);
    s.rt.block_on(async {
        let source = client_source(&ops.socket).await;
        let config = client_config(&source, &[TD]);
        assert_eq!(
            handshake(agent.grpc_addr(), config.clone())
                .await
                .expect("handshake"),
            first.serial
        );
        let second = s.ca.issue("/agent", Duration::from_secs(3600));
        write(&second, 0o600);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = handshake(agent.grpc_addr(), config.clone())
                .await
                .expect("handshake");
            if seen == second.serial {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replaced files were not picked up"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert!(agent.logs().contains("migration only"), "file mode warns");
}

#[test]
fn kernel_holds_accept_only_hold_writer_ids() {
    if !kernel_available("kernel_holds_accept_only_hold_writer_ids") {
        return;
    }
    let _serial = timing_shared();
    let s = Setup::new("mtls-holds");
    let agent_spire = s.workload("agent", "/agent", &[]);
    let ops = s.workload("ops", "/ops", &[]);
    let agent = start_agent(
        s.dir.path(),
        &s.cg,
        &s.pins,
        &format!(
            "spiffe_socket_path = \"{}\"\n[spiffe.authorized_ids]\npolicy_writers = [\"spiffe://{TD}/ops\"]\nhold_writers = [\"spiffe://{TD}/legal\"]\n\
             [kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n[receipts]\npath = \"{}\"\n",
            agent_spire.socket.display(),
            s.dir.path().join("keys").display(),
            s.dir.path().join("receipts.redb").display()
        ),
    );
    wait_until("the agent is ready", Duration::from_secs(20), || {
        ready(&agent).0
    });
    let addr = agent.grpc_addr();
    s.rt.block_on(async {
        // Legal holds have their own list: a policy writer may list them but not place one.
        let source = client_source(&ops.socket).await;
        let channel = tls::channel(addr, client_config(&source, &[TD])).expect("channel");
        let mut holds =
            knhk_agent::api::receipts::pb::hold_service_client::HoldServiceClient::new(channel);
        holds
            .list_holds(knhk_agent::api::receipts::pb::ListHoldsRequest {})
            .await
            .expect("a writer reads holds");
        let e = holds
            .place_hold(knhk_agent::api::receipts::pb::PlaceHoldRequest {
                hold: Some(knhk_agent::api::receipts::pb::Hold {
                    case_id: "C".into(),
                    reason: "r".into(),
                    region: "us-east-1".into(),
                    ..Default::default()
                }),
            })
            .await
            .expect_err("not a hold writer");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("hold_writers"), "{e:?}");
    });
}

#[test]
fn kernel_a_node_pushes_to_a_witness_over_mtls_and_only_region_peers_may_call_it() {
    if !kernel_available(
        "kernel_a_node_pushes_to_a_witness_over_mtls_and_only_region_peers_may_call_it",
    ) {
        return;
    }
    let _serial = timing_shared();
    let s = Setup::new("mtls-witness");
    let node_spire = s.workload("node", "/node/us-east-1/node-a", &[]);
    let witness_spire = s.workload("witness", "/witness/us-east-1", &[]);
    let ops = s.workload("ops", "/ops", &[]);
    // The witness serves mTLS with its SVID; callers must be nodes.
    let wdir = s.dir.path().join("witness");
    std::fs::create_dir_all(&wdir).expect("dir");
    let wconfig = wdir.join("witness.toml");
    std::fs::write(
        &wconfig,
        format!(
            "[spiffe]\nenabled = true\ntrust_domain = \"{TD}\"\nspiffe_socket_path = \"{}\"\n\
             [spiffe.authorized_ids]\nregion_peers = [\"spiffe://{TD}/node/*\"]\n",
            witness_spire.socket.display()
        ),
    )
    .expect("config");
    let w = support::witness::WitnessProcess::start_with(
        "witness.us-east-1",
        wdir,
        &["--config".into(), wconfig.display().to_string()],
    );
    // The node accepts only witness IDs as its witnesses.
    let dir = s.dir.path().join("node");
    std::fs::create_dir_all(&dir).expect("dir");
    let text = format!(
        "[agent]\ncgroup_root = \"{}\"\npin_root = \"{}\"\nmetrics_address = \"127.0.0.1:0\"\nlisten_address = \"127.0.0.1:{}\"\n\
         [slo]\nbeat_interval_ms = 25\n\
         [spiffe]\nenabled = true\ntrust_domain = \"{TD}\"\nspiffe_socket_path = \"{}\"\n\
         [spiffe.authorized_ids]\nregion_peers = [\"spiffe://{TD}/witness/*\"]\n\
         [kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n[receipts]\npath = \"{}\"\nnode = \"node-a\"\n\
         [multi_region]\nregion = \"us-east-1\"\ncross_region_sync_enabled = true\nreceipt_sync_endpoints = [\"https://{}\"]\nquorum = 1\ntimeout_ms = 1000\n",
        s.cg.path.display(),
        s.pins.root.display(),
        free_port(),
        node_spire.socket.display(),
        dir.join("keys").display(),
        dir.join("receipts.redb").display(),
        w.addr,
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).expect("config");
    let node = Agent::start(&path);
    wait_until(
        "the node commits through the witness over mTLS",
        Duration::from_secs(30),
        || metric(&node, "knhk_sync_quorum_committed_size") > 0.0,
    );
    assert!(ready(&node).0, "{}", node.get("/readyz"));
    // An operator's SVID completes the handshake but is not a region peer: the witness closes
    // the connection before any request.
    s.rt.block_on(async {
        let source = client_source(&ops.socket).await;
        let mut config = (*client_config(&source, &[TD])).clone();
        config.alpn_protocols.clear();
        let tcp = tokio::net::TcpStream::connect(w.addr)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::IpAddress(w.addr.ip().into());
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("the handshake itself succeeds");
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let _ = tls
            .write_all(b"GET /knhk/v1/origins HTTP/1.0\r\nHost: w\r\n\r\n")
            .await;
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        assert!(
            !String::from_utf8_lossy(&out).contains("200 OK"),
            "an ops ID must not be served: {}",
            String::from_utf8_lossy(&out)
        );
    });
}
