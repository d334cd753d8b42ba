//! Source spoofing with real packets between namespaces: a pod that sends from the node's
//! address or from another pod's address reaches an ingress-isolated pod only while its own
//! interface carries no program; with `npm_from_pod` on it, the datagrams are dropped and
//! counted as `spoofed`, while genuine traffic still flows. Privileged (root).
#[path = "common/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use npm_agent::enforcer::Enforcer;
use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::{ObjRef, Peer, Policy, Rule, Selector};
use npm_agent::state::ClusterSnapshot;
use npm_common::verdict::{DIR_EGRESS, REASON_DROP_SPOOFED};
use support::pod;

const A: &str = "10.248.0.2";
const B: &str = "10.248.0.3";
const C: &str = "10.248.0.4";
const PORT: u16 = 7000;

/// b accepts anything, but only from app=c.
fn b_from_c() -> Policy {
    Policy {
        namespace: "default".into(),
        name: "b-from-c".into(),
        pod_selector: Selector {
            match_labels: [("app".to_string(), "b".to_string())].into(),
            ..Default::default()
        },
        ingress: Some(vec![Rule {
            peers: vec![Peer::Pods {
                namespace_selector: None,
                pod_selector: Some(Selector {
                    match_labels: [("app".to_string(), "c".to_string())].into(),
                    ..Default::default()
                }),
            }],
            ports: vec![],
        }]),
        egress: None,
    }
}

/// Sends one datagram `tag` from `from`'s netns, bound to `src`, to b:PORT.
fn send(lab: &Lab, from: &str, src: &str, tag: &str) {
    let ns = lab.netns_of(&format!("default/{from}")).expect("netns");
    let src: IpAddr = src.parse().expect("ip");
    let dst: SocketAddr = format!("{B}:{PORT}").parse().expect("addr");
    ns.run(|| {
        let s = UdpSocket::bind((src, 0)).unwrap_or_else(|e| panic!("bind {src} in {from}: {e}"));
        s.send_to(tag.as_bytes(), dst)
            .unwrap_or_else(|e| panic!("send from {src} in {from}: {e}"));
    });
}

/// The tags b's socket reads within `wait` (at most 64 datagrams).
fn received(sock: &UdpSocket, wait: Duration) -> BTreeSet<String> {
    let deadline = Instant::now() + wait;
    let mut got = BTreeSet::new();
    let mut buf = [0u8; 64];
    while got.len() < 64 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        sock.set_read_timeout(Some(left)).expect("timeout");
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                got.insert(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            Err(_) => break,
        }
    }
    got
}

fn set(tags: &[&str]) -> BTreeSet<String> {
    tags.iter().map(|t| (*t).to_owned()).collect()
}

#[test]
fn spoofed_sources_reach_an_isolated_pod_only_without_the_source_check() {
    support::require_root("spoofing test");
    let pods = vec![pod("a", "a", A), pod("b", "b", B), pod("c", "c", C)];
    let lab = Lab::build(LabSpec {
        pods: pods.clone(),
        externals: vec![],
    })
    .expect("lab");
    let mut snapshot = ClusterSnapshot::default();
    for p in &pods {
        snapshot.pods.insert(p.obj_ref(), p.clone());
    }
    snapshot.namespaces.insert(
        "default".into(),
        npm_agent::model::Namespace {
            name: "default".into(),
            labels: Default::default(),
        },
    );
    snapshot.policies.insert(b_from_c().obj_ref(), b_from_c());
    let interfaces = lab.pod_interfaces();
    snapshot.local = interfaces
        .iter()
        .map(|(k, (_, i))| (k.clone(), *i))
        .collect();
    snapshot.node_ips = lab.node_ips();
    let node_v4 = lab
        .node_ips()
        .into_iter()
        .find(IpAddr::is_ipv4)
        .expect("the node has an IPv4 address")
        .to_string();
    let (a_if, _) = interfaces[&ObjRef::new("default", "a")].clone();

    // The kernel's own source checks would hide the hole on this routed node: a source that
    // is a local address is a martian unless accept_local is on (rp_filter is off in the lab).
    // A bridged CNI forwards at L2 and has no such check; here we turn it off for a's link.
    lab.node()
        .sysctls(&[
            (&format!("net.ipv4.conf.{a_if}.accept_local"), "1"),
            (&format!("net.ipv4.conf.{a_if}.rp_filter"), "0"),
        ])
        .expect("sysctls");
    // a owns the addresses it will pretend to have, so it can bind them.
    let a_ns = lab.netns_of("default/a").expect("a netns");
    for addr in [node_v4.as_str(), C] {
        a_ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"])
            .expect("ip addr add in a");
    }

    let mut enforcer = Enforcer::new(None).expect("datapath");
    let r = enforcer.apply(&snapshot);
    assert_eq!(r.sync.failed, 0);
    assert!(r.diagnostics.is_empty(), "{:?}", r.diagnostics);
    // b and c carry the programs; a does not yet.
    lab.node().run(|| {
        for (obj, (name, _)) in &interfaces {
            if obj.name != "a" {
                enforcer.attach(name).expect("attach");
            }
        }
    });

    let b_ns = lab.netns_of("default/b").expect("b netns");
    let sock = b_ns.run(|| UdpSocket::bind(("0.0.0.0", PORT)).expect("bind in b"));
    let round = |n: u32| {
        send(&lab, "c", C, &format!("c-{n}"));
        send(&lab, "a", A, &format!("a-{n}"));
        send(&lab, "a", &node_v4, &format!("a-as-node-{n}"));
        send(&lab, "a", C, &format!("a-as-c-{n}"));
        received(&sock, Duration::from_millis(800))
    };

    // 1. a's interface unchecked: b's ingress check takes the node's address for host traffic
    //    and c's for c. Only a's genuine datagram is refused (b admits c only).
    let got = round(1);
    assert_eq!(
        got,
        set(&["c-1", "a-as-node-1", "a-as-c-1"]),
        "without the source check the spoofed datagrams reach b"
    );

    // 2. With npm_from_pod on a's interface: both spoofs drop at a's interface, counted there;
    //    c's genuine datagram still arrives.
    let counters = enforcer.counters().expect("counters");
    let before = spoofed(&counters);
    lab.node().run(|| {
        enforcer.attach(&a_if).expect("attach a");
    });
    let got = round(2);
    assert_eq!(got, set(&["c-2"]), "the spoofed datagrams are dropped");
    assert!(spoofed(&counters) >= before + 2, "both counted as spoofed");
    drop(sock);
    drop(counters);
    drop(enforcer);
    drop(lab);
}

/// Egress packets counted as spoofed, over every slot.
fn spoofed(counters: &npm_agent::datapath::DatapathCounters) -> u64 {
    use npm_agent::datapath::CounterReader as _;
    counters
        .read()
        .expect("read counters")
        .iter()
        .filter(|c| c.dir == DIR_EGRESS && c.reason == REASON_DROP_SPOOFED)
        .map(|c| c.packets)
        .sum()
}
