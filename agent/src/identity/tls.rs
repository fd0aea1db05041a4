//! mTLS over the identity's [`X509Source`], for the gRPC server and for outbound clients.
//!
//! Both present the current SVID, verify the peer's chain against the bundle of the peer's own
//! trust domain (only the accepted ones: this trust domain and `federated_trust_domains`), and
//! take the peer's identity from its single `spiffe://` URI SAN; host names play no part. The
//! server ([`ServerTls`]) builds one complete config per SVID revision and swaps it in whole, so
//! the previous certificate serves until the next is ready; clients use `spiffe-rustls`, which
//! reads the source on every handshake. A rotation needs no restart. Session resumption is off (a resumed session would skip the
//! verifier). Per-RPC authorization happens above TLS, in the API layer, against the verified ID.

use crate::model::spiffe::IdMatcher;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use spiffe::{TrustDomain, X509Source};
use spiffe_rustls::TrustDomainPolicy;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{server::TlsStream, LazyConfigAcceptor, TlsConnector};
use tokio_stream::Stream;

/// How long a peer may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn allow_list(trust_domains: &[TrustDomain]) -> TrustDomainPolicy {
    TrustDomainPolicy::AllowList(trust_domains.iter().cloned().collect::<BTreeSet<_>>())
}

/// The gRPC server's mTLS: one complete rustls config per SVID revision, built beside the one in
/// use and then swapped in whole (as the SPIRE agent and ztunnel do). Each handshake takes the
/// config in use when its ClientHello arrives and keeps it to the end, so a rotation never leaves
/// a handshake without a certificate or a verifier: until the next SVID is converted, the
/// previous one is presented. A revision that cannot be built (no usable SVID, no bundle of an
/// accepted trust domain) is logged and the last good config stays in use; the identity's
/// readiness check reports the SVID itself.
///
/// Any verified peer of the accepted trust domains completes the handshake (authorization per
/// RPC comes after): its leaf must carry exactly one `spiffe://` URI SAN, and its chain must
/// verify (WebPKI: validity, client-auth usage, no CA as leaf) against the bundle of its own
/// trust domain. ALPN h2; session resumption off.
#[derive(Clone)]
pub struct ServerTls {
    source: X509Source,
    trust_domains: Arc<Vec<TrustDomain>>,
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("trust_domains", &self.trust_domains)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Builds the config of the source's current SVID; fails when it has none usable.
    pub fn new(source: X509Source, trust_domains: &[TrustDomain]) -> Result<ServerTls, String> {
        let config = build_server_config(&source, trust_domains)?;
        Ok(ServerTls {
            source,
            trust_domains: Arc::new(trust_domains.to_vec()),
            current: Arc::new(RwLock::new(config)),
        })
    }

    /// The config in use now (the one a handshake starting now gets).
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        // A poisoned lock still holds a complete config (it is only ever replaced whole).
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Builds the config of the source's current SVID and swaps it in; on failure the config
    /// in use stays.
    fn refresh(&self) -> Result<(), String> {
        let config = build_server_config(&self.source, &self.trust_domains)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// Rebuilds on every new revision of the source until `stop` resolves or the source closes.
    async fn follow(self, stop: impl std::future::Future<Output = ()>) {
        let mut updates = self.source.updated();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = &mut stop => return,
            }
            if let Err(e) = self.refresh() {
                tracing::error!(
                    "the new SVID revision cannot serve mTLS, still presenting the previous \
                     certificate: {e}"
                );
            }
        }
    }
}

/// One complete server config from one coherent view of the source.
fn build_server_config(
    source: &X509Source,
    trust_domains: &[TrustDomain],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let state = source.state();
    let svid = state.svid().map_err(|e| format!("no usable SVID: {e}"))?;
    let context = state
        .context()
        .map_err(|e| format!("no X.509 context: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut by_trust_domain = BTreeMap::new();
    for td in trust_domains {
        let Some(bundle) = context.bundle_set().get(td) else {
            // A federated domain without a bundle yet: its peers are refused until it comes.
            tracing::debug!(trust_domain = %td, "no bundle for an accepted trust domain");
            continue;
        };
        let mut roots = rustls::RootCertStore::empty();
        let (_, bad) = roots.add_parsable_certificates(
            bundle
                .authorities()
                .iter()
                .map(|c| rustls::pki_types::CertificateDer::from(c.as_bytes().to_vec())),
        );
        if roots.is_empty() {
            tracing::warn!(trust_domain = %td, bad, "the bundle has no usable authority");
            continue;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("the verifier of trust domain {td}: {e}"))?;
        by_trust_domain.insert(td.to_string(), verifier);
    }
    if by_trust_domain.is_empty() {
        return Err("no bundle of an accepted trust domain is usable".into());
    }
    let chain: Vec<_> = svid
        .cert_chain()
        .iter()
        .map(|c| rustls::pki_types::CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key =
        rustls::pki_types::PrivateKeyDer::Pkcs8(svid.private_key().as_bytes().to_vec().into());
    let verifier = Arc::new(SpiffeClientVerifier {
        by_trust_domain,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("the SVID's certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: a resumed session would skip the verifier.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Verifies a client's X.509-SVID against the bundle of the trust domain its SPIFFE ID names.
#[derive(Debug)]
struct SpiffeClientVerifier {
    by_trust_domain: BTreeMap<String, Arc<dyn ClientCertVerifier>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

fn refused(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(std::io::Error::other(why)),
    )))
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = crate::model::spiffe::peer_id(end_entity.as_ref())
            .map_err(|e| refused(e.to_string()))?;
        let td = id.trust_domain().to_string();
        let verifier = self
            .by_trust_domain
            .get(&td)
            .ok_or_else(|| refused(format!("{id}: trust domain {td} is not accepted")))?;
        verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client's TLS config: the server must prove an ID of `trust_domains` that one of
/// `server_ids` matches (every ID of those domains when `server_ids` is empty); ALPN h2.
pub fn client_config(
    source: X509Source,
    trust_domains: &[TrustDomain],
    server_ids: Vec<IdMatcher>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    spiffe_rustls::mtls_client(source)
        .trust_domain_policy(allow_list(trust_domains))
        .authorize(move |id: &spiffe::SpiffeId| {
            server_ids.is_empty() || server_ids.iter().any(|m| m.matches(id))
        })
        .with_alpn_protocols([b"h2"])
        .build()
        .map(Arc::new)
        .map_err(|e| format!("building the mTLS client config: {e}"))
}

/// Accepts TCP connections on `listener` and completes their TLS handshakes concurrently (a
/// slow or failing peer holds up no one), each with the config `tls` has in use when its
/// ClientHello arrives; follows the SVID's rotations meanwhile. Yields the established
/// streams, for tonic's `serve_with_incoming`. Ends when the consumer drops it.
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let follower = {
        let tx = tx.clone();
        tls.clone().follow(async move { tx.closed().await })
    };
    tokio::spawn(follower);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("accepting a gRPC connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            // No Nagle, so small responses do not wait for a delayed ACK; if refused, only slower.
            let _ = tcp.set_nodelay(true);
            let tls = tls.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = async {
                    let start =
                        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
                    start.into_stream(tls.current()).await
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(tls)) => {
                        // The server stopped accepting: the connection is dropped.
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%peer, "mTLS handshake refused: {e}");
                    }
                    Err(_) => tracing::info!(%peer, "mTLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A gRPC channel to `addr` over mTLS with `config` (connected lazily, reconnecting as tonic
/// does).
pub fn channel(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, String> {
    let connector = TlsConnector::from(config);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("{addr}: {e}"))?
        .connect_timeout(HANDSHAKE_TIMEOUT)
        .tcp_nodelay(true);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                // SPIFFE authenticates by the URI SAN; the name only fills the ClientHello.
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })),
    )
}
