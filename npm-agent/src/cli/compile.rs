//! `npm-agent compile`: compile manifests offline, as if every pod were local.
use std::collections::BTreeMap;

use anyhow::Context;
use serde::Serialize;

use super::args::CompileArgs;
use crate::compiler::{self, Closed, IdAllocator, Limits};
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
    /// The per-policy budget compiled with (`--max-policy-entries`).
    max_policy_entries: usize,
    /// Per NetworkPolicy (`namespace/name`): the POLICY entries its rules make (before the
    /// merge with other policies' entries) and whether it fails closed for exceeding a limit.
    policy_entries: BTreeMap<String, PolicyEntries>,
}

#[derive(Serialize)]
struct PolicyEntries {
    entries: usize,
    /// null; "over_budget" (above `max_policy_entries`); "over_total" (the policies within
    /// budget together overfill the POLICY map, and it is among the largest).
    fails_closed: Option<&'static str>,
}

/// Makes `snapshot` one node holding every pod: pods without an IP yet (manifests often have
/// no status) get placeholder addresses from 10.244.0.0/16, as the lab does, so their policies
/// compile, and every endpoint pod a synthetic interface (1000, 1001, ...) so its policy is
/// compiled. Shared with `explain --manifests`.
pub(crate) fn all_pods_local(snapshot: &mut crate::state::ClusterSnapshot) {
    let mut next = 1u32;
    for pod in snapshot.pods.values_mut() {
        if pod.ips.is_empty() && !pod.host_network && !pod.finished {
            let ip =
                std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 244, 0, 0)) + next);
            pod.ips.push(ip.into());
            next += 1;
        }
    }
    snapshot.local = snapshot
        .pods
        .values()
        .filter(|p| p.is_endpoint())
        .enumerate()
        .map(|(i, p)| (p.obj_ref(), 1000 + i as u32))
        .collect::<BTreeMap<_, _>>();
}

/// Returns the process exit code: 0 when every object compiled, 1 when any had a problem.
pub fn run(args: CompileArgs) -> anyhow::Result<i32> {
    let (mut snapshot, mut problems) = manifests::load_dir(&args.manifests)
        .with_context(|| format!("reading {}", args.manifests.display()))?;
    all_pods_local(&mut snapshot);
    let limits = Limits {
        max_policy_entries: usize::try_from(args.max_policy_entries)
            .context("--max-policy-entries")?,
        ..Limits::default()
    };
    let compiled = compiler::compile_with(&snapshot, &mut IdAllocator::default(), limits);
    problems.extend(compiled.diagnostics.iter().cloned());
    let out = Output {
        problems: problems.iter().map(ToString::to_string).collect(),
        endpoints: compiled.maps.endpoints.len(),
        identities: compiled.maps.identities.len(),
        cidrs: compiled.maps.cidrs.len(),
        policy: compiled.maps.policy.len(),
        pairs: compiled.maps.pairs.len(),
        max_policy_entries: limits.max_policy_entries,
        policy_entries: compiled
            .policy_entries
            .iter()
            .map(|(obj, n)| {
                let fails_closed = n.closed.map(|c| match c {
                    Closed::OverBudget => "over_budget",
                    Closed::OverTotal => "over_total",
                });
                (
                    obj.to_string(),
                    PolicyEntries {
                        entries: n.entries,
                        fails_closed,
                    },
                )
            })
            .collect(),
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
