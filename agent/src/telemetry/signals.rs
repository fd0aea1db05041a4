//! Metrics about the agent itself: its build (`knhk_build_info`) and its readiness checks
//! (`knhk_ready`, `knhk_readiness_check`), evaluated at scrape time exactly as `/readyz` does.

use super::server::Readiness;
use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
    IntGaugeVec, Opts, Registry,
};
use std::sync::Arc;

/// Registers `knhk_build_info{version, abi_version} 1`.
pub fn register_build_info(registry: &Registry) -> prometheus::Result<()> {
    let info = IntGaugeVec::new(
        Opts::new(
            "knhk_build_info",
            "1, labelled with the agent's version and the kernel map ABI version it speaks.",
        ),
        &["version", "abi_version"],
    )?;
    info.with_label_values(&[
        env!("CARGO_PKG_VERSION"),
        &knhk_abi::ABI_VERSION.to_string(),
    ])
    .set(1);
    registry.register(Box::new(info))
}

/// `knhk_ready` (0/1: every check passes, as `/readyz` answers 200) and
/// `knhk_readiness_check{check}` (0/1 per registered check).
pub struct ReadinessCollector {
    readiness: Arc<Readiness>,
    descs: Vec<Desc>,
}

impl std::fmt::Debug for ReadinessCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadinessCollector").finish_non_exhaustive()
    }
}

const READY: (&str, &str) = (
    "knhk_ready",
    "1 while every readiness check passes (/readyz answers 200), else 0.",
);
const CHECK: (&str, &str) = (
    "knhk_readiness_check",
    "1 while the named readiness check passes, else 0 (one series per check the agent runs).",
);

impl ReadinessCollector {
    /// Exports the checks of `readiness`.
    pub fn new(readiness: Arc<Readiness>) -> Self {
        let descs = [READY, CHECK]
            .iter()
            .filter_map(|(n, h)| {
                // Static names and help: valid; a bad one would only drop that family.
                Desc::new((*n).into(), (*h).into(), vec![], Default::default()).ok()
            })
            .collect();
        ReadinessCollector { readiness, descs }
    }
}

fn gauge_family(
    (name, help): (&str, &str),
    series: impl IntoIterator<Item = (Option<(&'static str, String)>, f64)>,
) -> MetricFamily {
    let metrics = series
        .into_iter()
        .map(|(label, value)| {
            let mut m = proto::Metric::default();
            if let Some((k, v)) = label {
                let mut l = proto::LabelPair::default();
                l.set_name(k.into());
                l.set_value(v);
                m.set_label(vec![l]);
            }
            let mut g = proto::Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
            m
        })
        .collect();
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(MetricType::GAUGE);
    f.set_metric(metrics);
    f
}

impl Collector for ReadinessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let results = self.readiness.results();
        // No checks yet means not ready, as /readyz says.
        let ready = !results.is_empty() && results.iter().all(|(_, ok)| *ok);
        vec![
            gauge_family(READY, [(None, f64::from(u8::from(ready)))]),
            gauge_family(
                CHECK,
                results
                    .into_iter()
                    .map(|(name, ok)| (Some(("check", name)), f64::from(u8::from(ok)))),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_is_exported_per_check() {
        let readiness = Arc::new(Readiness::default());
        let c = ReadinessCollector::new(readiness.clone());
        let value = |f: &MetricFamily, i: usize| f.get_metric()[i].get_gauge().get_value();
        let fams = c.collect();
        assert_eq!(value(&fams[0], 0), 0.0, "no checks: not ready");
        assert!(fams[1].get_metric().is_empty());
        readiness.register("a", || Ok(()));
        readiness.register("b", || Err("down".into()));
        let fams = c.collect();
        assert_eq!(value(&fams[0], 0), 0.0);
        assert_eq!(value(&fams[1], 0), 1.0);
        assert_eq!(value(&fams[1], 1), 0.0);
        assert_eq!(fams[1].get_metric()[1].get_label()[0].value(), "b");
    }
}
