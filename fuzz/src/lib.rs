//! What the fuzz targets share: a fixed signing key (so that seeds signed once stay valid), the
//! checks of the policy pipeline, and a reader that splits fuzz input into fields.
//!
//! Nothing here is part of the agent; it only drives the agent's public entry points.

use knhk_agent::{
    note,
    api::convert::{policy_from_proto, policy_to_proto},
    model::CgroupPath,
    policy::{check_bounds, compile_scope, scopes_of, Bindings, Counters, Policy},
    receipts::{
        format::{leaf_hash, node_hash, sha256, Hash},
        merkle, CheckpointBody, KeyRecord, KeyRef,
    },
};
use p256::{
    ecdsa::{signature::Signer as _, Signature, SigningKey},
    pkcs8::EncodePublicKey,
};

/// The private scalar of the fuzzers' signing key. A test key, public on purpose: it signs the
/// seed checkpoints and ledger, nothing else.
const TEST_KEY: [u8; 32] = [
    0x4b, 0x6e, 0x68, 0x6b, 0x2d, 0x66, 0x75, 0x7a, 0x7a, 0x2d, 0x74, 0x65, 0x73, 0x74, 0x2d, 0x6b,
    0x65, 0x79, 0x2d, 0x6e, 0x6f, 0x74, 0x2d, 0x61, 0x2d, 0x73, 0x65, 0x63, 0x72, 0x65, 0x74, 0x21,
];

/// The fuzzers' signing key.
pub fn test_key() -> SigningKey {
    SigningKey::from_slice(&TEST_KEY).expect("a valid P-256 scalar")
}

/// The test key's SubjectPublicKeyInfo DER.
pub fn test_public_der() -> Vec<u8> {
    test_key()
        .verifying_key()
        .to_public_key_der()
        .expect("encodable")
        .as_bytes()
        .to_vec()
}

/// DER ECDSA signature of `message` by the test key.
pub fn sign(message: &[u8]) -> Vec<u8> {
    let sig: Signature = test_key().sign(message);
    sig.to_der().as_bytes().to_vec()
}

/// Splits fuzz input into fields: length-prefixed byte strings and integers, reading zeros once
/// the input is exhausted (so every input is some valid framing).
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Input { bytes }
    }

    /// The next `n` bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.bytes.len());
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        head
    }

    /// A byte (0 at the end).
    pub fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    /// A big-endian u16 (zero-padded at the end).
    pub fn u16(&mut self) -> u16 {
        let mut a = [0u8; 2];
        let b = self.take(2);
        a[..b.len()].copy_from_slice(b);
        u16::from_be_bytes(a)
    }

    /// A big-endian u64 (zero-padded at the end).
    pub fn u64(&mut self) -> u64 {
        let mut a = [0u8; 8];
        let b = self.take(8);
        a[..b.len()].copy_from_slice(b);
        u64::from_be_bytes(a)
    }

    /// A byte string with a u16 length prefix.
    pub fn field(&mut self) -> &'a [u8] {
        let n = self.u16() as usize;
        self.take(n)
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }
}

/// Encodes fields as [`Input::field`] reads them.
pub fn frame(fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        out.extend_from_slice(&(f.len() as u16).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// What the agent does with a policy before it touches the kernel, as `check-config` does it:
/// the size bounds, then the trie of every scope (selector rules bound to one pod). Returns
/// whether it compiled; an error is an answer, a panic is a bug.
pub fn compile(policy: &Policy) -> bool {
    if check_bounds(&policy.rules).is_err() {
        return false;
    }
    let Ok(any_pod) = "kubepods/pod-fuzz".parse::<CgroupPath>() else {
        return false;
    };
    let bindings = Bindings {
        selected: policy
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.workloads().is_some())
            .map(|(i, _)| (i, std::iter::once(any_pod.clone()).collect()))
            .collect(),
        guard: None,
        owners: Default::default(),
    };
    let counters: Counters = (0..=policy.rules.len() as u32).collect::<Vec<u32>>().into();
    let scopes = scopes_of(&policy.rules, &bindings);
    std::iter::once(None)
        .chain(scopes.iter().map(Some))
        .all(|scope| {
            compile_scope(
                &policy.rules,
                &bindings,
                scope,
                &counters,
                policy.default_class,
            )
            .is_ok()
        })
}

/// A valid policy survives the API's encoding: to proto and back gives the same policy.
pub fn assert_proto_round_trip(policy: &Policy, defaults: &Policy, max_rules: usize) {
    let doc = policy_to_proto(policy);
    match policy_from_proto(Some(&doc), defaults, max_rules.max(policy.rules.len())) {
        Ok(back) => assert_eq!(
            back.rules, policy.rules,
            "a policy changed through its proto encoding"
        ),
        Err(e) => panic!("a valid policy's proto encoding is refused: {e:?}"),
    }
}

/// Receipts in the witness's copy of an origin's log, in the checkpoint target and its seeds.
pub const TREE: u64 = 13;

/// A small in-memory log: leaf `i` is the one byte `i`, its perfect subtrees computed on demand
/// with the RFC 6962 hashes (independently of the agent's `merkle` module).
pub struct Tree;

impl Tree {
    fn range(lo: u64, hi: u64) -> Hash {
        if hi - lo == 1 {
            return leaf_hash(&[lo as u8]);
        }
        let mut k = 1;
        while k * 2 < hi - lo {
            k *= 2;
        }
        node_hash(&Tree::range(lo, lo + k), &Tree::range(lo + k, hi))
    }

    /// The root of the first `n` leaves (`n` ≤ [`TREE`]; SHA-256 of nothing when empty).
    pub fn root(n: u64) -> Hash {
        if n == 0 {
            sha256(b"")
        } else {
            Tree::range(0, n)
        }
    }
}

impl merkle::Nodes for Tree {
    type Error = std::convert::Infallible;
    fn node(&self, level: u8, index: u64) -> Result<Hash, Self::Error> {
        let lo = index << level;
        Ok(Tree::range(lo, lo + (1 << level)))
    }
}

/// The origin of the checkpoint seeds: node-a's log in eu-west-1.
pub const ORIGIN: &str = "knhk/eu-west-1/node-a/1700000000";

/// The key the checkpoint seeds are signed with, as the witness's key history names it.
pub fn test_key_ref() -> KeyRef {
    KeyRef {
        id: "fuzz-key".into(),
        version: 1,
    }
}

/// The test key as a witness's key history holds it.
pub fn test_key_record() -> KeyRecord {
    use base64::Engine as _;
    KeyRecord {
        key: test_key_ref(),
        public_key: base64::engine::general_purpose::STANDARD.encode(test_public_der()),
        since_ns: 0,
        transition: None,
    }
}

/// The C2SP signed note of [`checkpoint_body`]`(size)`, signed by the test key.
pub fn signed_checkpoint(size: u64) -> String {
    let body = checkpoint_body(size).encode();
    let line = note::log_signature_line(ORIGIN, &test_public_der(), &sign(body.as_bytes()));
    note::render(&body, &[line])
}

/// The checkpoint body of the first `size` leaves of [`Tree`], as the origin `node-a` signs it.
pub fn checkpoint_body(size: u64) -> CheckpointBody {
    CheckpointBody {
        origin: ORIGIN.into(),
        size,
        root: Tree::root(size),
        cycle: size,
        time_ns: 1_700_000_000_000_000_000 + size as i64,
        key: test_key_ref(),
    }
}
