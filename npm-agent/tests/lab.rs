//! Privileged lab tests: build real namespaces, serve, probe, tear down.
//!
//! They need root (CAP_NET_ADMIN, CAP_SYS_ADMIN for setns). Without it they fail (never
//! skip), naming what is missing.
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use npm_agent::lab::{External, Lab, LabSpec, Outcome, ProbeProtocol, ProbeResult, render_matrix};
use npm_agent::model::{ContainerPort, Pod, Protocol};
use npm_agent::netns;

#[path = "common/support.rs"]
mod support;

/// Panics unless this runs as root: a missing prerequisite fails the test, never skips it.
fn require_root() {
    support::require_root("lab tests");
    // Namespaces of earlier runs that were killed before their Drop (pid no longer alive).
    let stale = npm_agent::lab::cleanup_stale();
    if !stale.is_empty() {
        eprintln!("removed stale lab namespaces: {stale:?}");
    }
}

fn pod(name: &str, ports: &[(u16, Protocol)]) -> Pod {
    Pod {
        namespace: "default".into(),
        name: name.into(),
        labels: Default::default(),
        ips: vec![],
        node_name: Some("lab".into()),
        host_network: false,
        terminating: false,
        finished: false,
        ports: ports
            .iter()
            .map(|&(port, protocol)| ContainerPort {
                name: None,
                port,
                protocol,
            })
            .collect(),
    }
}

const PORTS: [(u16, Protocol); 3] = [
    (80, Protocol::Tcp),
    (53, Protocol::Udp),
    (9000, Protocol::Sctp),
];

fn assert_gone(names: &[String]) {
    let left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

fn denied(results: &[ProbeResult]) -> BTreeSet<(String, String, u16, Protocol)> {
    let kube = |p: ProbeProtocol| match p {
        ProbeProtocol::Tcp => Protocol::Tcp,
        ProbeProtocol::Udp => Protocol::Udp,
        ProbeProtocol::Sctp => Protocol::Sctp,
        ProbeProtocol::Icmp => panic!("no ICMP probes in this test"),
    };
    results
        .iter()
        .filter(|r| !r.allowed)
        .map(|r| (r.from.clone(), r.to.clone(), r.port, kube(r.protocol)))
        .collect()
}

#[test]
fn all_allowed_then_one_pod_blocked() {
    require_root();
    let ext_ip: IpAddr = "203.0.113.10".parse().unwrap();
    let spec = LabSpec {
        pods: vec![pod("a", &PORTS), pod("b", &PORTS), pod("c", &PORTS)],
        externals: vec![External {
            ip: ext_ip,
            ports: vec![(443, Protocol::Tcp)],
        }],
    };
    let start = Instant::now();
    let mut lab = Lab::build(spec).expect("build lab");
    eprintln!("built in {:?}", start.elapsed());
    let names = lab.namespaces();
    assert_eq!(names.len(), 5);
    assert!(names.iter().all(|n| n.starts_with(lab.prefix())));

    // Every pod got both families; every pod has an interface in the node netns.
    for p in lab.pods() {
        assert_eq!(p.ips.len(), 2, "{p:?}");
    }
    let ifs = lab.pod_interfaces();
    assert_eq!(ifs.len(), 3);
    let node_links = lab.node().ip(&["-o", "link", "show"]).unwrap();
    for (name, index) in ifs.values() {
        assert!(
            node_links.contains(&format!("{index}: {name}@")),
            "{node_links}"
        );
    }
    assert_eq!(lab.node_ips().len(), 2);

    // 4 sources × (3 pods × 3 ports + 1 external port).
    let start = Instant::now();
    let results = lab.probe_all();
    let took = start.elapsed();
    eprintln!(
        "{}probe_all: {} probes in {took:?}",
        render_matrix(&results),
        results.len()
    );
    assert_eq!(results.len(), 4 * (3 * 3 + 1));
    let not_allowed: Vec<_> = results.iter().filter(|r| !r.allowed).collect();
    assert!(
        not_allowed.is_empty(),
        "denied without enforcement: {not_allowed:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "all-allowed matrix took {took:?}"
    );

    // Single probes: allowed, an unknown name, a port nothing serves.
    let r = lab.probe("default/a", "default/b", 9000, Protocol::Sctp);
    assert!(r.allowed, "{r:?}");
    let r = lab.probe("default/a", "default/nope", 80, Protocol::Tcp);
    assert!(
        !r.allowed && matches!(r.outcome, Outcome::Error(_)),
        "{r:?}"
    );
    // Nothing serves TCP 81: refused, not timed out.
    let r = lab.probe("default/a", "default/b", 81, Protocol::Tcp);
    assert_eq!(r.outcome, Outcome::Refused, "{r:?}");

    let b = lab.pods().iter().find(|p| p.name == "b").unwrap().clone();
    let (b_if, _) = lab.pod_interfaces()[&b.obj_ref()].clone();
    let others = ["default/a", "default/c", "203.0.113.10"];
    let to_b = |from: &str| {
        PORTS
            .iter()
            .map(move |&(port, proto)| (from.to_owned(), "default/b".to_owned(), port, proto))
            .collect::<Vec<_>>()
    };

    // 1. Drop new connections to b's ports in the node netns. Neither iptables/nft nor tc
    //    actions exist on every machine of ours, so: policy-routing rules with a blackhole
    //    action, matched on protocol and destination port (replies to b's own probes go to
    //    its ephemeral ports and pass).
    let rules: Vec<Vec<String>> = b
        .ips
        .iter()
        .flat_map(|ip| {
            PORTS.iter().map(move |&(port, proto)| {
                let proto = proto.number().to_string();
                let family = if ip.is_ipv4() { "-4" } else { "-6" };
                [
                    family,
                    "rule",
                    "add",
                    "to",
                    &ip.to_string(),
                    "ipproto",
                    &proto,
                    "dport",
                    &port.to_string(),
                    "blackhole",
                ]
                .map(str::to_owned)
                .to_vec()
            })
        })
        .collect();
    for rule in &rules {
        let args: Vec<&str> = rule.iter().map(String::as_str).collect();
        lab.node()
            .ip(&args)
            .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    }
    let start = Instant::now();
    let results = lab.probe_all();
    let took = start.elapsed();
    eprintln!(
        "{}b's ports blackholed: {} probes in {took:?}",
        render_matrix(&results),
        results.len()
    );
    assert_eq!(results.len(), 4 * (3 * 3 + 1));
    let expected: BTreeSet<_> = others.iter().flat_map(|f| to_b(f)).collect();
    assert_eq!(denied(&results), expected);
    for r in results.iter().filter(|r| !r.allowed) {
        assert_eq!(r.outcome, Outcome::Timeout, "{r:?}");
    }
    assert!(
        took < Duration::from_secs(5),
        "blocked matrix took {took:?}"
    );
    // The same over IPv6 between the dual-stack endpoints (the external is IPv4 only).
    lab.set_prefer_ipv6(true);
    let results = lab.probe_all();
    assert_eq!(denied(&results), expected, "{}", render_matrix(&results));
    lab.set_prefer_ipv6(false);
    for rule in &rules {
        let mut args: Vec<&str> = rule.iter().map(String::as_str).collect();
        args[2] = "del";
        lab.node()
            .ip(&args)
            .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    }

    // 2. Drop every packet the node sends to b: a root pfifo of length 0 on b's veth. Now
    //    the replies to b's own probes die too; only b's probes of itself still pass.
    lab.node()
        .exec(&[
            "tc", "qdisc", "add", "dev", &b_if, "root", "pfifo", "limit", "0",
        ])
        .unwrap_or_else(|e| panic!("tc in the node netns: {e}"));
    let results = lab.probe_all();
    eprintln!("{}b's veth dropping", render_matrix(&results));
    let mut expected = expected;
    for to in ["default/a", "default/c"] {
        for &(port, proto) in &PORTS {
            expected.insert(("default/b".to_owned(), to.to_owned(), port, proto));
        }
    }
    expected.insert((
        "default/b".to_owned(),
        "203.0.113.10".to_owned(),
        443,
        Protocol::Tcp,
    ));
    assert_eq!(denied(&results), expected);

    // 3. Lift it: everything passes again.
    lab.node()
        .exec(&["tc", "qdisc", "del", "dev", &b_if, "root"])
        .unwrap_or_else(|e| panic!("tc in the node netns: {e}"));
    let results = lab.probe_all();
    assert!(denied(&results).is_empty(), "{}", render_matrix(&results));

    drop(lab);
    assert_gone(&names);
}

#[test]
fn ipv6_only_and_given_ips() {
    require_root();
    let mut a = pod(
        "a",
        &[
            (8080, Protocol::Tcp),
            (5353, Protocol::Udp),
            (7, Protocol::Sctp),
        ],
    );
    a.ips = vec!["fd00:10:244::100".parse().unwrap()];
    let mut b = pod("b", &[(8080, Protocol::Tcp)]);
    b.ips = vec!["10.1.2.3".parse().unwrap()];
    let spec = LabSpec {
        pods: vec![a, b, pod("c", &[(8080, Protocol::Tcp)])],
        externals: vec![External {
            ip: "2001:db8:ff::1".parse().unwrap(),
            ports: vec![(53, Protocol::Udp), (9, Protocol::Sctp)],
        }],
    };
    let lab = Lab::build(spec).expect("build lab");
    let names = lab.namespaces();
    let results = lab.probe_all();
    eprintln!("{}", render_matrix(&results));
    let find = |from: &str, to: &str, port: u16| {
        results
            .iter()
            .find(|r| r.from == from && r.to == to && r.port == port)
            .unwrap_or_else(|| panic!("no probe {from} -> {to}:{port}"))
            .clone()
    };
    // v6-only a and v4-only b share no family.
    assert_eq!(
        find("default/a", "default/b", 8080).outcome,
        Outcome::NoCommonFamily
    );
    assert_eq!(
        find("default/b", "default/a", 8080).outcome,
        Outcome::NoCommonFamily
    );
    // Everything over IPv6 works: pod -> pod, pod -> external, external -> pod.
    for (from, to, port) in [
        ("default/a", "default/a", 7),
        ("default/c", "default/a", 8080),
        ("default/c", "default/a", 5353),
        ("default/c", "default/a", 7),
        ("default/a", "2001:db8:ff::1", 53),
        ("default/c", "2001:db8:ff::1", 9),
        ("2001:db8:ff::1", "default/a", 7),
        ("default/b", "default/c", 8080),
    ] {
        let r = find(from, to, port);
        assert!(r.allowed, "{r:?}");
    }
    drop(lab);
    assert_gone(&names);
}

#[test]
fn pings_and_a_host_network_pod() {
    require_root();
    let mut h = pod("h", &[(10250, Protocol::Tcp), (53, Protocol::Udp)]);
    h.host_network = true;
    h.ips = vec!["10.240.0.4".parse().unwrap()]; // a real node's address: ignored in the lab
    let mut v6 = pod("v6", &[(80, Protocol::Tcp)]);
    v6.ips = vec!["fd00:10:244::200".parse().unwrap()];
    let spec = LabSpec {
        pods: vec![pod("a", &PORTS), h, v6],
        externals: vec![External {
            ip: "203.0.113.10".parse().unwrap(),
            ports: vec![(443, Protocol::Tcp)],
        }],
    };
    let mut lab = Lab::build(spec).expect("build lab");
    let names = lab.namespaces();
    // The hostNetwork pod has no namespace and no interface of its own: it is the node.
    assert_eq!(names.len(), 4, "{names:?}");
    assert_eq!(lab.pod_interfaces().len(), 2);
    assert_eq!(
        lab.netns_of("default/h").map(|n| n.name().to_owned()),
        Some(lab.node().name().to_owned())
    );
    assert_eq!(lab.pods()[1].ips, lab.node_ips());
    lab.set_probe_icmp(true);
    let results = lab.probe_all();
    eprintln!("{}", render_matrix(&results));
    // 4 sources × (a: 3 ports, h: 2, v6: 1, external: 1, + one ping to each of the 4).
    assert_eq!(results.len(), 4 * (3 + 2 + 1 + 1 + 4));
    for r in &results {
        // v6-only pod and v4-only external share no family; everything else answers.
        let apart = [r.from.as_str(), r.to.as_str()].contains(&"default/v6")
            && [r.from.as_str(), r.to.as_str()].contains(&"203.0.113.10");
        if apart {
            assert_eq!(r.outcome, Outcome::NoCommonFamily, "{r:?}");
        } else {
            assert!(r.allowed, "{r:?}");
        }
    }
    let pings = results
        .iter()
        .filter(|r| r.protocol == ProbeProtocol::Icmp && r.port == 0)
        .count();
    assert_eq!(pings, 16);
    // A ping whose reply is lost times out: a root pfifo of length 0 on a's own eth0 drops
    // everything a sends (inside a, so the prober's socket sees no local drop error).
    lab.netns_of("default/a")
        .expect("a")
        .exec(&[
            "tc", "qdisc", "add", "dev", "eth0", "root", "pfifo", "limit", "0",
        ])
        .unwrap_or_else(|e| panic!("tc: {e}"));
    let r = lab.probe("default/h", "default/a", 0, ProbeProtocol::Icmp);
    assert_eq!(r.outcome, Outcome::Timeout, "{r:?}");
    drop(lab);
    assert_gone(&names);
}

#[test]
fn invalid_spec_and_empty_lab() {
    require_root();
    let mut a = pod("a", &PORTS);
    a.ips = vec!["192.0.2.1".parse().unwrap()]; // the node's own address
    let err = Lab::build(LabSpec {
        pods: vec![a],
        externals: vec![],
    })
    .err()
    .expect("duplicate address must fail");
    assert_eq!(err.metric_label(), "duplicate_ip");

    // An external with no ports: a source only, nothing to probe.
    let lab = Lab::build(LabSpec {
        pods: vec![],
        externals: vec![External {
            ip: "198.51.100.1".parse().unwrap(),
            ports: vec![],
        }],
    })
    .expect("build a lab with one external only");
    let names = lab.namespaces();
    assert_eq!(names.len(), 2);
    assert!(lab.probe_all().is_empty());
    drop(lab);
    assert_gone(&names);

    // A panic while a lab runs (a failing test) still removes it while unwinding.
    let names = std::sync::Mutex::new(Vec::new());
    let caught = std::panic::catch_unwind(|| {
        let lab = Lab::build(LabSpec {
            pods: vec![pod("a", &PORTS)],
            externals: vec![],
        })
        .expect("build lab");
        *names.lock().unwrap() = lab.namespaces();
        panic!("on purpose, with the lab alive");
    });
    assert!(caught.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    assert_gone(&names);
}

/// The size the lead's scenarios use: 9 pods × 6 ports and 2 externals. Measures a fully
/// allowed matrix and a fully dropped one (every veth of the node dropping).
#[test]
fn nine_pods_six_ports_timing() {
    require_root();
    let ports = [
        (80, Protocol::Tcp),
        (8080, Protocol::Tcp),
        (53, Protocol::Udp),
        (5353, Protocol::Udp),
        (9000, Protocol::Sctp),
        (9001, Protocol::Sctp),
    ];
    let pods: Vec<Pod> = (0..9).map(|i| pod(&format!("p{i}"), &ports)).collect();
    let externals = vec![
        External {
            ip: "203.0.113.1".parse().unwrap(),
            ports: vec![(443, Protocol::Tcp), (53, Protocol::Udp)],
        },
        External {
            ip: "2001:db8:1::1".parse().unwrap(),
            ports: vec![(443, Protocol::Tcp)],
        },
    ];
    let start = Instant::now();
    let lab = Lab::build(LabSpec { pods, externals }).expect("build lab");
    let built = start.elapsed();
    let names = lab.namespaces();
    // 11 sources × (9 × 6 pod ports + 3 external ports).
    let expected = 11 * (9 * 6 + 3);

    let start = Instant::now();
    let results = lab.probe_all();
    let allowed_took = start.elapsed();
    assert_eq!(results.len(), expected);
    // Pods are dual-stack, so only probes between the v4 and the v6 external lack a common
    // family (v4 -> v6: 443; v6 -> v4: 443 and 53).
    let bad: Vec<_> = results
        .iter()
        .filter(|r| !r.allowed && r.outcome != Outcome::NoCommonFamily)
        .collect();
    assert!(bad.is_empty(), "{}", render_matrix(&results));
    let no_family = results
        .iter()
        .filter(|r| r.outcome == Outcome::NoCommonFamily)
        .count();
    assert_eq!(no_family, 3, "{}", render_matrix(&results));

    for (name, _) in lab.pod_interfaces().values() {
        lab.node()
            .exec(&[
                "tc", "qdisc", "add", "dev", name, "root", "pfifo", "limit", "0",
            ])
            .unwrap_or_else(|e| panic!("tc: {e}"));
    }
    let start = Instant::now();
    let results = lab.probe_all();
    let denied_took = start.elapsed();
    assert_eq!(results.len(), expected);
    // Only a pod's probes of itself, and externals to each other, still pass.
    for r in &results {
        let self_probe = r.from == r.to;
        let ext_to_ext = !r.from.contains('/') && !r.to.contains('/');
        let expect_allowed = self_probe || (ext_to_ext && r.outcome != Outcome::NoCommonFamily);
        assert_eq!(r.allowed, expect_allowed, "{r:?}");
    }
    eprintln!(
        "9 pods × 6 ports + 2 externals: built in {built:?}; {expected} probes all allowed in \
         {allowed_took:?}; mostly dropped in {denied_took:?}"
    );
    assert!(built < Duration::from_secs(10), "build took {built:?}");
    assert!(allowed_took < Duration::from_secs(3), "{allowed_took:?}");
    assert!(denied_took < Duration::from_secs(6), "{denied_took:?}");
    drop(lab);
    assert_gone(&names);
}

#[test]
fn netns_guard() {
    require_root();
    let name = format!("npmlab-{}-nstest", std::process::id());
    let mut ns = netns::NetNs::create(&name).expect("create netns");
    assert!(netns::list().contains(&name));
    assert_eq!(ns.path(), std::path::Path::new("/run/netns").join(&name));
    assert!(
        netns::NetNs::create(&name).is_err(),
        "a second create must fail"
    );
    // A thread inside sees only the namespace's own loopback (/proc/net is the thread group
    // leader's view: read /proc/thread-self/net).
    let links = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/dev").unwrap());
    let ifaces: Vec<&str> = links
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"], "{links}");
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    let out = ns.exec(&["ip", "-o", "addr", "show", "dev", "lo"]).unwrap();
    assert!(out.contains("127.0.0.1"), "{out}");
    assert!(ns.exec(&["false"]).is_err());
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let fwd = ns.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap());
    assert_eq!(fwd.trim(), "1");
    ns.delete().unwrap();
    ns.delete().unwrap();
    assert!(!netns::list().contains(&name));
    assert!(ns.try_run(|| ()).is_err());
    drop(ns);
    assert!(netns::NetNs::create("bad/name").is_err());
}
