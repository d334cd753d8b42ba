//! Developer commands: `cargo xtask <verb>`. Each verb first runs scripts/setup.sh, which
//! installs whatever a fresh machine lacks (idempotently), so every verb works unaided.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Install the prerequisites (LLVM 22, bpf-linker, nightly rust-src, bpftool, ...).
    Setup,
    /// Build the eBPF object alone (the agent's build.rs builds and embeds it too).
    BuildEbpf,
    /// Set up, build, and run the lab on the built-in example (the seed documents' policies).
    Demo,
    /// Set up and run every check and test: fmt, clippy (userspace and eBPF), all tests (the
    /// smoke soak among them, one test), and (without a filter) the smoke benchmark and the
    /// fuzz targets at smoke size.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up and run the benchmarks (per-packet cost, lab traffic, control plane) in release
    /// mode; prints one table. `smoke` keeps them working (CI); `full` is BENCHMARKS.md's run.
    Bench {
        #[arg(long, value_parser = ["smoke", "full"], default_value = "smoke")]
        size: String,
        /// Also write the table's rows as JSON to FILE.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Only these parts (comma-separated: packet, traffic, control).
        #[arg(long)]
        only: Option<String>,
    },
    /// Set up, build the cargo-fuzz targets (fuzz/, nightly) and run each for N seconds from
    /// its seeds (fuzz/seeds/TARGET) and what earlier runs found (fuzz/corpus/TARGET). A
    /// panic fails the verb; libFuzzer leaves the input in fuzz/artifacts/TARGET.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = FUZZ_DEFAULT_SECONDS)]
        seconds: u32,
        /// Only this target (manifests, convert, config, expect).
        #[arg(long)]
        target: Option<String>,
    },
    /// Set up and run the soak (npm-agent/tests/soak.rs): the agent SIGKILLed at seeded random
    /// points during API churn with traffic running. Fails on a denied probe that passed, an
    /// established connection that missed a message, or an allowed pair that did not connect
    /// after a restart. `smoke` is the size `cargo test` runs (CI); `full` is 50 rounds.
    Soak {
        #[arg(long, value_parser = ["smoke", "full"], default_value = "smoke")]
        size: String,
        /// The seed of the churn and kill schedule (default: a new one, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
}

/// The cargo-fuzz targets (fuzz/fuzz_targets/NAME.rs), one per parser.
const FUZZ_TARGETS: [&str; 4] = ["manifests", "convert", "config", "expect"];
/// Seconds per target of `cargo xtask fuzz` without `--seconds`.
const FUZZ_DEFAULT_SECONDS: u32 = 20;
/// Seconds per target in `cargo xtask test`: with the fuzz crate's build (4.5 min measured from
/// scratch on 2 cores busy with other builds, 2 min 50 s of CPU) the smoke stays small.
const FUZZ_TEST_SECONDS: u32 = 10;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo_home_bin() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|h| h.join("bin"))
}

/// Runs a command in the workspace root, with ~/.cargo/bin on PATH (bpf-linker lives there).
fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    sh_env(program, args, &[])
}

/// [`sh`] with extra environment variables.
fn sh_env(program: &str, args: &[&str], envs: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(root());
    cmd.envs(envs.iter().copied());
    if let Some(bin) = cargo_home_bin() {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut parts: Vec<PathBuf> = std::env::split_paths(&path).collect();
        if !parts.contains(&bin) {
            parts.insert(0, bin);
        }
        cmd.env("PATH", std::env::join_paths(parts)?);
    }
    eprintln!("+ {program} {}", args.join(" "));
    let status = cmd.status().with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed with {status}", args.join(" "));
    }
    Ok(())
}

/// What `cargo test` reported over every test binary, and whether it succeeded.
struct TestCounts {
    passed: u64,
    failed: u64,
    ignored: u64,
    ok: bool,
}

/// Runs `cargo test`, passing its output through, and adds up the result lines of every test
/// binary (the caller prints the summary line).
fn run_tests(args: &[&str]) -> anyhow::Result<TestCounts> {
    use std::io::{BufRead, BufReader, Write};
    eprintln!("+ cargo {}", args.join(" "));
    let mut child = Command::new("cargo")
        .args(args)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let mut out = std::io::stdout();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        writeln!(out, "{line}")?;
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part
                    .split_whitespace()
                    .filter(|w| *w != "ok." && *w != "FAILED.");
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok(TestCounts {
        passed,
        failed,
        ignored,
        ok: status.success(),
    })
}

/// Builds the bench example in release mode and runs it (as root, like every verb here).
fn bench(size: &str, json: Option<&Path>, only: Option<&str>) -> anyhow::Result<()> {
    sh(
        "cargo",
        &[
            "build",
            "--release",
            "--package",
            "npm-agent",
            "--example",
            "bench",
        ],
    )?;
    let mut args = vec!["--size", size];
    let json = json.map(|p| p.to_string_lossy().into_owned());
    if let Some(j) = &json {
        args.extend(["--json", j.as_str()]);
    }
    if let Some(o) = only {
        args.extend(["--only", o]);
    }
    sh("target/release/examples/bench", &args)
}

/// Builds the fuzz targets and runs each of `targets` for `seconds`; returns each target's
/// outcome (a failed build fails them all). Unoptimised (`--dev`) and without a sanitizer:
/// the build is most of the cost at smoke size, and a panic, which is what the targets look
/// for, needs neither. `AYA_BUILD_SKIP`: the parsers do not need the eBPF object.
fn fuzz(seconds: u32, targets: &[&str]) -> Vec<(String, anyhow::Result<()>)> {
    let flags = ["--fuzz-dir", "fuzz", "--dev", "--sanitizer", "none"];
    let env = [("AYA_BUILD_SKIP", "1")];
    let mut build = vec!["+nightly", "fuzz", "build"];
    build.extend(flags);
    if let Err(e) = sh_env("cargo", &build, &env) {
        let e = format!("{e:#}");
        return targets
            .iter()
            .map(|t| {
                (
                    t.to_string(),
                    Err(anyhow::anyhow!("fuzz build failed: {e}")),
                )
            })
            .collect();
    }
    targets
        .iter()
        .map(|t| {
            let corpus = format!("fuzz/corpus/{t}");
            let seeds = format!("fuzz/seeds/{t}");
            let time = format!("-max_total_time={seconds}");
            let run = std::fs::create_dir_all(root().join(&corpus))
                .with_context(|| format!("creating {corpus}"))
                .and_then(|()| {
                    let mut args = vec!["+nightly", "fuzz", "run"];
                    args.extend(flags);
                    // 10 s per input at most (a hang fails); bounded memory; inputs up to 64 KiB.
                    args.extend([
                        t,
                        corpus.as_str(),
                        seeds.as_str(),
                        "--",
                        time.as_str(),
                        "-timeout=10",
                        "-rss_limit_mb=2048",
                        "-max_len=65536",
                    ]);
                    sh_env("cargo", &args, &env)
                });
            if let Err(e) = &run {
                eprintln!("fuzz target {t} failed: {e:#} (the input is in fuzz/artifacts/{t}/)");
            }
            (t.to_string(), run)
        })
        .collect()
}

/// Runs one size of the soak test with its report shown (`--nocapture`); the full size is an
/// ignored test, so `cargo test` runs only the smoke one.
fn soak(size: &str, seed: Option<u64>) -> anyhow::Result<()> {
    let mut args = vec!["test", "--package", "npm-agent", "--test", "soak", "--"];
    if size == "full" {
        args.extend(["--ignored", "--exact", "soak_full"]);
    } else {
        args.extend(["--exact", "soak_smoke"]);
    }
    args.push("--nocapture");
    let seed = seed.map(|s| s.to_string());
    let env: Vec<(&str, &str)> = seed
        .as_deref()
        .map(|s| ("NPM_SOAK_SEED", s))
        .into_iter()
        .collect();
    sh_env("cargo", &args, &env)
}

fn setup() -> anyhow::Result<()> {
    sh("bash", &["scripts/setup.sh"])
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Verb::Setup => setup(),
        Verb::BuildEbpf => {
            setup()?;
            sh(
                "cargo",
                &[
                    "+nightly",
                    "build",
                    "--release",
                    "--package",
                    "npm-ebpf",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                ],
            )?;
            eprintln!("built target/bpfel-unknown-none/release/npm");
            Ok(())
        }
        Verb::Demo => {
            setup()?;
            sh("cargo", &["build", "--release", "--package", "npm-agent"])?;
            sh(
                "target/release/npm-agent",
                &[
                    "lab",
                    "--manifests",
                    "examples/azure-npm",
                    "--expect",
                    "examples/azure-npm/expect",
                ],
            )
        }
        Verb::Test { args } => {
            setup()?;
            sh("cargo", &["fmt", "--all", "--", "--check"])?;
            sh(
                "cargo",
                &["clippy", "--all-targets", "--", "-D", "warnings"],
            )?;
            // The eBPF crate on its own target (feature unification keeps it out of the
            // userspace pass; aya-template does the same).
            sh(
                "cargo",
                &[
                    "+nightly",
                    "clippy",
                    "--package",
                    "npm-ebpf",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ],
            )?;
            // The smoke soak (tests/soak.rs, soak_smoke) is an ordinary test of this run and
            // counts as one there; its full size is ignored (`cargo xtask soak --size full`).
            let mut test: Vec<&str> = vec!["test", "--all-targets"];
            test.extend(args.iter().map(String::as_str));
            let t = run_tests(&test)?;
            // The smoke benchmark keeps the bench harness working; it counts as one test in
            // the summary (passed when it ran through; its figures are printed, not checked).
            // Skipped when a test filter was given (a developer running a few tests).
            let smoke = if args.is_empty() {
                let smoke = bench("smoke", None, None);
                if let Err(e) = &smoke {
                    eprintln!("bench smoke failed: {e:#}");
                }
                Some(smoke)
            } else {
                None
            };
            let (bp, bf) = match &smoke {
                Some(Ok(())) => (1, 0),
                Some(Err(_)) => (0, 1),
                None => (0, 0),
            };
            // The fuzz targets at smoke size, each counted as one test (passed when it ran
            // its time without a panic); skipped with a filter, like the benchmark.
            let fuzzed = if args.is_empty() {
                fuzz(FUZZ_TEST_SECONDS, &FUZZ_TARGETS)
            } else {
                Vec::new()
            };
            let fp = fuzzed.iter().filter(|(_, r)| r.is_ok()).count() as u64;
            let ff = fuzzed.len() as u64 - fp;
            println!(
                "tests: {} passed, {} failed, {} skipped",
                t.passed + bp + fp,
                t.failed + bf + ff,
                t.ignored
            );
            if !t.ok {
                bail!("cargo test failed");
            }
            if ff > 0 {
                let names: Vec<&str> = fuzzed
                    .iter()
                    .filter(|(_, r)| r.is_err())
                    .map(|(t, _)| t.as_str())
                    .collect();
                bail!("fuzz targets failed: {}", names.join(", "));
            }
            smoke.unwrap_or(Ok(()))
        }
        Verb::Bench { size, json, only } => {
            setup()?;
            bench(&size, json.as_deref(), only.as_deref())
        }
        Verb::Fuzz { seconds, target } => {
            setup()?;
            let targets: Vec<&str> = match &target {
                Some(t) if FUZZ_TARGETS.contains(&t.as_str()) => vec![t.as_str()],
                Some(t) => bail!(
                    "no fuzz target {t:?} (there are: {})",
                    FUZZ_TARGETS.join(", ")
                ),
                None => FUZZ_TARGETS.to_vec(),
            };
            let failed: Vec<String> = fuzz(seconds, &targets)
                .into_iter()
                .filter_map(|(t, r)| r.err().map(|_| t))
                .collect();
            if !failed.is_empty() {
                bail!("fuzz targets failed: {}", failed.join(", "));
            }
            Ok(())
        }
        Verb::Soak { size, seed } => {
            setup()?;
            soak(&size, seed)
        }
    }
}
