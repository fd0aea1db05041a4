//! Workload identity: the agent's SPIFFE X.509-SVID and what the gRPC API does with it (mTLS,
//! SPIFFE-ID authorization per surface). See `docs/identity.md`.
//!
//! One task owns the identity ([`Identity::start`]). It builds a [`spiffe::X509Source`] on the
//! SPIRE Workload API — retrying with capped backoff while the Workload API does not answer, so a
//! missing SPIRE agent fails readiness, never the process — checks that the issued SPIFFE ID is
//! the expected one, and publishes an [`IdentityStatus`] on a `watch` channel. The server's TLS
//! config is rebuilt whole for each SVID revision and swapped in ([`tls::ServerTls`]); clients'
//! configs come from `spiffe-rustls` over the source ([`tls`]): a rotated SVID or bundle is used
//! by the next handshake, established connections stay, and the last valid SVID keeps serving while the
//! Workload API is down. Every second the task checks the SVID in use: older than
//! `max_svid_age_hours`, or within 10 % of its lifetime of expiry, fails readiness and raises
//! `knhk_identity_svid_rotation_overdue`, with a log line that says what to check.
//!
//! With `source = "files"` (migration only), [`files`] serves certificate, key and CA files as
//! a Workload API on a private socket, so both sources take the same path.

mod files;
pub mod tls;
pub mod workload_api;

use crate::{config::IdentitySettings, model::spiffe::Surface};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use spiffe::X509Source;
use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::sync::watch;

/// The SVID in use, as the tracker last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidInfo {
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Leaf certificate serial (hex).
    pub serial: String,
    /// Not before, seconds since the epoch.
    pub not_before: i64,
    /// Not after, seconds since the epoch.
    pub not_after: i64,
}

/// What the identity task last published.
#[derive(Debug, Clone, Default)]
pub struct IdentityStatus {
    /// The source, once the first SVID has arrived (kept through later failures).
    pub source: Option<X509Source>,
    /// The SVID in use.
    pub svid: Option<SvidInfo>,
    /// What is wrong, for readiness and logs; `None` when healthy.
    pub problem: Option<String>,
}

#[derive(Clone)]
struct Metrics {
    expiry: prometheus::GaugeVec,
    age: prometheus::GaugeVec,
    received: IntGauge,
    rotations: IntCounter,
    overdue: IntGauge,
    stream_up: IntGauge,
    stream_errors: IntCounterVec,
    denials: IntCounterVec,
}

impl Metrics {
    fn register(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        // No labels: the one series is absent until the first SVID (never NaN).
        let expiry = prometheus::GaugeVec::new(
            Opts::new(
                "knhk_identity_svid_expiry_seconds",
                "Seconds until the SVID in use expires (absent until the first SVID).",
            ),
            &[],
        )?;
        let age = prometheus::GaugeVec::new(
            Opts::new(
                "knhk_identity_svid_age_seconds",
                "Seconds since the SVID in use was issued, its not-before (absent until the first SVID).",
            ),
            &[],
        )?;
        let received = IntGauge::new(
            "knhk_identity_svid_received",
            "1 once the Workload API has delivered an SVID to this agent since it started; 0 while none ever was.",
        )?;
        let rotations = IntCounter::new(
            "knhk_identity_svid_rotations_total",
            "New SVIDs taken into use (a new leaf serial).",
        )?;
        let overdue = IntGauge::new(
            "knhk_identity_svid_rotation_overdue",
            "1 while the SVID in use is older than max_svid_age_hours, within 10% of expiry, or expired.",
        )?;
        let stream_up = IntGauge::new(
            "knhk_identity_workload_api_up",
            "1 while the Workload API stream delivers updates; 0 after a stream or connect error.",
        )?;
        let stream_errors = IntCounterVec::new(
            Opts::new(
                "knhk_identity_workload_api_errors_total",
                "Workload API errors by kind (client_creation, stream_connect, stream_error, stream_ended, ...).",
            ),
            &["kind"],
        )?;
        let denials = IntCounterVec::new(
            Opts::new(
                "knhk_identity_authorization_denials_total",
                "gRPC calls refused by SPIFFE-ID authorization, by surface.",
            ),
            &["surface"],
        )?;
        for s in Surface::ALL {
            denials.with_label_values(&[s.as_str()]);
        }
        registry.register(Box::new(expiry.clone()))?;
        registry.register(Box::new(age.clone()))?;
        registry.register(Box::new(received.clone()))?;
        registry.register(Box::new(rotations.clone()))?;
        registry.register(Box::new(overdue.clone()))?;
        registry.register(Box::new(stream_up.clone()))?;
        registry.register(Box::new(stream_errors.clone()))?;
        registry.register(Box::new(denials.clone()))?;
        Ok(Metrics {
            expiry,
            age,
            received,
            rotations,
            overdue,
            stream_up,
            stream_errors,
            denials,
        })
    }
}

impl spiffe::x509_source::MetricsRecorder for Metrics {
    fn record_update(&self) {
        self.stream_up.set(1);
    }

    fn record_reconnect(&self) {}

    fn record_error(&self, kind: spiffe::x509_source::MetricsErrorKind) {
        use spiffe::x509_source::MetricsErrorKind as K;
        self.stream_errors.with_label_values(&[kind.as_str()]).inc();
        if matches!(
            kind,
            K::ClientCreation | K::StreamConnect | K::StreamError | K::StreamEnded
        ) {
            self.stream_up.set(0);
        }
    }
}

/// The agent's identity: a handle on the task that keeps it.
pub struct Identity {
    settings: Arc<IdentitySettings>,
    status: watch::Receiver<IdentityStatus>,
    metrics: Metrics,
    task: tokio::task::JoinHandle<()>,
    _files: Option<files::FileWorkloadApi>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("trust_domain", &self.settings.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why the identity could not start (only local, operator-fixable causes: a missing Workload
/// API is not one).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file source could not start.
    #[error("spiffe (source = \"files\"): {0}")]
    Files(String),
    /// Metrics could not be registered.
    #[error("registering identity metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl Identity {
    /// Starts the identity task. Returns at once; the first SVID arrives on
    /// [`Identity::status`].
    pub async fn start(
        settings: IdentitySettings,
        state_dir: &std::path::Path,
        registry: &Registry,
    ) -> Result<Identity, IdentityError> {
        let metrics = Metrics::register(registry)?;
        let (file_server, endpoint) = match &settings.files {
            Some(paths) => {
                tracing::warn!(
                    cert = %paths.cert.display(),
                    "SPIFFE identity from files: this mode is for migration only; \
                     certificates are not rotated by SPIRE, only reloaded when the files change"
                );
                let server =
                    files::FileWorkloadApi::start(paths.clone(), &settings.trust_domain, state_dir)
                        .await
                        .map_err(IdentityError::Files)?;
                let endpoint = format!("unix:{}", server.socket().display());
                (Some(server), endpoint)
            }
            None => (None, settings.endpoint()),
        };
        let settings = Arc::new(settings);
        let (tx, rx) = watch::channel(IdentityStatus {
            problem: Some(format!(
                "waiting for the first SVID from the Workload API at {endpoint}"
            )),
            ..Default::default()
        });
        let task = tokio::spawn(keep(settings.clone(), endpoint, tx, metrics.clone()));
        Ok(Identity {
            settings,
            status: rx,
            metrics,
            task,
            _files: file_server,
        })
    }

    /// The settings.
    pub fn settings(&self) -> &IdentitySettings {
        &self.settings
    }

    /// The latest status.
    pub fn status(&self) -> IdentityStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn watch(&self) -> watch::Receiver<IdentityStatus> {
        self.status.clone()
    }

    /// Waits for the first SVID (then returns the source at once on every call).
    pub async fn source(&self) -> Option<X509Source> {
        let mut rx = self.status.clone();
        // The identity task gone (shutdown) means no source.
        rx.wait_for(|s| s.source.is_some())
            .await
            .ok()
            .and_then(|s| s.source.clone())
    }

    /// Counts a call refused by authorization.
    pub fn count_denial(&self, surface: Surface) {
        self.metrics
            .denials
            .with_label_values(&[surface.as_str()])
            .inc();
    }

    /// A readiness check: the identity problem, if any.
    pub fn readiness_check(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let rx = self.status.clone();
        move || match &rx.borrow().problem {
            None => Ok(()),
            Some(p) => Err(p.clone()),
        }
    }
}

/// The identity task: build the source (retrying), then track it.
async fn keep(
    settings: Arc<IdentitySettings>,
    endpoint: String,
    tx: watch::Sender<IdentityStatus>,
    metrics: Metrics,
) {
    let mut backoff = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let source = loop {
        let built = X509Source::builder()
            .endpoint(&endpoint)
            .reconnect_backoff(Duration::from_millis(200), Duration::from_secs(10))
            .initial_sync_timeout(settings.initial_sync_timeout)
            .metrics(Arc::new(metrics.clone()))
            .build()
            .await;
        match built {
            Ok(source) => break source,
            Err(e) => {
                let problem = format!(
                    "no SVID from the Workload API at {endpoint} after {} s: {e}; retrying in {} s \
                     (is the SPIRE agent running, and is there a registration entry for this agent?)",
                    started.elapsed().as_secs(),
                    backoff.as_secs()
                );
                tracing::error!("{problem}");
                tx.send_modify(|s| s.problem = Some(problem));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(8));
            }
        }
    };
    metrics.stream_up.set(1);
    let mut updates = source.updated();
    let mut last_serial = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // No SVID yet is reported by the readiness check below, not as an error here.
        let info = source.svid().ok().map(|svid| svid_info(&svid));
        if let Some(info) = &info {
            if last_serial.as_ref() != Some(&info.serial) {
                if last_serial.is_some() {
                    metrics.rotations.inc();
                    tracing::info!(spiffe_id = %info.spiffe_id, serial = %info.serial, not_after = info.not_after, "new SVID in use");
                } else {
                    tracing::info!(spiffe_id = %info.spiffe_id, serial = %info.serial, not_after = info.not_after, "SVID received");
                }
                last_serial = Some(info.serial.clone());
            }
        }
        let problem = judge(&settings, info.as_ref(), &endpoint, &metrics);
        let changed = tx.borrow().problem != problem;
        if changed {
            match &problem {
                Some(p) => tracing::error!("workload identity: {p}"),
                None => tracing::info!("workload identity healthy"),
            }
        }
        tx.send_modify(|s| {
            s.source = Some(source.clone());
            s.svid = info;
            s.problem = problem;
        });
        tokio::select! {
            r = updates.changed() => {
                if r.is_err() {
                    // The source closed (shutdown): keep judging the last SVID until expiry.
                    tick.tick().await;
                }
            }
            _ = tick.tick() => {}
        }
    }
}

/// What is wrong with the SVID in use, if anything; updates the SVID gauges.
fn judge(
    settings: &IdentitySettings,
    info: Option<&SvidInfo>,
    endpoint: &str,
    metrics: &Metrics,
) -> Option<String> {
    let Some(info) = info else {
        metrics.overdue.set(1);
        return Some(format!(
            "the Workload API at {endpoint} withdrew this agent's SVID: check its registration entry"
        ));
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let left = info.not_after - now;
    let age = now - info.not_before;
    let lifetime = (info.not_after - info.not_before).max(1);
    metrics.received.set(1);
    metrics
        .expiry
        .with_label_values::<&str>(&[])
        .set(left as f64);
    metrics.age.with_label_values::<&str>(&[]).set(age as f64);
    let max_age = settings.max_svid_age.as_secs() as i64;
    let problem = if let Some(expected) = &settings.expected_id {
        (expected.to_string() != info.spiffe_id).then(|| {
            format!(
                "the Workload API issued {} but spiffe.spiffe_id expects {expected}: \
                 fix the registration entry or the configuration (the gRPC API presents the issued ID meanwhile)",
                info.spiffe_id
            )
        })
    } else {
        None
    };
    let rotation = if left <= 0 {
        Some(format!(
            "the SVID (serial {}) expired {} s ago and no new one arrived from {endpoint}: \
             peers refuse it; check the SPIRE agent",
            info.serial, -left
        ))
    } else if age > max_age {
        Some(format!(
            "the SVID in use (serial {}) was issued {} h ago, more than max_svid_age_hours = {}: \
             SPIRE has not rotated it; check the SPIRE agent and that the registration entry's X.509-SVID TTL is at most {} h",
            info.serial,
            age / 3600,
            max_age / 3600,
            max_age / 3600
        ))
    } else if left * 10 < lifetime {
        Some(format!(
            "the SVID (serial {}) expires in {left} s and no replacement has arrived from {endpoint}: \
             check the SPIRE agent (the current SVID keeps serving until it expires)",
            info.serial
        ))
    } else {
        None
    };
    metrics.overdue.set(i64::from(rotation.is_some()));
    match (problem, rotation) {
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        (a, b) => a.or(b),
    }
}

/// The tracked facts of an SVID.
fn svid_info(svid: &spiffe::X509Svid) -> SvidInfo {
    use x509_parser::prelude::FromDer;
    let leaf = svid.leaf().as_bytes();
    let (serial, not_before, not_after) =
        match x509_parser::certificate::X509Certificate::from_der(leaf) {
            Ok((_, cert)) => (
                cert.raw_serial_as_string(),
                cert.validity().not_before.timestamp(),
                cert.validity().not_after.timestamp(),
            ),
            Err(_) => (String::from("?"), 0, 0),
        };
    SvidInfo {
        spiffe_id: svid.spiffe_id().to_string(),
        serial,
        not_before,
        not_after,
    }
}

#[cfg(test)]
mod tests;
