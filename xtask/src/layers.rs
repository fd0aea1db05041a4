//! The agent's layers, written down once, and the check that its code keeps to them.
//!
//! Every top-level module of `agent/src` belongs to a layer and may use only the modules listed
//! for it in [`ALLOWED`]. The check reads every source file, finds each reference to another
//! top-level module — `crate::x`, `knhk_agent::x` (the binary), and `super::` paths that climb
//! out of a module — and fails on any that the table does not allow. Comments and string
//! literals are skipped. `cargo xtask test` runs it; `cargo xtask layers` runs it alone.

use anyhow::{bail, Context, Result};
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Each top-level module with the modules it may use, bottom layer first. Anything not listed
/// is forbidden. `lib` (which only declares modules) and `main` (the CLI, on top of everything)
/// are not checked.
pub const ALLOWED: &[(&str, &[&str])] = &[
    // Layer 0: the domain, and helpers with no domain knowledge.
    ("model", &[]),
    ("resilience", &[]),
    ("tasks", &[]),
    ("secure_dir", &[]),
    ("trace_context", &[]),
    ("semconv", &[]),
    ("objectstore", &[]),
    ("dirwatch", &[]),
    ("note", &[]),
    // Layer 1: pure logic over the domain.
    ("abi", &["model"]),
    ("policy", &["model", "abi"]),
    // Layer 2: configuration, returning typed settings.
    ("config", &["model", "policy", "objectstore", "note"]),
    // Layer 3: adapters to the kernel, SPIRE, Prometheus.
    ("datapath", &["model", "abi", "policy", "dirwatch"]),
    ("identity", &["model", "config", "secure_dir"]),
    ("telemetry", &["model", "config", "datapath", "semconv"]),
    ("workloads", &["model", "config", "dirwatch"]),
    // Layer 4: services. They do not call each other, except sync, which pushes the ledger's
    // checkpoints to witnesses in the witness protocol.
    ("beat", &["model", "config", "datapath"]),
    (
        "control",
        &[
            "model",
            "config",
            "datapath",
            "policy",
            "telemetry",
            "semconv",
        ],
    ),
    (
        "receipts",
        &[
            "model",
            "config",
            "resilience",
            "tasks",
            "semconv",
            "objectstore",
            "note",
        ],
    ),
    // The fleet bundle follower: fetches, verifies and keeps bundles; agent.rs applies them.
    (
        "bundle",
        &[
            "model",
            "config",
            "policy",
            "objectstore",
            "tasks",
            "secure_dir",
        ],
    ),
    // The receipts archive: reads the ledger, writes the object store.
    (
        "archive",
        &["config", "receipts", "resilience", "tasks", "objectstore"],
    ),
    // The witness service (`knhk-agent witness`): verifies and cosigns node logs' checkpoints.
    (
        "witness",
        &["model", "config", "identity", "receipts", "note"],
    ),
    // A node pushing its checkpoints to the witnesses (their wire protocol is witness's).
    (
        "sync",
        &[
            "model",
            "config",
            "identity",
            "receipts",
            "witness",
            "note",
            "resilience",
            "tasks",
            "trace_context",
            "semconv",
        ],
    ),
    // Layer 5: the gRPC API, its client, and the wiring of `knhk-agent run`.
    (
        "api",
        &[
            "model",
            "config",
            "policy",
            "datapath",
            "identity",
            "control",
            "receipts",
            "sync",
            "note",
            "secure_dir",
            "trace_context",
            "semconv",
        ],
    ),
    ("client", &["model", "config", "policy", "identity", "api"]),
    (
        "agent",
        &[
            "model",
            "config",
            "datapath",
            "identity",
            "telemetry",
            "beat",
            "control",
            "receipts",
            "archive",
            "sync",
            "api",
            "tasks",
            "secure_dir",
            "workloads",
            "objectstore",
            "bundle",
            "dirwatch",
        ],
    ),
];

/// One forbidden reference.
#[derive(Debug, PartialEq, Eq)]
pub struct Violation {
    /// The file, relative to the workspace.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// The module the file belongs to.
    pub from: String,
    /// The module it refers to.
    pub to: String,
}

/// Checks every `.rs` file under `src` (the agent's `src/`).
pub fn check(root: &Path) -> Result<()> {
    let src = root.join("agent/src");
    let modules = top_level_modules(&src)?;
    let table: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(m, deps)| (*m, deps.iter().copied().collect()))
        .collect();
    let unlisted: Vec<&String> = modules
        .iter()
        .filter(|m| !table.contains_key(m.as_str()) && !["lib", "main"].contains(&m.as_str()))
        .collect();
    if !unlisted.is_empty() {
        bail!(
            "top-level modules without a layer: {unlisted:?}; add them to ALLOWED in xtask/src/layers.rs"
        );
    }
    let mut violations = Vec::new();
    let mut files = Vec::new();
    rust_files(&src, &mut files)?;
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let rel = file.strip_prefix(&src).unwrap_or(&file);
        let path = module_path(rel);
        let Some(from) = path.first().cloned() else {
            continue;
        };
        let Some(allowed) = table.get(from.as_str()) else {
            continue; // lib.rs and main.rs
        };
        for (line, to) in references(&text, &path, &modules) {
            if to != from && !allowed.contains(to.as_str()) {
                violations.push(Violation {
                    file: file.strip_prefix(root).unwrap_or(&file).to_path_buf(),
                    line,
                    from: from.clone(),
                    to,
                });
            }
        }
    }
    if violations.is_empty() {
        eprintln!(
            "xtask: layers: {} modules keep to their layers",
            table.len()
        );
        return Ok(());
    }
    for v in &violations {
        eprintln!(
            "{}:{}: `{}` may not use `{}` (it may use: {}; see xtask/src/layers.rs)",
            v.file.display(),
            v.line,
            v.from,
            v.to,
            table
                .get(v.from.as_str())
                .filter(|deps| !deps.is_empty())
                .map_or_else(
                    || "nothing".to_owned(),
                    |deps| deps.iter().copied().collect::<Vec<_>>().join(", ")
                ),
        );
    }
    bail!("{} forbidden reference(s) between layers", violations.len())
}

fn top_level_modules(src: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let path = entry?.path();
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if path.is_dir() || path.extension().is_some_and(|e| e == "rs") {
            out.insert(name);
        }
    }
    Ok(out)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

/// The module path of a file relative to `src/`: `config/settings/mod.rs` → `[config, settings]`.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// Every reference in `text` to a top-level module, with its line.
fn references(text: &str, path: &[String], modules: &BTreeSet<String>) -> Vec<(usize, String)> {
    let code = strip_comments_and_strings(text);
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let boundary = i == 0 || !is_ident(bytes[i - 1]) && bytes[i - 1] != b':';
        if !boundary {
            i += 1;
            continue;
        }
        let rest = &code[i..];
        let (base, after): (Vec<String>, &str) = if let Some(r) = rest.strip_prefix("crate::") {
            (Vec::new(), r)
        } else if let Some(r) = rest.strip_prefix("knhk_agent::") {
            (Vec::new(), r)
        } else if rest.starts_with("super::") {
            let mut p = path.to_vec();
            let mut r = rest;
            while let Some(next) = r.strip_prefix("super::") {
                p.pop();
                r = next;
            }
            (p, r)
        } else {
            i += 1;
            continue;
        };
        let line = code[..i].matches('\n').count() + 1;
        if base.is_empty() {
            for first in first_segments(after) {
                if modules.contains(&first) {
                    out.push((line, first));
                }
            }
        } else {
            out.push((line, base[0].clone()));
        }
        i += rest.len() - after.len();
    }
    out
}

/// The first path segment of each item after `crate::`: `{a, b::{c}}` gives `a`, `b`.
fn first_segments(after: &str) -> Vec<String> {
    let after = after.trim_start();
    if let Some(group) = after.strip_prefix('{') {
        let mut depth = 0usize;
        let mut items = Vec::new();
        let mut current = String::new();
        for c in group.chars() {
            match c {
                '{' => {
                    depth += 1;
                    current.push(c);
                }
                '}' if depth == 0 => break,
                '}' => {
                    depth -= 1;
                    current.push(c);
                }
                ',' if depth == 0 => items.push(std::mem::take(&mut current)),
                _ => current.push(c),
            }
        }
        items.push(current);
        items
            .iter()
            .filter_map(|item| ident_prefix(item.trim()))
            .collect()
    } else {
        ident_prefix(after).into_iter().collect()
    }
}

fn ident_prefix(s: &str) -> Option<String> {
    let end = s.bytes().position(|b| !is_ident(b)).unwrap_or(s.len());
    (end > 0).then(|| s[..end].to_owned())
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// `text` with comments and string/char literals blanked (newlines kept, so lines still count).
fn strip_comments_and_strings(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if b[i] == b'r'
            && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
            && (i == 0 || !is_ident(b[i - 1]))
        {
            // Raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(b[i]);
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            out.extend(std::iter::repeat_n(b' ', j + 1 - i));
            i = j + 1;
            while i < b.len() && !b[i..].starts_with(&close) {
                blank(&mut out, b[i]);
                i += 1;
            }
            out.extend(std::iter::repeat_n(b' ', close.len().min(b.len() - i)));
            i += close.len();
        } else if b[i] == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
                blank(&mut out, b[i]);
                i += 1;
            }
            out.push(b' ');
            i += 1;
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            out.extend_from_slice(b"   ");
            i += 3;
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            // '\n', '\'', '\u{..}'
            let end = b[i + 2..]
                .iter()
                .position(|c| *c == b'\'')
                .map_or(b.len(), |p| i + 3 + p);
            out.extend(std::iter::repeat_n(b' ', end - i));
            i = end;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules() -> BTreeSet<String> {
        ["model", "config", "beat", "control", "receipts"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn refs(text: &str, path: &[&str]) -> Vec<String> {
        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        references(text, &path, &modules())
            .into_iter()
            .map(|(_, m)| m)
            .collect()
    }

    #[test]
    fn finds_crate_paths_grouped_or_not() {
        assert_eq!(
            refs(
                "use crate::{model::{Class, Event}, config::Config};\nfn f() { crate::beat::x(); }",
                &["control"]
            ),
            ["model", "config", "beat"]
        );
        assert_eq!(
            refs("use knhk_agent::control::Controller;", &["agent"]),
            ["control"]
        );
    }

    #[test]
    fn super_paths_that_climb_out_of_a_module_count() {
        // From beat/ladder.rs, `super::` is beat itself; from config/settings/x.rs,
        // `super::super::super::control` is the crate root's `control`.
        assert_eq!(refs("use super::Ladder;", &["beat", "ladder"]), ["beat"]);
        assert_eq!(
            refs(
                "use super::super::super::control::X;",
                &["config", "settings", "x"]
            ),
            ["control"]
        );
    }

    #[test]
    fn comments_and_strings_are_not_references() {
        assert!(refs(
            "// crate::beat::x\n/* crate::control */ let s = \"crate::beat\"; let r = r#\"crate::beat\"#;",
            &["model"]
        )
        .is_empty());
    }

    #[test]
    fn a_forbidden_use_fails_the_check() {
        let dir = std::env::temp_dir().join(format!("knhk-layers-{}", std::process::id()));
        let src = dir.join("agent/src");
        std::fs::create_dir_all(src.join("model")).expect("mkdir");
        std::fs::write(src.join("lib.rs"), "pub mod model;\npub mod control;\n").expect("write");
        std::fs::write(src.join("control.rs"), "use crate::model::Event;\n").expect("write");
        std::fs::write(src.join("model/mod.rs"), "pub struct Event;\n").expect("write");
        check(&dir).expect("control may use model");
        std::fs::write(
            src.join("model/mod.rs"),
            "pub struct Event;\nfn f() { super::control::g(); }\n",
        )
        .expect("write");
        let e = check(&dir).expect_err("model may not use control");
        assert!(e.to_string().contains("1 forbidden"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
