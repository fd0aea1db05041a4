//! The capacity model: from (admission rate, handshake p99) samples taken each beat, predict the
//! rate at which a class's p99 reaches its SLO ceiling, and the headroom to it.
//!
//! # Model
//! A single FIFO server with Poisson arrivals and exponential service (M/M/1) in front of a fixed
//! base latency `d` (the network path): the sojourn time is exponential with rate `μ − λ`, so
//!
//! ```text
//! p99(λ) = d + ln(100) / (μ − λ)          for λ < μ
//! ```
//!
//! `μ` and `d` are fitted by least squares over the samples. The predicted knee for a ceiling
//! `S > d` is `λ* = μ − ln(100) / (S − d)`, and the headroom is `λ* / λ_now`.
//!
//! # Why not the Universal Scalability Law
//! USL relates throughput to *concurrency*; what the kernel observes per class is an arrival rate
//! and a latency quantile. Handshakes queue at one place at a time (a link, a SYN or accept
//! queue), which is what M/M/1 describes, with two parameters that a few beats can pin down; USL
//! needs three and a concurrency series we would have to derive through Little's law.
//!
//! # When it is wrong
//! Bursty (non-Poisson) arrivals and heavy-tailed service make real p99 grow faster than predicted
//! (the knee comes earlier); a bottleneck that drops instead of queueing (a full accept queue:
//! SYNs retransmitted after 1 s) is a step, not a curve, and shows no queueing before the cliff; a
//! multi-server bottleneck queues later and more sharply. Without samples that show queueing the
//! model says nothing (`None`) rather than guess.

/// ln(100): the p99 of an exponential distribution is ln(100) / rate.
const LN_100: f64 = 4.605_170_185_988_092;

/// A fitted model of one class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    /// Service rate μ, connects per second.
    pub service_rate: f64,
    /// Base latency d, seconds.
    pub base_latency: f64,
    /// Samples used.
    pub samples: usize,
}

impl Fit {
    /// p99 latency (seconds) the model predicts at `rate`; `None` at or past saturation.
    pub fn p99_at(&self, rate: f64) -> Option<f64> {
        (rate < self.service_rate).then(|| self.base_latency + LN_100 / (self.service_rate - rate))
    }

    /// The rate (connects per second) at which p99 reaches `ceiling` seconds; `None` when the
    /// ceiling is below the base latency (never met).
    pub fn knee(&self, ceiling: f64) -> Option<f64> {
        (ceiling > self.base_latency)
            .then(|| (self.service_rate - LN_100 / (ceiling - self.base_latency)).max(0.0))
    }
}

/// Fits the model to `(rate per second, p99 seconds)` samples by least squares: for each
/// candidate μ above the highest rate (a log-spaced search, then a finer one around the best),
/// the best `d` is the mean residual, clamped at 0. `None` without at least three samples at
/// different rates whose p99 varies by more than 10 % (no visible queueing, nothing to fit).
pub fn fit(samples: &[(f64, f64)]) -> Option<Fit> {
    let samples: Vec<(f64, f64)> = samples
        .iter()
        .copied()
        .filter(|(r, p)| r.is_finite() && *r >= 0.0 && p.is_finite() && *p > 0.0)
        .collect();
    let max_rate = samples.iter().map(|(r, _)| *r).fold(0.0, f64::max);
    let (lo_p, hi_p) = samples
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), (_, p)| {
            (lo.min(*p), hi.max(*p))
        });
    let distinct_rates = {
        let mut r: Vec<f64> = samples.iter().map(|(r, _)| *r).collect();
        r.sort_by(f64::total_cmp);
        r.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
        r.len()
    };
    if distinct_rates < 3 || hi_p <= lo_p * 1.1 {
        return None;
    }
    let cost = |mu: f64| -> (f64, f64) {
        let n = samples.len() as f64;
        let d = (samples
            .iter()
            .map(|(r, p)| p - LN_100 / (mu - r))
            .sum::<f64>()
            / n)
            .max(0.0);
        let err = samples
            .iter()
            .map(|(r, p)| (p - d - LN_100 / (mu - r)).powi(2))
            .sum::<f64>();
        (err, d)
    };
    let floor = max_rate.max(1e-6);
    let search = |from: f64, to: f64, steps: usize| -> f64 {
        (0..=steps)
            .map(|i| from * (to / from).powf(i as f64 / steps as f64))
            .map(|mu| (cost(mu).0, mu))
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, mu)| mu)
            .unwrap_or(from)
    };
    let coarse = search(floor * 1.0001, floor * 1000.0, 400);
    let mu = search((coarse / 1.02).max(floor * 1.0001), coarse * 1.02, 200);
    let (_, d) = cost(mu);
    Some(Fit {
        service_rate: mu,
        base_latency: d,
        samples: samples.len(),
    })
}

/// Headroom: predicted knee rate over the current rate (`None` when either is unknown or the
/// current rate is zero).
pub fn headroom(fit: Option<&Fit>, ceiling: f64, current_rate: f64) -> Option<f64> {
    let knee = fit?.knee(ceiling)?;
    (current_rate > 0.0).then(|| knee / current_rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mm1(mu: f64, d: f64, rate: f64) -> f64 {
        d + LN_100 / (mu - rate)
    }

    #[test]
    fn recovers_an_mm1_queue_and_its_knee() {
        let (mu, d) = (1000.0, 0.001);
        let samples: Vec<(f64, f64)> = [0.0, 100.0, 300.0, 500.0, 700.0, 900.0]
            .iter()
            .map(|r| (*r, mm1(mu, d, *r)))
            .collect();
        let f = fit(&samples).expect("fit");
        assert!((f.service_rate - mu).abs() / mu < 0.01, "{f:?}");
        assert!((f.base_latency - d).abs() < 1e-4, "{f:?}");
        let knee = f.knee(0.010).expect("knee");
        let exact = mu - LN_100 / (0.010 - d);
        assert!(
            (knee - exact).abs() / exact < 0.02,
            "knee {knee} vs {exact}"
        );
        assert!(f.p99_at(2000.0).is_none(), "past saturation");
        assert!(
            f.knee(0.0001).is_none(),
            "a ceiling below the base latency is never met"
        );
    }

    #[test]
    fn noisy_samples_still_place_the_knee_within_a_quarter() {
        let (mu, d) = (500.0, 0.0005);
        // Deterministic ±8 % noise.
        let noise = [1.08, 0.93, 1.05, 0.96, 1.02, 0.92, 1.07, 0.98];
        let samples: Vec<(f64, f64)> = (0..8)
            .map(|i| {
                let r = 40.0 + 55.0 * i as f64;
                (r, mm1(mu, d, r) * noise[i])
            })
            .collect();
        let f = fit(&samples).expect("fit");
        let knee = f.knee(0.02).expect("knee");
        let exact = mu - LN_100 / (0.02 - d);
        assert!(
            (knee - exact).abs() / exact < 0.25,
            "knee {knee} vs {exact} ({f:?})"
        );
        let h = headroom(Some(&f), 0.02, 100.0).expect("headroom");
        assert!((h - knee / 100.0).abs() < 1e-9);
    }

    #[test]
    fn no_queueing_no_prediction() {
        assert_eq!(fit(&[]), None);
        assert_eq!(
            fit(&[(10.0, 0.001), (20.0, 0.00101), (30.0, 0.001)]),
            None,
            "flat latency says nothing"
        );
        assert_eq!(headroom(None, 0.01, 5.0), None);
    }
}
