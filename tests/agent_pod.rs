//! The install path a cluster takes, minus the scheduler (needs root, cgroup v2, BPF, containerd
//! and runc): the agent's OCI image (`cargo xtask image`, of the binary under test) imported into
//! a real containerd and run as a pod through CRI with the DaemonSet's securityContext (its
//! capabilities, read-only root, no privilege escalation, the runtime's default seccomp profile),
//! mounts and env; a throwaway cgroup root and pin root, never the machine's. That pod enforces a
//! label-selected deny on another pod; a rolling update to a new image keeps enforcing without a
//! gap and keeps the live policy; the uninstall Job's command detaches.

mod support;

use k8s_cri::v1::{
    Capability, ContainerConfig, ContainerMetadata, ImageSpec, KeyValue, LinuxContainerConfig,
    LinuxContainerSecurityContext, Mount, MountPropagation, NamespaceMode, NamespaceOption,
    SecurityProfile,
};
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use support::{cri::*, *};

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const BIN: &str = env!("CARGO_BIN_EXE_knhk-agent");

/// The capabilities the DaemonSet adds, read from `k8s/base/daemonset.yaml`.
fn daemonset_capabilities() -> Vec<String> {
    let yaml = std::fs::read_to_string(format!("{WORKSPACE}/k8s/base/daemonset.yaml"))
        .expect("daemonset.yaml");
    let mut caps = Vec::new();
    let mut in_add = false;
    for line in yaml.lines() {
        let t = line.trim();
        if t.starts_with('#') {
            continue;
        }
        if t == "add:" {
            in_add = true;
            continue;
        }
        if in_add {
            match t.strip_prefix("- ") {
                Some(cap) => caps.push(cap.to_owned()),
                None => in_add = false,
            }
        }
    }
    assert!(!caps.is_empty(), "no capabilities found in the DaemonSet");
    caps
}

/// A throwaway directory on the bpffs, bind-mounted onto itself and made shared, so containerd
/// accepts it as a `HostToContainer` source (the machine's mounts are private).
struct SharedPinDir {
    path: PathBuf,
}

impl SharedPinDir {
    fn new(name: &str) -> SharedPinDir {
        let path = PathBuf::from(format!(
            "/sys/fs/bpf/knhk-test-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("mkdir pin dir");
        for args in [
            vec![
                "--bind",
                path.to_str().expect("utf-8"),
                path.to_str().expect("utf-8"),
            ],
            vec!["--make-shared", path.to_str().expect("utf-8")],
        ] {
            let st = Command::new("mount").args(&args).status().expect("mount");
            assert!(st.success(), "mount {args:?}");
        }
        SharedPinDir { path }
    }
}

impl Drop for SharedPinDir {
    fn drop(&mut self) {
        let _ = knhk_agent::datapath::remove_pins(&self.path.join("knhk"));
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Builds the agent image from the binary under test with `cargo xtask image`, imports it, and
/// returns its name (`ghcr.io/knhk/knhk-agent:<version>`).
fn agent_image(ctr: &Containerd, out: &Path, version: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .current_dir(WORKSPACE)
        .args(["run", "-q", "-p", "xtask", "--", "image", "--binary", BIN])
        .args(["--version", version, "--out-dir"])
        .arg(out)
        .output()
        .expect("cargo xtask image");
    assert!(
        built.status.success(),
        "cargo xtask image: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let reference = String::from_utf8_lossy(&built.stdout).trim().to_owned();
    assert!(reference.contains("@sha256:"), "{reference}");
    ctr.import_archive(&out.join(format!("knhk-agent-{version}.oci.tar")));
    format!("ghcr.io/knhk/knhk-agent:{version}")
}

fn mount(host: &Path, container: &str, readonly: bool, propagation: MountPropagation) -> Mount {
    Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        readonly,
        propagation: propagation as i32,
        ..Default::default()
    }
}

/// The agent's container as the DaemonSet declares it, with the test's host paths.
fn agent_container(
    image: &str,
    cmd: Option<Vec<String>>,
    mounts: Vec<Mount>,
    caps: &[String],
    metrics: u16,
) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "agent".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: cmd.unwrap_or_default(),
        args: vec!["--config".into(), "/etc/knhk/agent.toml".into()],
        envs: vec![
            KeyValue {
                key: "NODE_NAME".into(),
                value: "test-node".into(),
            },
            KeyValue {
                key: "KNHK_AGENT__METRICS_ADDRESS".into(),
                value: format!("127.0.0.1:{metrics}"),
            },
        ],
        mounts,
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    add_capabilities: caps.to_vec(),
                    drop_capabilities: vec!["ALL".into()],
                    ..Default::default()
                }),
                privileged: false,
                readonly_rootfs: true,
                no_new_privs: true,
                run_as_user: Some(k8s_cri::v1::Int64Value { value: 0 }),
                seccomp: Some(SecurityProfile {
                    profile_type: k8s_cri::v1::security_profile::ProfileType::RuntimeDefault as i32,
                    ..Default::default()
                }),
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `GET path` on 127.0.0.1:`port`: the status and body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    support::http::request(("127.0.0.1", port), "GET", path, &[], "")
}

fn status_json(socket: &Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["status", "--output", "json", "--endpoint"])
        .arg(format!("unix://{}", socket.display()))
        .output()
        .expect("status");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status: {e}: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn kernel_the_agent_image_runs_as_a_pod_enforces_updates_and_uninstalls() {
    let name = "kernel_the_agent_image_runs_as_a_pod_enforces_updates_and_uninstalls";
    if !kernel_available(name) || !containerd_available(name) {
        return;
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("agentpod");
    cg.child("kubepods/besteffort");
    let mount_root = knhk_agent::datapath::cgroup::detect_cgroup2_mount().expect("cgroup v2");
    let parent = format!(
        "/{}/kubepods",
        cg.path.strip_prefix(&mount_root).expect("under").display()
    );
    let pins = SharedPinDir::new("agentpod");
    let host = tempfile::tempdir().expect("tempdir");
    let (etc, state, run) = (
        host.path().join("etc"),
        host.path().join("state"),
        host.path().join("run"),
    );
    for d in [&etc, &state, &run] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let mut ctr = Containerd::start("agentpod");
    let image1 = agent_image(&ctr, &host.path().join("image1"), "test-1");
    let image2 = agent_image(&ctr, &host.path().join("image2"), "test-2");
    std::fs::write(
        etc.join("agent.toml"),
        format!(
            "[agent]\ncgroup_root = \"{}\"\npin_root = \"/sys/fs/bpf/knhk\"\nstate_dir = \"/var/lib/knhk\"\n\
             api_socket = \"/run/knhk/agent.sock\"\ncgroup_poll_interval_ms = 10\n\
             [kubernetes]\ncri_socket = \"/run/containerd/containerd.sock\"\nkubepods_root = \"kubepods\"\n\
             [[policy.rules]]\nname = \"api-no-db\"\naction = \"deny\"\ncidrs = [\"127.0.0.1/32\"]\nports = [{}]\n\
             namespace = \"payments\"\npod_selector = {{ match_labels = {{ app = \"api\" }} }}\n",
            cg.path.display(),
            target.port()
        ),
    )
    .expect("write config");
    let caps = daemonset_capabilities();
    let metrics = free_port();
    let cri_socket = ctr.socket.clone();
    let mounts = || {
        vec![
            mount(
                &etc,
                "/etc/knhk",
                true,
                MountPropagation::PropagationPrivate,
            ),
            mount(
                Path::new("/sys/fs/cgroup"),
                "/sys/fs/cgroup",
                true,
                MountPropagation::PropagationPrivate,
            ),
            mount(
                &pins.path,
                "/sys/fs/bpf",
                false,
                MountPropagation::PropagationHostToContainer,
            ),
            mount(
                &state,
                "/var/lib/knhk",
                false,
                MountPropagation::PropagationPrivate,
            ),
            mount(
                &run,
                "/run/knhk",
                false,
                MountPropagation::PropagationPrivate,
            ),
            mount(
                &cri_socket,
                "/run/containerd/containerd.sock",
                true,
                MountPropagation::PropagationPrivate,
            ),
        ]
    };
    let run_agent = |ctr: &mut Containerd, image: &str, pod: &str| {
        let spec = PodSpec {
            namespace: "knhk-system".into(),
            name: pod.into(),
            labels: vec![("app.kubernetes.io/name".into(), "knhk-agent".into())],
            container: Some(agent_container(image, None, mounts(), &caps, metrics)),
        };
        let p = ctr.run_pod_spec(&parent, &mount_root, spec);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http_get(metrics, "/readyz").is_some_and(|(status, _)| status == 200) {
                break;
            }
            let (state, code) = ctr.container_state(&p);
            assert!(
                state != "CONTAINER_EXITED" && Instant::now() < deadline,
                "the agent pod is not ready ({state}, exit {code}); its log:\n{}",
                ctr.container_log(&p)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    };

    // The workloads, then the agent as a pod with the DaemonSet's securityContext.
    let api = ctr.run_pod(&parent, &mount_root, "payments", "api", &[("app", "api")]);
    let web = ctr.run_pod(&parent, &mount_root, "payments", "web", &[("app", "web")]);
    assert_eq!(ctr.connect_from(&api, target.port()), Ok(()));
    let agent1 = run_agent(&mut ctr, &image1, "knhk-agent-a");
    let out = ctr.connect_from(&api, target.port());
    assert!(
        matches!(&out, Err(e) if e.contains("Operation not permitted")),
        "the label-selected pod is not denied: {out:?}; status: {}; readyz: {:?}; logs dir: {:?}; agent log:\n{}",
        status_json(&run.join("agent.sock")),
        http_get(metrics, "/readyz"),
        std::fs::read_dir(ctr.dir.join("logs")).map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect::<Vec<_>>()),
        ctr.container_log(&agent1)
    );
    assert_eq!(ctr.connect_from(&web, target.port()), Ok(()));
    let before = status_json(&run.join("agent.sock"));
    assert_eq!(before["policy_source"], "file");

    // Rolling update: the old pod goes (SIGTERM), the new image's pod comes; connects from the
    // selected pod meanwhile, back to back: none admitted.
    let stop = Arc::new(AtomicBool::new(false));
    let (tried, admitted) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let prober = {
        let (stop, tried, admitted) = (stop.clone(), tried.clone(), admitted.clone());
        let dir = api.cgroup_dir.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let counts = tcp_connect_loop_from(&dir, target, 200);
                tried.fetch_add(200, Ordering::Relaxed);
                admitted.fetch_add(200 - counts.denied, Ordering::Relaxed);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    ctr.delete_pod_gracefully(&agent1);
    let agent2 = run_agent(&mut ctr, &image2, "knhk-agent-b");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    prober.join().expect("prober");
    let (tried, admitted) = (
        tried.load(Ordering::Relaxed),
        admitted.load(Ordering::Relaxed),
    );
    assert!(tried > 1000, "only {tried} connects during the update");
    assert_eq!(
        admitted, 0,
        "{admitted} of {tried} connects admitted during the rolling update"
    );
    let after = status_json(&run.join("agent.sock"));
    assert_eq!(
        after["generation"], before["generation"],
        "the live policy was re-adopted"
    );
    assert!(
        ctr.container_log(&agent2).contains("re-adopt"),
        "{}",
        ctr.container_log(&agent2)
    );
    println!("rolling update: {tried} connects from the selected pod, {admitted} admitted");

    // Uninstall: the DaemonSet's pods go, then the Job's command detaches.
    ctr.delete_pod_gracefully(&agent2);
    assert!(
        matches!(ctr.connect_from(&api, target.port()), Err(e) if e.contains("Operation not permitted")),
        "pins keep enforcing while no agent runs"
    );
    let detach = ctr.run_pod_spec(
        &parent,
        &mount_root,
        PodSpec {
            namespace: "knhk-system".into(),
            name: "knhk-detach".into(),
            labels: vec![],
            container: Some(ContainerConfig {
                args: vec![],
                ..agent_container(
                    &image2,
                    Some(vec![
                        "/knhk-agent".into(),
                        "detach".into(),
                        "--pin-root".into(),
                        "/sys/fs/bpf/knhk".into(),
                    ]),
                    vec![mount(
                        &pins.path,
                        "/sys/fs/bpf",
                        false,
                        MountPropagation::PropagationHostToContainer,
                    )],
                    &[],
                    metrics,
                )
            }),
        },
    );
    wait_until(
        "the detach Job's container exits",
        Duration::from_secs(30),
        || ctr.container_state(&detach).0 == "CONTAINER_EXITED",
    );
    assert_eq!(
        ctr.container_state(&detach).1,
        0,
        "{}",
        ctr.container_log(&detach)
    );
    assert_eq!(
        ctr.connect_from(&api, target.port()),
        Ok(()),
        "detached: admitted again"
    );
}
