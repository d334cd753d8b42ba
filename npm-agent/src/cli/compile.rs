//! `npm-agent compile`: compile manifests offline, as if every pod were local.
use std::collections::BTreeMap;

use anyhow::Context;
use serde::Serialize;

use super::args::CompileArgs;
use crate::compiler::{self, IdAllocator};
use crate::source::manifests;

#[derive(Serialize)]
struct Output {
    problems: Vec<String>,
    endpoints: usize,
    identities: usize,
    cidrs: usize,
    policy: usize,
    /// PAIRS entries: one per (local identity, peer, direction) with POLICY entries.
    pairs: usize,
}

/// Returns the process exit code: 0 when every object compiled, 1 when any had a problem.
pub fn run(args: CompileArgs) -> anyhow::Result<i32> {
    let (mut snapshot, mut problems) = manifests::load_dir(&args.manifests)
        .with_context(|| format!("reading {}", args.manifests.display()))?;
    // Pods without an IP yet (manifests often have no status) get placeholder addresses from
    // 10.244.0.0/16, as the lab does, so their policies compile.
    let mut next = 1u32;
    for pod in snapshot.pods.values_mut() {
        if pod.ips.is_empty() && !pod.host_network && !pod.finished {
            let ip =
                std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 244, 0, 0)) + next);
            pod.ips.push(ip.into());
            next += 1;
        }
    }
    // Give every endpoint pod a synthetic interface so its policy is compiled.
    snapshot.local = snapshot
        .pods
        .values()
        .filter(|p| p.is_endpoint())
        .enumerate()
        .map(|(i, p)| (p.obj_ref(), 1000 + i as u32))
        .collect::<BTreeMap<_, _>>();
    let compiled = compiler::compile(&snapshot, &mut IdAllocator::default());
    problems.extend(compiled.diagnostics.iter().cloned());
    let out = Output {
        problems: problems.iter().map(ToString::to_string).collect(),
        endpoints: compiled.maps.endpoints.len(),
        identities: compiled.maps.identities.len(),
        cidrs: compiled.maps.cidrs.len(),
        policy: compiled.maps.policy.len(),
        pairs: compiled.maps.pairs.len(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for p in &out.problems {
            println!("problem: {p}");
        }
        println!(
            "{} pods, {} policies -> endpoints {}, identities {}, cidrs {}, policy entries {}, pairs {}",
            snapshot.pods.len(),
            snapshot.policies.len(),
            out.endpoints,
            out.identities,
            out.cidrs,
            out.policy,
            out.pairs
        );
    }
    Ok(if out.problems.is_empty() { 0 } else { 1 })
}
