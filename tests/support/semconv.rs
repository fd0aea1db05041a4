//! The telemetry registry (`registry/`, OpenTelemetry Weaver's semconv v1 YAML) read for the
//! tests: schema validation against Weaver's published JSON schema, and a resolved model of the
//! attributes, metrics and spans it declares.

use serde_json::Value;
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf()
}

/// Standard OpenTelemetry attributes the registry references, with their types, from the
/// semantic conventions v1.34.0 (the manifest's dependency). Weaver resolves them from there; the
/// tests cannot download it, so this list is their stand-in (a ref outside it fails).
pub const STANDARD: &[(&str, &str)] = &[
    ("error.type", "string"),
    ("network.transport", "string"),
    ("rpc.system", "string"),
    ("rpc.service", "string"),
    ("rpc.method", "string"),
    ("server.address", "string"),
    ("server.port", "int"),
    ("service.name", "string"),
    ("service.version", "string"),
    ("service.instance.id", "string"),
    ("k8s.node.name", "string"),
    ("k8s.pod.name", "string"),
    ("k8s.namespace.name", "string"),
    ("cloud.region", "string"),
    ("host.name", "string"),
];

/// An attribute definition.
#[derive(Debug, Clone)]
pub struct AttrDef {
    /// `string`, `int`, `double`, `boolean` or `enum` (string members).
    pub ty: String,
    /// The enum's values.
    pub members: Vec<String>,
    /// One line.
    pub brief: String,
}

/// An attribute of a signal: its id and requirement level (`required`, `conditionally_required`,
/// `recommended`, `opt_in`) and the condition text.
#[derive(Debug, Clone)]
pub struct AttrUse {
    /// The attribute.
    pub id: String,
    /// Requirement level.
    pub level: String,
    /// The condition of a conditionally required attribute.
    pub condition: String,
}

/// A metric group.
#[derive(Debug, Clone)]
pub struct Metric {
    /// OTel name.
    pub name: String,
    /// counter, gauge, histogram, updowncounter.
    pub instrument: String,
    /// UCUM unit.
    pub unit: String,
    /// One line.
    pub brief: String,
    /// Note.
    pub note: String,
    /// The Prometheus family it is exported as.
    pub prometheus: String,
    /// Prometheus label → attribute.
    pub labels: BTreeMap<String, String>,
    /// Exported over OTLP.
    pub otlp: bool,
    /// Attributes.
    pub attributes: Vec<AttrUse>,
}

/// A span group.
#[derive(Debug, Clone)]
pub struct Span {
    /// The span name: the group id without `span.`.
    pub name: String,
    /// client, server, internal, ...
    pub kind: String,
    /// One line.
    pub brief: String,
    /// Attributes.
    pub attributes: Vec<AttrUse>,
}

/// The resolved registry.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// Every attribute, the registry's and the standard ones it references.
    pub attributes: BTreeMap<String, AttrDef>,
    /// Attribute groups (id, brief, attribute ids) in file order.
    pub groups: Vec<(String, String, Vec<String>)>,
    /// Metrics in file order.
    pub metrics: Vec<Metric>,
    /// Spans in file order.
    pub spans: Vec<Span>,
    /// The resource attributes.
    pub resource: Vec<AttrUse>,
    /// The manifest.
    pub manifest: Value,
}

/// The registry's YAML files (the manifest excluded), sorted.
pub fn registry_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("registry"))
        .expect("registry/ exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "registry_manifest.yaml")
        })
        .collect();
    files.sort();
    files
}

/// A YAML file as JSON.
pub fn load_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Validates `doc` against Weaver's semconv JSON schema; the error lists every violation.
pub fn validate(doc: &Value, origin: &str) -> Result<(), String> {
    let schema_path = repo_root().join("registry/schema/semconv.schema.json");
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(&schema_path).expect("the committed schema is readable"),
    )
    .expect("the committed schema is JSON");
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    let url = "https://opentelemetry.io/schemas/v1/semconv.schema.json";
    compiler
        .add_resource(url, schema)
        .expect("the schema is added");
    let index = compiler
        .compile(url, &mut schemas)
        .expect("Weaver's schema compiles");
    schemas
        .validate(doc, index)
        .map_err(|e| format!("{origin}: {e:#}"))
}

fn s(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn attr_uses(group: &Value) -> Vec<AttrUse> {
    group
        .get("attributes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|a| {
            let id = a
                .get("ref")
                .or_else(|| a.get("id"))
                .and_then(Value::as_str)
                .expect("an attribute has ref or id")
                .to_owned();
            let (level, condition) = match a.get("requirement_level") {
                None => ("recommended".to_owned(), String::new()),
                Some(Value::String(l)) => (l.clone(), String::new()),
                Some(Value::Object(o)) => {
                    let (k, v) = o.iter().next().expect("one level");
                    (k.clone(), v.as_str().unwrap_or_default().to_owned())
                }
                Some(other) => panic!("requirement_level {other}"),
            };
            AttrUse {
                id,
                level,
                condition,
            }
        })
        .collect()
}

/// Loads, validates and resolves the registry; panics with the reason when it is not valid.
pub fn load() -> Registry {
    let mut r = Registry {
        manifest: load_yaml(&repo_root().join("registry/registry_manifest.yaml")),
        ..Default::default()
    };
    for (id, ty) in STANDARD {
        r.attributes.insert(
            (*id).into(),
            AttrDef {
                ty: (*ty).into(),
                members: vec![],
                brief: "OpenTelemetry semantic conventions v1.34.0".into(),
            },
        );
    }
    let mut errors = Vec::new();
    for file in registry_files() {
        let doc = load_yaml(&file);
        if let Err(e) = validate(&doc, &file.display().to_string()) {
            errors.push(e);
            continue;
        }
        for g in doc["groups"].as_array().expect("groups") {
            let id = s(g, "id");
            match s(g, "type").as_str() {
                "attribute_group" => {
                    let mut ids = Vec::new();
                    for a in g["attributes"].as_array().into_iter().flatten() {
                        let Some(aid) = a.get("id").and_then(Value::as_str) else {
                            ids.push(s(a, "ref"));
                            continue;
                        };
                        let (ty, members) = match &a["type"] {
                            Value::String(t) => (t.clone(), vec![]),
                            Value::Object(o) => (
                                "enum".to_owned(),
                                o["members"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .map(|m| m["value"].as_str().unwrap_or_default().to_owned())
                                    .collect(),
                            ),
                            other => panic!("{aid}: type {other}"),
                        };
                        if !aid.starts_with("knhk.") {
                            errors.push(format!("{aid}: attributes defined here are knhk.*"));
                        }
                        if r.attributes
                            .insert(
                                aid.into(),
                                AttrDef {
                                    ty,
                                    members,
                                    brief: s(a, "brief"),
                                },
                            )
                            .is_some()
                        {
                            errors.push(format!("{aid}: defined twice"));
                        }
                        ids.push(aid.into());
                    }
                    if id == "knhk.resource" {
                        r.resource = attr_uses(g);
                    } else {
                        r.groups.push((id, s(g, "brief"), ids));
                    }
                }
                "metric" => {
                    let ann = &g["annotations"]["knhk"];
                    r.metrics.push(Metric {
                        name: s(g, "metric_name"),
                        instrument: s(g, "instrument"),
                        unit: s(g, "unit"),
                        brief: s(g, "brief"),
                        note: s(g, "note"),
                        prometheus: s(ann, "prometheus_name"),
                        labels: ann["prometheus_labels"]
                            .as_object()
                            .into_iter()
                            .flatten()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect(),
                        otlp: ann["otlp_export"].as_bool().unwrap_or(true),
                        attributes: attr_uses(g),
                    });
                    if !id.starts_with("metric.knhk.") {
                        errors.push(format!("{id}: metric ids are metric.knhk.*"));
                    }
                }
                "span" => {
                    let Some(name) = id.strip_prefix("span.") else {
                        errors.push(format!("{id}: span ids are span.<name>"));
                        continue;
                    };
                    r.spans.push(Span {
                        name: name.into(),
                        kind: s(g, "span_kind"),
                        brief: s(g, "brief"),
                        attributes: attr_uses(g),
                    });
                }
                other => errors.push(format!("{id}: group type {other} is not used here")),
            }
        }
    }
    // What weaver's resolver would refuse: refs to nothing; and this registry's own rules.
    for (what, uses) in r
        .metrics
        .iter()
        .map(|m| (m.name.clone(), &m.attributes))
        .chain(r.spans.iter().map(|s| (s.name.clone(), &s.attributes)))
        .chain(std::iter::once(("resource".to_owned(), &r.resource)))
    {
        for u in uses {
            if !r.attributes.contains_key(&u.id) {
                errors.push(format!("{what}: attribute {} is not defined", u.id));
            }
        }
    }
    for m in &r.metrics {
        // Weaver's resolver requires these of a metric; the v1 schema alone does not.
        if m.instrument.is_empty() || m.unit.is_empty() || m.name.is_empty() {
            errors.push(format!(
                "{}: a metric needs metric_name, instrument and unit",
                m.name
            ));
        }
        if m.prometheus.is_empty() || !m.prometheus.starts_with("knhk_") {
            errors.push(format!(
                "{}: annotations.knhk.prometheus_name (knhk_*) is missing",
                m.name
            ));
        }
        let refs: BTreeSet<&str> = m.attributes.iter().map(|a| a.id.as_str()).collect();
        let mapped: BTreeSet<&str> = m.labels.values().map(String::as_str).collect();
        if refs != mapped {
            errors.push(format!(
                "{}: prometheus_labels map to {mapped:?} but the attributes are {refs:?}",
                m.name
            ));
        }
    }
    let mut names = BTreeSet::new();
    for n in r
        .metrics
        .iter()
        .map(|m| &m.name)
        .chain(r.metrics.iter().map(|m| &m.prometheus))
        .chain(r.spans.iter().map(|s| &s.name))
    {
        if !names.insert(n.clone()) {
            errors.push(format!("{n}: declared twice"));
        }
    }
    assert!(
        errors.is_empty(),
        "the registry is not valid:\n{}",
        errors.join("\n")
    );
    r
}

impl Registry {
    /// The metric named `name` (OTel name).
    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.name == name)
    }

    /// The span named `name`.
    pub fn span(&self, name: &str) -> Option<&Span> {
        self.spans.iter().find(|s| s.name == name)
    }
}
