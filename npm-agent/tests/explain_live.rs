//! `npm-agent explain --url` against a running agent: `npm-agent run --manifests` in a lab
//! node's network namespace, asked (through its `/debug/explain`) about an allowed and a
//! denied pair, and the answers checked against real probes between those pods; then the
//! same agent with EnableHTTPDebugAPI off answers 404. Privileged (root).
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
status: {podIP: 10.248.0.2, podIPs: [{ip: 10.248.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {containers: [{name: c, image: busybox, ports: [{containerPort: 80}]}]}
status: {podIP: 10.248.0.3, podIPs: [{ip: 10.248.0.3}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: default, labels: {app: other}}
spec: {containers: [{name: c, image: busybox, ports: [{containerPort: 80}]}]}
status: {podIP: 10.248.0.4, podIPs: [{ip: 10.248.0.4}]}
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

const URL: &str = "http://127.0.0.1:10091";

/// `npm-agent explain --url URL ARGS` in the node's namespace: (exit code, stdout, stderr).
fn explain(node: &str, args: &[&str]) -> (i32, String, String) {
    let out = output_within(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node}"))
            .arg(env!("CARGO_BIN_EXE_npm-agent"))
            .args(["explain", "--url", URL])
            .args(args),
        Duration::from_secs(30),
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn spawn_agent(node: &str, manifests: &Path, bpffs: &Path, debug: bool) -> KillOnDrop {
    support::spawn_manifests_agent(node, manifests, bpffs, debug)
}

#[test]
fn explain_asks_the_running_agent_and_agrees_with_real_probes() {
    require_root("the live explain test");
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-explaintest-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let manifests = std::env::temp_dir().join(format!("npm-explaintest-{pid}"));
    let _dir = RemoveOnDrop(manifests.clone());
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("pods.yaml"), PODS).expect("write pods");
    std::fs::write(manifests.join("policy.yaml"), POLICY).expect("write policy");

    let lab = Lab::build(LabSpec {
        pods: vec![
            pod("web", "web", "10.248.0.2"),
            pod("client", "client", "10.248.0.3"),
            pod("other", "other", "10.248.0.4"),
        ],
        externals: vec![],
    })
    .expect("lab");
    let node = lab.node().name().to_string();

    let agent = spawn_agent(&node, &manifests, &bpffs, true);
    let ask = |from: &str, json: bool| {
        let mut args = vec!["--from", from, "--to", "default/web", "--port", "80"];
        if json {
            args.push("--json");
        }
        explain(&node, &args)
    };
    // Before its first apply the agent answers 503 (exit 1); then an answer with every pod
    // placed on this node (the lab's three veths, found by the agent's discovery).
    let allowed: Value = eventually_some(30, || {
        let (code, out, _) = ask("default/client", true);
        let v: Value = serde_json::from_str(&out).ok().filter(|_| code == 0)?;
        (v["egress"]["verdict"] == "not_isolated").then_some(v)
    })
    .expect("the agent never explained with client placed");
    assert_eq!(allowed["view"], "node");
    assert_eq!(allowed["verdict"], "allowed", "{allowed:#}");
    assert_eq!(allowed["complete"], true);
    assert_eq!(allowed["from"]["ip"], "10.248.0.3");
    assert_eq!(allowed["to"]["ip"], "10.248.0.2");
    let ingress = &allowed["ingress"];
    assert_eq!(ingress["verdict"], "allowed");
    assert_eq!(ingress["pod"], "default/web");
    assert!(ingress["ifindex"].as_u64().is_some(), "{ingress:#}");
    assert_eq!(ingress["rule"]["policy"], "default/web-from-client");
    assert_eq!(ingress["rule"]["direction"], "ingress");
    assert_eq!(ingress["rule"]["index"], 0);
    assert_eq!(ingress["peer"]["via"], "identity");
    assert_eq!(
        ingress["peer"]["matched"][0]["peer"],
        "podSelector {app=client}"
    );
    assert_eq!(
        ingress["isolated_by"][0]["policy"],
        "default/web-from-client"
    );

    let (code, out, err) = ask("default/other", true);
    assert_eq!(code, 0, "{err}");
    let denied: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(denied["verdict"], "denied", "{denied:#}");
    assert_eq!(denied["ingress"]["verdict"], "denied");
    assert!(denied["ingress"]["rule"].is_null());
    assert_eq!(denied["egress"]["verdict"], "not_isolated");

    // Real packets agree with both answers.
    let p = lab.probe("default/client", "default/web", 80, Protocol::Tcp);
    assert!(p.allowed, "client -> web: {:?}", p.outcome);
    let p = lab.probe("default/other", "default/web", 80, Protocol::Tcp);
    assert!(!p.allowed, "other -> web: {:?}", p.outcome);

    // The human answers (README's sample output comes from here).
    for from in ["default/client", "default/other"] {
        let (code, out, err) = ask(from, false);
        assert_eq!(code, 0, "{err}");
        eprintln!(
            "$ npm-agent explain --url {URL} --from {from} --to default/web --port 80\n{out}"
        );
        assert!(out.starts_with(if from == "default/client" {
            "allowed: "
        } else {
            "denied: "
        }));
    }
    // Bad input: exit 2 and the agent's reason.
    let (code, _, err) = explain(
        &node,
        &[
            "--from",
            "default/nope",
            "--to",
            "default/web",
            "--port",
            "80",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("default/nope: no such pod"), "{err}");
    drop(agent);

    // The debug API off: 404, and explain says why.
    let _agent = spawn_agent(&node, &manifests, &bpffs, false);
    let refused = eventually_some(30, || {
        let (code, _, err) = ask("default/client", false);
        (code == 1 && err.contains("HTTP 404")).then_some(err)
    })
    .expect("no 404 with the debug API off");
    assert!(refused.contains("EnableHTTPDebugAPI"), "{refused}");
}
