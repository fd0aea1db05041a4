//! SPIFFE IDs and who may call which API surface (pure: parsing and allow-list matching).
//!
//! Authorization runs after the TLS handshake has verified the peer's X.509-SVID against the
//! bundle of its trust domain; it only looks at the verified SPIFFE ID. An allow-list entry is
//! an exact ID (`spiffe://example.org/ns/ops/sa/admin`) or a path prefix within one trust domain
//! ending in `/*` (`spiffe://example.org/ns/ops/*`, or `spiffe://example.org/*` for the whole
//! domain). Prefixes match whole path segments: `/ns/ops/*` matches `/ns/ops/sa/x`, not
//! `/ns/opsx`.

use spiffe::{SpiffeId, TrustDomain};
use std::fmt;

/// An API surface with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Surface {
    /// Changing the policy (ApplyPolicy, Rollback).
    PolicyWrite,
    /// Reading state (everything else of the agent's API, and reflection).
    Read,
    /// Receipt sync between regions.
    RegionPeer,
    /// Placing and releasing legal holds.
    HoldWrite,
    /// `grpc.health.v1`: any authenticated peer of an accepted trust domain.
    Health,
}

impl Surface {
    /// Every surface.
    pub const ALL: [Surface; 5] = [
        Surface::PolicyWrite,
        Surface::Read,
        Surface::RegionPeer,
        Surface::HoldWrite,
        Surface::Health,
    ];

    /// The name used in configuration, metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Surface::PolicyWrite => "policy_writers",
            Surface::Read => "readers",
            Surface::RegionPeer => "region_peers",
            Surface::HoldWrite => "hold_writers",
            Surface::Health => "health",
        }
    }
}

/// One allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdMatcher {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Every ID of `trust_domain` whose path is `path` or below it (`path` is empty for the
    /// whole trust domain).
    Prefix {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// Path prefix without a trailing slash (`/ns/ops`), or empty.
        path: String,
    },
}

impl IdMatcher {
    /// Parses an entry: an exact SPIFFE ID, or one ending in `/*`.
    pub fn parse(entry: &str) -> Result<IdMatcher, String> {
        if let Some(base) = entry.strip_suffix("/*") {
            // `spiffe://td/*` is the whole domain; `spiffe://td/a/b/*` a path prefix.
            let rest = base.strip_prefix("spiffe://").ok_or_else(|| {
                format!("{entry:?} is not a SPIFFE ID: it must start with spiffe://")
            })?;
            if !rest.contains('/') {
                let trust_domain = parse_trust_domain(rest)?;
                return Ok(IdMatcher::Prefix {
                    trust_domain,
                    path: String::new(),
                });
            }
            let id = parse_spiffe_id(base)?;
            return Ok(IdMatcher::Prefix {
                trust_domain: id.trust_domain().clone(),
                path: id.path().to_owned(),
            });
        }
        if entry.contains('*') {
            return Err(format!(
                "{entry:?}: a wildcard is only allowed as a final \"/*\" (a path prefix)"
            ));
        }
        parse_spiffe_id(entry).map(IdMatcher::Exact)
    }

    /// Whether `id` matches.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdMatcher::Exact(e) => e == id,
            IdMatcher::Prefix { trust_domain, path } => {
                id.trust_domain() == trust_domain
                    && (path.is_empty()
                        || id.path() == path
                        || id
                            .path()
                            .strip_prefix(path.as_str())
                            .is_some_and(|rest| rest.starts_with('/')))
            }
        }
    }

    /// The trust domain the entry belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        match self {
            IdMatcher::Exact(id) => id.trust_domain(),
            IdMatcher::Prefix { trust_domain, .. } => trust_domain,
        }
    }
}

impl fmt::Display for IdMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdMatcher::Exact(id) => write!(f, "{id}"),
            IdMatcher::Prefix { trust_domain, path } => {
                write!(f, "spiffe://{}{path}/*", trust_domain.as_str())
            }
        }
    }
}

/// The allow-lists of every surface.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessPolicy {
    /// May change the policy (and read).
    pub policy_writers: Vec<IdMatcher>,
    /// May read.
    pub readers: Vec<IdMatcher>,
    /// May sync receipts as another region.
    pub region_peers: Vec<IdMatcher>,
    /// May place and release legal holds (and read).
    pub hold_writers: Vec<IdMatcher>,
}

impl AccessPolicy {
    /// Whether `id` may use `surface`. Writers may also read; health needs only a verified ID.
    pub fn allows(&self, surface: Surface, id: &SpiffeId) -> bool {
        let any = |list: &[IdMatcher]| list.iter().any(|m| m.matches(id));
        match surface {
            Surface::PolicyWrite => any(&self.policy_writers),
            Surface::Read => {
                any(&self.readers) || any(&self.policy_writers) || any(&self.hold_writers)
            }
            Surface::RegionPeer => any(&self.region_peers),
            Surface::HoldWrite => any(&self.hold_writers),
            Surface::Health => true,
        }
    }

    /// Every entry, with the surface it belongs to.
    pub fn entries(&self) -> impl Iterator<Item = (Surface, &IdMatcher)> {
        [
            (Surface::PolicyWrite, &self.policy_writers),
            (Surface::Read, &self.readers),
            (Surface::RegionPeer, &self.region_peers),
            (Surface::HoldWrite, &self.hold_writers),
        ]
        .into_iter()
        .flat_map(|(s, list)| list.iter().map(move |m| (s, m)))
    }
}

/// Why a peer certificate carries no usable SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    /// No certificate was presented.
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The certificate is not a valid X.509-SVID identity.
    #[error("the peer certificate is not an X.509-SVID: {0}")]
    NotAnSvid(String),
}

/// The SPIFFE ID of a peer's leaf certificate (DER): exactly one URI SAN (of any scheme), and
/// it is a valid `spiffe://` ID.
pub fn peer_id(leaf_der: &[u8]) -> Result<SpiffeId, PeerIdError> {
    use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};
    let bad = |m: String| PeerIdError::NotAnSvid(m);
    let (_, cert) = X509Certificate::from_der(leaf_der)
        .map_err(|e| bad(format!("it does not parse as X.509: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("its subject alternative names do not parse: {e}")))?;
    let uris: Vec<&str> = san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        // No subject alternative names at all: no URI SAN (refused below).
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(bad(
            "it has no spiffe:// URI SAN (an SVID has exactly one URI SAN)".into(),
        )),
        [uri] => parse_spiffe_id(uri).map_err(bad),
        more => Err(bad(format!(
            "it has more than one URI SAN ({}): an SVID has exactly one",
            more.join(", ")
        ))),
    }
}

/// The longest SPIFFE ID the spec asks implementations to handle.
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;

/// Parses a SPIFFE ID per the SPIFFE spec: `spiffe://` + a trust domain of lowercase letters,
/// digits, dots, dashes and underscores (at most 255 bytes) + an optional path of non-empty
/// segments of letters, digits, dots, dashes and underscores, no `.`/`..` segments, no
/// trailing slash, no query, fragment, port, user info or percent-encoding; at most 2048 bytes.
pub fn parse_spiffe_id(s: &str) -> Result<SpiffeId, String> {
    if !s.is_empty() && !s.starts_with("spiffe://") {
        return Err(format!(
            "{s:?} is not a valid SPIFFE ID: the scheme must be \"spiffe://\" (lowercase)"
        ));
    }
    if s.len() > MAX_SPIFFE_ID_BYTES {
        return Err(format!(
            "a SPIFFE ID of {} bytes is not valid: at most {MAX_SPIFFE_ID_BYTES} bytes (SPIFFE spec)",
            s.len()
        ));
    }
    // The parser folds the trust domain to lowercase; the spec makes uppercase invalid.
    let authority = s
        .strip_prefix("spiffe://")
        .map(|rest| rest.split('/').next().unwrap_or(""));
    if authority.is_some_and(|a| a.bytes().any(|b| b.is_ascii_uppercase())) {
        return Err(format!(
            "{s:?} is not a valid SPIFFE ID: the trust domain must be lowercase"
        ));
    }
    SpiffeId::new(s).map_err(|e| format!("{s:?} is not a valid SPIFFE ID: {e}"))
}

/// Parses a trust domain name (`example.org`, no scheme), with the spec's rules.
pub fn parse_trust_domain(s: &str) -> Result<TrustDomain, String> {
    if s.contains("://") {
        return Err(format!(
            "{s:?} is not a trust domain name: give the name only (example.org), without spiffe://"
        ));
    }
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "{s:?} is not a valid trust domain: trust domains are lowercase (SPIFFE spec)"
        ));
    }
    TrustDomain::new(s).map_err(|e| format!("{s:?} is not a valid trust domain: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matchers_match_whole_segments() {
        let m = IdMatcher::parse("spiffe://example.org/ns/ops/*").expect("valid");
        let id = |s: &str| parse_spiffe_id(s).expect("valid id");
        assert!(m.matches(&id("spiffe://example.org/ns/ops/sa/admin")));
        assert!(m.matches(&id("spiffe://example.org/ns/ops")));
        assert!(!m.matches(&id("spiffe://example.org/ns/opsx")));
        assert!(!m.matches(&id("spiffe://other.org/ns/ops/sa/admin")));
        let all = IdMatcher::parse("spiffe://example.org/*").expect("valid");
        assert!(all.matches(&id("spiffe://example.org/anything/at/all")));
        assert!(!all.matches(&id("spiffe://example.com/x")));
        let exact = IdMatcher::parse("spiffe://example.org/a").expect("valid");
        assert!(exact.matches(&id("spiffe://example.org/a")));
        assert!(!exact.matches(&id("spiffe://example.org/a/b")));
        assert_eq!(m.to_string(), "spiffe://example.org/ns/ops/*");
        assert_eq!(all.to_string(), "spiffe://example.org/*");
    }

    #[test]
    fn bad_matchers_say_why() {
        for (entry, needle) in [
            ("spiffe://example.org/a*", "wildcard"),
            ("spiffe://example.org/*/x", "wildcard"),
            ("example.org/*", "must start with spiffe://"),
            ("spiffe://Example.org/*", "lowercase"),
            ("spiffe://example.org/a//b", "empty segments"),
        ] {
            let e = IdMatcher::parse(entry).expect_err(entry);
            assert!(e.contains(needle), "{entry}: {e}");
        }
    }

    #[test]
    fn writers_read_and_health_needs_only_a_verified_id() {
        let policy = AccessPolicy {
            policy_writers: vec![IdMatcher::parse("spiffe://td/ops").expect("valid")],
            readers: vec![IdMatcher::parse("spiffe://td/mon/*").expect("valid")],
            ..Default::default()
        };
        let id = |s: &str| parse_spiffe_id(s).expect("valid id");
        assert!(policy.allows(Surface::PolicyWrite, &id("spiffe://td/ops")));
        assert!(policy.allows(Surface::Read, &id("spiffe://td/ops")));
        assert!(policy.allows(Surface::Read, &id("spiffe://td/mon/x")));
        assert!(!policy.allows(Surface::PolicyWrite, &id("spiffe://td/mon/x")));
        assert!(!policy.allows(Surface::RegionPeer, &id("spiffe://td/ops")));
        assert!(policy.allows(Surface::Health, &id("spiffe://td/anyone")));
    }
}
