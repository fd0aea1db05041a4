//! The last good bundle, kept under `agent.state_dir` as `bundle-last-good.json`: the object
//! exactly as fetched (envelope and signature), its URL and ETag. It is verified again at
//! start, with the key configured then.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::{
    io::Write,
    path::{Path, PathBuf},
};

/// What is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastGoodRecord {
    /// The bundle URL it was read from.
    pub url: String,
    /// Its ETag then.
    pub etag: Option<String>,
    /// When it was kept (Unix seconds).
    pub saved_at: f64,
    /// The object, base64.
    pub object: String,
}

impl LastGoodRecord {
    /// A record of `object` read from `url` with `etag`, now.
    pub fn new(url: &str, etag: Option<String>, object: &[u8]) -> LastGoodRecord {
        LastGoodRecord {
            url: url.into(),
            etag,
            saved_at: super::unix_now(),
            object: base64::engine::general_purpose::STANDARD.encode(object),
        }
    }

    /// The object's bytes.
    pub fn object(&self) -> Result<Vec<u8>, String> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.object)
            .map_err(|e| format!("the kept bundle's object is not base64: {e}"))
    }
}

/// The file.
#[derive(Debug, Clone)]
pub struct LastGood {
    path: PathBuf,
}

impl LastGood {
    /// In `state_dir`.
    pub fn new(state_dir: &Path) -> LastGood {
        LastGood {
            path: state_dir.join("bundle-last-good.json"),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record, if one was kept; an unreadable one is an error naming the file.
    pub fn load(&self) -> Result<Option<LastGoodRecord>, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{} cannot be read: {e}", self.path.display())),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            format!(
                "{} is not a last-good bundle record: {e}",
                self.path.display()
            )
        })
    }

    /// Replaces the record atomically (temporary file, fsync, rename, fsync of the directory).
    pub fn save(&self, record: &LastGoodRecord) -> Result<(), String> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(record).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| format!("{} cannot be written: {e}", self.path.display()))
    }
}
