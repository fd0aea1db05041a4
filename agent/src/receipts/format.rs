//! The byte formats a third party needs to verify a ledger (specified in `docs/receipts.md`):
//! receipts (the Merkle leaves), checkpoints (signed tree heads) and key transitions.
//!
//! Hashing follows RFC 6962/9162: leaf hash = SHA-256(0x00 ‖ leaf), node hash =
//! SHA-256(0x01 ‖ left ‖ right). A leaf is a receipt's *header* encoding, which carries the
//! SHA-256 of its payload, so that retention can drop payloads and the tree still verifies.

pub use crate::model::ReceiptKind;
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use sha2::{Digest, Sha256};

/// The version byte of receipt encodings written by this agent.
pub const RECEIPT_VERSION: u8 = 1;
/// First line of a key transition statement.
pub const TRANSITION_HEADER: &str = "knhk-key-transition/v1";

/// A 32-byte SHA-256 digest.
pub type Hash = [u8; 32];

/// A receipt's header: everything but the payload bytes (whose hash it carries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Position in the log, from 0.
    pub seq: u64,
    /// Beat cycle when it was written (0 without a beat engine).
    pub cycle: u64,
    /// What it records.
    pub kind: ReceiptKind,
    /// Wall-clock time, nanoseconds since the Unix epoch.
    pub time_ns: i64,
    /// Live policy generation when it was written.
    pub policy_generation: u64,
    /// Length of the payload, bytes.
    pub payload_len: u32,
    /// SHA-256 of the payload.
    pub payload_hash: Hash,
    /// The node that wrote it.
    pub node: String,
    /// The node's region.
    pub region: String,
    /// The key that signs the checkpoint covering it.
    pub key_id: String,
    /// That key's version.
    pub key_version: u64,
}

/// Why bytes are not a receipt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed receipt encoding: {0}")]
pub struct DecodeError(pub String);

impl Receipt {
    /// The canonical encoding (the Merkle leaf): version 1, integers big-endian, strings as a
    /// u16 length and UTF-8.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(96 + self.node.len() + self.region.len() + self.key_id.len());
        out.push(RECEIPT_VERSION);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.cycle.to_be_bytes());
        out.push(self.kind.code());
        out.extend_from_slice(&self.time_ns.to_be_bytes());
        out.extend_from_slice(&self.policy_generation.to_be_bytes());
        out.extend_from_slice(&self.payload_len.to_be_bytes());
        out.extend_from_slice(&self.payload_hash);
        for s in [&self.node, &self.region, &self.key_id] {
            let b = s.as_bytes();
            out.extend_from_slice(&(b.len().min(u16::MAX as usize) as u16).to_be_bytes());
            out.extend_from_slice(&b[..b.len().min(u16::MAX as usize)]);
        }
        out.extend_from_slice(&self.key_version.to_be_bytes());
        out
    }

    /// Decodes [`Receipt::encode`]'s output; trailing bytes are an error.
    pub fn decode(bytes: &[u8]) -> Result<Receipt, DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.u8()?;
        if version != RECEIPT_VERSION {
            return Err(DecodeError(format!("unknown version {version}")));
        }
        let seq = r.u64()?;
        let cycle = r.u64()?;
        let code = r.u8()?;
        let kind = ReceiptKind::from_code(code)
            .ok_or_else(|| DecodeError(format!("unknown kind {code}")))?;
        let time_ns = r.u64()? as i64;
        let policy_generation = r.u64()?;
        let payload_len = r.u32()?;
        let payload_hash: Hash = r
            .take(32)?
            .try_into()
            .map_err(|_| DecodeError("hash".into()))?;
        let node = r.string()?;
        let region = r.string()?;
        let key_id = r.string()?;
        let key_version = r.u64()?;
        if r.at != bytes.len() {
            return Err(DecodeError(format!(
                "{} trailing bytes",
                bytes.len() - r.at
            )));
        }
        Ok(Receipt {
            seq,
            cycle,
            kind,
            time_ns,
            policy_generation,
            payload_len,
            payload_hash,
            node,
            region,
            key_id,
            key_version,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or_else(|| DecodeError(format!("truncated at byte {}", self.at)))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.take(2)?;
        let len = u16::from_be_bytes([b[0], b[1]]) as usize;
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| DecodeError("a string is not UTF-8".into()))
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

/// RFC 6962 leaf hash: SHA-256(0x00 ‖ leaf).
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(leaf);
    h.finalize().into()
}

/// RFC 6962 node hash: SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// A key and version, as `id#version`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct KeyRef {
    /// Provider key id (an AWS key id, a Vault transit key name, a file key directory).
    pub id: String,
    /// Version (Vault transit versions; 1 for AWS keys, which do not rotate in place).
    pub version: u64,
}

impl std::fmt::Display for KeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.id, self.version)
    }
}

impl KeyRef {
    /// Parses `id#version` (the id may itself contain `#`; the last one splits).
    pub fn parse(s: &str) -> Option<KeyRef> {
        let (id, v) = s.rsplit_once('#')?;
        Some(KeyRef {
            id: id.to_owned(),
            // Not a number: not a key reference.
            version: v.parse().ok()?,
        })
    }
}

/// The origin line of a node's log: `knhk/<region>/<node>/<epoch>`, where `epoch` is the Unix
/// time (seconds) at which the node's ledger was created. A node whose ledger is lost (a
/// re-imaged node) starts a new log under a new origin; its old origin stays at the witnesses
/// and in the archive as a finished log.
pub fn origin(region: &str, node: &str, epoch: u64) -> String {
    format!("knhk/{region}/{node}/{epoch}")
}

/// A checkpoint: a C2SP `tlog-checkpoint` body (origin, tree size, base64 root hash) with three
/// extension lines (`knhk-cycle`, `knhk-time`, `knhk-key`). The node's signature and the
/// witnesses' cosignatures cover all of it ([`super::note`] renders the signed note).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointBody {
    /// The log's origin ([`origin`]).
    pub origin: String,
    /// Tree size (receipts covered: seq 0..size).
    pub size: u64,
    /// Merkle root of the first `size` receipts.
    pub root: Hash,
    /// Beat cycle of the pulse that wrote it.
    pub cycle: u64,
    /// Wall-clock time, ns since the epoch.
    pub time_ns: i64,
    /// The key that signs it.
    pub key: KeyRef,
}

impl CheckpointBody {
    /// The signed text, each line ending in `\n`:
    /// `<origin>`, `<size>`, `<base64 root>`, `knhk-cycle <n>`, `knhk-time <ns>`, `knhk-key <id#v>`.
    pub fn encode(&self) -> String {
        format!(
            "{}\n{}\n{}\nknhk-cycle {}\nknhk-time {}\nknhk-key {}\n",
            self.origin,
            self.size,
            B64.encode(self.root),
            self.cycle,
            self.time_ns,
            self.key
        )
    }

    /// Parses [`CheckpointBody::encode`]'s output exactly.
    pub fn decode(text: &str) -> Result<CheckpointBody, DecodeError> {
        let bad = |m: &str| DecodeError(format!("checkpoint: {m}"));
        let mut lines = text
            .strip_suffix('\n')
            .ok_or_else(|| bad("no final newline"))?
            .split('\n');
        let mut line = |what: &str| {
            lines
                .next()
                .ok_or_else(|| bad(&format!("missing the {what} line")))
        };
        let origin = line("origin")?.to_owned();
        if origin.is_empty() || origin.contains(char::is_whitespace) || origin.contains('+') {
            return Err(bad("the origin is empty or holds a space or '+'"));
        }
        let size = line("size")?.parse().map_err(|_| bad("size"))?;
        let root: Hash = B64
            .decode(line("root hash")?)
            // Not base64, or not 32 bytes: refused as a bad root below.
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("root hash"))?;
        let mut field = |name: &str| -> Result<String, DecodeError> {
            let l = line(name)?;
            l.strip_prefix(&format!("{name} "))
                .map(str::to_owned)
                .ok_or_else(|| bad(&format!("expected {name}, found {l:?}")))
        };
        let cycle = field("knhk-cycle")?
            .parse()
            .map_err(|_| bad("knhk-cycle"))?;
        let time_ns = field("knhk-time")?.parse().map_err(|_| bad("knhk-time"))?;
        let key = KeyRef::parse(&field("knhk-key")?).ok_or_else(|| bad("knhk-key"))?;
        let body = CheckpointBody {
            origin,
            size,
            root,
            cycle,
            time_ns,
            key,
        };
        if lines.next().is_some() || body.encode() != text {
            return Err(bad("not in canonical form"));
        }
        Ok(body)
    }
}

/// The fingerprint of a public key: `sha256:` and the lower-case hex SHA-256 of its
/// SubjectPublicKeyInfo DER (71 characters). What `receipts verify --trusted-key`, `receipts keys`
/// and the API show and compare.
pub fn fingerprint(spki_der: &[u8]) -> String {
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in sha256(spki_der) {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    out
}

/// A fingerprint as given by a person: `sha256:<64 hex digits>` or the 64 digits alone, either
/// case; `None` when it is not one. The result is in [`fingerprint`]'s form.
pub fn parse_fingerprint(s: &str) -> Option<String> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("sha256:{}", hex.to_ascii_lowercase()))
}

/// A key transition statement, signed by the old key: it names the new key and its public key.
pub fn transition_statement(
    from: &KeyRef,
    to: &KeyRef,
    to_public_key_der: &[u8],
    time_ns: i64,
) -> String {
    format!(
        "{TRANSITION_HEADER}\nfrom: {from}\nto: {to}\nto_public_key: {}\ntime: {time_ns}\n",
        B64.encode(to_public_key_der)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Receipt {
        Receipt {
            seq: 7,
            cycle: 64,
            kind: ReceiptKind::CycleSummary,
            time_ns: 1_790_000_000_000_000_000,
            policy_generation: 3,
            payload_len: 5,
            payload_hash: sha256(b"hello"),
            node: "node-a".into(),
            region: "eu-west-1".into(),
            key_id: "alias/knhk".into(),
            key_version: 1,
        }
    }

    #[test]
    fn receipts_round_trip_and_reject_garbage() {
        let r = sample();
        let bytes = r.encode();
        assert_eq!(Receipt::decode(&bytes).expect("decodes"), r);
        assert!(Receipt::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Receipt::decode(&longer).is_err());
        let mut v2 = bytes;
        v2[0] = 2;
        assert!(Receipt::decode(&v2).is_err());
    }

    #[test]
    fn checkpoints_round_trip_canonically() {
        let body = CheckpointBody {
            origin: origin("r", "n", 1_764_000_000),
            size: 10,
            root: sha256(b"x"),
            cycle: 80,
            time_ns: 5,
            key: KeyRef {
                id: "transit/knhk".into(),
                version: 2,
            },
        };
        let text = body.encode();
        assert_eq!(CheckpointBody::decode(&text).expect("decodes"), body);
        assert!(CheckpointBody::decode(&text.replace("\n10\n", "\n010\n")).is_err());
        assert!(CheckpointBody::decode(&format!("{text}extra 1\n")).is_err());
        assert!(CheckpointBody::decode(&text.replace("knhk/r", "knhk r")).is_err());

        // A second implementation of C2SP tlog-checkpoint (Cloudflare azul) reads the same.
        let theirs = tlog_tiles::Checkpoint::from_bytes(text.as_bytes()).expect("C2SP checkpoint");
        assert_eq!(theirs.origin(), "knhk/r/n/1764000000");
        assert_eq!(theirs.size(), 10);
        assert_eq!(theirs.hash().0, body.root);
        assert_eq!(
            theirs.extension(),
            "knhk-cycle 80\nknhk-time 5\nknhk-key transit/knhk#2\n"
        );
    }

    #[test]
    fn fingerprints_are_the_spki_sha256_in_hex() {
        // SHA-256("abc"), the FIPS 180-2 test vector.
        let fp = fingerprint(b"abc");
        assert_eq!(
            fp,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(parse_fingerprint(&fp).as_deref(), Some(fp.as_str()));
        assert_eq!(
            parse_fingerprint(&fp["sha256:".len()..].to_ascii_uppercase()).as_deref(),
            Some(fp.as_str())
        );
        assert_eq!(parse_fingerprint("sha256:abc"), None);
        assert_eq!(parse_fingerprint(&fp.replace('a', "g")), None);
    }
}
