//! `npm-agent status` against a real agent: `npm-agent run --manifests` in a lab node's
//! network namespace, then `status --json` in the same namespace, checked against the lab's
//! interfaces, the kernel's hooks, `bpftool`'s dump of the pinned maps and the agent's own
//! `/debug/state`; then again with the agent stopped (pins only). Privileged (root).
#[path = "common/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::Protocol;
use npm_common::ABI_VERSION;
use serde_json::Value;
use support::{KillOnDrop, RemoveOnDrop, eventually_some, output_within, pod, require_root};

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {containers: [{name: web, image: nginx, ports: [{containerPort: 80}]}]}
status: {podIP: 10.247.0.2, podIPs: [{ip: 10.247.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {containers: [{name: c, image: busybox, ports: [{containerPort: 80}]}]}
status: {podIP: 10.247.0.3, podIPs: [{ip: 10.247.0.3}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: default, labels: {app: other}}
spec: {containers: [{name: c, image: busybox, ports: [{containerPort: 80}]}]}
status: {podIP: 10.247.0.4, podIPs: [{ip: 10.247.0.4}]}
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

/// `npm-agent status --json --bpffs-dir DIR` in the node's namespace: (exit code, JSON).
fn status(node: &str, bpffs: &Path, json: bool) -> (i32, String) {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{node}"))
        .arg(env!("CARGO_BIN_EXE_npm-agent"))
        .arg("status")
        .arg("--bpffs-dir")
        .arg(bpffs);
    if json {
        cmd.arg("--json");
    }
    let out = output_within(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "status: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

fn status_json(node: &str, bpffs: &Path) -> Value {
    let (code, text) = status(node, bpffs, true);
    assert_eq!(code, 0, "status failed: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn map_entries(status: &Value) -> BTreeMap<String, Option<u64>> {
    status["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().expect("name").to_owned(),
                m["entries"].as_u64(),
            )
        })
        .collect()
}

#[test]
fn status_shows_endpoints_attachments_and_maps_with_and_without_the_agent() {
    require_root("the status test");
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-statustest-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let pin_dir = bpffs.join(format!("v{ABI_VERSION}"));
    let manifests = std::env::temp_dir().join(format!("npm-statustest-{pid}"));
    let _dir = RemoveOnDrop(manifests.clone());
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("pods.yaml"), PODS).expect("write pods");
    std::fs::write(manifests.join("policy.yaml"), POLICY).expect("write policy");

    let lab = Lab::build(LabSpec {
        pods: vec![
            pod("web", "web", "10.247.0.2"),
            pod("client", "client", "10.247.0.3"),
            pod("other", "other", "10.247.0.4"),
        ],
        externals: vec![],
    })
    .expect("lab");
    let node = lab.node().name().to_string();
    let interfaces: BTreeMap<String, (String, u32)> = lab
        .pod_interfaces()
        .into_iter()
        .map(|(obj, iface)| (obj.to_string(), iface))
        .collect();

    // No agent has run: no pins, nothing attached, the agent does not answer.
    let before = status_json(&node, &bpffs);
    assert!(before["pin_dir"].is_null(), "{before:#}");
    assert_eq!(before["endpoints"].as_array().map(Vec::len), Some(0));
    assert_eq!(before["interfaces"].as_array().map(Vec::len), Some(0));
    assert_eq!(before["agent"]["reachable"], false);

    let agent = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{node}"))
        .arg(env!("CARGO_BIN_EXE_npm-agent"))
        .args([
            "run",
            "--poll-interval-ms",
            "200",
            "--listen-address",
            "127.0.0.1",
        ])
        .args(["--listen-port", "10091", "--manifests"])
        .arg(&manifests)
        .arg("--bpffs-dir")
        .arg(&bpffs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn agent");
    let agent = KillOnDrop(agent);

    // Ready, and a flow tracked (client -> web is allowed).
    let running = eventually_some(30, || {
        let s = status_json(&node, &bpffs);
        (s["agent"]["ready"] == true).then_some(())
    });
    assert!(running.is_some(), "the agent never became ready");
    assert!(
        lab.probe("default/client", "default/web", 80, Protocol::Tcp)
            .allowed
    );
    assert!(
        !lab.probe("default/other", "default/web", 80, Protocol::Tcp)
            .allowed
    );
    let live = status_json(&node, &bpffs);

    assert_eq!(live["pin_dir"], pin_dir.display().to_string());
    assert_eq!(live["missing_maps"], serde_json::json!([]));
    assert_eq!(live["abi_version"], ABI_VERSION);
    // The endpoints are the lab's pod interfaces, with their isolation.
    let endpoints = live["endpoints"].as_array().expect("endpoints");
    let by_name: BTreeMap<&str, &Value> = endpoints
        .iter()
        .map(|e| (e["interface"].as_str().expect("a live interface"), e))
        .collect();
    let expected: Vec<&str> = interfaces.values().map(|(n, _)| n.as_str()).collect();
    assert_eq!(by_name.keys().copied().collect::<Vec<_>>(), {
        let mut e = expected.clone();
        e.sort();
        e
    });
    for (pod, (name, ifindex)) in &interfaces {
        let e = by_name[name.as_str()];
        assert_eq!(e["ifindex"], *ifindex, "{pod}");
        assert_eq!(e["attach"], "tcx", "{pod}");
        assert_eq!(e["pending"], false, "{pod}");
        let web = pod == "default/web";
        assert_eq!(e["isolated_ingress"], web, "{pod}: {e}");
        assert_eq!(e["isolated_egress"], false, "{pod}");
        let ip = lab
            .pods()
            .iter()
            .find(|p| p.obj_ref().to_string() == *pod)
            .map(|p| p.ips[0].to_string())
            .expect("lab pod");
        assert_eq!(e["addresses"], serde_json::json!([ip]), "{pod}");
    }
    // Attachments: ours on both hooks of each pod interface, by tcx, nothing elsewhere.
    let attached = live["interfaces"].as_array().expect("interfaces");
    assert_eq!(attached.len(), interfaces.len(), "{attached:#?}");
    for i in attached {
        assert_eq!(i["mode"], "tcx");
        assert_eq!(i["endpoint"], true);
        assert_eq!(
            i["programs"],
            serde_json::json!(["tcx ingress npm_from_pod", "tcx egress npm_to_pod"])
        );
    }
    // Map counts: what bpftool finds in the pins, and what the agent says it wrote.
    let counts = map_entries(&live);
    for map in [
        "NPM_ENDPOINTS",
        "NPM_IDENTITIES",
        "NPM_POLICY",
        "NPM_PAIRS",
        "NPM_CIDRS",
        "NPM_CT4",
    ] {
        assert_eq!(
            counts[map],
            Some(support::pinned_entries(&pin_dir.join(map)) as u64),
            "{map}: {live:#}"
        );
    }
    assert_eq!(counts["NPM_ENDPOINTS"], Some(3));
    assert!(counts["NPM_CT4"] >= Some(1), "the probe's flow is tracked");
    assert!(counts["NPM_POLICY"] > Some(0));
    assert_eq!(counts["NPM_METRICS"], None, "an array has no count");
    let agent_counts = &live["agent"]["debug_state"]["counts"]["map_entries"];
    for (ours, theirs) in [
        ("NPM_ENDPOINTS", "endpoints"),
        ("NPM_IDENTITIES", "identities"),
        ("NPM_POLICY", "policy"),
        ("NPM_PAIRS", "pairs"),
    ] {
        assert_eq!(counts[ours], agent_counts[theirs].as_u64(), "{ours}");
    }
    let policy = &live["agent"]["debug_state"]["policies"]["default/web-from-client"];
    assert_eq!(policy["generation"], 1, "{live:#}");
    assert!(policy["realized_at"].is_string(), "{policy}");
    let (_, human) = status(&node, &bpffs, false);
    assert!(
        human.contains("NPM_POLICY") && human.contains("isolated"),
        "{human}"
    );

    // The agent stopped: the pins still tell the same, and status says the agent is gone.
    drop(agent);
    let stopped = status_json(&node, &bpffs);
    assert_eq!(stopped["agent"]["reachable"], false);
    assert!(stopped["agent"]["error"].is_string());
    assert_eq!(stopped["endpoints"], live["endpoints"]);
    assert_eq!(stopped["interfaces"], live["interfaces"]);
    assert_eq!(map_entries(&stopped), counts);
    let (code, human) = status(&node, &bpffs, false);
    assert_eq!(code, 0);
    assert!(human.contains("not answering"), "{human}");
    drop(lab);
}
