//! `npm-agent lab`: enforce manifests on a throw-away node built from network namespaces and
//! probe every source against every destination port with real packets.
use std::collections::BTreeSet;

use anyhow::Context;

use super::args::LabArgs;
use crate::enforcer::Enforcer;
use crate::expect::{Expectation, Mismatch};
use crate::lab::{External, Lab, LabSpec, ProbeResult, render_matrix};
use crate::model::Protocol;
use crate::source::manifests;

/// The finished lab run, for callers that want more than the printout (tests).
pub struct LabOutcome {
    pub results: Vec<ProbeResult>,
    pub problems: Vec<String>,
    /// Probes that differ from `--expect` (empty without it).
    pub mismatches: Vec<Mismatch>,
}

/// Builds the lab, enforces, probes, tears everything down, and returns the results.
pub fn execute(args: &LabArgs) -> anyhow::Result<LabOutcome> {
    let (mut snapshot, diagnostics) = manifests::load_dir(&args.manifests)
        .with_context(|| format!("reading {}", args.manifests.display()))?;
    let mut problems: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();

    let lab_pods: Vec<_> = snapshot
        .pods
        .values()
        .filter(|p| {
            let keep = !p.host_network && !p.terminating;
            if !keep {
                problems.push(format!(
                    "Pod {}: not placed in the lab (hostNetwork or terminating pods are not endpoints)",
                    p.obj_ref()
                ));
            }
            keep
        })
        .cloned()
        .collect();
    let default_ports: BTreeSet<(u16, Protocol)> = lab_pods
        .iter()
        .flat_map(|p| p.ports.iter().map(|c| (c.port, c.protocol)))
        .collect();
    let expectation = match &args.expect {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(Expectation::parse(&text).with_context(|| format!("in {}", path.display()))?)
        }
        None => None,
    };
    let externals = args
        .externals
        .iter()
        .chain(expectation.iter().flat_map(|e| e.externals.iter()))
        .map(|e| External {
            ip: e.ip,
            ports: if e.ports.is_empty() {
                default_ports.iter().copied().collect()
            } else {
                e.ports.clone()
            },
        })
        .collect();

    let lab = Lab::build(LabSpec {
        pods: lab_pods,
        externals,
    })
    .context("building the lab")?;
    for p in lab.pods() {
        snapshot.pods.insert(p.obj_ref(), p.clone());
    }
    let interfaces = lab.pod_interfaces();
    snapshot.local = interfaces
        .iter()
        .map(|(k, (_, ifindex))| (k.clone(), *ifindex))
        .collect();
    snapshot.node_ips = lab.node_ips();

    let mut enforcer = Enforcer::new(None).context("loading the datapath")?;
    lab.node().run(|| -> anyhow::Result<()> {
        for (pod, (ifname, _)) in &interfaces {
            enforcer
                .attach(ifname)
                .with_context(|| format!("attaching to {ifname} (pod {pod})"))?;
        }
        Ok(())
    })?;
    let report = enforcer.apply(&snapshot);
    problems.extend(report.compiled.diagnostics.iter().map(ToString::to_string));
    if report.sync.failed > 0 {
        anyhow::bail!(
            "{} map updates failed; not probing a half-programmed node",
            report.sync.failed
        );
    }
    let results = lab.probe_all();
    drop(lab);
    drop(enforcer);
    let mismatches = expectation
        .map(|e| {
            e.check(results.iter().map(|r| {
                (
                    r.from.as_str(),
                    r.to.as_str(),
                    r.port,
                    r.protocol,
                    r.allowed,
                )
            }))
        })
        .unwrap_or_default();
    Ok(LabOutcome {
        results,
        problems,
        mismatches,
    })
}

/// The CLI verb: prints the matrix (or JSON) and returns the exit code.
pub fn run(args: LabArgs) -> anyhow::Result<i32> {
    let outcome = execute(&args)?;
    for p in &outcome.problems {
        eprintln!("problem: {p}");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome.results)?);
    } else {
        print!("{}", render_matrix(&outcome.results));
    }
    if args.expect.is_some() {
        for m in &outcome.mismatches {
            eprintln!("mismatch: {m}");
        }
        if !outcome.mismatches.is_empty() {
            eprintln!(
                "{} of {} probes differ from the expectation",
                outcome.mismatches.len(),
                outcome.results.len()
            );
            return Ok(1);
        }
        eprintln!("all {} probes match the expectation", outcome.results.len());
    }
    Ok(0)
}

/// Removes every network namespace a lab of this process created (Ctrl-C path, where the
/// lab's own guard cannot run).
pub fn cleanup_leftovers() {
    let prefix = format!("npmlab-{}-", std::process::id());
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(&prefix) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .status();
        }
    }
}
