//! The incremental compiler against a fresh compile of the same snapshot, over random
//! sequences of changes, and the plans it returns replayed onto a fake backend.
use std::collections::{BTreeMap, BTreeSet};

use npm_common::maps::{CIDR_CLASS_BIT, EP_ISOLATE_INGRESS, EndpointInfo, ID_PENDING};

use super::*;
use crate::compiler::ids::IdentityKey;
use crate::compiler::peers::Block;
use crate::programmer::Op;
use crate::programmer::fake::FakeBackend;
use crate::programmer::{MapBackend, Plan, plan};
use crate::state::Change;

/// An id, named by what it stands for instead of its number.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Cid {
    Host,
    Pending,
    Pod(IdentityKey),
    Class(BTreeSet<Block>),
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Canon {
    endpoints: BTreeMap<u32, (Cid, u32)>,
    /// (identity, ifindex, flags, CIDR class or none).
    identities: BTreeMap<npm_common::maps::Addr16, (Cid, u32, u32, Option<Cid>)>,
    cidrs: BTreeMap<(u32, npm_common::maps::Addr16), Cid>,
    policy: BTreeMap<(u32, Cid, Cid, u8, u8, u16), RuleRef>,
    pairs: BTreeMap<(Cid, Cid, u8), npm_common::maps::PairValue>,
}

/// The maps with every id replaced by its meaning (the allocator must know every id in use)
/// and every rule_ref by its rule.
pub(super) fn canon(inc: &Incremental) -> Canon {
    let pods: BTreeMap<u32, IdentityKey> =
        inc.ids().pod_ids().map(|(k, id)| (id, k.clone())).collect();
    let classes: BTreeMap<u32, BTreeSet<Block>> = inc
        .ids()
        .class_ids()
        .map(|(k, id)| (id, k.clone()))
        .collect();
    let cid = |id: u32| -> Cid {
        if id == 0 {
            Cid::Host
        } else if id == ID_PENDING {
            Cid::Pending
        } else if id & CIDR_CLASS_BIT != 0 {
            Cid::Class(classes.get(&id).cloned().expect("class id known"))
        } else {
            Cid::Pod(pods.get(&id).cloned().expect("pod id known"))
        }
    };
    let m = inc.maps();
    Canon {
        endpoints: m
            .endpoints
            .iter()
            .map(|(k, v)| (*k, (cid(v.id), v.flags)))
            .collect(),
        identities: m
            .identities
            .iter()
            .map(|(k, v)| {
                assert_ne!(v.id, ID_PENDING, "a pending id never names an address");
                let class = (v.class != 0).then(|| cid(v.class));
                (*k, (cid(v.id), v.ifindex, v.flags, class))
            })
            .collect(),
        cidrs: m.cidrs.iter().map(|(k, v)| (*k, cid(*v))).collect(),
        policy: m
            .policy
            .iter()
            .map(|((len, k), v)| {
                assert_ne!(
                    k.local_id, ID_PENDING,
                    "no POLICY entry for pending endpoints"
                );
                (
                    (
                        *len,
                        cid(k.local_id),
                        cid(k.peer_id),
                        k.dir,
                        k.proto,
                        k.dport_be,
                    ),
                    inc.rules()
                        .get(&v.rule_ref)
                        .cloned()
                        .expect("rule_ref in the table"),
                )
            })
            .collect(),
        pairs: m
            .pairs
            .iter()
            .map(|(k, v)| ((cid(k.local_id), cid(k.peer_id), k.dir), *v))
            .collect(),
    }
}

/// A random change against the current snapshot.
pub(super) fn random_change(r: &mut Rng, s: &ClusterSnapshot, next: &mut u32) -> Change {
    let pods: Vec<&ObjRef> = s.pods.keys().collect();
    let pick_pod = |r: &mut Rng| pods[r.below(pods.len() as u64) as usize].clone();
    *next += 1;
    let n = *next;
    match r.below(16) {
        // A new pod; its addresses may reuse another pod's (IP reuse, duplicates).
        0 | 1 => {
            let last = 1 + r.below(9) as u8;
            let mut p = random_pod(r, &format!("q{n}"), last);
            if r.coin() {
                p.node_name = Some("node".into());
            }
            if r.below(4) == 0 {
                p.ips.clear();
            }
            if r.below(3) == 0 {
                p.namespace = "n3".into();
            }
            Change::Pod(p.obj_ref(), Some(p))
        }
        2 if !pods.is_empty() => Change::Pod(pick_pod(r), None),
        3 | 4 if !pods.is_empty() => {
            let k = pick_pod(r);
            let mut p = s.pods[&k].clone();
            match r.below(6) {
                0 => {
                    p.labels
                        .insert("app".into(), r.pick(&["a", "b", "c"]).into());
                }
                5 => {
                    p.host_network = !p.host_network;
                    p.node_name = Some(r.pick(&["node", "other"]).into());
                }
                1 => {
                    p.labels.insert("tier".into(), r.pick(&["x", "y"]).into());
                }
                2 => {
                    p.ips = vec![format!("10.0.0.{}", 1 + r.below(9)).parse().expect("ip")];
                }
                3 => {
                    if r.below(2) == 0 {
                        p.terminating = !p.terminating;
                    } else {
                        p.finished = !p.finished;
                    }
                }
                _ => {
                    p.ports[0].port = r.pick(&[80, 8080, 81]);
                }
            }
            Change::Pod(k, Some(p))
        }
        5 | 6 => {
            let ns = r.pick(&["n1", "n2", "n3"]);
            if r.below(5) == 0 {
                Change::Namespace(ns.into(), None)
            } else {
                let mut l = labels(&[("kubernetes.io/metadata.name", ns)]);
                if r.coin() {
                    l.insert("team".into(), "red".into());
                }
                Change::Namespace(
                    ns.into(),
                    Some(Namespace {
                        name: ns.into(),
                        labels: l,
                    }),
                )
            }
        }
        7 | 8 => {
            // Add, or replace an existing one (same name).
            let name = if r.coin() || s.policies.is_empty() {
                format!("pol{n}")
            } else {
                let ks: Vec<&ObjRef> = s.policies.keys().collect();
                ks[r.below(ks.len() as u64) as usize].name.clone()
            };
            let mut p = random_policy(r, &name);
            if let Some(old) = s.policies.values().find(|o| o.name == name) {
                p.namespace = old.namespace.clone();
            }
            Change::Policy(p.obj_ref(), Some(p))
        }
        9 if !s.policies.is_empty() => {
            let ks: Vec<&ObjRef> = s.policies.keys().collect();
            Change::Policy(ks[r.below(ks.len() as u64) as usize].clone(), None)
        }
        10 | 11 if !pods.is_empty() => {
            let k = pick_pod(r);
            if s.local.contains_key(&k) && r.coin() {
                Change::Local(k, None)
            } else {
                // Sometimes an ifindex already in use (a stale mapping).
                Change::Local(k, Some(100 + r.below(20) as u32))
            }
        }
        12 | 13 => {
            // Pending links, sometimes on an ifindex a local pod uses.
            let i = 100 + r.below(20) as u32;
            Change::PendingLink(i, !s.pending_links.contains(&i))
        }
        14 => {
            let mut ips = vec!["192.0.2.1".parse().expect("ip")];
            if r.coin() {
                ips.push(format!("10.0.0.{}", 1 + r.below(9)).parse().expect("ip"));
            }
            Change::NodeIps(ips)
        }
        _ => Change::PendingLink(100 + r.below(20) as u32, false),
    }
}

/// Checks the maps against the reference for every flow that a local pod of `s` enforces:
/// pods with an address of their own (not a node address, not claimed twice) are pod ends,
/// the addresses of pods that are not endpoints and a few others are external hosts. Returns
/// the number of flows checked.
pub(super) fn check_reference(s: &ClusterSnapshot, m: &DesiredMaps, ctx: &str) -> usize {
    let node: BTreeSet<IpAddr> = s.node_ips.iter().copied().collect();
    let mut claims: BTreeMap<IpAddr, BTreeSet<ObjRef>> = BTreeMap::new();
    for p in s.pods.values().filter(|p| p.is_endpoint()) {
        for ip in &p.ips {
            claims.entry(*ip).or_default().insert(p.obj_ref());
        }
    }
    let mut per_if: BTreeMap<u32, usize> = BTreeMap::new();
    for (k, i) in &s.local {
        if s.pods.get(k).is_some_and(Pod::is_endpoint) {
            *per_if.entry(*i).or_default() += 1;
        }
    }
    // A pod is enforced here when it is a local endpoint alone on its interface.
    let local_if = |p: &Pod| -> Option<u32> {
        s.local
            .get(&p.obj_ref())
            .copied()
            .filter(|i| per_if.get(i) == Some(&1))
    };
    let mut ends: Vec<End<'_>> = Vec::new();
    for (ip, owners) in &claims {
        if owners.len() == 1 && !node.contains(ip) {
            let owner = owners.first().expect("one");
            ends.push(End::Pod(&s.pods[owner], *ip));
        }
    }
    let mut externals: BTreeSet<IpAddr> = ["10.0.0.200", "2001:db8::1", "fd00::3", "10.0.0.6"]
        .iter()
        .map(|a| a.parse().expect("ip"))
        .collect();
    externals.extend(s.pods.values().flat_map(|p| p.ips.iter().copied()));
    for ip in externals {
        if !claims.contains_key(&ip) && !node.contains(&ip) {
            ends.push(End::Ext(ip));
        }
    }
    let mut checked = 0;
    for src in &ends {
        for dst in &ends {
            if src.ip().is_ipv4() != dst.ip().is_ipv4() || src.ip() == dst.ip() {
                continue;
            }
            let (sp, dp) = (
                match src {
                    End::Pod(p, _) => Some(*p),
                    End::Ext(_) => None,
                },
                match dst {
                    End::Pod(p, _) => Some(*p),
                    End::Ext(_) => None,
                },
            );
            if let (Some(a), Some(b)) = (sp, dp)
                && a.obj_ref() == b.obj_ref()
            {
                continue;
            }
            let si = sp.and_then(local_if);
            let di = dp.and_then(local_if);
            if si.is_none() && di.is_none() {
                continue;
            }
            for (proto, port) in [(6u8, 80u16), (6, 8080), (17, 85), (PROTO_ICMP, 0)] {
                let want = si.is_none_or(|_| {
                    reference_side(s, sp.expect("pod"), DIR_EGRESS, *dst, *dst, proto, port)
                }) && di.is_none_or(|_| {
                    reference_side(s, dp.expect("pod"), DIR_INGRESS, *src, *dst, proto, port)
                });
                let got = si.is_none_or(|i| datapath_side(m, i, DIR_EGRESS, dst.ip(), proto, port))
                    && di.is_none_or(|i| datapath_side(m, i, DIR_INGRESS, src.ip(), proto, port));
                assert_eq!(
                    got,
                    want,
                    "{ctx}: {} -> {} proto {proto} port {port}",
                    src.ip(),
                    dst.ip()
                );
                checked += 1;
            }
        }
    }
    checked
}

/// Every known pod address carries the class the CIDRS trie gives it (longest prefix
/// containing it, 0 when none; node addresses 0): the datapath uses it instead of the trie.
/// Returns how many addresses have a class.
fn check_peer_classes(m: &DesiredMaps, ctx: &str) -> usize {
    let mut classed = 0;
    for (a, v) in &m.identities {
        let want = if v.flags & npm_common::maps::PEER_HOST != 0 {
            0
        } else {
            m.cidrs
                .iter()
                .filter(|((len, p), _)| super::prefix_eq(p, a, *len))
                .max_by_key(|((len, _), _)| *len)
                .map_or(0, |(_, c)| *c)
        };
        assert_eq!(
            v.class,
            want,
            "{ctx}: class of {}",
            std::net::Ipv6Addr::from(*a)
        );
        classed += usize::from(want != 0);
    }
    classed
}

/// Counter slots: every endpoint has one of its own, an interface keeps its slot while it
/// stays in ENDPOINTS, and a slot newly given to an interface is reset before the interface
/// is published with it; a slot no interface holds any more is reset after the deletes.
/// Returns the number of resets in the plan.
fn check_slots(
    before: &BTreeMap<u32, EndpointInfo>,
    after: &BTreeMap<u32, EndpointInfo>,
    plan: &Plan,
    ctx: &str,
) -> usize {
    use npm_common::maps::COUNTER_SLOTS;
    use npm_common::metrics::SLOT_FIRST;
    let mut seen = BTreeSet::new();
    for (i, e) in after {
        assert!(
            (SLOT_FIRST..COUNTER_SLOTS).contains(&e.slot),
            "{ctx}: #{i} slot {}",
            e.slot
        );
        assert!(seen.insert(e.slot), "{ctx}: slot {} held twice", e.slot);
        let pos = |op: &Op| plan.ops.iter().position(|o| o == op);
        match before.get(i) {
            Some(b) => assert_eq!(b.slot, e.slot, "{ctx}: #{i} kept its slot"),
            None => {
                let reset = pos(&Op::ResetCounters(e.slot))
                    .unwrap_or_else(|| panic!("{ctx}: #{i}'s new slot {} is reset", e.slot));
                let publish = pos(&Op::UpsertEndpoint(*i, *e)).expect("new endpoint upserted");
                assert!(reset < publish, "{ctx}: reset before publishing #{i}");
            }
        }
    }
    for (i, b) in before {
        if !after.contains_key(i) && !seen.contains(&b.slot) {
            let reset = plan
                .ops
                .iter()
                .position(|o| *o == Op::ResetCounters(b.slot))
                .unwrap_or_else(|| panic!("{ctx}: freed slot {} of #{i} is reset", b.slot));
            let delete = plan
                .ops
                .iter()
                .position(|o| *o == Op::DeleteEndpoint(*i))
                .expect("endpoint deleted");
            assert!(delete < reset, "{ctx}: freed slot reset after the delete");
        }
    }
    plan.ops
        .iter()
        .filter(|o| matches!(o, Op::ResetCounters(_)))
        .count()
}

pub(super) fn replay(backend: &mut FakeBackend, plan: &Plan) {
    for op in &plan.ops {
        backend.apply(op).expect("fake backend");
    }
}

#[test]
fn incremental_equals_a_fresh_compile_after_every_random_change() {
    let mut steps = 0usize;
    let mut ops = 0usize;
    let mut flows = 0usize;
    let mut resets = 0usize;
    let mut classed = 0usize;
    for seed in 1..=60u64 {
        let mut r = Rng(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1);
        let mut base = random_cluster(seed);
        base.node_name = Some("node".into());
        let mut inc = Incremental::new(&base, IdAllocator::default());
        let mut fake = FakeBackend::default();
        replay(&mut fake, &plan::plan(&DesiredMaps::default(), inc.maps()));
        let mut next = 0;
        for step in 0..40 {
            let batch: Vec<Change> = (0..1 + r.below(3))
                .map(|_| random_change(&mut r, inc.snapshot(), &mut next))
                .collect();
            let before = inc.maps().endpoints.clone();
            let plan = inc.apply(&batch);
            ops += plan.ops.len();
            resets += check_slots(
                &before,
                &inc.maps().endpoints,
                &plan,
                &format!("seed {seed} step {step}"),
            );
            replay(&mut fake, &plan);
            assert_eq!(
                &fake.maps,
                inc.maps(),
                "seed {seed} step {step}: replaying the plan must give the maps\n{batch:#?}"
            );
            let fresh = Incremental::new(inc.snapshot(), IdAllocator::default());
            check_slots(
                &BTreeMap::new(),
                &fresh.maps().endpoints,
                &plan::plan(&DesiredMaps::default(), fresh.maps()),
                "fresh",
            );
            assert_eq!(
                canon(&inc),
                canon(&fresh),
                "seed {seed} step {step}: incremental differs from a fresh compile after\n{batch:#?}"
            );
            assert_eq!(
                inc.diagnostics(),
                fresh.diagnostics(),
                "seed {seed} step {step}"
            );
            flows += check_reference(
                inc.snapshot(),
                inc.maps(),
                &format!("seed {seed} step {step}"),
            );
            classed += check_peer_classes(inc.maps(), &format!("seed {seed} step {step}"));
            assert_eq!(
                inc.maps().pairs,
                crate::compiler::desired::pairs_of(inc.maps().policy.keys()),
                "seed {seed} step {step}: PAIRS is the function of POLICY"
            );
            steps += 1;
        }
    }
    println!(
        "{steps} steps, {ops} plan operations ({resets} counter resets), {flows} flows checked against the reference"
    );
    assert!(
        resets > 100,
        "interfaces must come and go ({resets} resets)"
    );
    assert_eq!(steps, 2400);
    assert!(
        classed > 1000,
        "addresses inside ipBlocks must occur ({classed} with a class)"
    );
    assert!(ops > 2400, "the sequences must change the maps ({ops} ops)");
    assert!(
        flows > 100_000,
        "only {flows} flows checked against the reference"
    );
}

/// A cluster where every identity has a twin pod to copy.
fn cluster() -> ClusterSnapshot {
    let mut s = random_cluster(42);
    s.node_name = Some("node".into());
    s
}

#[test]
fn pod_event_with_an_existing_identity_touches_only_identities_and_endpoints() {
    for seed in 1..=40u64 {
        let mut s = random_cluster(seed);
        s.node_name = Some("node".into());
        let mut inc = Incremental::new(&s, IdAllocator::default());
        let twin_of = s.pods.values().next().expect("pod").clone();
        let mut twin = twin_of.clone();
        twin.name = "twin".into();
        twin.ips = vec!["10.0.1.1".parse().expect("ip")];
        let plan = inc.apply(&[
            Change::Pod(twin.obj_ref(), Some(twin.clone())),
            Change::Local(twin.obj_ref(), Some(999)),
        ]);
        assert!(
            plan.ops.iter().all(|o| matches!(
                o,
                Op::UpsertIdentity(..) | Op::UpsertEndpoint(..) | Op::ResetCounters(_)
            )),
            "seed {seed}: {:?}",
            plan.ops
        );
        assert_eq!(
            plan.ops.len(),
            3,
            "seed {seed}: one address, one interface (and its counter slot reset)"
        );
        // Deleting it again removes exactly those two.
        let plan = inc.apply(&[Change::Pod(twin.obj_ref(), None)]);
        assert!(
            plan.ops.iter().all(|o| matches!(
                o,
                Op::DeleteIdentity(..) | Op::DeleteEndpoint(..) | Op::ResetCounters(_)
            )),
            "seed {seed}: {:?}",
            plan.ops
        );
        // A label change to labels another pod already has: identities only (plus endpoint
        // if local), never POLICY.
        let victim = s.pods.keys().nth(1).expect("pod").clone();
        let mut p = s.pods[&victim].clone();
        let other = s
            .pods
            .values()
            .find(|o| {
                o.namespace == p.namespace
                    && o.name != p.name
                    && o.ports == p.ports
                    && o.labels != p.labels
            })
            .cloned();
        if let Some(other) = other {
            p.labels = other.labels.clone();
            let plan = inc.apply(&[Change::Pod(victim.clone(), Some(p))]);
            // The victim's old identity may vanish (its entries go) but nothing is added to
            // POLICY for an identity that already existed.
            assert!(
                plan.ops.iter().all(|o| !matches!(
                    o,
                    Op::UpsertPolicy(..) | Op::UpsertCidr(..) | Op::DeleteCidr(..)
                )),
                "seed {seed}: {:?}",
                plan.ops
            );
        }
    }
}

#[test]
fn policy_event_touches_only_its_namespace() {
    let mut checked = 0;
    let mut reclassed = 0;
    for seed in 1..=60u64 {
        let s = cluster_seeded(seed);
        let mut inc = Incremental::new(&s, IdAllocator::default());
        let before = inc.maps().clone();
        let mut r = Rng(seed | 1);
        let mut p = random_policy(&mut r, "aaa-first");
        p.namespace = "n1".into();
        let n1_ids: BTreeSet<u32> = s
            .pods
            .values()
            .filter(|p| p.namespace == "n1")
            .flat_map(|p| p.ips.iter())
            .filter_map(|ip| inc.maps().identities.get(&addr16(*ip)).map(|i| i.id))
            .collect();
        let plan = inc.apply(&[Change::Policy(p.obj_ref(), Some(p))]);
        // A new ipBlock changes the CIDR classes; then (only) class entries of other
        // namespaces follow.
        let classes_changed = plan
            .ops
            .iter()
            .any(|o| matches!(o, Op::UpsertCidr(..) | Op::DeleteCidr(..)));
        for op in &plan.ops {
            match op {
                Op::UpsertPolicy((_, k), _) | Op::DeletePolicy((_, k)) => {
                    assert!(
                        n1_ids.contains(&k.local_id)
                            || (classes_changed && k.peer_id & CIDR_CLASS_BIT != 0),
                        "seed {seed}: {op:?}"
                    );
                }
                Op::UpsertPair(k, _) | Op::DeletePair(k) => {
                    assert!(
                        n1_ids.contains(&k.local_id)
                            || (classes_changed && k.peer_id & CIDR_CLASS_BIT != 0),
                        "seed {seed}: {op:?}"
                    );
                }
                Op::UpsertEndpoint(_, e) => assert!(n1_ids.contains(&e.id), "seed {seed}: {op:?}"),
                Op::UpsertCidr(..) | Op::DeleteCidr(..) => {}
                // New classes: an address's CIDR class may change, nothing else of it.
                Op::UpsertIdentity(a, v) if classes_changed => {
                    let old = before.identities.get(a).expect("a known address");
                    assert_eq!(
                        (v.id, v.ifindex, v.flags),
                        (old.id, old.ifindex, old.flags),
                        "seed {seed}: {op:?}"
                    );
                    assert_ne!(v.class, old.class, "seed {seed}: {op:?} rewrites nothing");
                    reclassed += 1;
                }
                other => panic!("seed {seed}: a policy event must not touch {other:?}"),
            }
        }
        // Stable rule refs: every entry of another namespace's identity keeps its value,
        // although the new policy sorts first.
        for (k, v) in &before.policy {
            if !n1_ids.contains(&k.1.local_id) && k.1.peer_id & CIDR_CLASS_BIT == 0 {
                assert_eq!(inc.maps().policy.get(k), Some(v), "seed {seed}: {k:?}");
                checked += 1;
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} entries of other namespaces checked"
    );
    assert!(
        reclassed > 0,
        "some new ipBlock must contain a known address"
    );
}

fn cluster_seeded(seed: u64) -> ClusterSnapshot {
    let mut s = random_cluster(seed);
    s.node_name = Some("node".into());
    s
}

#[test]
fn pending_links_default_deny_the_directions_of_unplaced_pods() {
    let mut s = cluster();
    // Only one namespace's policies matter here: a deny-all-ingress in n3.
    s.namespaces.insert(
        "n3".into(),
        Namespace {
            name: "n3".into(),
            labels: labels(&[("kubernetes.io/metadata.name", "n3")]),
        },
    );
    let deny = Policy {
        namespace: "n3".into(),
        name: "deny-in".into(),
        pod_selector: Selector {
            match_labels: labels(&[("app", "new")]),
            ..Default::default()
        },
        ingress: Some(vec![]),
        egress: None,
    };
    s.policies.insert(deny.obj_ref(), deny);
    let mut inc = Incremental::new(&s, IdAllocator::default());
    // A pending link with no unplaced pod: tracked, not isolated.
    let plan = inc.apply(&[Change::PendingLink(500, true)]);
    let slot = inc.maps().endpoints[&500].slot;
    assert!(slot >= npm_common::metrics::SLOT_FIRST);
    assert_eq!(
        plan.ops,
        vec![
            // A new interface's counters start from zero.
            Op::ResetCounters(slot),
            Op::UpsertEndpoint(
                500,
                EndpointInfo {
                    id: ID_PENDING,
                    flags: 0,
                    slot,
                }
            )
        ]
    );
    // This node's new pod, no IP yet, selected by deny-in: the pending link isolates ingress.
    let newpod = Pod {
        namespace: "n3".into(),
        name: "new".into(),
        labels: labels(&[("app", "new")]),
        ips: vec![],
        node_name: Some("node".into()),
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![],
    };
    let plan = inc.apply(&[Change::Pod(newpod.obj_ref(), Some(newpod.clone()))]);
    assert_eq!(
        plan.ops,
        vec![Op::UpsertEndpoint(
            500,
            EndpointInfo {
                id: ID_PENDING,
                flags: EP_ISOLATE_INGRESS,
                slot,
            }
        )]
    );
    // Every peer is refused new inbound flows on it, through the simulated datapath.
    let m = inc.maps().clone();
    for peer in ["10.0.0.1", "10.0.0.2", "192.0.2.77", "fd00::1"] {
        let peer: IpAddr = peer.parse().expect("ip");
        assert!(!datapath_side(&m, 500, DIR_INGRESS, peer, 6, 80), "{peer}");
        assert!(datapath_side(&m, 500, DIR_EGRESS, peer, 6, 80), "{peer}");
    }
    // A pod on another node, or one on the host network, does not count.
    let mut elsewhere = newpod.clone();
    elsewhere.name = "elsewhere".into();
    elsewhere.node_name = Some("other-node".into());
    elsewhere.labels = labels(&[("app", "x")]);
    assert!(
        inc.apply(&[Change::Pod(elsewhere.obj_ref(), Some(elsewhere))])
            .is_empty()
    );
    // The pod gets its IP and its interface: the real identity replaces the pending one.
    let mut placed = newpod.clone();
    placed.ips = vec!["10.0.9.9".parse().expect("ip")];
    let plan = inc.apply(&[
        Change::Pod(placed.obj_ref(), Some(placed.clone())),
        Change::Local(placed.obj_ref(), Some(500)),
        Change::PendingLink(500, false),
    ]);
    let ep = inc.maps().endpoints[&500];
    assert_ne!(ep.id, ID_PENDING);
    assert_eq!(ep.flags, EP_ISOLATE_INGRESS);
    assert!(plan.ops.contains(&Op::UpsertEndpoint(500, ep)));
    // A pending link on an ifindex a local pod holds is skipped: the pod's entry stays.
    let plan = inc.apply(&[Change::PendingLink(500, true)]);
    assert!(plan.is_empty(), "{:?}", plan.ops);
    assert_eq!(inc.maps().endpoints[&500], ep);
}

#[test]
fn compile_wrapper_keeps_rule_refs_meaningful() {
    let s = cluster();
    let c = compile(&s, &mut IdAllocator::default());
    for v in c.maps.policy.values() {
        let r = &c.rules[&v.rule_ref];
        let p = &s.policies[&r.policy];
        let rules = if r.dir == DIR_INGRESS {
            &p.ingress
        } else {
            &p.egress
        };
        assert!(rules.as_ref().is_some_and(|rs| r.index < rs.len()));
    }
}

#[test]
fn node_name_decides_which_pods_are_not_yet_placed() {
    let mut s = cluster();
    s.node_name = None;
    let pod = Pod {
        namespace: "n1".into(),
        name: "unplaced".into(),
        labels: labels(&[("app", "z")]),
        ips: vec![],
        node_name: Some("node".into()),
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![],
    };
    let deny = Policy {
        namespace: "n1".into(),
        name: "deny-z".into(),
        pod_selector: Selector {
            match_labels: labels(&[("app", "z")]),
            ..Default::default()
        },
        ingress: Some(vec![]),
        egress: Some(vec![]),
    };
    s.pods.insert(pod.obj_ref(), pod);
    s.policies.insert(deny.obj_ref(), deny);
    s.pending_links.insert(700);
    let mut inc = Incremental::new(&s, IdAllocator::default());
    assert_eq!(
        inc.maps().endpoints[&700].flags,
        0,
        "no node name: no pod is ours"
    );
    let plan = inc.set_node_name(Some("node".into()));
    let both = npm_common::maps::EP_ISOLATE_INGRESS | npm_common::maps::EP_ISOLATE_EGRESS;
    assert_eq!(
        plan.ops,
        vec![Op::UpsertEndpoint(
            700,
            EndpointInfo {
                id: ID_PENDING,
                flags: both,
                slot: inc.maps().endpoints[&700].slot,
            }
        )]
    );
    let mut fresh_snapshot = inc.snapshot().clone();
    fresh_snapshot.generation = 0;
    assert_eq!(
        canon(&inc),
        canon(&Incremental::new(&fresh_snapshot, IdAllocator::default()))
    );
    assert!(inc.set_node_name(Some("node".into())).is_empty());
}

/// A restarted agent: a compiler that adopted `old`'s maps and is fed `s` as changes from an
/// empty snapshot, as `Pipeline` does.
fn restarted(old: &DesiredMaps, s: &ClusterSnapshot) -> Incremental {
    let mut ids = IdAllocator::default();
    ids.adopt(old);
    let start = ClusterSnapshot {
        node_name: s.node_name.clone(),
        ..ClusterSnapshot::default()
    };
    let mut inc = Incremental::new(&start, ids);
    inc.apply(&start.diff(s));
    inc
}

#[test]
fn a_compiler_seeded_from_adopted_maps_gives_every_id_back() {
    let (mut exact, mut renumbered_before) = (0usize, 0usize);
    for seed in 1..=40u64 {
        let mut r = Rng(seed.wrapping_mul(0x9FB2_1C65_1E98_DF25) | 1);
        let mut base = random_cluster(seed);
        base.node_name = Some("node".into());
        // A history of pod, namespace, link and node changes (policies unchanged, so rule
        // numbers are those of a fresh compile), so ids are not 1..n.
        let mut inc = Incremental::new(&base, IdAllocator::default());
        let mut next = 0;
        for _ in 0..25 {
            let c = loop {
                let c = random_change(&mut r, inc.snapshot(), &mut next);
                if !matches!(c, Change::Policy(..)) {
                    break c;
                }
            };
            inc.apply(&[c]);
        }
        let old = inc.maps().clone();
        let again = restarted(&old, inc.snapshot());
        assert_eq!(again.maps(), &old, "seed {seed}: the same maps, id for id");
        assert!(
            plan::plan(&old, again.maps()).ops.is_empty(),
            "seed {seed}: nothing to write"
        );
        assert_eq!(canon(&again), canon(&inc), "seed {seed}");
        exact += 1;
        // Without adoption (the old behaviour) the ids move above the reserved ones.
        let mut ids = IdAllocator::default();
        ids.reserve(old.identities.values().map(|p| p.id));
        let fresh = Incremental::new(inc.snapshot(), ids);
        renumbered_before += usize::from(!plan::plan(&old, fresh.maps()).ops.is_empty());

        // And after a history with policy changes too: ENDPOINTS, IDENTITIES and CIDRS are the
        // same id for id, and so is every POLICY and PAIRS key between identities that own an
        // address or an interface (one whose pods own neither, e.g. a pod whose only address
        // another pod owns, appears nowhere to vote from: it gets a new id); rule numbers may
        // differ (they follow the policies' history); what each entry means is the same.
        for _ in 0..15 {
            let c = random_change(&mut r, inc.snapshot(), &mut next);
            inc.apply(&[c]);
        }
        let old = inc.maps().clone();
        let again = restarted(&old, inc.snapshot());
        let m = again.maps();
        assert_eq!(
            (&m.endpoints, &m.identities, &m.cidrs),
            (&old.endpoints, &old.identities, &old.cidrs),
            "seed {seed}"
        );
        let placed: BTreeSet<u32> = old
            .identities
            .values()
            .map(|p| p.id)
            .chain(old.endpoints.values().map(|e| e.id))
            .chain(old.cidrs.values().copied())
            .collect();
        let keys = |m: &DesiredMaps| -> Vec<_> {
            m.pairs
                .keys()
                .filter(|k| placed.contains(&k.local_id) && placed.contains(&k.peer_id))
                .copied()
                .collect()
        };
        assert_eq!(keys(m), keys(&old), "seed {seed}");
        assert_eq!(canon(&again), canon(&inc), "seed {seed}");
    }
    assert_eq!(exact, 40);
    assert!(renumbered_before > 30, "{renumbered_before}");
}

#[test]
fn adopted_ids_in_conflict_go_to_one_identity_each() {
    let s = random_cluster(7);
    let keys: Vec<ObjRef> = s.pods.keys().cloned().collect();
    let c = compile(&s, &mut IdAllocator::default());
    let ip = |p: &Pod| addr16(p.ips[0]);
    let old_id = |o: &ObjRef| c.maps.identities[&ip(&s.pods[o])].id;
    let max_old = c.maps.identities.values().map(|p| p.id).max().expect("ids");
    // While the agent was down: pod 1 became a twin of pod 0 (same namespace, labels and
    // ports: one identity, two adopted ids voting for it; pod 1's interface went), and pod 2
    // got new labels (its address's id now votes for a new identity, and any pod still of its
    // old identity votes for the same id).
    let mut t = s.clone();
    let mut twin = s.pods[&keys[0]].clone();
    twin.name = "twin".into();
    twin.ips = s.pods[&keys[1]].ips.clone();
    t.pods.remove(&keys[1]);
    t.local.remove(&keys[1]);
    t.pods.insert(twin.obj_ref(), twin.clone());
    t.pods
        .get_mut(&keys[2])
        .expect("pod")
        .labels
        .insert("relabelled".into(), "yes".into());
    let again = restarted(&c.maps, &t);
    let m = again.maps();
    let new_id = |p: &Pod| m.identities[&ip(p)].id;
    assert_eq!(
        new_id(&twin),
        new_id(&t.pods[&keys[0]]),
        "one identity, one id"
    );
    assert_eq!(
        new_id(&twin),
        old_id(&keys[0]),
        "two votes (address and interface) against one"
    );
    // No two identities share an id; an identity that lost a conflict gets a new one, above
    // every adopted id.
    let live: BTreeMap<u32, &IdentityKey> = again.ids().pod_ids().map(|(k, id)| (id, k)).collect();
    assert_eq!(live.len(), again.ids().live_pod_identities());
    let old_ids: BTreeSet<u32> = c.maps.identities.values().map(|p| p.id).collect();
    for p in t.pods.values() {
        let id = new_id(p);
        assert!(old_ids.contains(&id) || id > max_old, "{}: {id}", p.name);
    }
    // The relabelled pod's address voted for its old id: its new identity has it unless a pod
    // still of the old identity won it (more votes, or as many and the earlier key).
    let relabelled = new_id(&t.pods[&keys[2]]);
    let stayed = t.pods.values().any(|p| {
        p.name != keys[2].name
            && s.pods
                .get(&p.obj_ref())
                .is_some_and(|q| old_id(&q.obj_ref()) == old_id(&keys[2]))
    });
    assert!(
        relabelled == old_id(&keys[2]) || (stayed && relabelled > max_old),
        "{relabelled}"
    );
    // Pods untouched keep their ids unless their identity lost a conflict.
    for o in keys.iter().skip(3) {
        assert!(
            new_id(&t.pods[o]) == old_id(o) || new_id(&t.pods[o]) > max_old,
            "{o}"
        );
    }
    // The order the changes come in does not matter.
    let mut ids = IdAllocator::default();
    ids.adopt(&c.maps);
    let start = ClusterSnapshot::default();
    let mut inc = Incremental::new(&start, ids);
    let mut changes = start.diff(&t);
    changes.reverse();
    inc.apply(&changes);
    assert_eq!(inc.maps(), again.maps());
}
