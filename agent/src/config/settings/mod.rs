//! Typed settings of the optional sections, built once while a configuration is loaded. The
//! subsystems take these and never read the raw sections: what `check-config` accepted is
//! exactly what `run` starts with.

mod archive;
mod beat;
mod bundle;
mod identity;
mod promotion;
mod receipts;
mod sync;
mod telemetry;

pub use archive::{parse_archive_url, ArchiveSection, ArchiveSettings};
pub use beat::BeatSettings;
pub use bundle::{BundleKey, BundleSection, BundleSettings};
pub use identity::{FilePaths, IdentitySettings, DEFAULT_SOCKET};
pub use promotion::{PromotionSettings, DEFAULT_STEPS};
pub use receipts::{check_receipts, ReceiptSettings, SignerSettings};
pub use sync::{valid_region, Peer, SyncSettings};
pub use telemetry::{
    LiveCheck, TelemetrySection, TelemetrySettings, DEFAULT_EXPORT_INTERVAL,
    DEFAULT_MAX_QUEUED_SPANS, DEFAULT_OTLP_TIMEOUT, WEAVER_LIVE_CHECK_ENDPOINT,
};

/// What the agent runs with, section by section; `None` where a subsystem is off.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// SLO admission (`[slo]`).
    pub beat: Option<BeatSettings>,
    /// Workload identity and mTLS (`[spiffe]` with `enabled = true`).
    pub identity: Option<IdentitySettings>,
    /// The receipts ledger (`[kms]`, with `[receipts]`).
    pub receipts: Option<ReceiptSettings>,
    /// Witnessing (`[multi_region]` with `cross_region_sync_enabled = true`).
    pub sync: Option<SyncSettings>,
    /// OTLP export of metrics and traces (`[telemetry]` with an endpoint or `weaver_live_check`).
    pub telemetry: Option<TelemetrySettings>,
    /// The node's ring, feature flags and rollout defaults (`[promotion]`, or its defaults).
    pub promotion: PromotionSettings,
    /// The fleet bundle this node follows (`[bundle]`).
    pub bundle: Option<BundleSettings>,
    /// The receipts archive on S3 with Object Lock (`[archive]`).
    pub archive: Option<ArchiveSettings>,
}
