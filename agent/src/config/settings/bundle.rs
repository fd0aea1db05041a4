//! `[bundle]` → [`BundleSettings`]: the fleet bundle this node follows.

use serde::Deserialize;
use std::{path::PathBuf, time::Duration};
use toml::Spanned;

/// `[bundle]` as written: every value keeps its place, so an error names its line.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSection {
    /// The bundle object, `s3://BUCKET/KEY`.
    pub url: Option<Spanned<String>>,
    /// The S3 API endpoint (`http(s)://HOST[:PORT]`); default: AWS's.
    pub endpoint_url: Option<Spanned<String>>,
    /// The region (default `us-east-1`).
    pub region: Option<Spanned<String>>,
    /// Path-style addressing (default: true when `endpoint_url` is set).
    pub force_path_style: Option<Spanned<bool>>,
    /// Time between polls, ms (1000-86400000, default 30000).
    pub poll_interval_ms: Option<Spanned<u64>>,
    /// Each wait is `poll_interval_ms × (1 + jitter × u)`, u uniform in [0, 1) (0-1, default 0.2).
    pub jitter: Option<Spanned<f64>>,
    /// Bound of each call to the store, ms (100-60000, default 5000).
    pub timeout_ms: Option<Spanned<u64>>,
    /// The public key bundles must be signed with (PEM, SubjectPublicKeyInfo, P-256).
    pub public_key_file: Option<Spanned<PathBuf>>,
    /// Or: the AWS KMS key (id, ARN or alias) whose public key it is (`GetPublicKey` at start).
    pub kms_key_id: Option<Spanned<String>>,
    /// The KMS endpoint for `kms_key_id` (default: AWS's for `region`).
    pub kms_endpoint_url: Option<Spanned<String>>,
}

/// Where the bundle's public key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleKey {
    /// A PEM file, checked to hold a P-256 public key while the configuration loads.
    File {
        /// The file.
        path: PathBuf,
        /// Its key (SubjectPublicKeyInfo DER).
        der: Vec<u8>,
    },
    /// An AWS KMS key, asked for its public key at start.
    Kms {
        /// Id, ARN or alias.
        key_id: String,
        /// The KMS endpoint (`None`: AWS's).
        endpoint_url: Option<String>,
    },
}

/// Validated `[bundle]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleSettings {
    /// `s3://BUCKET/KEY`, as written.
    pub url: String,
    /// The bucket.
    pub bucket: String,
    /// The key.
    pub key: String,
    /// The S3 endpoint.
    pub endpoint_url: Option<String>,
    /// The region.
    pub region: String,
    /// Path-style addressing.
    pub force_path_style: bool,
    /// Time between polls.
    pub poll_interval: Duration,
    /// Jitter fraction, 0-1.
    pub jitter: f64,
    /// Bound of each call.
    pub timeout: Duration,
    /// The verifying key.
    pub key_source: BundleKey,
}

/// An error: the key (below `bundle.`), the message, and where (a byte offset) when known.
pub type BundleError = (String, String, Option<usize>);

fn endpoint(key: &str, v: &Spanned<String>) -> Result<String, BundleError> {
    let s = v.get_ref();
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace) => {
            Ok(s.clone())
        }
        _ => Err((
            key.into(),
            format!("{s:?} is not an http(s) URL (expected e.g. \"https://s3.eu-west-1.amazonaws.com\" or \"http://127.0.0.1:9000\")"),
            Some(v.span().start),
        )),
    }
}

impl BundleSettings {
    /// Checks a `[bundle]` section; `base` resolves a relative `public_key_file` (the
    /// configuration file's directory). Errors name the key and, where known, its place.
    pub fn from_section(
        s: &BundleSection,
        base: Option<&std::path::Path>,
    ) -> Result<BundleSettings, BundleError> {
        let url = s.url.as_ref().ok_or_else(|| {
            (
                "url".to_string(),
                "is required: the bundle object, \"s3://BUCKET/KEY\"".to_string(),
                None,
            )
        })?;
        let parsed = crate::objectstore::ObjectUrl::parse(url.get_ref())
            .map_err(|m| ("url".to_string(), m, Some(url.span().start)))?;
        let endpoint_url = s
            .endpoint_url
            .as_ref()
            .map(|e| endpoint("endpoint_url", e))
            .transpose()?;
        let region = match &s.region {
            Some(r) => {
                let ok = !r.get_ref().is_empty()
                    && r.get_ref().len() <= 64
                    && r.get_ref()
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if !ok {
                    return Err((
                        "region".into(),
                        format!(
                            "{:?} is not a region name (lowercase letters, digits, '-', e.g. \"eu-west-1\")",
                            r.get_ref()
                        ),
                        Some(r.span().start),
                    ));
                }
                r.get_ref().clone()
            }
            None => "us-east-1".into(),
        };
        let range = |key: &str, v: &Option<Spanned<u64>>, lo: u64, hi: u64, default: u64| match v {
            Some(v) if !(lo..=hi).contains(v.get_ref()) => Err((
                key.to_string(),
                format!("{} is out of range ({lo}-{hi})", v.get_ref()),
                Some(v.span().start),
            )),
            Some(v) => Ok(*v.get_ref()),
            None => Ok(default),
        };
        let poll_ms = range(
            "poll_interval_ms",
            &s.poll_interval_ms,
            1000,
            86_400_000,
            30_000,
        )?;
        let timeout_ms = range("timeout_ms", &s.timeout_ms, 100, 60_000, 5000)?;
        let jitter = match &s.jitter {
            Some(j) if !(0.0..=1.0).contains(j.get_ref()) => {
                return Err((
                    "jitter".into(),
                    format!(
                        "{} is out of range (0-1: the fraction of poll_interval_ms added at random to each wait)",
                        j.get_ref()
                    ),
                    Some(j.span().start),
                ))
            }
            Some(j) => *j.get_ref(),
            None => 0.2,
        };
        let kms_endpoint_url = s
            .kms_endpoint_url
            .as_ref()
            .map(|e| endpoint("kms_endpoint_url", e))
            .transpose()?;
        let key_source = match (&s.public_key_file, &s.kms_key_id) {
            (Some(f), Some(k)) => {
                return Err((
                    "kms_key_id".into(),
                    format!(
                        "give public_key_file ({}) or kms_key_id ({:?}), not both",
                        f.get_ref().display(),
                        k.get_ref()
                    ),
                    Some(k.span().start),
                ))
            }
            (None, None) => {
                return Err((
                    "public_key_file".into(),
                    "bundles must be verified: set public_key_file (a P-256 public key, PEM) or kms_key_id (an AWS KMS ECC_NIST_P256 key)".into(),
                    None,
                ))
            }
            (Some(f), None) => {
                let path = match base {
                    Some(b) if f.get_ref().is_relative() => b.join(f.get_ref()),
                    _ => f.get_ref().clone(),
                };
                let bad = |m: String| ("public_key_file".to_string(), m, Some(f.span().start));
                let pem = std::fs::read_to_string(&path)
                    .map_err(|e| bad(format!("{}: {e}", path.display())))?;
                let der = crate::objectstore::signed::public_key_pem_to_der(&pem).map_err(|e| {
                    bad(format!(
                        "{} is not a P-256 public key in PEM (-----BEGIN PUBLIC KEY-----): {e}",
                        path.display()
                    ))
                })?;
                if kms_endpoint_url.is_some() {
                    return Err((
                        "kms_endpoint_url".into(),
                        "is only used with kms_key_id".into(),
                        s.kms_endpoint_url.as_ref().map(|e| e.span().start),
                    ));
                }
                BundleKey::File { path, der }
            }
            (None, Some(k)) => {
                if k.get_ref().trim().is_empty() {
                    return Err((
                        "kms_key_id".into(),
                        "is empty (expected a key id, ARN or alias/NAME)".into(),
                        Some(k.span().start),
                    ));
                }
                BundleKey::Kms {
                    key_id: k.get_ref().clone(),
                    endpoint_url: kms_endpoint_url,
                }
            }
        };
        Ok(BundleSettings {
            url: url.get_ref().clone(),
            bucket: parsed.bucket,
            key: parsed.key,
            force_path_style: s
                .force_path_style
                .as_ref()
                .map_or(endpoint_url.is_some(), |v| *v.get_ref()),
            endpoint_url,
            region,
            poll_interval: Duration::from_millis(poll_ms),
            jitter,
            timeout: Duration::from_millis(timeout_ms),
            key_source,
        })
    }
}
