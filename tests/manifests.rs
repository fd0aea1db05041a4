//! The Kubernetes install (`k8s/`, docs/deploy.md): every region overlay renders with
//! `kubectl kustomize`, every rendered object validates against the Kubernetes 1.37 schemas
//! strictly (unknown fields fail) with `kubernetes-validate` from the project's `.venv`
//! (`cargo xtask setup` installs it), the Prometheus Operator objects (which it has no schema
//! for) have their required fields, and every flag, environment override and configuration key
//! the manifests hand the agent exists in the agent.

use serde_json::Value;
use std::{
    path::{Path, PathBuf},
    process::Command,
};

const OVERLAYS: [&str; 3] = ["us-east-1", "us-west-2", "eu-west-1"];
/// Kinds `kubernetes-validate` has no schema for (it warns and passes): checked by this file.
const CUSTOM_KINDS: [&str; 2] = ["PodMonitor", "PrometheusRule"];
/// The capabilities the agent was measured to need (docs/deploy.md, "Capabilities").
const CAPABILITIES: [&str; 3] = ["BPF", "PERFMON", "NET_ADMIN"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The tools these tests run, or why they are missing: the test then returns early, loudly, or
/// panics when `KNHK_REQUIRE_KERNEL_TESTS=1` (CI).
fn tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    let venv = repo().join(".venv/bin");
    let (validate, python) = (venv.join("kubernetes-validate"), venv.join("python"));
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output();
    let why = if !validate.exists() || !python.exists() {
        format!("{} is missing: run `cargo xtask setup`", validate.display())
    } else if !kubectl.is_ok_and(|o| o.status.success()) {
        "kubectl (with kustomize) is not on PATH".to_owned()
    } else {
        return Some((validate, python));
    };
    if std::env::var("KNHK_REQUIRE_KERNEL_TESTS").as_deref() == Ok("1") {
        panic!("{test}: {why}, and KNHK_REQUIRE_KERNEL_TESTS=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl kustomize DIR`.
fn render(dir: &Path) -> String {
    run(Command::new("kubectl").arg("kustomize").arg(dir))
}

/// The YAML documents of `yaml` as JSON values (PyYAML from the `.venv`).
fn documents(python: &Path, yaml: &str, dir: &Path) -> Vec<Value> {
    let file = dir.join("docs.yaml");
    std::fs::write(&file, yaml).expect("write");
    let json = run(Command::new(python).arg("-c").arg(
        "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)",
    ).arg(&file));
    let docs: Value = serde_json::from_str(&json).expect("json");
    docs.as_array().expect("a list").clone()
}

/// `kubernetes-validate --strict` on `file`: it must pass, and may warn only about the custom
/// kinds it has no schema for.
fn validate(tool: &Path, file: &Path) {
    let out = Command::new(tool)
        .args(["--strict", "--kubernetes-version", "1.37"])
        .arg(file)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{}:\n{text}", file.display());
    for line in text.lines().filter(|l| !l.starts_with("INFO ")) {
        let custom = CUSTOM_KINDS.iter().any(|k| {
            line.contains(&format!(
                "Couldn't find schema for kind {k} with api version monitoring.coreos.com/v1"
            ))
        });
        assert!(
            custom,
            "{}: kubernetes-validate warns about a built-in kind:\n{line}\n\n{text}",
            file.display()
        );
    }
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} in the rendering");
    found[0]
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn every_overlay_renders_and_validates_strictly() {
    let test = "every_overlay_renders_and_validates_strictly";
    let Some((tool, python)) = tools(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    for region in OVERLAYS {
        let yaml = render(&repo().join("k8s/overlays").join(region));
        let file = dir.path().join(format!("{region}.yaml"));
        std::fs::write(&file, &yaml).expect("write");
        validate(&tool, &file);
        let docs = documents(&python, &yaml, dir.path());
        let mut kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        kinds.sort();
        assert_eq!(
            kinds,
            [
                "ConfigMap",
                "DaemonSet",
                "Namespace",
                "PodMonitor",
                "PrometheusRule",
                "Service",
                "ServiceAccount"
            ],
            "{region}"
        );
        for d in &docs {
            if d["kind"] != "Namespace" {
                assert_eq!(d["metadata"]["namespace"], "knhk-system", "{d}");
            }
            assert_eq!(
                d["metadata"]["labels"]["topology.kubernetes.io/region"], region,
                "{d}"
            );
        }
    }
    // The uninstall Job is applied on its own.
    validate(&tool, &repo().join("k8s/uninstall/detach-job.yaml"));
}

#[test]
fn the_daemonset_keeps_to_least_privilege() {
    let Some((_, python)) = tools("the_daemonset_keeps_to_least_privilege") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    for region in OVERLAYS {
        let docs = documents(
            &python,
            &render(&repo().join("k8s/overlays").join(region)),
            dir.path(),
        );
        let ns = kind(&docs, "Namespace");
        assert_eq!(
            ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
            "privileged"
        );
        assert_eq!(
            kind(&docs, "ServiceAccount")["automountServiceAccountToken"],
            false
        );
        let ds = kind(&docs, "DaemonSet");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true);
        assert!(
            pod["hostPID"].is_null() || pod["hostPID"] == false,
            "no hostPID"
        );
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert!(
            pod["tolerations"]
                .as_array()
                .expect("tolerations")
                .iter()
                .any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"].is_null()),
            "tolerates every taint"
        );
        assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
        assert!(!ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].is_null());
        let containers = pod["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        let image = c["image"].as_str().expect("image");
        let (repo_name, digest) = image.split_once("@sha256:").expect("an image by digest");
        assert_eq!(repo_name, "ghcr.io/knhk/knhk-agent");
        assert!(
            digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit()),
            "{image}"
        );
        let sc = &c["securityContext"];
        assert!(
            sc["privileged"].is_null() || sc["privileged"] == false,
            "not privileged"
        );
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
        assert_eq!(strings(&sc["capabilities"]["add"]), CAPABILITIES);
        // Only the metrics port: the API is a Unix socket.
        let ports = c["ports"].as_array().expect("ports");
        assert_eq!(ports.len(), 1, "{ports:?}");
        assert_eq!(ports[0]["name"], "metrics");
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
        }
        let env = c["env"].as_array().expect("env");
        let node = env
            .iter()
            .find(|e| e["name"] == "NODE_NAME")
            .expect("NODE_NAME");
        assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
        assert!(!c["resources"]["limits"]["memory"].is_null());
        assert!(!c["resources"]["requests"]["memory"].is_null());
        assert!(!c["resources"]["requests"]["cpu"].is_null());
        // The bpffs is the node's (pins outlive the pod) without Bidirectional propagation.
        let bpffs = c["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["mountPath"] == "/sys/fs/bpf")
            .expect("bpffs mount");
        assert_eq!(bpffs["mountPropagation"], "HostToContainer");
    }
}

#[test]
fn the_prometheus_operator_objects_have_their_required_fields() {
    let Some((_, python)) = tools("the_prometheus_operator_objects_have_their_required_fields")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    for region in OVERLAYS {
        let docs = documents(
            &python,
            &render(&repo().join("k8s/overlays").join(region)),
            dir.path(),
        );
        let ds = kind(&docs, "DaemonSet");
        let pod_labels = ds["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .expect("pod labels");
        let port_names: Vec<&str> = ds["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();

        let pm = kind(&docs, "PodMonitor");
        assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
        let selector = pm["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("PodMonitor spec.selector.matchLabels");
        assert!(!selector.is_empty());
        for (k, v) in selector {
            assert_eq!(
                pod_labels.get(k),
                Some(v),
                "the PodMonitor selects the agent pods"
            );
        }
        let endpoints = pm["spec"]["podMetricsEndpoints"]
            .as_array()
            .expect("PodMonitor spec.podMetricsEndpoints");
        assert!(!endpoints.is_empty());
        for e in endpoints {
            let port = e["port"].as_str().expect("endpoint port (a name)");
            assert!(port_names.contains(&port), "port {port} is the pod's");
        }

        let svc = kind(&docs, "Service");
        for (k, v) in svc["spec"]["selector"].as_object().expect("selector") {
            assert_eq!(
                pod_labels.get(k),
                Some(v),
                "the Service selects the agent pods"
            );
        }

        let pr = kind(&docs, "PrometheusRule");
        assert_eq!(pr["apiVersion"], "monitoring.coreos.com/v1");
        let groups = pr["spec"]["groups"].as_array().expect("spec.groups");
        assert!(!groups.is_empty());
        for g in groups {
            assert!(g["name"].is_string(), "group name");
            let rules = g["rules"].as_array().expect("rules");
            assert!(!rules.is_empty());
            for r in rules {
                assert!(r["alert"].is_string() || r["record"].is_string(), "{r}");
                assert!(r["expr"].is_string(), "{r}");
            }
        }
        // The rendered rules pass promtool (JSON is YAML).
        let file = dir.path().join("rules.json");
        std::fs::write(&file, pr["spec"].to_string()).expect("write");
        let out = run(Command::new("promtool").args(["check", "rules"]).arg(&file));
        assert!(out.contains("SUCCESS: 9 rules found"), "{out}");
    }
}

/// The value the kubelet gives an env var: `$(VAR)` expanded from the earlier vars, fieldRefs
/// as a node would fill them.
fn env_of(container: &Value) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().expect("env") {
        let name = e["name"].as_str().expect("name").to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_owned();
            for (k, val) in &vars {
                v = v.replace(&format!("$({k})"), val);
            }
            assert!(!v.contains("$("), "{name}={v}: an undefined variable");
            v
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => "node-a".into(),
                Some("status.podIP") => "10.1.2.3".into(),
                Some("metadata.name") => "knhk-agent-x7k2p".into(),
                other => panic!("{name}: a value source this test does not know: {other:?}"),
            }
        };
        vars.push((name, value));
    }
    vars
}

/// `knhk-agent <subcommand> --help` lists `flag`.
fn assert_flag(subcommand: &str, flag: &str) {
    let help = run(Command::new(env!("CARGO_BIN_EXE_knhk-agent")).args([subcommand, "--help"]));
    assert!(
        help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}=")),
        "`knhk-agent {subcommand}` has no flag {flag}:\n{help}"
    );
}

#[test]
fn every_flag_env_override_and_config_key_of_the_manifests_exists() {
    let Some((_, python)) = tools("every_flag_env_override_and_config_key_of_the_manifests_exists")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    for region in OVERLAYS {
        let docs = documents(
            &python,
            &render(&repo().join("k8s/overlays").join(region)),
            dir.path(),
        );
        let ds = kind(&docs, "DaemonSet");
        let pod = &ds["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        // The image's entrypoint is `/knhk-agent run` (cargo xtask image): these are run's.
        assert!(c["command"].is_null(), "the image's entrypoint runs `run`");
        let args = strings(&c["args"]);
        assert_eq!(args.len(), 2, "{args:?}");
        assert_flag("run", args[0]);
        let config_path = Path::new(args[1]);

        // The config file is the ConfigMap's key, mounted where --config points.
        let mounts = c["volumeMounts"].as_array().expect("mounts");
        let config_mount = mounts
            .iter()
            .find(|m| {
                config_path.parent() == Some(Path::new(m["mountPath"].as_str().unwrap_or("")))
            })
            .expect("a volume mounted at the --config file's directory");
        let volume = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == config_mount["name"])
            .expect("the config volume");
        let cm = kind(&docs, "ConfigMap");
        assert_eq!(volume["configMap"]["name"], cm["metadata"]["name"]);
        let key = config_path
            .file_name()
            .and_then(|f| f.to_str())
            .expect("name");
        let toml = cm["data"][key]
            .as_str()
            .expect("the ConfigMap has the --config file");
        assert!(
            !toml
                .lines()
                .any(|l| l.trim_start().starts_with("cgroup_root")),
            "cgroup_root is detected, not set"
        );

        // Every KNHK_<TABLE>__<KEY> names a key of the schema (an unknown one is an error here),
        // and the TOML with them is a valid configuration.
        let env = env_of(c);
        let overrides: Vec<(String, String)> = env
            .iter()
            .filter(|(k, _)| k.starts_with("KNHK_"))
            .cloned()
            .collect();
        for (k, _) in &overrides {
            assert!(
                k.contains("__"),
                "{k} is not a KNHK_<TABLE>__<KEY> override"
            );
        }
        let config = knhk_agent::config::Config::parse_with_env(
            toml,
            "ConfigMap agent.toml",
            overrides.clone(),
        )
        .unwrap_or_else(|e| panic!("{region}: the ConfigMap with the DaemonSet's env: {e}"));
        assert_eq!(
            config.agent.metrics_address.to_string(),
            "10.1.2.3:9464",
            "/metrics on the pod's address"
        );
        assert!(
            format!("{:?}", config.multi_region).contains(&format!("\"{region}\"")),
            "{region}: multi_region.region"
        );
        assert!(
            !config.agent.heat_enabled,
            "destination-naming heat is opt-in"
        );
        assert!(
            !config.agent.detach_on_exit,
            "a rolling update keeps the pins"
        );

        // The paths the agent uses are on the pod's mounts.
        let mounted = |p: &Path, what: &str| {
            assert!(
                mounts
                    .iter()
                    .filter_map(|m| m["mountPath"].as_str())
                    .any(|m| p.starts_with(m)),
                "{what} {} is on none of the pod's mounts",
                p.display()
            );
        };
        mounted(&config.agent.pin_root, "agent.pin_root");
        mounted(&config.agent.state_dir, "agent.state_dir");
        mounted(&config.agent.api_socket, "agent.api_socket");

        // The agent binary itself accepts the file with that environment.
        let file = dir.path().join(key);
        std::fs::write(&file, toml).expect("write");
        run(Command::new(env!("CARGO_BIN_EXE_knhk-agent"))
            .arg("check-config")
            .arg(&file)
            .env_clear()
            .envs(overrides));
    }

    // The uninstall Job: its subcommand and flags exist, and it detaches the DaemonSet's pins.
    let job = std::fs::read_to_string(repo().join("k8s/uninstall/detach-job.yaml")).expect("job");
    let job = documents(&python, &job, dir.path());
    let c = &job[0]["spec"]["template"]["spec"]["containers"][0];
    let command = strings(&c["command"]);
    assert_eq!(&command[..2], ["/knhk-agent", "detach"]);
    assert_eq!(command[2], "--pin-root");
    assert_flag("detach", command[2]);
    let toml = std::fs::read_to_string(repo().join("k8s/base/agent.toml")).expect("toml");
    let config = knhk_agent::config::Config::parse(&toml, "agent.toml").expect("config");
    assert_eq!(Path::new(command[3]), config.agent.pin_root);
    // The same image as the DaemonSet's.
    let base = documents(&python, &render(&repo().join("k8s/base")), dir.path());
    assert_eq!(
        c["image"],
        kind(&base, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"],
        "k8s/uninstall/detach-job.yaml runs the image of k8s/base/kustomization.yaml"
    );
}

#[test]
fn the_witness_renders_validates_and_uses_only_real_flags_and_keys() {
    let Some((tool, python)) =
        tools("the_witness_renders_validates_and_uses_only_real_flags_and_keys")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = render(&repo().join("k8s/witness"));
    let file = dir.path().join("witness.yaml");
    std::fs::write(&file, &yaml).expect("write");
    validate(&tool, &file);
    let docs = documents(&python, &yaml, dir.path());
    let mut kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "Deployment",
            "PersistentVolumeClaim",
            "PodMonitor",
            "Service"
        ]
    );
    let deployment = kind(&docs, "Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(strings(&container["command"]), ["/knhk-agent", "witness"]);
    for arg in strings(&container["args"]) {
        let flag = arg.split('=').next().expect("a flag");
        assert_flag("witness", flag);
    }
    // Its configuration loads as the agent's would.
    let toml = std::fs::read_to_string(repo().join("k8s/witness/witness.toml")).expect("toml");
    knhk_agent::config::Config::parse(&toml, "k8s/witness/witness.toml")
        .expect("k8s/witness/witness.toml loads");
}
