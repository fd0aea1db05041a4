//! The witness's wire formats: C2SP `tlog-witness` `add-checkpoint` and knhk's key
//! registration (byte by byte in `docs/multi-region.md`).

use crate::receipts::{format::Hash, KeyRecord};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};

/// Path of `add-checkpoint` (C2SP tlog-witness).
pub const ADD_CHECKPOINT: &str = "/add-checkpoint";
/// Path of a log's key registration (knhk).
pub const LOG_KEYS: &str = "/knhk/v1/log-keys";
/// Path of the witness's own verifier key (knhk).
pub const WITNESS_KEY: &str = "/knhk/v1/witness-key";
/// Path of the per-origin state listing (knhk).
pub const ORIGINS: &str = "/knhk/v1/origins";
/// Content type of a 409's body: the witness's size for the origin, in decimal, and `\n`.
pub const SIZE_CONTENT_TYPE: &str = "text/x.tlog.size";
/// The most consistency-proof lines a request may carry (a tree of 2^63 leaves needs 63).
pub const MAX_PROOF_LINES: usize = 63;
/// The largest request body a witness reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// An `add-checkpoint` request: `old <size>\n`, one base64 proof hash per line, a blank line,
/// then the signed checkpoint note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddCheckpoint {
    /// The size of the checkpoint the client believes the witness holds.
    pub old: u64,
    /// Consistency proof from `old` to the new checkpoint.
    pub proof: Vec<Hash>,
    /// The signed note.
    pub note: String,
}

impl AddCheckpoint {
    /// The request body.
    pub fn encode(&self) -> String {
        let mut out = format!("old {}\n", self.old);
        for h in &self.proof {
            out.push_str(&B64.encode(h));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&self.note);
        out
    }

    /// Parses a request body; the error names what is malformed.
    pub fn parse(body: &str) -> Result<AddCheckpoint, String> {
        let (head, note) = body
            .split_once("\n\n")
            .ok_or_else(|| "no blank line between the proof and the checkpoint".to_owned())?;
        let mut lines = head.split('\n');
        let old = lines
            .next()
            .and_then(|l| l.strip_prefix("old "))
            .and_then(|n| {
                // Decimal without leading zeros.
                (n == "0" || !n.starts_with('0')).then(|| n.parse::<u64>().ok())?
            })
            .ok_or_else(|| "the first line is not \"old <size>\"".to_owned())?;
        let mut proof = Vec::new();
        for (i, l) in lines.enumerate() {
            if i >= MAX_PROOF_LINES {
                return Err(format!("the proof has more than {MAX_PROOF_LINES} lines"));
            }
            let h: Hash = B64
                .decode(l)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| format!("proof line {} is not a base64 SHA-256 hash", i + 1))?;
            proof.push(h);
        }
        Ok(AddCheckpoint {
            old,
            proof,
            note: note.to_owned(),
        })
    }
}

/// A log's key registration: its origin and its key history, oldest first, each key after the
/// first handed over by a transition statement signed with the previous one (JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogKeys {
    /// The log's origin.
    pub origin: String,
    /// Its keys.
    pub keys: Vec<KeyRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_checkpoint_round_trips_and_malformed_bodies_are_named() {
        let req = AddCheckpoint {
            old: 7,
            proof: vec![[1; 32], [2; 32]],
            note: "o\n9\nAAAA\n\n— o AAAAAAA=\n".into(),
        };
        assert_eq!(AddCheckpoint::parse(&req.encode()), Ok(req.clone()));
        let empty = AddCheckpoint {
            old: 0,
            proof: vec![],
            note: "x".into(),
        };
        assert_eq!(AddCheckpoint::parse(&empty.encode()), Ok(empty));
        for bad in ["old 1\nAAAA\n\nx", "old 01\n\nx", "new 1\n\nx", "old 1\nx"] {
            assert!(AddCheckpoint::parse(bad).is_err(), "{bad:?}");
        }
    }
}
