//! The SPIFFE Workload API's server side (generated from `proto/spiffe/workload.proto`), and the
//! one rule every Workload API server enforces: requests carry the `workload.spiffe.io: true`
//! metadata header (a guard against SSRF-style forwarding).
//!
//! [`X509SvidServer`] serves X.509-SVIDs from a `watch` channel: the agent uses it for its file
//! identity source ([`super::files`]); tests use it to stand in for SPIRE. Clients are always
//! the `spiffe` crate's own.

/// Generated types and the `SpiffeWorkloadApi` server trait.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// The metadata header every Workload API request must carry, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// `Ok` when `metadata` carries the security header; otherwise the status SPIRE answers with.
#[allow(clippy::result_large_err)]
pub fn check_security_header(metadata: &tonic::metadata::MetadataMap) -> Result<(), tonic::Status> {
    match metadata.get(SECURITY_HEADER).map(|v| v.to_str()) {
        Some(Ok("true")) => Ok(()),
        _ => Err(tonic::Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// The DER encoding of a certificate chain as the Workload API carries it: concatenated.
pub fn concat_der<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    certs.into_iter().flat_map(|c| c.iter().copied()).collect()
}

use pb::{
    spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer},
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest,
    X509svidResponse,
};
use std::pin::Pin;
use tokio_stream::{wrappers::WatchStream, Stream, StreamExt};
use tonic::{Request, Response, Status};

/// A Workload API that streams X.509-SVID responses: each new value of the channel is sent as a
/// full response (`None`: nothing yet, streams wait). The other RPCs are `UNIMPLEMENTED`.
#[derive(Debug)]
pub struct X509SvidServer {
    current: tokio::sync::watch::Receiver<Option<X509svidResponse>>,
}

impl X509SvidServer {
    /// The gRPC service over `current`.
    pub fn service(
        current: tokio::sync::watch::Receiver<Option<X509svidResponse>>,
    ) -> SpiffeWorkloadApiServer<X509SvidServer> {
        SpiffeWorkloadApiServer::new(X509SvidServer { current })
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn x509_only() -> Status {
    Status::unimplemented("this Workload API serves X.509-SVIDs only")
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for X509SvidServer {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_security_header(request.metadata())?;
        let stream = WatchStream::new(self.current.clone()).filter_map(|r| r.map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_x509_bundles(
        &self,
        _: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(x509_only())
    }

    async fn fetch_jwtsvid(
        &self,
        _: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(x509_only())
    }

    async fn fetch_jwt_bundles(
        &self,
        _: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(x509_only())
    }

    async fn validate_jwtsvid(
        &self,
        _: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(x509_only())
    }
}
