//! A small HTTP/1.1 client for one witness: one kept-alive connection (plaintext, or mTLS with
//! the node's SVID), reopened after any failure, every call bounded by a timeout.

use crate::config::Peer;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::net::TcpStream;

/// The largest response body read from a witness.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// A response: status, content type, body text.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: String,
    /// The body, as text.
    pub body: String,
}

/// A connection to one witness.
pub struct WitnessClient {
    peer: Peer,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl WitnessClient {
    /// A client for `peer` (`tls` required for `https://` peers).
    pub fn new(peer: Peer, tls: Option<Arc<rustls::ClientConfig>>, timeout: Duration) -> Self {
        WitnessClient {
            peer,
            tls,
            timeout,
            sender: None,
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let endpoint = &self.peer.endpoint;
        let addr: SocketAddr = tokio::net::lookup_host(&self.peer.authority)
            .await
            .map_err(|e| format!("{endpoint}: cannot resolve {}: {e}", self.peer.authority))?
            .next()
            .ok_or_else(|| format!("{endpoint}: {} resolves to no address", self.peer.authority))?;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{endpoint}: connecting to {addr}: {e}"))?;
        // Small requests and replies: no Nagle delay (if refused, only slower).
        let _ = tcp.set_nodelay(true);
        macro_rules! handshake {
            ($io:expr) => {{
                let (sender, conn) = hyper::client::conn::http1::handshake($io)
                    .await
                    .map_err(|e| format!("{endpoint}: HTTP handshake: {e}"))?;
                tokio::spawn(async move {
                    // The connection ends when the sender is dropped or the peer closes.
                    let _ = conn.await;
                });
                sender
            }};
        }
        Ok(match (&self.tls, self.peer.tls) {
            (_, false) => handshake!(hyper_util::rt::TokioIo::new(tcp)),
            (Some(config), true) => {
                // SPIFFE authenticates by the URI SAN; the name only fills the ClientHello.
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("{endpoint}: mTLS handshake: {e}"))?;
                handshake!(hyper_util::rt::TokioIo::new(tls))
            }
            (None, true) => {
                return Err(format!(
                    "{endpoint}: https witnesses need [spiffe] enabled = true (mTLS)"
                ))
            }
        })
    }

    /// Sends one request; on any failure the connection is dropped (the next call reopens it).
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Reply, String> {
        let result = tokio::time::timeout(
            self.timeout,
            self.call_inner(method, path, content_type, body),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "{}: no answer within {} ms",
                self.peer.endpoint,
                self.timeout.as_millis()
            ))
        });
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn call_inner(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Reply, String> {
        let endpoint = self.peer.endpoint.clone();
        let mut sender = match self.sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        sender
            .ready()
            .await
            .map_err(|e| format!("{endpoint}: connection lost: {e}"))?;
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.peer.authority)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("{endpoint}: building the request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{endpoint}: {method} {path}: {e}"))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| format!("{endpoint}: reading the reply to {path}: {e}"))?
            .to_bytes();
        self.sender = Some(sender);
        Ok(Reply {
            status,
            content_type,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }
}
