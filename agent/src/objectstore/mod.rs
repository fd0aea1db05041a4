//! Objects in S3-compatible storage (AWS S3, MinIO, moto, …) and signed objects
//! ([`signed`]): what a node fetches from a fleet-wide store, with no knowledge of what the
//! objects mean. The fleet bundle follower uses it; so can anything else the fleet shares
//! (receipts, for one).
//!
//! Reads are conditional on the ETag the reader already holds (`If-None-Match`): an unchanged
//! object costs a `304 Not Modified` and no body. Every call is bounded by a timeout, and
//! credentials come from the default AWS chain (environment, web identity, instance role).

pub mod signed;

use std::time::Duration;

/// An object's address, `s3://BUCKET/KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUrl {
    /// The bucket (3-63 characters: lowercase letters, digits, `.`, `-`).
    pub bucket: String,
    /// The key (not empty).
    pub key: String,
}

impl ObjectUrl {
    /// Parses `s3://BUCKET/KEY`; the error says what is wrong.
    pub fn parse(url: &str) -> Result<ObjectUrl, String> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            format!("{url:?} does not start with s3:// (expected s3://BUCKET/KEY)")
        })?;
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| format!("{url:?} has no key (expected s3://BUCKET/KEY)"))?;
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && !bucket.starts_with(['.', '-'])
            && !bucket.ends_with(['.', '-']);
        if !bucket_ok {
            return Err(format!(
                "{url:?}: bucket {bucket:?} is not a valid S3 bucket name (3-63 characters: lowercase letters, digits, '.', '-')"
            ));
        }
        if key.is_empty() || key.len() > 1024 {
            return Err(format!(
                "{url:?}: the key must be 1-1024 bytes (expected s3://BUCKET/KEY)"
            ));
        }
        Ok(ObjectUrl {
            bucket: bucket.into(),
            key: key.into(),
        })
    }
}

impl std::fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// How to reach the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// The S3 API endpoint (`None`: AWS's, from the region).
    pub endpoint_url: Option<String>,
    /// The region.
    pub region: String,
    /// Path-style addressing (`ENDPOINT/BUCKET/KEY`), as MinIO and moto need.
    pub force_path_style: bool,
    /// Bound of one call, retries included.
    pub timeout: Duration,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached, or failed (worth trying again later).
    #[error("{url}: the object store is unavailable: {message}")]
    Unavailable {
        /// The object.
        url: String,
        /// What happened.
        message: String,
    },
    /// There is no such object (or bucket).
    #[error("{url}: no such object")]
    NotFound {
        /// The object.
        url: String,
    },
    /// The store refused (credentials, permissions).
    #[error("{url}: the object store refused: {message}")]
    Refused {
        /// The object.
        url: String,
        /// The store's code and message.
        message: String,
    },
    /// The object is larger than the reader accepts.
    #[error("{url}: the object is {size} bytes, more than the {limit}-byte limit")]
    TooLarge {
        /// The object.
        url: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

impl StoreError {
    /// A low-cardinality name of the failure (metrics labels).
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::Unavailable { .. } => "unavailable",
            StoreError::NotFound { .. } => "not_found",
            StoreError::Refused { .. } => "refused",
            StoreError::TooLarge { .. } => "too_large",
        }
    }
}

/// What a conditional read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The object still has the ETag the reader holds (`304`, no body transferred).
    NotModified,
    /// The object, with its ETag as the store gives it (quotes included).
    Object {
        /// Its bytes.
        body: Vec<u8>,
        /// Its ETag.
        etag: Option<String>,
    },
}

/// A client of one S3-compatible store.
#[derive(Debug, Clone)]
pub struct ObjectStore {
    #[cfg(feature = "s3")]
    client: aws_sdk_s3::Client,
}

impl ObjectStore {
    /// A client for `settings`, with credentials from the default AWS chain. Nothing is
    /// contacted yet.
    #[cfg(feature = "s3")]
    pub async fn connect(settings: &StoreSettings) -> Result<ObjectStore, StoreError> {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(settings.timeout.min(Duration::from_secs(2)))
            .operation_attempt_timeout(settings.timeout)
            .operation_timeout(settings.timeout)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(settings.region.clone()))
            .timeout_config(timeouts)
            // One attempt per call: the caller polls again anyway.
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1));
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let shared = loader.load().await;
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.force_path_style)
            .build();
        Ok(ObjectStore {
            client: aws_sdk_s3::Client::from_conf(config),
        })
    }

    /// Without the `s3` feature there is no client.
    #[cfg(not(feature = "s3"))]
    pub async fn connect(settings: &StoreSettings) -> Result<ObjectStore, StoreError> {
        Err(StoreError::Refused {
            url: settings.endpoint_url.clone().unwrap_or_default(),
            message: "this build of knhk-agent lacks S3 support (cargo feature s3)".into(),
        })
    }

    /// Reads `url` unless its ETag is still `if_none_match`; refuses an object over `limit`
    /// bytes.
    #[cfg(feature = "s3")]
    pub async fn get(
        &self,
        url: &ObjectUrl,
        if_none_match: Option<&str>,
        limit: u64,
    ) -> Result<Fetched, StoreError> {
        use aws_sdk_s3::{error::SdkError, operation::get_object::GetObjectError};
        let name = url.to_string();
        let mut call = self.client.get_object().bucket(&url.bucket).key(&url.key);
        if let Some(etag) = if_none_match {
            call = call.if_none_match(etag);
        }
        let out = match call.send().await {
            Ok(out) => out,
            Err(SdkError::ServiceError(e)) => {
                if e.raw().status().as_u16() == 304 {
                    return Ok(Fetched::NotModified);
                }
                return Err(match e.err() {
                    GetObjectError::NoSuchKey(_) => StoreError::NotFound { url: name },
                    other => service_error(name, e.raw().status().as_u16(), other),
                });
            }
            Err(SdkError::ResponseError(e)) if e.raw().status().as_u16() == 304 => {
                return Ok(Fetched::NotModified)
            }
            Err(e) => {
                return Err(StoreError::Unavailable {
                    url: name,
                    message: aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
                })
            }
        };
        let size = out.content_length().unwrap_or(0).max(0) as u64;
        if size > limit {
            return Err(StoreError::TooLarge {
                url: name,
                size,
                limit,
            });
        }
        let etag = out.e_tag().map(str::to_owned);
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Unavailable {
                url: name.clone(),
                message: format!("reading the body: {e}"),
            })?
            .into_bytes()
            .to_vec();
        if body.len() as u64 > limit {
            return Err(StoreError::TooLarge {
                url: name,
                size: body.len() as u64,
                limit,
            });
        }
        Ok(Fetched::Object { body, etag })
    }

    /// Without the `s3` feature there is no client.
    #[cfg(not(feature = "s3"))]
    pub async fn get(
        &self,
        url: &ObjectUrl,
        _if_none_match: Option<&str>,
        _limit: u64,
    ) -> Result<Fetched, StoreError> {
        Err(StoreError::Refused {
            url: url.to_string(),
            message: "this build of knhk-agent lacks S3 support (cargo feature s3)".into(),
        })
    }

    /// Writes `body` at `url`, replacing what is there; returns the new ETag.
    #[cfg(feature = "s3")]
    pub async fn put(&self, url: &ObjectUrl, body: Vec<u8>) -> Result<Option<String>, StoreError> {
        use aws_sdk_s3::error::SdkError;
        let name = url.to_string();
        let out = self
            .client
            .put_object()
            .bucket(&url.bucket)
            .key(&url.key)
            .content_type("application/json")
            .body(aws_sdk_s3::primitives::ByteStream::from(body))
            .send()
            .await
            .map_err(|e| match e {
                SdkError::ServiceError(s) => {
                    service_error(name.clone(), s.raw().status().as_u16(), s.err())
                }
                e => StoreError::Unavailable {
                    url: name.clone(),
                    message: aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
                },
            })?;
        Ok(out.e_tag().map(str::to_owned))
    }

    /// Without the `s3` feature there is no client.
    #[cfg(not(feature = "s3"))]
    pub async fn put(&self, url: &ObjectUrl, _body: Vec<u8>) -> Result<Option<String>, StoreError> {
        Err(StoreError::Refused {
            url: url.to_string(),
            message: "this build of knhk-agent lacks S3 support (cargo feature s3)".into(),
        })
    }
}

/// An S3 Object Lock retention mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Nobody, the root account included, can shorten the retention or delete a version
    /// before it ends.
    Compliance,
    /// Users with `s3:BypassGovernanceRetention` can delete or shorten it (tests, mistakes).
    Governance,
}

impl LockMode {
    /// The configuration's and S3's lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Compliance => "compliance",
            LockMode::Governance => "governance",
        }
    }
}

/// Object Lock settings of one write: retention mode and date, and the legal hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    /// Retention mode.
    pub mode: LockMode,
    /// Retain until, seconds since the Unix epoch.
    pub retain_until_secs: i64,
    /// Whether the legal hold is set at once.
    pub legal_hold: bool,
}

/// What a conditional create found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The object was written now.
    Written,
    /// An object was already there (nothing was written).
    Existed,
}

/// Maps an SDK error of `name` to a [`StoreError`].
#[cfg(feature = "s3")]
fn sdk_error<E>(name: &str, e: aws_sdk_s3::error::SdkError<E>) -> StoreError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::fmt::Display + std::error::Error + 'static,
{
    use aws_sdk_s3::error::SdkError;
    match e {
        SdkError::ServiceError(s) => {
            service_error(name.to_owned(), s.raw().status().as_u16(), s.err())
        }
        e => StoreError::Unavailable {
            url: name.to_owned(),
            message: aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
        },
    }
}

#[cfg(feature = "s3")]
impl ObjectStore {
    /// The size of `url`, or `None` when there is no such object (`HEAD`, no body).
    pub async fn head(&self, url: &ObjectUrl) -> Result<Option<u64>, StoreError> {
        use aws_sdk_s3::error::SdkError;
        let name = url.to_string();
        match self
            .client
            .head_object()
            .bucket(&url.bucket)
            .key(&url.key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(SdkError::ServiceError(s)) if s.raw().status().as_u16() == 404 => Ok(None),
            Err(e) => Err(sdk_error(&name, e)),
        }
    }

    /// Writes `body` at `url` with `lock`, only if no object is there (`If-None-Match: *`; a
    /// store that already has one answers `412`, which is [`Created::Existed`]). One
    /// `PutObject`: never a multipart upload.
    pub async fn create_locked(
        &self,
        url: &ObjectUrl,
        body: Vec<u8>,
        content_type: &str,
        lock: &ObjectLock,
    ) -> Result<Created, StoreError> {
        use aws_sdk_s3::{
            error::SdkError,
            types::{ObjectLockLegalHoldStatus, ObjectLockMode},
        };
        let name = url.to_string();
        let mode = match lock.mode {
            LockMode::Compliance => ObjectLockMode::Compliance,
            LockMode::Governance => ObjectLockMode::Governance,
        };
        let call = self
            .client
            .put_object()
            .bucket(&url.bucket)
            .key(&url.key)
            .content_type(content_type)
            .if_none_match("*")
            .object_lock_mode(mode)
            .object_lock_retain_until_date(aws_sdk_s3::primitives::DateTime::from_secs(
                lock.retain_until_secs,
            ))
            .set_object_lock_legal_hold_status(
                lock.legal_hold.then_some(ObjectLockLegalHoldStatus::On),
            )
            .body(aws_sdk_s3::primitives::ByteStream::from(body));
        match call.send().await {
            Ok(_) => Ok(Created::Written),
            Err(SdkError::ServiceError(s)) if s.raw().status().as_u16() == 412 => {
                Ok(Created::Existed)
            }
            Err(e) => Err(sdk_error(&name, e)),
        }
    }

    /// Sets (`on`) or clears the legal hold of `url`'s current version.
    pub async fn set_legal_hold(&self, url: &ObjectUrl, on: bool) -> Result<(), StoreError> {
        use aws_sdk_s3::types::{ObjectLockLegalHold, ObjectLockLegalHoldStatus};
        let status = if on {
            ObjectLockLegalHoldStatus::On
        } else {
            ObjectLockLegalHoldStatus::Off
        };
        self.client
            .put_object_legal_hold()
            .bucket(&url.bucket)
            .key(&url.key)
            .legal_hold(ObjectLockLegalHold::builder().status(status).build())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error(&url.to_string(), e))
    }

    /// Every key under `prefix` in `bucket` with its size, in key order (paged `ListObjectsV2`).
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let name = format!("s3://{bucket}/{prefix}");
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| sdk_error(&name, e))?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    out.push((k.to_owned(), o.size().unwrap_or(0).max(0) as u64));
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated().unwrap_or(false) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        out.sort();
        Ok(out)
    }
}

/// A service error: 5xx, 408 and 429 may pass (unavailable), 404 is a missing object or
/// bucket, anything else a refusal, named by the store's code and message.
#[cfg(feature = "s3")]
fn service_error(
    url: String,
    status: u16,
    err: &(impl aws_sdk_s3::error::ProvideErrorMetadata + std::fmt::Display),
) -> StoreError {
    let message = format!(
        "HTTP {status}, {}: {}",
        err.code().unwrap_or("error"),
        err.message().unwrap_or("(no message)")
    );
    match status {
        404 => StoreError::NotFound { url },
        408 | 429 | 500..=599 => StoreError::Unavailable { url, message },
        _ => StoreError::Refused { url, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_urls_parse_and_bad_ones_say_why() {
        let u = ObjectUrl::parse("s3://fleet-bundles/prod/bundle.json").expect("valid");
        assert_eq!(
            (u.bucket.as_str(), u.key.as_str()),
            ("fleet-bundles", "prod/bundle.json")
        );
        assert_eq!(u.to_string(), "s3://fleet-bundles/prod/bundle.json");
        for (bad, why) in [
            ("https://b/k", "does not start with s3://"),
            ("s3://bucket", "has no key"),
            ("s3://bucket/", "the key must be 1-1024 bytes"),
            ("s3://Bucket/k", "is not a valid S3 bucket name"),
            ("s3://ab/k", "is not a valid S3 bucket name"),
            ("s3://-ab/k", "is not a valid S3 bucket name"),
        ] {
            let e = ObjectUrl::parse(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
