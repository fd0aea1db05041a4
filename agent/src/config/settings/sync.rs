//! `[multi_region]` → [`SyncSettings`].

use std::time::Duration;

/// Validated `[multi_region]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSettings {
    /// This region.
    pub region: String,
    /// Witness endpoints.
    pub peers: Vec<Peer>,
    /// Witness cosignatures a checkpoint needs to be committed.
    pub quorum: usize,
    /// Pinned witness keys (C2SP verifier keys); empty: each witness's key is learned on first
    /// contact and kept.
    pub witness_keys: Vec<crate::note::VerifierKey>,
    /// How long to wait after new checkpoints before pushing (lets a burst settle).
    pub linger: Duration,
    /// Per-call timeout.
    pub timeout: Duration,
}

/// A witness's endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// As configured.
    pub endpoint: String,
    /// `HOST:PORT` (resolved when connecting).
    pub authority: String,
    /// `https`: mTLS with SPIFFE; `http`: plaintext (loopback, development only).
    pub tls: bool,
}

impl SyncSettings {
    /// Checks a `[multi_region]` section: `Ok(None)` unless sync is enabled. Errors name the key.
    pub fn from_section(
        m: &crate::config::MultiRegionSection,
    ) -> Result<Option<SyncSettings>, (String, String)> {
        let bad = |k: &str, msg: String| (k.to_owned(), msg);
        let mut peers = Vec::new();
        for (i, e) in m.receipt_sync_endpoints.iter().flatten().enumerate() {
            let key = format!("receipt_sync_endpoints[{i}]");
            let (tls, rest) = if let Some(r) = e.strip_prefix("https://") {
                (true, r)
            } else if let Some(r) = e.strip_prefix("http://") {
                (false, r)
            } else {
                return Err(bad(&key, format!("{e:?}: expected https://HOST:PORT")));
            };
            let rest = rest.trim_end_matches('/');
            let port_ok = rest
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !port_ok {
                return Err(bad(&key, format!("{e:?}: expected https://HOST:PORT")));
            }
            peers.push(Peer {
                endpoint: e.clone(),
                authority: rest.to_owned(),
                tls,
            });
        }
        let witnesses = peers.len();
        let quorum = m.quorum.unwrap_or(witnesses / 2 + 1);
        if quorum == 0 || (witnesses > 0 && quorum > witnesses) {
            return Err(bad(
                "quorum",
                format!(
                    "{quorum} is out of range (1-{witnesses}: witness cosignatures, one per witness in receipt_sync_endpoints)"
                ),
            ));
        }
        let batch_size = m.batch_size.unwrap_or(1000);
        if !(1..=10_000).contains(&batch_size) {
            return Err(bad(
                "batch_size",
                format!("{batch_size} is out of range (1-10000)"),
            ));
        }
        let mut witness_keys = Vec::new();
        for (i, k) in m.witness_keys.iter().flatten().enumerate() {
            let key = crate::note::VerifierKey::parse(k)
                .map_err(|e| bad(&format!("witness_keys[{i}]"), e))?;
            if key.alg != crate::note::ALG_COSIGNATURE_V1 {
                return Err(bad(
                    &format!("witness_keys[{i}]"),
                    "is not a witness cosignature key (type 0x04)".into(),
                ));
            }
            witness_keys.push(key);
        }
        if m.cross_region_sync_enabled != Some(true) {
            return Ok(None);
        }
        let region = m.region.clone().filter(|r| valid_region(r)).ok_or_else(|| {
            bad("region", "is required with cross_region_sync_enabled: letters, digits, '-', '_' (e.g. \"eu-west-1\")".into())
        })?;
        if peers.is_empty() {
            return Err(bad(
                "receipt_sync_endpoints",
                "is empty: cross_region_sync_enabled needs at least one witness endpoint".into(),
            ));
        }
        Ok(Some(SyncSettings {
            region,
            peers,
            quorum,
            witness_keys,
            linger: Duration::from_millis(m.batch_linger_ms.unwrap_or(20)),
            timeout: Duration::from_millis(m.timeout_ms.unwrap_or(5000)),
        }))
    }
}

/// Whether `r` is a usable region name (it names a file).
pub fn valid_region(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 64
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
