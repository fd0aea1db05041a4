//! The RFC 6962 Merkle tree over stored nodes, and proof verification with `ct-merkle`.
//!
//! `ct-merkle`'s tree keeps every leaf and node in memory, which a ledger that must outlive RAM
//! cannot; so the ledger stores the hash of every *perfect* subtree (2^level leaves, aligned) as
//! it appends, and this module computes roots and proofs from those with the recursive
//! definitions of RFC 6962 §2.1 (O(log n) node reads each). Verification uses `ct-merkle`'s
//! independent implementation, and the unit tests check both against its in-memory tree.

use super::format::{leaf_hash, node_hash, Hash};
use ct_merkle::{ConsistencyProof, InclusionProof, RootHash};
use sha2::Sha256;

/// Reads the stored hash of the perfect subtree `(level, index)`: leaves
/// `index·2^level .. (index+1)·2^level`.
pub trait Nodes {
    /// The error of a failed read.
    type Error;
    /// The node, which must exist (it covers leaves that were appended).
    fn node(&self, level: u8, index: u64) -> Result<Hash, Self::Error>;
}

/// The perfect subtrees completed by appending leaf number `n` (0-based) with hash `leaf`:
/// `(level, index, hash)`, the leaf itself first. `left(level, index)` reads earlier nodes.
pub fn completed_by_append<E>(
    n: u64,
    leaf: Hash,
    mut left: impl FnMut(u8, u64) -> Result<Hash, E>,
) -> Result<Vec<(u8, u64, Hash)>, E> {
    let mut out = vec![(0, n, leaf)];
    let (mut level, mut index, mut hash) = (0u8, n, leaf);
    while index % 2 == 1 {
        let sibling = left(level, index - 1)?;
        hash = node_hash(&sibling, &hash);
        level += 1;
        index /= 2;
        out.push((level, index, hash));
    }
    Ok(out)
}

/// The largest power of two strictly below `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// MTH of leaves `start .. start+size` (size ≥ 1).
fn subtree<N: Nodes>(nodes: &N, start: u64, size: u64) -> Result<Hash, N::Error> {
    if size.is_power_of_two() && start.is_multiple_of(size) {
        return nodes.node(size.trailing_zeros() as u8, start / size);
    }
    let k = split(size);
    Ok(node_hash(
        &subtree(nodes, start, k)?,
        &subtree(nodes, start + k, size - k)?,
    ))
}

/// The root of the first `size` leaves (SHA-256 of nothing for an empty tree).
pub fn root<N: Nodes>(nodes: &N, size: u64) -> Result<Hash, N::Error> {
    if size == 0 {
        return Ok(super::format::sha256(b""));
    }
    subtree(nodes, 0, size)
}

/// The audit path of leaf `m` in the tree of `size` leaves, bottom-up (RFC 6962 PATH).
pub fn inclusion_path<N: Nodes>(nodes: &N, m: u64, size: u64) -> Result<Vec<Hash>, N::Error> {
    fn path<N: Nodes>(
        nodes: &N,
        m: u64,
        start: u64,
        n: u64,
        out: &mut Vec<Hash>,
    ) -> Result<(), N::Error> {
        if n <= 1 {
            return Ok(());
        }
        let k = split(n);
        if m < k {
            path(nodes, m, start, k, out)?;
            out.push(subtree(nodes, start + k, n - k)?);
        } else {
            path(nodes, m - k, start + k, n - k, out)?;
            out.push(subtree(nodes, start, k)?);
        }
        Ok(())
    }
    let mut out = Vec::new();
    path(nodes, m, 0, size, &mut out)?;
    Ok(out)
}

/// The consistency proof from the tree of `old` leaves to that of `new` (RFC 6962 PROOF).
pub fn consistency_path<N: Nodes>(nodes: &N, old: u64, new: u64) -> Result<Vec<Hash>, N::Error> {
    fn sub<N: Nodes>(
        nodes: &N,
        m: u64,
        start: u64,
        n: u64,
        complete: bool,
        out: &mut Vec<Hash>,
    ) -> Result<(), N::Error> {
        if m == n {
            if !complete {
                out.push(subtree(nodes, start, n)?);
            }
            return Ok(());
        }
        let k = split(n);
        if m <= k {
            sub(nodes, m, start, k, complete, out)?;
            out.push(subtree(nodes, start + k, n - k)?);
        } else {
            sub(nodes, m - k, start + k, n - k, false, out)?;
            out.push(subtree(nodes, start, k)?);
        }
        Ok(())
    }
    let mut out = Vec::new();
    if old > 0 && old < new {
        sub(nodes, old, 0, new, true, &mut out)?;
    }
    Ok(out)
}

fn ct_root(root: &Hash, size: u64) -> RootHash<Sha256> {
    RootHash::new((*root).into(), size)
}

/// The largest tree size `ct-merkle` computes with: above it, its index arithmetic overflows
/// (it panics with overflow checks, and wraps without them). No ledger comes near it; a proof
/// that names a larger size is refused.
pub const MAX_VERIFIABLE_SIZE: u64 = u64::MAX / 2;

/// Whether `leaf` (the receipt encoding) is number `m` of the tree with `root` and `size`.
/// False, never a panic, for any size, index and path (sizes above [`MAX_VERIFIABLE_SIZE`]
/// included).
pub fn verify_inclusion(root: &Hash, size: u64, leaf: &[u8], m: u64, path: &[Hash]) -> bool {
    if size > MAX_VERIFIABLE_SIZE || m >= size {
        return false;
    }
    let digests: Vec<_> = path.iter().map(|h| (*h).into()).collect();
    let proof = InclusionProof::<Sha256>::from_digests(digests.iter());
    ct_root(root, size)
        .verify_inclusion(&leaf, m, &proof)
        .is_ok()
}

/// Whether the tree (`old_root`, `old`) is a prefix of (`new_root`, `new`). False, never a
/// panic, for any sizes and path (sizes above [`MAX_VERIFIABLE_SIZE`] included).
pub fn verify_consistency(
    old_root: &Hash,
    old: u64,
    new_root: &Hash,
    new: u64,
    path: &[Hash],
) -> bool {
    if old == new {
        return old_root == new_root && path.is_empty();
    }
    if new > MAX_VERIFIABLE_SIZE || old > new {
        return false;
    }
    let digests: Vec<_> = path.iter().map(|h| (*h).into()).collect();
    let proof = ConsistencyProof::<Sha256>::from_digests(digests.iter());
    ct_root(new_root, new)
        .verify_consistency(&ct_root(old_root, old), &proof)
        .is_ok()
}

/// The leaf hash of a receipt encoding (re-exported for callers of this module).
pub fn leaf(encoding: &[u8]) -> Hash {
    leaf_hash(encoding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ct_merkle::mem_backed_tree::MemoryBackedTree;
    use std::collections::HashMap;

    struct Mem(HashMap<(u8, u64), Hash>);

    impl Nodes for Mem {
        type Error = String;
        fn node(&self, level: u8, index: u64) -> Result<Hash, String> {
            self.0
                .get(&(level, index))
                .copied()
                .ok_or_else(|| format!("missing node ({level}, {index})"))
        }
    }

    fn build(n: u64) -> (Mem, MemoryBackedTree<Sha256, Vec<u8>>) {
        let mut mem = Mem(HashMap::new());
        let mut reference = MemoryBackedTree::<Sha256, Vec<u8>>::new();
        for i in 0..n {
            let value = format!("receipt {i}").into_bytes();
            let done =
                completed_by_append(i, leaf_hash(&value), |l, x| mem.node(l, x)).expect("append");
            for (l, x, h) in done {
                mem.0.insert((l, x), h);
            }
            reference.push(value);
        }
        (mem, reference)
    }

    #[test]
    fn roots_and_proofs_match_ct_merkle() {
        let (mem, reference) = build(70);
        for size in 1..=70u64 {
            let mut prefix = MemoryBackedTree::<Sha256, Vec<u8>>::new();
            for v in &reference.items()[..size as usize] {
                prefix.push(v.clone());
            }
            let r = root(&mem, size).expect("root");
            assert_eq!(&r[..], &prefix.root().as_bytes()[..], "root of {size}");
            for m in [0, size / 2, size - 1] {
                let path = inclusion_path(&mem, m, size).expect("path");
                let theirs = prefix.prove_inclusion(m as usize);
                let ours: Vec<u8> = path.iter().flatten().copied().collect();
                assert_eq!(ours, theirs.as_bytes(), "inclusion {m} of {size}");
                let leaf_value = &reference.items()[m as usize];
                assert!(verify_inclusion(&r, size, leaf_value, m, &path));
                assert!(!verify_inclusion(&r, size, b"forged", m, &path));
            }
            for old in [1, size / 2, size.saturating_sub(1)] {
                if old == 0 || old >= size {
                    continue;
                }
                let path = consistency_path(&mem, old, size).expect("consistency");
                let theirs = prefix.prove_consistency((size - old) as usize);
                let ours: Vec<u8> = path.iter().flatten().copied().collect();
                assert_eq!(ours, theirs.as_bytes(), "consistency {old} → {size}");
                let old_root = root(&mem, old).expect("old root");
                assert!(verify_consistency(&old_root, old, &r, size, &path));
                let mut forged = old_root;
                forged[0] ^= 1;
                assert!(!verify_consistency(&forged, old, &r, size, &path));
            }
        }
    }

    /// Found by the `checkpoint_verify` fuzz target: a proof naming a tree of more than 2^63
    /// leaves made ct-merkle's index arithmetic overflow (a panic with overflow checks, a
    /// wrapped index without). Such proofs are refused.
    #[test]
    fn proofs_of_absurd_sizes_are_refused_without_a_panic() {
        let h = [7u8; 32];
        for size in [MAX_VERIFIABLE_SIZE + 1, u64::MAX - 1, u64::MAX] {
            assert!(!verify_inclusion(&h, size, b"leaf", 0, &[h]));
            assert!(!verify_inclusion(&h, size, b"leaf", size - 1, &[h; 64]));
            assert!(!verify_consistency(&h, 1, &h, size, &[h]));
            assert!(!verify_consistency(&h, size - 1, &h, size, &[h; 3]));
        }
        assert!(!verify_consistency(&h, 5, &h, 3, &[h]));
        assert!(!verify_inclusion(&h, 3, b"leaf", 3, &[h]));
    }
}
