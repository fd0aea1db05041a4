//! Checkpoint signers: keys that never leave a KMS (AWS KMS, Vault/OpenBao transit, Azure Key
//! Vault), or a local file for development. All sign with ECDSA P-256 over SHA-256 and return DER
//! signatures, so every signature verifies offline with the key's public key alone
//! ([`verify_signature`]). What providers share beyond the [`Signer`] trait lives here: HTTP
//! status classification (throttling included), JWK and raw-signature conversions.

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
#[cfg(feature = "azure")]
mod azure;
#[cfg(feature = "azure")]
pub use azure::{AzureConnection, AzureCredential, AzureSigner};

use super::format::KeyRef;
use crate::config::SignerSettings;
use std::{sync::Arc, time::Duration};

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
    /// The KMS throttled the call (HTTP 429): retried like [`SignerError::Unavailable`], after
    /// `retry_after` when the KMS said how long to wait.
    #[error("{provider} is throttling: {message}")]
    Throttled {
        /// Provider name.
        provider: &'static str,
        /// What happened.
        message: String,
        /// The KMS's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
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
        matches!(
            self,
            SignerError::Unavailable { .. } | SignerError::Throttled { .. }
        )
    }

    /// How long the KMS asked to be left alone (a throttled call's `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SignerError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The error for an HTTP KMS answer with `status` (not 2xx): 429 is throttling (with the
/// `Retry-After` given), 408 and 5xx may pass (unavailable), any other status is a refusal.
#[cfg_attr(not(any(feature = "azure", feature = "vault")), allow(dead_code))]
pub(crate) fn http_status_error(
    provider: &'static str,
    status: u16,
    retry_after: Option<Duration>,
    message: String,
) -> SignerError {
    match status {
        429 => SignerError::Throttled {
            provider,
            message,
            retry_after,
        },
        408 | 500..=599 => SignerError::Unavailable { provider, message },
        _ => SignerError::Refused { provider, message },
    }
}

/// An HTTP `Retry-After` value in seconds (the form KMS APIs send); an HTTP date or anything
/// else is `None` (the shared backoff then decides).
#[cfg_attr(not(feature = "azure"), allow(dead_code))]
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    // An HTTP date or garbage: no hint, the backoff's own delay stands.
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The SubjectPublicKeyInfo (DER) of the P-256 point with affine coordinates `x` and `y` (a
/// JWK's `x` and `y`, decoded); an error says why it is not a P-256 public key.
#[cfg_attr(not(feature = "azure"), allow(dead_code))]
pub(crate) fn p256_public_key_der(x: &[u8], y: &[u8]) -> Result<Vec<u8>, String> {
    use p256::pkcs8::EncodePublicKey;
    if x.len() != 32 || y.len() != 32 {
        return Err(format!(
            "x and y must be 32 bytes each for P-256, not {} and {}",
            x.len(),
            y.len()
        ));
    }
    let mut sec1 = Vec::with_capacity(65);
    sec1.push(0x04);
    sec1.extend_from_slice(x);
    sec1.extend_from_slice(y);
    let key = p256::PublicKey::from_sec1_bytes(&sec1)
        .map_err(|_| "x, y is not a point on the P-256 curve".to_string())?;
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .map_err(|e| e.to_string())
}

/// A fixed-size ECDSA P-256 signature (`r || s`, 64 bytes, as JOSE and Azure Key Vault return
/// it) as DER.
#[cfg_attr(not(feature = "azure"), allow(dead_code))]
pub(crate) fn p256_signature_der(raw: &[u8]) -> Result<Vec<u8>, String> {
    let sig = p256::ecdsa::Signature::from_slice(raw).map_err(|_| {
        format!(
            "an ES256 signature is 64 bytes (r || s) with r and s in range; got {} bytes",
            raw.len()
        )
    })?;
    Ok(sig.to_der().as_bytes().to_vec())
}

/// A signing key held by a KMS.
#[tonic::async_trait]
pub trait Signer: Send + Sync + std::fmt::Debug {
    /// The provider's name (`aws`, `vault`, `azure`, `file`).
    fn provider(&self) -> &'static str;

    /// The key version new checkpoints are signed with, and its public key.
    async fn current(&self) -> Result<KeyInfo, SignerError>;

    /// An ECDSA P-256 / SHA-256 signature (DER) of `message` with `key`.
    async fn sign(&self, key: &KeyRef, message: &[u8]) -> Result<Vec<u8>, SignerError>;

    /// Makes a new key version current (AWS: a new key behind the alias; Vault: a new transit
    /// key version; Azure: a new version of the Key Vault key; file: a new key file) and returns
    /// it. Old versions stay usable for verification.
    async fn rotate(&self) -> Result<KeyInfo, SignerError>;
}

/// Whether `signature` (DER) is a valid ECDSA P-256 / SHA-256 signature of `message` by the key
/// whose SubjectPublicKeyInfo is `public_key_der` (one implementation, shared with signed
/// objects: [`crate::objectstore::signed::verify_signature`]).
pub fn verify_signature(public_key_der: &[u8], message: &[u8], signature: &[u8]) -> bool {
    crate::objectstore::signed::verify_signature(public_key_der, message, signature)
}

/// A P-256 public key given as PEM, as DER.
pub(crate) fn public_key_pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    crate::objectstore::signed::public_key_pem_to_der(pem)
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
            Ok(Arc::new(VaultSigner::new(
                addr,
                &token,
                token_file.clone(),
                mount,
                key_name,
            )?))
        }
        #[cfg(feature = "azure")]
        SignerSettings::Azure {
            vault_url,
            key_name,
            ca_file,
        } => {
            let ca_pem = match ca_file {
                Some(f) => Some(std::fs::read(f).map_err(|e| SignerError::Refused {
                    provider: "azure",
                    message: format!("kms.ca_file {}: {e}", f.display()),
                })?),
                None => None,
            };
            // Unset, empty or not UTF-8: treated as unset (from_env names what is missing).
            let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
            Ok(Arc::new(AzureSigner::new(AzureConnection {
                vault_url: vault_url.clone(),
                key_name: key_name.clone(),
                credential: AzureCredential::from_env(env)?,
                authority_host: env("AZURE_AUTHORITY_HOST"),
                ca_pem,
                proxy: None,
            })?))
        }
        SignerSettings::File { key_dir } => {
            tracing::warn!(
                key_dir = %key_dir.display(),
                "receipts are signed with a LOCAL FILE KEY: for development only; use kms.provider = \"aws\", \"vault\" or \"azure\""
            );
            Ok(Arc::new(FileSigner::open(key_dir)?))
        }
        #[allow(unreachable_patterns)]
        _ => Err(SignerError::Refused {
            provider: "kms",
            message:
                "this build of knhk-agent lacks that provider (cargo features aws-kms, vault, azure)"
                    .into(),
        }),
    }
}
