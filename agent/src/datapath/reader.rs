//! Reading counters, latency histograms and heat from the pinned maps.
//!
//! A reader opens the pins itself, so metrics scrapes never wait for the writer.

use super::{
    io_err, map_err, pins::PinLayout, sys, DatapathError, PodCounter, CLASSES_IN_ABI_ORDER,
};
use crate::{
    abi,
    model::{Class, LatencySource, Side},
};
use aya::maps::{Map, MapData, PerCpuArray};
use knhk_abi::{
    bucket_lower_bound, bucket_upper_bound, decision_index, histogram_index, map_names, HeatKey,
    HeatValue, Histogram, ACTIONS, BUCKETS, CLASSES, MAX_RULE_COUNTERS,
};
use std::{
    net::{IpAddr, Ipv6Addr},
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering},
};

/// Decision counts since the maps were created, by `[action][class]` in ABI order
/// (`ACTION_ALLOW, ACTION_DENY, ACTION_AUDIT` × `R1, W1, C1`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Decisions(pub [[u64; CLASSES]; ACTIONS]);

impl Decisions {
    /// Count for `action` (`knhk_abi::ACTION_*`) and `class`.
    pub fn get(&self, action: u8, class: Class) -> u64 {
        self.0[action as usize][class.index()]
    }

    /// Count for `action` over every class.
    pub fn total(&self, action: u8) -> u64 {
        self.0[action as usize].iter().sum()
    }
}

/// One latency histogram summed over CPUs. Values are nanoseconds.
#[derive(Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Samples.
    pub count: u64,
    /// Sum of samples, ns.
    pub sum_ns: u64,
    /// Bucket counts (see `knhk_abi::bucket_of`).
    pub buckets: Box<[u64; BUCKETS]>,
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count)
            .field("p50_ns", &self.quantile(0.5))
            .field("p99_ns", &self.quantile(0.99))
            .finish()
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            count: 0,
            sum_ns: 0,
            buckets: Box::new([0; BUCKETS]),
        }
    }
}

impl LatencyHistogram {
    /// Adds a per-CPU histogram.
    pub fn add(&mut self, h: &Histogram) {
        self.count += h.count;
        self.sum_ns = self.sum_ns.wrapping_add(h.sum_ns);
        for (a, b) in self.buckets.iter_mut().zip(h.buckets.iter()) {
            *a += b;
        }
    }

    /// Adds another histogram.
    pub fn add_histogram(&mut self, h: &LatencyHistogram) {
        self.count += h.count;
        self.sum_ns = self.sum_ns.wrapping_add(h.sum_ns);
        for (a, b) in self.buckets.iter_mut().zip(h.buckets.iter()) {
            *a += b;
        }
    }

    /// Takes out `h`, which was added before (a running window sum dropping its oldest beat).
    pub fn remove_histogram(&mut self, h: &LatencyHistogram) {
        self.count = self.count.saturating_sub(h.count);
        self.sum_ns = self.sum_ns.wrapping_sub(h.sum_ns);
        for (a, b) in self.buckets.iter_mut().zip(h.buckets.iter()) {
            *a = a.saturating_sub(*b);
        }
    }

    /// What was recorded since `earlier` (a reading of the same counters), bucket by bucket;
    /// saturates at zero if the map was reset in between.
    pub fn minus(&self, earlier: &LatencyHistogram) -> LatencyHistogram {
        let mut out = LatencyHistogram {
            count: self.count.saturating_sub(earlier.count),
            sum_ns: self.sum_ns.wrapping_sub(earlier.sum_ns),
            ..Default::default()
        };
        for (o, (a, b)) in out
            .buckets
            .iter_mut()
            .zip(self.buckets.iter().zip(earlier.buckets.iter()))
        {
            *o = a.saturating_sub(*b);
        }
        out
    }

    /// Records one value (for building histograms in userspace, e.g. tests and benchmarks).
    pub fn record(&mut self, value_ns: u64) {
        self.count += 1;
        self.sum_ns = self.sum_ns.wrapping_add(value_ns);
        self.buckets[knhk_abi::bucket_of(value_ns)] += 1;
    }

    /// The `q` quantile (0..=1), as the midpoint of the bucket that holds it; `None` when empty.
    /// The true value lies within half a bucket width (under 1.6%) of it.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (lo, hi) = (bucket_lower_bound(b), bucket_upper_bound(b));
                return Some(if hi == u64::MAX {
                    lo
                } else {
                    lo + (hi - lo - 1) / 2
                });
            }
        }
        None
    }

    /// Samples at or below `le_ns`, counted exactly when `le_ns + 1` is a bucket edge (powers of
    /// two always are).
    pub fn count_at_most(&self, le_ns: u64) -> u64 {
        self.buckets
            .iter()
            .enumerate()
            .take_while(|(b, _)| bucket_upper_bound(*b) <= le_ns.saturating_add(1))
            .map(|(_, n)| n)
            .sum()
    }
}

/// The name of an IPPROTO number as metrics and the API show it: `tcp`, `udp` or `other`.
pub fn protocol_name(proto: u8) -> &'static str {
    match proto {
        knhk_abi::PROTO_TCP => "tcp",
        knhk_abi::PROTO_UDP => "udp",
        _ => "other",
    }
}

/// The hits of one selector rule in one pod ([`DatapathReader::pod_rule_hits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRuleHits {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// Index of the rule in the live policy.
    pub rule: usize,
    /// The rule's action as the mode applies it.
    pub action: &'static str,
    /// Hits.
    pub hits: u64,
}

/// One entry of the heat map: a destination and the scope whose connects went there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeatEntry {
    /// Cgroup id of the deciding scope (the deepest rule cgroup among the caller's ancestors);
    /// 0 for the global scope, and in [`per_destination`] sums.
    pub scope: u64,
    /// Destination address (IPv4 shown as IPv4).
    pub addr: IpAddr,
    /// Destination port.
    pub port: u16,
    /// IPPROTO number.
    pub proto: u8,
    /// Connect attempts.
    pub attempts: u64,
    /// Last attempt, CLOCK_MONOTONIC ns.
    pub last_seen_ns: u64,
}

impl HeatEntry {
    fn from_map(k: &HeatKey, v: &HeatValue) -> Self {
        let v6 = Ipv6Addr::from(k.addr);
        let addr = match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        };
        HeatEntry {
            scope: k.scope,
            addr,
            port: k.port,
            proto: k.proto,
            attempts: v.attempts,
            last_seen_ns: v.last_seen_ns,
        }
    }
}

/// Sums `entries` per destination (over scopes; `scope` 0, the latest `last_seen_ns`), most
/// attempts first, ties by destination.
pub fn per_destination(entries: &[HeatEntry]) -> Vec<HeatEntry> {
    let mut by: std::collections::HashMap<(IpAddr, u16, u8), HeatEntry> =
        std::collections::HashMap::with_capacity(entries.len());
    for e in entries {
        by.entry((e.addr, e.port, e.proto))
            .and_modify(|s| {
                s.attempts = s.attempts.saturating_add(e.attempts);
                s.last_seen_ns = s.last_seen_ns.max(e.last_seen_ns);
            })
            .or_insert_with(|| HeatEntry {
                scope: 0,
                ..e.clone()
            });
    }
    let mut out: Vec<HeatEntry> = by.into_values().collect();
    sort_hottest(&mut out);
    out
}

/// Most attempts first, ties by destination, then scope.
fn sort_hottest(entries: &mut [HeatEntry]) {
    entries.sort_by(|a, b| {
        b.attempts
            .cmp(&a.attempts)
            .then(a.addr.cmp(&b.addr))
            .then(a.port.cmp(&b.port))
            .then(a.proto.cmp(&b.proto))
            .then(a.scope.cmp(&b.scope))
    });
}

/// Where an incremental walk of the heat map stands; see [`DatapathReader::heat_step`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HeatCursor(sys::BatchCursor);

/// Reads the datapath's counters from its pins.
pub struct DatapathReader {
    decisions: PerCpuArray<MapData, u64>,
    heat_inserts: PerCpuArray<MapData, u64>,
    event_counts: PerCpuArray<MapData, u64>,
    latency: PerCpuArray<MapData, Histogram>,
    heat: MapData,
    heat_capacity: u32,
    rule_hits: sys::MmapArray,
}

impl std::fmt::Debug for DatapathReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathReader").finish_non_exhaustive()
    }
}

fn open(layout: &PinLayout, name: &'static str) -> Result<Map, DatapathError> {
    let path = layout.map(name);
    let data = MapData::from_pin(&path).map_err(map_err("open pin", name))?;
    Map::from_map_data(data).map_err(map_err("open pin", name))
}

impl DatapathReader {
    /// Opens the maps pinned under `layout`.
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        let decisions = PerCpuArray::try_from(open(layout, map_names::DECISIONS)?)
            .map_err(map_err("open", map_names::DECISIONS))?;
        let latency = PerCpuArray::try_from(open(layout, map_names::LATENCY)?)
            .map_err(map_err("open", map_names::LATENCY))?;
        let heat_inserts = PerCpuArray::try_from(open(layout, map_names::HEAT_INSERTS)?)
            .map_err(map_err("open", map_names::HEAT_INSERTS))?;
        let event_counts = PerCpuArray::try_from(open(layout, map_names::EVENT_COUNTERS)?)
            .map_err(map_err("open", map_names::EVENT_COUNTERS))?;
        let heat_path = layout.map(map_names::HEAT);
        let heat = MapData::from_pin(&heat_path).map_err(map_err("open pin", map_names::HEAT))?;
        let heat_capacity = heat
            .info()
            .map(|i| i.max_entries())
            .map_err(map_err("info", map_names::HEAT))?;
        let hits_path = layout.map(map_names::RULE_HITS);
        let hits =
            MapData::from_pin(&hits_path).map_err(map_err("open pin", map_names::RULE_HITS))?;
        let rule_hits =
            sys::MmapArray::map(hits.fd().as_fd(), MAX_RULE_COUNTERS as usize * 8, false)
                .map_err(io_err("mmap", &hits_path))?;
        Ok(Self {
            decisions,
            heat_inserts,
            event_counts,
            latency,
            heat,
            heat_capacity,
            rule_hits,
        })
    }

    /// Decision counts, summed over CPUs and both sides of a rollout.
    pub fn decisions(&self) -> Result<Decisions, DatapathError> {
        let mut out = self.decisions_on(Side::Stable)?;
        let candidate = self.decisions_on(Side::Candidate)?;
        for (row, more) in out.0.iter_mut().zip(candidate.0) {
            for (n, m) in row.iter_mut().zip(more) {
                *n += m;
            }
        }
        Ok(out)
    }

    /// Decision counts of one side of a rollout (the stable side is every decision outside
    /// one), summed over CPUs.
    pub fn decisions_on(&self, side: Side) -> Result<Decisions, DatapathError> {
        let mut out = Decisions::default();
        for action in 0..ACTIONS as u8 {
            for class in CLASSES_IN_ABI_ORDER {
                let values = self
                    .decisions
                    .get(
                        &decision_index(abi::side(side), action, abi::class(class)),
                        0,
                    )
                    .map_err(map_err("lookup", map_names::DECISIONS))?;
                out.0[action as usize][class.index()] = values.iter().sum();
            }
        }
        Ok(out)
    }

    /// Hits of rule counter `counter` (0 = connects that matched no rule).
    pub fn rule_hits(&self, counter: u32) -> u64 {
        if counter >= MAX_RULE_COUNTERS {
            return 0;
        }
        let p = self.rule_hits.at::<u64>(counter as usize * 8);
        // SAFETY: aligned u64 inside the read-only mapping; the kernel updates it atomically.
        unsafe { AtomicU64::from_ptr(p).load(Ordering::Relaxed) }
    }

    /// The rules of `counters` (name, counter id) that have at least one hit, with their hits,
    /// most hits first and ties by name; at most `limit` of them (`None`: all). A rule's hits
    /// are its own counter's plus those of its expansions in `pods`. Reads each counter once
    /// from the shared mapping; keeps only `limit` in memory while ranking.
    pub fn ranked_rule_hits(
        &self,
        counters: &[(String, u32)],
        pods: &[PodCounter],
        limit: Option<usize>,
    ) -> Vec<(String, u64)> {
        use std::{cmp::Reverse, collections::BinaryHeap};
        let limit = limit.unwrap_or(counters.len());
        if limit == 0 {
            return Vec::new();
        }
        // Min-heap on (hits, Reverse(name)): its top is the entry that ranks last.
        let mut heap: BinaryHeap<Reverse<(u64, Reverse<&str>)>> = BinaryHeap::new();
        let mut expanded = vec![0u64; counters.len()];
        for p in pods {
            if let Some(sum) = expanded.get_mut(p.rule) {
                *sum = sum.saturating_add(self.rule_hits(p.id));
            }
        }
        for ((name, id), more) in counters.iter().zip(expanded) {
            let hits = self.rule_hits(*id).saturating_add(more);
            if hits == 0 {
                continue;
            }
            let entry = Reverse((hits, Reverse(name.as_str())));
            if heap.len() < limit {
                heap.push(entry);
            } else if heap.peek().is_some_and(|worst| entry < *worst) {
                heap.pop();
                heap.push(entry);
            }
        }
        heap.into_sorted_vec()
            .into_iter()
            .map(|Reverse((hits, Reverse(name)))| (name.to_owned(), hits))
            .collect()
    }

    /// The hits of each selector rule in each pod, from the expansions' own counters: one
    /// entry per (namespace, pod, rule index, action) with at least one hit (a rule selecting
    /// a container sums that pod's containers), sorted.
    pub fn pod_rule_hits(&self, pods: &[PodCounter]) -> Vec<PodRuleHits> {
        let mut sums: std::collections::BTreeMap<(&str, &str, usize, &'static str), u64> =
            std::collections::BTreeMap::new();
        for p in pods {
            let hits = self.rule_hits(p.id);
            if hits > 0 {
                let sum = sums
                    .entry((p.namespace.as_str(), p.pod.as_str(), p.rule, p.action))
                    .or_default();
                *sum = sum.saturating_add(hits);
            }
        }
        sums.into_iter()
            .map(|((namespace, pod, rule, action), hits)| PodRuleHits {
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
                rule,
                action,
                hits,
            })
            .collect()
    }

    /// The latency histogram of `source` for `class`, summed over CPUs and both sides of a
    /// rollout.
    pub fn histogram(
        &self,
        source: LatencySource,
        class: Class,
    ) -> Result<LatencyHistogram, DatapathError> {
        let mut out = self.histogram_on(Side::Stable, source, class)?;
        out.add_histogram(&self.histogram_on(Side::Candidate, source, class)?);
        Ok(out)
    }

    /// The latency histogram of `source` for `class` on one side of a rollout, summed over CPUs.
    pub fn histogram_on(
        &self,
        side: Side,
        source: LatencySource,
        class: Class,
    ) -> Result<LatencyHistogram, DatapathError> {
        let values = self
            .latency
            .get(
                &histogram_index(
                    abi::side(side),
                    abi::latency_kind(source),
                    abi::class(class),
                ),
                0,
            )
            .map_err(map_err("lookup", map_names::LATENCY))?;
        let mut out = LatencyHistogram::default();
        for h in values.iter() {
            out.add(h);
        }
        Ok(out)
    }

    /// Every destination of the heat map (one batch read), summed over scopes, hottest first.
    pub fn heat(&self) -> Result<Vec<HeatEntry>, DatapathError> {
        Ok(per_destination(&self.heat_entries()?))
    }

    /// Every entry of the heat map (one batch read): (scope, destination) pairs, hottest first.
    pub fn heat_entries(&self) -> Result<Vec<HeatEntry>, DatapathError> {
        let raw: Vec<(HeatKey, HeatValue)> =
            sys::lookup_batch(self.heat.fd().as_fd(), self.heat_capacity as usize).map_err(
                |e| DatapathError::Map {
                    op: "batch lookup",
                    map: map_names::HEAT,
                    source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_lookup_batch",
                        io_error: e,
                    }),
                },
            )?;
        let mut out: Vec<HeatEntry> = raw.iter().map(|(k, v)| HeatEntry::from_map(k, v)).collect();
        sort_hottest(&mut out);
        Ok(out)
    }

    /// Reads up to `max` heat entries from `cursor` (one batch syscall); returns them and
    /// whether the walk reached the end of the map (the cursor then starts over).
    pub fn heat_step(
        &self,
        cursor: &mut HeatCursor,
        max: usize,
    ) -> Result<(Vec<HeatEntry>, bool), DatapathError> {
        let (raw, done): (Vec<(HeatKey, HeatValue)>, bool) =
            sys::lookup_batch_step(self.heat.fd().as_fd(), &mut cursor.0, max).map_err(|e| {
                DatapathError::Map {
                    op: "batch lookup",
                    map: map_names::HEAT,
                    source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_lookup_batch",
                        io_error: e,
                    }),
                }
            })?;
        Ok((
            raw.iter().map(|(k, v)| HeatEntry::from_map(k, v)).collect(),
            done,
        ))
    }

    /// Verdict events since the maps were created (all CPUs): (sent, dropped because the ring
    /// was full, suppressed by the per-rule rate limit).
    pub fn verdict_events(&self) -> Result<(u64, u64, u64), DatapathError> {
        let count = |i: u32| {
            self.event_counts
                .get(&i, 0)
                .map(|v| v.iter().sum::<u64>())
                .map_err(map_err("lookup", map_names::EVENT_COUNTERS))
        };
        Ok((
            count(knhk_abi::EVENT_COUNTER_SENT)?,
            count(knhk_abi::EVENT_COUNTER_DROPPED)?,
            count(knhk_abi::EVENT_COUNTER_SUPPRESSED)?,
        ))
    }

    /// Destinations inserted into the heat map since it was created (all CPUs).
    pub fn heat_inserts(&self) -> Result<u64, DatapathError> {
        let v = self
            .heat_inserts
            .get(&0, 0)
            .map_err(map_err("lookup", map_names::HEAT_INSERTS))?;
        Ok(v.iter().sum())
    }

    /// Capacity of the heat map.
    pub fn heat_capacity(&self) -> u32 {
        self.heat_capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_is_within_the_bucket_error() {
        let mut h = LatencyHistogram::default();
        let values: Vec<u64> = (1..=10_000u64).map(|i| 10_000 + i * 37).collect();
        for v in &values {
            h.record(*v);
        }
        let exact_p99 = values[(values.len() * 99).div_ceil(100) - 1] as f64;
        let got = h.quantile(0.99).expect("non-empty") as f64;
        assert!(
            (got - exact_p99).abs() / exact_p99 < 0.02,
            "p99 {got} vs exact {exact_p99}"
        );
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }

    #[test]
    fn count_at_most_power_of_two_edges_is_exact() {
        let mut h = LatencyHistogram::default();
        for v in [1_000u64, 1_023, 1_024, 5_000, 1 << 20] {
            h.record(v);
        }
        assert_eq!(h.count_at_most(1023), 2);
        assert_eq!(h.count_at_most(1024 * 1024 - 1), 4);
        assert_eq!(h.count_at_most(u64::MAX), 5);
    }
}
