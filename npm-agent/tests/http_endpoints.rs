//! `npm-agent run --config FILE` as a process, and its HTTP endpoints read with a real HTTP
//! client: health and readiness, Azure NPM's `/node-metrics` and `/cluster-metrics` with real
//! values (policy counts, packet counters that rise with real dropped packets), the debug view,
//! the toggles, the config layering (file < environment < flags), a lost source that keeps
//! enforcement, and a real Prometheus (Debian's package) scraping the agent.
//!
//! Each agent runs in a network namespace of its own (a lab node or a bare namespace made
//! here), so its fixed ports cannot collide with anything else on the machine. Privileged
//! (root), as CI runs.
#[path = "common/http.rs"]
mod http;
#[path = "common/support.rs"]
mod support;
use http::http_get;
use support::{KillOnDrop, RemoveOnDrop, eventually_some, pod};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::Protocol;
use npm_agent::netns::NetNs;

/// GET that must answer 200; panics with the answer otherwise.
fn get_ok(ns: &NetNs, port: u16, path: &str) -> String {
    match http_get(ns, port, path) {
        Ok((200, body)) => body,
        other => panic!("GET {path}: {other:?}"),
    }
}

/// The value of sample `series` (metric name with its labels, exactly as the agent writes them).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

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
metadata: {name: intruder, namespace: default, labels: {app: intruder}}
spec: {containers: [{name: c, image: busybox, ports: [{containerPort: 80}]}]}
status: {podIP: 10.247.0.4, podIPs: [{ip: 10.247.0.4}]}
"#;

/// Two policies: web only from client; client open to all (selects a pod, denies nothing).
const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-open, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  ingress: [{}]
"#;

/// A temp directory for one test, removed at the end.
fn temp_dir(tag: &str) -> (PathBuf, RemoveOnDrop) {
    let dir = std::env::temp_dir().join(format!("npm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    (dir.clone(), RemoveOnDrop(dir))
}

/// Starts `npm-agent run` in `netns` (nsenter, which keeps the host's bpffs in view).
fn spawn_agent(netns: &NetNs, args: &[&str], env: &[(&str, &str)]) -> KillOnDrop {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.path().display()))
        .arg(env!("CARGO_BIN_EXE_npm-agent"))
        .args(args)
        .env_remove("NPM_CONFIG")
        .env_remove("NPM_LISTEN_PORT")
        .env_remove("NPM_LISTEN_ADDRESS")
        .env_remove("NPM_ENABLE_PROMETHEUS_METRICS")
        .env_remove("NPM_ENABLE_HTTP_DEBUG_API")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    KillOnDrop(cmd.spawn().expect("spawn npm-agent"))
}

/// A bare namespace with loopback up, for agents that need no pods.
fn bare_netns(tag: &str) -> NetNs {
    let ns = NetNs::create(&format!("npm{}-{tag}", std::process::id())).expect("netns");
    ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
    ns
}

const PORT: u16 = 19091;
const DROPPED_INGRESS: &str =
    "npm_datapath_packets_total{direction=\"ingress\",verdict=\"drop\",reason=\"policy_deny\"}";
const ALLOWED_INGRESS: &str =
    "npm_datapath_packets_total{direction=\"ingress\",verdict=\"allow\",reason=\"policy_allow\"}";

#[test]
fn endpoints_report_real_state_and_a_lost_source_keeps_enforcement() {
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-httptest-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let (tmp, _tmp) = temp_dir("httptest");
    let manifests = tmp.join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("pods.yaml"), PODS).expect("write pods");
    std::fs::write(manifests.join("policies.yaml"), POLICIES).expect("write policies");
    // Azure NPM's file, with a key it knows that we ignore and one nobody knows. Its port
    // (10091) is overridden by --listen-port.
    let config = tmp.join("azure-npm.json");
    std::fs::write(
        &config,
        r#"{"ResyncPeriodInMinutes": 15, "ListeningPort": 10091, "ListeningAddress": "0.0.0.0",
            "Toggles": {"EnablePrometheusMetrics": true, "EnableHTTPDebugAPI": true,
                        "EnablePprof": true},
            "Bogus": 1}"#,
    )
    .expect("write config");

    let lab = Lab::build(LabSpec {
        pods: vec![
            pod("web", "web", "10.247.0.2"),
            pod("client", "client", "10.247.0.3"),
            pod("intruder", "intruder", "10.247.0.4"),
        ],
        externals: vec![],
    })
    .expect("lab");
    let node = lab.node();
    let port = PORT.to_string();
    let _agent = spawn_agent(
        node,
        &[
            "run",
            "--poll-interval-ms",
            "200",
            "--manifests",
            manifests.to_str().expect("utf-8"),
            "--config",
            config.to_str().expect("utf-8"),
            "--listen-address",
            "127.0.0.1",
            "--listen-port",
            &port,
            "--bpffs-dir",
            bpffs.to_str().expect("utf-8"),
            "--max-conntrack-entries",
            "4096",
        ],
        &[],
    );
    let allowed = |from: &str| lab.probe(from, "default/web", 80, Protocol::Tcp).allowed;

    // Ready once the first enforcement is applied.
    let ready = eventually_some(30, || match http_get(node, PORT, "/readyz") {
        Ok((200, body)) => Some(body),
        _ => None,
    })
    .expect("/readyz turns 200");
    assert!(
        ready.starts_with("ready: enforcing since ") && ready.contains("source connected"),
        "{ready}"
    );
    let live = get_ok(node, PORT, "/healthz");
    assert!(live.starts_with("ok: enforcement loop ticked"), "{live}");
    assert!(
        http_get(node, 10091, "/healthz").is_err(),
        "the flag's port replaces the file's"
    );
    assert_eq!(
        http_get(node, PORT, "/metrics").map(|(s, _)| s),
        Ok(404),
        "unknown path"
    );

    // Cluster gauges: what is in the manifests directory.
    let cluster = get_ok(node, PORT, "/cluster-metrics");
    assert_eq!(sample(&cluster, "npm_num_policies"), Some(2.0), "{cluster}");
    assert_eq!(sample(&cluster, "npm_num_pods"), Some(3.0), "{cluster}");
    assert_eq!(
        sample(&cluster, "npm_num_namespaces"),
        Some(1.0),
        "{cluster}"
    );

    // Node metrics: three local endpoints programmed, source up, a sync done.
    let metrics = get_ok(node, PORT, "/node-metrics");
    assert_eq!(
        sample(&metrics, "npm_local_endpoints"),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "npm_map_entries{map=\"endpoints\"}"),
        Some(3.0),
        "{metrics}"
    );
    assert!(sample(&metrics, "npm_map_entries{map=\"policy\"}").unwrap_or(0.0) >= 1.0);
    assert_eq!(sample(&metrics, "npm_source_connected"), Some(1.0));
    let synced = sample(&metrics, "npm_last_sync_timestamp_seconds").expect("last sync");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        (now - 120.0..=now + 1.0).contains(&synced),
        "{synced} vs {now}"
    );
    assert!(sample(&metrics, "npm_compile_duration_seconds_count").unwrap_or(0.0) >= 1.0);
    // The conntrack maps were created with the flag's size (fresh pins).
    for family in ["ipv4", "ipv6"] {
        assert_eq!(
            sample(
                &metrics,
                &format!("npm_conntrack_capacity{{family=\"{family}\"}}")
            ),
            Some(4096.0),
            "{metrics}"
        );
        assert!(
            sample(
                &metrics,
                &format!("npm_conntrack_entries{{family=\"{family}\"}}")
            )
            .is_some(),
            "{metrics}"
        );
    }
    assert_eq!(
        sample(
            &metrics,
            "npm_http_connections_dropped_total{reason=\"peer_limit\"}"
        ),
        Some(0.0)
    );

    // Real packets: denied probes raise the drop counter of web's ingress, allowed ones the
    // allow counter.
    let drops_before = sample(&metrics, DROPPED_INGRESS).expect("drop series exists");
    let allows_before = sample(&metrics, ALLOWED_INGRESS).expect("allow series exists");
    for _ in 0..3 {
        assert!(!allowed("default/intruder"), "intruder is denied");
    }
    assert!(allowed("default/client"), "client is allowed");
    let metrics = get_ok(node, PORT, "/node-metrics");
    let drops = sample(&metrics, DROPPED_INGRESS).expect("drops");
    let allows = sample(&metrics, ALLOWED_INGRESS).expect("allows");
    assert!(
        drops >= drops_before + 3.0,
        "3 denied connections drop at least 3 SYNs: {drops_before} -> {drops}"
    );
    assert!(
        allows >= allows_before + 1.0,
        "allowed: {allows_before} -> {allows}"
    );
    let dropped_bytes = sample(
        &metrics,
        "npm_datapath_bytes_total{direction=\"ingress\",verdict=\"drop\",reason=\"policy_deny\"}",
    )
    .expect("bytes");
    assert!(
        dropped_bytes >= 3.0 * 40.0,
        "a SYN is at least 40 bytes: {dropped_bytes}"
    );

    // The debug view.
    let debug: serde_json::Value =
        serde_json::from_str(&get_ok(node, PORT, "/debug/state")).expect("JSON");
    assert_eq!(debug["ready"], true);
    assert_eq!(debug["counts"]["policies"], 2);
    assert_eq!(debug["counts"]["local_endpoints"], 3);
    assert_eq!(
        debug["config"]["unknown_keys"],
        serde_json::json!(["Bogus"])
    );
    assert_eq!(
        debug["config"]["ignored_keys"][0]["key"],
        "Toggles.EnablePprof"
    );
    assert_eq!(debug["config"]["origins"]["ListeningPort"], "flag");
    assert_eq!(debug["config"]["origins"]["MaxConntrackEntries"], "flag");
    assert_eq!(debug["config"]["effective"]["max_conntrack_entries"], 4096);
    assert_eq!(debug["config"]["origins"]["ResyncPeriodInMinutes"], "file");
    assert_eq!(debug["config"]["effective"]["listen_port"], PORT);

    // The source goes away: enforcement stays, readiness stays and says so, metrics too.
    let hidden = tmp.join("manifests.hidden");
    std::fs::rename(&manifests, &hidden).expect("hide manifests");
    let ready = eventually_some(20, || match http_get(node, PORT, "/readyz") {
        Ok((200, body)) if body.contains("source disconnected since") => Some(body),
        _ => None,
    })
    .expect("/readyz reports the lost source and stays 200");
    assert!(ready.contains("enforcement kept"), "{ready}");
    let metrics = get_ok(node, PORT, "/node-metrics");
    assert_eq!(sample(&metrics, "npm_source_connected"), Some(0.0));
    assert!(
        sample(&metrics, "npm_enforcement_errors_total{kind=\"source\"}").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert!(
        !allowed("default/intruder"),
        "still denied without a source"
    );
    assert!(allowed("default/client"), "still allowed without a source");
    assert_eq!(http_get(node, PORT, "/healthz").map(|(s, _)| s), Ok(200));
    let debug: serde_json::Value =
        serde_json::from_str(&get_ok(node, PORT, "/debug/state")).expect("JSON");
    assert_eq!(debug["source_connected"], false);
    assert!(
        debug["last_errors"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["kind"] == "source")),
        "{debug}"
    );

    // And back.
    std::fs::rename(&hidden, &manifests).expect("restore manifests");
    eventually_some(20, || {
        let m = http_get(node, PORT, "/node-metrics").ok()?.1;
        (sample(&m, "npm_source_connected") == Some(1.0)).then_some(())
    })
    .expect("source connected again");
    assert!(get_ok(node, PORT, "/readyz").contains("source connected"));
}

#[test]
fn toggles_off_hide_metrics_and_debug_and_env_overrides_the_file() {
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-httpoff-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let (tmp, _tmp) = temp_dir("httpoff");
    let manifests = tmp.join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("policies.yaml"), POLICIES).expect("write");
    let config = tmp.join("azure-npm.json");
    std::fs::write(
        &config,
        r#"{"ListeningPort": 10091, "Toggles": {"EnablePrometheusMetrics": false,
            "EnableHTTPDebugAPI": false}}"#,
    )
    .expect("write config");
    let ns = bare_netns("httpoff");
    let _agent = spawn_agent(
        &ns,
        &[
            "run",
            "--poll-interval-ms",
            "200",
            "--manifests",
            manifests.to_str().expect("utf-8"),
            "--config",
            config.to_str().expect("utf-8"),
            "--bpffs-dir",
            bpffs.to_str().expect("utf-8"),
        ],
        // The environment beats the file's port.
        &[("NPM_LISTEN_PORT", "18081")],
    );
    eventually_some(30, || {
        matches!(http_get(&ns, 18081, "/readyz"), Ok((200, _))).then_some(())
    })
    .expect("/readyz on the environment's port");
    assert!(
        http_get(&ns, 10091, "/readyz").is_err(),
        "not on the file's port"
    );
    for path in ["/node-metrics", "/cluster-metrics", "/debug/state"] {
        assert_eq!(
            http_get(&ns, 18081, path).map(|(s, _)| s),
            Ok(404),
            "{path} is off"
        );
    }
    assert_eq!(http_get(&ns, 18081, "/healthz").map(|(s, _)| s), Ok(200));
}

#[test]
fn a_bad_config_value_stops_the_agent_naming_key_and_reason() {
    let (tmp, _tmp) = temp_dir("badconfig");
    let config = tmp.join("azure-npm.json");
    std::fs::write(&config, r#"{"ListeningPort": 70000}"#).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_npm-agent"))
        .args(["run", "--once", "--manifests"])
        .arg(&tmp)
        .arg("--config")
        .arg(&config)
        .env_remove("NPM_LISTEN_PORT")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ListeningPort is 70000; expected a port number from 1 to 65535"),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_npm-agent"))
        .args(["run", "--once", "--manifests"])
        .arg(&tmp)
        .env("NPM_LISTEN_ADDRESS", "example.com")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("environment variable NPM_LISTEN_ADDRESS"),
        "{stderr}"
    );
}

/// Debian's `prometheus` (scripts/setup.sh installs it); panics when it is not installed.
fn prometheus_binary() -> PathBuf {
    let bin = PathBuf::from("/usr/bin/prometheus");
    assert!(
        bin.is_file(),
        "{} is missing: this test needs Debian's prometheus package; run scripts/setup.sh as root",
        bin.display()
    );
    bin
}

/// deploy/prometheus/scrape-config.yaml with Kubernetes discovery replaced by a static
/// target: same job names, paths and scheme.
fn derived_prometheus_config(target: &str) -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/scrape-config.yaml");
    let text = std::fs::read_to_string(&path).expect("read scrape-config.yaml");
    let deployed: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    let jobs = deployed["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .map(|job| {
            let mut j = serde_yaml::Mapping::new();
            for key in [
                "job_name",
                "metrics_path",
                "scheme",
                "metric_relabel_configs",
            ] {
                if let Some(v) = job.get(key) {
                    j.insert(key.into(), v.clone());
                }
            }
            j.insert("scrape_interval".into(), "1s".into());
            let targets = serde_yaml::to_value([target]).expect("targets");
            let mut sc = serde_yaml::Mapping::new();
            sc.insert("targets".into(), targets);
            j.insert(
                "static_configs".into(),
                serde_yaml::Value::Sequence(vec![sc.into()]),
            );
            serde_yaml::Value::Mapping(j)
        })
        .collect::<Vec<_>>();
    let mut root = serde_yaml::Mapping::new();
    root.insert("scrape_configs".into(), serde_yaml::Value::Sequence(jobs));
    serde_yaml::to_string(&root).expect("YAML")
}

/// One instant query against Prometheus's HTTP API: the (job, value) of each result.
fn prom_query(ns: &NetNs, port: u16, query: &str) -> Vec<(String, String)> {
    let Ok((200, body)) = http_get(ns, port, &format!("/api/v1/query?query={query}")) else {
        return vec![];
    };
    let v: serde_json::Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(_) => return vec![],
    };
    v["data"]["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|s| {
                    (
                        s["metric"]["job"].as_str().unwrap_or_default().to_owned(),
                        s["value"][1].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn prometheus_scrapes_the_agent_with_the_deployed_jobs() {
    let prometheus = prometheus_binary();
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-httpprom-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let (tmp, _tmp) = temp_dir("httpprom");
    let manifests = tmp.join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("policies.yaml"), POLICIES).expect("write");
    let ns = bare_netns("httpprom");
    let _agent = spawn_agent(
        &ns,
        &[
            "run",
            "--poll-interval-ms",
            "200",
            "--manifests",
            manifests.to_str().expect("utf-8"),
            "--listen-address",
            "127.0.0.1",
            "--bpffs-dir",
            bpffs.to_str().expect("utf-8"),
        ],
        &[],
    );
    // The default port, as the DaemonSet and scrape config use it.
    eventually_some(30, || {
        matches!(http_get(&ns, 10091, "/readyz"), Ok((200, _))).then_some(())
    })
    .expect("agent ready on 10091");

    let config = tmp.join("prometheus.yml");
    std::fs::write(&config, derived_prometheus_config("127.0.0.1:10091")).expect("write");
    let prom_port: u16 = 19090;
    let log = tmp.join("prometheus.log");
    let child = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            tmp.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn prometheus");
    let _prometheus = KillOnDrop(child);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let policies = eventually_some(60, || {
        let r = prom_query(&ns, prom_port, "npm_num_policies");
        (!r.is_empty()).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "Prometheus scraped no npm_num_policies within 60 s; targets: {:?}\nconfig:\n{}\nits log:\n{}",
            http_get(&ns, prom_port, "/api/v1/targets"),
            std::fs::read_to_string(&config).unwrap_or_default(),
            log_text()
        )
    });
    assert_eq!(
        policies,
        [("npm-cluster-metrics".to_owned(), "2".to_owned())],
        "npm_num_policies comes from /cluster-metrics and counts the two policies"
    );
    let up = eventually_some(30, || {
        let mut r = prom_query(&ns, prom_port, "up");
        r.sort();
        (r.len() == 2).then_some(r)
    })
    .expect("both jobs have a target");
    assert_eq!(
        up,
        [
            ("npm-cluster-metrics".to_owned(), "1".to_owned()),
            ("npm-node-metrics".to_owned(), "1".to_owned())
        ]
    );
    let connected = eventually_some(30, || {
        let r = prom_query(&ns, prom_port, "npm_source_connected");
        (!r.is_empty()).then_some(r)
    })
    .expect("node metrics scraped");
    assert_eq!(connected, [("npm-node-metrics".to_owned(), "1".to_owned())]);
}
