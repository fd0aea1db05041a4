//! Translation between the protobuf messages and domain types, with field-path errors.

use super::pb;
use crate::{
    model::{
        workload::{
            ContainerName, LabelKey, LabelOperator, LabelRequirement, LabelValue, Namespace,
            Namespaces,
        },
        Action, CgroupPath, Cidr, Class, DefaultAction, LabelSelector, Mode, PortRange, Protocol,
        RuleName, RuleSpec,
    },
    policy::Policy,
};
use std::collections::HashMap;

/// The most problems reported for one document.
const MAX_REPORTED: usize = 20;

/// A proto document as a domain policy, settings left unspecified falling back to `defaults`.
/// Errors are `path: problem` lines, e.g. `rules[3].cidrs[1]: "10.0.0.0/33" is not a valid prefix: ...`.
pub fn policy_from_proto(
    doc: Option<&pb::PolicyDocument>,
    defaults: &Policy,
    max_rules: usize,
) -> Result<Policy, Vec<String>> {
    let Some(doc) = doc else {
        return Err(vec!["policy: required".into()]);
    };
    let mut errors = Vec::new();
    if doc.rules.is_empty() {
        errors.push(
            "rules: a policy needs at least one rule (to admit everything: one allow rule for \"0.0.0.0/0\" and \"::/0\")"
                .into(),
        );
    }
    if doc.rules.len() > max_rules {
        return Err(vec![format!(
            "rules: {} rules exceed the limit of {max_rules} (policy.max_rules)",
            doc.rules.len()
        )]);
    }
    let mode = match pb::Mode::try_from(doc.mode) {
        Ok(pb::Mode::Unspecified) => defaults.mode,
        Ok(pb::Mode::Enforce) => Mode::Enforce,
        Ok(pb::Mode::Audit) => Mode::Audit,
        Err(_) => {
            errors.push(format!("mode: unknown value {}", doc.mode));
            defaults.mode
        }
    };
    let default_action = match pb::Action::try_from(doc.default_action) {
        Ok(pb::Action::Unspecified) => defaults.default_action,
        Ok(pb::Action::Allow) => DefaultAction::Allow,
        Ok(pb::Action::Deny) => DefaultAction::Deny,
        Ok(pb::Action::Audit) => {
            errors.push("default_action: must be ACTION_ALLOW or ACTION_DENY".into());
            defaults.default_action
        }
        Err(_) => {
            errors.push(format!(
                "default_action: unknown value {}",
                doc.default_action
            ));
            defaults.default_action
        }
    };
    let default_class = class_from_proto(doc.default_class, "default_class", &mut errors)
        .unwrap_or(defaults.default_class);

    let mut rules = Vec::with_capacity(doc.rules.len());
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, r) in doc.rules.iter().enumerate() {
        if errors.len() >= MAX_REPORTED {
            break;
        }
        if let Some(first) = names.insert(r.name.as_str(), i) {
            errors.push(format!(
                "rules[{i}].name: duplicate rule name \"{}\" (also rules[{first}].name)",
                r.name
            ));
            continue;
        }
        if let Some(rule) = rule_from_proto(i, r, &mut errors) {
            rules.push(rule);
        }
    }
    if !errors.is_empty() {
        errors.truncate(MAX_REPORTED);
        return Err(errors);
    }
    Ok(Policy {
        rules,
        mode,
        default_action,
        default_class,
        ..defaults.clone()
    })
}

fn class_from_proto(v: i32, path: &str, errors: &mut Vec<String>) -> Option<Class> {
    match pb::RuntimeClass::try_from(v) {
        Ok(pb::RuntimeClass::Unspecified) => None,
        Ok(pb::RuntimeClass::R1) => Some(Class::R1),
        Ok(pb::RuntimeClass::W1) => Some(Class::W1),
        Ok(pb::RuntimeClass::C1) => Some(Class::C1),
        Err(_) => {
            errors.push(format!("{path}: unknown runtime class {v}"));
            None
        }
    }
}

fn rule_from_proto(i: usize, r: &pb::Rule, errors: &mut Vec<String>) -> Option<RuleSpec> {
    let before = errors.len();
    let name: Option<RuleName> = r
        .name
        .parse()
        .map_err(|e| errors.push(format!("rules[{i}].name: {e}")))
        // The parse error is already in `errors`; the document is refused below.
        .ok();
    let action = match pb::Action::try_from(r.action) {
        Ok(pb::Action::Allow) => Some(Action::Allow),
        Ok(pb::Action::Deny) => Some(Action::Deny),
        Ok(pb::Action::Audit) => Some(Action::Audit),
        Ok(pb::Action::Unspecified) => {
            errors.push(format!(
                "rules[{i}].action: required (ACTION_ALLOW, ACTION_DENY or ACTION_AUDIT)"
            ));
            None
        }
        Err(_) => {
            errors.push(format!("rules[{i}].action: unknown value {}", r.action));
            None
        }
    };
    let class = class_from_proto(
        r.runtime_class,
        &format!("rules[{i}].runtime_class"),
        errors,
    );
    let cgroup: Option<CgroupPath> = if r.cgroup.is_empty() {
        None
    } else {
        r.cgroup
            .parse()
            .map_err(|e| errors.push(format!("rules[{i}].cgroup: {e}")))
            // The parse error is already in `errors`; the document is refused below.
            .ok()
    };
    if r.cidrs.is_empty() {
        errors.push(format!("rules[{i}].cidrs: required: at least one prefix"));
    }
    let cidrs: Vec<Cidr> = r
        .cidrs
        .iter()
        .enumerate()
        .filter_map(|(j, c)| {
            c.parse()
                .map_err(|e| errors.push(format!("rules[{i}].cidrs[{j}]: {e}")))
                // The parse error is already in `errors`; the document is refused below.
                .ok()
        })
        .collect();
    let ports: Vec<PortRange> = r
        .ports
        .iter()
        .enumerate()
        .filter_map(|(j, p)| {
            p.parse()
                .map_err(|e| errors.push(format!("rules[{i}].ports[{j}]: {e}")))
                // The parse error is already in `errors`; the document is refused below.
                .ok()
        })
        .collect();
    let park_to: Option<std::net::SocketAddr> = if r.park_to.is_empty() {
        None
    } else {
        r.park_to
            .parse()
            .map_err(|_| {
                errors.push(format!(
                    "rules[{i}].park_to: \"{}\" is not an address and port (e.g. \"127.0.0.1:9090\" or \"[::1]:9090\")",
                    r.park_to
                ))
            })
            // The parse error is already in `errors`; the document is refused below.
            .ok()
    };
    let protocol = match pb::Protocol::try_from(r.protocol) {
        Ok(pb::Protocol::Unspecified) => Protocol::Any,
        Ok(pb::Protocol::Tcp) => Protocol::Tcp,
        Ok(pb::Protocol::Udp) => Protocol::Udp,
        Err(_) => {
            errors.push(format!("rules[{i}].protocol: unknown value {}", r.protocol));
            Protocol::Any
        }
    };
    let namespace = if r.namespaces.is_empty() {
        None
    } else {
        let names: Vec<Namespace> = r
            .namespaces
            .iter()
            .enumerate()
            .filter_map(|(j, n)| {
                n.parse()
                    .map_err(|e| errors.push(format!("rules[{i}].namespaces[{j}]: {e}")))
                    // The parse error is already in `errors`; the document is refused below.
                    .ok()
            })
            .collect();
        Some(Namespaces(names))
    };
    let pod_selector = r
        .pod_selector
        .as_ref()
        .and_then(|s| selector_from_proto(s, &format!("rules[{i}].pod_selector"), errors));
    let container: Option<ContainerName> = if r.container.is_empty() {
        None
    } else {
        r.container
            .parse()
            .map_err(|e| errors.push(format!("rules[{i}].container: {e}")))
            // The parse error is already in `errors`; the document is refused below.
            .ok()
    };
    if errors.len() > before {
        return None;
    }
    let rule = RuleSpec {
        name: name?,
        action: action?,
        class,
        cgroup,
        cidrs,
        ports: if ports.is_empty() { None } else { Some(ports) },
        protocol,
        park_to,
        namespace,
        pod_selector,
        container,
    };
    if let Err(e) = rule.check_subject() {
        errors.push(format!("rules[{i}].{e}"));
        return None;
    }
    Some(rule)
}

fn selector_from_proto(
    s: &pb::LabelSelector,
    path: &str,
    errors: &mut Vec<String>,
) -> Option<LabelSelector> {
    let before = errors.len();
    let mut match_labels = std::collections::BTreeMap::new();
    for (k, v) in &s.match_labels {
        match (k.parse::<LabelKey>(), v.parse::<LabelValue>()) {
            (Ok(k), Ok(v)) => {
                match_labels.insert(k, v);
            }
            (Err(e), _) | (_, Err(e)) => errors.push(format!("{path}.match_labels: {e}")),
        }
    }
    let mut match_expressions = Vec::new();
    for (j, x) in s.match_expressions.iter().enumerate() {
        let at = format!("{path}.match_expressions[{j}]");
        let key = x
            .key
            .parse::<LabelKey>()
            .map_err(|e| errors.push(format!("{at}.key: {e}")))
            .ok();
        let operator = x
            .operator
            .parse::<LabelOperator>()
            .map_err(|e| errors.push(format!("{at}.operator: {e}")))
            .ok();
        let values: Vec<LabelValue> = x
            .values
            .iter()
            .filter_map(|v| {
                v.parse()
                    .map_err(|e| errors.push(format!("{at}.values: {e}")))
                    .ok()
            })
            .collect();
        if let (Some(key), Some(operator)) = (key, operator) {
            match_expressions.push(LabelRequirement {
                key,
                operator,
                values,
            });
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(LabelSelector {
        match_labels,
        match_expressions,
    })
}

fn selector_to_proto(s: &LabelSelector) -> pb::LabelSelector {
    pb::LabelSelector {
        match_labels: s
            .match_labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.0.clone()))
            .collect(),
        match_expressions: s
            .match_expressions
            .iter()
            .map(|x| pb::LabelSelectorRequirement {
                key: x.key.to_string(),
                operator: x.operator.as_str().to_owned(),
                values: x.values.iter().map(|v| v.0.clone()).collect(),
            })
            .collect(),
    }
}

/// A domain policy as a proto document, settings resolved.
pub fn policy_to_proto(p: &Policy) -> pb::PolicyDocument {
    pb::PolicyDocument {
        rules: p.rules.iter().map(rule_to_proto).collect(),
        mode: match p.mode {
            Mode::Enforce => pb::Mode::Enforce,
            Mode::Audit => pb::Mode::Audit,
        } as i32,
        default_action: match p.default_action {
            DefaultAction::Allow => pb::Action::Allow,
            DefaultAction::Deny => pb::Action::Deny,
        } as i32,
        default_class: class_to_proto(p.default_class) as i32,
    }
}

/// A class as its proto enum.
pub fn class_to_proto(c: Class) -> pb::RuntimeClass {
    match c {
        Class::R1 => pb::RuntimeClass::R1,
        Class::W1 => pb::RuntimeClass::W1,
        Class::C1 => pb::RuntimeClass::C1,
    }
}

fn rule_to_proto(r: &RuleSpec) -> pb::Rule {
    pb::Rule {
        name: r.name.to_string(),
        action: match r.action {
            Action::Allow => pb::Action::Allow,
            Action::Deny => pb::Action::Deny,
            Action::Audit => pb::Action::Audit,
        } as i32,
        runtime_class: r
            .class
            .map(class_to_proto)
            .unwrap_or(pb::RuntimeClass::Unspecified) as i32,
        // No cgroup: the empty string, as the proto says.
        cgroup: r.cgroup.as_ref().map(|c| c.to_string()).unwrap_or_default(),
        cidrs: r.cidrs.iter().map(|c| c.to_string()).collect(),
        ports: r.ports.iter().flatten().map(|p| p.to_string()).collect(),
        protocol: match r.protocol {
            Protocol::Any => pb::Protocol::Unspecified,
            Protocol::Tcp => pb::Protocol::Tcp,
            Protocol::Udp => pb::Protocol::Udp,
        } as i32,
        // No park target: the empty string, as the proto says.
        park_to: r.park_to.map(|a| a.to_string()).unwrap_or_default(),
        namespaces: r
            .namespace
            .iter()
            .flat_map(|n| n.0.iter().map(|n| n.to_string()))
            .collect(),
        pod_selector: r.pod_selector.as_ref().map(selector_to_proto),
        container: r
            .container
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Policy {
        Policy {
            rules: vec![],
            mode: Mode::Enforce,
            default_action: DefaultAction::Allow,
            default_class: Class::C1,
            heat: false,
            heat_sample_every: 1,
            histograms: false,
            histogram_interval_us: 0,
            verdict_events: true,
        }
    }

    fn doc(rule: pb::Rule) -> pb::PolicyDocument {
        pb::PolicyDocument {
            rules: vec![pb::Rule {
                name: "r".into(),
                action: pb::Action::Deny as i32,
                cidrs: vec!["10.0.0.0/8".into()],
                ..rule
            }],
            ..Default::default()
        }
    }

    fn requirement(key: &str, op: &str, values: &[&str]) -> pb::Rule {
        pb::Rule {
            pod_selector: Some(pb::LabelSelector {
                match_expressions: vec![pb::LabelSelectorRequirement {
                    key: key.into(),
                    operator: op.into(),
                    values: values.iter().map(|v| v.to_string()).collect(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn bad_selectors_over_grpc_are_refused_with_their_path() {
        for (rule, needle) in [
            (
                requirement("app", "Has", &["x"]),
                "rules[0].pod_selector.match_expressions[0].operator: unknown operator \"Has\"",
            ),
            (
                requirement("", "Exists", &[]),
                "rules[0].pod_selector.match_expressions[0].key: label key is empty",
            ),
            (
                requirement("app", "Exists", &["x"]),
                "rules[0].pod_selector.match_expressions[0] (key \"app\"): operator Exists takes no values",
            ),
            (
                pb::Rule {
                    namespaces: vec!["ok".into(), "Bad_NS".into()],
                    ..Default::default()
                },
                "rules[0].namespaces[1]: namespace \"Bad_NS\"",
            ),
            (
                pb::Rule {
                    cgroup: "kubepods".into(),
                    container: "app".into(),
                    ..Default::default()
                },
                "rules[0].cgroup: a rule applies to a cgroup or to workloads",
            ),
        ] {
            let e = policy_from_proto(Some(&doc(rule)), &defaults(), 10).expect_err(needle);
            assert!(e.iter().any(|l| l.contains(needle)), "{needle}: {e:?}");
        }
    }

    #[test]
    fn selectors_round_trip_through_the_proto() {
        let mut rule = requirement("tier", "In", &["web", "edge"]);
        rule.namespaces = vec!["payments".into()];
        rule.container = "app".into();
        if let Some(s) = rule.pod_selector.as_mut() {
            s.match_labels.insert("app".into(), "api".into());
        }
        let p = policy_from_proto(Some(&doc(rule)), &defaults(), 10).expect("valid");
        let back = policy_from_proto(Some(&policy_to_proto(&p)), &defaults(), 10).expect("valid");
        assert_eq!(back.rules, p.rules);
        assert!(p.rules[0].workloads().is_some());
    }
}
