//! Vault or OpenBao transit (`vaultrs`): an `ecdsa-p256` key; signatures name the key version
//! (`vault:vN:...`), rotation adds a version in place and old versions keep verifying.

use super::{public_key_pem_to_der, KeyInfo, Signer, SignerError};
use crate::receipts::format::KeyRef;
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
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
    client: VaultClient,
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

fn classify(e: ClientError) -> SignerError {
    match &e {
        ClientError::APIError { code, .. } if *code < 500 => SignerError::Refused {
            provider: "vault",
            message: e.to_string(),
        },
        _ => SignerError::Unavailable {
            provider: "vault",
            message: e.to_string(),
        },
    }
}

impl VaultSigner {
    /// A signer for transit key `name` under `mount` at `addr` with `token`.
    pub fn new(
        addr: &str,
        token: &str,
        mount: &str,
        name: &str,
    ) -> Result<VaultSigner, SignerError> {
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
        let client = VaultClient::new(settings).map_err(classify)?;
        Ok(VaultSigner {
            client,
            mount: mount.to_owned(),
            name: name.to_owned(),
        })
    }

    fn key_id(&self) -> String {
        format!("{}/{}", self.mount, self.name)
    }

    async fn latest(&self) -> Result<KeyInfo, SignerError> {
        let key = vaultrs::transit::key::read(&self.client, &self.mount, &self.name)
            .await
            .map_err(classify)?;
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
        let mut opts = SignDataRequestBuilder::default();
        opts.key_version(key.version)
            .hash_algorithm(HashAlgorithm::Sha2_256)
            .marshaling_algorithm(MarshalingAlgorithm::Asn1);
        let out = vaultrs::transit::data::sign(
            &self.client,
            &self.mount,
            &self.name,
            &B64.encode(message),
            Some(&mut opts),
        )
        .await
        .map_err(classify)?;
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
        vaultrs::transit::key::rotate(&self.client, &self.mount, &self.name)
            .await
            .map_err(classify)?;
        self.latest().await
    }
}
