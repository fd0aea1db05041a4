//! Kubernetes workloads as rule subjects: label selectors with Kubernetes semantics, and the pods
//! the node runs (the inventory that workload discovery reports and the policy compiler binds
//! selector rules to).

use super::{Action, CgroupPath};
use serde::{de, Deserialize, Deserializer};
use std::{collections::BTreeMap, fmt, str::FromStr};

/// A Kubernetes label selector (`matchLabels` and `matchExpressions`); all requirements must
/// hold. An empty selector matches every pod, as in Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    #[serde(default)]
    pub match_labels: BTreeMap<LabelKey, LabelValue>,
    /// Set-based requirements.
    #[serde(default)]
    pub match_expressions: Vec<LabelRequirement>,
}

impl LabelSelector {
    /// Whether a pod with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k.as_str()) == Some(&v.0))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Checks the requirements' shapes (values with `Exists`, none with `In`); `Err` says which
    /// requirement and why.
    pub fn validate(&self) -> Result<(), String> {
        for (i, r) in self.match_expressions.iter().enumerate() {
            r.validate()
                .map_err(|e| format!("match_expressions[{i}] (key \"{}\"): {e}", r.key))?;
        }
        Ok(())
    }

    /// A canonical one-line form, for policy digests and display:
    /// `k=v,k2=v2;key In (a,b);key Exists`.
    pub fn canonical(&self) -> String {
        let labels: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={}", v.0))
            .collect();
        let mut out = labels.join(",");
        for r in &self.match_expressions {
            out.push(';');
            out.push_str(&r.key.0);
            out.push(' ');
            out.push_str(r.operator.as_str());
            if !r.values.is_empty() {
                let mut values: Vec<&str> = r.values.iter().map(|v| v.0.as_str()).collect();
                values.sort_unstable();
                values.dedup();
                out.push_str(&format!(" ({})", values.join(",")));
            }
        }
        out
    }
}

/// One set-based requirement of a [`LabelSelector`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRequirement {
    /// The label key.
    pub key: LabelKey,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: LabelOperator,
    /// The values (required for `In`/`NotIn`, refused for `Exists`/`DoesNotExist`).
    #[serde(default)]
    pub values: Vec<LabelValue>,
}

impl LabelRequirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(self.key.as_str());
        match self.operator {
            LabelOperator::In => value.is_some_and(|v| self.values.iter().any(|w| &w.0 == v)),
            LabelOperator::NotIn => value.is_none_or(|v| self.values.iter().all(|w| &w.0 != v)),
            LabelOperator::Exists => value.is_some(),
            LabelOperator::DoesNotExist => value.is_none(),
        }
    }

    fn validate(&self) -> Result<(), String> {
        match (self.operator, self.values.is_empty()) {
            (LabelOperator::In | LabelOperator::NotIn, true) => Err(format!(
                "operator {} needs at least one value",
                self.operator.as_str()
            )),
            (LabelOperator::Exists | LabelOperator::DoesNotExist, false) => Err(format!(
                "operator {} takes no values (remove \"values\")",
                self.operator.as_str()
            )),
            _ => Ok(()),
        }
    }
}

/// A label selector operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelOperator {
    /// The label's value is one of the values.
    In,
    /// The label is absent or its value is none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl LabelOperator {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LabelOperator::In => "In",
            LabelOperator::NotIn => "NotIn",
            LabelOperator::Exists => "Exists",
            LabelOperator::DoesNotExist => "DoesNotExist",
        }
    }
}

impl FromStr for LabelOperator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "In" => Ok(LabelOperator::In),
            "NotIn" => Ok(LabelOperator::NotIn),
            "Exists" => Ok(LabelOperator::Exists),
            "DoesNotExist" => Ok(LabelOperator::DoesNotExist),
            _ => Err(format!(
                "unknown operator \"{s}\"; expected In, NotIn, Exists or DoesNotExist"
            )),
        }
    }
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of 1 to 63 characters
/// (alphanumerics, `-`, `_`, `.`, beginning and ending alphanumeric), as Kubernetes validates it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelKey(String);

impl LabelKey {
    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LabelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for LabelKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("label key is empty".to_owned());
        }
        let (prefix, name) = match s.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, s),
        };
        if let Some(p) = prefix {
            if p.is_empty() || p.len() > 253 || !p.split('.').all(dns_label) {
                return Err(format!(
                    "label key \"{s}\": prefix \"{p}\" is not a DNS subdomain (lowercase letters, digits, '-' and '.', at most 253 characters)"
                ));
            }
        }
        label_name(name).map_err(|e| format!("label key \"{s}\": {e}"))?;
        Ok(LabelKey(s.to_owned()))
    }
}

/// A label value: empty, or 1 to 63 characters (alphanumerics, `-`, `_`, `.`, beginning and
/// ending alphanumeric).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelValue(pub String);

impl FromStr for LabelValue {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.is_empty() {
            label_name(s).map_err(|e| format!("label value \"{s}\": {e}"))?;
        }
        Ok(LabelValue(s.to_owned()))
    }
}

/// A namespace name: a DNS label (1 to 63 lowercase alphanumerics or `-`, alphanumeric at both
/// ends).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Namespace(String);

impl Namespace {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Namespace {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() > 63 || !dns_label(s) {
            return Err(format!(
                "namespace \"{s}\" is not a valid name (1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit)"
            ));
        }
        Ok(Namespace(s.to_owned()))
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A container name, as in a pod spec (a DNS label).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerName(String);

impl ContainerName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ContainerName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() > 63 || !dns_label(s) {
            return Err(format!(
                "container \"{s}\" is not a valid container name (1 to 63 lowercase letters, digits or '-')"
            ));
        }
        Ok(ContainerName(s.to_owned()))
    }
}

impl fmt::Display for ContainerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn label_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1 to 63 characters".to_owned());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c)))
    {
        return Err(format!(
            "contains {c:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(s.chars().next()) || !alnum(s.chars().last()) {
        return Err("must begin and end with a letter or digit".to_owned());
    }
    Ok(())
}

deserialize_from_str!(
    LabelKey,
    "a label key such as \"app\" or \"example.com/tier\""
);
deserialize_from_str!(LabelValue, "a label value");
deserialize_from_str!(Namespace, "a namespace name");
deserialize_from_str!(ContainerName, "a container name");
deserialize_from_str!(
    LabelOperator,
    "one of \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\""
);

/// One namespace or a list of them (`namespace = "a"` or `namespace = ["a", "b"]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Namespaces(pub Vec<Namespace>);

impl<'de> Deserialize<'de> for Namespaces {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let names = match OneOrMany::deserialize(d).map_err(|_| {
            de::Error::custom("expected a namespace name or a list of namespace names")
        })? {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        if names.is_empty() {
            return Err(de::Error::custom(
                "namespace list is empty; omit the key to select pods in every namespace",
            ));
        }
        names
            .iter()
            .map(|n| n.parse().map_err(de::Error::custom))
            .collect::<Result<_, _>>()
            .map(Namespaces)
    }
}

/// Which workloads a rule applies to: pods in `namespaces` (all if empty) whose labels match
/// `pod_selector` (all if none), and within them only `container` if given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadSelector {
    /// Namespaces (empty: every namespace).
    pub namespaces: Vec<Namespace>,
    /// Pod label selector (`None`: every pod).
    pub pod_selector: Option<LabelSelector>,
    /// Only this container of each selected pod.
    pub container: Option<ContainerName>,
}

impl WorkloadSelector {
    /// Whether `pod` is selected (ignoring `container`).
    pub fn selects(&self, pod: &Pod) -> bool {
        (self.namespaces.is_empty() || self.namespaces.iter().any(|n| n.0 == pod.namespace))
            && self
                .pod_selector
                .as_ref()
                .is_none_or(|s| s.matches(&pod.labels))
    }

    /// A canonical one-line form for digests and display.
    pub fn canonical(&self) -> String {
        let mut ns: Vec<&str> = self.namespaces.iter().map(|n| n.as_str()).collect();
        ns.sort_unstable();
        ns.dedup();
        format!(
            "ns={} pods={} container={}",
            ns.join(","),
            self.pod_selector
                .as_ref()
                .map_or_else(|| "*".to_owned(), |s| format!("{{{}}}", s.canonical())),
            self.container.as_ref().map_or("*", |c| c.as_str())
        )
    }
}

/// A container of a [`Pod`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// The container's name in the pod spec.
    pub name: String,
    /// The runtime's container id.
    pub id: String,
    /// Its cgroup, relative to the agent's cgroup root.
    pub cgroup: CgroupPath,
}

/// A pod running on this node, as the container runtime and the cgroup tree describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// The pod's UID.
    pub uid: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// The pod's cgroup, relative to the agent's cgroup root.
    pub cgroup: CgroupPath,
    /// Its containers (without the sandbox's pause container).
    pub containers: Vec<Container>,
}

/// What the agent knows of the node's pods at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// The cgroup under which pods live, relative to the agent's cgroup root.
    pub kubepods_root: CgroupPath,
    /// What connects from a pod cgroup the agent has not classified yet get: `Allow` (judged by
    /// the rules as any cgroup), `Deny` or `Audit` (every connect).
    pub unknown_pod_action: Action,
    /// Pods classified through the runtime.
    pub pods: Vec<Pod>,
    /// Pod cgroups seen in the tree that the runtime has not described (yet).
    pub unclassified: Vec<CgroupPath>,
}

impl Inventory {
    /// The pod `namespace/name`, if known.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// The pod whose cgroup is or contains `cgroup`.
    pub fn pod_of(&self, cgroup: &CgroupPath) -> Option<&Pod> {
        self.pods.iter().find(|p| p.cgroup.contains(cgroup))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn selector(toml_text: &str) -> Result<LabelSelector, String> {
        let s: LabelSelector = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn selectors_have_kubernetes_semantics() {
        let s = selector(
            r#"
            match_labels = { app = "api" }
            match_expressions = [
              { key = "tier", operator = "In", values = ["web", "edge"] },
              { key = "env", operator = "NotIn", values = ["dev"] },
              { key = "example.com/owner", operator = "Exists" },
              { key = "legacy", operator = "DoesNotExist" },
            ]
            "#,
        )
        .expect("valid");
        let base = [("app", "api"), ("tier", "web"), ("example.com/owner", "x")];
        assert!(s.matches(&labels(&base)));
        // NotIn holds when the label is absent, fails on a listed value.
        let mut l = labels(&base);
        l.insert("env".into(), "dev".into());
        assert!(!s.matches(&l));
        l.insert("env".into(), "prod".into());
        assert!(s.matches(&l));
        for (k, v) in [("app", "web"), ("tier", "db"), ("legacy", "1")] {
            let mut l = labels(&base);
            l.insert(k.into(), v.into());
            assert!(!s.matches(&l), "{k}={v}");
        }
        let mut l = labels(&base);
        l.remove("example.com/owner");
        assert!(!s.matches(&l));
        // The empty selector matches every pod.
        assert!(LabelSelector::default().matches(&labels(&[])));
    }

    #[test]
    fn bad_selectors_say_what_and_where() {
        for (text, needle) in [
            (
                r#"match_expressions = [{ key = "a", operator = "Has", values = ["x"] }]"#,
                "unknown operator \"Has\"",
            ),
            (
                r#"match_expressions = [{ key = "", operator = "Exists" }]"#,
                "label key is empty",
            ),
            (
                r#"match_expressions = [{ key = "a", operator = "Exists", values = ["x"] }]"#,
                "operator Exists takes no values",
            ),
            (
                r#"match_expressions = [{ key = "a", operator = "In" }]"#,
                "operator In needs at least one value",
            ),
            (r#"match_labels = { "-bad" = "x" }"#, "begin and end"),
            (r#"match_labels = { app = "a b" }"#, "contains ' '"),
            (r#"match_labels = { "Up/x" = "y" }"#, "not a DNS subdomain"),
            (r#"matchLabels = { app = "a" }"#, "unknown field"),
        ] {
            let e = selector(text).expect_err(text);
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn workload_selectors_match_namespace_and_labels() {
        let pod = Pod {
            uid: "u".into(),
            namespace: "payments".into(),
            name: "api-0".into(),
            labels: labels(&[("app", "api")]),
            cgroup: "kubepods/besteffort/podu".parse().expect("path"),
            containers: vec![],
        };
        let by_ns = |ns: &[&str]| WorkloadSelector {
            namespaces: ns.iter().map(|n| n.parse().expect("ns")).collect(),
            ..Default::default()
        };
        assert!(by_ns(&[]).selects(&pod));
        assert!(by_ns(&["payments", "other"]).selects(&pod));
        assert!(!by_ns(&["other"]).selects(&pod));
        let by_label = WorkloadSelector {
            pod_selector: Some(selector(r#"match_labels = { app = "web" }"#).expect("valid")),
            ..Default::default()
        };
        assert!(!by_label.selects(&pod));
        assert!("Payments".parse::<Namespace>().is_err());
        assert!("a".repeat(64).parse::<Namespace>().is_err());
    }
}
