//! C2SP signed notes (<https://c2sp.org/signed-note>) around checkpoints: the node's ECDSA
//! P-256 signature (type `0x02`, as in transparency-dev/witness) and the witnesses' timestamped
//! Ed25519 cosignatures (type `0x04`, <https://c2sp.org/tlog-cosignature>). Byte by byte in
//! `docs/receipts.md` ("Checkpoints as signed notes").
//!
//! A note is its text (ending in `\n`), a blank line, then one line per signature:
//! `— <key name> <base64(4-byte key ID ‖ signature bytes)>\n` (U+2014, the em dash).

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use sha2::{Digest, Sha256};

/// Signature type of ECDSA P-256 / SHA-256 (DER signatures), as in transparency-dev/witness.
pub const ALG_ECDSA: u8 = 0x02;
/// Signature type of timestamped Ed25519 witness cosignatures (`cosignature/v1`).
pub const ALG_COSIGNATURE_V1: u8 = 0x04;
/// The largest note this code parses (as `signed_note`: 1 MB).
pub const MAX_NOTE_BYTES: usize = 1_000_000;
/// The most signature lines a note may carry.
pub const MAX_SIGNATURES: usize = 100;

/// A 4-byte key ID.
pub type KeyId = [u8; 4];

/// The key ID of an ECDSA key: the first 4 bytes of SHA-256 of its SubjectPublicKeyInfo DER.
pub fn ecdsa_key_id(spki_der: &[u8]) -> KeyId {
    first4(&Sha256::digest(spki_der))
}

/// The key ID of a witness's cosignature key: SHA-256(name ‖ `\n` ‖ 0x04 ‖ public key)[0..4].
pub fn cosignature_key_id(name: &str, public: &[u8; 32]) -> KeyId {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_COSIGNATURE_V1]);
    h.update(public);
    first4(&h.finalize())
}

fn first4(d: &[u8]) -> KeyId {
    [d[0], d[1], d[2], d[3]]
}

/// A verifier key as C2SP writes it: `<name>+<8 hex digits of the key ID>+<base64(type ‖ key)>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    /// Key name (a log's origin, or a witness's name).
    pub name: String,
    /// Key ID.
    pub id: KeyId,
    /// Signature type ([`ALG_ECDSA`] or [`ALG_COSIGNATURE_V1`]).
    pub alg: u8,
    /// The key: SPKI DER for ECDSA, 32 bytes for Ed25519.
    pub key: Vec<u8>,
}

impl VerifierKey {
    /// An ECDSA P-256 log key.
    pub fn ecdsa(name: &str, spki_der: &[u8]) -> VerifierKey {
        VerifierKey {
            name: name.to_owned(),
            id: ecdsa_key_id(spki_der),
            alg: ALG_ECDSA,
            key: spki_der.to_vec(),
        }
    }

    /// A witness's Ed25519 cosignature key.
    pub fn cosignature(name: &str, public: &[u8; 32]) -> VerifierKey {
        VerifierKey {
            name: name.to_owned(),
            id: cosignature_key_id(name, public),
            alg: ALG_COSIGNATURE_V1,
            key: public.to_vec(),
        }
    }

    /// Parses a verifier key; the error says what is wrong.
    pub fn parse(s: &str) -> Result<VerifierKey, String> {
        let mut parts = s.splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "{s:?} is not a verifier key (expected NAME+KEYID+BASE64)"
            ));
        };
        if !valid_key_name(name) {
            return Err(format!(
                "{s:?}: the key name is empty or holds a space or '+'"
            ));
        }
        let id = (id.len() == 8)
            .then(|| u32::from_str_radix(id, 16).ok())
            .flatten()
            .ok_or_else(|| format!("{s:?}: the key ID is not 8 hex digits"))?
            .to_be_bytes();
        let bytes = B64
            .decode(key)
            .map_err(|e| format!("{s:?}: the key is not base64: {e}"))?;
        let (&alg, key) = bytes
            .split_first()
            .ok_or_else(|| format!("{s:?}: the key is empty"))?;
        let expected = match alg {
            ALG_ECDSA => ecdsa_key_id(key),
            ALG_COSIGNATURE_V1 => {
                let public: [u8; 32] = key
                    .try_into()
                    .map_err(|_| format!("{s:?}: an Ed25519 key is 32 bytes"))?;
                cosignature_key_id(name, &public)
            }
            other => {
                return Err(format!(
                    "{s:?}: signature type 0x{other:02x} is not supported (0x02 ECDSA, 0x04 cosignature/v1)"
                ))
            }
        };
        if expected != id {
            return Err(format!(
                "{s:?}: the key ID does not match the key (expected {})",
                hex(&expected)
            ));
        }
        Ok(VerifierKey {
            name: name.to_owned(),
            id,
            alg,
            key: key.to_vec(),
        })
    }

    /// The 32-byte Ed25519 key of a cosignature key.
    pub fn ed25519(&self) -> Option<[u8; 32]> {
        (self.alg == ALG_COSIGNATURE_V1)
            .then(|| self.key.as_slice().try_into().ok())
            .flatten()
    }
}

impl std::fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut bytes = Vec::with_capacity(1 + self.key.len());
        bytes.push(self.alg);
        bytes.extend_from_slice(&self.key);
        write!(f, "{}+{}+{}", self.name, hex(&self.id), B64.encode(bytes))
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `name` may name a key: not empty, no Unicode space, no `+`.
pub fn valid_key_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(char::is_whitespace) && !name.contains('+')
}

/// One signature line of a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLine {
    /// The key name.
    pub name: String,
    /// The key ID.
    pub id: KeyId,
    /// The signature bytes after the key ID.
    pub signature: Vec<u8>,
}

impl SignatureLine {
    /// `— <name> <base64(id ‖ signature)>\n`.
    pub fn encode(&self) -> String {
        let mut blob = Vec::with_capacity(4 + self.signature.len());
        blob.extend_from_slice(&self.id);
        blob.extend_from_slice(&self.signature);
        format!("\u{2014} {} {}\n", self.name, B64.encode(blob))
    }

    /// Parses one line, without its `\n`.
    pub fn parse(line: &str) -> Result<SignatureLine, String> {
        let rest = line
            .strip_prefix("\u{2014} ")
            .ok_or_else(|| format!("signature line {line:?} does not start with \"— \""))?;
        let (name, blob) = rest
            .split_once(' ')
            .ok_or_else(|| format!("signature line {line:?} has no signature"))?;
        if !valid_key_name(name) {
            return Err(format!("signature line {line:?}: bad key name"));
        }
        let blob = B64
            .decode(blob)
            .map_err(|e| format!("signature line {line:?}: not base64: {e}"))?;
        if blob.len() < 5 {
            return Err(format!("signature line {line:?}: too short"));
        }
        Ok(SignatureLine {
            name: name.to_owned(),
            id: first4(&blob),
            signature: blob[4..].to_vec(),
        })
    }
}

/// Renders a note: the text, a blank line, then the signature lines.
pub fn render(text: &str, signatures: &[SignatureLine]) -> String {
    let mut out = String::with_capacity(text.len() + 1 + 128 * signatures.len());
    out.push_str(text);
    out.push('\n');
    for s in signatures {
        out.push_str(&s.encode());
    }
    out
}

/// Splits a note into its text and signature lines; the error names what is malformed.
pub fn parse(note: &str) -> Result<(String, Vec<SignatureLine>), String> {
    if note.len() > MAX_NOTE_BYTES {
        return Err(format!(
            "the note is {} bytes (at most {MAX_NOTE_BYTES})",
            note.len()
        ));
    }
    let (text, sigs) = note
        .rsplit_once("\n\n")
        .ok_or_else(|| "the note has no blank line before its signatures".to_owned())?;
    let sigs = sigs
        .strip_suffix('\n')
        .ok_or_else(|| "the note does not end in a newline".to_owned())?;
    let lines: Vec<SignatureLine> = sigs
        .split('\n')
        .map(SignatureLine::parse)
        .collect::<Result<_, _>>()?;
    if lines.len() > MAX_SIGNATURES {
        return Err(format!(
            "the note has {} signatures (at most {MAX_SIGNATURES})",
            lines.len()
        ));
    }
    if text.contains('\u{0}') || text.contains("\n\n") {
        return Err("the note text holds a blank line or a NUL".to_owned());
    }
    Ok((format!("{text}\n"), lines))
}

/// What a witness signs: `cosignature/v1\ntime <timestamp>\n` and the checkpoint body.
pub fn cosigned_message(body: &str, timestamp: u64) -> String {
    format!("cosignature/v1\ntime {timestamp}\n{body}")
}

/// A witness's cosignature of a checkpoint (`tlog-cosignature` v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cosignature {
    /// The witness's key name.
    pub witness: String,
    /// Its key ID ([`cosignature_key_id`]).
    pub id: KeyId,
    /// When it cosigned, seconds since the Unix epoch.
    pub timestamp: u64,
    /// Ed25519 signature of [`cosigned_message`].
    pub signature: [u8; 64],
}

impl Cosignature {
    /// As a note signature line: the blob is key ID ‖ u64 big-endian timestamp ‖ signature.
    pub fn line(&self) -> SignatureLine {
        let mut signature = Vec::with_capacity(72);
        signature.extend_from_slice(&self.timestamp.to_be_bytes());
        signature.extend_from_slice(&self.signature);
        SignatureLine {
            name: self.witness.clone(),
            id: self.id,
            signature,
        }
    }

    /// From a signature line; the error says why it is not a cosignature.
    pub fn from_line(line: &SignatureLine) -> Result<Cosignature, String> {
        if line.signature.len() != 72 {
            return Err(format!(
                "the cosignature by {} is {} bytes after the key ID (a cosignature/v1 is 72)",
                line.name,
                line.signature.len()
            ));
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&line.signature[..8]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&line.signature[8..]);
        Ok(Cosignature {
            witness: line.name.clone(),
            id: line.id,
            timestamp: u64::from_be_bytes(ts),
            signature,
        })
    }

    /// Whether it is `key`'s valid cosignature of `body`.
    pub fn verify(&self, body: &str, key: &VerifierKey) -> bool {
        let Some(public) = key.ed25519() else {
            return false;
        };
        if key.name != self.witness || key.id != self.id {
            return false;
        }
        let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(&public) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&self.signature);
        vk.verify_strict(cosigned_message(body, self.timestamp).as_bytes(), &sig)
            .is_ok()
    }
}

/// The node's signature line of a checkpoint: key name = the origin, key ID from the SPKI,
/// the DER ECDSA signature.
pub fn log_signature_line(origin: &str, spki_der: &[u8], der_signature: &[u8]) -> SignatureLine {
    SignatureLine {
        name: origin.to_owned(),
        id: ecdsa_key_id(spki_der),
        signature: der_signature.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_keys_round_trip_and_refuse_each_fault() {
        let public = [7u8; 32];
        let k = VerifierKey::cosignature("witness.example/w1", &public);
        let text = k.to_string();
        assert_eq!(VerifierKey::parse(&text), Ok(k.clone()));
        assert!(VerifierKey::parse("a+b").is_err());
        assert!(
            VerifierKey::parse(&text.replacen(&hex(&k.id), "00000000", 1))
                .expect_err("wrong id")
                .contains("does not match")
        );
        assert!(VerifierKey::parse(&text.replacen("witness", "wit ness", 1)).is_err());
    }

    #[test]
    fn notes_round_trip_and_malformed_ones_are_named() {
        let line = SignatureLine {
            name: "knhk/r/n/1".into(),
            id: [1, 2, 3, 4],
            signature: vec![9; 70],
        };
        let note = render("knhk/r/n/1\n3\nAAAA\n", std::slice::from_ref(&line));
        let (text, lines) = parse(&note).expect("parses");
        assert_eq!(text, "knhk/r/n/1\n3\nAAAA\n");
        assert_eq!(lines, vec![line]);
        assert!(parse("no blank line\n").is_err());
        assert!(parse(&note.replace('\u{2014}', "-")).is_err());
        assert!(parse(note.trim_end()).is_err());
    }

    #[test]
    fn a_cosignature_covers_its_timestamp_and_body() {
        use ed25519_dalek::Signer as _;
        let key = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        let public = key.verifying_key().to_bytes();
        let vk = VerifierKey::cosignature("w1", &public);
        let body = "knhk/r/n/1\n3\nAAAA\n";
        let c = Cosignature {
            witness: "w1".into(),
            id: vk.id,
            timestamp: 1_700_000_000,
            signature: key
                .sign(cosigned_message(body, 1_700_000_000).as_bytes())
                .to_bytes(),
        };
        assert!(c.verify(body, &vk));
        let line = c.line();
        assert_eq!(Cosignature::from_line(&line), Ok(c.clone()));
        assert!(!Cosignature {
            timestamp: 1_700_000_001,
            ..c.clone()
        }
        .verify(body, &vk));
        assert!(!c.verify("knhk/r/n/1\n4\nAAAA\n", &vk));
    }
}
