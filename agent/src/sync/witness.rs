//! What a witness decides about a checkpoint an origin presents, as pure functions. The gRPC
//! handler (`server.rs`) reads what they need from the origin's ledger, calls them, and stores
//! the outcome.

use crate::receipts::{format::Hash, merkle, signer::verify_signature, CheckpointBody, KeyRef};
use std::collections::HashMap;

/// Why a witness refuses a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WitnessError {
    /// The checkpoint is malformed, not the origin's, badly signed, or does not match the
    /// receipts stored here: the origin (or the link) is at fault; nothing is stored.
    #[error("{0}")]
    Invalid(String),
    /// The origin presented a checkpoint that contradicts one seen or cosigned before: a fork.
    /// Both are kept as evidence and nothing is cosigned.
    #[error("fork: {0}")]
    Fork(String),
}

/// A checkpoint as an origin presents it.
#[derive(Debug, Clone, Copy)]
pub struct Presented<'a> {
    /// Its number in the origin's log.
    pub number: u64,
    /// The signed text ([`CheckpointBody::encode`]).
    pub body: &'a str,
    /// DER ECDSA signature over `body`.
    pub signature: &'a [u8],
}

/// Checks a checkpoint on its own: it decodes, is `origin`'s, is signed by a key of the origin's
/// key history (`keys`: key → SubjectPublicKeyInfo DER), and covers no more receipts than the
/// `stored_size` held here. Returns the decoded body.
pub fn check_presented(
    origin: &str,
    cp: &Presented<'_>,
    keys: &HashMap<KeyRef, Vec<u8>>,
    stored_size: u64,
) -> Result<CheckpointBody, WitnessError> {
    let invalid = |m: String| WitnessError::Invalid(m);
    let body = CheckpointBody::decode(cp.body).map_err(|e| invalid(format!("checkpoint: {e}")))?;
    if body.region != origin {
        return Err(invalid(format!(
            "checkpoint: it is of region {:?}, not {origin:?}",
            body.region
        )));
    }
    let public = keys.get(&body.key).ok_or_else(|| {
        invalid(format!(
            "checkpoint: signed by {}, which is not in the key history",
            body.key
        ))
    })?;
    if !verify_signature(public, cp.body.as_bytes(), cp.signature) {
        return Err(invalid(format!(
            "checkpoint {}: its signature does not verify with {}",
            cp.number, body.key
        )));
    }
    if body.size > stored_size {
        return Err(invalid(format!(
            "checkpoint {}: covers {} receipts but only {stored_size} are stored here",
            cp.number, body.size
        )));
    }
    Ok(body)
}

/// What this witness holds of an origin, for the checkpoint being judged.
#[derive(Debug, Clone, Copy)]
pub struct History<'a> {
    /// A checkpoint of the same size seen before, if any.
    pub seen_at_size: Option<&'a CheckpointBody>,
    /// The root of the first `body.size` receipts stored here.
    pub stored_root: Hash,
    /// The last checkpoint cosigned for this origin: (size, root).
    pub cosigned: Option<(u64, Hash)>,
}

/// Checks a checkpoint against what this witness holds: no other checkpoint of the same size
/// (a fork), its root is the root of the receipts stored here, and it extends the last one
/// cosigned (`proof` is the consistency proof from `proof_from_size`).
pub fn check_history(
    origin: &str,
    number: u64,
    body: &CheckpointBody,
    history: &History<'_>,
    proof_from_size: u64,
    proof: &[Hash],
) -> Result<(), WitnessError> {
    if let Some(seen) = history.seen_at_size {
        if seen.root != body.root {
            return Err(WitnessError::Fork(format!(
                "region {origin} presented two different checkpoints of size {}; refusing to cosign (evidence kept)",
                body.size
            )));
        }
    }
    if history.stored_root != body.root {
        return Err(WitnessError::Invalid(format!(
            "checkpoint {number}: its root does not match the {} receipts stored here",
            body.size
        )));
    }
    if let Some((size, root)) = history.cosigned.filter(|(size, _)| *size > 0) {
        let consistent = if body.size == size {
            body.root == root // The same checkpoint again (a re-sent batch).
        } else {
            body.size > size
                && proof_from_size == size
                && merkle::verify_consistency(&root, size, &body.root, body.size, proof)
        };
        if !consistent {
            return Err(WitnessError::Fork(format!(
                "checkpoint {number} of region {origin} is not consistent with the one of size {size} cosigned before"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receipts::signer::{FileSigner, Signer};

    /// A log of `n` leaves in memory, through the ledger's own append path.
    struct Mem(HashMap<(u8, u64), Hash>);

    impl merkle::Nodes for Mem {
        type Error = String;
        fn node(&self, level: u8, index: u64) -> Result<Hash, String> {
            self.0
                .get(&(level, index))
                .copied()
                .ok_or_else(|| format!("missing node ({level}, {index})"))
        }
    }

    fn tree(n: u64) -> Mem {
        let mut mem = Mem(HashMap::new());
        for i in 0..n {
            let leaf = merkle::leaf(&i.to_be_bytes());
            let done = merkle::completed_by_append(i, leaf, |l, x| merkle::Nodes::node(&mem, l, x))
                .expect("append");
            for (l, x, h) in done {
                mem.0.insert((l, x), h);
            }
        }
        mem
    }

    fn root(mem: &Mem, size: u64) -> Hash {
        merkle::root(mem, size).expect("root")
    }

    async fn signed(
        size: u64,
        root: Hash,
        region: &str,
    ) -> (String, Vec<u8>, HashMap<KeyRef, Vec<u8>>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = FileSigner::open(dir.path()).expect("file key");
        let key = signer.current().await.expect("key");
        let body = CheckpointBody {
            node: "n".into(),
            region: region.into(),
            size,
            root,
            cycle: 0,
            time_ns: 1,
            key: key.key.clone(),
        }
        .encode();
        let sig = signer.sign(&key.key, body.as_bytes()).await.expect("sign");
        let keys = HashMap::from([(key.key, key.public_key_der)]);
        (body, sig, keys)
    }

    #[tokio::test]
    async fn a_valid_checkpoint_passes_and_each_fault_is_named() {
        let log = tree(10);
        let (body, sig, keys) = signed(10, root(&log, 10), "east").await;
        let cp = Presented {
            number: 3,
            body: &body,
            signature: &sig,
        };
        let decoded = check_presented("east", &cp, &keys, 10).expect("valid");
        assert_eq!(decoded.size, 10);

        let fault = |r: Result<CheckpointBody, WitnessError>| match r {
            Err(WitnessError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert!(fault(check_presented("west", &cp, &keys, 10)).contains("not \"west\""));
        assert!(fault(check_presented("east", &cp, &keys, 9)).contains("only 9 are stored"));
        assert!(fault(check_presented("east", &cp, &HashMap::new(), 10))
            .contains("not in the key history"));
        let mut bad_sig = sig.clone();
        bad_sig[8] ^= 1;
        let tampered = Presented {
            signature: &bad_sig,
            ..cp
        };
        assert!(fault(check_presented("east", &tampered, &keys, 10)).contains("does not verify"));
        let garbage = Presented {
            body: "not a checkpoint",
            ..cp
        };
        assert!(fault(check_presented("east", &garbage, &keys, 10)).starts_with("checkpoint:"));
    }

    #[tokio::test]
    async fn history_refuses_forks_foreign_roots_and_rewrites() {
        let log = tree(16);
        let (body, _, _) = signed(16, root(&log, 16), "east").await;
        let body = CheckpointBody::decode(&body).expect("decode");
        let at = |n: u64| root(&log, n);
        let proof = merkle::consistency_path(&log, 10, 16).expect("proof");

        // Extends what was cosigned at size 10: accepted.
        let ok = History {
            seen_at_size: None,
            stored_root: body.root,
            cosigned: Some((10, at(10))),
        };
        assert_eq!(check_history("east", 5, &body, &ok, 10, &proof), Ok(()));
        // The same checkpoint again.
        let again = History {
            cosigned: Some((16, body.root)),
            ..ok
        };
        assert_eq!(check_history("east", 5, &body, &again, 16, &[]), Ok(()));

        // Another checkpoint of the same size was seen: a fork.
        let mut other = body.clone();
        other.root = at(15);
        let forked = History {
            seen_at_size: Some(&other),
            ..ok
        };
        assert!(matches!(
            check_history("east", 5, &body, &forked, 10, &proof),
            Err(WitnessError::Fork(_))
        ));
        // The stored receipts have another root: invalid, not a fork.
        let foreign = History {
            stored_root: at(15),
            ..ok
        };
        assert!(matches!(
            check_history("east", 5, &body, &foreign, 10, &proof),
            Err(WitnessError::Invalid(_))
        ));
        // A proof from the wrong size, a bad proof, or a shrinking log: not consistent.
        assert!(matches!(
            check_history("east", 5, &body, &ok, 9, &proof),
            Err(WitnessError::Fork(_))
        ));
        let mut bad = proof.clone();
        bad[0][0] ^= 1;
        assert!(matches!(
            check_history("east", 5, &body, &ok, 10, &bad),
            Err(WitnessError::Fork(_))
        ));
        let shrink = History {
            cosigned: Some((20, at(10))),
            ..ok
        };
        assert!(matches!(
            check_history("east", 5, &body, &shrink, 20, &proof),
            Err(WitnessError::Fork(_))
        ));
    }
}
