//! The agent's configuration: one TOML file, parsed strictly.
//!
//! Top-level tables: `[agent]`, `[policy]` (with `[[policy.rules]]`), `[slo]`, `[spiffe]`, `[kms]`,
//! `[multi_region]`, `[promotion]`. The readiness plan's `[sidecar]` and `[sidecar.X]` are
//! accepted as aliases of `[agent]` and `[X]`, so its example configuration loads unchanged.
//!
//! Every value is checked while parsing (unknown keys, bad prefixes, port ranges, enum values), so
//! errors carry the file, line and column of the offending value; checks across values
//! (duplicate rule names) point at the line of the second occurrence. A config that fails
//! validation changes nothing: callers get a [`ConfigError`] before anything is attached.

mod schema;

pub use schema::{
    Action, AdmissionStrategy, AgentSection, CgroupPath, Cidr, Class, Config, DefaultAction,
    KmsSection, Mode, MultiRegionSection, PolicySection, PortRange, PromotionSection, Protocol,
    RuleName, RuleSpec, SloSection, SpiffeSection,
};

use std::path::{Path, PathBuf};

/// The configuration used when `knhk-agent run` is given no `--config`: audit mode, loopback
/// listeners, one example audit rule. Safe on a laptop.
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

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Config {
        // The embedded default is covered by a unit test; failing here is a build defect.
        Self::parse(EMBEDDED_DEFAULT, "<embedded default>")
            .unwrap_or_else(|e| panic!("the embedded default config is invalid: {e}"))
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
