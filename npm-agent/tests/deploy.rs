//! The manifests under deploy/: every object deserializes strictly into its Kubernetes type (an
//! unknown or misspelled field fails with its path), kustomization.yaml lists exactly the
//! manifests, and the RBAC, DaemonSet, Service and Prometheus scrape config say what the agent
//! needs and nothing more. Unprivileged; reads files only.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

const NAMESPACE: &str = "kube-system";
const PORT: i32 = 10091;
/// The DaemonSet's added capabilities: exactly these (see the comments in daemonset.yaml;
/// tests/daemonset_run.rs runs the agent with them and shows that each is needed).
const CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// deploy/*.yaml (not subdirectories), sorted by file name.
fn yaml_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("read deploy/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    files
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned()
}

/// Every non-empty document of a (multi-document) YAML file, as JSON.
fn documents(path: &Path) -> Vec<Json> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, doc)| {
            let yaml = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} document {i}: {e}", path.display()));
            serde_json::to_value(&yaml)
                .unwrap_or_else(|e| panic!("{} document {i}: not JSON-shaped: {e}", path.display()))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

/// Drops nulls and objects left empty by that, so that `field: null` / `field: {}` in the
/// input and an omitted field after the round trip compare equal.
fn normalise(v: &Json) -> Option<Json> {
    match v {
        Json::Null => None,
        Json::Object(map) => {
            let map: serde_json::Map<String, Json> = map
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), normalise(v)?)))
                .collect();
            (!map.is_empty()).then_some(Json::Object(map))
        }
        Json::Array(items) => Some(Json::Array(
            items
                .iter()
                .map(|v| normalise(v).unwrap_or(Json::Null))
                .collect(),
        )),
        other => Some(other.clone()),
    }
}

/// The first place where `input` and `round_tripped` differ, as a path and a description.
fn first_difference(path: &str, input: &Json, round_tripped: &Json) -> Option<String> {
    match (input, round_tripped) {
        (Json::Object(a), Json::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    None => {
                        return Some(format!("{p}: unknown field (dropped by the typed object)"));
                    }
                    Some(vb) => {
                        if let Some(d) = first_difference(&p, va, vb) {
                            return Some(d);
                        }
                    }
                }
            }
            b.keys()
                .find(|k| !a.contains_key(*k))
                .map(|k| format!("{path}.{k}: added by the typed object"))
        }
        (Json::Array(a), Json::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (va, vb))| first_difference(&format!("{path}[{i}]"), va, vb)),
        (a, b) if a == b => None,
        (a, b) => Some(format!("{path}: {a} became {b}")),
    }
}

/// Deserializes `doc` into `T` and fails unless serializing it back gives the same JSON: the
/// k8s-openapi types ignore unknown fields, so this is what makes the check strict.
fn strict<T: DeserializeOwned + Serialize>(doc: &Json, origin: &str) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| format!("{origin}: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("{origin}: serialize: {e}"))?;
    let (input, back) = (
        normalise(doc).unwrap_or(Json::Null),
        normalise(&back).unwrap_or(Json::Null),
    );
    match first_difference("", &input, &back) {
        None => Ok(typed),
        Some(d) => Err(format!("{origin}: {d}")),
    }
}

/// Every object in deploy/*.yaml except kustomization.yaml, typed.
#[derive(Default)]
struct Objects {
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    services: Vec<Service>,
}

fn load() -> Objects {
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    for path in yaml_files() {
        if file_name(&path) == "kustomization.yaml" {
            continue;
        }
        for (i, doc) in documents(&path).iter().enumerate() {
            let origin = format!("{} document {i}", file_name(&path));
            let kind = doc
                .get("kind")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string();
            let result = match kind.as_str() {
                "ServiceAccount" => strict(doc, &origin).map(|o| objects.service_accounts.push(o)),
                "ClusterRole" => strict(doc, &origin).map(|o| objects.cluster_roles.push(o)),
                "ClusterRoleBinding" => {
                    strict(doc, &origin).map(|o| objects.cluster_role_bindings.push(o))
                }
                "ConfigMap" => strict(doc, &origin).map(|o| objects.config_maps.push(o)),
                "DaemonSet" => strict(doc, &origin).map(|o| objects.daemon_sets.push(o)),
                "Service" => strict(doc, &origin).map(|o| objects.services.push(o)),
                other => Err(format!("{origin}: unexpected kind {other:?}")),
            };
            if let Err(e) = result {
                errors.push(e);
            }
        }
    }
    assert!(
        errors.is_empty(),
        "manifests do not match their Kubernetes types:\n{}",
        errors.join("\n")
    );
    objects
}

fn one<'a, T>(items: &'a [T], what: &str) -> &'a T {
    assert_eq!(items.len(), 1, "expected exactly one {what}");
    &items[0]
}

#[test]
fn every_manifest_is_a_strictly_valid_kubernetes_object() {
    let objects = load();
    let namespaced = objects
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(objects.config_maps.iter().map(|o| &o.metadata))
        .chain(objects.daemon_sets.iter().map(|o| &o.metadata))
        .chain(objects.services.iter().map(|o| &o.metadata));
    for meta in namespaced {
        assert_eq!(
            meta.namespace.as_deref(),
            Some(NAMESPACE),
            "{:?} namespace",
            meta.name
        );
    }
    one(&objects.service_accounts, "ServiceAccount");
    one(&objects.cluster_roles, "ClusterRole");
    one(&objects.cluster_role_bindings, "ClusterRoleBinding");
    one(&objects.config_maps, "ConfigMap");
    one(&objects.daemon_sets, "DaemonSet");
    one(&objects.services, "Service");
}

#[test]
fn the_strict_check_catches_misspelled_and_unknown_fields() {
    let path = deploy_dir().join("daemonset.yaml");
    let doc = documents(&path).remove(0);
    strict::<DaemonSet>(&doc, "daemonset.yaml").expect("the real file passes");

    let mut misspelled = doc.clone();
    let pod_spec = misspelled["spec"]["template"]["spec"]
        .as_object_mut()
        .expect("pod spec");
    let host_network = pod_spec.remove("hostNetwork").expect("hostNetwork");
    pod_spec.insert("hostNetwrok".into(), host_network);
    let err = strict::<DaemonSet>(&misspelled, "misspelled").expect_err("misspelled field");
    assert!(err.contains(".spec.template.spec.hostNetwrok"), "{err}");

    let mut unknown = doc;
    unknown["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["ad"] =
        serde_json::json!(["SYS_ADMIN"]);
    let err = strict::<DaemonSet>(&unknown, "unknown").expect_err("unknown field");
    assert!(
        err.contains(".spec.template.spec.containers[0].securityContext.capabilities.ad"),
        "{err}"
    );
}

#[test]
fn kustomization_lists_exactly_the_manifests() {
    let path = deploy_dir().join("kustomization.yaml");
    let docs = documents(&path);
    assert_eq!(docs.len(), 1, "kustomization.yaml: one document");
    let k = &docs[0];
    assert_eq!(k["kind"], "Kustomization");
    assert_eq!(k["namespace"], NAMESPACE);
    let listed: Vec<&str> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("resource is a string"))
        .collect();
    let listed_set: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(
        listed_set.len(),
        listed.len(),
        "duplicates in resources: {listed:?}"
    );
    for r in &listed {
        assert!(
            deploy_dir().join(r).is_file(),
            "kustomization.yaml lists {r}, which does not exist"
        );
    }
    let files: BTreeSet<String> = yaml_files()
        .iter()
        .map(|p| file_name(p))
        .filter(|f| f != "kustomization.yaml")
        .collect();
    let listed_owned: BTreeSet<String> = listed.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        listed_owned, files,
        "kustomization.yaml resources vs deploy/*.yaml"
    );
}

#[test]
fn rbac_grants_list_and_watch_on_pods_namespaces_and_networkpolicies_only() {
    let objects = load();
    let role = one(&objects.cluster_roles, "ClusterRole");
    let mut granted: BTreeSet<(String, String, String)> = BTreeSet::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert!(rule.resource_names.is_none(), "resourceNames: {rule:?}");
        assert!(
            rule.non_resource_urls.is_none(),
            "nonResourceURLs: {rule:?}"
        );
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "pods"),
        ("", "namespaces"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        // The verbs the watchers use; tests/daemonset_run.rs checks them against the requests
        // the real client sends.
        for verb in ["list", "watch"] {
            expected.insert((group.to_string(), resource.to_string(), verb.to_string()));
        }
    }
    assert_eq!(granted, expected, "ClusterRole grants");
    assert!(role.aggregation_rule.is_none());

    let sa = one(&objects.service_accounts, "ServiceAccount");
    let binding = one(&objects.cluster_role_bindings, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn daemonset_is_unprivileged_with_the_chosen_capabilities_everywhere() {
    let objects = load();
    let ds = one(&objects.daemon_sets, "DaemonSet");
    assert_eq!(ds.metadata.name.as_deref(), Some("npm-agent"));
    let spec = ds.spec.as_ref().expect("spec");
    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.as_ref()),
        Some(&IntOrString::Int(1))
    );
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in spec.selector.match_labels.as_ref().expect("matchLabels") {
        assert_eq!(
            template_labels.get(k),
            Some(v),
            "selector {k}={v} must match the template"
        );
    }

    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("npm-agent"));
    assert_eq!(
        pod.node_selector.clone().unwrap_or_default(),
        BTreeMap::from([("kubernetes.io/os".to_string(), "linux".to_string())])
    );
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()
                && t.toleration_seconds.is_none()),
        "must tolerate every taint: {tolerations:?}"
    );
    assert!(pod.init_containers.is_none(), "no init containers");
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("npm-agent:latest"));
    assert_eq!(
        c.command.clone().unwrap_or_default(),
        ["/usr/local/bin/npm-agent"],
        "the path the Dockerfile installs the binary at"
    );
    assert_eq!(
        c.args.clone().unwrap_or_default(),
        ["run", "--config", "/etc/npm/azure-npm.json"]
    );

    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "must not be privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.clone().unwrap_or_default(), ["ALL"]);
    let added: BTreeSet<&str> = caps
        .add
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(added, BTreeSet::from(CAPABILITIES), "added capabilities");
    assert_eq!(
        caps.add.as_ref().map(Vec::len),
        Some(CAPABILITIES.len()),
        "duplicate capabilities"
    );
    assert!(
        pod.security_context
            .as_ref()
            .and_then(|p| p.sysctls.as_ref())
            .is_none()
    );

    let env = c.env.as_deref().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME env");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    let ports = c.ports.as_deref().unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|p| p.container_port == PORT && p.name.as_deref() == Some("metrics")),
        "{ports:?}"
    );
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{path} probe"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(PORT), "{path} probe port");
    }
    let resources = c.resources.as_ref().expect("resources");
    let q =
        |m: &Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
         k: &str| { m.as_ref().and_then(|m| m.get(k)).map(|q| q.0.clone()) };
    assert_eq!(q(&resources.requests, "cpu").as_deref(), Some("50m"));
    assert_eq!(q(&resources.requests, "memory").as_deref(), Some("64Mi"));
    assert_eq!(q(&resources.limits, "memory").as_deref(), Some("256Mi"));

    // Volumes: the host's bpffs (no Bidirectional propagation: that needs privileged) and the
    // ConfigMap at /etc/npm; nothing else from the host.
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let host_paths: Vec<&str> = volumes
        .iter()
        .filter_map(|v| v.host_path.as_ref())
        .map(|h| h.path.as_str())
        .collect();
    assert_eq!(host_paths, ["/sys/fs/bpf"]);
    let mounts = c.volume_mounts.as_deref().unwrap_or_default();
    for m in mounts {
        assert_ne!(
            m.mount_propagation.as_deref(),
            Some("Bidirectional"),
            "{m:?}"
        );
        assert!(
            volumes.iter().any(|v| v.name == m.name),
            "mount of undeclared volume {}",
            m.name
        );
    }
    let bpffs = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mount");
    let bpffs_volume = volumes
        .iter()
        .find(|v| v.name == bpffs.name)
        .expect("bpffs volume");
    assert!(bpffs_volume.host_path.is_some());
    let config = mounts
        .iter()
        .find(|m| m.mount_path == "/etc/npm")
        .expect("config mount");
    let config_volume = volumes
        .iter()
        .find(|v| v.name == config.name)
        .expect("config volume");
    assert_eq!(
        config_volume.config_map.as_ref().map(|c| c.name.as_str()),
        Some("npm-agent-config"),
        "/etc/npm is the ConfigMap"
    );
}

#[test]
fn configmap_holds_the_config_in_azure_npm_format() {
    let objects = load();
    let cm = one(&objects.config_maps, "ConfigMap");
    assert_eq!(cm.metadata.name.as_deref(), Some("npm-agent-config"));
    let data = cm.data.as_ref().expect("data");
    assert_eq!(data.keys().collect::<Vec<_>>(), ["azure-npm.json"]);
    let config: Json =
        serde_json::from_str(&data["azure-npm.json"]).expect("azure-npm.json is JSON");
    assert_eq!(
        config,
        serde_json::json!({
            "ResyncPeriodInMinutes": 15,
            "ListeningPort": PORT,
            "ListeningAddress": "0.0.0.0",
            // AKS's default Service range; operators set their cluster's (deploy/README.md).
            "ServiceCIDRs": ["10.0.0.0/16"],
            // Each conntrack map's size, the datapath's default (deploy/README.md).
            "MaxConntrackEntries": npm_common::maps::CONNTRACK_MAX,
            "MaxPolicyEntries": 65536,
            "Toggles": {"EnablePrometheusMetrics": true, "EnableHTTPDebugAPI": true}
        })
    );
}

#[test]
fn service_exposes_the_agents_metrics_port() {
    let objects = load();
    let svc = one(&objects.services, "Service");
    assert_eq!(
        svc.metadata.name.as_deref(),
        Some("npm-metrics-cluster-service")
    );
    let spec = svc.spec.as_ref().expect("spec");
    let ports = spec.ports.as_deref().unwrap_or_default();
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0].port, PORT);
    assert_eq!(ports[0].name.as_deref(), Some("metrics"));
    let ds = one(&objects.daemon_sets, "DaemonSet");
    let labels = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone());
    let labels = labels.unwrap_or_default();
    let selector = spec.selector.as_ref().expect("selector");
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "Service selector {k}={v} must select the agent pods"
        );
    }
    // targetPort names (or numbers) the container's metrics port.
    let c = &ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
        .containers[0];
    let container_ports = c.ports.as_deref().unwrap_or_default();
    let ok = match ports[0].target_port.as_ref() {
        None => container_ports.iter().any(|p| p.container_port == PORT),
        Some(IntOrString::Int(n)) => container_ports.iter().any(|p| p.container_port == *n),
        Some(IntOrString::String(name)) => container_ports
            .iter()
            .any(|p| p.name.as_deref() == Some(name.as_str()) && p.container_port == PORT),
    };
    assert!(
        ok,
        "Service targetPort {:?} vs container ports {container_ports:?}",
        ports[0].target_port
    );
}

#[test]
fn prometheus_scrape_config_has_both_azure_npm_jobs() {
    let path = deploy_dir().join("prometheus/scrape-config.yaml");
    let docs = documents(&path);
    assert_eq!(docs.len(), 1);
    let jobs = docs[0]["scrape_configs"]
        .as_array()
        .expect("scrape_configs");
    let job = |name: &str| -> &Json {
        jobs.iter()
            .find(|j| j["job_name"] == name)
            .unwrap_or_else(|| panic!("job {name}"))
    };
    let node = job("npm-node-metrics");
    assert_eq!(node["metrics_path"], "/node-metrics");
    assert_eq!(node["kubernetes_sd_configs"][0]["role"], "node");
    let relabels = node["relabel_configs"].as_array().expect("relabel_configs");
    assert!(
        relabels.iter().any(|r| r["target_label"] == "__address__" && r["replacement"] == format!("$1:{PORT}")),
        "{relabels:?}"
    );

    let cluster = job("npm-cluster-metrics");
    assert_eq!(cluster["metrics_path"], "/cluster-metrics");
    assert_eq!(cluster["kubernetes_sd_configs"][0]["role"], "service");
    let keeps: BTreeMap<String, String> = cluster["relabel_configs"]
        .as_array()
        .expect("relabel_configs")
        .iter()
        .filter(|r| r["action"] == "keep")
        .map(|r| {
            (
                r["source_labels"][0]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                r["regex"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        keeps.get("__meta_kubernetes_namespace").map(String::as_str),
        Some(NAMESPACE)
    );
    assert_eq!(
        keeps
            .get("__meta_kubernetes_service_name")
            .map(String::as_str),
        Some("npm-metrics-cluster-service")
    );
}
