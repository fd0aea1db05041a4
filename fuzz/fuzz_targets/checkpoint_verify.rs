//! What a witness decides about an `add-checkpoint` request (`witness::judge`): the request
//! (`old`, the signed note, the proof) and the witness's newest cosigned size come from the
//! input; the origin's key history holds the fuzzers' test key. And the Merkle proof verifiers
//! on their own, on arbitrary sizes.
//!
//! Properties: nothing panics; a checkpoint is cosigned only if its text is one the key signed
//! (the seeds: node-a's checkpoints of the first ≤ 13 leaves), `old` is the cosigned size, and
//! it extends the cosigned checkpoint (its true root); a consistency proof from a true root
//! verifies only to the true root of the larger size.
#![no_main]

use knhk_agent::{
    receipts::merkle,
    witness::{judge, protocol::AddCheckpoint},
};
use knhk_fuzz::{Input, Tree, TREE};
use libfuzzer_sys::fuzz_target;

fn hashes(bytes: &[u8]) -> Vec<[u8; 32]> {
    bytes
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let old = input.u64();
    let cosigned = input.u8();
    let note = input.field();
    let proof = hashes(input.rest());

    // The Merkle verifiers on their own, on arbitrary sizes and hashes.
    let forged = proof.first().copied().unwrap_or_default();
    let _ = merkle::verify_consistency(&forged, old, &forged, u64::from(cosigned), &proof);
    let _ = merkle::verify_inclusion(&forged, old, note, u64::from(cosigned), &proof);
    let (m, n) = (old % (TREE + 1), u64::from(cosigned) % (TREE + 1));
    if m > 0 && merkle::verify_consistency(&Tree::root(m), m, &forged, n, &proof) {
        assert_eq!(
            forged,
            Tree::root(n),
            "a consistency proof from ({m}, the true root) to ({n}, a forged root) verified"
        );
    }

    let Ok(note) = std::str::from_utf8(note) else {
        return;
    };
    // What the witness cosigned before: nothing, or the true checkpoint of a size ≤ 13.
    let cosigned_size = u64::from(cosigned >> 1) % (TREE + 1);
    let before = (cosigned & 1 == 1 && cosigned_size > 0)
        .then(|| (cosigned_size, Tree::root(cosigned_size)));
    let req = AddCheckpoint {
        old,
        proof: proof.clone(),
        note: note.to_owned(),
    };
    let Ok((text, body)) = judge(&[knhk_fuzz::test_key_record()], before, &req) else {
        return;
    };
    assert!(
        body.size <= TREE && body == knhk_fuzz::checkpoint_body(body.size),
        "a checkpoint the key did not sign was cosigned: {text:?}"
    );
    assert_eq!(text, body.encode());
    let size = before.map_or(0, |(s, _)| s);
    assert_eq!(old, size, "cosigned with a wrong old size");
    assert!(size <= body.size, "a checkpoint smaller than the cosigned one was cosigned");
});
