//! A stand-in for SPIRE, which cannot be installed here: a certificate authority per trust
//! domain (`rcgen`) and a SPIFFE Workload API server on a Unix socket that speaks the real
//! protocol (`proto/spiffe/workload.proto`; the agent's `X509SvidServer`, which it also uses for
//! its file source): it requires the `workload.spiffe.io: true` header and streams full X.509-SVID
//! responses, each replacing
//! the last (anything absent, such as a federated bundle, is revoked). Tests push rotations and
//! bundle changes with [`FakeSpire::push`].

use knhk_agent::identity::workload_api::{
    pb::{X509svid, X509svidResponse},
    X509SvidServer,
};
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};
use tokio::sync::watch;

/// A trust domain's certificate authority.
pub struct TestCa {
    /// Trust domain name.
    pub trust_domain: String,
    key: rcgen::KeyPair,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate, DER (the trust bundle).
    pub bundle: Vec<u8>,
    /// The CA certificate, PEM.
    pub bundle_pem: String,
}

/// An issued X.509-SVID.
#[derive(Clone, Debug)]
pub struct Svid {
    /// Its SPIFFE ID.
    pub id: String,
    /// Leaf certificate, DER.
    pub cert: Vec<u8>,
    /// PKCS#8 private key, DER.
    pub key: Vec<u8>,
    /// Leaf serial, as x509-parser prints it (hex bytes joined by ':').
    pub serial: String,
    /// PEM of the leaf and of the key, for file identities.
    pub cert_pem: String,
    /// PEM of the key.
    pub key_pem: String,
}

static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl TestCa {
    /// A new CA for `trust_domain`.
    pub fn new(trust_domain: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(format!("spiffe://{trust_domain}")).expect("uri"),
        )];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{trust_domain} test CA"));
        let cert = params.self_signed(&key).expect("CA certificate");
        let bundle = cert.der().to_vec();
        let bundle_pem = cert.pem();
        let issuer_key = rcgen::KeyPair::from_pem(&key.serialize_pem()).expect("key copy");
        let issuer = rcgen::Issuer::new(params, issuer_key);
        TestCa {
            trust_domain: trust_domain.to_owned(),
            key,
            issuer,
            bundle,
            bundle_pem,
        }
    }

    /// An SVID for `path` (e.g. `/agent`) valid from `not_before` to `not_after`.
    pub fn issue_at(&self, path: &str, not_before: SystemTime, not_after: SystemTime) -> Svid {
        self.issue_with_uris(
            &[format!("spiffe://{}{path}", self.trust_domain)],
            not_before,
            not_after,
        )
    }

    /// An SVID for `path` valid from a minute ago for `lifetime`.
    pub fn issue(&self, path: &str, lifetime: Duration) -> Svid {
        let now = SystemTime::now();
        self.issue_at(path, now - Duration::from_secs(60), now + lifetime)
    }

    /// A leaf with exactly these URI SANs.
    pub fn issue_with_uris(
        &self,
        uris: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Svid {
        let _ = &self.key;
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = uris
            .iter()
            .map(|u| {
                rcgen::SanType::URI(rcgen::string::Ia5String::try_from(u.as_str()).expect("uri"))
            })
            .collect();
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        params.serial_number = Some(rcgen::SerialNumber::from(serial.to_be_bytes().to_vec()));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
            rcgen::KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Svid {
            id: uris.first().cloned().unwrap_or_default(),
            cert: cert.der().to_vec(),
            key: key.serialize_der(),
            serial: serial_string(cert.der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// The serial of a DER certificate, as x509-parser prints it.
pub fn serial_string(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(der)
        .map(|(_, c)| c.raw_serial_as_string())
        .unwrap_or_default()
}

/// A Workload API server on a Unix socket, streaming whatever was last pushed.
pub struct FakeSpire {
    /// The socket.
    pub socket: PathBuf,
    tx: watch::Sender<Option<X509svidResponse>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeSpire {
    /// Serves on `socket` (replacing a stale file) from `runtime`; streams start when the first
    /// response is pushed.
    pub fn start(runtime: &tokio::runtime::Runtime, socket: &Path) -> FakeSpire {
        let _ = std::fs::remove_file(socket);
        let (tx, rx) = watch::channel(None);
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(socket).expect("bind the Workload API socket")
        };
        let task = runtime.spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(X509SvidServer::service(rx))
                .serve_with_incoming(incoming)
                .await;
        });
        FakeSpire {
            socket: socket.to_owned(),
            tx,
            task,
        }
    }

    /// Streams a full response: `svid` with its own trust domain's bundle, plus `federated`
    /// (CA, bundle) pairs. Whatever the previous response had and this one lacks is revoked.
    pub fn push(&self, svid: &Svid, own: &TestCa, federated: &[&TestCa]) {
        let response = X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: svid.id.clone(),
                x509_svid: svid.cert.clone(),
                x509_svid_key: svid.key.clone(),
                bundle: own.bundle.clone(),
                hint: String::new(),
            }],
            crl: vec![],
            federated_bundles: federated
                .iter()
                .map(|ca| (format!("spiffe://{}", ca.trust_domain), ca.bundle.clone()))
                .collect(),
        };
        let _ = self.tx.send(Some(response));
    }

    /// Stops serving and removes the socket (the Workload API is down).
    pub fn stop(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}
