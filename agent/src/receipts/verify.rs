//! Offline verification of a ledger with nothing but its public keys: every receipt decodes and
//! matches its payload hash, every stored tree node matches the receipts below it, every
//! checkpoint's root matches the receipts it covers and its signature verifies with its key,
//! and every key after the first was handed over by a statement signed with the previous one.
//! Problems are reported in order, each naming the entry (the first is the first bad entry).
//!
//! All of that is internal consistency: a copy whose keys were all swapped and whose
//! checkpoints were all re-signed passes it. Only trusted keys (pinned by fingerprint) anchor
//! it: with pins, the newest signed checkpoint must be signed by a pinned key or by a key
//! handed over from one through verified transition statements.

use super::{
    format::{self, CheckpointBody, Hash, Receipt},
    ledger::{tables::*, KeyRecord, LedgerError, StoredCheckpoint},
    merkle,
    signer::verify_signature,
};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, StorageError};
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

/// What verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Receipts checked.
    pub receipts: u64,
    /// Receipts whose payload was compacted away (header and hashes still verified).
    pub compacted_payloads: u64,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// Of which not yet signed (queued for the KMS).
    pub unsigned_checkpoints: u64,
    /// Keys in the history.
    pub keys: usize,
    /// Witness cosignatures checked.
    pub cosignatures: u64,
    /// The key history, oldest first, with fingerprints to compare with the KMS.
    pub key_history: Vec<KeyEntry>,
    /// The log's origin (the recorded one, else its first checkpoint's).
    pub origin: Option<String>,
    /// Each witness whose cosignatures verified, with the newest size it cosigned.
    pub witnesses: Vec<WitnessEntry>,
    /// What the signatures were anchored to.
    pub trust: Trust,
    /// Everything wrong, in order; empty when the ledger verifies.
    pub problems: Vec<String>,
}

/// One key of the history as verification saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct KeyEntry {
    /// `id#version`.
    pub key: String,
    /// [`format::fingerprint`] of its SubjectPublicKeyInfo.
    pub fingerprint: String,
    /// When it became current, ns since the epoch.
    pub since_ns: i64,
    /// A trusted key, or handed over from one by verified transition statements.
    pub anchored: bool,
}

/// A witness as verification saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WitnessEntry {
    /// Its C2SP verifier key (compare it with the witness's `--print-key`).
    pub verifier_key: String,
    /// Its cosignatures that verified.
    pub cosignatures: u64,
    /// The largest checkpoint size it cosigned.
    pub newest_size: u64,
}

/// The trust anchor of a verification.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Trust {
    /// Whether trusted keys were given; without them only internal consistency is checked.
    pub pinned: bool,
    /// The trusted keys' fingerprints.
    pub trusted_keys: Vec<String>,
    /// Receipts `0..anchored_size` are covered by a checkpoint signed by an anchored key.
    pub anchored_size: Option<u64>,
    /// One sentence saying what was (and was not) established.
    pub statement: String,
}

/// What an unpinned verification establishes, said plainly.
pub const UNPINNED_STATEMENT: &str = "internal consistency only: no trusted key was given \
     (--trusted-key), so the signatures show that the ledger agrees with itself, not that its \
     keys are yours; compare the fingerprints above with your KMS, or pin one";

impl VerifyReport {
    /// Whether the ledger verifies.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

const MAX_PROBLEMS: usize = 100;

fn db<E: std::fmt::Display>(e: E) -> LedgerError {
    LedgerError::Db(e.to_string())
}

/// Why a ledger file could not be verified at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyFileError {
    /// The file cannot be opened: missing, unreadable, not a regular file, or held by a
    /// running agent.
    #[error("cannot open {path}: {reason}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file is not a readable ledger: its database structure is damaged.
    #[error("{path} is not a readable receipts ledger: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is damaged.
        reason: String,
    },
}

/// Verifies the ledger file at `path` without writing to it: opened read-only. A ledger that
/// was not closed cleanly (a crash, or a copy taken while the agent wrote) needs redb's repair,
/// which writes; it is then repaired and verified in a private temporary copy, and the file
/// itself is still not written. Never panics: a damaged file is an error.
pub fn verify_file(path: &Path) -> Result<VerifyReport, VerifyFileError> {
    verify_file_with(path, &[])
}

/// [`verify_file`] anchored to `trusted` key fingerprints ([`format::fingerprint`]'s form);
/// none: internal consistency only.
pub fn verify_file_with(path: &Path, trusted: &[String]) -> Result<VerifyReport, VerifyFileError> {
    let open = |reason: String| VerifyFileError::Open {
        path: path.to_owned(),
        reason,
    };
    let corrupt = |reason: String| VerifyFileError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    // A FIFO or device would block or never end; only a regular file can be a ledger.
    let meta = std::fs::metadata(path).map_err(|e| {
        open(if e.kind() == std::io::ErrorKind::NotFound {
            "the file does not exist (check --db)".into()
        } else {
            e.to_string()
        })
    })?;
    if !meta.is_file() {
        return Err(open(
            "it is not a regular file (a receipts ledger is a redb database file)".into(),
        ));
    }
    let opened = catch_panic(|| redb::Builder::new().open_read_only(path));
    let result = match opened {
        Err(panic) => return Err(corrupt(panic)),
        Ok(Ok(database)) => catch_panic(|| verify_with(&database, trusted)),
        Ok(Err(DatabaseError::RepairAborted)) => {
            tracing::warn!(
                ledger = %path.display(),
                "the ledger was not closed cleanly (an agent crash, or a copy taken while it \
                 wrote): verifying a repaired private copy; the file itself is not written"
            );
            let copy = PrivateCopy::of(path).map_err(|e| open(e.to_string()))?;
            catch_panic(|| {
                let database =
                    Database::open(&copy.0).map_err(|e| LedgerError::Db(e.to_string()))?;
                verify_with(&database, trusted)
            })
        }
        Ok(Err(DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch)) => {
            return Err(open(
                "it is open by a running agent (stop the agent, or verify a copy)".into(),
            ))
        }
        Ok(Err(DatabaseError::Storage(StorageError::Io(e))))
            if !matches!(
                e.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            return Err(open(e.to_string()))
        }
        Ok(Err(e)) => return Err(corrupt(e.to_string())),
    };
    match result {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(e)) => Err(corrupt(e.to_string())),
        Err(panic) => Err(corrupt(panic)),
    }
}

/// Runs `f`, turning a panic (redb asserts on some damaged files) into its message.
fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        format!("its database structure is damaged (the database library failed on it: {msg})")
    })
}

/// A copy of a file in the temporary directory, readable only by this user, removed on drop.
struct PrivateCopy(PathBuf);

impl PrivateCopy {
    fn of(path: &Path) -> std::io::Result<PrivateCopy> {
        use std::os::unix::fs::OpenOptionsExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let copy =
            std::env::temp_dir().join(format!("knhk-verify-{}-{nanos}.redb", std::process::id()));
        let mut to = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&copy)?;
        let guard = PrivateCopy(copy);
        std::io::copy(&mut std::fs::File::open(path)?, &mut to)?;
        Ok(guard)
    }
}

impl Drop for PrivateCopy {
    fn drop(&mut self) {
        // Best effort: a temporary copy in the system's temp directory.
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Verifies the ledger in `database` (opened read-only, or read-write): internal consistency
/// only, as no key is trusted.
pub fn verify(database: &impl ReadableDatabase) -> Result<VerifyReport, LedgerError> {
    verify_with(database, &[])
}

/// [`verify`], anchored to the keys whose fingerprints are `trusted` (none: internal
/// consistency only, and the report says so).
pub fn verify_with(
    database: &impl ReadableDatabase,
    trusted: &[String],
) -> Result<VerifyReport, LedgerError> {
    let mut report = VerifyReport::default();
    let mut problem = |report: &mut VerifyReport, p: String| {
        if report.problems.len() < MAX_PROBLEMS {
            report.problems.push(p);
        }
    };
    let tx = database.begin_read().map_err(db)?;

    // Keys and their hand-over chain.
    let mut keys: HashMap<format::KeyRef, Vec<u8>> = HashMap::new();
    let mut anchored: HashMap<format::KeyRef, bool> = HashMap::new();
    let mut previous_anchored = false;
    let mut previous: Option<KeyRecord> = None;
    for entry in tx.open_table(KEYS).map_err(db)?.iter().map_err(db)? {
        let (k, v) = entry.map_err(db)?;
        let record: KeyRecord = match serde_json::from_slice(v.value()) {
            Ok(r) => r,
            Err(e) => {
                problem(
                    &mut report,
                    format!("key record {}: does not parse: {e}", k.value()),
                );
                continue;
            }
        };
        let Ok(public) = B64.decode(&record.public_key) else {
            problem(
                &mut report,
                format!("key {}: public key is not base64", record.key),
            );
            continue;
        };
        let mut handed_over = false;
        if let Some(prev) = &previous {
            // An unknown previous key: an empty key, which verifies nothing (reported).
            let prev_public = keys.get(&prev.key).cloned().unwrap_or_default();
            match check_handover(prev, &prev_public, &record) {
                Ok(()) => handed_over = true,
                Err(why) => problem(&mut report, why),
            }
        }
        let fingerprint = format::fingerprint(&public);
        let is_anchored = trusted.contains(&fingerprint) || (previous_anchored && handed_over);
        report.key_history.push(KeyEntry {
            key: record.key.to_string(),
            fingerprint,
            since_ns: record.since_ns,
            anchored: is_anchored,
        });
        anchored.insert(record.key.clone(), is_anchored);
        previous_anchored = is_anchored;
        keys.insert(record.key.clone(), public);
        previous = Some(record);
        report.keys += 1;
    }

    // Checkpoints, in order of size.
    let mut checkpoints: Vec<(u64, StoredCheckpoint, CheckpointBody)> = Vec::new();
    for entry in tx.open_table(CHECKPOINTS).map_err(db)?.iter().map_err(db)? {
        let (k, v) = entry.map_err(db)?;
        let number = k.value();
        let stored: StoredCheckpoint = match serde_json::from_slice(v.value()) {
            Ok(s) => s,
            Err(e) => {
                problem(
                    &mut report,
                    format!("checkpoint {number}: does not parse: {e}"),
                );
                continue;
            }
        };
        match CheckpointBody::decode(&stored.body) {
            Ok(body) => checkpoints.push((number, stored, body)),
            Err(e) => problem(&mut report, format!("checkpoint {number}: {e}")),
        }
    }
    checkpoints.sort_by_key(|(_, _, b)| b.size);
    // One log, one origin: the recorded one, else the first checkpoint's.
    let recorded = tx
        .open_table(super::ledger::tables::META)
        .map_err(db)?
        .get("origin")
        .map_err(db)?
        .map(|v| String::from_utf8_lossy(v.value()).into_owned());
    report.origin = recorded.or_else(|| checkpoints.first().map(|(_, _, b)| b.origin.clone()));
    if let Some(origin) = report.origin.clone() {
        for (number, _, body) in &checkpoints {
            if body.origin != origin {
                problem(
                    &mut report,
                    format!(
                        "checkpoint {number}: its origin {} is not the log's origin {origin}",
                        body.origin
                    ),
                );
            }
        }
    }
    let mut next_checkpoint = 0;

    // Receipts, rebuilding the tree's right frontier and checking every stored node.
    let receipts = tx.open_table(RECEIPTS).map_err(db)?;
    let payloads = tx.open_table(PAYLOADS).map_err(db)?;
    let nodes = tx.open_table(NODES).map_err(db)?;
    let mut frontier: HashMap<(u8, u64), Hash> = HashMap::new();
    let mut expected_seq = 0u64;
    for entry in receipts.iter().map_err(db)? {
        let (k, v) = entry.map_err(db)?;
        let seq = k.value();
        if seq != expected_seq {
            problem(
                &mut report,
                format!("receipt {expected_seq}: missing (the next stored one is {seq})"),
            );
        }
        let encoding = v.value();
        match Receipt::decode(encoding) {
            Err(e) => problem(&mut report, format!("receipt {seq}: {e}")),
            Ok(r) => {
                if r.seq != seq {
                    problem(
                        &mut report,
                        format!("receipt {seq}: its encoding says seq {}", r.seq),
                    );
                }
                match payloads.get(seq).map_err(db)? {
                    None => report.compacted_payloads += 1,
                    Some(p) => {
                        let p = p.value();
                        if p.len() != r.payload_len as usize || format::sha256(p) != r.payload_hash
                        {
                            problem(&mut report, format!("receipt {seq}: its payload does not match the payload hash in its header"));
                        }
                    }
                }
            }
        }
        let done = merkle::completed_by_append(seq, format::leaf_hash(encoding), |l, x| {
            frontier.remove(&(l, x)).ok_or(())
        })
        // A missing node is reported as a root mismatch below.
        .unwrap_or_default();
        if let Some(&(level, index, hash)) = done.last() {
            // The lower ones were combined into it: only the top joins the frontier.
            frontier.insert((level, index), hash);
        }
        for (level, index, hash) in done {
            let stored = nodes
                .get((level, index))
                .map_err(db)?
                .map(|v| v.value().to_vec());
            if stored.as_deref() != Some(&hash[..]) {
                problem(
                    &mut report,
                    format!(
                        "tree node ({level}, {index}) does not match the receipts {}..{} below it",
                        // u128: a damaged ledger's seq can be near u64::MAX.
                        u128::from(index) << level,
                        (u128::from(index) + 1) << level
                    ),
                );
            }
        }
        // Saturating: a damaged ledger may store seq u64::MAX (the last key there can be).
        expected_seq = seq.saturating_add(1);
        report.receipts += 1;
        // Checkpoints of exactly this size.
        while next_checkpoint < checkpoints.len()
            && checkpoints[next_checkpoint].2.size <= report.receipts
        {
            let (number, stored, body) = &checkpoints[next_checkpoint];
            check_checkpoint(
                &mut report,
                *number,
                stored,
                body,
                &frontier,
                &keys,
                &mut problem,
            );
            next_checkpoint += 1;
        }
    }
    // Witness cosignatures, each over its checkpoint's body.
    let bodies: HashMap<u64, (String, u64)> = checkpoints
        .iter()
        .map(|(n, s, b)| (*n, (s.body.clone(), b.size)))
        .collect();
    for entry in tx
        .open_table(COSIGNATURES)
        .map_err(db)?
        .iter()
        .map_err(db)?
    {
        let (k, v) = entry.map_err(db)?;
        let (number, witness) = k.value();
        let witness = witness.to_owned();
        report.cosignatures += 1;
        let c: super::ledger::StoredCosignature = match serde_json::from_slice(v.value()) {
            Ok(c) => c,
            Err(e) => {
                problem(
                    &mut report,
                    format!("cosignature of checkpoint {number} by {witness}: does not parse: {e}"),
                );
                continue;
            }
        };
        let Some((body, size)) = bodies.get(&number) else {
            problem(
                &mut report,
                format!("cosignature of checkpoint {number} by {witness}: no such checkpoint"),
            );
            continue;
        };
        match check_cosignature(&c, body) {
            Err(why) => problem(
                &mut report,
                format!("cosignature of checkpoint {number} by {witness}: {why}"),
            ),
            Ok(()) => {
                let i = match report
                    .witnesses
                    .iter()
                    .position(|w| w.verifier_key == c.witness_key)
                {
                    Some(i) => i,
                    None => {
                        report.witnesses.push(WitnessEntry {
                            verifier_key: c.witness_key.clone(),
                            ..Default::default()
                        });
                        report.witnesses.len() - 1
                    }
                };
                let w = &mut report.witnesses[i];
                w.cosignatures += 1;
                w.newest_size = w.newest_size.max(*size);
            }
        }
    }
    let total = report.receipts;
    for (number, _, body) in &checkpoints[next_checkpoint..] {
        problem(
            &mut report,
            format!(
                "checkpoint {number}: covers {} receipts but the log has {total}",
                body.size
            ),
        );
    }

    // The trust anchor: the newest signed checkpoint covers every receipt below its size, and
    // every other checkpoint was checked against the same receipts.
    report.trust.pinned = !trusted.is_empty();
    report.trust.trusted_keys = trusted.to_vec();
    if report.trust.pinned {
        let newest_signed = checkpoints
            .iter()
            .rev()
            .find(|(_, stored, _)| stored.signature.is_some());
        let list = |fps: &mut dyn Iterator<Item = &String>| {
            let v: Vec<&str> = fps.map(String::as_str).collect();
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        if !report
            .key_history
            .iter()
            .any(|k| trusted.contains(&k.fingerprint))
        {
            let ledger_keys = list(&mut report.key_history.iter().map(|k| &k.fingerprint));
            problem(
                &mut report,
                format!(
                    "no key of the ledger is a trusted key: its keys are {ledger_keys}; trusted: {}",
                    list(&mut trusted.iter())
                ),
            );
        } else {
            match newest_signed {
                None => problem(
                    &mut report,
                    "no checkpoint is signed: nothing in the ledger is signed by a trusted key"
                        .into(),
                ),
                Some((number, _, body)) if !anchored.get(&body.key).copied().unwrap_or(false) => {
                    problem(
                        &mut report,
                        format!(
                            "checkpoint {number} (size {}), the newest signed one, is signed by {}, \
                             which is neither a trusted key nor handed over from one by verified \
                             transition statements",
                            body.size, body.key
                        ),
                    )
                }
                Some((_, _, body)) => report.trust.anchored_size = Some(body.size),
            }
        }
    }
    report.trust.statement = match (report.trust.pinned, report.trust.anchored_size) {
        (false, _) => UNPINNED_STATEMENT.to_owned(),
        (true, Some(size)) if report.ok() => {
            let mut s = format!(
                "anchored: receipts 0..{size} are covered by a checkpoint signed by a trusted key \
                 (or one handed over from it by verified transition statements)"
            );
            if total > size {
                s.push_str(&format!(
                    "; the {} later receipts are not covered by a signed checkpoint yet",
                    total - size
                ));
            }
            s
        }
        (true, _) => "not anchored to a trusted key: see the problems".to_owned(),
    };
    Ok(report)
}

/// Checks that `prev` (whose SubjectPublicKeyInfo DER is `prev_public`) handed over to
/// `next`: `next` carries a transition statement naming `prev` → `next` with `next`'s public
/// key, signed by `prev`. The error names the key and what is wrong.
pub fn check_handover(
    prev: &KeyRecord,
    prev_public: &[u8],
    next: &KeyRecord,
) -> Result<(), String> {
    let Some((statement, signature)) = &next.transition else {
        return Err(format!(
            "key {}: no transition statement from the previous key {}",
            next.key, prev.key
        ));
    };
    let expected_prefix = format!(
        "{}\nfrom: {}\nto: {}\nto_public_key: {}\n",
        format::TRANSITION_HEADER,
        prev.key,
        next.key,
        next.public_key
    );
    if !statement.starts_with(&expected_prefix) {
        return Err(format!(
            "key {}: its transition statement does not name {} → {} with this public key",
            next.key, prev.key, next.key
        ));
    }
    if !B64
        .decode(signature)
        .is_ok_and(|sig| verify_signature(prev_public, statement.as_bytes(), &sig))
    {
        return Err(format!(
            "key {}: its transition statement is not signed by the previous key {}",
            next.key, prev.key
        ));
    }
    Ok(())
}

/// Whether a stored cosignature is its witness key's valid `cosignature/v1` of `body`.
fn check_cosignature(c: &super::ledger::StoredCosignature, body: &str) -> Result<(), String> {
    let key = crate::note::VerifierKey::parse(&c.witness_key)?;
    let line = crate::note::SignatureLine::parse(c.line.trim_end_matches('\n'))?;
    let cosignature = crate::note::Cosignature::from_line(&line)?;
    if cosignature.verify(body, &key) {
        Ok(())
    } else {
        Err(format!(
            "the signature does not verify with {}",
            c.witness_key
        ))
    }
}

fn check_checkpoint(
    report: &mut VerifyReport,
    number: u64,
    stored: &StoredCheckpoint,
    body: &CheckpointBody,
    frontier: &HashMap<(u8, u64), Hash>,
    keys: &HashMap<format::KeyRef, Vec<u8>>,
    problem: &mut impl FnMut(&mut VerifyReport, String),
) {
    report.checkpoints += 1;
    if body.size != report.receipts {
        problem(
            report,
            format!(
                "checkpoint {number}: size {} is not a size the log had",
                body.size
            ),
        );
        return;
    }
    // The root from the frontier: perfect subtrees right to left.
    let mut parts: Vec<(u8, u64, Hash)> = frontier.iter().map(|((l, i), h)| (*l, *i, *h)).collect();
    parts.sort_by_key(|(l, i, _)| std::cmp::Reverse(i << l));
    let root = parts
        .iter()
        .map(|(_, _, h)| *h)
        .reduce(|acc, left| format::node_hash(&left, &acc));
    if root != Some(body.root) {
        problem(
            report,
            format!(
                "checkpoint {number} (size {}): its root does not match the receipts",
                body.size
            ),
        );
    }
    match &stored.signature {
        None => report.unsigned_checkpoints += 1,
        Some(sig) => {
            let Some(public) = keys.get(&body.key) else {
                problem(
                    report,
                    format!(
                        "checkpoint {number}: signed by {}, which is not in the key history",
                        body.key
                    ),
                );
                return;
            };
            let valid = B64
                .decode(sig)
                .is_ok_and(|s| verify_signature(public, stored.body.as_bytes(), &s));
            if !valid {
                problem(
                    report,
                    format!(
                        "checkpoint {number} (size {}): its signature does not verify with key {}",
                        body.size, body.key
                    ),
                );
            }
        }
    }
}

/// Where an AWS KMS key named by `--trusted-key aws-kms:KEY_ID` is asked for its public key.
#[derive(Debug, Clone, Default)]
pub struct KmsLookup {
    /// AWS region (default `us-east-1`).
    pub region: Option<String>,
    /// A KMS-compatible endpoint instead of AWS's.
    pub endpoint_url: Option<String>,
}

/// The fingerprint ([`format::fingerprint`]) of a trusted key given as: a fingerprint
/// (`sha256:<64 hex digits>` or the digits alone); `aws-kms:KEY_ID` (a key id, ARN or alias,
/// whose public key AWS KMS `GetPublicKey` returns: an alias names its current key); or a file
/// holding a P-256 public key as PEM (`-----BEGIN PUBLIC KEY-----`, SubjectPublicKeyInfo) or
/// as SubjectPublicKeyInfo DER. The error says which form was expected and why it failed.
pub async fn trusted_key_fingerprint(arg: &str, kms: &KmsLookup) -> Result<String, String> {
    if let Some(fp) = format::parse_fingerprint(arg) {
        return Ok(fp);
    }
    if let Some(key_id) = arg.strip_prefix("aws-kms:") {
        return aws_public_key(key_id, kms)
            .await
            .map(|der| format::fingerprint(&der));
    }
    let bytes = std::fs::read(arg).map_err(|e| {
        format!(
            "--trusted-key {arg}: not a fingerprint (sha256:<64 hex digits>) nor aws-kms:KEY_ID, \
             and not a readable public key file: {e}"
        )
    })?;
    let der = match std::str::from_utf8(&bytes) {
        Ok(text) if text.contains("-----BEGIN") => {
            if !text.contains("-----BEGIN PUBLIC KEY-----") {
                return Err(format!(
                    "--trusted-key {arg}: a PEM file, but not a public key \
                     (-----BEGIN PUBLIC KEY-----, SubjectPublicKeyInfo)"
                ));
            }
            super::signer::public_key_pem_to_der(text)
                .map_err(|e| format!("--trusted-key {arg}: not a P-256 public key in PEM: {e}"))?
        }
        _ => spki_der(&bytes).map_err(|e| {
            format!("--trusted-key {arg}: not a P-256 SubjectPublicKeyInfo (PEM or DER): {e}")
        })?,
    };
    Ok(format::fingerprint(&der))
}

/// `bytes` as a P-256 SubjectPublicKeyInfo DER, re-encoded canonically.
fn spki_der(bytes: &[u8]) -> Result<Vec<u8>, String> {
    use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
    let key = p256::PublicKey::from_public_key_der(bytes).map_err(|e| e.to_string())?;
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .map_err(|e| e.to_string())
}

#[cfg(feature = "aws-kms")]
async fn aws_public_key(key_id: &str, kms: &KmsLookup) -> Result<Vec<u8>, String> {
    use super::signer::Signer as _;
    if key_id.is_empty() {
        return Err("--trusted-key aws-kms: names no key (aws-kms:KEY_ID, e.g. aws-kms:alias/knhk-receipts)".into());
    }
    let signer = super::signer::AwsSigner::new(
        kms.region.as_deref().unwrap_or("us-east-1"),
        key_id,
        kms.endpoint_url.as_deref(),
    )
    .await;
    signer
        .current()
        .await
        .map(|k| k.public_key_der)
        .map_err(|e| format!("--trusted-key aws-kms:{key_id}: {e}"))
}

#[cfg(not(feature = "aws-kms"))]
async fn aws_public_key(key_id: &str, _: &KmsLookup) -> Result<Vec<u8>, String> {
    Err(format!(
        "--trusted-key aws-kms:{key_id}: this build of knhk-agent lacks the aws-kms feature"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `ledger_verify` fuzz target: a damaged receipts table whose last key is
    /// u64::MAX made the expected sequence number overflow (a panic with overflow checks, caught
    /// by `verify_file` as "damaged"; a wrapped counter without them). It is a problem report.
    #[test]
    fn a_receipt_at_the_largest_seq_is_reported_not_a_panic() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("receipts.redb");
        drop(super::super::Ledger::open(&path, "node-a", "eu-west-1").expect("ledger"));
        let database = Database::open(&path).expect("open");
        let tx = database.begin_write().expect("write");
        {
            let mut receipts = tx.open_table(RECEIPTS).expect("table");
            receipts
                .insert(u64::MAX, &b"not a receipt"[..])
                .expect("insert");
        }
        tx.commit().expect("commit");
        let report = verify(&database).expect("verification runs");
        assert!(!report.ok());
        assert!(
            report.problems[0].contains(&format!("the next stored one is {}", u64::MAX)),
            "{:?}",
            report.problems
        );
    }
}
