//! Cache heat per destination, from the kernel's heat LRU: decayed heat, top-N and rising
//! destinations.
//!
//! The kernel counts attempts per (deciding scope, destination); so does the tracker. Rankings
//! sum a destination's scopes, or the scopes of each group the caller maps them to (per pod:
//! [`HeatTracker::top_grouped`]).
//!
//! Reading the whole LRU costs about 0.45 µs per entry, far too much for one beat, so the engine
//! walks it incrementally: each beat reads the next chunk (one batch syscall) and folds it in
//! here. Heat decays exponentially per beat (`half_life_beats`), applied lazily from the beat an
//! entry was last visited: `heat = heat × d^(beats since) + new attempts`. The rate of new
//! attempts per beat between two visits gives the derivative; a destination whose rate grew is
//! *rising* (a preload hint). A destination not seen during a whole walk left the kernel map
//! (evicted): rankings skip it, and a sweep that also advances a bounded number of entries per
//! beat drops it, so no beat ever touches the whole table.

use crate::{datapath::HeatEntry, model::HotDestination};
use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

#[derive(Debug, Clone)]
struct Tracked {
    attempts: u64,
    heat: f64,
    rate: f64,
    rising: f64,
    last_beat: u64,
    walk: u64,
}

/// (scope, address, port, protocol).
type Key = (u64, IpAddr, u16, u8);

/// A group (of scopes; see [`HeatTracker::top_grouped`]) and a destination.
type GroupDest = (u32, IpAddr, u16, u8);

/// The tracker: pure state, fed with chunks of the kernel map.
#[derive(Debug, Clone)]
pub struct HeatTracker {
    table: HashMap<Key, Tracked>,
    /// Every key of `table`, for the bounded sweep of stale entries.
    keys: Vec<Key>,
    sweep_at: usize,
    decay_per_beat: f64,
    walk: u64,
    seen_this_walk: usize,
    seen_last_walk: usize,
}

impl HeatTracker {
    /// A tracker whose heat halves every `half_life_beats` beats.
    pub fn new(half_life_beats: f64) -> Self {
        HeatTracker {
            table: HashMap::new(),
            keys: Vec::new(),
            sweep_at: 0,
            decay_per_beat: 0.5f64.powf(1.0 / half_life_beats.max(1e-9)),
            walk: 0,
            seen_this_walk: 0,
            seen_last_walk: 0,
        }
    }

    /// Folds in entries read at `beat`; `walk_done` says the chunk ended a walk of the map.
    pub fn observe(&mut self, beat: u64, entries: &[HeatEntry], walk_done: bool) {
        for e in entries {
            let key = (e.scope, e.addr, e.port, e.proto);
            let walk = self.walk;
            let decay = self.decay_per_beat;
            match self.table.get_mut(&key) {
                Some(t) => {
                    if t.walk != walk {
                        self.seen_this_walk += 1;
                    }
                    // Fewer attempts than before: the kernel entry was evicted and recreated.
                    let new = if e.attempts >= t.attempts {
                        e.attempts - t.attempts
                    } else {
                        e.attempts
                    };
                    let beats = beat.saturating_sub(t.last_beat).max(1);
                    let rate = new as f64 / beats as f64;
                    t.heat = t.heat * decay.powi(beats.min(i32::MAX as u64) as i32) + new as f64;
                    t.rising = rate - t.rate;
                    t.rate = rate;
                    t.attempts = e.attempts;
                    t.last_beat = beat;
                    t.walk = walk;
                }
                None => {
                    self.seen_this_walk += 1;
                    self.keys.push(key);
                    self.table.insert(
                        key,
                        Tracked {
                            attempts: e.attempts,
                            heat: e.attempts as f64,
                            rate: 0.0,
                            rising: 0.0,
                            last_beat: beat,
                            walk,
                        },
                    );
                }
            }
        }
        // Drop entries missing from the last complete walk, a bounded number per call.
        let budget = entries.len().max(64) * 2;
        for _ in 0..budget.min(self.keys.len()) {
            if self.sweep_at >= self.keys.len() {
                self.sweep_at = 0;
            }
            let key = self.keys[self.sweep_at];
            if self.table.get(&key).is_some_and(|t| t.walk + 1 < self.walk) {
                self.table.remove(&key);
                self.keys.swap_remove(self.sweep_at);
            } else {
                self.sweep_at += 1;
            }
        }
        if walk_done {
            self.walk += 1;
            self.seen_last_walk = std::mem::take(&mut self.seen_this_walk);
        }
    }

    /// Whether an entry was seen in the last complete walk or the current one.
    fn live(&self, t: &Tracked) -> bool {
        t.walk + 1 >= self.walk
    }

    /// Entries ((scope, destination) pairs) in the kernel map as of the last complete walk.
    pub fn len(&self) -> usize {
        self.seen_last_walk
    }

    /// Whether the last complete walk found nothing.
    pub fn is_empty(&self) -> bool {
        self.seen_last_walk == 0
    }

    /// The `n` (group, destination) pairs with the largest `score` (descending) of their summed
    /// heat and rising, without sorting them all. `group` maps a scope to its group; `None` leaves
    /// the scope out.
    fn best(
        &self,
        beat: u64,
        n: usize,
        group: &dyn Fn(u64) -> Option<u32>,
        score: impl Fn(f64, f64) -> Option<f64>,
    ) -> Vec<(u32, HotDestination)> {
        use std::{cmp::Reverse, collections::BinaryHeap};
        struct Scored(f64, GroupDest, f64, f64);
        impl PartialEq for Scored {
            fn eq(&self, o: &Self) -> bool {
                self.0.total_cmp(&o.0).is_eq() && self.1 == o.1
            }
        }
        impl Eq for Scored {}
        impl PartialOrd for Scored {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Scored {
            // Higher score first; ties broken by destination, so the result is deterministic.
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                self.0.total_cmp(&o.0).then_with(|| o.1.cmp(&self.1))
            }
        }
        if n == 0 {
            return Vec::new();
        }
        // Sum over the scopes of each group: (heat, rising).
        let mut sums: HashMap<GroupDest, (f64, f64)> = HashMap::new();
        let mut groups: HashMap<u64, Option<u32>> = HashMap::new();
        for (&(scope, addr, port, proto), t) in self.table.iter().filter(|(_, t)| self.live(t)) {
            let Some(g) = *groups.entry(scope).or_insert_with(|| group(scope)) else {
                continue;
            };
            let heat = t.heat
                * self
                    .decay_per_beat
                    .powi(beat.saturating_sub(t.last_beat).min(i32::MAX as u64) as i32);
            let sum = sums.entry((g, addr, port, proto)).or_default();
            sum.0 += heat;
            sum.1 += t.rising;
        }
        let mut heap: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(n + 1);
        for (key, (heat, rising)) in sums {
            let Some(s) = score(heat, rising) else {
                continue;
            };
            heap.push(Reverse(Scored(s, key, heat, rising)));
            if heap.len() > n {
                heap.pop();
            }
        }
        let mut out: Vec<Scored> = heap.into_iter().map(|Reverse(s)| s).collect();
        out.sort_by(|a, b| b.cmp(a));
        out.into_iter()
            .map(|Scored(_, (g, addr, port, proto), heat, rising)| {
                (
                    g,
                    HotDestination {
                        addr,
                        port,
                        proto,
                        heat,
                        rising,
                    },
                )
            })
            .collect()
    }

    /// The `n` hottest destinations as of `beat` (summed over scopes), hottest first.
    pub fn top(&self, beat: u64, n: usize) -> Vec<HotDestination> {
        self.top_grouped(beat, n, &|_| Some(0))
            .into_iter()
            .map(|(_, d)| d)
            .collect()
    }

    /// The `n` hottest (group, destination) pairs as of `beat`, hottest first: `group` maps each
    /// scope to a group (a pod, say), whose scopes are summed; `None` leaves a scope out.
    pub fn top_grouped(
        &self,
        beat: u64,
        n: usize,
        group: &dyn Fn(u64) -> Option<u32>,
    ) -> Vec<(u32, HotDestination)> {
        self.best(beat, n, group, |heat, _| Some(heat))
    }

    /// Up to `n` destinations whose attempt rate (summed over scopes) grew, fastest growth first.
    pub fn rising(&self, beat: u64, n: usize) -> Vec<HotDestination> {
        self.best(beat, n, &|_| Some(0), |_, rising| {
            (rising > 0.0).then_some(rising)
        })
        .into_iter()
        .map(|(_, d)| d)
        .collect()
    }
}

/// The tracker shared between the beat engine (which feeds it) and its readers (metrics, API),
/// with the beat it was last fed at. Rankings cost a pass over every destination, so they are
/// computed when asked for, outside the beat.
#[derive(Debug, Clone)]
pub struct HeatView {
    tracker: Arc<Mutex<HeatTracker>>,
    beat: Arc<AtomicU64>,
    top_n: usize,
    descs: Vec<Desc>,
}

const FAMILIES: [(&str, &str); 2] = [
    (
        "knhk_heat_decayed_attempts",
        "Decayed connect attempts of the hottest destinations (the top N; no rank label).",
    ),
    (
        "knhk_heat_rising_attempts_per_beat",
        "Growth of the attempt rate (attempts per beat) of the fastest-rising destinations: preload hints.",
    ),
];

impl HeatView {
    /// Shares `tracker`; metrics export `top_n` destinations per family.
    pub fn new(tracker: HeatTracker, top_n: usize) -> Self {
        let descs = FAMILIES
            .iter()
            .filter_map(|(n, h)| {
                // Static names and help: valid; a bad one would only drop that family.
                Desc::new((*n).into(), (*h).into(), vec![], Default::default()).ok()
            })
            .collect();
        HeatView {
            tracker: Arc::new(Mutex::new(tracker)),
            beat: Arc::new(AtomicU64::new(0)),
            top_n,
            descs,
        }
    }

    /// Feeds entries read at `beat`; at the end of a walk returns the destinations present.
    pub fn observe(&self, beat: u64, entries: &[HeatEntry], walk_done: bool) -> Option<usize> {
        self.beat.store(beat, Ordering::Relaxed);
        // A poisoned tracker (a panicked beat) reports nothing rather than stale heat.
        let mut t = self.tracker.lock().ok()?;
        t.observe(beat, entries, walk_done);
        walk_done.then(|| t.len())
    }

    /// Moves the rankings' clock to `beat` without reading anything (a beat that skipped the
    /// map: heat keeps decaying).
    pub fn advance(&self, beat: u64) {
        self.beat.store(beat, Ordering::Relaxed);
    }

    /// The `n` hottest destinations.
    pub fn top(&self, n: usize) -> Vec<HotDestination> {
        let beat = self.beat.load(Ordering::Relaxed);
        self.tracker
            .lock()
            .map(|t| t.top(beat, n))
            // A poisoned tracker ranks nothing.
            .unwrap_or_default()
    }

    /// The `n` hottest (group, destination) pairs; see [`HeatTracker::top_grouped`].
    pub fn top_grouped(
        &self,
        n: usize,
        group: &dyn Fn(u64) -> Option<u32>,
    ) -> Vec<(u32, HotDestination)> {
        let beat = self.beat.load(Ordering::Relaxed);
        self.tracker
            .lock()
            .map(|t| t.top_grouped(beat, n, group))
            // A poisoned tracker ranks nothing.
            .unwrap_or_default()
    }

    /// Up to `n` rising destinations.
    pub fn rising(&self, n: usize) -> Vec<HotDestination> {
        let beat = self.beat.load(Ordering::Relaxed);
        self.tracker
            .lock()
            .map(|t| t.rising(beat, n))
            // A poisoned tracker ranks nothing.
            .unwrap_or_default()
    }
}

/// One destination's series. No `rank` label: a series is one destination, so a change of order
/// creates no series; at most `top_n` destinations are exported per family per scrape.
fn gauge(d: &HotDestination, value: f64) -> proto::Metric {
    let dest = std::net::SocketAddr::new(d.addr, d.port).to_string();
    let proto_name = crate::datapath::protocol_name(d.proto);
    let labels = [("destination", dest), ("protocol", proto_name.to_string())]
        .into_iter()
        .map(|(k, v)| {
            let mut l = proto::LabelPair::default();
            l.set_name(k.into());
            l.set_value(v);
            l
        })
        .collect();
    let mut g = proto::Gauge::default();
    g.set_value(value);
    let mut m = proto::Metric::from_label(labels);
    m.set_gauge(g);
    m
}

impl Collector for HeatView {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let family = |(name, help): (&str, &str), metrics: Vec<proto::Metric>| {
            let mut f = MetricFamily::default();
            f.set_name(name.into());
            f.set_help(help.into());
            f.set_field_type(MetricType::GAUGE);
            f.set_metric(metrics);
            f
        };
        let top = self
            .top(self.top_n)
            .iter()
            .map(|d| gauge(d, d.heat))
            .collect();
        let rising = self
            .rising(self.top_n)
            .iter()
            .map(|d| gauge(d, d.rising))
            .collect();
        vec![family(FAMILIES[0], top), family(FAMILIES[1], rising)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(last: u8, attempts: u64) -> HeatEntry {
        scoped(0, last, attempts)
    }

    fn scoped(scope: u64, last: u8, attempts: u64) -> HeatEntry {
        HeatEntry {
            scope,
            addr: IpAddr::from([10, 0, 0, last]),
            port: 80,
            proto: 6,
            attempts,
            last_seen_ns: 0,
        }
    }

    #[test]
    fn heat_decays_by_half_life_and_ranks() {
        let mut t = HeatTracker::new(10.0);
        t.observe(0, &[entry(1, 100), entry(2, 10)], true);
        assert_eq!(t.top(0, 1)[0].addr, IpAddr::from([10, 0, 0, 1]));
        let later = t.top(10, 2);
        assert!((later[0].heat - 50.0).abs() < 1e-6, "{later:?}");
        assert!((later[1].heat - 5.0).abs() < 1e-6);
        // Destination 2 gets hammered: it overtakes, and it is rising.
        t.observe(10, &[entry(1, 100), entry(2, 1010)], true);
        let top = t.top(10, 2);
        assert_eq!(top[0].addr, IpAddr::from([10, 0, 0, 2]));
        assert!((top[0].heat - 1005.0).abs() < 1e-6, "{top:?}");
        let rising = t.rising(10, 5);
        assert_eq!(rising.len(), 1);
        assert_eq!(rising[0].addr, IpAddr::from([10, 0, 0, 2]));
    }

    #[test]
    fn destinations_missing_from_a_whole_walk_are_dropped() {
        let mut t = HeatTracker::new(10.0);
        t.observe(0, &[entry(1, 1)], false);
        t.observe(1, &[entry(2, 1)], true);
        assert_eq!(t.len(), 2);
        t.observe(2, &[entry(2, 3)], true);
        assert_eq!(t.len(), 1, "10.0.0.1 was not in the last walk");
        t.observe(3, &[], false);
        assert_eq!(t.top(3, 5).len(), 1, "and it is no longer ranked");
        // A recreated kernel entry (fewer attempts than tracked) counts its attempts as new.
        t.observe(4, &[entry(2, 1)], true);
        let d = 0.5f64.powf(0.1);
        assert!(
            (t.top(4, 1)[0].heat - ((d + 2.0) * d.powi(2) + 1.0)).abs() < 1e-6,
            "{:?}",
            t.top(4, 1)
        );
    }

    #[test]
    fn scopes_sum_per_destination_and_per_group() {
        let mut t = HeatTracker::new(10.0);
        // Destination 1 from scopes 7 (3) and 8 (4) and the global scope (1); destination 2
        // from scope 8 only (5).
        let entries = [
            scoped(7, 1, 3),
            scoped(8, 1, 4),
            scoped(0, 1, 1),
            scoped(8, 2, 5),
        ];
        t.observe(0, &entries, true);
        assert_eq!(
            t.len(),
            4,
            "the kernel map holds (scope, destination) pairs"
        );
        let top = t.top(0, 5);
        assert_eq!(top.len(), 2, "{top:?}");
        assert_eq!(top[0].addr, IpAddr::from([10, 0, 0, 1]));
        assert!((top[0].heat - 8.0).abs() < 1e-9, "{top:?}");
        assert!((top[1].heat - 5.0).abs() < 1e-9, "{top:?}");
        // Scopes 7 and 8 are two pods (groups 1 and 2); scope 0 belongs to none (group 0).
        let group = |s: u64| {
            Some(match s {
                7 => 1,
                8 => 2,
                _ => 0,
            })
        };
        let per: Vec<(u32, u8, f64)> = t
            .top_grouped(0, 10, &group)
            .into_iter()
            .map(|(g, d)| match d.addr {
                IpAddr::V4(a) => (g, a.octets()[3], d.heat),
                IpAddr::V6(_) => unreachable!(),
            })
            .collect();
        assert_eq!(
            per,
            vec![(2, 2, 5.0), (2, 1, 4.0), (1, 1, 3.0), (0, 1, 1.0)]
        );
        // Only scope 7's group.
        let only = t.top_grouped(0, 10, &|s| (s == 7).then_some(1));
        assert_eq!(only.len(), 1);
        assert!((only[0].1.heat - 3.0).abs() < 1e-9);
        // Two scopes in one group are summed.
        let merged = t.top_grouped(0, 10, &|s| (s != 0).then_some(1));
        assert!((merged[0].1.heat - 7.0).abs() < 1e-9, "{merged:?}");
        assert!((merged[1].1.heat - 5.0).abs() < 1e-9, "{merged:?}");
    }
}
