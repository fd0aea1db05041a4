//! Metrics and the admin HTTP server (`/metrics`, `/healthz`, `/readyz`).
//!
//! Kernel-side numbers are read from the BPF maps by [`DatapathCollector`] at scrape time, so
//! they are never stale and nothing copies them in between. The server runs on its own thread and
//! single-threaded runtime, so a slow scrape never delays the agent's own work.

mod metrics;
#[cfg(feature = "otlp")]
mod otlp;
mod process;
mod server;
mod signals;

pub use metrics::{bucket_edges_ns, DatapathCollector, BUCKETS_PER_OCTAVE, MAX_BUCKET_RATIO};
#[cfg(feature = "otlp")]
pub use otlp::{Otlp, OtlpError, ResourceInfo};
pub use process::ProcessCollector;
pub use server::{
    AdminLimits, AdminServer, Readiness, ADMIN_HEADER_READ_TIMEOUT, ADMIN_MAX_CONNECTIONS,
};
pub use signals::{register_build_info, ReadinessCollector};
