//! `knhk_bundle_*`.

use prometheus::{Gauge, IntCounterVec, Opts, Registry};

/// Poll results.
pub const POLL_RESULTS: [&str; 4] = ["fetched", "not_modified", "unavailable", "error"];

#[derive(Clone)]
pub(super) struct Metrics {
    polls: IntCounterVec,
    failures: IntCounterVec,
    last_applied: Gauge,
    last_success: Gauge,
}

impl Metrics {
    pub(super) fn new() -> Result<Metrics, prometheus::Error> {
        let polls = IntCounterVec::new(
            Opts::new(
                "knhk_bundle_polls_total",
                "Polls of the fleet bundle by result: fetched (200, a new object), not_modified (304, ETag unchanged), unavailable (the store could not be reached), error (the store refused or has no such object).",
            ),
            &["result"],
        )?;
        for r in POLL_RESULTS {
            polls.with_label_values(&[r]);
        }
        let failures = IntCounterVec::new(
            Opts::new(
                "knhk_bundle_failures_total",
                "Fleet bundle polls or bundles that changed nothing, by reason.",
            ),
            &["reason"],
        )?;
        for r in super::FAILURE_REASONS {
            failures.with_label_values(&[r]);
        }
        let last_applied = Gauge::new(
            "knhk_bundle_last_applied_timestamp_seconds",
            "When a fleet bundle was last applied (Unix time; 0: never since start).",
        )?;
        let last_success = Gauge::new(
            "knhk_bundle_last_poll_success_timestamp_seconds",
            "When the fleet bundle store last answered a poll (200 or 304; Unix time).",
        )?;
        Ok(Metrics {
            polls,
            failures,
            last_applied,
            last_success,
        })
    }

    pub(super) fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.polls.clone()))?;
        registry.register(Box::new(self.failures.clone()))?;
        registry.register(Box::new(self.last_applied.clone()))?;
        registry.register(Box::new(self.last_success.clone()))?;
        Ok(())
    }

    pub(super) fn poll(&self, result: &str) {
        self.polls.with_label_values(&[result]).inc();
        if result == "fetched" || result == "not_modified" {
            self.last_success.set(super::unix_now());
        }
    }

    pub(super) fn failure(&self, reason: &str) {
        self.failures.with_label_values(&[reason]).inc();
    }

    pub(super) fn applied(&self) {
        self.last_applied.set(super::unix_now());
    }
}
