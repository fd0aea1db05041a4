//! Builds the kernel programs (`ebpf/programs`) and hands the object to the agent, which embeds
//! it with `include_bytes!` (plus `knhk-bench-empty.o`, the baseline of `cargo xtask bench`).
//!
//! The kernel crate needs Debian's `rustc` (it ships a prebuilt `core` for `bpfel-unknown-none`)
//! and `bpf-linker`; `cargo xtask setup` installs both. See `ebpf/programs/README.md`.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const BPF_RUSTC: &str = "/usr/bin/rustc";

fn main() {
    compile_protos();
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest.join("../ebpf/programs");
    let abi_dir = manifest.join("../ebpf/abi");
    for p in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        abi_dir.join("src"),
        abi_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    // A new bpf-linker can change the object.
    if let Some(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("knhk-ebpf.o");

    if !Path::new(BPF_RUSTC).exists() || which("bpf-linker").is_none() {
        panic!(
            "\n\nknhk-agent embeds its eBPF programs, which need Debian's rustc ({BPF_RUSTC}, \
             package rustc-web) and bpf-linker.\nRun `cargo xtask setup` once (or `cargo xtask test`, \
             which runs it), then build again.\n"
        );
    }

    // Share one target directory across profiles so the kernel crate is not rebuilt needlessly.
    let target_root = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target"));
    let target_dir = target_root.join("ebpf");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
        ])
        .arg("--config")
        .arg("target.bpfel-unknown-none.linker=\"bpf-linker\"")
        // BTF is required by the socket-storage map (and lets the kernel describe the maps).
        .arg("--config")
        .arg("target.bpfel-unknown-none.rustflags=[\"-C\", \"debuginfo=2\", \"-C\", \"link-arg=--btf\"]")
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer cargo's settings must not leak into the kernel build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO_")
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&key);
        }
    }
    cmd.env("RUSTC", BPF_RUSTC).env("RUSTC_BOOTSTRAP", "1");
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the eBPF programs: {e}"));
    if !status.success() {
        panic!(
            "building the eBPF programs in {} failed ({status})",
            ebpf_dir.display()
        );
    }
    for (bin, dest) in [
        ("knhk-ebpf", object),
        ("knhk-bench-empty", out.join("knhk-bench-empty.o")),
    ] {
        let built = target_dir.join("bpfel-unknown-none/release").join(bin);
        std::fs::copy(&built, &dest)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", built.display(), dest.display()));
    }
}

/// Generates the gRPC code of `proto/knhk/agent/v1` (protox: no protoc needed) and the encoded
/// descriptor set that server reflection serves.
fn compile_protos() {
    let root =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("../proto");
    let files = [
        root.join("knhk/agent/v1/policy.proto"),
        root.join("knhk/agent/v1/agent.proto"),
        root.join("knhk/agent/v1/rollout.proto"),
        root.join("knhk/receipts/v1/receipts.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root]).unwrap_or_else(|e| panic!("proto/: {e}"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(
        out.join("knhk_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )
    .unwrap_or_else(|e| panic!("writing the descriptor set: {e}"));
    tonic_prost_build::configure()
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating gRPC code: {e}"));

    // The SPIFFE Workload API: server side only (no package, so it lands in `_.rs`).
    let workload = root.join("spiffe/workload.proto");
    println!("cargo:rerun-if-changed={}", workload.display());
    let fds = protox::compile([&workload], [root.join("spiffe")])
        .unwrap_or_else(|e| panic!("proto/spiffe: {e}"));
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating Workload API code: {e}"));
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if let Some(home) = env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(bin)).find(|p| p.is_file())
}
