//! Per-RPC SPIFFE-ID authorization: a tower layer in front of every gRPC service.
//!
//! The TLS handshake has already verified the peer's SVID (chain against the bundle of an
//! accepted trust domain). This layer takes the peer's SPIFFE ID from the verified leaf
//! certificate, maps the RPC's path to its [`Surface`], and answers `UNAUTHENTICATED` when
//! there is no verified ID and `PERMISSION_DENIED` when the ID is not on the surface's
//! allow-list, before the service sees the request.

use crate::{
    identity::Identity,
    model::spiffe::{peer_id, Surface},
};
use std::{
    sync::Arc,
    task::{Context, Poll},
};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The surface an RPC path belongs to.
pub fn surface_of(path: &str) -> Surface {
    match path {
        "/knhk.agent.v1.PolicyService/ApplyPolicy"
        | "/knhk.agent.v1.PolicyService/Rollback"
        | "/knhk.agent.v1.RolloutService/StartRollout"
        | "/knhk.agent.v1.RolloutService/PromoteRollout"
        | "/knhk.agent.v1.RolloutService/PauseRollout"
        | "/knhk.agent.v1.RolloutService/ResumeRollout"
        | "/knhk.agent.v1.RolloutService/AbortRollout" => Surface::PolicyWrite,
        p if p.starts_with("/grpc.health.v1.Health/") => Surface::Health,
        "/knhk.receipts.v1.HoldService/PlaceHold" | "/knhk.receipts.v1.HoldService/ReleaseHold" => {
            Surface::HoldWrite
        }
        p if p.starts_with("/knhk.sync.v1.") => Surface::RegionPeer,
        _ => Surface::Read,
    }
}

/// The layer: authorization with `identity`'s access policy, or none (plaintext loopback).
#[derive(Clone, Debug)]
pub struct AuthzLayer {
    identity: Option<Arc<Identity>>,
}

impl AuthzLayer {
    /// Authorizes every call against `identity`'s policy; `None` lets every call through.
    pub fn new(identity: Option<Arc<Identity>>) -> AuthzLayer {
        AuthzLayer { identity }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            identity: self.identity.clone(),
        }
    }
}

/// The service of [`AuthzLayer`].
#[derive(Clone, Debug)]
pub struct Authz<S> {
    inner: S,
    identity: Option<Arc<Identity>>,
}

impl<S, B> tower::Service<http::Request<B>> for Authz<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(identity) = &self.identity {
            if let Err(status) = authorize(identity, &req) {
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        Box::pin(self.inner.call(req))
    }
}

/// `Ok` when the verified peer may call this RPC.
#[allow(clippy::result_large_err)]
fn authorize<B>(identity: &Identity, req: &http::Request<B>) -> Result<(), tonic::Status> {
    let surface = surface_of(req.uri().path());
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs());
    let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
        identity.count_denial(surface);
        return Err(tonic::Status::unauthenticated(
            "this API needs mTLS with a SPIFFE X.509-SVID; no verified client certificate was presented",
        ));
    };
    let id = peer_id(leaf.as_ref()).map_err(|e| {
        identity.count_denial(surface);
        tonic::Status::unauthenticated(e.to_string())
    })?;
    if identity.settings().access.allows(surface, &id) {
        return Ok(());
    }
    identity.count_denial(surface);
    tracing::warn!(peer = %id, rpc = req.uri().path(), surface = surface.as_str(), "gRPC call refused by SPIFFE-ID authorization");
    Err(tonic::Status::permission_denied(format!(
        "{id} may not call {}: it is not in spiffe.authorized_ids.{}",
        req.uri().path(),
        match surface {
            Surface::Read => "readers (nor policy_writers or hold_writers)",
            s => s.as_str(),
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_paths_map_to_surfaces() {
        assert_eq!(
            surface_of("/knhk.agent.v1.PolicyService/ApplyPolicy"),
            Surface::PolicyWrite
        );
        assert_eq!(
            surface_of("/knhk.agent.v1.PolicyService/Rollback"),
            Surface::PolicyWrite
        );
        assert_eq!(
            surface_of("/knhk.agent.v1.RolloutService/AbortRollout"),
            Surface::PolicyWrite
        );
        assert_eq!(
            surface_of("/knhk.agent.v1.PolicyService/DryRun"),
            Surface::Read
        );
        assert_eq!(
            surface_of("/knhk.agent.v1.AgentService/WatchEvents"),
            Surface::Read
        );
        assert_eq!(surface_of("/grpc.health.v1.Health/Check"), Surface::Health);
        assert_eq!(
            surface_of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Surface::Read
        );
    }
}
