//! Part 3: the control plane. Each size runs in its own child process (this binary with
//! `--control-child`), so its peak RSS is its own; the child prints its rows as JSON.
//!
//! Full: one `Enforcer::apply` of the whole synthetic cluster into freshly loaded, empty maps
//! (compile + plan + every map write), wall time; map entries from the compiled maps; map
//! memory as the kernel accounts it (`memlock` in `/proc/self/fdinfo` of each map fd); peak
//! RSS (`VmHWM`) of the process holding the snapshot, right after that apply.
//!
//! Incremental: events applied one at a time; each is timed from the change being handed
//! over to the maps being updated, in [`apply_event`] (the one place to switch to the
//! incremental compiler).
use std::time::{Duration, Instant};

use npm_agent::enforcer::Enforcer;
use npm_agent::state::{Change, ClusterSnapshot};
use npm_common::maps::{
    CIDRS_MAX, CLOCK_ENTRIES, CONNTRACK_MAX, CtKey, CtKey4, ENDPOINTS_MAX, FLOWS_MAX,
    IDENTITIES_MAX, METRICS_MAX, PAIRS_MAX, POLICY_MAX,
};

use crate::packet::median;
use crate::report::Row;
use crate::synth;

/// The code path measured for incremental events: the agent's own, `Enforcer::apply_changes`
/// (`compiler::Incremental::apply`, then `Programmer::apply_plan` into the kernel maps).
pub(crate) const EVENT_PATH: &str =
    "incremental (Enforcer::apply_changes: Incremental::apply + Programmer::apply_plan)";

pub(crate) fn apply_event(
    e: &mut Enforcer,
    snapshot: &mut ClusterSnapshot,
    change: Change,
) -> Duration {
    // The bench's own copy of the cluster (to generate the next events), outside the timing.
    assert!(snapshot.apply(&change), "the event changes the snapshot");
    let start = Instant::now();
    let report = e.apply_changes(std::slice::from_ref(&change));
    let took = start.elapsed();
    assert_eq!(report.sync.failed, 0, "programming the maps failed");
    assert_eq!(report.changes, 1);
    took
}

fn status_kib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// (map name, memlock bytes) of every BPF map this process holds an fd of.
fn map_memory() -> Vec<(String, u64)> {
    // (map type, max entries, key size or 0 for any, name)
    let known = [
        (1, ENDPOINTS_MAX, 0, "endpoints"),
        (1, IDENTITIES_MAX, 0, "identities"),
        (11, CIDRS_MAX, 0, "cidrs"),
        (11, POLICY_MAX, 0, "policy"),
        (1, PAIRS_MAX, 0, "pairs"),
        (9, CONNTRACK_MAX, size_of::<CtKey>(), "conntrack"),
        (9, CONNTRACK_MAX, size_of::<CtKey4>(), "conntrack4"),
        (6, METRICS_MAX, 0, "metrics"),
        (2, CLOCK_ENTRIES, 0, "clock"),
        (6, FLOWS_MAX, 0, "flows"),
    ];
    let mut out = Vec::new();
    // A map can be open through two fds (the agent keeps second handles): count it once.
    let mut seen = std::collections::BTreeSet::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(ty), Some(max), Some(mem)) =
            (field("map_type:"), field("max_entries:"), field("memlock:"))
        else {
            continue;
        };
        if let Some(id) = field("map_id:")
            && !seen.insert(id)
        {
            continue;
        }
        let key_size = field("key_size:").unwrap_or(0);
        let name = known
            .iter()
            .find(|(t, m, k, _)| {
                *t == ty && u64::from(*m) == max && (*k == 0 || *k as u64 == key_size)
            })
            .map_or_else(
                || format!("type{ty}/{max}"),
                |(_, _, _, n)| (*n).to_string(),
            );
        out.push((name, mem));
    }
    out.sort();
    out
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Runs one size; returns its rows.
pub(crate) fn child(pods: usize, policies: usize, namespaces: usize, events: usize) -> Vec<Row> {
    let size = format!("pods={pods} policies={policies} namespaces={namespaces}");
    let mut rows = Vec::new();
    let mut row =
        |figure: &str, value: f64, unit: &str, target: Option<f64>, note: Option<String>| {
            rows.push(Row {
                section: "3 control plane".into(),
                figure: figure.into(),
                size: size.clone(),
                pods: Some(pods),
                policies: Some(policies),
                value: Some(value),
                unit: unit.into(),
                target_max: target,
                note,
            });
        };
    let big = pods == 10_000 && policies == 1_000;
    let t = |target: f64| big.then_some(target);

    let mut snapshot = synth::cluster(pods, policies, namespaces);
    let mut e = Enforcer::new(None).expect("load the datapath (root required)");
    let start = Instant::now();
    let report = e.apply(&snapshot);
    let wall = start.elapsed();
    assert_eq!(report.sync.failed, 0, "programming the maps failed");
    let rss = status_kib("VmHWM:").unwrap_or(f64::NAN) / 1024.0;
    let m = report.map_entries;
    let entries = report.entries;
    let mem = map_memory();
    let mem_total: u64 = mem.iter().map(|(_, b)| b).sum();
    row(
        "full compile + map programming, wall",
        wall.as_secs_f64() * 1e3,
        "ms",
        t(1000.0),
        None,
    );
    row(
        "  of which compile",
        report.compile_time.as_secs_f64() * 1e3,
        "ms",
        None,
        None,
    );
    row(
        "  of which map programming",
        report.sync.elapsed.as_secs_f64() * 1e3,
        "ms",
        None,
        Some(format!(
            "{} writes",
            report.sync.upserts + report.sync.deletes
        )),
    );
    row("peak RSS", rss, "MiB", t(150.0), None);
    row(
        "map entries",
        entries as f64,
        "entries",
        None,
        Some(format!(
            "endpoints {}, identities {}, cidrs {}, policy {}",
            m.endpoints, m.identities, m.cidrs, m.policy
        )),
    );
    row(
        "map memory (kernel memlock, all maps)",
        mem_total as f64 / (1024.0 * 1024.0),
        "MiB",
        None,
        Some(
            mem.iter()
                .map(|(n, b)| format!("{n} {:.1}", *b as f64 / (1024.0 * 1024.0)))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    );

    // Incremental events.
    let kinds: [(&str, f64); 4] = [
        ("pod added", 10.0),
        ("pod label changed", 10.0),
        ("policy added", 50.0),
        ("namespace relabelled", 50.0),
    ];
    for (kind, target) in kinds {
        let mut times = Vec::with_capacity(events);
        for k in 0..events {
            let change = match kind {
                "pod added" => {
                    let p = synth::pod(pods + k, namespaces, (pods + k) % 500);
                    Change::Pod(p.obj_ref(), Some(p))
                }
                "pod label changed" => {
                    // Spread over all pods (local ones included: i < LOCAL_PODS).
                    let i = (k * 7919 + 3) % pods;
                    let r = synth::pod_ref(i, namespaces);
                    let mut p = snapshot.pods[&r].clone();
                    let app = p.labels["app"]
                        .trim_start_matches("app")
                        .parse::<usize>()
                        .unwrap_or(0);
                    p.labels
                        .insert("app".into(), format!("app{}", (app + 1) % 500));
                    Change::Pod(r, Some(p))
                }
                "policy added" => {
                    let p = synth::synthetic_policy(policies + k, namespaces);
                    Change::Policy(p.obj_ref(), Some(p))
                }
                _ => {
                    let n = k % namespaces;
                    let name = format!("ns{n}");
                    let mut ns = snapshot.namespaces[&name].clone();
                    let team = ns.labels["team"]
                        .trim_start_matches('t')
                        .parse::<usize>()
                        .unwrap_or(0);
                    ns.labels
                        .insert("team".to_string(), format!("t{}", (team + 1) % 10));
                    Change::Namespace(name, Some(ns))
                }
            };
            times.push(apply_event(&mut e, &mut snapshot, change).as_secs_f64() * 1e3);
        }
        let note = Some(format!("{events} events; {EVENT_PATH}"));
        let p50 = median(&mut times.clone());
        let p99 = percentile(&mut times, 99.0);
        row(
            &format!("event → maps updated: {kind}, p50"),
            p50,
            "ms",
            None,
            note.clone(),
        );
        row(
            &format!("event → maps updated: {kind}, p99"),
            p99,
            "ms",
            t(target),
            note,
        );
    }
    rows
}

/// Runs every size in its own child process and collects the rows.
pub(crate) fn run(sizes: &[(usize, usize, usize, usize)]) -> Vec<Row> {
    let exe = std::env::current_exe().expect("own path");
    let mut rows = Vec::new();
    for &(pods, policies, namespaces, events) in sizes {
        eprintln!("control plane: pods={pods} policies={policies} namespaces={namespaces}");
        let out = std::process::Command::new(&exe)
            .args([
                "--control-child".to_string(),
                format!("{pods},{policies},{namespaces},{events}"),
            ])
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run the control-plane child");
        assert!(
            out.status.success(),
            "control-plane child failed: {}",
            out.status
        );
        let child_rows: Vec<Row> =
            serde_json::from_slice(&out.stdout).expect("child prints its rows as JSON");
        rows.extend(child_rows);
    }
    rows
}
