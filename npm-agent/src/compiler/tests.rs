//! The compiler checked against a reference implementation of NetworkPolicy semantics:
//! random small clusters are compiled, the datapath's lookups are simulated over the
//! resulting maps, and every verdict must equal the reference's.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use npm_common::maps::{EP_ISOLATE_EGRESS, EP_ISOLATE_INGRESS, PEER_HOST, PROTO_ICMP, PolicyKey};
use npm_common::verdict::{DIR_EGRESS, DIR_INGRESS};

use super::*;
use crate::model::*;

// ---------- a tiny deterministic PRNG (no dependency needed) ----------
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
    fn coin(&mut self) -> bool {
        self.below(2) == 0
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn random_selector(r: &mut Rng) -> Selector {
    match r.below(5) {
        0 => Selector::default(),
        1 => Selector {
            match_labels: labels(&[("app", r.pick(&["a", "b", "c"]))]),
            ..Default::default()
        },
        2 => Selector {
            match_expressions: vec![Requirement {
                key: "tier".into(),
                op: r.pick(&[
                    SelectorOp::In,
                    SelectorOp::NotIn,
                    SelectorOp::Exists,
                    SelectorOp::DoesNotExist,
                ]),
                values: ["x".to_string()].into(),
            }],
            ..Default::default()
        },
        3 => Selector {
            match_labels: labels(&[("team", "red")]),
            ..Default::default()
        },
        _ => Selector {
            match_labels: labels(&[("app", r.pick(&["a", "b"]))]),
            match_expressions: vec![Requirement {
                key: "tier".into(),
                op: SelectorOp::NotIn,
                values: ["y".to_string()].into(),
            }],
        },
    }
}

/// A random pod named `name` whose addresses end in `i`.
fn random_pod(r: &mut Rng, name: &str, i: u8) -> Pod {
    let ns = r.pick(&["n1", "n2"]).to_string();
    let mut l = labels(&[("app", r.pick(&["a", "b", "c"]))]);
    if r.coin() {
        l.insert("tier".into(), r.pick(&["x", "y"]).to_string());
    }
    let mut ports = vec![ContainerPort {
        name: Some("http".into()),
        port: r.pick(&[80, 8080]),
        protocol: Protocol::Tcp,
    }];
    if r.coin() {
        ports.push(ContainerPort {
            name: Some("dns".into()),
            port: 85,
            protocol: Protocol::Udp,
        });
    }
    let mut ips: Vec<IpAddr> = vec![format!("10.0.0.{i}").parse().expect("ip")];
    if r.coin() {
        ips.push(format!("fd00::{i}").parse().expect("ip"));
    }
    Pod {
        namespace: ns.clone(),
        name: name.into(),
        labels: l,
        ips,
        node_name: None,
        host_network: false,
        terminating: false,
        finished: false,
        ports,
    }
}

/// A random policy named `name` in n1 or n2.
fn random_policy(r: &mut Rng, name: &str) -> Policy {
    let rules = |r: &mut Rng| -> Vec<Rule> {
        (0..r.below(3))
            .map(|_| {
                let peers = (0..r.below(3))
                    .map(|_| match r.below(5) {
                        0 => Peer::Pods {
                            namespace_selector: None,
                            pod_selector: Some(random_selector(r)),
                        },
                        1 => Peer::Pods {
                            namespace_selector: Some(random_selector(r)),
                            pod_selector: None,
                        },
                        2 => Peer::Pods {
                            namespace_selector: Some(random_selector(r)),
                            pod_selector: Some(random_selector(r)),
                        },
                        3 => Peer::IpBlock {
                            cidr: "10.0.0.0/29".parse().expect("net"),
                            except: vec!["10.0.0.2/31".parse().expect("net")],
                        },
                        _ => Peer::IpBlock {
                            cidr: r
                                .pick(&["::/0", "fd00::/126", "0.0.0.0/0"])
                                .parse()
                                .expect("net"),
                            except: vec![],
                        },
                    })
                    .collect();
                let ports = (0..r.below(3))
                    .map(|_| match r.below(5) {
                        0 => PortSpec {
                            protocol: Protocol::Tcp,
                            port: Some(PortRef::Number(80)),
                            end_port: None,
                        },
                        1 => PortSpec {
                            protocol: Protocol::Tcp,
                            port: Some(PortRef::Name("http".into())),
                            end_port: None,
                        },
                        2 => PortSpec {
                            protocol: Protocol::Udp,
                            port: Some(PortRef::Number(81)),
                            end_port: Some(90),
                        },
                        3 => PortSpec {
                            protocol: Protocol::Udp,
                            port: Some(PortRef::Name("dns".into())),
                            end_port: None,
                        },
                        _ => PortSpec {
                            protocol: Protocol::Tcp,
                            port: None,
                            end_port: None,
                        },
                    })
                    .collect();
                Rule { peers, ports }
            })
            .collect()
    };
    let ingress = if r.below(3) != 0 {
        Some(rules(r))
    } else {
        None
    };
    let egress = if r.coin() { Some(rules(r)) } else { None };
    let ns = r.pick(&["n1", "n2"]).to_string();
    Policy {
        namespace: ns,
        name: name.into(),
        pod_selector: random_selector(r),
        ingress,
        egress,
    }
}

fn random_cluster(seed: u64) -> ClusterSnapshot {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut s = ClusterSnapshot::default();
    for ns in ["n1", "n2"] {
        let mut l = labels(&[("kubernetes.io/metadata.name", ns)]);
        if r.coin() {
            l.insert("team".into(), "red".into());
        }
        s.namespaces.insert(
            ns.into(),
            Namespace {
                name: ns.into(),
                labels: l,
            },
        );
    }
    for i in 1..=5u8 {
        let pod = random_pod(&mut r, &format!("p{i}"), i);
        s.local.insert(pod.obj_ref(), 100 + u32::from(i));
        s.pods.insert(pod.obj_ref(), pod);
    }
    for i in 0..3 {
        let p = random_policy(&mut r, &format!("pol{i}"));
        s.policies.insert(p.obj_ref(), p);
    }
    s.node_ips = vec!["192.0.2.1".parse().expect("ip")];
    s
}

// ---------- the reference: NetworkPolicy semantics, straight from the spec ----------
#[derive(Clone, Copy)]
enum End<'a> {
    Pod(&'a Pod, IpAddr),
    Ext(IpAddr),
}
impl End<'_> {
    fn ip(&self) -> IpAddr {
        match self {
            End::Pod(_, ip) | End::Ext(ip) => *ip,
        }
    }
}

fn in_net(net: &ipnet::IpNet, ip: IpAddr) -> bool {
    net.contains(&ip)
}

fn peer_matches(s: &ClusterSnapshot, policy_ns: &str, peer: &Peer, other: End<'_>) -> bool {
    match peer {
        Peer::IpBlock { cidr, except } => {
            in_net(cidr, other.ip()) && !except.iter().any(|e| in_net(e, other.ip()))
        }
        Peer::Pods {
            namespace_selector,
            pod_selector,
        } => {
            let End::Pod(p, _) = other else { return false };
            let ns_ok = match namespace_selector {
                None => p.namespace == policy_ns,
                Some(sel) => sel.matches(
                    &s.namespaces
                        .get(&p.namespace)
                        .map(|n| n.labels.clone())
                        .unwrap_or_default(),
                ),
            };
            ns_ok
                && pod_selector
                    .as_ref()
                    .is_none_or(|sel| sel.matches(&p.labels))
        }
    }
}

fn port_matches(spec: &PortSpec, proto: u8, port: u16, dest: End<'_>) -> bool {
    if spec.protocol.number() != proto {
        return false;
    }
    match (&spec.port, spec.end_port) {
        (None, _) => true,
        (Some(PortRef::Number(p)), None) => *p == port,
        (Some(PortRef::Number(p)), Some(e)) => (*p..=e).contains(&port),
        (Some(PortRef::Name(n)), _) => match dest {
            End::Pod(pod, _) => pod.ports.iter().any(|c| {
                c.name.as_deref() == Some(n.as_str())
                    && c.port == port
                    && c.protocol == spec.protocol
            }),
            End::Ext(_) => false,
        },
    }
}

/// Does `me`'s policy in `dir` allow a new flow with `other` (dest port/proto)?
fn reference_side(
    s: &ClusterSnapshot,
    me: &Pod,
    dir: u8,
    other: End<'_>,
    dest: End<'_>,
    proto: u8,
    port: u16,
) -> bool {
    let mut isolated = false;
    for p in s
        .policies
        .values()
        .filter(|p| p.namespace == me.namespace && p.pod_selector.matches(&me.labels))
    {
        let rules = if dir == DIR_INGRESS {
            &p.ingress
        } else {
            &p.egress
        };
        let Some(rules) = rules else { continue };
        isolated = true;
        for rule in rules {
            // Pod peers (and "any peer") resolve named ports on the destination pod; ipBlock
            // peers do too for ingress (the destination is the local pod) but not for egress.
            let by_pods = rule.peers.is_empty()
                || rule.peers.iter().any(|pe| {
                    matches!(pe, Peer::Pods { .. }) && peer_matches(s, &p.namespace, pe, other)
                });
            let by_block = rule.peers.iter().any(|pe| {
                matches!(pe, Peer::IpBlock { .. }) && peer_matches(s, &p.namespace, pe, other)
            });
            let port_ok = |named: bool| {
                rule.ports.is_empty()
                    || rule.ports.iter().any(|sp| {
                        (named || !matches!(sp.port, Some(PortRef::Name(_))))
                            && port_matches(sp, proto, port, dest)
                    })
            };
            if (by_pods && port_ok(true)) || (by_block && port_ok(dir == DIR_INGRESS)) {
                return true;
            }
        }
    }
    !isolated
}

fn reference(s: &ClusterSnapshot, src: End<'_>, dst: End<'_>, proto: u8, port: u16) -> bool {
    let egress_ok = match src {
        End::Pod(p, _) => reference_side(s, p, DIR_EGRESS, dst, dst, proto, port),
        End::Ext(_) => true,
    };
    let ingress_ok = match dst {
        End::Pod(p, _) => reference_side(s, p, DIR_INGRESS, src, dst, proto, port),
        End::Ext(_) => true,
    };
    egress_ok && ingress_ok
}

// ---------- the datapath's lookups, simulated over DesiredMaps ----------
fn key_bytes(k: &PolicyKey) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&k.local_id.to_ne_bytes());
    b[4..8].copy_from_slice(&k.peer_id.to_ne_bytes());
    b[8] = k.dir;
    b[9] = k.proto;
    b[10..12].copy_from_slice(&k.dport_be.to_ne_bytes());
    b
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u32) -> bool {
    (0..bits as usize).all(|i| (a[i / 8] >> (7 - i % 8)) & 1 == (b[i / 8] >> (7 - i % 8)) & 1)
}

/// As the datapath: the pair first (absent: nothing allowed), its inline entries, or the
/// POLICY trie when the pair says so.
fn policy_hit(m: &DesiredMaps, key: &PolicyKey) -> bool {
    let pair = npm_common::maps::PairKey {
        local_id: key.local_id,
        peer_id: key.peer_id,
        dir: key.dir,
        _pad: [0; 3],
    };
    let Some(v) = m.pairs.get(&pair) else {
        return false;
    };
    if v.flags & npm_common::maps::PAIR_TRIE == 0 {
        let port = u16::from_be(key.dport_be);
        return v.ports.iter().any(|p| p.matches(key.proto, port));
    }
    let want = key_bytes(key);
    m.policy
        .keys()
        .any(|(len, k)| prefix_eq(&key_bytes(k), &want, *len))
}

fn datapath_side(
    m: &DesiredMaps,
    ifindex: u32,
    dir: u8,
    peer: IpAddr,
    proto: u8,
    port: u16,
) -> bool {
    let Some(ep) = m.endpoints.get(&ifindex) else {
        return true;
    };
    let bit = if dir == DIR_INGRESS {
        EP_ISOLATE_INGRESS
    } else {
        EP_ISOLATE_EGRESS
    };
    if ep.flags & bit == 0 {
        return true;
    }
    let a = addr16(peer);
    let key = |peer_id| PolicyKey {
        local_id: ep.id,
        peer_id,
        dir,
        proto,
        dport_be: port.to_be(),
    };
    // As the datapath: class entries are looked up only when the endpoint says it has some
    // in this direction.
    let class_bit = if dir == DIR_INGRESS {
        npm_common::maps::EP_CLASS_INGRESS
    } else {
        npm_common::maps::EP_CLASS_EGRESS
    };
    let classes = ep.flags & class_bit != 0;
    if let Some(id) = m.identities.get(&a) {
        if id.flags & PEER_HOST != 0 || id.ifindex == ifindex {
            return true;
        }
        if policy_hit(m, &key(id.id)) {
            return true;
        }
        // As the datapath: a known address's class comes from its IDENTITIES entry.
        return classes && id.class != 0 && policy_hit(m, &key(id.class));
    }
    if !classes {
        return false;
    }
    let class = m
        .cidrs
        .iter()
        .filter(|((len, p), _)| prefix_eq(p, &a, *len))
        .max_by_key(|((len, _), _)| *len)
        .map(|(_, c)| *c);
    class.is_some_and(|c| policy_hit(m, &key(c)))
}

fn datapath(
    s: &ClusterSnapshot,
    m: &DesiredMaps,
    src: End<'_>,
    dst: End<'_>,
    proto: u8,
    port: u16,
) -> bool {
    let egress_ok = match src {
        End::Pod(p, _) => {
            datapath_side(m, s.local[&p.obj_ref()], DIR_EGRESS, dst.ip(), proto, port)
        }
        End::Ext(_) => true,
    };
    let ingress_ok = match dst {
        End::Pod(p, _) => {
            datapath_side(m, s.local[&p.obj_ref()], DIR_INGRESS, src.ip(), proto, port)
        }
        End::Ext(_) => true,
    };
    egress_ok && ingress_ok
}

fn ends(s: &ClusterSnapshot) -> Vec<End<'_>> {
    let mut v: Vec<End<'_>> = s
        .pods
        .values()
        .flat_map(|p| p.ips.iter().map(move |ip| End::Pod(p, *ip)))
        .collect();
    let pod_ips: BTreeSet<IpAddr> = v.iter().map(End::ip).collect();
    for ext in [
        "10.0.0.200",
        "10.0.0.6",
        "2001:db8::1",
        "fd00::3",
        "fd00::2",
    ] {
        let ip: IpAddr = ext.parse().expect("ip");
        // An address that belongs to a pod is that pod, not an external host.
        if !pod_ips.contains(&ip) {
            v.push(End::Ext(ip));
        }
    }
    v
}

#[test]
fn compiled_maps_agree_with_the_reference_on_random_clusters() {
    let mut checked = 0usize;
    let mut denied = 0usize;
    for seed in 1..=300u64 {
        let s = random_cluster(seed);
        let compiled = compile(&s, &mut IdAllocator::default());
        let all = ends(&s);
        for src in &all {
            for dst in &all {
                if src.ip().is_ipv4() != dst.ip().is_ipv4() || src.ip() == dst.ip() {
                    continue;
                }
                if let (End::Pod(a, _), End::Pod(b, _)) = (src, dst)
                    && a.obj_ref() == b.obj_ref()
                {
                    continue;
                }
                for (proto, port) in [
                    (6u8, 80u16),
                    (6, 8080),
                    (6, 81),
                    (17, 85),
                    (17, 81),
                    (17, 80),
                    (PROTO_ICMP, 0),
                ] {
                    let want = reference(&s, *src, *dst, proto, port);
                    let got = datapath(&s, &compiled.maps, *src, *dst, proto, port);
                    assert_eq!(
                        got,
                        want,
                        "seed {seed}: {} -> {} proto {proto} port {port}\ncluster: {s:#?}\nmaps: {:#?}",
                        src.ip(),
                        dst.ip(),
                        compiled.maps
                    );
                    checked += 1;
                    denied += usize::from(!want);
                }
            }
        }
    }
    // The random clusters must exercise both outcomes substantially.
    assert!(checked > 50_000, "only {checked} flows checked");
    assert!(
        denied > checked / 10 && denied < checked * 9 / 10,
        "{denied} of {checked} denied"
    );
}

/// The metrics' view of the node: every local endpoint pod with its own ENDPOINTS slot, and
/// per policy the local pods its selector picks (from the policy's meaning) and its count.
#[test]
fn local_view_names_each_local_pods_slot_and_what_each_policy_isolates() {
    let (mut isolating, mut with_entries) = (0, 0);
    for seed in 0..200 {
        let s = random_cluster(seed);
        let inc = Incremental::new(&s, IdAllocator::default());
        let view = inc.local_view();
        let maps = inc.maps();
        let expected: BTreeSet<&ObjRef> = s
            .local
            .iter()
            .filter(|(_, i)| maps.endpoints.contains_key(*i))
            .map(|(o, _)| o)
            .collect();
        let got: BTreeSet<&ObjRef> = view.pods.iter().map(|(o, _)| o).collect();
        assert_eq!(got, expected, "seed {seed}");
        let slots: BTreeSet<u32> = view.pods.iter().map(|(_, slot)| *slot).collect();
        assert_eq!(slots.len(), view.pods.len(), "seed {seed}: a slot shared");
        for (obj, slot) in &view.pods {
            assert_eq!(
                maps.endpoints[&s.local[obj]].slot, *slot,
                "seed {seed} {obj}"
            );
            assert!(*slot >= npm_common::metrics::SLOT_FIRST, "seed {seed}");
        }
        let counts = inc.policy_counts();
        let by_policy: BTreeMap<&ObjRef, crate::compiler::PolicyLocal> =
            view.policies.iter().map(|(o, p)| (o, *p)).collect();
        for (obj, p) in &s.policies {
            let isolated = view
                .pods
                .iter()
                .filter(|(pod, _)| {
                    pod.namespace == p.namespace
                        && p.pod_selector.matches(&s.pods[pod].labels)
                        && (p.ingress.is_some() || p.egress.is_some())
                })
                .count();
            let local = by_policy.get(obj).copied().unwrap_or_default();
            assert_eq!(local.isolated_pods, isolated, "seed {seed} {obj}");
            isolating += usize::from(isolated > 0);
            with_entries += usize::from(local.entries > 0);
            if by_policy.contains_key(obj) {
                assert_eq!(local.entries, counts[obj].entries, "seed {seed} {obj}");
            } else {
                assert_eq!(counts[obj].entries, 0, "seed {seed} {obj}");
            }
        }
    }
    assert!(
        isolating > 50 && with_entries > 50,
        "the random clusters exercise little: {isolating} isolating, {with_entries} with entries"
    );
}

#[test]
fn output_does_not_depend_on_history_and_is_stable_across_compiles() {
    for seed in 1..=50u64 {
        let s = random_cluster(seed);
        let mut ids = IdAllocator::default();
        let first = compile(&s, &mut ids);
        let again = compile(&s, &mut ids);
        assert_eq!(
            first, again,
            "seed {seed}: recompiling the same snapshot changed the output"
        );
        // Same snapshot built in a different insertion order (BTreeMaps) compiles identically.
        let mut t = ClusterSnapshot {
            namespaces: s.namespaces.clone(),
            node_ips: s.node_ips.clone(),
            ..Default::default()
        };
        for (k, v) in s.pods.iter().rev() {
            t.pods.insert(k.clone(), v.clone());
        }
        for (k, v) in s.policies.iter().rev() {
            t.policies.insert(k.clone(), v.clone());
        }
        for (k, v) in s.local.iter().rev() {
            t.local.insert(k.clone(), *v);
        }
        assert_eq!(
            compile(&t, &mut IdAllocator::default()),
            first,
            "seed {seed}"
        );
    }
}

#[test]
fn adding_an_allow_rule_never_removes_an_entry() {
    for seed in 1..=100u64 {
        let s = random_cluster(seed);
        let mut ids = IdAllocator::default();
        let before = compile(&s, &mut ids);
        let mut t = s.clone();
        let Some(p) = t.policies.values_mut().find(|p| p.ingress.is_some()) else {
            continue;
        };
        p.ingress.as_mut().expect("some").push(Rule {
            peers: vec![Peer::Pods {
                namespace_selector: None,
                pod_selector: Some(Selector::default()),
            }],
            ports: vec![PortSpec {
                protocol: Protocol::Tcp,
                port: Some(PortRef::Number(9999)),
                end_port: None,
            }],
        });
        let after = compile(&t, &mut ids);
        for k in before.maps.policy.keys() {
            assert!(
                after.maps.policy.contains_key(k),
                "seed {seed}: entry {k:?} disappeared"
            );
        }
    }
}

#[test]
fn identity_ids_survive_unrelated_changes_and_are_never_reused() {
    let s = random_cluster(7);
    let mut ids = IdAllocator::default();
    let a = compile(&s, &mut ids);
    let mut t = s.clone();
    let victim = t.pods.keys().next().expect("pod").clone();
    t.pods
        .get_mut(&victim)
        .expect("pod")
        .labels
        .insert("new".into(), "label".into());
    let b = compile(&t, &mut ids);
    let used_before: BTreeSet<u32> = a.maps.identities.values().map(|p| p.id).collect();
    for (ip, info) in &b.maps.identities {
        let old = a.maps.identities[ip].id;
        let is_victim = t.pods[&victim].ips.iter().any(|v| addr16(*v) == *ip);
        if is_victim && old != 0 {
            assert!(
                !used_before.contains(&info.id) || info.id == old,
                "a relabelled pod never takes an id in use"
            );
        }
    }
    // Unrelated pods keep their ids, unless they shared the victim's identity.
    let shared = a
        .maps
        .identities
        .iter()
        .filter(|(ip, _)| t.pods[&victim].ips.iter().any(|v| addr16(*v) == **ip))
        .map(|(_, p)| p.id)
        .collect::<BTreeSet<_>>();
    for (ip, info) in &a.maps.identities {
        if !shared.contains(&info.id) {
            assert_eq!(b.maps.identities[ip].id, info.id);
        }
    }
}

#[test]
fn reserved_ids_are_never_handed_out() {
    let mut ids = IdAllocator::default();
    ids.reserve([1, 2, 3, npm_common::maps::CIDR_CLASS_BIT | 5]);
    let s = random_cluster(3);
    let c = compile(&s, &mut ids);
    assert!(
        c.maps
            .identities
            .values()
            .filter(|p| p.id != 0)
            .all(|p| p.id > 3)
    );
    assert!(
        c.maps
            .cidrs
            .values()
            .all(|c| c & !npm_common::maps::CIDR_CLASS_BIT > 5)
    );
}

#[test]
fn named_ports_resolve_per_destination_pod() {
    let mut s = ClusterSnapshot::default();
    s.namespaces.insert(
        "d".into(),
        Namespace {
            name: "d".into(),
            labels: Labels::new(),
        },
    );
    let mk = |name: &str, app: &str, port: u16, ip: &str| Pod {
        namespace: "d".into(),
        name: name.into(),
        labels: labels(&[("app", app)]),
        ips: vec![ip.parse().expect("ip")],
        node_name: None,
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![ContainerPort {
            name: Some("web".into()),
            port,
            protocol: Protocol::Tcp,
        }],
    };
    for (i, p) in [
        mk("s1", "srv", 80, "10.0.0.1"),
        mk("s2", "srv", 8080, "10.0.0.2"),
        mk("c", "cli", 1, "10.0.0.3"),
    ]
    .into_iter()
    .enumerate()
    {
        s.local.insert(p.obj_ref(), 10 + i as u32);
        s.pods.insert(p.obj_ref(), p);
    }
    let named = PortSpec {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Name("web".into())),
        end_port: None,
    };
    let pol = Policy {
        namespace: "d".into(),
        name: "p".into(),
        pod_selector: Selector::default(),
        ingress: Some(vec![Rule {
            peers: vec![],
            ports: vec![named.clone()],
        }]),
        egress: Some(vec![Rule {
            peers: vec![],
            ports: vec![named],
        }]),
    };
    s.policies.insert(pol.obj_ref(), pol);
    let m = compile(&s, &mut IdAllocator::default()).maps;
    let ep = |n: &str| {
        End::Pod(
            &s.pods[&ObjRef::new("d", n)],
            s.pods[&ObjRef::new("d", n)].ips[0],
        )
    };
    assert!(datapath(&s, &m, ep("c"), ep("s1"), 6, 80));
    assert!(!datapath(&s, &m, ep("c"), ep("s1"), 6, 8080));
    assert!(datapath(&s, &m, ep("c"), ep("s2"), 6, 8080));
    assert!(!datapath(&s, &m, ep("c"), ep("s2"), 6, 80));
    // s1 and s2 have different named ports, so they must not share an identity.
    assert_ne!(m.endpoints[&10].id, m.endpoints[&11].id);
}

/// docs/MIGRATING-FROM-AZURE-NPM.md: an ipBlock matches pod IPs and other nodes' IPs; a
/// named port in an egress rule whose peer is an ipBlock matches nothing (the number does);
/// the pod's own node is reachable whatever the egress rules say.
#[test]
fn ipblocks_match_pods_and_other_nodes_but_not_through_a_named_port() {
    let mut s = ClusterSnapshot::default();
    s.namespaces.insert(
        "d".into(),
        Namespace {
            name: "d".into(),
            labels: Labels::new(),
        },
    );
    s.node_ips = vec!["192.0.2.1".parse().expect("ip")];
    let mk = |name: &str, app: &str, ip: &str| Pod {
        namespace: "d".into(),
        name: name.into(),
        labels: labels(&[("app", app)]),
        ips: vec![ip.parse().expect("ip")],
        node_name: None,
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![ContainerPort {
            name: Some("web".into()),
            port: 80,
            protocol: Protocol::Tcp,
        }],
    };
    for (i, p) in [mk("srv", "srv", "10.0.0.1"), mk("c", "cli", "10.0.0.3")]
        .into_iter()
        .enumerate()
    {
        s.local.insert(p.obj_ref(), 10 + i as u32);
        s.pods.insert(p.obj_ref(), p);
    }
    let block = |cidr: &str| Peer::IpBlock {
        cidr: cidr.parse().expect("cidr"),
        except: vec![],
    };
    let port = |p: PortRef| PortSpec {
        protocol: Protocol::Tcp,
        port: Some(p),
        end_port: None,
    };
    let pol = Policy {
        namespace: "d".into(),
        name: "p".into(),
        pod_selector: Selector {
            match_labels: labels(&[("app", "cli")]),
            ..Selector::default()
        },
        ingress: None,
        egress: Some(vec![
            // A pod range with the named port: matches nothing.
            Rule {
                peers: vec![block("10.0.0.0/24")],
                ports: vec![port(PortRef::Name("web".into()))],
            },
            // The same range with the number: matches the pod in it.
            Rule {
                peers: vec![block("10.0.0.0/24")],
                ports: vec![port(PortRef::Number(8080))],
            },
            // Other nodes' addresses.
            Rule {
                peers: vec![block("192.0.2.0/24")],
                ports: vec![port(PortRef::Number(10250))],
            },
        ]),
    };
    s.policies.insert(pol.obj_ref(), pol);
    let m = compile(&s, &mut IdAllocator::default()).maps;
    let c = || {
        let p = &s.pods[&ObjRef::new("d", "c")];
        End::Pod(p, p.ips[0])
    };
    let srv = || {
        let p = &s.pods[&ObjRef::new("d", "srv")];
        End::Pod(p, p.ips[0])
    };
    let ext = |ip: &str| End::Ext(ip.parse().expect("ip"));
    assert!(
        !datapath(&s, &m, c(), srv(), 6, 80),
        "named port through an ipBlock"
    );
    assert!(
        !datapath(&s, &m, c(), ext("10.0.0.9"), 6, 80),
        "named port through an ipBlock, non-pod address"
    );
    assert!(
        datapath(&s, &m, c(), srv(), 6, 8080),
        "ipBlock covering a pod IP"
    );
    assert!(datapath(&s, &m, c(), ext("10.0.0.9"), 6, 8080));
    assert!(
        datapath(&s, &m, c(), ext("192.0.2.7"), 6, 10250),
        "ipBlock covering another node's IP"
    );
    assert!(!datapath(&s, &m, c(), ext("192.0.2.7"), 6, 22));
    assert!(!datapath(&s, &m, c(), ext("198.51.100.1"), 6, 10250));
    assert!(
        datapath(&s, &m, c(), ext("192.0.2.1"), 6, 22),
        "the pod's own node, whatever the egress rules"
    );
}

#[test]
fn seed_scenario_azure_npm() {
    // deny-all-inbound, allow-go-webapp (8080 from anywhere), allow-src-ip (8080 from
    // app=busybox), restrict-instance-metadata (egress 0.0.0.0/0 except 169.254.169.254/32).
    let mut s = ClusterSnapshot::default();
    s.namespaces.insert(
        "default".into(),
        Namespace {
            name: "default".into(),
            labels: Labels::new(),
        },
    );
    let mk = |name: &str, ip: &str| Pod {
        namespace: "default".into(),
        name: name.into(),
        labels: labels(&[("app", name)]),
        ips: vec![ip.parse().expect("ip")],
        node_name: None,
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![ContainerPort {
            name: None,
            port: 8080,
            protocol: Protocol::Tcp,
        }],
    };
    for (i, p) in [
        mk("busybox", "10.0.0.1"),
        mk("go-webapp", "10.0.0.2"),
        mk("src-ip-internal", "10.0.0.3"),
        mk("other", "10.0.0.4"),
    ]
    .into_iter()
    .enumerate()
    {
        s.local.insert(p.obj_ref(), 10 + i as u32);
        s.pods.insert(p.obj_ref(), p);
    }
    let sel = |app: &str| Selector {
        match_labels: labels(&[("app", app)]),
        ..Default::default()
    };
    let p8080 = vec![PortSpec {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Number(8080)),
        end_port: None,
    }];
    for p in [
        Policy {
            namespace: "default".into(),
            name: "deny-all-inbound".into(),
            pod_selector: Selector::default(),
            ingress: Some(vec![]),
            egress: None,
        },
        Policy {
            namespace: "default".into(),
            name: "allow-go-webapp".into(),
            pod_selector: sel("go-webapp"),
            ingress: Some(vec![Rule {
                peers: vec![],
                ports: p8080.clone(),
            }]),
            egress: None,
        },
        Policy {
            namespace: "default".into(),
            name: "allow-src-ip".into(),
            pod_selector: sel("src-ip-internal"),
            ingress: Some(vec![Rule {
                peers: vec![Peer::Pods {
                    namespace_selector: None,
                    pod_selector: Some(sel("busybox")),
                }],
                ports: p8080,
            }]),
            egress: None,
        },
        Policy {
            namespace: "default".into(),
            name: "restrict-instance-metadata".into(),
            pod_selector: Selector::default(),
            ingress: None,
            egress: Some(vec![Rule {
                peers: vec![Peer::IpBlock {
                    cidr: "0.0.0.0/0".parse().expect("net"),
                    except: vec!["169.254.169.254/32".parse().expect("net")],
                }],
                ports: vec![],
            }]),
        },
    ] {
        s.policies.insert(p.obj_ref(), p);
    }
    let m = compile(&s, &mut IdAllocator::default()).maps;
    let pod = |n: &str| {
        End::Pod(
            &s.pods[&ObjRef::new("default", n)],
            s.pods[&ObjRef::new("default", n)].ips[0],
        )
    };
    let imds = End::Ext("169.254.169.254".parse().expect("ip"));
    let internet = End::Ext("203.0.113.10".parse().expect("ip"));
    assert!(datapath(
        &s,
        &m,
        pod("busybox"),
        pod("src-ip-internal"),
        6,
        8080
    ));
    assert!(!datapath(
        &s,
        &m,
        pod("other"),
        pod("src-ip-internal"),
        6,
        8080
    ));
    assert!(!datapath(
        &s,
        &m,
        pod("go-webapp"),
        pod("src-ip-internal"),
        6,
        8080
    ));
    assert!(datapath(&s, &m, pod("other"), pod("go-webapp"), 6, 8080));
    assert!(datapath(&s, &m, internet, pod("go-webapp"), 6, 8080));
    assert!(!datapath(&s, &m, internet, pod("go-webapp"), 6, 80));
    assert!(!datapath(&s, &m, internet, pod("src-ip-internal"), 6, 8080));
    assert!(!datapath(&s, &m, pod("busybox"), imds, 6, 80));
    assert!(datapath(&s, &m, pod("busybox"), internet, 6, 443));
    assert!(
        !datapath(&s, &m, pod("busybox"), pod("other"), 6, 8080),
        "deny-all-inbound"
    );
}

#[test]
fn pods_without_ip_host_network_or_finished_are_not_endpoints() {
    let mut s = random_cluster(11);
    let keys: Vec<ObjRef> = s.pods.keys().cloned().collect();
    assert_eq!(keys.len(), 5, "the cluster this test is sized for");
    s.pods.get_mut(&keys[0]).expect("p").ips.clear();
    s.pods.get_mut(&keys[1]).expect("p").host_network = true;
    s.pods.get_mut(&keys[2]).expect("p").finished = true;
    // Being deleted (deletionTimestamp) is not finished: it runs until its grace period ends.
    s.pods.get_mut(&keys[3]).expect("p").terminating = true;
    let c = compile(&s, &mut IdAllocator::default());
    assert!(
        c.maps.endpoints.contains_key(&s.local[&keys[3]]),
        "a terminating pod stays an endpoint"
    );
    for ip in &s.pods[&keys[3]].ips {
        assert!(
            c.maps.identities.contains_key(&addr16(*ip)),
            "a terminating pod's IP keeps its identity"
        );
    }
    for k in &keys[..3] {
        assert!(
            !c.maps.endpoints.contains_key(&s.local[k]),
            "{k} must not be an endpoint"
        );
        for ip in &s.pods[k].ips {
            assert!(
                !c.maps.identities.contains_key(&addr16(*ip)),
                "{k}'s IP must not carry an identity"
            );
        }
    }
    // keys[3] (terminating) and keys[4].
    assert_eq!(c.maps.endpoints.len(), 2);
}

/// A random cluster in which the second pod (name order) was given the first one's address.
fn two_pods_sharing_an_ip() -> (ClusterSnapshot, Vec<ObjRef>, IpAddr) {
    let mut s = random_cluster(5);
    let keys: Vec<ObjRef> = s.pods.keys().cloned().collect();
    let ip = s.pods[&keys[0]].ips[0];
    s.pods.get_mut(&keys[1]).expect("p").ips = vec![ip];
    (s, keys, ip)
}

#[test]
fn duplicate_pod_ip_is_reported_and_resolved_deterministically() {
    let (s, keys, ip) = two_pods_sharing_an_ip();
    let c = compile(&s, &mut IdAllocator::default());
    assert_eq!(c.diagnostics.len(), 1);
    assert!(c.diagnostics[0].message.contains(&ip.to_string()));
    assert_eq!(c.diagnostics[0].object, format!("Pod {}", keys[1]));
}

#[test]
fn a_shared_ip_belongs_to_the_pod_that_is_not_being_deleted() {
    let (mut s, keys, ip) = two_pods_sharing_an_ip();
    // The first in name order is being deleted and still holds the address the second was
    // given: the second owns it.
    s.pods.get_mut(&keys[0]).expect("p").terminating = true;
    let mut ids = IdAllocator::default();
    let c = compile(&s, &mut ids);
    assert_eq!(c.diagnostics.len(), 1);
    assert_eq!(c.diagnostics[0].object, format!("Pod {}", keys[0]));
    assert!(
        c.diagnostics[0].message.contains(&keys[1].to_string()),
        "{}",
        c.diagnostics[0].message
    );
    let owner = c.maps.identities[&addr16(ip)].id;
    s.pods.get_mut(&keys[0]).expect("p").terminating = false;
    let before = compile(&s, &mut ids);
    assert_ne!(
        before.maps.identities[&addr16(ip)].id,
        owner,
        "without the deletion the first in name order owns it"
    );
}

mod budget;
mod incremental;
