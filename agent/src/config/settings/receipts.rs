//! `[kms]` and `[receipts]` → [`ReceiptSettings`] with its [`SignerSettings`].

use crate::config::{KmsSection, ReceiptsSection};
use crate::model::ReceiptKind;
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

/// Which KMS signs, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignerSettings {
    /// AWS KMS.
    Aws {
        /// Region.
        region: String,
        /// Key ARN, id or alias.
        key_id: String,
        /// A KMS-compatible endpoint.
        endpoint_url: Option<String>,
    },
    /// Vault or OpenBao transit.
    Vault {
        /// Server address.
        addr: String,
        /// Transit mount.
        mount: String,
        /// Key name.
        key_name: String,
        /// Token file; `None`: `$VAULT_TOKEN`.
        token_file: Option<PathBuf>,
    },
    /// Azure Key Vault (or Managed HSM): an EC P-256 key, one version per rotation.
    Azure {
        /// The vault, `https://NAME.vault.azure.net`.
        vault_url: String,
        /// Key name.
        key_name: String,
        /// A PEM file of extra CAs trusted for the vault and the Entra ID token endpoint (a
        /// TLS-inspecting proxy, a sovereign or private cloud); the system's roots stay trusted.
        ca_file: Option<PathBuf>,
    },
    /// Local key files (development only).
    File {
        /// Key directory.
        key_dir: PathBuf,
    },
}

fn is_key_id(s: &str) -> bool {
    // An ARN (key or alias), a key id (UUID or multi-region mrk-), or an alias.
    if let Some(rest) = s.strip_prefix("arn:") {
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        return parts.len() == 5
            && parts[0].starts_with("aws")
            && parts[1] == "kms"
            && !parts[2].is_empty()
            && parts[3].len() == 12
            && parts[3].bytes().all(|b| b.is_ascii_digit())
            && (parts[4].starts_with("key/") || parts[4].starts_with("alias/"))
            && parts[4].split_once('/').is_some_and(|(_, r)| !r.is_empty());
    }
    if let Some(alias) = s.strip_prefix("alias/") {
        return !alias.is_empty()
            && alias
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b));
    }
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b.is_ascii_lowercase())
}

/// Why `url` is not a Key Vault URL (`https://HOST[:PORT][/]`), or `None` if it is one.
fn vault_url_problem(url: &str) -> Option<&'static str> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Some("it must start with https:// (Key Vault takes bearer tokens over TLS only)");
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Some("it must name the vault only, without a path, query or fragment");
    }
    if authority.contains('@') {
        return Some("it must not carry user information");
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    if host.is_empty()
        || host.starts_with(['.', '-'])
        || host.ends_with(['.', '-'])
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        return Some("its host is not a DNS name");
    }
    if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        return Some("its port is not a number from 1 to 65535");
    }
    None
}

impl SignerSettings {
    /// Checks a `[kms]` section; errors name the key (relative to `kms.`).
    pub fn from_section(k: &KmsSection) -> Result<SignerSettings, (String, String)> {
        let bad = |key: &str, m: String| (key.to_owned(), m);
        if let Some(h) = k.rotation_interval_hours {
            if h == 0 || h > 24 {
                return Err(bad(
                    "rotation_interval_hours",
                    format!("{h} is out of range: keys must rotate at least every 24 hours (1-24)"),
                ));
            }
        }
        let provider = k.provider.as_deref().ok_or_else(|| {
            bad(
                "provider",
                "is required: \"aws\", \"vault\", \"azure\" or \"file\"".into(),
            )
        })?;
        let need = |key: &str, v: &Option<String>| {
            v.clone()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad(key, format!("is required with provider = {provider:?}")))
        };
        match provider {
            "aws" => {
                let key_id = need("key_id", &k.key_id)?;
                if !is_key_id(&key_id) {
                    return Err(bad(
                        "key_id",
                        format!(
                            "{key_id:?} is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID), key id or alias (alias/NAME)"
                        ),
                    ));
                }
                if let Some(url) = &k.endpoint_url {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(bad(
                            "endpoint_url",
                            format!("{url:?} is not an http(s) URL"),
                        ));
                    }
                }
                Ok(SignerSettings::Aws {
                    region: need("region", &k.region)?,
                    key_id,
                    endpoint_url: k.endpoint_url.clone(),
                })
            }
            "vault" => {
                let addr = need("addr", &k.addr)?;
                if !(addr.starts_with("http://") || addr.starts_with("https://")) {
                    return Err(bad("addr", format!("{addr:?} is not an http(s) URL")));
                }
                Ok(SignerSettings::Vault {
                    addr,
                    mount: k.mount_path.clone().unwrap_or_else(|| "transit".into()),
                    key_name: need("key_name", &k.key_name)?,
                    token_file: k.token_file.clone(),
                })
            }
            "azure" => {
                let vault_url = need("vault_url", &k.vault_url)?;
                if let Some(why) = vault_url_problem(&vault_url) {
                    return Err(bad(
                        "vault_url",
                        format!(
                            "{vault_url:?} is not a Key Vault URL: {why} (expected https://NAME.vault.azure.net)"
                        ),
                    ));
                }
                Ok(SignerSettings::Azure {
                    vault_url,
                    key_name: need("key_name", &k.key_name)?,
                    ca_file: k.ca_file.clone(),
                })
            }
            "file" => Ok(SignerSettings::File {
                key_dir: k
                    .key_dir
                    .clone()
                    .ok_or_else(|| bad("key_dir", "is required with provider = \"file\"".into()))?,
            }),
            other => Err(bad(
                "provider",
                format!(
                    "unknown provider {other:?}: expected \"aws\", \"vault\", \"azure\" or \"file\""
                ),
            )),
        }
    }
}

/// Ledger settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiptSettings {
    /// Database file.
    pub path: PathBuf,
    /// Node name.
    pub node: String,
    /// Region.
    pub region: String,
    /// Signing key rotation interval.
    pub rotation_interval: Duration,
    /// Payload retention per kind (absent: forever).
    pub retention: BTreeMap<String, Duration>,
    /// Unsigned checkpoints kept.
    pub max_pending_checkpoints: usize,
    /// The signer.
    pub signer: SignerSettings,
}

impl ReceiptSettings {
    /// Builds the ledger settings from `[kms]`, `[receipts]` (if given) and this node's region.
    /// Errors name the key, prefixed with its section (`kms.` or `receipts.`).
    pub fn from_sections(
        kms: &KmsSection,
        receipts: Option<&ReceiptsSection>,
        region: Option<&str>,
    ) -> Result<ReceiptSettings, (String, String)> {
        let signer = SignerSettings::from_section(kms).map_err(|(k, m)| (format!("kms.{k}"), m))?;
        // No [receipts]: every key at its documented default.
        let r = receipts.cloned().unwrap_or_default();
        let retention = check_receipts(&r)?;
        Ok(ReceiptSettings {
            path: r
                .path
                .unwrap_or_else(|| PathBuf::from("/var/lib/knhk/receipts.redb")),
            node: r.node.unwrap_or_else(host_name),
            region: region.unwrap_or("local").to_owned(),
            rotation_interval: Duration::from_secs(
                u64::from(kms.rotation_interval_hours.unwrap_or(24)) * 3600,
            ),
            retention,
            max_pending_checkpoints: r.max_pending_checkpoints.unwrap_or(1024),
            signer,
        })
    }
}

/// Checks `[receipts]` on its own (also when there is no `[kms]` to run a ledger with) and
/// returns its retention per kind. Errors name the key with its `receipts.` prefix.
pub fn check_receipts(r: &ReceiptsSection) -> Result<BTreeMap<String, Duration>, (String, String)> {
    let mut retention = BTreeMap::new();
    for (kind, days) in r.retention_days.iter().flatten() {
        let key = format!("receipts.retention_days.{kind}");
        if ReceiptKind::parse(kind).is_none() {
            let names: Vec<&str> = ReceiptKind::ALL.iter().map(|k| k.as_str()).collect();
            return Err((
                key,
                format!("unknown receipt kind; expected one of {}", names.join(", ")),
            ));
        }
        if *days == 0 {
            return Err((key, "0 is out of range (at least 1 day)".into()));
        }
        retention.insert(kind.clone(), Duration::from_secs(u64::from(*days) * 86_400));
    }
    if r.max_pending_checkpoints == Some(0) {
        return Err((
            "receipts.max_pending_checkpoints".into(),
            "0 is out of range (at least 1)".into(),
        ));
    }
    Ok(retention)
}

/// This machine's host name (the default receipts node name).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .map_err(|e| {
            tracing::warn!(
                "cannot read the host name (/proc/sys/kernel/hostname: {e}); receipts name \
                 this node \"node\" (set receipts.node to name it)"
            )
        })
        // Logged just above: the fallback name below.
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}
