//! The agent's configuration: one TOML file, parsed strictly.
//!
//! Top-level tables: `[agent]`, `[policy]` (with `[[policy.rules]]`), `[slo]`, `[spiffe]`, `[kms]`,
//! `[multi_region]`, `[promotion]`, `[bundle]`, `[archive]`. The readiness plan's `[sidecar]` and `[sidecar.X]` are
//! accepted as aliases of `[agent]` and `[X]`, so its example configuration loads unchanged.
//!
//! Every value is checked while parsing (unknown keys, bad prefixes, port ranges, enum values), so
//! errors carry the file, line and column of the offending value; checks across values
//! (duplicate rule names) point at the line of the second occurrence. A config that fails
//! validation changes nothing: callers get a [`ConfigError`] before anything is attached.

mod schema;
pub mod settings;

pub use schema::{
    AgentSection, ApiListen, AuthorizedIds, CgroupDriver, Config, IdentitySource, KmsSection,
    KubernetesSection, MultiRegionSection, PolicySection, PromotionSection, ReceiptsSection,
    SloSection, SpiffeSection, DEFAULT_API_SOCKET, DEFAULT_LISTEN_ADDRESS,
};
pub use settings::{
    ArchiveSection, ArchiveSettings, BeatSettings, BundleKey, BundleSection, BundleSettings,
    FilePaths, IdentitySettings, Peer, PromotionSettings, ReceiptSettings, Settings,
    SignerSettings, SyncSettings, TelemetrySection, TelemetrySettings,
};

use std::path::{Path, PathBuf};

/// The configuration used when `knhk-agent run` is given no `--config`: audit mode, the API on
/// its root-only Unix socket, metrics on loopback, one example audit rule. Safe on a laptop.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed, or a value has the wrong type or an invalid value.
    #[error("invalid config {origin}: {message}")]
    Parse {
        /// The file name, or `<embedded default>`.
        origin: String,
        /// The parser's message, with line, column and a caret under the fault.
        message: String,
    },
    /// An environment override is invalid.
    #[error("invalid config: environment variable {var}={value:?}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// The values parse but contradict each other.
    #[error("invalid config {origin}, line {line}: {key}: {message}")]
    Invalid {
        /// The file name, or `<embedded default>`.
        origin: String,
        /// 1-based line of the offending value.
        line: usize,
        /// Dotted key path, e.g. `policy.rules[3].name`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// The largest configuration or policy file read (64 MiB): the documented maximum policy,
/// 100,000 rules, is about 10 MB of TOML.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

impl Config {
    /// Reads and validates the config file at `path`, with the process's `KNHK_*` environment
    /// overrides applied (see [`Config::parse_with_env`]).
    ///
    /// Only a regular file of at most [`MAX_CONFIG_BYTES`] is read: a FIFO, device, socket or directory is
    /// refused without reading it (opened non-blocking, so a FIFO without a writer cannot hang),
    /// and a larger file is refused with its size.
    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        use std::{io::Read, os::unix::fs::FileTypeExt, os::unix::fs::OpenOptionsExt};
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let refuse =
            |why: String| read_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, why));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        let kind = meta.file_type();
        let what = if kind.is_file() {
            None
        } else if kind.is_dir() {
            Some("a directory")
        } else if kind.is_fifo() {
            Some("a FIFO (named pipe)")
        } else if kind.is_char_device() {
            Some("a character device")
        } else if kind.is_block_device() {
            Some("a block device")
        } else if kind.is_socket() {
            Some("a socket")
        } else {
            Some("not a file")
        };
        if let Some(what) = what {
            return Err(refuse(format!(
                "it is {what}, not a regular file; a configuration must be a regular file"
            )));
        }
        let too_large = |size: u64| {
            refuse(format!(
                "it is {size} bytes, more than the {MAX_CONFIG_BYTES}-byte ({} MiB) limit for a configuration or policy file",
                MAX_CONFIG_BYTES >> 20
            ))
        };
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(too_large(meta.len()));
        }
        // The file may grow after the check: read at most one byte past the limit.
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        (&mut file)
            .take(MAX_CONFIG_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(too_large(bytes.len() as u64));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            read_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "it is not UTF-8 text (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                ),
            ))
        })?;
        Self::parse_with_env(&text, &path.display().to_string(), std::env::vars())
    }

    /// The embedded default configuration, with the process's `KNHK_*` environment overrides.
    pub fn load_embedded_default() -> Result<Config, ConfigError> {
        Self::parse_with_env(EMBEDDED_DEFAULT, "<embedded default>", std::env::vars())
    }

    /// The embedded default configuration, without environment overrides.
    pub fn embedded_default() -> Config {
        // The embedded default is covered by a unit test; failing here is a build defect.
        Self::parse(EMBEDDED_DEFAULT, "<embedded default>")
            .unwrap_or_else(|e| panic!("the embedded default config is invalid: {e}"))
    }

    /// Parses `text`, then applies environment overrides from `vars`: a variable
    /// `KNHK_<TABLE>__<KEY>` sets `<key>` of `[<table>]` (for example `KNHK_AGENT__MODE=audit`,
    /// `KNHK_SLO__R1_P99_MAX_NS=200000`). Values are read as TOML values (`true`, `9464`,
    /// `["a", "b"]`), anything else as a string. Variables without `__` are not overrides. The
    /// file's own errors keep their lines; a bad override is reported by its variable name.
    pub fn parse_with_env(
        text: &str,
        origin: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let base = Self::parse(text, origin)?;
        let mut overrides: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("KNHK_") && k.contains("__"))
            .collect();
        if overrides.is_empty() {
            return Ok(base);
        }
        overrides.sort();
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        for (var, value) in overrides {
            let env_err = |message: String| ConfigError::Env {
                var: var.clone(),
                value: value.clone(),
                message,
            };
            let (section, key) = var["KNHK_".len()..]
                .split_once("__")
                .map(|(s, k)| (s.to_lowercase(), k.to_lowercase()))
                // Never absent (only names with `__` are kept above); "" would be refused below.
                .unwrap_or_default();
            let target = section_table(&mut table, &section).map_err(env_err)?;
            target.insert(key, env_value(&value));
            let rendered = toml::to_string(&table).map_err(|e| env_err(e.to_string()))?;
            match toml::from_str::<schema::RawConfig>(&rendered) {
                Err(e) => {
                    let mut message = e.message().to_owned();
                    if let Some(hint) = suggestion(e.message()) {
                        message.push_str(&format!("; did you mean `{hint}`?"));
                    }
                    return Err(env_err(message));
                }
                Ok(raw) => {
                    raw.normalize(&rendered, origin).map_err(|e| match e {
                        ConfigError::Invalid { key, message, .. } => {
                            env_err(format!("{key}: {message}"))
                        }
                        other => env_err(other.to_string()),
                    })?;
                }
            }
        }
        let rendered = toml::to_string(&table).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        Self::parse(&rendered, origin)
    }

    /// The policy this configuration describes: its rules with the `[agent]` settings that switch
    /// with them.
    pub fn policy(&self) -> crate::policy::Policy {
        use crate::model::FeatureFlag;
        let on = |f| {
            self.settings.promotion.flag_on(
                f,
                self.agent.heat_enabled,
                self.agent.histograms_enabled,
            )
        };
        crate::policy::Policy {
            rules: self.policy.rules.clone(),
            mode: self.agent.mode,
            default_action: self.agent.default_action,
            default_class: self.agent.default_class,
            heat: on(FeatureFlag::HeatTracking),
            heat_sample_every: self.agent.heat_sample_every,
            histograms: on(FeatureFlag::LatencyHistograms),
            histogram_interval_us: self.agent.histogram_interval_us,
            verdict_events: on(FeatureFlag::VerdictEvents),
        }
    }

    /// Parses and validates config text; `origin` names the source in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: schema::RawConfig = toml::from_str(text).map_err(|e| {
            let mut message = e.to_string().trim_end().to_owned();
            if let Some(hint) = suggestion(e.message()) {
                message.push_str(&format!("\nhelp: did you mean `{hint}`?"));
            }
            ConfigError::Parse {
                origin: origin.to_owned(),
                message,
            }
        })?;
        raw.normalize(text, origin)
    }
}

/// Top-level sections that environment overrides may address.
const SECTIONS: [&str; 11] = [
    "agent",
    "policy",
    "slo",
    "spiffe",
    "kms",
    "receipts",
    "multi_region",
    "promotion",
    "telemetry",
    "bundle",
    "archive",
];

/// The table an override of `section` goes to: the file's own form of it (`[sidecar]` for
/// `agent` when the file uses that alias; `[sidecar.slo]` for `slo` when nested), created if absent.
fn section_table<'a>(
    table: &'a mut toml::Table,
    section: &str,
) -> Result<&'a mut toml::Table, String> {
    if !SECTIONS.contains(&section) {
        let hint = SECTIONS
            .iter()
            .min_by_key(|s| strsim::damerau_levenshtein(s, section))
            .map(|s| format!("; did you mean KNHK_{}__...?", s.to_uppercase()))
            // No section to suggest (SECTIONS is never empty): no hint.
            .unwrap_or_default();
        return Err(format!(
            "unknown section `{section}` (expected one of {}){hint}",
            SECTIONS.join(", ")
        ));
    }
    let alias = if table.contains_key("sidecar") && !table.contains_key("agent") {
        "sidecar"
    } else {
        "agent"
    };
    let not_table = |name: &str| format!("[{name}] in the file is not a table");
    if section == "agent" {
        return table
            .entry(alias)
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| not_table(alias));
    }
    let nested = table
        .get(alias)
        .and_then(|a| a.as_table())
        .is_some_and(|a| a.contains_key(section))
        && !table.contains_key(section);
    let parent = if nested {
        table
            .get_mut(alias)
            .and_then(|a| a.as_table_mut())
            .ok_or_else(|| not_table(alias))?
    } else {
        table
    };
    parent
        .entry(section)
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .ok_or_else(|| not_table(section))
}

/// An override's value: a TOML value if it parses as one, else the raw string.
fn env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        // Not a TOML value: taken as a string, as documented.
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

/// For "unknown field `x`, expected one of `a`, `b`" (or "unknown variant"), the expected name
/// closest to `x`, if one is close enough to be a likely typo.
fn suggestion(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (given, expected) = rest.split_once('`')?;
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&given.to_lowercase(), &c.to_lowercase()),
                c,
            )
        })
        .filter(|(d, c)| *d <= (c.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_owned())
}

/// The 1-based line of byte offset `pos` in `text`.
pub(crate) fn line_of(text: &str, pos: usize) -> usize {
    text.as_bytes()[..pos.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests;
