//! Fleet bundles against a real S3 API (moto's server, from the project's `.venv`): publish →
//! every follower converges; an unchanged ETag costs a 304 and no download; tampered, unsigned
//! or foreign-signed bundles are refused and the old policy stays; with the store down the last
//! good bundle stays, and a restart takes it from disk. No kernel needed (the agent itself is
//! exercised by `kernel_` tests).
#![cfg(feature = "s3")]

mod support;

use knhk_agent::{
    bundle::{self, BundleDocument, Follower, Outcome, Sink},
    config::{Config, SignerSettings},
    objectstore::{ObjectStore, ObjectUrl, StoreSettings},
    receipts,
};
use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};
use support::{kms, s3};

/// What a node would have applied: the digests in order, with where each came from.
#[derive(Default)]
struct Recorder {
    applied: Mutex<Vec<(String, &'static str)>>,
    outcomes: Mutex<Vec<Outcome>>,
    live_rules: Mutex<Vec<String>>,
}

#[tonic::async_trait]
impl Sink for Recorder {
    async fn apply(&self, b: &bundle::Bundle) -> Result<String, String> {
        *self.live_rules.lock().expect("lock") =
            b.policy.rules.iter().map(|r| r.name.to_string()).collect();
        Ok("recorded".into())
    }
    async fn record(&self, outcome: Outcome) {
        if let Outcome::Applied { digest, from, .. } = &outcome {
            self.applied
                .lock()
                .expect("lock")
                .push((digest.clone(), from));
        }
        self.outcomes.lock().expect("lock").push(outcome);
    }
}

impl Recorder {
    fn live(&self) -> Option<String> {
        self.applied
            .lock()
            .expect("lock")
            .last()
            .map(|(d, _)| d.clone())
    }
    fn rules(&self) -> Vec<String> {
        self.live_rules.lock().expect("lock").clone()
    }
    fn last_refusal(&self) -> Option<(&'static str, String)> {
        self.outcomes
            .lock()
            .expect("lock")
            .iter()
            .rev()
            .find_map(|o| match o {
                Outcome::Refused { reason, error, .. } => Some((*reason, error.clone())),
                _ => None,
            })
    }
}

fn policy(rule: &str) -> String {
    format!(
        "[agent]\nmode = \"enforce\"\ndefault_action = \"allow\"\n[[policy.rules]]\nname = \"{rule}\"\naction = \"deny\"\ncidrs = [\"10.9.0.0/16\"]\nports = [\"5432\"]\nprotocol = \"tcp\"\n"
    )
}

fn document(rule: &str) -> BundleDocument {
    BundleDocument {
        version: 1,
        policy: policy(rule),
        rollout: Some("steps = [1, 5, 25, 100]\nbeats_per_step = 8\n".into()),
        flags: Some("feature_flags = [\"heat_tracking\"]\n".into()),
        comment: Some("test".into()),
    }
}

/// A development signing key in `dir`; returns its public key file (PEM).
async fn dev_key(dir: &Path) -> PathBuf {
    let signer = receipts::connect_signer(&SignerSettings::File {
        key_dir: dir.to_owned(),
    })
    .await
    .expect("file signer");
    let info = signer.current().await.expect("current key");
    let pem =
        knhk_agent::objectstore::signed::public_key_der_to_pem(&info.public_key_der).expect("pem");
    let path = dir.with_extension("pem");
    std::fs::write(&path, pem).expect("write the public key");
    path
}

fn store_settings(endpoint: &str) -> StoreSettings {
    StoreSettings {
        endpoint_url: Some(endpoint.into()),
        region: "us-east-1".into(),
        force_path_style: true,
        timeout: Duration::from_secs(5),
    }
}

/// Signs `doc` with the key in `key_dir` and uploads it to `url`, as `bundle publish` does.
async fn publish(doc: &BundleDocument, key_dir: &Path, endpoint: &str, url: &str) -> String {
    let signer = receipts::connect_signer(&SignerSettings::File {
        key_dir: key_dir.to_owned(),
    })
    .await
    .expect("file signer");
    let sign = |message: Vec<u8>| async move {
        let info = signer.current().await.map_err(|e| e.to_string())?;
        let sig = signer
            .sign(&info.key, &message)
            .await
            .map_err(|e| e.to_string())?;
        Ok((info.key.to_string(), sig))
    };
    let target = bundle::PublishTarget {
        url: url.into(),
        store: store_settings(endpoint),
    };
    bundle::publish(doc, sign, Some(&target), None)
        .await
        .expect("publish")
        .0
}

/// A follower of `url` on the moto at `endpoint`, verifying with `pem`, keeping state in `state`.
async fn follower(
    endpoint: &str,
    url: &str,
    pem: &Path,
    state: &Path,
) -> (Follower, prometheus::Registry) {
    let text = format!(
        "[bundle]\nurl = \"{url}\"\nendpoint_url = \"{endpoint}\"\npoll_interval_ms = 1000\ntimeout_ms = 2000\npublic_key_file = \"{}\"\n",
        pem.display()
    );
    let config = Config::parse(&text, "test").expect("[bundle] loads");
    let settings = config.settings.bundle.expect("[bundle]");
    let key = match &settings.key_source {
        knhk_agent::config::BundleKey::File { der, .. } => der.clone(),
        other => panic!("{other:?}"),
    };
    std::fs::create_dir_all(state).expect("state dir");
    let f = Follower::new(&settings, key, state)
        .await
        .expect("follower");
    let registry = prometheus::Registry::new();
    f.register_metrics(&registry).expect("metrics");
    (f, registry)
}

/// The value of the series `series` (e.g. `knhk_bundle_polls_total{result="fetched"}`).
fn metric(registry: &prometheus::Registry, series: &str) -> f64 {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encode");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

async fn put_raw(endpoint: &str, url: &str, body: Vec<u8>) {
    let store = ObjectStore::connect(&store_settings(endpoint))
        .await
        .expect("store");
    store
        .put(&ObjectUrl::parse(url).expect("url"), body)
        .await
        .expect("put");
}

#[test]
fn publish_then_every_follower_converges_and_an_unchanged_etag_is_not_downloaded_again() {
    let moto = kms::moto();
    let dir = tempfile::tempdir().expect("tempdir");
    let key_dir = dir.path().join("key");
    let url = "s3://fleet-bundles/prod/bundle.json";
    support::runtime().block_on(async {
        s3::create_bucket(&moto.url, "fleet-bundles").await;
        let pem = dev_key(&key_dir).await;
        // The CLI publishes: what an operator runs.
        std::fs::write(dir.path().join("policy.toml"), policy("db-v1")).expect("policy file");
        let out = std::process::Command::new(support::BIN)
            .args(["bundle", "publish", "--output", "json", "--policy"])
            .arg(dir.path().join("policy.toml"))
            .args(["--url", url, "--endpoint-url", &moto.url, "--key-dir"])
            .arg(&key_dir)
            .output()
            .expect("run bundle publish");
        assert!(
            out.status.success(),
            "bundle publish: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let published: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("json output");
        let v1 = published["digest"].as_str().expect("digest").to_owned();
        // An invalid policy is refused before anything is signed or uploaded (exit 64).
        std::fs::write(
            dir.path().join("bad.toml"),
            "[[policy.rules]]\nname = \"x\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/33\"]\n",
        )
        .expect("bad policy file");
        let out = std::process::Command::new(support::BIN)
            .args(["bundle", "publish", "--policy"])
            .arg(dir.path().join("bad.toml"))
            .args(["--url", url, "--endpoint-url", &moto.url, "--key-dir"])
            .arg(&key_dir)
            .output()
            .expect("run bundle publish");
        assert_eq!(out.status.code(), Some(64));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("the bundle's policy is invalid") && stderr.contains("line 4"),
            "{stderr}"
        );
        // Its public-key command prints the key nodes are configured with.
        let out = std::process::Command::new(support::BIN)
            .args(["bundle", "public-key", "--key-dir"])
            .arg(&key_dir)
            .output()
            .expect("run bundle public-key");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(&pem).expect("pem")
        );

        let nodes = [
            (
                follower(&moto.url, url, &pem, &dir.path().join("node-a")).await,
                Recorder::default(),
            ),
            (
                follower(&moto.url, url, &pem, &dir.path().join("node-b")).await,
                Recorder::default(),
            ),
        ];
        for ((f, _), sink) in &nodes {
            f.poll_once(sink).await.expect("first poll applies");
            assert_eq!(sink.live().as_deref(), Some(v1.as_str()));
            assert_eq!(sink.rules(), ["db-v1"]);
            assert!((f.readiness_check())().is_ok());
        }
        // Unchanged: a 304 per poll, no download.
        for ((f, registry), sink) in &nodes {
            f.poll_once(sink).await.expect("unchanged");
            f.poll_once(sink).await.expect("unchanged");
            assert_eq!(
                metric(registry, "knhk_bundle_polls_total{result=\"fetched\"}"),
                1.0
            );
            assert_eq!(
                metric(registry, "knhk_bundle_polls_total{result=\"not_modified\"}"),
                2.0
            );
            assert_eq!(sink.applied.lock().expect("lock").len(), 1, "applied once");
            assert!(metric(registry, "knhk_bundle_last_applied_timestamp_seconds") > 0.0);
        }
        // A new bundle: every node converges on it.
        let v2 = publish(&document("db-v2"), &key_dir, &moto.url, url).await;
        assert_ne!(v1, v2);
        for ((f, _), sink) in &nodes {
            f.poll_once(sink).await.expect("new bundle");
            assert_eq!(sink.live().as_deref(), Some(v2.as_str()));
            assert_eq!(sink.rules(), ["db-v2"]);
        }
    });
}

#[test]
fn tampered_unsigned_and_foreign_bundles_are_refused_and_the_old_policy_stays() {
    let moto = kms::moto();
    let dir = tempfile::tempdir().expect("tempdir");
    let key_dir = dir.path().join("key");
    let other_dir = dir.path().join("other-key");
    let url = "s3://fleet-bundles/staging/bundle.json";
    support::runtime().block_on(async {
        s3::create_bucket(&moto.url, "fleet-bundles").await;
        let pem = dev_key(&key_dir).await;
        dev_key(&other_dir).await;
        let good = publish(&document("good"), &key_dir, &moto.url, url).await;
        let ((f, registry), sink) = (
            follower(&moto.url, url, &pem, &dir.path().join("node")).await,
            Recorder::default(),
        );
        f.poll_once(&sink).await.expect("the good bundle applies");
        assert_eq!(sink.rules(), ["good"]);

        // Tampered: a valid bundle's payload swapped under its signature.
        let signed = {
            let store = ObjectStore::connect(&store_settings(&moto.url))
                .await
                .expect("store");
            match store
                .get(&ObjectUrl::parse(url).expect("url"), None, 1 << 20)
                .await
                .expect("get")
            {
                knhk_agent::objectstore::Fetched::Object { body, .. } => body,
                other => panic!("{other:?}"),
            }
        };
        let mut envelope: serde_json::Value = serde_json::from_slice(&signed).expect("envelope");
        use base64::Engine as _;
        envelope["payload"] = base64::engine::general_purpose::STANDARD
            .encode(document("evil").encode())
            .into();
        let unsigned = document("unsigned").encode();
        let mut empty_sig = envelope.clone();
        empty_sig["signature"] = "".into();
        let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
            (
                "tampered",
                serde_json::to_vec(&envelope).expect("json"),
                "bad_signature",
                "does not verify with the configured public key sha256:",
            ),
            (
                "unsigned (a bare document)",
                unsigned,
                "unsigned",
                "unsigned: not a knhk-signed-object/v1 envelope",
            ),
            (
                "unsigned (empty signature)",
                serde_json::to_vec(&empty_sig).expect("json"),
                "unsigned",
                "unsigned: the envelope's signature is empty",
            ),
        ];
        for (what, body, reason, text) in cases {
            put_raw(&moto.url, url, body).await;
            let e = f.poll_once(&sink).await.expect_err(what);
            assert_eq!(e.reason(), reason, "{what}: {e}");
            assert!(e.to_string().contains(text), "{what}: {e}");
            assert_eq!(sink.rules(), ["good"], "{what}: the old policy stays");
            assert_eq!(sink.live().as_deref(), Some(good.as_str()));
            let (r, _) = sink.last_refusal().expect("a refusal is recorded");
            assert_eq!(r, reason, "{what}");
            let ready = (f.readiness_check())().expect_err("not ready");
            assert!(
                ready.contains(url) && ready.contains(text),
                "{what}: {ready}"
            );
            assert!(ready.contains("the last good bundle stays live"), "{ready}");
            let failures = metric(
                &registry,
                &format!("knhk_bundle_failures_total{{reason=\"{reason}\"}}"),
            );
            assert!(failures >= 1.0, "{what}: {failures}");
        }
        // The refused object is not downloaded again while it stays.
        let fetched = metric(&registry, "knhk_bundle_polls_total{result=\"fetched\"}");
        f.poll_once(&sink).await.expect("304");
        assert_eq!(
            metric(&registry, "knhk_bundle_polls_total{result=\"fetched\"}"),
            fetched
        );
        assert!((f.readiness_check())().is_err(), "still refused");

        // Signed with another key.
        let foreign = publish(&document("foreign"), &other_dir, &moto.url, url).await;
        let e = f.poll_once(&sink).await.expect_err("foreign key");
        assert_eq!(e.reason(), "bad_signature", "{e}");
        assert_ne!(sink.live().as_deref(), Some(foreign.as_str()));
        assert_eq!(sink.rules(), ["good"]);

        // An invalid policy, properly signed: refused with the policy's own error.
        let bad = BundleDocument {
            policy:
                "[[policy.rules]]\nname = \"x\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/33\"]\n"
                    .into(),
            ..document("x")
        };
        let signer = receipts::connect_signer(&SignerSettings::File {
            key_dir: key_dir.clone(),
        })
        .await
        .expect("signer");
        let info = signer.current().await.expect("key");
        let payload = bad.encode();
        let sig = signer
            .sign(&info.key, &bundle::signed_message(&payload))
            .await
            .expect("sign");
        put_raw(
            &moto.url,
            url,
            bundle::seal(&payload, &info.key.to_string(), &sig),
        )
        .await;
        let e = f.poll_once(&sink).await.expect_err("invalid policy");
        assert_eq!(e.reason(), "invalid_policy", "{e}");
        assert!(
            e.to_string()
                .contains("\"10.0.0.0/33\" is not a valid prefix"),
            "{e}"
        );
        assert_eq!(sink.rules(), ["good"]);

        // A good one again: applied, ready.
        let again = publish(&document("good-2"), &key_dir, &moto.url, url).await;
        f.poll_once(&sink).await.expect("applies");
        assert_eq!(sink.live().as_deref(), Some(again.as_str()));
        assert!((f.readiness_check())().is_ok());
    });
}

#[test]
fn with_the_store_down_the_last_good_bundle_stays_and_a_restart_takes_it_from_disk() {
    let moto = kms::moto();
    let dir = tempfile::tempdir().expect("tempdir");
    let key_dir = dir.path().join("key");
    let state = dir.path().join("node");
    let url = "s3://fleet-bundles/prod/bundle.json";
    let endpoint = moto.url.clone();
    support::runtime().block_on(async {
        s3::create_bucket(&endpoint, "fleet-bundles").await;
        let pem = dev_key(&key_dir).await;
        let good = publish(&document("kept"), &key_dir, &endpoint, url).await;
        let ((f, registry), sink) = (
            follower(&endpoint, url, &pem, &state).await,
            Recorder::default(),
        );
        f.poll_once(&sink).await.expect("applies");
        assert!(state.join("bundle-last-good.json").exists());

        drop(moto); // S3 down.
        let e = f.poll_once(&sink).await.expect_err("store down");
        assert_eq!(e.reason(), "unavailable", "{e}");
        assert_eq!(
            sink.live().as_deref(),
            Some(good.as_str()),
            "the last good bundle stays"
        );
        assert_eq!(
            metric(&registry, "knhk_bundle_polls_total{result=\"unavailable\"}"),
            1.0
        );
        let ready = (f.readiness_check())().expect_err("not ready");
        assert!(
            ready.contains(url) && ready.contains("unavailable") && ready.contains(&good),
            "{ready}"
        );

        // A restart with the store still down: the bundle comes from disk, verified again.
        let ((f2, _), sink2) = (
            follower(&endpoint, url, &pem, &state).await,
            Recorder::default(),
        );
        assert!(f2.adopt_last_good(&sink2).await.expect("adopts"));
        assert_eq!(
            sink2.applied.lock().expect("lock").clone(),
            vec![(good.clone(), "disk")]
        );
        assert_eq!(sink2.rules(), ["kept"]);
        assert!(f2.poll_once(&sink2).await.is_err(), "still down");
        assert_eq!(sink2.rules(), ["kept"]);

        // A damaged file on disk is not trusted: the key check fails, nothing is applied.
        let other_dir = dir.path().join("other-key");
        let other_pem = dev_key(&other_dir).await;
        let ((f3, _), sink3) = (
            follower(&endpoint, url, &other_pem, &state).await,
            Recorder::default(),
        );
        assert!(!f3.adopt_last_good(&sink3).await.expect("ignored"));
        assert!(sink3.live().is_none());
    });
}

fn deny(port: u16) -> String {
    format!(
        "[agent]\nmode = \"enforce\"\n[[policy.rules]]\nname = \"bundle-deny\"\naction = \"deny\"\ncidrs = [\"127.0.0.1/32\"]\nports = [\"{port}\"]\nprotocol = \"tcp\"\n"
    )
}

fn allow() -> String {
    "[agent]\nmode = \"enforce\"\n[[policy.rules]]\nname = \"bundle-allow\"\naction = \"allow\"\ncidrs = [\"127.0.0.0/8\"]\n".into()
}

fn bundle_of(policy: String) -> BundleDocument {
    BundleDocument {
        version: 1,
        policy,
        rollout: None,
        flags: None,
        comment: None,
    }
}

/// `knhk-agent bundle publish` of `policy`, signed with the AWS KMS key `key_id` on moto.
fn cli_publish(dir: &Path, policy: &str, moto: &str, key_id: &str, url: &str) {
    let file = dir.join("bundle-policy.toml");
    std::fs::write(&file, policy).expect("policy file");
    let out = std::process::Command::new(support::BIN)
        .args(["bundle", "publish", "--policy"])
        .arg(&file)
        .args([
            "--url",
            url,
            "--endpoint-url",
            moto,
            "--kms-key-id",
            key_id,
            "--kms-endpoint-url",
            moto,
            "--comment",
            "kernel test",
        ])
        .output()
        .expect("run bundle publish");
    assert!(
        out.status.success(),
        "bundle publish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The receipts of `kind` of the agent, as `receipts list --output json` gives them.
fn receipts_of(agent: &support::Agent, kind: &str) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(support::BIN)
        .args([
            "receipts",
            "list",
            "--limit",
            "1000",
            "--output",
            "json",
            "--endpoint",
        ])
        .arg(agent.endpoint())
        .output()
        .expect("run receipts list");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "receipts list: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    list["receipts"]
        .as_array()
        .expect("receipts")
        .iter()
        .filter(|r| r["kind"] == kind)
        .map(|r| {
            serde_json::from_str(r["payload"].as_str().expect("payload")).expect("json payload")
        })
        .collect()
}

#[test]
fn kernel_agents_follow_their_bundle_refuse_direct_applies_and_keep_the_last_good_one() {
    use knhk_agent::api::pb::{self, policy_service_client::PolicyServiceClient};
    use support::{
        kernel_available, tcp_connect_from, tcp_sink, wait_until, write_config, Agent, Outcome,
        TestCgroup, TestPins,
    };
    if !kernel_available(
        "kernel_agents_follow_their_bundle_refuse_direct_applies_and_keep_the_last_good_one",
    ) {
        return;
    }
    let moto = kms::moto();
    let target = tcp_sink("127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = "s3://fleet-bundles/prod/bundle.json";
    let rt = support::runtime();
    // Bundles are signed by an AWS KMS ECC_NIST_P256 key (moto's KMS).
    let key_id = rt.block_on(async {
        s3::create_bucket(&moto.url, "fleet-bundles").await;
        kms::create_kms_key(&moto.url).await.1
    });
    cli_publish(dir.path(), &deny(target.port()), &moto.url, &key_id, url);
    // Node a verifies with the key's PEM (`bundle public-key`), node b asks KMS for it.
    let out = std::process::Command::new(support::BIN)
        .args([
            "bundle",
            "public-key",
            "--kms-key-id",
            &key_id,
            "--kms-endpoint-url",
            &moto.url,
        ])
        .output()
        .expect("run bundle public-key");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = dir.path().join("bundle-key.pem");
    std::fs::write(&pem, &out.stdout).expect("write the public key");
    let common = format!(
        "[bundle]\nurl = \"{url}\"\nendpoint_url = \"{}\"\npoll_interval_ms = 1000\njitter = 0.0\ntimeout_ms = 1000\n",
        moto.url
    );
    let sections = [
        format!(
            "{common}public_key_file = \"{}\"\n[kms]\nprovider = \"file\"\nkey_dir = \"{}\"\n[receipts]\npath = \"{}\"\n",
            pem.display(),
            dir.path().join("receipts-key").display(),
            dir.path().join("receipts.redb").display()
        ),
        format!(
            "{common}kms_key_id = \"{key_id}\"\nkms_endpoint_url = \"{}\"\n",
            moto.url
        ),
    ];
    // Two nodes, each its own cgroup, pins and state; the file's policy allows everything.
    let nodes: Vec<(TestCgroup, TestPins, PathBuf)> = ["bundle-a", "bundle-b"]
        .iter()
        .zip(&sections)
        .map(|(name, section)| {
            let cg = TestCgroup::new(name);
            let pins = TestPins::new(name);
            let node_dir = dir.path().join(name);
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let config = write_config(
                &node_dir,
                &cg.path,
                &pins.root,
                &format!("[[policy.rules]]\nname = \"file-allow\"\naction = \"allow\"\ncidrs = [\"127.0.0.0/8\"]\n{section}"),
            );
            (cg, pins, config)
        })
        .collect();
    let agents: Vec<Agent> = nodes.iter().map(|(_, _, c)| Agent::start(c)).collect();
    // Publish → every node converges on the bundle's policy.
    for (cg, _, _) in &nodes {
        wait_until(
            "the bundle's deny rule is enforced",
            Duration::from_secs(15),
            || tcp_connect_from(&cg.path, target) == Outcome::Denied,
        );
    }
    rt.block_on(async {
        let mut c = PolicyServiceClient::new(agents[0].channel().await);
        let live = c
            .get_policy(pb::GetPolicyRequest {})
            .await
            .expect("get")
            .into_inner();
        // Direct applies and rollbacks are refused, naming the bundle.
        let e = c
            .apply_policy(pb::ApplyPolicyRequest {
                policy: Some(pb::PolicyDocument {
                    rules: vec![pb::Rule {
                        name: "direct".into(),
                        action: pb::Action::Allow as i32,
                        cidrs: vec!["0.0.0.0/0".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                expected_generation: None,
            })
            .await
            .expect_err("a direct apply is refused");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message()
                .contains(&format!("this node follows the fleet bundle {url}")),
            "{}",
            e.message()
        );
        let e = c
            .rollback(pb::RollbackRequest {
                expected_generation: None,
            })
            .await
            .expect_err("a rollback is refused");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains(url), "{}", e.message());
        let after = c
            .get_policy(pb::GetPolicyRequest {})
            .await
            .expect("get")
            .into_inner();
        assert_eq!(after.generation, live.generation, "nothing changed");
        // An unsigned bundle: refused by both, the deny stays, readiness and receipts say why.
        put_raw(&moto.url, url, bundle_of(allow()).encode()).await;
    });
    for (agent, (cg, _, _)) in agents.iter().zip(&nodes) {
        wait_until(
            "readiness names the refused bundle",
            Duration::from_secs(15),
            || {
                let r = agent.get("/readyz");
                r.contains(url) && r.contains("unsigned")
            },
        );
        assert_eq!(
            tcp_connect_from(&cg.path, target),
            Outcome::Denied,
            "the old policy stays"
        );
    }
    let receipts = receipts_of(&agents[0], "bundle");
    assert_eq!(receipts[0]["outcome"], "applied", "{receipts:?}");
    assert_eq!(receipts[0]["url"], url);
    assert!(
        receipts
            .iter()
            .any(|r| r["outcome"] == "refused" && r["reason"] == "unsigned"),
        "{receipts:?}"
    );
    // A new signed bundle: both nodes converge again.
    cli_publish(dir.path(), &allow(), &moto.url, &key_id, url);
    let published = std::time::Instant::now();
    for (cg, _, _) in &nodes {
        wait_until(
            "the new bundle allows again",
            Duration::from_secs(15),
            || tcp_connect_from(&cg.path, target) == Outcome::Connected,
        );
    }
    // Bounded by one poll interval (1 s, no jitter) plus a fetch, a verify and a switch.
    let converged = published.elapsed();
    eprintln!(
        "figure: publish → both nodes enforce the new bundle in {} ms (poll_interval_ms 1000, jitter 0)",
        converged.as_millis()
    );
    assert!(converged < Duration::from_secs(5), "{converged:?}");
    let metrics = agents[1].get("/metrics");
    for series in [
        "knhk_bundle_polls_total{result=\"not_modified\"}",
        "knhk_bundle_failures_total{reason=\"unsigned\"} 1",
        "knhk_bundle_polls_total{result=\"fetched\"} 3",
    ] {
        assert!(metrics.contains(series), "{series}:\n{metrics}");
    }
    // The store goes down: the last good bundle stays, and readiness says why, naming it.
    cli_publish(dir.path(), &deny(target.port()), &moto.url, &key_id, url);
    for (cg, _, _) in &nodes {
        wait_until("denied again", Duration::from_secs(15), || {
            tcp_connect_from(&cg.path, target) == Outcome::Denied
        });
    }
    let cg = &nodes[0].0;
    drop(moto);
    wait_until(
        "readiness names the bundle",
        Duration::from_secs(10),
        || {
            let r = agents[0].get("/readyz");
            r.contains("fleet bundle") && r.contains(url) && r.contains("unavailable")
        },
    );
    assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
    // A restart with the store (and KMS) still down: the last good bundle is enforced; node b,
    // which asks KMS for the public key, verifies with the key it kept.
    let mut agents = agents;
    let restarted: Vec<Agent> = nodes
        .iter()
        .map(|(cg, _, config)| {
            agents.remove(0).kill9();
            let agent = Agent::start(config);
            assert_eq!(tcp_connect_from(&cg.path, target), Outcome::Denied);
            agent
        })
        .collect();
    for agent in &restarted {
        wait_until(
            "restarted: readiness names the bundle",
            Duration::from_secs(10),
            || {
                let r = agent.get("/readyz");
                r.contains(url) && r.contains("the last good bundle stays live")
            },
        );
    }
    assert!(
        restarted[1]
            .logs()
            .contains("the public key of bundle.kms_key_id cannot be fetched"),
        "node b used its kept KMS public key"
    );
    drop(restarted);
}

#[test]
fn kernel_a_bundle_key_that_kms_refuses_stops_the_start_before_the_kernel() {
    use support::{kernel_available, write_config, TestCgroup, TestPins};
    if !kernel_available("kernel_a_bundle_key_that_kms_refuses_stops_the_start_before_the_kernel") {
        return;
    }
    let moto = kms::moto();
    s3::dummy_credentials();
    let cg = TestCgroup::new("bundle-key");
    let pins = TestPins::new("bundle-key");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "[[policy.rules]]\nname = \"r\"\naction = \"allow\"\ncidrs = [\"127.0.0.0/8\"]\n[bundle]\nurl = \"s3://fleet-bundles/b.json\"\nendpoint_url = \"{0}\"\nkms_key_id = \"alias/no-such-key\"\nkms_endpoint_url = \"{0}\"\n",
            moto.url
        ),
    );
    let out = std::process::Command::new(support::BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("[bundle]: the public key of bundle.kms_key_id \"alias/no-such-key\" cannot be had: aws refused: NotFoundException"),
        "{stderr}"
    );
    let attached = std::fs::read_dir(&pins.root)
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(attached, 0, "nothing was pinned");
}

/// A bundle that carries a rollout: the node rolls its policy out step by step (a direct
/// StartRollout is refused, naming the bundle), the rollout promotes on its own, and the same
/// bundle polled again starts nothing new.
#[test]
fn kernel_a_bundle_with_a_rollout_reaches_the_workloads_step_by_step() {
    use knhk_agent::api::pb::{self, rollout_service_client::RolloutServiceClient};
    use support::{
        kernel_available, tcp_connect_from, tcp_sink, wait_until, write_config, Agent, Outcome,
        TestCgroup, TestPins,
    };
    if !kernel_available("kernel_a_bundle_with_a_rollout_reaches_the_workloads_step_by_step") {
        return;
    }
    let moto = kms::moto();
    let target = tcp_sink("127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = "s3://fleet-rollouts/prod/bundle.json";
    let rt = support::runtime();
    let key_dir = dir.path().join("bundle-key");
    let pem = rt.block_on(async {
        s3::create_bucket(&moto.url, "fleet-rollouts").await;
        dev_key(&key_dir).await
    });
    let doc = BundleDocument {
        rollout: Some("steps = [50, 100]\nbeats_per_step = 10\n".into()),
        ..bundle_of(deny(target.port()))
    };
    rt.block_on(publish(&doc, &key_dir, &moto.url, url));
    let cg = TestCgroup::new("bundle-rollout");
    let pins = TestPins::new("bundle-rollout");
    let config = write_config(
        dir.path(),
        &cg.path,
        &pins.root,
        &format!(
            "[[policy.rules]]\nname = \"file-allow\"\naction = \"allow\"\ncidrs = [\"127.0.0.0/8\"]\n\
             [bundle]\nurl = \"{url}\"\nendpoint_url = \"{}\"\npoll_interval_ms = 1000\njitter = 0.0\npublic_key_file = \"{}\"\n\
             [promotion]\ndeny_rate_factor = 1e12\n",
            moto.url,
            pem.display()
        ),
    );
    let agent = Agent::start(&config);
    let status = || {
        rt.block_on(async {
            RolloutServiceClient::new(agent.channel().await)
                .get_rollout(pb::GetRolloutRequest {})
                .await
                .expect("get rollout")
                .into_inner()
        })
    };
    wait_until(
        "the bundle's rollout starts",
        Duration::from_secs(15),
        || status().present,
    );
    let s = status();
    assert_eq!(s.steps, [50.0, 100.0], "the bundle's steps: {s:?}");
    assert_eq!(s.beats_per_step, 10);
    // A direct rollout is refused: the bundle is the source of truth.
    let e = rt
        .block_on(async {
            RolloutServiceClient::new(agent.channel().await)
                .start_rollout(pb::StartRolloutRequest {
                    set_feature_flags: true,
                    ..Default::default()
                })
                .await
        })
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("fleet bundle"), "{}", e.message());
    wait_until("promotion", Duration::from_secs(20), || {
        status().state == "promoted"
    });
    assert_eq!(
        tcp_connect_from(&cg.path.join("."), target),
        Outcome::Denied
    );
    // Polled again (same ETag or same candidate): no new rollout.
    std::thread::sleep(Duration::from_millis(2500));
    let again = status();
    assert_eq!(
        (again.state.as_str(), again.candidate_generation),
        ("promoted", s.candidate_generation)
    );
    agent.kill9();
}
