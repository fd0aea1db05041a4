//! Admission rules and the values they are made of: runtime classes, actions, prefixes, ports,
//! cgroup paths. Each value validates itself while it is parsed, so a TOML or gRPC parser reports
//! its errors where the value was written.

use super::workload::{ContainerName, LabelSelector, Namespaces, WorkloadSelector};
use ipnet::IpNet;
use serde::{de, Deserialize, Deserializer};
use std::{fmt, net::SocketAddr, str::FromStr};

/// `enforce` or `audit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny rules refuse connects with EPERM.
    #[default]
    Enforce,
    /// Deny rules admit and count the connect as a would-be deny.
    Audit,
}

/// Action for connects that match no rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// Admit.
    #[default]
    Allow,
    /// Refuse (in enforce mode).
    Deny,
}

/// A rule's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Admit.
    Allow,
    /// Refuse with EPERM (in enforce mode; counted as audit in audit mode).
    Deny,
    /// Admit and count as a would-be deny.
    Audit,
}

/// Runtime class: hot (R1), warm (W1) or cold (C1) path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub enum Class {
    /// Hot path.
    #[serde(alias = "r1")]
    R1,
    /// Warm path.
    #[serde(alias = "w1")]
    W1,
    /// Cold path.
    #[serde(alias = "c1")]
    C1,
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Class::R1 => "R1",
            Class::W1 => "W1",
            Class::C1 => "C1",
        })
    }
}

impl Class {
    /// Every class, hottest first.
    pub const ALL: [Class; 3] = [Class::R1, Class::W1, Class::C1];

    /// The class's position in [`Class::ALL`] (R1 = 0, W1 = 1, C1 = 2), for per-class arrays.
    pub fn index(self) -> usize {
        match self {
            Class::R1 => 0,
            Class::W1 => 1,
            Class::C1 => 2,
        }
    }

    /// The name used in configs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::R1 => "R1",
            Class::W1 => "W1",
            Class::C1 => "C1",
        }
    }
}

/// A rule's transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP and UDP.
    #[default]
    Any,
    /// TCP only.
    Tcp,
    /// UDP only (`connect()` on a UDP socket).
    Udp,
}

/// A destination prefix in canonical form (no host bits set), IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let net: IpNet = match s.parse() {
            Ok(net) => net,
            // A bare address means a single host.
            Err(_) => match s.parse::<std::net::IpAddr>() {
                Ok(addr) => IpNet::from(addr),
                Err(_) => return Err(cidr_problem(s)),
            },
        };
        if net.trunc() != net {
            return Err(format!(
                "\"{s}\" has host bits set beyond the /{} prefix; did you mean \"{}\"?",
                net.prefix_len(),
                net.trunc()
            ));
        }
        // IPv4 has one written form: "010.0.0.0/8" is refused rather than read as 10.0.0.0/8
        // (some tools read a leading zero as octal).
        if let IpNet::V4(v4) = net {
            let canonical = if s.contains('/') {
                v4.to_string()
            } else {
                v4.addr().to_string()
            };
            if s != canonical {
                return Err(format!(
                    "\"{s}\" is not in canonical form (no leading zeros or spaces); write \"{canonical}\""
                ));
            }
        }
        // The kernel judges IPv4-mapped destinations (::ffff:a.b.c.d, dual-stack sockets) by
        // the IPv4 rules, so a rule for a mapped prefix would never match.
        if let IpNet::V6(v6) = net {
            let mapped = v6.prefix_len() >= 96 && v6.addr().to_ipv4_mapped().is_some();
            if mapped {
                let v4 = ipnet::Ipv4Net::new(
                    v6.addr()
                        .to_ipv4_mapped()
                        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
                    v6.prefix_len() - 96,
                )
                .map_or_else(|_| "the IPv4 prefix".to_owned(), |n| format!("\"{n}\""));
                return Err(format!(
                    "\"{s}\" is an IPv4-mapped IPv6 prefix: connects to ::ffff:a.b.c.d are judged by IPv4 rules, \
                     so it would never match; write {v4}"
                ));
            }
        }
        Ok(Cidr(net))
    }
}

fn cidr_problem(s: &str) -> String {
    if let Some((addr, len)) = s.split_once('/') {
        if let Ok(addr) = addr.parse::<std::net::IpAddr>() {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            return match len.parse::<u32>() {
                Ok(n) => format!(
                    "\"{s}\" is not a valid prefix: length {n} exceeds {max} for {}",
                    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
                Err(_) => format!("\"{s}\" is not a valid prefix: \"{len}\" is not a length"),
            };
        }
        return format!("\"{s}\" is not a valid prefix: \"{addr}\" is not an IP address");
    }
    format!("\"{s}\" is not a valid prefix (expected e.g. \"10.0.0.0/8\" or \"fd00::/8\")")
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An inclusive port range, from `"443"`, `"8000-8080"` or the integer `443`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

impl PortRange {
    /// Every port.
    pub const ALL: PortRange = PortRange {
        lo: 0,
        hi: u16::MAX,
    };
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| -> Result<u16, String> {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("port range \"{s}\": \"{p}\" is not a port (0-65535)"))
        };
        match s.split_once('-') {
            None => port(s).map(|p| PortRange { lo: p, hi: p }),
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(format!(
                        "port range \"{s}\" is out of order: {lo} > {hi}; write \"{hi}-{lo}\""
                    ));
                }
                Ok(PortRange { lo, hi })
            }
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port or port range such as \"443\" or \"8000-8080\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
                u16::try_from(v)
                    .map(|p| PortRange { lo: p, hi: p })
                    .map_err(|_| E::custom(format!("{v} is not a port (0-65535)")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRange, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

deserialize_from_str!(Cidr, "a prefix such as \"10.0.0.0/8\" or \"fd00::/8\"");
deserialize_from_str!(RuleName, "a rule name");
deserialize_from_str!(CgroupPath, "a cgroup path relative to agent.cgroup_root");

/// A rule name: 1 to 63 characters from `A-Z a-z 0-9 . _ -` (it becomes a metric label value).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleName(String);

impl FromStr for RuleName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 63 {
            return Err(format!("rule name \"{s}\" must be 1 to 63 characters long"));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
        {
            return Err(format!(
                "rule name \"{s}\" contains {c:?}; use only letters, digits, '.', '_' and '-'"
            ));
        }
        Ok(RuleName(s.to_owned()))
    }
}

impl RuleName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A cgroup path relative to the agent's cgroup root, e.g. `kubepods/besteffort`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupPath(String);

impl FromStr for CgroupPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let trimmed = s.trim_end_matches('/');
        if trimmed.starts_with('/') {
            return Err(format!(
                "cgroup \"{s}\" must be relative to agent.cgroup_root (drop the leading '/')"
            ));
        }
        if trimmed.is_empty() {
            return Err("cgroup \"\" is empty; omit the key to match every cgroup".to_owned());
        }
        if let Some(bad) = trimmed
            .split('/')
            .find(|c| c.is_empty() || *c == "." || *c == "..")
        {
            return Err(format!("cgroup \"{s}\" has an invalid component \"{bad}\""));
        }
        Ok(CgroupPath(trimmed.to_owned()))
    }
}

impl CgroupPath {
    /// A path known valid when written (a constant such as `"kubepods"`), unchecked.
    pub fn constant(path: &'static str) -> CgroupPath {
        CgroupPath(path.to_owned())
    }

    /// The path, without a trailing '/'.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Number of components (`a/b` has 2).
    pub fn depth(&self) -> usize {
        self.0.split('/').count()
    }

    /// Whether `self` is `other` or one of its ancestors.
    pub fn contains(&self, other: &CgroupPath) -> bool {
        other.0 == self.0
            || (other.0.starts_with(&self.0) && other.0.as_bytes().get(self.0.len()) == Some(&b'/'))
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One admission rule, as written in `[[policy.rules]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique name; it labels the rule's hit counter.
    pub name: RuleName,
    /// `allow`, `deny` or `audit`.
    pub action: Action,
    /// Runtime class of the connects it matches (default: `agent.default_class`).
    #[serde(default)]
    pub class: Option<Class>,
    /// Cgroup subtree it applies to, relative to the cgroup root (default: every cgroup).
    #[serde(default)]
    pub cgroup: Option<CgroupPath>,
    /// Kubernetes namespace(s) of the pods it applies to (a workload selector).
    #[serde(default)]
    pub namespace: Option<Namespaces>,
    /// Labels of the pods it applies to (a workload selector).
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
    /// Only this container of the selected pods (a workload selector).
    #[serde(default)]
    pub container: Option<ContainerName>,
    /// Destination prefixes, IPv4 and/or IPv6.
    pub cidrs: Vec<Cidr>,
    /// Destination ports (default: all).
    #[serde(default)]
    pub ports: Option<Vec<PortRange>>,
    /// `tcp`, `udp` or `any` (default).
    #[serde(default)]
    pub protocol: Protocol,
    /// Under the Degrade strategy, where this rule's connects go while their class is degraded
    /// (the lower tier), e.g. `"127.0.0.1:9090"` or `"[::1]:9090"`.
    #[serde(default)]
    pub park_to: Option<SocketAddr>,
}

impl RuleSpec {
    /// The workloads the rule selects, if it names any of `namespace`, `pod_selector` or
    /// `container`; such a rule applies to the selected pods' (or containers') cgroups.
    pub fn workloads(&self) -> Option<WorkloadSelector> {
        if self.namespace.is_none() && self.pod_selector.is_none() && self.container.is_none() {
            return None;
        }
        Some(WorkloadSelector {
            namespaces: self.namespace.clone().map(|n| n.0).unwrap_or_default(),
            pod_selector: self.pod_selector.clone(),
            container: self.container.clone(),
        })
    }

    /// Checks what the rule applies to: a cgroup or workloads, not both, and a well-formed
    /// selector. `Err` names the key and why.
    pub fn check_subject(&self) -> Result<(), String> {
        if self.cgroup.is_some() && self.workloads().is_some() {
            return Err("cgroup: a rule applies to a cgroup or to workloads (namespace, pod_selector, container), not both; split it into two rules".to_owned());
        }
        if let Some(s) = &self.pod_selector {
            s.validate().map_err(|e| format!("pod_selector.{e}"))?;
        }
        Ok(())
    }
}

/// Which kernel latency histogram a class's SLO ceiling is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatencySource {
    /// TCP handshake latency (`connect()` to ESTABLISHED), per new connection.
    #[default]
    Handshake,
    /// Smoothed RTT samples of established connections.
    Rtt,
}

impl LatencySource {
    /// The name used in configuration and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            LatencySource::Handshake => "handshake",
            LatencySource::Rtt => "rtt",
        }
    }
}

/// SLO admission strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdmissionStrategy {
    /// Refuse.
    Strict,
    /// Park to a lower tier.
    Degrade,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_canonical_and_never_unmatchable() {
        for ok in [
            "10.0.0.0/8",
            "10.1.2.3",
            "0.0.0.0/0",
            "fd00::/8",
            "::/0",
            "::1",
            "::/96",
            "::fffe:0:0/95",
        ] {
            assert!(ok.parse::<Cidr>().is_ok(), "{ok}");
        }
        for (bad, needle) in [
            ("010.0.0.0/8", "write \"10.0.0.0/8\""),
            ("10.0.0.01", "not a valid prefix"),
            ("10.0.0.0/08", "write \"10.0.0.0/8\""),
            ("::ffff:0:0/96", "write \"0.0.0.0/0\""),
            ("::ffff:127.0.0.2/128", "write \"127.0.0.2/32\""),
            ("::ffff:127.0.0.2", "IPv4-mapped"),
            ("10.0.0.1/8", "host bits"),
        ] {
            let e = bad.parse::<Cidr>().expect_err(bad);
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
