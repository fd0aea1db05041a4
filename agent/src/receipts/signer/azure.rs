//! Azure Key Vault (`azure_security_keyvault_keys`, `azure_identity`): an EC P-256 key (`EC` or
//! `EC-HSM`), ES256 over the SHA-256 digest of the message. Every key version is immutable, so
//! a [`KeyRef`]'s id is the versioned key identifier (`VAULT/keys/NAME/VERSION`, Azure's `kid`)
//! and its version is 1, as for AWS keys. Rotation creates a new version of the same key (the
//! Create Key call on an existing name); old versions keep verifying. Every Get Key answer
//! carries the public key, so none is cached.
//!
//! The SDK's own retries are off: throttling (429 and its `Retry-After`) and outages go through
//! the shared retry and circuit breaker like every provider's.

use super::{
    http_status_error, p256_public_key_der, p256_signature_der, parse_retry_after, KeyInfo, Signer,
    SignerError,
};
use crate::receipts::format::KeyRef;
use azure_core::{
    cloud::{CloudConfiguration, CustomConfiguration},
    credentials::{Secret, TokenCredential},
    error::ErrorKind,
    http::{headers::HeaderName, ClientOptions, RetryOptions, Transport},
};
use azure_identity::{
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use azure_security_keyvault_keys::{
    models::{
        CreateKeyParameters, CurveName, Key, KeyClientGetKeyOptions, KeyClientSignOptions,
        KeyOperation, KeyType, SignParameters, SignatureAlgorithm,
    },
    KeyClient, KeyClientOptions, ResourceExt as _,
};
use sha2::{Digest as _, Sha256};
use std::{path::PathBuf, sync::Arc, time::Duration};

const PROVIDER: &str = "azure";

fn refused(message: impl Into<String>) -> SignerError {
    SignerError::Refused {
        provider: PROVIDER,
        message: message.into(),
    }
}

/// How the agent authenticates to Entra ID.
#[derive(Clone, PartialEq, Eq)]
pub enum AzureCredential {
    /// Workload identity (AKS): a federated service account token in a file, exchanged for an
    /// Entra ID token.
    WorkloadIdentity {
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id of the identity.
        client_id: String,
        /// The projected service account token.
        token_file: PathBuf,
    },
    /// A service principal's client secret.
    ClientSecret {
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// The secret.
        secret: String,
    },
    /// A managed identity through IMDS (a VM or scale set): system-assigned, or user-assigned
    /// by client id.
    ManagedIdentity {
        /// A user-assigned identity's client id.
        client_id: Option<String>,
    },
}

impl std::fmt::Debug for AzureCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AzureCredential::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
            } => f
                .debug_struct("WorkloadIdentity")
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .field("token_file", token_file)
                .finish(),
            AzureCredential::ClientSecret {
                tenant_id,
                client_id,
                ..
            } => f
                .debug_struct("ClientSecret")
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .finish_non_exhaustive(),
            AzureCredential::ManagedIdentity { client_id } => f
                .debug_struct("ManagedIdentity")
                .field("client_id", client_id)
                .finish(),
        }
    }
}

impl AzureCredential {
    /// The credential the environment names, in this order: workload identity
    /// (`AZURE_FEDERATED_TOKEN_FILE`, `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, as AKS sets them),
    /// a client secret (`AZURE_CLIENT_SECRET` with the same ids), else a managed identity
    /// (user-assigned if `AZURE_CLIENT_ID` is set). `var` reads one variable (`None`: unset).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<AzureCredential, SignerError> {
        let ids = |what: &str| match (var("AZURE_TENANT_ID"), var("AZURE_CLIENT_ID")) {
            (Some(tenant_id), Some(client_id)) => Ok((tenant_id, client_id)),
            (t, _) => Err(refused(format!(
                "{what} is set but {} is not: a {} needs both AZURE_TENANT_ID and AZURE_CLIENT_ID",
                if t.is_none() {
                    "AZURE_TENANT_ID"
                } else {
                    "AZURE_CLIENT_ID"
                },
                if what == "AZURE_FEDERATED_TOKEN_FILE" {
                    "workload identity"
                } else {
                    "client secret"
                }
            ))),
        };
        if let Some(file) = var("AZURE_FEDERATED_TOKEN_FILE") {
            let (tenant_id, client_id) = ids("AZURE_FEDERATED_TOKEN_FILE")?;
            return Ok(AzureCredential::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file: PathBuf::from(file),
            });
        }
        if let Some(secret) = var("AZURE_CLIENT_SECRET") {
            let (tenant_id, client_id) = ids("AZURE_CLIENT_SECRET")?;
            return Ok(AzureCredential::ClientSecret {
                tenant_id,
                client_id,
                secret,
            });
        }
        Ok(AzureCredential::ManagedIdentity {
            client_id: var("AZURE_CLIENT_ID"),
        })
    }
}

/// Everything an [`AzureSigner`] needs (`kms.*` and the environment, read by
/// [`crate::receipts::connect_signer`]).
#[derive(Debug, Clone)]
pub struct AzureConnection {
    /// The vault, `https://NAME.vault.azure.net`.
    pub vault_url: String,
    /// The key's name.
    pub key_name: String,
    /// How to authenticate.
    pub credential: AzureCredential,
    /// Entra ID's authority (`AZURE_AUTHORITY_HOST`); `None`: the public cloud's.
    pub authority_host: Option<String>,
    /// Extra trusted CAs (PEM), added to the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// An HTTPS proxy URL; `None`: the environment's (`HTTPS_PROXY`, `NO_PROXY`).
    pub proxy: Option<String>,
}

/// An Azure Key Vault key.
pub struct AzureSigner {
    client: KeyClient,
    vault_url: String,
    name: String,
}

impl std::fmt::Debug for AzureSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureSigner")
            .field("vault_url", &self.vault_url)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The `{"error": {"code", "message"}}` body Key Vault and Entra ID errors carry, as text.
fn service_message(body: &[u8]) -> Option<String> {
    // Not JSON (a proxy's HTML page): the caller falls back to the status's error code.
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    if let Some(e) = v.get("error").filter(|e| e.is_object()) {
        let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
        let message = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
        return Some(format!("{code}: {message}"));
    }
    // Entra ID: {"error": "invalid_client", "error_description": "AADSTS..."}.
    let code = v.get("error").and_then(|c| c.as_str())?;
    let description = v
        .get("error_description")
        .and_then(|c| c.as_str())
        .unwrap_or("");
    Some(format!("{code}: {description}"))
}

/// The status, `Retry-After` and service message of an HTTP error anywhere in `e`'s chain.
fn http_failure(e: &azure_core::Error) -> Option<(u16, Option<Duration>, String)> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(az) = err.downcast_ref::<azure_core::Error>() {
            if let ErrorKind::HttpResponse {
                status,
                error_code,
                raw_response,
            } = az.kind()
            {
                let retry_after = raw_response.as_ref().and_then(|r| {
                    r.headers()
                        .get_optional_str(&HeaderName::from_static("retry-after"))
                        .and_then(parse_retry_after)
                });
                let detail = raw_response
                    .as_ref()
                    .and_then(|r| service_message(r.body()))
                    .or_else(|| error_code.clone())
                    .unwrap_or_else(|| az.to_string());
                return Some((u16::from(*status), retry_after, detail));
            }
        }
        current = err.source();
    }
    None
}

/// `e` and its causes (a TLS failure's certificate problem, a refused connection), each once.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut current = e.source();
    while let Some(cause) = current {
        let c = cause.to_string();
        if !text.contains(&c) {
            text = format!("{text}: {c}");
        }
        current = cause.source();
    }
    text
}

/// Service answers by status (429: throttled, 5xx: unavailable, others: refused); a token
/// endpoint's refusal is named as such; no answer at all (connection, TLS, I/O) may pass.
fn classify(e: azure_core::Error, what: &str) -> SignerError {
    let credential = matches!(e.kind(), ErrorKind::Credential);
    if let Some((status, retry_after, detail)) = http_failure(&e) {
        let message = if credential {
            format!("{what}: the Entra ID token endpoint answered HTTP {status} ({detail}); check AZURE_TENANT_ID, AZURE_CLIENT_ID and the federated credential or secret")
        } else {
            format!("{what}: Key Vault answered HTTP {status} ({detail})")
        };
        return http_status_error(PROVIDER, status, retry_after, message);
    }
    let transient = {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut found = false;
        while let Some(err) = current {
            if let Some(az) = err.downcast_ref::<azure_core::Error>() {
                found |= matches!(az.kind(), ErrorKind::Connection | ErrorKind::Io);
            }
            current = err.source();
        }
        found
    };
    let message = format!("{what}: {}", with_causes(&e));
    if transient {
        SignerError::Unavailable {
            provider: PROVIDER,
            message,
        }
    } else {
        refused(message)
    }
}

impl AzureSigner {
    /// A signer for `c.key_name` in `c.vault_url`. Fails only on local problems (a bad URL or CA
    /// file, an incomplete credential); the vault is first called by [`Signer::current`].
    pub fn new(c: AzureConnection) -> Result<AzureSigner, SignerError> {
        // Bounded calls: an unresponsive vault must fail (and open the circuit), not hang.
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &c.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| refused(format!("kms.ca_file is not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(refused("kms.ca_file holds no certificate"));
            }
            http = http.tls_certs_merge(certs);
        }
        if let Some(proxy) = &c.proxy {
            let proxy =
                reqwest::Proxy::all(proxy).map_err(|e| refused(format!("proxy {proxy:?}: {e}")))?;
            http = http.proxy(proxy);
        }
        let http = http
            .build()
            .map_err(|e| refused(format!("building the HTTPS client: {e}")))?;
        let client_options = || {
            let mut o = ClientOptions {
                transport: Some(Transport::new(Arc::new(http.clone()))),
                // The shared retry and circuit breaker decide (crate::receipts).
                retry: RetryOptions::none(),
                ..Default::default()
            };
            if let Some(host) = &c.authority_host {
                let mut custom = CustomConfiguration::default();
                custom.authority_host = host.clone();
                o.cloud = Some(Arc::new(CloudConfiguration::from(custom)));
            }
            o
        };
        let credential: Arc<dyn TokenCredential> = match &c.credential {
            AzureCredential::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
            } => WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                credential_options: ClientAssertionCredentialOptions {
                    client_options: client_options(),
                },
                client_id: Some(client_id.clone()),
                tenant_id: Some(tenant_id.clone()),
                token_file_path: Some(token_file.clone()),
            }))
            .map_err(|e| refused(format!("workload identity: {e}")))?,
            AzureCredential::ClientSecret {
                tenant_id,
                client_id,
                secret,
            } => ClientSecretCredential::new(
                tenant_id,
                client_id.clone(),
                Secret::new(secret.clone()),
                Some(ClientSecretCredentialOptions {
                    client_options: client_options(),
                }),
            )
            .map_err(|e| refused(format!("client secret credential: {e}")))?,
            AzureCredential::ManagedIdentity { client_id } => {
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    client_options: client_options(),
                }))
                .map_err(|e| refused(format!("managed identity: {e}")))?
            }
        };
        let vault_url = c.vault_url.trim_end_matches('/').to_owned();
        let client = KeyClient::new(
            &vault_url,
            credential,
            Some(KeyClientOptions {
                client_options: client_options(),
                ..Default::default()
            }),
        )
        .map_err(|e| refused(format!("kms.vault_url {vault_url:?}: {e}")))?;
        Ok(AzureSigner {
            client,
            vault_url,
            name: c.key_name,
        })
    }

    fn key_id(&self, version: &str) -> String {
        format!("{}/keys/{}/{version}", self.vault_url, self.name)
    }

    /// The version a [`KeyRef`] of this signer names.
    fn version_of<'a>(&self, key: &'a KeyRef) -> Result<&'a str, SignerError> {
        let prefix = format!("{}/keys/{}/", self.vault_url, self.name);
        key.id
            .strip_prefix(&prefix)
            .filter(|v| !v.is_empty() && !v.contains('/'))
            .ok_or_else(|| {
                refused(format!(
                    "{} is not a version of key {} in {}",
                    key.id, self.name, self.vault_url
                ))
            })
    }

    /// Checks a key bundle (an enabled EC P-256 key that may sign) and returns its public key.
    fn info(&self, key: Key, what: &str) -> Result<KeyInfo, SignerError> {
        let version = key
            .resource_id()
            // No parsable kid: refused just below as naming no version.
            .ok()
            .and_then(|r| r.version)
            .ok_or_else(|| refused(format!("{what}: the answer names no key version (kid)")))?;
        let id = self.key_id(&version);
        if key.attributes.as_ref().and_then(|a| a.enabled) == Some(false) {
            return Err(refused(format!("key {id} is disabled")));
        }
        let jwk = key
            .key
            .ok_or_else(|| refused(format!("{what}: the answer has no key")))?;
        let kty = jwk.kty.as_ref().map_or("(none)".into(), |k| k.to_string());
        let crv = jwk.crv.as_ref().map_or("(none)".into(), |c| c.to_string());
        if !matches!(jwk.kty, Some(KeyType::Ec | KeyType::EcHsm))
            || jwk.crv != Some(CurveName::P256)
        {
            return Err(refused(format!(
                "key {id} is kty {kty} crv {crv}; receipts need an EC key on P-256 (ES256): \
                 create it with `az keyvault key create --kty EC --curve P-256 --ops sign verify`"
            )));
        }
        if let Some(ops) = &jwk.key_ops {
            if !ops.iter().any(|o| o == "sign") {
                return Err(refused(format!(
                    "key {id} does not permit the sign operation (key_ops)"
                )));
            }
        }
        // A missing coordinate is empty: refused just below as not 32 bytes.
        let (x, y) = (jwk.x.unwrap_or_default(), jwk.y.unwrap_or_default());
        let public_key_der =
            p256_public_key_der(&x, &y).map_err(|e| refused(format!("key {id}: {e}")))?;
        Ok(KeyInfo {
            key: KeyRef { id, version: 1 },
            public_key_der,
        })
    }

    async fn get(&self, version: Option<&str>) -> Result<Key, SignerError> {
        let what = format!("get key {} in {}", self.name, self.vault_url);
        self.client
            .get_key(
                &self.name,
                Some(KeyClientGetKeyOptions {
                    key_version: version.map(str::to_owned),
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| classify(e, &what))?
            .into_model()
            .map_err(|e| refused(format!("{what}: the answer is not a key bundle: {e}")))
    }
}

#[tonic::async_trait]
impl Signer for AzureSigner {
    fn provider(&self) -> &'static str {
        PROVIDER
    }

    async fn current(&self) -> Result<KeyInfo, SignerError> {
        let key = self.get(None).await?;
        self.info(key, &format!("get key {}", self.name))
    }

    async fn sign(&self, key: &KeyRef, message: &[u8]) -> Result<Vec<u8>, SignerError> {
        let version = self.version_of(key)?;
        let what = format!("sign with {}", key.id);
        let parameters = SignParameters {
            algorithm: Some(SignatureAlgorithm::Es256),
            value: Some(Sha256::digest(message).to_vec()),
        };
        let body = parameters
            .try_into()
            .map_err(|e| refused(format!("{what}: encoding the request: {e}")))?;
        let out = self
            .client
            .sign(
                &self.name,
                body,
                Some(KeyClientSignOptions {
                    key_version: Some(version.to_owned()),
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| classify(e, &what))?
            .into_model()
            .map_err(|e| refused(format!("{what}: the answer is not a sign result: {e}")))?;
        // The vault names the key version that signed: it must be the one asked for.
        if let Some(kid) = &out.kid {
            // split always yields a first part (empty for an empty kid, refused below).
            let signed_by = kid.split('?').next().unwrap_or_default();
            if !signed_by.ends_with(&format!("/keys/{}/{version}", self.name)) {
                return Err(refused(format!("{what}: the vault signed with {kid}")));
            }
        }
        let raw = out
            .result
            .ok_or_else(|| refused(format!("{what}: the answer has no signature (value)")))?;
        p256_signature_der(&raw).map_err(|e| refused(format!("{what}: {e}")))
    }

    async fn rotate(&self) -> Result<KeyInfo, SignerError> {
        // A new version of the same key, of the same type (EC-HSM stays in the HSM).
        let kty = self
            .get(None)
            .await?
            .key
            .and_then(|k| k.kty)
            .filter(|k| matches!(k, KeyType::EcHsm))
            .unwrap_or(KeyType::Ec);
        let what = format!("create a new version of key {}", self.name);
        let parameters = CreateKeyParameters {
            kty: Some(kty),
            curve: Some(CurveName::P256),
            key_ops: Some(vec![KeyOperation::Sign, KeyOperation::Verify]),
            ..Default::default()
        };
        let body = parameters
            .try_into()
            .map_err(|e| refused(format!("{what}: encoding the request: {e}")))?;
        let key = self
            .client
            .create_key(&self.name, body, None)
            .await
            .map_err(|e| classify(e, &what))?
            .into_model()
            .map_err(|e| refused(format!("{what}: the answer is not a key bundle: {e}")))?;
        self.info(key, &what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_environment_picks_workload_identity_then_a_secret_then_a_managed_identity() {
        let wi = AzureCredential::from_env(env(&[
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                "/var/run/secrets/azure/tokens/azure-identity-token",
            ),
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_CLIENT_SECRET", "s"),
        ]))
        .expect("workload identity");
        assert_eq!(
            wi,
            AzureCredential::WorkloadIdentity {
                tenant_id: "t".into(),
                client_id: "c".into(),
                token_file: "/var/run/secrets/azure/tokens/azure-identity-token".into(),
            }
        );
        let cs = AzureCredential::from_env(env(&[
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_CLIENT_SECRET", "s"),
        ]))
        .expect("client secret");
        assert!(matches!(cs, AzureCredential::ClientSecret { .. }));
        assert!(
            !format!("{cs:?}").contains("\"s\""),
            "the secret is not logged"
        );
        let mi = AzureCredential::from_env(env(&[("AZURE_CLIENT_ID", "c")])).expect("mi");
        assert_eq!(
            mi,
            AzureCredential::ManagedIdentity {
                client_id: Some("c".into())
            }
        );
        let e = AzureCredential::from_env(env(&[
            ("AZURE_FEDERATED_TOKEN_FILE", "/t"),
            ("AZURE_CLIENT_ID", "c"),
        ]))
        .expect_err("no tenant");
        assert_eq!(
            e.to_string(),
            "azure refused: AZURE_FEDERATED_TOKEN_FILE is set but AZURE_TENANT_ID is not: a \
             workload identity needs both AZURE_TENANT_ID and AZURE_CLIENT_ID"
        );
    }
}
