use super::*;
use p256::{
    ecdsa::{signature::Signer as _, Signature, SigningKey},
    pkcs8::EncodePublicKey,
};

const POLICY: &str = "[agent]\nmode = \"enforce\"\n[[policy.rules]]\nname = \"db\"\naction = \"deny\"\ncidrs = [\"10.0.0.0/8\"]\n";

fn key(seed: u8) -> (SigningKey, Vec<u8>) {
    let k = SigningKey::from_slice(&[seed; 32]).expect("key");
    let der = k
        .verifying_key()
        .to_public_key_der()
        .expect("der")
        .as_bytes()
        .to_vec();
    (k, der)
}

fn sealed(k: &SigningKey, doc: &BundleDocument) -> Vec<u8> {
    let payload = doc.encode();
    let sig: Signature = k.sign(&signed_message(&payload));
    seal(&payload, "test", sig.to_der().as_bytes())
}

fn doc(policy: &str) -> BundleDocument {
    BundleDocument {
        version: 1,
        policy: policy.into(),
        rollout: Some("steps = [1, 5, 25, 100]\n".into()),
        flags: None,
        comment: None,
    }
}

#[test]
fn a_signed_bundle_opens_with_its_policy() {
    let (k, der) = key(5);
    let b = open(&sealed(&k, &doc(POLICY)), &der, Some("\"e1\"".into())).expect("opens");
    assert_eq!(b.policy.rules.len(), 1);
    assert_eq!(b.policy.rules[0].name.to_string(), "db");
    assert!(b.digest.starts_with("sha256:"), "{}", b.digest);
}

#[test]
fn bad_bundles_are_refused_with_their_reason() {
    let (k, der) = key(5);
    let (other, _) = key(6);
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            sealed(&other, &doc(POLICY)),
            "bad_signature",
            "does not verify with the configured public key",
        ),
        (
            POLICY.as_bytes().to_vec(),
            "unsigned",
            "unsigned: not a knhk-signed-object/v1 envelope",
        ),
        (
            sealed(
                &k,
                &doc("[[policy.rules]]\nname = \"x\"\naction = \"maybe\"\n"),
            ),
            "invalid_policy",
            "the bundle's policy is invalid",
        ),
        (
            sealed(
                &k,
                &BundleDocument {
                    version: 2,
                    ..doc(POLICY)
                },
            ),
            "malformed",
            "version 2 is not supported",
        ),
        (
            sealed(
                &k,
                &BundleDocument {
                    flags: Some("not = [toml".into()),
                    ..doc(POLICY)
                },
            ),
            "malformed",
            "its flags is not a TOML table",
        ),
    ];
    for (object, reason, text) in cases {
        let e = open(&object, &der, None).expect_err(reason);
        assert_eq!(e.reason(), reason, "{e}");
        assert!(e.to_string().contains(text), "{reason}: {e}");
    }
}

#[test]
fn the_last_good_record_survives_a_save() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lg = LastGood::new(dir.path());
    assert_eq!(lg.load().expect("none"), None);
    let r = LastGoodRecord::new("s3://b-1/k", Some("\"e\"".into()), b"object");
    lg.save(&r).expect("save");
    let back = lg.load().expect("load").expect("some");
    assert_eq!(back.object().expect("bytes"), b"object");
    std::fs::write(lg.path(), "{").expect("damage");
    assert!(lg
        .load()
        .expect_err("damaged")
        .contains("bundle-last-good.json"));
}

#[tokio::test]
async fn waits_are_jittered_within_the_configured_fraction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = dir.path().join("k.pem");
    let (_, der) = key(5);
    std::fs::write(
        &pem,
        crate::objectstore::signed::public_key_der_to_pem(&der).expect("pem"),
    )
    .expect("write");
    let text = format!(
        "[bundle]\nurl = \"s3://b-1/k\"\nendpoint_url = \"http://127.0.0.1:1\"\npoll_interval_ms = 10000\njitter = 0.5\npublic_key_file = \"{}\"\n",
        pem.display()
    );
    let settings = Config::parse(&text, "t")
        .expect("valid")
        .settings
        .bundle
        .expect("[bundle]");
    let f = Follower::new(&settings, der, dir.path())
        .await
        .expect("follower");
    let waits: Vec<Duration> = (0..200).map(|_| f.next_wait()).collect();
    let (lo, hi) = (Duration::from_secs(10), Duration::from_secs(15));
    assert!(waits.iter().all(|w| *w >= lo && *w < hi), "{waits:?}");
    // Spread over the range, not one value.
    assert!(waits.iter().any(|w| *w < Duration::from_millis(11_000)));
    assert!(waits.iter().any(|w| *w > Duration::from_millis(14_000)));
}

#[test]
fn a_bundles_rollout_and_flags_are_checked_with_their_key() {
    let with = |rollout: Option<&str>, flags: Option<&str>| BundleDocument {
        rollout: rollout.map(str::to_owned),
        flags: flags.map(str::to_owned),
        ..doc(POLICY)
    };
    let terms = with(
        Some("steps = [5, 100]\nbeats_per_step = 30\nseed = \"wave-7\"\n"),
        Some("feature_flags = [\"heat_tracking\"]\n"),
    )
    .rollout_terms()
    .expect("valid")
    .expect("a rollout");
    assert_eq!(terms.steps.expect("steps").len(), 2);
    assert_eq!(
        (terms.beats_per_step, terms.seed.as_deref()),
        (Some(30), Some("wave-7"))
    );
    assert_eq!(terms.flags.expect("flags").len(), 1);
    assert_eq!(with(None, None).rollout_terms().expect("valid"), None);
    for (rollout, flags, text) in [
        (
            Some("steps = [25, 5]\n"),
            None,
            "its rollout.steps: step 2 (5%) does not increase",
        ),
        (Some("hold = 3\n"), None, "unknown field `hold`"),
        (
            Some("beats_per_step = 0\n"),
            None,
            "its rollout.beats_per_step: 0 is outside",
        ),
        (
            None,
            Some("feature_flags = [\"warp\"]\n"),
            "unknown feature flag \"warp\"",
        ),
        (
            None,
            Some("feature_flags = [\"verdict_events\", \"verdict_events\"]\n"),
            "verdict_events is listed twice",
        ),
    ] {
        let e = with(rollout, flags).check().expect_err(text);
        assert!(e.to_string().contains(text), "{text}: {e}");
    }
}
