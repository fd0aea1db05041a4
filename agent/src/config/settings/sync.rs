//! `[multi_region]` → [`SyncSettings`].

use std::time::Duration;

/// Validated `[multi_region]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSettings {
    /// This region.
    pub region: String,
    /// Peer endpoints.
    pub peers: Vec<Peer>,
    /// Regions (this one included) that must hold a checkpoint for it to be committed.
    pub quorum: usize,
    /// Receipts per batch.
    pub batch_size: usize,
    /// How long to wait for more receipts before sending a partial batch.
    pub linger: Duration,
    /// Per-call timeout.
    pub timeout: Duration,
}

/// A peer region's endpoint.
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
        let regions = peers.len() + 1;
        let quorum = m.quorum.unwrap_or(regions / 2 + 1);
        if quorum == 0 || quorum > regions {
            return Err(bad(
                "quorum",
                format!(
                    "{quorum} is out of range (1-{regions}: this region and its {} peers)",
                    peers.len()
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
        if m.cross_region_sync_enabled != Some(true) {
            return Ok(None);
        }
        let region = m.region.clone().filter(|r| valid_region(r)).ok_or_else(|| {
            bad("region", "is required with cross_region_sync_enabled: letters, digits, '-', '_' (e.g. \"eu-west-1\")".into())
        })?;
        Ok(Some(SyncSettings {
            region,
            peers,
            quorum,
            batch_size,
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
