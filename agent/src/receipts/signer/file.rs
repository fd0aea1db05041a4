//! A local P-256 key for development only: `key_dir/v1.pem`, `v2.pem`, … (PKCS#8 PEM, mode
//! 0600 enforced). The highest version is current; rotation writes the next one.
//!
//! The key id is `file:` and the fingerprint of the lowest version's public key
//! (`file:sha256:<64 hex>`): it names the key series, not the directory, so moving the
//! directory changes nothing. Ids of older agents (`file:<key_dir>`) are still signed with
//! (same key files), so a ledger written under one hands over to the stable id with a
//! transition statement on its first start.

use super::{KeyInfo, Signer, SignerError};
use crate::receipts::format::KeyRef;
use p256::{
    ecdsa::{signature::Signer as _, Signature, SigningKey},
    pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding},
};
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

/// Keys in a directory.
#[derive(Debug)]
pub struct FileSigner {
    dir: PathBuf,
    id: String,
}

fn refused(message: String) -> SignerError {
    SignerError::Refused {
        provider: "file",
        message,
    }
}

impl FileSigner {
    /// Keys under `dir` (created 0700 with a first key if empty).
    pub fn open(dir: &Path) -> Result<FileSigner, SignerError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| refused(format!("creating key_dir {}: {e}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| refused(format!("securing key_dir {}: {e}", dir.display())))?;
        let mut signer = FileSigner {
            dir: dir.to_owned(),
            id: String::new(),
        };
        let first = match signer.versions()?.first() {
            Some(v) => signer.load(*v)?,
            None => signer.write_new(1)?,
        };
        let der = first
            .verifying_key()
            .to_public_key_der()
            .map_err(|e| refused(e.to_string()))?;
        signer.id = format!(
            "file:{}",
            crate::receipts::format::fingerprint(der.as_bytes())
        );
        Ok(signer)
    }

    /// An id this signer answers to: its own, or the directory-based id of older agents
    /// (`file:` and a path), for ledgers written before the id became stable.
    fn answers_to(&self, id: &str) -> bool {
        id == self.id
            || id
                .strip_prefix("file:")
                .is_some_and(|rest| !rest.starts_with("sha256:"))
    }

    fn versions(&self) -> Result<Vec<u64>, SignerError> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| refused(format!("reading key_dir {}: {e}", self.dir.display())))?;
        let mut v: Vec<u64> = entries
            // An unreadable directory entry is not a key file.
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                // Other files are not key versions.
                name.strip_prefix('v')?.strip_suffix(".pem")?.parse().ok()
            })
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    fn path(&self, version: u64) -> PathBuf {
        self.dir.join(format!("v{version}.pem"))
    }

    fn key_id(&self) -> String {
        self.id.clone()
    }

    fn load(&self, version: u64) -> Result<SigningKey, SignerError> {
        let path = self.path(version);
        let meta =
            std::fs::metadata(&path).map_err(|e| refused(format!("{}: {e}", path.display())))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(refused(format!(
                "{} has mode {mode:04o}: a signing key must not be readable by group or others (chmod 600 it)",
                path.display()
            )));
        }
        let pem = std::fs::read_to_string(&path)
            .map_err(|e| refused(format!("{}: {e}", path.display())))?;
        SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| refused(format!("{}: not a PKCS#8 P-256 key: {e}", path.display())))
    }

    fn write_new(&self, version: u64) -> Result<SigningKey, SignerError> {
        let key = loop {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| refused(format!("no randomness: {e}")))?;
            if let Ok(k) = SigningKey::from_slice(&bytes) {
                break k;
            }
        };
        let pem = key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| refused(e.to_string()))?;
        let path = self.path(version);
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| refused(format!("{}: {e}", tmp.display())))?;
            f.write_all(pem.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| refused(format!("{}: {e}", tmp.display())))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| refused(format!("{}: {e}", path.display())))?;
        Ok(key)
    }

    fn info(&self, version: u64, key: &SigningKey) -> Result<KeyInfo, SignerError> {
        let der = key
            .verifying_key()
            .to_public_key_der()
            .map_err(|e| refused(e.to_string()))?;
        Ok(KeyInfo {
            key: KeyRef {
                id: self.key_id(),
                version,
            },
            public_key_der: der.as_bytes().to_vec(),
        })
    }
}

#[tonic::async_trait]
impl Signer for FileSigner {
    fn provider(&self) -> &'static str {
        "file"
    }

    async fn current(&self) -> Result<KeyInfo, SignerError> {
        let version = self.versions()?.last().copied().unwrap_or(1);
        let key = self.load(version)?;
        self.info(version, &key)
    }

    async fn sign(&self, key: &KeyRef, message: &[u8]) -> Result<Vec<u8>, SignerError> {
        if !self.answers_to(&key.id) {
            return Err(refused(format!("{key} is not a key of {}", self.key_id())));
        }
        let signing = self.load(key.version)?;
        let sig: Signature = signing.sign(message);
        Ok(sig.to_der().as_bytes().to_vec())
    }

    async fn rotate(&self) -> Result<KeyInfo, SignerError> {
        let next = self.versions()?.last().copied().unwrap_or(0) + 1;
        let key = self.write_new(next)?;
        self.info(next, &key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_key_id_follows_the_key_not_the_directory_and_old_ids_still_sign() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        let first = FileSigner::open(&a).expect("open");
        let id = first.current().await.expect("current").key.id;
        let v1 = first.current().await.expect("current").public_key_der;
        assert_eq!(
            id,
            format!("file:{}", crate::receipts::format::fingerprint(&v1))
        );
        first.rotate().await.expect("rotate");
        assert_eq!(first.current().await.expect("current").key.id, id);
        // Moved: the same id.
        let b = dir.path().join("b");
        std::fs::rename(&a, &b).expect("move the key directory");
        let moved = FileSigner::open(&b).expect("open moved");
        let current = moved.current().await.expect("current");
        assert_eq!(
            (current.key.id.as_str(), current.key.version),
            (id.as_str(), 2)
        );
        // The id of older agents (`file:<key_dir>`) still signs, with the same key.
        let legacy = KeyRef {
            id: format!("file:{}", a.display()),
            version: 1,
        };
        let sig = moved.sign(&legacy, b"m").await.expect("legacy id signs");
        assert!(crate::receipts::signer::verify_signature(&v1, b"m", &sig));
        // Another key series' stable id does not.
        let other = KeyRef {
            id: format!("file:sha256:{}", "0".repeat(64)),
            version: 1,
        };
        assert!(moved.sign(&other, b"m").await.is_err());
    }
}
