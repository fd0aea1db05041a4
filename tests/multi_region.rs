//! Kernel tests of cross-region receipt sync (need root, cgroup v2 and BPF, because each region
//! is a real agent process): three agents as three regions on loopback, every link through a
//! delaying TCP proxy (20 ms each way: a 40 ms inter-region RTT) that can also cut the link.

mod support;

use knhk_agent::{
    receipts::{format, CheckpointBody, KeyRef, Receipt, ReceiptKind},
    sync::pb::{self, region_sync_client::RegionSyncClient},
};
use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};
use support::{proxy::DelayProxy, *};

struct Region {
    name: &'static str,
    grpc: SocketAddr,
    dir: tempfile::TempDir,
    cg: TestCgroup,
    pins: TestPins,
}

impl Region {
    fn new(name: &'static str) -> Region {
        Region {
            name,
            grpc: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            dir: tempfile::tempdir().expect("tempdir"),
            cg: TestCgroup::new(&format!("region-{name}")),
            pins: TestPins::new(&format!("region-{name}")),
        }
    }

    fn db(&self) -> std::path::PathBuf {
        self.dir.path().join("receipts.redb")
    }

    fn config(&self, peers: &[SocketAddr]) -> std::path::PathBuf {
        let path = self.dir.path().join("agent.toml");
        let endpoints: Vec<String> = peers.iter().map(|p| format!("\"http://{p}\"")).collect();
        let text = format!(
            "[agent]\ncgroup_root = \"{}\"\npin_root = \"{}\"\nmetrics_address = \"127.0.0.1:0\"\nlisten_address = \"{}\"\n\
             [slo]\nbeat_interval_ms = 25\n\
             [kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n\
             [receipts]\npath = \"{}\"\nnode = \"node-{}\"\n\
             [multi_region]\nregion = \"{}\"\ncross_region_sync_enabled = true\nreceipt_sync_endpoints = [{}]\n\
             batch_linger_ms = 10\ntimeout_ms = 1000\n",
            self.cg.path.display(),
            self.pins.root.display(),
            self.grpc,
            self.dir.path().join("keys").display(),
            self.db().display(),
            self.name,
            self.name,
            endpoints.join(", ")
        );
        std::fs::write(&path, text).expect("config");
        path
    }
}

fn metric(agent: &Agent, line_prefix: &str) -> f64 {
    let body = agent.get("/metrics");
    body.lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

fn committed(agent: &Agent) -> f64 {
    metric(agent, "knhk_sync_quorum_committed_size")
}

fn verify(db: &Path) -> String {
    let out = Command::new(BIN)
        .args(["receipts", "verify", "--db"])
        .arg(db)
        .output()
        .expect("verify");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("verified"),
        "{stdout}"
    );
    stdout
}

#[test]
fn kernel_three_regions_replicate_reach_quorum_survive_a_loss_and_a_partition() {
    if !kernel_available(
        "kernel_three_regions_replicate_reach_quorum_survive_a_loss_and_a_partition",
    ) {
        return;
    }
    let _serial = timing_shared();
    let rt = runtime();
    let regions = [
        Region::new("us-east-1"),
        Region::new("us-west-2"),
        Region::new("eu-west-1"),
    ];
    let delay = Duration::from_millis(20);
    // proxies[i][j]: region i's link to region j.
    let proxies: Vec<Vec<Option<DelayProxy>>> = (0..3)
        .map(|i| {
            (0..3)
                .map(|j| (i != j).then(|| DelayProxy::start(&rt, regions[j].grpc, delay)))
                .collect()
        })
        .collect();
    let peers = |i: usize| -> Vec<SocketAddr> {
        (0..3)
            .filter(|j| *j != i)
            .map(|j| proxies[i][j].as_ref().expect("proxy").addr)
            .collect()
    };
    let configs: Vec<_> = (0..3).map(|i| regions[i].config(&peers(i))).collect();
    let mut agents: Vec<Option<Agent>> = configs.iter().map(|c| Some(Agent::start(c))).collect();
    let agent = |agents: &Vec<Option<Agent>>, i: usize| -> f64 {
        committed(agents[i].as_ref().expect("running"))
    };

    // Steady state: every region's checkpoints become quorum-committed.
    let started = Instant::now();
    wait_until(
        "all three regions commit with quorum",
        Duration::from_secs(30),
        || (0..3).all(|i| agent(&agents, i) > 0.0),
    );
    eprintln!(
        "steady state: first quorum commits after {:?}",
        started.elapsed()
    );

    // Lose eu-west-1: the other two still reach quorum 2/3.
    agents[2].take().expect("running").kill9();
    let before = agent(&agents, 0);
    wait_until(
        "us-east-1 commits with only us-west-2",
        Duration::from_secs(20),
        || agent(&agents, 0) > before + 10.0,
    );
    // It returns and catches up without help.
    agents[2] = Some(Agent::start(&configs[2]));
    let target = metric(
        agents[0].as_ref().expect("running"),
        "knhk_receipts_log_size",
    );
    wait_until(
        "eu-west-1 catches up on us-east-1's receipts",
        Duration::from_secs(30),
        || {
            metric(
                agents[0].as_ref().expect("running"),
                &format!(
                    "knhk_sync_peer_acked_receipts{{peer=\"http://{}\"}}",
                    proxies[0][2].as_ref().expect("p").addr
                ),
            ) >= target
        },
    );

    // Partition us-east-1: it cannot reach quorum, and says so.
    for j in [1, 2] {
        proxies[0][j].as_ref().expect("p").set_down(true);
        proxies[j][0].as_ref().expect("p").set_down(true);
    }
    let a = agents[0].as_ref().expect("running");
    wait_until(
        "readiness reports the lost quorum",
        Duration::from_secs(30),
        || {
            let r = a.get("/readyz");
            !r.contains("200 OK") && r.contains("cannot reach quorum")
        },
    );
    let status = Command::new(BIN)
        .args([
            "status",
            "--endpoint",
            &format!("http://{}", regions[0].grpc),
        ])
        .output()
        .expect("status");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("region us-east-1: quorum 2") && status.contains("cannot reach quorum"),
        "{status}"
    );
    assert!(metric(a, "knhk_sync_peer_circuit{peer=") >= 1.0);
    let open = a.get("/metrics").lines().any(|l| {
        l.contains("knhk_sync_peer_circuit") && l.contains("state=\"open\"") && l.ends_with(" 1")
    });
    assert!(open, "the circuit to a cut-off peer opens");
    // Heal: it converges without intervention.
    for j in [1, 2] {
        proxies[0][j].as_ref().expect("p").set_down(false);
        proxies[j][0].as_ref().expect("p").set_down(false);
    }
    wait_until("us-east-1 is ready again", Duration::from_secs(30), || {
        a.get("/readyz").contains("200 OK")
    });
    wait_until("both circuits close again", Duration::from_secs(20), || {
        a.get("/metrics")
            .lines()
            .filter(|l| l.contains("knhk_sync_peer_circuit") && l.contains("state=\"closed\""))
            .all(|l| l.ends_with(" 1"))
    });
    // Nothing lost, counted end to end: every receipt us-east-1 had written by now (through the
    // loss and the partition) reaches both witnesses.
    let written = metric(a, "knhk_receipts_log_size");
    wait_until(
        "both witnesses hold every receipt of us-east-1",
        Duration::from_secs(30),
        || {
            [1, 2].iter().all(|j| {
                metric(
                    a,
                    &format!(
                        "knhk_sync_peer_acked_receipts{{peer=\"http://{}\"}}",
                        proxies[0][*j].as_ref().expect("p").addr
                    ),
                ) >= written
            })
        },
    );
    eprintln!("us-east-1: {written} receipts, all held by both witnesses");

    // Stop everything; every ledger verifies, with the witnesses' cosignatures.
    for a in agents.iter_mut() {
        if let Some(mut a) = a.take() {
            unsafe { libc::kill(a.child.id() as i32, libc::SIGTERM) };
            let _ = a.child.wait();
        }
    }
    for r in &regions {
        let out = verify(&r.db());
        eprintln!("{}: {out}", r.name);
    }
    let db = redb::Database::open(regions[0].db()).expect("open");
    let report = knhk_agent::receipts::verify(&db).expect("verify");
    assert!(report.cosignatures > 0, "{report:?}");
    // The others hold us-east-1's log in its own namespace, and it verifies there too.
    for j in [1, 2] {
        let foreign = regions[j].dir.path().join("peers/us-east-1.redb");
        let db = redb::Database::open(&foreign).expect("foreign ledger");
        let report = knhk_agent::receipts::verify(&db).expect("verify");
        assert!(
            report.ok() && report.receipts > 0,
            "{}: {report:?}",
            regions[j].name
        );
    }
}

/// A receipt encoding of an invented origin, for direct pushes.
fn foreign_receipt(seq: u64) -> pb::Entry {
    let payload = format!("{{\"n\":{seq}}}").into_bytes();
    let r = Receipt {
        seq,
        cycle: seq,
        kind: ReceiptKind::CycleSummary,
        time_ns: 1,
        policy_generation: 1,
        payload_len: payload.len() as u32,
        payload_hash: format::sha256(&payload),
        node: "n".into(),
        region: "forker".into(),
        key_id: "k".into(),
        key_version: 1,
    };
    pb::Entry {
        seq,
        encoding: r.encode(),
        payload,
    }
}

fn signed(key: &p256::ecdsa::SigningKey, body: &CheckpointBody) -> pb::SignedCheckpoint {
    use p256::ecdsa::signature::Signer as _;
    let text = body.encode();
    let sig: p256::ecdsa::Signature = key.sign(text.as_bytes());
    pb::SignedCheckpoint {
        number: body.size,
        body: text,
        signature: sig.to_der().as_bytes().to_vec(),
    }
}

#[test]
fn kernel_a_witness_refuses_forks_and_malformed_or_oversized_batches() {
    if !kernel_available("kernel_a_witness_refuses_forks_and_malformed_or_oversized_batches") {
        return;
    }
    let _serial = timing_shared();
    let rt = runtime();
    let witness = Region::new("us-west-2");
    let config = witness.config(&[]);
    let agent = Agent::start(&config);
    let addr = witness.grpc;
    rt.block_on(async {
        let mut c = RegionSyncClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("key");
        let public = {
            use p256::pkcs8::EncodePublicKey;
            key.verifying_key()
                .to_public_key_der()
                .expect("der")
                .as_bytes()
                .to_vec()
        };
        let keys = vec![pb::KeyRecord {
            key_id: "k".into(),
            key_version: 1,
            public_key_der: public,
            ..Default::default()
        }];
        let state = |c: &mut RegionSyncClient<tonic::transport::Channel>| {
            let mut c = c.clone();
            async move {
                c.get_sync_state(pb::GetSyncStateRequest {
                    origin_region: "forker".into(),
                })
                .await
                .expect("state")
                .into_inner()
                .stored_size
            }
        };
        // Malformed: a receipt that does not decode. Nothing is stored.
        let mut bad = foreign_receipt(0);
        bad.encoding.truncate(10);
        let e = c
            .push_batch(pb::PushBatchRequest {
                origin_region: "forker".into(),
                entries: vec![bad],
                keys: keys.clone(),
                ..Default::default()
            })
            .await
            .expect_err("malformed");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert_eq!(state(&mut c).await, 0);
        // Oversized: more receipts than a batch may carry.
        let many: Vec<pb::Entry> = (0..10_001)
            .map(|i| pb::Entry {
                seq: i,
                ..Default::default()
            })
            .collect();
        let e = c
            .push_batch(pb::PushBatchRequest {
                origin_region: "forker".into(),
                entries: many,
                keys: keys.clone(),
                ..Default::default()
            })
            .await
            .expect_err("oversized");
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
        assert_eq!(state(&mut c).await, 0);
        // A valid batch with a checkpoint is stored and cosigned; re-sending it is harmless.
        let entries: Vec<pb::Entry> = (0..8).map(foreign_receipt).collect();
        let root = {
            let tree: ct_merkle::mem_backed_tree::MemoryBackedTree<sha2::Sha256, Vec<u8>> = {
                let mut t = ct_merkle::mem_backed_tree::MemoryBackedTree::new();
                for e in &entries {
                    t.push(e.encoding.clone());
                }
                t
            };
            let mut r = [0u8; 32];
            r.copy_from_slice(tree.root().as_bytes());
            r
        };
        let body = CheckpointBody {
            node: "n".into(),
            region: "forker".into(),
            size: 8,
            root,
            cycle: 8,
            time_ns: 1,
            key: KeyRef {
                id: "k".into(),
                version: 1,
            },
        };
        for _ in 0..2 {
            let r = c
                .push_batch(pb::PushBatchRequest {
                    origin_region: "forker".into(),
                    entries: entries.clone(),
                    keys: keys.clone(),
                    checkpoint: Some(signed(&key, &body)),
                    ..Default::default()
                })
                .await
                .expect("valid batch")
                .into_inner();
            assert_eq!(r.stored_size, 8);
            assert!(r.cosignature.is_some(), "the witness cosigns");
        }
        // A fork: another checkpoint of the same size with a different root, validly signed.
        let forked = CheckpointBody {
            root: [9; 32],
            ..body.clone()
        };
        let e = c
            .push_batch(pb::PushBatchRequest {
                origin_region: "forker".into(),
                keys: keys.clone(),
                checkpoint: Some(signed(&key, &forked)),
                ..Default::default()
            })
            .await
            .expect_err("fork");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("fork"), "{e:?}");
        assert_eq!(state(&mut c).await, 8, "nothing of the fork stored");
    });
    assert_eq!(metric(&agent, "knhk_sync_forks_detected_total"), 1.0);
    assert!(metric(&agent, "knhk_sync_batches_rejected_total") >= 2.0);
}

/// Random packet loss towards a loopback port (an iptables `statistic` match), removed on drop.
struct Loss {
    rule: Vec<String>,
}

impl Loss {
    fn on_port(port: u16, probability: f64) -> Loss {
        let rule: Vec<String> = [
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            &probability.to_string(),
            "-m",
            "comment",
            "--comment",
            &format!("knhk-test-{}", std::process::id()),
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = Command::new("iptables")
            .arg("-I")
            .args(&rule)
            .output()
            .expect("run iptables");
        assert!(
            out.status.success(),
            "iptables: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loss { rule }
    }
}

impl Drop for Loss {
    fn drop(&mut self) {
        let out = Command::new("iptables").arg("-D").args(&self.rule).output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!(
                "cleanup: iptables -D {} failed: {out:?}",
                self.rule.join(" ")
            );
        }
    }
}

#[test]
fn kernel_sync_converges_through_packet_loss() {
    if !kernel_available("kernel_sync_converges_through_packet_loss") {
        return;
    }
    let _serial = timing_shared();
    let rt = runtime();
    let regions = [Region::new("ap-south-1"), Region::new("sa-east-1")];
    // Each region reaches the other through a proxy whose port drops 20 % of packets.
    let proxies = [
        DelayProxy::start(&rt, regions[1].grpc, Duration::from_millis(1)),
        DelayProxy::start(&rt, regions[0].grpc, Duration::from_millis(1)),
    ];
    let _loss = [
        Loss::on_port(proxies[0].addr.port(), 0.2),
        Loss::on_port(proxies[1].addr.port(), 0.2),
    ];
    let agents = [
        Agent::start(&regions[0].config(&[proxies[0].addr])),
        Agent::start(&regions[1].config(&[proxies[1].addr])),
    ];
    let started = Instant::now();
    for (r, a) in regions.iter().zip(&agents) {
        wait_until(
            &format!("{} commits with quorum through the loss", r.name),
            Duration::from_secs(60),
            || committed(a) > 0.0,
        );
    }
    // Everything written so far arrives, despite the loss.
    let written = metric(&agents[0], "knhk_receipts_log_size");
    wait_until(
        "sa-east-1 holds every receipt of ap-south-1",
        Duration::from_secs(60),
        || {
            metric(
                &agents[0],
                &format!(
                    "knhk_sync_peer_acked_receipts{{peer=\"http://{}\"}}",
                    proxies[0].addr
                ),
            ) >= written
        },
    );
    let failures = metric(&agents[0], "knhk_sync_peer_failures_total");
    eprintln!(
        "20% loss each way: quorum and {written} receipts replicated within {:?} ({failures} failed pushes retried)",
        started.elapsed()
    );
}
