//! `npm-agent lab`: enforce manifests on a throw-away node built from network namespaces and
//! probe every source against every destination port with real packets.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use serde::Serialize;

use super::args::{ExternalArg, LabArgs, ProbeOptions};
use super::steps::{self, Step};
use crate::enforcer::Enforcer;
use crate::expect::{Expectation, Mismatch};
use crate::lab::{External, Lab, LabSpec, Outcome, ProbeResult, render_matrix};
use crate::model::{ObjRef, Pod, Protocol};
use crate::source::manifests;
use crate::state::ClusterSnapshot;

/// The outcome of one probe round.
#[derive(Debug, Serialize)]
pub struct StepOutcome {
    pub step: String,
    pub results: Vec<ProbeResult>,
    /// Probes that differ from the step's expectation (empty without one).
    #[serde(serialize_with = "as_strings")]
    pub mismatches: Vec<Mismatch>,
    pub problems: Vec<String>,
    /// Whether the step had an expectation to check.
    pub checked: bool,
}

fn as_strings<S: serde::Serializer>(m: &[Mismatch], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(m.iter().map(ToString::to_string))
}

/// The finished lab run, for callers that want more than the printout (tests).
pub struct LabOutcome {
    pub results: Vec<ProbeResult>,
    pub problems: Vec<String>,
    /// Probes that differ from `--expect` (empty without it).
    pub mismatches: Vec<Mismatch>,
}

fn read_expect(args: &LabArgs) -> anyhow::Result<Option<Expectation>> {
    match &args.expect {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(Some(
                Expectation::parse(&text).with_context(|| format!("in {}", path.display()))?,
            ))
        }
        None => Ok(None),
    }
}

/// Hosts outside the node: `--external`s and the expectations' `external` lines, by IP.
/// Without ports, an external serves every port/protocol any pod declares.
pub(crate) fn externals<'a>(
    pods: &[Pod],
    args: impl Iterator<Item = &'a ExternalArg>,
) -> Vec<External> {
    let default_ports: BTreeSet<(u16, Protocol)> = pods
        .iter()
        .flat_map(|p| p.ports.iter().map(|c| (c.port, c.protocol)))
        .collect();
    let mut by_ip: BTreeMap<std::net::IpAddr, External> = BTreeMap::new();
    for e in args {
        let ports = if e.ports.is_empty() {
            default_ports.iter().copied().collect()
        } else {
            e.ports.clone()
        };
        by_ip.entry(e.ip).or_insert(External { ip: e.ip, ports });
    }
    by_ip.into_values().collect()
}

/// A built lab with enforcement attached to every pod interface. Every pod gets a place in
/// the lab: its own netns, or the node's for a hostNetwork pod. Terminating pods are placed
/// too (they run until their grace period ends, and stay endpoints), and so are finished
/// ones (phase Succeeded/Failed), which the compiler does not treat as endpoints; the probes
/// show what that means.
struct Rig {
    lab: Lab,
    enforcer: Enforcer,
    /// Pods as built (with the addresses the lab assigned).
    built: BTreeMap<ObjRef, Pod>,
    /// The Services' ClusterIPs, enforced as the Service ranges (empty without Services).
    service_ranges: Vec<ipnet::IpNet>,
}

impl Rig {
    fn new(pods: Vec<Pod>, externals: Vec<External>, opts: ProbeOptions) -> anyhow::Result<Self> {
        let mut lab = Lab::build(LabSpec { pods, externals }).context("building the lab")?;
        lab.set_prefer_ipv6(opts.prefer_ipv6);
        lab.set_probe_icmp(opts.icmp);
        let built = lab
            .pods()
            .iter()
            .map(|p| (p.obj_ref(), p.clone()))
            .collect();
        let mut enforcer = Enforcer::new(None).context("loading the datapath")?;
        let interfaces = lab.pod_interfaces();
        lab.node().run(|| -> anyhow::Result<()> {
            for (pod, (ifname, _)) in &interfaces {
                enforcer
                    .attach(ifname)
                    .with_context(|| format!("attaching to {ifname} (pod {pod})"))?;
            }
            Ok(())
        })?;
        Ok(Rig {
            lab,
            enforcer,
            built,
            service_ranges: Vec::new(),
        })
    }

    /// Plays kube-proxy for `services` (nftables DNAT in the node) and enforces egress to
    /// their ClusterIPs after the DNAT: `npm_host_egress` on the uplinks, the ClusterIPs as
    /// the Service ranges. Returns the Services the lab cannot translate.
    fn set_services(&mut self, services: &[crate::model::Service]) -> anyhow::Result<Vec<String>> {
        if services.is_empty() {
            return Ok(Vec::new());
        }
        let done = self
            .lab
            .set_services(services)
            .context("installing the Services' DNAT rules (nft; scripts/setup.sh installs it)")?;
        let uplinks = self.lab.external_interfaces();
        let enforcer = &mut self.enforcer;
        self.lab.node().run(|| -> anyhow::Result<()> {
            for (_, ifname) in &uplinks {
                enforcer
                    .attach_host(ifname)
                    .with_context(|| format!("attaching the post-DNAT check to {ifname}"))?;
            }
            Ok(())
        })?;
        self.service_ranges = done.ranges;
        Ok(done.problems.iter().map(ToString::to_string).collect())
    }

    /// Enforces `state` (its pods get the lab's addresses) and probes the endpoints present.
    fn round(
        &mut self,
        name: &str,
        state: &ClusterSnapshot,
        expect: Option<&Expectation>,
    ) -> anyhow::Result<StepOutcome> {
        let mut snapshot = state.clone();
        for (k, pod) in snapshot.pods.iter_mut() {
            if let Some(b) = self.built.get(k) {
                pod.ips = b.ips.clone();
            }
        }
        let interfaces = self.lab.pod_interfaces();
        snapshot.local = interfaces
            .iter()
            .filter(|(k, _)| snapshot.pods.contains_key(*k))
            .map(|(k, (_, ifindex))| (k.clone(), *ifindex))
            .collect();
        snapshot.node_ips = self.lab.node_ips();
        snapshot.service_cidrs = self.service_ranges.clone();
        let report = self.enforcer.apply(&snapshot);
        if report.sync.failed > 0 {
            anyhow::bail!(
                "{} map updates failed; not probing a half-programmed node",
                report.sync.failed
            );
        }
        let mut present: BTreeSet<String> = snapshot
            .pods
            .keys()
            .filter(|k| self.built.contains_key(*k))
            .map(ToString::to_string)
            .collect();
        present.extend(self.lab.externals().iter().map(|e| e.ip.to_string()));
        // Every probe must be a new connection: forget flows of earlier rounds (their random
        // source ports could repeat and ride an old, then-allowed entry).
        self.enforcer
            .datapath_mut()
            .flush_conntrack()
            .context("clearing conntrack between rounds")?;
        let results = self.lab.probe_among(&present);
        let mismatches = expect
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
        let problems = report
            .diagnostics
            .iter()
            .map(ToString::to_string)
            .chain(results.iter().filter_map(broken_probe))
            .collect();
        Ok(StepOutcome {
            step: name.to_string(),
            results,
            mismatches,
            problems,
            checked: expect.is_some(),
        })
    }
}

/// A probe whose outcome is neither an answer nor a timeout says nothing about the policy: a
/// policy drop times out, so a refusal (RST, ICMP port unreachable) means the packet got
/// through to a port nothing serves, and an unreachable or an error means the probe itself
/// broke. Counting such a probe as denied would let a deny expectation pass on a packet the
/// datapath let through, so each is a problem of the round.
fn broken_probe(r: &ProbeResult) -> Option<String> {
    match &r.outcome {
        Outcome::Allowed | Outcome::Timeout | Outcome::NoCommonFamily => None,
        other => Some(format!(
            "probe {} -> {} {}/{}: {other}, not a policy verdict (a policy drop times out)",
            r.from, r.to, r.protocol, r.port
        )),
    }
}

/// Builds the lab, enforces, probes, tears everything down, and returns the results.
pub fn execute(args: &LabArgs) -> anyhow::Result<LabOutcome> {
    let dir = args
        .manifests
        .as_ref()
        .context("--manifests DIR is required without --steps")?;
    let loader = manifests::read_dir_into(dir, manifests::Loader::default())
        .with_context(|| format!("reading {}", dir.display()))?;
    let services = loader.services();
    let (snapshot, diagnostics) = loader.finish();
    let mut problems: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
    let expectation = read_expect(args)?;
    let pods: Vec<Pod> = snapshot.pods.values().cloned().collect();
    let ext = externals(
        &pods,
        args.externals
            .iter()
            .chain(expectation.iter().flat_map(|e| e.externals.iter())),
    );
    let mut rig = Rig::new(pods, ext, args.probe_options())?;
    problems.extend(rig.set_services(&services)?);
    let out = rig.round("manifests", &snapshot, expectation.as_ref())?;
    problems.extend(out.problems);
    Ok(LabOutcome {
        results: out.results,
        problems,
        mismatches: out.mismatches,
    })
}

/// `--steps`: builds one lab for every pod any step mentions, then applies the steps in order.
pub fn execute_steps(args: &LabArgs) -> anyhow::Result<Vec<StepOutcome>> {
    let dir = args.steps.as_ref().context("--steps DIR")?;
    run_steps(
        &steps::read_steps(dir)?,
        &args.externals,
        args.probe_options(),
    )
}

/// Runs steps on one lab built for every pod any step mentions (conntrack is cleared between
/// steps, so each round's probes are new connections).
pub fn run_steps(
    steps: &[Step],
    extra_externals: &[ExternalArg],
    opts: ProbeOptions,
) -> anyhow::Result<Vec<StepOutcome>> {
    let mut first_seen: BTreeMap<ObjRef, Pod> = BTreeMap::new();
    for s in steps {
        for (k, p) in &s.apply.pods {
            first_seen.entry(k.clone()).or_insert_with(|| p.clone());
        }
    }
    let pods: Vec<Pod> = first_seen.into_values().collect();
    let ext = externals(
        &pods,
        extra_externals.iter().chain(
            steps
                .iter()
                .flat_map(|s| s.expect.iter().flat_map(|e| e.externals.iter())),
        ),
    );
    let mut rig = Rig::new(pods, ext, opts)?;
    let mut state = ClusterSnapshot::default();
    let mut out = Vec::new();
    for s in steps {
        steps::apply_step(&mut state, s);
        let mut o = rig.round(&s.name, &state, s.expect.as_ref())?;
        let mut p: Vec<String> = s.problems.iter().map(ToString::to_string).collect();
        p.append(&mut o.problems);
        o.problems = p;
        out.push(o);
    }
    Ok(out)
}

fn report(name: Option<&str>, o: &StepOutcome, checked: bool) {
    if let Some(n) = name {
        println!("== step {n}");
    }
    for p in &o.problems {
        eprintln!("problem: {p}");
    }
    print!("{}", render_matrix(&o.results));
    if checked {
        for m in &o.mismatches {
            eprintln!("mismatch: {m}");
        }
        if o.mismatches.is_empty() {
            eprintln!("all {} probes match the expectation", o.results.len());
        } else {
            eprintln!(
                "{} of {} probes differ from the expectation",
                o.mismatches.len(),
                o.results.len()
            );
        }
    }
}

/// The CLI verb: prints the matrix (or JSON) and returns the exit code: 1 on any mismatch,
/// and on any broken probe ([`broken_probe`]) where an expectation was checked, since its
/// line could not be verified.
pub fn run(args: LabArgs) -> anyhow::Result<i32> {
    if args.steps.is_some() {
        let outcomes = execute_steps(&args)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&outcomes)?);
        } else {
            for o in &outcomes {
                report(Some(&o.step), o, o.checked);
            }
        }
        let failed = outcomes.iter().any(|o| {
            !o.mismatches.is_empty()
                || (o.checked && o.results.iter().any(|r| broken_probe(r).is_some()))
        });
        return Ok(i32::from(failed));
    }
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
        let broken = outcome
            .results
            .iter()
            .filter(|r| broken_probe(r).is_some())
            .count();
        if broken > 0 {
            eprintln!(
                "{broken} of {} probes broke (problems above); their expectation is unverified",
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
    crate::netns::stop_creating();
    // Let an `ip netns add` already under way finish, so the listing below includes it.
    std::thread::sleep(std::time::Duration::from_millis(300));
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
