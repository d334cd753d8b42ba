//! Ground state: everything the compiler needs, captured at one moment, and the changes that
//! move it from one moment to the next.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{Namespace, ObjRef, Pod, Policy};

/// The cluster as one node's agent sees it, plus the node-local facts (which pods sit here and
/// behind which host-side interface). The compiler reads nothing else.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterSnapshot {
    /// Bumped by the source on every change; for logs and metrics only.
    pub generation: u64,
    pub namespaces: BTreeMap<String, Namespace>,
    /// Every pod of the cluster (any pod can be a peer).
    pub pods: BTreeMap<ObjRef, Pod>,
    pub policies: BTreeMap<ObjRef, Policy>,
    /// Pods on this node and the ifindex of their host-side interface.
    pub local: BTreeMap<ObjRef, u32>,
    /// This node's own addresses (traffic from/to them is always allowed).
    pub node_ips: Vec<IpAddr>,
    /// Host-side interfaces that appeared on this node and do not yet belong to a known local
    /// pod (the CNI made them before the API reported the pod's IP). They get a default-deny
    /// endpoint for the directions any not-yet-placed pod of this node would be isolated in.
    pub pending_links: BTreeSet<u32>,
    /// This node's name (pods with `node_name` equal to it are this node's). Set once at
    /// start; [`Change`] does not carry it.
    pub node_name: Option<String>,
    /// The cluster's Service ranges (config `ServiceCIDRs`): egress to them that the pre-DNAT
    /// lookup denies is checked again after kube-proxy's DNAT. Empty: it is not (the
    /// documented gap). Configuration, set once like `node_name`; [`Change`] does not carry it.
    pub service_cidrs: Vec<IpNet>,
}

/// One change to a [`ClusterSnapshot`]: an object set (added or replaced) or removed (`None`).
/// Sources emit these; the incremental compiler consumes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Namespace(String, Option<Namespace>),
    Pod(ObjRef, Option<Pod>),
    Policy(ObjRef, Option<Policy>),
    /// A pod's host-side interface on this node appeared (`Some(ifindex)`) or went away.
    Local(ObjRef, Option<u32>),
    /// This node's addresses, all of them.
    NodeIps(Vec<IpAddr>),
    /// A new host-side interface not yet tied to a pod appeared (`true`) or was resolved or
    /// removed (`false`).
    PendingLink(u32, bool),
}

impl ClusterSnapshot {
    /// Applies one change. Returns false when it changed nothing (the object was already so).
    pub fn apply(&mut self, change: &Change) -> bool {
        fn set<K: Ord + Clone, V: PartialEq + Clone>(
            map: &mut BTreeMap<K, V>,
            key: &K,
            value: &Option<V>,
        ) -> bool {
            match value {
                Some(v) => {
                    if map.get(key) == Some(v) {
                        false
                    } else {
                        map.insert(key.clone(), v.clone());
                        true
                    }
                }
                None => map.remove(key).is_some(),
            }
        }
        let changed = match change {
            Change::Namespace(name, ns) => set(&mut self.namespaces, name, ns),
            Change::Pod(obj, pod) => set(&mut self.pods, obj, pod),
            Change::Policy(obj, policy) => set(&mut self.policies, obj, policy),
            Change::Local(obj, ifindex) => set(&mut self.local, obj, ifindex),
            Change::PendingLink(ifindex, true) => self.pending_links.insert(*ifindex),
            Change::PendingLink(ifindex, false) => self.pending_links.remove(ifindex),
            Change::NodeIps(ips) => {
                if &self.node_ips == ips {
                    false
                } else {
                    self.node_ips = ips.clone();
                    true
                }
            }
        };
        if changed {
            self.generation += 1;
        }
        changed
    }

    /// The changes that turn `self` into `new` (generation, node name and Service ranges
    /// aside), in a
    /// deterministic order: namespaces, policies, pods, local interfaces, node addresses,
    /// pending interfaces.
    pub fn diff(&self, new: &ClusterSnapshot) -> Vec<Change> {
        fn diff_map<K: Ord + Clone, V: PartialEq + Clone>(
            old: &BTreeMap<K, V>,
            new: &BTreeMap<K, V>,
            make: impl Fn(K, Option<V>) -> Change,
            out: &mut Vec<Change>,
        ) {
            for (k, v) in new {
                if old.get(k) != Some(v) {
                    out.push(make(k.clone(), Some(v.clone())));
                }
            }
            for k in old.keys() {
                if !new.contains_key(k) {
                    out.push(make(k.clone(), None));
                }
            }
        }
        let mut out = Vec::new();
        diff_map(
            &self.namespaces,
            &new.namespaces,
            Change::Namespace,
            &mut out,
        );
        diff_map(&self.policies, &new.policies, Change::Policy, &mut out);
        diff_map(&self.pods, &new.pods, Change::Pod, &mut out);
        diff_map(&self.local, &new.local, Change::Local, &mut out);
        if self.node_ips != new.node_ips {
            out.push(Change::NodeIps(new.node_ips.clone()));
        }
        for i in new.pending_links.difference(&self.pending_links) {
            out.push(Change::PendingLink(*i, true));
        }
        for i in self.pending_links.difference(&new.pending_links) {
            out.push(Change::PendingLink(*i, false));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, team: &str) -> Namespace {
        Namespace {
            name: name.into(),
            labels: [("team".to_string(), team.to_string())].into(),
        }
    }

    #[test]
    fn diff_then_apply_reaches_the_new_snapshot() {
        let mut old = ClusterSnapshot::default();
        old.namespaces.insert("a".into(), ns("a", "x"));
        old.namespaces.insert("b".into(), ns("b", "x"));
        old.local.insert(ObjRef::new("a", "p"), 4);
        let mut new = ClusterSnapshot::default();
        new.namespaces.insert("a".into(), ns("a", "y"));
        new.namespaces.insert("c".into(), ns("c", "x"));
        new.node_ips = vec!["10.0.0.1".parse().unwrap()];
        old.pending_links.insert(7);
        new.pending_links.insert(8);
        let changes = old.diff(&new);
        assert_eq!(changes.len(), 7, "{changes:?}");
        let mut s = old.clone();
        for c in &changes {
            assert!(s.apply(c), "{c:?} changed nothing");
        }
        s.generation = new.generation;
        assert_eq!(s, new);
        // Applying the same changes again changes nothing.
        assert!(changes.iter().all(|c| !s.apply(c)));
        assert!(new.diff(&new).is_empty());
    }
}
