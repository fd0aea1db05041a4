//! `cargo xtask bench` (part 6): the receipts archive. Receipts archived per second to moto's S3
//! with Object Lock (COMPLIANCE, one `PutObject` per segment of `segment_max_receipts`, each
//! object looked for first), from a ledger of 200,000 cycle-summary-sized receipts under one
//! signed checkpoint; five runs, each to a fresh prefix. Goal: at least 50,000 receipts/s
//! (median). `--check` exits non-zero when the goal is missed.

#[path = "../../tests/support/mod.rs"]
mod support;

use knhk_agent::{
    archive::Archive,
    config::ArchiveSettings,
    objectstore::LockMode,
    receipts::{KeyRef, Ledger, NewReceipt, ReceiptKind},
};
use std::time::{Duration, Instant};
use support::{kms, s3};

const RECEIPTS: u64 = 200_000;
const RUNS: usize = 5;
const GOAL: f64 = 50_000.0;

fn receipt(i: u64) -> NewReceipt {
    NewReceipt {
        kind: ReceiptKind::CycleSummary,
        cycle: i,
        policy_generation: 1,
        // About the size of a cycle summary.
        payload: format!(
            "{{\"cycle\":{i},\"classes\":[{{\"class\":\"R1\",\"admitted\":{i},\"refused\":0,\"parked\":0,\"p50_ns\":81234,\"p99_ns\":250123}},{{\"class\":\"W1\",\"admitted\":3,\"refused\":0}},{{\"class\":\"C1\",\"admitted\":9,\"refused\":1}}],\"heat_digest\":\"5f2c8e0b7d\"}}"
        )
        .into_bytes(),
    }
}

/// A ledger of `n` receipts under one checkpoint. Its signature is a placeholder: the archive
/// uploads what the ledger holds and does not verify signatures (`receipts verify` does).
fn ledger(path: &std::path::Path, n: u64) -> Ledger {
    let ledger = Ledger::open(path, "bench", "local").expect("ledger");
    let key = KeyRef {
        id: "bench".into(),
        version: 1,
    };
    let mut next = 0;
    while next < n {
        let m = 10_000.min(n - next);
        let items: Vec<NewReceipt> = (next..next + m).map(receipt).collect();
        ledger.append(&items, &key).expect("append");
        next += m;
    }
    let number = ledger
        .write_checkpoint(1, &key)
        .expect("checkpoint")
        .expect("a new checkpoint");
    let body = ledger
        .checkpoint(number)
        .expect("read")
        .expect("stored")
        .body;
    ledger
        .sign_checkpoint_body(number, &body, b"placeholder")
        .expect("sign");
    ledger
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let check = std::env::args().any(|a| a == "--check");
    let moto = kms::moto();
    let c = s3::client(&moto.url).await;
    c.create_bucket()
        .bucket("bench-archive")
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .expect("CreateBucket with Object Lock");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rates = Vec::new();
    for run in 0..RUNS {
        let path = dir.path().join(format!("run-{run}.redb"));
        let l = ledger(&path, RECEIPTS);
        let url = format!("s3://bench-archive/run-{run}");
        let settings = ArchiveSettings {
            url: url.clone(),
            bucket: "bench-archive".into(),
            prefix: format!("run-{run}"),
            endpoint_url: Some(moto.url.clone()),
            region: "us-east-1".into(),
            force_path_style: true,
            lock_mode: LockMode::Compliance,
            retention_days: 1,
            segment_max_receipts: 10_000,
            upload_interval: Duration::from_millis(100),
            max_backlog_receipts: 1_000_000,
            timeout: Duration::from_secs(30),
        };
        let archive = Archive::new(settings, l, &prometheus::Registry::new())
            .await
            .expect("archive");
        let started = Instant::now();
        let round = archive.round().await.expect("round");
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(round.receipts, RECEIPTS, "{round:?}");
        let rate = RECEIPTS as f64 / secs;
        println!(
            "  run {run}: {RECEIPTS} receipts ({} objects written) in {secs:.2} s: {rate:.0} receipts/s",
            round.written
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let met = median >= GOAL;
    println!(
        "archive upload to moto S3 (Object Lock, {} receipts per segment, {RUNS} runs): median {median:.0} receipts/s, min {:.0}, max {:.0} (goal >= {GOAL:.0}/s: {})",
        10_000,
        rates[0],
        rates[rates.len() - 1],
        if met { "MET" } else { "MISSED" }
    );
    drop(moto);
    if check && !met {
        std::process::exit(1);
    }
}
