//! The ledger's storage: an embedded `redb` database (fsync on every commit) holding receipts,
//! payloads, the perfect-subtree hashes of the Merkle tree, checkpoints, the key history and
//! legal holds. Appends are batched: one transaction (one fsync) per batch. A checkpoint is
//! written in a later transaction than the receipts it covers, so it never covers a receipt
//! that is not durable.

use super::{
    format::{self, CheckpointBody, Hash, KeyRef, Receipt, ReceiptKind},
    merkle,
};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

pub(crate) const RECEIPTS: TableDefinition<u64, &[u8]> = TableDefinition::new("receipts");
pub(crate) const PAYLOADS: TableDefinition<u64, &[u8]> = TableDefinition::new("payloads");
pub(crate) const NODES: TableDefinition<(u8, u64), &[u8]> = TableDefinition::new("nodes");
pub(crate) const CHECKPOINTS: TableDefinition<u64, &[u8]> = TableDefinition::new("checkpoints");
pub(crate) const KEYS: TableDefinition<u64, &[u8]> = TableDefinition::new("keys");
pub(crate) const HOLDS: TableDefinition<u64, &[u8]> = TableDefinition::new("holds");
/// Witness cosignatures of this ledger's checkpoints: (checkpoint number, witness region) → JSON.
pub(crate) const COSIGNATURES: TableDefinition<(u64, &str), &[u8]> =
    TableDefinition::new("cosignatures");
/// Small named values (sync state of a foreign ledger, fork evidence).
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Meta: receipts `0..N` are in the archive (`N` as decimal ASCII), written by the archiver.
pub const META_ARCHIVE_ACKED_SIZE: &str = "archive_acked_size";
/// Meta: present (`1`) while an archive is configured: then [`Ledger::compact`] removes only
/// payloads of receipts below [`META_ARCHIVE_ACKED_SIZE`] (none before the first upload).
pub const META_ARCHIVE_GATE: &str = "archive_gate";

/// Why a ledger operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// The database failed.
    #[error("receipts database: {0}")]
    Db(String),
    /// Stored data is not what was written.
    #[error("receipts database is corrupt: {0}")]
    Corrupt(String),
    /// A request names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Receipts given to append are not a valid continuation of the log (the caller's fault:
    /// nothing was stored).
    #[error("{0}")]
    Refused(String),
}

/// The one mapping of ledger errors to gRPC codes, for every service that reads a ledger.
impl From<LedgerError> for tonic::Status {
    fn from(e: LedgerError) -> tonic::Status {
        match e {
            LedgerError::Db(m) => tonic::Status::unavailable(format!("receipts database: {m}")),
            LedgerError::Corrupt(m) => {
                tonic::Status::data_loss(format!("receipts database is corrupt: {m}"))
            }
            LedgerError::NotFound(m) => tonic::Status::not_found(m),
            LedgerError::Refused(m) => tonic::Status::invalid_argument(m),
        }
    }
}

fn db<E: std::fmt::Display>(e: E) -> LedgerError {
    LedgerError::Db(e.to_string())
}

/// A receipt as it travels between regions: (seq, encoding, payload unless compacted).
pub type EncodedReceipt = (u64, Vec<u8>, Option<Vec<u8>>);

/// A receipt with its payload (`None` once compacted).
pub type StoredReceipt = (Receipt, Option<Vec<u8>>);

/// A receipt to append.
#[derive(Debug, Clone)]
pub struct NewReceipt {
    /// Kind.
    pub kind: ReceiptKind,
    /// Beat cycle.
    pub cycle: u64,
    /// Live policy generation.
    pub policy_generation: u64,
    /// Payload bytes (JSON).
    pub payload: Vec<u8>,
}

/// A stored checkpoint: its body and, once signed, the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCheckpoint {
    /// The signed text ([`CheckpointBody::encode`]).
    pub body: String,
    /// DER ECDSA signature, base64; `None` while queued for the KMS.
    pub signature: Option<String>,
}

/// One signing key in the history, with the statement by which the previous key handed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Id and version.
    pub key: KeyRef,
    /// SubjectPublicKeyInfo DER, base64.
    pub public_key: String,
    /// When it became current, ns since the epoch.
    pub since_ns: i64,
    /// The transition statement ([`format::transition_statement`]) and the previous key's
    /// signature of it (base64 DER); `None` for the first key.
    pub transition: Option<(String, String)>,
}

/// A legal hold: receipts it matches are never compacted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// Hold id.
    pub id: u64,
    /// Case identifier.
    pub case_id: String,
    /// Why.
    pub reason: String,
    /// Receipt range `[from, to)`, if limited by sequence.
    pub seq_range: Option<(u64, u64)>,
    /// Time range `[from, to)` in ns, if limited by time.
    pub time_range: Option<(i64, i64)>,
    /// Kind, if limited by kind.
    pub kind: Option<String>,
    /// Region, if limited by region.
    pub region: Option<String>,
    /// When placed, ns.
    pub placed_ns: i64,
    /// When released, ns (released holds stay listed).
    pub released_ns: Option<i64>,
}

impl Hold {
    /// Whether this (active) hold covers `r`.
    pub fn covers(&self, r: &Receipt) -> bool {
        self.released_ns.is_none()
            && self.seq_range.is_none_or(|(a, b)| (a..b).contains(&r.seq))
            && self
                .time_range
                .is_none_or(|(a, b)| (a..b).contains(&r.time_ns))
            && self.kind.as_deref().is_none_or(|k| k == r.kind.as_str())
            && self.region.as_deref().is_none_or(|g| g == r.region)
    }
}

/// Reads the perfect-subtree nodes of an open read or write table.
struct TableNodes<'a, T: ReadableTable<(u8, u64), &'static [u8]>>(&'a T);

impl<T: ReadableTable<(u8, u64), &'static [u8]>> merkle::Nodes for TableNodes<'_, T> {
    type Error = LedgerError;
    fn node(&self, level: u8, index: u64) -> Result<Hash, LedgerError> {
        let v = self.0.get((level, index)).map_err(db)?.ok_or_else(|| {
            LedgerError::Corrupt(format!("tree node ({level}, {index}) is missing"))
        })?;
        v.value().try_into().map_err(|_| {
            LedgerError::Corrupt(format!("tree node ({level}, {index}) is not 32 bytes"))
        })
    }
}

/// The ledger database. Cheap to clone; reads run concurrently with the single writer.
#[derive(Clone)]
pub struct Ledger {
    db: Arc<DbCell>,
    node: String,
    region: String,
    origin: String,
}

/// The meta key of the log's origin, fixed when the ledger is created
/// ([`format::origin`] of the node, region and creation time then).
const ORIGIN: &str = "origin";

/// The open database, replaceable in place: after a failed write (a full disk, say) `redb`
/// refuses every later call until it is closed and opened again ([`Ledger::reopen`]).
struct DbCell {
    path: PathBuf,
    current: RwLock<Option<Arc<Database>>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("node", &self.node)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// `redb`'s page cache for the agent's ledger. Its default (1 GiB) let the cache, and with it
/// the agent's RSS, grow with the file (about 5 KiB per receipt appended, `docs/soak.md`).
/// Appends touch the rightmost pages and checkpoints read O(log n) tree nodes, so a few MiB keep
/// every hot page cached.
const CACHE_BYTES: usize = 4 << 20;

/// Opens (or creates) the redb database at `path` with every table.
fn open_database(path: &Path) -> Result<Database, LedgerError> {
    // redb panics on some damaged files; that is an error here, not a crash of the agent.
    let opened = std::panic::catch_unwind(|| -> Result<Database, LedgerError> {
        let database = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| db(format!("{}: {e}", path.display())))?;
        let tx = database.begin_write().map_err(db)?;
        for t in [RECEIPTS, PAYLOADS, CHECKPOINTS, KEYS, HOLDS] {
            tx.open_table(t).map_err(db)?;
        }
        tx.open_table(NODES).map_err(db)?;
        tx.open_table(COSIGNATURES).map_err(db)?;
        tx.open_table(META).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(database)
    });
    match opened {
        Ok(result) => result,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                // A panic payload that is not a string: reported without its text.
                .unwrap_or_default();
            Err(LedgerError::Corrupt(format!(
                "{}: its database structure is damaged (the database library failed on it: \
                 {msg}); restore it from a backup or move it away to start a new ledger",
                path.display()
            )))
        }
    }
}

/// The log's origin: the one recorded when the ledger was created, else (a new ledger, or one
/// written before origins were recorded) `knhk/<region>/<node>/<now>`, recorded now.
fn ledger_origin(database: &Database, node: &str, region: &str) -> Result<String, LedgerError> {
    let corrupt = |m: &str| LedgerError::Corrupt(format!("ledger record {ORIGIN:?}: {m}"));
    let tx = database.begin_write().map_err(db)?;
    let origin = {
        let mut meta = tx.open_table(META).map_err(db)?;
        let stored = meta.get(ORIGIN).map_err(db)?.map(|v| v.value().to_vec());
        match stored {
            Some(bytes) => String::from_utf8(bytes)
                .ok()
                .filter(|o| crate::note::valid_key_name(o))
                .ok_or_else(|| corrupt("not a valid origin"))?,
            None => {
                let epoch = (now_ns() / 1_000_000_000).max(0) as u64;
                let origin = format::origin(region, node, epoch);
                meta.insert(ORIGIN, origin.as_bytes()).map_err(db)?;
                origin
            }
        }
    };
    tx.commit().map_err(db)?;
    Ok(origin)
}

impl Ledger {
    /// Opens (or creates) the database at `path`; receipts are written as `node` in `region`.
    pub fn open(path: &Path, node: &str, region: &str) -> Result<Ledger, LedgerError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| db(format!("creating {}: {e}", dir.display())))?;
        }
        if let Ok(meta) = std::fs::metadata(path) {
            if !meta.is_file() {
                return Err(db(format!(
                    "{}: not a regular file (a receipts ledger is a redb database file)",
                    path.display()
                )));
            }
        }
        let database = open_database(path)?;
        let origin = ledger_origin(&database, node, region)?;
        Ok(Ledger {
            db: Arc::new(DbCell {
                path: path.to_owned(),
                current: RwLock::new(Some(Arc::new(database))),
            }),
            node: node.to_owned(),
            region: region.to_owned(),
            origin,
        })
    }

    /// Records `origin` as the log's origin (for a ledger rebuilt from a copy of another log,
    /// such as an archive; the handle keeps the origin it was opened with).
    pub fn set_origin(&self, origin: &str) -> Result<(), LedgerError> {
        self.put_meta(ORIGIN, origin.as_bytes())
    }

    /// The log's origin, `knhk/<region>/<node>/<epoch>` ([`format::origin`]), as recorded when
    /// the ledger was created (a later change of node name or region does not change it).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Receipts in the log.
    pub fn size(&self) -> Result<u64, LedgerError> {
        let tx = self.begin_read()?;
        let t = tx.open_table(RECEIPTS).map_err(db)?;
        t.len().map_err(db)
    }

    /// Appends `batch` in one durable transaction, stamped with `key` (the key that will sign
    /// their checkpoint); returns the sequence numbers.
    pub fn append(
        &self,
        batch: &[NewReceipt],
        key: &KeyRef,
    ) -> Result<std::ops::Range<u64>, LedgerError> {
        let tx = self.begin_write()?;
        let range = {
            let mut receipts = tx.open_table(RECEIPTS).map_err(db)?;
            let mut payloads = tx.open_table(PAYLOADS).map_err(db)?;
            let mut nodes = tx.open_table(NODES).map_err(db)?;
            let start = receipts.len().map_err(db)?;
            for (i, new) in batch.iter().enumerate() {
                let seq = start + i as u64;
                let receipt = Receipt {
                    seq,
                    cycle: new.cycle,
                    kind: new.kind,
                    time_ns: now_ns(),
                    policy_generation: new.policy_generation,
                    payload_len: new.payload.len() as u32,
                    payload_hash: format::sha256(&new.payload),
                    node: self.node.clone(),
                    region: self.region.clone(),
                    key_id: key.id.clone(),
                    key_version: key.version,
                };
                let encoding = receipt.encode();
                let done = {
                    let reader = TableNodes(&nodes);
                    merkle::completed_by_append(seq, format::leaf_hash(&encoding), |l, x| {
                        merkle::Nodes::node(&reader, l, x)
                    })?
                };
                for (level, index, hash) in done {
                    nodes.insert((level, index), &hash[..]).map_err(db)?;
                }
                receipts.insert(seq, &encoding[..]).map_err(db)?;
                payloads.insert(seq, &new.payload[..]).map_err(db)?;
            }
            start..start + batch.len() as u64
        };
        tx.commit().map_err(db)?;
        Ok(range)
    }

    /// Writes an unsigned checkpoint of the current tree if it grew since the last checkpoint;
    /// returns its number.
    pub fn write_checkpoint(&self, cycle: u64, key: &KeyRef) -> Result<Option<u64>, LedgerError> {
        let tx = self.begin_write()?;
        let number = {
            let receipts = tx.open_table(RECEIPTS).map_err(db)?;
            let nodes = tx.open_table(NODES).map_err(db)?;
            let mut checkpoints = tx.open_table(CHECKPOINTS).map_err(db)?;
            let size = receipts.len().map_err(db)?;
            let last = checkpoints
                .last()
                .map_err(db)?
                .map(|(k, v)| (k.value(), v.value().to_vec()));
            let (next, last_size) = match last {
                Some((k, v)) => {
                    let stored: StoredCheckpoint = serde_json::from_slice(&v)
                        .map_err(|e| LedgerError::Corrupt(format!("checkpoint {k}: {e}")))?;
                    let body = CheckpointBody::decode(&stored.body)
                        .map_err(|e| LedgerError::Corrupt(format!("checkpoint {k}: {e}")))?;
                    (k + 1, body.size)
                }
                None => (0, 0),
            };
            if size == 0 || size == last_size {
                None
            } else {
                let body = CheckpointBody {
                    origin: self.origin.clone(),
                    size,
                    root: merkle::root(&TableNodes(&nodes), size)?,
                    cycle,
                    time_ns: now_ns(),
                    key: key.clone(),
                };
                let stored = StoredCheckpoint {
                    body: body.encode(),
                    signature: None,
                };
                let json = serde_json::to_vec(&stored).map_err(db)?;
                checkpoints.insert(next, &json[..]).map_err(db)?;
                Some(next)
            }
        };
        if number.is_some() {
            tx.commit().map_err(db)?;
        } else {
            // Nothing new since the last checkpoint: no commit (and no fsync) for an idle pulse.
            tx.abort().map_err(db)?;
        }
        Ok(number)
    }

    /// Checkpoints waiting for a signature, oldest first: (number, body).
    pub fn unsigned_checkpoints(&self) -> Result<Vec<(u64, CheckpointBody)>, LedgerError> {
        // Checkpoints are signed oldest first and a signed one is final, so the unsigned ones
        // are the newest: read back only until the first signed one (the backlog, not the log).
        let mut out = Vec::new();
        self.checkpoints_newest_first(|n, c| {
            if c.signature.is_some() {
                return false;
            }
            // An undecodable checkpoint cannot be signed; verify reports it.
            out.extend(CheckpointBody::decode(&c.body).ok().map(|b| (n, b)));
            true
        })?;
        out.reverse();
        Ok(out)
    }

    /// Signs checkpoint `number`: stores `body` (the text that was signed: the stored one, or
    /// the same with the signing key filled in) and its signature. A signed checkpoint is final.
    pub fn sign_checkpoint_body(
        &self,
        number: u64,
        body: &str,
        signature: &[u8],
    ) -> Result<(), LedgerError> {
        let tx = self.begin_write()?;
        {
            let mut t = tx.open_table(CHECKPOINTS).map_err(db)?;
            let current = t
                .get(number)
                .map_err(db)?
                .map(|v| v.value().to_vec())
                .ok_or_else(|| LedgerError::NotFound(format!("no checkpoint {number}")))?;
            let stored: StoredCheckpoint = serde_json::from_slice(&current)
                .map_err(|e| LedgerError::Corrupt(format!("checkpoint {number}: {e}")))?;
            if stored.signature.is_some() {
                return Err(LedgerError::Corrupt(format!(
                    "checkpoint {number} is already signed"
                )));
            }
            let stored = StoredCheckpoint {
                body: body.to_owned(),
                signature: Some(B64.encode(signature)),
            };
            let json = serde_json::to_vec(&stored).map_err(db)?;
            t.insert(number, &json[..]).map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    /// Drops unsigned checkpoints beyond the newest `keep` (each later checkpoint covers
    /// everything an earlier one does); returns how many were dropped.
    pub fn trim_unsigned(&self, keep: usize) -> Result<usize, LedgerError> {
        let unsigned = self.unsigned_checkpoints()?;
        if unsigned.len() <= keep {
            return Ok(0);
        }
        let drop: Vec<u64> = unsigned[..unsigned.len() - keep]
            .iter()
            .map(|(n, _)| *n)
            .collect();
        let tx = self.begin_write()?;
        {
            let mut t = tx.open_table(CHECKPOINTS).map_err(db)?;
            for n in &drop {
                t.remove(*n).map_err(db)?;
            }
        }
        tx.commit().map_err(db)?;
        Ok(drop.len())
    }

    /// Every checkpoint, by number.
    pub fn checkpoints(&self) -> Result<Vec<(u64, StoredCheckpoint)>, LedgerError> {
        let tx = self.begin_read()?;
        let t = tx.open_table(CHECKPOINTS).map_err(db)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(db)? {
            let (k, v) = entry.map_err(db)?;
            let stored = serde_json::from_slice(v.value())
                .map_err(|e| LedgerError::Corrupt(format!("checkpoint {}: {e}", k.value())))?;
            out.push((k.value(), stored));
        }
        Ok(out)
    }

    /// Checkpoints newest first, for as long as `visit` returns `true`: reads only as far back
    /// as the caller needs.
    pub fn checkpoints_newest_first(
        &self,
        mut visit: impl FnMut(u64, StoredCheckpoint) -> bool,
    ) -> Result<(), LedgerError> {
        let tx = self.begin_read()?;
        let t = tx.open_table(CHECKPOINTS).map_err(db)?;
        for entry in t.iter().map_err(db)?.rev() {
            let (k, v) = entry.map_err(db)?;
            let stored = serde_json::from_slice(v.value())
                .map_err(|e| LedgerError::Corrupt(format!("checkpoint {}: {e}", k.value())))?;
            if !visit(k.value(), stored) {
                break;
            }
        }
        Ok(())
    }

    /// Checkpoint `number`, if it exists.
    pub fn checkpoint(&self, number: u64) -> Result<Option<StoredCheckpoint>, LedgerError> {
        self.get_json(CHECKPOINTS, number, "checkpoint")
    }

    /// The JSON record at `key` of `table`, if any (`what` names it in a corruption error).
    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<u64, &[u8]>,
        key: u64,
        what: &str,
    ) -> Result<Option<T>, LedgerError> {
        let tx = self.begin_read()?;
        let t = tx.open_table(table).map_err(db)?;
        let Some(v) = t.get(key).map_err(db)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| LedgerError::Corrupt(format!("{what} {key}: {e}")))
    }

    /// The receipt `seq` and its payload (`None` once compacted).
    pub fn receipt(&self, seq: u64) -> Result<StoredReceipt, LedgerError> {
        let tx = self.begin_read()?;
        let receipts = tx.open_table(RECEIPTS).map_err(db)?;
        let payloads = tx.open_table(PAYLOADS).map_err(db)?;
        let bytes = receipts
            .get(seq)
            .map_err(db)?
            .ok_or_else(|| LedgerError::NotFound(format!("no receipt {seq}")))?;
        let receipt = Receipt::decode(bytes.value())
            .map_err(|e| LedgerError::Corrupt(format!("receipt {seq}: {e}")))?;
        let payload = payloads.get(seq).map_err(db)?.map(|v| v.value().to_vec());
        Ok((receipt, payload))
    }

    /// Up to `limit` receipts from `from`.
    pub fn receipts(&self, from: u64, limit: usize) -> Result<Vec<StoredReceipt>, LedgerError> {
        let tx = self.begin_read()?;
        let receipts = tx.open_table(RECEIPTS).map_err(db)?;
        let payloads = tx.open_table(PAYLOADS).map_err(db)?;
        let mut out = Vec::new();
        for entry in receipts.range(from..).map_err(db)?.take(limit) {
            let (k, v) = entry.map_err(db)?;
            let seq = k.value();
            let receipt = Receipt::decode(v.value())
                .map_err(|e| LedgerError::Corrupt(format!("receipt {seq}: {e}")))?;
            let payload = payloads.get(seq).map_err(db)?.map(|v| v.value().to_vec());
            out.push((receipt, payload));
        }
        Ok(out)
    }

    /// Up to `limit` receipts from `from` as stored: (seq, encoding, payload unless compacted).
    pub fn encoded_receipts(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<EncodedReceipt>, LedgerError> {
        let tx = self.begin_read()?;
        let receipts = tx.open_table(RECEIPTS).map_err(db)?;
        let payloads = tx.open_table(PAYLOADS).map_err(db)?;
        let mut out = Vec::new();
        for entry in receipts.range(from..).map_err(db)?.take(limit) {
            let (k, v) = entry.map_err(db)?;
            let seq = k.value();
            let payload = payloads.get(seq).map_err(db)?.map(|v| v.value().to_vec());
            out.push((seq, v.value().to_vec(), payload));
        }
        Ok(out)
    }

    /// The root of the first `size` receipts.
    pub fn root(&self, size: u64) -> Result<Hash, LedgerError> {
        let tx = self.begin_read()?;
        let nodes = tx.open_table(NODES).map_err(db)?;
        merkle::root(&TableNodes(&nodes), size)
    }

    /// The inclusion proof of receipt `seq` in the tree of `size` receipts.
    pub fn inclusion_proof(&self, seq: u64, size: u64) -> Result<Vec<Hash>, LedgerError> {
        let have = self.size()?;
        if size == 0 || size > have || seq >= size {
            return Err(LedgerError::NotFound(format!(
                "no inclusion proof of receipt {seq} in a tree of {size} (the log has {have})"
            )));
        }
        let tx = self.begin_read()?;
        let nodes = tx.open_table(NODES).map_err(db)?;
        merkle::inclusion_path(&TableNodes(&nodes), seq, size)
    }

    /// The consistency proof from the tree of `old` receipts to that of `new`: empty when
    /// `old` is 0 (every tree extends the empty tree) or equals `new`; `old > new` is refused
    /// and a `new` beyond the log is not found, each saying so.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, LedgerError> {
        if old > new {
            return Err(LedgerError::Refused(format!(
                "old_size {old} is larger than new_size {new}: a consistency proof goes from a \
                 smaller tree to a larger one"
            )));
        }
        let have = self.size()?;
        if new > have {
            return Err(LedgerError::NotFound(format!(
                "no tree of {new} receipts: the log has {have}"
            )));
        }
        if old == 0 || old == new {
            return Ok(Vec::new());
        }
        let tx = self.begin_read()?;
        let nodes = tx.open_table(NODES).map_err(db)?;
        merkle::consistency_path(&TableNodes(&nodes), old, new)
    }

    /// The key history, oldest first.
    pub fn keys(&self) -> Result<Vec<KeyRecord>, LedgerError> {
        let tx = self.begin_read()?;
        let t = tx.open_table(KEYS).map_err(db)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(db)? {
            let (k, v) = entry.map_err(db)?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| LedgerError::Corrupt(format!("key record {}: {e}", k.value())))?,
            );
        }
        Ok(out)
    }

    /// Adds a key to the history.
    pub fn add_key(&self, record: &KeyRecord) -> Result<(), LedgerError> {
        let tx = self.begin_write()?;
        {
            let mut t = tx.open_table(KEYS).map_err(db)?;
            let next = t.last().map_err(db)?.map_or(0, |(k, _)| k.value() + 1);
            let json = serde_json::to_vec(record).map_err(db)?;
            t.insert(next, &json[..]).map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    /// Every hold, placed or released.
    pub fn holds(&self) -> Result<Vec<Hold>, LedgerError> {
        let tx = self.begin_read()?;
        let t = tx.open_table(HOLDS).map_err(db)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(db)? {
            let (k, v) = entry.map_err(db)?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| LedgerError::Corrupt(format!("hold {}: {e}", k.value())))?,
            );
        }
        Ok(out)
    }

    /// Hold `id`, placed or released (`None`: no such hold).
    pub fn hold(&self, id: u64) -> Result<Option<Hold>, LedgerError> {
        self.get_json(HOLDS, id, "hold")
    }

    /// Stores a hold (new or updated); a new hold gets the next id when `hold.id` is
    /// `u64::MAX`. Returns the id.
    pub fn put_hold(&self, mut hold: Hold) -> Result<u64, LedgerError> {
        let tx = self.begin_write()?;
        let id = {
            let mut t = tx.open_table(HOLDS).map_err(db)?;
            if hold.id == u64::MAX {
                hold.id = t.last().map_err(db)?.map_or(1, |(k, _)| k.value() + 1);
            }
            let json = serde_json::to_vec(&hold).map_err(db)?;
            t.insert(hold.id, &json[..]).map_err(db)?;
            hold.id
        };
        tx.commit().map_err(db)?;
        Ok(id)
    }

    /// Removes the payloads of receipts older than their kind's retention (`retention_ns(kind)`;
    /// `None`: keep forever) that no active hold covers. Headers, leaf and node hashes stay, so
    /// the tree still verifies. While an archive is configured ([`META_ARCHIVE_GATE`]), only
    /// payloads of receipts it acknowledged ([`META_ARCHIVE_ACKED_SIZE`]) are eligible.
    /// Returns how many payloads were removed.
    pub fn compact(
        &self,
        now_ns: i64,
        retention_ns: impl Fn(ReceiptKind) -> Option<i64>,
    ) -> Result<u64, LedgerError> {
        let holds: Vec<Hold> = self
            .holds()?
            .into_iter()
            .filter(|h| h.released_ns.is_none())
            .collect();
        // With an archive, only what it acknowledged may go.
        let archived_below = match self.meta(META_ARCHIVE_GATE)? {
            Some(_) => self
                .meta(META_ARCHIVE_ACKED_SIZE)?
                .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u64>().ok())
                .unwrap_or(0),
            None => u64::MAX,
        };
        let tx = self.begin_write()?;
        let removed = {
            let receipts = tx.open_table(RECEIPTS).map_err(db)?;
            let mut payloads = tx.open_table(PAYLOADS).map_err(db)?;
            let mut expired = Vec::new();
            for entry in payloads.iter().map_err(db)? {
                let (k, _) = entry.map_err(db)?;
                let seq = k.value();
                if seq >= archived_below {
                    continue;
                }
                let Some(bytes) = receipts.get(seq).map_err(db)? else {
                    continue;
                };
                let r = Receipt::decode(bytes.value())
                    .map_err(|e| LedgerError::Corrupt(format!("receipt {seq}: {e}")))?;
                let old = retention_ns(r.kind).is_some_and(|keep| now_ns - r.time_ns > keep);
                if old && !holds.iter().any(|h| h.covers(&r)) {
                    expired.push(seq);
                }
            }
            for seq in &expired {
                payloads.remove(*seq).map_err(db)?;
            }
            expired.len() as u64
        };
        tx.commit().map_err(db)?;
        Ok(removed)
    }

    /// The raw database, for the offline verifier and tests that tamper with it.
    pub fn database(&self) -> Result<Arc<Database>, LedgerError> {
        self.handle()
    }

    fn handle(&self) -> Result<Arc<Database>, LedgerError> {
        // A poisoned lock still holds a whole value (it is only ever replaced whole).
        self.db
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                db(format!(
                    "{} is closed after a write error and not open again yet (it is retried)",
                    self.db.path.display()
                ))
            })
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, LedgerError> {
        self.handle()?.begin_read().map_err(db)
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, LedgerError> {
        self.handle()?.begin_write().map_err(db)
    }

    /// Closes the database and opens it again: after a failed write (`ENOSPC`, an I/O error)
    /// `redb` refuses every call until then. What was committed before stays (every commit is
    /// durable); a failed commit left nothing. Waits up to 5 s for calls in progress to let go
    /// of the old handle; if the open fails (the disk still full), the ledger stays closed and
    /// every call says so until a later `reopen` succeeds.
    pub fn reopen(&self) -> Result<(), LedgerError> {
        let mut slot = self.db.current.write().unwrap_or_else(|e| e.into_inner());
        if let Some(mut old) = slot.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match Arc::try_unwrap(old) {
                    // Dropping the last handle closes the file and releases its lock.
                    Ok(database) => break drop(database),
                    Err(still) if Instant::now() < deadline => {
                        old = still;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(still) => {
                        *slot = Some(still);
                        return Err(db(format!(
                            "{}: not reopened, the database is still in use",
                            self.db.path.display()
                        )));
                    }
                }
            }
        }
        *slot = Some(Arc::new(open_database(&self.db.path)?));
        Ok(())
    }
}

/// A witness's cosignature of one of this ledger's checkpoints (C2SP `tlog-cosignature` v1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCosignature {
    /// The witness's verifier key (`name+keyid+base64`, [`crate::note::VerifierKey`]).
    pub witness_key: String,
    /// The note signature line, as the witness returned it (with its `\n`).
    pub line: String,
}

impl StoredCosignature {
    /// The witness's key name (the verifier key's first part).
    pub fn witness(&self) -> &str {
        self.witness_key.split('+').next().unwrap_or_default()
    }
}

impl Ledger {
    /// Appends receipts written elsewhere (a foreign origin's log): consecutive from the
    /// current size, each decoding, numbered as its position and matching its payload hash.
    /// Entries below the current size must equal what is stored (a re-sent batch); anything
    /// else rejects the whole batch and stores nothing. Returns the size after.
    pub fn append_encoded(&self, entries: &[EncodedReceipt]) -> Result<u64, LedgerError> {
        let tx = self.begin_write()?;
        let size = {
            let mut receipts = tx.open_table(RECEIPTS).map_err(db)?;
            let mut payloads = tx.open_table(PAYLOADS).map_err(db)?;
            let mut nodes = tx.open_table(NODES).map_err(db)?;
            let mut size = receipts.len().map_err(db)?;
            for (seq, encoding, payload) in entries {
                if *seq < size {
                    let same = receipts
                        .get(*seq)
                        .map_err(db)?
                        .is_some_and(|v| v.value() == &encoding[..]);
                    if !same {
                        return Err(LedgerError::Refused(format!(
                            "receipt {seq} differs from the one already stored for this origin"
                        )));
                    }
                    continue;
                }
                if *seq != size {
                    return Err(LedgerError::Refused(format!(
                        "receipt {seq} does not follow the {size} stored (a gap)"
                    )));
                }
                let r = Receipt::decode(encoding)
                    .map_err(|e| LedgerError::Refused(format!("receipt {seq}: {e}")))?;
                if r.seq != *seq {
                    return Err(LedgerError::Refused(format!(
                        "receipt {seq}: its encoding says seq {}",
                        r.seq
                    )));
                }
                if let Some(p) = payload {
                    if p.len() != r.payload_len as usize || format::sha256(p) != r.payload_hash {
                        return Err(LedgerError::Refused(format!(
                            "receipt {seq}: its payload does not match the payload hash in its header"
                        )));
                    }
                    payloads.insert(*seq, &p[..]).map_err(db)?;
                }
                let done = {
                    let reader = TableNodes(&nodes);
                    merkle::completed_by_append(*seq, format::leaf_hash(encoding), |l, x| {
                        merkle::Nodes::node(&reader, l, x)
                    })?
                };
                for (level, index, hash) in done {
                    nodes.insert((level, index), &hash[..]).map_err(db)?;
                }
                receipts.insert(*seq, &encoding[..]).map_err(db)?;
                size += 1;
            }
            size
        };
        tx.commit().map_err(db)?;
        Ok(size)
    }

    /// A named value.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, LedgerError> {
        let tx = self.begin_read()?;
        let t = tx.open_table(META).map_err(db)?;
        Ok(t.get(name).map_err(db)?.map(|v| v.value().to_vec()))
    }

    /// Sets a named value.
    pub fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), LedgerError> {
        let tx = self.begin_write()?;
        tx.open_table(META)
            .map_err(db)?
            .insert(name, value)
            .map_err(db)?;
        tx.commit().map_err(db)
    }

    /// Stores a foreign origin's signed checkpoint under its own number.
    pub fn put_signed_checkpoint(
        &self,
        number: u64,
        stored: &StoredCheckpoint,
    ) -> Result<(), LedgerError> {
        let json = serde_json::to_vec(stored).map_err(db)?;
        let tx = self.begin_write()?;
        tx.open_table(CHECKPOINTS)
            .map_err(db)?
            .insert(number, &json[..])
            .map_err(db)?;
        tx.commit().map_err(db)
    }

    /// Stores a witness's cosignature of checkpoint `number`.
    pub fn put_cosignature(&self, number: u64, c: &StoredCosignature) -> Result<(), LedgerError> {
        let json = serde_json::to_vec(c).map_err(db)?;
        let tx = self.begin_write()?;
        tx.open_table(COSIGNATURES)
            .map_err(db)?
            .insert((number, c.witness()), &json[..])
            .map_err(db)?;
        tx.commit().map_err(db)
    }

    /// How many witnesses cosigned checkpoint `number`.
    pub fn cosigner_count(&self, number: u64) -> Result<usize, LedgerError> {
        let tx = self.begin_read()?;
        let t = tx.open_table(COSIGNATURES).map_err(db)?;
        let mut n = 0;
        for entry in t.range((number, "")..(number + 1, "")).map_err(db)? {
            entry.map_err(db)?;
            n += 1;
        }
        Ok(n)
    }

    /// The cosignatures of checkpoint `number`, by witness name.
    pub fn cosignatures_of(&self, number: u64) -> Result<Vec<StoredCosignature>, LedgerError> {
        let tx = self.begin_read()?;
        let t = tx.open_table(COSIGNATURES).map_err(db)?;
        let mut out = Vec::new();
        for entry in t.range((number, "")..(number + 1, "")).map_err(db)? {
            let (_, v) = entry.map_err(db)?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| {
                LedgerError::Corrupt(format!("cosignature of checkpoint {number}: {e}"))
            })?);
        }
        Ok(out)
    }

    /// Up to `limit` checkpoints from number `from`, in order.
    pub fn checkpoints_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StoredCheckpoint)>, LedgerError> {
        let tx = self.begin_read()?;
        let t = tx.open_table(CHECKPOINTS).map_err(db)?;
        let mut out = Vec::new();
        for entry in t.range(from..).map_err(db)?.take(limit) {
            let (k, v) = entry.map_err(db)?;
            let stored = serde_json::from_slice(v.value())
                .map_err(|e| LedgerError::Corrupt(format!("checkpoint {}: {e}", k.value())))?;
            out.push((k.value(), stored));
        }
        Ok(out)
    }

    /// Every cosignature: (checkpoint number, cosignature).
    pub fn cosignatures(&self) -> Result<Vec<(u64, StoredCosignature)>, LedgerError> {
        let tx = self.begin_read()?;
        let t = tx.open_table(COSIGNATURES).map_err(db)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(db)? {
            let (k, v) = entry.map_err(db)?;
            let (n, _) = k.value();
            out.push((
                n,
                serde_json::from_slice(v.value()).map_err(|e| {
                    LedgerError::Corrupt(format!("cosignature of checkpoint {n}: {e}"))
                })?,
            ));
        }
        Ok(out)
    }
}

/// Table definitions, for the verifier.
pub(crate) mod tables {
    pub(crate) use super::{CHECKPOINTS, COSIGNATURES, KEYS, META, NODES, PAYLOADS, RECEIPTS};
}
