//! AWS KMS (`aws-sdk-kms`): an ECC_NIST_P256 / SIGN_VERIFY key, ECDSA_SHA_256 over the raw
//! message. Asymmetric KMS keys do not rotate in place, so rotation creates a new key and moves
//! the alias (`key_id` must then be an alias); old keys stay for verification. Public keys are
//! fetched once per key and cached.

use super::{KeyInfo, Signer, SignerError};
use crate::receipts::format::KeyRef;
use aws_sdk_kms::{
    primitives::Blob,
    types::{KeySpec, KeyUsageType, MessageType, SigningAlgorithmSpec},
    Client,
};
use std::{collections::HashMap, sync::Mutex};

/// A KMS key, by ARN, id or alias.
#[derive(Debug)]
pub struct AwsSigner {
    client: Client,
    key_id: String,
    public_keys: Mutex<HashMap<String, Vec<u8>>>,
}

fn unavailable(e: impl std::fmt::Display) -> SignerError {
    SignerError::Unavailable {
        provider: "aws",
        message: e.to_string(),
    }
}

fn refused(e: impl std::fmt::Display) -> SignerError {
    SignerError::Refused {
        provider: "aws",
        message: e.to_string(),
    }
}

/// Service errors (the KMS answered "no") are refusals, named by their code and message
/// (`DisabledException: ... is disabled`); everything else (dispatch, timeout) may pass.
fn classify<E, R>(e: aws_sdk_kms::error::SdkError<E, R>) -> SignerError
where
    E: std::error::Error + aws_sdk_kms::error::ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_kms::error::{DisplayErrorContext, SdkError};
    match &e {
        SdkError::ServiceError(service) => {
            let err = service.err();
            refused(format!(
                "{}: {}",
                err.code().unwrap_or("service error"),
                err.message().unwrap_or("(no message)")
            ))
        }
        _ => unavailable(DisplayErrorContext(&e)),
    }
}

impl AwsSigner {
    /// A signer for `key_id` in `region`, at `endpoint_url` when given (a KMS-compatible server),
    /// with credentials from the standard AWS chain (environment, web identity, instance role).
    pub async fn new(region: &str, key_id: &str, endpoint_url: Option<&str>) -> AwsSigner {
        // Bounded calls: an unresponsive KMS must fail (and open the circuit), not hang.
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_secs(2))
            .operation_attempt_timeout(std::time::Duration::from_secs(3))
            .operation_timeout(std::time::Duration::from_secs(5))
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_owned()))
            .timeout_config(timeouts);
        if let Some(url) = endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let config = loader.load().await;
        AwsSigner {
            client: Client::new(&config),
            key_id: key_id.to_owned(),
            public_keys: Mutex::new(HashMap::new()),
        }
    }

    async fn info(&self, resolved: &str) -> Result<KeyInfo, SignerError> {
        let cached = self
            .public_keys
            .lock()
            // A poisoned cache is bypassed: the key is fetched again.
            .ok()
            .and_then(|m| m.get(resolved).cloned());
        let public_key_der = match cached {
            Some(der) => der,
            None => {
                let out = self
                    .client
                    .get_public_key()
                    .key_id(resolved)
                    .send()
                    .await
                    .map_err(classify)?;
                let der = out
                    .public_key()
                    .map(|b| b.as_ref().to_vec())
                    .ok_or_else(|| {
                        refused(format!("GetPublicKey of {resolved} returned no key"))
                    })?;
                if let Ok(mut m) = self.public_keys.lock() {
                    m.insert(resolved.to_owned(), der.clone());
                }
                der
            }
        };
        Ok(KeyInfo {
            key: KeyRef {
                id: resolved.to_owned(),
                version: 1,
            },
            public_key_der,
        })
    }
}

#[tonic::async_trait]
impl Signer for AwsSigner {
    fn provider(&self) -> &'static str {
        "aws"
    }

    async fn current(&self) -> Result<KeyInfo, SignerError> {
        let out = self
            .client
            .describe_key()
            .key_id(&self.key_id)
            .send()
            .await
            .map_err(classify)?;
        let meta = out
            .key_metadata()
            .ok_or_else(|| refused(format!("DescribeKey {} returned no metadata", self.key_id)))?;
        self.info(meta.key_id()).await
    }

    async fn sign(&self, key: &KeyRef, message: &[u8]) -> Result<Vec<u8>, SignerError> {
        let out = self
            .client
            .sign()
            .key_id(&key.id)
            .message(Blob::new(message))
            .message_type(MessageType::Raw)
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send()
            .await
            .map_err(classify)?;
        out.signature()
            .map(|b| b.as_ref().to_vec())
            .ok_or_else(|| refused("Sign returned no signature"))
    }

    async fn rotate(&self) -> Result<KeyInfo, SignerError> {
        if !self.key_id.starts_with("alias/") {
            return Err(refused(format!(
                "rotating needs kms.key_id to be an alias (alias/...), not {:?}: AWS KMS cannot rotate \
                 asymmetric keys in place, so rotation creates a new key and moves the alias",
                self.key_id
            )));
        }
        let created = self
            .client
            .create_key()
            .key_usage(KeyUsageType::SignVerify)
            .key_spec(KeySpec::EccNistP256)
            .description("knhk-agent receipts signing key")
            .send()
            .await
            .map_err(classify)?;
        let new_id = created
            .key_metadata()
            .map(|m| m.key_id().to_owned())
            .ok_or_else(|| refused("CreateKey returned no metadata"))?;
        self.client
            .update_alias()
            .alias_name(&self.key_id)
            .target_key_id(&new_id)
            .send()
            .await
            .map_err(classify)?;
        self.info(&new_id).await
    }
}
