//! The receipts ledger against real KMS-compatible servers (moto's AWS KMS API, OpenBao's
//! transit engine) and a local key: signing, offline verification, rotation, outage, tampering,
//! legal holds. No kernel needed.

mod support;

use knhk_agent::{
    config::{ReceiptSettings, SignerSettings},
    receipts::{merkle, verify, Hold, NewReceipt, ReceiptKind, Receipts},
    tasks::TaskGroup,
};
use redb::{ReadableTable, TableDefinition};
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};
use support::kms;

fn settings(dir: &Path, signer: SignerSettings) -> ReceiptSettings {
    ReceiptSettings {
        path: dir.join("receipts.redb"),
        node: "node-a".into(),
        region: "eu-west-1".into(),
        rotation_interval: Duration::from_secs(24 * 3600),
        retention: Default::default(),
        max_pending_checkpoints: 1024,
        signer,
    }
}

/// A running ledger and the group that owns its tasks.
struct Running {
    r: Arc<Receipts>,
    tasks: TaskGroup,
}

impl std::ops::Deref for Running {
    type Target = Receipts;
    fn deref(&self) -> &Receipts {
        &self.r
    }
}

async fn start(settings: ReceiptSettings) -> Running {
    let signer = knhk_agent::receipts::connect_signer(&settings.signer)
        .await
        .expect("signer");
    let (r, tasks) = Receipts::start(settings, signer, &prometheus::Registry::new(), None, None)
        .await
        .expect("receipts");
    Running { r, tasks }
}

fn receipt(i: u64) -> NewReceipt {
    NewReceipt {
        kind: ReceiptKind::PolicySwitch,
        cycle: i,
        policy_generation: i,
        payload: format!("{{\"generation\":{i}}}").into_bytes(),
    }
}

async fn append(r: &Receipts, range: std::ops::Range<u64>) {
    for i in range {
        r.append(receipt(i)).await.expect("append");
    }
}

/// Waits until every checkpoint is signed.
async fn all_signed(r: &Receipts, within: Duration) {
    let start = Instant::now();
    loop {
        let pending = r
            .ledger()
            .unsigned_checkpoints()
            .expect("checkpoints")
            .len();
        if pending == 0 {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{pending} checkpoints still unsigned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops the ledger (its tasks stopped and awaited, so the file is closed) and verifies its
/// file offline.
async fn stop_and_verify(running: Running, path: &Path) -> verify::VerifyReport {
    let Running { r, tasks } = running;
    let late = tasks
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    assert!(late.is_empty(), "tasks that did not stop: {late:?}");
    drop(r);
    let db = redb::Database::open(path).expect("open the ledger offline");
    verify(&db).expect("verify runs")
}

/// The full flow against one signer: sign, prove, rotate, sign again, verify offline.
async fn sign_rotate_verify(signer: SignerSettings, rotated_versions: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path(), signer);
    let path = s.path.clone();
    let r = start(s).await;
    append(&r, 0..40).await;
    r.pulse(8).await;
    all_signed(&r, Duration::from_secs(20)).await;
    let first_key = r.ledger().keys().expect("keys")[0].key.clone();

    // Proofs from the stored tree verify with ct-merkle against the signed checkpoint.
    let size = r.ledger().size().expect("size");
    let root = r.ledger().root(size).expect("root");
    let path17 = r
        .ledger()
        .inclusion_proof(17, size)
        .expect("inclusion proof");
    let (leaf, _) = r.ledger().receipt(17).expect("receipt 17");
    assert!(merkle::verify_inclusion(
        &root,
        size,
        &leaf.encode(),
        17,
        &path17
    ));

    let new_key = r.rotate_now().await.expect("rotation");
    assert_ne!(new_key, first_key);
    if rotated_versions {
        assert_eq!(new_key.id, first_key.id, "rotated in place");
        assert_eq!(new_key.version, first_key.version + 1);
    }
    append(&r, 40..60).await;
    r.pulse(16).await;
    all_signed(&r, Duration::from_secs(20)).await;
    let checkpoints = r.ledger().checkpoints().expect("checkpoints");
    let last =
        knhk_agent::receipts::CheckpointBody::decode(&checkpoints.last().expect("one").1.body)
            .expect("body");
    assert_eq!(last.key, new_key, "signed by the new key");
    let old = r
        .ledger()
        .consistency_proof(size, last.size)
        .expect("consistency proof");
    assert!(merkle::verify_consistency(
        &root, size, &last.root, last.size, &old
    ));
    let rotations = r
        .ledger()
        .receipts(0, 1000)
        .expect("receipts")
        .into_iter()
        .filter(|(r, _)| r.kind == ReceiptKind::KeyRotation)
        .count();
    assert_eq!(rotations, 1, "the rotation is receipted");

    let report = stop_and_verify(r, &path).await;
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.keys, 2, "{report:?}");
    assert_eq!(
        report.receipts, 61,
        "60 and the rotation receipt: {report:?}"
    );
    assert_eq!(report.unsigned_checkpoints, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kms_signs_rotates_by_alias_and_verifies_offline() {
    let moto = kms::moto();
    // The operator creates the first key and its alias.
    let (client, key_id) = kms::create_kms_key(&moto.url).await;
    client
        .create_alias()
        .alias_name("alias/knhk-receipts")
        .target_key_id(&key_id)
        .send()
        .await
        .expect("CreateAlias");
    sign_rotate_verify(
        SignerSettings::Aws {
            region: "us-east-1".into(),
            key_id: "alias/knhk-receipts".into(),
            endpoint_url: Some(moto.url.clone()),
        },
        false,
    )
    .await;
    let alias = client
        .describe_key()
        .key_id("alias/knhk-receipts")
        .send()
        .await
        .expect("DescribeKey");
    assert_ne!(
        alias.key_metadata().expect("metadata").key_id(),
        key_id,
        "rotation moved the alias to a new key"
    );
}

async fn openbao_transit(url: &str) {
    kms::create_transit_key(url, "knhk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_transit_signs_rotates_versions_and_verifies_offline() {
    let bao = kms::openbao();
    openbao_transit(&bao.url).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "root\n").expect("token");
    sign_rotate_verify(
        SignerSettings::Vault {
            addr: bao.url.clone(),
            mount: "transit".into(),
            key_name: "knhk".into(),
            token_file: Some(token),
        },
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kms_outage_queues_checkpoints_and_the_backlog_is_signed_on_return() {
    let bao = kms::openbao();
    openbao_transit(&bao.url).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "root\n").expect("token");
    let s = settings(
        dir.path(),
        SignerSettings::Vault {
            addr: bao.url.clone(),
            mount: "transit".into(),
            key_name: "knhk".into(),
            token_file: Some(token),
        },
    );
    let path = s.path.clone();
    let r = start(s).await;
    let ready = r.r.readiness_check();
    append(&r, 0..10).await;
    r.pulse(8).await;
    all_signed(&r, Duration::from_secs(20)).await;
    assert!(ready().is_ok());

    bao.pause();
    let started = Instant::now();
    for cycle in 1..=5u64 {
        append(&r, cycle * 10..cycle * 10 + 10).await;
        r.pulse(cycle * 8 + 8).await;
    }
    let durable_during_outage = started.elapsed();
    assert_eq!(
        r.ledger().size().expect("size"),
        60,
        "receipts stay durable while the KMS is down"
    );
    // The signer fails, opens its circuit, and readiness says so with the backlog.
    let deadline = Instant::now() + Duration::from_secs(30);
    let message = loop {
        if let Err(m) = ready() {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never reported the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        message.contains("has not signed") && message.contains("wait to be signed"),
        "{message}"
    );
    let backlog = r
        .ledger()
        .unsigned_checkpoints()
        .expect("checkpoints")
        .len();
    eprintln!("outage: 50 receipts durable in {durable_during_outage:?}; backlog {backlog} checkpoints; readiness: {message}");
    assert!(backlog >= 1);

    bao.resume();
    all_signed(&r, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready().is_err() {
        assert!(Instant::now() < deadline, "readiness did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = stop_and_verify(r, &path).await;
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.receipts, 60, "nothing lost");
}

fn file_signer(dir: &Path) -> SignerSettings {
    SignerSettings::File {
        key_dir: dir.join("keys"),
    }
}

/// Flips one byte of entry `key` of a `u64`-keyed table of the ledger at `path`; returns the
/// original value.
fn flip(path: &Path, table: &str, key: u64, at: usize) -> Vec<u8> {
    let db = redb::Database::open(path).expect("open");
    let def: TableDefinition<u64, &[u8]> = TableDefinition::new(table);
    let tx = db.begin_write().expect("write");
    let original = {
        let mut t = tx.open_table(def).expect("table");
        let original = t.get(key).expect("get").expect("present").value().to_vec();
        let mut bad = original.clone();
        let i = at.min(bad.len() - 1);
        bad[i] ^= 0x01;
        t.insert(key, &bad[..]).expect("insert");
        original
    };
    tx.commit().expect("commit");
    original
}

fn restore(path: &Path, table: &str, key: u64, value: &[u8]) {
    let db = redb::Database::open(path).expect("open");
    let def: TableDefinition<u64, &[u8]> = TableDefinition::new(table);
    let tx = db.begin_write().expect("write");
    tx.open_table(def)
        .expect("table")
        .insert(key, value)
        .expect("insert");
    tx.commit().expect("commit");
}

/// Replaces tree node `(level, index)` with `value`; returns the original.
fn set_node(path: &Path, node: (u8, u64), value: Option<&[u8]>) -> Vec<u8> {
    let db = redb::Database::open(path).expect("open");
    let def: TableDefinition<(u8, u64), &[u8]> = TableDefinition::new("nodes");
    let tx = db.begin_write().expect("write");
    let original = {
        let mut t = tx.open_table(def).expect("table");
        let original = t.get(node).expect("get").expect("present").value().to_vec();
        let mut bad = original.clone();
        bad[0] ^= 0x01;
        t.insert(node, value.unwrap_or(&bad[..])).expect("insert");
        original
    };
    tx.commit().expect("commit");
    original
}

fn first_problem(path: &Path) -> String {
    let db = redb::Database::open(path).expect("open");
    let report = verify(&db).expect("verify");
    report
        .problems
        .first()
        .cloned()
        .unwrap_or_else(|| "verified".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_a_receipt_a_tree_node_or_a_signature_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path(), file_signer(dir.path()));
    let path: PathBuf = s.path.clone();
    let r = start(s).await;
    append(&r, 0..32).await;
    r.pulse(8).await;
    all_signed(&r, Duration::from_secs(10)).await;
    let report = stop_and_verify(r, &path).await;
    assert!(report.ok(), "{report:?}");

    // A receipt: its leaf no longer matches the stored tree.
    let original = flip(&path, "receipts", 10, 20);
    let p = first_problem(&path);
    assert!(p.contains("receipts 10..11"), "{p}");
    restore(&path, "receipts", 10, &original);
    // A payload: it no longer matches its receipt's hash.
    let original = flip(&path, "payloads", 5, 3);
    let p = first_problem(&path);
    assert_eq!(
        p,
        "receipt 5: its payload does not match the payload hash in its header"
    );
    restore(&path, "payloads", 5, &original);
    // A tree node.
    let original = set_node(&path, (2, 3), None);
    let p = first_problem(&path);
    assert!(p.starts_with("tree node (2, 3)"), "{p}");
    set_node(&path, (2, 3), Some(&original));
    // A checkpoint signature (its JSON's base64 signature, one character changed).
    let db = redb::Database::open(&path).expect("open");
    let def: TableDefinition<u64, &[u8]> = TableDefinition::new("checkpoints");
    let tx = db.begin_write().expect("write");
    {
        let mut t = tx.open_table(def).expect("table");
        let v = t
            .get(0)
            .expect("get")
            .expect("checkpoint 0")
            .value()
            .to_vec();
        let mut c: serde_json::Value = serde_json::from_slice(&v).expect("json");
        let sig = c["signature"].as_str().expect("signed").to_owned();
        let mut bytes = sig.into_bytes();
        bytes[10] = if bytes[10] == b'A' { b'B' } else { b'A' };
        c["signature"] = serde_json::Value::String(String::from_utf8(bytes).expect("ascii"));
        t.insert(0, &serde_json::to_vec(&c).expect("json")[..])
            .expect("insert");
    }
    tx.commit().expect("commit");
    drop(db);
    let p = first_problem(&path);
    assert!(
        p.starts_with("checkpoint 0 (size ") && p.contains("its signature does not verify"),
        "{p}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_receipts_survive_compaction_and_the_tree_still_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = settings(dir.path(), file_signer(dir.path()));
    s.retention
        .insert("policy_switch".into(), Duration::from_secs(86_400));
    let path = s.path.clone();
    let r = start(s).await;
    append(&r, 0..20).await;
    let hold = r
        .place_hold(Hold {
            id: 0,
            case_id: "CASE-7".into(),
            reason: "litigation".into(),
            seq_range: Some((5, 10)),
            time_range: None,
            kind: None,
            region: None,
            placed_ns: 0,
            released_ns: None,
        })
        .await
        .expect("place hold");
    r.pulse(8).await;
    all_signed(&r, Duration::from_secs(10)).await;
    // Two days later: everything past retention goes, except what the hold covers.
    let two_days = 2 * 86_400 * 1_000_000_000i64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    let removed = r
        .ledger()
        .compact(now + two_days, |k| {
            (k == ReceiptKind::PolicySwitch).then_some(86_400 * 1_000_000_000)
        })
        .expect("compact");
    assert_eq!(removed, 15, "20 policy switches, 5 held");
    for seq in 0..20 {
        let (_, payload) = r.ledger().receipt(seq).expect("receipt");
        assert_eq!(payload.is_some(), (5..10).contains(&seq), "receipt {seq}");
    }
    let placed = r.ledger().receipt(20).expect("hold receipt").0;
    assert_eq!(
        placed.kind,
        ReceiptKind::HoldPlaced,
        "placing a hold is receipted"
    );
    // Released: the next compaction takes them too.
    r.release_hold(hold, "case closed").await.expect("release");
    let removed = r
        .ledger()
        .compact(now + two_days, |k| {
            (k == ReceiptKind::PolicySwitch).then_some(86_400 * 1_000_000_000)
        })
        .expect("compact");
    assert_eq!(removed, 5);
    r.pulse(16).await;
    all_signed(&r, Duration::from_secs(10)).await;
    let report = stop_and_verify(r, &path).await;
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.compacted_payloads, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_signer_without_a_token_is_a_clear_error() {
    std::env::remove_var("VAULT_TOKEN");
    let e = knhk_agent::receipts::connect_signer(&SignerSettings::Vault {
        addr: "http://127.0.0.1:1".into(),
        mount: "transit".into(),
        key_name: "k".into(),
        token_file: None,
    })
    .await
    .expect_err("no token");
    assert!(
        e.to_string()
            .contains("no token: set kms.token_file or VAULT_TOKEN"),
        "{e}"
    );
    let e = knhk_agent::receipts::connect_signer(&SignerSettings::Vault {
        addr: "http://127.0.0.1:1".into(),
        mount: "transit".into(),
        key_name: "k".into(),
        token_file: Some("/nonexistent/token".into()),
    })
    .await
    .expect_err("no token file");
    assert!(
        e.to_string().contains("kms.token_file /nonexistent/token"),
        "{e}"
    );
}
