//! `cargo xtask bench` (part 3): the receipts ledger.
//!
//! 1. Receipts appended per second, durable (one fsync per batch), at batch sizes 1, 100 and
//!    1,000, side by side.
//! 2. Checkpoint sign latency per provider: a local file key, AWS KMS (moto's server) and Vault
//!    transit (an OpenBao dev server), each on this machine.
//! 3. Offline verification speed of a ledger of 1,000,000 receipts.

#[path = "../../tests/support/mod.rs"]
mod support;

use support::kms;

use knhk_agent::{
    config::SignerSettings,
    receipts::{verify, CheckpointBody, KeyRef, Ledger, NewReceipt, ReceiptKind, Signer},
};
use std::time::{Duration, Instant};

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

fn key() -> KeyRef {
    KeyRef {
        id: "bench".into(),
        version: 1,
    }
}

fn append_rate(dir: &std::path::Path, batch: usize, total: u64) -> f64 {
    let ledger =
        Ledger::open(&dir.join(format!("append-{batch}.redb")), "bench", "local").expect("ledger");
    let started = Instant::now();
    let mut next = 0;
    while next < total {
        let n = (batch as u64).min(total - next);
        let items: Vec<NewReceipt> = (next..next + n).map(receipt).collect();
        ledger.append(&items, &key()).expect("append");
        next += n;
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn quantiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let q = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    (q(0.5), q(0.99))
}

async fn sign_latency(signer: &dyn Signer, n: usize) -> (Duration, Duration) {
    let current = signer.current().await.expect("current key");
    let body = CheckpointBody {
        origin: "knhk/local/bench/1".into(),
        size: 1,
        root: [7; 32],
        cycle: 8,
        time_ns: 0,
        key: current.key.clone(),
    }
    .encode();
    let mut times = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        signer
            .sign(&current.key, body.as_bytes())
            .await
            .expect("sign");
        times.push(t.elapsed());
    }
    quantiles(times)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    println!("== receipts ledger ==");
    println!("append, durable (fsync per batch), 200,000 receipts of ~300 bytes:");
    for (batch, total) in [(1usize, 2_000u64), (100, 200_000), (1_000, 200_000)] {
        let rate = append_rate(dir.path(), batch, total);
        println!("  batch {batch:>5}: {rate:>10.0} receipts/s");
    }

    println!("checkpoint sign latency, 50 signs each (local servers):");
    let file = knhk_agent::receipts::connect_signer(&SignerSettings::File {
        key_dir: dir.path().join("keys"),
    })
    .await
    .expect("file signer");
    let (p50, p99) = sign_latency(file.as_ref(), 50).await;
    println!(
        "  file  p50 {:>8.3} ms  p99 {:>8.3} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );

    let moto = kms::moto();
    let (_client, key_id) = kms::create_kms_key(&moto.url).await;
    let aws = knhk_agent::receipts::connect_signer(&SignerSettings::Aws {
        region: "us-east-1".into(),
        key_id,
        endpoint_url: Some(moto.url.clone()),
    })
    .await
    .expect("aws signer");
    let (p50, p99) = sign_latency(aws.as_ref(), 50).await;
    println!(
        "  aws   p50 {:>8.3} ms  p99 {:>8.3} ms  (moto)",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    drop(moto);

    let bao = kms::openbao();
    kms::create_transit_key(&bao.url, "bench").await;
    let token = dir.path().join("token");
    std::fs::write(&token, "root").expect("token");
    let vault = knhk_agent::receipts::connect_signer(&SignerSettings::Vault {
        addr: bao.url.clone(),
        mount: "transit".into(),
        key_name: "bench".into(),
        token_file: Some(token),
    })
    .await
    .expect("vault signer");
    let (p50, p99) = sign_latency(vault.as_ref(), 50).await;
    println!(
        "  vault p50 {:>8.3} ms  p99 {:>8.3} ms  (OpenBao)",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    drop(bao);

    println!("offline verification of 1,000,000 receipts:");
    let path = dir.path().join("million.redb");
    let ledger = Ledger::open(&path, "bench", "local").expect("ledger");
    let current = file.current().await.expect("key");
    ledger
        .add_key(&knhk_agent::receipts::KeyRecord {
            key: current.key.clone(),
            public_key: base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                &current.public_key_der,
            ),
            since_ns: 0,
            transition: None,
        })
        .expect("key");
    let built = Instant::now();
    for chunk in 0..100u64 {
        let items: Vec<NewReceipt> = (chunk * 10_000..(chunk + 1) * 10_000)
            .map(receipt)
            .collect();
        ledger.append(&items, &current.key).expect("append");
        if chunk % 10 == 9 {
            let n = ledger
                .write_checkpoint(chunk, &current.key)
                .expect("checkpoint")
                .expect("new");
            let body = ledger.unsigned_checkpoints().expect("unsigned")[0]
                .1
                .encode();
            let sig = file
                .sign(&current.key, body.as_bytes())
                .await
                .expect("sign");
            ledger.sign_checkpoint_body(n, &body, &sig).expect("store");
        }
    }
    println!("  built in {:.1} s", built.elapsed().as_secs_f64());
    drop(ledger);
    let db = redb::Database::open(&path).expect("open");
    let started = Instant::now();
    let report = verify(&db).expect("verify");
    let took = started.elapsed();
    assert!(report.ok(), "{report:?}");
    println!(
        "  verified {} receipts, {} checkpoints in {:.2} s: {:.0} receipts/s",
        report.receipts,
        report.checkpoints,
        took.as_secs_f64(),
        report.receipts as f64 / took.as_secs_f64()
    );
}
