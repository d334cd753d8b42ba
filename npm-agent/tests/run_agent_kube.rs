//! `npm-agent run --kubeconfig` as a process, in a lab node's network namespace, against the
//! in-test API server (listening on that namespace's loopback), with real packets between the
//! lab's pods: no enforcement before the first complete list, enforcement from the API's
//! objects, a lost API server changes nothing, and changes made after it is back are enforced.
//! Privileged (root), as CI runs.
#[path = "common/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "common/http.rs"]
mod http;

#[path = "common/objects.rs"]
mod objects;
#[path = "common/support.rs"]
mod support;
use objects::{api_pod, lab_pod, web_from_client};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::{
    KillOnDrop, RemoveOnDrop, eventually, log_tail, pinned_entries, spawn_kube_agent, stop_agent,
};

use aya::programs::TcAttachType;
use fake_apiserver::{FakeApi, Res};
use http::http_get;
use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::Protocol;
use serde_json::json;

#[test]
fn run_with_kubeconfig_waits_for_sync_enforces_and_survives_a_lost_api_server() {
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-kuberun-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let kubeconfig = std::env::temp_dir().join(format!("npm-kuberun-{pid}.yaml"));
    let _kc = RemoveOnDrop(kubeconfig.clone());
    let agent_log = std::env::temp_dir().join(format!("npm-kuberun-{pid}.log"));
    let _log = RemoveOnDrop(agent_log.clone());

    let lab = Lab::build(LabSpec {
        pods: vec![
            lab_pod("web", "web", "10.247.0.2"),
            lab_pod("client", "client", "10.247.0.3"),
            lab_pod("intruder", "intruder", "10.247.0.4"),
        ],
        externals: vec![],
    })
    .expect("lab");
    let node = lab.node().name().to_string();
    // The API server listens on the node namespace's loopback, where the agent runs.
    let listener = lab
        .node()
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind in node netns");
    let api = FakeApi::start_on(listener);
    api.write_kubeconfig(&kubeconfig);
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}}}));
    api.apply(api_pod("web", "web", "10.247.0.2", "node-1"));
    api.apply(api_pod("client", "client", "10.247.0.3", "node-1"));
    api.apply(api_pod("intruder", "intruder", "10.247.0.4", "node-1"));
    // A pod of another node with an address no local interface has: never local.
    api.apply(api_pod("elsewhere", "client", "10.247.9.9", "node-2"));
    api.apply(web_from_client());
    // The policy list is slow: the agent must not enforce the pods without it.
    api.set_list_delay(Res::NetworkPolicies, Duration::from_secs(3));

    let agent = spawn_agent(&node, &kubeconfig, &bpffs, &agent_log);
    let allowed = |from: &str| lab.probe(from, "default/web", 80, Protocol::Tcp).allowed;
    let endpoints = bpffs
        .join(format!("v{}", npm_common::ABI_VERSION))
        .join(npm_common::maps::MAP_ENDPOINTS);

    // Maps pinned (datapath loaded) but nothing programmed while the policies are still
    // being listed.
    assert!(
        eventually(20, || endpoints.exists()),
        "agent never pinned its maps:\n{}",
        log_tail(&agent_log)
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        api.requests()
            .iter()
            .any(|r| r.res == Some(Res::Pods) && r.is_watch()),
        "pods listed and watched already"
    );
    assert_eq!(
        pinned_entries(&endpoints),
        0,
        "enforced before the policy list arrived:\n{}",
        log_tail(&agent_log)
    );
    assert!(allowed("default/intruder"));

    // Synced: the policy is enforced.
    assert!(
        eventually(20, || !allowed("default/intruder")),
        "policy never enforced:\n{}",
        log_tail(&agent_log)
    );
    assert!(allowed("default/client"));
    assert_eq!(
        pinned_entries(&endpoints),
        3,
        "the three local pods (not node-2's)"
    );
    // The HTTP endpoints (10091 in the node's namespace): ready, connected, the API's counts.
    let get = |path: &str| http_get(lab.node(), 10091, path);
    let (code, body) = get("/readyz").expect("/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("disconnected"), "{body}");
    let (_, metrics) = get("/cluster-metrics").expect("/cluster-metrics");
    assert!(metrics.contains("npm_num_policies 1\n"), "{metrics}");
    assert!(metrics.contains("npm_num_pods 4\n"), "{metrics}");

    // The API server goes away: enforcement stays exactly as it was, and readiness says so
    // while staying ready (the node keeps its enforcement; restarting would not help).
    api.set_down(true);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!allowed("default/intruder"), "flushed after losing the API");
    assert!(allowed("default/client"));
    assert_eq!(pinned_entries(&endpoints), 3);
    assert!(
        eventually(20, || get("/readyz").is_ok_and(
            |(code, body)| code == 200 && body.contains("disconnected")
        )),
        "/readyz never reported the lost API server: {:?}\n{}",
        get("/readyz"),
        log_tail(&agent_log)
    );
    let (_, metrics) = get("/node-metrics").expect("/node-metrics");
    assert!(metrics.contains("npm_source_connected 0\n"), "{metrics}");

    // Back; a change made then is enforced: client relabelled, loses access.
    api.set_down(false);
    api.apply(api_pod("client", "visitor", "10.247.0.3", "node-1"));
    assert!(
        eventually(20, || !allowed("default/client")),
        "relabel after reconnect not enforced:\n{}",
        log_tail(&agent_log)
    );
    let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert!(
        log.contains("Kubernetes API unreachable"),
        "disconnect not logged:\n{log}"
    );
    assert!(
        eventually(20, || get("/readyz").is_ok_and(
            |(code, body)| code == 200 && !body.contains("disconnected")
        )),
        "/readyz still reports the API lost after it came back: {:?}",
        get("/readyz")
    );

    // The agent stops (SIGTERM) and a new one starts while the API server is down: it cannot
    // list, so it enforces nothing new, and what the pinned maps hold keeps enforcing.
    stop_agent(agent);
    api.set_down(true);
    let agent_log2 = std::env::temp_dir().join(format!("npm-kuberun-{pid}-2.log"));
    let _log2 = RemoveOnDrop(agent_log2.clone());
    let _agent2 = spawn_agent(&node, &kubeconfig, &bpffs, &agent_log2);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!allowed("default/intruder"), "restart without API flushed");
    assert!(!allowed("default/client"));
    assert_eq!(pinned_entries(&endpoints), 3);
    let log2 = std::fs::read_to_string(&agent_log2).unwrap_or_default();
    assert!(
        !log2.contains("maps in step"),
        "enforced without a list:\n{log2}"
    );

    // The API is back: the new agent syncs, adopts the maps, and enforces a deletion.
    api.set_down(false);
    api.delete("NetworkPolicy", "default", "web-from-client");
    assert!(
        eventually(20, || allowed("default/intruder")),
        "policy deletion not enforced by the restarted agent:\n{}",
        log_tail(&agent_log2)
    );
}

#[test]
fn a_failed_first_node_read_keeps_the_adopted_enforcement_and_is_not_ready() {
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-kubenode-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let kubeconfig = std::env::temp_dir().join(format!("npm-kubenode-{pid}.yaml"));
    let _kc = RemoveOnDrop(kubeconfig.clone());
    let log1 = std::env::temp_dir().join(format!("npm-kubenode-{pid}-1.log"));
    let _l1 = RemoveOnDrop(log1.clone());
    let log2 = std::env::temp_dir().join(format!("npm-kubenode-{pid}-2.log"));
    let _l2 = RemoveOnDrop(log2.clone());

    let lab = Lab::build(LabSpec {
        pods: vec![
            lab_pod("web", "web", "10.245.0.2"),
            lab_pod("client", "client", "10.245.0.3"),
            lab_pod("intruder", "intruder", "10.245.0.4"),
        ],
        externals: vec![],
    })
    .expect("lab");
    let node = lab.node().name().to_string();
    let listener = lab
        .node()
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind in node netns");
    let api = FakeApi::start_on(listener);
    api.write_kubeconfig(&kubeconfig);
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}}}));
    api.apply(api_pod("web", "web", "10.245.0.2", "node-1"));
    api.apply(api_pod("client", "client", "10.245.0.3", "node-1"));
    api.apply(api_pod("intruder", "intruder", "10.245.0.4", "node-1"));
    api.apply(web_from_client());
    let allowed = |from: &str| lab.probe(from, "default/web", 80, Protocol::Tcp).allowed;
    let endpoints = bpffs
        .join(format!("v{}", npm_common::ABI_VERSION))
        .join(npm_common::maps::MAP_ENDPOINTS);

    let agent = spawn_agent(&node, &kubeconfig, &bpffs, &log1);
    assert!(
        eventually(20, || !allowed("default/intruder")),
        "policy never enforced:\n{}",
        log_tail(&log1)
    );
    assert_eq!(pinned_entries(&endpoints), 3);
    stop_agent(agent);

    // The next agent lists the cluster but cannot read the node's tables (no iproute2 on its
    // PATH): it must not compare the adopted maps with a node of no pods (that deleted every
    // endpoint), nor say it is ready.
    let _agent = spawn_agent_with(&node, &kubeconfig, &bpffs, &log2, Some("/nonexistent"));
    let get = |path: &str| http_get(lab.node(), 10091, path);
    assert!(
        eventually(20, || get("/readyz").is_ok_and(
            |(code, body)| code == 503 && body.contains("the node's tables cannot be read")
        )),
        "/readyz does not say why it waits: {:?}\n{}",
        get("/readyz"),
        log_tail(&log2)
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        pinned_entries(&endpoints),
        3,
        "the adopted endpoints were deleted:\n{}",
        log_tail(&log2)
    );
    assert!(!allowed("default/intruder"), "enforcement lost");
    assert!(allowed("default/client"));
    let (_, metrics) = get("/node-metrics").expect("/node-metrics");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("npm_enforcement_errors_total{kind=\"node_tables\"}")
            && !l.ends_with(" 0")),
        "node table errors not counted:\n{metrics}"
    );
}

/// `/readyz` turns 200 only once every pod interface carries the programs: on a fresh node
/// the first apply fills the maps, then attaches (tcx, ~13 ms per hook), and readiness said
/// ready in between (found by the soak: its denied probes, started at the first ready, got
/// through). Eight pods make the attach take long enough to be seen from here.
#[test]
fn ready_only_once_every_pod_interface_carries_the_programs() {
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-kubeready-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let kubeconfig = std::env::temp_dir().join(format!("npm-kubeready-{pid}.yaml"));
    let _kc = RemoveOnDrop(kubeconfig.clone());
    let log = std::env::temp_dir().join(format!("npm-kubeready-{pid}.log"));
    let _log = RemoveOnDrop(log.clone());

    let names: Vec<(String, String)> = (0..8)
        .map(|i| (format!("p{i}"), format!("10.243.0.{}", 2 + i)))
        .collect();
    let lab = Lab::build(LabSpec {
        pods: names
            .iter()
            .map(|(name, ip)| lab_pod(name, "app", ip))
            .collect(),
        externals: vec![],
    })
    .expect("lab");
    let listener = lab
        .node()
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind in node netns");
    let api = FakeApi::start_on(listener);
    api.write_kubeconfig(&kubeconfig);
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}}}));
    for (name, ip) in &names {
        api.apply(api_pod(name, "app", ip, "node-1"));
    }
    api.apply(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny-all", "namespace": "default"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
    );

    let node = lab.node().name().to_string();
    let _agent = spawn_agent(&node, &kubeconfig, &bpffs, &log);
    assert!(
        support::eventually_every(Duration::from_secs(60), Duration::from_millis(5), || {
            matches!(http_get(lab.node(), 10091, "/readyz"), Ok((200, _)))
        }),
        "never ready:\n{}",
        log_tail(&log)
    );
    // At once: what the node's interfaces carry, on one thread in the node's namespace, the
    // interface attached last first (the first apply goes in ifindex order). tcx, or cls_bpf
    // filters where the kernel has no tcx.
    let mut devs: Vec<(String, u32)> = lab.pod_interfaces().values().cloned().collect();
    devs.sort_by_key(|(_, ifindex)| std::cmp::Reverse(*ifindex));
    let tcx: Vec<(String, Vec<String>, Vec<String>)> = lab.node().run(|| {
        devs.iter()
            .map(|(dev, _)| {
                let on = |hook| npm_agent::datapath::tcx_programs(dev, hook).expect("tcx query");
                (
                    dev.clone(),
                    on(TcAttachType::Ingress),
                    on(TcAttachType::Egress),
                )
            })
            .collect()
    });
    let carries = |dev: &str, on_tcx: &[String], side: &str, prog: &str| {
        on_tcx.iter().any(|p| p == prog)
            || lab
                .node()
                .exec(&["tc", "filter", "show", "dev", dev, side])
                .expect("tc filter show")
                .contains(prog)
    };
    let bare: Vec<String> = tcx
        .iter()
        .filter(|(dev, ingress, egress)| {
            !(carries(dev, ingress, "ingress", "npm_from_pod")
                && carries(dev, egress, "egress", "npm_to_pod"))
        })
        .map(|(dev, ..)| dev.clone())
        .collect();
    assert!(
        bare.is_empty(),
        "/readyz said ready while {bare:?} carried no programs\n{}",
        log_tail(&log)
    );
}

fn spawn_agent(node: &str, kubeconfig: &Path, bpffs: &Path, log: &Path) -> KillOnDrop {
    spawn_agent_with(node, kubeconfig, bpffs, log, None)
}

/// [`spawn_agent`] with `PATH` set to `path` when given.
fn spawn_agent_with(
    node: &str,
    kubeconfig: &Path,
    bpffs: &Path,
    log: &Path,
    path: Option<&str>,
) -> KillOnDrop {
    let bin = Path::new(env!("CARGO_BIN_EXE_npm-agent"));
    spawn_kube_agent(bin, node, kubeconfig, bpffs, log, path)
}
