//! The cluster objects the compiler understands, free of the Kubernetes wire types.
//!
//! `k8s/convert.rs` is the only code that turns k8s-openapi objects into these.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// namespace/name of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjRef {
    pub namespace: String,
    pub name: String,
}

impl ObjRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

/// Serializes as `"TCP"`, `"UDP"` or `"SCTP"` (the Kubernetes spelling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => npm_common::maps::PROTO_TCP,
            Protocol::Udp => npm_common::maps::PROTO_UDP,
            Protocol::Sctp => npm_common::maps::PROTO_SCTP,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port a container declares (`spec.containers[].ports[]`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// status.podIPs (or status.podIP); empty while the pod has no IP yet.
    pub ips: Vec<IpAddr>,
    pub node_name: Option<String>,
    pub host_network: bool,
    /// deletionTimestamp set: the pod is being deleted, but its containers run until its
    /// grace period ends, so it stays an endpoint (selected, isolated, a peer) until it is
    /// gone or [`Pod::finished`]. Kubernetes asks that filtering be effective throughout the
    /// pod's lifecycle.
    pub terminating: bool,
    /// Phase Succeeded or Failed: every container has stopped for good (its address may be
    /// handed to another pod). Not an endpoint.
    pub finished: bool,
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    pub fn obj_ref(&self) -> ObjRef {
        ObjRef::new(&self.namespace, &self.name)
    }
    /// A pod that policies can select and that peers can address: has an IP, is not on the
    /// host network and has not finished. A terminating pod still is one.
    pub fn is_endpoint(&self) -> bool {
        !self.ips.is_empty() && !self.host_network && !self.finished
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SelectorOp {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    pub key: String,
    pub op: SelectorOp,
    pub values: BTreeSet<String>,
}

/// A label selector. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    pub match_labels: Labels,
    pub match_expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// podSelector and/or namespaceSelector. `namespace_selector: None` means the policy's own
    /// namespace; `pod_selector: None` means every pod of the selected namespaces.
    Pods {
        namespace_selector: Option<Selector>,
        pod_selector: Option<Selector>,
    },
    /// ipBlock: `cidr` minus every `except`.
    IpBlock { cidr: IpNet, except: Vec<IpNet> },
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    /// Defaults to TCP when the manifest leaves it out.
    pub protocol: Protocol,
    /// None: every port of `protocol`.
    pub port: Option<PortRef>,
    /// endPort: with a numeric `port`, the inclusive range port..=end_port.
    pub end_port: Option<u16>,
}

/// One ingress or egress rule. An empty `peers` list means every peer; an empty `ports`
/// list means every protocol and port (ICMP included).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// Some(rules) when the policy isolates ingress (policyTypes given or inferred).
    pub ingress: Option<Vec<Rule>>,
    /// Some(rules) when the policy isolates egress.
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    pub fn obj_ref(&self) -> ObjRef {
        ObjRef::new(&self.namespace, &self.name)
    }
}

/// A problem with one object: reported, the object skipped (or failed closed), the rest enforced.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    /// Where the object came from (a file path, or "api"), when known.
    pub source: Option<String>,
    /// `Kind namespace/name` (or `Kind name` for cluster-scoped objects).
    pub object: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{s}: {}: {}", self.object, self.message),
            None => write!(f, "{}: {}", self.object, self.message),
        }
    }
}

/// A Service as the lab needs it to play kube-proxy (`npm-agent lab` only: the agent never
/// watches Services; it learns the Service ranges from its configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs` (or `spec.clusterIP`); empty for a headless Service.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.selector` (equality only, as the API has it); empty: no endpoints the lab knows.
    pub selector: Labels,
    pub ports: Vec<ServicePort>,
}

impl Service {
    pub fn obj_ref(&self) -> ObjRef {
        ObjRef::new(&self.namespace, &self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub protocol: Protocol,
    /// `targetPort`; absent means the same number as `port`.
    pub target: TargetPort,
}

/// A Service's `targetPort`: a number, or a container port's name on each backend pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}
