//! Calls to remote services (a KMS, witnesses, S3): retry with exponential backoff and jitter
//! ([`backoff`], from `backon`) inside a circuit breaker ([`CircuitBreaker`]): after
//! `failure_threshold` consecutive failures the circuit opens and calls fail fast for
//! `open_for`; then one probe is let through (half-open); its success closes the circuit, its
//! failure opens it again.
//!
//! The breaker is ours (about 80 lines): the maintained breaker crates (`failsafe`) wrap the
//! call itself and bring their own backoff, while here the backoff is `backon`'s and the
//! breaker's state must be readable on its own for metrics and readiness.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Exponential backoff with jitter: `min` doubling to `max`, at most `times` retries.
pub fn backoff(min: Duration, max: Duration, times: usize) -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_max_times(times)
        .with_jitter()
}

/// A circuit's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls fail fast.
    Open,
    /// One probe goes through.
    HalfOpen,
}

impl CircuitState {
    /// Every state.
    pub const ALL: [CircuitState; 3] = [
        CircuitState::Closed,
        CircuitState::Open,
        CircuitState::HalfOpen,
    ];

    /// Lowercase name, for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: CircuitState,
    failures: u32,
    opened_at: Option<Instant>,
    probing: bool,
}

/// A circuit breaker. Thread-safe; cheap to check.
#[derive(Debug)]
pub struct CircuitBreaker {
    failure_threshold: u32,
    open_for: Duration,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    /// Opens after `failure_threshold` consecutive failures, for `open_for`.
    pub fn new(failure_threshold: u32, open_for: Duration) -> CircuitBreaker {
        CircuitBreaker {
            failure_threshold: failure_threshold.max(1),
            open_for,
            inner: Mutex::new(Inner {
                state: CircuitState::Closed,
                failures: 0,
                opened_at: None,
                probing: false,
            }),
        }
    }

    /// Whether a call may go now (`Err(wait)`: open, try again after `wait`). In half-open
    /// state only one caller gets through until it reports.
    pub fn allow(&self) -> Result<(), Duration> {
        let Ok(mut s) = self.inner.lock() else {
            return Ok(());
        };
        match s.state {
            CircuitState::Closed => Ok(()),
            CircuitState::Open => {
                let since = s.opened_at.map_or(self.open_for, |t| t.elapsed());
                if since >= self.open_for {
                    s.state = CircuitState::HalfOpen;
                    s.probing = true;
                    Ok(())
                } else {
                    Err(self.open_for - since)
                }
            }
            CircuitState::HalfOpen if !s.probing => {
                s.probing = true;
                Ok(())
            }
            CircuitState::HalfOpen => Err(Duration::from_millis(100)),
        }
    }

    /// Reports a successful call: the circuit closes.
    pub fn success(&self) {
        if let Ok(mut s) = self.inner.lock() {
            s.state = CircuitState::Closed;
            s.failures = 0;
            s.opened_at = None;
            s.probing = false;
        }
    }

    /// Reports a failed call: after the threshold (or any failed probe) the circuit opens.
    pub fn failure(&self) {
        if let Ok(mut s) = self.inner.lock() {
            s.failures = s.failures.saturating_add(1);
            s.probing = false;
            if s.state == CircuitState::HalfOpen || s.failures >= self.failure_threshold {
                s.state = CircuitState::Open;
                s.opened_at = Some(Instant::now());
            }
        }
    }

    /// The current state (an open circuit whose wait is over still reads `Open` until the next
    /// call probes).
    pub fn state(&self) -> CircuitState {
        self.inner.lock().map_or(CircuitState::Closed, |s| s.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_probes_and_closes() {
        let b = CircuitBreaker::new(3, Duration::from_millis(30));
        for _ in 0..2 {
            assert!(b.allow().is_ok());
            b.failure();
        }
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.allow().is_ok());
        b.failure();
        assert_eq!(b.state(), CircuitState::Open);
        assert!(b.allow().is_err(), "fails fast while open");
        std::thread::sleep(Duration::from_millis(35));
        assert!(b.allow().is_ok(), "one probe after the wait");
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.allow().is_err(), "only one probe at a time");
        b.failure();
        assert_eq!(b.state(), CircuitState::Open, "a failed probe reopens");
        std::thread::sleep(Duration::from_millis(35));
        assert!(b.allow().is_ok());
        b.success();
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.allow().is_ok());
    }
}
