//! k8s-openapi objects -> the compiler's model, with a clear reason for anything rejected.
//!
//! Fail closed: a NetworkPolicy whose podSelector is valid but one of whose rules is not keeps
//! isolating the pods it selects; only the broken rule is dropped (so it allows nothing). A
//! policy whose podSelector (or policyTypes) is invalid cannot say whom it isolates and is
//! skipped, with a problem reported.
//!
//! Some input is accepted with a reading the user should know about (an ipBlock CIDR with host
//! bits set is read as its network): it is reported as a [`ConvertError::Warning`] among the
//! policy's problems and drops nothing.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{
    ContainerPort, Labels, Namespace, Peer, Pod, Policy, PortRef, PortSpec, Protocol, Requirement,
    Rule, Selector, SelectorOp, Service, ServicePort, TargetPort,
};

/// The label Kubernetes sets on every namespace (and users select namespaces by).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("metadata.name is missing")]
    NoName,
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// Accepted, with a reading worth knowing; reported like a problem, but nothing is dropped.
    #[error("{field}: {reason} (warning only: nothing is dropped)")]
    Warning { field: String, reason: String },
    /// A policy whose podSelector or policyTypes cannot be read: it is kept, failing closed,
    /// and the message says how.
    #[error("{0}")]
    Unreadable(String),
}

impl ConvertError {
    /// A warning reports input that was accepted; everything else dropped something.
    pub fn is_warning(&self) -> bool {
        matches!(self, ConvertError::Warning { .. })
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConvertError {
    ConvertError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

pub fn namespace(ns: &core::Namespace) -> Result<Namespace, ConvertError> {
    let name = ns.metadata.name.clone().ok_or(ConvertError::NoName)?;
    let mut labels: Labels = ns.metadata.labels.clone().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
    Ok(Namespace { name, labels })
}

/// A Service, for the lab's kube-proxy emulation (`npm-agent lab`; the agent never reads
/// Services). A headless Service (`clusterIP: None`) has no cluster IPs.
pub fn service(s: &core::Service) -> Result<Service, ConvertError> {
    let name = s.metadata.name.clone().ok_or(ConvertError::NoName)?;
    let namespace = s
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = s.spec.clone().unwrap_or_default();
    let mut texts: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if texts.is_empty()
        && let Some(ip) = &spec.cluster_ip
    {
        texts.push(ip.clone());
    }
    let mut cluster_ips = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        if t.is_empty() || t == "None" {
            continue;
        }
        let ip: IpAddr = t.parse().map_err(|_| {
            invalid(
                format!("spec.clusterIPs[{i}]"),
                format!("{t:?} is not an IP"),
            )
        })?;
        cluster_ips.push(ip);
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.as_deref().unwrap_or_default().iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let port = u16::try_from(p.port)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| invalid(format!("{field}.port"), "not a port number 1-65535"))?;
        let target = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(
                u16::try_from(*n)
                    .ok()
                    .filter(|n| *n != 0)
                    .ok_or_else(|| invalid(format!("{field}.targetPort"), "not a port number"))?,
            ),
            Some(IntOrString::String(s)) => match s.parse::<u16>() {
                Ok(n) if n != 0 => TargetPort::Number(n),
                _ => TargetPort::Name(s.clone()),
            },
        };
        ports.push(ServicePort {
            port,
            protocol: protocol(&format!("{field}.protocol"), p.protocol.as_deref())?,
            target,
        });
    }
    Ok(Service {
        namespace,
        name,
        cluster_ips,
        selector: spec.selector.unwrap_or_default(),
        ports,
    })
}

pub fn protocol(field: &str, p: Option<&str>) -> Result<Protocol, ConvertError> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(invalid(
            field,
            format!("unsupported protocol {other:?} (TCP, UDP or SCTP)"),
        )),
    }
}

fn port_number(field: &str, n: i32) -> Result<u16, ConvertError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field, format!("port {n} is outside 1-65535")))
}

/// A pod, and the problems of the fields that were left out. Only a missing name loses the
/// pod: an address or a container port that cannot be read is left out and reported, and the
/// pod is kept, since a pod left out entirely would leave its interface unenforced (a pod
/// without its address is still counted where its interface is not known yet, which isolates
/// that interface; a rule naming a port that was left out matches nothing).
pub fn pod(p: &core::Pod) -> Result<(Pod, Vec<ConvertError>), ConvertError> {
    let mut problems = Vec::new();
    let name = p.metadata.name.clone().ok_or(ConvertError::NoName)?;
    let namespace = p
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let mut ips: Vec<IpAddr> = Vec::new();
    let raw: Vec<&str> = match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(list) if !list.is_empty() => list.iter().map(|i| i.ip.as_str()).collect(),
        _ => status
            .and_then(|s| s.pod_ip.as_deref())
            .into_iter()
            .collect(),
    };
    for (i, s) in raw.iter().enumerate() {
        let Ok(ip) = s.parse::<IpAddr>() else {
            problems.push(invalid(
                format!("status.podIPs[{i}]"),
                format!("{s:?} is not an IP address; the pod is kept without it"),
            ));
            continue;
        };
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    // Named ports come from the containers and from the sidecars: init containers with
    // `restartPolicy: Always` (Kubernetes 1.29+) run for the pod's lifetime and policies apply
    // to them alike. Ordinary init containers have exited before the pod serves; their ports
    // are not read.
    let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let init = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default();
    let running = containers
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("spec.containers[{i}]"), c))
        .chain(
            init.iter()
                .enumerate()
                .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
                .map(|(i, c)| (format!("spec.initContainers[{i}]"), c)),
        );
    let mut ports = Vec::new();
    for (container, c) in running {
        for (pi, cp) in c.ports.as_deref().unwrap_or_default().iter().enumerate() {
            let field = format!("{container}.ports[{pi}]");
            let port = port_number(&field, cp.container_port)
                .and_then(|n| Ok((n, protocol(&field, cp.protocol.as_deref())?)));
            match port {
                Ok((port, protocol)) => ports.push(ContainerPort {
                    name: cp.name.clone(),
                    port,
                    protocol,
                }),
                Err(ConvertError::Invalid { field, reason }) => {
                    problems.push(ConvertError::Invalid {
                        field,
                        reason: format!("{reason}; the pod is kept without this port"),
                    })
                }
                Err(e) => problems.push(e),
            }
        }
    }
    let phase = status.and_then(|s| s.phase.as_deref());
    let pod = Pod {
        namespace,
        name,
        labels: p.metadata.labels.clone().unwrap_or_default(),
        ips,
        node_name: spec.and_then(|s| s.node_name.clone()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        terminating: p.metadata.deletion_timestamp.is_some(),
        finished: matches!(phase, Some("Succeeded") | Some("Failed")),
        ports,
    };
    Ok((pod, problems))
}

/// The stand-in for a policy that cannot be read: `pods` isolated in both directions with no
/// rule, and the reason as its problem.
fn closed(
    namespace: String,
    name: String,
    pods: Selector,
    why: String,
) -> (Option<Policy>, Vec<ConvertError>) {
    (
        Some(Policy {
            namespace,
            name,
            pod_selector: pods,
            ingress: Some(Vec::new()),
            egress: Some(Vec::new()),
        }),
        vec![ConvertError::Unreadable(why)],
    )
}

/// A label selector; `None` (absent or null) converts to the empty selector.
pub fn selector(field: &str, s: Option<&LabelSelector>) -> Result<Selector, ConvertError> {
    let Some(s) = s else {
        return Ok(Selector::default());
    };
    let mut out = Selector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: vec![],
    };
    for (i, e) in s
        .match_expressions
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let f = format!("{field}.matchExpressions[{i}]");
        let values: BTreeSet<String> = e.values.clone().unwrap_or_default().into_iter().collect();
        let op = match e.operator.as_str() {
            "In" => SelectorOp::In,
            "NotIn" => SelectorOp::NotIn,
            "Exists" => SelectorOp::Exists,
            "DoesNotExist" => SelectorOp::DoesNotExist,
            other => return Err(invalid(f, format!("unknown operator {other:?}"))),
        };
        match op {
            SelectorOp::In | SelectorOp::NotIn if values.is_empty() => {
                return Err(invalid(f, format!("operator {} needs values", e.operator)));
            }
            SelectorOp::Exists | SelectorOp::DoesNotExist if !values.is_empty() => {
                return Err(invalid(
                    f,
                    format!("operator {} takes no values", e.operator),
                ));
            }
            _ => {}
        }
        out.match_expressions.push(Requirement {
            key: e.key.clone(),
            op,
            values,
        });
    }
    Ok(out)
}

/// An ipBlock `cidr` or `except` entry. One with host bits set (`10.0.0.5/8`) is read as its
/// network (`10.0.0.0/8`) and a warning is added to `warnings`: the API server has long
/// accepted such values (Go's `net.ParseCIDR` does) and other enforcers read them so, so
/// rejecting it would drop a rule the cluster considers valid. Text that is not a CIDR is an
/// error.
fn cidr(field: &str, s: &str, warnings: &mut Vec<ConvertError>) -> Result<IpNet, ConvertError> {
    let n: IpNet = s
        .parse()
        .map_err(|_| invalid(field, format!("{s:?} is not a CIDR")))?;
    let net = n.trunc();
    if net != n {
        warnings.push(ConvertError::Warning {
            field: field.to_string(),
            reason: format!("{s:?} has host bits set; read as its network {net}"),
        });
    }
    Ok(net)
}

fn peer(
    field: &str,
    p: &net::NetworkPolicyPeer,
    warnings: &mut Vec<ConvertError>,
) -> Result<Peer, ConvertError> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(b), None, None) => {
            let c = cidr(&format!("{field}.ipBlock.cidr"), &b.cidr, warnings)?;
            let mut except = Vec::new();
            for (i, e) in b.except.as_deref().unwrap_or_default().iter().enumerate() {
                let f = format!("{field}.ipBlock.except[{i}]");
                let e = cidr(&f, e, warnings)?;
                if !c.contains(&e) {
                    return Err(invalid(f, format!("{e} is not inside cidr {c}")));
                }
                except.push(e);
            }
            Ok(Peer::IpBlock { cidr: c, except })
        }
        (Some(_), _, _) => Err(invalid(field, "ipBlock cannot be combined with a selector")),
        (None, None, None) => Err(invalid(
            field,
            "a peer needs podSelector, namespaceSelector or ipBlock",
        )),
        (None, ns, pods) => Ok(Peer::Pods {
            namespace_selector: ns
                .as_ref()
                .map(|s| selector(&format!("{field}.namespaceSelector"), Some(s)))
                .transpose()?,
            pod_selector: pods
                .as_ref()
                .map(|s| selector(&format!("{field}.podSelector"), Some(s)))
                .transpose()?,
        }),
    }
}

fn port_spec(field: &str, p: &net::NetworkPolicyPort) -> Result<PortSpec, ConvertError> {
    let protocol = protocol(&format!("{field}.protocol"), p.protocol.as_deref())?;
    let port = match &p.port {
        None => None,
        Some(IntOrString::Int(n)) => {
            Some(PortRef::Number(port_number(&format!("{field}.port"), *n)?))
        }
        Some(IntOrString::String(s)) => match s.parse::<i32>() {
            Ok(n) => Some(PortRef::Number(port_number(&format!("{field}.port"), n)?)),
            Err(_) if !s.is_empty() => Some(PortRef::Name(s.clone())),
            Err(_) => return Err(invalid(format!("{field}.port"), "empty port name")),
        },
    };
    let end_port = match (p.end_port, &port) {
        (None, _) => None,
        (Some(e), Some(PortRef::Number(start))) => {
            let end = port_number(&format!("{field}.endPort"), e)?;
            if end < *start {
                return Err(invalid(
                    format!("{field}.endPort"),
                    format!("{end} is below port {start}"),
                ));
            }
            Some(end)
        }
        (Some(_), _) => {
            return Err(invalid(
                format!("{field}.endPort"),
                "endPort needs a numeric port",
            ));
        }
    };
    Ok(PortSpec {
        protocol,
        port,
        end_port,
    })
}

/// One rule; warnings about what it accepted go to `warnings`.
fn rule(
    field: &str,
    peers: Option<&Vec<net::NetworkPolicyPeer>>,
    peers_name: &str,
    ports: Option<&Vec<net::NetworkPolicyPort>>,
    warnings: &mut Vec<ConvertError>,
) -> Result<Rule, ConvertError> {
    let peers = peers
        .map(|v| {
            v.iter()
                .enumerate()
                .map(|(i, p)| peer(&format!("{field}.{peers_name}[{i}]"), p, warnings))
                .collect()
        })
        .transpose()?
        .unwrap_or_default();
    let ports = ports
        .map(|v| {
            v.iter()
                .enumerate()
                .map(|(i, p)| port_spec(&format!("{field}.ports[{i}]"), p))
                .collect()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(Rule { peers, ports })
}

/// One ingress or egress rule as written: (from/to peers, ports).
type RawRule<'a> = (
    Option<&'a Vec<net::NetworkPolicyPeer>>,
    Option<&'a Vec<net::NetworkPolicyPort>>,
);

/// Converts a NetworkPolicy. Returns the policy (None when it cannot say whom it selects)
/// and the problems found; a rule with a problem is dropped and allows nothing, except for
/// [`ConvertError::Warning`]s, which report what was accepted and drop nothing.
pub fn policy(np: &net::NetworkPolicy) -> (Option<Policy>, Vec<ConvertError>) {
    let mut problems = Vec::new();
    let Some(name) = np.metadata.name.clone() else {
        return (None, vec![ConvertError::NoName]);
    };
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let default_spec = net::NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);
    // A policy whose podSelector or policyTypes cannot be read still exists: dropping it
    // would open the pods it was written to protect. It fails closed instead (`closed`).
    let pod_selector = match selector("spec.podSelector", spec.pod_selector.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            let why = format!(
                "{e}; the policy cannot say which pods it selects, so every pod of namespace \
                 {namespace} is isolated both ways, with nothing allowed, until it is fixed"
            );
            return closed(namespace, name, Selector::default(), why);
        }
    };
    // Kubernetes defaults policyTypes to Ingress, plus Egress when there are egress rules; an
    // empty list counts as not given (the API server defaults it the same way).
    let (mut ingress_on, mut egress_on) =
        (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()));
    if let Some(types) = spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
        ingress_on = false;
        egress_on = false;
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => ingress_on = true,
                "Egress" => egress_on = true,
                other => {
                    let e = invalid(
                        format!("spec.policyTypes[{i}]"),
                        format!("unknown type {other:?}"),
                    );
                    let why = format!(
                        "{e}; the policy cannot say which directions it isolates, so the pods \
                         it selects are isolated both ways, with nothing allowed, until it is \
                         fixed"
                    );
                    return closed(namespace, name, pod_selector, why);
                }
            }
        }
    }
    // Each rule as (peers, ports); a rule that fails to convert is dropped and reported. The
    // warnings of a rule that converts are reported with it; those of a dropped rule are moot
    // (its error says why it is dropped).
    let mut convert = |dir: &str, peers_name: &str, rules: Vec<RawRule<'_>>| -> Vec<Rule> {
        rules
            .into_iter()
            .enumerate()
            .filter_map(|(i, (peers, ports))| {
                let mut warnings = Vec::new();
                let field = format!("spec.{dir}[{i}]");
                match rule(&field, peers, peers_name, ports, &mut warnings) {
                    Ok(r) => {
                        problems.extend(warnings);
                        Some(r)
                    }
                    Err(e) => {
                        problems.push(e);
                        None
                    }
                }
            })
            .collect()
    };
    let ingress = ingress_on.then(|| {
        let rules = spec.ingress.as_deref().unwrap_or_default();
        convert(
            "ingress",
            "from",
            rules
                .iter()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
        )
    });
    let egress = egress_on.then(|| {
        let rules = spec.egress.as_deref().unwrap_or_default();
        convert(
            "egress",
            "to",
            rules
                .iter()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        )
    });
    let problems = problems
        .into_iter()
        .map(|e| match e {
            ConvertError::Invalid { field, reason } => ConvertError::Invalid {
                field,
                reason: format!(
                    "{reason}; this rule is dropped (the policy still isolates its pods)"
                ),
            },
            other => other,
        })
        .collect();
    (
        Some(Policy {
            namespace,
            name,
            pod_selector,
            ingress,
            egress,
        }),
        problems,
    )
}

/// Implicit namespaces for names that pods or policies use but no Namespace object declares.
pub fn implicit_namespace(name: &str) -> Namespace {
    Namespace {
        name: name.to_string(),
        labels: BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), name.to_string())]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(spec: serde_json::Value) -> net::NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": spec,
        }))
        .expect("a NetworkPolicy")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    #[test]
    fn ipblock_with_host_bits_is_read_as_its_network_with_a_warning() {
        let (p, problems) = policy(&np(serde_json::json!({
            "podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.5/8", "except": ["10.1.2.3/16"]}}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "fd00::5/64"}}]}],
        })));
        let p = p.expect("the policy is kept");
        assert_eq!(
            p.ingress.as_ref().expect("ingress").as_slice(),
            [Rule {
                peers: vec![Peer::IpBlock {
                    cidr: net("10.0.0.0/8"),
                    except: vec![net("10.1.0.0/16")],
                }],
                ports: vec![],
            }],
            "the rule is kept, as networks"
        );
        assert_eq!(
            p.egress.as_ref().expect("egress").as_slice(),
            [Rule {
                peers: vec![Peer::IpBlock {
                    cidr: net("fd00::/64"),
                    except: vec![],
                }],
                ports: vec![],
            }]
        );
        let texts: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(problems.iter().all(ConvertError::is_warning), "{texts:?}");
        assert_eq!(
            texts,
            [
                "spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.5/8\" has host bits set; read as \
                 its network 10.0.0.0/8 (warning only: nothing is dropped)",
                "spec.ingress[0].from[0].ipBlock.except[0]: \"10.1.2.3/16\" has host bits set; \
                 read as its network 10.1.0.0/16 (warning only: nothing is dropped)",
                "spec.egress[0].to[0].ipBlock.cidr: \"fd00::5/64\" has host bits set; read as \
                 its network fd00::/64 (warning only: nothing is dropped)",
            ]
        );
    }

    #[test]
    fn canonical_ipblock_has_no_warning_and_non_cidr_text_still_drops_the_rule() {
        let (p, problems) = policy(&np(serde_json::json!({
            "podSelector": {},
            "ingress": [
                {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]},
                {"from": [{"ipBlock": {"cidr": "10.0.0.5"}}]},
                {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["nope"]}}]},
                {"from": [{"ipBlock": {"cidr": "10.0.0.5/8", "except": ["192.168.0.0/16"]}}]},
            ],
        })));
        let ingress = p.expect("the policy is kept").ingress.expect("ingress");
        assert_eq!(ingress.len(), 1, "only the valid rule is kept: {ingress:?}");
        let texts: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 3, "{texts:?}");
        assert!(!problems.iter().any(ConvertError::is_warning), "{texts:?}");
        assert!(
            texts[0]
                .starts_with("spec.ingress[1].from[0].ipBlock.cidr: \"10.0.0.5\" is not a CIDR")
        );
        assert!(
            texts[1]
                .starts_with("spec.ingress[2].from[0].ipBlock.except[0]: \"nope\" is not a CIDR")
        );
        // A dropped rule's host-bits warning is not reported: its error says why it is dropped.
        assert!(
            texts[2].starts_with(
                "spec.ingress[3].from[0].ipBlock.except[0]: 192.168.0.0/16 is not inside cidr 10.0.0.0/8"
            ),
            "{texts:?}"
        );
        assert!(
            texts.iter().all(|t| t.contains("this rule is dropped")),
            "{texts:?}"
        );
    }

    #[test]
    fn named_ports_come_from_containers_and_sidecars_not_from_init_containers() {
        let p: core::Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "initContainers": [
                    {"name": "migrate", "ports": [{"name": "setup", "containerPort": 9000}]},
                    {"name": "mesh", "restartPolicy": "Always",
                     "ports": [{"name": "proxy", "containerPort": 15001},
                               {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]},
                    {"name": "once", "restartPolicy": "Never",
                     "ports": [{"name": "other", "containerPort": 9001}]},
                ],
                "containers": [
                    {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]},
                ],
            },
            "status": {"podIP": "10.244.1.5"},
        }))
        .expect("a Pod");
        let (got, problems) = pod(&p).expect("converts");
        assert!(problems.is_empty(), "{problems:?}");
        let got = got.ports;
        let want = [
            ("http", 8080, Protocol::Tcp),
            ("proxy", 15001, Protocol::Tcp),
            ("dns", 5353, Protocol::Udp),
        ]
        .map(|(n, port, protocol)| ContainerPort {
            name: Some(n.into()),
            port,
            protocol,
        });
        assert_eq!(got, want);
    }

    #[test]
    fn a_bad_sidecar_port_names_its_init_container_field() {
        let p: core::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "initContainers": [
                    {"name": "migrate", "ports": [{"containerPort": 0}]},
                    {"name": "mesh", "restartPolicy": "Always", "ports": [{"containerPort": 70000}]},
                ],
                "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 80}]}],
            },
            "status": {"podIPs": [{"ip": "10.0.0.999"}, {"ip": "10.0.0.9"}]},
        }))
        .expect("a Pod");
        // The pod is kept without what cannot be read, each problem naming its field.
        let (got, problems) = pod(&p).expect("a pod with a bad field is kept");
        let texts: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            [
                "status.podIPs[0]: \"10.0.0.999\" is not an IP address; the pod is kept without it",
                "spec.initContainers[1].ports[0]: port 70000 is outside 1-65535; the pod is kept \
                 without this port",
            ]
        );
        assert_eq!(got.ips, ["10.0.0.9".parse::<IpAddr>().expect("ip")]);
        assert_eq!(got.ports.len(), 1, "{:?}", got.ports);
        assert_eq!(got.ports[0].port, 80);
    }
}
