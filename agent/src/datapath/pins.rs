//! The pin directory and the compatibility check that aya does not do.
//!
//! Layout: `<pin_root>/v<ABI_VERSION>/maps/<MAP>` and `<pin_root>/v<ABI_VERSION>/links/<program>`.
//! A new ABI version pins into a new directory, so an upgrade never reuses maps of another
//! layout. Within one version, every pinned map is checked against [`expected_maps`] before it
//! is re-adopted: maps holding policy must match or the agent refuses to start; maps holding only
//! soft state (counters, heat, latency) are recreated, which resets them.

use knhk_abi::{map_names as m, *};
use std::path::{Path, PathBuf};

/// Paths of the pins of one ABI version.
#[derive(Debug, Clone)]
pub struct PinLayout {
    /// `<pin_root>/v<ABI_VERSION>`.
    pub dir: PathBuf,
}

impl PinLayout {
    /// The layout under `pin_root` for this build's ABI.
    pub fn new(pin_root: &Path) -> Self {
        Self {
            dir: pin_root.join(format!("v{ABI_VERSION}")),
        }
    }

    /// Directory of map pins.
    pub fn maps_dir(&self) -> PathBuf {
        self.dir.join("maps")
    }

    /// Pin of map `name`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Directory of link pins.
    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    /// Pin of the link of program `name`.
    pub fn link(&self, name: &str) -> PathBuf {
        self.links_dir().join(name)
    }
}

// bpf_map_type numbers (include/uapi/linux/bpf.h).
const HASH: u32 = 1;
const ARRAY: u32 = 2;
const PERCPU_ARRAY: u32 = 6;
const LRU_HASH: u32 = 9;
const LPM_TRIE: u32 = 11;
const SK_STORAGE: u32 = 24;

/// What a map must look like to be re-adopted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSpec {
    /// Map name.
    pub name: &'static str,
    /// `bpf_map_type`.
    pub map_type: u32,
    /// Key size, bytes.
    pub key_size: u32,
    /// Value size, bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// Creation flags.
    pub flags: u32,
    /// Whether it holds only soft state that may be reset by recreating it.
    pub soft: bool,
}

const fn size<T>() -> u32 {
    size_of::<T>() as u32
}

/// The maps of this ABI, as the kernel reports them once created.
pub fn expected_maps(heat_max_entries: u32) -> [MapSpec; 14] {
    let spec = |name, map_type, key_size, value_size, max_entries, flags, soft| MapSpec {
        name,
        map_type,
        key_size,
        value_size,
        max_entries,
        flags,
        soft,
    };
    [
        spec(
            m::CONFIG,
            ARRAY,
            4,
            size::<Config>(),
            1,
            BPF_F_MMAPABLE,
            false,
        ),
        spec(
            m::POLICY_V4,
            LPM_TRIE,
            4 + size::<LpmKeyV4>(),
            size::<RuleLeaf>(),
            MAX_PREFIXES,
            BPF_F_NO_PREALLOC,
            false,
        ),
        spec(
            m::POLICY_V6,
            LPM_TRIE,
            4 + size::<LpmKeyV6>(),
            size::<RuleLeaf>(),
            MAX_PREFIXES,
            BPF_F_NO_PREALLOC,
            false,
        ),
        spec(
            m::SCOPES,
            HASH,
            size::<ScopeKey>(),
            size::<ScopeValue>(),
            MAX_SCOPES,
            0,
            false,
        ),
        spec(m::DECISIONS, PERCPU_ARRAY, 4, 8, DECISION_COUNTERS, 0, true),
        spec(
            m::RULE_HITS,
            ARRAY,
            4,
            8,
            MAX_RULE_COUNTERS,
            BPF_F_MMAPABLE,
            true,
        ),
        spec(
            m::HEAT,
            LRU_HASH,
            size::<HeatKey>(),
            size::<HeatValue>(),
            heat_max_entries,
            0,
            true,
        ),
        spec(
            m::CONNS,
            SK_STORAGE,
            4,
            size::<ConnState>(),
            0,
            BPF_F_NO_PREALLOC,
            true,
        ),
        spec(m::SAMPLED, PERCPU_ARRAY, 4, 8, CLASSES as u32, 0, true),
        spec(
            m::CLASS_STATE,
            ARRAY,
            4,
            size::<ClassControl>(),
            CLASSES as u32,
            BPF_F_MMAPABLE,
            true,
        ),
        spec(
            m::BUDGETS,
            ARRAY,
            4,
            8,
            CLASSES as u32,
            BPF_F_MMAPABLE,
            true,
        ),
        spec(m::HEAT_INSERTS, PERCPU_ARRAY, 4, 8, 1, 0, true),
        spec(
            m::PARK,
            HASH,
            4,
            size::<ParkTarget>(),
            MAX_PARK_TARGETS,
            0,
            false,
        ),
        spec(
            m::LATENCY,
            PERCPU_ARRAY,
            4,
            size::<Histogram>(),
            HISTOGRAMS as u32,
            0,
            true,
        ),
    ]
}

/// What a pinned map actually looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedShape {
    /// `bpf_map_type`.
    pub map_type: u32,
    /// Key size, bytes.
    pub key_size: u32,
    /// Value size, bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// Creation flags.
    pub flags: u32,
}

/// The differences between `spec` and `actual`, as readable phrases (empty when compatible).
pub fn differences(spec: &MapSpec, actual: &PinnedShape) -> Vec<String> {
    let mut out = Vec::new();
    let mut cmp = |what: &str, want: u32, got: u32| {
        if want != got {
            out.push(format!("{what} is {got}, expected {want}"));
        }
    };
    cmp("map type", spec.map_type, actual.map_type);
    cmp("key size", spec.key_size, actual.key_size);
    cmp("value size", spec.value_size, actual.value_size);
    cmp("max entries", spec.max_entries, actual.max_entries);
    cmp("flags", spec.flags, actual.flags);
    out
}

/// Reads the shape of the map pinned at `path`; `Ok(None)` when nothing is pinned there.
pub fn pinned_shape(path: &Path) -> std::io::Result<Option<PinnedShape>> {
    if !path.exists() {
        return Ok(None);
    }
    let info = aya::maps::MapInfo::from_pin(path).map_err(std::io::Error::other)?;
    Ok(Some(PinnedShape {
        map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_mismatch() {
        let spec = expected_maps(100)[1];
        let mut shape = PinnedShape {
            map_type: spec.map_type,
            key_size: spec.key_size,
            value_size: spec.value_size,
            max_entries: spec.max_entries,
            flags: spec.flags,
        };
        assert!(differences(&spec, &shape).is_empty());
        shape.value_size += 8;
        shape.max_entries = 7;
        let d = differences(&spec, &shape);
        assert_eq!(d.len(), 2);
        assert!(d[0].starts_with("value size is"), "{d:?}");
        assert!(d[1].contains("max entries is 7"), "{d:?}");
    }

    #[test]
    fn layout_is_versioned() {
        let l = PinLayout::new(Path::new("/sys/fs/bpf/knhk"));
        assert_eq!(
            l.map("KNHK_HEAT"),
            Path::new(&format!("/sys/fs/bpf/knhk/v{ABI_VERSION}/maps/KNHK_HEAT"))
        );
        assert_eq!(
            l.link("knhk_connect4"),
            Path::new(&format!(
                "/sys/fs/bpf/knhk/v{ABI_VERSION}/links/knhk_connect4"
            ))
        );
    }
}
