//! Signed objects: a payload and a detached ECDSA P-256 / SHA-256 signature in one envelope, so
//! a reader fetches (and a writer replaces) both at once and never sees one without the other.
//!
//! The envelope is JSON:
//!
//! ```json
//! {"format":"knhk-signed-object/v1","payload_type":"knhk-bundle/v1","key_id":"…",
//!  "signature":"<base64 DER>","payload":"<base64 bytes>"}
//! ```
//!
//! The signed message is not the payload alone but [`signed_message`]: the envelope format, the
//! payload type and the payload, separated by NUL bytes. So a signature made with the same key
//! for another purpose (a receipts checkpoint, another payload type) never verifies here.
//!
//! The keys are the ones the receipts signers use (AWS KMS `ECC_NIST_P256`, Vault transit
//! `ecdsa-p256`, Azure Key Vault P-256, the development file key): DER signatures, verified with
//! the SubjectPublicKeyInfo alone. No domain knowledge: what a payload means is the caller's.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The envelope's `format`.
pub const FORMAT: &str = "knhk-signed-object/v1";

/// Why a signed object was refused. Nothing in it may be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignedError {
    /// The bytes are not a signed envelope at all (e.g. a bare, unsigned document).
    #[error(
        "unsigned: not a {FORMAT} envelope ({0}); publish it with `knhk-agent bundle publish`"
    )]
    Unsigned(String),
    /// The envelope carries no signature.
    #[error("unsigned: the envelope's signature is empty")]
    NoSignature,
    /// The envelope holds another kind of payload.
    #[error("the envelope holds a {found:?} payload, not {expected:?}")]
    WrongType {
        /// What the reader expects.
        expected: String,
        /// What the envelope says.
        found: String,
    },
    /// A field is not valid base64.
    #[error("the envelope's {field} is not valid base64: {message}")]
    Encoding {
        /// `signature` or `payload`.
        field: &'static str,
        /// The decoder's message.
        message: String,
    },
    /// The signature does not verify with the configured key: tampered, or signed by another key.
    #[error("the signature (key_id {key_id:?}) does not verify with the configured public key {fingerprint}: the object was altered or signed with another key")]
    BadSignature {
        /// The key id the envelope claims (informational: only the configured key counts).
        key_id: String,
        /// `sha256:<hex>` of the configured public key (SPKI DER).
        fingerprint: String,
    },
}

impl SignedError {
    /// A low-cardinality name of the failure (metrics labels).
    pub fn reason(&self) -> &'static str {
        match self {
            SignedError::Unsigned(_) | SignedError::NoSignature => "unsigned",
            SignedError::WrongType { .. } | SignedError::Encoding { .. } => "malformed",
            SignedError::BadSignature { .. } => "bad_signature",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: String,
    payload_type: String,
    key_id: String,
    signature: String,
    payload: String,
}

/// The bytes a signature covers: `FORMAT`, NUL, `payload_type`, NUL, `payload`.
pub fn signed_message(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(FORMAT.len() + payload_type.len() + payload.len() + 2);
    m.extend_from_slice(FORMAT.as_bytes());
    m.push(0);
    m.extend_from_slice(payload_type.as_bytes());
    m.push(0);
    m.extend_from_slice(payload);
    m
}

/// The envelope of `payload` signed (DER `signature` over [`signed_message`]) by `key_id`.
pub fn seal(payload_type: &str, payload: &[u8], key_id: &str, signature: &[u8]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let envelope = Envelope {
        format: FORMAT.into(),
        payload_type: payload_type.into(),
        key_id: key_id.into(),
        signature: b64.encode(signature),
        payload: b64.encode(payload),
    };
    // Plain strings: serialization cannot fail.
    serde_json::to_vec_pretty(&envelope).unwrap_or_default()
}

/// A payload whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// The key id the envelope names.
    pub key_id: String,
}

/// Checks the envelope `object` holds a `payload_type` payload signed by the key whose
/// SubjectPublicKeyInfo is `public_key_der`, and returns the payload. Nothing of the payload is
/// decoded or trusted before the signature verified.
pub fn open(
    object: &[u8],
    payload_type: &str,
    public_key_der: &[u8],
) -> Result<Verified, SignedError> {
    let envelope: Envelope =
        serde_json::from_slice(object).map_err(|e| SignedError::Unsigned(e.to_string()))?;
    if envelope.format != FORMAT {
        return Err(SignedError::Unsigned(format!(
            "format {:?}",
            envelope.format
        )));
    }
    if envelope.payload_type != payload_type {
        return Err(SignedError::WrongType {
            expected: payload_type.into(),
            found: envelope.payload_type,
        });
    }
    if envelope.signature.is_empty() {
        return Err(SignedError::NoSignature);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let signature = b64
        .decode(&envelope.signature)
        .map_err(|e| SignedError::Encoding {
            field: "signature",
            message: e.to_string(),
        })?;
    let payload = b64
        .decode(&envelope.payload)
        .map_err(|e| SignedError::Encoding {
            field: "payload",
            message: e.to_string(),
        })?;
    if !verify_signature(
        public_key_der,
        &signed_message(payload_type, &payload),
        &signature,
    ) {
        return Err(SignedError::BadSignature {
            key_id: envelope.key_id,
            fingerprint: fingerprint(public_key_der),
        });
    }
    Ok(Verified {
        payload,
        key_id: envelope.key_id,
    })
}

/// `sha256:<hex>` of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(der);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Whether `signature` (DER) is a valid ECDSA P-256 / SHA-256 signature of `message` by the key
/// whose SubjectPublicKeyInfo is `public_key_der`. High-S signatures (some KMSs make them) are
/// accepted, as ECDSA allows.
pub fn verify_signature(public_key_der: &[u8], message: &[u8], signature: &[u8]) -> bool {
    use p256::{
        ecdsa::{signature::Verifier, Signature, VerifyingKey},
        pkcs8::DecodePublicKey,
    };
    let Ok(key) = VerifyingKey::from_public_key_der(public_key_der) else {
        return false;
    };
    let Ok(sig) = Signature::from_der(signature) else {
        return false;
    };
    let sig = sig.normalize_s();
    key.verify(message, &sig).is_ok()
}

/// A P-256 public key given as PEM (SubjectPublicKeyInfo), as DER; the error says why not.
pub fn public_key_pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
    let key = p256::PublicKey::from_public_key_pem(pem).map_err(|e| e.to_string())?;
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .map_err(|e| e.to_string())
}

/// A P-256 public key (SubjectPublicKeyInfo DER) as PEM.
pub fn public_key_der_to_pem(der: &[u8]) -> Result<String, String> {
    use p256::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
    let key = p256::PublicKey::from_public_key_der(der).map_err(|e| e.to_string())?;
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::{
        ecdsa::{signature::Signer as _, Signature, SigningKey},
        pkcs8::EncodePublicKey,
    };

    fn key(seed: u8) -> (SigningKey, Vec<u8>) {
        let k = SigningKey::from_slice(&[seed; 32]).expect("key");
        let der = k
            .verifying_key()
            .to_public_key_der()
            .expect("der")
            .as_bytes()
            .to_vec();
        (k, der)
    }

    fn sealed(k: &SigningKey, ty: &str, payload: &[u8]) -> Vec<u8> {
        let sig: Signature = k.sign(&signed_message(ty, payload));
        seal(ty, payload, "k1", sig.to_der().as_bytes())
    }

    #[test]
    fn a_sealed_object_opens_with_its_key_only() {
        let (k, der) = key(7);
        let (_, other) = key(9);
        let obj = sealed(&k, "t/v1", b"hello");
        let v = open(&obj, "t/v1", &der).expect("verifies");
        assert_eq!(v.payload, b"hello");
        let e = open(&obj, "t/v1", &other).expect_err("another key");
        assert_eq!(e.reason(), "bad_signature");
        assert!(e.to_string().contains(&fingerprint(&other)), "{e}");
        let e = open(&obj, "u/v1", &der).expect_err("another type");
        assert!(matches!(e, SignedError::WrongType { .. }), "{e}");
    }

    #[test]
    fn tampering_unsigned_and_foreign_signatures_are_refused() {
        let (k, der) = key(7);
        let obj = sealed(&k, "t/v1", b"hello");
        // A payload swapped under the signature.
        let mut env: serde_json::Value = serde_json::from_slice(&obj).expect("json");
        env["payload"] = base64::engine::general_purpose::STANDARD
            .encode(b"HELLO")
            .into();
        let tampered = serde_json::to_vec(&env).expect("json");
        assert_eq!(
            open(&tampered, "t/v1", &der)
                .expect_err("tampered")
                .reason(),
            "bad_signature"
        );
        // A bare document.
        let e = open(b"[policy]\n", "t/v1", &der).expect_err("bare");
        assert_eq!(e.reason(), "unsigned");
        env["signature"] = "".into();
        let e = open(&serde_json::to_vec(&env).expect("json"), "t/v1", &der).expect_err("empty");
        assert_eq!(e, SignedError::NoSignature);
        // A signature of the bare payload (no domain separation), as another use of the key makes.
        let sig: Signature = k.sign(b"hello");
        let foreign = seal("t/v1", b"hello", "k1", sig.to_der().as_bytes());
        assert_eq!(
            open(&foreign, "t/v1", &der).expect_err("foreign").reason(),
            "bad_signature"
        );
    }

    #[test]
    fn pem_round_trips() {
        let (_, der) = key(3);
        let pem = public_key_der_to_pem(&der).expect("pem");
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
        assert_eq!(public_key_pem_to_der(&pem).expect("der"), der);
        assert!(public_key_pem_to_der("not pem").is_err());
    }
}
