//! `npm-agent monitor` against a running agent: `npm-agent run --manifests` in a lab node's
//! network namespace (debug API on, for names), a monitor started there, a real denied probe
//! between two lab pods, and the drop event the monitor prints checked field by field; an
//! allowed probe prints nothing. Privileged (root).
#[path = "common/support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::Protocol;
use serde_json::Value;
use support::{KillOnDrop, RemoveOnDrop, eventually_some, output_within, pod, require_root};

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {containers: [{name: web, image: nginx, ports: [{containerPort: 80}]}]}
status: {podIP: 10.249.0.2, podIPs: [{ip: 10.249.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {containers: [{name: c, image: busybox, ports: [{containerPort: 80}]}]}
status: {podIP: 10.249.0.3, podIPs: [{ip: 10.249.0.3}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: default, labels: {app: other}}
spec: {containers: [{name: c, image: busybox, ports: [{containerPort: 80}]}]}
status: {podIP: 10.249.0.4, podIPs: [{ip: 10.249.0.4}]}
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

/// The agent's endpoint in the lab node's namespace (this test's own, so no clash).
const URL: &str = "http://127.0.0.1:10091";

fn in_node(node: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{node}"))
        .arg(env!("CARGO_BIN_EXE_npm-agent"))
        .args(args);
    c
}

fn spawn_agent(node: &str, manifests: &Path, bpffs: &Path) -> KillOnDrop {
    support::spawn_manifests_agent(node, manifests, bpffs, true)
}

#[test]
fn monitor_prints_a_real_drop_with_pod_names_port_protocol_and_policies() {
    require_root("the live monitor test");
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-monitortest-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let manifests = std::env::temp_dir().join(format!("npm-monitortest-{pid}"));
    let _dir = RemoveOnDrop(manifests.clone());
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("pods.yaml"), PODS).expect("write pods");
    std::fs::write(manifests.join("policy.yaml"), POLICY).expect("write policy");

    let lab = Lab::build(LabSpec {
        pods: vec![
            pod("web", "web", "10.249.0.2"),
            pod("client", "client", "10.249.0.3"),
            pod("other", "other", "10.249.0.4"),
        ],
        externals: vec![],
    })
    .expect("lab");
    let node = lab.node().name().to_string();
    let _agent = spawn_agent(&node, &manifests, &bpffs);
    // Ready when the agent explains other -> web as denied at web's interface.
    eventually_some(30, || {
        let out = output_within(
            &mut in_node(
                &node,
                &[
                    "explain",
                    "--url",
                    URL,
                    "--from",
                    "default/other",
                    "--to",
                    "default/web",
                    "--port",
                    "80",
                    "--json",
                ],
            ),
            Duration::from_secs(10),
        );
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["ingress"]["verdict"] == "denied" && v["ingress"]["ifindex"].is_u64()).then_some(())
    })
    .expect("the agent never placed web with its policy");

    // An allowed probe writes no event; the monitor, started after it, sees only the drop.
    let p = lab.probe("default/client", "default/web", 80, Protocol::Tcp);
    assert!(p.allowed, "client -> web: {:?}", p.outcome);
    let monitor = {
        let node = node.clone();
        let bpffs = bpffs.clone();
        std::thread::spawn(move || {
            output_within(
                in_node(
                    &node,
                    &["monitor", "--json", "--count", "1", "--duration", "10"],
                )
                .args(["--url", URL])
                .arg("--bpffs-dir")
                .arg(&bpffs),
                Duration::from_secs(30),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let p = lab.probe("default/other", "default/web", 80, Protocol::Tcp);
    assert!(!p.allowed, "other -> web: {:?}", p.outcome);
    let out = monitor.join().expect("monitor thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "monitor failed: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "--count 1: {stdout}\n{stderr}");
    eprintln!(
        "$ npm-agent monitor --json --count 1 --duration 10\n{}",
        lines[0]
    );
    let e: Value = serde_json::from_str(lines[0]).expect("one JSON object");
    assert_eq!(e["type"], "drop", "{e:#}");
    assert_eq!(e["direction"], "ingress");
    assert_eq!(e["reason"], "policy_deny");
    assert_eq!(e["namespace"], "default");
    assert_eq!(e["pod"], "web");
    assert_eq!(e["pod_address"], "10.249.0.2");
    assert_eq!(e["peer"]["address"], "10.249.0.4");
    assert_eq!(e["peer"]["namespace"], "default");
    assert_eq!(e["peer"]["pod"], "other");
    assert_eq!(e["protocol"], "TCP");
    assert_eq!(e["port"], 80);
    assert_eq!(
        e["isolated_by"],
        serde_json::json!(["default/web-from-client"])
    );
    assert!(e["interface"].is_string(), "{e:#}");
    assert!(
        e["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{e:#}"
    );

    // The suppressed-event counters are on the node metrics page (a few drops: none
    // suppressed; the flood is tests/datapath.rs's).
    let out = output_within(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node}"))
            .args([
                "curl",
                "-sS",
                "--max-time",
                "5",
                &format!("{URL}/node-metrics"),
            ]),
        Duration::from_secs(10),
    );
    let page = String::from_utf8_lossy(&out.stdout);
    for cause in ["rate_limit", "ring_full"] {
        let series = format!("npm_events_suppressed_total{{cause=\"{cause}\"}} ");
        let v = page
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no {series}in\n{page}"));
        assert_eq!(v.trim(), "0", "{series}");
    }
}
