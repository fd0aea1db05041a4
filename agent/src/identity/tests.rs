//! Unit tests of SPIFFE ID parsing, certificate identity extraction and `[spiffe]` settings.

use crate::{
    config::{Config, IdentitySettings},
    model::spiffe::{parse_spiffe_id, peer_id, Surface},
};
use std::time::Duration;

#[test]
fn spiffe_ids_follow_the_spec() {
    let long_td = format!("spiffe://{}/x", "a".repeat(256));
    let long_id = format!("spiffe://example.org/{}", "a".repeat(2048));
    let valid = [
        "spiffe://example.org",
        "spiffe://example.org/path",
        "spiffe://example.org/a/b/c",
        "spiffe://trust-domain.example_1/path.with-dots/and_under_scores",
        "spiffe://1.2.3.4/ns/prod",
        "spiffe://example.org/..a/b..",
    ];
    for id in valid {
        assert!(
            parse_spiffe_id(id).is_ok(),
            "{id}: {:?}",
            parse_spiffe_id(id)
        );
    }
    let invalid: &[(&str, &str)] = &[
        ("", "cannot be empty"),
        ("http://example.org/path", "scheme"),
        ("SPIFFE://example.org/path", "scheme"),
        ("spiffe://", "trust domain is missing"),
        ("spiffe:///path", "trust domain is missing"),
        ("spiffe://Example.org/path", "lowercase"),
        ("spiffe://example.org/path%20x", "path segment"),
        ("spiffe://example.org/a//b", "empty segments"),
        ("spiffe://example.org/a/./b", "dot segments"),
        ("spiffe://example.org/a/../b", "dot segments"),
        ("spiffe://example.org/path/", "trailing slash"),
        ("spiffe://example.org/path?x=1", "path segment"),
        ("spiffe://example.org/path#frag", "path segment"),
        ("spiffe://example.org:8080/path", "trust domain"),
        ("spiffe://user@example.org/path", "trust domain"),
        ("spiffe://example.org/a b", "path segment"),
        (&long_td, "trust domain exceeds maximum length"),
        (&long_id, "at most 2048 bytes"),
    ];
    for (id, needle) in invalid {
        let e = parse_spiffe_id(id).expect_err(id);
        assert!(e.contains(needle), "{id:?}: expected {needle:?} in {e:?}");
    }
}

/// A self-signed certificate with the given URI SANs, DER.
fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*u).expect("ia5")))
        .collect();
    let key = rcgen::KeyPair::generate().expect("key");
    params
        .self_signed(&key)
        .expect("self-signed")
        .der()
        .to_vec()
}

#[test]
fn a_peer_certificate_needs_exactly_one_spiffe_uri_san() {
    let ok = peer_id(&cert_with_uris(&["spiffe://example.org/ops"])).expect("one SPIFFE ID");
    assert_eq!(ok.to_string(), "spiffe://example.org/ops");
    for (uris, needle) in [
        (&[][..], "no spiffe:// URI SAN"),
        (
            &["spiffe://example.org/a", "spiffe://example.org/b"][..],
            "more than one URI SAN",
        ),
        (
            &["spiffe://example.org/a", "https://example.org/"][..],
            "more than one URI SAN",
        ),
        (
            &["https://example.org/a"][..],
            "the scheme must be \"spiffe://\"",
        ),
        (&["spiffe://Example.org/a"][..], "lowercase"),
    ] {
        let e = peer_id(&cert_with_uris(uris))
            .expect_err("refused")
            .to_string();
        assert!(e.contains(needle), "{uris:?}: expected {needle:?} in {e:?}");
    }
    assert!(peer_id(b"not a certificate").is_err());
}

fn settings(spiffe: &str) -> Result<Option<IdentitySettings>, String> {
    Config::parse(&format!("[spiffe]\n{spiffe}"), "t.toml")
        .map(|c| c.settings.identity)
        .map_err(|e| e.to_string())
}

#[test]
fn the_plans_spiffe_table_enables_identity() {
    let s = settings(
        "enabled = true\nspiffe_socket_path = \"/tmp/spire-agent/public/api.sock\"\n\
         trust_domain = \"fortune5.example.com\"\nspiffe_id = \"spiffe://fortune5.example.com/sidecar/prod\"\n",
    )
    .expect("valid")
    .expect("enabled");
    assert_eq!(s.endpoint(), "unix:/tmp/spire-agent/public/api.sock");
    assert_eq!(s.max_svid_age, Duration::from_secs(24 * 3600));
    let reader = parse_spiffe_id("spiffe://fortune5.example.com/anyone").expect("id");
    assert!(
        s.access.allows(Surface::Read, &reader),
        "readers default to the local trust domain"
    );
    assert!(
        !s.access.allows(Surface::PolicyWrite, &reader),
        "writers must be named"
    );
}

#[test]
fn bad_spiffe_settings_name_the_key() {
    for (text, needles) in [
        ("enabled = true\n", &["spiffe.trust_domain", "is required"][..]),
        (
            "enabled = true\ntrust_domain = \"spiffe://x.org\"\n",
            &["spiffe.trust_domain", "without spiffe://"],
        ),
        (
            "enabled = true\ntrust_domain = \"x.org\"\nspiffe_id = \"spiffe://y.org/a\"\n",
            &["spiffe.spiffe_id", "not in trust_domain"],
        ),
        (
            "trust_domain = \"x.org\"\nmax_svid_age_hours = 48\n",
            &["spiffe.max_svid_age_hours", "48 is out of range"],
        ),
        (
            "trust_domain = \"x.org\"\n[spiffe.authorized_ids]\npolicy_writers = [\"spiffe://x.org/a\", \"spiffe://y.org/b\"]\n",
            &["spiffe.authorized_ids.policy_writers[1]", "no such peer can authenticate"],
        ),
        (
            "trust_domain = \"x.org\"\n[spiffe.authorized_ids]\nreaders = [\"spiffe://x.org/a*\"]\n",
            &["spiffe.authorized_ids.readers[0]", "wildcard"],
        ),
        (
            "enabled = true\ntrust_domain = \"x.org\"\nsource = \"files\"\ncert_file = \"/c\"\n",
            &["spiffe.key_file", "is required with source = \"files\""],
        ),
        (
            "trust_domain = \"x.org\"\ncert_file = \"/c\"\n",
            &["spiffe.cert_file", "only used with source = \"files\""],
        ),
        (
            "trust_domain = \"x.org\"\nsource = \"file\"\n",
            &["unknown variant `file`", "files"],
        ),
        (
            "trust_domain = \"x.org\"\nspiffe_socket_path = \"relative.sock\"\n",
            &["spiffe.spiffe_socket_path", "not an absolute path"],
        ),
    ] {
        let e = settings(text).expect_err(text);
        for n in needles {
            assert!(e.contains(n), "{text}: expected {n:?} in:\n{e}");
        }
    }
}
