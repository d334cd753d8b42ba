//! The benchmark harness behind `cargo xtask bench [--size smoke|full] [--json FILE]`.
//!
//! Measures, in one run, side by side: (1) the classifier's per-packet cost through
//! `BPF_PROG_TEST_RUN` with a pass-only baseline ([`packet`]), (2) real traffic between two
//! lab pods with enforcement off and on ([`traffic`]), (3) the control plane: full compile +
//! map programming and incremental events ([`control`]); then (4) how each figure grows
//! ([`report::growth`]). Prints one Markdown table on stdout (progress on stderr) and, with
//! `--json FILE`, writes the same rows as JSON. Needs root (BPF, network namespaces).
//!
//! `smoke` keeps every code path working in CI in well under two minutes; `full` is the run
//! recorded in BENCHMARKS.md. Benchmarks are not tests: targets are reported, not asserted;
//! only wrong verdicts or failed map writes abort the run.
mod control;
mod packet;
mod report;
mod synth;
mod traffic;

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Size {
    Smoke,
    Full,
}

#[derive(Parser)]
#[command(name = "bench")]
struct Args {
    #[arg(long, value_enum, default_value = "smoke")]
    size: Size,
    /// Also write the rows as JSON to FILE.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only these parts (comma-separated: packet, traffic, control); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Internal: run one control-plane size (PODS,POLICIES,NAMESPACES,EVENTS) and print its
    /// rows as JSON.
    #[arg(long, hide = true)]
    control_child: Option<String>,
    /// For profiling: run one per-packet path (established, established-ct, denied, new,
    /// new-flows, syn-tracked, pass)
    /// or short connections in the lab (conn: enforcing, conn-nocache, conn-off) for SECONDS;
    /// enforcing, it prints the classifiers' run time per run in flight every second.
    #[arg(long, hide = true, num_args = 2, value_names = ["PATH", "SECONDS"])]
    spin: Vec<String>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {os}, kernel {kernel}")
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    let args = Args::parse();
    if let Some(spec) = args.control_child {
        let n: Vec<usize> = spec
            .split(',')
            .map(|v| v.parse().expect("PODS,POLICIES,NAMESPACES,EVENTS"))
            .collect();
        let rows = control::child(n[0], n[1], n[2], n[3]);
        println!("{}", serde_json::to_string(&rows).expect("rows serialize"));
        return;
    }
    if let [kind, seconds] = args.spin.as_slice() {
        let seconds = seconds.parse().expect("SECONDS");
        match kind.as_str() {
            "conn" => traffic::spin(true, false, seconds),
            "conn-nocache" => traffic::spin(true, true, seconds),
            "conn-off" => traffic::spin(false, false, seconds),
            _ => packet::spin(kind, seconds),
        }
        return;
    }
    let full = args.size == Size::Full;
    let want = |part: &str| args.only.is_empty() || args.only.iter().any(|o| o == part);
    let started = std::time::Instant::now();
    let mut sink = report::Sink::default();

    if want("packet") {
        let p = if full {
            packet::Params {
                pods: vec![100, 10_000, 100_000],
                policies: vec![1, 100, 1_000, 10_000],
                repeat: 1_000_000,
                rounds: 5,
                singles: 3_000,
                flows: 25_000,
            }
        } else {
            packet::Params {
                pods: vec![100, 300, 1_000],
                policies: vec![1, 10, 100],
                repeat: 20_000,
                rounds: 3,
                singles: 300,
                flows: 5_000,
            }
        };
        packet::run(&p, &mut sink);
        packet::memory_floor(full, &mut sink);
    }
    if want("control") {
        // (pods, policies, namespaces, incremental events of each kind)
        let sizes: Vec<(usize, usize, usize, usize)> = if full {
            // The two sizes, a small one, and single-axis steps (pods or policies
            // alone) so growth in each can be told apart.
            vec![
                (1_000, 100, 100, 100),
                (10_000, 100, 100, 20),
                (10_000, 1_000, 100, 100),
                (10_000, 5_000, 100, 20),
                (50_000, 1_000, 100, 20),
                (50_000, 5_000, 100, 20),
            ]
        } else {
            vec![(200, 20, 20, 10), (500, 50, 50, 10), (1_000, 100, 100, 10)]
        };
        for row in control::run(&sizes) {
            sink.push(row);
        }
    }
    if want("traffic") {
        traffic::run(full, &mut sink);
    }

    let growth = report::growth(&sink.rows);
    for row in report::flatness(&sink.rows) {
        sink.push(row);
    }
    let date = now_utc();
    let machine = machine();
    let size = if full { "full" } else { "smoke" };
    println!(
        "# npm benchmarks ({size}), {date}\n\nMachine: {machine}. Run took {:.0} s.\n",
        started.elapsed().as_secs_f64()
    );
    println!("{}", report::print_table(&sink.rows, &growth));
    if let Some(path) = args.json {
        let doc = serde_json::json!({
            "date": date,
            "machine": machine,
            "size": size,
            "rows": sink.rows,
            "growth": growth,
        });
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&doc).expect("serialize"),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        eprintln!("wrote {}", path.display());
    }
}
