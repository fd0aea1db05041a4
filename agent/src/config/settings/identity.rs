//! `[spiffe]` → [`IdentitySettings`].

use crate::config::{IdentitySource, SpiffeSection};
use crate::model::spiffe::{parse_spiffe_id, parse_trust_domain, AccessPolicy, IdMatcher};
use spiffe::{SpiffeId, TrustDomain};
use std::{path::PathBuf, time::Duration};

/// The default Workload API socket of a SPIRE agent.
pub const DEFAULT_SOCKET: &str = "/tmp/spire-agent/public/api.sock";

/// Certificate, key and CA files of the file source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePaths {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM PKCS#8 private key (mode 0600 or stricter).
    pub key: PathBuf,
    /// PEM CA bundle of the trust domain.
    pub ca: PathBuf,
}

/// Validated `[spiffe]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySettings {
    /// Workload API socket; `None`: `$SPIFFE_ENDPOINT_SOCKET`, else [`DEFAULT_SOCKET`].
    pub socket: Option<PathBuf>,
    /// Files instead of the Workload API.
    pub files: Option<FilePaths>,
    /// This node's trust domain.
    pub trust_domain: TrustDomain,
    /// The ID the agent must be issued, if configured.
    pub expected_id: Option<SpiffeId>,
    /// Accepted foreign trust domains.
    pub federated: Vec<TrustDomain>,
    /// Oldest acceptable SVID.
    pub max_svid_age: Duration,
    /// How long the first SVID may take before it counts as a failure.
    pub initial_sync_timeout: Duration,
    /// Who may call what.
    pub access: AccessPolicy,
}

impl IdentitySettings {
    /// Checks a `[spiffe]` section: `Ok(None)` when it is not enabled (its keys are still
    /// checked), else the settings. Errors name the key (relative to `spiffe.`) and say why.
    pub fn from_section(s: &SpiffeSection) -> Result<Option<IdentitySettings>, (String, String)> {
        let bad = |key: &str, message: String| (key.to_owned(), message);
        let trust_domain = s
            .trust_domain
            .as_deref()
            .map(parse_trust_domain)
            .transpose()
            .map_err(|m| bad("trust_domain", m))?;
        let expected_id = s
            .spiffe_id
            .as_deref()
            .map(parse_spiffe_id)
            .transpose()
            .map_err(|m| bad("spiffe_id", m))?;
        let mut federated = Vec::new();
        for (i, td) in s.federated_trust_domains.iter().flatten().enumerate() {
            federated.push(
                parse_trust_domain(td)
                    .map_err(|m| bad(&format!("federated_trust_domains[{i}]"), m))?,
            );
        }
        let max_age_hours = s.max_svid_age_hours.unwrap_or(24);
        if !(1..=24).contains(&max_age_hours) {
            return Err(bad(
                "max_svid_age_hours",
                format!("{max_age_hours} is out of range: SVIDs must rotate at least every 24 hours (1-24)"),
            ));
        }
        let sync_secs = s.initial_sync_timeout_secs.unwrap_or(30);
        if !(1..=3600).contains(&sync_secs) {
            return Err(bad(
                "initial_sync_timeout_secs",
                format!("{sync_secs} is out of range (1-3600)"),
            ));
        }
        if let Some(p) = &s.spiffe_socket_path {
            if !p.is_absolute() {
                return Err(bad(
                    "spiffe_socket_path",
                    format!("{} is not an absolute path", p.display()),
                ));
            }
        }
        // Not set: the Workload API, the documented default.
        let source = s.source.unwrap_or_default();
        let files = match source {
            IdentitySource::WorkloadApi => {
                for (key, v) in [
                    ("cert_file", &s.cert_file),
                    ("key_file", &s.key_file),
                    ("ca_file", &s.ca_file),
                ] {
                    if v.is_some() {
                        return Err(bad(key, "is only used with source = \"files\"".into()));
                    }
                }
                None
            }
            IdentitySource::Files => {
                let need = |key: &str, v: &Option<PathBuf>| {
                    v.clone()
                        .ok_or_else(|| bad(key, "is required with source = \"files\"".into()))
                };
                if !federated.is_empty() {
                    return Err(bad(
                        "federated_trust_domains",
                        "federation needs the Workload API (foreign bundles come from SPIRE); \
                         source = \"files\" has only ca_file"
                            .into(),
                    ));
                }
                Some(FilePaths {
                    cert: need("cert_file", &s.cert_file)?,
                    key: need("key_file", &s.key_file)?,
                    ca: need("ca_file", &s.ca_file)?,
                })
            }
        };
        // No [spiffe.authorized_ids]: every list empty, defaults filled below.
        let ids = s.authorized_ids.clone().unwrap_or_default();
        let mut access = AccessPolicy::default();
        for (name, given, list) in [
            (
                "policy_writers",
                &ids.policy_writers,
                &mut access.policy_writers,
            ),
            ("readers", &ids.readers, &mut access.readers),
            ("region_peers", &ids.region_peers, &mut access.region_peers),
            ("hold_writers", &ids.hold_writers, &mut access.hold_writers),
        ] {
            for (i, entry) in given.iter().flatten().enumerate() {
                let key = format!("authorized_ids.{name}[{i}]");
                let m = IdMatcher::parse(entry).map_err(|m| bad(&key, m))?;
                if let Some(td) = &trust_domain {
                    if m.trust_domain() != td && !federated.contains(m.trust_domain()) {
                        return Err(bad(
                            &key,
                            format!(
                                "{entry:?} is in trust domain {:?}, which is neither trust_domain nor in federated_trust_domains: \
                                 no such peer can authenticate",
                                m.trust_domain().as_str()
                            ),
                        ));
                    }
                }
                list.push(m);
            }
        }
        if s.enabled != Some(true) {
            return Ok(None);
        }
        let Some(trust_domain) = trust_domain else {
            return Err(bad(
                "trust_domain",
                "is required when enabled = true: the trust domain of this node's SPIFFE IDs, e.g. \"example.org\"".into(),
            ));
        };
        if let Some(id) = &expected_id {
            if id.trust_domain() != &trust_domain {
                return Err(bad(
                    "spiffe_id",
                    format!("{id} is not in trust_domain {:?}", trust_domain.as_str()),
                ));
            }
        }
        if ids.readers.is_none() {
            access.readers.push(IdMatcher::Prefix {
                trust_domain: trust_domain.clone(),
                path: String::new(),
            });
        }
        Ok(Some(IdentitySettings {
            socket: s.spiffe_socket_path.clone(),
            files,
            trust_domain,
            expected_id,
            federated,
            max_svid_age: Duration::from_secs(u64::from(max_age_hours) * 3600),
            initial_sync_timeout: Duration::from_secs(sync_secs),
            access,
        }))
    }

    /// The trust domains whose peers are accepted: this one and the federated ones.
    pub fn accepted_trust_domains(&self) -> Vec<TrustDomain> {
        let mut out = vec![self.trust_domain.clone()];
        out.extend(self.federated.iter().cloned());
        out
    }

    /// The Workload API endpoint (`unix:/path`) of the SPIRE source.
    pub fn endpoint(&self) -> String {
        match &self.socket {
            Some(p) => format!("unix:{}", p.display()),
            None => std::env::var("SPIFFE_ENDPOINT_SOCKET")
                // Unset or not Unicode: the default socket.
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("unix:{DEFAULT_SOCKET}")),
        }
    }
}
