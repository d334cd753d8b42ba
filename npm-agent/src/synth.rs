//! Synthetic clusters for probes and benchmarks (no I/O; deterministic).
//!
//! Pod `i` lives in namespace `ns{i % namespaces}` with labels `app=app{i % 500}` and
//! `tier=t{i % 3}`, one named port `http`/8080, and the address 10.0.0.0 + i + 1. Policy `j`
//! in namespace `ns{j % namespaces}` selects `app=app{j % 500}` and allows ingress from
//! `tier=t1` pods of namespaces labelled `team=t{j % 10}` on the named port, and from the
//! ipBlock 172.{j % 256}.0.0/16 except 172.{j % 256}.1.0/24 on TCP 443-450. The first `local`
//! pods are on this node, behind ifindex 100 + i.
use std::net::{IpAddr, Ipv4Addr};

use crate::model::{
    ContainerPort, Namespace, Peer, Pod, Policy, PortRef, PortSpec, Protocol, Rule, Selector,
};
use crate::state::ClusterSnapshot;

fn sel(k: &str, v: String) -> Selector {
    Selector {
        match_labels: [(k.to_string(), v)].into(),
        ..Default::default()
    }
}

/// Namespace `n`, labelled `team=t{n % 10}`.
pub fn synthetic_namespace(n: usize) -> Namespace {
    Namespace {
        name: format!("ns{n}"),
        labels: [("team".to_string(), format!("t{}", n % 10))].into(),
    }
}

/// Pod `i` (see the module documentation).
pub fn synthetic_pod(i: usize, namespaces: usize) -> Pod {
    Pod {
        namespace: format!("ns{}", i % namespaces.max(1)),
        name: format!("p{i}"),
        labels: [
            ("app".to_string(), format!("app{}", i % 500)),
            ("tier".to_string(), format!("t{}", i % 3)),
        ]
        .into(),
        ips: vec![IpAddr::from(Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1))],
        node_name: None,
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp,
        }],
    }
}

/// Policy `j` (see the module documentation).
pub fn synthetic_policy(j: usize, namespaces: usize) -> Policy {
    Policy {
        namespace: format!("ns{}", j % namespaces.max(1)),
        name: format!("pol{j}"),
        pod_selector: sel("app", format!("app{}", j % 500)),
        ingress: Some(vec![
            Rule {
                peers: vec![Peer::Pods {
                    namespace_selector: Some(sel("team", format!("t{}", j % 10))),
                    pod_selector: Some(sel("tier", "t1".into())),
                }],
                ports: vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: Some(PortRef::Name("http".into())),
                    end_port: None,
                }],
            },
            Rule {
                peers: vec![Peer::IpBlock {
                    cidr: format!("172.{}.0.0/16", j % 256)
                        .parse()
                        .expect("valid literal"),
                    except: vec![
                        format!("172.{}.1.0/24", j % 256)
                            .parse()
                            .expect("valid literal"),
                    ],
                }],
                ports: vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: Some(PortRef::Number(443)),
                    end_port: Some(450),
                }],
            },
        ]),
        egress: None,
    }
}

/// A cluster of `pods` pods, `policies` policies and `namespaces` namespaces, the first
/// `local` pods on this node.
pub fn synthetic_cluster(
    pods: usize,
    policies: usize,
    namespaces: usize,
    local: usize,
) -> ClusterSnapshot {
    let mut s = ClusterSnapshot::default();
    for n in 0..namespaces.max(1) {
        let ns = synthetic_namespace(n);
        s.namespaces.insert(ns.name.clone(), ns);
    }
    for i in 0..pods {
        let p = synthetic_pod(i, namespaces);
        if i < local {
            s.local.insert(p.obj_ref(), 100 + i as u32);
        }
        s.pods.insert(p.obj_ref(), p);
    }
    for j in 0..policies {
        let p = synthetic_policy(j, namespaces);
        s.policies.insert(p.obj_ref(), p);
    }
    s.node_ips = vec![IpAddr::from(Ipv4Addr::new(192, 0, 2, 1))];
    s
}
