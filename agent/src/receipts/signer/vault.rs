//! Vault or OpenBao transit (`vaultrs`): an `ecdsa-p256` key; signatures name the key version
//! (`vault:vN:...`), rotation adds a version in place and old versions keep verifying. With
//! `kms.token_file`, a call refused with 403 (a token revoked or expired) rereads the file and,
//! if it holds another token, retries once with it: a new token takes effect with no restart.
//! A failed call names what was asked of which key and server and keeps the server's status and
//! words: 429 (a rate-limit quota) is throttling and 408/5xx unavailability, both retried; any
//! other status (403 permission denied, 400 signing key not found) is a refusal.

use super::{public_key_pem_to_der, KeyInfo, Signer, SignerError};
use crate::receipts::format::KeyRef;
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use std::{
    future::Future,
    path::PathBuf,
    sync::{Arc, RwLock},
};
use vaultrs::{
    api::transit::{
        requests::SignDataRequestBuilder, responses::ReadKeyData, HashAlgorithm,
        MarshalingAlgorithm,
    },
    client::{VaultClient, VaultClientSettingsBuilder},
    error::ClientError,
};

/// A transit key.
pub struct VaultSigner {
    addr: String,
    token_file: Option<PathBuf>,
    /// The token in use and its client (replaced whole when the token file changes).
    client: RwLock<(String, Arc<VaultClient>)>,
    mount: String,
    name: String,
}

impl std::fmt::Debug for VaultSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultSigner")
            .field("mount", &self.mount)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The error for a failed call: an answer from the server keeps its status and its own words
/// ("permission denied", "signing key not found", "rate limit quota exceeded") after `what` was
/// asked of which server; 429 is throttling and 408/5xx unavailability (both retried), any
/// other status a refusal. No answer at all is unavailability.
fn classify(addr: &str, what: &str, e: ClientError) -> SignerError {
    match &e {
        ClientError::APIError { code, errors } => {
            let said = if errors.is_empty() {
                "no error text".to_owned()
            } else {
                errors.join("; ")
            };
            super::http_status_error(
                "vault",
                *code,
                // Vault and OpenBao send no Retry-After: the shared backoff decides.
                None,
                format!("{what} at {addr}: the server answered HTTP {code}: {said}"),
            )
        }
        _ => SignerError::Unavailable {
            provider: "vault",
            message: format!("{what} at {addr}: {e}"),
        },
    }
}

impl VaultSigner {
    /// A signer for transit key `name` under `mount` at `addr` with `token`, read from
    /// `token_file` when given (reread when Vault refuses the token).
    pub fn new(
        addr: &str,
        token: &str,
        token_file: Option<PathBuf>,
        mount: &str,
        name: &str,
    ) -> Result<VaultSigner, SignerError> {
        let client = Self::client_for(addr, token)?;
        Ok(VaultSigner {
            addr: addr.to_owned(),
            token_file,
            client: RwLock::new((token.to_owned(), Arc::new(client))),
            mount: mount.to_owned(),
            name: name.to_owned(),
        })
    }

    fn client_for(addr: &str, token: &str) -> Result<VaultClient, SignerError> {
        let settings = VaultClientSettingsBuilder::default()
            .address(addr)
            .token(token)
            // Bounded calls: an unresponsive KMS must fail (and open the circuit), not hang.
            .timeout(Some(std::time::Duration::from_secs(5)))
            .build()
            .map_err(|e| SignerError::Refused {
                provider: "vault",
                message: format!("kms.addr {addr:?}: {e}"),
            })?;
        VaultClient::new(settings).map_err(|e| classify(addr, "connect", e))
    }

    fn client(&self) -> Arc<VaultClient> {
        // A poisoned lock still holds a whole pair (it is only ever replaced whole).
        self.client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Rereads `token_file`; true when it holds another token, now in use.
    fn reload_token(&self) -> bool {
        let Some(file) = &self.token_file else {
            return false;
        };
        let token = match std::fs::read_to_string(file) {
            Ok(t) => t.trim().to_owned(),
            Err(e) => {
                tracing::warn!("kms.token_file {}: {e}", file.display());
                return false;
            }
        };
        let mut current = self.client.write().unwrap_or_else(|e| e.into_inner());
        if token.is_empty() || token == current.0 {
            return false;
        }
        match Self::client_for(&self.addr, &token) {
            Ok(client) => {
                tracing::info!(file = %file.display(), "vault: a new token from kms.token_file is in use");
                *current = (token, Arc::new(client));
                true
            }
            Err(e) => {
                tracing::warn!("vault: the new token of {}: {e}", file.display());
                false
            }
        }
    }

    /// A call (`what`, for errors) with the current client; refused with 403, once more with a
    /// new token if the token file has one.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, SignerError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let r = match f(self.client()).await {
            Err(ClientError::APIError { code: 403, .. }) if self.reload_token() => {
                f(self.client()).await
            }
            r => r,
        };
        r.map_err(|e| classify(&self.addr, what, e))
    }

    fn key_id(&self) -> String {
        format!("{}/{}", self.mount, self.name)
    }

    /// The key as an operator finds it: its name and its mount.
    fn described(&self) -> String {
        format!(
            "transit key {:?} on mount {:?} ({})",
            self.name,
            self.mount,
            self.key_id()
        )
    }

    async fn latest(&self) -> Result<KeyInfo, SignerError> {
        let key = self
            .call(&format!("read {}", self.described()), |c| async move {
                vaultrs::transit::key::read(&*c, &self.mount, &self.name).await
            })
            .await?;
        let ReadKeyData::Asymmetric(versions) = key.keys else {
            return Err(SignerError::Refused {
                provider: "vault",
                message: format!(
                    "transit key {} is not an asymmetric (ecdsa-p256) key",
                    self.key_id()
                ),
            });
        };
        let (version, entry) = versions
            .iter()
            // Vault's key versions are numbers; anything else is not a version.
            .filter_map(|(v, e)| v.parse::<u64>().ok().map(|v| (v, e)))
            .max_by_key(|(v, _)| *v)
            .ok_or_else(|| SignerError::Refused {
                provider: "vault",
                message: format!("transit key {} has no versions", self.key_id()),
            })?;
        let public_key_der =
            public_key_pem_to_der(&entry.public_key).map_err(|e| SignerError::Refused {
                provider: "vault",
                message: format!("transit key {} version {version}: {e}", self.key_id()),
            })?;
        Ok(KeyInfo {
            key: KeyRef {
                id: self.key_id(),
                version,
            },
            public_key_der,
        })
    }
}

#[tonic::async_trait]
impl Signer for VaultSigner {
    fn provider(&self) -> &'static str {
        "vault"
    }

    async fn current(&self) -> Result<KeyInfo, SignerError> {
        self.latest().await
    }

    async fn sign(&self, key: &KeyRef, message: &[u8]) -> Result<Vec<u8>, SignerError> {
        let input = B64.encode(message);
        let what = format!("sign with version {} of {}", key.version, self.described());
        let out = self
            .call(&what, |c| {
                let input = &input;
                async move {
                    let mut opts = SignDataRequestBuilder::default();
                    opts.key_version(key.version)
                        .hash_algorithm(HashAlgorithm::Sha2_256)
                        .marshaling_algorithm(MarshalingAlgorithm::Asn1);
                    vaultrs::transit::data::sign(
                        &*c,
                        &self.mount,
                        &self.name,
                        input,
                        Some(&mut opts),
                    )
                    .await
                }
            })
            .await?;
        // "vault:v3:BASE64": the version is named; the rest is the DER signature.
        let mut parts = out.signature.splitn(3, ':');
        let (prefix, version, sig) = (parts.next(), parts.next(), parts.next());
        if prefix != Some("vault") || version != Some(&format!("v{}", key.version)[..]) {
            return Err(SignerError::Refused {
                provider: "vault",
                message: format!("unexpected signature format {:?}", out.signature),
            });
        }
        // No signature in the reply: refused as not base64 just below.
        B64.decode(sig.unwrap_or_default())
            .map_err(|e| SignerError::Refused {
                provider: "vault",
                message: format!("signature is not base64: {e}"),
            })
    }

    async fn rotate(&self) -> Result<KeyInfo, SignerError> {
        self.call(&format!("rotate {}", self.described()), |c| async move {
            vaultrs::transit::key::rotate(&*c, &self.mount, &self.name).await
        })
        .await?;
        self.latest().await
    }
}
