//! The SPIFFE Workload API's server side (generated from `proto/spiffe/workload.proto`), and the
//! one rule every Workload API server enforces: requests carry the `workload.spiffe.io: true`
//! metadata header (a guard against SSRF-style forwarding).
//!
//! The agent serves it only for its file identity source ([`super::files`]); tests use it to
//! stand in for SPIRE. Clients are always the `spiffe` crate's own.

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
