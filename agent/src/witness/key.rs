//! The witness's Ed25519 cosignature key: in OpenBao/Vault transit (an `ed25519` key) or, for
//! development, a file.

use std::path::Path;

/// An Ed25519 key the witness cosigns with.
#[tonic::async_trait]
pub trait CosignKey: Send + Sync + std::fmt::Debug {
    /// The 32-byte public key.
    fn public(&self) -> [u8; 32];
    /// The Ed25519 signature of `message`.
    async fn sign(&self, message: &[u8]) -> Result<[u8; 64], String>;
}

/// A key in a file of 32 raw seed bytes (created, mode 0600, when missing). Development only.
pub struct FileKey {
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKey").finish_non_exhaustive()
    }
}

impl FileKey {
    /// Opens the key file at `path`, creating a new key there when it does not exist.
    pub fn open(path: &Path) -> Result<FileKey, String> {
        let seed: [u8; 32] = match std::fs::read(path) {
            Ok(bytes) => bytes.try_into().map_err(|b: Vec<u8>| {
                format!(
                    "{}: a witness key file holds 32 bytes, this one {}",
                    path.display(),
                    b.len()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| format!("no randomness: {e}"))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                }
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| format!("creating {}: {e}", path.display()))?;
                f.write_all(&seed)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                tracing::info!(path = %path.display(), "created a new witness key");
                seed
            }
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        Ok(FileKey {
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }
}

#[tonic::async_trait]
impl CosignKey for FileKey {
    fn public(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    async fn sign(&self, message: &[u8]) -> Result<[u8; 64], String> {
        use ed25519_dalek::Signer as _;
        Ok(self.key.sign(message).to_bytes())
    }
}

/// An `ed25519` transit key in OpenBao or Vault.
#[cfg(feature = "vault")]
pub struct VaultKey {
    client: vaultrs::client::VaultClient,
    mount: String,
    name: String,
    public: [u8; 32],
}

#[cfg(feature = "vault")]
impl std::fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultKey")
            .field("mount", &self.mount)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "vault")]
impl VaultKey {
    /// The transit key `name` under `mount` at `addr`, created (type `ed25519`) when missing.
    pub async fn open(
        addr: &str,
        token: &str,
        mount: &str,
        name: &str,
    ) -> Result<VaultKey, String> {
        use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
        use vaultrs::api::transit::{requests::CreateKeyRequest, responses::ReadKeyData, KeyType};
        let settings = vaultrs::client::VaultClientSettingsBuilder::default()
            .address(addr)
            .token(token)
            .timeout(Some(std::time::Duration::from_secs(5)))
            .build()
            .map_err(|e| format!("vault {addr:?}: {e}"))?;
        let client = vaultrs::client::VaultClient::new(settings)
            .map_err(|e| format!("vault {addr:?}: {e}"))?;
        let read = vaultrs::transit::key::read(&client, mount, name).await;
        let read = match read {
            Ok(r) => r,
            Err(_) => {
                vaultrs::transit::key::create(
                    &client,
                    mount,
                    name,
                    Some(CreateKeyRequest::builder().key_type(KeyType::Ed25519)),
                )
                .await
                .map_err(|e| format!("vault: creating ed25519 transit key {mount}/{name}: {e}"))?;
                vaultrs::transit::key::read(&client, mount, name)
                    .await
                    .map_err(|e| format!("vault: reading transit key {mount}/{name}: {e}"))?
            }
        };
        let ReadKeyData::Asymmetric(versions) = read.keys else {
            return Err(format!(
                "vault: transit key {mount}/{name} is symmetric; a witness needs type ed25519"
            ));
        };
        // The newest version signs.
        let entry = versions
            .iter()
            .filter_map(|(v, e)| Some((v.parse::<u64>().ok()?, e)))
            .max_by_key(|(v, _)| *v)
            .map(|(_, e)| e)
            .ok_or_else(|| format!("vault: transit key {mount}/{name} has no versions"))?;
        let public: [u8; 32] = B64
            .decode(entry.public_key.trim())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| {
                format!(
                    "vault: transit key {mount}/{name} is not an ed25519 key (type {:?})",
                    read.key_type
                )
            })?;
        Ok(VaultKey {
            client,
            mount: mount.to_owned(),
            name: name.to_owned(),
            public,
        })
    }
}

#[cfg(feature = "vault")]
#[tonic::async_trait]
impl CosignKey for VaultKey {
    fn public(&self) -> [u8; 32] {
        self.public
    }

    async fn sign(&self, message: &[u8]) -> Result<[u8; 64], String> {
        use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
        let r = vaultrs::transit::data::sign(
            &self.client,
            &self.mount,
            &self.name,
            &B64.encode(message),
            None,
        )
        .await
        .map_err(|e| format!("vault: signing with {}/{}: {e}", self.mount, self.name))?;
        // "vault:v<N>:<base64>".
        r.signature
            .rsplit(':')
            .next()
            .and_then(|s| B64.decode(s).ok())
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| {
                format!(
                    "vault: {}/{} returned a malformed signature",
                    self.mount, self.name
                )
            })
    }
}
