//! mTLS over the identity's [`X509Source`], for the gRPC server and for outbound clients.
//!
//! The rustls configs come from `spiffe-rustls`: they present the current SVID, verify the
//! peer's chain against the bundle of the peer's own trust domain (only the accepted ones: this
//! trust domain and `federated_trust_domains`), and take the peer's identity from its single
//! `spiffe://` URI SAN; host names play no part. Both read the source on every handshake, so a
//! rotation needs no restart. Session resumption is off (a resumed session would skip the
//! verifier). Per-RPC authorization happens above TLS, in the API layer, against the verified ID.

use crate::model::spiffe::IdMatcher;
use spiffe::{TrustDomain, X509Source};
use spiffe_rustls::TrustDomainPolicy;
use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{server::TlsStream, TlsAcceptor, TlsConnector};
use tokio_stream::Stream;

/// How long a peer may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn allow_list(trust_domains: &[TrustDomain]) -> TrustDomainPolicy {
    TrustDomainPolicy::AllowList(trust_domains.iter().cloned().collect::<BTreeSet<_>>())
}

/// The server's TLS config: any verified peer of `trust_domains` completes the handshake
/// (authorization per RPC comes after); ALPN h2.
pub fn server_config(
    source: X509Source,
    trust_domains: &[TrustDomain],
) -> Result<Arc<rustls::ServerConfig>, String> {
    spiffe_rustls::mtls_server(source)
        .trust_domain_policy(allow_list(trust_domains))
        .with_alpn_protocols([b"h2"])
        .build()
        .map(Arc::new)
        .map_err(|e| format!("building the mTLS server config: {e}"))
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
/// slow or failing peer holds up no one); yields the established streams, for tonic's
/// `serve_with_incoming`. Ends when the consumer drops it.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
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
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
