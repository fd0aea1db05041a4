//! Typed settings of the optional sections, built once while a configuration is loaded. The
//! subsystems take these and never read the raw sections: what `check-config` accepted is
//! exactly what `run` starts with.

mod beat;
mod identity;
mod receipts;
mod sync;

pub use beat::BeatSettings;
pub use identity::{FilePaths, IdentitySettings, DEFAULT_SOCKET};
pub use receipts::{check_receipts, ReceiptSettings, SignerSettings};
pub use sync::{valid_region, Peer, SyncSettings};

/// What the agent runs with, section by section; `None` where a subsystem is off.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// SLO admission (`[slo]`).
    pub beat: Option<BeatSettings>,
    /// Workload identity and mTLS (`[spiffe]` with `enabled = true`).
    pub identity: Option<IdentitySettings>,
    /// The receipts ledger (`[kms]`, with `[receipts]`).
    pub receipts: Option<ReceiptSettings>,
    /// Region sync (`[multi_region]` with `cross_region_sync_enabled = true`).
    pub sync: Option<SyncSettings>,
}
