//! `npm-agent run` as an operator runs it: the real binary, in a node's network namespace, with
//! pinned maps. Checks local-pod discovery from routes, enforcement with real packets, that a
//! stopped agent leaves enforcement in place, and that a restarted agent adopts the pinned maps
//! and applies only what changed. Privileged (root), as CI runs.
#[path = "common/support.rs"]
mod support;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::{KillOnDrop, RemoveOnDrop, eventually, output_within, pod};

use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::Protocol;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {containers: [{name: web, image: nginx, ports: [{containerPort: 80}]}]}
status: {podIP: 10.250.0.2, podIPs: [{ip: 10.250.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {containers: [{name: c, image: busybox, ports: [{containerPort: 80}]}]}
status: {podIP: 10.250.0.3, podIPs: [{ip: 10.250.0.3}]}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: default, labels: {app: intruder}}
spec: {containers: [{name: c, image: busybox, ports: [{containerPort: 80}]}]}
status: {podIP: 10.250.0.4, podIPs: [{ip: 10.250.0.4}]}
"#;

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#;

/// How long `npm-agent run --once` may take (it loads, applies and exits in seconds).
const ONCE_WITHIN: Duration = Duration::from_secs(60);

/// Runs `npm-agent run --once`; returns its log (stderr).
fn agent_once(node_netns: &str, manifests: &Path, bpffs: &Path) -> String {
    // nsenter (not `ip netns exec`, which remounts /sys and would hide bpffs).
    let out = output_within(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node_netns}"))
            .arg(env!("CARGO_BIN_EXE_npm-agent"))
            .args(["run", "--once", "--manifests"])
            .arg(manifests)
            .arg("--bpffs-dir")
            .arg(bpffs),
        ONCE_WITHIN,
    );
    assert!(
        out.status.success(),
        "npm-agent run failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The (upserts, deletes) of every "maps in step" line of a log (ANSI colours removed).
fn map_writes(log: &str) -> Vec<(u64, u64)> {
    let mut plain = String::new();
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let field = |line: &str, name: &str| -> u64 {
        let at = line
            .find(&format!(" {name}="))
            .unwrap_or_else(|| panic!("no {name}= in {line}"));
        line[at + name.len() + 2..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name}= is not a number in {line}"))
    };
    plain
        .lines()
        .filter(|l| l.contains("maps in step"))
        .map(|l| (field(l, "upserts"), field(l, "deletes")))
        .collect()
}

#[test]
fn run_enforces_survives_exit_and_adopts_pinned_maps() {
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-runtest-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let manifests = std::env::temp_dir().join(format!("npm-runtest-{pid}"));
    let _dir = RemoveOnDrop(manifests.clone());
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("pods.yaml"), PODS).expect("write pods");
    std::fs::write(manifests.join("policy.yaml"), POLICY).expect("write policy");

    let lab = Lab::build(LabSpec {
        pods: vec![
            pod("web", "web", "10.250.0.2"),
            pod("client", "client", "10.250.0.3"),
            pod("intruder", "intruder", "10.250.0.4"),
        ],
        externals: vec![],
    })
    .expect("lab");
    let node = lab.node().name().to_string();
    let allowed = |from: &str| lab.probe(from, "default/web", 80, Protocol::Tcp).allowed;

    // Before any agent: open.
    assert!(allowed("default/intruder"));

    let first = agent_once(&node, &manifests, &bpffs);
    assert!(
        map_writes(&first).iter().any(|(u, _)| *u > 0),
        "the first agent wrote the maps: {first}"
    );
    assert!(
        bpffs
            .join(format!("v{}", npm_common::ABI_VERSION))
            .join(npm_common::maps::MAP_POLICY)
            .exists(),
        "maps are pinned"
    );
    // The agent has exited: its programs and pinned maps keep enforcing.
    assert!(allowed("default/client"), "client is allowed by the policy");
    assert!(!allowed("default/intruder"), "intruder is denied");

    // A restart with nothing changed: the new agent adopts the maps and keeps every id, so it
    // writes and deletes nothing (it used to renumber every identity and rewrite it all).
    let second = agent_once(&node, &manifests, &bpffs);
    let writes = map_writes(&second);
    assert!(!writes.is_empty(), "no 'maps in step' line: {second}");
    assert!(
        writes.iter().all(|w| *w == (0, 0)),
        "a restart rewrote the maps {writes:?}: {second}"
    );
    assert!(allowed("default/client"));
    assert!(!allowed("default/intruder"));

    // Policy removed: a new agent adopts the pinned maps and opens the path again.
    std::fs::remove_file(manifests.join("policy.yaml")).expect("rm policy");
    agent_once(&node, &manifests, &bpffs);
    assert!(
        allowed("default/intruder"),
        "policy deletion enforced by the restarted agent"
    );

    // And back: adoption again, isolation returns.
    std::fs::write(manifests.join("policy.yaml"), POLICY).expect("write policy");
    agent_once(&node, &manifests, &bpffs);
    assert!(!allowed("default/intruder"));
    assert!(allowed("default/client"));
    drop(lab);
}

#[test]
fn running_agent_reapplies_when_manifests_change() {
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-livetest-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let manifests = std::env::temp_dir().join(format!("npm-livetest-{pid}"));
    let _dir = RemoveOnDrop(manifests.clone());
    std::fs::create_dir_all(&manifests).expect("mkdir");
    // Same pods, other addresses than the other test, so both can run at once.
    std::fs::write(
        manifests.join("pods.yaml"),
        PODS.replace("10.250.0.", "10.249.0."),
    )
    .expect("write pods");

    let lab = Lab::build(LabSpec {
        pods: vec![
            pod("web", "web", "10.249.0.2"),
            pod("client", "client", "10.249.0.3"),
            pod("intruder", "intruder", "10.249.0.4"),
        ],
        externals: vec![],
    })
    .expect("lab");
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.node().name()))
        .arg(env!("CARGO_BIN_EXE_npm-agent"))
        .args(["run", "--poll-interval-ms", "200", "--manifests"])
        .arg(&manifests)
        .arg("--bpffs-dir")
        .arg(&bpffs)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn agent");
    let _agent = KillOnDrop(child);
    let allowed = |from: &str| lab.probe(from, "default/web", 80, Protocol::Tcp).allowed;

    // No policy yet: open, once the agent is up (maps pinned).
    assert!(eventually(20, || bpffs
        .join(format!("v{}", npm_common::ABI_VERSION))
        .join(npm_common::maps::MAP_ENDPOINTS)
        .exists()));
    assert!(allowed("default/intruder"));

    // A policy file appears: the running agent picks it up.
    std::fs::write(manifests.join("policy.yaml"), POLICY).expect("write policy");
    assert!(
        eventually(20, || !allowed("default/intruder")),
        "new policy enforced by the running agent"
    );
    assert!(allowed("default/client"));

    // The client's label changes so it no longer matches: it loses access.
    let relabelled = PODS
        .replace("10.250.0.", "10.249.0.")
        .replace("labels: {app: client}", "labels: {app: visitor}");
    std::fs::write(manifests.join("pods.yaml"), relabelled).expect("rewrite pods");
    assert!(
        eventually(20, || !allowed("default/client")),
        "label change enforced"
    );
    drop(lab);
}
