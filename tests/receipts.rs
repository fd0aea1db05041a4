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
    start_with(settings, signer).await
}

/// Starts a ledger on a signer made by the test.
async fn start_with(
    settings: ReceiptSettings,
    signer: Arc<dyn knhk_agent::receipts::Signer>,
) -> Running {
    start_on(settings, signer, &prometheus::Registry::new()).await
}

/// Starts a ledger on a signer made by the test, its metrics in `registry`.
async fn start_on(
    settings: ReceiptSettings,
    signer: Arc<dyn knhk_agent::receipts::Signer>,
    registry: &prometheus::Registry,
) -> Running {
    let (r, tasks) = Receipts::start(settings, signer, registry, None, None)
        .await
        .expect("receipts");
    Running { r, tasks }
}

/// Whether the KMS circuit breaker of the ledger whose metrics are in `registry` is open.
fn circuit_open(registry: &prometheus::Registry) -> bool {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("metrics");
    text.contains("knhk_receipts_kms_circuit{state=\"open\"} 1")
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

/// A receipt appended and acknowledged: its sequence number, which [`receipt`] it is, and the
/// Merkle leaf hash of what the ledger held when the append was acknowledged.
type Acked = (u64, u64, knhk_agent::receipts::format::Hash);

/// Appends receipts `range`; returns each one's acknowledgement.
async fn append_acked(r: &Receipts, range: std::ops::Range<u64>) -> Vec<Acked> {
    let mut acked = Vec::new();
    for i in range {
        let seq = r.append(receipt(i)).await.expect("append");
        let (stored, _) = r.ledger().receipt(seq).expect("an acknowledged receipt");
        acked.push((seq, i, merkle::leaf(&stored.encode())));
    }
    acked
}

/// No acknowledged receipt is lost or changed: each is in the ledger as appended, under the
/// newest signed checkpoint, with an inclusion proof against its signed root.
fn assert_acknowledged_are_signed(r: &Receipts, acked: &[Acked]) {
    let (_, newest) = r
        .ledger()
        .checkpoints()
        .expect("checkpoints")
        .into_iter()
        .rev()
        .find(|(_, c)| c.signature.is_some())
        .expect("a signed checkpoint");
    let body = knhk_agent::receipts::CheckpointBody::decode(&newest.body).expect("body");
    for &(seq, i, leaf) in acked {
        assert!(
            seq < body.size,
            "acknowledged receipt {seq} is not under the newest signed checkpoint (size {})",
            body.size
        );
        let (stored, payload) = r.ledger().receipt(seq).expect("an acknowledged receipt");
        assert_eq!(
            (stored.cycle, payload),
            (i, Some(receipt(i).payload)),
            "acknowledged receipt {seq}"
        );
        assert_eq!(
            merkle::leaf(&stored.encode()),
            leaf,
            "receipt {seq} changed since it was acknowledged"
        );
        let path = r
            .ledger()
            .inclusion_proof(seq, body.size)
            .expect("inclusion proof");
        assert!(
            merkle::verify_inclusion(&body.root, body.size, &stored.encode(), seq, &path),
            "acknowledged receipt {seq} is not in the signed tree"
        );
    }
}

/// How many checkpoints are signed.
fn signed_checkpoints(r: &Receipts) -> usize {
    r.ledger()
        .checkpoints()
        .expect("checkpoints")
        .iter()
        .filter(|(_, c)| c.signature.is_some())
        .count()
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
    let connected = knhk_agent::receipts::connect_signer(&signer)
        .await
        .expect("signer");
    sign_rotate_verify_on(dir.path(), signer, connected, rotated_versions).await;
}

/// [`sign_rotate_verify`] with a ledger in `dir` on a connected signer; returns the first and
/// the rotated key.
async fn sign_rotate_verify_on(
    dir: &Path,
    signer: SignerSettings,
    connected: Arc<dyn knhk_agent::receipts::Signer>,
    rotated_versions: bool,
) -> (knhk_agent::receipts::KeyRef, knhk_agent::receipts::KeyRef) {
    let s = settings(dir, signer);
    let path = s.path.clone();
    let r = start_with(s, connected).await;
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
    (first_key, new_key)
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

/// An OpenBao dev server with the transit key `knhk` (mount `transit`), and the settings of a
/// ledger in `dir` signed by it with the root token (in a token file).
async fn openbao_ledger(dir: &Path) -> (kms::Server, ReceiptSettings) {
    let bao = kms::openbao();
    openbao_transit(&bao.url).await;
    let token = dir.join("token");
    std::fs::write(&token, "root\n").expect("token");
    let s = settings(
        dir,
        SignerSettings::Vault {
            addr: bao.url.clone(),
            mount: "transit".into(),
            key_name: "knhk".into(),
            token_file: Some(token),
        },
    );
    (bao, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_transit_signs_rotates_versions_and_verifies_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_bao, s) = openbao_ledger(dir.path()).await;
    sign_rotate_verify(s.signer, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kms_outage_queues_checkpoints_and_the_backlog_is_signed_on_return() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (bao, s) = openbao_ledger(dir.path()).await;
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
    // Released twice, or a hold that does not exist: refused, and nothing is written.
    let size = r.ledger().size().expect("size");
    let again = r
        .release_hold(hold, "again")
        .await
        .expect_err("released twice");
    assert!(
        matches!(again, knhk_agent::receipts::ReceiptsError::AlreadyReleased(id) if id == hold),
        "{again}"
    );
    let unknown = r
        .release_hold(hold + 100, "no such")
        .await
        .expect_err("unknown hold");
    assert!(
        matches!(unknown, knhk_agent::receipts::ReceiptsError::NoSuchHold(id) if id == hold + 100),
        "{unknown}"
    );
    assert_eq!(
        r.ledger().size().expect("size"),
        size,
        "a refused release wrote a receipt"
    );
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

/// The plan's example with its `[sidecar.kms]` switched to Azure Key Vault (the plan's
/// `vault_url` and `key_name`).
fn plan_with_azure_kms(vault_url: &str) -> String {
    let plan = include_str!("data/fortune5-plan.toml");
    let aws = "provider = \"aws\"\nregion = \"us-east-1\"\nkey_id = \"arn:aws:kms:us-east-1:123456789012:key/abc123\"\n";
    assert!(plan.contains(aws), "the plan's kms section changed");
    plan.replace(
        aws,
        &format!(
            "provider = \"azure\"\nvault_url = \"{vault_url}\"\nkey_name = \"knhk-receipts\"\n"
        ),
    )
}

#[test]
fn check_config_loads_an_azure_kms_and_names_a_malformed_vault_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("azure.toml");
    std::fs::write(
        &good,
        plan_with_azure_kms("https://fortune5.vault.azure.net"),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_knhk-agent"))
        .args(["check-config", "--output", "json"])
        .arg(&good)
        .output()
        .expect("run");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["valid"], true, "{json}");
    assert!(
        json["active_sections"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s == "kms")),
        "the ledger runs with the Azure key: {json}"
    );

    for (url, why) in [
        (
            "http://fortune5.vault.azure.net",
            "it must start with https://",
        ),
        (
            "https://fortune5.vault.azure.net/keys/knhk-receipts",
            "it must name the vault only, without a path, query or fragment",
        ),
        (
            "https://fortune5 vault.azure.net",
            "its host is not a DNS name",
        ),
        (
            "https://fortune5.vault.azure.net:99999",
            "its port is not a number",
        ),
    ] {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, plan_with_azure_kms(url)).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_knhk-agent"))
            .args(["check-config"])
            .arg(&bad)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{url}: {stderr}");
        assert!(
            stderr.contains("kms.vault_url")
                && stderr.contains(&format!("{url:?} is not a Key Vault URL: {why}")),
            "{url}: {stderr}"
        );
    }
}

/// Azure Key Vault, against the TLS stand-in of its REST API and Entra ID's token endpoint
/// (tests/support/azure.rs): Azure itself is not reachable from CI.
#[cfg(feature = "azure")]
mod azure {
    use super::*;
    use knhk_agent::receipts::{
        signer::{AzureConnection, AzureCredential, AzureSigner},
        Signer,
    };
    use std::sync::atomic::Ordering;
    use support::azure::{self as az, AzureStandIn};

    fn workload_identity(dir: &Path) -> AzureCredential {
        let token_file = dir.join("azure-identity-token");
        std::fs::write(&token_file, az::FEDERATED_TOKEN).expect("token file");
        AzureCredential::WorkloadIdentity {
            tenant_id: az::TENANT_ID.into(),
            client_id: az::CLIENT_ID.into(),
            token_file,
        }
    }

    fn connection(k: &AzureStandIn, key: &str, credential: AzureCredential) -> AzureConnection {
        AzureConnection {
            vault_url: az::VAULT_URL.into(),
            key_name: key.into(),
            credential,
            authority_host: Some(az::AUTHORITY_HOST.into()),
            ca_pem: Some(k.ca_pem.clone().into_bytes()),
            proxy: Some(k.proxy.clone()),
        }
    }

    fn settings_of(key: &str) -> SignerSettings {
        SignerSettings::Azure {
            vault_url: az::VAULT_URL.into(),
            key_name: key.into(),
            ca_file: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn azure_key_vault_signs_rotates_versions_and_verifies_offline() {
        let k = AzureStandIn::start().await;
        k.create_key("knhk-receipts", "EC");
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = AzureSigner::new(connection(
            &k,
            "knhk-receipts",
            workload_identity(dir.path()),
        ))
        .expect("signer");
        let (first, rotated) = sign_rotate_verify_on(
            dir.path(),
            settings_of("knhk-receipts"),
            Arc::new(signer),
            false,
        )
        .await;
        let versions = k.versions("knhk-receipts");
        assert_eq!(versions.len(), 2, "rotation made a second version");
        let id = |v: &str| format!("{}/keys/knhk-receipts/{v}", az::VAULT_URL);
        assert_eq!(first.id, id(&versions[0]));
        assert_eq!(rotated.id, id(&versions[1]), "the new version signs");
        assert!(k.knobs.signatures.load(Ordering::SeqCst) >= 3);
        assert!(k.knobs.token_requests.load(Ordering::SeqCst) >= 1);
        let tunnels = k.knobs.tunnels.lock().expect("tunnels").clone();
        assert!(
            tunnels.contains(&"knhk.vault.azure.test:443".to_string())
                && tunnels.contains(&"login.azure.test:443".to_string()),
            "{tunnels:?}"
        );

        // `receipts verify` checks the Azure-signed checkpoints offline (the stand-in is gone).
        drop(k);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_knhk-agent"))
            .args(["receipts", "verify", "--db"])
            .arg(dir.path().join("receipts.redb"))
            .output()
            .expect("verify");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("verified"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The production path: `[kms]` settings through `connect_signer`, workload identity and the
    /// authority host from the environment (as AKS sets them), the CA from `kms.ca_file`, the
    /// proxy from `HTTPS_PROXY`. (The only test here that sets these variables.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn azure_connect_takes_workload_identity_from_the_environment_and_the_ca_file() {
        let k = AzureStandIn::start().await;
        k.create_key("knhk", "EC");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &k.ca_pem).expect("ca");
        let AzureCredential::WorkloadIdentity { token_file, .. } = workload_identity(dir.path())
        else {
            unreachable!()
        };
        let vars = [
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                token_file.display().to_string(),
            ),
            ("AZURE_TENANT_ID", az::TENANT_ID.to_string()),
            ("AZURE_CLIENT_ID", az::CLIENT_ID.to_string()),
            ("AZURE_AUTHORITY_HOST", az::AUTHORITY_HOST.to_string()),
            ("HTTPS_PROXY", k.proxy.clone()),
        ];
        for (name, value) in &vars {
            std::env::set_var(name, value);
        }
        let settings = |ca_file: Option<PathBuf>| SignerSettings::Azure {
            vault_url: az::VAULT_URL.into(),
            key_name: "knhk".into(),
            ca_file,
        };
        let signer = knhk_agent::receipts::connect_signer(&settings(Some(ca_file)))
            .await
            .expect("signer");
        let key = signer.current().await;
        // Without the CA the vault's certificate is not trusted: nothing is signed.
        let untrusted = knhk_agent::receipts::connect_signer(&settings(None))
            .await
            .expect("signer");
        let untrusted = untrusted.current().await;
        let missing_ca =
            knhk_agent::receipts::connect_signer(&settings(Some("/nonexistent/ca.pem".into())))
                .await;
        let sig = match &key {
            Ok(key) => Some(signer.sign(&key.key, b"checkpoint").await),
            Err(_) => None,
        };
        // Unset before any assertion, so a failure here leaks nothing into other tests.
        for (name, _) in &vars {
            std::env::remove_var(name);
        }
        let key = key.expect("current");
        let sig = sig.expect("signed").expect("sign");
        assert_eq!(signer.provider(), "azure");
        assert!(knhk_agent::receipts::signer::verify_signature(
            &key.public_key_der,
            b"checkpoint",
            &sig
        ));
        let e = untrusted.expect_err("untrusted vault");
        eprintln!("without kms.ca_file: {e}");
        assert!(e.is_transient(), "{e}");
        assert!(
            e.to_string().contains("certificate"),
            "the cause is named: {e}"
        );
        let e = missing_ca.expect_err("missing CA file");
        assert!(
            e.to_string()
                .starts_with("azure refused: kms.ca_file /nonexistent/ca.pem: "),
            "{e}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn azure_client_secret_signs_and_a_refused_credential_is_named() {
        let k = AzureStandIn::start().await;
        k.create_key("knhk", "EC");
        let secret = |secret: &str| AzureCredential::ClientSecret {
            tenant_id: az::TENANT_ID.into(),
            client_id: az::CLIENT_ID.into(),
            secret: secret.into(),
        };
        let signer =
            AzureSigner::new(connection(&k, "knhk", secret(az::CLIENT_SECRET))).expect("signer");
        let key = signer.current().await.expect("current");
        let sig = signer.sign(&key.key, b"checkpoint").await.expect("sign");
        assert!(knhk_agent::receipts::signer::verify_signature(
            &key.public_key_der,
            b"checkpoint",
            &sig
        ));
        assert!(!knhk_agent::receipts::signer::verify_signature(
            &key.public_key_der,
            b"another checkpoint",
            &sig
        ));

        let wrong =
            AzureSigner::new(connection(&k, "knhk", secret("not-the-secret"))).expect("signer");
        let e = wrong.current().await.expect_err("refused");
        assert!(
            !e.is_transient(),
            "a refused credential is not retried: {e}"
        );
        assert!(
            e.to_string().starts_with(
                "azure refused: get key knhk in https://knhk.vault.azure.test: the Entra ID token \
                 endpoint answered HTTP 401 (invalid_client: AADSTS7000215: Invalid client secret provided."
            ),
            "{e}"
        );
        let e = wrong.rotate().await.expect_err("refused");
        assert!(e.to_string().contains("AADSTS7000215"), "{e}");
        assert_eq!(k.versions("knhk").len(), 1, "nothing changed in the vault");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn azure_bad_keys_and_urls_are_named_and_change_nothing() {
        let k = AzureStandIn::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let credential = workload_identity(dir.path());

        // A key that does not exist.
        let signer =
            AzureSigner::new(connection(&k, "absent", credential.clone())).expect("signer");
        let e = signer.current().await.expect_err("missing key");
        assert!(!e.is_transient());
        assert_eq!(
            e.to_string(),
            "azure refused: get key absent in https://knhk.vault.azure.test: Key Vault answered HTTP 404 \
             (KeyNotFound: A key with (name/id) absent was not found in this key vault. If you recently \
             deleted this key you may be able to recover it using the correct recovery command.)"
        );
        let e = signer.rotate().await.expect_err("no key to rotate");
        assert!(e.to_string().contains("HTTP 404"), "{e}");
        assert!(k.versions("absent").is_empty(), "rotation created nothing");

        // A key of the wrong type: an RSA key cannot make ES256 receipts.
        k.create_key("rsa", "RSA");
        let signer = AzureSigner::new(connection(&k, "rsa", credential.clone())).expect("signer");
        let e = signer.current().await.expect_err("wrong type");
        let v = &k.versions("rsa")[0];
        assert_eq!(
            e.to_string(),
            format!(
                "azure refused: key https://knhk.vault.azure.test/keys/rsa/{v} is kty RSA crv (none); \
                 receipts need an EC key on P-256 (ES256): create it with `az keyvault key create --kty EC \
                 --curve P-256 --ops sign verify`"
            )
        );

        // A key reference of another key is not signed with this one.
        let e = signer
            .sign(
                &knhk_agent::receipts::KeyRef {
                    id: format!("{}/keys/other/{v}", az::VAULT_URL),
                    version: 1,
                },
                b"x",
            )
            .await
            .expect_err("other key");
        assert!(e.to_string().contains("is not a version of key rsa"), "{e}");

        // A malformed vault URL or CA is refused before any call.
        let mut c = connection(&k, "knhk", credential.clone());
        c.vault_url = "not a url".into();
        let e = AzureSigner::new(c).expect_err("bad url");
        assert!(
            e.to_string()
                .starts_with("azure refused: kms.vault_url \"not a url\": "),
            "{e}"
        );
        let mut c = connection(&k, "knhk", credential);
        c.ca_pem = Some(b"not a certificate".to_vec());
        let e = AzureSigner::new(c).expect_err("bad CA");
        assert_eq!(
            e.to_string(),
            "azure refused: kms.ca_file holds no certificate"
        );
        assert!(k.knobs.signatures.load(Ordering::SeqCst) == 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn azure_throttling_goes_through_the_shared_retry_and_circuit_breaker() {
        let k = AzureStandIn::start().await;
        k.create_key("knhk", "EC");
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = AzureSigner::new(connection(&k, "knhk", workload_identity(dir.path())))
            .expect("signer");
        let s = settings(dir.path(), settings_of("knhk"));
        let path = s.path.clone();
        let registry = prometheus::Registry::new();
        let r = start_on(s, Arc::new(signer), &registry).await;
        let circuit_open = || circuit_open(&registry);
        let ready = r.r.readiness_check();
        append(&r, 0..10).await;
        r.pulse(8).await;
        all_signed(&r, Duration::from_secs(20)).await;

        // Two 429s with Retry-After: 1: the shared retry waits them out and the call succeeds.
        k.knobs.throttle_next.store(2, Ordering::SeqCst);
        let started = Instant::now();
        append(&r, 10..20).await;
        r.pulse(16).await;
        all_signed(&r, Duration::from_secs(20)).await;
        let waited = started.elapsed();
        assert_eq!(k.knobs.throttled.load(Ordering::SeqCst), 2);
        assert!(
            waited >= Duration::from_secs(2),
            "Retry-After was honoured twice: {waited:?}"
        );
        assert!(ready().is_ok(), "{:?}", ready());

        // Throttled without end: each call fails after its retries, three failures open the
        // circuit, and readiness says the KMS is not signing.
        assert!(!circuit_open());
        k.knobs.throttle_next.store(1000, Ordering::SeqCst);
        append(&r, 20..30).await;
        r.pulse(24).await;
        let deadline = Instant::now() + Duration::from_secs(40);
        while !circuit_open() {
            assert!(
                Instant::now() < deadline,
                "the circuit never opened on throttling"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let message = ready().expect_err("not ready while the circuit is open");
        assert!(
            message.contains("the KMS (azure) has not signed"),
            "{message}"
        );
        assert!(
            k.knobs.throttled.load(Ordering::SeqCst) >= 2 + 9,
            "3 calls of 3 attempts"
        );

        // The vault recovers: the backlog is signed and readiness recovers.
        k.knobs.throttle_next.store(0, Ordering::SeqCst);
        all_signed(&r, Duration::from_secs(60)).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while ready().is_err() {
            assert!(Instant::now() < deadline, "readiness did not recover");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let report = stop_and_verify(r, &path).await;
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.receipts, 30);
    }
}

/// Waits until readiness fails with a message containing every one of `words`; returns it.
async fn readiness_says(
    ready: &(impl Fn() -> Result<(), String> + ?Sized),
    words: &[&str],
    within: Duration,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let state = ready();
        if let Err(m) = &state {
            if words.iter().all(|w| m.contains(w)) {
                return m.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "readiness never said {words:?}: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until readiness passes.
async fn readiness_ok(ready: &(impl Fn() -> Result<(), String> + ?Sized), within: Duration) {
    let deadline = Instant::now() + within;
    while let Err(m) = ready() {
        assert!(Instant::now() < deadline, "readiness did not recover: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// AWS KMS refusing the agent (moto's real KMS API; of the refusals, moto enforces only a key
/// policy that denies `kms:DescribeKey` — it signs with a disabled key or one pending deletion):
/// receipts stay durable, checkpoints wait, readiness names the refusal and what fixes it at
/// once (a refusal is not waited out), and once the policy allows the agent the backlog is
/// signed with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_access_denied_is_named_and_signing_resumes_once_allowed() {
    let moto = kms::moto();
    let (client, _) = kms::create_kms_key(&moto.url).await;
    let policy = |effect: &str| {
        serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": effect,
                "Principal": {"AWS": "*"},
                "Action": ["kms:DescribeKey"],
                "Resource": "*"
            }]
        })
        .to_string()
    };
    let key_id = client
        .create_key()
        .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
        .key_spec(aws_sdk_kms::types::KeySpec::EccNistP256)
        .policy(policy("Deny"))
        .send()
        .await
        .expect("CreateKey")
        .key_metadata()
        .expect("metadata")
        .key_id()
        .to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(
        dir.path(),
        SignerSettings::Aws {
            region: "us-east-1".into(),
            key_id: key_id.clone(),
            endpoint_url: Some(moto.url.clone()),
        },
    );
    let path = s.path.clone();
    let r = start(s).await;
    let ready = r.r.readiness_check();
    append(&r, 0..5).await;
    r.pulse(1).await;
    let message = readiness_says(
        &ready,
        &[
            "refuses to sign",
            "AccessDeniedException",
            "access denied",
            "key policy",
        ],
        Duration::from_secs(20),
    )
    .await;
    eprintln!("access denied: {message}");
    assert_eq!(r.ledger().size().expect("size"), 5, "receipts stay durable");
    assert!(
        !r.ledger()
            .unsigned_checkpoints()
            .expect("checkpoints")
            .is_empty(),
        "the checkpoint waits"
    );

    client
        .put_key_policy()
        .key_id(&key_id)
        .policy_name("default")
        .policy(policy("Allow"))
        .send()
        .await
        .expect("PutKeyPolicy");
    append(&r, 5..10).await;
    r.pulse(2).await;
    all_signed(&r, Duration::from_secs(30)).await;
    readiness_ok(&ready, Duration::from_secs(10)).await;
    let report = stop_and_verify(r, &path).await;
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.receipts, 10, "nothing lost");
}

/// The Vault/OpenBao token revoked mid-run: readiness names the refusal; a new token written
/// to `kms.token_file` is taken at the next call and the backlog is signed, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_vault_token_is_named_and_a_new_one_in_the_token_file_resumes_signing() {
    use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
    let bao = kms::openbao();
    openbao_transit(&bao.url).await;
    let root = VaultClient::new(
        VaultClientSettingsBuilder::default()
            .address(&bao.url)
            .token("root")
            .build()
            .expect("settings"),
    )
    .expect("client");
    let new_token = || async {
        vaultrs::token::new(&root, None)
            .await
            .expect("create a token")
            .client_token
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    let first = new_token().await;
    std::fs::write(&token_file, format!("{first}\n")).expect("token");
    let s = settings(
        dir.path(),
        SignerSettings::Vault {
            addr: bao.url.clone(),
            mount: "transit".into(),
            key_name: "knhk".into(),
            token_file: Some(token_file.clone()),
        },
    );
    let path = s.path.clone();
    let r = start(s).await;
    let ready = r.r.readiness_check();
    append(&r, 0..5).await;
    r.pulse(1).await;
    all_signed(&r, Duration::from_secs(20)).await;
    assert!(ready().is_ok(), "{:?}", ready());

    vaultrs::token::revoke(&root, &first)
        .await
        .expect("revoke the token");
    append(&r, 5..10).await;
    r.pulse(2).await;
    let message = readiness_says(
        &ready,
        &["refuses to sign", "permission denied", "kms.token_file"],
        Duration::from_secs(20),
    )
    .await;
    eprintln!("token revoked: {message}");
    assert_eq!(
        r.ledger().size().expect("size"),
        10,
        "receipts stay durable"
    );

    let second = new_token().await;
    std::fs::write(&token_file, format!("{second}\n")).expect("new token");
    all_signed(&r, Duration::from_secs(20)).await;
    readiness_ok(&ready, Duration::from_secs(10)).await;
    let report = stop_and_verify(r, &path).await;
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.receipts, 10, "nothing lost");
}

/// OpenBao throttling the agent (a rate-limit quota on the transit mount: HTTP 429 "rate
/// limit quota exceeded", no Retry-After): appends are acknowledged and durable, checkpoints
/// queue unsigned, the throttled calls are retried and open the shared circuit breaker, and
/// readiness says the KMS is throttling (429). Once the quota is removed the backlog is signed
/// with no restart, and every acknowledged receipt is in the signed tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_throttling_queues_checkpoints_and_the_backlog_is_signed_once_the_quota_is_lifted()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let (bao, s) = openbao_ledger(dir.path()).await;
    let path = s.path.clone();
    let signer = knhk_agent::receipts::connect_signer(&s.signer)
        .await
        .expect("signer");
    let registry = prometheus::Registry::new();
    let r = start_on(s, signer, &registry).await;
    let ready = r.r.readiness_check();
    let mut acked = append_acked(&r, 0..10).await;
    r.pulse(8).await;
    all_signed(&r, Duration::from_secs(20)).await;
    readiness_ok(&ready, Duration::from_secs(10)).await;

    // One call an hour on the transit mount (quotas count per client address: the agent's
    // and this test's alike), spent here at once.
    let quota = "sys/quotas/rate-limit/knhk-transit";
    let (status, body) = bao.bao(
        "POST",
        quota,
        r#"{"path":"transit/","rate":1,"interval":"1h"}"#,
    );
    assert_eq!(status, 204, "{body}");
    bao.bao("GET", "transit/keys/knhk", "");
    let (status, body) = bao.bao("GET", "transit/keys/knhk", "");
    assert_eq!(status, 429, "the quota throttles: {body}");

    let started = Instant::now();
    for cycle in 2..=4u64 {
        acked.extend(append_acked(&r, cycle * 10 - 10..cycle * 10).await);
        r.pulse(cycle * 8).await;
    }
    let durable = started.elapsed();
    assert_eq!(
        r.ledger().size().expect("size"),
        40,
        "receipts stay durable while the KMS throttles"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !circuit_open(&registry) {
        assert!(
            Instant::now() < deadline,
            "the circuit never opened on throttling: readiness {:?}",
            ready()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let message = readiness_says(
        &ready,
        &[
            "the KMS (vault) has not signed",
            "is throttling the agent: HTTP 429",
            "rate limit quota exceeded",
            r#"transit key "knhk" on mount "transit""#,
            "wait to be signed",
        ],
        Duration::from_secs(20),
    )
    .await;
    // It keeps saying so while the open circuit fails calls fast (they never reach OpenBao).
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = ready().expect_err("not ready while throttled");
        assert!(
            now.contains("is throttling the agent: HTTP 429")
                && now.contains("rate limit quota exceeded"),
            "{now}"
        );
    }
    let backlog = r
        .ledger()
        .unsigned_checkpoints()
        .expect("checkpoints")
        .len();
    eprintln!("throttled: 30 receipts durable in {durable:?}; backlog {backlog} checkpoints; readiness: {message}");
    assert!(backlog >= 1, "checkpoints queue while throttled");

    let (status, body) = bao.bao("DELETE", quota, "");
    assert_eq!(status, 204, "{body}");
    let lifted = Instant::now();
    acked.extend(append_acked(&r, 40..45).await);
    r.pulse(40).await;
    all_signed(&r, Duration::from_secs(30)).await;
    readiness_ok(&ready, Duration::from_secs(10)).await;
    eprintln!("quota lifted: backlog signed in {:?}", lifted.elapsed());
    assert_acknowledged_are_signed(&r, &acked);
    let report = stop_and_verify(r, &path).await;
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.receipts, 45, "nothing lost");
    assert_eq!(report.unsigned_checkpoints, 0);
}

/// The transit key deleted mid-run (deletion allowed, then the key deleted): readiness names
/// the key, its mount and what OpenBao said; appends stay durable and nothing is signed. A new
/// key created under the same name is a different key: its signature is discarded, nothing is
/// signed with it, and readiness says the key history and the KMS disagree — at once after a
/// restart, too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_transit_key_is_named_and_a_new_key_of_the_same_name_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (bao, s) = openbao_ledger(dir.path()).await;
    let path = s.path.clone();
    let r = start(s.clone()).await;
    let ready = r.r.readiness_check();
    let mut acked = append_acked(&r, 0..10).await;
    r.pulse(8).await;
    all_signed(&r, Duration::from_secs(20)).await;
    readiness_ok(&ready, Duration::from_secs(10)).await;
    let signed = signed_checkpoints(&r);

    let (status, body) = bao.bao(
        "POST",
        "transit/keys/knhk/config",
        r#"{"deletion_allowed":true}"#,
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = bao.bao("DELETE", "transit/keys/knhk", "");
    assert_eq!(status, 204, "{body}");
    acked.extend(append_acked(&r, 10..20).await);
    r.pulse(16).await;
    let message = readiness_says(
        &ready,
        &[
            "the KMS (vault) refuses to sign",
            r#"sign with version 1 of transit key "knhk" on mount "transit""#,
            "the server answered HTTP 400: signing key not found",
            "the transit key is not on the server: it was deleted",
            "checkpoints wait to be signed",
        ],
        Duration::from_secs(20),
    )
    .await;
    eprintln!("key deleted: {message}");
    assert_eq!(
        r.ledger().size().expect("size"),
        20,
        "receipts stay durable"
    );
    assert_eq!(signed_checkpoints(&r), signed, "nothing signed");

    // Another key under the same name: OpenBao signs with it, as version 1 again.
    let (status, body) = bao.bao("POST", "transit/keys/knhk", r#"{"type":"ecdsa-p256"}"#);
    assert_eq!(status, 200, "{body}");
    acked.extend(append_acked(&r, 20..25).await);
    r.pulse(24).await;
    let message = readiness_says(
        &ready,
        &[
            "the KMS (vault) signed with transit/knhk",
            "does not verify with the public key",
            "the key history and the KMS disagree",
            "a new key created under the same name",
            "the signature was discarded and nothing more is signed until a restart",
        ],
        Duration::from_secs(20),
    )
    .await;
    eprintln!("key recreated: {message}");
    assert_eq!(r.ledger().size().expect("size"), 25);
    assert_eq!(
        signed_checkpoints(&r),
        signed,
        "nothing signed with the new key"
    );
    let first = acked.iter().take(10).copied().collect::<Vec<_>>();
    assert_acknowledged_are_signed(&r, &first);
    let report = stop_and_verify(r, &path).await;
    // Every stored signature verifies with the key history's key; the rest wait unsigned.
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.receipts, 25, "nothing lost");
    assert!(report.unsigned_checkpoints >= 2, "{report:?}");

    // Restarted, the agent asks the KMS for its key and finds the disagreement at once.
    let r = start(s).await;
    let ready = r.r.readiness_check();
    let message = readiness_says(
        &ready,
        &[
            "the ledger's key history gives transit/knhk",
            "but the KMS's key transit/knhk",
        ],
        Duration::from_secs(20),
    )
    .await;
    eprintln!("restarted: {message}");
    append(&r, 25..30).await;
    r.pulse(32).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(signed_checkpoints(&r), signed, "still nothing signed");
    let report = stop_and_verify(r, &path).await;
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.receipts, 30);
}

// ---- issue 18 §1: a trust anchor ----

mod trust {
    use super::*;
    use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
    use p256::{
        ecdsa::{signature::Signer as _, Signature, SigningKey},
        pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding},
    };
    use sha2::Digest as _;
    use std::process::{Command, Output};

    /// The fingerprint as a verifier computes it without the crate: SHA-256 of the SPKI DER.
    pub(crate) fn fingerprint(spki_der: &[u8]) -> String {
        let digest = sha2::Sha256::digest(spki_der);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }

    pub(crate) fn cli(args: &[&str]) -> (Output, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_knhk-agent"))
            .args(args)
            .output()
            .expect("run knhk-agent");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out, stdout, stderr)
    }

    fn fresh_key() -> SigningKey {
        loop {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).expect("random");
            if let Ok(k) = SigningKey::from_slice(&bytes) {
                return k;
            }
        }
    }

    /// A copy of the single-key ledger at `path` whose key was swapped for a fresh one and
    /// whose checkpoints were all re-signed with it (bodies, ids and receipts unchanged).
    pub(crate) fn swapped_copy(path: &Path, to: &Path) -> SigningKey {
        std::fs::copy(path, to).expect("copy the ledger");
        let key = fresh_key();
        let spki = key
            .verifying_key()
            .to_public_key_der()
            .expect("spki")
            .as_bytes()
            .to_vec();
        let db = redb::Database::open(to).expect("open the copy");
        let tx = db.begin_write().expect("write");
        {
            let keys_def: TableDefinition<u64, &[u8]> = TableDefinition::new("keys");
            let mut keys = tx.open_table(keys_def).expect("keys");
            use redb::ReadableTableMetadata as _;
            assert_eq!(keys.len().expect("len"), 1, "a ledger with one key");
            let mut record: serde_json::Value =
                serde_json::from_slice(keys.get(0).expect("get").expect("key 0").value())
                    .expect("json");
            record["public_key"] = B64.encode(&spki).into();
            keys.insert(0, &serde_json::to_vec(&record).expect("json")[..])
                .expect("insert");
            let cp_def: TableDefinition<u64, &[u8]> = TableDefinition::new("checkpoints");
            let mut cps = tx.open_table(cp_def).expect("checkpoints");
            let all: Vec<(u64, Vec<u8>)> = cps
                .iter()
                .expect("iter")
                .map(|e| {
                    let (k, v) = e.expect("entry");
                    (k.value(), v.value().to_vec())
                })
                .collect();
            for (n, v) in all {
                let mut c: serde_json::Value = serde_json::from_slice(&v).expect("json");
                let body = c["body"].as_str().expect("body").to_owned();
                let sig: Signature = key.sign(body.as_bytes());
                c["signature"] = B64.encode(sig.to_der().as_bytes()).into();
                cps.insert(n, &serde_json::to_vec(&c).expect("json")[..])
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
        key
    }

    /// A signed single-key ledger written with a file key; returns (ledger, the key's SPKI DER).
    async fn file_ledger(dir: &Path) -> (PathBuf, Vec<u8>) {
        let s = settings(dir, file_signer(dir));
        let path = s.path.clone();
        let r = start(s).await;
        append(&r, 0..24).await;
        r.pulse(8).await;
        all_signed(&r, Duration::from_secs(10)).await;
        append(&r, 24..30).await;
        r.pulse(16).await;
        all_signed(&r, Duration::from_secs(10)).await;
        let report = stop_and_verify(r, &path).await;
        assert!(report.ok(), "{report:?}");
        let pem = std::fs::read_to_string(dir.join("keys/v1.pem")).expect("key file");
        let spki = SigningKey::from_pkcs8_pem(&pem)
            .expect("pkcs8")
            .verifying_key()
            .to_public_key_der()
            .expect("spki")
            .as_bytes()
            .to_vec();
        (path, spki)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_swapped_key_ledger_passes_unpinned_only_and_fails_with_the_trusted_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, spki) = file_ledger(dir.path()).await;
        let real = fingerprint(&spki);
        let pem_file = dir.path().join("trusted.pem");
        let pem = p256::PublicKey::from_public_key_der(&spki)
            .expect("spki")
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");
        std::fs::write(&pem_file, pem).expect("write pem");
        let der_file = dir.path().join("trusted.der");
        std::fs::write(&der_file, &spki).expect("write der");
        let copy = dir.path().join("swapped.redb");
        let attacker = swapped_copy(&path, &copy);
        let fake = fingerprint(
            attacker
                .verifying_key()
                .to_public_key_der()
                .expect("spki")
                .as_bytes(),
        );
        let (db, cp) = (path.to_str().expect("utf-8"), copy.to_str().expect("utf-8"));
        let before = std::fs::read(&copy).expect("read");

        // Unpinned: the swapped copy verifies, and the output says that is all it shows and
        // which key signed it.
        let (out, stdout, _) = cli(&["receipts", "verify", "--db", cp]);
        assert!(out.status.success(), "{stdout}");
        assert!(
            stdout.contains("verified (internal consistency only)")
                && stdout.contains("trust: internal consistency only: no trusted key was given"),
            "{stdout}"
        );
        assert!(
            stdout.contains(&fake),
            "the signing key's fingerprint is shown: {stdout}"
        );
        let (out, stdout, _) = cli(&["receipts", "verify", "--db", cp, "--output", "json"]);
        assert!(out.status.success(), "{stdout}");
        let report: serde_json::Value = serde_json::from_str(&stdout).expect("json");
        assert_eq!(report["trust"]["pinned"], false, "{report}");
        assert_eq!(
            report["key_history"][0]["fingerprint"],
            fake.as_str(),
            "{report}"
        );
        assert!(
            report["trust"]["statement"]
                .as_str()
                .is_some_and(|s| s.starts_with("internal consistency only")),
            "{report}"
        );

        // Pinned to the real key, by fingerprint, PEM or DER: the copy fails, naming both keys.
        for pin in [
            real.as_str(),
            pem_file.to_str().expect("utf-8"),
            der_file.to_str().expect("utf-8"),
        ] {
            let (out, stdout, _) = cli(&["receipts", "verify", "--db", cp, "--trusted-key", pin]);
            assert_eq!(out.status.code(), Some(1), "pin {pin}: {stdout}");
            assert!(
                stdout.contains(&format!(
                    "FAILED: no key of the ledger is a trusted key: its keys are {fake}; trusted: {real}"
                )),
                "pin {pin}: {stdout}"
            );
            assert!(!stdout.contains("\nverified"), "{stdout}");
            // The original verifies against the same pin, anchored.
            let (out, stdout, _) = cli(&["receipts", "verify", "--db", db, "--trusted-key", pin]);
            assert!(out.status.success(), "pin {pin}: {stdout}");
            assert!(
                stdout.contains("trust: anchored: receipts 0..30 are covered")
                    && stdout.contains(&format!("{real}  current from"))
                    && stdout.contains("(trusted)")
                    && stdout.lines().any(|l| l == "verified"),
                "pin {pin}: {stdout}"
            );
        }
        // The bare hex digits are a fingerprint too.
        let (out, stdout, _) = cli(&[
            "receipts",
            "verify",
            "--db",
            cp,
            "--trusted-key",
            &real[7..],
        ]);
        assert_eq!(out.status.code(), Some(1), "{stdout}");

        // A pin that is none of the forms: exit 64, said precisely.
        let (out, stdout, stderr) = cli(&[
            "receipts",
            "verify",
            "--db",
            db,
            "--trusted-key",
            "sha256:12ab",
        ]);
        assert_eq!(out.status.code(), Some(64), "{stdout}{stderr}");
        assert!(
            stderr.contains("--trusted-key sha256:12ab: not a fingerprint (sha256:<64 hex digits>) nor aws-kms:KEY_ID, and not a readable public key file"),
            "{stderr}"
        );
        let keyfile = dir.path().join("keys/v1.pem");
        let (out, _, stderr) = cli(&[
            "receipts",
            "verify",
            "--db",
            db,
            "--trusted-key",
            keyfile.to_str().expect("utf-8"),
        ]);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains("a PEM file, but not a public key"),
            "{stderr}"
        );
        assert_eq!(
            std::fs::read(&copy).expect("read"),
            before,
            "verify wrote the copy"
        );
    }

    /// Rewrites the ledger at `path` as an older agent wrote it: the file key named
    /// `legacy` (a directory-based id) in the key history and every checkpoint, re-signed.
    fn as_legacy(path: &Path, stable: &str, legacy: &str, key: &SigningKey) {
        let db = redb::Database::open(path).expect("open");
        let tx = db.begin_write().expect("write");
        {
            let keys_def: TableDefinition<u64, &[u8]> = TableDefinition::new("keys");
            let mut keys = tx.open_table(keys_def).expect("keys");
            let mut record: serde_json::Value =
                serde_json::from_slice(keys.get(0).expect("get").expect("key 0").value())
                    .expect("json");
            assert_eq!(record["key"]["id"], stable);
            record["key"]["id"] = legacy.into();
            keys.insert(0, &serde_json::to_vec(&record).expect("json")[..])
                .expect("insert");
            let cp_def: TableDefinition<u64, &[u8]> = TableDefinition::new("checkpoints");
            let mut cps = tx.open_table(cp_def).expect("checkpoints");
            let all: Vec<(u64, Vec<u8>)> = cps
                .iter()
                .expect("iter")
                .map(|e| {
                    let (k, v) = e.expect("entry");
                    (k.value(), v.value().to_vec())
                })
                .collect();
            for (n, v) in all {
                let mut c: serde_json::Value = serde_json::from_slice(&v).expect("json");
                let body = c["body"].as_str().expect("body").replace(
                    &format!("knhk-key {stable}#"),
                    &format!("knhk-key {legacy}#"),
                );
                let sig: Signature = key.sign(body.as_bytes());
                c["body"] = body.into();
                c["signature"] = B64.encode(sig.to_der().as_bytes()).into();
                cps.insert(n, &serde_json::to_vec(&c).expect("json")[..])
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ledger_of_the_directory_based_file_key_id_hands_over_to_the_stable_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, spki) = file_ledger(dir.path()).await;
        let stable = format!("file:{}", fingerprint(&spki));
        let legacy = format!("file:{}", dir.path().join("keys").display());
        let pem = std::fs::read_to_string(dir.path().join("keys/v1.pem")).expect("key file");
        let key = SigningKey::from_pkcs8_pem(&pem).expect("pkcs8");
        as_legacy(&path, &stable, &legacy, &key);
        assert_eq!(
            first_problem(&path),
            "verified",
            "the older agent's ledger verifies"
        );

        // The first start of this agent on it: one hand-over to the stable id, same key, same age.
        let r = start(settings(dir.path(), file_signer(dir.path()))).await;
        append(&r, 30..32).await;
        r.pulse(24).await;
        all_signed(&r, Duration::from_secs(10)).await;
        let keys = r.ledger().keys().expect("keys");
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_eq!(keys[0].key.to_string(), format!("{legacy}#1"));
        assert_eq!(keys[1].key.to_string(), format!("{stable}#1"));
        assert_eq!(keys[1].public_key, keys[0].public_key);
        assert_eq!(
            keys[1].since_ns, keys[0].since_ns,
            "the rename keeps the key's age"
        );
        let (statement, _) = keys[1].transition.clone().expect("a transition");
        assert!(
            statement.starts_with(&format!(
                "knhk-key-transition/v1\nfrom: {legacy}#1\nto: {stable}#1\n"
            )),
            "{statement}"
        );
        let report = stop_and_verify(r, &path).await;
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.keys, 2);

        // Moving the key directory changes nothing now.
        std::fs::rename(dir.path().join("keys"), dir.path().join("moved")).expect("move");
        let moved = SignerSettings::File {
            key_dir: dir.path().join("moved"),
        };
        let r = start(settings(dir.path(), moved)).await;
        append(&r, 32..34).await;
        r.pulse(32).await;
        all_signed(&r, Duration::from_secs(10)).await;
        assert_eq!(
            r.ledger().keys().expect("keys").len(),
            2,
            "no new key record"
        );
        let report = stop_and_verify(r, &path).await;
        assert!(report.ok(), "{report:?}");
        // Pinned to the key's fingerprint, the whole history is anchored.
        let (out, stdout, _) = cli(&[
            "receipts",
            "verify",
            "--db",
            path.to_str().expect("utf-8"),
            "--trusted-key",
            &fingerprint(&spki),
        ]);
        assert!(out.status.success(), "{stdout}");
        assert!(
            // 30 + 2 + the key_rotation receipt of the hand-over + 2.
            stdout.contains("trust: anchored: receipts 0..35"),
            "{stdout}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_history_that_disagrees_with_the_kms_gets_no_signature_and_readiness_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, spki) = file_ledger(dir.path()).await;
        let swapped = dir.path().join("swapped.redb");
        let attacker = swapped_copy(&path, &swapped);
        let fake = fingerprint(
            attacker
                .verifying_key()
                .to_public_key_der()
                .expect("spki")
                .as_bytes(),
        );
        // The agent's ledger replaced by the swapped copy; its KMS (the key files) unchanged.
        std::fs::rename(&swapped, &path).expect("replace the ledger");
        let signed_before = {
            let db = redb::Database::open(&path).expect("open");
            let report = verify(&db).expect("verify");
            report.checkpoints - report.unsigned_checkpoints
        };
        let r = start(settings(dir.path(), file_signer(dir.path()))).await;
        let ready = r.r.readiness_check();
        let message = ready().expect_err("not ready");
        assert!(
            message.contains(&format!("public key {fake}, but the KMS's key"))
                && message.contains(&fingerprint(&spki)),
            "{message}"
        );
        append(&r, 30..33).await;
        r.pulse(24).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let checkpoints = r.ledger().checkpoints().expect("checkpoints");
        let signed = checkpoints
            .iter()
            .filter(|(_, c)| c.signature.is_some())
            .count() as u64;
        assert_eq!(
            signed, signed_before,
            "a checkpoint was signed with a key the history does not record"
        );
        assert!(
            checkpoints.len() as u64 > signed,
            "no new checkpoint was written"
        );
        let report = stop_and_verify(r, &path).await;
        assert!(report.ok(), "{report:?}");
        assert!(report.unsigned_checkpoints >= 1, "{report:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_aws_kms_key_id_pins_a_ledger_to_the_key_moto_holds() {
        let moto = kms::moto();
        let (client, key_id) = kms::create_kms_key(&moto.url).await;
        client
            .create_alias()
            .alias_name("alias/knhk-receipts")
            .target_key_id(&key_id)
            .send()
            .await
            .expect("CreateAlias");
        let dir = tempfile::tempdir().expect("tempdir");
        let s = settings(
            dir.path(),
            SignerSettings::Aws {
                region: "us-east-1".into(),
                key_id: "alias/knhk-receipts".into(),
                endpoint_url: Some(moto.url.clone()),
            },
        );
        let path = s.path.clone();
        let r = start(s).await;
        append(&r, 0..10).await;
        r.pulse(8).await;
        all_signed(&r, Duration::from_secs(20)).await;
        let report = stop_and_verify(r, &path).await;
        assert!(report.ok(), "{report:?}");
        let copy = dir.path().join("swapped.redb");
        swapped_copy(&path, &copy);
        // moto's credentials are in this process's environment (create_kms_key), inherited.
        let pin = format!("aws-kms:{key_id}");
        for (pin, db, code) in [
            (pin.as_str(), &path, 0),
            ("aws-kms:alias/knhk-receipts", &path, 0),
            ("aws-kms:alias/knhk-receipts", &copy, 1),
        ] {
            let (out, stdout, stderr) = cli(&[
                "receipts",
                "verify",
                "--db",
                db.to_str().expect("utf-8"),
                "--trusted-key",
                pin,
                "--kms-endpoint-url",
                &moto.url,
            ]);
            assert_eq!(
                out.status.code(),
                Some(code),
                "{pin} on {}: {stdout}{stderr}",
                db.display()
            );
            if code == 0 {
                assert!(
                    stdout.contains("trust: anchored: receipts 0..10"),
                    "{stdout}"
                );
            } else {
                assert!(
                    stdout.contains("no key of the ledger is a trusted key"),
                    "{stdout}"
                );
            }
        }
        // A key moto does not have: exit 64, naming it.
        let (out, _, stderr) = cli(&[
            "receipts",
            "verify",
            "--db",
            path.to_str().expect("utf-8"),
            "--trusted-key",
            "aws-kms:alias/nope",
            "--kms-endpoint-url",
            &moto.url,
        ]);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains("--trusted-key aws-kms:alias/nope: aws refused"),
            "{stderr}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_empty_trees_consistency_proof_is_empty_and_bad_sizes_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = start(settings(dir.path(), file_signer(dir.path()))).await;
        append(&r, 0..7).await;
        let l = r.ledger();
        assert_eq!(
            l.consistency_proof(0, 7).expect("0 to 7"),
            Vec::<[u8; 32]>::new()
        );
        assert_eq!(
            l.consistency_proof(0, 0).expect("0 to 0"),
            Vec::<[u8; 32]>::new()
        );
        assert_eq!(
            l.consistency_proof(7, 7).expect("7 to 7"),
            Vec::<[u8; 32]>::new()
        );
        let e = l.consistency_proof(5, 3).expect_err("5 to 3");
        assert_eq!(
            tonic::Status::from(e.clone()).code(),
            tonic::Code::InvalidArgument,
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("old_size 5 is larger than new_size 3"),
            "{e}"
        );
        let e = l.consistency_proof(0, 8).expect_err("beyond the log");
        assert_eq!(
            tonic::Status::from(e.clone()).code(),
            tonic::Code::NotFound,
            "{e}"
        );
        assert_eq!(e.to_string(), "no tree of 8 receipts: the log has 7");
        r.tasks
            .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
    }
}

mod agent_trust {
    use super::trust::{cli, fingerprint};
    use super::*;
    use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
    use knhk_agent::{
        api::receipts::pb::{self, receipt_service_client::ReceiptServiceClient},
        receipts::ledger::StoredCosignature,
    };
    use p256::{
        ecdsa::{signature::Verifier as _, Signature, SigningKey, VerifyingKey},
        pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey},
    };
    use support::{
        agent::{write_config, Agent, BIN},
        kernel_available, TestCgroup, TestPins,
    };

    fn spki_of_file(path: &Path) -> Vec<u8> {
        let pem = std::fs::read_to_string(path).expect("key file");
        SigningKey::from_pkcs8_pem(&pem)
            .expect("pkcs8")
            .verifying_key()
            .to_public_key_der()
            .expect("spki")
            .as_bytes()
            .to_vec()
    }

    fn verifies(spki: &[u8], message: &[u8], der: &[u8]) -> bool {
        let key = VerifyingKey::from_public_key_der(spki).expect("spki");
        let sig = Signature::from_der(der).expect("der").normalize_s();
        key.verify(message, &sig).is_ok()
    }

    fn file_sha256(path: &Path) -> Vec<u8> {
        use sha2::Digest as _;
        sha2::Sha256::digest(std::fs::read(path).expect("read")).to_vec()
    }

    /// A ledger with a rotation (two keys) and one witness cosignature of checkpoint 0 (C2SP
    /// cosignature/v1); returns the witness's verifier key.
    fn write_ledger(dir: &Path) -> String {
        let rt = support::runtime();
        rt.block_on(async {
            let s = settings(dir, file_signer(dir));
            let path = s.path.clone();
            let r = start(s).await;
            append(&r, 0..16).await;
            r.pulse(8).await;
            all_signed(&r, Duration::from_secs(10)).await;
            r.rotate_now().await.expect("rotate");
            append(&r, 16..20).await;
            r.pulse(16).await;
            all_signed(&r, Duration::from_secs(10)).await;
            let body = r
                .ledger()
                .checkpoint(0)
                .expect("read")
                .expect("checkpoint 0")
                .body;
            use ed25519_dalek::Signer as _;
            use knhk_agent::note;
            let witness = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
            let vkey = note::VerifierKey::cosignature(
                "witness.us-east-2",
                &witness.verifying_key().to_bytes(),
            );
            let message = format!("cosignature/v1\ntime 1764547200\n{body}");
            let line = note::Cosignature {
                witness: "witness.us-east-2".into(),
                id: vkey.id,
                timestamp: 1_764_547_200,
                signature: witness.sign(message.as_bytes()).to_bytes(),
            }
            .line()
            .encode();
            r.ledger()
                .put_cosignature(
                    0,
                    &StoredCosignature {
                        witness_key: vkey.to_string(),
                        line,
                    },
                )
                .expect("cosignature");
            let report = stop_and_verify(r, &path).await;
            assert!(report.ok(), "{report:?}");
            assert_eq!(report.cosignatures, 1);
            vkey.to_string()
        })
    }

    fn kms_tables(dir: &Path) -> String {
        format!(
            "[kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n[receipts]\npath = \"{}\"\nnode = \"node-a\"\n",
            dir.join("keys").display(),
            dir.join("receipts.redb").display()
        )
    }

    #[test]
    fn kernel_the_api_serves_keys_checkpoints_and_cosignatures_and_a_tampered_ledger_is_refused() {
        if !kernel_available(
            "kernel_the_api_serves_keys_checkpoints_and_cosignatures_and_a_tampered_ledger_is_refused",
        ) {
            return;
        }
        let cg = TestCgroup::new("trust-api");
        let pins = TestPins::new("trust-api");
        let dir = tempfile::tempdir().expect("tempdir");
        let witness_key = write_ledger(dir.path());
        let v1 = spki_of_file(&dir.path().join("keys/v1.pem"));
        let v2 = spki_of_file(&dir.path().join("keys/v2.pem"));
        let run_dir = dir.path().join("first");
        std::fs::create_dir_all(&run_dir).expect("mkdir");
        let config = write_config(&run_dir, &cg.path, &pins.root, &kms_tables(dir.path()));
        let agent = Agent::start(&config);
        let rt = support::runtime();
        let size = rt.block_on(async {
            let mut c = ReceiptServiceClient::new(agent.channel().await);
            // The key history: SPKIs as in the key files, fingerprints as recomputed here, the
            // stable file key id, and the hand-over signed by the first key.
            let keys = c
                .list_keys(pb::ListKeysRequest {})
                .await
                .expect("ListKeys")
                .into_inner()
                .keys;
            assert_eq!(keys.len(), 2, "{keys:?}");
            assert_eq!(keys[0].public_key, v1);
            assert_eq!(keys[1].public_key, v2);
            for k in &keys {
                assert_eq!(k.fingerprint, fingerprint(&k.public_key), "{k:?}");
                assert_eq!(k.key_id, format!("file:{}", fingerprint(&v1)), "{k:?}");
            }
            assert!(
                keys[0].transition_statement.is_empty() && keys[0].transition_signature.is_empty()
            );
            let statement = &keys[1].transition_statement;
            assert!(
                statement.starts_with(&format!(
                    "knhk-key-transition/v1\nfrom: {id}#1\nto: {id}#2\nto_public_key: {}\ntime: ",
                    B64.encode(&v2),
                    id = keys[0].key_id
                )) && statement.ends_with('\n'),
                "{statement:?}"
            );
            assert!(verifies(
                &v1,
                statement.as_bytes(),
                &keys[1].transition_signature
            ));

            // Checkpoints: each signed by the key its fingerprint names; checkpoint 0 with the
            // witness's cosignature, which verifies over the documented message.
            let checkpoints = c
                .list_checkpoints(pb::ListCheckpointsRequest {
                    from_number: 0,
                    limit: 0,
                })
                .await
                .expect("ListCheckpoints")
                .into_inner()
                .checkpoints;
            assert!(checkpoints.len() >= 2, "{checkpoints:?}");
            for cp in checkpoints.iter().filter(|c| !c.signature.is_empty()) {
                let key = keys
                    .iter()
                    .find(|k| k.key_version == cp.key_version)
                    .expect("the signing key is in the history");
                assert_eq!(cp.key_fingerprint, fingerprint(&key.public_key), "{cp:?}");
                assert!(
                    verifies(&key.public_key, cp.body.as_bytes(), &cp.signature),
                    "{cp:?}"
                );
            }
            let first = &checkpoints[0];
            assert_eq!(first.number, 0);
            assert_eq!(first.cosignatures.len(), 1, "{first:?}");
            let co = &first.cosignatures[0];
            assert_eq!(co.witness, "witness.us-east-2");
            assert_eq!(co.verifier_key, witness_key);
            assert_eq!(co.timestamp_unix, 1_764_547_200);
            // The blob: key ID, the big-endian timestamp, the Ed25519 signature of the
            // documented message.
            let blob = B64
                .decode(co.line.trim_end().rsplit(' ').next().expect("blob"))
                .expect("base64");
            assert_eq!(blob.len(), 4 + 8 + 64);
            assert_eq!(&blob[4..12], &1_764_547_200u64.to_be_bytes());
            let message = format!("cosignature/v1\ntime 1764547200\n{}", first.body);
            let wk = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key();
            let sig = ed25519_dalek::Signature::from_bytes(blob[12..].try_into().expect("64"));
            assert!(wk.verify_strict(message.as_bytes(), &sig).is_ok());
            // The whole signed note: body, blank line, the node's line, then the witness's.
            assert!(
                first
                    .note
                    .starts_with(&format!("{}\n\u{2014} {} ", first.body, first.origin)),
                "{}",
                first.note
            );
            assert!(first.note.ends_with(&co.line), "{}", first.note);
            let one = c
                .list_checkpoints(pb::ListCheckpointsRequest {
                    from_number: 1,
                    limit: 1,
                })
                .await
                .expect("ListCheckpoints from 1")
                .into_inner()
                .checkpoints;
            assert_eq!(one.len(), 1);
            assert_eq!(one[0].number, 1);
            let e = c
                .list_checkpoints(pb::ListCheckpointsRequest {
                    from_number: 0,
                    limit: 1001,
                })
                .await
                .expect_err("limit 1001");
            assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
            let got = c
                .get_checkpoint(pb::GetCheckpointRequest { number: Some(0) })
                .await
                .expect("GetCheckpoint 0")
                .into_inner()
                .checkpoint
                .expect("checkpoint");
            assert_eq!(got.cosignatures, first.cosignatures);

            // Consistency from the empty tree: an empty proof, not NOT_FOUND.
            let size = c
                .list_receipts(pb::ListReceiptsRequest {
                    from_seq: 0,
                    limit: 1,
                })
                .await
                .expect("ListReceipts")
                .into_inner()
                .log_size;
            let proof = c
                .get_consistency_proof(pb::GetConsistencyProofRequest {
                    old_size: 0,
                    new_size: size,
                })
                .await
                .expect("GetConsistencyProof(0, n)")
                .into_inner();
            assert!(proof.path.is_empty());
            let e = c
                .get_consistency_proof(pb::GetConsistencyProofRequest {
                    old_size: size,
                    new_size: 1,
                })
                .await
                .expect_err("old > new");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            assert!(
                e.message()
                    .contains(&format!("old_size {size} is larger than new_size 1")),
                "{e:?}"
            );
            size
        });
        assert!(size >= 20);
        // The CLI words.
        let endpoint = agent.endpoint();
        let (out, stdout, stderr) = cli(&["receipts", "keys", "--endpoint", &endpoint]);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stdout.contains(&format!("fingerprint {}", fingerprint(&v1)))
                && stdout.contains(&format!("fingerprint {}", fingerprint(&v2))),
            "{stdout}"
        );
        let (out, stdout, stderr) = cli(&[
            "receipts",
            "checkpoints",
            "--endpoint",
            &endpoint,
            "--output",
            "json",
        ]);
        assert!(out.status.success(), "{stderr}");
        let doc: serde_json::Value = serde_json::from_str(&stdout).expect("json");
        assert_eq!(
            doc["checkpoints"][0]["cosignatures"][0]["witness"], "witness.us-east-2",
            "{doc}"
        );
        let (status, _) = agent.sigterm();
        assert!(status.success(), "{status}");

        // A payload edited in place: the next start refuses, with exit 65, before attaching.
        let ledger = dir.path().join("receipts.redb");
        flip(&ledger, "payloads", 3, 2);
        let before = file_sha256(&ledger);
        let pins2 = TestPins::new("trust-tampered");
        let run_dir = dir.path().join("second");
        std::fs::create_dir_all(&run_dir).expect("mkdir");
        let config = write_config(&run_dir, &cg.path, &pins2.root, &kms_tables(dir.path()));
        let mut child = std::process::Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run");
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the agent started on a ledger whose payload was edited (still running after 30 s)");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("stderr");
        assert_eq!(status.code(), Some(65), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "error: the receipts ledger {} does not verify, so the agent will not extend it: \
                 receipt 3: its payload does not match the payload hash in its header",
                ledger.display()
            )),
            "{stderr}"
        );
        assert!(
            !pins2.root.exists(),
            "the datapath was started (pins at {}) on a ledger that does not verify",
            pins2.root.display()
        );
        assert_eq!(
            file_sha256(&ledger),
            before,
            "the refused ledger was written"
        );
    }
}

/// The agent's wall clock stepped an hour back, then two hours forward (libfaketime on the
/// agent process only, through a timestamp file it rereads; the monotonic clock is left alone,
/// as a real clock step leaves it): beats go on, checkpoints keep being written and signed, the
/// forward step makes the hourly key rotation due and it rotates, and the ledger verifies.
#[test]
fn kernel_clock_steps_back_and_forth_during_beats_checkpoints_and_rotation() {
    let lib = Path::new("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1");
    if !support::kernel_available(
        "kernel_clock_steps_back_and_forth_during_beats_checkpoints_and_rotation",
    ) {
        return;
    }
    assert!(
        lib.exists(),
        "{} is missing: `cargo xtask setup` installs Debian's faketime",
        lib.display()
    );
    let cg = support::TestCgroup::new("clock-step");
    let pins = support::TestPins::new("clock-step");
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = dir.path().join("faketime");
    std::fs::write(&clock, "+0\n").expect("clock file");
    let config = support::write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "[slo]\nbeat_interval_ms = 20\n[kms]\nprovider = \"file\"\nkey_dir = \"{}\"\nrotation_interval_hours = 1\n\
             [receipts]\npath = \"{}\"\n",
            dir.path().join("keys").display(),
            dir.path().join("receipts.redb").display()
        ),
    );
    let child = std::process::Command::new(support::BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("LD_PRELOAD", lib)
        .env("FAKETIME_TIMESTAMP_FILE", &clock)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the agent under libfaketime");
    let agent = support::Agent::attach(child);
    let metric = |name: &str| -> f64 {
        agent
            .get("/metrics")
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // Connects keep the cycles busy: an idle cycle is not receipted, so it checkpoints nothing.
    let sink = support::tcp_sink("127.0.0.1:0");
    let progress = |what: &str| {
        let (beats, signed) = (
            metric("knhk_beats_total"),
            metric("knhk_receipts_checkpoints_signed_total"),
        );
        support::wait_until(what, Duration::from_secs(20), || {
            support::tcp_connect_loop_from(&cg.path, sink, 3);
            metric("knhk_beats_total") > beats + 50.0
                && metric("knhk_receipts_checkpoints_signed_total") > signed + 2.0
        });
        assert!(
            agent.get("/readyz").contains("200 OK"),
            "{}",
            agent.get("/readyz")
        );
    };
    progress("beats and signed checkpoints at the true time");
    std::fs::write(&clock, "-1h\n").expect("step back");
    progress("beats and signed checkpoints after a step an hour back");
    // The key now seems created an hour in the future: the rotation task's next look (every
    // 5 s) must read its age as 0, not as an overdue key, and must not rotate.
    support::wait_until(
        "the rotation task reads the key's age as 0 after the step back",
        Duration::from_secs(15),
        || metric("knhk_receipts_signing_key_age_seconds") == 0.0,
    );
    assert!(
        !dir.path().join("keys/v2.pem").exists(),
        "the key rotated after the clock stepped back"
    );
    assert_eq!(metric("knhk_receipts_key_rotation_overdue"), 0.0);
    let keys_before = metric("knhk_receipts_signing_key_age_seconds");
    std::fs::write(&clock, "+1h\n").expect("step forward");
    progress("beats and signed checkpoints after a step two hours forward");
    // The forward step made the key an hour older than its interval: it rotates at the rotation
    // task's next look at the clock (at most 5 s of monotonic time after its previous one).
    support::wait_until(
        "the hourly key rotates after the step",
        Duration::from_secs(20),
        || dir.path().join("keys/v2.pem").exists(),
    );
    eprintln!("signing key age before the forward step: {keys_before} s");
    let (status, _) = agent.sigterm();
    assert!(status.success(), "{status}");
    let out = std::process::Command::new(support::BIN)
        .args(["receipts", "verify", "--db"])
        .arg(dir.path().join("receipts.redb"))
        .output()
        .expect("verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("verified"),
        "{stdout}"
    );
}

/// A cycle is receipted when something was decided in it, and an idle node writes nothing: no
/// cycle summaries, no checkpoints (a 20 ms beat: a pulse every 160 ms).
#[test]
fn kernel_an_idle_agent_writes_no_receipts_and_a_busy_one_does() {
    if !support::kernel_available("kernel_an_idle_agent_writes_no_receipts_and_a_busy_one_does") {
        return;
    }
    let cg = support::TestCgroup::new("idle-receipts");
    let pins = support::TestPins::new("idle-receipts");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = support::write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "[slo]\nbeat_interval_ms = 20\n[kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n\
             [receipts]\npath = \"{}\"\n",
            dir.path().join("keys").display(),
            dir.path().join("receipts.redb").display()
        ),
    );
    let agent = support::Agent::start(&config);
    let metric = |name: &str| -> f64 {
        agent
            .get("/metrics")
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let size = || metric("knhk_receipts_log_size");
    let signed = || metric("knhk_receipts_checkpoints_signed_total");
    // Idle: once the start-up receipts are checkpointed, 2 s (12 pulses) add nothing.
    let settled = |what: &str| {
        let mut last = (size(), signed());
        support::wait_until(what, Duration::from_secs(20), || {
            std::thread::sleep(Duration::from_millis(500));
            let now = (size(), signed());
            std::mem::replace(&mut last, now) == now
        });
        let before = (size(), signed());
        std::thread::sleep(Duration::from_secs(2));
        let after = (size(), signed());
        assert_eq!(
            before, after,
            "{what}: an idle agent wrote receipts or checkpoints"
        );
        after
    };
    let (idle_size, idle_signed) = settled("the start-up receipts are checkpointed");
    assert!(idle_size >= 1.0, "the start-up policy switch is receipted");
    // Busy: connects over a few pulses are receipted as cycle summaries and checkpointed.
    let sink = support::tcp_sink("127.0.0.1:0");
    for _ in 0..5 {
        support::tcp_connect_loop_from(&cg.path, sink, 3);
        std::thread::sleep(Duration::from_millis(200));
    }
    support::wait_until(
        "the busy cycles are receipted and checkpointed",
        Duration::from_secs(20),
        || size() >= idle_size + 3.0 && signed() > idle_signed,
    );
    let (busy_size, _) = settled("the agent is idle again");
    eprintln!("receipts: {idle_size} idle, {busy_size} after 5 busy rounds");
}
