//! The two policy tries, IPv4 and IPv6, behind one interface: an address family says how its
//! prefixes become trie keys, and [`PolicyTrie`] writes, removes and lists them the same way
//! for both.

use super::*;
use std::os::fd::OwnedFd;

/// An address family of the policy tries: its prefix type, key and map.
pub(super) trait Family: Copy + std::fmt::Debug {
    /// The trie's key data (`knhk_abi::LpmKeyV4` / `LpmKeyV6`).
    type Key: aya::Pod;
    /// The map's name.
    const MAP: &'static str;
    /// The key of `net` in `slot` for `scope`.
    fn key(slot: u32, scope: u64, net: &Self) -> Key<Self::Key>;
    /// (slot, scope, prefix) of a key read back from the map.
    fn parse(key: &Key<Self::Key>) -> Option<(u32, u64, Self)>;
}

impl Family for Ipv4Net {
    type Key = LpmKeyV4;
    const MAP: &'static str = map_names::POLICY_V4;

    fn key(slot: u32, scope: u64, net: &Self) -> Key<LpmKeyV4> {
        let data = LpmKeyV4 {
            slot,
            _pad: 0,
            scope,
            addr: net.network().octets(),
        };
        Key::new(LPM_FIXED_BITS + u32::from(net.prefix_len()), data)
    }

    fn parse(key: &Key<LpmKeyV4>) -> Option<(u32, u64, Self)> {
        let data = key.data();
        let len = key.prefix_len().saturating_sub(LPM_FIXED_BITS) as u8;
        // A key that is not a prefix is not ours: skipped.
        let net = Ipv4Net::new(data.addr.into(), len).ok()?;
        Some((data.slot, data.scope, net))
    }
}

impl Family for Ipv6Net {
    type Key = LpmKeyV6;
    const MAP: &'static str = map_names::POLICY_V6;

    fn key(slot: u32, scope: u64, net: &Self) -> Key<LpmKeyV6> {
        let data = LpmKeyV6 {
            slot,
            _pad: 0,
            scope,
            addr: net.network().octets(),
        };
        Key::new(LPM_FIXED_BITS + u32::from(net.prefix_len()), data)
    }

    fn parse(key: &Key<LpmKeyV6>) -> Option<(u32, u64, Self)> {
        let data = key.data();
        let len = key.prefix_len().saturating_sub(LPM_FIXED_BITS) as u8;
        // A key that is not a prefix is not ours: skipped.
        let net = Ipv6Net::new(data.addr.into(), len).ok()?;
        Some((data.slot, data.scope, net))
    }
}

/// One policy trie, with a duplicate of its fd for batch writes (aya 0.14 has none).
pub(super) struct PolicyTrie<N: Family> {
    map: LpmTrie<MapData, N::Key, RuleLeaf>,
    fd: OwnedFd,
}

impl<N: Family> PolicyTrie<N> {
    /// Opens the trie of `map`; `path` names its pin in errors.
    pub(super) fn open(map: MapData, path: &Path) -> Result<Self, DatapathError> {
        let fd = map
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(io_err("dup", path))?;
        let map =
            LpmTrie::try_from(aya::maps::Map::LpmTrie(map)).map_err(map_err("open", N::MAP))?;
        Ok(PolicyTrie { map, fd })
    }

    /// Writes `entries` of `scope` into `slot`: batched (thousands per syscall) where the kernel
    /// supports it, else one by one. `first_chunks[i]` is the id of entry `i`'s first overflow
    /// chunk, already written.
    pub(super) fn write(
        &mut self,
        slot: u32,
        scope: u64,
        entries: &[(N, CompiledLeaf)],
        first_chunks: &[u32],
    ) -> Result<(), DatapathError> {
        if entries.is_empty() {
            return Ok(());
        }
        let keys: Vec<Key<N::Key>> = entries
            .iter()
            .map(|(n, _)| N::key(slot, scope, n))
            .collect();
        let leaves: Vec<RuleLeaf> = entries
            .iter()
            .zip(first_chunks)
            .map(|((_, l), first)| RuleLeaf {
                first_chunk: *first,
                chunks: l.overflow.len() as u32,
                ..l.leaf
            })
            .collect();
        let batched =
            sys::update_batch(self.fd.as_fd(), &keys, &leaves).map_err(|e| DatapathError::Map {
                op: "batch update",
                map: N::MAP,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_batch",
                    io_error: e,
                }),
            })?;
        tracing::trace!(map = N::MAP, batched, entries = entries.len(), "trie write");
        if !batched {
            for (key, leaf) in keys.iter().zip(&leaves) {
                self.map
                    .insert(key, leaf, 0)
                    .map_err(map_err("insert", N::MAP))?;
            }
        }
        Ok(())
    }

    /// Removes prefixes of `scope` from `slot`, last first, at most `budget` of them; returns
    /// the budget left. An entry already gone is not an error.
    pub(super) fn remove(
        &mut self,
        slot: u32,
        scope: u64,
        nets: &mut Vec<N>,
        mut budget: usize,
    ) -> Result<usize, DatapathError> {
        while budget > 0 {
            let Some(net) = nets.pop() else { break };
            ignore_missing(self.map.remove(&N::key(slot, scope, &net)))
                .map_err(map_err("remove", N::MAP))?;
            budget -= 1;
        }
        Ok(budget)
    }

    /// The leaf the kernel finds for `net`'s address in `slot` and `scope` (a longest-prefix
    /// lookup), if any.
    pub(super) fn get(
        &self,
        slot: u32,
        scope: u64,
        net: &N,
    ) -> Result<Option<RuleLeaf>, DatapathError> {
        match self.map.get(&N::key(slot, scope, net), 0) {
            Ok(leaf) => Ok(Some(leaf)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("lookup", N::MAP)(e)),
        }
    }

    /// Every (slot, scope, prefix) in the trie.
    pub(super) fn entries(&self) -> Result<Vec<(u32, u64, N)>, DatapathError> {
        let mut out = Vec::new();
        for key in self.map.keys() {
            let key = key.map_err(map_err("iterate", N::MAP))?;
            out.extend(N::parse(&key));
        }
        Ok(out)
    }
}
