//! A real containerd (Debian's 1.6, its built-in CRI plugin, runc) run privately by a test, and
//! real pods made through CRI as the kubelet makes them: labelled sandboxes whose cgroups sit
//! under a throwaway `kubepods` root, containers running busybox, commands run inside with
//! ExecSync. See `../shared/REAL_SERVERS.md` ("Real Kubernetes pods without a cluster").
//!
//! No registry is reachable: one image (busybox-static and its applets) is built locally as a
//! docker-archive and imported under `localhost/busybox:local` and `localhost/pause:local`.

use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ContainerConfig, ContainerMetadata,
    CreateContainerRequest, ExecSyncRequest, ImageSpec, LinuxContainerConfig,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest,
};
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};
use tonic::transport::Channel;

/// Whether containerd and runc are installed (by `cargo xtask setup`). Prints why not and
/// returns `false`, or panics under `KNHK_REQUIRE_KERNEL_TESTS=1`.
pub fn containerd_available(test: &str) -> bool {
    let missing: Vec<&str> = ["containerd", "runc", "ctr", "busybox"]
        .into_iter()
        .filter(|b| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "needs {} (apt-get install containerd runc busybox-static; `cargo xtask setup` does)",
        missing.join(", ")
    );
    if std::env::var("KNHK_REQUIRE_KERNEL_TESTS").as_deref() == Ok("1") {
        panic!("{test}: {why}, and KNHK_REQUIRE_KERNEL_TESTS=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// A private containerd: its own root, state, socket and runc root under a temp dir.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
    /// Pods made through [`Containerd::run_pod`] and not removed yet (removed on drop).
    pods: HashMap<String, TestPod>,
}

/// What [`Containerd::run_pod_spec`] runs: a host-network pod with one container (by default
/// `app`, busybox sleeping).
#[derive(Default)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
    /// The container (default: `app`, busybox sleeping).
    pub container: Option<ContainerConfig>,
}

/// A pod made by a test.
#[derive(Debug, Clone)]
pub struct TestPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub sandbox_id: String,
    pub container_id: String,
    /// The pod's cgroup directory (absolute).
    pub cgroup_dir: PathBuf,
}

impl Containerd {
    /// Starts containerd and imports the test image.
    pub fn start(name: &str) -> Containerd {
        let dir = std::env::temp_dir().join(super::unique(name));
        std::fs::create_dir_all(dir.join("cni/bin")).expect("mkdir cni");
        std::fs::create_dir_all(dir.join("cni/conf")).expect("mkdir cni");
        let socket = dir.join("containerd.sock");
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:local"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
"#
        );
        std::fs::write(dir.join("config.toml"), config).expect("write containerd config");
        let mut c = Containerd {
            dir,
            socket,
            child: None,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            pods: HashMap::new(),
        };
        c.launch();
        c.import_image();
        c
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.join("containerd.log")).expect("log file");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.socket.exists() && self.client_once().is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up in 20 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// containerd's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Stops containerd (SIGTERM, wait); pods and their processes keep running.
    pub fn stop_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Starts containerd again after [`Containerd::stop_daemon`].
    pub fn restart_daemon(&mut self) {
        self.launch();
    }

    fn client_once(&self) -> Result<RuntimeServiceClient<Channel>, String> {
        let path = self.socket.clone();
        self.rt.block_on(async move {
            let channel = tonic::transport::Endpoint::from_static("http://localhost")
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(30))
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(&path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
                .map_err(|e| e.to_string())?;
            let mut client = RuntimeServiceClient::new(channel);
            client
                .version(k8s_cri::v1::VersionRequest {
                    version: "v1".into(),
                })
                .await
                .map_err(|e| e.to_string())?;
            Ok(client)
        })
    }

    fn client(&self) -> RuntimeServiceClient<Channel> {
        self.client_once()
            .unwrap_or_else(|e| panic!("CRI client: {e}; containerd log:\n{}", self.log()))
    }

    /// Builds the busybox image as a docker-archive and imports it under both test names.
    fn import_image(&self) {
        let build = self.dir.join("image");
        let rootfs = build.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir rootfs");
        std::fs::create_dir_all(rootfs.join("tmp")).expect("mkdir tmp");
        let busybox = which("busybox");
        std::fs::copy(&busybox, rootfs.join("bin/busybox")).expect("copy busybox");
        for applet in ["sh", "sleep", "nc", "cat", "echo", "ls", "true", "timeout"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("applet link");
        }
        run(Command::new("tar")
            .arg("-cf")
            .arg(build.join("layer.tar"))
            .arg("-C")
            .arg(&rootfs)
            .arg("."));
        let layer = std::fs::read(build.join("layer.tar")).expect("read layer");
        let diff_id = hex_sha256(&layer);
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": ["/bin/sleep"],
                "Cmd": ["3600000"],
                "Env": ["PATH=/bin"],
            },
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        })
        .to_string();
        let config_name = format!("{}.json", hex_sha256(config.as_bytes()));
        std::fs::write(build.join(&config_name), &config).expect("write config");
        let manifest = serde_json::json!([{
            "Config": config_name,
            "RepoTags": ["localhost/busybox:local", "localhost/pause:local"],
            "Layers": ["layer.tar"],
        }]);
        std::fs::write(build.join("manifest.json"), manifest.to_string()).expect("manifest");
        run(Command::new("tar")
            .arg("-cf")
            .arg(build.join("image.tar"))
            .arg("-C")
            .arg(&build)
            .args(["manifest.json", &config_name, "layer.tar"]));
        run(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(build.join("image.tar")));
    }

    /// Runs a host-network pod `namespace/name` with `labels`, its cgroup under
    /// `kubepods_parent` (the cgroup path of the pods root from the hierarchy root, e.g.
    /// `/knhk-test-…/kubepods`) in QoS class `besteffort`, and one container `app` that sleeps.
    pub fn run_pod(
        &mut self,
        kubepods_parent: &str,
        cgroup_mount: &Path,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> TestPod {
        self.run_pod_spec(
            kubepods_parent,
            cgroup_mount,
            PodSpec {
                namespace: namespace.into(),
                name: name.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..PodSpec::default()
            },
        )
    }

    /// Imports an OCI or docker archive into the runtime's `k8s.io` namespace.
    pub fn import_archive(&self, archive: &Path) {
        run(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(archive));
    }

    /// Runs a host-network pod as `spec` describes, as [`Containerd::run_pod`] does.
    pub fn run_pod_spec(
        &mut self,
        kubepods_parent: &str,
        cgroup_mount: &Path,
        spec: PodSpec,
    ) -> TestPod {
        let PodSpec {
            namespace,
            name,
            labels,
            container,
        } = spec;
        let uid = uuid_like();
        let cgroup_parent = format!("{kubepods_parent}/besteffort/pod{uid}");
        let mut labels: HashMap<String, String> = labels.into_iter().collect();
        // What the kubelet adds to every sandbox.
        labels.insert("io.kubernetes.pod.name".into(), name.clone());
        labels.insert("io.kubernetes.pod.namespace".into(), namespace.clone());
        labels.insert("io.kubernetes.pod.uid".into(), uid.clone());
        let sandbox_config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.clone(),
                uid: uid.clone(),
                namespace: namespace.clone(),
                attempt: 0,
            }),
            log_directory: self.dir.join("logs").display().to_string(),
            labels,
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent,
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut client = self.client();
        let sandbox_id = self
            .rt
            .block_on(client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: String::new(),
            }))
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}; log:\n{}", self.log()))
            .into_inner()
            .pod_sandbox_id;
        let mut config = container.unwrap_or_else(|| ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: "localhost/busybox:local".into(),
                ..Default::default()
            }),
            linux: Some(LinuxContainerConfig::default()),
            ..Default::default()
        });
        config.log_path = format!(
            "{name}-{}.log",
            config.metadata.as_ref().map_or("c", |m| m.name.as_str())
        );
        let container_id = self
            .rt
            .block_on(client.create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox_id.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            }))
            .unwrap_or_else(|e| panic!("CreateContainer: {e}; log:\n{}", self.log()))
            .into_inner()
            .container_id;
        self.rt
            .block_on(client.start_container(StartContainerRequest {
                container_id: container_id.clone(),
            }))
            .unwrap_or_else(|e| panic!("StartContainer: {e}; log:\n{}", self.log()));
        let pod = TestPod {
            namespace,
            name,
            cgroup_dir: cgroup_mount
                .join(kubepods_parent.trim_start_matches('/'))
                .join("besteffort")
                .join(format!("pod{uid}")),
            uid,
            sandbox_id,
            container_id,
        };
        self.pods.insert(pod.uid.clone(), pod.clone());
        pod
    }

    /// The container's log (what it wrote to stdout and stderr).
    pub fn container_log(&self, pod: &TestPod) -> String {
        let dir = self.dir.join("logs");
        std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("{}-", pod.name))
                    })
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }

    /// The state of the pod's container (`CONTAINER_RUNNING`, `CONTAINER_EXITED`, ...) and its
    /// exit code.
    pub fn container_state(&self, pod: &TestPod) -> (String, i32) {
        let mut client = self.client();
        let s = self
            .rt
            .block_on(
                client.container_status(k8s_cri::v1::ContainerStatusRequest {
                    container_id: pod.container_id.clone(),
                    verbose: false,
                }),
            )
            .unwrap_or_else(|e| panic!("ContainerStatus: {e}"))
            .into_inner()
            .status
            .unwrap_or_default();
        (
            k8s_cri::v1::ContainerState::try_from(s.state)
                .map(|st| st.as_str_name().to_owned())
                .unwrap_or_default(),
            s.exit_code,
        )
    }

    /// Runs `cmd` in the pod's container; returns (exit code, stdout + stderr).
    pub fn exec(&self, pod: &TestPod, cmd: &[&str]) -> (i32, String) {
        let mut client = self.client();
        let r = self
            .rt
            .block_on(client.exec_sync(ExecSyncRequest {
                container_id: pod.container_id.clone(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 10,
            }))
            .unwrap_or_else(|e| panic!("ExecSync: {e}; log:\n{}", self.log()))
            .into_inner();
        (
            r.exit_code,
            format!(
                "{}{}",
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            ),
        )
    }

    /// `nc` from inside the pod to 127.0.0.1:`port`: Ok on a connect, Err(output) otherwise.
    pub fn connect_from(&self, pod: &TestPod, port: u16) -> Result<(), String> {
        let (code, out) = self.exec(pod, &["nc", "-w", "2", "127.0.0.1", &port.to_string()]);
        if code == 0 {
            Ok(())
        } else {
            Err(out)
        }
    }

    /// Deletes the pod as the kubelet does: its container is stopped first (SIGTERM, then
    /// SIGKILL after a 30 s grace period), then the sandbox, then [`Containerd::remove_pod`].
    pub fn delete_pod_gracefully(&mut self, pod: &TestPod) {
        let mut client = self.client();
        self.rt
            .block_on(client.stop_container(k8s_cri::v1::StopContainerRequest {
                container_id: pod.container_id.clone(),
                timeout: 30,
            }))
            .unwrap_or_else(|e| panic!("StopContainer: {e}"));
        self.remove_pod(pod);
    }

    /// Stops and removes the pod at once (its processes are killed: busybox `sleep` as PID 1
    /// ignores SIGTERM), and removes its cgroup directory as the kubelet would.
    pub fn remove_pod(&mut self, pod: &TestPod) {
        let mut client = self.client();
        let _ = self
            .rt
            .block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.sandbox_id.clone(),
            }));
        let _ = self
            .rt
            .block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.sandbox_id.clone(),
            }));
        remove_tree(&pod.cgroup_dir);
        self.pods.remove(&pod.uid);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Pods first: with containerd gone their shims would keep running.
        let pods: Vec<TestPod> = self.pods.values().cloned().collect();
        if self.child.is_some() {
            for p in &pods {
                self.remove_pod(p);
            }
        }
        self.stop_daemon();
        // Unmount what containerd left mounted (sandbox shm, rootfs) before removing the dir.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l",
                self.dir.display()
            ))
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn which(bin: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .expect("sh");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn hex_sha256(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A random RFC 4122-shaped UID.
fn uuid_like() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("random");
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
