//! The receipts archive against a real S3 API with Object Lock (moto's server, from the
//! project's `.venv`): locked segments cannot be deleted or overwritten; holds set and clear S3
//! legal holds; an outage keeps a bounded backlog in the ledger, fails readiness and drains;
//! `receipts verify --s3` rebuilds and verifies an archive and names tampering. The last test
//! runs the agent as a real process (kill -9 mid-upload; needs root and a kernel).
#![cfg(feature = "s3")]

mod support;

use aws_sdk_s3::types::ObjectLockLegalHoldStatus;
use knhk_agent::{
    archive::Archive,
    config::{ArchiveSettings, ReceiptSettings, SignerSettings},
    objectstore::LockMode,
    receipts::{Hold, NewReceipt, ReceiptKind, Receipts},
    tasks::TaskGroup,
};
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};
use support::{kms, s3};

/// A bucket with Object Lock enabled (so versioned).
async fn lock_bucket(url: &str, bucket: &str) -> aws_sdk_s3::Client {
    let c = s3::client(url).await;
    c.create_bucket()
        .bucket(bucket)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .expect("CreateBucket with Object Lock");
    c
}

/// Every object version under `prefix`: (key, version id).
async fn versions(c: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Vec<(String, String)> {
    let out = c
        .list_object_versions()
        .bucket(bucket)
        .prefix(prefix)
        .max_keys(10_000)
        .send()
        .await
        .expect("ListObjectVersions");
    let mut v: Vec<(String, String)> = out
        .versions()
        .iter()
        .map(|v| {
            (
                v.key().unwrap_or_default().to_owned(),
                v.version_id().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The (first, end) of every segment named under `prefix`, in order.
fn segment_ranges(keys: &[(String, String)], prefix: &str) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = keys
        .iter()
        .filter_map(|(k, _)| {
            knhk_agent::archive::layout::parse_name(k.strip_prefix(&format!("{prefix}/"))?)
        })
        .filter(|n| n.kind == knhk_agent::archive::layout::ObjectKind::Segment)
        .map(|n| (n.first, n.end))
        .collect();
    r.sort();
    r
}

async fn legal_hold(c: &aws_sdk_s3::Client, bucket: &str, key: &str) -> bool {
    // An object that never had a legal hold answers an error: off.
    c.get_object_legal_hold()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .ok()
        .and_then(|o| o.legal_hold().and_then(|h| h.status().cloned()))
        == Some(ObjectLockLegalHoldStatus::On)
}

async fn delete_version(
    c: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    version: &str,
    bypass: bool,
) -> Result<(), String> {
    c.delete_object()
        .bucket(bucket)
        .key(key)
        .version_id(version)
        .bypass_governance_retention(bypass)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| aws_sdk_s3::error::DisplayErrorContext(&e).to_string())
}

/// A ledger with a file key, written through the receipts service.
struct Node {
    r: Arc<Receipts>,
    _tasks: TaskGroup,
    cycle: u64,
}

impl Node {
    async fn start(dir: &Path) -> Node {
        let settings = ReceiptSettings {
            path: dir.join("receipts.redb"),
            node: "node-a".into(),
            region: "eu-west-1".into(),
            rotation_interval: Duration::from_secs(24 * 3600),
            retention: [("policy_switch".to_string(), Duration::ZERO)].into(),
            max_pending_checkpoints: 1024,
            signer: SignerSettings::File {
                key_dir: dir.join("keys"),
            },
        };
        // As the agent does before compaction can run: only archived payloads may go.
        let ledger = Receipts::open_ledger(&settings).await.expect("ledger");
        knhk_agent::archive::set_compaction_gate(&ledger, true).expect("gate");
        let signer = knhk_agent::receipts::connect_signer(&settings.signer)
            .await
            .expect("signer");
        let (r, tasks) = Receipts::start_on(
            ledger,
            settings,
            signer,
            &prometheus::Registry::new(),
            None,
            None,
        )
        .await
        .expect("receipts");
        Node {
            r,
            _tasks: tasks,
            cycle: 0,
        }
    }

    /// Appends `n` receipts, then a checkpoint, and waits until it is signed.
    async fn add(&mut self, n: u64) {
        let mut handles = Vec::new();
        for i in 0..n {
            let r = self.r.clone();
            handles.push(tokio::spawn(async move {
                r.append(NewReceipt {
                    kind: ReceiptKind::PolicySwitch,
                    cycle: i,
                    policy_generation: i,
                    payload: format!("{{\"generation\":{i}}}").into_bytes(),
                })
                .await
                .expect("append")
            }));
        }
        for h in handles {
            h.await.expect("append task");
        }
        self.checkpoint().await;
    }

    async fn checkpoint(&mut self) {
        self.cycle += 1;
        self.r.pulse(self.cycle).await;
        let start = Instant::now();
        while !self
            .r
            .ledger()
            .unsigned_checkpoints()
            .expect("read")
            .is_empty()
        {
            assert!(start.elapsed() < Duration::from_secs(10), "not signed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn settings(endpoint: &str, url: &str, mode: LockMode) -> ArchiveSettings {
    let (bucket, prefix) = knhk_agent::config::settings::parse_archive_url(url).expect("url");
    ArchiveSettings {
        url: url.into(),
        bucket,
        prefix,
        endpoint_url: Some(endpoint.into()),
        region: "us-east-1".into(),
        force_path_style: true,
        lock_mode: mode,
        retention_days: 1,
        segment_max_receipts: 20,
        upload_interval: Duration::from_millis(100),
        max_backlog_receipts: 50,
        timeout: Duration::from_millis(500),
    }
}

/// `knhk-agent receipts verify --s3 URL ARGS…` against moto: (exit code, stdout).
fn verify_s3(endpoint: &str, url: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(support::BIN)
        .args([
            "receipts",
            "verify",
            "--s3",
            url,
            "--s3-endpoint-url",
            endpoint,
        ])
        .args(args)
        .output()
        .expect("run receipts verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn locked_segments_cannot_be_deleted_or_overwritten_and_a_restart_writes_none_twice() {
    let moto = kms::moto();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = "s3://archive-locked/eu/node-a";
    support::runtime().block_on(async {
        let c = lock_bucket(&moto.url, "archive-locked").await;
        let mut node = Node::start(dir.path()).await;
        for _ in 0..5 {
            node.add(37).await;
        }
        let size = node.r.ledger().size().expect("size");
        let archive = Archive::new(
            settings(&moto.url, url, LockMode::Compliance),
            node.r.ledger().clone(),
            &prometheus::Registry::new(),
        )
        .await
        .expect("archive");
        let first = archive.round().await.expect("round");
        assert_eq!(first.receipts, size, "every signed receipt archived");
        assert_eq!(archive.acked_size(), size);
        let before = versions(&c, "archive-locked", "eu/node-a/").await;
        let ranges = segment_ranges(&before, "eu/node-a");
        // Segments cut at multiples of 20, the last at the signed checkpoint's size.
        let expected: Vec<(u64, u64)> = (0..size)
            .step_by(20)
            .map(|a| (a, (a + 20).min(size)))
            .collect();
        assert_eq!(ranges, expected);

        // A restart that lost its progress (killed between the PUT and the ledger write)
        // derives the same names and writes nothing twice: object versions = objects.
        for m in [
            "archive_acked_size",
            "archive_next_checkpoint",
            "archive_acked_keys",
        ] {
            node.r.ledger().put_meta(m, b"0").expect("reset");
        }
        let again = archive.round().await.expect("round again");
        assert_eq!(
            (again.written, again.existed),
            (0, before.len() as u64),
            "{again:?}"
        );
        let after = versions(&c, "archive-locked", "eu/node-a/").await;
        assert_eq!(after, before, "one version per object");
        let mut keys: Vec<&String> = after.iter().map(|(k, _)| k).collect();
        keys.dedup();
        assert_eq!(keys.len(), after.len(), "no key has two versions");

        // Locked: no delete of the version, no conditional overwrite; a plain PUT only adds a
        // version on top, and the locked one keeps its bytes and stays undeletable.
        let (key, version) = after
            .iter()
            .find(|(k, _)| k.contains("/segments/"))
            .cloned()
            .expect("a segment");
        let e = delete_version(&c, "archive-locked", &key, &version, true)
            .await
            .expect_err("a locked version cannot be deleted");
        assert!(e.contains("AccessDenied"), "{e}");
        let original = c
            .get_object()
            .bucket("archive-locked")
            .key(&key)
            .version_id(&version)
            .send()
            .await
            .expect("get")
            .body
            .collect()
            .await
            .expect("body")
            .into_bytes();
        let e = c
            .put_object()
            .bucket("archive-locked")
            .key(&key)
            .if_none_match("*")
            .body(b"forged".to_vec().into())
            .send()
            .await
            .expect_err("no conditional overwrite");
        assert!(
            aws_sdk_s3::error::DisplayErrorContext(&e)
                .to_string()
                .contains("PreconditionFailed"),
            "{e:?}"
        );
        c.put_object()
            .bucket("archive-locked")
            .key(&key)
            .body(b"forged".to_vec().into())
            .send()
            .await
            .expect("a plain PUT adds a version");
        let kept = c
            .get_object()
            .bucket("archive-locked")
            .key(&key)
            .version_id(&version)
            .send()
            .await
            .expect("the locked version is still there")
            .body
            .collect()
            .await
            .expect("body")
            .into_bytes();
        assert_eq!(kept, original, "the locked version keeps its bytes");
        let e = delete_version(&c, "archive-locked", &key, &version, false)
            .await
            .expect_err("still locked");
        assert!(e.contains("AccessDenied"), "{e}");

        // Every object is locked in the configured mode until about a day from now.
        let head = c
            .head_object()
            .bucket("archive-locked")
            .key(&after[0].0)
            .version_id(&after[0].1)
            .send()
            .await
            .expect("HeadObject");
        assert_eq!(
            head.object_lock_mode()
                .map(|m| m.as_str().to_owned())
                .as_deref(),
            Some("COMPLIANCE")
        );
        let until = head.object_lock_retain_until_date().expect("date").secs();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        assert!((until - now - 86_400).abs() < 600, "{until} vs {now}");
    });
}

#[test]
fn a_hold_sets_the_legal_hold_on_its_segments_and_blocks_deletion_past_retention() {
    let moto = kms::moto();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = "s3://archive-holds/node-a";
    support::runtime().block_on(async {
        let c = lock_bucket(&moto.url, "archive-holds").await;
        let mut node = Node::start(dir.path()).await;
        for _ in 0..3 {
            node.add(37).await;
        }
        let hold = |from, to| Hold {
            id: 0,
            case_id: "CASE-7".into(),
            reason: "litigation".into(),
            seq_range: Some((from, to)),
            time_range: None,
            kind: None,
            region: None,
            placed_ns: 0,
            released_ns: None,
        };
        // GOVERNANCE: retention alone yields to a bypass; a legal hold does not.
        let archive = Archive::new(
            settings(&moto.url, url, LockMode::Governance),
            node.r.ledger().clone(),
            &prometheus::Registry::new(),
        )
        .await
        .expect("archive");
        archive.round().await.expect("round");
        // Placed after segment 20..40 was archived: two holds on it; one on receipts not
        // written yet (archived later).
        let h1 = node.r.place_hold(hold(25, 30)).await.expect("hold 1");
        let h2 = node.r.place_hold(hold(30, 33)).await.expect("hold 2");
        let h3 = node.r.place_hold(hold(150, 152)).await.expect("hold 3");
        node.checkpoint().await;
        archive.round().await.expect("round");
        let objects = versions(&c, "archive-holds", "node-a/segments/").await;
        let key_of = |first: u64| {
            objects
                .iter()
                .find(|(k, _)| k.contains(&format!("/{first:020}-")))
                .cloned()
                .expect("segment")
        };
        let (held, held_version) = key_of(20);
        let (free, free_version) = key_of(0);
        assert!(
            legal_hold(&c, "archive-holds", &held).await,
            "{held}: hold on"
        );
        assert!(
            !legal_hold(&c, "archive-holds", &free).await,
            "{free}: no hold"
        );
        let e = delete_version(&c, "archive-holds", &held, &held_version, true)
            .await
            .expect_err("a held segment cannot be deleted, even bypassing retention");
        assert!(e.contains("AccessDenied"), "{e}");
        delete_version(&c, "archive-holds", &free, &free_version, true)
            .await
            .expect("retention alone (GOVERNANCE, bypassed) allows the delete");

        // Receipts 150..152 are archived after their hold: their segment is held at upload.
        node.add(60).await;
        archive.round().await.expect("round");
        let objects = versions(&c, "archive-holds", "node-a/segments/").await;
        let later = objects
            .iter()
            .find(|(k, _)| k.contains(&format!("/{:020}-", 140)))
            .cloned()
            .expect("segment 140..");
        assert!(legal_hold(&c, "archive-holds", &later.0).await, "{later:?}");

        // Releasing one of two holds on a segment keeps it held; releasing both clears it.
        node.r.release_hold(h1, "done").await.expect("release 1");
        node.checkpoint().await;
        archive.round().await.expect("round");
        assert!(
            legal_hold(&c, "archive-holds", &held).await,
            "hold 2 still covers it"
        );
        node.r.release_hold(h2, "done").await.expect("release 2");
        node.r.release_hold(h3, "done").await.expect("release 3");
        node.checkpoint().await;
        archive.round().await.expect("round");
        assert!(!legal_hold(&c, "archive-holds", &held).await, "released");
        assert!(!legal_hold(&c, "archive-holds", &later.0).await, "released");
        delete_version(&c, "archive-holds", &held, &held_version, true)
            .await
            .expect("no hold left: the bypass deletes it");
    });
}

#[test]
fn with_s3_down_the_backlog_stays_in_the_ledger_readiness_says_so_and_it_drains() {
    let moto = kms::moto();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = "s3://archive-outage/node-a";
    support::runtime().block_on(async {
        lock_bucket(&moto.url, "archive-outage").await;
        let mut node = Node::start(dir.path()).await;
        node.add(30).await;
        let registry = prometheus::Registry::new();
        let (archive, tasks) = Archive::start(
            settings(&moto.url, url, LockMode::Compliance),
            node.r.ledger().clone(),
            &registry,
        )
        .await
        .expect("archive");
        let ready = archive.readiness_check();
        let start = Instant::now();
        while archive.acked_size() < 30 {
            assert!(start.elapsed() < Duration::from_secs(10), "first upload");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(ready(), Ok(()));

        moto.pause(); // S3 down: connections hang, calls time out.
        for _ in 0..4 {
            node.add(40).await;
        }
        let size = node.r.ledger().size().expect("size");
        let start = Instant::now();
        let why = loop {
            if let Err(why) = ready() {
                break why;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "readiness never failed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!("readiness: {why}");
        assert!(
            why.contains(
                "the receipts archive s3://archive-outage/node-a is unreachable or failing"
            ) && why.contains(&format!(
                "{} receipts wait to be archived (bound 50)",
                size - 30
            )),
            "{why}"
        );
        // The backlog is the ledger's: compaction keeps every payload not archived (retention
        // 0 for these receipts), and removes the archived ones.
        let removed = node.r.compact().await;
        assert!(removed <= 30, "only archived payloads go: {removed}");
        let (_, payload) = node.r.ledger().receipt(size - 1).expect("receipt");
        assert!(payload.is_some(), "an unarchived payload stays");
        assert_eq!(archive.acked_size(), 30);
        let metrics = || {
            prometheus::TextEncoder::new()
                .encode_to_string(&registry.gather())
                .expect("metrics")
        };
        let start = Instant::now();
        while !metrics().contains(&format!("knhk_archive_backlog_receipts {}", size - 30)) {
            assert!(start.elapsed() < Duration::from_secs(10), "{}", metrics());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(metrics().contains("knhk_archive_failures_total{reason=\"unavailable\"}"));

        moto.resume();
        let start = Instant::now();
        while archive.acked_size() < size || ready().is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "did not drain: acked {} of {size}; {:?}",
                archive.acked_size(),
                ready()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(archive.backlog().expect("backlog"), 0);
        tasks
            .shutdown(tokio::time::Instant::now() + Duration::from_secs(2))
            .await;
    });
    let (code, out) = verify_s3(&moto.url, url, &[]);
    assert_eq!(code, 0, "{out}");
}

/// Copies every object under `prefix` from `from` into the unlocked bucket `to`.
async fn copy_all(c: &aws_sdk_s3::Client, from: &str, to: &str, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for (key, _) in versions(c, from, prefix).await {
        let body = c
            .get_object()
            .bucket(from)
            .key(&key)
            .send()
            .await
            .expect("get")
            .body
            .collect()
            .await
            .expect("body")
            .into_bytes();
        c.put_object()
            .bucket(to)
            .key(&key)
            .body(body.to_vec().into())
            .send()
            .await
            .expect("put");
        keys.push(key);
    }
    keys
}

async fn get(c: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    c.get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("get")
        .body
        .collect()
        .await
        .expect("body")
        .into_bytes()
        .to_vec()
}

#[test]
fn verify_s3_passes_an_untampered_archive_and_names_tampering_and_a_wrong_trusted_key() {
    let moto = kms::moto();
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = support::runtime();
    let c = rt.block_on(async {
        let c = lock_bucket(&moto.url, "archive-src").await;
        s3::create_bucket(&moto.url, "archive-copy").await;
        let mut node = Node::start(dir.path()).await;
        for _ in 0..3 {
            node.add(37).await;
        }
        let archive = Archive::new(
            settings(&moto.url, "s3://archive-src/n", LockMode::Compliance),
            node.r.ledger().clone(),
            &prometheus::Registry::new(),
        )
        .await
        .expect("archive");
        archive.round().await.expect("round");
        copy_all(&c, "archive-src", "archive-copy", "n/").await;
        c
    });
    let url = "s3://archive-copy/n";
    // Untampered: verified, and the output lists the key to pin.
    let (code, out) = verify_s3(&moto.url, url, &["--output", "json"]);
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("json report");
    assert_eq!(report["receipts"], 111, "{out}");
    let fingerprint = report["key_history"][0]["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_owned();
    let (code, out) = verify_s3(&moto.url, url, &["--trusted-key", &fingerprint]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\nverified\n"), "{out}");
    // A wrong pin fails.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let (code, out) = verify_s3(&moto.url, url, &["--trusted-key", &wrong]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("no key of the ledger is a trusted key"),
        "{out}"
    );

    // Tampering 1: a segment's body changed in place (one payload byte): its content hash no
    // longer matches its name, and its payload no longer matches the receipt's header.
    let (segment, body) = rt.block_on(async {
        let key = versions(&c, "archive-copy", "n/segments/")
            .await
            .into_iter()
            .map(|(k, _)| k)
            .find(|k| k.contains(&format!("/{:020}-", 20)))
            .expect("segment 20..");
        let body = get(&c, "archive-copy", &key).await;
        let mut forged = body.clone();
        let at = forged
            .windows(11)
            .position(|w| w == b"\"generation")
            .expect("a payload");
        forged[at + 13] ^= 1;
        c.put_object()
            .bucket("archive-copy")
            .key(&key)
            .body(forged.into())
            .send()
            .await
            .expect("tamper");
        (key, body)
    });
    let (code, out) = verify_s3(&moto.url, url, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "FAILED: s3://archive-copy/{segment}: its content's SHA-256 is"
        )) && out.contains("the object was changed after it was archived"),
        "{out}"
    );
    assert!(
        out.contains("its payload does not match the payload hash"),
        "{out}"
    );

    // Tampering 2: a receipt's header changed and the segment renamed to its new hash (the
    // names agree): the rebuilt tree no longer matches the signed checkpoints.
    rt.block_on(async {
        let mut forged = body.clone();
        // The first receipt's encoding starts at byte 24 (after the 20-byte segment header and
        // its 4-byte length); its cycle field at +9.
        forged[24 + 9 + 7] ^= 1;
        c.delete_object()
            .bucket("archive-copy")
            .key(&segment)
            .send()
            .await
            .expect("delete");
        let name = knhk_agent::archive::layout::segment_name(20, 40, &forged);
        c.put_object()
            .bucket("archive-copy")
            .key(format!("n/{name}"))
            .body(forged.into())
            .send()
            .await
            .expect("tamper");
    });
    let (code, out) = verify_s3(&moto.url, url, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(!out.contains("SHA-256 is"), "the names agree: {out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAILED: checkpoint") && l.contains("root")),
        "{out}"
    );
}

#[test]
fn kernel_kill9_mid_upload_leaves_every_segment_once_no_multipart_upload_and_a_held_segment() {
    use support::{kernel_available, wait_until, write_config, Agent, TestCgroup, TestPins};
    if !kernel_available(
        "kernel_kill9_mid_upload_leaves_every_segment_once_no_multipart_upload_and_a_held_segment",
    ) {
        return;
    }
    let moto = kms::moto();
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = support::runtime();
    let c = rt.block_on(lock_bucket(&moto.url, "archive-agent"));
    let cg = TestCgroup::new("archive");
    let pins = TestPins::new("archive");
    let db: PathBuf = dir.path().join("receipts.redb");
    // 1 ms beats, kept busy: a cycle-summary receipt and a checkpoint every few ms; small
    // segments, so uploads are always in flight.
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "[slo]\nbeat_interval_ms = 1\n[kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n[receipts]\npath = \"{}\"\nnode = \"test-node\"\n\
             [archive]\nurl = \"s3://archive-agent/test-node\"\nendpoint_url = \"{}\"\nlock_mode = \"compliance\"\nretention_days = 1\n\
             segment_max_receipts = 10\nupload_interval_ms = 100\nmax_backlog_receipts = 200\ntimeout_ms = 500\n",
            dir.path().join("keys").display(),
            db.display(),
            moto.url
        ),
    );
    s3::dummy_credentials();
    let agent = Agent::start(&config);
    // Connects throughout: every cycle decides something, so every cycle is receipted.
    let _busy = support::Busy::start(&cg.path);
    let count = || {
        rt.block_on(versions(&c, "archive-agent", "test-node/segments/"))
            .len()
    };
    wait_until("segments are archived", Duration::from_secs(20), || {
        count() > 5
    });
    // A hold placed through the agent (its CLI, over its API) holds the segment of receipt 3.
    let out = Command::new(support::BIN)
        .args([
            "hold",
            "place",
            "--case-id",
            "CASE-9",
            "--reason",
            "audit",
            "--from-seq",
            "3",
            "--to-seq",
            "4",
            "--endpoint",
        ])
        .arg(agent.endpoint())
        .output()
        .expect("hold place");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first_segment = || {
        rt.block_on(versions(&c, "archive-agent", "test-node/segments/"))
            .into_iter()
            .map(|(k, _)| k)
            .find(|k| k.contains(&format!("/{:020}-", 0)))
            .expect("segment 0..")
    };
    wait_until(
        "the held segment has its legal hold",
        Duration::from_secs(10),
        || rt.block_on(legal_hold(&c, "archive-agent", &first_segment())),
    );
    // Readiness names an outage with the backlog.
    moto.pause();
    wait_until(
        "readiness names the archive outage",
        Duration::from_secs(20),
        || {
            agent
                .get("/readyz")
                .contains("receipts wait to be archived")
        },
    );
    moto.resume();
    wait_until("readiness recovers", Duration::from_secs(30), || {
        agent.get("/readyz").contains("ok   receipts archive")
    });
    // kill -9 while uploads run, restart, let it catch up.
    agent.kill9();
    let agent = Agent::start(&config);
    std::thread::sleep(Duration::from_millis(1500));
    let (status, _) = agent.sigterm();
    assert!(status.success(), "{status}");
    // Every segment once: object versions = segments, contiguous from 0; no multipart uploads.
    let all = rt.block_on(versions(&c, "archive-agent", "test-node/segments/"));
    let ranges = segment_ranges(&all, "test-node");
    assert_eq!(ranges.len(), all.len(), "one version per segment");
    let mut keys: Vec<&String> = all.iter().map(|(k, _)| k).collect();
    keys.dedup();
    assert_eq!(
        keys.len(),
        all.len(),
        "no segment has two versions: {all:?}"
    );
    assert_eq!(ranges.first().map(|r| r.0), Some(0));
    assert!(ranges.windows(2).all(|w| w[0].1 == w[1].0), "{ranges:?}");
    assert!(ranges.iter().all(|(a, b)| b - a <= 10));
    let uploads = rt.block_on(async {
        c.list_multipart_uploads()
            .bucket("archive-agent")
            .send()
            .await
            .expect("ListMultipartUploads")
            .uploads()
            .len()
    });
    assert_eq!(uploads, 0, "no multipart uploads");
    eprintln!(
        "kill -9 mid-upload: {} segments, receipts 0..{}",
        ranges.len(),
        ranges.last().map_or(0, |r| r.1)
    );
    let (code, out) = verify_s3(&moto.url, "s3://archive-agent/test-node", &[]);
    assert_eq!(code, 0, "{out}");
}
