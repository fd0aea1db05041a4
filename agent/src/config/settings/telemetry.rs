//! `[telemetry]`: OTLP/gRPC export of metrics and traces, checked once into
//! [`TelemetrySettings`].

use serde::Deserialize;
use std::{collections::BTreeMap, time::Duration};

/// Where a Weaver live-check receiver listens unless `weaver_live_check` names an endpoint.
pub const WEAVER_LIVE_CHECK_ENDPOINT: &str = "http://127.0.0.1:4317";
/// Default per-export timeout.
pub const DEFAULT_OTLP_TIMEOUT: Duration = Duration::from_secs(5);
/// Default metric export period.
pub const DEFAULT_EXPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Default bound of the span queue.
pub const DEFAULT_MAX_QUEUED_SPANS: usize = 2048;

/// `[telemetry]` as written: every key optional; export is off without `otlp_endpoint` or
/// `weaver_live_check`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    /// OTLP/gRPC collector endpoint (`http://HOST:PORT`, or `https://` with the system roots).
    pub otlp_endpoint: Option<String>,
    /// gRPC metadata sent with every export (`authorization`, tenant headers).
    pub otlp_headers: Option<BTreeMap<String, String>>,
    /// Per-export timeout, ms (default 5000, 1–60000).
    pub otlp_timeout_ms: Option<u64>,
    /// Extra resource attributes (`deployment.environment.name = "prod"`).
    pub resource_attributes: Option<BTreeMap<String, String>>,
    /// Fraction of traces started by the agent that are sampled, 0.0–1.0 (default 1.0). A
    /// caller's `traceparent` decides for its own trace (parent-based).
    pub sampling_ratio: Option<f64>,
    /// Metric export period, ms (default 10000, 100–3600000).
    pub export_interval_ms: Option<u64>,
    /// Spans waiting for export at most (default 2048, 1–65536); more are dropped and counted.
    pub max_queued_spans: Option<usize>,
    /// `true`: export to a Weaver live-check receiver on `127.0.0.1:4317`; or its endpoint.
    pub weaver_live_check: Option<LiveCheck>,
}

/// `weaver_live_check = true` or `weaver_live_check = "http://HOST:PORT"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveCheck {
    /// On (the default endpoint) or off.
    Enabled(bool),
    /// The receiver's endpoint.
    Endpoint(String),
}

impl<'de> Deserialize<'de> for LiveCheck {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = LiveCheck;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or a live-check endpoint \"http://HOST:PORT\"")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<LiveCheck, E> {
                Ok(LiveCheck::Enabled(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<LiveCheck, E> {
                Ok(LiveCheck::Endpoint(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// What OTLP export runs with; `None` in [`super::Settings`] when export is off.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    /// The collector (or live-check receiver) endpoint, `http://` or `https://`.
    pub endpoint: String,
    /// gRPC metadata sent with every export, names lowercase.
    pub headers: BTreeMap<String, String>,
    /// Per-export timeout.
    pub timeout: Duration,
    /// Resource attributes added to (and overriding) the agent's own.
    pub resource_attributes: BTreeMap<String, String>,
    /// Ratio of root traces sampled.
    pub sampling_ratio: f64,
    /// Metric export period.
    pub export_interval: Duration,
    /// Bound of the span queue.
    pub max_queued_spans: usize,
    /// Export goes to a Weaver live-check receiver.
    pub weaver_live_check: bool,
}

fn check_endpoint(key: &str, e: &str) -> Result<(), (String, String)> {
    let rest = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"));
    match rest {
        Some(hp) if !hp.is_empty() && !hp.contains('/') && !hp.contains(char::is_whitespace) => {
            Ok(())
        }
        _ => Err((
            key.into(),
            format!("{e:?} is not an OTLP/gRPC endpoint: expected http://HOST:PORT or https://HOST:PORT (no path)"),
        )),
    }
}

fn valid_header_name(n: &str) -> bool {
    !n.is_empty()
        && !n.ends_with("-bin")
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

fn valid_attribute_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 255
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._".contains(&b))
}

impl TelemetrySettings {
    /// Checks `[telemetry]`; `Ok(None)` when export is off. Errors name the key (without the
    /// `telemetry.` prefix) and say what is expected.
    pub fn from_section(s: &TelemetrySection) -> Result<Option<Self>, (String, String)> {
        if let Some(e) = &s.otlp_endpoint {
            check_endpoint("otlp_endpoint", e)?;
        }
        let live = match &s.weaver_live_check {
            None | Some(LiveCheck::Enabled(false)) => None,
            Some(LiveCheck::Enabled(true)) => Some(WEAVER_LIVE_CHECK_ENDPOINT.to_owned()),
            Some(LiveCheck::Endpoint(e)) => {
                check_endpoint("weaver_live_check", e)?;
                Some(e.clone())
            }
        };
        let mut headers = BTreeMap::new();
        for (k, v) in s.otlp_headers.iter().flatten() {
            let name = k.to_ascii_lowercase();
            if !valid_header_name(&name) {
                return Err((
                    format!("otlp_headers.{k}"),
                    "not a gRPC metadata name: letters, digits, '-', '_' and '.', not ending in -bin".into(),
                ));
            }
            if v.is_empty() || !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return Err((
                    format!("otlp_headers.{k}"),
                    "the value must be non-empty printable ASCII".into(),
                ));
            }
            headers.insert(name, v.clone());
        }
        let timeout = match s.otlp_timeout_ms {
            None => DEFAULT_OTLP_TIMEOUT,
            Some(ms @ 1..=60_000) => Duration::from_millis(ms),
            Some(ms) => {
                return Err((
                    "otlp_timeout_ms".into(),
                    format!("{ms} is out of range (1-60000)"),
                ))
            }
        };
        for (k, v) in s.resource_attributes.iter().flatten() {
            if !valid_attribute_name(k) {
                return Err((
                    format!("resource_attributes.{k}"),
                    "not an attribute name: lowercase letters, digits, '.' and '_' (like deployment.environment.name)".into(),
                ));
            }
            if v.is_empty() {
                return Err((
                    format!("resource_attributes.{k}"),
                    "the value is empty".into(),
                ));
            }
        }
        let sampling_ratio = match s.sampling_ratio {
            None => 1.0,
            Some(r) if (0.0..=1.0).contains(&r) => r,
            Some(r) => {
                return Err((
                    "sampling_ratio".into(),
                    format!("{r} is out of range (0.0-1.0)"),
                ))
            }
        };
        let export_interval = match s.export_interval_ms {
            None => DEFAULT_EXPORT_INTERVAL,
            Some(ms @ 100..=3_600_000) => Duration::from_millis(ms),
            Some(ms) => {
                return Err((
                    "export_interval_ms".into(),
                    format!("{ms} is out of range (100-3600000)"),
                ))
            }
        };
        let max_queued_spans = match s.max_queued_spans {
            None => DEFAULT_MAX_QUEUED_SPANS,
            Some(n @ 1..=65_536) => n,
            Some(n) => {
                return Err((
                    "max_queued_spans".into(),
                    format!("{n} is out of range (1-65536)"),
                ))
            }
        };
        let (endpoint, weaver_live_check) =
            match (&s.otlp_endpoint, live) {
                (Some(_), Some(_)) => return Err((
                    "weaver_live_check".into(),
                    "otlp_endpoint is also set; export goes to one place: remove one of the two"
                        .into(),
                )),
                (Some(e), None) => (e.clone(), false),
                (None, Some(e)) => (e, true),
                (None, None) => return Ok(None),
            };
        Ok(Some(TelemetrySettings {
            endpoint,
            headers,
            timeout,
            resource_attributes: s.resource_attributes.clone().unwrap_or_default(),
            sampling_ratio,
            export_interval,
            max_queued_spans,
            weaver_live_check,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(toml_text: &str) -> TelemetrySection {
        toml::from_str(toml_text).expect("test section parses")
    }

    #[test]
    fn off_without_an_endpoint() {
        assert_eq!(TelemetrySettings::from_section(&section("")), Ok(None));
        let s = section("weaver_live_check = false\nsampling_ratio = 0.5");
        assert_eq!(TelemetrySettings::from_section(&s), Ok(None));
    }

    #[test]
    fn live_check_is_a_bool_or_an_endpoint() {
        let e = toml::from_str::<TelemetrySection>("weaver_live_check = 5").expect_err("refused");
        assert!(
            e.to_string()
                .contains("true, false or a live-check endpoint"),
            "{e}"
        );
    }

    #[test]
    fn live_check_defaults_to_4317() {
        let s = TelemetrySettings::from_section(&section("weaver_live_check = true"))
            .expect("valid")
            .expect("on");
        assert_eq!(s.endpoint, "http://127.0.0.1:4317");
        assert!(s.weaver_live_check);
        let s = TelemetrySettings::from_section(&section(
            "weaver_live_check = \"http://10.0.0.1:4999\"",
        ))
        .expect("valid")
        .expect("on");
        assert_eq!(s.endpoint, "http://10.0.0.1:4999");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("otlp_endpoint = \"collector:4317\"", "otlp_endpoint"),
            ("otlp_endpoint = \"http://c:4317/v1\"", "otlp_endpoint"),
            (
                "otlp_endpoint = \"http://c:4317\"\notlp_timeout_ms = 0",
                "otlp_timeout_ms",
            ),
            (
                "otlp_endpoint = \"http://c:4317\"\nsampling_ratio = 1.5",
                "sampling_ratio",
            ),
            (
                "otlp_endpoint = \"http://c:4317\"\notlp_headers = { \"x y\" = \"1\" }",
                "otlp_headers.x y",
            ),
            (
                "otlp_endpoint = \"http://c:4317\"\nresource_attributes = { \"Env\" = \"p\" }",
                "resource_attributes.Env",
            ),
            (
                "otlp_endpoint = \"http://c:4317\"\nweaver_live_check = true",
                "weaver_live_check",
            ),
            (
                "otlp_endpoint = \"http://c:4317\"\nmax_queued_spans = 0",
                "max_queued_spans",
            ),
            (
                "otlp_endpoint = \"http://c:4317\"\nexport_interval_ms = 5",
                "export_interval_ms",
            ),
        ] {
            let e = TelemetrySettings::from_section(&section(text)).expect_err(text);
            assert_eq!(e.0, key, "{text}: {}", e.1);
        }
    }
}
