//! How the kubelet lays out pod and container cgroups, for both cgroup drivers, and how to read
//! a pod UID or container id back from a directory name. The same names appear on hybrid hosts
//! (under `/sys/fs/cgroup/unified`) and pure cgroup v2 hosts (under `/sys/fs/cgroup`): only the
//! mount differs, and the agent's cgroup root already accounts for it.

use crate::config::CgroupDriver;
use std::path::Path;

/// The QoS classes the kubelet groups pods by. Guaranteed pods sit directly under the root.
pub const QOS_CLASSES: [&str; 2] = ["burstable", "besteffort"];

/// The default pods root of a driver, relative to the cgroup root.
pub fn default_kubepods_root(driver: CgroupDriver) -> &'static str {
    match driver {
        CgroupDriver::Cgroupfs => "kubepods",
        CgroupDriver::Systemd => "kubepods.slice",
    }
}

/// The driver the tree shows: `kubepods.slice` under the cgroup root means systemd.
pub fn detect_driver(cgroup_root: &Path) -> CgroupDriver {
    if cgroup_root.join("kubepods.slice").is_dir() {
        CgroupDriver::Systemd
    } else {
        CgroupDriver::Cgroupfs
    }
}

/// The directory of a QoS class's pods under the pods root (`None` for Guaranteed, whose pods
/// sit in the root itself).
pub fn qos_dir(driver: CgroupDriver, qos: &str) -> String {
    match driver {
        CgroupDriver::Cgroupfs => qos.to_owned(),
        CgroupDriver::Systemd => format!("kubepods-{qos}.slice"),
    }
}

/// The pod directory name the kubelet gives pod `uid` of class `qos` (`None`: Guaranteed).
pub fn pod_dir(driver: CgroupDriver, qos: Option<&str>, uid: &str) -> String {
    match (driver, qos) {
        (CgroupDriver::Cgroupfs, _) => format!("pod{uid}"),
        // systemd slice names cannot hold '-' inside a unit name part: the kubelet writes '_'.
        (CgroupDriver::Systemd, None) => format!("kubepods-pod{}.slice", uid.replace('-', "_")),
        (CgroupDriver::Systemd, Some(q)) => {
            format!("kubepods-{q}-pod{}.slice", uid.replace('-', "_"))
        }
    }
}

/// The pod UID a pod directory name stands for, if it is one.
pub fn pod_uid(driver: CgroupDriver, dir_name: &str) -> Option<String> {
    let uid = match driver {
        CgroupDriver::Cgroupfs => dir_name.strip_prefix("pod")?.to_owned(),
        CgroupDriver::Systemd => {
            let unit = dir_name.strip_suffix(".slice")?;
            let (_, uid) = unit.rsplit_once("-pod")?;
            uid.replace('_', "-")
        }
    };
    is_uid(&uid).then_some(uid)
}

/// The container directory name a runtime gives container `id` (containerd or CRI-O).
pub fn container_dir(driver: CgroupDriver, runtime: &str, id: &str) -> String {
    match driver {
        CgroupDriver::Cgroupfs => id.to_owned(),
        CgroupDriver::Systemd if runtime.contains("cri-o") || runtime == "crio" => {
            format!("crio-{id}.scope")
        }
        CgroupDriver::Systemd => format!("cri-containerd-{id}.scope"),
    }
}

/// The container id a container directory name stands for, if it is one.
pub fn container_id(driver: CgroupDriver, dir_name: &str) -> Option<String> {
    let id = match driver {
        CgroupDriver::Cgroupfs => dir_name,
        CgroupDriver::Systemd => dir_name.strip_suffix(".scope").and_then(|u| {
            u.strip_prefix("cri-containerd-")
                .or_else(|| u.strip_prefix("crio-"))
                .or_else(|| u.strip_prefix("docker-"))
        })?,
    };
    (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// A pod UID: 8-4-4-4-12 hex digits, or any 1-64 characters of `[0-9a-z-]` (static pods use a
/// hash), never a name the kubelet uses for anything else.
fn is_uid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
}

/// The first of the standard CRI sockets that exists (containerd, then CRI-O).
pub fn default_cri_socket() -> Option<&'static str> {
    [
        "/run/containerd/containerd.sock",
        "/var/run/containerd/containerd.sock",
        "/run/crio/crio.sock",
        "/var/run/crio/crio.sock",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "7a1b9f3e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
    const ID: &str = "3f5e9b1c2d4a6f8e0b1c3d5e7f9a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a";

    #[test]
    fn cgroupfs_layout_round_trips() {
        let d = CgroupDriver::Cgroupfs;
        assert_eq!(default_kubepods_root(d), "kubepods");
        assert_eq!(qos_dir(d, "besteffort"), "besteffort");
        let pod = pod_dir(d, Some("burstable"), UID);
        assert_eq!(pod, format!("pod{UID}"));
        assert_eq!(pod_uid(d, &pod).as_deref(), Some(UID));
        assert_eq!(
            pod_dir(d, None, UID),
            pod,
            "Guaranteed: same name, in the root"
        );
        assert_eq!(container_dir(d, "containerd", ID), ID);
        assert_eq!(container_id(d, ID).as_deref(), Some(ID));
        // Not pods or containers: QoS directories, cgroup files, stray names.
        for name in ["besteffort", "burstable", "cgroup.procs", "pod", "podX Y"] {
            assert_eq!(pod_uid(d, name), None, "{name}");
        }
        assert_eq!(container_id(d, "cgroup.events"), None);
    }

    #[test]
    fn systemd_layout_round_trips() {
        let d = CgroupDriver::Systemd;
        assert_eq!(default_kubepods_root(d), "kubepods.slice");
        assert_eq!(qos_dir(d, "burstable"), "kubepods-burstable.slice");
        let pod = pod_dir(d, Some("burstable"), UID);
        assert_eq!(
            pod,
            "kubepods-burstable-pod7a1b9f3e_1c2d_4e5f_8a9b_0c1d2e3f4a5b.slice"
        );
        assert_eq!(pod_uid(d, &pod).as_deref(), Some(UID));
        let guaranteed = pod_dir(d, None, UID);
        assert_eq!(
            guaranteed,
            "kubepods-pod7a1b9f3e_1c2d_4e5f_8a9b_0c1d2e3f4a5b.slice"
        );
        assert_eq!(pod_uid(d, &guaranteed).as_deref(), Some(UID));
        assert_eq!(pod_uid(d, "kubepods-burstable.slice"), None);
        for runtime in ["containerd", "cri-o"] {
            let c = container_dir(d, runtime, ID);
            assert_eq!(container_id(d, &c).as_deref(), Some(ID), "{runtime}: {c}");
        }
        assert_eq!(
            container_dir(d, "containerd", ID),
            format!("cri-containerd-{ID}.scope")
        );
        assert_eq!(container_dir(d, "cri-o", ID), format!("crio-{ID}.scope"));
    }
}
