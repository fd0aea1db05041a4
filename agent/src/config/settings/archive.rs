//! `[archive]` → [`ArchiveSettings`]: where the receipts ledger is archived (S3 with Object Lock).

use crate::objectstore::LockMode;
use serde::Deserialize;
use std::time::Duration;
use toml::Spanned;

/// `[archive]` as written: every value keeps its place, so an error names its line.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveSection {
    /// The archive's place, `s3://BUCKET/PREFIX` (the prefix may be empty).
    pub url: Option<Spanned<String>>,
    /// The S3 API endpoint (`http(s)://HOST[:PORT]`); default: AWS's.
    pub endpoint_url: Option<Spanned<String>>,
    /// The region (default `us-east-1`).
    pub region: Option<Spanned<String>>,
    /// Path-style addressing (default: true when `endpoint_url` is set).
    pub force_path_style: Option<Spanned<bool>>,
    /// Object Lock mode: `compliance` or `governance` (required).
    pub lock_mode: Option<Spanned<String>>,
    /// Retention from upload, in days (1-36500, required).
    pub retention_days: Option<Spanned<u64>>,
    /// Receipts per segment at most (1-100000, default 10000).
    pub segment_max_receipts: Option<Spanned<u64>>,
    /// Time between upload rounds, ms (100-3600000, default 5000).
    pub upload_interval_ms: Option<Spanned<u64>>,
    /// Receipts waiting to be archived beyond which readiness fails (at least
    /// `segment_max_receipts`, at most 100000000; default 1000000).
    pub max_backlog_receipts: Option<Spanned<u64>>,
    /// Bound of each call to the store, ms (100-60000, default 10000).
    pub timeout_ms: Option<Spanned<u64>>,
}

/// Validated `[archive]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchiveSettings {
    /// `s3://BUCKET/PREFIX`, as written.
    pub url: String,
    /// The bucket.
    pub bucket: String,
    /// The key prefix, without a trailing `/` (may be empty).
    pub prefix: String,
    /// The S3 endpoint.
    pub endpoint_url: Option<String>,
    /// The region.
    pub region: String,
    /// Path-style addressing.
    pub force_path_style: bool,
    /// Object Lock mode.
    pub lock_mode: LockMode,
    /// Retention from upload, days.
    pub retention_days: u64,
    /// Receipts per segment at most.
    pub segment_max_receipts: u64,
    /// Time between upload rounds.
    pub upload_interval: Duration,
    /// The backlog bound (receipts) beyond which readiness fails.
    pub max_backlog_receipts: u64,
    /// Bound of each call.
    pub timeout: Duration,
}

/// An error: the key (below `archive.`), the message, and where (a byte offset) when known.
pub type ArchiveError = (String, String, Option<usize>);

/// Splits `s3://BUCKET[/PREFIX]` into bucket and prefix (no trailing `/`).
pub fn parse_archive_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        format!("{url:?} does not start with s3:// (expected s3://BUCKET/PREFIX)")
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_end_matches('/');
    // The bucket rules are the object store's.
    crate::objectstore::ObjectUrl::parse(&format!("s3://{bucket}/x")).map_err(|_| {
        format!(
            "{url:?}: bucket {bucket:?} is not a valid S3 bucket name (3-63 characters: lowercase letters, digits, '.', '-')"
        )
    })?;
    if prefix.len() > 512 || prefix.contains("//") {
        return Err(format!(
            "{url:?}: the prefix must be at most 512 bytes without empty path parts"
        ));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

impl ArchiveSettings {
    /// Checks an `[archive]` section. Errors name the key and, where known, its place.
    pub fn from_section(s: &ArchiveSection) -> Result<ArchiveSettings, ArchiveError> {
        let url = s.url.as_ref().ok_or_else(|| {
            (
                "url".to_string(),
                "is required: where to archive, \"s3://BUCKET/PREFIX\"".to_string(),
                None,
            )
        })?;
        let (bucket, prefix) = parse_archive_url(url.get_ref())
            .map_err(|m| ("url".to_string(), m, Some(url.span().start)))?;
        let endpoint_url = match &s.endpoint_url {
            Some(v) => {
                let e = v.get_ref();
                let rest = e
                    .strip_prefix("https://")
                    .or_else(|| e.strip_prefix("http://"));
                match rest {
                    Some(r)
                        if !r.is_empty()
                            && !r.starts_with('/')
                            && !r.contains(char::is_whitespace) =>
                    {
                        Some(e.clone())
                    }
                    _ => {
                        return Err((
                            "endpoint_url".into(),
                            format!("{e:?} is not an http(s) URL (expected e.g. \"https://s3.eu-west-1.amazonaws.com\" or \"http://127.0.0.1:9000\")"),
                            Some(v.span().start),
                        ))
                    }
                }
            }
            None => None,
        };
        let region = match &s.region {
            Some(r) => {
                let v = r.get_ref();
                let ok = !v.is_empty()
                    && v.len() <= 64
                    && v.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if !ok {
                    return Err((
                        "region".into(),
                        format!("{v:?} is not a region name (lowercase letters, digits, '-', e.g. \"eu-west-1\")"),
                        Some(r.span().start),
                    ));
                }
                v.clone()
            }
            None => "us-east-1".into(),
        };
        let lock_mode = match &s.lock_mode {
            Some(m) => match m.get_ref().as_str() {
                "compliance" => LockMode::Compliance,
                "governance" => LockMode::Governance,
                other => {
                    return Err((
                        "lock_mode".into(),
                        format!("{other:?} is not an Object Lock mode (expected \"compliance\" or \"governance\")"),
                        Some(m.span().start),
                    ))
                }
            },
            None => {
                return Err((
                    "lock_mode".into(),
                    "is required: \"compliance\" (nobody can delete before retention ends) or \"governance\"".into(),
                    None,
                ))
            }
        };
        let range =
            |key: &str, v: &Option<Spanned<u64>>, lo: u64, hi: u64, default: Option<u64>| match v {
                Some(v) if !(lo..=hi).contains(v.get_ref()) => Err((
                    key.to_string(),
                    format!("{} is out of range ({lo}-{hi})", v.get_ref()),
                    Some(v.span().start),
                )),
                Some(v) => Ok(*v.get_ref()),
                None => default
                    .ok_or_else(|| (key.to_string(), format!("is required ({lo}-{hi})"), None)),
            };
        let retention_days = range("retention_days", &s.retention_days, 1, 36_500, None)?;
        let segment_max_receipts = range(
            "segment_max_receipts",
            &s.segment_max_receipts,
            1,
            100_000,
            Some(10_000),
        )?;
        let upload_ms = range(
            "upload_interval_ms",
            &s.upload_interval_ms,
            100,
            3_600_000,
            Some(5000),
        )?;
        let max_backlog_receipts = range(
            "max_backlog_receipts",
            &s.max_backlog_receipts,
            1,
            100_000_000,
            Some(1_000_000),
        )?;
        if max_backlog_receipts < segment_max_receipts {
            return Err((
                "max_backlog_receipts".into(),
                format!(
                    "{max_backlog_receipts} is less than segment_max_receipts ({segment_max_receipts}): the backlog bound must hold at least one segment"
                ),
                s.max_backlog_receipts.as_ref().map(|v| v.span().start),
            ));
        }
        let timeout_ms = range("timeout_ms", &s.timeout_ms, 100, 60_000, Some(10_000))?;
        Ok(ArchiveSettings {
            url: url.get_ref().clone(),
            bucket,
            prefix,
            force_path_style: s
                .force_path_style
                .as_ref()
                .map_or(endpoint_url.is_some(), |v| *v.get_ref()),
            endpoint_url,
            region,
            lock_mode,
            retention_days,
            segment_max_receipts,
            upload_interval: Duration::from_millis(upload_ms),
            max_backlog_receipts,
            timeout: Duration::from_millis(timeout_ms),
        })
    }
}
