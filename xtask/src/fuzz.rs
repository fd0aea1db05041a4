//! `cargo xtask fuzz`: builds the libFuzzer targets of `fuzz/` with cargo-fuzz and runs each for
//! a time budget, printing executions, exec/s, peak RSS and the outcome per target. Fails on a
//! crash, a timeout (one input slower than [`TIMEOUT_SECS`]) or an out-of-memory
//! ([`RSS_LIMIT_MB`]). `cargo xtask test` runs it for a few seconds per target (the smoke run).
//! See docs/fuzzing.md.

use anyhow::{bail, Context, Result};
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

/// cargo-fuzz, pinned like bpf-linker (installed by `cargo xtask setup`).
pub const CARGO_FUZZ_VERSION: &str = "0.13.1";
/// One input running longer than this is a failure (libFuzzer's `-timeout`).
pub const TIMEOUT_SECS: u64 = 10;
/// A target using more memory than this is a failure (libFuzzer's `-rss_limit_mb`).
pub const RSS_LIMIT_MB: u64 = 2048;

/// A fuzz target and the largest input it is given.
pub struct Target {
    /// Its name: the binary in `fuzz/fuzz_targets/` and the directory in `fuzz/corpus/`.
    pub name: &'static str,
    /// libFuzzer's `-max_len`.
    pub max_len: usize,
}

/// Every target (docs/fuzzing.md says what each checks).
pub const TARGETS: &[Target] = &[
    Target {
        name: "config_parse",
        max_len: 16 << 10,
    },
    Target {
        name: "policy_proto",
        max_len: 16 << 10,
    },
    Target {
        name: "receipt_decode",
        max_len: 4 << 10,
    },
    Target {
        name: "checkpoint_verify",
        max_len: 4 << 10,
    },
    // The seed ledger is a redb file of a few pages; mutations keep to its size.
    Target {
        name: "ledger_verify",
        max_len: 2 << 20,
    },
];

/// Installs cargo-fuzz if it is missing or another version.
pub fn setup() -> Result<()> {
    let ok = crate::cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION));
    if !ok {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
        crate::run(crate::cargo().args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
        ]))?;
    }
    Ok(())
}

/// How the fuzz targets are compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// Optimized (cargo-fuzz's release profile): for runs with a time budget.
    Optimized,
    /// Unoptimized, without debug info: for the smoke run of `cargo xtask test`, where the
    /// build is nearly all the time and a few seconds per target need no speed (225 s against
    /// 405-417 s for the optimized build on two cores).
    Quick,
}

/// Where the fuzz build goes: its own directory under the target directory, as its flags
/// differ from the workspace's (one per [`Build`], so neither rebuilds the other).
fn fuzz_target_dir(target: &Path, how: Build) -> PathBuf {
    target.join(match how {
        Build::Optimized => "fuzz",
        Build::Quick => "fuzz-quick",
    })
}

/// Builds every target (sanitizer-coverage instrumented, release, debug assertions on).
///
/// No sanitizer (`-s none`): the code under test is safe Rust, AddressSanitizer would halve
/// the executions per second and needs nightly flags; panics, overflows (debug assertions),
/// timeouts and memory are what the runs check.
pub fn build(root: &Path, target: &Path, how: Build) -> Result<()> {
    setup()?;
    let mut cmd = crate::cargo();
    cmd.current_dir(root)
        .args(["fuzz", "build", "-s", "none", "--codegen-units", "16"])
        .arg("--target-dir")
        .arg(fuzz_target_dir(target, how));
    if how == Build::Quick {
        // cargo-fuzz always builds its release profile: lower it for this build only.
        cmd.env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "0")
            .env("CARGO_PROFILE_RELEASE_DEBUG", "false");
    }
    crate::run(&mut cmd)
}

fn binary(target: &Path, how: Build, name: &str) -> PathBuf {
    fuzz_target_dir(target, how)
        .join("x86_64-unknown-linux-gnu/release")
        .join(name)
}

/// What one run did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The target.
    pub name: String,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Inputs executed.
    pub executions: u64,
    /// Peak RSS, MB.
    pub peak_rss_mb: u64,
    /// Inputs in the working corpus at the end.
    pub corpus: u64,
    /// `ok`, or what failed (crash, timeout, out of memory) and where the input is.
    pub result: String,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.result == "ok"
    }
}

/// Builds the targets (`how`) and runs `names` (all when empty) for `seconds` each; the working
/// corpus (the committed seeds plus what the run finds) and any crashing input stay under the
/// target directory.
pub fn run(root: &Path, target: &Path, how: Build, seconds: u64, names: &[String]) -> Result<()> {
    let chosen: Vec<&Target> = TARGETS
        .iter()
        .filter(|t| names.is_empty() || names.iter().any(|n| n == t.name))
        .collect();
    if let Some(unknown) = names
        .iter()
        .find(|n| !TARGETS.iter().any(|t| t.name == n.as_str()))
    {
        let known: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        bail!(
            "unknown fuzz target {unknown:?}; the targets: {}",
            known.join(", ")
        );
    }
    let started = Instant::now();
    build(root, target, how)?;
    eprintln!(
        "xtask: fuzz build ({how:?}) took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let mut outcomes = Vec::new();
    for t in chosen {
        outcomes.push(run_one(root, target, how, t, seconds)?);
    }
    println!(
        "\n{:<18} {:>8} {:>12} {:>9} {:>9} {:>7}  result",
        "target", "seconds", "executions", "exec/s", "peak RSS", "corpus"
    );
    for o in &outcomes {
        println!(
            "{:<18} {:>8.0} {:>12} {:>9.0} {:>6} MB {:>7}  {}",
            o.name,
            o.seconds,
            o.executions,
            o.executions as f64 / o.seconds.max(0.001),
            o.peak_rss_mb,
            o.corpus,
            o.result
        );
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok()).collect();
    if !failed.is_empty() {
        bail!(
            "{} fuzz target(s) failed: {}",
            failed.len(),
            failed
                .iter()
                .map(|o| format!("{}: {}", o.name, o.result))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    eprintln!(
        "xtask: fuzzing took {:.0} s in all (build included)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_one(root: &Path, target: &Path, how: Build, t: &Target, seconds: u64) -> Result<Outcome> {
    // The working corpora, crash inputs and logs are shared by both builds (the smoke run
    // replays what the long runs found), under the optimized build's directory.
    let dir = fuzz_target_dir(target, Build::Optimized);
    let work = dir.join("corpus").join(t.name);
    let artifacts = dir.join("artifacts").join(t.name);
    for dir in [&work, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let seeds = root.join("fuzz/corpus").join(t.name);
    let log = dir.join(format!("{}.log", t.name));
    let mut cmd = Command::new(binary(target, how, t.name));
    // New inputs go to the first directory (the working corpus); the seeds are only read.
    cmd.arg(&work)
        .arg(&seeds)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={TIMEOUT_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-max_len={}", t.max_len))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).context("fuzz log")?);
    eprintln!(
        "xtask: fuzzing {} for {seconds} s ({})",
        t.name,
        log.display()
    );
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let stat = |name: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .filter_map(|v| v.trim().parse().ok())
            .next_back()
            .unwrap_or(0)
    };
    let corpus = std::fs::read_dir(&work).map_or(0, |d| d.count() as u64);
    let result = if status.success() {
        "ok".to_string()
    } else {
        let what = if text.contains("ERROR: libFuzzer: timeout") {
            "timeout"
        } else if text.contains("ERROR: libFuzzer: out-of-memory") {
            "out of memory"
        } else if text.contains("ERROR: libFuzzer: deadly signal") || text.contains("panicked") {
            "crash"
        } else {
            "failed"
        };
        let input = text
            .lines()
            .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
            .unwrap_or("(no input written)");
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        eprintln!(
            "--- {} ({status}), last lines of {}:\n{}",
            t.name,
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        format!("{what}: {input}")
    };
    Ok(Outcome {
        name: t.name.to_string(),
        seconds: started.elapsed().as_secs_f64(),
        executions: stat("number_of_executed_units"),
        peak_rss_mb: stat("peak_rss_mb"),
        corpus,
        result,
    })
}

/// Regenerates the generated seeds (`fuzz/corpus/*`, all but the configuration files, which
/// are copies of the repository's TOML) with the fuzz crate's `make_seeds`.
pub fn make_seeds(root: &Path, target: &Path) -> Result<()> {
    build(root, target, Build::Optimized)?;
    crate::run(
        Command::new(binary(target, Build::Optimized, "make_seeds"))
            .arg("-runs=0")
            .env("KNHK_FUZZ_CORPUS", root.join("fuzz/corpus"))
            .current_dir(root),
    )
}
