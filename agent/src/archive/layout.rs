//! The archive's objects: their names, the segment body's bytes, and where segments end. Pure
//! functions; `docs/receipts.md` ("Archive") specifies every format here byte by byte.

use crate::receipts::ledger::EncodedReceipt;
use sha2::{Digest, Sha256};

/// The first 8 bytes of every segment body.
pub const SEGMENT_MAGIC: &[u8; 8] = b"KNHKSEG1";

/// What an archived object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// Receipts `first..end` and their payloads.
    Segment,
    /// One signed checkpoint, as the ledger stores it.
    Checkpoint,
    /// One record of the key history, as the ledger stores it.
    Key,
}

impl ObjectKind {
    /// The folder below the prefix, also the metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Segment => "segments",
            ObjectKind::Checkpoint => "checkpoints",
            ObjectKind::Key => "keys",
        }
    }
}

/// Lowercase hex SHA-256 of `body`.
pub fn sha256_hex(body: &[u8]) -> String {
    Sha256::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `PREFIX/REL` (just `REL` for an empty prefix).
pub fn under(prefix: &str, rel: &str) -> String {
    if prefix.is_empty() {
        rel.to_owned()
    } else {
        format!("{prefix}/{rel}")
    }
}

/// The name (below the prefix) of the segment of receipts `first..end` with body `body`.
pub fn segment_name(first: u64, end: u64, body: &[u8]) -> String {
    format!("segments/{first:020}-{end:020}-{}.seg", sha256_hex(body))
}

/// The name of checkpoint `number` with body `body`.
pub fn checkpoint_name(number: u64, body: &[u8]) -> String {
    format!("checkpoints/{number:020}-{}.json", sha256_hex(body))
}

/// The name of key record `index` (0 = the first key) with body `body`.
pub fn key_name(index: u64, body: &[u8]) -> String {
    format!("keys/{index:020}-{}.json", sha256_hex(body))
}

/// An object name parsed back: its kind, its numbers (`first, end` for a segment; the number
/// twice otherwise) and the SHA-256 (hex) its body must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name {
    /// Kind.
    pub kind: ObjectKind,
    /// First receipt, checkpoint number or key index.
    pub first: u64,
    /// End of the receipts (segments), else equal to `first`.
    pub end: u64,
    /// The body's SHA-256, lowercase hex.
    pub sha256: String,
}

/// Parses a name below the prefix; `None` for anything that is not an archive object.
pub fn parse_name(rel: &str) -> Option<Name> {
    let (folder, file) = rel.split_once('/')?;
    let (kind, ext) = match folder {
        "segments" => (ObjectKind::Segment, ".seg"),
        "checkpoints" => (ObjectKind::Checkpoint, ".json"),
        "keys" => (ObjectKind::Key, ".json"),
        _ => return None,
    };
    let stem = file.strip_suffix(ext)?;
    let parts: Vec<&str> = stem.split('-').collect();
    let num = |s: &str| (s.len() == 20).then(|| s.parse::<u64>().ok()).flatten();
    let hex = |s: &str| {
        (s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| s.to_owned())
    };
    match (kind, parts.as_slice()) {
        (ObjectKind::Segment, [a, b, h]) => Some(Name {
            kind,
            first: num(a)?,
            end: num(b)?,
            sha256: hex(h)?,
        }),
        (ObjectKind::Checkpoint | ObjectKind::Key, [a, h]) => Some(Name {
            kind,
            first: num(a)?,
            end: num(a)?,
            sha256: hex(h)?,
        }),
        _ => None,
    }
}

/// Where the segment starting at `from` ends: at the next multiple of `max`, or at `target`
/// (the newest signed checkpoint's size) if that comes first. A segment that ends at `target`
/// is the round's tail; the next round starts where it ended. Names stay the same across a
/// restart because a segment already archived at `from` is found (by its name's prefix) and
/// taken as it is, never cut again.
pub fn next_boundary(from: u64, target: u64, max: u64) -> u64 {
    let next_multiple = (from / max.max(1) + 1).saturating_mul(max.max(1));
    next_multiple.min(target)
}

/// The segment body of consecutive receipts (all big-endian): the magic, `first` (u64),
/// `count` (u32); then per receipt: the encoding's length (u32) and bytes, a flag (u8: 1 with
/// a payload, 0 when it was compacted before it was archived) and, with 1, the payload's
/// length (u32) and bytes.
pub fn encode_segment(entries: &[EncodedReceipt]) -> Vec<u8> {
    let first = entries.first().map_or(0, |e| e.0);
    let size: usize = entries
        .iter()
        .map(|(_, e, p)| 9 + e.len() + p.as_ref().map_or(0, |p| 4 + p.len()))
        .sum();
    let mut out = Vec::with_capacity(20 + size);
    out.extend_from_slice(SEGMENT_MAGIC);
    out.extend_from_slice(&first.to_be_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (_, encoding, payload) in entries {
        out.extend_from_slice(&(encoding.len() as u32).to_be_bytes());
        out.extend_from_slice(encoding);
        match payload {
            Some(p) => {
                out.push(1);
                out.extend_from_slice(&(p.len() as u32).to_be_bytes());
                out.extend_from_slice(p);
            }
            None => out.push(0),
        }
    }
    out
}

/// Reads a segment body back: the receipts numbered from its `first`. The error says what is
/// wrong and where.
pub fn decode_segment(body: &[u8]) -> Result<Vec<EncodedReceipt>, String> {
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], String> {
        let end = at
            .checked_add(n)
            .filter(|e| *e <= body.len())
            .ok_or_else(|| format!("truncated at byte {at} (wanted {n} more bytes)"))?;
        let s = &body[*at..end];
        *at = end;
        Ok(s)
    };
    let be_u32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if take(&mut at, 8)? != SEGMENT_MAGIC {
        return Err("it does not start with KNHKSEG1 (not a segment)".into());
    }
    let f = take(&mut at, 8)?;
    let first = u64::from_be_bytes([f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]]);
    let count = be_u32(take(&mut at, 4)?) as u64;
    let mut out = Vec::new();
    for i in 0..count {
        let len = be_u32(take(&mut at, 4)?) as usize;
        let encoding = take(&mut at, len)?.to_vec();
        let payload = match take(&mut at, 1)?[0] {
            0 => None,
            1 => {
                let len = be_u32(take(&mut at, 4)?) as usize;
                Some(take(&mut at, len)?.to_vec())
            }
            other => {
                return Err(format!(
                    "receipt {}: payload flag {other} (expected 0 or 1)",
                    first + i
                ))
            }
        };
        out.push((first + i, encoding, payload));
    }
    if at != body.len() {
        return Err(format!("{} bytes after the last receipt", body.len() - at));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_are_multiples_and_never_pass_the_target() {
        let cut = |from| next_boundary(from, 420, 100);
        assert_eq!(cut(0), 100);
        assert_eq!(cut(100), 200);
        assert_eq!(cut(150), 200);
        assert_eq!(cut(400), 420);
        assert_eq!(next_boundary(0, 30, 100), 30);
    }

    #[test]
    fn segments_round_trip_and_names_parse() {
        let entries = vec![
            (7, b"enc-7".to_vec(), Some(b"{}".to_vec())),
            (8, b"enc-8".to_vec(), None),
        ];
        let body = encode_segment(&entries);
        assert_eq!(&body[..8], SEGMENT_MAGIC);
        assert_eq!(&body[8..16], &7u64.to_be_bytes());
        assert_eq!(&body[16..20], &2u32.to_be_bytes());
        assert_eq!(decode_segment(&body).expect("decodes"), entries);
        assert!(decode_segment(&body[..body.len() - 1])
            .expect_err("truncated")
            .contains("truncated"));
        let name = segment_name(7, 9, &body);
        let parsed = parse_name(&name).expect("parses");
        assert_eq!(
            (parsed.kind, parsed.first, parsed.end),
            (ObjectKind::Segment, 7, 9)
        );
        assert_eq!(parsed.sha256, sha256_hex(&body));
        let c = checkpoint_name(3, b"x");
        assert_eq!(
            parse_name(&c).map(|n| (n.kind, n.first)),
            Some((ObjectKind::Checkpoint, 3))
        );
        assert_eq!(parse_name("segments/junk.seg"), None);
        assert_eq!(under("", "keys/a"), "keys/a");
        assert_eq!(under("p/q", "keys/a"), "p/q/keys/a");
    }
}
