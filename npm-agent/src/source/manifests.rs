//! The standalone source: a directory of Kubernetes YAML.
//!
//! Every `*.yaml`/`*.yml` file below the directory is read, in sorted path order; other files
//! are ignored. Files may hold several documents and `kind: List`. Namespaces, Pods and
//! NetworkPolicies (`networking.k8s.io/v1`, and the older `extensions/v1beta1`, which has the
//! same schema) are used; Services are collected for the lab's kube-proxy emulation
//! ([`Loader::services`]; the agent ignores them); other kinds (Deployments, ...) are ignored
//! silently. A malformed object is reported with its file, kind/namespace/name and reason, and
//! skipped.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use serde::Deserialize;
use serde_yaml::Value;

use crate::k8s::convert;
use crate::model::{Diagnostic, ObjRef};
use crate::state::ClusterSnapshot;

#[derive(Debug, thiserror::Error)]
pub enum ManifestsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ManifestsError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestsError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in entries {
        let e = e.map_err(|source| ManifestsError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = e.path();
        // Hidden entries are skipped: a mounted ConfigMap's `..data` / `..<timestamp>` copies
        // (which would load every object twice), `.git`, editor files.
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            yaml_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|x| x.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

fn text<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

/// Reads the directory into a snapshot (without node-local facts) and the problems found.
/// Only an unreadable directory or file is an error.
pub fn load_dir(dir: &Path) -> Result<(ClusterSnapshot, Vec<Diagnostic>), ManifestsError> {
    Ok(read_dir_into(dir, Loader::default())?.finish())
}

/// Adds every YAML file below `dir` to `loader`.
pub fn read_dir_into(dir: &Path, mut loader: Loader) -> Result<Loader, ManifestsError> {
    let mut files = Vec::new();
    yaml_files(dir, &mut files)?;
    files.sort();
    for f in &files {
        let content = std::fs::read_to_string(f).map_err(|source| ManifestsError::Read {
            path: f.clone(),
            source,
        })?;
        loader.add_text(&f.display().to_string(), &content);
    }
    Ok(loader)
}

/// Accumulates objects from YAML texts.
#[derive(Default)]
pub struct Loader {
    snapshot: ClusterSnapshot,
    services: BTreeMap<crate::model::ObjRef, crate::model::Service>,
    diagnostics: Vec<Diagnostic>,
    seen: BTreeMap<String, String>,
}

impl Loader {
    /// Adds every document of one YAML text; `source` names it in diagnostics.
    pub fn add_text(&mut self, source: &str, content: &str) {
        for (i, doc) in serde_yaml::Deserializer::from_str(content).enumerate() {
            match Value::deserialize(doc) {
                Ok(Value::Null) => {}
                Ok(v) => self.add_value(source, i + 1, v),
                Err(e) => {
                    self.problem(
                        source,
                        format!("document {}", i + 1),
                        format!("not valid YAML: {e}"),
                    );
                    // The YAML stream cannot be resynchronised after a syntax error.
                    break;
                }
            }
        }
    }

    fn problem(&mut self, source: &str, object: String, message: String) {
        self.diagnostics.push(Diagnostic {
            source: Some(source.to_string()),
            object,
            message,
        });
    }

    fn add_value(&mut self, source: &str, doc: usize, mut v: Value) {
        let kind = text(&v, &["kind"]).unwrap_or("").to_string();
        let api = text(&v, &["apiVersion"]).unwrap_or("").to_string();
        let name = text(&v, &["metadata", "name"]).map(str::to_string);
        let ns = text(&v, &["metadata", "namespace"])
            .unwrap_or("default")
            .to_string();
        let object = match (&name, kind.as_str()) {
            (Some(n), "Namespace") => format!("Namespace {n}"),
            (Some(n), k) => format!("{k} {ns}/{n}"),
            (None, k) if !k.is_empty() => format!("{k} (document {doc}, no name)"),
            _ => format!("document {doc}"),
        };
        match (api.as_str(), kind.as_str()) {
            (_, "List") => {
                let items = v
                    .get("items")
                    .and_then(Value::as_sequence)
                    .cloned()
                    .unwrap_or_default();
                for item in items {
                    self.add_value(source, doc, item);
                }
            }
            ("v1", "Namespace") => match serde_yaml::from_value::<core::Namespace>(v) {
                Ok(o) => match convert::namespace(&o) {
                    Ok(n) => {
                        self.note_duplicate(source, &object);
                        self.snapshot.namespaces.insert(n.name.clone(), n);
                    }
                    Err(e) => self.problem(source, object, e.to_string()),
                },
                Err(e) => self.problem(source, object, format!("not a valid Namespace: {e}")),
            },
            ("v1", "Pod") => match serde_yaml::from_value::<core::Pod>(v) {
                Ok(o) => match convert::pod(&o) {
                    Ok((p, problems)) => {
                        for e in problems {
                            self.problem(source, object.clone(), e.to_string());
                        }
                        self.note_duplicate(source, &object);
                        self.snapshot.pods.insert(p.obj_ref(), p);
                    }
                    Err(e) => self.problem(source, object, e.to_string()),
                },
                Err(e) => self.problem(source, object, format!("not a valid Pod: {e}")),
            },
            ("networking.k8s.io/v1" | "extensions/v1beta1", "NetworkPolicy") => {
                if let Some(m) = v.as_mapping_mut() {
                    m.insert("apiVersion".into(), "networking.k8s.io/v1".into());
                }
                match serde_yaml::from_value::<net::NetworkPolicy>(v) {
                    Ok(o) => {
                        let (policy, problems) = convert::policy(&o);
                        for e in problems {
                            self.problem(source, object.clone(), e.to_string());
                        }
                        match policy {
                            Some(p) => {
                                self.note_duplicate(source, &object);
                                self.snapshot.policies.insert(p.obj_ref(), p);
                            }
                            None => self.problem(
                                source,
                                object,
                                "policy skipped: it has no name".into(),
                            ),
                        }
                    }
                    Err(e) => {
                        self.problem(source, object, format!("not a valid NetworkPolicy: {e}"))
                    }
                }
            }
            ("v1", "Service") => match serde_yaml::from_value::<core::Service>(v) {
                Ok(o) => match convert::service(&o) {
                    Ok(s) => {
                        self.note_duplicate(source, &object);
                        self.services.insert(s.obj_ref(), s);
                    }
                    Err(e) => self.problem(source, object, e.to_string()),
                },
                Err(e) => self.problem(source, object, format!("not a valid Service: {e}")),
            },
            (_, "") => self.problem(source, object, "no kind".into()),
            _ => {} // Deployments, ...: not ours.
        }
    }

    fn note_duplicate(&mut self, source: &str, object: &str) {
        if let Some(first) = self.seen.insert(object.to_string(), source.to_string()) {
            self.problem(
                source,
                object.to_string(),
                format!("defined again (first in {first}); the later one is used"),
            );
        }
    }

    /// The Services read so far (for the lab; not part of the snapshot).
    pub fn services(&self) -> Vec<crate::model::Service> {
        self.services.values().cloned().collect()
    }

    /// The snapshot, with implicit namespaces for names used but not declared.
    pub fn finish(self) -> (ClusterSnapshot, Vec<Diagnostic>) {
        let (mut snapshot, diagnostics) = self.finish_raw();
        add_implicit_namespaces(&mut snapshot);
        (snapshot, diagnostics)
    }

    /// Only the objects the texts declared (no implicit namespaces): for applying on top of
    /// an existing state.
    pub fn finish_raw(self) -> (ClusterSnapshot, Vec<Diagnostic>) {
        (self.snapshot, self.diagnostics)
    }
}

/// Adds a Namespace (with only the `kubernetes.io/metadata.name` label) for every namespace
/// a pod or policy uses that no Namespace object declares.
pub fn add_implicit_namespaces(snapshot: &mut ClusterSnapshot) {
    let used: Vec<String> = snapshot
        .pods
        .keys()
        .chain(snapshot.policies.keys())
        .map(|o: &ObjRef| o.namespace.clone())
        .collect();
    for ns in used {
        snapshot
            .namespaces
            .entry(ns.clone())
            .or_insert_with(|| convert::implicit_namespace(&ns));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Peer, PortRef, Protocol, Selector};

    fn load(text: &str) -> (ClusterSnapshot, Vec<Diagnostic>) {
        let mut l = Loader::default();
        l.add_text("test.yaml", text);
        l.finish()
    }

    #[test]
    fn a_bad_document_is_reported_and_the_rest_loads() {
        let (s, d) = load(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: good1, labels: {app: a}}
spec: {containers: [{name: c, image: x, ports: [{containerPort: 80, name: http}]}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: bad, namespace: prod}
spec: {containers: [{name: c, image: x, ports: [{containerPort: 99999}]}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: prod, labels: {team: red}}
"#,
        );
        // The bad pod is kept without the port it cannot read.
        assert_eq!(s.pods.len(), 2);
        assert!(s.pods[&ObjRef::new("prod", "bad")].ports.is_empty());
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].object, "Pod prod/bad");
        assert_eq!(d[0].source.as_deref(), Some("test.yaml"));
        assert!(d[0].message.contains("99999"), "{}", d[0].message);
        assert_eq!(s.namespaces["prod"].labels["team"], "red");
        assert_eq!(
            s.namespaces["prod"].labels[convert::NAMESPACE_NAME_LABEL],
            "prod"
        );
        assert_eq!(
            s.namespaces["default"].labels[convert::NAMESPACE_NAME_LABEL],
            "default",
            "implicit"
        );
        let p = &s.pods[&ObjRef::new("default", "good1")];
        assert_eq!(
            p.ips,
            vec!["10.0.0.1".parse::<std::net::IpAddr>().expect("ip")]
        );
        assert_eq!(p.ports[0].name.as_deref(), Some("http"));
    }

    #[test]
    fn policy_types_are_inferred_and_null_pod_selector_selects_all() {
        let (s, d) = load(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p1}
spec:
  podSelector:
  egress: [{}]
---
apiVersion: extensions/v1beta1
kind: NetworkPolicy
metadata: {name: p2}
spec:
  podSelector: {}
  policyTypes: [Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p3}
spec:
  podSelector: {}
  policyTypes: []
  egress: [{}]
"#,
        );
        assert!(d.is_empty(), "{d:?}");
        let p1 = &s.policies[&ObjRef::new("default", "p1")];
        assert!(p1.pod_selector.match_labels.is_empty());
        assert_eq!(
            p1.ingress.as_ref().map(Vec::len),
            Some(0),
            "Ingress always inferred"
        );
        assert_eq!(
            p1.egress.as_ref().map(Vec::len),
            Some(1),
            "Egress inferred from spec.egress"
        );
        let p2 = &s.policies[&ObjRef::new("default", "p2")];
        assert!(p2.ingress.is_none());
        assert_eq!(p2.egress, Some(vec![]));
        // An empty policyTypes list is defaulted like an absent one (it used to isolate
        // nothing at all).
        let p3 = &s.policies[&ObjRef::new("default", "p3")];
        assert_eq!(p3.ingress.as_ref().map(Vec::len), Some(0));
        assert_eq!(p3.egress.as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn a_broken_rule_is_dropped_but_the_policy_still_isolates() {
        let (s, d) = load(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.300/8}}]
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: http}, {port: 5432, endPort: 5440, protocol: UDP}, {protocol: SCTP}]
"#,
        );
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].message
                .contains("spec.ingress[0].from[0].ipBlock.cidr"),
            "{}",
            d[0].message
        );
        assert!(d[0].message.contains("dropped"));
        let p = &s.policies[&ObjRef::new("x", "p")];
        let rules = p.ingress.as_ref().expect("ingress isolated");
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].ports[0].port, Some(PortRef::Name("http".into())));
        assert_eq!(
            rules[0].ports[0].protocol,
            Protocol::Tcp,
            "protocol defaults to TCP"
        );
        assert_eq!(rules[0].ports[1].end_port, Some(5440));
        assert_eq!(rules[0].ports[2].port, None);
    }

    #[test]
    fn invalid_selectors_and_peers_are_explained() {
        let (s, d) = load(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: badsel}
spec:
  podSelector: {matchExpressions: [{key: app, operator: Near, values: [x]}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: badtype}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress, Sideways]
  ingress: [{}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: badpeer}
spec:
  podSelector: {}
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}]
  - to: [{ipBlock: {cidr: "fd00::/64", except: ["fd00::/80"]}}]
  - to: [{}]
"#,
        );
        // Unreadable selector: kept, failing closed for the whole namespace, both ways.
        let bad = &s.policies[&ObjRef::new("default", "badsel")];
        assert_eq!(bad.pod_selector, Selector::default());
        assert_eq!(bad.ingress.as_deref(), Some(&[][..]));
        assert_eq!(bad.egress.as_deref(), Some(&[][..]));
        assert!(
            d.iter().any(|x| x.object == "NetworkPolicy default/badsel"
                && x.message.contains("Near")
                && x.message
                    .contains("every pod of namespace default is isolated both ways")),
            "{d:?}"
        );
        assert!(
            d.iter().any(|x| x.message.contains("not inside cidr")),
            "{d:?}"
        );
        assert!(
            d.iter().any(|x| x.message.contains("needs podSelector")),
            "{d:?}"
        );
        // Unreadable policyTypes: its own pods, isolated both ways, its rules not read.
        let bad = &s.policies[&ObjRef::new("default", "badtype")];
        assert_eq!(
            bad.pod_selector.match_labels.get("app").map(String::as_str),
            Some("db")
        );
        assert_eq!(bad.ingress.as_deref(), Some(&[][..]));
        assert_eq!(bad.egress.as_deref(), Some(&[][..]));
        assert!(
            d.iter().any(|x| x.object == "NetworkPolicy default/badtype"
                && x.message.contains("Sideways")
                && x.message.contains("isolated both ways")),
            "{d:?}"
        );
        let p = &s.policies[&ObjRef::new("default", "badpeer")];
        let rules = p.egress.as_ref().expect("egress");
        assert_eq!(rules.len(), 1);
        assert!(matches!(&rules[0].peers[0], Peer::IpBlock { except, .. } if except.len() == 1));
    }

    #[test]
    fn terminating_host_network_and_dual_stack_pods() {
        let (s, d) = load(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: done}
spec: {containers: [{name: c, image: x}]}
status: {phase: Succeeded, podIP: 10.0.0.9}
---
apiVersion: v1
kind: Pod
metadata: {name: going, deletionTimestamp: "2026-01-01T00:00:00Z"}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.8}
---
apiVersion: v1
kind: Pod
metadata: {name: host}
spec: {hostNetwork: true, nodeName: n1, containers: [{name: c, image: x}]}
status: {podIP: 192.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: dual}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.7, podIPs: [{ip: 10.0.0.7}, {ip: "fd00::7"}]}
"#,
        );
        assert!(d.is_empty(), "{d:?}");
        let get = |n: &str| &s.pods[&ObjRef::new("default", n)];
        assert!(get("done").finished && !get("done").terminating && !get("done").is_endpoint());
        // Being deleted, it runs until its grace period ends: still an endpoint.
        assert!(get("going").terminating && !get("going").finished && get("going").is_endpoint());
        assert!(get("host").host_network && !get("host").is_endpoint());
        assert_eq!(get("host").node_name.as_deref(), Some("n1"));
        assert_eq!(get("dual").ips.len(), 2);
        assert!(get("dual").is_endpoint());
    }

    #[test]
    fn load_dir_reads_yaml_files_only_and_reports_unreadable_dirs() {
        let dir = std::env::temp_dir().join(format!("npm-manifests-test-{}", std::process::id()));
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _rm = Rm(dir.clone());
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(
            dir.join("sub/a.yml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        )
        .expect("write");
        std::fs::write(dir.join("expect"), "allow * -> * *\n").expect("write");
        std::fs::create_dir_all(dir.join("..data")).expect("mkdir");
        std::fs::write(
            dir.join("..data/a.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: hidden}\n",
        )
        .expect("write");
        std::fs::write(
            dir.join("b.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n---\n: : :\n",
        )
        .expect("write");
        let (s, d) = load_dir(&dir).expect("loads");
        assert!(s.namespaces.contains_key("a") && s.namespaces.contains_key("b"));
        assert!(
            !s.namespaces.contains_key("hidden"),
            "hidden directories are not read"
        );
        assert_eq!(d.len(), 1);
        assert!(d[0].message.contains("not valid YAML"));
        assert!(
            d[0].source
                .as_deref()
                .is_some_and(|p| p.ends_with("b.yaml"))
        );
        let err = load_dir(&dir.join("missing")).expect_err("missing dir");
        assert!(err.to_string().contains("missing"));
    }
}
