//! `cargo xtask image`: an OCI image archive of the agent, written directly (no Docker daemon,
//! no registry, no image builder).
//!
//! The image has one layer: the release binary with its debug info split off (the `.debug` file
//! stays in `target/image/` as a build artifact, linked from the binary by `.gnu_debuglink`), the
//! shared libraries `ldd` reports (at the paths the dynamic loader looks for them), the CA
//! certificates, and a minimal `/etc` (`passwd`, `group`, `nsswitch.conf`) plus `/tmp`. The layer
//! is reproducible: entries sorted by path, every mtime [`EPOCH`], owner `0:0` with no names,
//! explicit modes, and gzip without a name or time stamp; the same files give the same digests.
//!
//! The archive is an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`) packed as
//! a tar, which `ctr image import` (and `skopeo copy oci-archive:…`) accepts.

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

/// The image's repository; `index.json` names the image `<REPOSITORY>:<version>`.
pub const REPOSITORY: &str = "ghcr.io/knhk/knhk-agent";
/// Every file's mtime in the layer and the archive, and the config's `created` time.
pub const EPOCH: u64 = 0;
/// Where the binary is in the image.
pub const BINARY_PATH: &str = "knhk-agent";
/// The CA bundle copied into the image (Debian's `ca-certificates`).
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// One file or directory of the image's root file system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A directory with its mode.
    Dir {
        /// Permission bits.
        mode: u32,
    },
    /// A regular file with its content and mode.
    File {
        /// The file's bytes.
        data: Vec<u8>,
        /// Permission bits.
        mode: u32,
    },
}

/// An image root file system: paths relative to `/` (no leading `/`, no `.` or `..`) → entries.
/// Parent directories are added when the layer is written.
pub type RootFs = BTreeMap<String, Entry>;

/// What [`write_archive`] produced.
#[derive(Debug)]
pub struct Built {
    /// The manifest's digest (`sha256:…`): the image's identity for `image@digest`.
    pub manifest_digest: String,
    /// The layer blob's digest (gzip'd tar).
    pub layer_digest: String,
    /// The layer's uncompressed digest (the config's `diff_id`).
    pub diff_id: String,
    /// Size of the gzip'd layer in bytes.
    pub layer_size: u64,
    /// Size of the uncompressed layer in bytes.
    pub layer_uncompressed_size: u64,
    /// Size of the archive in bytes.
    pub archive_size: u64,
}

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in hash.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Checks that `path` is a clean relative path (no empty, `.` or `..` components).
fn check_path(path: &str) -> Result<()> {
    ensure!(
        !path.is_empty() && !path.starts_with('/') && !path.ends_with('/'),
        "image path {path:?} must be relative to / without a leading or trailing slash"
    );
    for part in path.split('/') {
        ensure!(
            !part.is_empty() && part != "." && part != "..",
            "image path {path:?} has an empty, `.` or `..` component"
        );
    }
    Ok(())
}

/// The uncompressed layer: a tar of `rootfs` with every parent directory, sorted, with fixed
/// times and owners.
pub fn layer_tar(rootfs: &RootFs) -> Result<Vec<u8>> {
    let mut all = rootfs.clone();
    for path in rootfs.keys() {
        check_path(path)?;
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            let key = p.to_string_lossy().into_owned();
            match all.get(&key) {
                Some(Entry::File { .. }) => {
                    bail!("image path {path:?} is below {key:?}, which is a file")
                }
                Some(Entry::Dir { .. }) => {}
                None => {
                    all.insert(key, Entry::Dir { mode: 0o755 });
                }
            }
            parent = p.parent();
        }
    }
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    // BTreeMap order puts a directory ("etc") before its children ("etc/group").
    for (path, entry) in &all {
        let mut header = tar::Header::new_ustar();
        header.set_mtime(EPOCH);
        header.set_uid(0);
        header.set_gid(0);
        let (data, name): (&[u8], String) = match entry {
            Entry::Dir { mode } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                (&[], format!("{path}/"))
            }
            Entry::File { data, mode } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                (data, path.clone())
            }
        };
        builder
            .append_data(&mut header, &name, data)
            .with_context(|| format!("adding {name} to the layer"))?;
    }
    builder.into_inner().context("finishing the layer tar")
}

/// gzip without a file name or time stamp, at a fixed level.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(EPOCH as u32)
        .write(Vec::new(), flate2::Compression::new(6));
    enc.write_all(data).context("gzip")?;
    enc.finish().context("gzip")
}

/// The OCI architecture name of this build host (the image runs where the binary was built).
pub fn oci_arch() -> Result<&'static str> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => bail!("no OCI architecture name known for {other}"),
    })
}

/// Writes the OCI layout for `rootfs` as a tar archive at `out`, the image named
/// `<REPOSITORY>:<version>`.
pub fn write_archive(rootfs: &RootFs, version: &str, arch: &str, out: &Path) -> Result<Built> {
    let tar = layer_tar(rootfs)?;
    let layer = gzip(&tar)?;
    let diff_id = digest(&tar);
    let layer_digest = digest(&layer);
    let created = "1970-01-01T00:00:00Z";
    let config = json!({
        "created": created,
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": [format!("/{BINARY_PATH}"), "run"],
            "Env": ["PATH=/"],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": "knhk-agent",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.licenses": "Apache-2.0",
            },
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": created, "created_by": "cargo xtask image" }],
    });
    let config = serde_json::to_vec(&config)?;
    let config_digest = digest(&config);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": { "mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer.len() }],
        "annotations": { "org.opencontainers.image.version": version },
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let manifest_digest = digest(&manifest);
    let name = format!("{REPOSITORY}:{version}");
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": arch, "os": "linux" },
            "annotations": {
                // containerd names an imported image by this one ...
                "io.containerd.image.name": name,
                // ... and the OCI spec by its tag.
                "org.opencontainers.image.ref.name": version,
            },
        }],
    });
    let index = serde_json::to_vec(&index)?;

    let mut layout = RootFs::new();
    layout.insert(
        "oci-layout".into(),
        file(br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(), 0o644),
    );
    layout.insert("index.json".into(), file(index, 0o644));
    for (d, blob) in [
        (&manifest_digest, manifest),
        (&config_digest, config),
        (&layer_digest, layer.clone()),
    ] {
        layout.insert(
            format!("blobs/sha256/{}", &d["sha256:".len()..]),
            file(blob, 0o644),
        );
    }
    let archive = layer_tar(&layout)?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, &archive).with_context(|| format!("writing {}", out.display()))?;
    Ok(Built {
        manifest_digest,
        layer_digest,
        diff_id,
        layer_size: layer.len() as u64,
        layer_uncompressed_size: tar.len() as u64,
        archive_size: archive.len() as u64,
    })
}

fn file(data: Vec<u8>, mode: u32) -> Entry {
    Entry::File { data, mode }
}

/// Runs `cmd`, failing with its stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The absolute paths of the shared objects in `ldd` output (the interpreter included, the vDSO
/// not). A library `ldd` cannot find is an error.
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once(" => ") {
            Some((name, rest)) => {
                let target = rest.split(" (").next().unwrap_or("").trim();
                if target == "not found" {
                    bail!("ldd: {name} not found");
                }
                target
            }
            None => line.split(" (").next().unwrap_or("").trim(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if !path.starts_with("linux-vdso") && !path.starts_with("linux-gate") {
            bail!("ldd: cannot read the line {line:?}");
        }
    }
    Ok(libs)
}

/// Sizes of the binary and its split-off debug info.
#[derive(Debug)]
pub struct Binary {
    /// The stripped binary.
    pub stripped: PathBuf,
    /// The debug info (`objcopy --only-keep-debug`).
    pub debug: PathBuf,
    /// Size of the release binary as built.
    pub unstripped_size: u64,
}

/// Splits the debug info of `binary` into `<dir>/knhk-agent.debug` and writes the stripped
/// binary, with a `.gnu_debuglink` to it, to `<dir>/knhk-agent`.
pub fn split_debug(binary: &Path, dir: &Path) -> Result<Binary> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let unstripped_size = std::fs::metadata(binary)
        .with_context(|| format!("{}: build the release binary first", binary.display()))?
        .len();
    let debug = dir.join("knhk-agent.debug");
    let stripped = dir.join("knhk-agent");
    output(
        Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(binary)
            .arg(&debug),
    )
    .context("objcopy (Debian package binutils; `cargo xtask setup` installs it)")?;
    // `--add-gnu-debuglink` names the file and records its CRC; run from `dir` so that the link
    // is the bare file name, which gdb looks up next to the binary and under /usr/lib/debug.
    output(
        Command::new("objcopy")
            .current_dir(dir)
            .arg("--strip-debug")
            .arg("--add-gnu-debuglink=knhk-agent.debug")
            .arg(std::path::absolute(binary)?)
            .arg("knhk-agent"),
    )?;
    Ok(Binary {
        stripped,
        debug,
        unstripped_size,
    })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The image's root file system: the stripped binary, the libraries it links, CA certificates
/// and a minimal `/etc`.
pub fn collect_rootfs(stripped: &Path) -> Result<RootFs> {
    let mut rootfs = RootFs::new();
    rootfs.insert(BINARY_PATH.into(), file(read(stripped)?, 0o755));
    let ldd = output(Command::new("ldd").arg(stripped))?;
    for lib in parse_ldd(&ldd)? {
        // The loader looks a library up by the path ldd printed (its directory is in the
        // loader's built-in search path) and the interpreter by PT_INTERP; symlinks in the host
        // path (merged /usr) are resolved to the file's content.
        let key = lib
            .to_str()
            .with_context(|| format!("{} is not UTF-8", lib.display()))?
            .trim_start_matches('/')
            .to_owned();
        rootfs.insert(key, file(read(&lib)?, 0o755));
    }
    rootfs.insert(
        CA_BUNDLE.trim_start_matches('/').into(),
        file(
            read(Path::new(CA_BUNDLE)).context("the CA bundle (Debian package ca-certificates)")?,
            0o644,
        ),
    );
    rootfs.insert(
        "etc/passwd".into(),
        file(b"root:x:0:0:root:/:/sbin/nologin\n".to_vec(), 0o644),
    );
    rootfs.insert("etc/group".into(), file(b"root:x:0:\n".to_vec(), 0o644));
    rootfs.insert(
        "etc/nsswitch.conf".into(),
        file(
            b"passwd: files\ngroup: files\nhosts: files dns\n".to_vec(),
            0o644,
        ),
    );
    rootfs.insert("tmp".into(), Entry::Dir { mode: 0o1777 });
    Ok(rootfs)
}

/// `cargo xtask image`: split `binary`'s debug info, collect the root file system and write
/// `<dir>/knhk-agent-<version>.oci.tar`.
pub fn build(binary: &Path, dir: &Path, version: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let bin = split_debug(binary, dir)?;
    let rootfs = collect_rootfs(&bin.stripped)?;
    let out = dir.join(format!("knhk-agent-{version}.oci.tar"));
    let built = write_archive(&rootfs, version, oci_arch()?, &out)?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "binary: {:.1} MiB as built, {:.1} MiB stripped ({}); debug info {:.1} MiB ({})",
        mib(bin.unstripped_size),
        mib(size(&bin.stripped)),
        bin.stripped.display(),
        mib(size(&bin.debug)),
        bin.debug.display(),
    );
    eprintln!(
        "layer {}: {:.1} MiB gzip'd ({:.1} MiB uncompressed, diff_id {}), {} files; archive {:.1} MiB: {}",
        built.layer_digest,
        mib(built.layer_size),
        mib(built.layer_uncompressed_size),
        built.diff_id,
        rootfs.len(),
        mib(built.archive_size),
        out.display(),
    );
    let digest_file = dir.join(format!("knhk-agent-{version}.digest"));
    std::fs::write(&digest_file, format!("{}\n", built.manifest_digest))
        .with_context(|| format!("writing {}", digest_file.display()))?;
    eprintln!(
        "import on a node: ctr -n k8s.io image import {}\n\
         reference it (k8s/overlays/*/kustomization.yaml, images: digest):",
        out.display()
    );
    println!("{REPOSITORY}@{}", built.manifest_digest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_rootfs(binary: &[u8]) -> RootFs {
        let mut r = RootFs::new();
        r.insert(BINARY_PATH.into(), file(binary.to_vec(), 0o755));
        r.insert(
            "lib/x86_64-linux-gnu/libc.so.6".into(),
            file(b"not really libc".to_vec(), 0o755),
        );
        r.insert("etc/group".into(), file(b"root:x:0:\n".to_vec(), 0o644));
        r.insert("tmp".into(), Entry::Dir { mode: 0o1777 });
        r
    }

    #[test]
    fn same_input_gives_the_same_digests_and_other_input_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = write_archive(
            &fake_rootfs(b"binary"),
            "0.1.0",
            "amd64",
            &dir.path().join("a.tar"),
        )
        .expect("a");
        // Written later, elsewhere: time and place must not leak into the image.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let b = write_archive(
            &fake_rootfs(b"binary"),
            "0.1.0",
            "amd64",
            &dir.path().join("sub/b.tar"),
        )
        .expect("b");
        assert_eq!(a.diff_id, b.diff_id);
        assert_eq!(a.layer_digest, b.layer_digest);
        assert_eq!(a.manifest_digest, b.manifest_digest);
        let archive_a = std::fs::read(dir.path().join("a.tar")).expect("a");
        let archive_b = std::fs::read(dir.path().join("sub/b.tar")).expect("b");
        assert_eq!(archive_a, archive_b, "the archives are byte-identical");
        let c = write_archive(
            &fake_rootfs(b"binarY"),
            "0.1.0",
            "amd64",
            &dir.path().join("c.tar"),
        )
        .expect("c");
        assert_ne!(a.diff_id, c.diff_id);
        assert_ne!(a.manifest_digest, c.manifest_digest);
    }

    #[test]
    fn the_layer_has_fixed_owners_times_modes_and_every_parent_directory() {
        let tar = layer_tar(&fake_rootfs(b"binary")).expect("layer");
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().expect("entries") {
            let entry = entry.expect("entry");
            let h = entry.header();
            assert_eq!(h.mtime().expect("mtime"), EPOCH);
            assert_eq!((h.uid().expect("uid"), h.gid().expect("gid")), (0, 0));
            assert_eq!(h.username().expect("uname"), Some(""));
            let path = entry.path().expect("path").to_string_lossy().into_owned();
            seen.push((path, h.mode().expect("mode")));
        }
        assert_eq!(
            seen,
            [
                ("etc/".to_owned(), 0o755),
                ("etc/group".to_owned(), 0o644),
                ("knhk-agent".to_owned(), 0o755),
                ("lib/".to_owned(), 0o755),
                ("lib/x86_64-linux-gnu/".to_owned(), 0o755),
                ("lib/x86_64-linux-gnu/libc.so.6".to_owned(), 0o755),
                ("tmp/".to_owned(), 0o1777),
            ]
        );
    }

    #[test]
    fn the_archive_is_an_oci_layout_whose_digests_and_sizes_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("image.tar");
        let built = write_archive(&fake_rootfs(b"binary"), "0.1.0", "amd64", &out).expect("image");
        let bytes = std::fs::read(&out).expect("archive");
        let mut files = BTreeMap::new();
        let mut archive = tar::Archive::new(bytes.as_slice());
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).expect("read");
            files.insert(path, data);
        }
        let blob = |d: &str| {
            let data = files[&format!("blobs/sha256/{}", &d["sha256:".len()..])].clone();
            assert_eq!(digest(&data), d, "blob content matches its name");
            data
        };
        let layout: serde_json::Value = serde_json::from_slice(&files["oci-layout"]).expect("json");
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).expect("json");
        let desc = &index["manifests"][0];
        assert_eq!(desc["digest"], built.manifest_digest.as_str());
        assert_eq!(
            desc["annotations"]["io.containerd.image.name"],
            "ghcr.io/knhk/knhk-agent:0.1.0"
        );
        let manifest_bytes = blob(&built.manifest_digest);
        assert_eq!(desc["size"], manifest_bytes.len());
        let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).expect("json");
        assert_eq!(manifest["mediaType"], MEDIA_MANIFEST);
        let config_desc = &manifest["config"];
        let config_bytes = blob(config_desc["digest"].as_str().expect("digest"));
        assert_eq!(config_desc["size"], config_bytes.len());
        let config: serde_json::Value = serde_json::from_slice(&config_bytes).expect("json");
        assert_eq!(
            config["config"]["Entrypoint"],
            json!(["/knhk-agent", "run"])
        );
        let layer_desc = &manifest["layers"][0];
        assert_eq!(layer_desc["mediaType"], MEDIA_LAYER);
        let layer = blob(layer_desc["digest"].as_str().expect("digest"));
        assert_eq!(layer_desc["size"], layer.len());
        let mut tar = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(layer.as_slice()),
            &mut tar,
        )
        .expect("gunzip");
        assert_eq!(config["rootfs"]["diff_ids"][0], digest(&tar).as_str());
    }

    #[test]
    fn bad_paths_are_refused_with_the_path() {
        for bad in ["/abs", "a//b", "a/../b", "a/", ""] {
            let mut r = RootFs::new();
            r.insert(bad.into(), file(vec![], 0o644));
            let err = layer_tar(&r).expect_err(bad).to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        let mut r = RootFs::new();
        r.insert("etc".into(), file(vec![], 0o644));
        r.insert("etc/passwd".into(), file(vec![], 0o644));
        let err = layer_tar(&r).expect_err("file parent").to_string();
        assert!(err.contains("which is a file"), "{err}");
    }

    #[test]
    fn ldd_output_is_read_and_a_missing_library_is_an_error() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).expect("ldd"),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        let err = parse_ldd("\tlibelf.so.1 => not found\n")
            .expect_err("missing")
            .to_string();
        assert_eq!(err, "ldd: libelf.so.1 not found");
    }
}
