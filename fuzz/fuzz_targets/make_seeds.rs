//! Writes the generated seed corpora under `fuzz/corpus/` (encoded policy documents, receipt
//! and checkpoint encodings, signed checkpoints with their proofs, a small signed ledger), into
//! the directory named by `KNHK_FUZZ_CORPUS`. Run when a format changes:
//! `cargo xtask fuzz --make-seeds`. The configuration seeds are the repository's own TOML files
//! (committed copies), which this reads to encode their policies.
//!
//! It is a fuzz target only so that it links like one (the instrumented agent needs libFuzzer's
//! runtime): it does its work at initialisation and exits before fuzzing anything.
#![no_main]
// `init` exits, so the fuzz body is unreachable on purpose.
#![allow(unreachable_code)]

use knhk_agent::{
    api::convert::policy_to_proto,
    config::{Config, ReceiptSettings, SignerSettings},
    receipts::{
        format::{fingerprint, transition_statement, Receipt, ReceiptKind},
        ledger::{KeyRecord, StoredCheckpoint},
        merkle, NewReceipt, Receipts,
    },
};
use knhk_fuzz::{
    checkpoint_body, frame, signed_checkpoint, test_key_ref, test_public_der, Tree, TREE,
};
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use prost::Message;
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

libfuzzer_sys::fuzz_target!(
    init: {
        make_seeds();
        std::process::exit(0);
    },
    |_data: &[u8]| {}
);

fn make_seeds() {
    let corpus = PathBuf::from(
        std::env::var_os("KNHK_FUZZ_CORPUS").expect("KNHK_FUZZ_CORPUS names the corpus directory"),
    );
    policy_seeds(&corpus.join("policy_proto"), &corpus.join("config_parse"));
    receipt_seeds(&corpus.join("receipt_decode"));
    checkpoint_seeds(&corpus.join("checkpoint_verify"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(ledger_seed(&corpus.join("ledger_verify")));
}

/// The policy of every configuration seed, as `ApplyPolicy` would carry it.
fn policy_seeds(out: &Path, configs: &Path) {
    let mut entries: Vec<_> = std::fs::read_dir(configs)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    let defaults = std::iter::once(Config::embedded_default());
    let parsed = entries.iter().filter_map(|p| {
        let text = std::fs::read_to_string(p).ok()?;
        Config::parse(&text, "seed").ok()
    });
    for (n, config) in defaults.chain(parsed).enumerate() {
        let doc = policy_to_proto(&config.policy());
        write(out, &format!("policy-{n}.pb"), &doc.encode_to_vec());
    }
}

fn receipt_seeds(out: &Path) {
    let receipt = Receipt {
        seq: 7,
        cycle: 3,
        kind: ReceiptKind::PolicySwitch,
        time_ns: 1_700_000_000_000_000_000,
        policy_generation: 2,
        payload_len: 17,
        payload_hash: knhk_agent::receipts::format::sha256(b"{\"generation\":2}"),
        node: "node-a".into(),
        region: "eu-west-1".into(),
        key_id: "fuzz-key".into(),
        key_version: 1,
    };
    let mut seed = vec![0u8];
    seed.extend(receipt.encode());
    write(out, "receipt", &seed);
    let body = checkpoint_body(5).encode();
    write(out, "checkpoint", &[&[1u8][..], body.as_bytes()].concat());
    write(out, "keyref", b"\x02file:sha256:0123#12");
    let fp = fingerprint(&test_public_der());
    write(out, "fingerprint", &[&[2u8][..], fp.as_bytes()].concat());
    let next = knhk_agent::receipts::KeyRef {
        id: "fuzz-key".into(),
        version: 2,
    };
    let statement = transition_statement(&test_key_ref(), &next, &test_public_der(), 1);
    let record = KeyRecord {
        key: next,
        public_key: "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE".into(),
        since_ns: 1,
        transition: Some((statement.clone(), "MEUCIQ==".into())),
    };
    let json = serde_json::to_vec(&record).expect("json");
    write(out, "keyrecord", &[&[3u8][..], &json].concat());
    let stored = StoredCheckpoint {
        body,
        signature: Some("MEUCIQ==".into()),
    };
    let json = serde_json::to_vec(&stored).expect("json");
    write(out, "stored-checkpoint", &[&[4u8][..], &json].concat());
    // A signed note with a witness's cosignature line, and an add-checkpoint request.
    let note = format!(
        "{}\u{2014} witness.example +AAAAAQAAAABlU/EAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
        signed_checkpoint(5)
    );
    write(out, "note", &[&[5u8][..], note.as_bytes()].concat());
    let request = knhk_agent::witness::protocol::AddCheckpoint {
        old: 3,
        proof: merkle::consistency_path(&Tree, 3, 5).unwrap_or_default(),
        note: signed_checkpoint(5),
    }
    .encode();
    write(out, "add-checkpoint", &[&[6u8][..], request.as_bytes()].concat());
}

/// Signed checkpoint notes of the test tree, with consistency proofs from smaller sizes.
fn checkpoint_seeds(out: &Path) {
    for (old, new) in [(0, 1), (1, 2), (3, 7), (4, 8), (5, TREE), (TREE, TREE)] {
        let note = signed_checkpoint(new);
        let proof = if old == 0 {
            Vec::new()
        } else {
            merkle::consistency_path(&Tree, old, new).unwrap_or_default()
        };
        let mut seed = Vec::new();
        seed.extend_from_slice(&old.to_be_bytes()); // old
        seed.push(((old as u8) << 1) | 1); // cosigned: the true checkpoint of size old
        seed.extend(frame(&[note.as_bytes()]));
        for h in proof {
            seed.extend_from_slice(&h);
        }
        write(out, &format!("cp-{old}-{new}"), &seed);
    }
}

/// A small ledger signed by the test key (in a file signer's key directory): 30 receipts, two
/// checkpoints, all signed.
async fn ledger_seed(out: &Path) {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).expect("key dir");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let pem = knhk_fuzz::test_key()
        .to_pkcs8_pem(LineEnding::LF)
        .expect("pem");
    let key_file = keys.join("v1.pem");
    std::fs::write(&key_file, pem.as_bytes()).expect("key file");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let settings = ReceiptSettings {
        path: dir.path().join("receipts.redb"),
        node: "node-a".into(),
        region: "eu-west-1".into(),
        rotation_interval: Duration::from_secs(24 * 3600),
        retention: Default::default(),
        max_pending_checkpoints: 1024,
        signer: SignerSettings::File { key_dir: keys },
    };
    let path = settings.path.clone();
    let signer = knhk_agent::receipts::connect_signer(&settings.signer)
        .await
        .expect("signer");
    let (r, tasks) = Receipts::start(settings, signer, &prometheus::Registry::new(), None, None)
        .await
        .expect("receipts");
    for (range, cycle) in [(0..24u64, 8), (24..30, 16)] {
        for i in range {
            r.append(NewReceipt {
                kind: ReceiptKind::PolicySwitch,
                cycle: i,
                policy_generation: i,
                payload: format!("{{\"generation\":{i}}}").into_bytes(),
            })
            .await
            .expect("append");
        }
        r.pulse(cycle).await;
        let start = std::time::Instant::now();
        while !r.ledger().unsigned_checkpoints().expect("read").is_empty() {
            assert!(start.elapsed() < Duration::from_secs(10), "unsigned");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let late = tasks
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    assert!(late.is_empty(), "tasks that did not stop: {late:?}");
    drop(r);
    let report =
        knhk_agent::receipts::verify::verify_file_with(&path, &[fingerprint(&test_public_der())])
            .expect("verifies");
    assert!(report.ok(), "{report:?}");
    write(out, "ledger.redb", &std::fs::read(&path).expect("ledger"));
}
