//! The ledger's byte formats as a verifier or a witness reads them: receipt encodings (Merkle
//! leaves), checkpoint bodies, key references, key records with their transition statements,
//! stored checkpoints, fingerprints, C2SP signed notes and `add-checkpoint` requests. The first
//! byte picks the decoder. Whatever decodes
//! re-encodes to exactly the input (the formats are canonical), and nothing panics.
#![no_main]

use knhk_agent::note::{self, Cosignature};
use knhk_agent::{
    receipts::{
        format::{parse_fingerprint, CheckpointBody, KeyRef, Receipt},
        ledger::{KeyRecord, StoredCheckpoint},
    },
    witness::protocol::AddCheckpoint,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 7 {
        0 => {
            if let Ok(r) = Receipt::decode(rest) {
                assert_eq!(r.encode(), rest, "a receipt is not canonical");
            }
        }
        1 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(body) = CheckpointBody::decode(text) {
                    assert_eq!(body.encode(), text, "a checkpoint body is not canonical");
                }
            }
        }
        2 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Some(k) = KeyRef::parse(text) {
                    assert_eq!(KeyRef::parse(&k.to_string()), Some(k));
                }
                if let Some(f) = parse_fingerprint(text) {
                    assert_eq!(parse_fingerprint(&f).as_ref(), Some(&f));
                    assert_eq!(f.len(), 71);
                }
            }
        }
        3 => {
            if let Ok(k) = serde_json::from_slice::<KeyRecord>(rest) {
                let again = serde_json::to_vec(&k).expect("a key record serializes");
                let back: KeyRecord = serde_json::from_slice(&again).expect("and parses back");
                assert_eq!(back, k);
            }
        }
        5 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok((body, lines)) = note::parse(text) {
                    assert_eq!(note::render(&body, &lines), text, "a note is not canonical");
                    for l in &lines {
                        if let Ok(c) = Cosignature::from_line(l) {
                            assert_eq!(&c.line(), l);
                        }
                    }
                }
            }
        }
        6 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(req) = AddCheckpoint::parse(text) {
                    assert_eq!(AddCheckpoint::parse(&req.encode()), Ok(req));
                }
            }
        }
        _ => {
            if let Ok(c) = serde_json::from_slice::<StoredCheckpoint>(rest) {
                if let Ok(body) = CheckpointBody::decode(&c.body) {
                    assert_eq!(body.encode(), c.body);
                }
            }
        }
    }
});
