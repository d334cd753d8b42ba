//! Pending links: a new interface whose pod is not known yet.
use npm_common::maps::{EP_ISOLATE_EGRESS, EP_ISOLATE_INGRESS, EndpointInfo, ID_PENDING};

use super::*;
use crate::model::{ObjRef, Pod, Policy, Selector};

fn pod(ns: &str, name: &str, app: &str, node: Option<&str>, ip: Option<&str>) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        ips: ip.map(|i| i.parse().expect("ip")).into_iter().collect(),
        node_name: node.map(str::to_owned),
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![],
    }
}

fn deny_all(ns: &str, app: &str, ingress: bool, egress: bool) -> Policy {
    Policy {
        namespace: ns.into(),
        name: format!("deny-{app}"),
        pod_selector: Selector {
            match_labels: [("app".to_string(), app.to_string())].into(),
            ..Default::default()
        },
        ingress: ingress.then(Vec::new),
        egress: egress.then(Vec::new),
    }
}

fn snapshot() -> ClusterSnapshot {
    let mut s = ClusterSnapshot {
        node_name: Some("n1".into()),
        ..Default::default()
    };
    for p in [
        // Coming to this node, isolated for ingress by its namespace's policy.
        pod("a", "new", "db", Some("n1"), None),
        // Already placed here (local): does not count.
        pod("a", "old", "web", Some("n1"), Some("10.0.0.2")),
        // Coming to another node: does not count.
        pod("b", "elsewhere", "api", Some("n2"), None),
        // Coming here, not isolated by anything.
        pod("c", "free", "x", Some("n1"), None),
    ] {
        s.pods.insert(p.obj_ref(), p);
    }
    for p in [
        deny_all("a", "db", true, false),
        deny_all("a", "web", true, true),
        deny_all("b", "api", false, true),
    ] {
        s.policies.insert(p.obj_ref(), p);
    }
    s.local.insert(ObjRef::new("a", "old"), 5);
    s
}

#[test]
fn pending_links_deny_the_directions_a_coming_pod_would_be_isolated_in() {
    let mut s = snapshot();
    s.pending_links.insert(9);
    // ifindex 5 is already the local pod's: its real entry wins.
    s.pending_links.insert(5);
    let c = compile(&s, &mut IdAllocator::default());
    assert_eq!(
        c.maps.endpoints.get(&9),
        Some(&EndpointInfo {
            id: ID_PENDING,
            flags: EP_ISOLATE_INGRESS,
            slot: c.maps.endpoints[&9].slot,
        })
    );
    assert_ne!(c.maps.endpoints[&9].slot, c.maps.endpoints[&5].slot);
    let old = c.maps.endpoints[&5];
    assert_ne!(old.id, ID_PENDING);
    assert_eq!(old.flags, EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    // No POLICY entry is ever keyed by the pending identity: default-deny.
    assert!(c.maps.policy.keys().all(|(_, k)| k.local_id != ID_PENDING));

    // The pod of another node would be egress-isolated: it does not widen our flags.
    s.pods
        .get_mut(&ObjRef::new("b", "elsewhere"))
        .expect("pod")
        .node_name = Some("n1".into());
    let c = compile(&s, &mut IdAllocator::default());
    assert_eq!(
        c.maps.endpoints[&9].flags,
        EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS,
        "now it comes here too: union"
    );
}

#[test]
fn pending_links_are_open_when_no_coming_pod_is_isolated() {
    let mut s = snapshot();
    s.pods.remove(&ObjRef::new("a", "new"));
    s.pending_links.insert(9);
    let c = compile(&s, &mut IdAllocator::default());
    assert_eq!(
        c.maps.endpoints[&9],
        EndpointInfo {
            id: ID_PENDING,
            flags: 0,
            slot: c.maps.endpoints[&9].slot,
        }
    );
    // Without a node name no pod is known to be coming here.
    let mut s = snapshot();
    s.node_name = None;
    s.pending_links.insert(9);
    assert_eq!(
        compile(&s, &mut IdAllocator::default()).maps.endpoints[&9].flags,
        0
    );
}

#[test]
fn terminating_finished_and_host_network_pods_do_not_count() {
    let mut s = snapshot();
    s.pending_links.insert(9);
    s.pods
        .get_mut(&ObjRef::new("a", "new"))
        .expect("pod")
        .terminating = true;
    assert_eq!(
        compile(&s, &mut IdAllocator::default()).maps.endpoints[&9].flags,
        0
    );
    let p = s.pods.get_mut(&ObjRef::new("a", "new")).expect("pod");
    p.terminating = false;
    p.finished = true;
    assert_eq!(
        compile(&s, &mut IdAllocator::default()).maps.endpoints[&9].flags,
        0
    );
    let p = s.pods.get_mut(&ObjRef::new("a", "new")).expect("pod");
    p.finished = false;
    p.host_network = true;
    assert_eq!(
        compile(&s, &mut IdAllocator::default()).maps.endpoints[&9].flags,
        0
    );
}
