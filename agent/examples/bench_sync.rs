//! `cargo xtask bench` (part 4): cross-region receipt sync, in one process on loopback.
//!
//! 1. Replicated receipts per second: an origin with 200,000 receipts and two witness regions
//!    on loopback; time until both hold all of them durably (batches of 1,000).
//! 2. Quorum-commit latency with 40 ms RTT (a delaying proxy, 20 ms each way, on every link):
//!    from a pulse (checkpoint written) until a witness's cosignature is stored at the origin
//!    (quorum 2 of 3), 50 checkpoints; against the goal of 3 × RTT + the batch linger.

#[path = "../../tests/support/mod.rs"]
mod support;

use support::proxy;

use knhk_agent::{
    config::{Peer, ReceiptSettings, SignerSettings, SyncSettings},
    receipts::{NewReceipt, ReceiptKind, Receipts},
    sync::{pb, Replicator},
    tasks::TaskGroup,
};
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

fn settings(dir: &std::path::Path, region: &str) -> ReceiptSettings {
    ReceiptSettings {
        path: dir.join(format!("{region}/receipts.redb")),
        node: format!("node-{region}"),
        region: region.into(),
        rotation_interval: Duration::from_secs(24 * 3600),
        retention: Default::default(),
        max_pending_checkpoints: 1024,
        signer: SignerSettings::File {
            key_dir: dir.join(format!("{region}/keys")),
        },
    }
}

/// A ledger and the group that owns its tasks (they stop when it is dropped).
async fn receipts(dir: &std::path::Path, region: &str) -> (Arc<Receipts>, TaskGroup) {
    let s = settings(dir, region);
    let signer = knhk_agent::receipts::connect_signer(&s.signer)
        .await
        .expect("signer");
    Receipts::start(s, signer, &prometheus::Registry::new(), None, None)
        .await
        .expect("receipts")
}

/// A witness region serving `RegionSync` on loopback.
/// The witness's address, and what must stay alive for it to serve.
async fn witness(
    dir: &std::path::Path,
    region: &str,
) -> (SocketAddr, (Arc<Replicator>, TaskGroup, TaskGroup)) {
    let (r, ledger_tasks) = receipts(dir, region).await;
    let sync = Replicator::start(
        SyncSettings {
            region: region.into(),
            peers: vec![],
            quorum: 1,
            batch_size: 1000,
            linger: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
        },
        r,
        None,
        dir.join(format!("{region}/peers")),
        &prometheus::Registry::new(),
    )
    .expect("witness");
    let (sync, sync_tasks) = sync;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = sync.server();
    tokio::spawn(async move {
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let _ = tonic::transport::Server::builder()
            .add_service(
                pb::region_sync_server::RegionSyncServer::from_arc(server)
                    .max_decoding_message_size(64 << 20),
            )
            .serve_with_incoming(incoming)
            .await;
    });
    (addr, (sync, ledger_tasks, sync_tasks))
}

fn peer(addr: SocketAddr) -> Peer {
    Peer {
        endpoint: format!("http://{addr}"),
        authority: addr.to_string(),
        tls: false,
    }
}

async fn stored(addr: SocketAddr, origin: &str) -> u64 {
    let mut c = pb::region_sync_client::RegionSyncClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    c.get_sync_state(pb::GetSyncStateRequest {
        origin_region: origin.into(),
    })
    .await
    .expect("state")
    .into_inner()
    .stored_size
}

fn receipt(i: u64) -> NewReceipt {
    NewReceipt {
        kind: ReceiptKind::CycleSummary,
        cycle: i,
        policy_generation: 1,
        payload: format!(
            "{{\"cycle\":{i},\"classes\":[{{\"class\":\"R1\",\"admitted\":{i},\"refused\":0}}]}}"
        )
        .into_bytes(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    println!("== region sync ==");

    // 1. Throughput to two peers on loopback.
    let (w1, _k1) = witness(dir.path(), "w1").await;
    let (w2, _k2) = witness(dir.path(), "w2").await;
    let (origin, _origin_tasks) = receipts(dir.path(), "origin").await;
    const N: u64 = 200_000;
    let key = origin.ledger().keys().expect("keys")[0].key.clone();
    for chunk in 0..N / 10_000 {
        let items: Vec<NewReceipt> = (chunk * 10_000..(chunk + 1) * 10_000)
            .map(receipt)
            .collect();
        origin.ledger().append(&items, &key).expect("append");
    }
    let started = Instant::now();
    let _origin_sync = Replicator::start(
        SyncSettings {
            region: "origin".into(),
            peers: vec![peer(w1), peer(w2)],
            quorum: 2,
            batch_size: 1000,
            linger: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
        },
        origin.clone(),
        None,
        dir.path().join("origin/peers"),
        &prometheus::Registry::new(),
    )
    .expect("origin");
    loop {
        if stored(w1, "origin").await >= N && stored(w2, "origin").await >= N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    println!(
        "replication to two peers on loopback, batches of 1,000: {N} receipts to both in {:.2} s: {:.0} receipts/s (per peer)",
        took.as_secs_f64(),
        N as f64 / took.as_secs_f64()
    );

    // 2. Quorum-commit latency with a 40 ms RTT.
    let rt_delay = Duration::from_millis(20);
    let (v1, _j1) = witness(dir.path(), "v1").await;
    let (v2, _j2) = witness(dir.path(), "v2").await;
    let handle = tokio::runtime::Handle::current();
    let (p1, p2) = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let p1 = proxy::DelayProxy::start(&rt, v1, rt_delay);
        let p2 = proxy::DelayProxy::start(&rt, v2, rt_delay);
        let addrs = (p1.addr, p2.addr);
        std::thread::spawn(move || {
            let _keep = (p1, p2);
            rt.block_on(std::future::pending::<()>());
        });
        addrs
    })
    .await
    .expect("proxies");
    let _ = handle;
    let (delayed, _delayed_tasks) = receipts(dir.path(), "delayed").await;
    let linger = Duration::from_millis(20);
    let _delayed_sync = Replicator::start(
        SyncSettings {
            region: "delayed".into(),
            peers: vec![peer(p1), peer(p2)],
            quorum: 2,
            batch_size: 1000,
            linger,
            timeout: Duration::from_secs(5),
        },
        delayed.clone(),
        None,
        dir.path().join("delayed/peers"),
        &prometheus::Registry::new(),
    )
    .expect("delayed origin");
    let mut times = Vec::new();
    for i in 0..60u64 {
        for j in 0..100 {
            delayed.append(receipt(i * 100 + j)).await.expect("append");
        }
        let before = delayed.ledger().checkpoints().expect("checkpoints").len() as u64;
        let t = Instant::now();
        delayed.pulse(i).await;
        let number = before;
        loop {
            let cosigned = delayed
                .ledger()
                .cosignatures()
                .expect("cosignatures")
                .iter()
                .any(|(n, _)| *n >= number);
            if cosigned {
                break;
            }
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
        "quorum-commit latency, 40 ms RTT, linger {} ms ({} checkpoints): p50 {:.1} ms  p99 {:.1} ms  (goal p99 <= 3 x RTT + linger = {} ms: {})",
        linger.as_millis(),
        times.len(),
        q(0.5).as_secs_f64() * 1e3,
        q(0.99).as_secs_f64() * 1e3,
        goal.as_millis(),
        if q(0.99) <= goal { "met" } else { "NOT met" }
    );
}
