//! Checkpoint signers: keys that never leave a KMS (AWS KMS, Vault/OpenBao transit), or a
//! local file for development. All sign with ECDSA P-256 over SHA-256 and return DER
//! signatures, so every signature verifies offline with the key's public key alone
//! ([`verify_signature`]).

mod file;
pub use file::FileSigner;
#[cfg(feature = "aws-kms")]
mod aws;
#[cfg(feature = "aws-kms")]
pub use aws::AwsSigner;
#[cfg(feature = "vault")]
mod vault;
#[cfg(feature = "vault")]
pub use vault::VaultSigner;

use super::format::KeyRef;
use crate::config::SignerSettings;
use std::sync::Arc;

/// A key version with its public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Id and version.
    pub key: KeyRef,
    /// SubjectPublicKeyInfo, DER.
    pub public_key_der: Vec<u8>,
}

/// Why a KMS call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignerError {
    /// The KMS could not be reached or failed (worth retrying).
    #[error("{provider} is unavailable: {message}")]
    Unavailable {
        /// Provider name.
        provider: &'static str,
        /// What happened.
        message: String,
    },
    /// The KMS refused (a configuration problem: retrying will not help).
    #[error("{provider} refused: {message}")]
    Refused {
        /// Provider name.
        provider: &'static str,
        /// What happened.
        message: String,
    },
}

impl SignerError {
    /// Whether retrying may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, SignerError::Unavailable { .. })
    }
}

/// A signing key held by a KMS.
#[tonic::async_trait]
pub trait Signer: Send + Sync + std::fmt::Debug {
    /// The provider's name (`aws`, `vault`, `file`).
    fn provider(&self) -> &'static str;

    /// The key version new checkpoints are signed with, and its public key.
    async fn current(&self) -> Result<KeyInfo, SignerError>;

    /// An ECDSA P-256 / SHA-256 signature (DER) of `message` with `key`.
    async fn sign(&self, key: &KeyRef, message: &[u8]) -> Result<Vec<u8>, SignerError>;

    /// Makes a new key version current (AWS: a new key behind the alias; Vault: a new transit
    /// key version; file: a new key file) and returns it. Old versions stay usable for
    /// verification.
    async fn rotate(&self) -> Result<KeyInfo, SignerError>;
}

/// Whether `signature` (DER) is a valid ECDSA P-256 / SHA-256 signature of `message` by the key
/// whose SubjectPublicKeyInfo is `public_key_der`.
pub fn verify_signature(public_key_der: &[u8], message: &[u8], signature: &[u8]) -> bool {
    use p256::{
        ecdsa::{signature::Verifier, Signature, VerifyingKey},
        pkcs8::DecodePublicKey,
    };
    let Ok(key) = VerifyingKey::from_public_key_der(public_key_der) else {
        return false;
    };
    let Ok(sig) = Signature::from_der(signature) else {
        return false;
    };
    // KMS signatures may carry a high S; ECDSA accepts either form.
    let sig = sig.normalize_s();
    key.verify(message, &sig).is_ok()
}

/// A P-256 public key given as PEM, as DER.
pub(crate) fn public_key_pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
    let key = p256::PublicKey::from_public_key_pem(pem).map_err(|e| e.to_string())?;
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .map_err(|e| e.to_string())
}

/// Connects the signer. Fails only on local problems (a missing token, a bad key file);
/// an unreachable KMS shows later, as queued checkpoints.
pub async fn connect(settings: &SignerSettings) -> Result<Arc<dyn Signer>, SignerError> {
    match settings {
        #[cfg(feature = "aws-kms")]
        SignerSettings::Aws {
            region,
            key_id,
            endpoint_url,
        } => Ok(Arc::new(
            AwsSigner::new(region, key_id, endpoint_url.as_deref()).await,
        )),
        #[cfg(feature = "vault")]
        SignerSettings::Vault {
            addr,
            mount,
            key_name,
            token_file,
        } => {
            let token = match token_file {
                Some(f) => std::fs::read_to_string(f)
                    .map(|t| t.trim().to_owned())
                    .map_err(|e| SignerError::Refused {
                        provider: "vault",
                        message: format!("kms.token_file {}: {e}", f.display()),
                    })?,
                None => std::env::var("VAULT_TOKEN").map_err(|_| SignerError::Refused {
                    provider: "vault",
                    message: "no token: set kms.token_file or VAULT_TOKEN".into(),
                })?,
            };
            Ok(Arc::new(VaultSigner::new(addr, &token, mount, key_name)?))
        }
        SignerSettings::File { key_dir } => {
            tracing::warn!(
                key_dir = %key_dir.display(),
                "receipts are signed with a LOCAL FILE KEY: for development only; use kms.provider = \"aws\" or \"vault\""
            );
            Ok(Arc::new(FileSigner::open(key_dir)?))
        }
        #[allow(unreachable_patterns)]
        _ => Err(SignerError::Refused {
            provider: "kms",
            message: "this build of knhk-agent lacks that provider (cargo features aws-kms, vault)"
                .into(),
        }),
    }
}
