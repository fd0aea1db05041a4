//! An archive read back into a ledger file with the ledger's own functions (`add_key`,
//! `append_encoded`, `put_signed_checkpoint`), so that the one verifier (`receipts::verify`)
//! checks it. What only the archive can get wrong (an object whose content hash is not the one
//! its name says, a gap between segments, an object that does not decode) is named here.

use super::layout::{self, ObjectKind};
use crate::{
    objectstore::{Fetched, ObjectStore, ObjectUrl, StoreError},
    receipts::{KeyRecord, Ledger, StoredCheckpoint},
};
use std::path::Path;

/// What reading the archive found, besides what verifying the rebuilt ledger finds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Segments read.
    pub segments: u64,
    /// Receipts rebuilt.
    pub receipts: u64,
    /// Checkpoints read.
    pub checkpoints: u64,
    /// Key records read.
    pub keys: u64,
    /// Problems, each naming its object; empty when every object is as archived.
    pub problems: Vec<String>,
}

/// The largest object read (a segment holds at most 100,000 receipts).
const MAX_OBJECT: u64 = 1 << 30;

/// Reads every archive object under `s3://bucket/prefix` into a new ledger file at `into`
/// (which must not exist yet). A store that cannot be read is an error; damaged objects are
/// problems in the report.
pub async fn restore(
    store: &ObjectStore,
    bucket: &str,
    prefix: &str,
    into: &Path,
) -> Result<RestoreReport, StoreError> {
    let listed = store.list(bucket, &layout::under(prefix, "")).await?;
    let strip = layout::under(prefix, "");
    let mut objects: Vec<(layout::Name, String)> = Vec::new();
    for (key, _) in listed {
        let rel = key.strip_prefix(&strip).unwrap_or(&key);
        if let Some(name) = layout::parse_name(rel) {
            objects.push((name, key.clone()));
        }
    }
    let mut report = RestoreReport::default();
    let ledger = match Ledger::open(into, "archive", "archive") {
        Ok(l) => l,
        Err(e) => {
            report.problems.push(format!("{}: {e}", into.display()));
            return Ok(report);
        }
    };
    let of = |kind| {
        let mut v: Vec<&(layout::Name, String)> =
            objects.iter().filter(|(n, _)| n.kind == kind).collect();
        v.sort_by_key(|(n, _)| (n.first, n.end));
        v
    };
    // Each object is read, and its content hash compared with the one in its name.
    let read = |key: String| async move {
        let url = ObjectUrl {
            bucket: bucket.to_owned(),
            key: key.clone(),
        };
        match store.get(&url, None, MAX_OBJECT).await? {
            Fetched::Object { body, .. } => Ok(body),
            Fetched::NotModified => Err(StoreError::Unavailable {
                url: url.to_string(),
                message: "304 without a condition".into(),
            }),
        }
    };
    let hashed = |name: &layout::Name, key: &str, body: &[u8], problems: &mut Vec<String>| {
        let actual = layout::sha256_hex(body);
        if actual != name.sha256 {
            problems.push(format!(
                "s3://{bucket}/{key}: its content's SHA-256 is {actual}, not the {} its name says: the object was changed after it was archived",
                name.sha256
            ));
        }
    };
    for (i, (name, key)) in of(ObjectKind::Key).into_iter().enumerate() {
        let body = read(key.clone()).await?;
        hashed(name, key, &body, &mut report.problems);
        if name.first != i as u64 {
            report.problems.push(format!(
                "s3://{bucket}/{key}: key record {} where {i} was expected (a key record is missing)",
                name.first
            ));
        }
        match serde_json::from_slice::<KeyRecord>(&body) {
            Ok(record) => match ledger.add_key(&record) {
                Ok(()) => report.keys += 1,
                Err(e) => report.problems.push(format!("s3://{bucket}/{key}: {e}")),
            },
            Err(e) => report
                .problems
                .push(format!("s3://{bucket}/{key}: not a key record: {e}")),
        }
    }
    let mut next = 0u64;
    for (name, key) in of(ObjectKind::Segment) {
        report.segments += 1;
        if name.first != next {
            report.problems.push(format!(
                "s3://{bucket}/{key}: starts at receipt {} where {next} was expected (receipts {next}..{} are missing or overlap)",
                name.first, name.first
            ));
            break;
        }
        let body = read(key.clone()).await?;
        hashed(name, key, &body, &mut report.problems);
        let entries = match layout::decode_segment(&body) {
            Ok(e) => e,
            Err(e) => {
                report
                    .problems
                    .push(format!("s3://{bucket}/{key}: not a segment: {e}"));
                break;
            }
        };
        if entries.first().map(|e| e.0) != Some(name.first)
            || name.first + entries.len() as u64 != name.end
        {
            report.problems.push(format!(
                "s3://{bucket}/{key}: holds receipts {}..{}, not the {}..{} its name says",
                entries.first().map_or(0, |e| e.0),
                entries.first().map_or(0, |e| e.0) + entries.len() as u64,
                name.first,
                name.end
            ));
            break;
        }
        match ledger.append_encoded(&entries) {
            Ok(size) => {
                report.receipts = size;
                next = name.end;
            }
            Err(e) => {
                report.problems.push(format!("s3://{bucket}/{key}: {e}"));
                break;
            }
        }
    }
    let mut origin_recorded = false;
    for (name, key) in of(ObjectKind::Checkpoint) {
        let body = read(key.clone()).await?;
        hashed(name, key, &body, &mut report.problems);
        match serde_json::from_slice::<StoredCheckpoint>(&body) {
            Ok(c) => match ledger.put_signed_checkpoint(name.first, &c) {
                // The archive is one log: its first checkpoint's origin is the log's, which
                // the verifier then holds every other checkpoint to.
                Ok(()) if !origin_recorded => {
                    if let Ok(b) = crate::receipts::CheckpointBody::decode(&c.body) {
                        if let Err(e) = ledger.set_origin(&b.origin) {
                            report.problems.push(format!("{}: {e}", into.display()));
                        }
                        origin_recorded = true;
                    }
                    report.checkpoints += 1;
                }
                Ok(()) => report.checkpoints += 1,
                Err(e) => report.problems.push(format!("s3://{bucket}/{key}: {e}")),
            },
            Err(e) => report
                .problems
                .push(format!("s3://{bucket}/{key}: not a checkpoint: {e}")),
        }
    }
    if objects.is_empty() {
        report
            .problems
            .push(format!("s3://{bucket}/{prefix}: no archive objects there"));
    }
    Ok(report)
}
