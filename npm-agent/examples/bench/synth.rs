//! The synthetic cluster every figure is measured on (grown from `examples/scale_probe.rs`).
//!
//! Its namespaces and policies are `npm_agent::synth`'s; its pods add an IPv6 address and the
//! local pod `p0` behind `lo`, which the agent's single-stack synthetic pods do not need.
//! Shape, for `pods` pods, `policies` policies and `namespaces` namespaces:
//! - namespace `ns{n}` has `team=t{n % 10}`;
//! - pod `p{i}` lives in `ns{i % namespaces}` with `app=app{i % 500}`, `tier=t{i % 3}`, a
//!   named port `http` = 8080/TCP, and two addresses: 10.0.0.0/8 + i + 1 and fd00::i+1;
//! - policy `pol{j}` in `ns{j % namespaces}` selects `app=app{j % 500}` and allows ingress from
//!   pods with `tier=t1` in namespaces with `team=t{j % 10}` on `http`, and from the ipBlock
//!   172.{j % 256}.0.0/16 except 172.{j % 256}.1.0/24 on 443-450/TCP;
//! - the first [`LOCAL_PODS`] pods are local, `p0` behind ifindex 1 (`lo`, the interface
//!   `BPF_PROG_TEST_RUN` runs on), the others behind 100 + i.
//!
//! So `p0` (ns0, app0) is selected by every policy `pol{j}` with j a multiple of 500 (and of
//! the namespace count), all of which allow team `t0`: `p10` (ns10, team t0, tier t1) is an
//! allowed peer on 8080, `p1` (ns1, team t1) a denied one.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use npm_agent::model::{ContainerPort, ObjRef, Pod, Protocol};
use npm_agent::state::ClusterSnapshot;
pub(crate) use npm_agent::synth::{synthetic_namespace, synthetic_policy};

/// Pods on this node (the agent programs endpoints and policy entries only for these).
pub(crate) const LOCAL_PODS: usize = 110;
/// The allowed and the denied peer of `p0` (pod indices), see the module doc.
pub(crate) const ALLOWED_PEER: usize = 10;
pub(crate) const DENIED_PEER: usize = 1;
/// The port `p0` serves (`http`).
pub(crate) const SERVICE_PORT: u16 = 8080;

pub(crate) fn v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000u32 + u32::try_from(i).expect("pod index fits u32") + 1)
}

pub(crate) fn v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::from(0xfd00_u128 << 112 | (i as u128 + 1))
}

/// Pod `p{i}`, with `app` label `app{app}`.
pub(crate) fn pod(i: usize, namespaces: usize, app: usize) -> Pod {
    Pod {
        namespace: format!("ns{}", i % namespaces),
        name: format!("p{i}"),
        labels: [
            ("app".to_string(), format!("app{app}")),
            ("tier".to_string(), format!("t{}", i % 3)),
        ]
        .into(),
        ips: vec![IpAddr::V4(v4(i)), IpAddr::V6(v6(i))],
        node_name: None,
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![ContainerPort {
            name: Some("http".into()),
            port: SERVICE_PORT,
            protocol: Protocol::Tcp,
        }],
    }
}

/// Ifindex of local pod `i` (`i < LOCAL_PODS`).
pub(crate) fn local_ifindex(i: usize) -> u32 {
    if i == 0 {
        1
    } else {
        100 + u32::try_from(i).expect("small")
    }
}

pub(crate) fn cluster(pods: usize, policies: usize, namespaces: usize) -> ClusterSnapshot {
    assert!(
        namespaces > ALLOWED_PEER,
        "the allowed peer needs namespace ns10"
    );
    assert!(pods > ALLOWED_PEER, "the allowed peer is pod p10");
    let mut s = ClusterSnapshot::default();
    for n in 0..namespaces {
        let ns = synthetic_namespace(n);
        s.namespaces.insert(ns.name.clone(), ns);
    }
    for i in 0..pods {
        let p = pod(i, namespaces, i % 500);
        if i < LOCAL_PODS {
            s.local.insert(p.obj_ref(), local_ifindex(i));
        }
        s.pods.insert(p.obj_ref(), p);
    }
    for j in 0..policies {
        let p = synthetic_policy(j, namespaces);
        s.policies.insert(p.obj_ref(), p);
    }
    s
}

pub(crate) fn pod_ref(i: usize, namespaces: usize) -> ObjRef {
    ObjRef::new(format!("ns{}", i % namespaces), format!("p{i}"))
}
