//! Every query of every Grafana dashboard in deploy/grafana/ against a real Prometheus
//! (Debian's package) scraping a live agent: `npm-agent run --manifests` in a lab node, real
//! allowed and denied TCP connections between the lab's pods, a policy added while Prometheus
//! scrapes (so the latency histograms and Azure NPM's summary have observations in the rate
//! windows), then each panel's `expr` with the template variables substituted goes to
//! `/api/v1/query`. A query that errors, returns nothing, or returns NaN fails the test, naming
//! the dashboard, the panel and the query. The `node` variable's own query must list the lab's
//! node, under the label the deployed scrape config gives it.
//!
//! Privileged (root), as CI runs.
#[path = "common/http.rs"]
mod http;
#[path = "common/support.rs"]
mod support;
use http::http_get;
use support::{KillOnDrop, RemoveOnDrop, eventually_some, log_tail, pod, require_root};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::Protocol;
use npm_agent::netns::NetNs;

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
metadata: {name: intruder, namespace: default, labels: {app: intruder}}
spec: {containers: [{name: c, image: busybox, ports: [{containerPort: 80}]}]}
status: {podIP: 10.248.0.4, podIPs: [{ip: 10.248.0.4}]}
"#;

/// web only from client on 80.
const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#;

/// Added while Prometheus scrapes: client open to all (isolates it, denies nothing).
const ADDED_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-open, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  ingress: [{}]
"#;

const AGENT_PORT: u16 = 10091;
const PROM_PORT: u16 = 19090;

/// What the test substitutes for Grafana's interval variables: the default time range (1 h)
/// and a rate window wide enough to hold the test's whole run.
const RANGE: &str = "1h";
const RATE_INTERVAL: &str = "5m";

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

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// deploy/prometheus/scrape-config.yaml with Kubernetes discovery replaced by a static target:
/// same job names, paths and scheme; the node job's target carries, as a static label, what
/// its relabelling copies from `__meta_kubernetes_node_name` (the dashboards' `node`).
fn derived_prometheus_config(target: &str, node_name: &str) -> (String, String) {
    let text = std::fs::read_to_string(deploy_dir().join("prometheus/scrape-config.yaml"))
        .expect("read scrape-config.yaml");
    let deployed: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    let mut node_label = None;
    let jobs = deployed["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .map(|job| {
            let mut j = serde_yaml::Mapping::new();
            for key in ["job_name", "metrics_path", "scheme"] {
                if let Some(v) = job.get(key) {
                    j.insert(key.into(), v.clone());
                }
            }
            j.insert("scrape_interval".into(), "1s".into());
            let mut sc = serde_yaml::Mapping::new();
            sc.insert(
                "targets".into(),
                serde_yaml::to_value([target]).expect("targets"),
            );
            let from_node_name = job["relabel_configs"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|r| {
                    r["source_labels"]
                        .as_sequence()
                        .is_some_and(|s| s.iter().any(|l| l == "__meta_kubernetes_node_name"))
                })
                .and_then(|r| r["target_label"].as_str());
            if let Some(label) = from_node_name {
                let mut labels = serde_yaml::Mapping::new();
                labels.insert(label.into(), node_name.into());
                sc.insert("labels".into(), labels.into());
                node_label = Some(label.to_owned());
            }
            j.insert(
                "static_configs".into(),
                serde_yaml::Value::Sequence(vec![sc.into()]),
            );
            serde_yaml::Value::Mapping(j)
        })
        .collect::<Vec<_>>();
    let mut root = serde_yaml::Mapping::new();
    root.insert("scrape_configs".into(), serde_yaml::Value::Sequence(jobs));
    (
        serde_yaml::to_string(&root).expect("YAML"),
        node_label.expect(
            "the node job of scrape-config.yaml copies __meta_kubernetes_node_name to a label",
        ),
    )
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query: Ok(the result array) or Err(why it failed).
fn query(ns: &NetNs, q: &str) -> Result<Vec<serde_json::Value>, String> {
    let (status, body) = http_get(
        ns,
        PROM_PORT,
        &format!("/api/v1/query?query={}", url_encode(q)),
    )?;
    let v: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
    if status != 200 || v["status"] != "success" {
        return Err(format!("HTTP {status}: {body}"));
    }
    match &v["data"]["result"] {
        serde_json::Value::Array(r) => Ok(r.clone()),
        // A scalar result is [time, "value"].
        other @ serde_json::Value::String(_) => Ok(vec![other.clone()]),
        other => Err(format!("unexpected result {other}")),
    }
}

/// The sample values of an instant vector result.
fn values(result: &[serde_json::Value]) -> Vec<f64> {
    result
        .iter()
        .filter_map(|s| s["value"][1].as_str())
        .map(|v| v.parse().unwrap_or(f64::NAN))
        .collect()
}

/// The first value of `q`'s result once it is non-empty and `ok`, within `secs`.
fn wait_for(ns: &NetNs, secs: u64, q: &str, ok: impl Fn(f64) -> bool) -> Option<f64> {
    eventually_some(secs, || {
        let r = query(ns, q).ok()?;
        values(&r).into_iter().find(|v| ok(*v))
    })
}

/// One query of a dashboard, with where it comes from.
struct PanelQuery {
    dashboard: String,
    panel: String,
    ref_id: String,
    expr: String,
}

/// Every target's `expr` of every panel (rows' nested panels included).
fn panel_queries(dashboard: &str, panels: &[serde_json::Value], out: &mut Vec<PanelQuery>) {
    for p in panels {
        if let Some(nested) = p["panels"].as_array() {
            panel_queries(dashboard, nested, out);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push(PanelQuery {
                    dashboard: dashboard.to_owned(),
                    panel: p["title"].as_str().unwrap_or("(untitled)").to_owned(),
                    ref_id: t["refId"].as_str().unwrap_or("?").to_owned(),
                    expr: expr.to_owned(),
                });
            }
        }
    }
}

/// `expr` with the dashboard's variables and Grafana's interval variables replaced; panics
/// naming any variable left over.
fn substitute(q: &PanelQuery, vars: &[(String, String)]) -> String {
    let mut e = q.expr.clone();
    let mut all: Vec<(String, String)> = vars.to_vec();
    all.push(("__rate_interval".into(), RATE_INTERVAL.into()));
    all.push(("__interval".into(), "1m".into()));
    all.push(("__range".into(), RANGE.into()));
    // Longest names first, so `$node` never eats part of `$nodes`.
    all.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    for (name, value) in &all {
        e = e.replace(&format!("${{{name}}}"), value);
        e = e.replace(&format!("${name}"), value);
    }
    assert!(
        !e.contains('$'),
        "{} / {} ({}): a variable the test does not know is left in {e:?}",
        q.dashboard,
        q.panel,
        q.ref_id
    );
    e
}

#[test]
fn every_dashboard_query_answers_from_a_live_agent_after_real_traffic() {
    require_root("the dashboard test");
    let prometheus = prometheus_binary();
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-grafana-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let tmp = std::env::temp_dir().join(format!("npm-grafana-{pid}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("mkdir");
    let _tmp = RemoveOnDrop(tmp.clone());
    let manifests = tmp.join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("pods.yaml"), PODS).expect("write pods");
    std::fs::write(manifests.join("policies.yaml"), POLICIES).expect("write policies");

    let lab = Lab::build(LabSpec {
        pods: vec![
            pod("web", "web", "10.248.0.2"),
            pod("client", "client", "10.248.0.3"),
            pod("intruder", "intruder", "10.248.0.4"),
        ],
        externals: vec![],
    })
    .expect("lab");
    let node = lab.node();
    let agent_log = tmp.join("agent.log");
    let mut agent = Command::new("nsenter");
    agent
        .arg(format!("--net={}", node.path().display()))
        .arg(env!("CARGO_BIN_EXE_npm-agent"))
        .args(["run", "--poll-interval-ms", "200", "--manifests"])
        .arg(&manifests)
        .args(["--listen-address", "127.0.0.1", "--bpffs-dir"])
        .arg(&bpffs)
        .args(["--max-conntrack-entries", "4096"])
        .env_remove("NPM_CONFIG")
        .env_remove("NPM_LISTEN_PORT")
        .env_remove("NPM_LISTEN_ADDRESS")
        .env_remove("NPM_ENABLE_PROMETHEUS_METRICS")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).expect("log file"));
    let _agent = KillOnDrop(agent.spawn().expect("spawn npm-agent"));
    eventually_some(30, || {
        matches!(http_get(node, AGENT_PORT, "/readyz"), Ok((200, _))).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "agent not ready within 30 s; its log:\n{}",
            log_tail(&agent_log)
        )
    });

    // Prometheus in the lab's node namespace, scraping the agent every second.
    let node_name = format!("lab-node-{pid}");
    let (config_text, node_label) =
        derived_prometheus_config(&format!("127.0.0.1:{AGENT_PORT}"), &node_name);
    let config = tmp.join("prometheus.yml");
    std::fs::write(&config, &config_text).expect("write");
    let prom_log = tmp.join("prometheus.log");
    let child = Command::new("nsenter")
        .arg(format!("--net={}", node.path().display()))
        .arg(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            tmp.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{PROM_PORT}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&prom_log).expect("log file"))
        .spawn()
        .expect("spawn prometheus");
    // Killed by its pid on every way out; its data dir goes with `tmp`.
    let _prometheus = KillOnDrop(child);
    let up = wait_for(node, 60, "count(up == 1)", |v| v >= 2.0);
    assert!(
        up.is_some(),
        "Prometheus did not scrape both jobs within 60 s; targets: {:?}\nconfig:\n{config_text}\nits log:\n{}",
        http_get(node, PROM_PORT, "/api/v1/targets"),
        log_tail(&prom_log)
    );

    // Real traffic while Prometheus scrapes: denied and allowed connections to web.
    let allowed = |from: &str| lab.probe(from, "default/web", 80, Protocol::Tcp).allowed;
    for _ in 0..3 {
        assert!(!allowed("default/intruder"), "intruder is denied");
    }
    assert!(allowed("default/client"), "client is allowed");
    // A cluster event while Prometheus scrapes: a new policy.
    std::fs::write(manifests.join("added.yaml"), ADDED_POLICY).expect("write policy");
    assert!(allowed("default/client"), "client still reaches web");

    // Wait until what the dashboards show has reached Prometheus.
    let web_drops = format!(
        "npm_pod_packets_total{{namespace=\"default\",pod=\"web\",direction=\"ingress\",\
         verdict=\"drop\",reason=\"policy_deny\",{node_label}=\"{node_name}\"}}"
    );
    let drops = wait_for(node, 60, &web_drops, |v| v >= 3.0);
    assert!(
        drops.is_some(),
        "web's per-pod policy drops did not reach 3 in Prometheus within 60 s: {:?}",
        query(node, &web_drops)
    );
    let web_allows = "npm_pod_packets_total{pod=\"web\",direction=\"ingress\",verdict=\"allow\",\
                      reason=\"policy_allow\"}";
    assert!(
        wait_for(node, 30, web_allows, |v| v >= 1.0).is_some(),
        "web's allowed connection is not counted: {:?}",
        query(node, web_allows)
    );
    assert!(
        wait_for(node, 30, "max(npm_num_policies)", |v| v == 2.0).is_some(),
        "the added policy is not counted"
    );
    let event_rate = format!("increase(npm_event_to_maps_seconds_count[{RATE_INTERVAL}])");
    assert!(
        wait_for(node, 60, &event_rate, |v| v > 0.0).is_some(),
        "the added policy's event never showed in npm_event_to_maps_seconds: {:?}",
        query(node, &event_rate)
    );
    // A few more scrapes, so every rate window holds samples after the changes.
    std::thread::sleep(std::time::Duration::from_secs(3));

    // What the new series say about this node, as Prometheus has them.
    let one = |q: &str| -> f64 {
        let r = query(node, q).unwrap_or_else(|e| panic!("{q}: {e}"));
        let v = values(&r);
        assert_eq!(v.len(), 1, "{q}: {r:?}");
        v[0]
    };
    let capacity = |map: &str| one(&format!("npm_map_capacity{{map=\"{map}\"}}"));
    assert_eq!(capacity("conntrack_ipv4"), 4096.0, "the flag's size");
    assert_eq!(
        capacity("policy"),
        f64::from(npm_common::maps::POLICY_MAX),
        "POLICY's definition"
    );
    assert_eq!(capacity("frags"), f64::from(npm_common::maps::FRAGS_MAX));
    assert_eq!(one("npm_map_entries{map=\"endpoints\"}"), 3.0);
    assert!(one("npm_map_entries{map=\"conntrack_ipv4\"}") >= 0.0);
    assert_eq!(
        one("npm_map_entries{map=\"deferred\"}"),
        0.0,
        "no Service ranges"
    );
    assert_eq!(
        one("npm_policy_isolated_pods{namespace=\"default\",policy=\"web-from-client\"}"),
        1.0,
        "web"
    );
    assert_eq!(
        one("npm_policy_isolated_pods{namespace=\"default\",policy=\"client-open\"}"),
        1.0,
        "client"
    );
    assert!(one("npm_policy_entries{policy=\"web-from-client\"}") >= 1.0);
    assert_eq!(
        one("npm_add_policy_exec_time_count"),
        2.0,
        "one observation per policy added (at start, then the added one)"
    );
    assert_eq!(one("npm_ready"), 1.0);
    // The intruder's own slot saw its denied SYNs leave (egress allowed: not isolated).
    assert!(
        one(
            "npm_pod_packets_total{pod=\"intruder\",direction=\"egress\",verdict=\"allow\",\
             reason=\"not_isolated\"}"
        ) >= 3.0
    );

    // Every dashboard, every query.
    let mut dashboards: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("grafana"))
        .expect("deploy/grafana")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    dashboards.sort();
    assert!(!dashboards.is_empty(), "no dashboard in deploy/grafana");
    let mut failures = Vec::new();
    let mut checked = 0;
    for path in &dashboards {
        let file = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("read dashboard"))
                .unwrap_or_else(|e| panic!("{file}: not JSON: {e}"));
        let title = format!("{file} ({})", d["title"].as_str().unwrap_or("untitled"));
        // Template variables: the datasource is Grafana's; each query variable must list
        // values (the lab node for `node`), the first of which stands in for it.
        let mut vars = Vec::new();
        let mut has_datasource = false;
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().expect("variable name").to_owned();
            match v["type"].as_str() {
                Some("datasource") => {
                    assert_eq!(v["query"], "prometheus", "{title}: ${name}");
                    has_datasource = true;
                }
                Some("query") => {
                    let def = v["query"]["query"]
                        .as_str()
                        .or_else(|| v["query"].as_str())
                        .expect("a query variable's query");
                    let inner = def
                        .strip_prefix("label_values(")
                        .and_then(|r| r.strip_suffix(')'))
                        .unwrap_or_else(|| panic!("{title}: ${name}: only label_values(metric, label) is checked here, not {def:?}"));
                    let (metric, label) = inner
                        .split_once(',')
                        .map(|(m, l)| (m.trim(), l.trim()))
                        .expect("label_values(metric, label)");
                    let (status, body) = http_get(
                        node,
                        PROM_PORT,
                        &format!(
                            "/api/v1/label/{label}/values?match[]={}",
                            url_encode(metric)
                        ),
                    )
                    .expect("label values");
                    let got: serde_json::Value = serde_json::from_str(&body).expect("JSON");
                    assert_eq!(status, 200, "{title}: ${name}: {body}");
                    let list: Vec<&str> = got["data"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|x| x.as_str())
                        .collect();
                    assert!(
                        !list.is_empty(),
                        "{title}: variable ${name} ({def}) lists no value"
                    );
                    if label == node_label {
                        assert!(
                            list.contains(&node_name.as_str()),
                            "{title}: ${name}: {list:?}"
                        );
                    }
                    assert!(
                        v["includeAll"] == true || !v["multi"].as_bool().unwrap_or(false),
                        "{title}: ${name}"
                    );
                    let value = if label == node_label {
                        node_name.clone()
                    } else {
                        list[0].to_owned()
                    };
                    vars.push((name, value));
                }
                other => panic!("{title}: variable ${name} of type {other:?} is not checked here"),
            }
        }
        assert!(has_datasource, "{title}: no Prometheus datasource variable");
        let mut queries = Vec::new();
        panel_queries(
            &title,
            d["panels"].as_array().expect("panels"),
            &mut queries,
        );
        assert!(!queries.is_empty(), "{title}: no queries");
        for q in &queries {
            let expr = substitute(q, &vars);
            checked += 1;
            let fail = |why: String| {
                format!(
                    "{} / panel {:?} ({}): {why}\n    {expr}",
                    q.dashboard, q.panel, q.ref_id
                )
            };
            match query(node, &expr) {
                Err(e) => failures.push(fail(format!("the query fails: {e}"))),
                Ok(r) if r.is_empty() => failures.push(fail("empty result".into())),
                Ok(r) => {
                    let vs = values(&r);
                    if vs.iter().any(|v| v.is_nan()) {
                        failures.push(fail(format!("NaN in the result: {r:?}")));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} dashboard queries failed:\n{}\nagent log:\n{}",
        failures.len(),
        failures.join("\n"),
        log_tail(&agent_log)
    );
    eprintln!(
        "{checked} dashboard queries answered from {} dashboards",
        dashboards.len()
    );
}
