//! Workload discovery: which Kubernetes pods run on this node, with their namespaces, labels,
//! containers and cgroups, so rules can select workloads instead of naming cgroup paths.
//!
//! Two sources, as a node agent must combine them on containerd 1.6 (no `GetContainerEvents`):
//! - the **cgroup tree** under `kubepods_root`, watched with inotify: a new pod or container
//!   directory is noticed as it is made, before the pod's first process runs;
//! - the **container runtime** (CRI `RuntimeService` over its socket), asked what the new
//!   directories are: pod UID, namespace, name, labels, container names.
//!
//! Where the runtime has `GetContainerEvents` (containerd 1.7+, CRI-O), its events are a third
//! trigger. [`Discovery::run`] publishes an [`Inventory`] whenever any of them shows a change,
//! and reads the whole pod list again every `resync_interval_ms` in case an event was missed. When the runtime is
//! absent or restarting, the pods already known stay in the inventory (so their rules stay
//! enforced), readiness names the runtime, and new pods are classified once it answers.

mod cri;
pub mod layout;

use crate::{
    config::{CgroupDriver, KubernetesSection},
    model::{workload::Container, Action, CgroupPath, Inventory, Pod},
};
use cri::{Listing, Runtime};
use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tracing::{debug, info, warn};

/// How often unclassified pod directories are asked about again, for how long after they
/// appeared (a sandbox's cgroup exists a moment before the runtime lists it).
const RETRY_EVERY: Duration = Duration::from_millis(20);
const RETRY_FOR: Duration = Duration::from_secs(3);

/// `[kubernetes]` resolved against the node: paths, driver and defaults filled in.
#[derive(Debug, Clone)]
pub struct WorkloadSettings {
    /// The agent's cgroup root (absolute).
    pub cgroup_root: PathBuf,
    /// Where pods live, relative to the cgroup root.
    pub kubepods_root: CgroupPath,
    /// How pod cgroups are named.
    pub driver: CgroupDriver,
    /// The CRI socket (`None`: none of the standard ones exists).
    pub cri_socket: Option<PathBuf>,
    /// What unclassified pods' connects get.
    pub unknown_pod_action: Action,
    /// Full re-read interval.
    pub resync: Duration,
    /// This node's name, if known.
    pub node_name: Option<String>,
}

impl WorkloadSettings {
    /// Fills in the defaults of `section` for a node whose cgroup root is `cgroup_root`.
    pub fn resolve(section: &KubernetesSection, cgroup_root: &Path) -> WorkloadSettings {
        let driver = section
            .cgroup_driver
            .unwrap_or_else(|| layout::detect_driver(cgroup_root));
        let kubepods_root = section
            .kubepods_root
            .clone()
            .unwrap_or_else(|| CgroupPath::constant(layout::default_kubepods_root(driver)));
        WorkloadSettings {
            cgroup_root: cgroup_root.to_owned(),
            kubepods_root,
            driver,
            cri_socket: section
                .cri_socket
                .clone()
                .or_else(|| layout::default_cri_socket().map(PathBuf::from)),
            unknown_pod_action: section.unknown_pod_action.unwrap_or(Action::Allow),
            resync: Duration::from_millis(section.resync_interval_ms.unwrap_or(5000)),
            node_name: section
                .node_name
                .clone()
                .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty())),
        }
    }
}

/// The runtime's health as discovery last saw it, for readiness and status.
#[derive(Debug, Clone, Default)]
pub struct RuntimeHealth {
    /// `name version` of the runtime, once it answered.
    pub runtime: Option<String>,
    /// Why the last call failed, if it did.
    pub error: Option<String>,
}

/// A pod directory found in the cgroup tree.
#[derive(Debug, Clone)]
struct PodDir {
    uid: String,
    cgroup: CgroupPath,
    /// (container id, cgroup) of its container directories.
    containers: Vec<(String, CgroupPath)>,
}

/// Finds the node's pods and keeps an [`Inventory`] of them.
pub struct Discovery {
    settings: WorkloadSettings,
    runtime: Option<Runtime>,
    listing: Listing,
    listed_at: Option<Instant>,
    first_seen: HashMap<String, Instant>,
    health: Arc<Mutex<RuntimeHealth>>,
}

impl Discovery {
    /// Discovery with `settings` (nothing is read yet).
    pub fn new(settings: WorkloadSettings) -> Discovery {
        let health = RuntimeHealth {
            runtime: None,
            error: settings.cri_socket.is_none().then(|| {
                "no CRI socket found (looked for containerd's and CRI-O's); set kubernetes.cri_socket".to_owned()
            }),
        };
        Discovery {
            runtime: settings.cri_socket.clone().map(Runtime::new),
            settings,
            listing: Listing::default(),
            listed_at: None,
            first_seen: HashMap::new(),
            health: Arc::new(Mutex::new(health)),
        }
    }

    /// The settings in use.
    pub fn settings(&self) -> &WorkloadSettings {
        &self.settings
    }

    /// A readiness check: fails, naming the runtime and the reason, while the runtime cannot
    /// be asked (known pods stay enforced meanwhile).
    pub fn readiness_check(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let health = self.health.clone();
        let socket = self.settings.cri_socket.clone();
        move || {
            let h = health.lock().map(|h| h.clone()).unwrap_or_default();
            match h.error {
                None => Ok(()),
                Some(e) => Err(format!(
                    "container runtime {}at {}: {e}; pods already known stay enforced, new pods wait for it",
                    h.runtime.map(|r| format!("({r}) ")).unwrap_or_default(),
                    socket
                        .as_deref()
                        .map_or_else(|| "(none)".to_owned(), |p| p.display().to_string())
                )),
            }
        }
    }

    fn root_dir(&self) -> PathBuf {
        self.settings
            .cgroup_root
            .join(self.settings.kubepods_root.as_str())
    }

    /// The pod directories under the pods root: in the root itself (Guaranteed) and in each
    /// QoS directory.
    fn scan(&self) -> Vec<PodDir> {
        let driver = self.settings.driver;
        let root = self.root_dir();
        let mut parents = vec![(root.clone(), self.settings.kubepods_root.to_string())];
        for qos in layout::QOS_CLASSES {
            let dir = layout::qos_dir(driver, qos);
            parents.push((
                root.join(&dir),
                format!("{}/{dir}", self.settings.kubepods_root),
            ));
        }
        let mut pods = Vec::new();
        for (dir, rel) in parents {
            for (name, path) in subdirs(&dir) {
                let Some(uid) = layout::pod_uid(driver, &name) else {
                    continue;
                };
                let Ok(cgroup) = format!("{rel}/{name}").parse::<CgroupPath>() else {
                    continue;
                };
                let containers = subdirs(&path)
                    .into_iter()
                    .filter_map(|(c, _)| {
                        let id = layout::container_id(driver, &c)?;
                        let cg = format!("{cgroup}/{c}").parse().ok()?;
                        Some((id, cg))
                    })
                    .collect();
                pods.push(PodDir {
                    uid,
                    cgroup,
                    containers,
                });
            }
        }
        pods.sort_by(|a, b| a.uid.cmp(&b.uid));
        pods
    }

    /// Reads the tree, asks the runtime about what it does not know yet (or everything, with
    /// `full`), and returns the inventory.
    pub async fn snapshot(&mut self, full: bool) -> Inventory {
        let dirs = self.scan();
        let now = Instant::now();
        self.first_seen
            .retain(|uid, _| dirs.iter().any(|d| &d.uid == uid));
        let unknown = |d: &PodDir, l: &Listing| match l.sandboxes.iter().find(|s| s.uid == d.uid) {
            None => true,
            Some(_) => d.containers.iter().any(|(id, _)| {
                !l.containers.iter().any(|c| &c.id == id)
                    && !l.sandboxes.iter().any(|s| &s.id == id)
            }),
        };
        let recent = |uid: &str, seen: &HashMap<String, Instant>| {
            seen.get(uid)
                .is_some_and(|t| now.duration_since(*t) < RETRY_FOR)
        };
        for d in &dirs {
            self.first_seen.entry(d.uid.clone()).or_insert(now);
        }
        let ask = full
            || self.listed_at.is_none()
            || dirs
                .iter()
                .any(|d| unknown(d, &self.listing) && recent(&d.uid, &self.first_seen));
        if ask {
            self.refresh().await;
        }
        self.inventory(&dirs)
    }

    async fn refresh(&mut self) {
        let Some(runtime) = self.runtime.as_mut() else {
            return;
        };
        let result = runtime.list().await;
        let name = runtime.name.clone();
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.runtime = name;
        match result {
            Ok(listing) => {
                if health.error.take().is_some() {
                    info!(
                        runtime = health.runtime.as_deref().unwrap_or(""),
                        "container runtime answers again: new pods are classified"
                    );
                }
                self.listing = listing;
                self.listed_at = Some(Instant::now());
            }
            Err(e) => {
                if health.error.as_deref() != Some(e.as_str()) {
                    warn!(
                        socket = %runtime.socket().display(),
                        error = %e,
                        "container runtime cannot be asked: pods already known stay enforced, new pods wait"
                    );
                }
                health.error = Some(e);
            }
        }
    }

    fn inventory(&self, dirs: &[PodDir]) -> Inventory {
        let mut pods = Vec::new();
        let mut unclassified = Vec::new();
        for d in dirs {
            let Some(sandbox) = self.listing.sandboxes.iter().find(|s| s.uid == d.uid) else {
                unclassified.push(d.cgroup.clone());
                continue;
            };
            let mut containers: Vec<Container> = d
                .containers
                .iter()
                .filter_map(|(id, cgroup)| {
                    let c = self.listing.containers.iter().find(|c| &c.id == id)?;
                    Some(Container {
                        name: c.name.clone(),
                        id: id.clone(),
                        cgroup: cgroup.clone(),
                    })
                })
                .collect();
            containers.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
            pods.push(Pod {
                uid: d.uid.clone(),
                namespace: sandbox.namespace.clone(),
                name: sandbox.name.clone(),
                labels: sandbox.labels.clone(),
                cgroup: d.cgroup.clone(),
                containers,
            });
        }
        Inventory {
            kubepods_root: self.settings.kubepods_root.clone(),
            unknown_pod_action: self.settings.unknown_pod_action,
            pods,
            unclassified,
        }
    }

    /// Watches the tree and the runtime until `stop` resolves, calling `publish` with each new
    /// inventory (after `initial`, the one the caller already has).
    pub async fn run<F, Fut>(
        mut self,
        initial: Inventory,
        publish: F,
        stop: impl Future<Output = ()>,
    ) where
        F: Fn(Arc<Inventory>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut last = initial;
        let mut watcher = TreeWatcher::new();
        tokio::pin!(stop);
        let mut next_resync = tokio::time::Instant::now() + self.settings.resync;
        // The runtime's own events where it has them (containerd 1.7+, CRI-O): a second trigger
        // beside the tree watch. `None` with `events_supported` false: it has none (1.6).
        let mut events: Option<tonic::Streaming<k8s_cri::v1::ContainerEventResponse>> = None;
        let mut events_supported = true;
        loop {
            if events.is_none() && events_supported {
                if let Some(runtime) = self.runtime.as_mut() {
                    match runtime.events().await {
                        Ok(Some(stream)) => {
                            info!("following the container runtime's events (GetContainerEvents)");
                            events = Some(stream);
                        }
                        Ok(None) => {
                            info!(
                                "the container runtime has no GetContainerEvents (containerd before 1.7): new pods are found by watching the cgroup tree"
                            );
                            events_supported = false;
                        }
                        // Retried at the next turn of the loop (a resync at the latest).
                        Err(e) => debug!(error = %e, "container runtime events unavailable"),
                    }
                }
            }
            watcher.watch_tree(&self.root_dir(), self.settings.driver);
            // Unclassified pods seen recently are asked about again soon (no tree scan needed:
            // the pod UID is in the directory name).
            let driver = self.settings.driver;
            let retrying = last.unclassified.iter().any(|c| {
                c.as_str()
                    .rsplit('/')
                    .next()
                    .and_then(|dir| layout::pod_uid(driver, dir))
                    .and_then(|uid| self.first_seen.get(&uid))
                    .is_some_and(|t| t.elapsed() < RETRY_FOR)
            });
            let mut full = false;
            tokio::select! {
                () = &mut stop => break,
                () = watcher.changed() => {}
                event = next_event(&mut events) => {
                    match event {
                        // The runtime knows something new: read its list again.
                        Some(_) => full = true,
                        None => events = None,
                    }
                }
                () = tokio::time::sleep_until(next_resync) => {
                    full = true;
                    next_resync = tokio::time::Instant::now() + self.settings.resync;
                }
                () = tokio::time::sleep(RETRY_EVERY), if retrying => {}
            }
            let inventory = self.snapshot(full).await;
            if inventory != last {
                debug!(
                    pods = inventory.pods.len(),
                    unclassified = inventory.unclassified.len(),
                    "workload inventory changed"
                );
                publish(Arc::new(inventory.clone())).await;
                last = inventory;
            }
        }
    }
}

/// The next event of the runtime's stream; `None` when it ended or failed (never resolves
/// without a stream).
async fn next_event(
    events: &mut Option<tonic::Streaming<k8s_cri::v1::ContainerEventResponse>>,
) -> Option<k8s_cri::v1::ContainerEventResponse> {
    match events.as_mut() {
        Some(stream) => stream.message().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// inotify watches on the pods root, its QoS directories and each pod directory (where
/// container directories appear). Without inotify it degrades to the resync interval.
struct TreeWatcher {
    inner: crate::dirwatch::DirWatcher,
    watches: crate::dirwatch::WatchHandle,
    watched: BTreeMap<PathBuf, crate::dirwatch::WatchId>,
}

impl TreeWatcher {
    fn new() -> TreeWatcher {
        let inner = crate::dirwatch::DirWatcher::new("new pods are found at each resync only");
        TreeWatcher {
            watches: inner.handle(),
            inner,
            watched: BTreeMap::new(),
        }
    }

    /// Adds watches on directories of the tree not watched yet; forgets removed ones.
    fn watch_tree(&mut self, root: &Path, driver: CgroupDriver) {
        if !self.inner.available() {
            return;
        }
        let mut dirs = vec![root.to_owned()];
        // The root's parent too, so a pods root made after the agent started is noticed.
        if let Some(parent) = root.parent() {
            dirs.push(parent.to_owned());
        }
        let mut parents = vec![root.to_owned()];
        for qos in layout::QOS_CLASSES {
            let q = root.join(layout::qos_dir(driver, qos));
            dirs.push(q.clone());
            parents.push(q);
        }
        for p in &parents {
            for (name, path) in subdirs(p) {
                if layout::pod_uid(driver, &name).is_some() {
                    dirs.push(path);
                }
            }
        }
        self.watched.retain(|p, _| p.is_dir());
        for d in dirs {
            if self.watched.contains_key(&d) || !d.is_dir() {
                continue;
            }
            if let Ok(wd) = self.watches.watch(&d) {
                self.watched.insert(d, wd);
            }
        }
    }

    /// Resolves when something in the watched tree changed (never, without inotify).
    async fn changed(&mut self) {
        // Any change (or an overflow): the caller takes a fresh snapshot.
        let _batch = self.inner.changed().await;
    }
}

/// The subdirectories of `dir` (name, path); none if it cannot be read.
fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect()
}
