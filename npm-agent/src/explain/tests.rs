use std::path::{Path, PathBuf};

use super::*;
use crate::compiler::{IdAllocator, compile};
use crate::expect::Expectation;
use crate::lab::{LabSpec, topology};
use crate::source::manifests;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A scenario as the lab builds it (`cli::lab::Rig::round`): the lab's addresses, every
/// non-hostNetwork pod behind an interface of one node, the node's addresses, the Services'
/// ClusterIPs as the Service ranges; compiled, with the lab's endpoint plan.
struct Scenario {
    state: State,
    plan: topology::Plan,
    expect: Expectation,
}

fn scenario(dir: &Path) -> Scenario {
    let loader = manifests::read_dir_into(dir, manifests::Loader::default())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let services = loader.services();
    let (mut snapshot, _) = loader.finish();
    let text = std::fs::read_to_string(dir.join("expect")).expect("expect file");
    let expect = Expectation::parse(&text).expect("expect parses");
    let pods: Vec<Pod> = snapshot.pods.values().cloned().collect();
    let externals = crate::cli::lab::externals(&pods, expect.externals.iter());
    let plan = topology::plan(&LabSpec { pods, externals }, "explain").expect("lab plan");
    for built in &plan.pods {
        let pod = snapshot
            .pods
            .get_mut(&built.obj_ref())
            .expect("planned pod");
        pod.ips = built.ips.clone();
    }
    snapshot.local = plan
        .pods
        .iter()
        .filter(|p| !p.host_network)
        .enumerate()
        .map(|(i, p)| (p.obj_ref(), 100 + i as u32))
        .collect();
    snapshot.node_ips = topology::node_ips();
    snapshot.service_cidrs = services
        .iter()
        .flat_map(|s| s.cluster_ips.iter().map(|ip| ipnet::IpNet::from(*ip)))
        .collect();
    let compiled = compile(&snapshot, &mut IdAllocator::default());
    Scenario {
        state: State::offline(compiled, snapshot),
        plan,
        expect,
    }
}

/// Which (prefer IPv6, ICMP too) runs `npm-agent/tests/lab_scenarios.rs` makes of a scenario.
fn modes(name: &str) -> &'static [(bool, bool)] {
    match name {
        "icmp-only-without-ports" | "node-and-host-network" => &[(false, true), (true, true)],
        "ipv6-ipblock-except" => &[(true, false)],
        _ => &[(false, false)],
    }
}

/// Every probe the lab makes of the scenario (source × destination × the destination's ports,
/// and ICMP echo when asked; not the Service probes, which explain refuses), explained, and
/// compared with the `expect` file. Returns (allowed, denied) counts.
fn check_scenario(dir: &Path, prefer_v6: bool, icmp: bool) -> (usize, usize, Vec<String>) {
    let s = scenario(dir);
    let eps = &s.plan.endpoints;
    let (mut allowed, mut denied, mut wrong) = (0, 0, Vec::new());
    for src in eps {
        for dst in eps {
            let mut probes: Vec<(u16, ProbeProtocol)> =
                dst.ports.iter().map(|(p, pr)| (*p, (*pr).into())).collect();
            if icmp {
                probes.push((0, ProbeProtocol::Icmp));
            }
            for (port, protocol) in probes {
                // The lab's choice of family (`Lab::task`): over IPv6 the sides are given by
                // address (so resolution by address is exercised too), else by name.
                let (from, to) = if prefer_v6 {
                    let pick = |v4: bool| {
                        let f = src.ips.iter().find(|a| a.is_ipv4() == v4)?;
                        let t = dst.ips.iter().find(|a| a.is_ipv4() == v4)?;
                        Some((f.to_string(), t.to_string()))
                    };
                    match pick(false).or_else(|| pick(true)) {
                        Some(p) => p,
                        None => (src.label.clone(), dst.label.clone()),
                    }
                } else {
                    (src.label.clone(), dst.label.clone())
                };
                let q = Query {
                    from,
                    to,
                    protocol,
                    port: (protocol != ProbeProtocol::Icmp).then_some(port),
                };
                let got = match s.state.explain(&q) {
                    Ok(e) => e.verdict == Verdict::Allowed,
                    // Nothing can be sent: the lab's probe reports it denied.
                    Err(ExplainError::NoCommonFamily { .. }) => false,
                    Err(e) => panic!("{}: {q:?}: {e}", dir.display()),
                };
                let want = s.expect.expected(&src.label, &dst.label, port, protocol);
                if want != Some(got) {
                    wrong.push(format!(
                        "{} -> {} {port}/{}: expect {want:?}, explain says {}",
                        src.label,
                        dst.label,
                        protocol.as_str(),
                        if got { "allowed" } else { "denied" }
                    ));
                }
                if got {
                    allowed += 1;
                } else {
                    denied += 1;
                }
            }
        }
    }
    (allowed, denied, wrong)
}

#[test]
fn explain_agrees_with_every_lab_scenarios_expectations() {
    let mut dirs = vec![repo().join("examples/azure-npm")];
    let mut found: Vec<PathBuf> = std::fs::read_dir(repo().join("tests/scenarios"))
        .expect("tests/scenarios")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("expect").is_file())
        .collect();
    found.sort();
    assert!(found.len() >= 18, "scenarios found: {found:?}");
    dirs.extend(found);
    let mut wrong = Vec::new();
    let mut total = 0;
    for dir in &dirs {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        for &(v6, icmp) in modes(name) {
            let (a, d, w) = check_scenario(dir, v6, icmp);
            assert!(
                a > 0 && d > 0,
                "{name} (v6 {v6}, icmp {icmp}): {a} allowed, {d} denied: the policies decide nothing?"
            );
            total += a + d;
            wrong.extend(w.into_iter().map(|w| format!("{name} (v6 {v6}): {w}")));
        }
    }
    assert!(total > 500, "only {total} flows explained");
    assert!(
        wrong.is_empty(),
        "{} of {total} flows differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

fn azure() -> Scenario {
    scenario(&repo().join("examples/azure-npm"))
}

fn ask(s: &State, from: &str, to: &str, port: Option<u16>, proto: ProbeProtocol) -> Explanation {
    s.explain(&Query {
        from: from.into(),
        to: to.into(),
        protocol: proto,
        port,
    })
    .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"))
}

#[test]
fn an_allow_names_the_rule_the_peer_and_the_isolating_policies() {
    let s = azure();
    let e = ask(
        &s.state,
        "default/busybox",
        "default/src-ip-internal",
        Some(8080),
        ProbeProtocol::Tcp,
    );
    assert_eq!(e.verdict, Verdict::Allowed);
    assert_eq!(e.view, View::AllPodsLocal);
    // restrict-instance-metadata isolates every pod's egress; its ipBlock holds pod addresses.
    assert_eq!(e.egress.verdict, CheckVerdict::Allowed);
    assert_eq!(
        e.egress.peer.as_ref().map(|p| p.via.as_str()),
        Some("cidr_class")
    );
    let i = &e.ingress;
    assert_eq!(i.verdict, CheckVerdict::Allowed, "{i:?}");
    assert_eq!(i.pod.as_deref(), Some("default/src-ip-internal"));
    let rule = i.rule.as_ref().expect("the rule");
    assert_eq!(
        (rule.policy.as_str(), rule.direction.as_str(), rule.index),
        ("default/allow-src-ip", "ingress", 0)
    );
    let peer = i.peer.as_ref().expect("the peer");
    assert_eq!(peer.via, "identity");
    assert_eq!(
        peer.matched,
        vec![RulePeer {
            index: Some(0),
            peer: "podSelector {app=busybox}".into()
        }]
    );
    let isolating: Vec<&str> = i.isolated_by.iter().map(|p| p.policy.as_str()).collect();
    assert!(
        isolating.contains(&"default/allow-src-ip")
            && isolating.contains(&"default/deny-all-inbound"),
        "{isolating:?}"
    );

    // Another port of the same pair: denied, by the same isolating policies.
    let e = ask(
        &s.state,
        "default/busybox",
        "default/src-ip-internal",
        Some(8081),
        ProbeProtocol::Tcp,
    );
    assert_eq!(e.verdict, Verdict::Denied);
    assert_eq!(e.ingress.verdict, CheckVerdict::Denied);
    assert!(e.ingress.rule.is_none() && e.ingress.peer.is_none());
    assert!(
        e.ingress.why.contains("default/deny-all-inbound"),
        "{}",
        e.ingress.why
    );
}

#[test]
fn ipblock_allows_name_the_block_and_egress_denials_the_egress_policy() {
    let s = azure();
    // restrict-instance-metadata: egress to anything but 169.254.169.254/32.
    let e = ask(
        &s.state,
        "default/busybox",
        "203.0.113.10",
        Some(8080),
        ProbeProtocol::Tcp,
    );
    assert_eq!(e.verdict, Verdict::Allowed, "{e:#?}");
    assert_eq!(e.ingress.verdict, CheckVerdict::NoEndpoint);
    let peer = e.egress.peer.as_ref().expect("peer");
    assert_eq!(peer.via, "cidr_class");
    assert!(
        peer.matched.iter().any(|m| m
            .peer
            .starts_with("ipBlock 0.0.0.0/0 except 169.254.169.254/32")),
        "{peer:?}"
    );
    let e = ask(
        &s.state,
        "default/busybox",
        "169.254.169.254",
        Some(80),
        ProbeProtocol::Tcp,
    );
    assert_eq!(e.verdict, Verdict::Denied);
    assert_eq!(e.egress.verdict, CheckVerdict::Denied);
    assert_eq!(
        e.egress
            .isolated_by
            .iter()
            .map(|p| p.policy.as_str())
            .collect::<Vec<_>>(),
        vec!["default/restrict-instance-metadata"]
    );
}

#[test]
fn pairs_with_more_than_four_entries_are_decided_by_the_policy_trie() {
    // endport-range: a range splits into many power-of-two blocks: the pair says PAIR_TRIE.
    let s = scenario(&repo().join("tests/scenarios/endport-range"));
    let trie_pairs = s
        .state
        .maps
        .pairs
        .values()
        .filter(|v| v.flags & PAIR_TRIE != 0)
        .count();
    assert!(
        trie_pairs > 0,
        "the scenario no longer has a PAIR_TRIE pair"
    );
    // The scenario-wide comparison covers the verdicts; here: each allow through a trie pair
    // names a rule, so the longest-prefix walk found a real entry.
    let mut via_trie = 0;
    for src in &s.plan.endpoints {
        for dst in &s.plan.endpoints {
            for (port, proto) in &dst.ports {
                let Ok(e) = s.state.explain(&Query {
                    from: src.label.clone(),
                    to: dst.label.clone(),
                    protocol: (*proto).into(),
                    port: Some(*port),
                }) else {
                    continue;
                };
                for c in [&e.egress, &e.ingress] {
                    if c.verdict == CheckVerdict::Allowed {
                        assert!(c.rule.is_some(), "{c:?}");
                        assert!(!c.peer.as_ref().expect("peer").matched.is_empty(), "{c:?}");
                        via_trie += 1;
                    }
                }
            }
        }
    }
    assert!(via_trie > 0);
}

#[test]
fn lpm_lookups_follow_the_kernel_tries_prefix_semantics() {
    let mut m = BTreeMap::new();
    let mut a = addr16("10.1.0.0".parse().unwrap());
    m.insert((96 + 16, a), 7);
    a = addr16("10.1.2.0".parse().unwrap());
    m.insert((96 + 24, a), 8);
    assert_eq!(lpm_addr(&m, &addr16("10.1.2.3".parse().unwrap())), Some(8));
    assert_eq!(lpm_addr(&m, &addr16("10.1.3.3".parse().unwrap())), Some(7));
    assert_eq!(lpm_addr(&m, &addr16("10.2.0.1".parse().unwrap())), None);

    // POLICY: a port block 8192/83 (8192..=16383 of TCP) and any protocol.
    let key = |proto: u8, port: u16| PolicyKey {
        local_id: 1,
        peer_id: 2,
        dir: DIR_INGRESS,
        proto,
        dport_be: port.to_be(),
    };
    let mut p = BTreeMap::new();
    let v = |r| PolicyValue {
        rule_ref: r,
        flags: 0,
    };
    p.insert((83, key(6, 8192)), v(1));
    assert_eq!(lpm_policy(&p, &key(6, 8192)), Some(v(1)));
    assert_eq!(lpm_policy(&p, &key(6, 16383)), Some(v(1)));
    assert_eq!(lpm_policy(&p, &key(6, 16384)), None);
    assert_eq!(lpm_policy(&p, &key(6, 8191)), None);
    assert_eq!(lpm_policy(&p, &key(17, 8192)), None);
    p.insert((72, key(0, 0)), v(2));
    assert_eq!(lpm_policy(&p, &key(17, 8192)), Some(v(2)));
    assert_eq!(
        lpm_policy(&p, &key(6, 9000)),
        Some(v(1)),
        "the longest prefix wins"
    );
}

#[test]
fn bad_input_names_what_is_wrong() {
    let s = azure().state;
    let q = |from: &str, to: &str, port: Option<u16>, protocol| Query {
        from: from.into(),
        to: to.into(),
        protocol,
        port,
    };
    let tcp = ProbeProtocol::Tcp;
    assert_eq!(
        s.explain(&q("default/nope", "default/busybox", Some(80), tcp)),
        Err(ExplainError::UnknownPod {
            which: "--from",
            pod: "default/nope".into()
        })
    );
    let e = s
        .explain(&q("default/busybox", "10.0.0.300", Some(80), tcp))
        .expect_err("bad IP");
    assert_eq!(
        e.to_string(),
        "--to \"10.0.0.300\": expected NAMESPACE/POD or an IP address"
    );
    assert!(matches!(
        s.explain(&q("default/busybox", "default/other", None, tcp)),
        Err(ExplainError::MissingPort { protocol: "TCP" })
    ));
    assert!(matches!(
        s.explain(&q(
            "default/busybox",
            "default/other",
            Some(1),
            ProbeProtocol::Icmp
        )),
        Err(ExplainError::PortWithIcmp)
    ));
    assert!(matches!(
        s.explain(&q("203.0.113.10", "2001:db8::99", Some(80), tcp)),
        Err(ExplainError::NoCommonFamily { .. })
    ));
    assert!(parse_protocol("udp").is_ok());
    assert!(matches!(
        parse_protocol("GRE"),
        Err(ExplainError::BadProtocol(_))
    ));
}

#[test]
fn the_node_view_marks_pods_of_other_nodes_remote() {
    let mut s = azure().state;
    s.view = View::Node;
    let busybox = ObjRef::new("default", "busybox");
    s.snapshot.local.remove(&busybox);
    // Recompile as that node: busybox is no longer local.
    let compiled = compile(&s.snapshot, &mut IdAllocator::default());
    let mut s = State::offline(compiled, s.snapshot);
    s.view = View::Node;
    let e = ask(
        &s,
        "default/busybox",
        "default/src-ip-internal",
        Some(8080),
        ProbeProtocol::Tcp,
    );
    assert_eq!(e.egress.verdict, CheckVerdict::Remote);
    assert_eq!(e.ingress.verdict, CheckVerdict::Allowed);
    assert_eq!(e.verdict, Verdict::Allowed);
    assert!(!e.complete);
}
