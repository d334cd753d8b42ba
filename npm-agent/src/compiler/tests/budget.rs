//! The per-policy entry budget and the total guard: counts, failing closed, and the
//! incremental path against a fresh compile while policies go over and back under.
use std::collections::BTreeMap;

use npm_common::maps::{EP_ISOLATE_INGRESS, POLICY_MAX};

use super::incremental::{canon, check_reference, random_change, replay};
use super::*;
use crate::programmer::fake::FakeBackend;
use crate::programmer::plan;
use crate::state::{Change, ClusterSnapshot};

fn limits(per_policy: usize, total: usize) -> Limits {
    Limits {
        max_policy_entries: per_policy,
        max_total_entries: total,
    }
}

/// `s` as the maps must enforce it when the policies in `closed` fail closed: they keep
/// their directions (isolation) and lose every rule.
fn closed_view(s: &ClusterSnapshot, closed: &BTreeMap<ObjRef, Closed>) -> ClusterSnapshot {
    let mut v = s.clone();
    for obj in closed.keys() {
        let p = v.policies.get_mut(obj).expect("a closed policy exists");
        for rules in [&mut p.ingress, &mut p.egress].into_iter().flatten() {
            rules.clear();
        }
    }
    v
}

fn pod(ns: &str, name: &str, app: &str, ip: &str) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(&[("app", app)]),
        ips: vec![ip.parse().expect("ip")],
        node_name: None,
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![],
    }
}

fn ns(name: &str) -> Namespace {
    Namespace {
        name: name.into(),
        labels: labels(&[("kubernetes.io/metadata.name", name)]),
    }
}

/// Ingress to `app` pods of `ns` from every pod of every namespace on `ports` TCP ports.
fn from_everywhere(ns: &str, name: &str, app: &str, ports: u16) -> Policy {
    Policy {
        namespace: ns.into(),
        name: name.into(),
        pod_selector: Selector {
            match_labels: labels(&[("app", app)]),
            ..Default::default()
        },
        ingress: Some(vec![Rule {
            peers: vec![Peer::Pods {
                namespace_selector: Some(Selector::default()),
                pod_selector: None,
            }],
            ports: (0..ports)
                .map(|i| PortSpec {
                    protocol: Protocol::Tcp,
                    port: Some(PortRef::Number(1000 + i)),
                    end_port: None,
                })
                .collect(),
        }]),
        egress: None,
    }
}

/// Two tenants: `big` (ingress to app=web of "a" from every pod, 10 ports) and `small`
/// (ingress to app=db of "b" from its own namespace, one port). Every pod is local; each pod
/// has its own app label, so its own identity.
fn tenants(pods_per_ns: usize) -> ClusterSnapshot {
    let mut s = ClusterSnapshot::default();
    for n in ["a", "b"] {
        s.namespaces.insert(n.into(), ns(n));
    }
    let mut ifindex = 100;
    for (n, app, octet) in [("a", "web", 1), ("b", "db", 2)] {
        for i in 0..pods_per_ns {
            let mut p = pod(
                n,
                &format!("{app}{i}"),
                app,
                &format!("10.{octet}.0.{}", i + 1),
            );
            p.labels.insert("i".into(), i.to_string());
            s.local.insert(p.obj_ref(), ifindex);
            ifindex += 1;
            s.pods.insert(p.obj_ref(), p);
        }
    }
    let big = from_everywhere("a", "big", "web", 10);
    let mut small = from_everywhere("b", "small", "db", 1);
    small.ingress.as_mut().expect("ingress")[0].peers = vec![Peer::Pods {
        namespace_selector: None,
        pod_selector: None,
    }];
    s.policies.insert(big.obj_ref(), big);
    s.policies.insert(small.obj_ref(), small);
    s
}

fn policy_rule_refs(c: &Compiled, obj: &ObjRef) -> usize {
    c.maps
        .policy
        .values()
        .filter(|v| c.rules[&v.rule_ref].policy == *obj)
        .count()
}

#[test]
fn the_count_of_a_policy_alone_is_the_entries_it_makes() {
    // One policy at a time: no merge, no other policy's ipBlocks, so the count is exact.
    let mut checked = 0;
    for seed in 1..=120u64 {
        let s = random_cluster(seed);
        for (obj, p) in &s.policies {
            let mut one = s.clone();
            one.policies = [(obj.clone(), p.clone())].into();
            let c = compile(&one, &mut IdAllocator::default());
            assert_eq!(
                c.policy_entries[obj].entries,
                c.maps.policy.len(),
                "seed {seed} {obj}: {p:#?}"
            );
            checked += usize::from(!c.maps.policy.is_empty());
        }
        // Together: each count stands alone, the merge only removes duplicates.
        let c = compile(&s, &mut IdAllocator::default());
        let sum: usize = c.policy_entries.values().map(|n| n.entries).sum();
        let unsplit = s.policies.values().all(|p| {
            [&p.ingress, &p.egress]
                .into_iter()
                .flatten()
                .flatten()
                .all(|r| r.peers.iter().all(|x| matches!(x, Peer::Pods { .. })))
        });
        if unsplit {
            assert!(sum >= c.maps.policy.len(), "seed {seed}");
        }
    }
    println!("{checked} policies with entries");
    assert!(checked > 80, "only {checked} policies with entries");
}

#[test]
fn a_policy_over_budget_fails_closed_and_the_others_keep_their_entries() {
    let s = tenants(4);
    let big = ObjRef::new("a", "big");
    let small = ObjRef::new("b", "small");
    // big: 4 web identities × 8 peer identities × 10 ports = 320; small: 4 × 4 × 1 = 16.
    let open = compile(&s, &mut IdAllocator::default());
    assert_eq!(open.policy_entries[&big].entries, 320);
    assert_eq!(open.policy_entries[&small].entries, 16);
    assert!(open.diagnostics.is_empty(), "{:?}", open.diagnostics);
    assert_eq!(policy_rule_refs(&open, &big), 320);

    let c = compile_with(
        &s,
        &mut IdAllocator::default(),
        limits(100, POLICY_MAX as usize),
    );
    assert_eq!(
        c.policy_entries[&big],
        PolicyCount {
            entries: 320,
            closed: Some(Closed::OverBudget)
        }
    );
    assert_eq!(c.policy_entries[&small].closed, None);
    // Fails closed: its pods stay isolated, it allows nothing.
    assert_eq!(policy_rule_refs(&c, &big), 0);
    assert_eq!(
        policy_rule_refs(&c, &small),
        16,
        "the other tenant is untouched"
    );
    assert_eq!(c.maps.policy.len(), 16);
    for (obj, i) in &s.local {
        assert_eq!(
            c.maps.endpoints[i].flags & EP_ISOLATE_INGRESS,
            EP_ISOLATE_INGRESS,
            "{obj} stays isolated"
        );
    }
    assert_eq!(c.diagnostics.len(), 1, "{:?}", c.diagnostics);
    let d = &c.diagnostics[0];
    assert_eq!(d.object, "NetworkPolicy a/big");
    assert!(
        d.message.contains("320")
            && d.message.contains("100")
            && d.message.contains("fails closed"),
        "{}",
        d.message
    );
    check_reference(
        &closed_view(&s, &[(big, Closed::OverBudget)].into()),
        &c.maps,
        "closed",
    );
    // At the budget exactly: open.
    let c = compile_with(
        &s,
        &mut IdAllocator::default(),
        limits(320, POLICY_MAX as usize),
    );
    assert!(c.diagnostics.is_empty());
    assert_eq!(c.maps, open.maps);
}

#[test]
fn new_pods_and_namespaces_push_a_policy_over_and_their_removal_brings_it_back() {
    let s = tenants(2);
    let big = ObjRef::new("a", "big");
    // big: 2 × 4 × 10 = 80 now; budget 100.
    let lim = limits(100, POLICY_MAX as usize);
    let mut inc = Incremental::with_limits(&s, IdAllocator::default(), lim);
    let mut fake = FakeBackend::default();
    replay(&mut fake, &plan::plan(&DesiredMaps::default(), inc.maps()));
    let step = |inc: &mut Incremental, fake: &mut FakeBackend, batch: &[Change], ctx: &str| {
        let p = inc.apply(batch);
        replay(fake, &p);
        assert_eq!(&fake.maps, inc.maps(), "{ctx}: the plan reaches the maps");
        let fresh = Incremental::with_limits(inc.snapshot(), IdAllocator::default(), lim);
        assert_eq!(canon(inc), canon(&fresh), "{ctx}: incremental == fresh");
        assert_eq!(inc.diagnostics(), fresh.diagnostics(), "{ctx}");
        assert_eq!(inc.closed_policies(), fresh.closed_policies(), "{ctx}");
        check_reference(
            &closed_view(inc.snapshot(), inc.closed_policies()),
            inc.maps(),
            ctx,
        );
        inc.policy_counts()[&big]
    };
    assert_eq!(inc.policy_counts()[&big].closed, None);

    // A pod in a new namespace: a new peer identity, 2 × 10 more = 100, still within.
    let c = vec![
        Change::Namespace("c".into(), Some(ns("c"))),
        Change::Pod(ObjRef::new("c", "x"), Some(pod("c", "x", "x", "10.3.0.1"))),
    ];
    let n = step(&mut inc, &mut fake, &c, "namespace c");
    assert_eq!((n.entries, n.closed), (100, None));
    // One more: 120, over; it closes (the small policy stays).
    let y = pod("c", "y", "y", "10.3.0.2");
    let n = step(
        &mut inc,
        &mut fake,
        &[Change::Pod(y.obj_ref(), Some(y.clone()))],
        "pod y",
    );
    assert_eq!((n.entries, n.closed), (120, Some(Closed::OverBudget)));
    assert!(
        inc.maps()
            .policy
            .values()
            .all(|v| inc.rules()[&v.rule_ref].policy != big)
    );
    assert!(!inc.maps().policy.is_empty(), "small keeps its entries");
    // A pod with an existing identity (a twin of y): no new identity, no new entries.
    let mut y2 = y.clone();
    y2.name = "y2".into();
    y2.ips = vec!["10.3.0.3".parse().expect("ip")];
    let n = step(
        &mut inc,
        &mut fake,
        &[Change::Pod(y2.obj_ref(), Some(y2.clone()))],
        "twin",
    );
    assert_eq!(n.entries, 120);
    // y goes (its twin keeps the identity): still over; the twin goes too: back under.
    step(
        &mut inc,
        &mut fake,
        &[Change::Pod(y.obj_ref(), None)],
        "y gone",
    );
    let n = step(
        &mut inc,
        &mut fake,
        &[Change::Pod(y2.obj_ref(), None)],
        "y2 gone",
    );
    assert_eq!((n.entries, n.closed), (100, None));
    assert!(inc.diagnostics().is_empty());
    // A namespace relabel makes new identities of its pods (same count), a new local web
    // pod adds its own entries and is a peer (3 × 6 × 10 = 180, over), an edit down to 5
    // ports brings it back (90).
    let mut relabel = ns("c");
    relabel.labels.insert("team".into(), "red".into());
    let n = step(
        &mut inc,
        &mut fake,
        &[Change::Namespace("c".into(), Some(relabel))],
        "relabel",
    );
    assert_eq!((n.entries, n.closed), (100, None));
    let mut w = pod("a", "web9", "web", "10.1.0.9");
    w.labels.insert("i".into(), "9".into());
    let n = step(
        &mut inc,
        &mut fake,
        &[
            Change::Pod(w.obj_ref(), Some(w.clone())),
            Change::Local(w.obj_ref(), Some(500)),
        ],
        "new local web pod",
    );
    assert_eq!((n.entries, n.closed), (180, Some(Closed::OverBudget)));
    let edit = from_everywhere("a", "big", "web", 5);
    let n = step(
        &mut inc,
        &mut fake,
        &[Change::Policy(big.clone(), Some(edit))],
        "edit",
    );
    assert_eq!((n.entries, n.closed), (90, None));
    // The pod leaves this node (it stays a peer): its own entries and their count go.
    let n = step(
        &mut inc,
        &mut fake,
        &[Change::Local(w.obj_ref(), None)],
        "unlocal",
    );
    assert_eq!((n.entries, n.closed), (60, None));
}

#[test]
fn over_the_total_the_largest_fail_closed_first_deterministically() {
    let mut s = tenants(2);
    // Three more policies in "b" of 2 × 2 × k entries (own namespace peers): 4k.
    for (name, k) in [("p1", 3u16), ("p2", 5), ("p3", 5)] {
        let mut p = from_everywhere("b", name, "db", k);
        p.ingress.as_mut().expect("ingress")[0].peers = vec![Peer::Pods {
            namespace_selector: None,
            pod_selector: None,
        }];
        s.policies.insert(p.obj_ref(), p);
    }
    // big 80, small 4, p1 12, p2 20, p3 20: 136 in all.
    let counts = |c: &Compiled| -> Vec<(String, usize, Option<Closed>)> {
        c.policy_entries
            .iter()
            .map(|(o, n)| (o.name.clone(), n.entries, n.closed))
            .collect()
    };
    let c = compile_with(&s, &mut IdAllocator::default(), limits(1000, 136));
    assert!(c.diagnostics.is_empty());
    // 50 in all: small, p1, p2 fit (36); p3 (as large as p2, later) and big do not.
    let c = compile_with(&s, &mut IdAllocator::default(), limits(1000, 50));
    assert_eq!(
        counts(&c),
        [
            ("big".into(), 80, Some(Closed::OverTotal)),
            ("p1".into(), 12, None),
            ("p2".into(), 20, None),
            ("p3".into(), 20, Some(Closed::OverTotal)),
            ("small".into(), 4, None),
        ]
    );
    assert!(c.maps.policy.len() <= 50);
    let d: Vec<&str> = c.diagnostics.iter().map(|d| d.object.as_str()).collect();
    assert_eq!(d, ["NetworkPolicy a/big", "NetworkPolicy b/p3"]);
    assert!(
        c.diagnostics[0].message.contains("50"),
        "{}",
        c.diagnostics[0].message
    );
    // Over the budget and over the total: the budget says so first, and an over-budget
    // policy takes no room from the total.
    let c = compile_with(&s, &mut IdAllocator::default(), limits(50, 50));
    assert_eq!(
        c.policy_entries[&ObjRef::new("a", "big")].closed,
        Some(Closed::OverBudget)
    );
    assert_eq!(
        c.policy_entries[&ObjRef::new("b", "p3")].closed,
        Some(Closed::OverTotal)
    );
    // Independent of the order the policies arrive in (incremental == fresh).
    let lim = limits(1000, 50);
    let mut inc =
        Incremental::with_limits(&ClusterSnapshot::default(), IdAllocator::default(), lim);
    let mut changes = ClusterSnapshot::default().diff(&s);
    changes.reverse();
    for c in &changes {
        inc.apply(std::slice::from_ref(c));
    }
    let fresh = Incremental::with_limits(&s, IdAllocator::default(), lim);
    assert_eq!(canon(&inc), canon(&fresh));
    assert_eq!(inc.closed_policies(), fresh.closed_policies());
}

#[test]
fn incremental_equals_a_fresh_compile_under_tight_limits() {
    // Small limits so that random changes move policies over and back under both limits.
    let lim = limits(16, 20);
    let (mut steps, mut flips, mut over_budget, mut over_total) = (0usize, 0usize, 0, 0);
    for seed in 1..=40u64 {
        let mut r = Rng(seed.wrapping_mul(0xA24B_AED4_963E_E407) | 1);
        let mut base = random_cluster(seed);
        base.node_name = Some("node".into());
        let mut inc = Incremental::with_limits(&base, IdAllocator::default(), lim);
        let mut fake = FakeBackend::default();
        replay(&mut fake, &plan::plan(&DesiredMaps::default(), inc.maps()));
        let mut next = 0;
        for step in 0..30 {
            let ctx = format!("seed {seed} step {step}");
            let batch: Vec<Change> = (0..1 + r.below(3))
                .map(|_| random_change(&mut r, inc.snapshot(), &mut next))
                .collect();
            let before = inc.closed_policies().clone();
            let p = inc.apply(&batch);
            replay(&mut fake, &p);
            assert_eq!(&fake.maps, inc.maps(), "{ctx}: the plan reaches the maps");
            let fresh = Incremental::with_limits(inc.snapshot(), IdAllocator::default(), lim);
            assert_eq!(canon(&inc), canon(&fresh), "{ctx}\n{batch:#?}");
            assert_eq!(inc.diagnostics(), fresh.diagnostics(), "{ctx}");
            assert_eq!(inc.policy_counts(), fresh.policy_counts(), "{ctx}");
            check_reference(
                &closed_view(inc.snapshot(), inc.closed_policies()),
                inc.maps(),
                &ctx,
            );
            let open_sum: usize = inc
                .policy_counts()
                .values()
                .filter(|n| n.closed.is_none())
                .map(|n| n.entries)
                .sum();
            assert!(open_sum <= lim.max_total_entries, "{ctx}");
            flips += usize::from(&before != inc.closed_policies());
            over_budget += inc
                .closed_policies()
                .values()
                .filter(|c| **c == Closed::OverBudget)
                .count();
            over_total += inc
                .closed_policies()
                .values()
                .filter(|c| **c == Closed::OverTotal)
                .count();
            steps += 1;
        }
    }
    println!(
        "{steps} steps, {flips} with policies opening or closing, {over_budget} over budget, {over_total} over the total"
    );
    assert!(flips > 30, "policies must open and close ({flips})");
    assert!(
        over_budget > 50 && over_total > 20,
        "{over_budget} {over_total}"
    );
}
