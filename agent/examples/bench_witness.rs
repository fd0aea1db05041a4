//! `cargo xtask bench` (part 4): witnessing, in one process on loopback.
//!
//! 1. Witness cosignatures per second for 1,000 origins, in-process Ed25519 key: every origin
//!    registered, then three checkpoints each (with consistency proofs) through the witness's
//!    own `add_checkpoint` (verify ECDSA, check the proof, cosign, group-committed state), 64
//!    origins at a time; five runs. Goal ≥ 2,000/s.
//! 2. The same with the key in OpenBao transit (`ed25519`): one HTTP round trip per cosignature.
//! 3. Checkpoint → quorum at 40 ms RTT: a node's ledger pushing to three witnesses over plain
//!    HTTP, each link through a delaying proxy (20 ms each way), quorum 2; from the pulse that
//!    writes a checkpoint until two cosignatures of it are stored; 50 checkpoints. Goal p99 ≤
//!    3 × RTT + linger.

#[path = "../../tests/support/mod.rs"]
mod support;

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use knhk_agent::{
    config::{Peer, ReceiptSettings, SignerSettings, SyncSettings},
    note,
    receipts::{
        format::Hash, merkle, CheckpointBody, KeyRecord, KeyRef, NewReceipt, ReceiptKind, Receipts,
    },
    sync::Replicator,
    witness::{self, protocol::AddCheckpoint, CosignKey, FileKey, KeySource, Transport, Witness},
};
use p256::ecdsa::{signature::Signer as _, DerSignature, SigningKey};
use p256::pkcs8::EncodePublicKey as _;
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

/// A log of `n` leaves in memory.
struct Mem(HashMap<(u8, u64), Hash>);

impl merkle::Nodes for Mem {
    type Error = String;
    fn node(&self, level: u8, index: u64) -> Result<Hash, String> {
        self.0
            .get(&(level, index))
            .copied()
            .ok_or_else(|| format!("missing node ({level}, {index})"))
    }
}

fn tree(seed: u64, n: u64) -> Mem {
    let mut mem = Mem(HashMap::new());
    for i in 0..n {
        let leaf = merkle::leaf(&[seed.to_be_bytes(), i.to_be_bytes()].concat());
        let done = merkle::completed_by_append(i, leaf, |l, x| merkle::Nodes::node(&mem, l, x))
            .expect("append");
        for (l, x, h) in done {
            mem.0.insert((l, x), h);
        }
    }
    mem
}

/// An origin: its key record and its signed requests for sizes 4, 8 and 16.
struct Origin {
    name: String,
    record: KeyRecord,
    requests: Vec<AddCheckpoint>,
}

fn origin(i: u64) -> Origin {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i + 1).to_be_bytes());
    seed[31] = 1;
    let key = SigningKey::from_slice(&seed).expect("key");
    let spki = key
        .verifying_key()
        .to_public_key_der()
        .expect("spki")
        .into_vec();
    let name = format!("knhk/bench/node-{i}/1");
    let record = KeyRecord {
        key: KeyRef {
            id: format!("k{i}"),
            version: 1,
        },
        public_key: B64.encode(&spki),
        since_ns: 0,
        transition: None,
    };
    let log = tree(i, 16);
    let mut requests = Vec::new();
    let mut old = 0;
    for size in [4u64, 8, 16] {
        let body = CheckpointBody {
            origin: name.clone(),
            size,
            root: merkle::root(&log, size).expect("root"),
            cycle: size,
            time_ns: 1,
            key: record.key.clone(),
        }
        .encode();
        let sig: DerSignature = key.sign(body.as_bytes());
        let line = note::log_signature_line(&name, &spki, sig.as_bytes());
        requests.push(AddCheckpoint {
            old,
            proof: if old == 0 {
                vec![]
            } else {
                merkle::consistency_path(&log, old, size).expect("proof")
            },
            note: note::render(&body, &[line]),
        });
        old = size;
    }
    Origin {
        name,
        record,
        requests,
    }
}

/// Cosignatures per second through `witness` for `origins` (registered first, not timed).
async fn cosign_rate(witness: Arc<Witness>, origins: Arc<Vec<Origin>>, parallel: usize) -> f64 {
    for o in origins.iter() {
        witness
            .register(
                None,
                witness::protocol::LogKeys {
                    origin: o.name.clone(),
                    keys: vec![o.record.clone()],
                },
            )
            .await
            .expect("register");
    }
    let total: usize = origins.iter().map(|o| o.requests.len()).sum();
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..parallel {
        let (w, origins, next) = (witness.clone(), origins.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(o) = origins.get(i) else { return };
                for r in &o.requests {
                    w.add_checkpoint(None, r).await.expect("cosigned");
                }
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn spread(rates: &mut [f64]) -> (f64, f64, f64) {
    rates.sort_by(|a, b| a.total_cmp(b));
    (rates[rates.len() / 2], rates[0], rates[rates.len() - 1])
}

fn peer(addr: SocketAddr) -> Peer {
    Peer {
        endpoint: format!("http://{addr}"),
        authority: addr.to_string(),
        tls: false,
    }
}

async fn serve(dir: &std::path::Path, name: &str) -> (SocketAddr, String) {
    let registry = prometheus::Registry::new();
    let key: Arc<dyn CosignKey> =
        Arc::new(FileKey::open(&dir.join(format!("{name}.key"))).expect("key"));
    let w = Arc::new(
        Witness::open(name, key, &dir.join(format!("{name}.redb")), &registry).expect("witness"),
    );
    let vkey = w.verifier_key().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(witness::serve(
        w,
        registry,
        listener,
        Transport::Plain,
        std::future::pending(),
    ));
    (addr, vkey)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    println!("== witnessing ==");

    // 1. In-process key.
    let origins = Arc::new((0..1000).map(origin).collect::<Vec<_>>());
    let mut rates = Vec::new();
    for run in 0..5 {
        let key: Arc<dyn CosignKey> =
            Arc::new(FileKey::open(&dir.path().join("w.key")).expect("key"));
        let w = Arc::new(
            Witness::open(
                "witness.bench",
                key,
                &dir.path().join(format!("w{run}.redb")),
                &prometheus::Registry::new(),
            )
            .expect("witness"),
        );
        rates.push(cosign_rate(w, origins.clone(), 64).await);
    }
    let (median, lo, hi) = spread(&mut rates);
    println!(
        "witness cosignatures, 1,000 origins x 3 checkpoints, in-process Ed25519 key: median {median:.0}/s (5 runs: {lo:.0}-{hi:.0}); goal >= 2,000/s: {}",
        if median >= 2000.0 { "MET" } else { "MISSED" }
    );

    // 2. OpenBao transit key.
    let bao = support::kms::openbao();
    {
        let settings = vaultrs::client::VaultClientSettingsBuilder::default()
            .address(&bao.url)
            .token("root")
            .build()
            .expect("settings");
        let client = vaultrs::client::VaultClient::new(settings).expect("client");
        // Already mounted is fine.
        let _ = vaultrs::sys::mount::enable(&client, "transit", "transit", None).await;
    }
    let source = KeySource::Vault {
        addr: bao.url.clone(),
        token: "root".into(),
        mount: "transit".into(),
        name: "witness-bench".into(),
    };
    let few = Arc::new((0..200).map(origin).collect::<Vec<_>>());
    let mut bao_rates = Vec::new();
    for run in 0..3 {
        let key = source.open().await.expect("openbao key");
        let w = Arc::new(
            Witness::open(
                "witness.bench",
                key,
                &dir.path().join(format!("bao{run}.redb")),
                &prometheus::Registry::new(),
            )
            .expect("witness"),
        );
        bao_rates.push(cosign_rate(w, few.clone(), 16).await);
    }
    let (bm, blo, bhi) = spread(&mut bao_rates);
    println!(
        "witness cosignatures, 200 origins x 3 checkpoints, Ed25519 key in OpenBao transit: median {bm:.0}/s (3 runs: {blo:.0}-{bhi:.0}); in-process/OpenBao = {:.1}x",
        median / bm
    );
    drop(bao);

    // 3. Checkpoint -> quorum at 40 ms RTT.
    let mut links = Vec::new();
    let mut keys = Vec::new();
    for i in 0..3 {
        let (addr, vkey) = serve(dir.path(), &format!("witness-{i}")).await;
        links.push(addr);
        keys.push(note::VerifierKey::parse(&vkey).expect("vkey"));
    }
    let delay = Duration::from_millis(20);
    let proxied = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let proxies: Vec<_> = links
            .iter()
            .map(|a| support::proxy::DelayProxy::start(&rt, *a, delay))
            .collect();
        let addrs: Vec<SocketAddr> = proxies.iter().map(|p| p.addr).collect();
        std::thread::spawn(move || {
            let _keep = proxies;
            rt.block_on(std::future::pending::<()>());
        });
        addrs
    })
    .await
    .expect("proxies");
    let settings = ReceiptSettings {
        path: dir.path().join("node/receipts.redb"),
        node: "node-bench".into(),
        region: "bench".into(),
        rotation_interval: Duration::from_secs(24 * 3600),
        retention: Default::default(),
        max_pending_checkpoints: 1024,
        signer: SignerSettings::File {
            key_dir: dir.path().join("node/keys"),
        },
    };
    let signer = knhk_agent::receipts::connect_signer(&settings.signer)
        .await
        .expect("signer");
    let (node, _node_tasks) =
        Receipts::start(settings, signer, &prometheus::Registry::new(), None, None)
            .await
            .expect("receipts");
    let linger = Duration::from_millis(10);
    let _pushing = Replicator::start(
        SyncSettings {
            region: "bench".into(),
            peers: proxied.iter().map(|a| peer(*a)).collect(),
            quorum: 2,
            witness_keys: keys,
            linger,
            timeout: Duration::from_secs(5),
        },
        node.clone(),
        None,
        &prometheus::Registry::new(),
    )
    .expect("replicator");
    let mut times = Vec::new();
    for i in 0..60u64 {
        for j in 0..10 {
            node.append(NewReceipt {
                kind: ReceiptKind::CycleSummary,
                cycle: i,
                policy_generation: 1,
                payload: format!("{{\"cycle\":{i},\"j\":{j}}}").into_bytes(),
            })
            .await
            .expect("append");
        }
        let number = node.ledger().checkpoints().expect("checkpoints").len() as u64;
        let t = Instant::now();
        node.pulse(i).await;
        while node.ledger().cosigner_count(number).unwrap_or(0) < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if i >= 10 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    let q = |p: f64| times[((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1];
    let goal = Duration::from_millis(3 * 40) + linger;
    println!(
        "checkpoint -> quorum 2 of 3 witnesses, 40 ms RTT, linger {} ms ({} checkpoints): p50 {:.1} ms  p99 {:.1} ms; goal p99 <= 3 x RTT + linger = {} ms: {}",
        linger.as_millis(),
        times.len(),
        q(0.5).as_secs_f64() * 1e3,
        q(0.99).as_secs_f64() * 1e3,
        goal.as_millis(),
        if q(0.99) <= goal { "MET" } else { "MISSED" }
    );
}
