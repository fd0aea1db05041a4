//! What a witness decides about a checkpoint an origin presents (`sync::witness`): the
//! checkpoint's text, signature, number and the witness's stored size come from the input; the
//! origin's key history holds the fuzzers' test key. Then the history check (fork, stored root,
//! consistency with the last cosigned checkpoint) on a real tree, with a proof from the input;
//! and the Merkle proof verifiers on their own, on arbitrary sizes.
//!
//! Properties: nothing panics; a checkpoint is accepted only if it is a text the key signed
//! (the seeds: node-a's checkpoints of the first ≤ 13 leaves); the history check accepts only
//! the true root of the stored receipts; a consistency proof from a true root verifies only to
//! the true root of the larger size.
#![no_main]

use knhk_agent::{
    receipts::{merkle, CheckpointBody, KeyRef},
    sync::witness::{check_history, check_presented, History, Presented},
};
use knhk_fuzz::{Input, Tree, ORIGIN, TREE};
use libfuzzer_sys::fuzz_target;
use std::{collections::HashMap, sync::OnceLock};

fn keys() -> &'static HashMap<KeyRef, Vec<u8>> {
    static KEYS: OnceLock<HashMap<KeyRef, Vec<u8>>> = OnceLock::new();
    KEYS.get_or_init(|| HashMap::from([(knhk_fuzz::test_key_ref(), knhk_fuzz::test_public_der())]))
}

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
    let number = input.u64();
    let stored_size = input.u64();
    let body = input.field();
    let signature = input.field();
    let cosigned = input.u8();
    let proof_from = input.u64();
    let proof = hashes(input.rest());

    // The Merkle verifiers on their own, on arbitrary sizes and hashes.
    let forged = proof.first().copied().unwrap_or_default();
    let _ = merkle::verify_consistency(&forged, number, &forged, stored_size, &proof);
    let _ = merkle::verify_inclusion(&forged, stored_size, body, number, &proof);
    // On the real tree: from a true root, a consistency proof verifies only to the true root.
    let (m, n) = (number % (TREE + 1), proof_from % (TREE + 1));
    if m > 0 && merkle::verify_consistency(&Tree::root(m), m, &forged, n, &proof) {
        assert_eq!(
            forged,
            Tree::root(n),
            "a consistency proof from ({m}, the true root) to ({n}, a forged root) verified"
        );
    }

    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    let presented = Presented {
        number,
        body: text,
        signature,
    };
    let Ok(cp) = check_presented(ORIGIN, &presented, keys(), stored_size) else {
        return;
    };
    // Accepted: it must be one of the bodies the test key signed, unchanged.
    assert!(cp.size <= stored_size);
    assert!(
        cp.size <= TREE && cp == knhk_fuzz::checkpoint_body(cp.size),
        "a checkpoint the key did not sign was accepted: {text:?}"
    );
    // A checkpoint of the same size seen before (the same or a forked one), the last one
    // cosigned, and a proof from the input.
    let seen: Option<CheckpointBody> = (cosigned & 1 == 1).then(|| CheckpointBody {
        root: if cosigned & 2 == 2 {
            forged
        } else {
            Tree::root(cp.size)
        },
        ..cp.clone()
    });
    let cosigned_size = u64::from(cosigned >> 2) % (TREE + 1);
    let history = History {
        seen_at_size: seen.as_ref(),
        stored_root: Tree::root(cp.size),
        cosigned: Some((cosigned_size, Tree::root(cosigned_size))),
    };
    if check_history(ORIGIN, number, &cp, &history, proof_from, &proof).is_ok() {
        assert_eq!(cp.root, Tree::root(cp.size), "a wrong root was accepted");
        if let Some(s) = &seen {
            assert_eq!(s.root, cp.root, "a fork was cosigned");
        }
        assert!(
            cosigned_size <= cp.size,
            "a checkpoint smaller than the one cosigned was accepted"
        );
    }
});
