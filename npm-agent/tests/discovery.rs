//! Local-pod discovery against real kernel state: a bridged node (kube-router / Azure CNI
//! bridge mode) and a routed node (Calico-like), each built in network namespaces this test
//! creates and removes. Privileged (root).
use npm_agent::model::{Pod, Protocol};
use npm_agent::netns::NetNs;
use npm_agent::node::discovery::{NodeTables, local_pods, node_addresses};

fn pod(name: &str, ip: &str, node: Option<&str>) -> Pod {
    Pod {
        namespace: "default".into(),
        name: name.into(),
        labels: Default::default(),
        ips: vec![ip.parse().expect("ip")],
        node_name: node.map(str::to_string),
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![npm_agent::model::ContainerPort {
            name: None,
            port: 80,
            protocol: Protocol::Tcp,
        }],
    }
}

#[test]
fn bridged_and_routed_pods_are_found_behind_their_veths() {
    let pid = std::process::id();
    let node = NetNs::create(&format!("npmdisc-{pid}-node")).expect("node netns");
    let pa = NetNs::create(&format!("npmdisc-{pid}-a")).expect("pod a netns");
    let pb = NetNs::create(&format!("npmdisc-{pid}-b")).expect("pod b netns");

    // Bridged pod a: veth port of br0, pod address on the bridge subnet.
    node.ip(&["link", "add", "br0", "type", "bridge"])
        .expect("bridge");
    node.ip(&["addr", "add", "10.251.0.1/24", "dev", "br0"])
        .expect("addr");
    node.ip(&["link", "set", "br0", "up"]).expect("up");
    node.ip(&[
        "link",
        "add",
        "vetha",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pa.name(),
    ])
    .expect("veth a");
    node.ip(&["link", "set", "vetha", "master", "br0", "up"])
        .expect("enslave");
    pa.ip(&["addr", "add", "10.251.0.2/24", "dev", "eth0"])
        .expect("addr a");
    pa.ip(&["link", "set", "eth0", "up"]).expect("up a");
    pa.ip(&["link", "set", "lo", "up"]).expect("lo a");

    // Routed pod b: /32 route to its own veth.
    node.ip(&[
        "link",
        "add",
        "vethb",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pb.name(),
    ])
    .expect("veth b");
    node.ip(&["link", "set", "vethb", "up"]).expect("up b");
    node.ip(&["route", "add", "10.252.0.5/32", "dev", "vethb"])
        .expect("route b");
    pb.ip(&["addr", "add", "10.252.0.5/32", "dev", "eth0"])
        .expect("addr b");
    pb.ip(&["link", "set", "eth0", "up"]).expect("up b");

    // The bridge learns pod a's MAC and the node its neighbour entry: one ping, bounded.
    let out = node.exec(&["ping", "-c", "1", "-W", "2", "10.251.0.2"]);
    assert!(out.is_ok(), "ping over the bridge: {out:?}");

    let pods = [
        pod("a", "10.251.0.2", None),
        pod("b", "10.252.0.5", Some("node-1")),
        pod("elsewhere", "10.251.0.99", None),
        pod("other-node", "10.252.0.5", Some("node-2")),
    ];
    let (found, addrs) = node.run(|| {
        let tables = NodeTables::read().expect("read tables");
        (
            local_pods(&tables, pods.iter(), Some("node-1")),
            node_addresses().expect("addresses"),
        )
    });
    let names: Vec<(String, String)> = found
        .iter()
        .map(|(k, v)| (k.name.clone(), v.name.clone()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("a".to_string(), "vetha".to_string()),
            ("b".to_string(), "vethb".to_string())
        ],
        "bridged pod behind its bridge port, routed pod behind its veth; others not local"
    );
    assert!(
        addrs.contains(&"10.251.0.1".parse().expect("ip")),
        "node addresses: {addrs:?}"
    );
    drop((pa, pb, node));
    assert!(
        !npm_agent::netns::list()
            .iter()
            .any(|n| n.starts_with(&format!("npmdisc-{pid}-")))
    );
}
