//! Fragmented datagrams with real packets between namespaces: an ingress-isolated pod asks a
//! server for a 3000-byte UDP answer (a DNS answer with EDNS is as large), which the server's
//! stack sends as three IPv4 fragments over the 1500-byte links of the lab. The first fragment
//! carries the ports and is a reply of the pod's flow; the later ones carry none and pass
//! only on the first fragment's verdict (`NPM_FRAGS`). Privileged (root).
#[path = "common/support.rs"]
mod support;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use npm_agent::enforcer::Enforcer;
use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::{Policy, Selector};
use npm_agent::state::ClusterSnapshot;
use support::pod;

const A: &str = "10.249.0.2";
const B: &str = "10.249.0.3";
const PORT: u16 = 5300;

/// a admits no new flow in (replies of its own flows still pass).
fn a_isolated() -> Policy {
    Policy {
        namespace: "default".into(),
        name: "a-deny-ingress".into(),
        pod_selector: Selector {
            match_labels: [("app".to_string(), "a".to_string())].into(),
            ..Default::default()
        },
        ingress: Some(vec![]),
        egress: None,
    }
}

/// a asks b (one small datagram); b answers `size` bytes. What a reads within 2 s: the
/// answer's length, or None.
fn ask(client: &UdpSocket, server: &UdpSocket, size: usize) -> Option<usize> {
    let to: SocketAddr = format!("{B}:{PORT}").parse().expect("addr");
    client.send_to(b"query", to).expect("send the query");
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let (_, from) = server.recv_from(&mut buf).expect("b receives the query");
    server
        .send_to(&vec![0x5a; size], from)
        .expect("b sends the answer");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut answer = vec![0u8; 65536];
    client.recv(&mut answer).ok()
}

#[test]
fn a_fragmented_udp_answer_reaches_an_ingress_isolated_pod() {
    support::require_root("fragment test");
    let pods = vec![pod("a", "a", A), pod("b", "b", B)];
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
    snapshot
        .policies
        .insert(a_isolated().obj_ref(), a_isolated());
    let interfaces = lab.pod_interfaces();
    snapshot.local = interfaces
        .iter()
        .map(|(k, (_, i))| (k.clone(), *i))
        .collect();
    snapshot.node_ips = lab.node_ips();

    let mut enforcer = Enforcer::new(None).expect("datapath");
    let r = enforcer.apply(&snapshot);
    assert_eq!(r.sync.failed, 0);
    assert!(r.diagnostics.is_empty(), "{:?}", r.diagnostics);
    lab.node().run(|| {
        for (name, _) in interfaces.values() {
            enforcer.attach(name).expect("attach");
        }
    });

    let a_ns = lab.netns_of("default/a").expect("a netns");
    let b_ns = lab.netns_of("default/b").expect("b netns");
    let client = a_ns.run(|| UdpSocket::bind((A, 0)).expect("bind in a"));
    let server = b_ns.run(|| UdpSocket::bind(("0.0.0.0", PORT)).expect("bind in b"));
    // The links are 1500 bytes: 1000 bytes go in one packet, 3000 in three fragments.
    let mtu = b_ns.ip(&["-o", "link", "show", "eth0"]).expect("ip link");
    assert!(mtu.contains("mtu 1500"), "b's link: {mtu}");
    assert_eq!(
        ask(&client, &server, 1000),
        Some(1000),
        "an unfragmented answer"
    );
    assert_eq!(
        ask(&client, &server, 3000),
        Some(3000),
        "the fragmented answer arrives whole"
    );
    // A new flow into a is still refused: b's datagram to a port a did not ask from.
    let stranger = a_ns.run(|| UdpSocket::bind((A, PORT + 1)).expect("bind in a"));
    server
        .send_to(b"unasked", format!("{A}:{}", PORT + 1))
        .expect("send");
    stranger
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    assert!(stranger.recv(&mut buf).is_err(), "a stays ingress-isolated");
    drop((client, server, stranger));
    drop(enforcer);
    drop(lab);
}
