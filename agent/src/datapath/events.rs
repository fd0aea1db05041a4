//! Verdict events from the kernel's ring buffer, reported with rule and cgroup names.
//!
//! The programs send a [`knhk_abi::VerdictEvent`] for decisions other than allow, at most one
//! per rule per [`super::EVENT_INTERVAL`]; a full ring drops events in the kernel (counted).
//! [`VerdictRing::drain`] reads what is there without blocking; its file descriptor becomes
//! readable when events arrive, so a reader can wait on it.

use super::*;
use crate::model::Verdict;
use aya::maps::RingBuf;
use std::{
    net::{IpAddr, Ipv6Addr},
    os::fd::BorrowedFd,
    time::SystemTime,
};

/// The reading end of the verdict ring.
pub struct VerdictRing {
    ring: RingBuf<MapData>,
    names: CgroupNames,
}

impl std::fmt::Debug for VerdictRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerdictRing").finish_non_exhaustive()
    }
}

impl VerdictRing {
    /// Opens the ring pinned under `layout`; cgroups are named relative to `cgroup_root`.
    pub fn open(layout: &PinLayout, cgroup_root: &Path) -> Result<Self, DatapathError> {
        let path = layout.map(map_names::EVENTS);
        let data = MapData::from_pin(&path).map_err(map_err("open pin", map_names::EVENTS))?;
        let ring = RingBuf::try_from(aya::maps::Map::RingBuf(data))
            .map_err(map_err("open", map_names::EVENTS))?;
        Ok(VerdictRing {
            ring,
            names: CgroupNames::new(cgroup_root),
        })
    }

    /// Up to `max` verdicts waiting in the ring, oldest first, without blocking. `rules` names
    /// the live policy's rules by counter id.
    pub fn drain(&mut self, max: usize, rules: &HashMap<u32, String>) -> Vec<Verdict> {
        let mut raw = Vec::new();
        while raw.len() < max {
            let Some(item) = self.ring.next() else { break };
            if item.len() >= size_of::<VerdictEvent>() {
                // SAFETY: the kernel wrote a whole `VerdictEvent` (a plain-integer type);
                // the read is unaligned-safe.
                raw.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<VerdictEvent>()) });
            }
        }
        raw.iter()
            .map(|e| Verdict {
                at: SystemTime::now(),
                cgroup: self.names.name(e.cgroup_id),
                destination: destination(&e.addr),
                port: e.port,
                protocol: protocol_name(e.proto),
                action: abi::decision_name(e.action),
                class: abi::class_of(e.class),
                rule: (e.counter != 0)
                    .then(|| rules.get(&e.counter).cloned())
                    .flatten(),
                generation: e.generation,
                hook: abi::hook_name(e.hook),
                pod: None,
            })
            .collect()
    }

    /// The ring's file descriptor: readable when events are waiting.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

/// An address as the programs carry it (IPv4 as `::ffff:a.b.c.d`), IPv4 reported as IPv4.
fn destination(addr: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Cgroup ids to paths below the cgroup root, from a walk of the tree, redone on a miss at most
/// once per [`CgroupNames::RESCAN`].
#[derive(Debug)]
struct CgroupNames {
    root: PathBuf,
    names: HashMap<u64, String>,
    scanned: Option<Instant>,
}

impl CgroupNames {
    const RESCAN: Duration = Duration::from_secs(1);
    /// A tree larger than this is not walked further (the rest are named by id).
    const MAX_CGROUPS: usize = 65_536;

    fn new(root: &Path) -> Self {
        CgroupNames {
            root: root.to_owned(),
            names: HashMap::new(),
            scanned: None,
        }
    }

    fn name(&mut self, id: u64) -> String {
        if let Some(n) = self.names.get(&id) {
            return n.clone();
        }
        if self.scanned.is_none_or(|t| t.elapsed() >= Self::RESCAN) {
            self.scan();
        }
        self.names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("cgroup id {id}"))
    }

    fn scan(&mut self) {
        use std::os::unix::fs::MetadataExt;
        self.scanned = Some(Instant::now());
        self.names.clear();
        let mut stack = vec![(self.root.clone(), String::from("."))];
        while let Some((dir, rel)) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            self.names.insert(meta.ino(), rel.clone());
            if self.names.len() >= Self::MAX_CGROUPS {
                break;
            }
            // A directory that vanished or cannot be read is simply not named.
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let child = if rel == "." {
                        name
                    } else {
                        format!("{rel}/{name}")
                    };
                    stack.push((e.path(), child));
                }
            }
        }
    }
}
