//! Witnessing: every node's ledger is its own log; `knhk-agent witness` (one per region)
//! verifies and cosigns checkpoints per C2SP `tlog-witness`, in C2SP signed-note formats.
//!
//! `witness_*` tests need no kernel: a witness in-process, driven over HTTP, and its notes
//! checked with a second implementation of the C2SP formats (Cloudflare azul's `signed_note`
//! and `tlog_tiles`). `kernel_*` tests run real node agents (root, cgroup v2, BPF) and real
//! witness processes on loopback, links through delaying TCP proxies that can be cut.

mod support;

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use knhk_agent::note::{self, SignatureLine, VerifierKey};
use knhk_agent::{
    receipts::{CheckpointBody, KeyRecord, KeyRef, Ledger, NewReceipt, ReceiptKind},
    witness::{self, protocol::AddCheckpoint, FileKey, Transport, Witness},
};
use p256::ecdsa::{signature::Signer as _, DerSignature, SigningKey};
use p256::pkcs8::EncodePublicKey as _;
use sha2::{Digest as _, Sha256};
use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};
use support::{proxy::DelayProxy, witness::*, *};

// ---------------------------------------------------------------------------------------------
// A second implementation of the C2SP verifiers, written from the specs for this test: the
// note framing is `signed_note`'s, the key IDs and messages are computed here.

/// ECDSA P-256 (signature type 0x02, as transparency-dev/witness): key ID = SHA-256(SPKI)[0..4].
struct EcdsaVerifier {
    name: String,
    spki: Vec<u8>,
}

impl signed_note::Verifier for EcdsaVerifier {
    fn name(&self) -> &str {
        &self.name
    }
    fn key_id(&self) -> u32 {
        let h = Sha256::digest(&self.spki);
        u32::from_be_bytes([h[0], h[1], h[2], h[3]])
    }
    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier as _;
        use p256::pkcs8::DecodePublicKey as _;
        let Ok(key) = p256::ecdsa::VerifyingKey::from_public_key_der(&self.spki) else {
            return false;
        };
        p256::ecdsa::DerSignature::from_bytes(sig).is_ok_and(|s| key.verify(msg, &s).is_ok())
    }
}

/// tlog-cosignature v1 (type 0x04): key ID = SHA-256(name ‖ "\n" ‖ 0x04 ‖ key)[0..4]; the
/// signature is 8 bytes of big-endian timestamp and an Ed25519 signature of
/// "cosignature/v1\ntime <t>\n" ‖ the note text.
struct CosignatureVerifier {
    name: String,
    key: [u8; 32],
}

impl signed_note::Verifier for CosignatureVerifier {
    fn name(&self) -> &str {
        &self.name
    }
    fn key_id(&self) -> u32 {
        let mut h = Sha256::new();
        h.update(self.name.as_bytes());
        h.update(b"\n");
        h.update([0x04]);
        h.update(self.key);
        let h = h.finalize();
        u32::from_be_bytes([h[0], h[1], h[2], h[3]])
    }
    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        if sig.len() != 72 {
            return false;
        }
        let t = u64::from_be_bytes(sig[..8].try_into().expect("8 bytes"));
        let mut signed = format!("cosignature/v1\ntime {t}\n").into_bytes();
        signed.extend_from_slice(msg);
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&self.key) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(sig[8..].try_into().expect("64 bytes"));
        key.verify_strict(&signed, &sig).is_ok()
    }
}

/// Verifies `note` with the second implementation: the origin's ECDSA key and each witness key
/// must have a verified signature on it, and `tlog_tiles` must read the same checkpoint.
fn second_implementation_verifies(
    note: &str,
    origin: &str,
    spki: &[u8],
    witnesses: &[VerifierKey],
) {
    let mut list: Vec<Box<dyn signed_note::Verifier>> = vec![Box::new(EcdsaVerifier {
        name: origin.into(),
        spki: spki.to_vec(),
    })];
    for w in witnesses {
        list.push(Box::new(CosignatureVerifier {
            name: w.name.clone(),
            key: w.ed25519().expect("an Ed25519 witness key"),
        }));
    }
    let parsed =
        signed_note::Note::from_bytes(note.as_bytes()).expect("signed_note parses the note");
    let (verified, unverified) = parsed
        .verify(&signed_note::VerifierList::new(list))
        .expect("signed_note verifies the note");
    assert_eq!(
        verified.len(),
        1 + witnesses.len(),
        "every key signed: {note}"
    );
    assert!(unverified.is_empty(), "{note}");
    let checkpoint =
        tlog_tiles::Checkpoint::from_bytes(parsed.text()).expect("tlog_tiles reads it");
    assert_eq!(checkpoint.origin(), origin);
}

// ---------------------------------------------------------------------------------------------
// An origin's log, written with the ledger's own code and signed with a P-256 key of the test.

struct Log {
    ledger: Ledger,
    key: SigningKey,
    record: KeyRecord,
    _dir: tempfile::TempDir,
}

impl Log {
    fn new(node: &str) -> Log {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(&dir.path().join("log.redb"), node, "us-east-1").expect("ledger");
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("random");
        let key = SigningKey::from_slice(&seed).expect("a P-256 key");
        let spki = key
            .verifying_key()
            .to_public_key_der()
            .expect("spki")
            .into_vec();
        Log {
            ledger,
            key,
            record: KeyRecord {
                key: KeyRef {
                    id: format!("test-{node}"),
                    version: 1,
                },
                public_key: B64.encode(&spki),
                since_ns: 0,
                transition: None,
            },
            _dir: dir,
        }
    }

    fn spki(&self) -> Vec<u8> {
        B64.decode(&self.record.public_key).expect("b64")
    }

    fn grow_to(&self, size: u64) {
        let n = size - self.ledger.size().expect("size");
        let batch: Vec<NewReceipt> = (0..n)
            .map(|i| NewReceipt {
                kind: ReceiptKind::PolicySwitch,
                cycle: i,
                policy_generation: 1,
                payload: format!("{{\"i\":{i},\"log\":\"{}\"}}", self.record.key.id).into_bytes(),
            })
            .collect();
        self.ledger
            .append(&batch, &self.record.key)
            .expect("append");
    }

    /// The signed note of a checkpoint at `size` with `root` under `origin`.
    fn note_with(&self, origin: &str, size: u64, root: [u8; 32]) -> (String, String) {
        let body = CheckpointBody {
            origin: origin.into(),
            size,
            root,
            cycle: size,
            time_ns: 1,
            key: self.record.key.clone(),
        }
        .encode();
        let sig: DerSignature = self.key.sign(body.as_bytes());
        let line = note::log_signature_line(origin, &self.spki(), sig.as_bytes());
        (body.clone(), note::render(&body, &[line]))
    }

    /// The signed note of this log's checkpoint at `size`.
    fn note(&self, size: u64) -> (String, String) {
        let root = self.ledger.root(size).expect("root");
        self.note_with(self.ledger.origin(), size, root)
    }

    fn register_body(&self, origin: &str) -> String {
        serde_json::to_string(&witness::protocol::LogKeys {
            origin: origin.into(),
            keys: vec![self.record.clone()],
        })
        .expect("json")
    }
}

fn add(addr: SocketAddr, old: u64, proof: Vec<[u8; 32]>, note: &str) -> (u16, String) {
    let body = AddCheckpoint {
        old,
        proof,
        note: note.into(),
    }
    .encode();
    request(addr, "POST", "/add-checkpoint", &body)
}

/// An in-process witness serving plaintext HTTP on loopback.
fn serve_witness(
    rt: &tokio::runtime::Runtime,
    state: &Path,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let registry = prometheus::Registry::new();
    let key = Arc::new(FileKey::open(&state.with_extension("key")).expect("key"));
    let w = Arc::new(Witness::open("witness.test", key, state, &registry).expect("witness"));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(witness::serve(
        w,
        registry,
        listener,
        Transport::Plain,
        async move {
            let _ = rx.await;
        },
    ));
    (addr, tx)
}

#[test]
fn witness_cosigns_extensions_and_refuses_forks_claims_and_malformed_requests() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("witness.redb");
    let (addr, stop) = serve_witness(&rt, &state);
    let (status, vkey) = request(addr, "GET", "/knhk/v1/witness-key", "");
    assert_eq!(status, 200);
    let wkey = VerifierKey::parse(vkey.trim()).expect("the witness key is a C2SP verifier key");

    let log = Log::new("node-a");
    let origin = log.ledger.origin().to_owned();
    log.grow_to(5);
    let (body5, note5) = log.note(5);

    // Unknown origin: 404, until it registers its keys.
    let (status, text) = add(addr, 0, vec![], &note5);
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("register its keys"), "{text}");
    let (status, text) = request(
        addr,
        "POST",
        "/knhk/v1/log-keys",
        &log.register_body(&origin),
    );
    assert_eq!((status, text.trim()), (200, "1"));

    // The first checkpoint: cosigned; the cosignature verifies with the agent's code and with
    // the second implementation.
    let (status, line) = add(addr, 0, vec![], &note5);
    assert_eq!(status, 200, "{line}");
    let sig = SignatureLine::parse(line.trim_end()).expect("a signature line");
    let cosig = note::Cosignature::from_line(&sig).expect("a cosignature/v1");
    assert!(cosig.verify(&body5, &wkey));
    second_implementation_verifies(
        &format!("{note5}{line}"),
        &origin,
        &log.spki(),
        std::slice::from_ref(&wkey),
    );

    // A stale `old`: 409 with the witness's size, in the tlog-witness content type.
    let raw = request_raw(
        addr,
        "POST",
        "/add-checkpoint",
        &AddCheckpoint {
            old: 0,
            proof: vec![],
            note: note5.clone(),
        }
        .encode(),
    );
    assert!(
        raw.starts_with("HTTP/1.0 409") || raw.starts_with("HTTP/1.1 409"),
        "{raw}"
    );
    assert!(
        raw.to_ascii_lowercase()
            .contains("content-type: text/x.tlog.size"),
        "{raw}"
    );
    assert!(raw.ends_with("\r\n\r\n5\n"), "{raw}");

    // An extension with its consistency proof: cosigned.
    log.grow_to(9);
    let (_, note9) = log.note(9);
    let proof = log.ledger.consistency_proof(5, 9).expect("proof");
    let (status, text) = add(addr, 5, proof.clone(), &note9);
    assert_eq!(status, 200, "{text}");

    // A fork: the same origin and key, size 9, another root (another log's). Refused, counted,
    // kept as evidence; the witness still holds the first history.
    let other = Log::new("node-b");
    other.grow_to(12);
    let (_, fork9) = log.note_with(&origin, 9, other.ledger.root(9).expect("root"));
    let (status, text) = add(addr, 9, vec![], &fork9);
    assert_eq!(status, 422, "{text}");
    assert!(text.starts_with("fork:"), "{text}");
    // Not consistent with what was cosigned (a proof from the other log): also a fork.
    let (_, fork12) = log.note_with(&origin, 12, other.ledger.root(12).expect("root"));
    let (status, _) = add(
        addr,
        9,
        other.ledger.consistency_proof(9, 12).expect("p"),
        &fork12,
    );
    assert_eq!(status, 422);
    let (_, origins) = request(addr, "GET", "/knhk/v1/origins", "");
    let origins: serde_json::Value = serde_json::from_str(&origins).expect("json");
    assert_eq!(origins[0]["size"], 9, "{origins}");
    assert_eq!(origins[0]["forks"], 2, "{origins}");
    let (_, metrics) = request(addr, "GET", "/metrics", "");
    assert!(
        metrics.contains("knhk_witness_forks_detected_total 2"),
        "{metrics}"
    );

    // A bad signature: 403. Another key chain for the origin (a second node claiming it): 409,
    // naming it.
    let tampered = note9.replacen("knhk-cycle 9", "knhk-cycle 8", 1);
    let (status, text) = add(addr, 9, vec![], &tampered);
    assert_eq!(status, 403, "{text}");
    let (status, text) = request(
        addr,
        "POST",
        "/knhk/v1/log-keys",
        &other.register_body(&origin),
    );
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("two nodes claim this origin"), "{text}");

    // Malformed and oversized requests: 400 and 413, nothing changes.
    for bad in [
        "",
        "old x\n\nnote",
        "old 9\nnot-base64\n\nnote",
        "old 9\n\nnot a note",
    ] {
        let (status, text) = request(addr, "POST", "/add-checkpoint", bad);
        assert_eq!(status, 400, "{bad:?}: {text}");
    }
    let (status, _) = request(addr, "POST", "/add-checkpoint", &"x".repeat(70 * 1024));
    assert_eq!(status, 413);
    let (status, text) = request(addr, "POST", "/knhk/v1/log-keys", "{\"origin\": 1}");
    assert_eq!(status, 400, "{text}");

    // The state is durable: a restarted witness holds size 9 and cosigns the same checkpoint
    // again (idempotent), and still refuses the fork.
    let _ = stop.send(());
    drop(rt);
    let rt = runtime();
    let (addr, _stop) = serve_witness(&rt, &state);
    let (status, text) = add(addr, 9, vec![], &note9);
    assert_eq!(status, 200, "{text}");
    let (status, _) = add(addr, 9, vec![], &fork9);
    assert_eq!(status, 422);
}

// ---------------------------------------------------------------------------------------------
// Real nodes and witnesses.

struct Node {
    name: String,
    region: &'static str,
    grpc: SocketAddr,
    dir: tempfile::TempDir,
    cg: TestCgroup,
    pins: TestPins,
}

impl Node {
    fn new(region: &'static str, i: usize) -> Node {
        let name = format!("node-{region}-{i}");
        Node {
            grpc: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            dir: tempfile::tempdir().expect("tempdir"),
            cg: TestCgroup::new(&name),
            pins: TestPins::new(&name),
            name,
            region,
        }
    }

    fn db(&self) -> std::path::PathBuf {
        self.dir.path().join("receipts.redb")
    }

    fn config(
        &self,
        witnesses: &[SocketAddr],
        keys: &[String],
        quorum: usize,
    ) -> std::path::PathBuf {
        let path = self.dir.path().join("agent.toml");
        let endpoints: Vec<String> = witnesses
            .iter()
            .map(|p| format!("\"http://{p}\""))
            .collect();
        let keys: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
        let text = format!(
            "[agent]\ncgroup_root = \"{}\"\npin_root = \"{}\"\nmetrics_address = \"127.0.0.1:0\"\nlisten_address = \"{}\"\n\
             [slo]\nbeat_interval_ms = 100\n\
             [kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n\
             [receipts]\npath = \"{}\"\nnode = \"{}\"\n\
             [multi_region]\nregion = \"{}\"\ncross_region_sync_enabled = true\nreceipt_sync_endpoints = [{}]\n\
             witness_keys = [{}]\nquorum = {quorum}\nbatch_linger_ms = 10\ntimeout_ms = 1000\n",
            self.cg.path.display(),
            self.pins.root.display(),
            self.grpc,
            self.dir.path().join("keys").display(),
            self.db().display(),
            self.name,
            self.region,
            endpoints.join(", "),
            keys.join(", ")
        );
        std::fs::write(&path, text).expect("config");
        path
    }
}

fn metric(agent: &Agent, line_prefix: &str) -> f64 {
    agent
        .get("/metrics")
        .lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

fn committed(agent: &Agent) -> f64 {
    metric(agent, "knhk_sync_quorum_committed_size")
}

fn verify_offline(db: &Path) -> String {
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
fn kernel_twelve_nodes_in_three_regions_reach_quorum_through_witness_loss_and_partition() {
    if !kernel_available(
        "kernel_twelve_nodes_in_three_regions_reach_quorum_through_witness_loss_and_partition",
    ) {
        return;
    }
    let _serial = timing_shared();
    let rt = runtime();
    let regions = ["us-east-1", "us-west-2", "eu-west-1"];
    let wdir = tempfile::tempdir().expect("tempdir");
    let mut witnesses: Vec<WitnessProcess> = regions
        .iter()
        .map(|r| {
            let dir = wdir.path().join(r);
            WitnessProcess::start(&format!("witness.{r}.knhk.test"), dir)
        })
        .collect();
    let keys: Vec<String> = witnesses.iter().map(WitnessProcess::verifier_key).collect();
    // Every link to a witness through a proxy: 20 ms each way (40 ms RTT), and cuttable.
    let proxies: Vec<DelayProxy> = witnesses
        .iter()
        .map(|w| DelayProxy::start(&rt, w.addr, Duration::from_millis(20)))
        .collect();
    let links: Vec<SocketAddr> = proxies.iter().map(|p| p.addr).collect();
    let nodes: Vec<Node> = regions
        .iter()
        .flat_map(|r| (0..4).map(move |i| Node::new(r, i)))
        .collect();
    let started = Instant::now();
    let mut agents: Vec<Agent> = nodes
        .iter()
        .map(|n| Agent::start(&n.config(&links, &keys, 2)))
        .collect();

    // Steady state: every node's checkpoints reach quorum 2 of 3 witnesses.
    wait_until(
        "all 12 nodes commit with quorum 2",
        Duration::from_secs(60),
        || agents.iter().all(|a| committed(a) > 0.0),
    );
    eprintln!("12 nodes quorum-committed after {:?}", started.elapsed());
    for w in &witnesses {
        let origins = w.origins();
        assert_eq!(
            origins.len(),
            12,
            "{} follows every node: {origins:?}",
            w.name
        );
    }

    // One witness killed: quorum 2 of the remaining 2 holds.
    witnesses[2].kill9();
    let before: Vec<f64> = agents.iter().map(committed).collect();
    // Connects on every node: their cycles are receipted (an idle cycle is not), so every
    // node has a new checkpoint to commit.
    let sink = tcp_sink("127.0.0.1:0");
    for n in &nodes {
        tcp_connect_loop_from(&n.cg.path, sink, 3);
    }
    wait_until(
        "every node commits without the third witness",
        Duration::from_secs(30),
        || agents.iter().zip(&before).all(|(a, b)| committed(a) > *b),
    );

    // A second region's witness partitioned: no quorum, and readiness says so, naming it.
    proxies[1].set_down(true);
    let a = &agents[0];
    wait_until(
        "readiness reports the lost quorum",
        Duration::from_secs(30),
        || {
            // A busy node: its new checkpoints are the ones that cannot reach quorum.
            tcp_connect_loop_from(&nodes[0].cg.path, sink, 1);
            let r = a.get("/readyz");
            !r.contains("200 OK") && r.contains("cannot reach quorum")
        },
    );
    let readyz = a.get("/readyz");
    assert!(readyz.contains(&format!("http://{}", links[1])), "{readyz}");
    let open = a.get("/metrics").lines().any(|l| {
        l.contains("knhk_sync_peer_circuit") && l.contains("state=\"open\"") && l.ends_with(" 1")
    });
    assert!(open, "the circuit to a cut-off witness opens");

    // Heal, and restart the killed witness on its state: every node converges by itself.
    proxies[1].set_down(false);
    witnesses[2].restart();
    wait_until("every node is ready again", Duration::from_secs(60), || {
        agents.iter().all(|a| a.get("/readyz").contains("200 OK"))
    });
    let size_now: Vec<f64> = agents
        .iter()
        .map(|a| metric(a, "knhk_receipts_log_size"))
        .collect();
    wait_until(
        "the restarted witness cosigns again",
        Duration::from_secs(60),
        || {
            agents.iter().all(|a| {
                metric(
                    a,
                    &format!(
                        "knhk_sync_witness_cosigned_size{{peer=\"http://{}\"}}",
                        links[2]
                    ),
                ) > 0.0
            })
        },
    );

    // SIGTERM pushes the final checkpoint: after the stop, the newest checkpoint of each node
    // is quorum-committed in its ledger.
    for a in agents.drain(..) {
        let (status, _) = a.sigterm();
        assert!(status.success(), "{status}");
    }
    for (n, written) in nodes.iter().zip(&size_now) {
        let ledger = Ledger::open(&n.db(), &n.name, n.region).expect("ledger");
        let checkpoints = ledger.checkpoints().expect("checkpoints");
        let (number, newest) = checkpoints.last().expect("checkpoints").clone();
        let body = CheckpointBody::decode(&newest.body).expect("body");
        assert!(
            body.size as f64 >= *written,
            "{}: {} < {written}",
            n.name,
            body.size
        );
        let cosignatures = ledger.cosignatures_of(number).expect("cosignatures");
        assert!(
            cosignatures.len() >= 2,
            "{}: the final checkpoint (size {}) has {} cosignatures",
            n.name,
            body.size,
            cosignatures.len()
        );
        // The note, as the API serves it, verifies with the second implementation.
        let spki = ledger
            .keys()
            .expect("keys")
            .into_iter()
            .find(|k| k.key == body.key)
            .map(|k| B64.decode(k.public_key).expect("b64"))
            .expect("the key");
        let mut lines = vec![note::log_signature_line(
            &body.origin,
            &spki,
            &B64.decode(newest.signature.as_deref().expect("signed"))
                .expect("b64"),
        )];
        let mut wkeys = Vec::new();
        for c in &cosignatures {
            lines.push(SignatureLine::parse(c.line.trim_end()).expect("line"));
            wkeys.push(VerifierKey::parse(&c.witness_key).expect("key"));
        }
        second_implementation_verifies(
            &note::render(&newest.body, &lines),
            &body.origin,
            &spki,
            &wkeys,
        );
        drop(ledger);
        // Offline verification names the origin and the witnesses whose cosignatures verified.
        let out = verify_offline(&n.db());
        assert!(out.contains(&format!("  origin {}", body.origin)), "{out}");
        let witnesses = out.lines().filter(|l| l.starts_with("  witness ")).count();
        assert!(witnesses >= 2, "{}: {out}", n.name);
    }
}

#[test]
fn kernel_two_nodes_claiming_one_origin_are_named_at_the_node_and_the_witness() {
    if !kernel_available(
        "kernel_two_nodes_claiming_one_origin_are_named_at_the_node_and_the_witness",
    ) {
        return;
    }
    let _serial = timing_shared();
    let wdir = tempfile::tempdir().expect("tempdir");
    let w = WitnessProcess::start("witness.test", wdir.path().to_owned());
    let keys = [w.verifier_key()];
    let nodes = [Node::new("us-east-1", 0), Node::new("us-east-1", 1)];
    // Misconfiguration: both nodes named node-a, with a copy of one ledger (one origin), each
    // with its own key.
    let first = Ledger::open(&nodes[0].db(), "node-a", "us-east-1").expect("ledger");
    drop(first);
    std::fs::copy(nodes[0].db(), nodes[1].db()).expect("copy the ledger");
    let agents: Vec<Agent> = nodes
        .iter()
        .map(|n| {
            let path = n.config(&[w.addr], &keys, 1);
            let text = std::fs::read_to_string(&path)
                .expect("config")
                .replace(&format!("node = \"{}\"", n.name), "node = \"node-a\"");
            std::fs::write(&path, text).expect("config");
            let a = Agent::start(&path);
            // The first one registers the origin before the second starts.
            wait_until("the node commits", Duration::from_secs(30), || {
                committed(&a) > 0.0 || n.name.ends_with('1')
            });
            a
        })
        .collect();
    wait_until(
        "the second node names the clash",
        Duration::from_secs(30),
        || {
            let r = agents[1].get("/readyz");
            !r.contains("200 OK") && r.contains("two nodes claim this origin")
        },
    );
    assert!(w.metric("knhk_witness_refusals_total{reason=\"origin_claimed\"}") >= 1.0);
    assert!(
        agents[0].get("/readyz").contains("200 OK"),
        "the first node is unaffected"
    );
}

/// Random packet loss on a loopback port, one direction (an iptables `statistic` match on
/// INPUT: `--dport` for packets to the port, `--sport` for packets from it), removed on drop.
struct Loss {
    rule: Vec<String>,
}

impl Loss {
    fn on(direction: &str, port: u16, probability: f64) -> Loss {
        let rule: Vec<String> = [
            "INPUT",
            "-p",
            "tcp",
            direction,
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

    /// Loss both ways on `port`: packets to it and packets from it.
    fn both_ways(port: u16, probability: f64) -> [Loss; 2] {
        [
            Loss::on("--dport", port, probability),
            Loss::on("--sport", port, probability),
        ]
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
fn kernel_witnessing_converges_through_packet_loss_on_every_leg() {
    if !kernel_available("kernel_witnessing_converges_through_packet_loss_on_every_leg") {
        return;
    }
    let _serial = timing_shared();
    let rt = runtime();
    let wdir = tempfile::tempdir().expect("tempdir");
    let witnesses: Vec<WitnessProcess> = ["a", "b"]
        .iter()
        .map(|n| WitnessProcess::start(&format!("witness-{n}"), wdir.path().join(n)))
        .collect();
    let keys: Vec<String> = witnesses.iter().map(WitnessProcess::verifier_key).collect();
    let proxies: Vec<DelayProxy> = witnesses
        .iter()
        .map(|w| DelayProxy::start(&rt, w.addr, Duration::from_millis(1)))
        .collect();
    // 20 % loss on every leg, each way: node ⇄ proxy and proxy ⇄ witness.
    let _loss: Vec<[Loss; 2]> = proxies
        .iter()
        .map(|p| p.addr.port())
        .chain(witnesses.iter().map(|w| w.addr.port()))
        .map(|port| Loss::both_ways(port, 0.2))
        .collect();
    let node = Node::new("ap-south-1", 0);
    let links: Vec<SocketAddr> = proxies.iter().map(|p| p.addr).collect();
    let agent = Agent::start(&node.config(&links, &keys, 2));
    let started = Instant::now();
    wait_until(
        "the node commits with quorum 2 through the loss",
        Duration::from_secs(90),
        || committed(&agent) > 0.0,
    );
    // Everything written so far is committed, despite the loss.
    let written = metric(&agent, "knhk_receipts_log_size");
    wait_until(
        "every receipt written so far is quorum-committed",
        Duration::from_secs(90),
        || committed(&agent) >= written,
    );
    let failures = metric(&agent, "knhk_sync_peer_failures_total");
    eprintln!(
        "20% loss on every leg each way: {written} receipts quorum-committed within {:?} ({failures} failed pushes retried)",
        started.elapsed()
    );
}
