//! The capacity model: from (admission rate, handshake p99) samples taken each beat, predict the
//! rate at which a class's p99 reaches its SLO ceiling, and the headroom to it.
//!
//! # Model
//! A single FIFO server (a link, a SYN or accept queue) with service rate `μ`, in front of a
//! fixed base latency `d`, under Kingman's heavy-traffic approximation for a G/G/1 queue: the
//! waiting time is about exponential with mean `k · ρ / (μ − λ)`, where `ρ = λ / μ` and
//! `k = (c_a² + c_s²) / 2` is the variability of arrivals and service (1 for Poisson arrivals and
//! exponential service, M/M/1; ½ for deterministic service, M/D/1). So
//!
//! ```text
//! p99(λ) = d + ln(100) · k · λ / (μ · (μ − λ))        for λ < μ
//! ```
//!
//! For a given `μ` this is linear in `d` and `k`, so the fit searches `μ` (above the highest
//! observed rate) and solves `d` and `k` by least squares at each candidate. The predicted knee
//! for a ceiling `S > d` solves `p99(λ*) = S`: with `b = (S − d) / (ln(100) · k)`,
//! `λ* = b · μ² / (1 + b · μ)`; the headroom is `λ* / λ_now`. M/M/1 is the special case `k = 1`
//! (its sojourn p99 `ln(100) / (μ − λ)` is exactly this form with `d` raised by `ln(100) / μ`).
//!
//! # Why not the Universal Scalability Law
//! USL relates throughput to *concurrency*; what the kernel observes per class is an arrival rate
//! and a latency quantile. Handshakes queue at one place at a time, which is what a single-server
//! queue describes, with parameters that a few beats can pin down; USL needs a concurrency series
//! we would have to derive through Little's law. A plain M/M/1 fit (two parameters) was tried
//! first: on a real rate-limited link (deterministic service, flat latency until close to
//! saturation) it placed the knee 27 % too high, because M/M/1 insists on queueing at low load
//! that such a link does not have; the variability term `k` fixes that.
//!
//! # When it is wrong
//! Bursty (non-Poisson, correlated) arrivals make real p99 grow faster than a fit from calm beats
//! predicts (the knee comes earlier); a bottleneck that drops instead of queueing (a full accept
//! queue: SYNs retransmitted after 1 s) is a step, not a curve, and shows no queueing before the
//! cliff; a multi-server bottleneck queues later and more sharply. Without samples that show
//! queueing the model says nothing (`None`) rather than guess.

/// ln(100): the p99 of an exponential distribution is ln(100) times its mean.
const LN_100: f64 = 4.605_170_185_988_092;

/// A fitted model of one class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    /// Service rate μ, connects per second.
    pub service_rate: f64,
    /// Base latency d (the p99 at zero load), seconds.
    pub base_latency: f64,
    /// Variability k = (c_a² + c_s²) / 2 (1: M/M/1; ½: deterministic service).
    pub variability: f64,
    /// Samples used.
    pub samples: usize,
}

impl Fit {
    /// p99 latency (seconds) the model predicts at `rate`; `None` at or past saturation.
    pub fn p99_at(&self, rate: f64) -> Option<f64> {
        let mu = self.service_rate;
        (rate < mu)
            .then(|| self.base_latency + LN_100 * self.variability * rate / (mu * (mu - rate)))
    }

    /// The rate (connects per second) at which p99 reaches `ceiling` seconds; `None` when the
    /// ceiling is below the base latency (never met).
    pub fn knee(&self, ceiling: f64) -> Option<f64> {
        if ceiling <= self.base_latency {
            return None;
        }
        let mu = self.service_rate;
        let b = (ceiling - self.base_latency) / (LN_100 * self.variability);
        Some(b * mu * mu / (1.0 + b * mu))
    }
}

/// The largest service rate a fit may report, as a multiple of the highest sampled rate: past
/// it, the samples' latency grows along a straight line (`λ / (μ(μ − λ))` is nearly linear in
/// `λ` for `μ ≫ λ`), which shows no queue. (On a real rate-limited link, a fit from samples that
/// did show queueing found μ at 1.1–4.4 times the highest rate; noise-only samples ran to the
/// search's end, 1,000 times.)
pub const MAX_SERVICE_RATE_RATIO: f64 = 100.0;

/// Fits the model to `(rate per second, p99 seconds)` samples by least squares: for each
/// candidate μ above the highest rate (a log-spaced search, then a finer one around the best),
/// `d ≥ 0` and `k > 0` are solved linearly. `None` without at least three samples at different
/// rates whose p99 varies by more than 10 % (no visible queueing, nothing to fit), and when the
/// best μ is over [`MAX_SERVICE_RATE_RATIO`] times the highest rate: latency that grows along a
/// straight line (noise, or a trend without curvature) shows no queue, and its knee would be a
/// guess.
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
    // For a given μ: p99 = d + a·x with x = λ / (μ(μ − λ)), a = ln(100)·k. Returns
    // (squared error, d, a), or None when the best line has no positive slope.
    let solve = |mu: f64| -> Option<(f64, f64, f64)> {
        let n = samples.len() as f64;
        let xs: Vec<f64> = samples.iter().map(|(r, _)| r / (mu * (mu - r))).collect();
        let mean_x = xs.iter().sum::<f64>() / n;
        let mean_y = samples.iter().map(|(_, p)| p).sum::<f64>() / n;
        let sxx: f64 = xs.iter().map(|x| (x - mean_x).powi(2)).sum();
        let sxy: f64 = xs
            .iter()
            .zip(&samples)
            .map(|(x, (_, p))| (x - mean_x) * (p - mean_y))
            .sum();
        if sxx <= 0.0 {
            return None;
        }
        let (mut a, mut d) = (sxy / sxx, mean_y - sxy / sxx * mean_x);
        if d < 0.0 {
            // Through the origin instead.
            d = 0.0;
            let xx: f64 = xs.iter().map(|x| x * x).sum();
            a = xs
                .iter()
                .zip(&samples)
                .map(|(x, (_, p))| x * p)
                .sum::<f64>()
                / xx;
        }
        if !a.is_finite() || a <= 0.0 {
            return None;
        }
        let err = xs
            .iter()
            .zip(&samples)
            .map(|(x, (_, p))| (p - d - a * x).powi(2))
            .sum();
        Some((err, d, a))
    };
    let floor = max_rate.max(1e-6);
    let search = |from: f64, to: f64, steps: usize| -> Option<f64> {
        (0..=steps)
            .map(|i| from * (to / from).powf(i as f64 / steps as f64))
            .filter_map(|mu| solve(mu).map(|(err, _, _)| (err, mu)))
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, mu)| mu)
    };
    let coarse = search(floor * 1.0001, floor * 1000.0, 400)?;
    let mu = search((coarse / 1.02).max(floor * 1.0001), coarse * 1.02, 200)?;
    if mu > MAX_SERVICE_RATE_RATIO * floor {
        return None;
    }
    let (_, d, a) = solve(mu)?;
    Some(Fit {
        service_rate: mu,
        base_latency: d,
        variability: a / LN_100,
        samples: samples.len(),
    })
}

/// Headroom: predicted knee rate over the current rate (`None` when either is unknown or the
/// current rate is zero).
pub fn headroom(fit: Option<&Fit>, ceiling: f64, current_rate: f64) -> Option<f64> {
    let knee = fit?.knee(ceiling)?;
    (current_rate > 0.0).then(|| knee / current_rate)
}

/// A class's admission budget for one beat: the configured static budget if there is one; else,
/// with `capacity_budgets`, the connects the model's knee admits in one beat (at least 1, so a
/// class is throttled, never shut off, by its own model); else no budget.
pub fn budget_per_beat(
    static_budget: Option<u64>,
    capacity_budgets: bool,
    knee_per_second: Option<f64>,
    beat: std::time::Duration,
) -> Option<u64> {
    if static_budget.is_some() || !capacity_budgets {
        return static_budget;
    }
    let knee = knee_per_second.filter(|k| k.is_finite() && *k > 0.0)?;
    Some(((knee * beat.as_secs_f64()).floor() as u64).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_come_from_the_knee_only_where_asked_and_not_configured() {
        use std::time::Duration;
        let beat = Duration::from_millis(100);
        assert_eq!(budget_per_beat(None, true, Some(1000.0), beat), Some(100));
        assert_eq!(budget_per_beat(Some(7), true, Some(1000.0), beat), Some(7));
        assert_eq!(budget_per_beat(None, false, Some(1000.0), beat), None);
        assert_eq!(budget_per_beat(None, true, None, beat), None);
        assert_eq!(budget_per_beat(None, true, Some(f64::NAN), beat), None);
        assert_eq!(budget_per_beat(None, true, Some(2.0), beat), Some(1));
    }

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
        // M/M/1 is the k = 1 case, with the zero-load p99 as base latency.
        assert!((f.base_latency - mm1(mu, d, 0.0)).abs() < 1e-4, "{f:?}");
        assert!((f.variability - 1.0).abs() < 0.02, "{f:?}");
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
    fn recovers_deterministic_service_variability() {
        // Kingman's form with k = ½ (M/D/1), no base latency.
        let (mu, k) = (600.0, 0.5);
        let p99 = |r: f64| LN_100 * k * r / (mu * (mu - r));
        let samples: Vec<(f64, f64)> = [100.0, 200.0, 300.0, 400.0, 500.0, 550.0]
            .iter()
            .map(|r| (*r, p99(*r)))
            .collect();
        let f = fit(&samples).expect("fit");
        assert!((f.service_rate - mu).abs() / mu < 0.01, "{f:?}");
        assert!((f.variability - k).abs() < 0.02, "{f:?}");
        let knee = f.knee(0.010).expect("knee");
        assert!((f.p99_at(knee).expect("below saturation") - 0.010).abs() < 1e-9);
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
        // Latency rising along a straight line (as noise did in a real ramp: 0.41, 0.44, 0.81,
        // 0.78 ms at 142-432/s, whose fit ran to μ = 440,130/s and a knee 4.5 times too high).
        let line: Vec<(f64, f64)> = [100.0, 200.0, 300.0, 400.0]
            .iter()
            .map(|r| (*r, 0.0002 + 0.000001 * r))
            .collect();
        assert_eq!(fit(&line), None, "a straight line shows no queue");
    }
}
