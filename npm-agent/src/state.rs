//! Ground state: everything the compiler needs, captured at one moment.
use std::collections::BTreeMap;
use std::net::IpAddr;

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
}
