//! The live policy, kept on the node under `agent.state_dir`, so that a restart (SIGKILL,
//! reboot, upgrade) re-adopts exactly what was live, with the same generation, instead of the
//! configuration file's policy.
//!
//! One file, `live-policy.json`, replaced atomically (write to a temporary file, fsync,
//! rename, fsync the directory) after every switch and before the caller is answered.

use super::ControlError;
use crate::{config::Config, policy::Policy};
use serde::{Deserialize, Serialize};
use std::{
    io::Write,
    path::{Path, PathBuf},
};

/// What set the live policy.
pub const SOURCES: [&str; 5] = ["file", "apply", "rollback", "rollout", "bundle"];

/// The persisted live policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRecord {
    /// Its generation.
    pub generation: u64,
    /// `Policy::digest` of the document.
    pub digest: String,
    /// What set it: one of [`SOURCES`].
    pub source: String,
    /// Digest of the configuration file's policy when it was last applied: a file whose
    /// policy has another digest was changed by the operator, and is applied at start.
    pub file_digest: String,
    /// The document as configuration text (`Policy::to_config_toml`).
    pub policy: String,
}

impl LiveRecord {
    /// The document, checked as a configuration is (so a damaged record is refused, not
    /// half-applied). `settings` supplies what the document does not carry (heat, histograms).
    pub fn policy(&self, settings: &Policy) -> Result<Policy, ControlError> {
        let config = Config::parse(&self.policy, "live-policy.json (its policy)")
            .map_err(|e| ControlError::LiveState(e.to_string()))?;
        let p = config.policy();
        Ok(Policy {
            heat: settings.heat,
            heat_sample_every: settings.heat_sample_every,
            histograms: settings.histograms,
            histogram_interval_us: settings.histogram_interval_us,
            verdict_events: settings.verdict_events,
            ..p
        })
    }
}

/// Where the live policy is kept.
#[derive(Debug, Clone)]
pub struct LiveStore {
    path: PathBuf,
}

impl LiveStore {
    /// The store in `state_dir` (which the agent has created and checked).
    pub fn new(state_dir: &Path) -> Self {
        LiveStore {
            path: state_dir.join("live-policy.json"),
        }
    }

    /// Its file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record, if one was saved. A file that cannot be read or parsed is an error naming
    /// the file: the agent does not guess which policy should be live.
    pub fn load(&self) -> Result<Option<LiveRecord>, ControlError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error(format!("cannot be read: {e}"))),
        };
        let record: LiveRecord = serde_json::from_str(&text)
            .map_err(|e| self.error(format!("is not a live-policy record: {e}")))?;
        if !SOURCES.contains(&record.source.as_str()) {
            return Err(self.error(format!(
                "names an unknown source {:?} (expected one of {})",
                record.source,
                SOURCES.join(", ")
            )));
        }
        Ok(Some(record))
    }

    /// Replaces the record atomically.
    pub fn save(&self, record: &LiveRecord) -> Result<(), ControlError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(record).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| self.error(format!("cannot be written: {e}")))
    }

    fn error(&self, what: String) -> ControlError {
        ControlError::LiveState(format!(
            "{} {what}; it keeps the live policy across restarts. Fix or remove it (the agent then applies the configuration file's policy)",
            self.path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
[agent]
mode = "audit"
default_action = "deny"
default_class = "W1"
[[policy.rules]]
name = "db.primary"
action = "deny"
class = "R1"
cgroup = "kubepods/besteffort"
cidrs = ["10.0.0.0/8", "fd00::/8"]
ports = ["5432", "8000-8080"]
protocol = "tcp"
[[policy.rules]]
name = "dns"
action = "audit"
cidrs = ["0.0.0.0/0"]
protocol = "udp"
park_to = "127.0.0.1:5353"
"#;

    #[test]
    fn a_policy_reads_back_from_its_configuration_text() {
        let policy = Config::parse(TEXT, "t").expect("parses").policy();
        let record = LiveRecord {
            generation: 7,
            digest: policy.digest(),
            source: "apply".into(),
            file_digest: String::new(),
            policy: policy.to_config_toml(),
        };
        let back = record.policy(&policy).expect("reads back");
        assert_eq!(back, policy);
        assert_eq!(back.digest(), record.digest);
    }

    #[test]
    fn the_record_survives_a_save_and_damage_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LiveStore::new(dir.path());
        assert_eq!(store.load().expect("nothing yet"), None);
        let policy = Config::parse(TEXT, "t").expect("parses").policy();
        let record = LiveRecord {
            generation: 3,
            digest: policy.digest(),
            source: "file".into(),
            file_digest: policy.digest(),
            policy: policy.to_config_toml(),
        };
        store.save(&record).expect("save");
        assert_eq!(store.load().expect("load"), Some(record));
        std::fs::write(store.path(), "{ not json").expect("damage");
        let e = store.load().expect_err("damaged").to_string();
        assert!(
            e.contains("live-policy.json is not a live-policy record"),
            "{e}"
        );
        assert!(e.contains("Fix or remove it"), "{e}");
    }
}
