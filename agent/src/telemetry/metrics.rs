//! The scrape-time collector of kernel counters.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `knhk_connect_decisions_total` | counter | `action` (allow, deny, audit, shed, park), `class` (R1, W1, C1) |
//! | `knhk_rule_hits_total` | counter | `rule`: the `agent.rule_metrics_top_n` rules with the most hits (none for rules without hits) |
//! | `knhk_pod_rule_hits_total` | counter | `namespace`, `pod`, `rule`, `action`: a selector rule's hits in each pod it selects (none for pods without hits) |
//! | `knhk_pod_rule_counters` | gauge | `state` (attributed, unattributed): expansions of selector rules with and without a counter of their own |
//! | `knhk_unmatched_connects_total` | counter | — |
//! | `knhk_tcp_handshake_duration_seconds` | histogram | `class` |
//! | `knhk_tcp_rtt_seconds` | histogram | `class` |
//! | `knhk_heat_top_connect_attempts` | gauge | `destination`, `protocol`: the `agent.heat_top_n` destinations with the most attempts |
//! | `knhk_bpf_map_entries` / `knhk_bpf_map_capacity_entries` | gauge | `map` (heat, policy) |
//! | `knhk_policy_generation` | gauge | — |
//! | `knhk_policy_rules` | gauge | — |
//! | `knhk_policy_scopes` | gauge | `state` (active, pending) |
//! | `knhk_verdict_events_total` | counter | `outcome` (sent, suppressed, dropped) |
//! | `knhk_metrics_read_errors_total` | counter | — |
//!
//! Every family has a bounded number of series per scrape, whatever the policy size or traffic:
//! rule hits at most `agent.rule_metrics_top_n` (every rule's count is in `GetStatus`), pod rule
//! hits at most the pods on the node times the selector rules that select them (and never more
//! than [`crate::datapath::MAX_POD_COUNTERS`]; a pod's series go when it does), heat at
//! most `agent.heat_top_n` (ranked by attempts, ties by destination, so the set is the same for
//! the same map contents; no rank label, so a change of order creates no series), histograms
//! [`BUCKETS_PER_OCTAVE`] buckets per power of two from 1 µs to 17 s.

use crate::{
    datapath::{DatapathReader, DatapathStatus},
    model::{Class, LatencySource},
};
use knhk_abi::{ACTION_ALLOW, ACTION_AUDIT, ACTION_DENY};
use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, RwLock,
};

/// Histogram buckets per power of two.
pub const BUCKETS_PER_OCTAVE: usize = 4;
/// Where, in 32nds of the octave, each exported bucket of an octave `[2^e, 2^(e+1))` starts: the
/// kernel's sub-bucket edges nearest to 2^(k/4), so every exported edge is an exact kernel edge
/// and adjacent edges are at most 1.2 × apart (1, 1.1875, 1.40625, 1.6875, 2).
const OCTAVE_EDGES_32NDS: [u64; BUCKETS_PER_OCTAVE] = [0, 6, 13, 22];
/// Exported octaves: edges from 2^10 ns (about 1 µs) to 2^34 ns (about 17 s).
const OCTAVES: std::ops::Range<u32> = 10..34;
/// Largest ratio of two adjacent exported edges. A quantile PromQL interpolates
/// (`histogram_quantile`) lies in the same bucket as the true one, so it is within this factor of
/// it: a relative error of at most 20%.
pub const MAX_BUCKET_RATIO: f64 = 1.2;

/// The exported upper bucket edges, ns, ascending (97 of them).
pub fn bucket_edges_ns() -> Vec<u64> {
    let mut edges: Vec<u64> = OCTAVES
        .flat_map(|e| {
            OCTAVE_EDGES_32NDS
                .iter()
                .map(move |k| (1u64 << e) + k * (1u64 << (e - 5)))
        })
        .collect();
    edges.push(1u64 << OCTAVES.end);
    edges
}

/// Reads the datapath maps at each scrape.
pub struct DatapathCollector {
    reader: DatapathReader,
    status: Arc<RwLock<DatapathStatus>>,
    heat_top_n: usize,
    rule_top_n: usize,
    edges_ns: Vec<u64>,
    errors: AtomicU64,
    descs: Vec<Desc>,
}

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathCollector").finish_non_exhaustive()
    }
}

const FAMILIES: [(&str, &str); 15] = [
    (
        "knhk_connect_decisions_total",
        "connect() admission decisions in the kernel, by action and runtime class.",
    ),
    (
        "knhk_rule_hits_total",
        "connect() calls decided by a rule of the live policy: the agent.rule_metrics_top_n rules with the most hits.",
    ),
    (
        "knhk_pod_rule_hits_total",
        "connect() calls decided by a selector rule, by the pod (namespace, name) they came from: pods with at least one hit, while they run.",
    ),
    (
        "knhk_pod_rule_counters",
        "Expansions of selector rules (rule x selected pod or container) with a hit counter of their own (attributed) and without (unattributed: their hits count on the rule only).",
    ),
    (
        "knhk_unmatched_connects_total",
        "connect() calls that matched no rule and got the default action.",
    ),
    (
        "knhk_tcp_handshake_duration_seconds",
        "TCP handshake latency (connect() to ESTABLISHED), by runtime class.",
    ),
    (
        "knhk_tcp_rtt_seconds",
        "Smoothed TCP RTT samples of admitted connections, by runtime class.",
    ),
    (
        "knhk_heat_top_connect_attempts",
        "Connect attempts to the hottest destinations (the top agent.heat_top_n) since each entered the heat map.",
    ),
    ("knhk_bpf_map_entries", "Entries in use in a BPF map."),
    ("knhk_bpf_map_capacity_entries", "Capacity of a BPF map."),
    (
        "knhk_policy_generation",
        "Generation number of the live policy.",
    ),
    ("knhk_policy_rules", "Rules in the live policy."),
    (
        "knhk_policy_scopes",
        "Rule cgroups, by whether they exist (active) or not yet (pending).",
    ),
    (
        "knhk_verdict_events_total",
        "Kernel decisions other than allow, by what became of their event: sent to the agent, suppressed by the per-rule rate limit, or dropped because the ring was full.",
    ),
    (
        "knhk_metrics_read_errors_total",
        "Failed reads of BPF maps while collecting metrics.",
    ),
];

impl DatapathCollector {
    /// A collector over `reader`, labelling rule hits from `status`; it exports the `heat_top_n`
    /// hottest destinations and the `rule_top_n` rules with the most hits.
    pub fn new(
        reader: DatapathReader,
        status: Arc<RwLock<DatapathStatus>>,
        heat_top_n: usize,
        rule_top_n: usize,
    ) -> Self {
        let descs = FAMILIES
            .iter()
            .filter_map(|(name, help)| {
                // Static names and help: valid; a bad one would only drop that family.
                Desc::new((*name).into(), (*help).into(), vec![], Default::default()).ok()
            })
            .collect();
        Self {
            reader,
            status,
            heat_top_n,
            rule_top_n,
            edges_ns: bucket_edges_ns(),
            errors: AtomicU64::new(0),
            descs,
        }
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("metrics: reading {what} failed: {e}");
    }
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn labels(pairs: &[(&str, &str)]) -> Vec<proto::LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = proto::LabelPair::default();
            l.set_name((*k).into());
            l.set_value((*v).into());
            l
        })
        .collect()
}

fn counter(pairs: &[(&str, &str)], value: u64) -> proto::Metric {
    let mut c = proto::Counter::default();
    c.set_value(value as f64);
    let mut m = proto::Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

fn gauge(pairs: &[(&str, &str)], value: f64) -> proto::Metric {
    let mut g = proto::Gauge::default();
    g.set_value(value);
    let mut m = proto::Metric::from_label(labels(pairs));
    m.set_gauge(g);
    m
}

fn help(name: &str) -> &'static str {
    FAMILIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, h)| *h)
        .unwrap_or("")
}

impl Collector for DatapathCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // A poisoned snapshot scrapes as empty; map counters are still read live.
        let status = self.status.read().map(|s| s.clone()).unwrap_or_default();
        let mut out = Vec::new();
        let fam = |name: &str, kind, metrics| family(name, help(name), kind, metrics);

        match self.reader.decisions() {
            Ok(d) => {
                let mut ms = Vec::new();
                for (action, name) in [
                    (ACTION_ALLOW, "allow"),
                    (ACTION_DENY, "deny"),
                    (ACTION_AUDIT, "audit"),
                    (knhk_abi::ACTION_SHED, "shed"),
                    (knhk_abi::ACTION_PARK, "park"),
                ] {
                    for class in Class::ALL {
                        ms.push(counter(
                            &[("action", name), ("class", class.as_str())],
                            d.get(action, class),
                        ));
                    }
                }
                out.push(fam("knhk_connect_decisions_total", MetricType::COUNTER, ms));
            }
            Err(e) => self.failed("decisions", e),
        }

        match self.reader.verdict_events() {
            Ok((sent, dropped, suppressed)) => out.push(fam(
                "knhk_verdict_events_total",
                MetricType::COUNTER,
                vec![
                    counter(&[("outcome", "sent")], sent),
                    counter(&[("outcome", "suppressed")], suppressed),
                    counter(&[("outcome", "dropped")], dropped),
                ],
            )),
            Err(e) => self.failed("verdict event counters", e),
        }

        let hits = self
            .reader
            .ranked_rule_hits(
                &status.rule_counters,
                &status.pod_counters,
                Some(self.rule_top_n),
            )
            .iter()
            .map(|(rule, hits)| counter(&[("rule", rule)], *hits))
            .collect();
        out.push(fam("knhk_rule_hits_total", MetricType::COUNTER, hits));
        let pod_hits = self
            .reader
            .pod_rule_hits(&status.pod_counters)
            .iter()
            .filter_map(|h| {
                let (rule, _) = status.rule_counters.get(h.rule)?;
                Some(counter(
                    &[
                        ("namespace", &h.namespace),
                        ("pod", &h.pod),
                        ("rule", rule),
                        ("action", h.action),
                    ],
                    h.hits,
                ))
            })
            .collect();
        out.push(fam(
            "knhk_pod_rule_hits_total",
            MetricType::COUNTER,
            pod_hits,
        ));
        out.push(fam(
            "knhk_pod_rule_counters",
            MetricType::GAUGE,
            vec![
                gauge(&[("state", "attributed")], status.pod_counters.len() as f64),
                gauge(
                    &[("state", "unattributed")],
                    status.pods_unattributed as f64,
                ),
            ],
        ));
        out.push(fam(
            "knhk_unmatched_connects_total",
            MetricType::COUNTER,
            vec![counter(&[], self.reader.rule_hits(0))],
        ));

        for (kind, name) in [
            (
                LatencySource::Handshake,
                "knhk_tcp_handshake_duration_seconds",
            ),
            (LatencySource::Rtt, "knhk_tcp_rtt_seconds"),
        ] {
            let mut ms = Vec::new();
            for class in Class::ALL {
                match self.reader.histogram(kind, class) {
                    Ok(h) => {
                        let mut hist = proto::Histogram::default();
                        hist.set_sample_count(h.count);
                        hist.set_sample_sum(h.sum_ns as f64 / 1e9);
                        let buckets = self
                            .edges_ns
                            .iter()
                            .map(|&edge| {
                                let mut b = proto::Bucket::default();
                                b.set_upper_bound(edge as f64 / 1e9);
                                b.set_cumulative_count(h.count_at_most(edge - 1));
                                b
                            })
                            .collect();
                        hist.set_bucket(buckets);
                        let mut m = proto::Metric::from_label(labels(&[("class", class.as_str())]));
                        m.set_histogram(hist);
                        ms.push(m);
                    }
                    Err(e) => self.failed("latency histograms", e),
                }
            }
            out.push(fam(name, MetricType::HISTOGRAM, ms));
        }

        match self.reader.heat_entries() {
            Ok(entries) => {
                // Per destination (summed over scopes), ranked by attempts, ties by destination:
                // the same map gives the same set.
                let top = crate::datapath::per_destination(&entries)
                    .iter()
                    .take(self.heat_top_n)
                    .map(|e| {
                        let dest = std::net::SocketAddr::new(e.addr, e.port).to_string();
                        let proto = crate::datapath::protocol_name(e.proto);
                        gauge(
                            &[("destination", &dest), ("protocol", proto)],
                            e.attempts as f64,
                        )
                    })
                    .collect();
                out.push(fam(
                    "knhk_heat_top_connect_attempts",
                    MetricType::GAUGE,
                    top,
                ));
                out.push(fam(
                    "knhk_bpf_map_entries",
                    MetricType::GAUGE,
                    vec![
                        gauge(&[("map", "heat")], entries.len() as f64),
                        gauge(&[("map", "policy")], status.trie_entries as f64),
                    ],
                ));
            }
            Err(e) => self.failed("heat", e),
        }
        out.push(fam(
            "knhk_bpf_map_capacity_entries",
            MetricType::GAUGE,
            vec![
                gauge(&[("map", "heat")], self.reader.heat_capacity() as f64),
                gauge(&[("map", "policy")], 2.0 * knhk_abi::MAX_PREFIXES as f64),
            ],
        ));
        out.push(fam(
            "knhk_policy_generation",
            MetricType::GAUGE,
            vec![gauge(&[], status.generation as f64)],
        ));
        out.push(fam(
            "knhk_policy_rules",
            MetricType::GAUGE,
            vec![gauge(&[], status.rule_counters.len() as f64)],
        ));
        out.push(fam(
            "knhk_policy_scopes",
            MetricType::GAUGE,
            vec![
                gauge(&[("state", "active")], status.active_scopes.len() as f64),
                gauge(&[("state", "pending")], status.pending_scopes.len() as f64),
            ],
        ));
        out.push(fam(
            "knhk_metrics_read_errors_total",
            MetricType::COUNTER,
            vec![counter(&[], self.errors.load(Ordering::Relaxed))],
        ));
        out
    }
}
