//! Cache heat per destination, from the kernel's heat LRU: decayed heat, top-N and rising
//! destinations.
//!
//! Reading the whole LRU costs about 0.45 µs per entry, far too much for one beat, so the engine
//! walks it incrementally: each beat reads the next chunk (one batch syscall) and folds it in
//! here. Heat decays exponentially per beat (`half_life_beats`), applied lazily from the beat an
//! entry was last visited: `heat = heat × d^(beats since) + new attempts`. The rate of new
//! attempts per beat between two visits gives the derivative; a destination whose rate grew is
//! *rising* (a preload hint). A destination not seen during a whole walk left the kernel map
//! (evicted), and is dropped.

use crate::datapath::HeatEntry;
use std::{collections::HashMap, net::IpAddr};

/// A destination and its heat.
#[derive(Debug, Clone, PartialEq)]
pub struct HotDestination {
    /// Address.
    pub addr: IpAddr,
    /// Port.
    pub port: u16,
    /// IPPROTO number.
    pub proto: u8,
    /// Decayed attempts as of the beat asked about.
    pub heat: f64,
    /// Change of the attempt rate (attempts per beat) between the last two visits.
    pub rising: f64,
}

#[derive(Debug, Clone)]
struct Tracked {
    attempts: u64,
    heat: f64,
    rate: f64,
    rising: f64,
    last_beat: u64,
    walk: u64,
}

type Key = (IpAddr, u16, u8);

/// The tracker: pure state, fed with chunks of the kernel map.
#[derive(Debug, Clone)]
pub struct HeatTracker {
    table: HashMap<Key, Tracked>,
    decay_per_beat: f64,
    walk: u64,
}

impl HeatTracker {
    /// A tracker whose heat halves every `half_life_beats` beats.
    pub fn new(half_life_beats: f64) -> Self {
        HeatTracker {
            table: HashMap::new(),
            decay_per_beat: 0.5f64.powf(1.0 / half_life_beats.max(1e-9)),
            walk: 0,
        }
    }

    /// Folds in entries read at `beat`; `walk_done` says the chunk ended a walk of the map.
    pub fn observe(&mut self, beat: u64, entries: &[HeatEntry], walk_done: bool) {
        for e in entries {
            let key = (e.addr, e.port, e.proto);
            let walk = self.walk;
            let decay = self.decay_per_beat;
            match self.table.get_mut(&key) {
                Some(t) => {
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
        if walk_done {
            let finished = self.walk;
            self.table.retain(|_, t| t.walk == finished);
            self.walk += 1;
        }
    }

    /// Destinations tracked (after a full walk: the kernel map's entries).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    fn snapshot(&self, beat: u64) -> Vec<HotDestination> {
        self.table
            .iter()
            .map(|((addr, port, proto), t)| HotDestination {
                addr: *addr,
                port: *port,
                proto: *proto,
                heat: t.heat
                    * self
                        .decay_per_beat
                        .powi(beat.saturating_sub(t.last_beat).min(i32::MAX as u64) as i32),
                rising: t.rising,
            })
            .collect()
    }

    /// The `n` hottest destinations as of `beat`, hottest first.
    pub fn top(&self, beat: u64, n: usize) -> Vec<HotDestination> {
        let mut all = self.snapshot(beat);
        all.sort_by(|a, b| {
            b.heat
                .total_cmp(&a.heat)
                .then(a.addr.cmp(&b.addr))
                .then(a.port.cmp(&b.port))
        });
        all.truncate(n);
        all
    }

    /// Up to `n` destinations whose attempt rate grew, fastest growth first.
    pub fn rising(&self, beat: u64, n: usize) -> Vec<HotDestination> {
        let mut all: Vec<_> = self
            .snapshot(beat)
            .into_iter()
            .filter(|d| d.rising > 0.0)
            .collect();
        all.sort_by(|a, b| b.rising.total_cmp(&a.rising).then(a.addr.cmp(&b.addr)));
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(last: u8, attempts: u64) -> HeatEntry {
        HeatEntry {
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
        // A recreated kernel entry (fewer attempts than tracked) counts its attempts as new.
        t.observe(3, &[entry(2, 1)], true);
        let d = 0.5f64.powf(0.1);
        assert!((t.top(3, 1)[0].heat - ((d + 2.0) * d + 1.0)).abs() < 1e-6);
    }
}
