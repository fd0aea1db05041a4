//! The fleet bundle: one signed document in S3-compatible storage that every node of a fleet
//! follows. A bundle carries a policy (the configuration text the live store keeps) and,
//! optionally, a rollout and feature flags (TOML tables, checked to be tables and carried as
//! text).
//!
//! [`Follower`] polls the object with its ETag (`If-None-Match`, jittered interval), verifies
//! the signature against the configured public key *before* decoding anything
//! ([`crate::objectstore::signed`]), and hands each verified, changed bundle to a [`Sink`]
//! (`agent.rs` applies its policy through the control core). What was applied is kept under
//! `agent.state_dir` (`bundle-last-good.json`) and used at start when the store cannot be
//! reached. Poll results, failures by reason and the last apply are metrics; every applied or
//! refused bundle is reported to the sink (receipts). See `docs/promotion.md`.

mod last_good;
mod metrics;

pub use last_good::{LastGood, LastGoodRecord};

use crate::{
    config::{BundleSettings, Config},
    model::log_escape,
    objectstore::{
        signed::{self, SignedError},
        Fetched, ObjectStore, ObjectUrl, StoreError, StoreSettings,
    },
    policy::Policy,
};
use serde::{Deserialize, Serialize};
use std::{
    future::Future,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

/// The envelope's `payload_type` of a bundle.
pub const PAYLOAD_TYPE: &str = "knhk-bundle/v1";
/// The largest bundle object read: the configuration limit.
pub const MAX_BUNDLE_BYTES: u64 = crate::config::MAX_CONFIG_BYTES;

/// A bundle's payload (JSON, signed inside the envelope).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleDocument {
    /// Format version: 1.
    pub version: u32,
    /// The policy, as configuration TOML (`[agent]` settings and `[[policy.rules]]`).
    pub policy: String,
    /// The rollout, a TOML table (carried; acted on by the promotion work).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// Feature flags, a TOML table (carried; acted on by the promotion work).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<String>,
    /// Free text for people (who published it, why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

impl BundleDocument {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Strings and integers: serialization cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Checks the document as a node will: version, policy, and that rollout and flags are
    /// TOML tables. Returns the policy.
    pub fn check(&self) -> Result<Policy, BundleError> {
        if self.version != 1 {
            return Err(BundleError::Malformed(format!(
                "version {} is not supported (this agent reads version 1)",
                self.version
            )));
        }
        let config = Config::parse(&self.policy, "the bundle's policy")
            .map_err(|e| BundleError::InvalidPolicy(e.to_string()))?;
        for (name, text) in [("rollout", &self.rollout), ("flags", &self.flags)] {
            if let Some(t) = text {
                toml::from_str::<toml::Table>(t).map_err(|e| {
                    BundleError::Malformed(format!("its {name} is not a TOML table: {e}"))
                })?;
            }
        }
        self.rollout_terms()?;
        Ok(config.policy())
    }

    /// What the bundle asks of a rollout: `None` when it carries neither `rollout` nor `flags`
    /// (its policy is switched in at once). `rollout` keys: `steps` (increasing percentages),
    /// `beats_per_step`, `seed`; `flags` keys: `feature_flags` (the candidate's flag names).
    pub fn rollout_terms(&self) -> Result<Option<RolloutTerms>, BundleError> {
        if self.rollout.is_none() && self.flags.is_none() {
            return Ok(None);
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RolloutTable {
            steps: Option<Vec<f64>>,
            beats_per_step: Option<u32>,
            seed: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FlagsTable {
            feature_flags: Vec<crate::model::FeatureFlag>,
        }
        let bad = |name: &str, e: String| BundleError::Malformed(format!("its {name}: {e}"));
        let rollout: Option<RolloutTable> = self
            .rollout
            .as_deref()
            .map(toml::from_str)
            .transpose()
            .map_err(|e| bad("rollout", e.to_string()))?;
        let flags: Option<FlagsTable> = self
            .flags
            .as_deref()
            .map(toml::from_str)
            .transpose()
            .map_err(|e| bad("flags", e.to_string()))?;
        let steps = match rollout.as_ref().and_then(|r| r.steps.as_deref()) {
            Some(s) => {
                Some(crate::model::rollout::check_steps(s).map_err(|e| bad("rollout.steps", e))?)
            }
            None => None,
        };
        if let Some(b) = rollout.as_ref().and_then(|r| r.beats_per_step) {
            if !(1..=100_000).contains(&b) {
                return Err(bad(
                    "rollout.beats_per_step",
                    format!("{b} is outside 1-100000"),
                ));
            }
        }
        let flags = match flags {
            Some(f) => {
                let mut set = crate::model::FeatureFlags::new();
                for flag in f.feature_flags {
                    if !set.insert(flag) {
                        return Err(bad(
                            "flags.feature_flags",
                            format!("{} is listed twice", flag.as_str()),
                        ));
                    }
                }
                Some(set)
            }
            None => None,
        };
        Ok(Some(RolloutTerms {
            steps,
            beats_per_step: rollout.as_ref().and_then(|r| r.beats_per_step),
            seed: rollout.and_then(|r| r.seed),
            flags,
        }))
    }
}

/// A bundle's rollout: its policy reaches the node's workloads step by step (see
/// docs/promotion.md) instead of at once.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutTerms {
    /// Steps (`None`: the node's `[promotion] steps`).
    pub steps: Option<Vec<crate::model::Percent>>,
    /// Beats per step (`None`: the node's default).
    pub beats_per_step: Option<u32>,
    /// The split's seed (`None`: the candidate's digest, the same on every node).
    pub seed: Option<String>,
    /// The candidate's feature flags (`None`: the live generation's).
    pub flags: Option<crate::model::FeatureFlags>,
}

/// A verified bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    /// The document.
    pub document: BundleDocument,
    /// Its policy (with the settings the document gives; the node adds its own heat and
    /// histogram settings).
    pub policy: Policy,
    /// `sha256:<hex>` of the payload.
    pub digest: String,
    /// The key id the envelope names.
    pub key_id: String,
    /// The object's ETag.
    pub etag: Option<String>,
}

/// Why a bundle was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The signature check failed: unsigned, tampered or signed by another key.
    #[error("refused: {0}")]
    Signature(#[from] SignedError),
    /// The payload is not a bundle document.
    #[error("refused: the bundle is malformed: {0}")]
    Malformed(String),
    /// Its policy does not load.
    #[error("refused: the bundle's policy is invalid: {0}")]
    InvalidPolicy(String),
    /// The node could not apply it.
    #[error("applying the bundle failed: {0}")]
    Apply(String),
    /// The public key could not be had, or signing failed.
    #[error("{0}")]
    Key(String),
    /// A local problem (a file, the metrics registry).
    #[error("{0}")]
    Local(String),
}

impl BundleError {
    /// A low-cardinality name (the `reason` label of `knhk_bundle_failures_total`).
    pub fn reason(&self) -> &'static str {
        match self {
            BundleError::Store(e) => e.reason(),
            BundleError::Signature(e) => e.reason(),
            BundleError::Malformed(_) => "malformed",
            BundleError::InvalidPolicy(_) => "invalid_policy",
            BundleError::Apply(_) => "apply",
            BundleError::Key(_) => "key",
            BundleError::Local(_) => "local",
        }
    }
}

/// Every failure reason.
pub const FAILURE_REASONS: [&str; 10] = [
    "unavailable",
    "not_found",
    "refused",
    "too_large",
    "unsigned",
    "bad_signature",
    "malformed",
    "invalid_policy",
    "apply",
    "key",
];

/// The bytes the signature of a bundle `payload` covers (see [`signed::signed_message`]).
pub fn signed_message(payload: &[u8]) -> Vec<u8> {
    signed::signed_message(PAYLOAD_TYPE, payload)
}

/// The bundle object: `payload` with its DER `signature` by `key_id`.
pub fn seal(payload: &[u8], key_id: &str, signature: &[u8]) -> Vec<u8> {
    signed::seal(PAYLOAD_TYPE, payload, key_id, signature)
}

/// Verifies `object` with `public_key_der`, then decodes and checks the bundle.
pub fn open(
    object: &[u8],
    public_key_der: &[u8],
    etag: Option<String>,
) -> Result<Bundle, BundleError> {
    let verified = signed::open(object, PAYLOAD_TYPE, public_key_der)?;
    let document: BundleDocument = serde_json::from_slice(&verified.payload)
        .map_err(|e| BundleError::Malformed(format!("not a bundle document: {e}")))?;
    let policy = document.check()?;
    Ok(Bundle {
        document,
        policy,
        digest: signed::fingerprint(&verified.payload),
        key_id: verified.key_id,
        etag,
    })
}

/// What became of a bundle, for receipts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied (or already live).
    Applied {
        /// The bundle URL.
        url: String,
        /// The payload digest.
        digest: String,
        /// The object's ETag.
        etag: Option<String>,
        /// Where it came from: `store` or `disk` (the last good bundle at start).
        from: &'static str,
        /// What the sink said (e.g. the generation).
        detail: String,
    },
    /// Refused: nothing of it was applied.
    Refused {
        /// The bundle URL.
        url: String,
        /// The object's ETag.
        etag: Option<String>,
        /// The failure reason (one of [`FAILURE_REASONS`]).
        reason: &'static str,
        /// The error.
        error: String,
    },
}

/// Where verified bundles go.
#[tonic::async_trait]
pub trait Sink: Send + Sync {
    /// Makes `bundle` live; returns what was done (e.g. "generation 7", "already live").
    async fn apply(&self, bundle: &Bundle) -> Result<String, String>;
    /// Records what became of a bundle (receipts); must not fail.
    async fn record(&self, outcome: Outcome);
}

#[derive(Debug, Default)]
struct State {
    /// The ETag of the last object read (applied or refused): the next poll's `If-None-Match`.
    seen_etag: Option<String>,
    /// Why the object at `seen_etag` was refused.
    seen_error: Option<String>,
    /// Why the last call to the store failed.
    store_error: Option<String>,
    /// The bundle live on the node: digest and ETag.
    applied: Option<(String, Option<String>)>,
}

/// Follows one bundle.
#[derive(Clone)]
pub struct Follower {
    settings: BundleSettings,
    url: ObjectUrl,
    store: ObjectStore,
    public_key_der: Arc<Vec<u8>>,
    last_good: LastGood,
    metrics: metrics::Metrics,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("url", &self.settings.url)
            .finish_non_exhaustive()
    }
}

impl Follower {
    /// A follower of `settings.url`, verifying with `public_key_der`, keeping the last good
    /// bundle in `state_dir`.
    pub async fn new(
        settings: &BundleSettings,
        public_key_der: Vec<u8>,
        state_dir: &Path,
    ) -> Result<Follower, BundleError> {
        let url = ObjectUrl::parse(&settings.url).map_err(BundleError::Malformed)?;
        let store = ObjectStore::connect(&StoreSettings {
            endpoint_url: settings.endpoint_url.clone(),
            region: settings.region.clone(),
            force_path_style: settings.force_path_style,
            timeout: settings.timeout,
        })
        .await?;
        Ok(Follower {
            settings: settings.clone(),
            url,
            store,
            public_key_der: Arc::new(public_key_der),
            last_good: LastGood::new(state_dir),
            metrics: metrics::Metrics::new()
                .map_err(|e| BundleError::Local(format!("bundle metrics: {e}")))?,
            state: Arc::new(Mutex::new(State::default())),
        })
    }

    /// The bundle URL.
    pub fn url(&self) -> &str {
        &self.settings.url
    }

    /// Registers the `knhk_bundle_*` metrics with `registry`.
    pub fn register_metrics(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        self.metrics.register(registry)
    }

    /// A readiness check: fails, naming the bundle URL, while the store cannot be read or the
    /// newest object was refused, and says which bundle is enforced meanwhile.
    pub fn readiness_check(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let state = self.state.clone();
        let url = self.settings.url.clone();
        move || {
            let Ok(s) = state.lock() else {
                return Err(format!("bundle {url}: internal error (poisoned state)"));
            };
            let Some(why) = s.store_error.as_ref().or(s.seen_error.as_ref()) else {
                return Ok(());
            };
            let kept = match &s.applied {
                Some((digest, etag)) => format!(
                    "the last good bundle stays live (digest {digest}, etag {})",
                    etag.as_deref().unwrap_or("none")
                ),
                None => {
                    "no bundle was applied yet: the configuration file's policy stays live".into()
                }
            };
            Err(format!("bundle {url}: {why}; {kept}"))
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        match self.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// At start: applies the last good bundle kept on disk (verified again with the configured
    /// key), so a node whose store is unreachable enforces what it last followed. `Ok(false)`:
    /// none kept.
    pub async fn adopt_last_good(&self, sink: &dyn Sink) -> Result<bool, BundleError> {
        let record = match self.last_good.load() {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(false),
            Err(e) => {
                tracing::warn!(
                    "{}: ignored; the bundle is fetched from the store",
                    log_escape(&e)
                );
                return Ok(false);
            }
        };
        if record.url != self.settings.url {
            tracing::info!(kept = %record.url, configured = %self.settings.url, "the last good bundle on disk is of another URL: ignored");
            return Ok(false);
        }
        let object = record.object().map_err(BundleError::Malformed)?;
        let bundle = match open(&object, &self.public_key_der, record.etag.clone()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(path = %self.last_good.path().display(), "the last good bundle on disk does not verify with the configured key ({}): ignored", log_escape(&e.to_string()));
                return Ok(false);
            }
        };
        self.apply(sink, bundle, "disk").await?;
        Ok(true)
    }

    /// One poll: a conditional read, then (when the object changed) verify, check, apply and
    /// keep. Returns the error that the poll ended with, if any.
    pub async fn poll_once(&self, sink: &dyn Sink) -> Result<(), BundleError> {
        let etag = self.with_state(|s| s.seen_etag.clone());
        let fetched = self
            .store
            .get(&self.url, etag.as_deref(), MAX_BUNDLE_BYTES)
            .await;
        let (body, etag) = match fetched {
            Ok(Fetched::NotModified) => {
                self.metrics.poll("not_modified");
                self.with_state(|s| s.store_error = None);
                return Ok(());
            }
            Ok(Fetched::Object { body, etag }) => {
                self.metrics.poll("fetched");
                (body, etag)
            }
            Err(e) => {
                let result = if e.reason() == "unavailable" {
                    "unavailable"
                } else {
                    "error"
                };
                self.metrics.poll(result);
                self.metrics.failure(e.reason());
                let text = e.to_string();
                tracing::warn!(url = %self.settings.url, "bundle poll failed: {}", log_escape(&text));
                self.with_state(|s| s.store_error = Some(text));
                return Err(e.into());
            }
        };
        self.with_state(|s| {
            s.store_error = None;
            s.seen_etag = etag.clone();
            s.seen_error = None;
        });
        let result = match open(&body, &self.public_key_der, etag.clone()) {
            Ok(bundle) => self.apply(sink, bundle, "store").await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.refused(sink, etag, e).await;
        } else {
            // Kept after it is live, atomically: a restart without the store re-applies it.
            let record = LastGoodRecord::new(
                &self.settings.url,
                self.with_state(|s| s.seen_etag.clone()),
                &body,
            );
            let lg = self.last_good.clone();
            match tokio::task::spawn_blocking(move || lg.save(&record)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!("{e}: a restart without the store would not find this bundle")
                }
                Err(e) => tracing::error!("keeping the last good bundle: {e}"),
            }
        }
        result
    }

    async fn refused(&self, sink: &dyn Sink, etag: Option<String>, e: &BundleError) {
        self.metrics.failure(e.reason());
        let text = e.to_string();
        tracing::error!(url = %self.settings.url, etag = %log_escape(etag.as_deref().unwrap_or("")), "bundle {}; the live policy stays", log_escape(&text));
        self.with_state(|s| {
            s.seen_error = Some(text.clone());
            if e.reason() == "apply" {
                // Not the object's fault: read it again at the next poll.
                s.seen_etag = None;
            }
        });
        sink.record(Outcome::Refused {
            url: self.settings.url.clone(),
            etag,
            reason: e.reason(),
            error: text,
        })
        .await;
    }

    async fn apply(
        &self,
        sink: &dyn Sink,
        bundle: Bundle,
        from: &'static str,
    ) -> Result<(), BundleError> {
        let detail = sink.apply(&bundle).await.map_err(BundleError::Apply)?;
        tracing::info!(url = %self.settings.url, digest = %bundle.digest, etag = %log_escape(bundle.etag.as_deref().unwrap_or("")), from, "bundle applied: {detail}");
        self.metrics.applied();
        self.with_state(|s| {
            s.applied = Some((bundle.digest.clone(), bundle.etag.clone()));
            if from == "disk" {
                // The next poll is conditional on what is live.
                s.seen_etag = bundle.etag.clone();
            }
        });
        sink.record(Outcome::Applied {
            url: self.settings.url.clone(),
            digest: bundle.digest,
            etag: bundle.etag,
            from,
            detail,
        })
        .await;
        Ok(())
    }

    /// The wait before the next poll: `poll_interval × (1 + jitter × u)`, u uniform in [0, 1).
    pub fn next_wait(&self) -> Duration {
        let mut b = [0u8; 8];
        // No randomness (never on Linux): no jitter.
        let u = if getrandom::fill(&mut b).is_ok() {
            (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
        } else {
            0.0
        };
        self.settings
            .poll_interval
            .mul_f64(1.0 + self.settings.jitter * u)
    }

    /// Polls until `stop` completes: the last good bundle from disk first, then the store,
    /// at once and after each jittered interval.
    pub async fn run(self, sink: Arc<dyn Sink>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        if let Err(e) = self.adopt_last_good(sink.as_ref()).await {
            tracing::error!(url = %self.settings.url, "the last good bundle on disk could not be applied: {}", log_escape(&e.to_string()));
        }
        loop {
            // Errors are counted, logged and shown by readiness; the next poll retries. A stop
            // does not wait for a poll in flight.
            tokio::select! {
                _ = &mut stop => break,
                _ = self.poll_once(sink.as_ref()) => {}
            }
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(self.next_wait()) => {}
            }
        }
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests;

/// Where and how to publish.
#[derive(Debug, Clone)]
pub struct PublishTarget {
    /// `s3://BUCKET/KEY`.
    pub url: String,
    /// The store.
    pub store: StoreSettings,
}

/// Checks `document` as a node will, signs it with `sign` (which returns the key id and a DER
/// ECDSA P-256 / SHA-256 signature of the bytes it is given, e.g. a receipts signer), writes
/// the envelope to `out` when given, and uploads it unless `target` is `None`. Returns the
/// payload digest and the new ETag.
pub async fn publish<F, Fut>(
    document: &BundleDocument,
    sign: F,
    target: Option<&PublishTarget>,
    out: Option<&Path>,
) -> Result<(String, Option<String>), BundleError>
where
    F: FnOnce(Vec<u8>) -> Fut,
    Fut: Future<Output = Result<(String, Vec<u8>), String>>,
{
    document.check()?;
    let payload = document.encode();
    let (key_id, signature) = sign(signed_message(&payload))
        .await
        .map_err(|e| BundleError::Key(format!("signing the bundle: {e}")))?;
    let object = seal(&payload, &key_id, &signature);
    if let Some(path) = out {
        std::fs::write(path, &object)
            .map_err(|e| BundleError::Local(format!("writing {}: {e}", path.display())))?;
    }
    let etag = match target {
        Some(t) => {
            let url = ObjectUrl::parse(&t.url).map_err(BundleError::Malformed)?;
            let store = ObjectStore::connect(&t.store).await?;
            store.put(&url, object).await?
        }
        None => None,
    };
    Ok((signed::fingerprint(&payload), etag))
}
