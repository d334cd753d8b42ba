//! `npm-agent lab --steps DIR`: a sequence of cluster changes, each followed by a probe.
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::expect::Expectation;
use crate::model::{Diagnostic, ObjRef};
use crate::source::manifests::{self, Loader};
use crate::state::ClusterSnapshot;

/// An object a step deletes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delete {
    Namespace(String),
    Pod(ObjRef),
    NetworkPolicy(ObjRef),
}

/// One step: what it applies, what it deletes, what it expects.
#[derive(Clone, Debug)]
pub struct Step {
    pub name: String,
    pub apply: ClusterSnapshot,
    pub delete: Vec<Delete>,
    pub expect: Option<Expectation>,
    pub problems: Vec<Diagnostic>,
}

fn parse_delete(path: &Path, text: &str) -> anyhow::Result<Vec<Delete>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = || {
            format!(
                "{}:{}: expected `Kind namespace/name` or `Namespace name`",
                path.display(),
                i + 1
            )
        };
        let (kind, name) = line.split_once(char::is_whitespace).with_context(err)?;
        let name = name.trim();
        let obj = || -> anyhow::Result<ObjRef> {
            let (ns, n) = name.split_once('/').with_context(err)?;
            Ok(ObjRef::new(ns, n))
        };
        out.push(match kind {
            "Namespace" => Delete::Namespace(name.to_string()),
            "Pod" => Delete::Pod(obj()?),
            "NetworkPolicy" => Delete::NetworkPolicy(obj()?),
            _ => bail!("{}: unknown kind {kind:?}", err()),
        });
    }
    Ok(out)
}

/// Reads every step directory of `dir`, in name order.
pub fn read_steps(dir: &Path) -> anyhow::Result<Vec<Step>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        bail!("{}: no step directories", dir.display());
    }
    dirs.iter()
        .map(|d| {
            let (apply, problems) = manifests::read_dir_into(d, Loader::default())?.finish_raw();
            let delete = match std::fs::read_to_string(d.join("delete")) {
                Ok(t) => parse_delete(&d.join("delete"), &t)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading {}", d.join("delete").display()));
                }
            };
            let expect = match std::fs::read_to_string(d.join("expect")) {
                Ok(t) => Some(
                    Expectation::parse(&t)
                        .with_context(|| format!("in {}", d.join("expect").display()))?,
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading {}", d.join("expect").display()));
                }
            };
            let name = d
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            Ok(Step {
                name,
                apply,
                delete,
                expect,
                problems,
            })
        })
        .collect()
}

/// Applies one step to the cluster state, as the API server would: creates/replaces, then
/// deletes (a deleted namespace takes its pods and policies with it).
pub fn apply_step(state: &mut ClusterSnapshot, step: &Step) {
    state.namespaces.extend(step.apply.namespaces.clone());
    state.pods.extend(step.apply.pods.clone());
    state.policies.extend(step.apply.policies.clone());
    for d in &step.delete {
        match d {
            Delete::Namespace(ns) => {
                state.namespaces.remove(ns);
                state.pods.retain(|k, _| &k.namespace != ns);
                state.policies.retain(|k, _| &k.namespace != ns);
            }
            Delete::Pod(p) => {
                state.pods.remove(p);
            }
            Delete::NetworkPolicy(p) => {
                state.policies.remove(p);
            }
        }
    }
    manifests::add_implicit_namespaces(state);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletes_parse_and_namespace_deletion_cascades() {
        let d = parse_delete(
            Path::new("delete"),
            "Pod x/a\n# c\nNetworkPolicy x/p\nNamespace y\n",
        )
        .expect("parses");
        assert_eq!(
            d,
            vec![
                Delete::Pod(ObjRef::new("x", "a")),
                Delete::NetworkPolicy(ObjRef::new("x", "p")),
                Delete::Namespace("y".into())
            ]
        );
        assert!(parse_delete(Path::new("delete"), "Service x/a").is_err());
        assert!(parse_delete(Path::new("delete"), "Pod a").is_err());

        let mut l = Loader::default();
        l.add_text(
            "t",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: y}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: z}\n",
        );
        let (apply, _) = l.finish_raw();
        let mut state = ClusterSnapshot::default();
        let step = Step {
            name: "1".into(),
            apply,
            delete: vec![],
            expect: None,
            problems: vec![],
        };
        apply_step(&mut state, &step);
        assert_eq!(state.pods.len(), 2);
        assert!(state.namespaces.contains_key("y"), "implicit namespace");
        let step2 = Step {
            delete: vec![Delete::Namespace("y".into())],
            apply: ClusterSnapshot::default(),
            ..step
        };
        apply_step(&mut state, &step2);
        assert_eq!(
            state.pods.keys().cloned().collect::<Vec<_>>(),
            vec![ObjRef::new("z", "b")]
        );
    }
}
